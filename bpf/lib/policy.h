/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Policy lookup, Cilium's two-lookup algorithm: one for the peer identity,
 * one for "any identity"; a deny from either wins; otherwise the longer
 * protocol/port prefix wins, and the identity-specific entry on a tie. */
#ifndef FIBRIL_POLICY_H
#define FIBRIL_POLICY_H

#include "events.h"
#include "maps.h"

struct policy_verdict {
	__u8 allowed;
	__u8 drop_reason;
	__u8 match;      /* fibril_policy_match */
	__u8 flags;      /* POLICY_F_* of the deciding entry */
	__u32 cookie;
};

static __always_inline __u8 match_type(int l3, __u8 prefix)
{
	if (l3)
		return prefix == 0 ? MATCH_L3_ONLY : prefix == 8 ? MATCH_L3_PROTO : MATCH_L3_L4;
	return prefix == 0 ? MATCH_ALL : prefix == 8 ? MATCH_PROTO_ONLY : MATCH_L4_ONLY;
}

/* The connection a policy lookup decides. */
struct policy_query {
	__u32 ep_id;
	__u32 peer;
	__u16 port_be;
	__u8 dir;
	__u8 protocol;
};

FIBRIL_GLOBAL int policy_lookup_query(const struct policy_query *q, struct policy_verdict *out)
{
	if (!q || !out)
		return 0;
	struct policy_key key = {
		.prefixlen = POLICY_FULL_PREFIX_BITS,
		.ep_id = bpf_htonl(q->ep_id),
		.identity = bpf_htonl(q->peer),
		.direction = q->dir,
		.protocol = q->protocol,
		.dport = q->port_be,
	};
	struct policy_value *l3, *l4, *win;
	int l3_wins;

	l3 = bpf_map_lookup_elem(&fibril_policy, &key);
	if (l3 && (l3->flags & POLICY_F_DENY)) {
		out->allowed = 0;
		out->drop_reason = DROP_POLICY_DENY;
		out->match = match_type(1, l3->prefix);
		out->flags = l3->flags;
		out->cookie = l3->cookie;
		return 0;
	}
	key.identity = 0;
	l4 = bpf_map_lookup_elem(&fibril_policy, &key);
	if (l4 && (l4->flags & POLICY_F_DENY)) {
		out->allowed = 0;
		out->drop_reason = DROP_POLICY_DENY;
		out->match = match_type(0, l4->prefix);
		out->flags = l4->flags;
		out->cookie = l4->cookie;
		return 0;
	}
	if (!l3 && !l4) {
		out->allowed = 0;
		out->drop_reason = DROP_POLICY_DENIED;
		out->match = MATCH_NONE;
		out->flags = 0;
		out->cookie = 0;
		return 0;
	}
	l3_wins = l3 && (!l4 || l3->prefix >= l4->prefix);
	win = l3_wins ? l3 : l4;
	out->allowed = 1;
	out->drop_reason = 0;
	out->match = match_type(l3_wins, win->prefix);
	out->flags = win->flags;
	out->cookie = win->cookie;
	return 0;
}

static __always_inline void policy_lookup(__u32 ep_id, __u32 peer, __u8 dir, __u8 protocol,
					  __u16 port_be, struct policy_verdict *out)
{
	struct policy_query q = {
		.ep_id = ep_id,
		.peer = peer,
		.port_be = port_be,
		.dir = dir,
		.protocol = protocol,
	};
	policy_lookup_query(&q, out);
}

/* Audit mode: a policy drop that becomes a forward reported as AUDIT. Either
 * the deciding deny comes from an audit-mode policy, or nothing matched and
 * the endpoint is enforced in this direction by audit-mode policies only,
 * or the endpoint is the host in audit mode. */
static __always_inline int policy_audited(const struct policy_verdict *pv, __u32 ep_flags,
					  __u32 audit_flag)
{
	/* The host firewall in audit mode: nothing it would drop is. */
	if (ep_flags & EP_F_AUDIT_ALL)
		return 1;
	if (pv->drop_reason == DROP_POLICY_DENY)
		return (pv->flags & POLICY_F_AUDIT) != 0;
	return (ep_flags & audit_flag) != 0;
}

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

#endif
