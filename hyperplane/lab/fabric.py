"""The multi-node lab's fabric: the links that attach each node to the two routers and the
sync bridge, and the routers' steering of each resource over its shard's nodes. The
controller calls it as shards and membership change:

    fabric = Fabric(cfg)                        # cfg.nodes >= 2, the lab is up
    fabric.set_shard("nat-gw-1", [1, 2, 4])     # create or replace the resource's groups
    fabric.members("nat-gw-1")      -> [1, 2, 4]   # read back from both routers' kernels
    fabric.cut(2)                   # delete node 2's in0/out0/sync0: it is off the network
    fabric.restore(2)               # its links, addresses, routes and nexthops back

Steering is one resilient nexthop group per resource on each router (fleet_plan.steering):
a group maps a flow's 5-tuple hash to one of RESILIENT["buckets"] buckets and each bucket
to a node, so changing a group's members moves only the buckets that must move: a removed
node's buckets go to the nodes that are short of buckets, and a new node takes idle
buckets (none busy) from the others. Every other bucket, and so every other flow, stays.
The kernel shares the buckets out by each member's position in the group (128 over 3 is
43/42/43), so the group is rewritten with every survivor in its place and a new member in
a leaving one's (fleet_plan.group_order): replacing node 1 of 1/2/3 by node 4 then moves
exactly node 1's 43 buckets; written as 2/3/4 it also moved one of node 3's (measured).

What the kernel (6.18) does when a node is cut, measured by tests/lab/test_fleet_fabric.py:
deleting the node's links deletes the routers' ends of them (veth pairs), the kernel
removes the nexthops that used those devices and drops them from every group; the dead
node's buckets are handed to the survivors and every survivor keeps each bucket it had.
A group whose last member goes is deleted, and the routes using it with it; `restore` or
`set_shard` creates both again. Nothing here edits the groups on a cut: the kernel does.

Plumbing: pyroute2 (through hyperplane.netns) for links, addresses, routes and rules;
`ip nexthop` and `ip route ... nhid` run in the router's namespace for the nexthop objects,
because pyroute2 (0.9.7 here) has no nexthop messages and no RTA_NH_ID route attribute.
"""
from __future__ import annotations

import errno
import ipaddress
import json
import os
import socket
import subprocess
from typing import Iterable

from hyperplane import netns
from hyperplane.errors import ConfigError, HyperplaneError
from hyperplane.lab.fleet_plan import (fleet_topology, group_order, node_links, ROUTERS,
                                       router_ifname)
from hyperplane.lab.plan import LabConfig, STATE_DIR

NODE_FABRIC_IFNAMES = ("in0", "out0", "sync0")   # what `cut` deletes


def state_path(prefix: str) -> str:
    """Where the fabric remembers the shards it was asked for and the nodes it cut (the
    kernel only knows the live members)."""
    return os.path.join(STATE_DIR, f"{prefix}-fabric.json")


# --- links ------------------------------------------------------------------------------

def wire(topo: dict, links: Iterable[dict]) -> None:
    """Build links of the plan: the veth pair (made in the namespace of end a, the other
    end moved to end b's), MACs, MTU, addresses; a sync link's bridge end joins the bridge."""
    by_end = {(i["role"], i["ifname"]): i for i in topo["interfaces"]}
    ns = topo["namespaces"]
    for link in links:
        (ra, ia), (rb, ib) = link["a"].split("/"), link["b"].split("/")
        a, b = by_end[(ra, ia)], by_end[(rb, ib)]
        netns.veth(ns[ra], ia, ns[rb], ib, mac_a=a["mac"], mac_b=b["mac"], mtu=link["mtu"])
        for end in (a, b):
            for cidr in end["addresses"]:
                netns.add_address(end["netns"], end["ifname"], cidr)
        if link["kind"] == "sync":
            netns.set_master(ns[ra], ia, topo["bridge"]["ifname"])


# --- the routers' side: `ip` in a namespace ----------------------------------------------

def _ip(ns: str, *args: object) -> str:
    argv = ["ip", *map(str, args)]
    try:
        return netns.run_in(ns, argv, capture_output=True, text=True, timeout=30).stdout
    except subprocess.CalledProcessError as exc:
        raise HyperplaneError(f"{' '.join(argv)} failed in {ns}: "
                              f"{(exc.stderr or exc.stdout or '').strip()}") from None


def _ip_json(ns: str, *args: object) -> list:
    out = _ip(ns, "-j", *args)
    return json.loads(out) if out.strip() else []


def _table_arg(table: int | str) -> list[str]:
    return [] if table == "main" else ["table", str(table)]


class Fabric:
    """The fabric of a multi-node lab that is up (see the module's doc)."""

    def __init__(self, cfg: LabConfig):
        if cfg.nodes < 2:
            raise ConfigError("the fabric belongs to the multi-node lab (--nodes 2 or more); "
                              f"lab {cfg.prefix!r} has {cfg.nodes} node")
        self.cfg = cfg
        self.topo = fleet_topology(cfg)
        self.ns = self.topo["namespaces"]
        self.steering = self.topo["steering"]

    # --- what it was asked for (the state file) -----------------------------------------

    def shards(self) -> dict[str, list[int]]:
        """Resource -> the node indexes of its shard (as last set; cut nodes included)."""
        return self._state()["shards"]

    def cut_nodes(self) -> list[int]:
        return self._state()["cut"]

    def _state(self) -> dict:
        try:
            with open(state_path(self.cfg.prefix)) as f:
                data = json.load(f)
            return {"shards": {r: [int(i) for i in m] for r, m in data["shards"].items()},
                    "cut": sorted(int(i) for i in data["cut"])}
        except (FileNotFoundError, ValueError, KeyError, TypeError):
            return {"shards": dict(self.topo["shards"]), "cut": []}

    def _save(self, shards: dict[str, list[int]], cut: Iterable[int]) -> None:
        os.makedirs(STATE_DIR, exist_ok=True)
        path = state_path(self.cfg.prefix)
        tmp = f"{path}.tmp.{os.getpid()}"     # the controller and hpctl may both write
        with open(tmp, "w") as f:
            json.dump({"shards": shards, "cut": sorted(set(cut))}, f)
        os.replace(tmp, path)

    # --- the controller's verbs -----------------------------------------------------------

    def set_shard(self, resource: str, node_indexes: Iterable[int]) -> list[int]:
        """Steer the resource to these nodes on both routers (create or replace its groups):
        only changed members move buckets. A cut node stays in the shard and joins the
        groups when restored. Returns the members read back from the kernel."""
        self._check_resource(resource)
        nodes = list(node_indexes)
        for i in nodes:
            self._check_node(i)
        if not nodes or len(set(nodes)) != len(nodes):
            raise ConfigError(f"a shard names each of its nodes once, at least one: {nodes}")
        state = self._state()
        state["shards"][resource] = sorted(nodes)
        self._save(state["shards"], state["cut"])
        self._program(resource, state)
        return self.members(resource)

    def members(self, resource: str) -> list[int]:
        """The nodes both routers steer the resource to, read back from their kernels."""
        self._check_resource(resource)
        # the groups' member lists only: the controller asks at every store read, and the
        # buckets (group()) are a larger read it does not need
        per_router = [set(self._group_members(
            router, self._group_record(router, self.steering[router]["groups"][resource])))
            for router in ROUTERS]
        return sorted(set.intersection(*per_router))

    def cut(self, node_index: int) -> None:
        """Take node i off the network: delete its in0, out0 and sync0 (each veth takes the
        router's or bridge's end with it). The routers' kernels drop its nexthops from the
        groups themselves (see the module's doc); the node's namespace and what runs in it
        stay, as a crashed host's would."""
        self._check_node(node_index)
        node_ns = self.ns[f"node{node_index}"]
        for ifname in NODE_FABRIC_IFNAMES:
            netns.delete_link(node_ns, ifname)
        state = self._state()
        self._save(state["shards"], set(state["cut"]) | {node_index})

    def restore(self, node_index: int, *, program: bool = True) -> None:
        """Bring node i back: its missing links (with MACs, addresses, the sync bridge
        port), its routes, its nexthops on both routers, and (program=True) its place in
        the groups of every resource whose shard holds it. program=False leaves the groups
        as they are: in mode xdp the controller puts the node back once its agent is
        ready."""
        self._check_node(node_index)
        self.attach(node_index)
        state = self._state()
        state["cut"] = [i for i in state["cut"] if i != node_index]
        self._save(state["shards"], state["cut"])
        if not program:
            return
        for resource, nodes in state["shards"].items():
            if node_index in nodes:
                self._program(resource, state)

    # --- building (lab up) ----------------------------------------------------------------

    def attach(self, node_index: int) -> None:
        """Node i's links that are missing, its addresses and routes, and its nexthop on
        each router. Groups are not touched (`start`, `restore`, `set_shard` do that)."""
        role = f"node{node_index}"
        node_ns = self.ns[role]
        have = set(netns.link_names(node_ns))
        wire(self.topo, [link for link in node_links(self.topo, node_index)
                         if link["b"].split("/")[1] not in have])
        for where in self.topo["gro_on"]:      # native XDP: the peers take XDP frames
            end, ifname = where.split("/")
            if ifname == router_ifname(node_index):
                netns.set_gro(self.ns[end], ifname, True)
        for cidr in self.topo["local_addresses"][role]:
            netns.add_address(node_ns, "lo", cidr)
        for r in self.topo["routes"][role]:
            netns.add_route(node_ns, r["dst"], r.get("gateway"))
        for router in ROUTERS:
            self._put_nexthop(router, node_index)

    def _put_nexthop(self, router: str, node_index: int) -> None:
        """Node i's nexthop on a router (again: the kernel deletes a nexthop, and takes it
        out of its groups, when its device loses carrier, e.g. the node's end went down
        and up)."""
        nh = self.steering[router]["nexthops"][node_index - 1]
        _ip(self.ns[router], "nexthop", "replace", "id", nh["id"], "via", nh["via"],
            "dev", nh["dev"])

    def start(self, shards: dict[str, list[int]] | None = None) -> None:
        """The first steering of a new lab, nothing cut: the plan's first shards (mode
        kernel), or the shards given ({} in mode xdp: no resource is steered anywhere
        until the controller sees its shard's members ready)."""
        state = {"shards": dict(self.topo["shards"] if shards is None else shards), "cut": []}
        self._save(state["shards"], state["cut"])
        for resource in state["shards"]:
            self._program(resource, state)

    def _program(self, resource: str, state: dict) -> None:
        """Make both routers steer the resource to its shard's live nodes: the group
        replaced in place (or made, or deleted when no member is left: its routes go with
        it), then its routes and rules (again, in case an empty group took them)."""
        live = [i for i in state["shards"][resource] if i not in state["cut"]]
        for router in ROUTERS:
            ns, steer = self.ns[router], self.steering[router]
            gid = steer["groups"][resource]
            rec = self._group_record(router, gid)
            if not live:
                if rec is not None:
                    _ip(ns, "nexthop", "del", "id", gid)
                continue
            for i in live:
                self._put_nexthop(router, i)
            node_of = self._node_of(router)
            current = [node_of[m["id"]] for m in (rec or {}).get("group", [])]
            res = steer["resilient"]
            _ip(ns, "nexthop", "replace", "id", gid, "group",
                "/".join(str(steer["nexthops"][i - 1]["id"]) for i in group_order(current, live)),
                "type", "resilient", "buckets", res["buckets"],
                "idle_timer", res["idle_timer"], "unbalanced_timer", res["unbalanced_timer"])
            for route in steer["routes"]:
                if route["resource"] == resource:
                    _ip(ns, "route", "replace", route["dst"], "nhid", gid,
                        *_table_arg(route["table"]))
            for rule in steer["rules"]:
                if rule["table"] == gid:
                    _ensure_rule(ns, rule)

    # --- reading back from the kernel -----------------------------------------------------

    def _group_record(self, router: str, gid: int) -> dict | None:
        return next((nh for nh in _ip_json(self.ns[router], "nexthop", "show")
                     if nh.get("id") == gid), None)

    def _node_of(self, router: str) -> dict[int, int]:
        return {nh["id"]: nh["node"] for nh in self.steering[router]["nexthops"]}

    def _group_members(self, router: str, rec: dict | None) -> list[int]:
        """The node indexes of a group record's members (a nexthop not of a node: its id)."""
        node_of = self._node_of(router)
        return [node_of.get(m["id"], m["id"]) for m in (rec or {}).get("group", [])]

    def group(self, router: str, resource: str) -> dict:
        """The resource's group on a router as the kernel has it: id, present, members
        (node indexes), buckets held per member, the resilient settings."""
        self._check_resource(resource)
        gid = self.steering[router]["groups"][resource]
        rec = self._group_record(router, gid)
        if rec is None:
            return {"id": gid, "present": False, "members": [], "buckets": {}}
        per_node = dict.fromkeys(self._group_members(router, rec), 0)
        for n in self.buckets(router, resource):
            per_node[n] = per_node.get(n, 0) + 1
        return {"id": gid, "present": True, "type": rec.get("type", "mpath"),
                "members": sorted(per_node), "buckets": dict(sorted(per_node.items())),
                "resilient": rec.get("resilient_args", {})}

    def buckets(self, router: str, resource: str) -> list[int]:
        """The node index of each bucket of the resource's group, by bucket index ([] when
        the group is absent)."""
        gid = self.steering[router]["groups"][resource]
        if self._group_record(router, gid) is None:
            return []
        rows = [r["bucket"] for r in _ip_json(self.ns[router], "nexthop", "bucket", "show",
                                              "id", gid)]
        node_of = self._node_of(router)
        return [node_of.get(b["nhid"], b["nhid"]) for b in sorted(rows, key=lambda b: b["index"])]

    def read_back(self) -> dict[str, dict]:
        """Per router, from its kernel: nexthops (node, via, dev), each resource's group,
        the routes that use a group and the policy rules of the steering tables."""
        out = {}
        for router in ROUTERS:
            ns = self.ns[router]
            node_of = self._node_of(router)
            nexthops = [{"id": nh["id"], "node": node_of.get(nh["id"]),
                         "via": nh.get("gateway"), "dev": nh.get("dev")}
                        for nh in _ip_json(ns, "nexthop", "show") if "group" not in nh]
            routes = [{"dst": r.get("dst"), "table": r.get("table", "main"),
                       "nhid": r.get("nhid")}
                      for r in _ip_json(ns, "route", "show", "table", "all") if "nhid" in r]
            tables = set(self.steering[router]["groups"].values())
            rules = [r for r in _rules(ns) if r["table"] in tables]
            out[router] = {"netns": ns,
                           "nexthops": sorted(nexthops, key=lambda n: n["id"]),
                           "groups": {res: self.group(router, res)
                                      for res in self.steering[router]["groups"]},
                           "routes": routes, "rules": rules}
        return out

    # --- checks ---------------------------------------------------------------------------

    def _check_resource(self, resource: str) -> None:
        if resource not in self.topo["resources"]:
            raise ConfigError(f"no resource {resource!r} in the lab's fabric; it steers "
                              f"{', '.join(self.topo['resources'])}")

    def _check_node(self, i: object) -> None:
        if isinstance(i, bool) or not isinstance(i, int) or not 1 <= i <= self.cfg.nodes:
            raise ConfigError(f"node index {i!r} is not one of the lab's nodes "
                              f"1..{self.cfg.nodes}")


# --- policy rules (pyroute2) ---------------------------------------------------------------

def _rules(ns: str) -> list[dict]:
    """IPv4 policy rules: priority, from, to, table."""
    out = []
    with netns.ipr(ns) as ip:
        for r in ip.get_rules(family=socket.AF_INET):
            src, dst = r.get_attr("FRA_SRC"), r.get_attr("FRA_DST")
            out.append({"priority": r.get_attr("FRA_PRIORITY") or 0,
                        "from": f"{src}/{r['src_len']}" if src else "all",
                        "to": f"{dst}/{r['dst_len']}" if dst else "all",
                        "table": r.get_attr("FRA_TABLE") or r["table"]})
    return out


def _ensure_rule(ns: str, rule: dict) -> None:
    want = {"priority": rule["priority"], "from": rule["from"], "to": rule["to"],
            "table": rule["table"]}
    if want in _rules(ns):
        return
    from pyroute2.netlink.exceptions import NetlinkError
    src, dst = ipaddress.ip_network(rule["from"]), ipaddress.ip_network(rule["to"])
    with netns.ipr(ns) as ip:
        try:
            ip.rule("add", family=socket.AF_INET, table=rule["table"],
                    priority=rule["priority"], src=str(src.network_address),
                    src_len=src.prefixlen, dst=str(dst.network_address),
                    dst_len=dst.prefixlen)
        except NetlinkError as exc:
            if exc.code != errno.EEXIST:
                raise
