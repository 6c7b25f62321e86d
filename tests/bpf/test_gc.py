"""Garbage collection: expired flows and their port reservations go, live ones stay."""
import socket

from scapy.layers.inet import IP, UDP

from bpf_env import CLIENT, INET
from hyperplane.datapath.flows import collect_garbage, flow_tables
from packets import from_client


def _udp(sport):
    return from_client(IP(src=CLIENT, dst=INET) / UDP(sport=sport, dport=53) / b"q")


def _entries(dp) -> int:
    return sum(len(list(dp.table(name).items())) for name in flow_tables())


def _age(dp, sports) -> None:
    """Make the flows of these client ports (and their reservations) look as old as the
    monotonic clock: idle past any timeout, past the reservations' grace. No sleeping."""
    for name in flow_tables():
        table = dp.table(name)
        for k, v in list(table.items()):
            if socket.ntohs(k.src_port) in sports or socket.ntohs(k.dst_port) in sports or \
                    socket.ntohs(v.new_dst_port) in sports:
                v.last_seen_ns = v.created_ns = 1
                table[k] = v
    resv = dp.table("nat_resv")
    for k, v in list(resv.items()):
        if socket.ntohs(v.orig.src_port) in sports:
            v.taken_ns = 1
            resv[k] = v


def test_gc_removes_expired_flows_and_reservations_only(e):
    """Three flows idle past their timeout and older than the reservations' grace go,
    with their ports; a fresh one stays."""
    for sport in (48000, 48001, 48002, 48003):
        e.run(_udp(sport))
    _age(e.dp, {48000, 48001, 48002})
    res = collect_garbage(e.dp)
    assert res.flows_removed == 6 and res.reservations_removed == 3
    assert _entries(e.dp) == 2 and len(list(e.dp.table("nat_resv").items())) == 1
    assert collect_garbage(e.dp).flows_removed == 0


def test_gc_keeps_a_young_reservation_without_flow(e):
    """A reservation whose flow does not exist (yet) is kept through the grace: another
    CPU may be creating that flow right now."""
    e.run(_udp(48100))
    for name in flow_tables():
        e.dp.table(name).clear()
    assert collect_garbage(e.dp).reservations_removed == 0
    assert len(list(e.dp.table("nat_resv").items())) == 1
