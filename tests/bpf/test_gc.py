"""Garbage collection: expired flows and their port reservations go, live ones stay."""
import time

from scapy.layers.inet import IP, UDP

from bpf_env import CLIENT, INET
from hyperplane.flows import collect_garbage
from packets import from_client


def _udp(sport):
    return from_client(IP(src=CLIENT, dst=INET) / UDP(sport=sport, dport=53) / b"q")


def test_gc_removes_expired_flows_and_reservations_only(e):
    e.set_timeouts(udp=1)
    for sport in (48000, 48001, 48002):
        e.run(_udp(sport))
    time.sleep(1.2)
    e.run(_udp(48003))  # a fresh one
    time.sleep(0.3)
    res = collect_garbage(e.dp)
    assert res.flows_removed == 6 and res.reservations_removed == 3
    left = list(e.dp.table("flows").items())
    assert len(left) == 2 and len(list(e.dp.table("nat_resv").items())) == 1
    assert collect_garbage(e.dp).flows_removed == 0
