// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Programs on the host side of a pod's veth pair, one instance per endpoint
 * (its identity is set at load time):
 *   from_container: tc ingress of the host veth = packets leaving the pod
 *                   (egress policy; for a peer on this node also the peer's
 *                   ingress policy, then bpf_redirect_peer into the peer)
 *   to_container:   tc egress of the host veth = packets entering the pod
 *                   from the host stack (ingress policy)
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

/* This endpoint, set by the agent when it loads the program. */
const volatile __u32 endpoint_id = 0;
const volatile __u32 endpoint_ipv4 = 0; /* network byte order */

static __always_inline struct endpoint_info *local_endpoint(__u32 addr)
{
	struct endpoint_key key = { .addr = addr };
	return bpf_map_lookup_elem(&fibril_endpoints, &key);
}

/* The identity of an address that is no local endpoint: the longest
 * ipcache prefix, else world. */
static __always_inline __u32 ipcache_identity(__u32 addr)
{
	struct ipcache_key key = { .prefixlen = 32 };
	__builtin_memcpy(key.addr, &addr, 4);
	struct ipcache_value *v = bpf_map_lookup_elem(&fibril_ipcache, &key);
	return v ? v->identity : ID_WORLD;
}

/* The identity of a remote address: a local endpoint, else the ipcache. */
static __always_inline __u32 identity_of(__u32 addr)
{
	struct endpoint_info *ep = local_endpoint(addr);
	return ep ? ep->identity : ipcache_identity(addr);
}

static __always_inline int drop(struct __sk_buff *skb, const struct packet *pkt, __u8 reason,
				__u8 dir, __u32 src_id, __u32 dst_id, __u8 match, __u32 cookie)
{
	emit_event(skb, pkt, endpoint_id, EVENT_DROP, reason, dir, VERDICT_DROPPED, CT_NEW,
		   src_id, dst_id, match, cookie);
	return TC_ACT_SHOT;
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

/* The agent's L7 proxy, set at load time: its listener on 127.0.0.1, the mark
 * that routes a packet to the local stack (a policy-routing rule of the
 * agent's), and the mark on the proxy's own upstream sockets. 0 = no proxy. */
const volatile __u16 proxy_port = 0;
const volatile __u16 dns_proxy_port = 0; /* UDP and TCP, on 127.0.0.1 */
const volatile __u32 proxy_mark_to = 0;
const volatile __u32 proxy_mark_from = 0;

/* Cilium's policy-verdict notification, for the first packet of each
 * connection a policy lookup decided (`pv`), with how it matched. Returns the
 * verdict: FORWARDED, AUDIT (denied, but by audit-mode policy) or DROPPED. */
static __always_inline __u8 policy_verdict_event(struct __sk_buff *skb, const struct packet *pkt,
						 __u32 ep_id, __u8 dir, __u32 ep_flags,
						 __u32 audit_flag, __u32 src_id, __u32 dst_id,
						 const struct policy_verdict *pv)
{
	__u8 verdict = VERDICT_FORWARDED;

	if (!pv->allowed)
		verdict = policy_audited(pv, ep_flags, audit_flag) ? VERDICT_AUDIT : VERDICT_DROPPED;
	emit_event(skb, pkt, ep_id, EVENT_POLICY_VERDICT, pv->allowed ? 0 : pv->drop_reason, dir,
		   verdict, CT_NEW, src_id, dst_id, pv->match, pv->cookie);
	return verdict;
}

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
	if (verdict == VERDICT_DROPPED) {
		emit_event(skb, pkt, ep_id, EVENT_DROP, pv->drop_reason, DIR_INGRESS,
			   VERDICT_DROPPED, CT_NEW, src_id, dst_id, pv->match, pv->cookie);
		return TC_ACT_SHOT;
	}
	if (verdict == VERDICT_FORWARDED && (pv->flags & POLICY_F_REDIRECT) && proxy_port)
		*redirect = 1;
	return TC_ACT_OK;
}

/* What the helpers below return beside tc's verdicts (TC_ACT_*, of which
 * TC_ACT_UNSPEC is -1): never a verdict, always handled by the caller. */
enum helper_result {
	NEEDS_PROXY = -100,   /* the connection's L7 rules need the proxy */
	NO_DNS_PROXY = -101,  /* the DNS proxy is not there */
};

enum ingress_mode {
	INGRESS_CHECK,   /* evaluate the policy for new connections */
	INGRESS_CHECKED, /* the caller evaluated it (verdict in `pv`) */
	INGRESS_FROM_PROXY, /* the proxy's upstream: its client was checked */
};

/* Ingress for a local endpoint (`ep_id`): conntrack, policy for new
 * connections, the to-endpoint trace. Runs in to_container for traffic from
 * the host stack and in the sender's from_container for pod-to-pod traffic
 * on this node. Returns NEEDS_PROXY when the L7 rules need the proxy. */
static __always_inline int ingress_to_endpoint(struct __sk_buff *skb, struct packet *pkt,
					       __u32 ep_id, __u32 dst_id, __u32 flags,
					       __u32 src_id, enum ingress_mode mode,
					       struct policy_verdict *pv, __u32 owner)
{
	struct ct_result ct;
	__u8 ct_flags = 0;

	ct_lookup(pkt, DIR_INGRESS, &ct);
	if (ct.state == CT_NEW) {
		if (mode == INGRESS_CHECK) {
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
		/* Charged to the sender when it is a local endpoint (the proxy
		 * connects from its client's address), else to this one. */
		if (!owner) {
			struct endpoint_info *sender = local_endpoint(pkt->saddr);
			owner = sender ? sender->ep_id : ep_id;
		}
		if (ct_create(pkt, DIR_INGRESS, pv->cookie, ct_flags, owner) < 0) {
			emit_event(skb, pkt, ep_id, EVENT_DROP, DROP_CT_MAP_INSERT_FAILED,
				   DIR_INGRESS, VERDICT_DROPPED, CT_NEW, src_id, dst_id, pv->match,
				   pv->cookie);
			return TC_ACT_SHOT;
		}
		ct.policy_cookie = pv->cookie;
	}
	if (ct.report)
		emit_event(skb, pkt, ep_id, EVENT_TRACE, TRACE_TO_LXC, DIR_INGRESS,
			   VERDICT_FORWARDED, ct.state, src_id, dst_id, pv->match, ct.policy_cookie);
	return TC_ACT_OK;
}

enum redirect_kind {
	REDIRECT_NONE,
	REDIRECT_HTTP,
	REDIRECT_DNS,
};

/* Hands a packet to a proxy in the host stack: the mark routes it to the
 * local stack (whatever its destination address), and a connection's first
 * packet (every datagram, for UDP) is assigned to the proxy's socket, which
 * sees the original destination as its local address (transparent to the
 * client). Later TCP packets find the accepted socket by the usual lookup.
 * Returns NO_DNS_PROXY when the DNS proxy is not there (the agent restarts): DNS then
 * goes to the resolver directly, so that pods keep resolving; the HTTP proxy
 * missing fails closed. */
static __always_inline int to_proxy(struct __sk_buff *skb, const struct packet *pkt,
				    __u32 src_id, __u32 dst_id, int kind)
{
	struct bpf_sock_tuple tuple = {};
	struct bpf_sock *sk;
	int first = pkt->protocol == IPPROTO_UDP ||
		    ((pkt->tcp_flags & TCP_SYN) && !(pkt->tcp_flags & TCP_ACK));

	if (!first) {
		skb->mark = proxy_mark_to;
		return TC_ACT_OK;
	}
	tuple.ipv4.daddr = bpf_htonl(0x7f000001);
	tuple.ipv4.dport = bpf_htons(kind == REDIRECT_DNS ? dns_proxy_port : proxy_port);
	if (pkt->protocol == IPPROTO_UDP)
		sk = bpf_sk_lookup_udp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
	else
		sk = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (!sk) {
		if (kind == REDIRECT_DNS)
			return NO_DNS_PROXY;
		return drop(skb, pkt, DROP_SOCKET_LOOKUP_FAILED, DIR_EGRESS, src_id, dst_id,
			    MATCH_NONE, 0);
	}
	skb->mark = proxy_mark_to;
	long err = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	if (err)
		return drop(skb, pkt, DROP_SOCKET_ASSIGN_FAILED, DIR_EGRESS, src_id, dst_id,
			    MATCH_NONE, 0);
	return TC_ACT_OK;
}

/* Hands a packet to a local peer's interface inside its namespace: one
 * veth hop, no host stack, no iptables. */
static __always_inline int deliver_to_peer(struct __sk_buff *skb, const struct packet *pkt,
					   const struct endpoint_info *peer, __u32 src_id,
					   __u32 dst_id)
{
	if (bpf_skb_store_bytes(skb, 0, peer->pod_mac, 6, 0) < 0 ||
	    bpf_skb_store_bytes(skb, 6, peer->host_mac, 6, 0) < 0)
		return drop(skb, pkt, DROP_INVALID_PACKET, DIR_EGRESS, src_id, dst_id, MATCH_NONE,
			    0);
	return bpf_redirect_peer(peer->host_ifindex, 0);
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
	/* One endpoint-map lookup: the peer, if local, also gives its identity. */
	struct endpoint_info *peer = local_endpoint(pkt.daddr);
	__u32 dst_id = peer ? peer->identity : ipcache_identity(pkt.daddr);
	int peer_here = peer && peer->host_ifindex;

	/* An ICMP error about a tracked connection (fragmentation needed, port
	 * unreachable...) passes without a policy lookup. */
	if (ct_related(&pkt, DIR_EGRESS)) {
		emit_event(skb, &pkt, endpoint_id, EVENT_TRACE, TRACE_FROM_LXC, DIR_EGRESS,
			   VERDICT_FORWARDED, CT_RELATED, src_id, dst_id, MATCH_NONE, 0);
		return peer_here ? deliver_to_peer(skb, &pkt, peer, src_id, dst_id) : TC_ACT_OK;
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
	/* Tracked only once both sides' policies let it through: a connection
	 * the peer's ingress refuses leaves no entry behind. */
	if (ct.state == CT_NEW) {
		__u8 ct_flags = redirect ? CT_F_PROXY_REDIRECT : 0;
		if (redirect == REDIRECT_DNS)
			ct_flags |= CT_F_DNS;
		if (ct_create(&pkt, DIR_EGRESS, pv.cookie, ct_flags, endpoint_id) < 0)
			return drop(skb, &pkt, DROP_CT_MAP_INSERT_FAILED, DIR_EGRESS, src_id,
				    dst_id, pv.match, pv.cookie);
	}
	if (redirect) {
		int verdict = to_proxy(skb, &pkt, src_id, dst_id, redirect);
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
			return to_proxy(skb, &pkt, src_id, dst_id, REDIRECT_HTTP);
		}
		if (verdict != TC_ACT_OK)
			return verdict;
		return deliver_to_peer(skb, &pkt, peer, src_id, dst_id);
	}
	return TC_ACT_OK;
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
