"""Packet tests: the data path run on crafted packets through BPF_PROG_TEST_RUN, once for
each hook it is built for (native XDP, tc).

The program does its own route lookups (bpf_fib_lookup), so it runs inside a namespace
made for the test with the lab's addresses, routes and permanent neighbours; nothing
there is connected to anything."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import pytest

from hyperplane import netns
from hyperplane.datapath import sandbox
from hyperplane.datapath.loader import HOOKS, Datapath, Sizes
from hyperplane.observe.metrics import stat_counts, verdict_counts
from hyperplane.nat.gateway import GatewayConfig, apply_gateway
from hyperplane.datapath.settings import Timeouts, write_config
from hyperplane.datapath.testrun import test_run
from hyperplane.datapath.sandbox import (CLIENT, CLIENT2, CLIENT_MAC, INET, INET2, INET_MAC,  # noqa: F401
                                MAC, NAT_IP, NAT_IP2, ROUTER, TARGET_MAC, TARGETS, VIP)
from hyperplane.datapath.verdicts import Verdict

NS = f"hpt-bpf-{os.getpid() % 100000}"
SIZES = Sizes(max_flows=4096, max_reservations=2048, max_listeners=4, maglev_size=251,
              max_targets=16)

# The shortest IPv4 frame each hook's BPF_PROG_TEST_RUN accepts: XDP any frame past the
# Ethernet header; tc (an skb) an IPv4 header too - shorter IPv4 frames never reach tc.
MIN_IPV4_FRAME = {"xdp": 14, "tc": 34}

# The hook's return value for each action a verdict names (Verdict.action): at tc a packet
# bounced back out of its interface is a redirect too.
RETVALS = {"xdp": {"XDP_REDIRECT": 4, "XDP_TX": 3, "XDP_PASS": 2, "XDP_DROP": 1},
           "tc": {"XDP_REDIRECT": 7, "XDP_TX": 7, "XDP_PASS": 0, "XDP_DROP": 2}}


# Every state map the data path declares (bpf/maps.h): wiped when the env passes from one
# test module to the next (Env.wipe). Parsed, so a new map is never forgotten.
_MAPS_H = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "bpf", "maps.h")
with open(_MAPS_H) as _f:
    STATE_MAPS = re.findall(r'^HP_MAP\("\w+",[^,]+,[^,]+,\s*(\w+),', _f.read(), re.M)
assert "flows" in STATE_MAPS and "port_owner" in STATE_MAPS, STATE_MAPS


def require_root():
    if os.geteuid() != 0:
        pytest.fail("packet tests need root (BPF_PROG_TEST_RUN and a network namespace); "
                    "run scripts/test as root", pytrace=False)


@dataclass
class Env:
    dp: Datapath
    ifindex: dict
    hook: str = "xdp"

    def run(self, packet, iface: str = "in0", **skb):
        """Run one packet; return (verdict, action, output bytes). The action is the one
        the verdict names (Verdict.action), after checking that the hook's return value is
        that action's. skb: gso_size / gso_segs for a tc superpacket."""
        before = verdict_counts(self.dp)
        res = netns.call_in(NS, test_run, self.dp.prog_fd, bytes(packet),
                            ingress_ifindex=self.ifindex[iface], hook=self.hook, **skb)
        after = verdict_counts(self.dp)
        moved = [Verdict[name] for name in after if after[name] != before[name]]
        assert len(moved) == 1 and after[moved[0].name] - before[moved[0].name] == 1, \
            f"expected exactly one verdict counted, got {moved}"
        verdict = moved[0]
        want = RETVALS[self.hook][verdict.action]
        assert res.retval == want, (f"{self.hook}: verdict {verdict.name} returned "
                                    f"{res.action} ({res.retval}), not {want}")
        return verdict, verdict.action, res.data

    def stats(self):
        return stat_counts(self.dp)

    def reset(self):
        for name in ("flows", "pending", "nat_resv", "nat_cursor", "frags", "gw_stats", "stats",
                     "lb_stats", "target_packets", "icmp_budget", "user_ends"):
            self.dp.table(name).clear()

    def wipe(self):
        """Every state map empty or zeroed, and the event ring read to its end: the data
        path as a new one (a module gets it after another module's tests)."""
        from hyperplane.datapath.ring import MappedRing
        from hyperplane.observe.events import EVENT_SIZE
        for name in STATE_MAPS:
            table = self.dp.table(name)
            for key in list(table.keys()):   # bcc's LpmTrie.clear() does nothing
                del table[key]
        ring = MappedRing(self.dp.table("flow_events").map_fd, EVENT_SIZE)
        try:
            for _ in range(10_000):       # bounded: nothing writes to it meanwhile
                if not ring.pending_bytes():
                    break
                ring.read()
            assert not ring.pending_bytes(), "the event ring could not be read to its end"
        finally:
            ring.close()

    def set_timeouts(self, **kw):
        write_config(self.dp, Timeouts(**kw))

    def gw_metrics(self, gw_id=0):
        from hyperplane.observe.metrics import gateway_metrics
        return gateway_metrics(self.dp, gw_id)


@pytest.fixture(scope="session")
def sandbox_ns():
    require_root()
    netns.remove(NS)
    try:
        yield sandbox.build(NS)
    finally:
        netns.remove(NS)


@pytest.fixture(scope="session")
def _datapaths(sandbox_ns):
    """One data path per hook for the whole session (per xdist worker), compiled when
    first asked for: a compile takes ~10 s, and a session-scoped parametrized fixture
    was set up anew for every module (each runs its xdp tests, then its tc ones)."""
    built: dict[str, Env] = {}
    try:
        yield built
    finally:
        for env in built.values():
            env.dp.close()


@pytest.fixture(scope="module", params=HOOKS)
def env(request, _datapaths, sandbox_ns):
    """The hook's data path, wiped, with the default config and gateway, for one module."""
    hook = request.param
    if hook not in _datapaths:
        _datapaths[hook] = Env(Datapath(SIZES, hook=hook), sandbox_ns, hook)
    built = _datapaths[hook]
    built.wipe()
    write_config(built.dp, Timeouts(), hash_seed=0x12345678)
    apply_gateway(built.dp, GatewayConfig("gw-test", 0, [NAT_IP], ["10.10.0.0/24"]))
    return built


@pytest.fixture
def e(env):
    """The env with empty flow tables and default timeouts and gateway."""
    env.reset()
    write_config(env.dp, Timeouts())
    apply_gateway(env.dp, GatewayConfig("gw-test", 0, [NAT_IP], ["10.10.0.0/24"]))
    yield env
    env.reset()
