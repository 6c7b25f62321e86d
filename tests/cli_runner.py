"""hpctl under click's CliRunner, through its main() (its error handling and exit
statuses), for the CLI tests: (exit status, stdout, stderr). Anything but SystemExit
escaping main() is what a user would see as a traceback, and fails the test."""
from __future__ import annotations

import click
from click.testing import CliRunner

from hpctl.main import main


class _Hpctl(click.Command):
    def main(self, args=None, **extra):
        main(list(args or ()))


def hpctl(*args):
    result = CliRunner().invoke(_Hpctl("hpctl"), list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        f"hpctl {' '.join(args)} raised {result.exception!r}"
    assert "Traceback" not in result.stderr
    return result.exit_code, result.stdout, result.stderr
