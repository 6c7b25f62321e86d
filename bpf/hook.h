/* The two hooks the same C runs at, chosen at compile time (the loader passes -DHP_HOOK_TC
 * for tc):
 *   XDP (native/driver mode): full checksums, no GSO; fastest.
 *   tc ingress (clsact): an skb, possibly a GSO/GRO superpacket with a partial checksum
 *     (only the pseudo-header in the field, the device finishes it). Generic XDP cannot
 *     tell a partial checksum from a full one; at tc, bpf_l4_csum_replace() knows the skb
 *     and updates either kind right, and the FIB's MTU check knows GSO. Veth and NICs
 *     without native XDP use this hook (Cilium splits XDP and tc the same way).
 * Everything hook-specific lives here; the rest of the program is the same C for both. */
#ifndef HP_HOOK_H
#define HP_HOOK_H

#ifdef HP_HOOK_TC
#define HP_CTX struct __sk_buff
#define HP_ENTRY tc_hyperplane
#define HP_PROG(name) tc_hp_##name
#define HP_HOOK_NAME "tc"
#ifndef TC_ACT_OK
#define TC_ACT_OK 0
#define TC_ACT_SHOT 2
#define TC_ACT_REDIRECT 7
#endif
#else
#define HP_CTX struct xdp_md
#define HP_ENTRY xdp_hyperplane
#define HP_PROG(name) xdp_hp_##name
#define HP_HOOK_NAME "xdp"
#endif

#ifndef BPF_F_PSEUDO_HDR
#define BPF_F_PSEUDO_HDR (1ULL << 4)
#endif
#ifndef BPF_F_MARK_MANGLED_0
#define BPF_F_MARK_MANGLED_0 (1ULL << 5)
#endif

#ifdef HP_HOOK_TC
/* bcc 0.26 declares this helper with its first, three-argument signature; the kernel's
 * (5.11+) takes the length of params too. */
static long (*hp_redirect_neigh)(__u32 ifindex, struct bpf_redir_neigh *params, int plen,
				 __u64 flags) = (void *)BPF_FUNC_redirect_neigh;
#endif

/* skb->mark of a translated packet handed to the kernel for what BPF cannot do
 * (fragmenting); the lab's forward chain accepts exactly these. Keep in sync:
 * hyperplane/lab (kernel_assist_mark reads it). */
#define HP_MARK_ASSIST 0x48500001

/* Headers the parser reads must be in the linear part of an skb. */
#define HP_PULL_LEN 160

static __always_inline void *ctx_data(HP_CTX *ctx)
{
	return (void *)(long)ctx->data;
}

static __always_inline void *ctx_data_end(HP_CTX *ctx)
{
	return (void *)(long)ctx->data_end;
}

static __always_inline __u32 ctx_ingress_ifindex(HP_CTX *ctx)
{
#ifdef HP_HOOK_TC
	return ctx->ingress_ifindex;
#else
	return ctx->ingress_ifindex;
#endif
}

/* Bytes and packets a packet stands for, for the metrics: a GSO superpacket is gso_segs
 * packets on the wire. */
static __always_inline __u32 ctx_len(HP_CTX *ctx)
{
#ifdef HP_HOOK_TC
	return ctx->len;
#else
	return ctx_data_end(ctx) - ctx_data(ctx);
#endif
}

static __always_inline __u32 ctx_segs(HP_CTX *ctx)
{
#ifdef HP_HOOK_TC
	__u32 segs = ctx->gso_segs;
	return segs > 1 ? segs : 1;
#else
	return 1;
#endif
}

/* Is the frame addressed to this host (or broadcast)? At tc the stack has decided it
 * (a frame for another MAC is PACKET_OTHERHOST, which the kernel drops); XDP sees only
 * what the NIC accepts. */
static __always_inline int ctx_for_us(HP_CTX *ctx)
{
#ifdef HP_HOOK_TC
	return ctx->pkt_type != 3; /* PACKET_OTHERHOST */
#else
	return 1;
#endif
}

/* Make the headers directly readable (an skb's may sit in fragments). */
static __always_inline void ctx_pull(HP_CTX *ctx)
{
#ifdef HP_HOOK_TC
	__u32 want = ctx->len < HP_PULL_LEN ? ctx->len : HP_PULL_LEN;
	if (ctx_data(ctx) + want > ctx_data_end(ctx))
		bpf_skb_pull_data(ctx, want);
#endif
}

/* The size that must fit the next hop's MTU: for a GSO superpacket one segment's. */
static __always_inline __u32 ctx_mtu_len(HP_CTX *ctx, __u32 ip_len, __u32 hdrs_len)
{
#ifdef HP_HOOK_TC
	__u32 gso = ctx->gso_size;
	if (gso)
		return gso + hdrs_len;
#endif
	return ip_len;
}

/* Send the packet out of ifindex (already rewritten for it). Returns the hook's action,
 * or -1 when the redirect was refused. */
static __always_inline int ctx_redirect(__u32 ifindex)
{
	long rc = bpf_redirect(ifindex, 0);
#ifdef HP_HOOK_TC
	return rc == TC_ACT_REDIRECT ? TC_ACT_REDIRECT : -1;
#else
	return rc == XDP_REDIRECT ? XDP_REDIRECT : -1;
#endif
}

/* Copy len bytes at offset off of the packet into buf. Returns 0 or < 0. */
static __always_inline int ctx_load_bytes(HP_CTX *ctx, __u32 off, void *buf, __u32 len)
{
#ifdef HP_HOOK_TC
	return bpf_skb_load_bytes(ctx, off, buf, len);
#else
	return bpf_xdp_load_bytes(ctx, off, buf, len);
#endif
}

/* Copy len bytes of buf over the packet at offset off. Returns 0 or < 0. */
static __always_inline int ctx_store_bytes(HP_CTX *ctx, __u32 off, void *buf, __u32 len)
{
#ifdef HP_HOOK_TC
	return bpf_skb_store_bytes(ctx, off, buf, len, 0);
#else
	return bpf_xdp_store_bytes(ctx, off, buf, len);
#endif
}

/* Send the packet back out of the interface it came in on (RSTs, ICMP errors). */
static __always_inline int ctx_bounce(HP_CTX *ctx)
{
#ifdef HP_HOOK_TC
	return ctx_redirect(ctx->ifindex);
#else
	return XDP_TX;
#endif
}

/* Hand the packet to the kernel's stack. */
static __always_inline int ctx_pass(HP_CTX *ctx, int translated)
{
#ifdef HP_HOOK_TC
	if (translated)
		ctx->mark = HP_MARK_ASSIST;
	return TC_ACT_OK;
#else
	return XDP_PASS;
#endif
}

static __always_inline int ctx_drop(void)
{
#ifdef HP_HOOK_TC
	return TC_ACT_SHOT;
#else
	return XDP_DROP;
#endif
}

/* Change the packet's length to new_len bytes from its start (trailing bytes go, or zero
 * bytes are appended). Every packet pointer is invalid afterwards. Returns 0 or < 0. */
static __always_inline int ctx_set_len(HP_CTX *ctx, __u32 new_len)
{
#ifdef HP_HOOK_TC
	return bpf_skb_change_tail(ctx, new_len, 0);
#else
	int delta = (int)new_len - (int)(ctx_data_end(ctx) - ctx_data(ctx));
	return delta ? bpf_xdp_adjust_tail(ctx, delta) : 0;
#endif
}

/* Insert `room` bytes right after the first l2_len bytes (the Ethernet header). Every
 * packet pointer is invalid afterwards. Returns 0 or < 0. */
static __always_inline int ctx_insert_after_l2(HP_CTX *ctx, __u32 l2_len, __u32 room)
{
#ifdef HP_HOOK_TC
	if (l2_len != sizeof(struct ethhdr))
		return -1; /* an in-band VLAN tag at tc: not supported here */
	return bpf_skb_adjust_room(ctx, room, BPF_ADJ_ROOM_MAC, 0);
#else
	if (bpf_xdp_adjust_head(ctx, -(int)room))
		return -1;
	void *data = ctx_data(ctx);
	void *data_end = ctx_data_end(ctx);
	/* verifier workaround: constant lengths for the move (0, 1 or 2 VLAN tags) */
	if (l2_len == 14) {
		if (data + room + 14 > data_end)
			return -1;
		__builtin_memcpy(data, data + room, 14); /* room >= l2_len: no overlap */
	} else if (l2_len == 18) {
		if (data + room + 18 > data_end)
			return -1;
		__builtin_memcpy(data, data + room, 18); /* room >= l2_len: no overlap */
	} else if (l2_len == 22) {
		if (data + room + 22 > data_end)
			return -1;
		__builtin_memcpy(data, data + room, 22); /* room >= l2_len: no overlap */
	} else {
		return -1;
	}
	return 0;
#endif
}

#endif
