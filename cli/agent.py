"""hpctl agent: run a node's agent in the foreground (health checks, Maglev tables, drains)."""
from __future__ import annotations

import click

from hyperplane.fleet.store import DEFAULT_STORE

from .options import node_option, resolve_node

command = click.Group("agent", help="The node agent.")


@command.command("run")
@node_option
@click.option("--store", "store_url", default=DEFAULT_STORE, show_default=True,
              envvar="HPCTL_STORE",
              help="The cluster store: a file (PATH or file:PATH) or etcd://HOST:PORT.")
@click.option("--tick", type=click.FloatRange(min=0.01), default=0.2, show_default=True,
              help="Seconds between ticks.")
def run(node, store_url, tick):
    """Run until SIGTERM / Ctrl-C."""
    from hyperplane.node import agent
    raise SystemExit(agent.main(["--node", resolve_node(node), "--store", store_url,
                                 "--tick", str(tick)]))
