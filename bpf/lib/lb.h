/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Services: per-packet load balancing at the pod's veth, as Cilium does
 * for pods with kubeProxyReplacement=false. A packet a pod sends to a
 * service address and port is given a backend's (DNAT) before anything
 * else looks at it, so policy, conntrack and delivery all see the backend
 * (policy selects the backend pod's identity, never the service's). The
 * connection's CT_DIR_SERVICE entry remembers the backend, so it stays
 * there while the service's backends change; the client's own connection
 * entry keeps the service's reverse-NAT index, and a reply gets the
 * service address back as its source where it enters the client
 * (`lb4_rev_nat`, from lib/ingress.h). Events keep naming the pods: a
 * translated packet carries the service address beside them
 * (`packet.svc_*`). */
#ifndef FIBRIL_LB_H
#define FIBRIL_LB_H

#include <linux/if_ether.h>
#include <linux/pkt_cls.h>

#include "maps.h"
#include "parse.h"
#include "ct.h"
#include "drop.h"

/* Slots of every Maglev table (a prime; the agent's setting). */
const volatile __u32 lb_maglev_table_size = LB_MAGLEV_DEFAULT_SIZE;

/* Cilium's service loopback address, 169.254.42.1 (network order): a pod
 * that reaches itself through a service sees the connection come from
 * here (its own address as the source would be a martian to its stack). */
#define LB_LOOPBACK_IPV4 bpf_htonl(0xa9fe2a01)

#define IP_CSUM_OFF (ETH_HLEN + 10)
#define IP_SADDR_OFF (ETH_HLEN + 12)
#define IP_DADDR_OFF (ETH_HLEN + 16)

/* Rewrites the destination (`dest`) or source address and port of the
 * packet, and the IP and L4 checksums with them (a UDP checksum of 0, none,
 * stays 0). A later fragment has no L4 header (its ports are its first's,
 * lib/frag.h, and its first carries the datagram's checksum): only its
 * address changes. Negative when the packet cannot be written. */
static __always_inline int lb_rewrite(struct __sk_buff *skb, const struct packet *pkt, int dest,
				      __u32 old_addr, __u32 new_addr, __u16 old_port_be,
				      __u16 new_port_be)
{
	__u32 csum_off = pkt->l4_off + (pkt->protocol == IPPROTO_TCP ? 16 : 6);
	__u64 mangled = pkt->protocol == IPPROTO_UDP ? BPF_F_MARK_MANGLED_0 : 0;
	int l4 = pkt->frag != FRAG_LATER;

	if (old_addr != new_addr) {
		if (l4 && bpf_l4_csum_replace(skb, csum_off, old_addr, new_addr,
					      BPF_F_PSEUDO_HDR | mangled | sizeof(new_addr)) < 0)
			return -1;
		if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, old_addr, new_addr, sizeof(new_addr)) < 0)
			return -1;
		if (bpf_skb_store_bytes(skb, dest ? IP_DADDR_OFF : IP_SADDR_OFF, &new_addr,
					sizeof(new_addr), 0) < 0)
			return -1;
	}
	if (l4 && old_port_be != new_port_be) {
		if (bpf_l4_csum_replace(skb, csum_off, old_port_be, new_port_be,
					mangled | sizeof(new_port_be)) < 0)
			return -1;
		if (bpf_skb_store_bytes(skb, pkt->l4_off + (dest ? 2 : 0), &new_port_be,
					sizeof(new_port_be), 0) < 0)
			return -1;
	}
	return 0;
}

/* A connection's hash for Maglev: its 5-tuple, mixed (the same on every
 * node, so any node a client's packets reach picks the same backend). */
static __always_inline __u32 lb4_hash(const struct packet *pkt)
{
	__u32 h = pkt->saddr * 0x9e3779b1u;
	h ^= (((__u32)pkt->sport << 16) | pkt->dport) * 0x85ebca77u;
	h ^= pkt->daddr * 0xc2b2ae3du;
	h ^= pkt->protocol;
	h ^= h >> 16;
	h *= 0x7feb352du;
	h ^= h >> 15;
	h *= 0x846ca68bu;
	h ^= h >> 16;
	return h;
}

/* The backend an external frontend's Maglev table gives `hash`; 0 when it
 * has none (yet: the slots then choose). */
static __always_inline __u32 lb4_maglev(__u16 rev_nat, __u32 hash)
{
	__u32 key = rev_nat;
	void *table = bpf_map_lookup_elem(&fibril_lb_maglev, &key);
	if (!table || !lb_maglev_table_size)
		return 0;
	__u32 slot = hash % lb_maglev_table_size;
	__u32 *id = bpf_map_lookup_elem(table, &slot);
	return id ? *id : 0;
}

/* A new choice of backend for a connection to service `key` (its master
 * entry `svc`): the client's affinity while it holds, else for an
 * external frontend its Maglev table's, else a random slot. 0 when the
 * service has no backend. */
static __always_inline __u32 lb4_select(struct lb_service_key *key, const struct lb_service *svc,
					__u32 client, __u32 hash, __u64 now)
{
	struct lb_affinity_key ak = {.client = client, .rev_nat = svc->rev_nat};
	struct lb_service *slot;
	__u16 count = svc->count;

	if (!count)
		return 0;
	/* The agent removes a client's affinity to a backend the service no
	 * longer has in a slot, so one found here is still a choice. */
	if (svc->flags & LB_SVC_F_AFFINITY) {
		struct lb_affinity *a = bpf_map_lookup_elem(&fibril_lb_affinity, &ak);
		if (a && a->last_used_ns + svc->affinity_timeout_s * NSEC_PER_SEC > now) {
			a->last_used_ns = now;
			return a->backend_id;
		}
	}
	__u32 chosen = (svc->flags & LB_SVC_F_EXTERNAL) ? lb4_maglev(svc->rev_nat, hash) : 0;
	if (!chosen) {
		key->slot = (bpf_get_prandom_u32() % count) + 1;
		slot = bpf_map_lookup_elem(&fibril_lb_services, key);
		key->slot = 0;
		if (!slot)
			return 0;
		chosen = slot->backend_id;
	}
	if (svc->flags & LB_SVC_F_AFFINITY) {
		struct lb_affinity fresh = {.last_used_ns = now, .backend_id = chosen};
		bpf_map_update_elem(&fibril_lb_affinity, &ak, &fresh, BPF_ANY);
	}
	return chosen;
}

/* Creates the entry of a connection the load balancer translated (its
 * service entry, a node port's): it sees the client's packets only, so
 * its other side counts as acknowledged, and it lives as long as an
 * established connection once the client acknowledges. */
static __always_inline int lb4_client_entry(struct ct_key *key, const struct packet *pkt,
					    __u64 now, __u32 backend_id, __u16 rev_nat)
{
	struct ct_value nv = {
		.backend_id = backend_id,
		.rev_nat = rev_nat,
		.tx_flags_seen = pkt->tcp_flags,
		.rx_flags_seen = TCP_ACK,
		.packets = 1,
		.bytes = pkt->len,
		.last_report_ns = now,
	};
	nv.expires_ns = now + ct_timeout(pkt, &nv);
	return bpf_map_update_elem(&fibril_ct, key, &nv, BPF_ANY);
}

/* Translates a packet a local endpoint (`owner`, charged for the
 * connection's service entry; the host for traffic from outside) sends to
 * a service: 1 when it was (the packet and `pkt` now carry the backend),
 * 0 when it is for no service (`external_only`: no frontend reached from
 * outside), or a drop: DROP_NO_SERVICE for a service without backends. */
FIBRIL_GLOBAL int lb4_translate(struct __sk_buff *skb, struct packet *pkt, __u32 owner,
				__u32 external_only)
{
	if (!skb || !pkt)
		return 0;
	if (pkt->protocol != IPPROTO_TCP && pkt->protocol != IPPROTO_UDP)
		return 0;

	struct lb_service_key key = {
		.address = pkt->daddr,
		.dport = bpf_htons(pkt->dport),
		.protocol = pkt->protocol,
	};
	struct lb_service *svc = bpf_map_lookup_elem(&fibril_lb_services, &key);
	if (!svc || (external_only && !(svc->flags & LB_SVC_F_EXTERNAL)))
		return 0;
	__u16 rev_nat = svc->rev_nat;
	__u64 now = bpf_ktime_get_ns();
	struct lb_backend *be = NULL;
	struct ct_key ck;
	__u32 backend_id = 0;

	/* A connection keeps its backend while that backend is there. */
	ct_fill_key(&ck, pkt, CT_DIR_SERVICE, 0);
	struct ct_value *cv = bpf_map_lookup_elem(&fibril_ct, &ck);
	if (cv && cv->expires_ns > now && !ct_reopens(pkt, cv, 1)) {
		backend_id = cv->backend_id;
		be = bpf_map_lookup_elem(&fibril_lb_backends, &backend_id);
		if (be)
			ct_touch(cv, pkt, 1, now);
	}
	/* A later fragment follows its datagram's backend, which its first
	 * fragment chose, or goes nowhere. */
	if (pkt->frag == FRAG_LATER && !be)
		return DROP(DROP_FRAG_NOT_FOUND);
	if (!be) {
		backend_id = lb4_select(&key, svc, pkt->saddr, lb4_hash(pkt), now);
		if (!backend_id)
			return DROP(DROP_NO_SERVICE);
		be = bpf_map_lookup_elem(&fibril_lb_backends, &backend_id);
		if (!be)
			return DROP(DROP_NO_SERVICE);
		/* A live entry there (its tuple reopened, or its backend
		 * gone) is replaced, already counted; an expired one is not. */
		int replaces = cv && cv->expires_ns > now;
		if (!replaces && ct_budget_take(owner) < 0)
			return DROP(DROP_CT_MAP_INSERT_FAILED);
		if (lb4_client_entry(&ck, pkt, now, backend_id, rev_nat) < 0)
			return DROP(DROP_CT_MAP_INSERT_FAILED);
	}

	if (lb_rewrite(skb, pkt, 1, pkt->daddr, be->address, bpf_htons(pkt->dport), be->port) < 0)
		return DROP(DROP_INVALID_PACKET);
	/* Hairpin: the client is its own backend. */
	if (be->address == pkt->saddr) {
		if (lb_rewrite(skb, pkt, 0, pkt->saddr, LB_LOOPBACK_IPV4, bpf_htons(pkt->sport),
			       bpf_htons(pkt->sport)) < 0)
			return DROP(DROP_INVALID_PACKET);
		pkt->saddr = LB_LOOPBACK_IPV4;
	}
	__u32 addr = be->address;
	__u16 port = be->port;
	pkt->svc_addr = pkt->daddr;
	pkt->svc_port = pkt->dport;
	pkt->svc_side = SVC_SIDE_DESTINATION;
	pkt->rev_nat = rev_nat;
	pkt->daddr = addr;
	pkt->dport = bpf_ntohs(port);
	pkt->policy_port_be = port;
	return 1;
}

/* A backend's reply to itself as a client of its service (hairpin: it
 * answers the service loopback address): to itself again, from the
 * service's address, the way its client side asked. The client's entry
 * (service loopback -> backend) holds the reverse-NAT index. 0, or a
 * drop; `pkt` keeps its tuple (for conntrack and events). */
FIBRIL_GLOBAL int lb4_hairpin_reply(struct __sk_buff *skb, struct packet *pkt)
{
	struct ct_key key;

	if (!skb || !pkt)
		return 0;
	ct_fill_key(&key, pkt, DIR_EGRESS, 1);
	struct ct_value *v = bpf_map_lookup_elem(&fibril_ct, &key);
	if (!v || !v->rev_nat)
		return DROP(DROP_NO_SERVICE);
	__u16 index = v->rev_nat;
	struct lb_reverse_nat *rn = bpf_map_lookup_elem(&fibril_lb_reverse_nat, &index);
	if (!rn)
		return DROP(DROP_NO_SERVICE);
	__u32 svc_addr = rn->address;
	__u16 svc_port = rn->port;
	if (lb_rewrite(skb, pkt, 1, pkt->daddr, pkt->saddr, bpf_htons(pkt->dport),
		       bpf_htons(pkt->dport)) < 0 ||
	    lb_rewrite(skb, pkt, 0, pkt->saddr, svc_addr, bpf_htons(pkt->sport), svc_port) < 0)
		return DROP(DROP_INVALID_PACKET);
	pkt->svc_addr = svc_addr;
	pkt->svc_port = bpf_ntohs(svc_port);
	pkt->svc_side = SVC_SIDE_SOURCE;
	return 0;
}

/* An ICMP error about a translated connection, entering its client (a
 * backend's port unreachable, a router's fragmentation needed): the
 * client's stack matches it to its socket by the packet it quotes, which
 * went to the service, so the quoted destination, and the error's source
 * when it is the backend, become the service's again (checksums kept:
 * the quoted header's, the ICMP message's, the outer one's). 0 when it
 * is about no translated connection, or a drop. */
FIBRIL_GLOBAL int lb4_icmp_rev_nat(struct __sk_buff *skb, struct packet *pkt)
{
	if (!skb || !pkt || !pkt->icmp_error)
		return 0;
	struct ct_key key = {
		.saddr = pkt->inner_saddr,
		.daddr = pkt->inner_daddr,
		.sport = pkt->inner_sport,
		.dport = pkt->inner_dport,
		.protocol = pkt->inner_protocol,
		.direction = DIR_EGRESS,
	};
	struct ct_value *v = bpf_map_lookup_elem(&fibril_ct, &key);
	if (!v || !v->rev_nat)
		return 0;
	__u16 index = v->rev_nat;
	struct lb_reverse_nat *rn = bpf_map_lookup_elem(&fibril_lb_reverse_nat, &index);
	if (!rn)
		return 0;
	__u32 svc_addr = rn->address;
	__u16 svc_port = rn->port;
	__u32 icmp_csum = pkt->l4_off + 2;
	__u32 inner_ip = pkt->l4_off + 8;
	__u32 inner_csum = inner_ip + 10;
	__u32 backend = pkt->inner_daddr;
	__u16 old_csum, new_csum;

	/* The quoted destination address, with the quoted header's checksum,
	 * both inside the ICMP message (so its checksum follows each). */
	if (bpf_skb_load_bytes(skb, inner_csum, &old_csum, 2) < 0 ||
	    bpf_l3_csum_replace(skb, inner_csum, backend, svc_addr, 4) < 0 ||
	    bpf_skb_store_bytes(skb, inner_ip + 16, &svc_addr, 4, 0) < 0 ||
	    bpf_skb_load_bytes(skb, inner_csum, &new_csum, 2) < 0 ||
	    bpf_l4_csum_replace(skb, icmp_csum, backend, svc_addr, 4) < 0 ||
	    bpf_l4_csum_replace(skb, icmp_csum, old_csum, new_csum, 2) < 0)
		return DROP(DROP_INVALID_PACKET);
	/* The quoted destination port (ICMP echoes quote no port). */
	if (pkt->inner_protocol == IPPROTO_TCP || pkt->inner_protocol == IPPROTO_UDP) {
		__u16 old_port = bpf_htons(pkt->inner_dport);
		if (bpf_skb_store_bytes(skb, inner_ip + 20 + 2, &svc_port, 2, 0) < 0 ||
		    bpf_l4_csum_replace(skb, icmp_csum, old_port, svc_port, 2) < 0)
			return DROP(DROP_INVALID_PACKET);
	}
	/* The error's own source, when the backend sent it. */
	if (pkt->saddr == backend) {
		if (bpf_l3_csum_replace(skb, IP_CSUM_OFF, backend, svc_addr, 4) < 0 ||
		    bpf_skb_store_bytes(skb, IP_SADDR_OFF, &svc_addr, 4, 0) < 0)
			return DROP(DROP_INVALID_PACKET);
	}
	pkt->svc_addr = svc_addr;
	pkt->svc_port = bpf_ntohs(svc_port);
	pkt->svc_side = SVC_SIDE_SOURCE;
	return 0;
}

/* A reply of a translated connection entering its client (`rev_nat`, from
 * the client's connection entry): its source becomes the service address
 * again. `pkt` keeps the backend's address, so that events name the pod
 * that answered, with the service beside it. A service gone leaves the
 * reply as it is (the client's socket refuses it, as with Cilium). */
FIBRIL_GLOBAL int lb4_rev_nat(struct __sk_buff *skb, struct packet *pkt, __u32 rev_nat)
{
	__u16 index = rev_nat;

	if (!skb || !pkt || !index)
		return 0;
	struct lb_reverse_nat *rn = bpf_map_lookup_elem(&fibril_lb_reverse_nat, &index);
	if (!rn)
		return 0;
	__u32 addr = rn->address;
	__u16 port = rn->port;
	if (lb_rewrite(skb, pkt, 0, pkt->saddr, addr, bpf_htons(pkt->sport), port) < 0)
		return DROP(DROP_INVALID_PACKET);
	pkt->svc_addr = addr;
	pkt->svc_port = bpf_ntohs(port);
	pkt->svc_side = SVC_SIDE_SOURCE;
	return 0;
}

#endif
