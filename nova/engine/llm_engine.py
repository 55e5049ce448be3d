"""``LLMEngine``: a loaded model, its input processor, runner, scheduler and a running
``EngineLoop``, built from an ``EngineConfig``. The offline ``LLM`` and the asyncio
``AsyncEngine`` both sit on it."""

from __future__ import annotations

import dataclasses
import itertools
import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from nova.config import EngineConfig
from nova.core.encoder_cache import EncoderCacheAccounting
from nova.core.policy import StageLimits, make_policy
from nova.core.scheduler import Scheduler
from nova.cost.base import CostModel
from nova.engine.client import EngineDescription, EngineSnapshot
from nova.engine.loop import EngineLoop, Listener
from nova.executor.base import FaultHook
from nova.executor.torch_executor import TorchExecutor
from nova.gpu.partition import make_backend
from nova.models.inputs import InputProcessor, PromptInput
from nova.models.loader import LoadedModel, load_model, missing_image_processor
from nova.runtime.cpu_linear import packed_weight_bytes
from nova.runtime.runner import CacheConfig, ModelRunner
from nova.runtime.warmup import WarmUpReport, blank_image_pixels, warm_up
from nova.sampling_params import GenerationDefaults, SamplingParams
from nova.types import Request

log = logging.getLogger(__name__)
T = TypeVar("T")


def device_gpu_spec(device: str) -> str:
    """The GPU spec name (``nova.cost.gpus``) of the device, or "cpu"; unknown GPUs: h100-sxm."""
    if device.startswith("cpu"):
        return "cpu"
    import torch

    from nova.cost.gpus import gpu_spec_name_for_device

    name = torch.cuda.get_device_name(torch.device(device))
    return gpu_spec_name_for_device(name) or "h100-sxm"


def default_cost_model(
    loaded: LoadedModel, device: str, min_pixels: int | None = None, max_pixels: int | None = None
) -> CostModel:
    """The cost model the ``nova`` policy plans with for this model on this device: the shipped
    profile measured in the model's dtype on this very device (CPU model or GPU name) if there
    is one, else on such a device (a warning names both devices)
    (``nova.cost.profiled.shipped_profile_for``: ``nova profile``; the demo model on the CPU
    has fp32 and bf16 profiles; a shipped config such as ``qwen2.5-vl-7b`` is named by
    its directory), else the roofline for the model's shape on the device's GPU spec (a
    dynamic-resolution model sized with the server's pixel limits)."""
    from nova.cost.base import make_cost_model
    from nova.cost.model_spec import ModelSpec
    from nova.cost.profiled import profile_device_name, shipped_profile_for
    from nova.profiling.device import device_name

    gpu = device_gpu_spec(device)
    name = "demo" if loaded.model_dir.name.startswith("demo-") else loaded.model_dir.name
    this_device = device_name(device)
    profile = shipped_profile_for(name, gpu, str(loaded.dtype).removeprefix("torch."), this_device)
    if profile is not None:
        measured_on = profile_device_name(profile)
        if measured_on is not None and measured_on != this_device:
            log.warning(
                "the nova policy plans with %s, measured on %r, not on this %r: its stage "
                "times may be several times off here ('nova profile' measures this device's)",
                profile.name,
                measured_on,
                this_device,
            )
        return make_cost_model("profiled", gpu, name, path=profile)
    spec = ModelSpec.from_dir(loaded.model_dir)
    if spec.dynamic_resolution and (min_pixels is not None or max_pixels is not None):
        spec = spec.with_pixel_limits(min_pixels, max_pixels)
    if gpu == "cpu":  # the cores this process may use play the SMs (CPU partitions)
        from nova.cost.gpus import cpu_spec
        from nova.gpu.cpu_threads import available_cores

        return make_cost_model("roofline", cpu_spec(len(available_cores())), spec)
    return make_cost_model("roofline", gpu, spec)


def _on_fresh_thread_if_cpu(device: str, fn: Callable[[], T]) -> T:
    """On a CPU, ``fn()`` (model loading, KV-cache allocation: many parallel ops) runs on a
    thread that ends afterwards, so the OpenMP pool those ops start does not outlive it and
    count against the stage workers' pools (``nova.gpu.cpu_threads.TeamThread``)."""
    if not device.startswith("cpu"):
        return fn()
    from nova.gpu.cpu_threads import run_in_fresh_thread

    return run_in_fresh_thread(fn)


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig | None = None,
        loaded: LoadedModel | None = None,
        fault_hook: FaultHook | None = None,
    ) -> None:
        self.config = config = config or EngineConfig()
        self.loaded = loaded or _on_fresh_thread_if_cpu(
            config.device,
            lambda: load_model(
                config.model,
                config.load_format,
                config.torch_dtype,
                config.device,
                config.seed,
                config.generation_config,
            ),
        )
        self.processor = InputProcessor(
            self.loaded,
            config.max_image_pixels,
            min_pixels=config.min_pixels,
            max_pixels=config.max_pixels,
        )
        # SM partitions (green contexts / streams / cpu): an explicit backend that cannot run
        # here is an error; ``auto`` falls back with a logged reason (nova.gpu.partition).
        self.partition_backend = make_backend(
            config.partition,
            self.loaded.device,
            config.cpu_adapt_threads,
            config.cpu_min_split_cores,
        )
        self.runner = _on_fresh_thread_if_cpu(
            config.device,
            lambda: ModelRunner(
                self.loaded,
                CacheConfig(
                    block_size=config.block_size,
                    num_blocks=config.num_kv_blocks,
                    kv_cache_bytes=config.kv_cache_bytes,
                    prefix_caching=config.prefix_caching,
                    encoder_cache_bytes=config.encoder_cache_bytes,
                ),
                attention_backend=config.attention_backend,
                cuda_graphs=config.cuda_graphs,
                max_num_seqs=config.max_num_seqs,
                vision_offload_layers=config.vision_offload_layers,
            ),
        )
        self.warm_up_report: WarmUpReport | None = None
        if config.warmup:
            self._warm_up()
        log.info("partition backend: %s", self.partition_backend.describe())
        log.info("%s", self.runner.memory)
        limits = StageLimits(
            config.max_vision_images, config.max_prefill_tokens, config.max_num_seqs
        )
        extra: dict[str, Any] = {}
        policy_name = config.resolved_policy
        if policy_name == "nova":
            cost_model = default_cost_model(
                self.loaded, config.device, config.min_pixels, config.max_pixels
            )
            extra = {
                "cost_model": cost_model,
                "image_tokens": max(1, self.processor.num_image_tokens),
            }
            grid = self.partition_backend.grid
            if self.partition_backend.enforces_limits and grid.num_sms > 1:
                # plan on the device's real SM grid (CPU: its cores); with one core there is
                # nothing to split and the stages time-share it
                extra["sm_granularity_share"] = grid.share_step
        policy = make_policy(policy_name, limits=limits, **extra)
        if self.partition_backend.enforces_limits and hasattr(policy, "partition_set"):
            self.partition_backend.prepare(policy.partition_set())  # created once, up front
        # One accounting of the one KV cache: the scheduler owns the runner's block manager
        # (nothing else may allocate from it while the loop runs).
        dcfg = self.loaded.model.decoder.cfg
        embed_bytes = dcfg.hidden_size * self.loaded.model.decoder.lm_head.weight.element_size()
        self.scheduler = Scheduler(
            policy,
            self.runner.block_manager,
            self.loaded.eos_token_ids,
            self.loaded.max_model_len,
            EncoderCacheAccounting(config.encoder_cache_bytes, embed_bytes),
        )
        self.executor = TorchExecutor(self.runner, fault_hook, self.partition_backend)
        # Images are keyed when either cache is on; the encoder cache's entries are looked up
        # while a request is prepared, so a hit skips decoding and preprocessing too.
        self.processor.hash_images = config.prefix_caching or config.encoder_cache_bytes > 0
        if config.encoder_cache_bytes > 0:
            self.processor.encoder_store = self.executor.encoder_store
        self.loop = EngineLoop(
            self.scheduler,
            self.executor,
            arrival_wait_s=config.resolved_arrival_wait_s,
            successor_hold=config.successor_hold,
        )
        self._ids = itertools.count()

    def _warm_up(self) -> None:
        """One forward per stage before serving (``nova.runtime.warmup``), on a thread that
        ends (CPU, as for loading); the packed weights it makes join the memory report."""
        proc = self.processor
        token_id = 1 if proc.image_token_id == 0 else 0
        report = _on_fresh_thread_if_cpu(
            self.config.device,
            lambda: warm_up(self.runner, blank_image_pixels(proc), token_id),
        )
        self.warm_up_report = report
        packed = packed_weight_bytes(self.loaded.model)
        if packed:
            self.runner.memory = dataclasses.replace(
                self.runner.memory, weights_packed_bytes=packed
            )
        log.info("%s", report.line())

    def unservable_reason(self) -> str | None:
        """Why this model cannot be served over the API as loaded (a multimodal checkpoint
        without its image processor: every image request would fail), or None. Dummy
        weights serve shapes only and pass."""
        if self.loaded.load_format == "dummy":
            return None
        return missing_image_processor(self.loaded)

    def start(self) -> LLMEngine:
        self.loop.start()
        return self

    def stop(self) -> None:
        self.loop.stop()
        self.partition_backend.close()

    # -- what a front end asks (nova.engine.client.EngineClient, through AsyncEngine) ---------
    @property
    def max_model_len(self) -> int:
        return int(self.loaded.max_model_len)

    @property
    def sampling_defaults(self) -> GenerationDefaults:
        return self.loaded.generation_defaults

    def check_admissible(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Raise ``RequestRejected`` if such a request could never be served (reads only
        fixed sizes: safe without the loop's lock)."""
        self.scheduler.check_admissible(num_prompt_tokens, max_tokens)

    def is_healthy(self) -> bool:
        return self.loop.is_running

    def snapshot(self) -> EngineSnapshot:
        """The loop's scheduler state plus the start-up memory accounting and the SMs each
        stage last ran on."""
        memory = {
            k: v
            for k, v in self.runner.memory.as_dict().items()
            if isinstance(v, int) and not isinstance(v, bool)
        }
        return dataclasses.replace(
            self.loop.snapshot(),
            memory_bytes=memory,
            granted_sms=dict(self.executor.granted_sms),
        )

    def describe(self) -> EngineDescription:
        bm = self.scheduler.block_manager
        return EngineDescription(
            model=str(self.loaded.model_dir),
            architecture=str(self.loaded.architecture),
            max_model_len=self.max_model_len,
            num_kv_blocks=bm.num_blocks,
            block_size_tokens=bm.block_size,
            policy=self.config.resolved_policy,
            memory_lines=tuple(self.runner.memory.lines()),
            partition_backend=self.partition_backend.describe(),
        )

    def abort(self, request_id: str) -> bool:
        """Abort a live request; False if unknown or already done."""
        return self.loop.abort(request_id)

    def wait_idle(self, timeout_s: float | None = None) -> bool:
        """Block until every submitted request is done; False on timeout."""
        return self.loop.wait_idle(timeout_s)

    def run_all(
        self,
        prompts: Sequence[PromptInput],
        sampling: SamplingParams | Sequence[SamplingParams | None] | None = None,
        request_ids: Sequence[str] | None = None,
    ) -> list[Request]:
        """Start the engine, submit every prompt at once, wait until all are done, stop.

        A prompt the scheduler rejects aborts the ones already submitted and re-raises.
        """
        params = list(sampling) if isinstance(sampling, Sequence) else [sampling] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} sampling params for {len(prompts)} prompts")
        ids = list(request_ids) if request_ids is not None else [None] * len(prompts)
        requests: list[Request] = []
        self.start()
        try:
            for prompt, sp, rid in zip(prompts, params, ids):
                try:
                    requests.append(self.submit(prompt, sp, rid))
                except Exception:
                    for r in requests:
                        self.loop.abort(r.request_id)
                    raise
            self.loop.wait_idle()
        finally:
            self.stop()
        return requests

    def new_request_id(self) -> str:
        return f"req-{next(self._ids)}"

    def submit(
        self,
        prompt: PromptInput,
        sampling: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        deadline_s: float | None = None,
        listener: Listener | None = None,
    ) -> Request:
        return self.submit_group(prompt, sampling, request_id, priority, deadline_s, listener)[0]

    def submit_group(
        self,
        prompt: PromptInput,
        sampling: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
        deadline_s: float | None = None,
        listener: Listener | None = None,
        n: int = 1,
    ) -> list[Request]:
        """Submit ``n`` choices of one prompt: the first request prefills it, the others fork
        from it when its prefill completes (sharing its KV blocks) and sample their own tokens
        (choice i: seed + i when a seed is given). Ids: ``request_id``, then ``request_id-1``
        ... for the other choices. Returns the n requests in choice order."""
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        sampling = sampling or SamplingParams()
        rid = request_id or self.new_request_id()
        images = prompt.image_inputs(self.processor.image_token_id, self.processor.num_image_tokens)
        req = Request(rid, list(prompt.token_ids), sampling, images, priority, deadline_s)
        forks = []
        for i in range(1, n):
            child_sampling = sampling
            if sampling.seed is not None:  # torch seeds are in [-2**63, 2**64): wrap at the top
                seed = sampling.seed + i
                child_sampling = dataclasses.replace(
                    sampling, seed=seed - 2**64 if seed >= 2**64 else seed
                )
            forks.append(
                Request(
                    f"{rid}-{i}",
                    list(prompt.token_ids),
                    child_sampling,
                    images,
                    priority,
                    deadline_s,
                )
            )
        self.loop.add_request(
            req, prompt.pixel_values, listener, forks=forks, supplied=prompt.cached_images
        )
        return [req, *forks]
