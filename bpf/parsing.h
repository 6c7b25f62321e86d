/* Header parsing. Every bounds check lives in these helpers; each returns the next
 * header's type (or a length) and -1 when the packet is too short or inconsistent.
 * Past the IPv4 header, `end` is the end of the IP datagram (tot_len), not of the frame:
 * bytes after it (Ethernet padding, trailers) are never read as headers. Every check is
 * made against data_end too, which is what the verifier needs to see. */
#ifndef HP_PARSING_H
#define HP_PARSING_H

struct cursor {
	void *pos;
};

struct vlan_hdr_ {
	__be16 tci;
	__be16 encap_proto;
};

/* A 16-bit length field (tot_len, a UDP length) in host order, with its range visible to
 * the verifier before it is added to a packet pointer.
 * verifier: 6.12 cannot prove the range of a byte swap (BPF_END leaves the register
 * unbounded, "math between pkt pointer and register with unbounded min value"; 6.18
 * accepts it unmasked), and clang drops a mask it can prove redundant, so the value is
 * hidden from clang before it is masked. */
static __always_inline __u32 be16_len(__be16 v)
{
	__u32 x = bpf_ntohs(v);
	asm volatile("" : "+r"(x));
	return x & 0xffff;
}

/* n bytes at p are inside both the frame and the datagram. */
#define HP_HAVE(p, n, data_end, end) \
	((void *)(p) + (n) <= (data_end) && (void *)(p) + (n) <= (end))

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

/* IPv4. Returns the L4 protocol and sets *end to the datagram's end; the caller checks
 * ihl for options. Checks the header is whole and tot_len is consistent with it and with
 * the frame: frame_len bytes from `data` (at tc an skb's data_end ends its linear part,
 * which may be less than a GSO superpacket's datagram). */
static __always_inline int parse_ipv4(struct cursor *c, void *data, void *data_end,
				      __u32 frame_len, struct iphdr **iph, void **end)
{
	struct iphdr *ip = c->pos;
	if ((void *)(ip + 1) > data_end)
		return -1;
	if (ip->version != 4 || ip->ihl < 5)
		return -1;
	__u32 hlen = ip->ihl * 4;
	if (c->pos + hlen > data_end)
		return -1;
	__u32 tot = be16_len(ip->tot_len);
	if (tot < hlen || (__u32)(c->pos - data) + tot > frame_len)
		return -1;
	*iph = ip;
	*end = c->pos + tot;
	c->pos += hlen;
	return ip->protocol;
}

/* TCP with its options. Returns the header length. */
static __always_inline int parse_tcp(struct cursor *c, void *data_end, void *end,
				     struct tcphdr **tcp)
{
	struct tcphdr *t = c->pos;
	if (!HP_HAVE(t, sizeof(*t), data_end, end))
		return -1;
	__u32 hlen = t->doff * 4;
	if (hlen < sizeof(*t) || !HP_HAVE(c->pos, hlen, data_end, end))
		return -1;
	*tcp = t;
	c->pos += hlen;
	return hlen;
}

static __always_inline int parse_udp(struct cursor *c, void *data_end, void *end, int frag,
				     struct udphdr **udp)
{
	struct udphdr *u = c->pos;
	if (!HP_HAVE(u, sizeof(*u), data_end, end))
		return -1;
	__u32 ulen = be16_len(u->len);
	/* within the datagram (a first fragment's length covers all of its fragments) */
	if (ulen < sizeof(*u) || (!frag && c->pos + ulen > end))
		return -1;
	*udp = u;
	c->pos = u + 1;
	return sizeof(*u);
}

/* ICMP: the 8-byte header (type, code, checksum, id/seq or unused/MTU). Returns the type. */
static __always_inline int parse_icmp(struct cursor *c, void *data_end, void *end,
				      struct icmphdr **icmp)
{
	struct icmphdr *h = c->pos;
	if (!HP_HAVE(h, sizeof(*h), data_end, end))
		return -1;
	*icmp = h;
	c->pos = h + 1;
	return h->type;
}

/* The IPv4 header embedded in an ICMP error: whole 20 bytes, no options (we do not
 * translate errors about packets with options), followed by at least 8 bytes of L4. */
static __always_inline int parse_inner_ipv4(struct cursor *c, void *data_end, void *end,
					    struct iphdr **iph)
{
	struct iphdr *ip = c->pos;
	if (!HP_HAVE(ip, sizeof(*ip) + 8, data_end, end))
		return -1;
	if (ip->version != 4 || ip->ihl != 5)
		return -1;
	*iph = ip;
	c->pos = ip + 1;
	return ip->protocol;
}

/* The window scale option of a SYN (RFC 7323), or WSCALE_NONE. Options are walked at most
 * 40 bytes; a malformed list ends the walk. */
static __always_inline __u8 tcp_wscale(struct tcphdr *t, void *data_end, void *end)
{
	__u8 *opt = (__u8 *)(t + 1);
	__u32 olen = t->doff * 4 - sizeof(*t);
	__u32 i = 0;
#pragma unroll
	for (int n = 0; n < 20; n++) {
		if (i >= olen || i >= 40)
			break;
		__u8 *o = opt + (i & 63);
		if (!HP_HAVE(o, 1, data_end, end))
			break;
		__u8 kind = o[0];
		if (kind == 0)
			break;
		if (kind == 1) {
			i++;
			continue;
		}
		if (!HP_HAVE(o, 2, data_end, end))
			break;
		__u8 len = o[1];
		if (len < 2)
			break;
		if (kind == 3 && len == 3) {
			if (!HP_HAVE(o, 3, data_end, end))
				break;
			return o[2] > 14 ? 14 : o[2];
		}
		i += len;
	}
	return WSCALE_NONE;
}

#endif
