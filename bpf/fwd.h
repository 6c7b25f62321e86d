/* Translation and forwarding: next hop (cached bpf_fib_lookup), the ingress check,
 * address/port rewrite with incremental checksums, MAC rewrite and redirect. */
#ifndef HP_FWD_H
#define HP_FWD_H

#ifndef AF_INET
#define AF_INET 2
#endif
#ifndef BPF_FIB_LOOKUP_SKIP_NEIGH
#define BPF_FIB_LOOKUP_SKIP_NEIGH (1U << 2)
#endif
#ifndef BPF_FIB_LOOKUP_SRC
#define BPF_FIB_LOOKUP_SRC (1U << 4)
#endif

/* next_hop() results below the verdicts (which are all > RT_TOO_BIG when returned). */
#define RT_OK 0       /* nh is usable */
#define RT_NEIGH 1    /* routed, but the next hop's MAC is not known yet: r->ifindex, r->gw */
#define RT_TOO_BIG 2  /* larger than the next hop's MTU: r->mtu */

struct route {
	__u32 ifindex;
	__be32 gw;
	__u16 mtu;
};

/* The L3 length of the packet in hand and the bytes of headers before its L4 payload. */
static __always_inline __u32 l3_hdrs_len(struct pkt *p)
{
	__u32 len = p->iph->ihl * 4;
	if (p->tcp)
		len += p->tcp->doff * 4;
	else if (p->udp)
		len += sizeof(struct udphdr);
	return len;
}

/* Resolve where a packet with the translated tuple leaves. Returns RT_OK when nh is
 * usable, RT_NEIGH / RT_TOO_BIG with r filled, or a drop verdict. */
static __always_inline int next_hop(HP_CTX *ctx, struct pkt *p, struct next_hop *nh,
				    __be32 src, __be32 dst, __be16 sport, __be16 dport,
				    struct route *r)
{
	struct iphdr *ip = p->iph;
	__u16 ip_len = bpf_ntohs(ip->tot_len);
	__u32 mtu_len = ctx_mtu_len(ctx, ip_len, l3_hdrs_len(p));
	if (nh->ifindex && nh->checked_ns + HP_NH_REFRESH_NS > p->now && mtu_len <= nh->mtu)
		return RT_OK;
	struct bpf_fib_lookup *f = fib_params();
	if (!f)
		return V_DROP_NO_ROUTE;
	f->family = AF_INET;
	f->tos = ip->tos;
	f->l4_protocol = ip->protocol;
	f->sport = sport;
	f->dport = dport;
	/* What must fit the route's MTU (at tc one GSO segment): with tot_len set the helper
	 * checks the route's MTU (a locked one, else the device's), and on success reports
	 * it in mtu_result. With tot_len 0 (tc) it would check the skb against the device
	 * only, ignoring the route; and the device's MTU (bpf_check_mtu) is not the route's. */
	f->tot_len = mtu_len;
	f->ipv4_src = src;
	f->ipv4_dst = dst;
	f->ifindex = p->ifindex;
	stat_inc(S_FIB_LOOKUP);
	int rc = bpf_fib_lookup(ctx, f, sizeof(*f), 0);
	switch (rc) {
	case BPF_FIB_LKUP_RET_SUCCESS:
		break;
	case BPF_FIB_LKUP_RET_NO_NEIGH:
		r->ifindex = f->ifindex;
		r->gw = f->ipv4_dst;
		return RT_NEIGH;
	case BPF_FIB_LKUP_RET_FRAG_NEEDED:
		r->ifindex = f->ifindex;
		r->mtu = f->mtu_result;
		return RT_TOO_BIG;
	default: /* unreachable, blackhole, prohibited, local, forwarding off */
		return V_DROP_NO_ROUTE;
	}
	__u32 mtu = f->mtu_result; /* the route's MTU, at least mtu_len */
	nh->ifindex = f->ifindex;
	nh->mtu = mtu > mtu_len ? mtu : mtu_len;
	__builtin_memcpy(nh->smac, f->smac, 6);
	__builtin_memcpy(nh->dmac, f->dmac, 6);
	nh->checked_ns = p->now;
	return RT_OK;
}

/* Strict reverse-path check (RFC 3704): did the packet arrive on the interface this
 * node routes its source through? Stops inside addresses spoofed from the outside and
 * replies forged from the inside. */
static __always_inline int ingress_ok(HP_CTX *ctx, struct pkt *p, struct hp_config *cfg)
{
	if (cfg->flags & HP_F_LOOSE_INGRESS)
		return 1;
	struct bpf_fib_lookup *f = fib_params();
	if (!f)
		return 0;
	f->family = AF_INET;
	f->tot_len = 20; /* the route is asked about, not this packet's size */
	f->ipv4_dst = p->iph->saddr;
	f->ifindex = p->ifindex;
	int rc = bpf_fib_lookup(ctx, f, sizeof(*f), BPF_FIB_LOOKUP_SKIP_NEIGH);
	return rc == BPF_FIB_LKUP_RET_SUCCESS && f->ifindex == p->ifindex;
}

/* Is the packet addressed to this node itself (its own address: local delivery)? */
static __always_inline int to_this_node(HP_CTX *ctx, struct pkt *p)
{
	struct bpf_fib_lookup *f = fib_params();
	if (!f)
		return 0;
	f->family = AF_INET;
	f->tot_len = 20;
	f->ipv4_src = p->iph->saddr;
	f->ipv4_dst = p->iph->daddr;
	f->ifindex = p->ifindex;
	return bpf_fib_lookup(ctx, f, sizeof(*f), BPF_FIB_LOOKUP_SKIP_NEIGH) ==
	       BPF_FIB_LKUP_RET_NOT_FWDED;
}

/* A packet of a known flow must arrive where that direction's packets do; when it does
 * not, its route may have moved (then the flow follows), or it is forged. */
static __always_inline int flow_ingress_ok(HP_CTX *ctx, struct pkt *p, struct hp_config *cfg,
					   struct flow_value *v)
{
	if (v->in_ifindex == p->ifindex || p->from_peer)
		return 1; /* a peer checked a handed-over packet where it came in */
	if (!ingress_ok(ctx, p, cfg))
		return 0;
	if (v->in_ifindex) /* 0: a reply direction's first packet, learned here */
		stat_inc(S_IFACE_MOVED);
	v->in_ifindex = p->ifindex;
	return 1;
}

/* The L4 checksum a translation must keep right, and whether it covers the addresses. */
static __always_inline __u16 *l4_check(struct pkt *p, int *pseudo)
{
	*pseudo = 0;
	if (p->tcp) {
		*pseudo = 1;
		return &p->tcp->check;
	}
	if (p->udp) {
		if (!p->udp->check) /* no checksum: stays 0 */
			return 0;
		*pseudo = 1;
		return &p->udp->check;
	}
	if (p->icmp)
		return &p->icmp->checksum;
	return 0;
}

static __always_inline void dec_ttl(struct iphdr *ip)
{
	__u16 *w = (__u16 *)&ip->ttl; /* the ttl + protocol word */
	__u16 old = *w;
	ip->ttl--;
	hp_csum_replace2(&ip->check, old, *w);
}

/* Rewrite addresses and ports to the translated tuple, and the TTL when this node
 * forwards the packet itself (not when the kernel will). Non-first fragments (no L4
 * header) only have addresses. TCP/UDP checksums: at XDP updated here (always full); at
 * tc collected in p->fix for l4_fix_apply(), which knows a partial checksum. */
static __always_inline void rewrite(struct pkt *p, __be32 nsrc, __be32 ndst, __be16 nsport,
				    __be16 ndport, int ttl)
{
	struct iphdr *ip = p->iph;
	int pseudo = 0;
	__u16 *l4c = l4_check(p, &pseudo);
	__u16 *sport = 0, *dport = 0;
#ifdef HP_HOOK_TC
	int deferred = pseudo; /* TCP or UDP with a checksum */
	if (deferred) {
		p->fix.off = (void *)l4c - p->data;
		p->fix.udp = p->udp != 0;
	}
#else
	const int deferred = 0;
#endif

	if (p->tcp) {
		sport = &p->tcp->source;
		dport = &p->tcp->dest;
	} else if (p->udp) {
		sport = &p->udp->source;
		dport = &p->udp->dest;
	} else if (p->icmp) {
		/* the echo identifier plays the source port on requests and the destination
		 * port on replies */
		if (p->icmp_type == ICMP_ECHO)
			sport = &p->icmp->un.echo.id;
		else
			dport = &p->icmp->un.echo.id;
	}
	/* Every field is rewritten, changed or not: an unchanged one adds nothing to a
	 * checksum, and fewer branches keep the verifier's paths few. */
	hp_csum_replace4(&ip->check, ip->saddr, nsrc);
	hp_csum_replace4(&ip->check, ip->daddr, ndst);
	if (deferred) {
		p->fix.pseudo = csum_delta4(csum_delta4(0, ip->saddr, nsrc), ip->daddr, ndst);
	} else if (l4c && pseudo) {
		hp_csum_replace4(l4c, ip->saddr, nsrc);
		hp_csum_replace4(l4c, ip->daddr, ndst);
	}
	ip->saddr = nsrc;
	ip->daddr = ndst;
	if (sport) {
		if (deferred)
			p->fix.ports = csum_delta2(p->fix.ports, *sport, nsport);
		else if (l4c)
			hp_csum_replace2(l4c, *sport, nsport);
		*sport = nsport;
	}
	if (dport) {
		if (deferred)
			p->fix.ports = csum_delta2(p->fix.ports, *dport, ndport);
		else if (l4c)
			hp_csum_replace2(l4c, *dport, ndport);
		*dport = ndport;
	}
	/* UDP: a computed 0 is sent as 0xffff (0 means "no checksum") */
	if (!deferred && l4c && p->udp && *l4c == 0)
		*l4c = 0xffff;
	if (ttl)
		dec_ttl(ip);
}

/* tc: apply the collected TCP/UDP checksum changes. bpf_l4_csum_replace() updates a full
 * checksum, or, for a partial one (the pseudo-header sum that the device finishes), only
 * the pseudo-header part. Invalidates every packet pointer: call it last. */
static __always_inline void l4_fix_apply(HP_CTX *ctx, struct pkt *p)
{
#ifdef HP_HOOK_TC
	if (!p->fix.off)
		return;
	__u64 mm = p->fix.udp ? BPF_F_MARK_MANGLED_0 : 0;
	if (p->fix.pseudo)
		bpf_l4_csum_replace(ctx, p->fix.off, 0, p->fix.pseudo, BPF_F_PSEUDO_HDR | mm);
	if (p->fix.ports)
		bpf_l4_csum_replace(ctx, p->fix.off, 0, p->fix.ports, mm);
	p->fix.off = 0;
#endif
}

/* Send a translated packet on its way. RT_OK: to the cached next hop. RT_NEIGH: at tc
 * through the neighbour subsystem (it resolves the MAC, ARP, and queues meanwhile); at
 * XDP to the kernel, which does the same. Returns a TX verdict (tx), or another. */
static __always_inline int send_out(HP_CTX *ctx, struct pkt *p, int rt, struct next_hop *nh,
				    struct route *r, int tx)
{
	if (rt == RT_OK) {
		__builtin_memcpy(p->eth->h_dest, nh->dmac, 6);
		__builtin_memcpy(p->eth->h_source, nh->smac, 6);
		l4_fix_apply(ctx, p);
		p->action = ctx_redirect(nh->ifindex);
		return p->action < 0 ? V_DROP_NO_ROUTE : tx;
	}
#ifdef HP_HOOK_TC
	l4_fix_apply(ctx, p);
	struct bpf_redir_neigh rn = {};
	rn.nh_family = AF_INET;
	rn.ipv4_nh = r->gw;
	stat_inc(S_NEIGH_RESOLVE);
	p->action = hp_redirect_neigh(r->ifindex, &rn, sizeof(rn), 0) == TC_ACT_REDIRECT
		    ? TC_ACT_REDIRECT : -1;
	return p->action < 0 ? V_DROP_NO_ROUTE : tx;
#else
	p->action = ctx_pass(ctx, 1);
	return V_PASS_NEIGH;
#endif
}

#endif
