"""``NovaRouter``: how the ingress picks the replica of a request (runs inside the ingress).

Ray's ``ConsistentHashRouter`` hashes replicas by their unique id, which changes when Serve
restarts a replica, so a restart would move other replicas' sessions. This subclass keeps its
routing loop (which holds on to every request of a same-session burst) and replaces the choice:

- the ring (``nova.deploy.ring``) is keyed by the stable replica name ``replica-<rank>``
  (reported by the replica's ``record_replica_metadata``): a replica's departure moves only its
  own sessions, and its replacement takes exactly those back;
- a request with a session goes to the session's ring replica; when that replica already has
  ``saturated_at`` requests in flight, to the less loaded of the session's two ring replicas
  (power of two choices among the session's candidates); when it refuses (full), to the second;
- a request without a session goes to the less loaded of two random replicas;
- a request the chosen replica's own admission refuses (503: it has ``--max-queue`` unfinished
  requests) is sent once more by the ingress, to ``alternative()``: the session's next ring
  replica (exact, where the saturation test above works on Serve's cached queue lengths);
- a session id ``pin:<unique id>`` goes to exactly that replica (the ingress's metrics and health
  fan-out).

Ray pickles this module by value into the ingress process, so it keeps no state of its own in
module globals: the ingress finds the router through ``nova.deploy.state``.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from typing import Any

from ray.serve.experimental.consistent_hash_router import ConsistentHashRouter
from ray.serve.request_router import PendingRequest, RunningReplica

from nova.deploy import state
from nova.deploy.ring import DEFAULT_VNODES, HashRing, replica_name

PIN_PREFIX = "pin:"
# request ids whose decision was counted (a request may be re-chosen after a back-off)
_COUNTED_IDS = 4096


def name_of(replica: RunningReplica) -> str:
    """The replica's stable name (``replica-<rank>``), or its unique id before it reports one."""
    rank = (replica.replica_metadata or {}).get("rank")
    return replica_name(rank) if isinstance(rank, int) else str(replica.replica_id.unique_id)


class NovaRouter(ConsistentHashRouter):  # type: ignore[misc]
    def initialize_state(self, saturated_at: int | None = None, **kwargs: Any) -> None:
        super().initialize_state(**kwargs)
        self.vnodes = int(kwargs.get("num_virtual_nodes", DEFAULT_VNODES))
        self.saturated_at = saturated_at
        self.hash_ring = HashRing((), self.vnodes)
        self.counted: OrderedDict[str, None] = OrderedDict()
        state.ROUTERS[self.app_name] = self

    # -- read by the ingress too (another thread: only whole-object reads and replacements) --
    def replicas_by_name(self) -> dict[str, RunningReplica]:
        return {name_of(r): r for r in list(self.curr_replicas.values())}

    def ring(self) -> tuple[HashRing, dict[str, RunningReplica]]:
        """The ring over the current replicas (rebuilt when their names change)."""
        by_name = self.replicas_by_name()
        ring = self.hash_ring
        if ring.names != frozenset(by_name):
            ring = self.hash_ring = HashRing(by_name, self.vnodes)
            state.ingress_metrics().replicas.set(len(by_name))
        return ring, by_name

    def owner(self, session_id: str) -> str | None:
        """The name of the session's ring replica among the current replicas."""
        return self.ring()[0].owner(session_id)

    def alternative(self, session_id: str | None, exclude: str) -> RunningReplica | None:
        """Where a request that replica ``exclude`` refused goes: the session's next ring
        replica after ``exclude``, or (no session) a random other replica; None if none."""
        ring, by_name = self.ring()
        if session_id:
            names = ring.lookup(session_id, len(by_name))
            if exclude in names:  # the ring order continues after the replica that refused
                i = names.index(exclude)
                names = names[i + 1 :] + names[:i]
            others = [n for n in names if n != exclude]
        else:
            others = [n for n in by_name if n != exclude]
            random.shuffle(others)
        return by_name[others[0]] if others else None

    # -- the choice ------------------------------------------------------------------------
    def _count(self, pending_request: PendingRequest, decision: str) -> None:
        rid = pending_request.metadata.internal_request_id
        if rid in self.counted:
            return
        self.counted[rid] = None
        if len(self.counted) > _COUNTED_IDS:
            self.counted.popitem(last=False)
        state.ingress_metrics().decisions.labels(decision).inc()

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        if not candidate_replicas:
            return []
        if pending_request is None:
            return [candidate_replicas]
        pending_request.routing_context.should_backoff = True
        session_id = pending_request.metadata.session_id or ""
        if session_id.startswith(PIN_PREFIX):
            self._count(pending_request, "pinned")
            want = session_id[len(PIN_PREFIX) :]
            return [[r for r in candidate_replicas if r.replica_id.unique_id == want]]
        if not session_id:
            self._count(pending_request, "random")
            return [random.sample(candidate_replicas, min(2, len(candidate_replicas)))]
        ring, by_name = self.ring()
        allowed = {r.replica_id for r in candidate_replicas}
        ranked = [by_name[n] for n in ring.lookup(session_id, 2) if n in by_name]
        ranked = [r for r in ranked if r.replica_id in allowed]
        if not ranked:
            self._count(pending_request, "random")
            return [candidate_replicas]
        primary = ranked[0]
        if len(ranked) > 1:
            in_flight = self.replica_queue_len_cache.get(primary.replica_id)
            limit = self.saturated_at or primary.max_ongoing_requests
            if in_flight is not None and in_flight >= limit:
                self._count(pending_request, "p2c")
                return [ranked]  # Serve sends it to the one with fewer requests in flight
        self._count(pending_request, "primary")
        return [[r] for r in ranked]
