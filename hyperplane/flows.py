"""Reading the flow table, and garbage collection of expired flows and reservations."""
from __future__ import annotations

import time
from dataclasses import dataclass

from . import cheaders
from .cheaders import map_declarations
from .codec import PROTOCOL_NAMES, PROTOCOLS, be16_to_port, be32_to_ip, proto_number
from .verdicts import FlowKind, TcpState, Timeout

NSEC = 1_000_000_000
# A reservation younger than this is not stale: bpf/consts.h HP_RESV_GRACE_NS, the grace
# the data path gives before reclaiming one (headers from before it: the GC's old 1 s).
RESV_GRACE_S = cheaders.defines("consts.h").get("HP_RESV_GRACE_NS", NSEC) / NSEC
CLOCK_MONOTONIC_COARSE = 6  # linux/time.h; Python's time module does not name it


@dataclass
class Flow:
    """One direction of a flow as the data path holds it."""
    kind: str
    proto: str
    src: str
    sport: int
    dst: str
    dport: int
    new_src: str
    new_sport: int
    new_dst: str
    new_dport: int
    tcp_state: str
    resource: int
    target: int
    packets: int
    bytes: int
    age_s: float
    idle_s: float
    live: bool

    @property
    def open(self) -> bool:
        """Live and not closed (a closed TCP flow lingers for its closing timeout, but is
        no longer an active connection)."""
        return self.live and self.tcp_state != "CLOSED"

    def to_dict(self) -> dict:
        return dict(vars(self))  # every field is a scalar: no need for asdict's deep copy


def now_ns() -> int:
    # the data path stamps flows with bpf_ktime_get_coarse_ns(): CLOCK_MONOTONIC_COARSE
    return time.clock_gettime_ns(CLOCK_MONOTONIC_COARSE)


def timeout_s(timeouts: list[int], proto: int, state: int) -> int:
    """The idle timeout of a flow entry: the choice bpf/flow.h flow_timeout_ns() makes
    (indexes: enum hp_timeout)."""
    if proto == PROTOCOLS["tcp"]:
        # half-closed (one FIN) is still an open connection: AWS's 350 s idle rule
        if state in (TcpState.ESTABLISHED, TcpState.FIN_WAIT):
            return timeouts[Timeout.TCP_ESTABLISHED]
        if state == TcpState.SYN_SENT:
            return timeouts[Timeout.TCP_SYN]
        return timeouts[Timeout.TCP_CLOSING]
    return timeouts[Timeout.UDP if proto == PROTOCOLS["udp"] else Timeout.ICMP]


def entry_live(key, value, timeouts: list[int], now: int) -> bool:
    """Not past its idle timeout (the data path treats an expired entry as absent)."""
    return now - value.last_seen_ns <= timeout_s(timeouts, key.proto, value.tcp_state) * NSEC


def entry_open(key, value, timeouts: list[int], now: int) -> bool:
    """Live and not closed: an active connection (a closed TCP flow lingers for its closing
    timeout but is no longer one)."""
    return value.tcp_state != TcpState.CLOSED and entry_live(key, value, timeouts, now)


def flow_timeouts(dp) -> list[int]:
    cfg = dp.table("config")
    return list(cfg[cfg.Key(0)].timeout_s)


def _name(enum_cls, value: int) -> str:
    """The enum name of a value, or the number (an entry written by another version)."""
    try:
        return enum_cls(value).name
    except ValueError:
        return str(value)


def decode(key, value, timeouts: list[int], now: int) -> Flow:
    idle = max(0, now - value.last_seen_ns)
    return Flow(
        kind=_name(FlowKind, value.kind),
        proto=PROTOCOL_NAMES.get(key.proto, str(key.proto)),
        src=be32_to_ip(key.src_ip), sport=be16_to_port(key.src_port),
        dst=be32_to_ip(key.dst_ip), dport=be16_to_port(key.dst_port),
        new_src=be32_to_ip(value.new_src_ip), new_sport=be16_to_port(value.new_src_port),
        new_dst=be32_to_ip(value.new_dst_ip), new_dport=be16_to_port(value.new_dst_port),
        tcp_state=_name(TcpState, value.tcp_state), resource=value.resource,
        target=value.target, packets=value.packets, bytes=value.bytes,
        age_s=round(max(0, now - value.created_ns) / NSEC, 3), idle_s=round(idle / NSEC, 3),
        live=entry_live(key, value, timeouts, now))


def flow_tables() -> list[str]:
    """The maps that hold flow entries: each map of bpf/maps.h keyed by struct flow_key
    with struct flow_value entries (so a table added in C is listed too)."""
    return [d.name for d in map_declarations()
            if (d.key, d.leaf) == ("struct flow_key", "struct flow_value")]


def flow_entries(dp):
    """(key, value) of every flow entry, one batched read per flow table (a table the
    running program does not have, being older than these headers, holds none)."""
    for name in flow_tables():
        if _has_table(dp, name):
            yield from dp.table(name).items_lookup_batch()


def list_flows(dp, *, address: str | None = None, port: int | None = None,
               proto: str | int | None = None, kind: str | None = None) -> list[Flow]:
    """Every flow entry (both directions), optionally filtered: address matches any of the
    four addresses, port any of the four ports."""
    timeouts, now = flow_timeouts(dp), now_ns()
    want_proto = proto_number(proto) if proto is not None else None
    out = []
    for k, v in flow_entries(dp):
        if want_proto is not None and k.proto != want_proto:
            continue
        f = decode(k, v, timeouts, now)
        if address and address not in (f.src, f.dst, f.new_src, f.new_dst):
            continue
        if port is not None and port not in (f.sport, f.dport, f.new_sport, f.new_dport):
            continue
        if kind and f.kind != kind.upper():
            continue
        out.append(f)
    return out


@dataclass
class GcResult:
    flows_removed: int = 0
    reservations_removed: int = 0


def _delete(table, keys: list) -> None:
    """Delete keys in one BPF_MAP_DELETE_BATCH (DESIGN: batch everything on hot paths);
    a key deleted meanwhile by the data path is skipped one by one."""
    if not keys:
        return
    try:
        table.items_delete_batch((table.Key * len(keys))(*keys))
    except Exception:
        for k in keys:
            table.pop(k, None)


def collect_garbage(dp) -> GcResult:
    """Delete expired flow entries (both keys of a flow, in every flow table) and the
    reservations whose flow is gone or expired from all of them.

    The data path already treats an expired flow as absent; this frees the table space and
    the NAT ports for good. Reads and deletes are batched (BPF_MAP_*_BATCH)."""
    timeouts, now = flow_timeouts(dp), now_ns()
    tables = {name: dp.table(name) for name in flow_tables() if _has_table(dp, name)}
    entries = {bytes(k): (name, k, v) for name, t in tables.items()
               for k, v in t.items_lookup_batch()}

    def live(key: bytes) -> bool:
        e = entries.get(key)
        return e is not None and entry_live(e[1], e[2], timeouts, now)

    dead: dict[str, list] = {name: [] for name in tables}
    for key, (name, k, v) in entries.items():
        if not live(key) and not live(bytes(v.twin)):  # a live direction keeps both
            dead[name].append(k)
    for name, keys in dead.items():
        _delete(tables[name], keys)
    result = GcResult(flows_removed=sum(len(keys) for keys in dead.values()))
    resv = dp.table("nat_resv")
    stale = [k for k, v in resv.items_lookup_batch()
             # a young reservation's flow may be being created right now (the C's grace)
             if now - v.taken_ns > RESV_GRACE_S * NSEC and not live(bytes(v.orig))]
    _delete(resv, stale)
    result.reservations_removed = len(stale)
    return result


def _has_table(dp, name: str) -> bool:
    from .errors import NotFound
    try:
        dp.table(name)
    except (KeyError, NotFound):  # a program older than the headers
        return name == "flows"
    return True
