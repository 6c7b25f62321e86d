/* Header parsing. Every bounds check lives in these helpers; each returns the next
 * header's type (or a length) and -1 when the packet is too short or inconsistent. */
#ifndef HP_PARSING_H
#define HP_PARSING_H

struct cursor {
	void *pos;
};

struct vlan_hdr_ {
	__be16 tci;
	__be16 encap_proto;
};

/* Ethernet with at most two VLAN tags (802.1Q / 802.1ad). Returns the EtherType. */
static __always_inline int parse_eth(struct cursor *c, void *data_end, struct ethhdr **eth)
{
	struct ethhdr *e = c->pos;
	if ((void *)(e + 1) > data_end)
		return -1;
	*eth = e;
	c->pos = e + 1;
	__be16 proto = e->h_proto;
#pragma unroll
	for (int i = 0; i < 2; i++) {
		if (proto != bpf_htons(ETH_P_8021Q) && proto != bpf_htons(ETH_P_8021AD))
			break;
		struct vlan_hdr_ *v = c->pos;
		if ((void *)(v + 1) > data_end)
			return -1;
		proto = v->encap_proto;
		c->pos = v + 1;
	}
	return proto;
}

/* IPv4. Returns the L4 protocol; the caller checks ihl for options. Checks the header
 * is whole and tot_len is consistent with it and with the frame. */
static __always_inline int parse_ipv4(struct cursor *c, void *data_end, struct iphdr **iph)
{
	struct iphdr *ip = c->pos;
	if ((void *)(ip + 1) > data_end)
		return -1;
	if (ip->version != 4 || ip->ihl < 5)
		return -1;
	__u32 hlen = ip->ihl * 4;
	if (c->pos + hlen > data_end)
		return -1;
	__u32 tot = bpf_ntohs(ip->tot_len);
	if (tot < hlen || c->pos + tot > data_end)
		return -1;
	*iph = ip;
	c->pos += hlen;
	return ip->protocol;
}

/* TCP with its options. Returns the header length. */
static __always_inline int parse_tcp(struct cursor *c, void *data_end, struct tcphdr **tcp)
{
	struct tcphdr *t = c->pos;
	if ((void *)(t + 1) > data_end)
		return -1;
	__u32 hlen = t->doff * 4;
	if (hlen < sizeof(*t) || c->pos + hlen > data_end)
		return -1;
	*tcp = t;
	c->pos += hlen;
	return hlen;
}

static __always_inline int parse_udp(struct cursor *c, void *data_end, struct udphdr **udp)
{
	struct udphdr *u = c->pos;
	if ((void *)(u + 1) > data_end)
		return -1;
	if (bpf_ntohs(u->len) < sizeof(*u))
		return -1;
	*udp = u;
	c->pos = u + 1;
	return sizeof(*u);
}

/* ICMP: the 8-byte header (type, code, checksum, id/seq or unused/MTU). Returns the type. */
static __always_inline int parse_icmp(struct cursor *c, void *data_end, struct icmphdr **icmp)
{
	struct icmphdr *h = c->pos;
	if ((void *)(h + 1) > data_end)
		return -1;
	*icmp = h;
	c->pos = h + 1;
	return h->type;
}

/* The IPv4 header embedded in an ICMP error: whole 20 bytes, no options (we do not
 * translate errors about packets with options), followed by at least 8 bytes of L4. */
static __always_inline int parse_inner_ipv4(struct cursor *c, void *data_end, struct iphdr **iph)
{
	struct iphdr *ip = c->pos;
	if ((void *)(ip + 1) > data_end)
		return -1;
	if (ip->version != 4 || ip->ihl != 5)
		return -1;
	if ((void *)(ip + 1) + 8 > data_end)
		return -1;
	*iph = ip;
	c->pos = ip + 1;
	return ip->protocol;
}

#endif
