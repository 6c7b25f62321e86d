"""hpctl flows --follow: the node agent's flow events (hyperplane.observe.follow), filtered."""
from __future__ import annotations

import json
import socket
import sys

import click


def connect(node: str) -> socket.socket:
    """The agent's event socket; NotFound (exit 4) when no agent runs for the node."""
    from hyperplane.errors import NotFound
    from hyperplane.observe.follow import events_socket_path
    path = events_socket_path(node)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except (FileNotFoundError, ConnectionRefusedError):
        s.close()
        raise NotFound(f"no agent runs for node {node} (no flow events at {path}); start "
                       f"it: hpctl agent run --node {node}") from None
    return s


def matches(ev: dict, *, address=None, port=None, proto=None, kind=None, events=(),
            resource=None) -> bool:
    if events and ev["event"] not in events:
        return False
    if proto and ev["proto"] != proto:
        return False
    if kind and ev["kind"] != kind.upper():
        # a record names its flow by its original direction's kind
        if kind.upper() not in ("NAT_IN", "NLB_OUT") or \
                ev["kind"] != {"NAT_IN": "NAT_OUT", "NLB_OUT": "NLB_IN"}[kind.upper()]:
            return False
    if resource is not None and ev["resource"] != resource:
        return False
    if address and address not in (ev["src"], ev["dst"], ev["new_src"], ev["new_dst"]):
        return False
    if port is not None and port not in (ev["sport"], ev["dport"], ev["new_sport"],
                                         ev["new_dport"]):
        return False
    return True


def line_of(ev: dict) -> str:
    import time
    stamp = time.strftime("%H:%M:%S", time.localtime(ev["time"])) + f"{ev['time'] % 1:.3f}"[1:]
    if ev.get("verdict"):        # a rejected packet: its tuple and why
        return (f"{stamp} {ev['event']:<9} {ev['proto']:<4} {ev['src']}:{ev['sport']} > "
                f"{ev['dst']}:{ev['dport']} {ev['verdict']}")
    return (f"{stamp} {ev['event']:<9} {ev['kind']:<7} {ev['proto']:<4} "
            f"{ev['src']}:{ev['sport']} > {ev['dst']}:{ev['dport']} via "
            f"{ev['new_src']}:{ev['new_sport']} > {ev['new_dst']}:{ev['new_dport']} "
            f"{ev['tcp_state']} res {ev['resource']}")


def follow_flows(node: str, as_json: bool = False, **filters) -> None:
    s = connect(node)
    buf = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                click.echo("hpctl: the agent stopped", err=True)
                raise SystemExit(1)
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for raw in lines:
                ev = json.loads(raw)
                if matches(ev, **filters):
                    click.echo(json.dumps(ev, sort_keys=True) if as_json else line_of(ev))
            sys.stdout.flush()
    except KeyboardInterrupt:
        pass
    finally:
        s.close()
