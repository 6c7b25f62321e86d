"""Fuzzing the data path (issue 6, section 2): a seeded run of at least 100,000 packets
(random bytes; mutations of valid Ethernet/802.1Q/IPv4/TCP/UDP/ICMP frames, see
fuzz_packets.py) with a NAT gateway and a load balancer configured and live flows of both.

Every packet is checked for:
  one-verdict              exactly one verdict is counted (per packet, exactly; and per
                           round the official counters grew by the number of packets)
  action-matches-verdict   the action returned is of the verdict's class (TX_* leave,
                           PASS_* go to the kernel, DROP_* are dropped)
  checksums                a packet that leaves has right IPv4 and L4 checksums, and for an
                           ICMP error the quoted IPv4 checksum and (whole quote) quoted L4
                           checksum; all bounded by the IP total length. A checksum that
                           was already wrong in the packet received may stay wrong where
                           that packet still is, translated or quoted (a translator updates
                           checksums, it does not verify them): those are only counted
  well-formed              a packet that leaves has whole headers within its total length
                           (README: truncated / inconsistent headers are DROP_MALFORMED)
  no-inside-source-outside nothing toward the outside (the outside neighbour's MAC, or out
                           of the outside interface) has a source in 10.0.0.0/8, outer or
                           as the quoted destination of an ICMP error
  pass-unchanged           a packet passed to the kernel is the packet received (README:
                           PASS verdicts are untranslated)

Tables are emptied and the live flows opened again before each round of ROUND_SIZE
packets, so a round depends only on (seed, round): HP_FUZZ_SEED=<seed> HP_FUZZ_ROUND=<r>
repeats one round. HP_FUZZ_PACKETS sets the number of packets (default 100,000)."""
from __future__ import annotations

import collections
import dataclasses
import os
import time
from dataclasses import dataclass, field

import pytest

from fuzz_packets import (REGRESSIONS, Fuzzer, FuzzPacket, Live, followups, learn, openers,
                          regressions, seeds)
from fuzz_run import as_delivered, VerdictReader, action_name, check_packet, run_packets
from hyperplane import netns
from hyperplane.datapath import sandbox
from hyperplane.errors import EnvironmentProblem
from hyperplane.datapath.flows import flow_tables
from hyperplane.datapath.loader import HOOKS, Datapath, Sizes
from hyperplane.observe.metrics import verdict_counts
from hyperplane.nat.gateway import GatewayConfig, apply_gateway
from hyperplane.nlb.dataplane import NlbDataplane
from hyperplane.nlb.config import NlbConfig
from hyperplane.datapath.sandbox import NAT_IP, TARGETS, VIP
from hyperplane.datapath.settings import Timeouts, write_config
from hyperplane.datapath.verdicts import Verdict

NS = f"hpt-fz-{os.getpid() % 100000}"
SEED = int(os.environ.get("HP_FUZZ_SEED", "6"))
PACKETS = int(os.environ.get("HP_FUZZ_PACKETS", "100000"))
ONLY_ROUND = os.environ.get("HP_FUZZ_ROUND")
ROUND_SIZE = 2500
SIZES = Sizes(max_flows=16384, max_reservations=8192, max_listeners=4, maglev_size=251,
              max_targets=16)
# nothing expires during a run: the same seed gives the same verdicts
TIMEOUTS = Timeouts(tcp_established=3600, tcp_syn=3600, tcp_closing=3600, udp=3600, icmp=3600)
PCAP_PER_CLASS = 20


PROPERTIES = {
    "one-verdict": "exactly one verdict is counted for the packet",
    "action-matches-verdict": "the action returned is of the counted verdict's class "
                              "(TX_* -> TX/REDIRECT, PASS_* -> PASS, DROP_* -> DROP)",
    "checksums": "a transmitted packet has right IPv4 and L4 checksums (ICMP errors: also the "
                 "quoted IPv4 and, for a whole quote, quoted L4 checksum), all bounded by the "
                 "IP total length; only a checksum already wrong on input may stay wrong "
                 "(where that packet still is: translated, or quoted)",
    "well-formed": "a transmitted packet has whole headers within its IP total length "
                   "(README: truncated / inconsistent headers are DROP_MALFORMED)",
    "no-inside-source-outside": "no packet toward the outside has a source in 10.0.0.0/8 "
                                "(outer source, or the quoted destination of an ICMP error)",
    "pass-unchanged": "a packet passed to the kernel is the packet received (README: PASS "
                      "verdicts are untranslated)",
    "round-total": "the official verdict counters grew by exactly the packets run",
}


def nlb_config() -> NlbConfig:
    """TCP :80 and UDP :53 on the VIP, each over the three targets."""
    def group(name, port):
        return {"name": name, "targets": [{"ip": t, "port": port, "state": "healthy"}
                                          for t in TARGETS]}
    return NlbConfig.from_dict({
        "load_balancers": [{"name": "lb", "lb_id": 0}],
        "listeners": [
            {"lb": "lb", "vip": VIP, "port": 80, "protocol": "TCP", "target_group": "web"},
            {"lb": "lb", "vip": VIP, "port": 53, "protocol": "UDP", "target_group": "dns"}],
        "target_groups": [group("web", 8080), group("dns", 5353)],
    })


@dataclass
class FuzzEnv:
    dp: Datapath
    ifindex: dict
    reader: VerdictReader
    hook: str

    def run(self, packets: list[tuple[bytes, str]]):
        """Run frames; the caller checks them as delivered (see fuzz_run.as_delivered)."""
        batch = [(data, self.ifindex[iface]) for data, iface in packets]
        return netns.call_in(NS, run_packets, self.dp.prog_fd, self.reader, batch, self.hook)

    def reset(self):
        """Empty every map that holds state between packets (not the configuration)."""
        for name in (*flow_tables(), "nat_resv", "nat_cursor", "frags", "icmp_budget"):
            self.dp.table(name).clear()


@pytest.fixture(scope="module", params=HOOKS)
def fuzz_env(request):
    if os.geteuid() != 0:
        pytest.fail("the fuzz test needs root (BPF_PROG_TEST_RUN and a network namespace); "
                    "run scripts/test as root", pytrace=False)
    netns.remove(NS)
    dp = None
    try:
        try:
            ifindex = sandbox.build(NS, default_route=True)
            dp = Datapath(SIZES, hook=request.param)
            reader = VerdictReader(dp.table("verdicts").map_fd,
                                   dp.table("verdicts").max_entries)
        except (EnvironmentProblem, OSError) as exc:
            pytest.fail(f"cannot set up the fuzz test's data path: {exc}", pytrace=False)
        write_config(dp, TIMEOUTS, hash_seed=0x5EED1234)
        apply_gateway(dp, GatewayConfig("gw-fuzz", 0, [NAT_IP], ["10.10.0.0/24"]))
        NlbDataplane(dp).apply(nlb_config())
        yield FuzzEnv(dp, ifindex, reader, request.param)
    finally:
        if dp is not None:
            dp.close()
        netns.remove(NS)


# --- the report -------------------------------------------------------------------------

@dataclass
class Failure:
    round: int
    index: int                     # in the round; -1..: the opening packets
    iface: str
    origin: str
    ops: tuple
    data: bytes
    out: bytes
    verdict: str
    action: str
    prop: str
    fault: str


@dataclass
class Report:
    seed: int
    packets: int = 0
    verdicts: collections.Counter = field(default_factory=collections.Counter)
    tally: collections.Counter = field(default_factory=collections.Counter)
    # (property, fault, verdict) -> [count, Counter of seed frames, first examples]
    classes: dict = field(default_factory=dict)
    failing_packets: int = 0
    round_problems: list = field(default_factory=list)

    def add(self, f: Failure):
        key = (f.prop, f.fault, f.verdict)
        entry = self.classes.setdefault(key, [0, collections.Counter(), []])
        entry[0] += 1
        entry[1][f.origin] += 1
        if len(entry[2]) < PCAP_PER_CLASS:
            entry[2].append(f)

    def first(self) -> Failure | None:
        firsts = [e[2][0] for e in self.classes.values()]
        return min(firsts, key=lambda f: (f.round, f.index)) if firsts else None

    def summary(self) -> str:
        lines = [f"fuzz seed {self.seed}: {self.packets} packets "
                 f"(repeat: HP_FUZZ_SEED={self.seed} HP_FUZZ_PACKETS={PACKETS}; one round: "
                 f"HP_FUZZ_ROUND=<r>)",
                 "verdicts: " + ", ".join(f"{k} {v}" for k, v in self.verdicts.most_common())]
        for k, v in self.tally.items():
            lines.append(f"{k}: {v}")
        if self.classes:
            lines.append(f"{self.failing_packets} packets broke a property; by class "
                         f"(count, property, fault, verdict, top seeds):")
            for (prop, fault, verdict), (n, origins, _) in sorted(
                    self.classes.items(), key=lambda kv: -kv[1][0]):
                top = ", ".join(f"{o} {c}" for o, c in origins.most_common(4))
                lines.append(f"  {n:7d}  {prop}: {fault} [{verdict}]  ({top})")
        lines += self.round_problems
        return "\n".join(lines)

    def examples(self, width: int = 160) -> str:
        """One received frame per class, as hex (cut at `width` bytes)."""
        lines = ["an example per class (round/packet, ingress, seed frame, mutations, "
                 "frame received):"]
        for (prop, fault, verdict), (_, _, ex) in sorted(self.classes.items(),
                                                         key=lambda kv: -kv[1][0]):
            f = ex[0]
            cut = "..." if len(f.data) > width else ""
            lines.append(f"  {prop}: {fault} [{verdict}] r{f.round}/{f.index} {f.iface} "
                         f"{f.origin} {list(f.ops)}\n    {f.data[:width].hex()}{cut}")
        return "\n".join(lines)


def describe(f: Failure) -> str:
    from scapy.layers.l2 import Ether
    show_in = Ether(f.data).show(dump=True)
    show_out = Ether(f.out).show(dump=True) if f.out else "(none)"
    return (f"first failing packet: round {f.round}, packet {f.index}, ingress {f.iface}, "
            f"seed frame {f.origin!r}, mutations {list(f.ops)}\n"
            f"  property: {f.prop}: {PROPERTIES[f.prop]}\n"
            f"  broken: {f.fault}; verdict {f.verdict}, action {f.action}\n"
            f"  input  ({len(f.data)} bytes): {f.data.hex()}\n"
            f"  output ({len(f.out)} bytes): {f.out.hex()}\n"
            f"--- input (scapy) ---\n{show_in}--- output (scapy) ---\n{show_out}")


def write_pcap(path: str, frames: list[bytes]) -> None:
    """A classic pcap of Ethernet frames (written by hand: scapy warns about raw bytes)."""
    import struct
    with open(path, "wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for i, frame in enumerate(frames):
            f.write(struct.pack("<IIII", i, 0, len(frame), len(frame)))
            f.write(frame)


def save(report: Report) -> str:
    """Write the failing packets (up to PCAP_PER_CLASS per class) to pcaps under /tmp: the
    received frames, the frames the data path made of them, and an index."""
    base = f"/tmp/hyperplane-fuzz-seed{report.seed}-{os.getpid()}"
    failures = sorted((f for e in report.classes.values() for f in e[2]),
                      key=lambda f: (f.round, f.index))
    write_pcap(base + "-in.pcap", [f.data for f in failures])
    write_pcap(base + "-out.pcap", [f.out for f in failures])
    with open(base + "-index.txt", "w") as idx:
        idx.write("# n round packet ingress verdict action property fault seed-frame mutations\n")
        for n, f in enumerate(failures):
            idx.write(f"{n} {f.round} {f.index} {f.iface} {f.verdict} {f.action} {f.prop} "
                      f"{f.fault.replace(' ', '_')} {f.origin} {' '.join(f.ops)}\n")
    return base


# --- the run ------------------------------------------------------------------------------

def establish(env: FuzzEnv, report: Report, r: int, live0: Live | None) -> Live:
    """Empty the tables and open the live flows again (deterministic: same ports)."""
    env.reset()
    first = openers()
    results = env.run([(f.data, f.iface) for f in first])
    check_batch(report, r, first, results, env.hook, start=-100)
    tx = {f.name: out for f, (rv, out, v, _) in zip(first, results)
          if v in (Verdict.TX_NAT_OUT, Verdict.TX_NLB_IN)}
    missing = [f.name for f in first if f.name not in tx]
    assert not missing, (f"round {r}: the data path did not open the live flows "
                         f"{missing}: verdicts {[str(x[2]) for x in results]}")
    live = learn(tx)
    assert live0 is None or live == live0, \
        f"round {r}: the same opening packets on empty tables chose other ports/targets: " \
        f"{live} != {live0} (state survived the reset?)"
    more = followups(live)
    check_batch(report, r, more, env.run([(f.data, f.iface) for f in more]), env.hook, start=-50)
    return live


def check_batch(report: Report, r: int, packets, results, hook: str, start: int = 0) -> None:
    for i, (p, (retval, out, verdict, problem)) in enumerate(zip(packets, results)):
        report.packets += 1
        report.verdicts[verdict.name if verdict is not None else "NONE"] += 1
        broken = check_packet(p.data, p.iface, retval, out, verdict, problem, report.tally,
                              hook)
        if broken:
            report.failing_packets += 1
            origin = p.origin if isinstance(p, FuzzPacket) else p.name
            ops = p.ops if isinstance(p, FuzzPacket) else ()
            for prop, fault in broken:
                report.add(Failure(r, start + i, p.iface, origin, ops, p.data, out,
                                   verdict.name if verdict is not None else "NONE",
                                   action_name(retval, hook), prop, fault))


@pytest.mark.parametrize("name", REGRESSIONS)
def test_fuzz_regression(fuzz_env, name):
    """One packet of a failure class the fuzzing found, on the live flows."""
    report = Report(SEED)
    live = establish(fuzz_env, report, 0, None)
    frame = next(f for f in regressions(live) if f.name == name)
    check_batch(report, 0, [frame], fuzz_env.run([(frame.data, frame.iface)]), fuzz_env.hook)
    first = report.first()
    assert first is None, f"{REGRESSIONS[name]}\n{report.summary()}\n{describe(first)}"


def test_fuzz_the_data_path(fuzz_env):
    env = fuzz_env
    t0 = time.monotonic()
    report = Report(SEED)
    rounds = range((PACKETS + ROUND_SIZE - 1) // ROUND_SIZE)
    if ONLY_ROUND is not None:
        rounds = [int(ONLY_ROUND)]
    print(f"fuzz seed {SEED}, {PACKETS} packets, rounds of {ROUND_SIZE}")
    live0 = None
    fuzzer = None
    gen_s = run_s = check_s = 0.0
    for r in rounds:
        before = sum(verdict_counts(env.dp).values())
        counted_before = report.packets
        live = establish(env, report, r, live0)
        if fuzzer is None:
            live0 = live
            fuzzer = Fuzzer(seeds(live), live, SEED)
        n = min(ROUND_SIZE, PACKETS - r * ROUND_SIZE) if ONLY_ROUND is None else ROUND_SIZE
        t = time.monotonic()
        packets = [dataclasses.replace(p, data=as_delivered(p.data, env.hook))
                   for p in fuzzer.round(r, n)]
        gen_s += time.monotonic() - t
        t = time.monotonic()
        results = env.run([(p.data, p.iface) for p in packets])
        run_s += time.monotonic() - t
        t = time.monotonic()
        check_batch(report, r, packets, results, env.hook)
        check_s += time.monotonic() - t
        after = sum(verdict_counts(env.dp).values())
        ran = report.packets - counted_before
        if after - before != ran:
            report.round_problems.append(
                f"round {r}: the verdict counters grew by {after - before} for {ran} packets")
    elapsed = time.monotonic() - t0
    report.tally["seconds (generate / run / check / total)"] = \
        f"{gen_s:.1f} / {run_s:.1f} / {check_s:.1f} / {elapsed:.1f}"
    summary = report.summary()
    print(summary)
    first = report.first()
    if first is None and not report.round_problems:
        return
    where = save(report) if first else None
    message = summary
    if first:
        message += "\n" + report.examples() + "\n" + describe(first)
        message += (f"\nfailing packets: {where}-in.pcap (received), {where}-out.pcap (sent), "
                    f"{where}-index.txt (round, ingress, verdict, fault of each)")
    pytest.fail(message, pytrace=False)

