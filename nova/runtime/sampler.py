"""Pick next tokens from logits, per request: greedy, temperature, top-k, top-p, seeded."""

from __future__ import annotations

import torch

from nova.sampling_params import SamplingParams


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """A per-request RNG: seeded requests replay identically whatever they are batched with."""
    if params.is_greedy:
        return None
    seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
    return torch.Generator(device="cpu").manual_seed(seed)


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities [vocab] after temperature, top-k and top-p (float32)."""
    logits = logits.float() / params.temperature
    if params.top_k is not None and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        sorted_probs = sorted_logits.softmax(-1)
        # Drop a token when the mass of strictly more likely tokens already reaches top_p;
        # the most likely token is always kept.
        drop = (sorted_probs.cumsum(-1) - sorted_probs) >= params.top_p
        drop[0] = False  # even when a tiny top_p rounds to 0 in float32
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits.softmax(-1)


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> list[int]:
    """logits [B, vocab] -> one token id per row."""
    if logits.shape[0] != len(params):
        raise ValueError(f"{logits.shape[0]} logit rows for {len(params)} requests")
    greedy = logits.argmax(-1).tolist()
    out: list[int] = []
    for row, (p, gen) in enumerate(zip(params, generators)):
        if p.is_greedy:
            out.append(int(greedy[row]))
            continue
        probs = filtered_probs(logits[row].cpu(), p)
        out.append(int(torch.multinomial(probs, 1, generator=gen).item()))
    return out
