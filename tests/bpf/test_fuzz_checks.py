"""The fuzz test's own machinery, checked on known packets (no root needed): the checksum
validator must pass right frames and name every wrong checksum (so the fuzz test can
fail), the per-packet property check must catch each property, the action classes must
fit XDP and tc, and the generator must be deterministic and cover what issue 6 lists."""
from __future__ import annotations

import collections
import random

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
from scapy.layers.l2 import Dot1Q, Ether
from scapy.packet import Raw
from scapy.utils import checksum as scapy_checksum

from checksums import (MALFORMED, checksum, fix_checksums, frame_faults, icmp_quote,
                       source_addresses, sum16)
from fuzz_packets import Fuzzer, Live, followups, openers, seeds
from fuzz_run import action_class, check_packet, toward_outside, verdict_class
from hyperplane.datapath.sandbox import CLIENT_MAC, INET, INET_MAC, MAC, NAT_IP, ROUTER
from hyperplane.datapath.verdicts import Verdict

ETH_OUT = dict(src=MAC["out0"], dst=INET_MAC)
GET = b"GET / HTTP/1.1\r\n\r\n"


def eth(l3, **kw):
    return bytes(Ether(**(kw or ETH_OUT)) / l3)


def tcp_pkt():
    return IP(src=NAT_IP, dst=INET) / TCP(sport=1234, dport=80, flags="PA") / GET


def error_frame(quoted, n=None, **icmp):
    q = bytes(quoted)
    return eth(IP(src=ROUTER, dst=NAT_IP) / ICMP(**(icmp or dict(type=3, code=4))) /
               Raw(q if n is None else q[:n]))


def set_byte(data: bytes, off: int, value: int) -> bytes:
    b = bytearray(data)
    b[off] = value
    return bytes(b)


def xor16(data: bytes, off: int, mask: int = 0x0101) -> bytes:
    b = bytearray(data)
    b[off] ^= mask >> 8
    b[off + 1] ^= mask & 0xFF
    return bytes(b)


# --- the one's complement arithmetic --------------------------------------------------------

def test_sums_agree_with_scapy():
    rng = random.Random(1)
    for n in list(range(0, 40)) + [1499, 1500]:
        data = bytes(rng.getrandbits(8) for _ in range(n))
        assert checksum(data) == scapy_checksum(data) or (checksum(data), scapy_checksum(data)) \
            in ((0, 0xFFFF), (0xFFFF, 0)), n
    assert sum16(b"") == 0 and sum16(b"\xff\xff") == 0xFFFF and sum16(b"\x00\x01\xff\xfe") == 0xFFFF


# --- right frames -------------------------------------------------------------------------

GOOD = {
    "tcp": lambda: eth(tcp_pkt()),
    "tcp-options": lambda: eth(IP(src=NAT_IP, dst=INET) /
                               TCP(sport=1, dport=2, flags="S",
                                   options=[("MSS", 1460), ("NOP", None), ("WScale", 7)])),
    "udp": lambda: eth(IP(src=NAT_IP, dst=INET) / UDP(sport=5, dport=53) / b"query"),
    "udp-no-checksum": lambda: eth(IP(src=NAT_IP, dst=INET) /
                                   UDP(sport=5, dport=53, chksum=0) / b"q"),
    "icmp-echo": lambda: eth(IP(src=NAT_IP, dst=INET) / ICMP(type=8, id=7) / b"ping"),
    "vlan": lambda: bytes(Ether(**ETH_OUT) / Dot1Q(vlan=3) / tcp_pkt()),
    "qinq": lambda: bytes(Ether(**ETH_OUT, type=0x88A8) / Dot1Q(vlan=3) / Dot1Q(vlan=4) /
                          tcp_pkt()),
    "ip-options": lambda: eth(IP(src=NAT_IP, dst=INET, options=b"\x01\x01\x01\x00") /
                              UDP(sport=5, dport=53) / b"x"),
    "ethernet-padding": lambda: eth(IP(src=NAT_IP, dst=INET) / UDP(sport=5, dport=53) / b"x") +
    b"\xaa" * 20,
    "first-fragment": lambda: eth(fragment(IP(src=NAT_IP, dst=INET) / UDP(sport=5, dport=53) /
                                           (b"A" * 64), 32)[0]),
    "later-fragment": lambda: eth(fragment(IP(src=NAT_IP, dst=INET) / UDP(sport=5, dport=53) /
                                           (b"A" * 64), 32)[1]),
    "error-whole-tcp-quote": lambda: error_frame(tcp_pkt()),
    "error-8-byte-quote": lambda: error_frame(tcp_pkt(), 28, type=11),
    "error-whole-udp-quote": lambda: error_frame(IP(src=NAT_IP, dst=INET) / UDP(sport=5, dport=53) /
                                                 b"q"),
    "error-udp-quote-no-checksum": lambda: error_frame(IP(src=NAT_IP, dst=INET) /
                                                       UDP(sport=5, dport=53, chksum=0) / b"q"),
    "error-echo-quote": lambda: error_frame(IP(src=NAT_IP, dst=INET) / ICMP(type=8, id=9) / b"p"),
    "error-8-byte-quote-padding": lambda: error_frame(tcp_pkt(), 28, type=11) + b"\0" * 12,
}


@pytest.mark.parametrize("name", GOOD)
def test_right_frames_have_no_faults(name):
    assert frame_faults(GOOD[name]()) == []


def test_udp_checksum_computed_as_zero_is_sent_as_ffff():
    """A UDP checksum that computes to 0 goes out as 0xffff (0 means none): both pass."""
    b = bytearray(eth(IP(src=NAT_IP, dst=INET) / UDP(sport=5, dport=53, chksum=0) / b"\0\0"))
    pseudo = bytes(b[26:34]) + bytes((0, 17, 0, 10))
    word = checksum(pseudo + bytes(b[L4:]))       # payload word that makes the sum 0xffff
    b[L4 + 8:L4 + 10] = word.to_bytes(2, "big")
    assert checksum(pseudo + bytes(b[L4:])) == 0
    b[L4 + 6:L4 + 8] = b"\xff\xff"
    assert frame_faults(bytes(b)) == []


# --- wrong frames: every fault is named ---------------------------------------------------

L3, L4 = 14, 34  # plain Ethernet, 20-byte IPv4


def _outer_icmp_fixed(frame: bytes) -> bytes:
    """Re-sum the outer ICMP checksum only (so a quoted fault stays the only fault)."""
    b = bytearray(frame)
    tot = int.from_bytes(b[16:18], "big")
    b[L4 + 2:L4 + 4] = b"\0\0"
    b[L4 + 2:L4 + 4] = checksum(bytes(b[L4:L3 + tot])).to_bytes(2, "big")
    return bytes(b)


BAD = {
    "ip-checksum": lambda: xor16(GOOD["tcp"](), L3 + 10),
    "tcp-checksum": lambda: xor16(GOOD["tcp"](), L4 + 16),
    "tcp-checksum/payload": lambda: xor16(GOOD["tcp"](), L4 + 24),
    "udp-checksum": lambda: xor16(GOOD["udp"](), L4 + 6),
    "icmp-checksum": lambda: xor16(GOOD["icmp-echo"](), L4 + 2),
    "icmp-checksum/mtu-field": lambda: xor16(GOOD["error-whole-tcp-quote"](), L4 + 6),
    "quoted-ip-checksum": lambda: _outer_icmp_fixed(xor16(GOOD["error-8-byte-quote"](),
                                                          L4 + 8 + 10)),
    "quoted-tcp-checksum": lambda: _outer_icmp_fixed(xor16(GOOD["error-whole-tcp-quote"](),
                                                           L4 + 8 + 20 + 16)),
    "quoted-udp-checksum": lambda: _outer_icmp_fixed(xor16(GOOD["error-whole-udp-quote"](),
                                                           L4 + 8 + 20 + 6)),
    "quoted-icmp-checksum": lambda: _outer_icmp_fixed(xor16(GOOD["error-echo-quote"](),
                                                            L4 + 8 + 20 + 2)),
}


@pytest.mark.parametrize("name", BAD)
def test_each_wrong_checksum_is_named(name):
    assert frame_faults(BAD[name]()) == [name.split("/")[0]]


def test_checks_stop_at_the_total_length():
    """A checksum summed over a trailer too is wrong; trailer bytes changed in step with
    the outer ICMP checksum (what a parser that reads past tot_len does to an 8-byte quote
    followed by padding) make the outer checksum wrong."""
    b = bytearray(eth(IP(src=NAT_IP, dst=INET) / UDP(sport=5, dport=53) / b"x") + b"\x01\x02")
    b[L4 + 6:L4 + 8] = b"\0\0"
    wrong = checksum(bytes(b[26:34]) + bytes((0, 17, 0, 9)) + bytes(b[L4:]))  # trailer included
    b[L4 + 6:L4 + 8] = wrong.to_bytes(2, "big")
    assert frame_faults(bytes(b)) == ["udp-checksum"]

    frame = GOOD["error-8-byte-quote-padding"]()
    tcp_check_in_trailer = L4 + 8 + 20 + 16        # past the 28 quoted bytes
    b = bytearray(frame)
    old = int.from_bytes(b[tcp_check_in_trailer:tcp_check_in_trailer + 2], "big")
    new = old ^ 0x1234
    b[tcp_check_in_trailer:tcp_check_in_trailer + 2] = new.to_bytes(2, "big")
    icmp = int.from_bytes(b[L4 + 2:L4 + 4], "big")
    # RFC 1624 update of the outer ICMP checksum for the changed trailer word
    s = (~icmp & 0xFFFF) + (~old & 0xFFFF) + new
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    b[L4 + 2:L4 + 4] = (~s & 0xFFFF).to_bytes(2, "big")
    assert frame_faults(bytes(b)) == ["icmp-checksum"]


MALFORMED_CASES = {
    "not-ipv4": lambda: bytes(Ether(**ETH_OUT, type=0x86DD) / Raw(b"\0" * 40)),
    "ethernet": lambda: bytes(Ether(**ETH_OUT, type=0x8100))[:15],
    "ip-header": lambda: set_byte(GOOD["tcp"](), L3, 0x44),
    "ip-total-length": lambda: GOOD["tcp"]()[:-1],
    "tcp-header": lambda: eth(IP(src=NAT_IP, dst=INET, len=30) / TCP(sport=1, dport=2)),
    "udp-header": lambda: eth(IP(src=NAT_IP, dst=INET, len=24) / UDP(sport=1, dport=2)),
    "udp-length": lambda: eth(IP(src=NAT_IP, dst=INET) / UDP(sport=1, dport=2, len=40) / b"x"),
    "icmp-header": lambda: eth(IP(src=NAT_IP, dst=INET, len=24) / ICMP(type=8)),
    "quote": lambda: error_frame(tcp_pkt(), 20),
}


@pytest.mark.parametrize("name", MALFORMED_CASES)
def test_malformed_frames_are_named(name):
    faults = frame_faults(MALFORMED_CASES[name]())
    assert MALFORMED + name in faults, faults


def test_fix_checksums_repairs_a_mutated_frame():
    for frame in (GOOD["tcp"](), GOOD["error-whole-tcp-quote"](), GOOD["error-echo-quote"](),
                  GOOD["udp"](), GOOD["vlan"](), GOOD["error-8-byte-quote-padding"]()):
        b = bytearray(frame)
        b[L3 + 12] ^= 0x40          # source address
        b[-1] ^= 0xFF               # last byte (payload, quote or trailer)
        assert frame_faults(bytes(b)), "the mutation should break a checksum"
        fix_checksums(b)
        assert frame_faults(bytes(b)) == []
    b = bytearray(GOOD["udp-no-checksum"]())
    b[-1] ^= 1
    fix_checksums(b)
    assert b[L4 + 6:L4 + 8] == b"\0\0"


def test_addresses_and_quotes_are_read():
    frame = error_frame(IP(src=INET, dst="10.10.0.10") / UDP(sport=53, dport=9) / b"a")
    assert source_addresses(frame) == (bytes([198, 18, 0, 254]), bytes([10, 10, 0, 10]))
    assert source_addresses(GOOD["tcp"]()) == (bytes([198, 18, 0, 100]), None)
    assert icmp_quote(frame) == "whole"
    assert icmp_quote(GOOD["error-8-byte-quote"]()) == "part"
    assert icmp_quote(GOOD["tcp"]()) is None


# --- actions and the per-packet property check ---------------------------------------------

def test_action_classes_fit_xdp_and_tc():
    assert [action_class(a) for a in range(5)] == [None, "drop", "pass", "tx", "tx"]
    assert [action_class(a, "tc") for a in (0, 2, 7, -1, 1)] == \
        ["pass", "drop", "tx", "pass", None]
    assert {verdict_class(v) for v in Verdict} == {"tx", "pass", "drop"}
    xdp = {"XDP_TX": 3, "XDP_REDIRECT": 4, "XDP_PASS": 2, "XDP_DROP": 1}
    assert all(action_class(xdp[v.action]) == verdict_class(v) for v in Verdict)


def test_direction_of_a_transmitted_packet():
    redirected_out = eth(tcp_pkt())
    redirected_in = eth(tcp_pkt(), src=MAC["in0"], dst=CLIENT_MAC)
    assert toward_outside(redirected_out, 4, "in0")
    assert not toward_outside(redirected_in, 4, "out0")
    assert toward_outside(redirected_in, 3, "out0")      # XDP_TX: back where it came in
    assert not toward_outside(redirected_out, 3, "in0")


def _check(out, verdict=Verdict.TX_NAT_OUT, retval=4, data=None, ingress="in0", problem=""):
    tally = collections.Counter()
    return check_packet(data if data is not None else out, ingress, retval, out, verdict, problem,
                        tally), tally


def test_the_property_check_catches_each_property():
    good = GOOD["tcp"]()
    assert _check(good)[0] == []
    assert _check(good, verdict=None, problem="no verdict counted")[0] == \
        [("one-verdict", "no verdict counted")]
    assert _check(good, retval=2)[0] == [("action-matches-verdict", "XDP_PASS with TX_NAT_OUT")]
    assert _check(good, retval=0)[0][0][0] == "action-matches-verdict"
    assert _check(BAD["tcp-checksum"](), data=good)[0] == [("checksums", "tcp-checksum")]
    assert _check(BAD["quoted-tcp-checksum"](), verdict=Verdict.TX_ICMP_ERROR,
                  data=GOOD["error-whole-tcp-quote"]())[0] == \
        [("checksums", "quoted-tcp-checksum")]
    assert _check(MALFORMED_CASES["tcp-header"](), data=good)[0] == [("well-formed", "tcp-header")]
    leak = eth(IP(src="10.10.0.11", dst=INET) / UDP(sport=1, dport=2))
    assert _check(leak)[0] == [("no-inside-source-outside", "outer source in 10.0.0.0/8")]
    quoted = error_frame(IP(src=INET, dst="10.20.1.10") / UDP(sport=53, dport=9) / b"a")
    assert _check(quoted, verdict=Verdict.TX_ICMP_ERROR)[0] == \
        [("no-inside-source-outside", "quoted destination in 10.0.0.0/8")]
    inside = eth(IP(src="10.10.0.11", dst=INET) / UDP(sport=1, dport=2), src=MAC["in0"],
                 dst=CLIENT_MAC)
    assert _check(inside)[0] == []                       # toward the inside: fine
    passed = GOOD["udp"]()
    a_pass = next(v for v in Verdict if verdict_class(v) == "pass")
    assert _check(passed, verdict=a_pass, retval=2)[0] == []
    assert _check(xor16(passed, L3 + 8), verdict=a_pass, retval=2, data=passed)[0] == \
        [("pass-unchanged", "passed packet was modified")]


def test_a_checksum_wrong_on_input_may_stay_wrong_where_the_packet_still_is():
    bad = BAD["tcp-checksum"]()
    broken, tally = _check(bad, data=bad)                 # translated: still wrong, allowed
    assert broken == [] and sum(tally.values()) > 0
    # a RST is written by the node: its checksum must be right whatever came in
    assert _check(bad, verdict=Verdict.TX_RST, retval=3, data=bad)[0] == \
        [("checksums", "tcp-checksum")]
    # an ICMP error the node writes about that packet may quote the wrong checksum, but its
    # own must be right
    built = next((v for v in Verdict if v.name == "TX_TIME_EXCEEDED"), Verdict.TX_RST)
    tcp_bad = IP(bytes(tcp_pkt()))
    tcp_bad[TCP].chksum ^= 0x0101
    quoting = error_frame(tcp_bad, type=11)
    assert frame_faults(quoting) == ["quoted-tcp-checksum"]
    assert _check(quoting, verdict=built, retval=3, data=bad, ingress="in0")[0] == []
    assert _check(xor16(quoting, L4 + 2), verdict=built, retval=3, data=bad, ingress="in0")[0] \
        == [("checksums", "icmp-checksum")]


# --- the generator ------------------------------------------------------------------------

LIVE = Live(2001, 2002, 2003, 2004, 2005, "10.20.1.10", "10.20.2.10", "10.20.3.10")


def test_seed_frames_are_right():
    frames = openers() + followups(LIVE) + seeds(LIVE)
    assert len({f.name for f in frames}) == len(frames)
    for f in frames:
        assert frame_faults(f.data) == [], f.name


def test_the_generator_is_deterministic():
    a = Fuzzer(seeds(LIVE), LIVE, 6).round(3, 400)
    b = Fuzzer(seeds(LIVE), LIVE, 6).round(3, 400)
    c = Fuzzer(seeds(LIVE), LIVE, 7).round(3, 400)
    d = Fuzzer(seeds(LIVE), LIVE, 6).round(4, 400)
    assert a == b
    assert [p.data for p in a] != [p.data for p in c]
    assert [p.data for p in a] != [p.data for p in d]


def test_the_generator_makes_what_issue_6_lists():
    packets = Fuzzer(seeds(LIVE), LIVE, 6).round(0, 6000)
    assert all(14 <= len(p.data) <= 2048 for p in packets)
    ops = collections.Counter(op.split("@")[0].split("=")[0].split("+")[0]
                              for p in packets for op in p.ops)
    wanted = ["random-bytes", "random-after-ethertype", "random-l4", "truncate-frame",
              "truncate-datagram", "truncate-total-length", "ihl", "total-length", "udp-length",
              "tcp-doff", "trailer", "ip-options", "tcp-options", "frag-off", "ttl", "vlan-tags",
              "quote-cut", "quoted-ihl", "quoted-proto", "quoted-total-length", "bad-checksum:ip",
              "ingress"]
    missing = [w for w in wanted if ops[w] == 0]
    assert not missing, f"mutations never made: {missing} (made: {dict(ops)})"
    ttls = {op for p in packets for op in p.ops if op.startswith("ttl=")}
    assert {"ttl=0", "ttl=1"} <= ttls
    origins = collections.Counter(p.origin for p in packets)
    assert all(origins[f.name] for f in seeds(LIVE)), "a seed frame was never used"
    assert sum(1 for p in packets if not p.ops) > 100, "too few pristine seed frames"
