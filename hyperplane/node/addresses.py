"""The addresses a node answers for: its NAT IPs and its listeners' VIPs.

Replies to a NAT IP and connections to a VIP reach the node only if it answers ARP for
those addresses, and the data path hands ARP (and pings to a NAT IP) to the kernel: so the
kernel must own them. Each is added as a /32 on the node's outside interface: the one
whose connected network contains the address, else the one the default route leaves by,
else the one the user names.

Only addresses hyperplane added are ever removed. Each one it adds is recorded (NAT IPs
in the node's state file, VIPs in the agent's address file) and labelled `<ifname>:hp`
when that fits the kernel's 15 characters. An address that is already there (the user's,
the lab's) is left alone and never recorded; a recorded one that lost its label (someone
removed it and added their own) is not removed either."""
from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass, field
from typing import Iterable

from hyperplane import netns as _netns
from hyperplane.errors import ConfigError, HyperplaneError

LABEL_SUFFIX = ":hp"
IFNAMSIZ = 16  # with the terminating NUL: labels have at most 15 characters


@dataclass(frozen=True)
class Added:
    """An address hyperplane added: ip/32 on ifname."""
    ip: str
    ifname: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dicts(cls, items) -> list["Added"]:
        """A record as written by to_dict; anything else in it is ignored (never removed)."""
        if not isinstance(items, list):
            return []
        return [cls(i["ip"], i["ifname"]) for i in items if isinstance(i, dict)
                and isinstance(i.get("ip"), str) and isinstance(i.get("ifname"), str)]


def label(ifname: str) -> str | None:
    text = ifname + LABEL_SUFFIX
    return text if len(text) < IFNAMSIZ else None


@dataclass
class Plan:
    add: list[Added] = field(default_factory=list)
    keep: list[Added] = field(default_factory=list)      # ours, present, still wanted
    remove: list[Added] = field(default_factory=list)    # ours, present, no longer wanted

    @property
    def owned(self) -> list[Added]:
        """The record once the plan is carried out."""
        return self.keep + self.add


def plan(wanted: Iterable[str], owned: Iterable[Added], present: list[dict],
         default_ifnames: list[str], links: list[str], *, outside_if: str | None = None,
         what: str = "address", hint: str = "") -> Plan:
    """What to add and remove so the namespace owns every wanted address (pure: present,
    default_ifnames and links describe the namespace, as hyperplane.netns reads them)."""
    if outside_if is not None and outside_if not in links:
        raise ConfigError(f"There is no interface {outside_if!r} to add {what}s to.")
    owned = list(owned)
    out = Plan()

    def ours(a: Added) -> bool:
        mark = label(a.ifname)
        return any(p["ifname"] == a.ifname and p["address"] == a.ip and p["prefixlen"] == 32
                   and (mark is None or p["label"] == mark) for p in present)

    wanted = list(dict.fromkeys(wanted))
    for ip in wanted:
        mine = [a for a in owned if a.ip == ip and ours(a)]
        if mine:
            out.keep.append(mine[0])
        elif not any(p["address"] == ip for p in present):
            out.add.append(Added(ip, outside_if or _outside(ip, present, default_ifnames,
                                                            what, hint)))
    out.remove = [a for a in owned if a.ip not in wanted and ours(a)]
    return out


def _outside(ip: str, present: list[dict], default_ifnames: list[str], what: str,
             hint: str) -> str:
    addr = ipaddress.IPv4Address(ip)
    connected = [(p["prefixlen"], p["ifname"]) for p in present if p["prefixlen"] < 32
                 and addr in ipaddress.IPv4Network(f"{p['address']}/{p['prefixlen']}",
                                                   strict=False)]
    if connected:
        return max(connected)[1]           # the longest prefix, as routing would
    if default_ifnames:
        return default_ifnames[0]
    raise ConfigError(f"Cannot tell which interface {what} {ip} belongs on: no interface's "
                      f"network contains it and there is no default route{hint}.")


def plan_in(ns: str | None, wanted: Iterable[str], owned: Iterable[Added], *,
            outside_if: str | None = None, what: str = "address", hint: str = "") -> Plan:
    """plan() for the namespace as it is now."""
    return plan(wanted, owned, _netns.ipv4_addresses(ns), _netns.default_route_ifnames(ns),
                _netns.link_names(ns), outside_if=outside_if, what=what, hint=hint)


def add(ns: str | None, a: Added) -> None:
    from pyroute2.netlink.exceptions import NetlinkError  # here: read commands skip pyroute2
    try:
        _netns.add_labeled_address(ns, a.ifname, a.ip, 32, label(a.ifname))
    except NetlinkError as exc:
        raise HyperplaneError(f"cannot add {a.ip}/32 to {a.ifname}: {exc}") from None


def remove(ns: str | None, a: Added) -> None:
    from pyroute2.netlink.exceptions import NetlinkError
    try:
        _netns.delete_address(ns, a.ifname, a.ip, 32)
    except NetlinkError as exc:
        raise HyperplaneError(f"cannot remove {a.ip}/32 from {a.ifname}: {exc}") from None


def release(ns: str | None, owned: Iterable[Added]) -> None:
    """Remove every recorded address that is still ours (node down)."""
    for a in plan_in(ns, [], owned).remove:
        remove(ns, a)
