"""Reading the flow table, and garbage collection of expired flows and reservations."""
from __future__ import annotations

import errno
import functools
import os
import re
import time
from dataclasses import asdict, dataclass

from hyperplane.datapath import cheaders
from hyperplane.datapath.cheaders import map_declarations
from hyperplane.codec import PROTOCOL_NAMES, PROTOCOLS, be16_to_port, be32_to_ip, proto_number
from hyperplane.datapath.verdicts import FlowKind, TcpState, Timeout

NSEC = 1_000_000_000
FLOW_F_PENDING = cheaders.define("structs.h", "FLOW_F_PENDING")  # unconfirmed (no reply yet)
# The entry of a flow that counts it (the original direction), per resource kind.
ORIGINAL_KINDS = (FlowKind.NAT_OUT, FlowKind.NLB_IN)
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


def node_flow_tables(dp) -> list[str]:
    """The flow tables (flow_tables()) the running program has (one older than these
    headers may lack some)."""
    return [name for name in flow_tables() if _has_table(dp, name)]


def flow_entries(dp):
    """(key, value) of every flow entry, one batched read per flow table (a table the
    running program does not have, being older than these headers, holds none)."""
    for name in node_flow_tables(dp):
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


# --- per-resource flow counters --------------------------------------------------------
# The data path counts, per gateway (gw_stats) and per listener (lb_stats), the flows it
# confirms and the confirmed flows it ends (closed, or deleted once expired). Flows that
# user space deletes while still open (GC, resets, removed targets) are added to the
# user_ends array (bpf/maps.h), which only user space writes: active = confirmed - ended -
# user_ends (hyperplane.metrics.active_flows). Every deletion of flow entries from Python
# goes through delete_flow_entries() below, which keeps that count.

@functools.cache
def _user_ends_expr(name: str) -> str:
    m = re.search(rf"^[ \t]*#[ \t]*define[ \t]+{name}[ \t]+(.+)$",
                  cheaders.header_text("consts.h"), re.M)
    if not m:
        raise cheaders.HeaderError(f"bpf/consts.h has no #define {name}")
    return m.group(1).strip()


def user_ends_bases(dp) -> dict[str, int]:
    """USER_ENDS_NAT_BASE and USER_ENDS_LB_BASE of bpf/consts.h for this node: the C's
    expressions evaluated with the node's sizes (USER_ENDS_LB_BASE is HP_MAX_GATEWAYS, a
    compile-time size), not with the header's defaults."""
    sizes = node_sizes(dp)
    return {kind: cheaders.evaluate(_user_ends_expr(name), sizes)
            for kind, name in (("nat", "USER_ENDS_NAT_BASE"), ("lb", "USER_ENDS_LB_BASE"))}


def node_sizes(dp) -> dict[str, int]:
    """HP_MAX_* -> value for the node's program: its Sizes (the -D flags hyperplane.datapath.loader
    compiles it with), or, for maps opened without them, what the maps themselves say."""
    sizes = getattr(dp, "sizes", None)
    if sizes is not None:
        return {f"HP_{k.upper()}": v for k, v in asdict(sizes).items()}
    return {"HP_MAX_GATEWAYS": dp.table("gw_stats").max_entries,
            "HP_MAX_LISTENERS": dp.table("lb_stats").max_entries}


def user_ends_slot(bases: dict[str, int], kind: int, resource: int) -> int:
    """The user_ends slot of a resource (gateways, then listeners; bases: user_ends_bases)."""
    nat = kind in (FlowKind.NAT_OUT, FlowKind.NAT_IN)
    return bases["nat" if nat else "lb"] + resource


def counted_open(value) -> bool:
    """A flow the data path counts as active and has not counted as ended: its original
    entry, confirmed (not FLOW_F_PENDING) and not CLOSED (a close is counted by the C)."""
    return (value.kind in ORIGINAL_KINDS and not value.flags & FLOW_F_PENDING
            and value.tcp_state != TcpState.CLOSED)


def add_user_ends(dp, values) -> int:
    """Add the deleted entries `values` that were counted open (counted_open) to user_ends,
    per resource. Returns how many were added. user_ends is written only from user space
    (a read, then a write per slot: one writer at a time, the node's agent or hpctl)."""
    per_slot: dict[int, int] = {}
    bases = None
    for v in values:
        if counted_open(v):
            bases = bases or user_ends_bases(dp)
            slot = user_ends_slot(bases, v.kind, v.resource)
            per_slot[slot] = per_slot.get(slot, 0) + 1
    if not per_slot:
        return 0
    table = dp.table("user_ends")
    for slot, n in per_slot.items():
        if not 0 <= slot < table.max_entries:
            continue  # a resource id beyond the array (a hand-made entry): nothing counts it
        key = table.Key(slot)
        table[key] = table.Leaf(_scalar(table[key]) + n)
    return sum(per_slot.values())


def _scalar(value) -> int:
    return int(getattr(value, "value", value))


def delete_flow_entries(dp, table_name: str, entries: list) -> list:
    """Delete (key, value) entries of one flow table, batched, and count the open flows
    among those really deleted into user_ends. Returns the values of the entries deleted
    (a key the data path deleted meanwhile is neither deleted nor counted here)."""
    if not entries:
        return []
    table = dp.table(table_name)
    gone = _delete(table, [k for k, _ in entries])
    deleted = [v for (_, v), ok in zip(entries, gone) if ok]
    add_user_ends(dp, deleted)
    return deleted


@dataclass
class GcResult:
    flows_removed: int = 0
    reservations_removed: int = 0


def _delete(table, keys: list) -> list[bool]:
    """Delete keys in BPF_MAP_DELETE_BATCH calls (DESIGN: batch everything on hot paths).
    The kernel deletes a batch in order and stops at a key that is gone (deleted meanwhile
    by the data path), saying how many it deleted: the rest go on in a new batch. Returns,
    per key, whether this call deleted it (so only those are counted)."""
    if not keys:
        return []
    fd = getattr(table, "map_fd", None)
    if fd is None:  # a stand-in for a map (tests): one by one
        return [table.pop(k, None) is not None for k in keys]
    from hyperplane.datapath.pinned import _NO_BATCH, delete_batch
    # one array, each retry starting further in: a key gone meanwhile costs one more call,
    # not a copy of every key after it (with thousands gone, that was minutes)
    arr = (table.Key * len(keys))(*keys)
    done: list[bool] = []
    while len(done) < len(keys):
        start = len(done)
        deleted, err = delete_batch(fd, arr, len(keys) - start, start)
        done += [True] * deleted
        if err == errno.ENOENT:
            done.append(False)  # this one was gone already: not ours
        elif err in _NO_BATCH and not deleted:  # a kernel without batch deletes
            return done + [table.pop(k, None) is not None for k in keys[start:]]
        elif err:
            raise OSError(err, f"BPF_MAP_DELETE_BATCH: {os.strerror(err)}")
    return done


def collect_garbage(dp, on_deleted=None) -> GcResult:
    """Delete expired flow entries (both keys of a flow, in every flow table) and the
    reservations whose flow is gone, expired, or on another port now. on_deleted((key, value)
    list): the entries deleted, as read just before (their final counts: flow logs).

    The data path already treats an expired flow as absent; this frees the table space and
    the NAT ports for good. Reads and deletes are batched (BPF_MAP_*_BATCH)."""
    timeouts, now = flow_timeouts(dp), now_ns()
    tables = {name: dp.table(name) for name in node_flow_tables(dp)}
    entries = {bytes(k): (name, k, v) for name, t in tables.items()
               for k, v in t.items_lookup_batch()}

    def live(key: bytes) -> bool:
        e = entries.get(key)
        return e is not None and entry_live(e[1], e[2], timeouts, now)

    dead: dict[str, list] = {name: [] for name in tables}
    for key, (name, k, v) in entries.items():
        if not live(key) and not live(bytes(v.twin)):  # a live direction keeps both
            dead[name].append((k, v))
    result = GcResult()
    for name, doomed in dead.items():
        gone = {id(v) for v in delete_flow_entries(dp, name, doomed)}
        deleted = [(k, v) for k, v in doomed if id(v) in gone]
        result.flows_removed += len(deleted)
        if on_deleted is not None and deleted:
            on_deleted(deleted)

    def holds(k, v) -> bool:
        """Does the reservation's flow live and still use its port? (A flow that has
        another port now left this one stale: bpf/nat.h resv_reclaim says the same.)"""
        e = entries.get(bytes(v.orig))
        return (e is not None and entry_live(e[1], e[2], timeouts, now) and
                e[2].new_src_ip == k.nat_ip and e[2].new_src_port == k.nat_port)

    resv = dp.table("nat_resv")
    stale = [k for k, v in resv.items_lookup_batch()
             # a young reservation's flow may be being created right now (the C's grace)
             if now - v.taken_ns > RESV_GRACE_S * NSEC and not holds(k, v)]
    result.reservations_removed = sum(_delete(resv, stale))
    return result


def _has_table(dp, name: str) -> bool:
    from hyperplane.errors import NotFound
    try:
        dp.table(name)
    except (KeyError, NotFound):  # a program older than the headers
        return name == "flows"
    return True
