"""hpctl counters: verdict counters, events and per-gateway metrics (AWS names)."""
from __future__ import annotations

import click

from .options import emit_json, json_option, node_option, resolve_node


@click.command("counters", epilog="\b\nExamples:\n  hpctl counters\n  hpctl counters --json")
@node_option
@click.option("--nonzero/--all", default=True, help="Hide counters that are zero.")
@json_option
def command(node, nonzero, as_json):
    """Packets per verdict (every packet ends in exactly one), events, gateway metrics."""
    from hyperplane.node.status import status_or_none
    from hyperplane.observe.metrics import (gateway_metrics, load_balancer_metrics, stat_counts,
                                    verdict_counts)
    from hyperplane.node.lifecycle import node_state, open_node
    node = resolve_node(node)
    state = node_state(node)
    with open_node(node) as dp:  # the pinned maps: no compile
        data = {
            "node": node,
            "verdicts": verdict_counts(dp),
            "events": stat_counts(dp),
            "gateways": {gw["name"]: gateway_metrics(dp, gw["gw_id"])
                         for gw in state["gateways"]},
            "load_balancers": {str(k): v for k, v in
                               load_balancer_metrics(dp, status_or_none(node)).items()},
        }
    data["packets"] = sum(data["verdicts"].values())
    if as_json:
        emit_json(data)
        return
    from rich.console import Console  # only for tables: --json does without
    from rich.table import Table
    console = Console()
    t = Table(title=f"node {node}: {data['packets']} packets")
    t.add_column("verdict")
    t.add_column("packets", justify="right")
    for name, n in data["verdicts"].items():
        if n or not nonzero:
            t.add_row(name, str(n))
    console.print(t)
    sections = [(f"gateway {gw}", m) for gw, m in data["gateways"].items()] + \
        [(f"load balancer id {lb}", m) for lb, m in data["load_balancers"].items()]
    for title, metrics in sections:
        m = Table(title=title)
        m.add_column("metric")
        m.add_column("value", justify="right")
        for name, n in metrics.items():
            if n or not nonzero:
                m.add_row(name, str(n))
        console.print(m)

