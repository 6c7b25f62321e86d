/* Every map of the data path, declared once. With -DHP_PIN_DIR="/run/hyperplane/bpf/<node>"
 * the state maps are pinned there (and reused if present), so restarting the agent or
 * loading a new program keeps every flow; the XDP and tc builds of the program share
 * them. */
#ifndef HP_MAPS_H
#define HP_MAPS_H

#ifdef HP_PIN_DIR
#define HP_MAP(type, key, leaf, name, size, flags) \
	BPF_TABLE_PINNED7(type, key, leaf, name, size, HP_PIN_DIR "/" #name, flags)
#else
#define HP_MAP(type, key, leaf, name, size, flags) \
	BPF_F_TABLE(type, key, leaf, name, size, flags)
#endif

/* Confirmed flows (a reply was seen): two entries per flow (original and reply
 * direction). A plain hash, not an LRU: a full table refuses new flows (counted) instead
 * of silently evicting live ones; expired flows are deleted when met and by the GC. */
HP_MAP("hash", struct flow_key, struct flow_value, flows, HP_MAX_FLOWS, 0);
/* Unconfirmed flows (no reply yet: half-open TCP, first UDP/ICMP packets), same layout.
 * An LRU: a flood of spoofed SYNs or one-way packets evicts its own kind, never a
 * confirmed flow (conntrack's early_drop of unassured entries). */
HP_MAP("lru_hash", struct flow_key, struct flow_value, pending, HP_MAX_PENDING, 0);
/* NAT ports taken per destination; a plain hash so a live reservation is never evicted. */
HP_MAP("hash", struct nat_resv_key, struct nat_resv_value, nat_resv, HP_MAX_RESERVATIONS, 0);
/* Where the next NAT port search toward a destination starts (a hint: LRU). */
HP_MAP("lru_hash", struct nat_cursor_key, u32, nat_cursor, HP_MAX_CURSORS, 0);
/* NAT gateways by id. */
HP_MAP("array", u32, struct gw_config, gateways, HP_MAX_GATEWAYS, 0);
/* NAT IP -> gateway id. */
HP_MAP("hash", __be32, struct nat_ip_value, nat_ips, HP_MAX_GATEWAYS * HP_MAX_NAT_IPS, 0);
/* Inside networks -> gateway id. */
HP_MAP("lpm_trie", struct inside_key, u32, inside_nets, HP_MAX_INSIDE_PREFIXES, BPF_F_NO_PREALLOC);
/* Node-wide settings, index 0. */
HP_MAP("array", u32, struct hp_config, config, 1, 0);
/* Packets per verdict (enum hp_verdict), per CPU. */
HP_MAP("percpu_array", u32, u64, verdicts, V_MAX, 0);
/* Per-gateway metrics, per CPU. */
HP_MAP("percpu_array", u32, struct gw_metrics, gw_stats, HP_MAX_GATEWAYS, 0);
/* First-fragment translations of UDP datagrams, for their later fragments. */
HP_MAP("lru_hash", struct frag_key, struct frag_value, frags, HP_MAX_FRAGS, 0);
/* NLB VIPs: any address with a listener, to tell "no such listener" from "not ours". */
HP_MAP("hash", __be32, struct vip_value, vips, HP_MAX_LISTENERS, 0);
/* NLB listeners. */
HP_MAP("hash", struct listener_key, struct listener_value, listeners, HP_MAX_LISTENERS, 0);
/* NLB Maglev tables: row listener_id, HP_MAGLEV_SIZE entries each, value = target index. */
HP_MAP("array", u32, u32, maglev, HP_MAX_LISTENERS * HP_MAGLEV_SIZE, 0);
/* NLB targets by index. */
HP_MAP("array", u32, struct target_value, targets, HP_MAX_TARGETS, 0);
/* NLB target endpoints (ip, port) -> target index: their packets need a flow. */
HP_MAP("hash", struct endpoint_key, u32, target_endpoints, HP_MAX_TARGETS, 0);
/* Per-listener NLB metrics, per CPU. */
HP_MAP("percpu_array", u32, struct lb_metrics, lb_stats, HP_MAX_LISTENERS, 0);
/* Per-target processed packets, per CPU (for per-target metrics). */
HP_MAP("percpu_array", u32, u64, target_packets, HP_MAX_TARGETS, 0);
/* Confirmed flows that user space deleted (GC, resets), per resource: gateways, then
 * listeners (USER_ENDS_*). Written only by user space; active = confirmed - ended - this. */
HP_MAP("array", u32, u64, user_ends, HP_MAX_GATEWAYS + HP_MAX_LISTENERS, 0);

/* Fleet: peers by node id (their MACs on the sync network); written by the agent. */
HP_MAP("array", u32, struct peer, peers, HP_MAX_NODES, 0);
/* Fleet: each resource's live shard nodes (gateway id, then SHARD_LB_BASE + lb id). */
HP_MAP("array", u32, struct shard, shards, HP_MAX_GATEWAYS + HP_MAX_LBS, 0);
/* Fleet: the NAT port blocks this node takes ports from, per gateway. */
HP_MAP("array", u32, struct gw_blocks, gw_blocks, HP_MAX_GATEWAYS, 0);
/* Fleet: owner (node id + 1; 0 = none) of every port block:
 * ((gw id * HP_MAX_NAT_IPS) + ip index) * HP_PORT_BLOCKS + block. */
HP_MAP("array", u32, u16, port_owner, HP_MAX_GATEWAYS * HP_MAX_NAT_IPS * HP_PORT_BLOCKS, 0);

/* Events and housekeeping that are not packet verdicts (enum hp_stat), per CPU. */
HP_MAP("percpu_array", u32, u64, stats, S_MAX, 0);
/* ICMP error rate limit, per CPU (index 0). */
HP_MAP("percpu_array", u32, struct icmp_bucket, icmp_budget, 1, 0);
/* The same kind of token bucket for rejected packets sent as events (flow logs). */
HP_MAP("percpu_array", u32, struct icmp_bucket, reject_budget, 1, 0);

/* Per-CPU scratch space for values too big for the 512-byte BPF stack (not pinned: it
 * holds nothing between packets). */
struct scratch {
	__u8 todo;                /* what a tail-called program is to do (DO_*) */
	__u16 mtu;                /* DO_FRAG_NEEDED: the next hop's MTU */
	__u8 wscale_ready;        /* 1: PROG_WSCALE parsed this SYN's window scale */
	__u8 wscale;              /* ... which is this (WSCALE_NONE: no option) */
	struct flow_value flow;   /* a new flow's entry, being built */
	struct bpf_fib_lookup fib; /* a route lookup's parameters and result */
	struct icmp_err_hdrs icmp; /* an ICMP error being built */
	__u32 opaque;             /* see opaque_u32() */
	struct flow_record rec;   /* PROG install: the record in hand */
	__u16 rec_out[8];         /* PROG install: this run's outcomes (S_REC_* - S_REC_INSTALLED) */
	__u32 owner_slot;         /* DO_OWNER: the shard (gateway id, SHARD_LB_BASE + lb id) */
	__u8 owner_case;          /* DO_OWNER: OWN_* */
	__u8 owner_local;         /* PROG_OWNER found this node the owner (for PROG_NEW) */
	__u32 prev_incarnation;   /* the tuple's flow known_flow deleted (for flow_create) */
	__u32 gw_id;              /* DO_NAT_NEW, DO_NAT_FLOW: the gateway */
	struct nat_resv_key resv; /* DO_NAT_FLOW: the port PROG_NAT reserved */
};
BPF_F_TABLE("percpu_array", u32, struct scratch, scratch, 1, 0);

/* The slow paths, tail-called from the main program (hyperplane.bpf.c PROG_*): each is
 * verified on its own, which keeps every program within the verifier's budget. Filled
 * by the loader. Pinned (one per hook: a program array holds one program type), because
 * the kernel empties a program array when its last user-space reference closes. */
#ifdef HP_PIN_DIR
BPF_TABLE_PINNED("prog", u32, u32, progs, 8, HP_PIN_DIR "/progs_" HP_HOOK_NAME);
#else
BPF_PROG_ARRAY(progs, 8);
#endif

/* Flow events (created, confirmed, changed, closed, expired) for the agent, which
 * replicates them. Pinned like the state maps, so the XDP and tc builds write one ring and
 * an agent that is not the loader reads it. bcc has no pinned ring buffer macro: this is
 * BPF_RINGBUF_OUTPUT's table in a pinned map section ("maps/<type>:<path>", as
 * BPF_TABLE_PINNED makes). */
#ifdef HP_PIN_DIR
struct flow_events_table_t {
	int key;
	u32 leaf;
	int (*ringbuf_output)(void *, u64, u64);
	void *(*ringbuf_reserve)(u64);
	void (*ringbuf_discard)(void *, u64);
	void (*ringbuf_submit)(void *, u64);
	u32 max_entries;
};
__attribute__((section("maps/ringbuf:" HP_PIN_DIR "/flow_events")))
struct flow_events_table_t flow_events = { .max_entries = HP_RINGBUF_PAGES * PAGE_SIZE };
#else
BPF_RINGBUF_OUTPUT(flow_events, HP_RINGBUF_PAGES);
#endif

#endif
