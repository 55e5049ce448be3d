"""Measure a cost profile with the real runtime (imports torch).

``profile_model`` loads a model (``nova.models.loader.load_model``), builds a ``ModelRunner``
and times, per stage, what the engine's stage workers run (``through="executor"``, the
default): ``TorchExecutor.execute`` on real ``Batch``es, on one long-lived worker thread per
stage, so sampling, the image-embedding hand-off into prefill and the executor's Python are in
the time (``nova.profiling.engine_batches``). Batch shapes vary like real ones: a prefill point
(total tokens, sequences) is split into mixed lengths, sequences long enough carry a real chat
prompt with a screenshot; a decode point (batch, mean context) gets mixed contexts; every
sample is a new mix. (The other harness, ``through="runner"``, times bare
``runner.encode_images`` / ``runner.forward`` calls on uniform shapes on the calling thread
(``nova.profiling.runner_batches``); on the 2-core CPU real engine batches took ~1.6x that:
worker threads run the same forward up to ~1.3x slower than the main thread, and the profile
took the minimum over identical shapes. It remains the path for SM-share measurements under
``share_context``.) Each grid point: ``warmup`` untimed runs, then ``repeats`` timed runs, per
pass over the grid (``passes``, samples pooled); the table holds their median
(``statistic="min"``: their minimum).

Co-running factors: for each ordered pair of stages (a, b), a's representative batch is timed
alone and while b's representative batch runs in a loop in a second thread (CUDA: each thread
on its own stream), alternating the two so that drifts in machine load hit both alike.
factor = latency with / latency without, floored at 1.0 (the raw latencies are kept in
``metadata.corun_raw``). Without SM partitions this is the ``shared`` (multi-stream) mode;
on a CPU the two threads share the cores.

A shared 2-core machine is noisy: another process running OpenMP work can slow a 2-thread
forward several-fold (spinning barriers lose their peer). ``metadata.loadavg_1min`` records
the load before and after; re-measure when it is well above ``num_threads``, measure with
``passes=2, statistic="min"``, or merge several profiles taken minutes apart
(``nova.cost.profiled.merge_profiles``, ``nova profile --merge``). The shipped
``nova/cost/profiles/demo-cpu.json`` records how it was taken in its ``metadata`` (``timed``,
``statistic``, ``loadavg_1min``).

SM shares: only 1.0 unless ``share_context`` is given -- a factory of context managers that
run the enclosed work on a given SM share (e.g. a green-context stream from the executor);
then every share in ``shares`` gets its own table.

The output is the JSON dict that ``nova.cost.profiled.ProfiledCostModel.from_dict`` reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import itertools
import logging
import os
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from typing import Any

import torch

from nova.cost.model_spec import ModelSpec
from nova.cost.profiled import PROFILE_FORMAT, PROFILE_VERSION, STAGE_AXES
from nova.profiling.device import device_gpu_spec, device_name, loadavg_1min
from nova.profiling.engine_batches import EngineBatches
from nova.profiling.grid import STATISTICS, ProfileGrid
from nova.profiling.runner_batches import RunnerBatches
from nova.profiling.timing import DeviceTimer, Job, StageThreads, time_corun, time_varied
from nova.types import STAGES, Stage

log = logging.getLogger(__name__)


def profile_model(
    model: str = "demo",
    device: str = "cpu",
    *,
    quick: bool = False,
    grid: ProfileGrid | None = None,
    warmup: int | None = None,
    repeats: int | None = None,
    corun: bool = True,
    load_format: str = "auto",
    dtype: torch.dtype | None = None,
    num_threads: int | None = None,
    block_size: int = 16,
    statistic: str = "median",
    passes: int = 1,
    shares: Sequence[float] = (1.0,),
    share_context: Callable[[float], AbstractContextManager[Any]] | None = None,
    through: str | None = None,
) -> dict[str, Any]:
    """Measure stage latency tables (and co-running factors) of ``model`` on ``device``.

    Returns the profile dict (``ProfiledCostModel.from_dict`` reads it). ``quick``: a tiny
    grid, 1 warm-up and 2 repeats; otherwise 1 warm-up and 3 repeats (override with
    ``warmup`` / ``repeats``). ``passes``: sweep the whole grid that many times (warm-up in the
    first only) and pool the samples, so that a burst of load from another process does not
    hit every sample of a point. ``statistic``: how the pooled samples are summarised,
    ``median`` or ``min`` (the least disturbed run; use it on a shared machine).
    ``dtype``: None (default) is the engine's ``--dtype auto``, the checkpoint's own dtype
    (``nova.models.loader.resolve_dtype``), so a profile taken with the engine's flags is the
    one the engine plans with (``nova.cost.profiled.shipped_profile_for``).
    ``through``: ``executor`` (default): time ``TorchExecutor.execute`` on real batches of
    mixed shapes, each stage on its own worker thread (``EngineBatches``: what the engine
    runs); ``runner``: time the bare ``runner.encode_images`` / ``runner.forward`` calls on
    uniform shapes (the default under ``share_context``: SM shares are entered around the
    runner calls; the executor would pick its own partition).
    """
    from nova.models.loader import load_model
    from nova.runtime.runner import CacheConfig, ModelRunner

    started = time.monotonic()
    shares = tuple(sorted({float(s) for s in shares}))
    if shares != (1.0,) and share_context is None:
        raise ValueError("measuring SM shares other than 1.0 needs share_context (SM partitions)")
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    torch_device = torch.device(device)
    warmup = 1 if warmup is None else warmup
    repeats = (2 if quick else 3) if repeats is None else repeats
    if repeats < 1 or warmup < 0 or passes < 1:
        raise ValueError("repeats and passes must be >= 1 and warmup >= 0")
    if statistic not in STATISTICS:
        raise ValueError(f"statistic must be one of {sorted(STATISTICS)}, got {statistic!r}")
    stat = STATISTICS[statistic]
    through = through or ("runner" if share_context is not None else "executor")
    if through not in ("executor", "runner"):
        raise ValueError(f"through must be 'executor' or 'runner', got {through!r}")
    if through == "executor" and share_context is not None:
        raise ValueError(
            "SM shares (share_context) are measured through the runner (through='runner')"
        )
    load_before = loadavg_1min()

    def setup() -> tuple[Any, ProfileGrid, Any]:
        loaded = load_model(model, load_format=load_format, dtype=dtype, device=torch_device)
        clipped = (grid or (ProfileGrid.quick() if quick else ProfileGrid())).clipped(
            loaded.max_model_len
        )
        runner = ModelRunner(
            loaded,
            CacheConfig(block_size=block_size, num_blocks=clipped.kv_blocks_needed(block_size)),
        )
        make = EngineBatches if through == "executor" else RunnerBatches
        batches: Any = make(loaded, runner)
        return loaded, clipped, batches

    if torch_device.type == "cpu":
        # as the engine does (``LLMEngine``): loading's parallel ops on a thread that ends, so
        # their OpenMP pool does not outlive it; one more pool than the stage workers' made
        # the idle OpenMP threads stop spinning and every small op of a timed batch pay a
        # wake-up (``nova.gpu.cpu_threads.TeamThread``): decode steps timed ~1.4x the engine's
        from nova.gpu.cpu_threads import run_in_fresh_thread

        loaded, grid, work = run_in_fresh_thread(setup)
    else:
        loaded, grid, work = setup()
    dev = DeviceTimer(torch_device)
    threads = StageThreads()
    multimodal = loaded.model.is_multimodal

    axis_values: dict[Stage, list[tuple[int, ...]]] = {
        Stage.VISION: [grid.num_images],
        Stage.PREFILL: [grid.prefill_tokens, grid.prefill_seqs],
        Stage.DECODE: [grid.decode_batch, grid.decode_context],
    }
    makers: dict[Stage, Callable[..., AbstractContextManager[Job]]] = {
        Stage.VISION: work.vision,
        Stage.PREFILL: work.prefill,
        Stage.DECODE: work.decode,
    }
    present = [s for s in STAGES if multimodal or s is not Stage.VISION]
    # Samples of every (stage, share, grid point), pooled over the passes.
    samples: dict[tuple[Stage, float, tuple[int, ...]], list[float]] = {}

    def measure(stage: Stage, share: float, pass_index: int) -> None:
        """One sweep of ``stage``'s grid at ``share``; runs on the stage's worker thread."""
        ctx = share_context(share) if share_context is not None else contextlib.nullcontext()
        n_warm = warmup if pass_index == 0 else 0
        with ctx:
            for point in itertools.product(*axis_values[stage]):
                if through == "executor":  # a new mix of shapes per sample (variant)
                    samples.setdefault((stage, share, point), []).extend(
                        time_varied(
                            dev,
                            functools.partial(makers[stage], *point),  # (variant)
                            n_warm,
                            repeats,
                            first_variant=pass_index * (warmup + repeats),
                        )
                    )
                    continue
                with (
                    makers[stage](*point) as job,
                    dev.own_stream() if share_context is None else contextlib.nullcontext(),
                ):
                    samples.setdefault((stage, share, point), []).extend(
                        dev.time_s(job, n_warm, repeats)
                    )

    corun_factor: dict[str, dict[str, float]] = {}
    corun_raw: dict[str, dict[str, dict[str, float]]] = {}
    corun_works = {
        Stage.VISION: (work.vision, (grid.corun_images,)),
        Stage.PREFILL: (work.prefill, (grid.corun_prefill_tokens, 1)),
        Stage.DECODE: (work.decode, (grid.corun_decode_batch, grid.corun_decode_context)),
    }
    try:
        for pass_index in range(passes):
            for stage in present:
                for share in shares:
                    threads.run(stage, functools.partial(measure, stage, share, pass_index))
        if corun:
            for a in present:
                for b in present:
                    if a is b:
                        continue
                    make_a, args_a = corun_works[a]
                    make_b, args_b = corun_works[b]
                    with make_a(*args_a) as job_a, make_b(*args_b) as job_b:
                        # a on its stage's worker thread, b looping on another thread
                        alone, together = threads.run(
                            a, lambda: time_corun(dev, job_a, job_b, warmup, repeats, stat)
                        )
                    corun_factor.setdefault(a.value, {})[b.value] = round(
                        max(1.0, together / alone), 4
                    )
                    corun_raw.setdefault(a.value, {})[b.value] = {
                        "alone_s": alone,
                        "corun_s": together,
                    }
    finally:
        threads.close()
    stages: dict[str, Any] = {}
    for stage in present:
        axes = axis_values[stage]
        tables = []
        for share in shares:

            def at(*point: int, _share: float = share, _stage: Stage = stage) -> float:
                return stat(samples[(_stage, _share, point)])

            tables.append(
                [at(x) for x in axes[0]]
                if len(axes) == 1
                else [[at(x, y) for y in axes[1]] for x in axes[0]]
            )
        stages[stage.value] = {
            "axes": list(STAGE_AXES[stage]),
            "grid": [list(a) for a in axes],
            "shares": list(shares),
            "latency_s": tables,
        }
        log.info("profiled %s: %s", stage.value, tables[-1])

    name = device_name(torch_device)
    gpu = device_gpu_spec(torch_device)
    spec: dict[str, Any] | None = None
    with contextlib.suppress(ValueError):
        spec = ModelSpec.from_dir(loaded.model_dir, name=str(model)).to_dict()
    metadata = {
        "model": str(model),
        "model_dir": str(loaded.model_dir),
        "architecture": loaded.architecture,
        "load_format": load_format,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "device": torch_device.type,
        "device_name": name,
        "gpu": gpu.name,
        "gpu_spec": dataclasses.asdict(gpu),
        "torch_version": torch.__version__,
        "num_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "quick": quick,
        "warmup": warmup,
        "repeats": repeats,
        "passes": passes,
        "statistic": statistic,
        "timed": (
            "TorchExecutor.execute on mixed-shape batches (sampling and image-embedding "
            "hand-off included), each stage on its own worker thread"
            if through == "executor"
            else "runner.encode_images / runner.forward on uniform shapes"
        ),
        # 1-minute load average before / after: well above num_threads means other processes
        # competed for the cores and the numbers are inflated.
        "loadavg_1min": [load_before, loadavg_1min()],
        "block_size": block_size,
        "corun_works": {s.value: list(args) for s, (_, args) in corun_works.items()},
        "corun_raw": corun_raw,
        "profiling_wall_s": round(time.monotonic() - started, 1),
        "model_spec": spec,
    }
    return {
        "format": PROFILE_FORMAT,
        "version": PROFILE_VERSION,
        "metadata": metadata,
        "stages": stages,
        "corun_mode": "shared",
        "corun_factor": corun_factor,
    }
