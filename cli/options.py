"""Option decorators shared by hpctl commands."""
import json as _json
import sys

import click


def json_option(f):
    """--json on every read command: machine-readable data on stdout."""
    return click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")(f)


def emit_json(data) -> None:
    _json.dump(data, sys.stdout, indent=2, sort_keys=True, default=str)
    sys.stdout.write("\n")


def node_option(f):
    """Which node's pinned datapath to talk to."""
    return click.option("--node", default="node1", show_default=True,
                        help="Node name; its maps are pinned under the pin root.")(f)
