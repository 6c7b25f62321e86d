"""hpctl top's collector (hyperplane/observe/collect.py) on made-up readings: rates from two
readings, a counter that went back (a restarted node) gives 0 not a negative, a node that
cannot be read keeps its row with the error, the history is a minute long, members on
other hosts appear without numbers, the replication lag is the worst peer's."""
from types import SimpleNamespace

import pytest

from hyperplane.observe import collect
from hyperplane.observe.collect import (FleetCollector, NodeReading, ResourceReading,
                                        replication_lag_ms)


class Script:
    """read_node's answers, one list of readings per node, taken in order."""

    def __init__(self, monkeypatch, readings: dict[str, list[NodeReading]], members=None):
        self.readings = {n: list(rs) for n, rs in readings.items()}
        monkeypatch.setattr(collect, "read_node", lambda name, lb_names: self.readings[name].pop(0))
        monkeypatch.setattr(collect, "destinations", lambda nodes, top: [])
        monkeypatch.setattr(collect, "store_view", lambda url: (members or {}, {}, None))


def reading(name, at, total, drops=0, packets=0, nbytes=0, new=0, active=0, status=None,
            error=None):
    return NodeReading(name=name, at=at, verdicts={"TX_NAT_OUT": total - drops,
                                                   "DROP_NO_FLOW": drops},
                       resources={"nat:gw": ResourceReading(packets=packets, bytes=nbytes,
                                                            new=new, active=active)},
                       status=status, agent="running" if status else "none", error=error)


def test_rates_from_two_readings(monkeypatch):
    Script(monkeypatch, {"n1": [reading("n1", 10.0, 1000, drops=10, packets=500, nbytes=0,
                                        new=4, active=3),
                                reading("n1", 12.0, 3000, drops=30, packets=1500, nbytes=2000,
                                        new=8, active=5)]})
    c = FleetCollector(["n1"], None)
    first = c.sample()
    assert first.nodes[0].pps == 0 and first.interval_s == 0.0     # nothing to compare yet
    s = c.sample()
    (n,) = s.nodes
    assert (n.pps, n.drops_ps, n.bps, n.new_flows_ps, n.active_flows) == (1000, 10, 8000, 2, 5)
    (r,) = s.resources
    assert (r.resource, r.pps, r.bps, r.new_flows_ps) == ("nat:gw", 500, 8000, 2)
    (d,) = s.drops
    assert (d.reason, d.per_s, d.total) == ("DROP_NO_FLOW", 10, 30)
    assert s.interval_s == 2.0 and s.pps_history == [0, 1000] and n.pps_history == [0, 1000]


def test_a_counter_that_went_back_gives_zero(monkeypatch):
    Script(monkeypatch, {"n1": [reading("n1", 1.0, 5000, packets=900),
                                reading("n1", 2.0, 10, packets=3)]})
    c = FleetCollector(["n1"], None)
    c.sample()
    s = c.sample()
    assert s.nodes[0].pps == 0 and s.resources[0].pps == 0


def test_a_node_that_cannot_be_read_keeps_its_row(monkeypatch):
    Script(monkeypatch, {"n1": [reading("n1", 1.0, 100),
                                NodeReading("n1", 2.0, error="no pinned maps at /x"),
                                reading("n1", 3.0, 300)]})
    c = FleetCollector(["n1"], None)
    c.sample()
    s = c.sample()
    assert s.nodes[0].error == "no pinned maps at /x" and s.nodes[0].pps == 0
    s = c.sample()     # back, but the reading before it was missing: no rate yet
    assert s.nodes[0].error is None and s.nodes[0].pps == 0


def test_history_keeps_a_minute(monkeypatch):
    Script(monkeypatch, {"n1": [reading("n1", float(t), 100 * t) for t in range(200)]})
    c = FleetCollector(["n1"], None, step_s=0.5)
    for _ in range(200):
        s = c.sample()
    assert len(s.pps_history) == 120 and len(s.nodes[0].pps_history) == 120
    assert s.history_step_s == 0.5


def test_members_elsewhere_and_fleet_state(monkeypatch):
    status = {"fleet": {"members": {"n1": {}}, "ready": False,
                        "sync": {"peers": {"1": {"ack_lag_s": 0.004, "member": True},
                                           "2": {"ack_lag_s": 0.250, "member": False},
                                           "3": {"ack_lag_s": 0.012}}}},
              "target_groups": {"web": {"10.20.1.10:8080": {"state": "healthy",
                                                           "active_flows": 7}}}}
    members = {"n1": SimpleNamespace(ready=True), "far": SimpleNamespace(ready=False)}
    Script(monkeypatch, {"n1": [reading("n1", 1.0, 10, status=status)]}, members=members)
    s = FleetCollector(["n1"], "file:/store").sample()
    here, far = s.nodes
    assert (here.name, here.here, here.live, here.ready) == ("n1", True, True, True)
    assert here.lag_ms == pytest.approx(12.0)       # the worst member peer
    assert (far.name, far.here, far.live, far.ready, far.agent) == ("far", False, True, False,
                                                                    "elsewhere")
    (t,) = s.targets
    assert (t.node, t.group, t.target, t.state, t.active_flows) == \
        ("n1", "web", "10.20.1.10:8080", "healthy", 7)


def test_replication_lag_without_a_fleet():
    assert replication_lag_ms(None) is None
    assert replication_lag_ms({"fleet": None}) is None
    assert replication_lag_ms({"fleet": {"sync": {"peers": {}}}}) == 0.0
