#!/usr/bin/env python3
"""Flow replication with the real data path (issue 7 section 8): (a) the lag from a flow's
creation on one node to both its keys installed on a peer, p50/p99 (target p99 < 1 ms);
(b) sustained replicated flows per second, creation to install on the peer; and
records.install alone (records/s per blob size), the likely bottleneck.

Three processes, all inside one network namespace the bench creates (the data path
sandbox of hyperplane.datapath.sandbox: veths that lead nowhere) and deletes at the end,
and two pinned data paths (/run/hyperplane/bpf/bench-repl-<pid>-a and -b, unpinned at the
end):

  gen      node A's traffic: loads A's data path (program + pinned maps) and runs, per
           flow, a client SYN, the server's SYN-ACK and the client's ACK through it with
           BPF_PROG_TEST_RUN (fleet mode off: the ACK confirms the flow and the data path
           emits FLOW_CONFIRMED carrying the 48-byte flow record). Paced (--rates), as
           fast as it can (--flows), or as fast as it can while agent A does not read
           (--drain: the backlog then measures the pipeline alone, from A's release to
           B's last install).
  agent A  node A's agent sync task: opens A's pinned maps (load_program=False, as the
           agent does), reads the event ring in batches (observe.events.EventRing, as
           the agent's EventHub), keeps the records of confirmed flows' CONFIRMED /
           CHANGED / CLOSED events (member.replicated_mask: one record per new TCP
           flow), groups them by resource
           (records.group_by_resource) and queues them to B in a SyncNode over UDP.
  agent B  node B's agent sync task: a SyncNode whose delivered blobs go to
           records.install(dp_b, blob) (bpf/install.h: both keys and the NAT reservation).

The agents' loop is hyperplane/fleet/member.py FleetMember._sync_task's: select() on the
socket and (A) the event ring, which the data path wakes (HP_F_EVENT_WAKEUP, adaptive:
only when the reader had caught up; --no-wakeup: off), with poll_s = 1 ms, up to 1024
datagrams read per round, up to 8 ring reads of 8,192 events, the
read records queued in one blob per round, tick, flush; SyncNode defaults (max_datagram
1400 = 28 records, window 512, plain sendto); install() once per receive round (every
blob delivered in it, as member._install_inbox); SCHED_FIFO at the member's
sync_rt_priority (--rt-priority). Differences from the product: the peers talk over the namespace's
loopback (127.0.0.1), not a sync NIC; the loop also selects on its stdin for the driver's
commands (a wakeup only when a command arrives); no store, membership, refresh or dump
(nothing of them runs per flow); A also keeps (ts_ns, read time, type, key) of each
replicated record, a batch at a time, written to a side file when the phase ends, which is how B learns each flow's creation time; B keeps (blob,
install time) per deliver for the analysis after the phase.

Lag per flow = time.monotonic_ns() right after the install() that held the flow's last
record returned on B, minus time.monotonic_ns() right after the gen's run of the flow's
ACK returned (the run that confirmed it and emitted its event; CLOCK_MONOTONIC is shared
by the processes). The event's own ts_ns is bpf_ktime_get_coarse_ns()
(CLOCK_MONOTONIC_COARSE, one jiffy = 4 ms resolution at HZ=250 here), up to a jiffy
behind: the lag from it (lag_from_event_ts_us) is reported beside, not used. After each phase B checks that every
flow A replicated is in its `flows` table with its twin (both keys), then every process
empties its flow tables. Each process reports its CPU time per flow (getrusage): with
three processes on two cores, the flows/s figure is bounded by whichever is slowest, and
the per-flow CPU cost says what each stage could do on a core of its own.

--refresh-flows N --refresh-mode inline|thread: the agent's refresh round too. The gen
fills A's flows table with N idle NAT flows (installed as records, again after every
clear), and agent A runs a refresh round every --refresh-s (default 1 s; the agent's
default is 10 s): records.dump of the whole table and sweep.select of it (a sixth of the
idle flows, all owned here), as FleetMember._refresh does. inline: on the sync loop's
thread, as before 2026-12-01; thread: on a thread of its own, with the agent's
sys.setswitchinterval (member.SWITCH_INTERVAL_S), as now. The round's records are
counted, not sent: B's expectations count the phase's flows only. So this measures what
the table's read and selection do to the lag, not the cost of sending the records.

    sudo .venv/bin/python bench/replication_bench.py --json bench/results/replication.json
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import json
import os
import platform
import resource
import select
import socket
import statistics
import struct
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, ROOT)

from hyperplane import netns  # noqa: E402

NS = f"hprepl-bench-{os.getpid()}"
PIN_ROOT = "/run/hyperplane/bpf"
A_ID, B_ID = 1, 2                                 # sync ids (member: node id + 1)
PORTS = {A_ID: 7411, B_ID: 7412}
KEY = bytes.fromhex("7e" * 32)
GW_ID = 0
ISN_C, ISN_S = 1000, 5000
LOG_REC = struct.Struct("<QQQ16s")                # A's side log: ts_ns, read ns, type, key


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


# --- control channel: JSON lines on stdin/stdout ---------------------------------------

class Control:
    def __init__(self):
        self.fd = sys.stdin.fileno()
        os.set_blocking(self.fd, False)
        self.buf = b""

    def commands(self) -> list[dict]:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return []
        if not data:
            raise SystemExit(0)            # the driver is gone
        self.buf += data
        out = []
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            if line.strip():
                out.append(json.loads(line))
        return out


def reply(obj: dict) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


# --- gen: node A's traffic -------------------------------------------------------------

def _csum_add(c: int, *words: int) -> int:
    """A checksum c (as in the packet) with 16-bit words added where the template had 0
    (RFC 1624)."""
    s = (~c & 0xFFFF) + sum(words)
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


class Packets:
    """Raw frames from scapy templates; per flow only the ports and the TCP checksum are
    patched (incrementally), a few microseconds of Python per packet."""

    def __init__(self):
        from scapy.layers.inet import IP, TCP
        from scapy.layers.l2 import Ether
        from hyperplane.datapath.sandbox import CLIENT, CLIENT_MAC, INET, INET_MAC, MAC, NAT_IP

        def frame(src_mac, dst_mac, src, dst, flags, seq, ack):
            return bytearray(bytes(Ether(src=src_mac, dst=dst_mac) /
                                   IP(src=src, dst=dst, ttl=64, id=1) /
                                   TCP(sport=0, dport=0, flags=flags, seq=seq, ack=ack,
                                       window=64240)))
        self.syn = frame(CLIENT_MAC, MAC["in0"], CLIENT, INET, "S", ISN_C, 0)
        self.synack = frame(INET_MAC, MAC["out0"], INET, NAT_IP, "SA", ISN_S, ISN_C + 1)
        self.ack = frame(CLIENT_MAC, MAC["in0"], CLIENT, INET, "A", ISN_C + 1, ISN_S + 1)
        self.csum = {id(f): int.from_bytes(f[50:52], "big")
                     for f in (self.syn, self.synack, self.ack)}

    def make(self, f: bytearray, sport: int, dport: int):
        out = bytearray(f)
        out[34:36] = sport.to_bytes(2, "big")
        out[36:38] = dport.to_bytes(2, "big")
        out[50:52] = _csum_add(self.csum[id(f)], sport, dport).to_bytes(2, "big")
        return ctypes.create_string_buffer(bytes(out), len(out))


def run_gen(args) -> None:
    import trkit
    from hyperplane.datapath.loader import Datapath, Sizes
    from hyperplane.datapath.settings import Timeouts, write_config
    from hyperplane.nat.gateway import GatewayConfig, apply_gateway
    from hyperplane.datapath.sandbox import NAT_IP
    from hyperplane.observe.metrics import stat_counts, verdict_counts

    dp = Datapath(Sizes(ringbuf_pages=args.ring_pages, max_flows=args.max_flows), args.pin_a)
    write_config(dp, Timeouts(), hash_seed=0x5EED)
    from hyperplane.datapath.settings import F_EVENT_WAKEUP, set_flags
    if args.wakeup:      # as a fleet member's data path (FleetDataplane.set_identity)
        set_flags(dp, F_EVENT_WAKEUP, True)
    # HP_F_PEER_EVENTS: agent A's EventHub sets it from its subscribers, as on a node
    apply_gateway(dp, GatewayConfig("gw-bench", GW_ID, [NAT_IP], ["10.10.0.0/24"]))
    ifin, ifout = socket.if_nametoindex("in0"), socket.if_nametoindex("out0")
    r_in = trkit.Runner(dp.prog_fd, ifin, "xdp")
    r_out = trkit.Runner(dp.prog_fd, ifout, "xdp")
    pk = Packets()
    redirect = trkit.RET["xdp"]["redirect"]
    ctl = Control()
    from array import array
    done_at = array("Q")

    def fill() -> int:
        """--refresh-flows idle NAT flows in A's table, as a peer's records would leave
        them (to servers of their own, so the gen's flows find their NAT ports free)."""
        if not args.refresh_flows:
            return 0
        from hyperplane.datapath.verdicts import FlowKind, TcpState
        from hyperplane.fleet import records
        from hyperplane.fleet.records import REC_F_CONFIRMED, FlowRecord
        dp.install_fd()
        blob = b"".join(FlowRecord(
            f"10.10.0.{10 + i % 200}", f"198.18.60.{1 + i // 60000}", 1024 + i // 200 % 60000,
            443, 6, NAT_IP, f"198.18.60.{1 + i // 60000}", 1024 + i % 60000, 443,
            FlowKind.NAT_OUT, TcpState.ESTABLISHED, 0, REC_F_CONFIRMED, GW_ID, B_ID, 60_000,
            120_000, 0x1000 + i).pack() for i in range(args.refresh_flows))
        step = 4096 * records.RECORD_SIZE
        return sum(records.install(dp, blob[i:i + step]).installed
                   for i in range(0, len(blob), step))

    filled = fill()
    reply({"ready": True, "pid": os.getpid(), "filler_flows": filled})

    def one_flow(cport: int, dport: int) -> bool:
        r_in.once(pk.make(pk.syn, cport, dport))
        if r_in.retval != redirect:
            return False
        out = r_in.output()
        nat_port = int.from_bytes(out[34:36], "big")
        r_out.once(pk.make(pk.synack, dport, nat_port))
        if r_out.retval != redirect:
            return False
        r_in.once(pk.make(pk.ack, cport, dport))
        # the flow's creation time: the ACK's run (which confirmed it and emitted the
        # event) just returned. The event's own ts_ns is bpf_ktime_get_coarse_ns (jiffy
        # resolution, 4 ms here): too coarse for a sub-millisecond lag.
        done_at.append(dport << 16 | cport)
        done_at.append(time.monotonic_ns())
        return r_in.retval == redirect

    while True:
        select.select([ctl.fd], [], [], 1.0)
        for cmd in ctl.commands():
            if cmd["cmd"] == "quit":
                return
            if cmd["cmd"] == "clear":
                n = sum(trkit.clear_table(dp.table(t)) for t in ("flows", "pending", "nat_resv"))
                reply({"cleared": n, "filler_flows": fill()})
                continue
            # a phase: count flows at rate (None: as fast as possible), within limit_s
            count, rate, limit = cmd["count"], cmd.get("rate"), cmd["limit_s"]
            base = cmd["dport_base"]
            s0, v0 = stat_counts(dp), verdict_counts(dp)
            del done_at[:]
            c0 = cpu_s()
            made = failed = 0
            t0 = time.monotonic()
            deadline = t0 + limit
            i = 0
            while i < count:
                now = time.monotonic()
                if now >= deadline:
                    break
                if rate is not None:
                    due = int((now - t0) * rate) + 1
                    if i >= due:
                        time.sleep(min(0.0005, (i - due + 1) / rate))
                        continue
                    stop = min(count, due)
                else:
                    stop = min(count, i + 256)
                while i < stop:
                    if one_flow(1024 + i % 64000, base + i // 64000):
                        made += 1
                    else:
                        failed += 1
                    i += 1
            secs = time.monotonic() - t0
            s1, v1 = stat_counts(dp), verdict_counts(dp)
            with open(cmd["log"], "wb") as f:
                f.write(done_at.tobytes())
            reply({"attempted": i, "confirmed_ok": made, "failed": failed, "seconds": secs,
                   "flows_per_s": i / secs if secs else 0, "cpu_s": cpu_s() - c0,
                   "stats": trkit.delta(s1, s0), "verdicts": trkit.delta(v1, v0)})


# --- the agents ------------------------------------------------------------------------

def open_socket(me: int) -> socket.socket:
    # as member._open_socket: 8 MB buffers asked with SO_RCVBUF / SO_SNDBUF
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    sock.bind(("127.0.0.1", PORTS[me]))
    sock.setblocking(False)
    return sock


def run_agent(args) -> None:
    import errno
    from hyperplane.datapath.loader import Datapath, Sizes
    from hyperplane.fleet import records
    from hyperplane.fleet.member import replicated
    from hyperplane.fleet.sync import SyncNode
    from hyperplane.fleet.wire import Keyring
    from hyperplane.observe.events import REC_OFFSET

    from hyperplane.datapath.verdicts import FlowEventType
    assert int(FlowEventType.FLOW_CONFIRMED) == CONFIRMED
    me = A_ID if args.role == "agent-a" else B_ID
    from hyperplane.fleet.member import FleetConfig
    # as member._set_sync_scheduling (the agent's sync task is this process's loop here)
    priority = FleetConfig().sync_rt_priority if args.rt_priority is None else args.rt_priority
    if priority:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(priority))
    peer = B_ID if me == A_ID else A_ID
    pin = args.pin_a if me == A_ID else args.pin_b
    dp = Datapath(Sizes(ringbuf_pages=args.ring_pages, max_flows=args.max_flows), pin,
                  load_program=False)  # as the agent
    if me == B_ID:
        # node B's own configuration (node up would have written it): the gateway, so
        # the installer knows the NAT IP
        from hyperplane.datapath.settings import Timeouts, write_config
        from hyperplane.nat.gateway import GatewayConfig, apply_gateway
        from hyperplane.datapath.sandbox import NAT_IP
        write_config(dp, Timeouts(), hash_seed=0x5EED)
        apply_gateway(dp, GatewayConfig("gw-bench", GW_ID, [NAT_IP], ["10.10.0.0/24"]))
        dp.install_fd()
    sock = open_socket(me)
    ctl = Control()
    poll_s = args.poll_s
    events = bytearray()
    delivered: list[tuple[bytes, int, int]] = []   # B: (blob, ns after install, ns before)
    monotonic_ns = time.monotonic_ns
    counts = {"events_read": 0, "events_replicated": 0, "installed": 0, "merged": 0,
              "rejected": 0, "conflict": 0, "full": 0, "install_calls": 0,
              "install_records": 0}
    by_type: dict[int, int] = {}

    def send(datagram: bytes, addr) -> None:
        try:
            sock.sendto(datagram, addr)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ENOBUFS, errno.ENETUNREACH,
                                 errno.EHOSTUNREACH, errno.ECONNREFUSED):
                raise

    inbox = bytearray()

    def deliver(_peer: int, blob: bytes) -> None:     # member._deliver
        inbox.extend(blob)

    def install_inbox() -> None:                      # member._install_inbox
        if not inbox:
            return
        blob = bytes(inbox)
        inbox.clear()
        t0 = monotonic_ns()
        res = records.install(dp, blob)
        delivered.append((blob, monotonic_ns(), t0))
        counts["install_calls"] += 1
        counts["install_records"] += len(blob) // records.RECORD_SIZE
        for k in ("installed", "merged", "rejected", "conflict", "full"):
            counts[k] += getattr(res, k)

    node = SyncNode(me, time.time_ns(), Keyring({1: KEY}, 1),
                    record_size=records.RECORD_SIZE, key_size=records.KEY_SIZE,
                    send=send, deliver=deliver)
    node.set_peers({peer: ("127.0.0.1", PORTS[peer])})
    targets = {("nat", GW_ID): [peer]}

    if me == A_ID:
        # the agent's EventHub driving member._on_batch, plus the side log of (event ts,
        # read ns, type, key), kept a batch at a time and laid out per record only when a
        # phase is collected (outside the measured CPU time)
        from collections import Counter
        from hyperplane.fleet.member import replicated_mask
        from hyperplane.observe.events import EventHub, EventRing
        event_ring = EventRing(dp, mapped=False if args.libbpf_reader else None)
        hub = EventHub(dp, ring_reader=event_ring)
        if args.all_events:       # a follower of every event: the data path writes them all
            hub.subscribe_events(lambda raw: None)
        side_batches: list[tuple[int, bytes, bytes, bytes]] = []

        def on_batch(batch) -> None:               # member._on_batch
            counts["events_read"] += batch.count
            by_type.update(batch.column(0))
            keep, kept = replicated_mask(batch)
            if kept:
                events.extend(batch.fields(REC_OFFSET, records.RECORD_SIZE, keep))
                side_batches.append((monotonic_ns(), batch.fields(8, 8, keep),
                                     batch.fields(0, 1, keep),
                                     batch.fields(REC_OFFSET, 16, keep)))

        read_events = hub.subscribe_batches(on_batch)    # EventHub.consume

        def side_log() -> bytes:
            out = bytearray()
            for read_ns, ts, types, keys in side_batches:
                for i, etype in enumerate(types):
                    out += LOG_REC.pack(int.from_bytes(ts[i * 8:i * 8 + 8], "little"),
                                        read_ns, etype, keys[i * 16:i * 16 + 16])
            side_batches.clear()
            return bytes(out)

        # the member polls the ring's fd too: the data path wakes it (HP_F_EVENT_WAKEUP)
        ring_fd = event_ring.fd
        by_type = Counter()
    holding = False          # A: not reading the ring (the drain phase's backlog builds)
    released_ns = 0

    # the agent's refresh round (FleetMember._refresh): read the whole table, select
    refreshed: list = []     # (records refreshed, swept, seconds) per round
    refresh_state = {"round": 0}
    if me == A_ID and args.refresh_mode != "off":
        from hyperplane.datapath.pinned import PinnedNode
        node_maps = PinnedNode(pin)      # the agent's view of its maps (open_node)

    def refresh_round() -> None:
        from hyperplane.fleet import sweep
        t0 = time.perf_counter()
        blob = records.dump(node_maps, A_ID)
        n_rounds = sweep.rounds(1.0, 6.0)
        fresh, swept = sweep.select(blob, idle_below_ms=11_000,
                                    round_no=refresh_state["round"], n_rounds=n_rounds,
                                    owned=lambda rec: True)
        refresh_state["round"] += 1
        refreshed.append((len(fresh) // records.RECORD_SIZE,
                          len(swept) // records.RECORD_SIZE, time.perf_counter() - t0))

    next_refresh = time.monotonic() + args.refresh_s
    if me == A_ID and args.refresh_mode == "thread":
        import threading
        from hyperplane.fleet.member import SWITCH_INTERVAL_S
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))

        def refresh_task() -> None:
            while True:
                time.sleep(args.refresh_s)
                refresh_round()

        threading.Thread(target=refresh_task, daemon=True).start()

    def replicate(blob: bytes) -> None:          # member._replicate
        for res, group in records.group_by_resource(blob, {}).items():
            peers = targets.get(res)
            if peers:
                counts["events_replicated"] += len(group) // records.RECORD_SIZE
                node.queue(peers, bytes(group))

    def receive() -> None:                       # member._receive
        for _ in range(1024):
            try:
                data, addr = sock.recvfrom(65535)
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionRefusedError:
                continue
            node.on_datagram(data, addr, time.monotonic())

    waiting: dict | None = None
    mark = {"cpu": cpu_s(), "events_replicated": 0, "install_records": 0, "by_type": {}}
    ready_sent = False
    hard_stop = time.monotonic() + args.agent_limit_s
    while time.monotonic() < hard_stop:
        reading = me == A_ID and not holding
        readable, _, _ = select.select([sock, ctl.fd] + ([ring_fd] if reading else []),
                                       [], [], poll_s)
        if sock in readable:
            receive()
            install_inbox()
        if reading:
            read_events()
            if events:
                replicate(bytes(events))
                events.clear()
        now = time.monotonic()
        if me == A_ID and args.refresh_mode == "inline" and now >= next_refresh:
            next_refresh = now + args.refresh_s
            refresh_round()
            now = time.monotonic()
        node.tick(now)
        install_inbox()
        node.flush(now)
        if not ready_sent:
            st = node.stats(now)["peers"][peer]
            if st["epoch"] and st["hello_confirmed"]:
                reply({"ready": True, "pid": os.getpid()})
                ready_sent = True
        if ctl.fd in readable:
            for cmd in ctl.commands():
                if cmd["cmd"] == "quit":
                    s = node.stats(now)
                    reply({"stats": {k: v for k, v in s.items() if isinstance(v, int) and v},
                           "rejected": {k: v for k, v in s["rejected"].items() if v}})
                    return
                if cmd["cmd"] == "install_bench":
                    reply(install_bench(dp, records, cmd, last_blobs))
                    continue
                if cmd["cmd"] in ("hold", "release"):     # A: the drain phase
                    holding = cmd["cmd"] == "hold"
                    released_ns = 0 if holding else monotonic_ns()
                    reply({"holding": holding, "pending_bytes": event_ring.pending_bytes()})
                    continue
                waiting = dict(cmd, deadline=time.monotonic() + cmd["timeout_s"])
        if waiting is not None:
            # collect: A when it has replicated `expect` records and B acked them all;
            # B when it has installed `expect` records (or the deadline passed)
            if me == A_ID:
                done = counts["events_replicated"] - mark["events_replicated"] >= \
                    waiting["expect"] and node.backlog(peer) == 0
            else:
                done = counts["install_records"] - mark["install_records"] >= waiting["expect"]
            if done or time.monotonic() >= waiting["deadline"]:
                out = {"complete": bool(done), "cpu_s": cpu_s() - mark["cpu"]}
                if me == A_ID:
                    log_bytes = side_log()
                    with open(waiting["log"], "wb") as f:
                        f.write(log_bytes)
                    out["records"] = len(log_bytes) // LOG_REC.size
                    out["events_by_type"] = {str(k): v - mark["by_type"].get(k, 0)
                                             for k, v in by_type.items()}
                    out["released_ns"] = released_ns
                    out["mapped_reader"] = event_ring.mapped
                    if args.refresh_mode != "off":
                        rounds_done, refreshed[:] = list(refreshed), []
                        out["refresh"] = {
                            "mode": args.refresh_mode, "rounds": len(rounds_done),
                            "records_per_round": max((r[0] + r[1] for r in rounds_done),
                                                     default=0),
                            "seconds": [round(r[2], 4) for r in rounds_done]}
                else:
                    out.update(analyse_b(dp, records, delivered, waiting["log"]))
                    last_blobs[:] = [d[0] for d in delivered]
                    delivered.clear()
                    import trkit
                    out["cleared"] = sum(trkit.clear_table(dp.table(t))
                                         for t in ("flows", "pending", "nat_resv"))
                out["counts"] = dict(counts)
                mark = {"cpu": cpu_s(), "events_replicated": counts["events_replicated"],
                        "install_records": counts["install_records"], "by_type": dict(by_type)}
                waiting = None
                reply(out)


last_blobs: list[bytes] = []


CONFIRMED = 4       # FlowEventType.FLOW_CONFIRMED (checked against the enum in the agent)


def pct(sorted_vals: list[int], q: float) -> float:
    return sorted_vals[min(len(sorted_vals) - 1, int(len(sorted_vals) * q))]


def analyse_b(dp, records, delivered, log_path: str) -> dict:
    """Lag per flow and both keys on B, against A's side log."""
    RS = records.RECORD_SIZE
    created: dict[bytes, int] = {}
    read_at: dict[bytes, int] = {}
    with open(log_path, "rb") as f:
        data = f.read()
    confirmed: set[bytes] = set()
    for ts, rd, etype, key in LOG_REC.iter_unpack(data):
        created[key] = ts                       # the last event of the key counts
        read_at[key] = rd
        if etype == CONFIRMED:
            confirmed.add(key)
    installed_at: dict[bytes, int] = {}
    started_at: dict[bytes, int] = {}
    for blob, t, t0 in delivered:
        for i in range(0, len(blob), RS):
            installed_at[blob[i:i + 16]] = t
            started_at[blob[i:i + 16]] = t0
    # the gen's precise creation times, by (dst port, client port)
    from array import array
    g = array("Q")
    with open(log_path + ".gen", "rb") as f:
        g.frombytes(f.read())
    made = dict(zip(g[0::2], g[1::2]))
    sp, dpo = records.OFFSETS["key.src_port"], records.OFFSETS["key.dst_port"]

    def made_at(k: bytes) -> int:
        return made[int.from_bytes(k[dpo:dpo + 2], "big") << 16 |
                    int.from_bytes(k[sp:sp + 2], "big")]
    have = [k for k in created if k in installed_at]
    lags = sorted(installed_at[k] - made_at(k) for k in have)
    coarse = sorted(installed_at[k] - created[k] for k in have)
    # stages: created -> A read its event (ring poll), A read -> B install() starts
    # (sync: queue, flush, UDP, B's receive; and waiting behind earlier installs),
    # install() itself
    stages = {"ring_wait": sorted(read_at[k] - made_at(k) for k in have),
              "sync_and_queue": sorted(started_at[k] - read_at[k] for k in have),
              "install_call": sorted(installed_at[k] - started_at[k] for k in have)}
    missing = sum(1 for k in created if k not in installed_at)
    # both keys: the original key in `flows`, its twin there too and naming it back (for
    # every flow whose CONFIRMED record A read; a flow whose CONFIRMED event was lost
    # (ring full: EVENT_LOST) has only its unconfirmed copy, in `pending`)
    table = dp.table("flows")
    entries = {bytes(k): v for k, v in table.items()}
    pending = {bytes(k) for k in dp.table("pending").keys()}
    both = 0
    for k in confirmed:
        v = entries.get(k)
        if v is None:
            continue
        tw = entries.get(bytes(v.twin))
        if tw is not None and bytes(tw.twin) == k:
            both += 1
    out = {"flows": len(created), "received": len(installed_at), "missing": missing,
           "confirmed_read_on_a": len(confirmed), "both_keys": both,
           "flows_table_entries": len(entries),
           "unconfirmed_only_in_pending": sum(1 for k in created
                                              if k not in confirmed and k in pending)}
    if lags and delivered:
        first = min(made.values())
        last = delivered[-1][1]
        out.update({"lag_us": {"p50": pct(lags, 0.5) / 1e3, "p90": pct(lags, 0.9) / 1e3,
                               "p99": pct(lags, 0.99) / 1e3, "max": lags[-1] / 1e3,
                               "mean": statistics.fmean(lags) / 1e3},
                    "lag_from_event_ts_us": {"p50": pct(coarse, 0.5) / 1e3,
                                             "p99": pct(coarse, 0.99) / 1e3},
                    "stages_us": {n: {"p50": pct(v, 0.5) / 1e3, "p99": pct(v, 0.99) / 1e3}
                                  for n, v in stages.items()},
                    "span_s": (last - first) / 1e9,
                    "first_install_ns": delivered[0][2], "last_install_ns": last,
                    "flows_per_s": len(installed_at) / ((last - first) / 1e9),
                    "install_calls": len(delivered),
                    "records_per_install": sum(len(d[0]) for d in delivered) / RS /
                    len(delivered)})
    return out


def install_bench(dp, records, cmd: dict, blobs: list[bytes]) -> dict:
    """records.install alone on B's data path: the last phase's real records, in blobs of
    each size; new flows (tables emptied before each size) and, again, the same records
    into the flows now held: merged, except those replayed more than HP_NSEC (1 s) after
    their first install, which the installer takes for a newer flow on a reused tuple
    (their age_ms says so) and installs in place of the held one ("replaced")."""
    import trkit
    RS = records.RECORD_SIZE
    allrec = b"".join(blobs)
    n = min(len(allrec) // RS, cmd["records"])
    allrec = allrec[:n * RS]
    out = {"records": n, "sizes": {}}
    for size in cmd["sizes"]:
        res = {}
        for mode in ("new", "again"):
            if mode == "new":
                for t in ("flows", "pending", "nat_resv"):
                    trkit.clear_table(dp.table(t))
            step = size * RS
            parts = [allrec[i:i + step] for i in range(0, len(allrec), step)]
            got = records.InstallResult()
            t0 = time.perf_counter()
            for p in parts:
                r = records.install(dp, p)
                got.installed += r.installed
                got.merged += r.merged
                got.rejected += r.rejected + r.conflict + r.full
            secs = time.perf_counter() - t0
            res[mode] = {"records_per_s": n / secs, "us_per_call": secs / len(parts) * 1e6,
                         "installed": got.installed, "merged": got.merged,
                         "other": got.rejected}
        out["sizes"][str(size)] = res
    for t in ("flows", "pending", "nat_resv"):
        trkit.clear_table(dp.table(t))
    return out


# --- the driver (root namespace) ---------------------------------------------------------

class Proc:
    def __init__(self, name: str, argv: list[str]):
        env = dict(os.environ, PYTHONPATH=ROOT)
        self.name = name
        self.p = netns.popen_in(NS, argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                env=env)
        self.buf = b""

    def send(self, obj: dict) -> None:
        self.p.stdin.write((json.dumps(obj) + "\n").encode())
        self.p.stdin.flush()

    def read(self, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        fd = self.p.stdout.fileno()
        while b"\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"{self.name}: no answer within {timeout:.0f} s")
            r, _, _ = select.select([fd], [], [], min(left, 1.0))
            if r:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise RuntimeError(f"{self.name} exited (rc {self.p.wait()})")
                self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return json.loads(line)

    def ask(self, obj: dict, timeout: float) -> dict:
        self.send(obj)
        return self.read(timeout)

    def stop(self) -> None:
        if self.p.poll() is None:
            try:
                self.send({"cmd": "quit"})
                self.p.wait(timeout=10)
            except Exception:  # noqa: BLE001
                pass
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


def phase(gen: Proc, a: Proc, b: Proc, name: str, count: int, rate: float | None,
          limit_s: float, base: int, workdir: str, drain: bool = False) -> dict:
    """One phase: the gen makes `count` flows (at `rate`, or as fast as it can) while the
    agents replicate them. drain: agent A holds off reading the ring until the gen is
    done, then reads the backlog: the pipeline (ring read, sync, install on B) measured
    alone, from A's release to B's last install."""
    log = os.path.join(workdir, f"{name}.log")
    gen.ask({"cmd": "clear"}, 120)
    held = a.ask({"cmd": "hold"}, 30) if drain else None
    g = gen.ask({"cmd": "phase", "count": count, "rate": rate, "limit_s": limit_s,
                 "dport_base": base, "log": log + ".gen"}, limit_s + 60)
    if drain:
        held = a.ask({"cmd": "release"}, 30)
    ra = a.ask({"cmd": "collect", "expect": g["confirmed_ok"], "timeout_s": 30, "log": log},
               60)
    rb = b.ask({"cmd": "collect", "expect": ra["records"], "timeout_s": 30, "log": log}, 180)
    os.unlink(log)
    os.unlink(log + ".gen")
    res = {"name": name, "rate_asked": rate, "count_asked": count, "gen": g, "agent_a": ra,
           "agent_b": rb}
    n = max(rb.get("received", 0), 1)
    res["cpu_us_per_flow"] = {"gen": g["cpu_s"] / max(g["attempted"], 1) * 1e6,
                              "agent_a": ra["cpu_s"] / n * 1e6,
                              "agent_b": rb["cpu_s"] / n * 1e6}
    if drain and rb.get("last_install_ns"):
        span = (rb["last_install_ns"] - ra["released_ns"]) / 1e9
        res["pipeline"] = {"backlog_bytes": held["pending_bytes"], "span_s": span,
                           "flows_per_s": rb["received"] / span if span > 0 else None}
    return res


def show(res: dict) -> None:
    g, b = res["gen"], res["agent_b"]
    lag = b.get("lag_us", {})
    print(f"\n{res['name']}: gen {g['attempted']:,} flows at {g['flows_per_s']:,.0f}/s "
          f"(failed {g['failed']}, event lost {g['stats'].get('EVENT_LOST', 0)}); "
          f"B received {b['received']:,}/{b['flows']:,} replicated, both keys "
          f"{b['both_keys']:,}/{b['confirmed_read_on_a']:,} confirmed, missing {b['missing']}")
    if lag:
        print(f"  lag us p50 {lag['p50']:,.0f}  p90 {lag['p90']:,.0f}  p99 {lag['p99']:,.0f}  "
              f"max {lag['max']:,.0f}; installed on B {b['flows_per_s']:,.0f} flows/s over "
              f"{b['span_s']:.2f} s; {b['records_per_install']:.1f} records per install()")
        print("  stages us p50/p99: " + ", ".join(f"{n} {v['p50']:,.0f}/{v['p99']:,.0f}"
                                                  for n, v in b["stages_us"].items()))
    print(f"  CPU us per flow: {', '.join(f'{k} {v:.1f}' for k, v in res['cpu_us_per_flow'].items())}")
    if res.get("pipeline"):
        p = res["pipeline"]
        backlog = "" if p["backlog_bytes"] is None else f" of {p['backlog_bytes']:,} bytes"
        print(f"  pipeline alone (A released a backlog{backlog}): "
              f"{b['received']:,} flows in {p['span_s'] * 1e3:,.1f} ms = "
              f"{p['flows_per_s']:,.0f} flows/s (the lag above includes the hold)")
    rf = res["agent_a"].get("refresh")
    if rf:
        secs = rf["seconds"]
        print(f"  A's refresh ({rf['mode']}): {rf['rounds']} rounds, "
              f"{(sorted(secs)[len(secs) // 2] if secs else 0) * 1000:.1f} ms median, "
              f"{max(secs, default=0) * 1000:.1f} ms max, up to {rf['records_per_round']:,} "
              f"records a round")
    print(f"  A events by type {res['agent_a']['events_by_type']}; B counts "
          f"{ {k: v for k, v in b['counts'].items() if v} }")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rates", type=float, nargs="*", default=[2000, 20000],
                    help="paced phases: flows/s")
    ap.add_argument("--paced-s", type=float, default=5.0, help="seconds per paced phase")
    ap.add_argument("--flows", type=int, default=100_000,
                    help="flows of the as-fast-as-possible phase (0: none)")
    ap.add_argument("--drain", type=int, default=100_000,
                    help="flows of the drain phase (0: none): made while agent A holds off "
                         "reading, then replicated from the ring's backlog (the pipeline alone)")
    ap.add_argument("--ring-pages", type=int, default=4096,
                    help="the event ring's size in pages (the drain's backlog must fit: "
                         "~112 bytes a flow)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--limit-s", type=float, default=120.0, help="most seconds per phase")
    ap.add_argument("--install-sizes", type=int, nargs="*",
                    default=[28, 64, 256, 1024, 4096])
    ap.add_argument("--poll-s", type=float, default=0.001,
                    help="the agents' select timeout (member FleetConfig.poll_s)")
    ap.add_argument("--no-wakeup", dest="wakeup", action="store_false",
                    help="the data path does not wake the reader (the agent finds events "
                         "only at its next poll_s tick; before 2026-11-30 it was so)")
    ap.add_argument("--libbpf-reader", action="store_true",
                    help="agent A reads the ring through libbpf's reader (one callback per "
                         "event, the reader before 2026-11-30 evening) instead of mapping it")
    ap.add_argument("--all-events", action="store_true",
                    help="agent A's event hub also has a follower of every event (which "
                         "does nothing with them), so the data path writes an unconfirmed "
                         "flow's events too; default: as a fleet member alone "
                         "(HP_F_PEER_EVENTS), one event per new flow")
    ap.add_argument("--rt-priority", type=int, default=None, metavar="0-99",
                    help="the agents' SCHED_FIFO priority (member FleetConfig."
                         "sync_rt_priority, whose default this is; 0: normal scheduling)")
    ap.add_argument("--max-flows", type=int, default=262144,
                    help="flow table entries (2 a flow) on both nodes (the default's)")
    ap.add_argument("--refresh-flows", type=int, default=0, metavar="N",
                    help="idle flows in A's table for the refresh round (0: none)")
    ap.add_argument("--refresh-mode", choices=["off", "inline", "thread"], default="off",
                    help="agent A's refresh round: none, on the sync loop's thread, or on "
                         "a thread of its own")
    ap.add_argument("--refresh-s", type=float, default=1.0,
                    help="seconds between refresh rounds (the agent's default: 10)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--role", choices=["gen", "agent-a", "agent-b"], help=argparse.SUPPRESS)
    ap.add_argument("--pin-a", help=argparse.SUPPRESS)
    ap.add_argument("--pin-b", help=argparse.SUPPRESS)
    ap.add_argument("--agent-limit-s", type=float, default=3600, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role == "gen":
        return run_gen(args)
    if args.role:
        return run_agent(args)
    if os.geteuid() != 0:
        raise SystemExit("run as root: the bench loads BPF programs and creates a namespace")

    import trkit
    from hyperplane.datapath import sandbox
    from hyperplane.datapath.loader import remove_pins
    trkit.sigterm_unwinds()
    meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(["sudo", ".venv/bin/python", "bench/replication_bench.py",
                                 *sys.argv[1:]]),
            **trkit.machine(), **trkit.git_meta(["bench", "bpf", "hyperplane"]),
            "uptime": subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()}
    pins = [f"{PIN_ROOT}/bench-repl-{os.getpid()}-{x}" for x in "ab"]
    workdir = f"/tmp/hprepl-{os.getpid()}"
    os.makedirs(workdir, exist_ok=True)
    procs: list[Proc] = []
    results: dict = {"meta": meta, "phases": [], "install_alone": None}
    total_limit = time.monotonic() + 1800
    try:
        netns.remove(NS)
        sandbox.build(NS)
        base = [sys.executable, os.path.abspath(__file__), "--pin-a", pins[0], "--pin-b",
                pins[1], "--poll-s", str(args.poll_s), "--ring-pages", str(args.ring_pages),
                *([] if args.wakeup else ["--no-wakeup"]),
                *(["--all-events"] if args.all_events else []),
                *(["--libbpf-reader"] if args.libbpf_reader else []),
                *([] if args.rt_priority is None else ["--rt-priority", str(args.rt_priority)]),
                "--refresh-flows", str(args.refresh_flows), "--refresh-mode", args.refresh_mode,
                "--refresh-s", str(args.refresh_s), "--max-flows", str(args.max_flows)]
        gen = Proc("gen", base + ["--role", "gen"])
        procs.append(gen)
        print("gen:", gen.read(300))                       # compiles, creates A's pins
        b = Proc("agent-b", base + ["--role", "agent-b"])
        procs.append(b)
        a = Proc("agent-a", base + ["--role", "agent-a"])
        procs.append(a)
        print("agent A:", a.read(300), "agent B:", b.read(300))
        port_base = 10000
        for rnd in range(args.rounds):
            plan = [(f"paced-{int(r)}", int(r * args.paced_s), r) for r in args.rates]
            if args.flows:
                plan.append(("max", args.flows, None))
            if args.drain:
                plan.append(("drain", args.drain, None))
            for name, count, rate in plan:
                if time.monotonic() > total_limit:
                    break
                res = phase(gen, a, b, name, count, rate, args.limit_s, port_base, workdir,
                            drain=name == "drain")
                port_base += 10
                res["round"] = rnd
                results["phases"].append(res)
                show(res)
        if args.install_sizes and args.flows:
            ib = b.ask({"cmd": "install_bench", "sizes": args.install_sizes,
                        "records": args.flows}, 600)
            results["install_alone"] = ib
            print(f"\ninstall() alone, {ib['records']:,} real records")
            for size, r in ib["sizes"].items():
                print(f"  blob {size:>5} records: new {r['new']['records_per_s']:,.0f}/s "
                      f"({r['new']['us_per_call']:,.0f} us/call, installed "
                      f"{r['new']['installed']:,}); again {r['again']['records_per_s']:,.0f}/s "
                      f"(merged {r['again']['merged']:,}, replaced {r['again']['installed']:,})")
        for p in (a, b):
            p.send({"cmd": "quit"})
            results[f"{p.name}_final"] = p.read(30)
    finally:
        for p in procs:
            p.stop()
        netns.remove(NS)
        for pin in pins:
            remove_pins(pin)
        for f in os.listdir(workdir):
            os.unlink(os.path.join(workdir, f))
        os.rmdir(workdir)
    meta["loadavg_at_end"] = os.getloadavg()
    meta["cleanup"] = {"namespace_removed": NS not in netns.list_namespaces(),
                       "pins_removed": not any(os.path.exists(p) for p in pins)}
    print(f"\nmachine: {meta['cpus']} cores, {meta['cpu_model']}, kernel {meta['kernel']}; "
          f"load before {meta['loadavg_at_start'][0]:.2f}, after {meta['loadavg_at_end'][0]:.2f};"
          f" cleanup {meta['cleanup']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
