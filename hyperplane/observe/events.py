"""Flow events from the data path's ring buffer (bpf/structs.h struct flow_event).

bcc cannot infer the type of a ring buffer filled with ringbuf_reserve, so the event is
assembled here from the flow table's own Key and Leaf classes (which bcc derives from the
C structs): only the three leading scalar fields are written out."""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

from hyperplane.datapath.flows import Flow, flow_timeouts, decode
from hyperplane.datapath.verdicts import FlowEventType


def event_class(dp):
    flows = dp.table("flows")

    class RawFlowEvent(ctypes.Structure):
        _fields_ = [("type", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                    ("ts_ns", ctypes.c_uint64), ("key", flows.Key), ("value", flows.Leaf)]

    return RawFlowEvent


@dataclass
class FlowEvent:
    type: FlowEventType
    flow: Flow            # the entry as it was when the event was sent
    ts_ns: int


def subscribe(dp, callback) -> None:
    """Call callback(FlowEvent) for each event, delivered by dp.bpf.ring_buffer_consume()
    (call it on a timer: the data path submits without wakeups, so a blocking poll would
    not return for new events)."""
    cls = event_class(dp)
    timeouts = flow_timeouts(dp)

    def on_event(_ctx, data, _size):
        ev = ctypes.cast(data, ctypes.POINTER(cls)).contents
        callback(FlowEvent(FlowEventType(ev.type), decode(ev.key, ev.value, timeouts, ev.ts_ns),
                           ev.ts_ns))

    dp.table("flow_events").open_ring_buffer(on_event)
