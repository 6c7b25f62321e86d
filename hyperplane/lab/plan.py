"""The lab's plan, pure data: its roles, addresses, modes and everything `up` builds
(`topology`), the node's nftables ruleset, the lab NLB and the HAProxy baseline's config.
This is the one-node lab; `LabConfig(nodes=N)` with N >= 2 is the multi-node lab, whose
plan is fleet_plan.py (`topology` hands it over). Tested without root
(tests/unit/test_lab_plan.py)."""
from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass

from hyperplane.errors import ConfigError

MODES = ("xdp", "kernel", "nft", "haproxy", "nftlb")
ATTACH_MODES = ("auto", "tc", "xdp")    # hyperplane.datapath.loader.MODES: how the data path attaches
TARGET_ROLES = ("t1", "t2", "t3")
ROLES = ("client", "node", "inet") + TARGET_ROLES
STATE_DIR = "/run/hyperplane/lab"
NFT_FAMILY = "inet"
NFT_TABLE = "hyperplane_lab"
NFT_FORWARD_COUNTER = "forward"
NFT_ASSIST_COUNTER = "assist"
NAT_IFNAMES = ["in0", "out0"]
TARGET_IFNAMES = ["tg1", "tg2", "tg3"]            # node side of each target's veth
NODE_IFNAMES = NAT_IFNAMES + TARGET_IFNAMES       # XDP is attached to all of them

CLIENT_NET = "10.10.0.0/24"
INTERNET_NET = "198.18.0.0/15"          # RFC 2544 benchmark addresses
NAT_IP = "198.18.0.100"
CLIENT_IPS = ["10.10.0.10", "10.10.0.11"]
INET_IPS = ["198.18.0.2", "198.18.0.3"]
NODE_INSIDE_IP = "10.10.0.1"
NODE_OUTSIDE_IP = "198.18.0.1"

# The NLB: a VIP on out0 (so the kernel answers ARP for it), reached from inet; three
# targets, each on its own /24 behind the node.
VIP = "198.18.0.200"
TARGET_NET = "10.20.0.0/16"
TARGET_IPS = [f"10.20.{i}.10" for i in (1, 2, 3)]
TARGET_GATEWAYS = [f"10.20.{i}.1" for i in (1, 2, 3)]
LB_NAME = "lab-nlb"
LB_ID = 0
HTTP_PORT = 80                  # listener TCP VIP:80 -> target group "web"
TARGET_HTTP_PORT = 8080
TARGET_HTTP_PORTS = (8080, 8081)  # the target servers listen on both (8081: extra targets)
UDP_PORT = 53                   # listener UDP VIP:53 -> target group "dns"
TARGET_UDP_PORT = 5353
WEB_GROUP = "web"
DNS_GROUP = "dns"
# Lab health checks: sub-second (allow_fast), so a dead target leaves within ~1 s.
HEALTH_CHECK = {"protocol": "tcp", "interval_s": 0.5, "timeout_s": 0.4,
                "healthy_threshold": 2, "unhealthy_threshold": 2, "allow_fast": True}
DEREGISTRATION_DELAY_S = 30
# Each lab node's agent serves Prometheus metrics on 0.0.0.0:METRICS_PORT inside the
# node's own namespace (reachable only from inside the lab; docs/metrics.md).
METRICS_PORT = 9477
# Mode nftlb: the DNAT's 5-tuple hash seed (any fixed value: the spread is repeatable).
NFTLB_HASH_SEED = 0x68706c62

# Fixed, locally administered MACs: the plan is then known before anything is built. Two
# labs never share a segment, so reuse is harmless. (Neighbours are resolved by ARP.)
MACS = {
    "cl0": "02:68:70:0a:00:0a",
    "in0": "02:68:70:0a:00:01",
    "out0": "02:68:70:c6:00:01",
    "inet0": "02:68:70:c6:00:02",
    "tg1": "02:68:70:14:01:01",
    "tg2": "02:68:70:14:02:01",
    "tg3": "02:68:70:14:03:01",
}
# Each target's own interface is called eth0: its MAC is keyed by role.
TARGET_MACS = {"t1": "02:68:70:14:01:0a", "t2": "02:68:70:14:02:0a", "t3": "02:68:70:14:03:0a"}

_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")
MAX_NODES = 32       # multi-node lab: node i's links are 10.254.i.0/24 and 198.19.i.0/24
# The multi-node lab's modes: the hyperplane fleet (each node's data path and fleet agent,
# the lab controller steering the routers) or plain kernel forwarding (no NAT).
FLEET_MODES = ("xdp", "kernel")


@dataclass(frozen=True)
class LabConfig:
    prefix: str = "hp"
    mode: str = "xdp"             # xdp | kernel | nft | haproxy | nftlb
    attach: str = "auto"          # auto | tc | xdp (mode xdp only; hyperplane.datapath.loader.MODES)
    # The NLB: mode xdp writes the lab's NLB config to the store and starts the agent;
    # mode haproxy starts HAProxy, mode nftlb loads the DNAT. False builds the same topology without them (the NAT
    # tests use it, so no health-check traffic crosses the node while they count packets).
    nlb: bool = True
    # Mode xdp only, passed to hyperplane.node.lifecycle.start_nat_node: timeouts (e.g.
    # {"tcp_closing": 10}) and map sizes (hyperplane.loader.Sizes fields); None = defaults.
    timeouts: dict | None = None
    sizes: dict | None = None
    # 1: the one-node lab (client - node1 - inet). N >= 2: the multi-node lab (fleet_plan.py):
    # clients and targets behind an inside router, N nodes, an outside router, the internet.
    nodes: int = 1
    # The multi-node lab's cluster store (hyperplane.fleet.store.open_store URL: a path,
    # file:PATH or etcd://HOST:PORT); None: a file of the lab's own (store_path(prefix)).
    store: str | None = None

    def validate(self) -> "LabConfig":
        if not _PREFIX_RE.match(self.prefix):
            raise ConfigError(f"lab prefix {self.prefix!r} must be 1-12 lowercase letters/digits, "
                              "starting with a letter")
        if self.mode not in MODES:
            raise ConfigError(f"lab mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.attach not in ATTACH_MODES:
            raise ConfigError(f"attach mode {self.attach!r} is not one of "
                              f"{', '.join(ATTACH_MODES)}")
        if not isinstance(self.nlb, bool):
            raise ConfigError(f"lab nlb must be true or false, not {self.nlb!r}")
        if isinstance(self.nodes, bool) or not isinstance(self.nodes, int) \
                or not 1 <= self.nodes <= MAX_NODES:
            raise ConfigError(f"lab nodes must be a whole number from 1 to {MAX_NODES}, "
                              f"not {self.nodes!r}")
        if self.nodes > 1 and self.mode not in FLEET_MODES:
            raise ConfigError(f"lab mode {self.mode} with {self.nodes} nodes: the multi-node "
                              f"lab runs mode {' or '.join(FLEET_MODES)} (use one of them, or "
                              "--nodes 1)")
        if self.store is not None and (not isinstance(self.store, str) or not self.store):
            raise ConfigError(f"lab store must be a store URL (a path, file:PATH or "
                              f"etcd://HOST:PORT), not {self.store!r}")
        if self.store is not None and self.nodes == 1:
            raise ConfigError("--store is for the multi-node lab (--nodes 2 or more); the "
                              "one-node lab keeps its NLB in its own store file")
        return self


# --- the plan (pure) ---------------------------------------------------------------------

def namespaces(cfg: LabConfig) -> dict[str, str]:
    """Role -> namespace name (of the one-node lab; fleet_plan.namespaces for N >= 2)."""
    if cfg.nodes > 1:
        from hyperplane.lab.fleet_plan import namespaces as fleet_namespaces
        return fleet_namespaces(cfg)
    return {"client": f"{cfg.prefix}-client", "node": f"{cfg.prefix}-node1",
            "inet": f"{cfg.prefix}-inet", **{t: f"{cfg.prefix}-{t}" for t in TARGET_ROLES}}


def node_name(cfg: LabConfig) -> str:
    """The hyperplane node name (its maps are pinned under PIN_ROOT/<name>). The default lab
    is 'node1' (hpctl's default --node); any other prefix gets its own '<prefix>-node1' so a
    test lab never clobbers the user's lab."""
    return "node1" if cfg.prefix == "hp" else f"{cfg.prefix}-node1"


def kernel_assist_mark() -> int:
    """skb->mark of a translated packet the data path hands the kernel to fragment
    (bpf/hook.h HP_MARK_ASSIST)."""
    from hyperplane.datapath.cheaders import define
    return define("hook.h", "HP_MARK_ASSIST")


def nft_ruleset(cfg: LabConfig) -> str:
    """The node namespace's nftables ruleset for the mode. Mode xdp: the forward chain
    accepts (and counts as kernel-assisted) only the translated packets the data path
    marked for the kernel to fragment; anything else the kernel would forward slipped past
    the data path: counted and dropped."""
    policy = _forward_policy(cfg)
    lines = [
        f"table {NFT_FAMILY} {NFT_TABLE} {{",
        f"  counter {NFT_FORWARD_COUNTER} {{ }}",
        f"  counter {NFT_ASSIST_COUNTER} {{ }}",
        "  chain forward {",
        f"    type filter hook forward priority filter; policy {policy};",
    ]
    if cfg.mode == "xdp":
        lines.append(f"    meta mark {kernel_assist_mark():#x} counter name "
                     f"\"{NFT_ASSIST_COUNTER}\" accept")
    lines += [
        f"    counter name \"{NFT_FORWARD_COUNTER}\"",
        "  }",
    ]
    if cfg.mode == "nft":
        lines += [
            "  chain postrouting {",
            "    type nat hook postrouting priority srcnat; policy accept;",
            f"    oifname \"out0\" ip saddr {CLIENT_NET} snat ip to {NAT_IP}",
            "  }",
        ]
    if cfg.mode == "nftlb" and cfg.nlb:
        # conntrack evaluates NAT rules for a connection's first packet only: the hash
        # picks the target once, and conntrack reverses the DNAT on the answers
        targets = ", ".join(f"{i} : {ip} . {TARGET_HTTP_PORT}" for i, ip in enumerate(TARGET_IPS))
        lines += [
            "  chain prerouting {",
            "    type nat hook prerouting priority dstnat; policy accept;",
            f"    ip daddr {VIP} tcp dport {HTTP_PORT} dnat ip to jhash ip saddr . tcp sport . "
            f"ip daddr . tcp dport mod {len(TARGET_IPS)} seed {NFTLB_HASH_SEED:#x} "
            f"map {{ {targets} }}",
            "  }",
        ]
    lines.append("}")
    return "\n".join(lines) + "\n"


def _forward_policy(cfg: LabConfig) -> str:
    return "drop" if cfg.mode == "xdp" else "accept"


def gateways(cfg: LabConfig) -> list[dict]:
    """The lab's NAT gateway; the multi-node lab's has the fleet's own NAT IP."""
    nat_ip = NAT_IP
    if cfg.nodes > 1:
        from hyperplane.lab.fleet_plan import FLEET_NAT_IP
        nat_ip = FLEET_NAT_IP
    return [{"name": "nat-gw-1", "gw_id": 0, "nat_ips": [nat_ip], "inside_cidrs": [CLIENT_NET]}]


def targets(cfg: LabConfig) -> list[dict]:
    """The NLB target hosts: name (= role), namespace, address, gateway, node interface."""
    ns = namespaces(cfg)
    return [{"name": t, "netns": ns[t], "ip": ip, "gateway": gw, "node_ifname": tg,
             "http_ports": list(TARGET_HTTP_PORTS), "udp_port": TARGET_UDP_PORT}
            for t, ip, gw, tg in zip(TARGET_ROLES, TARGET_IPS, TARGET_GATEWAYS, TARGET_IFNAMES)]


def nlb_config(cfg: LabConfig):
    """The lab's NLB as a hyperplane.nlb.config.NlbConfig: load balancer "lab-nlb" (lb_id 0),
    listener TCP VIP:80 -> target group "web" (the three targets, port 8080) and listener
    UDP VIP:53 -> "dns" (the same three, port 5353; health-checked on TCP 8080, as an AWS
    UDP target group is checked on a TCP port). Sub-second health checks (allow_fast).
    The multi-node lab's listeners are on the fleet's VIP, and its load balancer asks for
    a shard of fleet_plan.SHARD_SIZE nodes (when LoadBalancer has a shard_size)."""
    import dataclasses
    from hyperplane.nlb.health import HealthCheckConfig
    from hyperplane.nlb.config import Listener, LoadBalancer, NlbConfig, Target, TargetGroup
    vip, lb = VIP, LoadBalancer(LB_NAME, LB_ID)
    if cfg.nodes > 1:
        from hyperplane.lab.fleet_plan import FLEET_VIP, SHARD_SIZE
        vip = FLEET_VIP
        if "shard_size" in {f.name for f in dataclasses.fields(LoadBalancer)}:
            lb = LoadBalancer(LB_NAME, LB_ID, shard_size=SHARD_SIZE)
    return NlbConfig(
        load_balancers=[lb],
        listeners=[Listener(LB_NAME, vip, HTTP_PORT, "TCP", WEB_GROUP),
                   Listener(LB_NAME, vip, UDP_PORT, "UDP", DNS_GROUP)],
        target_groups=[
            TargetGroup(WEB_GROUP, [Target(ip, TARGET_HTTP_PORT) for ip in TARGET_IPS],
                        health_check=HealthCheckConfig(**HEALTH_CHECK),
                        deregistration_delay_s=DEREGISTRATION_DELAY_S),
            TargetGroup(DNS_GROUP, [Target(ip, TARGET_UDP_PORT) for ip in TARGET_IPS],
                        health_check=HealthCheckConfig(**HEALTH_CHECK, port=TARGET_HTTP_PORT),
                        deregistration_delay_s=DEREGISTRATION_DELAY_S),
        ])


def store_path(prefix: str) -> str:
    """The lab's NLB store file (mode xdp). The default lab uses hpctl's default store, so
    `hpctl lb ...` drives it without --store (like its node is `node1`, hpctl's default
    --node); any other prefix gets its own file, so a test lab never touches it."""
    if prefix == "hp":
        try:
            from hyperplane.fleet.store import DEFAULT_STORE
            return DEFAULT_STORE
        except ImportError:  # pragma: no cover
            pass
    return os.path.join(STATE_DIR, f"{prefix}-store.json")


def store_url(cfg: LabConfig) -> str:
    """The lab's store: --store's URL (multi-node lab), else its own file (store_path)."""
    return cfg.store or store_path(cfg.prefix)


def haproxy_config(cfg: LabConfig) -> str:
    """Mode haproxy: TCP-mode HAProxy on VIP:80 over the three targets (roundrobin), with
    health checks like the lab NLB's (every 0.5 s, 2 to fall, 2 to rise)."""
    servers = "\n".join(f"    server {t} {ip}:{TARGET_HTTP_PORT} check inter 500 fall 2 rise 2"
                        for t, ip in zip(TARGET_ROLES, TARGET_IPS))
    # maxconn bounds the fds HAProxy asks for (2 per proxied connection): the hard
    # RLIMIT_NOFILE here is 20000.
    return f"""global
    maxconn 8000
    nbthread {os.cpu_count() or 1}
    pidfile {_haproxy_pidfile(cfg.prefix)}

defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    maxconn 8000

frontend lab_nlb
    bind {VIP}:{HTTP_PORT}
    default_backend {WEB_GROUP}

backend {WEB_GROUP}
    balance roundrobin
{servers}
"""


def _haproxy_pidfile(prefix: str) -> str:
    return os.path.join(STATE_DIR, f"{prefix}-haproxy.pid")


def _haproxy_cfgfile(prefix: str) -> str:
    return os.path.join(STATE_DIR, f"{prefix}-haproxy.cfg")


def namespace_pattern(prefix: str) -> re.Pattern:
    """Matches every namespace a lab of this prefix can have, one node or many: `down`
    removes them all, whatever the state file says (or when a failed `up` left none)."""
    return re.compile(rf"^{re.escape(prefix)}-(client|inet|rin|rout|sync|node[0-9]+|t[0-9]+)$")


def topology(cfg: LabConfig) -> dict:
    """Everything `up` builds, as plain data (fleet_plan.fleet_topology for N >= 2 nodes)."""
    cfg.validate()
    if cfg.nodes > 1:
        from hyperplane.lab.fleet_plan import fleet_topology
        return fleet_topology(cfg)
    ns = namespaces(cfg)
    ifaces = [
        {"role": "client", "netns": ns["client"], "ifname": "cl0", "mac": MACS["cl0"],
         "addresses": [f"{ip}/24" for ip in CLIENT_IPS], "peer": "node/in0"},
        {"role": "node", "netns": ns["node"], "ifname": "in0", "mac": MACS["in0"],
         "addresses": [f"{NODE_INSIDE_IP}/24"], "peer": "client/cl0", "side": "inside"},
        {"role": "node", "netns": ns["node"], "ifname": "out0", "mac": MACS["out0"],
         # mode xdp: hpctl's node adds the NAT IP and its agent the VIP (as a user's would)
         "addresses": [f"{NODE_OUTSIDE_IP}/24"] + ([] if cfg.mode == "xdp" else
                                                    [f"{NAT_IP}/32", f"{VIP}/32"]),
         "peer": "inet/inet0", "side": "outside"},
        {"role": "inet", "netns": ns["inet"], "ifname": "inet0", "mac": MACS["inet0"],
         "addresses": [f"{ip}/24" for ip in INET_IPS], "peer": "node/out0"},
    ]
    links = [("client", "cl0", "node", "in0"), ("node", "out0", "inet", "inet0")]
    routes = {role: [] for role in ROLES}
    routes["client"].append({"dst": "default", "gateway": NODE_INSIDE_IP})
    # the node's way to the rest of the internet, as a gateway's is
    routes["node"].append({"dst": "default", "gateway": INET_IPS[0]})
    for t in targets(cfg):
        role, tg = t["name"], t["node_ifname"]
        ifaces.append({"role": "node", "netns": ns["node"], "ifname": tg, "mac": MACS[tg],
                       "addresses": [f"{t['gateway']}/24"], "peer": f"{role}/eth0",
                       "side": "target"})
        ifaces.append({"role": role, "netns": ns[role], "ifname": "eth0",
                       "mac": TARGET_MACS[role], "addresses": [f"{t['ip']}/24"],
                       "peer": f"node/{tg}"})
        links.append(("node", tg, role, "eth0"))
        routes[role].append({"dst": "default", "gateway": t["gateway"]})
    if cfg.mode == "kernel":
        routes["inet"].append({"dst": CLIENT_NET, "gateway": NODE_OUTSIDE_IP})
    common = {"net.ipv6.conf.all.disable_ipv6": 1, "net.ipv6.conf.default.disable_ipv6": 1,
              "net.ipv4.conf.all.rp_filter": 0, "net.ipv4.conf.default.rp_filter": 0}
    sysctls = {role: dict(common) for role in ROLES}
    sysctls["node"]["net.ipv4.ip_forward"] = 1
    # Native XDP redirecting into a veth needs the *peer* ready for XDP frames (GRO on, or
    # a program attached there): with attach "xdp" the far ends get GRO on - the one
    # setting the lab changes, and not the default (auto attaches at tc on veth).
    gro_on = (["client/cl0", "inet/inet0"] + [f"{t}/eth0" for t in TARGET_ROLES]) \
        if (cfg.mode == "xdp" and cfg.attach == "xdp") else []
    nlb_on = cfg.nlb and cfg.mode in ("xdp", "haproxy", "nftlb")
    return {
        "prefix": cfg.prefix,
        "mode": cfg.mode,
        "attach": cfg.attach if cfg.mode == "xdp" else None,
        "namespaces": ns,
        "interfaces": ifaces,
        "links": [{"a": f"{a}/{ia}", "b": f"{b}/{ib}"} for a, ia, b, ib in links],
        "routes": routes,
        "sysctls": sysctls,
        "gro_on": gro_on,
        "client_addresses": list(CLIENT_IPS),
        "internet_addresses": list(INET_IPS),
        "client_net": CLIENT_NET,
        "nat_ips": [NAT_IP] if cfg.mode in ("xdp", "nft") else [],
        "gateways": gateways(cfg) if cfg.mode == "xdp" else [],
        "vip": VIP,
        "targets": targets(cfg),
        "nlb": {
            "enabled": nlb_on,
            "by": {"xdp": "hyperplane", "haproxy": "haproxy", "nftlb": "nftables"}.get(cfg.mode)
            if nlb_on else None,
            "vip": VIP,
            "listeners": [{"vip": VIP, "port": HTTP_PORT, "protocol": "TCP",
                           "target_group": WEB_GROUP, "target_port": TARGET_HTTP_PORT},
                          {"vip": VIP, "port": UDP_PORT, "protocol": "UDP",
                           "target_group": DNS_GROUP, "target_port": TARGET_UDP_PORT}]
            if cfg.mode == "xdp" else
            [{"vip": VIP, "port": HTTP_PORT, "protocol": "TCP", "target_group": WEB_GROUP,
              "target_port": TARGET_HTTP_PORT}] if cfg.mode in ("haproxy", "nftlb") else [],
            "store": store_path(cfg.prefix) if cfg.mode == "xdp" and nlb_on else None,
            "haproxy_config": _haproxy_cfgfile(cfg.prefix)
            if cfg.mode == "haproxy" and nlb_on else None,
        },
        "node": {"name": node_name(cfg), "netns": ns["node"], "ifnames": list(NODE_IFNAMES),
                 "pin_root": _pin_root()},
        "nft": {"family": NFT_FAMILY, "table": NFT_TABLE, "forward_counter": NFT_FORWARD_COUNTER,
                "forward_policy": _forward_policy(cfg), "assist_counter": NFT_ASSIST_COUNTER,
                "snat": cfg.mode == "nft", "dnat": cfg.mode == "nftlb" and nlb_on},
    }


def _pin_root() -> str:
    try:
        from hyperplane.node.lifecycle import PIN_ROOT
    except ImportError:  # pragma: no cover
        return "/run/hyperplane/bpf"
    return PIN_ROOT


def ip_in(net: str, addr: str) -> bool:
    return ipaddress.ip_address(addr.split("/")[0]) in ipaddress.ip_network(net)
