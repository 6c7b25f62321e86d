"""What every hpctl command promises (issue 8 sections 4 and 5), checked over the whole click
group so a new command is held to it too:

- `--help` exits 0 and prints its usage;
- every read command's --json prints JSON, or, with nothing running (an empty state
  directory and store), exits NOT_FOUND with one sentence;
- user mistakes (unknown commands and flags, bad values, unknown nodes) exit with the
  documented status (cli/exit.py), one sentence on stderr, no traceback;
- shell completion scripts for bash, zsh and fish are produced, and complete commands.

The same read commands against a running lab: tests/lab/test_operator_cli.py."""
import json
import os
import subprocess
import sys

import click
import pytest

from cli_runner import hpctl
from hpctl.exit import Exit
from hpctl.main import cli
from hyperplane import errors
from hyperplane.node import lifecycle

# Commands with --json that only read. Each --json command must be in exactly one set:
# a new one fails test_every_json_command_is_classified until it is put in one.
READ_COMMANDS = {("counters",), ("fleet", "status"), ("flowlogs",), ("flows",), ("lab", "status"),
                 ("lb", "health"), ("lb", "show"), ("nat", "list"), ("nat", "show"), ("nodes",),
                 ("shards",), ("top",)}
CHANGING_COMMANDS = {("lab", "down"), ("lab", "up"), ("lab", "kill-node"),
                     ("lab", "restore-node"), ("nodes", "remove"), ("shards", "rebalance"),
                     ("nat", "gc")}
# Arguments a read command needs to read anything fast and definite (top: one frame)
READ_ARGS = {("top",): ["--interval", "0.1"], ("lab", "status"): ["--prefix", "hpcontract"]}


def command_paths(cmd=cli, path=()):
    """(path, command) of every command and subcommand of the group."""
    yield path, cmd
    if isinstance(cmd, click.Group):
        ctx = click.Context(cmd)
        for name in cmd.list_commands(ctx):
            yield from command_paths(cmd.get_command(ctx, name), path + (name,))


ALL = sorted(command_paths(), key=lambda pc: pc[0])
JSON_COMMANDS = {p for p, c in ALL if any(getattr(o, "name", None) == "as_json" for o in c.params)}


@pytest.fixture(autouse=True)
def nothing_here(tmp_path, monkeypatch):
    """No node, lab or store of this host is seen: empty state directories, a store file
    of the test's own."""
    monkeypatch.setattr(lifecycle, "NODE_STATE_DIR", str(tmp_path / "nodes"))
    monkeypatch.setenv("HPCTL_STORE", str(tmp_path / "store.json"))
    monkeypatch.delenv("HPCTL_NODE", raising=False)
    import hyperplane.lab.plan as plan
    monkeypatch.setattr(plan, "STATE_DIR", str(tmp_path / "lab"), raising=False)


def test_the_walk_finds_every_command():
    names = {p for p, _ in ALL}
    assert ("top",) in names and ("fleet", "status") in names and ("lb", "tg", "create") in names
    assert len(names) > 30


@pytest.mark.parametrize("path", [p for p, _ in ALL], ids=lambda p: " ".join(p) or "hpctl")
def test_help_exits_0(path):
    code, out, err = hpctl(*path, "--help")
    assert code == Exit.OK, err
    assert out.startswith(f"Usage: hpctl {' '.join(path)}".rstrip()), out[:200]


def test_every_json_command_is_classified():
    assert JSON_COMMANDS == READ_COMMANDS | CHANGING_COMMANDS, (
        f"unclassified: {sorted(JSON_COMMANDS - READ_COMMANDS - CHANGING_COMMANDS)}, "
        f"gone: {sorted((READ_COMMANDS | CHANGING_COMMANDS) - JSON_COMMANDS)}")
    assert not READ_COMMANDS & CHANGING_COMMANDS


@pytest.mark.parametrize("path", sorted(READ_COMMANDS), ids=" ".join)
def test_read_json_parses_or_is_not_found(path):
    code, out, err = hpctl(*path, "--json", *READ_ARGS.get(path, []))
    if code == Exit.OK:
        json.loads(out)
    else:
        assert code == Exit.NOT_FOUND, (code, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("hpctl: "), err
        assert out.strip() == "" or json.loads(out) is not None


def test_read_json_in_an_empty_store_is_json():
    """The store commands answer an empty store with empty JSON, not an error."""
    for path in [("nodes",), ("shards",), ("lb", "show")]:
        code, out, err = hpctl(*path, "--json")
        assert code == Exit.OK, (path, err)
        assert json.loads(out) is not None


# (arguments, the status they must exit with)
MISTAKES = [
    (["nosuchcommand"], Exit.USAGE),
    (["flows", "--port", "http"], Exit.USAGE),
    (["flows", "--kind", "sideways"], Exit.USAGE),
    (["flows", "--no-such-flag"], Exit.USAGE),
    (["top", "--interval", "0"], Exit.USAGE),
    (["top", "--view", "everything"], Exit.USAGE),
    (["counters", "--node", "bad name!"], Exit.USAGE),
    (["lab", "status", "--prefix", "UPPER"], Exit.USAGE),
    (["lab", "up", "--nodes", "many"], Exit.USAGE),
    (["lb", "create"], Exit.USAGE),
    (["lb", "register", "--tg", "web", "10.0.0.1:99999"], Exit.USAGE),
    (["shards", "set-bound", "lots"], Exit.USAGE),
    (["fleet", "status", "--store", "ftp://somewhere"], Exit.FAILURE),  # says the store is bad
    (["lb", "show", "--store", "ftp://somewhere"], Exit.USAGE),
    (["counters", "--node", "ghost"], Exit.NOT_FOUND),
    (["flows", "--node", "ghost"], Exit.NOT_FOUND),
    (["top", "--node", "ghost"], Exit.NOT_FOUND),
    (["top"], Exit.NOT_FOUND),                                    # no node runs here
    (["nat", "show", "--node", "ghost"], Exit.NOT_FOUND),
    (["nat", "gc", "--node", "ghost"], Exit.NOT_FOUND),
    (["lb", "health", "--node", "ghost"], Exit.NOT_FOUND),
    (["nodes", "remove", "ghost"], Exit.NOT_FOUND),
    (["lab", "status", "--prefix", "hpcontract"], Exit.NOT_FOUND),
]


@pytest.mark.parametrize("argv,status", MISTAKES, ids=lambda a: " ".join(a) if isinstance(a, list)
                         else None)
def test_a_mistake_exits_with_its_status_and_one_sentence(argv, status):
    code, out, err = hpctl(*argv)
    assert code == status, (code, err)
    lines = [line for line in err.strip().splitlines() if line.strip()]
    if lines[0].startswith("Usage: "):   # click's own: usage, a hint, the error
        assert lines[-1].startswith("Error: ") and len(lines) <= 3, err
    else:
        assert lines[0].startswith("hpctl: "), err
        assert len(lines) <= 2, err      # fleet status: the store line (and nothing else)


def test_error_classes_carry_the_documented_statuses():
    assert errors.HyperplaneError.exit_status == Exit.FAILURE
    assert errors.ConfigError.exit_status == Exit.USAGE
    assert errors.StoreError.exit_status == Exit.USAGE
    assert errors.EnvironmentProblem.exit_status == Exit.ENVIRONMENT
    assert errors.NotFound.exit_status == Exit.NOT_FOUND
    doc = sys.modules["hpctl.exit"].__doc__
    for status in Exit:
        assert f"| {int(status)} " in doc and status.name in doc, status


def test_ctrl_c_exits_130(monkeypatch):
    import hpctl.counters as counters

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt
    monkeypatch.setattr(counters.command, "callback", interrupted)
    code, _, err = hpctl("counters")
    assert code == Exit.INTERRUPTED and err.strip() == "hpctl: interrupted"


# --- the real entry point ---------------------------------------------------------------

def hpctl_binary() -> str:
    path = os.path.join(os.path.dirname(sys.executable), "hpctl")
    assert os.path.exists(path), f"{path} is missing: install the package (scripts/setup.sh)"
    return path


def test_the_installed_command_prints_one_sentence_without_traceback(tmp_path):
    env = {**os.environ, "HPCTL_STORE": str(tmp_path / "store.json")}
    proc = subprocess.run([hpctl_binary(), "counters", "--node", "bad name!"], env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == Exit.USAGE
    assert proc.stderr.startswith("hpctl: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("shell,marker", [
    ("bash", "complete -o nosort -F _hpctl_completion hpctl"),
    ("zsh", "#compdef hpctl"),
    ("fish", "complete --no-files --command hpctl"),
])
def test_completion_script_for_each_shell(shell, marker):
    """The scripts README's "Shell completion" installs."""
    proc = subprocess.run([hpctl_binary()], env={**os.environ, "_HPCTL_COMPLETE": f"{shell}_source"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert marker in proc.stdout, proc.stdout


def test_completion_completes_commands_and_choices():
    def complete(words: str) -> list[str]:
        env = {**os.environ, "_HPCTL_COMPLETE": "bash_complete", "COMP_WORDS": words,
               "COMP_CWORD": str(len(words.split()) - (0 if words.endswith(" ") else 1))}
        proc = subprocess.run([hpctl_binary()], env=env, capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, proc.stderr
        return [line.split(",", 1)[1] for line in proc.stdout.splitlines()]
    assert {"flows", "fleet", "flowlogs"} <= set(complete("hpctl fl"))
    assert set(complete("hpctl top --view ")) == {"nodes", "resources", "drops"}
    assert "status" in complete("hpctl fleet ")
