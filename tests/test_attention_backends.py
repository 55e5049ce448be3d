"""Attention backends over the paged KV cache: the Triton kernel (run by Triton's CPU
interpreter here, natively on a GPU) and flex_attention, each against the SDPA reference path;
the backend selection rule; the decoder with a swapped backend against the SDPA decoder."""

from __future__ import annotations

import os

import torch

# Without a GPU the Triton kernel runs in Triton's interpreter on CPU tensors (numpy). This must
# precede the first import of the kernel module (its jit decorator reads it). With a GPU the same
# tests run the compiled kernel on CUDA tensors.
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import itertools  # noqa: E402
import json  # noqa: E402
import warnings  # noqa: E402

import pytest  # noqa: E402

from nova.models.loader import load_model  # noqa: E402
from nova.runtime import attention  # noqa: E402
from nova.runtime.attention import (  # noqa: E402
    choose_attention,
    gpu_slug,
    load_selection_table,
    make_attention_backend,
)
from nova.runtime.attention_backend import (  # noqa: E402
    AttentionBackend,
    AttentionMetadata,
    PhaseSplitAttention,
)
from nova.runtime.attention_cpu import (  # noqa: E402
    PREFILL_PATHS,
    CpuPagedAttention,
    causal_query_index,
    key_slots_and_mask,
    prefill_row_lens,
    query_tiles,
    sub_batch,
)
from nova.runtime.attention_flex import FlexPagedAttention  # noqa: E402
from nova.runtime.attention_sdpa import SdpaPagedAttention, causal_gather_views  # noqa: E402
from nova.runtime.attention_triton import TritonPagedAttention  # noqa: E402
from nova.runtime.forward_batch import SeqInput, build_forward_batch  # noqa: E402
from nova.runtime.kv_cache import PagedKVCache  # noqa: E402
from nova.runtime.runner import CacheConfig, ModelRunner  # noqa: E402

warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")
# GPU-only tests: marked gpu, and skipped here where there is no CUDA device.
gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

# (new tokens, cached tokens) per sequence.
CASES = {
    "decode": [(1, 0), (1, 6), (1, 17), (1, 3)],
    "varlen_prefill": [(5, 0), (1, 0), (19, 0), (8, 0)],
    "chunked_prefill": [(7, 9), (3, 4), (12, 0)],
    "mixed": [(1, 30), (6, 5), (1, 0), (20, 0)],
    # a fused chunked-prefill step: decodes beside one long chunk of a cached prompt
    "fused_step": [(1, 30), (1, 12), (1, 0), (1, 7), (33, 9), (1, 3)],
}


def make_case(
    case,
    num_heads,
    num_kv_heads,
    head_dim,
    block_size,
    dtype=torch.float32,
    device="cpu",
    num_blocks=96,
    seed=0,
):
    """A cache with random content at shuffled blocks; q/k/v for the new tokens."""
    gen = torch.Generator().manual_seed(seed)
    cache = PagedKVCache(1, num_blocks, block_size, num_kv_heads, head_dim, dtype, device)
    cache.k[0].copy_(torch.randn(cache.k[0].shape, generator=gen))
    cache.v[0].copy_(torch.randn(cache.v[0].shape, generator=gen))
    perm = torch.randperm(num_blocks, generator=gen).tolist()
    seqs, used = [], 0
    for new, cached in case:
        n = -(-(new + cached) // block_size)
        seqs.append(SeqInput([1] * new, cached, perm[used : used + n]))
        used += n
    batch = build_forward_batch(seqs, block_size, device)
    t = batch.input_ids.shape[0]
    q, k, v = (
        torch.randn(t, h, head_dim, generator=gen).to(device=device, dtype=dtype)
        for h in (num_heads, num_kv_heads, num_kv_heads)
    )
    owned = set(perm[:used])
    # One block no sequence owns is the pad slot's (the runner reserves one the same way).
    cache.pad_slot = perm[-1] * block_size
    owned.add(perm[-1])
    return cache, batch, q, k, v, owned


def clone_cache(cache: PagedKVCache) -> PagedKVCache:
    other = PagedKVCache(
        1,
        cache.num_blocks,
        cache.block_size,
        cache.num_kv_heads,
        cache.head_dim,
        cache.k[0].dtype,
        cache.k[0].device,
    )
    other.k[0].copy_(cache.k[0])
    other.v[0].copy_(cache.v[0])
    return other


def poison_unowned(cache: PagedKVCache, owned: set[int]) -> None:
    """NaN in every block no sequence of the batch owns: any stray read shows in the output."""
    for blk in range(cache.num_blocks):
        if blk not in owned:
            sl = slice(blk * cache.block_size, (blk + 1) * cache.block_size)
            cache.k[0][sl] = float("nan")
            cache.v[0][sl] = float("nan")


def check_against_sdpa(
    backend,
    case,
    num_heads,
    num_kv_heads,
    head_dim,
    block_size,
    atol,
    dtype=torch.float32,
    device="cpu",
    poison=True,
):
    cache, batch, q, k, v, owned = make_case(
        CASES[case], num_heads, num_kv_heads, head_dim, block_size, dtype, device
    )
    scale = head_dim**-0.5
    ref_cache = clone_cache(cache)
    ref = SdpaPagedAttention()(q, k, v, 0, batch.attn_metadata, ref_cache, scale)
    if poison:
        poison_unowned(cache, owned)
    out = backend(q, k, v, 0, backend.build_metadata(batch.paged), cache, scale)
    assert out.shape == ref.shape == (q.shape[0], num_heads * head_dim)
    assert torch.isfinite(out).all(), "the backend read a block outside the block tables"
    torch.testing.assert_close(out.float(), ref.float(), atol=atol, rtol=0)
    # The new K/V were written to their slots exactly as the reference wrote them.
    slots = batch.slot_mapping
    torch.testing.assert_close(cache.k[0][slots], ref_cache.k[0][slots])
    torch.testing.assert_close(cache.v[0][slots], ref_cache.v[0][slots])


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("heads,block_size,head_dim", [((6, 2), 4, 16), ((4, 4), 16, 24)])
def test_triton_kernel_matches_sdpa(case, heads, block_size, head_dim):
    # GQA 3:1 with pages smaller than the kernel's key tile; MHA with head_dim not a power of 2.
    check_against_sdpa(
        TritonPagedAttention(), case, *heads, head_dim, block_size, atol=1e-5, device=DEVICE
    )


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("heads,block_size,head_dim", [((6, 2), 4, 16), ((4, 4), 16, 24)])
def test_cpu_backend_matches_sdpa(case, heads, block_size, head_dim):
    # Poisoned unowned blocks: padding must read only the reserved pad slot.
    check_against_sdpa(CpuPagedAttention(), case, *heads, head_dim, block_size, atol=1e-5)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
def test_cpu_backend_prefill_paths_agree(case, dtype, atol):
    """Every prefill path (the AMX kernel where the CPU has AMX, the causal flash path, the
    tiled one) gives the same outputs, for prompts on cached prefixes, varlen batches and fused
    steps (unowned blocks poisoned)."""
    amx = CpuPagedAttention().amx
    for prefill in PREFILL_PATHS:
        if prefill == "amx" and not amx:
            continue  # (the kernel's reference tiles: tests/test_cpu_prefill_attention.py)
        check_against_sdpa(
            CpuPagedAttention(prefill=prefill), case, 9, 3, 64, 16, atol=atol, dtype=dtype
        )
    with pytest.raises(ValueError, match="prefill must be one of"):
        CpuPagedAttention(prefill="flash")


def test_causal_query_index_puts_each_token_at_its_position():
    _, batch, *_ = make_case(CASES["chunked_prefill"], 6, 2, 16, 4)  # on cached prefixes
    paged = batch.paged
    index = causal_query_index(paged).tolist()
    starts, seq_lens = paged.query_start_loc.tolist(), paged.seq_lens.tolist()
    want = []
    for b, n in enumerate(paged.query_lens().tolist()):
        cached = seq_lens[b] - n
        want += [b * paged.max_seq_len + cached + i for i in range(n)]
    assert index == want and len(index) == starts[-1]
    md = CpuPagedAttention(kernels=False, amx_cpu=True).build_metadata(paged)  # (no AMX kernel)
    assert md.causal_index is not None and md.query_pad_index is None
    no_amx = CpuPagedAttention(kernels=False, amx_cpu=False).build_metadata(paged)
    assert no_amx.causal_index is None and no_amx.query_pad_index is not None
    tiled = CpuPagedAttention(prefill="tiled").build_metadata(paged)
    assert tiled.causal_index is None and tiled.query_pad_index is not None


@pytest.mark.parametrize(
    "case,causal",
    [
        ([(40, 0), (25, 0)], True),  # fresh prompts
        ([(30, 6), (20, 0)], True),  # a short cached prefix
        ([(3, 60), (2, 50)], False),  # short chunks on long prefixes: the tiled path
    ],
)
def test_auto_prefill_path(case, causal):
    _, batch, *_ = make_case(case, 6, 2, 16, 4)
    md = CpuPagedAttention(kernels=False, amx_cpu=True).build_metadata(batch.paged)
    assert (md.causal_index is not None) == causal
    assert (md.query_pad_index is None) == causal
    assert (md.allowed.numel() == 0) == causal  # (the flash kernel masks itself: no mask built)
    # With the AMX kernel a prompt batch is marked for it, and gathers nothing up front; a
    # dtype or head_dim it does not take falls back to the rule above at the first layer.
    backend = CpuPagedAttention()
    if backend.amx:
        md = backend.build_metadata(batch.paged)
        assert md.amx and md.key_slots.numel() == 0 and md.causal_index is None


def test_cpu_backend_attends_a_fused_step_in_two_parts():
    """Decode sequences beside prompt chunks are attended apart (the decodes unpadded), and
    each token's output lands where it was (``test_cpu_backend_matches_sdpa``, fused_step)."""
    _, batch, *_ = make_case(CASES["fused_step"], 6, 2, 16, 4)
    md = CpuPagedAttention().build_metadata(batch.paged)
    assert md.parts is not None
    (dec_idx, dec), (pre_idx, pre) = md.parts
    assert dec.paged.max_query_len == 1 and dec.parts is None and dec.query_pad_index is None
    assert dec_idx.tolist() == [0, 1, 2, 3, 37] and dec.paged.num_seqs == 5
    assert pre.paged.max_query_len == 33 and pre_idx.tolist() == list(range(4, 37))
    assert pre.paged.seq_lens.tolist() == [42]
    torch.testing.assert_close(pre.paged.slot_mapping, batch.paged.slot_mapping[4:37])
    plain = CpuPagedAttention().build_metadata(sub_batch_of(batch.paged, [0]))
    assert plain.parts is None  # a decode-only batch is not split


def sub_batch_of(paged, seqs):
    return sub_batch(paged, seqs, paged.query_lens().tolist())[1]


@pytest.mark.parametrize("case", ["decode", "mixed", "fused_step"])
def test_cpu_backend_bf16_close_to_sdpa(case):
    # bf16 scores are rounded once before the softmax (SDPA's flash kernel keeps them fp32).
    check_against_sdpa(CpuPagedAttention(), case, 9, 3, 64, 16, atol=3e-2, dtype=torch.bfloat16)


# (bf16: an exp a last fp32 bit apart can round a probability, then an output, one bf16 step)
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("case", ["varlen_prefill", "chunked_prefill", "mixed", "fused_step"])
def test_cpu_prefill_softmax_kernel_equals_the_masked_softmax(case, dtype, tol, monkeypatch):
    """The C++ causal softmax over each row's key prefix against the mask add and PyTorch's
    softmax it replaces (``NOVA_CPU_KERNELS=0``), tiles of one row included."""
    cache, batch, q, k, v, _ = make_case(CASES[case], 9, 3, 64, 16, dtype)
    outs = []
    for kernels in ("1", "0"):
        monkeypatch.setenv("NOVA_CPU_KERNELS", kernels)
        for tile_bytes in (2 << 20, 1):
            backend = CpuPagedAttention(score_tile_bytes=tile_bytes, prefill="tiled")
            md = backend.build_metadata(batch.paged)
            outs.append(backend(q, k, v, 0, md, clone_cache(cache), 0.125))
    for out in outs[1:]:
        torch.testing.assert_close(out.float(), outs[0].float(), atol=tol, rtol=tol)


def test_prefill_row_lens_are_the_causal_mask_as_prefix_lengths():
    _, batch, *_ = make_case(CASES["mixed"], 6, 2, 16, 4)
    _, allowed = key_slots_and_mask(batch.paged)
    lens = prefill_row_lens(batch.paged)
    assert lens.dtype == torch.int32 and lens.is_contiguous()
    keys = torch.arange(allowed.shape[-1])
    assert torch.equal(allowed, keys[None, None, :] < lens[:, :, None].long())


def test_cpu_backend_pad_slot_is_a_reserved_block(tiny_dirs):
    runner = ModelRunner(load_model(tiny_dirs["llama"]), CacheConfig(block_size=4, num_blocks=8))
    assert runner.attention.name == "cpu" and runner.attention.needs_pad_slot
    assert runner.block_manager.num_blocks == 8 and runner.kv_cache.num_blocks == 9
    assert runner.kv_cache.pad_slot == 8 * 4
    sdpa = ModelRunner(
        load_model(tiny_dirs["llama"]), CacheConfig(block_size=4, num_blocks=8), "sdpa"
    )
    assert sdpa.kv_cache.num_blocks == 8 and sdpa.kv_cache.pad_slot is None


def test_triton_kernel_groups_of_eight_heads():
    check_against_sdpa(TritonPagedAttention(), "mixed", 16, 2, 16, 16, atol=1e-5, device=DEVICE)


@pytest.mark.parametrize("case", ["decode", "chunked_prefill", "mixed"])
def test_flex_matches_sdpa(case):
    # PyTorch's eager flex path is dense over the whole cache (masked, so exact, but it touches
    # every block): no poisoning here; the compiled GPU kernel is checked with it below.
    check_against_sdpa(FlexPagedAttention(), case, 6, 2, 16, 4, atol=1e-5, poison=False)


def test_phase_split_dispatches_on_query_length():
    calls = []

    class Recorder(AttentionBackend[AttentionMetadata]):
        static_shapes = True

        def __init__(self, name):
            self.name = name

        def build_metadata(self, paged):
            return AttentionMetadata(paged)

        def attend(self, q, layer, metadata, kv_cache, scale):
            calls.append(self.name)
            return q

    split = PhaseSplitAttention(Recorder("dec"), Recorder("pre"))
    for case in ("decode", "varlen_prefill", "mixed"):
        cache, batch, q, k, v, _ = make_case(CASES[case], 2, 1, 16, 4)
        split(q, k, v, 0, split.build_metadata(batch.paged), cache, 1.0)
    assert calls == ["dec", "pre", "pre"]
    assert split.name == "pre+dec" and split.static_shapes


def test_choose_attention_rule():
    assert choose_attention("flex", "cuda") == choose_attention("flex", "cpu")
    assert choose_attention("flex", "cuda").decode == "flex"
    auto_cpu = choose_attention("auto", "cpu", {"decode": "flex", "prefill": "flex"})
    assert (auto_cpu.decode, auto_cpu.prefill) == ("cpu", "cpu")
    none = choose_attention("auto", "cuda", None)
    assert (none.decode, none.prefill) == ("triton", "triton")
    table = {"decode": "flex", "prefill": "sdpa"}
    measured = choose_attention("auto", "cuda", table, cuda_graphs=False)
    assert (measured.decode, measured.prefill) == ("flex", "sdpa")
    graphs = choose_attention("auto", "cuda", table, cuda_graphs=True)
    assert (graphs.decode, graphs.prefill) == ("triton", "sdpa")
    with pytest.raises(ValueError, match="unknown attention backend"):
        choose_attention("xformers", "cuda")


def test_selection_table_file(tmp_path, monkeypatch):
    assert gpu_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    path = tmp_path / "attention.json"
    monkeypatch.setenv("NOVA_ATTENTION_TABLE", str(path))
    assert load_selection_table("NVIDIA H100 80GB HBM3") is None
    path.write_text(json.dumps({"decode": "triton", "prefill": "flex"}))
    assert load_selection_table("any")["prefill"] == "flex"
    path.write_text(json.dumps({"decode": "cudnn", "prefill": "flex"}))
    with pytest.raises(ValueError, match="decode"):
        load_selection_table("any")


def test_triton_on_cpu_without_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="needs a CUDA device.*TRITON_INTERPRET"):
        make_attention_backend("triton", "cpu")
    assert isinstance(make_attention_backend("auto", "cpu"), CpuPagedAttention)


@pytest.mark.parametrize("backend", ["cpu", "triton", "flex"])
def test_decoder_with_backend_matches_sdpa_decoder(tiny_dirs, backend):
    """Batched varlen prefill, then two decode steps: the decoder's logits with the backend
    equal those with SDPA (tiny Llama, GQA 4:2, block size 4)."""
    results = {}
    for name in ("sdpa", backend):
        runner = ModelRunner(
            load_model(tiny_dirs["llama"], device=DEVICE),
            CacheConfig(block_size=4, num_blocks=64),
            attention_backend=name,
        )
        assert runner.attention.name == name
        bm = runner.block_manager
        prompts = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], list(range(20, 33))]
        seqs = [SeqInput(p, 0, bm.allocate(str(i), len(p))) for i, p in enumerate(prompts)]
        steps = [runner.forward(seqs)]
        hist = [list(p) for p in prompts]
        for step in range(2):
            seqs = []
            for i, h in enumerate(hist):
                h.append(40 + i + step)
                bm.grow(str(i), len(h))
                seqs.append(SeqInput([h[-1]], len(h) - 1, bm.block_table(str(i))))
            steps.append(runner.forward(seqs))
        results[name] = torch.stack(steps).cpu()
    torch.testing.assert_close(results[backend], results["sdpa"], atol=1e-4, rtol=0)


# -- on a GPU ----------------------------------------------------------------------------------
@gpu
@needs_cuda
@pytest.mark.parametrize("backend_cls", [TritonPagedAttention, FlexPagedAttention])
@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("case", list(CASES))
def test_gpu_backends_match_sdpa(backend_cls, dtype, atol, case):
    # A 7B-like head layout: 32 query heads over 8 KV heads, head_dim 128, pages of 16.
    backend = backend_cls(use_compile=True) if backend_cls is FlexPagedAttention else backend_cls()
    check_against_sdpa(backend, case, 32, 8, 128, 16, atol=atol, dtype=dtype, device="cuda")


@gpu
@needs_cuda
def test_gpu_decoder_triton_matches_sdpa(tiny_dirs):
    out = {}
    for name in ("sdpa", "triton"):
        runner = ModelRunner(
            load_model(tiny_dirs["qwen2"], device="cuda"),
            CacheConfig(block_size=16, num_blocks=64),
            attention_backend=name,
        )
        prompt = list(range(30, 70))
        table = runner.block_manager.allocate("a", len(prompt) + 1)
        first = runner.forward([SeqInput(prompt, 0, table)])
        second = runner.forward([SeqInput([7], len(prompt), table)])
        out[name] = torch.cat([first, second])
    torch.testing.assert_close(out["triton"], out["sdpa"], atol=1e-4, rtol=0)


def test_batches_for_in_place_backends_carry_no_gather_views():
    """Backends that read the cache in place build metadata without the SDPA gather views (no
    O(B * max_kv) work per forward); everything else is the same, and SDPA refuses a batch
    whose metadata it did not build."""
    seqs = [SeqInput([5, 6, 7], 0, [3, 1]), SeqInput([9], 6, [0, 2]), SeqInput([4, 4], 3, [5, 6])]
    full = build_forward_batch(seqs, 4, "cpu")
    lean = build_forward_batch(seqs, 4, "cpu", attention=TritonPagedAttention())
    flex = build_forward_batch(seqs, 4, "cpu", attention=FlexPagedAttention())
    for meta in (lean.attn_metadata, flex.attn_metadata):
        assert not hasattr(meta, "kv_gather_index") and not hasattr(meta, "attn_mask")
    assert full.attn_metadata.kv_gather_index is not None
    assert full.attn_metadata.attn_mask is not None
    for name in ("input_ids", "positions", "slot_mapping", "last_token_index"):
        assert torch.equal(getattr(full, name), getattr(lean, name)), name
    for name in ("block_tables", "seq_lens", "query_start_loc"):
        assert torch.equal(getattr(full.paged, name), getattr(lean.paged, name)), name
    assert torch.equal(full.attn_metadata.query_pad_index, flex.attn_metadata.query_pad_index)
    # The new tokens' slots: block_table[p // 4] * 4 + p % 4 at positions cached..context-1.
    assert full.slot_mapping.tolist() == [12, 13, 14, 10, 23, 24]
    q = torch.zeros(6, 2, 4)
    kv = PagedKVCache(1, 8, 4, 2, 4, torch.float32, "cpu")
    with pytest.raises(ValueError, match="sdpa attention backend reads SdpaMetadata"):
        SdpaPagedAttention()(q, q, q, 0, lean.attn_metadata, kv, 1.0)
    assert TritonPagedAttention.static_shapes and not SdpaPagedAttention.static_shapes


def _reference_gather_views(seqs, block_size):
    """The SDPA views built one sequence at a time: gather slots of each context (0 past it),
    and the causal mask with padded query rows attending key 0 only."""
    max_q = max(s.num_new_tokens for s in seqs)
    max_kv = max(s.context_len for s in seqs)
    gather = torch.zeros(len(seqs), max_kv, dtype=torch.long)
    mask = torch.zeros(len(seqs), 1, max_q, max_kv, dtype=torch.bool)
    for b, s in enumerate(seqs):
        for p in range(s.context_len):
            gather[b, p] = s.block_table[p // block_size] * block_size + p % block_size
        for i in range(max_q):
            if i < s.num_new_tokens:
                mask[b, 0, i, : s.num_cached_tokens + i + 1] = True
            else:
                mask[b, 0, i, 0] = True
    return gather, mask


def test_sdpa_gather_views_equal_a_per_sequence_construction():
    gen = torch.Generator().manual_seed(3)
    for block_size in (1, 4, 16):
        for _ in range(20):
            n = int(torch.randint(1, 6, (1,), generator=gen))
            perm = torch.randperm(64, generator=gen).tolist()
            seqs, used = [], 0
            for _ in range(n):
                new = int(torch.randint(1, 9, (1,), generator=gen))
                cached = int(torch.randint(0, 20, (1,), generator=gen))
                blocks = -(-(new + cached) // block_size) + int(
                    torch.randint(0, 2, (1,), generator=gen)
                )
                seqs.append(SeqInput([1] * new, cached, perm[used : used + blocks]))
                used += blocks
            if used > 64:
                continue
            paged = build_forward_batch(seqs, block_size, "cpu").paged
            gather, mask = causal_gather_views(paged)
            want_gather, want_mask = _reference_gather_views(seqs, block_size)
            assert torch.equal(gather, want_gather)
            assert torch.equal(mask, want_mask)


def test_selection_tables_are_package_data(tmp_path, monkeypatch):
    """``auto`` reads this GPU's table from the installed package (not a source checkout's
    benchmarks/results); $NOVA_ATTENTION_TABLE overrides it."""
    import tomllib
    from pathlib import Path

    assert attention.TABLES_DIR.is_dir()
    assert Path(str(attention.TABLES_DIR)).parent == Path(attention.__file__).parent
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    package_data = pyproject["tool"]["setuptools"]["package-data"]["nova.runtime"]
    assert "attention_tables/*.json" in package_data
    monkeypatch.delenv("NOVA_ATTENTION_TABLE", raising=False)
    monkeypatch.setattr(attention, "TABLES_DIR", tmp_path)
    assert load_selection_table("NVIDIA H200") is None
    (tmp_path / "nvidia-h200.json").write_text(json.dumps({"decode": "triton", "prefill": "flex"}))
    assert load_selection_table("NVIDIA H200") == {"decode": "triton", "prefill": "flex"}
    override = tmp_path / "mine.json"
    override.write_text(json.dumps({"decode": "sdpa", "prefill": "sdpa"}))
    monkeypatch.setenv("NOVA_ATTENTION_TABLE", str(override))
    assert load_selection_table("NVIDIA H200")["decode"] == "sdpa"


@pytest.mark.parametrize("case", ["varlen_prefill", "chunked_prefill", "mixed"])
@pytest.mark.parametrize("tile_bytes", [1, 700, 4096])
def test_cpu_backend_tiled_prefill_matches_sdpa(case, tile_bytes):
    # Tiles of one row up to several: every tile reads only the keys its rows may see, and
    # padding still reads the pad slot only (unowned blocks are poisoned).
    backend = CpuPagedAttention(score_tile_bytes=tile_bytes, prefill="tiled")
    check_against_sdpa(backend, case, 6, 2, 16, 4, atol=1e-5)


def test_query_tiles_cover_rows_within_budget():
    # (seq_lens, query_lens): a prompt on a cached prefix, a fresh one, and a decode row.
    seq_lens, query_lens = [40, 25, 31], [20, 25, 1]
    heads, budget = 4, 3 * 4 * 4 * 40 * 3  # three rows of the widest keys
    tiles = query_tiles(seq_lens, query_lens, heads, budget)
    assert tiles[0][0] == 0 and tiles[-1][1] == max(query_lens)
    for (_, r1, _), (r0, _, _) in itertools.pairwise(tiles):
        assert r1 == r0  # contiguous, no gaps or overlaps
    for r0, r1, kv_len in tiles:
        assert r1 > r0
        # rows r0..r1 see at most: sequence 0 keys 0..20+r1, sequence 1 keys 0..r1, the decode
        # row keys 0..31 (its padded rows see key 0)
        assert kv_len == max(min(40, 20 + r1), min(25, r1), 31)
        assert len(seq_lens) * heads * 4 * (r1 - r0) * kv_len <= budget or r1 - r0 == 1
    # a budget below one row still makes progress, one row per tile
    assert [r1 - r0 for r0, r1, _ in query_tiles([10], [10], 2, 1)] == [1] * 10
    with pytest.raises(ValueError, match="tile_bytes"):
        query_tiles([10], [10], 2, 0)


def test_query_tiles_skip_keys_past_causality():
    # one 1000-token prompt: the first tile reads far fewer keys than the prompt has
    tiles = query_tiles([1000], [1000], 9, 2 << 20)
    assert len(tiles) > 1
    assert tiles[0][2] < 1000 and tiles[-1][2] == 1000
    assert [kv for _, _, kv in tiles] == sorted(kv for _, _, kv in tiles)
