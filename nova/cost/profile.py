"""Measure a cost profile with the real runtime (imports torch; the rest of nova.cost does not).

``profile_model`` loads a model (``nova.models.loader.load_model``), builds a ``ModelRunner``
and times, per stage, what the engine's stage workers run (``through="executor"``, the
default): ``TorchExecutor.execute`` on real ``Batch``es, on one long-lived worker thread per
stage, so sampling, the image-embedding hand-off into prefill and the executor's Python are in
the time (``_EngineBatches``). Batch shapes vary like real ones: a prefill point (total
tokens, sequences) is split into mixed lengths, sequences long enough carry a real chat prompt
with a screenshot; a decode point (batch, mean context) gets mixed contexts; every sample is a
new mix. (The previous way, ``through="runner"``, timed bare ``runner.encode_images`` /
``runner.forward`` calls on uniform shapes on the calling thread; on the 2-core CPU real
engine batches took ~1.6x that: worker threads run the same forward up to ~1.3x slower than the
main thread, and the profile took the minimum over identical shapes. It remains the path for
SM-share measurements under ``share_context``.) Each grid point: ``warmup`` untimed runs, then
``repeats`` timed runs, per pass over the grid (``passes``, samples pooled); the table holds
their median (``statistic="min"``: their minimum).

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
``profiles/demo-cpu.json`` records how it was taken in its ``metadata`` (``timed``,
``statistic``, ``loadavg_1min``).

SM shares: only 1.0 unless ``share_context`` is given -- a factory of context managers that
run the enclosed work on a given SM share (e.g. a green-context stream from the executor);
then every share in ``shares`` gets its own table.

The output is the JSON dict that ``nova.cost.profiled.ProfiledCostModel.from_dict`` reads.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import itertools
import json
import logging
import math
import os
import platform
import random
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from nova.cost.gpus import GPUS, GpuSpec, gpu_spec_name_for_device
from nova.cost.model_spec import ModelSpec
from nova.cost.profiled import (
    PROFILE_FORMAT,
    PROFILE_VERSION,
    STAGE_AXES,
    ProfiledCostModel,
    merge_profiles,
)
from nova.types import STAGES, Stage

log = logging.getLogger(__name__)

Job = Callable[[], Any]


@dataclass(slots=True, frozen=True)
class ProfileGrid:
    """Grid points per stage axis (see ``nova.cost.profiled.STAGE_AXES``).

    The default takes ~1.5 minutes for the demo model on 2 CPU cores; ``quick()`` a few
    seconds (for tests and smoke runs). Points a model cannot run (beyond its max length)
    are dropped by ``clipped``.
    """

    num_images: tuple[int, ...] = (1, 2, 4, 8)
    prefill_tokens: tuple[int, ...] = (32, 128, 256, 512, 1024)
    prefill_seqs: tuple[int, ...] = (1, 2, 4)
    decode_batch: tuple[int, ...] = (1, 2, 4, 8, 16)
    decode_context: tuple[int, ...] = (64, 256, 1024)
    # Representative batches for the co-running measurement.
    corun_images: int = 1
    corun_prefill_tokens: int = 256
    corun_decode_batch: int = 4
    corun_decode_context: int = 256

    @classmethod
    def quick(cls) -> ProfileGrid:
        return cls(
            num_images=(1, 2),
            prefill_tokens=(16, 64),
            prefill_seqs=(1, 2),
            decode_batch=(1, 2),
            decode_context=(16, 64),
            corun_images=1,
            corun_prefill_tokens=32,
            corun_decode_batch=2,
            corun_decode_context=32,
        )

    def clipped(self, max_model_len: int) -> ProfileGrid:
        prefill = tuple(t for t in self.prefill_tokens if t <= max_model_len) or (max_model_len,)
        context = tuple(c for c in self.decode_context if c <= max_model_len) or (max_model_len,)
        seqs = tuple(s for s in self.prefill_seqs if s <= prefill[0]) or (1,)
        return dataclasses.replace(
            self,
            prefill_tokens=prefill,
            decode_context=context,
            prefill_seqs=seqs,
            corun_prefill_tokens=min(self.corun_prefill_tokens, max_model_len),
            corun_decode_context=min(self.corun_decode_context, max_model_len),
        )


class _Device:
    """Timing on one device: CUDA work is synchronised on the calling thread's stream."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.is_cuda = device.type == "cuda"

    def sync(self) -> None:
        if self.is_cuda:
            torch.cuda.current_stream(self.device).synchronize()

    @contextlib.contextmanager
    def own_stream(self) -> Iterator[None]:
        if not self.is_cuda:
            yield
            return
        with torch.cuda.stream(torch.cuda.Stream(self.device)):
            yield

    def time_s(self, job: Job, warmup: int, repeats: int) -> list[float]:
        for _ in range(warmup):
            job()
        self.sync()
        samples = []
        for _ in range(repeats):
            start = time.perf_counter()
            job()
            self.sync()
            samples.append(time.perf_counter() - start)
        return samples


class _Workloads:
    """Builds runnable jobs (closures over the runner) for stage batches of given shapes."""

    def __init__(self, loaded: Any, runner: Any) -> None:
        self.loaded = loaded
        self.runner = runner
        self.block_manager = runner.block_manager
        vocab = runner.vocab_size
        image_token = loaded.model.image_token_id
        # Text tokens only: no image placeholders without image embeddings.
        self.token_limit = image_token if image_token is not None and image_token < vocab else vocab
        self._next_seq = 0

    def _seq_id(self) -> str:
        self._next_seq += 1
        return f"profile-{self._next_seq}"

    def _tokens(self, n: int, offset: int = 0) -> list[int]:
        return [(7 * i + 3 + offset) % self.token_limit for i in range(n)]

    @contextlib.contextmanager
    def vision(self, num_images: int) -> Iterator[Job]:
        vc = self.loaded.hf_config.vision_config
        size = int(vc.image_size)
        pixels = torch.randn(num_images, 3, size, size, generator=torch.Generator().manual_seed(0))
        pixels = pixels.to(self.runner.device)
        yield lambda: self.runner.encode_images(pixels)

    @contextlib.contextmanager
    def llm(self, new_tokens: Sequence[int], context_lens: Sequence[int]) -> Iterator[Job]:
        from nova.runtime.forward_batch import SeqInput

        ids = [self._seq_id() for _ in new_tokens]
        try:
            seqs = []
            for i, (n, c) in enumerate(zip(new_tokens, context_lens)):
                table = self.block_manager.allocate(ids[i], c)
                seqs.append(SeqInput(self._tokens(n, offset=i), c - n, table))
            yield lambda: self.runner.forward(seqs)
        finally:
            for sid in ids:
                self.block_manager.free(sid)

    def prefill(self, total_tokens: int, num_seqs: int) -> AbstractContextManager[Job]:
        base, extra = divmod(total_tokens, num_seqs)
        lens = [base + (1 if i < extra else 0) for i in range(num_seqs)]
        return self.llm(lens, lens)

    def decode(self, batch: int, context: int) -> AbstractContextManager[Job]:
        return self.llm([1] * batch, [context] * batch)


def _split(total: int, parts: int, rng: random.Random, minimum: int = 1) -> list[int]:
    """``total`` as ``parts`` integers >= ``minimum`` with random proportions (weights uniform
    in [0.5, 1.5]): the mixed lengths of real batches, with the grid point's exact total."""
    if parts * minimum > total:
        raise ValueError(f"cannot split {total} into {parts} parts of at least {minimum}")
    weights = [rng.uniform(0.5, 1.5) for _ in range(parts)]
    spare = total - parts * minimum
    out = [minimum + int(spare * w / sum(weights)) for w in weights]
    for i in range(total - sum(out)):  # the rounding remainder, one each
        out[i % parts] += 1
    rng.shuffle(out)
    return out


class _EngineBatches:
    """Stage batches timed the way the engine's stage workers run them: ``TorchExecutor.execute``
    on real ``Batch``es, so sampling, the image-embedding hand-off (prefill), the executor's
    bookkeeping and the Python around the model are in the time, not only the forward.

    Shapes vary like real batches: a prefill grid point ``(tokens, seqs)`` is split into
    sequences of random, mixed lengths with that total, and a sequence long enough to hold a
    screenshot's placeholders is a real chat prompt with one image (made by the model's
    ``InputProcessor``; its embeddings come from an untimed vision batch first); a decode point
    ``(batch, context)`` gets mixed context lengths with that mean; each sample a new mix
    (``variant``). Setup (KV blocks, payloads, that vision batch, one decode step) is not
    timed.
    """

    SCREENSHOT_SIZE = (280, 280)

    def __init__(self, loaded: Any, runner: Any, seed: int = 0) -> None:
        from nova.executor.torch_executor import TorchExecutor
        from nova.models.inputs import InputProcessor, chat_messages
        from nova.screenshots import make_screenshot

        self.runner = runner
        self.block_manager = runner.block_manager
        self.executor = TorchExecutor(runner)
        self.seed = seed
        image_token = loaded.model.image_token_id
        vocab = runner.vocab_size
        self.token_limit = image_token if image_token is not None and image_token < vocab else vocab
        self._ids = itertools.count()
        self._batch_ids = itertools.count()
        self.image_prompt: tuple[int, ...] = ()
        self.image_pixels: Any = None
        if loaded.model.is_multimodal:
            from nova.models.errors import InvalidInputError

            proc = InputProcessor(loaded)
            screenshot = [make_screenshot(seed, *self.SCREENSHOT_SIZE)]
            try:
                prompt = proc.from_chat(
                    chat_messages("Open the settings and turn on Wi-Fi.", num_images=1), screenshot
                )
                self.image_prompt, self.image_pixels = tuple(prompt.token_ids), prompt.pixel_values
            except InvalidInputError:  # no tokenizer / image processor (test models): random
                size = int(loaded.hf_config.vision_config.image_size)  # pixels, text-only prefills
                self.image_pixels = torch.randn(
                    1, 3, size, size, generator=torch.Generator().manual_seed(seed)
                )

    def _text(self, n: int, offset: int) -> list[int]:
        return [(7 * i + 3 + offset) % self.token_limit for i in range(n)]

    def _batch(self, stage: Stage, items: list[Any]) -> Any:
        from nova.types import Batch, Partition

        return Batch(next(self._batch_ids), stage, tuple(items), Partition.shared(), 0.0)

    def _run(self, batch: Any) -> Job:
        def job() -> None:
            out = self.executor.execute(batch)
            if out.failed:  # run_isolated would otherwise time a fallback, not the batch
                raise RuntimeError(f"profiling batch failed: {next(iter(out.failed.values()))}")

        return job

    @contextlib.contextmanager
    def _requests(self, prompts: list[tuple[list[int], Any]]) -> Iterator[list[str]]:
        from nova.sampling_params import SamplingParams

        ids = [f"profile-{next(self._ids)}" for _ in prompts]
        try:
            for rid, (tokens, pixels) in zip(ids, prompts):
                self.executor.register(
                    rid, SamplingParams(max_tokens=64, ignore_eos=True), pixels, tuple(tokens)
                )
            yield ids
        finally:
            for rid in ids:
                self.executor.release(rid)
                self.block_manager.free(rid)

    def _vision_items(self, ids: list[str]) -> list[Any]:
        from nova.types import BatchItem

        return [BatchItem(rid, num_images=1) for rid in ids]

    @contextlib.contextmanager
    def vision(self, num_images: int, variant: int = 0) -> Iterator[Job]:
        """``num_images`` requests of one screenshot each (the engine batches requests)."""
        with self._requests([(list(self.image_prompt), self.image_pixels)] * num_images) as ids:
            yield self._run(self._batch(Stage.VISION, self._vision_items(ids)))

    @contextlib.contextmanager
    def prefill(self, total_tokens: int, num_seqs: int, variant: int = 0) -> Iterator[Job]:
        from nova.types import BatchItem

        rng = random.Random(f"{self.seed}/prefill/{total_tokens}/{num_seqs}/{variant}")
        lens = _split(total_tokens, num_seqs, rng)
        n_img = len(self.image_prompt)
        prompts = []
        for i, n in enumerate(lens):
            if n_img and n >= n_img:  # a chat prompt with a screenshot, text appended to length
                prompts.append(
                    (list(self.image_prompt) + self._text(n - n_img, i), self.image_pixels)
                )
            else:
                prompts.append((self._text(n, i), None))
        with self._requests(prompts) as ids:
            with_image = [rid for rid, (_, px) in zip(ids, prompts) if px is not None]
            if with_image:  # untimed: the embeddings the prefill takes over
                self._run(self._batch(Stage.VISION, self._vision_items(with_image)))()
            items = []
            for rid, (tokens, px) in zip(ids, prompts):
                table = self.block_manager.allocate(rid, len(tokens))
                items.append(
                    BatchItem(rid, tuple(tokens), 0, tuple(table), 1 if px is not None else 0)
                )
            yield self._run(self._batch(Stage.PREFILL, items))

    @contextlib.contextmanager
    def decode(self, batch: int, context: int, variant: int = 0) -> Iterator[Job]:
        from nova.types import BatchItem

        rng = random.Random(f"{self.seed}/decode/{batch}/{context}/{variant}")
        contexts = (
            _split(batch * context, batch, rng, minimum=min(context, 2)) if batch > 1 else [context]
        )
        with self._requests([(self._text(c - 1, i), None) for i, c in enumerate(contexts)]) as ids:
            items = []
            for i, (rid, c) in enumerate(zip(ids, contexts)):
                table = self.block_manager.allocate(rid, c)
                items.append(BatchItem(rid, (self._text(1, c + i)[0],), c - 1, tuple(table)))
            job = self._run(self._batch(Stage.DECODE, items))
            # Untimed once first: a decoding sequence's KV blocks were touched by its prefill and
            # earlier steps, while fresh blocks of a new variant are not (first-touch page faults
            # made one-shot steps ~15% slower than the engine's steps). The step is idempotent.
            job()
            yield job


class _StageThreads:
    """One long-lived worker thread per stage, like the engine's stage workers: timings taken
    on the main thread were up to ~1.3x faster than the same forward on a worker thread
    (measured on the 2-core CPU), and the engine only ever runs batches on its workers."""

    def __init__(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self._pools = {
            s: ThreadPoolExecutor(1, thread_name_prefix=f"nova-profile-{s.value}") for s in Stage
        }

    def run(self, stage: Stage, fn: Callable[[], Any]) -> Any:
        return self._pools[stage].submit(fn).result()

    def close(self) -> None:
        for pool in self._pools.values():
            pool.shutdown()


def _time_varied(
    dev: _Device,
    make: Callable[[int], AbstractContextManager[Job]],
    warmup: int,
    repeats: int,
    first_variant: int,
) -> list[float]:
    """``repeats`` timed runs (after ``warmup`` untimed ones), each of a new variant of the
    batch (``make(variant)``); only the run is timed, not the setup."""
    samples = []
    for i in range(warmup + repeats):
        with make(first_variant + i) as job:
            dev.sync()
            start = time.perf_counter()
            job()
            dev.sync()
            if i >= warmup:
                samples.append(time.perf_counter() - start)
    return samples


STATISTICS: dict[str, Callable[[Sequence[float]], float]] = {
    "median": lambda xs: float(statistics.median(xs)),
    # On a machine shared with other processes, the fastest run is the least disturbed one.
    "min": lambda xs: float(min(xs)),
}


class _Background:
    """A worker thread that runs ``job`` in a loop while switched on (CUDA: on its own stream).

    The thread lives across switches: starting and joining a thread per sample disturbed the
    samples right after it on CPU (the OpenMP pool of the dead thread), so ``on()`` only
    toggles an event."""

    def __init__(self, dev: _Device, job: Job) -> None:
        self._dev, self._job = dev, job
        self._on, self._idle, self._busy, self._quit = (threading.Event() for _ in range(4))
        self._errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._loop, name="nova-profile-corun", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        try:
            with self._dev.own_stream():
                while not self._quit.is_set():
                    if not self._on.is_set():
                        self._idle.set()
                        self._on.wait(0.01)
                        continue
                    self._idle.clear()
                    self._busy.set()
                    self._job()
                    self._dev.sync()
        except BaseException as exc:  # noqa: BLE001 - re-raised by the measuring thread
            self._errors.append(exc)
        finally:
            self._idle.set()
            self._busy.set()

    def _check(self) -> None:
        if self._errors:
            raise RuntimeError(f"co-running job failed: {self._errors[0]!r}") from self._errors[0]

    @contextlib.contextmanager
    def on(self) -> Iterator[None]:
        """The body runs while the job runs in a loop; on exit, waits for the job in flight."""
        self._busy.clear()
        self._on.set()
        self._busy.wait()
        try:
            yield
        finally:
            self._on.clear()
            self._idle.wait()
        self._check()

    def close(self) -> None:
        self._quit.set()
        self._thread.join()
        self._check()


def _corun(
    dev: _Device,
    job: Job,
    background: Job,
    warmup: int,
    repeats: int,
    stat: Callable[[Sequence[float]], float],
) -> tuple[float, float]:
    """(latency alone, latency while ``background`` runs in a loop in another thread).

    Alone and co-running samples alternate, so slow drifts in the machine's load (other
    processes) hit both sides alike instead of skewing the ratio."""
    with dev.own_stream():
        dev.time_s(job, warmup, 0)
    alone: list[float] = []
    together: list[float] = []
    bg = _Background(dev, background)
    try:
        for _ in range(max(3, repeats)):
            with dev.own_stream():
                alone += dev.time_s(job, 0, 1)
            with bg.on(), dev.own_stream():
                together += dev.time_s(job, 0, 1)
    finally:
        bg.close()
    return stat(alone), stat(together)


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _gpu_spec(device: torch.device, name: str) -> GpuSpec:
    """The registered GPU this device is, or an ad-hoc spec (SM count read from the device)."""
    if device.type != "cuda":
        return GPUS["cpu"]
    registered = gpu_spec_name_for_device(name)
    if registered is not None:
        return GPUS[registered]
    lowered = name.lower()
    props = torch.cuda.get_device_properties(device)
    return GpuSpec(
        name=lowered.replace(" ", "-"),
        num_sms=props.multi_processor_count,
        sm_granularity=8 if props.major >= 9 else 2,
        min_partition_sms=8 if props.major >= 9 else 4,
        bf16_dense_tflops=1.0,
        hbm_gbps=1.0,
        pcie_gbps=1.0,
        memory_gib=props.total_memory / 2**30,
        description=f"{name}: not in nova.cost.gpus; throughput figures are placeholders",
    )


def _kv_blocks_needed(grid: ProfileGrid, block_size: int) -> int:
    def blocks(n_seqs: int, tokens_each: int) -> int:
        return n_seqs * math.ceil(tokens_each / block_size)

    decode = blocks(max(grid.decode_batch), max(grid.decode_context))
    prefill = max(grid.prefill_seqs) + blocks(1, max(grid.prefill_tokens))
    corun = blocks(grid.corun_decode_batch, grid.corun_decode_context) + blocks(
        1, grid.corun_prefill_tokens
    )
    # + one partial block per sequence of the mixed-length variants (same totals, own roundings)
    return max(decode, prefill, corun) + 8 + max(grid.decode_batch) + grid.corun_decode_batch


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
    ``dtype``: default float32 on CPU, bfloat16 on CUDA.
    ``through``: ``executor`` (default): time ``TorchExecutor.execute`` on real batches of
    mixed shapes, each stage on its own worker thread (``_EngineBatches``: what the engine
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
    dtype = dtype or (torch.bfloat16 if torch_device.type == "cuda" else torch.float32)
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
    load_before = _loadavg()

    loaded = load_model(model, load_format=load_format, dtype=dtype, device=torch_device)
    grid = (grid or (ProfileGrid.quick() if quick else ProfileGrid())).clipped(loaded.max_model_len)
    runner = ModelRunner(
        loaded, CacheConfig(block_size=block_size, num_blocks=_kv_blocks_needed(grid, block_size))
    )
    work: Any = (
        _EngineBatches(loaded, runner) if through == "executor" else _Workloads(loaded, runner)
    )
    dev = _Device(torch_device)
    threads = _StageThreads()
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
                        _time_varied(
                            dev,
                            lambda v, _p=point: makers[stage](*_p, variant=v),
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
                    threads.run(stage, lambda s=stage, f=share, i=pass_index: measure(s, f, i))
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
                            a, lambda: _corun(dev, job_a, job_b, warmup, repeats, stat)
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

    name = _device_name(torch_device)
    gpu = _gpu_spec(torch_device, name)
    spec: dict[str, Any] | None = None
    with contextlib.suppress(ValueError):
        spec = ModelSpec.from_dir(loaded.model_dir, name=str(model)).to_dict()
    metadata = {
        "model": str(model),
        "model_dir": str(loaded.model_dir),
        "architecture": loaded.architecture,
        "load_format": load_format,
        "dtype": str(dtype).removeprefix("torch."),
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
        "loadavg_1min": [load_before, _loadavg()],
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


def summarize(profile: dict[str, Any]) -> str:
    """A few lines for humans: the corners of each table and the co-running factors."""
    meta = profile.get("metadata", {})
    lines = [
        f"profile of {meta.get('model')} on {meta.get('device_name')} "
        f"({meta.get('dtype')}, torch {meta.get('torch_version')}, "
        f"{meta.get('profiling_wall_s')} s)"
    ]
    for stage, table in profile["stages"].items():
        grid, lat = table["grid"], table["latency_s"][-1]
        if len(grid) == 1:
            cells = ", ".join(f"{x:g}: {v * 1e3:.1f} ms" for x, v in zip(grid[0], lat))
        else:
            cells = ", ".join(
                f"({x:g}, {y:g}): {lat[i][j] * 1e3:.1f} ms"
                for i, x in enumerate(grid[0])
                for j, y in enumerate(grid[1])
                if i in (0, len(grid[0]) - 1) and j in (0, len(grid[1]) - 1)
            )
        lines.append(f"  {stage} {tuple(table['axes'])}: {cells}")
    for stage, row in profile.get("corun_factor", {}).items():
        lines.append(f"  corun {stage}: " + ", ".join(f"with {o} x{f:.2f}" for o, f in row.items()))
    return "\n".join(lines)


def _share_args(args: argparse.Namespace) -> dict[str, Any]:
    """``--partition`` / ``--shares``: SM shares measured through a partition backend
    (nova.gpu.partition; green contexts on a GPU that has them)."""
    shares = tuple(float(x) for x in args.shares.split(",")) if args.shares else (1.0,)
    if args.partition is None:
        return {"shares": shares}
    from nova.gpu.partition import backend_share_context

    return {"shares": shares, "share_context": backend_share_context(args.partition, args.device)}


def _cmd_profile(args: argparse.Namespace) -> int:
    if args.merge:
        profile = merge_profiles(
            [json.loads(Path(f).read_text()) for f in args.merge],
            table_statistic=args.statistic or "min",
        )
    else:
        profile = profile_model(
            args.model,
            args.device,
            quick=args.quick,
            warmup=args.warmup,
            repeats=args.repeats,
            load_format=args.load_format,
            num_threads=args.threads,
            statistic=args.statistic or "median",
            passes=args.passes,
            through=args.through,
            **_share_args(args),
        )
    out = (
        Path(args.out)
        if args.out
        else Path(
            f"{Path(str(profile['metadata']['model'])).name}-{profile['metadata']['gpu']}.json"
        )
    )
    model = ProfiledCostModel.from_dict(profile)  # validates what we are about to write
    model.save(out)
    print(summarize(profile))
    print(f"wrote {out}")
    return 0


def add_profile_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``profile`` subcommand on an ``argparse`` subparsers object."""
    p = subparsers.add_parser(
        "profile", help="measure stage latency tables for the profiled cost model"
    )
    p.add_argument("--model", default="demo", help="'demo', a model directory or a shipped config")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="output JSON (default: ./<model>-<gpu>.json)")
    p.add_argument("--quick", action="store_true", help="tiny grid, for smoke tests")
    p.add_argument("--load-format", default="auto", choices=("auto", "safetensors", "dummy"))
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--passes", type=int, default=1, help="sweeps of the grid, samples pooled")
    p.add_argument(
        "--statistic",
        default=None,
        choices=sorted(STATISTICS),
        help="summary of the samples (default median; min resists noise from other "
        "processes); with --merge: of the merged tables (default min)",
    )
    p.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="PROFILE",
        help="measure nothing: merge these profile files (same model and grid)",
    )
    p.add_argument(
        "--through",
        default=None,
        choices=("executor", "runner"),
        help="time TorchExecutor.execute on mixed-shape batches on stage worker threads "
        "(default; what the engine runs) or the bare runner calls on uniform shapes "
        "(default with --partition)",
    )
    p.add_argument(
        "--partition",
        default=None,
        choices=("auto", "green_context", "none", "cpu"),
        help="SM partition backend that runs each share (needed for --shares < 1)",
    )
    p.add_argument(
        "--shares",
        default=None,
        metavar="S1,S2,...",
        help="SM shares to measure, e.g. 0.25,0.5,1.0 (default 1.0)",
    )
    p.set_defaults(func=_cmd_profile)
    return p
