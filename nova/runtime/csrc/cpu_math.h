// Scalar helpers shared by Nova's CPU kernels, written so that loops over them vectorize
// (-O3 -march=native): conversions between fp32 and the storage dtypes, and exp without libm.
#pragma once

#include <torch/extension.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace nova_cpu {

inline float to_f32(float x) { return x; }
inline float to_f32(c10::BFloat16 x) { return std::bit_cast<float>(uint32_t(x.x) << 16); }
inline float to_f32(c10::Half x) { return static_cast<float>(x); }

// A storage dtype's raw element and its conversions to and from fp32. bf16 is handled as its
// uint16_t bits: loops over them vectorize, while stores through c10::BFloat16 objects do not.
// fp32 -> storage rounds to nearest even as PyTorch's own conversions do (NaN stays NaN), so a
// kernel that rounds where an eager op would round reproduces its result.
template <typename T>
struct Storage;
template <>
struct Storage<float> {
  using raw = float;
  static float load(float x) { return x; }
  static float store(float x) { return x; }
};
template <>
struct Storage<c10::Half> {
  using raw = c10::Half;
  static float load(c10::Half x) { return static_cast<float>(x); }
  static c10::Half store(float x) { return static_cast<c10::Half>(x); }
};
template <>
struct Storage<c10::BFloat16> {
  using raw = uint16_t;
  static float load(uint16_t x) { return std::bit_cast<float>(uint32_t(x) << 16); }
  static uint16_t store(float x) {
    const uint32_t u = std::bit_cast<uint32_t>(x);
    const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    // (NaN by the bits: an integer select keeps the loop vectorized)
    const bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
    return nan ? uint16_t(0x7FC0) : static_cast<uint16_t>(rounded);
  }
};

template <typename T>
using raw_t = typename Storage<T>::raw;

// The value after a round trip through the storage dtype (the rounding an eager op's output
// gets), as fp32.
template <typename T>
inline float round_to(float x) {
  return Storage<T>::load(Storage<T>::store(x));
}

// exp(x) without libm (std::exp is a scalar call; this vectorizes): x = n ln2 + y with
// |y| <= ln2 / 2, e^y from its Taylor series to degree 7 (truncation below 6e-9 relative), 2^n
// from the exponent bits. x is clamped to [-87, 89]: below, about 1.6e-38 instead of less (nil
// in a softmax's sum); from about 88.73 on, 2^128 is inf and so is the result, as with expf
// (so silu of a large negative x is -0, as PyTorch's).
inline float exp_clamped(float x) {
  x = std::min(x, 89.0f);
  x = std::max(x, -87.0f);
  // n = x / ln2 rounded to the nearest integer by adding and subtracting 1.5 * 2^23 (std::floor
  // or std::nearbyint would keep the loop scalar)
  constexpr float kRound = 12582912.0f;
  const float n = (x * 1.44269504088896341f + kRound) - kRound;
  const float y = x - n * 0.693147180559945309f;
  float p = 1.0f / 5040.0f;
  p = p * y + 1.0f / 720.0f;
  p = p * y + 1.0f / 120.0f;
  p = p * y + 1.0f / 24.0f;
  p = p * y + 1.0f / 6.0f;
  p = p * y + 0.5f;
  p = p * y + 1.0f;
  p = p * y + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  return p * std::bit_cast<float>(bits);
}

// The largest of x[0..len) (-inf for none), in a loop of its own with a plain comparison:
// fused with another loop, or with std::max, gcc's vectorized reduction ran at half the speed.
inline float max_of(const float* x, int64_t len) {
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t t = 0; t < len; ++t) m = m > x[t] ? m : x[t];
  return m;
}

// x[t] = exp(x[t] - max(x)) for t < len, in place; returns their sum (a softmax's numerators
// and denominator).
inline float exp_minus_max(float* x, int64_t len) {
  const float m = max_of(x, len);
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t t = 0; t < len; ++t) {
    x[t] = exp_clamped(x[t] - m);
    sum += x[t];
  }
  return sum;
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
// exp_clamped on 16 lanes: the scalar helper's arithmetic step for step (its clamps keep a NaN).
inline __m512 exp_clamped16(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(89.0f), x);  // (min(c, x) returns x when x is NaN)
  x = _mm512_max_ps(_mm512_set1_ps(-87.0f), x);
  const __m512 round = _mm512_set1_ps(12582912.0f);
  const __m512 n =
      _mm512_sub_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), round), round);
  const __m512 y = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693147180559945309f), x);
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  for (const float c : {1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f})
    p = _mm512_fmadd_ps(p, y, _mm512_set1_ps(c));
  const __m512i bits =
      _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
  return _mm512_mul_ps(p, _mm512_castsi512_ps(bits));
}

// 16 bf16 values (raw bits) widened to fp32 lanes.
inline __m512 load_bf16x16(const void* p) {
  const __m256i raw = _mm256_loadu_si256(static_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}

// 16 lanes rounded to bf16 by the CPU's own conversion (round to nearest even, as PyTorch's;
// a NaN stays a NaN, with its sign; a denormal result becomes 0).
inline __m256i to_bf16x16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }

inline void store_bf16x16(void* p, __m512 x) {
  _mm256_storeu_si256(static_cast<__m256i*>(p), to_bf16x16(x));
}
#endif

// f(tag) with a value of the C++ type of ``dtype`` (fp32, bf16 or fp16); any other dtype is an
// error naming the kernel.
template <typename F>
inline void dispatch(at::ScalarType dtype, const char* name, F&& f) {
  switch (dtype) {
    case at::kFloat:
      f(float{});
      break;
    case at::kBFloat16:
      f(c10::BFloat16{});
      break;
    case at::kHalf:
      f(c10::Half{});
      break;
    default:
      TORCH_CHECK(false, name, ": unsupported dtype ", dtype);
  }
}

// A tensor's data as its dtype's raw elements (Storage<T>::raw).
template <typename T>
inline typename Storage<T>::raw* raw(const at::Tensor& t) {
  return reinterpret_cast<typename Storage<T>::raw*>(t.data_ptr<T>());
}

}  // namespace nova_cpu
