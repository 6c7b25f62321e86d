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
the replica is already right."""
from __future__ import annotations

import zlib
from typing import Callable

from hyperplane.fleet import records

_IDLE = slice(records.OFFSETS["idle_ms"], records.OFFSETS["idle_ms"] + 4)


def rounds(refresh_s: float, sweep_s: float) -> int:
    """Refresh rounds per sweep, so that every owned flow is sent once in sweep_s. The
    result is 0 when sweeping is off (sweep_s <= 0) and at least 1 otherwise."""
    if sweep_s <= 0:
        return 0
    return max(1, round(sweep_s / refresh_s))


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
