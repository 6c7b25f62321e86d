"""The fleet agent's refresh round reads the whole flows table on its sync thread, every
refresh_s (10 s): the records of its flows (records.dump: the active ones are sent again,
a slice of the owned idle ones swept) and the replicas' prune scan (no packet and no
record for a while: fleet.sweep). While it runs, the sync thread replicates nothing, so
its time is a stall of replication.

This bench fills a node's pinned flows table with N confirmed NAT flows (2 entries each,
through the record installer), opens the pins as the agent does (PinnedNode: raw
BPF_MAP_LOOKUP_BATCH reads) and times, for several rounds:

  per_entry   the way records.dump built records before (a ctypes key and value per
              entry, then records.record_of of each): the baseline
  dump        records.dump: raw batches, records built a column at a time
  dump_fresh  records.dump with the refresh's idle filter (only flows seen in 11 s)
  prune_scan  the prune's cheap test over every entry (last packet and last record, a
              column at a time)

No namespace is needed: nothing here sends a packet.

    sudo .venv/bin/python bench/refresh_bench.py --flows 130000 --rounds 5 \\
        --json bench/results/refresh.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import time

import trkit   # noqa: F401  (puts the project on sys.path)
from hyperplane.datapath.flows import now_ns
from hyperplane.datapath.loader import Datapath, Sizes, remove_pins
from hyperplane.datapath.pinned import PinnedNode
from hyperplane.datapath.settings import Timeouts, write_config
from hyperplane.datapath.verdicts import FlowKind, TcpState
from hyperplane.fleet import records, sweep
from hyperplane.fleet.records import REC_F_CONFIRMED, FlowRecord
from hyperplane.nat.gateway import GatewayConfig, apply_gateway

NAT_IPS = [f"198.18.100.{i}" for i in range(1, 5)]
SERVER = "198.18.0.2"
PIN_DIR = f"/run/hyperplane/bpf/bench-refresh-{os.getpid()}"


def make_records(n: int) -> bytes:
    """n confirmed NAT flows, each its own (NAT IP, port) to one server; a tenth last
    seen 5 ms before their install, the rest 60 s. By the time of the reads every one is
    idle past the refresh window, so dump_fresh selects none: it times the read and the
    filter."""
    out = bytearray()
    for i in range(n):
        nat_ip, port = NAT_IPS[i // 64000], 1024 + i % 64000
        out += FlowRecord(f"10.10.{i // 250 % 250}.{i % 250}", SERVER, 1024 + i // 62500,
                          443, 6, nat_ip, SERVER, port, 443, FlowKind.NAT_OUT,
                          TcpState.ESTABLISHED, 0, REC_F_CONFIRMED, 1, 2,
                          5 if i % 10 == 0 else 60_000, 120_000, 0x1000 + i).pack()
    return bytes(out)


def per_entry_dump(dp, origin: int) -> bytes:
    """records.dump as it was: a (Key, Leaf) pair per entry, then record_of of each."""
    now = now_ns()
    out = bytearray()
    for k, v in dp.table("flows").items():
        rec = records.record_of(bytes(k), bytes(v), now, origin)
        if rec is not None:
            out += rec
    return bytes(out)


def prune_scan(dp) -> int:
    """The prune's cheap test over every entry (FleetMember._prune_replicas): how many
    had no packet and no record for 30 s."""
    before = now_ns() - 30 * 10**9
    hits = 0
    for keys, values, n, ks, vs in records.entry_batches(dp.table("flows")):
        hits += len(sweep.quiet_rows(records.value_column(values, n, vs, "last_seen_ns", 8),
                                     records.value_column(values, n, vs, "synced", 4),
                                     before))
    return hits


def timed(fn, rounds: int) -> tuple[list[float], object]:
    secs, result = [], None
    for _ in range(rounds):
        t0 = time.perf_counter()
        result = fn()
        secs.append(time.perf_counter() - t0)
    return secs, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flows", type=int, default=130_000,
                    help="flows in the table (2 entries each; the default table holds "
                         f"{Sizes().max_flows} entries)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if not 1 <= args.flows <= 256_000:
        ap.error("--flows must be 1..256000 (4 NAT IPs of 64,000 ports)")
    sizes = Sizes(max_flows=max(Sizes().max_flows, 2 * args.flows + 1024))
    dp = Datapath(sizes, PIN_DIR)
    node = None
    try:
        write_config(dp, Timeouts(), hash_seed=0x5EED)
        apply_gateway(dp, GatewayConfig("gw-bench", 1, NAT_IPS, ["10.10.0.0/16"]))
        dp.install_fd()
        blob = make_records(args.flows)
        got = records.InstallResult()
        for i in range(0, len(blob), 4096 * records.RECORD_SIZE):
            r = records.install(dp, blob[i:i + 4096 * records.RECORD_SIZE])
            got.installed += r.installed
        assert got.installed == args.flows, f"installed {got.installed} of {args.flows}"
        node = PinnedNode(PIN_DIR, sizes)
        entries = len(node.table("flows"))
        res = {}
        for name, fn in (("per_entry", lambda: len(per_entry_dump(node, 2))),
                         ("dump", lambda: len(records.dump(node, 2))),
                         ("dump_fresh", lambda: len(records.dump(node, 2,
                                                                 idle_below_ms=11_000))),
                         ("prune_scan", lambda: prune_scan(node))):
            secs, out = timed(fn, args.rounds)
            res[name] = {"seconds": secs, "median_s": statistics.median(secs),
                         "us_per_entry": statistics.median(secs) / entries * 1e6,
                         "result": out}
            print(f"{name:10}: median {statistics.median(secs) * 1000:8.1f} ms "
                  f"({res[name]['us_per_entry']:.3f} us/entry; rounds "
                  f"{', '.join(f'{s * 1000:.1f}' for s in secs)} ms) -> {out}")
        assert res["dump"]["result"] == res["per_entry"]["result"] == \
            args.flows * records.RECORD_SIZE, "both dumps hold every flow's record"
        base = res["per_entry"]["median_s"]
        for name in ("dump", "dump_fresh", "prune_scan"):
            res[name]["speedup_vs_per_entry"] = base / res[name]["median_s"]
        print(f"entries {entries}; dump {res['dump']['speedup_vs_per_entry']:.1f}x faster "
              f"than per entry")
        if args.json:
            meta = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                        timespec="seconds"),
                    "command": "sudo .venv/bin/python bench/refresh_bench.py " +
                               " ".join(f"--{k.replace('_', '-')} {v}"
                                        for k, v in vars(args).items() if v is not None),
                    "kernel": platform.release(), "cpus": os.cpu_count(),
                    "python": platform.python_version(),
                    "loadavg": os.getloadavg(),
                    "git_commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"],
                                                 capture_output=True, text=True,
                                                 cwd=trkit.ROOT).stdout.strip(),
                    "flows": args.flows, "entries": entries}
            with open(args.json, "w") as f:
                json.dump({"meta": meta, "results": res}, f, indent=1)
    finally:
        if node is not None:
            node.close()
        dp.close()
        remove_pins(PIN_DIR)


if __name__ == "__main__":
    main()
