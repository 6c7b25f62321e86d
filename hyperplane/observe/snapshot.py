"""The fleet dashboard's model: what `hpctl top` shows, as plain dataclasses.

A FleetSnapshot holds rates already computed (hyperplane.observe.collect makes them from
two readings of the nodes' counters), so render() (hyperplane.observe.dashboard) is a pure
function of it, and a snapshot saved as JSON (to_dict / from_dict) renders the same later:
the render tests use recorded ones."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass
class NodeRow:
    """One node: its traffic (nodes on this host), its membership (store or agent)."""
    name: str
    here: bool                   # its pinned maps are on this host (the numbers are read)
    live: bool | None = None     # a member of the fleet (None: not in a fleet)
    ready: bool | None = None    # takes traffic (fleet)
    agent: str = "none"          # "running", "not running", "none"
    pps: float = 0.0             # packets/s, every verdict
    bps: float = 0.0             # bits/s of its gateways' and load balancers' traffic
    active_flows: int = 0
    new_flows_ps: float = 0.0
    drops_ps: float = 0.0        # packets/s ending in a DROP_* verdict
    lag_ms: float | None = None  # replication: age of the oldest unacked record, worst peer
    pps_history: list[float] = field(default_factory=list)   # oldest first
    error: str | None = None     # why its numbers are missing


@dataclass
class ResourceRow:
    """One resource (nat:<gateway>, lb:<name>) on one node."""
    resource: str
    node: str
    pps: float = 0.0
    bps: float = 0.0
    active_flows: int = 0
    new_flows_ps: float = 0.0
    drops_ps: float = 0.0          # NAT: PacketsDropCount/s; NLB: flows refused/s
    port_alloc_errors: int = 0     # NAT: ErrorPortAllocation (total)
    pps_history: list[float] = field(default_factory=list)


@dataclass
class DropRow:
    node: str
    reason: str                  # a DROP_* verdict
    per_s: float
    total: int


@dataclass
class DestinationRow:
    """NAT ports in use toward one destination (the nodes' nat_resv, deduplicated)."""
    gateway: str
    destination: str             # "198.18.0.2:80/tcp"
    ports_used: int
    ports_total: int             # NAT IPs x ports of the gateway: the most it can use


@dataclass
class TargetRow:
    """A load balancer target as one node's agent sees it."""
    node: str
    group: str
    target: str
    state: str
    active_flows: int = 0


@dataclass
class FleetSnapshot:
    taken: float                           # wall-clock time (time.time())
    interval_s: float                      # the rates are over this
    history_step_s: float                  # seconds between two history samples
    nodes: list[NodeRow] = field(default_factory=list)
    resources: list[ResourceRow] = field(default_factory=list)
    drops: list[DropRow] = field(default_factory=list)
    destinations: list[DestinationRow] = field(default_factory=list)
    targets: list[TargetRow] = field(default_factory=list)
    pps_history: list[float] = field(default_factory=list)   # the whole fleet's, oldest first
    notes: list[str] = field(default_factory=list)          # what could not be read

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "FleetSnapshot":
        rows = {"nodes": NodeRow, "resources": ResourceRow, "drops": DropRow,
                "destinations": DestinationRow, "targets": TargetRow}
        known = {f.name for f in fields(cls)}
        kwargs = {k: v for k, v in data.items() if k in known}
        for key, row in rows.items():
            kwargs[key] = [row(**r) for r in data.get(key, [])]
        return cls(**kwargs)

    # --- totals over the fleet ----------------------------------------------------------
    @property
    def pps(self) -> float:
        return sum(n.pps for n in self.nodes)

    @property
    def bps(self) -> float:
        return sum(n.bps for n in self.nodes)

    @property
    def active_flows(self) -> int:
        return sum(n.active_flows for n in self.nodes)

    @property
    def new_flows_ps(self) -> float:
        return sum(n.new_flows_ps for n in self.nodes)

    @property
    def drops_ps(self) -> float:
        return sum(n.drops_ps for n in self.nodes)
