"""The one-node NAT lab: three network namespaces on this machine, never connected to the
host's real interfaces.

    {prefix}-client          {prefix}-node1                      {prefix}-inet
    cl0 10.10.0.10/24  <-->  in0 10.10.0.1/24
        10.10.0.11/24        out0 198.18.0.1/24            <-->  inet0 198.18.0.2/24
    default via 10.10.0.1         198.18.0.100/32 (NAT IP)             198.18.0.3/24

Modes (what the node does with client traffic):
  xdp     the hyperplane XDP NAT gateway on in0/out0; the node kernel's forward chain
          drops (and counts) anything XDP did not redirect; inet has no route back to
          10.10.0.0/24, so only translated traffic can come back.
  kernel  plain kernel forwarding, no NAT (the benchmark floor); inet routes
          10.10.0.0/24 via 198.18.0.1.
  nft     Linux NAT for comparison: forward accept, snat 10.10.0.0/24 to 198.18.0.100
          on out0; no route back on inet.

`topology(cfg)` is the pure plan (tested without root); `up`, `down` and `status` act on
the machine. docs/lab.md has the same table.
"""
from __future__ import annotations

import ipaddress
import json
import os
import re
import shutil
from dataclasses import asdict, dataclass

from . import netns
from .errors import ConfigError, EnvironmentProblem, HyperplaneError, NotFound

MODES = ("xdp", "kernel", "nft")
XDP_MODES = ("generic", "native")
ROLES = ("client", "node", "inet")
STATE_DIR = "/run/hyperplane/lab"
NFT_FAMILY = "inet"
NFT_TABLE = "hyperplane_lab"
NFT_FORWARD_COUNTER = "forward"
NODE_IFNAMES = ["in0", "out0"]

CLIENT_NET = "10.10.0.0/24"
INTERNET_NET = "198.18.0.0/15"          # RFC 2544 benchmark addresses
NAT_IP = "198.18.0.100"
CLIENT_IPS = ["10.10.0.10", "10.10.0.11"]
INET_IPS = ["198.18.0.2", "198.18.0.3"]
NODE_INSIDE_IP = "10.10.0.1"
NODE_OUTSIDE_IP = "198.18.0.1"

# Fixed, locally administered MACs: the plan (and its permanent neighbour entries) is then
# known before anything is built. Two labs never share a segment, so reuse is harmless.
MACS = {
    "cl0": "02:68:70:0a:00:0a",
    "in0": "02:68:70:0a:00:01",
    "out0": "02:68:70:c6:00:01",
    "inet0": "02:68:70:c6:00:02",
}

_PREFIX_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")


@dataclass(frozen=True)
class LabConfig:
    prefix: str = "hp"
    mode: str = "xdp"             # xdp | kernel | nft
    xdp_mode: str = "generic"     # generic | native (only for mode xdp)
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
        if self.xdp_mode not in XDP_MODES:
            raise ConfigError(f"xdp mode {self.xdp_mode!r} is not one of {', '.join(XDP_MODES)}")
        return self


# --- the plan (pure) ---------------------------------------------------------------------

def namespaces(cfg: LabConfig) -> dict[str, str]:
    """Role -> namespace name."""
    return {"client": f"{cfg.prefix}-client", "node": f"{cfg.prefix}-node1",
            "inet": f"{cfg.prefix}-inet"}


def node_name(cfg: LabConfig) -> str:
    """The hyperplane node name (its maps are pinned under PIN_ROOT/<name>). The default lab
    is 'node1' (hpctl's default --node); any other prefix gets its own '<prefix>-node1' so a
    test lab never clobbers the user's lab."""
    return "node1" if cfg.prefix == "hp" else f"{cfg.prefix}-node1"


def nft_ruleset(cfg: LabConfig) -> str:
    """The node namespace's nftables ruleset for the mode."""
    policy = "drop" if cfg.mode == "xdp" else "accept"
    lines = [
        f"table {NFT_FAMILY} {NFT_TABLE} {{",
        f"  counter {NFT_FORWARD_COUNTER} {{ }}",
        "  chain forward {",
        f"    type filter hook forward priority filter; policy {policy};",
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
    lines.append("}")
    return "\n".join(lines) + "\n"


def gateways(cfg: LabConfig) -> list[dict]:
    return [{"name": "nat-gw-1", "gw_id": 0, "nat_ips": [NAT_IP], "inside_cidrs": [CLIENT_NET]}]


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
         "addresses": [f"{NODE_OUTSIDE_IP}/24", f"{NAT_IP}/32"], "peer": "inet/inet0",
         "side": "outside"},
        {"role": "inet", "netns": ns["inet"], "ifname": "inet0", "mac": MACS["inet0"],
         "addresses": [f"{ip}/24" for ip in INET_IPS], "peer": "node/out0"},
    ]
    links = [("client", "cl0", "node", "in0"), ("node", "out0", "inet", "inet0")]
    routes = {"client": [{"dst": "default", "gateway": NODE_INSIDE_IP}], "node": [], "inet": []}
    if cfg.mode == "kernel":
        routes["inet"].append({"dst": CLIENT_NET, "gateway": NODE_OUTSIDE_IP})
    neigh = {
        "client": [{"ifname": "cl0", "ip": NODE_INSIDE_IP, "mac": MACS["in0"]}],
        "node": ([{"ifname": "in0", "ip": ip, "mac": MACS["cl0"]} for ip in CLIENT_IPS]
                 + [{"ifname": "out0", "ip": ip, "mac": MACS["inet0"]} for ip in INET_IPS]),
        "inet": [{"ifname": "inet0", "ip": ip, "mac": MACS["out0"]}
                 for ip in (NODE_OUTSIDE_IP, NAT_IP)],
    }
    common = {"net.ipv6.conf.all.disable_ipv6": 1, "net.ipv6.conf.default.disable_ipv6": 1,
              "net.ipv4.conf.all.rp_filter": 0, "net.ipv4.conf.default.rp_filter": 0}
    sysctls = {role: dict(common) for role in ROLES}
    sysctls["node"]["net.ipv4.ip_forward"] = 1
    # Native XDP redirecting into a veth needs the *peer* ready for XDP frames (GRO on, or
    # a program attached there): the far ends cl0/inet0 get GRO back on in that case only.
    gro_on = ["client/cl0", "inet/inet0"] if (cfg.mode == "xdp" and cfg.xdp_mode == "native") \
        else []
    return {
        "prefix": cfg.prefix,
        "mode": cfg.mode,
        "xdp_mode": cfg.xdp_mode if cfg.mode == "xdp" else None,
        "namespaces": ns,
        "interfaces": ifaces,
        "links": [{"a": f"{a}/{ia}", "b": f"{b}/{ib}"} for a, ia, b, ib in links],
        "routes": routes,
        "neighbours": neigh,
        "sysctls": sysctls,
        "offloads_off": ["gro", "gso", "tso", "tx-checksum"],
        "gro_on": gro_on,
        "client_addresses": list(CLIENT_IPS),
        "internet_addresses": list(INET_IPS),
        "client_net": CLIENT_NET,
        "nat_ips": [NAT_IP] if cfg.mode in ("xdp", "nft") else [],
        "gateways": gateways(cfg) if cfg.mode == "xdp" else [],
        "node": {"name": node_name(cfg), "netns": ns["node"], "ifnames": list(NODE_IFNAMES),
                 "pin_root": _pin_root()},
        "nft": {"family": NFT_FAMILY, "table": NFT_TABLE, "forward_counter": NFT_FORWARD_COUNTER,
                "forward_policy": "drop" if cfg.mode == "xdp" else "accept",
                "snat": cfg.mode == "nft"},
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
    """Build the lab (and, in mode xdp, start the NAT node). On any failure everything built
    so far is removed again. Returns status(cfg)."""
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
        for a, ia, b, ib in (l["a"].split("/") + l["b"].split("/") for l in topo["links"]):
            netns.veth(ns[a], ia, ns[b], ib, mac_a=MACS[ia], mac_b=MACS[ib])
        for ifc in topo["interfaces"]:
            netns.offloads_off(ifc["netns"], ifc["ifname"])
            for cidr in ifc["addresses"]:
                netns.add_address(ifc["netns"], ifc["ifname"], cidr)
        for where in topo["gro_on"]:
            role, ifname = where.split("/")
            netns.set_gro(ns[role], ifname, True)
        for role, routes in topo["routes"].items():
            for r in routes:
                netns.add_route(ns[role], r["dst"], r.get("gateway"))
        for role, entries in topo["neighbours"].items():
            for e in entries:
                netns.add_neighbour(ns[role], e["ifname"], e["ip"], e["mac"])
        netns.nft_load(ns["node"], nft_ruleset(cfg))
        if cfg.mode == "xdp":
            _start_node(cfg, topo)
    except BaseException:
        down(cfg)
        raise
    return status(cfg)


def _start_node(cfg: LabConfig, topo: dict) -> None:
    from . import node
    from .nat import GatewayConfig
    gws = [GatewayConfig(**g) for g in topo["gateways"]]
    extra = {}
    if cfg.sizes:
        from .loader import Sizes
        extra["sizes"] = Sizes(**cfg.sizes)
    try:
        node.start_nat_node(topo["node"]["name"], list(NODE_IFNAMES), gws,
                            netns=topo["node"]["netns"], mode=cfg.xdp_mode,
                            pin_root=topo["node"]["pin_root"], timeouts=cfg.timeouts, **extra)
    except NotImplementedError:
        raise HyperplaneError("lab mode xdp needs the XDP datapath, which is not implemented "
                              "yet (hyperplane.node.start_nat_node); use --mode kernel or "
                              "--mode nft") from None


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
        warnings += _stop_node(topo)
    removed = []
    for role in ROLES:
        name = topo["namespaces"][role]
        try:
            if netns.remove(name):
                removed.append(name)
        except OSError as exc:
            warnings.append(f"could not remove namespace {name}: {exc}")
    try:
        os.unlink(_state_path(prefix))
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
    except NotImplementedError:
        return []
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
        "xdp_mode": topo["xdp_mode"] if state else None,
        "namespaces": topo["namespaces"],
        "namespaces_present": have,
        "client_addresses": topo["client_addresses"],
        "internet_addresses": topo["internet_addresses"],
        "client_net": topo["client_net"],
        "nat_ips": topo["nat_ips"] if state else [],
        "gateways": topo["gateways"] if state else [],
        "node": dict(topo["node"]),
        "interfaces": [],
        "nft_forward_packets": None,
    }
    if not have:
        return out
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
        })
    out["node"]["xdp_attached"] = {i["ifname"]: i["xdp"] is not None
                                   for i in out["interfaces"] if i["role"] == "node"}
    if topo["namespaces"]["node"] in have:
        try:
            out["nft_forward_packets"] = netns.nft_counter(
                topo["namespaces"]["node"], NFT_FAMILY, NFT_TABLE, NFT_FORWARD_COUNTER)["packets"]
        except (HyperplaneError, OSError, ValueError, Exception):
            out["nft_forward_packets"] = None
    return out


def forward_packets(cfg: LabConfig) -> int:
    """Packets the node's kernel tried to forward (mode xdp: all dropped by policy)."""
    return netns.nft_counter(namespaces(cfg)["node"], NFT_FAMILY, NFT_TABLE,
                             NFT_FORWARD_COUNTER)["packets"]


def namespace_for(cfg: LabConfig, role: str) -> str:
    """The namespace of a role (client, node/node1, inet); NotFound if the lab lacks it."""
    role = {"node1": "node"}.get(role, role)
    if role not in ROLES:
        raise ConfigError(f"role {role!r} is not one of {', '.join(ROLES)}")
    name = namespaces(cfg)[role]
    if not netns.exists(name):
        raise NotFound(f"lab {cfg.prefix!r} is not up (no namespace {name}); run hpctl lab up")
    return name


def ip_in(net: str, addr: str) -> bool:
    return ipaddress.ip_address(addr.split("/")[0]) in ipaddress.ip_network(net)
