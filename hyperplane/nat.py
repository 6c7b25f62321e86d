"""NAT gateway configuration (what the loader writes into the gateway maps)."""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field


@dataclass
class GatewayConfig:
    name: str
    gw_id: int                                   # index into the gateway array, 0..HP_MAX_GATEWAYS-1
    nat_ips: list[str]                           # public IPs, up to 8
    inside_cidrs: list[str]                      # private networks whose traffic is translated
    port_min: int = 1024
    port_max: int = 65535
