// The Python module of Nova's CPU kernels (nova/runtime/cpu_kernels.py builds it): one binding
// per kernel; each releases the GIL while it runs, as PyTorch's own ops do.
#include <torch/extension.h>

#include <tuple>

namespace nova_cpu {
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, const at::Tensor& block_tables,
                            const at::Tensor& seq_lens, int64_t block_size, double scale);
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps);
at::Tensor silu_mul(const at::Tensor& gate_up);
at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin);
void prefix_softmax_(at::Tensor& scores, const at::Tensor& row_lens, int64_t row0, double scale);
at::Tensor greedy_argmax(const at::Tensor& logits);
at::Tensor sample_temperature(const at::Tensor& logits, const at::Tensor& temperatures,
                              const at::Tensor& uniforms);
void kv_write(at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slots,
              const at::Tensor& k, const at::Tensor& v);
bool prefill_attention_amx();
at::Tensor prefill_attention(const at::Tensor& q, const at::Tensor& k_cache,
                             const at::Tensor& v_cache, const at::Tensor& block_tables,
                             const at::Tensor& seq_lens, const at::Tensor& query_start,
                             int64_t block_size, double scale, bool reference);
}  // namespace nova_cpu

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using release = py::call_guard<py::gil_scoped_release>;
  m.def("decode_attention", &nova_cpu::decode_attention,
        "paged decode attention reading K/V in place (CPU)", release());
  m.def("rms_norm", &nova_cpu::rms_norm, "RMSNorm of rows in one pass (CPU)", release());
  m.def("add_rms_norm", &nova_cpu::add_rms_norm,
        "(x + residual, RMSNorm(x + residual)) in one pass (CPU)", release());
  m.def("silu_mul", &nova_cpu::silu_mul, "SiLU(gate) * up of [rows, 2 * I] (CPU)", release());
  m.def("rope", &nova_cpu::rope, "rotary embedding of [tokens, heads, head_dim] (CPU)",
        release());
  m.def("prefix_softmax_", &nova_cpu::prefix_softmax_,
        "in place: causal softmax of a prefill tile's scores, each row over its key prefix (CPU)",
        release());
  m.def("greedy_argmax", &nova_cpu::greedy_argmax,
        "index of each row's largest value, as torch.argmax (CPU)", release());
  m.def("sample_temperature", &nova_cpu::sample_temperature,
        "one token per row from softmax(logits / T) at a given uniform (CPU)", release());
  m.def("kv_write", &nova_cpu::kv_write,
        "store each token's keys and values at its slot of the paged cache (CPU)", release());
  m.def("prefill_attention_amx", &nova_cpu::prefill_attention_amx,
        "whether prefill_attention can run on AMX tiles here (built with AMX, granted by the OS)");
  m.def("prefill_attention", &nova_cpu::prefill_attention,
        "causal bf16 prefill attention over the paged cache on AMX tiles, or their plain C++ "
        "reference (CPU)",
        release());
}
