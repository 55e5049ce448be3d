"""``NovaRouter``'s choices, on a router built without a cluster and fake replicas: the
session's ring replica first and its next one as the fallback, both offered once the first is
saturated (power of two choices), pinned calls, requests without a session, where a refused
request spills, and a restarted replica (new id, same rank) keeping its sessions."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

pytest.importorskip("ray")

from ray.serve._private.common import DeploymentHandleSource, DeploymentID
from ray.serve.request_router import ReplicaID

from nova.deploy import state
from nova.deploy.ring import HashRing
from nova.deploy.router import NovaRouter

DEPLOYMENT = DeploymentID(name="NovaReplica", app_name="router-test")
SATURATED_AT = 3


def fake_replica(rank: int, uid: str) -> SimpleNamespace:
    return SimpleNamespace(
        replica_id=ReplicaID(unique_id=uid, deployment_id=DEPLOYMENT),
        replica_metadata={"rank": rank, "pid": 1000 + rank},
        max_ongoing_requests=16,
    )


def pending(session_id: str, request_id: str = "r1") -> SimpleNamespace:
    return SimpleNamespace(
        metadata=SimpleNamespace(session_id=session_id, internal_request_id=request_id),
        routing_context=SimpleNamespace(should_backoff=False),
    )


@pytest.fixture
def router():
    r = NovaRouter(DEPLOYMENT, DeploymentHandleSource.REPLICA, use_replica_queue_len_cache=True)
    r.initialize_state(saturated_at=SATURATED_AT, num_virtual_nodes=128, num_fallback_replicas=1)
    replicas = [fake_replica(i, f"uid{i}") for i in range(3)]
    r._replicas = {x.replica_id: x for x in replicas}  # what update_replicas sets
    return r


def choose(router, session_id: str, request_id: str = "r1"):
    ranks = asyncio.run(
        router.choose_replicas(list(router.curr_replicas.values()), pending(session_id, request_id))
    )
    return [[x.replica_metadata["rank"] for x in rank] for rank in ranks]


def test_the_router_registers_itself_for_the_ingress(router):
    assert state.ROUTERS["router-test"] is router


def test_a_session_goes_to_its_ring_replica_then_its_next_one(router):
    names = ["replica-0", "replica-1", "replica-2"]
    for i in range(20):
        key = f"s:agent-{i}"
        first, second = HashRing(names).lookup(key, 2)
        assert choose(router, key) == [[int(first[-1])], [int(second[-1])]]
        assert router.owner(key) == first
        assert router.alternative(key, first).replica_metadata["rank"] == int(second[-1])


def test_a_saturated_ring_replica_shares_with_the_sessions_next_one(router):
    key = "s:busy"
    first, second = choose(router, key)
    owner = next(x for x in router.curr_replicas.values() if x.replica_metadata["rank"] == first[0])
    router.replica_queue_len_cache.update(owner.replica_id, SATURATED_AT - 1)
    assert choose(router, key) == [first, second]
    router.replica_queue_len_cache.update(owner.replica_id, SATURATED_AT)
    assert choose(router, key) == [first + second]  # one rank: Serve picks the shorter queue


def test_pinned_calls_and_requests_without_a_session(router):
    assert choose(router, "pin:uid2") == [[2]]
    assert choose(router, "pin:gone") == [[]]
    [rank] = choose(router, "")
    assert len(rank) == 2 and len(set(rank)) == 2
    assert router.alternative(None, "replica-0").replica_metadata["rank"] in (1, 2)


def test_a_restarted_replica_keeps_its_sessions_and_a_departed_ones_move(router):
    keys = [f"s:{i}" for i in range(200)]
    before = {k: choose(router, k)[0][0] for k in keys}
    gone = next(x for x in router.curr_replicas.values() if x.replica_metadata["rank"] == 1)
    del router._replicas[gone.replica_id]
    during = {k: choose(router, k)[0][0] for k in keys}
    assert {k for k in keys if during[k] != before[k]} == {k for k in keys if before[k] == 1}
    back = fake_replica(1, "uid-new")  # Serve's replacement: a new id, the same rank
    router._replicas[back.replica_id] = back
    assert {k: choose(router, k)[0][0] for k in keys} == before


def test_each_request_is_counted_once(router):
    registry = state.ingress_metrics().registry

    def primary() -> float:
        name = "nova_ingress_routing_decisions_total"
        return registry.get_sample_value(name, {"decision": "primary"}) or 0.0

    n = primary()
    choose(router, "s:x", "req-a")
    choose(router, "s:x", "req-a")  # the same request again, after a back-off
    choose(router, "s:x", "req-b")
    assert primary() == n + 2
