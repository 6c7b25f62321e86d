/* Flow tables: lookup, creation (race-free), confirmation, TCP state, deletion, timeouts.
 *
 * A new flow's two entries go into `pending` (an LRU); the first reply (TCP: the SYN-ACK,
 * or the client's ACK when this node did not see the SYN-ACK) moves them to `flows`,
 * which never evicts. A flood of spoofed SYNs therefore only churns `pending`. */
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

static __always_inline struct scratch *scratch_get(void)
{
	__u32 zero = 0;
	return scratch.lookup(&zero);
}

/* x, through memory the verifier does not track: what is derived from the result no
 * longer ties verifier states to how x was computed (a loop counter would otherwise be
 * marked precise, and every iteration's exit verified separately). Verifier workaround. */
static __always_inline __u32 opaque_u32(struct scratch *s, __u32 x)
{
	*(volatile __u32 *)&s->opaque = x;
	return *(volatile __u32 *)&s->opaque;
}

/* Zeroed route lookup parameters in the per-CPU scratch space (the stack is too small
 * for every lookup's own copy). */
static __always_inline struct bpf_fib_lookup *fib_params(void)
{
	struct scratch *s = scratch_get();
	if (!s)
		return 0;
	__builtin_memset(&s->fib, 0, sizeof(s->fib));
	return &s->fib;
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

static __always_inline int is_nat_kind(__u8 kind)
{
	return kind == KIND_NAT_OUT || kind == KIND_NAT_IN;
}

static __always_inline __u64 flow_timeout_ns(struct hp_config *cfg, __u8 proto, __u8 tcp_state)
{
	__u32 idx = TO_ICMP;
	if (proto == IPPROTO_TCP) {
		/* half-closed (one FIN) is still an open connection: AWS's 350 s idle rule */
		if (tcp_state == TCP_S_ESTABLISHED || tcp_state == TCP_S_FIN_WAIT)
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

/* The entry of key in the table v's flags name (an entry's twin is in the same table). */
static __always_inline struct flow_value *flow_in(struct flow_key *k, __u8 flags)
{
	if (flags & FLOW_F_PENDING)
		return pending.lookup(k);
	return flows.lookup(k);
}

/* The entry of a packet's key in either table. A confirmation moves entries from pending
 * to flows (insert, then delete): looking at flows again after a miss in pending closes
 * the window in which a packet would find neither. */
static __always_inline struct flow_value *flow_find(struct flow_key *k)
{
	struct flow_value *v = flows.lookup(k);
	if (v)
		return v;
	v = pending.lookup(k);
	if (v)
		return v;
	return flows.lookup(k);
}

/* Idle past its timeout in both directions? Only the rare case (this direction idle)
 * looks at the twin, so a one-way stream stays alive on its quiet side. */
static __always_inline int flow_expired(struct hp_config *cfg, struct flow_value *v,
					__u8 proto, __u64 now)
{
	__u64 to = flow_timeout_ns(cfg, proto, v->tcp_state);
	if (v->last_seen_ns + to >= now)
		return 0;
	struct flow_value *t = flow_in(&v->twin, v->flags);
	if (t && t->last_seen_ns + to >= now)
		return 0;
	return 1;
}

/* The record of a flow for other nodes, from either of its entries (k, v). Written with
 * selects rather than two copies of the code: it is inlined at every event. resource is
 * the entry's own (gateway id, or the listener's row, which the agent names by its load
 * balancer before the record leaves the node). */
static __always_inline void record_of(struct flow_record *r, struct flow_key *k,
				      struct flow_value *v, __u64 now, __u32 origin)
{
	int reply = is_reply_kind(v->kind);
	struct flow_key *orig = reply ? &v->twin : k;
	r->key = *orig;
	r->new_src_ip = reply ? k->dst_ip : v->new_src_ip;
	r->new_dst_ip = reply ? k->src_ip : v->new_dst_ip;
	r->new_src_port = reply ? k->dst_port : v->new_src_port;
	r->new_dst_port = reply ? k->src_port : v->new_dst_port;
	r->kind = v->kind - reply; /* KIND_NAT_IN - 1 = KIND_NAT_OUT, KIND_NLB_OUT - 1 = KIND_NLB_IN */
	__u8 fin = v->fin_seen;
	r->fin_seen = reply ? (((fin & 1) << 1) | ((fin >> 1) & 1)) : fin;
	r->tcp_state = v->tcp_state;
	r->flags = ((v->flags & FLOW_F_PENDING) ? 0 : REC_F_CONFIRMED) |
		   ((v->flags & FLOW_F_REPLY_SEEN) ? REC_F_REPLY_SEEN : 0);
	r->resource = v->resource;
	r->origin = origin;
	r->idle_ms = (now - v->last_seen_ns) / 1000000;
	r->age_ms = (now - v->created_ns) / 1000000;
	r->incarnation = v->incarnation;
}

static __always_inline void emit_event(__u32 type, struct flow_key *k, struct flow_value *v,
				       __u64 now)
{
	struct hp_config *cfg = get_config();
	/* A fleet node's reader replicates confirmed flows only: an unconfirmed flow's
	 * creation and changes (a new TCP flow's first two of three events, every spoofed
	 * SYN's one) are not written while no reader wants them (HP_F_PEER_EVENTS). type is
	 * a constant where this is inlined. */
	if ((type == EV_FLOW_CREATED || type == EV_FLOW_CHANGED) && (v->flags & FLOW_F_PENDING) &&
	    cfg && (cfg->flags & HP_F_PEER_EVENTS))
		return;
	struct flow_event *e = flow_events.ringbuf_reserve(sizeof(struct flow_event));
	if (!e) {
		stat_inc(S_EVENT_LOST);
		return;
	}
	e->type = type;
	e->ts_ns = now;
	record_of(&e->rec, k, v, now, cfg ? cfg->node_id : 0);
	e->flags = is_reply_kind(v->kind) ? EVF_REPLY : 0;
	e->packets = v->packets;
	e->bytes = v->bytes;
	e->twin_packets = 0;
	e->twin_bytes = 0;
	e->in_ifindex = v->in_ifindex;
	e->twin_in_ifindex = 0;
	/* type is a constant where this is inlined: only the deleting events look */
	if (type == EV_FLOW_EXPIRED || type == EV_FLOW_REMOVED) {
		struct flow_value *t = flow_in(&v->twin, v->flags);
		if (t) {
			e->twin_packets = t->packets;
			e->twin_bytes = t->bytes;
			e->twin_in_ifindex = t->in_ifindex;
		}
	}
	/* A fleet node's sync task sleeps on the ring (poll) so a flow is replicated within
	 * a millisecond: adaptive wakeup, which the kernel sends only when the reader had
	 * caught up (a busy ring costs no wakeup per event). Elsewhere readers consume on a
	 * timer and no event pays for an irq_work. */
	flow_events.ringbuf_submit(e, (cfg && (cfg->flags & HP_F_EVENT_WAKEUP)) ?
				   0 : BPF_RB_NO_WAKEUP);
}

/* --- per-resource flow counters (active = confirmed - ended - user_ends) ------------- */

#define RES_CONFIRMED 0
#define RES_ENDED 1
#define RES_REFUSED 2

/* gw_metrics and lb_metrics name these counters alike */
#define RES_BUMP(m, what)						\
	do {								\
		if ((what) == RES_CONFIRMED)				\
			(m)->flows_confirmed++;				\
		else if ((what) == RES_ENDED)				\
			(m)->flows_ended++;				\
		else							\
			(m)->flows_refused++;				\
	} while (0)

static __always_inline void res_count(__u8 kind, __u16 resource, int what)
{
	__u32 id = resource;
	if (is_nat_kind(kind)) {
		struct gw_metrics *m = gw_stats.lookup(&id);
		if (m)
			RES_BUMP(m, what);
	} else {
		struct lb_metrics *m = lb_stats.lookup(&id);
		if (m)
			RES_BUMP(m, what);
	}
}

/* --- deletion ------------------------------------------------------------------------- */

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

/* Release a NAT port if the reservation is still the one of flow `orig`. */
static __always_inline void resv_release(struct flow_key *reply, struct flow_key *orig)
{
	struct nat_resv_key rk = {};
	resv_key_of(reply, &rk);
	struct nat_resv_value *rv = nat_resv.lookup(&rk);
	if (rv && rv->orig.src_ip == orig->src_ip && rv->orig.src_port == orig->src_port &&
	    rv->orig.dst_ip == orig->dst_ip)
		nat_resv.delete(&rk);
}

/* Remove both entries of a flow and, for NAT, its port reservation (if still its own). */
static __always_inline void flow_delete(struct flow_key *k, struct flow_value *v)
{
	struct flow_key key = *k;
	struct flow_key twin = v->twin;
	__u8 kind = v->kind;
	__u8 flags = v->flags;
	if (!(flags & FLOW_F_PENDING) && v->tcp_state != TCP_S_CLOSED)
		res_count(kind, v->resource, RES_ENDED);
	if (is_nat_kind(kind))
		resv_release(kind == KIND_NAT_IN ? &key : &twin, kind == KIND_NAT_OUT ? &key : &twin);
	if (flags & FLOW_F_PENDING) {
		pending.delete(&twin);
		pending.delete(&key);
	} else {
		flows.delete(&twin);
		flows.delete(&key);
	}
}

/* An entry in the way of a new flow: delete it if its flow is over (expired, or its twin
 * gone). Returns 1 when the key is free now. */
static __always_inline int flow_clear_stale(struct hp_config *cfg, struct flow_key *k,
					    struct flow_value *v, __u64 now)
{
	if (!flow_expired(cfg, v, k->proto, now) && flow_in(&v->twin, v->flags))
		return 0;
	stat_inc(S_STALE_REPLACED);
	emit_event(EV_FLOW_REMOVED, k, v, now);
	flow_delete(k, v);
	return 1;
}

/* --- creation --------------------------------------------------------------------------- */

/* The reply key of a new flow translated to (nsrc:nsport -> ndst:ndport) is free in both
 * tables (stale entries are cleared). */
static __always_inline int reply_key_free(struct hp_config *cfg, struct flow_key *reply,
					  __u64 now)
{
	struct flow_value *old = flows.lookup(reply);
	if (old && !flow_clear_stale(cfg, reply, old, now))
		return 0;
	old = pending.lookup(reply);
	if (old && !flow_clear_stale(cfg, reply, old, now))
		return 0;
	return 1;
}

#define CREATE_OK 0
#define CREATE_RACE 1   /* another CPU created the same flow first: *out is its entry */
#define CREATE_TAKEN 2  /* the reply tuple belongs to another live flow */
#define CREATE_FULL 3

/* Create both entries of a new flow whose original direction (p->key) is translated to
 * (nsrc:nsport -> ndst:ndport), unconfirmed. The reply key is that tuple reversed, and
 * the reply entry translates back to p->key reversed. Both are inserted with BPF_NOEXIST,
 * the original direction's first: of two CPUs missing on the same new tuple exactly one
 * inserts it and goes on, the other uses the winner's entry. Only then is the reply key
 * checked and inserted, so a reply entry never exists without its original (another CPU
 * would take it for a stale one and delete it, or take its tuple for another flow's: with
 * the reply key first, the load balancer's loser, whose reply key is the winner's, was
 * refused or broke the winner's flow). The original direction arrives where this packet
 * did; the reply direction's interface is learned through the reverse-path check of its
 * first packet (in_ifindex 0). */
static __always_inline int flow_create(struct pkt *p, struct hp_config *cfg, __be32 nsrc,
				       __be16 nsport, __be32 ndst, __be16 ndport, __u8 kind,
				       __u8 reply_kind, __u16 resource, __u16 target,
				       struct flow_value **out)
{
	struct flow_key reply = {};
	reply.src_ip = ndst;
	reply.dst_ip = nsrc;
	reply.src_port = ndport;
	reply.dst_port = nsport;
	reply.proto = p->key.proto;

	struct scratch *s = scratch_get();
	if (!s)
		return CREATE_FULL;
	struct flow_value *v = &s->flow;
	__builtin_memset(v, 0, sizeof(*v));
	v->created_ns = p->now;
	v->created_here = 1;
	v->last_seen_ns = p->now;
	v->resource = resource;
	v->target = target;
	v->flags = FLOW_F_PENDING;
	v->wscale = WSCALE_NONE;
	v->tcp_state = p->key.proto == IPPROTO_TCP ? TCP_S_SYN_SENT : TCP_S_NONE;
	/* the generation after the predecessor's deleted on the way here, else 0 */
	__u32 gen = p->prev_incarnation ? (p->prev_incarnation >> INC_GEN_SHIFT) + 1 : 0;
	v->incarnation = (gen << INC_GEN_SHIFT) |
			 (bpf_get_prandom_u32() & ((1U << INC_GEN_SHIFT) - 1)) | 1; /* never 0 */

	v->twin = reply;
	v->kind = kind;
	/* a packet a peer handed over came in on the sync network: the interface the
	 * flow's packets arrive on is learned from its first own packet */
	v->in_ifindex = p->from_peer ? 0 : p->ifindex;
	v->new_src_ip = nsrc;
	v->new_src_port = nsport;
	v->new_dst_ip = ndst;
	v->new_dst_port = ndport;
	int rc = pending.insert(&p->key, v);
	if (rc) {
		if (rc != -EEXIST)
			return CREATE_FULL;
		*out = flow_find(&p->key);
		stat_inc(S_CREATE_RACE);
		return *out ? CREATE_RACE : CREATE_FULL;
	}

	if (!reply_key_free(cfg, &reply, p->now)) {
		pending.delete(&p->key);
		return CREATE_TAKEN;
	}
	v->twin = p->key;
	v->kind = reply_kind;
	v->in_ifindex = 0;
	v->new_src_ip = p->key.dst_ip;
	v->new_src_port = p->key.dst_port;
	v->new_dst_ip = p->key.src_ip;
	v->new_dst_port = p->key.src_port;
	rc = pending.insert(&reply, v);
	if (rc) { /* taken by another flow since the check, or the table failed */
		pending.delete(&p->key);
		return rc == -EEXIST ? CREATE_TAKEN : CREATE_FULL;
	}
	*out = pending.lookup(&p->key);
	if (!*out) { /* evicted at once: the LRU is under heavy pressure */
		pending.delete(&reply);
		return CREATE_FULL;
	}
	stat_inc(S_FLOW_CREATED);
	emit_event(EV_FLOW_CREATED, &p->key, *out, p->now);
	return CREATE_OK;
}

/* Move both entries of an unconfirmed flow to the flow table. Returns the entry of `k`
 * that packets now use (the moved one, or v when the table is full). quiet: no event (a
 * peer's record confirmed it: the peer has told the others). The entries are
 * inserted straight from the pending map's values (no stack copies: the stack is 512
 * bytes). */
static __always_inline struct flow_value *flow_confirm(struct flow_key *k, struct flow_value *v,
						       __u64 now, int quiet)
{
	struct flow_key key = *k;
	struct flow_key twin_key = v->twin;
	struct flow_value *t = pending.lookup(&twin_key);
	if (!t)
		return v; /* the twin was evicted: the flow is dying; leave it */
	v->flags &= ~FLOW_F_PENDING;
	t->flags &= ~FLOW_F_PENDING;
	int rc = flows.insert(&twin_key, t);
	if (rc && rc != -EEXIST)
		goto full;
	int rc2 = flows.insert(&key, v);
	if (rc2 && rc2 != -EEXIST) {
		if (!rc)
			flows.delete(&twin_key);
		goto full;
	}
	int moved_here = !rc && !rc2; /* not moved concurrently by another CPU */
	if (moved_here) {
		stat_inc(S_FLOW_CONFIRMED);
		res_count(v->kind, v->resource, RES_CONFIRMED);
	}
	pending.delete(&twin_key);
	pending.delete(&key);
	struct flow_value *moved = flows.lookup(&key);
	if (moved && moved_here && !quiet)
		emit_event(EV_FLOW_CONFIRMED, &key, moved, now);
	return moved ? moved : v;
full:
	v->flags |= FLOW_F_PENDING;
	t->flags |= FLOW_F_PENDING;
	stat_inc(S_CONFIRM_FULL);
	res_count(v->kind, v->resource, RES_REFUSED);
	return v;
}

/* --- TCP ------------------------------------------------------------------------------- */

#define TCP_TRACK_OK 0
#define TCP_TRACK_CLOSED 1      /* this packet closed the flow */
#define TCP_TRACK_ESTABLISHED 2 /* this packet established it */
#define TCP_TRACK_INVALID 3     /* a RST outside the window: drop it, keep the flow */

/* Is a RST from v's direction plausible? conntrack's rule: its sequence number falls in
 * the window the other side advertised last (or, before the other side said anything,
 * a RST answering a SYN acknowledges exactly that SYN). Without any data (a flow
 * learned from another node) there is nothing to judge by: accepted. */
static __always_inline int rst_plausible(struct pkt *p, struct flow_value *v,
					 struct flow_value *t)
{
	if (!t)
		return 1;
	__u32 seq = bpf_ntohl(p->tcp->seq);
	if (t->flags & FLOW_F_ACK_SEEN) {
		__u32 win = t->win ? t->win : 1;
		return seq - t->ack < win;
	}
	if (t->syn_next && (p->tcp_flags & TH_ACK))
		return bpf_ntohl(p->tcp->ack_seq) == t->syn_next;
	return 1;
}

/* Follow SYN / FIN / RST and the last ACK and window of each side. The per-packet part is
 * two stores; state changes are rare, and only then is the twin entry looked up and kept
 * in step. */
static __always_inline int tcp_track(struct pkt *p, struct flow_value *v)
{
	__u8 flags = p->tcp_flags;
	struct tcphdr *th = p->tcp;
	if (flags & TH_ACK) {
		__u8 shift = v->wscale == WSCALE_NONE ? 0 : v->wscale;
		v->ack = bpf_ntohl(th->ack_seq);
		v->win = (__u32)bpf_ntohs(th->window) << (shift & 15);
		v->flags |= FLOW_F_ACK_SEEN;
	}
	if (!(flags & (TH_SYN | TH_FIN | TH_RST)) && v->tcp_state != TCP_S_SYN_SENT)
		return TCP_TRACK_OK;

	struct flow_value *t = flow_in(&v->twin, v->flags);
	__u8 state = v->tcp_state;
	__u8 fin = v->fin_seen;
	int rc = TCP_TRACK_OK;
	if (flags & TH_RST) {
		if (!rst_plausible(p, v, t))
			return TCP_TRACK_INVALID;
		state = TCP_S_CLOSED;
	} else if (flags & TH_SYN) {
		v->syn_next = bpf_ntohl(th->seq) + 1;
		v->wscale = p->wscale;
		if ((flags & TH_ACK) && is_reply_kind(v->kind) && state == TCP_S_SYN_SENT) {
			state = TCP_S_ESTABLISHED;
			rc = TCP_TRACK_ESTABLISHED;
			/* RFC 7323: scaling only when both SYNs carried the option */
			if (t && (t->wscale == WSCALE_NONE || v->wscale == WSCALE_NONE)) {
				t->wscale = 0;
				v->wscale = 0;
			}
		}
	} else if ((flags & TH_ACK) && !is_reply_kind(v->kind) && state == TCP_S_SYN_SENT) {
		/* the client's ACK of a SYN-ACK this node did not see (another node did) */
		state = TCP_S_ESTABLISHED;
		rc = TCP_TRACK_ESTABLISHED;
	}
	if (flags & TH_FIN) {
		fin |= 1;
		state = fin == 3 ? TCP_S_CLOSED : TCP_S_FIN_WAIT;
	}
	if (state == v->tcp_state && fin == v->fin_seen)
		return rc;
	if (state == TCP_S_CLOSED && v->tcp_state != TCP_S_CLOSED) {
		rc = TCP_TRACK_CLOSED;
		if (!(v->flags & FLOW_F_PENDING))
			res_count(v->kind, v->resource, RES_ENDED);
	}
	v->tcp_state = state;
	v->fin_seen = fin;
	if (t) {
		t->tcp_state = state;
		/* the twin sees our FIN as its peer's (bit 1) */
		t->fin_seen = (t->fin_seen & 1) | ((fin & 1) << 1);
	}
	if (rc != TCP_TRACK_CLOSED) /* a close has its own event (count_tcp_close) */
		emit_event(EV_FLOW_CHANGED, &p->key, v, p->now);
	return rc;
}

/* Should this packet confirm its unconfirmed flow? A reply alone does not: a target or a
 * server answers a spoofed SYN too. The originator's next packet after a reply does (TCP:
 * the ACK that completes the handshake, which a spoofer never sees the SYN-ACK for;
 * UDP/ICMP: conntrack's "assured" stream), and so does the client's ACK of a SYN-ACK this
 * node did not see (tcp_track established). A reply marks both entries REPLY_SEEN. */
static __always_inline int flow_should_confirm(struct pkt *p, struct flow_value *v, int track)
{
	if (is_reply_kind(v->kind)) {
		if (!(v->flags & FLOW_F_REPLY_SEEN)) {
			v->flags |= FLOW_F_REPLY_SEEN;
			struct flow_value *t = flow_in(&v->twin, v->flags);
			if (t)
				t->flags |= FLOW_F_REPLY_SEEN;
		}
		return 0;
	}
	if (!p->tcp)
		return (v->flags & FLOW_F_REPLY_SEEN) != 0;
	if (track == TCP_TRACK_ESTABLISHED) /* by the client's ACK */
		return 1;
	return (v->flags & FLOW_F_REPLY_SEEN) && v->tcp_state == TCP_S_ESTABLISHED &&
	       (p->tcp_flags & (TH_ACK | TH_SYN)) == TH_ACK;
}

#endif
