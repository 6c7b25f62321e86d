"""Metrics from the maps, on a stand-in for the maps (no BPF needed)."""
from types import SimpleNamespace

import pytest

from hyperplane import flows, metrics
from hyperplane.flows import NSEC
from hyperplane.metrics import NAT_METRICS, NLB_METRICS
from hyperplane.settings import Timeouts
from hyperplane.verdicts import FlowKind, TcpState

TIMEOUTS = Timeouts().by_index()           # TCP 350 s, half-open 60 s, closing 10 s, ...
NOW = 10**12


class Table:
    """Entries by key, like a map: [key] and items_lookup_batch()/items()."""

    def __init__(self, entries=None, max_entries=64):
        self.entries, self.max_entries = dict(entries or {}), max_entries

    @staticmethod
    def Key(k):
        return int(k)

    def __getitem__(self, key):
        return self.entries[int(key)]

    def items(self):
        return list(self.entries.items())

    items_lookup_batch = items


def fake_dp(flow_entries, *, gw_cpus=None, lb_cpus=None, listeners=None):
    config = SimpleNamespace(timeout_s=TIMEOUTS)
    tables = {
        "config": Table({0: config}),
        "flows": SimpleNamespace(items_lookup_batch=lambda: iter(flow_entries)),
        "gw_stats": Table({0: gw_cpus or [SimpleNamespace(**{f: 1 for f in NAT_METRICS})] * 2}),
        "lb_stats": Table({lid: lb_cpus or [SimpleNamespace(**{f: 2 for f in NLB_METRICS})]
                           for lid in (listeners or {})}),
        "listeners": Table({i: SimpleNamespace(listener_id=lid, lb_id=lb)
                            for i, (lid, lb) in enumerate((listeners or {}).items())}),
    }
    return SimpleNamespace(table=lambda name: tables.get(name, Table()))


def entry(kind, resource, *, proto=6, state=TcpState.ESTABLISHED, idle_s=1):
    k = SimpleNamespace(proto=proto)
    v = SimpleNamespace(kind=kind, resource=resource, tcp_state=state,
                        last_seen_ns=NOW - idle_s * NSEC)
    return k, v


@pytest.fixture(autouse=True)
def fixed_clock(monkeypatch):
    monkeypatch.setattr(flows, "now_ns", lambda: NOW)


def test_active_flows_count_open_client_side_entries_per_resource():
    dp = fake_dp([
        entry(FlowKind.NAT_OUT, 0), entry(FlowKind.NAT_IN, 0),           # one flow, 2 keys
        entry(FlowKind.NAT_OUT, 0, proto=17, state=TcpState.NONE),       # UDP
        entry(FlowKind.NAT_OUT, 1, state=TcpState.SYN_SENT),             # half-open counts
        entry(FlowKind.NAT_OUT, 0, state=TcpState.CLOSED),               # closed: not active
        entry(FlowKind.NAT_OUT, 0, idle_s=400),                          # expired
        entry(FlowKind.NAT_OUT, 0, state=TcpState.FIN_WAIT, idle_s=300),  # half-closed
        entry(FlowKind.NLB_IN, 5), entry(FlowKind.NLB_OUT, 5),
    ])
    assert metrics.active_flows(dp, FlowKind.NAT_OUT) == {0: 3, 1: 1}
    assert metrics.active_flows(dp, FlowKind.NLB_IN) == {5: 1}


def test_every_active_metric_goes_through_active_flows(monkeypatch):
    """ActiveConnectionCount and ActiveFlowCount come from active_flows() alone (the one
    function to switch to the data path's counters)."""
    asked = []

    def fake(dp, kind):
        asked.append(kind)
        return {0: 7, 3: 2, 4: 5}

    monkeypatch.setattr(metrics, "active_flows", fake)
    dp = fake_dp([entry(FlowKind.NAT_OUT, 0)], listeners={3: 1, 4: 1, 9: 2})
    gw = metrics.gateway_metrics(dp, 0)
    assert gw["ActiveConnectionCount"] == 7
    assert gw["ConnectionAttemptCount"] == 2                       # summed over 2 CPUs
    lbs = metrics.load_balancer_metrics(dp)
    assert lbs[1]["ActiveFlowCount"] == 7 and lbs[2]["ActiveFlowCount"] == 0
    assert lbs[1]["NewFlowCount"] == 4                             # two listeners
    assert asked == [FlowKind.NAT_OUT, FlowKind.NLB_IN]


def test_counters_of_indexes_the_program_lacks_read_zero():
    from hyperplane.verdicts import Verdict
    table = Table({i: [i, 1] for i in range(3)}, max_entries=3)
    dp = SimpleNamespace(table=lambda name: table)
    counts = metrics.verdict_counts(dp)
    assert list(counts) == [v.name for v in Verdict]
    assert [counts[Verdict(i).name] for i in range(4)] == [1, 2, 3, 0]
