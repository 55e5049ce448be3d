// Writing a forward's new keys and values into the paged KV cache on the CPU: each token's
// row (all KV heads, contiguous) copied to its slot, keys and values in one pass, tokens in
// parallel.
//
// Why (docs/cpu.md, "KV cache writes"): index_copy_ walks the rows through a TensorIterator,
// element group by element group: in a 2,028-token bf16 prefill of the peer model its 60
// calls (K and V of 30 layers) took about 200 us each for 780 KB, a few GB/s, where a row
// copy is one memcpy of 384 bytes.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>

namespace nova_cpu {

namespace {

void check_rows(const at::Tensor& src, const at::Tensor& cache, const char* what) {
  TORCH_CHECK(src.device().is_cpu() && cache.device().is_cpu(), "kv_write: CPU tensors only");
  TORCH_CHECK(src.dim() == 3 && cache.dim() == 3, "kv_write: ", what,
              " and its cache must be [tokens or slots, kv_heads, head_dim]");
  TORCH_CHECK(src.size(1) == cache.size(1) && src.size(2) == cache.size(2), "kv_write: ", what,
              " has ", src.size(1), " x ", src.size(2), " per token, the cache ", cache.size(1),
              " x ", cache.size(2));
  TORCH_CHECK(src.scalar_type() == cache.scalar_type(), "kv_write: ", what,
              " and its cache dtypes differ");
  TORCH_CHECK(cache.is_contiguous(), "kv_write: the cache must be contiguous");
  TORCH_CHECK(src.stride(2) == 1 && src.stride(1) == src.size(2), "kv_write: each token's ",
              what, " row (every KV head) must be contiguous");
}

}  // namespace

void kv_write(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slots,
              const at::Tensor& k, const at::Tensor& v) {
  check_rows(k, k_cache, "k");
  check_rows(v, v_cache, "v");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && slots.is_contiguous(),
              "kv_write: slots must be contiguous int64 [tokens]");
  const int64_t tokens = slots.size(0);
  TORCH_CHECK(k.size(0) == tokens && v.size(0) == tokens, "kv_write: ", tokens, " slots for ",
              k.size(0), " keys and ", v.size(0), " values");
  const int64_t num_slots = k_cache.size(0);
  TORCH_CHECK(v_cache.size(0) == num_slots, "kv_write: the K and V caches differ in slots");
  const int64_t* s = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < tokens; ++t)
    TORCH_CHECK(s[t] >= 0 && s[t] < num_slots, "kv_write: slot ", s[t], " of token ", t,
                " is outside the cache's ", num_slots, " slots");
  const int64_t row_bytes = k.size(1) * k.size(2) * static_cast<int64_t>(k.element_size());
  const char* kp = static_cast<const char*>(k.data_ptr());
  const char* vp = static_cast<const char*>(v.data_ptr());
  char* kc = static_cast<char*>(k_cache.data_ptr());
  char* vc = static_cast<char*>(v_cache.data_ptr());
  const int64_t k_stride = k.stride(0) * static_cast<int64_t>(k.element_size());
  const int64_t v_stride = v.stride(0) * static_cast<int64_t>(v.element_size());
  // (a task copies at least ~64 KB: below that, waking a thread costs more than the copy)
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, 2 * row_bytes));
  at::parallel_for(0, tokens, grain, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      std::memcpy(kc + s[t] * row_bytes, kp + t * k_stride, row_bytes);
      std::memcpy(vc + s[t] * row_bytes, vp + t * v_stride, row_bytes);
    }
  });
}

}  // namespace nova_cpu
