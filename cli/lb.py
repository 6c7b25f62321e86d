"""hpctl lb: load balancers, listeners, target groups and targets (kept in the store; the
node agent applies them), and their health and flows per target."""
from __future__ import annotations

import time

import click
from rich.console import Console
from rich.table import Table

from hyperplane.errors import ConfigError
from hyperplane.nlb.config import NlbConfig
from hyperplane.fleet.store import DEFAULT_STORE, NLB_KEY, open_store

from .exit import Exit
from .options import emit_json, json_option, node_option, resolve_node

store_option = click.option("--store", "store_url", default=DEFAULT_STORE, show_default=True,
                            envvar="HPCTL_STORE",
                            help="The cluster store: a file (PATH or file:PATH) or "
                                 "etcd://HOST:PORT.")

command = click.Group(
    "lb", help="Network load balancers. Changes go to the store; each node's agent applies them.",
    epilog="\b\nExamples:\n"
           "  hpctl lb create web-nlb\n"
           "  hpctl lb tg create web --interval 5 --healthy 2 --unhealthy 2\n"
           "  hpctl lb listener add --lb web-nlb --vip 198.18.0.200 --port 80 --protocol TCP --tg web\n"
           "  hpctl lb register --tg web 10.20.1.10:8080 10.20.2.10:8080@2\n"
           "  hpctl lb deregister --tg web 10.20.1.10:8080     (drains)\n"
           "  hpctl lb health --json")


def _change(store_url: str, fn, *, adds: bool = True) -> dict:
    """Apply fn to the store's config, validating the result as a whole and, for a change
    that adds something, against the nodes running here (what they hold, their NAT IPs):
    a removal is never refused, so an over-full store can always be shrunk."""
    def update(data: dict) -> dict:
        cfg = NlbConfig.from_dict(data).to_dict()
        fn(cfg)
        new = NlbConfig.from_dict(cfg)
        if adds:
            _check_nodes_here(new)
        return new.to_dict()
    with open_store(store_url) as store:
        return store.update(NLB_KEY, update, default={})


def _check_nodes_here(cfg: NlbConfig) -> None:
    from hyperplane.errors import HyperplaneError
    from hyperplane.datapath.loader import Sizes
    from hyperplane.nlb.dataplane import check_fits
    from hyperplane.node.lifecycle import node_state, running_nodes
    for node in running_nodes():
        try:
            state = node_state(node)
        except HyperplaneError:
            continue  # a damaged node says so itself (hpctl nat show)
        nat_ips = {ip for gw in state["gateways"] for ip in gw["nat_ips"]}
        try:
            check_fits(cfg, Sizes(**state["sizes"]), nat_ips)
        except ConfigError as exc:
            raise ConfigError(f"node {node}: {exc}") from None


def _find(items: list, what: str, **match) -> dict:
    for item in items:
        if all(str(item.get(k)) == str(v) for k, v in match.items()):
            return item
    raise ConfigError(f"there is no {what} {' '.join(f'{k}={v}' for k, v in match.items())}")


@command.command("create")
@click.argument("name")
@click.option("--id", "lb_id", type=int, help="Numeric id (default: the lowest free one).")
@click.option("--shard-size", type=click.IntRange(1, 64), default=None,
              help="How many of the fleet's nodes carry it (default: 3, or all when fewer).")
@store_option
def create_lb(name, lb_id, shard_size, store_url):
    """Create a load balancer."""
    def fn(cfg):
        ids = {lb["lb_id"] for lb in cfg["load_balancers"]}
        lb = {"name": name, "lb_id": lb_id if lb_id is not None else
              next(i for i in range(len(ids) + 1) if i not in ids)}
        if shard_size is not None:
            lb["shard_size"] = shard_size
        cfg["load_balancers"].append(lb)
    _change(store_url, fn)
    click.echo(f"load balancer {name} created", err=True)
    _ensure_shards(store_url)


def _ensure_shards(store_url: str) -> None:
    """Give the new resource its shard of the fleet's named nodes (none named: no-op)."""
    from hyperplane.fleet.cluster import ensure_shards
    from hyperplane.fleet.store import open_store
    with open_store(store_url) as store:
        ensure_shards(store)


@command.command("delete")
@click.argument("name")
@store_option
def delete_lb(name, store_url):
    """Delete a load balancer and its listeners."""
    def fn(cfg):
        _find(cfg["load_balancers"], "load balancer", name=name)
        cfg["load_balancers"] = [lb for lb in cfg["load_balancers"] if lb["name"] != name]
        cfg["listeners"] = [l for l in cfg["listeners"] if l["lb"] != name]
    _change(store_url, fn, adds=False)
    click.echo(f"load balancer {name} deleted", err=True)


listener = click.Group("listener", help="Listeners: (VIP, port, protocol) -> target group.")
command.add_command(listener)


@listener.command("add")
@click.option("--lb", required=True)
@click.option("--vip", required=True)
@click.option("--port", type=int, required=True)
@click.option("--protocol", type=click.Choice(["TCP", "UDP", "TCP_UDP"], case_sensitive=False),
              default="TCP", show_default=True)
@click.option("--tg", "target_group", required=True, help="Target group name.")
@store_option
def listener_add(lb, vip, port, protocol, target_group, store_url):
    """Add a listener."""
    _change(store_url, lambda cfg: cfg["listeners"].append(
        {"lb": lb, "vip": vip, "port": port, "protocol": protocol.upper(),
         "target_group": target_group}))
    click.echo(f"listener {vip}:{port}/{protocol.upper()} -> {target_group} added", err=True)


@listener.command("delete")
@click.option("--vip", required=True)
@click.option("--port", type=int, required=True)
@store_option
def listener_delete(vip, port, store_url):
    """Delete the listener(s) on VIP:port."""
    def fn(cfg):
        _find(cfg["listeners"], "listener", vip=vip, port=port)
        cfg["listeners"] = [l for l in cfg["listeners"]
                            if not (l["vip"] == vip and l["port"] == port)]
    _change(store_url, fn, adds=False)
    click.echo(f"listener {vip}:{port} deleted", err=True)


tg = click.Group("tg", help="Target groups and their health checks.")
command.add_command(tg)


@tg.command("create")
@click.argument("name")
@click.option("--hc-protocol", type=click.Choice(["tcp", "http"]), default="tcp", show_default=True)
@click.option("--hc-port", type=int, help="Health check port (default: the traffic port).")
@click.option("--hc-path", default="/", show_default=True)
@click.option("--interval", type=float, default=30, show_default=True, help="Seconds (AWS: 5-300).")
@click.option("--timeout", type=float, default=None,
              help="Seconds per check (default: 10, or the interval if shorter).")
@click.option("--healthy", type=int, default=5, show_default=True, help="Healthy threshold.")
@click.option("--unhealthy", type=int, default=2, show_default=True, help="Unhealthy threshold.")
@click.option("--fast", is_flag=True, help="Allow sub-second intervals (labs).")
@click.option("--deregistration-delay", type=int, default=300, show_default=True)
@click.option("--reset-on-unhealthy", is_flag=True, help="Reset flows of targets that fail.")
@store_option
def tg_create(name, hc_protocol, hc_port, hc_path, interval, timeout, healthy, unhealthy, fast,
              deregistration_delay, reset_on_unhealthy, store_url):
    """Create a target group."""
    hc = {"protocol": hc_protocol, "path": hc_path, "interval_s": interval,
          "timeout_s": timeout if timeout is not None else min(10.0, interval), "healthy_threshold": healthy, "unhealthy_threshold": unhealthy,
          "allow_fast": fast}
    if hc_port is not None:
        hc["port"] = hc_port
    _change(store_url, lambda cfg: cfg["target_groups"].append(
        {"name": name, "targets": [], "health_check": hc,
         "deregistration_delay_s": deregistration_delay, "reset_on_unhealthy": reset_on_unhealthy}))
    click.echo(f"target group {name} created", err=True)


@tg.command("delete")
@click.argument("name")
@store_option
def tg_delete(name, store_url):
    """Delete a target group (no listener may use it)."""
    def fn(cfg):
        _find(cfg["target_groups"], "target group", name=name)
        cfg["target_groups"] = [t for t in cfg["target_groups"] if t["name"] != name]
    _change(store_url, fn, adds=False)
    click.echo(f"target group {name} deleted", err=True)


def _parse_target(text: str) -> dict:
    addr, _, weight = text.partition("@")
    ip, sep, port = addr.rpartition(":")
    if not sep or not port.isdigit():
        raise click.BadParameter(f"{text!r}: use IP:PORT or IP:PORT@WEIGHT")
    out = {"ip": ip, "port": int(port)}
    if weight:
        if not weight.isdigit():
            raise click.BadParameter(f"{text!r}: the weight must be a whole number")
        out["weight"] = int(weight)
    return out


@command.command("register")
@click.option("--tg", "group", required=True)
@click.argument("targets", nargs=-1, required=True)
@store_option
def register(group, targets, store_url):
    """Register targets (IP:PORT[@WEIGHT]); a draining one is registered again."""
    parsed = [_parse_target(t) for t in targets]
    seen = set()
    for text, t in zip(targets, parsed):
        if (t["ip"], t["port"]) in seen:
            raise click.BadParameter(f"{t['ip']}:{t['port']} is given twice ({text!r})")
        seen.add((t["ip"], t["port"]))

    def fn(cfg):
        g = _find(cfg["target_groups"], "target group", name=group)
        for t in parsed:
            g["targets"] = [x for x in g["targets"]
                            if not (x["ip"] == t["ip"] and x["port"] == t["port"])]
            g["targets"].append({**t, "state": "initial"})
    _change(store_url, fn)
    click.echo(f"registered {len(parsed)} target(s) in {group}", err=True)


@command.command("deregister")
@click.option("--tg", "group", required=True)
@click.argument("targets", nargs=-1, required=True)
@store_option
def deregister(group, targets, store_url):
    """Deregister targets: no new flows; existing ones continue until the deregistration
    delay ends or they are gone."""
    parsed = [_parse_target(t) for t in targets]

    def fn(cfg):
        g = _find(cfg["target_groups"], "target group", name=group)
        for t in parsed:
            x = _find(g["targets"], "target", ip=t["ip"], port=t["port"])
            if x.get("state") != "draining":
                x["state"], x["draining_since"] = "draining", time.time()
    _change(store_url, fn, adds=False)
    click.echo(f"draining {len(parsed)} target(s) of {group}", err=True)


@command.command("show")
@store_option
@json_option
def show(store_url, as_json):
    """The load balancers, listeners and target groups in the store."""
    with open_store(store_url) as store:
        entry = store.get(NLB_KEY)
    cfg = NlbConfig.from_dict(entry.value if entry else {}).to_dict()
    if as_json:
        emit_json(cfg)
        return
    for lb in cfg["load_balancers"]:
        click.echo(f"load balancer {lb['name']} (id {lb['lb_id']})")
        for l in cfg["listeners"]:
            if l["lb"] == lb["name"]:
                click.echo(f"  listener {l['vip']}:{l['port']}/{l['protocol']} -> {l['target_group']}")
    for g in cfg["target_groups"]:
        click.echo(f"target group {g['name']}: " + (", ".join(
            f"{t['ip']}:{t['port']}" + (f"@{t['weight']}" if t.get("weight", 1) != 1 else "")
            + (" (draining)" if t.get("state") == "draining" else "")
            for t in g["targets"]) or "no targets"))


@command.command("health")
@node_option
@json_option
def health(node, as_json):
    """Each target's health, live flows and packets, as the node's agent sees them, with
    the age of that view. Exits 1 when the agent is not running (the view is stale) or
    has rejected the store (it keeps the last good configuration)."""
    from hyperplane.node.status import read_status
    status = read_status(resolve_node(node))
    stale = not status["running"]
    if as_json:
        emit_json(status)
    else:
        click.echo(f"node {status['node']}: agent pid {status['pid']} "
                   f"{'running' if not stale else 'NOT running'}, status "
                   f"{status['age_s']:.1f} s old", err=True)
        table = Table(title=f"node {status['node']}")
        for col in ("target group", "target", "state", "active flows", "packets"):
            table.add_column(col)
        for group, targets in status["target_groups"].items():
            for ident, t in targets.items():
                state = "unknown (agent not running)" if stale else str(t["state"])
                table.add_row(group, ident, state, str(t["active_flows"]), str(t["packets"]))
        Console().print(table)
    if stale:
        click.echo(f"hpctl: the agent of node {status['node']} is not running; its last "
                   f"status is {status['age_s']:.0f} s old (restart it: hpctl agent run "
                   f"--node {status['node']})", err=True)
    if status.get("config_error"):
        click.echo(f"hpctl: the agent rejected the store and keeps its last good "
                   f"configuration: {status['config_error']}", err=True)
    if status.get("address_error"):
        click.echo(f"hpctl: the agent cannot add or remove a VIP address: "
                   f"{status['address_error']}", err=True)
    if stale or status.get("config_error") or status.get("address_error"):
        raise SystemExit(Exit.FAILURE)
