#!/usr/bin/env python3
"""What the Python side of reading the event ring costs per CONFIRMED event, as the agent
subscribes (the fleet member's replication; the flow logs for deletions and rejections):

  callback  the reader before 2026-11-30 evening: libbpf's ring reader calls back once per
            event (ctypes.string_at of the event, then the member's per-event check). The
            ctypes callback itself is left out, so this is a lower bound for it.
  batch     EventHub now: one read of 8,192 events (ring.parse of the copied bytes, as
            MappedRing.read does), handed to the member as a RingBatch
            (member.replicated_records: columns, no Python per event) and filtered by type
            for the flow logs.

No data path is needed: the events are built here. Median of 5 runs of N events.

    .venv/bin/python bench/event_hub_bench.py
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ctypes
import statistics
import time

from hyperplane.datapath import ring
from hyperplane.datapath import settings
from hyperplane.datapath.verdicts import FlowEventType
from hyperplane.fleet.member import REPLICATED, _FLAGS_OFF, replicated_records
from hyperplane.observe import events, flowlogs
from hyperplane.observe.events import EVENT_SIZE, REC_OFFSET, RECORD_SIZE, RawFlowEvent
from hyperplane.observe.flowlogs import FlowLogAggregator, FlowLogConfig

N = 8192 * 25
raw = bytearray(bytes(RawFlowEvent(type=int(FlowEventType.FLOW_CONFIRMED))))
raw[REC_OFFSET + _FLAGS_OFF] = 1                       # confirmed: replicated
raw = bytes(raw)
buf = ctypes.create_string_buffer(raw, len(raw))
ptr = ctypes.addressof(buf)
out = bytearray()


def member_per_event(etype, rec):            # the member's per-event check before
    if etype in REPLICATED and rec[_FLAGS_OFF] & 1:
        out.extend(rec)


def callback_path():
    for _ in range(N):
        r = ctypes.string_at(ptr, REC_OFFSET + RECORD_SIZE)
        member_per_event(int.from_bytes(r[:4], "little"), r[REC_OFFSET:])


chunk = (EVENT_SIZE.to_bytes(4, "little") + bytes(4) + raw).ljust(
    ring.stride_of(EVENT_SIZE), b"\0") * 8192


class _Reads:
    fd = -1

    def read(self):
        return ring.parse(chunk, EVENT_SIZE)[0]


settings.set_flags = lambda *a: None             # no data path here
hub = events.EventHub(None, ring_reader=_Reads())
hub.subscribe_batches(lambda b: out.extend(replicated_records(b)[0]))
agg = FlowLogAggregator(None, FlowLogConfig())
hub.subscribe_events(agg.on_event, types=flowlogs._DELETING | {flowlogs._REJECTED})
hub.MAX_READS = 1


def batch_path():
    for _ in range(N // 8192):
        hub.consume()


for name, fn in (("callback", callback_path), ("batch", batch_path)):
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) / N * 1e6)
        assert len(out) == N * RECORD_SIZE, "every event's record replicated"
        out.clear()
    print(name, f"{statistics.median(ts):.3f} us/event")

print(f"load average {os.getloadavg()[0]:.1f}")
