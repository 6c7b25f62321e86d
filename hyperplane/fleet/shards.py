"""Shuffle sharding: which k of the n nodes carry each resource (NAT gateway or NLB).

Random shards of k out of n nodes make it unlikely that two resources share many nodes, so
a node-killing request aimed at one resource hurts few others (the talk; Route 53 Infima).
Optionally a bound b makes that a guarantee: no two resources share more than b nodes. As
in Infima's StatefulSearchingShuffleSharder, every (b+1)-subset of nodes ("fragment") an
issued shard holds is remembered and a candidate shard that holds one of them is refused.
Each fragment can belong to one shard only, and a shard of k holds C(k, b+1) of the
C(n, b+1) there are, so at most C(n, b+1) / C(k, b+1) resources of k fit; a request that
does not fit raises ShardCapacityError saying which limit it hit. Searching is bounded
(random attempts, then a depth-first search with a step budget): it never hangs.

API (plain data in and out: node and resource names are str, shards are sorted lists, so
everything is JSON as it is; no I/O here, the store and hpctl call this):

    sharder = ShuffleSharder(["n1", "n2", ...], shards={"gw-a": ["n1", "n4", "n6"]},
                             bound=2, seed=cluster_seed)      # existing shards are kept
    sharder.assign("nlb-web", 3)   -> ["n2", "n5", "n7"]      # a new resource
    sharder.grow("nlb-web", 4)     -> ["n3"]                  # nodes added, none removed
    sharder.add_node("n9")         -> {resource: [nodes added]}  # refills short shards only
    sharder.remove_node("n4")      -> {resource: [replacement]}  # only where n4 was
    sharder.release("gw-a")                                   # resource deleted
    sharder.rebalance()            -> [{"resource", "from", "to"}, ...]  # explicit moves
    sharder.shards / .loads() / .short() / .to_dict();  ShuffleSharder.from_dict(d, seed=)
    overlap_probabilities(n, k)    -> [P(two random shards share exactly j nodes), j=0..k]
    overlap_counts(shards)         -> [number of shard pairs sharing exactly j nodes]
    capacity_limit(n, k, bound)    -> C(n, b+1) // C(k, b+1), or None when unbounded

Errors: ShardCapacityError (a ConfigError: hpctl prints it as one sentence) when a shard
cannot be assigned or grown, with .reason and .limit; a node death never raises: a shard
with no fitting replacement stays short (short()) and is refilled when capacity returns.
Other bad input is ConfigError, an unknown name NotFound. To persist, store to_dict() and
the seed; the remembered subsets are recomputed from the shards. For `hpctl shards`,
overlap_counts(sharder.shards) goes next to overlap_probabilities(len(sharder.nodes), k).

Determinism: every random choice comes from random.Random seeded with the caller's seed,
the operation and the names involved (never from hash() or set order), so a controller
restarted from the store with the same seed makes the same decisions as before.
"""
from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from itertools import combinations
from math import comb

from hyperplane.errors import ConfigError, NotFound

RANDOM_ATTEMPTS = 64      # uniform candidates tried before the systematic search
SEARCH_STEPS = 200_000    # fit checks the systematic search may spend (~0.5 s)


def overlap_probabilities(n: int, k: int, k_other: int | None = None) -> list[float]:
    """P(a random k-shard and a random k_other-shard of n nodes share exactly j nodes),
    for j = 0..min(k, k_other): hypergeometric, C(k, j) C(n-k, k'-j) / C(n, k')."""
    k_other = k if k_other is None else k_other
    if not 0 <= k <= n or not 0 <= k_other <= n:
        raise ConfigError(f"Shards of {k} and {k_other} nodes do not fit in {n} nodes.")
    total = comb(n, k_other)
    return [comb(k, j) * comb(n - k, k_other - j) / total for j in range(min(k, k_other) + 1)]


def overlap_counts(shards: Mapping[str, Sequence[str]] | Iterable[Sequence[str]]) -> list[int]:
    """How many pairs of the shards share exactly j nodes, j = 0..largest shard (exact).

    All pairs of 10,000 shards are 50 million, too many to compare one by one. Instead
    count, for every set T of nodes, the c(T) shards holding it: sum over |T| = t of
    C(c(T), 2) is P_t = sum_j C(j, t) N_j, where N_j is the number of pairs sharing exactly
    j nodes, and binomial inversion gives N_j = sum_t (-1)^(t-j) C(t, j) P_t. That costs
    2^k per shard instead of one comparison per pair."""
    groups = [frozenset(s) for s in (shards.values() if isinstance(shards, Mapping) else shards)]
    largest = max((len(g) for g in groups), default=0)
    holders: Counter[frozenset[str]] = Counter()
    for group in groups:
        members = sorted(group)
        for t in range(len(members) + 1):
            holders.update(frozenset(c) for c in combinations(members, t))
    pairs_by_size = [0] * (largest + 1)  # P_t
    for subset, count in holders.items():
        pairs_by_size[len(subset)] += comb(count, 2)
    return [sum((-1) ** (t - j) * comb(t, j) * pairs_by_size[t] for t in range(j, largest + 1))
            for j in range(largest + 1)]


def capacity_limit(n: int, k: int, bound: int | None) -> int | None:
    """The counting limit: at most C(n, b+1) // C(k, b+1) shards of k fit under bound b
    (each holds C(k, b+1) fragments of its own). None when the bound cannot bind."""
    if bound is None or k <= bound:
        return None
    return comb(n, bound + 1) // comb(k, bound + 1)


class ShardCapacityError(ConfigError):
    """No shard of the requested size fits. `reason` says which limit was hit:
    "nodes" (too few nodes), "counting" (too few unused (b+1)-subsets: the C(n, b+1) /
    C(k, b+1) limit), "exhausted" (every candidate was searched and each reuses a subset)
    or "gave-up" (the search's step budget ran out; a shard may still exist)."""

    def __init__(self, message: str, reason: str, limit: int | None):
        super().__init__(message)
        self.reason = reason
        self.limit = limit


class _GaveUp(Exception):
    pass


class ShuffleSharder:
    """The shards of all resources over the live nodes, and the operations that change
    them without moving members nobody asked to move."""

    def __init__(self, nodes: Iterable[str], shards: Mapping[str, Sequence[str]] | None = None,
                 *, bound: int | None = None, seed: int | str = 0,
                 sizes: Mapping[str, int] | None = None,
                 attempts: int = RANDOM_ATTEMPTS, search_steps: int = SEARCH_STEPS):
        self.nodes: set[str] = set()
        for node in nodes:
            self._check_new_node(node)
            self.nodes.add(node)
        if bound is not None and (isinstance(bound, bool) or not isinstance(bound, int)
                                  or bound < 0):
            raise ConfigError(f"The shard overlap bound must be an integer >= 0, got {bound!r}.")
        self.bound = bound
        self.seed = seed
        self.attempts = attempts
        self.search_steps = search_steps
        self.shards: dict[str, list[str]] = {}
        self.sizes: dict[str, int] = {}   # the size asked for; a shard is short after deaths
        # fragment -> the resource holding it (one only: that is what the bound means)
        self._fragments: dict[frozenset[str], str] = {}
        for resource in sorted(shards or {}):
            members = list(shards[resource])
            unknown = sorted(set(members) - self.nodes)
            if unknown:
                raise ConfigError(f"Shard {resource!r} names nodes not in the fleet: {unknown} "
                                  "(remove_node() a dead node after loading instead).")
            if len(set(members)) != len(members):
                raise ConfigError(f"Shard {resource!r} names a node twice: {members}.")
            size = (sizes or {}).get(resource, len(members))
            if size < len(members):
                raise ConfigError(f"Shard {resource!r} has {len(members)} nodes, more than "
                                  f"its size {size}.")
            self.shards[resource] = sorted(members)
            self.sizes[resource] = size
            self._hold_fragments(resource)

    # --- JSON ---------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {"nodes": sorted(self.nodes), "bound": self.bound,
                "shards": {r: list(m) for r, m in sorted(self.shards.items())},
                "sizes": dict(sorted(self.sizes.items()))}

    @classmethod
    def from_dict(cls, data: Mapping, *, seed: int | str = 0, **options) -> ShuffleSharder:
        return cls(data.get("nodes", []), data.get("shards", {}), bound=data.get("bound"),
                   sizes=data.get("sizes"), seed=seed, **options)

    # --- reading ------------------------------------------------------------------------

    def loads(self) -> dict[str, int]:
        """How many shards each live node is in (0 for idle nodes)."""
        load = Counter({node: 0 for node in self.nodes})
        load.update(node for members in self.shards.values() for node in members)
        return dict(sorted(load.items()))

    def short(self) -> dict[str, int]:
        """Resources whose shard lost members that could not be replaced: how many."""
        return {r: self.sizes[r] - len(m) for r, m in sorted(self.shards.items())
                if len(m) < self.sizes[r]}

    # --- resources ----------------------------------------------------------------------

    def assign(self, resource: str, size: int) -> list[str]:
        """A new resource's shard of `size` nodes, at random: uniform candidates first (so
        unbounded, or while the bound is far from full, the shard is a uniform random pick
        among those that keep it), then the first fit of a search in random order. Asking
        again with the same size returns the existing shard."""
        if not isinstance(resource, str) or not resource:
            raise ConfigError(f"A resource needs a non-empty name, got {resource!r}.")
        self._check_size(size)
        if resource in self.shards:
            if self.sizes[resource] != size:
                raise ConfigError(f"Resource {resource!r} already has a shard of "
                                  f"{self.sizes[resource]} nodes; use grow() to change it.")
            return list(self.shards[resource])
        members = self._extend(resource, [], size, light_first=False)
        self.shards[resource] = sorted(members)
        self.sizes[resource] = size
        self._hold_fragments(resource)
        return list(self.shards[resource])

    def grow(self, resource: str, size: int) -> list[str]:
        """Grow a shard to `size` nodes, keeping every member (its flows stay where they
        are); the least loaded nodes that keep the bound are added. Returns them."""
        current = self._shard(resource)
        self._check_size(size)
        if size < self.sizes[resource]:
            raise ConfigError(f"Shard {resource!r} has {self.sizes[resource]} nodes; growing "
                              f"cannot make it {size} (removing members is not supported).")
        added = self._extend(resource, current, size - len(current), light_first=True)
        self.sizes[resource] = size
        self._add_members(resource, added)
        return added

    def release(self, resource: str) -> None:
        """The resource is deleted: its nodes and fragments are free for others."""
        self._shard(resource)
        self._drop_fragments(resource)
        del self.shards[resource], self.sizes[resource]

    # --- nodes --------------------------------------------------------------------------

    def add_node(self, node: str) -> dict[str, list[str]]:
        """A node joins. No existing member moves; shards left short by earlier deaths are
        refilled (the new node is the least loaded, so usually with it)."""
        self._check_new_node(node)
        self.nodes.add(node)
        return self.refill()

    def remove_node(self, node: str) -> dict[str, list[str]]:
        """A node died: it leaves every shard that had it, and each of those gets one
        replacement (least loaded first, keeping the bound); nothing else moves. A shard
        with no fitting replacement stays short (see short()) until capacity returns.
        Returns the nodes added per resource."""
        if node not in self.nodes:
            raise NotFound(f"No node {node!r} in the fleet.")
        self.nodes.discard(node)
        hit = [r for r in sorted(self.shards) if node in self.shards[r]]
        for resource in hit:
            self._drop_fragments(resource)
            self.shards[resource].remove(node)
            self._hold_fragments(resource)
        # The shards that lost the node first, then older short shards (fragments the dead
        # node freed may let them fit now).
        return self.refill(first=hit)

    def refill(self, first: Sequence[str] = ()) -> dict[str, list[str]]:
        """Add members to every short shard where the bound allows; moves nothing."""
        added: dict[str, list[str]] = {}
        for resource in list(first) + [r for r in self.short() if r not in first]:
            missing = self.sizes[resource] - len(self.shards[resource])
            if missing <= 0:
                continue
            for wanted in range(missing, 0, -1):  # as many as fit, if not all
                try:
                    new = self._extend(resource, self.shards[resource], wanted,
                                       light_first=True)
                except ShardCapacityError:
                    continue
                self._add_members(resource, new)
                added[resource] = new
                break
        return added

    def rebalance(self, max_moves: int | None = None) -> list[dict[str, str]]:
        """Even out the shards per node (asked for explicitly: each move shifts a
        resource's traffic). Moves one member at a time from a node with the most shards
        to one with at least two fewer, keeping the bound, until no such move exists (each
        move lowers the sum of squared loads, so this ends). Returns the moves made. Short
        shards are not touched here: refill() adds their members."""
        moves: list[dict[str, str]] = []
        while max_moves is None or len(moves) < max_moves:
            move = self._one_balancing_move()
            if move is None:
                break
            resource, heavy, light = move
            self._drop_fragments(resource)
            self.shards[resource] = sorted([m for m in self.shards[resource] if m != heavy]
                                           + [light])
            self._hold_fragments(resource)
            moves.append({"resource": resource, "from": heavy, "to": light})
        return moves

    # --- internals ----------------------------------------------------------------------

    def _one_balancing_move(self) -> tuple[str, str, str] | None:
        load = self.loads()
        heavy_first = sorted(load, key=lambda n: (-load[n], n))
        for heavy in heavy_first:
            for light in reversed(heavy_first):
                if load[heavy] - load[light] < 2:
                    break
                for resource in sorted(self.shards):
                    members = self.shards[resource]
                    if heavy in members and light not in members and self._fits(
                            [m for m in members if m != heavy], light):
                        return resource, heavy, light
        return None

    def _rng(self, *context: object) -> random.Random:
        # A str seed is hashed with SHA-512 by random.Random: the same in every process.
        return random.Random("/".join(str(part) for part in (self.seed, *context)))

    def _fragment_size(self) -> int | None:
        return None if self.bound is None else self.bound + 1

    def _fits(self, chosen: Sequence[str], node: str) -> bool:
        """Whether chosen + node holds no fragment with `node` in it that is already held."""
        t = self._fragment_size()
        if t is None or len(chosen) + 1 < t:
            return True
        return not any(frozenset((*rest, node)) in self._fragments
                       for rest in combinations(chosen, t - 1))

    def _extend(self, resource: str, base: Sequence[str], extra: int,
                light_first: bool) -> list[str]:
        """`extra` nodes that, added to `base`, keep the bound; or ShardCapacityError."""
        size = len(base) + extra
        candidates = sorted(self.nodes - set(base))
        rng = self._rng("extend", resource, ",".join(sorted(base)), size)
        if extra > len(candidates):
            raise self._capacity_error(resource, size, "nodes",
                                       f"only {len(candidates)} more of the {len(self.nodes)} "
                                       f"nodes are available and {extra} are needed")
        t = self._fragment_size()
        if t is not None:
            needed = comb(size, t) - comb(len(base), t)
            unused = comb(len(self.nodes), t) - len(self._fragments)
            if needed > unused:
                raise self._capacity_error(
                    resource, size, "counting",
                    f"the counting limit is reached: {unused} of the C({len(self.nodes)},{t}) "
                    f"= {comb(len(self.nodes), t)} {t}-node subsets are unused and this "
                    f"shard needs {needed} of its own")
        if not light_first:
            # Uniform random candidates first: unbounded, this is plain shuffle sharding
            # and the pairwise overlap is exactly hypergeometric.
            for _ in range(max(self.attempts, 1 if t is None else 0)):
                pick = rng.sample(candidates, extra)
                if t is None or self._all_fit(base, pick):
                    return sorted(pick)
        rng.shuffle(candidates)
        if light_first:
            load = self.loads()
            candidates.sort(key=lambda n: load[n])  # stable: ties stay shuffled
        try:
            found = self._search(list(base), candidates, extra)
        except _GaveUp:
            raise self._capacity_error(
                resource, size, "gave-up",
                f"the search gave up after {self.search_steps} steps without finding one "
                "(a shard may still exist)") from None
        if found is None:
            raise self._capacity_error(
                resource, size, "exhausted",
                f"every candidate reuses a {t}-node subset another shard holds "
                "(searched them all: the issued shards pack tighter than the counting limit)")
        return sorted(found)

    def _all_fit(self, base: Sequence[str], pick: Sequence[str]) -> bool:
        chosen = list(base)
        for node in pick:
            if not self._fits(chosen, node):
                return False
            chosen.append(node)
        return True

    def _search(self, base: list[str], candidates: list[str], extra: int) -> list[str] | None:
        """Depth-first over combinations in candidate order, pruning nodes that no longer
        fit; spends at most search_steps fit checks, then raises _GaveUp."""
        steps = 0

        def fitting(chosen: list[str], pool: list[str]) -> list[str]:
            nonlocal steps
            steps += len(pool)
            if steps > self.search_steps:
                raise _GaveUp
            return [n for n in pool if self._fits(chosen, n)]

        def depth_first(chosen: list[str], pool: list[str], need: int) -> list[str] | None:
            if need == 0:
                return chosen[len(base):]
            for i, node in enumerate(pool):
                if len(pool) - i < need:
                    return None
                found = depth_first(chosen + [node], fitting(chosen + [node], pool[i + 1:]),
                                    need - 1)
                if found is not None:
                    return found
            return None

        return depth_first(base, fitting(base, candidates), extra)

    def _capacity_error(self, resource: str, size: int, reason: str,
                        why: str) -> ShardCapacityError:
        n, b = len(self.nodes), self.bound
        limit = capacity_limit(n, size, b)
        message = f"No shard of {size} nodes fits resource {resource!r}: {why}."
        if limit is not None:
            message += (f" With {n} nodes and bound {b} (no two resources may share more "
                        f"than {b} node{'' if b == 1 else 's'}) at most C({n},{b + 1})/C({size},{b + 1}) = {limit} "
                        f"resources of {size} nodes fit; {len(self.shards)} shards are issued.")
        message += " Add nodes, use smaller shards" + (" or raise the bound." if b is not None
                                                        else ".")
        return ShardCapacityError(message, reason, limit)

    def _add_members(self, resource: str, added: Sequence[str]) -> None:
        self._drop_fragments(resource)
        self.shards[resource] = sorted(self.shards[resource] + list(added))
        self._hold_fragments(resource)

    def _hold_fragments(self, resource: str) -> None:
        t = self._fragment_size()
        if t is None:
            return
        for fragment in map(frozenset, combinations(self.shards[resource], t)):
            holder = self._fragments.setdefault(fragment, resource)
            if holder != resource:
                raise ConfigError(f"Shards {holder!r} and {resource!r} share nodes "
                                  f"{sorted(fragment)}: more than the bound {self.bound}.")

    def _drop_fragments(self, resource: str) -> None:
        t = self._fragment_size()
        if t is not None:
            for fragment in map(frozenset, combinations(self.shards[resource], t)):
                if self._fragments.get(fragment) == resource:
                    del self._fragments[fragment]

    def _shard(self, resource: str) -> list[str]:
        if resource not in self.shards:
            raise NotFound(f"No shard for resource {resource!r}.")
        return self.shards[resource]

    @staticmethod
    def _check_size(size: int) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ConfigError(f"A shard size must be an integer >= 1, got {size!r}.")

    def _check_new_node(self, node: str) -> None:
        if not isinstance(node, str) or not node:
            raise ConfigError(f"A node needs a non-empty name, got {node!r}.")
        if node in self.nodes:
            raise ConfigError(f"Node {node!r} is already in the fleet.")
