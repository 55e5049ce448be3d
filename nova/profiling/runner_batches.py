"""The bare-runner timing harness: ``runner.encode_images`` / ``runner.forward`` calls on
uniform shapes, timed on the calling thread. No sampling, no executor: the path for SM-share
measurements (``share_context`` is entered around the runner calls; the executor would pick its
own partition). On the 2-core CPU real engine batches took ~1.6x these times (worker threads
run the same forward up to ~1.3x slower than the main thread, and uniform shapes are the
kindest case), which is why ``engine_batches`` is the default."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import torch

from nova.profiling.grid import TextTokens
from nova.profiling.timing import Job

if TYPE_CHECKING:
    from nova.models.loader import LoadedModel
    from nova.runtime.runner import ModelRunner


class RunnerBatches:
    """Builds runnable jobs (closures over the runner) for stage batches of given shapes."""

    def __init__(self, loaded: LoadedModel, runner: ModelRunner) -> None:
        self.loaded = loaded
        self.runner = runner
        self.block_manager = runner.block_manager
        self._tokens = TextTokens(runner.vocab_size, loaded.model.image_token_id)
        self._next_seq = 0

    def _seq_id(self) -> str:
        self._next_seq += 1
        return f"profile-{self._next_seq}"

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
