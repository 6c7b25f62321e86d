"""The node agent: applies the load balancers in the store to the node's maps, adds their
VIPs to the node (hyperplane.addresses), runs the health checks, ends drains, collects
garbage, and reports its view in a status file.

A bad store (unreadable, not JSON, invalid, more than the node holds) never stops it: the
error goes into the status and the log, the last good configuration stays applied, health
checks and garbage collection go on.

uvicorn-style: AgentConfig is separate from the Agent; startup, a tick loop, shutdown;
SIGTERM / SIGINT stop it cleanly. `spawn_agent` runs one in the background."""
from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from hyperplane.errors import ConfigError, HyperplaneError
from hyperplane.datapath.flows import collect_garbage
from hyperplane.nlb.health import HealthChecker, TargetHealth
from hyperplane.nlb.dataplane import NlbDataplane, check_fits
from hyperplane.nlb.config import NlbConfig
from hyperplane.node.lifecycle import NODE_STATE_DIR, check_node_name, node_state, open_node, \
    read_state_file, state_path, write_state_file
from hyperplane.fleet.store import DEFAULT_STORE, NLB_KEY, open_store
from hyperplane.fleet.member import FleetConfig, FleetMember
from hyperplane.fleet.dataplane import GatewayBlocks
from hyperplane.observe import events as _events
from hyperplane.observe.flowlogs import FlowLogConfig, FlowLogs
from hyperplane.fleet import cluster
from hyperplane.node.nat_from_store import NatFromStore, load_node

if TYPE_CHECKING:  # hyperplane.node.addresses (pyroute2) is imported where it is used
    from hyperplane.node.addresses import Added

log = logging.getLogger("hyperplane.node.agent")


# The agent's status file, read by hpctl, lives in hyperplane.node.status (a read command
# does not import the agent's fleet and health-check code); re-exported here.
from hyperplane.node.status import (_check_status, pid_alive, read_status,  # noqa: E402,F401
                                    status_or_none, status_path)


def _pid_path(node: str) -> str:
    return state_path(node, ".agent.pid")


def _vips_path(node: str) -> str:
    """The VIP addresses this node's agents added (hyperplane.addresses)."""
    return state_path(node, ".agent.vips.json")


def _read_vips(node: str) -> list[Added]:
    """What earlier agents added; a missing or damaged record adds up to nothing (an
    address not known to be ours is never removed)."""
    from hyperplane.node.addresses import Added  # pyroute2: not on the read paths (hpctl counters)
    try:
        return Added.from_dicts(read_state_file(_vips_path(node), "").get("addresses"))
    except HyperplaneError:
        return []


def release_vips(node: str, netns: str | None) -> None:
    """Remove the VIP addresses the node's agents added (the node goes down)."""
    from hyperplane.node import addresses
    addresses.release(netns, _read_vips(node))
    try:
        os.unlink(_vips_path(node))
    except FileNotFoundError:
        pass


@dataclass
class AgentConfig:
    node: str
    store_url: str = DEFAULT_STORE     # a path, file:PATH or etcd://HOST:PORT
    tick_s: float = 0.2          # how often the store and the health checks are looked at
    gc_every_s: float = 10.0     # garbage collection of expired flows and reservations
                                 # (fleet: and the reservations of own blocks' flows)
    count_every_s: float = 5.0   # flows per target (drains, status): a scan of the table
    sync_dev: str | None = None  # the sync network's interface: set, the node is a fleet member
    # hpctl node up: the agent loads and attaches the data path on these interfaces (when
    # the node does not run already) and runs the NAT gateways the store assigns the node
    ifnames: list[str] | None = None
    netns: str | None = None
    mode: str | None = None      # attach mode (hyperplane.datapath.loader.MODES)
    outside_if: str | None = None
    fleet: FleetConfig = field(default_factory=FleetConfig)
    watchdog_s: float = 10.0     # a fleet task silent this long is reported (and logged)
    flow_logs: FlowLogConfig = field(default_factory=FlowLogConfig)
    metrics_addr: str | None = None  # HOST:PORT: serve Prometheus metrics there, in the
                                     # node's network namespace (None: no metrics)


class Agent:
    def __init__(self, config: AgentConfig):
        self.config = config
        self.store = open_store(config.store_url)
        self.stop = threading.Event()
        self.checkers: dict[str, HealthChecker] = {}
        self.next_check: dict[str, float] = {}
        self.store_revision = -1          # the mod revision of the NLB key read last
        self.pending: dict | None = None  # store content read and not applied yet
        self.good: dict | None = None     # the store content applied last
        self.config_error: str | None = None   # why the store's content was rejected
        self.address_error: str | None = None  # why the VIP addresses are not as wanted
        self.vips: list[Added] = []       # VIP addresses this node's agents added
        self.vips_wanted: set[str] | None = None
        self.last_gc = 0.0
        self.last_count = -1e9
        self.count_wall = 0.0        # wall-clock time of the last count (drains use it)
        self.flow_counts: dict[int, int] = {}
        self.resets = 0
        self.member: FleetMember | None = None
        self.stalled: list[str] = []      # fleet tasks the watchdog found silent
        self.events = None   # the event ring's one reader (observe.events.EventHub)
        self.events_stop = threading.Event()   # its thread's, outside a fleet
        self.flow_logs: FlowLogs | None = None
        self.publisher = None   # flow events for followers (observe.follow)
        self.last_status: dict | None = None   # what _write_status wrote last (metrics)
        self.metrics = None               # hyperplane.observe.prometheus.MetricsServer
        self.nat = NatFromStore(config.node)

    # --- lifecycle ---------------------------------------------------------------------
    def startup(self) -> None:
        if self.config.ifnames:
            load_node(self.config)
        state = node_state(self.config.node)
        self.nat.enabled = bool(state.get("nat_from_store"))
        self.netns = state["netns"]
        self.nat_ips = {ip for gw in state["gateways"] for ip in gw["nat_ips"]}
        self.outside_if = state.get("outside_if")
        self.gateway_blocks = {g["name"]: GatewayBlocks(g["gw_id"], len(g["nat_ips"]),
                                                        g["port_min"], g["port_max"])
                               for g in state["gateways"]}
        # pinned maps, and for a fleet member the pinned installer and event ring: the
        # agent compiles nothing, so a restarted agent is back within a second
        self.dp = open_node(self.config.node)
        self.plane = NlbDataplane(self.dp)
        if self.nat.enabled:
            cluster.node_id(self.store, self.config.node)   # named: shards may include it
            self._apply_nat()   # before the fleet member starts: no ready node lacks them
        self.vips = _read_vips(self.config.node)
        if self.config.metrics_addr:
            self._serve_metrics()
        self._start_events()
        if self.config.sync_dev:
            self.member = FleetMember(
                self.config.node, self.netns, self.dp, self.store,
                FleetConfig(**{**self.config.fleet.__dict__, "sync_dev": self.config.sync_dev}),
                gateways=lambda: self.gateway_blocks, lb_ids=self._lb_ids,
                events=self.events)
            self.member.start()
        else:   # no sync task reads the event ring: a thread of ours does
            threading.Thread(target=_events.drive, args=(self.events, self.events_stop),
                             name="events", daemon=True).start()
        log.info("agent for node %s started (store %s)", self.config.node, self.config.store_url)

    def run(self) -> None:
        self.startup()
        try:
            while not self.stop.is_set():
                self.tick(time.monotonic())
                self.stop.wait(self.config.tick_s)
        finally:
            self.shutdown()

    def _lb_ids(self) -> dict[str, int]:
        """The applied configuration's load balancers (name -> id): the same on every node."""
        good = self.good
        if not good:
            return {}
        try:
            return {lb.name: lb.lb_id for lb in NlbConfig.from_dict(good).load_balancers}
        except ConfigError:
            return {}

    def _serve_metrics(self) -> None:
        """Prometheus metrics at config.metrics_addr, the socket in the node's namespace;
        a scrape reads the node's counters (its own map handles) and this agent's last
        status."""
        from hyperplane.observe import prometheus
        host, port = prometheus.parse_addr(self.config.metrics_addr)
        node = self.config.node
        collector = prometheus.NodeCollector(
            node, open_node(node), gateways=lambda: node_state(node)["gateways"],
            status=lambda: self.last_status,
            nlb_config=lambda: NlbConfig.from_dict(self.good) if self.good else None)
        self.metrics = prometheus.serve(collector, host, port, self.netns)
        log.info("metrics at %s (network namespace %s)", self.metrics.url, self.netns)

    def _start_events(self) -> None:
        """The event ring's one reader, the flow logs and the followers' socket."""
        from hyperplane.observe.follow import EventPublisher, events_socket_path
        self.events = _events.EventHub(self.dp)
        if self.config.flow_logs.enabled:
            self.flow_logs = FlowLogs(self.config.node, self.netns, self.dp,
                                      self.config.flow_logs, self.events)
            self.flow_logs.start()
        self.publisher = EventPublisher(events_socket_path(self.config.node), self.events)

    def shutdown(self) -> None:
        if self.flow_logs is not None:
            self.flow_logs.close()      # logs the interval under way (the ring still read)
        self.events_stop.set()
        if self.publisher is not None:
            self.publisher.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.member is not None:
            self.member.close()
        for checker in self.checkers.values():
            checker.close()
        self.checkers.clear()
        self.store.close()
        log.info("agent for node %s stopped", self.config.node)

    # --- one tick ------------------------------------------------------------------------
    def tick(self, now: float) -> None:
        if self.nat.enabled:
            self._apply_nat()
        self._read_store()
        cfg, health = self._apply(now)
        if cfg is not None:
            draining = [t.draining_since for tg in cfg.target_groups for t in tg.targets
                        if t.state == "draining"]
            # Counting scans the flow table: every count_every_s for the status, but every
            # second while a drain is on, and never older than the newest drain's start, so
            # a drain cannot end on a count taken before its flows existed.
            every = min(1.0, self.config.count_every_s) if draining else \
                self.config.count_every_s
            if now - self.last_count >= every or (draining and self.count_wall < max(draining)):
                self.flow_counts = self.plane.flows_per_target()
                self.last_count, self.count_wall = now, time.time()
            self._end_drains(cfg)
        if self.member is not None:
            stalled = self.member.alive(now, self.config.watchdog_s)
            if stalled and stalled != self.stalled:
                log.error("watchdog: fleet task(s) %s silent for %.0f s", ", ".join(stalled),
                          self.config.watchdog_s)
                for name, stack in self.member.stacks(stalled).items():
                    log.error("watchdog: the %s task is at:\n%s", name, stack)
            self.stalled = stalled
        if now - self.last_gc >= self.config.gc_every_s:
            collect_garbage(self.dp, on_deleted=self.flow_logs.aggregator.on_deleted
                            if self.flow_logs else None)  # their last counts
            if self.member is not None:
                self.member.reserve_own_ports()
            self.last_gc = now
        self._write_status(cfg, health)

    def _apply_nat(self) -> None:
        """A node started by hpctl node up runs the /nat gateways whose shard names it."""
        state = self.nat.apply(self.store, self.dp)
        if state is None:
            return
        self.nat_ips = {ip for gw in state["gateways"] for ip in gw["nat_ips"]}
        self.gateway_blocks = {g["name"]: GatewayBlocks(g["gw_id"], len(g["nat_ips"]),
                                                        g["port_min"], g["port_max"])
                               for g in state["gateways"]}

    def _reject(self, exc: Exception) -> None:
        if self.config_error != str(exc):
            log.error("store rejected, the last good configuration stays: %s", exc)
        self.config_error = str(exc)

    def _read_store(self) -> None:
        try:
            entry = self.store.get(NLB_KEY)
        except ConfigError as exc:
            # Read again once the store is back, even at a revision seen before (a file
            # store removed and written anew starts its revisions again).
            self.store_revision = -1
            self._reject(exc)
            return
        revision = entry.revision if entry else 0
        if revision == self.store_revision:
            return
        self.store_revision = revision
        self.pending = entry.value if entry else {}

    def _apply(self, now: float) -> tuple[NlbConfig | None, dict]:
        """Apply the store's new content if it is good, else the last good content again
        (health states change); (None, {}) when there is none."""
        for data in (self.pending, self.good):
            if data is None:
                continue
            try:
                cfg = self._check(data)
            except ConfigError as exc:
                self._reject(exc)
                if data is self.pending:
                    self.pending = None
                    continue
                return None, {}
            health = self._check_health(cfg, now)
            for tg in cfg.target_groups:
                tg.record_health({t.endpoint: health[tg.name][t.endpoint] for t in tg.targets
                                  if t.endpoint in health.get(tg.name, {})})
            self.plane.apply(cfg)
            if data is self.pending:
                self.good, self.pending, self.config_error = data, None, None
            self._sync_vips({str(listener.vip) for listener in cfg.listeners})
            return cfg, health
        return None, {}

    def _check(self, data: dict) -> NlbConfig:
        """The config in data, or a ConfigError (invalid, more than the node holds, a VIP
        that is a NAT IP). Nothing is changed."""
        cfg = NlbConfig.from_dict(data)
        check_fits(cfg, self.dp.sizes, self.nat_ips)
        self.plane.plan(cfg)
        return cfg

    def _sync_vips(self, wanted: set[str]) -> None:
        """Add the VIPs the node does not have, remove those of ours no longer wanted, and
        record which are ours. A VIP with no interface to go on, or a netlink failure, is
        reported (address_error) and tried again next tick: the listeners work without
        the address where the network routes the VIP to the node."""
        if wanted == self.vips_wanted:
            return
        from hyperplane.node import addresses
        owned, removing = list(self.vips), []
        try:
            plan = addresses.plan_in(self.netns, sorted(wanted), self.vips,
                                     outside_if=self.outside_if, what="VIP",
                                     hint="; name the node's outside interface (hpctl nat up "
                                          "--outside-if) or add the VIP yourself")
            owned, removing = list(plan.keep), list(plan.remove)
            for a in plan.add:
                addresses.add(self.netns, a)
                owned.append(a)
            while removing:
                addresses.remove(self.netns, removing[0])
                removing.pop(0)
            self.vips_wanted, self.address_error = wanted, None
        except (OSError, HyperplaneError) as exc:
            if self.address_error != str(exc):
                log.error("VIP addresses: %s", exc)
            self.vips_wanted, self.address_error = None, str(exc)
        self.vips = owned + removing
        write_state_file(_vips_path(self.config.node),
                         {"addresses": [a.to_dict() for a in self.vips]})

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
            cfg = NlbConfig.from_dict(data)  # the store as it is now, checked
            for tg in cfg.target_groups:
                gone = set(ended.get(tg.name, ()))
                tg.targets = [t for t in tg.targets if t.identity not in gone]
            return cfg.to_dict()

        try:
            self.pending = self.store.update(NLB_KEY, remove, default={})
        except ConfigError as exc:  # the store went bad: the drains end once it is fixed
            self._reject(exc)
            return
        log.info("drains ended: %s", ended)

    def _write_status(self, cfg: NlbConfig | None, health: dict) -> None:
        status = {"node": self.config.node, "pid": os.getpid(), "time": time.time(),
                  "config_error": self.config_error, "address_error": self.address_error,
                  "flows_reset_unhealthy": self.resets,
                  "target_groups": {}, "stalled_tasks": self.stalled,
                  "metrics": self.metrics.url if self.metrics is not None else None,
                  "nat": self.nat.status(),
                  "flow_logs": self.flow_logs.status() if self.flow_logs else None,
                  "flow_events": dict(self.publisher.counts) if self.publisher else None,
                  "fleet": self.member.status() if self.member is not None else None}
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
        write_state_file(status_path(self.config.node), status)
        self.last_status = status


# --- running in the background -------------------------------------------------------------

def spawn_agent(node: str, store_url: str = DEFAULT_STORE, timeout_s: float = 30.0,
                sync_dev: str | None = None, metrics_addr: str | None = None,
                load: dict | None = None, sync_rt_priority: int | None = None,
                refresh_s: float | None = None, sweep_s: float | None = None) -> int:
    """Start an agent process for the node; return once it has written its first status.
    sync_dev (the node's interface on the sync network) makes it a fleet member. load
    ({"ifnames": [...], "netns", "mode", "outside_if"}: hpctl node up): the agent loads the
    data path there itself and runs the NAT gateways the store assigns the node.
    sync_rt_priority, refresh_s, sweep_s: the fleet member's (FleetConfig; None: its
    default)."""
    if load is None:
        node_state(node)  # fail early and clearly if the node is not running
    else:
        check_node_name(node)
        os.makedirs(NODE_STATE_DIR, exist_ok=True)
    try:
        os.unlink(status_path(node))
    except FileNotFoundError:
        pass
    log_file = open(state_path(node, ".agent.log"), "a")
    proc = subprocess.Popen([sys.executable, "-m", "hyperplane.node.agent",
                             *(["--metrics-addr", metrics_addr] if metrics_addr else []),
                             "--node", node,
                             "--store", store_url, *(["--sync-dev", sync_dev] if sync_dev else []),
                             *fleet_args(sync_rt_priority, refresh_s, sweep_s),
                             *load_args(load)],
                            stdout=log_file, stderr=log_file,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    with open(_pid_path(node), "w") as f:
        f.write(str(proc.pid))
    deadline = time.monotonic() + timeout_s
    while not os.path.exists(status_path(node)):
        if proc.poll() is not None:
            raise HyperplaneError(f"the agent for node {node} exited at start-up (status "
                                  f"{proc.returncode}): {_last_line(log_file.name)}; see "
                                  f"{log_file.name}")
        if time.monotonic() > deadline:
            proc.terminate()
            raise HyperplaneError(f"the agent for node {node} did not start within "
                                  f"{timeout_s:.0f} s; see {log_file.name}")
        time.sleep(0.05)
    return proc.pid


def _last_line(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return "no log"
    return lines[-1] if lines else "nothing logged"


def fleet_args(sync_rt_priority: int | None = None, refresh_s: float | None = None,
               sweep_s: float | None = None) -> list[str]:
    """The agent's command-line arguments for the fleet settings given (None: default)."""
    out = []
    for flag, value in (("--sync-rt-priority", sync_rt_priority), ("--refresh-s", refresh_s),
                        ("--sweep-s", sweep_s)):
        if value is not None:
            out += [flag, str(value)]
    return out


def load_args(load: dict | None) -> list[str]:
    if not load:
        return []
    args = [a for ifname in load["ifnames"] for a in ("--if", ifname)]
    for key in ("netns", "mode", "outside_if"):
        if load.get(key):
            args += [f"--{key.replace('_', '-')}", load[key]]
    return args


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


def flow_log_arguments(ap: argparse.ArgumentParser) -> None:
    d = FlowLogConfig()
    ap.add_argument("--flow-log-dir", default=d.dir, help="flow logs go to DIR/<node>/flow.log")
    ap.add_argument("--flow-log-interval", type=int, default=d.interval_s,
                    help="aggregation interval, 1-600 s")
    ap.add_argument("--flow-log-max-bytes", type=int, default=d.max_bytes,
                    help="rotate the file before it grows past this")
    ap.add_argument("--flow-log-backups", type=int, default=d.backups,
                    help="rotated files kept")
    ap.add_argument("--flow-log-format", default=d.format, help="v2 or json")
    ap.add_argument("--flow-log-account-id", default=d.account_id)
    ap.add_argument("--no-flow-logs", action="store_true", help="write no flow logs")


def flow_log_config(args) -> FlowLogConfig:
    """The flow log options of main()'s arguments, checked (ConfigError)."""
    return FlowLogConfig(dir=args.flow_log_dir, interval_s=args.flow_log_interval,
                         max_bytes=args.flow_log_max_bytes, backups=args.flow_log_backups,
                         format=args.flow_log_format, account_id=args.flow_log_account_id,
                         enabled=not args.no_flow_logs)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="hyperplane node agent")
    ap.add_argument("--node", required=True)
    ap.add_argument("--store", default=DEFAULT_STORE,
                    help="the cluster store: a path, file:PATH or etcd://HOST:PORT")
    ap.add_argument("--tick", type=float, default=0.2)
    ap.add_argument("--sync-dev", default=None,
                    help="the node's interface on the sync network: join the fleet")
    ap.add_argument("--sync-rt-priority", type=int, default=FleetConfig.sync_rt_priority,
                    metavar="0-99", help="SCHED_FIFO priority of the fleet's sync task "
                    "(default 0: normal scheduling)")
    ap.add_argument("--refresh-s", type=float, default=FleetConfig.refresh_s, metavar="SECONDS",
                    help="how often the flows that saw a packet lately are sent to their "
                         "replicas again (default %(default)s)")
    ap.add_argument("--sweep-s", type=float, default=FleetConfig.sweep_s, metavar="SECONDS",
                    help="anti-entropy: every flow this node owns, idle ones too, is sent to "
                         "its replicas once in this period, a slice per refresh (default "
                         "%(default)s; 0: off)")
    flow_log_arguments(ap)
    ap.add_argument("--metrics-addr", default=None, metavar="HOST:PORT",
                    help="serve Prometheus metrics there (in the node's network namespace)")
    ap.add_argument("--if", dest="ifnames", action="append", default=None,
                    help="load and attach the data path on this interface (repeat); the "
                         "node then runs the NAT gateways the store assigns it")
    ap.add_argument("--netns", default=None)
    ap.add_argument("--mode", default=None)
    ap.add_argument("--outside-if", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        if not 0 <= args.sync_rt_priority <= 99:
            raise ConfigError(f"--sync-rt-priority {args.sync_rt_priority}: a SCHED_FIFO "
                              "priority is 1-99, or 0 for normal scheduling")
        if not 0.1 <= args.refresh_s <= 3600:
            raise ConfigError(f"--refresh-s {args.refresh_s}: 0.1-3600 seconds")
        if args.sweep_s != 0 and not args.refresh_s <= args.sweep_s <= 86400:
            raise ConfigError(f"--sweep-s {args.sweep_s}: 0 (off) or from --refresh-s "
                              f"({args.refresh_s}) to 86400 seconds")
        agent = Agent(AgentConfig(args.node, args.store, args.tick, metrics_addr=args.metrics_addr,
                                  sync_dev=args.sync_dev,
                                  ifnames=args.ifnames, netns=args.netns, mode=args.mode,
                                  outside_if=args.outside_if))  # a bad --store URL
        agent.config.flow_logs = flow_log_config(args)
        agent.config.fleet.sync_rt_priority = args.sync_rt_priority
        agent.config.fleet.refresh_s = args.refresh_s
        agent.config.fleet.sweep_s = args.sweep_s
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: agent.stop.set())
        agent.run()
    except HyperplaneError as exc:
        print(f"hyperplane agent: {exc}", file=sys.stderr)
        return exc.exit_status
    return 0


if __name__ == "__main__":
    sys.exit(main())
