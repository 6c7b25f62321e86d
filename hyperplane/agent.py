"""The node agent: applies the load balancers in the store to the node's maps, runs the
health checks, ends drains, collects garbage, and reports its view in a status file.

uvicorn-style: AgentConfig is separate from the Agent; startup, a tick loop, shutdown;
SIGTERM / SIGINT stop it cleanly. `spawn_agent` runs one in the background."""
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
from dataclasses import dataclass

from .errors import ConfigError, HyperplaneError
from .flows import collect_garbage
from .health import HealthChecker, TargetHealth
from .nlb import NlbDataplane
from .nlb_config import NlbConfig
from .node import NODE_STATE_DIR, node_state, open_node, read_state_file
from .store import DEFAULT_STORE, Store

log = logging.getLogger("hyperplane.agent")


def status_path(node: str) -> str:
    return os.path.join(NODE_STATE_DIR, f"{node}.agent.json")


def _pid_path(node: str) -> str:
    return os.path.join(NODE_STATE_DIR, f"{node}.agent.pid")


@dataclass
class AgentConfig:
    node: str
    store_path: str = DEFAULT_STORE
    tick_s: float = 0.2          # how often the store and the health checks are looked at
    gc_every_s: float = 10.0     # garbage collection of expired flows and reservations
    count_every_s: float = 5.0   # flows per target (drains, status): a scan of the table


class Agent:
    def __init__(self, config: AgentConfig):
        self.config = config
        self.store = Store(config.store_path)
        self.stop = threading.Event()
        self.checkers: dict[str, HealthChecker] = {}
        self.next_check: dict[str, float] = {}
        self.store_mtime = -1
        self.desired: dict = {}
        self.config_error: str | None = None
        self.last_gc = 0.0
        self.last_count = -1e9
        self.count_wall = 0.0        # wall-clock time of the last count (drains use it)
        self.flow_counts: dict[int, int] = {}
        self.resets = 0

    # --- lifecycle ---------------------------------------------------------------------
    def startup(self) -> None:
        state = node_state(self.config.node)
        self.netns = state["netns"]
        self.dp = open_node(self.config.node)
        self.plane = NlbDataplane(self.dp)
        log.info("agent for node %s started (store %s)", self.config.node, self.config.store_path)

    def run(self) -> None:
        self.startup()
        try:
            while not self.stop.is_set():
                self.tick(time.monotonic())
                self.stop.wait(self.config.tick_s)
        finally:
            self.shutdown()

    def shutdown(self) -> None:
        for checker in self.checkers.values():
            checker.close()
        self.checkers.clear()
        log.info("agent for node %s stopped", self.config.node)

    # --- one tick ------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        mtime = self.store.mtime_ns()
        if mtime != self.store_mtime:
            self.store_mtime = mtime
            self.desired = self.store.read()
        try:
            cfg = NlbConfig.from_dict(self.desired)
            self.config_error = None
        except ConfigError as exc:  # a bad store is reported, the last good state stays
            if self.config_error != str(exc):
                log.error("store rejected: %s", exc)
            self.config_error = str(exc)
            self._write_status(None, {})
            return
        health = self._check_health(cfg, now)
        for tg in cfg.target_groups:
            tg.record_health({t.endpoint: health[tg.name][t.endpoint] for t in tg.targets
                              if t.endpoint in health.get(tg.name, {})})
        self.plane.apply(cfg)
        draining = [t.draining_since for tg in cfg.target_groups for t in tg.targets
                    if t.state == "draining"]
        # Counting scans the flow table: every count_every_s for the status, but every
        # second while a drain is on, and never older than the newest drain's start, so a
        # drain cannot end on a count taken before its flows existed.
        every = min(1.0, self.config.count_every_s) if draining else self.config.count_every_s
        if now - self.last_count >= every or (draining and self.count_wall < max(draining)):
            self.flow_counts = self.plane.flows_per_target()
            self.last_count, self.count_wall = now, time.time()
        self._end_drains(cfg)
        if now - self.last_gc >= self.config.gc_every_s:
            collect_garbage(self.dp)
            self.last_gc = now
        self._write_status(cfg, health)

    def _check_health(self, cfg: NlbConfig, now: float) -> dict:
        out = {}
        for name in set(self.checkers) - {tg.name for tg in cfg.target_groups}:
            self.checkers.pop(name).close()
        for tg in cfg.target_groups:
            checker = self.checkers.get(tg.name)
            if checker is None or checker.config != tg.health_check:
                if checker:
                    checker.close()
                checker = self.checkers[tg.name] = HealthChecker(tg.health_check,
                                                                 netns=self.netns)
                self.next_check[tg.name] = now
            checker.set_targets(t.endpoint for t in tg.targets if t.state != "draining")
            if now >= self.next_check[tg.name]:
                for change in checker.tick():
                    if str(change.new) == "unhealthy" and tg.reset_on_unhealthy:
                        tid = self.plane.state.target_ids.get(str(change.target))
                        if tid is not None:
                            self.resets += self.plane.delete_flows_of(tid)
                self.next_check[tg.name] = now + tg.health_check.interval_s
            out[tg.name] = {t.endpoint: TargetHealth(state=checker.state_of(t.endpoint))
                            for t in tg.targets if t.state != "draining"}
        return out

    def _end_drains(self, cfg: NlbConfig) -> None:
        flows = self.flow_counts
        ids = self.plane.state.target_ids
        ended = {}
        for tg in cfg.target_groups:
            counts = {t.endpoint: flows.get(ids.get(t.identity), 0) for t in tg.targets}
            done = [t.identity for t in tg.expired_drains(time.time(), counts)]
            if done:
                ended[tg.name] = done
        if not ended:
            return

        def remove(data: dict) -> dict:
            for tg in data.get("target_groups", []):
                gone = set(ended.get(tg["name"], ()))
                tg["targets"] = [t for t in tg.get("targets", [])
                                 if f"{t['ip']}:{t['port']}" not in gone]
            return data

        self.desired = self.store.update(remove)
        self.store_mtime = self.store.mtime_ns()
        log.info("drains ended: %s", ended)

    def _write_status(self, cfg: NlbConfig | None, health: dict) -> None:
        status = {"node": self.config.node, "pid": os.getpid(), "time": time.time(),
                  "config_error": self.config_error, "flows_reset_unhealthy": self.resets,
                  "target_groups": {}}
        if cfg is not None:
            flows = self.flow_counts
            packets = self.plane.packets_per_target()
            for tg in cfg.target_groups:
                status["target_groups"][tg.name] = {
                    t.identity: {"state": t.state,
                                 "slot": self.plane.state.target_ids.get(t.identity),
                                 "active_flows": flows.get(self.plane.state.target_ids.get(
                                     t.identity), 0),
                                 "packets": packets.get(self.plane.state.target_ids.get(
                                     t.identity), 0)}
                    for t in tg.targets}
        tmp = status_path(self.config.node) + ".tmp"
        with open(tmp, "w") as f:
            json.dump(status, f, indent=2)
        os.replace(tmp, status_path(self.config.node))


# --- running in the background -------------------------------------------------------------

def read_status(node: str) -> dict:
    return read_state_file(status_path(node), f"no agent status for node {node!r}: is the "
                           f"agent running? (hpctl agent run --node {node})")


def status_or_none(node: str) -> dict | None:
    """The agent's status, or None when no agent runs for the node (no health counts)."""
    try:
        return read_status(node)
    except HyperplaneError:
        return None


def spawn_agent(node: str, store_path: str = DEFAULT_STORE, timeout_s: float = 30.0) -> int:
    """Start an agent process for the node; return once it has written its first status."""
    node_state(node)  # fail early and clearly if the node is not running
    try:
        os.unlink(status_path(node))
    except FileNotFoundError:
        pass
    log_file = open(os.path.join(NODE_STATE_DIR, f"{node}.agent.log"), "a")
    proc = subprocess.Popen([sys.executable, "-m", "hyperplane.agent", "--node", node,
                             "--store", store_path], stdout=log_file, stderr=log_file,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    with open(_pid_path(node), "w") as f:
        f.write(str(proc.pid))
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(status_path(node)):
        if proc.poll() is not None:
            raise HyperplaneError(f"the agent for node {node} exited at start-up (status "
                                  f"{proc.returncode}); see {log_file.name}")
        if time.monotonic() > deadline:
            proc.terminate()
            raise HyperplaneError(f"the agent for node {node} did not start within "
                                  f"{timeout_s:.0f} s; see {log_file.name}")
        time.sleep(0.05)
    return proc.pid


def stop_agent(node: str, timeout_s: float = 10.0) -> bool:
    """Stop the node's background agent; False when none was running."""
    try:
        with open(_pid_path(node)) as f:
            pid = int(f.read().strip())
    except (FileNotFoundError, ValueError):
        return False
    os.unlink(_pid_path(node))
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        try:  # reap it if it is our child
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    return True


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="hyperplane node agent")
    ap.add_argument("--node", required=True)
    ap.add_argument("--store", default=DEFAULT_STORE)
    ap.add_argument("--tick", type=float, default=0.2)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    agent = Agent(AgentConfig(args.node, args.store, args.tick))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: agent.stop.set())
    try:
        agent.run()
    except HyperplaneError as exc:
        print(f"hyperplane agent: {exc}", file=sys.stderr)
        return exc.exit_status
    return 0


if __name__ == "__main__":
    sys.exit(main())
