"""NLB resource model: validation (errors name the field), dict round trips, drains,
fail-open routing and the Maglev backends a target group yields."""
from __future__ import annotations

import json
import tomllib
from collections import Counter
from ipaddress import IPv4Address

import pytest

from hyperplane.errors import ConfigError
from hyperplane.nlb.health import Endpoint, HealthCheckConfig, HealthState, TargetHealth
from hyperplane.nlb.maglev import build_table
from hyperplane.nlb.config import (Listener, LoadBalancer, NlbConfig, Target, TargetGroup)

NOW = 1_700_000_000.0


def sample() -> dict:
    return {
        "load_balancers": [{"name": "web-nlb", "lb_id": 0}],
        "listeners": [
            {"lb": "web-nlb", "vip": "10.100.0.10", "port": 80, "protocol": "TCP",
             "target_group": "web"},
            {"lb": "web-nlb", "vip": "10.100.0.10", "port": 53, "protocol": "TCP_UDP",
             "target_group": "dns"},
        ],
        "target_groups": [
            {"name": "web",
             "targets": [{"ip": "10.1.0.11", "port": 80},
                         {"ip": "10.1.0.12", "port": 80, "weight": 2, "state": "healthy"},
                         {"ip": "10.1.0.13", "port": 80, "state": "draining",
                          "draining_since": NOW}],
             "health_check": {"protocol": "http", "path": "/healthz", "interval_s": 10,
                              "timeout_s": 5},
             "deregistration_delay_s": 30},
            {"name": "dns", "targets": [{"ip": "10.1.0.21", "port": 53}]},
        ],
    }


def test_defaults_are_aws_defaults() -> None:
    group = TargetGroup("web")
    assert (group.deregistration_delay_s, group.idle_timeout_tcp_s, group.idle_timeout_udp_s,
            group.reset_on_unhealthy) == (300, 350, 120, False)
    assert group.health_check == HealthCheckConfig()
    target = Target("10.1.0.11", 80)
    assert (target.ip, target.weight, target.state, target.draining_since) == \
        (IPv4Address("10.1.0.11"), 1, "initial", None)


def test_round_trip_through_json_and_toml_shapes() -> None:
    config = NlbConfig.from_dict(sample())
    saved = config.to_dict()
    assert NlbConfig.from_dict(json.loads(json.dumps(saved))) == config
    assert "port" not in saved["target_groups"][1]["health_check"]   # no None for TOML
    assert all("draining_since" not in t for t in saved["target_groups"][1]["targets"])
    web = config.target_group("web")
    assert web.health_check.protocol == "http" and web.health_check.path == "/healthz"
    assert web.targets[2].draining_since == NOW


def test_loads_from_toml() -> None:
    text = """
    [[load_balancers]]
    name = "web-nlb"
    lb_id = 1

    [[listeners]]
    lb = "web-nlb"
    vip = "10.100.0.10"
    port = 443
    protocol = "tcp"
    target_group = "web"

    [[target_groups]]
    name = "web"
    idle_timeout_tcp_s = 600
    targets = [{ ip = "10.1.0.11", port = 443 }, { ip = "10.1.0.12", port = 443, weight = 3 }]
    health_check = { interval_s = 5, timeout_s = 2, healthy_threshold = 2 }
    """
    config = NlbConfig.from_dict(tomllib.loads(text))
    assert config.listeners[0].protocol == "TCP" and config.listeners[0].ip_protocols == (6,)
    assert config.target_group("web").targets[1].weight == 3


@pytest.mark.parametrize("make, words", [
    (lambda: LoadBalancer("-web", 0), "load balancer name must be 1-32"),
    (lambda: LoadBalancer("x" * 33, 0), "load balancer name must be 1-32"),
    (lambda: LoadBalancer("web", -1), "Load balancer 'web': lb_id must be an integer"),
    (lambda: Listener("web", "10.100.0.300", 80, "TCP", "web"), "vip must be an IPv4 address"),
    (lambda: Listener("web", "224.0.0.1", 80, "TCP", "web"), "vip must be a unicast"),
    (lambda: Listener("web", "10.100.0.10", 0, "TCP", "web"), "port must be an integer from 1 to 65535"),
    (lambda: Listener("web", "10.100.0.10", 65536, "TCP", "web"), "port must be"),
    (lambda: Listener("web", "10.100.0.10", 80, "TLS", "web"), "protocol must be one of TCP, UDP, TCP_UDP"),
    (lambda: Target("10.1.0.11", 80, weight=0), "Target 10.1.0.11:80: weight must be an integer from 1"),
    (lambda: Target("10.1.0.11", 80, state="up"), "state must be one of"),
    (lambda: Target("10.1.0.11", 80, state="draining"), "draining_since must be set exactly"),
    (lambda: Target("10.1.0.11", 80, draining_since=NOW), "draining_since must be set exactly"),
    (lambda: Target("fe80::1", 80), "ip must be an IPv4 address"),
    (lambda: TargetGroup("web", deregistration_delay_s=3601), "deregistration_delay_s must be an integer from 0 to 3600"),
    (lambda: TargetGroup("web", deregistration_delay_s=-1), "deregistration_delay_s"),
    (lambda: TargetGroup("web", idle_timeout_tcp_s=59), "idle_timeout_tcp_s must be an integer from 60 to 6000"),
    (lambda: TargetGroup("web", idle_timeout_tcp_s=6001), "idle_timeout_tcp_s"),
    (lambda: TargetGroup("web", idle_timeout_udp_s=10), "idle_timeout_udp_s"),
    (lambda: TargetGroup("web", reset_on_unhealthy="yes"), "reset_on_unhealthy must be true or false"),
    (lambda: TargetGroup("web", [Target("10.1.0.11", 80), Target("10.1.0.11", 80, weight=2)]),
     "target 10.1.0.11:80 is registered twice"),
])
def test_bad_values_are_rejected_naming_the_field(make, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        make()


@pytest.mark.parametrize("edit, words", [
    (lambda d: d["target_groups"][0]["health_check"].update(interval_s=1),
     "Target group 'web': health check interval_s must be between 5 and 300"),
    (lambda d: d["target_groups"][0]["targets"][0].update(weight=-2),
     "Target group 'web': target 10.1.0.11:80: weight"),
    (lambda d: d["target_groups"][0]["targets"][0].update(colour="red"),
     "Target group 'web': a target has no field 'colour'"),
    (lambda d: d["target_groups"][0]["targets"][0].pop("port"),
     "Target group 'web': a target needs the field 'port'"),
    (lambda d: d["listeners"][0].update(target_group="api"), "there is no target group 'api'"),
    (lambda d: d["listeners"][0].update(lb="other"), "there is no load balancer 'other'"),
    (lambda d: d["listeners"][1].update(port=80), "TCP_UDP overlaps the TCP listener"),
    (lambda d: d["load_balancers"].append({"name": "api", "lb_id": 0}), "lb_id 0 is used twice"),
    (lambda d: d["target_groups"].append({"name": "dns"}), "target group name 'dns' is used twice"),
    (lambda d: d.update(listeners={}), "listeners must be a list"),
    (lambda d: d.update(routes=[]), "no field 'routes'"),
    (lambda d: d["listeners"][0].update(vip=174325770), "vip must be an IPv4 address like"),
    (lambda d: d["listeners"][0].update(vip="255.255.255.255"), "vip must be a unicast"),
    (lambda d: d["listeners"][0].update(vip="0.0.0.0"), "vip must be a unicast"),
    (lambda d: d["target_groups"][0]["targets"][0].update(ip=167837707),
     "ip must be an IPv4 address like"),
    (lambda d: d["target_groups"][0].update(health_check=[]),
     "health check must be a table of fields, got"),
    (lambda d: d["target_groups"][0].update(health_check="fast"),
     "health check must be a table of fields, got 'fast'"),
])
def test_bad_config_dicts_are_rejected_saying_where(edit, words: str) -> None:
    data = sample()
    edit(data)
    with pytest.raises(ConfigError, match=words):
        NlbConfig.from_dict(data)


def test_udp_and_tcp_listeners_may_share_a_port() -> None:
    data = sample()
    data["listeners"][1].update(port=80, protocol="UDP")
    config = NlbConfig.from_dict(data)
    assert [listener.ip_protocols for listener in config.listeners] == [(6,), (17,)]


# --- draining -------------------------------------------------------------------------

def draining_group(delay: int = 300) -> TargetGroup:
    return TargetGroup("web", [Target("10.1.0.11", 80), Target("10.1.0.12", 80),
                               Target("10.1.0.13", 80)], deregistration_delay_s=delay)


def test_drain_ends_when_the_delay_has_passed_even_with_flows_left() -> None:
    group = draining_group(delay=300)
    leaving = group.deregister(Endpoint("10.1.0.12", 80), now=NOW)
    assert (leaving.state, leaving.draining_since) == ("draining", NOW)
    flows = {leaving.endpoint: 17}
    assert group.expired_drains(NOW + 299.9, flows) == []
    assert group.expired_drains(NOW + 300, flows) == [leaving]


def test_drain_ends_early_when_no_flow_is_left() -> None:
    group = draining_group(delay=300)
    leaving = group.deregister(Endpoint("10.1.0.12", 80), now=NOW)
    assert group.expired_drains(NOW + 1, {leaving.endpoint: 1}) == []
    assert group.expired_drains(NOW + 1, {leaving.endpoint: 0}) == [leaving]
    assert group.expired_drains(NOW + 1, {}) == [leaving]


def test_only_draining_targets_expire() -> None:
    group = draining_group()
    assert group.expired_drains(NOW + 10_000, {}) == []


def test_deregistering_twice_keeps_the_first_start() -> None:
    group = draining_group()
    group.deregister(Endpoint("10.1.0.12", 80), now=NOW)
    again = group.deregister(Endpoint("10.1.0.12", 80), now=NOW + 50)
    assert again.draining_since == NOW


def test_zero_delay_drains_immediately() -> None:
    group = draining_group(delay=0)
    leaving = group.deregister(Endpoint("10.1.0.11", 80), now=NOW)
    assert group.expired_drains(NOW, {leaving.endpoint: 5}) == [leaving]


def test_deregistering_an_unknown_target_is_an_error() -> None:
    with pytest.raises(ConfigError, match="has no target 10.9.9.9:80"):
        draining_group().deregister(Endpoint("10.9.9.9", 80), now=NOW)


# --- routing: health, fail open, Maglev ------------------------------------------------

def test_record_health_copies_checker_states_but_not_onto_draining_targets() -> None:
    group = draining_group()
    group.deregister(Endpoint("10.1.0.13", 80), now=NOW)
    group.record_health({t.endpoint: TargetHealth(state=HealthState.HEALTHY)
                         for t in group.targets})
    assert [t.state for t in group.targets] == ["healthy", "healthy", "draining"]


def test_routable_targets_are_healthy_ones_or_all_non_draining_when_none_is() -> None:
    group = draining_group()
    group.targets[0].state = "healthy"
    group.targets[1].state = "unhealthy"
    group.deregister(Endpoint("10.1.0.13", 80), now=NOW)
    assert [t.identity for t in group.routable_targets()] == ["10.1.0.11:80"]
    group.targets[0].state = "unhealthy"                       # none healthy: fail open
    assert [t.identity for t in group.routable_targets()] == ["10.1.0.11:80", "10.1.0.12:80"]


def test_maglev_backends_index_targets_and_leave_out_unroutable_ones() -> None:
    group = TargetGroup("web", [Target("10.1.0.11", 80, state="healthy"),
                                Target("10.1.0.12", 80, weight=3, state="healthy"),
                                Target("10.1.0.13", 80, state="unhealthy")])
    backends = group.maglev_backends()
    assert [(b.identity, b.weight) for b in backends] == \
        [("10.1.0.11:80", 1), ("10.1.0.12:80", 3), ("10.1.0.13:80", 0)]
    shares = Counter(build_table(backends))
    assert set(shares) == {0, 1}
    assert abs(shares[1] / shares[0] - 3) < 0.05


# --- what one node holds --------------------------------------------------------------------

@pytest.mark.parametrize("sizes, nat_ips, words", [
    ({"max_lbs": 1}, (), None),
    ({"max_lbs": 0}, (), "lb_id 0 is beyond this node's 0 load balancer slots"),
    ({"max_listeners": 2}, (), "2 listeners need 3 listener slots"),
    ({"max_targets": 3}, (), "4 targets are registered; this node holds at most 3"),
    ({}, ("10.100.0.10",), "Listener 10.100.0.10:80: the VIP is a NAT IP of this node"),
])
def test_a_config_beyond_a_nodes_capacity_is_refused(sizes, nat_ips, words) -> None:
    from hyperplane.datapath.loader import Sizes
    from hyperplane.nlb.dataplane import check_fits
    config = NlbConfig.from_dict(sample())
    if words is None:
        check_fits(config, Sizes(**sizes), nat_ips)
    else:
        with pytest.raises(ConfigError, match=words):
            check_fits(config, Sizes(**sizes), nat_ips)
