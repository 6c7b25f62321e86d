"""Records of many flow entries at once (hyperplane.fleet.records.records_of_entries): the
column-at-a-time build gives exactly what record_of gives entry by entry, for originals
only, with the same idle filter and the same clamping of ages."""
from __future__ import annotations

import random
import struct

import pytest

from hyperplane.datapath.verdicts import FlowKind, TcpState
from hyperplane.fleet import records

KS = 16
VS = -(-struct.calcsize("<" + records._VFMT) // 8) * 8    # the value's size, 8-aligned
NOW = 5_000_000_000_000_000
KINDS = [int(k) for k in FlowKind] + [0, 7, 200]


def _entries(n: int, seed: int) -> tuple[bytes, bytes]:
    rng = random.Random(seed)
    keys, values = bytearray(), bytearray()
    for _ in range(n):
        keys += rng.randbytes(KS)
        v = bytearray(rng.randbytes(VS))
        v[records._VOFF["kind"]] = rng.choice(KINDS)
        v[records._VOFF["tcp_state"]] = rng.choice([int(t) for t in TcpState])
        for name in ("last_seen_ns", "created_ns"):
            t = rng.choice([NOW - rng.randrange(10**13),       # up to ~3 hours ago
                            NOW + rng.randrange(10**9),        # ahead of now: idle 0
                            rng.randrange(10**6),              # at boot: past u32 ms
                            0, NOW])
            at = records._VOFF[name]
            v[at:at + 8] = t.to_bytes(8, "little")
        values += v
    return bytes(keys), bytes(values)


def _one_by_one(keys: bytes, values: bytes, n: int, origin: int, idle_below_ms) -> bytes:
    out = bytearray()
    idle_at = records.OFFSETS["idle_ms"]
    for i in range(n):
        rec = records.record_of(keys[i * KS:(i + 1) * KS], values[i * VS:(i + 1) * VS], NOW,
                                origin)
        if rec is None:
            continue
        if idle_below_ms is not None and \
                int.from_bytes(rec[idle_at:idle_at + 4], "little") >= idle_below_ms:
            continue
        out += rec
    return bytes(out)


@pytest.mark.parametrize("n, seed", [(0, 1), (1, 2), (7, 3), (3000, 4)])
@pytest.mark.parametrize("idle_below_ms", [None, 11_000, 0])
@pytest.mark.parametrize("vector", [True, False], ids=["columns", "per-entry"])
def test_a_batch_of_entries_gives_exactly_record_of_each(monkeypatch, n, seed,
                                                         idle_below_ms, vector):
    monkeypatch.setattr(records, "_VECTOR", vector and records._VECTOR)
    keys, values = _entries(n, seed)
    got = records.records_of_entries(keys, values, n, KS, VS, NOW, 0x1234, idle_below_ms)
    want = _one_by_one(keys, values, n, 0x1234, idle_below_ms)
    assert len(got) % records.RECORD_SIZE == 0
    assert records.split(got) == records.split(want)
    if n >= 3000 and idle_below_ms is None:
        assert len(want) // records.RECORD_SIZE > 500, "the case holds many originals"


def test_every_record_is_an_original_and_says_the_origin():
    keys, values = _entries(500, 9)
    blob = records.records_of_entries(keys, values, 500, KS, VS, NOW, 77)
    recs = [records.FlowRecord.unpack(r) for r in records.split(blob)]
    assert recs and all(r.kind in (FlowKind.NAT_OUT, FlowKind.NLB_IN) for r in recs)
    assert {r.origin for r in recs} == {77}


def test_value_column_reads_one_field_of_every_entry():
    keys, values = _entries(100, 5)
    col = records.value_column(values, 100, VS, "last_seen_ns", 8)
    at = records._VOFF["last_seen_ns"]
    assert list(col) == [int.from_bytes(values[i * VS + at:i * VS + at + 8], "little")
                         for i in range(100)]
    kinds = records.value_column(values, 100, VS, "kind", 1)
    assert list(kinds) == [values[i * VS + records._VOFF["kind"]] for i in range(100)]
