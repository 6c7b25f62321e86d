"""Acting on the machine for the multi-node lab (fleet_plan.py): `build` makes its
namespaces, links, addresses and routes, attaches every node to the fabric, programs the
routers' steering and starts each node; `status` reads it all back. build.py's `up`,
`down` and `status` call these for a lab of 2 or more nodes (and `down` removes a
half-built one like any other).

Mode xdp (the fleet): each node runs the data path on in0, out0 and sync0
(hyperplane.node.lifecycle.start_nat_node run from the store, as `hpctl node up` does)
and a fleet agent (hyperplane.node.agent.spawn_agent with sync_dev="sync0"), all sharing
the lab's store, into which `up` first writes the NAT gateway (/nat, NAT IP 198.18.100.1)
and the NLB (/nlb); the agents join the fleet and shard the resources, and each runs the
gateway if its shard names the node; the lab controller (controller.py)
steers each resource to its shard's ready members; `up` returns once every node is live
and ready and the routers steer every resource to its shard. Mode kernel: the nodes only
forward, the routers keep the plan's first shards."""
from __future__ import annotations

import os
import signal
import time

from hyperplane import netns
from hyperplane.errors import ConfigError, HyperplaneError, NotFound
from hyperplane.lab import controller
from hyperplane.node.agent import pid_alive
from hyperplane.lab.fabric import Fabric, NODE_FABRIC_IFNAMES, wire
from hyperplane.lab.fleet_plan import (fleet_topology, INSIDE_ROUTER_IP, node_index,
                                       node_name, OUTSIDE_ROUTER_IP, ROUTERS,
                                       STORE_RESOURCES, SYNC_DEV)
from hyperplane.lab.plan import (LabConfig, METRICS_PORT, NFT_FAMILY, NFT_FORWARD_COUNTER,
                                 NFT_TABLE, nlb_config, store_path, store_url)

# The store keys a lab fleet owns besides /nodes/<name> (hyperplane.fleet.cluster, store):
# reset by `up` (a previous lab's nodes, shards and ids must not leak into this one) and
# removed by `down`.
FLEET_KEYS = ("/cluster", "/node-ids", "/shards", "/nat", "/nlb")
NODES_PREFIX = controller.NODES_PREFIX
SHARD_SIZE_KEY = "shard_size"
AGENT_START_S = 60.0       # each agent's first status (all start at once)
READY_S = 90.0             # every node live and ready, every resource steered


def build(cfg: LabConfig) -> None:
    """Everything of the plan, in order; the caller removes it all again if this fails."""
    topo = fleet_topology(cfg)
    ns = topo["namespaces"]
    for role, name in ns.items():
        netns.create(name)
        for key, value in topo["sysctls"][role].items():
            netns.sysctl(name, key, value)
        netns.set_up(name, "lo")
    br = topo["bridge"]
    netns.bridge(br["netns"], br["ifname"], mac=br["mac"], mtu=br["mtu"])
    wire(topo, [link for link in topo["links"] if link["node"] is None])
    for role, routes in topo["routes"].items():
        if not role.startswith("node"):           # a node's routes come with its links
            for r in routes:
                netns.add_route(ns[role], r["dst"], r.get("gateway"))
    fabric = Fabric(cfg)
    for i in range(1, cfg.nodes + 1):
        fabric.attach(i)
    # mode xdp: nothing is steered until the controller sees a shard's members ready
    fabric.start({} if topo["fleet"]["enabled"] else None)
    _start_nodes(cfg, topo)
    if topo["fleet"]["enabled"]:
        start_fleet(cfg, topo)


def _start_nodes(cfg: LabConfig, topo: dict) -> None:
    """Every node, two at a time in forked processes: compiling a node's data path is most
    of its start, the machine has two cores, and bcc cannot compile in two threads of one
    process (it crashes). A node's failure is raised here, as it was raised there."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("fork")) \
            as pool:
        for future in [pool.submit(_start_node_by_name, cfg, topo, i)
                       for i in range(1, cfg.nodes + 1)]:
            future.result()


def _start_node_by_name(cfg: LabConfig, topo: dict, i: int) -> None:
    """start_node, looked up in this module when the worker runs it (what is sent to a
    worker must pickle; start_node itself may be replaced, e.g. by a test)."""
    start_node(cfg, topo, i)


def start_node(cfg: LabConfig, topo: dict, i: int) -> None:
    """What runs on node i: the lab's nftables table (mode kernel: the forward counter,
    policy accept; mode xdp: policy drop) and in mode xdp the data path."""
    netns.nft_load(topo["namespaces"][f"node{i}"], topo["node_nft"])
    if topo["fleet"]["enabled"]:
        start_datapath(cfg, topo, i)


def start_datapath(cfg: LabConfig, topo: dict, i: int) -> None:
    """Node i's data path on in0, out0 and sync0, run from the store: its agent applies the
    /nat gateways whose shard names the node (adding their NAT IPs to out0), as
    `hpctl node up` does. Again on a node that runs: attaches anew (after a restore or a
    reload), keeps its maps, flows and the gateways its agent applied."""
    from hyperplane.errors import NotFound
    from hyperplane.nat.gateway import GatewayConfig
    from hyperplane.node import lifecycle
    extra = {}
    if cfg.sizes:
        from hyperplane.datapath.loader import Sizes
        extra["sizes"] = Sizes(**cfg.sizes)
    name = node_name(cfg, i)
    try:
        running = [GatewayConfig.from_dict(g) for g in lifecycle.node_state(name)["gateways"]]
    except NotFound:
        running = []
    lifecycle.start_nat_node(name, list(topo["fleet"]["datapath_ifnames"]), running,
                             netns=topo["namespaces"][f"node{i}"], mode=cfg.attach,
                             pin_root=topo["fleet"]["pin_root"], timeouts=cfg.timeouts,
                             outside_if="out0", nat_from_store=True, **extra)


def fleet_records(cfg: LabConfig, topo: dict) -> dict[str, dict]:
    """What `up` writes to the store before any agent starts: /nat (the gateway, asking
    for a shard of SHARD_SIZE nodes) and, with the NLB, /nlb."""
    from hyperplane.lab.fleet_plan import SHARD_SIZE
    out = {"/nat": {"gateways": [{**g, SHARD_SIZE_KEY: SHARD_SIZE} for g in topo["gateways"]]}}
    if topo["fleet"]["nlb"]:
        out["/nlb"] = nlb_config(cfg).to_dict()
    return out


def _open_store(url: str):
    from hyperplane.fleet.store import open_store
    if "://" not in url and not url.startswith("file:"):
        os.makedirs(os.path.dirname(os.path.abspath(url)), exist_ok=True)
    return open_store(url)


def reset_store(cfg: LabConfig, store) -> list[str]:
    """Delete the fleet's keys and the lab's node records; refuse (ConfigError) when live
    nodes of another fleet are in it. Returns the keys deleted."""
    names = [k[len(NODES_PREFIX):] for k in store.list(NODES_PREFIX)]
    foreign = sorted(n for n in names if node_index(cfg, n) is None)
    if foreign:
        raise ConfigError(f"the store {store.url} holds live nodes that are not lab "
                          f"{cfg.prefix!r}'s ({', '.join(foreign)}): give the lab a store "
                          f"of its own (--store)")
    gone = []
    for key in [*FLEET_KEYS, *(NODES_PREFIX + n for n in names)]:
        if store.delete(key):
            gone.append(key)
    return gone


def start_fleet(cfg: LabConfig, topo: dict) -> None:
    """The store's records, every node's agent, the controller; then wait until the
    fleet is ready (wait_ready)."""
    from hyperplane.node.agent import spawn_agent
    url = topo["fleet"]["store"]
    with _open_store(url) as store:
        reset_store(cfg, store)
        for key, value in fleet_records(cfg, topo).items():
            store.put(key, value)
    # the agents start side by side (each loads the node's maps, ~10 s on a busy machine);
    # the first failure is raised once all have returned
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(max_workers=cfg.nodes) as pool:
        started = [pool.submit(spawn_agent, node_name(cfg, i), url, timeout_s=AGENT_START_S,
                               sync_dev=SYNC_DEV, metrics_addr=f"0.0.0.0:{METRICS_PORT}")
                   for i in range(1, cfg.nodes + 1)]
    for future in started:
        future.result()
    controller.spawn(cfg, url)
    wait_ready(cfg)


def _agent_pid(name: str) -> int | None:
    from hyperplane.node.lifecycle import state_path
    try:
        with open(state_path(name, ".agent.pid")) as f:
            return int(f.read().strip())
    except (FileNotFoundError, ValueError):
        return None


def _log_tail(path: str, lines: int = 8) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-lines:]).rstrip()
    except OSError:
        return "(no log)"


def readiness(cfg: LabConfig, listing, fabric: Fabric) -> dict:
    """What is still missing for the fleet to be ready: nodes not live, nodes not ready,
    resources of the store's shards the routers do not steer to exactly their shard."""
    view = controller.view(listing, cfg)
    want = controller.desired_routes(listing, cfg)
    names = {node_name(cfg, i): i for i in range(1, cfg.nodes + 1)}
    missing = {
        "not_live": sorted(n for n in names if n not in view["members"]),
        "not_ready": sorted(n for n, m in view["members"].items() if n in names
                            and not m["ready"]),
        "unsharded": sorted(r for r in expected_resources(cfg) if r not in view["shards"]),
        "not_steered": {},
    }
    for resource, shard in view["shards"].items():
        have = fabric.members(resource)
        if want.get(resource) != shard["indexes"] or have != shard["indexes"]:
            missing["not_steered"][resource] = {"shard": shard["indexes"], "routers": have}
    return missing


def expected_resources(cfg: LabConfig) -> list[str]:
    """The fabric resources the fleet serves: the NAT gateway, and the NLB unless --no-nlb."""
    from hyperplane.lab.fleet_plan import NAT_GATEWAY
    from hyperplane.lab.plan import LB_NAME
    return [NAT_GATEWAY] + ([LB_NAME] if cfg.nlb else [])


def wait_ready(cfg: LabConfig, timeout_s: float = READY_S) -> float:
    """Poll (bounded) until every node is live and ready in the store, every resource has
    a shard and the routers steer it to exactly that shard; returns the seconds it took.
    Fails at once when an agent or the controller died, with its log's end."""
    from hyperplane.fleet.store import StoreError
    from hyperplane.node.lifecycle import state_path
    t0 = time.monotonic()
    fabric = Fabric(cfg)
    missing: dict = {}
    with _open_store(store_url(cfg)) as store:
        while True:
            for i in range(1, cfg.nodes + 1):
                name = node_name(cfg, i)
                if not pid_alive(_agent_pid(name)):
                    raise HyperplaneError(
                        f"the agent of node {name} is not running; its log "
                        f"({state_path(name, '.agent.log')}) ends:\n"
                        f"{_log_tail(state_path(name, '.agent.log'))}")
            if controller.pid(cfg.prefix) is None:
                raise HyperplaneError(
                    f"the lab controller is not running; its log "
                    f"({controller.log_path(cfg.prefix)}) ends:\n"
                    f"{_log_tail(controller.log_path(cfg.prefix))}")
            try:
                missing = readiness(cfg, store.list(""), fabric)
            except StoreError as exc:
                missing = {"store": str(exc)}
            if not any(missing.values()):
                return time.monotonic() - t0
            if time.monotonic() - t0 > timeout_s:
                raise HyperplaneError(
                    f"the fleet of lab {cfg.prefix!r} was not ready within {timeout_s:.0f} s: "
                    f"{missing}; see the agents' logs "
                    f"({state_path(node_name(cfg, 1), '.agent.log')} and the others) and "
                    f"{controller.log_path(cfg.prefix)}")
            time.sleep(0.2)


def stop_node(cfg: LabConfig, topo: dict, i: int) -> list[str]:
    """Undo start_node before the namespaces go; returns warnings. Mode xdp: stop the
    node's agent, detach the data path, remove its pins and state
    (hyperplane.node.lifecycle.stop_node). Mode kernel: nothing (the table goes with the
    namespace)."""
    name = node_name(cfg, i)
    try:
        from hyperplane.node import lifecycle
        if not lifecycle.node_exists(name, topo["fleet"]["pin_root"]):
            return []
        here = netns.exists(topo["namespaces"][f"node{i}"])
        return lifecycle.stop_node(name, None if here else [],
                                   netns=topo["namespaces"][f"node{i}"] if here else None,
                                   pin_root=topo["fleet"]["pin_root"])
    except (NotFound, FileNotFoundError):
        return []
    except Exception as exc:  # the node is another module: never block teardown on it
        return [f"stopping node {name}: {type(exc).__name__}: {exc}"]


def stop_nodes(cfg: LabConfig) -> list[str]:
    """Before the namespaces go: the controller, every node (agent, data path), then the
    lab's records in the store (its own store file, or its keys in --store)."""
    topo = fleet_topology(cfg)
    warnings = []
    try:
        controller.stop(cfg.prefix)
    except OSError as exc:
        warnings.append(f"stopping the lab controller: {exc}")
    warnings += [w for i in range(1, cfg.nodes + 1) for w in stop_node(cfg, topo, i)]
    if cfg.mode == "xdp":
        warnings += clean_store(cfg)
    try:
        os.unlink(controller.log_path(cfg.prefix))
    except FileNotFoundError:
        pass
    return warnings


def clean_store(cfg: LabConfig) -> list[str]:
    """The lab's own store file goes; in a store given with --store only the fleet's keys
    and the lab's node records go."""
    if cfg.store is None:
        path = store_path(cfg.prefix)
        for p in (path, path + ".lock"):
            try:
                os.unlink(p)
            except FileNotFoundError:
                pass
        return []
    try:
        from hyperplane.fleet.store import open_store
        with open_store(cfg.store) as store:
            names = [k[len(NODES_PREFIX):] for k in store.list(NODES_PREFIX)]
            for key in [*FLEET_KEYS, *(NODES_PREFIX + n for n in names
                                       if node_index(cfg, n) is not None)]:
                store.delete(key)
    except Exception as exc:  # noqa: BLE001  (an unreachable store must not block down)
        return [f"could not remove the lab's records from the store {cfg.store}: {exc}"]
    return []


def forward_packets(cfg: LabConfig, i: int) -> int:
    """Packets node i's kernel forwarded (the lab table's forward counter)."""
    return netns.nft_counter(fleet_topology(cfg)["namespaces"][f"node{i}"], NFT_FAMILY,
                             NFT_TABLE, NFT_FORWARD_COUNTER)["packets"]


def wait_targets_healthy(cfg: LabConfig, timeout_s: float = 30.0) -> None:
    """Wait until every node of the NLB's shard (as the store names it) finds every web
    target healthy: its health checks run once the targets' servers are up. Raises with
    what each node says when timeout_s passes first."""
    import json
    from hyperplane.fleet.store import open_store
    from hyperplane.lab.plan import LB_NAME, TARGET_HTTP_PORT, TARGET_IPS, WEB_GROUP, store_url
    from hyperplane.node.agent import status_path
    with open_store(store_url(cfg)) as store:
        shard = controller.view(store.list(""), cfg)["shards"][LB_NAME]["indexes"]
    healthy = {f"{ip}:{TARGET_HTTP_PORT}": "healthy" for ip in TARGET_IPS}

    def states(i: int) -> dict[str, str]:
        try:
            with open(status_path(node_name(cfg, i))) as f:
                tgs = json.load(f).get("target_groups", {}).get(WEB_GROUP, {})
        except (FileNotFoundError, ValueError):
            tgs = {}
        return {ident: info.get("state") for ident, info in tgs.items()}

    deadline = time.monotonic() + timeout_s
    while not all(states(i) == healthy for i in shard):
        if time.monotonic() > deadline:
            raise HyperplaneError(f"the web targets are not healthy on every node of the "
                                  f"NLB's shard after {timeout_s:.0f} s: "
                                  f"{ {i: states(i) for i in shard} }")
        time.sleep(0.2)


# --- failures (for tests) ---------------------------------------------------------------------

def busiest_node(cfg: LabConfig, verdict: str, sample_s: float = 0.5) -> int:
    """The node whose `verdict` count (e.g. TX_NAT_IN) grows most over sample_s: the one a
    bulk transfer goes through, to kill. Raises when no node's count grows."""
    from hyperplane.node.lifecycle import read_counters
    names = {i: node_name(cfg, i) for i in range(1, cfg.nodes + 1)}
    before = {i: read_counters(name).get(verdict, 0) for i, name in names.items()}
    time.sleep(sample_s)
    grown = {i: read_counters(name).get(verdict, 0) - before[i] for i, name in names.items()}
    node = max(grown, key=grown.get)
    if grown[node] <= 0:
        raise HyperplaneError(f"no node forwards {verdict}: {grown}")
    return node


def kill_node(cfg: LabConfig, i: int) -> dict:
    """Node i crashes: its links are cut (Fabric.cut: the routers drop it from every group
    at once) and its agent is killed with SIGKILL (its member record goes when its lease
    runs out). The namespace and the data path's maps stay, as a crashed host's disk."""
    fabric = Fabric(cfg)
    fabric._check_node(i)
    name = node_name(cfg, i)
    fabric.cut(i)
    pid = _agent_pid(name)
    killed = False
    if pid_alive(pid):
        try:
            os.kill(pid, signal.SIGKILL)
            killed = True
        except ProcessLookupError:
            pass
    return {"node": i, "name": name, "cut": True, "agent_pid": pid, "agent_killed": killed}


def restore_node(cfg: LabConfig, i: int, timeout_s: float = READY_S) -> dict:
    """Node i comes back: its links (Fabric.restore without touching the groups), in
    mode xdp its data path attached again and a new agent; once that agent is ready the
    node is steered to again (the controller does it too). Mode kernel: Fabric.restore."""
    fabric = Fabric(cfg)
    fabric._check_node(i)
    topo = fleet_topology(cfg)
    if not topo["fleet"]["enabled"]:
        fabric.restore(i)
        return {"node": i, "name": node_name(cfg, i)}
    from hyperplane.node.agent import spawn_agent, stop_agent
    name = node_name(cfg, i)
    fabric.restore(i, program=False)
    start_datapath(cfg, topo, i)
    stop_agent(name)                  # a cut node's agent may still run
    pid = spawn_agent(name, topo["fleet"]["store"], timeout_s=AGENT_START_S, sync_dev=SYNC_DEV,
                      metrics_addr=f"0.0.0.0:{METRICS_PORT}")
    t0 = time.monotonic()
    with _open_store(topo["fleet"]["store"]) as store:
        while True:
            listing = store.list("")
            member = controller.view(listing, cfg)["members"].get(name)
            if member and member["ready"]:
                break
            if time.monotonic() - t0 > timeout_s or not pid_alive(pid):
                raise HyperplaneError(f"node {name} did not become ready again within "
                                      f"{timeout_s:.0f} s (agent pid {pid})")
            time.sleep(0.2)
        for resource, nodes in controller.desired_routes(listing, cfg).items():
            if fabric.members(resource) != nodes:
                fabric.set_shard(resource, nodes)
    return {"node": i, "name": name, "agent_pid": pid, "ready_s": time.monotonic() - t0}


# --- status -------------------------------------------------------------------------------

def status(cfg: LabConfig, have: list[str], state_known: bool) -> dict:
    """What exists now, JSON-able: nodes, routers (read back from their kernels), shards
    (as the fabric was asked: "shards"; as the routers steer: "steered"), the sync
    network, addresses, interfaces; in mode xdp also the fleet: the store's members and
    shards, each node's hyperplane name, agent, live/ready and where its data path is
    attached, and the controller."""
    topo = fleet_topology(cfg)
    ns = topo["namespaces"]
    xdp = state_known and topo["fleet"]["enabled"]
    out = {
        "prefix": cfg.prefix,
        "up": sorted(have) == sorted(ns.values()),
        "mode": cfg.mode if state_known else None,
        "attach": cfg.attach if xdp else None,
        "node_count": cfg.nodes,
        "namespaces": ns,
        "namespaces_present": have,
        "addresses": {
            "clients": topo["client_addresses"], "client_net": topo["client_net"],
            "internet": topo["internet_addresses"], "target_net": topo["target_net"],
            "nat_ip": topo["nat_ip"], "vip": topo["vip"],
            "resources": topo["resources"],
            "targets": topo["targets"],
            "inside_router": {"clients": INSIDE_ROUTER_IP,
                              "targets": [t["gateway"] for t in topo["targets"]],
                              "nodes": {n["index"]: n["inside_router"]
                                        for n in topo["fleet_nodes"]}},
            "outside_router": {"internet": OUTSIDE_ROUTER_IP,
                               "nodes": {n["index"]: n["outside_router"]
                                         for n in topo["fleet_nodes"]}},
        },
        "nodes": [],
        "routers": {},
        "shards": {},
        "steered": {},
        "cut": [],
        "sync": dict(topo["sync"], ports=[]),
        "interfaces": [],
        "fleet": None,
    }
    if not have:
        return out
    store_view = None
    if xdp:
        out["fleet"] = {"store": topo["fleet"]["store"], "members": {}, "shards": {},
                        "error": None,
                        "controller": {"pid": controller.pid(cfg.prefix),
                                       "log": controller.log_path(cfg.prefix),
                                       "status": controller.read_status(cfg.prefix)}}
        try:
            from hyperplane.fleet.store import open_store
            with open_store(topo["fleet"]["store"]) as store:
                store_view = controller.view(store.list(""), cfg)
            out["fleet"].update(store_view)
        except Exception as exc:  # noqa: BLE001  (status says what it could not read)
            out["fleet"]["error"] = f"{type(exc).__name__}: {exc}"
    live = {}
    for name in have:
        try:
            live[name] = {l["ifname"]: l for l in netns.links(name)}
        except (HyperplaneError, OSError):
            live[name] = {}
    fabric = Fabric(cfg)
    out["shards"] = fabric.shards()
    out["cut"] = fabric.cut_nodes()
    for n in topo["fleet_nodes"]:
        links = live.get(n["netns"])
        if links is None:
            state = "missing"
        elif n["index"] in out["cut"]:
            state = "cut"
        elif all(links.get(i, {}).get("state") == "UP" for i in NODE_FABRIC_IFNAMES):
            state = "up"
        else:
            state = "broken"          # a link is gone or down, but the fabric did not cut it
        forwarded = None
        if links is not None:
            try:
                forwarded = forward_packets(cfg, n["index"])
            except (HyperplaneError, OSError, ValueError):
                forwarded = None
        node = {
            "index": n["index"], "name": n["role"], "netns": n["netns"], "state": state,
            "addresses": {ifname: l["addresses"] for ifname, l in (links or {}).items()},
            "plan": {"in0": n["in0"], "out0": n["out0"], "sync0": n["sync0"]},
            "gateways": {"inside": n["inside_router"], "outside": n["outside_router"]},
            "shards": sorted(r for r, m in out["shards"].items() if n["index"] in m),
            "forward_packets": forwarded,
        }
        if xdp:
            member = (store_view or {}).get("members", {}).get(n["name"])
            pid = _agent_pid(n["name"])
            node.update({
                "hyperplane_node": n["name"],
                "live": member is not None,
                "ready": bool(member and member["ready"]),
                "member_id": member["id"] if member else None,
                "agent_pid": pid,
                "agent_running": pid_alive(pid),
                "attached": {i: _hook(links.get(i)) for i in topo["fleet"]["datapath_ifnames"]}
                if links is not None else {},
            })
        out["nodes"].append(node)
    if all(ns[r] in have for r in ROUTERS):
        try:
            out["routers"] = fabric.read_back()
        except (HyperplaneError, OSError) as exc:
            out["routers"] = {"error": str(exc)}
        else:
            for resource in topo["resources"]:
                per_router = [set(out["routers"][r]["groups"][resource]["members"])
                              for r in ROUTERS]
                out["steered"][resource] = sorted(set.intersection(*per_router))
    sync_links = live.get(ns["sync"], {})
    out["sync"]["ports"] = sorted(i for i in sync_links if i.startswith("to-node"))
    for ifc in topo["interfaces"]:
        got = live.get(ifc["netns"], {}).get(ifc["ifname"])
        out["interfaces"].append({
            "role": ifc["role"], "netns": ifc["netns"], "ifname": ifc["ifname"],
            "peer": ifc["peer"], "present": got is not None,
            "mac": got["mac"] if got else ifc["mac"],
            "addresses": got["addresses"] if got else [],
            "mtu": got["mtu"] if got else ifc["mtu"],
            "state": got["state"] if got else None,
        })
    return out


def _hook(link: dict | None) -> str | None:
    """Where the data path is attached on a link: "xdp (<mode>)", "tc" or None."""
    if not link:
        return None
    from hyperplane.datapath.loader import PROGRAMS
    if link.get("xdp"):
        return f"xdp ({link['xdp']['mode']})"
    if PROGRAMS["tc"][0].decode() in link.get("tc", []):
        return "tc"
    return None
