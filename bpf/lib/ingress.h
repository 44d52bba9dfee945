/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Ingress to a local endpoint, wherever the packet comes from (the host
 * stack in to_container, a pod on this node in the sender's
 * from_container): conntrack, the endpoint's ingress policy for new
 * connections with its policy-verdict event, the proxy's L7 rules, and the
 * same-node delivery into the endpoint's namespace. */
#ifndef FIBRIL_INGRESS_H
#define FIBRIL_INGRESS_H

#include <linux/pkt_cls.h>

#include "ct.h"
#include "drop.h"
#include "host.h"
#include "identity.h"
#include "lb.h"
#include "policy.h"
#include "proxy.h"

/* Ingress policy for a connection opening towards local endpoint `ep_id`.
 * TC_ACT_OK when allowed (then `*redirect` is set if its L7 rules need the
 * proxy), TC_ACT_SHOT (with the drop event) otherwise. */
static __always_inline int ingress_policy(struct __sk_buff *skb, const struct packet *pkt,
					  __u32 ep_id, __u32 dst_id, __u32 flags, __u32 src_id,
					  struct policy_verdict *pv, int *redirect)
{
	if (!(flags & EP_F_INGRESS_ENFORCED))
		return TC_ACT_OK;
	policy_lookup(ep_id, src_id, DIR_INGRESS, pkt->protocol, pkt->policy_port_be, pv);
	__u8 verdict = policy_verdict_event(skb, pkt, ep_id, DIR_INGRESS, flags,
					    EP_F_INGRESS_AUDIT, src_id, dst_id, pv);
	if (verdict == VERDICT_DROPPED)
		return drop_notify(skb, pkt, ep_id, pv->drop_reason, DIR_INGRESS, src_id, dst_id,
				   pv->match, pv->cookie);
	if (verdict == VERDICT_FORWARDED && (pv->flags & POLICY_F_REDIRECT) && proxy_port)
		*redirect = 1;
	return TC_ACT_OK;
}

enum ingress_mode {
	INGRESS_CHECK,   /* evaluate the policy for new connections */
	INGRESS_CHECKED, /* the caller evaluated it (verdict in `pv`) */
	INGRESS_FROM_PROXY, /* the proxy's upstream: its client was checked */
	INGRESS_FROM_OVERLAY, /* from another node: INGRESS_CHECK, and replies
			       * for this node's proxies go to them */
};

/* Whether a packet that matches no connection belongs to a socket of this
 * node's stack: a proxy's upstream connection or query, bound to its
 * client's address, whose server on another node answers through the
 * overlay. TCP: a packet that opens nothing (no pure SYN). UDP: only a
 * socket bound to the endpoint's own address (transparently: the DNS
 * proxy's), so that a host socket on a wildcard address never takes an
 * endpoint's datagrams. */
static __always_inline int for_host_socket(struct __sk_buff *skb, const struct packet *pkt)
{
	struct bpf_sock_tuple tuple = {};
	struct bpf_sock *sk;
	int ours;

	tuple.ipv4.saddr = pkt->saddr;
	tuple.ipv4.daddr = pkt->daddr;
	tuple.ipv4.sport = bpf_htons(pkt->sport);
	tuple.ipv4.dport = bpf_htons(pkt->dport);
	if (pkt->protocol == IPPROTO_TCP) {
		if ((pkt->tcp_flags & (TCP_SYN | TCP_ACK)) == TCP_SYN)
			return 0;
		sk = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
		if (!sk)
			return 0;
		bpf_sk_release(sk);
		return 1;
	}
	if (pkt->protocol != IPPROTO_UDP)
		return 0;
	sk = bpf_sk_lookup_udp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return 0;
	ours = sk->src_ip4 == pkt->daddr;
	bpf_sk_release(sk);
	return ours;
}

/* A packet from the overlay that matches no connection of endpoint
 * `ep_id`: PROXIED when it belongs to a connection this node's HTTP proxy
 * took over (tracked under the egress direction with CT_F_PROXY_REDIRECT,
 * apart from the proxy's own upstream entry to the endpoint, which has the
 * same client address), TO_HOST_STACK when it answers a socket of this
 * node's stack (TCP or UDP), else 0. */
static __always_inline int overlay_taken(struct __sk_buff *skb, const struct packet *pkt,
					 __u32 ep_id, __u32 src_id, __u32 dst_id)
{
	struct ct_result proxied;

	if (pkt->protocol == IPPROTO_TCP && proxy_port) {
		ct_lookup(pkt, DIR_EGRESS, &proxied);
		if (proxied.state == CT_ESTABLISHED && (proxied.flags & CT_F_PROXY_REDIRECT)) {
			if (proxied.report)
				emit_event(skb, pkt, ep_id, EVENT_TRACE, TRACE_TO_PROXY,
					   DIR_INGRESS, VERDICT_FORWARDED, CT_ESTABLISHED, src_id,
					   dst_id, MATCH_NONE, proxied.policy_cookie);
			return PROXIED;
		}
	}
	return for_host_socket(skb, pkt) ? TO_HOST_STACK : 0;
}

/* Ingress for a local endpoint (`ep_id`): conntrack, policy for new
 * connections, the to-endpoint trace. Returns TC_ACT_OK, TC_ACT_SHOT (the
 * drop reported), NEEDS_PROXY when the L7 rules need the proxy, or (from
 * the overlay) `overlay_taken`'s PROXIED or TO_HOST_STACK.
 * `owner`: the endpoint a new entry is charged to (0: the sender when it
 * is a local endpoint, else this one). */
static __always_inline int ingress_to_endpoint(struct __sk_buff *skb, struct packet *pkt,
					       __u32 ep_id, __u32 dst_id, __u32 flags,
					       __u32 src_id, enum ingress_mode mode,
					       struct policy_verdict *pv, __u32 owner)
{
	struct ct_result ct;
	__u8 ct_flags = 0;

	ct_lookup(pkt, DIR_INGRESS, &ct);
	/* A reply of a connection this endpoint opened to a service: from
	 * the service's address again. */
	if (ct.state == CT_REPLY && ct.rev_nat &&
	    is_drop(lb4_rev_nat(skb, pkt, ct.rev_nat)))
		return drop_notify(skb, pkt, ep_id, DROP_INVALID_PACKET, DIR_INGRESS, src_id, dst_id,
				   MATCH_NONE, 0);
	if (ct.state == CT_NEW) {
		/* The node opening a connection to its pod: the host's egress
		 * policy first (the host firewall), as for every connection
		 * the node opens. */
		if (src_id == ID_HOST && mode == INGRESS_CHECK) {
			struct policy_verdict host_pv = {};
			int verdict = host_policy(skb, pkt, DIR_EGRESS, src_id, dst_id, host_flags(),
						  &host_pv);
			if (verdict != TC_ACT_OK)
				return verdict;
		}
		/* From the overlay, a packet of no connection of the endpoint's
		 * may still be tracked here: checked only then, so established
		 * connections pay nothing for it. */
		if (mode == INGRESS_FROM_OVERLAY) {
			int taken = overlay_taken(skb, pkt, ep_id, src_id, dst_id);
			if (taken)
				return taken;
		}
		if (mode == INGRESS_CHECK || mode == INGRESS_FROM_OVERLAY) {
			int redirect = 0;
			int verdict = ingress_policy(skb, pkt, ep_id, dst_id, flags, src_id, pv,
						     &redirect);
			if (verdict != TC_ACT_OK)
				return verdict;
			if (redirect)
				return NEEDS_PROXY;
		} else if (mode == INGRESS_FROM_PROXY) {
			ct_flags = CT_F_FROM_PROXY;
		}
		/* Sent by a node port on this node's device: the replies go
		 * back there to get the node port's address. */
		if (mode == INGRESS_CHECK && skb->mark == NODEPORT_LOCAL_MARK)
			ct_flags |= CT_F_NODEPORT;
		/* Charged to the sender when it is a local endpoint (the proxy
		 * connects from its client's address), else to this one. */
		if (!owner) {
			struct endpoint_info *sender = local_endpoint(pkt->saddr);
			owner = sender ? sender->ep_id : ep_id;
		}
		if (ct_create(pkt, DIR_INGRESS, pv->cookie, ct_flags, ct_charge_to(&ct, owner)) < 0)
			return drop_notify(skb, pkt, ep_id, DROP_CT_MAP_INSERT_FAILED, DIR_INGRESS,
					   src_id, dst_id, pv->match, pv->cookie);
		ct.policy_cookie = pv->cookie;
	}
	if (ct.report)
		emit_event(skb, pkt, ep_id, EVENT_TRACE, TRACE_TO_LXC, DIR_INGRESS,
			   VERDICT_FORWARDED, ct.state, src_id, dst_id, pv->match, ct.policy_cookie);
	return TC_ACT_OK;
}

/* Hands a packet to a local peer's interface inside its namespace: one
 * veth hop, no host stack, no iptables. A redirect, or a drop
 * (`DROP(...)`). */
static __always_inline int deliver_to_peer(struct __sk_buff *skb, const struct endpoint_info *peer)
{
	if (bpf_skb_store_bytes(skb, 0, peer->pod_mac, 6, 0) < 0 ||
	    bpf_skb_store_bytes(skb, 6, peer->host_mac, 6, 0) < 0)
		return DROP(DROP_INVALID_PACKET);
	return bpf_redirect_peer(peer->host_ifindex, 0);
}

#endif
