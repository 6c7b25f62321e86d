"""Flow records: a flow as it travels between nodes (bpf/structs.h struct flow_record),
and installing peers' records into this node's data path (bpf/install.h).

A record is 48 bytes, its first 16 (the original direction's key) name the flow. The
layout is read from the C struct at import, not written twice. Records move in blobs of
whole records: from the ring buffer into the sync protocol, from the protocol into the
installer, without a Python object per record on the way."""
from __future__ import annotations

import ctypes
import socket
import struct
import sys
import threading
from array import array
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import compress

from hyperplane.datapath import cheaders
from hyperplane.datapath.verdicts import FlowKind, Stat, TcpState

# C member type -> struct code; network-order fields stay bytes (they are compared and
# passed on, rarely read)
_CODES = {"__u8": "B", "__u16": "H", "__u32": "I", "__u64": "Q", "__be16": "2s", "__be32": "4s"}
INSTALL_HDR = cheaders.define("install.h", "INSTALL_HDR")
INSTALL_BATCH = cheaders.define("consts.h", "HP_INSTALL_BATCH")
REC_F_CONFIRMED = cheaders.define("structs.h", "REC_F_CONFIRMED")
REC_F_REPLY_SEEN = cheaders.define("structs.h", "REC_F_REPLY_SEEN")


def _layout(struct_name: str) -> tuple[str, list[str], dict[str, int]]:
    """A struct format, the field names and their byte offsets of a C struct of
    structs.h (nested structs flattened with dotted names, arrays and the compiler's
    alignment padding as pad bytes). Members are aligned as the C compiler aligns them:
    a scalar to its size, a struct to its widest member, and a struct's size rounded up
    to that (struct next_hop has 4 bytes of padding before checked_ns)."""
    fmt, names, offsets, _ = _layout_aligned(struct_name)
    return fmt, names, offsets


def _layout_aligned(struct_name: str) -> tuple[str, list[str], dict[str, int], int]:
    """_layout, and the struct's alignment (a struct member is aligned to it)."""
    fmt, names, offsets, size, align = "", [], {}, 0, 1

    def pad_to(a: int) -> None:
        nonlocal fmt, size
        gap = -size % a
        if gap:
            fmt += f"{gap}x"
            size += gap

    for ctype, name in cheaders.struct_members("structs.h", struct_name):
        if ctype.startswith("struct "):
            sub_fmt, sub_names, sub_offsets, sub_align = _layout_aligned(ctype.split()[1])
            pad_to(sub_align)
            align = max(align, sub_align)
            fmt += sub_fmt
            names += [f"{name}.{n}" for n in sub_names]
            offsets.update({f"{name}.{n}": size + off for n, off in sub_offsets.items()})
            size += struct.calcsize("<" + sub_fmt)
            continue
        width = struct.calcsize("<" + _CODES[ctype])
        pad_to(width)
        align = max(align, width)
        if "[" in name:
            count = int(name[name.index("[") + 1:name.index("]")])
            fmt += f"{count * width}x"
            size += count * width
        else:
            offsets[name] = size
            fmt += _CODES[ctype]
            names.append(name)
            size += width
    pad_to(align)
    return fmt, names, offsets, align


_FMT, FIELDS, OFFSETS = _layout("flow_record")
RECORD = struct.Struct("<" + _FMT)
RECORD_SIZE = RECORD.size        # 48
KEY_SIZE = struct.calcsize("<" + _layout("flow_key")[0])   # 16: what names a flow
_KIND_OFF = OFFSETS["kind"]
_RESOURCE_OFF = OFFSETS["resource"]


@dataclass(frozen=True)
class FlowRecord:
    """One record, readable (tests, hpctl). Addresses are dotted quads, ports numbers."""
    src: str
    dst: str
    sport: int
    dport: int
    proto: int
    new_src: str
    new_dst: str
    new_sport: int
    new_dport: int
    kind: FlowKind
    tcp_state: TcpState
    fin_seen: int
    flags: int
    resource: int
    origin: int
    idle_ms: int
    age_ms: int
    incarnation: int = 0          # 0: none (a record that names no incarnation)

    @property
    def confirmed(self) -> bool:
        return bool(self.flags & REC_F_CONFIRMED)

    def pack(self) -> bytes:
        ip, port = socket.inet_aton, (lambda p: struct.pack(">H", p))
        values = {"key.src_ip": ip(self.src), "key.dst_ip": ip(self.dst),
                  "key.src_port": port(self.sport), "key.dst_port": port(self.dport),
                  "key.proto": self.proto, "new_src_ip": ip(self.new_src),
                  "new_dst_ip": ip(self.new_dst), "new_src_port": port(self.new_sport),
                  "new_dst_port": port(self.new_dport), "kind": int(self.kind),
                  "tcp_state": int(self.tcp_state), "fin_seen": self.fin_seen,
                  "flags": self.flags, "resource": self.resource, "origin": self.origin,
                  "idle_ms": self.idle_ms, "age_ms": self.age_ms,
                  "incarnation": self.incarnation}
        return RECORD.pack(*(values[name] for name in FIELDS))

    @classmethod
    def unpack(cls, data: bytes) -> "FlowRecord":
        f = dict(zip(FIELDS, RECORD.unpack(data[:RECORD_SIZE])))
        ip, port = socket.inet_ntoa, (lambda b: struct.unpack(">H", b)[0])
        return cls(src=ip(f["key.src_ip"]), dst=ip(f["key.dst_ip"]),
                   sport=port(f["key.src_port"]), dport=port(f["key.dst_port"]),
                   proto=f["key.proto"], new_src=ip(f["new_src_ip"]),
                   new_dst=ip(f["new_dst_ip"]), new_sport=port(f["new_src_port"]),
                   new_dport=port(f["new_dst_port"]), kind=FlowKind(f["kind"]),
                   tcp_state=TcpState(f["tcp_state"]), fin_seen=f["fin_seen"],
                   flags=f["flags"], resource=f["resource"], origin=f["origin"],
                   idle_ms=f["idle_ms"], age_ms=f["age_ms"], incarnation=f["incarnation"])


def split(blob: bytes) -> list[bytes]:
    """The records of a blob (whole records only)."""
    return [blob[i:i + RECORD_SIZE] for i in range(0, len(blob) - RECORD_SIZE + 1, RECORD_SIZE)]


def group_by_resource(blob: bytes, lb_of_listener: dict[int, int]) -> dict[tuple[str, int], bytearray]:
    """A node's records by the resource they belong to: ("nat", gateway id) or ("lb",
    load balancer id). A NAT record names its gateway; an NLB record leaves the data path
    naming its listener's row on this node, which is replaced here by the load balancer's
    id (the cluster's name for it). Records of a listener this node no longer has are
    dropped."""
    out: dict[tuple[str, int], bytearray] = {}
    res_off = _RESOURCE_OFF
    # the usual blob (a read of the event ring) is one resource's: tell a column at a time
    n = len(blob) // RECORD_SIZE
    if len(blob) != n * RECORD_SIZE:
        blob = blob[:n * RECORD_SIZE]          # a cut record at the end is not one
    kinds = blob[_KIND_OFF::RECORD_SIZE]
    lo, hi = blob[res_off::RECORD_SIZE], blob[res_off + 1::RECORD_SIZE]
    if n and kinds.count(kinds[0]) == n and lo.count(lo[0]) == n and hi.count(hi[0]) == n:
        resource = lo[0] | hi[0] << 8
        if kinds[0] == FlowKind.NAT_OUT:
            return {("nat", resource): bytearray(blob)}
        lb = lb_of_listener.get(resource)
        if lb is None:
            return {}
        group = bytearray(blob)
        group[res_off::RECORD_SIZE] = bytes([lb & 0xFF]) * n
        group[res_off + 1::RECORD_SIZE] = bytes([lb >> 8]) * n
        return {("lb", lb): group}
    rec = bytearray(RECORD_SIZE)
    for i in range(0, len(blob) - RECORD_SIZE + 1, RECORD_SIZE):
        kind = blob[i + _KIND_OFF]
        resource = int.from_bytes(blob[i + res_off:i + res_off + 2], "little")
        if kind == FlowKind.NAT_OUT:
            out.setdefault(("nat", resource), bytearray()).extend(blob[i:i + RECORD_SIZE])
            continue
        lb = lb_of_listener.get(resource)
        if lb is None:
            continue
        rec[:] = blob[i:i + RECORD_SIZE]
        rec[res_off:res_off + 2] = lb.to_bytes(2, "little")
        out.setdefault(("lb", lb), bytearray()).extend(rec)
    return out


@dataclass
class InstallResult:
    installed: int = 0
    merged: int = 0
    rejected: int = 0
    conflict: int = 0
    full: int = 0
    replaced: int = 0     # installed in place of another flow held on the tuple (also installed)

    def total(self) -> int:
        return self.installed + self.merged + self.rejected + self.conflict + self.full


# The installer hands its batch back with the outcomes over the header: a __u16 per
# S_REC_* counter, indexed from S_REC_INSTALLED (bpf/install.h rec_outcome).
_OUTCOMES = struct.Struct(f"<{INSTALL_HDR // 2}H")
_OUTCOME_AT = {name: int(stat) - int(Stat.REC_INSTALLED) for name, stat in (
    ("installed", Stat.REC_INSTALLED), ("merged", Stat.REC_MERGED),
    ("rejected", Stat.REC_REJECTED), ("conflict", Stat.REC_CONFLICT),
    ("full", Stat.REC_FULL), ("replaced", Stat.REC_REPLACED))}
assert max(_OUTCOME_AT.values()) < INSTALL_HDR // 2


_runners = threading.local()     # per thread and hook: the installer's test_run buffers


def _install_runner(hook: str):
    runner = getattr(_runners, hook, None)
    if runner is None:
        from hyperplane.datapath.testrun import Runner
        runner = Runner(INSTALL_HDR + INSTALL_BATCH * RECORD_SIZE, hook)
        setattr(_runners, hook, runner)
    return runner


def install(dp, blob: bytes) -> InstallResult:
    """Install (or merge) every whole record of blob into dp's maps through the data
    path's installer (bpf/install.h), INSTALL_BATCH records per run. Returns what became
    of them, as each run reported it (exact whoever else installs at the same time)."""
    fd = dp.install_fd()
    runner = _install_runner(dp.hook)
    header = bytes(INSTALL_HDR)
    step = INSTALL_BATCH * RECORD_SIZE
    usable = len(blob) - len(blob) % RECORD_SIZE
    totals = [0] * (INSTALL_HDR // 2)
    for i in range(0, usable, step):
        runner.run(fd, header, blob[i:min(i + step, usable)])
        for j, n in enumerate(_OUTCOMES.unpack_from(runner.out)):
            totals[j] += n
    return InstallResult(**{name: totals[at] for name, at in _OUTCOME_AT.items()})


_VFMT, _VFIELDS, _VOFF = _layout("flow_value")
_NEW_TUPLE = slice(_VOFF["new_src_ip"], _VOFF["new_src_ip"] + 12)   # ips then ports
_TAIL = struct.Struct("<BBBBHHIII")      # kind .. incarnation, as in struct flow_record
assert KEY_SIZE + 12 + _TAIL.size == RECORD_SIZE and OFFSETS["kind"] == KEY_SIZE + 12
FLOW_F_PENDING = cheaders.define("structs.h", "FLOW_F_PENDING")
FLOW_F_REPLY_SEEN = cheaders.define("structs.h", "FLOW_F_REPLY_SEEN")
_ORIGINALS = (FlowKind.NAT_OUT, FlowKind.NLB_IN)


def record_of(key: bytes, value: bytes, now_ns: int, origin: int) -> bytes | None:
    """The record of a flow from its original direction's entry (raw key and value
    bytes), as bpf/flow.h record_of builds it; None for a reply direction's entry."""
    v = memoryview(value)
    kind = v[_VOFF["kind"]]
    if kind not in _ORIGINALS:
        return None
    flags = v[_VOFF["flags"]]
    last_seen = int.from_bytes(v[_VOFF["last_seen_ns"]:_VOFF["last_seen_ns"] + 8], "little")
    created = int.from_bytes(v[_VOFF["created_ns"]:_VOFF["created_ns"] + 8], "little")
    resource = int.from_bytes(v[_VOFF["resource"]:_VOFF["resource"] + 2], "little")
    incarnation = int.from_bytes(v[_VOFF["incarnation"]:_VOFF["incarnation"] + 4], "little")
    rec_flags = (0 if flags & FLOW_F_PENDING else REC_F_CONFIRMED) | \
        (REC_F_REPLY_SEEN if flags & FLOW_F_REPLY_SEEN else 0)
    clamp = lambda ns: min(max(ns, 0) // 1_000_000, 0xFFFFFFFF)  # noqa: E731
    return (bytes(key[:KEY_SIZE]) + bytes(v[_NEW_TUPLE]) +
            _TAIL.pack(kind, v[_VOFF["tcp_state"]], v[_VOFF["fin_seen"]], rec_flags, resource,
                       origin, clamp(now_ns - last_seen), clamp(now_ns - created), incarnation))


# --- many flows at once: a table's entries as raw bytes, records built a column at a time
# (a read of 260,000 entries as ctypes objects and record_of each took seconds, on the
# sync task's thread)

_ORIGINAL = bytes(k in _ORIGINALS for k in range(256))            # kind -> 1 if original
_REC_FLAGS = bytes((0 if f & FLOW_F_PENDING else REC_F_CONFIRMED) |
                   (REC_F_REPLY_SEEN if f & FLOW_F_REPLY_SEEN else 0) for f in range(256))
# what a record copies from its entry as it is: (field, bytes), little-endian both sides
_COPIED = (("new_src_ip", 12), ("kind", 1), ("tcp_state", 1), ("fin_seen", 1),
           ("resource", 2), ("incarnation", 4))
assert OFFSETS["new_dst_port"] - OFFSETS["new_src_ip"] == _VOFF["new_dst_port"] - \
    _VOFF["new_src_ip"] == 10, "the translated tuple is 12 bytes in a row on both sides"
_VECTOR = sys.byteorder == "little" and array("I").itemsize == 4 and array("Q").itemsize == 8
_MAX_MS = 0xFFFFFFFF


def entry_batches(table) -> Iterator[tuple[bytes, bytes, int, int, int]]:
    """Every entry of a flow table as (keys, values, count, key size, value size): raw
    bytes, entry i's key at keys[i * key size] and its value at values[i * value size],
    a BPF_MAP_LOOKUP_BATCH call's worth at a time where the map has raw batches."""
    ks, vs = ctypes.sizeof(table.Key), ctypes.sizeof(table.Leaf)
    raw = getattr(table, "raw_batches", None)
    if raw is not None:
        started = False
        try:
            for keys, values, n in raw():
                started = True
                yield ctypes.string_at(keys, n * ks), ctypes.string_at(values, n * vs), n, ks, vs
            return
        except OSError:
            if started:
                raise
            # a kernel without batch lookups: the slow way below
    items = list(table.items())
    yield (b"".join(bytes(k) for k, _ in items), b"".join(bytes(v) for _, v in items),
           len(items), ks, vs)


def value_column(values: bytes, n: int, vs: int, name: str, width: int) -> array:
    """One unsigned field (width 1, 2, 4 or 8 bytes) of n entries' values, as an array."""
    buf = bytearray(width * n)
    _lanes(buf, 0, width, values, _VOFF[name], vs, width, n)
    return array({1: "B", 2: "H", 4: "I", 8: "Q"}[width], bytes(buf))


def _lanes(out: bytearray, at: int, out_stride: int, src: bytes, src_at: int, stride: int,
           width: int, n: int) -> None:
    """Copy `width` bytes of each of n entries (stride apart from src_at) into n slots of
    out (out_stride apart from at): one strided slice per byte, so the loop is C's, not
    Python's."""
    for j in range(width):
        out[at + j::out_stride] = src[src_at + j:src_at + j + n * stride:stride]


def _ms_since(now_ns: int, times: array) -> bytes:
    """now - each time, in whole ms, clamped to 0..u32 (record_of's clamp), as u32s."""
    return array("I", [min(max(now_ns - t, 0) // 1_000_000, _MAX_MS) for t in times]).tobytes()


def records_of_entries(keys: bytes, values: bytes, n: int, ks: int, vs: int, now_ns: int,
                       origin: int, idle_below_ms: int | None = None) -> bytes:
    """The records of the original-direction entries among n raw entries (entry_batches),
    as record_of builds each; only those that saw a packet in the last idle_below_ms
    when given."""
    if not n:
        return b""
    if not _VECTOR:
        out = bytearray()
        for i in range(n):
            rec = record_of(keys[i * ks:i * ks + KEY_SIZE], values[i * vs:(i + 1) * vs],
                            now_ns, origin)
            if rec is not None and (idle_below_ms is None or int.from_bytes(
                    rec[OFFSETS["idle_ms"]:OFFSETS["idle_ms"] + 4], "little") < idle_below_ms):
                out += rec
        return bytes(out)
    out = bytearray(n * RECORD_SIZE)
    rs = RECORD_SIZE
    _lanes(out, 0, rs, keys, 0, ks, KEY_SIZE, n)
    for name, width in _COPIED:
        _lanes(out, OFFSETS[name], rs, values, _VOFF[name], vs, width, n)
    at = _VOFF["flags"]
    out[OFFSETS["flags"]::RECORD_SIZE] = values[at:at + n * vs:vs].translate(_REC_FLAGS)
    for j, byte in enumerate(origin.to_bytes(2, "little")):
        out[OFFSETS["origin"] + j::RECORD_SIZE] = bytes((byte,)) * n
    idle = _ms_since(now_ns, value_column(values, n, vs, "last_seen_ns", 8))
    age = _ms_since(now_ns, value_column(values, n, vs, "created_ns", 8))
    _lanes(out, OFFSETS["idle_ms"], rs, idle, 0, 4, 4, n)
    _lanes(out, OFFSETS["age_ms"], rs, age, 0, 4, 4, n)
    at = _VOFF["kind"]
    keep = values[at:at + n * vs:vs].translate(_ORIGINAL)
    if idle_below_ms is not None:
        keep = bytes(k and i < idle_below_ms for k, i in zip(keep, array("I", idle)))
    if keep.count(1) == n:
        return bytes(out)
    rows = [out[i:i + RECORD_SIZE] for i in range(0, n * RECORD_SIZE, RECORD_SIZE)]
    return b"".join(compress(rows, keep))


def dump(dp, origin: int, *, idle_below_ms: int | None = None,
         tables: tuple[str, ...] = ("flows",)) -> bytes:
    """The records of every flow this node holds in `tables` (confirmed flows by
    default: unconfirmed ones are a flood's to lose), optionally only those that saw a
    packet in the last idle_below_ms (an owner's refresh of its live flows)."""
    from hyperplane.datapath.flows import now_ns
    now = now_ns()
    return b"".join(records_of_entries(keys, values, n, ks, vs, now, origin, idle_below_ms)
                    for name in tables
                    for keys, values, n, ks, vs in entry_batches(dp.table(name)))
