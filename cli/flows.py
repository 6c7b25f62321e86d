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
@json_option
def command(node, address, port, proto, kind, show_all, as_json):
    """List flows (each flow has two entries: its original and its reply direction)."""
    from hyperplane.datapath.flows import list_flows
    from hyperplane.node.lifecycle import open_node
    with open_node(resolve_node(node)) as maps:  # the pinned maps: no compile
        flows = list_flows(maps, address=address, port=port, proto=proto, kind=kind)
    if not show_all:
        flows = [f for f in flows if f.live]
    if as_json:
        emit_json([f.to_dict() for f in flows])
        return
    from rich.console import Console  # only for tables: --json does without
    from rich.table import Table
    table = Table(title=f"{len(flows)} flow entries")
    for col in ("kind", "proto", "packet", "translated to", "state", "packets", "bytes",
                "idle s"):
        table.add_column(col, no_wrap=True)
    for f in sorted(flows, key=lambda f: (f.kind, f.src, f.sport)):
        table.add_row(f.kind, f.proto, f"{f.src}:{f.sport} > {f.dst}:{f.dport}",
                      f"{f.new_src}:{f.new_sport} > {f.new_dst}:{f.new_dport}", f.tcp_state,
                      str(f.packets), str(f.bytes), f"{f.idle_s:.1f}")
    console = Console()
    if not console.is_terminal:  # piped: do not fold rows at 80 columns
        console = Console(width=200)
    console.print(table)
