/* Translation and forwarding: next hop (cached bpf_fib_lookup), address/port rewrite with
 * incremental checksums, MAC rewrite and redirect. */
#ifndef HP_FWD_H
#define HP_FWD_H

#ifndef AF_INET
#define AF_INET 2
#endif

/* Resolve where a packet with the translated tuple leaves. Returns 0 when nh is usable,
 * else the verdict: the kernel must handle it (untranslated), or there is no route. */
static __always_inline int next_hop(struct xdp_md *ctx, struct next_hop *nh, struct iphdr *ip,
				    __be32 src, __be32 dst, __be16 sport, __be16 dport, __u64 now)
{
	__u16 ip_len = bpf_ntohs(ip->tot_len);
	if (nh->ifindex && nh->checked_ns + HP_NH_REFRESH_NS > now && ip_len <= nh->mtu)
		return 0;
	struct bpf_fib_lookup f = {};
	f.family = AF_INET;
	f.tos = ip->tos;
	f.l4_protocol = ip->protocol;
	f.sport = sport;
	f.dport = dport;
	f.tot_len = ip_len;
	f.ipv4_src = src;
	f.ipv4_dst = dst;
	f.ifindex = ctx->ingress_ifindex;
	stat_inc(S_FIB_LOOKUP);
	int rc = bpf_fib_lookup(ctx, &f, sizeof(f), 0);
	switch (rc) {
	case BPF_FIB_LKUP_RET_SUCCESS:
		break;
	case BPF_FIB_LKUP_RET_BLACKHOLE:
	case BPF_FIB_LKUP_RET_UNREACHABLE:
	case BPF_FIB_LKUP_RET_PROHIBIT:
		return V_DROP_NO_ROUTE;
	default: /* no neighbour yet, MTU exceeded, forwarding off, local: the kernel decides */
		return V_PASS_FIB;
	}
	nh->ifindex = f.ifindex;
	nh->mtu = f.mtu_result ? f.mtu_result : ip_len;
	__builtin_memcpy(nh->smac, f.smac, 6);
	__builtin_memcpy(nh->dmac, f.dmac, 6);
	nh->checked_ns = now;
	return 0;
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

/* Rewrite addresses and ports to the translated tuple. Non-first fragments (no L4
 * header) only have addresses. */
static __always_inline void rewrite(struct pkt *p, __be32 nsrc, __be32 ndst, __be16 nsport,
				    __be16 ndport)
{
	struct iphdr *ip = p->iph;
	int pseudo = 0;
	__u16 *l4c = l4_check(p, &pseudo);
	__u16 *sport = 0, *dport = 0;

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
	if (ip->saddr != nsrc) {
		hp_csum_replace4(&ip->check, ip->saddr, nsrc);
		if (l4c && pseudo)
			hp_csum_replace4(l4c, ip->saddr, nsrc);
		ip->saddr = nsrc;
	}
	if (ip->daddr != ndst) {
		hp_csum_replace4(&ip->check, ip->daddr, ndst);
		if (l4c && pseudo)
			hp_csum_replace4(l4c, ip->daddr, ndst);
		ip->daddr = ndst;
	}
	if (sport && *sport != nsport) {
		if (l4c)
			hp_csum_replace2(l4c, *sport, nsport);
		*sport = nsport;
	}
	if (dport && *dport != ndport) {
		if (l4c)
			hp_csum_replace2(l4c, *dport, ndport);
		*dport = ndport;
	}
	/* UDP: a computed 0 is sent as 0xffff (0 means "no checksum") */
	if (l4c && p->udp && *l4c == 0)
		*l4c = 0xffff;
	dec_ttl(ip);
}

static __always_inline int send_to(struct pkt *p, struct next_hop *nh)
{
	__builtin_memcpy(p->eth->h_dest, nh->dmac, 6);
	__builtin_memcpy(p->eth->h_source, nh->smac, 6);
	p->action = bpf_redirect(nh->ifindex, 0);
	return p->action == XDP_REDIRECT ? 0 : V_DROP_NO_ROUTE;
}

#endif
