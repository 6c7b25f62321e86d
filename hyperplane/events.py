"""Flow events from the data path's ring buffer (bpf/structs.h struct flow_event).

bcc cannot infer the type of a ring buffer filled with ringbuf_reserve, so the event is
assembled here from the flow table's own Key and Leaf classes (which bcc derives from the
C structs): only the three leading scalar fields are written out."""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

from .codec import PROTOCOL_NAMES, be16_to_port, be32_to_ip
from .verdicts import FlowEventType, FlowKind


def event_class(dp):
    flows = dp.table("flows")

    class FlowEvent(ctypes.Structure):
        _fields_ = [("type", ctypes.c_uint32), ("pad", ctypes.c_uint32),
                    ("ts_ns", ctypes.c_uint64), ("key", flows.Key), ("value", flows.Leaf)]

    return FlowEvent


@dataclass
class FlowEventRecord:
    type: FlowEventType
    kind: FlowKind
    proto: str
    src: str
    sport: int
    dst: str
    dport: int
    new_src: str
    new_sport: int
    ts_ns: int


def subscribe(dp, callback) -> None:
    """Call callback(FlowEventRecord) for each event, delivered by dp.bpf.ring_buffer_consume()
    (call it on a timer: the data path submits without wakeups, so a blocking poll would
    not return for new events)."""
    cls = event_class(dp)

    def on_event(_ctx, data, _size):
        ev = ctypes.cast(data, ctypes.POINTER(cls)).contents
        k, v = ev.key, ev.value
        callback(FlowEventRecord(
            FlowEventType(ev.type), FlowKind(v.kind), PROTOCOL_NAMES.get(k.proto, str(k.proto)),
            be32_to_ip(k.src_ip), be16_to_port(k.src_port), be32_to_ip(k.dst_ip),
            be16_to_port(k.dst_port), be32_to_ip(v.new_src_ip), be16_to_port(v.new_src_port),
            ev.ts_ns))

    dp.table("flow_events").open_ring_buffer(on_event)
