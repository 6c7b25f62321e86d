"""hpctl top: the fleet live (per node and per resource packets/s, bits/s, active and new
flows, drops by reason, replication lag, NAT ports per destination, target health, the last
minute as sparklines). Keys: n nodes, r resources, d drops, q quits. When stdout is not a
terminal it prints one snapshot and exits."""
from __future__ import annotations

import os
import sys
import time

import click

from .options import complete_node, emit_json, json_option

# hyperplane.fleet.store.DEFAULT_STORE, written out so that --help imports no store code
DEFAULT_STORE = "/run/hyperplane/store/nlb.json"
VIEW_KEYS = {"n": "nodes", "r": "resources", "d": "drops"}


class Keys:
    """Single keys from the terminal without waiting for Enter (cbreak mode, so Ctrl-C still
    interrupts), read with a timeout so the screen keeps refreshing; the terminal's mode is
    put back on exit whatever happens. The terminal is stdin, else /dev/tty (as less reads
    it when stdin is a pipe); without one no key ever comes."""

    def __init__(self, stream=None):
        self.stream = stream or sys.stdin
        self.fd = None
        self.saved = None
        self.opened = None     # /dev/tty, when we opened it

    def _terminal_fd(self) -> int | None:
        try:
            fd = self.stream.fileno()
            if os.isatty(fd):
                return fd
        except (AttributeError, OSError, ValueError):
            pass
        try:
            self.opened = os.open("/dev/tty", os.O_RDONLY | os.O_NOCTTY)
        except OSError:
            return None
        return self.opened

    def __enter__(self):
        import termios
        import tty
        fd = self._terminal_fd()
        if fd is not None:
            self.fd, self.saved = fd, termios.tcgetattr(fd)
            tty.setcbreak(fd)
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            import termios
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)
            self.saved = None
        if self.opened is not None:
            os.close(self.opened)
            self.opened = None

    def get(self, timeout: float) -> str | None:
        """The next key pressed within timeout seconds, or None."""
        import select
        if self.fd is None:
            time.sleep(max(0.0, timeout))
            return None
        ready, _, _ = select.select([self.fd], [], [], max(0.0, timeout))
        if not ready:
            return None
        data = os.read(self.fd, 64)
        return data[:1].decode("latin-1").lower() if data else "q"   # EOF: the tty is gone


def run_live(collector, view: str, interval: float) -> None:
    """Redraw every interval until q (Ctrl-C raises through, the screen and the terminal's
    mode restored on the way); a view key redraws at once."""
    from rich.console import Console
    from rich.live import Live

    from hyperplane.observe.dashboard import render
    console = Console()
    snap = collector.sample()
    with Keys() as keys, Live(console=console, screen=True, auto_refresh=False) as live:
        next_sample = time.monotonic() + interval
        while True:
            live.update(render(snap, view, console.width, console.height), refresh=True)
            key = keys.get(next_sample - time.monotonic())
            if key == "q":
                return
            if key in VIEW_KEYS:
                view = VIEW_KEYS[key]
            if time.monotonic() >= next_sample:
                snap = collector.sample()
                next_sample = max(next_sample + interval, time.monotonic())


@click.command("top", epilog="\b\nExamples:\n"
                             "  hpctl top                       the fleet's nodes here, live\n"
                             "  hpctl top --view resources --interval 0.5\n"
                             "  hpctl top --node node1          one node\n"
                             "  hpctl top --once                one snapshot as text\n"
                             "  hpctl top --json                one snapshot as JSON\n"
                             "\b\nKeys: n nodes, r resources, d drops, q quit.")
@click.option("--node", "nodes", multiple=True, metavar="NAME", shell_complete=complete_node,
              envvar="HPCTL_NODE",
              help="Only this node (repeatable; HPCTL_NODE; default: every node running "
                   "here).")
@click.option("--store", "store_url", default=None, envvar="HPCTL_STORE",
              help="The cluster store, for members on other hosts and load balancer names "
                   f"(default: HPCTL_STORE, else {DEFAULT_STORE} if it exists).")
@click.option("--view", type=click.Choice(sorted(VIEW_KEYS.values())), default="nodes",
              show_default=True, help="What to show first.")
@click.option("--interval", type=click.FloatRange(0.1, 60), default=1.0, show_default=True,
              help="Seconds between two frames (and the rates' interval).")
@click.option("--once", is_flag=True, help="Print one snapshot (rates over one interval) and "
                                           "exit; also what happens when stdout is not a "
                                           "terminal.")
@click.option("--width", type=click.IntRange(40, 1000), default=None,
              help="Columns of the printed snapshot (default: the terminal's, else 120).")
@json_option
def command(nodes, store_url, view, interval, once, width, as_json):
    """Watch the fleet live: per node and per resource packets/s, bits/s, active and new
    flows, drops by reason, replication lag, NAT ports in use per destination, target
    health, with the last minute as sparklines. Reads the pinned maps and agents' status of
    the nodes on this host (nothing is compiled) and, when given, the store's members."""
    from hyperplane.errors import NotFound
    from hyperplane.node.lifecycle import check_node_name, node_state, running_nodes
    from hyperplane.observe.collect import FleetCollector, take_pair
    if nodes:
        for n in nodes:
            node_state(check_node_name(n))   # NotFound (exit 4) for a node not running here
    elif not running_nodes():
        raise NotFound("no node is running here; start one with hpctl lab up or hpctl nat up")
    if store_url is None and os.path.exists(DEFAULT_STORE):
        store_url = DEFAULT_STORE
    collector = FleetCollector(list(nodes) or None, store_url, step_s=interval)
    if as_json or once or not sys.stdout.isatty():
        snap = take_pair(collector, interval)
        if as_json:
            emit_json(snap.to_dict())
            return
        from hyperplane.observe.dashboard import render_plain
        if width is None:
            width = os.get_terminal_size().columns if sys.stdout.isatty() else 120
        click.echo(render_plain(snap, view, width), nl=False)
        return
    run_live(collector, view, interval)   # Ctrl-C: the screen and tty restored, exit 130
