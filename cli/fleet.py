"""hpctl fleet: the fleet as the store and this host's agents see it (members, leases, sync
peers, replication lag, rejected messages). Also the pieces hpctl nodes / shards share:
the --store option and one read of the fleet's keys."""
from __future__ import annotations

from dataclasses import dataclass

import click

from .exit import Exit
from .options import emit_json, json_option

# hyperplane.fleet.store.DEFAULT_STORE; written out so that --help imports no store code
DEFAULT_STORE = "/run/hyperplane/store/nlb.json"

store_option = click.option("--store", "store_url", default=DEFAULT_STORE, show_default=True,
                            envvar="HPCTL_STORE",
                            help="The cluster store: a file (PATH or file:PATH) or "
                                 "etcd://HOST:PORT.")

# A subcommand of a group that has --store too (hpctl nodes --store X remove N): given
# on neither, the group's (its default or HPCTL_STORE) is used.
sub_store_option = click.option("--store", "store_url", default=None,
                                help="The cluster store (default: the group's --store, "
                                     f"HPCTL_STORE or {DEFAULT_STORE}).")


def group_store(store_url: str | None) -> str:
    if store_url:
        return store_url
    ctx = click.get_current_context()
    return ctx.parent.params["store_url"] if ctx.parent is not None else DEFAULT_STORE


@dataclass
class FleetView:
    """One read of the fleet's keys."""
    node_ids: dict          # /node-ids: name -> id (named nodes, live or not)
    members: dict           # /nodes/*: name -> Member (the live ones)
    leases: dict            # name -> lease id of its /nodes/ key
    sharder: object         # /shards as a ShuffleSharder
    shards_revision: int    # 0: no /shards key


def read_fleet(store) -> FleetView:
    from hyperplane.errors import ConfigError
    from hyperplane.fleet import cluster
    ids_entry = store.get(cluster.NODE_IDS_KEY)
    node_ids = ids_entry.value if ids_entry else {}
    if not isinstance(node_ids, dict):
        raise ConfigError(f"{cluster.NODE_IDS_KEY} in the store must be an object of "
                          f"name: id, not {node_ids!r}")
    listing = store.list(cluster.NODES_PREFIX)
    members = cluster.members(listing)
    leases = {m.name: entry.lease for key, entry in listing.items()
              for m in [members.get(key[len(cluster.NODES_PREFIX):])] if m is not None}
    shards_entry = store.get(cluster.SHARDS_KEY)
    sharder = cluster.sharder(shards_entry.value if shards_entry else {})
    return FleetView(dict(node_ids), members, leases, sharder,
                     shards_entry.revision if shards_entry else 0)


def member_dict(m) -> dict:
    return {"id": m.id, "sync_ip": m.sync_ip, "mac": m.mac, "epoch": m.epoch, "ready": m.ready}


def resources_of(sharder, node: str) -> list[str]:
    return sorted(r for r, names in sharder.shards.items() if node in names)


# --- hpctl fleet status ----------------------------------------------------------------

command = click.Group(
    "fleet", help="The fleet: live members and their leases, and the sync state of the "
                  "agents on this host.",
    epilog="\b\nExamples:\n"
           "  hpctl fleet status\n"
           "  hpctl fleet status --json --store etcd://10.0.0.1:2379\n"
           "  hpctl nodes; hpctl shards             (named nodes; each resource's nodes)")


def _store_section(store_url: str) -> dict:
    from hyperplane.errors import HyperplaneError
    from hyperplane.fleet import cluster
    from hyperplane.fleet.store import open_store
    try:
        with open_store(store_url) as store:
            view = read_fleet(store)
            entry = store.get(cluster.CLUSTER_KEY)
            info = cluster.cluster_from(entry.value) if entry else None
    except HyperplaneError as exc:
        return {"url": store_url, "error": str(exc)}
    return {
        "url": store_url,
        # never the keys themselves: which ones exist and which one signs
        "cluster": None if info is None else {
            "seed": info.seed, "sync_port": info.sync_port,
            "sync_key_current": info.keyring.current_id,
            "sync_key_ids": sorted(info.keyring.ids())},
        "named": dict(sorted(view.node_ids.items())),
        "members": {name: {**member_dict(m), "lease": view.leases.get(name)}
                    for name, m in sorted(view.members.items())},
    }


def _local_section(node: str) -> dict:
    """What node's agent says about the fleet, or why there is nothing to say."""
    from hyperplane.errors import HyperplaneError
    from hyperplane.node.status import read_status
    try:
        status = read_status(node)
    except HyperplaneError as exc:
        return {"agent": "missing", "error": str(exc), "fleet": None}
    out = {"agent": "running" if status["running"] else "not running",
           "pid": status.get("pid"), "age_s": status.get("age_s")}
    fleet = status.get("fleet")
    if not isinstance(fleet, dict):
        out.update(fleet=None, error="the agent is not in a fleet (its status has no fleet "
                                     "section)")
    else:
        out["fleet"] = fleet
    return out


def _num(value, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


@command.command("status", epilog="\b\nExamples:\n  hpctl fleet status\n"
                                  "  hpctl fleet status --json")
@store_option
@json_option
def status(store_url, as_json):
    """Live members and their leases (the store), and for each node running on this host
    its agent's view: members, shards, sync peers with their replication lag and resend
    queue, rejected messages, records. Exits 1 when the store cannot be read or an agent
    here is not running."""
    from hyperplane.node.lifecycle import running_nodes
    data = {"store": _store_section(store_url),
            "local": {node: _local_section(node) for node in running_nodes()}}
    trouble = "error" in data["store"] or any(
        s["agent"] != "running" for s in data["local"].values())
    if as_json:
        emit_json(data)
    else:
        _print_status(data)
    if trouble:
        raise SystemExit(Exit.FAILURE)


def _print_status(data: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    store = data["store"]
    if "error" in store:
        click.echo(f"hpctl: the store {store['url']} cannot be read: {store['error']}", err=True)
    else:
        c = store["cluster"]
        console.print(f"store {store['url']}: " + (
            "no /cluster yet (the first node creates it)" if c is None else
            f"seed {c['seed']}, sync port {c['sync_port']}, sync key {c['sync_key_current']} "
            f"(of {', '.join(map(str, c['sync_key_ids']))})"), highlight=False)
        t = Table(title=f"{len(store['members'])} live of {len(store['named'])} named nodes")
        for col in ("node", "id", "live", "sync ip", "mac", "epoch", "ready", "lease"):
            t.add_column(col, no_wrap=True)
        for name in sorted(set(store["named"]) | set(store["members"])):
            m = store["members"].get(name)
            if m is None:
                t.add_row(name, _num(store["named"].get(name)), "no", "-", "-", "-", "-", "-")
            else:
                t.add_row(name, str(m["id"]), "yes", m["sync_ip"], m["mac"], str(m["epoch"]),
                          "yes" if m["ready"] else "no", _num(m["lease"], "{:x}"))
        console.print(t)
    if not data["local"]:
        console.print("no node runs on this host", highlight=False)
    for node, local in data["local"].items():
        head = f"node {node} (here): agent {local['agent']}"
        if local.get("pid") is not None:
            head += f", pid {local['pid']}, status {local['age_s']:.1f} s old"
        console.print(head, highlight=False)
        if local.get("fleet") is None:
            console.print(f"  {local['error']}", highlight=False)
            continue
        _print_local_fleet(console, local["fleet"])


def _print_local_fleet(console, fleet: dict) -> None:
    from rich.table import Table
    members = fleet.get("members") or {}
    ready = fleet.get("ready")
    console.print(f"  fleet name {fleet.get('name')}, node id {fleet.get('node_id')}, epoch "
                  f"{fleet.get('epoch')}"
                  + ("" if ready is None else f", {'ready' if ready else 'NOT ready'}")
                  + "; members it sees: "
                  + (", ".join(f"{n}{'' if m.get('ready') else ' (not ready)'}"
                               for n, m in sorted(members.items())) or "none"),
                  highlight=False)
    if fleet.get("error"):
        console.print(f"  error: {fleet['error']}", highlight=False)
    for resource, names in sorted((fleet.get("shards") or {}).items()):
        console.print(f"  shard {resource}: {', '.join(names)}", highlight=False)
    sync = fleet.get("sync")
    if not isinstance(sync, dict):
        console.print("  sync: no section (the agent runs no sync node)", highlight=False)
    else:
        names = {str(m.get("id")): n for n, m in members.items()}
        t = Table(title=f"sync peers of {fleet.get('name')}")
        for col in ("peer", "alive", "ack lag s", "resend queue (records)", "pending records",
                    "needs resync"):
            t.add_column(col, no_wrap=True)
        for pid, p in sorted((sync.get("peers") or {}).items(), key=lambda kv: str(kv[0])):
            t.add_row(f"{names.get(str(pid), '?')} ({pid})", "yes" if p.get("alive") else "no",
                      _num(p.get("ack_lag_s"), "{:.3f}"), _num(p.get("resend_queue_records")),
                      _num(p.get("pending_records")),
                      "-" if p.get("needs_resync") is None else
                      ("yes" if p.get("needs_resync") else "no"))
        console.print(t)
        rejected = sync.get("rejected") or {}
        console.print(f"  rejected messages: {sync.get('rejected_total', 0)}" + (
            " (" + ", ".join(f"{r} {n}" for r, n in sorted(rejected.items())) + ")"
            if rejected else ""), highlight=False)
    if fleet.get("sync_scheduling"):
        console.print(f"  sync task scheduling: {fleet['sync_scheduling']}", highlight=False)
    for section in ("records", "events"):
        values = fleet.get(section)
        console.print(f"  {section}: " + (", ".join(f"{k} {v}" for k, v in values.items())
                                          if isinstance(values, dict) else "none"),
                      highlight=False)
