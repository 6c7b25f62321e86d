"""The fleet's state in the store (hyperplane/fleet/cluster.py), on both store backends."""
import pytest

from hyperplane.datapath import cheaders
from hyperplane.errors import ConfigError
from hyperplane.fleet import cluster
from hyperplane.fleet.cluster import Member


def test_max_nodes_matches_the_c():
    assert cluster.MAX_NODES == cheaders.define("consts.h", "HP_MAX_NODES")


def test_cluster_is_created_once(store):
    first = cluster.ensure_cluster(store)
    again = cluster.ensure_cluster(store)
    assert first.seed == again.seed and 0 <= first.seed < 2**32
    assert first.keyring.current_id == again.keyring.current_id == 1
    assert first.sync_port == cluster.SYNC_PORT


def test_key_rotation_keeps_the_old_key_until_retired(store):
    cluster.ensure_cluster(store)
    new_id = cluster.rotate_sync_key(store)
    ring = cluster.ensure_cluster(store).keyring
    assert new_id == 2 and ring.current_id == 2 and ring.ids() == [1, 2]
    cluster.retire_sync_keys(store)
    assert cluster.ensure_cluster(store).keyring.ids() == [2]


def test_a_bad_cluster_record_is_one_clear_error(store):
    store.put(cluster.CLUSTER_KEY, {"seed": "x"})
    with pytest.raises(ConfigError, match="seed"):
        cluster.ensure_cluster(store)


def test_node_ids_are_stable_and_smallest_free(store):
    assert [cluster.node_id(store, n) for n in ("a", "b", "c")] == [0, 1, 2]
    assert cluster.node_id(store, "b") == 1           # comes back as itself
    store.put(cluster.NODE_IDS_KEY, {"a": 0, "c": 2})  # b removed
    assert cluster.node_id(store, "d") == 1


def test_node_ids_run_out_clearly(store):
    store.put(cluster.NODE_IDS_KEY, {f"n{i}": i for i in range(cluster.MAX_NODES)})
    with pytest.raises(ConfigError, match="already has 64 nodes"):
        cluster.node_id(store, "one-more")


def test_members_are_the_leased_records_and_damaged_ones_are_skipped(store):
    lease = store.lease(5)
    store.put("/nodes/a", Member("a", 0, "10.253.0.1", "02:00:00:00:00:01", 1).to_dict(),
              lease=lease)
    store.put("/nodes/b", {"name": "b"})
    live = cluster.members(store)
    assert list(live) == ["a"] and live["a"].sync_ip == "10.253.0.1" and not live["a"].ready
    lease.revoke()
    assert cluster.members(store) == {}


@pytest.mark.parametrize("sweep_s, kept", [
    (None, 0.0),       # an older agent's record: it does not say, so it does not sweep
    (60.0, 60.0), (2, 2), (0, 0),
    (-1, None), ("60", None), (True, None)])
def test_a_node_says_how_often_it_sweeps_and_a_bad_value_damages_the_record(store, sweep_s,
                                                                             kept):
    record = Member("a", 0, "10.253.0.1", "02:00:00:00:00:01", 1).to_dict()
    if sweep_s is None:
        del record["sweep_s"]
    else:
        record["sweep_s"] = sweep_s
    store.put("/nodes/a", record)
    live = cluster.members(store)
    if kept is None:
        assert live == {}, "a damaged record counts as not live"
        with pytest.raises(ConfigError, match="sweep_s"):
            Member.from_dict(record)
    else:
        assert live["a"].sweep_s == kept


@pytest.mark.parametrize("sweep_s", [float("inf"), float("nan")])
def test_a_sweep_period_that_is_no_number_of_seconds_is_refused(sweep_s):
    # (the store refuses them first: they are not JSON)
    record = dict(Member("a", 0, "10.253.0.1", "02:00:00:00:00:01", 1).to_dict(), sweep_s=sweep_s)
    with pytest.raises(ConfigError, match="sweep_s"):
        Member.from_dict(record)


def _configure(store, lb_size=None):
    store.put(cluster.NAT_KEY, {"gateways": [{"name": "gw", "shard_size": 2}]})
    store.put("/nlb", {"load_balancers": [{"name": "web", "shard_size": lb_size}]})


def test_every_resource_gets_a_shard_and_short_shards_grow(store):
    _configure(store)
    assert cluster.ensure_shards(store) == {}          # no nodes named: nothing to do
    cluster.node_id(store, "n1")
    shards = cluster.ensure_shards(store)
    assert shards == {"nat:gw": ["n1"], "lb:web": ["n1"]}
    for n in ("n2", "n3", "n4"):
        cluster.node_id(store, n)
    shards = cluster.ensure_shards(store)
    assert len(shards["nat:gw"]) == 2 and "n1" in shards["nat:gw"]   # nobody moved
    assert len(shards["lb:web"]) == cluster.DEFAULT_SHARD_SIZE and "n1" in shards["lb:web"]


def test_ensure_shards_writes_only_changes(store):
    _configure(store)
    cluster.node_id(store, "n1")
    cluster.ensure_shards(store)
    revision = store.get(cluster.SHARDS_KEY).revision
    cluster.ensure_shards(store)
    assert store.get(cluster.SHARDS_KEY).revision == revision


def test_a_deleted_resource_releases_its_shard(store):
    _configure(store)
    cluster.node_id(store, "n1")
    cluster.ensure_shards(store)
    store.put("/nlb", {"load_balancers": []})
    assert cluster.ensure_shards(store) == {"nat:gw": ["n1"]}


def _gateway(name: str, gw_id: int, ip: str, shard_size=None) -> dict:
    g = {"name": name, "gw_id": gw_id, "nat_ips": [ip], "inside_cidrs": ["10.10.0.0/24"],
         "port_min": 1024, "port_max": 65535}
    return g if shard_size is None else {**g, "shard_size": shard_size}


def test_a_node_is_assigned_the_gateways_whose_shard_names_it(store):
    for n in ("a", "b", "c"):
        cluster.node_id(store, n)
    store.put(cluster.NAT_KEY, {"gateways": [_gateway("one", 0, "198.18.0.100", 1),
                                             _gateway("all", 1, "198.18.0.101", 3)]})
    assigned = {n: [g["name"] for g in cluster.assigned_gateways(store, n)]
                for n in ("a", "b", "c")}
    assert all("all" in names for names in assigned.values())
    holders = [n for n, names in assigned.items() if "one" in names]
    assert holders == cluster.shard_of(store, "nat:one") and len(holders) == 1
    assert cluster.assigned_gateways(store, "not-named") == []


def test_a_node_of_no_shard_runs_no_gateway(store):
    cluster.node_id(store, "lb-only")
    assert cluster.assigned_gateways(store, "lb-only") == []   # no /nat at all
    store.put(cluster.NAT_KEY, {"gateways": []})
    assert cluster.assigned_gateways(store, "lb-only") == []


def test_a_bad_nat_record_is_one_clear_error(store):
    store.put(cluster.NAT_KEY, {"gateways": "x"})
    with pytest.raises(ConfigError, match="/nat"):
        cluster.nat_gateways(store)


def test_gateway_ids_are_the_smallest_free_and_run_out_clearly():
    assert cluster.free_gateway_id([], 4) == 0
    assert cluster.free_gateway_id([{"gw_id": 0}, {"gw_id": 2}], 4) == 1
    with pytest.raises(ConfigError, match="all 2 gateway ids are taken"):
        cluster.free_gateway_id([{"gw_id": 0}, {"gw_id": 1}], 2)


class _CountingStore:
    """A store that counts the reads other than revision()."""

    def __init__(self, store):
        self.store, self.reads = store, 0

    def revision(self):
        return self.store.revision()

    def __getattr__(self, name):
        if name in ("get", "list"):
            self.reads += 1
        return getattr(self.store, name)


def test_nat_from_store_reads_the_store_again_only_once_it_changed(store, monkeypatch):
    from hyperplane.node import nat_from_store
    applied = []
    monkeypatch.setattr(nat_from_store.lifecycle, "apply_gateways",
                        lambda node, dp, gws: applied.append([g.name for g in gws]) or {})
    cluster.node_id(store, "a")
    store.put(cluster.NAT_KEY, {"gateways": [_gateway("one", 0, "198.18.0.100", 1)]})
    counting = _CountingStore(store)
    nat = nat_from_store.NatFromStore("a")
    assert nat.apply(counting, dp=None) == {} and applied == [["one"]]
    for _ in range(5):                     # the shard written on the first read: once more
        assert nat.apply(counting, dp=None) is None
    reads = counting.reads
    for _ in range(20):                    # then nothing changes: no reads at all
        assert nat.apply(counting, dp=None) is None
    assert counting.reads == reads
    store.put(cluster.NAT_KEY, {"gateways": [_gateway("one", 0, "198.18.0.100", 1),
                                             _gateway("two", 1, "198.18.0.101", 1)]})
    assert nat.apply(counting, dp=None) == {} and applied[-1] == ["one", "two"]
    assert counting.reads > reads
