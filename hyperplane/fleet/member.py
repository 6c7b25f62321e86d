"""A node's part in the fleet, run by its agent (hyperplane.node.agent) in three tasks:

membership  holds the node's lease and member record in the store (/nodes/<name>: the
            failure detector), watches the store and turns each view of it into the data
            path's fleet maps: who is live, each resource's live shard nodes, the NAT port
            blocks this node takes ports from (blocks gained from a node still live are
            held down a while: it may still be using them), and the sync peers.
sync        one UDP socket on the sync network driving a SyncNode (hyperplane.fleet.sync):
            flow events from the data path's ring buffer go to the other nodes of the
            flow's shard; records from peers are installed (hyperplane.fleet.records);
            a peer that says HELLO (it restarted or joined) gets every flow of the shards
            it shares with this node; it queues what the refresh task hands over.
refresh     every refresh_s, one read of the flows table: the flows that saw traffic
            lately are sent again, so replicas never expire while the flow lives, and
            every flow this node owns, idle ones too, once per sweep_s; replicas of flows
            their owner no longer sends are pruned (anti-entropy: fleet.sweep). It is a
            task of its own because the read takes hundreds of milliseconds for a full
            table, during which the sync task would replicate nothing.

Each task catches and logs its errors and starts over after a pause: a store that is
down or a bad record stops nothing else. A node is "ready" (the routers may send it
traffic) once it has greeted every live peer it shares a shard with and the copies they
sent have stopped arriving (or ready_max_s passed)."""
from __future__ import annotations

import errno
import logging
import os
import select
import socket
import sys
import threading
import traceback
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

from hyperplane import netns as _netns
from hyperplane.datapath.verdicts import FlowEventType, FlowKind
from hyperplane.errors import HyperplaneError
from hyperplane.fleet import cluster, records, sweep
from hyperplane.fleet.cluster import Member
from hyperplane.fleet.dataplane import FleetDataplane, GatewayBlocks, lb_slot
from hyperplane.fleet.owner import block_owners, block_size, shard_owner
from hyperplane.fleet.store import LeaseExpired, Store, StoreError, WatchCompacted
from hyperplane.fleet.sync import SyncNode
from hyperplane.observe.events import REC_OFFSET, EventHub

log = logging.getLogger("hyperplane.fleet.member")
SWITCH_INTERVAL_S = 0.0005     # sys.setswitchinterval for the agent: see FleetMember.start


def _coarse_ns() -> int:
    """The data path's clock (bpf_ktime_get_coarse_ns)."""
    from hyperplane.datapath.flows import now_ns
    return now_ns()

# Events that change what a replica must hold. CREATED is an unconfirmed flow (a flood's
# SYNs stay on one node); EXPIRED happens on every holder by itself.
_FLAGS_OFF = records.OFFSETS["flags"]
REPLICATED = {int(FlowEventType.FLOW_CONFIRMED), int(FlowEventType.FLOW_CHANGED),
              int(FlowEventType.FLOW_CLOSED)}


def replicated(etype: int, rec: bytes) -> bool:
    """Whether a flow event's record goes to the peers. An unconfirmed flow is not
    replicated (a flood's SYNs stay here), so neither is its change to SYN-received: a
    new TCP flow costs one record, its CONFIRMED one."""
    return etype in REPLICATED and bool(rec[_FLAGS_OFF] & records.REC_F_CONFIRMED)


# replicated() a column at a time: bytes.translate maps each event's type byte, and each
# record's flags byte, to 1 (wanted) or 0
_TYPE_WANTED = bytes(1 if t in REPLICATED else 0 for t in range(256))
_FLAG_WANTED = bytes(1 if f & records.REC_F_CONFIRMED else 0 for f in range(256))


def replicated_mask(batch) -> tuple[bytes | None, int]:
    """Which events of a RingBatch of flow events go to the peers (replicated() of each,
    computed on whole columns: no Python per event): (a byte per event, 1 to keep, or
    None when all are kept; how many are kept)."""
    n = batch.count
    if not n:
        return None, 0
    keep = (int.from_bytes(batch.column(0).translate(_TYPE_WANTED), "little") &
            int.from_bytes(batch.column(REC_OFFSET + _FLAGS_OFF).translate(_FLAG_WANTED),
                           "little")).to_bytes(n, "little")
    kept = keep.count(1)
    return (None if kept == n else keep), kept


def replicated_records(batch) -> tuple[bytes, int]:
    """The records of a RingBatch's events that go to the peers, concatenated, and how
    many."""
    keep, kept = replicated_mask(batch)
    if not kept:
        return b"", 0
    return batch.fields(REC_OFFSET, records.RECORD_SIZE, keep), kept


@dataclass
class FleetConfig:
    sync_dev: str = "sync0"
    lease_s: float = 2.0          # a dead node leaves the routers after at most this
    refresh_s: float = 10.0       # owners resend their live flows this often
    sweep_s: float = 60.0         # ... and every flow they own, idle too, over this (0: off)
    hold_down_s: float = 2.0      # before using port blocks gained from a live node
    poll_s: float = 0.001         # sync task: how often the ring buffer is read when busy
    idle_poll_s: float = 0.008    # ... and at most this long apart when idle
    ready_quiet_s: float = 0.3    # no copies arriving for this long: ready
    ready_max_s: float = 10.0     # ready after this at the latest
    retry_s: float = 1.0          # pause after an error before a task starts over
    # the sync task runs under SCHED_FIFO at this priority (1-99; 0: normal scheduling),
    # as conntrackd's Scheduler option: woken by a flow event or a datagram, it runs at
    # once instead of after whatever else holds the core. Off by default: it also
    # preempts everything else at normal priority, ksoftirqd (the data path under
    # load) included. In bench/replication_bench.py it did not lower the lag's p99
    # reliably and cut the peak rate by two thirds (docs/benchmarks.md).
    sync_rt_priority: int = 0


@dataclass
class View:
    """What the store says, as this node applies it."""
    members: dict[str, Member] = field(default_factory=dict)   # live
    ids: dict[str, int] = field(default_factory=dict)          # every named node
    shards: dict[str, list[str]] = field(default_factory=dict)
    seed: int = 0
    sync_port: int = cluster.SYNC_PORT
    keyring: Any = None


class FleetMember:
    def __init__(self, name: str, netns: str | None, dp, store: Store, config: FleetConfig,
                 gateways: Callable[[], dict[str, GatewayBlocks]],
                 lb_ids: Callable[[], dict[str, int]], events: EventHub | None = None):
        self.name, self.netns, self.dp, self.store, self.config = name, netns, dp, store, config
        # the node's one reader of the event ring, shared with flow logs and followers
        # (the agent's); the sync task drives it
        self.events = events
        self._consume_events = None
        self.fleet = FleetDataplane(dp)
        self.gateways = gateways          # gateway name -> its blocks' shape (this node's)
        self.lb_ids = lb_ids              # load balancer name -> id (the applied config)
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.epoch = time.time_ns()
        self.node_id: int | None = None
        self.view = View()
        self.error: str | None = None
        self.ready = False
        self.started = time.monotonic()
        self.heartbeat = {"membership": 0.0, "sync": 0.0, "refresh": 0.0}
        self.sync_scheduling = "not started"   # the sync task's (status)
        self._threads: list[threading.Thread] = []
        # sync task state (only the sync thread touches these)
        self._sync: SyncNode | None = None
        self._sock: socket.socket | None = None
        self._events = bytearray()
        self._inbox = bytearray()        # delivered records not installed yet
        self._peer_plan: dict[int, tuple[str, int]] | None = None   # set by membership
        self._targets: dict[tuple[str, int], list[int]] = {}       # resource -> sync ids
        self._lb_of_listener: dict[int, int] = {}
        self._last_delivery = 0.0
        self._sweep_round = 0               # the refresh task's
        # a refresh round's (fresh, swept) records, for the sync task to queue
        self._refreshed: deque[tuple[bytes, bytes]] = deque()
        self.counts = {"events_read": 0, "events_replicated": 0, "records_sent": 0,
                       "installed": 0, "merged": 0, "rejected": 0, "conflict": 0, "full": 0,
                       "replaced": 0, "dumps_sent": 0, "refreshed": 0, "swept": 0,
                       "handed_over": 0, "stale_removed": 0, "replicas_pruned": 0}
        self._sync_stats: dict = {}
        # port blocks: (gw_id, block) -> (owner, since) for the hold-down
        self._block_owner: dict[tuple[int, tuple[int, int]], int] = {}
        self._held: dict[tuple[int, tuple[int, int]], float] = {}
        self._sync_ifindex = 0
        self._programmed: tuple = ()
        self._partners: set[int] | None = None    # sync ids of the shard partners (a plan)
        self._shard_owners: dict[tuple[str, int], list[int]] = {}   # resource -> owner ids
        self._block_owners: dict[int, tuple] = {}   # gw id -> (GatewayBlocks, owners)
        self._handover_due = False
        self._synced_keys: set[bytes] = set()
        self._started_ns = _coarse_ns()
        self._greeted_at: float | None = None
        # for pruning replicas (fleet.sweep.prune_after): since when each peer's stream
        # has been up (sync id -> (epoch, monotonic)), and the owners unchanged
        self._peer_up: dict[int, tuple[int, float]] = {}
        self._owners_since = time.monotonic()
        self._mac = ""
        self._sync_ip = ""

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        """Join: identity from the store, the sync interface's address, the first view;
        then the two tasks. Raises (the agent reports it) only if the node cannot be a
        member at all (no sync interface)."""
        link = self._sync_link()
        self._sync_ifindex, self._mac, self._sync_ip = link
        info = cluster.ensure_cluster(self.store)
        self.node_id = cluster.node_id(self.store, self.name)
        self.view.seed, self.view.sync_port, self.view.keyring = \
            info.seed, info.sync_port, info.keyring
        self.fleet.set_identity(self.node_id, self._sync_ifindex)
        self._set_seed(info.seed)
        # The refresh task's Python work holds the GIL, and the sync task, woken by a
        # datagram or a flow event, waits until it is handed over: at most this long
        # (Python's default is 5 ms, five times the lag target).
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
        for target, name in ((self._membership_task, "membership"), (self._sync_task, "sync"),
                             (self._refresh_task, "refresh")):
            t = threading.Thread(target=self._forever, args=(target, name), name=name,
                                 daemon=True)
            t.start()
            self._threads.append(t)
        log.info("node %s joins the fleet as id %d (sync %s on %s, epoch %d)", self.name,
                 self.node_id, self._sync_ip, self.config.sync_dev, self.epoch)

    def close(self) -> None:
        self.stop.set()
        for t in self._threads:
            t.join(timeout=5)
        lease = getattr(self, "_lease", None)
        if lease is not None:
            try:
                lease.revoke()      # leave at once rather than after the lease's TTL
            except StoreError as exc:
                log.warning("could not revoke the lease: %s", exc)
        if self._sock is not None:
            self._sock.close()

    def alive(self, now: float, limit_s: float = 10.0) -> list[str]:
        """The tasks that have not reported for limit_s (the agent's watchdog)."""
        return [name for name, t in self.heartbeat.items() if now - t > limit_s]

    @staticmethod
    def stacks(names: list[str]) -> dict[str, str]:
        """Where the named tasks are now (the watchdog logs it for a silent task)."""
        frames = sys._current_frames()
        out = {}
        for t in threading.enumerate():
            if t.name in names and t.ident in frames:
                out[t.name] = "".join(traceback.format_stack(frames[t.ident]))
        return out

    def _forever(self, task, name: str) -> None:
        while not self.stop.is_set():
            try:
                task()
            except Exception as exc:  # noqa: BLE001 - logged, retried: never fatal
                self.error = f"{name}: {exc}"
                log.exception("fleet %s task failed; starting over in %.1f s", name,
                              self.config.retry_s)
                self.stop.wait(self.config.retry_s)

    def _sync_link(self) -> tuple[int, str, str]:
        dev = self.config.sync_dev
        with _netns.ipr_any(self.netns) as ip:
            links = {l.get_attr("IFLA_IFNAME"): (l["index"], l.get_attr("IFLA_ADDRESS"))
                     for l in ip.get_links()}
        if dev not in links:
            raise HyperplaneError(f"node {self.name} has no sync interface {dev!r}"
                                  f"{' in namespace ' + self.netns if self.netns else ''}")
        addrs = [a["address"] for a in _netns.ipv4_addresses(self.netns)
                 if a["ifname"] == dev]
        if not addrs:
            raise HyperplaneError(f"the sync interface {dev} of node {self.name} has no "
                                  "IPv4 address")
        return links[dev][0], links[dev][1], addrs[0]

    def _set_seed(self, seed: int) -> None:
        table = self.dp.table("config")
        leaf = table[table.Key(0)]
        if leaf.hash_seed != seed:
            leaf.hash_seed = seed
            table[table.Key(0)] = leaf

    # --- membership ----------------------------------------------------------------------

    def _member(self) -> Member:
        return Member(self.name, self.node_id, self._sync_ip, self._mac, self.epoch, self.ready,
                      sweep.period_s(self.config.refresh_s, self.config.sweep_s))

    def _announce(self) -> None:
        self.store.put(cluster.NODES_PREFIX + self.name, self._member().to_dict(),
                       lease=self._lease)

    def _membership_task(self) -> None:
        cfg = self.config
        self._lease = self.store.lease(cfg.lease_s)
        announced_ready = self.ready
        self._announce()
        listing = self.store.list("/")
        self._apply_view(listing)
        watch = self.store.watch("/", start_revision=listing.revision + 1)
        next_refresh = time.monotonic() + cfg.lease_s / 3
        try:
            while not self.stop.is_set():
                now = time.monotonic()
                self.heartbeat["membership"] = now
                if now >= next_refresh:
                    try:
                        self._lease.refresh()
                    except LeaseExpired:
                        log.warning("the lease expired (paused too long?): joining again")
                        self._lease = self.store.lease(cfg.lease_s)
                        self._announce()
                    next_refresh = now + cfg.lease_s / 3
                if self.ready != announced_ready:
                    announced_ready = self.ready
                    self._announce()
                self._release_held(now)
                if (tuple(sorted(self.gateways())), tuple(sorted(self.lb_ids().items()))) \
                        != self._programmed:
                    self._program(now)       # the agent applied another configuration
                try:
                    event = watch.next(timeout=min(0.1, cfg.lease_s / 6))
                except WatchCompacted:
                    event = True
                if event is None:
                    continue
                while event is not None and event is not True:   # take what is queued
                    event = watch.next(timeout=0)
                listing = self.store.list("/")
                watch.cancel()
                self._apply_view(listing)
                watch = self.store.watch("/", start_revision=listing.revision + 1)
        finally:
            watch.cancel()

    def _apply_view(self, listing) -> None:
        value = lambda key, default: listing[key].value if key in listing else default  # noqa: E731
        ids = value(cluster.NODE_IDS_KEY, {})
        members = cluster.members(listing)
        # a new node or resource gets its shard, a short shard grows (written only when
        # something changes, so the watch this triggers on every node settles)
        shards = cluster.ensure_shards(self.store) if ids else {}
        info = cluster.cluster_from(value(cluster.CLUSTER_KEY, None)) \
            if cluster.CLUSTER_KEY in listing else None
        with self.lock:
            v = self.view
            v.members, v.ids, v.shards = members, dict(ids), {r: list(m) for r, m in shards.items()}
            if info is not None:
                v.seed, v.sync_port, v.keyring = info.seed, info.sync_port, info.keyring
        self._program(time.monotonic())

    def _program(self, now: float) -> None:
        """The data path's fleet maps and the sync peers from the view."""
        v = self.view
        me = self.node_id
        # Owners and port blocks are computed over the *ready* nodes (and this one): a node
        # that is joining holds no flows yet and gets no packets, from the routers or by
        # second chance, until it says ready. Replication goes to every live node of the
        # shard, ready or not: that is how a joining node gets its copy.
        ready = {m.id for m in v.members.values() if m.ready} | {me}
        owners_before = dict(self._shard_owners)
        self._set_seed(v.seed)
        self.fleet.set_peers({m.id: m.mac for m in v.members.values()} | {me: self._mac}, ready)
        targets: dict[tuple[str, int], list[int]] = {}
        partners: set[int] = set()

        def shard_ids(resource: str) -> tuple[list[int], list[int]]:
            """(the ready nodes, the live nodes) of the resource's shard, as ids."""
            nodes = [n for n in v.shards.get(resource, []) if n in v.ids and
                     (n in v.members or n == self.name)]
            live = sorted(v.ids[n] for n in nodes)
            return [i for i in live if i in ready], live

        def program(key: tuple[str, int], slot: int, resource: str, gw=None) -> None:
            owners, live = shard_ids(resource)
            self.fleet.set_shard(slot, owners)
            self._shard_owners[key] = owners
            if gw is not None:
                self._set_blocks(gw, owners, now)
            if me in live:
                targets[key] = [n + 1 for n in live if n != me]
                partners.update(n for n in live if n != me)

        for gw_name, gw in self.gateways().items():
            program(("nat", gw.gw_id), gw.gw_id, cluster.nat_resource(gw_name), gw)
        for lb_name, lb_id in self.lb_ids().items():
            program(("lb", lb_id), lb_slot(self.dp, lb_id), cluster.lb_resource(lb_name))
        self._programmed = (tuple(sorted(self.gateways())), tuple(sorted(self.lb_ids().items())))
        if self._shard_owners != owners_before:
            self._owners_since = now
        peers = {m.id + 1: (m.sync_ip, v.sync_port) for m in v.members.values()
                 if m.id in partners}
        with self.lock:
            self._targets = targets
            self._peer_plan = peers
            self._partners = set(peers)
            self._handover_due = True

    def _set_blocks(self, gw: GatewayBlocks, nodes: list[int], now: float) -> None:
        """This node's port blocks of gw; a block that was a live node's waits hold_down_s
        (that node may not have seen the change yet and still take ports from it)."""
        if not nodes:
            return
        owners = block_owners(nodes, gw.gw_id, gw.n_nat_ips, gw.port_min, gw.port_max,
                              self.view.seed)
        me = self.node_id
        for block, owner in owners.items():
            key = (gw.gw_id, block)
            before = self._block_owner.get(key)
            if owner == me and before is not None and before != me and before in nodes:
                self._held[key] = now + self.config.hold_down_s
            elif owner != me:
                self._held.pop(key, None)
            self._block_owner[key] = owner
        self._block_owners[gw.gw_id] = (gw, owners)
        usable = {b for b, o in owners.items()
                  if o == me and self._held.get((gw.gw_id, b), 0) <= now}
        self.fleet.set_blocks(gw, me, nodes, self.view.seed, usable=usable)

    def _release_held(self, now: float) -> None:
        if any(t <= now for t in self._held.values()):
            for key in [k for k, t in self._held.items() if t <= now]:
                del self._held[key]
            self._program(now)

    # --- sync ----------------------------------------------------------------------------

    def _sync_task(self) -> None:
        cfg = self.config
        while self._peer_plan is None and not self.stop.is_set():   # the first view
            self.heartbeat["sync"] = time.monotonic()
            self.stop.wait(0.01)
        self._set_sync_scheduling()
        sock = self._open_socket()
        node = SyncNode(self.node_id + 1, self.epoch, self.view.keyring,
                        record_size=records.RECORD_SIZE, key_size=records.KEY_SIZE,
                        send=self._send, deliver=self._deliver, on_hello=self._on_hello)
        self._sync = node
        if self._consume_events is None:     # once: a restarted task keeps its subscription
            self.events = self.events or EventHub(self.dp)
            self._consume_events = self.events.subscribe_batches(self._on_batch)
        consume_events = self._consume_events
        self._lb_of_listener = self._listener_lbs()
        next_lbs = time.monotonic() + 1.0
        first = True
        poller = select.poll()          # not select(): an fd may be >= FD_SETSIZE
        poller.register(sock, select.POLLIN)
        # the event ring too: in fleet mode the data path wakes this poll when a flow event
        # arrives and the ring was empty, so replication starts at once, not at the next tick
        poller.register(self.events.fd, select.POLLIN)
        sock_fd = sock.fileno()
        wait = cfg.poll_s
        while not self.stop.is_set():
            now = time.monotonic()
            self.heartbeat["sync"] = now
            with self.lock:
                plan, self._peer_plan = self._peer_plan, None
                keyring = self.view.keyring
            if plan is not None:
                node.set_peers(plan)
            if keyring is not None and keyring is not node.keyring:
                node.keyring = keyring
            if first:   # a (re)started agent's recently active flows go to every peer
                first = False   # once (what its previous process may not have sent)
                self._send_dump(node.peers(), idle_below_ms=int(cfg.refresh_s * 1000) + 1000)
            # 1 ms while there is work, backing off to idle_poll_s when there is none (an
            # idle agent polling at 1 ms costs a fifth of a core)
            ready = poller.poll(int(wait * 1000))
            if any(fd == sock_fd for fd, _ in ready):
                self._receive(sock, node)
                self._install_inbox()
            if ready:
                wait = cfg.poll_s
            else:
                wait = min(wait * 2, cfg.idle_poll_s)
            if consume_events():
                wait = cfg.poll_s
            if self._events:
                self._replicate(node, bytes(self._events))
                self._events.clear()
            now = time.monotonic()
            if now >= next_lbs:
                self._lb_of_listener = self._listener_lbs()
                next_lbs = now + 1.0
            while self._refreshed:
                fresh, swept = self._refreshed.popleft()
                self.counts["refreshed"] += self._queue_by_resource(node, fresh)
                self.counts["swept"] += self._queue_by_resource(node, swept)
            with self.lock:
                due, self._handover_due = self._handover_due, False
            if due:
                self._hand_over(node)
            resync = node.take_resync()
            if resync:
                self._send_dump(resync)
            node.tick(now)
            self._install_inbox()
            node.flush(now)
            self._check_ready(node, now)
            self._sync_stats = node.stats(now)
            self._track_peers(self._sync_stats["peers"], now)

    def _set_sync_scheduling(self) -> None:
        """This thread (the sync task) under SCHED_FIFO at config.sync_rt_priority. Its
        work comes in short bursts, each bounded (one ring read, one receive round of at
        most 1024 datagrams), and the kernel keeps 5 % of every core for others
        (sched_rt_runtime_us). Refused (no CAP_SYS_NICE, a cgroup without a real-time
        budget): logged once, and the task runs with normal scheduling."""
        prio = self.config.sync_rt_priority
        if prio <= 0:
            self.sync_scheduling = "normal"
            return
        try:
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(prio))
            self.sync_scheduling = f"fifo {prio}"
        except OSError as exc:
            if not self.sync_scheduling.startswith("normal ("):
                log.warning("sync task: SCHED_FIFO %d refused (%s): normal scheduling", prio,
                            exc.strerror or exc)
            self.sync_scheduling = f"normal (SCHED_FIFO {prio} refused: {exc.strerror or exc})"

    def _open_socket(self) -> socket.socket:
        if self._sock is None:
            sock = _netns.socket_in(self.netns, socket.AF_INET, socket.SOCK_DGRAM) \
                if self.netns else socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
            sock.bind((self._sync_ip, self.view.sync_port))
            sock.setblocking(False)
            self._sock = sock
        return self._sock

    def _send(self, datagram: bytes, addr) -> None:
        try:
            self._sock.sendto(datagram, addr)
        except OSError as exc:       # a full buffer or a vanished route: the protocol resends
            if exc.errno not in (errno.EAGAIN, errno.ENOBUFS, errno.ENETUNREACH,
                                 errno.EHOSTUNREACH, errno.ECONNREFUSED):
                raise

    def _receive(self, sock: socket.socket, node: SyncNode) -> None:
        for _ in range(1024):
            try:
                data, addr = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionRefusedError:
                continue
            node.on_datagram(data, addr, time.monotonic())

    def _on_batch(self, batch) -> None:
        self.counts["events_read"] += batch.count
        recs, _ = replicated_records(batch)
        self._events += recs

    def _queue_by_resource(self, node: SyncNode, blob: bytes,
                           only: list[int] | None = None) -> int:
        """Queue each record to the other nodes of its resource's shard (only those of
        `only`, sync ids, when given); returns the records queued (once per record)."""
        with self.lock:
            targets = self._targets
        queued = 0
        for resource, group in records.group_by_resource(blob, self._lb_of_listener).items():
            peers = [p for p in targets.get(resource, []) if only is None or p in only]
            if peers:
                n = len(group) // records.RECORD_SIZE
                queued += n
                self.counts["records_sent"] += n * len(peers)
                node.queue(peers, bytes(group))
        return queued

    def _replicate(self, node: SyncNode, blob: bytes) -> None:
        self.counts["events_replicated"] += self._queue_by_resource(node, blob)

    def _send_dump(self, peer_sync_ids: list[int], idle_below_ms: int | None = None) -> None:
        """Every flow of the shards a peer shares with this node (or those that saw a
        packet in the last idle_below_ms), to that peer."""
        if peer_sync_ids:
            blob = records.dump(self.dp, self.node_id, idle_below_ms=idle_below_ms)
            self.counts["dumps_sent"] += self._queue_by_resource(self._sync, blob,
                                                                 only=peer_sync_ids)

    def _refresh_task(self) -> None:
        """Every refresh_s, a refresh round, on a thread of its own: it reads the whole
        flows table (178 ms for a full default one, bench/refresh_bench.py), and on the
        sync task's thread nothing was replicated meanwhile."""
        cfg = self.config
        due = time.monotonic() + cfg.refresh_s
        while not self.stop.is_set():
            now = time.monotonic()
            self.heartbeat["refresh"] = now
            if now < due:
                self.stop.wait(min(1.0, due - now))
                continue
            due = now + cfg.refresh_s
            if self._sync is not None:      # the sync task has its peers (a first view)
                self._refresh()

    def _refresh(self) -> None:
        """One refresh round, from one read of the flows table: the flows that saw a
        packet lately and this round's slice of the idle flows this node owns
        (fleet.sweep), handed to the sync task; and the replicas' prune."""
        from hyperplane.datapath.flows import now_ns
        cfg = self.config
        n_rounds = sweep.rounds(cfg.refresh_s, cfg.sweep_s)
        round_no = self._sweep_round
        self._sweep_round += 1
        prune_after = self._prune_after(time.monotonic()) if self.ready else {}
        nat_ip_idx = self._nat_ip_index() if n_rounds or prune_after else {}
        table = self.dp.table("flows")
        now = now_ns()
        parts, chosen = [], []
        for batch in records.entry_batches(table):
            parts.append(records.records_of_entries(*batch, now, self.node_id))
            if prune_after:
                chosen += self._prune_candidates(table, batch, now, prune_after, round_no,
                                                 n_rounds, nat_ip_idx)
        me = self.node_id
        fresh, swept = sweep.select(
            b"".join(parts), idle_below_ms=int(cfg.refresh_s * 1000) + 1000,
            round_no=round_no, n_rounds=n_rounds,
            owned=lambda rec: self._owner_of(rec, nat_ip_idx) == me)
        self._refreshed.append((fresh, swept))
        if chosen:
            self._prune(table, chosen)

    def _track_peers(self, peers: dict, now: float) -> None:
        """Since when each peer's stream has been up: heard within dead_s, same epoch,
        no gap waiting to be filled (what prune_after trusts)."""
        up = self._peer_up
        for pid, p in peers.items():
            ok = p["member"] and p["alive"] and p["epoch"] and not p["receive_buffered"]
            was = up.get(pid)
            if not ok:
                up.pop(pid, None)
            elif was is None or was[0] != p["epoch"]:
                up[pid] = (p["epoch"], now)

    # Anti-entropy, the replicas' half (fleet.sweep): delete the flows held here for
    # another owner that neither saw a packet nor got a record from it for PRUNE_SWEEPS
    # of its sweep periods: it no longer holds them (it closed them and this node missed
    # the close, or it lost them). Only confirmed flows: the ones owners sweep.

    def _prune_after(self, now: float) -> dict[int, float]:
        """Owner node id -> seconds after which its flows here may go (sweep.prune_after)."""
        with self.lock:
            members = list(self.view.members.values())
        periods = {m.id: float(m.sweep_s) for m in members if m.id != self.node_id}
        up_for = {pid - 1: now - since   # (a copy: the sync task writes it)
                  for pid, (_, since) in dict(self._peer_up).items()}
        return sweep.prune_after(periods, up_for, now - self._owners_since)

    def _prune_candidates(self, table, batch: tuple, now_ns: int, after: dict[int, float],
                          round_no: int, n_rounds: int, nat_ip_idx: dict[bytes, int]) -> list:
        """(key, wait) of the entries of one raw batch (records.entry_batches) to prune.
        The cheap tests first, a column at a time: no packet and no record for the
        shortest wait of any owner (sweep.quiet_s: a stamp counts from its unit's end),
        and in this round's sweep slice, so that the prune costs what the sweep does (a
        flow is looked at once a sweep period of this node's); the owner and its own wait
        only for those."""
        keys, values, n, ks, vs = batch
        seen = records.value_column(values, n, vs, "last_seen_ns", 8)
        synced = records.value_column(values, n, vs, "synced", 4)
        want = round_no % max(n_rounds, 1)
        out = []
        for i in sweep.quiet_rows(seen, synced, now_ns - int(min(after.values()) * 1e9)):
            key, value = keys[i * ks:(i + 1) * ks], values[i * vs:(i + 1) * vs]
            if n_rounds > 1 and sweep.slice_of(key[:records.KEY_SIZE], n_rounds) != want:
                continue
            rec = records.record_of(key, value, now_ns, self.node_id)   # None: a reply entry
            if rec is None:
                continue
            owner = self._owner_of(rec, nat_ip_idx)
            if owner in after and sweep.quiet_s(seen[i], synced[i], now_ns) >= after[owner]:
                out.append((table.Key.from_buffer_copy(key), after[owner]))
        return out

    def _prune(self, table, chosen: list) -> None:
        """Delete the chosen flows (both entries), each read again just before: the sync
        task may have installed a record (or the data path seen a packet) since the
        scan; this leaves microseconds."""
        from hyperplane.datapath.flows import delete_flow_entries, now_ns
        now = now_ns()
        doomed = []
        for k, wait_s in chosen:
            v = table.get(k)
            if v is None or sweep.quiet_s(v.last_seen_ns, v.synced, now) < wait_s:
                continue
            doomed.append((k, v))
            twin = table.Key.from_buffer_copy(bytes(v.twin))
            twin_value = table.get(twin)
            if twin_value is not None:
                doomed.append((twin, twin_value))
        if not doomed:
            return
        removed = len(delete_flow_entries(self.dp, "flows", doomed))
        self.counts["replicas_pruned"] += (removed + 1) // 2
        log.info("pruned %d flows whose owners no longer send them (no record for %d of "
                 "their sweeps)", (removed + 1) // 2, sweep.PRUNE_SWEEPS)

    def _nat_ip_index(self) -> dict[bytes, int]:
        """NAT IP (its 4 bytes) -> its index in its gateway, as the data path holds them."""
        return {bytes(k): int(v.ip_idx) for k, v in self.dp.table("nat_ips").items()}

    def _hand_over(self, node: SyncNode) -> None:
        """After a membership change: every unconfirmed flow here whose owner is now
        another node goes to that node. Unconfirmed flows are not replicated, and the
        answer to one (a SYN-ACK) reaches the flow's owner by second chance: without
        this, a handshake caught by the change would be dropped there until it times out
        (a node joining under traffic)."""
        blob = records.dump(self.dp, self.node_id, tables=("pending",))
        if not blob:
            return
        nat_ip_idx = self._nat_ip_index()
        me = self.node_id
        out: dict[int, bytearray] = {}
        for rec in records.split(blob):
            owner = self._owner_of(rec, nat_ip_idx)
            if owner is not None and owner != me:
                out.setdefault(owner + 1, bytearray()).extend(rec)
        for peer, group in out.items():
            self.counts["handed_over"] += len(group) // records.RECORD_SIZE
            node.queue([peer], bytes(group))

    def _owner_of(self, rec: bytes, nat_ip_idx: dict[bytes, int]) -> int | None:
        """The node that owns a flow's record now: the NAT port's block owner, or the
        client's rendezvous owner over the load balancer's shard."""
        o = records.OFFSETS
        kind = rec[o["kind"]]
        if kind == FlowKind.NAT_OUT:
            ip = rec[o["new_src_ip"]:o["new_src_ip"] + 4]
            port = int.from_bytes(rec[o["new_src_port"]:o["new_src_port"] + 2], "big")
            gw_id = int.from_bytes(rec[o["resource"]:o["resource"] + 2], "little")
            gw, owners = self._block_owners.get(gw_id, (None, {}))
            if gw is None or ip not in nat_ip_idx or not gw.port_min <= port <= gw.port_max:
                return None
            return owners.get((nat_ip_idx[ip],
                               (port - gw.port_min) // block_size(gw.port_min, gw.port_max)))
        lb = self._lb_of_listener.get(int.from_bytes(rec[o["resource"]:o["resource"] + 2],
                                                     "little"))
        nodes = self._shard_owners.get(("lb", lb), [])
        if not nodes:
            return None
        return shard_owner(nodes, socket.inet_ntoa(rec[o["key.src_ip"]:o["key.src_ip"] + 4]),
                           int.from_bytes(rec[o["key.src_port"]:o["key.src_port"] + 2], "big"),
                           rec[o["key.proto"]], self.view.seed)

    def _on_hello(self, peer_sync_id: int) -> None:
        self._send_dump([peer_sync_id])

    def _deliver(self, _peer: int, blob: bytes) -> None:
        """Records in order from a peer: installed after the receive round, all at once
        (one installer run per 64 records instead of one call per datagram)."""
        self._last_delivery = time.monotonic()
        self._inbox += blob
        if not self.ready:            # the copies a joining node pulls (see _reconcile)
            rs, ks = records.RECORD_SIZE, records.KEY_SIZE
            self._synced_keys.update(bytes(blob[i:i + ks]) for i in range(0, len(blob), rs))

    def _install_inbox(self) -> None:
        if not self._inbox:
            return
        blob = bytes(self._inbox)
        self._inbox.clear()
        result = records.install(self.dp, blob)
        for k in ("installed", "merged", "rejected", "conflict", "full", "replaced"):
            self.counts[k] += getattr(result, k)

    def _reconcile(self) -> None:
        """The peers' copies are in. A flow this node holds that none of them sent and
        that saw no packet since this agent started ended elsewhere while this node was
        away (dead, cut off): it goes, or a new connection on its reused tuple would be
        sent with the old translation."""
        from hyperplane.datapath.flows import delete_flow_entries, now_ns
        now = now_ns()
        away_ms = (now - self._started_ns) // 1_000_000
        idle_off = records.OFFSETS["idle_ms"]
        removed = 0
        for name in ("flows", "pending"):
            entries = {bytes(k): (k, v) for k, v in self.dp.table(name).items()}
            doomed = []
            for kb, (k, v) in entries.items():
                rec = records.record_of(kb, bytes(v), now, self.node_id)
                if rec is None or rec[:records.KEY_SIZE] in self._synced_keys:
                    continue
                if int.from_bytes(rec[idle_off:idle_off + 4], "little") < away_ms:
                    continue
                doomed.append((k, v))
                if bytes(v.twin) in entries:
                    doomed.append(entries[bytes(v.twin)])
            removed += len(delete_flow_entries(self.dp, name, doomed))
        self._synced_keys.clear()
        self.counts["stale_removed"] += removed // 2
        if removed:
            log.info("removed %d stale flows (ended elsewhere while this node was away)",
                     removed // 2)

    def _listener_lbs(self) -> dict[int, int]:
        return {int(v.listener_id): int(v.lb_id) for _, v in self.dp.table("listeners").items()}

    def _check_ready(self, node: SyncNode, now: float) -> None:
        if self.ready:
            return
        # Every live node this one shares a shard with (the plan the membership task made,
        # once the sync task has it) has answered our HELLO, so each has sent its copy of
        # our shards' flows; ready once those copies stopped arriving. Until then a node
        # would give out NAT ports of flows it has not heard of.
        peers = node.stats(now)["peers"]
        answered = {pid for pid, p in peers.items()
                    if p["member"] and p["hello_confirmed"] and p["epoch"]}
        with self.lock:
            expected, planned = self._partners, self._peer_plan is None
        greeted = planned and expected is not None and expected <= answered
        if not greeted:
            self._greeted_at = None
        elif self._greeted_at is None:
            self._greeted_at = now
        q = self.config.ready_quiet_s
        quiet = greeted and now - self._greeted_at >= q and now - self._last_delivery >= q
        held = bool(self._held)     # port blocks not usable yet: new flows would fail
        if (quiet and not held) or now - self.started >= self.config.ready_max_s:
            if expected and quiet and not held:   # every copy is in (not the time limit)
                self._reconcile()
            # the copies' flows in this node's own blocks hold no reservation yet (a
            # replica takes none): reserved before others send it new flows
            reserved = self.reserve_own_ports()
            if reserved:
                log.info("reserved the NAT ports of %d flows held in its own blocks", reserved)
            self.ready = True
            log.info("node %s is ready (holds its shards' flows)", self.name)

    def reserve_own_ports(self) -> int:
        """Reserve the NAT port of every flow held here in a block this node takes ports
        from (FleetDataplane.reserve_usable_ports); returns how many were missing. At
        readiness (the peers' copies), and with each garbage collection: a record a
        block's old owner sent before it saw this node take the block over."""
        return sum(self.fleet.reserve_usable_ports(gw)
                   for gw, _ in list(self._block_owners.values()))

    # --- status ---------------------------------------------------------------------------

    def status(self) -> dict:
        with self.lock:
            v = self.view
            members = {n: {"id": m.id, "sync_ip": m.sync_ip, "ready": m.ready}
                       for n, m in sorted(v.members.items())}
            shards = {r: list(m) for r, m in sorted(v.shards.items())}
        c = self.counts
        return {"name": self.name, "node_id": self.node_id, "epoch": self.epoch,
                "ready": self.ready, "error": self.error, "members": members,
                "shards": shards, "sync": _by_node_id(self._sync_stats),
                "records": {k: c[k] for k in ("installed", "merged", "rejected", "conflict",
                                              "full", "replaced")},
                "events": {"read": c["events_read"], "replicated": c["events_replicated"],
                           "records_sent": c["records_sent"], "dumped": c["dumps_sent"],
                           "refreshed": c["refreshed"], "swept": c["swept"],
                           "handed_over": c["handed_over"],
                           "stale_removed": c["stale_removed"],
                           "replicas_pruned": c["replicas_pruned"]},
                "held_blocks": len(self._held), "sync_scheduling": self.sync_scheduling}


def _by_node_id(stats: dict) -> dict:
    """SyncNode's stats with node ids (a sync id is the node id + 1: sync ids start at 1)."""
    if not stats:
        return stats
    return {**stats, "node_id": stats["node_id"] - 1,
            "peers": {pid - 1: p for pid, p in stats.get("peers", {}).items()}}

