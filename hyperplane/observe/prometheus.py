"""Prometheus metrics of one node: a prometheus-client collector that reads the pinned maps
at scrape time (no second copy of any counter), and the HTTP server the agent runs.

A scrape costs O(resources): per gateway one gw_stats and one user_ends entry, per listener
one lb_stats entry, the verdicts and stats arrays, per target one target_packets entry,
and what the agent already holds (its last status: health, fleet). The flow tables are
never read (tests/unit/test_prometheus.py proves it on maps whose flow tables fail the
test when touched).

Names follow Prometheus' conventions (snake_case, a unit suffix, `_total` on counters);
each family's help names the AWS CloudWatch metric it is (docs/metrics.md has the table).
Every sample carries the node's name as `node`.
"""
from __future__ import annotations

import ipaddress
import logging
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from hyperplane.codec import PROTOCOL_NAMES
from hyperplane.errors import ConfigError, HyperplaneError
from hyperplane.nlb.config import TARGET_STATES

log = logging.getLogger("hyperplane.observe.prometheus")

PREFIX = "hyperplane"

# AWS NAT gateway metric (hyperplane.observe.metrics.gateway_metrics) -> (family, kind, help)
NAT_FAMILIES = {
    "ActiveConnectionCount": ("nat_gateway_active_connections", "gauge",
                              "Confirmed flows now open through the gateway (from counters)"),
    "ConnectionAttemptCount": ("nat_gateway_connection_attempts", "counter",
                               "New outbound flows (TCP SYN, UDP, ICMP)"),
    "ConnectionEstablishedCount": ("nat_gateway_connections_established", "counter",
                                   "TCP connections the destination answered (SYN-ACK)"),
    "ErrorPortAllocation": ("nat_gateway_port_allocation_errors", "counter",
                            "New flows refused: no free NAT port toward the destination"),
    "IdleTimeoutCount": ("nat_gateway_idle_timeouts", "counter", "Flows found expired"),
    "PacketsDropCount": ("nat_gateway_dropped_packets", "counter",
                         "Packets of the gateway's flows the data path dropped"),
    "BytesInFromSource": ("nat_gateway_in_from_source_bytes", "counter",
                          "Bytes received from the inside clients (frames incl. Ethernet)"),
    "BytesOutToDestination": ("nat_gateway_out_to_destination_bytes", "counter",
                              "Bytes sent toward the destinations (frames incl. Ethernet)"),
    "BytesInFromDestination": ("nat_gateway_in_from_destination_bytes", "counter",
                               "Bytes received from the destinations (frames incl. Ethernet)"),
    "BytesOutToSource": ("nat_gateway_out_to_source_bytes", "counter",
                         "Bytes sent back to the inside clients (frames incl. Ethernet)"),
    "PacketsInFromSource": ("nat_gateway_in_from_source_packets", "counter",
                            "Packets received from the inside clients"),
    "PacketsOutToDestination": ("nat_gateway_out_to_destination_packets", "counter",
                                "Packets sent toward the destinations"),
    "PacketsInFromDestination": ("nat_gateway_in_from_destination_packets", "counter",
                                 "Packets received from the destinations"),
    "PacketsOutToSource": ("nat_gateway_out_to_source_packets", "counter",
                           "Packets sent back to the inside clients"),
    "FlowsRefusedCount": ("nat_gateway_refused_flows", "counter",
                          "New flows a full table refused (not an AWS metric)"),
}

# AWS NLB metric (hyperplane.observe.metrics.listener_metrics) -> (family, kind, help)
NLB_FAMILIES = {
    "ActiveFlowCount": ("nlb_active_flows", "gauge",
                        "Confirmed flows now open through the listener (from counters)"),
    "NewFlowCount": ("nlb_new_flows", "counter", "New flows from clients to the listener"),
    "ProcessedBytes": ("nlb_processed_bytes", "counter",
                       "Bytes through the listener, both directions (frames incl. Ethernet)"),
    "ProcessedPackets": ("nlb_processed_packets", "counter",
                         "Packets through the listener, both directions"),
    "TCP_Client_Reset_Count": ("nlb_tcp_client_resets", "counter", "RSTs from clients"),
    "TCP_Target_Reset_Count": ("nlb_tcp_target_resets", "counter", "RSTs from targets"),
    "TCP_ELB_Reset_Count": ("nlb_tcp_elb_resets", "counter",
                            "RSTs the load balancer sent itself"),
    "FlowsRefusedCount": ("nlb_refused_flows", "counter",
                          "New flows refused: a table full or the tuple taken (not an AWS "
                          "metric)"),
}



def _aws(name: str) -> str:
    return f" (AWS: {name})"


class NodeCollector:
    """Every metric of one node, read at scrape time.

    dp: the node's maps (table(name)); gateways(): the node's NAT gateways as its state
    file lists them (name, gw_id, nat_ips, port_min, port_max); status(): the agent's last
    status (hyperplane.node.agent: target health and flow counts, fleet) or None;
    nlb_config(): the load balancers the agent applied (NlbConfig) or None."""

    def __init__(self, node: str, dp, *, gateways: Callable[[], list[dict]],
                 status: Callable[[], dict | None] = lambda: None,
                 nlb_config: Callable[[], object | None] = lambda: None):
        self.node, self.dp = node, dp
        self.gateways, self.status, self.nlb_config = gateways, status, nlb_config
        self.lock = threading.Lock()     # scrapes may come in on several server threads
        self.errors: dict[str, int] = {}  # section -> scrapes in which it failed

    def describe(self) -> list:
        return []   # nothing read at registration (the registry must not collect then)

    def collect(self) -> Iterator[Metric]:
        with self.lock:
            families: list[Metric] = []
            status = self.status()
            for section in (self._datapath, self._nat, self._nlb, self._agent, self._fleet):
                try:
                    families += list(section(status))
                except Exception as exc:  # one section's failure must not hide the rest
                    name = section.__name__.lstrip("_")
                    self.errors[name] = self.errors.get(name, 0) + 1
                    log.error("metrics: reading the %s section failed: %s", name, exc)
            errors = self._family("exporter_errors", "counter",
                                  "Scrapes in which a section of the metrics could not be "
                                  "read (see the agent's log)", ["section"])
            for name in ("datapath", "nat", "nlb", "agent", "fleet"):
                errors.add_metric([self.node, name], self.errors.get(name, 0))
            families.append(errors)
        return iter(families)

    # --- helpers -------------------------------------------------------------------------
    def _family(self, name: str, kind: str, doc: str, labels: list[str]) -> Metric:
        cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
        return cls(f"{PREFIX}_{name}", doc, labels=["node", *labels])

    # --- sections ------------------------------------------------------------------------
    def _datapath(self, status) -> Iterator[Metric]:
        from hyperplane.datapath.verdicts import Verdict
        from hyperplane.observe.metrics import stat_counts, verdict_counts
        packets = self._family("datapath_packets", "counter",
                               "Packets by the verdict they ended in (every packet ends in "
                               "exactly one); action: what became of it",
                               ["verdict", "action"])
        for name, n in verdict_counts(self.dp).items():
            action = Verdict[name].action.removeprefix("XDP_").lower()
            packets.add_metric([self.node, name, action], n)
        yield packets
        events = self._family("datapath_events", "counter",
                              "Counted data path events that are not verdicts (flows created, "
                              "confirmed, closed, expired, ring buffer losses, ...)", ["event"])
        for name, n in stat_counts(self.dp).items():
            events.add_metric([self.node, name], n)
        yield events

    def _nat(self, status) -> Iterator[Metric]:
        from hyperplane.observe.metrics import gateway_metrics
        fams = {aws: self._family(name, kind, doc + _aws(aws), ["gateway"])
                for aws, (name, kind, doc) in NAT_FAMILIES.items()}
        ports = self._family("nat_gateway_ports_per_destination", "gauge",
                             "NAT (IP, port) pairs the gateway can give flows toward one "
                             "destination (NAT IPs x ports in its range)", ["gateway"])
        for gw in self.gateways():
            values = gateway_metrics(self.dp, gw["gw_id"])
            for aws, fam in fams.items():
                fam.add_metric([self.node, gw["name"]], values[aws])
            ports.add_metric([self.node, gw["name"]],
                             len(gw["nat_ips"]) * (gw["port_max"] - gw["port_min"] + 1))
        yield from fams.values()
        yield ports

    def _nlb(self, status) -> Iterator[Metric]:
        from hyperplane.observe.metrics import listener_metrics
        cfg = self.nlb_config()
        lb_names = {lb.lb_id: lb.name for lb in cfg.load_balancers} if cfg else {}
        groups = {(str(l.vip), l.port): l.target_group for l in cfg.listeners} if cfg else {}
        labels = ["load_balancer", "listener", "protocol", "target_group"]
        fams = {aws: self._family(name, kind, doc + _aws(aws), labels)
                for aws, (name, kind, doc) in NLB_FAMILIES.items()}
        for _, row in sorted(listener_metrics(self.dp).items()):
            values = [self.node, lb_names.get(row["lb_id"], str(row["lb_id"])),
                      f"{row['vip']}:{row['port']}", PROTOCOL_NAMES.get(row["proto"], str(row["proto"])),
                      groups.get((row["vip"], row["port"]), "")]
            for aws, fam in fams.items():
                fam.add_metric(values, row[aws])
        yield from fams.values()
        yield from self._targets(status, cfg)

    def _targets(self, status, cfg) -> Iterator[Metric]:
        """Target health and traffic: health from the agent's checks, packets from the
        target_packets map, active flows from the agent's last count."""
        tgs = (status or {}).get("target_groups", {})
        healthy = self._family("nlb_healthy_hosts", "gauge",
                               "Targets in the healthy state" + _aws("HealthyHostCount"),
                               ["load_balancer", "target_group"])
        unhealthy = self._family("nlb_unhealthy_hosts", "gauge",
                                 "Targets in the unhealthy state" + _aws("UnHealthyHostCount"),
                                 ["load_balancer", "target_group"])
        pairs = sorted({(l.lb, l.target_group) for l in cfg.listeners}) if cfg else []
        for lb, tg in pairs:
            states = [t["state"] for t in tgs.get(tg, {}).values()]
            healthy.add_metric([self.node, lb, tg], states.count("healthy"))
            unhealthy.add_metric([self.node, lb, tg], states.count("unhealthy"))
        yield healthy
        yield unhealthy
        state = self._family("nlb_target_state", "gauge",
                             "1 for the target's current state (health checks, draining), 0 "
                             "for the others", ["target_group", "target", "state"])
        packets = self._family("nlb_target_packets", "counter",
                               "Packets to and from the target", ["target_group", "target"])
        flows = self._family("nlb_target_active_flows", "gauge",
                             "Flows to the target as the agent last counted them (a table scan "
                             "every count_every_s, 5 s by default, not at scrape time)",
                             ["target_group", "target"])
        table = self.dp.table("target_packets")
        for tg, targets in sorted(tgs.items()):
            for ident, t in sorted(targets.items()):
                for s in TARGET_STATES:
                    state.add_metric([self.node, tg, ident, s], 1 if t["state"] == s else 0)
                slot = t.get("slot")
                if slot is not None:
                    packets.add_metric([self.node, tg, ident], table.sum(table.Key(slot)))
                flows.add_metric([self.node, tg, ident], t["active_flows"])
        yield state
        yield packets
        yield flows

    def _agent(self, status) -> Iterator[Metric]:
        if not status:
            return
        up = self._family("agent_problems", "gauge",
                          "1 while the agent has this problem: the store's content rejected "
                          "(config), VIP addresses not as wanted (addresses), a fleet task "
                          "silent (stalled)", ["problem"])
        up.add_metric([self.node, "config"], 1 if status.get("config_error") else 0)
        up.add_metric([self.node, "addresses"], 1 if status.get("address_error") else 0)
        up.add_metric([self.node, "stalled"], 1 if status.get("stalled_tasks") else 0)
        yield up
        resets = self._family("agent_unhealthy_flow_resets", "counter",
                              "Flows reset because their target turned unhealthy "
                              "(reset_on_unhealthy)", [])
        resets.add_metric([self.node], status.get("flows_reset_unhealthy", 0))
        yield resets

    def _fleet(self, status) -> Iterator[Metric]:
        fleet = (status or {}).get("fleet")
        if not fleet:
            return
        ready = self._family("fleet_ready", "gauge",
                             "1 once the node has its shard partners' copies and takes "
                             "traffic", [])
        ready.add_metric([self.node], 1 if fleet.get("ready") else 0)
        yield ready
        members = self._family("fleet_members", "gauge", "Live members of the fleet this "
                               "node sees (itself included)", [])
        members.add_metric([self.node], len(fleet.get("members", {})))
        yield members
        records = self._family("fleet_records", "counter",
                               "Flow records from peers, by what became of them", ["result"])
        for result, n in sorted(fleet.get("records", {}).items()):
            records.add_metric([self.node, result], n)
        yield records
        events = self._family("fleet_flow_events", "counter",
                              "Flow events and records this node sent on: read from the ring, "
                              "replicated, records sent, full copies, refreshes, ...", ["kind"])
        for kind, n in sorted(fleet.get("events", {}).items()):
            events.add_metric([self.node, kind], n)
        yield events
        sync = fleet.get("sync") or {}
        if not sync:
            return
        rejected = self._family("fleet_sync_rejected_datagrams", "counter",
                                "Sync datagrams rejected, by reason (forged, replayed, "
                                "truncated, ...)", ["reason"])
        for reason, n in sorted(sync.get("rejected", {}).items()):
            rejected.add_metric([self.node, reason], n)
        yield rejected
        yield from self._sync_counters(sync)
        yield from self._peers(sync.get("peers", {}))

    # the sync protocol's counters (hyperplane.fleet.sync SyncNode.stats) -> (family, help)
    SYNC_COUNTERS = {
        "sent_datagrams": ("fleet_sync_sent_datagrams", "Sync datagrams sent"),
        "sent_bytes": ("fleet_sync_sent_bytes", "Sync bytes sent (UDP payload)"),
        "sent_records": ("fleet_sync_sent_records", "Flow records sent (first sends)"),
        "received_datagrams": ("fleet_sync_received_datagrams", "Sync datagrams received"),
        "received_records": ("fleet_sync_received_records", "Flow records received"),
        "resent_records": ("fleet_sync_resent_records", "Flow records sent again (NACK or "
                                                        "timeout)"),
        "nacks_sent": ("fleet_sync_sent_nacks", "NACKs sent (a gap seen)"),
        "overflow_dropped": ("fleet_sync_overflow_dropped_records", "Records dropped from a "
                             "full resend queue (the peer then gets a full copy)"),
        "send_errors": ("fleet_sync_send_errors", "Sends the socket refused"),
        "stream_resets": ("fleet_sync_stream_resets", "Streams restarted (a peer's new "
                                                      "epoch)"),
    }

    def _sync_counters(self, sync: dict) -> Iterator[Metric]:
        for key, (name, doc) in self.SYNC_COUNTERS.items():
            fam = self._family(name, "counter", doc, [])
            fam.add_metric([self.node], sync.get(key, 0))
            yield fam

    def _peers(self, peers: dict) -> Iterator[Metric]:
        specs = {  # per peer: stats key -> (family, help)
            "alive": ("fleet_peer_up", "1 while the peer is heard from"),
            "ack_lag_s": ("fleet_replication_lag_seconds",
                          "Age of the oldest record the peer has not acknowledged"),
            "ack_lag_datagrams": ("fleet_replication_lag_datagrams",
                                  "Datagrams sent to the peer and not acknowledged yet"),
            "resend_queue_records": ("fleet_resend_queue_records",
                                     "Records held for resending to the peer"),
            "pending_records": ("fleet_pending_records", "Records queued for the peer and "
                                                         "not sent yet"),
        }
        fams = {key: self._family(name, "gauge", doc, ["peer"])
                for key, (name, doc) in specs.items()}
        for pid, p in sorted(peers.items(), key=lambda kv: int(kv[0])):
            for key, fam in fams.items():
                fam.add_metric([self.node, str(pid)], float(p.get(key) or 0))
        yield from fams.values()


# --- the HTTP server ---------------------------------------------------------------------

@dataclass
class MetricsServer:
    host: str
    port: int              # the port bound (the one asked for, or the kernel's for 0)
    netns: str | None
    _server: object
    _thread: threading.Thread

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/metrics"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(5)


def parse_addr(text: str) -> tuple[str, int]:
    """'HOST:PORT' (an IPv4 address and a port 0-65535; 0: any free port) -> (host, port),
    or a ConfigError that says what is wrong."""
    host, sep, port = str(text).rpartition(":")
    try:
        if not sep:
            raise ValueError
        ipaddress.IPv4Address(host)
        number = int(port)
        if not 0 <= number <= 65535:
            raise ValueError
    except ValueError:
        raise ConfigError(f"the metrics address must be HOST:PORT with an IPv4 address and "
                          f"a port 0-65535 (e.g. 0.0.0.0:9477), not {text!r}") from None
    return host, number


def serve(collector: NodeCollector, host: str, port: int,
          netns: str | None = None) -> MetricsServer:
    """Serve the collector's metrics at http://host:port/metrics (prometheus-client's
    server, threads of this process) with the listening socket in the network namespace
    netns (None: this process's own), so a node running in a namespace is scraped there."""
    from prometheus_client import CollectorRegistry, start_http_server

    from hyperplane import netns as netns_mod
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)

    def start():
        return start_http_server(port, host, registry)

    try:
        server, thread = netns_mod.call_in(netns, start) if netns else start()
    except OSError as exc:
        where = f" in network namespace {netns}" if netns else ""
        raise HyperplaneError(f"cannot serve metrics on {host}:{port}{where}: "
                              f"{exc.strerror or exc}") from None
    return MetricsServer(host, server.server_port, netns, server, thread)
