// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Programs on the node's own devices (`--devices`), for the host firewall
 * (lib/host.h): the node is an endpoint like a pod, and host policies
 * (nodeSelector) are its policy.
 *   from_netdev: tc ingress = packets arriving at the node. Those for one
 *                of the node's own addresses meet the host's ingress
 *                policy (new connections) and conntrack; packets routed
 *                on to pods pass (their programs enforce theirs).
 *   to_netdev:   tc egress = packets leaving the node. Those from the
 *                node's own addresses meet the host's egress policy.
 * With kube-proxy replacement they also serve node ports and external
 * addresses (Cilium's bpf_host NodePort): `from_netdev` gives a packet
 * for one its backend (Maglev) before anything else looks at it, so the
 * connection is the backend's, not the host's; `to_netdev` gives the
 * backend's replies the address and port the client asked for. A
 * connection to another node's backend leaves from the node's address
 * (lib/nat.h: source NAT in `to_netdev`, undone in `from_netdev`).
 * With neither (fibril_host all zero, no replacement) both pass
 * everything after one array lookup.
 */
#include <linux/bpf.h>
#include <linux/pkt_cls.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "fibril_abi.h"
#include "lib/maps.h"
#include "lib/parse.h"
#include "lib/ct.h"
#include "lib/frag.h"
#include "lib/policy.h"
#include "lib/events.h"
#include "lib/drop.h"
#include "lib/identity.h"
#include "lib/host.h"
#include "lib/lb.h"
#include "lib/nat.h"

static __always_inline int host_drop(struct __sk_buff *skb, const struct packet *pkt, __u8 reason,
				     __u8 dir, __u32 src_id, __u32 dst_id)
{
	return drop_notify(skb, pkt, HOST_ENDPOINT_ID, reason, dir, src_id, dst_id, MATCH_NONE, 0);
}

/* Kube-proxy replacement: node ports served here (the agent's setting). */
const volatile __u32 kube_proxy_replacement = 0;

/* A packet from outside for an external frontend (node port, external or
 * load balancer address): translated to its backend (Maglev), the reverse
 * NAT remembered for the replies (CT_DIR_NODEPORT, client -> backend),
 * then on to the stack, which routes it to a pod of this node or, marked
 * for source NAT (`to_netdev`), to another node's. 0 when it is for no
 * external frontend; else the tc verdict in `*verdict`. */
static __always_inline int nodeport_in(struct __sk_buff *skb, struct packet *pkt, int *verdict)
{
	int t = lb4_translate(skb, pkt, HOST_ENDPOINT_ID, 1);

	if (t == 0)
		return 0;
	/* Identities are looked up only for what is reported: this runs for
	 * every packet of the device. */
	if (is_drop(t)) {
		*verdict = host_drop(skb, pkt, (__u8)-t, DIR_INGRESS, identity_of(pkt->saddr), 0);
		return 1;
	}
	struct ct_key key;
	__u64 now = bpf_ktime_get_ns();
	ct_fill_key(&key, pkt, CT_DIR_NODEPORT, 0);
	struct ct_value *v = bpf_map_lookup_elem(&fibril_ct, &key);
	if (v && v->expires_ns > now && !ct_reopens(pkt, v, 1)) {
		ct_touch(v, pkt, 1, now);
	} else {
		__u32 src_id = identity_of(pkt->saddr);
		__u32 dst_id = identity_of(pkt->daddr);
		if (lb4_client_entry(&key, pkt, now, 0, pkt->rev_nat) < 0) {
			*verdict = host_drop(skb, pkt, DROP_CT_MAP_INSERT_FAILED, DIR_INGRESS, src_id,
					     dst_id);
			return 1;
		}
		emit_event(skb, pkt, HOST_ENDPOINT_ID, EVENT_TRACE, TRACE_FROM_NETWORK, DIR_INGRESS,
			   VERDICT_FORWARDED, CT_NEW, src_id, dst_id, MATCH_NONE, 0);
	}
	skb->mark = local_endpoint(pkt->daddr) ? NODEPORT_LOCAL_MARK : NODEPORT_MASQ_MARK;
	*verdict = TC_ACT_OK;
	return 1;
}

/* A backend's reply to a node port's connection leaving for its client:
 * from the node port's address and port again. */
static __always_inline int nodeport_out(struct __sk_buff *skb, struct packet *pkt)
{
	struct ct_key key;
	__u64 now = bpf_ktime_get_ns();

	/* Node ports are TCP and UDP only: nothing else has an entry. */
	if (pkt->protocol != IPPROTO_TCP && pkt->protocol != IPPROTO_UDP)
		return TC_ACT_OK;
	ct_fill_key(&key, pkt, CT_DIR_NODEPORT, 1);
	struct ct_value *v = bpf_map_lookup_elem(&fibril_ct, &key);
	if (!v || v->expires_ns <= now)
		return TC_ACT_OK;
	ct_touch(v, pkt, 0, now);
	if (is_drop(lb4_rev_nat(skb, pkt, v->rev_nat)))
		return host_drop(skb, pkt, DROP_INVALID_PACKET, DIR_EGRESS, identity_of(pkt->saddr),
				 identity_of(pkt->daddr));
	return TC_ACT_OK;
}

/* One packet of the node's own traffic in `dir` (the host endpoint's
 * view: ingress = to the node), its fragments tracked: conntrack, the
 * host's policy for new connections, the trace at `point`. */
static __always_inline int host_traffic(struct __sk_buff *skb, struct packet *pkt, __u8 dir,
					__u32 src_id, __u32 dst_id, __u32 flags, __u8 point)
{
	struct policy_verdict pv = {};
	struct ct_result ct;

	/* An ICMP error about a tracked connection passes as RELATED. */
	if (ct_related(pkt, dir)) {
		emit_event(skb, pkt, HOST_ENDPOINT_ID, EVENT_TRACE, point, dir, VERDICT_FORWARDED,
			   CT_RELATED, src_id, dst_id, MATCH_NONE, 0);
		return TC_ACT_OK;
	}
	ct_lookup(pkt, dir, &ct);
	if (ct.state == CT_NEW) {
		int verdict = host_policy(skb, pkt, dir, src_id, dst_id, flags, &pv);
		if (verdict != TC_ACT_OK)
			return verdict;
		if (ct_create(pkt, dir, pv.cookie, 0, ct_charge_to(&ct, HOST_ENDPOINT_ID)) < 0)
			return drop_notify(skb, pkt, HOST_ENDPOINT_ID, DROP_CT_MAP_INSERT_FAILED, dir,
					   src_id, dst_id, pv.match, pv.cookie);
		ct.policy_cookie = pv.cookie;
	}
	if (ct.report)
		emit_event(skb, pkt, HOST_ENDPOINT_ID, EVENT_TRACE, point, dir, VERDICT_FORWARDED,
			   ct.state, src_id, dst_id, pv.match, ct.policy_cookie);
	return TC_ACT_OK;
}

/* Fragments take their first's ports (lib/frag.h): TC_ACT_OK, or the
 * drop of a later one whose first was not seen (or that contradicts it). */
static __always_inline int host_frag(struct __sk_buff *skb, struct packet *pkt, __u8 dir)
{
	int frag = frag_track(pkt);

	if (frag == FRAG_OK)
		return TC_ACT_OK;
	return host_drop(skb, pkt, frag == FRAG_NOT_FOUND ? DROP_FRAG_NOT_FOUND : DROP_INVALID_PACKET,
			 dir, identity_of(pkt->saddr), identity_of(pkt->daddr));
}

/* Not IPv4: ARP passes; IPv6 (not enforced yet) and packets that do not
 * parse are dropped with a reason while the host's policy is enforced in
 * that direction (not in audit mode), as a pod's. */
static __always_inline int host_non_ipv4(struct __sk_buff *skb, struct packet *pkt, int kind,
					 __u8 dir, __u32 flags)
{
	__u32 enforced = dir == DIR_INGRESS ? EP_F_INGRESS_ENFORCED : EP_F_EGRESS_ENFORCED;

	if (!(flags & enforced) || (flags & EP_F_AUDIT_ALL))
		return TC_ACT_OK;
	if (kind == PARSE_IPV6)
		return host_drop(skb, pkt, DROP_UNSUPPORTED_L3, dir, 0, 0);
	if (kind == PARSE_INVALID)
		return host_drop(skb, pkt, DROP_INVALID_PACKET, dir, 0, 0);
	return TC_ACT_OK;
}

SEC("classifier")
int from_netdev(struct __sk_buff *skb)
{
	struct packet pkt = {};
	__u32 flags = host_flags();
	int verdict;

	if (!(flags & EP_F_HOST_FIREWALL) && !kube_proxy_replacement)
		return TC_ACT_OK;
	int kind = parse_packet(skb, &pkt);
	if (kind != PARSE_IPV4)
		return (flags & EP_F_HOST_FIREWALL) ? host_non_ipv4(skb, &pkt, kind, DIR_INGRESS, flags)
						    : TC_ACT_OK;
	/* Fragments once, for both uses (a later one takes its first's
	 * ports); then node ports: a translated connection is its backend's. */
	verdict = host_frag(skb, &pkt, DIR_INGRESS);
	if (verdict != TC_ACT_OK)
		return verdict;
	if (kube_proxy_replacement) {
		/* A reply to a connection `to_netdev` gave the node's address:
		 * its client's again, then routed back out. */
		int n = nat_in(skb, &pkt);
		if (n != 0)
			return is_drop(n) ? host_drop(skb, &pkt, (__u8)-n, DIR_INGRESS,
						      identity_of(pkt.saddr), 0)
					  : TC_ACT_OK;
		if (nodeport_in(skb, &pkt, &verdict))
			return verdict;
	}
	if (!(flags & EP_F_HOST_FIREWALL))
		return TC_ACT_OK;
	/* Only the node's own addresses: traffic routed on to pods meets
	 * their programs. */
	if (!is_host_address(pkt.daddr))
		return TC_ACT_OK;
	return host_traffic(skb, &pkt, DIR_INGRESS, identity_of(pkt.saddr), ID_HOST, flags,
			    TRACE_FROM_NETWORK);
}

SEC("classifier")
int to_netdev(struct __sk_buff *skb)
{
	struct packet pkt = {};
	__u32 flags = host_flags();

	if (!(flags & EP_F_HOST_FIREWALL) && !kube_proxy_replacement)
		return TC_ACT_OK;
	int kind = parse_packet(skb, &pkt);
	if (kind != PARSE_IPV4)
		return (flags & EP_F_HOST_FIREWALL) ? host_non_ipv4(skb, &pkt, kind, DIR_EGRESS, flags)
						    : TC_ACT_OK;
	/* What the node itself sends meets its policy; pods' packets were
	 * theirs to enforce (no masquerading of pods here: they keep their
	 * addresses), a node port's connection to another node's backend
	 * leaves from the node's address, and a backend's reply to a node port
	 * is given the node port's address back. */
	if (kube_proxy_replacement && skb->mark == NODEPORT_MASQ_MARK) {
		int verdict = host_frag(skb, &pkt, DIR_EGRESS);
		if (verdict != TC_ACT_OK)
			return verdict;
		int n = nat_out(skb, &pkt);
		return is_drop(n) ? host_drop(skb, &pkt, (__u8)-n, DIR_EGRESS,
					      identity_of(pkt.saddr), identity_of(pkt.daddr))
				  : TC_ACT_OK;
	}
	if (is_host_address(pkt.saddr)) {
		if (!(flags & EP_F_HOST_FIREWALL))
			return TC_ACT_OK;
		int verdict = host_frag(skb, &pkt, DIR_EGRESS);
		if (verdict != TC_ACT_OK)
			return verdict;
		return host_traffic(skb, &pkt, DIR_EGRESS, ID_HOST, identity_of(pkt.daddr), flags,
				    TRACE_TO_NETWORK);
	}
	return kube_proxy_replacement ? nodeport_out(skb, &pkt) : TC_ACT_OK;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
