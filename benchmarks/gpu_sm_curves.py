"""Stage time vs granted SMs on a real GPU, written as cost-model evidence.

One prepared script (<= 8 minutes on an H100/H200) that measures what the roofline cost model
borrows or assumes for this GPU (``nova/cost/data/gpus/<gpu>.json``), on Qwen2.5-VL-7B with dummy
weights in bfloat16 (``nova/models/configs/qwen2.5-vl-7b``), with green contexts through
``nova.gpu`` (``--partition green_context``):

1. decode step time vs granted SMs (batch ``--decode-batches`` at ``--decode-context``);
2. ViT time (one ``--image-size`` image) and prefill time (one ``--prefill-tokens`` prompt) vs
   granted SMs;
3. decode beside vision and beside prefill in green-context partitions (decode on an aligned
   group, the compute stage on the exact remainder: ``nova.cost.sm_grid.split_sms``), both
   sides timed, against each alone on the same SMs.

It writes the evidence file ``nova/cost/data/measured/<gpu>-<date>.json`` (the format of
``nova.cost.evidence``; every number's source reads "our measurement, <GPU name>, <date>"),
which replaces the defaults for that GPU from then on:

- ``hbm_vs_sms``: the decode step's memory time at k SMs relative to the whole GPU,
  ``(t(N) - overhead) / (t(k) - overhead)`` for the largest decode batch that stays
  memory-bound;
- ``decode_bandwidth_fraction``, ``vision_efficiency``, ``prefill_efficiency``: the roofline
  fitted to the whole-GPU times (``nova.cost.roofline.calibrate_to_times``, as the A6000 is to
  the paper), for the Qwen2.5-VL-7B shape;
- ``interference_memory_beside_compute``: decode's co-run slowdown beyond what the roofline's
  bandwidth split already predicts; ``interference_compute_per_load``: the compute stage's
  slowdown per unit of decode's bandwidth load;
- ``curves``: every raw measurement.

and a summary ``benchmarks/results/<gpu-slug>/gpu_sm_curves.{json,md}`` comparing the measured
times with what the shipped cost model predicted for them.

``--smoke``: the same code on the CPU with a tiny Qwen2.5-VL config and the cpu partition
backend (one "SM" unless the backend can limit cores), in well under a minute; outputs go to a
temporary directory unless ``--out-dir``/``--out-evidence`` are given. Without CUDA and without
``--smoke`` the script stops with a message.

On the GPU machine:  python3 benchmarks/gpu_sm_curves.py   (then commit the evidence file)
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from nova.cost.base import StageWork
from nova.cost.evidence import (
    DATA_DIR,
    EVIDENCE_FORMAT,
    EVIDENCE_VERSION,
    VALUE_RANGES,
    parse_evidence,
)
from nova.cost.gpus import GpuSpec, get_gpu, gpu_spec_name_for_device
from nova.cost.model_spec import ModelSpec
from nova.cost.roofline import Calibration, RooflineCostModel, calibrate_to_times
from nova.cost.sm_grid import SmGrid, split_sms
from nova.types import Partition, Stage

Job = Callable[[], Any]
REPO = Path(__file__).resolve().parent.parent


# -- timing ----------------------------------------------------------------------------------------
def time_s(job: Job, cuda: bool, warmup: int, repeats: int, budget_s: float = 20.0) -> float:
    """Median seconds of ``job`` on the current stream (CUDA events; wall clock on a CPU).
    Stops early after ``budget_s`` (at least 3 samples)."""
    for _ in range(warmup):
        job()
    if cuda:
        torch.cuda.current_stream().synchronize()
    samples: list[float] = []
    t_start = time.perf_counter()
    for _ in range(repeats):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            job()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            job()
            samples.append(time.perf_counter() - t0)
        if len(samples) >= 3 and time.perf_counter() - t_start > budget_s:
            break
    return float(statistics.median(samples))


# -- jobs ------------------------------------------------------------------------------------------
class Jobs:
    """Stage batches over a ``ModelRunner`` (KV blocks stay allocated while the script runs)."""

    def __init__(self, loaded: Any, runner: Any, spec: ModelSpec) -> None:
        from nova.profiling.grid import TextTokens

        self.loaded, self.runner, self.spec = loaded, runner, spec
        self._tokens = TextTokens(runner.vocab_size, loaded.model.image_token_id)
        self._n = 0

    def vision(self, width: int, height: int) -> Job:
        from nova.models.mm import VisionInput

        sizing = self.spec.image_sizing()
        t, h, w = sizing.grid(width, height)
        patch_dim = 3 * sizing.temporal_patch_size * sizing.patch_size**2
        gen = torch.Generator().manual_seed(0)
        pixels = torch.randn(t * h * w, patch_dim, generator=gen).to(self.loaded.dtype)
        vision = VisionInput(pixels, torch.tensor([[t, h, w]]), sizing.merge_size)
        return lambda: self.runner.encode_images(vision)

    def llm(self, new_tokens: list[int], context_lens: list[int]) -> Job:
        from nova.runtime.forward_batch import SeqInput

        seqs = []
        for i, (n, c) in enumerate(zip(new_tokens, context_lens)):
            self._n += 1
            table = self.runner.block_manager.allocate(f"sm-curve-{self._n}", c)
            seqs.append(SeqInput(self._tokens(n, offset=i), c - n, table))
        return lambda: self.runner.forward(seqs)


# -- SM points -------------------------------------------------------------------------------------
def sm_points(grid: SmGrid, enforced: bool, max_points: int) -> list[int]:
    """Aligned SM counts spread over the grid (always the minimum and the whole device)."""
    if not enforced:
        return [grid.num_sms]
    counts = list(grid.aligned_counts())
    if grid.num_sms not in counts:
        counts.append(grid.num_sms)
    if len(counts) <= max_points:
        return counts
    # denser at small counts, where the curves bend
    picked = {counts[0], grid.num_sms}
    for i in range(1, max_points - 1):
        x = (i / (max_points - 1)) ** 1.6 * (len(counts) - 1)
        picked.add(counts[round(x)])
    return sorted(picked)


@contextmanager
def on_sms(backend: Any, sms: int, num_sms: int) -> Iterator[None]:
    if sms >= num_sms:
        yield
        return
    with backend.share_context(sms / num_sms):
        yield


def corun_pair(
    backend: Any,
    part: Partition,
    fg_stage: Stage,
    fg: Job,
    bg_stage: Stage,
    bg: Job,
    cuda: bool,
    args: argparse.Namespace,
) -> tuple[float, float]:
    """``fg`` timed under ``part`` while ``bg`` loops under ``part`` on another thread;
    returns (fg seconds, bg median seconds)."""
    stop = threading.Event()
    bg_times: list[float] = []
    errors: list[BaseException] = []

    def background() -> None:
        try:
            with backend.activate(bg_stage, part):
                while not stop.is_set():
                    bg_times.append(time_s(bg, cuda, 0, 1))
        except Exception as exc:  # noqa: BLE001 -- re-raised below: a failed co-runner is no co-run
            errors.append(exc)

    thread = threading.Thread(target=background, daemon=True)
    thread.start()
    time.sleep(0.2 if cuda else 0.05)
    with backend.activate(fg_stage, part):
        fg_s = time_s(fg, cuda, args.warmup, args.repeats, args.point_budget_s)
    stop.set()
    thread.join()
    if errors:
        raise RuntimeError(f"co-running {bg_stage.value} failed: {errors[0]!r}")
    return fg_s, float(statistics.median(bg_times)) if bg_times else math.nan


# -- evidence --------------------------------------------------------------------------------
def build_evidence(
    res: dict[str, Any], gpu: GpuSpec, spec: ModelSpec, source: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The evidence document and the derivations (for the summary)."""
    on = gpu.name

    def num(name: str, value: float, how: str) -> dict[str, Any]:
        lo, hi = VALUE_RANGES[name]
        if not lo <= value <= hi:  # e.g. a tiny smoke model: overhead-bound, nothing to fit
            how += f" (fit {value:.4g} clamped to the allowed [{lo}, {hi}])"
            value = min(hi, max(lo, value))
        return {"value": round(value, 4), "source": f"{source}: {how}", "measured_on": on}

    shipped = Calibration.for_gpu(gpu)
    n = res["num_sms"]  # the backend's SM count (the spec's on a GPU; cores on a CPU)
    full = dict(res["stages"])
    decode_rows = res["decode"]
    # 1. whole-GPU fit of the three fitted numbers (as the A6000 is fitted to the paper)
    context = res["shapes"]["decode_context"]
    b_min = min(int(b) for b in decode_rows)
    works = {
        Stage.VISION: StageWork.vision(1),
        Stage.PREFILL: StageWork.prefill(res["shapes"]["prefill_tokens"]),
        Stage.DECODE: StageWork.decode([context] * b_min),
    }
    times = {
        Stage.VISION: full["vision"][str(n)],
        Stage.PREFILL: full["prefill"][str(n)],
        Stage.DECODE: decode_rows[str(b_min)][str(n)],
    }
    # the overheads are assumptions; a time below one (a tiny smoke model) keeps half of itself
    base = dataclasses.replace(
        shipped,
        vision_overhead_s=min(shipped.vision_overhead_s, times[Stage.VISION] / 2),
        prefill_overhead_s=min(shipped.prefill_overhead_s, times[Stage.PREFILL] / 2),
        decode_overhead_s=min(shipped.decode_overhead_s, times[Stage.DECODE] / 2),
    )
    fit = calibrate_to_times(gpu, spec, works, times, base, check_bounds=False)
    fitted_model = RooflineCostModel(gpu, spec, fit)
    bounds = {s.value: fitted_model.breakdown(w, 1.0).bound for s, w in works.items()}
    derived: dict[str, Any] = {
        "bounds_after_fit": bounds,
        "fit": fit.to_dict(),
        "fit_times_s": {s.value: t for s, t in times.items()},
    }
    values: dict[str, Any] = {
        "decode_bandwidth_fraction": num(
            "decode_bandwidth_fraction",
            fit.bw_eff,
            f"decode batch {b_min} at context {context} on all {n} SMs, "
            f"{times[Stage.DECODE] * 1e3:.3f} ms, fitted as calibrate_to_times does",
        ),
        "vision_efficiency": num(
            "vision_efficiency",
            fit.vision_mfu,
            f"one {res['shapes']['image']} image through the ViT on all SMs, "
            f"{times[Stage.VISION] * 1e3:.2f} ms, fitted with wave quantization",
        ),
        "prefill_efficiency": num(
            "prefill_efficiency",
            fit.prefill_mfu,
            f"one {res['shapes']['prefill_tokens']}-token prefill on all SMs, "
            f"{times[Stage.PREFILL] * 1e3:.2f} ms, fitted with wave quantization",
        ),
    }
    doc: dict[str, Any] = {
        "format": EVIDENCE_FORMAT,
        "version": EVIDENCE_VERSION,
        "gpu": gpu.name,
        "description": f"Measured by benchmarks/gpu_sm_curves.py on {res['device_name']} "
        f"({res['date']}): Qwen2.5-VL-7B, dummy weights, bf16, {res['backend']}.",
        "values": values,
    }
    # 2. the bandwidth curve, from the largest decode batch that stays memory-bound
    probe = RooflineCostModel(gpu, spec, fit)
    bound_ok = [
        int(b)
        for b in decode_rows
        if probe.breakdown(StageWork.decode([context] * int(b)), 1.0).bound == "memory"
    ]
    sms_measured = sorted(int(k) for k in decode_rows[str(b_min)])
    b = max(bound_ok) if bound_ok else 0
    row = decode_rows.get(str(b), {})
    overhead = fit.decode_overhead_s
    t_full = row[str(n)] - overhead if row else 0.0
    if bound_ok and len(sms_measured) > 1 and t_full <= 0.0:
        # the fitted per-step overhead is the whole step on all SMs (noise, or a step that is
        # all launch overhead): no memory time to take fractions of; the default curve stays
        derived["curve_skipped"] = (
            f"decode batch {b}: step on all {n} SMs {row[str(n)] * 1e3:.3f} ms <= fitted "
            f"overhead {overhead * 1e3:.3f} ms"
        )
    elif bound_ok and len(sms_measured) > 1:
        points = []
        last = 0.0
        for k in sms_measured:
            frac = min(1.0, max(last, t_full / max(row[str(k)] - overhead, 1e-9)))
            last = frac
            points.append(
                {
                    "sms": k,
                    "fraction": round(frac, 4),
                    "source": f"{source}: decode batch {b} at context {context}, memory time at "
                    f"{k} SMs vs all {n} ((t(N) - overhead) / (t(k) - overhead), "
                    f"{row[str(k)] * 1e3:.3f} ms)",
                    "measured_on": on,
                }
            )
        doc["hbm_vs_sms"] = {
            "note": f"measured decode curve (batch {b}), not scaled from another device",
            "points": points,
        }
        derived["curve_batch"] = b
    # 3. interference from the partitioned co-runs
    mem_factors, compute_factors = [], []
    for row in res["corun"]:
        d, c = row["decode_sms"], row["compute_sms"]
        decode_w = StageWork.decode([context] * row["decode_batch"])
        other_w = works[Stage(row["beside"])]
        no_inter = RooflineCostModel(gpu, spec, fit)
        no_inter.interference = _without_memory_factor(no_inter)
        # busy time (minus the per-batch overhead) co-running / alone: measured, and what the
        # roofline's bandwidth split alone predicts; the rest is the extra interference
        o_d, o_c = fit.decode_overhead_s, fit.overhead_s(Stage(row["beside"]))
        predicted = (no_inter.time_s(decode_w, d / n, [(other_w, c / n)]) - o_d) / (
            no_inter.time_s(decode_w, d / n) - o_d
        )
        measured = (row["decode_corun_s"] - o_d) / max(row["decode_alone_s"] - o_d, 1e-12)
        mem_factors.append(max(0.0, measured / predicted - 1.0))
        capacity = gpu.hbm_bytes_per_s * fit.bw_eff
        load = min(1.0, probe.solo(decode_w, float(d)).demand_bytes_per_s / capacity)
        if load > 0.05 and math.isfinite(row["compute_corun_s"]):
            slowdown = (row["compute_corun_s"] - o_c) / max(row["compute_alone_s"] - o_c, 1e-12)
            compute_factors.append(max(0.0, slowdown - 1.0) / load)
    if mem_factors:
        values["interference_memory_beside_compute"] = num(
            "interference_memory_beside_compute",
            statistics.median(mem_factors),
            "median over the partitioned co-runs of decode's slowdown beside vision/prefill "
            "beyond the roofline's bandwidth split ("
            + ", ".join(f"{f:.3f}" for f in mem_factors)
            + ")",
        )
    if compute_factors:
        values["interference_compute_per_load"] = num(
            "interference_compute_per_load",
            statistics.median(compute_factors),
            "median over the partitioned co-runs of the compute stage's slowdown per unit of "
            "decode's HBM load (" + ", ".join(f"{f:.3f}" for f in compute_factors) + ")",
        )
    curves: dict[str, list[dict[str, Any]]] = {}
    for b, row in decode_rows.items():
        curves[f"decode_b{b}_c{context}_s"] = [
            {"sms": int(k), "value_s": v, "source": source, "measured_on": on}
            for k, v in row.items()
        ]
    for stage in ("vision", "prefill"):
        curves[f"{stage}_s"] = [
            {"sms": int(k), "value_s": v, "source": source, "measured_on": on}
            for k, v in full[stage].items()
        ]
    curves["corun"] = [
        {
            **{k: v for k, v in row.items() if k != "beside"},
            "label": f"decode beside {row['beside']}",
            "source": source,
            "measured_on": on,
        }
        for row in res["corun"]
        if all(math.isfinite(v) for k, v in row.items() if k != "beside")
    ]
    if not curves["corun"]:
        del curves["corun"]
    doc["curves"] = curves
    parse_evidence(doc, "measured evidence")  # the file must load
    return doc, derived


def _without_memory_factor(model: RooflineCostModel) -> Any:
    from nova.cost.roofline import Interference

    i = model.interference
    return Interference(i.compute_per_load, 0.0, i.multistream_overhead)


# -- the run ---------------------------------------------------------------------------------
def tiny_qwen25_vl(root: Path) -> Path:
    """A tiny Qwen2.5-VL config (same architecture as the 7B, dims shrunk) for ``--smoke``."""
    src = REPO / "nova/models/configs/qwen2.5-vl-7b"
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        image_token_id=500,
        video_token_id=501,
        vision_start_token_id=502,
        vision_end_token_id=503,
        vision_token_id=504,
        bos_token_id=1,
        eos_token_id=2,
        torch_dtype="float32",
    )
    cfg["rope_scaling"] = {"type": "mrope", "mrope_section": [2, 3, 3]}
    cfg["vision_config"].update(
        depth=2,
        hidden_size=32,
        intermediate_size=48,
        num_heads=4,
        out_hidden_size=64,
        fullatt_block_indexes=[1],
        window_size=56,
    )
    out = root / "tiny-qwen2.5-vl"
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(cfg))
    (out / "preprocessor_config.json").write_text((src / "preprocessor_config.json").read_text())
    return out


def markdown(res: dict[str, Any], derived: dict[str, Any], predicted: dict[str, Any]) -> str:
    n = res["num_sms"]
    lines = [
        f"# Stage time vs granted SMs on {res['device_name']} ({res['date']})",
        "",
        f"Qwen2.5-VL-7B{' (tiny smoke config)' if res['smoke'] else ''}, dummy weights, "
        f"{res['dtype']}; torch {res['torch']}, CUDA {res['cuda']}; backend: {res['backend']}; "
        f"wall {res['wall_s']:.0f} s. Model predictions: the shipped cost model before this "
        "measurement.",
        "",
        "| SMs | " + " | ".join(f"{k} ms (model)" for k in predicted) + " |",
        "|---:|" + "---:|" * len(predicted),
    ]
    sms = sorted({int(k) for row in predicted.values() for k in row})
    for k in sms:
        cells = []
        for name, row in predicted.items():
            measured = res["curves_flat"][name].get(str(k))
            cells.append(
                f"{measured * 1e3:.2f} ({row[str(k)] * 1e3:.2f})" if measured is not None else "-"
            )
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    if res["corun"]:
        lines += [
            "",
            "## Co-running in green-context partitions",
            "",
            "| decode SMs | beside | compute SMs | decode alone / co ms | compute alone / co ms |",
            "|---:|---|---:|---|---|",
        ]
        for r in res["corun"]:
            lines.append(
                f"| {r['decode_sms']} | {r['beside']} | {r['compute_sms']} | "
                f"{r['decode_alone_s'] * 1e3:.2f} / {r['decode_corun_s'] * 1e3:.2f} | "
                f"{r['compute_alone_s'] * 1e3:.2f} / {r['compute_corun_s'] * 1e3:.2f} |"
            )
    lines += ["", "## Fitted", "", "```", json.dumps(derived, indent=1), "```", ""]
    lines.append(
        f"Evidence written: `{res['evidence_path']}` (replaces the defaults for {n}-SM "
        f"{res['gpu_spec']})."
    )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="qwen2.5-vl-7b", help="shipped config or model directory")
    ap.add_argument("--partition", default="green_context", choices=("auto", "green_context"))
    ap.add_argument("--image-size", type=int, nargs=2, default=(1120, 1120), metavar=("W", "H"))
    ap.add_argument("--prefill-tokens", type=int, default=2048)
    ap.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--decode-context", type=int, default=2048)
    ap.add_argument(
        "--corun-decode-sms",
        type=int,
        nargs="*",
        default=None,
        help="decode partitions for the co-runs (default: 4 spread over the grid)",
    )
    ap.add_argument("--points", type=int, default=10, help="SM counts per curve")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--point-budget-s", type=float, default=6.0, help="time cap per point")
    ap.add_argument("--out-dir", default=None, help="summary directory")
    ap.add_argument("--out-evidence", default=None, help="evidence file path")
    ap.add_argument("--smoke", action="store_true", help="CPU check of the script (tiny model)")
    args = ap.parse_args(argv)
    t_start = time.perf_counter()

    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print(
            "gpu_sm_curves: needs a CUDA GPU with green contexts; use --smoke for a CPU check",
            file=sys.stderr,
        )
        return 2
    from nova.gpu.partition import make_backend
    from nova.models.loader import load_model
    from nova.runtime.runner import CacheConfig, ModelRunner

    device = torch.device("cuda" if cuda else "cpu")
    tmp = Path(tempfile.mkdtemp(prefix="nova-sm-curves-"))
    if args.smoke:
        model, dtype = str(tiny_qwen25_vl(tmp)), torch.float32
        args.image_size, args.prefill_tokens = (112, 112), 64
        args.decode_batches, args.decode_context = [1, 4], 64
        args.warmup, args.repeats, args.point_budget_s = 1, 2, 1.0
    else:
        model, dtype = args.model, torch.bfloat16
    backend = make_backend(args.partition if cuda else "cpu", device)
    device_name = torch.cuda.get_device_name(device) if cuda else (platform.processor() or "cpu")
    gpu_name = gpu_spec_name_for_device(device_name) if cuda else "cpu"
    if gpu_name is None:
        print(f"gpu_sm_curves: no GPU spec for {device_name!r} in nova.cost.gpus", file=sys.stderr)
        return 2
    gpu = get_gpu(gpu_name)
    grid = backend.grid
    sm_grid = SmGrid(grid.num_sms, grid.granularity, grid.min_sms)
    spec = ModelSpec.named(model).for_image(*args.image_size)
    print(f"backend: {backend.describe()}; {device_name} -> spec {gpu.name}", flush=True)
    loaded = load_model(model, "dummy", dtype, device)
    ctx, batches = args.decode_context, sorted(args.decode_batches)
    blocks = (sum(batches) * ctx * 3 + 4 * args.prefill_tokens) // 16 + 64
    runner = ModelRunner(loaded, CacheConfig(block_size=16, num_blocks=blocks))
    jobs = Jobs(loaded, runner, spec)
    vision = jobs.vision(*args.image_size)
    prefill = jobs.llm([args.prefill_tokens], [args.prefill_tokens])
    decodes = {b: jobs.llm([1] * b, [ctx] * b) for b in batches}
    date = datetime.date.today().isoformat()
    res: dict[str, Any] = {
        "device_name": device_name,
        "gpu_spec": gpu.name,
        "num_sms": sm_grid.num_sms,
        "date": date,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "dtype": str(dtype),
        "backend": backend.describe(),
        "smoke": args.smoke,
        "shapes": {
            "image": f"{args.image_size[0]}x{args.image_size[1]}",
            "prefill_tokens": args.prefill_tokens,
            "decode_batches": batches,
            "decode_context": ctx,
        },
    }
    n = sm_grid.num_sms
    points = sm_points(sm_grid, backend.enforces_limits, args.points)
    print(f"1-2. stage time vs SMs at {points}", flush=True)
    res["decode"] = {str(b): {} for b in batches}
    res["stages"] = {"vision": {}, "prefill": {}}
    for k in sorted(points, reverse=True):  # the whole GPU first: its numbers matter most
        with on_sms(backend, k, n):
            for b, job in decodes.items():
                res["decode"][str(b)][str(k)] = time_s(
                    job, cuda, args.warmup, args.repeats * 2, args.point_budget_s
                )
            res["stages"]["vision"][str(k)] = time_s(
                vision, cuda, args.warmup, args.repeats, args.point_budget_s
            )
            res["stages"]["prefill"][str(k)] = time_s(
                prefill, cuda, args.warmup, args.repeats, args.point_budget_s
            )
        print(
            f"  {k} SMs: decode "
            + ", ".join(f"b{b} {res['decode'][str(b)][str(k)] * 1e3:.2f}" for b in batches)
            + f" ms; vision {res['stages']['vision'][str(k)] * 1e3:.1f} ms; prefill "
            f"{res['stages']['prefill'][str(k)] * 1e3:.1f} ms "
            f"({time.perf_counter() - t_start:.0f} s)",
            flush=True,
        )
    print("3. decode beside vision / prefill in partitions", flush=True)
    res["corun"] = []
    decode_batch = batches[len(batches) // 2]
    choices = sm_grid.decode_choices()
    wanted = args.corun_decode_sms
    if wanted is None and choices:
        wanted = sorted({choices[round(f * (len(choices) - 1))] for f in (0.1, 0.25, 0.45, 0.65)})
    for d_req in (wanted or []) if backend.enforces_limits else []:
        g = split_sms(sm_grid, d_req)
        part = Partition(
            vision=g.compute_share(),
            prefill=g.compute_share(),
            decode=g.decode_share,
            name=f"decode{g.decode}",
            isolated=True,
        )
        decode = decodes[decode_batch]
        with backend.activate(Stage.DECODE, part):
            d_alone = time_s(decode, cuda, args.warmup, args.repeats * 2, args.point_budget_s)
        for stage, job in ((Stage.VISION, vision), (Stage.PREFILL, prefill)):
            with backend.activate(stage, part):
                c_alone = time_s(job, cuda, args.warmup, args.repeats, args.point_budget_s)
            d_co, _ = corun_pair(backend, part, Stage.DECODE, decode, stage, job, cuda, args)
            c_co, _ = corun_pair(backend, part, stage, job, Stage.DECODE, decode, cuda, args)
            res["corun"].append(
                {
                    "decode_sms": backend.granted_sms(Stage.DECODE, part),
                    "compute_sms": backend.granted_sms(stage, part),
                    "beside": stage.value,
                    "decode_batch": decode_batch,
                    "decode_alone_s": d_alone,
                    "decode_corun_s": d_co,
                    "compute_alone_s": c_alone,
                    "compute_corun_s": c_co,
                }
            )
            print(f"  {res['corun'][-1]}", flush=True)
    res["wall_s"] = time.perf_counter() - t_start
    source = f"our measurement, {device_name}, {date} (benchmarks/gpu_sm_curves.py)"
    if args.smoke:
        source += ", CPU smoke run of a tiny config: the numbers mean nothing"
    doc, derived = build_evidence(res, gpu, spec, source)
    # what the shipped model predicted for the same shapes
    shipped = RooflineCostModel(gpu, spec)
    names = {f"decode_b{b}": StageWork.decode([ctx] * b) for b in batches}
    names |= {"vision": StageWork.vision(1), "prefill": StageWork.prefill(args.prefill_tokens)}
    predicted = {
        name: {str(k): shipped.time_s(w, k / n) for k in points} for name, w in names.items()
    }
    res["curves_flat"] = {f"decode_b{b}": res["decode"][str(b)] for b in batches} | res["stages"]
    res["predicted_s"] = predicted
    evidence_path = (
        Path(args.out_evidence)
        if args.out_evidence
        else (
            tmp / f"{gpu.name}-{date}.json"
            if args.smoke
            else DATA_DIR / "measured" / f"{gpu.name}-{date}.json"
        )
    )
    evidence_path.parent.mkdir(parents=True, exist_ok=True)
    evidence_path.write_text(json.dumps(doc, indent=1) + "\n")
    res["evidence_path"] = str(evidence_path)
    if args.out_dir:
        out = Path(args.out_dir)
    elif args.smoke:
        out = tmp
    else:
        from nova.runtime.attention import gpu_slug

        out = REPO / "benchmarks" / "results" / gpu_slug(device_name)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_sm_curves.json").write_text(
        json.dumps({**res, "derived": derived}, indent=1, default=str)
    )
    md = markdown(res, derived, predicted)
    (out / "gpu_sm_curves.md").write_text(md)
    print(md)
    print(f"wrote {evidence_path} and {out}/gpu_sm_curves.{{json,md}} in {res['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
