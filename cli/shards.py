"""hpctl shards: each resource's shard (the nodes that carry it), the overlap bound, and
how much the shards overlap pairwise next to what random shards would (hypergeometric);
`rebalance` evens out the shards per node, `set-bound` changes the bound."""
from __future__ import annotations

from collections import Counter
from itertools import combinations_with_replacement
from math import comb

import click

from .fleet import group_store, read_fleet, store_option, sub_store_option
from .options import emit_json, json_option

EXAMPLES = ("\b\nExamples:\n"
            "  hpctl shards                      each resource's nodes (* = live), the overlap\n"
            "  hpctl shards --json\n"
            "  hpctl shards rebalance --max-moves 2\n"
            "  hpctl shards set-bound 1          no two resources share more than 1 node\n"
            "  hpctl shards set-bound none")


def overlap_table(shards: dict, n: int) -> dict:
    """The pairwise overlap of the shards (overlap_counts: pairs sharing exactly j nodes)
    next to its exact expectation for random shards of the same sizes over n nodes
    (hypergeometric, overlap_probabilities, summed over the pairs' sizes)."""
    from hyperplane.fleet.shards import overlap_counts, overlap_probabilities
    counts = overlap_counts(shards)
    sizes = Counter(len(s) for s in shards.values())
    pairs = comb(len(shards), 2)
    expected = [0.0] * len(counts)
    for a, b in combinations_with_replacement(sorted(sizes), 2):
        weight = comb(sizes[a], 2) if a == b else sizes[a] * sizes[b]
        if weight:
            for j, p in enumerate(overlap_probabilities(n, a, b)):
                expected[j] += weight * p
    common = sizes.most_common(1)[0][0] if sizes else None
    return {"nodes": n, "shard_sizes": {str(k): v for k, v in sorted(sizes.items())},
            "shard_size": common, "pairs": pairs, "counts": counts,
            "observed": [c / pairs if pairs else 0.0 for c in counts],
            "expected_pairs": expected,
            "expected": [e / pairs if pairs else 0.0 for e in expected]}


@click.group("shards", invoke_without_command=True, epilog=EXAMPLES,
             short_help="Each resource's nodes, the overlap bound and the overlap.")
@store_option
@json_option
@click.pass_context
def command(ctx, store_url, as_json):
    """Each resource's shard: its nodes (the live ones marked), its size, the overlap bound
    and the pairwise overlap of the shards next to the hypergeometric one."""
    if ctx.invoked_subcommand is not None:
        return
    from hyperplane.fleet import cluster
    from hyperplane.fleet.shards import capacity_limit
    from hyperplane.fleet.store import open_store
    with open_store(store_url) as store:
        view = read_fleet(store)
        configured = cluster.resources(store)
    sh = view.sharder
    live = set(view.members)
    overlap = overlap_table(sh.shards, len(sh.nodes))
    k = overlap["shard_size"]
    data = {
        "nodes": sorted(sh.nodes), "live": sorted(live & sh.nodes), "bound": sh.bound,
        "capacity_limit": None if k is None else capacity_limit(len(sh.nodes), k, sh.bound),
        "resources": {r: {"nodes": list(m), "live": sorted(live & set(m)),
                          "size": sh.sizes[r], "short": sh.sizes[r] - len(m),
                          "shard_size_asked": configured.get(r)}
                      for r, m in sorted(sh.shards.items())},
        "unassigned": sorted(r for r in configured if r not in sh.shards),
        "loads": sh.loads(), "overlap": overlap,
    }
    if as_json:
        emit_json(data)
        return
    _print(data)


def _print(data: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    n, b = len(data["nodes"]), data["bound"]
    o = data["overlap"]
    head = f"{n} nodes ({len(data['live'])} live), "
    if b is None:
        head += "no overlap bound"
    else:
        head += f"bound {b}: no two resources share more than {b} node{'' if b == 1 else 's'}"
        if data["capacity_limit"] is not None:
            k = o["shard_size"]
            head += (f"; at most C({n},{b + 1})/C({k},{b + 1}) = {data['capacity_limit']} "
                     f"resources of {k} nodes")
    console.print(head + f"; {len(data['resources'])} shards issued", highlight=False)
    t = Table(title="shards (* = live)")
    for col in ("resource", "nodes", "size", "short"):
        t.add_column(col, no_wrap=col != "nodes")
    for r, s in data["resources"].items():
        t.add_row(r, " ".join(m + ("*" if m in s["live"] else "") for m in s["nodes"]) or "-",
                  str(s["size"]), str(s["short"]) if s["short"] else "")
    console.print(t)
    if data["unassigned"]:
        console.print("no shard yet: " + ", ".join(data["unassigned"]) +
                      " (assigned once nodes are named: hpctl nodes)", highlight=False)
    if o["pairs"]:
        sizes = ", ".join(f"{c} of {s}" for s, c in o["shard_sizes"].items())
        ot = Table(title=f"pairwise overlap: {o['pairs']} pairs of shards ({sizes} nodes) "
                         f"over {o['nodes']} nodes")
        for col in ("shared nodes", "pairs", "share", "random shards (hypergeometric)", "share"):
            ot.add_column(col, justify="right")
        for j, (c, e) in enumerate(zip(o["counts"], o["expected_pairs"])):
            ot.add_row(str(j), str(c), f"{o['observed'][j]:.1%}", f"{e:.2f}",
                       f"{o['expected'][j]:.1%}")
        console.print(ot)


@command.command("rebalance", epilog="\b\nExamples:\n  hpctl shards rebalance\n"
                                     "  hpctl shards rebalance --max-moves 1 --json")
@click.option("--max-moves", type=click.IntRange(min=0), default=None,
              help="Move at most this many shard members (default: until even).")
@sub_store_option
@json_option
def rebalance(max_moves, store_url, as_json):
    """Even out the shards per node: one member at a time moves from a node with the most
    shards to one with at least two fewer, keeping the bound. Each move shifts a
    resource's traffic to another node; prints the moves."""
    from hyperplane.fleet import cluster
    from hyperplane.fleet.store import open_store
    moves: list = []

    def fn(value: dict) -> dict:
        sh = cluster.sharder(value)
        moves[:] = sh.rebalance(max_moves)
        return sh.to_dict()
    with open_store(group_store(store_url)) as store:
        if store.get(cluster.SHARDS_KEY) is not None:
            store.update(cluster.SHARDS_KEY, fn, default={})
    if as_json:
        emit_json(moves)
        return
    for m in moves:
        click.echo(f"{m['resource']}: {m['from']} -> {m['to']}")
    click.echo(f"{len(moves)} move(s)" + ("" if moves else ": the shards are even"), err=True)


def _bound(text: str) -> int | None:
    if text.lower() == "none":
        return None
    if not text.isdigit():
        raise click.BadParameter(f"{text!r}: give a whole number >= 0, or none",
                                 param_hint="BOUND")
    return int(text)


@command.command("set-bound", epilog="\b\nExamples:\n  hpctl shards set-bound 1\n"
                                     "  hpctl shards set-bound none      (no bound)")
@click.argument("bound")
@sub_store_option
def set_bound(bound, store_url):
    """Set the overlap bound: no two resources may share more than BOUND nodes (none:
    unbounded). No shard moves: a bound the current shards already break is refused
    (raise it, or release and reassign the resources that break it)."""
    from hyperplane.errors import ConfigError
    from hyperplane.fleet import cluster
    from hyperplane.fleet.shards import ShuffleSharder
    from hyperplane.fleet.store import open_store
    new_bound = _bound(bound)

    def fn(value: dict) -> dict:
        sh = cluster.sharder(value)
        try:   # the constructor holds every shard's (b+1)-subsets: a clash is refused
            return ShuffleSharder(sh.nodes, sh.shards, bound=new_bound, sizes=sh.sizes).to_dict()
        except ConfigError as exc:
            raise ConfigError(f"the bound cannot be {new_bound}: {exc}") from None
    with open_store(group_store(store_url)) as store:
        store.update(cluster.SHARDS_KEY, fn, default={})
    click.echo("overlap bound " + ("removed" if new_bound is None else f"set to {new_bound}"),
               err=True)
