"""Real traffic through the one-node NAT lab: client (10.10.0.0/24) -> node1 -> "internet"
(198.18.0.0/15). Runs against the XDP NAT by default; see conftest.py for HP_LAB_MODE.

Every test in mode xdp also checks that the node's kernel forwarded nothing (conftest)."""
from __future__ import annotations

import hashlib
import os
import shutil
import socket
import sys
import time

import pytest

from hyperplane import lab, netns

from lab_traffic import TcpCollector, UdpEcho, open_concurrent, ping, raise_nofile, \
    udp_exchange, wait_tcp

pytestmark = pytest.mark.lab

SERVER = lab.INET_IPS[0]       # 198.18.0.2
SERVER2 = lab.INET_IPS[1]      # 198.18.0.3
CLIENT = lab.CLIENT_IPS[0]     # 10.10.0.10


def _verdict(counters: dict[str, int], name: str) -> int:
    """A verdict counter by its enum name, whatever prefix/case read_counters uses."""
    hits = [v for k, v in counters.items() if k.upper().removeprefix("V_") == name]
    assert hits, f"no verdict {name} in {sorted(counters)}"
    return hits[0]


def _delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}


def expected_hook(cfg: lab.LabConfig) -> str:
    """Where the data path runs on the lab's veths: auto picks tc for veth."""
    return "xdp (native)" if cfg.attach == "xdp" else "tc"


def test_data_path_attached_on_every_node_interface(nat_lab):
    if nat_lab.mode != "xdp":
        pytest.skip("no data path in mode " + nat_lab.mode)
    st = lab.status(nat_lab.cfg)
    assert st["node"]["attached"] == {i: expected_hook(nat_lab.cfg) for i in lab.NODE_IFNAMES}


def test_ping_through_the_node(nat_lab):
    rtts = ping(nat_lab.client, SERVER, count=3)
    assert len(rtts) == 3, f"{3 - len(rtts)} of 3 echo requests to {SERVER} got no reply"


def test_http_download_10mb_sha256(nat_lab, tmp_path):
    if shutil.which("curl") is None:
        pytest.fail("curl is not installed (apt-get install curl)", pytrace=False)
    root = tmp_path / "www"
    root.mkdir()
    blob = os.urandom(12 * 1024 * 1024)
    (root / "blob.bin").write_bytes(blob)
    log = open(tmp_path / "http.log", "w")
    srv = netns.popen_in(nat_lab.inet, [sys.executable, "-m", "http.server", "--bind", SERVER,
                                        "--directory", str(root), "8080"],
                         stdout=log, stderr=log)
    try:
        wait_tcp(nat_lab.inet, SERVER, 8080)
        out = tmp_path / "got.bin"
        t0 = time.monotonic()
        r = netns.run_in(nat_lab.client, ["curl", "-sS", "--fail", "--max-time", "60",
                                          "-o", str(out), f"http://{SERVER}:8080/blob.bin"],
                         check=False, capture_output=True, text=True, timeout=90)
        took = time.monotonic() - t0
        assert r.returncode == 0, f"curl failed ({r.returncode}): {r.stderr}"
        assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(blob).hexdigest()
        print(f"12 MiB in {took:.2f}s ({len(blob) * 8 / took / 1e6:.0f} Mbit/s)")
    finally:
        srv.terminate()
        srv.wait(10)
        log.close()
    requests = [l for l in (tmp_path / "http.log").read_text().splitlines() if "GET /blob.bin" in l]
    assert requests and requests[-1].startswith(nat_lab.expected_src + " "), requests


def test_udp_request_response(nat_lab):
    with UdpEcho(nat_lab.inet, SERVER, 7000) as srv:
        c = netns.socket_in(nat_lab.client, socket.AF_INET, socket.SOCK_DGRAM)
        try:
            c.bind((CLIENT, 0))
            assert udp_exchange(c, (SERVER, 7000), 100) == 100
        finally:
            c.close()
    assert len(srv.peers) == 100
    assert {p[0] for p in srv.peers} == {nat_lab.expected_src}
    assert len(set(srv.peers)) == 1, "one client socket must keep one mapping"


def test_udp_counters_add_up(nat_lab):
    """Every packet of a UDP exchange went through XDP, with the right verdicts, and the
    counters add up to the packets sent (invariant 2)."""
    if nat_lab.mode != "xdp":
        pytest.skip("XDP counters exist only in mode xdp")
    n = 200
    with UdpEcho(nat_lab.inet, SERVER, 7001) as srv:
        c = netns.socket_in(nat_lab.client, socket.AF_INET, socket.SOCK_DGRAM)
        try:
            c.bind((CLIENT, 0))
            before = nat_lab.counters()
            answered = udp_exchange(c, (SERVER, 7001), n)
            after = nat_lab.counters()
        finally:
            c.close()
    assert answered == n and len(srv.peers) == n
    d = _delta(before, after)
    assert _verdict(after, "TX_NAT_OUT") - _verdict(before, "TX_NAT_OUT") == n, d
    assert _verdict(after, "TX_NAT_IN") - _verdict(before, "TX_NAT_IN") == n, d
    assert sum(d.values()) == 2 * n, f"verdicts do not add up to the {2 * n} packets sent: {d}"


def test_2000_concurrent_tcp_connections(nat_lab):
    n = 2000
    raise_nofile(4 * n + 256)
    with TcpCollector(nat_lab.inet, SERVER, 9000) as srv:
        t0 = time.monotonic()
        socks, connected = open_concurrent(nat_lab.client, (SERVER, 9000), n, timeout=30)
        try:
            seen = srv.wait_for(n, timeout=max(1.0, 30 - (time.monotonic() - t0)))
            took = time.monotonic() - t0
            assert connected == n, f"only {connected} of {n} connects completed"
            assert seen == n, f"the server saw {seen} of {n} connections"
            peers = list(srv.peers)
        finally:
            for s in socks:
                s.close()
    assert {ip for ip, _ in peers} == {nat_lab.expected_src}
    ports = [port for _, port in peers]
    assert len(set(ports)) == n, f"{n - len(set(ports))} source ports were reused"
    print(f"{n} concurrent connections in {took:.2f}s; source ports {min(ports)}..{max(ports)}")


def test_endpoint_dependent_mapping_and_filtering(nat_lab):
    """RFC 4787 as AWS NAT gateway does it: the mapping is per destination, so a host the
    client never talked to (198.18.0.3), or that host from another port, cannot reach the
    client through the mapping made toward 198.18.0.2."""
    if not nat_lab.translated:
        pytest.skip("no NAT in mode kernel")
    with UdpEcho(nat_lab.inet, SERVER, 7002) as s1, UdpEcho(nat_lab.inet, SERVER2, 7002) as s2:
        c = netns.socket_in(nat_lab.client, socket.AF_INET, socket.SOCK_DGRAM)
        try:
            c.bind((CLIENT, 0))
            assert udp_exchange(c, (SERVER, 7002), 1) == 1
            assert udp_exchange(c, (SERVER2, 7002), 1) == 1
            (ip1, p1), = s1.peers
            (ip2, p2), = s2.peers
            assert ip1 == ip2 == lab.NAT_IP

            def delivered(sock, dst, payload):
                sock.sendto(payload, dst)
                c.settimeout(0.5)
                try:
                    while True:
                        data, frm = c.recvfrom(2048)
                        if data == payload:
                            return frm
                except socket.timeout:
                    return None

            # Positive controls: each destination reaches the client on its own mapping.
            assert delivered(s1.sock, (lab.NAT_IP, p1), b"from-2-own") == (SERVER, 7002)
            assert delivered(s2.sock, (lab.NAT_IP, p2), b"from-3-own") == (SERVER2, 7002)
            # A stranger: 198.18.0.3 from another port, to the mapping made toward .2.
            stranger = netns.socket_in(nat_lab.inet, socket.AF_INET, socket.SOCK_DGRAM)
            try:
                stranger.bind((SERVER2, 7003))
                assert delivered(stranger, (lab.NAT_IP, p1), b"stranger") is None
                # And to a NAT port nobody mapped.
                free = next(p for p in range(40000, 40100) if p not in (p1, p2))
                assert delivered(stranger, (lab.NAT_IP, free), b"unmapped") is None
            finally:
                stranger.close()
            if p1 != p2:
                # .3 from its own port, to the port of .2's mapping: also filtered.
                assert delivered(s2.sock, (lab.NAT_IP, p1), b"cross") is None
            print(f"mapping toward {SERVER}: {lab.NAT_IP}:{p1}; toward {SERVER2}: "
                  f"{lab.NAT_IP}:{p2}")
        finally:
            c.close()
