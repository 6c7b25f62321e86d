#!/usr/bin/env python3
"""What one flow log interval costs the agent as the flow table fills (issue 8 section 3:
the aggregation is per flow by nature; this measures how much).

A real data path (compiled by bcc, maps pinned in a directory of its own, attached to
nothing); its `flows` map is filled with N entries (synthetic keys, written with
BPF_MAP_UPDATE_BATCH), each of which then counts more packets (another batch update),
and the flow log aggregator (hyperplane.observe.flowlogs.FlowLogAggregator over the
pinned maps, as the agent runs it) ends an interval: one batched read of the flow tables,
the deltas, N records. Reported per N: the median time of one flush (--rounds), the
records it made, the time of the batched read alone, and the time to write the records
(version 2 lines through the rotating file writer, into a temporary directory).

    sudo .venv/bin/python bench/flowlog_bench.py [--flows 1000,10000,100000]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import trkit  # noqa: E402  (bench/trkit.py)

from hyperplane.datapath import pinned  # noqa: E402
from hyperplane.datapath.flows import now_ns  # noqa: E402
from hyperplane.datapath.loader import Datapath, Sizes, remove_pins  # noqa: E402
from hyperplane.observe.flowlogs import (FlowLogAggregator, FlowLogConfig,  # noqa: E402
                                         FlowLogWriter, log_path)

PIN_DIR = f"/run/hyperplane/bpf/bench-flowlogs-{os.getpid()}"


def fill(table, n: int, packets: int, created: int) -> None:
    """n entries (keys: src_ip = 1..n, created at `created`), each with `packets` packets
    of 100 bytes."""
    trkit.fill_flows(table, n, packets=packets, bytes=packets * 100, created_ns=created,
                     last_seen_ns=created, in_ifindex=1)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flows", default="1000,10000,100000")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "flowlogs.json"))
    args = ap.parse_args()
    counts = [int(x) for x in args.flows.split(",")]
    sizes = Sizes(max_flows=max(counts + [1024]))
    dp = Datapath(sizes, pin_dir=PIN_DIR)
    results = []
    try:
        node = pinned.PinnedNode(PIN_DIR, sizes)
        flows = node.table("flows")
        for n in counts:
            flows.clear()
            created = now_ns()
            fill(flows, n, 1, created)
            cfg = FlowLogConfig(interval_s=60)
            agg = FlowLogAggregator(node, cfg)
            agg.baseline()
            flush_s, write_s, read_s = [], [], []
            with tempfile.TemporaryDirectory() as tmp:
                writer = FlowLogWriter(log_path(tmp, "bench"), FlowLogConfig(
                    dir=tmp, max_bytes=1 << 30, backups=1))
                for r in range(args.rounds):
                    fill(flows, n, r + 2, created)   # every entry counted one more packet
                    t0 = time.perf_counter()
                    held = sum(1 for _ in flows.items_lookup_batch())
                    read_s.append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    records = agg.flush()
                    flush_s.append(time.perf_counter() - t0)
                    assert held == n and len(records) == n, (held, len(records), n)
                    assert all(rec.packets == 1 and rec.bytes == 100 for rec in records)
                    t0 = time.perf_counter()
                    writer.write(records)
                    write_s.append(time.perf_counter() - t0)
                writer.close()
            row = {"flows": n, "flush_median_ms": round(statistics.median(flush_s) * 1e3, 1),
                   "records_per_flush": n,
                   "batched_read_median_ms": round(statistics.median(read_s) * 1e3, 1),
                   "write_median_ms": round(statistics.median(write_s) * 1e3, 1),
                   "flush_us_per_flow": round(statistics.median(flush_s) / max(n, 1) * 1e6, 2)}
            results.append(row)
            print(json.dumps(row))
        node.close()
    finally:
        dp.close()
        remove_pins(PIN_DIR)
    trkit.write_results(args.out, {"rounds": args.rounds, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
