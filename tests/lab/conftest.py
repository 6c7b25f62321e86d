"""Fixtures for the lab tests: a one-node lab with a unique prefix, always torn down.

The NAT tests run against mode xdp (the hyperplane datapath). HP_LAB_MODE=nft or
HP_LAB_MODE=kernel runs the same traffic through Linux NAT or plain forwarding instead:
that checks the test harness itself (what is NAT-specific is skipped in kernel mode).
HP_LAB_XDP_MODE=native attaches XDP in native mode (default generic).
"""
from __future__ import annotations

import os
import re

import pytest

from hyperplane import lab, netns

from lab_harness import LAB_MODE, XDP_MODE, Lab, build_lab, lab_prefix, require_root


@pytest.fixture(autouse=True)
def _root():
    require_root()


@pytest.fixture(scope="module")
def nat_lab(request) -> Lab:
    """The lab in HP_LAB_MODE (default xdp), for the traffic tests of a module."""
    return build_lab(request, lab.LabConfig(prefix=lab_prefix("n"), mode=LAB_MODE,
                                            xdp_mode=XDP_MODE))


@pytest.fixture(autouse=True)
def _node_accounting(request):
    """In mode xdp every test also checks, around its own traffic, that
    - the node's kernel forwarded nothing: XDP redirects bypass netfilter, so a packet
      counted by the forward-drop chain slipped past XDP (and was lost);
    - every packet received on in0/out0 ended in exactly one counted verdict
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


@pytest.fixture(scope="session", autouse=True)
def _no_lab_namespaces_left():
    yield
    mine = [n for n in netns.list_namespaces()
            if re.match(rf"{lab_prefix('')}[a-z]-", n)]
    assert not mine, f"lab namespaces left behind: {mine}"
