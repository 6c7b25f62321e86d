#!/usr/bin/env python3
"""NAT port allocation cost against occupancy (issue 6 section 5: "report allocation cost
at 0/50/90/99 % occupancy"), through BPF_PROG_TEST_RUN.

One gateway with one NAT IP and ports 1024-65535 (64,512 pairs toward one destination),
one destination (198.18.0.2:80, TCP). For each occupancy level (--levels, default
0,50,90,99 % of the pairs taken) the bench times --flows new-flow SYNs, each from a fresh
client tuple toward that destination, two ways:

  sequential  the occupancy is reached the way the data path fills it: real connections
              through the program (SYN, SYN-ACK, the client's ACK: confirmed into `flows`),
              so the per-destination cursor walks the pair space from its hashed start and
              the taken ports are one contiguous run ending at the cursor. The levels are
              reached one after the other in one fill (0 -> 50 -> 90 -> 99 %); every fill
              SYN must be translated (allocations succeed up to 99 %).
  scattered   the taken ports are a random subset (seeded), written straight into
              `nat_resv` with both flow entries of a live, established flow each in
              `flows` (so the reclaim attempt finds its owner alive and refuses), and the
              cursor is put at a random place before every timed SYN. The honest worst case
              for the cursor's linear probe: HP_PORT_PROBES (32) inserts, then one reclaim
              attempt, then the flow is refused (DROP_PORT_ALLOC): the refusal rate is
              reported (about occupancy^32 for a random layout).
  scattered_kept  the same layout, the cursor put at a random place once and then left
              where the data path leaves it (as on a node): a refusal does not move the
              cursor, so the flows after it probe the same window again.

Every timed SYN sees the same table: after the call its reservation and both pending
entries are removed again (outside the timed part), and in the sequential method the
cursor is put back where the fill left it. The number of probes an allocation took is
read from the port it got ((port - cursor) mod 64512 + 1). The trivial program of the
hook, timed per call in the same round, is the reference (per-call overhead included in
both). Per round each cell is the mean of its calls; the table gives the median over
rounds with min-max. Verdict counters are checked: every timed SYN is TX_NAT_OUT or
DROP_PORT_ALLOC, as its action said, and no reservation is reclaimed.

    sudo .venv/bin/python bench/port_alloc_bench.py --rounds 5
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shlex
import socket
import statistics
import struct
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import trkit  # noqa: E402
from trkit import RET, Runner, be32, cbuf, flow_key, stat_delta, summary, verdict_delta  # noqa: E402
from hyperplane import netns  # noqa: E402
from hyperplane.datapath import sandbox
from hyperplane.datapath.loader import Datapath, Sizes  # noqa: E402
from hyperplane.observe.metrics import stat_counts, verdict_counts  # noqa: E402
from hyperplane.nat.gateway import GatewayConfig, apply_gateway  # noqa: E402
from hyperplane.datapath.sandbox import CLIENT, CLIENT2, CLIENT_MAC, INET, INET_MAC, MAC, NAT_IP  # noqa: E402
from hyperplane.datapath.settings import Timeouts, write_config  # noqa: E402

NS = f"hpb-pa-{os.getpid()}"
PORT_MIN, PORT_MAX = 1024, 65535
PAIRS = PORT_MAX - PORT_MIN + 1          # one NAT IP: 64512 (NAT IP, port) pairs
DPORT = 80
TCP = socket.IPPROTO_TCP
KIND_NAT_OUT, KIND_NAT_IN, TCP_S_ESTABLISHED = 1, 2, 2
ISN_C, ISN_S = 1000, 5000


# --- raw frames (tens of thousands per fill: no scapy per packet) ------------------------

def _mac(s: str) -> bytes:
    return bytes.fromhex(s.replace(":", ""))


def tcp_frame(src_mac, dst_mac, src, dst, sport, dport, flags, seq, ack, ttl=64) -> bytes:
    """Ethernet + IPv4 + TCP (20 bytes, no options), checksums right."""
    s, d = socket.inet_aton(src), socket.inet_aton(dst)
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, 64240, 0, 0)
    csum = trkit.inet_sum(s + d + struct.pack("!BBH", 0, TCP, len(tcp)) + tcp)
    tcp = tcp[:16] + struct.pack("!H", csum) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0, ttl, TCP, 0, s, d)
    ip = ip[:10] + struct.pack("!H", trkit.inet_sum(ip)) + ip[12:]
    return _mac(dst_mac) + _mac(src_mac) + b"\x08\x00" + ip + tcp


SYN, ACK, SYNACK = 0x02, 0x10, 0x12
METHODS = ("sequential", "scattered", "scattered_kept")


def client_syn(client: str, cport: int) -> bytes:
    return tcp_frame(CLIENT_MAC, MAC["in0"], client, INET, cport, DPORT, SYN, ISN_C, 0)


def client_ack(client: str, cport: int) -> bytes:
    return tcp_frame(CLIENT_MAC, MAC["in0"], client, INET, cport, DPORT, ACK, ISN_C + 1,
                     ISN_S + 1)


def server_synack(nat_port: int) -> bytes:
    return tcp_frame(INET_MAC, MAC["out0"], INET, NAT_IP, DPORT, nat_port, SYNACK, ISN_S,
                     ISN_C + 1)


def sport_of(frame: bytes) -> int:
    return int.from_bytes(frame[34:36], "big")


# --- the data path and its state --------------------------------------------------------

class Bench:
    def __init__(self, hook: str, ifidx: dict, flows_per_level: int):
        self.hook, self.ifidx = hook, ifidx
        self.ret = RET[hook]
        self.trivial_obj, self.trivial_fd = trkit.load_trivial(hook)
        # production sizes: flows 262144 entries, nat_resv 131072
        self.dp = Datapath(Sizes(), hook=hook)
        write_config(self.dp, Timeouts(), hash_seed=0x12345678)
        apply_gateway(self.dp, GatewayConfig("gw-ports", 0, [NAT_IP], ["10.10.0.0/24"],
                                             port_min=PORT_MIN, port_max=PORT_MAX))
        self.dp.table("flow_events").open_ring_buffer(lambda ctx, data, size: 0)
        self.t = {n: self.dp.table(n) for n in ("flows", "pending", "nat_resv", "nat_cursor")}
        ck = self.t["nat_cursor"].Key()
        ck.dst_ip, ck.dst_port, ck.proto, ck.gw_id = be32(INET), socket.htons(DPORT), TCP, 0
        self.cursor_key = ck
        self.n_timed = flows_per_level
        self.next_timed_port = PORT_MIN  # client ports of the timed SYNs (CLIENT2)

    def close(self):
        for f in (self.trivial_obj.cleanup, self.dp.close):
            try:
                f()
            except Exception:
                pass

    def drain(self):
        self.dp.bpf.ring_buffer_consume()

    def clear(self):
        for t in self.t.values():
            trkit.clear_table(t)
        self.drain()

    def occupancy(self) -> int:
        return sum(1 for _ in self.t["nat_resv"].keys())

    def cursor(self) -> int | None:
        v = self.t["nat_cursor"].get(self.cursor_key)
        return None if v is None else int(v.value)

    def set_cursor(self, c: int) -> None:
        self.t["nat_cursor"][self.cursor_key] = self.t["nat_cursor"].Leaf(c)

    def resv_key(self, nat_port: int):
        k = self.t["nat_resv"].Key()
        k.dst_ip, k.nat_ip = be32(INET), be32(NAT_IP)
        k.dst_port, k.nat_port, k.proto = socket.htons(DPORT), socket.htons(nat_port), TCP
        return k

    # -- sequential: real connections through the program --

    def fill_sequential(self, upto: int, next_cport: int) -> tuple[int, list[int]]:
        """Open connections (full handshake) from CLIENT ports next_cport.. until `upto`
        pairs are taken; returns the next free client port and the fill SYNs' durations.
        Runs on a thread in the namespace."""
        main = Runner(self.dp.prog_fd, self.ifidx["in0"], self.hook)
        back = Runner(self.dp.prog_fd, self.ifidx["out0"], self.hook)
        redirect = self.ret["redirect"]
        taken = self.occupancy()
        durations = []
        cport = next_cport
        while taken < upto:
            if cport > 65535:
                raise RuntimeError("out of client ports for the fill")
            durations.append(main.once(cbuf(client_syn(CLIENT, cport))))
            if main.retval != redirect:
                raise AssertionError(f"fill SYN {taken + 1} of {upto}: action {main.retval} "
                                     f"(allocations must succeed up to the level)")
            nat_port = sport_of(main.output())
            back.once(cbuf(server_synack(nat_port)))
            main.once(cbuf(client_ack(CLIENT, cport)))
            if back.retval != redirect or main.retval != redirect:
                raise AssertionError(f"fill handshake {taken + 1}: SYN-ACK {back.retval}, "
                                     f"ACK {main.retval}")
            taken += 1
            cport += 1
            if taken % 1000 == 0:
                self.drain()
        self.drain()
        return cport, durations

    # -- scattered: reservations and live flows written straight into the maps --

    def write_scattered(self, n: int, rng: random.Random) -> None:
        """n random pairs taken, each by a live established flow (both entries in
        `flows`, last seen now; reservation older than the reclaim grace)."""
        if n == 0:
            return
        ports = [PORT_MIN + j for j in rng.sample(range(PAIRS), n)]
        rt, ft = self.t["nat_resv"], self.t["flows"]
        now = time.monotonic_ns()          # bpf_ktime_get_coarse_ns's clock (CLOCK_MONOTONIC)
        old = max(1, now - 3_600 * 10**9)  # far older than HP_RESV_GRACE_NS
        rkeys, rvals = (rt.Key * n)(), (rt.Leaf * n)()
        fkeys, fvals = (ft.Key * (2 * n))(), (ft.Leaf * (2 * n))()
        for i, port in enumerate(ports):
            cport = PORT_MIN + i
            orig = flow_key(ft, CLIENT, INET, cport, DPORT)
            reply = flow_key(ft, INET, NAT_IP, DPORT, port)
            rk = rkeys[i]
            rk.dst_ip, rk.nat_ip, rk.dst_port, rk.nat_port, rk.proto = \
                reply.src_ip, reply.dst_ip, reply.src_port, reply.dst_port, TCP
            rv = rvals[i]
            for f in ("src_ip", "dst_ip", "src_port", "dst_port", "proto"):
                setattr(rv.orig, f, getattr(orig, f))
            rv.taken_ns = old
            for j, (key, twin, kind, ifname, nsrc, ndst, nsport, ndport) in enumerate((
                    (orig, reply, KIND_NAT_OUT, "in0", reply.dst_ip, reply.src_ip,
                     reply.dst_port, reply.src_port),
                    (reply, orig, KIND_NAT_IN, "out0", orig.dst_ip, orig.src_ip,
                     orig.dst_port, orig.src_port))):
                fkeys[2 * i + j] = key
                v = fvals[2 * i + j]
                v.new_src_ip, v.new_dst_ip, v.new_src_port, v.new_dst_port = \
                    nsrc, ndst, nsport, ndport
                v.in_ifindex = self.ifidx[ifname]
                v.kind, v.tcp_state, v.flags = kind, TCP_S_ESTABLISHED, 0
                v.last_seen_ns = v.created_ns = now
                v.wscale = 0
                for f in ("src_ip", "dst_ip", "src_port", "dst_port", "proto"):
                    setattr(v.twin, f, getattr(twin, f))
        rt.items_update_batch(rkeys, rvals)
        ft.items_update_batch(fkeys, fvals)

    # -- the timed SYNs --

    def timed(self, cursor_at, rng: random.Random) -> dict:
        """--flows SYNs from fresh CLIENT2 ports, each seeing the same reservations
        (released afterwards); cursor_at: a fixed cursor to restore before every SYN, None
        for a random one before every SYN, or "kept": a random one before the first, then
        wherever the data path leaves it. Runs on a thread in the namespace."""
        main = Runner(self.dp.prog_fd, self.ifidx["in0"], self.hook)
        redirect, drop = self.ret["redirect"], self.ret["drop"]
        pend, resv = self.t["pending"], self.t["nat_resv"]
        ft = self.t["flows"]
        ok, refused, probes = [], [], []
        v0, s0 = verdict_counts(self.dp), stat_counts(self.dp)
        if cursor_at == "kept":
            self.set_cursor(rng.randrange(PAIRS))
        for i in range(self.n_timed):
            if cursor_at == "kept":
                c = self.cursor()
            else:
                c = cursor_at if cursor_at is not None else rng.randrange(PAIRS)
                self.set_cursor(c)
            cport = self.next_timed_port
            self.next_timed_port = PORT_MIN + (cport + 1 - PORT_MIN) % PAIRS
            buf = cbuf(client_syn(CLIENT2, cport))
            d = main.once(buf)
            if main.retval == redirect:
                nat_port = sport_of(main.output())
                ok.append(d)
                probes.append((nat_port - PORT_MIN - c) % PAIRS + 1)
                # release: the reservation and both pending entries (they must exist)
                del resv[self.resv_key(nat_port)]
                del pend[flow_key(ft, CLIENT2, INET, cport, DPORT)]
                del pend[flow_key(ft, INET, NAT_IP, DPORT, nat_port)]
            elif main.retval == drop:
                refused.append(d)
            else:
                raise AssertionError(f"timed SYN {i}: action {main.retval}")
            if (i + 1) % 1000 == 0:
                self.drain()
        self.drain()
        if isinstance(cursor_at, int):
            self.set_cursor(cursor_at)
        vd, sd = verdict_delta(self.dp, v0), stat_delta(self.dp, s0)
        want = {k: n for k, n in (("TX_NAT_OUT", len(ok)), ("DROP_PORT_ALLOC", len(refused)))
                if n}
        trkit.check(f"{self.hook} timed SYNs", vd, want)
        if "RESV_RECLAIMED" in sd:
            raise AssertionError(f"a live reservation was reclaimed: {sd}")
        out = {"n": self.n_timed, "allocated": len(ok), "refused": len(refused),
               "refusal_rate": len(refused) / self.n_timed, "stats": sd}
        if ok:
            out["alloc"] = summary(ok)
            out["probes_mean"] = statistics.fmean(probes)
            out["probes_max"] = max(probes)
        if refused:
            out["refused_ns"] = summary(refused)
        return out

    def open_and_release(self) -> None:
        """One SYN toward the destination (its cursor is made), its flow removed again."""
        main = Runner(self.dp.prog_fd, self.ifidx["in0"], self.hook)
        main.once(cbuf(client_syn(CLIENT2, 65535)))
        assert main.retval == self.ret["redirect"], main.retval
        nat_port = sport_of(main.output())
        ft = self.t["flows"]
        del self.t["nat_resv"][self.resv_key(nat_port)]
        del self.t["pending"][flow_key(ft, CLIENT2, INET, 65535, DPORT)]
        del self.t["pending"][flow_key(ft, INET, NAT_IP, DPORT, nat_port)]
        assert self.cursor() is not None and self.occupancy() == 0
        self.drain()

    def trivial_call(self, n: int) -> dict:
        r = Runner(self.trivial_fd, self.ifidx["in0"], self.hook)
        return summary(r.run([cbuf(client_syn(CLIENT2, 5000))] * n, self.ret["pass"]))


# --- one round ---------------------------------------------------------------------------

def one_round(b: Bench, levels: list[int], seed: int) -> dict:
    rng = random.Random(seed)
    res: dict = {m: {} for m in METHODS}

    def body():
        res["trivial_call"] = b.trivial_call(max(b.n_timed, 2000))
        # sequential: one fill, the levels in order
        b.clear()
        # the destination is known (its cursor exists): one connection opened and released
        b.open_and_release()
        nxt = PORT_MIN
        for lv in levels:
            upto = PAIRS * lv // 100
            t0 = time.monotonic()
            nxt, fill_ns = b.fill_sequential(upto, nxt)
            fill_s = time.monotonic() - t0
            assert b.occupancy() == upto
            # every fill connection was confirmed by its handshake: nothing left unconfirmed
            assert not any(True for _ in b.t["pending"].keys()), "unconfirmed fill flows"
            cur = b.cursor()
            cell = b.timed(cur, rng)
            cell["occupied"] = upto
            cell["fill_syn_ns_mean"] = statistics.fmean(fill_ns) if fill_ns else None
            cell["fill_seconds"] = fill_s
            res["sequential"][str(lv)] = cell
        # scattered: rebuilt per level; timed with a random cursor before every SYN, then
        # on the same layout with the cursor left to the data path
        for lv in levels:
            b.clear()
            upto = PAIRS * lv // 100
            b.write_scattered(upto, rng)
            for method, cursor in (("scattered", None), ("scattered_kept", "kept")):
                assert b.occupancy() == upto
                cell = b.timed(cursor, rng)
                cell["occupied"] = upto
                res[method][str(lv)] = cell
        b.clear()

    netns.call_in(NS, body)
    return res


# --- report ------------------------------------------------------------------------------

def aggregate(rounds: list[dict], levels: list[int]) -> dict:
    out = {}
    triv = [r["trivial_call"]["value"] for r in rounds]
    out["trivial_call_ns_median"] = statistics.median(triv)
    for method in METHODS:
        for lv in levels:
            cells = [r[method][str(lv)] for r in rounds]
            a = {"occupied": cells[0]["occupied"], "n_per_round": cells[0]["n"],
                 "refusal_rate_median": statistics.median(c["refusal_rate"] for c in cells),
                 "refusal_rate_min": min(c["refusal_rate"] for c in cells),
                 "refusal_rate_max": max(c["refusal_rate"] for c in cells)}
            alloc = [(c["alloc"]["value"], c["alloc"]["value"] / r["trivial_call"]["value"],
                      c["alloc"]["median"], c["alloc"]["p99"], c["probes_mean"])
                     for c, r in zip(cells, rounds) if "alloc" in c]
            if alloc:
                ns = [x[0] for x in alloc]
                a.update({"alloc_ns_median": statistics.median(ns), "alloc_ns_min": min(ns),
                          "alloc_ns_max": max(ns),
                          "alloc_ratio_median": statistics.median(x[1] for x in alloc),
                          "alloc_call_median_ns": statistics.median(x[2] for x in alloc),
                          "alloc_p99_ns": statistics.median(x[3] for x in alloc),
                          "probes_mean": statistics.median(x[4] for x in alloc)})
            ref = [c["refused_ns"]["value"] for c in cells if "refused_ns" in c]
            if ref:
                a["refused_ns_median"] = statistics.median(ref)
            out[f"{method}_{lv}"] = a
    return out


def table(agg: dict, levels: list[int], hook: str) -> str:
    lines = [f"| method ({hook}) | occupancy | allocated SYN, ns/call, median (min–max) | × trivial "
             f"per call | median call ns | p99 ns | probes (mean) | refused | refused SYN ns |",
             "|---|---|---|---|---|---|---|---|---|"]
    for method in METHODS:
        for lv in levels:
            a = agg[f"{method}_{lv}"]
            occ = f"{lv} % ({a['occupied']:,} of {PAIRS:,})"
            if "alloc_ns_median" in a:
                cost = (f"{a['alloc_ns_median']:.0f} ({a['alloc_ns_min']:.0f}–"
                        f"{a['alloc_ns_max']:.0f})")
                rest = (f"{a['alloc_ratio_median']:.1f} | {a['alloc_call_median_ns']:.0f} | "
                        f"{a['alloc_p99_ns']:.0f} | {a['probes_mean']:.2f}")
            else:
                cost, rest = "-", "- | - | - | -"
            refused = f"{100 * a['refusal_rate_median']:.1f} %"
            rns = f"{a['refused_ns_median']:.0f}" if "refused_ns_median" in a else "-"
            lines.append(f"| {method} | {occ} | {cost} | {rest} | {refused} | {rns} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hook", default="xdp", choices=["xdp", "tc", "both"],
                    help="build of the data path (default xdp: allocation is the same C at "
                         "both hooks)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    ap.add_argument("--flows", type=int, default=2000,
                    help="timed new-flow SYNs per level and method per round (default 2000)")
    ap.add_argument("--levels", default="0,50,90,99",
                    help="occupancy levels in percent, ascending (default 0,50,90,99)")
    ap.add_argument("--seed", type=int, default=6, help="seed of the scattered layouts")
    ap.add_argument("--cpu", type=int, default=None,
                    help="pin to this CPU (default: the last one)")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "port_alloc.json"))
    args = ap.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root (BPF_PROG_TEST_RUN and a network namespace)", file=sys.stderr)
        return 2
    levels = [int(x) for x in args.levels.split(",") if x.strip()]
    if levels != sorted(levels) or not levels or levels[0] < 0 or levels[-1] > 99:
        print("--levels: ascending percentages from 0 to 99", file=sys.stderr)
        return 2
    if args.rounds < 1 or not 1 <= args.flows <= 60000:
        print("--rounds >= 1, --flows 1..60000", file=sys.stderr)
        return 2
    hooks = ("xdp", "tc") if args.hook == "both" else (args.hook,)
    cpu = args.cpu if args.cpu is not None else max(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    started = datetime.datetime.now(datetime.timezone.utc)
    trkit.sigterm_unwinds()
    benches: dict[str, Bench] = {}
    rounds: list[dict] = []
    try:
        ifidx = sandbox.build(NS)
        for hook in hooks:
            benches[hook] = Bench(hook, ifidx, args.flows)
        for i in range(args.rounds):
            r = {}
            for hook in hooks:
                t0 = time.monotonic()
                r[hook] = one_round(benches[hook], levels, args.seed * 1000 + i)
                cells = ", ".join(
                    f"{m[:3]} {lv}%: {r[hook][m][str(lv)].get('alloc', {}).get('value', 0):.0f} ns"
                    f"/{100 * r[hook][m][str(lv)]['refusal_rate']:.0f}% refused"
                    for m in METHODS for lv in levels)
                print(f"round {i + 1}/{args.rounds} {hook} [{time.monotonic() - t0:.0f} s]: "
                      f"{cells}", file=sys.stderr, flush=True)
            rounds.append(r)
    finally:
        for b in benches.values():
            b.close()
        netns.remove(NS)
    cmd = " ".join(shlex.quote(a) for a in [".venv/bin/python", "bench/port_alloc_bench.py",
                                            *(argv if argv is not None else sys.argv[1:])])
    results = {}
    for hook in hooks:
        agg = aggregate([r[hook] for r in rounds], levels)
        results[hook] = agg
        print(table(agg, levels, hook))
        print(f"\n{hook}: trivial program per call (same packets): "
              f"{agg['trivial_call_ns_median']:.1f} ns\n")
    doc = {"meta": {**trkit.machine(), "date": started.isoformat(timespec="seconds"),
                    "command": cmd,
                    **trkit.git_meta(["bpf", "hyperplane", "bench/port_alloc_bench.py",
                                      "bench/trkit.py"]),
                    "hooks": list(hooks), "cpu_pinned": cpu, "rounds": args.rounds,
                    "flows": args.flows, "levels": levels, "seed": args.seed,
                    "pairs": PAIRS, "port_probes": Sizes().port_probes},
           "results": results, "rounds": rounds}
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(doc, f, indent=2)
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
