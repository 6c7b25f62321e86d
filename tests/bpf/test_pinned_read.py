"""Reading a running node's state needs no compile: hpctl counters / flows / top answer
from the pinned maps (hyperplane/datapath/pinned.py) in a process where bcc cannot be imported.

A node is started in a private namespace (hpt-rd-<pid>) with a NAT gateway and a load
balancer, a few connections go through its program (BPF_PROG_TEST_RUN), and the read
commands' answers are compared with what the compiled program's own bcc tables say."""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import time

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import ARP, Ether

from hyperplane import netns
from hyperplane.datapath import sandbox
from hyperplane.datapath.flows import list_flows
from hyperplane.datapath.loader import PIN_ROOT, Sizes, remove_pins
from hyperplane.observe.metrics import gateway_metrics, load_balancer_metrics, stat_counts, verdict_counts
from hyperplane.nat.gateway import GatewayConfig
from hyperplane.datapath.pinned import PinnedNode, pinned_map_names
from hyperplane.datapath.sandbox import CLIENT, CLIENT_MAC, INET, INET_MAC, MAC, NAT_IP, TARGETS, VIP
from hyperplane.datapath.testrun import test_run as run_packet
from hyperplane.datapath.verdicts import Verdict

NAME = f"hpt-rd-{os.getpid()}"          # namespace and node
PIN_DIR = os.path.join(PIN_ROOT, NAME)
SIZES = Sizes(max_flows=4096, max_reservations=2048, max_listeners=4, maglev_size=251,
              max_targets=16)
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NAT_CLIENTS = 3


def _nlb_config() -> dict:
    return {"load_balancers": [{"name": "web", "lb_id": 0}],
            "listeners": [{"lb": "web", "vip": VIP, "port": 80, "protocol": "TCP",
                           "target_group": "tg"}],
            "target_groups": [{"name": "tg", "targets": [{"ip": TARGETS[0], "port": 8080}]}]}


class Node:
    def __init__(self, dp, ifindex):
        self.dp, self.ifindex = dp, ifindex

    def send(self, frame, iface: str) -> tuple[Verdict, bytes]:
        before = verdict_counts(self.dp)
        res = netns.call_in(NAME, run_packet, self.dp.prog_fd, bytes(frame),
                            ingress_ifindex=self.ifindex[iface])
        after = verdict_counts(self.dp)
        moved = [Verdict[n] for n in after if after[n] != before[n]]
        assert len(moved) == 1, moved
        return moved[0], res.data


@pytest.fixture(scope="module")
def node():
    """The node, with NAT_CLIENTS connections through the NAT, one through the load
    balancer (each handshake seen to its end: SYN, SYN-ACK, and the ACK that confirms the
    flow), one packet to the NAT IP with no flow and one ARP request."""
    if os.geteuid() != 0:
        pytest.fail("needs root (BPF and a network namespace); run scripts/test as root",
                    pytrace=False)
    from hyperplane.nlb.dataplane import NlbDataplane
    from hyperplane.nlb.config import NlbConfig
    from hyperplane.node.lifecycle import open_node, start_nat_node, stop_node
    netns.remove(NAME)
    dp = None
    try:
        ifindex = sandbox.build(NAME)
        dp = start_nat_node(NAME, [], [GatewayConfig("gw-rd", 0, [NAT_IP], ["10.10.0.0/24"])],
                            netns=NAME, sizes=SIZES)
        # the load balancer is written through the pinned maps (no compile), as the agent does
        with open_node(NAME) as maps:
            NlbDataplane(maps).apply(NlbConfig.from_dict(_nlb_config()))
        n = Node(dp, ifindex)
        for i in range(NAT_CLIENTS):
            syn = Ether(src=CLIENT_MAC, dst=MAC["in0"]) / IP(src=CLIENT, dst=INET) / \
                TCP(sport=42000 + i, dport=80, flags="S", seq=100)
            verdict, out = n.send(syn, "in0")
            assert verdict == Verdict.TX_NAT_OUT
            nat_port = Ether(out)[TCP].sport
            synack = Ether(src=INET_MAC, dst=MAC["out0"]) / IP(src=INET, dst=NAT_IP) / \
                TCP(sport=80, dport=nat_port, flags="SA", seq=500, ack=101)
            assert n.send(synack, "out0")[0] == Verdict.TX_NAT_IN
            ack = Ether(src=CLIENT_MAC, dst=MAC["in0"]) / IP(src=CLIENT, dst=INET) / \
                TCP(sport=42000 + i, dport=80, flags="A", seq=101, ack=501)
            assert n.send(ack, "in0")[0] == Verdict.TX_NAT_OUT  # confirms the flow
        syn = Ether(src=INET_MAC, dst=MAC["out0"]) / IP(src=INET, dst=VIP) / \
            TCP(sport=43000, dport=80, flags="S", seq=100)
        assert n.send(syn, "out0")[0] == Verdict.TX_NLB_IN
        synack = Ether(src=sandbox.TARGET_MAC, dst=MAC["tg0"]) / IP(src=TARGETS[0], dst=INET) / \
            TCP(sport=8080, dport=43000, flags="SA", seq=500, ack=101)
        assert n.send(synack, "tg0")[0] == Verdict.TX_NLB_OUT
        ack = Ether(src=INET_MAC, dst=MAC["out0"]) / IP(src=INET, dst=VIP) / \
            TCP(sport=43000, dport=80, flags="A", seq=101, ack=501)
        assert n.send(ack, "out0")[0] == Verdict.TX_NLB_IN
        stray = Ether(src=INET_MAC, dst=MAC["out0"]) / IP(src=INET, dst=NAT_IP) / \
            TCP(sport=80, dport=1, flags="A")
        assert n.send(stray, "out0")[0] == Verdict.DROP_NO_FLOW
        arp = Ether(src=INET_MAC, dst="ff:ff:ff:ff:ff:ff") / ARP(psrc=INET, pdst=NAT_IP)
        assert n.send(arp, "out0")[0] == Verdict.PASS_NON_IP
        yield n
    finally:
        if dp is not None:
            dp.close()
        stop_node(NAME)
        remove_pins(PIN_DIR)
        netns.remove(NAME)
        assert not os.path.exists(PIN_DIR) and not netns.exists(NAME)


def _fields(cls) -> list[tuple[str, int, int]]:
    """(name, offset, size) of the named members of a ctypes struct, padding left out
    (bcc and pinned.py name their padding differently)."""
    return [(n, getattr(cls, n).offset, ctypes.sizeof(t)) for n, t in cls._fields_
            if not n.startswith("_")]


def _entries(table, items) -> dict[bytes, bytes]:
    # bcc's batch read gives scalar keys as ints
    return {bytes(table.Key(k) if isinstance(k, int) else k): bytes(v) for k, v in items}


def test_pinned_maps_have_bccs_layouts_and_contents(node):
    """Every pinned map opened from its BTF has the layout bcc derives from the same C,
    and the same entries."""
    with PinnedNode(PIN_DIR) as maps:
        for name in pinned_map_names():
            mine, bccs = maps.table(name), node.dp.table(name)
            assert ctypes.sizeof(mine.Key) == ctypes.sizeof(bccs.Key), name
            assert ctypes.sizeof(mine.Leaf) == ctypes.sizeof(bccs.Leaf), name
            if hasattr(mine.Value, "_fields_"):
                bleaf = bccs.sLeaf if hasattr(bccs, "sLeaf") else bccs.Leaf
                assert _fields(mine.Value) == _fields(bleaf), name
            if name in ("flows", "listeners", "targets", "config", "verdicts", "gw_stats"):
                assert _entries(mine, mine.items()) == \
                    _entries(bccs, bccs.items_lookup_batch()), name
        maglev = node.dp.table("maglev")
        assert {maglev[maglev.Key(i)].value for i in range(SIZES.maglev_size)} == {0}, \
            "the Maglev row written through the pinned map is not the program's"


def _hpctl_without_bcc(tmp_path, *args) -> tuple[subprocess.CompletedProcess, float]:
    """Run hpctl in a fresh interpreter where `import bcc` fails."""
    shim = tmp_path / "no-bcc" / "bcc"
    shim.mkdir(parents=True, exist_ok=True)
    (shim / "__init__.py").write_text("raise ImportError('bcc is blocked in this test')\n")
    env = {**os.environ, "PYTHONPATH": f"{shim.parent}{os.pathsep}{ROOT}"}
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", "from hpctl.main import main; main()", *args],
                          env=env, capture_output=True, text=True, timeout=60)
    took = time.monotonic() - start
    print(f"hpctl {' '.join(args)}: {took:.3f} s")  # reported, not asserted
    return proc, took


def test_the_shim_blocks_bcc(tmp_path):
    shim = tmp_path / "no-bcc" / "bcc"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('bcc is blocked in this test')\n")
    proc = subprocess.run([sys.executable, "-c", "import bcc"], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(shim.parent)})
    assert proc.returncode != 0 and "blocked" in proc.stderr


def test_counters_without_bcc(node, tmp_path):
    proc, _ = _hpctl_without_bcc(tmp_path, "counters", "--node", NAME, "--json")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    assert got["verdicts"] == verdict_counts(node.dp)
    assert got["events"] == stat_counts(node.dp)
    v = got["verdicts"]
    assert (v["TX_NAT_OUT"], v["TX_NAT_IN"], v["TX_NLB_IN"], v["TX_NLB_OUT"]) == \
        (2 * NAT_CLIENTS, NAT_CLIENTS, 2, 1)
    assert (v["DROP_NO_FLOW"], v["PASS_NON_IP"], got["packets"]) == (1, 1, 3 * NAT_CLIENTS + 5)
    gw = got["gateways"]["gw-rd"]
    assert gw == gateway_metrics(node.dp, 0)
    assert gw["ActiveConnectionCount"] == NAT_CLIENTS
    assert gw["ConnectionAttemptCount"] == NAT_CLIENTS
    lb = got["load_balancers"]["0"]
    assert lb == load_balancer_metrics(node.dp)[0]
    assert (lb["NewFlowCount"], lb["ActiveFlowCount"]) == (1, 1)
    # refusals per resource (ours, not AWS's), from the data path's own counters
    gw_stats, lb_stats = node.dp.table("gw_stats"), node.dp.table("lb_stats")
    assert gw["FlowsRefusedCount"] == sum(c.flows_refused for c in gw_stats[gw_stats.Key(0)])
    assert lb["FlowsRefusedCount"] == sum(c.flows_refused for c in lb_stats[lb_stats.Key(0)])


_SAME = ("kind", "proto", "src", "sport", "dst", "dport", "new_src", "new_sport", "new_dst",
         "new_dport", "tcp_state", "resource", "target", "packets", "bytes", "live")


def test_flows_without_bcc(node, tmp_path):
    proc, _ = _hpctl_without_bcc(tmp_path, "flows", "--node", NAME, "--json")
    assert proc.returncode == 0, proc.stderr
    got = sorted(tuple(f[k] for k in _SAME) for f in json.loads(proc.stdout))
    want = sorted(tuple(getattr(f, k) for k in _SAME) for f in list_flows(node.dp))
    assert got == want
    kinds = [f[0] for f in got]
    assert (kinds.count("NAT_OUT"), kinds.count("NAT_IN")) == (NAT_CLIENTS, NAT_CLIENTS)
    assert (kinds.count("NLB_IN"), kinds.count("NLB_OUT")) == (1, 1)
    assert {f[0:3] for f in got if f[0] == "NAT_OUT"} == {("NAT_OUT", "tcp", CLIENT)}


def test_top_once_without_bcc(node, tmp_path):
    store = str(tmp_path / "store.json")   # an empty store: load balancers named by id
    proc, _ = _hpctl_without_bcc(tmp_path, "top", "--node", NAME, "--json", "--interval", "0.1",
                                 "--store", store)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    (row,) = got["nodes"]
    assert row["name"] == NAME and row["here"] and row["error"] is None
    resources = {r["resource"]: r for r in got["resources"]}
    assert resources["nat:gw-rd"]["active_flows"] == NAT_CLIENTS
    assert resources["lb:#0"]["active_flows"] == 1
    assert row["active_flows"] == NAT_CLIENTS + 1
    # the NAT clients' port reservations, read from nat_resv per destination
    assert sum(d["ports_used"] for d in got["destinations"]) == NAT_CLIENTS
    assert {d["gateway"] for d in got["destinations"]} == {"gw-rd"}
    proc, _ = _hpctl_without_bcc(tmp_path, "top", "--node", NAME, "--once", "--interval", "0.1",
                                 "--view", "resources", "--store", store)
    assert proc.returncode == 0, proc.stderr
    assert NAME in proc.stdout and "nat:gw-rd" in proc.stdout and "lb:#0" in proc.stdout


def test_pinned_map_reads_and_writes_agree_with_bcc(node, monkeypatch):
    """Batched reads across many small batches (and a hash bucket bigger than one), batch
    updates and deletes, clear(), per-CPU values and a map without batch operations (the
    LPM trie), each checked through bcc's view of the same map."""
    from hyperplane.datapath import pinned
    from hyperplane.codec import ip_to_be32
    monkeypatch.setattr(pinned, "BATCH_ENTRIES", 1)
    maps = PinnedNode(PIN_DIR)
    frags, bfrags = maps.table("frags"), node.dp.table("frags")
    packets, bpackets = maps.table("target_packets"), node.dp.table("target_packets")
    try:
        n = 300
        keys, values = (frags.Key * n)(), (frags.Leaf * n)()
        for i in range(n):
            keys[i].src_ip, keys[i].ip_id, keys[i].proto = i, i, 17
            values[i].resource = i
        frags.items_update_batch(keys, values)
        assert len(frags.items()) == n == len(list(bfrags.items_lookup_batch()))
        assert _entries(frags, frags.items()) == _entries(bfrags, bfrags.items_lookup_batch())
        assert frags[keys[7]].resource == 7 and keys[7] in frags
        frags.items_delete_batch((frags.Key * 10)(*keys[:10]))
        assert len(list(bfrags.items_lookup_batch())) == n - 10
        with pytest.raises(OSError):
            frags.items_delete_batch((frags.Key * 10)(*keys[:10]))
        assert frags.pop(keys[0], "gone") == "gone"
        with pytest.raises(KeyError):
            frags[keys[0]]
        frags.clear()
        assert not list(bfrags.items_lookup_batch())

        cpus = packets.total_cpu
        packets[3] = packets.Leaf(*range(1, cpus + 1))
        assert int(sum(bpackets[bpackets.Key(3)])) == packets.sum(3) == cpus * (cpus + 1) // 2
        with pytest.raises(IndexError):
            packets[packets.max_entries]
        packets.clear()
        assert packets.sum(3) == 0

        inside = maps.table("inside_nets")  # LPM trie: get_next_key and lookups
        assert [(k.prefixlen, k.addr, v.value) for k, v in inside.items()] == \
            [(24, ip_to_be32("10.10.0.0"), 0)]
    finally:
        frags.clear()
        packets.clear()
        maps.close()


def test_events_read_from_the_pinned_ring(node):
    """The agent reads a node's events from the pinned ring (PinnedNode.ring_fd): the
    mapped reader finds the fixture's confirmed connections, then libbpf's reader the
    next flow's creation, and neither hands on an event twice."""
    from hyperplane.datapath.verdicts import FlowEventType, FlowKind
    from hyperplane.observe.events import EventRing, decode
    with PinnedNode(PIN_DIR) as pinned:
        mapped = EventRing(pinned, mapped=True)
        try:
            got = [decode(raw) for raw in mapped.read().records()]
            assert not mapped.read().count
        finally:
            mapped.close()
        confirmed = sorted((ev.record.kind, ev.record.sport) for ev in got
                           if ev.type == FlowEventType.FLOW_CONFIRMED)
        assert confirmed == sorted([(FlowKind.NAT_OUT, 42000 + i) for i in range(NAT_CLIENTS)]
                                   + [(FlowKind.NLB_IN, 43000)]), got
        libbpf = EventRing(pinned, mapped=False)
        syn = Ether(src=CLIENT_MAC, dst=MAC["in0"]) / IP(src=CLIENT, dst=INET) / \
            TCP(sport=44000, dport=80, flags="S", seq=100)
        assert node.send(syn, "in0")[0] == Verdict.TX_NAT_OUT
        got = [decode(raw) for raw in libbpf.read().records()]
        assert [(ev.type, ev.record.sport) for ev in got] == \
            [(FlowEventType.FLOW_CREATED, 44000)], got
        assert not libbpf.read().count
