/* ICMP errors (unreachable, fragmentation needed, time exceeded, parameter problem) about
 * a translated flow: the embedded header is a packet of the flow going the other way, so
 * the outer header and the embedded addresses, ports and checksums are all translated.
 * An error travelling outward (from any inside host or router, or from the targets' side)
 * leaves from the NAT IP / VIP, never from its private source, as Linux NAT does. */
#ifndef HP_ICMP_ERR_H
#define HP_ICMP_ERR_H

/* Returns a verdict, or -1 when the error is about no flow of ours (classified then like
 * any other packet). */
static __always_inline int icmp_error(HP_CTX *ctx, struct pkt *p, struct hp_config *cfg)
{
	if (!p->icmp)
		return -1;
	void *data_end = p->data_end;
	void *end = p->l3_end;
	struct cursor c = { .pos = p->icmp + 1 };
	struct iphdr *in;
	int iproto = parse_inner_ipv4(&c, data_end, end, &in);
	if (iproto < 0)
		return -1;
	void *il4 = c.pos; /* 8 bytes present (parse_inner_ipv4) */
	if (!HP_HAVE(il4, 8, data_end, end))
		return -1;
	__u16 *iports = il4;

	/* K: the key of the flow direction this error travels in = the embedded packet
	 * reversed. */
	struct flow_key k = {};
	k.proto = iproto;
	k.src_ip = in->daddr;
	k.dst_ip = in->saddr;
	__u16 *isport = 0, *idport = 0; /* the embedded packet's "ports" */
	__u16 *il4c = 0;
	int ipseudo = 0;
	if (iproto == IPPROTO_TCP || iproto == IPPROTO_UDP) {
		isport = iports;
		idport = iports + 1;
		if (iproto == IPPROTO_UDP) {
			il4c = iports + 3;
			if (*il4c == 0)
				il4c = 0;
		} else if (HP_HAVE(il4, 18, data_end, end)) {
			il4c = iports + 8; /* the TCP checksum, if the error quoted it */
		}
		ipseudo = 1;
	} else if (iproto == IPPROTO_ICMP) {
		struct icmphdr *ih = il4;
		if (ih->type == ICMP_ECHO)
			isport = &ih->un.echo.id;
		else if (ih->type == ICMP_ECHOREPLY)
			idport = &ih->un.echo.id;
		else
			return -1;
		il4c = &ih->checksum;
	} else {
		return -1;
	}
	k.src_port = idport ? *idport : 0;
	k.dst_port = isport ? *isport : 0;

	struct flow_value *v = flow_find(&k);
	if (!v)
		return -1;
	if (!flow_ingress_ok(ctx, p, cfg, v))
		return V_DROP_WRONG_IFACE;
	struct iphdr *ip = p->iph;
	if (ip->ttl <= 1)
		return V_DROP_NO_REPLY; /* never an error about an error */
	/* outward (the entry rewrites sources): from the NAT IP / VIP; inward: from the
	 * public router or host that sent it */
	__be32 nsrc = (v->kind == KIND_NAT_OUT || v->kind == KIND_NLB_OUT) ? v->new_src_ip
									  : ip->saddr;
	__be32 ndst = v->new_dst_ip;
	struct route r = {};
	int rt = next_hop(ctx, p, &v->nh, nsrc, ndst, 0, 0, &r);
	if (rt == RT_TOO_BIG)
		return V_DROP_NO_REPLY; /* an error does not get an error */
	if (rt > RT_TOO_BIG)
		return rt;

	/* embedded packet: src -> T'.dst, dst -> T'.src, its sport -> T'.dport,
	 * its dport -> T'.sport; every change also moves the outer ICMP checksum */
	__u32 d = 0;
	__u16 old_icheck = in->check;
	__u16 old_il4c = il4c ? *il4c : 0;
	__be32 isrc = in->saddr, idst = in->daddr;
	if (isrc != v->new_dst_ip) {
		hp_csum_replace4(&in->check, isrc, v->new_dst_ip);
		if (il4c && ipseudo)
			hp_csum_replace4(il4c, isrc, v->new_dst_ip);
		d = csum_delta4(d, isrc, v->new_dst_ip);
		in->saddr = v->new_dst_ip;
	}
	if (idst != v->new_src_ip) {
		hp_csum_replace4(&in->check, idst, v->new_src_ip);
		if (il4c && ipseudo)
			hp_csum_replace4(il4c, idst, v->new_src_ip);
		d = csum_delta4(d, idst, v->new_src_ip);
		in->daddr = v->new_src_ip;
	}
	d = csum_delta2(d, old_icheck, in->check);
	if (isport && *isport != v->new_dst_port) {
		if (il4c)
			hp_csum_replace2(il4c, *isport, v->new_dst_port);
		d = csum_delta2(d, *isport, v->new_dst_port);
		*isport = v->new_dst_port;
	}
	if (idport && *idport != v->new_src_port) {
		if (il4c)
			hp_csum_replace2(il4c, *idport, v->new_src_port);
		d = csum_delta2(d, *idport, v->new_src_port);
		*idport = v->new_src_port;
	}
	if (il4c) {
		if (iproto == IPPROTO_UDP && *il4c == 0)
			*il4c = 0xffff;
		d = csum_delta2(d, old_il4c, *il4c);
	}
	csum_apply(&p->icmp->checksum, d);

	/* outer header */
	if (ip->saddr != nsrc) {
		hp_csum_replace4(&ip->check, ip->saddr, nsrc);
		ip->saddr = nsrc;
	}
	if (ip->daddr != ndst) {
		hp_csum_replace4(&ip->check, ip->daddr, ndst);
		ip->daddr = ndst;
	}
	if (rt == RT_OK)
		dec_ttl(ip);
	v->last_seen_ns = p->now;
	return send_out(ctx, p, rt, &v->nh, &r, V_TX_ICMP_ERROR);
}

#endif
