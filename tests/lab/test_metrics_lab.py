"""Prometheus metrics scraped over HTTP from a running agent (the lab's, started with
--metrics-addr 0.0.0.0:METRICS_PORT, serving inside the node's network namespace) agree
with the traffic sent through the lab with real sockets (issue 8 sections 2 and 5).

Exact where the traffic fixes the number: UDP datagrams and their bytes through the NAT
(each counted once in each of the four directions), TCP connections attempted and
established, NLB flows, flows held open. Where TCP's own packets (ACKs, FINs, delayed
ACKs) make the count the kernel's choice, the scraped deltas must equal what the data
path's counters say when read directly (the exporter keeps no copy) and be at least what
the payload and headers need.

Bytes are what the data path counts per packet: the frame (IP total length + the 14-byte
Ethernet header), so a UDP datagram of P payload bytes counts P + 8 + 20 + 14.

Every wait polls with a deadline; nothing asserts on time."""
from __future__ import annotations

import contextlib
import json
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hyperplane import lab, netns
from hyperplane.lab.fleet_plan import node_name as fleet_node_name
from hyperplane.node.agent import status_path
from hyperplane.node.lifecycle import node_state, open_node, read_state_file
from hyperplane.observe.metrics import gateway_metrics

from lab_harness import ATTACH, build_nlb_lab, lab_prefix
from lab_traffic import TcpCollector, UdpEcho, open_concurrent

PORT = lab.METRICS_PORT
UDP_PORT, TCP_PORT = 7001, 7002
ETH_IP_UDP = 14 + 20 + 8      # the headers a UDP datagram's counted bytes add


@pytest.fixture(scope="module")
def metrics_lab(request):
    """The one-node lab with its NLB; its agent serves metrics on 0.0.0.0:METRICS_PORT in
    the node's namespace (hyperplane.lab starts it so)."""
    return build_nlb_lab(request, lab.LabConfig(prefix=lab_prefix("m"), mode="xdp",
                                                attach=ATTACH, nlb=True))


def scrape(the_lab) -> dict:
    """GET /metrics from inside the node's namespace, parsed by prometheus_client's parser:
    sample name -> {frozenset(labels): value}."""
    def get():
        with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/metrics", timeout=10) as resp:
            assert resp.status == 200
            return resp.read().decode()
    out: dict = {}
    for family in text_string_to_metric_families(netns.call_in(the_lab.node, get)):
        for s in family.samples:
            out.setdefault(s.name, {})[frozenset(s.labels.items())] = s.value
    return out


def sample(samples: dict, name: str, **labels) -> float:
    """The one sample of `name` whose labels include `labels`."""
    hits = [v for k, v in samples.get(name, {}).items() if set(labels.items()) <= k]
    assert len(hits) == 1, f"{len(hits)} samples of {name} with {labels}: {samples.get(name)}"
    return hits[0]


def gateway(the_lab) -> str:
    return node_state(lab.node_name(the_lab.cfg))["gateways"][0]["name"]


NAT = {  # short name -> family (sample name)
    "attempts": "hyperplane_nat_gateway_connection_attempts_total",
    "established": "hyperplane_nat_gateway_connections_established_total",
    "active": "hyperplane_nat_gateway_active_connections",
    **{f"{d}_{unit}": f"hyperplane_nat_gateway_{d}_{unit}_total"
       for d in ("in_from_source", "out_to_destination", "in_from_destination", "out_to_source")
       for unit in ("packets", "bytes")},
}
# the same counters as hyperplane.observe.metrics names them (AWS names)
AWS = {"attempts": "ConnectionAttemptCount", "established": "ConnectionEstablishedCount",
       "active": "ActiveConnectionCount",
       **{f"{d}_{unit}": f"{unit.capitalize()}{a}" for d, a in (
           ("in_from_source", "InFromSource"), ("out_to_destination", "OutToDestination"),
           ("in_from_destination", "InFromDestination"), ("out_to_source", "OutToSource"))
          for unit in ("packets", "bytes")}}


def nat_metrics(the_lab) -> dict[str, float]:
    s = scrape(the_lab)
    node, gw = lab.node_name(the_lab.cfg), gateway(the_lab)
    out = {k: sample(s, name, node=node, gateway=gw) for k, name in NAT.items()}
    for verdict in ("TX_NAT_OUT", "TX_NAT_IN"):
        out[verdict] = sample(s, "hyperplane_datapath_packets_total", node=node, verdict=verdict)
    return out


def settled(read, timeout: float = 10.0) -> dict:
    """read() once two reads 0.3 s apart agree (the last packets of an exchange, e.g. a
    FIN's ACK, may still be on their way); the last read at the deadline."""
    deadline = time.monotonic() + timeout
    last = read()
    while time.monotonic() < deadline:
        time.sleep(0.3)
        now = read()
        if now == last:
            return now
        last = now
    return last


def delta(after: dict, before: dict) -> dict:
    return {k: after[k] - before[k] for k in after}


def wait_for(predicate, what: str, timeout: float = 15.0):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(0.2)


def test_the_agent_serves_in_the_nodes_namespace_and_says_where(metrics_lab):
    node = lab.node_name(metrics_lab.cfg)
    status = read_state_file(status_path(node), "no agent status")
    assert status["metrics"] == f"http://0.0.0.0:{PORT}/metrics"
    s = scrape(metrics_lab)
    assert sample(s, "hyperplane_nat_gateway_ports_per_destination", node=node,
                  gateway=gateway(metrics_lab)) > 0


def test_udp_datagrams_through_the_nat_are_counted_exactly(metrics_lab):
    """N datagrams of P bytes on one socket, each echoed: one connection attempt, N packets
    and N * (P + 42) bytes in each of the four directions, N TX_NAT_OUT and N TX_NAT_IN."""
    n, payload = 100, 200
    before = settled(lambda: nat_metrics(metrics_lab))
    with UdpEcho(metrics_lab.inet, lab.INET_IPS[0], UDP_PORT):
        sock = netns.socket_in(metrics_lab.client, socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((lab.CLIENT_IPS[0], 0))
        sock.settimeout(3)
        try:
            for i in range(n):
                msg = i.to_bytes(4, "big") + bytes(payload - 4)
                sock.sendto(msg, (lab.INET_IPS[0], UDP_PORT))
                assert sock.recv(65535) == msg, f"datagram {i} came back changed"
        finally:
            sock.close()
    d = delta(settled(lambda: nat_metrics(metrics_lab)), before)
    frame = payload + ETH_IP_UDP
    assert d["attempts"] == 1 and d["established"] == 0
    for direction in ("in_from_source", "out_to_destination", "in_from_destination",
                      "out_to_source"):
        assert d[f"{direction}_packets"] == n, (direction, d)
        assert d[f"{direction}_bytes"] == n * frame, (direction, d)
    assert d["TX_NAT_OUT"] == n and d["TX_NAT_IN"] == n, d
    # the flow was confirmed by the second datagram (a packet after a reply): it is open
    assert d["active"] == 1, d


def test_tcp_connections_through_the_nat(metrics_lab):
    """M connections, each sending a request and closing: M attempts, M established, and
    byte and packet counts equal to the data path's own counters (no copy) and at least
    what the payload and a handshake need; none stays active once closed."""
    m, request = 20, 300
    before = settled(lambda: nat_metrics(metrics_lab))
    with TcpCollector(metrics_lab.inet, lab.INET_IPS[0], TCP_PORT) as server:
        for i in range(m):
            c = netns.socket_in(metrics_lab.client)
            c.settimeout(5)
            try:
                c.connect((lab.INET_IPS[0], TCP_PORT))
                c.sendall(bytes(request))
            finally:
                c.close()
        assert server.wait_for(m, timeout=15) == m
    after = settled(lambda: nat_metrics(metrics_lab))
    d = delta(after, before)
    assert d["attempts"] == m and d["established"] == m, d
    # SYN, ACK, data and FIN at least from each client, each 14 + 20 + 20 bytes of headers
    assert d["in_from_source_packets"] >= 4 * m, d
    assert d["in_from_source_bytes"] >= m * (request + 4 * 54), d
    assert d["in_from_source_packets"] == d["out_to_destination_packets"]
    assert d["in_from_destination_packets"] == d["out_to_source_packets"] >= 2 * m
    # the exporter reads the maps at scrape time: the same numbers as reading them here
    with open_node(lab.node_name(metrics_lab.cfg)) as dp:
        direct = gateway_metrics(dp, node_state(lab.node_name(metrics_lab.cfg))
                                 ["gateways"][0]["gw_id"])
    for k, aws in AWS.items():
        if k != "active":
            assert after[k] == direct[aws], (k, after[k], direct[aws])


def test_open_connections_are_active_and_stop_being_active_when_closed(metrics_lab):
    k = 12
    base = settled(lambda: nat_metrics(metrics_lab))["active"]
    with TcpCollector(metrics_lab.inet, lab.INET_IPS[0], TCP_PORT + 1) as server:
        socks, connected = open_concurrent(metrics_lab.client, (lab.INET_IPS[0], TCP_PORT + 1),
                                           k, timeout=15)
        try:
            assert connected == k
            assert server.wait_for(k, timeout=15) == k
            for s in socks:   # the client's packet after the SYN-ACK confirms each flow
                s.setblocking(True)
                s.sendall(b"x")
            wait_for(lambda: nat_metrics(metrics_lab)["active"] == base + k,
                     f"{k} more active connections than {base}")
        finally:
            for s in socks:
                s.close()
    # FIN both ways (the client closed, the server's sockets closed with the block)
    wait_for(lambda: nat_metrics(metrics_lab)["active"] == base,
             f"active connections back to {base}")


def test_nlb_flows_per_listener_and_target(metrics_lab):
    """M HTTP requests from the internet host to the VIP: NewFlowCount of the TCP listener
    grows by exactly M, and the listener's packets equal the sum over its targets'."""
    from lab_traffic import http_get_many
    node = lab.node_name(metrics_lab.cfg)
    m = 30

    def read():
        s = scrape(metrics_lab)
        listener = dict(node=node, listener=f"{lab.VIP}:{lab.HTTP_PORT}", protocol="tcp",
                        load_balancer=lab.LB_NAME, target_group=lab.WEB_GROUP)
        targets = {dict(k)["target"]: v for k, v in
                   s["hyperplane_nlb_target_packets_total"].items()
                   if ("target_group", lab.WEB_GROUP) in k}
        return {"new": sample(s, "hyperplane_nlb_new_flows_total", **listener),
                "packets": sample(s, "hyperplane_nlb_processed_packets_total", **listener),
                "targets": sum(targets.values()),
                "healthy": sample(s, "hyperplane_nlb_healthy_hosts", node=node,
                                  load_balancer=lab.LB_NAME, target_group=lab.WEB_GROUP)}
    before = settled(read)
    results = http_get_many(metrics_lab.inet, (lab.VIP, lab.HTTP_PORT), m,
                            sources=[lab.INET_IPS[0]], concurrency=4)
    assert all(r.ok for r in results), [r for r in results if not r.ok][:3]
    after = settled(read)
    assert after["new"] - before["new"] == m
    assert after["packets"] - before["packets"] == after["targets"] - before["targets"] >= 5 * m
    assert after["healthy"] == len(lab.TARGET_IPS)


@pytest.mark.parametrize("addr,status,sentence", [
    ("0.0.0.0:{port}", 1, "cannot serve metrics on 0.0.0.0:{port} in network namespace {ns}: "
                          "Address already in use"),
    ("localhost:9477", 2, "the metrics address must be HOST:PORT with an IPv4 address and a "
                          "port 0-65535 (e.g. 0.0.0.0:9477), not 'localhost:9477'")])
def test_an_agent_that_cannot_serve_metrics_stops_with_one_sentence(metrics_lab, addr, status,
                                                                     sentence):
    """A second agent for the node, asking for the port the lab's agent holds (in the same
    namespace) or for a bad address: exit status and one sentence on stderr, no traceback.
    It stops at start-up, before its first tick, so it changes nothing on the node."""
    import subprocess
    import sys
    node = lab.node_name(metrics_lab.cfg)
    proc = subprocess.run([sys.executable, "-m", "hyperplane.node.agent", "--node", node,
                           "--store", lab.store_path(metrics_lab.cfg.prefix),
                           "--metrics-addr", addr.format(port=PORT)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == status, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if "hyperplane agent:" in line]
    assert lines == [f"hyperplane agent: {sentence.format(port=PORT, ns=metrics_lab.node)}"], \
        proc.stderr
    assert "Traceback" not in proc.stderr
    # the lab's agent still serves
    assert "hyperplane_datapath_packets_total" in scrape(metrics_lab)


# --- a fleet of two nodes -----------------------------------------------------------------

@pytest.fixture(scope="module")
def metrics_fleet(request):
    """The 2-node fleet lab (mode xdp, a store file of its own); every node's agent serves
    metrics on 0.0.0.0:METRICS_PORT in its namespace."""
    from lab_harness import require_root
    require_root()
    cfg = lab.LabConfig(prefix=lab_prefix("g"), mode="xdp", nodes=2)
    lab.down(cfg)                       # leftovers of a killed run with the same pid
    request.addfinalizer(lambda: lab.down(cfg))
    lab.up(cfg)
    return cfg


def fleet_scrape(cfg, i: int) -> dict:
    return scrape(SimpleNamespace(node=lab.namespaces(cfg)[f"node{i}"]))


def fleet_numbers(cfg) -> dict:
    """Per node: NAT attempts and established, records installed, sync datagrams rejected,
    exporter errors, events lost."""
    out = {}
    for i in (1, 2):
        s = fleet_scrape(cfg, i)
        total = lambda name, **kw: sum(v for k, v in s.get(name, {}).items()  # noqa: E731
                                       if set(kw.items()) <= k)
        out[i] = {"attempts": total(NAT["attempts"]), "established": total(NAT["established"]),
                  "installed": total("hyperplane_fleet_records_total", result="installed"),
                  "rejected": total("hyperplane_fleet_sync_rejected_datagrams_total"),
                  "errors": total("hyperplane_exporter_errors_total"),
                  "lost": total("hyperplane_datapath_events_total", event="EVENT_LOST")}
    return out


def test_fleet_nodes_report_membership_and_replicate_what_they_count(metrics_fleet, tmp_path):
    """Both nodes ready, each seeing 2 members and its peer up; M NAT connections spread
    over the nodes by the routers: the nodes' connection attempts add up to exactly M
    (each flow is made once, by its owner), established too, and the records each node
    installed add up to M (every flow replicated to the other node once); no sync
    datagram rejected, no scrape error."""
    cfg = metrics_fleet
    for i in (1, 2):
        s = fleet_scrape(cfg, i)
        name = fleet_node_name(cfg, i)
        assert sample(s, "hyperplane_fleet_ready", node=name) == 1
        assert sample(s, "hyperplane_fleet_members", node=name) == 2
        # one peer (the other node, by its node id), heard from
        assert list(s["hyperplane_fleet_peer_up"].values()) == [1], s["hyperplane_fleet_peer_up"]
    m = 100
    ns = lab.namespaces(cfg)
    before = settled(lambda: fleet_numbers(cfg))
    with TcpCollector(ns["inet"], lab.INET_IPS[0], TCP_PORT) as server:
        for _ in range(m):
            c = netns.socket_in(ns["client"])
            c.settimeout(5)
            try:
                c.connect((lab.INET_IPS[0], TCP_PORT))
                c.sendall(bytes(100))
            finally:
                c.close()
        assert server.wait_for(m, timeout=20) == m

    def replicated():
        now = fleet_numbers(cfg)
        d = {i: delta(now[i], before[i]) for i in now}
        return d if sum(d[i]["installed"] for i in d) >= m else None
    try:
        d = wait_for(replicated, f"{m} records installed over the two nodes", timeout=30)
    except AssertionError:
        d = {i: delta(v, before[i]) for i, v in fleet_numbers(cfg).items()}
        raise AssertionError(f"records installed: {d}") from None
    d = {i: delta(v, before[i]) for i, v in settled(lambda: fleet_numbers(cfg)).items()}
    assert sum(d[i]["attempts"] for i in d) == m, d
    assert sum(d[i]["established"] for i in d) == m, d
    assert sum(d[i]["installed"] for i in d) == m, d
    assert all(d[i]["rejected"] == 0 and d[i]["errors"] == 0 for i in d), d
    # the dashboard's fleet panels answer in a Prometheus scraping node 1
    with prometheus_in(ns["node1"], tmp_path) as query:
        for expr in dashboard_queries():
            if "hyperplane_fleet_" in expr:
                assert query(expr), f"no series for {expr!r}"


# --- the Grafana dashboard's queries, evaluated by a real Prometheus ------------------------

DASHBOARD = Path(__file__).resolve().parents[2] / "grafana" / "hyperplane.json"


def dashboard_queries() -> list[str]:
    """Every query of the dashboard with Grafana's variables replaced as Grafana would:
    $node by the "All" regex, $__rate_interval by a range of several scrapes."""
    exprs = []

    def walk(panels):
        for p in panels:
            exprs.extend(t["expr"] for t in p.get("targets", []))
            walk(p.get("panels", []))
    walk(json.loads(DASHBOARD.read_text())["panels"])
    return [e.replace("$node", ".*").replace("$__rate_interval", "10s") for e in exprs]


@contextlib.contextmanager
def prometheus_in(ns: str, tmp_path):
    """Debian's Prometheus in the namespace ns scraping the agent there every second, its
    API on 127.0.0.1:9090 of ns; yields query(expr) -> the result list. Stopped after."""
    import shutil
    import subprocess
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed (Debian's prometheus package; "
                    "scripts/setup.sh installs it)", pytrace=False)
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # YAML is a superset of JSON
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "hyperplane", "static_configs": [
            {"targets": [f"127.0.0.1:{PORT}"]}]}]}))
    log = open(tmp_path / "prometheus.log", "w")
    proc = netns.popen_in(ns, [binary, f"--config.file={config}",
                               f"--storage.tsdb.path={tmp_path / 'data'}",
                               "--web.listen-address=127.0.0.1:9090"],
                          stdout=log, stderr=log, stdin=subprocess.DEVNULL)

    def query(expr: str) -> list:
        def get():
            url = "http://127.0.0.1:9090/api/v1/query?" + urllib.parse.urlencode({"query": expr})
            try:
                with urllib.request.urlopen(url, timeout=10) as resp:
                    return json.load(resp)
            except urllib.error.HTTPError as exc:     # a bad query: 400 with the reason
                if exc.code == 503:                   # still starting: "Service Unavailable"
                    return None
                return json.load(exc)
        deadline = time.monotonic() + 60
        while (answer := netns.call_in(ns, get)) is None:
            assert time.monotonic() < deadline, "Prometheus answered 503 for 60 s"
            time.sleep(0.5)
        assert answer["status"] == "success", f"{expr!r}: {answer.get('error')}"
        return answer["data"]["result"]

    def scraped() -> bool:
        try:
            return bool(query("count_over_time(up[1m]) >= 5 and up == 1"))
        except (OSError, AssertionError):
            return False
    try:
        wait_for(lambda: proc.poll() is None and scraped(),
                 "Prometheus up and 5 successful scrapes of the agent", timeout=60)
        yield query
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
        log.close()


def test_every_dashboard_query_answers_in_prometheus(metrics_lab, tmp_path):
    """Prometheus scrapes the lab's agent; every query of grafana/hyperplane.json parses,
    and each one of the data path, NAT and NLB panels returns series. The traffic of the tests above has made the counters
    move. (The fleet test above checks the fleet's panels the same way.)"""
    with prometheus_in(metrics_lab.node, tmp_path) as query:
        for expr in dashboard_queries():
            result = query(expr)
            if "hyperplane_fleet_" not in expr:
                assert result, f"no series for {expr!r}"
