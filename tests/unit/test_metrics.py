"""Metrics from the maps, on a stand-in for the maps (no BPF needed)."""
from types import SimpleNamespace

from hyperplane.datapath import flows
from hyperplane.observe import metrics
from hyperplane.datapath.loader import Sizes
from hyperplane.observe.metrics import NAT_METRICS, NLB_METRICS, OWN_METRICS
from hyperplane.datapath.verdicts import FlowKind


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


class Untouchable:
    """A flow table: any use of it fails the test (metrics come from counters)."""

    def __getattr__(self, name):
        raise AssertionError(f"metrics read the flow table ({name})")


def cpu(**fields):
    out = {f: 0 for f in (*NAT_METRICS, *NLB_METRICS, *OWN_METRICS, "flows_confirmed",
                          "flows_ended")}
    return SimpleNamespace(**{**out, **fields})


def fake_dp(*, gw_cpus=None, lb_cpus=None, listeners=None, user_ends=None, sizes=None,
            max_gateways=16):
    """Maps with gateway 0's per-CPU stats (default: every AWS field 1 on each of 2 CPUs),
    each listener's stats, user_ends slots, and flow tables that must not be read."""
    n_ends = max_gateways + 64
    tables = {
        "gw_stats": Table({0: gw_cpus or [cpu(**{f: 1 for f in NAT_METRICS})] * 2},
                          max_entries=max_gateways),
        "lb_stats": Table({lid: lb_cpus.get(lid, [cpu()]) if lb_cpus else
                           [cpu(**{f: 2 for f in NLB_METRICS})]
                           for lid in (listeners or {})}),
        "listeners": Table({i: SimpleNamespace(listener_id=lid, lb_id=lb)
                            for i, (lid, lb) in enumerate((listeners or {}).items())}),
        "user_ends": Table({i: SimpleNamespace(value=(user_ends or {}).get(i, 0))
                            for i in range(n_ends)}, max_entries=n_ends),
        **{name: Untouchable() for name in flows.flow_tables()},
    }
    return SimpleNamespace(table=lambda name: tables[name], sizes=sizes)


def test_active_connections_are_confirmed_minus_ended_minus_user_ends():
    """Summed over CPUs: flows the data path confirmed, minus those it ended, minus those
    user space deleted while open (user_ends[USER_ENDS_NAT_BASE + gateway id])."""
    dp = fake_dp(gw_cpus=[cpu(flows_confirmed=7, flows_ended=1), cpu(flows_confirmed=5,
                                                                       flows_ended=3)],
                 user_ends={0: 2, 1: 100})
    assert metrics.active_flows(dp, FlowKind.NAT_OUT, [0]) == {0: 6}
    assert metrics.gateway_metrics(dp, 0)["ActiveConnectionCount"] == 6


def test_listener_slots_of_user_ends_follow_the_nodes_gateway_count():
    """USER_ENDS_LB_BASE is HP_MAX_GATEWAYS as the node was compiled: from its Sizes, or
    (maps opened without them) from the size of gw_stats, never the header's default."""
    lb_cpus = {3: [cpu(flows_confirmed=4), cpu(flows_confirmed=5, flows_ended=2)]}
    for dp in (fake_dp(listeners={3: 1}, lb_cpus=lb_cpus, user_ends={4 + 3: 1, 16 + 3: 5},
                       sizes=Sizes(max_gateways=4)),
               fake_dp(listeners={3: 1}, lb_cpus=lb_cpus, user_ends={4 + 3: 1, 16 + 3: 5},
                       max_gateways=4)):
        assert metrics.active_flows(dp, FlowKind.NLB_IN, [3]) == {3: 6}
        assert metrics.load_balancer_metrics(dp)[1]["ActiveFlowCount"] == 6


def test_active_count_is_never_negative():
    """A flow ended by the data path while user space deleted it may be counted twice."""
    dp = fake_dp(gw_cpus=[cpu(flows_confirmed=1)], user_ends={0: 2})
    assert metrics.gateway_metrics(dp, 0)["ActiveConnectionCount"] == 0


def test_metrics_never_read_the_flow_tables():
    dp = fake_dp(listeners={0: 1, 1: 2})
    assert set(flows.flow_tables()) >= {"flows"}
    metrics.gateway_metrics(dp, 0)
    metrics.load_balancer_metrics(dp, {"target_groups": {}})


def test_refused_flows_are_a_metric_per_gateway_and_load_balancer():
    dp = fake_dp(gw_cpus=[cpu(flows_refused=2), cpu(flows_refused=3)], listeners={3: 1, 4: 1},
                 lb_cpus={3: [cpu(flows_refused=1)], 4: [cpu(flows_refused=4), cpu()]})
    assert metrics.OWN_METRICS == {"flows_refused": "FlowsRefusedCount"}
    assert metrics.gateway_metrics(dp, 0)["FlowsRefusedCount"] == 5
    assert metrics.load_balancer_metrics(dp)[1]["FlowsRefusedCount"] == 5


def test_every_active_metric_goes_through_active_flows(monkeypatch):
    """ActiveConnectionCount and ActiveFlowCount come from active_flows() alone."""
    asked = []

    def fake(dp, kind, ids=None):
        asked.append((kind, sorted(ids)))
        return {i: {0: 7, 3: 2, 4: 5}.get(i, 0) for i in ids}

    monkeypatch.setattr(metrics, "active_flows", fake)
    dp = fake_dp(listeners={3: 1, 4: 1, 9: 2})
    gw = metrics.gateway_metrics(dp, 0)
    assert gw["ActiveConnectionCount"] == 7
    assert gw["ConnectionAttemptCount"] == 2                       # summed over 2 CPUs
    lbs = metrics.load_balancer_metrics(dp)
    assert lbs[1]["ActiveFlowCount"] == 7 and lbs[2]["ActiveFlowCount"] == 0
    assert lbs[1]["NewFlowCount"] == 4                             # two listeners
    assert asked == [(FlowKind.NAT_OUT, [0]), (FlowKind.NLB_IN, [3, 4, 9])]


def test_counters_of_indexes_the_program_lacks_read_zero():
    from hyperplane.datapath.verdicts import Verdict
    table = Table({i: [i, 1] for i in range(3)}, max_entries=3)
    dp = SimpleNamespace(table=lambda name: table)
    counts = metrics.verdict_counts(dp)
    assert list(counts) == [v.name for v in Verdict]
    assert [counts[Verdict(i).name] for i in range(4)] == [1, 2, 3, 0]
