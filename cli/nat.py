"""hpctl nat: bring a NAT gateway up on a node's interfaces, show it, take it down."""
from __future__ import annotations

import json

import click

from hyperplane.errors import ConfigError, NotFound
from hyperplane.datapath.loader import MODES
from hyperplane.fleet.store import DEFAULT_STORE
from hyperplane.nat.gateway import GatewayConfig, NodeConfig

from .options import emit_json, json_option, node_option, resolve_node

command = click.Group(
    "nat", help="NAT gateways: in the cluster store, run by the nodes of their shard "
                "(create, delete, list), or on one node by hand (up, show, down, gc). "
                "Needs root.",
    epilog="\b\nExamples:\n"
           "  hpctl nat up --node gw1 --if eth1 --if eth2 --nat-ip 198.18.0.100 \\\n"
           "               --inside 10.10.0.0/24\n"
           "  hpctl nat up --node gw1 --config gw1.json\n"
           "  hpctl nat up --node gw1 --if eth1 --nat-ip 198.18.0.100 --inside 10.10.0.0/24 \\\n"
           "               --shard-size 2 --store etcd://10.0.0.1:2379\n"
           "  hpctl nat create gw1 --nat-ip 198.18.0.100 --inside 10.10.0.0/24 --shard-size 2\n"
           "  hpctl nat list --json\n"
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
@click.option("--shard-size", type=click.IntRange(1, 64), default=None,
              help="How many of the fleet's nodes carry each gateway (default: 3, or all "
                   "when fewer; a gateway already in the store keeps its size).")
@click.option("--store", "store_url", default=DEFAULT_STORE, show_default=True,
              envvar="HPCTL_STORE",
              help="The cluster store the gateways are written to (/nat) and the agent "
                   "reads: a file (PATH or file:PATH) or etcd://HOST:PORT.")
def up_cmd(node, ifnames, netns, nat_ips, inside, ports, mode, outside_if, agent,
           config_file, shard_size, store_url):
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
        lo, hi = _port_range(ports)
        gws = [GatewayConfig(name=f"{node}-gw", gw_id=0, nat_ips=list(nat_ips),
                             inside_cidrs=list(inside), port_min=lo, port_max=hi)]
    start_nat_node(node, ifnames, gws, netns=netns or cfg.netns, mode=mode or cfg.xdp_mode,
                   timeouts=cfg.timeouts, outside_if=outside_if or cfg.outside_if)
    click.echo(f"node {node}: NAT up on {', '.join(ifnames)}", err=True)
    from hyperplane.errors import HyperplaneError
    try:
        _publish(store_url, gws, shard_size)
        unpublished = None
    except HyperplaneError as exc:  # the node is up: start its agent all the same
        unpublished = exc
    if agent:
        from hyperplane.node.agent import spawn_agent, stop_agent
        stop_agent(node)  # a re-run replaces the agent too
        pid = spawn_agent(node, store_url=store_url)
        click.echo(f"node {node}: agent running (pid {pid})", err=True)
    if unpublished is not None:
        click.echo(f"hpctl: node {node} is up but its gateways are not in the store "
                   f"{store_url} (run nat up again): {unpublished}", err=True)
        raise SystemExit(unpublished.exit_status)


def _publish(store_url: str, gateways: list[GatewayConfig], shard_size: int | None) -> None:
    """Write the gateways into the store's /nat (the fleet's NAT config: same name,
    replaced; others kept) and give each its shard of the fleet's named nodes."""
    from hyperplane.fleet.cluster import NAT_KEY, ensure_shards
    from hyperplane.fleet.store import open_store

    def merge(value):
        old = value.get("gateways", []) if isinstance(value, dict) else []
        old = [g for g in old if isinstance(g, dict)]
        sizes = {g.get("name"): g["shard_size"] for g in old if "shard_size" in g}
        names = {gw.name for gw in gateways}
        new = []
        for gw in gateways:
            entry = gw.to_dict()
            size = shard_size if shard_size is not None else sizes.get(gw.name)
            if size is not None:
                entry["shard_size"] = size
            new.append(entry)
        return {**(value if isinstance(value, dict) else {}),
                "gateways": [g for g in old if g.get("name") not in names] + new}
    with open_store(store_url) as store:
        store.update(NAT_KEY, merge, default={"gateways": []})
        ensure_shards(store)


@command.command("create")
@click.argument("name")
@click.option("--nat-ip", "nat_ips", multiple=True, required=True,
              help="Public NAT IP (repeat, up to 8).")
@click.option("--inside", "inside", multiple=True, required=True,
              help="Inside network CIDR (repeat).")
@click.option("--ports", default="1024-65535", show_default=True, help="NAT port range.")
@click.option("--shard-size", type=click.IntRange(1, 64), default=None,
              help="How many of the fleet's nodes carry the gateway (default: 3, or all "
                   "when fewer).")
@click.option("--store", "store_url", default=DEFAULT_STORE, show_default=True,
              envvar="HPCTL_STORE", help="The cluster store (a file or etcd://HOST:PORT).")
def create_cmd(name, nat_ips, inside, ports, shard_size, store_url):
    """Put a NAT gateway into the cluster store (/nat) with the next free gateway id; the
    nodes of its shard that were started with `hpctl node up` run it. Replaces a gateway
    of the same name (keeping its id)."""
    from hyperplane.datapath.loader import Sizes
    from hyperplane.fleet.cluster import free_gateway_id, nat_gateways
    from hyperplane.fleet.store import open_store
    lo, hi = _port_range(ports)
    with open_store(store_url) as store:
        old = {g.get("name"): g for g in nat_gateways(store)}
        gw_id = old[name]["gw_id"] if name in old else \
            free_gateway_id(list(old.values()), Sizes().max_gateways)
    gw = GatewayConfig(name=name, gw_id=gw_id, nat_ips=list(nat_ips),
                       inside_cidrs=list(inside), port_min=lo, port_max=hi)
    _publish(store_url, [gw], shard_size)
    click.echo(f"gateway {name} (id {gw_id}) is in the store {store_url}", err=True)


@command.command("delete")
@click.argument("name")
@click.option("--store", "store_url", default=DEFAULT_STORE, show_default=True,
              envvar="HPCTL_STORE", help="The cluster store (a file or etcd://HOST:PORT).")
def delete_cmd(name, store_url):
    """Remove a NAT gateway from the cluster store; nodes run from the store drop it
    (its NAT IPs are removed; its flows end)."""
    from hyperplane.fleet.cluster import NAT_KEY, ensure_shards, nat_gateways
    from hyperplane.fleet.store import open_store
    with open_store(store_url) as store:
        if name not in {g.get("name") for g in nat_gateways(store)}:
            raise NotFound(f"there is no NAT gateway {name!r} in the store {store_url} "
                           f"(hpctl nat list shows them)")

        def drop(value):
            return {**value, "gateways": [g for g in value.get("gateways", [])
                                          if g.get("name") != name]}
        store.update(NAT_KEY, drop, default={"gateways": []})
        ensure_shards(store)
    click.echo(f"gateway {name} deleted from the store {store_url}", err=True)


@command.command("list")
@click.option("--store", "store_url", default=DEFAULT_STORE, show_default=True,
              envvar="HPCTL_STORE", help="The cluster store (a file or etcd://HOST:PORT).")
@json_option
def list_cmd(store_url, as_json):
    """The NAT gateways in the cluster store and each one's shard."""
    from hyperplane.fleet.cluster import SHARDS_KEY, nat_gateways, nat_resource, sharder
    from hyperplane.fleet.store import open_store
    with open_store(store_url) as store:
        gateways = nat_gateways(store)
        entry = store.get(SHARDS_KEY)
        shards = sharder(entry.value if entry else {}).shards
    rows = [{**g, "shard": list(shards.get(nat_resource(str(g.get("name"))), []))}
            for g in gateways]
    if as_json:
        emit_json(rows)
        return
    for g in rows:
        click.echo(f"{g['name']} [{g.get('gw_id')}]: NAT IPs {', '.join(g.get('nat_ips', []))}; "
                   f"inside {', '.join(g.get('inside_cidrs', []))}; "
                   f"nodes {', '.join(g['shard']) or '-'}")


def _port_range(ports: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in ports.split("-"))
    except ValueError:
        raise click.BadParameter("use FIRST-LAST, e.g. 1024-65535", param_hint="--ports")
    return lo, hi


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
