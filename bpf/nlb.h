/* Network load balancer: a new connection to a listener gets a target from the Maglev
 * table; the flow table then pins it there for its whole life. */
#ifndef HP_NLB_H
#define HP_NLB_H

#define MAGLEV_EMPTY 0xffffffff

static __always_inline int nlb_new_flow(struct pkt *p, struct hp_config *cfg,
					struct listener_value *l, struct flow_value **out)
{
	__u32 lid = l->listener_id;
	if (lid >= HP_MAX_LISTENERS)
		return V_DROP_NO_TARGET;
	__u32 idx = lid * HP_MAGLEV_SIZE + flow_hash(&p->key, cfg->hash_seed) % HP_MAGLEV_SIZE;
	__u32 *slot = maglev.lookup(&idx);
	if (!slot || *slot == MAGLEV_EMPTY)
		return V_DROP_NO_TARGET;
	__u32 tid = *slot;
	struct target_value *t = targets.lookup(&tid);
	if (!t || !(t->flags & TARGET_F_ACTIVE))
		return V_DROP_NO_TARGET;

	struct flow_key reply = {};
	reply.src_ip = t->ip;
	reply.dst_ip = p->key.src_ip;
	reply.src_port = t->port;
	reply.dst_port = p->key.src_port;
	reply.proto = p->key.proto;

	struct flow_value v = {};
	v.created_ns = p->now;
	v.last_seen_ns = p->now;
	v.resource = lid;
	v.target = tid;
	v.tcp_state = p->key.proto == IPPROTO_TCP ? TCP_S_SYN_SENT : TCP_S_NONE;

	/* reply direction: the target answers the client from the listener's address */
	v.twin = p->key;
	v.kind = KIND_NLB_OUT;
	v.new_src_ip = p->key.dst_ip;
	v.new_src_port = p->key.dst_port;
	v.new_dst_ip = p->key.src_ip;
	v.new_dst_port = p->key.src_port;
	if (flows.update(&reply, &v) != 0)
		return V_DROP_TABLE_FULL;

	/* original direction: destination becomes the target; the client IP is kept */
	v.twin = reply;
	v.kind = KIND_NLB_IN;
	v.new_src_ip = p->key.src_ip;
	v.new_src_port = p->key.src_port;
	v.new_dst_ip = t->ip;
	v.new_dst_port = t->port;
	if (flows.update(&p->key, &v) != 0) {
		flows.delete(&reply);
		return V_DROP_TABLE_FULL;
	}
	*out = flows.lookup(&p->key);
	if (!*out)
		return V_DROP_TABLE_FULL;
	struct lb_metrics *m = lb_stats.lookup(&lid);
	if (m)
		m->new_flow++;
	stat_inc(S_FLOW_CREATED);
	emit_event(EV_FLOW_CREATED, &p->key, &v, p->now);
	return 0;
}

#endif
