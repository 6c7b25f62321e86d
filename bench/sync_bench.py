#!/usr/bin/env python3
"""The flow-sync pipeline alone (issue 7 section 8: "sustained replicated flows per second
with batching ... with the sync pipeline alone": target >= 500,000 flows/s per node).

A sender node and a receiver node (hyperplane.fleet.sync.SyncNode), each in its own
process, talk UDP over the loopback of a network namespace the bench creates and deletes
(nothing leaves it). Two processes, not threads: the GIL would serialise the two nodes and
measure one core; the machine has two, and a real node's sender and its peer's receiver
run on different machines.

Records are 48 bytes (the data path's portable flow record): an 8-byte flow number, 8 zero
bytes (the 16-byte key), the queue time (CLOCK_MONOTONIC ns, shared by the processes), and
24 filler bytes. Per max_datagram (--max-datagram, default 1400 and 8900):

  throughput  the sender queues --records records (unique keys, batches of --batch) as
              fast as the window lets it, with at most --inflight records queued and not
              acked; records/s = records / (last deliver - first queue). Latency here is
              queue() -> deliver() under saturation: mostly the wait behind earlier records.
  paced       --paced-rate records/s in small batches (--paced-batch) for --paced-s
              seconds: the pipeline's own latency, queue() -> deliver(), p50/p99/max.

The receiver checks every record arrived exactly once, in queue order. With --profile each
role runs under cProfile and its top functions are printed. Run as root:

    sudo .venv/bin/python bench/sync_bench.py
    sudo .venv/bin/python bench/sync_bench.py --records 500000 --max-datagram 1400 --profile
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import platform
import pstats
import select
import socket
import statistics
import subprocess
import sys
import time
from array import array

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from hyperplane import netns  # noqa: E402
from hyperplane.fleet.sync import SyncNode  # noqa: E402
from hyperplane.fleet.wire import Keyring, max_records  # noqa: E402

RECORD_SIZE, KEY_SIZE = 48, 16
WORDS = RECORD_SIZE // 8            # a record is 6 native u64: flow, 0, ts, 0, 0, 0
SENDER, RECEIVER = 1, 2
PORTS = {SENDER: 7402, RECEIVER: 7401}
KEY = bytes.fromhex("5e" * 32)
SOCKBUF = 8 << 20
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33      # Linux; Python's socket module lacks them
UDP_SEGMENT, UDP_GRO = 103, 104               # linux/udp.h
GSO_MAX_SEGMENTS, GSO_MAX_BYTES = 64, 65000   # per sendmsg (UDP_MAX_SEGMENTS, 64 KB)


# --- the two roles (each in its own process inside the namespace) ------------------------

def make_node(me: int, sock: socket.socket, deliver, max_datagram: int, window: int,
              gso: bool) -> SyncNode:
    def send(datagram: bytes, addr) -> None:
        sock.sendto(datagram, addr)

    def send_many(datagrams: list[bytes], addr) -> None:
        # UDP GSO: one sendmsg carries up to 64 datagrams of one size (the last may be
        # shorter); the kernel cuts them apart. flush() guarantees that shape.
        size = len(datagrams[0])
        per = max(1, min(GSO_MAX_SEGMENTS, GSO_MAX_BYTES // size))
        cmsg = [(socket.SOL_UDP, UDP_SEGMENT, size.to_bytes(2, sys.byteorder))]
        for i in range(0, len(datagrams), per):
            group = datagrams[i:i + per]
            if len(group) == 1 or any(len(d) != size for d in group[:-1]):
                for d in group:
                    sock.sendto(d, addr)
            else:
                sock.sendmsg([b"".join(group)], cmsg, 0, addr)

    node = SyncNode(me, time.time_ns(), Keyring({1: KEY}, 1), record_size=RECORD_SIZE,
                    key_size=KEY_SIZE, max_datagram=max_datagram, send=send,
                    send_many=send_many if gso else None,
                    deliver=deliver, window=window, max_pending=1 << 22)
    node.set_peers({SENDER: ("127.0.0.1", PORTS[SENDER]),
                    RECEIVER: ("127.0.0.1", PORTS[RECEIVER])})
    return node


def udp_socket(me: int, gso: bool) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for opt in (SO_RCVBUFFORCE, SO_SNDBUFFORCE):     # above rmem_max: root
        s.setsockopt(socket.SOL_SOCKET, opt, SOCKBUF)
    if gso:
        s.setsockopt(socket.SOL_UDP, UDP_GRO, 1)      # coalesced datagrams, split below
    s.bind(("127.0.0.1", PORTS[me]))
    s.setblocking(False)
    return s


def drain(sock: socket.socket, node: SyncNode, now: float, limit: int = 4096) -> int:
    n = 0
    recv = sock.recvmsg
    on = node.on_datagram
    space = socket.CMSG_SPACE(4)
    while n < limit:
        try:
            data, anc, _flags, addr = recv(65535, space)
        except BlockingIOError:
            break
        seg = 0
        for level, kind, value in anc:
            if level == socket.SOL_UDP and kind == UDP_GRO:
                seg = int.from_bytes(value[:4], sys.byteorder)
        if seg and len(data) > seg:
            # UDP GRO handed several datagrams over at once: each is verified alone.
            for off in range(0, len(data), seg):
                on(data[off:off + seg], addr, now)
                n += 1
        else:
            on(data, addr, now)
            n += 1
    return n


def handshake(sock: socket.socket, node: SyncNode, peer: int, deadline: float) -> None:
    while time.monotonic() < deadline:
        now = time.monotonic()
        node.tick(now)
        select.select([sock], [], [], 0.01)
        drain(sock, node, time.monotonic())
        st = node.stats()["peers"][peer]
        if st["epoch"] and st["hello_confirmed"]:
            return
    raise SystemExit(f"node {node.node_id}: no handshake with {peer}")


def run_sender(args) -> dict:
    sock = udp_socket(SENDER, args.gso)
    node = make_node(SENDER, sock, lambda p, b: None, args.max_datagram, args.window,
                     args.gso)
    if not args.inflight:
        args.inflight = args.window * max_records(args.max_datagram, RECORD_SIZE) + args.batch
    handshake(sock, node, RECEIVER, time.monotonic() + 10)
    out = {}
    template = array("Q", bytes(RECORD_SIZE * args.batch))

    def batch_blob(base: int, n: int) -> bytes:
        # Whole-batch packing: two strided slice assignments and one copy, no per-record
        # Python objects (a struct.pack per record would cost the sender ~0.3 us each).
        a = template if n == args.batch else array("Q", bytes(RECORD_SIZE * n))
        a[0::WORDS] = array("Q", range(base, base + n))
        a[2::WORDS] = array("Q", [time.monotonic_ns()]) * n
        return a.tobytes()

    def phase(total: int, batch: int, rate: float | None, limit_s: float) -> dict:
        queued = 0
        t0 = time.monotonic()
        deadline = t0 + limit_s
        waits = 0
        while time.monotonic() < deadline:
            now = time.monotonic()
            if queued < total and node.backlog(RECEIVER) < args.inflight and \
                    (rate is None or queued < (now - t0) * rate):
                n = min(batch, total - queued)
                node.queue([RECEIVER], batch_blob(phase.base + queued, n))
                queued += n
            node.flush(now)
            drain(sock, node, now)
            node.tick(now)
            if queued == total and node.backlog(RECEIVER) == 0:
                break
            if node.backlog(RECEIVER) >= args.inflight or queued == total or \
                    (rate is not None and queued >= (now - t0) * rate):
                waits += 1
                select.select([sock], [], [], 0.0005 if rate else 0.002)
        phase.base += queued
        return {"queued": queued, "seconds": time.monotonic() - t0, "waits": waits,
                "complete": queued == total and node.backlog(RECEIVER) == 0}
    phase.base = 0

    prof = cProfile.Profile() if args.profile else None
    if prof:
        prof.enable()
    out["throughput"] = phase(args.records, args.batch, None, args.time_limit)
    if prof:
        prof.disable()
    if args.paced_s > 0:
        out["paced"] = phase(int(args.paced_rate * args.paced_s), args.paced_batch,
                             args.paced_rate, args.paced_s + 5)
    # Tell the receiver we are done: it stops after it has everything or times out.
    s = node.stats()
    out["stats"] = {k: s[k] for k in ("sent_datagrams", "sent_data_datagrams",
                                      "sent_records", "resent_datagrams", "acks_received",
                                      "nacks_received", "send_errors", "rejected_total")}
    if prof:
        out["profile"] = profile_text(prof)
    sock.close()
    return out


def run_receiver(args) -> dict:
    sock = udp_socket(RECEIVER, args.gso)
    got: list[tuple[bytes, int]] = []
    count = [0]

    def deliver(peer: int, blob: bytes) -> None:
        # Kept as received; keys and latencies are read after the run (an agent would
        # hand the blob to a batch map update here).
        got.append((blob, time.monotonic_ns()))
        count[0] += len(blob) // RECORD_SIZE

    node = make_node(RECEIVER, sock, deliver, args.max_datagram, args.window, args.gso)
    handshake(sock, node, SENDER, time.monotonic() + 10)
    out = {}
    targets = [("throughput", args.records)]
    if args.paced_s > 0:
        targets.append(("paced", int(args.paced_rate * args.paced_s)))
    prof = cProfile.Profile() if args.profile else None
    phases = []
    for name, total in targets:
        # Records of this phase may arrive while the previous loop (or the handshake)
        # still runs: they are kept in `got`, which is emptied only after its analysis.
        deadline = time.monotonic() + (args.time_limit if name == "throughput"
                                       else args.paced_s + 5)
        if prof and name == "throughput":
            prof.enable()
        while count[0] < total and time.monotonic() < deadline:
            select.select([sock], [], [], 0.002)
            now = time.monotonic()
            drain(sock, node, now)
            node.tick(now)
        if prof and name == "throughput":
            prof.disable()
        # Analysed after the last phase: a pause here would stall the sender's acks.
        phases.append((name, list(got), count[0], total))
        got.clear()
        count[0] = 0
    # Keep acking a moment so the sender sees its backlog drain.
    linger = time.monotonic() + 0.3
    while time.monotonic() < linger:
        select.select([sock], [], [], 0.005)
        drain(sock, node, time.monotonic())
        node.tick(time.monotonic())
    for name, blobs, n, total in phases:
        out[name] = analyse(blobs, n, total)
    s = node.stats()
    out["stats"] = {k: s[k] for k in ("received_datagrams", "received_records",
                                      "delivered_records", "acks_sent", "nacks_sent",
                                      "buffered_datagrams", "rejected_total")}
    out["stats"]["rejected"] = {k: v for k, v in s["rejected"].items() if v}
    if prof:
        out["profile"] = profile_text(prof)
    sock.close()
    return out


def analyse(got: list[tuple[bytes, int]], count: int, total: int) -> dict:
    """Exactly once and in order (flow numbers consecutive), and queue->deliver latency."""
    flows = array("Q")
    lat = []
    first_ts = None
    for blob, at in got:
        a = array("Q")
        a.frombytes(blob)
        flows.extend(a[0::WORDS])
        ts = a[2::WORDS]
        if first_ts is None:
            first_ts = ts[0]
        lat.extend(at - t for t in ts)
    start = flows[0] if flows else 0
    in_order = all(f == start + i for i, f in enumerate(flows))
    lat.sort()
    res = {"records": count, "expected": total, "exactly_once_in_order": in_order and
           count == total}
    if lat:
        span_ns = got[-1][1] - first_ts
        res.update({"seconds": span_ns / 1e9, "records_per_s": count / (span_ns / 1e9),
                    "latency_us": {"p50": lat[len(lat) // 2] / 1e3,
                                   "p99": lat[int(len(lat) * 0.99)] / 1e3,
                                   "max": lat[-1] / 1e3}})
    return res


def profile_text(prof: cProfile.Profile, n: int = 14) -> str:
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(n)
    return buf.getvalue()


# --- the driver (root namespace) --------------------------------------------------------

def run_pair(ns: str, args, max_datagram: int, transport: str) -> dict:
    base = [sys.executable, os.path.abspath(__file__), "--max-datagram", str(max_datagram),
            "--records", str(args.records), "--batch", str(args.batch),
            "--inflight", str(args.inflight), "--window", str(args.window),
            "--time-limit", str(args.time_limit), "--paced-rate", str(args.paced_rate),
            "--paced-batch", str(args.paced_batch), "--paced-s", str(args.paced_s),
            "--transport", transport]
    if args.profile:
        base.append("--profile")
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE))
    recv = netns.popen_in(ns, base + ["--role", "receiver"], stdout=subprocess.PIPE,
                          text=True, env=env)
    time.sleep(0.3)                       # its socket bound before the sender's HELLO
    send = netns.popen_in(ns, base + ["--role", "sender"], stdout=subprocess.PIPE,
                          text=True, env=env)
    limit = args.time_limit + args.paced_s + 60
    try:
        s_out, _ = send.communicate(timeout=limit)
        r_out, _ = recv.communicate(timeout=limit)
    finally:
        for p in (send, recv):
            if p.poll() is None:
                p.kill()
                p.wait()
    if send.returncode or recv.returncode:
        raise SystemExit(f"a role failed: sender {send.returncode}, receiver "
                         f"{recv.returncode}")
    return {"max_datagram": max_datagram, "transport": transport,
            "records_per_datagram": max_records(max_datagram, RECORD_SIZE),
            "sender": json.loads(s_out), "receiver": json.loads(r_out)}


def report(res: dict) -> None:
    r, s = res["receiver"], res["sender"]
    t = r["throughput"]
    print(f"\nmax_datagram {res['max_datagram']} ({res['records_per_datagram']} records "
          f"per datagram), transport {res['transport']}")
    print(f"  throughput: {t['records']:,} records in {t.get('seconds', 0):.2f} s = "
          f"{t.get('records_per_s', 0):,.0f} records/s; exactly once in order: "
          f"{t['exactly_once_in_order']}; latency p50 {t['latency_us']['p50']:,.0f} us, "
          f"p99 {t['latency_us']['p99']:,.0f} us (saturated)")
    if "paced" in r and "latency_us" in r["paced"]:
        p = r["paced"]
        rate = s["paced"]["queued"] / max(s["paced"]["seconds"], 1e-9)
        print(f"  paced: {p['records']:,} records at {rate:,.0f}/s; exactly once in order: "
              f"{p['exactly_once_in_order']}; latency p50 {p['latency_us']['p50']:,.0f} us, "
              f"p99 {p['latency_us']['p99']:,.0f} us, max {p['latency_us']['max']:,.0f} us")
    print(f"  sender: {s['stats']}")
    print(f"  receiver: {r['stats']}")
    for role in ("sender", "receiver"):
        if "profile" in res[role]:
            print(f"  --- {role} profile (throughput phase) ---")
            print(res[role]["profile"])


def summary(results: list[dict]) -> None:
    """Median (min-max) over rounds per configuration."""
    groups: dict[tuple, list[dict]] = {}
    for res in results:
        groups.setdefault((res["max_datagram"], res["transport"]), []).append(res)
    print("\n| max_datagram | transport | records/s, median (min-max) | saturated p50 / p99 us "
          "| paced p50 / p99 us | all exactly once, in order |")
    print("|---|---|---|---|---|---|")
    med = statistics.median
    for (md, tr), runs in groups.items():
        rps = [r["receiver"]["throughput"].get("records_per_s", 0) for r in runs]
        t50 = med(r["receiver"]["throughput"]["latency_us"]["p50"] for r in runs)
        t99 = med(r["receiver"]["throughput"]["latency_us"]["p99"] for r in runs)
        paced = [r["receiver"]["paced"]["latency_us"] for r in runs
                 if "latency_us" in r["receiver"].get("paced", {})]
        p = (f"{med(x['p50'] for x in paced):,.0f} / {med(x['p99'] for x in paced):,.0f}"
             if paced else "-")
        ok = all(r["receiver"][ph]["exactly_once_in_order"] for r in runs
                 for ph in ("throughput", "paced") if ph in r["receiver"])
        print(f"| {md} | {tr} | {med(rps):,.0f} ({min(rps):,.0f}-{max(rps):,.0f}) | "
              f"{t50:,.0f} / {t99:,.0f} | {p} | {ok} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=2_000_000)
    ap.add_argument("--max-datagram", type=int, nargs="+", default=[1400, 8900])
    ap.add_argument("--transport", nargs="+", choices=["plain", "gso"],
                    default=["plain", "gso"],
                    help="plain: one sendto/recvfrom per datagram; gso: flush()'s datagrams "
                    "sent with UDP GSO (send_many), received with UDP GRO")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4096, help="records per queue() call")
    ap.add_argument("--inflight", type=int, default=0,
                    help="most records queued and not yet acked (sender backpressure; "
                    "default: what the window holds plus one batch, so saturated latency "
                    "is not just a long queue)")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--time-limit", type=float, default=60.0,
                    help="seconds a throughput phase may run")
    ap.add_argument("--paced-rate", type=float, default=20_000)
    ap.add_argument("--paced-batch", type=int, default=16)
    ap.add_argument("--paced-s", type=float, default=3.0)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--role", choices=["sender", "receiver"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.role:
        args.max_datagram = args.max_datagram[0]
        args.gso = args.transport[0] == "gso"
        out = run_sender(args) if args.role == "sender" else run_receiver(args)
        print(json.dumps(out))
        return
    if os.geteuid() != 0:
        raise SystemExit("run as root: the bench creates a network namespace")
    ns = f"hpsync-bench-{os.getpid()}"
    results = []
    load = os.getloadavg()[0]
    started = time.time()
    netns.create(ns)
    try:
        netns.set_up(ns, "lo")
        for _ in range(args.rounds):
            for md in args.max_datagram:
                for transport in args.transport:
                    results.append(run_pair(ns, args, md, transport))
                    report(results[-1])
    finally:
        netns.remove(ns)
    summary(results)
    print(f"\nmachine: {os.cpu_count()} cores, kernel {platform.release()}, Python "
          f"{platform.python_version()}; load average before {load:.2f}, after "
          f"{os.getloadavg()[0]:.2f}; namespace {ns} removed: "
          f"{ns not in netns.list_namespaces()}")
    if args.json:
        commit = subprocess.run(["git", "-C", os.path.dirname(HERE), "rev-parse", "--short",
                                 "HEAD"], capture_output=True, text=True).stdout.strip()
        meta = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(started)),
                "command": " ".join(["sudo", ".venv/bin/python", "bench/sync_bench.py",
                                     *sys.argv[1:]]),
                "git_commit": commit, "cpus": os.cpu_count(), "kernel": platform.release(),
                "python": platform.python_version(), "loadavg_before": load,
                "loadavg_after": os.getloadavg()[0]}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "args": vars(args), "results": results}, f, indent=1)


if __name__ == "__main__":
    main()
