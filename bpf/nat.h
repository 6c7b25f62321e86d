/* NAT gateway: port allocation unique per destination, and new outbound flows. */
#ifndef HP_NAT_H
#define HP_NAT_H

/* Try to take a reservation whose candidate failed every probe: a stale one (its flow
 * gone or expired, and older than the grace in which a flow is being created on another
 * CPU) is reclaimed: delete, then insert with BPF_NOEXIST again, so of two CPUs racing
 * for one port exactly one wins. Returns 0, -EEXIST or another error (table full). */
static __always_inline int resv_reclaim(struct hp_config *cfg, struct nat_resv_key *rk,
					struct nat_resv_value *rv, __u64 now)
{
	struct nat_resv_value *old = nat_resv.lookup(rk);
	if (!old)
		return nat_resv.insert(rk, rv); /* freed meanwhile */
	if (old->taken_ns + HP_RESV_GRACE_NS > now)
		return -EEXIST;
	struct flow_key orig = old->orig;
	struct flow_value *f = flow_find(&orig);
	if (f && f->kind == KIND_NAT_OUT && f->twin.dst_port == rk->nat_port &&
	    f->twin.dst_ip == rk->nat_ip && !flow_expired(cfg, f, rk->proto, now))
		return -EEXIST;
	nat_resv.delete(rk);
	int rc = nat_resv.insert(rk, rv);
	if (rc == 0)
		stat_inc(S_RESV_RECLAIMED);
	return rc;
}

/* Pair number j of the (NAT IP, port) pairs this node may take: consecutive numbers
 * alternate over the owned blocks (one node: one block per NAT IP, its whole range), so
 * a probe sequence reaches every pair whatever their numbers. Returns 0, or -1 for a
 * number that names no port (past the range's end in the last, shorter block). */
static __always_inline int port_candidate(struct gw_config *gw, struct gw_blocks *gb, __u32 j,
					  struct nat_resv_key *rk)
{
	__u32 n = gb->n;
	__u32 e = j % n;
	/* verifier workaround: LLVM drops any bound it can prove unless the value is hidden
	 * from it, and the verifier needs one on the index */
	asm volatile("" : "+r"(e));
	if (e >= HP_MAX_NAT_IPS * HP_PORT_BLOCKS)
		return -1;
	__u16 owned = gb->owned[e];
	__u32 ip_idx = owned >> 8;
	__u32 port = gw->port_min + (owned & 0xff) * gb->block_size + j / n;
	if (ip_idx >= HP_MAX_NAT_IPS || port > gw->port_max)
		return -1;
	rk->nat_ip = gw->nat_ips[ip_idx];
	rk->nat_port = bpf_htons((__u16)port);
	return 0;
}

/* Take a (NAT IP, port) for the packet's destination. The search starts where the last
 * one toward the same destination ended (a per-destination cursor), or at a
 * secret-hashed offset for a new destination (RFC 6056's algorithm 4): a fill of the
 * port space toward one destination takes one probe per flow up to the last free port.
 * Returns 0 and fills rk, -EEXIST when no port was found, or another error. */
static __always_inline int nat_take_port(struct pkt *p, struct hp_config *cfg, __u32 gw_id,
					 struct gw_config *gw, struct nat_resv_key *rk)
{
	/* the ports of this node's blocks (written with the gateway; fleet: by the agent) */
	struct gw_blocks *gb = gw_blocks.lookup(&gw_id);
	if (!gb || !gb->n || !gb->block_size)
		return -EEXIST;
	__u32 total = gb->n * gb->block_size;
	struct nat_cursor_key ck = { .dst_ip = p->key.dst_ip, .dst_port = p->key.dst_port,
				     .proto = p->key.proto, .gw_id = gw_id };
	__u32 *cursor = nat_cursor.lookup(&ck);
	__u32 base = cursor ? *cursor : flow_hash(&p->key, cfg->hash_seed ^ gw_id);
	if (base >= total)
		base %= total;

	struct scratch *s = scratch_get();
	if (!s)
		return -ENOMEM;
	struct nat_resv_value rv = {};
	rv.orig = p->key;
	rv.taken_ns = p->now;
	rk->dst_ip = p->key.dst_ip;
	rk->dst_port = p->key.dst_port;
	rk->proto = p->key.proto;

	/* The probe loop only inserts with BPF_NOEXIST: a small body keeps the verifier
	 * within its limits. Stale reservations are reclaimed below (one candidate per new
	 * flow) and by the agent's garbage collection. */
	int rc = -EEXIST;
	__u32 j = base;
	for (__u32 i = 0; i < HP_PORT_PROBES; i++) {
		/* a modulo, not a branch; opaque: no verifier state per probe */
		j = opaque_u32(s, (base + i) % total);
		if (port_candidate(gw, gb, j, rk))
			continue;
		rc = nat_resv.insert(rk, &rv);
		if (rc != -EEXIST)
			break;
	}
	if (rc == -EEXIST) {
		j = base;
		if (!port_candidate(gw, gb, j, rk))
			rc = resv_reclaim(cfg, rk, &rv, p->now);
	}
	/* after a refusal the next search starts past the window just probed: the cursor
	 * sweeps the space instead of every later flow probing the same taken ports */
	__u32 next = rc ? (base + HP_PORT_PROBES) % total : (j + 1) % total;
	if (cursor)
		*cursor = next;
	else
		nat_cursor.update(&ck, &next);
	return rc;
}

/* The port for a new NAT flow (PROG_NAT): 0 with *rk filled, or a verdict. */
static __always_inline int nat_new_port(struct pkt *p, struct hp_config *cfg, __u32 gw_id,
					struct nat_resv_key *rk)
{
	struct gw_config *gw = gateways.lookup(&gw_id);
	if (!gw || gw->n_nat_ips == 0 || gw->n_nat_ips > HP_MAX_NAT_IPS ||
	    gw->port_max < gw->port_min)
		return V_DROP_NO_ROUTE; /* a client of a gateway with no NAT IP: never untranslated */
	int rc = nat_take_port(p, cfg, gw_id, gw, rk);
	if (!rc)
		return 0;
	if (rc != -EEXIST) {
		res_count(KIND_NAT_OUT, gw_id, RES_REFUSED);
		return V_DROP_TABLE_FULL;
	}
	struct gw_metrics *m = gw_stats.lookup(&gw_id);
	if (m)
		m->error_port_allocation++;
	return V_DROP_PORT_ALLOC;
}

/* Create both entries of a new NAT flow whose port is reserved (rk; PROG_NAT_FLOW).
 * Returns 0 and sets *out, or a verdict. */
static __always_inline int nat_new_flow(struct pkt *p, struct hp_config *cfg, __u32 gw_id,
					struct nat_resv_key *rk, struct flow_value **out)
{
	struct flow_key reply = { .src_ip = rk->dst_ip, .dst_ip = rk->nat_ip,
				  .src_port = rk->dst_port, .dst_port = rk->nat_port,
				  .proto = rk->proto };
	int rc = flow_create(p, cfg, rk->nat_ip, rk->nat_port, p->key.dst_ip, p->key.dst_port,
			     KIND_NAT_OUT, KIND_NAT_IN, gw_id, 0, out);
	if (rc == CREATE_OK) {
		struct gw_metrics *m = gw_stats.lookup(&gw_id);
		if (m)
			m->connection_attempt++;
		return 0;
	}
	resv_release(&reply, &p->key);
	if (rc == CREATE_RACE)
		return 0;
	if (rc == CREATE_TAKEN)
		return V_DROP_TUPLE_TAKEN;
	res_count(KIND_NAT_OUT, gw_id, RES_REFUSED);
	return V_DROP_TABLE_FULL;
}

#endif
