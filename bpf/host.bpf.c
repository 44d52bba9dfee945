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
 * With the host firewall off (fibril_host all zero) both pass everything
 * after one array lookup.
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

static __always_inline int host_drop(struct __sk_buff *skb, const struct packet *pkt, __u8 reason,
				     __u8 dir, __u32 src_id, __u32 dst_id)
{
	return drop_notify(skb, pkt, HOST_ENDPOINT_ID, reason, dir, src_id, dst_id, MATCH_NONE, 0);
}

/* One packet of the node's own traffic in `dir` (the host endpoint's
 * view: ingress = to the node): conntrack, the host's policy for new
 * connections, the trace at `point`. */
static __always_inline int host_traffic(struct __sk_buff *skb, struct packet *pkt, __u8 dir,
					__u32 src_id, __u32 dst_id, __u32 flags, __u8 point)
{
	struct policy_verdict pv = {};
	struct ct_result ct;

	int frag = frag_track(pkt);
	if (frag != FRAG_OK)
		return host_drop(skb, pkt,
				 frag == FRAG_NOT_FOUND ? DROP_FRAG_NOT_FOUND : DROP_INVALID_PACKET,
				 dir, src_id, dst_id);
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
		if (ct_create(pkt, dir, pv.cookie, 0, HOST_ENDPOINT_ID) < 0)
			return drop_notify(skb, pkt, HOST_ENDPOINT_ID, DROP_CT_MAP_INSERT_FAILED, dir,
					   src_id, dst_id, pv.match, pv.cookie);
		ct.policy_cookie = pv.cookie;
	}
	if (ct.report)
		emit_event(skb, pkt, HOST_ENDPOINT_ID, EVENT_TRACE, point, dir, VERDICT_FORWARDED,
			   ct.state, src_id, dst_id, pv.match, ct.policy_cookie);
	return TC_ACT_OK;
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

	if (!(flags & EP_F_HOST_FIREWALL))
		return TC_ACT_OK;
	int kind = parse_packet(skb, &pkt);
	if (kind != PARSE_IPV4)
		return host_non_ipv4(skb, &pkt, kind, DIR_INGRESS, flags);
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

	if (!(flags & EP_F_HOST_FIREWALL))
		return TC_ACT_OK;
	int kind = parse_packet(skb, &pkt);
	if (kind != PARSE_IPV4)
		return host_non_ipv4(skb, &pkt, kind, DIR_EGRESS, flags);
	/* Only what the node itself sends: pods' packets were theirs to
	 * enforce (no masquerading here: they keep their addresses). */
	if (!is_host_address(pkt.saddr))
		return TC_ACT_OK;
	return host_traffic(skb, &pkt, DIR_EGRESS, ID_HOST, identity_of(pkt.daddr), flags,
			    TRACE_TO_NETWORK);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
