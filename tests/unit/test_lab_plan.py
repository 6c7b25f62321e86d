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


# --- the multi-node lab (fleet_plan) -----------------------------------------------------

from hyperplane.lab import fleet_plan  # noqa: E402

FLEETS = [lab.LabConfig(prefix="hp", mode="kernel", nodes=n) for n in (2, 3, 4, 8, lab.MAX_NODES)]


def _link_subnets(t):
    """Each link's subnet: the one network both of its ends have an address in (a sync
    link's bridge end has none: the sync links share the bridge's network)."""
    by_end = {f"{i['role']}/{i['ifname']}": i for i in t["interfaces"]}
    nets = {}
    for link in t["links"]:
        a = {_net(x).network for x in by_end[link["a"]]["addresses"]}
        b = {_net(x).network for x in by_end[link["b"]]["addresses"]}
        if link["kind"] == "sync":
            assert a == set() and b == {ipaddress.ip_network(fleet_plan.SYNC_NET)}, link
            continue
        assert len(a & b) == 1, link
        nets[f"{link['a']}-{link['b']}"] = (a & b).pop()
    return nets


@pytest.mark.parametrize("cfg", FLEETS, ids=lambda c: f"{c.nodes}-nodes")
def test_fleet_addresses_unique_and_link_subnets_disjoint(cfg):
    t = lab.topology(cfg)
    ips = [_net(a).ip for i in t["interfaces"] for a in i["addresses"]]
    assert len(ips) == len(set(ips)), "an address is used twice"
    nets = list(_link_subnets(t).values()) + [ipaddress.ip_network(fleet_plan.SYNC_NET)]
    for k, a in enumerate(nets):
        for b in nets[k + 1:]:
            assert not a.overlaps(b), (a, b)
    # every node has its own inside and outside /24 and a sync address
    assert len(nets) == 1 + 2 * cfg.nodes + 1 + 3 + 1     # client, in/out per node, inet,
    #                                                      targets, sync
    for n in t["fleet_nodes"]:
        assert ipaddress.ip_address(n["in0"]).is_private
        assert ipaddress.ip_address(n["out0"]) in ipaddress.ip_network(lab.INTERNET_NET)
        assert ipaddress.ip_address(n["sync0"]) in ipaddress.ip_network(fleet_plan.SYNC_NET)


@pytest.mark.parametrize("cfg", FLEETS, ids=lambda c: f"{c.nodes}-nodes")
def test_fleet_resource_addresses_outside_every_link_subnet(cfg):
    t = lab.topology(cfg)
    internet = ipaddress.ip_network(lab.INTERNET_NET)
    resources = [ipaddress.ip_address(r["address"]) for r in t["resources"].values()]
    assert sorted(map(str, resources)) == sorted([lab.FLEET_NAT_IP, lab.FLEET_VIP])
    assert len(set(resources)) == 2
    for ip in resources:
        assert ip in internet
        assert all(ip not in net for net in _link_subnets(t).values()), ip
    # not the one-node lab's: that lab's NAT IP and VIP sit on its node-inet link
    assert {lab.FLEET_NAT_IP, lab.FLEET_VIP}.isdisjoint({lab.NAT_IP, lab.VIP})
    assert t["resources"] == {"nat-gw-1": {"kind": "nat", "address": lab.FLEET_NAT_IP},
                              "lab-nlb": {"kind": "nlb", "address": lab.FLEET_VIP}}
    # mode kernel: every node holds them on lo (a steered packet ends there)
    assert all(t["local_addresses"][f"node{i}"] == [f"{lab.FLEET_NAT_IP}/32",
                                                     f"{lab.FLEET_VIP}/32"]
               for i in range(1, cfg.nodes + 1))


@pytest.mark.parametrize("cfg", FLEETS, ids=lambda c: f"{c.nodes}-nodes")
def test_fleet_internet_side_and_inside_address_spaces(cfg):
    t = lab.topology(cfg)
    internet = ipaddress.ip_network(lab.INTERNET_NET)
    for i in t["interfaces"]:
        for a in i["addresses"]:
            ip = _net(a).ip
            outside = i["role"] in ("inet", "rout") or i["ifname"] == "out0"
            assert (ip in internet) == outside, (i["role"], i["ifname"], a)
            if not outside:
                assert ip.is_private, a


@pytest.mark.parametrize("cfg", FLEETS, ids=lambda c: f"{c.nodes}-nodes")
def test_fleet_links_peers_macs_and_namespaces(cfg):
    t = lab.topology(cfg)
    by_end = {f"{i['role']}/{i['ifname']}": i for i in t["interfaces"]}
    ends = [e for l in t["links"] for e in (l["a"], l["b"])]
    assert sorted(ends) == sorted(by_end), "every interface is one end of exactly one link"
    for l in t["links"]:
        assert by_end[l["a"]]["peer"] == l["b"] and by_end[l["b"]]["peer"] == l["a"]
        assert by_end[l["a"]]["mtu"] == by_end[l["b"]]["mtu"] == l["mtu"]
        assert (l["mtu"] == fleet_plan.SYNC_MTU) == (l["kind"] == "sync")
    macs = [i["mac"] for i in t["interfaces"]] + [t["bridge"]["mac"]]
    assert len(set(macs)) == len(macs)
    assert all(int(m.split(":")[0], 16) & 0b11 == 0b10 for m in macs)
    ns = t["namespaces"]
    assert list(ns) == ["client", "rin", *[f"node{i}" for i in range(1, cfg.nodes + 1)],
                        "rout", "inet", "t1", "t2", "t3", "sync"]
    assert all(name == f"hp-{role}" for role, name in ns.items())
    assert all(lab.namespace_pattern("hp").match(n) for n in ns.values())
    assert t["bridge"]["ports"] == [f"to-node{i}" for i in range(1, cfg.nodes + 1)]
    # every node's three fabric links, in0 to rin, out0 to rout, sync0 to the bridge
    for i in range(1, cfg.nodes + 1):
        got = {(l["a"], l["b"]) for l in fleet_plan.node_links(t, i)}
        assert got == {(f"rin/to-node{i}", f"node{i}/in0"), (f"rout/to-node{i}", f"node{i}/out0"),
                       (f"sync/to-node{i}", f"node{i}/sync0")}


@pytest.mark.parametrize("cfg", FLEETS, ids=lambda c: f"{c.nodes}-nodes")
def test_fleet_no_static_neighbours_and_default_offloads(cfg):
    t = lab.topology(cfg)
    assert "neighbours" not in t and "offloads_off" not in t and t["gro_on"] == []
    for attach in ("auto", "tc"):
        assert lab.topology(lab.LabConfig(mode="xdp", attach=attach, nodes=cfg.nodes))["gro_on"] == []


def test_fleet_native_xdp_turns_gro_on_at_the_peers_of_the_nodes_links():
    """A native bpf_redirect into a veth needs the peer ready for XDP frames: GRO on at the
    routers' and the bridge's ends of every node's links, nothing else."""
    t = lab.topology(lab.LabConfig(mode="xdp", attach="xdp", nodes=3))
    assert t["gro_on"] == [f"{end}/to-node{i}" for i in (1, 2, 3) for end in ("rin", "rout", "sync")]
    by_end = {f"{i['role']}/{i['ifname']}": i for i in t["interfaces"]}
    assert {by_end[e]["peer"].split("/")[1] for e in t["gro_on"]} == {"in0", "out0", "sync0"}


@pytest.mark.parametrize("cfg", FLEETS, ids=lambda c: f"{c.nodes}-nodes")
def test_fleet_routes(cfg):
    t = lab.topology(cfg)
    r = t["routes"]
    assert r["client"] == [{"dst": "default", "gateway": fleet_plan.INSIDE_ROUTER_IP}]
    assert r["inet"] == [{"dst": lab.INTERNET_NET, "gateway": fleet_plan.OUTSIDE_ROUTER_IP},
                         {"dst": lab.CLIENT_NET, "gateway": fleet_plan.OUTSIDE_ROUTER_IP}]
    for x in t["targets"]:
        assert r[x["name"]] == [{"dst": "default", "gateway": x["gateway"]}]
    for n in t["fleet_nodes"]:
        assert r[n["role"]] == [{"dst": "default", "gateway": n["outside_router"]},
                                {"dst": lab.CLIENT_NET, "gateway": n["inside_router"]},
                                {"dst": lab.TARGET_NET, "gateway": n["inside_router"]}]
    # the routers have only their connected networks in main: the steering does the rest
    assert r["rin"] == r["rout"] == r["sync"] == []


@pytest.mark.parametrize("cfg", FLEETS, ids=lambda c: f"{c.nodes}-nodes")
def test_fleet_steering(cfg):
    t = lab.topology(cfg)
    s = t["steering"]
    nat, nlb = fleet_plan.GROUP_IDS["nat-gw-1"], fleet_plan.GROUP_IDS["lab-nlb"]
    by_end = {(i["role"], i["ifname"]): i for i in t["interfaces"]}
    for router in ("rin", "rout"):
        nhs = s[router]["nexthops"]
        assert [(nh["id"], nh["node"]) for nh in nhs] == [(i, i) for i in range(1, cfg.nodes + 1)]
        for nh in nhs:
            # via the node's address on this router's link, out of the router's end of it
            mine = by_end[(router, nh["dev"])]
            node_end = by_end[tuple(mine["peer"].split("/"))]
            assert node_end["role"] == f"node{nh['node']}"
            assert [f"{nh['via']}/24"] == node_end["addresses"]
        assert s[router]["groups"] == {"nat-gw-1": nat, "lab-nlb": nlb}
        assert len({nh["id"] for nh in nhs} | {nat, nlb}) == cfg.nodes + 2
        assert s[router]["resilient"]["buckets"] >= 8 * fleet_plan.SHARD_SIZE
    assert s["rout"]["routes"] == [
        {"dst": f"{lab.FLEET_NAT_IP}/32", "table": "main", "resource": "nat-gw-1"},
        {"dst": f"{lab.FLEET_VIP}/32", "table": "main", "resource": "lab-nlb"},
        {"dst": lab.CLIENT_NET, "table": "main", "resource": "nat-gw-1"}]   # mode kernel
    assert s["rout"]["rules"] == []
    assert s["rin"]["routes"] == [{"dst": "default", "table": nat, "resource": "nat-gw-1"},
                                  {"dst": "default", "table": nlb, "resource": "lab-nlb"}]
    assert s["rin"]["rules"] == [
        {"from": lab.CLIENT_NET, "to": lab.INTERNET_NET, "table": nat, "priority": nat},
        {"from": lab.TARGET_NET, "to": lab.INTERNET_NET, "table": nlb, "priority": nlb}]
    assert all(rule["priority"] < 32766 for rule in s["rin"]["rules"])   # before main


@pytest.mark.parametrize("cfg", FLEETS, ids=lambda c: f"{c.nodes}-nodes")
def test_fleet_sysctls(cfg):
    t = lab.topology(cfg)
    sc = t["sysctls"]
    for router in ("rin", "rout"):
        assert sc[router]["net.ipv4.ip_forward"] == 1
        assert sc[router]["net.ipv4.fib_multipath_hash_policy"] == 1       # the 5-tuple
    # two independent routers: each hashes with its own seed
    assert sc["rin"]["net.ipv4.fib_multipath_hash_seed"] != \
        sc["rout"]["net.ipv4.fib_multipath_hash_seed"]
    for i in range(1, cfg.nodes + 1):
        assert sc[f"node{i}"]["net.ipv4.ip_forward"] == 1
    for role in ("client", "inet", "sync", "t1"):
        assert "net.ipv4.ip_forward" not in sc[role]
    assert all(v["net.ipv4.conf.all.rp_filter"] == 0 and
               v["net.ipv6.conf.all.disable_ipv6"] == 1 for v in sc.values())


@pytest.mark.parametrize("cfg", FLEETS, ids=lambda c: f"{c.nodes}-nodes")
def test_fleet_first_shards(cfg):
    shards = lab.topology(cfg)["shards"]
    k = min(fleet_plan.SHARD_SIZE, cfg.nodes)
    assert set(shards) == {"nat-gw-1", "lab-nlb"}
    for members in shards.values():
        assert len(members) == k == len(set(members))
        assert all(1 <= i <= cfg.nodes for i in members)
    if cfg.nodes > k:
        # each resource has a node outside its shard (the lab tests count it idle)
        assert shards["nat-gw-1"] != shards["lab-nlb"]
    if cfg.nodes == 4:
        assert shards == {"nat-gw-1": [1, 2, 3], "lab-nlb": [2, 3, 4]}


def test_one_node_plan_is_unchanged():
    """nodes=1 (the default) is the one-node lab exactly: nothing of the fleet in it."""
    import json
    for c in ALL:
        t = lab.topology(c)
        assert t == lab.topology(lab.LabConfig(prefix=c.prefix, mode=c.mode, attach=c.attach,
                                               nodes=1))
        assert list(t["namespaces"]) == ["client", "node", "inet", "t1", "t2", "t3"]
        text = json.dumps(t)
        for fleet_only in ('"rin"', '"rout"', '"sync"', '"steering"', '"shards"', "10.254.",
                           "198.19.", lab.FLEET_NAT_IP, lab.FLEET_VIP):
            assert fleet_only not in text, fleet_only
        assert (t["vip"], lab.NAT_IP) == ("198.18.0.200", "198.18.0.100")


@pytest.mark.parametrize("bad", [0, -1, lab.MAX_NODES + 1, True, "4", 2.0, None])
def test_bad_node_count_is_refused(bad):
    with pytest.raises(ConfigError, match="lab nodes must be"):
        lab.LabConfig(mode="kernel", nodes=bad).validate()


@pytest.mark.parametrize("mode", [m for m in lab.MODES if m not in ("kernel", "xdp")])
def test_multi_node_lab_runs_mode_xdp_or_kernel(mode):
    with pytest.raises(ConfigError, match="the multi-node lab runs mode xdp or kernel"):
        lab.LabConfig(mode=mode, nodes=4).validate()
    lab.LabConfig(mode=mode, nodes=1).validate()
    lab.LabConfig(mode="kernel", nodes=4).validate()
    lab.LabConfig(mode="xdp", nodes=4).validate()


@pytest.mark.parametrize("store, nodes, ok", [
    (None, 1, True), (None, 4, True), ("etcd://127.0.0.1:2379", 4, True),
    ("/tmp/x.json", 2, True), ("etcd://127.0.0.1:2379", 1, False), ("", 4, False),
    (5, 4, False)])
def test_lab_store_option(store, nodes, ok):
    cfg = lab.LabConfig(mode="xdp", nodes=nodes, store=store)
    if ok:
        cfg.validate()
        assert lab.store_url(cfg) == (store or lab.store_path("hp"))
    else:
        with pytest.raises(ConfigError, match="store"):
            cfg.validate()


def test_namespace_pattern_is_the_prefixes_own():
    p = lab.namespace_pattern("hp")
    for name in ("hp-client", "hp-node1", "hp-node12", "hp-rin", "hp-rout", "hp-sync",
                 "hp-inet", "hp-t3"):
        assert p.match(name), name
    for name in ("hpt1-client", "hp-node", "hp-nodex", "xhp-rin", "hp-client2", "hp-"):
        assert not p.match(name), name


@pytest.mark.parametrize("current, live, want", [
    ([1, 2, 3], [2, 3, 4], [4, 2, 3]),          # the new member takes the leaver's place
    ([1, 2, 3], [1, 2, 4], [1, 2, 4]),
    ([1, 3], [1, 2, 3], [1, 3, 2]),              # a restored member goes last
    ([3, 1, 2], [1, 2, 3, 4], [3, 1, 2, 4]),     # survivors keep their order
    ([1, 2, 3], [2], [2]),
    ([1, 2, 3], [4, 5], [4, 5]),
    ([], [3, 1, 2], [1, 2, 3]),                  # a new group: by node index
])
def test_group_order_keeps_every_survivor_in_its_place(current, live, want):
    assert fleet_plan.group_order(current, live) == want


# --- the multi-node lab in mode xdp (the fleet) and its controller ------------------------

from hyperplane.lab import controller  # noqa: E402
from hyperplane.lab.fleet_build import fleet_records  # noqa: E402

XDP_FLEETS = [lab.LabConfig(prefix=p, mode="xdp", attach=a, nodes=n)
              for p, a, n in (("hp", "auto", 2), ("hp", "tc", 4), ("x7", "xdp", 4),
                              ("x7", "auto", lab.MAX_NODES))]


@pytest.mark.parametrize("cfg", XDP_FLEETS, ids=lambda c: f"{c.prefix}-{c.attach}-{c.nodes}")
def test_fleet_xdp_plan(cfg):
    t = lab.topology(cfg)
    f = t["fleet"]
    assert f["enabled"] and f["nlb"] and f["attach"] == cfg.attach
    assert f["datapath_ifnames"] == ["in0", "out0", "sync0"] and f["sync_dev"] == "sync0"
    assert f["store"] == lab.store_path(cfg.prefix)
    assert t["gateways"] == [{"name": "nat-gw-1", "gw_id": 0, "nat_ips": [lab.FLEET_NAT_IP],
                              "inside_cidrs": [lab.CLIENT_NET]}]
    # nothing on lo (the node adds the NAT IP to out0, the agent the VIP); no way back to
    # the clients' own addresses: only translated traffic returns
    assert all(a == [] for a in t["local_addresses"].values())
    assert {"dst": lab.CLIENT_NET, "gateway": fleet_plan.OUTSIDE_ROUTER_IP} not in t["routes"]["inet"]
    assert all(r["dst"] != lab.CLIENT_NET for r in t["steering"]["rout"]["routes"])
    assert "policy drop" in t["node_nft"]
    names = [n["name"] for n in t["fleet_nodes"]]
    assert len(set(names)) == cfg.nodes
    for n in t["fleet_nodes"]:
        assert fleet_plan.node_index(cfg, n["name"]) == n["index"]
    kernel = lab.topology(lab.LabConfig(prefix=cfg.prefix, mode="kernel", nodes=cfg.nodes))
    assert not kernel["fleet"]["enabled"] and kernel["gateways"] == []


def test_fleet_node_names():
    from hyperplane.node.lifecycle import check_node_name
    hp, x = lab.LabConfig(mode="xdp", nodes=12), lab.LabConfig(prefix="hpt123m", mode="xdp",
                                                                nodes=lab.MAX_NODES)
    assert fleet_plan.node_name(hp, 1) == "node1"     # hpctl's default --node
    assert fleet_plan.node_name(x, 32) == "hpt123m-node32"
    for cfg in (hp, x):
        for i in range(1, cfg.nodes + 1):
            name = fleet_plan.node_name(cfg, i)
            assert check_node_name(name) == name
            assert fleet_plan.node_index(cfg, name) == i
    for bad in ("node0", "node13", "node01", "node", "nodex", "hp-node1", "x-node1", "", None, 3):
        assert fleet_plan.node_index(hp, bad) is None, bad
    assert fleet_plan.node_index(x, "node1") is None
    assert fleet_plan.node_index(x, "hpt123m-node33") is None


def test_fleet_store_resources_are_the_clusters_names():
    from hyperplane.fleet.cluster import lb_resource, nat_resource
    assert fleet_plan.STORE_RESOURCES == {nat_resource("nat-gw-1"): "nat-gw-1",
                                          lb_resource(lab.LB_NAME): lab.LB_NAME}
    assert set(fleet_plan.STORE_RESOURCES.values()) == set(fleet_plan.RESOURCES)


def test_fleet_store_records():
    from hyperplane.fleet.cluster import resources
    from hyperplane.fleet.store import FileStore
    from hyperplane.nat.gateway import GatewayConfig
    from hyperplane.nlb.config import NlbConfig
    cfg = lab.LabConfig(prefix="x7", mode="xdp", nodes=4)
    rec = fleet_records(cfg, lab.topology(cfg))
    assert sorted(rec) == ["/nat", "/nlb"]
    (gw,) = rec["/nat"]["gateways"]
    assert gw["shard_size"] == fleet_plan.SHARD_SIZE
    assert GatewayConfig(**{k: v for k, v in gw.items() if k != "shard_size"}).nat_ips == \
        [lab.FLEET_NAT_IP]
    nlb = NlbConfig.from_dict(rec["/nlb"])
    assert {str(l.vip) for l in nlb.listeners} == {lab.FLEET_VIP}
    assert [lb.name for lb in nlb.load_balancers] == [lab.LB_NAME]
    assert rec["/nlb"]["load_balancers"][0].get("shard_size", fleet_plan.SHARD_SIZE) == \
        fleet_plan.SHARD_SIZE
    # what the agents' ensure_shards reads from them
    import tempfile, os
    with tempfile.TemporaryDirectory() as d:
        store = FileStore(os.path.join(d, "s.json"))
        for k, v in rec.items():
            store.put(k, v)
        got = resources(store)
    assert got["nat:nat-gw-1"] == fleet_plan.SHARD_SIZE and "lb:lab-nlb" in got
    no_nlb = lab.LabConfig(prefix="x7", mode="xdp", nodes=4, nlb=False)
    assert sorted(fleet_records(no_nlb, lab.topology(no_nlb))) == ["/nat"]
    # the one-node lab's NLB is unchanged
    assert {str(l.vip) for l in lab.nlb_config(lab.LabConfig()).listeners} == {lab.VIP}


def _member(name, ready=True, id=0):
    return {"name": name, "id": id, "sync_ip": "10.253.0.1", "mac": "02:00:00:00:00:01",
            "epoch": 1, "ready": ready}


def _listing(members, shards):
    out = {f"/nodes/{m['name']}": m for m in members}
    out["/shards"] = {"nodes": sorted({n for s in shards.values() for n in s}), "bound": None,
                      "shards": {r: list(s) for r, s in shards.items()},
                      "sizes": {r: len(s) for r, s in shards.items()}}
    out["/nlb"] = {"load_balancers": []}
    return out


CFG4 = lab.LabConfig(prefix="hpt9m", mode="xdp", nodes=4)
N = [fleet_plan.node_name(CFG4, i) for i in range(0, 5)]          # N[1]..N[4]
SHARDS = {"nat:nat-gw-1": [N[1], N[2], N[4]], "lb:lab-nlb": [N[2], N[3], N[4]]}


@pytest.mark.parametrize("members, want", [
    # all live and ready: each resource to its whole shard
    ([_member(N[i]) for i in (1, 2, 3, 4)], {"nat-gw-1": [1, 2, 4], "lab-nlb": [2, 3, 4]}),
    # node 2 dead (no record), node 4 live but not ready
    ([_member(N[1]), _member(N[3]), _member(N[4], ready=False)],
     {"nat-gw-1": [1], "lab-nlb": [3]}),
    # no live member of the NLB's shard: left out (its routes stay as they were)
    ([_member(N[1])], {"nat-gw-1": [1]}),
    ([], {}),
    # a record of a node that is not the lab's, or a damaged one, counts for nothing
    ([_member("other-node2"), {"name": N[3]}, _member(N[2], ready="yes")], {}),
])
def test_controller_desired_routes(members, want):
    listing = _listing([m for m in members if "id" in m], SHARDS)
    for m in members:
        if "id" not in m:
            listing[f"/nodes/{m['name']}"] = m      # damaged: only a name
    if any(m["name"] == "other-node2" for m in members):
        listing["/shards"]["shards"]["nat:nat-gw-1"] = [N[1], "other-node2"]
    assert controller.desired_routes(listing, CFG4) == want


def test_controller_desired_routes_reads_entries_and_ignores_the_rest():
    from hyperplane.fleet.store import Entry, Listing
    plain = _listing([_member(N[i], id=i) for i in (1, 2, 3, 4)], {
        **SHARDS, "nat:other-gw": [N[1]], "lb:other-lb": [N[3]]})
    plain["/nodes/x"] = _member("y")                  # a record under another node's key
    listing = Listing({k: Entry(k, v, 7) for k, v in plain.items()}, revision=9)
    assert controller.desired_routes(listing, CFG4) == {"nat-gw-1": [1, 2, 4],
                                                        "lab-nlb": [2, 3, 4]}
    v = controller.view(listing, CFG4)
    assert sorted(v["members"]) == N[1:]
    assert v["members"][N[3]] == {"index": 3, "id": 3, "ready": True, "epoch": 1}
    assert v["shards"] == {"nat-gw-1": {"nodes": SHARDS["nat:nat-gw-1"], "indexes": [1, 2, 4]},
                           "lab-nlb": {"nodes": SHARDS["lb:lab-nlb"], "indexes": [2, 3, 4]}}
    # no shards yet, or a damaged /shards: nothing to steer
    for bad in (None, 5, {"shards": 3}, {"shards": {"nat:nat-gw-1": "node1"}}):
        damaged = dict(plain)
        if bad is None:
            del damaged["/shards"]
        else:
            damaged["/shards"] = bad
        assert controller.desired_routes(damaged, CFG4) == {}


def test_controller_runs_as_a_module():
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "hyperplane.lab", "controller", "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--store" in r.stdout, r.stderr
    r = subprocess.run([sys.executable, "-m", "hyperplane.lab", "serve", "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--udp-port" in r.stdout, r.stderr
