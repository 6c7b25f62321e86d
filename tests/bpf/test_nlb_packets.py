"""Load balancer data path, packet by packet, through BPF_PROG_TEST_RUN."""
from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, UDPerror
from scapy.layers.l2 import Ether

from bpf_env import INET, INET2, INET_MAC, MAC, TARGET_MAC, TARGETS, VIP
from hyperplane.nlb.dataplane import NlbDataplane
from hyperplane.nlb.config import NlbConfig
from hyperplane.datapath.verdicts import Verdict
from packets import assert_checksums, from_inet


def config(targets=TARGETS, states=None, udp_targets=TARGETS):
    states = states or {}
    return NlbConfig.from_dict({
        "load_balancers": [{"name": "lb", "lb_id": 0}],
        "listeners": [{"lb": "lb", "vip": VIP, "port": 80, "protocol": "TCP", "target_group": "web"},
                      {"lb": "lb", "vip": VIP, "port": 53, "protocol": "UDP", "target_group": "dns"}],
        "target_groups": [
            {"name": "web", "targets": [{"ip": t, "port": 8080, "state": states.get(t, "healthy")}
                                        for t in targets]},
            {"name": "dns", "targets": [{"ip": t, "port": 5353, "state": "healthy"}
                                        for t in udp_targets]}],
    })


@pytest.fixture
def nlb(e):
    plane = NlbDataplane(e.dp)
    plane.apply(config())
    yield plane
    plane.apply(NlbConfig())  # no listeners, no targets


def from_target(ip, l4):
    return Ether(src=TARGET_MAC, dst=MAC["tg0"]) / IP(src=ip, dst=INET) / l4


def syn(sport=50000, src=INET, dport=80):
    return from_inet(IP(src=src, dst=VIP) / TCP(sport=sport, dport=dport, flags="S", seq=10))


def test_syn_goes_to_a_target_with_client_ip_kept(e, nlb):
    verdict, action, data = e.run(syn(), "out0")
    assert (verdict, action) == (Verdict.TX_NLB_IN, "XDP_REDIRECT")
    assert_checksums(data)
    p = Ether(data)
    assert (p.src, p.dst) == (MAC["tg0"], TARGET_MAC)
    assert p[IP].src == INET and p[IP].dst in TARGETS
    assert (p[TCP].sport, p[TCP].dport, p[TCP].flags) == (50000, 8080, "S")


def test_target_reply_comes_back_from_the_vip(e, nlb):
    _, _, data = e.run(syn(), "out0")
    target = Ether(data)[IP].dst
    reply = from_target(target, TCP(sport=8080, dport=50000, flags="SA", seq=99, ack=11))
    verdict, action, out = e.run(reply, "tg0")
    assert (verdict, action) == (Verdict.TX_NLB_OUT, "XDP_REDIRECT")
    assert_checksums(out)
    p = Ether(out)
    assert (p.src, p.dst) == (MAC["out0"], INET_MAC)
    assert (p[IP].src, p[IP].dst, p[TCP].sport, p[TCP].dport) == (VIP, INET, 80, 50000)


def test_connection_keeps_its_target_when_the_table_changes(e, nlb):
    chosen = {}
    for sport in range(51000, 51060):
        _, _, data = e.run(syn(sport=sport), "out0")
        chosen[sport] = Ether(data)[IP].dst
    assert len(set(chosen.values())) == 3, "60 connections all landed on fewer than 3 targets"
    # remove one target, add another: every existing connection stays where it was
    nlb.apply(config(targets=TARGETS[:2] + ["10.20.4.10"]))
    moved = []
    for sport, target in chosen.items():
        if target == TARGETS[2]:
            continue  # its target is gone; its flows were deleted
        ack = from_inet(IP(src=INET, dst=VIP) / TCP(sport=sport, dport=80, flags="A", seq=11))
        verdict, _, data = e.run(ack, "out0")
        assert verdict == Verdict.TX_NLB_IN
        if Ether(data)[IP].dst != target:
            moved.append(sport)
    assert not moved, f"connections moved target: {moved}"


def test_unhealthy_target_keeps_existing_flows_but_takes_no_new_ones(e, nlb):
    chosen = {}
    for sport in range(52000, 52030):
        _, _, data = e.run(syn(sport=sport), "out0")
        chosen[sport] = Ether(data)[IP].dst
    nlb.apply(config(states={TARGETS[0]: "unhealthy"}))
    for sport, target in chosen.items():
        ack = from_inet(IP(src=INET, dst=VIP) / TCP(sport=sport, dport=80, flags="A"))
        assert Ether(e.run(ack, "out0")[2])[IP].dst == target
    for sport in range(53000, 53060):
        _, _, data = e.run(syn(sport=sport), "out0")
        assert Ether(data)[IP].dst != TARGETS[0]


def test_all_unhealthy_fails_open(e, nlb):
    nlb.apply(config(states={t: "unhealthy" for t in TARGETS}))
    seen = {Ether(e.run(syn(sport=s), "out0")[2])[IP].dst for s in range(54000, 54060)}
    assert seen == set(TARGETS)


def test_udp_listener(e, nlb):
    q = from_inet(IP(src=INET2, dst=VIP) / UDP(sport=40000, dport=53) / b"query")
    verdict, _, data = e.run(q, "out0")
    assert verdict == Verdict.TX_NLB_IN
    assert_checksums(data)
    p = Ether(data)
    target = p[IP].dst
    assert target in TARGETS and (p[IP].src, p[UDP].dport) == (INET2, 5353)
    answer = Ether(src=TARGET_MAC, dst=MAC["tg0"]) / IP(src=target, dst=INET2) / \
        UDP(sport=5353, dport=40000) / b"answer"
    verdict, _, out = e.run(answer, "tg0")
    assert verdict == Verdict.TX_NLB_OUT
    assert_checksums(out)
    assert (Ether(out)[IP].src, Ether(out)[UDP].sport) == (VIP, 53)


def test_icmp_error_from_target_reaches_client_as_from_the_vip(e, nlb):
    q = from_inet(IP(src=INET, dst=VIP) / UDP(sport=40001, dport=53) / b"q")
    target = Ether(e.run(q, "out0")[2])[IP].dst
    embedded = IP(src=INET, dst=target, ttl=63) / UDP(sport=40001, dport=5353) / b"q"
    err = Ether(src=TARGET_MAC, dst=MAC["tg0"]) / IP(src=target, dst=INET) / \
        ICMP(type=3, code=3) / embedded
    verdict, _, data = e.run(err, "tg0")
    assert verdict == Verdict.TX_ICMP_ERROR
    assert_checksums(data)
    p = Ether(data)
    assert (p[IP].src, p[IP].dst) == (VIP, INET)
    assert (p[IPerror].src, p[IPerror].dst) == (INET, VIP)
    assert (p[UDPerror].sport, p[UDPerror].dport) == (40001, 53)


@pytest.mark.parametrize("name,packet,verdict", [
    ("unknown-port", lambda: syn(dport=443), Verdict.DROP_NO_LISTENER),
    ("ping-vip", lambda: from_inet(IP(src=INET, dst=VIP) / ICMP(type=8)), Verdict.PASS_LOCAL),
    ("non-syn-without-flow", lambda: from_inet(IP(src=INET, dst=VIP) /
                                               TCP(sport=1234, dport=80, flags="A")), Verdict.TX_RST),
    ("rst-without-flow", lambda: from_inet(IP(src=INET, dst=VIP) /
                                           TCP(sport=1234, dport=80, flags="R")),
     Verdict.DROP_TCP_NOT_SYN),
    ("gre-to-vip", lambda: from_inet(IP(src=INET, dst=VIP, proto=47) / b"gre!"),
     Verdict.DROP_UNKNOWN_PROTO),
])
def test_vip_packets_without_flow(e, nlb, name, packet, verdict):
    assert e.run(packet(), "out0")[0] == verdict


def test_empty_target_group_drops_with_no_target(e, nlb):
    nlb.apply(config(targets=[]))
    assert e.run(syn(), "out0")[0] == Verdict.DROP_NO_TARGET


def test_new_flow_and_reset_metrics(e, nlb):
    e.run(syn(sport=55000), "out0")
    e.run(from_inet(IP(src=INET, dst=VIP) / TCP(sport=1, dport=80, flags="A")), "out0")
    lid = nlb.state.listener_ids[(VIP, 80, 6)]
    stats = e.dp.table("lb_stats")[e.dp.table("lb_stats").Key(lid)]
    assert sum(c.new_flow for c in stats) == 1
    assert sum(c.tcp_elb_reset for c in stats) == 1
    assert sum(c.processed_packets for c in stats) == 1


def test_aws_named_load_balancer_metrics(e, nlb):
    """Two connections whose handshakes ended (the client's ACK confirms) are active; a
    third, only a SYN so far, is a new flow but not an active one."""
    from hyperplane.observe.metrics import load_balancer_metrics
    for sport in (56000, 56001):
        target = Ether(e.run(syn(sport=sport), "out0")[2])[IP].dst
        synack = from_target(target, TCP(sport=8080, dport=sport, flags="SA", seq=99, ack=11))
        assert e.run(synack, "tg0")[0] == Verdict.TX_NLB_OUT
        ack = from_inet(IP(src=INET, dst=VIP) / TCP(sport=sport, dport=80, flags="A", seq=11,
                                                    ack=100))
        assert e.run(ack, "out0")[0] == Verdict.TX_NLB_IN
    e.run(syn(sport=56002), "out0")
    status = {"target_groups": {"web": {"a": {"state": "healthy"}, "b": {"state": "unhealthy"}}}}
    m = load_balancer_metrics(e.dp, status)[0]
    assert m["NewFlowCount"] == 3 and m["ActiveFlowCount"] == 2
    assert m["ProcessedPackets"] == 7 and m["ProcessedBytes"] == 7 * 54
    assert (m["HealthyHostCount"], m["UnHealthyHostCount"]) == (1, 1)


def test_icmp_error_from_client_reaches_the_target(e, nlb):
    _, _, data = e.run(syn(sport=57000), "out0")
    target = Ether(data)[IP].dst
    embedded = IP(src=VIP, dst=INET, ttl=63) / TCP(sport=80, dport=57000, flags="SA")
    err = from_inet(IP(src=INET, dst=VIP) / ICMP(type=3, code=4, nexthopmtu=1280) / embedded)
    verdict, _, out = e.run(err, "out0")
    assert verdict == Verdict.TX_ICMP_ERROR
    assert_checksums(out)
    p = Ether(out)
    assert (p[IP].src, p[IP].dst) == (INET, target)
    assert (p[IPerror].src, p[IPerror].dst) == (target, INET)
    from scapy.layers.inet import TCPerror
    assert (p[TCPerror].sport, p[TCPerror].dport) == (8080, 57000)


def test_tcp_udp_listener_answers_both_protocols(e):
    plane = NlbDataplane(e.dp)
    cfg = config().to_dict()
    cfg["listeners"] = [{"lb": "lb", "vip": VIP, "port": 8443, "protocol": "TCP_UDP",
                         "target_group": "web"}]
    plane.apply(NlbConfig.from_dict(cfg))
    try:
        tcp = e.run(syn(dport=8443), "out0")
        udp = e.run(from_inet(IP(src=INET, dst=VIP) / UDP(sport=40002, dport=8443) / b"x"), "out0")
        assert tcp[0] == udp[0] == Verdict.TX_NLB_IN
        assert Ether(tcp[2])[TCP].dport == Ether(udp[2])[UDP].dport == 8080
        assert e.run(syn(dport=80), "out0")[0] == Verdict.DROP_NO_LISTENER
    finally:
        plane.apply(NlbConfig())
