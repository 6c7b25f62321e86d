"""Node-wide data path settings: timeouts and behaviour flags (the `config` map)."""
from __future__ import annotations

import os
import threading
from dataclasses import asdict, dataclass

from hyperplane.errors import ConfigError
from hyperplane.datapath.verdicts import ConfigFlag, Timeout

F_RST_ON_NO_FLOW = 1  # bpf/structs.h HP_F_RST_ON_NO_FLOW (keep in sync)
F_FLEET = int(ConfigFlag.FLEET)  # set by hyperplane.fleet.dataplane
F_EVENT_WAKEUP = int(ConfigFlag.EVENT_WAKEUP)   # ditto: its sync task sleeps on the ring
F_PEER_EVENTS = int(ConfigFlag.PEER_EVENTS)     # set by hyperplane.observe.events.EventHub
# flags other modules own: write_config keeps them
_KEPT_FLAGS = F_FLEET | F_EVENT_WAKEUP | F_PEER_EVENTS
# An agent's tasks each change a part of the one config entry: one read-modify-write at a
# time, so none undoes another's.
_config_lock = threading.Lock()


def update_config(dp, change) -> None:
    """change(leaf) on the config entry, written back (under the process's config lock)."""
    with _config_lock:
        table = dp.table("config")
        key = table.Key(0)
        leaf = table[key]
        change(leaf)
        table[key] = leaf


def set_flags(dp, flags: int, on: bool) -> None:
    """Set or clear HP_F_* flags, leaving the rest of the config as it is."""
    def change(leaf):
        leaf.flags = (leaf.flags | flags) if on else (leaf.flags & ~flags)
    update_config(dp, change)


@dataclass(frozen=True)
class Timeouts:
    """Idle timeouts in seconds. Defaults: AWS NAT gateway / NLB (REFERENCE.md)."""
    tcp_established: int = 350   # AWS: 350 s idle, then the connection is gone
    tcp_syn: int = 60            # half-open: SYN seen, no SYN-ACK
    tcp_closing: int = 10        # after a FIN or RST (Linux conntrack: 10 s after a RST)
    udp: int = 120               # AWS NLB's UDP idle timeout
    icmp: int = 30

    def __post_init__(self):
        for name, value in asdict(self).items():
            if isinstance(value, bool) or not isinstance(value, int) \
                    or not 1 <= value <= 7 * 24 * 3600:
                raise ConfigError(f"timeout {name} must be whole seconds from 1 to 604800, "
                                  f"not {value!r}")

    def by_index(self) -> list[int]:
        order = {Timeout.TCP_ESTABLISHED: self.tcp_established, Timeout.TCP_SYN: self.tcp_syn,
                 Timeout.TCP_CLOSING: self.tcp_closing, Timeout.UDP: self.udp,
                 Timeout.ICMP: self.icmp}
        return [order[t] for t in sorted(order)]

    @classmethod
    def from_dict(cls, data: dict | None) -> "Timeouts":
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"timeouts must be a table of seconds by name, not {data!r}")
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown timeout(s): {', '.join(sorted(unknown))}; known: "
                              f"{', '.join(cls.__dataclass_fields__)}")
        return cls(**data)


def write_config(dp, timeouts: Timeouts | None = None, *, rst_on_no_flow: bool = True,
                 hash_seed: int | None = None) -> None:
    """Write the node-wide settings. Keeps the existing hash seed of a pinned map, so a
    restarted node keeps choosing the same ports and targets, and the fleet identity
    (hyperplane.fleet.dataplane writes it)."""
    timeouts = timeouts or Timeouts()

    def change(leaf):
        for i, value in enumerate(timeouts.by_index()):
            leaf.timeout_s[i] = value
        leaf.flags = (leaf.flags & _KEPT_FLAGS) | (F_RST_ON_NO_FLOW if rst_on_no_flow else 0)
        if hash_seed is not None:
            leaf.hash_seed = hash_seed
        elif leaf.hash_seed == 0:
            leaf.hash_seed = int.from_bytes(os.urandom(4), "little") or 1
    update_config(dp, change)
