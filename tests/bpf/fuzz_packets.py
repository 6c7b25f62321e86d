"""Seeded fuzz packets for the data path (issue 6, section 2).

Valid seed frames are built once with scapy: NAT outbound TCP/UDP/ICMP echo, replies to
live NAT and NLB flows, client->VIP SYN/UDP, target->client replies, ICMP errors about live
flows from outside routers, from inside hosts and from the targets' side, 802.1Q-tagged
variants, IP options, fragments. Packets are then made from them on bytes, in plain Python
(fast): one to three mutations (truncation at every boundary, bad IHL and lengths,
trailers, IP and TCP options, fragment bits, bogus ICMP quotes, TTL 0/1, VLAN tags, fields,
byte flips, another ingress interface), after which the checksums are written right again
(checksums.fix_checksums) unless the mutation was to break one. Some packets are random
bytes. The same seed gives the same packets (for the same live flows: the NAT ports and
targets the data path chose): round r of seed s is drawn from one
random.Random(f"hyperplane-fuzz:{s}:{r}") alone.

Replies and ICMP errors must name live flows, whose NAT ports and NLB targets the data
path chooses: openers() are run first, learn() reads the ports and targets from what the
data path sent, followups() establish some of the flows, seeds() builds the templates."""
from __future__ import annotations

import ipaddress
import random
from dataclasses import dataclass

from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Raw

from checksums import ICMP_ERRORS, VLAN_TYPES, fix_checksums, l3_offset
from hyperplane.datapath.sandbox import (CLIENT, CLIENT2, CLIENT_MAC, INET, INET2, INET_MAC, MAC,
                                NAT_IP, ROUTER, TARGET_MAC, TARGETS, VIP)

INSIDE_ROUTER = "10.10.0.254"     # a router on the inside (sends ICMP errors)
TARGET_ROUTER = "10.20.0.254"     # a router on the targets' side
IFACES = ("in0", "out0", "tg0")
MAX_FRAME = 2048                  # BPF_PROG_TEST_RUN takes up to ~3.5 KB of XDP data
MIN_FRAME = 14                    # ... and nothing shorter than an Ethernet header



@dataclass(frozen=True)
class Frame:
    name: str
    data: bytes
    iface: str


@dataclass(frozen=True)
class FuzzPacket:
    data: bytes
    iface: str
    origin: str                   # the seed's name, or "random"
    ops: tuple                    # the mutations, in order
    fixed: bool                   # checksums were rewritten after the mutations


@dataclass(frozen=True)
class Live:
    """What the data path chose for the opening packets."""
    nat_tcp1: int                 # NAT ports of CLIENT:40000->INET:80, CLIENT2:40001->INET2:443
    nat_tcp2: int
    nat_udp1: int                 # CLIENT:5353->INET:53, CLIENT2:5354->INET2:123 (no checksum)
    nat_udp2: int
    nat_icmp: int                 # NAT echo id of CLIENT id 77 -> INET
    nlb_tcp1: str                 # targets of INET:50000->VIP:80, INET2:50001->VIP:80
    nlb_tcp2: str
    nlb_udp: str                  # target of INET:40001->VIP:53


# --- frames -------------------------------------------------------------------------------

def _in(l3, vlan=None):
    eth = Ether(src=CLIENT_MAC, dst=MAC["in0"])
    return bytes(eth / Dot1Q(vlan=vlan) / l3 if vlan else eth / l3)


def _out(l3, vlan=None):
    eth = Ether(src=INET_MAC, dst=MAC["out0"])
    return bytes(eth / Dot1Q(vlan=vlan) / l3 if vlan else eth / l3)


def _tg(l3):
    return bytes(Ether(src=TARGET_MAC, dst=MAC["tg0"]) / l3)


def _quote(l3, n=None):
    """The datagram an ICMP error quotes: whole, or its first n bytes."""
    raw = bytes(l3)
    return Raw(raw if n is None else raw[:n])


def openers() -> list[Frame]:
    """The first packets of the live flows, run on empty tables before every round."""
    return [
        Frame("open-nat-tcp1", _in(IP(src=CLIENT, dst=INET) /
                                   TCP(sport=40000, dport=80, flags="S", seq=1000)), "in0"),
        Frame("open-nat-tcp2", _in(IP(src=CLIENT2, dst=INET2) /
                                   TCP(sport=40001, dport=443, flags="S", seq=2000)), "in0"),
        Frame("open-nat-udp1", _in(IP(src=CLIENT, dst=INET) /
                                   UDP(sport=5353, dport=53) / b"query"), "in0"),
        Frame("open-nat-udp2", _in(IP(src=CLIENT2, dst=INET2) /
                                   UDP(sport=5354, dport=123, chksum=0) / b"ntp?"), "in0"),
        Frame("open-nat-icmp", _in(IP(src=CLIENT, dst=INET) / ICMP(type=8, id=77, seq=1) /
                                   b"ping"), "in0"),
        Frame("open-nlb-tcp1", _out(IP(src=INET, dst=VIP) /
                                    TCP(sport=50000, dport=80, flags="S", seq=10)), "out0"),
        Frame("open-nlb-tcp2", _out(IP(src=INET2, dst=VIP) /
                                    TCP(sport=50001, dport=80, flags="S", seq=20)), "out0"),
        Frame("open-nlb-udp", _out(IP(src=INET, dst=VIP) /
                                   UDP(sport=40001, dport=53) / b"q"), "out0"),
    ]


def _l4_of(data: bytes) -> tuple[int, int]:
    l3 = l3_offset(data)
    if l3 is None or l3 < 0 or len(data) < l3 + 20:
        raise ValueError("not an IPv4 frame")
    return l3, l3 + (data[l3] & 15) * 4


def learn(out: dict[str, bytes]) -> Live:
    """Read the NAT ports and NLB targets from the data path's output of openers()."""
    def sport(name):
        _, l4 = _l4_of(out[name])
        return int.from_bytes(out[name][l4:l4 + 2], "big")

    def echo_id(name):
        _, l4 = _l4_of(out[name])
        return int.from_bytes(out[name][l4 + 4:l4 + 6], "big")

    def dst(name):
        l3, _ = _l4_of(out[name])
        return str(ipaddress.IPv4Address(out[name][l3 + 16:l3 + 20]))

    return Live(sport("open-nat-tcp1"), sport("open-nat-tcp2"), sport("open-nat-udp1"),
                sport("open-nat-udp2"), echo_id("open-nat-icmp"), dst("open-nlb-tcp1"),
                dst("open-nlb-tcp2"), dst("open-nlb-udp"))


def followups(live: Live) -> list[Frame]:
    """Establish NAT TCP flow 1 and NLB TCP flow 1 (the second ones stay half-open)."""
    return [
        Frame("synack-nat-tcp1", _out(IP(src=INET, dst=NAT_IP) /
                                      TCP(sport=80, dport=live.nat_tcp1, flags="SA", seq=5000,
                                          ack=1001)), "out0"),
        Frame("synack-nlb-tcp1", _tg(IP(src=live.nlb_tcp1, dst=INET) /
                                     TCP(sport=8080, dport=50000, flags="SA", seq=7000, ack=11)),
              "tg0"),
    ]


def seeds(live: Live) -> list[Frame]:
    """The templates the fuzzer mutates (all valid, with right checksums)."""
    L = live
    get = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    f = []

    def add(name, data, iface):
        f.append(Frame(name, data, iface))

    # NAT, inside -> outside
    nat_tcp_ack = IP(src=CLIENT, dst=INET) / TCP(sport=40000, dport=80, flags="PA", seq=1001,
                                                 ack=5001) / get
    nat_udp = IP(src=CLIENT, dst=INET) / UDP(sport=5353, dport=53) / b"query-2"
    nat_echo = IP(src=CLIENT, dst=INET) / ICMP(type=8, id=77, seq=2) / b"ping-2"
    add("nat-tcp-syn-new", _in(IP(src=CLIENT, dst=INET) / TCP(sport=41000, dport=80, flags="S",
                                                              seq=9)), "in0")
    add("nat-tcp-data", _in(nat_tcp_ack), "in0")
    add("nat-tcp-fin", _in(IP(src=CLIENT, dst=INET) / TCP(sport=40000, dport=80, flags="FA",
                                                          seq=1001, ack=5001)), "in0")
    add("nat-tcp-rst", _in(IP(src=CLIENT2, dst=INET2) / TCP(sport=40001, dport=443, flags="R",
                                                            seq=2001)), "in0")
    add("nat-tcp-ack-no-flow", _in(IP(src=CLIENT, dst=INET2) /
                                   TCP(sport=41001, dport=80, flags="A", seq=5, ack=6)), "in0")
    add("nat-udp", _in(nat_udp), "in0")
    add("nat-udp-no-checksum", _in(IP(src=CLIENT2, dst=INET2) /
                                   UDP(sport=5354, dport=123, chksum=0) / b"ntp-2"), "in0")
    add("nat-udp-new", _in(IP(src=CLIENT, dst=INET2) / UDP(sport=6000, dport=53) / b"q"), "in0")
    add("nat-echo", _in(nat_echo), "in0")
    add("nat-echo-new", _in(IP(src=CLIENT2, dst=INET2) / ICMP(type=8, id=78, seq=1) / b"p"), "in0")
    add("nat-tcp-data-vlan", _in(nat_tcp_ack, vlan=42), "in0")
    add("nat-udp-vlan", _in(nat_udp, vlan=42), "in0")
    add("nat-echo-vlan", _in(nat_echo, vlan=7), "in0")
    add("nat-udp-qinq", bytes(Ether(src=CLIENT_MAC, dst=MAC["in0"], type=0x88A8) /
                              Dot1Q(vlan=100) / Dot1Q(vlan=42) / nat_udp), "in0")
    add("nat-udp-ip-options", _in(IP(src=CLIENT, dst=INET, options=b"\x01\x01\x01\x00") /
                                  UDP(sport=5353, dport=53) / b"opt"), "in0")
    add("nat-tcp-syn-rr-option", _in(IP(src=CLIENT, dst=INET, options=b"\x07\x07\x04" + b"\0" * 5)
                                     / TCP(sport=41002, dport=80, flags="S")), "in0")
    add("nat-tcp-ttl1", _in(IP(src=CLIENT, dst=INET, ttl=1) /
                            TCP(sport=40000, dport=80, flags="A", seq=1001, ack=5001)), "in0")
    datagram = IP(src=CLIENT, dst=INET, id=4242) / UDP(sport=5353, dport=53) / (b"F" * 72)
    for i, part in enumerate(fragment(datagram, 32)):
        add(f"nat-udp-fragment{i}", _in(part), "in0")
    add("nat-tcp-fragment", _in(IP(src=CLIENT, dst=INET, flags="MF", id=7) /
                                TCP(sport=40000, dport=80, flags="A")), "in0")

    # NAT, replies from outside
    add("nat-tcp-reply", _out(IP(src=INET, dst=NAT_IP) /
                              TCP(sport=80, dport=L.nat_tcp1, flags="PA", seq=5001, ack=1028) /
                              b"HTTP/1.1 200 OK\r\n\r\n"), "out0")
    add("nat-tcp-synack-half-open", _out(IP(src=INET2, dst=NAT_IP) /
                                         TCP(sport=443, dport=L.nat_tcp2, flags="SA", seq=1,
                                             ack=2001)), "out0")
    add("nat-udp-reply", _out(IP(src=INET, dst=NAT_IP) / UDP(sport=53, dport=L.nat_udp1) /
                              b"answer"), "out0")
    add("nat-udp-reply-no-checksum", _out(IP(src=INET2, dst=NAT_IP) /
                                          UDP(sport=123, dport=L.nat_udp2, chksum=0) / b"time"),
        "out0")
    add("nat-echo-reply", _out(IP(src=INET, dst=NAT_IP) / ICMP(type=0, id=L.nat_icmp, seq=2) /
                               b"ping-2"), "out0")
    add("nat-tcp-reply-vlan", _out(IP(src=INET, dst=NAT_IP) /
                                   TCP(sport=80, dport=L.nat_tcp1, flags="A", seq=5001, ack=1028),
                                   vlan=9), "out0")
    add("to-nat-ip-no-flow", _out(IP(src=INET, dst=NAT_IP) / TCP(sport=80, dport=1234,
                                                                 flags="SA")), "out0")
    add("ping-nat-ip", _out(IP(src=INET, dst=NAT_IP) / ICMP(type=8, id=5) / b"hi"), "out0")

    # NLB
    add("nlb-syn-new", _out(IP(src=INET, dst=VIP) / TCP(sport=50100, dport=80, flags="S",
                                                        seq=30)), "out0")
    add("nlb-tcp-data", _out(IP(src=INET, dst=VIP) / TCP(sport=50000, dport=80, flags="PA", seq=11,
                                                         ack=7001) / get), "out0")
    add("nlb-ack-no-flow", _out(IP(src=INET2, dst=VIP) / TCP(sport=50200, dport=80, flags="A",
                                                             seq=3, ack=4)), "out0")
    add("nlb-udp", _out(IP(src=INET, dst=VIP) / UDP(sport=40001, dport=53) / b"q-2"), "out0")
    add("nlb-udp-new", _out(IP(src=INET2, dst=VIP) / UDP(sport=40002, dport=53) / b"q"), "out0")
    add("nlb-udp-vlan", _out(IP(src=INET, dst=VIP) / UDP(sport=40001, dport=53) / b"q-3",
                             vlan=5), "out0")
    add("nlb-target-tcp-reply", _tg(IP(src=L.nlb_tcp1, dst=INET) /
                                    TCP(sport=8080, dport=50000, flags="PA", seq=7001, ack=38) /
                                    b"HTTP/1.1 200 OK\r\n\r\n"), "tg0")
    add("nlb-target-synack-half-open", _tg(IP(src=L.nlb_tcp2, dst=INET2) /
                                           TCP(sport=8080, dport=50001, flags="SA", seq=1,
                                               ack=21)), "tg0")
    add("nlb-target-udp-reply", _tg(IP(src=L.nlb_udp, dst=INET) /
                                    UDP(sport=5353, dport=40001) / b"answer"), "tg0")

    # ICMP errors from outside (routers and the destination) about NAT and NLB flows
    q_nat_tcp = IP(src=NAT_IP, dst=INET, ttl=63) / TCP(sport=L.nat_tcp1, dport=80, flags="PA",
                                                        seq=1001, ack=5001) / get
    q_nat_udp = IP(src=NAT_IP, dst=INET, ttl=63) / UDP(sport=L.nat_udp1, dport=53) / b"query-2"
    q_nat_udp2 = IP(src=NAT_IP, dst=INET2, ttl=63) / UDP(sport=L.nat_udp2, dport=123,
                                                         chksum=0) / b"ntp-2"
    q_nat_echo = IP(src=NAT_IP, dst=INET, ttl=1) / ICMP(type=8, id=L.nat_icmp, seq=2) / b"ping-2"
    q_vip_tcp = IP(src=VIP, dst=INET, ttl=63) / TCP(sport=80, dport=50000, flags="PA", seq=7001,
                                                     ack=38) / b"HTTP/1.1 200 OK\r\n\r\n"
    q_vip_udp = IP(src=VIP, dst=INET, ttl=63) / UDP(sport=53, dport=40001) / b"answer"
    add("err-router-fragneeded-nat-tcp", _out(IP(src=ROUTER, dst=NAT_IP) /
                                              ICMP(type=3, code=4, nexthopmtu=1400) /
                                              _quote(q_nat_tcp)), "out0")
    add("err-router-ttl-nat-tcp-8-bytes", _out(IP(src=ROUTER, dst=NAT_IP) /
                                               ICMP(type=11, code=0) / _quote(q_nat_tcp, 28)),
        "out0")
    add("err-router-ttl-nat-tcp-8-bytes-trailer",
        _out(IP(src=ROUTER, dst=NAT_IP) / ICMP(type=11, code=0) / _quote(q_nat_tcp, 28))
        + b"\0" * 12, "out0")
    add("err-dest-port-unreach-nat-udp", _out(IP(src=INET, dst=NAT_IP) / ICMP(type=3, code=3) /
                                              _quote(q_nat_udp)), "out0")
    add("err-router-paramprob-nat-udp-no-checksum", _out(IP(src=ROUTER, dst=NAT_IP) /
                                                         ICMP(type=12, code=0) /
                                                         _quote(q_nat_udp2)), "out0")
    add("err-router-ttl-nat-echo", _out(IP(src=ROUTER, dst=NAT_IP) / ICMP(type=11) /
                                        _quote(q_nat_echo)), "out0")
    add("err-client-fragneeded-nlb-tcp", _out(IP(src=INET, dst=VIP) /
                                              ICMP(type=3, code=4, nexthopmtu=1280) /
                                              _quote(q_vip_tcp)), "out0")
    add("err-router-ttl-nlb-udp-8-bytes", _out(IP(src=ROUTER, dst=VIP) / ICMP(type=11) /
                                               _quote(q_vip_udp, 28)), "out0")
    add("err-router-unknown-flow", _out(IP(src=ROUTER, dst=NAT_IP) / ICMP(type=3, code=1) /
                                        _quote(IP(src=NAT_IP, dst=INET) /
                                               UDP(sport=1, dport=2))), "out0")

    # ICMP errors from the inside about replies to NAT flows: the flow's own client, another
    # inside host, an inside router
    q_reply_udp = IP(src=INET, dst=CLIENT, ttl=63) / UDP(sport=53, dport=5353) / b"answer"
    q_reply_tcp = IP(src=INET, dst=CLIENT, ttl=1) / TCP(sport=80, dport=40000, flags="PA",
                                                        seq=5001, ack=1028) / b"HTTP/1.1"
    q_reply_echo = IP(src=INET, dst=CLIENT, ttl=63) / ICMP(type=0, id=77, seq=2) / b"ping-2"
    add("err-client-port-unreach-nat-udp", _in(IP(src=CLIENT, dst=INET) / ICMP(type=3, code=3) /
                                               _quote(q_reply_udp)), "in0")
    add("err-other-host-unreach-nat-udp", _in(IP(src=CLIENT2, dst=INET) / ICMP(type=3, code=1) /
                                              _quote(q_reply_udp)), "in0")
    add("err-inside-router-ttl-nat-tcp-8-bytes", _in(IP(src=INSIDE_ROUTER, dst=INET) /
                                                     ICMP(type=11) / _quote(q_reply_tcp, 28)),
        "in0")
    add("err-client-paramprob-nat-echo-reply", _in(IP(src=CLIENT, dst=INET) / ICMP(type=12) /
                                                   _quote(q_reply_echo)), "in0")
    add("err-client-port-unreach-nat-udp-vlan", _in(IP(src=CLIENT, dst=INET) /
                                                    ICMP(type=3, code=3) / _quote(q_reply_udp),
                                                    vlan=42), "in0")

    # ICMP errors from the targets' side about client->target packets of NLB flows
    q_to_udp_target = IP(src=INET, dst=L.nlb_udp, ttl=63) / UDP(sport=40001, dport=5353) / b"q-2"
    q_to_tcp_target = IP(src=INET, dst=L.nlb_tcp1, ttl=1) / TCP(sport=50000, dport=8080,
                                                                flags="PA", seq=11, ack=7001) / get
    other = next(t for t in TARGETS if t != L.nlb_udp)
    add("err-target-port-unreach-nlb-udp", _tg(IP(src=L.nlb_udp, dst=INET) /
                                               ICMP(type=3, code=3) / _quote(q_to_udp_target)),
        "tg0")
    add("err-target-router-ttl-nlb-tcp-8-bytes", _tg(IP(src=TARGET_ROUTER, dst=INET) /
                                                     ICMP(type=11) / _quote(q_to_tcp_target, 28)),
        "tg0")
    add("err-other-target-unreach-nlb-udp", _tg(IP(src=other, dst=INET) /
                                                ICMP(type=3, code=1) / _quote(q_to_udp_target)),
        "tg0")
    return f


# --- mutation -----------------------------------------------------------------------------

ADDRESSES = [CLIENT, CLIENT2, INET, INET2, ROUTER, NAT_IP, "198.18.0.101", VIP, *TARGETS,
             INSIDE_ROUTER, TARGET_ROUTER, "10.10.0.1", "198.18.0.1", "0.0.0.0",
             "255.255.255.255", "127.0.0.1", "224.0.0.1", "198.19.7.7"]
ADDRESS_BYTES = [ipaddress.IPv4Address(a).packed for a in ADDRESSES]
TCP_FLAGS = [0x02, 0x12, 0x10, 0x18, 0x01, 0x11, 0x04, 0x14, 0x00, 0x03, 0x06, 0xFF, 0x29]
PROTOS = [6, 17, 1, 47, 0, 255, 132]
ICMP_TYPES = [0, 3, 4, 5, 8, 11, 12, 13, 14, 17]
OPTION_KINDS = [b"\x01", b"\x00", b"\x07\x07\x04\0\0\0\0", b"\x44\x08\x05\0\0\0\0\0",
                b"\x94\x04\0\0", b"\x83\x07\x04\0\0\0\0"]
TCP_OPTION_KINDS = [b"\x01", b"\x02\x04\x05\xb4", b"\x03\x03\x07", b"\x04\x02",
                    b"\x08\x0a" + b"\0" * 8, b"\x00"]


class _M:
    """One packet being mutated."""
    __slots__ = ("buf", "iface", "fix")

    def __init__(self, buf: bytearray, iface: str):
        self.buf, self.iface, self.fix = buf, iface, True


def _ip(buf) -> int | None:
    l3 = l3_offset(buf)
    if l3 is None or l3 < 0 or len(buf) < l3 + 20:
        return None
    return l3


def _u16(buf, off) -> int:
    return (buf[off] << 8) | buf[off + 1]


def _set16(buf, off, v) -> None:
    buf[off] = (v >> 8) & 0xFF
    buf[off + 1] = v & 0xFF


class Fuzzer:
    """Deterministic packets: round(r, n) depends only on (seed, r, n) and the seeds."""

    RANDOM_SHARE = 0.06       # pure random frames
    PRISTINE_SHARE = 0.08     # seeds as they are (keep the translation paths busy)

    def __init__(self, frames: list[Frame], live: Live, seed: int):
        self.frames = frames
        self.seed = seed
        self.ports = [0, 1, 53, 80, 123, 443, 5353, 5354, 6000, 8080, 40000, 40001, 40002,
                      41000, 50000, 50001, 65535, live.nat_tcp1, live.nat_tcp2,
                      live.nat_udp1, live.nat_udp2, live.nat_icmp]
        self.ops = [(12, self.truncate), (4, self.ihl), (7, self.total_length),
                    (5, self.l4_length), (12, self.trailer), (5, self.ip_options),
                    (3, self.tcp_options), (6, self.fragment), (5, self.ttl), (5, self.vlan),
                    (16, self.field), (12, self.quote), (6, self.flip), (4, self.iface),
                    (2, self.break_checksum), (4, self.payload)]
        self._op_fns = [fn for _, fn in self.ops]
        self._op_cum = []
        total = 0
        for w, _ in self.ops:
            total += w
            self._op_cum.append(total)

    def round(self, r: int, n: int) -> list[FuzzPacket]:
        rng = random.Random(f"hyperplane-fuzz:{self.seed}:{r}")
        return [self._one(rng) for _ in range(n)]

    def _one(self, rng: random.Random) -> FuzzPacket:
        u = rng.random()
        if u < self.RANDOM_SHARE:
            return self._random(rng)
        frame = self.frames[rng.randrange(len(self.frames))]
        if u < self.RANDOM_SHARE + self.PRISTINE_SHARE:
            return FuzzPacket(frame.data, frame.iface, frame.name, (), True)
        m = _M(bytearray(frame.data), frame.iface)
        k = 1 + (rng.random() < 0.4) + (rng.random() < 0.15)
        ops = []
        attempts = 0
        while len(ops) < k and attempts < 12:
            attempts += 1
            fn = rng.choices(self._op_fns, cum_weights=self._op_cum)[0]
            what = fn(rng, m)
            if what:
                ops.append(what)
        if len(m.buf) > MAX_FRAME:
            del m.buf[MAX_FRAME:]
            ops.append(f"cut-to-{MAX_FRAME}")
        if len(m.buf) < MIN_FRAME:
            m.buf.extend(b"\0" * (MIN_FRAME - len(m.buf)))
        if m.fix:
            fix_checksums(m.buf)
        return FuzzPacket(bytes(m.buf), m.iface, frame.name, tuple(ops), m.fix)

    def _random(self, rng: random.Random) -> FuzzPacket:
        kind = rng.random()
        n = rng.randrange(MIN_FRAME, 200)
        buf = bytearray(rng.getrandbits(8) for _ in range(n))
        iface = IFACES[rng.randrange(3)]
        fix = False
        if kind < 0.35:
            what = "random-bytes"
        elif kind < 0.6:
            buf[12:14] = rng.choice([b"\x08\x00", b"\x81\x00", b"\x88\xa8"])
            what = "random-after-ethertype"
        else:
            # a valid Ethernet + IPv4 header around random L4 bytes
            frame = self.frames[rng.randrange(len(self.frames))]
            buf[0:12] = frame.data[0:12]
            buf[12:14] = b"\x08\x00"
            n = max(n, 34)
            del buf[n:]
            buf.extend(b"\0" * (n - len(buf)))
            buf[14] = 0x45
            _set16(buf, 16, n - 14)
            buf[20:22] = b"\0\0"
            buf[22] = rng.choice([64, 64, 1, 0])
            buf[23] = rng.choice(PROTOS[:3])
            buf[26:30] = rng.choice(ADDRESS_BYTES)
            buf[30:34] = rng.choice(ADDRESS_BYTES)
            iface = frame.iface if rng.random() < 0.8 else iface
            fix = True
            fix_checksums(buf)
            what = "random-l4"
        return FuzzPacket(bytes(buf), iface, "random", (what,), fix)

    # --- the mutations: each returns what it did, or None when it does not apply -----------

    def truncate(self, rng, m):
        buf = m.buf
        n = len(buf)
        if n <= MIN_FRAME:
            return None
        l3 = _ip(buf)
        if l3 is not None and rng.random() < 0.6:
            ihl = (buf[l3] & 15) * 4
            l4 = l3 + ihl
            cuts = list(range(12, l3 + 21)) + [l4 + k for k in range(21)] + \
                [l4 + 8 + k for k in range(29)]
            cuts = [c for c in cuts if MIN_FRAME <= c < n]
            pos = rng.choice(cuts) if cuts else rng.randrange(MIN_FRAME, n)
        else:
            pos = rng.randrange(MIN_FRAME, n)
        variant = "frame"
        if l3 is not None and pos >= l3 + 4:
            variant = rng.choice(("frame", "datagram", "total-length"))
        if variant != "frame":
            _set16(buf, l3 + 2, pos - l3)     # the datagram ends at pos
        if variant != "total-length":
            del buf[pos:]                     # the frame ends at pos
        return f"truncate-{variant}@{pos}"

    def ihl(self, rng, m):
        l3 = _ip(m.buf)
        if l3 is None:
            return None
        v = rng.choice((0, 1, 4, 5, 6, 7, 15, rng.randrange(16)))
        m.buf[l3] = (m.buf[l3] & 0xF0) | v
        return f"ihl={v}"

    def total_length(self, rng, m):
        buf = m.buf
        l3 = _ip(buf)
        if l3 is None:
            return None
        tot = _u16(buf, l3 + 2)
        ihl = (buf[l3] & 15) * 4
        v = rng.choice((0, 19, 20, ihl, ihl + 7, tot - 1, tot + 1, tot + rng.randrange(1, 64),
                        tot - rng.randrange(1, 30), len(buf) - l3, len(buf) - l3 + 1,
                        rng.randrange(65536))) & 0xFFFF
        _set16(buf, l3 + 2, v)
        return f"total-length={v}"

    def l4_length(self, rng, m):
        buf = m.buf
        l3 = _ip(buf)
        if l3 is None:
            return None
        l4 = l3 + (buf[l3] & 15) * 4
        proto = buf[l3 + 9]
        if proto == 6 and l4 + 13 <= len(buf):
            doff = rng.randrange(16)
            buf[l4 + 12] = (doff << 4) | (buf[l4 + 12] & 15)
            return f"tcp-doff={doff}"
        if proto == 17 and l4 + 6 <= len(buf):
            ulen = _u16(buf, l4 + 4)
            v = rng.choice((0, 7, 8, ulen - 1, ulen + 1, len(buf) - l4, 65535,
                            rng.randrange(65536))) & 0xFFFF
            _set16(buf, l4 + 4, v)
            return f"udp-length={v}"
        return None

    def trailer(self, rng, m):
        k = rng.choice((1, 2, 3, 4, 6, 8, 12, 18, 20, 28, 40, 46, rng.randrange(1, 65)))
        how = rng.random()
        if how < 0.4:
            tail = bytes(k)
        elif how < 0.75:
            tail = bytes(rng.getrandbits(8) for _ in range(k))
        else:
            # plausible headers: bytes from the middle of a seed frame
            src = self.frames[rng.randrange(len(self.frames))].data
            start = rng.randrange(14, max(15, len(src) - 8))
            tail = (src[start:] * (k // max(1, len(src) - start) + 1))[:k]
        m.buf.extend(tail)
        return f"trailer+{k}"

    def ip_options(self, rng, m):
        buf = m.buf
        l3 = _ip(buf)
        if l3 is None:
            return None
        ihl = (buf[l3] & 15) * 4
        room = 60 - ihl
        if room < 4 or l3 + ihl > len(buf):
            return None
        k = 4 * rng.randrange(1, room // 4 + 1)
        opts = b""
        while len(opts) < k:
            opts += rng.choice(OPTION_KINDS) if rng.random() < 0.8 else \
                bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 5)))
        buf[l3 + ihl:l3 + ihl] = opts[:k]
        buf[l3] = (buf[l3] & 0xF0) | ((ihl + k) // 4)
        _set16(buf, l3 + 2, (_u16(buf, l3 + 2) + k) & 0xFFFF)
        return f"ip-options+{k}"

    def tcp_options(self, rng, m):
        buf = m.buf
        l3 = _ip(buf)
        if l3 is None or buf[l3 + 9] != 6:
            return None
        l4 = l3 + (buf[l3] & 15) * 4
        if l4 + 13 > len(buf):
            return None
        doff = (buf[l4 + 12] >> 4) * 4
        room = 60 - doff
        if room < 4 or doff < 20 or l4 + doff > len(buf):
            return None
        k = 4 * rng.randrange(1, room // 4 + 1)
        opts = b""
        while len(opts) < k:
            opts += rng.choice(TCP_OPTION_KINDS)
        buf[l4 + doff:l4 + doff] = opts[:k]
        buf[l4 + 12] = (((doff + k) // 4) << 4) | (buf[l4 + 12] & 15)
        _set16(buf, l3 + 2, (_u16(buf, l3 + 2) + k) & 0xFFFF)
        return f"tcp-options+{k}"

    def fragment(self, rng, m):
        l3 = _ip(m.buf)
        if l3 is None:
            return None
        v = rng.choice((0x2000, rng.randrange(1, 200), 0x2000 | rng.randrange(1, 200), 0x4000,
                        0x6000, 0x1FFF, 0x8000, 0x0000))
        _set16(m.buf, l3 + 6, v)
        return f"frag-off=0x{v:04x}"

    def ttl(self, rng, m):
        l3 = _ip(m.buf)
        if l3 is None:
            return None
        v = rng.choice((0, 1, 1, 2, 255))
        m.buf[l3 + 8] = v
        return f"ttl={v}"

    def vlan(self, rng, m):
        buf = m.buf
        if len(buf) < 14:
            return None
        if _u16(buf, 12) in VLAN_TYPES and rng.random() < 0.3:
            del buf[12:16]
            return "vlan-removed"
        tags = rng.choice((1, 1, 1, 2, 3))
        ins = b""
        for i in range(tags):
            tpid = 0x88A8 if (tags > 1 and i == 0) else 0x8100
            ins += tpid.to_bytes(2, "big") + rng.randrange(4096).to_bytes(2, "big")
        buf[12:12] = ins
        return f"vlan-tags+{tags}"

    def field(self, rng, m):
        buf = m.buf
        l3 = _ip(buf)
        if l3 is None:
            pos = rng.randrange(0, 12)
            buf[pos] = rng.getrandbits(8)
            return f"mac-byte@{pos}"
        ihl = (buf[l3] & 15) * 4
        l4 = l3 + ihl
        proto = buf[l3 + 9]
        choice = rng.randrange(12)
        if choice < 2:
            off = l3 + 12 + 4 * choice
            buf[off:off + 4] = rng.choice(ADDRESS_BYTES) if rng.random() < 0.85 else \
                bytes(rng.getrandbits(8) for _ in range(4))
            return ("ip-src=" if choice == 0 else "ip-dst=") + \
                str(ipaddress.IPv4Address(bytes(buf[off:off + 4])))
        if choice == 2:
            buf[l3 + 9] = rng.choice(PROTOS)
            return f"ip-proto={buf[l3 + 9]}"
        if choice == 3:
            v = rng.choice((0, 6, 15, 5))
            buf[l3] = (v << 4) | (buf[l3] & 15)
            return f"ip-version={v}"
        if choice == 4:
            mac = rng.choice((b"\xff" * 6, bytes.fromhex(MAC["out0"].replace(":", "")),
                              bytes.fromhex(MAC["in0"].replace(":", "")),
                              bytes(rng.getrandbits(8) for _ in range(6))))
            off = rng.choice((0, 6))
            buf[off:off + 6] = mac
            return "eth-dst-mac" if off == 0 else "eth-src-mac"
        if l4 + 4 > len(buf):
            return None
        if proto in (6, 17) and choice < 8:
            off = l4 + 2 * (choice % 2)
            v = rng.choice(self.ports) if rng.random() < 0.8 else rng.randrange(65536)
            _set16(buf, off, v)
            return ("sport=" if choice % 2 == 0 else "dport=") + str(v)
        if proto == 6 and l4 + 14 <= len(buf):
            if choice < 10:
                buf[l4 + 13] = rng.choice(TCP_FLAGS)
                return f"tcp-flags=0x{buf[l4 + 13]:02x}"
            off = l4 + 4 + 4 * (choice % 2)
            buf[off:off + 4] = rng.getrandbits(32).to_bytes(4, "big")
            return "tcp-seq" if choice % 2 == 0 else "tcp-ack"
        if proto == 1:
            if choice < 8 and l4 + 6 <= len(buf):
                v = rng.choice(self.ports)
                _set16(buf, l4 + 4, v)
                return f"icmp-id={v}"
            if choice < 10:
                buf[l4] = rng.choice(ICMP_TYPES)
                return f"icmp-type={buf[l4]}"
            buf[l4 + 1] = rng.randrange(16)
            return f"icmp-code={buf[l4 + 1]}"
        return None

    def quote(self, rng, m):
        """Bogus quotes of ICMP errors (and ICMP messages turned into errors)."""
        buf = m.buf
        l3 = _ip(buf)
        if l3 is None or buf[l3 + 9] != 1:
            return None
        ihl = (buf[l3] & 15) * 4
        l4 = l3 + ihl
        q = l4 + 8
        if q > len(buf):
            return None
        if buf[l4] not in ICMP_ERRORS:
            buf[l4] = rng.choice((3, 11, 12))
            return f"icmp-type={buf[l4]}-on-non-error"
        qlen = len(buf) - q
        choice = rng.randrange(11)
        if choice < 3:
            k = rng.choice((0, 1, 4, 8, 12, 19, 20, 21, 24, 27, 28, 29, 32, 36, 40, 48))
            if k >= qlen:
                return None
            _set16(buf, l3 + 2, q + k - l3)
            if choice == 0:
                del buf[q + k:]                # the frame ends with the quote
                return f"quote-cut@{k}"
            return f"quote-cut@{k}-rest-as-trailer"  # bytes after tot_len: a trailer
        if qlen < 20:
            return None
        if choice == 3:
            v = rng.choice((0, 4, 6, 7, 15))
            buf[q] = (buf[q] & 0xF0) | v
            return f"quoted-ihl={v}"
        if choice == 4:
            buf[q + 9] = rng.choice(PROTOS)
            return f"quoted-proto={buf[q + 9]}"
        if choice == 5:
            off = q + rng.choice((12, 16))
            buf[off:off + 4] = rng.choice(ADDRESS_BYTES)
            return f"quoted-{'src' if off == q + 12 else 'dst'}=" + \
                str(ipaddress.IPv4Address(bytes(buf[off:off + 4])))
        if choice == 6 and qlen >= 24:
            off = q + 20 + rng.choice((0, 2))
            v = rng.choice(self.ports)
            _set16(buf, off, v)
            return f"quoted-port={v}"
        if choice == 7:
            v = rng.choice((0, 20, 28, 40, 1500, rng.randrange(65536)))
            _set16(buf, q + 2, v)
            return f"quoted-total-length={v}"
        if choice == 8:
            v = rng.choice((0x2000, 0x0010, 0x2010))
            _set16(buf, q + 6, v)
            return f"quoted-frag-off=0x{v:04x}"
        if choice == 9:
            buf[l4] = rng.choice((3, 4, 5, 11, 12, 3))
            buf[l4 + 1] = rng.randrange(16)
            return f"icmp-error={buf[l4]}/{buf[l4 + 1]}"
        # options in the quoted header
        qihl = (buf[q] & 15) * 4
        if qihl != 20 or qlen < 20:
            return None
        k = 4 * rng.randrange(1, 5)
        buf[q + 20:q + 20] = (b"\x01" * k)
        buf[q] = (buf[q] & 0xF0) | ((20 + k) // 4)
        _set16(buf, q + 2, (_u16(buf, q + 2) + k) & 0xFFFF)
        _set16(buf, l3 + 2, (_u16(buf, l3 + 2) + k) & 0xFFFF)
        return f"quoted-ip-options+{k}"

    def flip(self, rng, m):
        buf = m.buf
        k = rng.randrange(1, 5)
        span = min(len(buf), 90)
        where = []
        for _ in range(k):
            pos = rng.randrange(span)
            buf[pos] = rng.getrandbits(8)
            where.append(pos)
        return "flip@" + ",".join(map(str, where))

    def iface(self, rng, m):
        m.iface = rng.choice([i for i in IFACES if i != m.iface])
        return f"ingress={m.iface}"

    def break_checksum(self, rng, m):
        buf = m.buf
        l3 = _ip(buf)
        if l3 is None:
            return None
        ihl = (buf[l3] & 15) * 4
        l4 = l3 + ihl
        proto = buf[l3 + 9]
        spots = [("ip", l3 + 10)]
        if proto == 6:
            spots.append(("tcp", l4 + 16))
        elif proto == 17:
            spots.append(("udp", l4 + 6))
        elif proto == 1:
            spots += [("icmp", l4 + 2), ("quoted-ip", l4 + 8 + 10)]
        spots = [(n, o) for n, o in spots if o + 2 <= len(buf)]
        if not spots:
            return None
        name, off = rng.choice(spots)
        fix_checksums(buf)  # right first, so exactly this one is wrong
        _set16(buf, off, _u16(buf, off) ^ rng.randrange(1, 65536))
        m.fix = False
        return f"bad-checksum:{name}"

    def payload(self, rng, m):
        buf = m.buf
        l3 = _ip(buf)
        if l3 is None:
            return None
        tot = _u16(buf, l3 + 2)
        ihl = (buf[l3] & 15) * 4
        end = l3 + tot
        if tot < ihl or end > len(buf):
            return None
        l4 = l3 + ihl
        if rng.random() < 0.25 and tot > ihl + 8:
            k = rng.randrange(1, tot - ihl - 7)
            del buf[end - k:end]
            k = -k
        else:
            k = rng.choice((1, 2, 7, 64, 200, 1000, 1400 - tot, 1472 - tot, 1480 - tot,
                            1500 - tot, 1501 - tot, 1800 - tot))
            if k <= 0:
                k = 1
            block = bytes(rng.getrandbits(8) for _ in range(min(k, 64)))
            buf[end:end] = (block * (k // len(block) + 1))[:k]
        _set16(buf, l3 + 2, (tot + k) & 0xFFFF)
        if buf[l3 + 9] == 17 and l4 + 6 <= len(buf) and _u16(buf, l4 + 4) == tot - ihl:
            _set16(buf, l4 + 4, (tot - ihl + k) & 0xFFFF)
        return f"payload{k:+d}"


# --- regressions: one small packet per failure class the fuzzing found --------------------

REGRESSIONS = {
    "icmp-error-from-another-inside-host": "ICMP error about a NAT flow's reply, sent by an "
    "inside host that is not the flow's client: leaves with that host's private source",
    "icmp-error-from-an-inside-router": "time exceeded from an inside router about a NAT "
    "flow's reply: leaves with the router's private source",
    "icmp-error-from-a-target-side-router": "time exceeded from a router on the targets' side "
    "about an NLB flow: leaves with the router's private source",
    "icmp-error-from-another-target": "ICMP error about an NLB flow from a target that is not "
    "the flow's: leaves with that target's private source",
    "icmp-8-byte-quote-then-trailer": "an 8-byte TCP quote followed by Ethernet padding: the "
    "padding is taken for the quoted TCP checksum and the outer ICMP checksum goes wrong",
    "icmp-quote-cut-by-total-length": "ICMP error whose total length ends inside the quoted "
    "IPv4 header (the rest is trailer): translated",
    "icmp-header-past-total-length": "echo request whose total length ends before the ICMP "
    "header: translated, a flow made",
    "tcp-header-past-total-length": "SYN whose total length ends inside the TCP header: "
    "translated, a flow made",
    "udp-header-past-total-length": "UDP whose total length ends inside the UDP header: "
    "translated, a flow made",
    "udp-length-beyond-datagram": "UDP whose length field is longer than the datagram: "
    "translated",
    "rst-with-private-source-toward-outside": "an ACK with an inside source arriving on the "
    "outside interface toward a target's address: answered by a RST from that private "
    "address, out of the outside interface",
}


def regressions(live: Live) -> list[Frame]:
    """The frames of REGRESSIONS, built for the live flows."""
    by = {f.name: f for f in seeds(live)}

    def same(name, seed):
        return Frame(name, by[seed].data, by[seed].iface)

    def total_length(name, seed, tot):
        buf = bytearray(by[seed].data)
        _set16(buf, l3_offset(buf) + 2, tot)   # the bytes after it become a trailer
        fix_checksums(buf)
        return Frame(name, bytes(buf), by[seed].iface)

    frames = [
        same("icmp-error-from-another-inside-host", "err-other-host-unreach-nat-udp"),
        same("icmp-error-from-an-inside-router", "err-inside-router-ttl-nat-tcp-8-bytes"),
        same("icmp-error-from-a-target-side-router", "err-target-router-ttl-nlb-tcp-8-bytes"),
        same("icmp-error-from-another-target", "err-other-target-unreach-nlb-udp"),
        same("icmp-8-byte-quote-then-trailer", "err-router-ttl-nat-tcp-8-bytes-trailer"),
        total_length("icmp-quote-cut-by-total-length", "err-router-ttl-nat-tcp-8-bytes", 48),
        total_length("icmp-header-past-total-length", "nat-echo-new", 20),
        total_length("tcp-header-past-total-length", "nat-tcp-syn-new", 28),
        total_length("udp-header-past-total-length", "nat-udp-new", 24),
        Frame("udp-length-beyond-datagram",
              _in(IP(src=CLIENT, dst=INET2) / UDP(sport=6001, dport=53, len=40) / b"q"), "in0"),
        Frame("rst-with-private-source-toward-outside",
              _out(IP(src=CLIENT2, dst=TARGETS[0]) / TCP(sport=1234, dport=8080, flags="A",
                                                         seq=1, ack=1)), "out0"),
    ]
    assert [f.name for f in frames] == list(REGRESSIONS)
    return frames
