/* Map keys and values. Python reads them through bcc's table.Key / table.Leaf, which bcc
 * derives from these definitions: nothing here is redefined in Python. */
#ifndef HP_STRUCTS_H
#define HP_STRUCTS_H

/* A packet's 5-tuple in the direction it travels. For ICMP echo the identifier stands in
 * for a port: src_port on requests, dst_port on replies (so a reply's key mirrors its
 * request's, like TCP/UDP). All fields in network byte order. */
struct flow_key {
	__be32 src_ip;
	__be32 dst_ip;
	__be16 src_port;
	__be16 dst_port;
	__u8 proto;
	__u8 pad[3];
};

/* Where a translated packet leaves: refreshed every HP_NH_REFRESH_NS and whenever a
 * packet is longer than the MTU seen at the last lookup. */
struct next_hop {
	__u32 ifindex;            /* 0 = not resolved yet */
	__u16 mtu;
	__u8 smac[6];
	__u8 dmac[6];
	__u16 pad;
	__u64 checked_ns;
};

/* One direction of a flow. Both entries of a flow carry the TCP state; each carries the
 * key of its twin so rare events (state change, close, expiry check) can reach it. The
 * fields every packet reads come first. */
struct flow_value {
	__be32 new_src_ip;        /* the tuple after translation */
	__be32 new_dst_ip;
	__be16 new_src_port;
	__be16 new_dst_port;
	__u32 in_ifindex;         /* packets of this direction arrive here (ingress check) */
	__u8 kind;                /* enum hp_flow_kind */
	__u8 tcp_state;           /* enum hp_tcp_state */
	__u8 fin_seen;            /* bit 0: FIN from this entry's direction, bit 1: from twin's */
	__u8 flags;               /* FLOW_F_* */
	__u16 resource;           /* gateway id (NAT) or listener id (NLB) */
	__u16 target;             /* NLB target index, else 0 */
	__u64 last_seen_ns;       /* bpf_ktime_get_coarse_ns() (CLOCK_MONOTONIC_COARSE) */
	__u64 packets;
	__u64 bytes;
	/* Next hop cached from bpf_fib_lookup so the established path skips the FIB. */
	struct next_hop nh;
	struct flow_key twin;     /* the other direction's key */
	__u64 created_ns;
	/* TCP, for judging a RST (conntrack's window rule); 0 = not seen */
	__u32 ack;                /* the last ACK number this direction sent */
	__u32 win;                /* its last window, scaled */
	__u32 syn_next;           /* its SYN's sequence number + 1 */
	__u8 wscale;              /* window scale from its SYN, WSCALE_NONE if absent */
	__u8 created_here;        /* 1: this node created the flow from a packet; 0: from a
				   * peer's record (diagnostics: which node made it) */
	__u8 pad2[2];
	/* Fleet: which flow on this tuple this is, random and never 0, drawn by the node
	 * that created it and carried by its records: a peer's record of the same
	 * incarnation always merges, however late it comes (ages cannot tell a delayed
	 * record from a next flow on the tuple). 0: from a record that had none. */
	__u32 incarnation;
	/* Fleet: when a peer's record last installed or merged into this entry, in units
	 * of 2^SYNC_STAMP_SHIFT ns of bpf_ktime_get_coarse_ns(); 0: never (made here). A
	 * replica whose owner stopped sending a flow it holds, sweeps included, learns
	 * that the owner no longer holds it (hyperplane/fleet/sweep.py quiet_s). */
	__u32 synced;
};
#define FLOW_F_PENDING 1      /* in the unconfirmed (LRU) table, not the flow table */
#define FLOW_F_ACK_SEEN 2     /* this direction has sent an ACK (ack/win are valid) */
#define FLOW_F_REPLY_SEEN 4   /* the reply direction has sent a packet (both entries) */
#define WSCALE_NONE 0xff

/* A NAT port taken for one destination: (NAT IP, NAT port, proto, dst IP, dst port).
 * Laid out as the reply direction's flow key, so the reservation of a port is found from
 * a reply's key. */
struct nat_resv_key {
	__be32 dst_ip;            /* remote destination */
	__be32 nat_ip;
	__be16 dst_port;
	__be16 nat_port;
	__u8 proto;
	__u8 pad[3];
};

struct nat_resv_value {
	struct flow_key orig;     /* the inside flow that holds the port */
	__u64 taken_ns;
};

/* A NAT gateway. */
struct gw_config {
	__be32 nat_ips[HP_MAX_NAT_IPS];
	__u32 n_nat_ips;          /* 0 = gateway slot unused */
	__u16 port_min;           /* host byte order, inclusive */
	__u16 port_max;
};

/* Which gateway a NAT IP belongs to, and its place in the gateway's nat_ips. */
struct nat_ip_value {
	__u32 gw_id;
	__u32 ip_idx;
};

/* The NAT port blocks this node takes ports from, per gateway. One node: one block per
 * NAT IP, its whole port range. Fleet: each NAT IP's range is cut into HP_PORT_BLOCKS
 * blocks of block_size ports (the last one shorter), every block has one owner in the
 * gateway's shard (port_owner), so two nodes never take the same port. n = 0: none. */
struct gw_blocks {
	__u32 n;                  /* entries of owned[] in use */
	__u32 block_size;         /* ports per block */
	__u16 owned[HP_MAX_NAT_IPS * HP_PORT_BLOCKS]; /* ip_idx << 8 | block */
};

/* Fleet: a member of the fleet, by node id: its MAC on the sync network. */
struct peer {
	__u8 mac[6];
	__u16 flags;              /* PEER_F_* */
};
#define PEER_F_LIVE 1

/* Fleet: the live nodes of one resource's shard (gateways first, then load balancers:
 * SHARD_LB_BASE). Every node computes a flow's owner from it alike (rendezvous hash). */
struct shard {
	__u32 n;
	__u16 nodes[HP_MAX_SHARD];
};

/* Longest-prefix key for inside networks. */
struct inside_key {
	__u32 prefixlen;
	__be32 addr;
};

/* Node-wide settings (array index 0). */
struct hp_config {
	__u32 timeout_s[TO_MAX];  /* enum hp_timeout */
	__u32 flags;              /* HP_F_* */
	__u32 hash_seed;          /* random per cluster: NAT ports are not predictable */
	__u32 node_id;            /* HP_F_FLEET: this node's id in the fleet */
	__u32 sync_ifindex;       /* HP_F_FLEET: the sync network's interface (second chance) */
};
#define HP_F_RST_ON_NO_FLOW 1 /* TCP from inside without a live flow gets a RST (AWS) */
#define HP_F_LOOSE_INGRESS 2  /* skip the strict reverse-path check (asymmetric routing) */
#define HP_F_FLEET 4          /* one of many nodes: port blocks, owners, second chance */
#define HP_F_EVENT_WAKEUP 8   /* a reader sleeps on flow_events: wake it (bpf/flow.h) */
#define HP_F_PEER_EVENTS 16   /* every reader wants only what peers and flow logs use: no
				* event of an unconfirmed flow's creation or change (bpf/flow.h) */

/* Per-gateway metrics, per CPU; AWS NAT gateway names (REFERENCE.md). */
struct gw_metrics {
	__u64 connection_attempt;     /* ConnectionAttemptCount: new outbound flows (TCP SYN, UDP, ICMP) */
	__u64 connection_established; /* ConnectionEstablishedCount: TCP SYN-ACK from the destination */
	__u64 error_port_allocation;  /* ErrorPortAllocation */
	__u64 idle_timeout;           /* IdleTimeoutCount: flows found expired */
	__u64 packets_drop;           /* PacketsDropCount */
	__u64 bytes_in_from_source;
	__u64 bytes_out_to_destination;
	__u64 bytes_in_from_destination;
	__u64 bytes_out_to_source;
	__u64 packets_in_from_source;
	__u64 packets_out_to_destination;
	__u64 packets_in_from_destination;
	__u64 packets_out_to_source;
	__u64 flows_confirmed;        /* flows moved to the flow table (replies seen) */
	__u64 flows_ended;            /* confirmed flows closed or expired in the data path */
	__u64 flows_refused;          /* new flows refused: a table was full */
};

/* Remembers how the first fragment of a UDP datagram was translated, for the rest. */
struct frag_key {
	__be32 src_ip;
	__be32 dst_ip;
	__be16 ip_id;
	__u8 proto;
	__u8 pad;
};

struct frag_value {
	__be32 new_src_ip;
	__be32 new_dst_ip;
	__u16 resource;
	__u8 kind;
	__u8 pad;
};

/* A flow as it travels between nodes: portable (identities, not this node's slot
 * numbers; ages, not its clock), always in its original direction. 48 bytes; the first
 * 16 (the key) identify it. Keep in sync: hyperplane/fleet/records.py. */
struct flow_record {
	struct flow_key key;      /* the original direction (client -> destination / VIP) */
	__be32 new_src_ip;        /* its translation */
	__be32 new_dst_ip;
	__be16 new_src_port;
	__be16 new_dst_port;
	__u8 kind;                /* KIND_NAT_OUT or KIND_NLB_IN */
	__u8 tcp_state;
	__u8 fin_seen;            /* bit 0: FIN from the originator, bit 1: from the other side */
	__u8 flags;               /* REC_F_* */
	__u16 resource;           /* gateway id (NAT) or load balancer id (NLB): cluster ids */
	__u16 origin;             /* node id of the node that sent it */
	__u32 idle_ms;            /* since the sender last saw a packet of it */
	__u32 age_ms;             /* since it was created */
	__u32 incarnation;        /* flow_value.incarnation (0: unknown) */
};
#define REC_F_CONFIRMED 1     /* in the flow table (not unconfirmed) */
#define REC_F_REPLY_SEEN 2

/* A flow event (ring buffer): what happened, and the flow as a record. */
struct flow_event {
	__u32 type;               /* enum hp_event_type */
	__u32 flags;              /* EVF_* */
	__u64 ts_ns;
	struct flow_record rec;
	__u64 packets;            /* of the direction whose packet caused the event */
	__u64 bytes;
	/* EV_FLOW_EXPIRED / EV_FLOW_REMOVED (the flow is deleted): the other direction's
	 * final counts, so flow logs get both directions' totals (0 for other events) */
	__u64 twin_packets;
	__u64 twin_bytes;
	__u32 in_ifindex;         /* where the direction of packets/bytes arrives */
	__u32 twin_in_ifindex;    /* ... and the other one (with twin_*) */
};
#define EVF_REPLY 1           /* packets/bytes are the reply direction's (twin_*: original) */
#define EVF_VERDICT_SHIFT 8   /* EV_FLOW_REJECTED: flags >> 8 is the packet's verdict */

/* NLB: an address that is a listener VIP (any port). */
struct vip_value {
	__u32 lb_id;
};

/* NLB: a listener (VIP, port, proto). */
struct listener_key {
	__be32 vip;
	__be16 port;
	__u8 proto;
	__u8 pad;
};

struct listener_value {
	__u32 listener_id;        /* row of the Maglev table */
	__u32 lb_id;
};

/* NLB: a target (index into the targets array). */
struct target_value {
	__be32 ip;
	__be16 port;
	__u16 flags;              /* TARGET_F_* */
	__u32 lb_id;
};
#define TARGET_F_ACTIVE 1

/* Per-listener NLB metrics (AWS names), per CPU. */
struct lb_metrics {
	__u64 new_flow;           /* NewFlowCount */
	__u64 processed_bytes;    /* ProcessedBytes */
	__u64 processed_packets;  /* ProcessedPackets */
	__u64 tcp_client_reset;   /* TCP_Client_Reset_Count */
	__u64 tcp_target_reset;   /* TCP_Target_Reset_Count */
	__u64 tcp_elb_reset;      /* TCP_ELB_Reset_Count */
	__u64 flows_confirmed;    /* flows moved to the flow table (replies seen) */
	__u64 flows_ended;        /* confirmed flows closed or expired in the data path */
	__u64 flows_refused;      /* new flows refused: a table was full, or the tuple taken */
};

/* NAT: where the next port search toward one destination starts (RFC 6056 algorithm 4:
 * a per-destination counter from a secret-hashed offset). */
struct nat_cursor_key {
	__be32 dst_ip;
	__be16 dst_port;
	__u8 proto;
	__u8 pad;
	__u32 gw_id;
};

/* NLB: a registered target endpoint (a packet from it with no flow is never forwarded
 * untranslated). */
struct endpoint_key {
	__be32 ip;
	__be16 port;
	__u16 pad;
};

/* The start of an ICMP error this node sends: its headers and the quoted packet. */
struct icmp_err_hdrs {
	struct iphdr ip;
	struct icmphdr icmp;
	struct iphdr quote_ip;
	__u8 quote_l4[20];
};

/* Token bucket for the ICMP errors this node sends, per CPU. */
struct icmp_bucket {
	__u64 last_ns;
	__u64 tokens;
};

#endif
