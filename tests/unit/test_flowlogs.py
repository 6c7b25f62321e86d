"""Flow logs (hyperplane.observe.flowlogs): the interval's bounds, the version 2 line
format parsed back, per-interval deltas that add up to a flow's final counts however it
ends (read, deleted by the data path with an event, deleted by GC, unknown: SKIPDATA),
and rotation that loses no record, also for a follower."""
import ctypes
import os
import socket
import struct
import threading

import pytest

from hyperplane.errors import ConfigError
from hyperplane.fleet.records import FlowRecord
from hyperplane.datapath.verdicts import FlowEventType, FlowKind, TcpState
from hyperplane.observe import flowlogs
from hyperplane.observe.events import EVF_REPLY, RawFlowEvent
from hyperplane.observe.flowlogs import (FlowLogAggregator, FlowLogConfig, FlowLogRecord,
                                         FlowLogWriter, check_interval, follow_lines,
                                         parse_line, read_lines)


# --- configuration -----------------------------------------------------------------------

@pytest.mark.parametrize("good", [1, 60, 600])
def test_interval_accepts_1_to_600_seconds(good):
    assert check_interval(good) == good
    assert FlowLogConfig(interval_s=good).interval_s == good


@pytest.mark.parametrize("bad", [0, -1, 601, 3600, 1.5, "60", None, True])
def test_interval_rejects_anything_else_clearly(bad):
    with pytest.raises(ConfigError, match="interval must be whole seconds from 1 to 600"):
        FlowLogConfig(interval_s=bad)


@pytest.mark.parametrize("field,value,words", [("format", "csv", "format must be one of"),
                                               ("max_bytes", 100, "at least 4096"),
                                               ("backups", 0, "backups must be 1 to 1000"),
                                               ("account_id", "a b", "one word")])
def test_other_settings_are_checked(field, value, words):
    with pytest.raises(ConfigError, match=words):
        FlowLogConfig(**{field: value})


def test_agent_options_reach_the_config_and_are_checked():
    import argparse

    from hyperplane.node.agent import flow_log_arguments, flow_log_config
    ap = argparse.ArgumentParser()
    flow_log_arguments(ap)
    cfg = flow_log_config(ap.parse_args(["--flow-log-interval", "5", "--flow-log-format",
                                         "json", "--flow-log-max-bytes", "8192",
                                         "--flow-log-backups", "3", "--flow-log-dir", "/x"]))
    assert (cfg.interval_s, cfg.format, cfg.max_bytes, cfg.backups, cfg.dir, cfg.enabled) == \
        (5, "json", 8192, 3, "/x", True)
    assert flow_log_config(ap.parse_args(["--no-flow-logs"])).enabled is False
    with pytest.raises(ConfigError, match="interval"):
        flow_log_config(ap.parse_args(["--flow-log-interval", "0"]))


# --- the line format -----------------------------------------------------------------------

def _record(**kw):
    base = dict(interface_id="in0", srcaddr="10.10.0.10", dstaddr="198.18.0.2",
                srcport=40000, dstport=80, protocol=6, packets=12, bytes=3400,
                start=1_700_000_000, end=1_700_000_059)
    return FlowLogRecord(**{**base, **kw})


def test_v2_line_has_the_fourteen_fields_in_awss_order():
    line = _record().to_v2()
    assert line.split() == ["2", "000000000000", "in0", "10.10.0.10", "198.18.0.2", "40000",
                            "80", "6", "12", "3400", "1700000000", "1700000059", "ACCEPT",
                            "OK"]
    assert len(flowlogs.V2_FIELDS) == 14


@pytest.mark.parametrize("record", [
    _record(), _record(action="REJECT", protocol=17),
    _record(packets=None, bytes=None, action=None, log_status="SKIPDATA")])
def test_v2_and_json_lines_parse_back(record):
    assert parse_line(record.to_v2()) == record
    assert parse_line(record.to_json()) == record
    skip = _record(packets=None, bytes=None, action=None, log_status="SKIPDATA").to_v2()
    assert skip.split()[8:10] == ["-", "-"] and skip.split()[12:] == ["-", "SKIPDATA"]


@pytest.mark.parametrize("bad", ["", "hello", "3 000 in0 a b 1 2 6 1 1 1 1 ACCEPT OK",
                                 "2 000 in0 a b 1 2 6 1 1 1 1 ACCEPT", '{"version": 2}',
                                 "2 000 in0 a b x 2 6 1 1 1 1 ACCEPT OK"])
def test_a_line_that_is_not_a_record_is_refused(bad):
    with pytest.raises(ValueError):
        parse_line(bad)


# --- aggregation ----------------------------------------------------------------------------

class Key(ctypes.Structure):
    _fields_ = [("src_ip", ctypes.c_uint8 * 4), ("dst_ip", ctypes.c_uint8 * 4),
                ("src_port", ctypes.c_uint8 * 2), ("dst_port", ctypes.c_uint8 * 2),
                ("proto", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 3)]


def key(src, dst, sport, dport, proto=17) -> Key:
    return Key.from_buffer_copy(struct.pack("!4s4sHHB3x", socket.inet_aton(src),
                                            socket.inet_aton(dst), sport, dport, proto))


class Value:
    def __init__(self, created_ns, packets=0, nbytes=0, ifindex=2, last_seen_ns=None):
        self.created_ns, self.packets, self.bytes = created_ns, packets, nbytes
        self.in_ifindex, self.last_seen_ns = ifindex, last_seen_ns or created_ns


class Table(dict):
    """bytes of the key -> (key, value)"""
    def items_lookup_batch(self):
        return list(self.values())


class FakeDp:
    """Flow tables keyed by Key bytes -> (Key, Value)."""

    def __init__(self):
        self.tables = {"flows": Table(), "pending": Table()}

    def table(self, name):
        if name not in self.tables:
            raise KeyError(name)
        return self.tables[name]

    def put(self, k: Key, v: Value, table="flows"):
        self.tables[table][bytes(k)] = (k, v)

    def delete(self, k: Key):
        for t in self.tables.values():
            t.pop(bytes(k), None)


# one UDP flow: 10.10.0.10:5000 -> 198.18.0.2:53 translated to 198.18.0.100:1024
ORIG = key("10.10.0.10", "198.18.0.2", 5000, 53)
REPLY = key("198.18.0.2", "198.18.0.100", 53, 1024)
IN0, OUT0 = 2, 3
SEC = 1_000_000_000


def agg(clock):
    return FlowLogAggregator(FakeDp(), FlowLogConfig(interval_s=1),
                             ifname={IN0: "in0", OUT0: "out0"}.get, clock=lambda: clock[0])


def totals(records) -> dict:
    out = {}
    for r in records:
        if r.log_status == "OK":
            k = (r.interface_id, r.srcaddr, r.srcport, r.dstaddr, r.dstport)
            p, b = out.get(k, (0, 0))
            out[k] = (p + r.packets, b + r.bytes)
    return out


def event(etype, ts_ns, created_ns, this=(0, 0, IN0), twin=(0, 0, OUT0), reply=False) -> bytes:
    rec = FlowRecord("10.10.0.10", "198.18.0.2", 5000, 53, 17, "198.18.0.100", "198.18.0.2",
                     1024, 53, FlowKind.NAT_OUT, TcpState.NONE, 0, 1, 1, 0, 0,
                     (ts_ns - created_ns) // 1_000_000)
    ev = RawFlowEvent(type=int(etype), flags=EVF_REPLY if reply else 0, ts_ns=ts_ns,
                      packets=this[0], bytes=this[1], twin_packets=twin[0],
                      twin_bytes=twin[1], in_ifindex=this[2], twin_in_ifindex=twin[2])
    ctypes.memmove(ev.rec, rec.pack(), len(rec.pack()))
    return bytes(ev)


ORIG_ID = ("in0", "10.10.0.10", 5000, "198.18.0.2", 53)
REPLY_ID = ("out0", "198.18.0.2", 53, "198.18.0.100", 1024)


def test_deltas_per_interval_add_up_to_the_flows_counts_when_the_data_path_deletes_it():
    clock = [100 * SEC]
    a = agg(clock)
    created = clock[0]
    a.dp.put(ORIG, Value(created, 3, 300, IN0))
    a.dp.put(REPLY, Value(created, 2, 250, OUT0))
    clock[0] += SEC
    first = a.flush()
    assert totals(first) == {ORIG_ID: (3, 300), REPLY_ID: (2, 250)}
    a.dp.put(ORIG, Value(created, 10, 1000, IN0, clock[0]))
    clock[0] += SEC
    second = a.flush()
    assert totals(second) == {ORIG_ID: (7, 700)}       # the reply side sent nothing
    # more traffic, then the data path deletes the flow (the reply direction's packet met
    # it expired): its event carries both directions' final counts
    a.dp.delete(ORIG)
    a.dp.delete(REPLY)
    a.on_event(event(FlowEventType.FLOW_EXPIRED, clock[0], created, this=(5, 600, OUT0),
                     twin=(12, 1300, IN0), reply=True))
    clock[0] += SEC
    last = a.flush()
    assert totals(last) == {ORIG_ID: (2, 300), REPLY_ID: (3, 350)}
    # the flow's records add up to its final counts, each direction on its interface
    assert totals(first + second + last) == {ORIG_ID: (12, 1300), REPLY_ID: (5, 600)}
    clock[0] += SEC
    assert a.flush() == [] and a.counts["skipdata"] == 0


def test_a_flow_the_gc_deletes_is_closed_with_its_last_counts_and_a_reused_tuple_starts_at_0():
    clock = [100 * SEC]
    a = agg(clock)
    created = clock[0]
    a.dp.put(ORIG, Value(created, 1, 100, IN0))
    clock[0] += SEC
    assert totals(a.flush()) == {ORIG_ID: (1, 100)}
    # GC reads the entry (4 packets now), deletes it and reports it; a new flow on the
    # same tuple (created later) is in the table at the next read
    a.dp.delete(ORIG)
    a.on_deleted([(ORIG, Value(created, 4, 400, IN0))])
    a.dp.put(ORIG, Value(clock[0] + 1, 2, 20, IN0))
    clock[0] += SEC
    records = a.flush()
    assert totals(records) == {ORIG_ID: (3 + 2, 300 + 20)}   # one record per tuple+interface
    assert len([r for r in records if r.srcport == 5000]) == 1


def test_a_flow_created_and_deleted_between_two_reads_is_logged_whole():
    clock = [100 * SEC]
    a = agg(clock)
    a.on_event(event(FlowEventType.FLOW_REMOVED, clock[0] + SEC // 2, clock[0],
                     this=(4, 400, IN0), twin=(1, 60, OUT0)))
    clock[0] += SEC
    assert totals(a.flush()) == {ORIG_ID: (4, 400), REPLY_ID: (1, 60)}


def test_a_deletion_reported_after_the_read_that_missed_the_entry_is_still_counted():
    clock = [100 * SEC]
    a = agg(clock)
    created = clock[0]
    a.dp.put(ORIG, Value(created, 1, 100, IN0))
    clock[0] += SEC
    a.flush()
    a.dp.delete(ORIG)             # gone at this read; the GC's report comes afterwards
    clock[0] += SEC
    assert a.flush() == []
    a.on_deleted([(ORIG, Value(created, 6, 700, IN0))])
    clock[0] += SEC
    assert totals(a.flush()) == {ORIG_ID: (5, 600)}
    assert a.counts["skipdata"] == 0


def test_an_entry_gone_without_a_report_is_logged_as_skipdata_after_one_interval():
    clock = [100 * SEC]
    a = agg(clock)
    a.dp.put(ORIG, Value(clock[0], 1, 100, IN0))
    clock[0] += SEC
    a.flush()
    a.dp.delete(ORIG)
    clock[0] += SEC
    assert a.flush() == []
    clock[0] += SEC
    (skip,) = a.flush()
    assert (skip.log_status, skip.packets, skip.action, skip.srcport) == \
        ("SKIPDATA", None, None, 5000)
    assert a.counts["skipdata"] == 1


def test_baseline_logs_nothing_that_was_counted_before_the_aggregator_started():
    clock = [100 * SEC]
    a = agg(clock)
    a.dp.put(ORIG, Value(clock[0], 50, 5000, IN0))
    a.baseline()
    a.dp.put(ORIG, Value(clock[0], 53, 5300, IN0))
    clock[0] += SEC
    assert totals(a.flush()) == {ORIG_ID: (3, 300)}


def test_events_that_do_not_delete_are_not_queued():
    clock = [100 * SEC]
    a = agg(clock)
    for t in (FlowEventType.FLOW_CREATED, FlowEventType.FLOW_CLOSED,
              FlowEventType.FLOW_CONFIRMED, FlowEventType.FLOW_CHANGED):
        a.on_event(event(t, clock[0], clock[0], this=(9, 9, IN0)))
    clock[0] += SEC
    assert a.flush() == [] and a.counts["deletions"] == 0


# --- files ------------------------------------------------------------------------------------

def test_rotation_keeps_every_record_in_order(tmp_path):
    cfg = FlowLogConfig(dir=str(tmp_path), max_bytes=4096, backups=50)
    path = flowlogs.log_path(cfg.dir, "n1")
    w = FlowLogWriter(path, cfg)
    records = [_record(srcport=i) for i in range(600)]   # ~45 KB: about 11 files
    for i in range(0, 600, 7):
        w.write(records[i:i + 7])
    w.close()
    files = flowlogs.log_files(path)
    assert len(files) > 5, files
    assert all(os.path.getsize(f) <= 4096 for f in files)
    assert [parse_line(line) for line in read_lines(path)] == records


def _rotate(path: str, backups: int, new_text: str) -> None:
    """What RotatingFileHandler.doRollover does: the oldest backup deleted, each backup
    renamed one older, the current file to .1, a new current file."""
    if os.path.exists(f"{path}.{backups}"):
        os.remove(f"{path}.{backups}")
    for i in range(backups - 1, 0, -1):
        if os.path.exists(f"{path}.{i}"):
            os.rename(f"{path}.{i}", f"{path}.{i + 1}")
    os.rename(path, path + ".1")
    with open(path, "w", encoding="utf-8") as f:
        f.write(new_text)


@pytest.mark.parametrize("backups, after", [(3, 1), (3, 2), (3, 3), (9, 1), (9, 3)])
def test_a_rotation_while_the_files_are_read_fails_nothing_and_skips_nothing(
        tmp_path, monkeypatch, backups, after):
    """`hpctl flowlogs` reads every file while the agent may rotate them. A rotation
    between listing the files and opening the `after`-th (newest first) used to end the
    read with FileNotFoundError (CI, 2026-11-30: flow.log.4 deleted) or could skip the
    file whose name moved. Every line of every file that still exists afterwards is read
    once, oldest first; the one the rotation deletes (the backup count's oldest) may be
    read or not."""
    path = str(tmp_path / "flow.log")
    names = [f"{path}.{i}" for i in range(3, 0, -1)] + [path]     # .3 .2 .1 current
    for n, name in enumerate(names):
        with open(name, "w", encoding="utf-8") as f:
            f.write(f"line {n}\n")
            os.utime(name, ns=(n * 10**9, n * 10**9))   # written one after another
    import builtins
    real_open, opens = builtins.open, []

    def open_then_rotate(f, *a, **kw):
        opens.append(f)
        if len(opens) == after:
            _rotate(path, backups, "line 4\n")
        return real_open(f, *a, **kw)
    monkeypatch.setattr(builtins, "open", open_then_rotate)
    got = list(read_lines(path))
    monkeypatch.undo()
    deleted = {"line 0\n"} if backups == 3 else set()     # .3 was the oldest backup kept
    want = [f"line {n}\n" for n in range(5)]
    assert [line for line in got if line not in deleted] == \
        [line for line in want if line not in deleted]
    assert len(got) == len(set(got))


def test_a_listed_file_that_a_rotation_deletes_is_passed_over(tmp_path, monkeypatch):
    """Backups .3 and .1 (no .2) and the current file; a rotation (3 backups) before the
    first open deletes .3 and moves the others: the read passes over the vanished name
    (it used to raise FileNotFoundError) and reads every file left, once, oldest first."""
    path = str(tmp_path / "flow.log")
    for n, name in enumerate([path + ".3", path + ".1", path]):
        with open(name, "w", encoding="utf-8") as f:
            f.write(f"line {n}\n")
        os.utime(name, ns=(n * 10**9, n * 10**9))
    real_log_files, rotated = flowlogs.log_files, []

    def list_then_rotate(p):
        files = real_log_files(p)
        if not rotated:
            rotated.append(True)
            _rotate(path, 3, "line 3\n")
        return files
    monkeypatch.setattr(flowlogs, "log_files", list_then_rotate)
    assert list(read_lines(path)) == ["line 1\n", "line 2\n", "line 3\n"]


@pytest.mark.parametrize("same_mtime", [False, True], ids=["mtimes", "one-mtime"])
def test_reading_files_that_are_not_rotated_reads_each_once_oldest_first(tmp_path,
                                                                          same_mtime):
    """Oldest first by the files' names, also when their timestamps cannot tell (files
    rotated within one tick of a coarse clock)."""
    path = str(tmp_path / "flow.log")
    for n, name in enumerate([path + ".2", path + ".1", path]):
        with open(name, "w", encoding="utf-8") as f:
            f.write(f"a{n}\nb{n}\n")
        t = 10**9 if same_mtime else n * 10**9
        os.utime(name, ns=(t, t))
    assert list(read_lines(path)) == ["a0\n", "b0\n", "a1\n", "b1\n", "a2\n", "b2\n"]


def test_a_follower_sees_every_record_across_rotations(tmp_path):
    cfg = FlowLogConfig(dir=str(tmp_path), max_bytes=4096, backups=100, format="json")
    path = flowlogs.log_path(cfg.dir, "n1")
    w = FlowLogWriter(path, cfg)
    w.write([_record(srcport=0)])     # the file exists before the follower starts
    records = [_record(srcport=i) for i in range(1, 400)]
    stop = threading.Event()
    got = []
    opened = threading.Event()

    def follow():
        for line in follow_lines(path, stop, poll_s=0.01, opened=opened):
            got.append(parse_line(line))
            if len(got) == len(records):
                stop.set()

    t = threading.Thread(target=follow)
    t.start()
    assert opened.wait(30), "the follower did not open the log"
    for i in range(0, len(records), 5):
        w.write(records[i:i + 5])
    t.join(timeout=30)
    stop.set()
    w.close()
    assert got == records
    assert len(flowlogs.log_files(path)) > 3


def test_a_rotation_while_the_follower_lists_the_files_loses_nothing(tmp_path, monkeypatch):
    """The follower's file A was rotated to flow.log.1 and B is current. Right after the
    follower lists the files, the writer rotates again (A -> .2, B -> .1, new C): the
    names it listed now hold other files. It must still return B then C, not skip B."""
    path = str(tmp_path / "flow.log")

    def make(name, text):
        with open(name, "w", encoding="utf-8") as f:
            f.write(text)

    make(path + ".1", "a\n")
    make(path, "b\n")
    followed = open(path + ".1", encoding="utf-8")
    real_log_files = flowlogs.log_files
    rotations = []

    def listing_then_rotate(p):
        names = real_log_files(p)
        if not rotations:
            rotations.append(1)
            os.rename(path + ".1", path + ".2")
            os.rename(path, path + ".1")
            make(path, "c\n")
        return names

    monkeypatch.setattr(flowlogs, "log_files", listing_then_rotate)
    assert newer_texts(path, followed) == ["b\n", "c\n"]


def test_a_follower_whose_file_was_deleted_reads_every_file_left(tmp_path):
    path = str(tmp_path / "flow.log")
    for name, text in ((path + ".1", "b\n"), (path, "c\n"), (path + ".9", "a\n")):
        with open(name, "w", encoding="utf-8") as f:
            f.write(text)
    followed = open(path + ".9", encoding="utf-8")
    os.unlink(path + ".9")                # more rotations than backups
    assert newer_texts(path, followed) == ["b\n", "c\n"]


def newer_texts(path: str, followed) -> list[str]:
    """What the files _newer_files opens after the followed one hold; all closed after."""
    newer = flowlogs._newer_files(path, followed.fileno())
    try:
        return [h.read() for h in newer]
    finally:
        followed.close()
        for h in newer:
            h.close()


def rejected(ts_ns, size, ifindex=OUT0) -> bytes:
    """A FLOW_REJECTED event: a packet from 198.18.0.2:53 to the NAT IP's port 7000."""
    from hyperplane.observe.events import EVF_VERDICT_SHIFT
    from hyperplane.datapath.verdicts import Verdict
    ev = RawFlowEvent(type=int(FlowEventType.FLOW_REJECTED),
                      flags=int(Verdict.DROP_NO_FLOW) << EVF_VERDICT_SHIFT, ts_ns=ts_ns,
                      packets=1, bytes=size, in_ifindex=ifindex)
    k = bytes(key("198.18.0.2", "198.18.0.100", 53, 7000))
    ctypes.memmove(ev.rec, k, len(k))
    return bytes(ev)


def test_rejected_packets_are_one_reject_record_per_tuple_per_interval():
    clock = [100 * SEC]
    a = agg(clock)
    for i, size in enumerate((100, 200, 300)):
        a.on_event(rejected(clock[0] + i * 1000, size))
    clock[0] += SEC
    (r,) = a.flush()
    assert (r.action, r.log_status, r.interface_id, r.srcaddr, r.srcport, r.dstaddr,
            r.dstport, r.protocol, r.packets, r.bytes) == \
        ("REJECT", "OK", "out0", "198.18.0.2", 53, "198.18.0.100", 7000, 17, 3, 600)
    assert a.counts["rejected_packets"] == 3
    clock[0] += SEC
    assert a.flush() == []


def test_a_rejected_event_decodes_with_its_verdict():
    from hyperplane.datapath.verdicts import Verdict
    from hyperplane.observe.events import decode
    ev = decode(rejected(5, 100))
    assert ev.type == FlowEventType.FLOW_REJECTED and ev.verdict == Verdict.DROP_NO_FLOW
    assert (ev.record.src, ev.record.dport, ev.record.kind) == ("198.18.0.2", 7000, 0)


def test_the_reject_verdicts_are_the_cs():
    import re

    from hyperplane.datapath import cheaders
    from hyperplane.datapath.verdicts import Verdict
    text = cheaders.header_text("hyperplane.bpf.c")
    block = re.search(r"#define REJECT_VERDICTS \((.*?)\)\n\n", text, re.S).group(1)
    assert set(re.findall(r"1ULL << V_(\w+)", block)) == set(flowlogs.REJECT_VERDICTS)
    assert all(hasattr(Verdict, name) for name in flowlogs.REJECT_VERDICTS)
