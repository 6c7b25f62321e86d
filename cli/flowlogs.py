"""hpctl flowlogs: a node's VPC flow log records (written by its agent), or --follow them."""
from __future__ import annotations

import click

from .options import node_option, resolve_node


@click.command("flowlogs", epilog="\b\nExamples:\n  hpctl flowlogs --tail 20\n"
                                  "  hpctl flowlogs --follow\n"
                                  "  hpctl flowlogs --json | jq '.[] | select(.dstport == 53)'")
@node_option
@click.option("--follow", "-f", is_flag=True,
              help="Print records as the agent writes them (across file rotations) until "
                   "Ctrl-C.")
@click.option("--format", "fmt", type=click.Choice(["v2", "json"]), default="v2",
              show_default=True, help="One record a line: VPC Flow Logs version 2, or JSON.")
@click.option("--json", "as_json", is_flag=True,
              help="A JSON array of the records (with --follow: JSON lines).")
@click.option("--tail", type=click.IntRange(min=1), default=None,
              help="Only the last N records (of the files there now).")
@click.option("--dir", "directory", default=None,
              help="The flow log directory (default: where the node's agent writes, from "
                   "its status; else /run/hyperplane/flowlogs).")
def command(node, follow, fmt, as_json, tail, directory):
    """A node's VPC flow logs: one record per 5-tuple per interface per interval."""
    import collections
    import sys

    from hyperplane.errors import NotFound
    from hyperplane.observe import flowlogs
    node = resolve_node(node)
    path = _log_path(node, directory)
    fmt = "json" if as_json else fmt
    if follow:
        if not flowlogs.log_files(path):
            raise NotFound(f"no flow log at {path} (is the agent of node {node} running, with "
                           "flow logs on? hpctl agent run --node NODE)")
        try:
            for line in flowlogs.follow_lines(path):
                out = _convert(line, fmt)
                if out is not None:
                    click.echo(out)
                    sys.stdout.flush()
        except KeyboardInterrupt:
            return
        return
    files = flowlogs.log_files(path)
    if not files:
        raise NotFound(f"no flow log at {path} (is the agent of node {node} running, with "
                       "flow logs on? hpctl agent run --node NODE)")
    records = collections.deque(maxlen=tail)
    for line in flowlogs.read_lines(path):
        try:
            records.append(flowlogs.parse_line(line))
        except ValueError:
            continue            # a line cut by a crash, or not a record
    if as_json:
        from .options import emit_json
        emit_json([r.to_dict() for r in records])
        return
    for r in records:
        click.echo(flowlogs.format_record(r, fmt))


def _convert(line: str, fmt: str) -> str | None:
    from hyperplane.observe import flowlogs
    try:
        return flowlogs.format_record(flowlogs.parse_line(line), fmt)
    except ValueError:
        return None


def _log_path(node: str, directory: str | None) -> str:
    """Where the node's flow log is: --dir, else what its agent says, else the default."""
    from hyperplane.errors import HyperplaneError
    from hyperplane.observe import flowlogs
    if directory:
        return flowlogs.log_path(directory, node)
    try:
        from hyperplane.node.status import read_status
        path = (read_status(node).get("flow_logs") or {}).get("path")
        if path:
            return path
    except HyperplaneError:
        pass
    return flowlogs.log_path(flowlogs.DEFAULT_DIR, node)


def flow_log_options(f):
    """The agent's flow log options (hpctl agent run), handed to f as flow_log_argv: the
    arguments of hyperplane.node.agent.main."""
    import functools

    from hyperplane.observe.flowlogs import FlowLogConfig, MAX_INTERVAL_S, MIN_INTERVAL_S
    d = FlowLogConfig()

    @functools.wraps(f)
    def wrapper(*args, flow_log_dir, flow_log_interval, flow_log_max_bytes,
                flow_log_backups, flow_log_format, no_flow_logs, **kwargs):
        argv = ["--flow-log-dir", flow_log_dir, "--flow-log-interval", str(flow_log_interval),
                "--flow-log-max-bytes", str(flow_log_max_bytes),
                "--flow-log-backups", str(flow_log_backups),
                "--flow-log-format", flow_log_format, *(["--no-flow-logs"] if no_flow_logs
                                                        else [])]
        return f(*args, flow_log_argv=argv, **kwargs)

    options = [
        click.option("--flow-log-dir", default=d.dir, show_default=True,
                     help="VPC flow logs go to DIR/<node>/flow.log (rotated: flow.log.1 ...)."),
        click.option("--flow-log-interval", type=click.IntRange(MIN_INTERVAL_S, MAX_INTERVAL_S),
                     default=d.interval_s, show_default=True,
                     help="Flow log aggregation interval, seconds."),
        click.option("--flow-log-max-bytes", type=click.IntRange(min=4096),
                     default=d.max_bytes, show_default=True,
                     help="Rotate the flow log before it grows past this."),
        click.option("--flow-log-backups", type=click.IntRange(1, 1000), default=d.backups,
                     show_default=True, help="Rotated flow log files kept."),
        click.option("--flow-log-format", type=click.Choice(["v2", "json"]),
                     default=d.format, show_default=True,
                     help="VPC Flow Logs version 2 lines, or JSON lines."),
        click.option("--no-flow-logs", is_flag=True, help="Write no flow logs."),
    ]
    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper
