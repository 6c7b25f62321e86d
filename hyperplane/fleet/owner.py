"""Who owns a flow, computed alike on every node (and by the data path, bpf/fleet.h).

A client's flows belong to one node of the resource's shard: rendezvous (highest random
weight) hashing of the client's (ip, port, proto) over the shard's live nodes, so a node
leaving moves only its own clients and a node joining takes a fair share. A NAT flow's
port comes from its owner's port blocks, so a reply names the owner by its port; blocks
are spread over the shard's nodes by rendezvous hashing too (block_owners)."""
from __future__ import annotations

import math
import socket
import struct

from hyperplane.datapath import cheaders

MASK = 0xFFFFFFFF
NO_OWNER = 0xFFFFFFFF
PORT_BLOCKS = cheaders.define("consts.h", "HP_PORT_BLOCKS")
MAX_SHARD = cheaders.define("consts.h", "HP_MAX_SHARD")


def _fmix(h: int) -> int:
    h ^= h >> 16
    h = (h * 0x85EBCA6B) & MASK
    h ^= h >> 13
    h = (h * 0xC2B2AE35) & MASK
    h ^= h >> 16
    return h


def owner_score(ip_raw: int, port_raw: int, proto: int, node: int, seed: int) -> int:
    """A node's weight for a client. ip_raw / port_raw are the address and port as the
    data path's registers hold them (network-order bytes read as little-endian integers:
    raw_ip, raw_port). Keep in sync: bpf/fleet.h owner_score."""
    h = (seed ^ ip_raw) & MASK
    h = ((h * 0xCC9E2D51) & MASK) ^ (((port_raw << 16) | proto) & MASK)
    h = ((h * 0x1B873593) & MASK) ^ ((node * 0x9E3779B1) & MASK)
    return _fmix(h)


def raw_ip(ip: str) -> int:
    return struct.unpack("<I", socket.inet_aton(ip))[0]


def raw_port(port: int) -> int:
    return struct.unpack("<H", struct.pack(">H", port))[0]


def shard_owner(nodes, ip: str, port: int, proto: int, seed: int) -> int:
    """The owner of client (ip, port, proto) among the live shard nodes (node ids): the
    highest score, ties to the lower id; NO_OWNER for none. Keep in sync: bpf/fleet.h."""
    ipr, pr = raw_ip(ip), raw_port(port)
    best, best_score = NO_OWNER, 0
    for node in list(nodes)[:MAX_SHARD]:
        score = owner_score(ipr, pr, proto, node, seed)
        if best == NO_OWNER or score > best_score or (score == best_score and node < best):
            best, best_score = node, score
    return best


def block_size(port_min: int, port_max: int) -> int:
    """Ports per block when a NAT IP's range is cut into PORT_BLOCKS blocks."""
    return math.ceil((port_max - port_min + 1) / PORT_BLOCKS)


def blocks_in_range(port_min: int, port_max: int) -> int:
    """Blocks that hold at least one port of the range."""
    return math.ceil((port_max - port_min + 1) / block_size(port_min, port_max))


def block_owners(nodes, gw_id: int, n_nat_ips: int, port_min: int, port_max: int,
                 seed: int) -> dict[tuple[int, int], int]:
    """(NAT IP index, block) -> owning node id, for every block of a gateway, by
    rendezvous hashing of the block over the shard's live nodes (a node leaving hands only
    its own blocks over). Empty for no nodes."""
    nodes = sorted(set(nodes))
    if not nodes:
        return {}
    out = {}
    for ip_idx in range(n_nat_ips):
        for block in range(blocks_in_range(port_min, port_max)):
            key = (gw_id << 16) | (ip_idx << 8) | block
            out[(ip_idx, block)] = max(nodes, key=lambda n: (owner_score(key, 0, 0, n, seed), -n))
    return out
