"""Anti-entropy: what a node's refresh round sends its peers.

Every refresh_s a node sends the flows that saw a packet lately, so their replicas never
expire while the flow lives. A flow idle longer is not refreshed: every holder ages it
alike. A replica that missed such a flow (its record lost in a way the sync protocol did
not see) would hold it wrongly, or not at all, until it expired, and a failover to that
replica would break the connection.

So each round also sends one slice of the flows this node owns, idle ones included.
Over sweep_s, every owned flow is sent once; the slices are fixed by a hash of the flow's
key.

Only the owner sends an idle flow, because its copy is the authority. A replica's stale
copy of a flow that ended would bring the flow back to life on the other holders.
Receivers merge records only forward (bpf/install.h), so a sweep changes nothing where
the replica is already right.

The other half: a replica that missed a flow's end (its close record lost in a way the
protocol did not see, or the owner lost the flow) holds it until it expires, 350 s for
an established TCP flow, and a failover to that replica would revive it. Every record
a peer installs or merges stamps the entries (flow_value.synced), so a replica knows
when the owner last sent the flow. A flow the owner still holds reaches it at least once
per sweep period; one that neither saw a packet nor reached it for PRUNE_SWEEPS of its
owner's periods is one the owner no longer holds, and the replica deletes it (prune_after
says when a replica may trust that: only while the owner's stream has been up and the
owners unchanged for that long)."""
from __future__ import annotations

import zlib
from typing import Callable, Sequence

from hyperplane.datapath import cheaders
from hyperplane.fleet import records

# flow_value.synced counts in 2^SYNC_STAMP_SHIFT ns (bpf/consts.h)
SYNC_STAMP_SHIFT = cheaders.define("consts.h", "SYNC_STAMP_SHIFT")
PRUNE_SWEEPS = 3       # sweep periods of the owner's without a record before a replica prunes

_IDLE = slice(records.OFFSETS["idle_ms"], records.OFFSETS["idle_ms"] + 4)


def rounds(refresh_s: float, sweep_s: float) -> int:
    """Refresh rounds per sweep, so that every owned flow is sent once in sweep_s. The
    result is 0 when sweeping is off (sweep_s <= 0) and at least 1 otherwise."""
    if sweep_s <= 0:
        return 0
    return max(1, round(sweep_s / refresh_s))


def period_s(refresh_s: float, sweep_s: float) -> float:
    """How long one whole sweep takes (every owned flow sent once); 0 when off. A node
    announces it (cluster.Member.sweep_s), so its replicas know how long to wait."""
    return rounds(refresh_s, sweep_s) * refresh_s


def prune_after(periods: dict[int, float], up_for: dict[int, float],
                owners_for_s: float) -> dict[int, float]:
    """Owner node id -> seconds after which its replicas here may prune a flow that
    neither saw a packet nor got a record from it, for the owners that may be trusted:
    those that sweep (periods: each owner's announced period, 0: it does not), whose
    stream to this node has been up (up_for, seconds) and with the owners of every
    resource unchanged here (owners_for_s) for at least that long. An owner that is
    missing here, silent, restarted or newly in charge gets no entry: nothing of its
    flows is pruned."""
    out = {}
    for owner, period in periods.items():
        after = PRUNE_SWEEPS * period
        if period > 0 and up_for.get(owner, 0.0) >= after and owners_for_s >= after:
            out[owner] = after
    return out


def quiet_rows(last_seen: Sequence[int], synced: Sequence[int], before_ns: int) -> list[int]:
    """The rows (columns of a table's entries: records.value_column) with no packet and
    no record after before_ns: those quiet_s may find quiet since then, the cheap test a
    column at a time before anything per flow."""
    stamped_before = (before_ns >> SYNC_STAMP_SHIFT) - 1    # a stamp's unit ends by then
    return [i for i, (t, st) in enumerate(zip(last_seen, synced))
            if t <= before_ns and st <= stamped_before]


def quiet_s(last_seen_ns: int, synced: int, now_ns: int) -> float:
    """Seconds since a flow held here last saw a packet or a peer's record, whichever
    is later (a stamp counts from the end of its 2^30 ns unit, so it never looks older
    than it is)."""
    latest = max(last_seen_ns, (synced + 1) << SYNC_STAMP_SHIFT if synced else 0)
    return max(0, now_ns - latest) / 1e9


def slice_of(key: bytes, n_rounds: int) -> int:
    """The round (0..n_rounds-1) of a sweep in which a flow is sent, from its key."""
    return zlib.crc32(key) % n_rounds


def select(blob: bytes, *, idle_below_ms: int, round_no: int, n_rounds: int,
           owned: Callable[[bytes], bool]) -> tuple[bytes, bytes]:
    """Split a dump's records into (refreshed, swept).

    - refreshed: the records that saw a packet in the last idle_below_ms.
    - swept: the other records that are in this round's slice (round_no mod n_rounds)
      and that owned(record) says this node owns. Empty when n_rounds is 0.

    No record is in both."""
    rs, ks = records.RECORD_SIZE, records.KEY_SIZE
    fresh, swept = bytearray(), bytearray()
    want = round_no % n_rounds if n_rounds else -1
    view = memoryview(blob)
    for at in range(0, len(blob) - len(blob) % rs, rs):
        rec = view[at:at + rs]
        if int.from_bytes(rec[_IDLE], "little") < idle_below_ms:
            fresh += rec
        elif want >= 0 and slice_of(rec[:ks], n_rounds) == want and owned(bytes(rec)):
            swept += rec
    return bytes(fresh), bytes(swept)
