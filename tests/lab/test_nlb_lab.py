"""Real traffic through the lab's XDP network load balancer: the internet host
(198.18.0.2/.3) -> VIP 198.18.0.200 on node1 -> targets t1..t3 (10.20.{1,2,3}.10), whose
servers answer with their own name and the peer address they saw.

The NLB configuration lives in the lab's store file and is applied by the agent (health
checks every 0.5 s, thresholds 2/2). Around every test (conftest `_nlb_accounting`): the
node's kernel forwarded nothing, every packet from the internet host was TX_NLB_IN and
every packet back to it TX_NLB_OUT."""
from __future__ import annotations

import collections
import os
import socket
import time

import pytest

from hyperplane import lab, netns
from hyperplane.fleet.store import NLB_KEY

from lab_traffic import StreamDownload, http_get_many

pytestmark = pytest.mark.lab

VIP = (lab.VIP, lab.HTTP_PORT)
SOURCES = list(lab.INET_IPS)                 # 198.18.0.2, 198.18.0.3
NAMES = list(lab.TARGET_ROLES)
IP_OF = dict(zip(NAMES, lab.TARGET_IPS))


def web(name: str, port: int = lab.TARGET_HTTP_PORT) -> str:
    return f"{IP_OF[name]}:{port}"


def _spread(results) -> collections.Counter:
    """Target identity ("ip:port", as the store names it) -> requests it answered."""
    return collections.Counter(web(r.target, r.target_port) for r in results if r.ok)


def _all_ok(results) -> None:
    bad = [r for r in results if not r.ok]
    assert not bad, f"{len(bad)} of {len(results)} requests failed, e.g. {bad[:3]}"


def _group_targets(data: dict, group: str) -> list[dict]:
    return next(tg for tg in data["target_groups"] if tg["name"] == group)["targets"]


def test_data_path_attached_on_every_node_interface(nlb_lab):
    from test_nat_lab import expected_hook
    st = lab.status(nlb_lab.cfg)
    assert st["node"]["attached"] == {i: expected_hook(nlb_lab.cfg) for i in lab.NODE_IFNAMES}
    assert st["nlb"]["enabled"] and st["nlb"]["agent"]["config_error"] is None
    assert set(st["nlb"]["agent"]["target_groups"]) == {lab.WEB_GROUP, lab.DNS_GROUP}


def test_3000_fresh_connections_spread_evenly(nlb_lab):
    n = 3000
    t0 = time.monotonic()
    res = http_get_many(nlb_lab.inet, VIP, n, sources=SOURCES, concurrency=32, timeout=90)
    took = time.monotonic() - t0
    _all_ok(res)
    spread = _spread(res)
    assert set(spread) == {web(t) for t in NAMES}, spread
    even = n / len(NAMES)
    for target, count in spread.items():
        assert abs(count - even) <= 0.10 * even, f"{target}: {count} of {n} (even: {even:.0f})"
    # client IP preserved: each target saw the address the request was sent from
    assert all(r.peer_ip == r.src for r in res), [r for r in res if r.peer_ip != r.src][:3]
    print(f"{n} requests on fresh connections in {took:.1f}s: {dict(spread)}")


def test_client_ip_preserved(nlb_lab):
    for src in SOURCES:
        res = http_get_many(nlb_lab.inet, VIP, 12, sources=[src], concurrency=4, timeout=30)
        _all_ok(res)
        assert {r.peer_ip for r in res} == {src}, res


def test_vip_is_added_by_the_agent_and_answers(nlb_lab):
    """The lab does not add the VIP: the agent does when it applies the load balancer
    (labelled as hyperplane's), and the node answers ping for it."""
    from lab_traffic import ping
    out0 = {l["ifname"]: l for l in netns.links(nlb_lab.node)}["out0"]
    assert f"{lab.VIP}/32" in out0["addresses"]
    assert len(ping(nlb_lab.inet, lab.VIP, count=2)) == 2, "the VIP does not answer"


def test_fresh_connections_with_neighbour_caches_flushed(nlb_lab):
    """No static neighbours: with the node's and the targets' caches just flushed, every
    new connection still reaches its target (the node resolves them by ARP on the way)
    and the answers come back."""
    from hyperplane.observe.metrics import stat_counts
    from hyperplane.node import lifecycle as node
    for role in ("node", "inet", *NAMES):
        netns.run_in(nlb_lab.ns_of(role), ["ip", "neigh", "flush", "all"])
    dp = node.open_node(lab.node_name(nlb_lab.cfg))
    try:
        resolved0 = stat_counts(dp)["NEIGH_RESOLVE"]
        res = http_get_many(nlb_lab.inet, VIP, 150, sources=SOURCES, concurrency=16,
                            timeout=60)
        _all_ok(res)
        assert set(_spread(res)) == {web(t) for t in NAMES}
        assert stat_counts(dp)["NEIGH_RESOLVE"] > resolved0
    finally:
        dp.close()


def test_udp_listener(nlb_lab):
    c = netns.socket_in(nlb_lab.inet, socket.AF_INET, socket.SOCK_DGRAM)
    try:
        c.bind((SOURCES[0], 0))
        c.settimeout(1.0)
        me = c.getsockname()
        targets = set()
        for i in range(20):
            msg = f"query {i}".encode() + os.urandom(8)
            c.sendto(msg, (lab.VIP, lab.UDP_PORT))
            data, frm = c.recvfrom(2048)
            assert frm == (lab.VIP, lab.UDP_PORT), f"the answer came from {frm}, not the VIP"
            head, _, echoed = data.partition(b"|")
            name, peer = head.decode().split()
            assert echoed == msg and peer == f"{me[0]}:{me[1]}", data
            targets.add(name)
        assert len(targets) == 1, f"one UDP flow must stay on one target, went to {targets}"
    finally:
        c.close()
    # many flows (one socket each) use every target
    seen = collections.Counter()
    for i in range(30):
        s = netns.socket_in(nlb_lab.inet, socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.bind((SOURCES[i % 2], 0))
            s.settimeout(1.0)
            s.sendto(b"hi", (lab.VIP, lab.UDP_PORT))
            data, frm = s.recvfrom(2048)
            assert frm == (lab.VIP, lab.UDP_PORT)
            seen[data.split()[0].decode()] += 1
        finally:
            s.close()
    assert set(seen) == set(NAMES), seen


def test_long_download_survives_target_changes(nlb_lab):
    """A 120 MB body streamed at 15 MB/s (~8 s) keeps going, byte for byte, while a target
    is added, another removed from the group, and its own target deregistered (draining:
    no new flows, this one carries on)."""
    nbytes, rate, seed = 120 * 1024 * 1024, 15 * 1024 * 1024, 4242
    want = lab.stream_sha256(seed, nbytes)
    store = nlb_lab.store
    dl = StreamDownload(nlb_lab.inet, VIP, nbytes, rate, seed, src=SOURCES[0],
                        timeout=60).start()
    try:
        assert dl.header.wait(10) and dl.target, f"no answer: {dl.error}"
        mine = dl.target
        others = [t for t in NAMES if t != mine]
        added, removed = others[0], others[1]
        # 1. a target is added (a 4th: the server of `added` also listens on 8081)
        store.update(NLB_KEY, lambda d: (_group_targets(d, lab.WEB_GROUP).append(
            {"ip": IP_OF[added], "port": 8081}), d)[1])
        nlb_lab.wait_states({web(added, 8081): "healthy"}, timeout=5)
        res = http_get_many(nlb_lab.inet, VIP, 120, sources=SOURCES, timeout=30)
        _all_ok(res)
        assert web(added, 8081) in _spread(res), _spread(res)
        # 2. another target is removed from the group outright
        store.update(NLB_KEY, lambda d: (_remove(d, web(removed)), d)[1])
        nlb_lab.wait_states({web(removed): None}, timeout=5)
        res = http_get_many(nlb_lab.inet, VIP, 90, sources=SOURCES, timeout=30)
        _all_ok(res)
        assert web(removed) not in _spread(res), _spread(res)
        # 3. the download's own target is drained: no new flows, this one goes on
        store.update(NLB_KEY, lambda d: (_deregister(d, web(mine)), d)[1])
        nlb_lab.wait_states({web(mine): "draining"}, timeout=5)
        st = nlb_lab.agent_status()["target_groups"][lab.WEB_GROUP][web(mine)]
        assert st["active_flows"] >= 1, st
        res = http_get_many(nlb_lab.inet, VIP, 90, sources=SOURCES, timeout=30)
        _all_ok(res)
        assert web(mine) not in _spread(res), _spread(res)
        assert not dl.done.is_set(), "the download ended before the changes were done"
        progress = dl.received
        assert dl.wait(45), f"the download did not finish ({dl.received} of {nbytes} bytes)"
    finally:
        dl.wait(60)
        nlb_lab.reset_nlb()
    assert dl.error is None, dl.error
    assert dl.received == nbytes and dl.sha.hexdigest() == want, \
        f"{dl.received} of {nbytes} bytes, sha256 {'ok' if dl.sha.hexdigest() == want else 'BAD'}"
    assert dl.target == mine and progress < nbytes
    nlb_lab.wait_states({web(t): "healthy" for t in NAMES}, timeout=10)
    assert web(added, 8081) not in nlb_lab.target_states()


def _remove(data: dict, identity: str) -> None:
    tg = next(tg for tg in data["target_groups"] if tg["name"] == lab.WEB_GROUP)
    tg["targets"] = [t for t in tg["targets"] if f"{t['ip']}:{t['port']}" != identity]


def _deregister(data: dict, identity: str) -> None:
    for t in _group_targets(data, lab.WEB_GROUP):
        if f"{t['ip']}:{t['port']}" == identity:
            t["state"], t["draining_since"] = "draining", time.time()


def test_killed_target_leaves_and_comes_back(nlb_lab):
    victim = NAMES[1]
    nlb_lab.stop_server(victim)
    t0 = time.monotonic()
    try:
        # how fast is measured and printed (docs/lab.md), not asserted: a loaded machine
        # may take longer; the wait is bounded
        left = nlb_lab.wait_states({web(victim): "unhealthy"}, timeout=30)
        res = http_get_many(nlb_lab.inet, VIP, 90, sources=SOURCES, timeout=30)
        _all_ok(res)                   # no new connection reaches the dead target
        assert set(_spread(res)) == {web(t) for t in NAMES if t != victim}, _spread(res)
    finally:
        nlb_lab.start_server(victim)
    t1 = time.monotonic()
    back = nlb_lab.wait_states({web(victim): "healthy"}, timeout=30)
    res = http_get_many(nlb_lab.inet, VIP, 90, sources=SOURCES, timeout=30)
    _all_ok(res)
    assert _spread(res)[web(victim)] >= 10, _spread(res)
    print(f"{victim} out of rotation {left:.2f}s after its server stopped, back "
          f"{back:.2f}s after it restarted (total {time.monotonic() - t0:.1f}s, "
          f"restart at +{t1 - t0:.1f}s)")
