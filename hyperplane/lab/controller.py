"""The multi-node lab's controller (mode xdp): steers each resource to the members of its
shard that are live and ready, as the fleet's store says, by programming the fabric
routers (hyperplane.lab.fabric.Fabric.set_shard). In a real network this is BGP: a node
announces a resource's address once it can serve it, and the announcement goes with its
lease.

    python -m hyperplane.lab controller --prefix P --store URL     (lab up spawns it)

`desired_routes(listing, cfg)` is the whole decision, a pure function of one read of the
store: for each resource the fabric steers (fleet_plan.STORE_RESOURCES), the lab indexes
of its shard's nodes (/shards) that have a member record (/nodes/<name>, leased: a dead
node's goes when its lease runs out) saying ready. A resource whose shard has no such
member is left out: the fabric keeps its last routes (a resource nobody can serve stays
where it was rather than nowhere).

The loop reads the store, programs what differs, then watches it from the read's
revision + 1; every batch of changes is followed by a fresh read (so nothing is missed),
and a compacted watch starts over with a read. What differs is judged against the routers'
kernels, read back at every read, not against what this controller set last: a router
drops a nexthop by itself when its device loses carrier, and a node put back that way
would otherwise stay out of its groups until its shard changed again. It logs each
change of steering and writes its view to status_path(prefix) after every read. It stops
on SIGTERM / SIGINT.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Mapping

from hyperplane.lab.fleet_plan import STORE_RESOURCES, node_index
from hyperplane.node.agent import pid_alive
from hyperplane.lab.plan import LabConfig, STATE_DIR

NODES_PREFIX = "/nodes/"          # hyperplane.fleet.cluster.NODES_PREFIX
SHARDS_KEY = "/shards"            # hyperplane.fleet.cluster.SHARDS_KEY
IDLE_READ_S = 5.0                 # a fresh read this often even when the watch is quiet
RETRY_S = 1.0                     # after a store or fabric error

log = logging.getLogger("hyperplane.lab.controller")


def pid_path(prefix: str) -> str:
    return os.path.join(STATE_DIR, f"{prefix}-controller.pid")


def log_path(prefix: str) -> str:
    return os.path.join(STATE_DIR, f"{prefix}-controller.log")


def status_path(prefix: str) -> str:
    return os.path.join(STATE_DIR, f"{prefix}-controller.json")


# --- the decision (pure) ---------------------------------------------------------------------

def _value(entry: Any) -> Any:
    return getattr(entry, "value", entry)


def live_members(listing: Mapping[str, Any]) -> dict[str, dict]:
    """Node name -> its member record, for every /nodes/<name> of the listing that is a
    well-formed record (an object naming itself; anything else is not live)."""
    out = {}
    for key, entry in listing.items():
        value = _value(entry)
        if not key.startswith(NODES_PREFIX) or not isinstance(value, Mapping):
            continue
        name = value.get("name", key[len(NODES_PREFIX):])
        if isinstance(name, str) and name == key[len(NODES_PREFIX):]:
            out[name] = dict(value)
    return out


def store_shards(listing: Mapping[str, Any]) -> dict[str, list[str]]:
    """Store resource -> the node names of its shard (/shards); {} when there is none or
    it is damaged."""
    value = _value(listing.get(SHARDS_KEY)) if SHARDS_KEY in listing else None
    shards = value.get("shards") if isinstance(value, Mapping) else None
    if not isinstance(shards, Mapping):
        return {}
    return {r: [n for n in m if isinstance(n, str)] for r, m in shards.items()
            if isinstance(r, str) and isinstance(m, list)}


def desired_routes(listing: Mapping[str, Any], cfg: LabConfig) -> dict[str, list[int]]:
    """Fabric resource -> the sorted lab indexes of its shard's live, ready members; a
    resource without any is left out (see the module's doc). `listing` maps store keys to
    Entries (Store.list) or to plain values."""
    members = live_members(listing)
    shards = store_shards(listing)
    out = {}
    for store_resource, fabric_resource in STORE_RESOURCES.items():
        nodes = set()
        for name in shards.get(store_resource, []):
            i = node_index(cfg, name)
            if i is not None and members.get(name, {}).get("ready") is True:
                nodes.add(i)
        if nodes:
            out[fabric_resource] = sorted(nodes)
    return out


def view(listing: Mapping[str, Any], cfg: LabConfig) -> dict:
    """What the store says, in lab terms (for status and the controller's status file):
    members (name -> index, id, ready), shards (fabric resource -> [names] and [indexes])."""
    members = live_members(listing)
    shards = store_shards(listing)
    return {
        "members": {name: {"index": node_index(cfg, name), "id": m.get("id"),
                           "ready": m.get("ready") is True, "epoch": m.get("epoch")}
                    for name, m in sorted(members.items())},
        "shards": {fabric: {"nodes": shards.get(store, []),
                            "indexes": sorted(i for i in (node_index(cfg, n)
                                                          for n in shards.get(store, []))
                                              if i is not None)}
                   for store, fabric in STORE_RESOURCES.items() if store in shards},
    }


# --- the loop ---------------------------------------------------------------------------------

class Controller:
    def __init__(self, cfg: LabConfig, store_url: str):
        from hyperplane.lab.fabric import Fabric
        self.cfg = cfg
        self.store_url = store_url
        self.fabric = Fabric(cfg)
        self.stop = threading.Event()
        self.applied: dict[str, list[int]] = {}   # what this controller set, per resource
        self.error: str | None = None
        self.revision = 0

    def reconcile(self, listing) -> None:
        want = desired_routes(listing, self.cfg)
        cut = set(self.fabric.cut_nodes())      # off the network: in no group until restored
        for resource, nodes in sorted(want.items()):
            steered = self.fabric.members(resource)
            if self.applied.get(resource) != nodes or \
                    steered != [i for i in nodes if i not in cut]:
                got = self.fabric.set_shard(resource, nodes)
                log.info("steering %s to nodes %s (was %s, the routers had %s); the routers "
                         "have %s", resource, nodes, self.applied.get(resource), steered, got)
                self.applied[resource] = nodes
        self.revision = getattr(listing, "revision", 0)
        self.error = None
        self._write_status(listing)

    def _write_status(self, listing) -> None:
        data = {"pid": os.getpid(), "time": time.time(), "store": self.store_url,
                "revision": self.revision, "applied": self.applied, "error": self.error,
                **view(listing, self.cfg)}
        os.makedirs(STATE_DIR, exist_ok=True)
        path = status_path(self.cfg.prefix)
        tmp = f"{path}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)

    def run(self) -> None:
        from hyperplane.errors import HyperplaneError
        from hyperplane.fleet.store import WatchCompacted, open_store
        log.info("lab controller for %r started (store %s)", self.cfg.prefix, self.store_url)
        store = None
        while not self.stop.is_set():
            try:
                if store is None:
                    store = open_store(self.store_url)
                listing = store.list("")
                self.reconcile(listing)
                with store.watch("", start_revision=listing.revision + 1) as watch:
                    last_read = time.monotonic()
                    while not self.stop.is_set():
                        event = watch.next(timeout=0.5)
                        if event is None and time.monotonic() - last_read < IDLE_READ_S:
                            continue
                        # a batch of changes: take what is already queued, then read anew
                        while event is not None and not self.stop.is_set():
                            event = watch.next(timeout=0.02)
                        self.reconcile(store.list(""))
                        last_read = time.monotonic()
            except WatchCompacted as exc:
                log.info("watch compacted (%s): reading the store again", exc)
            except (HyperplaneError, OSError, ValueError) as exc:
                self.error = f"{type(exc).__name__}: {exc}"
                log.warning("%s; trying again in %.0f s", self.error, RETRY_S)
                if store is not None:
                    try:
                        store.close()
                    except Exception:  # noqa: BLE001
                        pass
                    store = None
                self.stop.wait(RETRY_S)
        if store is not None:
            store.close()
        log.info("lab controller for %r stopped", self.cfg.prefix)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m hyperplane.lab controller",
                                 description="The multi-node lab's controller: steers each "
                                             "resource to its shard's ready members.")
    ap.add_argument("--prefix", required=True)
    ap.add_argument("--store", required=True, help="the lab's store URL")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    from hyperplane.errors import HyperplaneError
    from hyperplane.lab.build import _read_state
    cfg = _read_state(args.prefix)
    if cfg is None or cfg.nodes < 2:
        print(f"lab controller: lab {args.prefix!r} is not a multi-node lab that is up",
              file=sys.stderr)
        return 4
    try:
        ctl = Controller(cfg, args.store)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: ctl.stop.set())
        ctl.run()
    except HyperplaneError as exc:
        print(f"lab controller: {exc}", file=sys.stderr)
        return exc.exit_status
    return 0


# --- running it in the background (lab up / down) ---------------------------------------------

def spawn(cfg: LabConfig, store_url: str) -> int:
    """Start the controller process (its output goes to log_path); returns its pid, which
    is also recorded in pid_path."""
    os.makedirs(STATE_DIR, exist_ok=True)
    env = dict(os.environ)
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = here + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    with open(log_path(cfg.prefix), "a") as out:
        proc = subprocess.Popen([sys.executable, "-m", "hyperplane.lab", "controller",
                                 "--prefix", cfg.prefix, "--store", store_url],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True)
    with open(pid_path(cfg.prefix), "w") as f:
        f.write(str(proc.pid))
    return proc.pid


def pid(prefix: str) -> int | None:
    """The running controller's pid, or None."""
    try:
        with open(pid_path(prefix)) as f:
            p = int(f.read().strip())
    except (FileNotFoundError, ValueError):
        return None
    return p if pid_alive(p) else None


def read_status(prefix: str) -> dict | None:
    try:
        with open(status_path(prefix)) as f:
            return json.load(f)
    except (FileNotFoundError, ValueError):
        return None


def stop(prefix: str, timeout_s: float = 10.0) -> bool:
    """Stop the controller (SIGTERM, then SIGKILL after timeout_s) and remove its pid and
    status files; False when none was running. The log stays until remove_files."""
    p = pid(prefix)
    stopped = False
    if p is not None:
        try:
            os.kill(p, signal.SIGTERM)
            stopped = True
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout_s
    while stopped and pid_alive(p) and time.monotonic() < deadline:
        time.sleep(0.05)
    if stopped and pid_alive(p):
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for path in (pid_path(prefix), status_path(prefix)):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
    return stopped
