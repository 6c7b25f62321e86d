"""VPC flow logs and flow events against real traffic through the one-node NAT lab.

The node's agent runs with a 1 s aggregation interval and 4 KiB files (so the log rotates
during the tests). Known traffic is sent with real sockets and the flow log's records are
compared with it: packet counts with what was sent, bytes with what the data path counted
(a frame's bytes, Ethernet header included) and, for UDP, with the datagrams' sizes. Waits
poll for the awaited state with a deadline; no assertion depends on timing."""
from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
import time

import pytest

from hyperplane import lab, netns
from hyperplane.observe import flowlogs

from lab_harness import ATTACH, build_lab, lab_prefix
from lab_traffic import UdpEcho, wait_tcp

pytestmark = pytest.mark.lab

SERVER = lab.INET_IPS[0]       # 198.18.0.2
CLIENT = lab.CLIENT_IPS[0]     # 10.10.0.10
ETH_IP_UDP = 14 + 20 + 8       # what a datagram's frame adds to its payload
DEADLINE_S = 30.0


@pytest.fixture(scope="module")
def fl_lab(request, tmp_path_factory):
    """The NAT lab (mode xdp, no NLB) and an agent for its node writing flow logs."""
    the_lab = build_lab(request, lab.LabConfig(prefix=lab_prefix("f"), mode="xdp",
                                               attach=ATTACH, nlb=False))
    node = lab.node_name(the_lab.cfg)
    tmp = tmp_path_factory.mktemp("flowlogs")
    log = open(tmp / "agent.log", "w")
    agent = subprocess.Popen(
        [sys.executable, "-m", "hyperplane.node.agent", "--node", node,
         "--store", str(tmp / "store.json"), "--flow-log-dir", str(tmp / "logs"),
         "--flow-log-interval", "1", "--flow-log-max-bytes", "4096",
         "--flow-log-backups", "1000"], stdout=log, stderr=log)

    def stop():
        agent.terminate()
        try:
            agent.wait(20)
        except subprocess.TimeoutExpired:
            agent.kill()
            agent.wait(5)
        log.close()
    request.addfinalizer(stop)
    from hyperplane.node.status import read_status
    from hyperplane.observe.follow import events_socket_path
    path = flowlogs.log_path(str(tmp / "logs"), node)
    deadline = time.monotonic() + DEADLINE_S
    while True:
        if agent.poll() is not None:
            pytest.fail(f"the agent exited ({agent.returncode}): "
                        f"{(tmp / 'agent.log').read_text()[-2000:]}", pytrace=False)
        try:
            if read_status(node).get("flow_logs") and os.path.exists(events_socket_path(node)):
                break
        except Exception:  # noqa: BLE001 - not written yet
            pass
        if time.monotonic() > deadline:
            pytest.fail("the agent wrote no status with flow logs within "
                        f"{DEADLINE_S:.0f} s: {(tmp / 'agent.log').read_text()[-2000:]}",
                        pytrace=False)
        time.sleep(0.1)
    the_lab.flow_log = path
    the_lab.node_name = node
    the_lab.agent_log = tmp / "agent.log"
    return the_lab


def logged(path: str) -> dict:
    """(interface, src, sport, dst, dport, proto) -> [packets, bytes, records] over every
    file of the log; SKIPDATA records under the key "skipdata"."""
    out: dict = {"skipdata": []}
    for line in flowlogs.read_lines(path):
        r = flowlogs.parse_line(line)
        if r.log_status != "OK":
            out["skipdata"].append(r)
            continue
        k = (r.interface_id, r.srcaddr, r.srcport, r.dstaddr, r.dstport, r.protocol)
        acc = out.setdefault(k, [0, 0, 0])
        acc[0] += r.packets
        acc[1] += r.bytes
        acc[2] += 1
    return out


def datapath_counts(the_lab, proto: str, client_port: int) -> dict:
    """The data path's flow entries of the client's port: (in ifname, src, sport, dst,
    dport, proto) -> (packets, bytes)."""
    from hyperplane.codec import proto_number
    from hyperplane.datapath.flows import flow_entries
    from hyperplane.codec import be16_to_port, be32_to_ip
    from hyperplane.node.lifecycle import open_node
    names = {i: n for i, n in _ifindexes(the_lab.node).items()}
    out = {}
    with open_node(the_lab.node_name) as dp:
        for k, v in flow_entries(dp):
            if k.proto != proto_number(proto):
                continue
            sport, dport = be16_to_port(k.src_port), be16_to_port(k.dst_port)
            src, dst = be32_to_ip(k.src_ip), be32_to_ip(k.dst_ip)
            orig = src == CLIENT and sport == client_port
            reply = dst == lab.NAT_IP and be16_to_port(v.new_dst_port) == client_port
            if orig or reply:
                out[(names.get(v.in_ifindex), src, sport, dst, dport, k.proto)] = \
                    (v.packets, v.bytes)
    return out


def _ifindexes(ns: str) -> dict[int, str]:
    with netns.ipr(ns) as ip:
        return {link["index"]: link.get_attr("IFLA_IFNAME") for link in ip.get_links()}


def wait_logged_equal(the_lab, want: dict) -> dict:
    """Poll the log until its totals for want's keys equal want's (packets, bytes)."""
    deadline = time.monotonic() + DEADLINE_S
    while True:
        have = logged(the_lab.flow_log)
        got = {k: tuple(have.get(k, [0, 0])[:2]) for k in want}
        if got == want or time.monotonic() > deadline:
            return got
        time.sleep(0.25)


def test_udp_datagrams_of_known_sizes_are_logged_exactly(fl_lab):
    # 60 .. 1425 bytes of payload: no datagram is fragmented (a later fragment is not
    # counted in its flow entry)
    sizes = [60 + 35 * i for i in range(40)]
    with UdpEcho(fl_lab.inet, SERVER, 7301):
        c = netns.socket_in(fl_lab.client, socket.AF_INET, socket.SOCK_DGRAM)
        try:
            c.bind((CLIENT, 0))
            c.settimeout(2.0)
            port = c.getsockname()[1]
            answered = 0
            for size in sizes:
                c.sendto(os.urandom(size), (SERVER, 7301))
                data, _ = c.recvfrom(65535)
                answered += len(data) == size
        finally:
            c.close()
    assert answered == len(sizes)
    frame_bytes = sum(sizes) + len(sizes) * ETH_IP_UDP
    dp = datapath_counts(fl_lab, "udp", port)
    orig = ("in0", CLIENT, port, SERVER, 7301, 17)
    (reply,) = [k for k in dp if k != orig]
    assert reply[0] == "out0" and reply[1:3] == (SERVER, 7301) and reply[3] == lab.NAT_IP
    # the data path counted every datagram, each frame's bytes, both ways
    assert dp == {orig: (len(sizes), frame_bytes), reply: (len(sizes), frame_bytes)}, dp
    got = wait_logged_equal(fl_lab, dp)
    assert got == dp, f"flow log {got} != data path {dp}"
    assert not logged(fl_lab.flow_log)["skipdata"]


def test_a_tcp_transfer_is_logged_with_its_final_counts_after_it_is_closed_and_collected(fl_lab):
    """A 3 MB download closes (FIN both ways), lingers its closing timeout (10 s) and is
    deleted by the agent's GC: the log's totals are the flow's last counts, and the
    server's direction carried the payload plus headers."""
    size = 3 * 1024 * 1024 + 123
    payload = os.urandom(size)
    srv = netns.socket_in(fl_lab.inet, socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((SERVER, 7302))
    srv.listen(4)

    def serve():
        conn, _ = srv.accept()
        with conn:
            conn.sendall(payload)
            conn.shutdown(socket.SHUT_WR)
            while conn.recv(65536):
                pass

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    follower = _follow(fl_lab, ["--port", "7302"])
    try:
        c = netns.socket_in(fl_lab.client, socket.AF_INET, socket.SOCK_STREAM)
        c.settimeout(20)
        c.connect((SERVER, 7302))
        port = c.getsockname()[1]
        got = bytearray()
        while chunk := c.recv(1 << 20):
            got += chunk
        c.close()
        t.join(20)
        assert bytes(got) == payload
        events = _events_until(follower, port, {"created", "closed"})
    finally:
        follower.terminate()
        follower.wait(10)
        srv.close()
    assert {"created", "closed"} <= {e["event"] for e in events}, events
    assert all(e["src"] == CLIENT and e["sport"] == port and e["proto"] == "tcp"
               for e in events), events
    # last counts while the closed flow lingers, then its deletion by the GC
    deadline = time.monotonic() + 60
    last = datapath_counts(fl_lab, "tcp", port)
    assert len(last) == 2, last
    while (now := datapath_counts(fl_lab, "tcp", port)) and time.monotonic() < deadline:
        last = now
        time.sleep(0.2)
    assert not now, f"the closed flow is still there after 60 s: {now}"
    got = wait_logged_equal(fl_lab, last)
    assert got == last, f"flow log {got} != the flow's last counts {last}"
    reply = [k for k in last if k[0] == "out0"][0]
    packets, nbytes = last[reply]
    assert size < nbytes <= size + packets * (14 + 60), (size, packets, nbytes)
    # the deletion (both entries) reached the flow logs, and cost no SKIPDATA
    deadline = time.monotonic() + DEADLINE_S
    while (status := _flow_log_status(fl_lab))["deletions"] < 2 and \
            time.monotonic() < deadline:
        time.sleep(0.2)
    assert status["deletions"] >= 2 and status["skipdata"] == 0, status
    assert logged(fl_lab.flow_log)[reply][:2] == list(last[reply])


def test_many_short_flows_survive_rotation(fl_lab):
    """150 UDP flows of 1-3 datagrams each: every flow's record is in the rotated files,
    with its counts."""
    n = 150
    want = {}
    with UdpEcho(fl_lab.inet, SERVER, 7303):
        socks = []
        try:
            for i in range(n):
                c = netns.socket_in(fl_lab.client, socket.AF_INET, socket.SOCK_DGRAM)
                socks.append(c)
                c.bind((CLIENT, 0))
                c.settimeout(2.0)
                k = 1 + i % 3
                for _ in range(k):
                    c.sendto(b"x" * 100, (SERVER, 7303))
                    c.recvfrom(2048)
                want[("in0", CLIENT, c.getsockname()[1], SERVER, 7303, 17)] = \
                    (k, k * (100 + ETH_IP_UDP))
        finally:
            for c in socks:
                c.close()
    got = wait_logged_equal(fl_lab, want)
    missing = {k: (got[k], v) for k, v in want.items() if got[k] != v}
    assert not missing, f"{len(missing)} of {n} flows not logged as sent: {list(missing.items())[:5]}"
    files = flowlogs.log_files(fl_lab.flow_log)
    assert len(files) >= 3, f"the log did not rotate: {files}"
    assert all(os.path.getsize(f) <= 4096 for f in files)
    assert not logged(fl_lab.flow_log)["skipdata"]


def test_unsolicited_packets_to_the_nat_ip_are_logged_as_reject(fl_lab):
    """Datagrams from the internet to a NAT IP port no flow holds are dropped
    (DROP_NO_FLOW): one REJECT record per tuple with the packets and bytes sent, and a
    follower sees them as rejected events."""
    sizes = [100, 250, 400, 550, 700]
    follower = _follow(fl_lab, ["--event", "rejected", "--port", "7304"])
    try:
        s = netns.socket_in(fl_lab.inet, socket.AF_INET, socket.SOCK_DGRAM)
        try:
            s.bind((SERVER, 0))
            port = s.getsockname()[1]
            for size in sizes:
                s.sendto(b"r" * size, (lab.NAT_IP, 7304))
        finally:
            s.close()
        events = _events_until(follower, port, {"rejected"}, want_count=len(sizes))
    finally:
        follower.terminate()
        follower.wait(10)
    assert [(e["event"], e["verdict"], e["dst"], e["dport"]) for e in events] == \
        [("rejected", "DROP_NO_FLOW", lab.NAT_IP, 7304)] * len(sizes), events
    want = (len(sizes), sum(sizes) + len(sizes) * ETH_IP_UDP)
    key = ("out0", SERVER, port, lab.NAT_IP, 7304, 17)
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline:
        rejects = [flowlogs.parse_line(line) for line in flowlogs.read_lines(fl_lab.flow_log)]
        rejects = [r for r in rejects if r.action == "REJECT" and r.srcport == port]
        if (sum(r.packets for r in rejects), sum(r.bytes for r in rejects)) == want:
            break
        time.sleep(0.25)
    assert {(r.interface_id, r.srcaddr, r.srcport, r.dstaddr, r.dstport, r.protocol)
            for r in rejects} == {key}, rejects
    assert (sum(r.packets for r in rejects), sum(r.bytes for r in rejects)) == want, rejects


def readable(pipe, timeout: float) -> bool:
    """poll(), not select(): by this point of a full run the test process may hold more
    than FD_SETSIZE (1024) descriptors."""
    poller = select.poll()
    poller.register(pipe, select.POLLIN)
    return bool(poller.poll(int(timeout * 1000)))


def test_hpctl_flowlogs_prints_the_records_in_both_formats(fl_lab):
    env = {**os.environ, "HPCTL_NODE": fl_lab.node_name}
    hpctl = [os.path.join(os.path.dirname(sys.executable), "hpctl"), "flowlogs"]
    r = subprocess.run([*hpctl, "--tail", "5"], capture_output=True, text=True, env=env,
                       timeout=30)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert len(lines) == 5
    # read second and wider: the agent may log more records between the two reads
    r = subprocess.run([*hpctl, "--json", "--tail", "50"], capture_output=True, text=True,
                       env=env, timeout=30)
    assert r.returncode == 0, r.stderr
    records = json.loads(r.stdout)
    assert all(rec["version"] == 2 for rec in records)
    parsed = [flowlogs.parse_line(line).to_dict() for line in lines]
    assert all(rec in records for rec in parsed), (parsed, records[-8:])


def test_hpctl_flowlogs_follow_prints_new_records(fl_lab):
    """A follower started now prints the records of traffic sent after it started (the
    traffic repeats until it does, within the deadline: the follower's start is not
    observable from here)."""
    hpctl = os.path.join(os.path.dirname(sys.executable), "hpctl")
    p = subprocess.Popen([hpctl, "flowlogs", "--follow", "--format", "json", "--node",
                          fl_lab.node_name], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = []
    try:
        c = netns.socket_in(fl_lab.client, socket.AF_INET, socket.SOCK_DGRAM)
        c.bind((CLIENT, 0))
        port = c.getsockname()[1]
        buf = b""
        deadline = time.monotonic() + DEADLINE_S
        with UdpEcho(fl_lab.inet, SERVER, 7305):
            while not seen and time.monotonic() < deadline and p.poll() is None:
                c.sendto(b"f" * 64, (SERVER, 7305))
                ready = readable(p.stdout, 0.5)
                if ready:
                    buf += os.read(p.stdout.fileno(), 65536)
                    *lines, buf = buf.split(b"\n")
                    seen += [r for r in map(flowlogs.parse_line, map(bytes.decode, lines))
                             if r.srcport == port or r.dstport == port]
        c.close()
    finally:
        p.terminate()
        _, err = p.communicate(timeout=10)
    assert seen, f"hpctl flowlogs --follow printed no record of the new flow: {err!r}"
    assert all(r.action == "ACCEPT" and r.protocol == 17 for r in seen), seen


# --- helpers ---------------------------------------------------------------------------------

def _flow_log_status(the_lab) -> dict:
    with open(_status_path(the_lab)) as f:
        return json.load(f)["flow_logs"]


def _status_path(the_lab) -> str:
    from hyperplane.node.status import status_path
    return status_path(the_lab.node_name)


def _follow(the_lab, args: list[str]) -> subprocess.Popen:
    hpctl = os.path.join(os.path.dirname(sys.executable), "hpctl")
    p = subprocess.Popen([hpctl, "flows", "--follow", "--json", "--node", the_lab.node_name,
                          *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    # connected once the agent counts a follower (so no event is missed)
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline and p.poll() is None:
        if _followers(the_lab) >= 1:
            return p
        time.sleep(0.1)
    p.kill()
    out, err = p.communicate(timeout=10)
    pytest.fail(f"hpctl flows --follow did not connect (exit {p.returncode}): {err!r}",
                pytrace=False)


def _followers(the_lab) -> int:
    try:
        with open(_status_path(the_lab)) as f:
            return (json.load(f).get("flow_events") or {}).get("followers", 0)
    except (OSError, ValueError):
        return 0


def _events_until(p: subprocess.Popen, port: int, want: set[str],
                  want_count: int = 0) -> list[dict]:
    """The follower's events about the sender's port until all of want (and at least
    want_count events) were seen."""
    events, buf = [], b""
    deadline = time.monotonic() + DEADLINE_S
    while time.monotonic() < deadline and not (want <= {e["event"] for e in events} and
                                               len(events) >= want_count):
        ready = readable(p.stdout, 0.5)
        if not ready:
            continue
        chunk = os.read(p.stdout.fileno(), 65536)
        if not chunk:
            break
        buf += chunk
        *lines, buf = buf.split(b"\n")
        events += [e for e in map(json.loads, lines) if e["sport"] == port]
    return events
