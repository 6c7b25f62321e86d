/* Constants shared by the data path and, through hyperplane/datapath/verdicts.py, by Python.
 * Keep in sync: hyperplane/datapath/verdicts.py mirrors every enum here (a unit test checks). */
#ifndef HP_CONSTS_H
#define HP_CONSTS_H

/* Sizes: the loader overrides these with -D flags (hyperplane/datapath/loader.py). */
#ifndef HP_MAX_FLOWS
#define HP_MAX_FLOWS 262144        /* flow table entries (two per flow) */
#endif
#ifndef HP_MAX_RESERVATIONS
#define HP_MAX_RESERVATIONS 131072 /* NAT port reservations (one per NAT flow) */
#endif
#ifndef HP_MAX_GATEWAYS
#define HP_MAX_GATEWAYS 16         /* NAT gateways per node */
#endif
#ifndef HP_MAX_NAT_IPS
#define HP_MAX_NAT_IPS 8           /* public IPs per gateway (AWS: up to 8) */
#endif
#ifndef HP_MAX_INSIDE_PREFIXES
#define HP_MAX_INSIDE_PREFIXES 256 /* inside CIDRs over all gateways */
#endif
#ifndef HP_PORT_PROBES
#define HP_PORT_PROBES 32          /* candidates tried per new NAT flow */
#endif
#ifndef HP_MAX_FRAGS
#define HP_MAX_FRAGS 4096          /* UDP datagrams in flight as fragments */
#endif
#ifndef HP_RINGBUF_PAGES
#define HP_RINGBUF_PAGES 1024      /* flow event ring buffer, in pages (4 MiB: ~45,000 events) */
#endif
#ifndef HP_MAX_LISTENERS
#define HP_MAX_LISTENERS 64        /* NLB listeners per node */
#endif
#ifndef HP_MAGLEV_SIZE
#define HP_MAGLEV_SIZE 65537       /* Maglev table entries per listener (prime) */
#endif
#ifndef HP_MAX_TARGETS
#define HP_MAX_TARGETS 1024        /* NLB targets per node */
#endif
#ifndef HP_MAX_LBS
#define HP_MAX_LBS 16              /* load balancers per node */
#endif
#ifndef HP_MAX_PENDING
#define HP_MAX_PENDING 131072      /* unconfirmed flow entries (LRU: floods evict these) */
#endif
#ifndef HP_MAX_CURSORS
#define HP_MAX_CURSORS 65536       /* NAT port cursors, one per recent destination (LRU) */
#endif
#ifndef HP_MAX_NODES
#define HP_MAX_NODES 64            /* fleet members (node ids 0..HP_MAX_NODES-1) */
#endif
#ifndef HP_MAX_SHARD
#define HP_MAX_SHARD 16            /* nodes in one resource's shard */
#endif
#ifndef HP_PORT_BLOCKS
#define HP_PORT_BLOCKS 64          /* NAT port blocks per NAT IP (fleet: owned per node) */
#endif
#ifndef HP_INSTALL_BATCH
#define HP_INSTALL_BATCH 64        /* flow records one run of PROG install takes */
#endif
#ifndef HP_ICMP_RATE
#define HP_ICMP_RATE 1000          /* ICMP errors this node sends per second per CPU */
#endif
#ifndef HP_REJECT_LOG_RATE
#define HP_REJECT_LOG_RATE 1000    /* rejected packets per second per CPU sent as events */
#endif
#define HP_REJECT_LOG_BURST 100

/* Verdicts: every packet ends in exactly one (invariant 2). Keep in sync: verdicts.py.
 * Ordered by what happens to the packet: TX_* leave the node (redirected, or bounced back
 * out of the interface they came in on), PASS_* go to the kernel, DROP_* are dropped. */
enum hp_verdict {
	V_TX_NAT_OUT = 0,        /* inside -> outside, source translated, redirected */
	V_TX_NAT_IN = 1,         /* reply to a NAT IP, destination translated back */
	V_TX_NLB_IN = 2,         /* client -> listener, destination set to a target */
	V_TX_NLB_OUT = 3,        /* target -> client, source set back to the listener */
	V_TX_ICMP_ERROR = 4,     /* ICMP error about a known flow, outer+embedded translated */
	V_TX_FRAGMENT = 5,       /* non-first UDP fragment of a translated datagram */
	V_TX_RST = 6,            /* TCP with no live flow: RST sent back (bounced) */
	V_TX_TIME_EXCEEDED = 7,  /* TTL <= 1: this node sends ICMP time exceeded (bounced) */
	V_TX_FRAG_NEEDED = 8,    /* too big for the next hop with DF: ICMP frag. needed (bounced) */
	V_TX_SECOND_CHANCE = 9,  /* fleet: no state here and another node owns the flow: handed
				  * to the owner over the sync network (GLB's second chance) */
	V_PASS_NON_IP = 10,      /* ARP, IPv6 and other non-IPv4: to the kernel */
	V_PASS_NO_RESOURCE = 11, /* IPv4 not for any NAT gateway or listener: kernel */
	V_PASS_LOCAL = 12,       /* ping to a NAT IP or VIP: the node answers */
	V_PASS_FRAGMENTING = 13, /* translated, too big for the next hop, no DF: the kernel
				  * fragments and forwards it (tc: skb->mark HP_MARK_ASSIST) */
	V_PASS_NEIGH = 14,       /* XDP: translated, next hop not resolved yet: the kernel
				  * resolves it (ARP) and forwards (tc redirects via the
				  * neighbour subsystem instead and counts TX) */
	V_DROP_MALFORMED = 15,   /* truncated or inconsistent header */
	V_DROP_IP_OPTIONS = 16,  /* IPv4 header with options toward a resource */
	V_DROP_FRAGMENT = 17,    /* TCP/ICMP fragment, or UDP fragment with no first part */
	V_DROP_UNKNOWN_PROTO = 18, /* not TCP, UDP or ICMP, toward a resource */
	V_DROP_NO_FLOW = 19,     /* to a NAT IP or from a target, no flow */
	V_DROP_PORT_ALLOC = 20,  /* no free NAT port for this destination */
	V_DROP_TABLE_FULL = 21,  /* flow or reservation table refused an insert */
	V_DROP_NO_ROUTE = 22,    /* FIB: unreachable / blackhole / prohibited / not forwardable */
	V_DROP_ICMP_UNSUPPORTED = 23, /* ICMP type we do not translate */
	V_DROP_NO_TARGET = 24,   /* listener has no target in its table */
	V_DROP_NO_LISTENER = 25, /* to a VIP on a port/proto with no listener */
	V_DROP_TCP_NOT_SYN = 26, /* to a listener, no flow, a RST (never answered) */
	V_DROP_WRONG_IFACE = 27, /* arrived on an interface its source is not routed through
				  * (strict reverse-path check): spoofed or misrouted */
	V_DROP_TCP_INVALID = 28, /* a RST outside the receiver's window (conntrack's rule) */
	V_DROP_TUPLE_TAKEN = 29, /* NLB: the target already sees this client ip:port from
				  * another connection (AWS: a client IP preservation collision) */
	V_DROP_ICMP_RATELIMIT = 30, /* an ICMP error this node would send, over its rate */
	V_DROP_NO_REPLY = 31,    /* a RST / ICMP error that cannot be built (no source
				  * address, in-band VLAN at tc, an ICMP error about an error) */
	V_DROP_NO_OWNER = 32,    /* fleet: no state here, and the flow's owner is unknown or
				  * not live (a second-chance packet is never passed on) */
	V_MAX = 33,
};
#define V_LAST_TX V_TX_SECOND_CHANCE
#define V_LAST_PASS V_PASS_NEIGH

/* Flow events on the ring buffer. Keep in sync: verdicts.py FlowEventType */
enum hp_event_type {
	EV_FLOW_CREATED = 1,
	EV_FLOW_CLOSED = 2,      /* FIN both ways or RST */
	EV_FLOW_EXPIRED = 3,     /* found idle past its timeout */
	EV_FLOW_CONFIRMED = 4,   /* moved to the flow table (a reply, then the originator) */
	EV_FLOW_CHANGED = 5,     /* TCP state changed (established, one FIN) */
	EV_FLOW_REMOVED = 6,     /* deleted without expiring: a closed flow's tuple opened
				  * anew, or a stale entry in a new flow's way */
	EV_FLOW_REJECTED = 7,    /* a packet of no flow dropped for a REJECT_VERDICTS reason
				  * (flow logs' REJECT): its own tuple, not a flow's record;
				  * at most HP_REJECT_LOG_RATE a second per CPU */
};

/* Counted events that are not packet verdicts. Keep in sync: verdicts.py Stat */
enum hp_stat {
	S_FLOW_CREATED = 0,      /* new flows (unconfirmed first) */
	S_FLOW_CLOSED = 1,
	S_FLOW_EXPIRED = 2,
	S_EVENT_LOST = 3,        /* ring buffer full: the controller missed an event */
	S_RESV_RECLAIMED = 4,    /* a stale port reservation taken over by a new flow */
	S_FIB_LOOKUP = 5,        /* next hop looked up (cache miss or refresh) */
	S_FLOW_CONFIRMED = 6,    /* moved from the unconfirmed to the flow table */
	S_CONFIRM_FULL = 7,      /* the flow table was full: the flow stays unconfirmed */
	S_CREATE_RACE = 8,       /* another CPU created the same flow first: its entry used */
	S_STALE_REPLACED = 9,    /* an expired entry in the way of a new flow was deleted */
	S_NEIGH_RESOLVE = 10,    /* tc: sent through the neighbour subsystem (no MAC yet) */
	S_RST_IGNORED = 11,      /* a RST outside the window was dropped (flow kept) */
	S_IFACE_MOVED = 12,      /* a flow's ingress interface changed with its route */
	S_PEER_PACKET = 13,      /* fleet: a packet a peer handed over, translated and sent here */
	S_REC_INSTALLED = 14,    /* fleet: a flow record from a peer created a replica */
	S_REC_MERGED = 15,       /* fleet: ... updated a flow this node holds */
	S_REC_REJECTED = 16,     /* fleet: ... refused: malformed, or a resource not served here */
	S_REC_CONFLICT = 17,     /* fleet: ... whose tuple or NAT port another flow holds here */
	S_REC_FULL = 18,         /* fleet: ... not installed: a table was full */
	S_REJECT_UNLOGGED = 19,  /* a rejected packet over HP_REJECT_LOG_RATE: no event */
	S_REC_REPLACED = 20,     /* fleet: a record installed in place of the flow held here
				  * (another flow on its tuple; also counted installed) */
	S_MAX = 21,
};

/* What a flow entry is for. Keep in sync: verdicts.py FlowKind */
enum hp_flow_kind {
	KIND_NAT_OUT = 1,        /* key is inside -> outside */
	KIND_NAT_IN = 2,         /* key is outside -> NAT IP (reply direction) */
	KIND_NLB_IN = 3,         /* key is client -> VIP */
	KIND_NLB_OUT = 4,        /* key is target -> client (reply direction) */
};

/* TCP state of a flow (both entries carry it). Keep in sync: verdicts.py TcpState */
enum hp_tcp_state {
	TCP_S_NONE = 0,          /* UDP / ICMP */
	TCP_S_SYN_SENT = 1,      /* SYN seen, no answer yet: half-open timeout */
	TCP_S_ESTABLISHED = 2,   /* SYN-ACK seen (or the client's ACK) */
	TCP_S_FIN_WAIT = 3,      /* a FIN seen from one side: half-closed, still idle 350 s */
	TCP_S_CLOSED = 4,        /* FIN from both sides or RST: closing timeout */
};

/* Indexes into hp_config.timeout_s. Keep in sync: verdicts.py Timeout */
enum hp_timeout {
	TO_TCP_ESTABLISHED = 0,  /* 350 s (AWS NAT gateway / NLB idle timeout) */
	TO_TCP_SYN = 1,          /* half-open */
	TO_TCP_CLOSING = 2,      /* after FIN from both sides or RST */
	TO_UDP = 3,
	TO_ICMP = 4,
	TO_MAX = 5,
};

/* Per-resource counter slots written by user space (flows the agent deleted), after the
 * gateways come the listeners. Read by hyperplane/datapath/flows.py (user_ends_bases). */
#define USER_ENDS_NAT_BASE 0
#define USER_ENDS_LB_BASE HP_MAX_GATEWAYS

#define HP_NSEC 1000000000ULL
#ifndef HP_NH_REFRESH_NS
#define HP_NH_REFRESH_NS (1 * HP_NSEC) /* re-check a cached next hop this often */
#endif
#ifndef HP_RESV_GRACE_NS
/* A reservation younger than this is never reclaimed as stale: its flow may be being
 * created on another CPU right now. The agent's GC uses the same grace. Keep in sync:
 * hyperplane/datapath/flows.py RESV_GRACE_S */
#define HP_RESV_GRACE_NS (2 * HP_NSEC)
#endif

/* Fleet: a flow's incarnation (struct flow_value) is its generation on the tuple in the
 * top 8 bits and 24 random bits, never 0. The flow that deletes its closed or expired
 * predecessor on this node takes the predecessor's generation + 1 (mod 256); one that
 * found none takes 0. Two incarnations created this close together are ordered by
 * generation when one is the other's successor, not by their ages, which are off by
 * the time their records spent in queues. Further apart, ages order them: a closed
 * predecessor is kept for the TCP closing timeout (10 s by default) after its last
 * packet, so a flow of generation 0 comes that much later than one it did not see. */
#define INC_GEN_SHIFT 24
/* flow_value.synced counts in 2^30 ns (1.07 s): a u32 of them lasts 146 years of
 * uptime. Keep in sync: hyperplane/fleet/sweep.py SYNC_STAMP_SHIFT. */
#define SYNC_STAMP_SHIFT 30
#ifndef INC_GEN_WINDOW_NS
#define INC_GEN_WINDOW_NS (5 * HP_NSEC)
#endif

#endif
