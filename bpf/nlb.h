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

	/* the client IP is kept; the target answers from the listener's address */
	int rc = flow_create(p, cfg, p->key.src_ip, p->key.src_port, t->ip, t->port, KIND_NLB_IN,
			     KIND_NLB_OUT, lid, tid, out);
	if (rc == CREATE_RACE)
		return 0;
	if (rc != CREATE_OK) {
		res_count(KIND_NLB_IN, lid, RES_REFUSED);
		return rc == CREATE_TAKEN ? V_DROP_TUPLE_TAKEN : V_DROP_TABLE_FULL;
	}
	struct lb_metrics *m = lb_stats.lookup(&lid);
	if (m)
		m->new_flow++;
	return 0;
}

#endif
