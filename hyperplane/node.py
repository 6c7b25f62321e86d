"""One hyperplane node: load the data path (into a namespace), attach it, configure it.

The program stays attached and its maps stay pinned after this process exits; a node's
description (sizes, interfaces, gateways) is kept in NODE_STATE_DIR so that later commands
(hpctl flows, counters, a restart) open the same maps."""
from __future__ import annotations

import json
import os
from dataclasses import asdict

from . import netns as _netns
from .errors import NotFound
from .loader import PIN_ROOT, Datapath, Sizes, remove_pins
from .nat import GatewayConfig, apply_gateway
from .settings import Timeouts, write_config

NODE_STATE_DIR = "/run/hyperplane/nodes"


def _state_file(node: str) -> str:
    return os.path.join(NODE_STATE_DIR, f"{node}.json")


def read_state_file(path: str, missing: str) -> dict:
    """A JSON state file of a node, or NotFound with the sentence `missing`."""
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise NotFound(missing) from None


def node_state(node: str) -> dict:
    return read_state_file(_state_file(node), f"no node {node!r} is running here (no "
                           f"{_state_file(node)}); start one with hpctl nat up or hpctl lab up")


def running_nodes() -> list[str]:
    try:
        return sorted(n[:-5] for n in os.listdir(NODE_STATE_DIR)
                      if n.endswith(".json") and not n.endswith(".agent.json"))
    except FileNotFoundError:
        return []


def _in(netns: str | None, fn, *args, **kwargs):
    return _netns.call_in(netns, fn, *args, **kwargs) if netns else fn(*args, **kwargs)


def start_nat_node(node: str, ifnames: list[str], gateways: list[GatewayConfig], *,
                   netns: str | None = None, mode: str = "generic", pin_root: str = PIN_ROOT,
                   timeouts: Timeouts | dict | None = None, sizes: Sizes | None = None) -> Datapath:
    """Compile and load the program, pin its maps under pin_root/node (reusing any already
    there: a restart keeps every flow), write the settings and gateways, attach to ifnames."""
    if isinstance(timeouts, dict) or timeouts is None:
        timeouts = Timeouts.from_dict(timeouts)
    sizes = sizes or Sizes()
    pin_dir = os.path.join(pin_root, node)

    def load_and_attach():
        dp = Datapath(sizes, pin_dir)
        try:
            write_config(dp, timeouts)
            for gw in gateways:
                apply_gateway(dp, gw)
            for ifname in ifnames:
                dp.attach(ifname, mode)
        except BaseException:
            dp.detach_all()
            raise
        return dp

    dp = _in(netns, load_and_attach)
    os.makedirs(NODE_STATE_DIR, exist_ok=True)
    with open(_state_file(node), "w") as f:
        json.dump({"node": node, "netns": netns, "ifnames": ifnames, "mode": mode,
                   "pin_dir": pin_dir, "sizes": asdict(sizes), "timeouts": asdict(timeouts),
                   "gateways": [g.to_dict() for g in gateways]}, f, indent=2)
    dp.attached.clear()  # stays attached after we exit
    return dp


def stop_node(node: str, ifnames: list[str] | None = None, *, netns: str | None = None,
              pin_root: str = PIN_ROOT) -> None:
    """Stop its agent, detach from the node's interfaces, remove its pinned maps and state."""
    import bcc

    from .agent import stop_agent
    stop_agent(node)
    try:
        state = node_state(node)
        ifnames = ifnames or state["ifnames"]
        netns = netns or state["netns"]
    except NotFound:
        state = None
    if netns and not _netns.exists(netns):
        netns = None
        ifnames = []

    def detach():
        for ifname in ifnames or []:
            for flags in (1 << 1, 1 << 2):
                try:
                    bcc.BPF.remove_xdp(ifname.encode(), flags)
                except Exception:
                    pass

    _in(netns, detach)
    remove_pins(os.path.join(pin_root, node))
    for path in (_state_file(node), os.path.join(NODE_STATE_DIR, f"{node}.agent.json"),
                 os.path.join(NODE_STATE_DIR, f"{node}.agent.log")):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def open_node(node: str):
    """The running node's maps, opened from their pins without compiling anything
    (hyperplane.pinned.PinnedNode: table(name) like a Datapath, and the node's sizes)."""
    from .pinned import PinnedNode
    state = node_state(node)
    if not os.path.isdir(state["pin_dir"]):
        raise NotFound(f"node {node!r} has no pinned maps at {state['pin_dir']}")
    return PinnedNode(state["pin_dir"], Sizes(**state["sizes"]))


def read_counters(node: str, *, pin_root: str = PIN_ROOT) -> dict[str, int]:
    """Verdict name -> packets, summed over CPUs, from the node's pinned counters (at
    pin_root/node; the node's state file is not needed)."""
    from .metrics import verdict_counts
    from .pinned import PinnedNode
    with PinnedNode(os.path.join(pin_root, node)) as maps:
        return verdict_counts(maps)
