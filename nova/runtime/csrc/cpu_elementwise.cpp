// The decoder's elementwise work on the CPU in one pass each: RMSNorm (with the residual add
// before it), SiLU(gate) * up, and the rotary embedding of queries and keys.
//
// Why (docs/cpu.md, "Fused elementwise kernels"): written as PyTorch ops these are 4-7 passes
// over the activations each (RMSNorm alone: to fp32, pow, mean, add, rsqrt, mul, to bf16, mul),
// every pass a full read and write plus an op dispatch; in a 2,000-token bf16 prefill of the
// peer model they took about a third of the time, more than the attention.
//
// Each kernel rounds to the storage dtype exactly where the eager ops it replaces round (an
// eager bf16 op computes in fp32 and rounds its output), so results match the eager path up to
// the last bit of fp32 arithmetic (summation order, exp and rsqrt), which a bf16 rounding
// almost always absorbs. In fp32 no rounding step exists and the kernels agree with the eager
// path to float precision.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <tuple>
#include <type_traits>
#include <vector>

#include "cpu_math.h"

namespace nova_cpu {
namespace {

// Rows per task: enough elements that a thread's share outweighs waking it.
inline int64_t grain_rows(int64_t row_elems) {
  return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, row_elems));
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define NOVA_BF16_AVX512 1
// (exp_clamped16, load_bf16x16, to_bf16x16, store_bf16x16: cpu_math.h)
inline __m512 round_bf16x16(__m512 x) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16x16(x)), 16));
}

// silu_mul_rows' inner loop for bf16, 16 lanes at a time: the same arithmetic, with the two
// roundings to bf16 done by vcvtneps2bf16 (emulated on the bits, they cost as much as the exp
// and the division together). Returns the lanes done (the caller does the rest).
inline int64_t silu_mul_bf16x16(const uint16_t* g, const uint16_t* u, uint16_t* o, int64_t I) {
  int64_t i = 0;
  const __m512 one = _mm512_set1_ps(1.0f);
  for (; i + 16 <= I; i += 16) {
    const __m512 x = load_bf16x16(g + i);
    const __m512 e = exp_clamped16(_mm512_sub_ps(_mm512_setzero_ps(), x));
    const __m512 s = round_bf16x16(_mm512_div_ps(x, _mm512_add_ps(one, e)));
    store_bf16x16(o + i, _mm512_mul_ps(s, load_bf16x16(u + i)));
  }
  return i;
}

// rms_norm_rows' loops for one bf16 row, 16 lanes at a time (H % 16 == 0): the same arithmetic
// with the roundings done by vcvtneps2bf16.
inline void rms_norm_bf16x16(const uint16_t* x, const uint16_t* residual, const uint16_t* weight,
                             uint16_t* sum, uint16_t* out, int64_t H, float eps) {
  const uint16_t* v = x;
  if (residual != nullptr) {
    for (int64_t i = 0; i < H; i += 16)
      store_bf16x16(sum + i, _mm512_add_ps(load_bf16x16(x + i), load_bf16x16(residual + i)));
    v = sum;
  }
  __m512 ss = _mm512_setzero_ps();
  for (int64_t i = 0; i < H; i += 16) {
    const __m512 f = load_bf16x16(v + i);
    ss = _mm512_fmadd_ps(f, f, ss);
  }
  const __m512 inv =
      _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(ss) / static_cast<float>(H) + eps));
  for (int64_t i = 0; i < H; i += 16) {
    const __m512 normed = round_bf16x16(_mm512_mul_ps(load_bf16x16(v + i), inv));
    store_bf16x16(out + i, _mm512_mul_ps(load_bf16x16(weight + i), normed));
  }
}

// rope_rows' loops for one bf16 head (half % 16 == 0), the roundings by vcvtneps2bf16.
inline void rope_bf16x16(const uint16_t* x, const uint16_t* c, const uint16_t* s, uint16_t* o,
                         int64_t half) {
  const __m512 minus = _mm512_set1_ps(-1.0f);
  for (int64_t i = 0; i < half; i += 16) {
    const __m512 lo = load_bf16x16(x + i), hi = load_bf16x16(x + i + half);
    const __m512 a0 = round_bf16x16(_mm512_mul_ps(lo, load_bf16x16(c + i)));
    const __m512 b0 = round_bf16x16(_mm512_mul_ps(_mm512_mul_ps(hi, minus), load_bf16x16(s + i)));
    store_bf16x16(o + i, _mm512_add_ps(a0, b0));
    const __m512 a1 = round_bf16x16(_mm512_mul_ps(hi, load_bf16x16(c + i + half)));
    const __m512 b1 = round_bf16x16(_mm512_mul_ps(lo, load_bf16x16(s + i + half)));
    store_bf16x16(o + i + half, _mm512_add_ps(a1, b1));
  }
}
#endif

// out = weight * round(v * rsqrt(mean(v^2) + eps)) with v = x, or with a residual:
// sum = round(x + residual), v = sum (what `h = h + x; norm(h)` computes).
template <typename T>
void rms_norm_rows(const raw_t<T>* x, int64_t x_stride, const raw_t<T>* residual, int64_t res_stride,
                   const raw_t<T>* weight, raw_t<T>* sum, raw_t<T>* out, int64_t rows, int64_t H, float eps) {
  using S = Storage<T>;
  using R = raw_t<T>;
  at::parallel_for(0, rows, grain_rows(H), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const R* xr = x + r * x_stride;
      R* o = out + r * H;
#ifdef NOVA_BF16_AVX512
      if constexpr (std::is_same_v<T, c10::BFloat16>) {
        if (H % 16 == 0) {
          rms_norm_bf16x16(xr, residual == nullptr ? nullptr : residual + r * res_stride, weight,
                           residual == nullptr ? nullptr : sum + r * H, o, H, eps);
          continue;
        }
      }
#endif
      const R* v = xr;
      if (residual != nullptr) {
        const R* rr = residual + r * res_stride;
        R* s = sum + r * H;
#pragma omp simd
        for (int64_t i = 0; i < H; ++i) s[i] = S::store(S::load(xr[i]) + S::load(rr[i]));
        v = s;
      }
      float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < H; ++i) {
        const float f = S::load(v[i]);
        ss += f * f;
      }
      const float inv = 1.0f / std::sqrt(ss / static_cast<float>(H) + eps);
#pragma omp simd
      for (int64_t i = 0; i < H; ++i)
        o[i] = S::store(S::load(weight[i]) * round_to<T>(S::load(v[i]) * inv));
    }
  });
}

// out[r, i] = round(round(silu(gate[r, i])) * up[r, i]); gate = gu[r, :I], up = gu[r, I:].
template <typename T>
void silu_mul_rows(const raw_t<T>* gu, int64_t stride, raw_t<T>* out, int64_t rows, int64_t I) {
  using S = Storage<T>;
  using R = raw_t<T>;
  at::parallel_for(0, rows, grain_rows(I), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const R* g = gu + r * stride;
      const R* u = g + I;
      R* o = out + r * I;
      int64_t first = 0;
#ifdef NOVA_BF16_AVX512
      if constexpr (std::is_same_v<T, c10::BFloat16>) first = silu_mul_bf16x16(g, u, o, I);
#endif
#pragma omp simd
      for (int64_t i = first; i < I; ++i) {
        const float x = S::load(g[i]);
        const float s = round_to<T>(x / (1.0f + exp_clamped(-x)));
        o[i] = S::store(s * S::load(u[i]));
      }
    }
  });
}

// out[t, n] = round(round(x * cos) + round(rotate_half(x) * sin)), rotate_half(x) =
// (-x[half:], x[:half]); x[t, n] at x + t * st + n * sn (a strided view of the q/k/v GEMM's
// output), cos/sin rows [T, D], out contiguous [T, N, D].
template <typename T>
void rope_rows(const raw_t<T>* x, int64_t st, int64_t sn, const raw_t<T>* cos, const raw_t<T>* sin, raw_t<T>* out,
               int64_t tokens, int64_t N, int64_t D) {
  using S = Storage<T>;
  using R = raw_t<T>;
  const int64_t half = D / 2;
  at::parallel_for(0, tokens, grain_rows(N * D), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const R* c = cos + t * D;
      const R* s = sin + t * D;
      for (int64_t n = 0; n < N; ++n) {
        const R* xr = x + t * st + n * sn;
        R* o = out + (t * N + n) * D;
#ifdef NOVA_BF16_AVX512
        if constexpr (std::is_same_v<T, c10::BFloat16>) {
          if (half % 16 == 0) {
            rope_bf16x16(xr, c, s, o, half);
            continue;
          }
        }
#endif
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {
          const float a = round_to<T>(S::load(xr[i]) * S::load(c[i]));
          const float b = round_to<T>(-S::load(xr[i + half]) * S::load(s[i]));
          o[i] = S::store(a + b);
        }
#pragma omp simd
        for (int64_t i = half; i < D; ++i) {
          const float a = round_to<T>(S::load(xr[i]) * S::load(c[i]));
          const float b = round_to<T>(S::load(xr[i - half]) * S::load(s[i]));
          o[i] = S::store(a + b);
        }
      }
    }
  });
}

// In place, per row of a prefill tile's scores [B, KVH, n, G, kv]: row (b, ., i, .) sees keys
// 0..L-1 with L = row_lens[b, row0 + i] (clipped to kv); p = softmax(round(scale * s)) over
// them and 0 after (what adding the causal mask's 0 / -inf and PyTorch's softmax compute).
template <typename T>
void prefix_softmax_rows(raw_t<T>* scores, const int32_t* row_lens, int64_t lens_stride,
                         int64_t row0, int64_t B, int64_t KVH, int64_t n, int64_t G, int64_t kv,
                         float scale) {
  using S = Storage<T>;
  const int64_t rows = B * KVH * n * G;
  at::parallel_for(0, rows, grain_rows(kv), [&](int64_t begin, int64_t end) {
    std::vector<float> e(kv);  // the row's exponentials in fp32 (normalized before rounding)
    for (int64_t r = begin; r < end; ++r) {
      const int64_t b = r / (KVH * n * G);
      const int64_t i = (r / G) % n;
      const int64_t len =
          std::min<int64_t>(kv, std::max<int32_t>(1, row_lens[b * lens_stride + row0 + i]));
      raw_t<T>* s = scores + r * kv;
#pragma omp simd
      for (int64_t t = 0; t < len; ++t) e[t] = round_to<T>(scale * S::load(s[t]));
      const float inv = 1.0f / exp_minus_max(e.data(), len);
#pragma omp simd
      for (int64_t t = 0; t < len; ++t) s[t] = S::store(e[t] * inv);
      for (int64_t t = len; t < kv; ++t) s[t] = S::store(0.0f);
    }
  });
}

void check_rows(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), name, ": CPU tensors only");
  TORCH_CHECK(x.dim() == 2, name, ": expected [rows, features], got ", x.dim(), " dims");
  TORCH_CHECK(x.stride(1) == 1, name, ": the feature dimension must be contiguous");
}

}  // namespace

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, "rms_norm");
  TORCH_CHECK(weight.is_contiguous() && weight.dim() == 1 && weight.size(0) == x.size(1),
              "rms_norm: weight must be contiguous [features]");
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "rms_norm: x and weight dtypes differ");
  auto out = at::empty({x.size(0), x.size(1)}, x.options());
  dispatch(x.scalar_type(), "rms_norm", [&](auto tag) {
    using T = decltype(tag);
    rms_norm_rows<T>(raw<T>(x), x.stride(0), nullptr, 0, raw<T>(weight), nullptr, raw<T>(out),
                     x.size(0), x.size(1), static_cast<float>(eps));
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
  check_rows(x, "add_rms_norm");
  check_rows(residual, "add_rms_norm");
  TORCH_CHECK(x.sizes() == residual.sizes(), "add_rms_norm: x and residual shapes differ");
  TORCH_CHECK(weight.is_contiguous() && weight.dim() == 1 && weight.size(0) == x.size(1),
              "add_rms_norm: weight must be contiguous [features]");
  TORCH_CHECK(x.scalar_type() == residual.scalar_type() &&
                  x.scalar_type() == weight.scalar_type(),
              "add_rms_norm: x, residual and weight dtypes differ");
  auto sum = at::empty({x.size(0), x.size(1)}, x.options());
  auto out = at::empty({x.size(0), x.size(1)}, x.options());
  dispatch(x.scalar_type(), "add_rms_norm", [&](auto tag) {
    using T = decltype(tag);
    rms_norm_rows<T>(raw<T>(x), x.stride(0), raw<T>(residual), residual.stride(0),
                     raw<T>(weight), raw<T>(sum), raw<T>(out), x.size(0), x.size(1),
                     static_cast<float>(eps));
  });
  return {sum, out};
}

at::Tensor silu_mul(const at::Tensor& gate_up) {
  check_rows(gate_up, "silu_mul");
  TORCH_CHECK(gate_up.size(1) % 2 == 0, "silu_mul: expected [rows, 2 * intermediate]");
  const int64_t inter = gate_up.size(1) / 2;
  auto out = at::empty({gate_up.size(0), inter}, gate_up.options());
  dispatch(gate_up.scalar_type(), "silu_mul", [&](auto tag) {
    using T = decltype(tag);
    silu_mul_rows<T>(raw<T>(gate_up), gate_up.stride(0), raw<T>(out), gate_up.size(0), inter);
  });
  return out;
}

at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.device().is_cpu(), "rope: CPU tensors only");
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1, "rope: x must be [tokens, heads, head_dim] "
              "with a contiguous last dimension");
  const int64_t T = x.size(0), N = x.size(1), D = x.size(2);
  TORCH_CHECK(D % 2 == 0, "rope: head_dim must be even");
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.dim() == 2 && sin.dim() == 2 &&
                  cos.size(0) == T && cos.size(1) == D && sin.sizes() == cos.sizes(),
              "rope: cos and sin must be contiguous [tokens, head_dim]");
  TORCH_CHECK(cos.scalar_type() == x.scalar_type() && sin.scalar_type() == x.scalar_type(),
              "rope: x, cos and sin dtypes differ");
  auto out = at::empty({T, N, D}, x.options());
  dispatch(x.scalar_type(), "rope", [&](auto tag) {
    using Tp = decltype(tag);
    rope_rows<Tp>(raw<Tp>(x), x.stride(0), x.stride(1), raw<Tp>(cos), raw<Tp>(sin),
                  raw<Tp>(out), T, N, D);
  });
  return out;
}

void prefix_softmax_(at::Tensor& scores, const at::Tensor& row_lens, int64_t row0, double scale) {
  TORCH_CHECK(scores.device().is_cpu() && scores.dim() == 5 && scores.is_contiguous(),
              "prefix_softmax_: scores must be contiguous [B, KVH, rows, G, keys] on the CPU");
  TORCH_CHECK(row_lens.scalar_type() == at::kInt && row_lens.dim() == 2 &&
                  row_lens.is_contiguous() && row_lens.size(0) == scores.size(0),
              "prefix_softmax_: row_lens must be contiguous int32 [B, max_rows]");
  TORCH_CHECK(row0 >= 0 && row0 + scores.size(2) <= row_lens.size(1),
              "prefix_softmax_: rows row0..row0+rows must lie within row_lens");
  dispatch(scores.scalar_type(), "prefix_softmax_", [&](auto tag) {
    using Tp = decltype(tag);
    prefix_softmax_rows<Tp>(raw<Tp>(scores), row_lens.data_ptr<int32_t>(), row_lens.size(1), row0,
                            scores.size(0), scores.size(1), scores.size(2), scores.size(3),
                            scores.size(4), static_cast<float>(scale));
  });
}

}  // namespace nova_cpu
