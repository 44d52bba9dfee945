/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Drops, one way: a helper that refuses a packet returns its reason
 * negated (`DROP(reason)`, Cilium's convention: tc verdicts are >= -1, the
 * helpers' own results, `enum helper_result`, lie between), and the entry
 * point turns it into the drop event and TC_ACT_SHOT with
 * `drop_notify`, which every drop goes through. */
#ifndef FIBRIL_DROP_H
#define FIBRIL_DROP_H

#include <linux/pkt_cls.h>

#include "events.h"

/* The smallest drop reason (DROP_* of fibril_abi.h are 130 and up). */
#define DROP_REASON_MIN 130

#define DROP(reason) (-(int)(reason))

static __always_inline int is_drop(int ret)
{
	return ret <= -DROP_REASON_MIN;
}

/* What the helpers return beside tc's verdicts and drops: never a
 * verdict, always handled by the caller. */
enum helper_result {
	NEEDS_PROXY = -100,   /* the connection's L7 rules need the proxy */
	NO_DNS_PROXY = -101,  /* the DNS proxy is not there */
	TO_HOST_STACK = -102, /* a reply for a socket of this node's stack (a proxy's) */
	PROXIED = -103,       /* a connection this node's proxy took over from the overlay */
};

/* Reports the drop of `pkt` at endpoint `ep_id` and drops it. */
static __always_inline int drop_notify(struct __sk_buff *skb, const struct packet *pkt, __u32 ep_id,
				       __u8 reason, __u8 dir, __u32 src_id, __u32 dst_id,
				       __u8 match, __u32 cookie)
{
	emit_event(skb, pkt, ep_id, EVENT_DROP, reason, dir, VERDICT_DROPPED, CT_NEW, src_id,
		   dst_id, match, cookie);
	return TC_ACT_SHOT;
}

#endif
