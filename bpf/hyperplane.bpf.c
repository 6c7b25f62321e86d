/* hyperplane: the data path of a node. One program serves NAT gateways and network load
 * balancers: parse, look the flow up, translate and forward; on a miss, classify and
 * create the flow. Every packet ends in exactly one counted verdict (enum hp_verdict).
 * The same C is built for native XDP and for the tc hook (hook.h). */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/icmp.h>
#include <uapi/linux/errno.h>
#include <uapi/linux/pkt_cls.h>

#include "consts.h"
#include "structs.h"
#include "hook.h"
#include "maps.h"
#include "csum.h"
#include "parsing.h"

/* TCP/UDP checksum changes a tc build applies last (fwd.h l4_fix_apply). */
struct l4_fix {
	__u32 pseudo;             /* change of the addresses the pseudo-header covers */
	__u32 ports;              /* change of words inside the L4 header */
	__u32 off;                /* the checksum's offset in the frame; 0 = nothing to do */
	__u8 udp;
};

/* What the stages know about the packet in hand. */
struct pkt {
	void *data;               /* frame start (for offsets) */
	void *data_end;           /* frame end */
	void *l3_end;             /* IP datagram end (tot_len): trailers are not headers */
	struct ethhdr *eth;
	struct iphdr *iph;
	/* At most one L4 header is set; none for a non-first fragment. Separate typed
	 * pointers (not one void *): the verifier tracks each slot's null-ness and range,
	 * while it cannot connect a re-read ip->protocol to the header parsed earlier. */
	struct tcphdr *tcp;
	struct udphdr *udp;
	struct icmphdr *icmp;
	struct flow_key key;
	struct l4_fix fix;
	__u64 now;
	__u32 len;                /* bytes, for counters (a GSO superpacket's whole length) */
	__u32 segs;               /* packets, for counters (a GSO superpacket's segments) */
	__u32 ifindex;            /* where the packet came in */
	__u16 l3_off;             /* Ethernet (+ VLAN tags) length */
	__u8 tcp_flags;
	__u8 icmp_type;
	__u8 frag;                /* 1: part of a fragmented datagram */
	__u8 frag_first;          /* 1: the part with the L4 header */
	__u16 mtu;                /* DO_FRAG_NEEDED: the next hop's MTU */
	__u8 wscale_ready;        /* a SYN's window scale was read (PROG_WSCALE) */
	__u8 wscale;
	__u8 from_peer;           /* fleet: a peer handed it over (second chance) */
	__u8 owner_local;         /* fleet: PROG_OWNER found this node the flow's owner */
	__u32 prev_incarnation;   /* fleet: of the flow on this tuple known_flow deleted (0: none) */
	int action;               /* the hook's action for a TX verdict */
};

/* Tail-called programs (the slow paths; bpf/maps.h progs). Keep in sync:
 * hyperplane/datapath/loader.py PROGRAMS. */
#define PROG_NEW 0    /* a packet of no known flow: classify it, create its flow */
#define PROG_REPLY 1  /* answer it (RST, ICMP error), or translate an ICMP error */
#define PROG_MAIN 2   /* the main program, for PROG_WSCALE to hand a SYN back */
#define PROG_WSCALE 3 /* read a SYN's window scale option, then back to the main program */
#define PROG_OWNER 4  /* fleet: hand a packet of no flow to its owner, or back to PROG_NEW */
#define PROG_NAT 5    /* a new NAT flow: take a port for it */
#define PROG_NAT_FLOW 6 /* ... then create the flow and forward the packet */

/* What a slow path is asked to do (scratch.todo); above every verdict. */
#define DO_NEW (V_MAX + 1)            /* classify and create */
#define DO_RST (V_MAX + 2)            /* answer with a RST */
#define DO_TIME_EXCEEDED (V_MAX + 3)  /* answer with ICMP time exceeded */
#define DO_FRAG_NEEDED (V_MAX + 4)    /* answer with ICMP fragmentation needed (p->mtu) */
#define DO_ICMP_ERROR (V_MAX + 5)     /* translate an ICMP error about a flow */
#define DO_WSCALE (V_MAX + 6)         /* read the window scale of a SYN */
#define DO_OWNER (V_MAX + 7)          /* fleet: find the flow's owner (scratch.owner_*) */
#define DO_NAT_NEW (V_MAX + 8)        /* create a NAT flow for gateway scratch.gw_id */
#define DO_NAT_FLOW (V_MAX + 9)       /* ... with the port in scratch.resv */

#include "flow.h"
#include "fleet.h"
#include "fwd.h"
#include "nat.h"
#include "nlb.h"
#include "icmp_gen.h"
#include "icmp_err.h"
#include "rst.h"
#include "install.h"

#define IP_DF 0x4000
#define IP_MF 0x2000
#define IP_OFFSET 0x1fff

/* Byte and packet metrics of the resource a translated packet belongs to. */
static __always_inline void count_resource(struct pkt *p, struct flow_value *v)
{
	__u32 id = v->resource;
	if (is_nat_kind(v->kind)) {
		struct gw_metrics *m = gw_stats.lookup(&id);
		if (!m)
			return;
		if (v->kind == KIND_NAT_OUT) {
			m->packets_in_from_source += p->segs;
			m->bytes_in_from_source += p->len;
			m->packets_out_to_destination += p->segs;
			m->bytes_out_to_destination += p->len;
		} else {
			m->packets_in_from_destination += p->segs;
			m->bytes_in_from_destination += p->len;
			m->packets_out_to_source += p->segs;
			m->bytes_out_to_source += p->len;
		}
	} else {
		struct lb_metrics *m = lb_stats.lookup(&id);
		if (m) {
			m->processed_packets += p->segs;
			m->processed_bytes += p->len;
		}
		__u32 tid = v->target;
		__u64 *tp = target_packets.lookup(&tid);
		if (tp)
			*tp += p->segs;
	}
}

static __always_inline void count_drop(struct flow_value *v)
{
	if (is_nat_kind(v->kind)) {
		__u32 id = v->resource;
		struct gw_metrics *m = gw_stats.lookup(&id);
		if (m)
			m->packets_drop++;
	}
}

static __always_inline void count_tcp_close(struct pkt *p, struct flow_value *v)
{
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

static __always_inline int tx_verdict(__u8 kind)
{
	switch (kind) {
	case KIND_NAT_OUT: return V_TX_NAT_OUT;
	case KIND_NAT_IN: return V_TX_NAT_IN;
	case KIND_NLB_IN: return V_TX_NLB_IN;
	default: return V_TX_NLB_OUT;
	}
}

/* Translate and forward a packet of a known flow. */
static __always_inline int forward_flow(HP_CTX *ctx, struct pkt *p, struct hp_config *cfg,
					struct flow_value *v)
{
	struct iphdr *ip = p->iph;
	if (!flow_ingress_ok(ctx, p, cfg, v))
		return V_DROP_WRONG_IFACE;
	int track = TCP_TRACK_OK;
	if (p->tcp) {
		track = tcp_track(p, v);
		if (track == TCP_TRACK_INVALID) {
			stat_inc(S_RST_IGNORED);
			return V_DROP_TCP_INVALID;
		}
	}
	if (ip->ttl <= 1)
		return DO_TIME_EXCEEDED;
	struct route r = {};
	int rt = next_hop(ctx, p, &v->nh, v->new_src_ip, v->new_dst_ip, v->new_src_port,
			  v->new_dst_port, &r);
	if (rt == RT_TOO_BIG && (ip->frag_off & bpf_htons(IP_DF))) {
		p->mtu = r.mtu;
		return DO_FRAG_NEEDED;
	}
	if (rt > RT_TOO_BIG) {
		count_drop(v);
		return rt;
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
	v->packets += p->segs;
	v->bytes += p->len;
	if (track == TCP_TRACK_CLOSED)
		count_tcp_close(p, v);
	if (track == TCP_TRACK_ESTABLISHED && v->kind == KIND_NAT_IN) {
		__u32 id = v->resource;
		struct gw_metrics *m = gw_stats.lookup(&id);
		if (m)
			m->connection_established++;
	}
	count_resource(p, v);
	__u8 kind = v->kind;
	if ((v->flags & FLOW_F_PENDING) && flow_should_confirm(p, v, track))
		v = flow_confirm(&p->key, v, p->now, 0);
	if (rt == RT_TOO_BIG) {
		/* no DF: the kernel fragments the translated packet and forwards it */
		rewrite(p, v->new_src_ip, v->new_dst_ip, v->new_src_port, v->new_dst_port, 0);
		l4_fix_apply(ctx, p);
		p->action = ctx_pass(ctx, 1);
		return V_PASS_FRAGMENTING;
	}
	/* the kernel decrements the TTL of what it forwards itself (XDP, no neighbour) */
#ifdef HP_HOOK_TC
	int ttl = 1;
#else
	int ttl = rt == RT_OK;
#endif
	rewrite(p, v->new_src_ip, v->new_dst_ip, v->new_src_port, v->new_dst_port, ttl);
	return send_out(ctx, p, rt, &v->nh, &r, tx_verdict(kind));
}

/* A later fragment of a UDP datagram whose first fragment we translated. */
static __always_inline int forward_fragment(HP_CTX *ctx, struct pkt *p)
{
	struct iphdr *ip = p->iph;
	struct frag_key fk = { .src_ip = ip->saddr, .dst_ip = ip->daddr, .ip_id = ip->id,
			       .proto = ip->protocol };
	struct frag_value *fv = frags.lookup(&fk);
	if (!fv)
		return V_DROP_FRAGMENT;
	if (ip->ttl <= 1)
		return V_DROP_NO_REPLY; /* errors are only sent about first fragments */
	struct next_hop nh = {};
	struct route r = {};
	int rt = next_hop(ctx, p, &nh, fv->new_src_ip, fv->new_dst_ip, 0, 0, &r);
	if (rt == RT_TOO_BIG) {
		rewrite(p, fv->new_src_ip, fv->new_dst_ip, 0, 0, 0);
		p->action = ctx_pass(ctx, 1);
		return V_PASS_FRAGMENTING;
	}
	if (rt > RT_TOO_BIG)
		return rt;
#ifdef HP_HOOK_TC
	int ttl = 1;
#else
	int ttl = rt == RT_OK;
#endif
	rewrite(p, fv->new_src_ip, fv->new_dst_ip, 0, 0, ttl);
	return send_out(ctx, p, rt, &nh, &r, V_TX_FRAGMENT);
}

/* Parse up to L4 and fill p->key. Returns 0, or a verdict for a malformed packet. */
static __always_inline int parse_l4(struct pkt *p, struct cursor *c)
{
	struct iphdr *ip = p->iph;
	p->key.src_ip = ip->saddr;
	p->key.dst_ip = ip->daddr;
	p->key.proto = ip->protocol;
	if (ip->protocol == IPPROTO_TCP) {
		struct tcphdr *t;
		if (parse_tcp(c, p->data_end, p->l3_end, &t) < 0)
			return V_DROP_MALFORMED;
		p->tcp = t;
		p->key.src_port = t->source;
		p->key.dst_port = t->dest;
		p->tcp_flags = ((__u8 *)t)[13];
	} else if (ip->protocol == IPPROTO_UDP) {
		struct udphdr *u;
		if (parse_udp(c, p->data_end, p->l3_end, p->frag, &u) < 0)
			return V_DROP_MALFORMED;
		p->udp = u;
		p->key.src_port = u->source;
		p->key.dst_port = u->dest;
	} else if (ip->protocol == IPPROTO_ICMP) {
		struct icmphdr *h;
		int type = parse_icmp(c, p->data_end, p->l3_end, &h);
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

/* A packet of no known flow: which resource is it for, and what happens to it? Returns
 * 0 with *v set to a new flow to forward, or a verdict (or DO_*). */
static __always_inline int classify(HP_CTX *ctx, struct pkt *p, struct hp_config *cfg,
				    struct flow_value **v)
{
	struct iphdr *ip = p->iph;
	__u8 proto = ip->protocol;

	/* toward a NAT IP: the reply of a flow this node does not know */
	struct nat_ip_value *ni = nat_ips.lookup(&ip->daddr);
	if (ni) {
		if (p->icmp && p->icmp_type == ICMP_ECHO)
			return V_PASS_LOCAL;
		/* fleet: the port's block owner holds the flow (or will: a reply can beat the
		 * flow's replication here) */
		if (ip->ihl == 5 && !p->frag &&
		    (p->tcp || p->udp || (p->icmp && p->icmp_type == ICMP_ECHOREPLY))) {
			int rc = ask_owner(p, cfg, OWN_NAT_REPLY, 0);
			if (rc != OWNER_LOCAL)
				return rc;
		}
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

	/* toward a listener, or from an inside network of a NAT gateway to outside it */
	struct listener_value *l = 0;
	__u32 gw_id = 0;
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
		l = listeners.lookup(&lk);
		if (!l)
			return V_DROP_NO_LISTENER;
	} else {
		/* from a target of a load balancer with no flow: never forwarded untranslated
		 * (its private source would leave the node); what it sends the node itself (a
		 * health check's answer) is the node's */
		if (p->tcp || p->udp) {
			struct endpoint_key ek = { .ip = ip->saddr, .port = p->key.src_port };
			__u32 *tid = target_endpoints.lookup(&ek);
			if (tid) {
				if (to_this_node(ctx, p))
					return V_PASS_NO_RESOURCE;
				struct target_value *t = targets.lookup(tid);
				int rc = t ? ask_owner(p, cfg, OWN_TARGET_REPLY, SHARD_LB_BASE + t->lb_id)
					   : OWNER_LOCAL;
				return rc == OWNER_LOCAL ? V_DROP_NO_FLOW : rc;
			}
		}
		struct inside_key ik = { .prefixlen = 32, .addr = ip->saddr };
		__u32 *gw = inside_nets.lookup(&ik);
		if (!gw)
			return V_PASS_NO_RESOURCE;
		gw_id = *gw;
		ik.addr = ip->daddr;
		if (inside_nets.lookup(&ik))
			return V_PASS_NO_RESOURCE; /* inside to inside: not translated */
	}
	/* a source that is not routed through the interface it came in on: spoofed (a
	 * packet a peer handed over was checked where it came in) */
	if (!p->from_peer && !ingress_ok(ctx, p, cfg))
		return V_DROP_WRONG_IFACE;

	if (l) {
		int rc = ask_owner(p, cfg, OWN_CLIENT, SHARD_LB_BASE + l->lb_id);
		if (rc != OWNER_LOCAL)
			return rc;
		if (proto == IPPROTO_TCP && !tcp_opens(p)) {
			if (p->tcp_flags & TH_RST)
				return V_DROP_TCP_NOT_SYN; /* never answer a RST */
			__u32 lid = l->listener_id;
			struct lb_metrics *m = lb_stats.lookup(&lid);
			if (m)
				m->tcp_elb_reset++;
			return DO_RST;
		}
		if (ip->ttl <= 1)
			return DO_TIME_EXCEEDED;
		return nlb_new_flow(p, cfg, l, v);
	}

	if (ip->ihl != 5)
		return V_DROP_IP_OPTIONS;
	if (proto != IPPROTO_TCP && proto != IPPROTO_UDP && proto != IPPROTO_ICMP)
		return V_DROP_UNKNOWN_PROTO;
	if (p->frag && (proto != IPPROTO_UDP || !p->frag_first))
		return V_DROP_FRAGMENT;
	if (proto == IPPROTO_ICMP && p->icmp_type != ICMP_ECHO)
		return is_icmp_error(p->icmp_type) ? V_DROP_NO_FLOW : V_DROP_ICMP_UNSUPPORTED;
	int owner_rc = ask_owner(p, cfg, OWN_CLIENT, gw_id);
	if (owner_rc != OWNER_LOCAL)
		return owner_rc;
	if (proto == IPPROTO_TCP && !tcp_opens(p)) {
		/* not an opening SYN and no live flow: a timed-out connection (AWS: RST) */
		if ((p->tcp_flags & TH_RST) || !(cfg->flags & HP_F_RST_ON_NO_FLOW))
			return V_DROP_NO_FLOW;
		return DO_RST;
	}
	if (ip->ttl <= 1)
		return DO_TIME_EXCEEDED;
	/* the port search is verified in a program of its own (PROG_NAT) */
	struct scratch *s = scratch_get();
	if (!s)
		return V_DROP_MALFORMED;
	s->gw_id = gw_id;
	return DO_NAT_NEW;
}

/* Fleet: does this packet of a flow held here go to the flow's owner instead? A
 * node other than the owner may hold the tuple's previous flow: a client reuses its port
 * at once when the server closed first, and the owner makes the next flow, whose records
 * have not arrived. Taken for the old flow here, the next flow's packets changed nothing
 * of it, and it stayed open on every node (the fleet lab saw it: the server's SYN-ACK,
 * answer and FIN met replicas of the old flow, in FIN_WAIT or still established, and
 * were forwarded as its). So the owner, which holds the newest flow, sees every SYN, FIN
 * and RST of its flows, and every packet from the client of a closing flow (a FIN seen,
 * or closed: its ACK confirms the next flow, and a NAT flow's next one may have another
 * port). Other packets are translated alike by either flow and stay where they land. The
 * owner uses the flow it holds (owned_flow). */
static __always_inline int goes_to_owner(struct pkt *p, struct hp_config *cfg,
					 struct flow_value *v)
{
	if (!p->tcp || !fleet_on(cfg) || p->from_peer || p->owner_local)
		return 0;
	if (p->tcp_flags & (TH_SYN | TH_FIN | TH_RST))
		return 1;
	return v->tcp_state >= TCP_S_FIN_WAIT && !is_reply_kind(v->kind);
}

/* The flow a parsed packet belongs to, or 0. Deletes an expired one on the way (then the
 * packet is a new flow), and a closed one that the same 5-tuple opens again. */
static __always_inline struct flow_value *known_flow(struct pkt *p, struct hp_config *cfg)
{
	struct iphdr *ip = p->iph;
	/* AWS forwards UDP fragments only; later fragments have no L4 header (frags map) */
	if (ip->ihl != 5 || (p->frag && (ip->protocol != IPPROTO_UDP || !p->frag_first)))
		return 0;
	if (ip->protocol == IPPROTO_ICMP && p->icmp_type != ICMP_ECHO &&
	    p->icmp_type != ICMP_ECHOREPLY)
		return 0;
	if (ip->protocol != IPPROTO_TCP && ip->protocol != IPPROTO_UDP &&
	    ip->protocol != IPPROTO_ICMP)
		return 0;
	struct flow_value *v = flow_find(&p->key);
	if (!v)
		return 0;
	if (flow_expired(cfg, v, ip->protocol, p->now)) {
		if (is_nat_kind(v->kind)) {
			__u32 id = v->resource;
			struct gw_metrics *m = gw_stats.lookup(&id);
			if (m)
				m->idle_timeout++;
		}
		stat_inc(S_FLOW_EXPIRED);
		emit_event(EV_FLOW_EXPIRED, &p->key, v, p->now);
		p->prev_incarnation = v->incarnation;
		flow_delete(&p->key, v);
		return 0;
	}
	/* A client's SYN on a closed flow opens the tuple anew. In a fleet on a half-closed
	 * one too: the other FIN may be in a record still on its way, and the client, whose
	 * socket is gone, has no other use for the SYN (one node saw every FIN itself and
	 * lets the half-closed flow carry it, as conntrack ignores it). */
	if (!is_reply_kind(v->kind) && tcp_opens(p) &&
	    (v->tcp_state == TCP_S_CLOSED ||
	     (v->tcp_state == TCP_S_FIN_WAIT && fleet_on(cfg)))) {
		emit_event(EV_FLOW_REMOVED, &p->key, v, p->now);
		/* the next flow's generation follows this one's (bpf/consts.h INC_GEN_SHIFT) */
		p->prev_incarnation = v->incarnation;
		flow_delete(&p->key, v); /* the same 5-tuple opens anew after a close */
		return 0;
	}
	if (goes_to_owner(p, cfg, v))
		return 0;
	return v;
}

/* Fleet: a packet known_flow sent to the owner (goes_to_owner), when this node is the
 * owner: the flow it holds is the tuple's newest, and the packet is forwarded as its. */
static __always_inline struct flow_value *owned_flow(struct pkt *p)
{
	if (!p->owner_local || !p->tcp)
		return 0;
	return flow_find(&p->key);
}

/* Parse a packet into p: Ethernet, IPv4, and the L4 header (none for a later
 * fragment). Returns 0, or the verdict of a packet that goes no further. Every program
 * starts with this (a tail call keeps the packet, not the parsed pointers). */
static __always_inline int parse_packet(HP_CTX *ctx, struct pkt *p, struct hp_config **cfg)
{
	ctx_pull(ctx);
	void *data = ctx_data(ctx);
	void *data_end = ctx_data_end(ctx);
	struct cursor c = { .pos = data };
	p->data = data;
	p->data_end = data_end;
	p->len = ctx_len(ctx);
	p->segs = ctx_segs(ctx);
	p->ifindex = ctx_ingress_ifindex(ctx);

	int eth_proto = parse_eth(&c, data_end, &p->eth);
	if (eth_proto < 0)
		return V_DROP_MALFORMED;
	if (eth_proto != bpf_htons(ETH_P_IP))
		return V_PASS_NON_IP;
	if (!ctx_for_us(ctx))
		return V_PASS_NO_RESOURCE; /* another host's frame: the kernel drops it */
	p->l3_off = c.pos - data;
	if (parse_ipv4(&c, data, data_end, p->len, &p->iph, &p->l3_end) < 0)
		return V_DROP_MALFORMED;
	struct iphdr *ip = p->iph;
	*cfg = get_config();
	if (!*cfg)
		return V_PASS_NO_RESOURCE;
	/* the coarse clock (jiffy resolution) is plenty for timeouts in seconds and costs
	 * 20-30 ns less per packet than bpf_ktime_get_ns() on this kind of VM */
	p->now = bpf_ktime_get_coarse_ns();
	__u16 frag_off = bpf_ntohs(ip->frag_off);
	p->frag = (frag_off & (IP_MF | IP_OFFSET)) != 0;
	p->frag_first = p->frag && !(frag_off & IP_OFFSET);
	if (frag_off & IP_OFFSET) {
		/* a later fragment: no L4 header */
		p->key.src_ip = ip->saddr;
		p->key.dst_ip = ip->daddr;
		p->key.proto = ip->protocol;
		return 0;
	}
	return parse_l4(p, &c);
}

/* Drops that flow logs record as REJECT: a parsed packet that no flow took, refused for
 * its tuple (unsolicited, no listener / target / port / route / owner, spoofed, invalid).
 * Keep in sync: hyperplane/observe/flowlogs.py REJECT_VERDICTS. */
#define REJECT_VERDICTS ((1ULL << V_DROP_NO_FLOW) | (1ULL << V_DROP_PORT_ALLOC) |	\
			 (1ULL << V_DROP_TABLE_FULL) | (1ULL << V_DROP_NO_ROUTE) |	\
			 (1ULL << V_DROP_NO_TARGET) | (1ULL << V_DROP_NO_LISTENER) |	\
			 (1ULL << V_DROP_TCP_NOT_SYN) | (1ULL << V_DROP_WRONG_IFACE) |	\
			 (1ULL << V_DROP_TCP_INVALID) | (1ULL << V_DROP_TUPLE_TAKEN) |	\
			 (1ULL << V_DROP_NO_OWNER))

/* A rejected packet as an event for the flow logs, at most HP_REJECT_LOG_RATE a second
 * per CPU (a flood must not fill the ring the fleet's replication reads; the rest are
 * counted in S_REJECT_UNLOGGED). */
static __always_inline void log_reject(struct pkt *p, __u32 verdict)
{
	__u32 zero = 0;
	struct icmp_bucket *b = reject_budget.lookup(&zero);
	if (!b)
		return;
	__u64 per = HP_NSEC / HP_REJECT_LOG_RATE;
	__u64 elapsed = p->now - b->last_ns;
	if (elapsed >= per) {
		__u64 add = elapsed / per;
		b->tokens = b->tokens + add > HP_REJECT_LOG_BURST ? HP_REJECT_LOG_BURST :
								      b->tokens + add;
		b->last_ns = p->now;
	}
	if (!b->tokens) {
		stat_inc(S_REJECT_UNLOGGED);
		return;
	}
	b->tokens--;
	struct flow_event *e = flow_events.ringbuf_reserve(sizeof(struct flow_event));
	if (!e) {
		stat_inc(S_EVENT_LOST);
		return;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->type = EV_FLOW_REJECTED;
	e->flags = verdict << EVF_VERDICT_SHIFT;
	e->ts_ns = p->now;
	e->rec.key = p->key;
	e->packets = p->segs;
	e->bytes = p->len;
	e->in_ifindex = p->ifindex;
	flow_events.ringbuf_submit(e, BPF_RB_NO_WAKEUP);
}

/* Every packet ends here with one counted verdict (invariant 2) and the hook's action. */
static __always_inline int finish(HP_CTX *ctx, struct pkt *p, int verdict)
{
	__u32 idx = verdict;
	if (idx >= V_MAX)
		idx = V_DROP_MALFORMED;
	__u64 *cnt = verdicts.lookup(&idx);
	if (cnt)
		*cnt += 1;
	if ((1ULL << idx) & REJECT_VERDICTS)
		log_reject(p, idx);
	if (p->from_peer && idx <= V_LAST_TX)
		stat_inc(S_PEER_PACKET);
	if (idx <= V_LAST_TX)
		return p->action >= 0 ? p->action : ctx_drop();
	if (idx <= V_LAST_PASS)
		return p->action >= 0 ? p->action : ctx_pass(ctx, 0);
	return ctx_drop();
}

/* Hand the packet to a slow path; returns only when the tail call failed (a program
 * missing from progs: counted as malformed, never passed on untranslated). */
static __always_inline int go_slow(HP_CTX *ctx, struct scratch *s, struct pkt *p, __u32 prog,
				   int todo, __u16 mtu)
{
	s->todo = todo;
	s->mtu = mtu;
	s->wscale_ready = p->wscale_ready;
	s->wscale = p->wscale;
	s->owner_local = p->owner_local;
	s->prev_incarnation = p->prev_incarnation;
	progs.call(ctx, prog);
	s->wscale_ready = 0;
	s->owner_local = 0;
	s->prev_incarnation = 0;
	return V_DROP_MALFORMED;
}

/* Every program starts the same: the scratch space, what the program before left in it,
 * and the packet parsed again (a tail call keeps the packet, not the parsed pointers).
 * Returns 0, or the verdict of a packet that goes no further. */
static __always_inline int begin(HP_CTX *ctx, struct pkt *p, struct scratch **s,
				 struct hp_config **cfg)
{
	p->action = -1;
	*s = scratch_get();
	if (!*s)
		return V_DROP_MALFORMED;
	p->wscale_ready = (*s)->wscale_ready;
	p->wscale = (*s)->wscale;
	p->owner_local = (*s)->owner_local;
	p->prev_incarnation = (*s)->prev_incarnation;
	(*s)->wscale_ready = 0;
	(*s)->owner_local = 0;
	(*s)->prev_incarnation = 0;
	int rc = parse_packet(ctx, p, cfg);
	if (!rc && !*cfg)
		rc = V_PASS_NO_RESOURCE;
	if (!rc)
		p->from_peer = fleet_on(*cfg) && (*cfg)->sync_ifindex &&
			       p->ifindex == (*cfg)->sync_ifindex;
	return rc;
}

/* The main program: known flows are translated and forwarded here; everything else goes
 * to a slow path. A TCP SYN first has its window scale read (PROG_WSCALE, which hands it
 * back here). */
int HP_ENTRY(HP_CTX *ctx)
{
	struct pkt p = {};
	struct hp_config *cfg = 0;
	struct scratch *s = 0;
	int rc = begin(ctx, &p, &s, &cfg);
	if (rc || !s || !cfg)
		return finish(ctx, &p, rc);
	struct iphdr *ip = p.iph;
	if (p.frag && !p.frag_first) {
		if (ip->protocol == IPPROTO_UDP && ip->ihl == 5) {
			rc = forward_fragment(ctx, &p);
			if (rc != V_DROP_FRAGMENT)
				return finish(ctx, &p, rc);
		}
		return finish(ctx, &p, go_slow(ctx, s, &p, PROG_NEW, DO_NEW, 0));
	}
	if (p.icmp && ip->ihl == 5 && is_icmp_error(p.icmp_type))
		return finish(ctx, &p, go_slow(ctx, s, &p, PROG_REPLY, DO_ICMP_ERROR, 0));
	if (p.tcp && (p.tcp_flags & TH_SYN) && !p.wscale_ready)
		return finish(ctx, &p, go_slow(ctx, s, &p, PROG_WSCALE, DO_WSCALE, 0));
	struct flow_value *v = known_flow(&p, cfg);
	if (!v)
		return finish(ctx, &p, go_slow(ctx, s, &p, PROG_NEW, DO_NEW, 0));
	rc = forward_flow(ctx, &p, cfg, v);
	if (rc > V_MAX)
		rc = go_slow(ctx, s, &p, PROG_REPLY, rc, p.mtu);
	return finish(ctx, &p, rc);
}

/* PROG_NEW: a packet of no known flow: classified, and a flow it creates forwarded. */
int HP_PROG(new)(HP_CTX *ctx)
{
	struct pkt p = {};
	struct hp_config *cfg = 0;
	struct scratch *s = 0;
	int rc = begin(ctx, &p, &s, &cfg);
	if (rc || !s || !cfg)
		return finish(ctx, &p, rc);
	struct flow_value *v = owned_flow(&p);
	if (!v)
		rc = classify(ctx, &p, cfg, &v);
	if (rc == 0 && v)
		rc = forward_flow(ctx, &p, cfg, v);
	if (rc == DO_OWNER)
		rc = go_slow(ctx, s, &p, PROG_OWNER, rc, 0);
	else if (rc == DO_NAT_NEW)
		rc = go_slow(ctx, s, &p, PROG_NAT, rc, 0);
	else if (rc > V_MAX)
		rc = go_slow(ctx, s, &p, PROG_REPLY, rc, p.mtu);
	return finish(ctx, &p, rc);
}

/* PROG_NAT: a new outbound flow of NAT gateway scratch.gw_id (classified by PROG_NEW)
 * gets a port for its destination. The search is a program of its own: each of its exits
 * would otherwise verify the rest (the flow's creation, forwarding) again. */
int HP_PROG(nat)(HP_CTX *ctx)
{
	struct pkt p = {};
	struct hp_config *cfg = 0;
	struct scratch *s = 0;
	int rc = begin(ctx, &p, &s, &cfg);
	if (rc || !s || !cfg)
		return finish(ctx, &p, rc);
	rc = nat_new_port(&p, cfg, s->gw_id, &s->resv);
	if (rc == 0)
		rc = go_slow(ctx, s, &p, PROG_NAT_FLOW, DO_NAT_FLOW, 0);
	return finish(ctx, &p, rc);
}

/* PROG_NAT_FLOW: the new NAT flow with the port PROG_NAT reserved, and its packet
 * forwarded. */
int HP_PROG(nat_flow)(HP_CTX *ctx)
{
	struct pkt p = {};
	struct hp_config *cfg = 0;
	struct scratch *s = 0;
	int rc = begin(ctx, &p, &s, &cfg);
	if (rc || !s || !cfg)
		return finish(ctx, &p, rc);
	struct nat_resv_key rk = s->resv;
	struct flow_value *v = 0;
	rc = nat_new_flow(&p, cfg, s->gw_id, &rk, &v);
	if (rc == 0 && v)
		rc = forward_flow(ctx, &p, cfg, v);
	if (rc > V_MAX)
		rc = go_slow(ctx, s, &p, PROG_REPLY, rc, p.mtu);
	return finish(ctx, &p, rc);
}

/* PROG_OWNER (fleet): a packet of no flow here goes to the flow's owner over the sync
 * network (fleet.h), or, when this node is the owner, back to PROG_NEW to be handled
 * here. */
int HP_PROG(owner)(HP_CTX *ctx)
{
	struct pkt p = {};
	struct hp_config *cfg = 0;
	struct scratch *s = 0;
	int rc = begin(ctx, &p, &s, &cfg);
	if (rc || !s || !cfg)
		return finish(ctx, &p, rc);
	struct iphdr *ip = p.iph;
	__u32 owner = NO_OWNER;
	if (s->owner_case == OWN_NAT_REPLY) {
		struct nat_ip_value *ni = nat_ips.lookup(&ip->daddr);
		if (ni)
			owner = port_block_owner(ni, p.key.dst_port);
	} else if (s->owner_case == OWN_CLIENT) {
		owner = shard_owner(s->owner_slot, ip->saddr, p.key.src_port, p.key.proto,
				    cfg->hash_seed);
	} else {
		owner = shard_owner(s->owner_slot, ip->daddr, p.key.dst_port, p.key.proto,
				    cfg->hash_seed);
	}
	rc = to_owner(ctx, &p, cfg, owner);
	if (rc == OWNER_LOCAL) {
		p.owner_local = 1;
		rc = go_slow(ctx, s, &p, PROG_NEW, DO_NEW, 0);
	}
	return finish(ctx, &p, rc);
}

/* PROG_REPLY: answers this node sends, and ICMP errors about flows. */
int HP_PROG(reply)(HP_CTX *ctx)
{
	struct pkt p = {};
	struct hp_config *cfg = 0;
	struct scratch *s = 0;
	int rc = begin(ctx, &p, &s, &cfg);
	if (rc || !s || !cfg)
		return finish(ctx, &p, rc);
	switch (s->todo) {
	case DO_RST:
		rc = send_rst(ctx, &p);
		break;
	case DO_TIME_EXCEEDED:
		rc = icmp_reply(ctx, &p, ICMP_TIME_EXCEEDED, 0, 0);
		break;
	case DO_FRAG_NEEDED:
		rc = icmp_reply(ctx, &p, ICMP_DEST_UNREACH, ICMP_FRAG_NEEDED, s->mtu);
		break;
	case DO_ICMP_ERROR:
		rc = icmp_error(ctx, &p, cfg);
		if (rc < 0) /* about no flow of ours: classified like any packet */
			rc = go_slow(ctx, s, &p, PROG_NEW, DO_NEW, 0);
		break;
	default:
		rc = V_DROP_MALFORMED;
	}
	return finish(ctx, &p, rc);
}

/* PROG_WSCALE: the window scale option of a SYN (a walk over the options that would
 * multiply the main program's verifier paths), handed back to the main program, or on
 * to PROG_NEW when it opens a new flow. */
int HP_PROG(wscale)(HP_CTX *ctx)
{
	struct pkt p = {};
	struct hp_config *cfg = 0;
	struct scratch *s = 0;
	int rc = begin(ctx, &p, &s, &cfg);
	if (rc || !s || !cfg)
		return finish(ctx, &p, rc);
	if (!p.tcp)
		return finish(ctx, &p, V_DROP_MALFORMED);
	p.wscale = tcp_wscale(p.tcp, p.data_end, p.l3_end);
	p.wscale_ready = 1;
	/* a SYN of no flow goes straight on to be classified */
	__u32 next = known_flow(&p, cfg) ? PROG_MAIN : PROG_NEW;
	return finish(ctx, &p, go_slow(ctx, s, &p, next, DO_NEW, 0));
}

/* PROG install (fleet): flow records from peers, installed or merged (install.h). Never
 * attached: the agent runs it through BPF_PROG_TEST_RUN on a "packet" of INSTALL_HDR
 * bytes and up to HP_INSTALL_BATCH records; S_REC_* count the outcomes, and so does the
 * header it hands back (install.h INSTALL_HDR). */
int HP_PROG(install)(HP_CTX *ctx)
{
	struct hp_config *cfg = get_config();
	struct scratch *s = scratch_get();
	if (!cfg || !s)
		return ctx_drop();
	__u32 len = ctx_len(ctx);
	__u64 now = bpf_ktime_get_coarse_ns();
	__builtin_memset(s->rec_out, 0, sizeof(s->rec_out));
	for (__u32 i = 0; i < HP_INSTALL_BATCH; i++) {
		/* opaque: one verifier pass over the body, not one per record */
		__u32 off = INSTALL_HDR + opaque_u32(s, i) * sizeof(struct flow_record);
		if (off + sizeof(struct flow_record) > len)
			break;
		if (ctx_load_bytes(ctx, off, &s->rec, sizeof(s->rec)))
			break;
		install_record(cfg, s, now);
	}
	/* the outcomes over the header (it is always there: the agent sends it) */
	ctx_store_bytes(ctx, 0, s->rec_out, sizeof(s->rec_out));
	return ctx_drop();
}
