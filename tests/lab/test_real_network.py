"""The NAT lab as a real network differs from a greenhouse (issue 6 section 1): default
offloads (GSO/GRO superpackets with partial checksums), neighbours resolved by ARP and
flushed mid-traffic, a smaller MTU on the way, TTLs running out, the node answering for
its NAT IP. Real clients and servers; every packet through the data path (conftest's
accounting: the node's kernel forwards nothing it was not handed translated)."""
from __future__ import annotations

import socket
import struct
import subprocess
import threading
import time

import pytest

from hyperplane import lab, netns

from lab_traffic import StreamDownload, UdpEcho, ping

pytestmark = pytest.mark.lab

SERVER = lab.INET_IPS[0]       # 198.18.0.2
CLIENT = lab.CLIENT_IPS[0]     # 10.10.0.10
STREAM_PORT = 8090


@pytest.fixture(scope="module")
def stream_server(nat_lab):
    """The lab's stream server (python -m hyperplane.lab serve) on the internet host."""
    if nat_lab.mode != "xdp":
        pytest.fail("these tests are about the hyperplane data path: run them in mode xdp",
                    pytrace=False)
    proc = netns.popen_in(nat_lab.inet, lab.target_server_argv(
        "inet", SERVER, http_ports=[STREAM_PORT], udp_port=None, seconds=600),
        stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready", "the stream server did not start"
        yield (SERVER, STREAM_PORT)
    finally:
        proc.terminate()
        proc.wait(10)


def _node_dp(the_lab):
    from hyperplane.node import lifecycle as node
    if the_lab._dp is None:
        the_lab._dp = node.open_node(lab.node_name(the_lab.cfg))
    return the_lab._dp


def _metrics(the_lab) -> dict[str, int]:
    from hyperplane.observe.metrics import gateway_metrics, stat_counts
    dp = _node_dp(the_lab)
    return {**gateway_metrics(dp, 0), **stat_counts(dp), **the_lab.counters()}


def _moved(before: dict, after: dict) -> dict:
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k, 0)}


def _download(the_lab, dst, nbytes: int, rate: int = 0, seed: int = 1,
              timeout: float = 60) -> StreamDownload:
    d = StreamDownload(the_lab.client, dst, nbytes, rate, seed, src=CLIENT,
                       timeout=timeout).start()
    assert d.wait(timeout + 10), "the download did not end"
    return d


def _assert_whole(d: StreamDownload, nbytes: int, seed: int = 1) -> None:
    assert d.error is None, d.error
    assert d.received == nbytes, f"{d.received} of {nbytes} bytes"
    assert d.sha.hexdigest() == lab.stream_sha256(seed, nbytes), "the bytes differ"


def test_bulk_tcp_with_default_offloads_is_translated_as_superpackets(nat_lab,
                                                                         stream_server):
    """With TSO/GSO at the sender the node gets superpackets with partial checksums: they
    are translated whole (more packets counted on the wire than verdicts) and arrive
    byte-exact."""
    feats = netns.offloads(nat_lab.inet, "inet0")
    assert feats["tcp-segmentation-offload"] and feats["tx-checksumming"], feats
    before = _metrics(nat_lab)
    d = _download(nat_lab, stream_server, 32 << 20, seed=3)
    _assert_whole(d, 32 << 20, seed=3)
    moved = _moved(before, _metrics(nat_lab))
    assert moved["PacketsInFromDestination"] > moved["TX_NAT_IN"], (
        f"no superpacket: {moved['PacketsInFromDestination']} packets in "
        f"{moved['TX_NAT_IN']} verdicts")


def test_neighbour_caches_flushed_mid_transfer(nat_lab, stream_server):
    """No static neighbours: flushing every neighbour cache again and again during a
    transfer costs nothing; the node resolves next hops through the kernel (ARP) and never
    hands a packet over untranslated."""
    stop = threading.Event()
    flushes = []

    def flusher():
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline:
            for ns in (nat_lab.node, nat_lab.client, nat_lab.inet):
                subprocess.run(["ip", "-n", ns, "neigh", "flush", "all"], check=False,
                               capture_output=True)
            flushes.append(1)
            time.sleep(0.05)

    before = _metrics(nat_lab)
    t = threading.Thread(target=flusher, daemon=True)
    t.start()
    try:
        d = _download(nat_lab, stream_server, 8 << 20, rate=4 << 20, seed=5, timeout=30)
    finally:
        stop.set()
        t.join(5)
    _assert_whole(d, 8 << 20, seed=5)
    moved = _moved(before, _metrics(nat_lab))
    assert len(flushes) > 10, "the caches were hardly flushed"
    assert moved.get("PASS_NON_IP", 0) > 0, f"no neighbour was resolved again (ARP): {moved}"


def _set_mtu(ns: str, ifname: str, mtu: int) -> None:
    netns.run_in(ns, ["ip", "link", "set", "dev", ifname, "mtu", str(mtu)])


@pytest.fixture
def small_inside_mtu(nat_lab):
    """The node's inside link carries 1400 bytes (a tunnel's worth less than the
    client's own 1500): the internet host learns it only from ICMP."""
    def forget_path_mtus():  # what the hosts learned from an earlier test's ICMP
        for ns in (nat_lab.inet, nat_lab.client):
            netns.run_in(ns, ["ip", "route", "flush", "cache"])

    forget_path_mtus()
    _set_mtu(nat_lab.node, "in0", 1400)
    try:
        yield 1400
    finally:
        _set_mtu(nat_lab.node, "in0", 1500)
        forget_path_mtus()


def test_download_through_a_smaller_inside_mtu(nat_lab, stream_server, small_inside_mtu):
    """Packets too big for the inside link with DF get ICMP fragmentation needed from the
    node (about the packet as the server sent it, so its TCP lowers the path MTU), and
    the download completes."""
    before = _metrics(nat_lab)
    d = _download(nat_lab, stream_server, 1 << 20, seed=7, timeout=30)
    _assert_whole(d, 1 << 20, seed=7)
    moved = _moved(before, _metrics(nat_lab))
    assert moved.get("TX_FRAG_NEEDED", 0) > 0, moved


BIG = 3000   # bigger than both links' MTU: the server's stack sends it as fragments, no DF


def big_answer(data: bytes) -> bytes:
    return (data * (BIG // len(data) + 1))[:BIG]


def test_big_udp_without_df_is_fragmented_by_the_node(nat_lab, small_inside_mtu):
    """A datagram too big for the inside link without DF is translated and fragmented
    (by the node's kernel, handed the translated packet): the client gets it whole."""
    before = _metrics(nat_lab)
    assisted0 = lab.assisted_packets(nat_lab.cfg)
    with UdpEcho(nat_lab.inet, SERVER, 7070, answer=big_answer):
        s = netns.socket_in(nat_lab.client, socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.bind((CLIENT, 0))
            s.settimeout(2)
            got = []
            for i in range(3):
                msg = f"request {i}".encode()
                s.sendto(msg, (SERVER, 7070))
                data, _ = s.recvfrom(65535)
                got.append(data == big_answer(msg))
        finally:
            s.close()
    assert got == [True] * 3
    moved = _moved(before, _metrics(nat_lab))
    assert moved.get("PASS_FRAGMENTING", 0) > 0, moved
    assert lab.assisted_packets(nat_lab.cfg) > assisted0


# --- TTL ------------------------------------------------------------------------------------

IP_RECVERR = 11
SO_EE_ORIGIN_ICMP = 2


def _icmp_error(sock: socket.socket, timeout: float = 2.0) -> tuple[int, int, str]:
    """(type, code, offender address) of the first ICMP error queued on a socket with
    IP_RECVERR."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            _data, anc, _flags, _addr = sock.recvmsg(512, 512, socket.MSG_ERRQUEUE)
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise TimeoutError("no ICMP error arrived") from None
            time.sleep(0.02)
            continue
        for level, kind, blob in anc:
            if level == socket.IPPROTO_IP and kind == IP_RECVERR:
                _errno, origin, etype, code = struct.unpack_from("=IBBB", blob)
                assert origin == SO_EE_ORIGIN_ICMP, origin
                offender = socket.inet_ntoa(blob[16 + 4:16 + 8])
                return etype, code, offender
        raise AssertionError(f"an error without IP_RECVERR data: {anc}")


def _udp_sock(ns: str, host: str) -> socket.socket:
    s = netns.socket_in(ns, socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, 0))
    s.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
    s.setblocking(False)
    return s


def test_ttl_running_out_at_the_node_is_answered_like_a_router(nat_lab):
    """A packet whose TTL runs out at the node gets ICMP time exceeded from the node's
    address toward the sender: outbound (a new flow and a live one) from its inside
    address, inbound (a reply of a live flow) from its outside address."""
    with UdpEcho(nat_lab.inet, SERVER, 7071) as echo:
        c = _udp_sock(nat_lab.client, CLIENT)
        try:
            c.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 1)
            c.sendto(b"probe", (SERVER, 7071))            # no flow yet
            assert _icmp_error(c) == (11, 0, lab.NODE_INSIDE_IP)
            c.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 64)
            c.sendto(b"hello", (SERVER, 7071))            # the flow, answered
            deadline = time.monotonic() + 2
            while not echo.peers and time.monotonic() < deadline:
                time.sleep(0.02)
            assert echo.peers, "the echo server got nothing"
            nat_peer = echo.peers[-1]
            assert nat_peer[0] == lab.NAT_IP
            c.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 1)
            c.sendto(b"probe", (SERVER, 7071))            # a live flow
            assert _icmp_error(c) == (11, 0, lab.NODE_INSIDE_IP)
        finally:
            c.close()
    # inbound: the server's packet to the NAT IP with TTL 1
    s = netns.socket_in(nat_lab.inet, socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((SERVER, 7071))
        s.setsockopt(socket.IPPROTO_IP, IP_RECVERR, 1)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_TTL, 1)
        s.setblocking(False)
        s.sendto(b"late reply", nat_peer)
        assert _icmp_error(s) == (11, 0, lab.NODE_OUTSIDE_IP)
    finally:
        s.close()


def test_the_node_answers_for_its_nat_ip(nat_lab):
    """The lab does not add the NAT IP: the node does (hpctl nat up), and answers ping."""
    assert len(ping(nat_lab.inet, lab.NAT_IP, count=2)) == 2, "the NAT IP does not answer"
    out0 = {l["ifname"]: l for l in netns.links(nat_lab.node)}["out0"]
    assert f"{lab.NAT_IP}/32" in out0["addresses"]
