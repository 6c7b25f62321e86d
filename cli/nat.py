"""hpctl nat: bring a NAT gateway up on a node's interfaces, show it, take it down."""
from __future__ import annotations

import json

import click

from hyperplane.errors import ConfigError, NotFound
from hyperplane.datapath.loader import MODES
from hyperplane.nat.gateway import GatewayConfig, NodeConfig

from .options import emit_json, json_option, node_option, resolve_node

command = click.Group(
    "nat", help="NAT gateways on a node (XDP on the node's interfaces). Needs root.",
    epilog="\b\nExamples:\n"
           "  hpctl nat up --node gw1 --if eth1 --if eth2 --nat-ip 198.18.0.100 \\\n"
           "               --inside 10.10.0.0/24\n"
           "  hpctl nat up --node gw1 --config gw1.json\n"
           "  hpctl nat show --json\n"
           "  hpctl nat down --node gw1")


def _load_config_file(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except ValueError as exc:  # not UTF-8, not JSON
        raise ConfigError(f"config file {path} is not valid JSON: {exc}") from None


@command.command("up")
@click.option("--node", required=True, help="Name of this node (its maps are pinned under it).")
@click.option("--if", "ifnames", multiple=True, help="Interface to attach the data path to (repeat).")
@click.option("--netns", default=None, help="Network namespace the interfaces are in.")
@click.option("--nat-ip", "nat_ips", multiple=True, help="Public NAT IP (repeat, up to 8).")
@click.option("--inside", "inside", multiple=True, help="Inside network CIDR (repeat).")
@click.option("--ports", default="1024-65535", show_default=True, help="NAT port range.")
@click.option("--mode", "--xdp-mode", "mode", default=None,
              help=f"How the data path attaches: one of {', '.join(MODES)}, checked by the "
                   f"loader (default: its own, auto).")
@click.option("--outside-if", default=None,
              help="Interface to add the NAT IPs to as /32 addresses (default: the one whose "
                   "network holds them, else the one of the default route).")
@click.option("--agent/--no-agent", default=True, show_default=True,
              help="Start the node agent in the background (garbage collection of expired "
                   "flows, load balancers from the store).")
@click.option("--config", "config_file", type=click.Path(dir_okay=False),
              help='JSON: {"ifnames": [...], "netns": ..., "xdp_mode": ..., "outside_if": ..., '
                   '"timeouts": {...}, "gateways": [{"name", "nat_ips", "inside_cidrs", '
                   '"port_min", "port_max"}]}')
def up_cmd(node, ifnames, netns, nat_ips, inside, ports, mode, outside_if, agent,
           config_file):
    """Load the data path, configure the gateway(s), attach, and add the NAT IPs the node
    does not have yet. All or nothing: on an error the node is left as it was. Flows
    survive a re-run; what a re-run no longer lists (NAT IPs, networks, interfaces) goes."""
    from hyperplane.node.lifecycle import start_nat_node
    cfg = NodeConfig.from_dict(_load_config_file(config_file)) if config_file else NodeConfig()
    ifnames = list(ifnames) or cfg.ifnames
    if not ifnames:
        raise click.UsageError("give at least one --if (or ifnames in --config)")
    if cfg.gateways and (nat_ips or inside):
        raise click.UsageError("give the gateways either in --config or with --nat-ip and "
                               "--inside, not both")
    gws = cfg.gateways
    if not gws:
        try:
            lo, hi = (int(x) for x in ports.split("-"))
        except ValueError:
            raise click.BadParameter("use FIRST-LAST, e.g. 1024-65535", param_hint="--ports")
        gws = [GatewayConfig(name=f"{node}-gw", gw_id=0, nat_ips=list(nat_ips),
                             inside_cidrs=list(inside), port_min=lo, port_max=hi)]
    start_nat_node(node, ifnames, gws, netns=netns or cfg.netns, mode=mode or cfg.xdp_mode,
                   timeouts=cfg.timeouts, outside_if=outside_if or cfg.outside_if)
    click.echo(f"node {node}: NAT up on {', '.join(ifnames)}", err=True)
    if agent:
        from hyperplane.node.agent import spawn_agent, stop_agent
        stop_agent(node)  # a re-run replaces the agent too
        pid = spawn_agent(node)
        click.echo(f"node {node}: agent running (pid {pid})", err=True)


@command.command("show")
@node_option
@json_option
def show_cmd(node, as_json):
    """The node's gateways, interfaces, settings and the addresses it added."""
    from hyperplane.node.lifecycle import node_state
    state = node_state(resolve_node(node))
    if as_json:
        emit_json(state)
        return
    click.echo(f"node {state['node']} (netns {state['netns'] or '-'}, data path on "
               f"{', '.join(state['ifnames'])}, mode {state['mode'] or 'default'})")
    for gw in state["gateways"]:
        click.echo(f"  gateway {gw['name']} [{gw['gw_id']}]: NAT IPs {', '.join(gw['nat_ips'])}; "
                   f"inside {', '.join(gw['inside_cidrs'])}; ports {gw['port_min']}-{gw['port_max']}")
    click.echo("  timeouts: " + ", ".join(f"{k} {v}s" for k, v in state["timeouts"].items()))
    added = state.get("addresses") or []
    click.echo("  addresses added: " + (", ".join(f"{a['ip']}/32 on {a['ifname']}"
                                                  for a in added) or "none"))


@command.command("down")
@node_option
def down_cmd(node):
    """Detach, remove the addresses it added and the node's maps (every flow is forgotten)."""
    from hyperplane.node.lifecycle import node_exists, stop_node
    node = resolve_node(node)
    if not node_exists(node):
        raise NotFound(f"no node {node!r} here: nothing to stop (hpctl nat show lists the "
                       f"running one)")
    for warning in stop_node(node):
        click.echo(f"hpctl: warning: {warning}", err=True)
    click.echo(f"node {node}: stopped", err=True)


@command.command("gc")
@node_option
@json_option
def gc_cmd(node, as_json):
    """Delete expired flows and stale port reservations now."""
    from hyperplane.datapath.flows import collect_garbage
    from hyperplane.node.lifecycle import open_node
    res = collect_garbage(open_node(resolve_node(node)))
    if as_json:
        emit_json(vars(res))
    else:
        click.echo(f"removed {res.flows_removed} flow entries, "
                   f"{res.reservations_removed} port reservations")
