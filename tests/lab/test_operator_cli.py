"""hpctl for operators against a running one-node lab (its NLB, agent and target servers up):

- `hpctl top` in a detached tmux session of 80x24 while bounded traffic crosses the node:
  two capture-pane reads show live, changing numbers; the view keys switch views; q quits
  the process and the terminal's mode is what it was;
- Ctrl-C exits 130 with the terminal restored; with stdin not the terminal the keys come
  from /dev/tty;
- `hpctl top` with stdout not a terminal prints one plain snapshot and exits;
- every read command's --json parses (tests/unit/test_cli_contract.py's READ_COMMANDS), and
  none of them constructs bcc's BPF (nothing is compiled: the pinned maps are read).

No timed assertions: waits are bounded polls. The tmux server runs on a socket of its own
and is killed whatever happens; all traffic stays inside the lab's namespaces."""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest

from hyperplane import lab, netns

from lab_harness import ATTACH, build_nlb_lab, lab_prefix

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "unit"))
from test_cli_contract import READ_COMMANDS  # noqa: E402

pytestmark = pytest.mark.lab

HPCTL = os.path.join(os.path.dirname(sys.executable), "hpctl")
TRAFFIC_S = 60.0            # at most this long ...
TRAFFIC_DATAGRAMS = 400_000  # ... and at most this many datagrams


@pytest.fixture(scope="module")
def op_lab(request):
    return build_nlb_lab(request, lab.LabConfig(prefix=lab_prefix("o"), mode="xdp",
                                                attach=ATTACH, nlb=True))


@pytest.fixture()
def env(op_lab):
    return {**os.environ, "HPCTL_STORE": lab.store_path(op_lab.cfg.prefix),
            "HPCTL_NODE": lab.node_name(op_lab.cfg)}


class Traffic:
    """UDP from the lab's client to an internet host through the NAT, at a rate that
    changes every second, until stopped (bounded in time and count)."""

    def __init__(self, the_lab):
        self.ns = the_lab.client
        self.stop = threading.Event()
        self.sent = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        socks = [netns.socket_in(self.ns, socket.AF_INET, socket.SOCK_DGRAM) for _ in range(32)]
        try:
            deadline = time.monotonic() + TRAFFIC_S
            while not self.stop.is_set() and time.monotonic() < deadline \
                    and self.sent < TRAFFIC_DATAGRAMS:
                burst = 20 + 40 * (int(time.monotonic()) % 4)
                for i in range(burst):
                    socks[i % len(socks)].sendto(b"top", (lab.INET_IPS[0], 9000 + i % 8))
                self.sent += burst
                time.sleep(0.02)
        finally:
            for s in socks:
                s.close()

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(TRAFFIC_S + 5)


class Tmux:
    """A tmux server of its own (-L), killed on exit with every session in it."""

    def __init__(self, name: str):
        if shutil.which("tmux") is None:
            pytest.fail("tmux is missing: install it (scripts/setup.sh installs the tmux package)",
                        pytrace=False)
        self.socket = name

    def run(self, *args, check=True) -> str:
        proc = subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True,
                              text=True, timeout=30)
        if check and proc.returncode != 0:
            raise AssertionError(f"tmux {' '.join(args)}: {proc.stderr}")
        return proc.stdout

    def capture(self) -> list[str]:
        return self.run("capture-pane", "-p", "-t", "top").rstrip("\n").split("\n")

    def wait_for(self, predicate, what: str, timeout: float = 60.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.capture()
            if predicate(screen):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not seen within {timeout:.0f} s; the screen:\n"
                                     + "\n".join(screen))
            time.sleep(0.2)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.run("kill-server", check=False)


def node_row(screen: list[str], node: str) -> list[str] | None:
    for line in screen:
        cells = line.split()
        if cells[:1] == [node]:
            return cells
    return None


def test_top_in_tmux_shows_live_numbers_switches_views_and_quits(op_lab, env, tmp_path):
    node = lab.node_name(op_lab.cfg)
    before, after, status = (tmp_path / n for n in ("stty.before", "stty.after", "status"))
    script = (f"stty -g > {before}; {HPCTL} top --interval 0.5; echo $? > {status}; "
              f"stty -g > {after}; sleep 120")
    environ = " ".join(f"{k}={v}" for k, v in env.items() if k.startswith("HPCTL_"))
    with Tmux(f"hpt-top-{os.getpid()}") as tmux, Traffic(op_lab) as traffic:
        tmux.run("new-session", "-d", "-s", "top", "-x", "80", "-y", "24",
                 f"env {environ} bash -c '{script}'")
        first = tmux.wait_for(lambda s: (node_row(s, node) or ["", "", "", "0"])[3] != "0",
                              "a node row with packets/s above 0")
        assert first[0].startswith("hpctl top: 1 node") and len(first) == 24
        assert all(len(line) <= 80 for line in first)
        time.sleep(3)
        second = tmux.capture()
        assert node_row(second, node) is not None, "\n".join(second)
        # live: the row moved on (its rates and its sparkline), the clock too
        assert node_row(second, node) != node_row(first, node), (first, second)
        assert second[-1] != first[-1]
        tmux.run("send-keys", "-t", "top", "d")
        tmux.wait_for(lambda s: any(line.startswith("drops by reason") for line in s),
                      "the drops view")
        tmux.run("send-keys", "-t", "top", "r")
        tmux.wait_for(lambda s: any(line.startswith("resources (") for line in s),
                      "the resources view")
        tmux.run("send-keys", "-t", "top", "q")
        deadline = time.monotonic() + 30
        while not after.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert status.exists(), "hpctl top did not exit on q:\n" + "\n".join(tmux.capture())
        assert status.read_text().strip() == "0"
        assert before.read_text() == after.read_text(), "the terminal's mode was not restored"
        assert traffic.sent > 0


def test_top_in_tmux_ctrl_c_exits_130_and_restores_the_terminal(op_lab, env, tmp_path):
    node = lab.node_name(op_lab.cfg)
    before, after, status = (tmp_path / n for n in ("stty.before", "stty.after", "status"))
    script = (f"stty -g > {before}; {HPCTL} top --interval 0.5 < /dev/null; "
              f"echo $? > {status}; stty -g > {after}; sleep 120")
    environ = " ".join(f"{k}={v}" for k, v in env.items() if k.startswith("HPCTL_"))
    with Tmux(f"hpt-top-{os.getpid()}") as tmux:
        tmux.run("new-session", "-d", "-s", "top", "-x", "80", "-y", "24",
                 f"env {environ} bash -c '{script}'")
        tmux.wait_for(lambda s: node_row(s, node) is not None, "the node's row")
        # stdin is /dev/null: the keys come from /dev/tty
        tmux.run("send-keys", "-t", "top", "d")
        tmux.wait_for(lambda s: any(line.startswith("drops by reason") for line in s),
                      "the drops view (keys read from /dev/tty)")
        # bash, not sh: dash exits on the SIGINT its foreground child got even when the
        # child handled it and exited 130; bash goes on and records the status
        tmux.run("send-keys", "-t", "top", "C-c")
        deadline = time.monotonic() + 30
        while not after.exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert status.exists(), "hpctl top did not exit on Ctrl-C"
        assert status.read_text().strip() == "130"
        assert before.read_text() == after.read_text(), "the terminal's mode was not restored"
        assert "hpctl: interrupted" in "\n".join(tmux.capture())


def test_top_prints_one_plain_snapshot_when_stdout_is_not_a_terminal(op_lab, env):
    node = lab.node_name(op_lab.cfg)
    proc = subprocess.run([HPCTL, "top", "--interval", "0.2"], env=env, capture_output=True,
                          text=True, timeout=120, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("hpctl top: 1 node") and "\x1b" not in proc.stdout
    assert node_row(lines, node) is not None and lines[-1].startswith("n:nodes*")


NO_COMPILE = """
import sys
import bcc

class NoCompile:
    def __init__(self, *args, **kwargs):
        sys.stderr.write("COMPILED: bcc.BPF was constructed\\n")
        sys.exit(99)

bcc.BPF = NoCompile
from hpctl.main import main
main(sys.argv[1:])
"""

READ_ARGS = {("top",): ["--interval", "0.2"], ("flowlogs",): []}


@pytest.mark.parametrize("path", sorted(READ_COMMANDS), ids=" ".join)
def test_read_command_json_parses_without_compiling(op_lab, env, path):
    args = list(READ_ARGS.get(path, []))
    if path == ("lab", "status"):
        args += ["--prefix", op_lab.cfg.prefix]
    proc = subprocess.run([sys.executable, "-c", NO_COMPILE, *path, "--json", *args], env=env,
                          capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)
    assert "COMPILED" not in proc.stderr and proc.returncode != 99
    assert "Traceback" not in proc.stderr, proc.stderr
    if path == ("flowlogs",) and proc.returncode == 4:
        # the lab's agent runs without flow logs: a clear not-found, one sentence
        assert proc.stderr.startswith("hpctl: ") and proc.stderr.count("\n") == 1, proc.stderr
        return
    data = json.loads(proc.stdout)
    assert data is not None
    if path == ("fleet", "status"):
        # exits 1 while any agent on this host is not running (other labs' nodes may be
        # here); the lab's own must be
        local = data["local"]
        assert local[lab.node_name(op_lab.cfg)]["agent"] == "running", local
        others_down = any(v["agent"] != "running" for v in local.values())
        assert proc.returncode == (1 if others_down else 0), proc.stderr
        return
    assert proc.returncode == 0, proc.stderr
    if path == ("top",):
        assert [n["name"] for n in data["nodes"]] == [lab.node_name(op_lab.cfg)]
