"""Fast checks of frames on raw bytes (no scapy): IPv4 and L4 checksums, the quoted packet
of ICMP errors, well-formedness, and where a frame's addresses point.

Used by the fuzz test on every packet the data path transmits, so it must be quick: a
one's complement sum of 16-bit words is the big-endian integer of the bytes modulo 0xffff
(2**16 == 1 mod 0xffff), which Python computes in C. Every check is bounded by the IPv4
total length: bytes after it are a trailer (Ethernet padding) and belong to nothing.

fix_checksums() writes correct checksums into a frame (the fuzz generator uses it after a
mutation, so that a wrong checksum out of the data path is the data path's doing)."""
from __future__ import annotations

ETH_P_IP = 0x0800
VLAN_TYPES = (0x8100, 0x88A8)
MAX_VLAN_TAGS = 2                      # what bpf/parsing.h accepts
TCP, UDP, ICMP = 6, 17, 1
ICMP_ERRORS = frozenset((3, 4, 5, 11, 12))  # types that quote the offending datagram
MF_OR_OFFSET = 0x3FFF                  # frag_off: MF flag and fragment offset

MALFORMED = "malformed:"               # prefix of the structural faults


def sum16(data) -> int:
    """The folded one's complement sum of `data` (zero-padded to even length), 0..0xffff.
    It is 0 only for all-zero data; a right checksum makes the sum 0xffff."""
    if len(data) & 1:
        data = bytes(data) + b"\0"
    n = int.from_bytes(data, "big")
    return ((n - 1) % 0xFFFF) + 1 if n else 0


def checksum(data) -> int:
    """The Internet checksum of `data` (the checksum field inside it must be zero)."""
    return 0xFFFF - sum16(data)


def sum_ok(data) -> bool:
    return sum16(data) == 0xFFFF


def _pseudo(addrs, proto: int, length: int) -> bytes:
    return bytes(addrs) + bytes((0, proto, length >> 8, length & 0xFF))


def _l4_sum_ok(addrs, proto: int, seg) -> bool:
    return sum16(_pseudo(addrs, proto, len(seg)) + bytes(seg)) == 0xFFFF


def l3_offset(data) -> int | None:
    """Offset of the IPv4 header behind Ethernet and up to two VLAN tags; -1 when the
    Ethernet/VLAN headers are cut short, None when the frame is not IPv4."""
    if len(data) < 14:
        return -1
    etype = (data[12] << 8) | data[13]
    off = 14
    for _ in range(MAX_VLAN_TAGS):
        if etype not in VLAN_TYPES:
            break
        if len(data) < off + 4:
            return -1
        etype = (data[off + 2] << 8) | data[off + 3]
        off += 4
    return off if etype == ETH_P_IP else None


def _l4_faults(proto: int, addrs, seg, prefix: str) -> list[str]:
    """Faults of the L4 header and checksum of one datagram's payload `seg` (exactly the
    bytes the IP total length gives it)."""
    n = len(seg)
    if proto == TCP:
        if n < 20 or not 20 <= (seg[12] >> 4) * 4 <= n:
            return [f"{MALFORMED}{prefix}tcp-header"]
        return [] if _l4_sum_ok(addrs, TCP, seg) else [f"{prefix}tcp-checksum"]
    if proto == UDP:
        if n < 8:
            return [f"{MALFORMED}{prefix}udp-header"]
        ulen = (seg[4] << 8) | seg[5]
        if not 8 <= ulen <= n:
            return [f"{MALFORMED}{prefix}udp-length"]
        if seg[6] == 0 and seg[7] == 0:
            return []                   # no checksum (allowed over IPv4)
        return [] if _l4_sum_ok(addrs, UDP, seg[:ulen]) else [f"{prefix}udp-checksum"]
    if proto == ICMP:
        if n < 8:
            return [f"{MALFORMED}{prefix}icmp-header"]
        return [] if sum_ok(seg) else [f"{prefix}icmp-checksum"]
    return []


def _quote_faults(quote) -> list[str]:
    """Faults of the datagram an ICMP error quotes: its IPv4 header checksum always, its
    L4 checksum when the quote is the whole datagram. A quote must hold the IPv4 header and
    8 bytes of L4 (RFC 792); what the quoted L4 header itself looks like is the original
    sender's business, so only its checksum is judged."""
    n = len(quote)
    if n < 20 or quote[0] >> 4 != 4 or (quote[0] & 15) < 5 or (quote[0] & 15) * 4 + 8 > n:
        return [f"{MALFORMED}quote"]
    qihl = (quote[0] & 15) * 4
    faults = [] if sum_ok(quote[:qihl]) else ["quoted-ip-checksum"]
    qtot = (quote[2] << 8) | quote[3]
    qfrag = ((quote[6] << 8) | quote[7]) & MF_OR_OFFSET
    if qihl <= qtot <= n and not qfrag:       # the whole datagram is quoted
        faults += [f for f in _l4_faults(quote[9], quote[12:20], quote[qihl:qtot], "quoted-")
                   if not f.startswith(MALFORMED)]
    return faults


def frame_faults(data) -> list[str]:
    """Every fault of a frame meant to be transmitted: structural ones (prefix
    'malformed:') and wrong checksums (IPv4 header; TCP/UDP over the pseudo header, a UDP
    checksum of 0 allowed; ICMP over the message; for ICMP errors the quoted IPv4 header
    and, when the quote is complete, the quoted L4 checksum). [] when all is right."""
    l3 = l3_offset(data)
    if l3 is None:
        return [f"{MALFORMED}not-ipv4"]
    if l3 < 0:
        return [f"{MALFORMED}ethernet"]
    avail = len(data) - l3
    if avail < 20 or data[l3] >> 4 != 4:
        return [f"{MALFORMED}ip-header"]
    ihl = (data[l3] & 15) * 4
    if ihl < 20 or ihl > avail:
        return [f"{MALFORMED}ip-header"]
    faults = [] if sum_ok(data[l3:l3 + ihl]) else ["ip-checksum"]
    tot = (data[l3 + 2] << 8) | data[l3 + 3]
    if not ihl <= tot <= avail:
        return faults + [f"{MALFORMED}ip-total-length"]
    if ((data[l3 + 6] << 8) | data[l3 + 7]) & MF_OR_OFFSET:
        return faults  # a fragment: the L4 checksum covers the whole datagram, not this part
    proto = data[l3 + 9]
    seg = data[l3 + ihl:l3 + tot]
    faults += _l4_faults(proto, data[l3 + 12:l3 + 20], seg, "")
    if proto == ICMP and len(seg) >= 8 and seg[0] in ICMP_ERRORS:
        faults += _quote_faults(seg[8:])
    return faults


def source_addresses(data) -> tuple[bytes | None, bytes | None]:
    """(outer IPv4 source, for an ICMP error the quoted datagram's destination), each as 4
    bytes or None when the frame does not have it."""
    l3 = l3_offset(data)
    if l3 is None or l3 < 0 or len(data) < l3 + 20 or data[l3] >> 4 != 4:
        return None, None
    src = bytes(data[l3 + 12:l3 + 16])
    ihl = (data[l3] & 15) * 4
    tot = (data[l3 + 2] << 8) | data[l3 + 3]
    end = min(l3 + tot, len(data))
    q = l3 + ihl + 8
    quoted_dst = None
    if data[l3 + 9] == ICMP and ihl >= 20 and l3 + ihl < end and data[l3 + ihl] in ICMP_ERRORS \
            and q + 20 <= end and data[q] >> 4 == 4:
        quoted_dst = bytes(data[q + 16:q + 20])
    return src, quoted_dst


def icmp_quote(data) -> str | None:
    """For an ICMP error: "whole" when it quotes the whole datagram (so the quoted L4
    checksum is checked), "part" otherwise; None for anything else."""
    l3 = l3_offset(data)
    if l3 is None or l3 < 0 or len(data) < l3 + 20 or data[l3] >> 4 != 4:
        return None
    ihl = (data[l3] & 15) * 4
    end = min(l3 + ((data[l3 + 2] << 8) | data[l3 + 3]), len(data))
    q = l3 + ihl + 8
    if data[l3 + 9] != ICMP or ihl < 20 or q > end or data[l3 + ihl] not in ICMP_ERRORS:
        return None
    if q + 20 > end or (data[q] & 15) < 5:
        return "part"
    qtot = (data[q + 2] << 8) | data[q + 3]
    qfrag = ((data[q + 6] << 8) | data[q + 7]) & MF_OR_OFFSET
    return "whole" if (data[q] & 15) * 4 <= qtot <= end - q and not qfrag else "part"


# --- writing checksums (the fuzz generator) ----------------------------------------------

def _put(buf: bytearray, off: int, value: int) -> None:
    buf[off] = value >> 8
    buf[off + 1] = value & 0xFF


def _fix_l4(buf: bytearray, proto: int, addr_off: int, l4: int, end: int) -> None:
    """Write the L4 checksum of the payload buf[l4:end] (whatever fits)."""
    n = end - l4
    if proto == TCP and n >= 18:
        _put(buf, l4 + 16, 0)
        _put(buf, l4 + 16, checksum(_pseudo(buf[addr_off:addr_off + 8], TCP, n) + buf[l4:end]))
    elif proto == UDP and n >= 8:
        if buf[l4 + 6] == 0 and buf[l4 + 7] == 0:
            return  # "no checksum" stays so
        ulen = (buf[l4 + 4] << 8) | buf[l4 + 5]
        if 8 <= ulen <= n:
            end, n = l4 + ulen, ulen
        _put(buf, l4 + 6, 0)
        c = checksum(_pseudo(buf[addr_off:addr_off + 8], UDP, n) + buf[l4:end])
        _put(buf, l4 + 6, c or 0xFFFF)
    elif proto == ICMP and n >= 4:
        _put(buf, l4 + 2, 0)
        _put(buf, l4 + 2, checksum(buf[l4:end]))


def fix_checksums(buf: bytearray) -> None:
    """Make every checksum of the frame right, as far as its headers allow: IPv4 header,
    for an ICMP error the quoted IPv4 header and (whole quote) quoted L4, then the L4
    checksum. Fragments keep their L4 checksum (it covers the whole datagram)."""
    l3 = l3_offset(buf)
    if l3 is None or l3 < 0 or len(buf) < l3 + 20:
        return
    ihl = (buf[l3] & 15) * 4
    if ihl < 20 or l3 + ihl > len(buf):
        return
    _put(buf, l3 + 10, 0)
    _put(buf, l3 + 10, checksum(buf[l3:l3 + ihl]))
    tot = (buf[l3 + 2] << 8) | buf[l3 + 3]
    if tot < ihl or ((buf[l3 + 6] << 8) | buf[l3 + 7]) & MF_OR_OFFSET:
        return
    end = min(l3 + tot, len(buf))
    l4, proto = l3 + ihl, buf[l3 + 9]
    if proto == ICMP and end - l4 >= 8 + 20 and buf[l4] in ICMP_ERRORS:
        q = l4 + 8
        qihl = (buf[q] & 15) * 4
        if buf[q] >> 4 == 4 and 20 <= qihl <= end - q:
            _put(buf, q + 10, 0)
            _put(buf, q + 10, checksum(buf[q:q + qihl]))
            qtot = (buf[q + 2] << 8) | buf[q + 3]
            qfrag = ((buf[q + 6] << 8) | buf[q + 7]) & MF_OR_OFFSET
            if qihl <= qtot <= end - q and not qfrag:
                _fix_l4(buf, buf[q + 9], q + 12, q + qihl, q + qtot)
    _fix_l4(buf, proto, l3 + 12, l4, end)
