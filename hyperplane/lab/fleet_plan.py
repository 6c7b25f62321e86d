"""The multi-node lab's plan (`hpctl lab up --nodes N`, N >= 2), pure data like plan.py:
namespaces, links, addresses, routes, sysctls, the two fabric routers' steering (nexthops,
resilient groups, routes, rules) and the lab's first shards. Tested without root
(tests/unit/test_lab_plan.py); built by fleet_build.py, steered by fabric.py.

    {p}-client ── {p}-rin ──┬── in0 {p}-node1 out0 ──┬── {p}-rout ── {p}-inet
    10.10.0.10     inside   ├── in0 {p}-node2 out0 ──┤   outside     198.18.0.2
    10.10.0.11     router   ├── ...                  │   router      198.18.0.3
                     │      └── in0 {p}-nodeN out0 ──┘
                     ├── {p}-t1 10.20.1.10       every node's sync0 ── br0 in {p}-sync
                     ├── {p}-t2 10.20.2.10       (10.253.0.i/24, MTU 9000)
                     └── {p}-t3 10.20.3.10

Node i's links are point-to-point /24s: inside 10.254.i.0/24 (router .1, node .2) and
outside 198.19.i.0/24 (router .1, node .2; inside 198.18.0.0/15 like every "internet"
address). The resources' addresses sit outside every link subnet: the NAT gateway's NAT IP
198.18.100.1 and the NLB's VIP 198.18.200.1.

Mode xdp (the fleet): every node runs the hyperplane data path on in0, out0 and sync0 and a
fleet agent (a member of the fleet in the lab's store); the lab controller
(hyperplane/lab/controller.py) steers each resource to its shard's live and ready members.
Mode kernel: the nodes only forward, the first shards stay as `up` set them.

Steering: each router has one nexthop per node (id = the node's index, via the node's
address on that router's link) and one resilient nexthop group per resource (its shard's
nodes). The outside router routes the NAT IP and the VIP to their groups; the inside
router sends the client network's traffic toward the internet to the NAT gateway's group
and the targets' answers to internet clients to the NLB's group (policy routing, so the
nodes' own traffic to the targets, e.g. health checks, is not steered). Both routers hash
the 5-tuple (fib_multipath_hash_policy=1), each with its own seed, as two independent
routers would: the forward and the reply packets of one flow pick their nodes
independently.
"""
from __future__ import annotations

from hyperplane.errors import ConfigError
from hyperplane.lab.plan import (CLIENT_IPS, CLIENT_NET, INET_IPS, INTERNET_NET, LB_NAME,
                                 LabConfig, MAX_NODES, TARGET_GATEWAYS, TARGET_IPS, TARGET_NET,
                                 TARGET_ROLES, _pin_root, gateways, nft_ruleset, store_url)

# The resources the fabric steers: name -> (kind, address). The names are the one-node
# lab's NAT gateway and NLB; the addresses are the fleet's own, outside every link subnet.
NAT_GATEWAY = gateways(LabConfig())[0]["name"]      # "nat-gw-1"
FLEET_NAT_IP = "198.18.100.1"
FLEET_VIP = "198.18.200.1"
RESOURCES = {NAT_GATEWAY: ("nat", FLEET_NAT_IP), LB_NAME: ("nlb", FLEET_VIP)}
# The lab's first shards, until a controller assigns shuffle shards (hyperplane.fleet.shards)
# with Fabric.set_shard: the NAT gateway on the first SHARD_SIZE nodes, the NLB on the last
# SHARD_SIZE, so with 4 nodes each resource has a node outside its shard.
SHARD_SIZE = 3

# The store names the same resources "nat:<gateway>" and "lb:<load balancer>"
# (hyperplane.fleet.cluster.nat_resource / lb_resource): store name -> fabric name.
STORE_RESOURCES = {f"nat:{NAT_GATEWAY}": NAT_GATEWAY, f"lb:{LB_NAME}": LB_NAME}
# Mode xdp: where each node's data path is attached (second-chance packets arrive on sync0)
NODE_DATAPATH_IFNAMES = ["in0", "out0", "sync0"]
SYNC_DEV = "sync0"

ROUTERS = ("rin", "rout")
INSIDE_ROUTER_IP = "10.10.0.1"          # the clients' gateway
OUTSIDE_ROUTER_IP = "198.18.0.1"        # the internet host's way to the fleet
SYNC_NET = "10.253.0.0/24"
SYNC_MTU = 9000
SYNC_BRIDGE = "br0"

# Per resource: its nexthop group id on both routers and, on the inside router, the routing
# table (and rule priority) of its policy route. Node i's nexthop id is i (< 1000).
GROUP_IDS = {NAT_GATEWAY: 1001, LB_NAME: 1002}
# Resilient groups: 128 buckets (43/43/42 over 3 nodes). A bucket that carried no packet
# for IDLE_TIMER_S may move to an underweight (new or restored) node; a busy one never
# moves (unbalanced timer 0): only a removed node's buckets move at once.
RESILIENT = {"buckets": 128, "idle_timer": 1, "unbalanced_timer": 0}
# fib_multipath_hash_seed per router: two independent routers hash independently.
HASH_SEEDS = {"rin": 0x68700001, "rout": 0x68700002}


def validate_fleet(cfg: LabConfig) -> LabConfig:
    cfg.validate()
    if cfg.nodes < 2:
        raise ConfigError(f"the multi-node plan needs 2 to {MAX_NODES} nodes, not {cfg.nodes}")
    return cfg


def node_roles(cfg: LabConfig) -> list[str]:
    return [f"node{i}" for i in range(1, cfg.nodes + 1)]


def namespaces(cfg: LabConfig) -> dict[str, str]:
    """Role -> namespace name: client, rin, node1..N, rout, inet, t1..t3, sync."""
    roles = ["client", "rin", *node_roles(cfg), "rout", "inet", *TARGET_ROLES, "sync"]
    return {role: f"{cfg.prefix}-{role}" for role in roles}


def node_name(cfg: LabConfig, i: int) -> str:
    """Lab node i's hyperplane node name (its maps are pinned under PIN_ROOT/<name>, its
    member record is /nodes/<name>): "node<i>" in the default lab (hpctl's --node default
    is node1), "<prefix>-node<i>" in any other, so a test lab never clobbers the user's."""
    return f"node{i}" if cfg.prefix == "hp" else f"{cfg.prefix}-node{i}"


def node_index(cfg: LabConfig, name: str) -> int | None:
    """The lab index of a hyperplane node name (node_name's inverse); None when the name
    is not one of this lab's nodes."""
    head = "node" if cfg.prefix == "hp" else f"{cfg.prefix}-node"
    tail = name[len(head):] if isinstance(name, str) and name.startswith(head) else ""
    if not tail.isdigit() or tail != str(int(tail)) or not 1 <= int(tail) <= cfg.nodes:
        return None
    return int(tail)


def inside_link(i: int) -> dict[str, str]:
    """Node i's link to the inside router: the router's and the node's address (/24)."""
    return {"net": f"10.254.{i}.0/24", "router": f"10.254.{i}.1", "node": f"10.254.{i}.2"}


def outside_link(i: int) -> dict[str, str]:
    return {"net": f"198.19.{i}.0/24", "router": f"198.19.{i}.1", "node": f"198.19.{i}.2"}


def sync_ip(i: int) -> str:
    return f"10.253.0.{i}"


def router_ifname(i: int) -> str:
    """A router's (and the sync bridge's) interface toward node i."""
    return f"to-node{i}"


def first_shards(cfg: LabConfig) -> dict[str, list[int]]:
    k = min(SHARD_SIZE, cfg.nodes)
    return {NAT_GATEWAY: list(range(1, k + 1)),
            LB_NAME: list(range(cfg.nodes - k + 1, cfg.nodes + 1))}


def group_order(current: list[int], live: list[int]) -> list[int]:
    """The member order to write a resource's group in, given its order in the kernel now.
    The kernel gives each member its share of buckets by its position in the group (the
    rounding of 128 buckets over 3 members is 43/42/43 by position), so a survivor keeps
    its position and a new member takes a leaving member's: then no survivor's share
    changes and only the leaving member's buckets move. Extra new members go last."""
    new = [i for i in sorted(live) if i not in current]
    order = []
    for i in current:
        if i in live:
            order.append(i)
        elif new:
            order.append(new.pop(0))
    return order + new


# Fixed, locally administered MACs (02:68:66:kind:index:end), so the plan is known before
# anything is built; end 01 is the router's (or bridge's) side, 02 the other one.
_MAC_KIND = {"client": 1, "inside": 2, "outside": 3, "inet": 4, "target": 5, "sync": 6,
             "bridge": 7}


def _mac(kind: str, index: int, end: int) -> str:
    return f"02:68:66:{_MAC_KIND[kind]:02x}:{index:02x}:{end:02x}"


def _link(kind: str, index: int, a: tuple, b: tuple, mtu: int | None = None) -> tuple:
    """One veth: a and b are (role, ifname, [cidrs]); a is the router's/bridge's end."""
    ifaces = []
    for end, (role, ifname, cidrs), peer in ((1, a, b), (2, b, a)):
        ifaces.append({"role": role, "ifname": ifname, "mac": _mac(kind, index, end),
                       "addresses": list(cidrs), "peer": f"{peer[0]}/{peer[1]}",
                       "mtu": mtu, "kind": kind})
    link = {"a": f"{a[0]}/{a[1]}", "b": f"{b[0]}/{b[1]}", "kind": kind, "mtu": mtu,
            "node": index if kind in ("inside", "outside", "sync") else None}
    return link, ifaces


def _links(cfg: LabConfig) -> tuple[list[dict], list[dict]]:
    made = [_link("client", 0, ("rin", "to-client", [f"{INSIDE_ROUTER_IP}/24"]),
                  ("client", "cl0", [f"{ip}/24" for ip in CLIENT_IPS]))]
    for i in range(1, cfg.nodes + 1):
        node, ins, out = f"node{i}", inside_link(i), outside_link(i)
        made.append(_link("inside", i, ("rin", router_ifname(i), [f"{ins['router']}/24"]),
                          (node, "in0", [f"{ins['node']}/24"])))
        made.append(_link("outside", i, ("rout", router_ifname(i), [f"{out['router']}/24"]),
                          (node, "out0", [f"{out['node']}/24"])))
        made.append(_link("sync", i, ("sync", router_ifname(i), []),
                          (node, "sync0", [f"{sync_ip(i)}/24"]), mtu=SYNC_MTU))
    made.append(_link("inet", 0, ("rout", "to-inet", [f"{OUTSIDE_ROUTER_IP}/24"]),
                      ("inet", "inet0", [f"{ip}/24" for ip in INET_IPS])))
    for k, (t, ip, gw) in enumerate(zip(TARGET_ROLES, TARGET_IPS, TARGET_GATEWAYS), 1):
        made.append(_link("target", k, ("rin", f"to-{t}", [f"{gw}/24"]),
                          (t, "eth0", [f"{ip}/24"])))
    links = [link for link, _ in made]
    ifaces = [ifc for _, pair in made for ifc in pair]
    return links, ifaces


def _routes(cfg: LabConfig) -> dict[str, list[dict]]:
    """Main-table routes per role (the routers' steering is in `steering`)."""
    routes: dict[str, list[dict]] = {role: [] for role in namespaces(cfg)}
    routes["client"].append({"dst": "default", "gateway": INSIDE_ROUTER_IP})
    for t, gw in zip(TARGET_ROLES, TARGET_GATEWAYS):
        routes[t].append({"dst": "default", "gateway": gw})
    for i in range(1, cfg.nodes + 1):
        ins, out = inside_link(i), outside_link(i)
        routes[f"node{i}"] += [{"dst": "default", "gateway": out["router"]},
                               {"dst": CLIENT_NET, "gateway": ins["router"]},
                               {"dst": TARGET_NET, "gateway": ins["router"]}]
    # the internet host reaches the fleet's addresses through the outside router; in mode
    # kernel (no NAT) also the clients' own addresses (the router sends them on, below)
    routes["inet"].append({"dst": INTERNET_NET, "gateway": OUTSIDE_ROUTER_IP})
    if cfg.mode == "kernel":
        routes["inet"].append({"dst": CLIENT_NET, "gateway": OUTSIDE_ROUTER_IP})
    return routes


def steering(cfg: LabConfig) -> dict[str, dict]:
    """Per router: its nexthop per node, its group per resource, the routes that use the
    groups (with their table) and the policy rules that pick those tables."""
    nat, nlb = GROUP_IDS[NAT_GATEWAY], GROUP_IDS[LB_NAME]
    out = {}
    for router, link in (("rin", inside_link), ("rout", outside_link)):
        out[router] = {
            "nexthops": [{"id": i, "node": i, "via": link(i)["node"], "dev": router_ifname(i)}
                         for i in range(1, cfg.nodes + 1)],
            "groups": dict(GROUP_IDS),
            "resilient": dict(RESILIENT),
            "hash_seed": HASH_SEEDS[router],
        }
    out["rin"]["routes"] = [
        {"dst": "default", "table": nat, "resource": NAT_GATEWAY},
        {"dst": "default", "table": nlb, "resource": LB_NAME},
    ]
    out["rin"]["rules"] = [
        # the clients' traffic toward the internet goes to the NAT gateway's nodes
        {"from": CLIENT_NET, "to": INTERNET_NET, "table": nat, "priority": nat},
        # the targets' answers to internet clients go to the NLB's nodes; anything else
        # from the targets (answers to the nodes' health checks) is routed normally
        {"from": TARGET_NET, "to": INTERNET_NET, "table": nlb, "priority": nlb},
    ]
    out["rout"]["routes"] = [
        {"dst": f"{FLEET_NAT_IP}/32", "table": "main", "resource": NAT_GATEWAY},
        {"dst": f"{FLEET_VIP}/32", "table": "main", "resource": LB_NAME},
    ]
    if cfg.mode == "kernel":
        # mode kernel only: no NAT, so the server answers the client's own address; the
        # answers go back through the NAT gateway's nodes as translated ones would
        out["rout"]["routes"].append({"dst": CLIENT_NET, "table": "main",
                                      "resource": NAT_GATEWAY})
    out["rout"]["rules"] = []
    return out


def fleet_topology(cfg: LabConfig) -> dict:
    """Everything `up --nodes N` builds, as plain data."""
    validate_fleet(cfg)
    ns = namespaces(cfg)
    links, ifaces = _links(cfg)
    for ifc in ifaces:
        ifc["netns"] = ns[ifc["role"]]
    # the sync namespace's bridge: every node's sync0 peer is one of its ports
    bridge = {"role": "sync", "netns": ns["sync"], "ifname": SYNC_BRIDGE,
              "mac": _mac("bridge", 0, 1), "mtu": SYNC_MTU,
              "ports": [router_ifname(i) for i in range(1, cfg.nodes + 1)]}
    common = {"net.ipv6.conf.all.disable_ipv6": 1, "net.ipv6.conf.default.disable_ipv6": 1,
              "net.ipv4.conf.all.rp_filter": 0, "net.ipv4.conf.default.rp_filter": 0}
    sysctls = {role: dict(common) for role in ns}
    for i in range(1, cfg.nodes + 1):
        sysctls[f"node{i}"]["net.ipv4.ip_forward"] = 1
    steer = steering(cfg)
    for router in ROUTERS:
        sysctls[router].update({"net.ipv4.ip_forward": 1,
                                "net.ipv4.fib_multipath_hash_policy": 1,
                                "net.ipv4.fib_multipath_hash_seed": steer[router]["hash_seed"]})
    # mode kernel: every node holds the resources' addresses on lo, so a packet steered to
    # them ends at the node (a ping is answered) instead of bouncing back to the outside
    # router by the node's default route. (The fleet agent adds them itself.)
    local = {f"node{i}": [f"{FLEET_NAT_IP}/32", f"{FLEET_VIP}/32"] if cfg.mode == "kernel"
             else [] for i in range(1, cfg.nodes + 1)}
    xdp = cfg.mode == "xdp"
    return {
        "prefix": cfg.prefix,
        "mode": cfg.mode,
        "nodes": cfg.nodes,
        "namespaces": ns,
        "interfaces": ifaces,
        "links": links,
        "bridge": bridge,
        "routes": _routes(cfg),
        "local_addresses": local,
        "sysctls": sysctls,
        "steering": steer,
        "shards": first_shards(cfg),
        "resources": {name: {"kind": kind, "address": addr}
                      for name, (kind, addr) in RESOURCES.items()},
        "fleet_nodes": [{"index": i, "role": f"node{i}", "netns": ns[f"node{i}"],
                         "in0": inside_link(i)["node"], "out0": outside_link(i)["node"],
                         "sync0": sync_ip(i), "inside_router": inside_link(i)["router"],
                         "outside_router": outside_link(i)["router"],
                         "name": node_name(cfg, i)}
                        for i in range(1, cfg.nodes + 1)],
        "sync": {"netns": ns["sync"], "bridge": SYNC_BRIDGE, "net": SYNC_NET, "mtu": SYNC_MTU,
                 "addresses": {i: sync_ip(i) for i in range(1, cfg.nodes + 1)}},
        "client_addresses": list(CLIENT_IPS),
        "internet_addresses": list(INET_IPS),
        "client_net": CLIENT_NET,
        "target_net": TARGET_NET,
        "nat_ip": FLEET_NAT_IP,
        "vip": FLEET_VIP,
        "targets": [{"name": t, "netns": ns[t], "ip": ip, "gateway": gw}
                    for t, ip, gw in zip(TARGET_ROLES, TARGET_IPS, TARGET_GATEWAYS)],
        # what each node runs at start-up (fleet_build.start_node): its lab nftables table
        # (mode kernel: the forward counter only; mode xdp: forward policy drop, so a packet
        # that slipped past the data path is counted and lost), and in mode xdp the data
        # path on NODE_DATAPATH_IFNAMES and the fleet agent
        "node_nft": nft_ruleset(cfg),
        "gro_on": gro_on(cfg),
        "gateways": gateways(cfg) if xdp else [],
        "fleet": {
            "enabled": xdp,
            "store": store_url(cfg) if xdp else None,
            "resources": dict(STORE_RESOURCES),
            "datapath_ifnames": list(NODE_DATAPATH_IFNAMES) if xdp else [],
            "attach": cfg.attach if xdp else None,
            "sync_dev": SYNC_DEV if xdp else None,
            "pin_root": _pin_root(),
            "nlb": xdp and cfg.nlb,
        },
    }


def gro_on(cfg: LabConfig) -> list[str]:
    """Mode xdp with native XDP (attach xdp): a bpf_redirect into a veth needs its peer
    ready for XDP frames, so GRO goes on at the far end of every link the data path sends
    out of: the routers' and the sync bridge's ends of the nodes' links (role/ifname)."""
    if cfg.mode != "xdp" or cfg.attach != "xdp":
        return []
    return [f"{end}/{router_ifname(i)}" for i in range(1, cfg.nodes + 1)
            for end in ("rin", "rout", "sync")]


def node_links(topo: dict, i: int) -> list[dict]:
    """The links that attach node i to the fabric (inside, outside, sync)."""
    return [link for link in topo["links"] if link["node"] == i]
