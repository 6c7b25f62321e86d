"""hpctl flowlogs and hpctl flows --follow without a lab: help, clear errors (exit status,
one sentence, no traceback), reading a log in both formats, the follow filters, and the
agent's event publisher carrying events to a follower."""
import ctypes
import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from hyperplane.datapath.verdicts import FlowEventType, FlowKind, TcpState
from hyperplane.fleet.records import FlowRecord
from hyperplane.observe import flowlogs
from hyperplane.observe.events import RawFlowEvent

HPCTL = os.path.join(os.path.dirname(sys.executable), "hpctl")


def hpctl(*args, env=None):
    return subprocess.run([HPCTL, *args], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})


@pytest.mark.parametrize("args", [["flowlogs", "--help"], ["flows", "--help"]])
def test_help(args):
    r = hpctl(*args)
    assert r.returncode == 0 and "--follow" in r.stdout, r.stderr


def test_follow_without_an_agent_says_so_and_exits_4():
    r = hpctl("flows", "--follow", "--node", "nosuchnode")
    assert r.returncode == 4
    assert r.stderr.startswith("hpctl: no agent runs for node nosuchnode") and \
        "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1


def test_flowlogs_without_a_log_says_so_and_exits_4(tmp_path):
    r = hpctl("flowlogs", "--node", "nosuchnode", "--dir", str(tmp_path))
    assert r.returncode == 4 and "no flow log at" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args", [["flows", "--node", "n", "--event", "created"],
                                  ["flowlogs", "--node", "n", "--format", "csv"],
                                  ["agent", "run", "--node", "n", "--flow-log-interval", "601"]])
def test_misuse_is_a_usage_error(args):
    r = hpctl(*args)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr


def test_flowlogs_reads_every_file_in_either_format(tmp_path):
    cfg = flowlogs.FlowLogConfig(dir=str(tmp_path), max_bytes=4096, backups=20)
    w = flowlogs.FlowLogWriter(flowlogs.log_path(cfg.dir, "n1"), cfg)
    records = [flowlogs.FlowLogRecord("in0", "10.10.0.10", "198.18.0.2", 1000 + i, 53, 17,
                                      i + 1, 100 * (i + 1), 1_700_000_000, 1_700_000_001)
               for i in range(120)]
    w.write(records)
    w.close()
    assert len(flowlogs.log_files(w.path)) > 1
    r = hpctl("flowlogs", "--node", "n1", "--dir", str(tmp_path), "--json")
    assert r.returncode == 0, r.stderr
    assert [flowlogs.FlowLogRecord(**d) for d in json.loads(r.stdout)] == records
    r = hpctl("flowlogs", "--node", "n1", "--dir", str(tmp_path), "--tail", "3")
    assert [flowlogs.parse_line(line) for line in r.stdout.splitlines()] == records[-3:]
    r = hpctl("flowlogs", "--node", "n1", "--dir", str(tmp_path), "--format", "json",
              "--tail", "1")
    assert json.loads(r.stdout) == records[-1].to_dict()


EVENT = {"event": "created", "kind": "NAT_OUT", "proto": "tcp", "src": "10.10.0.10",
         "sport": 40000, "dst": "198.18.0.2", "dport": 80, "new_src": "198.18.0.100",
         "new_sport": 1024, "new_dst": "198.18.0.2", "new_dport": 80, "resource": 0}


@pytest.mark.parametrize("filters,want", [
    ({}, True), ({"events": {"created"}}, True), ({"events": {"closed"}}, False),
    ({"proto": "udp"}, False), ({"address": "198.18.0.100"}, True),
    ({"address": "10.10.0.11"}, False), ({"port": 1024}, True), ({"port": 81}, False),
    ({"resource": 0}, True), ({"resource": 1}, False), ({"kind": "nat_out"}, True),
    ({"kind": "nat_in"}, True), ({"kind": "nlb_in"}, False)])
def test_follow_filters(filters, want):
    from hpctl.follow import matches
    assert matches(EVENT, **filters) is want


class FakeHub:
    def __init__(self):
        self.subs = []

    def subscribe_events(self, cb, types=None):
        self.subs.append(cb)

    def unsubscribe_events(self, cb):
        self.subs.remove(cb)


def _raw(etype, sport) -> bytes:
    rec = FlowRecord("10.10.0.10", "198.18.0.2", sport, 80, 6, "198.18.0.100", "198.18.0.2",
                     1024, 80, FlowKind.NAT_OUT, TcpState.SYN_SENT, 0, 0, 0, 0, 0, 0).pack()
    ev = RawFlowEvent(type=int(etype), ts_ns=1, packets=1, bytes=74)
    ctypes.memmove(ev.rec, rec, len(rec))
    return bytes(ev)


def test_the_publisher_sends_each_event_to_a_follower_as_a_json_line(tmp_path):
    from hyperplane.observe.follow import EventPublisher
    hub = FakeHub()
    pub = EventPublisher(str(tmp_path / "ev.sock"), hub)
    try:
        c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        c.connect(str(tmp_path / "ev.sock"))
        deadline = time.monotonic() + 10
        while pub.counts["followers"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pub.counts["followers"] == 1
        for i, t in enumerate([FlowEventType.FLOW_CREATED, FlowEventType.FLOW_CLOSED]):
            hub.subs[0](_raw(t, 40000 + i))
        c.settimeout(10)
        buf = b""
        while buf.count(b"\n") < 2:
            buf += c.recv(65536)
        got = [json.loads(line) for line in buf.splitlines()]
        assert [(e["event"], e["sport"], e["bytes"]) for e in got] == \
            [("created", 40000, 74), ("closed", 40001, 74)]
        c.close()
        # the agent notices the follower left at its next event: then it is unsubscribed
        deadline = time.monotonic() + 10
        while hub.subs and time.monotonic() < deadline:
            hub.subs[0](_raw(FlowEventType.FLOW_CHANGED, 40002)) if hub.subs else None
            time.sleep(0.01)
        assert not hub.subs and pub.counts["followers"] == 0
    finally:
        pub.close()
    assert not os.path.exists(tmp_path / "ev.sock")
