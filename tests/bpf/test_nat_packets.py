"""NAT data path, packet by packet, through BPF_PROG_TEST_RUN (table-driven)."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, TCPerror, UDPerror
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.layers.inet6 import IPv6
from scapy.packet import Raw

from bpf_env import CLIENT, CLIENT2, CLIENT_MAC, INET, INET2, INET_MAC, MAC, NAT_IP, ROUTER
from hyperplane.nat.gateway import GatewayConfig, apply_gateway
from hyperplane.datapath.verdicts import Verdict
from packets import assert_checksums, from_client, from_inet, inet_sum, tcp_syn


def out_to_inet(pkt: Ether, dst_mac=INET_MAC):
    assert pkt.src == MAC["out0"] and pkt.dst == dst_mac, "wrong next hop MACs"


def nat_port(e, client=CLIENT, cport=40000, proto="tcp"):
    for f in e.dp and __import__("hyperplane.datapath.flows", fromlist=["x"]).list_flows(e.dp):
        if f.kind == "NAT_OUT" and f.src == client and f.sport == cport and f.proto == proto:
            return f.new_sport
    raise AssertionError(f"no NAT flow for {client}:{cport}/{proto}")


# ---- outbound and reply translation ----------------------------------------------------

@dataclass
class Case:
    name: str
    packet: Callable[[], Ether]
    verdict: Verdict
    action: str
    check: Callable[[Ether], None] | None = None
    iface: str = "in0"


def _check_tcp_out(p):
    out_to_inet(p)
    assert (p[IP].src, p[IP].dst, p[IP].ttl) == (NAT_IP, INET, 63)
    assert 1024 <= p[TCP].sport <= 65535 and p[TCP].dport == 80
    assert p[TCP].flags == "S" and p[TCP].seq == 1000 and bytes(p[TCP].payload) == b""


def _check_udp_out(p):
    out_to_inet(p)
    assert (p[IP].src, p[IP].dst) == (NAT_IP, INET)
    assert p[UDP].dport == 53 and bytes(p[UDP].payload) == b"query"


def _check_udp_nocsum(p):
    assert p[IP].src == NAT_IP and p[UDP].chksum == 0


def _check_icmp_out(p):
    out_to_inet(p)
    assert (p[IP].src, p[IP].dst, p[ICMP].type, p[ICMP].seq) == (NAT_IP, INET, 8, 7)
    assert bytes(p[ICMP].payload) == b"ping-payload"


def _check_vlan(p):
    assert p[Dot1Q].vlan == 42 and p[IP].src == NAT_IP


OUTBOUND = [
    Case("tcp-syn", lambda: tcp_syn(), Verdict.TX_NAT_OUT, "XDP_REDIRECT", _check_tcp_out),
    Case("udp", lambda: from_client(IP(src=CLIENT, dst=INET) / UDP(sport=5353, dport=53) / b"query"),
         Verdict.TX_NAT_OUT, "XDP_REDIRECT", _check_udp_out),
    Case("udp-no-checksum",
         lambda: from_client(IP(src=CLIENT, dst=INET) / UDP(sport=5354, dport=53, chksum=0) / b"q"),
         Verdict.TX_NAT_OUT, "XDP_REDIRECT", _check_udp_nocsum),
    Case("icmp-echo", lambda: from_client(IP(src=CLIENT, dst=INET) / ICMP(type=8, id=77, seq=7) /
                                          b"ping-payload"),
         Verdict.TX_NAT_OUT, "XDP_REDIRECT", _check_icmp_out),
    Case("vlan-tagged", lambda: Ether(src=CLIENT_MAC, dst=MAC["in0"]) / Dot1Q(vlan=42) /
         IP(src=CLIENT, dst=INET) / TCP(sport=40001, dport=80, flags="S"),
         Verdict.TX_NAT_OUT, "XDP_REDIRECT", _check_vlan),
]


@pytest.mark.parametrize("case", OUTBOUND, ids=lambda c: c.name)
def test_outbound(e, case):
    verdict, action, data = e.run(case.packet(), case.iface)
    assert (verdict, action) == (case.verdict, case.action)
    assert_checksums(data)
    case.check(Ether(data))


@pytest.mark.parametrize("proto", ["tcp", "udp", "icmp"])
def test_reply_translated_back(e, proto):
    if proto == "tcp":
        first = tcp_syn(sport=40000)
    elif proto == "udp":
        first = from_client(IP(src=CLIENT, dst=INET) / UDP(sport=40000, dport=53) / b"q")
    else:
        first = from_client(IP(src=CLIENT, dst=INET) / ICMP(type=8, id=40000, seq=1) / b"x")
    _, _, out = e.run(first)
    o = Ether(out)
    port = o[TCP].sport if proto == "tcp" else o[UDP].sport if proto == "udp" else o[ICMP].id
    if proto == "tcp":
        reply = from_inet(IP(src=INET, dst=NAT_IP) / TCP(sport=80, dport=port, flags="SA",
                                                         seq=5000, ack=1001))
    elif proto == "udp":
        reply = from_inet(IP(src=INET, dst=NAT_IP) / UDP(sport=53, dport=port) / b"answer")
    else:
        reply = from_inet(IP(src=INET, dst=NAT_IP) / ICMP(type=0, id=port, seq=1) / b"x")
    verdict, action, data = e.run(reply, "out0")
    assert (verdict, action) == (Verdict.TX_NAT_IN, "XDP_REDIRECT")
    assert_checksums(data)
    p = Ether(data)
    assert (p.src, p.dst) == (MAC["in0"], CLIENT_MAC)
    assert (p[IP].src, p[IP].dst, p[IP].ttl) == (INET, CLIENT, 63)
    if proto == "tcp":
        assert (p[TCP].sport, p[TCP].dport, p[TCP].flags) == (80, 40000, "SA")
        assert e.gw_metrics()["ConnectionEstablishedCount"] == 1
    elif proto == "udp":
        assert (p[UDP].sport, p[UDP].dport, bytes(p[UDP].payload)) == (53, 40000, b"answer")
    else:
        assert (p[ICMP].type, p[ICMP].id) == (0, 40000)


def test_two_connections_to_one_destination_get_different_ports(e):
    ports = set()
    for cport in (40000, 40001, 40002, 40003):
        _, _, out = e.run(tcp_syn(sport=cport))
        ports.add(Ether(out)[TCP].sport)
    _, _, out = e.run(tcp_syn(sport=40000, src=CLIENT2))  # same client port, other host
    ports.add(Ether(out)[TCP].sport)
    assert len(ports) == 5


def test_one_port_serves_two_destinations(e):
    """Ports are unique per destination (AWS: ~55,000 per destination, not in total): with a
    one-port range, connections to two destinations both get it."""
    apply_gateway(e.dp, GatewayConfig("gw-test", 0, [NAT_IP], ["10.10.0.0/24"],
                                      port_min=2000, port_max=2000))
    _, _, a = e.run(tcp_syn(sport=40000, dst=INET))
    _, _, b = e.run(tcp_syn(sport=40001, dst=INET2))
    assert Ether(a)[TCP].sport == Ether(b)[TCP].sport == 2000
    verdict, _, _ = e.run(tcp_syn(sport=40002, dst=INET))  # the one port to INET is taken
    assert verdict == Verdict.DROP_PORT_ALLOC


def test_existing_flow_reuses_its_port(e):
    _, _, a = e.run(tcp_syn(sport=40000))
    ack = from_client(IP(src=CLIENT, dst=INET) / TCP(sport=40000, dport=80, flags="A", seq=1001))
    verdict, _, b = e.run(ack)
    assert verdict == Verdict.TX_NAT_OUT and Ether(a)[TCP].sport == Ether(b)[TCP].sport


# ---- port exhaustion -------------------------------------------------------------------

def test_port_exhaustion_refuses_next_flow_and_keeps_existing(e):
    apply_gateway(e.dp, GatewayConfig("gw-test", 0, [NAT_IP], ["10.10.0.0/24"],
                                      port_min=3000, port_max=3003))
    ports = []
    for cport in range(41000, 41004):
        verdict, _, out = e.run(tcp_syn(sport=cport))
        assert verdict == Verdict.TX_NAT_OUT
        ports.append(Ether(out)[TCP].sport)
    assert sorted(ports) == [3000, 3001, 3002, 3003]
    verdict, action, _ = e.run(tcp_syn(sport=41004))
    assert (verdict, action) == (Verdict.DROP_PORT_ALLOC, "XDP_DROP")
    assert e.gw_metrics()["ErrorPortAllocation"] == 1
    # the existing flows are untouched
    for cport, port in zip(range(41000, 41004), ports):
        verdict, _, out = e.run(from_client(IP(src=CLIENT, dst=INET) /
                                            TCP(sport=cport, dport=80, flags="A")))
        assert verdict == Verdict.TX_NAT_OUT and Ether(out)[TCP].sport == port
    # another destination still has all four ports
    verdict, _, _ = e.run(tcp_syn(sport=41004, dst=INET2))
    assert verdict == Verdict.TX_NAT_OUT


def test_several_nat_ips_extend_the_range(e):
    apply_gateway(e.dp, GatewayConfig("gw-test", 0, [NAT_IP, "198.18.0.101"], ["10.10.0.0/24"],
                                      port_min=3000, port_max=3000))
    seen = set()
    for cport in (42000, 42001):
        verdict, _, out = e.run(tcp_syn(sport=cport))
        assert verdict == Verdict.TX_NAT_OUT
        seen.add((Ether(out)[IP].src, Ether(out)[TCP].sport))
    assert seen == {(NAT_IP, 3000), ("198.18.0.101", 3000)}
    assert e.run(tcp_syn(sport=42002))[0] == Verdict.DROP_PORT_ALLOC


# ---- ICMP errors -----------------------------------------------------------------------

def _nat_tcp_flow(e, cport=40000):
    _, _, out = e.run(tcp_syn(sport=cport))
    return Ether(out)[TCP].sport


def _nat_udp_flow(e, cport=40000):
    _, _, out = e.run(from_client(IP(src=CLIENT, dst=INET) / UDP(sport=cport, dport=53) / b"q"))
    return Ether(out)[UDP].sport


def test_icmp_frag_needed_about_tcp_reaches_client(e):
    port = _nat_tcp_flow(e)
    embedded = IP(src=NAT_IP, dst=INET, ttl=63) / TCP(sport=port, dport=80, flags="S", seq=1000)
    err = from_inet(IP(src=ROUTER, dst=NAT_IP) / ICMP(type=3, code=4, nexthopmtu=1400) / embedded)
    verdict, action, data = e.run(err, "out0")
    assert (verdict, action) == (Verdict.TX_ICMP_ERROR, "XDP_REDIRECT")
    assert_checksums(data)
    p = Ether(data)
    assert (p[IP].src, p[IP].dst) == (ROUTER, CLIENT)
    assert (p[ICMP].type, p[ICMP].code, p[ICMP].nexthopmtu) == (3, 4, 1400)
    assert (p[IPerror].src, p[IPerror].dst) == (CLIENT, INET)
    assert (p[TCPerror].sport, p[TCPerror].dport) == (40000, 80)


def test_icmp_port_unreachable_about_udp_from_destination(e):
    port = _nat_udp_flow(e)
    embedded = IP(src=NAT_IP, dst=INET) / UDP(sport=port, dport=53) / b"q"
    err = from_inet(IP(src=INET, dst=NAT_IP) / ICMP(type=3, code=3) / embedded)
    verdict, _, data = e.run(err, "out0")
    assert verdict == Verdict.TX_ICMP_ERROR
    assert_checksums(data)
    p = Ether(data)
    assert (p[IP].src, p[IP].dst) == (INET, CLIENT)
    assert (p[IPerror].src, p[UDPerror].sport) == (CLIENT, 40000)


def test_icmp_time_exceeded_truncated_tcp_embedding(e):
    """Routers may quote only 8 bytes of TCP (no checksum field): still translated."""
    port = _nat_tcp_flow(e)
    inner = bytes(IP(src=NAT_IP, dst=INET, ttl=1) / TCP(sport=port, dport=80, flags="S"))[:28]
    err = from_inet(IP(src=ROUTER, dst=NAT_IP) / ICMP(type=11, code=0) / Raw(inner))
    verdict, _, data = e.run(err, "out0")
    assert verdict == Verdict.TX_ICMP_ERROR
    p = Ether(data)
    assert p[IP].dst == CLIENT
    quoted = bytes(p[ICMP].payload)
    assert IP(quoted[:20] + b"\0" * 8).src == CLIENT and int.from_bytes(quoted[20:22], "big") == 40000
    # scapy would rebuild the quoted TCP header whole, so check the sums on the raw bytes
    ip_start = 14
    icmp = data[ip_start + 20:ip_start + p[IP].len]
    assert inet_sum(data[ip_start:ip_start + 20]) == 0, "outer IP checksum"
    assert inet_sum(icmp) == 0, "ICMP checksum"
    assert inet_sum(quoted[:20]) == 0, "embedded IP checksum"


def test_icmp_error_from_client_about_reply(e):
    """The client says port unreachable about a reply it got: leaves from the NAT IP, the
    embedded reply shows the NAT IP and port the destination knows."""
    port = _nat_udp_flow(e)
    embedded = IP(src=INET, dst=CLIENT, ttl=63) / UDP(sport=53, dport=40000) / b"answer"
    err = from_client(IP(src=CLIENT, dst=INET) / ICMP(type=3, code=3) / embedded)
    verdict, _, data = e.run(err, "in0")
    assert verdict == Verdict.TX_ICMP_ERROR
    assert_checksums(data)
    p = Ether(data)
    out_to_inet(p)
    assert (p[IP].src, p[IP].dst) == (NAT_IP, INET)
    assert (p[IPerror].src, p[IPerror].dst) == (INET, NAT_IP)
    assert (p[UDPerror].sport, p[UDPerror].dport) == (53, port)


def test_icmp_error_about_unknown_flow_is_dropped(e):
    embedded = IP(src=NAT_IP, dst=INET) / UDP(sport=5555, dport=53)
    err = from_inet(IP(src=INET, dst=NAT_IP) / ICMP(type=3, code=3) / embedded)
    assert e.run(err, "out0")[0] == Verdict.DROP_NO_FLOW


# ---- verdicts of odd and bad packets ---------------------------------------------------

def _raw_prefix(pkt, n):
    return Raw(bytes(pkt)[:n])


_SYN = tcp_syn()
_UDP = from_client(IP(src=CLIENT, dst=INET) / UDP(sport=1, dport=2) / b"x")
_ICMP = from_client(IP(src=CLIENT, dst=INET) / ICMP(type=8, id=1))

ODD = [
    ("arp", lambda: Ether(src=CLIENT_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(pdst="10.10.0.1"),
     Verdict.PASS_NON_IP),
    ("ipv6", lambda: Ether(src=CLIENT_MAC, dst=MAC["in0"]) / IPv6() / UDP(), Verdict.PASS_NON_IP),
    ("vlan-truncated", lambda: Raw(bytes(Ether(src=CLIENT_MAC, dst=MAC["in0"], type=0x8100))
                                   + b"\x00"), Verdict.DROP_MALFORMED),
    ("short-ip", lambda: _raw_prefix(_SYN, 14 + 12), Verdict.DROP_MALFORMED),
    ("ip-ihl-4", lambda: from_client(IP(src=CLIENT, dst=INET, ihl=4) / UDP()), Verdict.DROP_MALFORMED),
    ("ip-version-6-in-ipv4", lambda: from_client(IP(src=CLIENT, dst=INET, version=6) / UDP()),
     Verdict.DROP_MALFORMED),
    ("ip-total-length-too-big", lambda: from_client(IP(src=CLIENT, dst=INET, len=1000) / UDP()),
     Verdict.DROP_MALFORMED),
    ("ip-total-length-too-small", lambda: from_client(IP(src=CLIENT, dst=INET, len=10) / UDP()),
     Verdict.DROP_MALFORMED),
    ("short-tcp", lambda: _raw_prefix(_SYN, 14 + 20 + 10), Verdict.DROP_MALFORMED),
    ("tcp-doff-beyond-packet", lambda: from_client(IP(src=CLIENT, dst=INET) /
                                                   TCP(dataofs=15, flags="S")), Verdict.DROP_MALFORMED),
    ("tcp-doff-4", lambda: from_client(IP(src=CLIENT, dst=INET) / TCP(dataofs=4, flags="S")),
     Verdict.DROP_MALFORMED),
    ("short-udp", lambda: _raw_prefix(_UDP, 14 + 20 + 4), Verdict.DROP_MALFORMED),
    ("udp-length-under-8", lambda: from_client(IP(src=CLIENT, dst=INET) / UDP(len=4)),
     Verdict.DROP_MALFORMED),
    ("short-icmp", lambda: _raw_prefix(_ICMP, 14 + 20 + 4), Verdict.DROP_MALFORMED),
    ("ip-options", lambda: from_client(IP(src=CLIENT, dst=INET, options=b"\x01\x01\x01\x01") /
                                       TCP(flags="S")), Verdict.DROP_IP_OPTIONS),
    ("ttl-1", lambda: from_client(IP(src=CLIENT, dst=INET, ttl=1) / TCP(flags="S")),
     Verdict.TX_TIME_EXCEEDED),
    ("unknown-protocol", lambda: from_client(IP(src=CLIENT, dst=INET, proto=47) / b"gre!"),
     Verdict.DROP_UNKNOWN_PROTO),
    ("tcp-fragment", lambda: from_client(IP(src=CLIENT, dst=INET, flags="MF") / TCP(flags="S")),
     Verdict.DROP_FRAGMENT),
    ("lone-later-udp-fragment", lambda: from_client(IP(src=CLIENT, dst=INET, frag=10, proto=17) /
                                                    (b"x" * 16)), Verdict.DROP_FRAGMENT),
    ("icmp-timestamp", lambda: from_client(IP(src=CLIENT, dst=INET) / ICMP(type=13)),
     Verdict.DROP_ICMP_UNSUPPORTED),
    ("to-nat-ip-no-flow", lambda: from_inet(IP(src=INET, dst=NAT_IP) / TCP(sport=80, dport=5000,
                                                                           flags="SA")),
     Verdict.DROP_NO_FLOW),
    ("ping-nat-ip", lambda: from_inet(IP(src=INET, dst=NAT_IP) / ICMP(type=8)), Verdict.PASS_LOCAL),
    ("not-for-us", lambda: from_inet(IP(src=INET, dst=INET2) / UDP()), Verdict.PASS_NO_RESOURCE),
    ("inside-to-inside", lambda: from_client(IP(src=CLIENT, dst=CLIENT2) / UDP()),
     Verdict.PASS_NO_RESOURCE),
    ("tcp-rst-no-flow", lambda: from_client(IP(src=CLIENT, dst=INET) / TCP(flags="R")),
     Verdict.DROP_NO_FLOW),
]


@pytest.mark.parametrize("name,packet,verdict", ODD, ids=[c[0] for c in ODD])
def test_odd_packets_get_their_verdict(e, name, packet, verdict):
    from bpf_env import MIN_IPV4_FRAME
    iface = "out0" if name in ("to-nat-ip-no-flow", "ping-nat-ip", "not-for-us") else "in0"
    frame = bytes(packet())
    if frame[12:14] == b"\x08\x00" and len(frame) < MIN_IPV4_FRAME[e.hook]:
        with pytest.raises(OSError):  # the kernel never hands the hook such a frame
            e.run(frame, iface)
        return
    got, action, _ = e.run(frame, iface)
    assert got == verdict
    assert action == verdict.action
    assert not list(e.dp.table("flows").items()), "a rejected packet created a flow"


def test_every_truncation_of_a_syn_is_rejected_cleanly(e):
    """Cut a valid SYN at every byte past the shortest frame the hook can be given (XDP:
    the Ethernet header; tc: an IPv4 header): each prefix is dropped as malformed, and
    no flow is made."""
    from bpf_env import MIN_IPV4_FRAME
    whole = bytes(tcp_syn())
    for n in range(MIN_IPV4_FRAME[e.hook], len(whole)):
        verdict, _, _ = e.run(Raw(whole[:n]))
        assert verdict == Verdict.DROP_MALFORMED, f"prefix of {n} bytes: {verdict.name}"
    assert not list(e.dp.table("flows").items())


def test_udp_fragments_follow_the_first(e):
    payload = b"A" * 64
    whole = IP(src=CLIENT, dst=INET, id=4242) / UDP(sport=40000, dport=53) / payload
    frags = [from_client(f) for f in __import__("scapy.all", fromlist=["fragment"]).fragment(whole, 32)]
    assert len(frags) >= 2
    v1, _, out1 = e.run(frags[0])
    assert v1 == Verdict.TX_NAT_OUT
    for f in frags[1:]:
        v, _, out = e.run(f)
        assert v == Verdict.TX_FRAGMENT
        assert Ether(out)[IP].src == NAT_IP
        assert_checksums(out)


# ---- timeouts and the RST after idle -------------------------------------------------

def test_idle_udp_flow_expires_and_becomes_a_new_flow(e):
    e.set_timeouts(udp=1)
    port = _nat_udp_flow(e)
    time.sleep(1.3)
    late = from_inet(IP(src=INET, dst=NAT_IP) / UDP(sport=53, dport=port) / b"late")
    assert e.run(late, "out0")[0] == Verdict.DROP_NO_FLOW
    assert e.gw_metrics()["IdleTimeoutCount"] == 1
    verdict, _, _ = e.run(from_client(IP(src=CLIENT, dst=INET) / UDP(sport=40000, dport=53) / b"q"))
    assert verdict == Verdict.TX_NAT_OUT
    assert e.stats()["FLOW_CREATED"] >= 2


def test_rst_after_idle_timeout(e):
    e.set_timeouts(tcp_established=1, tcp_syn=1)
    port = _nat_tcp_flow(e)
    e.run(from_inet(IP(src=INET, dst=NAT_IP) / TCP(sport=80, dport=port, flags="SA", seq=5000,
                                                    ack=1001)), "out0")
    time.sleep(1.3)
    late = from_client(IP(src=CLIENT, dst=INET) / TCP(sport=40000, dport=80, flags="PA",
                                                      seq=1001, ack=5001) / b"GET /")
    verdict, action, data = e.run(late)
    assert (verdict, action) == (Verdict.TX_RST, "XDP_TX")
    assert_checksums(data)
    p = Ether(data)
    assert (p.src, p.dst) == (MAC["in0"], CLIENT_MAC)
    assert (p[IP].src, p[IP].dst, p[TCP].sport, p[TCP].dport) == (INET, CLIENT, 80, 40000)
    assert p[TCP].flags == "R" and p[TCP].seq == 5001 and len(p[TCP].payload) == 0
    assert e.gw_metrics()["IdleTimeoutCount"] == 1


def test_rst_for_non_syn_without_any_flow(e):
    pkt = from_client(IP(src=CLIENT, dst=INET) / TCP(sport=40000, dport=80, flags="F", seq=77))
    verdict, action, data = e.run(pkt)
    assert (verdict, action) == (Verdict.TX_RST, "XDP_TX")
    p = Ether(data)
    assert p[TCP].flags == "RA" and p[TCP].ack == 78 and p[TCP].seq == 0
    assert_checksums(data)


def test_fin_both_ways_closes_the_flow(e):
    port = _nat_tcp_flow(e)
    e.run(from_inet(IP(src=INET, dst=NAT_IP) / TCP(sport=80, dport=port, flags="SA")), "out0")
    e.run(from_client(IP(src=CLIENT, dst=INET) / TCP(sport=40000, dport=80, flags="FA")))
    e.run(from_inet(IP(src=INET, dst=NAT_IP) / TCP(sport=80, dport=port, flags="FA")), "out0")
    from hyperplane.datapath.flows import list_flows
    states = {f.tcp_state for f in list_flows(e.dp)}
    assert states == {"CLOSED"}
    assert e.stats()["FLOW_CLOSED"] == 1


def test_full_flow_table_keeps_every_confirmed_flow(env):
    """A full flow table is a clear, counted refusal, and nothing live is evicted: four
    confirmed flows fill it; a fifth still works unconfirmed (counted S_CONFIRM_FULL and
    in its gateway's flows_refused), and the first four keep working."""
    from bpf_env import SIZES, Env
    from dataclasses import replace
    from hyperplane.datapath.loader import Datapath
    from hyperplane.datapath.settings import write_config
    small = Datapath(replace(SIZES, max_flows=8), hook=env.hook)  # room for 4 flows
    try:
        write_config(small)
        apply_gateway(small, GatewayConfig("gw-small", 0, [NAT_IP], ["10.10.0.0/24"]))
        run = Env(small, env.ifindex, env.hook)
        ports = {}
        for cport in range(47000, 47005):
            verdict, _, out = run.run(tcp_syn(sport=cport))
            assert verdict == Verdict.TX_NAT_OUT
            ports[cport] = Ether(out)[TCP].sport
            reply = from_inet(IP(src=INET, dst=NAT_IP) / TCP(sport=80, dport=ports[cport],
                                                                flags="SA"))
            assert run.run(reply, "out0")[0] == Verdict.TX_NAT_IN
            ack = from_client(IP(src=CLIENT, dst=INET) / TCP(sport=cport, dport=80, flags="A"))
            assert run.run(ack)[0] == Verdict.TX_NAT_OUT  # the handshake's end confirms
        assert run.stats()["CONFIRM_FULL"] == 1 and run.stats()["FLOW_CONFIRMED"] == 4
        assert len(list(small.table("flows").items())) == 8
        assert len(list(small.table("pending").items())) == 2, "the fifth stays unconfirmed"
        assert int(sum(c.flows_refused for c in small.table("gw_stats")[0])) == 1
        for cport, port in ports.items():
            ack = from_client(IP(src=CLIENT, dst=INET) / TCP(sport=cport, dport=80, flags="A"))
            assert run.run(ack)[0] == Verdict.TX_NAT_OUT, cport
    finally:
        small.close()


def test_full_reservation_table_refuses_new_flows(env):
    """No NAT port can be recorded: the new flow is refused (DROP_TABLE_FULL, counted in
    the gateway's flows_refused) and the live ones keep their ports."""
    from bpf_env import SIZES, Env
    from dataclasses import replace
    from hyperplane.datapath.loader import Datapath
    from hyperplane.datapath.settings import write_config
    small = Datapath(replace(SIZES, max_reservations=4), hook=env.hook)
    try:
        write_config(small)
        apply_gateway(small, GatewayConfig("gw-small", 0, [NAT_IP], ["10.10.0.0/24"]))
        run = Env(small, env.ifindex, env.hook)
        for cport in range(47000, 47004):
            assert run.run(tcp_syn(sport=cport))[0] == Verdict.TX_NAT_OUT
        verdict, action, _ = run.run(tcp_syn(sport=47004))
        assert (verdict, action) == (Verdict.DROP_TABLE_FULL, "XDP_DROP")
        assert len(list(small.table("nat_resv").items())) == 4
        assert int(sum(c.flows_refused for c in small.table("gw_stats")[0])) == 1
    finally:
        small.close()


def test_active_connection_count_leaves_out_closed_flows(e):
    """Confirmed connections count (the client's ACK after the SYN-ACK confirms; a SYN, or
    a SYN and its SYN-ACK, do not: unconfirmed flows are not active); a RST ends one."""
    ports = {}
    for cport in (49003, 49000, 49001):
        ports[cport] = port = _nat_tcp_flow(e, cport=cport)
        synack = from_inet(IP(src=INET, dst=NAT_IP) / TCP(sport=80, dport=port, flags="SA"))
        assert e.run(synack, "out0")[0] == Verdict.TX_NAT_IN
        if cport != 49003:
            ack = from_client(IP(src=CLIENT, dst=INET) / TCP(sport=cport, dport=80, flags="A"))
            assert e.run(ack)[0] == Verdict.TX_NAT_OUT
    _nat_tcp_flow(e, cport=49002)
    assert e.gw_metrics()["ActiveConnectionCount"] == 2
    e.run(from_inet(IP(src=INET, dst=NAT_IP) / TCP(sport=80, dport=port, flags="R")), "out0")
    assert e.gw_metrics()["ActiveConnectionCount"] == 1


def test_a_refused_search_moves_the_cursor_on(e):
    """The per-destination cursor sweeps the port space: when 32 probes from it find only
    live flows, the flow is refused and the next search starts past that window (it used
    to start at the same place, so every later flow to the destination was refused too
    while ports further on were free)."""
    apply_gateway(e.dp, GatewayConfig("gw-test", 0, [NAT_IP], ["10.10.0.0/24"],
                                      port_min=1024, port_max=1103))       # 80 ports
    for i in range(40):
        assert e.run(tcp_syn(sport=41000 + i))[0] == Verdict.TX_NAT_OUT
    cursors = e.dp.table("nat_cursor")
    (key, cursor), = list(cursors.items())
    start = (cursor.value - 40) % 80          # where the 40 live flows begin
    cursors[key] = type(cursor)(start)        # a search from there sees 32 taken ports
    verdict, _, _ = e.run(tcp_syn(sport=41100))
    assert verdict == Verdict.DROP_PORT_ALLOC
    verdict, _, out = e.run(tcp_syn(sport=41101))
    assert verdict == Verdict.TX_NAT_OUT, "the search started at the same taken ports again"
    assert Ether(out)[TCP].sport == 1024 + (start + 40) % 80
