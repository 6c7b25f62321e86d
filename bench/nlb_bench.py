#!/usr/bin/env python3
"""NLB benchmark: HTTP requests/s through the lab's hyperplane network load balancer, the
kernel's own stateful L4 load balancer (nftables DNAT, lab mode nftlb) and HAProxy in TCP
mode (Debian's haproxy, lab mode haproxy), same topology, one run.

    internet host (wrk) -> VIP 198.18.0.200:80 on node1 -> targets t1..t3 (:8080)

All labs are up at once (distinct prefixes). The targets answer with a tiny fixed body;
they run HAProxy in HTTP mode (`http-request return`), one thread each, because a Python
server would be slower than either load balancer and measure itself.

Measures, per load balancer:
  fresh_rps      requests/s, one request per TCP connection (wrk -H "Connection: close":
                 wrk reconnects after every answer)
  keepalive_rps  requests/s on keep-alive connections (wrk's default)

Four variants, each test --repeat times round-robin over them, medians reported:
  xdp               the hyperplane NLB as deployed (attached as --attach says: auto = tc
                    on the lab's veths): data path + the node's agent (health checks, flow
                    accounting, garbage collection), whose CPU time is recorded
  xdp_agent_paused  the same lab with the agent paused (SIGSTOP) for the run: the data
                    path alone
  nftlb             an nftables DNAT in the node's prerouting hook, target by a 5-tuple
                    hash (jhash) over the three targets, client IP kept, conntrack
                    reversing it (no health checks)
  haproxy           HAProxy in TCP mode (a proxy: the targets see the node's address)
The XDP lab's agent is paused during the nftlb and haproxy runs, so the idle XDP lab takes
no CPU from them. The ratios are xdp / nftlb and xdp / haproxy. wrk runs in the internet
namespace and shares this machine's cores with the load balancer and the targets (2 vCPUs
here): the ratios are the result, the absolute numbers mostly say how much CPU was left
for each part.

    sudo .venv/bin/python bench/nlb_bench.py [--seconds 5] [--repeat 5] [--connections 64]

Writes bench/results/nlb.json and prints a markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

LBS = ("xdp", "nftlb", "haproxy")
# The XDP node's flow table enlarged: at ~10-30k new connections/s, each flow kept 10 s
# after its close (the default closing timeout, as conntrack's after a RST) and up to the
# agent's next garbage collection (every 10 s), the default table (131,072 flows) would
# be the limit, not the data path; conntrack's table here is the host's nf_conntrack_max.
# --default-table runs the node with its defaults.
XDP_NODE = {"sizes": {"max_flows": 1 << 20, "max_reservations": 1 << 17}}
METRICS = [("fresh_rps", "requests/s, fresh connection per request", "{:,.0f}"),
           ("keepalive_rps", "requests/s, keep-alive connections", "{:,.0f}")]
TARGETS_FROM_ISSUE = {"fresh_rps": 1.5, "keepalive_rps": 1.2}   # xdp / haproxy


def _target_haproxy_cfg(name: str, ip: str, port: int) -> str:
    return f"""global
    nbthread 1
    maxconn 4000

defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
    maxconn 4000

frontend target
    bind {ip}:{port}
    http-request return status 200 content-type text/plain string "{name}"
"""


def start_target_servers(cfg, workdir: str) -> None:
    """HAProxy HTTP servers on every target (daemons in the target namespaces: lab down
    ends them with the namespaces)."""
    from hyperplane import lab, netns
    for t in lab.targets(cfg):
        path = os.path.join(workdir, f"{cfg.prefix}-{t['name']}.cfg")
        with open(path, "w") as f:
            f.write(_target_haproxy_cfg(t["name"], t["ip"], lab.TARGET_HTTP_PORT))
        netns.run_in(t["netns"], ["haproxy", "-D", "-q", "-f", path], capture_output=True,
                     text=True, timeout=30)


def wait_ready(cfg, timeout: float = 20.0) -> None:
    """Until a request through the VIP answers (and, in mode xdp, every target is healthy
    in the agent's view)."""
    from hyperplane import lab, netns
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        ok = True
        if cfg.mode == "xdp":
            st = (lab.status(cfg)["nlb"].get("agent") or {}).get("target_groups", {})
            states = [v["state"] for v in st.get(lab.WEB_GROUP, {}).values()]
            ok = states == ["healthy"] * len(lab.TARGET_IPS)
            last = f"agent states {states}"
        if ok:
            r = netns.run_in(lab.namespaces(cfg)["inet"],
                             ["curl", "-sS", "--max-time", "2", f"http://{lab.VIP}/"],
                             check=False, capture_output=True, text=True, timeout=10)
            if r.returncode == 0 and r.stdout.strip() in lab.TARGET_ROLES:
                return
            last = f"curl: {r.returncode} {r.stdout.strip()!r} {r.stderr.strip()}"
        time.sleep(0.2)
    raise TimeoutError(f"lab {cfg.prefix} ({cfg.mode}) not ready after {timeout}s: {last}")


_UNITS = {"": 1, "k": 1e3, "K": 1e3, "m": 1e6, "M": 1e6}


def parse_wrk(out: str) -> dict:
    """requests/s, total requests, errors and latency from wrk's text report."""
    res: dict = {}
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not m:
        raise RuntimeError(f"no Requests/sec in wrk's output: {out[-400:]!r}")
    res["rps"] = float(m.group(1))
    m = re.search(r"(\d+) requests in ([\d.]+)(\w+)", out)
    if m:
        res["requests"] = int(m.group(1))
    m = re.search(r"Latency\s+([\d.]+)(us|ms|s)", out)
    if m:
        res["latency_avg_ms"] = float(m.group(1)) * {"us": 1e-3, "ms": 1, "s": 1e3}[m.group(2)]
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    res["socket_errors"] = dict(zip(("connect", "read", "write", "timeout"),
                                    map(int, m.groups()))) if m else {}
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    res["non_2xx"] = int(m.group(1)) if m else 0
    return res


def run_wrk(cfg, seconds: int, connections: int, threads: int, fresh: bool) -> dict:
    from hyperplane import lab, netns
    argv = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{seconds}s",
            "--timeout", "2s", "--latency"]
    if fresh:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://{lab.VIP}:{lab.HTTP_PORT}/")
    r = netns.run_in(lab.namespaces(cfg)["inet"], argv, check=False, capture_output=True,
                     text=True, timeout=seconds + 30)
    if r.returncode != 0:
        raise RuntimeError(f"wrk failed ({r.returncode}): {r.stderr.strip() or r.stdout[-300:]}")
    return parse_wrk(r.stdout)


def _agent_pid(cfg) -> int | None:
    from hyperplane import lab
    agent = lab.status(cfg)["nlb"].get("agent") or {}
    return agent.get("pid")


def _cpu_seconds(pid: int | None) -> float | None:
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _Paused:
    """SIGSTOP a process for the duration (SIGCONT after, whatever happens)."""

    def __init__(self, pid: int | None):
        self.pid = pid

    def __enter__(self):
        if self.pid:
            os.kill(self.pid, signal.SIGSTOP)

    def __exit__(self, *exc):
        if self.pid:
            os.kill(self.pid, signal.SIGCONT)


def _xdp_counters(cfg) -> dict:
    from hyperplane import lab
    from hyperplane.node import lifecycle as node
    return node.read_counters(lab.node_name(cfg), pin_root=lab.topology(cfg)["node"]["pin_root"])


def run(seconds: int, repeat: int, connections: int, threads: int, attach: str,
        lbs: list[str], workdir: str, agent_paused_runs: bool = True,
        default_table: bool = False) -> list[dict]:
    from hyperplane import lab, netns
    pid = os.getpid() % 1000
    cfgs = {m: lab.LabConfig(prefix=f"hpn{pid}{m[0]}", mode=m, attach=attach, nlb=True,
                             **(XDP_NODE if m == "xdp" and not default_table else {}))
            for m in lbs}
    res = {m: {"lb": m} for m in lbs}
    samples: dict[str, dict[str, list]] = {m: {} for m in lbs}
    live: list[str] = []
    try:
        for m, cfg in cfgs.items():
            lab.down(cfg)
            try:
                lab.up(cfg)
                ns = lab.namespaces(cfg)
                # Connection churn, both labs alike: the full port range, and connect() may
                # reuse a port in TIME_WAIT (tcp_tw_reuse=1, safe with timestamps). Without
                # it the one-address generator runs out of ports behind HAProxy (which
                # relays the target's FIN after the data, so wrk closes first and keeps
                # ~32k TIME_WAITs) and HAProxy's rate falls run after run (18k -> 7k/s).
                for role in ("inet", "node"):
                    netns.sysctl(ns[role], "net.ipv4.ip_local_port_range", "1024 65535")
                    netns.sysctl(ns[role], "net.ipv4.tcp_tw_reuse", 1)
                start_target_servers(cfg, workdir)
                wait_ready(cfg)
            except Exception as exc:  # report and go on with the others
                res[m]["error"] = f"{type(exc).__name__}: {exc}"
                lab.down(cfg)
                continue
            res[m]["_fwd0"] = lab.forward_packets(cfg)
            if m == "xdp":
                res[m]["attached"] = lab.status(cfg)["node"]["attached"]
                res[m]["_v0"] = _xdp_counters(cfg)
            live.append(m)
        # The XDP node's agent (health checks, flow accounting) is part of the XDP NLB: it
        # runs during the "xdp" runs and its CPU time is recorded. During the nftlb and
        # HAProxy runs it is paused (SIGSTOP), so the XDP lab's control plane takes no CPU
        # from them. The "xdp_agent_paused" runs pause it too: the data path alone.
        agent = _agent_pid(cfgs["xdp"]) if "xdp" in live else None
        runs = [(name, m, pause) for name, m, pause in
                (("xdp", "xdp", False), ("xdp_agent_paused", "xdp", True),
                 ("nftlb", "nftlb", True), ("haproxy", "haproxy", True))
                if m in live and (name != "xdp_agent_paused" or agent_paused_runs)]
        for name, _m, _p in runs:
            res.setdefault(name, {"lb": name})
            samples.setdefault(name, {})
        if "xdp" in res:
            res["xdp"]["agent_cpu_percent"] = []
        failed: set[str] = set()
        for rep in range(repeat):
            for key, fresh in (("fresh_rps", True), ("keepalive_rps", False)):
                for name, m, pause in runs:
                    if name in failed:
                        continue
                    print(f"  rep {rep + 1}/{repeat} {key} {name}", file=sys.stderr, flush=True)
                    c0, t0 = _cpu_seconds(agent), time.monotonic()
                    try:
                        with _Paused(agent if pause else None):
                            w = run_wrk(cfgs[m], seconds, connections, threads, fresh)
                    except Exception as exc:
                        res[name]["error"] = f"{key}: {type(exc).__name__}: {exc}"
                        failed.add(name)
                        continue
                    c1 = _cpu_seconds(agent)
                    if name == "xdp" and c0 is not None and c1 is not None:
                        res[name]["agent_cpu_percent"].append(
                            round(100 * (c1 - c0) / (time.monotonic() - t0), 1))
                    samples[name].setdefault(key, []).append(w["rps"])
                    samples[name].setdefault(key.replace("_rps", "_wrk"), []).append(w)
                    time.sleep(1)   # let closing connections settle between runs
        for m in lbs:
            if "_fwd0" in res[m]:
                res[m]["kernel_forwarded_packets"] = lab.forward_packets(cfgs[m]) - \
                    res[m].pop("_fwd0")
            if "_v0" in res[m]:
                before, after = res[m].pop("_v0"), _xdp_counters(cfgs[m])
                res[m]["xdp_verdicts"] = {k: after[k] - before.get(k, 0) for k in after
                                          if after[k] != before.get(k, 0)}
        for name in samples:
            for k, vals in samples[name].items():
                if k.endswith("_rps"):
                    res[name][k] = statistics.median(vals)
                res[name].setdefault("samples", {})[k] = vals
    finally:
        for cfg in cfgs.values():
            lab.down(cfg)
    return list(res.values())


def markdown(results: list[dict], meta: dict) -> str:
    by = {r["lb"]: r for r in results}
    x, n, h = by.get("xdp", {}), by.get("nftlb", {}), by.get("haproxy", {})
    cols = [(r, label) for r, label in
            ((x, f"hyperplane NLB (attach {meta['attach']})"),
             (by.get("xdp_agent_paused"), "hyperplane data path alone (agent paused)"),
             (n, "nftables DNAT (5-tuple hash)"),
             (h, "HAProxy (TCP mode)")) if r]
    lines = [f"NLB benchmark, median of {meta['repeat']} runs of {meta['seconds']} s per test "
             f"(round-robin), wrk -t{meta['threads']} -c{meta['connections']} in the internet "
             f"namespace, {meta['cpus']} CPUs, kernel {meta['kernel']}. wrk, the load balancer "
             f"and the three target servers share the {meta['cpus']} cores: read the ratios.",
             "", "| metric | " + " | ".join(label for _, label in cols)
             + " | hyperplane / nftables | hyperplane / HAProxy | target (vs HAProxy) |",
             "|---|" + "---|" * (len(cols) + 3)]
    for key, label, fmt in METRICS:
        cells = []
        for r, _ in cols:
            v = r.get(key)
            cells.append(fmt.format(v) if v else ("error" if "error" in r else "-"))
        xv = x.get(key)
        ratios = [f"**{xv / other[key]:.2f}x**" if xv and other.get(key) else "-"
                  for other in (n, h)]
        lines.append(f"| {label} | " + " | ".join(cells) + " | " + " | ".join(ratios)
                     + f" | >= {TARGETS_FROM_ISSUE[key]}x |")
    for r in results:
        if "error" in r:
            lines.append(f"\n{r['lb']} failed: {r['error']}")
    if x.get("agent_cpu_percent"):
        lines.append(f"\nXDP node's agent CPU during the hyperplane runs (% of one core; "
                     f"fresh, keep-alive, per round): {x['agent_cpu_percent']}; paused during "
                     "the other runs.")
    if x.get("xdp_verdicts") is not None:
        v = x["xdp_verdicts"]
        lines.append(f"\nhyperplane node (attached {x.get('attached')}): kernel forwarded "
                     f"{x.get('kernel_forwarded_packets')} packets; "
                     f"TX_NLB_IN {v.get('TX_NLB_IN', 0):,}, TX_NLB_OUT {v.get('TX_NLB_OUT', 0):,}"
                     + "".join(f", {k} {c:,}" for k, c in sorted(v.items())
                               if k not in ("TX_NLB_IN", "TX_NLB_OUT"))
                     + " (at tc one verdict per skb)")
    for r in (n, h):
        if r.get("kernel_forwarded_packets") is not None:
            lines.append(f"\n{r['lb']} node: kernel forwarded {r['kernel_forwarded_packets']:,} "
                         "packets")
    for name, r in by.items():
        errs = [w.get("socket_errors", {}) for k in ("fresh_wrk", "keepalive_wrk")
                for w in r.get("samples", {}).get(k, [])]
        bad = sum(sum(e.values()) for e in errs) + sum(
            w.get("non_2xx", 0) for k in ("fresh_wrk", "keepalive_wrk")
            for w in r.get("samples", {}).get(k, []))
        if bad:
            lines.append(f"\n{name}: wrk socket errors / non-2xx answers over all runs: {bad:,}")
    return "\n".join(lines)


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _version(argv: list[str]) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    return ((r.stdout or "") + (r.stderr or "")).strip().splitlines()[0]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=5, help="each wrk run (default 5)")
    ap.add_argument("--repeat", type=int, default=5,
                    help="runs per test and load balancer, round-robin; median reported "
                         "(default 5)")
    ap.add_argument("--connections", type=int, default=64, help="wrk -c (default 64)")
    ap.add_argument("--threads", type=int, default=2, help="wrk -t (default 2)")
    ap.add_argument("--attach", default="auto", choices=["auto", "tc", "xdp"],
                    help="how the hyperplane data path attaches (default auto: tc on veth; "
                         "xdp = native XDP, the lab turns GRO on at the far ends for it)")
    ap.add_argument("--lbs", default="xdp,nftlb,haproxy",
                    help="which to run (default xdp,nftlb,haproxy)")
    ap.add_argument("--default-table", action="store_true",
                    help="run the hyperplane node with its default table sizes (see XDP_NODE)")
    ap.add_argument("--no-agent-paused-runs", action="store_true",
                    help="skip the extra XDP runs with the node's agent paused")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "nlb.json"))
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("nlb_bench: needs root (network namespaces)", file=sys.stderr)
        return 3
    for tool, pkg in (("wrk", "wrk"), ("haproxy", "haproxy"), ("curl", "curl"),
                      ("nft", "nftables")):
        if shutil.which(tool) is None:
            print(f"nlb_bench: needs {tool}: apt-get install {pkg}", file=sys.stderr)
            return 3
    lbs = [m.strip() for m in args.lbs.split(",") if m.strip()]
    if not set(lbs) <= set(LBS) or not lbs or not 1 <= args.seconds <= 60 \
            or not 1 <= args.repeat <= 20 or not 1 <= args.connections <= 4096 \
            or not 1 <= args.threads <= 16:
        print("nlb_bench: bad --lbs, --seconds (1..60), --repeat (1..20), --connections "
              "(1..4096) or --threads (1..16)", file=sys.stderr)
        return 2
    meta = {"seconds": args.seconds, "repeat": args.repeat, "connections": args.connections,
            "threads": args.threads, "cpus": os.cpu_count(), "kernel": platform.release(),
            "attach": args.attach, "xdp_node": None if args.default_table else XDP_NODE,
            "nf_conntrack_max": _read("/proc/sys/net/netfilter/nf_conntrack_max"),
            "command": " ".join([".venv/bin/python", "bench/nlb_bench.py",
                                 *(argv if argv is not None else sys.argv[1:])]),
            "loadavg_at_start": os.getloadavg(),
            "haproxy": _version(["haproxy", "-v"]), "wrk": _version(["wrk", "-v"]),
            "generator_shares_cpus_with_system_under_test": True,
            "targets": "haproxy http-request return, 1 thread each",
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    import tempfile
    with tempfile.TemporaryDirectory(prefix="hp-nlb-bench-") as workdir:
        results = run(args.seconds, args.repeat, args.connections, args.threads,
                      args.attach, lbs, workdir, not args.no_agent_paused_runs,
                      args.default_table)
    by = {r["lb"]: r for r in results}
    ratios, ratios_paused, ratios_nft = {}, {}, {}
    for key, _, _ in METRICS:
        h = by.get("haproxy", {}).get(key)
        nf = by.get("nftlb", {}).get(key)
        if h and by.get("xdp", {}).get(key):
            ratios[key] = by["xdp"][key] / h
        if h and by.get("xdp_agent_paused", {}).get(key):
            ratios_paused[key] = by["xdp_agent_paused"][key] / h
        if nf and by.get("xdp", {}).get(key):
            ratios_nft[key] = by["xdp"][key] / nf
    out = {"meta": meta, "results": results, "ratio_xdp_to_haproxy": ratios,
           "ratio_xdp_agent_paused_to_haproxy": ratios_paused,
           "ratio_xdp_to_nftlb": ratios_nft,
           "targets_from_issue": TARGETS_FROM_ISSUE,
           "targets_met": {k: ratios[k] >= TARGETS_FROM_ISSUE[k] for k in ratios}}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    print(markdown(results, meta))
    print(f"\n(written to {os.path.relpath(args.out)})", file=sys.stderr)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
