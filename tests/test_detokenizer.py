"""Incremental detokenization: deltas add up to the whole output's decoding (real SmolLM2
byte-level BPE tokenizer, multi-byte characters split across tokens), and the work per token
does not grow with the output's length."""

from __future__ import annotations

import random

import pytest

from nova.engine.detokenizer import IncrementalDetokenizer


class _Processor:
    """What the detokenizer uses of ``InputProcessor``: ``tokenizer`` and ``decode``."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.decoded_tokens = 0  # tokens decoded in all, to bound the work

    def decode(self, token_ids: list[int]) -> str:
        self.decoded_tokens += len(token_ids)
        if self.tokenizer is None:
            return ""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from nova.models.demo import build_demo_model

    return AutoTokenizer.from_pretrained(build_demo_model())


TEXTS = [
    "Hello there! Tap the 'Settings' icon, then scroll down.",
    "Emoji 🎉🚀 and accents: café, naïve, Zürich — 東京 and Ελληνικά.",
    "  leading spaces\n\nnew lines\ttabs and 1,234.56 numbers",
]


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_add_up_to_the_decoded_output(tokenizer, text):
    ids = tokenizer.encode(text, add_special_tokens=False)
    detok = IncrementalDetokenizer(_Processor(tokenizer))
    deltas = [detok.push([t], final=i == len(ids) - 1) for i, t in enumerate(ids)]
    assert "".join(deltas) == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert all("\ufffd" not in d for d in deltas)  # split characters were held back
    assert detok.token_ids == ids


def test_random_tokens_and_special_tokens(tokenizer):
    rng = random.Random(0)
    vocab = len(tokenizer)
    eos = tokenizer.eos_token_id
    for _ in range(20):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 60))] + [eos]
        detok = IncrementalDetokenizer(_Processor(tokenizer))
        out = "".join(detok.push([t], final=i == len(ids) - 1) for i, t in enumerate(ids))
        assert out == tokenizer.decode(ids, skip_special_tokens=True)


def test_work_per_token_does_not_grow_with_the_output(tokenizer):
    ids = tokenizer.encode(" word" * 400, add_special_tokens=False)
    proc = _Processor(tokenizer)
    detok = IncrementalDetokenizer(proc)
    for t in ids:
        detok.push([t], final=False)
    # each push decodes the window of the last two deltas twice (a few tokens), not the output
    assert proc.decoded_tokens <= 4 * len(ids)


def test_delta_given_all_tokens_and_no_tokenizer(tokenizer):
    ids = tokenizer.encode("one two three", add_special_tokens=False)
    detok = IncrementalDetokenizer(_Processor(tokenizer))
    text = "".join(detok.delta(ids[: i + 1], final=i == len(ids) - 1) for i in range(len(ids)))
    assert text == "one two three"
    silent = IncrementalDetokenizer(_Processor(None))
    assert silent.push([1, 2], final=True) == "" and silent.token_ids == [1, 2]
