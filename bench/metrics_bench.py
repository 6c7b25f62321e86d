#!/usr/bin/env python3
"""What one Prometheus scrape of a node costs as its flow table fills (issue 8 section 2:
a scrape costs O(resources), not O(flows)).

A real data path (compiled by bcc, maps pinned in a directory of its own, attached to
nothing) with one NAT gateway and one load balancer listener; its `flows` map is filled
with N entries (synthetic keys written with BPF_MAP_UPDATE_BATCH: the scrape never looks
at them, which is the point), and for each N the node's collector
(hyperplane.observe.prometheus.NodeCollector over the pinned maps, as the agent runs it)
renders the text exposition `--scrapes` times. Reported per N: the median and p90 time of
one scrape, the map lookups and map walks one scrape made (counted by wrapping
PinnedMap's methods), and for comparison the time of one walk of the flow table (what a
scrape that counted flows by scanning would pay at least).

    sudo .venv/bin/python bench/metrics_bench.py [--flows 0,10000,100000,250000]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)
import trkit  # noqa: E402  (bench/trkit.py)

from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402

from hyperplane.datapath import pinned  # noqa: E402
from hyperplane.datapath.loader import Datapath, Sizes, remove_pins  # noqa: E402
from hyperplane.nat.gateway import GatewayConfig, apply_gateway  # noqa: E402
from hyperplane.nlb.config import NlbConfig  # noqa: E402
from hyperplane.nlb.dataplane import NlbDataplane  # noqa: E402
from hyperplane.observe.prometheus import NodeCollector  # noqa: E402

PIN_DIR = f"/run/hyperplane/bpf/bench-metrics-{os.getpid()}"
NLB = {"load_balancers": [{"name": "web", "lb_id": 1}],
       "listeners": [{"lb": "web", "vip": "198.18.0.200", "port": 80, "protocol": "TCP",
                      "target_group": "web-tg"}],
       "target_groups": [{"name": "web-tg", "targets": [{"ip": f"10.20.{i}.10", "port": 8080}
                                                        for i in (1, 2, 3)]}]}


class Counting:
    """Counts PinnedMap lookups and walks (items / items_lookup_batch) while active."""

    def __init__(self):
        self.lookups = self.walks = 0
        self._get, self._walk = pinned.PinnedMap.__getitem__, pinned.PinnedMap.items_lookup_batch

    def __enter__(self):
        outer = self

        def get(m, key):
            outer.lookups += 1
            return outer._get(m, key)

        def walk(m):
            outer.walks += 1
            return outer._walk(m)
        pinned.PinnedMap.__getitem__, pinned.PinnedMap.items_lookup_batch = get, walk
        return self

    def __exit__(self, *exc):
        pinned.PinnedMap.__getitem__, pinned.PinnedMap.items_lookup_batch = self._get, self._walk


def fill_flows(table, n: int) -> None:
    """Make the flow table hold exactly n entries (keys: src_ip = 1..n)."""
    table.clear()
    trkit.fill_flows(table, n)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--flows", default="0,10000,100000,250000")
    ap.add_argument("--scrapes", type=int, default=200)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "metrics.json"))
    args = ap.parse_args()
    counts = [int(x) for x in args.flows.split(",")]
    sizes = Sizes(max_flows=max(counts + [1024]))
    dp = Datapath(sizes, pin_dir=PIN_DIR)
    results = []
    try:
        apply_gateway(dp, GatewayConfig("gw-bench", 0, ["198.18.0.100"], ["10.10.0.0/24"]))
        NlbDataplane(dp).apply(NlbConfig.from_dict(NLB))
        node = pinned.PinnedNode(PIN_DIR, sizes)
        gateways = [{"name": "gw-bench", "gw_id": 0, "nat_ips": ["198.18.0.100"],
                     "port_min": 1024, "port_max": 65535}]
        collector = NodeCollector("bench", node, gateways=lambda: gateways,
                                  nlb_config=lambda: NlbConfig.from_dict(NLB))
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)
        flows = node.table("flows")
        for n in counts:
            fill_flows(flows, n)
            t0 = time.perf_counter()
            held = sum(1 for _ in flows.items_lookup_batch())
            walk_s = time.perf_counter() - t0
            assert held == n, f"the flow table holds {held} entries, not {n}"
            generate_latest(registry)          # warm: maps opened, BTF parsed
            with Counting() as c:
                generate_latest(registry)
            times = []
            for _ in range(args.scrapes):
                t0 = time.perf_counter()
                text = generate_latest(registry)
                times.append(time.perf_counter() - t0)
            assert b"hyperplane_nat_gateway_active_connections" in text
            assert not collector.errors, collector.errors
            times.sort()
            row = {"flows": n, "scrape_median_ms": round(statistics.median(times) * 1e3, 3),
                   "scrape_p90_ms": round(times[int(0.9 * len(times))] * 1e3, 3),
                   "map_lookups_per_scrape": c.lookups, "map_walks_per_scrape": c.walks,
                   "flow_table_walk_ms": round(walk_s * 1e3, 1)}
            results.append(row)
            print(json.dumps(row))
        node.close()
    finally:
        dp.close()
        remove_pins(PIN_DIR)
    trkit.write_results(args.out, {"scrapes": args.scrapes, "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
