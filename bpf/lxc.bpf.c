// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Programs on the host side of a pod's veth pair, one instance per endpoint
 * (its id and address are set at load time); the logic they share with
 * other attach points is in lib/ (identity, ingress to an endpoint,
 * proxies, drops):
 *   from_container: tc ingress of the host veth = packets leaving the pod
 *                   (services translated to a backend; egress policy; for a peer on this node also the peer's
 *                   ingress policy, then bpf_redirect_peer into the peer;
 *                   for one on another node, into the overlay tunnel)
 *                   (to the node itself, the host firewall's ingress policy)
 *   to_container:   tc egress of the host veth = packets entering the pod
 *                   from the host stack (ingress policy; from the node
 *                   itself, the host firewall's egress policy first)
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
#include "lib/proxy.h"
#include "lib/host.h"
#include "lib/ingress.h"
#include "lib/tunnel.h"
#include "lib/lb.h"

/* This endpoint, set by the agent when it loads the program. */
const volatile __u32 endpoint_id = 0;
const volatile __u32 endpoint_ipv4 = 0; /* network byte order */

/* A drop at this endpoint. */
static __always_inline int drop(struct __sk_buff *skb, const struct packet *pkt, __u8 reason,
				__u8 dir, __u32 src_id, __u32 dst_id, __u8 match, __u32 cookie)
{
	return drop_notify(skb, pkt, endpoint_id, reason, dir, src_id, dst_id, match, cookie);
}

/* A helper's result as tc's verdict: its drop (`DROP(...)`) reported at
 * this endpoint, anything else as it is. */
static __always_inline int verdict_or_drop(struct __sk_buff *skb, const struct packet *pkt,
					   int ret, __u8 dir, __u32 src_id, __u32 dst_id)
{
	if (is_drop(ret))
		return drop(skb, pkt, (__u8)-ret, dir, src_id, dst_id, MATCH_NONE, 0);
	return ret;
}

/* A packet that leaves this node's pods for `dst_id`: into the overlay
 * when the destination is an endpoint behind a tunnel (`tunnel` its node's
 * address), else on to the host stack. */
static __always_inline int leave(struct __sk_buff *skb, const struct packet *pkt, __u32 tunnel,
				 __u32 src_id, __u32 dst_id)
{
	if (!tunnel)
		return TC_ACT_OK;
	return verdict_or_drop(skb, pkt, encap_and_redirect(skb, tunnel, src_id), DIR_EGRESS,
			       src_id, dst_id);
}

/* Non-IPv4 traffic: ARP always passes; anything else passes only while no
 * policy applies in that direction (IPv6 is not enforced yet, so it is
 * dropped with a reason rather than silently allowed). */
static __always_inline int handle_non_ipv4(struct __sk_buff *skb, struct packet *pkt, int kind,
					   __u8 dir, __u32 enforced_flag)
{
	struct endpoint_info *self = local_endpoint(endpoint_ipv4);

	if (kind == PARSE_ARP)
		return TC_ACT_OK;
	if (kind == PARSE_INVALID)
		return drop(skb, pkt, DROP_INVALID_PACKET, dir, 0, 0, MATCH_NONE, 0);
	if (!self || (self->flags & enforced_flag))
		return drop(skb, pkt, DROP_UNSUPPORTED_L3, dir, 0, 0, MATCH_NONE, 0);
	return TC_ACT_OK;
}

SEC("classifier")
int from_container(struct __sk_buff *skb)
{
	struct packet pkt = {};
	struct ct_result ct;
	struct policy_verdict pv = {};
	struct policy_verdict peer_pv = {};
	int kind = parse_packet(skb, &pkt);
	int redirect = 0;

	if (kind != PARSE_IPV4)
		return handle_non_ipv4(skb, &pkt, kind, DIR_EGRESS, EP_F_EGRESS_ENFORCED);

	struct endpoint_info *self = local_endpoint(endpoint_ipv4);
	if (!self || pkt.saddr != endpoint_ipv4)
		return drop(skb, &pkt, DROP_INVALID_SOURCE_IP, DIR_EGRESS, 0, 0, MATCH_NONE, 0);
	int frag = frag_track(&pkt);
	if (frag != FRAG_OK)
		return drop(skb, &pkt,
			    frag == FRAG_NOT_FOUND ? DROP_FRAG_NOT_FOUND : DROP_INVALID_PACKET,
			    DIR_EGRESS, self->identity, 0, MATCH_NONE, 0);
	__u32 src_id = self->identity;
	__u32 flags = self->flags;
	/* This pod answering itself through a service (hairpin): back into
	 * itself, from the service's address. A reply needs no policy. */
	if (pkt.daddr == LB_LOOPBACK_IPV4) {
		ct_lookup(&pkt, DIR_EGRESS, &ct);
		if (ct.state != CT_REPLY)
			return drop(skb, &pkt, DROP_NO_SERVICE, DIR_EGRESS, src_id, src_id,
				    MATCH_NONE, 0);
		int hairpin = lb4_hairpin_reply(skb, &pkt);
		if (is_drop(hairpin))
			return drop(skb, &pkt, (__u8)-hairpin, DIR_EGRESS, src_id, src_id,
				    MATCH_NONE, 0);
		if (ct.report)
			emit_event(skb, &pkt, endpoint_id, EVENT_TRACE, TRACE_TO_LXC, DIR_INGRESS,
				   VERDICT_FORWARDED, ct.state, src_id, src_id, MATCH_NONE,
				   ct.policy_cookie);
		return verdict_or_drop(skb, &pkt, deliver_to_peer(skb, self), DIR_EGRESS, src_id,
				       src_id);
	}
	/* A service's address becomes a backend's before anything looks at
	 * the destination (lib/lb.h). */
	int translated = lb4_translate(skb, &pkt, endpoint_id, 0);
	if (is_drop(translated))
		return drop(skb, &pkt, (__u8)-translated, DIR_EGRESS, src_id, 0, MATCH_NONE, 0);
	/* One endpoint-map lookup: the peer, if local, also gives its identity;
	 * else the ipcache gives it, and the tunnel to a peer on another node. */
	struct endpoint_info *peer = local_endpoint(pkt.daddr);
	__u32 dst_id = ID_WORLD;
	__u32 tunnel = 0;
	if (peer) {
		dst_id = peer->identity;
	} else {
		struct ipcache_value *remote = ipcache_lookup(pkt.daddr);
		if (remote) {
			dst_id = remote->identity;
			tunnel = tunnel_ifindex ? remote->tunnel_endpoint : 0;
		}
	}
	int peer_here = peer && peer->host_ifindex;

	/* An ICMP error about a tracked connection (fragmentation needed, port
	 * unreachable...) passes without a policy lookup. */
	if (ct_related(&pkt, DIR_EGRESS)) {
		/* Into a client on this node: about the service it asked for
		 * (a client elsewhere gets that where it enters). */
		if (peer_here && is_drop(lb4_icmp_rev_nat(skb, &pkt)))
			return drop(skb, &pkt, DROP_INVALID_PACKET, DIR_EGRESS, src_id, dst_id,
				    MATCH_NONE, 0);
		emit_event(skb, &pkt, endpoint_id, EVENT_TRACE, TRACE_FROM_LXC, DIR_EGRESS,
			   VERDICT_FORWARDED, CT_RELATED, src_id, dst_id, MATCH_NONE, 0);
		return peer_here ? verdict_or_drop(skb, &pkt, deliver_to_peer(skb, peer), DIR_EGRESS,
						   src_id, dst_id)
				 : leave(skb, &pkt, tunnel, src_id, dst_id);
	}

	ct_lookup(&pkt, DIR_EGRESS, &ct);
	if (ct.state == CT_REPLY && (ct.flags & CT_F_FROM_PROXY)) {
		/* This pod answers a connection the proxy opened on behalf of a
		 * client: back to the proxy's socket in the host stack. */
		if (ct.report)
			emit_event(skb, &pkt, endpoint_id, EVENT_TRACE, TRACE_TO_PROXY, DIR_EGRESS,
				   VERDICT_FORWARDED, ct.state, src_id, dst_id, MATCH_NONE,
				   ct.policy_cookie);
		skb->mark = proxy_mark_to;
		return TC_ACT_OK;
	}
	if (ct.state == CT_REPLY && (ct.flags & CT_F_NODEPORT)) {
		/* A reply to a node port's client: by the stack to the node's
		 * device, which gives it the node port's address (never the
		 * tunnel, which would skip that). */
		if (ct.report)
			emit_event(skb, &pkt, endpoint_id, EVENT_TRACE, TRACE_FROM_LXC, DIR_EGRESS,
				   VERDICT_FORWARDED, ct.state, src_id, dst_id, MATCH_NONE,
				   ct.policy_cookie);
		return TC_ACT_OK;
	}
	if (ct.state == CT_NEW) {
		if (flags & EP_F_EGRESS_ENFORCED) {
			policy_lookup(endpoint_id, dst_id, DIR_EGRESS, pkt.protocol,
				      pkt.policy_port_be, &pv);
			__u8 verdict = policy_verdict_event(skb, &pkt, endpoint_id, DIR_EGRESS, flags,
							    EP_F_EGRESS_AUDIT, src_id, dst_id, &pv);
			if (verdict == VERDICT_DROPPED)
				return drop(skb, &pkt, pv.drop_reason, DIR_EGRESS, src_id, dst_id,
					    pv.match, pv.cookie);
			if (verdict == VERDICT_FORWARDED) {
				if ((pv.flags & POLICY_F_REDIRECT_DNS) && dns_proxy_port &&
				    (pkt.protocol == IPPROTO_UDP || pkt.protocol == IPPROTO_TCP))
					redirect = REDIRECT_DNS;
				else if ((pv.flags & POLICY_F_REDIRECT) && proxy_port)
					redirect = REDIRECT_HTTP;
			}
		}
		if (redirect == REDIRECT_HTTP && pkt.protocol != IPPROTO_TCP)
			return drop(skb, &pkt, DROP_PROXY_UNSUPPORTED, DIR_EGRESS, src_id, dst_id,
				    pv.match, pv.cookie);
		ct.policy_cookie = pv.cookie;
	} else if (ct.state == CT_ESTABLISHED && (ct.flags & CT_F_PROXY_REDIRECT)) {
		redirect = (ct.flags & CT_F_DNS) ? REDIRECT_DNS : REDIRECT_HTTP;
	}
	if (ct.report && !redirect)
		emit_event(skb, &pkt, endpoint_id, EVENT_TRACE, TRACE_FROM_LXC, DIR_EGRESS,
			   VERDICT_FORWARDED, ct.state, src_id, dst_id, pv.match, ct.policy_cookie);

	/* A peer on this node: its ingress policy is applied here (as Cilium
	 * tail-calls the peer's policy program); its L7 rules may also need
	 * the proxy. */
	if (ct.state == CT_NEW && peer_here) {
		int ingress_redirect = 0;
		int verdict = ingress_policy(skb, &pkt, peer->ep_id, peer->identity, peer->flags,
					     src_id, &peer_pv, &ingress_redirect);
		if (verdict != TC_ACT_OK)
			return verdict;
		/* The server's HTTP rules need the HTTP proxy (which then also
		 * applies an egress HTTP rule); DNS rules are egress-only. */
		if (ingress_redirect && redirect != REDIRECT_HTTP) {
			if (pkt.protocol != IPPROTO_TCP)
				return drop(skb, &pkt, DROP_PROXY_UNSUPPORTED, DIR_INGRESS, src_id,
					    dst_id, peer_pv.match, peer_pv.cookie);
			redirect = REDIRECT_HTTP;
		}
	}
	/* To the node itself: the host's ingress policy (the host firewall),
	 * as a peer's ingress above. */
	if (ct.state == CT_NEW && dst_id == ID_HOST) {
		struct policy_verdict host_pv = {};
		int verdict = host_policy(skb, &pkt, DIR_INGRESS, src_id, dst_id, host_flags(),
					  &host_pv);
		if (verdict != TC_ACT_OK)
			return verdict;
	}
	/* Tracked only once both sides' policies let it through: a connection
	 * the peer's ingress refuses leaves no entry behind. */
	if (ct.state == CT_NEW) {
		__u8 ct_flags = redirect ? CT_F_PROXY_REDIRECT : 0;
		if (redirect == REDIRECT_DNS)
			ct_flags |= CT_F_DNS;
		if (ct_create(&pkt, DIR_EGRESS, pv.cookie, ct_flags,
			      ct_charge_to(&ct, endpoint_id)) < 0)
			return drop(skb, &pkt, DROP_CT_MAP_INSERT_FAILED, DIR_EGRESS, src_id,
				    dst_id, pv.match, pv.cookie);
	}
	if (redirect) {
		int verdict = to_proxy(skb, &pkt, redirect);
		if (is_drop(verdict))
			return verdict_or_drop(skb, &pkt, verdict, DIR_EGRESS, src_id, dst_id);
		if (verdict != NO_DNS_PROXY) {
			if (ct.report)
				emit_event(skb, &pkt, endpoint_id, EVENT_TRACE, TRACE_TO_PROXY,
					   DIR_EGRESS, VERDICT_FORWARDED, ct.state, src_id, dst_id,
					   pv.match, ct.policy_cookie);
			return verdict;
		}
		/* No DNS proxy: straight to the resolver, this connection for good. */
		if (pkt.protocol == IPPROTO_TCP)
			ct_update_flags(&pkt, DIR_EGRESS, 0, CT_F_PROXY_REDIRECT | CT_F_DNS);
		if (ct.report)
			emit_event(skb, &pkt, endpoint_id, EVENT_TRACE, TRACE_FROM_LXC, DIR_EGRESS,
				   VERDICT_FORWARDED, ct.state, src_id, dst_id, pv.match,
				   ct.policy_cookie);
	}

	/* Same-node delivery: hand the packet straight to the peer's interface
	 * inside its namespace: one veth hop, no host stack, no iptables. */
	if (peer_here) {
		int verdict = ingress_to_endpoint(skb, &pkt, peer->ep_id, peer->identity,
						  peer->flags, src_id,
						  ct.state == CT_NEW ? INGRESS_CHECKED : INGRESS_CHECK,
						  &peer_pv, endpoint_id);
		if (verdict == NEEDS_PROXY) {
			/* A connection tracked before the peer's L7 rules came: its
			 * next packets belong to the proxy. */
			if (pkt.protocol != IPPROTO_TCP)
				return drop(skb, &pkt, DROP_PROXY_UNSUPPORTED, DIR_INGRESS, src_id,
					    dst_id, peer_pv.match, peer_pv.cookie);
			ct_update_flags(&pkt, DIR_EGRESS, CT_F_PROXY_REDIRECT, 0);
			emit_event(skb, &pkt, endpoint_id, EVENT_TRACE, TRACE_TO_PROXY, DIR_EGRESS,
				   VERDICT_FORWARDED, ct.state, src_id, dst_id, peer_pv.match,
				   peer_pv.cookie);
			return verdict_or_drop(skb, &pkt, to_proxy(skb, &pkt, REDIRECT_HTTP),
					       DIR_EGRESS, src_id, dst_id);
		}
		if (verdict != TC_ACT_OK)
			return verdict;
		return verdict_or_drop(skb, &pkt, deliver_to_peer(skb, peer), DIR_EGRESS, src_id,
				       dst_id);
	}
	return leave(skb, &pkt, tunnel, src_id, dst_id);
}

SEC("classifier")
int to_container(struct __sk_buff *skb)
{
	struct packet pkt = {};
	struct policy_verdict pv = {};
	int kind = parse_packet(skb, &pkt);

	if (kind != PARSE_IPV4)
		return handle_non_ipv4(skb, &pkt, kind, DIR_INGRESS, EP_F_INGRESS_ENFORCED);

	struct endpoint_info *self = local_endpoint(endpoint_ipv4);
	if (!self || pkt.daddr != endpoint_ipv4)
		return TC_ACT_OK; /* broadcast or not addressed to the pod */
	int frag = frag_track(&pkt);
	if (frag != FRAG_OK)
		return drop(skb, &pkt,
			    frag == FRAG_NOT_FOUND ? DROP_FRAG_NOT_FOUND : DROP_INVALID_PACKET,
			    DIR_INGRESS, 0, self->identity, MATCH_NONE, 0);
	__u32 src_id = identity_of(pkt.saddr);
	if (ct_related(&pkt, DIR_INGRESS)) {
		if (is_drop(lb4_icmp_rev_nat(skb, &pkt)))
			return drop(skb, &pkt, DROP_INVALID_PACKET, DIR_INGRESS, src_id,
				    self->identity, MATCH_NONE, 0);
		emit_event(skb, &pkt, endpoint_id, EVENT_TRACE, TRACE_TO_LXC, DIR_INGRESS,
			   VERDICT_FORWARDED, CT_RELATED, src_id, self->identity, MATCH_NONE, 0);
		return TC_ACT_OK;
	}
	enum ingress_mode mode = proxy_port && skb->mark == proxy_mark_from
		? INGRESS_FROM_PROXY : INGRESS_CHECK;
	int verdict = ingress_to_endpoint(skb, &pkt, endpoint_id, self->identity, self->flags,
					  src_id, mode, &pv, 0);
	/* L7 rules for a client outside this node's pods: the proxy is reached
	 * from the pods' side only, so refuse rather than skip the rules. */
	if (verdict == NEEDS_PROXY)
		return drop(skb, &pkt, DROP_PROXY_UNSUPPORTED, DIR_INGRESS, src_id,
			    self->identity, pv.match, pv.cookie);
	return verdict;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
