"""Packet tests: the data path run on crafted packets through BPF_PROG_TEST_RUN.

The program does its own route lookups (bpf_fib_lookup), so it runs inside a namespace
made for the test with the lab's addresses, routes and permanent neighbours; nothing
there is connected to anything."""
from __future__ import annotations

import os
from dataclasses import dataclass

import pytest

from hyperplane import netns
from hyperplane.loader import Datapath, Sizes
from hyperplane.metrics import stat_counts, verdict_counts
from hyperplane.nat import GatewayConfig, apply_gateway
from hyperplane.settings import Timeouts, write_config
from hyperplane.testrun import test_run
from hyperplane.verdicts import Verdict

NS = f"hpt-bpf-{os.getpid() % 100000}"
CLIENT, CLIENT2 = "10.10.0.10", "10.10.0.11"
INET, INET2 = "198.18.0.2", "198.18.0.3"
ROUTER = "198.18.0.254"          # an intermediate router that sends ICMP errors
NAT_IP, NAT_IP2 = "198.18.0.100", "198.18.0.101"
MAC = {"in0": "02:00:00:00:01:01", "in0p": "02:00:00:00:01:02",
       "out0": "02:00:00:00:02:01", "out0p": "02:00:00:00:02:02",
       "tg0": "02:00:00:00:03:01", "tg0p": "02:00:00:00:03:02"}
VIP = "198.18.0.200"
TARGETS = ["10.20.1.10", "10.20.2.10", "10.20.3.10"]
TARGET_MAC = "02:00:00:00:00:20"
CLIENT_MAC, INET_MAC = "02:00:00:00:00:10", "02:00:00:00:00:02"
SIZES = Sizes(max_flows=4096, max_reservations=2048, max_listeners=4, maglev_size=251,
              max_targets=16)


def require_root():
    if os.geteuid() != 0:
        pytest.fail("packet tests need root (BPF_PROG_TEST_RUN and a network namespace); "
                    "run scripts/test as root", pytrace=False)


@dataclass
class Env:
    dp: Datapath
    ifindex: dict

    def run(self, packet, iface: str = "in0"):
        """Run one packet; return (verdict, action, output bytes)."""
        before = verdict_counts(self.dp)
        res = netns.call_in(NS, test_run, self.dp.prog_fd, bytes(packet),
                            ingress_ifindex=self.ifindex[iface])
        after = verdict_counts(self.dp)
        moved = [Verdict[name] for name in after if after[name] != before[name]]
        assert len(moved) == 1 and after[moved[0].name] - before[moved[0].name] == 1, \
            f"expected exactly one verdict counted, got {moved}"
        return moved[0], res.action, res.data

    def stats(self):
        return stat_counts(self.dp)

    def reset(self):
        for name in ("flows", "nat_resv", "frags", "gw_stats", "stats", "lb_stats",
                     "target_packets"):
            self.dp.table(name).clear()

    def set_timeouts(self, **kw):
        write_config(self.dp, Timeouts(**kw))

    def gw_metrics(self, gw_id=0):
        from hyperplane.metrics import gateway_metrics
        return gateway_metrics(self.dp, gw_id)


def _build_namespace():
    netns.create(NS)
    netns.veth(NS, "in0", NS, "in0p", mac_a=MAC["in0"], mac_b=MAC["in0p"])
    netns.veth(NS, "out0", NS, "out0p", mac_a=MAC["out0"], mac_b=MAC["out0p"])
    netns.veth(NS, "tg0", NS, "tg0p", mac_a=MAC["tg0"], mac_b=MAC["tg0p"])
    for ifname in ("lo", "in0", "in0p", "out0", "out0p", "tg0", "tg0p"):
        netns.set_up(NS, ifname)
    netns.add_address(NS, "in0", "10.10.0.1/24")
    netns.add_address(NS, "out0", "198.18.0.1/24")
    netns.add_address(NS, "out0", f"{NAT_IP}/32")
    netns.add_address(NS, "out0", f"{VIP}/32")
    netns.add_address(NS, "tg0", "10.20.0.1/16")
    for ip in TARGETS:
        netns.add_neighbour(NS, "tg0", ip, TARGET_MAC)
    for ip in (CLIENT, CLIENT2):
        netns.add_neighbour(NS, "in0", ip, CLIENT_MAC)
    for ip in (INET, INET2, ROUTER):
        netns.add_neighbour(NS, "out0", ip, INET_MAC)
    netns.sysctl(NS, "net.ipv4.ip_forward", 1)


@pytest.fixture(scope="session")
def env():
    require_root()
    netns.remove(NS)
    _build_namespace()
    dp = None
    try:
        dp = Datapath(SIZES)
        write_config(dp, Timeouts(), hash_seed=0x12345678)
        apply_gateway(dp, GatewayConfig("gw-test", 0, [NAT_IP], ["10.10.0.0/24"]))
        ifindex = {i: netns.call_in(NS, socket_ifindex, i) for i in ("in0", "out0", "tg0")}
        yield Env(dp, ifindex)
    finally:
        if dp is not None:
            dp.close()
        netns.remove(NS)


def socket_ifindex(name: str) -> int:
    import socket
    return socket.if_nametoindex(name)


@pytest.fixture
def e(env):
    """The env with empty flow tables and default timeouts and gateway."""
    env.reset()
    write_config(env.dp, Timeouts())
    apply_gateway(env.dp, GatewayConfig("gw-test", 0, [NAT_IP], ["10.10.0.0/24"]))
    yield env
    env.reset()
