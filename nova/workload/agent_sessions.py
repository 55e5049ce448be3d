"""Closed-loop GUI-agent sessions as UI-TARS-style clients send them: every step resends the
system prompt, the task, the text of every earlier action and the last ``window``
screenshots (older ones are dropped: the window slides by one each step), and asks for the
next action.

Step ``s`` (0-based) of a session is the conversation

    system: SYSTEM_PROMPT
    user:   the task
    then for each earlier or current step j <= s:
      user:      screenshot j            (only for the last ``window`` steps)
      assistant: action j                (j < s)

so step s + 1 shares with step s everything up to the first screenshot that left the window
(all of it while no screenshot has left yet). The screenshots are real PNGs of one app screen
that changes a little from step to step (``nova.screenshots.make_session_screenshot``); a
screenshot resent in later steps is byte-identical. Think time between a step's answer and the
next step is exponential with mean ``think_time_s``. Sessions start uniformly over
``[0, session_start_spread_s]``, or, given ``rate_rps``, as a Poisson process of sessions
whose steps offer ``rate_rps`` requests per second (``nova eval``'s load points). Torch-free.
"""

from __future__ import annotations

import math
import random

from nova.workload.arrivals import split_rng
from nova.workload.gui_agent import GUI_TASKS, next_action
from nova.workload.registry import (
    check_int,
    check_non_negative,
    check_positive,
    check_seed,
    register_workload,
)
from nova.workload.types import ChatTurn, ImageSpec, Workload, WorkloadRequest

# A GUI agent's system prompt in the style of UI-TARS's (its action space and output format),
# written for Nova's workloads.
SYSTEM_PROMPT = """You are a GUI agent operating an Android phone. You are given a task, the \
actions you took so far and the latest screenshots. Decide the single next action that moves \
the task forward.

## Output format
Thought: one or two sentences on what you see and what to do next.
Action: exactly one action from the action space below.

## Action space
click(point='<point>x y</point>') - tap the element at the point.
long_press(point='<point>x y</point>') - press and hold the element at the point.
type(content='text') - type the text into the focused field; end with a newline to submit.
scroll(point='<point>x y</point>', direction='down or up or left or right') - scroll there.
open_app(app_name='name') - open an installed app by its name.
press_home() - go to the home screen.
press_back() - go back one screen.
wait() - wait for the screen to change, then look again.
finished(content='text') - the task is done; say what the result is.

## Notes
Coordinates are in the screenshot's pixels, the origin at the top left. Prefer visible \
labels over guesses; if a dialog blocks the screen, deal with it first. Never type secrets. \
If the last action had no effect, try a different element rather than repeating it. Keep the \
thought short: it is read by the user."""

TOKENS_PER_WORD = 1.3  # as nova.workload.gui_agent.text_tokens_estimate
TURN_TEMPLATE_TOKENS = 5  # a chat template's role header and separators per message


def turn_text_tokens(turn: ChatTurn) -> int:
    """Estimated prompt tokens of a turn's text and its template (its image not included)."""
    return TURN_TEMPLATE_TOKENS + math.ceil(TOKENS_PER_WORD * len(turn.text.split()))


def session_turns(
    task: str, actions: list[str], screens: list[ImageSpec], step: int, window: int
) -> tuple[ChatTurn, ...]:
    """The conversation of step ``step`` (see the module docstring)."""
    turns = [ChatTurn("system", SYSTEM_PROMPT), ChatTurn("user", f"Task: {task}")]
    first_shown = max(0, step - window + 1)
    for j in range(step + 1):
        if j >= first_shown:  # a screenshot turn: the image alone, as UI-TARS clients send it
            turns.append(ChatTurn("user", "", screens[j]))
        if j < step:
            turns.append(ChatTurn("assistant", actions[j]))
    return tuple(turns)


def _session(
    rng: random.Random,
    session_id: str,
    start_s: float,
    num_steps: int,
    window: int,
    think_time_s: float,
    width: int,
    height: int,
    min_tokens: int,
    max_tokens: int,
) -> list[WorkloadRequest]:
    task = rng.choice(GUI_TASKS)
    screen_seed = rng.getrandbits(31)
    screens = [ImageSpec(width, height, screen_seed, revision) for revision in range(num_steps)]
    actions = [next_action(rng, task, step) for step in range(num_steps)]
    out = []
    for step in range(num_steps):
        turns = session_turns(task.instruction, actions, screens, step, window)
        think_s = 0.0 if step == 0 or think_time_s == 0 else rng.expovariate(1.0 / think_time_s)
        out.append(
            WorkloadRequest(
                request_id=f"{session_id}-step{step:02d}",
                arrival_s=start_s if step == 0 else None,
                instruction=f"Task: {task.instruction}",
                num_text_tokens=sum(turn_text_tokens(t) for t in turns),
                images=tuple(t.image for t in turns if t.image is not None),
                max_tokens=rng.randint(min_tokens, max_tokens),
                session_id=session_id,
                step=step,
                think_time_s=think_s,
                seed=screen_seed,
                turns=turns,
            )
        )
    return out


@register_workload("agent_sessions")
def agent_sessions(
    *,
    num_sessions: int = 4,
    steps_per_session: int = 10,
    window: int = 5,
    think_time_s: float = 1.0,
    session_start_spread_s: float = 10.0,
    image_width: int = 1080,
    image_height: int = 1920,
    min_tokens: int = 30,
    max_tokens: int = 80,
    seed: int = 0,
    rate_rps: float | None = None,
    num_requests: int | None = None,
) -> Workload:
    """``num_sessions`` closed-loop agents of ``steps_per_session`` steps, each step sending the
    system prompt, the task, every earlier action and the last ``window`` screenshots
    (``image_width`` x ``image_height`` PNGs), and generating a 30-80 token action.
    ``num_requests``: about that many steps in all (``ceil(num_requests / steps)`` sessions,
    overriding ``num_sessions``); ``rate_rps``: sessions start as a Poisson process at
    ``rate_rps / steps_per_session`` per second (so their steps offer ``rate_rps``)."""
    steps = check_int("steps_per_session", steps_per_session, 1)
    if num_requests is not None:
        num_sessions = -(-check_int("num_requests", num_requests, 1) // steps)
    num_sessions = check_int("num_sessions", num_sessions, 1)
    window = check_int("window", window, 1)
    think_time_s = check_non_negative("think_time_s", think_time_s)
    spread_s = check_non_negative("session_start_spread_s", session_start_spread_s)
    width = check_int("image_width", image_width, 1)
    height = check_int("image_height", image_height, 1)
    lo = check_int("min_tokens", min_tokens, 1)
    hi = check_int("max_tokens", max_tokens, 1)
    if hi < lo:
        raise ValueError(f"max_tokens ({hi}) must be >= min_tokens ({lo})")
    seed = check_seed(seed)
    time_rng, content_rng = split_rng(seed)
    if rate_rps is not None:
        rate = check_positive("rate_rps", rate_rps) / steps  # sessions per second
        starts, t = [], 0.0
        for _ in range(num_sessions):
            starts.append(t)
            t += time_rng.expovariate(rate)
    else:
        starts = [time_rng.uniform(0.0, spread_s) for _ in range(num_sessions)]
    plans = sorted((starts[i], i, content_rng.getrandbits(64)) for i in range(num_sessions))
    requests: list[WorkloadRequest] = []
    for start_s, i, session_seed in plans:
        requests += _session(
            random.Random(session_seed),
            f"agent-{i:04d}",
            start_s,
            steps,
            window,
            think_time_s,
            width,
            height,
            lo,
            hi,
        )
    return Workload(name="agent_sessions", requests=tuple(requests), closed_loop=True)
