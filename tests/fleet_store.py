"""A private single-member etcd for the tests (the `etcd_server` fixture, one per session).

Debian's etcd-server package may run the machine's own etcd on 127.0.0.1:2379: the tests
never use it nor stop it. Theirs listens on 127.0.0.1 only, on free ports, with its data in
a temporary directory (on tmpfs when there is one: etcd syncs every write to disk), and is
killed and removed afterwards, also when a test or the start fails. Heartbeat and election
timeout are short so that etcd grants 1 s leases (its minimum is ceil(1.5 x election
timeout)). A machine without the etcd binary fails the tests that need it, saying so."""
from __future__ import annotations

import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass

import pytest

READY_S = 20.0          # etcd is up in well under a second here; this is only a bound
ETCD_FLAGS = ["--heartbeat-interval", "10", "--election-timeout", "100",
              "--logger", "zap", "--log-level", "warn"]


@dataclass
class EtcdServer:
    proc: subprocess.Popen
    port: int
    data_dir: str
    log_path: str

    @property
    def url(self) -> str:
        """The store URL (hyperplane.fleet.store.open_store)."""
        return f"etcd://127.0.0.1:{self.port}"

    @property
    def http(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, lines: int = 15) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return "(no log)"


def etcd_binary() -> str:
    path = shutil.which("etcd") or ("/usr/bin/etcd" if os.access("/usr/bin/etcd", os.X_OK)
                                    else None)
    if path is None:
        pytest.fail("the etcd binary is missing (not on PATH, not /usr/bin/etcd): install "
                    "Debian's etcd-server (scripts/setup.sh does)", pytrace=False)
    return path


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _healthy(http: str, name: str) -> bool:
    """etcd answers at http, healthy, and it is the member named `name`: the one this
    process started, not another test process's etcd that got the port first."""
    try:
        with urllib.request.urlopen(http + "/health", timeout=1) as answer:
            if json.loads(answer.read()).get("health") != "true":
                return False
        ask = urllib.request.Request(http + "/v3/cluster/member/list", data=b"{}",
                                     method="POST")
        with urllib.request.urlopen(ask, timeout=1) as answer:
            members = json.loads(answer.read()).get("members", [])
        return [m.get("name") for m in members] == [name]
    except (OSError, ValueError):
        return False


def start_etcd() -> EtcdServer:
    """Start etcd and return once it answers /health; fail with its log otherwise."""
    binary = etcd_binary()
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    for attempt in range(3):  # a free port can be taken before etcd binds it: try again
        data_dir = tempfile.mkdtemp(prefix="hpt-etcd-", dir=base)
        name = f"hpt-{os.getpid()}-{attempt}"
        client, peer = _free_ports(2)
        log_path = os.path.join(data_dir, "etcd.log")
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD_")}
        with open(log_path, "w") as log:
            proc = subprocess.Popen(
                [binary, "--name", name, "--data-dir", os.path.join(data_dir, "data"),
                 "--listen-client-urls", f"http://127.0.0.1:{client}",
                 "--advertise-client-urls", f"http://127.0.0.1:{client}",
                 "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                 "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                 "--initial-cluster", f"{name}=http://127.0.0.1:{peer}", *ETCD_FLAGS],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                start_new_session=True)
        server = EtcdServer(proc, client, data_dir, log_path)
        deadline = time.monotonic() + READY_S
        while proc.poll() is None and time.monotonic() < deadline:
            if _healthy(server.http, name):
                return server
            time.sleep(0.05)
        tail = server.log_tail()
        stop_etcd(server)
        if "address already in use" not in tail:
            break
    pytest.fail(f"the test etcd did not become ready within {READY_S:.0f} s (exit status "
                f"{proc.poll()}); its log ends:\n{tail}", pytrace=False)


def stop_etcd(server: EtcdServer) -> None:
    try:
        if server.proc.poll() is None:
            server.proc.send_signal(signal.SIGTERM)
            try:
                server.proc.wait(5)
            except subprocess.TimeoutExpired:
                server.proc.kill()
                server.proc.wait(5)
    finally:
        shutil.rmtree(server.data_dir, ignore_errors=True)


def wipe(server: EtcdServer) -> None:
    """Delete every key (the session shares one etcd; each test starts from nothing).
    Straight through the gateway, not through the code under test."""
    body = json.dumps({"key": base64.b64encode(b"\0").decode(),
                       "range_end": base64.b64encode(b"\0").decode()}).encode()
    request = urllib.request.Request(server.http + "/v3/kv/deleterange", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=5) as answer:
        answer.read()


@pytest.fixture(scope="session")
def etcd_server():
    server = start_etcd()
    try:
        yield server
    finally:
        stop_etcd(server)
