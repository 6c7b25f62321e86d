"""Ingress and direction (issue 6, section 2), both hooks: inside sources are accepted only
from the inside, reply tuples only from the side their flow's replies come from (strict
reverse-path check, RFC 3704). A spoofed packet is DROP_WRONG_IFACE: it creates nothing,
is never answered (no RST from a private source) and never reaches a flow."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether

from bpf_env import (CLIENT, CLIENT2, CLIENT_MAC, INET, INET_MAC, MAC, NAT_IP, NS, SIZES,
                     TARGETS, VIP, Env)
from flowkit import nlb  # noqa: F401  (a pytest fixture)
from flowkit import (ISN_CLIENT, ISN_SERVER, client_tcp, flow_table_problems, from_target,
                     nat_handshake, nlb_config, server_tcp, table_len)
from fuzz_run import VerdictReader, run_packets
from hyperplane import netns
from hyperplane.datapath.loader import Datapath
from hyperplane.nat.gateway import GatewayConfig, apply_gateway
from hyperplane.nlb.dataplane import NlbDataplane
from hyperplane.nlb.config import NlbConfig
from hyperplane.datapath.settings import write_config
from hyperplane.datapath.verdicts import Verdict
from packets import from_inet

STATE_TABLES = ("flows", "pending", "nat_resv", "nat_cursor")


def state_size(dp) -> int:
    return sum(table_len(dp, t) for t in STATE_TABLES)


def on_out0(l3):
    """A frame arriving on the outside interface."""
    return Ether(src=INET_MAC, dst=MAC["out0"]) / l3


# ---- inside sources from the outside ----------------------------------------------------

SPOOFED_INSIDE = [
    ("tcp-syn", lambda: on_out0(IP(src=CLIENT, dst=INET) / TCP(sport=40000, dport=80, flags="S"))),
    ("tcp-ack", lambda: on_out0(IP(src=CLIENT, dst=INET) / TCP(sport=40000, dport=80, flags="A",
                                                               seq=1, ack=1))),
    ("udp", lambda: on_out0(IP(src=CLIENT2, dst=INET) / UDP(sport=5353, dport=53) / b"q")),
    ("icmp-echo", lambda: on_out0(IP(src=CLIENT, dst=INET) / ICMP(type=8, id=7))),
    ("tcp-ack-toward-a-target", lambda: on_out0(IP(src=CLIENT2, dst=TARGETS[0]) /
                                                TCP(sport=1234, dport=8080, flags="A", seq=1,
                                                    ack=1))),
]


@pytest.mark.parametrize("name,packet", SPOOFED_INSIDE, ids=[c[0] for c in SPOOFED_INSIDE])
def test_inside_source_from_outside_is_dropped(e, name, packet):
    """An inside source arriving on the outside interface is not translated, makes no flow
    or reservation, and a non-SYN gets no RST (which would leave with a private source)."""
    verdict, action, _ = e.run(packet(), "out0")
    assert (verdict, action) == (Verdict.DROP_WRONG_IFACE, "XDP_DROP")
    assert state_size(e.dp) == 0, "a spoofed packet left state behind"


def test_600_spoofed_inside_sources_leave_real_clients_working(env):
    """600 SYNs with inside sources arriving from outside, at a node whose tables hold 32
    flows: none takes an entry, and 20 real clients then connect and get their replies."""
    small = Datapath(replace(SIZES, max_flows=64, max_reservations=32), hook=env.hook,
                     extra_cflags=["-DHP_MAX_PENDING=64"])
    try:
        write_config(small)
        apply_gateway(small, GatewayConfig("gw-small", 0, [NAT_IP], ["10.10.0.0/24"]))
        reader = VerdictReader(small.table("verdicts").map_fd, small.table("verdicts").max_entries)
        spoofed = [bytes(on_out0(IP(src=f"10.10.0.{10 + i % 200}", dst=INET) /
                                 TCP(sport=20000 + i, dport=80, flags="S")))
                   for i in range(600)]
        results = netns.call_in(NS, run_packets, small.prog_fd, reader,
                                [(f, env.ifindex["out0"]) for f in spoofed], env.hook)
        assert {v for _, _, v, _ in results} == {Verdict.DROP_WRONG_IFACE}
        assert state_size(small) == 0
        run = Env(small, env.ifindex, env.hook)
        for cport in range(41000, 41020):
            verdict, _, out = run.run(client_tcp(cport, "S", ISN_CLIENT))
            assert verdict == Verdict.TX_NAT_OUT, cport
            port = Ether(out)[TCP].sport
            verdict, _, back = run.run(server_tcp(port, "SA", ISN_SERVER, ISN_CLIENT + 1), "out0")
            assert verdict == Verdict.TX_NAT_IN and Ether(back)[IP].dst == CLIENT
        assert flow_table_problems(small) == []
    finally:
        small.close()


# ---- forged packets of live flows --------------------------------------------------------

@dataclass
class Forged:
    name: str
    nlb: bool
    # (env, NAT port or target) -> (forged frame, ingress)
    forge: Callable
    # (env, NAT port or target) -> (the real packet, ingress, its verdict, where it goes)
    real: Callable


def _forged_reply_from_inside(e, port):
    """Another inside client sends a 'server reply' to the NAT IP, to reach CLIENT."""
    return Ether(src=CLIENT_MAC, dst=MAC["in0"]) / IP(src=INET, dst=NAT_IP) / \
        TCP(sport=80, dport=port, flags="PA", seq=ISN_SERVER + 1, ack=ISN_CLIENT + 101) / \
        b"forged", "in0"


def _real_reply(e, port):
    return server_tcp(port, "PA", ISN_SERVER + 1, ISN_CLIENT + 101, payload=b"real"), "out0", \
        Verdict.TX_NAT_IN, CLIENT


def _forged_client_from_outside(e, port):
    """A packet of CLIENT's live flow, sent from outside."""
    return on_out0(IP(src=CLIENT, dst=INET) /
                   TCP(sport=40000, dport=80, flags="PA", seq=ISN_CLIENT + 101,
                       ack=ISN_SERVER + 1) / b"forged"), "out0"


def _real_client(e, port):
    return client_tcp(40000, "PA", ISN_CLIENT + 101, ISN_SERVER + 1, payload=b"real"), "in0", \
        Verdict.TX_NAT_OUT, INET


def _forged_target_from_outside(e, target):
    """A 'target answer' of a live NLB flow, sent from outside."""
    return on_out0(IP(src=target, dst=INET) /
                   TCP(sport=8080, dport=50000, flags="SA", seq=99, ack=11)), "out0"


def _real_target(e, target):
    return from_target(target, TCP(sport=8080, dport=50000, flags="SA", seq=99, ack=11)), \
        "tg0", Verdict.TX_NLB_OUT, INET


def _forged_client_from_targets_side(e, target):
    """A packet of the NLB client's flow, sent from the targets' side."""
    return Ether(src=INET_MAC, dst=MAC["tg0"]) / IP(src=INET, dst=VIP) / \
        TCP(sport=50000, dport=80, flags="A", seq=11, ack=100), "tg0"


def _real_nlb_client(e, target):
    return from_inet(IP(src=INET, dst=VIP) / TCP(sport=50000, dport=80, flags="A", seq=11,
                                                 ack=100)), "out0", Verdict.TX_NLB_IN, target


FORGED = [
    Forged("nat-reply-forged-by-another-inside-client", False, _forged_reply_from_inside,
           _real_reply),
    Forged("nat-client-packet-from-outside", False, _forged_client_from_outside, _real_client),
    Forged("nlb-target-answer-from-outside", True, _forged_target_from_outside, _real_target),
    Forged("nlb-client-packet-from-the-targets-side", True, _forged_client_from_targets_side,
           _real_nlb_client),
]


@pytest.mark.parametrize("case", FORGED, ids=lambda c: c.name)
@pytest.mark.parametrize("when", ["before-the-real-reply", "after-it"])
def test_forged_packet_of_a_live_flow_is_dropped(e, case, when):
    """A packet that matches a live flow's tuple but arrives on an interface its source is
    not routed through is dropped, the flow unchanged; the real packets still pass.
    Before the real reply the reply direction has not learned its interface yet."""
    if case.nlb:
        NlbDataplane(e.dp).apply(nlb_config())
    try:
        if case.nlb:
            verdict, _, out = e.run(from_inet(IP(src=INET, dst=VIP) /
                                              TCP(sport=50000, dport=80, flags="S", seq=10)),
                                    "out0")
            assert verdict == Verdict.TX_NLB_IN
            ref = Ether(out)[IP].dst
            if when == "after-it":
                assert e.run(_real_target(e, ref)[0], "tg0")[0] == Verdict.TX_NLB_OUT
        else:
            ref = nat_handshake(e) if when == "after-it" else \
                Ether(e.run(client_tcp(40000, "S", ISN_CLIENT))[2])[TCP].sport
        before = {name: sorted((bytes(k), bytes(v)) for k, v in e.dp.table(name).items())
                  for name in ("flows", "pending")}
        frame, iface = case.forge(e, ref)
        verdict, action, _ = e.run(frame, iface)
        assert (verdict, action) == (Verdict.DROP_WRONG_IFACE, "XDP_DROP")
        after = {name: sorted((bytes(k), bytes(v)) for k, v in e.dp.table(name).items())
                 for name in ("flows", "pending")}
        assert after == before, "the forged packet changed a flow"
        real, iface, want, dst = case.real(e, ref)
        verdict, _, out = e.run(real, iface)
        assert verdict == want and Ether(out)[IP].dst == dst
        assert flow_table_problems(e.dp) == []
    finally:
        if case.nlb:
            NlbDataplane(e.dp).apply(NlbConfig())
