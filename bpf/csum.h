/* Incremental Internet checksum updates (RFC 1624: HC' = ~(~HC + ~m + m')). One's
 * complement sums do not depend on byte order, so network-order words are summed as is. */
#ifndef HP_CSUM_H
#define HP_CSUM_H

static __always_inline __u16 csum_fold32(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)~sum;
}

/* Replace a 16-bit word covered by *check. */
static __always_inline void hp_csum_replace2(__u16 *check, __u16 from, __u16 to)
{
	__u32 sum = (__u16)~*check;
	sum += (__u16)~from;
	sum += to;
	*check = csum_fold32(sum);
}

/* Replace a 32-bit word covered by *check. */
static __always_inline void hp_csum_replace4(__u16 *check, __u32 from, __u32 to)
{
	__u32 sum = (__u16)~*check;
	sum += (__u16)~(from & 0xffff);
	sum += (__u16)~(from >> 16);
	sum += (to & 0xffff);
	sum += (to >> 16);
	*check = csum_fold32(sum);
}

/* A running delta, for checksums that cover several changed words (ICMP errors). */
static __always_inline __u32 csum_delta2(__u32 acc, __u16 from, __u16 to)
{
	return acc + (__u16)~from + to;
}

static __always_inline __u32 csum_delta4(__u32 acc, __u32 from, __u32 to)
{
	acc += (__u16)~(from & 0xffff);
	acc += (__u16)~(from >> 16);
	acc += (to & 0xffff);
	acc += (to >> 16);
	return acc;
}

static __always_inline void csum_apply(__u16 *check, __u32 delta)
{
	__u32 sum = (__u16)~*check;
	sum += (delta & 0xffff) + (delta >> 16);
	*check = csum_fold32(sum);
}

/* A full checksum over a 20-byte IPv4 header (used when we build a RST). */
static __always_inline __u16 csum_ipv4_hdr(struct iphdr *iph)
{
	__u16 *w = (__u16 *)iph;
	__u32 sum = 0;
#pragma unroll
	for (int i = 0; i < 10; i++)
		sum += w[i];
	return csum_fold32(sum);
}

#endif
