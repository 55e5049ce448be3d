"""``NovaEngine``: a loaded model, its input processor and a running ``Engine``, built from an
``EngineConfig``. The offline ``LLM`` and the asyncio ``AsyncEngine`` both sit on it."""
from __future__ import annotations

import hashlib
import itertools
from typing import Any

from nova.config import EngineConfig
from nova.core.policy import StageLimits, make_policy
from nova.core.scheduler import Scheduler
from nova.engine.engine import Engine, Listener
from nova.executor.base import FaultHook
from nova.executor.torch_executor import TorchExecutor
from nova.models.inputs import InputProcessor, PromptInput
from nova.models.loader import LoadedModel, load_model
from nova.runtime.runner import CacheConfig, ModelRunner
from nova.sampling_params import SamplingParams
from nova.types import ImageInput, Request


def image_hash(pixel_values: Any) -> str:
    """Content hash of one image's preprocessed pixels (the encoder-cache key)."""
    data = pixel_values.detach().contiguous().cpu().numpy().tobytes()
    return hashlib.sha256(data).hexdigest()[:32]


class NovaEngine:
    def __init__(
        self,
        config: EngineConfig | None = None,
        loaded: LoadedModel | None = None,
        fault_hook: FaultHook | None = None,
    ) -> None:
        self.config = config = config or EngineConfig()
        self.loaded = loaded or load_model(config.model, config.load_format, config.torch_dtype,
                                           config.device, config.seed)
        self.processor = InputProcessor(self.loaded, config.max_image_pixels)
        self.runner = ModelRunner(self.loaded, CacheConfig(
            block_size=config.block_size, num_blocks=config.num_kv_blocks,
            kv_cache_bytes=config.kv_cache_bytes))
        limits = StageLimits(config.max_vision_images, config.max_prefill_tokens, config.max_num_seqs)
        policy = make_policy(config.policy, limits=limits)
        # One accounting of the one KV cache: the scheduler owns the runner's block manager
        # (the offline runtime loop in nova.runtime.generate must not run beside the engine).
        self.scheduler = Scheduler(
            policy, self.runner.block_manager, self.loaded.eos_token_ids, self.loaded.max_model_len)
        self.executor = TorchExecutor(self.runner, fault_hook)
        self.engine = Engine(self.scheduler, self.executor)
        self._ids = itertools.count()

    def start(self) -> NovaEngine:
        self.engine.start()
        return self

    def stop(self) -> None:
        self.engine.stop()

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
        images = []
        if prompt.pixel_values is not None:
            per_image = self.processor.num_image_tokens
            images = [ImageInput(image_hash(px), per_image) for px in prompt.pixel_values]
        req = Request(request_id or self.new_request_id(), list(prompt.token_ids),
                      sampling or SamplingParams(), images, priority, deadline_s)
        self.engine.add_request(req, prompt.pixel_values, listener)
        return req
