"""The hpctl click group. Each command lives in its own module, imported only when that
command runs (or when --help lists the commands): a read such as `hpctl counters` does not
pay for the imports of `hpctl lab` or `hpctl nat` (pyroute2, ...)."""
import importlib
import sys

import click

from hyperplane.errors import HyperplaneError

from .exit import Exit

EPILOG = """\b
Examples:
  hpctl lab up                      build the one-node lab with a NAT gateway
  hpctl lab status --json           names and addresses of the lab
  hpctl flows --node node1 --proto tcp
  hpctl counters --json
  hpctl top                         live dashboard of the nodes here (n, r, d, q)
  hpctl nodes; hpctl shards         the fleet's nodes and each resource's shard
  hpctl fleet status                members, sync peers, replication lag
  hpctl lab down
"""

# command name -> the module of this package that defines it as `command`
COMMANDS = {"lab": "lab", "nat": "nat", "lb": "lb", "agent": "agent", "flows": "flows",
            "flowlogs": "flowlogs",
            "counters": "counters", "top": "top", "nodes": "nodes", "shards": "shards",
            "fleet": "fleet", "node": "node"}


class BrokenCommand(Exception):
    """A command's module cannot be imported (a packaging error)."""


class LazyGroup(click.Group):
    """click's lazy-loading group pattern: commands are named up front and imported on
    first use."""

    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        module = COMMANDS.get(name)
        if module is None:
            return None
        if name not in self.commands:
            try:
                self.commands[name] = importlib.import_module(f".{module}", __package__).command
            except Exception as exc:  # ImportError, or an error while defining the command
                raise BrokenCommand(f"the command {name!r} cannot be loaded: {exc}") from exc
        return self.commands[name]

    def format_commands(self, ctx, formatter):
        """The command list of --help; a command that cannot be loaded is listed as such,
        so it never hides the others' help."""
        rows = []
        for name in self.list_commands(ctx):
            try:
                cmd = self.get_command(ctx, name)
            except BrokenCommand as exc:
                rows.append((name, f"(unavailable: {exc.__cause__})"))
                continue
            if not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(formatter.width - 6 - len(name))))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


@click.group(cls=LazyGroup, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """Drive and watch a hyperplane NAT gateway / load balancer node."""


def main(argv=None):
    try:
        cli.main(args=argv, prog_name="hpctl", standalone_mode=False)
    except BrokenCommand as exc:  # a packaging error
        click.echo(f"hpctl: broken installation: {exc}", err=True)
        sys.exit(Exit.ENVIRONMENT)
    except click.exceptions.Abort:  # Ctrl-C (click turns KeyboardInterrupt into Abort)
        click.echo("hpctl: interrupted", err=True)
        sys.exit(Exit.INTERRUPTED)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except HyperplaneError as exc:
        # Environment and config problems: one sentence, no traceback.
        click.echo(f"hpctl: {exc}", err=True)
        sys.exit(exc.exit_status)
    sys.exit(Exit.OK)
