"""hpctl lab: build, inspect, use and remove the one-node lab (network namespaces)."""
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
         "<prefix>-t1..t3).")

command = click.Group(
    "lab",
    help="The one-node lab: a client network, a node, an 'internet' and three NLB target "
         "hosts in network namespaces on this machine (never connected to its real "
         "interfaces). Needs root.",
    epilog="\b\nExamples:\n"
           "  hpctl lab up                          XDP NAT gateway + NLB (generic XDP)\n"
           "  hpctl lab up --mode nft               Linux NAT instead, for comparison\n"
           "  hpctl lab up --mode haproxy           HAProxy (TCP mode) as the NLB baseline\n"
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
@prefix_option
@json_option
def up_cmd(mode, attach, nlb, prefix, as_json):
    """Build the lab (and start the node in mode xdp, HAProxy in mode haproxy)."""
    cfg = _lab.LabConfig(prefix=prefix, mode=mode, attach=attach, nlb=nlb).validate()
    _say(f"building lab {prefix!r} in mode {mode}"
         + (f" (attach {attach})" if mode == "xdp" else "") + " ...")
    st = _lab.up(cfg)
    if as_json:
        emit_json(st)
    else:
        _print_status(st)
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
        _print_status(st)
    if not st["up"]:
        if st["namespaces_present"]:
            _say(f"lab {prefix!r} is only partly up ({', '.join(st['namespaces_present'])}); "
                 "run hpctl lab down")
        else:
            _say(f"lab {prefix!r} is not up; run hpctl lab up")
        sys.exit(Exit.NOT_FOUND)


@command.command("exec", context_settings={"ignore_unknown_options": True,
                                           "allow_interspersed_args": False})
@prefix_option
@click.argument("role", type=click.Choice(["client", "node", "node1", "inet",
                                           *_lab.TARGET_ROLES]))
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
def exec_cmd(prefix, role, argv):
    """Run a command in a lab namespace (stdin/stdout passed through); exits with its status.

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
