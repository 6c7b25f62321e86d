"""hpctl nodes / shards / fleet status over the store (file and etcd: the `store` fixture),
the --shard-size of `lb create` and `nat up` written to /nlb and /nat with shards assigned,
and the nodes column of `hpctl flows`. The fleet's keys are written by hand here, as the
agents would write them."""
import ctypes
import json
import socket
from itertools import combinations
from math import comb

import pytest

from cli_runner import hpctl
from hpctl.exit import Exit
from hyperplane.errors import ConfigError, NotFound
from hyperplane.fleet import cluster
from hyperplane.fleet.cluster import Member
from hyperplane.fleet.shards import ShuffleSharder, overlap_counts, overlap_probabilities
from hyperplane.fleet.store import NLB_KEY
from hyperplane.nat.gateway import GatewayConfig
from hyperplane.node import status as status_mod
from hyperplane.node import lifecycle as node_mod


def one_sentence(err: str) -> bool:
    lines = err.strip().splitlines()
    return len(lines) == 1 and lines[0].startswith("hpctl: ")


@pytest.fixture(autouse=True)
def no_nodes_here(tmp_path, monkeypatch):
    """No node runs on this host unless a test says so (lb create checks the ones here)."""
    monkeypatch.setattr(node_mod, "NODE_STATE_DIR", str(tmp_path / "nodes"))


def member(name, node_id, ready=True, epoch=100):
    return Member(name, node_id, f"10.99.0.{node_id + 1}", f"02:00:00:00:00:{node_id:02x}",
                  epoch, ready).to_dict()


def write_fleet(store, names, live, shards, *, bound=None, sizes=None, lease=None):
    """/node-ids for names, /nodes/<n> for the live ones, /shards as given."""
    store.put(cluster.NODE_IDS_KEY, {n: i for i, n in enumerate(names)})
    for n in live:
        store.put(cluster.NODES_PREFIX + n, member(n, names.index(n), ready=n != "n2"),
                  lease=lease)
    sh = ShuffleSharder(names, shards, bound=bound, sizes=sizes)
    store.put(cluster.SHARDS_KEY, sh.to_dict())
    return sh


FLEET = {"nat:gw": ["n1", "n2", "n3"], "lb:web": ["n2", "n3", "n4"], "lb:api": ["n1", "n4"]}
NAMES = ["n1", "n2", "n3", "n4", "n5"]


# --- hpctl nodes ---------------------------------------------------------------------------

def test_nodes_lists_every_named_node_live_or_not(store):
    write_fleet(store, NAMES, ["n1", "n2"], FLEET)
    code, out, _ = hpctl("nodes", "--store", store.url, "--json")
    assert code == Exit.OK
    rows = json.loads(out)
    assert [r["name"] for r in rows] == NAMES and [r["id"] for r in rows] == [0, 1, 2, 3, 4]
    by = {r["name"]: r for r in rows}
    assert by["n1"]["live"] and by["n1"]["ready"] and by["n1"]["sync_ip"] == "10.99.0.1"
    assert by["n1"]["mac"] == "02:00:00:00:00:00" and by["n1"]["epoch"] == 100
    assert by["n2"]["live"] and not by["n2"]["ready"]
    assert not by["n3"]["live"] and by["n3"]["sync_ip"] is None and by["n3"]["epoch"] is None
    assert by["n1"]["resources"] == ["lb:api", "nat:gw"]
    assert by["n4"]["resources"] == ["lb:api", "lb:web"]
    assert by["n5"]["resources"] == []
    code, out, _ = hpctl("nodes", "--store", store.url)
    assert code == Exit.OK and "2 live of 5 nodes" in out
    assert "10.99.0.2" in out and "lb:api, lb:web" in out


def test_nodes_of_an_empty_store(store):
    code, out, _ = hpctl("nodes", "--store", store.url, "--json")
    assert code == Exit.OK and json.loads(out) == []


def test_remove_is_refused_while_the_node_is_live(store):
    write_fleet(store, NAMES, ["n1", "n2"], FLEET)
    before = store.get(cluster.SHARDS_KEY).value
    code, out, err = hpctl("nodes", "remove", "n2", "--store", store.url)
    assert code == Exit.USAGE and "node n2 is live" in err and one_sentence(err), err
    assert out == ""
    assert store.get(cluster.SHARDS_KEY).value == before
    assert "n2" in store.get(cluster.NODE_IDS_KEY).value


def test_remove_an_unknown_node_is_not_found(store):
    write_fleet(store, NAMES, [], FLEET)
    code, _, err = hpctl("nodes", "remove", "n9", "--store", store.url)
    assert code == Exit.NOT_FOUND and "no node 'n9'" in err and one_sentence(err)


def test_remove_frees_the_id_and_refills_each_shard_that_had_the_node(store):
    write_fleet(store, NAMES, ["n1", "n2"], FLEET)
    # the group's --store is the subcommand's too
    code, out, err = hpctl("nodes", "--store", store.url, "remove", "n4", "--json")
    assert code == Exit.OK, err
    moved = json.loads(out)
    assert moved["node"] == "n4" and moved["id"] == 3
    assert set(moved["shards"]) == {"lb:web", "lb:api"}
    after = store.get(cluster.SHARDS_KEY).value
    assert "n4" not in after["nodes"]
    assert "n4" not in store.get(cluster.NODE_IDS_KEY).value
    for resource, m in moved["shards"].items():
        assert m["removed"] == "n4" and len(m["added"]) == 1 and m["short"] == 0
        old = set(FLEET[resource])
        assert set(after["shards"][resource]) == old - {"n4"} | set(m["added"])
    assert after["shards"]["nat:gw"] == FLEET["nat:gw"]      # nothing else moved
    # human form: what moved, on stdout (n1's lease ran out: not live any more)
    store.delete(cluster.NODES_PREFIX + "n1")
    write_fleet(store, NAMES, [], FLEET)
    code, out, err = hpctl("nodes", "remove", "n1", "--store", store.url)
    assert code == Exit.OK
    lines = sorted(out.strip().splitlines())
    assert [l.split(": ")[0] for l in lines] == ["lb:api", "nat:gw"]
    assert all("-n1 +" in l for l in lines) and "node n1 removed (id 0 is free)" in err


def test_remove_leaves_a_shard_short_when_no_node_fits(store):
    write_fleet(store, ["n1", "n2", "n3"], [], {"nat:gw": ["n1", "n2", "n3"]})
    code, out, _ = hpctl("nodes", "remove", "n3", "--store", store.url, "--json")
    assert code == Exit.OK
    assert json.loads(out)["shards"] == {"nat:gw": {"removed": "n3", "added": [], "short": 1}}
    value = store.get(cluster.SHARDS_KEY).value
    assert value["shards"]["nat:gw"] == ["n1", "n2"] and value["sizes"]["nat:gw"] == 3


# --- hpctl shards ----------------------------------------------------------------------------

def test_shards_show_nodes_live_marks_sizes_and_the_bound(store):
    write_fleet(store, NAMES, ["n1", "n2"], FLEET, sizes={"lb:api": 3})
    store.put(cluster.NAT_KEY, {"gateways": [{"name": "gw", "shard_size": 3},
                                             {"name": "new"}]})
    code, out, _ = hpctl("shards", "--store", store.url, "--json")
    assert code == Exit.OK
    data = json.loads(out)
    assert data["nodes"] == NAMES and data["live"] == ["n1", "n2"] and data["bound"] is None
    assert data["resources"]["nat:gw"] == {"nodes": ["n1", "n2", "n3"], "live": ["n1", "n2"],
                                           "size": 3, "short": 0, "shard_size_asked": 3}
    assert data["resources"]["lb:api"]["short"] == 1
    assert data["resources"]["lb:web"]["live"] == ["n2"]
    assert data["unassigned"] == ["nat:new"]
    assert data["loads"] == {"n1": 2, "n2": 2, "n3": 2, "n4": 2, "n5": 0}
    code, out, _ = hpctl("shards", "--store", store.url)
    assert code == Exit.OK and "n1* n2* n3" in out and "no overlap bound" in out
    assert "no shard yet: nat:new" in out


def pairwise(shards):
    """The overlap distribution the slow way: every pair compared."""
    largest = max(len(s) for s in shards)
    counts = [0] * (largest + 1)
    for a, b in combinations(shards, 2):
        counts[len(set(a) & set(b))] += 1
    return counts


def test_overlap_distribution_next_to_the_hypergeometric(store):
    names = [f"n{i}" for i in range(8)]
    sh = ShuffleSharder(names, seed=7)
    for r in range(30):
        sh.assign(f"lb:r{r}", 3)
    write_fleet(store, names, [], sh.shards)
    code, out, _ = hpctl("shards", "--store", store.url, "--json")
    assert code == Exit.OK
    o = json.loads(out)["overlap"]
    assert o["pairs"] == comb(30, 2) and o["nodes"] == 8 and o["shard_size"] == 3
    assert o["counts"] == pairwise(list(sh.shards.values())) == overlap_counts(sh.shards)
    assert sum(o["counts"]) == comb(30, 2)
    # the exact hypergeometric: C(3,j) C(5,3-j) / C(8,3) = 10, 30, 15, 1 of 56
    assert o["expected"] == pytest.approx([10 / 56, 30 / 56, 15 / 56, 1 / 56])
    assert o["expected"] == pytest.approx(overlap_probabilities(8, 3))
    assert o["expected_pairs"] == pytest.approx([p * 435 for p in overlap_probabilities(8, 3)])
    assert o["observed"] == pytest.approx([c / 435 for c in o["counts"]])
    code, out, _ = hpctl("shards", "--store", store.url)
    assert "435 pairs" in out and "17.9%" in out and "53.6%" in out and "1.8%" in out


def test_overlap_of_shards_of_different_sizes_sums_over_their_pairs(store):
    shards = {"a": ["n0", "n1"], "b": ["n1", "n2", "n3"], "c": ["n0", "n2", "n3"],
              "d": ["n3"]}
    write_fleet(store, ["n0", "n1", "n2", "n3"], [], shards)
    o = json.loads(hpctl("shards", "--store", store.url, "--json")[1])["overlap"]
    assert o["counts"] == pairwise(list(shards.values())) == [1, 4, 1, 0]
    n = 4
    pairs = [(2, 3), (2, 3), (2, 1), (3, 3), (3, 1), (3, 1)]
    want = [0.0] * 4
    for a, b in pairs:
        for j, p in enumerate(overlap_probabilities(n, a, b)):
            want[j] += p
    assert o["expected_pairs"] == pytest.approx(want)
    assert sum(o["expected_pairs"]) == pytest.approx(6)
    assert o["shard_sizes"] == {"1": 1, "2": 1, "3": 2}


def test_shards_of_an_empty_store(store):
    code, out, _ = hpctl("shards", "--store", store.url, "--json")
    assert code == Exit.OK
    data = json.loads(out)
    assert data["resources"] == {} and data["overlap"]["pairs"] == 0


def test_the_bound_and_its_capacity_limit_are_shown(store):
    write_fleet(store, [f"n{i}" for i in range(7)], [], {"a": ["n0", "n1", "n2"]}, bound=1)
    data = json.loads(hpctl("shards", "--store", store.url, "--json")[1])
    assert data["bound"] == 1 and data["capacity_limit"] == 7      # C(7,2)/C(3,2)
    out = hpctl("shards", "--store", store.url)[1]
    assert "bound 1" in out and "C(7,2)/C(3,2) = 7" in out


def test_rebalance_moves_members_from_heavy_to_light_nodes(store):
    shards = {"a": ["n1", "n2"], "b": ["n1", "n2"], "c": ["n1", "n3"], "d": ["n1", "n2"]}
    write_fleet(store, ["n1", "n2", "n3", "n4"], [], shards)
    code, out, _ = hpctl("shards", "rebalance", "--store", store.url, "--max-moves", "1",
                         "--json")
    assert code == Exit.OK
    moves = json.loads(out)
    assert len(moves) == 1 and moves[0]["from"] == "n1" and moves[0]["to"] == "n4"
    after = store.get(cluster.SHARDS_KEY).value["shards"]
    r = moves[0]["resource"]
    assert after[r] == sorted(set(shards[r]) - {"n1"} | {"n4"})
    code, out, err = hpctl("shards", "--store", store.url, "rebalance")
    assert code == Exit.OK
    lines = out.strip().splitlines()
    assert lines and all(" -> " in l for l in lines) and f"{len(lines)} move(s)" in err
    loads = ShuffleSharder.from_dict(store.get(cluster.SHARDS_KEY).value).loads()
    assert max(loads.values()) - min(loads.values()) <= 1
    code, out, err = hpctl("shards", "rebalance", "--store", store.url)
    assert code == Exit.OK and out == "" and "the shards are even" in err


def test_set_bound_keeps_shards_and_refuses_a_bound_they_break(store):
    write_fleet(store, NAMES, [], FLEET)     # nat:gw and lb:web share n2, n3
    code, _, err = hpctl("shards", "set-bound", "1", "--store", store.url)
    assert code == Exit.USAGE and "the bound cannot be 1" in err and one_sentence(err), err
    assert store.get(cluster.SHARDS_KEY).value["bound"] is None
    assert hpctl("shards", "set-bound", "2", "--store", store.url)[0] == Exit.OK
    value = store.get(cluster.SHARDS_KEY).value
    assert value["bound"] == 2 and value["shards"] == FLEET and value["nodes"] == NAMES
    assert hpctl("shards", "set-bound", "none", "--store", store.url)[0] == Exit.OK
    assert store.get(cluster.SHARDS_KEY).value["bound"] is None
    code, _, err = hpctl("shards", "set-bound", "-1", "--store", store.url)
    assert code == Exit.USAGE


# --- hpctl fleet status ----------------------------------------------------------------------

def fleet_section(name="n1"):
    return {"name": name, "node_id": 0, "epoch": 100, "ready": False,
            "error": "the store is down (retrying)",
            "members": {"n1": {"id": 0, "sync_ip": "10.99.0.1", "ready": True},
                        "n2": {"id": 1, "sync_ip": "10.99.0.2", "ready": False}},
            "shards": {"nat:gw": ["n1", "n2"]},
            "sync": {"node_id": 0, "epoch": 100, "sent": 10, "rejected": {"bad-tag": 3},
                     "rejected_total": 3,
                     "peers": {"1": {"alive": True, "ack_lag_s": 0.25,
                                     "resend_queue_records": 17, "pending_records": 4,
                                     "needs_resync": False}}},
            "records": {"installed": 5, "merged": 1, "rejected": 0, "conflict": 2, "full": 0},
            "events": {"read": 9, "replicated": 8}}


@pytest.fixture
def agents(monkeypatch):
    """Nodes "running here" and their agents' statuses (an exception: no status)."""
    statuses = {}
    monkeypatch.setattr(node_mod, "running_nodes", lambda: sorted(statuses))

    def read_status(node):
        s = statuses[node]
        if isinstance(s, Exception):
            raise s
        return {"node": node, "pid": 4242, "time": 0, "age_s": 1.5, "running": True,
                "target_groups": {}, **s}
    monkeypatch.setattr(status_mod, "read_status", read_status)
    return statuses


def test_fleet_status_shows_members_leases_and_the_agents_here(store, agents):
    lease = store.lease(60)
    write_fleet(store, NAMES, ["n1", "n2"], FLEET, lease=lease)
    store.put(cluster.CLUSTER_KEY, cluster._new_cluster())
    agents["n1"] = {"fleet": fleet_section()}
    code, out, err = hpctl("fleet", "status", "--store", store.url, "--json")
    assert code == Exit.OK, err
    data = json.loads(out)
    s = data["store"]
    assert set(s["members"]) == {"n1", "n2"} and s["members"]["n1"]["lease"] == lease.id
    assert s["members"]["n2"]["ready"] is False and s["named"]["n5"] == 4
    assert s["cluster"]["sync_key_ids"] == [1] and "sync_keys" not in s["cluster"]
    assert data["local"]["n1"]["agent"] == "running"
    assert data["local"]["n1"]["fleet"]["sync"]["peers"]["1"]["ack_lag_s"] == 0.25
    code, out, err = hpctl("fleet", "status", "--store", store.url)
    assert code == Exit.OK
    assert "2 live of 5 named nodes" in out and "n2 (1)" in out and "0.250" in out
    assert "17" in out and "rejected messages: 3 (bad-tag 3)" in out
    assert "installed 5" in out and "replicated 8" in out
    assert "NOT ready" in out and "error: the store is down (retrying)" in out


def test_fleet_status_says_what_is_missing(store, agents):
    agents["n1"] = NotFound("no agent status for node 'n1': is the agent running?")
    agents["n2"] = {}                              # an agent outside any fleet
    agents["n3"] = {"fleet": fleet_section("n3"), "running": False}
    code, out, err = hpctl("fleet", "status", "--store", store.url, "--json")
    assert code == Exit.FAILURE
    local = json.loads(out)["local"]
    assert local["n1"]["agent"] == "missing" and "no agent status" in local["n1"]["error"]
    assert local["n2"]["agent"] == "running" and local["n2"]["fleet"] is None
    assert local["n3"]["agent"] == "not running"
    assert json.loads(out)["store"]["cluster"] is None
    code, out, err = hpctl("fleet", "status", "--store", store.url)
    assert code == Exit.FAILURE and "Traceback" not in err
    assert "no agent status" in out and "not in a fleet" in out
    assert "no /cluster yet" in out


def test_fleet_status_with_an_unreachable_store(agents):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"etcd://127.0.0.1:{s.getsockname()[1]}"
    agents["n1"] = {"fleet": fleet_section()}
    code, out, err = hpctl("fleet", "status", "--store", url, "--json")
    assert code == Exit.FAILURE
    data = json.loads(out)
    assert url in data["store"]["error"] and data["local"]["n1"]["fleet"]["name"] == "n1"


# --- shard sizes into /nlb and /nat -----------------------------------------------------------

def test_lb_create_writes_the_shard_size_and_assigns_the_shard(store):
    store.put(cluster.NODE_IDS_KEY, {n: i for i, n in enumerate(NAMES)})
    assert hpctl("lb", "create", "web", "--shard-size", "2", "--store", store.url)[0] == 0
    assert hpctl("lb", "create", "api", "--store", store.url)[0] == 0
    lbs = store.get(NLB_KEY).value["load_balancers"]
    assert lbs == [{"name": "web", "lb_id": 0, "shard_size": 2}, {"name": "api", "lb_id": 1}]
    shards = store.get(cluster.SHARDS_KEY).value["shards"]
    assert len(shards["lb:web"]) == 2 and len(shards["lb:api"]) == cluster.DEFAULT_SHARD_SIZE
    code, out, _ = hpctl("lb", "show", "--store", store.url, "--json")
    assert json.loads(out)["load_balancers"][0]["shard_size"] == 2
    code, _, err = hpctl("lb", "create", "x", "--shard-size", "0", "--store", store.url)
    assert code == Exit.USAGE and "--shard-size" in err


def test_lb_create_without_named_nodes_assigns_nothing(store):
    assert hpctl("lb", "create", "web", "--shard-size", "2", "--store", store.url)[0] == 0
    assert store.get(NLB_KEY).value["load_balancers"][0]["shard_size"] == 2
    assert store.get(cluster.SHARDS_KEY) is None


@pytest.fixture
def nat_up(monkeypatch):
    """nat up without a data path: the node "starts" and its gateways are recorded."""
    started = []
    monkeypatch.setattr(node_mod, "start_nat_node",
                        lambda node, ifnames, gws, **kw: started.append((node, gws)))
    return started


def test_nat_up_writes_the_gateways_and_their_shard_size_to_the_store(store, nat_up):
    store.put(cluster.NODE_IDS_KEY, {n: i for i, n in enumerate(NAMES)})
    store.put(cluster.NAT_KEY, {"gateways": [{"name": "other", "gw_id": 1, "nat_ips": [],
                                              "inside_cidrs": []}]})
    code, _, err = hpctl("nat", "up", "--node", "gw1", "--if", "lo", "--no-agent",
                         "--nat-ip", "198.18.0.100", "--inside", "10.10.0.0/24",
                         "--shard-size", "2", "--store", store.url)
    assert code == Exit.OK, err
    assert nat_up[0][0] == "gw1"
    gws = store.get(cluster.NAT_KEY).value["gateways"]
    want = {**nat_up[0][1][0].to_dict(), "shard_size": 2}
    assert want["name"] == "gw1-gw" and want["nat_ips"] == ["198.18.0.100"]
    assert gws == [{"name": "other", "gw_id": 1, "nat_ips": [], "inside_cidrs": []}, want]
    GatewayConfig.from_dict({k: v for k, v in gws[1].items() if k != "shard_size"})
    shards = store.get(cluster.SHARDS_KEY).value["shards"]
    assert len(shards["nat:gw1-gw"]) == 2 and len(shards["nat:other"]) == 3
    # a re-run without --shard-size keeps the size; the gateway is replaced, not added
    code, _, _ = hpctl("nat", "up", "--node", "gw1", "--if", "lo", "--no-agent",
                       "--nat-ip", "198.18.0.101", "--inside", "10.10.0.0/24",
                       "--store", store.url)
    assert code == Exit.OK
    gws = store.get(cluster.NAT_KEY).value["gateways"]
    assert [g["name"] for g in gws] == ["other", "gw1-gw"]
    assert gws[1]["shard_size"] == 2 and gws[1]["nat_ips"] == ["198.18.0.101"]


def test_nat_up_with_an_unreachable_store_says_so_after_starting(nat_up):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        url = f"etcd://127.0.0.1:{s.getsockname()[1]}"
    code, _, err = hpctl("nat", "up", "--node", "gw1", "--if", "lo", "--no-agent",
                         "--nat-ip", "198.18.0.100", "--inside", "10.10.0.0/24",
                         "--store", url)
    assert nat_up and code == Exit.USAGE
    last = err.strip().splitlines()[-1]
    assert last.startswith("hpctl: node gw1 is up but its gateways are not in the store")


# --- hpctl flows: which nodes here hold each flow --------------------------------------------

class _Key(ctypes.Structure):
    _fields_ = [("src_ip", ctypes.c_uint32), ("dst_ip", ctypes.c_uint32),
                ("src_port", ctypes.c_uint16), ("dst_port", ctypes.c_uint16),
                ("proto", ctypes.c_uint8), ("pad", ctypes.c_uint8 * 3)]


class _Table:
    Key = _Key

    def __init__(self, keys):
        self.keys = {bytes(k) for k in keys}

    def __contains__(self, key):
        return bytes(key) in self.keys


class _Node:
    def __init__(self, tables):
        self.tables = tables

    def table(self, name):
        if name not in self.tables:
            raise KeyError(name)
        return self.tables[name]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass


def _flow(src, sport, dst, dport, proto="tcp"):
    from hyperplane.datapath.flows import Flow
    return Flow("NAT_OUT", proto, src, sport, dst, dport, "198.18.0.100", 40000, dst, dport,
                "ESTABLISHED", 0, 0, 1, 60, 1.0, 0.5, True)


def _key(f):
    from hyperplane.codec import ip_to_be32, port_to_be16, proto_number
    return _Key(ip_to_be32(f.src), ip_to_be32(f.dst), port_to_be16(f.sport),
                port_to_be16(f.dport), proto_number(f.proto))


def test_flows_names_the_nodes_here_that_hold_each_flow(monkeypatch):
    import hyperplane.datapath.flows as flows_mod
    a, b = _flow("10.10.0.10", 5555, "198.18.0.1", 80), _flow("10.10.0.11", 53, "1.1.1.1",
                                                               53, "udp")
    nodes = {"n1": _Node({"flows": _Table([_key(a)]), "pending": _Table([_key(b)])}),
             "n2": _Node({"flows": _Table([_key(a)])}),           # no pending table
             "n3": _Node({"flows": _Table([]), "pending": _Table([])})}
    monkeypatch.setattr(node_mod, "running_nodes", lambda: sorted(nodes))
    monkeypatch.setattr(node_mod, "open_node", lambda n: nodes[n])
    monkeypatch.setattr(flows_mod, "list_flows", lambda dp, **kw: [a, b])
    code, out, err = hpctl("flows", "--node", "n1", "--json")
    assert code == Exit.OK, err
    rows = json.loads(out)
    assert [r["nodes"] for r in rows] == [["n1", "n2"], ["n1"]]
    code, out, _ = hpctl("flows", "--node", "n1")
    assert code == Exit.OK and "nodes" in out and "n1,n2" in out
    # one node here: it is named
    only = {"n1": nodes["n1"]}
    monkeypatch.setattr(node_mod, "running_nodes", lambda: sorted(only))
    rows = json.loads(hpctl("flows", "--json")[1])
    assert [r["nodes"] for r in rows] == [["n1"], ["n1"]]


def test_a_bad_shard_size_in_the_store_is_one_sentence(store):
    store.put(NLB_KEY, {"load_balancers": [{"name": "web", "lb_id": 0, "shard_size": 0}]})
    code, _, err = hpctl("lb", "show", "--store", store.url)
    assert code == Exit.USAGE and "shard_size must be an integer from 1 to 64" in err
    assert one_sentence(err)
