"""The operator's own tasks pause where kopf's peering pauses the replica: the rule on a peering record's
status, and the record read from the cluster."""

import secrets
from datetime import UTC, datetime, timedelta

import pytest

from agentbox.operator.leadership import Leadership, outranked

NOW = datetime(2026, 12, 5, 12, 0, tzinfo=UTC)


def peer(priority: int, seen_ago: float, lifetime: int = 10) -> dict:
    return {"priority": priority, "lifetime": lifetime,
            "lastseen": (NOW - timedelta(seconds=seen_ago)).isoformat()}


@pytest.mark.parametrize(("peers", "paused"), [
    ({}, False),
    ({"me": peer(5, 1)}, False),
    ({"me": peer(5, 1), "standby": peer(3, 1)}, False),
    ({"me": peer(5, 1), "boss": peer(9, 1)}, True),
    ({"me": peer(5, 1), "boss": peer(9, 11)}, False),  # its lifetime ran out: dead, ignored
    ({"me": peer(5, 1), "twin": peer(5, 2)}, True),  # kopf pauses both of a tie
    ({"me": peer(5, 1), "twin": peer(5, 30)}, False),
    ({"me": peer(5, 1), "odd": "not a peer", "blank": {"priority": 9}}, False),
])
def test_a_replica_is_paused_by_a_live_peer_above_it_or_beside_it(peers, paused):
    assert outranked(peers, 5, NOW) is paused


def test_a_lastseen_without_a_zone_is_utc():
    assert outranked({"boss": {"priority": 9, "lifetime": 10, "lastseen": "2026-12-05T11:59:55"}}, 5, NOW)


@pytest.mark.cluster
async def test_the_verdict_follows_the_cluster_peering_record(ops):
    name = f"abx-lead-{secrets.token_hex(3)}"
    now = datetime.now(UTC)
    boss = {"priority": 100, "lifetime": 60, "lastseen": now.isoformat()}
    await ops.create({"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": name},
                      "status": {"boss": boss}})
    try:
        assert not await Leadership(ops, name, 0, clusterwide=True).active("any")
        assert await Leadership(ops, name, 200, clusterwide=True).active("any")
        assert await Leadership(ops, None, 0, clusterwide=True).active("any")  # standalone
        assert await Leadership(ops, f"{name}-absent", 0, clusterwide=True).active("any")
    finally:
        await ops.delete("ClusterKopfPeering", None, name)
