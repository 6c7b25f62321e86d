"""ICMP around the node (issue 6, sections 1 and 2), both hooks:

- ICMP errors about a live flow sent by someone other than the flow's own peer (another
  inside host, an inside router, a router on the targets' side) leave from the NAT IP /
  VIP, never from their private source;
- the errors the node sends as a router: time exceeded for a TTL-1 packet (of a live flow
  or a new one), fragmentation needed for a DF packet too big for the next hop's route,
  fragmenting by the kernel (translated) without DF; never an error about an error;
- GSO superpackets at tc are judged by their segments;
- a next hop whose MAC is not known yet: translated, then resolved (tc: through the
  neighbour subsystem; XDP: by the kernel), never sent untranslated."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, TCPerror, UDPerror
from scapy.layers.l2 import Ether

from bpf_env import (CLIENT, CLIENT2, CLIENT_MAC, INET, INET_MAC, MAC, NAT_IP, ROUTER,
                     TARGET_MAC, TARGETS, VIP)
from flowkit import nlb  # noqa: F401  (a pytest fixture)
from flowkit import (assert_error_sums, client_tcp, from_target, nat_handshake, nat_port_of,
                     nlb_config, server_tcp, table_len)
from hyperplane.nlb.dataplane import NlbDataplane
from hyperplane.nlb.config import NlbConfig
from hyperplane.datapath.sandbox import (CLIENT_NO_NEIGH, INET_NO_NEIGH, INSIDE_ROUTER, NODE_IP,
                                SMALL_MTU, SMALL_MTU_HOST, TARGET_NO_NEIGH, TARGET_ROUTER)
from hyperplane.datapath.verdicts import Verdict
from packets import assert_checksums, from_client, from_inet


def nat_udp(e, cport=40000, dst=INET, src=CLIENT, size=1):
    verdict, _, out = e.run(from_client(IP(src=src, dst=dst) / UDP(sport=cport, dport=53) /
                                        (b"q" * size)))
    assert verdict == Verdict.TX_NAT_OUT
    return nat_port_of(out)


def nlb_syn(e, sport=50000, dport=80):
    verdict, _, out = e.run(from_inet(IP(src=INET, dst=VIP) /
                                      TCP(sport=sport, dport=dport, flags="S", seq=10)), "out0")
    assert verdict == Verdict.TX_NLB_IN
    return Ether(out)[IP].dst


# ---- ICMP errors about flows, from other sources ---------------------------------------

@dataclass
class ErrCase:
    name: str
    nlb: bool
    # (env, NAT port or target) -> the error frame and its ingress
    error: Callable
    # what leaves: outer source and destination, quoted source and destination, quoted ports
    want: Callable


def _err_other_inside_host(e, port):
    embedded = IP(src=INET, dst=CLIENT, ttl=63) / UDP(sport=53, dport=40000) / b"answer"
    return from_client(IP(src=CLIENT2, dst=INET) / ICMP(type=3, code=1) / embedded), "in0"


def _err_inside_router(e, port):
    embedded = IP(src=INET, dst=CLIENT, ttl=1) / UDP(sport=53, dport=40000) / b"answer"
    return Ether(src=CLIENT_MAC, dst=MAC["in0"]) / IP(src=INSIDE_ROUTER, dst=INET) / \
        ICMP(type=11, code=0) / embedded, "in0"


def _err_target_side_router(e, target):
    embedded = IP(src=INET, dst=target, ttl=1) / TCP(sport=50000, dport=8080, flags="S", seq=10)
    return Ether(src=TARGET_MAC, dst=MAC["tg0"]) / IP(src=TARGET_ROUTER, dst=INET) / \
        ICMP(type=11, code=0) / embedded, "tg0"


def _err_other_target(e, target):
    other = next(t for t in TARGETS if t != target)
    embedded = IP(src=INET, dst=target, ttl=63) / TCP(sport=50000, dport=8080, flags="S", seq=10)
    return from_target(other, ICMP(type=3, code=1) / embedded), "tg0"


ERRORS = [
    ErrCase("another-inside-host-about-a-nat-reply", False, _err_other_inside_host,
            lambda port: (NAT_IP, INET, INET, NAT_IP, (53, port))),
    ErrCase("inside-router-about-a-nat-reply", False, _err_inside_router,
            lambda port: (NAT_IP, INET, INET, NAT_IP, (53, port))),
    ErrCase("target-side-router-about-an-nlb-packet", True, _err_target_side_router,
            lambda target: (VIP, INET, INET, VIP, (50000, 80))),
    ErrCase("another-target-about-an-nlb-packet", True, _err_other_target,
            lambda target: (VIP, INET, INET, VIP, (50000, 80))),
]


@pytest.mark.parametrize("case", ERRORS, ids=lambda c: c.name)
def test_icmp_error_from_elsewhere_leaves_from_the_public_address(e, case):
    """Linux NAT rewrites the outer source of an error about a NATed flow to the NAT
    address, whoever sent it; so does this node (NAT IP, or the listener's VIP)."""
    if case.nlb:
        NlbDataplane(e.dp).apply(nlb_config())
        ref = nlb_syn(e)
    else:
        ref = nat_udp(e)
    try:
        frame, iface = case.error(e, ref)
        verdict, action, data = e.run(frame, iface)
        assert (verdict, action) == (Verdict.TX_ICMP_ERROR, "XDP_REDIRECT")
        assert_checksums(data)
        p = Ether(data)
        assert (p.src, p.dst) == (MAC["out0"], INET_MAC)
        src, dst, qsrc, qdst, qports = case.want(ref)
        assert (p[IP].src, p[IP].dst) == (src, dst), "outer addresses"
        assert (p[IPerror].src, p[IPerror].dst) == (qsrc, qdst), "quoted addresses"
        quoted = p[UDPerror] if UDPerror in p else p[TCPerror]
        assert (quoted.sport, quoted.dport) == qports, "quoted ports"
    finally:
        if case.nlb:
            NlbDataplane(e.dp).apply(NlbConfig())


# ---- time exceeded ----------------------------------------------------------------------

@dataclass
class TtlCase:
    name: str
    # env -> (the TTL-1 frame, ingress, sender's MAC); opens what it needs first
    setup: Callable
    l4_quote: int  # bytes of L4 the error quotes (TCP 20, else 8)


def _ttl_nat_live_client(e):
    nat_handshake(e)
    pkt = from_client(IP(src=CLIENT, dst=INET, ttl=1) /
                      TCP(sport=40000, dport=80, flags="PA", seq=1101, ack=5001) / b"late")
    return pkt, "in0", CLIENT_MAC


def _ttl_nat_live_server(e):
    port = nat_handshake(e)
    pkt = from_inet(IP(src=INET, dst=NAT_IP, ttl=1) /
                    TCP(sport=80, dport=port, flags="PA", seq=5001, ack=1101) / b"data")
    return pkt, "out0", INET_MAC


def _ttl_nat_new_udp(e):
    return from_client(IP(src=CLIENT, dst=INET, ttl=1) / UDP(sport=41000, dport=53) / b"q"), \
        "in0", CLIENT_MAC


def _ttl_nat_new_tcp(e):
    return from_client(IP(src=CLIENT, dst=INET, ttl=1) /
                       TCP(sport=41001, dport=80, flags="S", seq=1000)), "in0", CLIENT_MAC


def _ttl_nat_new_unresolved_client(e):
    """The route back to the sender has no neighbour entry yet."""
    return from_client(IP(src=CLIENT_NO_NEIGH, dst=INET, ttl=1) / UDP(sport=41002, dport=53) /
                       b"q"), "in0", CLIENT_MAC


def _ttl_nlb_new(e):
    NlbDataplane(e.dp).apply(nlb_config())
    return from_inet(IP(src=INET, dst=VIP, ttl=1) /
                     TCP(sport=50001, dport=80, flags="S", seq=10)), "out0", INET_MAC


def _ttl_nlb_live_target(e):
    NlbDataplane(e.dp).apply(nlb_config())
    target = nlb_syn(e, sport=50002)
    synack = from_target(target, TCP(sport=8080, dport=50002, flags="SA", seq=99, ack=11))
    return _with_ttl(synack, 1), "tg0", TARGET_MAC


def _with_ttl(frame: Ether, ttl: int) -> Ether:
    frame = frame.copy()
    frame[IP].ttl = ttl
    del frame[IP].chksum
    return Ether(bytes(frame))


TTLS = [
    TtlCase("nat-live-flow-from-the-client", _ttl_nat_live_client, 20),
    TtlCase("nat-live-flow-from-the-server", _ttl_nat_live_server, 20),
    TtlCase("nat-new-udp-flow", _ttl_nat_new_udp, 8),
    TtlCase("nat-new-tcp-flow", _ttl_nat_new_tcp, 20),
    TtlCase("nat-new-flow-from-an-unresolved-client", _ttl_nat_new_unresolved_client, 8),
    TtlCase("nlb-new-flow", _ttl_nlb_new, 20),
    TtlCase("nlb-live-flow-from-the-target", _ttl_nlb_live_target, 20),
]


@pytest.mark.parametrize("case", TTLS, ids=lambda c: c.name)
def test_ttl_1_gets_time_exceeded_from_the_node(e, case):
    """RFC 792 / 1812: the node, as a router, answers a packet whose TTL runs out with time
    exceeded: from its own address toward the sender (found in the FIB), back to the
    sender's MAC out of the interface the packet came in on, quoting the packet as it
    arrived (untranslated: the sender must recognise it)."""
    try:
        frame, iface, sender_mac = case.setup(e)
        flows_before = table_len(e.dp, "pending") + table_len(e.dp, "flows")
        sent = bytes(frame)
        verdict, action, data = e.run(frame, iface)
        assert (verdict, action) == (Verdict.TX_TIME_EXCEEDED, "XDP_TX")
        assert_error_sums(data)
        p = Ether(data)
        assert (p.src, p.dst) == (MAC[iface], sender_mac), "back to the sender's MAC"
        ip_in = IP(sent[14:])
        assert (p[IP].src, p[IP].dst) == (NODE_IP[iface], ip_in.src)
        assert (p[ICMP].type, p[ICMP].code) == (11, 0)
        quote = bytes(p[ICMP].payload)
        assert quote == sent[14:14 + 20 + case.l4_quote], "quote: the packet as it arrived"
        assert p[IP].len == 20 + 8 + 20 + case.l4_quote
        assert table_len(e.dp, "pending") + table_len(e.dp, "flows") == flows_before, \
            "a packet that expired here made a flow"
    finally:
        NlbDataplane(e.dp).apply(NlbConfig())


@pytest.mark.parametrize("name", ["about-a-live-flow-from-outside", "about-a-live-flow-from-inside",
                                  "about-no-flow", "too-big-for-the-route"])
def test_an_icmp_error_never_gets_an_error_back(e, name):
    """A TTL-1 ICMP error is dropped, never answered with time exceeded; one too big for
    its next hop is dropped, never answered with fragmentation needed (RFC 1812 4.3.2.7)."""
    port = nat_udp(e, dst=SMALL_MTU_HOST if name == "too-big-for-the-route" else INET)
    if name == "too-big-for-the-route":
        embedded = IP(src=SMALL_MTU_HOST, dst=CLIENT) / UDP(sport=53, dport=40000) / (b"a" * 1400)
        frame, iface = from_client(IP(src=CLIENT, dst=SMALL_MTU_HOST, flags="DF") /
                                   ICMP(type=3, code=3) / embedded), "in0"
        want = Verdict.DROP_NO_REPLY
    elif name == "about-a-live-flow-from-outside":
        embedded = IP(src=NAT_IP, dst=INET) / UDP(sport=port, dport=53) / b"q"
        frame, iface = from_inet(IP(src=ROUTER, dst=NAT_IP, ttl=1) / ICMP(type=3, code=1) /
                                 embedded), "out0"
        want = Verdict.DROP_NO_REPLY
    elif name == "about-a-live-flow-from-inside":
        embedded = IP(src=INET, dst=CLIENT) / UDP(sport=53, dport=40000) / b"a"
        frame, iface = from_client(IP(src=CLIENT, dst=INET, ttl=1) / ICMP(type=3, code=3) /
                                   embedded), "in0"
        want = Verdict.DROP_NO_REPLY
    else:
        embedded = IP(src=NAT_IP, dst=INET) / UDP(sport=port + 1, dport=53) / b"q"
        frame, iface = from_inet(IP(src=ROUTER, dst=NAT_IP, ttl=1) / ICMP(type=3, code=1) /
                                 embedded), "out0"
        want = Verdict.DROP_NO_FLOW
    verdict, action, _ = e.run(frame, iface)
    assert (verdict, action) == (want, "XDP_DROP")


# ---- too big for the next hop ------------------------------------------------------------

def _big(cport, size, df=True, dst=SMALL_MTU_HOST, seq=1101, ack=5001):
    """A TCP data packet of `size` bytes (IP total length) from the client."""
    payload = b"d" * (size - 40)
    return from_client(IP(src=CLIENT, dst=dst, flags="DF" if df else 0, id=77) /
                       TCP(sport=cport, dport=80, flags="PA", seq=seq, ack=ack) / payload)


def _small_mtu_flow(e, cport=40000):
    """A TCP connection to a host behind the small-MTU route (handshake done)."""
    verdict, _, out = e.run(client_tcp(cport, "S", 1000, dst=SMALL_MTU_HOST))
    assert verdict == Verdict.TX_NAT_OUT
    port = nat_port_of(out)
    assert e.run(server_tcp(port, "SA", 5000, 1001, src=SMALL_MTU_HOST), "out0")[0] == \
        Verdict.TX_NAT_IN
    assert e.run(client_tcp(cport, "A", 1001, 5001, dst=SMALL_MTU_HOST))[0] == Verdict.TX_NAT_OUT
    return port


@pytest.mark.parametrize("size,df,want", [
    (SMALL_MTU, True, Verdict.TX_NAT_OUT),
    (SMALL_MTU + 1, True, Verdict.TX_FRAG_NEEDED),
    (1500, True, Verdict.TX_FRAG_NEEDED),
    (1500, False, Verdict.PASS_FRAGMENTING),
], ids=["mtu-fits", "one-byte-over-df", "full-size-df", "full-size-no-df"])
def test_packet_too_big_for_the_route(e, size, df, want):
    """The route to SMALL_MTU_HOST has an MTU of 1280 (the interfaces 1500). A packet of a
    live flow (its next hop cached by the handshake's small packets) that does not fit:
    with DF the client gets fragmentation needed with the route's MTU, quoting its packet
    untranslated; without DF the kernel fragments it, translated."""
    port = _small_mtu_flow(e)
    frame = _big(40000, size, df)
    sent = bytes(frame)
    verdict, action, data = e.run(frame)
    assert (verdict, action) == (want, want.action)
    p = Ether(data)
    if want == Verdict.TX_FRAG_NEEDED:
        assert_error_sums(data)
        assert (p.src, p.dst) == (MAC["in0"], CLIENT_MAC)
        assert (p[IP].src, p[IP].dst) == (NODE_IP["in0"], CLIENT)
        assert (p[ICMP].type, p[ICMP].code, p[ICMP].nexthopmtu) == (3, 4, SMALL_MTU)
        assert bytes(p[ICMP].payload) == sent[14:14 + 40], "quote: the packet as it arrived"
    else:
        assert_checksums(data)
        assert (p[IP].src, p[IP].dst, p[TCP].sport, p[TCP].dport) == \
            (NAT_IP, SMALL_MTU_HOST, port, 80), "translated"
        assert p[IP].len == size and bytes(p[TCP].payload) == sent[14 + 40:]
        if want == Verdict.PASS_FRAGMENTING:
            assert p[IP].ttl == 64, "the kernel forwards it and decrements the TTL"


def test_first_packet_of_a_new_flow_too_big(e):
    """A new flow's first packet (UDP, DF) too big for the route: fragmentation needed."""
    frame = from_client(IP(src=CLIENT, dst=SMALL_MTU_HOST, flags="DF") /
                        UDP(sport=40100, dport=53) / (b"u" * 1400))
    verdict, _, data = e.run(frame)
    assert verdict == Verdict.TX_FRAG_NEEDED
    assert_error_sums(data)
    p = Ether(data)
    assert (p[ICMP].type, p[ICMP].code, p[ICMP].nexthopmtu) == (3, 4, SMALL_MTU)
    assert (p[IPerror].src, p[UDPerror].sport) == (CLIENT, 40100)


@pytest.mark.parametrize("dst,gso_size,want_tc,want_mtu", [
    (INET, 1448, Verdict.TX_NAT_OUT, 1500),
    (SMALL_MTU_HOST, 1200, Verdict.TX_NAT_OUT, SMALL_MTU),
    (SMALL_MTU_HOST, 1448, Verdict.TX_FRAG_NEEDED, SMALL_MTU),
], ids=["segments-fit-the-interface", "segments-fit-the-route", "segments-too-big-for-the-route"])
def test_gso_superpacket_is_judged_by_its_segments(e, dst, gso_size, want_tc, want_mtu):
    """At tc a GSO superpacket (3,000 bytes of TCP payload, 3 segments) is translated when
    each segment fits the next hop; a segment too big gets fragmentation needed. At XDP
    there is no GSO: the same 3,040-byte datagram is one packet, too big for any MTU
    here."""
    verdict, _, out = e.run(client_tcp(40000, "S", 1000, dst=dst))
    port = nat_port_of(out)
    e.run(server_tcp(port, "SA", 5000, 1001, src=dst), "out0")
    frame = _big(40000, 3040, True, dst=dst)
    if e.hook == "tc":
        verdict, action, data = e.run(frame, gso_size=gso_size, gso_segs=3)
        want = want_tc
    else:
        verdict, action, data = e.run(frame)
        want = Verdict.TX_FRAG_NEEDED
    assert (verdict, action) == (want, want.action)
    p = Ether(data)
    if want == Verdict.TX_NAT_OUT:
        assert (p[IP].src, p[TCP].sport, p[IP].ttl) == (NAT_IP, port, 63)
        assert len(p[TCP].payload) == 3000
        assert_checksums(data)
    else:
        assert (p[ICMP].type, p[ICMP].code, p[ICMP].nexthopmtu) == (3, 4, want_mtu)
        assert_error_sums(data)


# ---- next hop not resolved ----------------------------------------------------------------

@dataclass
class NeighCase:
    name: str
    setup: Callable     # env -> (frame, ingress, want verdict at tc, translated src, dst)


def _neigh_out(e):
    frame = from_client(IP(src=CLIENT, dst=INET_NO_NEIGH) /
                        TCP(sport=40000, dport=80, flags="S", seq=1000))
    return frame, "in0", Verdict.TX_NAT_OUT, NAT_IP, INET_NO_NEIGH


def _neigh_reply(e):
    port = nat_udp(e, src=CLIENT_NO_NEIGH)
    frame = from_inet(IP(src=INET, dst=NAT_IP) / UDP(sport=53, dport=port) / b"answer")
    return frame, "out0", Verdict.TX_NAT_IN, INET, CLIENT_NO_NEIGH


def _neigh_target(e):
    NlbDataplane(e.dp).apply(nlb_config(targets=[TARGET_NO_NEIGH]))
    frame = from_inet(IP(src=INET, dst=VIP) / TCP(sport=50000, dport=80, flags="S", seq=10))
    return frame, "out0", Verdict.TX_NLB_IN, INET, TARGET_NO_NEIGH


NEIGHS = [NeighCase("nat-out-to-a-host-not-resolved", _neigh_out),
          NeighCase("nat-reply-to-a-client-not-resolved", _neigh_reply),
          NeighCase("nlb-to-a-new-target-not-resolved", _neigh_target)]


@pytest.mark.parametrize("case", NEIGHS, ids=lambda c: c.name)
def test_next_hop_without_a_neighbour_is_translated_then_resolved(e, case):
    """No neighbour entry for the next hop: at tc the translated packet goes through the
    neighbour subsystem (bpf_redirect_neigh: it resolves the MAC and queues meanwhile),
    TTL decremented here; at XDP the translated packet goes to the kernel (PASS_NEIGH),
    which resolves, decrements the TTL and forwards. Never untranslated."""
    try:
        frame, iface, want_tc, src, dst = case.setup(e)
        before = e.stats()["NEIGH_RESOLVE"]
        verdict, action, data = e.run(frame, iface)
        p = Ether(data)
        assert (p[IP].src, p[IP].dst) == (src, dst), "translated"
        assert_checksums(data)
        if e.hook == "tc":
            assert (verdict, action) == (want_tc, "XDP_REDIRECT")  # TC_ACT_REDIRECT
            assert e.stats()["NEIGH_RESOLVE"] == before + 1
            assert p[IP].ttl == 63
        else:
            assert (verdict, action) == (Verdict.PASS_NEIGH, "XDP_PASS")
            assert p[IP].ttl == 64, "the kernel decrements it when it forwards"
    finally:
        NlbDataplane(e.dp).apply(NlbConfig())
