"""GPU mechanisms on a real GPU: stage latency vs SM count, co-running with and without SM
partitions, and vision-encoder weight streaming (overhead and memory saved for K = 1, 2, 4).

Model: a 7B-class VLM with dummy weights (default the shipped ``llava-1.5-7b`` config: CLIP
ViT-L/14-336, 24 encoder layers, Vicuna-7B) in bfloat16. Partitions: ``--partition`` (default
``green_context``; ``auto`` falls back to ``none``, in which case only share 1.0 is measured).

1. ``stage_vs_sms``: vision (``--images`` images), prefill (one ``--prefill-tokens`` prompt) and
   decode (``--decode-batch`` sequences at ``--decode-context``) timed inside
   ``backend.share_context(share)`` for SM shares on the device's grid; the SMs the driver
   granted are recorded with each point.
2. ``corun``: decode steps while prefill runs in a loop on another thread, with no partitions
   (two plain streams) and with a decode/compute split of the SMs (``--corun-decode-share``),
   against each alone.
3. ``offload``: vision latency and ``torch.cuda.memory_allocated`` with the encoder resident and
   streamed through K = 1, 2, 4 slots; target (Nova paper): >= 90% of the encoder-layer memory
   saved with <= 5% vision-latency overhead at K = 2.

Results: ``benchmarks/results/<gpu-slug>/gpu_mechanisms.{json,md}`` (``--out`` to change).
``--smoke``: the same code paths on a CPU with a tiny random LLaVA (results go to a temporary
directory unless ``--out`` is given; the figures mean nothing). Without CUDA and without
``--smoke`` the script stops with a message.

Usage on a GPU machine:
    .venv/bin/python benchmarks/gpu_mechanisms.py            # ~5-10 min on an H100
    .venv/bin/python -m pytest -q -m gpu tests/test_partition.py tests/test_offload.py
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from nova.gpu.backend import PartitionBackend
from nova.gpu.offload import stream_vision_layers
from nova.gpu.partition import make_backend
from nova.runtime.forward_batch import SeqInput
from nova.types import Partition, Stage

Job = Callable[[], Any]


# -- timing --------------------------------------------------------------------------------------
def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.current_stream().synchronize()


def time_ms(job: Job, cuda: bool, warmup: int, repeats: int) -> float:
    """Median latency of ``job`` on the current stream (CUDA events) or the wall clock (CPU)."""
    for _ in range(warmup):
        job()
    _sync(cuda)
    samples = []
    for _ in range(repeats):
        if cuda:
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            job()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            job()
            samples.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(samples))


class Jobs:
    """Stage batches of given shapes over a ModelRunner (KV blocks held while the job lives)."""

    def __init__(self, loaded: Any, runner: Any) -> None:
        self.loaded, self.runner = loaded, runner
        image_token = loaded.model.image_token_id
        vocab = runner.vocab_size
        self.token_limit = image_token if image_token is not None and image_token < vocab else vocab
        self._n = 0

    def vision(self, num_images: int) -> Job:
        size = int(self.loaded.hf_config.vision_config.image_size)
        pixels = torch.randn(num_images, 3, size, size, generator=torch.Generator().manual_seed(0))
        pixels = pixels.to(self.runner.device)
        return lambda: self.runner.encode_images(pixels)

    def llm(self, new_tokens: list[int], context_lens: list[int]) -> Job:
        seqs = []
        for i, (n, c) in enumerate(zip(new_tokens, context_lens)):
            self._n += 1
            table = self.runner.block_manager.allocate(f"bench-{self._n}", c)
            tokens = [(7 * j + 3 + i) % self.token_limit for j in range(n)]
            seqs.append(SeqInput(tokens, c - n, table))
        return lambda: self.runner.forward(seqs)

    def prefill(self, tokens: int) -> Job:
        return self.llm([tokens], [tokens])

    def decode(self, batch: int, context: int) -> Job:
        return self.llm([1] * batch, [context] * batch)


# -- 1. stage latency vs SM count ----------------------------------------------------------------
def grid_shares(backend: PartitionBackend, max_points: int) -> list[float]:
    if not backend.enforces_limits:
        return [1.0]
    g = backend.grid
    counts = list(range(g.min_sms, g.max_partition_sms + 1, g.granularity))
    stride = max(1, len(counts) // max(1, max_points - 1))
    picked = counts[::stride]
    return sorted({n / g.num_sms for n in picked} | {1.0})


def stage_vs_sms(
    backend: PartitionBackend, jobs: dict[str, Job], cuda: bool, args: argparse.Namespace
) -> list[dict]:
    rows = []
    for share in grid_shares(backend, args.points):
        row: dict[str, Any] = {"share": share, "granted_sms": backend.share_granted_sms(share)}
        with backend.share_context(share):
            for name, job in jobs.items():
                row[f"{name}_ms"] = time_ms(job, cuda, args.warmup, args.repeats)
        rows.append(row)
        print(
            f"  share {share:.3f} ({row['granted_sms']} SMs): "
            + ", ".join(f"{k} {v:.2f}" for k, v in row.items() if k.endswith("_ms")),
            flush=True,
        )
    return rows


# -- 2. co-running with and without partitions -----------------------------------------------------
def corun(
    backend: PartitionBackend, decode: Job, prefill: Job, cuda: bool, args: argparse.Namespace
) -> dict:
    shared = Partition.shared()
    d = args.corun_decode_share
    split = Partition(vision=1.0 - d, prefill=1.0 - d, decode=d, name="split")
    out: dict[str, Any] = {"decode_share": d}

    def measure(part: Partition, with_background: bool) -> dict[str, float]:
        stop = threading.Event()
        bg_ms: list[float] = []

        def background() -> None:
            with backend.activate(Stage.PREFILL, part):
                while not stop.is_set():
                    bg_ms.append(time_ms(prefill, cuda, 0, 1))

        thread = threading.Thread(target=background, daemon=True) if with_background else None
        if thread:
            thread.start()
            time.sleep(0.2)
        with backend.activate(Stage.DECODE, part):
            ms = time_ms(decode, cuda, args.warmup, args.repeats * 4)
        stop.set()
        if thread:
            thread.join()
        res = {"decode_step_ms": ms}
        if bg_ms:
            res["prefill_ms"] = float(statistics.median(bg_ms))
        return res

    out["decode_alone"] = measure(shared, False)
    with backend.activate(Stage.PREFILL, shared):
        out["prefill_alone_ms"] = time_ms(prefill, cuda, args.warmup, args.repeats)
    out["no_partition"] = measure(shared, True)
    if backend.enforces_limits:
        out["partitioned"] = measure(split, True)
        out["partitioned"]["granted_sms"] = {
            s.value: backend.granted_sms(s, split) for s in (Stage.PREFILL, Stage.DECODE)
        }
    print(f"  corun: {json.dumps(out)}", flush=True)
    return out


# -- 3. vision weight streaming
# ----------------------------------------------------------------------
def offload(loaded: Any, vision_job: Job, cuda: bool, args: argparse.Namespace) -> list[dict]:
    rows = []
    base_ms = time_ms(vision_job, cuda, args.warmup, args.repeats)
    layers = loaded.model.vision.streamable_layers()
    encoder_bytes = sum(p.numel() * p.element_size() for p in layers.parameters())
    rows.append(
        {
            "k": 0,
            "vision_ms": base_ms,
            "overhead": 0.0,
            "saved_bytes": 0,
            "encoder_layer_bytes": encoder_bytes,
            "saved_ratio": 0.0,
        }
    )
    for k in args.offload_k:
        if k >= len(layers):
            continue
        _sync(cuda)
        before = torch.cuda.memory_allocated() if cuda else None
        streamer = stream_vision_layers(loaded.model.vision, k, loaded.device)
        after = torch.cuda.memory_allocated() if cuda else None
        ms = time_ms(vision_job, cuda, args.warmup, args.repeats)
        st = streamer.stats
        measured_saved = (before - after) if cuda else None
        rows.append(
            {
                "k": k,
                "vision_ms": ms,
                "overhead": ms / base_ms - 1.0,
                "saved_bytes": st.saved_bytes,
                "measured_saved_bytes": measured_saved,
                "encoder_layer_bytes": encoder_bytes,
                "saved_ratio": st.saved_bytes / encoder_bytes,
                "pcie_gb_per_s_needed": st.streamed_bytes / (ms / 1e3) / 1e9,
            }
        )
        streamer.remove()
        print(
            f"  offload K={k}: vision {ms:.2f} ms ({rows[-1]['overhead']:+.1%}), "
            f"saved {st.saved_bytes / 2**20:.0f} MiB ({rows[-1]['saved_ratio']:.1%})",
            flush=True,
        )
    return rows


# -- the run
# -----------------------------------------------------------------------------------------
def _tiny_llava(root: Path) -> Path:
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    torch.manual_seed(0)
    text = LlamaConfig(
        vocab_size=512,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
    )
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=6,
        num_attention_heads=4,
        image_size=64,
        patch_size=8,
        projection_dim=64,
    )
    cfg = LlavaConfig(text_config=text, vision_config=vision, image_token_id=500)
    LlavaForConditionalGeneration(cfg).save_pretrained(root / "tiny-llava")
    return root / "tiny-llava"


def gpu_dir_name(device: torch.device) -> str:
    if device.type != "cuda":
        return "cpu-smoke"
    from nova.runtime.attention import gpu_slug

    return gpu_slug(torch.cuda.get_device_name(device))


def to_markdown(res: dict) -> str:
    lines = [
        f"# GPU mechanisms on {res['gpu']}",
        "",
        f"torch {res['torch']}, CUDA {res['cuda']}, model {res['model']} ({res['dtype']}); "
        f"backend: {res['backend']}",
        "",
        "## Stage latency vs SM count",
        "",
        "| share | granted SMs | "
        + " | ".join(k for k in res["stage_vs_sms"][0] if k.endswith("_ms"))
        + " |",
        "|---|---|" + "---|" * sum(k.endswith("_ms") for k in res["stage_vs_sms"][0]),
    ]
    for r in res["stage_vs_sms"]:
        lines.append(
            f"| {r['share']:.3f} | {r['granted_sms']} | "
            + " | ".join(f"{v:.2f}" for k, v in r.items() if k.endswith("_ms"))
            + " |"
        )
    c = res["corun"]
    lines += [
        "",
        "## Co-running decode with prefill",
        "",
        "| setting | decode step ms | prefill ms |",
        "|---|---|---|",
        f"| decode alone | {c['decode_alone']['decode_step_ms']:.2f} | - |",
        f"| prefill alone | - | {c['prefill_alone_ms']:.2f} |",
        f"| co-running, no partition | {c['no_partition']['decode_step_ms']:.2f} | "
        f"{c['no_partition'].get('prefill_ms', float('nan')):.2f} |",
    ]
    if "partitioned" in c:
        p = c["partitioned"]
        lines.append(
            f"| co-running, decode {p['granted_sms']['decode']} SMs / prefill "
            f"{p['granted_sms']['prefill']} SMs | {p['decode_step_ms']:.2f} | "
            f"{p.get('prefill_ms', float('nan')):.2f} |"
        )
    lines += [
        "",
        "## Vision weight streaming",
        "",
        "| K | vision ms | overhead | saved MiB | saved / encoder layers | PCIe GB/s needed |",
        "|---|---|---|---|---|---|",
    ]
    for r in res["offload"]:
        lines.append(
            f"| {r['k']} | {r['vision_ms']:.2f} | {r['overhead']:+.1%} | "
            f"{r['saved_bytes'] / 2**20:.0f} | {r['saved_ratio']:.1%} | "
            f"{r.get('pcie_gb_per_s_needed', 0.0):.1f} |"
        )
    t = res["target_k2"]
    if t:
        lines += [
            "",
            f"Target at K=2 (>= 90% saved, <= 5% overhead): saved {t['saved_ratio']:.1%}, "
            f"overhead {t['overhead']:+.1%} -> {'met' if t['met'] else 'NOT met'}",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llava-1.5-7b", help="shipped config or model directory")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument(
        "--partition", default="green_context", choices=("auto", "green_context", "none")
    )
    ap.add_argument("--images", type=int, default=4)
    ap.add_argument("--prefill-tokens", type=int, default=1024)
    ap.add_argument("--decode-batch", type=int, default=32)
    ap.add_argument("--decode-context", type=int, default=1024)
    ap.add_argument("--corun-decode-share", type=float, default=0.25)
    ap.add_argument("--offload-k", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--points", type=int, default=8, help="SM shares measured in part 1")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    ap.add_argument("--smoke", action="store_true", help="CPU check of the script (tiny model)")
    args = ap.parse_args(argv)

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print(
            f"gpu_mechanisms: needs a CUDA GPU (torch {torch.__version__}, CUDA build: "
            f"{torch.version.cuda}, devices: {torch.cuda.device_count()}); use --smoke for a "
            "CPU check of the script",
            file=sys.stderr,
        )
        return 2
    from nova.config import torch_dtype
    from nova.models.loader import load_model
    from nova.runtime.runner import CacheConfig, ModelRunner

    device = torch.device("cuda" if cuda else "cpu")
    tmp = Path(tempfile.mkdtemp(prefix="nova-gpu-mech-"))
    if args.smoke:
        model, dtype, load_format = str(_tiny_llava(tmp)), torch.float32, "auto"
        args.prefill_tokens, args.decode_batch, args.decode_context = 64, 4, 64
        args.images, args.warmup, args.repeats = 1, 1, 2
    else:
        model, dtype, load_format = args.model, torch_dtype(args.dtype), "dummy"
    backend = make_backend(args.partition if cuda else "cpu", device)
    print(f"backend: {backend.describe()}", flush=True)
    loaded = load_model(model, load_format, dtype, device)
    blocks = (args.decode_batch * args.decode_context + 2 * args.prefill_tokens) // 16 + 64
    runner = ModelRunner(loaded, CacheConfig(block_size=16, num_blocks=blocks))
    jobs = Jobs(loaded, runner)
    stage_jobs = {
        "vision": jobs.vision(args.images),
        "prefill": jobs.prefill(args.prefill_tokens),
        "decode": jobs.decode(args.decode_batch, args.decode_context),
    }
    res: dict[str, Any] = {
        "gpu": torch.cuda.get_device_name(device) if cuda else platform.processor() or "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "model": args.model if cuda else "tiny-llava",
        "dtype": str(dtype),
        "backend": backend.describe(),
        "smoke": args.smoke,
        "shapes": {
            "images": args.images,
            "prefill_tokens": args.prefill_tokens,
            "decode_batch": args.decode_batch,
            "decode_context": args.decode_context,
        },
    }
    print("1. stage latency vs SM count", flush=True)
    res["stage_vs_sms"] = stage_vs_sms(backend, stage_jobs, cuda, args)
    print("2. co-running", flush=True)
    res["corun"] = corun(backend, stage_jobs["decode"], stage_jobs["prefill"], cuda, args)
    print("3. vision weight streaming", flush=True)
    res["offload"] = offload(loaded, stage_jobs["vision"], cuda, args)
    k2 = [r for r in res["offload"] if r["k"] == 2]
    res["target_k2"] = (
        {
            "saved_ratio": k2[0]["saved_ratio"],
            "overhead": k2[0]["overhead"],
            "met": k2[0]["saved_ratio"] >= 0.9 and k2[0]["overhead"] <= 0.05,
        }
        if k2
        else None
    )
    res["partitions_created"] = [dataclasses.asdict(i) for i in backend.created()]
    default_out = (Path(__file__).parent / "results" / gpu_dir_name(device)) if cuda else tmp
    out = Path(args.out) if args.out else default_out
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_mechanisms.json").write_text(json.dumps(res, indent=1, default=str))
    (out / "gpu_mechanisms.md").write_text(to_markdown(res))
    print(to_markdown(res))
    print(f"wrote {out}/gpu_mechanisms.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
