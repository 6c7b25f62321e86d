"""hpctl agent: run a node's agent in the foreground (health checks, Maglev tables, drains)."""
from __future__ import annotations

import click

from hyperplane.fleet.store import DEFAULT_STORE

from .flowlogs import flow_log_options
from .options import fleet_tuning_options, node_option, resolve_node

command = click.Group("agent", help="The node agent.")


@command.command("run")
@flow_log_options
@node_option
@click.option("--store", "store_url", default=DEFAULT_STORE, show_default=True,
              envvar="HPCTL_STORE",
              help="The cluster store: a file (PATH or file:PATH) or etcd://HOST:PORT.")
@click.option("--tick", type=click.FloatRange(min=0.01), default=0.2, show_default=True,
              help="Seconds between ticks.")
@click.option("--sync-dev", default=None, metavar="IFNAME",
              help="The node's interface on the fleet's sync network: join the fleet "
                   "(replication, second chance, shards, port blocks).")
@fleet_tuning_options
@click.option("--if", "ifnames", multiple=True,
              help="Load and attach the data path on this interface (repeat) unless the "
                   "node already runs there; the node then runs the NAT gateways the store "
                   "assigns it (what hpctl node up does, in the foreground).")
@click.option("--netns", default=None, help="With --if: the interfaces' network namespace.")
@click.option("--mode", default=None, help="With --if: how the data path attaches.")
@click.option("--outside-if", default=None, help="With --if: where NAT IPs and VIPs go.")
@click.option("--metrics-addr", default=None, metavar="HOST:PORT",
              help="Serve Prometheus metrics at http://HOST:PORT/metrics, in the node's "
                   "network namespace (e.g. 0.0.0.0:9477; default: none).")
def run(flow_log_argv, metrics_addr, node, store_url, tick, sync_dev, sync_rt_priority, refresh_s,
        sweep_s, ifnames, netns, mode, outside_if):
    """Run until SIGTERM / Ctrl-C."""
    from hyperplane.node import agent
    from hyperplane.node.agent import fleet_args, load_args
    if not ifnames and (netns or mode or outside_if):
        raise click.UsageError("--netns, --mode and --outside-if go with --if")
    load = {"ifnames": list(ifnames), "netns": netns, "mode": mode,
            "outside_if": outside_if} if ifnames else None
    raise SystemExit(agent.main([*flow_log_argv, *(["--metrics-addr", metrics_addr] if metrics_addr else []),
                                 "--node", resolve_node(node), "--store", store_url,
                                 "--tick", str(tick),
                                 *(["--sync-dev", sync_dev] if sync_dev else []),
                                 *fleet_args(sync_rt_priority, refresh_s, sweep_s),
                                 *load_args(load)]))
