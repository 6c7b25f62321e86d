/* hyperplane: the XDP data path of a node. One program serves NAT gateways and network
 * load balancers: parse, look the flow up, translate and forward; on a miss, classify and
 * create the flow. Every packet ends in exactly one counted verdict (enum hp_verdict). */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/icmp.h>
#include <uapi/linux/errno.h>

#include "consts.h"
#include "structs.h"
#include "maps.h"
#include "csum.h"
#include "parsing.h"

/* What the stages know about the packet in hand. */
struct pkt {
	struct ethhdr *eth;
	struct iphdr *iph;
	/* At most one L4 header is set; none for a non-first fragment. Separate typed
	 * pointers (not one void *): the verifier tracks each slot's null-ness and range,
	 * while it cannot connect a re-read ip->protocol to the header parsed earlier. */
	struct tcphdr *tcp;
	struct udphdr *udp;
	struct icmphdr *icmp;
	struct flow_key key;
	__u64 now;
	__u32 len;                /* frame length, for byte counters */
	__u8 tcp_flags;
	__u8 icmp_type;
	__u8 frag;                /* 1: part of a fragmented datagram */
	__u8 frag_first;          /* 1: the part with the L4 header */
	int action;               /* XDP action of a TX verdict */
};

#include "flow.h"
#include "fwd.h"
#include "nat.h"
#include "nlb.h"
#include "icmp_err.h"
#include "rst.h"

#define IP_MF 0x2000
#define IP_OFFSET 0x1fff

/* Byte and packet metrics of the resource a translated packet belongs to. */
static __always_inline void count_resource(struct pkt *p, struct flow_value *v)
{
	__u32 id = v->resource;
	if (v->kind == KIND_NAT_OUT || v->kind == KIND_NAT_IN) {
		struct gw_metrics *m = gw_stats.lookup(&id);
		if (!m)
			return;
		if (v->kind == KIND_NAT_OUT) {
			m->packets_in_from_source++;
			m->bytes_in_from_source += p->len;
			m->packets_out_to_destination++;
			m->bytes_out_to_destination += p->len;
		} else {
			m->packets_in_from_destination++;
			m->bytes_in_from_destination += p->len;
			m->packets_out_to_source++;
			m->bytes_out_to_source += p->len;
		}
	} else {
		struct lb_metrics *m = lb_stats.lookup(&id);
		if (m) {
			m->processed_packets++;
			m->processed_bytes += p->len;
		}
		__u32 tid = v->target;
		__u64 *tp = target_packets.lookup(&tid);
		if (tp)
			*tp += 1;
	}
}

static __always_inline void count_drop(struct flow_value *v)
{
	if (v->kind == KIND_NAT_OUT || v->kind == KIND_NAT_IN) {
		__u32 id = v->resource;
		struct gw_metrics *m = gw_stats.lookup(&id);
		if (m)
			m->packets_drop++;
	}
}


/* Translate and forward a packet of a known flow. */
static __always_inline int forward_flow(struct xdp_md *ctx, struct pkt *p, struct hp_config *cfg,
					struct flow_value *v)
{
	struct iphdr *ip = p->iph;
	if (ip->ttl <= 1)
		return V_PASS_TTL;
	int rc = next_hop(ctx, &v->nh, ip, v->new_src_ip, v->new_dst_ip, v->new_src_port,
			  v->new_dst_port, p->now);
	if (rc) {
		if (rc != V_PASS_FIB)
			count_drop(v);
		return rc;
	}
	if (p->frag && p->frag_first) {
		struct frag_key fk = { .src_ip = ip->saddr, .dst_ip = ip->daddr, .ip_id = ip->id,
				       .proto = ip->protocol };
		struct frag_value fv = { .new_src_ip = v->new_src_ip, .new_dst_ip = v->new_dst_ip,
					 .resource = v->resource, .kind = v->kind };
		frags.update(&fk, &fv);
	}
	v->last_seen_ns = p->now;
	/* plain adds: one direction of a flow is normally handled by one CPU (RSS), and an
	 * atomic costs ~10 ns per packet; the exact counts are the per-CPU verdicts */
	v->packets += 1;
	v->bytes += p->len;
	if (p->key.proto == IPPROTO_TCP) {
		int established = 0;
		if (tcp_track(v, p->tcp_flags, &established)) {
			stat_inc(S_FLOW_CLOSED);
			emit_event(EV_FLOW_CLOSED, &p->key, v, p->now);
			if ((p->tcp_flags & TH_RST) && (v->kind == KIND_NLB_IN || v->kind == KIND_NLB_OUT)) {
				__u32 id = v->resource;
				struct lb_metrics *m = lb_stats.lookup(&id);
				if (m) {
					if (v->kind == KIND_NLB_IN)
						m->tcp_client_reset++;
					else
						m->tcp_target_reset++;
				}
			}
		}
		if (established && v->kind == KIND_NAT_IN) {
			__u32 id = v->resource;
			struct gw_metrics *m = gw_stats.lookup(&id);
			if (m)
				m->connection_established++;
		}
	}
	rewrite(p, v->new_src_ip, v->new_dst_ip, v->new_src_port, v->new_dst_port);
	count_resource(p, v);
	rc = send_to(p, &v->nh);
	if (rc)
		return rc;
	switch (v->kind) {
	case KIND_NAT_OUT: return V_TX_NAT_OUT;
	case KIND_NAT_IN: return V_TX_NAT_IN;
	case KIND_NLB_IN: return V_TX_NLB_IN;
	default: return V_TX_NLB_OUT;
	}
}

/* A later fragment of a UDP datagram whose first fragment we translated. */
static __always_inline int forward_fragment(struct xdp_md *ctx, struct pkt *p)
{
	struct iphdr *ip = p->iph;
	struct frag_key fk = { .src_ip = ip->saddr, .dst_ip = ip->daddr, .ip_id = ip->id,
			       .proto = ip->protocol };
	struct frag_value *fv = frags.lookup(&fk);
	if (!fv)
		return V_DROP_FRAGMENT;
	if (ip->ttl <= 1)
		return V_PASS_TTL;
	struct next_hop nh = {};
	int rc = next_hop(ctx, &nh, ip, fv->new_src_ip, fv->new_dst_ip, 0, 0, p->now);
	if (rc)
		return rc;
	rewrite(p, fv->new_src_ip, fv->new_dst_ip, 0, 0);
	rc = send_to(p, &nh);
	return rc ? rc : V_TX_FRAGMENT;
}

/* Parse up to L4 and fill p->key. Returns 0, or a verdict for a malformed packet. */
static __always_inline int parse_l4(struct pkt *p, struct cursor *c, void *data_end)
{
	struct iphdr *ip = p->iph;
	p->key.src_ip = ip->saddr;
	p->key.dst_ip = ip->daddr;
	p->key.proto = ip->protocol;
	if (ip->protocol == IPPROTO_TCP) {
		struct tcphdr *t;
		if (parse_tcp(c, data_end, &t) < 0)
			return V_DROP_MALFORMED;
		p->tcp = t;
		p->key.src_port = t->source;
		p->key.dst_port = t->dest;
		p->tcp_flags = ((__u8 *)t)[13];
	} else if (ip->protocol == IPPROTO_UDP) {
		struct udphdr *u;
		if (parse_udp(c, data_end, &u) < 0)
			return V_DROP_MALFORMED;
		p->udp = u;
		p->key.src_port = u->source;
		p->key.dst_port = u->dest;
	} else if (ip->protocol == IPPROTO_ICMP) {
		struct icmphdr *h;
		int type = parse_icmp(c, data_end, &h);
		if (type < 0)
			return V_DROP_MALFORMED;
		p->icmp = h;
		p->icmp_type = type;
		if (type == ICMP_ECHO)
			p->key.src_port = h->un.echo.id;
		else if (type == ICMP_ECHOREPLY)
			p->key.dst_port = h->un.echo.id;
	}
	return 0;
}

/* Only a bare SYN (no ACK, no RST) may open a TCP flow. */
static __always_inline int tcp_opens(struct pkt *p)
{
	return (p->tcp_flags & (TH_SYN | TH_ACK | TH_RST)) == TH_SYN;
}

/* A packet of no known flow: which resource is it for, and what happens to it? */
static __always_inline int classify(struct xdp_md *ctx, struct pkt *p, struct hp_config *cfg)
{
	struct iphdr *ip = p->iph;
	__u8 proto = ip->protocol;
	struct flow_value *v = 0;
	int rc;

	/* toward a NAT IP: the reply of a flow this node does not know */
	struct nat_ip_value *ni = nat_ips.lookup(&ip->daddr);
	if (ni) {
		if (p->icmp && p->icmp_type == ICMP_ECHO)
			return V_PASS_LOCAL;
		__u32 gw_id = ni->gw_id;
		struct gw_metrics *m = gw_stats.lookup(&gw_id);
		if (m)
			m->packets_drop++;
		if (ip->ihl != 5)
			return V_DROP_IP_OPTIONS;
		if (p->frag)
			return V_DROP_FRAGMENT;
		return V_DROP_NO_FLOW;
	}

	/* toward a listener */
	struct vip_value *vip = vips.lookup(&ip->daddr);
	if (vip) {
		if (ip->ihl != 5)
			return V_DROP_IP_OPTIONS;
		if (p->frag)
			return V_DROP_FRAGMENT;
		if (proto == IPPROTO_ICMP)
			return p->icmp_type == ICMP_ECHO ? V_PASS_LOCAL : V_DROP_ICMP_UNSUPPORTED;
		if (proto != IPPROTO_TCP && proto != IPPROTO_UDP)
			return V_DROP_UNKNOWN_PROTO;
		struct listener_key lk = { .vip = ip->daddr, .port = p->key.dst_port, .proto = proto };
		struct listener_value *l = listeners.lookup(&lk);
		if (!l)
			return V_DROP_NO_LISTENER;
		if (proto == IPPROTO_TCP && !tcp_opens(p)) {
			if (p->tcp_flags & TH_RST)
				return V_DROP_TCP_NOT_SYN; /* never answer a RST */
			__u32 lid = l->listener_id;
			struct lb_metrics *m = lb_stats.lookup(&lid);
			if (m)
				m->tcp_elb_reset++;
			return send_rst(ctx, p);
		}
		if (ip->ttl <= 1)
			return V_PASS_TTL;
		rc = nlb_new_flow(p, cfg, l, &v);
		if (rc)
			return rc;
		return forward_flow(ctx, p, cfg, v);
	}

	/* from an inside network of a NAT gateway, to anywhere outside it */
	struct inside_key ik = { .prefixlen = 32, .addr = ip->saddr };
	__u32 *gw = inside_nets.lookup(&ik);
	if (!gw)
		return V_PASS_NO_RESOURCE;
	__u32 gw_id = *gw;
	ik.addr = ip->daddr;
	if (inside_nets.lookup(&ik))
		return V_PASS_NO_RESOURCE; /* inside to inside: not translated */
	if (ip->ihl != 5)
		return V_DROP_IP_OPTIONS;
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP && proto != IPPROTO_ICMP)
		return V_DROP_UNKNOWN_PROTO;
	if (p->frag && (proto != IPPROTO_UDP || !p->frag_first))
		return V_DROP_FRAGMENT;
	if (proto == IPPROTO_ICMP && p->icmp_type != ICMP_ECHO)
		return is_icmp_error(p->icmp_type) ? V_DROP_NO_FLOW : V_DROP_ICMP_UNSUPPORTED;
	if (proto == IPPROTO_TCP && !tcp_opens(p)) {
		/* not an opening SYN and no live flow: a timed-out connection (AWS: RST) */
		if ((p->tcp_flags & TH_RST) || !(cfg->flags & HP_F_RST_ON_NO_FLOW))
			return V_DROP_NO_FLOW;
		return send_rst(ctx, p);
	}
	if (ip->ttl <= 1)
		return V_PASS_TTL;
	rc = nat_new_flow(p, cfg, gw_id, &v);
	if (rc)
		return rc;
	return forward_flow(ctx, p, cfg, v);
}

static __always_inline int process(struct xdp_md *ctx, struct pkt *p)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct cursor c = { .pos = data };
	p->len = data_end - data;

	int eth_proto = parse_eth(&c, data_end, &p->eth);
	if (eth_proto < 0)
		return V_DROP_MALFORMED;
	if (eth_proto != bpf_htons(ETH_P_IP))
		return V_PASS_NON_IP;
	if (parse_ipv4(&c, data_end, &p->iph) < 0)
		return V_DROP_MALFORMED;
	struct iphdr *ip = p->iph;
	struct hp_config *cfg = get_config();
	if (!cfg)
		return V_PASS_NO_RESOURCE;
	/* the coarse clock (jiffy resolution) is plenty for timeouts in seconds and costs
	 * 20-30 ns less per packet than bpf_ktime_get_ns() on this kind of VM */
	p->now = bpf_ktime_get_coarse_ns();
	__u16 frag_off = bpf_ntohs(ip->frag_off);
	p->frag = (frag_off & (IP_MF | IP_OFFSET)) != 0;
	p->frag_first = p->frag && !(frag_off & IP_OFFSET);

	if (frag_off & IP_OFFSET) {
		/* a later fragment: no L4 header */
		if (ip->protocol == IPPROTO_UDP && ip->ihl == 5) {
			int rc = forward_fragment(ctx, p);
			if (rc != V_DROP_FRAGMENT)
				return rc;
		}
		p->key.src_ip = ip->saddr;
		p->key.dst_ip = ip->daddr;
		p->key.proto = ip->protocol;
		return classify(ctx, p, cfg);
	}

	int rc = parse_l4(p, &c, data_end);
	if (rc)
		return rc;
	if (ip->ihl == 5 && (ip->protocol == IPPROTO_TCP || ip->protocol == IPPROTO_UDP ||
			     ip->protocol == IPPROTO_ICMP)) {
		if (ip->protocol == IPPROTO_ICMP && is_icmp_error(p->icmp_type)) {
			rc = icmp_error(ctx, p, data_end);
			if (rc >= 0)
				return rc;
		}
		if (ip->protocol != IPPROTO_ICMP || p->icmp_type == ICMP_ECHO ||
		    p->icmp_type == ICMP_ECHOREPLY) {
			struct flow_value *v = flows.lookup(&p->key);
			if (v) {
				if (flow_expired(cfg, v, ip->protocol, p->now)) {
					if (v->kind == KIND_NAT_OUT || v->kind == KIND_NAT_IN) {
						__u32 id = v->resource;
						struct gw_metrics *m = gw_stats.lookup(&id);
						if (m)
							m->idle_timeout++;
					}
					stat_inc(S_FLOW_EXPIRED);
					emit_event(EV_FLOW_EXPIRED, &p->key, v, p->now);
					flow_delete(&p->key, v);
				} else if (v->tcp_state == TCP_S_CLOSED && !is_reply_kind(v->kind) &&
					   (p->tcp_flags & (TH_SYN | TH_ACK)) == TH_SYN) {
					/* the same 5-tuple opens anew after a close */
					flow_delete(&p->key, v);
				} else {
					return forward_flow(ctx, p, cfg, v);
				}
			}
		}
	}
	return classify(ctx, p, cfg);
}

int xdp_hyperplane(struct xdp_md *ctx)
{
	struct pkt p = {};
	int verdict = process(ctx, &p);
	__u32 idx = verdict;
	if (idx >= V_MAX)
		idx = V_DROP_MALFORMED;
	__u64 *cnt = verdicts.lookup(&idx);
	if (cnt)
		*cnt += 1;
	if (idx <= V_TX_RST)
		return p.action;
	if (idx <= V_PASS_FIB)
		return XDP_PASS;
	return XDP_DROP;
}
