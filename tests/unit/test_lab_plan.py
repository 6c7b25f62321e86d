"""The lab's plan (hyperplane.lab.topology) is consistent. No root, nothing is built."""
import ipaddress

import pytest

from hyperplane import lab
from hyperplane.errors import ConfigError

ALL = [lab.LabConfig(prefix="hp", mode=m, xdp_mode=x) for m in lab.MODES for x in lab.XDP_MODES]


def _net(cidr):
    return ipaddress.ip_interface(cidr)


@pytest.mark.parametrize("cfg", ALL, ids=lambda c: f"{c.mode}-{c.xdp_mode}")
def test_addresses_unique_and_in_their_networks(cfg):
    t = lab.topology(cfg)
    addrs = [a for i in t["interfaces"] for a in i["addresses"]]
    ips = [_net(a).ip for a in addrs]
    assert len(ips) == len(set(ips)), "an address is used twice"
    client = ipaddress.ip_network(lab.CLIENT_NET)
    internet = ipaddress.ip_network(lab.INTERNET_NET)
    for i in t["interfaces"]:
        for a in i["addresses"]:
            ip = _net(a).ip
            if i["role"] == "client" or i.get("side") == "inside":
                assert ip in client, a
            else:
                assert ip in internet, a            # RFC 2544 benchmark space only
    for ip in t["internet_addresses"]:
        assert ipaddress.ip_address(ip) in internet


@pytest.mark.parametrize("cfg", ALL, ids=lambda c: f"{c.mode}-{c.xdp_mode}")
def test_nat_ip_outside_every_client_subnet_and_on_out0(cfg):
    t = lab.topology(cfg)
    client_nets = [_net(a).network for i in t["interfaces"] if i["role"] == "client"
                   for a in i["addresses"]]
    for g in t["gateways"]:
        for nat_ip in g["nat_ips"]:
            assert all(ipaddress.ip_address(nat_ip) not in n for n in client_nets)
            assert ipaddress.ip_address(nat_ip) in ipaddress.ip_network(lab.INTERNET_NET)
        assert g["inside_cidrs"] == [lab.CLIENT_NET]
    out0 = next(i for i in t["interfaces"] if i["ifname"] == "out0")
    assert f"{lab.NAT_IP}/32" in out0["addresses"], "the kernel must answer ARP for the NAT IP"


def test_gateways_only_in_xdp_mode():
    assert lab.topology(lab.LabConfig(mode="xdp"))["gateways"]
    assert lab.topology(lab.LabConfig(mode="xdp"))["nat_ips"] == [lab.NAT_IP]
    assert lab.topology(lab.LabConfig(mode="nft"))["nat_ips"] == [lab.NAT_IP]
    assert not lab.topology(lab.LabConfig(mode="kernel"))["nat_ips"]
    assert not lab.topology(lab.LabConfig(mode="nft"))["gateways"]


@pytest.mark.parametrize("cfg", ALL, ids=lambda c: f"{c.mode}-{c.xdp_mode}")
def test_links_pair_interfaces_that_exist_and_peers_agree(cfg):
    t = lab.topology(cfg)
    by_name = {f"{i['role']}/{i['ifname']}": i for i in t["interfaces"]}
    ends = [e for l in t["links"] for e in (l["a"], l["b"])]
    assert sorted(ends) == sorted(by_name), "every interface is one end of exactly one link"
    for l in t["links"]:
        assert by_name[l["a"]]["peer"] == l["b"] and by_name[l["b"]]["peer"] == l["a"]
        # the two ends of a link share a subnet
        na = {_net(a).network for a in by_name[l["a"]]["addresses"] if not a.endswith("/32")}
        nb = {_net(a).network for a in by_name[l["b"]]["addresses"]}
        assert na & nb, l
    macs = [i["mac"] for i in t["interfaces"]]
    assert len(set(macs)) == len(macs)
    for m in macs:
        assert int(m.split(":")[0], 16) & 0b11 == 0b10, f"{m} is not locally administered unicast"


@pytest.mark.parametrize("cfg", ALL, ids=lambda c: f"{c.mode}-{c.xdp_mode}")
def test_neighbours_match_the_interfaces(cfg):
    t = lab.topology(cfg)
    mac_of_ip = {str(_net(a).ip): i["mac"] for i in t["interfaces"] for a in i["addresses"]}
    role_of_if = {(i["role"], i["ifname"]) for i in t["interfaces"]}
    for role, entries in t["neighbours"].items():
        for e in entries:
            assert (role, e["ifname"]) in role_of_if
            assert mac_of_ip[e["ip"]] == e["mac"], e
    # the node resolves every client and every internet host (bpf_fib_lookup needs it)
    node_ips = {e["ip"] for e in t["neighbours"]["node"]}
    assert node_ips == set(lab.CLIENT_IPS) | set(lab.INET_IPS)


def test_route_back_to_clients_only_in_kernel_mode():
    for mode in lab.MODES:
        routes = lab.topology(lab.LabConfig(mode=mode))["routes"]["inet"]
        has_back = any(r["dst"] == lab.CLIENT_NET for r in routes)
        assert has_back == (mode == "kernel"), mode


def test_nft_ruleset_per_mode():
    xdp = lab.nft_ruleset(lab.LabConfig(mode="xdp"))
    assert "policy drop;" in xdp and "snat" not in xdp and 'counter name "forward"' in xdp
    nft = lab.nft_ruleset(lab.LabConfig(mode="nft"))
    assert "policy accept;" in nft and f"snat ip to {lab.NAT_IP}" in nft
    kern = lab.nft_ruleset(lab.LabConfig(mode="kernel"))
    assert "policy accept;" in kern and "snat" not in kern


def test_native_xdp_turns_gro_back_on_at_the_far_ends_only():
    assert lab.topology(lab.LabConfig(mode="xdp", xdp_mode="native"))["gro_on"] == \
        ["client/cl0", "inet/inet0"]
    for c in ALL:
        if not (c.mode == "xdp" and c.xdp_mode == "native"):
            assert lab.topology(c)["gro_on"] == []


def test_names_and_node():
    t = lab.topology(lab.LabConfig(prefix="hpt7n"))
    assert t["namespaces"] == {"client": "hpt7n-client", "node": "hpt7n-node1",
                               "inet": "hpt7n-inet"}
    assert t["node"]["name"] == "hpt7n-node1"          # never clobbers the user's lab
    assert lab.topology(lab.LabConfig())["node"]["name"] == "node1"


@pytest.mark.parametrize("bad", [dict(prefix=""), dict(prefix="Hp"), dict(prefix="a" * 13),
                                 dict(prefix="hp-x"), dict(mode="bridge"),
                                 dict(xdp_mode="offload")])
def test_bad_config_is_refused(bad):
    with pytest.raises(ConfigError):
        lab.LabConfig(**bad).validate()
