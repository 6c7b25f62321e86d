#!/usr/bin/env python3
"""Lab benchmark: the same traffic through the one-node lab in modes kernel (the floor:
plain forwarding, no NAT), nft (Linux NAT) and xdp (hyperplane), one after another.

Each lab is built exactly as `hpctl lab up --mode M [--attach A]` builds it: default
offloads (TSO/GSO/GRO, checksum offload), neighbours resolved by ARP, and in mode xdp the
node's default table sizes and timeouts and its agent (started as `hpctl nat up` starts
it: the garbage collection of closed and expired flows is the agent's; with the lab's NLB
it also health-checks the targets). The bench changes nothing of it, apart from the
client's ephemeral port range (1024-65535) for the connection churn.

Measures, per mode:
  udp_pps        small-packet UDP, packets/s seen by the receiver
                 (iperf3 -u -l 18 -b 0, client -> server in inet)
  tcp_conn_per_s new TCP connections/s: processes in the client namespace loop
                 connect / read one byte / close (RST) against accept-send-close
                 servers on 2 addresses x 4 ports in inet (8 destinations, so a NAT's
                 per-destination port space is not the limit)
  tcp_gbps       TCP bulk throughput (iperf3, one stream), receiver side

Each test runs --repeat times, round-robin over the modes (one lab per mode, all up at
once), and the median is reported, with its ratio to the floor measured in the same run.
Generators are pinned to the first CPU, servers to the last. The traffic generators share
this machine's cores with the system under test, so absolute numbers say little; the
ratios are the result. Writes bench/results/lab.json and prints a markdown table.

Accounting recorded per mode: packets the node's kernel forwarded (nft forward counter:
in mode xdp these slipped past the data path and were dropped), in mode xdp the verdict
counters (at tc one verdict per skb: a GSO/GRO superpacket is one verdict for several wire
packets; ARP is PASS_NON_IP), translated packets handed to the kernel to fragment (nft
assist counter), where the data path is attached, and the agent's CPU time.

    sudo .venv/bin/python bench/lab_bench.py --seconds 5 --repeat 5
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import selectors
import socket
import struct
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

CONN_PORTS = [8100, 8101, 8102, 8103]


def _pin(cpu_role: str):
    """preexec: generators on the first CPU, servers on the last (when there are two or
    more), so runs are comparable; the node's forwarding work runs in softirq on the
    sending CPU, i.e. it competes with the generator, which is what is measured."""
    cpus = sorted(os.sched_getaffinity(0))
    cpu = cpus[0] if cpu_role == "generator" else cpus[-1]
    return lambda: os.sched_setaffinity(0, {cpu})


# --- helper processes (run inside a lab namespace by the bench itself) ------------------

def _acceptor(addrs: list[str], ports: list[int], seconds: float) -> None:
    """Accept, send one byte, close; for `seconds` at most. Prints how many it served."""
    sel = selectors.DefaultSelector()
    for a in addrs:
        for p in ports:
            s = socket.socket()
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.bind((a, p))
            s.listen(4096)
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ)
    print("ready", flush=True)
    served = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for key, _ in sel.select(0.2):
            for _ in range(64):
                try:
                    c, _peer = key.fileobj.accept()
                except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                    break
                try:
                    c.send(b"x")
                except OSError:
                    pass
                c.close()
                served += 1
    print(json.dumps({"served": served}), flush=True)


def _connector(addrs: list[str], ports: list[int], seconds: float, worker: int) -> None:
    """Loop connect / recv 1 byte / close (RST) for `seconds`; print the counts."""
    dsts = [(a, p) for a in addrs for p in ports]
    linger = struct.pack("ii", 1, 0)
    ok = failed = 0
    i = worker
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        s.settimeout(1.0)
        try:
            s.connect(dsts[i % len(dsts)])
            if s.recv(1) == b"x":
                ok += 1
            else:
                failed += 1
        except OSError:
            failed += 1
        finally:
            s.close()
        i += 1
    print(json.dumps({"ok": ok, "failed": failed}), flush=True)


# --- measurements ------------------------------------------------------------------------

def _listening(ns: str, port: int) -> bool:
    from hyperplane import netns

    def check():
        with open("/proc/thread-self/net/tcp") as f:
            return any(l.split()[1].endswith(f":{port:04X}") and l.split()[3] == "0A"
                       for l in f.readlines()[1:])
    return netns.call_in(ns, check)


def _wait_listening(ns: str, port: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not _listening(ns, port):
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on port {port} in {ns}")
        time.sleep(0.05)


def _iperf(ns_client: str, ns_server: str, server_ip: str, args: list[str],
           seconds: int) -> dict:
    from hyperplane import netns
    port = 5201
    srv = netns.popen_in(ns_server, ["iperf3", "-s", "-1", "-B", server_ip, "-p", str(port)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         preexec=_pin("server"))
    try:
        _wait_listening(ns_server, port)
        r = netns.run_in(ns_client, ["iperf3", "-c", server_ip, "-p", str(port), "-t",
                                     str(seconds), "-J", *args], check=False,
                         preexec=_pin("generator"),
                         capture_output=True, text=True, timeout=seconds + 30)
        data = json.loads(r.stdout) if r.stdout.strip() else {}
        if r.returncode != 0 or "error" in data:
            raise RuntimeError(f"iperf3 failed: {data.get('error') or r.stderr.strip()}")
        return data
    finally:
        srv.kill()
        srv.wait(10)


def measure_udp_pps(ns: dict, seconds: int) -> dict:
    from hyperplane import lab
    # -w 8M: a big receive buffer, so the receiver's socket is not what drops packets
    d = _iperf(ns["client"], ns["inet"], lab.INET_IPS[0],
               ["-u", "-l", "18", "-b", "0", "-w", "8M"], seconds)
    rcv = d["end"]["sum_received"]
    got = rcv["packets"] - rcv["lost_packets"]
    return {"udp_pps": got / rcv["seconds"], "udp_sent_pps": rcv["packets"] / rcv["seconds"],
            "udp_lost_percent": rcv["lost_percent"]}


def measure_tcp_bulk(ns: dict, seconds: int) -> dict:
    from hyperplane import lab
    d = _iperf(ns["client"], ns["inet"], lab.INET_IPS[0], [], seconds)
    return {"tcp_gbps": d["end"]["sum_received"]["bits_per_second"] / 1e9,
            "tcp_retransmits": d["end"]["sum_sent"].get("retransmits")}


def measure_tcp_conn(ns: dict, seconds: int, procs: int) -> dict:
    from hyperplane import lab, netns
    addrs = lab.INET_IPS
    py = sys.executable
    me = os.path.abspath(__file__)
    acc = netns.popen_in(ns["inet"], [py, me, "_acceptor", ",".join(addrs),
                                      ",".join(map(str, CONN_PORTS)), str(seconds + 5)],
                         stdout=subprocess.PIPE, text=True, preexec=_pin("server"))
    conns = []
    try:
        if acc.stdout.readline().strip() != "ready":
            raise RuntimeError("the acceptor did not start")
        t0 = time.monotonic()
        conns = [netns.popen_in(ns["client"], [py, me, "_connector", ",".join(addrs),
                                               ",".join(map(str, CONN_PORTS)), str(seconds),
                                               str(w)], stdout=subprocess.PIPE, text=True)
                 for w in range(procs)]
        ok = failed = 0
        for c in conns:
            out, _ = c.communicate(timeout=seconds + 30)
            res = json.loads(out.strip().splitlines()[-1])
            ok += res["ok"]
            failed += res["failed"]
        took = time.monotonic() - t0
    finally:
        for c in conns:
            if c.poll() is None:
                c.kill()
                c.wait(5)
        acc.terminate()
        try:
            acc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            acc.kill()
            acc.wait(5)
    return {"tcp_conn_per_s": ok / took, "tcp_conn_failed": failed}


METRICS = [("udp_pps", "small UDP packets/s (receiver)", "{:,.0f}"),
           ("tcp_conn_per_s", "new TCP connections/s", "{:,.0f}"),
           ("tcp_gbps", "TCP bulk Gbit/s", "{:.2f}")]


MEASURES = {"udp": lambda ns, sec, procs: measure_udp_pps(ns, sec),
            "conn": lambda ns, sec, procs: measure_tcp_conn(ns, sec, procs),
            "bulk": lambda ns, sec, procs: measure_tcp_bulk(ns, sec)}


def run(modes: list[str], attach: str, seconds: int, repeat: int,
        conn_procs: int) -> list[dict]:
    """Build one lab per mode (all at once, distinct prefixes), then take the measurements
    round-robin over the modes, `repeat` times, so background load drifts hit every mode
    alike; report the median of each."""
    from hyperplane import lab, netns
    import statistics
    # The lab's defaults (nlb=True: in mode xdp the node's agent runs, as `hpctl nat up`
    # runs it; it is the node's garbage collector). Nothing else is changed.
    cfgs = {m: lab.LabConfig(prefix=f"hpb{os.getpid() % 1000}{m[0]}", mode=m, attach=attach)
            for m in modes}
    res: dict[str, dict] = {m: {"mode": m} for m in modes}
    samples: dict[str, dict[str, list]] = {m: {} for m in modes}
    live: list[str] = []
    try:
        for m, cfg in cfgs.items():
            lab.down(cfg)
            try:
                lab.up(cfg)
            except Exception as exc:  # report and go on with the other modes
                res[m]["error"] = f"{type(exc).__name__}: {exc}"
                lab.down(cfg)
                continue
            ns = lab.namespaces(cfg)
            # Connection churn: the client closes with RST (no TIME_WAIT), full port range.
            netns.sysctl(ns["client"], "net.ipv4.ip_local_port_range", "1024 65535")
            res[m]["_fwd0"] = lab.forward_packets(cfg)
            if m == "xdp":
                st = lab.status(cfg)
                res[m]["attached"] = st["node"]["attached"]
                res[m]["_v0"] = _xdp_counters(cfg)
                res[m]["_assist0"] = lab.assisted_packets(cfg)
                res[m]["_agent"] = (st["nlb"].get("agent") or {}).get("pid")
                res[m]["_agent_cpu0"] = (_cpu_seconds(res[m]["_agent"]), time.monotonic())
            live.append(m)
        for rep in range(repeat):
            for name, fn in MEASURES.items():
                for m in list(live):
                    print(f"  rep {rep + 1}/{repeat} {name} {m}", file=sys.stderr, flush=True)
                    try:
                        for k, v in fn(lab.namespaces(cfgs[m]), seconds, conn_procs).items():
                            samples[m].setdefault(k, []).append(v)
                    except Exception as exc:
                        res[m]["error"] = f"{name}: {type(exc).__name__}: {exc}"
                        live.remove(m)
        for m in modes:
            if "_fwd0" in res[m]:
                res[m]["kernel_forwarded_packets"] = (lab.forward_packets(cfgs[m])
                                                      - res[m].pop("_fwd0"))
            if "_v0" in res[m]:
                before, after = res[m].pop("_v0"), _xdp_counters(cfgs[m])
                res[m]["xdp_verdicts"] = {k: after[k] - before.get(k, 0) for k in after
                                          if after[k] != before.get(k, 0)}
                res[m]["kernel_assisted_packets"] = (lab.assisted_packets(cfgs[m])
                                                     - res[m].pop("_assist0"))
                pid = res[m].pop("_agent")
                c0, t0 = res[m].pop("_agent_cpu0")
                c1 = _cpu_seconds(pid)
                res[m]["agent_cpu_percent"] = (round(100 * (c1 - c0) / (time.monotonic() - t0), 1)
                                               if c0 is not None and c1 is not None else None)
            for k, vals in samples[m].items():
                vals = [v for v in vals if v is not None]
                if vals:
                    res[m][k] = statistics.median(vals)
                    res[m].setdefault("samples", {})[k] = vals
    finally:
        for cfg in cfgs.values():
            lab.down(cfg)
    return [res[m] for m in modes]


def _cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds of a process so far (None when it is gone)."""
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _xdp_counters(cfg) -> dict:
    from hyperplane import lab
    from hyperplane.node import lifecycle as node
    return node.read_counters(lab.node_name(cfg), pin_root=lab.topology(cfg)["node"]["pin_root"])


def markdown(results: list[dict], meta: dict) -> str:
    floor = next((r for r in results if r["mode"] == "kernel" and "error" not in r), None)
    lines = [f"Lab benchmark, median of {meta['repeat']} runs of {meta['seconds']} s per test "
             f"(round-robin over the modes), {meta['cpus']} CPUs, kernel "
             f"{meta['kernel']}. The traffic generators share the {meta['cpus']} cores with the "
             "system under test: compare the ratios to the floor (mode kernel: plain "
             "forwarding, no NAT) measured in this same run, not the absolute numbers.", "",
             "| metric | " + " | ".join(r["mode"] + (f" (attach {meta['attach']})"
                                               if r["mode"] == "xdp" else "")
                                      for r in results) + " |",
             "|---|" + "---|" * len(results)]
    for key, label, fmt in METRICS:
        cells = []
        for r in results:
            if "error" in r or key not in r:
                cells.append("error" if "error" in r else "-")
                continue
            cell = fmt.format(r[key])
            if floor and r is not floor and floor.get(key):
                cell += f" ({r[key] / floor[key]:.2f}x)"
            cells.append(cell)
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| new TCP connections failed (per run, median) | " + " | ".join(
        f"{r['tcp_conn_failed']:,.0f}" if "tcp_conn_failed" in r else "-" for r in results)
        + " |")
    for r in results:
        if "error" in r:
            lines.append(f"\nmode {r['mode']} failed: {r['error']}")
        elif r["mode"] == "xdp":
            v = r.get("xdp_verdicts", {})
            lines.append(f"\nmode xdp: data path attached {r.get('attached')}; the node kernel "
                         f"forwarded {r.get('kernel_forwarded_packets')} packets the data path "
                         f"did not handle (dropped) and fragmented "
                         f"{r.get('kernel_assisted_packets')} it handed over; the agent used "
                         f"{r.get('agent_cpu_percent')} % of one core over the run. Verdicts "
                         "(at tc one per skb, a superpacket counts once): "
                         + ", ".join(f"{k} {n:,}" for k, n in sorted(v.items(),
                                                                      key=lambda x: -x[1])))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=5,
                    help="duration of each test run (default 5)")
    ap.add_argument("--repeat", type=int, default=5,
                    help="runs of each test per mode, round-robin over the modes; the median "
                         "is reported (default 5)")
    ap.add_argument("--modes", default="kernel,nft,xdp",
                    help="comma-separated, in order (default kernel,nft,xdp)")
    ap.add_argument("--attach", default="auto", choices=["auto", "tc", "xdp"],
                    help="mode xdp: how the data path attaches (default auto: tc on veth; "
                         "xdp = native XDP, the lab turns GRO on at the far ends for it)")
    ap.add_argument("--conn-procs", type=int, default=2,
                    help="connector processes for the connections/s test (default 2)")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "lab.json"))
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("lab_bench: needs root (network namespaces)", file=sys.stderr)
        return 3
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("kernel", "nft", "xdp")]
    if bad or not 1 <= args.seconds <= 120:
        print(f"lab_bench: bad --modes {bad} or --seconds (1..120)", file=sys.stderr)
        return 2
    meta = {"seconds": args.seconds, "cpus": os.cpu_count(), "kernel": platform.release(),
            "attach": args.attach, "conn_procs": args.conn_procs,
            "lab": "defaults (offloads, ARP, table sizes, timeouts, agent)",
            "generator_shares_cpus_with_system_under_test": True,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    if not 1 <= args.repeat <= 20:
        print("lab_bench: --repeat must be 1..20", file=sys.stderr)
        return 2
    meta["repeat"] = args.repeat
    meta["command"] = " ".join([".venv/bin/python", "bench/lab_bench.py",
                                *(argv if argv is not None else sys.argv[1:])])
    meta["loadavg_at_start"] = os.getloadavg()
    results = run(modes, args.attach, args.seconds, args.repeat, args.conn_procs)
    floor = next((r for r in results if r["mode"] == "kernel" and "error" not in r), None)
    for r in results:
        if floor and "error" not in r:
            r["ratio_to_floor"] = {k: r[k] / floor[k] for k, _, _ in METRICS
                                   if r.get(k) and floor.get(k)}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    print(markdown(results, meta))
    print(f"\n(written to {os.path.relpath(args.out)})", file=sys.stderr)
    return 1 if any("error" in r for r in results) else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "_acceptor":
        _acceptor(sys.argv[2].split(","), [int(p) for p in sys.argv[3].split(",")],
                  float(sys.argv[4]))
    elif len(sys.argv) > 1 and sys.argv[1] == "_connector":
        _connector(sys.argv[2].split(","), [int(p) for p in sys.argv[3].split(",")],
                   float(sys.argv[4]), int(sys.argv[5]))
    else:
        sys.exit(main())
