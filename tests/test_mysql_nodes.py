"""Which node of a cluster the MySQL store uses: the order of candidates
after failures, resting nodes, moving back to the preferred one. The
store's behaviour on a real cluster is in test_galera.py."""

from __future__ import annotations

from kmsd.mysql_nodes import Nodes, galera_health


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


SERVERS = (("a", 3306), ("b", 3306), ("c", 3307))


def test_candidates_skip_resting_nodes_until_they_rested() -> None:
    clock = Clock()
    nodes = Nodes(SERVERS, retry_after=5.0, clock=clock)
    assert nodes.candidates() == [0, 1, 2] and nodes.name() == "a:3306"
    nodes.leave(0)
    assert nodes.candidates() == [1, 2, 0]
    assert nodes.use(1) and nodes.failovers == 1 and nodes.name() == "b:3306"
    clock.now += 1
    nodes.leave(1)
    # Every node failed: the one that had the longest to recover comes first.
    nodes.leave(2)
    assert nodes.candidates() == [0, 1, 2]
    clock.now += 4.5
    assert nodes.candidates() == [0, 1, 2] and not nodes.resting(0) and nodes.resting(1)
    assert nodes.better_than_current() == [0]


def test_moving_back_to_the_preferred_node_counts_as_a_move() -> None:
    clock = Clock()
    nodes = Nodes(SERVERS, clock=clock)
    nodes.leave(0)
    nodes.use(2)
    assert nodes.better_than_current() == [1]
    clock.now += 10
    assert nodes.better_than_current() == [0, 1]
    assert nodes.use(0) and nodes.failovers == 2
    assert not nodes.use(0) and nodes.failovers == 2
    assert not nodes.resting(0)


def test_only_a_synced_primary_node_is_usable() -> None:
    ok = {"wsrep_cluster_status": "Primary", "wsrep_ready": "ON", "wsrep_local_state_comment": "Synced"}
    assert galera_health(ok).usable
    for change, why in [
        ({"wsrep_cluster_status": "non-Primary"}, "primary component"),
        ({"wsrep_ready": "OFF"}, "wsrep_ready"),
        ({"wsrep_local_state_comment": "Donor/Desynced"}, "Donor"),
        ({"wsrep_local_state_comment": "Joining"}, "Joining"),
    ]:
        health = galera_health({**ok, **change})
        assert not health.usable and why in (health.reason or "")
