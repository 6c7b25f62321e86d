"""The fleet's record installer alone (bpf/install.h through records.install): N new
confirmed NAT records into empty tables, then the same records again (merges), in blobs of
4,096 records, for several rounds. It reports records/s (wall clock, Python included)
and the kernel's own time per record (BPF_PROG_TEST_RUN's duration, summed over runs).

Use it to compare builds of the installer, one run per build on an otherwise quiet
machine:

    sudo .venv/bin/python bench/install_bench.py --records 60000 --rounds 5

No namespace is needed: the installer looks nothing up in the kernel's routes."""
from __future__ import annotations

import argparse
import os
import statistics
import time

import trkit   # noqa: F401  (puts the project on sys.path)
from hyperplane.datapath import testrun
from hyperplane.datapath.loader import Datapath, Sizes
from hyperplane.datapath.settings import Timeouts, write_config
from hyperplane.datapath.verdicts import FlowKind, TcpState
from hyperplane.fleet import records
from hyperplane.fleet.records import REC_F_CONFIRMED, FlowRecord
from hyperplane.nat.gateway import GatewayConfig, apply_gateway

NAT_IP = "198.18.100.1"
SERVER = "198.18.0.2"
BLOB = 4096


def make_records(n: int) -> bytes:
    """n confirmed NAT flows from 200 clients of 10.10.0.0/24 to one server, each on its
    own NAT port (ports repeat past 64,512 flows; the (port, client) pairs do not)."""
    out = bytearray()
    for i in range(n):
        out += FlowRecord(f"10.10.0.{10 + i % 200}", SERVER, 1024 + i // 200, 7100, 6, NAT_IP,
                          SERVER, 1024 + i % 64512, 7100, FlowKind.NAT_OUT,
                          TcpState.ESTABLISHED, 0, REC_F_CONFIRMED, 1, 2, 5, 100,
                          0x1000 + i).pack()
    return bytes(out)


class KernelClock:
    """Sums the kernel's run time (test_run's duration) of every installer run."""

    def __init__(self):
        self.ns = 0
        run = testrun.Runner.run

        def timed(runner, fd, head, body=b""):
            rv = run(runner, fd, head, body)
            self.ns += runner._opts.duration
            return rv

        testrun.Runner.run = timed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=60_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root: the bench loads a BPF program")
    if not 0 < args.records <= Sizes().max_reservations:
        raise SystemExit(f"--records: 1..{Sizes().max_reservations} (the reservation table)")
    dp = Datapath(Sizes())
    try:
        write_config(dp, Timeouts(), hash_seed=0x5EED)
        apply_gateway(dp, GatewayConfig("gw-bench", 1, [NAT_IP], ["10.10.0.0/24"]))
        dp.install_fd()
        blob = make_records(args.records)
        step = BLOB * records.RECORD_SIZE
        parts = [blob[i:i + step] for i in range(0, len(blob), step)]
        clock = KernelClock()
        rounds = []
        for _ in range(args.rounds):
            for t in ("flows", "pending", "nat_resv"):
                trkit.clear_table(dp.table(t))
            res = {}
            for mode, want in (("new", "installed"), ("again", "merged")):
                clock.ns = 0
                t0 = time.perf_counter()
                done = sum(getattr(records.install(dp, p), want) for p in parts)
                secs = time.perf_counter() - t0
                if done != args.records:
                    raise SystemExit(f"{mode}: {done} of {args.records} records {want}")
                res[mode] = {"records_per_s": args.records / secs,
                             "kernel_ns_per_record": clock.ns / args.records}
            rounds.append(res)
    finally:
        dp.close()
    summary = {}
    for mode in ("new", "again"):
        rate = [r[mode]["records_per_s"] for r in rounds]
        kern = [r[mode]["kernel_ns_per_record"] for r in rounds]
        summary[mode] = {"records_per_s_median": statistics.median(rate),
                         "kernel_ns_per_record_median": statistics.median(kern)}
        print(f"{mode:5}: {statistics.median(rate):>9,.0f} records/s (rounds "
              f"{', '.join(f'{x:,.0f}' for x in rate)}); kernel {statistics.median(kern):,.0f}"
              f" ns/record (rounds {', '.join(f'{x:,.0f}' for x in kern)})")
    if args.json:
        trkit.write_results(args.json, {
            "command": "sudo .venv/bin/python bench/install_bench.py "
                       f"--records {args.records} --rounds {args.rounds}",
            **trkit.machine(), **trkit.git_meta(["bench", "bpf", "hyperplane"]),
            "rounds": rounds, "summary": summary})


if __name__ == "__main__":
    main()
