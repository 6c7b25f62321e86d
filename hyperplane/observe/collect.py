"""Readings of the fleet for hpctl top: the counters of every node on this host (their pinned
maps, nothing compiled), their agents' status files (health, fleet membership, replication
lag), and optionally the store's members (nodes elsewhere). Two readings make a
FleetSnapshot of rates; a FleetCollector keeps the last minute of them for sparklines.

Every read is O(resources) per node, except the NAT ports per destination: that is one
batched read of the nodes' reservation maps (nat_resv, keyed by destination), done every
`destinations_every_s` rather than every frame."""
from __future__ import annotations

import ctypes
import errno
import math
import socket
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from hyperplane.errors import HyperplaneError
from hyperplane.observe.snapshot import (DestinationRow, DropRow, FleetSnapshot, NodeRow,
                                         ResourceRow, TargetRow)

# per resource, the counters a reading keeps: packets, bytes, new flows, drops (totals)
# and the AWS metric each comes from (hyperplane.observe.metrics)
NAT_FIELDS = {"packets": ("PacketsInFromSource", "PacketsInFromDestination"),
              "bytes": ("BytesInFromSource", "BytesInFromDestination"),
              "new": ("ConnectionAttemptCount",), "drops": ("PacketsDropCount",)}
NLB_FIELDS = {"packets": ("ProcessedPackets",), "bytes": ("ProcessedBytes",),
              "new": ("NewFlowCount",), "drops": ("FlowsRefusedCount",)}


@dataclass
class ResourceReading:
    packets: int = 0
    bytes: int = 0
    new: int = 0
    drops: int = 0
    active: int = 0
    port_alloc_errors: int = 0


@dataclass
class NodeReading:
    """One node's counters at one moment (totals, not rates)."""
    name: str
    at: float                                  # time.monotonic()
    verdicts: dict[str, int] = field(default_factory=dict)
    resources: dict[str, ResourceReading] = field(default_factory=dict)
    status: dict | None = None                 # its agent's status (running), or None
    agent: str = "none"
    error: str | None = None


def _resource(metrics: dict, fields: dict, active_key: str) -> ResourceReading:
    r = ResourceReading(**{k: sum(int(metrics.get(m, 0)) for m in names)
                           for k, names in fields.items()})
    r.active = int(metrics.get(active_key, 0))
    r.port_alloc_errors = int(metrics.get("ErrorPortAllocation", 0))
    return r


def read_node(name: str, lb_names: dict[int, str]) -> NodeReading:
    """The node's counters from its pins and its agent's status; a node that cannot be
    read gives a reading with `error` set (it may be stopping)."""
    from hyperplane.node.status import read_status
    from hyperplane.node.lifecycle import node_state, open_node
    from hyperplane.observe.metrics import gateway_metrics, load_balancer_metrics, verdict_counts
    reading = NodeReading(name, time.monotonic())
    try:
        status = read_status(name)
        reading.agent = "running" if status["running"] else "not running"
        reading.status = status if status["running"] else None
    except HyperplaneError:
        pass
    try:
        state = node_state(name)
        with open_node(name) as dp:
            reading.at = time.monotonic()
            reading.verdicts = verdict_counts(dp)
            for gw in state["gateways"]:
                reading.resources[f"nat:{gw['name']}"] = _resource(
                    gateway_metrics(dp, gw["gw_id"]), NAT_FIELDS, "ActiveConnectionCount")
            for lb_id, m in load_balancer_metrics(dp, reading.status).items():
                reading.resources[f"lb:{lb_names.get(lb_id, f'#{lb_id}')}"] = _resource(
                    m, NLB_FIELDS, "ActiveFlowCount")
    except (HyperplaneError, OSError) as exc:
        reading.error = str(exc)
    return reading


def _rate(new: int, old: int, dt: float) -> float:
    """Per second; a counter that went back (the node restarted) gives 0, not a negative."""
    return max(0, new - old) / dt if dt > 0 else 0.0


def replication_lag_ms(status: dict | None) -> float | None:
    """The age of the oldest record a peer has not acknowledged, worst peer (ms)."""
    fleet = (status or {}).get("fleet")
    sync = fleet.get("sync") if isinstance(fleet, dict) else None
    if not isinstance(sync, dict):
        return None
    lags = [p.get("ack_lag_s") for p in (sync.get("peers") or {}).values()
            if isinstance(p, dict) and p.get("member", True)]
    lags = [x for x in lags if isinstance(x, (int, float))]
    return max(lags) * 1000.0 if lags else 0.0


def _reservation_keys(table):
    """The raw key (bytes) of every reservation in a nat_resv map, batch by batch without a
    ctypes object per entry (hyperplane.datapath.pinned.PinnedMap.raw_batches)."""
    ksize = ctypes.sizeof(table.Key)
    try:
        for keys, _, count in table.raw_batches():
            buf = bytes(keys)
            for i in range(0, count * ksize, ksize):
                yield buf[i:i + ksize]
    except OSError as exc:   # no batch operations on this kernel: one entry at a time
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, 524):
            raise
        for key, _ in table.items_lookup_batch():
            yield bytes(key)


def destinations(nodes: list[str], top: int) -> list[DestinationRow]:
    """NAT ports in use per destination, from the nodes' reservation maps (nat_resv: a
    reservation per (NAT IP, NAT port, proto, destination IP, destination port)), the `top`
    busiest first. A reservation replicated to several nodes counts once. Costs one batched
    read of the maps: ~25 ms for 20,000 reservations (docs/operations.md)."""
    from hyperplane.codec import PROTOCOL_NAMES
    from hyperplane.node.lifecycle import node_state, open_node
    seen: set[bytes] | None = set() if len(nodes) > 1 else None   # one node: no copies
    used: Counter = Counter()
    gateway_of: dict[bytes, tuple[str, int]] = {}   # NAT IP -> (gateway, ports it has)
    for name in nodes:
        try:
            for gw in node_state(name)["gateways"]:
                total = len(gw["nat_ips"]) * (gw["port_max"] - gw["port_min"] + 1)
                for ip in gw["nat_ips"]:
                    gateway_of[socket.inet_aton(ip)] = (gw["name"], total)
            with open_node(name) as dp:
                table = dp.table("nat_resv")
                fields = [getattr(table.Key, f) for f in ("nat_ip", "dst_ip", "dst_port", "proto")]
                (a, _), (b, _), (c, _), (d, _) = [(f.offset, f.size) for f in fields]
                for k in _reservation_keys(table):
                    if seen is not None:
                        if k in seen:
                            continue
                        seen.add(k)
                    used[(k[a:a + 4], k[b:b + 4], k[c:c + 2], k[d])] += 1
        except (HyperplaneError, OSError):
            continue   # the node is shown with its error in the nodes view
    rows = []
    for (nat_ip, dst_ip, dst_port, proto), n in used.most_common(top):
        gw, total = gateway_of.get(nat_ip, ("?", 0))
        rows.append(DestinationRow(
            gateway=gw, destination=f"{socket.inet_ntoa(dst_ip)}:"
            f"{int.from_bytes(dst_port, 'big')}/{PROTOCOL_NAMES.get(proto, str(proto))}",
            ports_used=n, ports_total=total))
    rows.sort(key=lambda r: (-r.ports_used, r.gateway, r.destination))
    return rows


def store_view(store_url: str | None) -> tuple[dict, dict[int, str], str | None]:
    """(live members name -> Member, load balancer id -> name, error) from the store."""
    if not store_url:
        return {}, {}, None
    from hyperplane.fleet import cluster
    from hyperplane.fleet.store import NLB_KEY, open_store
    from hyperplane.nlb.config import NlbConfig
    try:
        with open_store(store_url) as store:
            members = cluster.members(store)
            entry = store.get(NLB_KEY)
        names = {}
        if entry and entry.value:
            names = {lb.lb_id: lb.name for lb in NlbConfig.from_dict(entry.value).load_balancers}
        return members, names, None
    except HyperplaneError as exc:
        return {}, {}, f"the store {store_url} cannot be read: {exc}"


class FleetCollector:
    """Readings of the nodes here, kept between frames: sample() returns the snapshot of
    the rates since the previous sample and the last `history_s` of them."""

    def __init__(self, nodes: list[str] | None = None, store_url: str | None = None, *,
                 step_s: float = 1.0, history_s: float = 60.0, top_destinations: int = 10,
                 destinations_every_s: float = 5.0):
        self.only = nodes                 # None: every node running on this host
        self.store_url = store_url
        self.step_s = step_s
        self.top_destinations = top_destinations
        self.destinations_every_s = destinations_every_s
        self.keep = max(2, math.ceil(history_s / step_s))
        self.previous: dict[str, NodeReading] = {}
        self.node_history: dict[str, deque] = {}
        self.resource_history: dict[tuple[str, str], deque] = {}
        self.fleet_history: deque = deque(maxlen=self.keep)
        self._destinations: list[DestinationRow] = []
        self._destinations_at = -math.inf

    def _history(self, table: dict, key, value: float) -> list[float]:
        h = table.setdefault(key, deque(maxlen=self.keep))
        h.append(value)
        return list(h)

    def nodes_here(self) -> list[str]:
        from hyperplane.node.lifecycle import running_nodes
        return list(self.only) if self.only is not None else running_nodes()

    def sample(self) -> FleetSnapshot:
        members, lb_names, store_error = store_view(self.store_url)
        names = self.nodes_here()
        readings = {n: read_node(n, lb_names) for n in names}
        snap = FleetSnapshot(taken=time.time(), interval_s=0.0, history_step_s=self.step_s)
        if store_error:
            snap.notes.append(store_error)
        intervals = []
        for name, r in readings.items():
            prev = self.previous.get(name)
            usable = prev is not None and prev.error is None and r.error is None
            dt = r.at - prev.at if usable else 0.0
            if usable:
                intervals.append(dt)
            snap.nodes.append(self._node_row(r, prev if usable else None, dt, members))
            for res, rr in sorted(r.resources.items()):
                old = prev.resources.get(res) if usable else None
                snap.resources.append(self._resource_row(name, res, rr, old, dt))
            for reason, total in sorted(r.verdicts.items()):
                if reason.startswith("DROP_") and total:
                    before = prev.verdicts.get(reason, 0) if usable else total
                    snap.drops.append(DropRow(name, reason, _rate(total, before, dt), total))
            for group, targets in sorted(((r.status or {}).get("target_groups") or {}).items()):
                for ident, t in sorted(targets.items()):
                    snap.targets.append(TargetRow(name, group, ident, str(t.get("state")),
                                                  int(t.get("active_flows") or 0)))
        for name, m in sorted(members.items()):   # members elsewhere: membership only
            if name not in readings:
                snap.nodes.append(NodeRow(name=name, here=False, live=True, ready=m.ready,
                                          agent="elsewhere"))
        self.previous = readings
        snap.interval_s = round(sum(intervals) / len(intervals), 3) if intervals else 0.0
        self.fleet_history.append(snap.pps)
        snap.pps_history = list(self.fleet_history)
        now = time.monotonic()
        if now - self._destinations_at >= self.destinations_every_s:
            self._destinations = destinations(names, self.top_destinations)
            self._destinations_at = now
        snap.destinations = list(self._destinations)
        return snap

    def _node_row(self, r: NodeReading, prev: NodeReading | None, dt: float,
                  members: dict) -> NodeRow:
        fleet = (r.status or {}).get("fleet")
        live = ready = None
        if isinstance(fleet, dict):
            live, ready = r.name in (fleet.get("members") or {}), bool(fleet.get("ready"))
        if r.name in members:
            live, ready = True, members[r.name].ready
        row = NodeRow(name=r.name, here=True, live=live, ready=ready, agent=r.agent,
                      lag_ms=replication_lag_ms(r.status), error=r.error)
        row.active_flows = sum(x.active for x in r.resources.values())
        if prev is not None:
            row.pps = _rate(sum(r.verdicts.values()), sum(prev.verdicts.values()), dt)
            row.drops_ps = _rate(sum(v for k, v in r.verdicts.items() if k.startswith("DROP_")),
                                 sum(v for k, v in prev.verdicts.items()
                                     if k.startswith("DROP_")), dt)
            for res, x in r.resources.items():
                old = prev.resources.get(res, ResourceReading())
                row.bps += 8 * _rate(x.bytes, old.bytes, dt)
                row.new_flows_ps += _rate(x.new, old.new, dt)
        row.pps_history = self._history(self.node_history, r.name, row.pps)
        return row

    def _resource_row(self, node: str, res: str, x: ResourceReading,
                      old: ResourceReading | None, dt: float) -> ResourceRow:
        row = ResourceRow(resource=res, node=node, active_flows=x.active,
                          port_alloc_errors=x.port_alloc_errors)
        if old is not None:
            row.pps = _rate(x.packets, old.packets, dt)
            row.bps = 8 * _rate(x.bytes, old.bytes, dt)
            row.new_flows_ps = _rate(x.new, old.new, dt)
            row.drops_ps = _rate(x.drops, old.drops, dt)
        row.pps_history = self._history(self.resource_history, (node, res), row.pps)
        return row


def take_pair(collector: FleetCollector, interval_s: float) -> FleetSnapshot:
    """Two samples interval_s apart: a snapshot with rates (hpctl top --once, --json, and
    when stdout is not a terminal)."""
    collector.sample()
    time.sleep(interval_s)
    return collector.sample()
