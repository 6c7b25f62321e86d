"""Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4), weighted.

The controller builds one lookup table per listener and the loader writes it into a BPF
array map; the data path picks a flow's target as table[flow_hash % size]. Every node
must build the *same* table from the same targets, so nothing here depends on the
process (no hash(), no input order): each target's permutation comes from a
cryptographic hash of its identity, and targets are taken in identity order.
"""
from __future__ import annotations

import hashlib
import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass

from hyperplane.errors import ConfigError

DEFAULT_TABLE_SIZE = 65537  # the paper's and Katran's default; prime, > 100 x 655 targets
NO_TARGET = -1


@dataclass(frozen=True)
class Backend:
    """A target as the table sees it: a stable identity ("10.1.0.11:80") and a weight.

    Weight 0 keeps the target out of the table (draining, unhealthy) without changing
    the index space the caller uses.
    """
    identity: str
    weight: int = 1

    def __post_init__(self) -> None:
        if not self.identity:
            raise ConfigError("A Maglev backend needs a non-empty identity.")
        if isinstance(self.weight, bool) or not isinstance(self.weight, int) or self.weight < 0:
            raise ConfigError(f"Backend {self.identity}: weight must be an integer >= 0, "
                              f"got {self.weight!r}.")


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % d for d in range(2, math.isqrt(n) + 1))


def permutation_start(identity: str, size: int) -> tuple[int, int]:
    """(offset, skip) of the identity's permutation of the table: entry j of it is
    (offset + j * skip) % size. skip is in 1..size-1, so with size prime every
    permutation visits every entry exactly once."""
    digest = hashlib.blake2b(identity.encode(), digest_size=16, person=b"hp-maglev").digest()
    offset = int.from_bytes(digest[:8], "big") % size
    skip = int.from_bytes(digest[8:], "big") % (size - 1) + 1
    return offset, skip


def build_table(targets: Sequence[Backend], size: int = DEFAULT_TABLE_SIZE) -> list[int]:
    """The Maglev table: for each of `size` entries, the index into `targets` of the
    target that owns it. All entries are NO_TARGET (-1) only when no target has a
    weight above 0.

    Population follows the paper: targets take turns, and on its turn a target claims
    the next entry of its own permutation that nobody holds yet. Weights set how often
    a target gets a turn: its k-th turn falls at virtual time k / weight (weighted fair
    queueing), so a target of weight w ends up with about w / sum(weights) of the
    entries; with equal weights this is the paper's plain round robin.
    """
    if not is_prime(size):
        raise ConfigError(f"The Maglev table size must be a prime number, got {size} "
                          f"(the default is {DEFAULT_TABLE_SIZE}).")
    if size < len(targets):
        raise ConfigError(f"The Maglev table size ({size}) must be at least the number "
                          f"of targets ({len(targets)}).")
    identities = [t.identity for t in targets]
    if len(set(identities)) != len(identities):
        duplicate = next(i for i in identities if identities.count(i) > 1)
        raise ConfigError(f"Maglev backend {duplicate} is listed more than once.")

    table = [NO_TARGET] * size
    # Identity order, not input order, decides who goes first: the same set of targets
    # gives the same table on every node.
    members = sorted((i for i, t in enumerate(targets) if t.weight > 0),
                     key=lambda i: targets[i].identity)
    if not members:
        return table

    # Integer virtual time keeps the turn order exact (and identical everywhere):
    # one time unit is 1 / lcm(weights), so each target's step between turns is whole.
    period = math.lcm(*(targets[i].weight for i in members))
    step = [period // targets[i].weight for i in members]
    position = []
    skip = []
    for i in members:
        offset, target_skip = permutation_start(targets[i].identity, size)
        position.append(offset)
        skip.append(target_skip)

    # (time of the next turn, rank in identity order): ties go to the lower identity.
    turns = [(step[rank], rank) for rank in range(len(members))]
    heapq.heapify(turns)
    for _ in range(size):
        when, rank = turns[0]
        entry = position[rank]
        target_skip = skip[rank]
        while table[entry] != NO_TARGET:
            entry += target_skip
            if entry >= size:
                entry -= size
        table[entry] = members[rank]
        entry += target_skip
        position[rank] = entry - size if entry >= size else entry
        heapq.heapreplace(turns, (when + step[rank], rank))
    return table
