"""Fixtures for the lab tests: a one-node lab with a unique prefix, always torn down.

The NAT tests run against mode xdp (the hyperplane datapath). HP_LAB_MODE=nft or
HP_LAB_MODE=kernel runs the same traffic through Linux NAT or plain forwarding instead:
that checks the test harness itself (what is NAT-specific is skipped in kernel mode).
HP_LAB_ATTACH=tc|xdp attaches the data path that way (default auto: tc on veth).
"""
from __future__ import annotations

import re
import time

import pytest

from hyperplane import lab, netns

from lab_harness import ATTACH, LAB_MODE, Lab, build_lab, build_nlb_lab, lab_prefix, \
    require_root


@pytest.fixture(autouse=True)
def _root():
    require_root()


@pytest.fixture(scope="module")
def nat_lab(request) -> Lab:
    """The lab in HP_LAB_MODE (default xdp), for the NAT traffic tests of a module. Without
    the NLB (no agent): then no health-check traffic crosses the node, and every packet it
    receives is test traffic that the accounting below can count exactly."""
    return build_lab(request, lab.LabConfig(prefix=lab_prefix("n"), mode=LAB_MODE,
                                            attach=ATTACH, nlb=False))


@pytest.fixture(autouse=True)
def _node_accounting(request):
    """In mode xdp every test also checks, around its own traffic, that
    - the node's kernel forwarded nothing: XDP redirects bypass netfilter, so a packet
      counted by the forward-drop chain slipped past XDP (and was lost);
    - every packet received on in0/out0/tg1..tg3 ended in exactly one counted verdict
      (invariant 2): the verdict counters grew by exactly the interfaces' rx packets."""
    if "nat_lab" not in request.fixturenames or LAB_MODE != "xdp":
        yield
        return
    the_lab: Lab = request.getfixturevalue("nat_lab")
    ifnames = lab.NODE_IFNAMES
    fwd0 = the_lab.forward_packets()
    rx0 = netns.rx_packets(the_lab.node, ifnames)
    v0 = the_lab.counters()
    yield
    fwd1 = the_lab.forward_packets()
    rx1 = netns.rx_packets(the_lab.node, ifnames)
    v1 = the_lab.counters()
    assert fwd1 == fwd0, (f"the node's kernel tried to forward {fwd1 - fwd0} packets "
                          "that XDP did not handle")
    rx = sum(rx1[i] - rx0[i] for i in ifnames)
    verdicts = {k: v1[k] - v0.get(k, 0) for k in v1 if v1[k] != v0.get(k, 0)}
    assert sum(verdicts.values()) == rx, (
        f"{rx} packets arrived on {'/'.join(ifnames)} but the verdicts counted "
        f"{sum(verdicts.values())}: {verdicts}")


@pytest.fixture(scope="module")
def nlb_lab(request) -> Lab:
    """The lab in mode xdp with its NLB (store + agent) and a server on every target, all
    healthy. (The NLB tests are about the XDP NLB: HP_LAB_MODE other than xdp skips them.)"""
    if LAB_MODE != "xdp":
        pytest.skip(f"the NLB lab tests need mode xdp (HP_LAB_MODE={LAB_MODE})")
    return build_nlb_lab(request, lab.LabConfig(prefix=lab_prefix("l"), mode="xdp",
                                                attach=ATTACH, nlb=True))


def _settled_rx(the_lab: Lab, timeout: float = 3.0) -> tuple[int, int]:
    """(IPv4 packets received on the node's out0, IPv4 packets received on inet's inet0)
    once they stop moving (the last FIN/ACKs of a test may still be on their way). ARP is
    left out: out0 and inet0 face each other alone, so each side's ARP input is that
    link's."""
    deadline = time.monotonic() + timeout
    last = None
    while True:
        now = (netns.rx_packets(the_lab.node, ["out0"])["out0"] - the_lab.arp_received("node"),
               netns.rx_packets(the_lab.inet, ["inet0"])["inet0"] - the_lab.arp_received("inet"))
        if now == last or time.monotonic() > deadline:
            return now
        last = now
        time.sleep(0.15)


@pytest.fixture(autouse=True)
def _nlb_accounting(request):
    """Around every test on the NLB lab: the node's kernel forwarded nothing (nft forward
    counter unchanged), every IPv4 packet the internet host sent to the node (rx on out0)
    was a TX_NLB_IN verdict (or a ping of the VIP, PASS_LOCAL), and every one it got back
    (rx on inet0) a TX_NLB_OUT one (or a ping's answer): so all of the clients' traffic
    went through the NLB data path, both ways. (The targets' side
    also carries the agent's health checks, which end in other verdicts, so the exact sum
    is taken on the internet side.)"""
    if "nlb_lab" not in request.fixturenames:
        yield
        return
    the_lab: Lab = request.getfixturevalue("nlb_lab")
    fwd0 = the_lab.forward_packets()
    out0, inet0 = _settled_rx(the_lab)
    v0 = the_lab.counters()
    yield
    out1, inet1 = _settled_rx(the_lab)
    v1 = the_lab.counters()
    fwd1 = the_lab.forward_packets()
    assert fwd1 == fwd0, (f"the node's kernel tried to forward {fwd1 - fwd0} packets "
                          "that XDP did not handle")
    d = {k: v1[k] - v0.get(k, 0) for k in v1 if v1[k] != v0.get(k, 0)}
    # pings of the VIP (PASS_LOCAL) are the node's own to answer, one reply each
    local = d.get("PASS_LOCAL", 0)
    assert d.get("TX_NLB_IN", 0) + local == out1 - out0, (
        f"{out1 - out0} packets came in on out0 but {d.get('TX_NLB_IN', 0)} were TX_NLB_IN "
        f"and {local} PASS_LOCAL: {d}")
    assert d.get("TX_NLB_OUT", 0) + local == inet1 - inet0, (
        f"the internet host received {inet1 - inet0} packets but {d.get('TX_NLB_OUT', 0)} "
        f"were TX_NLB_OUT and {local} answers to pings: {d}")


@pytest.fixture(scope="session", autouse=True)
def _no_lab_namespaces_left():
    yield
    mine = [n for n in netns.list_namespaces()
            if re.match(rf"{lab_prefix('')}[a-z]-", n)]
    assert not mine, f"lab namespaces left behind: {mine}"
