"""The multi-node lab (4 nodes, mode kernel: the nodes only forward) and its fabric: the
routers spread each resource's flows over its shard's nodes (ECMP on the 5-tuple,
resilient nexthop groups), the forward and reply packets of a flow pick their nodes
independently, set_shard moves only the changed members' buckets, a cut node's flows go
to the survivors (and what the kernel does with the groups is measured), restore brings
it back, neighbours are learned by ARP, status reads it all back, down leaves nothing.

Which node carried a flow, per direction, is recorded without tcpdump or conntrack: each
node gets a small nftables table (the test's instrumentation, not the lab's) whose forward
hook adds the client's source port of every packet it forwards to one dynamic set per
direction (in0 -> out0: toward the server; out0 -> in0: the reply). Each test uses its own
range of client ports, so the sets tell every flow's two nodes apart.

Every loop is bounded in count and time; all traffic stays inside the lab's namespaces.
"""
from __future__ import annotations

import ipaddress
import json
import os
import selectors
import socket
import subprocess
import sys
import threading
import time

import pytest

from hyperplane import lab, netns
from hyperplane.errors import ConfigError
from hyperplane.lab import fleet_build, fleet_plan
from hyperplane.lab.fabric import Fabric, state_path

from lab_harness import lab_prefix, require_root

pytestmark = pytest.mark.lab

NODES = 4
NAT, NLB = fleet_plan.NAT_GATEWAY, lab.LB_NAME
CLIENT = lab.CLIENT_IPS[0]
SERVER = (lab.INET_IPS[0], 7000)
PATHS_TABLE = "hpt_paths"
LAB_CLI = [sys.executable, "-c",
           "import sys; from hpctl.lab import command; "
           "command.main(sys.argv[1:], prog_name='hpctl lab')"]
NUD_NOARP, NUD_PERMANENT = 0x40, 0x80


# --- traffic ------------------------------------------------------------------------------

class EchoServer:
    """A TCP echo server in a namespace (one thread, selectors): echoes what it reads,
    closes on EOF, stops with the `with` block. Serves short and long-lived connections."""

    def __init__(self, ns: str, addr: tuple[str, int]):
        self.lsock = netns.socket_in(ns)
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(addr)
        self.lsock.listen(1024)
        self.lsock.setblocking(False)
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join(5)

    def _run(self):
        sel = selectors.DefaultSelector()
        sel.register(self.lsock, selectors.EVENT_READ)
        while not self._stop.is_set():
            for key, _ in sel.select(0.1):
                if key.fileobj is self.lsock:
                    try:
                        conn, _ = self.lsock.accept()
                    except (BlockingIOError, InterruptedError):
                        continue
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ)
                    continue
                conn = key.fileobj
                try:
                    data = conn.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if data:
                    conn.setblocking(True)
                    conn.sendall(data)
                    conn.setblocking(False)
                else:
                    sel.unregister(conn)
                    conn.close()
        for key in list(sel.get_map().values()):
            key.fileobj.close()
        sel.close()


def echo(sock: socket.socket, size: int = 32) -> bool:
    msg = bytes(range(size))
    sock.sendall(msg)
    got = b""
    while len(got) < size:
        chunk = sock.recv(size - len(got))
        if not chunk:
            return False
        got += chunk
    return got == msg


def open_flow(ns: str, port: int) -> socket.socket:
    """A TCP connection from CLIENT:port to the server, answered once."""
    s = netns.socket_in(ns)
    s.settimeout(3)
    s.bind((CLIENT, port))
    s.connect(SERVER)
    assert echo(s), f"no echo on the flow from port {port}"
    return s


def connect_many(ns: str, ports: range, budget_s: float = 30.0) -> int:
    """One short connection (connect, echo, close) from each client port, one after the
    other; returns how many completed. Stops at the time budget."""
    ok = 0
    deadline = time.monotonic() + budget_s
    for s, port in zip(netns.sockets_in(ns, len(ports)), ports):
        with s:
            if time.monotonic() > deadline:
                continue
            s.settimeout(3)
            try:
                s.bind((CLIENT, port))
                s.connect(SERVER)
                ok += echo(s)
            except OSError:
                pass
    return ok


# --- the lab ------------------------------------------------------------------------------

class Fleet:
    def __init__(self, cfg: lab.LabConfig):
        self.cfg = cfg
        self.ns = fleet_plan.namespaces(cfg)
        self.fabric = Fabric(cfg)
        self.nodes = list(range(1, cfg.nodes + 1))

    def node_ns(self, i: int) -> str:
        return self.ns[f"node{i}"]

    def counters(self) -> dict[int, dict[str, int]]:
        """Per node: packets received on in0 (toward the internet) and out0 (replies), and
        packets its kernel forwarded; a cut node's links count 0."""
        out = {}
        for i in self.nodes:
            rx = {l["ifname"]: l["rx_packets"] for l in netns.links(self.node_ns(i))}
            out[i] = {"in0": rx.get("in0", 0), "out0": rx.get("out0", 0),
                      "forward": fleet_build.forward_packets(self.cfg, i)}
        return out

    def wait_balanced(self, resource: str, timeout: float = 8.0) -> dict:
        """Wait until both routers' groups give each member its fair share of buckets (a
        new or restored member takes buckets once they are idle: RESILIENT idle_timer)."""
        deadline = time.monotonic() + timeout
        while True:
            groups = {r: self.fabric.group(r, resource) for r in fleet_plan.ROUTERS}
            fair = fleet_plan.RESILIENT["buckets"] / max(1, len(groups["rin"]["members"]))
            if all(abs(n - fair) < 1 for g in groups.values() for n in g["buckets"].values()):
                return groups
            if time.monotonic() > deadline:
                raise TimeoutError(f"groups of {resource} not balanced after {timeout}s: "
                                   f"{groups}")
            time.sleep(0.2)

    def reset(self) -> None:
        """The lab as `up` left it: no node cut, the first shards, balanced groups."""
        for i in self.fabric.cut_nodes():
            self.fabric.restore(i)
        for resource, members in fleet_plan.first_shards(self.cfg).items():
            self.fabric.set_shard(resource, members)
            self.wait_balanced(resource)


class PathRecorder:
    """Per node, the client ports of the flows it forwarded, per direction (see the
    module's doc)."""

    def __init__(self, fleet: Fleet, ports: range):
        self.fleet = fleet
        lo, hi = ports.start, ports.stop - 1
        self.ruleset = f"""table ip {PATHS_TABLE} {{
  set toward {{ type inet_service; flags dynamic; size 65536; }}
  set back {{ type inet_service; flags dynamic; size 65536; }}
  chain forward {{
    type filter hook forward priority filter - 1; policy accept;
    iifname "in0" ip saddr {CLIENT} tcp sport {lo}-{hi} add @toward {{ tcp sport }}
    iifname "out0" ip daddr {CLIENT} tcp dport {lo}-{hi} add @back {{ tcp dport }}
  }}
}}
"""

    def __enter__(self):
        for i in self.fleet.nodes:
            netns.nft_load(self.fleet.node_ns(i), self.ruleset)
        return self

    def __exit__(self, *exc):
        for i in self.fleet.nodes:
            netns.run_in(self.fleet.node_ns(i), ["nft", "delete", "table", "ip", PATHS_TABLE],
                         check=False, capture_output=True)

    def _ports(self, i: int, which: str) -> set[int]:
        data = netns.nft_json(self.fleet.node_ns(i), "list", "set", "ip", PATHS_TABLE, which)
        for item in data.get("nftables", []):
            if "set" in item:
                return set(item["set"].get("elem", []))
        return set()

    def paths(self) -> dict[int, tuple[list[int], list[int]]]:
        """Client port -> (nodes that forwarded it toward the server, nodes that forwarded
        the replies)."""
        out: dict[int, tuple[list[int], list[int]]] = {}
        for i in self.fleet.nodes:
            for k, which in enumerate(("toward", "back")):
                for port in self._ports(i, which):
                    out.setdefault(port, ([], []))[k].append(i)
        return out


@pytest.fixture(scope="module")
def fleet(request):
    require_root()
    cfg = lab.LabConfig(prefix=lab_prefix("m"), mode="kernel", nodes=NODES)
    lab.down(cfg)                       # leftovers of a killed run with the same pid
    request.addfinalizer(lambda: lab.down(cfg))
    t0 = time.monotonic()
    lab.up(cfg)
    print(f"\n4-node lab up in {time.monotonic() - t0:.1f} s")
    the_fleet = Fleet(cfg)
    server = EchoServer(the_fleet.ns["inet"], SERVER).__enter__()
    request.addfinalizer(lambda: server.__exit__(None, None, None))
    return the_fleet


@pytest.fixture(autouse=True)
def _from_the_first_shards(fleet):
    fleet.reset()
    yield


# --- the tests ----------------------------------------------------------------------------

def test_ecmp_spreads_the_nat_gateways_flows_over_its_shard_only(fleet):
    shard = fleet.fabric.shards()[NAT]
    others = [i for i in fleet.nodes if i not in shard]
    assert shard == [1, 2, 3] and others == [4]
    c0 = fleet.counters()
    ok = connect_many(fleet.ns["client"], range(41000, 41200))
    c1 = fleet.counters()
    assert ok == 200
    d = {i: {k: c1[i][k] - c0[i][k] for k in c0[i]} for i in fleet.nodes}
    toward = sum(d[i]["in0"] for i in shard)
    assert toward >= 200 * 4                 # SYN, ACK, data, FIN(, ACK) of every flow
    for i in shard:
        # each member carries its share (1/3 expected; 15 % leaves room for chance)
        assert d[i]["in0"] >= 0.15 * toward, d
        assert d[i]["out0"] > 0 and d[i]["forward"] > 0, d
    for i in others:
        # nothing forwarded; at most an ARP probe of a neighbour entry an earlier test used
        assert d[i]["forward"] == 0 and d[i]["in0"] <= 2 and d[i]["out0"] <= 2, d


def test_forward_and_reply_of_a_flow_cross_different_nodes(fleet):
    ports = range(41200, 41400)
    with PathRecorder(fleet, ports) as rec:
        ok = connect_many(fleet.ns["client"], ports)
        paths = rec.paths()
    assert ok == 200 and sorted(paths) == list(ports)
    shard = fleet.fabric.shards()[NAT]
    differ = 0
    for port, (toward, back) in paths.items():
        # per flow, one node each way (ECMP keeps a flow on its bucket), both in the shard
        assert len(toward) == 1 and len(back) == 1, (port, toward, back)
        assert toward[0] in shard and back[0] in shard, (port, toward, back)
        differ += toward != back
    # the two routers hash independently: with 3 nodes 2/3 of the flows are expected to
    # come back through another node than they left by (0 if the paths were symmetric)
    print(f"\n{differ} of 200 flows: reply through another node than the forward direction")
    assert differ >= 0.4 * 200


def test_set_shard_moves_only_the_changed_members_buckets(fleet):
    """Replacing node 1 (the group's first member) by node 4 moves exactly node 1's
    buckets, all to node 4 (written in node order, 2/3/4, the kernel's by-position shares
    would also move one of node 3's); growing the shard moves buckets only to the new
    member."""
    f = fleet.fabric
    before = {r: f.buckets(r, NAT) for r in fleet_plan.ROUTERS}
    assert all(sorted(set(b)) == [1, 2, 3] for b in before.values())
    assert f.set_shard(NAT, [2, 3, 4]) == [2, 3, 4]
    replaced = {r: f.buckets(r, NAT) for r in fleet_plan.ROUTERS}
    time.sleep(2 * fleet_plan.RESILIENT["idle_timer"])   # idle buckets could move now
    for r in fleet_plan.ROUTERS:
        assert f.buckets(r, NAT) == replaced[r], f"{r}: buckets moved after the replace"
        moved = [k for k, (a, b) in enumerate(zip(before[r], replaced[r])) if a != b]
        assert moved == [k for k, a in enumerate(before[r]) if a == 1], r
        assert all(replaced[r][k] == 4 for k in moved), r
        print(f"\n{r}: replacing node 1 by 4 moved {len(moved)} of "
              f"{len(before[r])} buckets (all of node 1's, no other)")
    c0 = fleet.counters()
    assert connect_many(fleet.ns["client"], range(41400, 41450)) == 50
    c1 = fleet.counters()
    assert c1[1]["forward"] == c0[1]["forward"] and c1[4]["in0"] > c0[4]["in0"]
    # grow to 4 nodes: node 1 takes idle buckets from the others; none moves between them
    assert f.set_shard(NAT, [1, 2, 3, 4]) == [1, 2, 3, 4]
    grown = fleet.wait_balanced(NAT)
    for r in fleet_plan.ROUTERS:
        after = f.buckets(r, NAT)
        moved = [k for k, (a, b) in enumerate(zip(replaced[r], after)) if a != b]
        assert all(after[k] == 1 for k in moved), r
        assert len(moved) == grown[r]["buckets"][1] == fleet_plan.RESILIENT["buckets"] // 4


def test_cut_moves_a_dead_nodes_flows_to_the_survivors_then_restore(fleet):
    """Measures what the kernel does with the groups when a node's links go, then shows
    mode kernel's floor: new connections all succeed right after the cut, and a
    long-lived flow through the dead node goes on through a survivor (the nodes keep no
    state); restore brings the node back into its groups and it carries flows again."""
    f = fleet.fabric
    shard = f.shards()[NAT]
    with PathRecorder(fleet, range(41500, 41800)) as rec:
        long_lived = open_flow(fleet.ns["client"], 41799)
        try:
            victim = rec.paths()[41799][0][0]
            assert victim in shard
            before = {r: f.buckets(r, NAT) for r in fleet_plan.ROUTERS}
            nlb_before = {r: f.buckets(r, NLB) for r in fleet_plan.ROUTERS}
            t0 = time.monotonic()
            f.cut(victim)
            # what the kernel did, read back: the dead node's nexthop is gone, its buckets
            # went to the survivors, and every survivor kept every bucket it had
            for r in fleet_plan.ROUTERS:
                view = f.read_back()[r]
                assert victim not in [nh["node"] for nh in view["nexthops"]], r
                for resource, was in ((NAT, before[r]), (NLB, nlb_before[r])):
                    now = f.buckets(r, resource)
                    assert victim not in now and len(now) == len(was), (r, resource)
                    assert all(b == a for a, b in zip(was, now) if a != victim), (r, resource)
                assert f.group(r, NAT)["members"] == [i for i in shard if i != victim]
            assert f.members(NAT) == [i for i in shard if i != victim]
            ok = connect_many(fleet.ns["client"], range(41500, 41600))
            took = time.monotonic() - t0
            assert ok == 100, f"{ok} of 100 new connections right after the cut"
            print(f"\nnode {victim} cut: 100 of 100 new connections in {took:.2f} s after it")
            assert echo(long_lived), "the long-lived flow did not survive the cut"
            after_cut = [p for port, p in rec.paths().items() if port < 41600]
            assert len(after_cut) == 100
            assert all(victim not in toward + back for toward, back in after_cut)
            st = lab.status(fleet.cfg)
            assert [n["state"] for n in st["nodes"]] == \
                ["cut" if n["index"] == victim else "up" for n in st["nodes"]]
            assert st["cut"] == [victim] and st["shards"][NAT] == shard

            f.restore(victim)
            assert f.members(NAT) == shard
            assert (victim in f.members(NLB)) == (victim in f.shards()[NLB])
            fleet.wait_balanced(NAT)
            st = lab.status(fleet.cfg)
            assert all(n["state"] == "up" for n in st["nodes"]) and st["cut"] == []
            c0 = fleet.counters()
            assert connect_many(fleet.ns["client"], range(41600, 41700)) == 100
            c1 = fleet.counters()
            assert c1[victim]["in0"] > c0[victim]["in0"], "the restored node carries no flow"
            assert echo(long_lived)
        finally:
            long_lived.close()


def test_the_controller_puts_back_a_member_the_routers_lost_by_themselves(fleet):
    """The controller compares the store with what the routers' kernels steer, not with
    what it set last. A router's kernel deletes a nexthop, and takes it out of its
    groups, when the device toward the node goes down (or loses carrier); the
    controller's next read puts the node back, though the store did not change."""
    from hyperplane.lab.controller import Controller
    cfg = fleet.cfg
    shard = fleet_plan.first_shards(cfg)[NAT]
    names = [fleet_plan.node_name(cfg, i) for i in shard]
    listing = {"/shards": {"shards": {f"nat:{NAT}": names}},
               **{f"/nodes/{n}": {"name": n, "ready": True} for n in names}}
    ctl = Controller(cfg, "unused:the listing is given")
    ctl.reconcile(listing)
    assert fleet.fabric.members(NAT) == shard
    lost = shard[-1]
    for router in fleet_plan.ROUTERS:       # the device toward node `lost` goes down and up
        dev = fleet.fabric.steering[router]["nexthops"][lost - 1]["dev"]
        netns.run_in(fleet.ns[router], ["ip", "link", "set", dev, "down"], check=True)
        netns.run_in(fleet.ns[router], ["ip", "link", "set", dev, "up"], check=True)
    assert fleet.fabric.members(NAT) == shard[:-1], "the kernel kept the nexthop"
    ctl.reconcile(listing)               # the same store content, read again
    assert fleet.fabric.members(NAT) == shard
    assert connect_many(fleet.ns["client"], range(42000, 42050)) == 50


def test_a_group_that_loses_its_last_member_comes_back_on_restore(fleet):
    """The kernel deletes a group whose last nexthop goes, and the routes using it with
    it; restore makes both again."""
    f = fleet.fabric
    vip = f"{lab.FLEET_VIP}/32"

    def vip_routes():
        return [r for r in f.read_back()["rout"]["routes"] if r["dst"] in (vip, lab.FLEET_VIP)]

    assert f.set_shard(NLB, [4]) == [4]
    assert vip_routes()
    f.cut(4)
    assert not f.group("rout", NLB)["present"] and not f.group("rin", NLB)["present"]
    assert vip_routes() == []
    f.restore(4)
    assert f.members(NLB) == [4] and vip_routes()
    r = netns.run_in(fleet.ns["inet"], ["ping", "-c", "1", "-W", "2", lab.FLEET_VIP],
                     check=False, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_sync_network_carries_jumbo_frames_between_nodes(fleet):
    for i in (2, NODES):
        r = netns.run_in(fleet.node_ns(1), ["ping", "-c", "1", "-W", "2", "-M", "do", "-s",
                                            str(fleet_plan.SYNC_MTU - 28),
                                            fleet_plan.sync_ip(i)],
                         check=False, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr


def test_status_json_reads_the_fleet_back(fleet):
    r = subprocess.run(LAB_CLI + ["status", "--prefix", fleet.cfg.prefix, "--json"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    st = json.loads(r.stdout)
    assert st["up"] and st["mode"] == "kernel" and st["node_count"] == NODES
    assert sorted(st["namespaces_present"]) == sorted(fleet.ns.values())
    assert [(n["name"], n["state"]) for n in st["nodes"]] == \
        [(f"node{i}", "up") for i in fleet.nodes]
    for n in st["nodes"]:
        i = n["index"]
        assert n["addresses"]["in0"] == [f"10.254.{i}.2/24"]
        assert n["addresses"]["out0"] == [f"198.19.{i}.2/24"]
        assert n["addresses"]["sync0"] == [f"{fleet_plan.sync_ip(i)}/24"]
        assert f"{lab.FLEET_VIP}/32" in n["addresses"]["lo"]
    assert st["shards"] == {NAT: [1, 2, 3], NLB: [2, 3, 4]} and st["cut"] == []
    for router in fleet_plan.ROUTERS:
        groups = st["routers"][router]["groups"]
        for resource, members in st["shards"].items():
            g = groups[resource]
            assert g["present"] and g["type"] == "resilient" and g["members"] == members
            assert sum(g["buckets"].values()) == fleet_plan.RESILIENT["buckets"]
        assert [nh["node"] for nh in st["routers"][router]["nexthops"]] == fleet.nodes
    assert len(st["routers"]["rin"]["rules"]) == 2
    assert st["sync"]["ports"] == [f"to-node{i}" for i in fleet.nodes]
    sync_mtus = {i["mtu"] for i in st["interfaces"]
                 if i["ifname"] == "sync0" or i["role"] == "sync"}
    assert sync_mtus == {fleet_plan.SYNC_MTU}
    assert st["addresses"]["nat_ip"] == lab.FLEET_NAT_IP and \
        st["addresses"]["vip"] == lab.FLEET_VIP
    # exec reaches the fleet's own roles
    r = subprocess.run(LAB_CLI + ["exec", "--prefix", fleet.cfg.prefix, "rout", "--", "cat",
                                  "/proc/sys/net/ipv4/fib_multipath_hash_policy"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.strip() == "1", r


def test_neighbours_are_resolved_by_arp_everywhere(fleet):
    """After the traffic above: no namespace holds a static neighbour (PERMANENT, or NOARP
    for a unicast address: the kernel's own NOARP entries map multicast addresses, e.g. the
    sync bridge's IGMP group, which no ARP resolves), and the routers learned the nodes
    they steer to."""
    assert connect_many(fleet.ns["client"], range(41900, 41950)) == 50
    for name in fleet.ns.values():
        static = [n for n in netns.neighbours(name) if n["state"] & NUD_PERMANENT or
                  (n["state"] & NUD_NOARP and not ipaddress.ip_address(n["dst"]).is_multicast)]
        assert not static, (name, static)
    learned = {n["dst"] for n in netns.neighbours(fleet.ns["rin"])}
    assert {fleet_plan.inside_link(i)["node"] for i in fleet.fabric.shards()[NAT]} <= learned
    assert lab.CLIENT_IPS[0] in learned


def test_up_refuses_other_modes_and_down_leaves_nothing_even_after_a_failed_up(monkeypatch):
    cfg = lab.LabConfig(prefix=lab_prefix("w"), mode="kernel", nodes=2)
    with pytest.raises(ConfigError, match="the multi-node lab runs mode xdp or kernel"):
        lab.up(lab.LabConfig(prefix=cfg.prefix, mode="nft", nodes=2))
    assert lab.present(cfg.prefix) == []

    def broken(cfg, topo, i):
        raise RuntimeError("injected failure")

    monkeypatch.setattr(fleet_build, "start_node", broken)
    try:
        with pytest.raises(RuntimeError, match="injected"):
            lab.up(cfg)
        assert lab.present(cfg.prefix) == []
        monkeypatch.undo()
        lab.up(cfg)
        assert len(lab.present(cfg.prefix)) == len(fleet_plan.namespaces(cfg))
        res = lab.down(cfg)
        assert sorted(res["removed"]) == sorted(fleet_plan.namespaces(cfg).values())
        assert not res["warnings"]
    finally:
        lab.down(cfg)
    assert lab.present(cfg.prefix) == []
    assert not any(n.startswith(f"{cfg.prefix}-") for n in netns.list_namespaces())
    assert not os.path.exists(state_path(cfg.prefix))
