"""One hyperplane node: load the datapath into a namespace, attach it, configure resources.

This is the API the lab and hpctl use. (Being written: signatures are fixed.)
"""
from __future__ import annotations

PIN_ROOT = "/run/hyperplane/bpf"


def start_nat_node(node: str, ifnames: list[str], gateways: list, *, netns: str | None = None,
                   mode: str = "generic", pin_root: str = PIN_ROOT, timeouts: dict | None = None) -> None:
    """Compile and load the XDP program, pin its maps under pin_root/node, write the gateways
    (hyperplane.nat.GatewayConfig) into them and attach to ifnames (inside netns if given).
    Returns once attached; the program stays attached after this process exits."""
    raise NotImplementedError


def stop_node(node: str, ifnames: list[str], *, netns: str | None = None,
              pin_root: str = PIN_ROOT) -> None:
    """Detach from ifnames and remove the node's pinned maps."""
    raise NotImplementedError


def read_counters(node: str, *, pin_root: str = PIN_ROOT) -> dict[str, int]:
    """Verdict name -> packets, summed over CPUs, from the node's pinned counters."""
    raise NotImplementedError
