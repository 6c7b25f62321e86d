"""TCP rules of the data path (issue 6, sections 2 and 5), both hooks:

- a RST is accepted only when plausible (conntrack's rule): its sequence number inside the
  window the other side advertised last, scaled when both SYNs negotiated window scaling;
  in SYN_SENT a RST|ACK must acknowledge the SYN. An implausible RST is DROP_TCP_INVALID
  and the flow goes on;
- a half-closed connection (one FIN) keeps the established idle timeout (AWS: 350 s);
- a flow whose SYN-ACK this node did not see is established (and confirmed) by the
  client's ACK;
- unconfirmed flows live in `pending` and move to `flows` when confirmed."""
from __future__ import annotations

import time
from dataclasses import dataclass

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from bpf_env import CLIENT, INET, NAT_IP
from flowkit import (ISN_CLIENT, ISN_SERVER, client_tcp, flow_table_problems, nat_handshake,
                     nat_port_of, server_tcp, table_len)
from hyperplane.datapath.flows import list_flows
from hyperplane.datapath.verdicts import Verdict
from packets import from_client, from_inet

# after nat_handshake(data=True): the client's next sequence number and the server's
C_NEXT, S_NEXT = ISN_CLIENT + 101, ISN_SERVER + 1
RANDOM_SEQ = 0x7A5C3E11


def states(e) -> set:
    return {f.tcp_state for f in list_flows(e.dp, proto="tcp")}


def assert_flow_goes_on(e, port):
    """Both directions of the connection still pass, and it is established."""
    assert e.run(client_tcp(40000, "PA", C_NEXT, S_NEXT, payload=b"more"))[0] == \
        Verdict.TX_NAT_OUT
    assert e.run(server_tcp(port, "PA", S_NEXT, C_NEXT + 4, payload=b"ok"), "out0")[0] == \
        Verdict.TX_NAT_IN
    assert states(e) == {"ESTABLISHED"}


@dataclass
class RstCase:
    name: str
    handshake: dict       # nat_handshake keywords (window scaling, windows)
    from_server: bool
    seq: int              # the RST's sequence number
    accepted: bool


# Without scaling the client advertised 64240 bytes from S_NEXT and the server 65535 from
# C_NEXT. With wscale 7 on both SYNs the client's window 500 means 64000 bytes and the
# server's 1000 means 128000; with the option on one SYN only, no scaling (RFC 7323).
SCALED = dict(client_wscale=7, server_wscale=7, client_window=500, server_window=1000)
ONE_SIDED = dict(client_wscale=7, client_window=500, server_window=1000)
RSTS = [
    RstCase("server-random-seq", {}, True, RANDOM_SEQ, False),
    RstCase("client-random-seq", {}, False, RANDOM_SEQ, False),
    RstCase("server-at-the-window-start", {}, True, S_NEXT, True),
    RstCase("server-at-the-window-end", {}, True, S_NEXT + 64239, True),
    RstCase("server-just-past-the-window", {}, True, S_NEXT + 64240, False),
    RstCase("server-before-the-window", {}, True, S_NEXT - 1, False),
    RstCase("client-in-the-window", {}, False, C_NEXT + 1000, True),
    RstCase("client-just-past-the-window", {}, False, C_NEXT + 65535, False),
    RstCase("scaled-server-inside-the-scaled-window", SCALED, True, S_NEXT + 60000, True),
    RstCase("scaled-server-past-the-scaled-window", SCALED, True, S_NEXT + 64000, False),
    RstCase("scaled-client-inside-the-scaled-window", SCALED, False, C_NEXT + 127999, True),
    RstCase("scaled-client-past-the-scaled-window", SCALED, False, C_NEXT + 130000, False),
    RstCase("one-sided-wscale-is-not-scaled", ONE_SIDED, True, S_NEXT + 600, False),
    RstCase("one-sided-wscale-unscaled-window", ONE_SIDED, True, S_NEXT + 499, True),
]


@pytest.mark.parametrize("case", RSTS, ids=lambda c: c.name)
def test_rst_is_judged_against_the_window(e, case):
    port = nat_handshake(e, **case.handshake)
    ignored = e.stats()["RST_IGNORED"]
    if case.from_server:
        rst, iface = server_tcp(port, "R", case.seq), "out0"
        passed = Verdict.TX_NAT_IN
    else:
        rst, iface = client_tcp(40000, "R", case.seq), "in0"
        passed = Verdict.TX_NAT_OUT
    verdict, action, _ = e.run(rst, iface)
    if case.accepted:
        assert verdict == passed
        assert states(e) == {"CLOSED"}, "an accepted RST closes the flow"
        assert e.stats()["FLOW_CLOSED"] == 1
    else:
        assert (verdict, action) == (Verdict.DROP_TCP_INVALID, "XDP_DROP")
        assert e.stats()["RST_IGNORED"] == ignored + 1
        assert_flow_goes_on(e, port)
    assert flow_table_problems(e.dp) == []


@pytest.mark.parametrize("ack,accepted", [(ISN_CLIENT + 1, True), (ISN_CLIENT, False),
                                          (ISN_CLIENT + 2, False), (RANDOM_SEQ, False)],
                         ids=["acks-the-syn", "acks-before-it", "acks-past-it", "random-ack"])
def test_rst_ack_in_syn_sent_must_acknowledge_the_syn(e, ack, accepted):
    """Before the server said anything, its RST|ACK is believed only if it acknowledges
    exactly the SYN (RFC 793's SYN-SENT rule)."""
    verdict, _, out = e.run(client_tcp(40000, "S", ISN_CLIENT))
    port = nat_port_of(out)
    verdict, _, _ = e.run(server_tcp(port, "RA", 0, ack), "out0")
    if accepted:
        assert verdict == Verdict.TX_NAT_IN
        assert states(e) == {"CLOSED"}
    else:
        assert verdict == Verdict.DROP_TCP_INVALID
        assert states(e) == {"SYN_SENT"}
        # the real SYN-ACK still opens the connection
        assert e.run(server_tcp(port, "SA", ISN_SERVER, ISN_CLIENT + 1), "out0")[0] == \
            Verdict.TX_NAT_IN
        assert states(e) == {"ESTABLISHED"}


# ---- timeouts and states ------------------------------------------------------------------

def test_half_closed_connection_keeps_the_established_timeout(e):
    """One FIN: the connection is half-closed, still open (AWS's 350 s idle rule), so the
    closing timeout (1 s here) does not end it; after the second FIN it does."""
    e.set_timeouts(tcp_established=3600, tcp_closing=1)
    port = nat_handshake(e)
    assert e.run(client_tcp(40000, "FA", C_NEXT, S_NEXT))[0] == Verdict.TX_NAT_OUT
    assert states(e) == {"FIN_WAIT"}
    time.sleep(1.2)
    # the server goes on sending (and acknowledges the FIN)
    verdict, _, out = e.run(server_tcp(port, "PA", S_NEXT, C_NEXT + 1, payload=b"tail"), "out0")
    assert verdict == Verdict.TX_NAT_IN and Ether(out)[IP].dst == CLIENT
    assert e.run(client_tcp(40000, "A", C_NEXT + 1, S_NEXT + 4))[0] == Verdict.TX_NAT_OUT
    assert e.run(server_tcp(port, "FA", S_NEXT + 4, C_NEXT + 1), "out0")[0] == Verdict.TX_NAT_IN
    assert states(e) == {"CLOSED"}
    time.sleep(1.2)
    late = server_tcp(port, "A", S_NEXT + 5, C_NEXT + 1)
    assert e.run(late, "out0")[0] == Verdict.DROP_NO_FLOW
    assert e.gw_metrics()["IdleTimeoutCount"] == 1


def test_client_ack_without_a_seen_syn_ack_establishes_and_confirms(e):
    """Another node saw the SYN-ACK: the client's ACK establishes the flow here (its
    timeout is the established one, not the half-open one) and confirms it into `flows`."""
    e.set_timeouts(tcp_syn=1, tcp_established=3600)
    verdict, _, out = e.run(client_tcp(40000, "S", ISN_CLIENT))
    port = nat_port_of(out)
    assert (table_len(e.dp, "pending"), table_len(e.dp, "flows")) == (2, 0)
    assert e.run(client_tcp(40000, "A", ISN_CLIENT + 1, ISN_SERVER + 1))[0] == Verdict.TX_NAT_OUT
    assert states(e) == {"ESTABLISHED"}
    assert (table_len(e.dp, "pending"), table_len(e.dp, "flows")) == (0, 2)
    time.sleep(1.2)  # past the half-open timeout
    verdict, _, out = e.run(server_tcp(port, "PA", ISN_SERVER + 1, ISN_CLIENT + 1,
                                       payload=b"hello"), "out0")
    assert verdict == Verdict.TX_NAT_IN and Ether(out)[IP].dst == CLIENT
    assert flow_table_problems(e.dp) == []


def _udp_out(e):
    return e.run(from_client(IP(src=CLIENT, dst=INET) / UDP(sport=40000, dport=53) / b"q"))


# Each step: a packet, and where the flow's two entries are afterwards (pending, flows).
# A reply alone does not confirm (a server answers spoofed packets too): the originator's
# next packet after it does (conntrack's assured; TCP: the ACK ending the handshake).
CONFIRM_STEPS = {
    "tcp": [("syn", (2, 0)), ("syn-ack", (2, 0)), ("ack", (0, 2)), ("data", (0, 2))],
    "udp": [("first", (2, 0)), ("reply", (2, 0)), ("second", (0, 2)), ("reply", (0, 2))],
}


@pytest.mark.parametrize("proto", list(CONFIRM_STEPS))
def test_unconfirmed_flows_live_in_pending_until_confirmed(e, proto):
    port = None
    for step, where in CONFIRM_STEPS[proto]:
        if proto == "tcp":
            if step == "syn":
                verdict, _, out = e.run(client_tcp(40000, "S", ISN_CLIENT))
                port = nat_port_of(out)
            elif step == "syn-ack":
                verdict, _, _ = e.run(server_tcp(port, "SA", ISN_SERVER, ISN_CLIENT + 1), "out0")
            elif step == "ack":
                verdict, _, _ = e.run(client_tcp(40000, "A", ISN_CLIENT + 1, ISN_SERVER + 1))
            else:
                verdict, _, _ = e.run(client_tcp(40000, "PA", ISN_CLIENT + 1, ISN_SERVER + 1,
                                                 payload=b"GET /"))
        else:
            if step in ("first", "second"):
                verdict, _, out = _udp_out(e)
                port = port or nat_port_of(out)
            else:
                verdict, _, _ = e.run(from_inet(IP(src=INET, dst=NAT_IP) /
                                                UDP(sport=53, dport=port) / b"a"), "out0")
        assert verdict in (Verdict.TX_NAT_OUT, Verdict.TX_NAT_IN), (step, verdict)
        assert (table_len(e.dp, "pending"), table_len(e.dp, "flows")) == where, step
        assert flow_table_problems(e.dp) == [], step
    assert e.stats()["FLOW_CONFIRMED"] == 1
