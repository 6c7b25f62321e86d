"""hpctl flows: list the flow table of a node."""
from __future__ import annotations

import click

from .options import emit_json, json_option, node_option, resolve_node


@click.command("flows", epilog="\b\nExamples:\n  hpctl flows --proto tcp\n"
                               "  hpctl flows --address 10.10.0.10 --json\n"
                               "  hpctl flows --kind nat_out --port 80")
@node_option
@click.option("--address", help="Only flows with this address (either side, before or after NAT).")
@click.option("--port", type=int, help="Only flows with this port (any side).")
@click.option("--proto", type=click.Choice(["tcp", "udp", "icmp"]))
@click.option("--kind", type=click.Choice(["nat_out", "nat_in", "nlb_in", "nlb_out"]),
              help="Only one direction / kind of entry.")
@click.option("--all", "show_all", is_flag=True, help="Include entries already past their timeout.")
@click.option("--follow", "-f", is_flag=True,
              help="Print flows as they are created, confirmed, changed and closed (the "
                   "node agent's event stream) until Ctrl-C.")
@click.option("--event", "events", multiple=True,
              type=click.Choice(["created", "confirmed", "changed", "closed", "expired",
                                 "removed", "rejected"]),
              help="With --follow: only these events (repeat).")
@click.option("--resource", type=int, default=None,
              help="With --follow: only flows of this gateway id (NAT) or listener (NLB).")
@json_option
def command(node, address, port, proto, kind, show_all, follow, events, resource, as_json):
    """List flows (each flow has two entries: its original and its reply direction)."""
    from hyperplane.datapath.flows import list_flows
    from hyperplane.node.lifecycle import open_node
    node = resolve_node(node)
    if follow:
        from .follow import follow_flows
        follow_flows(node, address=address, port=port, proto=proto, kind=kind,
                     events=set(events), resource=resource, as_json=as_json)
        return
    if events or resource is not None:
        raise click.UsageError("--event and --resource go with --follow")
    with open_node(node) as maps:  # the pinned maps: no compile
        flows = list_flows(maps, address=address, port=port, proto=proto, kind=kind)
    if not show_all:
        flows = [f for f in flows if f.live]
    holders = flow_holders(flows, node)
    if as_json:
        emit_json([{**f.to_dict(), "nodes": h} for f, h in zip(flows, holders)])
        return
    from rich.console import Console  # only for tables: --json does without
    from rich.table import Table
    table = Table(title=f"{len(flows)} flow entries")
    for col in ("kind", "proto", "packet", "translated to", "state", "packets", "bytes",
                "idle s", "nodes"):
        table.add_column(col, no_wrap=True)
    for f, h in sorted(zip(flows, holders), key=lambda fh: (fh[0].kind, fh[0].src, fh[0].sport)):
        table.add_row(f.kind, f.proto, f"{f.src}:{f.sport} > {f.dst}:{f.dport}",
                      f"{f.new_src}:{f.new_sport} > {f.new_dst}:{f.new_dport}", f.tcp_state,
                      str(f.packets), str(f.bytes), f"{f.idle_s:.1f}", ",".join(h))
    console = Console()
    if not console.is_terminal:  # piped: do not fold rows at 80 columns
        console = Console(width=200)
    console.print(table)


HOLDING_TABLES = ("flows", "pending")   # confirmed and unconfirmed flow entries


def flow_holders(flows: list, node: str) -> list[list[str]]:
    """For each flow entry (read from node), the nodes running on this host whose pinned
    flow tables hold its key. With node the only one running here, that is node."""
    import contextlib

    from hyperplane.errors import HyperplaneError
    from hyperplane.node.lifecycle import open_node, running_nodes
    others = [n for n in running_nodes() if n != node]
    if not others:
        return [[node] for _ in flows]
    with contextlib.ExitStack() as stack:
        tables: dict[str, list] = {}
        for name in sorted([node, *others]):
            try:
                dp = stack.enter_context(open_node(name))
            except HyperplaneError:  # stopped meanwhile, or damaged: it holds nothing
                continue
            tables[name] = []
            for table in HOLDING_TABLES:
                try:
                    tables[name].append(dp.table(table))
                except (KeyError, HyperplaneError):  # a program older than "pending"
                    continue
        return [[name for name, held in tables.items()
                 if any(_flow_key(t, f) in t for t in held)] for f in flows]


def _flow_key(table, flow):
    """The struct flow_key of a decoded entry, in the table's own key type."""
    from hyperplane.codec import ip_to_be32, port_to_be16, proto_number
    key = table.Key()
    key.src_ip, key.dst_ip = ip_to_be32(flow.src), ip_to_be32(flow.dst)
    key.src_port, key.dst_port = port_to_be16(flow.sport), port_to_be16(flow.dport)
    key.proto = int(flow.proto) if flow.proto.isdigit() else proto_number(flow.proto)
    return key
