"""BPF_PROG_TEST_RUN: run a loaded XDP or tc program on a packet in the kernel, without a NIC.

bcc has no binding for it, so this calls libbpf's bpf_prog_test_run_opts (libbpf1 is a
dependency of Debian's bcc)."""
from __future__ import annotations

import ctypes
import ctypes.util
import os
from dataclasses import dataclass

from hyperplane.errors import EnvironmentProblem

XDP_ACTIONS = {0: "XDP_ABORTED", 1: "XDP_DROP", 2: "XDP_PASS", 3: "XDP_TX", 4: "XDP_REDIRECT"}
TC_ACTIONS = {-1: "TC_ACT_UNSPEC", 0: "TC_ACT_OK", 2: "TC_ACT_SHOT", 7: "TC_ACT_REDIRECT"}


class _TestRunOpts(ctypes.Structure):
    # struct bpf_test_run_opts (libbpf/bpf.h)
    _fields_ = [
        ("sz", ctypes.c_size_t),
        ("data_in", ctypes.c_void_p),
        ("data_out", ctypes.c_void_p),
        ("data_size_in", ctypes.c_uint32),
        ("data_size_out", ctypes.c_uint32),
        ("ctx_in", ctypes.c_void_p),
        ("ctx_out", ctypes.c_void_p),
        ("ctx_size_in", ctypes.c_uint32),
        ("ctx_size_out", ctypes.c_uint32),
        ("retval", ctypes.c_uint32),
        ("repeat", ctypes.c_int),
        ("duration", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("cpu", ctypes.c_uint32),
        ("batch_size", ctypes.c_uint32),
    ]


class _XdpMd(ctypes.Structure):
    # struct xdp_md as test_run's ctx_in: only ingress_ifindex / rx_queue_index may be set
    _fields_ = [
        ("data", ctypes.c_uint32),
        ("data_end", ctypes.c_uint32),
        ("data_meta", ctypes.c_uint32),
        ("ingress_ifindex", ctypes.c_uint32),
        ("rx_queue_index", ctypes.c_uint32),
        ("egress_ifindex", ctypes.c_uint32),
    ]


class _SkBuff(ctypes.Structure):
    # struct __sk_buff (uapi/linux/bpf.h) as test_run's ctx_in for a tc program: only mark,
    # priority, ingress_ifindex, ifindex, cb, tstamp, wire_len, gso_segs, gso_size and
    # hwtstamp may be set; ifindex picks the device the skb arrives on
    _fields_ = [
        ("len", ctypes.c_uint32), ("pkt_type", ctypes.c_uint32), ("mark", ctypes.c_uint32),
        ("queue_mapping", ctypes.c_uint32), ("protocol", ctypes.c_uint32),
        ("vlan_present", ctypes.c_uint32), ("vlan_tci", ctypes.c_uint32),
        ("vlan_proto", ctypes.c_uint32), ("priority", ctypes.c_uint32),
        ("ingress_ifindex", ctypes.c_uint32), ("ifindex", ctypes.c_uint32),
        ("tc_index", ctypes.c_uint32), ("cb", ctypes.c_uint32 * 5), ("hash", ctypes.c_uint32),
        ("tc_classid", ctypes.c_uint32), ("data", ctypes.c_uint32),
        ("data_end", ctypes.c_uint32), ("napi_id", ctypes.c_uint32),
        ("family", ctypes.c_uint32), ("remote_ip4", ctypes.c_uint32),
        ("local_ip4", ctypes.c_uint32), ("remote_ip6", ctypes.c_uint32 * 4),
        ("local_ip6", ctypes.c_uint32 * 4), ("remote_port", ctypes.c_uint32),
        ("local_port", ctypes.c_uint32), ("data_meta", ctypes.c_uint32),
        ("flow_keys", ctypes.c_uint64), ("tstamp", ctypes.c_uint64),
        ("wire_len", ctypes.c_uint32), ("gso_segs", ctypes.c_uint32), ("sk", ctypes.c_uint64),
        ("gso_size", ctypes.c_uint32), ("tstamp_type", ctypes.c_uint32),
        ("hwtstamp", ctypes.c_uint64),
    ]


_lib = None


def _libbpf():
    global _lib
    if _lib is None:
        name = ctypes.util.find_library("bpf") or "libbpf.so.1"
        try:
            lib = ctypes.CDLL(name, use_errno=True)
        except OSError as exc:
            raise EnvironmentProblem(
                "libbpf is missing; install Debian's libbpf1 (apt-get install libbpf1).") from exc
        lib.bpf_prog_test_run_opts.argtypes = [ctypes.c_int, ctypes.POINTER(_TestRunOpts)]
        lib.bpf_prog_test_run_opts.restype = ctypes.c_int
        _lib = lib
    return _lib


@dataclass
class RunResult:
    retval: int            # the hook's action
    data: bytes            # the packet after the program
    duration_ns: int       # mean per repeat, as the kernel measured it
    hook: str = "xdp"

    @property
    def action(self) -> str:
        if self.hook == "tc":
            return TC_ACTIONS.get(ctypes.c_int32(self.retval).value, str(self.retval))
        return XDP_ACTIONS.get(self.retval, str(self.retval))


def test_run(prog_fd: int, packet: bytes, *, repeat: int = 1, ingress_ifindex: int = 0,
             hook: str = "xdp", gso_size: int = 0, gso_segs: int = 0) -> RunResult:
    """Run the program once (or `repeat` times) on `packet`. A tc program's skb can be
    made a GSO superpacket (gso_size, gso_segs)."""
    lib = _libbpf()
    data_in = ctypes.create_string_buffer(bytes(packet), len(packet))
    out_size = len(packet) + 512
    data_out = ctypes.create_string_buffer(out_size)
    opts = _TestRunOpts()
    opts.sz = ctypes.sizeof(_TestRunOpts)
    opts.data_in = ctypes.cast(data_in, ctypes.c_void_p)
    opts.data_size_in = len(packet)
    opts.data_out = ctypes.cast(data_out, ctypes.c_void_p)
    opts.data_size_out = out_size
    opts.repeat = repeat
    ctx = None
    if hook == "tc":
        ctx = _SkBuff(ingress_ifindex=ingress_ifindex, ifindex=ingress_ifindex,
                      gso_size=gso_size, gso_segs=gso_segs)
    elif ingress_ifindex:
        # the kernel wants data_end == the packet size when a ctx is given
        ctx = _XdpMd(data_end=len(packet), ingress_ifindex=ingress_ifindex)
    if ctx is not None:
        opts.ctx_in = ctypes.cast(ctypes.pointer(ctx), ctypes.c_void_p)
        opts.ctx_size_in = ctypes.sizeof(ctx)
    rc = lib.bpf_prog_test_run_opts(prog_fd, ctypes.byref(opts))
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"BPF_PROG_TEST_RUN failed: {os.strerror(err)}")
    return RunResult(opts.retval, data_out.raw[:opts.data_size_out], opts.duration, hook)


class Runner:
    """Repeated test_run calls of programs on packets of at most max_size bytes, reusing
    one set of buffers and options (test_run builds them per call: a third of the cost of
    a call on a few kilobytes). Not thread-safe: one per thread."""

    def __init__(self, max_size: int, hook: str = "xdp"):
        self.max_size = max_size
        self._in = ctypes.create_string_buffer(max_size)
        self.out = ctypes.create_string_buffer(max_size + 512)
        self._in_addr = ctypes.addressof(self._in)
        o = self._opts = _TestRunOpts()
        o.sz = ctypes.sizeof(_TestRunOpts)
        o.data_in = self._in_addr
        o.data_out = ctypes.addressof(self.out)
        o.repeat = 1
        if hook == "tc":          # as test_run: a tc program's skb needs a ctx
            self._ctx = _SkBuff()
            o.ctx_in = ctypes.addressof(self._ctx)
            o.ctx_size_in = ctypes.sizeof(self._ctx)
        self._ref = ctypes.byref(o)
        self._run = _libbpf().bpf_prog_test_run_opts

    def run(self, prog_fd: int, head: bytes, body: bytes = b"") -> int:
        """Run on the packet head + body; returns the program's return value (the packet
        it left is in self.out)."""
        n = len(head) + len(body)
        if n > self.max_size:
            raise ValueError(f"a {n}-byte packet is over this runner's {self.max_size}")
        ctypes.memmove(self._in_addr, head, len(head))
        ctypes.memmove(self._in_addr + len(head), body, len(body))
        o = self._opts
        o.data_size_in = n
        o.data_size_out = self.max_size + 512
        if self._run(prog_fd, self._ref) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"BPF_PROG_TEST_RUN failed: {os.strerror(err)}")
        return o.retval
