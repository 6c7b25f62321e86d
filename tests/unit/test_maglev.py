"""Maglev table: balance, minimal disruption, weights, determinism, size checks."""
from __future__ import annotations

import os
import random
import subprocess
import sys
import time
from collections import Counter

import pytest

from hyperplane.errors import ConfigError
from hyperplane.nlb.maglev import DEFAULT_TABLE_SIZE, NO_TARGET, Backend, build_table

M = DEFAULT_TABLE_SIZE


def backends(n: int, weight: int = 1) -> list[Backend]:
    return [Backend(f"10.1.{i // 250}.{i % 250 + 1}:80", weight) for i in range(n)]


def owners(targets: list[Backend], table: list[int]) -> list[str]:
    """The table as identities, so tables over different target lists compare."""
    return [targets[i].identity for i in table]


@pytest.mark.parametrize("n", [3, 10, 100, 500])
def test_equal_weights_balance_within_one_percent(n: int) -> None:
    assert M > 100 * n  # the paper's condition for < 1 % imbalance
    shares = Counter(build_table(backends(n)))
    assert sorted(shares) == list(range(n))
    mean = M / n
    assert (max(shares.values()) - min(shares.values())) / mean <= 0.01


@pytest.mark.parametrize("n", [3, 10, 100])
def test_removing_one_target_moves_only_its_entries(n: int) -> None:
    targets = backends(n)
    before = owners(targets, build_table(targets))
    for removed in {0, n // 2, n - 1}:
        gone = targets[removed].identity
        survivors = targets[:removed] + targets[removed + 1:]
        after = owners(survivors, build_table(survivors))
        assert gone not in after
        moved = sum(1 for b, a in zip(before, after) if b != gone and b != a)
        assert moved <= 0.01 * M, f"{moved} survivor entries moved when {gone} left"


def test_adding_one_target_takes_entries_mostly_from_others_fairly() -> None:
    targets = backends(10)
    before = owners(targets, build_table(targets))
    grown = targets + [Backend("10.1.9.9:80")]
    after = owners(grown, build_table(grown))
    taken = sum(1 for b, a in zip(before, after) if a == "10.1.9.9:80")
    reshuffled = sum(1 for b, a in zip(before, after) if a != "10.1.9.9:80" and a != b)
    assert abs(taken - M / 11) / (M / 11) <= 0.01
    assert reshuffled <= 0.01 * M


def test_weights_give_proportional_shares() -> None:
    targets = [Backend("10.1.0.1:80", 1), Backend("10.1.0.2:80", 2), Backend("10.1.0.3:80", 3)]
    shares = Counter(build_table(targets))
    for index, expected in enumerate([1 / 6, 2 / 6, 3 / 6]):
        assert abs(shares[index] / M - expected) <= 0.01 * expected


def test_weight_zero_target_is_left_out() -> None:
    targets = [Backend("10.1.0.1:80"), Backend("10.1.0.2:80", 0), Backend("10.1.0.3:80")]
    shares = Counter(build_table(targets))
    assert set(shares) == {0, 2}


def test_table_is_independent_of_input_order() -> None:
    targets = [Backend(f"10.2.0.{i}:443", 1 + i % 3) for i in range(1, 40)]
    reference = owners(targets, build_table(targets))
    shuffled = targets[:]
    random.Random(7).shuffle(shuffled)
    assert shuffled != targets
    assert owners(shuffled, build_table(shuffled)) == reference


GOLDEN_TARGETS = [Backend("a:1"), Backend("b:2", 2), Backend("c:3")]
GOLDEN_TABLE = [2, 1, 2, 1, 0, 1, 0, 1, 0, 1, 2, 1, 1]


def test_table_is_the_same_in_every_process() -> None:
    # Pinned output: a change in the hash or the population order would make nodes on
    # different versions disagree about targets, so it has to show up here first.
    assert build_table(GOLDEN_TARGETS, size=13) == GOLDEN_TABLE
    # Processes with different str hash seeds (what hash() would depend on) agree.
    program = ("from hyperplane.nlb.maglev import Backend, build_table; "
               f"print(build_table({GOLDEN_TARGETS!r}, size=13))")
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run([sys.executable, "-c", program], env=env, check=True,
                             capture_output=True, text=True).stdout
        assert out.strip() == str(GOLDEN_TABLE)


def test_empty_target_list_gives_empty_table() -> None:
    assert build_table([], size=7) == [NO_TARGET] * 7
    assert build_table([Backend("10.1.0.1:80", 0)], size=7) == [NO_TARGET] * 7


@pytest.mark.parametrize("size", [65536, 1, 0, 100, 65535])
def test_non_prime_size_is_rejected(size: int) -> None:
    with pytest.raises(ConfigError, match="prime"):
        build_table(backends(3), size=size)


def test_size_smaller_than_target_count_is_rejected() -> None:
    with pytest.raises(ConfigError, match="at least the number of targets"):
        build_table(backends(20), size=13)


def test_duplicate_identity_is_rejected() -> None:
    with pytest.raises(ConfigError, match="more than once"):
        build_table([Backend("10.1.0.1:80"), Backend("10.1.0.1:80", 2)])


@pytest.mark.parametrize("weight", [-1, 1.5, True])
def test_bad_weight_is_rejected(weight) -> None:
    with pytest.raises(ConfigError, match="weight"):
        Backend("10.1.0.1:80", weight)


def test_full_size_table_with_100_targets_builds_well_under_a_second() -> None:
    targets = [Backend(f"10.3.0.{i}:80", 1 + i % 4) for i in range(1, 101)]
    started = time.perf_counter()
    build_table(targets)
    assert time.perf_counter() - started < 0.5
