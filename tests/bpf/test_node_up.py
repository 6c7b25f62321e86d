"""`nat up` (hyperplane.node.start_nat_node) is all or nothing, and the node answers for
its NAT IPs.

A private node namespace has an outside veth (out0, 198.18.0.1/24) whose peer sits in a
second namespace (the "internet", 198.18.0.2/24), and an inside veth pair (in0); nothing
is connected to the host. Node state files go to a temporary directory."""
from __future__ import annotations

import os

import pytest

from hyperplane import netns
from hyperplane.codec import be32_to_ip
from hyperplane.errors import ConfigError
from hyperplane.datapath.loader import PIN_ROOT
from hyperplane.nat.gateway import GatewayConfig

NS = f"hpt-cfg-{os.getpid()}"
PEER = f"hpt-cfg-{os.getpid()}-o"
NODE = f"hpt-cfg-{os.getpid()}"
PINS = os.path.join(PIN_ROOT, NODE)
IFNAMES = ["in0", "out0"]
TC_INGRESS = 0xFFFFFFF2  # TC_H_MAKE(TC_H_CLSACT, TC_H_MIN_INGRESS)


def gateway(*nat_ips, inside="10.10.0.0/24", name="gw", gw_id=0):
    return GatewayConfig(name, gw_id, list(nat_ips), [inside])


@pytest.fixture
def node(tmp_path, monkeypatch):
    """The node's module with its state dir in tmp_path, inside the test namespaces."""
    if os.geteuid() != 0:
        pytest.fail("these tests need root (XDP, network namespaces); run scripts/test as "
                    "root", pytrace=False)
    from hyperplane.node import lifecycle as node_mod
    monkeypatch.setattr(node_mod, "NODE_STATE_DIR", str(tmp_path))
    for ns in (NS, PEER):
        netns.remove(ns)
        netns.create(ns)
        netns.set_up(ns, "lo")
    try:
        netns.veth(NS, "out0", PEER, "inet0")
        netns.veth(NS, "in0", NS, "in0p")
        netns.add_address(NS, "out0", "198.18.0.1/24")
        netns.add_address(NS, "in0", "10.10.0.1/24")
        netns.add_address(PEER, "inet0", "198.18.0.2/24")
        yield node_mod
    finally:
        try:
            node_mod.stop_node(NODE)
        finally:
            for ns in (NS, PEER):
                netns.remove(ns)


def addrs(ns=NS) -> dict[str, tuple[str, str]]:
    """ip/32 -> (interface, label) of the namespace's /32 addresses."""
    return {a["address"]: (a["ifname"], a["label"]) for a in netns.ipv4_addresses(ns)
            if a["prefixlen"] == 32}


def answers(ip: str) -> bool:
    """Does the node answer a ping to ip from the outside (ARP first)?"""
    return netns.run_in(PEER, ["ping", "-c", "1", "-W", "2", ip], check=False,
                        capture_output=True).returncode == 0


def map_nat_ips(dp) -> set[str]:
    return {be32_to_ip(k.value) for k in dp.table("nat_ips").keys()}


def attached(ifname: str):
    """How the data path is attached to ifname: ("xdp", mode), ("tc", bpf filters on the
    ingress hook), or None. A rolled-back change may re-attach the newly loaded program,
    on the same pinned maps: its id may change, the hook and mode may not."""
    xdp = {link["ifname"]: link["xdp"] for link in netns.links(NS)}[ifname]
    if xdp:
        return "xdp", xdp["mode"]
    with netns.ipr(NS) as ip:
        tc = [f for f in ip.get_filters(index=ip.link_lookup(ifname=ifname)[0],
                                        parent=TC_INGRESS) if f.get_attr("TCA_KIND") == "bpf"]
    return ("tc", len(tc)) if tc else None


def test_nat_up_adds_its_nat_ips_removes_them_again_and_leaves_the_users_alone(node):
    netns.add_address(NS, "out0", "198.18.0.101/32")      # the user's, before hyperplane
    assert not answers("198.18.0.100"), "the NAT IP answers before hyperplane added it"

    dp = node.start_nat_node(NODE, IFNAMES, [
        gateway("198.18.0.100", "198.18.0.101"),
        gateway("198.18.0.103", name="gw2", gw_id=1, inside="10.11.0.0/24")], netns=NS)
    assert addrs()["198.18.0.100"] == ("out0", "out0:hp")
    assert addrs()["198.18.0.101"] == ("out0", "out0"), "the user's address was changed"
    assert answers("198.18.0.100"), "the node does not answer for its NAT IP"
    assert [a["ip"] for a in node.node_state(NODE)["addresses"]] == ["198.18.0.100",
                                                                     "198.18.0.103"]

    # a re-run without .100, .103, gw2 and 10.10.0.0/24: they go; the user's .101 stays
    node.start_nat_node(NODE, IFNAMES, [gateway("198.18.0.101", "198.18.0.102",
                                                inside="10.12.0.0/24")], netns=NS)
    assert addrs()["198.18.0.102"] == ("out0", "out0:hp") and "198.18.0.101" in addrs()
    assert "198.18.0.100" not in addrs() and "198.18.0.103" not in addrs()
    assert map_nat_ips(dp) == {"198.18.0.101", "198.18.0.102"}, "an old NAT IP stayed"
    inside = dp.table("inside_nets")
    assert {f"{be32_to_ip(k.addr)}/{k.prefixlen}" for k in inside.keys()} == {"10.12.0.0/24"}
    gateways = dp.table("gateways")
    assert gateways[gateways.Key(1)].n_nat_ips == 0, "the dropped gateway's slot stayed"

    node.stop_node(NODE)
    assert "198.18.0.102" not in addrs(), "nat down left the NAT IP it added"
    assert "198.18.0.101" in addrs(), "nat down removed the user's address"


def test_a_nat_ip_that_is_a_vip_of_the_node_is_refused(node):
    from hyperplane.nlb.dataplane import NlbDataplane
    from hyperplane.nlb.config import NlbConfig
    dp = node.start_nat_node(NODE, IFNAMES, [gateway("198.18.0.100")], netns=NS)
    NlbDataplane(dp).apply(NlbConfig.from_dict({
        "load_balancers": [{"name": "lb", "lb_id": 0}], "target_groups": [{"name": "web"}],
        "listeners": [{"lb": "lb", "vip": "198.18.0.200", "port": 80, "protocol": "TCP",
                       "target_group": "web"}]}))
    state = node.node_state(NODE)
    with pytest.raises(ConfigError, match="NAT IP 198.18.0.200 is a load balancer VIP"):
        node.start_nat_node(NODE, IFNAMES, [gateway("198.18.0.200")], netns=NS)
    assert node.node_state(NODE) == state and map_nat_ips(dp) == {"198.18.0.100"}
    assert "198.18.0.200" not in addrs()


def test_a_nat_ip_goes_on_the_default_routes_interface_or_the_one_named(node):
    far = gateway("203.0.113.5")                 # in no connected network
    with pytest.raises(ConfigError, match="--outside-if"):
        node.start_nat_node(NODE, IFNAMES, [far], netns=NS)
    assert not os.path.exists(PINS) and not node.node_exists(NODE)

    node.start_nat_node(NODE, IFNAMES, [far], netns=NS, outside_if="out0")
    assert addrs()["203.0.113.5"] == ("out0", "out0:hp")

    netns.add_route(NS, "default", gateway="198.18.0.2")
    node.start_nat_node(NODE, IFNAMES, [gateway("203.0.113.6")], netns=NS)
    assert addrs()["203.0.113.6"] == ("out0", "out0:hp")
    assert "203.0.113.5" not in addrs()


def test_a_failed_nat_up_of_a_new_node_leaves_nothing_behind(node):
    with pytest.raises(ConfigError, match="mode must be one of"):   # checked before loading
        node.start_nat_node(NODE, IFNAMES, [gateway("198.18.0.100")], netns=NS, mode="bogus")
    assert not os.path.exists(PINS)
    # lo has no native XDP: found when attaching, after compiling, writing the maps and
    # attaching to in0 and out0
    with pytest.raises(ConfigError, match="cannot attach the data path .* to lo"):
        node.start_nat_node(NODE, [*IFNAMES, "lo"], [gateway("198.18.0.100")], netns=NS,
                            mode="xdp")
    assert not os.path.exists(PINS), "pinned maps without a node were left behind"
    assert not node.node_exists(NODE)
    assert "198.18.0.100" not in addrs()
    assert attached("in0") is None and attached("out0") is None, "still attached"


def test_a_failed_nat_up_of_a_running_node_leaves_it_as_it_was(node):
    dp = node.start_nat_node(NODE, IFNAMES, [gateway("198.18.0.100")], netns=NS)
    state, hooks, ours = node.node_state(NODE), {i: attached(i) for i in IFNAMES}, addrs()
    assert all(hooks.values()), hooks

    def unchanged():
        assert node.node_state(NODE) == state
        assert {i: attached(i) for i in IFNAMES} == hooks, "the data path was detached"
        assert addrs() == ours
        assert map_nat_ips(dp) == {"198.18.0.100"}
        assert answers("198.18.0.100")

    # found before anything changes: an interface that is not there, a bad second gateway
    with pytest.raises(ConfigError, match="no interface 'nope'"):
        node.start_nat_node(NODE, [*IFNAMES, "nope"], [gateway("198.18.0.100")], netns=NS)
    unchanged()
    with pytest.raises(ConfigError, match="overlap"):
        node.start_nat_node(NODE, IFNAMES, [gateway("198.18.0.100"),
                                            gateway("198.18.0.110", name="gw2", gw_id=1,
                                                    inside="10.10.0.128/25")], netns=NS)
    unchanged()
    # found after compiling, writing the maps and moving in0 and out0 to native XDP (lo
    # has none): every step is undone
    with pytest.raises(ConfigError, match="cannot attach the data path .* to lo"):
        node.start_nat_node(NODE, [*IFNAMES, "lo"], [gateway("198.18.0.120")], netns=NS,
                            mode="xdp")
    unchanged()
