/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* The host firewall: the node itself as an endpoint (HOST_ENDPOINT_ID,
 * identity host) whose policy, from host policies (nodeSelector), is
 * enforced on every connection the node's own addresses open or accept:
 * on the node's devices (host.bpf.c), from this node's pods to the node
 * (from_container) and from the node to its pods (ingress.h). Off (flags
 * all zero) until the agent runs with the host firewall. */
#ifndef FIBRIL_HOST_H
#define FIBRIL_HOST_H

#include <linux/pkt_cls.h>

#include "drop.h"
#include "maps.h"
#include "policy.h"

/* The host endpoint's EP_F_* flags (0: no host firewall). */
static __always_inline __u32 host_flags(void)
{
	__u32 zero = 0;
	struct host_endpoint *h = bpf_map_lookup_elem(&fibril_host, &zero);
	return h ? h->flags : 0;
}

/* Whether `addr` is one of this node's own addresses. */
static __always_inline int is_host_address(__u32 addr)
{
	struct ipcache_value *v = ipcache_lookup(addr);
	return v && v->identity == ID_HOST;
}

/* The host's policy for a connection opening in `dir` with `peer_id`:
 * TC_ACT_OK (forwarded, or audited) or TC_ACT_SHOT with the drop
 * reported. Does nothing while that direction is not enforced. The
 * policy-verdict event names the connection's two ends as they are. */
static __always_inline int host_policy(struct __sk_buff *skb, const struct packet *pkt, __u8 dir,
				       __u32 src_id, __u32 dst_id, __u32 flags,
				       struct policy_verdict *pv)
{
	__u32 enforced = dir == DIR_INGRESS ? EP_F_INGRESS_ENFORCED : EP_F_EGRESS_ENFORCED;
	__u32 audit = dir == DIR_INGRESS ? EP_F_INGRESS_AUDIT : EP_F_EGRESS_AUDIT;
	__u32 peer = dir == DIR_INGRESS ? src_id : dst_id;

	if (!(flags & enforced))
		return TC_ACT_OK;
	policy_lookup(HOST_ENDPOINT_ID, peer, dir, pkt->protocol, pkt->policy_port_be, pv);
	__u8 verdict = policy_verdict_event(skb, pkt, HOST_ENDPOINT_ID, dir, flags, audit, src_id,
					    dst_id, pv);
	if (verdict == VERDICT_DROPPED)
		return drop_notify(skb, pkt, HOST_ENDPOINT_ID, pv->drop_reason, dir, src_id, dst_id,
				   pv->match, pv->cookie);
	return TC_ACT_OK;
}

#endif
