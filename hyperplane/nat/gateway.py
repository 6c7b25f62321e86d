"""NAT gateway configuration and how it is written into the data path's maps."""
from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass, field

from hyperplane import validate as v
from hyperplane.codec import be32_to_ip, ip_to_be32
from hyperplane.errors import ConfigError
from hyperplane.datapath.settings import F_FLEET, Timeouts

MAX_NAT_IPS = 8  # AWS: up to 8 IPs per NAT gateway (bpf/consts.h HP_MAX_NAT_IPS)


@dataclass
class GatewayConfig:
    name: str
    gw_id: int                                   # index into the gateway array
    nat_ips: list[str]                           # public IPs, up to 8
    inside_cidrs: list[str]                      # private networks whose traffic is translated
    port_min: int = 1024                         # AWS: source ports 1024-65535
    port_max: int = 65535

    def __post_init__(self):
        v.string("A gateway's name", self.name)
        with v.context(f"Gateway {self.name!r}"):
            v.integer("gw_id", self.gw_id, 0, 2**32 - 1)
            nat = [v.unicast_ipv4("NAT IP", ip)
                   for ip in v.string_list("nat_ips", self.nat_ips, 1, MAX_NAT_IPS)]
            inside = [v.ipv4_network("inside network", c)
                      for c in v.string_list("inside_cidrs", self.inside_cidrs, 1)]
            if len(set(nat)) != len(nat):
                raise ConfigError("a NAT IP is listed twice.")
            v.no_overlap("inside networks", [(f"gateway {self.name!r}", n) for n in inside])
            for ip in nat:
                if any(ip in net for net in inside):
                    raise ConfigError(f"NAT IP {ip} lies inside an inside network.")
            v.integer("port_min", self.port_min, 1, 65535)
            v.integer("port_max", self.port_max, 1, 65535)
            if self.port_min > self.port_max:
                raise ConfigError(f"port_min {self.port_min} is above port_max {self.port_max}.")
        self.nat_ips = [str(ip) for ip in nat]
        self.inside_cidrs = [str(n) for n in inside]

    @property
    def ports_per_destination(self) -> int:
        return (self.port_max - self.port_min + 1) * len(self.nat_ips)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "GatewayConfig":
        return cls(**v.dataclass_table(cls, {"gw_id": 0, **_table(data)}, "gateway"))


def _table(data) -> dict:
    if not isinstance(data, dict):  # checked before {**data} would raise a TypeError
        raise ConfigError(f"A gateway must be a table of fields, got {data!r}.")
    return data


def check_gateways(gateways: list[GatewayConfig], sizes) -> None:
    """The gateways of one node, as a whole: names, ids and NAT IPs unique, inside
    networks disjoint (one inside address belongs to one gateway), and within the node's
    map sizes (hyperplane.loader.Sizes)."""
    names, ids = set(), set()
    nat_ips: dict[ipaddress.IPv4Address, str] = {}
    inside: list[tuple[str, ipaddress.IPv4Network]] = []
    for gw in gateways:
        where = f"gateway {gw.name!r}"
        if gw.name in names:
            raise ConfigError(f"Two gateways are named {gw.name!r}.")
        if gw.gw_id in ids:
            raise ConfigError(f"Two gateways have gw_id {gw.gw_id}.")
        if gw.gw_id >= sizes.max_gateways:
            raise ConfigError(f"Gateway {gw.name!r}: gw_id {gw.gw_id} is beyond this node's "
                              f"{sizes.max_gateways} gateway slots (0-{sizes.max_gateways - 1}).")
        if len(gw.nat_ips) > sizes.max_nat_ips:
            raise ConfigError(f"Gateway {gw.name!r} has {len(gw.nat_ips)} NAT IPs; this node "
                              f"holds at most {sizes.max_nat_ips} per gateway.")
        names.add(gw.name)
        ids.add(gw.gw_id)
        for ip in map(ipaddress.IPv4Address, gw.nat_ips):
            if ip in nat_ips:
                raise ConfigError(f"NAT IP {ip} belongs to both gateway {nat_ips[ip]!r} "
                                  f"and gateway {gw.name!r}.")
            nat_ips[ip] = gw.name
        inside += [(where, ipaddress.IPv4Network(c)) for c in gw.inside_cidrs]
    v.no_overlap("Inside networks", inside)
    for ip, owner in nat_ips.items():
        for where, net in inside:
            if ip in net:
                raise ConfigError(f"NAT IP {ip} of gateway {owner!r} lies inside network "
                                  f"{net} of {where}.")
    if len(inside) > sizes.max_inside_prefixes:
        raise ConfigError(f"The gateways have {len(inside)} inside networks; this node holds "
                          f"at most {sizes.max_inside_prefixes}.")


@dataclass
class NodeConfig:
    """What `hpctl nat up --config FILE` holds (JSON): the node's interfaces and namespace,
    how the data path attaches, the interface NAT IPs are added to, timeouts, gateways.
    The attach mode is the loader's business: it is passed on as given."""
    ifnames: list[str] = field(default_factory=list)
    netns: str | None = None
    xdp_mode: str | None = None
    outside_if: str | None = None
    timeouts: Timeouts = field(default_factory=Timeouts)
    gateways: list[GatewayConfig] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data) -> "NodeConfig":
        kw = v.dataclass_table(cls, data, "node config")
        with v.context("Node config"):
            if "ifnames" in kw:
                v.string_list("ifnames", kw["ifnames"])
            for name in ("netns", "xdp_mode", "outside_if"):
                if kw.get(name) is not None:
                    v.string(name, kw[name])
            kw["timeouts"] = Timeouts.from_dict(kw.get("timeouts"))
            gateways = kw.get("gateways", [])
            if not isinstance(gateways, list):
                raise ConfigError(f"gateways must be a list, got {gateways!r}.")
            kw["gateways"] = [GatewayConfig.from_dict({"gw_id": i, **_table(g)})
                              for i, g in enumerate(gateways)]
        return cls(**kw)


def apply_gateway(dp, gw: GatewayConfig) -> None:
    """Write one gateway into the maps (gateways, nat_ips, inside_nets)."""
    if gw.gw_id >= dp.sizes.max_gateways:
        raise ConfigError(f"gateway {gw.name!r}: gw_id {gw.gw_id} is beyond this node's "
                          f"{dp.sizes.max_gateways} gateway slots")
    gateways = dp.table("gateways")
    leaf = gateways.Leaf()
    for i, ip in enumerate(gw.nat_ips):
        leaf.nat_ips[i] = ip_to_be32(ip)
    leaf.n_nat_ips = len(gw.nat_ips)
    leaf.port_min = gw.port_min
    leaf.port_max = gw.port_max
    nat_ips = dp.table("nat_ips")
    for idx, ip in enumerate(gw.nat_ips):
        val = nat_ips.Leaf()
        val.gw_id = gw.gw_id
        val.ip_idx = idx
        nat_ips[nat_ips.Key(ip_to_be32(ip))] = val
    inside = dp.table("inside_nets")
    for cidr in gw.inside_cidrs:
        net = ipaddress.IPv4Network(cidr)
        k = inside.Key()
        k.prefixlen = net.prefixlen
        k.addr = ip_to_be32(str(net.network_address))
        inside[k] = inside.Leaf(gw.gw_id)
    config = dp.table("config")
    if not config[config.Key(0)].flags & F_FLEET:
        whole_range_blocks(dp, gw.gw_id, len(gw.nat_ips), gw.port_min, gw.port_max)
    # the gateway slot last: the data path uses a gateway only once it is whole
    gateways[gateways.Key(gw.gw_id)] = leaf


def write_blocks(dp, gw_id: int, blocks: list[tuple[int, int]], size: int) -> None:
    """The blocks (NAT IP index, block) a node takes ports of gateway gw_id from."""
    table = dp.table("gw_blocks")
    leaf = table.Leaf()
    leaf.n = len(blocks)
    leaf.block_size = size
    for i, (ip_idx, block) in enumerate(blocks):
        leaf.owned[i] = (ip_idx << 8) | block
    table[table.Key(gw_id)] = leaf


def whole_range_blocks(dp, gw_id: int, n_nat_ips: int, port_min: int, port_max: int) -> None:
    """Every port of every NAT IP (one block per IP, its whole range): a node on its own.
    A fleet node's blocks come from hyperplane.fleet.dataplane."""
    write_blocks(dp, gw_id, [(i, 0) for i in range(n_nat_ips)], port_max - port_min + 1)


def write_gateways(dp, gateways: list[GatewayConfig]) -> None:
    """Make the maps hold exactly these gateways: write each, then remove the NAT IPs,
    inside networks and gateway slots that none of them has any more."""
    for gw in gateways:
        apply_gateway(dp, gw)
    nat_ips = {ip for gw in gateways for ip in gw.nat_ips}
    table = dp.table("nat_ips")
    for key in list(table.keys()):
        if be32_to_ip(key.value) not in nat_ips:
            table.pop(key, None)
    inside = {str(ipaddress.IPv4Network(c)) for gw in gateways for c in gw.inside_cidrs}
    table = dp.table("inside_nets")
    for key in list(table.keys()):
        if f"{be32_to_ip(key.addr)}/{key.prefixlen}" not in inside:
            table.pop(key, None)
    ids = {gw.gw_id for gw in gateways}
    table = dp.table("gateways")
    for i in range(dp.sizes.max_gateways):
        if i not in ids and table[table.Key(i)].n_nat_ips:
            table[table.Key(i)] = table.Leaf()   # an empty slot: no NAT IP maps to it
