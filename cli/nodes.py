"""hpctl nodes: the fleet's named nodes (live or not) and the resources whose shards hold
each; `hpctl nodes remove` forgets a node that is gone for good."""
from __future__ import annotations

import click

from .fleet import (group_store, member_dict, read_fleet, resources_of, store_option,
                    sub_store_option)
from .options import emit_json, json_option

EXAMPLES = ("\b\nExamples:\n"
            "  hpctl nodes                       named nodes, live or not, and their shards\n"
            "  hpctl nodes --json --store etcd://10.0.0.1:2379\n"
            "  hpctl nodes remove node3          (a node that is not live)")


@click.group("nodes", invoke_without_command=True, epilog=EXAMPLES,
             short_help="The fleet's named nodes, live or not, and their shards.")
@store_option
@json_option
@click.pass_context
def command(ctx, store_url, as_json):
    """Every named node (/node-ids) with its id, whether it is live (/nodes/), its sync
    address, MAC, epoch, readiness and the resources whose shards hold it."""
    if ctx.invoked_subcommand is not None:
        return
    from hyperplane.fleet.store import open_store
    with open_store(store_url) as store:
        view = read_fleet(store)
    rows = []
    for name in sorted(set(view.node_ids) | set(view.members)):
        m = view.members.get(name)
        row = {"name": name, "id": view.node_ids.get(name, m.id if m else None),
               "live": m is not None, "sync_ip": None, "mac": None, "epoch": None,
               "ready": False, "resources": resources_of(view.sharder, name)}
        if m is not None:
            row.update({k: v for k, v in member_dict(m).items() if k != "id"})
            row["member_id"] = m.id   # what the node announces (the same, unless damaged)
        rows.append(row)
    rows.sort(key=lambda r: (r["id"] is None, r["id"] if r["id"] is not None else 0, r["name"]))
    if as_json:
        emit_json(rows)
        return
    from rich.console import Console
    from rich.table import Table
    table = Table(title=f"{sum(r['live'] for r in rows)} live of {len(rows)} nodes")
    for col in ("node", "id", "live", "sync ip", "mac", "epoch", "ready", "resources"):
        table.add_column(col, no_wrap=col != "resources")
    for r in rows:
        table.add_row(r["name"], "-" if r["id"] is None else str(r["id"]),
                      "yes" if r["live"] else "no", r["sync_ip"] or "-", r["mac"] or "-",
                      "-" if r["epoch"] is None else str(r["epoch"]),
                      "yes" if r["ready"] else "no", ", ".join(r["resources"]) or "-")
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    console.print(table)


@command.command("remove", epilog="\b\nExamples:\n  hpctl nodes remove node3\n"
                                  "  hpctl nodes remove node3 --json")
@click.argument("name")
@sub_store_option
@json_option
def remove(name, store_url, as_json):
    """Forget a node that is not live: its id is freed and it leaves every shard, each of
    which gets a replacement where one fits (nothing else moves). Prints what moved."""
    from hyperplane.errors import ConfigError, NotFound
    from hyperplane.fleet import cluster
    from hyperplane.fleet.store import open_store
    with open_store(group_store(store_url)) as store:
        view = read_fleet(store)
        if name in view.members:
            raise ConfigError(f"node {name} is live (it holds {cluster.NODES_PREFIX}{name}): "
                              f"stop it first (hpctl nat down --node {name} on its host), "
                              f"then remove it once its lease has expired")
        if name not in view.node_ids and name not in view.sharder.nodes:
            raise NotFound(f"there is no node {name!r} in the fleet (hpctl nodes lists them)")

        def unname(ids: dict) -> dict:
            return {n: i for n, i in ids.items() if n != name}
        # /node-ids first: a node's ensure_shards puts every named node back into /shards
        store.update(cluster.NODE_IDS_KEY, unname, default={})
        result: dict = {}

        def drop(value: dict) -> dict:
            result.clear()
            sh = cluster.sharder(value)
            if name not in sh.nodes:
                return sh.to_dict()
            lost = resources_of(sh, name)
            added = sh.remove_node(name)
            result.update({r: {"removed": name, "added": added.get(r, []),
                               "short": sh.short().get(r, 0)} for r in lost})
            for r, new in added.items():   # older short shards refilled on the way
                result.setdefault(r, {"removed": None, "added": new,
                                      "short": sh.short().get(r, 0)})
            return sh.to_dict()
        if store.get(cluster.SHARDS_KEY) is not None:
            store.update(cluster.SHARDS_KEY, drop, default={})
    moves = {"node": name, "id": view.node_ids.get(name), "shards": dict(sorted(result.items()))}
    if as_json:
        emit_json(moves)
        return
    for resource, m in moves["shards"].items():
        line = f"{resource}: " + (f"-{m['removed']} " if m["removed"] else "")
        line += " ".join(f"+{n}" for n in m["added"])
        if m["short"]:
            line += f" (short by {m['short']}: no replacement fits)"
        click.echo(line.rstrip())
    click.echo(f"node {name} removed" + (f" (id {moves['id']} is free)" if moves["id"] is not None
                                         else "") + f"; {len(moves['shards'])} shard(s) changed",
               err=True)
