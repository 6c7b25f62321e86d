"""The lab's plan (hyperplane.lab.topology) is consistent. No root, nothing is built."""
import ipaddress

import pytest

from hyperplane import lab
from hyperplane.errors import ConfigError

ALL = [lab.LabConfig(prefix="hp", mode=m, attach=a) for m in lab.MODES for a in lab.ATTACH_MODES]


def _net(cidr):
    return ipaddress.ip_interface(cidr)


@pytest.mark.parametrize("cfg", ALL, ids=lambda c: f"{c.mode}-{c.attach}")
def test_addresses_unique_and_in_their_networks(cfg):
    t = lab.topology(cfg)
    addrs = [a for i in t["interfaces"] for a in i["addresses"]]
    ips = [_net(a).ip for a in addrs]
    assert len(ips) == len(set(ips)), "an address is used twice"
    client = ipaddress.ip_network(lab.CLIENT_NET)
    internet = ipaddress.ip_network(lab.INTERNET_NET)
    targets = ipaddress.ip_network(lab.TARGET_NET)
    for i in t["interfaces"]:
        for a in i["addresses"]:
            ip = _net(a).ip
            if i["role"] == "client" or i.get("side") == "inside":
                assert ip in client, a
            elif i["role"] in lab.TARGET_ROLES or i.get("side") == "target":
                assert ip in targets and ip.is_private, a
            else:
                assert ip in internet, a            # RFC 2544 benchmark space only
    for ip in t["internet_addresses"]:
        assert ipaddress.ip_address(ip) in internet


@pytest.mark.parametrize("cfg", ALL, ids=lambda c: f"{c.mode}-{c.attach}")
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
    # mode xdp: the node adds its NAT IP itself (hpctl nat up), as on a user's machine
    assert (f"{lab.NAT_IP}/32" in out0["addresses"]) == (cfg.mode != "xdp")


def test_gateways_only_in_xdp_mode():
    assert lab.topology(lab.LabConfig(mode="xdp"))["gateways"]
    assert lab.topology(lab.LabConfig(mode="xdp"))["nat_ips"] == [lab.NAT_IP]
    assert lab.topology(lab.LabConfig(mode="nft"))["nat_ips"] == [lab.NAT_IP]
    assert not lab.topology(lab.LabConfig(mode="kernel"))["nat_ips"]
    assert not lab.topology(lab.LabConfig(mode="nft"))["gateways"]


@pytest.mark.parametrize("cfg", ALL, ids=lambda c: f"{c.mode}-{c.attach}")
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


@pytest.mark.parametrize("cfg", ALL, ids=lambda c: f"{c.mode}-{c.attach}")
def test_no_static_neighbours_and_default_offloads(cfg):
    """The lab is a real network: neighbours are resolved by ARP and every interface keeps
    its default offloads (only attach "xdp" turns GRO on at the far ends, see below)."""
    t = lab.topology(cfg)
    assert "neighbours" not in t and "offloads_off" not in t


def test_the_node_routes_the_rest_of_the_internet_via_the_internet_host():
    for cfg in ALL:
        assert lab.topology(cfg)["routes"]["node"] == [{"dst": "default",
                                                        "gateway": lab.INET_IPS[0]}]


def test_route_back_to_clients_only_in_kernel_mode():
    for mode in lab.MODES:
        routes = lab.topology(lab.LabConfig(mode=mode))["routes"]["inet"]
        has_back = any(r["dst"] == lab.CLIENT_NET for r in routes)
        assert has_back == (mode == "kernel"), mode


def test_nft_ruleset_per_mode():
    xdp = lab.nft_ruleset(lab.LabConfig(mode="xdp"))
    assert "policy drop;" in xdp and "snat" not in xdp and 'counter name "forward"' in xdp
    # translated packets the data path hands the kernel to fragment carry its mark
    assert f'meta mark {lab.kernel_assist_mark():#x} counter name "assist" accept' in xdp
    assert xdp.index('name "assist"') < xdp.index('counter name "forward"')
    nft = lab.nft_ruleset(lab.LabConfig(mode="nft"))
    assert "policy accept;" in nft and f"snat ip to {lab.NAT_IP}" in nft
    kern = lab.nft_ruleset(lab.LabConfig(mode="kernel"))
    assert "policy accept;" in kern and "snat" not in kern


def test_native_xdp_turns_gro_on_at_the_far_ends_only():
    assert lab.topology(lab.LabConfig(mode="xdp", attach="xdp"))["gro_on"] == \
        ["client/cl0", "inet/inet0", "t1/eth0", "t2/eth0", "t3/eth0"]
    for c in ALL:
        if not (c.mode == "xdp" and c.attach == "xdp"):
            assert lab.topology(c)["gro_on"] == []


def test_names_and_node():
    t = lab.topology(lab.LabConfig(prefix="hpt7n"))
    assert t["namespaces"] == {"client": "hpt7n-client", "node": "hpt7n-node1",
                               "inet": "hpt7n-inet", "t1": "hpt7n-t1", "t2": "hpt7n-t2",
                               "t3": "hpt7n-t3"}
    assert t["node"]["ifnames"] == ["in0", "out0", "tg1", "tg2", "tg3"]
    assert t["node"]["name"] == "hpt7n-node1"          # never clobbers the user's lab
    assert lab.topology(lab.LabConfig())["node"]["name"] == "node1"


@pytest.mark.parametrize("bad", [dict(prefix=""), dict(prefix="Hp"), dict(prefix="a" * 13),
                                 dict(prefix="hp-x"), dict(mode="bridge"),
                                 dict(attach="generic"), dict(nlb="yes")])
def test_bad_config_is_refused(bad):
    with pytest.raises(ConfigError):
        lab.LabConfig(**bad).validate()


# --- the NLB part ------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", ALL, ids=lambda c: f"{c.mode}-{c.attach}")
def test_targets_each_on_their_own_subnet_behind_the_node(cfg):
    t = lab.topology(cfg)
    by = {(i["role"], i["ifname"]): i for i in t["interfaces"]}
    assert [x["name"] for x in t["targets"]] == list(lab.TARGET_ROLES)
    for x, tg in zip(t["targets"], lab.TARGET_IFNAMES):
        mine, node_side = by[(x["name"], "eth0")], by[("node", tg)]
        assert mine["addresses"] == [f"{x['ip']}/24"] and mine["peer"] == f"node/{tg}"
        assert node_side["addresses"] == [f"{x['gateway']}/24"]
        assert _net(mine["addresses"][0]).network == _net(node_side["addresses"][0]).network
        assert t["routes"][x["name"]] == [{"dst": "default", "gateway": x["gateway"]}]
    nets = {_net(a).network for x in t["targets"] for i in t["interfaces"]
            if i["role"] == x["name"] for a in i["addresses"]}
    assert len(nets) == 3


@pytest.mark.parametrize("cfg", ALL, ids=lambda c: f"{c.mode}-{c.attach}")
def test_vip_on_out0_unless_the_agent_adds_it(cfg):
    t = lab.topology(cfg)
    out0 = next(i for i in t["interfaces"] if i["ifname"] == "out0")
    # mode xdp: the node's agent adds the VIP when it applies the load balancer
    assert (f"{lab.VIP}/32" in out0["addresses"]) == (cfg.mode != "xdp")
    assert t["vip"] == lab.VIP and ipaddress.ip_address(lab.VIP) in \
        ipaddress.ip_network(lab.INTERNET_NET)
    assert lab.VIP != lab.NAT_IP


def test_nlb_per_mode():
    xdp = lab.topology(lab.LabConfig(mode="xdp"))["nlb"]
    assert xdp["enabled"] and xdp["by"] == "hyperplane"
    from hyperplane.fleet.store import DEFAULT_STORE
    assert xdp["store"] == DEFAULT_STORE          # hpctl lb's default: drives the default lab
    assert lab.topology(lab.LabConfig(prefix="hpt1", mode="xdp"))["nlb"]["store"] == \
        "/run/hyperplane/lab/hpt1-store.json"
    assert [(l["protocol"], l["port"], l["target_port"]) for l in xdp["listeners"]] == \
        [("TCP", 80, 8080), ("UDP", 53, 5353)]
    hap = lab.topology(lab.LabConfig(mode="haproxy"))["nlb"]
    assert hap["enabled"] and hap["by"] == "haproxy" and hap["store"] is None
    for mode in ("kernel", "nft"):
        assert not lab.topology(lab.LabConfig(mode=mode))["nlb"]["enabled"]
    assert not lab.topology(lab.LabConfig(mode="xdp", nlb=False))["nlb"]["enabled"]
    # mode haproxy forwards kernel-style; mode xdp drops what XDP did not redirect
    assert "policy accept;" in lab.nft_ruleset(lab.LabConfig(mode="haproxy"))
    assert lab.topology(lab.LabConfig(mode="haproxy"))["nat_ips"] == []


def test_nftlb_is_a_dnat_by_5tuple_hash_that_keeps_the_client_ip():
    """Mode nftlb: the kernel's own stateful L4 LB (conntrack DNAT) on VIP:80, the target
    chosen by a hash of the 5-tuple from a map of the three targets' :8080; no SNAT (the
    targets see the client and answer through the node), no route back to the clients."""
    cfg = lab.LabConfig(mode="nftlb")
    rules = lab.nft_ruleset(cfg)
    dnat = [line.strip() for line in rules.splitlines() if "dnat" in line]
    targets = ", ".join(f"{i} : {ip} . 8080" for i, ip in enumerate(lab.TARGET_IPS))
    assert dnat == [f"ip daddr {lab.VIP} tcp dport 80 dnat ip to jhash ip saddr . tcp sport "
                    f". ip daddr . tcp dport mod 3 seed {lab.NFTLB_HASH_SEED:#x} "
                    f"map {{ {targets} }}"]
    assert "type nat hook prerouting priority dstnat;" in rules
    assert "snat" not in rules and "masquerade" not in rules
    assert "policy accept;" in rules                  # the kernel forwards (and un-DNATs)
    t = lab.topology(cfg)
    assert t["nlb"]["enabled"] and t["nlb"]["by"] == "nftables" and t["nft"]["dnat"]
    assert [(l["vip"], l["protocol"], l["port"], l["target_port"]) for l in
            t["nlb"]["listeners"]] == [(lab.VIP, "TCP", 80, 8080)]
    assert t["nat_ips"] == [] and t["gateways"] == []
    assert all(r["dst"] != lab.CLIENT_NET for r in t["routes"]["inet"])
    out0 = next(i for i in t["interfaces"] if i["ifname"] == "out0")
    assert f"{lab.VIP}/32" in out0["addresses"]       # the node answers ARP for the VIP
    # --no-nlb: the same topology without the DNAT; no other mode has one
    off = lab.LabConfig(mode="nftlb", nlb=False)
    assert "dnat" not in lab.nft_ruleset(off) and not lab.topology(off)["nlb"]["enabled"]
    assert not lab.topology(off)["nft"]["dnat"]
    for mode in lab.MODES:
        if mode != "nftlb":
            assert "dnat" not in lab.nft_ruleset(lab.LabConfig(mode=mode)), mode
            assert not lab.topology(lab.LabConfig(mode=mode))["nft"]["dnat"], mode


def test_the_lab_nlb_config():
    from hyperplane.nlb.config import NlbConfig
    c = lab.nlb_config(lab.LabConfig())
    assert NlbConfig.from_dict(c.to_dict()).to_dict() == c.to_dict()     # round-trips
    assert [(lb.name, lb.lb_id) for lb in c.load_balancers] == [("lab-nlb", 0)]
    assert [(str(l.vip), l.port, l.protocol, l.target_group) for l in c.listeners] == \
        [(lab.VIP, 80, "TCP", "web"), (lab.VIP, 53, "UDP", "dns")]
    web, dns = c.target_group("web"), c.target_group("dns")
    assert [t.identity for t in web.targets] == [f"{ip}:8080" for ip in lab.TARGET_IPS]
    assert [t.identity for t in dns.targets] == [f"{ip}:5353" for ip in lab.TARGET_IPS]
    hc = web.health_check
    assert (hc.protocol, hc.interval_s, hc.timeout_s, hc.healthy_threshold,
            hc.unhealthy_threshold, hc.allow_fast) == ("tcp", 0.5, 0.4, 2, 2, True)
    assert dns.health_check.port == 8080          # UDP targets are checked over TCP


def test_haproxy_config_names_every_target():
    conf = lab.haproxy_config(lab.LabConfig(mode="haproxy"))
    assert "mode tcp" in conf and "balance roundrobin" in conf
    assert f"bind {lab.VIP}:80" in conf
    for ip in lab.TARGET_IPS:
        assert f"{ip}:8080 check" in conf


def test_stream_body_is_deterministic():
    a = b"".join(lab.stream_chunks(7, 200_000))
    assert len(a) == 200_000 and a == b"".join(lab.stream_chunks(7, 200_000))
    assert a != b"".join(lab.stream_chunks(8, 200_000))
    import hashlib
    assert lab.stream_sha256(7, 200_000) == hashlib.sha256(a).hexdigest()
