/* Flow table helpers: timeouts, events, TCP state, deletion. */
#ifndef HP_FLOW_H
#define HP_FLOW_H

#define TH_FIN 0x01
#define TH_SYN 0x02
#define TH_RST 0x04
#define TH_ACK 0x10

static __always_inline void stat_inc(__u32 idx)
{
	__u64 *c = stats.lookup(&idx);
	if (c)
		*c += 1; /* per-CPU slot: no atomic needed */
}

static __always_inline struct hp_config *get_config(void)
{
	__u32 zero = 0;
	return config.lookup(&zero);
}

/* A stable, seeded hash of the 5-tuple (murmur3's finaliser over the fields). */
static __always_inline __u32 flow_hash(struct flow_key *k, __u32 seed)
{
	__u32 h = seed ^ k->src_ip;
	h = h * 0xcc9e2d51 ^ k->dst_ip;
	h = h * 0x1b873593 ^ (((__u32)k->src_port << 16) | k->dst_port);
	h = h * 0xe6546b64 ^ k->proto;
	h ^= h >> 16;
	h *= 0x85ebca6b;
	h ^= h >> 13;
	h *= 0xc2b2ae35;
	h ^= h >> 16;
	return h;
}

static __always_inline int is_reply_kind(__u8 kind)
{
	return kind == KIND_NAT_IN || kind == KIND_NLB_OUT;
}

static __always_inline __u64 flow_timeout_ns(struct hp_config *cfg, __u8 proto, __u8 tcp_state)
{
	__u32 idx = TO_ICMP;
	if (proto == IPPROTO_TCP) {
		if (tcp_state == TCP_S_ESTABLISHED)
			idx = TO_TCP_ESTABLISHED;
		else if (tcp_state == TCP_S_SYN_SENT)
			idx = TO_TCP_SYN;
		else
			idx = TO_TCP_CLOSING;
	} else if (proto == IPPROTO_UDP) {
		idx = TO_UDP;
	}
	if (idx >= TO_MAX)
		return 0;
	return (__u64)cfg->timeout_s[idx] * HP_NSEC;
}

/* Idle past its timeout in both directions? Only the rare case (this direction idle)
 * looks at the twin, so a one-way stream stays alive on its quiet side. */
static __always_inline int flow_expired(struct hp_config *cfg, struct flow_value *v,
					__u8 proto, __u64 now)
{
	__u64 to = flow_timeout_ns(cfg, proto, v->tcp_state);
	if (v->last_seen_ns + to >= now)
		return 0;
	struct flow_value *t = flows.lookup(&v->twin);
	if (t && t->last_seen_ns + to >= now)
		return 0;
	return 1;
}

static __always_inline void emit_event(__u32 type, struct flow_key *k, struct flow_value *v,
				       __u64 now)
{
	struct flow_event *e = flow_events.ringbuf_reserve(sizeof(struct flow_event));
	if (!e) {
		stat_inc(S_EVENT_LOST);
		return;
	}
	e->type = type;
	e->pad = 0;
	e->ts_ns = now;
	__builtin_memcpy(&e->key, k, sizeof(*k));
	__builtin_memcpy(&e->value, v, sizeof(*v));
	/* no wakeup per event: readers consume on a timer (an irq_work per new flow costs
	 * more than the rest of the event) */
	flow_events.ringbuf_submit(e, BPF_RB_NO_WAKEUP);
}

/* The reservation of a NAT flow, built from its reply-direction key. */
static __always_inline void resv_key_of(struct flow_key *reply, struct nat_resv_key *rk)
{
	rk->dst_ip = reply->src_ip;
	rk->nat_ip = reply->dst_ip;
	rk->dst_port = reply->src_port;
	rk->nat_port = reply->dst_port;
	rk->proto = reply->proto;
	rk->pad[0] = rk->pad[1] = rk->pad[2] = 0;
}

/* Remove both entries of a flow and, for NAT, its port reservation (if still its own). */
static __always_inline void flow_delete(struct flow_key *k, struct flow_value *v)
{
	struct flow_key key = *k;
	struct flow_key twin = v->twin;
	__u8 kind = v->kind;
	if (kind == KIND_NAT_OUT || kind == KIND_NAT_IN) {
		struct nat_resv_key rk = {};
		struct flow_key *orig = kind == KIND_NAT_OUT ? &key : &twin;
		resv_key_of(kind == KIND_NAT_IN ? &key : &twin, &rk);
		struct nat_resv_value *rv = nat_resv.lookup(&rk);
		if (rv && rv->orig.src_ip == orig->src_ip && rv->orig.src_port == orig->src_port)
			nat_resv.delete(&rk);
	}
	flows.delete(&twin);
	flows.delete(&key);
}

/* Create both entries of a new flow whose original direction (p->key) is translated to
 * (nsrc:nsport -> ndst:ndport). The reply key is that tuple reversed, and the reply entry
 * translates back to p->key reversed. Returns the original entry, or 0 when the table
 * refused an insert (nothing is left behind then). */
static __always_inline struct flow_value *flow_create(struct pkt *p, __be32 nsrc, __be16 nsport,
						      __be32 ndst, __be16 ndport, __u8 kind,
						      __u8 reply_kind, __u16 resource, __u16 target)
{
	struct flow_key reply = {};
	reply.src_ip = ndst;
	reply.dst_ip = nsrc;
	reply.src_port = ndport;
	reply.dst_port = nsport;
	reply.proto = p->key.proto;

	struct flow_value v = {};
	v.created_ns = p->now;
	v.last_seen_ns = p->now;
	v.resource = resource;
	v.target = target;
	v.tcp_state = p->key.proto == IPPROTO_TCP ? TCP_S_SYN_SENT : TCP_S_NONE;

	v.twin = p->key;
	v.kind = reply_kind;
	v.new_src_ip = p->key.dst_ip;
	v.new_src_port = p->key.dst_port;
	v.new_dst_ip = p->key.src_ip;
	v.new_dst_port = p->key.src_port;
	if (flows.update(&reply, &v) != 0)
		return 0;

	v.twin = reply;
	v.kind = kind;
	v.new_src_ip = nsrc;
	v.new_src_port = nsport;
	v.new_dst_ip = ndst;
	v.new_dst_port = ndport;
	if (flows.update(&p->key, &v) != 0) {
		flows.delete(&reply);
		return 0;
	}
	struct flow_value *out = flows.lookup(&p->key);
	if (!out) {
		flows.delete(&reply);
		return 0;
	}
	stat_inc(S_FLOW_CREATED);
	emit_event(EV_FLOW_CREATED, &p->key, &v, p->now);
	return out;
}

/* Follow SYN / FIN / RST. Returns 1 when this packet closed the flow. State changes are
 * rare, so only then is the twin entry looked up and kept in step. */
static __always_inline int tcp_track(struct flow_value *v, __u8 flags, int *established)
{
	if (!(flags & (TH_SYN | TH_FIN | TH_RST)))
		return 0;
	__u8 state = v->tcp_state;
	__u8 fin = v->fin_seen;
	if (flags & TH_RST) {
		state = TCP_S_CLOSED;
	} else if ((flags & TH_SYN) && (flags & TH_ACK) && is_reply_kind(v->kind) &&
		   state == TCP_S_SYN_SENT) {
		state = TCP_S_ESTABLISHED;
		*established = 1;
	}
	if (flags & TH_FIN) {
		fin |= 1;
		state = fin == 3 ? TCP_S_CLOSED : TCP_S_FIN_WAIT;
	}
	if (state == v->tcp_state && fin == v->fin_seen)
		return 0;
	int closed = state == TCP_S_CLOSED && v->tcp_state != TCP_S_CLOSED;
	v->tcp_state = state;
	v->fin_seen = fin;
	struct flow_value *t = flows.lookup(&v->twin);
	if (t) {
		t->tcp_state = state;
		/* the twin sees our FIN as its peer's (bit 1) */
		t->fin_seen = (t->fin_seen & 1) | ((fin & 1) << 1);
	}
	return closed;
}

#endif
