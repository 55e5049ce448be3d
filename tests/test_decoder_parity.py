"""Our paged-KV decoder against transformers, logit for logit (fp32, atol 1e-4)."""

from __future__ import annotations

import pytest
import torch

from nova.models.loader import load_model
from nova.runtime.forward_batch import SeqInput, build_forward_batch
from nova.runtime.runner import CacheConfig, ModelRunner

ATOL = 1e-4  # fp32; observed max |diff| is ~1e-6
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], list(range(20, 39)), [99]]


def _hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(input_ids=torch.tensor([ids])).logits[0].float()


def _hf_text_model(kind: str, path):
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration

    if kind.startswith("llava"):
        return LlavaForConditionalGeneration.from_pretrained(path).eval()
    return AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.mark.parametrize("kind", ["llama", "llama3", "qwen2", "llava-clip", "llava-siglip-qwen2"])
@pytest.mark.parametrize("block_size", [4, 16])
def test_batched_prefill_then_decode_match_transformers(tiny_dirs, kind, block_size):
    hf = _hf_text_model(kind, tiny_dirs[kind])
    loaded = load_model(tiny_dirs[kind])
    runner = ModelRunner(loaded, CacheConfig(block_size=block_size, num_blocks=128))
    bm = runner.block_manager
    seqs = [SeqInput(p, 0, bm.allocate(str(i), len(p))) for i, p in enumerate(PROMPTS)]
    batch = build_forward_batch(seqs, block_size, "cpu", runner.attention)
    with torch.inference_mode():
        ours = loaded.model.decoder.compute_logits(loaded.model.forward(batch, runner.kv_cache))
    offset = 0
    for p in PROMPTS:  # every position of every prompt, not only the last
        torch.testing.assert_close(
            ours[offset : offset + len(p)], _hf_logits(hf, p), atol=ATOL, rtol=0
        )
        offset += len(p)

    # Several decode steps of the batch, each sequence at a different position.
    histories = [list(p) for p in PROMPTS]
    for step in range(4):
        seqs = []
        for i, hist in enumerate(histories):
            hist.append(50 + 7 * i + step)
            bm.grow(str(i), len(hist))
            seqs.append(SeqInput([hist[-1]], len(hist) - 1, bm.block_table(str(i))))
        logits = runner.forward(seqs)
        for i, hist in enumerate(histories):
            torch.testing.assert_close(logits[i], _hf_logits(hf, hist)[-1], atol=ATOL, rtol=0)
    bm.check_integrity()


def test_chunked_prefill_equals_one_shot(tiny_dirs):
    """A prompt prefilled in two chunks (second chunk attends the cached first) = one shot."""
    loaded = load_model(tiny_dirs["qwen2"])
    runner = ModelRunner(loaded, CacheConfig(block_size=4, num_blocks=64))
    prompt = list(range(30, 53))
    one = runner.forward([SeqInput(prompt, 0, runner.block_manager.allocate("a", len(prompt)))])
    table = runner.block_manager.allocate("b", 10)
    runner.forward([SeqInput(prompt[:10], 0, table)])
    runner.block_manager.grow("b", len(prompt))
    two = runner.forward([SeqInput(prompt[10:], 10, runner.block_manager.block_table("b"))])
    torch.testing.assert_close(one, two, atol=ATOL, rtol=0)
