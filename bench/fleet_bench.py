#!/usr/bin/env python3
"""The lab's NAT throughput with 4 nodes against 1 (issue 7 section 8), in the same run.

Builds the one-node lab (`hpctl lab up`) and the fleet lab (`hpctl lab up --nodes 4`,
shards of 3: the NAT gateway runs on 3 of the 4 nodes, the routers spread its flows over
them with ECMP), both in mode xdp with their defaults, then takes the same measurements
round-robin (so background load hits both alike) and reports medians and the ratio:

  tcp_gbps_8   TCP bulk, 8 parallel streams (iperf3 -P 8): ECMP spreads them over the
               shard's nodes, and their replies over the nodes again (asymmetric paths)
  tcp_conn_per_s  new TCP connections/s through the NAT (bench/lab_bench.py's churn)
  udp_pps      small UDP packets/s, one flow (one node carries it whatever the fleet size)

All namespaces share this machine's cores (2 here), the generators too: more nodes do not
add CPU, so the ratio shows the fleet's overhead (replication, second chance, the routers'
extra hop), not its scaling. Writes bench/results/fleet.json and prints a markdown table.

    sudo .venv/bin/python bench/fleet_bench.py --seconds 5 --repeat 3
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import lab_bench  # noqa: E402  (bench/lab_bench.py: the measurements)


def measure_bulk_parallel(ns: dict, seconds: int) -> dict:
    from hyperplane import lab
    d = lab_bench._iperf(ns["client"], ns["inet"], lab.INET_IPS[0], ["-P", "8"], seconds)
    return {"tcp_gbps_8": d["end"]["sum_received"]["bits_per_second"] / 1e9}


MEASURES = {"bulk8": lambda ns, sec, procs: measure_bulk_parallel(ns, sec),
            "conn": lambda ns, sec, procs: lab_bench.measure_tcp_conn(ns, sec, procs),
            "udp": lambda ns, sec, procs: lab_bench.measure_udp_pps(ns, sec)}

METRICS = [("tcp_gbps_8", "TCP bulk, 8 streams, Gbit/s", "{:.2f}"),
           ("tcp_conn_per_s", "new TCP connections/s", "{:,.0f}"),
           ("udp_pps", "small UDP packets/s, one flow", "{:,.0f}")]


def run(node_counts: list[int], seconds: int, repeat: int, conn_procs: int) -> list[dict]:
    from hyperplane import lab, netns
    cfgs = {n: lab.LabConfig(prefix=f"hpb{os.getpid() % 1000}f{n}", nodes=n)
            for n in node_counts}
    res = {n: {"nodes": n} for n in node_counts}
    samples: dict[int, dict[str, list]] = {n: {} for n in node_counts}
    live = []
    try:
        for n, cfg in cfgs.items():
            lab.down(cfg)
            t0 = time.monotonic()
            lab.up(cfg)
            res[n]["lab_up_s"] = round(time.monotonic() - t0, 1)
            netns.sysctl(lab.namespaces(cfg)["client"], "net.ipv4.ip_local_port_range",
                         "1024 65535")
            live.append(n)
        for rep in range(repeat):
            for name, fn in MEASURES.items():
                for n in list(live):
                    print(f"  rep {rep + 1}/{repeat} {name} {n} node(s)", file=sys.stderr,
                          flush=True)
                    try:
                        for k, v in fn(lab.namespaces(cfgs[n]), seconds, conn_procs).items():
                            samples[n].setdefault(k, []).append(v)
                    except Exception as exc:  # reported in the results, the rest goes on
                        res[n]["error"] = f"{name}: {type(exc).__name__}: {exc}"
                        live.remove(n)
        for n in node_counts:
            for k, vals in samples[n].items():
                res[n][k] = statistics.median(vals)
                res[n].setdefault("samples", {})[k] = vals
    finally:
        for cfg in cfgs.values():
            lab.down(cfg)
    return [res[n] for n in node_counts]


def markdown(results: list[dict], meta: dict) -> str:
    base = results[0]
    head = ["what"] + [f"{r['nodes']} node(s)" for r in results] + \
        [f"ratio {r['nodes']}/{base['nodes']}" for r in results[1:]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, label, fmt in METRICS:
        row = [label] + [fmt.format(r[key]) if key in r else "-" for r in results]
        row += [f"{r[key] / base[key]:.2f}" if key in r and base.get(key) else "-"
                for r in results[1:]]
        lines.append("| " + " | ".join(row) + " |")
    lines.append(f"\n{meta['when']}, {meta['cpus']} CPUs, `{meta['command']}`")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--conn-procs", type=int, default=4)
    ap.add_argument("--nodes", default="1,4", help="node counts to compare (first: the base)")
    args = ap.parse_args(argv)
    counts = [int(x) for x in args.nodes.split(",")]
    results = run(counts, args.seconds, args.repeat, args.conn_procs)
    meta = {"when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "cpus": len(os.sched_getaffinity(0)), "kernel": platform.release(),
            "command": "sudo .venv/bin/python bench/fleet_bench.py " + " ".join(
                sys.argv[1:] if argv is None else argv)}
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    with open(os.path.join(HERE, "results", "fleet.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    print(markdown(results, meta))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
