"""Shuffle shards: the hypergeometric overlap, the Infima-style bound and its capacity
limit, stability under node and resource changes, rebalancing, determinism."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import combinations
from math import comb

import pytest

from hyperplane.errors import ConfigError
from hyperplane.fleet.shards import (ShardCapacityError, ShuffleSharder, capacity_limit,
                                     overlap_counts, overlap_probabilities)

# The issue's and DESIGN.md's numbers: share 0 / 1 / 2 / 3 nodes, in percent.
ISSUE_8_CHOOSE_3 = [17.9, 53.6, 26.8, 1.8]
ISSUE_100_CHOOSE_5 = [76.96, 21.14, 1.84, 0.059]
# A Fano plane: 7 shards of 3 over 7 nodes, every pair of nodes in exactly one of them, so
# with bound 1 it uses all C(7,2) = 21 pairs: the counting limit C(7,2)/C(3,2) = 7, met.
FANO = [(0, 1, 2), (0, 3, 4), (0, 5, 6), (1, 3, 5), (1, 4, 6), (2, 3, 6), (2, 4, 5)]


def names(n: int) -> list[str]:
    return [f"n{i:03d}" for i in range(n)]


def fano_shards(lines=FANO) -> dict[str, list[str]]:
    return {f"r{i}": [f"n{j:03d}" for j in line] for i, line in enumerate(lines)}


def max_pair_overlap(shards: dict[str, list[str]]) -> int:
    """The most nodes any two shards share, comparing every pair directly."""
    return max((len(set(a) & set(b)) for a, b in combinations(shards.values(), 2)), default=0)


def fill(sharder: ShuffleSharder, size: int, prefix: str = "r") -> ShardCapacityError:
    """Assign resources until one does not fit; the error it raised."""
    for i in range(10**6):
        try:
            sharder.assign(f"{prefix}{i}", size)
        except ShardCapacityError as error:
            return error
    raise AssertionError("a million resources fit")


@contextmanager
def deadline(seconds: float) -> Iterator[None]:
    """Turn a hang into a failure (SIGALRM interrupts a pure-Python loop)."""
    def expired(signum, frame):
        raise AssertionError(f"still running after {seconds} s: a hang")
    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# --- the exact distribution and its measurement -----------------------------------------

@pytest.mark.parametrize("n, k, issue", [(8, 3, ISSUE_8_CHOOSE_3), (100, 5, ISSUE_100_CHOOSE_5)])
def test_hypergeometric_formula_gives_the_issue_numbers(n: int, k: int, issue: list[float]) -> None:
    exact = overlap_probabilities(n, k)
    assert len(exact) == k + 1 and sum(exact) == pytest.approx(1.0)
    for j, percent in enumerate(issue):
        digits = len(str(percent).split(".")[1])
        assert round(100 * exact[j], digits) == percent


def test_hypergeometric_formula_equals_counting_all_shards() -> None:
    # Every pair (fixed shard of k, any shard of k') over 7 nodes, counted by brute force.
    n = 7
    for k, k_other in [(3, 3), (2, 4), (4, 2)]:
        fixed = set(range(k))
        counts = [0] * (min(k, k_other) + 1)
        for other in combinations(range(n), k_other):
            counts[len(fixed & set(other))] += 1
        expected = [c / comb(n, k_other) for c in counts]
        assert overlap_probabilities(n, k, k_other) == pytest.approx(expected)


def test_overlap_counts_equal_comparing_every_pair() -> None:
    rng = random.Random(7)
    nodes = names(9)
    shards = {f"r{i}": rng.sample(nodes, rng.randint(1, 6)) for i in range(300)}
    brute = [0] * 7
    for a, b in combinations(shards.values(), 2):
        brute[len(set(a) & set(b))] += 1
    assert overlap_counts(shards) == brute
    assert overlap_counts(list(shards.values())) == brute   # a list of shards works too
    assert overlap_counts({}) == [0]


@pytest.mark.parametrize("n, k, issue", [(8, 3, ISSUE_8_CHOOSE_3), (100, 5, ISSUE_100_CHOOSE_5)])
def test_random_shards_overlap_like_the_hypergeometric(n: int, k: int, issue: list[float]) -> None:
    sharder = ShuffleSharder(names(n), seed=2024)
    for i in range(10_000):
        sharder.assign(f"res-{i}", k)
    counts = overlap_counts(sharder.shards)
    pairs = comb(10_000, 2)
    assert sum(counts) == pairs
    measured = [100 * c / pairs for c in counts]
    exact = [100 * p for p in overlap_probabilities(n, k)]
    for j in range(k + 1):
        assert abs(measured[j] - exact[j]) < 1.0, (j, measured, exact)
    for j, percent in enumerate(issue):
        assert abs(measured[j] - percent) < 1.0, (j, measured, issue)


# --- the bound ----------------------------------------------------------------------------

def test_bound_two_no_pair_of_shards_shares_three_nodes() -> None:
    # Small fleet, filled until nothing fits: every pair compared directly.
    sharder = ShuffleSharder(names(12), bound=2, seed=5)
    error = fill(sharder, 4)
    assert len(sharder.shards) > 20
    assert max_pair_overlap(sharder.shards) <= 2
    assert len(sharder.shards) <= capacity_limit(12, 4, 2) == 55
    assert error.limit == 55

    # Big fleet, 2,000 resources: 2 million pairs, counted exactly by overlap_counts.
    bounded = ShuffleSharder(names(100), bound=2, seed=5)
    unbounded = ShuffleSharder(names(100), seed=5)
    for i in range(2_000):
        bounded.assign(f"r{i}", 5)
        unbounded.assign(f"r{i}", 5)
    assert sum(overlap_counts(bounded.shards)[3:]) == 0
    # Without the bound about 0.06 % of the pairs (~1,200) share 3 or more: the bound is
    # what keeps them out.
    assert sum(overlap_counts(unbounded.shards)[3:]) > 500


def test_capacity_limit_is_reported_quickly_not_a_hang() -> None:
    sharder = ShuffleSharder(names(8), bound=1, seed=3)
    with deadline(5):
        error = fill(sharder, 3)
    assert 1 <= len(sharder.shards) <= 9
    assert max_pair_overlap(sharder.shards) <= 1
    assert error.limit == 9 and error.reason in ("exhausted", "counting")
    message = str(error)
    assert "C(8,2)/C(3,2) = 9" in message and "bound 1" in message
    assert f"{len(sharder.shards)} shards are issued" in message
    assert "Add nodes" in message

    # A big fleet near saturation: either it fits or it says so within the search budget.
    big = ShuffleSharder(names(100), bound=1, seed=3)
    with deadline(20):
        error = fill(big, 5)
    assert error.limit == capacity_limit(100, 5, 1) == 495
    assert max_pair_overlap(big.shards) <= 1


def test_counting_limit_is_named_when_every_subset_is_used() -> None:
    sharder = ShuffleSharder(names(7), fano_shards(), bound=1)
    with pytest.raises(ShardCapacityError) as caught:
        sharder.assign("one-more", 3)
    assert caught.value.reason == "counting"
    assert "0 of the C(7,2) = 21 2-node subsets are unused" in str(caught.value)
    assert "C(7,2)/C(3,2) = 7" in str(caught.value)
    # Disjoint shards (bound 0): exactly 100 / 5 fit.
    disjoint = ShuffleSharder(names(100), bound=0)
    error = fill(disjoint, 5)
    assert len(disjoint.shards) == 20 and error.reason == "counting"


def test_too_few_nodes_and_a_spent_search_budget_are_named() -> None:
    with pytest.raises(ShardCapacityError) as caught:
        ShuffleSharder(names(4)).assign("big", 5)
    assert caught.value.reason == "nodes" and "only 4" in str(caught.value)

    # Without the last Fano line only that line fits: a search allowed one step gives up
    # and says so; the default budget finds exactly that line.
    six_lines = fano_shards(FANO[:-1])
    starved = ShuffleSharder(names(7), six_lines, bound=1, attempts=0, search_steps=1)
    with pytest.raises(ShardCapacityError) as caught:
        starved.assign("last", 3)
    assert caught.value.reason == "gave-up" and "gave up after 1 steps" in str(caught.value)
    assert ShuffleSharder(names(7), six_lines, bound=1).assign("last", 3) == \
        [f"n{j:03d}" for j in FANO[-1]]


def test_existing_shards_that_break_the_bound_are_rejected() -> None:
    with pytest.raises(ConfigError, match=r"'a' and 'b' share nodes \['n1', 'n2'\]"):
        ShuffleSharder(["n1", "n2", "n3", "n4"], {"a": ["n1", "n2", "n3"],
                                                  "b": ["n1", "n2", "n4"]}, bound=1)
    with pytest.raises(ConfigError, match="not in the fleet"):
        ShuffleSharder(["n1"], {"a": ["n1", "n9"]})


# --- stability ---------------------------------------------------------------------------

@pytest.mark.parametrize("bound", [None, 2])
def test_adding_nodes_and_resources_moves_no_member(bound: int | None) -> None:
    sharder = ShuffleSharder(names(10), bound=bound, seed=11)
    for i in range(15):
        sharder.assign(f"r{i}", 4)
    before = {r: list(m) for r, m in sharder.shards.items()}
    assert sharder.add_node("n900") == {}
    assert sharder.add_node("n901") == {}
    for i in range(15, 30):
        sharder.assign(f"r{i}", 4)
    assert {r: sharder.shards[r] for r in before} == before
    assert sharder.assign("r3", 4) == before["r3"]     # asking again changes nothing
    with pytest.raises(ConfigError, match="grow"):
        sharder.assign("r3", 5)


@pytest.mark.parametrize("bound", [None, 2])
def test_a_dead_node_is_replaced_only_where_it_was(bound: int | None) -> None:
    sharder = ShuffleSharder(names(16), bound=bound, seed=13)
    for i in range(30):
        sharder.assign(f"r{i}", 4)
    before = {r: list(m) for r, m in sharder.shards.items()}
    dead = max(sharder.loads(), key=sharder.loads().get)
    added = sharder.remove_node(dead)
    had_it = {r for r, m in before.items() if dead in m}
    assert len(had_it) > 5 and set(added) == had_it and sharder.short() == {}
    for resource, members in before.items():
        after = sharder.shards[resource]
        if resource in had_it:
            assert set(members) - {dead} <= set(after)     # the survivors stay
            assert set(after) - set(members) == set(added[resource])
            assert len(added[resource]) == 1 and dead not in after and len(after) == 4
        else:
            assert after == members
    if bound is not None:
        assert max_pair_overlap(sharder.shards) <= bound
    # The dead node's shards spread over several survivors, not all onto one.
    assert len({node for new in added.values() for node in new}) > 1


def test_a_shard_with_no_fitting_replacement_stays_short_until_a_node_joins() -> None:
    # Full Fano plane: after a death, no survivor can replace it without sharing 2 nodes.
    sharder = ShuffleSharder(names(7), fano_shards(), bound=1)
    before = {r: list(m) for r, m in sharder.shards.items()}
    assert sharder.remove_node("n000") == {}
    assert sharder.short() == {"r0": 1, "r1": 1, "r2": 1}
    assert max_pair_overlap(sharder.shards) <= 1
    filled = sharder.add_node("n007")
    # The three short shards are disjoint, so all three can take n007 (sharing it alone is
    # allowed); nothing else moves.
    assert filled == {"r0": ["n007"], "r1": ["n007"], "r2": ["n007"]}
    assert sharder.short() == {}
    assert max_pair_overlap(sharder.shards) <= 1
    for resource in ("r3", "r4", "r5", "r6"):
        assert sharder.shards[resource] == before[resource]


@pytest.mark.parametrize("bound", [None, 1])
def test_growing_a_shard_keeps_its_members(bound: int | None) -> None:
    sharder = ShuffleSharder(names(16), bound=bound, seed=17)
    for i in range(6):
        sharder.assign(f"r{i}", 3)
    others = {r: list(m) for r, m in sharder.shards.items() if r != "r0"}
    members = list(sharder.shards["r0"])
    added = sharder.grow("r0", 5)
    assert len(added) == 2 and not set(added) & set(members)
    assert sharder.shards["r0"] == sorted(members + added)
    assert sharder.sizes["r0"] == 5
    assert {r: sharder.shards[r] for r in others} == others
    if bound is not None:
        assert max_pair_overlap(sharder.shards) <= bound
    with pytest.raises(ConfigError):
        sharder.grow("r0", 4)
    with pytest.raises(ShardCapacityError) as caught:
        sharder.grow("r0", 17)
    assert caught.value.reason == "nodes"


def test_release_frees_a_resources_subsets() -> None:
    sharder = ShuffleSharder(names(7), fano_shards(), bound=1)
    with pytest.raises(ShardCapacityError):
        sharder.assign("new", 3)
    freed = sharder.shards["r4"]
    sharder.release("r4")
    assert sharder.assign("new", 3) == freed    # the only line left


@pytest.mark.parametrize("bound", [None, 2])
def test_rebalance_evens_load_and_keeps_the_bound(bound: int | None) -> None:
    sharder = ShuffleSharder(names(10), bound=bound, seed=19)
    for i in range(40):
        sharder.assign(f"r{i}", 3)
    for node in ("n100", "n101", "n102"):
        sharder.add_node(node)                      # joins idle: nothing moves by itself
    assert sharder.loads()["n100"] == 0
    before = {r: list(m) for r, m in sharder.shards.items()}
    moves = sharder.rebalance()
    load = sharder.loads()
    assert moves and min(load.values()) > 0
    if bound is None:
        assert max(load.values()) - min(load.values()) <= 1
    else:
        assert max_pair_overlap(sharder.shards) <= bound
        assert max(load.values()) - min(load.values()) <= 2
    # Every change is one of the reported moves, and each move swaps one member.
    replayed = {r: list(m) for r, m in before.items()}
    for move in moves:
        members = replayed[move["resource"]]
        members[members.index(move["from"])] = move["to"]
    assert {r: sorted(m) for r, m in replayed.items()} == sharder.shards
    assert sharder.rebalance() == []                # balanced stays put
    limited = ShuffleSharder.from_dict(json.loads(json.dumps(
        {"nodes": names(4), "shards": {f"r{i}": ["n000", "n001"] for i in range(6)}})))
    assert len(limited.rebalance(max_moves=2)) == 2


# --- determinism and plain data -------------------------------------------------------------

def scripted_run(seed: int, bound: int | None = 2) -> dict:
    sharder = ShuffleSharder(names(14), bound=bound, seed=seed)
    for i in range(12):
        sharder.assign(f"gw-{i}", 4)
    sharder.add_node("n500")
    sharder.remove_node("n003")
    sharder.grow("gw-0", 5)
    sharder.rebalance()
    return sharder.to_dict()


def test_the_same_seed_gives_the_same_shards() -> None:
    assert scripted_run(1) == scripted_run(1)
    assert scripted_run(1) != scripted_run(2)
    assert scripted_run(1, None) != scripted_run(2, None)


def test_the_same_seed_gives_the_same_shards_in_every_process() -> None:
    # Sets iterate in str-hash order, which PYTHONHASHSEED changes: nothing may depend on it.
    program = (f"import json, sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
               "import test_shards as t; print(json.dumps(t.scripted_run(42), sort_keys=True))")
    outputs = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        outputs.add(subprocess.run([sys.executable, "-c", program], env=env, check=True,
                                   capture_output=True, text=True).stdout)
    assert outputs == {json.dumps(scripted_run(42), sort_keys=True) + "\n"}


def test_state_round_trips_through_json_and_continues_the_same() -> None:
    live = ShuffleSharder(names(9), bound=1, seed=8)
    for i in range(5):
        live.assign(f"r{i}", 3)
    live.remove_node("n004")
    state = json.loads(json.dumps(live.to_dict()))
    restored = ShuffleSharder.from_dict(state, seed=8)
    assert restored.to_dict() == live.to_dict()
    # A controller restarted from the store makes the decision it would have made.
    for sharder in (live, restored):
        sharder.add_node("n100")
        sharder.assign("r9", 3)
    assert restored.to_dict() == live.to_dict()
