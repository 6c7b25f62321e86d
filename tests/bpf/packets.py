"""Building and checking packets for the packet tests (scapy)."""
from __future__ import annotations

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.l2 import Ether

from bpf_env import CLIENT_MAC, INET_MAC, MAC


def from_client(l3):
    return Ether(src=CLIENT_MAC, dst=MAC["in0"]) / l3


def from_inet(l3):
    return Ether(src=INET_MAC, dst=MAC["out0"]) / l3


def parse(data: bytes) -> Ether:
    return Ether(data)


def assert_checksums(data: bytes) -> None:
    """Every IP, TCP, UDP and ICMP checksum in the frame (embedded ones too) is what scapy
    computes from scratch (invariant 4). A UDP checksum of 0 means none and stays 0."""
    pkt = Ether(data)
    fresh = pkt.copy()
    layer = fresh
    while layer:
        for cls, field in ((IP, "chksum"), (TCP, "chksum"), (ICMP, "chksum")):
            if isinstance(layer, cls):
                setattr(layer, field, None)
        if isinstance(layer, UDP) and layer.chksum != 0:
            layer.chksum = None
        # scapy's embedded (error) headers are IPerror / TCPerror / UDPerror / ICMPerror
        name = type(layer).__name__
        if name in ("IPerror", "TCPerror", "ICMPerror"):
            layer.chksum = None
        if name == "UDPerror" and layer.chksum != 0:
            layer.chksum = None
        layer = layer.payload if layer.payload else None
    rebuilt = bytes(fresh)
    assert rebuilt == data, (f"checksums differ from a fresh computation:\n got {pkt!r}\n"
                             f" want {Ether(rebuilt)!r}")


def tcp_syn(sport=40000, dport=80, src="10.10.0.10", dst="198.18.0.2", seq=1000, payload=b""):
    return from_client(IP(src=src, dst=dst, ttl=64, id=1) /
                       TCP(sport=sport, dport=dport, flags="S", seq=seq, window=64240) / payload)


def inet_sum(data: bytes) -> int:
    """The folded one's complement sum: 0 when a checksum over `data` is right."""
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xffff) + (total >> 16)
    return (~total) & 0xffff
