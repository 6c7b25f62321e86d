"""The hpctl click group. Each command lives in its own module and is added here."""
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
  hpctl top                         live dashboard of the node
  hpctl lab down
"""


@click.group(epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
def cli():
    """Drive and watch a hyperplane NAT gateway / load balancer node."""


def _register():
    # Imported here so a broken optional command never hides the others' help.
    from . import agent, counters, flows, lab, lb, nat, top  # noqa: F401
    for mod in (lab, nat, lb, agent, flows, counters, top):
        cli.add_command(mod.command)


def main(argv=None):
    try:
        _register()
    except ImportError as exc:  # pragma: no cover - packaging error
        click.echo(f"hpctl: broken installation: {exc}", err=True)
        sys.exit(Exit.ENVIRONMENT)
    try:
        cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort:
        sys.exit(Exit.FAILURE)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except HyperplaneError as exc:
        # Environment and config problems: one sentence, no traceback.
        click.echo(f"hpctl: {exc}", err=True)
        sys.exit(exc.exit_status)
    sys.exit(Exit.OK)
