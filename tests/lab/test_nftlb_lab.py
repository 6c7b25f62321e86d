"""Lab mode nftlb, the kernel's own stateful L4 load balancer the NLB benchmark compares
with: an nftables DNAT of VIP:80 to the three targets, chosen by a hash of the 5-tuple,
the client IP kept (conntrack reverses the DNAT on the targets' answers, which come back
through the node). No hyperplane data path is involved."""
from __future__ import annotations

import collections

import pytest

from hyperplane import lab

from lab_harness import build_lab, lab_prefix
from lab_traffic import http_get_many

pytestmark = pytest.mark.lab

N = 300


@pytest.fixture(scope="module")
def nftlb_lab(request):
    the_lab = build_lab(request, lab.LabConfig(prefix=lab_prefix("b"), mode="nftlb"))
    request.addfinalizer(the_lab.stop_servers)
    for name in lab.TARGET_ROLES:
        the_lab.start_server(name)
    return the_lab


def test_nothing_of_hyperplane_runs(nftlb_lab):
    st = lab.status(nftlb_lab.cfg)
    assert st["mode"] == "nftlb" and st["nlb"]["enabled"] and st["nlb"]["by"] == "nftables"
    assert st["node"]["attached"] == {i: None for i in lab.NODE_IFNAMES}


def test_fresh_connections_spread_over_every_target_with_the_client_ip_kept(nftlb_lab):
    fwd0 = nftlb_lab.forward_packets()
    res = http_get_many(nftlb_lab.inet, (lab.VIP, lab.HTTP_PORT), N, sources=lab.INET_IPS,
                        concurrency=16)
    failed = [r for r in res if not r.ok]
    assert not failed, f"{len(failed)} of {N} requests failed, e.g. {failed[:3]}"
    per_target = collections.Counter(r.target for r in res)
    # a 5-tuple hash over fresh client ports: each target about N/3 (a hash of the
    # addresses alone would give the two client addresses at most two targets)
    assert set(per_target) == set(lab.TARGET_ROLES), per_target
    assert min(per_target.values()) >= N // 6, per_target
    # the client IP is kept: every target saw the address the request was sent from, and
    # answered on its own port (the DNAT's :8080)
    wrong = [r for r in res if r.peer_ip != r.src or r.target_port != lab.TARGET_HTTP_PORT]
    assert not wrong, f"{len(wrong)} requests reached a target with another peer: {wrong[:3]}"
    # the node's kernel forwarded them (both directions of every connection)
    assert nftlb_lab.forward_packets() - fwd0 >= 2 * N
