#!/usr/bin/env python3
"""The failover traffic gap for NAT and NLB flows (issue 7 section 8), as a bench.

Builds the 4-node fleet lab (`hpctl lab up --nodes 4`, shards of 3, file store), starts
the stream server on the internet host (the targets run it already), then repeats:

  nat   a 200 MB NAT download (client -> internet host) and a 200 MB NLB download
        (internet host -> VIP) run at 40 MB/s each; once both have 20 MB, the node
        carrying the NAT download (the one whose TX_NAT_IN grows most) is killed: its
        links cut and its agent SIGKILLed (`hpctl lab kill-node`). Gap: the longest
        silence between two reads at each client, so TCP's own recovery is in it.
  nlb   the same with an NLB download alone, killing the node that carries it.

After each kill the node is restored (`hpctl lab restore-node`: data path, agent, pulls
its shards' flows) before the next event. A download must arrive whole and byte-exact
without an error; one that does not is reported as failed. The tests in
tests/lab/test_fleet_lab.py do one of each per store; this takes several and gives the
median and the worst. Target: < 1 s. All traffic stays inside the lab's namespaces.

    sudo .venv/bin/python bench/failover_bench.py --rounds 3 --json bench/results/failover.json
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(ROOT, "tests", "lab"))   # the lab tests' stream client

import trkit  # noqa: E402

MB = 1 << 20
TARGET_S = 1.0


def download(ns: str, dst: tuple[str, int], src: str, nbytes: int, rate: int, seed: int):
    from lab_traffic import StreamDownload
    return StreamDownload(ns, dst, nbytes, rate, seed, src=src, timeout=90.0).start()


def outcome(dl) -> dict:
    """The download's gap, and whether it arrived whole and byte-exact without error."""
    dl.wait(95)
    problem = dl.problem() if dl.done.is_set() else "it did not end"
    out = {"gap_s": round(dl.max_gap, 4), "ok": problem is None}
    if problem:
        out["error"] = problem
    return out


def kill_and_restore(cfg, victim: int, downloads: dict) -> dict:
    from hyperplane.lab import fleet_build
    t0 = time.monotonic()
    fleet_build.kill_node(cfg, victim)
    event = {"node": victim, **{what: outcome(dl) for what, dl in downloads.items()}}
    event["downloads_done_after_kill_s"] = round(time.monotonic() - t0, 2)
    fleet_build.restore_node(cfg, victim)
    return event


def run(rounds: int, nbytes: int, rate: int) -> dict:
    from hyperplane import lab, netns
    from hyperplane.lab import fleet_build
    from hyperplane.lab.servers import target_server_argv
    from lab_traffic import raise_nofile, wait_tcp
    raise_nofile()
    cfg = lab.LabConfig(prefix=f"hpb{os.getpid() % 1000}k", mode="xdp", nodes=4)
    ns = lab.namespaces(cfg)
    client, inet = lab.CLIENT_IPS[0], lab.INET_IPS[0]
    stream = (inet, lab.TARGET_HTTP_PORT)
    events: dict[str, list] = {"nat": [], "nlb": []}
    server, targets = None, []
    lab.down(cfg)
    try:
        t0 = time.monotonic()
        lab.up(cfg)
        lab_up_s = round(time.monotonic() - t0, 1)
        server = netns.popen_in(ns["inet"], target_server_argv("inet", inet, udp_port=None))
        wait_tcp(ns["inet"], inet, lab.TARGET_HTTP_PORT)
        targets = [lab.start_target_server(cfg, name) for name in lab.TARGET_ROLES]
        fleet_build.wait_targets_healthy(cfg)
        for r in range(rounds):
            print(f"  round {r + 1}/{rounds}: kill the NAT carrier", file=sys.stderr, flush=True)
            nat = download(ns["client"], stream, client, nbytes, rate, seed=100 + r)
            nlb = download(ns["inet"], (lab.FLEET_VIP, 80), inet, nbytes, rate, seed=200 + r)
            nat.wait_bytes(20 * MB)
            nlb.wait_bytes(20 * MB)
            victim = fleet_build.busiest_node(cfg, "TX_NAT_IN")
            events["nat"].append(kill_and_restore(cfg, victim, {"nat": nat, "nlb": nlb}))
            print(f"  round {r + 1}/{rounds}: kill the NLB carrier", file=sys.stderr, flush=True)
            nlb = download(ns["inet"], (lab.FLEET_VIP, 80), inet, nbytes, rate, seed=300 + r)
            nlb.wait_bytes(20 * MB)
            victim = fleet_build.busiest_node(cfg, "TX_NLB_OUT")
            events["nlb"].append(kill_and_restore(cfg, victim, {"nlb": nlb}))
    finally:
        for proc in [server, *targets]:
            if proc is not None:
                proc.kill()
                proc.wait()
        lab.down(cfg)
    return {"lab_up_s": lab_up_s, "events": events}


def summary(events: dict) -> dict:
    """Per event and download: the gaps, their median and worst, and the failures."""
    out = {}
    for event, runs in events.items():
        for what in ("nat", "nlb"):
            gaps = [e[what]["gap_s"] for e in runs if what in e]
            if gaps:
                out[f"kill {event} carrier, {what} download"] = {
                    "gaps_s": gaps, "median_s": statistics.median(gaps), "max_s": max(gaps),
                    "failed": sum(1 for e in runs if what in e and not e[what]["ok"]),
                    "under_target": sum(1 for g in gaps if g < TARGET_S)}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3, help="kills of each kind (default 3)")
    ap.add_argument("--mb", type=int, default=200, help="each download's size, MB")
    ap.add_argument("--rate-mb", type=int, default=40, help="each download's rate, MB/s")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "failover.json"))
    args = ap.parse_args(argv)
    if not 1 <= args.rounds <= 20 or not 40 <= args.mb <= 2000 or not 1 <= args.rate_mb <= 200:
        ap.error("--rounds 1..20, --mb 40..2000, --rate-mb 1..200")
    trkit.sigterm_unwinds()
    machine = trkit.machine()        # its load average is the one at the start
    result = run(args.rounds, args.mb * MB, args.rate_mb * MB)
    result["summary"] = summary(result["events"])
    meta = {"command": "sudo .venv/bin/python bench/failover_bench.py " +
            " ".join(sys.argv[1:] if argv is None else argv),
            **machine, **trkit.git_meta(["bpf", "hyperplane", "bench", "tests/lab"]),
            "loadavg_at_end": os.getloadavg(), "target_s": TARGET_S}
    trkit.write_results(args.json, {"meta": meta, **result})
    print("| event | download | gaps (s) | median | worst | failed |\n|---|---|---|---|---|---|")
    for name, s in result["summary"].items():
        event, what = name.split(", ")
        print(f"| {event} | {what} | {' / '.join(f'{g:.3f}' for g in s['gaps_s'])} | "
              f"{s['median_s']:.3f} | {s['max_s']:.3f} | {s['failed']} |")
    failed = sum(s["failed"] for s in result["summary"].values())
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
