"""One hyperplane node: load the data path (into a namespace), attach it, configure it.

The program stays attached and its maps stay pinned after this process exits; a node's
description (sizes, interfaces, gateways, the addresses it added) is kept in
NODE_STATE_DIR so that later commands (hpctl flows, counters, a restart) open the same
maps.

Bringing a node up, or changing a running one, is one step: everything that can be
checked is checked before anything changes, and when a later step fails the steps before
it are undone, so a new node leaves nothing behind and a running one keeps its previous
configuration (maps, attachments, addresses, state file)."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import re
from dataclasses import asdict

from hyperplane.node import addresses
from hyperplane import netns as _netns
from hyperplane import validate
from hyperplane.codec import be32_to_ip
from hyperplane.errors import ConfigError, HyperplaneError, NotFound
from hyperplane.datapath.loader import PIN_ROOT, Datapath, Sizes, choose_hook, detach, remove_pins, \
    validate_mode
from hyperplane.nat.gateway import GatewayConfig, check_gateways, write_gateways
from hyperplane.datapath.settings import Timeouts, write_config

NODE_STATE_DIR = "/run/hyperplane/nodes"
# A node's name becomes file and directory names: no dots, slashes or spaces.
NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")
# The maps `hpctl nat up` writes; they are restored if a later step fails.
NAT_TABLES = ("config", "gateways", "nat_ips", "inside_nets")

log = logging.getLogger("hyperplane.node.lifecycle")


def check_node_name(node) -> str:
    if not isinstance(node, str) or not NODE_NAME.fullmatch(node):
        raise ConfigError(f"A node name must be 1-63 letters, digits, '-' or '_', starting "
                          f"with a letter or digit, got {node!r}.")
    return node


def state_path(node: str, suffix: str = ".json") -> str:
    """A file of the node in NODE_STATE_DIR: its state (.json) or its agent's files."""
    return os.path.join(NODE_STATE_DIR, f"{node}{suffix}")


def _state_file(node: str) -> str:
    return state_path(node)


def read_state_file(path: str, missing: str) -> dict:
    """A JSON state file (a table), NotFound with the sentence `missing`, or a ConfigError
    that says the file is damaged."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise NotFound(missing) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
    except ValueError as exc:  # not UTF-8, not JSON (truncated, garbage, empty)
        raise ConfigError(f"{path} is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a JSON object")
    return data


def write_state_file(path: str, data: dict) -> None:
    """Write whole or not at all (a reader never sees half a file)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def node_state(node: str) -> dict:
    path = _state_file(check_node_name(node))
    try:
        state = read_state_file(path, f"no node {node!r} is running here (no {path}); start "
                                      f"one with hpctl nat up or hpctl lab up")
        _check_state(state)
    except (ConfigError, TypeError) as exc:  # TypeError: Sizes(**sizes) with unknown keys
        raise ConfigError(f"the state file of node {node!r} is damaged ({exc}); stop the node "
                          f"with hpctl nat down --node {node} and start it again") from None
    return state


def _check_state(state: dict) -> None:
    str_or_none = (str, type(None))
    for key, kind in (("node", str), ("netns", str_or_none), ("ifnames", list),
                      ("mode", str_or_none), ("pin_dir", str), ("sizes", dict),
                      ("timeouts", dict), ("gateways", list)):
        if not isinstance(state.get(key), kind):
            raise ConfigError(f"field {key!r} is missing or wrong")
    validate.string_list("ifnames", state["ifnames"])
    Sizes(**state["sizes"]).cflags()
    Timeouts.from_dict(state["timeouts"])
    for gw in state["gateways"]:
        GatewayConfig.from_dict(gw)


def running_nodes() -> list[str]:
    try:
        names = os.listdir(NODE_STATE_DIR)
    except FileNotFoundError:
        return []
    # only <node>.json: the agent's files have a second dot
    return sorted(n[:-5] for n in names if n.endswith(".json") and NODE_NAME.fullmatch(n[:-5]))


def node_exists(node: str, pin_root: str = PIN_ROOT) -> bool:
    """Anything of the node left here: state file, pinned maps or agent."""
    check_node_name(node)
    return any(os.path.exists(p) for p in (_state_file(node), state_path(node, ".agent.pid"),
                                           os.path.join(pin_root, node)))


def _in(netns: str | None, fn, *args, **kwargs):
    return _netns.call_in(netns, fn, *args, **kwargs) if netns else fn(*args, **kwargs)


def _quietly(fn, *args) -> None:
    """An undo step: a failure is logged and the other steps still run (the error the
    user sees is the one that made us undo)."""
    try:
        fn(*args)
    except Exception as exc:  # noqa: BLE001
        log.warning("undo %s%r failed: %s", getattr(fn, "__name__", fn), args, exc)


def _attach(dp: Datapath, ifname: str, mode: str | None) -> None:
    """Attach in mode, an opaque name the loader checks; None: the loader's default."""
    if mode is None:
        dp.attach(ifname)
    else:
        dp.attach(ifname, mode)


def _snapshot(dp) -> dict:
    return {name: list(dp.table(name).items()) for name in NAT_TABLES}


def _restore(dp, snapshot: dict) -> None:
    for name, items in snapshot.items():
        table = dp.table(name)
        keep = {bytes(k) for k, _ in items}
        if name not in ("config", "gateways"):  # arrays: every index always exists
            for k in list(table.keys()):
                if bytes(k) not in keep:
                    table.pop(k, None)
        for k, value in items:
            table[k] = value


def start_nat_node(node: str, ifnames: list[str], gateways: list[GatewayConfig], *,
                   netns: str | None = None, mode: str | None = None, pin_root: str = PIN_ROOT,
                   timeouts: Timeouts | dict | None = None, sizes: Sizes | None = None,
                   outside_if: str | None = None, nat_from_store: bool = False) -> Datapath:
    """Compile and load the program, pin its maps under pin_root/node (reusing any already
    there: a restart keeps every flow), write the settings and gateways, attach to ifnames,
    add each NAT IP the namespace does not have yet as a /32 on the outside interface
    (outside_if, else found from the routes: hyperplane.node.addresses), and remove what a
    previous run of the node had and this one has not (NAT IPs, networks, interfaces,
    addresses). All or nothing: see the module's docstring.

    nat_from_store: the node's gateways are the ones the cluster store assigns it, applied
    by its agent (apply_gateways); `gateways` is then what it starts with (usually none)."""
    # 1. check everything; nothing has changed yet
    check_node_name(node)
    if not isinstance(timeouts, Timeouts):
        timeouts = Timeouts.from_dict(timeouts)
    sizes = sizes or Sizes()
    with validate.context(f"Node {node!r}"):
        validate.string_list("ifnames", ifnames)
    check_gateways(gateways, sizes)
    if mode is not None:
        validate_mode(mode)
    prev = node_state(node) if os.path.exists(_state_file(node)) else None
    if prev is not None and prev["netns"] != netns:
        raise ConfigError(f"node {node!r} runs in namespace {prev['netns'] or '(none)'}; stop "
                          f"it first (hpctl nat down --node {node}) to start it in "
                          f"{netns or 'this namespace'}")
    if netns is not None and not _netns.exists(netns):
        raise NotFound(f"network namespace {netns!r} does not exist")
    links = _netns.link_names(netns)
    for ifname in ifnames:
        if ifname not in links:
            raise ConfigError(f"there is no interface {ifname!r} in "
                              f"{'namespace ' + netns if netns else 'this namespace'}")
    nat_ips = [ip for gw in gateways for ip in gw.nat_ips]
    addr_plan = addresses.plan_in(
        netns, nat_ips, addresses.Added.from_dicts(prev.get("addresses") if prev else []),
        outside_if=outside_if, what="NAT IP",
        hint="; name the outside interface (hpctl nat up --outside-if)")
    pin_dir = os.path.join(pin_root, node)
    before = {i: prev["mode"] for i in prev["ifnames"]} if prev else {}

    # 2. apply, remembering how to undo each step
    with contextlib.ExitStack() as undo:
        if not os.path.isdir(pin_dir):  # a new node: no pins may stay behind
            undo.callback(_quietly, remove_pins, pin_dir)
        # compiled for the first interface's hook only (a compile is 10-15 s): the
        # other hook is compiled when an interface needs it
        first_hook = _in(netns, choose_hook, ifnames[0], mode or "auto") if ifnames else "xdp"
        dp = Datapath(sizes, pin_dir, hook=first_hook)
        _refuse_vips(dp, nat_ips)
        undo.callback(_quietly, _restore, dp, _snapshot(dp))
        write_config(dp, timeouts)
        write_gateways(dp, gateways)

        def put_back(ifname: str) -> None:
            """ifname as it was: without the data path, or with it in its old mode (the
            new program: it uses the same maps, which are restored too)."""
            if ifname in before:
                _attach(dp, ifname, before[ifname])
            else:
                detach(ifname)

        for ifname in [*ifnames, *(i for i in before if i not in ifnames)]:
            # the undo step goes first: a failed attach may have detached the old program
            undo.callback(_quietly, _in, netns, put_back, ifname)
            if ifname in ifnames:
                _in(netns, _attach, dp, ifname, mode)  # replaces what was attached
            else:
                _in(netns, detach, ifname)
        _change_addresses(undo, netns, addr_plan)
        write_state_file(_state_file(node), {
            "node": node, "netns": netns, "ifnames": ifnames, "mode": mode,
            "pin_dir": pin_dir, "sizes": asdict(sizes), "timeouts": asdict(timeouts),
            "gateways": [g.to_dict() for g in gateways], "outside_if": outside_if,
            "addresses": [a.to_dict() for a in addr_plan.owned],
            "nat_from_store": nat_from_store})
        undo.pop_all()  # 3. done: keep it all
    dp.attached.clear()  # stays attached after we exit
    return dp


def _change_addresses(undo: contextlib.ExitStack, netns: str | None, plan) -> None:
    """Add and remove the NAT IP addresses of an address plan, each with its undo step."""
    for a in plan.add:
        addresses.add(netns, a)
        undo.callback(_quietly, addresses.remove, netns, a)
    for a in plan.remove:
        addresses.remove(netns, a)
        undo.callback(_quietly, addresses.add, netns, a)


def apply_gateways(node: str, dp, gateways: list[GatewayConfig]) -> dict:
    """Make the running node (dp: its maps, pinned or compiled) run exactly these gateways:
    the gateway maps, the NAT IP addresses, the state file. All or nothing, like
    start_nat_node; flows of gateways that stay are untouched. Returns the new state."""
    state = node_state(node)
    check_gateways(gateways, dp.sizes)
    nat_ips = [ip for gw in gateways for ip in gw.nat_ips]
    _refuse_vips(dp, nat_ips)
    netns = state["netns"]
    addr_plan = addresses.plan_in(
        netns, nat_ips, addresses.Added.from_dicts(state.get("addresses")),
        outside_if=state.get("outside_if"), what="NAT IP",
        hint="; name the outside interface (hpctl node up --outside-if)")
    with contextlib.ExitStack() as undo:
        undo.callback(_quietly, _restore, dp, _snapshot(dp))
        write_gateways(dp, gateways)
        _change_addresses(undo, netns, addr_plan)
        state = {**state, "gateways": [g.to_dict() for g in gateways],
                 "addresses": [a.to_dict() for a in addr_plan.owned]}
        write_state_file(_state_file(node), state)
        undo.pop_all()
    return state


def _refuse_vips(dp, nat_ips: list[str]) -> None:
    """A NAT IP that is a listener's VIP on this node would make its packets ambiguous."""
    vips = {be32_to_ip(k.value) for k in dp.table("vips").keys()}
    for ip in nat_ips:
        if ip in vips:
            raise ConfigError(f"NAT IP {ip} is a load balancer VIP on this node; a NAT IP "
                              f"and a VIP must differ")


def stop_node(node: str, ifnames: list[str] | None = None, *, netns: str | None = None,
              pin_root: str = PIN_ROOT) -> list[str]:
    """Stop its agent, detach from the node's interfaces, remove the addresses hyperplane
    added for it (NAT IPs and VIPs), its pinned maps and state. Tolerates a half-built or
    damaged node; returns warnings about what could not be cleaned up."""
    from hyperplane.node.agent import release_vips, stop_agent
    check_node_name(node)
    warnings = []
    stop_agent(node)
    try:
        state = node_state(node)
        ifnames = ifnames or state["ifnames"]
        netns = netns or state["netns"]
    except NotFound:
        state = None
    except ConfigError:
        state = None
        warnings.append(f"the state file of node {node!r} was damaged, so the data path may "
                        f"still be attached to its interfaces and its NAT IPs still added")
    # A node whose namespace is gone took its interfaces and addresses with it (and their
    # names must never be looked up in this process's own namespace instead).
    if not netns or _netns.exists(netns):
        for ifname in ifnames or []:
            _in(netns, detach, ifname)
        try:
            if state is not None:
                addresses.release(netns, addresses.Added.from_dicts(state.get("addresses")))
            release_vips(node, netns)
        except (HyperplaneError, OSError) as exc:
            warnings.append(f"could not remove the addresses node {node!r} added: {exc}")
    remove_pins(os.path.join(pin_root, node))
    # .events.sock: a killed agent (SIGKILL: a node killed in the fleet lab) leaves its
    # flow-event socket behind
    for suffix in (".json", ".agent.json", ".agent.log", ".agent.vips.json", ".events.sock"):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(state_path(node, suffix))
    return warnings


def open_node(node: str):
    """The running node's maps, opened from their pins without compiling anything
    (hyperplane.pinned.PinnedNode: table(name) like a Datapath, and the node's sizes)."""
    from hyperplane.datapath.pinned import PinnedNode
    state = node_state(node)
    if not os.path.isdir(state["pin_dir"]):
        raise NotFound(f"node {node!r} has no pinned maps at {state['pin_dir']}")
    return PinnedNode(state["pin_dir"], Sizes(**state["sizes"]))


def read_counters(node: str, *, pin_root: str = PIN_ROOT) -> dict[str, int]:
    """Verdict name -> packets, summed over CPUs, from the node's pinned counters (at
    pin_root/node; the node's state file is not needed)."""
    from hyperplane.observe.metrics import verdict_counts
    from hyperplane.datapath.pinned import PinnedNode
    with PinnedNode(os.path.join(pin_root, node)) as maps:
        return verdict_counts(maps)
