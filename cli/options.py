"""Option decorators shared by hpctl commands."""
import json as _json
import sys

import click


def json_option(f):
    """--json on every read command: machine-readable data on stdout."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(f)


def emit_json(data) -> None:
    # one write: json.dump to the stream writes every token separately (hpctl flows --json
    # of 20,000 entries spent 2 s of its 7 s in 1.6 million writes)
    sys.stdout.write(_json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def complete_node(ctx, param, incomplete: str) -> list[str]:
    """Shell completion of --node: the nodes running here."""
    from hyperplane.node.lifecycle import running_nodes
    return [n for n in running_nodes() if n.startswith(incomplete)]


def node_option(f):
    """Which node's pinned data path to talk to (default: the only one running here)."""
    return click.option("--node", default=None, envvar="HPCTL_NODE",
                        shell_complete=complete_node,
                        help="Node name (default: the only node running on this machine; "
                             "the lab's is node1).")(f)


def resolve_node(node: str | None) -> str:
    from hyperplane.errors import NotFound
    from hyperplane.node.lifecycle import check_node_name, running_nodes
    if node:
        return check_node_name(node)
    nodes = running_nodes()
    if len(nodes) == 1:
        return nodes[0]
    if not nodes:
        raise NotFound("no node is running here; start one with hpctl lab up or hpctl nat up")
    raise click.UsageError(f"several nodes run here ({', '.join(nodes)}); pick one with --node")


# FleetConfig.sync_rt_priority's default, said here without importing the fleet (a unit
# test keeps the two equal)
SYNC_RT_PRIORITY_DEFAULT = 0
REFRESH_S_DEFAULT = 10.0
SWEEP_S_DEFAULT = 60.0


def sync_rt_priority_option(f):
    return click.option(
        "--sync-rt-priority", type=click.IntRange(0, 99), default=None, metavar="0-99",
        help="Run the fleet's sync task under SCHED_FIFO at this priority, so replication "
             "starts as soon as a flow event or datagram arrives; it then also preempts "
             f"ksoftirqd (default {SYNC_RT_PRIORITY_DEFAULT}: normal scheduling).")(f)


def fleet_tuning_options(f):
    """--sync-rt-priority, --refresh-s and --sweep-s: the agent's fleet settings."""
    f = click.option(
        "--sweep-s", type=click.FloatRange(min=0), default=None, metavar="SECONDS",
        help="Anti-entropy: every flow this node owns, idle ones too, goes to its replicas "
             f"once in this period, a slice per refresh (default {SWEEP_S_DEFAULT:g}; "
             "0: off).")(f)
    f = click.option(
        "--refresh-s", type=click.FloatRange(0.1, 3600), default=None, metavar="SECONDS",
        help="How often the flows that saw a packet lately go to their replicas again, so "
             f"they never expire there while the flow lives (default {REFRESH_S_DEFAULT:g}).")(f)
    return sync_rt_priority_option(f)
