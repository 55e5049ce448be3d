"""The front-end queue of the simulator: service per request and per image, FIFO over a pool."""

from __future__ import annotations

import pytest

from nova.sim.frontend import FrontendModel, through_frontend
from nova.sim.simulator import SimArrival


def _arr(t: float, images: int = 1, rid: str | None = None) -> SimArrival:
    return SimArrival(rid or f"r{t}", t, 10, images, 4)


def test_one_worker_queues_requests_fifo():
    fm = FrontendModel(per_request_s=0.01, per_image_s=0.1, workers=1)
    out = through_frontend([_arr(0.0), _arr(0.05), _arr(1.0, images=2)], fm)
    assert [a.arrival_s for a in out] == pytest.approx([0.11, 0.22, 1.21])


def test_more_workers_serve_in_parallel_and_keep_input_order():
    fm = FrontendModel(per_request_s=0.0, per_image_s=0.1, workers=2)
    arrivals = [_arr(0.02, rid="late"), _arr(0.0, rid="a"), _arr(0.01, rid="b")]
    out = through_frontend(arrivals, fm)
    assert [a.request_id for a in out] == ["late", "a", "b"]
    # a and b start at once on the two workers; late waits for a's worker.
    assert [a.arrival_s for a in out] == pytest.approx([0.2, 0.1, 0.11])


def test_text_only_requests_pay_only_the_per_request_cost():
    fm = FrontendModel(per_request_s=0.005, per_image_s=0.1, workers=4)
    [a] = through_frontend([_arr(3.0, images=0)], fm)
    assert a.arrival_s == pytest.approx(3.005)


def test_closed_loop_arrivals_and_bad_models_are_refused():
    with pytest.raises(ValueError, match="open-loop"):
        through_frontend([SimArrival("s", None, 5, 0, 2, session_id="s0")], FrontendModel())
    with pytest.raises(ValueError):
        FrontendModel(workers=0)
    with pytest.raises(ValueError):
        FrontendModel(per_image_s=-1.0)
