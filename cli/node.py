"""hpctl node: start a node whose agent loads the data path and runs what the cluster
store assigns it (NAT gateways by shard, load balancers), or stop it."""
from __future__ import annotations

import click

from hyperplane.errors import NotFound
from hyperplane.fleet.store import DEFAULT_STORE

from .options import fleet_tuning_options, node_option, resolve_node

command = click.Group(
    "node", help="A node run from the cluster store (its agent loads the data path). Needs root.",
    epilog="\b\nExamples:\n"
           "  hpctl node up --node n1 --if eth1 --if eth2 --store etcd://10.0.0.1:2379\n"
           "  hpctl node up --node n1 --netns hp-node1 --if in0 --if out0 --sync-dev sync0\n"
           "  hpctl nat create gw1 --nat-ip 198.18.0.100 --inside 10.10.0.0/24\n"
           "  hpctl node down --node n1")

# Loading compiles the C program once (about 10 s on a busy 2-core machine).
LOAD_TIMEOUT_S = 120.0


@command.command("up")
@click.option("--node", required=True, help="Name of this node (its maps are pinned under it).")
@click.option("--if", "ifnames", multiple=True, required=True,
              help="Interface to attach the data path to (repeat).")
@click.option("--netns", default=None, help="Network namespace the interfaces are in.")
@click.option("--mode", "--xdp-mode", "mode", default=None,
              help="How the data path attaches (default: the loader's own, auto).")
@click.option("--outside-if", default=None,
              help="Interface the NAT IPs and VIPs are added to (default: the one whose "
                   "network holds them, else the one of the default route).")
@click.option("--sync-dev", default=None, metavar="IFNAME",
              help="The node's interface on the fleet's sync network: join the fleet.")
@fleet_tuning_options
@click.option("--store", "store_url", default=DEFAULT_STORE, show_default=True,
              envvar="HPCTL_STORE",
              help="The cluster store: a file (PATH or file:PATH) or etcd://HOST:PORT.")
@click.option("--start-timeout", type=click.FloatRange(1, 86400), default=LOAD_TIMEOUT_S,
              show_default=True, metavar="SECONDS",
              help="How long the agent may take to load the data path and report (the C "
                   "compile: far longer on an emulated CPU, e.g. the Vagrant lab's VMs).")
def up_cmd(node, ifnames, netns, mode, outside_if, sync_dev, sync_rt_priority, refresh_s, sweep_s,
           store_url, start_timeout):
    """Start the node's agent, which loads and attaches the data path (unless it already
    runs there: flows are kept) and then runs the NAT gateways of the store (/nat) whose
    shard names this node, and the store's load balancers. No gateway is needed: a node
    with none is a load balancer only."""
    from hyperplane.node.agent import spawn_agent, stop_agent
    stop_agent(node)   # a re-run replaces the agent
    pid = spawn_agent(node, store_url, timeout_s=start_timeout, sync_dev=sync_dev,
                      sync_rt_priority=sync_rt_priority, refresh_s=refresh_s, sweep_s=sweep_s,
                      load={"ifnames": list(ifnames), "netns": netns, "mode": mode,
                            "outside_if": outside_if})
    click.echo(f"node {node}: data path on {', '.join(ifnames)}, agent running (pid {pid}); "
               f"NAT gateways and load balancers come from {store_url}", err=True)


@command.command("down")
@node_option
def down_cmd(node):
    """Stop the agent, detach, remove the addresses it added and the node's maps."""
    from hyperplane.node.lifecycle import node_exists, stop_node
    node = resolve_node(node)
    if not node_exists(node):
        raise NotFound(f"no node {node!r} here: nothing to stop")
    for warning in stop_node(node):
        click.echo(f"hpctl: warning: {warning}", err=True)
    click.echo(f"node {node}: stopped", err=True)
