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
    """A node of each first hook: its flows, counters and seed survive a restart, and its
    record installer is pinned as that hook's program (no build of the other hook)."""
    pin_dir = os.path.join(PIN_ROOT, f"hpt-restart-{os.getpid()}")
    first = second = None
    try:
        first = Datapath(SIZES, pin_dir, hook=env.hook)
        assert list(first.builds) == [env.hook], "one compile, for the first hook only"
        _check_pinned_installer(pin_dir, env.hook)
        write_config(first)
        apply_gateway(first, GatewayConfig("gw-r", 0, [NAT_IP], ["10.10.0.0/24"]))
        run1 = Env(first, env.ifindex, env.hook)
        _, _, out = run1.run(tcp_syn(sport=45000))
        port = Ether(out)[TCP].sport
        seed = first.table("config")[first.table("config").Key(0)].hash_seed
        first.close()
        first = None

        other = "tc" if env.hook == "xdp" else "xdp"
        second = Datapath(SIZES, pin_dir, hook=other)  # a new compile and load: the "restart"
        _check_pinned_installer(pin_dir, other)        # the other hook's, in its place
        write_config(second)               # what the agent does at start-up
        assert second.table("config")[second.table("config").Key(0)].hash_seed == seed
        run2 = Env(second, env.ifindex, other)
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


def _check_pinned_installer(pin_dir: str, hook: str) -> None:
    """The pinned installer is hook's, the only one, and runs: a record of a NAT IP this
    node does not have is counted rejected."""
    from hyperplane.datapath.loader import INSTALLER_PINS
    from hyperplane.datapath.pinned import PinnedNode
    from hyperplane.fleet import records
    assert sorted(n for n in os.listdir(pin_dir) if n in INSTALLER_PINS.values()) == \
        [INSTALLER_PINS[hook]]
    node = PinnedNode(pin_dir)
    try:
        rec = records.FlowRecord(src="10.10.0.5", dst="198.18.0.9", sport=1000, dport=80,
                                 proto=6, new_src="198.18.77.1", new_dst="198.18.0.9",
                                 new_sport=20000, new_dport=80, kind=records.FlowKind.NAT_OUT,
                                 tcp_state=records.TcpState.ESTABLISHED, fin_seen=0,
                                 flags=records.REC_F_CONFIRMED, resource=0, origin=1,
                                 idle_ms=0, age_ms=0)
        result = records.install(node, rec.pack())
        assert node.hook == hook and (result.rejected, result.total()) == (1, 1), result
    finally:
        node.close()


def test_pins_of_other_sizes_are_refused_clearly():
    from dataclasses import replace

    import pytest

    from hyperplane.errors import ConfigError
    pin_dir = os.path.join(PIN_ROOT, f"hpt-pins-{os.getpid()}")
    first = None
    try:
        # the pins are made and checked by the compile: no program needs loading
        first = Datapath(SIZES, pin_dir, load_program=False)
        with pytest.raises(ConfigError, match="does not match this program"):
            Datapath(replace(SIZES, max_flows=SIZES.max_flows * 2), pin_dir,
                     load_program=False)
    finally:
        if first is not None:
            first.close()
        remove_pins(pin_dir)
