/* Answer a TCP packet with a RST in place, sent back out of the interface it came in on:
 * what AWS's NAT gateway does for a packet of a timed-out connection, and an NLB for a
 * packet of no connection. */
#ifndef HP_RST_H
#define HP_RST_H

/* Shrink the packet to Ethernet (+VLAN) + 20-byte IP + 20-byte TCP and write the RST. */
static __always_inline int rst_write(HP_CTX *ctx, struct pkt *p, const __u32 l3_off,
				     __be32 saddr, __be32 daddr, __be16 sport, __be16 dport,
				     __be32 seq, __be32 ack, __u8 out_flags, __u8 *smac, __u8 *dmac)
{
	if (ctx_set_len(ctx, l3_off + 40))
		return V_DROP_NO_REPLY;
	/* resizing invalidated every packet pointer: check again */
	void *data = ctx_data(ctx);
	void *data_end = ctx_data_end(ctx);
	if (data + l3_off + 40 > data_end)
		return V_DROP_NO_REPLY;
	struct ethhdr *eth = data;
	struct iphdr *ip = data + l3_off;
	struct tcphdr *t = data + l3_off + 20;
	__builtin_memcpy(eth->h_source, dmac, 6);
	__builtin_memcpy(eth->h_dest, smac, 6);
	ip->version = 4;
	ip->ihl = 5;
	ip->tos = 0;
	ip->tot_len = bpf_htons(40);
	ip->id = 0;
	ip->frag_off = bpf_htons(0x4000); /* DF */
	ip->ttl = 64;
	ip->protocol = IPPROTO_TCP;
	ip->saddr = daddr;
	ip->daddr = saddr;
	ip->check = 0;
	ip->check = csum_ipv4_hdr(ip);

	t->source = dport;
	t->dest = sport;
	t->seq = seq;
	t->ack_seq = ack;
	((__u8 *)t)[12] = 5 << 4; /* doff 5, no options */
	((__u8 *)t)[13] = out_flags;
	t->window = 0;
	t->urg_ptr = 0;
	t->check = 0;
	__u16 *w = (__u16 *)t;
	__u32 hdr = 0;
#pragma unroll
	for (int i = 0; i < 10; i++)
		hdr += w[i];
	__u32 pseudo = (daddr & 0xffff) + (daddr >> 16) + (saddr & 0xffff) + (saddr >> 16) +
		       bpf_htons(IPPROTO_TCP) + bpf_htons(20);
#ifdef HP_HOOK_TC
	/* The skb may still be CHECKSUM_PARTIAL (the device finishes the sum from the
	 * pseudo-header seed in the field). From a zero field, adding the header as a plain
	 * change and the pseudo-header as a BPF_F_PSEUDO_HDR change leaves the full checksum
	 * in a complete skb and exactly the seed in a partial one. */
	bpf_l4_csum_replace(ctx, l3_off + 36, 0, hdr, 0);
	bpf_l4_csum_replace(ctx, l3_off + 36, 0, pseudo, BPF_F_PSEUDO_HDR);
#else
	t->check = csum_fold32(hdr + pseudo);
#endif
	p->action = ctx_bounce(ctx);
	return p->action < 0 ? V_DROP_NO_REPLY : V_TX_RST;
}

static __always_inline int send_rst(HP_CTX *ctx, struct pkt *p)
{
	struct iphdr *ip = p->iph;
	struct tcphdr *t = p->tcp;
	if (!t)
		return V_DROP_MALFORMED;
	__u32 l3_off = p->l3_off;
	__u32 payload = bpf_ntohs(ip->tot_len) - ip->ihl * 4 - t->doff * 4;
	__u8 flags = p->tcp_flags;
	__be32 seq, ack;
	__u8 out_flags;
	/* RFC 793 reset generation */
	if (flags & TH_ACK) {
		seq = t->ack_seq;
		ack = 0;
		out_flags = TH_RST;
	} else {
		seq = 0;
		ack = bpf_htonl(bpf_ntohl(t->seq) + payload + !!(flags & TH_SYN) + !!(flags & TH_FIN));
		out_flags = TH_RST | TH_ACK;
	}
	__be32 saddr = ip->saddr, daddr = ip->daddr;
	__be16 sport = t->source, dport = t->dest;
	__u8 smac[6], dmac[6];
	__builtin_memcpy(smac, p->eth->h_source, 6);
	__builtin_memcpy(dmac, p->eth->h_dest, 6);

	/* verifier workaround: a variable header offset after a resize loses the checked
	 * range, so each possible offset (0, 1 or 2 VLAN tags) gets constant code */
	if (l3_off == 14)
		return rst_write(ctx, p, 14, saddr, daddr, sport, dport, seq, ack, out_flags, smac, dmac);
	if (l3_off == 18)
		return rst_write(ctx, p, 18, saddr, daddr, sport, dport, seq, ack, out_flags, smac, dmac);
	if (l3_off == 22)
		return rst_write(ctx, p, 22, saddr, daddr, sport, dport, seq, ack, out_flags, smac, dmac);
	return V_DROP_NO_REPLY;
}

#endif
