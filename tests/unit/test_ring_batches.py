"""Batches of ring records, checked on bytes laid out as the kernel lays them out: the
parse of a read (records still BUSY, cut off, discarded, of another size, a limit), the
fleet member's column-wise choice of the records to replicate, and the grouping of records
by resource, each against the record-at-a-time rule it replaces."""
from __future__ import annotations

import itertools
import random

import pytest

from hyperplane.datapath import ring
from hyperplane.datapath.verdicts import FlowEventType, FlowKind
from hyperplane.fleet import records
from hyperplane.fleet.member import REPLICATED, _FLAGS_OFF, replicated, replicated_records
from hyperplane.observe.events import EVENT_SIZE, REC_OFFSET

SIZE = 24


def rec_bytes(size: int, tag: int) -> bytes:
    return bytes((tag + i) & 0xFF for i in range(size))


def hdr(length: int, busy: bool = False, discard: bool = False) -> bytes:
    word = length | (ring.BUSY if busy else 0) | (ring.DISCARD if discard else 0)
    return word.to_bytes(4, "little") + (1234).to_bytes(4, "little")   # pg_off: anything


def entry(length: int, tag: int, **flags) -> bytes:
    body = rec_bytes(length, tag)
    return (hdr(length, **flags) + body).ljust(ring.stride_of(length), b"\xee")


def test_a_run_of_equal_records_is_one_batch_without_copies():
    chunk = b"".join(entry(SIZE, t) for t in range(50))
    batch, used = ring.parse(chunk, SIZE)
    assert (batch.count, used) == (50, len(chunk))
    assert batch.data is chunk
    assert batch.records() == [rec_bytes(SIZE, t) for t in range(50)]
    assert batch.column(3) == bytes((t + 3) & 0xFF for t in range(50))


@pytest.mark.parametrize("at", [0, 1, 17, 49])
def test_a_busy_record_ends_the_read(at):
    entries = [entry(SIZE, t, busy=(t == at)) for t in range(50)]
    batch, used = ring.parse(b"".join(entries), SIZE)
    assert batch.count == at
    assert used == at * ring.stride_of(SIZE)
    assert batch.records() == [rec_bytes(SIZE, t) for t in range(at)]


@pytest.mark.parametrize("cut", [1, 7, 8, 20, ring.stride_of(SIZE) - 1])
def test_a_record_cut_off_by_the_end_waits_for_the_next_read(cut):
    chunk = b"".join(entry(SIZE, t) for t in range(10))
    batch, used = ring.parse(chunk[:len(chunk) - cut], SIZE)
    assert batch.count == 9 and used == 9 * ring.stride_of(SIZE)


def test_discarded_records_are_skipped_and_their_space_freed():
    entries = [entry(SIZE, 0), entry(40, 1, discard=True), entry(SIZE, 2),
               entry(SIZE, 3, discard=True), entry(SIZE, 4)]
    chunk = b"".join(entries)
    batch, used = ring.parse(chunk, SIZE)
    assert used == len(chunk)
    assert batch.records() == [rec_bytes(SIZE, 0), rec_bytes(SIZE, 2), rec_bytes(SIZE, 4)]


def test_records_of_other_sizes_are_padded_or_cut_to_the_readers_size():
    chunk = b"".join([entry(SIZE, 0), entry(8, 1), entry(SIZE + 9, 2), entry(SIZE, 3),
                      entry(SIZE, 4)])
    batch, used = ring.parse(chunk, SIZE)
    assert used == len(chunk)
    assert batch.records() == [rec_bytes(SIZE, 0), rec_bytes(8, 1).ljust(SIZE, b"\0"),
                               rec_bytes(SIZE, 2), rec_bytes(SIZE, 3), rec_bytes(SIZE, 4)]


def test_random_mixes_match_a_record_at_a_time_walk():
    rng = random.Random(11)
    for _ in range(300):
        entries, want, n_ok = [], [], 0
        stopped = False
        for t in range(rng.randint(0, 40)):
            kind = rng.choices(["ok", "discard", "other", "busy"], [20, 2, 2, 1])[0]
            length = SIZE if kind in ("ok", "busy") else rng.choice([SIZE, 5, 33])
            entries.append(entry(length, t, busy=kind == "busy", discard=kind == "discard"))
            if stopped:
                continue
            if kind == "busy":
                stopped = True
            elif kind != "discard":
                want.append(rec_bytes(length, t)[:SIZE].ljust(SIZE, b"\0"))
                n_ok += 1
        limit = rng.choice([ring.MAX_BATCH, 3, 10])
        batch, used = ring.parse(b"".join(entries), SIZE, limit)
        assert batch.records() == want[:limit]
        # what was used is whole entries, and the next parse starts at a record
        rest, _ = ring.parse(b"".join(entries)[used:], SIZE, ring.MAX_BATCH)
        if not stopped and len(want) > limit:
            assert rest.records()[:len(want) - limit] == want[limit:]


def test_fields_of_chosen_records():
    chunk = b"".join(entry(SIZE, t) for t in range(6))
    batch, _ = ring.parse(chunk, SIZE)
    assert batch.fields(2, 3) == b"".join(rec_bytes(SIZE, t)[2:5] for t in range(6))
    keep = bytes([1, 0, 0, 1, 1, 0])
    assert batch.fields(0, SIZE, keep) == b"".join(rec_bytes(SIZE, t) for t in (0, 3, 4))


def test_event_types_fit_the_byte_the_reader_takes():
    # the hub and the member read an event's type from its first byte (a column)
    assert max(int(t) for t in FlowEventType) < 256


def _event(etype: int, flags: int, tag: int) -> bytes:
    raw = bytearray(rec_bytes(EVENT_SIZE, tag))
    raw[0:4] = etype.to_bytes(4, "little")
    raw[REC_OFFSET + _FLAGS_OFF] = flags
    return bytes(raw)


def test_replicated_records_match_replicated_per_event():
    types = [int(t) for t in FlowEventType]
    combos = list(itertools.product(types, [0, records.REC_F_CONFIRMED, 0xFF, 0xFE]))
    events = [_event(t, f, i) for i, (t, f) in enumerate(combos)]
    for sample in (events, [e for e in events if replicated(e[0], e[REC_OFFSET:])],
                   [events[0]], []):
        batch, _ = ring.parse(b"".join(hdr(EVENT_SIZE) + e for e in sample), EVENT_SIZE)
        want = [e[REC_OFFSET:REC_OFFSET + records.RECORD_SIZE] for e in sample
                if replicated(int.from_bytes(e[:4], "little"), e[REC_OFFSET:])]
        blob, n = replicated_records(batch)
        assert n == len(want) and blob == b"".join(want)
    assert any(t in REPLICATED for t in types) and any(t not in REPLICATED for t in types)


def _record(kind: int, resource: int, tag: int) -> bytes:
    r = bytearray(rec_bytes(records.RECORD_SIZE, tag))
    r[records.OFFSETS["kind"]] = kind
    off = records.OFFSETS["resource"]
    r[off:off + 2] = resource.to_bytes(2, "little")
    return bytes(r)


def _group_one_by_one(blob: bytes, lbs: dict[int, int]) -> dict:
    """The rule, a record at a time."""
    out: dict = {}
    off = records.OFFSETS["resource"]
    for i in range(0, len(blob) - records.RECORD_SIZE + 1, records.RECORD_SIZE):
        r = bytearray(blob[i:i + records.RECORD_SIZE])
        res = int.from_bytes(r[off:off + 2], "little")
        if r[records.OFFSETS["kind"]] == FlowKind.NAT_OUT:
            out.setdefault(("nat", res), bytearray()).extend(r)
        elif res in lbs:
            r[off:off + 2] = lbs[res].to_bytes(2, "little")
            out.setdefault(("lb", lbs[res]), bytearray()).extend(r)
    return out


NLB = next(k for k in FlowKind if k != FlowKind.NAT_OUT)


@pytest.mark.parametrize("case", ["one gateway", "one listener", "unknown listener",
                                  "mixed", "two gateways", "gateway 0x1ff", "cut tail",
                                  "empty"])
def test_group_by_resource_matches_the_rule(case):
    lbs = {3: 0x102, 4: 7}
    n = 40
    recs = {
        "one gateway": [_record(FlowKind.NAT_OUT, 2, t) for t in range(n)],
        "one listener": [_record(NLB, 3, t) for t in range(n)],
        "unknown listener": [_record(NLB, 9, t) for t in range(n)],
        "mixed": [_record(FlowKind.NAT_OUT if t % 3 else NLB, [2, 3, 4, 9][t % 4], t)
                  for t in range(n)],
        "two gateways": [_record(FlowKind.NAT_OUT, 2 if t < n - 1 else 5, t) for t in range(n)],
        "gateway 0x1ff": [_record(FlowKind.NAT_OUT, 0x1FF if t else 0xFF, t) for t in range(n)],
        "cut tail": [_record(FlowKind.NAT_OUT, 2, t) for t in range(n)],
        "empty": [],
    }[case]
    blob = b"".join(recs)
    if case == "cut tail":
        blob += b"\x01" * 5
    got = records.group_by_resource(blob, lbs)
    assert {k: bytes(v) for k, v in got.items()} == \
        {k: bytes(v) for k, v in _group_one_by_one(blob, lbs).items()}
