"""The live dashboard's model: a snapshot of a node, and a pure render() of it (rich).

hpctl top takes a snapshot every interval and shows render(snapshot) in a rich Live."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from rich.console import Group
from rich.table import Table


@dataclass
class Snapshot:
    node: str
    taken: float                                   # time.monotonic()
    verdicts: dict[str, int]
    rates: dict[str, float]                        # verdict -> packets/s since the last one
    gateways: dict[str, dict[str, int]] = field(default_factory=dict)
    load_balancers: dict[str, dict[str, int]] = field(default_factory=dict)
    targets: dict[str, dict[str, dict]] = field(default_factory=dict)   # from the agent
    top_flows: list[dict] = field(default_factory=list)                 # by bytes


def take(node: str, dp, previous: Snapshot | None, status: dict | None, top: int = 8) -> Snapshot:
    from hyperplane.datapath.flows import list_flows
    from hyperplane.observe.metrics import gateway_metrics, load_balancer_metrics, verdict_counts
    from hyperplane.node.lifecycle import node_state
    now = time.monotonic()
    verdicts = verdict_counts(dp)
    rates = {}
    if previous is not None and now > previous.taken:
        dt = now - previous.taken
        rates = {k: (v - previous.verdicts.get(k, 0)) / dt for k, v in verdicts.items()}
    flows = [f for f in list_flows(dp) if f.live and f.kind in ("NAT_OUT", "NLB_IN")]
    flows.sort(key=lambda f: f.bytes, reverse=True)
    return Snapshot(
        node=node, taken=now, verdicts=verdicts, rates=rates,
        gateways={g["name"]: gateway_metrics(dp, g["gw_id"])
                  for g in node_state(node)["gateways"]},
        load_balancers={str(k): v for k, v in load_balancer_metrics(dp, status).items()},
        targets=(status or {}).get("target_groups", {}),
        top_flows=[f.to_dict() for f in flows[:top]])


def render(s: Snapshot) -> Group:
    """Everything a person watching the node needs, from the snapshot alone."""
    total = sum(s.verdicts.values())
    v = Table(title=f"node {s.node}: {total:,} packets", expand=False)
    v.add_column("verdict")
    v.add_column("packets", justify="right")
    v.add_column("per second", justify="right")
    for name, n in s.verdicts.items():
        if n:
            v.add_row(name, f"{n:,}", f"{s.rates.get(name, 0):,.0f}")
    parts = [v]
    for title, metrics in [(f"gateway {g}", m) for g, m in s.gateways.items()] + \
            [(f"load balancer {lb}", m) for lb, m in s.load_balancers.items()]:
        t = Table(title=title)
        t.add_column("metric")
        t.add_column("value", justify="right")
        for name, n in metrics.items():
            t.add_row(name, f"{n:,}")
        parts.append(t)
    if s.targets:
        t = Table(title="targets")
        for col in ("group", "target", "state", "active flows", "packets"):
            t.add_column(col)
        for group, targets in s.targets.items():
            for ident, st in targets.items():
                t.add_row(group, ident, st["state"], str(st["active_flows"]), f"{st['packets']:,}")
        parts.append(t)
    f = Table(title="top flows by bytes")
    for col in ("kind", "proto", "flow", "translated", "state", "bytes"):
        f.add_column(col, no_wrap=True)
    for fl in s.top_flows:
        f.add_row(fl["kind"], fl["proto"], f"{fl['src']}:{fl['sport']} > {fl['dst']}:{fl['dport']}",
                  f"{fl['new_src']}:{fl['new_sport']} > {fl['new_dst']}:{fl['new_dport']}",
                  fl["tcp_state"], f"{fl['bytes']:,}")
    parts.append(f)
    return Group(*parts)
