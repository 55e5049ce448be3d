"""Requests on their way to the engine, and how long an idle engine waits for them.

A front end (the HTTP server) announces each generation request when it accepts it
(``Arrivals.expect``), before it reads the body, applies the chat template, tokenizes and decodes
images, and marks it done once it submitted it to the engine or answered it with an error. An
idle engine waits while requests are on their way, announced or still coming in (the last
arrived less than ``QUIET_S`` ago), at most ``max_wait_s`` from the first request queued, so that
a burst starts in one batch: otherwise its first request runs alone while the front end
prepares the rest, on the same cores when the engine runs on the CPU, and the rest wait for that
batch too. Only an idle engine waits (no batch running, nothing decoding): a running one admits
arrivals at its next step as before, so time per output token is never held up. Counts only;
torch-free and clock-free (the loop passes times in).

It also waits, within the same bound, for the answers' successors (``due``): once a request
has arrived after answers went out, for the rest of those answered within the last
``max_wait_s`` not yet followed by as many arrivals.
Clients that step in lock-step (N agents or environments stepping together, a benchmark at a
fixed concurrency) send their next requests as their answers land; the ones whose answers
landed one step later arrive just after the engine started the others' prefill, wait for all of
it, and finish a step later again, so the split repeats every round (docs/cpu.md, "A wave of
requests"). A lone agent's next request is its own answer's successor: nothing is waited for.
Agents that think between steps send theirs later than the bound, so the engine waits for
successors only while the recent answers were followed as lock-step clients' are
(``Successors.lockstep``).
"""

from __future__ import annotations

import threading
from collections import deque

# A burst is still coming in while its requests arrive less than this apart. A client sending
# 32 requests at once (vllm bench serve, concurrency 32) delivered most of them to the engine
# about a millisecond apart in scratch traces on the 2-core machine of docs/cpu.md ("A wave of
# requests"); a lone request on an idle engine pays this wait, so it is kept short.
QUIET_S = 0.005


class ExpectedRequest:
    """One announced request; ``done()`` (idempotent) when it was submitted or never will be."""

    __slots__ = ("_arrivals", "_done")

    def __init__(self, arrivals: Arrivals) -> None:
        self._arrivals = arrivals
        self._done = False

    def done(self) -> None:
        if not self._done:
            self._done = True
            self._arrivals._settle()


class Arrivals:
    """The count of announced requests not yet done, guarded by (and announced on) ``cond``:
    the engine loop's condition, so a waiting worker wakes when the count falls."""

    def __init__(self, cond: threading.Condition) -> None:
        self._cond = cond
        self._pending = 0

    def expect(self) -> ExpectedRequest:
        with self._cond:
            self._pending += 1
        return ExpectedRequest(self)

    @property
    def pending(self) -> int:
        return self._pending

    def _settle(self) -> None:
        with self._cond:
            self._pending -= 1
            self._cond.notify_all()


class ArrivalHold:
    """When an idle engine should start: ``wait_s`` answers how much longer to wait (0: start
    now) while requests are on their way: announced and not yet submitted, or still coming
    in (the last one arrived less than ``quiet_s`` ago: a client sends a burst over a few
    milliseconds, faster than one step). The wait begins when the engine is first found idle
    with work queued and something on its way, ends at ``max_wait_s`` after that at the
    latest, or as soon as nothing is on its way or the engine is busy, and begins anew the
    next time."""

    def __init__(self, max_wait_s: float, quiet_s: float = 0.0) -> None:
        if max_wait_s < 0 or quiet_s < 0:
            raise ValueError(f"waits must be >= 0, got max_wait_s={max_wait_s}, quiet_s={quiet_s}")
        self.max_wait_s = max_wait_s
        self.quiet_s = min(quiet_s, max_wait_s)
        self._since_s: float | None = None
        self.num_holds = 0  # waits begun (for tests and reports)

    def wait_s(
        self,
        now_s: float,
        *,
        pending: int,
        idle: bool,
        queued: bool,
        last_arrival_s: float = float("-inf"),
        due: int = 0,
    ) -> float:
        """``due``: successors of recent answers not arrived yet (``Successors.due``)."""
        coming_until_s = last_arrival_s + self.quiet_s
        if (
            self.max_wait_s == 0
            or not idle
            or not queued
            or (pending == 0 and due == 0 and now_s >= coming_until_s)
        ):
            self._since_s = None
            return 0.0
        if self._since_s is None:
            self._since_s = now_s
            self.num_holds += 1
        until_s = self._since_s + self.max_wait_s
        if pending == 0 and due == 0:
            until_s = min(until_s, coming_until_s)
        return max(0.0, until_s - now_s)


class Successors:
    """How many recent answers have not been followed by a request yet, when clients are seen to
    step in lock-step.

    Each arrival is paired with the oldest answer of the last ``window_s`` not yet followed
    (first in, first out); an answer older than that unfollowed never will be. ``due`` is the
    count of unfollowed answers, and is 0

    - until a wave of successors has begun: an answer that finished within the last
      ``window_s`` has been followed. Without that rule a backlog queued before the answers (a
      burst submitted at once) was held after every cohort that finished, for successors that
      never come: 0.8 s of idle per 30 s burst in ``benchmarks/engine_latency.py``'s screenshot
      burst (``engine_cpu_amd_profile.md``). A request that led its wave by a step (its answer
      out, its successor in, before the others' answers land) counts: the others' answers land
      within the window, and its successor waits for theirs;
    - unless at least ``lockstep_share`` of the last ``waves`` completed waves (and at least
      one) were complete: a wave succeeds when two or more answers, each within ``window_s`` of
      the one before, were all followed within ``window_s``, and fails when one of them goes
      unfollowed that long. Clients that step in lock-step send their next requests as their
      answers land (32 of 32 within 37-162 ms of them, ``benchmarks/results/serve_waves_amd*.md``);
      agents that think between steps do not (with exponential think times of mean 0.5 s, 26%
      of them come within 150 ms, so both of two answers' successors in 7%), and for those the
      hold only idles the cores. Answers that no request follows at all (a client that stopped)
      are no evidence either way. 75% of 8: a lock-step client stays lock-step when a slow
      phase of the machine spreads one wave in four past the bound (``serve_waves_amd_b.md``:
      4 of 12 waves split at the 50 ms bound of then), and thinking agents, whose pairs
      complete in about 7%, are dropped after their first incomplete wave or two.

    Finishes that were aborts or errors are not counted (no answer went out). Clock-free: the
    loop passes times in."""

    def __init__(self, window_s: float, *, waves: int = 8, lockstep_share: float = 0.75) -> None:
        self.window_s = window_s
        self.lockstep_share = lockstep_share
        self._unfollowed_s: deque[float] = deque()  # answers' finish times, oldest first
        self._followed_until_s = float("-inf")  # finish time of the latest answer followed
        self._wave_followed = 0  # answers followed in the wave under way
        self._waves: deque[bool] = deque(maxlen=waves)  # the last waves: complete?

    def finished(self, now_s: float) -> None:
        if self.window_s > 0:
            self._expire(now_s)
            self._unfollowed_s.append(now_s)

    def arrived(self, now_s: float) -> None:
        if self.window_s <= 0:
            return
        self._expire(now_s)
        if not self._unfollowed_s:
            return
        answer_s = self._unfollowed_s.popleft()
        if answer_s - self._followed_until_s > self.window_s:
            self._wave_followed = 0  # not the wave of the answer followed before
        self._followed_until_s = answer_s
        self._wave_followed += 1
        if not self._unfollowed_s and self._wave_followed >= 2:
            self._record(True)

    @property
    def lockstep(self) -> bool:
        """Whether the recent waves of successors came as lock-step clients' do."""
        if self.lockstep_share <= 0:  # (waited for from the start, without evidence)
            return True
        n = len(self._waves)
        return n > 0 and sum(self._waves) >= self.lockstep_share * n

    def due(self, now_s: float) -> int:
        self._expire(now_s)
        if not self._unfollowed_s or self._followed_until_s < now_s - self.window_s:
            return 0
        return len(self._unfollowed_s) if self.lockstep else 0

    def _record(self, complete: bool) -> None:
        self._waves.append(complete)
        self._wave_followed = 0

    def _expire(self, now_s: float) -> None:
        start_s = now_s - self.window_s
        while self._unfollowed_s and self._unfollowed_s[0] < start_s:
            answer_s = self._unfollowed_s.popleft()
            if answer_s - self._followed_until_s <= self.window_s and self._wave_followed:
                self._record(False)  # its wave had begun: a successor that did not come
