"""The one-node lab: network namespaces on this machine, never connected to the host's real
interfaces. One topology for every mode: a NAT client network, an "internet" and three
NLB target hosts around one node.

    {prefix}-client          {prefix}-node1                      {prefix}-inet
    cl0 10.10.0.10/24  <-->  in0 10.10.0.1/24
        10.10.0.11/24        out0 198.18.0.1/24            <-->  inet0 198.18.0.2/24
    default via 10.10.0.1         198.18.0.100/32 (NAT IP)             198.18.0.3/24
                                  198.18.0.200/32 (NLB VIP)
                             tg1 10.20.1.1/24  <-->  {prefix}-t1 eth0 10.20.1.10/24
                             tg2 10.20.2.1/24  <-->  {prefix}-t2 eth0 10.20.2.10/24
                             tg3 10.20.3.1/24  <-->  {prefix}-t3 eth0 10.20.3.10/24
                                                     (targets: default via 10.20.i.1)

Modes (what the node does):
  xdp      the hyperplane data path on in0, out0 and tg1..tg3 (attached as `attach` says:
           auto = tc on veth, native XDP on a NIC that has it): the NAT gateway for the
           client network and (with nlb=True) the NLB "lab-nlb", whose configuration is
           written to a store file and applied by an agent process (health checks, Maglev
           tables, draining). The node adds the NAT IP and the VIP to out0 itself. The node
           kernel's forward chain drops (and counts) anything the data path did not
           redirect, except translated packets it handed over for fragmenting (marked); inet
           has no route back to 10.10.0.0/24.
  kernel   plain kernel forwarding, no NAT (the benchmark floor); inet routes
           10.10.0.0/24 via 198.18.0.1.
  nft      Linux NAT for comparison: forward accept, snat 10.10.0.0/24 to 198.18.0.100.
  haproxy  the NLB baseline: no XDP; HAProxy in TCP mode in the node namespace on
           198.18.0.200:80 with the three targets as servers (roundrobin); the kernel
           forwards the rest (no NAT).
  nftlb    the kernel's own stateful L4 LB as the NLB baseline: no XDP; an nftables DNAT
           of 198.18.0.200:80 to the three targets' :8080, chosen by a hash of the
           5-tuple; the client IP is kept (no SNAT: the targets answer through the node,
           where conntrack reverses the DNAT); no health checks; kernel forwarding.

Like a real network, the lab keeps every interface's default offloads (TSO/GSO/GRO,
checksum offload) and resolves neighbours by ARP; the node has a default route toward the
internet host. `topology(cfg)` is the pure plan (tested without root); `up`, `down` and
`status` act on the machine. The targets' servers (`python -m hyperplane.lab serve`) answer HTTP with their
own name and the peer they saw, stream bodies at a bounded rate, and echo UDP. docs/lab.md
has the same tables.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

from . import netns
from .errors import ConfigError, EnvironmentProblem, HyperplaneError, NotFound

MODES = ("xdp", "kernel", "nft", "haproxy", "nftlb")
ATTACH_MODES = ("auto", "tc", "xdp")    # hyperplane.loader.MODES: how the data path attaches
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


@dataclass(frozen=True)
class LabConfig:
    prefix: str = "hp"
    mode: str = "xdp"             # xdp | kernel | nft | haproxy | nftlb
    attach: str = "auto"          # auto | tc | xdp (mode xdp only; hyperplane.loader.MODES)
    # The NLB: mode xdp writes the lab's NLB config to the store and starts the agent;
    # mode haproxy starts HAProxy, mode nftlb loads the DNAT. False builds the same topology without them (the NAT
    # tests use it, so no health-check traffic crosses the node while they count packets).
    nlb: bool = True
    # Mode xdp only, passed to hyperplane.node.start_nat_node: timeouts (e.g.
    # {"tcp_closing": 10}) and map sizes (hyperplane.loader.Sizes fields); None = defaults.
    timeouts: dict | None = None
    sizes: dict | None = None

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
        return self


# --- the plan (pure) ---------------------------------------------------------------------

def namespaces(cfg: LabConfig) -> dict[str, str]:
    """Role -> namespace name."""
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
    from .cheaders import define
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
    return [{"name": "nat-gw-1", "gw_id": 0, "nat_ips": [NAT_IP], "inside_cidrs": [CLIENT_NET]}]


def targets(cfg: LabConfig) -> list[dict]:
    """The NLB target hosts: name (= role), namespace, address, gateway, node interface."""
    ns = namespaces(cfg)
    return [{"name": t, "netns": ns[t], "ip": ip, "gateway": gw, "node_ifname": tg,
             "http_ports": list(TARGET_HTTP_PORTS), "udp_port": TARGET_UDP_PORT}
            for t, ip, gw, tg in zip(TARGET_ROLES, TARGET_IPS, TARGET_GATEWAYS, TARGET_IFNAMES)]


def nlb_config(cfg: LabConfig):
    """The lab's NLB as a hyperplane.nlb_config.NlbConfig: load balancer "lab-nlb" (lb_id 0),
    listener TCP VIP:80 -> target group "web" (the three targets, port 8080) and listener
    UDP VIP:53 -> "dns" (the same three, port 5353; health-checked on TCP 8080, as an AWS
    UDP target group is checked on a TCP port). Sub-second health checks (allow_fast)."""
    from .health import HealthCheckConfig
    from .nlb_config import Listener, LoadBalancer, NlbConfig, Target, TargetGroup
    return NlbConfig(
        load_balancers=[LoadBalancer(LB_NAME, LB_ID)],
        listeners=[Listener(LB_NAME, VIP, HTTP_PORT, "TCP", WEB_GROUP),
                   Listener(LB_NAME, VIP, UDP_PORT, "UDP", DNS_GROUP)],
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
            from .store import DEFAULT_STORE
            return DEFAULT_STORE
        except ImportError:  # pragma: no cover
            pass
    return os.path.join(STATE_DIR, f"{prefix}-store.json")


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


def topology(cfg: LabConfig) -> dict:
    """Everything `up` builds, as plain data."""
    cfg.validate()
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
        from .node import PIN_ROOT
    except ImportError:  # pragma: no cover
        return "/run/hyperplane/bpf"
    return PIN_ROOT


# --- acting on the machine ---------------------------------------------------------------

def _require_root() -> None:
    if os.geteuid() != 0:
        raise EnvironmentProblem("the lab needs root (it creates network namespaces); "
                                 "run it with sudo")
    for tool, pkg in (("nft", "nftables"), ("ethtool", "ethtool")):
        if shutil.which(tool) is None:
            raise EnvironmentProblem(f"the lab needs {tool}: apt-get install {pkg}")


def _state_path(prefix: str) -> str:
    return os.path.join(STATE_DIR, f"{prefix}.json")


def _write_state(cfg: LabConfig) -> None:
    os.makedirs(STATE_DIR, exist_ok=True)
    tmp = _state_path(cfg.prefix) + ".tmp"
    with open(tmp, "w") as f:
        json.dump(asdict(cfg), f)
    os.replace(tmp, _state_path(cfg.prefix))


def _read_state(prefix: str) -> LabConfig | None:
    try:
        with open(_state_path(prefix)) as f:
            return LabConfig(**json.load(f))
    except (FileNotFoundError, ValueError, TypeError):
        return None


def present(prefix: str = "hp") -> list[str]:
    """The lab's namespaces that exist right now."""
    have = set(netns.list_namespaces())
    return [n for n in namespaces(LabConfig(prefix=prefix)).values() if n in have]


def up(cfg: LabConfig) -> dict:
    """Build the lab; in mode xdp start the node (and, with cfg.nlb, write the NLB store and
    start the agent); in mode haproxy start HAProxy. On any failure everything built so far
    is removed again. Returns status(cfg)."""
    cfg.validate()
    _require_root()
    if present(cfg.prefix):
        raise ConfigError(f"lab {cfg.prefix!r} is already up; run hpctl lab down first")
    topo = topology(cfg)
    ns = topo["namespaces"]
    try:
        _write_state(cfg)
        for role in ROLES:
            netns.create(ns[role])
            for key, value in topo["sysctls"][role].items():
                netns.sysctl(ns[role], key, value)
            netns.set_up(ns[role], "lo")
        mac = {(i["role"], i["ifname"]): i["mac"] for i in topo["interfaces"]}
        for a, ia, b, ib in (l["a"].split("/") + l["b"].split("/") for l in topo["links"]):
            netns.veth(ns[a], ia, ns[b], ib, mac_a=mac[(a, ia)], mac_b=mac[(b, ib)])
        for ifc in topo["interfaces"]:
            for cidr in ifc["addresses"]:
                netns.add_address(ifc["netns"], ifc["ifname"], cidr)
        for where in topo["gro_on"]:
            role, ifname = where.split("/")
            netns.set_gro(ns[role], ifname, True)
        for role, routes in topo["routes"].items():
            for r in routes:
                netns.add_route(ns[role], r["dst"], r.get("gateway"))
        netns.nft_load(ns["node"], nft_ruleset(cfg))
        if cfg.mode == "xdp":
            _start_node(cfg, topo)
        if topo["nlb"]["enabled"] and cfg.mode == "xdp":
            _start_agent(cfg, topo)
        if topo["nlb"]["enabled"] and cfg.mode == "haproxy":
            _start_haproxy(cfg)
    except BaseException:
        down(cfg)
        raise
    return status(cfg)


def _start_agent(cfg: LabConfig, topo: dict) -> None:
    """Write the lab's NLB to the store and start the agent that applies it."""
    try:
        from .agent import spawn_agent
        from .store import Store
    except ImportError as exc:
        raise HyperplaneError(f"the lab's NLB needs hyperplane.store and hyperplane.agent, "
                              f"which are not available ({exc}); use --no-nlb") from None
    data = nlb_config(cfg).to_dict()
    path = topo["nlb"]["store"]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Store(path).update(lambda _old: data)
    spawn_agent(topo["node"]["name"], path)


def _stop_agent(cfg: LabConfig, topo: dict) -> list[str]:
    warnings = []
    try:
        from .agent import stop_agent
    except ImportError:
        stop_agent = None
    if stop_agent is not None:
        try:
            stop_agent(topo["node"]["name"])
        except (NotFound, FileNotFoundError, ProcessLookupError):
            pass
        except Exception as exc:  # the agent is another module: never block teardown on it
            warnings.append(f"stopping the NLB agent of {topo['node']['name']}: "
                            f"{type(exc).__name__}: {exc}")
    leftovers = [store_path(cfg.prefix), store_path(cfg.prefix) + ".lock"]
    try:
        from .agent import status_path
        from .node import NODE_STATE_DIR
        leftovers += [status_path(topo["node"]["name"]),
                      os.path.join(NODE_STATE_DIR, f"{topo['node']['name']}.agent.log")]
    except ImportError:
        pass
    for path in leftovers:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    return warnings


def _start_haproxy(cfg: LabConfig) -> None:
    if shutil.which("haproxy") is None:
        raise EnvironmentProblem("lab mode haproxy needs haproxy: apt-get install haproxy")
    os.makedirs(STATE_DIR, exist_ok=True)
    path = _haproxy_cfgfile(cfg.prefix)
    with open(path, "w") as f:
        f.write(haproxy_config(cfg))
    ns = namespaces(cfg)["node"]
    try:
        # -D: daemon; it lives in the node namespace, so down() ends it with the namespace.
        netns.run_in(ns, ["haproxy", "-D", "-f", path], capture_output=True, text=True,
                     timeout=30)
    except subprocess.CalledProcessError as exc:
        raise HyperplaneError(f"haproxy did not start in {ns}: "
                              f"{(exc.stderr or exc.stdout or '').strip()}") from None


def haproxy_pid(prefix: str) -> int | None:
    try:
        with open(_haproxy_pidfile(prefix)) as f:
            pid = int(f.read().split()[0])
        os.kill(pid, 0)
        return pid
    except (FileNotFoundError, ValueError, IndexError, ProcessLookupError):
        return None


def _start_node(cfg: LabConfig, topo: dict) -> None:
    from . import node
    from .nat import GatewayConfig
    gws = [GatewayConfig(**g) for g in topo["gateways"]]
    extra = {}
    if cfg.sizes:
        from .loader import Sizes
        extra["sizes"] = Sizes(**cfg.sizes)
    node.start_nat_node(topo["node"]["name"], list(NODE_IFNAMES), gws,
                        netns=topo["node"]["netns"], mode=cfg.attach,
                        pin_root=topo["node"]["pin_root"], timeouts=cfg.timeouts, **extra)


def down(cfg: LabConfig | None = None, *, prefix: str | None = None) -> dict:
    """Remove the lab: stop the node (if it may have been started), kill what runs in the
    lab namespaces, delete them. Idempotent; tolerates a half-built lab."""
    prefix = prefix or (cfg.prefix if cfg else "hp")
    state = _read_state(prefix)
    cfg = state or cfg or LabConfig(prefix=prefix)
    cfg.validate()
    _require_root()
    topo = topology(cfg)
    warnings: list[str] = []
    if state is None or state.mode == "xdp":
        warnings += _stop_agent(cfg, topo)
        warnings += _stop_node(topo)
    removed = []
    for role in ROLES:
        name = topo["namespaces"][role]
        try:
            if netns.remove(name):
                removed.append(name)
        except OSError as exc:
            warnings.append(f"could not remove namespace {name}: {exc}")
    for path in (_state_path(prefix), _haproxy_cfgfile(prefix), _haproxy_pidfile(prefix)):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    return {"prefix": prefix, "removed": removed, "warnings": warnings}


def _stop_node(topo: dict) -> list[str]:
    ns = topo["node"]["netns"]
    try:
        from . import node
        # Without its namespace there is nothing to detach (and the interface names must
        # never be looked up in the root namespace): only the pins are removed.
        here = netns.exists(ns)
        node.stop_node(topo["node"]["name"], list(NODE_IFNAMES) if here else [],
                       netns=ns if here else None, pin_root=topo["node"]["pin_root"])
    except (HyperplaneError, OSError, KeyError, ValueError) as exc:
        if not netns.exists(ns) or isinstance(exc, (NotFound, FileNotFoundError)):
            return []          # nothing was pinned / attached: normal for a half-built lab
        return [f"stopping node {topo['node']['name']}: {exc}"]
    except Exception as exc:  # the datapath is another module: never block teardown on it
        return [f"stopping node {topo['node']['name']}: {type(exc).__name__}: {exc}"]
    return []


def status(cfg: LabConfig | None = None, *, prefix: str | None = None) -> dict:
    """What exists now, JSON-able. `up` is False (and little else is filled) when the lab's
    namespaces are absent."""
    prefix = prefix or (cfg.prefix if cfg else "hp")
    state = _read_state(prefix)
    cfg = state or cfg or LabConfig(prefix=prefix)
    topo = topology(cfg)
    have = present(prefix)
    out = {
        "prefix": prefix,
        "up": len(have) == len(ROLES),
        "mode": cfg.mode if state else None,
        "attach": topo["attach"] if state else None,
        "namespaces": topo["namespaces"],
        "namespaces_present": have,
        "client_addresses": topo["client_addresses"],
        "internet_addresses": topo["internet_addresses"],
        "client_net": topo["client_net"],
        "nat_ips": topo["nat_ips"] if state else [],
        "gateways": topo["gateways"] if state else [],
        "vip": topo["vip"],
        "targets": [{**t, "present": t["netns"] in have} for t in topo["targets"]],
        "nlb": dict(topo["nlb"], enabled=topo["nlb"]["enabled"] and bool(state)),
        "node": dict(topo["node"]),
        "interfaces": [],
        "nft_forward_packets": None,
    }
    if not have:
        return out
    if out["nlb"]["enabled"] and cfg.mode == "xdp":
        out["nlb"]["agent"] = _agent_status(topo["node"]["name"])
    if out["nlb"]["enabled"] and cfg.mode == "haproxy":
        out["nlb"]["haproxy_pid"] = haproxy_pid(prefix)
    by_ns: dict[str, dict[str, dict]] = {}
    for name in have:
        try:
            by_ns[name] = {l["ifname"]: l for l in netns.links(name)}
        except (HyperplaneError, OSError):
            by_ns[name] = {}
    for ifc in topo["interfaces"]:
        live = by_ns.get(ifc["netns"], {}).get(ifc["ifname"])
        out["interfaces"].append({
            "role": ifc["role"], "netns": ifc["netns"], "ifname": ifc["ifname"],
            "peer": ifc["peer"],
            "present": live is not None,
            "mac": live["mac"] if live else ifc["mac"],
            "addresses": live["addresses"] if live else [],
            "state": live["state"] if live else None,
            "xdp": live["xdp"] if live else None,
            "tc": live["tc"] if live else [],
        })
    # where the data path is attached on each node interface: "xdp (native)", "tc", or None
    out["node"]["attached"] = {i["ifname"]: _hook_of(i) for i in out["interfaces"]
                               if i["role"] == "node"}
    if topo["namespaces"]["node"] in have:
        try:
            out["nft_forward_packets"] = netns.nft_counter(
                topo["namespaces"]["node"], NFT_FAMILY, NFT_TABLE, NFT_FORWARD_COUNTER)["packets"]
        except (HyperplaneError, OSError, ValueError, Exception):
            out["nft_forward_packets"] = None
    return out


def _hook_of(ifc: dict) -> str | None:
    from .loader import PROGRAMS
    if ifc["xdp"]:
        return f"xdp ({ifc['xdp']['mode']})"
    if PROGRAMS["tc"][0].decode() in ifc["tc"]:
        return "tc"
    return None


def _agent_status(node: str) -> dict | None:
    """The agent's last status file (per target group, per target: state, flows, packets),
    or None when there is none (yet)."""
    try:
        from .agent import status_path
    except ImportError:
        return None
    try:
        with open(status_path(node)) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None


def forward_packets(cfg: LabConfig) -> int:
    """Packets the node's kernel tried to forward that the data path did not translate
    (mode xdp: all dropped by policy)."""
    return netns.nft_counter(namespaces(cfg)["node"], NFT_FAMILY, NFT_TABLE,
                             NFT_FORWARD_COUNTER)["packets"]


def assisted_packets(cfg: LabConfig) -> int:
    """Translated packets the data path handed the node's kernel to fragment (mode xdp)."""
    return netns.nft_counter(namespaces(cfg)["node"], NFT_FAMILY, NFT_TABLE,
                             NFT_ASSIST_COUNTER)["packets"]


def namespace_for(cfg: LabConfig, role: str) -> str:
    """The namespace of a role (client, node/node1, inet, t1..t3); NotFound if the lab
    lacks it."""
    role = {"node1": "node"}.get(role, role)
    if role not in ROLES:
        raise ConfigError(f"role {role!r} is not one of {', '.join(ROLES)}")
    name = namespaces(cfg)[role]
    if not netns.exists(name):
        raise NotFound(f"lab {cfg.prefix!r} is not up (no namespace {name}); run hpctl lab up")
    return name


def ip_in(net: str, addr: str) -> bool:
    return ipaddress.ip_address(addr.split("/")[0]) in ipaddress.ip_network(net)


# --- the targets' server -----------------------------------------------------------------
#
# One asyncio process per target (run inside the target's namespace):
#   HTTP/1.1 on TARGET_HTTP_PORTS (keep-alive unless "Connection: close" or HTTP/1.0):
#     GET /                       -> "<name> <peer ip>:<peer port> <local port>\n" (so a
#                                    client can tell which target and port answered and
#                                    what source address it saw)
#     GET /stream?bytes=N&rate=R&seed=S
#                                 -> N bytes of stream_chunks(S, N), at most R bytes/s
#                                    (R=0: unpaced); header X-Target: <name>
#   UDP on TARGET_UDP_PORT: answers "<name> <peer ip>:<peer port>|" + the datagram.

STREAM_CHUNK = 65536
SERVER_MAX_SECONDS = 3600.0     # a target server never outlives this


def stream_chunks(seed: int, nbytes: int, chunk: int = STREAM_CHUNK):
    """The deterministic body of /stream (the client recomputes it to check the bytes)."""
    import random
    rng = random.Random(seed)
    left = nbytes
    while left > 0:
        n = min(chunk, left)
        yield rng.randbytes(n)
        left -= n


def stream_sha256(seed: int, nbytes: int) -> str:
    import hashlib
    h = hashlib.sha256()
    for c in stream_chunks(seed, nbytes):
        h.update(c)
    return h.hexdigest()


def target_server_argv(name: str, ip: str, *, http_ports=TARGET_HTTP_PORTS,
                       udp_port: int | None = TARGET_UDP_PORT,
                       seconds: float = SERVER_MAX_SECONDS) -> list[str]:
    argv = [sys.executable, "-m", "hyperplane.lab", "serve", "--name", name, "--ip", ip,
            "--http-ports", ",".join(map(str, http_ports)), "--seconds", str(seconds)]
    if udp_port:
        argv += ["--udp-port", str(udp_port)]
    return argv


def start_target_server(cfg: LabConfig, name: str, *, stdout=None,
                        seconds: float = SERVER_MAX_SECONDS,
                        http_ports=TARGET_HTTP_PORTS,
                        udp_port: int | None = TARGET_UDP_PORT) -> subprocess.Popen:
    """Start the server of target `name` (t1..t3) in its namespace; returns once it listens.
    Stop it with .terminate() (lab down also ends it with the namespace)."""
    t = next((t for t in targets(cfg) if t["name"] == name), None)
    if t is None:
        raise ConfigError(f"no target {name!r}; the lab's targets are {', '.join(TARGET_ROLES)}")
    ns = namespace_for(cfg, name)
    env = dict(os.environ)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    proc = netns.popen_in(ns, target_server_argv(name, t["ip"], http_ports=http_ports,
                                                 udp_port=udp_port, seconds=seconds),
                          stdout=subprocess.PIPE, stderr=stdout, text=True, env=env)
    line = proc.stdout.readline().strip()
    if line != "ready":
        proc.kill()
        proc.wait(5)
        raise HyperplaneError(f"the server of target {name} did not start ({line!r})")
    return proc


def _serve(name: str, ip: str, http_ports: list[int], udp_port: int | None,
           seconds: float) -> None:
    import asyncio
    from urllib.parse import parse_qs

    async def stream(writer, nbytes: int, rate: float, seed: int) -> None:
        t0 = time.monotonic()
        sent = 0
        for chunk in stream_chunks(seed, nbytes):
            writer.write(chunk)
            await writer.drain()
            sent += len(chunk)
            if rate > 0:
                ahead = sent / rate - (time.monotonic() - t0)
                if ahead > 0:
                    await asyncio.sleep(ahead)

    async def handle(reader, writer) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                headers = []
                while True:
                    h = await reader.readline()
                    if h in (b"\r\n", b"\n", b""):
                        break
                    headers.append(h.lower())
                parts = line.split()
                if len(parts) != 3:
                    writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n"
                                 b"Connection: close\r\n\r\n")
                    break
                _method, target, version = parts
                keep = version == b"HTTP/1.1" and not any(
                    h.startswith(b"connection:") and b"close" in h for h in headers)
                conn = b"keep-alive" if keep else b"close"
                path, _, query = target.decode("latin-1").partition("?")
                if path == "/stream":
                    q = {k: v[-1] for k, v in parse_qs(query).items()}
                    nbytes = min(int(q.get("bytes", 1 << 20)), 1 << 34)
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream"
                                 b"\r\nX-Target: " + name.encode() + b"\r\nContent-Length: "
                                 + str(nbytes).encode() + b"\r\nConnection: " + conn
                                 + b"\r\n\r\n")
                    await stream(writer, nbytes, float(q.get("rate", 0)),
                                 int(q.get("seed", 0)))
                else:
                    local = writer.get_extra_info("sockname") or ("?", 0)
                    body = f"{name} {peer[0]}:{peer[1]} {local[1]}\n".encode()
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nX-Target: "
                                 + name.encode() + b"\r\nContent-Length: "
                                 + str(len(body)).encode() + b"\r\nConnection: " + conn
                                 + b"\r\n\r\n" + body)
                await writer.drain()
                if not keep:
                    break
        except (ConnectionError, ValueError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    class Udp(asyncio.DatagramProtocol):
        def connection_made(self, transport):
            self.transport = transport

        def datagram_received(self, data, addr):
            self.transport.sendto(f"{name} {addr[0]}:{addr[1]}|".encode() + data, addr)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        servers = [await asyncio.start_server(handle, ip, port, reuse_address=True,
                                              backlog=4096) for port in http_ports]
        if udp_port:
            await loop.create_datagram_endpoint(Udp, local_addr=(ip, udp_port))
        print("ready", flush=True)
        try:
            await asyncio.sleep(seconds)
        finally:
            for s in servers:
                s.close()

    asyncio.run(main())


def _main(argv: list[str]) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="python -m hyperplane.lab",
                                 description="Lab helpers run inside lab namespaces.")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sv = sub.add_parser("serve", help="a target's HTTP + UDP server (see hyperplane/lab.py)")
    sv.add_argument("--name", required=True)
    sv.add_argument("--ip", default="0.0.0.0")
    sv.add_argument("--http-ports", default=",".join(map(str, TARGET_HTTP_PORTS)))
    sv.add_argument("--udp-port", type=int, default=None)
    sv.add_argument("--seconds", type=float, default=SERVER_MAX_SECONDS)
    args = ap.parse_args(argv)
    ports = [int(p) for p in args.http_ports.split(",") if p]
    try:
        _serve(args.name, args.ip, ports, args.udp_port, min(args.seconds, SERVER_MAX_SECONDS))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
