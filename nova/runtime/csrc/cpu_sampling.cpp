// Greedy sampling on the CPU: the index of each row's largest logit, rows in parallel.
//
// Why (docs/cpu.md, "Greedy argmax"): PyTorch's argmax over a [64, 49152] logits tensor took
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

#include <cstdint>
#include <limits>

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

}  // namespace

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
