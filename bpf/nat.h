/* NAT gateway: port allocation unique per destination, and new outbound flows. */
#ifndef HP_NAT_H
#define HP_NAT_H

_Static_assert((HP_MAX_NAT_IPS & (HP_MAX_NAT_IPS - 1)) == 0, "HP_MAX_NAT_IPS: a power of two");

/* Try to take (nat_ip, nat_port) toward the packet's destination. A stale reservation
 * (its flow gone or expired) is reclaimed: delete, then insert with BPF_NOEXIST again,
 * so of two CPUs racing for one port exactly one wins. Returns 0, -EEXIST or another
 * error (table full). */
static __always_inline int resv_try(struct hp_config *cfg, struct nat_resv_key *rk,
				    struct nat_resv_value *rv, __u64 now)
{
	int rc = nat_resv.insert(rk, rv);
	if (rc == 0)
		return 0;
	struct nat_resv_value *old = nat_resv.lookup(rk);
	if (!old)
		return rc == -EEXIST ? -EEXIST : rc; /* freed meanwhile: try the next one */
	struct flow_value *f = flows.lookup(&old->orig);
	if (f && f->kind == KIND_NAT_OUT && f->twin.dst_port == rk->nat_port &&
	    f->twin.dst_ip == rk->nat_ip && !flow_expired(cfg, f, rk->proto, now))
		return -EEXIST;
	nat_resv.delete(rk);
	rc = nat_resv.insert(rk, rv);
	if (rc == 0)
		stat_inc(S_RESV_RECLAIMED);
	return rc;
}

/* Candidate number i of a port search: linear probing from a hashed start covers a tiny
 * range whole, and finds a free port in a big one quickly until it is nearly full. */
static __always_inline void port_candidate(struct gw_config *gw, __u32 h, __u32 i,
					   struct nat_resv_key *rk)
{
	__u32 ip_idx = (h + i) % gw->n_nat_ips;
	/* verifier workaround: LLVM drops any bound it can prove (ip_idx < n_nat_ips <= 8)
	 * unless the value is hidden from it, and the verifier needs one on the index */
	asm volatile("" : "+r"(ip_idx));
	ip_idx &= HP_MAX_NAT_IPS - 1;
	__u32 range = (__u32)gw->port_max - gw->port_min + 1;
	rk->nat_ip = gw->nat_ips[ip_idx];
	rk->nat_port = bpf_htons((__u16)(gw->port_min + ((h >> 8) + i) % range));
}

/* Create both entries of a new NAT flow. Returns 0 and sets *out, or a verdict. */
static __always_inline int nat_new_flow(struct pkt *p, struct hp_config *cfg, __u32 gw_id,
					struct flow_value **out)
{
	struct gw_config *gw = gateways.lookup(&gw_id);
	if (!gw || gw->n_nat_ips == 0 || gw->n_nat_ips > HP_MAX_NAT_IPS ||
	    gw->port_max < gw->port_min)
		return V_PASS_NO_RESOURCE;
	__u32 h = flow_hash(&p->key, cfg->hash_seed);

	struct nat_resv_key rk = {};
	struct nat_resv_value rv = {};
	rk.dst_ip = p->key.dst_ip;
	rk.dst_port = p->key.dst_port;
	rk.proto = p->key.proto;
	rv.orig = p->key;
	rv.taken_ns = p->now;

	/* The probe loop only inserts with BPF_NOEXIST: a small body keeps the verifier
	 * within its limits for 32+ probes. Stale reservations are reclaimed below (one
	 * candidate per new flow) and by the controller's garbage collection. */
	int rc = -EEXIST;
	for (__u32 i = 0; i < HP_PORT_PROBES; i++) {
		port_candidate(gw, h, i, &rk);
		rc = nat_resv.insert(&rk, &rv);
		if (rc != -EEXIST)
			break;
	}
	if (rc == -EEXIST) {
		port_candidate(gw, h, 0, &rk);
		rc = resv_try(cfg, &rk, &rv, p->now);
	}
	if (rc != 0) {
		int full = rc != -EEXIST;
		struct gw_metrics *m = gw_stats.lookup(&gw_id);
		if (m && !full)
			m->error_port_allocation++;
		return full ? V_DROP_TABLE_FULL : V_DROP_PORT_ALLOC;
	}

	*out = flow_create(p, rk.nat_ip, rk.nat_port, p->key.dst_ip, p->key.dst_port,
			   KIND_NAT_OUT, KIND_NAT_IN, gw_id, 0);
	if (!*out)
		goto full;
	struct gw_metrics *m = gw_stats.lookup(&gw_id);
	if (m)
		m->connection_attempt++;
	return 0;
full:
	nat_resv.delete(&rk);
	return V_DROP_TABLE_FULL;
}

#endif
