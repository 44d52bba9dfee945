// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * The program on this node's VXLAN device (one per node):
 *   from_overlay: tc ingress of the VXLAN device = packets other nodes'
 *                 pods sent to this node's pods, decapsulated. The VNI is
 *                 the sender's security identity (lib/tunnel.h); the
 *                 destination's ingress policy and conntrack run here, then
 *                 bpf_redirect_peer hands the packet into its namespace.
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
#include "lib/ingress.h"
#include "lib/tunnel.h"
#include "lib/lb.h"

/* A helper's result as tc's verdict: its drop reported at endpoint
 * `ep_id`, anything else as it is. */
static __always_inline int overlay_verdict(struct __sk_buff *skb, const struct packet *pkt,
					   int ret, __u32 ep_id, __u32 src_id, __u32 dst_id)
{
	if (is_drop(ret))
		return drop_notify(skb, pkt, ep_id, (__u8)-ret, DIR_INGRESS, src_id, dst_id,
				   MATCH_NONE, 0);
	return ret;
}

/* Hands the packet to this node's stack (a proxy's socket there). The
 * decapsulated frame is addressed to the sending node's gateway MAC, so
 * the stack would take it for another host's and drop it: it is this
 * host's. */
static __always_inline int to_stack(struct __sk_buff *skb, int verdict)
{
	if (verdict == TC_ACT_OK && bpf_skb_change_type(skb, 0 /* PACKET_HOST */) < 0)
		return DROP(DROP_INVALID_PACKET);
	return verdict;
}

/* Hands the packet into local endpoint `ep`'s namespace. */
static __always_inline int deliver(struct __sk_buff *skb, const struct packet *pkt,
				   const struct endpoint_info *ep, __u32 src_id)
{
	return overlay_verdict(skb, pkt, deliver_to_peer(skb, ep), ep->ep_id, src_id,
			       ep->identity);
}

SEC("classifier")
int from_overlay(struct __sk_buff *skb)
{
	struct packet pkt = {};
	struct policy_verdict pv = {};
	struct bpf_tunnel_key key = {};
	int kind = parse_packet(skb, &pkt);

	if (kind == PARSE_INVALID)
		return drop_notify(skb, &pkt, 0, DROP_INVALID_PACKET, DIR_INGRESS, 0, 0, MATCH_NONE,
				   0);
	/* Pods' IPv6 is not carried yet; ARP never crosses (each node answers
	 * for its own pods' gateway). */
	if (kind != PARSE_IPV4)
		return drop_notify(skb, &pkt, 0, DROP_UNSUPPORTED_L3, DIR_INGRESS, 0, 0, MATCH_NONE,
				   0);
	if (bpf_skb_get_tunnel_key(skb, &key, sizeof(key), 0) < 0)
		return drop_notify(skb, &pkt, 0, DROP_INVALID_PACKET, DIR_INGRESS, 0, 0, MATCH_NONE,
				   0);
	__u32 src_id = key.tunnel_id;
	struct endpoint_info *ep = local_endpoint(pkt.daddr);
	__u32 ep_id = ep ? ep->ep_id : 0;
	__u32 dst_id = ep ? ep->identity : ipcache_identity(pkt.daddr);

	/* Another node's host stack never tunnels (its traffic to pods is
	 * routed, and is `remote-node` by its address): a packet claiming to
	 * be `host` (or no one) through the tunnel is forged. */
	if (src_id == ID_HOST || src_id == ID_UNKNOWN)
		return drop_notify(skb, &pkt, ep_id, DROP_INVALID_IDENTITY, DIR_INGRESS, src_id,
				   dst_id, MATCH_NONE, 0);
	/* Tunnelled traffic is for this node's pods only. */
	if (!ep || !ep->host_ifindex)
		return drop_notify(skb, &pkt, 0, DROP_UNROUTABLE, DIR_INGRESS, src_id, dst_id,
				   MATCH_NONE, 0);
	int frag = frag_track(&pkt);
	if (frag != FRAG_OK)
		return drop_notify(skb, &pkt, ep_id,
				   frag == FRAG_NOT_FOUND ? DROP_FRAG_NOT_FOUND : DROP_INVALID_PACKET,
				   DIR_INGRESS, src_id, dst_id, MATCH_NONE, 0);
	if (ct_related(&pkt, DIR_INGRESS)) {
		if (is_drop(lb4_icmp_rev_nat(skb, &pkt)))
			return drop_notify(skb, &pkt, ep_id, DROP_INVALID_PACKET, DIR_INGRESS, src_id,
					   dst_id, MATCH_NONE, 0);
		emit_event(skb, &pkt, ep_id, EVENT_TRACE, TRACE_TO_LXC, DIR_INGRESS,
			   VERDICT_FORWARDED, CT_RELATED, src_id, dst_id, MATCH_NONE, 0);
		return deliver(skb, &pkt, ep, src_id);
	}
	int verdict = ingress_to_endpoint(skb, &pkt, ep_id, dst_id, ep->flags, src_id,
					  INGRESS_FROM_OVERLAY, &pv, 0);
	if (verdict == PROXIED)
		return overlay_verdict(skb, &pkt, to_stack(skb, to_proxy(skb, &pkt, REDIRECT_HTTP)),
				       ep_id, src_id, dst_id);
	if (verdict == TO_HOST_STACK) {
		skb->mark = proxy_mark_to;
		return overlay_verdict(skb, &pkt, to_stack(skb, TC_ACT_OK), ep_id, src_id, dst_id);
	}
	if (verdict == NEEDS_PROXY) {
		/* The destination's L7 rules: this node's HTTP proxy (TCP only). */
		if (pkt.protocol != IPPROTO_TCP)
			return drop_notify(skb, &pkt, ep_id, DROP_PROXY_UNSUPPORTED, DIR_INGRESS,
					   src_id, dst_id, pv.match, pv.cookie);
		if (ct_create(&pkt, DIR_EGRESS, pv.cookie, CT_F_PROXY_REDIRECT, ep_id) < 0)
			return drop_notify(skb, &pkt, ep_id, DROP_CT_MAP_INSERT_FAILED, DIR_INGRESS,
					   src_id, dst_id, pv.match, pv.cookie);
		emit_event(skb, &pkt, ep_id, EVENT_TRACE, TRACE_TO_PROXY, DIR_INGRESS,
			   VERDICT_FORWARDED, CT_NEW, src_id, dst_id, pv.match, pv.cookie);
		return overlay_verdict(skb, &pkt, to_stack(skb, to_proxy(skb, &pkt, REDIRECT_HTTP)),
				       ep_id, src_id, dst_id);
	}
	if (verdict != TC_ACT_OK)
		return verdict;
	return deliver(skb, &pkt, ep, src_id);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
