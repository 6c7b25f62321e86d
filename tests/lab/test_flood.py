"""A spoofed SYN flood at the VIP (issue 6 section 4): for 60 s hping3 sends SYNs from
random sources at the lab's highest rate while NAT clients and established NLB
connections keep working (0 failures) and new legitimate connections to the flooded VIP
go on succeeding (the share is reported).

Why it holds: a new flow starts unconfirmed in an LRU table; only its originator's packet
after a reply (the ACK that ends a handshake, which a spoofer never sees the SYN-ACK
for) confirms it into the flow table, which never evicts. The flood churns the LRU only.

This module builds its own lab: the NLB accounting of test_nlb_lab (every packet from the
internet host translated) does not hold for spoofed sources that the node's reverse-path
check drops."""
from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest

from hyperplane import lab, netns

from lab_harness import build_nlb_lab, lab_prefix
from lab_traffic import StreamDownload, http_get_many

pytestmark = pytest.mark.lab

FLOOD_S = 60
VIP = (lab.VIP, lab.HTTP_PORT)
SOURCES = list(lab.INET_IPS)
CLIENT = lab.CLIENT_IPS[0]
SERVER = lab.INET_IPS[0]
STREAM_PORT = 8090


@pytest.fixture(scope="module")
def flood_lab(request):
    if shutil.which("hping3") is None:
        pytest.fail("hping3 is not installed (apt-get install hping3; scripts/setup.sh does)",
                    pytrace=False)
    the_lab = build_nlb_lab(request, lab.LabConfig(prefix=lab_prefix("d"), mode="xdp",
                                                   nlb=True))
    proc = netns.popen_in(the_lab.inet, lab.target_server_argv(
        "inet", SERVER, http_ports=[STREAM_PORT], udp_port=None, seconds=600),
        stdout=subprocess.PIPE, text=True)
    request.addfinalizer(lambda: (proc.terminate(), proc.wait(10)))
    assert proc.stdout.readline().strip() == "ready", "the stream server did not start"
    return the_lab


class KeepAlive:
    """An HTTP/1.1 keep-alive connection to the VIP; get() asks once more on it."""

    def __init__(self, ns: str, src: str):
        self.sock = netns.socket_in(ns)
        self.sock.bind((src, 0))
        self.sock.settimeout(5)
        self.sock.connect(VIP)

    def get(self) -> bool:
        try:
            self.sock.sendall(b"GET / HTTP/1.1\r\nHost: vip\r\n\r\n")
            buf = b""
            while b"\r\n\r\n" not in buf:
                data = self.sock.recv(4096)
                if not data:
                    return False
                buf += data
            head, _, body = buf.partition(b"\r\n\r\n")
            length = next(int(l.split(b":")[1]) for l in head.split(b"\r\n")
                          if l.lower().startswith(b"content-length:"))
            while len(body) < length:
                data = self.sock.recv(4096)
                if not data:
                    return False
                body += data
            return head.startswith(b"HTTP/1.1 200")
        except (OSError, StopIteration, ValueError):
            return False

    def close(self) -> None:
        self.sock.close()


def _flood(the_lab) -> subprocess.Popen:
    """hping3's SYN flood from random sources at the VIP, ended by timeout(1)."""
    return subprocess.Popen(["ip", "netns", "exec", the_lab.inet, "timeout", str(FLOOD_S),
                             "hping3", "-q", "-S", "-p", str(lab.HTTP_PORT), "--flood",
                             "--rand-source", lab.VIP],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_spoofed_syn_flood_at_the_vip(flood_lab):
    from hyperplane.node import lifecycle as node
    from hyperplane.observe.metrics import stat_counts, verdict_counts
    dp = node.open_node(lab.node_name(flood_lab.cfg))
    conns = [KeepAlive(flood_lab.inet, SOURCES[i % 2]) for i in range(16)]
    download = None
    flood = None
    try:
        assert all(c.get() for c in conns), "the established connections do not work"
        v0, s0 = verdict_counts(dp), stat_counts(dp)
        # a NAT client's download that lasts the whole flood (1 MB/s for ~65 s)
        download = StreamDownload(flood_lab.client, (SERVER, STREAM_PORT), 65 << 20,
                                  1 << 20, 11, src=CLIENT, timeout=FLOOD_S + 40).start()
        flood = _flood(flood_lab)
        established_failed = nat_failed = rounds = 0
        new_ok = new_tried = 0
        t_end = time.monotonic() + FLOOD_S
        while time.monotonic() < t_end and flood.poll() is None:
            rounds += 1
            established_failed += sum(not c.get() for c in conns)
            nat = http_get_many(flood_lab.client, (SERVER, STREAM_PORT), 2,
                                sources=[CLIENT], concurrency=2, timeout=10)
            nat_failed += sum(not r.ok for r in nat)
            res = http_get_many(flood_lab.inet, VIP, 10, sources=SOURCES, concurrency=5,
                                timeout=10)
            new_tried += len(res)
            new_ok += sum(r.ok for r in res)
            time.sleep(0.5)
        flood.wait(FLOOD_S + 10)
        v1, s1 = verdict_counts(dp), stat_counts(dp)
        assert download.wait(60), "the NAT download did not end"
    finally:
        if flood is not None and flood.poll() is None:
            flood.kill()
        for c in conns:
            c.close()
        dp.close()
    flooded = v1["TX_NLB_IN"] - v0["TX_NLB_IN"]
    share = new_ok / new_tried if new_tried else 0.0
    print(f"{FLOOD_S} s of SYN flood: {flooded} packets to the VIP translated "
          f"({flooded / FLOOD_S:.0f}/s), dropped by the reverse-path check "
          f"{v1['DROP_WRONG_IFACE'] - v0['DROP_WRONG_IFACE']}; {rounds} rounds; new "
          f"legitimate connections to the VIP: {new_ok} of {new_tried} ({share:.1%}); flows "
          f"confirmed {s1['FLOW_CONFIRMED'] - s0['FLOW_CONFIRMED']}, refused at "
          f"confirmation {s1['CONFIRM_FULL'] - s0['CONFIRM_FULL']}")
    assert flooded > 100 * FLOOD_S, f"hardly a flood: {flooded} packets in {FLOOD_S} s"
    assert established_failed == 0, f"{established_failed} requests on established NLB " \
                                     f"connections failed"
    assert nat_failed == 0, f"{nat_failed} NAT connections failed"
    assert download.error is None and download.received == 65 << 20, download.error
    assert download.sha.hexdigest() == lab.stream_sha256(11, 65 << 20)
    # no spoofed flow was confirmed: only the legitimate connections were
    assert s1["CONFIRM_FULL"] == s0["CONFIRM_FULL"]
    assert s1["FLOW_CONFIRMED"] - s0["FLOW_CONFIRMED"] <= new_tried + 2 * rounds + 2
    assert share >= 0.95, f"only {share:.1%} of new legitimate connections succeeded"
