"""The fleet's state in the store: what every node reads and hpctl writes.

Keys (values are JSON):
  /cluster          {"seed": int, "sync_port": int, "sync_keys": Keyring.to_dict()}
                    created once by the first node or hpctl (compare-and-swap on absence):
                    the hash seed every node uses for owners, port blocks and Maglev, the
                    UDP port of the sync network, the keys that authenticate sync datagrams.
  /node-ids         {name: id}: a node's id (0..HP_MAX_NODES-1) for as long as it is named,
                    so a restarted node comes back as itself.
  /nodes/<name>     a live member (Member.to_dict()), put with the node's lease: it vanishes
                    when the node stops refreshing it, which is the failure detector.
  /shards           ShuffleSharder.to_dict(): each resource's nodes. Shards name nodes,
                    live or not; the data path and the routers use the live ones.
  /nat              {"gateways": [GatewayConfig.to_dict()]}: the NAT gateways.
  /nlb              the load balancers (hyperplane.nlb.config).

Resources are named "nat:<gateway>" and "lb:<load balancer>".
"""
from __future__ import annotations

import copy
import os
import secrets
from dataclasses import asdict, dataclass
from typing import Any, Mapping

from hyperplane.errors import ConfigError
from hyperplane.fleet.shards import ShuffleSharder
from hyperplane.fleet.store import NLB_KEY, Store, StoreConflict
from hyperplane.fleet.wire import Keyring

CLUSTER_KEY = "/cluster"
NODE_IDS_KEY = "/node-ids"
NODES_PREFIX = "/nodes/"
SHARDS_KEY = "/shards"
NAT_KEY = "/nat"

SYNC_PORT = 7400
DEFAULT_SHARD_SIZE = 3      # k: the talk's and AWS's "every flow on more than one node"
MAX_NODES = 64              # bpf/consts.h HP_MAX_NODES (checked in tests/unit/test_cluster.py)


@dataclass(frozen=True)
class ClusterInfo:
    seed: int
    sync_port: int
    keyring: Keyring


def _new_cluster() -> dict:
    return {"seed": secrets.randbits(32), "sync_port": SYNC_PORT,
            "sync_keys": {"current": 1, "keys": {"1": secrets.token_bytes(32).hex()}}}


def cluster_from(value: Any) -> ClusterInfo:
    if not isinstance(value, Mapping):
        raise ConfigError(f"{CLUSTER_KEY} in the store must be an object, not {value!r}")
    seed, port = value.get("seed"), value.get("sync_port", SYNC_PORT)
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**32:
        raise ConfigError(f"{CLUSTER_KEY}: the seed must be an integer 0..2^32-1, not {seed!r}")
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise ConfigError(f"{CLUSTER_KEY}: sync_port must be 1..65535, not {port!r}")
    return ClusterInfo(seed, port, Keyring.from_dict(value.get("sync_keys") or {}))


def ensure_cluster(store: Store) -> ClusterInfo:
    """The cluster's seed and keys, created by whoever comes first."""
    entry = store.get(CLUSTER_KEY)
    if entry is None:
        store.cas(CLUSTER_KEY, _new_cluster(), revision=0)  # a racing creator may win: fine
        entry = store.get(CLUSTER_KEY)
    return cluster_from(entry.value)


def rotate_sync_key(store: Store) -> int:
    """Add a new current sync key; nodes accept the old one until retire_sync_keys()."""
    def rotate(value: dict) -> dict:
        ring = cluster_from(value).keyring
        new_id = max(ring.ids()) + 1
        ring.rotate(new_id, secrets.token_bytes(32))
        return {**value, "sync_keys": ring.to_dict()}
    return cluster_from(store.update(CLUSTER_KEY, rotate, default=_new_cluster())).keyring.current_id


def retire_sync_keys(store: Store) -> None:
    """Keep only the current sync key."""
    def retire(value: dict) -> dict:
        ring = cluster_from(value).keyring
        for key_id in ring.ids():
            if key_id != ring.current_id:
                ring.retire(key_id)
        return {**value, "sync_keys": ring.to_dict()}
    store.update(CLUSTER_KEY, retire, default=_new_cluster())


def node_id(store: Store, name: str) -> int:
    """The node's id: the one it had, else the smallest free one."""
    def assign(ids: dict) -> dict:
        if name not in ids:
            taken = set(ids.values())
            free = [i for i in range(MAX_NODES) if i not in taken]
            if not free:
                raise ConfigError(f"the fleet already has {MAX_NODES} nodes, the most it can "
                                  f"hold; remove one (hpctl nodes remove NAME)")
            ids = {**ids, name: free[0]}
        return ids
    return store.update(NODE_IDS_KEY, assign, default={})[name]


@dataclass(frozen=True)
class Member:
    """A live node as it announces itself."""
    name: str
    id: int
    sync_ip: str             # its address on the sync network
    mac: str                 # its sync interface's MAC (second chance sends there)
    epoch: int               # this agent's start (larger every start)
    ready: bool = False      # holds its shards' flows: the routers may send it traffic
    sweep_s: float = 0.0     # every flow it owns reaches its replicas this often (0: not
                             # swept: they keep what they hold until it expires)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> "Member":
        try:
            m = cls(**data)
        except TypeError as exc:
            raise ConfigError(f"a node record must name name, id, sync_ip, mac, epoch "
                              f"({exc})") from None
        if isinstance(m.sweep_s, bool) or not isinstance(m.sweep_s, (int, float)) or \
                not 0 <= m.sweep_s < float("inf"):
            raise ConfigError(f"node {m.name}: sweep_s must be seconds >= 0, "
                              f"not {m.sweep_s!r}")
        return m


def members(store_or_listing: Store | Mapping[str, Any]) -> dict[str, Member]:
    """The live nodes by name; a damaged record counts as not live (and is skipped)."""
    listing = (store_or_listing.list(NODES_PREFIX) if isinstance(store_or_listing, Store)
               else store_or_listing)
    out = {}
    for key, entry in listing.items():
        if not key.startswith(NODES_PREFIX):
            continue
        value = getattr(entry, "value", entry)
        try:
            m = Member.from_dict(value)
        except ConfigError:
            continue
        out[m.name] = m
    return out


def nat_resource(gateway: str) -> str:
    return f"nat:{gateway}"


def lb_resource(lb: str) -> str:
    return f"lb:{lb}"


def resources(store: Store) -> dict[str, int | None]:
    """Every configured resource and the shard size asked for it (None: the default)."""
    out: dict[str, int | None] = {}
    nat = store.get(NAT_KEY)
    for gw in (nat.value.get("gateways", []) if nat and isinstance(nat.value, dict) else []):
        if isinstance(gw, dict) and "name" in gw:
            out[nat_resource(gw["name"])] = gw.get("shard_size")
    nlb = store.get(NLB_KEY)
    for lb in (nlb.value.get("load_balancers", []) if nlb and isinstance(nlb.value, dict) else []):
        if isinstance(lb, dict) and "name" in lb:
            out[lb_resource(lb["name"])] = lb.get("shard_size")
    return out


def sharder(value: Any) -> ShuffleSharder:
    return ShuffleSharder.from_dict(value if isinstance(value, Mapping) else {})


def ensure_shards(store: Store) -> dict[str, list[str]]:
    """Give every configured resource a shard over the named nodes and grow short ones;
    release shards of resources gone. No member of an existing shard moves. Safe to call
    from every node at once (compare-and-swap)."""
    wanted = resources(store)
    names = sorted(store.get(NODE_IDS_KEY).value if store.get(NODE_IDS_KEY) else {})

    def fill(value: dict) -> dict:
        sh = sharder(value)
        for node in names:
            if node not in sh.nodes:
                sh.add_node(node)
        for resource in list(sh.shards):
            if resource not in wanted:
                sh.release(resource)
        for resource, size in sorted(wanted.items()):
            k = min(size or DEFAULT_SHARD_SIZE, len(sh.nodes))
            if k == 0:
                continue
            if resource not in sh.shards:
                sh.assign(resource, k)
            elif len(sh.shards[resource]) < k:
                sh.grow(resource, k)
        return sh.to_dict()

    if not names:
        return {}
    for _ in range(20):   # compare-and-swap, written only when something changes: every
        entry = store.get(SHARDS_KEY)   # node calls this on every change it watches
        old = entry.value if entry else {}
        new = fill(copy.deepcopy(old))
        if entry is not None and new == old:
            return dict(new["shards"])
        if store.cas(SHARDS_KEY, new, revision=entry.revision if entry else 0):
            return dict(new["shards"])
    raise StoreConflict(f"could not update {SHARDS_KEY}: other writers kept changing it")


def nat_gateways(store: Store) -> list[dict]:
    """The gateways in /nat, as stored (GatewayConfig dicts, plus "shard_size")."""
    entry = store.get(NAT_KEY)
    value = entry.value if entry else {}
    gateways = value.get("gateways", []) if isinstance(value, Mapping) else None
    if not isinstance(gateways, list) or not all(isinstance(g, Mapping) for g in gateways):
        raise ConfigError(f"{NAT_KEY} in the store must be {{\"gateways\": [{{...}}, ...]}}")
    return [dict(g) for g in gateways]


def assigned_gateways(store: Store, node: str) -> list[dict]:
    """The /nat gateways whose shard names the node: the ones a node that takes its NAT
    from the store runs (hpctl node up). Shards are given first (ensure_shards), so a
    gateway just created has its shard."""
    gateways = nat_gateways(store)
    shards = ensure_shards(store)
    return [g for g in gateways if node in shards.get(nat_resource(str(g.get("name"))), [])]


def free_gateway_id(gateways: list[dict], max_gateways: int) -> int:
    """The smallest gateway id no gateway in /nat uses (ids are the same on every node)."""
    taken = {g.get("gw_id") for g in gateways}
    for i in range(max_gateways):
        if i not in taken:
            return i
    raise ConfigError(f"the store already has {len(gateways)} NAT gateways, all "
                      f"{max_gateways} gateway ids are taken; delete one (hpctl nat delete)")


def shard_of(store: Store, resource: str) -> list[str]:
    entry = store.get(SHARDS_KEY)
    return list(sharder(entry.value if entry else {}).shards.get(resource, []))


def env_store_url(default: str) -> str:
    return os.environ.get("HYPERPLANE_STORE", default)
