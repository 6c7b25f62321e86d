"""VPC flow logs: one record per 5-tuple per interface per aggregation interval, in the
VPC Flow Logs version 2 format (or as JSON lines), written by the node's agent to rotating
files.

Each direction of a flow is its own flow entry in the data path (its own 5-tuple, arriving
on its own interface, with its own packet and byte counts), so each direction is its own
record, like AWS logs a flow on each network interface it crosses.

Exact counts, how: at the end of each interval the aggregator reads every flow entry
(both tables) and logs what each entry's counts grew by since the last read (an entry is
known by its key and creation time, so a reused tuple starts again from 0). What an entry
counted after the last read and before it was deleted comes from its deletion:

- the data path deletes a flow with an event (EXPIRED, REMOVED) that carries both
  directions' final counts (bpf/structs.h struct flow_event twin_*);
- the agent's garbage collection hands the aggregator the entries it deleted (their last
  values, read just before the delete).

So a flow's records add up to its final packets and bytes. An entry that disappears with
neither (the unconfirmed table's LRU eviction under pressure, an event lost to a full
ring, the NLB's reset of an unhealthy target's flows) is logged as SKIPDATA: its counts
since the last read are unknown. The cost of an interval is one batched read of the flow
tables (O(flows), once per interval) and O(deleted flows) for the deletions.

The reading side (hpctl flowlogs) is parse_line / follow_lines here."""
from __future__ import annotations

import collections
import ctypes
import dataclasses
import json
import logging
import logging.handlers
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Iterator

from hyperplane.errors import ConfigError

log = logging.getLogger("hyperplane.observe.flowlogs")

MIN_INTERVAL_S, MAX_INTERVAL_S = 1, 600
# The drop verdicts the data path reports as FLOW_REJECTED events, so REJECT records:
# bpf/hyperplane.bpf.c REJECT_VERDICTS (a unit test holds the two together).
REJECT_VERDICTS = ("DROP_NO_FLOW", "DROP_PORT_ALLOC", "DROP_TABLE_FULL", "DROP_NO_ROUTE",
                   "DROP_NO_TARGET", "DROP_NO_LISTENER", "DROP_TCP_NOT_SYN",
                   "DROP_WRONG_IFACE", "DROP_TCP_INVALID", "DROP_TUPLE_TAKEN",
                   "DROP_NO_OWNER")
DEFAULT_DIR = "/run/hyperplane/flowlogs"
FORMATS = ("v2", "json")
LOG_NAME = "flow.log"
# The version 2 default format's fields, in order (AWS VPC Flow Logs).
V2_FIELDS = ("version", "account-id", "interface-id", "srcaddr", "dstaddr", "srcport",
             "dstport", "protocol", "packets", "bytes", "start", "end", "action",
             "log-status")
_INT_FIELDS = {"version", "srcport", "dstport", "protocol", "packets", "bytes", "start", "end"}
# An event's age is whole milliseconds: its creation time is known to this much.
_CREATED_SLACK_NS = 5_000_000


def check_interval(value) -> int:
    """The aggregation interval in whole seconds, 1 to 600 (AWS offers 60 and 600)."""
    if isinstance(value, bool) or not isinstance(value, int) or \
            not MIN_INTERVAL_S <= value <= MAX_INTERVAL_S:
        raise ConfigError(f"the flow log interval must be whole seconds from {MIN_INTERVAL_S} "
                          f"to {MAX_INTERVAL_S}, not {value!r}")
    return value


@dataclass
class FlowLogConfig:
    dir: str = DEFAULT_DIR           # the node's files go to DIR/<node>/flow.log[.N]
    interval_s: int = 60
    max_bytes: int = 10 << 20        # a file is rotated before it would grow past this
    backups: int = 5                 # rotated files kept (flow.log.1 .. flow.log.N)
    format: str = "v2"
    account_id: str = "000000000000"  # the version 2 format's account-id field
    enabled: bool = True

    def __post_init__(self):
        check_interval(self.interval_s)
        if self.format not in FORMATS:
            raise ConfigError(f"the flow log format must be one of {', '.join(FORMATS)}, "
                              f"not {self.format!r}")
        if not isinstance(self.max_bytes, int) or self.max_bytes < 4096:
            raise ConfigError(f"the flow log file size must be at least 4096 bytes, not "
                              f"{self.max_bytes!r}")
        if not isinstance(self.backups, int) or not 1 <= self.backups <= 1000:
            raise ConfigError(f"the flow log backups must be 1 to 1000 files, not "
                              f"{self.backups!r}")
        if not self.account_id or any(c.isspace() for c in self.account_id):
            raise ConfigError(f"the account id must be one word, not {self.account_id!r}")


def log_path(directory: str, node: str) -> str:
    return os.path.join(directory, node, LOG_NAME)


# --- records ---------------------------------------------------------------------------

@dataclass
class FlowLogRecord:
    interface_id: str
    srcaddr: str | None
    dstaddr: str | None
    srcport: int | None
    dstport: int | None
    protocol: int | None
    packets: int | None
    bytes: int | None
    start: int
    end: int
    action: str | None = "ACCEPT"
    log_status: str = "OK"           # OK, or SKIPDATA: counts unknown (see the module)
    account_id: str = "000000000000"
    version: int = 2

    def to_v2(self) -> str:
        return " ".join("-" if v is None else str(v) for v in
                        (self.version, self.account_id, self.interface_id, self.srcaddr,
                         self.dstaddr, self.srcport, self.dstport, self.protocol,
                         self.packets, self.bytes, self.start, self.end, self.action,
                         self.log_status))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    def to_dict(self) -> dict:
        return dict(vars(self))     # scalars only: no need for asdict's deep copy


def parse_line(line: str) -> FlowLogRecord:
    """A record from one line of a flow log, either format; ValueError if it is not one."""
    line = line.strip()
    if line.startswith("{"):
        data = json.loads(line)
        if set(data) != {f.name for f in dataclasses.fields(FlowLogRecord)}:
            raise ValueError(f"not a flow log record: {line[:80]!r}")
        return FlowLogRecord(**data)
    parts = line.split()
    if len(parts) != len(V2_FIELDS) or parts[0] != "2":
        raise ValueError(f"not a version 2 flow log record: {line[:80]!r}")
    values = {}
    for name, text in zip(V2_FIELDS, parts):
        values[name.replace("-", "_")] = None if text == "-" else \
            int(text) if name in _INT_FIELDS else text
    return FlowLogRecord(**values)


def format_record(record: FlowLogRecord, fmt: str) -> str:
    return record.to_json() if fmt == "json" else record.to_v2()


# --- aggregation -----------------------------------------------------------------------

_KEY = struct.Struct("!4s4sHHB3x")    # struct flow_key: addresses and ports in network order


def key_fields(key: bytes) -> tuple[str, str, int, int, int]:
    src, dst, sport, dport, proto = _KEY.unpack(key[:_KEY.size])
    return socket.inet_ntoa(src), socket.inet_ntoa(dst), sport, dport, proto


@dataclass(slots=True)     # one per flow entry: kept small
class _Entry:
    """What the last read (or a deletion) said of one flow entry."""
    created_ns: int
    packets: int
    bytes: int
    ifindex: int
    last_seen_ns: int


@dataclass(slots=True)
class _Acc:
    packets: int = 0
    bytes: int = 0
    first_ns: int = 0
    last_ns: int = 0


class FlowLogAggregator:
    """Per-interval deltas of every flow entry (see the module). Not thread-safe except
    on_event / on_deleted, which only queue; flush() runs in one thread."""

    def __init__(self, dp, config: FlowLogConfig, ifname=lambda i: f"if{i}",
                 clock=None, sync_events=None):
        from hyperplane.datapath.flows import now_ns
        self.dp, self.config, self.ifname = dp, config, ifname
        self.clock = clock or now_ns          # the data path's clock (monotonic, coarse)
        self.sync_events = sync_events        # waits until queued events are delivered
        self._queue: collections.deque = collections.deque()
        self._tracked: dict[bytes, _Entry] = {}
        # entries gone from the tables whose deletion has not been reported yet: key ->
        # [(entry, flushes waited)]; one more interval, then SKIPDATA
        self._vanished: dict[bytes, list] = {}
        self._acc: dict[tuple[bytes, int], _Acc] = {}
        self._rejects: dict[tuple[bytes, int], _Acc] = {}   # rejected packets' tuples
        self.interval_start_ns = self.clock()
        self.counts = {"intervals": 0, "records": 0, "skipdata": 0, "deletions": 0,
                       "bad_events": 0, "rejected_packets": 0}

    # --- inputs (any thread) ---
    def on_event(self, raw: bytes) -> None:
        """An event (struct flow_event bytes) from the node's EventHub: deletions (a
        flow's counts are read from the tables) and rejected packets matter here."""
        etype = int.from_bytes(raw[:4], "little")
        if etype in _DELETING:
            self._queue.append(("event", raw))
        elif etype == _REJECTED:
            self._queue.append(("rejected", raw))

    def on_deleted(self, entries) -> None:
        """(key, value) flow entries the agent deleted (garbage collection): their last
        counts."""
        gone = [(bytes(k), _Entry(v.created_ns, v.packets, v.bytes, v.in_ifindex,
                                  v.last_seen_ns)) for k, v in entries]
        if gone:
            self._queue.append(("deleted", gone))

    # --- the interval ---
    def baseline(self) -> None:
        """Read the tables without logging: what flows counted before this aggregator
        started was logged by the agent before it (or is lost with it)."""
        for kb, entry in self._read():
            self._tracked[kb] = entry
        self.interval_start_ns = self.clock()

    def flush(self) -> list[FlowLogRecord]:
        """End the interval: the records of every entry that counted packets in it."""
        if self.sync_events is not None:
            self.sync_events()
        self._take_deletions()
        end_ns = self.clock()
        seen: set[bytes] = set()
        for kb, cur in self._read():
            if kb in seen:        # in both tables for a moment (confirmation moves it)
                continue
            seen.add(kb)
            old = self._tracked.get(kb)
            if old is not None and old.created_ns == cur.created_ns:
                if cur.packets >= old.packets and cur.bytes >= old.bytes:
                    self._add(kb, cur, cur.packets - old.packets, cur.bytes - old.bytes)
                    self._tracked[kb] = cur
                continue
            if old is not None:   # an earlier incarnation of the tuple: its end may come
                self._vanish(kb, old)
            self._add(kb, cur, cur.packets, cur.bytes)
            self._tracked[kb] = cur
        for kb in [k for k in self._tracked if k not in seen]:
            self._vanish(kb, self._tracked.pop(kb))
        records = self._records(end_ns)
        records += self._expire_vanished(end_ns)
        self.interval_start_ns = end_ns
        self.counts["intervals"] += 1
        self.counts["records"] += len(records)
        return records

    def _read(self) -> Iterator[tuple[bytes, _Entry]]:
        from hyperplane.datapath.flows import flow_entries
        for k, v in flow_entries(self.dp):
            yield bytes(k), _Entry(v.created_ns, v.packets, v.bytes, v.in_ifindex,
                                   v.last_seen_ns)

    def _add(self, kb: bytes, entry: _Entry, packets: int, nbytes: int) -> None:
        if packets <= 0 and nbytes <= 0:
            return
        acc = self._acc.setdefault((kb, entry.ifindex), _Acc(first_ns=1 << 63))
        acc.packets += packets
        acc.bytes += nbytes
        acc.first_ns = min(acc.first_ns, max(entry.created_ns, self.interval_start_ns))
        acc.last_ns = max(acc.last_ns, entry.last_seen_ns)

    def _vanish(self, kb: bytes, entry: _Entry) -> None:
        self._vanished.setdefault(kb, []).append([entry, 0])

    def _take_deletions(self) -> None:
        while self._queue:
            what, item = self._queue.popleft()
            if what == "deleted":
                for kb, final in item:
                    self._final(kb, final, exact=True)
            elif what == "rejected":
                self._rejected(item)
            else:
                self._final_event(item)

    def _rejected(self, raw: bytes) -> None:
        from hyperplane.observe.events import REC_OFFSET, RawFlowEvent
        ev = RawFlowEvent.from_buffer_copy(raw[:ctypes.sizeof(RawFlowEvent)].ljust(
            ctypes.sizeof(RawFlowEvent), b"\0"))
        kb = raw[REC_OFFSET:REC_OFFSET + _KEY.size]
        acc = self._rejects.setdefault((kb, ev.in_ifindex), _Acc(first_ns=ev.ts_ns))
        acc.packets += ev.packets
        acc.bytes += ev.bytes
        acc.last_ns = max(acc.last_ns, ev.ts_ns)
        self.counts["rejected_packets"] += ev.packets

    def _final_event(self, raw: bytes) -> None:
        from hyperplane.observe.events import decode
        try:
            ev = decode(raw)
        except ValueError:        # a record another version wrote
            self.counts["bad_events"] += 1
            return
        r = ev.record
        created = ev.ts_ns - r.age_ms * 1_000_000
        last = ev.ts_ns - r.idle_ms * 1_000_000
        orig = _KEY.pack(socket.inet_aton(r.src), socket.inet_aton(r.dst), r.sport, r.dport,
                         r.proto)
        reply = _KEY.pack(socket.inet_aton(r.new_dst), socket.inet_aton(r.new_src),
                          r.new_dport, r.new_sport, r.proto)
        this, twin = (reply, orig) if ev.reply else (orig, reply)
        self._final(this, _Entry(created, ev.packets, ev.bytes, ev.in_ifindex, last), False)
        self._final(twin, _Entry(created, ev.twin_packets, ev.twin_bytes,
                                 ev.twin_in_ifindex, last), False)

    def _final(self, kb: bytes, final: _Entry, exact: bool) -> None:
        """A deleted entry's last counts: log what it counted since it was last read."""
        self.counts["deletions"] += 1

        def same(e: _Entry) -> bool:
            return e.created_ns == final.created_ns if exact else \
                abs(e.created_ns - final.created_ns) <= _CREATED_SLACK_NS
        known = None
        cur = self._tracked.get(kb)
        if cur is not None and same(cur):
            known = self._tracked.pop(kb)
        else:
            for i, (e, _) in enumerate(self._vanished.get(kb, [])):
                if same(e):
                    known = self._vanished[kb].pop(i)[0]
                    if not self._vanished[kb]:
                        del self._vanished[kb]
                    break
        if known is None:         # created and deleted between two reads
            self._add(kb, final, final.packets, final.bytes)
            return
        final.ifindex = final.ifindex or known.ifindex
        final.created_ns = known.created_ns
        self._add(kb, final, final.packets - known.packets, final.bytes - known.bytes)

    def _expire_vanished(self, end_ns: int) -> list[FlowLogRecord]:
        """Vanished entries whose deletion was not reported within an interval: SKIPDATA."""
        out = []
        for kb in list(self._vanished):
            keep = []
            for item in self._vanished[kb]:
                item[1] += 1
                if item[1] < 2:
                    keep.append(item)
                    continue
                entry = item[0]
                src, dst, sport, dport, proto = key_fields(kb)
                out.append(FlowLogRecord(
                    self.ifname(entry.ifindex), src, dst, sport, dport, proto, None, None,
                    self._wall_s(self.interval_start_ns), self._wall_s(end_ns), None,
                    "SKIPDATA", self.config.account_id))
                self.counts["skipdata"] += 1
            if keep:
                self._vanished[kb] = keep
            else:
                del self._vanished[kb]
        return out

    def _records(self, end_ns: int) -> list[FlowLogRecord]:
        out = []
        offset = time.time_ns() - self.clock()      # the data path's clock -> wall clock
        account = self.config.account_id
        for action, accs in (("ACCEPT", self._acc), ("REJECT", self._rejects)):
            for (kb, ifindex), acc in accs.items():
                src, dst, sport, dport, proto = key_fields(kb)
                out.append(FlowLogRecord(
                    self.ifname(ifindex), src, dst, sport, dport, proto, acc.packets,
                    acc.bytes, (acc.first_ns + offset) // 1_000_000_000,
                    (max(acc.last_ns, acc.first_ns) + offset) // 1_000_000_000, action, "OK",
                    account))
        self._acc, self._rejects = {}, {}
        out.sort(key=lambda r: (r.start, r.interface_id, r.srcaddr, r.srcport))
        return out

    def _wall_s(self, mono_ns: int) -> int:
        return int((mono_ns + time.time_ns() - self.clock()) // 1_000_000_000)


def _event_type(name: str) -> int | None:
    from hyperplane.datapath.verdicts import FlowEventType
    return int(getattr(FlowEventType, name)) if hasattr(FlowEventType, name) else None


def _deleting_types() -> frozenset:
    from hyperplane.datapath.verdicts import FlowEventType
    return frozenset(int(getattr(FlowEventType, name)) for name in ("FLOW_EXPIRED",
                                                                    "FLOW_REMOVED")
                     if hasattr(FlowEventType, name))


_DELETING = _deleting_types()
_REJECTED = _event_type("FLOW_REJECTED")


# --- writing ---------------------------------------------------------------------------

class FlowLogWriter:
    """The node's flow log file, rotated by size (logging's RotatingFileHandler: the file
    is renamed to .1, .1 to .2, ... before a record would take it past max_bytes; whole
    lines only)."""

    def __init__(self, path: str, config: FlowLogConfig):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.path, self.config = path, config
        self._handler = logging.handlers.RotatingFileHandler(
            path, maxBytes=config.max_bytes, backupCount=config.backups, encoding="utf-8")
        self._handler.setFormatter(logging.Formatter("%(message)s"))
        self._logger = logging.Logger(f"flowlog:{path}")   # not in logging's tree
        self._logger.propagate = False
        self._logger.addHandler(self._handler)

    def write(self, records: list[FlowLogRecord]) -> None:
        """Whole lines, in blocks of at most 64 KiB (and never more than a file holds):
        the handler checks the size once a block instead of once a line (a record at a
        time cost 70 us each: bench/flowlog_bench.py)."""
        limit = min(64 << 10, self.config.max_bytes) - 1
        block: list[str] = []
        size = 0
        for r in records:
            line = format_record(r, self.config.format)
            if block and size + len(line) + 1 > limit:
                self._logger.info("\n".join(block))
                block, size = [], 0
            block.append(line)
            size += len(line) + 1
        if block:
            self._logger.info("\n".join(block))
        self._handler.flush()

    def close(self) -> None:
        self._handler.close()


class FlowLogs:
    """The agent's flow logs: an aggregator fed by the event hub and the GC, flushed every
    interval by a thread of its own into the node's rotating file."""

    def __init__(self, node: str, netns: str | None, dp, config: FlowLogConfig, hub=None):
        self.config = config
        self.path = log_path(config.dir, node)
        self._ifnames: dict[int, str] = {}
        self._netns = netns
        sync = (lambda: hub.wait_round(2.0)) if hub is not None else None
        self.aggregator = FlowLogAggregator(dp, config, self._ifname, sync_events=sync)
        if hub is not None:
            hub.subscribe_events(self.aggregator.on_event, types=_DELETING | {_REJECTED})
        self.writer = FlowLogWriter(self.path, config)
        self.stop = threading.Event()
        self.error: str | None = None
        self._thread: threading.Thread | None = None

    def _ifname(self, ifindex: int) -> str:
        if not ifindex:
            return "-"
        if ifindex not in self._ifnames:
            try:
                from hyperplane.netns import ipr_any
                with ipr_any(self._netns) as ip:
                    self._ifnames = {link["index"]: link.get_attr("IFLA_IFNAME")
                                     for link in ip.get_links()}
            except OSError as exc:
                log.warning("interface names: %s", exc)
        return self._ifnames.get(ifindex, f"if{ifindex}")

    def start(self) -> None:
        self.aggregator.baseline()
        self._thread = threading.Thread(target=self._run, name="flowlogs", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        interval = self.config.interval_s
        next_flush = time.monotonic() + interval
        while not self.stop.wait(max(0.0, next_flush - time.monotonic())):
            self.flush()
            # an interval whose aggregation took longer than the interval (a huge table at
            # a short interval) is not followed at once by the next: the agent would do
            # nothing else; that interval is longer (its records' start/end say so)
            next_flush = max(next_flush + interval, time.monotonic() + interval / 2)

    def flush(self) -> None:
        try:
            self.writer.write(self.aggregator.flush())
            self.error = None
        except Exception as exc:  # noqa: BLE001 - logged, tried again next interval
            self.error = str(exc)
            log.exception("flow logs: the interval could not be written")

    def close(self) -> None:
        """Stop, logging the interval under way (so a stopped agent loses nothing it saw)."""
        self.stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.flush()
        self.writer.close()

    def status(self) -> dict:
        return {"path": self.path, "interval_s": self.config.interval_s,
                "format": self.config.format, "error": self.error, **self.aggregator.counts}


# --- reading ---------------------------------------------------------------------------

def log_files(path: str) -> list[str]:
    """The node's flow log files, oldest first (flow.log.N ... flow.log.1, flow.log)."""
    rotated = []
    directory, name = os.path.split(path)
    try:
        for f in os.listdir(directory):
            suffix = f[len(name) + 1:]
            if f.startswith(name + ".") and suffix.isdigit():
                rotated.append((int(suffix), os.path.join(directory, f)))
    except FileNotFoundError:
        return []
    files = [p for _, p in sorted(rotated, reverse=True)]
    return files + ([path] if os.path.exists(path) else [])


def read_lines(path: str) -> Iterator[str]:
    """Every line of the node's flow log files, oldest first, while the agent may rotate
    them. Every file is opened before any is read (an open file survives being renamed or
    deleted), newest first, and the files are listed again until a listing shows none
    not opened yet (by inode): a rotation neither fails the read (a name that vanished is
    passed over) nor skips a file whose name moved. The files are read in the order of
    that last listing; one a rotation deleted meanwhile (the backup count's oldest) comes
    first. What a rotation deletes is gone by design."""
    opened: dict[int, object] = {}
    listed: list[int] = []            # the last listing's inodes, newest first
    try:
        for _ in range(10):          # each pass that finds a new file follows a rotation
            found, listed = False, []
            for f in reversed(log_files(path)):
                try:
                    fh = open(f, encoding="utf-8")
                except FileNotFoundError:
                    continue
                inode = os.fstat(fh.fileno()).st_ino
                listed.append(inode)
                if inode in opened:
                    fh.close()
                    continue
                opened[inode] = fh
                found = True
            if not found:
                break
        age = {inode: -i for i, inode in enumerate(listed)}     # oldest: the lowest
        first = -len(listed)
        for _, fh in sorted(opened.items(), key=lambda kv: (
                age.get(kv[0], first), os.fstat(kv[1].fileno()).st_mtime_ns)):
            yield from fh
    finally:
        for fh in opened.values():
            fh.close()


def follow_lines(path: str, stop: threading.Event | None = None, poll_s: float = 0.2,
                 from_start: bool = False,
                 opened: threading.Event | None = None) -> Iterator[str]:
    """Lines appended to path from now on (from its start with from_start), across
    rotations: when the name points to a new file, the rest of the old one is read first,
    then the new one from its start. Ends when stop is set. opened is set once the file
    is open (what is written from then on will be read)."""
    stop = stop or threading.Event()
    fh = None
    while fh is None and not stop.is_set():
        try:
            fh = open(path, encoding="utf-8")
        except FileNotFoundError:
            stop.wait(poll_s)
    if fh is None:
        return
    if not from_start:
        fh.seek(0, os.SEEK_END)
    if opened is not None:
        opened.set()
    partial = ""
    try:
        while not stop.is_set():
            chunk = fh.read()
            if chunk:
                partial += chunk
                *lines, partial = partial.split("\n")
                for line in lines:
                    yield line + "\n"
                continue
            try:
                rotated = os.stat(path).st_ino != os.fstat(fh.fileno()).st_ino
            except FileNotFoundError:
                rotated = False           # between the rename and the new file
            if not rotated:
                stop.wait(poll_s)
                continue
            rest = fh.read()              # written before the rename
            if rest:
                partial += rest
                continue
            # the file was renamed, maybe more than once since the last look: read the
            # files rotated after it, oldest first, then follow the new one
            newer = _newer_files(path, fh.fileno())
            fh.close()
            fh = newer.pop()
            for older in newer:
                with older:
                    for line in older:
                        yield line
    finally:
        fh.close()


def _newer_files(path: str, followed_fd: int) -> list:
    """Open files of the log rotated after the followed file (oldest first), ending with
    the current one. Opened together, so later renames do not move them; a rename while
    they were being opened (a name that no longer holds the file opened under it) makes
    it start again. When the followed file was deleted (more rotations than backups),
    every file left is newer than it."""
    while True:
        followed = os.fstat(followed_fd)
        names = log_files(path)
        handles = []
        for f in names:
            try:
                handles.append(open(f, encoding="utf-8"))
            except FileNotFoundError:     # renamed meanwhile: the check below sees it
                continue
        inodes = [os.fstat(h.fileno()).st_ino for h in handles]
        stable = (len(handles) == len(names) and log_files(path) == names
                  and [_inode(f) for f in names] == inodes)
        if stable and followed.st_ino in inodes:
            start = inodes.index(followed.st_ino) + 1
        elif stable and followed.st_nlink == 0:
            start = 0
        else:                             # rotated while opening: once more
            start = None
        if start is not None and handles[start:]:
            for h in handles[:start]:
                h.close()
            return handles[start:]
        for h in handles:
            h.close()
        time.sleep(0.001)                 # the writer is between two steps of a rotation


def _inode(path: str) -> int | None:
    try:
        return os.stat(path).st_ino
    except FileNotFoundError:
        return None
