"""Closed-loop GUI-agent sessions: an agent works through one task in several steps.

Each step sends the task, every action taken so far (the history grows by one action per step)
and a fresh screenshot, and waits for the answer; the next step goes out ``think_time_s`` after
that answer (the time to act on the phone and take the next screenshot). Sessions start
uniformly at random over ``[0, session_start_spread_s]``.
"""

from __future__ import annotations

import random

from nova.workload.arrivals import split_rng
from nova.workload.gui_agent import GUI_TASKS, GuiContentConfig, gui_agent_request, next_action
from nova.workload.registry import check_int, check_non_negative, check_seed, register_workload
from nova.workload.types import Workload, WorkloadRequest

DEFAULT_MIN_STEPS = 3
DEFAULT_MAX_STEPS = 10


def _step_range(
    steps_per_session: int | None, min_steps: int | None, max_steps: int | None
) -> tuple[int, int]:
    if steps_per_session is not None:
        if min_steps is not None or max_steps is not None:
            raise ValueError(
                "steps_per_session: give either steps_per_session or min_steps/max_steps, not both"
            )
        steps = check_int("steps_per_session", steps_per_session, 1)
        return steps, steps
    lo = check_int("min_steps", DEFAULT_MIN_STEPS if min_steps is None else min_steps, 1)
    hi = check_int("max_steps", max(lo, DEFAULT_MAX_STEPS) if max_steps is None else max_steps, 1)
    if hi < lo:
        raise ValueError(f"max_steps ({hi}) must be >= min_steps ({lo})")
    return lo, hi


def _session(
    rng: random.Random,
    session_id: str,
    start_s: float,
    num_steps: int,
    think_time_s: float,
    content: GuiContentConfig,
) -> list[WorkloadRequest]:
    task = rng.choice(GUI_TASKS)
    history: list[str] = []
    steps = []
    for step in range(num_steps):
        think_s = 0.0 if step == 0 or think_time_s == 0 else rng.expovariate(1.0 / think_time_s)
        steps.append(
            gui_agent_request(
                rng,
                f"{session_id}-step{step:02d}",
                start_s if step == 0 else None,
                content,
                task=task,
                history=list(history),
                session_id=session_id,
                step=step,
                think_time_s=think_s,
            )
        )
        history.append(next_action(rng, task, step))
    return steps


@register_workload("gui_sessions")
def gui_sessions(
    *,
    num_sessions: int = 8,
    steps_per_session: int | None = None,
    min_steps: int | None = None,
    max_steps: int | None = None,
    think_time_s: float = 1.0,
    session_start_spread_s: float = 10.0,
    seed: int = 0,
    content: GuiContentConfig = GuiContentConfig(),
) -> Workload:
    """``num_sessions`` closed-loop agent sessions.

    Steps per session: ``steps_per_session`` exactly, or uniform in [``min_steps``,
    ``max_steps``] (default 3..10). ``think_time_s``: mean (s) of the exponential wait between
    a step's answer and the next step (0 = none). The first step of a session carries its start
    time in ``arrival_s``; later steps have ``arrival_s=None``. The history is every previous
    step's action (``content.max_history_actions`` applies to open-loop requests only).
    """
    num_sessions = check_int("num_sessions", num_sessions, 1)
    lo, hi = _step_range(steps_per_session, min_steps, max_steps)
    think_time_s = check_non_negative("think_time_s", think_time_s)
    spread_s = check_non_negative("session_start_spread_s", session_start_spread_s)
    seed = check_seed(seed)
    if not isinstance(content, GuiContentConfig):
        raise ValueError(f"content must be a GuiContentConfig, got {type(content).__name__}")
    time_rng, content_rng = split_rng(seed)
    # Drawn in session order, so session i is the same whatever the others do.
    plans = sorted(
        (time_rng.uniform(0.0, spread_s), time_rng.randint(lo, hi), i, content_rng.getrandbits(64))
        for i in range(num_sessions)
    )
    requests: list[WorkloadRequest] = []
    for start_s, num_steps, i, session_seed in plans:
        requests += _session(
            random.Random(session_seed), f"sess-{i:04d}", start_s, num_steps, think_time_s, content
        )
    return Workload(name="gui_sessions", requests=tuple(requests), closed_loop=True)
