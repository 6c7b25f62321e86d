"""The Prometheus exporter (hyperplane.observe.prometheus) on stand-in maps: what each
family holds, that a scrape reads counters and never a flow table (its cost does not
depend on the number of flows), the HTTP server, the address option, and the Grafana
dashboard's queries against what the exporter exports.

Expositions are parsed with prometheus_client.parser, as Prometheus would read them."""
from __future__ import annotations

import json
import re
import socket
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from hyperplane.codec import ip_to_be32, port_to_be16
from hyperplane.datapath import flows
from hyperplane.datapath.loader import Sizes
from hyperplane.datapath.verdicts import Stat, Verdict
from hyperplane.errors import ConfigError, HyperplaneError
from hyperplane.fleet.member import _by_node_id
from hyperplane.fleet.sync import REJECT_REASONS, SyncNode
from hyperplane.fleet.wire import Keyring
from hyperplane.nlb.config import NlbConfig
from hyperplane.observe import prometheus
from hyperplane.observe.metrics import NAT_METRICS, NLB_METRICS, OWN_METRICS

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "grafana" / "hyperplane.json"
DOCS = ROOT / "docs" / "metrics.md"
SIZES = Sizes(max_gateways=4, max_listeners=8)


# --- stand-in maps -----------------------------------------------------------------------

class Table:
    """A map: [key], items(), sum(key), Key(); every use is counted in `reads`."""

    def __init__(self, name, reads, entries=None, max_entries=64):
        self.name, self.reads = name, reads
        self.entries, self.max_entries = dict(entries or {}), max_entries

    def Key(self, k):
        return int(k)

    def __getitem__(self, key):
        self.reads[self.name] = self.reads.get(self.name, 0) + 1
        return self.entries[int(key)]

    def items(self):
        self.reads[self.name] = self.reads.get(self.name, 0) + len(self.entries)
        return list(self.entries.items())

    def sum(self, key):
        return int(sum(self[key]))


class FlowTable(Table):
    """A flow table: holds `n` entries, and any use of it fails the test."""

    def __getattr__(self, name):
        raise AssertionError(f"the scrape read the flow table {self.name} ({name})")

    def __getitem__(self, key):
        raise AssertionError(f"the scrape read the flow table {self.name}")

    def items(self):
        raise AssertionError(f"the scrape read the flow table {self.name}")


def cpu(**fields):
    names = (*NAT_METRICS, *NLB_METRICS, *OWN_METRICS, "flows_confirmed", "flows_ended")
    return SimpleNamespace(**{**dict.fromkeys(names, 0), **fields})


class Maps:
    """A node's maps: gateways 0..n_gw-1 (gateway g: every AWS field g+1 on CPU 0 and 1 on
    CPU 1, 5 + g confirmed and 2 ended flows), listeners (vip, port, proto, lb_id) with ids
    0.. (listener i: every NLB field 10 + i on one CPU, 3 confirmed), targets 0..n_t-1
    (target t: 100 + t packets per CPU), verdicts (verdict v: v on CPU 0, 1 on CPU 1),
    stats, and flow tables of `flow_count` entries that must never be read."""

    def __init__(self, n_gw=1, listeners=(("198.18.0.200", 80, 6, 1),), n_targets=3,
                 flow_count=0):
        self.reads: dict[str, int] = {}
        self.sizes = SIZES
        r = self.reads
        key = lambda vip, port, proto: SimpleNamespace(vip=ip_to_be32(vip),  # noqa: E731
                                                       port=port_to_be16(port), proto=proto)
        self.tables = {
            "verdicts": Table("verdicts", r, {v: [int(v), 1] for v in Verdict}, len(Verdict)),
            "stats": Table("stats", r, {s: [2, 0] for s in Stat}, len(Stat)),
            "gw_stats": Table("gw_stats", r, {
                g: [cpu(**{f: g + 1 for f in {**NAT_METRICS, **OWN_METRICS}},
                        flows_confirmed=5 + g, flows_ended=2),
                    cpu(**{f: 1 for f in {**NAT_METRICS, **OWN_METRICS}})]
                for g in range(n_gw)}, SIZES.max_gateways),
            "listeners": Table("listeners", r, {
                i: SimpleNamespace(listener_id=i, lb_id=lb) for i, (_, _, _, lb) in
                enumerate(listeners)}),
            "lb_stats": Table("lb_stats", r, {
                i: [cpu(**{f: 10 + i for f in {**NLB_METRICS, **OWN_METRICS}},
                        flows_confirmed=3)] for i in range(len(listeners))},
                SIZES.max_listeners),
            "user_ends": Table("user_ends", r, {i: SimpleNamespace(value=0) for i in
                                                range(SIZES.max_gateways + SIZES.max_listeners)}),
            "target_packets": Table("target_packets", r, {t: [100 + t, 100 + t]
                                                          for t in range(n_targets)}),
            **{name: FlowTable(name, r, dict.fromkeys(range(flow_count)))
               for name in flows.flow_tables()},
        }
        # the listeners map's keys are (vip, port, proto) structs
        self._listener_keys = [key(vip, port, proto) for vip, port, proto, _ in listeners]

    def table(self, name):
        if name == "listeners":
            table = self.tables["listeners"]
            self.reads["listeners"] = self.reads.get("listeners", 0) + len(table.entries)
            return SimpleNamespace(items=lambda: [(self._listener_keys[i], v) for i, v in
                                                  table.entries.items()])
        return self.tables[name]


def gateways(n):
    return [{"name": f"gw{g}", "gw_id": g, "nat_ips": ["198.18.0.100", "198.18.0.101"][:g + 1],
             "port_min": 1024, "port_max": 65535} for g in range(n)]


NLB = NlbConfig.from_dict({
    "load_balancers": [{"name": "web", "lb_id": 1}, {"name": "dns", "lb_id": 2}],
    "listeners": [{"lb": "web", "vip": "198.18.0.200", "port": 80, "protocol": "TCP",
                   "target_group": "web-tg"},
                  {"lb": "dns", "vip": "198.18.0.201", "port": 53, "protocol": "TCP_UDP",
                   "target_group": "dns-tg"}],
    "target_groups": [{"name": "web-tg", "targets": [{"ip": "10.20.1.10", "port": 8080},
                                                     {"ip": "10.20.2.10", "port": 8080}]},
                      {"name": "dns-tg", "targets": [{"ip": "10.20.3.10", "port": 53}]}]})
LISTENERS = (("198.18.0.200", 80, 6, 1), ("198.18.0.201", 53, 6, 2), ("198.18.0.201", 53, 17, 2))
STATUS = {"config_error": None, "address_error": "no interface for VIP x",
          "stalled_tasks": [], "flows_reset_unhealthy": 4, "fleet": None,
          "target_groups": {
              "web-tg": {"10.20.1.10:8080": {"state": "healthy", "slot": 0, "active_flows": 7,
                                             "packets": 1},
                         "10.20.2.10:8080": {"state": "unhealthy", "slot": 1, "active_flows": 0,
                                             "packets": 1}},
              "dns-tg": {"10.20.3.10:53": {"state": "draining", "slot": 2, "active_flows": 2,
                                           "packets": 1}}}}


def fleet_status() -> dict:
    """A fleet member's status as hyperplane.fleet.member makes it, with the sync stats of
    a real SyncNode (sync id 1 = node id 0): greeted by its peer (sync id 2 = node id 1),
    it then sent 3 records the peer never got, 0.5 s ago, and rejected two datagrams
    (truncated, bad magic)."""
    clock = SimpleNamespace(now=100.0)
    wire: list = []          # (to, datagram) in flight
    nodes = {}
    for me, peer in ((1, 2), (2, 1)):
        nodes[me] = SyncNode(me, 1, Keyring({1: bytes(32)}, 1), record_size=48, key_size=16,
                             send=lambda data, addr: wire.append((addr, data)),
                             deliver=lambda *a: None, clock=lambda: clock.now)
        nodes[me].set_peers({peer: ("mem", peer)})
    for _ in range(10):       # HELLOs both ways, and their answers
        for node in nodes.values():
            node.tick(clock.now)
        while wire:
            to, data = wire.pop(0)
            assert nodes[to[1]].on_datagram(data, ("mem", 3 - to[1]), clock.now) is None
        clock.now += 0.01
    node = nodes[1]
    node.queue([2], bytes(48) * 3)
    node.flush(clock.now)
    assert wire, "the sync node sent no records"
    wire.clear()              # lost on the way
    clock.now += 0.5
    assert node.on_datagram(b"x", ("mem", 2), clock.now) == "truncated"
    assert node.on_datagram(b"\0" * 200, ("mem", 2), clock.now) == "bad_magic"
    return {"ready": True, "members": {"node1": {}, "node2": {}},
            "records": {"installed": 5, "merged": 1, "rejected": 2, "conflict": 0, "full": 0},
            "events": {"read": 9, "replicated": 8, "records_sent": 8, "dumped": 0,
                       "refreshed": 0, "handed_over": 0, "stale_removed": 0},
            "sync": _by_node_id(node.stats(clock.now))}


def scrape(collector) -> dict:
    """family name -> {tuple(sorted labels): value}, from the text exposition."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    text = generate_latest(registry).decode()
    out: dict = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
    return out


def value(samples, name, **labels):
    return samples[name][tuple(sorted({"node": "n1", **labels}.items()))]


def collector(maps=None, n_gw=1, status=None, nlb=None):
    maps = maps or Maps(n_gw=n_gw)
    return prometheus.NodeCollector("n1", maps, gateways=lambda: gateways(n_gw),
                                    status=lambda: status, nlb_config=lambda: nlb)


# --- what the families hold --------------------------------------------------------------

def test_nat_gateway_families_carry_the_aws_metrics_per_gateway():
    s = scrape(collector(n_gw=2))
    for g in (0, 1):
        gw = f"gw{g}"
        assert value(s, "hyperplane_nat_gateway_connection_attempts_total", gateway=gw) == g + 2
        assert value(s, "hyperplane_nat_gateway_out_to_destination_bytes_total",
                     gateway=gw) == g + 2
        assert value(s, "hyperplane_nat_gateway_in_from_destination_packets_total",
                     gateway=gw) == g + 2
        assert value(s, "hyperplane_nat_gateway_refused_flows_total", gateway=gw) == g + 2
        # confirmed - ended, from the counters
        assert value(s, "hyperplane_nat_gateway_active_connections", gateway=gw) == 3 + g
    assert value(s, "hyperplane_nat_gateway_ports_per_destination", gateway="gw0") == 64512
    assert value(s, "hyperplane_nat_gateway_ports_per_destination", gateway="gw1") == 2 * 64512
    # every AWS NAT gateway metric (and ours) has its family
    aws = set(NAT_METRICS.values()) | set(OWN_METRICS.values()) | {"ActiveConnectionCount"}
    assert set(prometheus.NAT_FAMILIES) == aws


def test_help_names_the_aws_metric():
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector())
    text = generate_latest(registry).decode()
    assert ("# HELP hyperplane_nat_gateway_idle_timeouts_total Flows found expired "
            "(AWS: IdleTimeoutCount)") in text
    assert "(AWS: ProcessedBytes)" in text


def test_verdicts_and_events_with_their_action():
    s = scrape(collector())
    for v in Verdict:
        assert value(s, "hyperplane_datapath_packets_total", verdict=v.name,
                     action=v.action.removeprefix("XDP_").lower()) == int(v) + 1
    assert value(s, "hyperplane_datapath_packets_total", verdict="DROP_NO_FLOW",
                 action="drop") == int(Verdict.DROP_NO_FLOW) + 1
    assert value(s, "hyperplane_datapath_events_total", event="EVENT_LOST") == 2


def test_nlb_per_listener_with_names_target_groups_and_health():
    maps = Maps(listeners=LISTENERS)
    s = scrape(collector(maps, status=STATUS, nlb=NLB))
    assert value(s, "hyperplane_nlb_new_flows_total", load_balancer="web",
                 listener="198.18.0.200:80", protocol="tcp", target_group="web-tg") == 10
    assert value(s, "hyperplane_nlb_processed_bytes_total", load_balancer="dns",
                 listener="198.18.0.201:53", protocol="udp", target_group="dns-tg") == 12
    assert value(s, "hyperplane_nlb_active_flows", load_balancer="dns",
                 listener="198.18.0.201:53", protocol="tcp", target_group="dns-tg") == 3
    assert value(s, "hyperplane_nlb_healthy_hosts", load_balancer="web",
                 target_group="web-tg") == 1
    assert value(s, "hyperplane_nlb_unhealthy_hosts", load_balancer="web",
                 target_group="web-tg") == 1
    assert value(s, "hyperplane_nlb_healthy_hosts", load_balancer="dns",
                 target_group="dns-tg") == 0
    states = {labels: v for labels, v in s["hyperplane_nlb_target_state"].items()
              if ("target", "10.20.3.10:53") in labels}
    assert sorted(dict(k)["state"] for k, v in states.items() if v == 1) == ["draining"]
    assert len(states) == 5
    assert value(s, "hyperplane_nlb_target_packets_total", target_group="web-tg",
                 target="10.20.2.10:8080") == 202
    assert value(s, "hyperplane_nlb_target_active_flows", target_group="web-tg",
                 target="10.20.1.10:8080") == 7
    assert value(s, "hyperplane_agent_problems", problem="addresses") == 1
    assert value(s, "hyperplane_agent_problems", problem="config") == 0
    assert value(s, "hyperplane_agent_unhealthy_flow_resets_total") == 4


def test_listeners_without_the_agents_config_are_named_by_id():
    s = scrape(collector(Maps(listeners=LISTENERS)))
    assert value(s, "hyperplane_nlb_new_flows_total", load_balancer="1",
                 listener="198.18.0.200:80", protocol="tcp", target_group="") == 10


def test_fleet_replication_lag_resend_queue_and_rejections():
    s = scrape(collector(status={**STATUS, "fleet": fleet_status()}, nlb=NLB))
    assert value(s, "hyperplane_fleet_ready") == 1
    assert value(s, "hyperplane_fleet_members") == 2
    assert value(s, "hyperplane_fleet_replication_lag_seconds", peer="1") == pytest.approx(0.5)
    assert value(s, "hyperplane_fleet_replication_lag_datagrams", peer="1") >= 1
    assert value(s, "hyperplane_fleet_resend_queue_records", peer="1") == 3
    assert value(s, "hyperplane_fleet_sync_rejected_datagrams_total", reason="truncated") == 1
    assert value(s, "hyperplane_fleet_sync_rejected_datagrams_total", reason="bad_magic") == 1
    assert {dict(k)["reason"] for k in s["hyperplane_fleet_sync_rejected_datagrams_total"]} \
        == set(REJECT_REASONS)
    assert value(s, "hyperplane_fleet_sync_sent_records_total") == 3
    assert value(s, "hyperplane_fleet_records_total", result="installed") == 5
    assert value(s, "hyperplane_fleet_flow_events_total", kind="replicated") == 8


def test_a_node_outside_a_fleet_has_no_fleet_families():
    s = scrape(collector(status=STATUS, nlb=NLB))
    assert not [name for name in s if name.startswith("hyperplane_fleet_")]


def test_a_section_that_fails_is_counted_and_the_others_still_answer():
    maps = Maps()

    def broken(*_):
        raise OSError("map gone")
    maps.tables["gw_stats"].__class__ = type("Broken", (Table,), {"__getitem__": broken})
    c = collector(maps)
    s = scrape(c)
    assert value(s, "hyperplane_exporter_errors_total", section="nat") == 1
    assert value(s, "hyperplane_exporter_errors_total", section="datapath") == 0
    assert "hyperplane_datapath_packets_total" in s
    assert value(scrape(c), "hyperplane_exporter_errors_total", section="nat") == 2


# --- cost: counters, never the flows -----------------------------------------------------

def test_a_scrape_reads_no_flow_table_and_costs_the_same_whatever_the_flow_count():
    """Same resources, flow tables of 0 and of 1,000,000 entries: the scrape reads the
    same map entries (the flow tables would fail the test if touched)."""
    reads = []
    for flow_count in (0, 1_000_000):
        maps = Maps(n_gw=2, listeners=LISTENERS, flow_count=flow_count)
        scrape(collector(maps, n_gw=2, status=STATUS, nlb=NLB))
        assert not set(maps.reads) & set(flows.flow_tables())
        reads.append(dict(maps.reads))
    assert reads[0] == reads[1]


def test_a_scrape_grows_with_the_resources():
    """Map entries read: a constant for verdicts and stats, plus a few per gateway and
    per listener (O(resources))."""
    def read(n_gw, listeners):
        maps = Maps(n_gw=n_gw, listeners=listeners)
        scrape(collector(maps, n_gw=n_gw, status=STATUS, nlb=NLB))
        return sum(maps.reads.values())
    base = read(1, LISTENERS[:1])
    per_gateway = read(2, LISTENERS[:1]) - base
    per_listener = read(1, LISTENERS[:2]) - base
    assert 0 < per_gateway <= 3 and 0 < per_listener <= 4
    assert read(4, LISTENERS) == base + 3 * per_gateway + 2 * per_listener


# --- serving -----------------------------------------------------------------------------

def test_served_over_http_and_parsed():
    server = prometheus.serve(collector(status=STATUS, nlb=NLB), "127.0.0.1", 0)
    try:
        assert server.port > 0
        with urllib.request.urlopen(server.url, timeout=10) as resp:
            assert resp.status == 200
            text = resp.read().decode()
    finally:
        server.close()
    names = {f.name for f in text_string_to_metric_families(text)}
    assert {"hyperplane_datapath_packets", "hyperplane_nat_gateway_active_connections"} <= names


def test_an_address_in_use_is_one_sentence():
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    try:
        with pytest.raises(HyperplaneError, match=rf"cannot serve metrics on 127.0.0.1:{port}: "
                                                  r"Address already in use"):
            prometheus.serve(collector(), "127.0.0.1", port)
    finally:
        holder.close()


@pytest.mark.parametrize("text,want", [("0.0.0.0:9477", ("0.0.0.0", 9477)),
                                       ("127.0.0.1:0", ("127.0.0.1", 0))])
def test_metrics_address(text, want):
    assert prometheus.parse_addr(text) == want


@pytest.mark.parametrize("text", ["9477", "localhost:9477", "0.0.0.0:65536", "0.0.0.0:",
                                  "0.0.0.0:x", ":9477", "300.1.1.1:80"])
def test_bad_metrics_address_is_refused_with_an_example(text):
    with pytest.raises(ConfigError, match=r"HOST:PORT .* \(e\.g\. 0\.0\.0\.0:9477\)"):
        prometheus.parse_addr(text)


# --- the Grafana dashboard ---------------------------------------------------------------

def exported() -> dict[str, set[str]]:
    """Every sample name the exporter can export (a fleet node with NAT and NLB) -> the
    label names its samples carry."""
    maps = Maps(n_gw=1, listeners=LISTENERS)
    s = scrape(collector(maps, status={**STATUS, "fleet": fleet_status()}, nlb=NLB))
    return {name: {k for labels in samples for k, _ in labels} for name, samples in s.items()}


def dashboard_exprs() -> list[str]:
    data = json.loads(DASHBOARD.read_text())
    exprs = []

    def walk(panels):
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []))
            walk(p.get("panels", []))
    walk(data["panels"])
    return exprs


def test_dashboard_is_grafana_json_with_queries():
    data = json.loads(DASHBOARD.read_text())
    assert data["title"] and data["uid"] and data["schemaVersion"] >= 30
    assert {v["name"] for v in data["templating"]["list"]} >= {"datasource", "node"}
    assert len(dashboard_exprs()) >= 10


def test_every_dashboard_query_names_exported_metrics_and_labels():
    have = exported()
    for expr in dashboard_exprs():
        bare = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)          # label values out
        names = re.findall(r"\b(hyperplane_[a-z0-9_]+)", bare)
        assert names, f"no hyperplane metric in {expr!r}"
        for name in names:
            assert name in have, f"{expr!r}: {name} is not exported"
        # label names in matchers and in by (...) must be on the metric
        labels = set(re.findall(r"([a-z_]+)\s*=~?", bare)) | \
            {lab.strip() for group in re.findall(r"\bby\s*\(([^)]*)\)", bare)
             for lab in group.split(",") if lab.strip()}
        carried = set().union(*(have[n] for n in names))
        assert labels <= carried, f"{expr!r}: labels {labels - carried} are not exported"


def test_docs_list_exactly_the_exported_metrics():
    """docs/metrics.md's tables name every metric the exporter exports, and no other."""
    documented = set(re.findall(r"\| `(hyperplane_[a-z0-9_]+)` \|", DOCS.read_text()))
    assert documented == set(exported())
