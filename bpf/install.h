/* Fleet: installing flow records from peers (PROG install, run by the agent through
 * BPF_PROG_TEST_RUN with a batch of records as its "packet"). A record either creates
 * the flow's two entries here (a replica: its NAT port reserved too) or is merged into
 * the flow this node holds. Merging only moves forward, whatever order records from
 * several nodes arrive in: TCP state and FIN bits never go back, the last packet seen is
 * the latest any node saw. A record of the flow's own incarnation always merges; one of
 * another flow on the same tuple replaces it if newer (by generation or by age, see
 * inc_follows) and is refused if older. Every record is counted (S_REC_*). */
#ifndef HP_INSTALL_H
#define HP_INSTALL_H

/* The batch's header (test_run wants an Ethernet header). The installer writes its
 * outcomes over it: __u16 counts indexed by S_REC_* - S_REC_INSTALLED, so the agent
 * learns what became of a batch without reading the per-CPU counters twice a call. */
#define INSTALL_HDR 16
_Static_assert(sizeof(((struct scratch *)0)->rec_out) == INSTALL_HDR,
	       "the outcomes fill the header");

/* Count a record's outcome on the node's counter and in this run's header. */
static __always_inline void rec_outcome(struct scratch *s, __u32 idx)
{
	stat_inc(idx);
	__u32 i = idx - S_REC_INSTALLED;
	if (i < sizeof(s->rec_out) / sizeof(s->rec_out[0]))
		s->rec_out[i]++;
}

/* How far a flow has gone: TCP states in order; UDP/ICMP are TCP_S_NONE. */
static __always_inline __u8 state_max(__u8 a, __u8 b)
{
	return a > b ? a : b;
}

/* Incarnation a is the one created on its tuple after b deleted it (bpf/consts.h
 * INC_GEN_SHIFT). */
static __always_inline int inc_follows(__u32 a, __u32 b)
{
	return (__u8)(a >> INC_GEN_SHIFT) == (__u8)((b >> INC_GEN_SHIFT) + 1);
}

/* Merge record r into the flow held here (v: its original direction's entry). */
static __always_inline void install_merge(struct flow_record *r, struct flow_key *k,
					  struct flow_value *v, __u64 last_seen, __u64 now)
{
	struct flow_value *t = flow_in(&v->twin, v->flags);
	__u8 old_state = v->tcp_state;
	__u8 state = state_max(old_state, r->tcp_state);
	__u8 fin = v->fin_seen | r->fin_seen;
	/* the two FINs seen on two nodes (each one's FIN_WAIT): closed, as the packet path
	 * closes a flow that has seen both (bpf/flow.h); else it stays active until expiry */
	if (fin == 3 && state < TCP_S_CLOSED && r->key.proto == IPPROTO_TCP)
		state = TCP_S_CLOSED;
	int confirm = (r->flags & REC_F_CONFIRMED) && (v->flags & FLOW_F_PENDING);
	/* A flow is active from its confirmation to its close: one record may do both (a
	 * short flow whose earlier records came late); counted after the confirmation. */
	int ended = state == TCP_S_CLOSED && old_state != TCP_S_CLOSED &&
		    (!(v->flags & FLOW_F_PENDING) || confirm);
	__u8 kind = v->kind;
	__u16 resource = v->resource;
	v->tcp_state = state;
	v->fin_seen = fin;
	v->synced = now >> SYNC_STAMP_SHIFT;
	/* a flow installed from a record that named no incarnation takes the first one
	 * it hears of (the merge is of the same flow by age) */
	__u32 inc = v->incarnation ? v->incarnation : r->incarnation;
	v->incarnation = inc;
	if (last_seen > v->last_seen_ns)
		v->last_seen_ns = last_seen;
	if (r->flags & REC_F_REPLY_SEEN)
		v->flags |= FLOW_F_REPLY_SEEN;
	if (t) {
		t->tcp_state = state;
		t->incarnation = inc;
		t->synced = v->synced;
		t->fin_seen = ((fin & 1) << 1) | ((fin >> 1) & 1);
		if (r->flags & REC_F_REPLY_SEEN)
			t->flags |= FLOW_F_REPLY_SEEN;
	}
	/* v is the pending map's value: not used after; flow_confirm returns it when the
	 * flow could not move (not confirmed, so not counted as ended either) */
	if (confirm && flow_confirm(k, v, now, 1) == v)
		ended = 0;
	if (ended)
		res_count(kind, resource, RES_ENDED);
}

/* Install one record (in the scratch space). */
static __always_inline void install_record(struct hp_config *cfg, struct scratch *s, __u64 now)
{
	struct flow_record *r = &s->rec;
	__u8 proto = r->key.proto;
	if ((r->kind != KIND_NAT_OUT && r->kind != KIND_NLB_IN) || r->tcp_state > TCP_S_CLOSED ||
	    (proto != IPPROTO_TCP && proto != IPPROTO_UDP && proto != IPPROTO_ICMP)) {
		rec_outcome(s, S_REC_REJECTED);
		return;
	}
	/* this node's own names for the record's identities: a NAT IP's gateway, a
	 * listener's row and a target's index (none: a resource not served here) */
	__u16 resource;
	__u16 target = 0;
	__u8 reply_kind;
	if (r->kind == KIND_NAT_OUT) {
		struct nat_ip_value *ni = nat_ips.lookup(&r->new_src_ip);
		if (!ni) {
			rec_outcome(s, S_REC_REJECTED);
			return;
		}
		resource = ni->gw_id;
		reply_kind = KIND_NAT_IN;
	} else {
		struct listener_key lk = { .vip = r->key.dst_ip, .port = r->key.dst_port,
					   .proto = proto };
		struct listener_value *l = listeners.lookup(&lk);
		struct endpoint_key ek = { .ip = r->new_dst_ip, .port = r->new_dst_port };
		__u32 *tid = target_endpoints.lookup(&ek);
		if (!l || !tid) {
			rec_outcome(s, S_REC_REJECTED);
			return;
		}
		resource = l->listener_id;
		target = *tid;
		reply_kind = KIND_NLB_OUT;
	}
	__u64 idle = (__u64)r->idle_ms * 1000000;
	__u64 age = (__u64)r->age_ms * 1000000;
	__u64 last_seen = now > idle ? now - idle : 0;
	__u64 created = now > age ? now - age : 0;
	struct flow_key key = r->key;

	struct flow_value *v = flow_find(&key);
	if (v) {
		if (v->kind != r->kind) { /* the tuple is another flow's reply direction */
			rec_outcome(s, S_REC_CONFLICT);
			return;
		}
		/* A flow keeps its translation and a closed flow never opens again: a record
		 * that differs so names another flow on the reused tuple (the newer one wins,
		 * however soon after; an older one is refused). Else a flow created well
		 * after the one held here is one too. A closed flow's own late records
		 * (another node's stream can deliver them after the close) merge and leave it
		 * closed: those with a FIN, and those of a flow created before the closed
		 * one's last packet (a next flow on the tuple starts after it). */
		int moved = v->new_src_ip != r->new_src_ip || v->new_dst_ip != r->new_dst_ip ||
			    v->new_src_port != r->new_src_port ||
			    v->new_dst_port != r->new_dst_port;
		/* The same incarnation is the same flow, whatever the ages say: a record
		 * is aged when its event is written and can spend seconds in queues on
		 * the way, so a short flow's late record looked created after the flow's
		 * last packet, reopened it and lost the FINs merged before. */
		int same = r->incarnation && r->incarnation == v->incarnation;
		/* Both name their incarnation and differ: another flow on the tuple (a
		 * client reused its port at once), newer or older by age. Its records come
		 * from several nodes in any order, FINs and closes too: merged into the
		 * held flow, they were lost. (The same flow is created twice only when
		 * its owner changes mid-handshake: the newer creation then wins.) Without
		 * incarnations: a closed flow reopens only for a record without a FIN
		 * created after its last packet; its own late records merge. */
		int differ = r->incarnation && v->incarnation && !same;
		int reopen = !same && !moved && v->tcp_state == TCP_S_CLOSED &&
			     r->tcp_state != TCP_S_CLOSED && !r->fin_seen &&
			     created > v->last_seen_ns;
		int other = moved || differ || reopen;
		/* Which is newer: by age, unless the two incarnations were created close
		 * together and one is the other's successor. Ages alone let the late record
		 * of a closed flow, its age taken before it waited in queues, replace the
		 * next flow a client opened on the tuple milliseconds later. */
		int newer = created > v->created_ns;
		if (differ && created < v->created_ns + INC_GEN_WINDOW_NS &&
		    v->created_ns < created + INC_GEN_WINDOW_NS) {
			if (inc_follows(r->incarnation, v->incarnation))
				newer = 1;
			else if (inc_follows(v->incarnation, r->incarnation))
				newer = 0;
		}
		/* an older flow's late record, or one incarnation with two translations
		 * (never made here): refused */
		if (other && (same || !newer)) {
			rec_outcome(s, S_REC_CONFLICT);
			return;
		}
		/* one call site: install_merge is inlined, and a second copy took the
		 * tc program past the verifier's complexity limit (E2BIG) */
		if (same || (!other && (created <= v->created_ns + HP_NSEC ||
					v->tcp_state == TCP_S_CLOSED))) {
			install_merge(r, &key, v, last_seen, now);
			rec_outcome(s, S_REC_MERGED);
			return;
		}
		flow_delete(&key, v);
		rec_outcome(s, S_REC_REPLACED);
	}

	struct flow_key reply = {};
	reply.src_ip = r->new_dst_ip;
	reply.dst_ip = r->new_src_ip;
	reply.src_port = r->new_dst_port;
	reply.dst_port = r->new_src_port;
	reply.proto = proto;
	if (!reply_key_free(cfg, &reply, now)) {
		rec_outcome(s, S_REC_CONFLICT);
		return;
	}
	int confirmed = r->flags & REC_F_CONFIRMED;
	struct flow_value *f = &s->flow;
	__builtin_memset(f, 0, sizeof(*f));
	f->created_ns = created;
	f->last_seen_ns = last_seen;
	f->resource = resource;
	f->target = target;
	f->flags = (confirmed ? 0 : FLOW_F_PENDING) |
		   ((r->flags & REC_F_REPLY_SEEN) ? FLOW_F_REPLY_SEEN : 0);
	f->wscale = WSCALE_NONE;
	f->tcp_state = r->tcp_state;
	f->fin_seen = r->fin_seen;
	f->incarnation = r->incarnation;
	f->synced = now >> SYNC_STAMP_SHIFT;
	f->twin = reply;
	f->kind = r->kind;
	f->new_src_ip = r->new_src_ip;
	f->new_dst_ip = r->new_dst_ip;
	f->new_src_port = r->new_src_port;
	f->new_dst_port = r->new_dst_port;
	/* in_ifindex 0 and no next hop: both are learned from the first packet here */
	int rc = confirmed ? flows.insert(&key, f) : pending.insert(&key, f);
	if (rc) {
		rec_outcome(s, rc == -EEXIST ? S_REC_MERGED : S_REC_FULL); /* -EEXIST: raced a packet */
		return;
	}
	f->twin = key;
	f->kind = reply_kind;
	f->fin_seen = ((r->fin_seen & 1) << 1) | ((r->fin_seen >> 1) & 1);
	f->new_src_ip = key.dst_ip;
	f->new_dst_ip = key.src_ip;
	f->new_src_port = key.dst_port;
	f->new_dst_port = key.src_port;
	rc = confirmed ? flows.insert(&reply, f) : pending.insert(&reply, f);
	if (rc) {
		if (confirmed)
			flows.delete(&key);
		else
			pending.delete(&key);
		rec_outcome(s, rc == -EEXIST ? S_REC_CONFLICT : S_REC_FULL);
		return;
	}
	/* A replica reserves no NAT port (nat_resv): the node whose block holds the port
	 * alone takes ports from it, and the insert was a quarter of a new record's cost.
	 * When a block moves here, the agent reserves the ports of the flows held in it
	 * before this node takes ports from it (hyperplane/fleet/dataplane.py
	 * reserve_held_ports); a port still missed is refused by the flows table (the new
	 * flow's reply key is this flow's: V_DROP_TUPLE_TAKEN), never given twice. */
	if (confirmed) {
		res_count(r->kind, resource, RES_CONFIRMED);
		/* a closed flow's record (its entries here were already gone): held until it
		 * expires, as closed, and not active */
		if (r->tcp_state == TCP_S_CLOSED)
			res_count(r->kind, resource, RES_ENDED);
	}
	rec_outcome(s, S_REC_INSTALLED);
}

#endif
