/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/*
 * The one kernel/user ABI of Fibril: every map key and value and every event
 * record shared by the BPF programs and the agent. crates/abi mirrors these
 * structs field for field; its tests compare sizes and offsets with what the
 * C compiler computes, so any drift fails the build.
 *
 * Rules: fixed-width types only, explicit padding, no bitfields.
 */
#ifndef FIBRIL_ABI_H
#define FIBRIL_ABI_H

#include <linux/types.h>

/* Reserved security identities (Cilium numbering). */
enum fibril_identity {
	ID_UNKNOWN = 0,
	ID_HOST = 1,
	ID_WORLD = 2,
	ID_UNMANAGED = 3,
	ID_HEALTH = 4,
	ID_INIT = 5,
	ID_REMOTE_NODE = 6,
	ID_KUBE_APISERVER = 7,
	ID_INGRESS = 8,
	ID_WORLD_IPV4 = 9,
	ID_WORLD_IPV6 = 10,
};

/* Monitor message types, Cilium's numbering (Hubble event_type.type). */
enum fibril_event_type {
	EVENT_DROP = 1,
	EVENT_TRACE = 4,
	EVENT_POLICY_VERDICT = 5,
	EVENT_TRACE_SOCK = 7,   /* socket LB's translation (sock.bpf.c) */
};

/* Where socket LB saw a socket call (flow_event.subtype of EVENT_TRACE_SOCK;
 * flow.SocketTranslationPoint numbering). */
enum fibril_sock_xlate_point {
	SOCK_XLATE_PRE_FWD = 1,  /* connect/sendmsg to a service, before */
	SOCK_XLATE_POST_FWD = 2, /* ... to its backend, after */
	SOCK_XLATE_PRE_REV = 3,  /* recvmsg/getpeername from the backend, before */
	SOCK_XLATE_POST_REV = 4, /* ... shown as the service, after */
};

/* Drop reasons: the values of Cilium's bpf/lib/common.h and flow.DropReason. */
enum fibril_drop_reason {
	DROP_INVALID_SOURCE_IP = 132,
	DROP_POLICY_DENIED = 133,
	DROP_INVALID_PACKET = 134,
	DROP_CT_INVALID_HEADER = 135,
	DROP_UNSUPPORTED_L3 = 139,
	DROP_UNKNOWN_L4 = 142,
	DROP_UNROUTABLE = 151,            /* from the overlay, for no endpoint of this node */
	DROP_CT_MAP_INSERT_FAILED = 155,
	DROP_NO_SERVICE = 158,            /* a service address with no backend */
	DROP_NAT_NO_MAPPING = 167,        /* no source port free for a node port's connection */
	DROP_INVALID_IDENTITY = 171,      /* a source identity a tunnel may not carry (host) */
	DROP_FRAG_NOT_FOUND = 175,        /* a later fragment whose first was not seen */
	DROP_SOCKET_LOOKUP_FAILED = 178,  /* the proxy's listener is not there */
	DROP_SOCKET_ASSIGN_FAILED = 179,
	DROP_PROXY_UNSUPPORTED = 180,     /* L7 redirect on a path that cannot reach the proxy */
	DROP_POLICY_DENY = 181,
};

/* Trace observation points, datapath numbering (TraceToLxc = 0 ...). */
enum fibril_trace_point {
	TRACE_TO_LXC = 0,
	TRACE_TO_PROXY = 1,
	TRACE_TO_HOST = 2,
	TRACE_TO_STACK = 3,
	TRACE_TO_OVERLAY = 4,
	TRACE_FROM_LXC = 5,
	TRACE_FROM_OVERLAY = 9,
	TRACE_FROM_NETWORK = 10, /* the node's device, inbound (host firewall) */
	TRACE_TO_NETWORK = 11,   /* the node's device, outbound */
};

/* Verdicts, flow.Verdict numbering. */
enum fibril_verdict {
	VERDICT_FORWARDED = 1,
	VERDICT_DROPPED = 2,
	VERDICT_AUDIT = 4,
	VERDICT_TRACED = 6,     /* socket LB, before translating */
	VERDICT_TRANSLATED = 7, /* socket LB, after */
};

/* Connection-tracking state of a packet, flow.TraceReason numbering. */
enum fibril_ct_state {
	CT_NEW = 1,
	CT_ESTABLISHED = 2,
	CT_REPLY = 3,
	CT_RELATED = 4,
};

/* Traffic direction, flow.TrafficDirection numbering. */
enum fibril_direction {
	DIR_INGRESS = 1,
	DIR_EGRESS = 2,
};

/* Policy match types, Hubble policy_match_type numbering. */
enum fibril_policy_match {
	MATCH_NONE = 0,
	MATCH_L3_ONLY = 1,
	MATCH_L3_L4 = 2,
	MATCH_L4_ONLY = 3,
	MATCH_ALL = 4,
	MATCH_L3_PROTO = 5,
	MATCH_PROTO_ONLY = 6,
};

/* Endpoint flags (endpoint_info.flags). */
#define EP_F_INGRESS_ENFORCED 0x1
#define EP_F_EGRESS_ENFORCED 0x2
#define EP_F_INGRESS_AUDIT 0x4  /* enforced by audit-mode policies only */
#define EP_F_EGRESS_AUDIT 0x8
#define EP_F_AUDIT_ALL 0x10     /* host endpoint: every policy drop is an audit */
#define EP_F_HOST_FIREWALL 0x20 /* host endpoint: the host firewall tracks the node's connections */

/* The host endpoint (the node itself, identity host) in the policy map,
 * conntrack budget and events: outside the pods' ids (1..65535). */
#define HOST_ENDPOINT_ID 65536

/* Policy entry flags (policy_value.flags). */
#define POLICY_F_DENY 0x1
#define POLICY_F_AUDIT 0x2    /* a deny from a policy in audit mode */
#define POLICY_F_REDIRECT 0x4 /* L7 rules: traffic belongs to the proxy */
#define POLICY_F_REDIRECT_DNS 0x8 /* DNS rules: traffic belongs to the DNS proxy */

/* Connection flags (ct_value.flags). */
#define CT_F_PROXY_REDIRECT 0x1 /* the opener's packets go to the L7 proxy */
#define CT_F_FROM_PROXY 0x2     /* opened by the proxy for its client: replies go back to it */
#define CT_F_DNS 0x4            /* with CT_F_PROXY_REDIRECT: the DNS proxy's */
#define CT_F_NODEPORT 0x8       /* a node port's connection to this backend: replies go
				 * back through the stack to the node's device */

/* ct_key.direction of a service connection's entry (client -> service
 * address): which backend it went to (ct_value.backend_id), so that it
 * stays there while the service's backends change. */
#define CT_DIR_SERVICE 3
/* ct_key.direction of a connection from outside the cluster that a node
 * port (or external address) sent to a backend (client -> backend): its
 * reverse-NAT index, so the backend's replies leave the node from the
 * address and port the client asked for (kube-proxy replacement). */
#define CT_DIR_NODEPORT 4
/* skb mark of a node port's packet whose backend is on another node: it
 * leaves from the node's address (lib/nat.h, on the node's device), so
 * the backend answers through this node. */
#define NODEPORT_MASQ_MARK 0x00f1d000
/* skb mark of a node port's packet for a backend on this node: its
 * connection entry gets CT_F_NODEPORT. */
#define NODEPORT_LOCAL_MARK 0x00f1e000

/* Which end of a flow event was a service address before translation
 * (flow_event.svc_side). */
#define SVC_SIDE_NONE 0
#define SVC_SIDE_DESTINATION 1 /* client -> service: destination translated */
#define SVC_SIDE_SOURCE 2      /* its reply: source translated back */

/* Counters of the proxy's socket shortcut (fibril_sockmap_stats index). */
enum fibril_sockmap_stat {
	SOCKMAP_STAT_SOCKETS = 0,    /* connection ends added to the socket maps */
	SOCKMAP_STAT_REDIRECTED = 1, /* sends moved straight to the other end */
	SOCKMAP_STAT_PLAIN = 2,      /* sends that took the stack (other end unknown) */
	SOCKMAP_STAT_MAX = 3,
};

/*
 * ipcache: LPM trie, IPv4 prefix -> security identity, and for an
 * endpoint on another node the node's address (the tunnel endpoint its
 * traffic is encapsulated to; 0 = not behind a tunnel).
 * prefixlen counts the bits of `addr` only.
 */
struct ipcache_key {
	__u32 prefixlen;
	__u8 addr[4]; /* network byte order */
};
_Static_assert(sizeof(struct ipcache_key) == 8, "ipcache_key size");

struct ipcache_value {
	__u32 identity;
	__u32 tunnel_endpoint; /* network byte order; 0 = none */
};
_Static_assert(sizeof(struct ipcache_value) == 8, "ipcache_value size");

/*
 * Local endpoints, keyed by IPv4 address (network byte order): used for
 * same-node delivery and to learn the identity of a local peer.
 */
/* The proxy's socket shortcut (sockops.bpf.c): a TCP socket by its
 * 4-tuple as the socket sees it (addresses network order, ports host order
 * widened, as sock_ops gives them). */
struct sock_key {
	__u32 local_ip;
	__u32 remote_ip;
	__u32 local_port;
	__u32 remote_port;
};
_Static_assert(sizeof(struct sock_key) == 16, "sock_key size");

/* A socket end that sent through the stack: its key and side (0 pod,
 * 1 proxy). */
struct plain_key {
	struct sock_key sock;
	__u32 side;
};
_Static_assert(sizeof(struct plain_key) == 20, "plain_key size");

struct endpoint_key {
	__u32 addr;
};
_Static_assert(sizeof(struct endpoint_key) == 4, "endpoint_key size");

struct endpoint_info {
	__u32 ep_id;
	__u32 identity;
	__u32 host_ifindex; /* host side of the pod's veth */
	__u32 flags;        /* EP_F_* */
	__u8 pod_mac[6];
	__u8 host_mac[6];
	__u32 pad;
};
_Static_assert(sizeof(struct endpoint_info) == 32, "endpoint_info size");

/*
 * Policy: one LPM trie for every endpoint. The static part of the key
 * (endpoint id, peer identity, direction) is always matched exactly; the LPM
 * prefix only covers protocol and port, as Cilium's policy map does:
 *   prefixlen 72 = any protocol, any port
 *   prefixlen 80 = this protocol, any port
 *   prefixlen 81..96 = this protocol, port prefix (ranges are split into
 *                      power-of-two blocks)
 * Peer identity 0 is the "any identity" entry, looked up separately.
 */
#define POLICY_STATIC_PREFIX_BITS 72
#define POLICY_FULL_PREFIX_BITS 96

struct policy_key {
	__u32 prefixlen;
	__u32 ep_id;    /* big endian, matched exactly */
	__u32 identity; /* big endian, matched exactly */
	__u8 direction; /* DIR_INGRESS / DIR_EGRESS */
	__u8 protocol;  /* IPPROTO_*, 0 = any */
	__u16 dport;    /* network byte order */
};
_Static_assert(sizeof(struct policy_key) == 16, "policy_key size");

struct policy_value {
	__u32 cookie;   /* which rule put it there: attribution for flows */
	__u8 flags;     /* POLICY_F_* */
	__u8 prefix;    /* copy of the key's proto/port prefix length (0..24) */
	__u16 pad;
};
_Static_assert(sizeof(struct policy_value) == 8, "policy_value size");

/*
 * Connection tracking: LRU hash. A connection is stored once per enforcing
 * side, keyed by its original-direction tuple and the direction (relative to
 * the endpoint) in which it was opened. A packet whose own tuple matches is
 * ESTABLISHED; one whose reversed tuple matches with the opposite direction
 * is a REPLY.
 */
struct ct_key {
	__u32 saddr;
	__u32 daddr;
	__u16 sport;
	__u16 dport;
	__u8 protocol;
	__u8 direction;
	__u16 pad;
};
_Static_assert(sizeof(struct ct_key) == 16, "ct_key size");

struct ct_value {
	__u64 expires_ns;       /* bpf_ktime_get_ns() deadline */
	__u64 packets;
	__u64 bytes;
	__u64 last_report_ns;   /* monitor aggregation */
	__u32 policy_cookie;
	__u8 tx_flags_seen;     /* TCP flags seen from the opener */
	__u8 rx_flags_seen;     /* TCP flags seen from the peer */
	__u8 closing;
	__u8 flags;             /* CT_F_* */
	__u32 backend_id;       /* CT_DIR_SERVICE entries: the chosen backend */
	__u16 rev_nat;          /* the client's entry of a translated connection:
				 * fibril_lb_reverse_nat index, 0 = none */
	__u16 pad;
};
_Static_assert(sizeof(struct ct_value) == 48, "ct_value size");

/*
 * Conntrack budget, per endpoint (hash keyed by endpoint id, __u32): the
 * entries the endpoint's traffic holds in the shared table, so that one pod
 * opening flows as fast as it can fills its own budget, never the table
 * (whose LRU would evict other pods' connections). The datapath counts up
 * as it creates entries; the agent's census recounts them (expired and
 * evicted ones go) every few seconds and writes the true count back.
 */
struct ct_budget {
	__u32 entries;
	__u32 pad;
	__u64 overflows; /* new connections refused at the budget */
};
_Static_assert(sizeof(struct ct_budget) == 16, "ct_budget size");

/* One datapath notification on the events ring buffer. */
struct flow_event {
	__u64 ts_ns;            /* bpf_ktime_get_ns() */
	__u8 type;              /* fibril_event_type */
	__u8 subtype;           /* drop reason or trace point */
	__u8 direction;         /* fibril_direction */
	__u8 verdict;           /* fibril_verdict */
	__u8 ct_state;          /* fibril_ct_state */
	__u8 protocol;
	__u8 tcp_flags;
	__u8 ip_version;
	__u32 ep_id;
	__u32 src_identity;
	__u32 dst_identity;
	__u32 ifindex;
	__u32 saddr;            /* network byte order */
	__u32 daddr;            /* network byte order */
	__u16 sport;            /* host byte order */
	__u16 dport;            /* host byte order; ICMP: type << 8 | code */
	__u16 pkt_len;
	__u8 policy_match;      /* fibril_policy_match */
	__u8 pad0;
	__u32 policy_cookie;
	__u8 smac[6];
	__u8 dmac[6];
	/* The service address of a translated packet (SVC_SIDE_*): the
	 * destination it was sent to, or the source a reply is given back. */
	__u32 svc_addr;         /* network byte order */
	__u16 svc_port;         /* host byte order */
	__u8 svc_side;
	__u8 pad1;
	/* EVENT_TRACE_SOCK: the socket and its cgroup (0 otherwise). */
	__u64 sock_cookie;
	__u64 cgroup_id;
};
_Static_assert(sizeof(struct flow_event) == 88, "flow_event size");

/*
 * Load balancing (services), Cilium's layout: a service address, port and
 * protocol has a master entry (slot 0: how many backends, its reverse-NAT
 * index, affinity) and one entry per backend slot 1..count naming a
 * backend by id. Backends are shared by services and keep their id while
 * any service still names them, so a connection (its CT_DIR_SERVICE entry
 * holds the id) stays on its backend when others come and go; a
 * terminating backend is in no slot, but keeps its id while connections
 * may still use it.
 */
struct lb_service_key {
	__u32 address;   /* network byte order */
	__u16 dport;     /* network byte order */
	__u16 slot;      /* 0: the master entry */
	__u8 protocol;
	__u8 scope;      /* 0 today (Cilium's external/internal scope) */
	__u16 pad;
};
_Static_assert(sizeof(struct lb_service_key) == 12, "lb_service_key size");

#define LB_SVC_F_AFFINITY 0x1 /* sessionAffinity: ClientIP */
/* Maglev's table size by default (Cilium's), and the inner maps'
 * template size; the agent may choose another of abi's MAGLEV_TABLE_SIZES. */
#define LB_MAGLEV_DEFAULT_SIZE 16381

#define LB_SVC_F_EXTERNAL 0x2 /* reached from outside (node port, external or LB IP):
			       * balanced by its Maglev table */

struct lb_service {
	__u32 backend_id;        /* slots 1..count */
	__u16 count;             /* master: backends in slots */
	__u16 rev_nat;           /* master: fibril_lb_reverse_nat index */
	__u32 affinity_timeout_s;/* master, with LB_SVC_F_AFFINITY */
	__u32 flags;             /* master: LB_SVC_F_* */
};
_Static_assert(sizeof(struct lb_service) == 16, "lb_service size");

struct lb_backend {
	__u32 address;   /* network byte order */
	__u16 port;      /* network byte order */
	__u8 protocol;
	__u8 flags;      /* 0 */
};
_Static_assert(sizeof(struct lb_backend) == 8, "lb_backend size");

/* A reverse-NAT index -> the service address replies come from. */
struct lb_reverse_nat {
	__u32 address;   /* network byte order */
	__u16 port;      /* network byte order */
	__u16 pad;
};
_Static_assert(sizeof(struct lb_reverse_nat) == 8, "lb_reverse_nat size");

/* sessionAffinity ClientIP: a client address and a service (its
 * reverse-NAT index) -> the backend it last used, and when. */
struct lb_affinity_key {
	__u32 client;    /* network byte order */
	__u16 rev_nat;
	__u16 pad;
};
_Static_assert(sizeof(struct lb_affinity_key) == 8, "lb_affinity_key size");

struct lb_affinity {
	__u64 last_used_ns;
	__u32 backend_id;
	__u32 pad;
};
_Static_assert(sizeof(struct lb_affinity) == 16, "lb_affinity size");

/* Socket load balancing (sock.bpf.c): a socket (its cookie) and the
 * backend it was connected or sent to -> the service address
 * (lb_reverse_nat) its peer is shown as (getpeername, recvmsg). */
struct lb_sock_key {
	__u64 cookie;
	__u32 address;   /* network byte order */
	__u16 port;      /* network byte order */
	__u16 pad;
};
_Static_assert(sizeof(struct lb_sock_key) == 16, "lb_sock_key size");

/* XDP prefilter (xdp.bpf.c, Cilium's prefilter): a source prefix whose
 * packets are dropped on the node's device before the stack sees them. */
struct prefilter_key {
	__u32 prefixlen; /* LPM trie: bits of addr that count */
	__u8 addr[4];    /* network byte order */
};
_Static_assert(sizeof(struct prefilter_key) == 8, "prefilter_key size");

struct prefilter_value {
	__u32 flags;     /* 0 */
};
_Static_assert(sizeof(struct prefilter_value) == 4, "prefilter_value size");

/* Per-CPU counters of the prefilter, and when it last reported a drop
 * (reports are limited, so a flood cannot flood the ring too). */
struct prefilter_stats {
	__u64 dropped_packets;
	__u64 dropped_bytes;
	__u64 passed_packets;
	__u64 last_event_ns;
};
_Static_assert(sizeof(struct prefilter_stats) == 32, "prefilter_stats size");

/*
 * fibril_host: array, one entry: the host endpoint's EP_F_* flags (host
 * firewall on, directions enforced, audit), written by the agent's policy
 * sync. All zero: no host firewall, the node's traffic is not looked at.
 */
struct host_endpoint {
	__u32 flags;
	__u32 pad;
};
_Static_assert(sizeof(struct host_endpoint) == 8, "host_endpoint size");

#endif /* FIBRIL_ABI_H */
