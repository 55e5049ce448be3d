"""The served path's per-token work: engine events reach the event loop one wake-up per burst
(``LoopDelivery``), and a streamed text chunk is written from a per-choice template that must
be byte for byte the general encoder's output."""

from __future__ import annotations

import asyncio
import json
import threading

from hypothesis import given, settings
from hypothesis import strategies as st

from nova.engine.delivery import LoopDelivery
from nova.models.inputs import PromptInput
from nova.sampling_params import SamplingParams
from nova.server.logprobs import TokenTexts
from nova.server.prepare import Prepared
from nova.server.responses import TEXT_MARK, Piece, sse_event, sse_events, text_template


# -- LoopDelivery ----------------------------------------------------------------------------
def test_delivery_keeps_order_and_wakes_once_per_burst():
    async def main() -> tuple[list[list[int]], int]:
        delivery = LoopDelivery(asyncio.get_running_loop())
        queues: list[asyncio.Queue[int]] = [asyncio.Queue() for _ in range(4)]

        def worker() -> None:  # one burst: 4 requests x 25 items, posted from another thread
            for k in range(25):
                for i, q in enumerate(queues):
                    delivery.post(q, 100 * i + k)

        t = threading.Thread(target=worker)
        t.start()
        t.join()  # the loop is not running meanwhile: the whole burst is pending
        got = [[await q.get() for _ in range(25)] for q in queues]
        return got, delivery.num_wakeups

    got, wakeups = asyncio.run(main())
    assert got == [[100 * i + k for k in range(25)] for i in range(4)]
    assert wakeups == 1


def test_delivery_from_concurrent_threads_loses_nothing():
    async def main() -> list[int]:
        delivery = LoopDelivery(asyncio.get_running_loop())
        queue: asyncio.Queue[int] = asyncio.Queue()
        threads = [
            threading.Thread(target=lambda s=s: [delivery.post(queue, s + k) for k in range(500)])
            for s in (0, 1000, 2000)
        ]
        for t in threads:
            t.start()
        items = [await queue.get() for _ in range(1500)]
        for t in threads:
            t.join()
        return items

    items = asyncio.run(main())
    assert sorted(items) == sorted(s + k for s in (0, 1000, 2000) for k in range(500))
    for s in (0, 1000, 2000):  # each thread's items in its own order
        mine = [x for x in items if s <= x < s + 1000]
        assert mine == sorted(mine)


def test_delivery_to_a_closed_loop_drops_quietly():
    loop = asyncio.new_event_loop()
    delivery = LoopDelivery(loop)
    loop.close()
    delivery.post(asyncio.Queue(), 1)  # no exception; nothing pending is kept
    delivery.post(asyncio.Queue(), 2)
    assert delivery.num_wakeups == 2


# -- SSE text chunks -------------------------------------------------------------------------
def _prepared(kind: str, **kw) -> Prepared:
    return Prepared(
        request_id=kw.pop("request_id", "chatcmpl-1"),
        kind=kind,
        prompt=PromptInput(token_ids=[1, 2, 3]),
        sampling=SamplingParams(max_tokens=8),
        stops=(),
        priority=0,
        deadline_s=None,
        stream=True,
        include_usage=kw.pop("include_usage", False),
        created=1700000000,
        **kw,
    )


def _events(p: Prepared, model: str, texts: list[str]) -> list[str]:
    async def pieces():
        for k, text in enumerate(texts):
            last = k == len(texts) - 1
            yield Piece(text, "length" if last else None, k + 1)

    async def main() -> list[str]:
        return [e async for e in sse_events(p, model, pieces(), lambda: None, TokenTexts(None))]

    return asyncio.run(main())


texts_st = st.lists(st.text(max_size=6), min_size=2, max_size=6)


@settings(max_examples=60, deadline=None)
@given(
    texts=texts_st,
    kind=st.sampled_from(["chat", "completion"]),
    model=st.sampled_from(["peer", 'a "quoted" \\ model', "\ue000\x00", "模型"]),
    include_usage=st.booleans(),
)
def test_template_chunks_equal_the_general_encoding(texts, kind, model, include_usage):
    p = _prepared(kind, include_usage=include_usage)
    events = _events(p, model, texts)
    assert events[-1] == "data: [DONE]\n\n"
    bodies = [json.loads(e[len("data: ") :]) for e in events[:-1]]
    # every event is exactly what the general encoder writes for its object
    assert [sse_event(b) for b in bodies] == events[:-1]
    key = "content" if kind == "chat" else "text"
    sent = [
        (b["choices"][0]["delta"] if kind == "chat" else b["choices"][0]).get(key) or ""
        for b in bodies
        if b["choices"]
    ]
    assert "".join(sent) == "".join(texts)
    assert all(b["model"] == model for b in bodies)
    usage = [b.get("usage", "absent") for b in bodies if b["choices"]]
    assert usage == [None if include_usage else "absent"] * len(usage)


def test_text_template_splits_around_the_mark_once():
    event = sse_event({"id": "x", "choices": [{"delta": {"content": TEXT_MARK}}]})
    head, tail = text_template(event) or ("", "")
    assert head + json.dumps('é"\n', ensure_ascii=False) + tail == sse_event(
        {"id": "x", "choices": [{"delta": {"content": 'é"\n'}}]}
    )
    twice = sse_event({"a": TEXT_MARK, "b": TEXT_MARK})
    assert text_template(twice) is None
