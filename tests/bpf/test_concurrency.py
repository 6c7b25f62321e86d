"""Two CPUs at once (issue 6, section 3), both hooks: BPF_PROG_TEST_RUN from two threads
pinned to CPU 0 and CPU 1 (ctypes releases the GIL during the syscall, so the program
really runs on both CPUs at the same time), many rounds of
  - the same new tuple sent from both CPUs (both miss, both try to create the flow), and
  - different new tuples toward one destination (both take NAT ports from one cursor),
for NAT and for the load balancer. Afterwards the tables must be consistent: every flow's
two entries name each other, no NAT (IP, port, proto, dst IP, dst port) is held twice,
every reservation belongs to a live flow, each CPU counted exactly one verdict per packet it
ran, and the race path (S_CREATE_RACE) was taken in some same-tuple scenario.

Also the load balancer's reply key: the same client ip:port reaching two listeners that
share a target ip:port cannot have two flows with one return path."""
from __future__ import annotations

import mmap
import os
import pickle
import struct
import tempfile
import time
import traceback

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether

from bpf_env import CLIENT, CLIENT2, INET, INET2, NS, VIP
from flowkit import flow_table_problems, from_target, key_tuple, nlb_config
from fuzz_run import VerdictReader
from hyperplane.netns import NETNS_RUN_DIR
from hyperplane.nlb.dataplane import NlbDataplane
from hyperplane.nlb.config import NlbConfig
from hyperplane.datapath.testrun import test_run as bpf_test_run
from hyperplane.datapath.verdicts import FlowKind, Verdict
from packets import from_client, from_inet

# two processes pinned to the two CPUs must race: nothing else may run (scripts/test)
pytestmark = pytest.mark.exclusive

CPUS = (0, 1)
TUPLES = 500         # new tuples per scenario and CPU


def run_on_two_cpus(dp, ifindex: int, hook: str, frames: tuple[list, list]):
    """Run frames[0] on CPU 0 and frames[1] on CPU 1, packet i of both at once; return, per
    CPU, the (retval, output) of every packet.

    One forked process per CPU (threads would take turns holding the GIL between their
    syscalls, so their runs would rarely overlap): each enters the sandbox namespace (the
    program's FIB lookups happen in the caller's), pins itself to its CPU, and before each
    packet waits for the other at a barrier in shared memory, so the two test_run calls of
    one packet index start within a microsecond or two of each other."""
    assert len(frames[0]) == len(frames[1])
    shared = mmap.mmap(-1, 8 * len(CPUS))  # anonymous, MAP_SHARED: one counter per CPU
    slot = struct.Struct("q")
    outputs, pids = [], []
    for i, cpu in enumerate(CPUS):
        out = tempfile.NamedTemporaryFile(prefix="hp-conc-", delete=False)
        out.close()
        outputs.append(out.name)
        pid = os.fork()
        if pid == 0:  # the child: never returns
            code = 1
            try:
                result = _child(i, cpu, frames[i], shared, slot, dp.prog_fd, ifindex, hook)
                code = 0
            except BaseException:
                result = traceback.format_exc()
            with open(out.name, "wb") as f:
                pickle.dump(result, f)
            os._exit(code)
        pids.append(pid)
    results, failures = {}, []
    for cpu, pid, path in zip(CPUS, pids, outputs):
        _, status = os.waitpid(pid, 0)
        with open(path, "rb") as f:
            results[cpu] = pickle.load(f)
        os.unlink(path)
        if status != 0:
            failures.append(results[cpu])
    assert not failures, "a CPU's process failed:\n" + "\n".join(map(str, failures))
    return results


def _child(i, cpu, frames, shared, slot, prog_fd, ifindex, hook):
    from pyroute2 import netns as pnetns
    fd = os.open(os.path.join(NETNS_RUN_DIR, NS), os.O_RDONLY)
    try:
        pnetns.setns(fd, flags=0)
    finally:
        os.close(fd)
    os.sched_setaffinity(0, {cpu})
    other = (1 - i) * 8
    out = []
    deadline = time.monotonic() + 60
    for n, frame in enumerate(frames, start=1):
        slot.pack_into(shared, i * 8, n)
        spins = 0
        while slot.unpack_from(shared, other)[0] < n:
            spins += 1
            if spins % 100000 == 0 and time.monotonic() > deadline:
                raise TimeoutError(f"CPU {cpu}: the other process stopped at packet "
                                   f"{slot.unpack_from(shared, other)[0]} of {len(frames)}")
        res = bpf_test_run(prog_fd, frame, ingress_ifindex=ifindex, hook=hook)
        out.append((res.retval, res.data))
    return out


def per_cpu_verdicts(reader: VerdictReader) -> dict[int, dict[Verdict, int]]:
    raw = reader.read()
    out = {cpu: {} for cpu in CPUS}
    for v in Verdict:
        for cpu in CPUS:
            n = raw[v * reader.ncpu + cpu]
            if n:
                out[cpu][v] = n
    return out


def nat_syn(src, sport, dst=INET):
    return bytes(from_client(IP(src=src, dst=dst) / TCP(sport=sport, dport=80, flags="S",
                                                         seq=1000)))


def nat_udp(src, sport, dst=INET):
    return bytes(from_client(IP(src=src, dst=dst) / UDP(sport=sport, dport=53) / b"q"))


def nlb_syn(src, sport):
    return bytes(from_inet(IP(src=src, dst=VIP) / TCP(sport=sport, dport=80, flags="S", seq=10)))


def nlb_udp(src, sport):
    return bytes(from_inet(IP(src=src, dst=VIP) / UDP(sport=sport, dport=53) / b"q"))


def scenario(kind: str) -> tuple[tuple[list, list], str, set, int]:
    """The frames of a scenario for each CPU, its ingress, the verdicts every packet must
    get, and the number of distinct new tuples (= flows) it sends."""
    if kind.startswith("nat"):
        make, iface, want = (nat_syn if "tcp" in kind else nat_udp), "in0", {Verdict.TX_NAT_OUT}
        a, b = CLIENT, CLIENT2
    else:
        make, iface, want = (nlb_syn if "tcp" in kind else nlb_udp), "out0", {Verdict.TX_NLB_IN}
        a, b = INET, INET2
    ports = range(20000, 20000 + TUPLES)
    if kind.endswith("same-tuple"):
        frames = [make(a, p) for p in ports]
        return (frames, list(frames)), iface, want, TUPLES
    return ([make(a, p) for p in ports], [make(b, p) for p in ports]), iface, want, 2 * TUPLES


SCENARIOS = ["nat-tcp-same-tuple", "nat-udp-same-tuple", "nat-tcp-different-tuples",
             "nlb-tcp-same-tuple", "nlb-udp-same-tuple", "nlb-tcp-different-tuples"]


SAME_TUPLE = [k for k in SCENARIOS if k.endswith("same-tuple")]
RACES: dict = {}  # S_CREATE_RACE per (hook, scenario)


@pytest.mark.parametrize("kind", SCENARIOS)
def test_two_cpus_create_flows_at_once(e, kind):
    if len(os.sched_getaffinity(0)) < 2 or not set(CPUS) <= os.sched_getaffinity(0):
        pytest.fail(f"the concurrency test needs CPUs {CPUS} (has {os.sched_getaffinity(0)})",
                    pytrace=False)
    plane = NlbDataplane(e.dp)
    plane.apply(nlb_config())
    try:
        frames, iface, want, flows = scenario(kind)
        reader = VerdictReader(e.dp.table("verdicts").map_fd, e.dp.table("verdicts").max_entries)
        before = per_cpu_verdicts(reader)
        results = run_on_two_cpus(e.dp, e.ifindex[iface], e.hook, frames)
        after = per_cpu_verdicts(reader)


        # one verdict per packet on each CPU, and the verdicts wanted
        for cpu in CPUS:
            counted = {v: n - before[cpu].get(v, 0) for v, n in after[cpu].items()
                       if n != before[cpu].get(v, 0)}
            assert sum(counted.values()) == len(results[cpu]), \
                f"CPU {cpu}: {sum(counted.values())} verdicts for {len(results[cpu])} packets"
            assert set(counted) == want, f"CPU {cpu}: verdicts {counted}"

        # the same tuple is translated the same way on both CPUs
        if kind.endswith("same-tuple"):
            for (_, out0), (_, out1) in zip(results[0], results[1]):
                p0, p1 = Ether(out0), Ether(out1)
                l4 = TCP if TCP in p0 else UDP
                assert (p0[IP].src, p0[IP].dst, p0[l4].sport, p0[l4].dport) == \
                    (p1[IP].src, p1[IP].dst, p1[l4].sport, p1[l4].dport), \
                    "one tuple, two translations"

        # the tables
        assert flow_table_problems(e.dp) == []
        entries = [v for name in ("flows", "pending") for v in e.dp.table(name).values()]
        kinds = {k: sum(1 for v in entries if v.kind == k) for k in FlowKind}
        orig = FlowKind.NAT_OUT if kind.startswith("nat") else FlowKind.NLB_IN
        assert kinds[orig] == flows, f"{kinds[orig]} flows for {flows} new tuples"
        stats = e.stats()
        assert stats["FLOW_CREATED"] == flows
        resv = sum(1 for _ in e.dp.table("nat_resv").keys())
        assert resv == (flows if kind.startswith("nat") else 0), "reservations"
        # some packet found its flow created by the other CPU between its miss and its
        # insert: checked over the hook's same-tuple scenarios, once all have run
        RACES[(e.hook, kind)] = stats["CREATE_RACE"]
        same = {k: n for k, n in RACES.items() if k[0] == e.hook and k[1] in SAME_TUPLE}
        if len(same) == len(SAME_TUPLE):
            assert sum(same.values()) > 0, f"no packet took the race path: {same}"
    finally:
        plane.apply(NlbConfig())


# ---- the load balancer's reply key ---------------------------------------------------------

def test_one_client_port_to_two_listeners_sharing_a_target(e):
    """INET:50000 -> VIP:80 and INET:50000 -> VIP:8081 both lead to the one target's :8080:
    both flows would have the reply key target:8080 -> INET:50000. The second connection is
    refused (DROP_TUPLE_TAKEN, AWS's client IP preservation collision); the first keeps its
    return path, from VIP:80."""
    target = "10.20.1.10"
    plane = NlbDataplane(e.dp)
    plane.apply(nlb_config(targets=[target], extra_listeners=[(8081, "TCP", "web")]))
    try:
        first = from_inet(IP(src=INET, dst=VIP) / TCP(sport=50000, dport=80, flags="S", seq=10))
        verdict, _, out = e.run(first, "out0")
        assert verdict == Verdict.TX_NLB_IN and Ether(out)[IP].dst == target
        second = from_inet(IP(src=INET, dst=VIP) / TCP(sport=50000, dport=8081, flags="S",
                                                       seq=77))
        verdict, action, _ = e.run(second, "out0")
        assert (verdict, action) == (Verdict.DROP_TUPLE_TAKEN, "XDP_DROP")
        answer = from_target(target, TCP(sport=8080, dport=50000, flags="SA", seq=99, ack=11))
        verdict, _, out = e.run(answer, "tg0")
        assert verdict == Verdict.TX_NLB_OUT
        p = Ether(out)
        assert (p[IP].src, p[TCP].sport, p[IP].dst, p[TCP].dport) == (VIP, 80, INET, 50000)
        assert flow_table_problems(e.dp) == []
        origs = [key_tuple(k) for name in ("flows", "pending")
                 for k, v in e.dp.table(name).items() if v.kind == FlowKind.NLB_IN]
        assert len(origs) == 1, "the refused connection left an entry"
    finally:
        plane.apply(NlbConfig())
