"""Batched sampling: logits [B, vocab] -> one token per row, and its log-probabilities.

Every step below is one set of tensor ops over the rows that need it (no Python loop over
vocabulary-sized rows); a row's result depends only on its own logits, parameters, history and
RNG, never on what else is in the batch. In order:

1. ``allowed_token_bitmask`` (structured output): tokens whose bit is 0 get -inf. The mask is
   int32, packed 32 tokens a word, token ``t`` allowed iff ``(mask[row, t // 32] >> (t % 32))
   & 1`` (llguidance's and xgrammar's layout), shape [B, ceil(vocab / 32)]; a row of all -1
   words is unconstrained.
2. Penalties: ``repetition_penalty`` over the tokens of the prompt and the output (a positive
   logit is divided by it, a negative one multiplied), then ``presence_penalty`` and
   ``frequency_penalty`` over the output tokens (OpenAI: ``logit -= presence * (count > 0) +
   frequency * count``).
3. ``logit_bias`` is added.
4. ``min_tokens``: while a request has fewer outputs, its EOS ids (unless ``ignore_eos``) and
   ``stop_token_ids`` get -inf, unless that would leave the row no token at all (the mask of
   step 1 wins: a grammar that only allows EOS ends the output).

   The result is the *processed logits*. Log-probabilities (``SamplingParams.logprobs``) are
   ``log_softmax`` of the processed logits in float32: after the mask, penalties, bias and
   min_tokens, before temperature, min-p, top-k and top-p (vLLM's ``processed_logprobs``
   would be after those; its default ``raw_logprobs`` before step 2).
5. Greedy rows take the argmax of the processed logits (no sort). Sampled rows divide by their
   temperature, apply ``min_p`` (drop tokens below ``min_p`` times the top probability),
   ``top_k`` (one ``topk`` at the batch's largest k) and ``top_p`` (on the top candidates
   only, with a full sort just for rows whose candidates hold less than ``top_p`` of the
   mass), and draw the token by inverse CDF with one uniform number from the row's own
   generator (so a seeded request replays exactly whatever it is batched with).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nova.runtime.cpu_fused import kernels_for
from nova.sampling_params import SamplingParams
from nova.types import TokenLogprobs

# Candidates top-p looks at, rung by rung, before a full sort. Per row of 49k tokens on our
# CPU: topk of 256 ~75 us, 1024 ~275 us, 4096 ~560 us, a full sort ~3 ms. The demo LM's top_p
# 0.95 at temperature 0.8 keeps <= 256 tokens in 50 of 64 text positions, <= 1178 in all
# (benchmarks/sampler_micro.py's logits).
TOP_P_CANDIDATES = (256, 1024, 4096)
# bit j of byte b, for every byte value: [256, 8] bool
_BYTE_BITS = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).bool()


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """A per-request RNG: seeded requests replay identically whatever they are batched with."""
    if params.is_greedy:
        return None
    seed = params.seed if params.seed is not None else int(torch.randint(0, 2**62, ()).item())
    return torch.Generator(device="cpu").manual_seed(seed % 2**64)  # any integer seeds


class TokenHistory:
    """What the penalties and ``min_tokens`` of one request need to know of its tokens, kept
    up to date by ``sample_batch`` (which appends each token it samples for the request).

    Sparse, so a step costs O(distinct tokens), not O(vocabulary): ``seen_ids`` (int64, the
    distinct tokens of the prompt and the output: repetition penalty), ``output_ids`` and
    ``output_counts`` (int64 / float32, aligned: each distinct output token and how often it
    came: presence/frequency penalties); on the logits' device, None when not needed.
    """

    __slots__ = (
        "_out_pos",
        "_seen",
        "device",
        "num_output_tokens",
        "output_counts",
        "output_ids",
        "seen_ids",
    )

    def __init__(
        self,
        params: SamplingParams,
        prompt_token_ids: Sequence[int],
        vocab_size: int,
        device: torch.device | str = "cpu",
        output_token_ids: Sequence[int] = (),
    ) -> None:
        self.device = torch.device(device)
        self.num_output_tokens = 0
        self.output_ids: torch.Tensor | None = None
        self.output_counts: torch.Tensor | None = None
        self._out_pos: dict[int, int] = {}
        self.seen_ids: torch.Tensor | None = None
        self._seen: set[int] = set()
        if params.presence_penalty != 0.0 or params.frequency_penalty != 0.0:
            self.output_ids = torch.zeros(0, dtype=torch.long, device=self.device)
            self.output_counts = torch.zeros(0, dtype=torch.float32, device=self.device)
        if params.repetition_penalty != 1.0:
            # image placeholders may lie beyond the vocabulary: not text, not penalised
            self._seen = {int(t) for t in prompt_token_ids if 0 <= int(t) < vocab_size}
            self.seen_ids = torch.tensor(sorted(self._seen), dtype=torch.long, device=self.device)
        for tok in output_token_ids:
            self.append(tok)

    def append(self, token_id: int) -> None:
        self.num_output_tokens += 1
        if self.output_ids is not None and self.output_counts is not None:
            pos = self._out_pos.get(token_id)
            if pos is None:
                self._out_pos[token_id] = len(self._out_pos)
                new = torch.tensor([token_id], dtype=torch.long, device=self.device)
                self.output_ids = torch.cat([self.output_ids, new])
                self.output_counts = torch.cat([self.output_counts, torch.ones_like(new).float()])
            else:
                self.output_counts[pos] += 1.0
        if self.seen_ids is not None and token_id not in self._seen:
            self._seen.add(token_id)
            new = torch.tensor([token_id], dtype=torch.long, device=self.device)
            self.seen_ids = torch.cat([self.seen_ids, new])

    def copy(self) -> TokenHistory:
        """An independent copy (a request forked into several sequences)."""
        out = TokenHistory.__new__(TokenHistory)
        out.device = self.device
        out.num_output_tokens = self.num_output_tokens
        out.output_ids = self.output_ids  # replaced, never changed in place, by append
        out.output_counts = None if self.output_counts is None else self.output_counts.clone()
        out._out_pos = dict(self._out_pos)
        out.seen_ids = self.seen_ids
        out._seen = set(self._seen)
        return out


def make_history(
    params: SamplingParams,
    prompt_token_ids: Sequence[int],
    vocab_size: int,
    device: torch.device | str = "cpu",
) -> TokenHistory | None:
    """The request's ``TokenHistory``, or None when its parameters need none."""
    if not params.needs_token_history:
        return None
    return TokenHistory(params, prompt_token_ids, vocab_size, device)


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    # per row: its token's log-probabilities, or None when the request did not ask for them
    logprobs: list[TokenLogprobs | None]


def _bitmask_bytes(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The bytes of the mask's little-endian int32 words, flattened (the first
    ceil(vocab/32) words of each row)."""
    words = (vocab_size + 31) // 32
    if bitmask.dim() != 2 or bitmask.shape[1] < words:
        raise ValueError(
            f"allowed_token_bitmask must be int32 [rows, >= {words}] for a vocabulary of "
            f"{vocab_size}, got {tuple(bitmask.shape)}"
        )
    if sys.byteorder != "little":
        raise RuntimeError("the allowed-token bitmask is read as little-endian int32 words")
    return bitmask[:, :words].to(torch.int32).contiguous().view(torch.uint8).flatten().long()


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 [R, ceil(V/32)] packed mask -> bool [R, V] (True: allowed)."""
    data = _bitmask_bytes(bitmask, vocab_size)
    bits = torch.index_select(_BYTE_BITS.to(bitmask.device), 0, data)
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].contiguous()


def bitmask_bias(bitmask: torch.Tensor, vocab_size: int, dtype: torch.dtype) -> torch.Tensor:
    """int32 [R, ceil(V/32)] packed mask -> [R, V] additive bias: 0 allowed, -inf not. Each
    mask byte is looked up as its 8 values (one gather) and added: on our CPU at batch 64
    ~2 ms, where a bool mask and ``masked_fill_`` take ~13 ms (branchy on a random mask) and
    shifting every word 32 ways ~60 ms."""
    data = _bitmask_bytes(bitmask, vocab_size)
    table = torch.where(_BYTE_BITS, 0.0, float("-inf")).to(device=bitmask.device, dtype=dtype)
    return torch.index_select(table, 0, data).reshape(bitmask.shape[0], -1)[:, :vocab_size]


def _rows(mask: list[bool], device: torch.device) -> torch.Tensor | slice | None:
    """The True rows: None if there are none, ``slice(None)`` if all are (indexing with it is
    a view, not a copy), else their indices."""
    idx = [i for i, m in enumerate(mask) if m]
    if not idx:
        return None
    if len(idx) == len(mask):
        return slice(None)
    return torch.tensor(idx, dtype=torch.long, device=device)


def _apply_mask(x: torch.Tensor, bitmask: torch.Tensor) -> None:
    bitmask = bitmask.to(x.device)
    if bitmask.shape[0] != x.shape[0]:
        raise ValueError(f"allowed_token_bitmask has {bitmask.shape[0]} rows for {x.shape[0]}")
    words = (x.shape[1] + 31) // 32
    rows = _rows((bitmask[:, :words] != -1).any(dim=1).tolist(), x.device)
    if rows is None:
        return
    bias = bitmask_bias(bitmask[rows], x.shape[1], x.dtype)
    if isinstance(rows, slice):
        x.add_(bias)  # a +inf logit meets -inf as NaN: _finite makes it -inf (masked)
    else:
        x[rows] = x[rows] + bias


def _gather_rows(
    parts: list[tuple[int, torch.Tensor]], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row index per element, token ids, lengths) of per-row id tensors, concatenated."""
    lengths = torch.tensor([len(t) for _, t in parts], device=device)
    rows = torch.repeat_interleave(torch.tensor([r for r, _ in parts], device=device), lengths)
    return rows, torch.cat([t for _, t in parts]), lengths


def _apply_penalties(
    x: torch.Tensor, params: Sequence[SamplingParams], histories: Sequence[TokenHistory | None]
) -> None:
    """Repetition, then presence and frequency penalties, at the tokens each row has seen only
    (a gather and a scatter over the batch's distinct tokens, not the whole vocabulary)."""
    dev = x.device
    rep = [
        (i, h.seen_ids) for i, h in enumerate(histories) if h is not None and h.seen_ids is not None
    ]
    rep = [(i, t) for i, t in rep if t.numel()]
    if rep:
        rows, ids, lengths = _gather_rows(rep, dev)
        pen = torch.tensor(
            [params[i].repetition_penalty for i, _ in rep], dtype=x.dtype, device=dev
        )
        pen = torch.repeat_interleave(pen, lengths)
        vals = x[rows, ids]
        x[rows, ids] = torch.where(vals > 0, vals / pen, vals * pen)
    occ = [
        (i, h.output_ids, h.output_counts)
        for i, h in enumerate(histories)
        if h is not None and h.output_ids is not None and h.output_counts is not None
    ]
    occ = [o for o in occ if o[1].numel()]
    if occ:
        rows, ids, lengths = _gather_rows([(i, t) for i, t, _ in occ], dev)
        counts = torch.cat([c for _, _, c in occ]).to(x.dtype)
        freq = torch.tensor(
            [params[i].frequency_penalty for i, _, _ in occ], dtype=x.dtype, device=dev
        )
        pres = torch.tensor(
            [params[i].presence_penalty for i, _, _ in occ], dtype=x.dtype, device=dev
        )
        x[rows, ids] -= torch.repeat_interleave(freq, lengths) * counts + torch.repeat_interleave(
            pres, lengths
        )


def _apply_bias(x: torch.Tensor, params: Sequence[SamplingParams]) -> None:
    vocab = x.shape[1]
    rows: list[int] = []
    ids: list[int] = []
    values: list[float] = []
    for i, p in enumerate(params):
        for tok, bias in p.logit_bias:
            if tok >= vocab:
                raise ValueError(f"logit_bias token {tok} is outside the vocabulary ({vocab})")
            rows.append(i)
            ids.append(tok)
            values.append(bias)
    if rows:
        dev = x.device
        index = (torch.tensor(rows, device=dev), torch.tensor(ids, device=dev))
        x.index_put_(index, torch.tensor(values, dtype=x.dtype, device=dev), accumulate=True)


def _apply_min_tokens(
    x: torch.Tensor,
    params: Sequence[SamplingParams],
    histories: Sequence[TokenHistory | None],
    eos_token_ids: Sequence[int],
) -> None:
    vocab = x.shape[1]
    rows: list[int] = []
    ids: list[int] = []
    for i, (p, h) in enumerate(zip(params, histories)):
        if p.min_tokens == 0 or h is None or h.num_output_tokens >= p.min_tokens:
            continue
        stop = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
        for tok in sorted(t for t in stop if 0 <= t < vocab):
            rows.append(i)
            ids.append(tok)
    if not rows:
        return
    dev = x.device
    index = (torch.tensor(rows, device=dev), torch.tensor(ids, device=dev))
    saved = x[index]
    x.index_put_(index, torch.full_like(saved, float("-inf")))
    touched = torch.tensor(sorted(set(rows)), device=dev)
    empty = touched[torch.isneginf(x[touched].amax(dim=1))]
    if empty.numel():  # nothing but a stop token is allowed: let it through
        restore = torch.isin(index[0], empty)
        x.index_put_((index[0][restore], index[1][restore]), saved[restore])


def _finite(x: torch.Tensor) -> torch.Tensor:
    """In place: +inf (an extreme penalty or temperature overflowing float32) becomes the
    largest float, NaN (inf - inf) becomes -inf; -inf (masked) stays. The order of the finite
    logits is unchanged."""
    return torch.nan_to_num_(
        x, nan=float("-inf"), posinf=torch.finfo(x.dtype).max, neginf=float("-inf")
    )


def _take(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """``x[rows]``, without a copy when ``rows`` are all of them in order."""
    return x if rows == list(range(x.shape[0])) else x[rows]


@dataclass(slots=True)
class _Candidates:
    """Some rows' sampling distributions: ``probs`` [R, K] normalised, over token ids ``ids``
    [R, K] (None: the whole vocabulary in id order, K = vocab)."""

    rows: list[int]
    probs: torch.Tensor
    ids: torch.Tensor | None


def _tempered(x: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Temperature and min-p over float32 rows (a new tensor)."""
    dev = x.device
    temps = torch.tensor([p.temperature for p in params], dtype=x.dtype, device=dev)
    y = _finite(x / temps.unsqueeze(1))
    if any(p.min_p > 0.0 for p in params):
        # p < min_p * p_max  <=>  logit < max logit + log(min_p): no softmax needed
        min_p = torch.tensor([p.min_p for p in params], dtype=y.dtype, device=dev)
        floor = y.amax(dim=1, keepdim=True) + torch.log(min_p).unsqueeze(1)
        y = y.masked_fill(y < floor, float("-inf"))
    return y


def _nucleus(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Probabilities sorted largest first -> top-p kept and renormalised: a token is dropped
    when the mass of strictly more likely tokens already reaches top_p (the most likely token
    is always kept, even when a tiny top_p rounds to 0 in float32)."""
    keep = (probs.cumsum(dim=1) - probs) < top_p.unsqueeze(1)
    keep |= (top_p >= 1.0).unsqueeze(1)  # no cut at all, whatever the cumsum's rounding
    keep[:, 0] = True
    kept = probs * keep
    return kept / kept.sum(dim=1, keepdim=True)


def _candidates(y: torch.Tensor, params: Sequence[SamplingParams]) -> list[_Candidates]:
    """The rows' distributions after top-k and top-p, on as few tokens as possible: top-k rows
    on their ``topk`` candidates; top-p rows on the top ``TOP_P_CANDIDATES`` rung that holds
    top_p of their mass (a full sort for rows no rung covers); the other rows on the whole
    vocabulary."""
    vocab = y.shape[1]
    dev = y.device
    out: list[_Candidates] = []
    top_k = [i for i, p in enumerate(params) if p.top_k is not None and p.top_k < vocab]
    in_top_k = set(top_k)
    if top_k:
        ks = [int(params[i].top_k or vocab) for i in top_k]
        values, ids = torch.topk(_take(y, top_k), max(ks), dim=1)  # sorted, largest first
        beyond = torch.arange(max(ks), device=dev) >= torch.tensor(ks, device=dev).unsqueeze(1)
        probs = values.masked_fill(beyond, float("-inf")).softmax(dim=1)
        top_p = torch.tensor([params[i].top_p for i in top_k], dtype=y.dtype, device=dev)
        out.append(_Candidates(top_k, _nucleus(probs, top_p), ids))
    nucleus = [i for i, p in enumerate(params) if i not in in_top_k and p.top_p < 1.0]
    if nucleus:
        full = _take(y, nucleus).softmax(dim=1)
        top_p = torch.tensor([params[i].top_p for i in nucleus], dtype=y.dtype, device=dev)
        left = torch.arange(len(nucleus), device=dev)
        for k in (*[c for c in TOP_P_CANDIDATES if c < vocab], vocab):
            if k < vocab:
                values, ids = torch.topk(full[left], k, dim=1)
                done = values.sum(dim=1) >= top_p[left]
            else:
                values, ids = full[left].sort(dim=1, descending=True)
                done = torch.ones(len(left), dtype=torch.bool, device=dev)
            got = done.nonzero().flatten()
            if got.numel():
                rows = [nucleus[int(r)] for r in left[got].tolist()]
                out.append(_Candidates(rows, _nucleus(values[got], top_p[left[got]]), ids[got]))
            left = left[~done]
            if left.numel() == 0:
                break
    plain = [i for i, p in enumerate(params) if i not in in_top_k and p.top_p >= 1.0]
    if plain:
        out.append(_Candidates(plain, _take(y, plain).softmax(dim=1), None))
    return out


def filtered_probs_batch(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Probabilities [R, vocab] the sampler draws from for rows of logits (temperature, min-p,
    top-k, top-p; float32): the candidates scattered back over the vocabulary."""
    y = _tempered(logits.float(), params)
    out = torch.zeros_like(y)
    for c in _candidates(y, params):
        if c.ids is None:
            out[c.rows] = c.probs
        else:
            out[c.rows] = torch.zeros_like(y[c.rows]).scatter_(1, c.ids, c.probs)
    return out


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities [vocab] of one row after temperature, min-p, top-k and top-p (float32)."""
    return filtered_probs_batch(logits.unsqueeze(0), [params]).squeeze(0)


def _uniforms(generators: Sequence[torch.Generator | None]) -> list[float]:
    """One uniform in [0, 1) from each row's generator (the global RNG for a row without)."""
    return [
        float(torch.rand((), generator=g).item()) if g is not None else float(torch.rand(()))
        for g in generators
    ]


def _draw(c: _Candidates, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """One token per row of ``c`` by inverse CDF; one uniform from each row's generator."""
    u = _uniforms([generators[r] for r in c.rows])
    cdf = c.probs.cumsum(dim=1)
    target = torch.tensor(u, dtype=cdf.dtype, device=cdf.device) * cdf[:, -1]
    pos = torch.searchsorted(cdf, target.unsqueeze(1), right=True).squeeze(1)
    width = c.probs.shape[1]
    over = pos >= width
    if bool(over.any()):  # u * total rounding up to the total: the last token with any mass
        last = width - 1 - (c.probs.flip(1) > 0).int().argmax(dim=1)
        pos = torch.where(over, last, pos)
    if c.ids is None:
        return pos
    return c.ids.gather(1, pos.unsqueeze(1)).squeeze(1)


def _logprobs(
    x: torch.Tensor, tokens: torch.Tensor, params: Sequence[SamplingParams]
) -> list[TokenLogprobs | None]:
    want = [p.logprobs is not None for p in params]
    rows = _rows(want, x.device)
    out: list[TokenLogprobs | None] = [None] * len(params)
    if rows is None:
        return out
    indices = [i for i, w in enumerate(want) if w]
    lp = torch.log_softmax(x[rows].float(), dim=1)
    chosen = tokens[rows].unsqueeze(1)
    chosen_lp = lp.gather(1, chosen)
    ranks = (lp > chosen_lp).sum(dim=1) + 1
    n_top = max(p.logprobs or 0 for p, w in zip(params, want) if w)
    top_v: list[list[float]] = []
    top_i: list[list[int]] = []
    if n_top > 0:
        tv, ti = torch.topk(lp, min(n_top, lp.shape[1]), dim=1)
        top_v, top_i = tv.tolist(), ti.tolist()
    chosen_l, chosen_lp_l, ranks_l = (
        chosen.squeeze(1).tolist(),
        chosen_lp.squeeze(1).tolist(),
        ranks.tolist(),
    )
    for j, i in enumerate(indices):
        n = params[i].logprobs or 0
        top = (
            tuple(
                (tok, val) for tok, val in zip(top_i[j][:n], top_v[j][:n]) if val != float("-inf")
            )
            if n
            else ()
        )
        out[i] = TokenLogprobs(int(chosen_l[j]), float(chosen_lp_l[j]), int(ranks_l[j]), top)
    return out


def greedy_tokens(x: torch.Tensor) -> torch.Tensor:
    """Each row's argmax over the vocabulary of ``x`` [rows, vocab] (``torch.argmax``'s
    semantics: the first largest, a NaN above every number), through Nova's CPU kernel where
    it takes ``x``: on a decode step's fp32 logits of 64 x 49,152, 0.9 ms against 3.4 ms
    (docs/cpu.md, "Sampling")."""
    kernels = kernels_for(x)
    if kernels is not None and x.dim() == 2 and x.shape[1] > 0 and x.stride(1) == 1:
        return kernels.greedy_argmax(x)
    return x.argmax(dim=-1)


def _plain_temperature(p: SamplingParams, vocab: int) -> bool:
    """Whether a sampled row needs only its temperature (no top-k, top-p or min-p): Nova's CPU
    kernel draws it in one fused pass (``sample_temperature``: softmax and inverse CDF without
    the float32 copies of the logits the tensor path makes, docs/cpu.md "Sampling")."""
    return (p.top_k is None or p.top_k >= vocab) and p.top_p >= 1.0 and p.min_p <= 0.0


def sample_batch(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    *,
    allowed_token_bitmask: torch.Tensor | None = None,
    histories: Sequence[TokenHistory | None] | None = None,
    eos_token_ids: Sequence[int] = (),
) -> SamplerOutput:
    """logits [B, vocab] -> one token id per row (and log-probabilities where asked).

    ``allowed_token_bitmask``: int32 [B, ceil(vocab/32)] or None (no row constrained).
    ``histories``: each row's ``TokenHistory`` (None for a row whose parameters need none;
    a request with penalties or ``min_tokens`` and no history is an error); the sampled token
    is appended to it. ``eos_token_ids``: the model's EOS ids (for ``min_tokens``).
    """
    num_rows = logits.shape[0]
    if num_rows != len(params) or num_rows != len(generators):
        raise ValueError(
            f"{num_rows} logit rows for {len(params)} requests and {len(generators)} generators"
        )
    hist: Sequence[TokenHistory | None] = histories if histories is not None else [None] * num_rows
    if len(hist) != num_rows:
        raise ValueError(f"{len(hist)} token histories for {num_rows} logit rows")
    for i, (p, h) in enumerate(zip(params, hist)):
        if h is None and p.needs_token_history:
            raise ValueError(f"row {i}: penalties or min_tokens need the request's TokenHistory")
    processed = (
        allowed_token_bitmask is not None
        or any(h is not None for h in hist)
        or any(p.logit_bias for p in params)
    )
    if not processed and all(p.is_greedy and p.logprobs is None for p in params):
        return SamplerOutput(greedy_tokens(logits).tolist(), [None] * num_rows)

    x = logits.float()
    if processed:
        if x is logits:
            x = x.clone()
        if allowed_token_bitmask is not None:
            _apply_mask(x, allowed_token_bitmask)
        _apply_penalties(x, params, hist)
        _apply_bias(x, params)
        _apply_min_tokens(x, params, hist, eos_token_ids)
        _finite(x)
        dead = torch.isneginf(x.amax(dim=1)).nonzero().flatten().tolist()
        if dead:
            raise ValueError(f"rows {dead}: no token is allowed (an empty allowed-token mask)")

    sampled = [i for i, p in enumerate(params) if not p.is_greedy]
    if not sampled:
        tokens = greedy_tokens(x)
    else:
        tokens = torch.zeros(num_rows, dtype=torch.long, device=x.device)
        greedy = [i for i, p in enumerate(params) if p.is_greedy]
        if greedy:
            tokens[greedy] = greedy_tokens(x[greedy])
        kernels = kernels_for(x)
        vocab = x.shape[1]
        plain = [i for i in sampled if _plain_temperature(params[i], vocab)] if kernels else []
        if kernels is not None and plain:
            # (temperature only: one fused pass per row in Nova's CPU kernel)
            temps = torch.tensor([params[i].temperature for i in plain], dtype=torch.float32)
            u = torch.tensor(_uniforms([generators[i] for i in plain]), dtype=torch.float32)
            tokens[plain] = kernels.sample_temperature(_take(x, plain), temps, u)
            done = set(plain)
            sampled = [i for i in sampled if i not in done]
        sub_params = [params[i] for i in sampled]
        sub_gens = [generators[i] for i in sampled]
        if sampled:
            y = _tempered(_take(x, sampled), sub_params)
            for c in _candidates(y, sub_params):
                tokens[[sampled[r] for r in c.rows]] = _draw(c, sub_gens)
    logprobs = _logprobs(x, tokens, params)
    out = tokens.tolist()
    for h, tok in zip(hist, out):
        if h is not None:
            h.append(tok)
    return SamplerOutput(out, logprobs)


def sample(
    logits: torch.Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    *,
    allowed_token_bitmask: torch.Tensor | None = None,
    histories: Sequence[TokenHistory | None] | None = None,
    eos_token_ids: Sequence[int] = (),
) -> list[int]:
    """logits [B, vocab] -> one token id per row (``sample_batch`` without the logprobs)."""
    return sample_batch(
        logits,
        params,
        generators,
        allowed_token_bitmask=allowed_token_bitmask,
        histories=histories,
        eos_token_ids=eos_token_ids,
    ).token_ids
