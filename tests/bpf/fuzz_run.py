"""Running many packets through the data path quickly, with the verdict of each one.

The verdicts map is a per-CPU array; every packet must add exactly 1 to exactly one
(verdict, CPU) slot. Reading it with bcc after every packet is slow, so VerdictReader
reads the whole map with one BPF_MAP_LOOKUP_BATCH syscall (libbpf) and the difference to
the previous read names the packet's verdict exactly. The fuzz test also checks, per
round, that the totals bcc reads (hyperplane.metrics.verdict_counts) grew by exactly the
number of packets run, so this reader cannot drift from the official one."""
from __future__ import annotations

import collections
import ctypes
import ipaddress
import os
import struct

from checksums import MALFORMED, frame_faults, icmp_quote, source_addresses
from hyperplane.datapath.sandbox import INET_MAC, MAC
from hyperplane.datapath.testrun import _libbpf, test_run
from hyperplane.datapath.verdicts import V_MAX, Verdict

# The action a program returns, by hook, as a class: "tx" (the packet leaves: transmitted
# or redirected), "pass" (to the kernel), "drop". Anything else (XDP_ABORTED, unknown
# values) is None: never right.
ACTION_CLASSES = {
    "xdp": {1: "drop", 2: "pass", 3: "tx", 4: "tx"},            # XDP_DROP/PASS/TX/REDIRECT
    "tc": {2: "drop", 0: "pass", 0xFFFFFFFF: "pass", 7: "tx"},  # SHOT, OK, UNSPEC, REDIRECT
}
ACTION_NAMES = {
    "xdp": {0: "XDP_ABORTED", 1: "XDP_DROP", 2: "XDP_PASS", 3: "XDP_TX", 4: "XDP_REDIRECT"},
    "tc": {0: "TC_ACT_OK", 2: "TC_ACT_SHOT", 7: "TC_ACT_REDIRECT", 0xFFFFFFFF: "TC_ACT_UNSPEC"},
}


def action_class(retval: int, hook: str = "xdp") -> str | None:
    """'tx', 'pass' or 'drop' for a program's return value at the hook; None if invalid."""
    return ACTION_CLASSES[hook].get(retval & 0xFFFFFFFF)


def action_name(retval: int, hook: str = "xdp") -> str:
    return ACTION_NAMES[hook].get(retval & 0xFFFFFFFF, f"action {retval}")


def verdict_name(i: int) -> str:
    try:
        return Verdict(i).name
    except ValueError:
        return f"verdict#{i}"


def verdict_class(v: Verdict) -> str:
    """'tx', 'pass' or 'drop': what a verdict's name says happens to the packet."""
    return v.name.split("_", 1)[0].lower()


def possible_cpus() -> int:
    with open("/sys/devices/system/cpu/possible") as f:
        text = f.read().strip()
    n = 0
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


class VerdictReader:
    """All (verdict, CPU) counters of the `verdicts` map in one syscall."""

    def __init__(self, map_fd: int, entries: int = V_MAX):
        self.fd = map_fd
        self.entries = entries
        self.ncpu = possible_cpus()
        self.lib = _libbpf()
        self.lib.bpf_map_lookup_batch.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                                  ctypes.c_void_p, ctypes.c_void_p,
                                                  ctypes.POINTER(ctypes.c_uint32),
                                                  ctypes.c_void_p]
        self.lib.bpf_map_lookup_batch.restype = ctypes.c_int
        self.keys = (ctypes.c_uint32 * entries)()
        self.values = ctypes.create_string_buffer(8 * self.ncpu * entries)
        self.out_batch = ctypes.c_uint32()
        self.count = ctypes.c_uint32()
        self.fmt = struct.Struct(f"<{entries * self.ncpu}Q")
        self.read()  # fail early, with the reason, if the kernel cannot do it

    def read(self) -> tuple:
        """The raw counters, slot (verdict * ncpu + cpu)."""
        self.count.value = self.entries
        rc = self.lib.bpf_map_lookup_batch(self.fd, None, ctypes.byref(self.out_batch),
                                           self.keys, self.values, ctypes.byref(self.count), None)
        if rc != 0:
            err = ctypes.get_errno()
            # ENOENT: the batch reached the end of the map, which is the case here
            if err != 2 or self.count.value != self.entries:
                raise OSError(err, f"BPF_MAP_LOOKUP_BATCH of the verdicts map: "
                              f"{os.strerror(err)} ({self.count.value} of {self.entries} read)")
        if any(self.keys[i] != i for i in range(self.entries)):
            raise RuntimeError("BPF_MAP_LOOKUP_BATCH returned the verdicts out of order")
        return self.fmt.unpack(self.values.raw)

    def verdict_between(self, before: tuple, after: tuple) -> tuple[Verdict | None, str]:
        """The one verdict counted between two reads, or (None, what was wrong)."""
        moved = [(i, after[i] - before[i]) for i in range(len(after)) if after[i] != before[i]]
        if len(moved) == 1 and moved[0][1] == 1 and moved[0][0] // self.ncpu < len(Verdict):
            return Verdict(moved[0][0] // self.ncpu), ""
        if not moved:
            return None, "no verdict counted"
        named = [f"{verdict_name(i // self.ncpu)}{d:+d}" for i, d in moved]
        return None, "verdicts counted: " + ", ".join(named)


def run_packets(prog_fd: int, reader: VerdictReader, packets: list[tuple[bytes, int]],
                hook: str = "xdp"):
    """Run each (frame, ingress ifindex) once; return per packet (retval, output, verdict,
    what was wrong with the verdict count). Call it inside the node's namespace (the
    program's route lookups happen in the caller's)."""
    out = []
    before = reader.read()
    for data, ifindex in packets:
        res = test_run(prog_fd, data, ingress_ifindex=ifindex, hook=hook)
        after = reader.read()
        verdict, problem = reader.verdict_between(before, after)
        out.append((res.retval, res.data, verdict, problem))
        before = after
    return out


# An skb of an IPv4 frame shorter than the Ethernet and IPv4 headers is refused by the
# kernel's test_run; on a wire no frame is shorter than 60 bytes (Ethernet pads it), so the
# tc runs get runts padded the way a NIC hands them over.
TC_MIN_IPV4_FRAME = 14 + 20
ETH_MIN_FRAME = 60


def as_delivered(data: bytes, hook: str) -> bytes:
    """The frame as the hook receives it."""
    if hook == "tc" and data[12:14] == b"\x08\x00" and len(data) < TC_MIN_IPV4_FRAME:
        return data + bytes(ETH_MIN_FRAME - len(data))
    return data


# --- the properties of one packet ---------------------------------------------------------

INET_MAC_B = bytes.fromhex(INET_MAC.replace(":", ""))
OUT0_MAC_B = bytes.fromhex(MAC["out0"].replace(":", ""))
INSIDE = ipaddress.IPv4Network("10.0.0.0/8")     # the inside networks and the targets
# TX verdicts whose packet the node writes itself (a RST; ICMP errors it generates), as
# opposed to translating the packet received
BUILT = frozenset({"TX_RST", "TX_TIME_EXCEEDED", "TX_FRAG_NEEDED"})
# PASS verdicts of a translated packet the kernel finishes (fragments it, or resolves its
# next hop): checked like a transmitted one, not like an untouched pass
TRANSLATED_PASS = frozenset({"PASS_FRAGMENTING", "PASS_NEIGH"})


def toward_outside(out: bytes, retval: int, ingress: str, hook: str = "xdp") -> bool:
    """Does a packet that leaves go toward the outside? XDP_TX sends it back out of the
    interface it came in on; a redirect goes where its MACs say (the data path writes the
    next hop's MAC and the egress interface's own): to the outside neighbour, or out of
    the outside interface."""
    if action_name(retval, hook) == "XDP_TX":
        return ingress == "out0"
    return out[0:6] == INET_MAC_B or out[6:12] == OUT0_MAC_B


def check_packet(data: bytes, ingress: str, retval: int, out: bytes, verdict: Verdict | None,
                 problem: str, tally: collections.Counter, hook: str = "xdp"
                 ) -> list[tuple[str, str]]:
    """The properties one packet breaks, as (property, fault); [] when it keeps them all.
    `data` is the frame received on `ingress`, `retval`/`out` what the program returned and
    left in the buffer, `verdict`/`problem` what VerdictReader saw counted."""
    broken = []
    if verdict is None:
        broken.append(("one-verdict", problem))
    cls = action_class(retval, hook)
    if cls is None or (verdict is not None and cls != verdict_class(verdict)):
        broken.append(("action-matches-verdict",
                       f"{action_name(retval, hook)} with "
                       f"{verdict.name if verdict is not None else 'no verdict'}"))
    if cls == "tx" or (cls == "pass" and verdict is not None
                       and verdict.name in TRANSLATED_PASS):
        tally["transmitted"] += 1
        quote = icmp_quote(out)
        if quote:
            tally[f"transmitted ICMP errors, quote {quote}"] += 1
        faults = frame_faults(out)
        wrong = [f for f in faults if not f.startswith(MALFORMED)]
        if wrong:
            # a checksum already wrong in the packet received may stay wrong where that
            # packet still is: in place when translated, in the quote of an ICMP error the
            # node writes about it; a header the node writes itself must be right
            before = set(frame_faults(data))
            allowed = {"quoted-" + f for f in before}
            if verdict is None or verdict.name not in BUILT:
                allowed |= before
            kept = [f for f in wrong if f in allowed]
            tally["transmitted with a checksum already wrong on input (allowed)"] += len(kept)
            wrong = [f for f in wrong if f not in allowed]
        broken += [("checksums", f) for f in wrong]
        broken += [("well-formed", f[len(MALFORMED):]) for f in faults if f.startswith(MALFORMED)]
        if toward_outside(out, retval, ingress, hook):
            tally["transmitted toward the outside"] += 1
            src, quoted_dst = source_addresses(out)
            if src is not None and ipaddress.IPv4Address(src) in INSIDE:
                broken.append(("no-inside-source-outside", "outer source in 10.0.0.0/8"))
            if quoted_dst is not None and ipaddress.IPv4Address(quoted_dst) in INSIDE:
                broken.append(("no-inside-source-outside", "quoted destination in 10.0.0.0/8"))
    elif cls == "pass" and out != data:
        broken.append(("pass-unchanged", "passed packet was modified"))
    return broken
