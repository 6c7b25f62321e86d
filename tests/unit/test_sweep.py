"""Anti-entropy (hyperplane.fleet.sweep): a refresh round sends the flows that saw a packet
lately, and one slice of the idle flows this node owns; over a sweep every owned flow is
sent exactly once, and an idle flow this node does not own never is."""
from __future__ import annotations

import random

import pytest

from hyperplane.datapath.verdicts import FlowKind, TcpState
from hyperplane.fleet import records, sweep
from hyperplane.fleet.records import REC_F_CONFIRMED, FlowRecord

IDLE_BELOW_MS = 11_000


def _rec(sport: int, idle_ms: int) -> bytes:
    return FlowRecord("10.0.0.7", "198.18.0.10", sport, 443, 6, "198.18.1.1", "198.18.0.10",
                      sport + 1, 443, FlowKind.NAT_OUT, TcpState.ESTABLISHED, 0,
                      REC_F_CONFIRMED, 3, 1, idle_ms, 120_000, 0x100 | sport).pack()


def _sport(rec: bytes) -> int:
    return FlowRecord.unpack(rec).sport


def _owned(rec: bytes) -> bool:
    """A stand-in for the member's owner rule: odd client ports are this node's."""
    return _sport(rec) % 2 == 1


@pytest.mark.parametrize("refresh_s, sweep_s, expected", [
    (10, 60, 6), (10, 65, 6), (10, 10, 1), (10, 3, 1), (1, 2, 2), (10, 0, 0), (10, -1, 0)])
def test_rounds_per_sweep(refresh_s, sweep_s, expected):
    assert sweep.rounds(refresh_s, sweep_s) == expected


def test_a_round_refreshes_every_active_flow_and_sweeps_only_owned_idle_ones():
    active = [_rec(p, 500) for p in range(40000, 40020)]
    idle = [_rec(p, 300_000) for p in range(41000, 41200)]
    blob = b"".join(active + idle)
    fresh, swept = sweep.select(blob, idle_below_ms=IDLE_BELOW_MS, round_no=0, n_rounds=1,
                                owned=_owned)
    assert records.split(fresh) == active
    assert records.split(swept) == [r for r in idle if _owned(r)]


def test_over_a_sweep_every_owned_idle_flow_is_sent_once_and_no_other():
    rng = random.Random(7)
    idle = [_rec(p, rng.randrange(IDLE_BELOW_MS, 10**7)) for p in range(20000, 23000)]
    active = [_rec(p, rng.randrange(IDLE_BELOW_MS)) for p in range(30000, 30050)]
    blob = b"".join(rng.sample(idle + active, len(idle) + len(active)))
    n = sweep.rounds(10, 60)
    sent: list[bytes] = []
    per_round = []
    for round_no in range(100, 100 + n):     # any n consecutive rounds make one sweep
        fresh, swept = sweep.select(blob, idle_below_ms=IDLE_BELOW_MS, round_no=round_no,
                                    n_rounds=n, owned=_owned)
        assert sorted(records.split(fresh)) == sorted(active)
        sent += records.split(swept)
        per_round.append(len(swept) // records.RECORD_SIZE)
    owned_idle = [r for r in idle if _owned(r)]
    assert sorted(sent) == sorted(owned_idle)           # each once, none not owned
    # the slices are even enough that a round sends about a sixth, not a burst
    assert max(per_round) < 2 * len(owned_idle) / n, per_round


def test_off_sends_only_the_active_flows():
    blob = _rec(1, 500) + _rec(3, 60_000)
    fresh, swept = sweep.select(blob, idle_below_ms=IDLE_BELOW_MS, round_no=4, n_rounds=0,
                                owned=_owned)
    assert (fresh, swept) == (_rec(1, 500), b"")


def test_a_cut_off_tail_is_ignored_and_the_owner_rule_sees_whole_records():
    seen = []

    def owned(rec):
        seen.append(rec)
        return True

    blob = _rec(5, 60_000) + _rec(7, 60_000)[:20]
    fresh, swept = sweep.select(blob, idle_below_ms=IDLE_BELOW_MS, round_no=0, n_rounds=1,
                                owned=owned)
    assert (fresh, swept) == (b"", _rec(5, 60_000))
    assert seen == [_rec(5, 60_000)] and isinstance(seen[0], bytes)


# --- the replicas' half: pruning what an owner no longer sends ---------------------------

def test_period_is_the_rounds_a_sweep_takes_times_the_refresh():
    assert sweep.period_s(10, 60) == 60 and sweep.period_s(1, 2) == 2
    assert sweep.period_s(10, 65) == 60 and sweep.period_s(10, 3) == 10
    assert sweep.period_s(10, 0) == 0


@pytest.mark.parametrize("periods, up_for, owners_for, expected", [
    # an owner sweeping every 60 s, its stream up and the owners unchanged for 3 periods
    ({1: 60.0}, {1: 180.0}, 180.0, {1: 180.0}),
    # its stream up for less (a restart, a silence, a gap): not yet
    ({1: 60.0}, {1: 179.0}, 500.0, {}),
    ({1: 60.0}, {}, 500.0, {}),
    # the owners changed lately here (a node joined or left): nobody yet
    ({1: 60.0, 3: 2.0}, {1: 500.0, 3: 500.0}, 5.0, {}),
    ({1: 60.0, 3: 2.0}, {1: 500.0, 3: 500.0}, 6.0, {3: 6.0}),
    # an owner that does not sweep (0: an older agent, or --sweep-s 0): never
    ({1: 0.0, 3: 2.0}, {1: 10**6, 3: 10**6}, 10**6, {3: 6.0}),
])
def test_prune_after_trusts_only_sweeping_owners_with_a_steady_stream(periods, up_for,
                                                                       owners_for, expected):
    assert sweep.prune_after(periods, up_for, owners_for) == expected


def test_quiet_counts_from_the_later_of_the_last_packet_and_the_last_record():
    unit = 1 << sweep.SYNC_STAMP_SHIFT
    now = 1000 * unit
    # never synced (made here): from its last packet
    assert sweep.quiet_s(now - 5 * 10**9, 0, now) == 5.0
    # a record 10 units ago, its last packet long before: from the record's unit's end
    assert sweep.quiet_s(0, 990, now) == 9 * unit / 1e9
    # a stamp never makes a flow look older than it is: the unit now is 0 s quiet
    assert sweep.quiet_s(0, 1000, now) == 0.0
    # a packet later than the record
    assert sweep.quiet_s(now - 10**9, 900, now) == 1.0


def test_quiet_rows_are_exactly_the_rows_quiet_s_finds_quiet_that_long():
    """The prune's cheap test a column at a time (sweep.quiet_rows) keeps every row, and
    only the rows, that quiet_s finds quiet since `before` (stamps in 2^30 ns units)."""
    rng = random.Random(11)
    unit = 1 << sweep.SYNC_STAMP_SHIFT
    now = 5000 * unit
    before = now - 180 * 10**9
    seen = [now - rng.randrange(400 * 10**9) for _ in range(5000)]
    synced = [rng.choice([0, rng.randrange(4700, 5001)]) for _ in range(5000)]
    want = [i for i in range(5000)
            if sweep.quiet_s(seen[i], synced[i], now) >= (now - before) / 1e9]
    assert 100 < len(want) < 4900, "the case holds both kinds"
    assert sweep.quiet_rows(seen, synced, before) == want
