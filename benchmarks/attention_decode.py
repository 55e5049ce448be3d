"""Paged-attention backends and decode step time on a GPU.

Two measurements, both on the GPU this runs on:

1. **Attention backends** (one layer's attention call, K/V read from the paged cache, the
   backend's per-forward metadata built in each call): ``sdpa`` (gather to padded + SDPA),
   ``triton`` (our kernel, blocks read in place) and ``flex`` (compiled ``flex_attention`` with a
   BlockMask over the cache), for prefill shapes (one long prompt, varlen batch, a chunk on top
   of a cached context) and decode shapes (batch x context) of a 7B model's head layout. Median
   of CUDA-event timings. The fastest backend per phase (sum of medians over that phase's
   shapes) is the GPU's selection table, which ``--attention-backend auto`` reads at start-up
   (``nova.runtime.attention``).
2. **Decode step time** of the whole model (dummy weights of the config, bf16) with the Triton
   backend, eager and with CUDA graphs, at several batch sizes, against the memory-bandwidth
   bound ``weight_bytes / HBM bandwidth`` (GPU spec table ``nova.cost.gpus``).

Results: ``benchmarks/results/<gpu-slug>/attention_decode.json`` and ``.md`` (with the GPU's
name) and ``benchmarks/results/<gpu-slug>/attention.json`` (the selection table, as measured).
``--install-table`` also writes the table where ``auto`` reads it, the package data file
``nova/runtime/attention_tables/<gpu-slug>.json`` (commit it with the results).

Usage (GPU):  .venv/bin/python benchmarks/attention_decode.py [--model qwen2.5-7b] [--install-table]
CPU smoke:    TRITON_INTERPRET=1 .venv/bin/python benchmarks/attention_decode.py --smoke --out
/tmp/x
              (tiny shapes and a tiny model; checks the script end to end, measures nothing useful)
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch

from nova.runtime.attention import BACKEND_NAMES, build_backend, gpu_slug
from nova.runtime.attention_sdpa import SdpaPagedAttention
from nova.runtime.forward_batch import SeqInput, build_forward_batch
from nova.runtime.kv_cache import PagedKVCache

RESULTS = Path(__file__).resolve().parent / "results"
# The package data folder in this checkout (nova.runtime.attention.TABLES_DIR once installed).
TABLES = Path(__file__).resolve().parents[1] / "nova" / "runtime" / "attention_tables"
BLOCK_SIZE = 16


# -- shapes ----------------------------------------------------------------------------------
def prefill_shapes(smoke: bool) -> dict[str, list[tuple[int, int]]]:
    """name -> [(new tokens, cached tokens)] per sequence."""
    if smoke:
        return {"prefill_1x40": [(40, 0)], "chunk_24_on_40": [(24, 40)]}
    return {
        "prefill_1x2048": [(2048, 0)],
        "prefill_varlen_4": [(900, 0), (300, 0), (1200, 0), (650, 0)],
        "chunk_512_on_1536": [(512, 1536)],
    }


def decode_shapes(smoke: bool) -> dict[str, list[tuple[int, int]]]:
    if smoke:
        return {"decode_b2_ctx40": [(1, 39)] * 2}
    shapes = {}
    for batch in (1, 8, 32, 64):
        for ctx in (512, 2048):
            shapes[f"decode_b{batch}_ctx{ctx}"] = [(1, ctx - 1)] * batch
    return shapes


# -- timing ----------------------------------------------------------------------------------
def time_ms(fn: Callable[[], object], device: torch.device, iters: int, warmup: int) -> float:
    """Median wall time of ``fn`` in ms (CUDA events on a GPU)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def attention_case(case, heads, kv_heads, head_dim, dtype, device):
    """A cache holding the case's sequences (blocks shuffled) and q/k/v of the new tokens."""
    blocks_needed = sum(-(-(n + c) // BLOCK_SIZE) for n, c in case)
    num_blocks = blocks_needed + 8
    cache = PagedKVCache(1, num_blocks, BLOCK_SIZE, kv_heads, head_dim, dtype, device)
    cache.k[0].normal_()
    cache.v[0].normal_()
    perm = torch.randperm(num_blocks).tolist()
    seqs, used = [], 0
    for new, cached in case:
        n = -(-(new + cached) // BLOCK_SIZE)
        seqs.append(SeqInput([1] * new, cached, perm[used : used + n]))
        used += n
    batch = build_forward_batch(seqs, BLOCK_SIZE, device)
    t = batch.input_ids.shape[0]
    q = torch.randn(t, heads, head_dim, dtype=dtype, device=device)
    k = torch.randn(t, kv_heads, head_dim, dtype=dtype, device=device)
    v = torch.randn(t, kv_heads, head_dim, dtype=dtype, device=device)
    return cache, batch, q, k, v


def bench_attention(args, model_cfg, device, dtype, backends) -> dict:
    heads, kv_heads, head_dim = model_cfg
    scale = head_dim**-0.5
    out: dict = {"decode": {}, "prefill": {}}
    for phase, shapes in (
        ("prefill", prefill_shapes(args.smoke)),
        ("decode", decode_shapes(args.smoke)),
    ):
        for shape_name, case in shapes.items():
            cache, batch, q, k, v = attention_case(case, heads, kv_heads, head_dim, dtype, device)
            ref = SdpaPagedAttention()(q, k, v, 0, batch.attn_metadata, cache, scale).float()
            row = {}
            for name in backends:
                try:
                    backend = build_backend(name, device)

                    # Fresh metadata per call (a real forward builds it once for all layers).
                    def call(backend=backend):
                        metadata = backend.build_metadata(batch.paged)
                        return backend(q, k, v, 0, metadata, cache, scale)

                    err = (call().float() - ref).abs().max().item()
                    ms = time_ms(call, device, args.iters, args.warmup)
                    row[name] = {"ms": round(ms, 4), "max_abs_err_vs_sdpa": err}
                # A backend that cannot run a shape is recorded, not fatal.
                except Exception as exc:  # noqa: BLE001
                    row[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
                print(f"{phase:8s} {shape_name:22s} {name:7s} {row[name]}", flush=True)
            out[phase][shape_name] = row
    return out


def choose(per_phase: dict) -> str:
    """The backend with the lowest summed median over the phase's shapes (all must have run)."""
    totals = {}
    for name in BACKEND_NAMES:
        cells = [row.get(name, {}) for row in per_phase.values()]
        if cells and all("ms" in c for c in cells):
            totals[name] = sum(c["ms"] for c in cells)
    if not totals:
        raise RuntimeError("no attention backend ran every shape")
    return min(totals, key=totals.get)


# -- decode step ------------------------------------------------------------------------------
def bench_decode_step(args, device, dtype) -> dict:
    from nova.cost.gpus import get_gpu
    from nova.engine.llm_engine import device_gpu_spec
    from nova.models.loader import load_model
    from nova.runtime.runner import CacheConfig, ModelRunner

    model = args.smoke_model if args.smoke else args.model
    loaded = load_model(model, "dummy", dtype, str(device))
    decoder = loaded.model.decoder
    weight_bytes = sum(p.numel() * p.element_size() for p in decoder.parameters())
    spec = get_gpu(device_gpu_spec(str(device)))
    bound_ms = weight_bytes / spec.hbm_bytes_per_s * 1e3
    ctx = 40 if args.smoke else args.decode_context
    batches = [1, 2] if args.smoke else args.decode_batches
    rows = []
    for graphs in (False, True):
        if graphs and device.type != "cuda":
            continue
        num_blocks = max(batches) * (-(-(ctx + args.iters + args.warmup + 8) // BLOCK_SIZE)) + 8
        runner = ModelRunner(
            loaded,
            CacheConfig(block_size=BLOCK_SIZE, num_blocks=num_blocks),
            attention_backend="triton" if device.type == "cuda" else "sdpa",
            cuda_graphs=graphs,
            max_num_seqs=max(batches),
        )
        bm = runner.block_manager
        for batch in batches:
            ids = [f"b{batch}-{i}" for i in range(batch)]
            lens = {}
            for sid in ids:
                bm.allocate(sid, ctx)
                lens[sid] = ctx - 1  # cached tokens; contents do not matter for timing

            def step():
                seqs = []
                for sid in ids:
                    lens[sid] += 1
                    bm.grow(sid, lens[sid] + 1)
                    seqs.append(SeqInput([7], lens[sid], bm.block_table(sid)))
                return runner.forward(seqs)

            ms = time_ms(step, device, args.iters, args.warmup)
            for sid in ids:
                bm.free(sid)
            rows.append(
                {
                    "batch": batch,
                    "context": ctx,
                    "cuda_graphs": graphs,
                    "step_ms": round(ms, 4),
                    "bound_ms": round(bound_ms, 4),
                    "bound_fraction": round(bound_ms / ms, 4),
                }
            )
            print(
                f"decode step b={batch} graphs={graphs}: {ms:.3f} ms "
                f"(bound {bound_ms:.3f} ms, {bound_ms / ms:.0%})",
                flush=True,
            )
        runner = None  # free the cache before the next build
    return {
        "model": str(model),
        "dtype": str(dtype).removeprefix("torch."),
        "weight_bytes": weight_bytes,
        "gpu_spec": spec.name,
        "hbm_gbps": spec.hbm_gbps,
        "bound_ms": bound_ms,
        "rows": rows,
    }


# -- report -----------------------------------------------------------------------------------
def write_markdown(path: Path, res: dict) -> None:
    lines = [
        f"# Attention backends and decode step on {res['gpu']}",
        "",
        f"torch {res['torch']}, triton {res['triton']}, {res['dtype']}, block size "
        f"{BLOCK_SIZE}, heads {res['heads']} (median of {res['iters']} runs).",
        "",
        f"Selected: prefill **{res['selected']['prefill']}**, decode "
        f"**{res['selected']['decode']}** (the selection table, attention.json).",
        "",
    ]
    for phase in ("prefill", "decode"):
        lines += [
            f"## {phase} (one layer, ms)",
            "",
            "| shape | " + " | ".join(BACKEND_NAMES) + " |",
            "|---|" + "---|" * len(BACKEND_NAMES),
        ]
        for shape, row in res["attention"][phase].items():
            cells = [
                f"{row[n]['ms']:.4f}" if "ms" in row.get(n, {}) else "error" for n in BACKEND_NAMES
            ]
            lines.append(f"| {shape} | " + " | ".join(cells) + " |")
        lines.append("")
    d = res["decode_step"]
    lines += [
        "## Decode step (whole model)",
        "",
        f"{d['model']} dummy weights, {d['weight_bytes'] / 1e9:.2f} GB; bound = weight bytes "
        f"/ {d['hbm_gbps']:.0f} GB/s ({d['gpu_spec']}) = {d['bound_ms']:.3f} ms.",
        "",
        "| batch | context | CUDA graphs | step ms | bound / step |",
        "|---|---|---|---|---|",
    ]
    for r in d["rows"]:
        lines.append(
            f"| {r['batch']} | {r['context']} | {r['cuda_graphs']} | {r['step_ms']:.3f} "
            f"| {r['bound_fraction']:.0%} |"
        )
    path.write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="qwen2.5-7b", help="shipped config name or model dir")
    p.add_argument("--heads", default=None, help="H,KV,D for the attention part (default: model's)")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--iters", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--decode-context", type=int, default=1024)
    p.add_argument("--backends", nargs="+", default=list(BACKEND_NAMES), choices=BACKEND_NAMES)
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument(
        "--install-table",
        action="store_true",
        help="also write the selection table where --attention-backend auto reads it "
        "(nova/runtime/attention_tables/<gpu-slug>.json, package data)",
    )
    p.add_argument("--smoke", action="store_true", help="tiny CPU run of the whole script")
    p.add_argument("--smoke-model", default="smollm2-135m")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*flex_attention called without torch.compile.*")

    if torch.cuda.is_available() and not args.smoke:
        device = torch.device("cuda")
        gpu = torch.cuda.get_device_name(device)
    elif args.smoke:
        if args.install_table:
            print("--smoke measures nothing to install; drop --install-table", file=sys.stderr)
            return 2
        device, gpu = torch.device("cpu"), "cpu-smoke"
        args.iters, args.warmup, args.dtype = 2, 1, "float32"
        from nova.runtime.attention_triton import triton_interpreter_on

        if not triton_interpreter_on():
            args.backends = [b for b in args.backends if b != "triton"]
    else:
        print(
            "attention_decode.py measures a GPU and none is visible (torch.cuda.is_available() "
            "is False). Run it on a CUDA machine, or pass --smoke for a tiny CPU run of the "
            "script itself.",
            file=sys.stderr,
        )
        return 2
    from nova.config import torch_dtype
    from nova.models.loader import read_config, resolve_model_dir

    dtype = torch_dtype(args.dtype)
    if args.heads:
        heads = tuple(int(x) for x in args.heads.split(","))
    else:
        _, hf = read_config(resolve_model_dir(args.smoke_model if args.smoke else args.model))
        text = getattr(hf, "text_config", None) or hf
        h = text.num_attention_heads
        heads = (
            h,
            text.num_key_value_heads,
            getattr(text, "head_dim", None) or text.hidden_size // h,
        )
    torch.manual_seed(0)
    attention = bench_attention(args, heads, device, dtype, args.backends)
    selected = {"prefill": choose(attention["prefill"]), "decode": choose(attention["decode"])}
    decode_step = bench_decode_step(args, device, dtype)
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    res = {
        "gpu": gpu,
        "device": str(device),
        "torch": torch.__version__,
        "triton": triton_version,
        "host": platform.node(),
        "dtype": args.dtype,
        "model": args.model,
        "heads": heads,
        "iters": args.iters,
        "attention": attention,
        "selected": selected,
        "decode_step": decode_step,
    }
    out_dir = args.out / gpu_slug(gpu)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "attention_decode.json").write_text(json.dumps(res, indent=2) + "\n")
    write_markdown(out_dir / "attention_decode.md", res)
    table = {
        "gpu": gpu,
        **selected,
        "source": "benchmarks/attention_decode.py",
        "rule": "lowest summed median per phase",
    }
    table_text = json.dumps(table, indent=2) + "\n"
    (out_dir / "attention.json").write_text(table_text)
    print(f"wrote {out_dir}/attention_decode.json, .md and attention.json")
    installed = TABLES / f"{gpu_slug(gpu)}.json"
    if args.install_table:
        installed.write_text(table_text)
        print(f"installed the selection table: {installed} (commit it with the results)")
    else:
        print(
            f"to make this the table --attention-backend auto reads on this GPU: rerun with "
            f"--install-table, or cp {out_dir / 'attention.json'} {installed}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
