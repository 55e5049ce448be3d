"""Nova's fused elementwise CPU kernels (``csrc/cpu_elementwise.cpp``) against the decoder's eager
PyTorch ops they replace: bit-equal in bf16 where the eager ops round (they round at the same
points), equal to float precision in fp32, for strided inputs and odd sizes; the decoder's
forward with them on matches it with them off; tensors they do not take run the eager ops."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nova.models.llama import RMSNorm, apply_rope
from nova.runtime.cpu_fused import kernels_for

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def eager_norm(x, weight, eps):
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def eager_rope(x, cos, sin):
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def assert_matches(got, want):
    """Bit-equal in bf16; within a unit in the last place elsewhere (fp32 summation order and
    fused multiply-adds; fp16 rounds the normalized value where a last-bit difference shows)."""
    assert got.dtype == want.dtype and got.shape == want.shape
    if got.dtype == torch.bfloat16:
        assert torch.equal(got, want)
        return
    tol = 1e-6 if got.dtype == torch.float32 else 1e-3
    torch.testing.assert_close(got, want, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,hidden", [(1, 64), (7, 576), (300, 96), (0, 64), (3, 40)])
def test_rms_norm_and_the_fused_residual_add(kernels, dtype, rows, hidden):
    g = torch.Generator().manual_seed(rows * 1000 + hidden)
    # a strided input: rows of a wider tensor (the kernel takes any row stride)
    wide = (torch.randn(rows, hidden + 16, generator=g) * 3).to(dtype)
    x = wide[:, 8 : 8 + hidden]
    residual = torch.randn(rows, hidden, generator=g).to(dtype)
    weight = (torch.rand(hidden, generator=g) + 0.5).to(dtype)
    assert_matches(kernels.rms_norm(x, weight, 1e-5), eager_norm(x, weight, 1e-5))
    total, normed = kernels.add_rms_norm(x, residual, weight, 1e-6)
    assert torch.equal(total, residual + x)  # one rounding, as the eager add
    assert_matches(normed, eager_norm(residual + x, weight, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,inter", [(1, 32), (5, 1536), (129, 100)])
def test_silu_mul(kernels, dtype, rows, inter):
    g = torch.Generator().manual_seed(rows + inter)
    gate_up = (torch.randn(rows, 2 * inter, generator=g) * 4).to(dtype)
    gate_up[0, :4] = torch.tensor([90.0, -90.0, 0.0, -20.0]).to(dtype)  # exp's clamped ends
    want = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
    assert_matches(kernels.silu_mul(gate_up), want)


def test_nan_stays_nan(kernels):
    x = torch.tensor([[float("nan"), 1.0, -2.0, 0.5]], dtype=torch.bfloat16)
    assert torch.isnan(kernels.silu_mul(x)[0, 0])
    assert torch.isnan(kernels.rms_norm(x, torch.ones(4, dtype=torch.bfloat16), 1e-6)).all()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "tokens,heads,kv_heads,head_dim", [(1, 4, 2, 64), (37, 9, 3, 64), (5, 2, 1, 128), (4, 3, 1, 40)]
)
def test_rope_on_the_qkv_view(kernels, dtype, tokens, heads, kv_heads, head_dim):
    g = torch.Generator().manual_seed(tokens * heads)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype)
    qk = qkv[:, : (heads + kv_heads) * head_dim].view(tokens, heads + kv_heads, head_dim)
    angles = torch.rand(tokens, head_dim // 2, generator=g) * 50
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    got = kernels.rope(qk, cos, sin)
    assert got.is_contiguous()
    assert_matches(got, eager_rope(qk, cos, sin))


def test_bad_shapes_are_errors_naming_the_problem(kernels):
    x = torch.randn(4, 8)
    with pytest.raises(RuntimeError, match="weight must be contiguous"):
        kernels.rms_norm(x, torch.ones(7), 1e-6)
    with pytest.raises(RuntimeError, match="dtypes differ"):
        kernels.rms_norm(x, torch.ones(8, dtype=torch.bfloat16), 1e-6)
    with pytest.raises(RuntimeError, match=r"2 \* intermediate"):
        kernels.silu_mul(torch.randn(3, 5))
    with pytest.raises(RuntimeError, match="cos and sin"):
        kernels.rope(torch.randn(2, 3, 8), torch.randn(2, 6), torch.randn(2, 6))
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        kernels.silu_mul(torch.zeros(2, 4, dtype=torch.float64))
    scores = torch.randn(2, 1, 3, 1, 5)
    with pytest.raises(RuntimeError, match="row_lens must be contiguous int32"):
        kernels.prefix_softmax_(scores, torch.ones(2, 3), 0, 1.0)
    with pytest.raises(RuntimeError, match="must lie within row_lens"):
        kernels.prefix_softmax_(scores, torch.ones(2, 3, dtype=torch.int32), 1, 1.0)


def test_which_tensors_take_the_kernels(kernels, monkeypatch):
    assert kernels_for(torch.zeros(2, 2)) is kernels
    assert kernels_for(torch.zeros(2, 2, dtype=torch.float64)) is None
    assert kernels_for(torch.zeros(2, 2, device="meta")) is None
    assert kernels_for(torch.zeros(2, 2, requires_grad=True)) is None  # autograd: eager
    with torch.no_grad():
        assert kernels_for(torch.zeros(2, 2, requires_grad=True)) is kernels
    monkeypatch.setenv("NOVA_CPU_KERNELS", "0")
    assert kernels_for(torch.zeros(2, 2)) is None


def test_the_modules_route_through_the_kernels(kernels, monkeypatch):
    norm = RMSNorm(16, 1e-6).to(torch.bfloat16)
    x = torch.randn(3, 16).to(torch.bfloat16)
    calls = []
    real = kernels.rms_norm

    class Spy:
        def __getattr__(self, name):
            return getattr(kernels, name)

        def rms_norm(self, *args):
            calls.append("rms_norm")
            return real(*args)

    monkeypatch.setattr("nova.models.llama.kernels_for", lambda t: Spy())
    with torch.inference_mode():
        out = norm(x)
    assert calls == ["rms_norm"] and torch.equal(out, eager_norm(x, norm.weight, 1e-6))
    # a weight of another dtype than the input (promotion) stays on the eager path
    monkeypatch.setattr("nova.models.llama.kernels_for", lambda t: pytest.fail("kernel called"))
    wide = RMSNorm(16, 1e-6)
    assert wide(x).dtype == torch.float32
    cos = torch.ones(3, 16, dtype=torch.bfloat16)
    assert apply_rope(torch.randn(3, 2, 16), cos, cos).dtype == torch.float32


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_the_decoder_with_the_kernels_equals_it_without_them_in_bf16(
    tiny_dirs, kind, monkeypatch, kernels
):
    """A whole prefill (norms, rope, SwiGLU and the fused residual adds of every layer) in bf16:
    the kernels round where the eager ops round, so the logits are the same bits."""
    from nova.models.loader import load_model
    from nova.runtime.forward_batch import SeqInput, build_forward_batch
    from nova.runtime.runner import CacheConfig, ModelRunner

    loaded = load_model(tiny_dirs[kind], dtype=torch.bfloat16)
    runner = ModelRunner(loaded, CacheConfig(block_size=16, num_blocks=64))
    prompts = [[5, 6, 7, 8, 9, 10, 11], list(range(20, 59))]
    seqs = [
        SeqInput(p, 0, runner.block_manager.allocate(str(i), len(p))) for i, p in enumerate(prompts)
    ]
    batch = build_forward_batch(seqs, 16, "cpu", runner.attention)

    def logits():
        with torch.inference_mode():
            hidden = loaded.model.forward(batch, runner.kv_cache)
            return loaded.model.decoder.compute_logits(hidden)

    fused = logits()
    monkeypatch.setenv("NOVA_CPU_KERNELS", "0")
    assert kernels_for(torch.zeros(1, dtype=torch.bfloat16)) is None
    assert torch.equal(fused, logits())
