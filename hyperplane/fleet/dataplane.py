"""The fleet's maps of one node's data path (bpf/fleet.h, bpf/structs.h): who this node
is, its peers' MACs on the sync network, each resource's live shard nodes, and the NAT
port blocks this node takes ports from. The agent writes them from the store's view;
every node writes the same shards and block owners from the same inputs."""
from __future__ import annotations

from dataclasses import dataclass

from hyperplane.codec import be16_to_port
from hyperplane.datapath import cheaders
from hyperplane.datapath.flows import flow_entries, now_ns
from hyperplane.datapath.settings import F_EVENT_WAKEUP, F_FLEET, F_PEER_EVENTS, set_flags, \
    update_config
from hyperplane.datapath.verdicts import FlowKind
from hyperplane.errors import ConfigError
from hyperplane.fleet.owner import block_owners, block_size, blocks_in_range
from hyperplane.nat.gateway import write_blocks

PEER_F_LIVE = cheaders.define("structs.h", "PEER_F_LIVE")
MAX_NODES = cheaders.define("consts.h", "HP_MAX_NODES")
MAX_SHARD = cheaders.define("consts.h", "HP_MAX_SHARD")
PORT_BLOCKS = cheaders.define("consts.h", "HP_PORT_BLOCKS")


def lb_slot(dp, lb_id: int) -> int:
    """The shards map's slot of a load balancer (bpf/fleet.h SHARD_LB_BASE + lb id)."""
    return dp.sizes.max_gateways + lb_id


def mac_bytes(mac: str) -> bytes:
    try:
        out = bytes(int(part, 16) for part in mac.split(":"))
    except ValueError:
        out = b""
    if len(out) != 6:
        raise ConfigError(f"{mac!r} is not a MAC address (aa:bb:cc:dd:ee:ff)")
    return out


@dataclass(frozen=True)
class GatewayBlocks:
    """What a gateway's port blocks need: its id, NAT IP count and port range."""
    gw_id: int
    n_nat_ips: int
    port_min: int
    port_max: int


class FleetDataplane:
    def __init__(self, dp):
        self.dp = dp
        self._usable: dict[int, set[tuple[int, int]]] = {}   # gw id -> blocks written

    def set_identity(self, node_id: int, sync_ifindex: int) -> None:
        """This node's id and sync interface; turns fleet mode on (HP_F_FLEET), and the
        wakeups of the member's sync task, which sleeps on the event ring."""
        if not 0 <= node_id < MAX_NODES:
            raise ConfigError(f"node id {node_id} is outside 0..{MAX_NODES - 1}")
        def change(leaf):
            leaf.node_id = node_id
            leaf.sync_ifindex = sync_ifindex
            leaf.flags |= F_FLEET | F_EVENT_WAKEUP
        update_config(self.dp, change)

    def leave(self) -> None:
        """Fleet mode off (one node again): every event is written again too."""
        set_flags(self.dp, F_FLEET | F_EVENT_WAKEUP | F_PEER_EVENTS, False)

    def set_peers(self, macs: dict[int, str], live: set[int]) -> None:
        """Every node's MAC on the sync network (this node's too); `live` ones are sent
        second-chance packets. Nodes not named are cleared."""
        table = self.dp.table("peers")
        for node in range(MAX_NODES):
            leaf = table.Leaf()
            if node in macs:
                for i, b in enumerate(mac_bytes(macs[node])):
                    leaf.mac[i] = b
                leaf.flags = PEER_F_LIVE if node in live else 0
            table[table.Key(node)] = leaf

    def set_shard(self, slot: int, nodes) -> None:
        """The live nodes of the resource in `slot` (gateway id, or lb_slot())."""
        nodes = sorted(set(nodes))
        if len(nodes) > MAX_SHARD:
            raise ConfigError(f"a shard holds at most {MAX_SHARD} nodes, not {len(nodes)}")
        table = self.dp.table("shards")
        leaf = table.Leaf()
        leaf.n = len(nodes)
        for i, node in enumerate(nodes):
            leaf.nodes[i] = node
        table[table.Key(slot)] = leaf

    def set_blocks(self, gw: GatewayBlocks, node_id: int, live_nodes, seed: int,
                   *, usable: set[tuple[int, int]] | None = None) -> dict[tuple[int, int], int]:
        """Spread the gateway's port blocks over its live shard nodes (block_owners),
        write every block's owner, and let this node take ports from its own blocks -
        only those in `usable` when given (blocks this node just gained from a live node
        wait until the old owner has surely stopped: the agent's hold-down). Returns the
        owners."""
        owners = block_owners(live_nodes, gw.gw_id, gw.n_nat_ips, gw.port_min, gw.port_max,
                              seed)
        size = block_size(gw.port_min, gw.port_max)
        table = self.dp.table("port_owner")
        for ip_idx in range(gw.n_nat_ips):
            for block in range(PORT_BLOCKS):
                idx = (gw.gw_id * self.dp.sizes.max_nat_ips + ip_idx) * PORT_BLOCKS + block
                owner = owners.get((ip_idx, block))
                table[table.Key(idx)] = table.Leaf(0 if owner is None else owner + 1)
        mine = [b for b, owner in sorted(owners.items(), key=lambda kv: (kv[0][1], kv[0][0]))
                if owner == node_id and (usable is None or b in usable)]
        self.reserve_held_ports(gw, set(mine) - self._usable.get(gw.gw_id, set()))
        write_blocks(self.dp, gw.gw_id, mine, size)
        self._usable[gw.gw_id] = set(mine)
        return owners

    def reserve_usable_ports(self, gw: GatewayBlocks) -> int:
        """reserve_held_ports over every block of gw this node takes ports from now: when
        a joining node holds its peers' copies (member readiness), whose flows in its own
        blocks came after the blocks were written, and at each garbage collection."""
        return self.reserve_held_ports(gw, set(self._usable.get(gw.gw_id, ())))

    def reserve_held_ports(self, gw: GatewayBlocks, blocks: set[tuple[int, int]]) -> int:
        """Reserve the port of every NAT flow held here that lies in `blocks` of gw (NAT
        IP index, block), before this node takes ports from them. A replica reserves no
        port (bpf/install.h: the node whose block holds it alone takes ports from
        it), so a block that moves here, on failover or a rebalance, holds flows whose
        ports no other flow toward the same destination may get. A replica installed
        after this holds none: a port search that meets its port is refused by the flows
        table (the reply key is taken: DROP_TUPLE_TAKEN), never given twice. One batched
        read of the flow tables and of nat_resv; called when a block becomes usable here,
        and through reserve_usable_ports. Returns how many reservations were added."""
        if not blocks:
            return 0
        size = block_size(gw.port_min, gw.port_max)
        where = {int(k.value): (int(v.gw_id), int(v.ip_idx))
                 for k, v in self.dp.table("nat_ips").items()}
        resv = self.dp.table("nat_resv")
        reserved = {bytes(k) for k, _ in resv.items_lookup_batch()}
        now = now_ns()
        added = 0
        for k, v in flow_entries(self.dp):
            if v.kind != FlowKind.NAT_OUT:
                continue
            gw_id, ip_idx = where.get(int(v.new_src_ip), (None, None))
            port = be16_to_port(v.new_src_port)
            if gw_id != gw.gw_id or not gw.port_min <= port <= gw.port_max or \
                    (ip_idx, (port - gw.port_min) // size) not in blocks:
                continue
            rk = resv.Key(dst_ip=v.new_dst_ip, nat_ip=v.new_src_ip, dst_port=v.new_dst_port,
                          nat_port=v.new_src_port, proto=k.proto)
            if bytes(rk) in reserved:
                continue
            leaf = resv.Leaf()
            leaf.orig = type(leaf.orig).from_buffer_copy(k)
            leaf.taken_ns = now
            resv[rk] = leaf
            added += 1
        return added


def all_blocks(gw: GatewayBlocks) -> list[tuple[int, int]]:
    return [(i, b) for i in range(gw.n_nat_ips)
            for b in range(blocks_in_range(gw.port_min, gw.port_max))]
