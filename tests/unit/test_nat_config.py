"""NAT gateway and node config: every malformed value is one sentence (ConfigError), and
what used to be accepted silently (overlapping inside networks, NAT IPs or names shared by
two gateways, 0.0.0.0 / 255.255.255.255 / integers as NAT IPs, floats and strings for
numbers, unknown keys) is refused."""
from __future__ import annotations

import pytest

from hyperplane.errors import ConfigError
from hyperplane.datapath.loader import Sizes
from hyperplane.nat.gateway import GatewayConfig, NodeConfig, check_gateways
from hyperplane.datapath.settings import Timeouts


def gw(name="gw1", gw_id=0, nat_ips=None, inside=None, **kw):
    return GatewayConfig(name, gw_id, ["198.18.0.100"] if nat_ips is None else nat_ips,
                         ["10.10.0.0/24"] if inside is None else inside, **kw)


@pytest.mark.parametrize("make, words", [
    (lambda: gw(nat_ips=["0.0.0.0"]), "NAT IP must be a unicast address, got 0.0.0.0"),
    (lambda: gw(nat_ips=["255.255.255.255"]), "NAT IP must be a unicast address"),
    (lambda: gw(nat_ips=["224.0.0.5"]), "NAT IP must be a unicast address"),
    (lambda: gw(nat_ips=[3323068516]), "nat_ips must be a list of strings"),
    (lambda: gw(nat_ips="198.18.0.100"), "nat_ips must be a list of strings"),
    (lambda: gw(nat_ips=[]), "nat_ips must list 1 to 8, got 0"),
    (lambda: gw(nat_ips=[f"198.18.0.{i}" for i in range(1, 10)]), "nat_ips must list 1 to 8"),
    (lambda: gw(nat_ips=["198.18.0.100", "198.18.0.100"]), "lists '198.18.0.100' twice"),
    (lambda: gw(inside=[10]), "inside_cidrs must be a list of strings"),
    (lambda: gw(inside={}), "inside_cidrs must be a list of strings"),
    (lambda: gw(inside=["10.0.0.0/8", "10.10.0.0/24"]), "10.0.0.0/8 and 10.10.0.0/24 overlap"),
    (lambda: gw(inside=["10.0.0.300/8"]), "inside network must be an IPv4 network"),
    (lambda: gw(nat_ips=["10.10.0.5"]), "NAT IP 10.10.0.5 lies inside an inside network"),
    (lambda: gw(port_min="1024"), "port_min must be an integer from 1 to 65535, got '1024'"),
    (lambda: gw(port_min=1024.0), "port_min must be an integer from 1 to 65535, got 1024.0"),
    (lambda: gw(port_max=True), "port_max must be an integer"),
    (lambda: gw(port_min=2000, port_max=1999), "port_min 2000 is above port_max 1999"),
    (lambda: gw(gw_id="1"), "gw_id must be an integer"),
    (lambda: gw(name=5), "gateway's name must be a non-empty string, got 5"),
    (lambda: gw(name=""), "gateway's name must be a non-empty string"),
])
def test_bad_gateway_values_are_refused_in_one_sentence(make, words):
    with pytest.raises(ConfigError, match=words):
        make()


@pytest.mark.parametrize("gateways, words", [
    ([gw("a", 0), gw("a", 1, ["198.18.0.101"], ["10.11.0.0/24"])], "Two gateways are named 'a'"),
    ([gw("a", 0), gw("b", 0, ["198.18.0.101"], ["10.11.0.0/24"])], "Two gateways have gw_id 0"),
    ([gw("a", 0), gw("b", 1, ["198.18.0.100"], ["10.11.0.0/24"])],
     "NAT IP 198.18.0.100 belongs to both gateway 'a' and gateway 'b'"),
    ([gw("a", 0), gw("b", 1, ["198.18.0.101"], ["10.10.0.128/25"])],
     "Inside networks 10.10.0.0/24 and 10.10.0.128/25 overlap"),
    ([gw("a", 0), gw("b", 1, ["10.10.0.9"], ["10.11.0.0/24"])],
     "NAT IP 10.10.0.9 of gateway 'b' lies inside network 10.10.0.0/24 of gateway 'a'"),
    ([gw("a", 16)], "gw_id 16 is beyond this node's 16 gateway slots"),
])
def test_gateways_of_one_node_are_checked_together(gateways, words):
    with pytest.raises(ConfigError, match=words):
        check_gateways(gateways, Sizes())


def test_gateways_that_fit_together_pass():
    check_gateways([gw("a", 0), gw("b", 1, ["198.18.0.101"], ["10.11.0.0/24"])], Sizes())


def test_inside_prefixes_beyond_the_map_are_refused():
    many = [f"10.{i}.0.0/16" for i in range(3)]
    with pytest.raises(ConfigError, match="3 inside networks; this node holds at most 2"):
        check_gateways([gw(inside=many)], Sizes(max_inside_prefixes=2))


@pytest.mark.parametrize("data, words", [
    ([], "A node config must be a table of fields, got []"),
    ({"colour": "red"}, "has no field 'colour'"),
    ({"ifnames": "eth0"}, "ifnames must be a list of strings, got 'eth0'"),
    ({"ifnames": ["eth0", "eth0"]}, "ifnames lists 'eth0' twice"),
    ({"netns": []}, "netns must be a non-empty string"),
    ({"xdp_mode": 1}, "xdp_mode must be a non-empty string"),
    ({"timeouts": []}, "timeouts must be a table of seconds by name"),
    ({"timeouts": {"udp": 30.5}}, "timeout udp must be whole seconds"),
    ({"timeouts": {"udp": True}}, "timeout udp must be whole seconds"),
    ({"timeouts": {"tcp": 30}}, "unknown timeout"),
    ({"gateways": {}}, "gateways must be a list, got {}"),
    ({"gateways": [["gw"]]}, "a gateway must be a table of fields"),
    ({"gateways": [{"name": "g", "nat_ips": ["198.18.0.1"]}]}, "needs the field 'inside_cidrs'"),
    ({"gateways": [{"name": "g", "nat_ips": ["198.18.0.1"], "inside_cidrs": ["10.0.0.0/8"],
                    "colour": "red"}]}, "a gateway has no field 'colour'"),
])
def test_bad_node_configs_are_refused_in_one_sentence(data, words):
    with pytest.raises(ConfigError, match=words.replace("[", r"\[").replace("]", r"\]")):
        NodeConfig.from_dict(data)


def test_a_node_config_numbers_its_gateways():
    cfg = NodeConfig.from_dict({"ifnames": ["in0", "out0"], "timeouts": {"udp": 30},
                                "gateways": [gw("a").to_dict() | {"gw_id": 5},
                                             {"name": "b", "nat_ips": ["198.18.0.101"],
                                              "inside_cidrs": ["10.11.0.7/24"]}]})
    assert [g.gw_id for g in cfg.gateways] == [5, 1]
    assert cfg.gateways[1].inside_cidrs == ["10.11.0.0/24"]
    assert cfg.timeouts == Timeouts(udp=30)
