"""Garbage collection: expired flows and their port reservations go, live ones stay."""
import time

from scapy.layers.inet import IP, UDP

from bpf_env import CLIENT, INET
from hyperplane.flows import RESV_GRACE_S, collect_garbage, flow_tables
from packets import from_client


def _udp(sport):
    return from_client(IP(src=CLIENT, dst=INET) / UDP(sport=sport, dport=53) / b"q")


def _entries(dp) -> int:
    return sum(len(list(dp.table(name).items())) for name in flow_tables())


def test_gc_removes_expired_flows_and_reservations_only(e):
    """Three flows idle past their 1 s timeout and older than the reservations' grace go,
    with their ports; a fresh one stays."""
    e.set_timeouts(udp=1)
    for sport in (48000, 48001, 48002):
        e.run(_udp(sport))
    time.sleep(max(1.0, RESV_GRACE_S) + 0.2)
    e.run(_udp(48003))  # a fresh one
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
