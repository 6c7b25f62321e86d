"""A node whose data path and NAT gateways come from its agent and the cluster store
(`hpctl node up`), rather than from `hpctl nat up`'s command line.

load_node: the agent loads and attaches the data path itself (one compile) when the node
does not already run on the asked interfaces; a restarted agent finds the pins and
compiles nothing. NatFromStore: each tick, the /nat gateways whose shard names the node
are made the node's gateways (hyperplane.node.lifecycle.apply_gateways: maps, NAT IP
addresses, state file; all or nothing). A node whose shard names no gateway runs none:
a load-balancer-only node needs no placeholder gateway. A bad /nat, or gateways the node
cannot hold, is reported in the agent's status and log, and the last good set stays."""
from __future__ import annotations

import logging

from hyperplane.errors import HyperplaneError, NotFound
from hyperplane.fleet import cluster
from hyperplane.fleet.store import Store
from hyperplane.nat.gateway import GatewayConfig
from hyperplane.node import lifecycle

log = logging.getLogger("hyperplane.node.nat_from_store")


def load_node(config) -> None:
    """Start the node's data path on config.ifnames (an AgentConfig) unless it already runs
    there in store mode; its current gateways stay until the store's are applied."""
    try:
        state = lifecycle.node_state(config.node)
    except NotFound:
        state = None
    if state is not None and state["ifnames"] == list(config.ifnames) \
            and state["netns"] == config.netns and state.get("nat_from_store"):
        return
    gateways = [GatewayConfig.from_dict(g) for g in state["gateways"]] if state else []
    log.info("loading the data path of node %s on %s", config.node, ", ".join(config.ifnames))
    lifecycle.start_nat_node(config.node, list(config.ifnames), gateways, netns=config.netns,
                             mode=config.mode, outside_if=config.outside_if,
                             nat_from_store=True)


def _gateway(entry: dict) -> GatewayConfig:
    return GatewayConfig.from_dict({k: v for k, v in entry.items() if k != "shard_size"})


class NatFromStore:
    """The node's NAT gateways, kept equal to what the store assigns it."""

    def __init__(self, node: str):
        self.node = node
        self.enabled = False
        self.applied: list[dict] | None = None   # the gateways last applied (store dicts)
        self.error: str | None = None
        # the store revision the applied set was read at: the store is read again only
        # once it moved (a tick costs one revision read instead of the /nat, shard and
        # member reads, about 5 a tick)
        self.read_at: int | None = None

    def apply(self, store: Store, dp) -> dict | None:
        """Apply the store's assignment if it changed; the node's new state, else None."""
        try:
            revision = store.revision()
            if revision == self.read_at and self.error is None:
                return None
            # read at `revision` (a write meanwhile, ensure_shards' own included, moves the
            # revision on: the next tick reads again)
            wanted = cluster.assigned_gateways(store, self.node)
            if wanted == self.applied:
                self.read_at = revision
                return None
            state = lifecycle.apply_gateways(self.node, dp, [_gateway(g) for g in wanted])
        except (HyperplaneError, OSError) as exc:
            if str(exc) != self.error:
                log.error("NAT gateways from the store not applied (the last good ones "
                          "stay): %s", exc)
            self.error = str(exc)
            return None
        log.info("node %s runs NAT gateways: %s", self.node,
                 ", ".join(g["name"] for g in wanted) or "none")
        self.applied, self.error, self.read_at = wanted, None, revision
        return state

    def status(self) -> dict:
        return {"from_store": self.enabled, "error": self.error,
                "gateways": None if self.applied is None else
                [g["name"] for g in self.applied]}

