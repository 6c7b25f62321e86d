"""hpctl imports a command's module only when that command runs (or --help lists them),
and the read paths do not import pyroute2 through hyperplane.netns."""
import json
import subprocess
import sys

import pytest

from hpctl import main as hpctl_main
from hpctl.exit import Exit


def _modules_after(code: str) -> set[str]:
    """The modules a fresh interpreter holds after running code."""
    script = f"import json, sys\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.splitlines()[-1]))


def test_a_command_imports_only_its_own_module():
    mods = _modules_after("from hpctl.main import main\n"
                          "try:\n    main(['counters', '--help'])\nexcept SystemExit:\n    pass")
    assert "hpctl.counters" in mods
    others = {f"hpctl.{m}" for m in hpctl_main.COMMANDS.values()} - {"hpctl.counters"}
    assert not others & mods, sorted(others & mods)
    assert "hyperplane.lab" not in mods


def test_netns_imports_pyroute2_only_when_used():
    mods = _modules_after("import hyperplane.netns")
    assert not {m for m in mods if m.split(".")[0] == "pyroute2"}


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        hpctl_main.main(["--help"])
    assert exc.value.code == Exit.OK
    out = capsys.readouterr().out
    for name in hpctl_main.COMMANDS:
        assert f"  {name} " in out, name


def test_a_broken_command_does_not_hide_the_others(monkeypatch, capsys):
    monkeypatch.setitem(hpctl_main.COMMANDS, "ghost", "no_such_module")
    monkeypatch.setattr(hpctl_main.cli, "commands", {})
    with pytest.raises(SystemExit) as exc:
        hpctl_main.main(["--help"])
    assert exc.value.code == Exit.OK
    out = capsys.readouterr().out
    assert "ghost" in out and "unavailable" in out and "counters" in out
    with pytest.raises(SystemExit) as exc:
        hpctl_main.main(["ghost"])
    assert exc.value.code == Exit.ENVIRONMENT
    assert "broken installation" in capsys.readouterr().err
