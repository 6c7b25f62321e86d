#!/usr/bin/env python3
"""What reading the event ring through the agent's EventHub (one reader fanning out to the
fleet member, the flow logs and the followers' publisher) costs per event, against the
fleet member's own reader before the hub (subscribe_records calling it directly). The
libbpf ring callback is the same for both and left out: each variant is called with a
pointer to one CONFIRMED event, N times, median of 5 runs.

    .venv/bin/python bench/event_hub_bench.py
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import ctypes
import statistics
import time

from hyperplane.observe import events
from hyperplane.observe.events import RawFlowEvent, REC_OFFSET, RECORD_SIZE
from hyperplane.observe import flowlogs
from hyperplane.observe.flowlogs import FlowLogAggregator, FlowLogConfig
from hyperplane.datapath.verdicts import FlowEventType

N = 200_000
raw = bytes(RawFlowEvent(type=int(FlowEventType.FLOW_CONFIRMED)))
buf = ctypes.create_string_buffer(raw, len(raw))
ptr = ctypes.addressof(buf)
out = bytearray()
from hyperplane.fleet.member import REPLICATED, _FLAGS_OFF  # noqa: E402


def member(etype, rec):            # what FleetMember._on_event does
    if etype in REPLICATED and rec[_FLAGS_OFF] & 1:
        out.extend(rec)

# before: subscribe_records' on_raw calling the member
def old_on_raw(data, size):
    r = ctypes.string_at(data, REC_OFFSET + RECORD_SIZE)
    member(int.from_bytes(r[:4], "little"), r[REC_OFFSET:])

hub = events.EventHub.__new__(events.EventHub)
hub._record_subs, hub._event_subs, hub.events, hub.subscriber_errors = [member], (), 0, 0
# as the agent subscribes: the flow logs to the event types they use; the followers'
# publisher only while a follower is connected (none here)
agg = FlowLogAggregator(None, FlowLogConfig())
hub.subscribe_events(agg.on_event, types=flowlogs._DELETING | {flowlogs._REJECTED})


def new_on_raw(data, size):
    hub._on_raw(ctypes.string_at(data, size))

for name, fn in (("direct", old_on_raw), ("hub", new_on_raw)):
    ts = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(N):
            fn(ptr, len(raw))
        ts.append((time.perf_counter() - t0) / N * 1e6)
        out.clear()
    print(name, f"{statistics.median(ts):.2f} us/event")

print(f"load average {os.getloadavg()[0]:.1f}")
