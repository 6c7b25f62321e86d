"""Helpers of the data-path tests of issue 6 (ingress, TCP rules, ICMP from the node,
concurrency, ports): opening flows, a load balancer configuration, and the invariants of
the flow and reservation tables."""
from __future__ import annotations

import collections
import socket

import pytest

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from bpf_env import CLIENT, INET, MAC, NAT_IP, TARGET_MAC, TARGETS, VIP
from hyperplane.nlb.config import NlbConfig
from hyperplane.datapath.verdicts import FlowKind, Verdict
from packets import from_client, from_inet

ISN_CLIENT, ISN_SERVER = 1000, 5000


def nlb_config(targets=TARGETS, extra_listeners=()) -> NlbConfig:
    """TCP :80 -> web (targets :8080), UDP :53 -> dns (targets :5353); extra_listeners are
    more (port, protocol, group) on the VIP."""
    listeners = [{"lb": "lb", "vip": VIP, "port": 80, "protocol": "TCP", "target_group": "web"},
                 {"lb": "lb", "vip": VIP, "port": 53, "protocol": "UDP", "target_group": "dns"}]
    listeners += [{"lb": "lb", "vip": VIP, "port": port, "protocol": proto, "target_group": tg}
                  for port, proto, tg in extra_listeners]
    return NlbConfig.from_dict({
        "load_balancers": [{"name": "lb", "lb_id": 0}],
        "listeners": listeners,
        "target_groups": [
            {"name": "web", "targets": [{"ip": t, "port": 8080, "state": "healthy"}
                                        for t in targets]},
            {"name": "dns", "targets": [{"ip": t, "port": 5353, "state": "healthy"}
                                        for t in targets]}],
    })


@pytest.fixture
def nlb(e):
    """The load balancer of nlb_config() on the test's data path (gone afterwards)."""
    from hyperplane.nlb.dataplane import NlbDataplane
    plane = NlbDataplane(e.dp)
    plane.apply(nlb_config())
    yield plane
    plane.apply(NlbConfig())


def from_target(ip, l4, dst=INET):
    return Ether(src=TARGET_MAC, dst=MAC["tg0"]) / IP(src=ip, dst=dst) / l4


def client_tcp(cport, flags, seq, ack=0, payload=b"", window=64240, options=(), src=CLIENT,
               dst=INET, dport=80, ttl=64):
    return from_client(IP(src=src, dst=dst, ttl=ttl) /
                       TCP(sport=cport, dport=dport, flags=flags, seq=seq, ack=ack,
                           window=window, options=list(options)) / payload)


def server_tcp(port, flags, seq, ack=0, payload=b"", window=65535, options=(), src=INET,
               sport=80, ttl=64):
    return from_inet(IP(src=src, dst=NAT_IP, ttl=ttl) /
                     TCP(sport=sport, dport=port, flags=flags, seq=seq, ack=ack, window=window,
                         options=list(options)) / payload)


def nat_port_of(out: bytes) -> int:
    p = Ether(out)
    return p[TCP].sport if TCP in p else p[UDP].sport


def nat_handshake(e, cport=40000, *, data=True, client_wscale=None, server_wscale=None,
                  client_window=64240, server_window=65535):
    """SYN, SYN-ACK, ACK (and, with data, 100 bytes from the client and the server's ACK of
    them) through the NAT; returns the NAT port. Sequence numbers: the client's next is
    ISN_CLIENT + 1 (+100 with data), the server's ISN_SERVER + 1."""
    copt = [("WScale", client_wscale)] if client_wscale is not None else []
    sopt = [("WScale", server_wscale)] if server_wscale is not None else []
    verdict, _, out = e.run(client_tcp(cport, "S", ISN_CLIENT, options=copt))
    assert verdict == Verdict.TX_NAT_OUT
    port = nat_port_of(out)
    steps = [(server_tcp(port, "SA", ISN_SERVER, ISN_CLIENT + 1, options=sopt), "out0"),
             (client_tcp(cport, "A", ISN_CLIENT + 1, ISN_SERVER + 1, window=client_window),
              "in0")]
    if data:
        steps += [(client_tcp(cport, "PA", ISN_CLIENT + 1, ISN_SERVER + 1, payload=b"x" * 100,
                              window=client_window), "in0"),
                  (server_tcp(port, "A", ISN_SERVER + 1, ISN_CLIENT + 101,
                              window=server_window), "out0")]
    for pkt, iface in steps:
        verdict, _, _ = e.run(pkt, iface)
        assert verdict in (Verdict.TX_NAT_OUT, Verdict.TX_NAT_IN), (pkt.summary(), verdict)
    return port


def table_len(dp, name) -> int:
    return sum(1 for _ in dp.table(name).keys())


# ---- table invariants -----------------------------------------------------------------

def ip_str(be32: int) -> str:
    return socket.inet_ntoa(int(be32).to_bytes(4, "little"))


def port_num(be16: int) -> int:
    return socket.ntohs(int(be16))


def key_tuple(k) -> tuple:
    return (int(k.src_ip), int(k.dst_ip), int(k.src_port), int(k.dst_port), int(k.proto))


def flow_table_problems(dp) -> list[str]:
    """What is wrong with the flow and reservation tables, as sentences ([] = nothing):
      - every entry's twin is in the same table and names it back, with the partner kind;
      - an entry translates its packets into its twin's key reversed;
      - no (NAT IP, NAT port, proto, dst IP, dst port) is held by two NAT flows;
      - every NAT flow this node created holds the reservation of its port, for itself
        (a replica installed from a record holds none, or the one the agent took when
        the port's block moved here);
      - every reservation belongs to a NAT flow that exists."""
    partner = {FlowKind.NAT_OUT: FlowKind.NAT_IN, FlowKind.NAT_IN: FlowKind.NAT_OUT,
               FlowKind.NLB_IN: FlowKind.NLB_OUT, FlowKind.NLB_OUT: FlowKind.NLB_IN}
    problems = []
    entries = {}
    for name in ("flows", "pending"):
        entries[name] = {key_tuple(k): v for k, v in dp.table(name).items()}
    for name, table in entries.items():
        for k, v in table.items():
            tw = key_tuple(v.twin)
            t = table.get(tw)
            if t is None:
                problems.append(f"{name}: entry {k} ({FlowKind(v.kind).name}): its twin {tw} "
                                f"is missing")
                continue
            if key_tuple(t.twin) != k:
                problems.append(f"{name}: entry {k}'s twin {tw} names {key_tuple(t.twin)} back")
            if partner.get(v.kind) != t.kind:
                problems.append(f"{name}: entry {k} kind {v.kind}, twin kind {t.kind}")
            translated_reversed = (int(v.new_dst_ip), int(v.new_src_ip), int(v.new_dst_port),
                                   int(v.new_src_port), k[4])
            if translated_reversed != tw:
                problems.append(f"{name}: entry {k} translates to the reverse of "
                                f"{translated_reversed}, its twin is {tw}")
    both = {**entries["pending"], **entries["flows"]}
    if len(both) != len(entries["pending"]) + len(entries["flows"]):
        problems.append("a key is in both flows and pending")
    holders = collections.defaultdict(list)
    for k, v in both.items():
        if v.kind == FlowKind.NAT_OUT:
            holders[(int(v.new_src_ip), int(v.new_src_port), k[4], int(v.new_dst_ip),
                     int(v.new_dst_port))].append(k)
    for pair, ks in holders.items():
        if len(ks) > 1:
            problems.append(f"NAT pair {pair} held by {len(ks)} flows: {ks}")
    resv = {(int(rk.dst_ip), int(rk.nat_ip), int(rk.dst_port), int(rk.nat_port), int(rk.proto)):
            key_tuple(rv.orig) for rk, rv in dp.table("nat_resv").items()}
    for (nat_ip, nat_port, proto, dst_ip, dst_port), ks in holders.items():
        owner = resv.get((dst_ip, nat_ip, dst_port, nat_port, proto))
        if owner is None and not both[ks[0]].created_here:
            continue    # a replica (a block that moves here has them reserved first)
        if owner is None:
            problems.append(f"NAT flow {ks[0]} holds no reservation of its port")
        elif owner not in ks:
            problems.append(f"NAT flow {ks[0]}'s port is reserved for {owner}")
    for (dst_ip, nat_ip, dst_port, nat_port, proto), orig in resv.items():
        f = both.get(orig)
        if f is None or f.kind != FlowKind.NAT_OUT:
            problems.append(f"reservation {ip_str(nat_ip)}:{port_num(nat_port)} -> "
                            f"{ip_str(dst_ip)}:{port_num(dst_port)} belongs to no flow ({orig})")
        elif (int(f.new_src_ip), int(f.new_src_port)) != (nat_ip, nat_port):
            problems.append(f"reservation {ip_str(nat_ip)}:{port_num(nat_port)} names flow "
                            f"{orig}, which uses another port")
    return problems


def assert_error_sums(data: bytes) -> None:
    """The checksums of an ICMP error the node wrote, on the raw bytes (scapy would rebuild
    a quoted L4 header cut short and get another sum): outer IPv4, ICMP over the whole
    message, quoted IPv4 header."""
    from packets import inet_sum
    ip = data[14:]
    ihl = (ip[0] & 0xf) * 4
    tot = int.from_bytes(ip[2:4], "big")
    assert inet_sum(ip[:ihl]) == 0, "outer IPv4 checksum"
    assert inet_sum(ip[ihl:tot]) == 0, "ICMP checksum"
    quote = ip[ihl + 8:tot]
    assert inet_sum(quote[:(quote[0] & 0xf) * 4]) == 0, "quoted IPv4 checksum"


# ---- flow events ----------------------------------------------------------------------

def drain_events(dp) -> list:
    """The flow events (hyperplane.observe.events.FlowEvent) waiting in dp's ring buffer,
    read through a consumer of its own that is gone afterwards: a ring buffer has one
    consumer position, and the first consumer a data path's bcc object registered (a test
    that called events.subscribe) would take every event of a later one."""
    import ctypes
    from bcc.libbcc import _RINGBUF_CB_TYPE, lib
    from hyperplane.observe.events import decode
    from hyperplane.datapath.verdicts import FlowEventType
    out = []

    def on_event(_ctx, data, size):
        ev = decode(ctypes.string_at(data, size))
        if ev.type != FlowEventType.FLOW_REJECTED:   # a dropped packet's tuple, no flow
            out.append(ev)
        return 0

    cb = _RINGBUF_CB_TYPE(on_event)
    manager = lib.bpf_new_ringbuf(dp.table("flow_events").map_fd, cb, None)
    assert manager, "could not open the flow events ring buffer"
    try:
        lib.bpf_consume_ringbuf(manager)
    finally:
        lib.bpf_free_ringbuf(manager)
    return out
