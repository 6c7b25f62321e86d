"""Pinned maps: a restarted (re-compiled, re-loaded) data path keeps every flow."""
import os

from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether

from bpf_env import CLIENT, INET, NAT_IP, SIZES, Env
from hyperplane.datapath.loader import PIN_ROOT, Datapath, remove_pins
from hyperplane.nat.gateway import GatewayConfig, apply_gateway
from hyperplane.datapath.settings import write_config
from hyperplane.datapath.verdicts import Verdict
from packets import from_inet, tcp_syn


def test_restart_keeps_flows_and_seed(env):
    pin_dir = os.path.join(PIN_ROOT, f"hpt-restart-{os.getpid()}")
    first = second = None
    try:
        first = Datapath(SIZES, pin_dir)
        write_config(first)
        apply_gateway(first, GatewayConfig("gw-r", 0, [NAT_IP], ["10.10.0.0/24"]))
        run1 = Env(first, env.ifindex)
        _, _, out = run1.run(tcp_syn(sport=45000))
        port = Ether(out)[TCP].sport
        seed = first.table("config")[first.table("config").Key(0)].hash_seed
        first.close()
        first = None

        second = Datapath(SIZES, pin_dir)  # a new compile and load: the "restart"
        write_config(second)               # what the agent does at start-up
        assert second.table("config")[second.table("config").Key(0)].hash_seed == seed
        run2 = Env(second, env.ifindex)
        reply = from_inet(IP(src=INET, dst=NAT_IP) / TCP(sport=80, dport=port, flags="SA"))
        verdict, _, data = run2.run(reply, "out0")
        assert verdict == Verdict.TX_NAT_IN, "the flow did not survive the restart"
        assert Ether(data)[IP].dst == CLIENT and Ether(data)[TCP].dport == 45000
        assert run2.stats()["FLOW_CREATED"] == 1  # the pinned counters survived too
    finally:
        for dp in (first, second):
            if dp is not None:
                dp.close()
        remove_pins(pin_dir)


def test_pins_of_other_sizes_are_refused_clearly(env):
    from dataclasses import replace

    import pytest

    from hyperplane.errors import ConfigError
    pin_dir = os.path.join(PIN_ROOT, f"hpt-pins-{os.getpid()}")
    first = None
    try:
        first = Datapath(SIZES, pin_dir)
        with pytest.raises(ConfigError, match="does not match this program"):
            Datapath(replace(SIZES, max_flows=SIZES.max_flows * 2), pin_dir)
    finally:
        if first is not None:
            first.close()
        remove_pins(pin_dir)
