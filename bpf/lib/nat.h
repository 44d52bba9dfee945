/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Kube-proxy replacement's source NAT: a node port's connection whose
 * backend is on another node leaves this node from its own address
 * (`nodeport_snat_addr`) and a port of its choosing, so the backend
 * answers through this node, which gives the reply back its client and
 * the node port's address (Cilium's BPF NodePort SNAT). Done here, not by
 * a netfilter MASQUERADE rule: a NAT rule switches netfilter's conntrack
 * on for every packet of the node's namespace, ~12% of a short
 * connection's cost on this node's own and its pods' traffic.
 *
 * Two entries a connection in `fibril_nodeport_snat` (LRU: the oldest go
 * when it is full): the client's tuple (client -> backend, NAT_DIR_OUT)
 * -> the node's port for it, and the reply's (backend -> node address and
 * that port, NAT_DIR_IN) -> the client's address and port. A connection
 * keeps its port while both stand; a port is only ever one connection's
 * (the reply entry is made with BPF_NOEXIST). */
#ifndef FIBRIL_NAT_H
#define FIBRIL_NAT_H

#include <linux/pkt_cls.h>

#include "parse.h"
#include "lb.h"

/* The node's address node ports' connections to other nodes leave from
 * (network order; 0: no source NAT). */
const volatile __u32 nodeport_snat_addr = 0;

/* The ports the node picks (as MASQUERADE's --to-ports did): above the
 * node-port range, so a reply is never taken for a new node-port
 * connection. */
#define NAT_PORT_MIN 32768
#define NAT_PORT_MAX 60999
/* Random ports tried before a connection is refused (the range is ~28k
 * ports per backend address and port). */
#define NAT_PORT_TRIES 16

#define NAT_DIR_OUT 0
#define NAT_DIR_IN 1

struct nat_key {
	__u32 saddr;
	__u32 daddr;
	__u16 sport; /* host order */
	__u16 dport;
	__u8 protocol;
	__u8 direction; /* NAT_DIR_* */
	__u16 pad;
};

struct nat_value {
	__u32 addr;
	__u16 port; /* host order */
	__u16 pad;
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct nat_key);
	__type(value, struct nat_value);
	__uint(max_entries, 131072);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fibril_nodeport_snat SEC(".maps");

static __always_inline void nat_fill(struct nat_key *k, __u32 saddr, __u32 daddr, __u16 sport,
				     __u16 dport, __u8 protocol, __u8 direction)
{
	k->saddr = saddr;
	k->daddr = daddr;
	k->sport = sport;
	k->dport = dport;
	k->protocol = protocol;
	k->direction = direction;
	k->pad = 0;
}

/* The node's port for the connection `pkt` opens or continues (client ->
 * backend): its own while its reply entry still names it, else a new
 * one (the client's port when free, as MASQUERADE keeps it, else random
 * ones). 0: no port free. */
static __always_inline __u16 nat_port(const struct packet *pkt)
{
	struct nat_key out, in;
	struct nat_value back = {.addr = pkt->saddr, .port = pkt->sport};

	nat_fill(&out, pkt->saddr, pkt->daddr, pkt->sport, pkt->dport, pkt->protocol,
		 NAT_DIR_OUT);
	struct nat_value *mine = bpf_map_lookup_elem(&fibril_nodeport_snat, &out);
	if (mine) {
		nat_fill(&in, pkt->daddr, nodeport_snat_addr, pkt->dport, mine->port,
			 pkt->protocol, NAT_DIR_IN);
		struct nat_value *r = bpf_map_lookup_elem(&fibril_nodeport_snat, &in);
		if (r && r->addr == pkt->saddr && r->port == pkt->sport)
			return mine->port;
	}
	__u16 port = pkt->sport;
	for (int i = 0; i < NAT_PORT_TRIES; i++) {
		if (i > 0 || port < NAT_PORT_MIN || port > NAT_PORT_MAX)
			port = NAT_PORT_MIN + bpf_get_prandom_u32() % (NAT_PORT_MAX - NAT_PORT_MIN + 1);
		nat_fill(&in, pkt->daddr, nodeport_snat_addr, pkt->dport, port, pkt->protocol,
			 NAT_DIR_IN);
		if (bpf_map_update_elem(&fibril_nodeport_snat, &in, &back, BPF_NOEXIST) == 0) {
			struct nat_value v = {.addr = nodeport_snat_addr, .port = port};
			if (bpf_map_update_elem(&fibril_nodeport_snat, &out, &v, BPF_ANY) < 0) {
				bpf_map_delete_elem(&fibril_nodeport_snat, &in);
				return 0;
			}
			return port;
		}
	}
	return 0;
}

/* A node port's packet for another node's backend, leaving: from the
 * node's address and port. A drop (negative) when no port is free or the
 * packet cannot be written; else 0. */
static __always_inline int nat_out(struct __sk_buff *skb, struct packet *pkt)
{
	if (!nodeport_snat_addr)
		return 0;
	if (pkt->protocol != IPPROTO_TCP && pkt->protocol != IPPROTO_UDP)
		return 0;
	__u16 port = nat_port(pkt);
	if (!port)
		return DROP(DROP_NAT_NO_MAPPING);
	if (lb_rewrite(skb, pkt, 0, pkt->saddr, nodeport_snat_addr, bpf_htons(pkt->sport),
		       bpf_htons(port)) < 0)
		return DROP(DROP_INVALID_PACKET);
	pkt->saddr = nodeport_snat_addr;
	pkt->sport = port;
	return 0;
}

/* A backend's reply arriving for a port `nat_out` gave: to its client's
 * address and port again (the stack then routes it to the client, and
 * `to_netdev` gives it the node port's address). 1 when it was one; 0
 * when not; a drop when it cannot be written. */
static __always_inline int nat_in(struct __sk_buff *skb, struct packet *pkt)
{
	struct nat_key in;

	if (!nodeport_snat_addr || pkt->daddr != nodeport_snat_addr)
		return 0;
	if (pkt->protocol != IPPROTO_TCP && pkt->protocol != IPPROTO_UDP)
		return 0;
	if (pkt->dport < NAT_PORT_MIN || pkt->dport > NAT_PORT_MAX)
		return 0;
	nat_fill(&in, pkt->saddr, pkt->daddr, pkt->sport, pkt->dport, pkt->protocol, NAT_DIR_IN);
	struct nat_value *c = bpf_map_lookup_elem(&fibril_nodeport_snat, &in);
	if (!c)
		return 0;
	__u32 addr = c->addr;
	__u16 port = c->port;
	if (lb_rewrite(skb, pkt, 1, pkt->daddr, addr, bpf_htons(pkt->dport), bpf_htons(port)) < 0)
		return DROP(DROP_INVALID_PACKET);
	pkt->daddr = addr;
	pkt->dport = port;
	return 1;
}

#endif
