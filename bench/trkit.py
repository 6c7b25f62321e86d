"""Shared parts of the BPF_PROG_TEST_RUN benchmarks (testrun_bench.py, port_alloc_bench.py):
a test_run caller for either hook that reuses one opts struct (less Python per call),
summaries, verdict checks, the machine and git description recorded with each result."""
from __future__ import annotations

import ctypes
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from hyperplane.observe.metrics import stat_counts, verdict_counts  # noqa: E402
from hyperplane.datapath.testrun import _libbpf, _SkBuff, _TestRunOpts, _XdpMd  # noqa: E402

# The hook's return value for each action (uapi/linux/bpf.h, uapi/linux/pkt_cls.h). At tc
# a packet sent back out of its interface is a redirect too.
RET = {"xdp": {"redirect": 4, "tx": 3, "pass": 2, "drop": 1},
       "tc": {"redirect": 7, "tx": 7, "pass": 0, "drop": 2}}

# The trivial reference program of each hook (bcc): what test_run costs with a program
# that does nothing.
TRIVIAL_C = {
    "xdp": "int ref_trivial(struct xdp_md *ctx) { return XDP_PASS; }\n",
    "tc": "#include <uapi/linux/pkt_cls.h>\n"
          "int ref_trivial(struct __sk_buff *skb) { return TC_ACT_OK; }\n",
}


def load_trivial(hook: str):
    """(bcc object, program fd) of the hook's trivial program."""
    import bcc
    b = bcc.BPF(text=TRIVIAL_C[hook])
    kind = bcc.BPF.SCHED_CLS if hook == "tc" else bcc.BPF.XDP
    return b, b.load_func(b"ref_trivial", kind).fd


class Runner:
    """test_run calls of one program with one reused opts struct. Must be used on a thread
    inside the sandbox namespace (bpf_fib_lookup resolves there). At tc the skb arrives on
    `ifindex` (ctx ifindex = ingress_ifindex)."""

    def __init__(self, prog_fd: int, ifindex: int, hook: str, repeat: int = 1):
        self.lib = _libbpf()
        self.fd = prog_fd
        self.hook = hook
        self.out = ctypes.create_string_buffer(2048)
        self.opts = _TestRunOpts()
        self.opts.sz = ctypes.sizeof(_TestRunOpts)
        self.opts.data_out = ctypes.cast(self.out, ctypes.c_void_p)
        self.opts.repeat = repeat
        if hook == "tc":
            self.ctx = _SkBuff(ingress_ifindex=ifindex, ifindex=ifindex)
        else:
            self.ctx = _XdpMd(ingress_ifindex=ifindex)
        self.opts.ctx_in = ctypes.cast(ctypes.pointer(self.ctx), ctypes.c_void_p)
        self.opts.ctx_size_in = ctypes.sizeof(self.ctx)
        self.retval = None

    def once(self, buf) -> int:
        """One call on a ctypes string buffer; returns the kernel's duration (mean per
        repeat, whole ns); the action is in self.retval."""
        o = self.opts
        n = len(buf)
        o.data_in = ctypes.addressof(buf)
        o.data_size_in = n
        o.data_size_out = 2048
        if self.hook == "xdp":
            self.ctx.data_end = n  # the kernel wants data_end == the packet's size
        if self.lib.bpf_prog_test_run_opts(self.fd, ctypes.byref(o)) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"BPF_PROG_TEST_RUN failed: {os.strerror(err)}")
        self.retval = ctypes.c_int32(o.retval).value
        return o.duration

    def run(self, buffers: list, expect: int, between=None, every: int = 0) -> list[int]:
        """One call per buffer; every call must return `expect`. Returns the durations."""
        out = []
        once = self.once
        for i, buf in enumerate(buffers):
            d = once(buf)
            if self.retval != expect:
                raise AssertionError(f"call {i}: {self.hook} action {self.retval}, "
                                     f"expected {expect}")
            out.append(d)
            if between and every and (i + 1) % every == 0:
                between()
        return out

    def output(self) -> bytes:
        return self.out.raw[:self.opts.data_size_out]


def cbuf(data: bytes):
    return ctypes.create_string_buffer(data, len(data))


def summary(durations: list[int]) -> dict:
    """`value` is the plain mean of the calls: it keeps the rare slow call a path really
    has (a new flow now and then refills the LRU map's per-CPU free list); the machine's
    noise is left to the median over rounds. Median, p99 and a 5 % trimmed mean beside it."""
    d = sorted(durations)
    cut = int(len(d) * 0.05)
    return {"value": statistics.fmean(d), "median": statistics.median(d),
            "trimmed_mean": statistics.fmean(d[cut:len(d) - cut] or d),
            "p99": d[min(len(d) - 1, int(len(d) * 0.99))], "min": d[0], "max": d[-1],
            "n": len(d)}


def delta(now: dict, before: dict) -> dict:
    return {k: now[k] - before.get(k, 0) for k in now if now[k] != before.get(k, 0)}


def verdict_delta(dp, before: dict) -> dict:
    return delta(verdict_counts(dp), before)


def stat_delta(dp, before: dict) -> dict:
    return delta(stat_counts(dp), before)


def check(name: str, got: dict, want: dict) -> None:
    if got != want:
        raise AssertionError(f"{name}: verdicts moved {got}, expected {want}")


def be32(ip: str) -> int:
    """An IPv4 address as the int bcc shows for a __be32 field."""
    return int.from_bytes(socket.inet_aton(ip), "little")


def flow_key(table, src: str, dst: str, sport: int, dport: int, proto: int = socket.IPPROTO_TCP):
    k = table.Key()
    k.src_ip, k.dst_ip = be32(src), be32(dst)
    k.src_port, k.dst_port = socket.htons(sport), socket.htons(dport)
    k.proto = proto
    return k


def inet_sum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xffff) + (total >> 16)
    return (~total) & 0xffff


def machine() -> dict:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"kernel": platform.release(), "cpu_model": cpu, "cpus": os.cpu_count(),
            "python": platform.python_version(), "loadavg_at_start": os.getloadavg()}


def git_meta(paths: list[str]) -> dict:
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--", *paths],
                           capture_output=True, text=True).stdout.split("\n")
    return {"git_commit": commit, "uncommitted": [x[3:] for x in dirty if x.strip()]}


def fill_flows(table, n: int, **leaf) -> None:
    """Write n synthetic UDP flow entries (keys: src_ip = 1..n) in one batch, each value's
    fields set from `leaf` (e.g. packets=1, created_ns=...); existing entries stay."""
    if not n:
        return
    keys, values = (table.Key * n)(), (table.Leaf * n)()
    for i in range(n):
        keys[i].src_ip = i + 1
        keys[i].proto = 17
        for name, value in leaf.items():
            setattr(values[i], name, value)
    table.items_update_batch(keys, values)


def write_results(path: str, fields: dict) -> None:
    """Write a bench's results as JSON with when, at which commit and under which load."""
    import datetime
    import json
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    with open(path, "w") as f:
        json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(
            timespec="seconds"), "commit": commit, "load": os.getloadavg(), **fields},
            f, indent=2)
        f.write("\n")
    print(f"results: {path}")


def sigterm_unwinds() -> None:
    """A SIGTERM unwinds like an exception (so namespaces are removed); only in this
    process: pyroute2 forks helpers (they inherit the handler) and ends them with SIGTERM."""
    main_pid = os.getpid()

    def on_term(signum, _frame):
        if os.getpid() != main_pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)


def clear_table(table) -> int:
    """Empty a hash/LRU map fast: bcc's clear() deletes while iterating, so every
    get_next_key after a delete starts over (quadratic in a big map). Returns how many
    entries were removed."""
    keys = list(table.keys())
    for i in range(0, len(keys), 8192):
        chunk = keys[i:i + 8192]
        arr = (table.Key * len(chunk))(*chunk)
        table.items_delete_batch(arr)
    return len(keys)
