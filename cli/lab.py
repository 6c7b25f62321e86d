"""hpctl lab: build, inspect, use and remove the lab (network namespaces): one node, or
with --nodes N a fleet behind two fabric routers."""
from __future__ import annotations

import signal
import sys

import click

from hyperplane import lab as _lab

from .exit import Exit
from .options import emit_json, json_option

prefix_option = click.option(
    "--prefix", default="hp", show_default=True, envvar="HPCTL_LAB_PREFIX",
    help="Name prefix of the lab's namespaces (<prefix>-client, <prefix>-node1, <prefix>-inet, "
         "<prefix>-t1..t3; with --nodes N also <prefix>-node2..N, <prefix>-rin, "
         "<prefix>-rout, <prefix>-sync).")

command = click.Group(
    "lab",
    help="The lab: a client network, a node (or with --nodes N a fleet of N nodes between "
         "two ECMP fabric routers), an 'internet' and three NLB target hosts in network "
         "namespaces on this machine (never connected to its real interfaces). Needs root.",
    epilog="\b\nExamples:\n"
           "  hpctl lab up                          XDP NAT gateway + NLB (generic XDP)\n"
           "  hpctl lab up --mode nft               Linux NAT instead, for comparison\n"
           "  hpctl lab up --mode haproxy           HAProxy (TCP mode) as the NLB baseline\n"
           "  hpctl lab up --nodes 4                a fleet of 4 hyperplane nodes behind ECMP routers\n"
           "  hpctl lab up --nodes 4 --mode kernel  4 forwarding nodes behind ECMP routers\n"
           "  hpctl lab kill-node 2                 node 2 crashes (links cut, agent killed)\n"
           "  hpctl lab exec client -- curl -s http://198.18.0.2:8000/\n"
           "  hpctl lab exec t1 -- python3 -m hyperplane.lab serve --name t1 --ip 10.20.1.10\n"
           "  hpctl lab exec inet -- curl -s http://198.18.0.200/\n"
           "  hpctl lab status --json\n"
           "  hpctl lab down",
)


def _say(msg: str) -> None:
    click.echo(msg, err=True)


@command.command("up")
@click.option("--mode", type=click.Choice(_lab.MODES), default="xdp", show_default=True,
              help="xdp: the hyperplane NAT gateway and NLB; kernel: plain forwarding, no NAT "
                   "(benchmark floor); nft: Linux NAT (nftables snat); haproxy: HAProxy in "
                   "TCP mode on the VIP (NLB baseline); nftlb: the kernel's own stateful L4 LB "
                   "(nftables DNAT on the VIP by a 5-tuple hash, client IP kept); kernel "
                   "forwarding otherwise.")
@click.option("--attach", type=click.Choice(_lab.ATTACH_MODES), default="auto",
              show_default=True,
              help="Mode xdp: where the data path runs on the node's veths: auto (tc on "
                   "veth), tc, or xdp (native; the peers get GRO on for it).")
@click.option("--nlb/--no-nlb", default=True, show_default=True,
              help="Mode xdp: write the lab NLB (VIP 198.18.0.200, listeners TCP 80 and UDP "
                   "53) to the store and start its agent; mode haproxy: start HAProxy.")
@click.option("--nodes", type=click.IntRange(1, _lab.MAX_NODES), default=1, show_default=True,
              help="1: the one-node lab. N >= 2: N nodes behind an inside and an outside "
                   "fabric router that spread each resource over its shard's nodes (ECMP on "
                   "the 5-tuple, resilient nexthop groups), plus a sync network; mode xdp "
                   "(each node's data path and fleet agent, a lab controller steering the "
                   "routers) or kernel (plain forwarding).")
@click.option("--store", "store", default=None, metavar="URL",
              help="With --nodes N, mode xdp: the fleet's store (a path, file:PATH or "
                   "etcd://HOST:PORT); default a file of the lab's own "
                   "(/run/hyperplane/lab/<prefix>-store.json; hpctl's default store for "
                   "prefix hp). The lab resets the fleet's keys in it.")
@prefix_option
@json_option
def up_cmd(mode, attach, nlb, nodes, store, prefix, as_json):
    """Build the lab (and start the node in mode xdp, HAProxy in mode haproxy; with
    --nodes N in mode xdp every node, its agent and the lab controller)."""
    cfg = _lab.LabConfig(prefix=prefix, mode=mode, attach=attach, nlb=nlb,
                         nodes=nodes, store=store).validate()
    _say(f"building lab {prefix!r} in mode {mode}"
         + (f" (attach {attach})" if mode == "xdp" else "")
         + (f" with {nodes} nodes" if nodes > 1 else "") + " ...")
    st = _lab.up(cfg)
    if as_json:
        emit_json(st)
    else:
        (_print_fleet_status if nodes > 1 else _print_status)(st)
    if nodes > 1:
        _say(f"lab {prefix!r} is up. Try: hpctl lab exec client -- ping -c3 "
             f"{_lab.INET_IPS[0]}; hpctl lab status shows which nodes carry what")
        return
    _say(f"lab {prefix!r} is up. Try: hpctl lab exec client -- curl http://198.18.0.2:PORT/ "
         f"(start a server with hpctl lab exec inet -- ...)")
    if st["nlb"]["enabled"]:
        _say(f"NLB VIP {_lab.VIP}: start the targets' servers (hpctl lab exec t1 -- "
             f"{sys.executable} -m "
             f"hyperplane.lab serve --name t1 --ip {_lab.TARGET_IPS[0]} --udp-port "
             f"{_lab.TARGET_UDP_PORT}; same for t2, t3), then hpctl lab exec inet -- curl -s "
             f"http://{_lab.VIP}/")


@command.command("down")
@prefix_option
@json_option
def down_cmd(prefix, as_json):
    """Remove the lab (idempotent; also cleans up a half-built one)."""
    res = _lab.down(prefix=prefix)
    for w in res["warnings"]:
        _say(f"warning: {w}")
    if as_json:
        emit_json(res)
    if res["removed"]:
        _say(f"lab {prefix!r} removed ({', '.join(res['removed'])})")
    else:
        _say(f"lab {prefix!r} was not up; nothing to remove")


@command.command("kill-node")
@click.argument("index", type=int)
@prefix_option
@json_option
def kill_node_cmd(index, prefix, as_json):
    """A multi-node lab's node INDEX crashes: its links are cut (the routers drop it at
    once) and its agent is killed (SIGKILL; its member record goes with its lease)."""
    from hyperplane.lab import fleet_build
    cfg = _fleet_cfg(prefix)
    res = fleet_build.kill_node(cfg, index)
    if as_json:
        emit_json(res)
    _say(f"node {index} ({res['name']}) cut"
         + (f", agent {res['agent_pid']} killed" if res["agent_killed"] else ", no agent ran"))


@command.command("restore-node")
@click.argument("index", type=int)
@prefix_option
@json_option
def restore_node_cmd(index, prefix, as_json):
    """Bring a multi-node lab's node INDEX back after kill-node: its links, its data path
    (mode xdp) and a new agent; the routers steer to it again once it is ready."""
    from hyperplane.lab import fleet_build
    cfg = _fleet_cfg(prefix)
    res = fleet_build.restore_node(cfg, index)
    if as_json:
        emit_json(res)
    _say(f"node {index} ({res['name']}) restored")


def _fleet_cfg(prefix: str):
    from hyperplane.lab.build import _read_state
    cfg = _read_state(prefix)
    if cfg is None or not _lab.present(prefix):
        _say(f"hpctl: lab {prefix!r} is not up; run hpctl lab up --nodes N")
        sys.exit(Exit.NOT_FOUND)
    if cfg.nodes < 2:
        raise click.UsageError(f"lab {prefix!r} has one node; kill-node and restore-node are "
                               "for a multi-node lab (hpctl lab up --nodes N)")
    return cfg


@command.command("status")
@prefix_option
@json_option
def status_cmd(prefix, as_json):
    """Namespaces, interfaces (MACs, addresses, XDP), roles and NAT IPs of the lab.
    Exit status 4 when the lab is not up."""
    st = _lab.status(prefix=prefix)
    if as_json:
        emit_json(st)
    elif st["namespaces_present"]:
        (_print_fleet_status if "node_count" in st else _print_status)(st)
    if not st["up"]:
        if st["namespaces_present"]:
            _say(f"hpctl: lab {prefix!r} is only partly up "
                 f"({', '.join(st['namespaces_present'])}); run hpctl lab down")
        else:
            _say(f"hpctl: lab {prefix!r} is not up; run hpctl lab up")
        sys.exit(Exit.NOT_FOUND)


@command.command("exec", context_settings={"ignore_unknown_options": True,
                                           "allow_interspersed_args": False})
@prefix_option
@click.argument("role")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_cmd(prefix, role, argv):
    """Run a command in a lab namespace (stdin/stdout passed through); exits with its status.
    ROLE: client, node (node1), inet, t1, t2, t3; in a multi-node lab also node2..nodeN,
    rin, rout, sync.

    \b
    hpctl lab exec client -- curl -s http://198.18.0.2:8000/
    hpctl lab exec inet -- python3 -m http.server 8000
    """
    argv = list(argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        raise click.UsageError("no command given: hpctl lab exec ROLE -- CMD...")
    ns = _lab.namespace_for(_lab.LabConfig(prefix=prefix), role)
    from hyperplane import netns
    try:
        proc = netns.popen_in(ns, argv)
    except FileNotFoundError:
        _say(f"hpctl: {argv[0]}: command not found")
        sys.exit(127)
    # The child shares our terminal's process group and gets ^C itself; we just wait.
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        rc = proc.wait()
    finally:
        signal.signal(signal.SIGINT, old)
    sys.exit(rc if rc >= 0 else 128 - rc)


def _print_fleet_status(st: dict) -> None:
    """The multi-node lab: nodes, the routers' groups (read back) and shards."""
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 120)
    title = (f"lab {st['prefix']}: {st['node_count']} nodes, mode {st.get('mode') or '?'}"
             + ("" if st["up"] else " [partly up]"))
    fleet = st.get("fleet")
    t = Table(title=title)
    if fleet:   # mode xdp: the fleet's view first (addresses: --json)
        cols = ["node", "hyperplane node", "state", "member", "agent", "data path", "shards",
                "out0", "forwarded"]
    else:
        cols = ["node", "namespace", "state", "in0", "out0", "sync0", "shards", "forwarded"]
    for col in cols:
        t.add_column(col)
    for n in st["nodes"]:
        a = n["addresses"]
        shards = ", ".join(n["shards"]) or "-"
        if not fleet:
            t.add_row(n["name"], n["netns"], n["state"], " ".join(a.get("in0", [])) or "-",
                      " ".join(a.get("out0", [])) or "-", " ".join(a.get("sync0", [])) or "-",
                      shards, str(n["forward_packets"]))
            continue
        member = ("ready" if n.get("ready") else "live, not ready" if n.get("live")
                  else "not live")
        agent = (f"{n['agent_pid']}" if n.get("agent_running")
                 else f"{n.get('agent_pid')} (dead)" if n.get("agent_pid") else "-")
        hooks = {h for h in (n.get("attached") or {}).values()}
        t.add_row(n["name"], n.get("hyperplane_node", "-"), n["state"], member, agent,
                  ", ".join(sorted(h or "detached" for h in hooks)) or "-", shards,
                  " ".join(a.get("out0", [])) or "-", str(n["forward_packets"]))
    console.print(t)
    g = Table(title="fabric routers: resilient nexthop groups (from the kernel)")
    for col in ("router", "resource", "group", "members", "buckets per node"):
        g.add_column(col)
    for router, info in sorted(st.get("routers", {}).items()):
        for resource, grp in sorted(info.get("groups", {}).items()):
            g.add_row(router, resource, str(grp["id"]) + ("" if grp["present"] else " (absent)"),
                      ", ".join(f"node{i}" for i in grp["members"]) or "-",
                      " ".join(f"{i}:{c}" for i, c in grp["buckets"].items()) or "-")
    console.print(g)
    a = st["addresses"]
    console.print("\n".join([
        "shards: " + "; ".join(f"{r} -> nodes {', '.join(map(str, m))}"
                               for r, m in st["shards"].items())
        + (f" (cut: {', '.join(map(str, st['cut']))})" if st["cut"] else ""),
        f"NAT IP {a['nat_ip']}, VIP {a['vip']}; clients {', '.join(a['clients'])}; "
        f"internet {', '.join(a['internet'])}; targets "
        + ", ".join(f"{t['name']} {t['ip']}" for t in a["targets"]),
        f"sync network {st['sync']['net']} (MTU {st['sync']['mtu']}) on bridge "
        f"{st['sync']['bridge']} in {st['sync']['netns']}",
    ]))
    if fleet:
        ctl = fleet.get("controller") or {}
        console.print("\n".join([
            f"store {fleet['store']}" + (f" (error: {fleet['error']})" if fleet.get("error")
                                         else ""),
            "store shards: " + ("; ".join(f"{r} -> {', '.join(s['nodes'])}"
                                          for r, s in fleet.get("shards", {}).items()) or "-"),
            "steered by the routers: " + ("; ".join(
                f"{r} -> nodes {', '.join(map(str, m)) or '-'}"
                for r, m in st.get("steered", {}).items()) or "-"),
            f"controller: " + (f"pid {ctl['pid']}" if ctl.get("pid") else "not running")
            + f" (log {ctl.get('log')})",
        ]))


def _print_status(st: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=None if sys.stdout.isatty() else 120)
    mode = st.get("mode") or "?"
    if mode == "xdp" and st.get("attach"):
        mode += f" (attach {st['attach']})"
    title = f"lab {st['prefix']}: mode {mode}" + ("" if st["up"] else " [partly up]")
    t = Table(title=title)
    for col in ("role", "namespace", "interface", "MAC", "addresses", "peer", "state", "XDP"):
        t.add_column(col)
    for i in st["interfaces"]:
        xdp = "-" if not i["xdp"] else f"{i['xdp']['mode']} (prog {i['xdp'].get('prog_id')})"
        t.add_row(i["role"], i["netns"], i["ifname"], i["mac"], " ".join(i["addresses"]) or "-",
                  i["peer"], i["state"] or "missing", xdp)
    console.print(t)
    extra = [f"NAT IPs: {', '.join(st['nat_ips']) or '-'}"]
    nlb = st.get("nlb") or {}
    if nlb.get("enabled"):
        lst = ", ".join(f"{l['protocol']} {l['vip']}:{l['port']} -> {l['target_group']} "
                        f"(targets :{l['target_port']})" for l in nlb["listeners"])
        extra.append(f"NLB ({nlb['by']}): {lst}")
    else:
        extra.append(f"VIP {st.get('vip')} (no NLB in this mode)")
    extra.append("targets: " + ", ".join(f"{t['name']} {t['ip']}" for t in st.get("targets", [])))
    if st.get("mode") == "xdp":
        extra.append(f"node: {st['node']['name']} "
                     f"(pins {st['node']['pin_root']}/{st['node']['name']})")
    if st.get("nft_forward_packets") is not None:
        extra.append(f"kernel forward counter: {st['nft_forward_packets']} packets")
    console.print("\n".join(extra))
    agent = nlb.get("agent")
    if agent:
        h = Table(title="NLB agent: target health")
        for col in ("target group", "target", "state", "active flows", "packets"):
            h.add_column(col)
        for group, tgts in sorted(_groups(agent).items()):
            for ident, info in sorted(tgts.items()):
                h.add_row(group, ident, str(info.get("state", "?")),
                          str(info.get("active_flows", "-")), str(info.get("packets", "-")))
        console.print(h)


def _groups(agent_status: dict) -> dict:
    """Target group -> {target identity -> info}, from the agent's status file (its groups
    may sit under a "target_groups" key)."""
    groups = agent_status.get("target_groups", agent_status)
    return {g: t for g, t in groups.items() if isinstance(t, dict)
            and all(isinstance(v, dict) for v in t.values())}
