"""The engine-batch timing harness (the default): stage batches timed the way the engine's stage
workers run them, ``TorchExecutor.execute`` on real ``Batch``es of mixed shapes."""

from __future__ import annotations

import contextlib
import itertools
import random
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from nova.profiling.grid import TextTokens, split_total
from nova.profiling.timing import Job
from nova.types import Stage

if TYPE_CHECKING:
    from nova.models.loader import LoadedModel
    from nova.runtime.runner import ModelRunner


class EngineBatches:
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

    def __init__(self, loaded: LoadedModel, runner: ModelRunner, seed: int = 0) -> None:
        from nova.executor.torch_executor import TorchExecutor
        from nova.gpu.partition import make_backend
        from nova.models.inputs import InputProcessor, chat_messages
        from nova.screenshots import make_screenshot

        self.runner = runner
        self.block_manager = runner.block_manager
        # the profile times stages beside each other as asked (its co-run factors), so on a
        # CPU the backend splits the cores instead of making them take turns; and on every
        # core: a thread count cut for other processes' load would time a smaller machine
        on_cuda = runner.device.type == "cuda"
        backend = make_backend(
            "none" if on_cuda else "cpu",
            runner.device,
            cpu_adapt_threads=False,
            cpu_min_split_cores=1,
        )
        self.executor = TorchExecutor(runner, partition_backend=backend)
        self.seed = seed
        self._text = TextTokens(runner.vocab_size, loaded.model.image_token_id)
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
        lens = split_total(total_tokens, num_seqs, rng)
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
            split_total(batch * context, batch, rng, minimum=min(context, 2))
            if batch > 1
            else [context]
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
