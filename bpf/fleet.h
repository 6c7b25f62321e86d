/* Fleet: who owns a flow, and handing a packet to its owner (GLB's and Unimog's second
 * chance). A node of a fleet (HP_F_FLEET) creates a flow only when it is the flow's owner;
 * a packet of no flow it holds reaches the owner over the sync network and is never
 * reset, dropped or passed on untranslated on the way. Packets a peer hands over arrive
 * on the sync interface and are never handed on again (no loops).
 *
 * Owners, computed alike on every node from maps the agent writes:
 *   a client's packet (NAT inside -> out, NLB client -> VIP): rendezvous hashing of the
 *     client's (ip, port, proto) over the live nodes of the resource's shard;
 *   a reply to a NAT IP: the owner of the port's block (the owner of a NAT flow takes
 *     its port from its own blocks, so both agree);
 *   a target's reply: rendezvous hashing of the client (its destination) again. */
#ifndef HP_FLEET_H
#define HP_FLEET_H

#define NO_OWNER 0xffffffff
#define OWNER_LOCAL (-1)          /* to_owner: this node is the owner, go on here */
#define SHARD_LB_BASE HP_MAX_GATEWAYS

static __always_inline int fleet_on(struct hp_config *cfg)
{
	return cfg->flags & HP_F_FLEET;
}

/* A node's weight for a client in rendezvous hashing. ip and port are the raw
 * (network order) values. Keep in sync: hyperplane/fleet/owner.py owner_score. */
static __always_inline __u32 owner_score(__u32 ip, __u32 port, __u32 proto, __u32 node,
					 __u32 seed)
{
	__u32 h = seed ^ ip;
	h = h * 0xcc9e2d51 ^ ((port << 16) | proto);
	h = h * 0x1b873593 ^ (node * 0x9e3779b1);
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

/* The owner of a client's flows among the live nodes of shard `slot`: the highest
 * score (ties: the lower node id), or NO_OWNER for an empty shard. */
static __always_inline __u32 shard_owner(__u32 slot, __be32 ip, __be16 port, __u8 proto,
					 __u32 seed)
{
	struct shard *sh = shards.lookup(&slot);
	if (!sh)
		return NO_OWNER;
	__u32 best = NO_OWNER;
	__u32 best_score = 0;
	/* a loop, not HP_MAX_SHARD copies: a program may hold 4096 instructions here */
#pragma clang loop unroll(disable)
	for (int i = 0; i < HP_MAX_SHARD; i++) {
		if (i >= sh->n)
			break;
		__u32 node = sh->nodes[i];
		__u32 score = owner_score(ip, port, proto, node, seed);
		if (best == NO_OWNER || score > best_score || (score == best_score && node < best)) {
			best = node;
			best_score = score;
		}
	}
	return best;
}

/* The node whose block holds NAT port `port` (network order) of NAT IP ni. */
static __always_inline __u32 port_block_owner(struct nat_ip_value *ni, __be16 port)
{
	__u32 gw_id = ni->gw_id;
	struct gw_config *gw = gateways.lookup(&gw_id);
	struct gw_blocks *gb = gw_blocks.lookup(&gw_id);
	if (!gw || !gb || !gb->block_size)
		return NO_OWNER;
	__u32 p = bpf_ntohs(port);
	if (p < gw->port_min || p > gw->port_max)
		return NO_OWNER;
	__u32 block = (p - gw->port_min) / gb->block_size;
	if (block >= HP_PORT_BLOCKS || ni->ip_idx >= HP_MAX_NAT_IPS)
		return NO_OWNER;
	__u32 idx = (gw_id * HP_MAX_NAT_IPS + ni->ip_idx) * HP_PORT_BLOCKS + block;
	__u16 *owner = port_owner.lookup(&idx);
	if (!owner || !*owner)
		return NO_OWNER;
	return *owner - 1;
}

/* Hand the packet to node `owner` over the sync network: OWNER_LOCAL when this node is
 * the owner (go on here), else a verdict. A packet that came from a peer is never handed
 * on (the caller checks p->from_peer first). */
static __always_inline int to_owner(HP_CTX *ctx, struct pkt *p, struct hp_config *cfg,
				    __u32 owner)
{
	if (owner == cfg->node_id)
		return OWNER_LOCAL;
	if (owner == NO_OWNER || !cfg->sync_ifindex)
		return V_DROP_NO_OWNER;
	__u32 self = cfg->node_id;
	struct peer *to = peers.lookup(&owner);
	struct peer *me = peers.lookup(&self);
	if (!to || !me || !(to->flags & PEER_F_LIVE))
		return V_DROP_NO_OWNER;
	__builtin_memcpy(p->eth->h_dest, to->mac, 6);
	__builtin_memcpy(p->eth->h_source, me->mac, 6);
	p->action = ctx_redirect(cfg->sync_ifindex);
	return p->action < 0 ? V_DROP_NO_OWNER : V_TX_SECOND_CHANCE;
}

/* What PROG_OWNER is to find the owner of (scratch.owner_case). */
#define OWN_CLIENT 1              /* a client's packet: rendezvous over the shard */
#define OWN_NAT_REPLY 2           /* a reply to a NAT IP: the port's block owner */
#define OWN_TARGET_REPLY 3        /* a target's reply: rendezvous of its destination */

/* A packet of no flow here: OWNER_LOCAL when this node handles it (one node, a packet a
 * peer handed over, or PROG_OWNER found this node the owner), else DO_OWNER with the
 * question in the scratch space. */
static __always_inline int ask_owner(struct pkt *p, struct hp_config *cfg, __u8 what,
				     __u32 slot)
{
	if (!fleet_on(cfg) || p->from_peer || p->owner_local)
		return OWNER_LOCAL;
	struct scratch *s = scratch_get();
	if (!s)
		return V_DROP_MALFORMED;
	s->owner_case = what;
	s->owner_slot = slot;
	return DO_OWNER;
}

#endif
