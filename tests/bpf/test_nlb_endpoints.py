"""NlbDataplane keeps target_endpoints (bpf/maps.h) in step with the targets it writes: every
registered target's (ip, port), whatever its state, so the data path drops a target's
packet that has no flow instead of letting its private source leave; removed with the
target, and found again (stale ones dropped) by a restarted agent."""
from __future__ import annotations

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from bpf_env import INET, MAC, TARGET_MAC, TARGETS, VIP
from hyperplane.codec import be16_to_port, be32_to_ip, ip_to_be32, port_to_be16
from hyperplane.nlb.dataplane import NlbDataplane
from hyperplane.nlb.config import NlbConfig
from hyperplane.datapath.verdicts import Verdict

STATES = {TARGETS[0]: {"state": "healthy"}, TARGETS[1]: {"state": "unhealthy"},
          TARGETS[2]: {"state": "draining", "draining_since": 1.0}}


def config(targets=TARGETS) -> NlbConfig:
    return NlbConfig.from_dict({
        "load_balancers": [{"name": "lb", "lb_id": 0}],
        "listeners": [{"lb": "lb", "vip": VIP, "port": 80, "protocol": "TCP",
                       "target_group": "web"},
                      {"lb": "lb", "vip": VIP, "port": 53, "protocol": "UDP",
                       "target_group": "dns"}],
        "target_groups": [
            {"name": "web", "targets": [{"ip": t, "port": 8080, **STATES[t]} for t in targets]},
            {"name": "dns", "targets": [{"ip": TARGETS[0], "port": 5353}]}]})


def endpoints(dp) -> dict[str, int]:
    return {f"{be32_to_ip(k.ip)}:{be16_to_port(k.port)}": v.value
            for k, v in dp.table("target_endpoints").items()}


def from_target(ip: str, sport: int, proto=TCP):
    l4 = TCP(sport=sport, dport=40000, flags="SA") if proto is TCP else \
        UDP(sport=sport, dport=40000) / b"x"
    return Ether(src=TARGET_MAC, dst=MAC["tg0"]) / IP(src=ip, dst=INET) / l4


def test_every_registered_target_endpoint_is_written_and_removed_with_its_target(e):
    plane = NlbDataplane(e.dp)
    try:
        plane.apply(config())
        want = {f"{t}:8080": plane.target_id(f"{t}:8080") for t in TARGETS}
        want[f"{TARGETS[0]}:5353"] = plane.target_id(f"{TARGETS[0]}:5353")
        assert endpoints(e.dp) == want           # healthy, unhealthy and draining alike
        for t in TARGETS:                         # a target's packet with no flow: dropped
            assert e.run(from_target(t, 8080), "tg0")[0] == Verdict.DROP_NO_FLOW, t
        assert e.run(from_target(TARGETS[0], 5353, UDP), "tg0")[0] == Verdict.DROP_NO_FLOW
        # another port of the same host is not a target endpoint
        assert e.run(from_target(TARGETS[0], 9999), "tg0")[0] == Verdict.PASS_NO_RESOURCE

        plane.apply(config(TARGETS[:1]))          # two targets leave
        del want[f"{TARGETS[1]}:8080"], want[f"{TARGETS[2]}:8080"]
        assert endpoints(e.dp) == want
        assert e.run(from_target(TARGETS[1], 8080), "tg0")[0] == Verdict.PASS_NO_RESOURCE
    finally:
        plane.apply(NlbConfig())
    assert endpoints(e.dp) == {}


def test_a_restarted_plane_keeps_the_endpoints_and_drops_stale_ones(e):
    """A restarted agent reads target_endpoints back: what its config does not register
    goes, a wrong slot is rewritten."""
    plane = NlbDataplane(e.dp)
    try:
        plane.apply(config())
        before = endpoints(e.dp)
        table = e.dp.table("target_endpoints")
        k = table.Key()
        k.ip, k.port = ip_to_be32("10.20.9.9"), port_to_be16(7)
        table[k] = table.Leaf(5)                  # left by an agent that died mid-change
        k.ip, k.port = ip_to_be32(TARGETS[0]), port_to_be16(8080)
        table[k] = table.Leaf(15)                 # ... and a registered one's, wrong slot
        again = NlbDataplane(e.dp)                # the agent restarts
        again.apply(config())
        assert endpoints(e.dp) == before
        again.apply(config(TARGETS[1:]))
        assert set(endpoints(e.dp)) == {f"{t}:8080" for t in TARGETS[1:]} | \
            {f"{TARGETS[0]}:5353"}
    finally:
        NlbDataplane(e.dp).apply(NlbConfig())
    assert endpoints(e.dp) == {}
