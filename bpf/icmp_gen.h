/* ICMP errors this node sends as a router (RFC 792, RFC 1812 4.3): time exceeded when a
 * packet's TTL runs out here, and destination unreachable / fragmentation needed when a
 * packet with DF is too big for the next hop. The error is about the packet as it
 * arrived (untranslated), so the sender recognises its own packet; it goes back out of
 * the interface the packet came in on, from this node's address toward the sender. */
#ifndef HP_ICMP_GEN_H
#define HP_ICMP_GEN_H

#ifndef ICMP_FRAG_NEEDED
#define ICMP_FRAG_NEEDED 4
#endif
#define ICMP_ERR_BURST (HP_ICMP_RATE / 10 + 1)

static __always_inline int is_icmp_error(__u8 type)
{
	return type == ICMP_DEST_UNREACH || type == ICMP_TIME_EXCEEDED ||
	       type == ICMP_PARAMETERPROB;
}

/* A token bucket per CPU (HP_ICMP_RATE per second), like the kernel's icmp_ratelimit. */
static __always_inline int icmp_budget_take(__u64 now)
{
	__u32 zero = 0;
	struct icmp_bucket *b = icmp_budget.lookup(&zero);
	if (!b)
		return 0;
	__u64 per = HP_NSEC / HP_ICMP_RATE;
	__u64 elapsed = now - b->last_ns;
	if (elapsed >= per) {
		__u64 add = elapsed / per;
		b->tokens = b->tokens + add > ICMP_ERR_BURST ? ICMP_ERR_BURST : b->tokens + add;
		b->last_ns = now;
	}
	if (!b->tokens)
		return 0;
	b->tokens--;
	return 1;
}

/* The field that makes a partial checksum harmless: at tc an skb may still carry
 * CHECKSUM_PARTIAL from the packet it was, with the device due to sum the quoted L4
 * header and store the result in its checksum field. A value F with F == ~(a + F) (a:
 * the one's complement sum of the region's other words) is what that sum writes back,
 * so the quote, and the ICMP checksum over it, are the same whether or not it happens.
 * In one's complement arithmetic F + F = ~a, and doubling is a left rotation. */
static __always_inline __u16 csum_fixed_point(__u32 a)
{
	__u16 na = csum_fold32(a); /* ~a, folded */
	__u16 f = (__u16)((na >> 1) | (na << 15));
	return f ? f : 0xffff;
}

/* Turn the packet in hand into an ICMP error about it and send it back. */
static __always_inline int icmp_reply(HP_CTX *ctx, struct pkt *p, __u8 type, __u8 code,
				      __u16 mtu)
{
	struct iphdr *ip = p->iph;
	/* never an error about an error, a later fragment or a packet with options */
	if (ip->ihl != 5 || (p->icmp && is_icmp_error(p->icmp_type)) ||
	    (p->frag && !p->frag_first))
		return V_DROP_NO_REPLY;
	__u32 l2 = p->l3_off;
	if (l2 != 14 && l2 != 18 && l2 != 22)
		return V_DROP_NO_REPLY;

	/* the quote: the IP header and the L4 header (TCP's 20 bytes, else the first 8) */
	struct scratch *s = scratch_get();
	if (!s)
		return V_DROP_NO_REPLY;
	struct icmp_err_hdrs *h = &s->icmp;
	__builtin_memset(h, 0, sizeof(*h));
	__u32 q = 8;
	if (p->tcp && HP_HAVE(ip, 40, p->data_end, p->l3_end)) {
		q = 20;
		__builtin_memcpy(&h->quote_ip, ip, 40);
	} else if (HP_HAVE(ip, 28, p->data_end, p->l3_end)) {
		__builtin_memcpy(&h->quote_ip, ip, 28);
	} else {
		return V_DROP_NO_REPLY;
	}

	/* from this node's address on the route back to the sender. The neighbour is looked
	 * up too: only then does the helper fill smac (not with BPF_FIB_LOOKUP_SKIP_NEIGH). */
	struct bpf_fib_lookup *f = &s->fib;
	__builtin_memset(f, 0, sizeof(*f));
	f->family = AF_INET;
	f->tot_len = 20;
	f->ipv4_dst = ip->saddr;
	f->ifindex = p->ifindex;
	int rc = bpf_fib_lookup(ctx, f, sizeof(*f), BPF_FIB_LOOKUP_SRC);
	if ((rc != BPF_FIB_LKUP_RET_SUCCESS && rc != BPF_FIB_LKUP_RET_NO_NEIGH) || !f->ipv4_src)
		return V_DROP_NO_REPLY;
	if (!icmp_budget_take(p->now))
		return V_DROP_ICMP_RATELIMIT;

	__u8 macs[12];
	__builtin_memcpy(macs, p->eth->h_source, 6);     /* new destination: the sender */
	/* new source: our interface's MAC; when the helper could not say (the route back's
	 * neighbour is not resolved, or it leaves by another interface), the unicast MAC the
	 * packet was sent to, which is ours */
	if (rc == BPF_FIB_LKUP_RET_SUCCESS && f->ifindex == p->ifindex)
		__builtin_memcpy(macs + 6, f->smac, 6);
	else if (!(p->eth->h_dest[0] & 1))
		__builtin_memcpy(macs + 6, p->eth->h_dest, 6);
	else
		return V_DROP_NO_REPLY;

	h->ip.version = 4;
	h->ip.ihl = 5;
	h->ip.tos = 0xc0; /* internetwork control, as Linux sends its errors */
	h->ip.tot_len = bpf_htons(sizeof(struct iphdr) + sizeof(struct icmphdr) + 20 + q);
	h->ip.ttl = 64;
	h->ip.protocol = IPPROTO_ICMP;
	h->ip.saddr = f->ipv4_src;
	h->ip.daddr = h->quote_ip.saddr;
	h->ip.check = csum_ipv4_hdr(&h->ip);
	h->icmp.type = type;
	h->icmp.code = code;
	if (type == ICMP_DEST_UNREACH && code == ICMP_FRAG_NEEDED)
		h->icmp.un.frag.mtu = bpf_htons(mtu);
#ifdef HP_HOOK_TC
	/* A field that holds exactly the pseudo-header seed is a partial checksum's (a full
	 * one equals it once in 65,536): only then is the quote made safe from the device.
	 * Verifier workaround: constant offsets into the quote (q is 8 or 20). */
	__u32 ps = (h->quote_ip.saddr & 0xffff) + (h->quote_ip.saddr >> 16) +
		   (h->quote_ip.daddr & 0xffff) + (h->quote_ip.daddr >> 16) +
		   bpf_htons(h->quote_ip.protocol);
	if (q == 20) {
		__u16 *w = (__u16 *)h->quote_l4;
		__u16 seed = ~csum_fold32(ps + bpf_htons(bpf_ntohs(h->quote_ip.tot_len) - 20));
		if (w[8] == seed) {
			w[8] = 0;
			__u32 a = 0;
#pragma unroll
			for (int i = 0; i < 10; i++)
				a += w[i];
			w[8] = csum_fixed_point(a);
		}
	} else if (p->udp) {
		__u16 *w = (__u16 *)h->quote_l4;
		__u16 seed = ~csum_fold32(ps + w[2]); /* w[2]: the UDP length */
		if (w[3] && w[3] == seed)
			w[3] = csum_fixed_point((__u32)w[0] + w[1] + w[2]);
	}
#endif
	__u32 body = sizeof(struct icmphdr) + 20 + q;
	__s64 sum;
	if (q == 20)
		sum = bpf_csum_diff(0, 0, (__be32 *)&h->icmp, sizeof(struct icmphdr) + 40, 0);
	else
		sum = bpf_csum_diff(0, 0, (__be32 *)&h->icmp, sizeof(struct icmphdr) + 28, 0);
	if (sum < 0)
		return V_DROP_NO_REPLY;
	h->icmp.checksum = csum_fold32((__u32)sum);

	/* Every packet pointer is invalid from here on. */
	if (ctx_set_len(ctx, l2 + 20 + q))
		return V_DROP_NO_REPLY;
	if (ctx_insert_after_l2(ctx, l2, sizeof(struct iphdr) + sizeof(struct icmphdr)))
		return V_DROP_NO_REPLY;
	if (l2 > 22)
		return V_DROP_NO_REPLY;
#ifdef HP_HOOK_TC
	if (bpf_skb_store_bytes(ctx, 0, macs, 12, 0) ||
	    bpf_skb_store_bytes(ctx, l2, h, sizeof(struct iphdr) + body, 0))
		return V_DROP_NO_REPLY;
#else
	if (bpf_xdp_store_bytes(ctx, 0, macs, 12) ||
	    (q == 20 ? bpf_xdp_store_bytes(ctx, l2, h, sizeof(struct iphdr) + 48)
		     : bpf_xdp_store_bytes(ctx, l2, h, sizeof(struct iphdr) + 36)))
		return V_DROP_NO_REPLY;
#endif
	p->action = ctx_bounce(ctx);
	if (p->action < 0)
		return V_DROP_NO_REPLY;
	return type == ICMP_TIME_EXCEEDED ? V_TX_TIME_EXCEEDED : V_TX_FRAG_NEEDED;
}

#endif
