"""hpctl top: a live dashboard of a node (verdict rates, metrics, targets, top flows)."""
from __future__ import annotations

import click
from rich.console import Console
from rich.live import Live

from .options import emit_json, json_option, node_option, resolve_node


@click.command("top", epilog="\b\nExamples:\n  hpctl top\n  hpctl top --interval 0.5\n"
                             "  hpctl top --once --json")
@node_option
@click.option("--interval", type=float, default=1.0, show_default=True, help="Seconds per frame.")
@click.option("--once", is_flag=True, help="Print one frame (rates over one interval) and exit.")
@json_option
def command(node, interval, once, as_json):
    """Watch a node live: packets per verdict and per second, gateway and load balancer
    metrics, target health, the biggest flows. Ctrl-C stops."""
    import time
    from dataclasses import asdict

    from hyperplane.observe.dashboard import render, take
    from hyperplane.node.lifecycle import open_node

    from hyperplane.node.agent import status_or_none
    node = resolve_node(node)
    dp = open_node(node)

    def snap(prev):
        return take(node, dp, prev, status_or_none(node))

    if once or as_json:
        first = snap(None)
        time.sleep(interval)
        s = snap(first)
        if as_json:
            emit_json(asdict(s))
        else:
            Console(width=max(Console().width, 120)).print(render(s))
        return
    s = snap(None)
    try:
        with Live(render(s), refresh_per_second=4, screen=False) as live:
            while True:
                time.sleep(interval)
                s = snap(s)
                live.update(render(s))
    except KeyboardInterrupt:
        pass
