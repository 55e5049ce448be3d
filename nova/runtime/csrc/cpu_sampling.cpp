// Sampling on the CPU, rows in parallel: greedy (the index of each row's largest logit) and
// plain temperature sampling (inverse CDF of softmax(logits / T) at one uniform per row).
//
// Why (docs/cpu.md, "Sampling"), greedy: PyTorch's argmax over a [64, 49152] logits tensor took
// about 4 ms of a 64-sequence decode step of the peer model (one pass that compares value and
// index per element, a vectorized reduction it does not have for bf16), and the fp32 copy of
// bf16 logits it needed was one more write and read. Here each row is read in three
// vectorized passes that stay in the core's cache: its max, whether it holds a NaN, and the
// first position of the max.
//
// Semantics are torch.argmax's: the first index of the largest value; a NaN counts as larger
// than every number (the first NaN wins); a row of -inf gives 0.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu_math.h"

namespace nova_cpu {
namespace {

// Whether raw element x is a NaN (bf16 by its bits: an integer test keeps the loop vectorized).
template <typename T>
inline bool is_nan_raw(raw_t<T> x) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    return (x & 0x7FFFu) > 0x7F80u;
  } else {
    const float f = Storage<T>::load(x);
    return f != f;
  }
}

template <typename T>
int64_t row_argmax(const raw_t<T>* x, int64_t n) {
  using S = Storage<T>;
  float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
  for (int64_t i = 0; i < n; ++i) {
    const float v = S::load(x[i]);
    m = m > v ? m : v;
  }
  int nan = 0;
#pragma omp simd reduction(| : nan)
  for (int64_t i = 0; i < n; ++i) nan |= is_nan_raw<T>(x[i]) ? 1 : 0;
  // the first position of the max (of a NaN, if any), a chunk at a time: a vectorized test of
  // the chunk, then a scan of the chunk that holds it
  constexpr int64_t kChunk = 256;
  for (int64_t c = 0; c < n; c += kChunk) {
    const int64_t e = std::min(n, c + kChunk);
    int hit = 0;
#pragma omp simd reduction(| : hit)
    for (int64_t i = c; i < e; ++i)
      hit |= (nan ? is_nan_raw<T>(x[i]) : S::load(x[i]) == m) ? 1 : 0;
    if (!hit) continue;
    for (int64_t i = c; i < e; ++i)
      if (nan ? is_nan_raw<T>(x[i]) : S::load(x[i]) == m) return i;
  }
  return 0;  // (n == 0; torch refuses that before it gets here)
}

// One row of temperature sampling: y = x / T with NaN -> -inf and +inf -> the largest float
// (what the sampler's ``_finite`` does), e = exp(y - max y) (0 below e^-87), and the first index
// whose running sum of e exceeds u * sum(e) (``searchsorted(..., right=True)`` on the CDF);
// if rounding leaves none, the last index with e > 0. The sums run a chunk at a time (a
// vectorized sum per chunk, the chunks in order), and the scan walks the same chunks, so the
// chunk holding the target is found without a serial pass over the row.
template <typename T>
int64_t row_sample(const raw_t<T>* x, int64_t n, float temperature, float u, float* e) {
  using S = Storage<T>;
  constexpr float kInf = std::numeric_limits<float>::infinity();
  constexpr float kMax = std::numeric_limits<float>::max();
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float y = S::load(x[i]) / temperature;
    e[i] = y != y ? -kInf : (y == kInf ? kMax : y);
  }
  const float m = max_of(e, n);
  if (m == -kInf) return 0;  // (every logit -inf or NaN: nothing to draw from)
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    // (a token more than e^87 times less likely than the top one gets exactly 0, not
    // exp_clamped's floor: it can never be drawn, as with a float32 softmax up to denormals)
    const float d = e[i] - m;
    e[i] = d < -87.0f ? 0.0f : exp_clamped(d);
  }
  constexpr int64_t kChunk = 256;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<float> sums(chunks);
  float total = 0.0f;
  for (int64_t c = 0; c < chunks; ++c) {
    float sum = 0.0f;
    const int64_t end = std::min(n, (c + 1) * kChunk);
#pragma omp simd reduction(+ : sum)
    for (int64_t i = c * kChunk; i < end; ++i) sum += e[i];
    sums[c] = sum;
    total += sum;
  }
  const float target = u * total;
  float base = 0.0f;
  for (int64_t c = 0; c < chunks; ++c) {
    if (base + sums[c] > target) {
      float running = base;
      const int64_t end = std::min(n, (c + 1) * kChunk);
      for (int64_t i = c * kChunk; i < end; ++i) {
        running += e[i];
        if (running > target) return i;
      }
    }
    base += sums[c];
  }
  for (int64_t i = n - 1; i > 0; --i)
    if (e[i] > 0.0f) return i;
  return 0;
}

}  // namespace

at::Tensor sample_temperature(const at::Tensor& logits, const at::Tensor& temperatures,
                              const at::Tensor& uniforms) {
  TORCH_CHECK(logits.device().is_cpu(), "sample_temperature: CPU tensors only");
  TORCH_CHECK(logits.dim() == 2 && logits.size(1) > 0 && logits.stride(1) == 1,
              "sample_temperature: logits must be [rows, vocab] with a contiguous vocabulary");
  const int64_t rows = logits.size(0), n = logits.size(1), stride = logits.stride(0);
  for (const auto* t : {&temperatures, &uniforms})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->dim() == 1 && t->size(0) == rows &&
                    t->is_contiguous(),
                "sample_temperature: temperatures and uniforms must be float32 [rows]");
  const float* temp = temperatures.data_ptr<float>();
  const float* u = uniforms.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK(temp[r] > 0.0f, "sample_temperature: temperature ", temp[r], " of row ", r,
                " is not positive");
    TORCH_CHECK(u[r] >= 0.0f && u[r] < 1.0f, "sample_temperature: uniform ", u[r], " of row ",
                r, " is outside [0, 1)");
  }
  auto out = at::empty({rows}, logits.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  dispatch(logits.scalar_type(), "sample_temperature", [&](auto tag) {
    using T = decltype(tag);
    const raw_t<T>* x = raw<T>(logits);
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> e(n);
      for (int64_t r = begin; r < end; ++r)
        o[r] = row_sample<T>(x + r * stride, n, temp[r], u[r], e.data());
    });
  });
  return out;
}

at::Tensor greedy_argmax(const at::Tensor& logits) {
  TORCH_CHECK(logits.device().is_cpu(), "greedy_argmax: CPU tensors only");
  TORCH_CHECK(logits.dim() == 2, "greedy_argmax: expected [rows, vocab], got ", logits.dim(),
              " dims");
  TORCH_CHECK(logits.size(1) > 0, "greedy_argmax: an empty vocabulary");
  TORCH_CHECK(logits.stride(1) == 1, "greedy_argmax: the vocabulary dimension must be contiguous");
  const int64_t rows = logits.size(0), n = logits.size(1), stride = logits.stride(0);
  auto out = at::empty({rows}, logits.options().dtype(at::kLong));
  int64_t* o = out.data_ptr<int64_t>();
  dispatch(logits.scalar_type(), "greedy_argmax", [&](auto tag) {
    using T = decltype(tag);
    const raw_t<T>* x = raw<T>(logits);
    at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) o[r] = row_argmax<T>(x + r * stride, n);
    });
  });
  return out;
}

}  // namespace nova_cpu
