"""The ring buffer carries flow created / closed / expired events for the controller."""
from scapy.layers.inet import IP, TCP

from bpf_env import CLIENT, INET, NAT_IP
from hyperplane.observe.events import subscribe
from hyperplane.datapath.verdicts import FlowEventType, FlowKind
from packets import from_client, tcp_syn


def test_created_and_closed_events(e):
    events = []
    subscribe(e.dp, lambda ev: events.append((ev.type, ev.record.kind, ev.record.src,
                                              ev.record.sport, ev.record.new_src)))
    e.dp.bpf.ring_buffer_consume()  # drain what earlier tests left
    events.clear()
    e.run(tcp_syn(sport=46000))
    e.run(from_client(IP(src=CLIENT, dst=INET) / TCP(sport=46000, dport=80, flags="R")))
    e.dp.bpf.ring_buffer_consume()
    assert events == [
        (FlowEventType.FLOW_CREATED, FlowKind.NAT_OUT, CLIENT, 46000, NAT_IP),
        (FlowEventType.FLOW_CLOSED, FlowKind.NAT_OUT, CLIENT, 46000, NAT_IP),
    ], events
    assert e.stats()["EVENT_LOST"] == 0
