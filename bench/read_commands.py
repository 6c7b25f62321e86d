"""How long each hpctl read command takes on a running node (issue 8: "every read command
answers in well under a second"). Runs each one `--runs` times as a fresh process, as an
operator would, and prints the median wall time and the median CPU time (user + system of
the process), next to a bare `python -c pass` for the interpreter's own start:

    sudo .venv/bin/python bench/read_commands.py --node node1 --lab-prefix hp [--store URL]

The load average is printed too: on a shared 2-core machine wall time follows the load,
CPU time much less."""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time

HPCTL = os.path.join(os.path.dirname(sys.executable), "hpctl")


def commands(node: str, prefix: str) -> list[list[str]]:
    n = ["--node", node]
    return [["counters", *n, "--json"], ["flows", *n, "--json"], ["nat", "show", *n, "--json"],
            ["lb", "health", *n, "--json"], ["lb", "show", "--json"], ["nodes", "--json"],
            ["shards", "--json"], ["fleet", "status", "--json"],
            ["top", *n, "--json", "--interval", "0.1"], ["lab", "status", "--prefix", prefix,
                                                         "--json"]]


def run(argv: list[str], env: dict) -> tuple[float, float, int, int]:
    """(wall s, CPU s, exit status, bytes of output) of one run."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          stdin=subprocess.DEVNULL, timeout=120)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, proc.returncode, len(proc.stdout)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--node", required=True)
    ap.add_argument("--lab-prefix", default="hp")
    ap.add_argument("--store", default=None, help="HPCTL_STORE for the store commands")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    env = dict(os.environ)
    if args.store:
        env["HPCTL_STORE"] = args.store
    print(f"load average {os.getloadavg()[0]:.2f}, {os.cpu_count()} CPUs, {args.runs} runs each")
    print(f"{'command':58} {'wall s':>7} {'cpu s':>6} {'exit':>4} {'bytes':>8}")
    base = [run([sys.executable, "-c", "pass"], env) for _ in range(args.runs)]
    print(f"{'(python -c pass)':58} {statistics.median(b[0] for b in base):7.3f} "
          f"{statistics.median(b[1] for b in base):6.3f}")
    for argv in commands(args.node, args.lab_prefix):
        runs = [run([HPCTL, *argv], env) for _ in range(args.runs)]
        print(f"{'hpctl ' + ' '.join(argv):58} {statistics.median(r[0] for r in runs):7.3f} "
              f"{statistics.median(r[1] for r in runs):6.3f} {runs[-1][2]:>4} {runs[-1][3]:>8}")


if __name__ == "__main__":
    main()
