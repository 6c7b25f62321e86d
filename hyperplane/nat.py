"""NAT gateway configuration and how it is written into the data path's maps."""
from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass

from .codec import ip_to_be32
from .errors import ConfigError

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
        where = f"gateway {self.name!r}"
        if not self.name:
            raise ConfigError("a gateway needs a name")
        if not isinstance(self.gw_id, int) or self.gw_id < 0:
            raise ConfigError(f"{where}: gw_id must be a non-negative integer")
        if not self.nat_ips or len(self.nat_ips) > MAX_NAT_IPS:
            raise ConfigError(f"{where}: give 1 to {MAX_NAT_IPS} NAT IPs, not {len(self.nat_ips)}")
        if not self.inside_cidrs:
            raise ConfigError(f"{where}: give at least one inside network (CIDR)")
        try:
            nat = [ipaddress.IPv4Address(ip) for ip in self.nat_ips]
            inside = [ipaddress.IPv4Network(c, strict=False) for c in self.inside_cidrs]
        except ValueError as exc:
            raise ConfigError(f"{where}: {exc}") from None
        if len(set(nat)) != len(nat):
            raise ConfigError(f"{where}: a NAT IP is listed twice")
        for ip in nat:
            if any(ip in net for net in inside):
                raise ConfigError(f"{where}: NAT IP {ip} lies inside an inside network")
        if not (1 <= self.port_min <= self.port_max <= 65535):
            raise ConfigError(f"{where}: need 1 <= port_min <= port_max <= 65535, got "
                              f"{self.port_min}-{self.port_max}")
        self.inside_cidrs = [str(n) for n in inside]

    @property
    def ports_per_destination(self) -> int:
        return (self.port_max - self.port_min + 1) * len(self.nat_ips)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "GatewayConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ConfigError(f"gateway: unknown field(s) {', '.join(sorted(unknown))}")
        missing = {"name", "nat_ips", "inside_cidrs"} - set(data)
        if missing:
            raise ConfigError(f"gateway: missing field(s) {', '.join(sorted(missing))}")
        return cls(**{"gw_id": 0, **data})


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
    for ip in gw.nat_ips:
        v = nat_ips.Leaf()
        v.gw_id = gw.gw_id
        nat_ips[nat_ips.Key(ip_to_be32(ip))] = v
    inside = dp.table("inside_nets")
    for cidr in gw.inside_cidrs:
        net = ipaddress.IPv4Network(cidr)
        k = inside.Key()
        k.prefixlen = net.prefixlen
        k.addr = ip_to_be32(str(net.network_address))
        inside[k] = inside.Leaf(gw.gw_id)
    # the gateway slot last: the data path uses a gateway only once it is whole
    gateways[gateways.Key(gw.gw_id)] = leaf
