/* SPDX-License-Identifier: Apache-2.0 */
/* Flow events to the agent through one ring buffer. Wake-ups are batched:
 * userspace is only woken once enough data is waiting (and polls on a short
 * timer for the rest), which keeps the per-packet cost low under load. */
#ifndef FIBRIL_EVENTS_H
#define FIBRIL_EVENTS_H

#include "maps.h"
#include "parse.h"

const volatile __u64 events_wakeup_bytes = 64 * sizeof(struct flow_event);

static __always_inline void count_lost_event(void)
{
	__u32 zero = 0;
	__u64 *lost = bpf_map_lookup_elem(&fibril_events_lost, &zero);
	if (lost)
		*lost += 1;
}

static __always_inline void emit_event(struct __sk_buff *skb, const struct packet *pkt, __u32 ep_id,
				       __u8 type, __u8 subtype, __u8 dir, __u8 verdict, __u8 ct_state,
				       __u32 src_id, __u32 dst_id, __u8 match, __u32 cookie)
{
	struct flow_event *e = bpf_ringbuf_reserve(&fibril_events, sizeof(*e), 0);
	if (!e) {
		count_lost_event();
		return;
	}
	e->ts_ns = bpf_ktime_get_ns();
	e->type = type;
	e->subtype = subtype;
	e->direction = dir;
	e->verdict = verdict;
	e->ct_state = ct_state;
	e->protocol = pkt->protocol;
	e->tcp_flags = pkt->tcp_flags;
	e->ip_version = pkt->saddr || pkt->daddr ? 4 : 0;
	e->ep_id = ep_id;
	e->src_identity = src_id;
	e->dst_identity = dst_id;
	e->ifindex = skb->ifindex;
	e->saddr = pkt->saddr;
	e->daddr = pkt->daddr;
	if (pkt->protocol == IPPROTO_ICMP) {
		e->sport = 0;
		e->dport = ((__u16)pkt->icmp_type << 8) | pkt->icmp_code;
	} else {
		e->sport = pkt->sport;
		e->dport = pkt->dport;
	}
	e->pkt_len = pkt->len;
	e->policy_match = match;
	e->pad0 = 0;
	e->policy_cookie = cookie;
	__builtin_memcpy(e->smac, pkt->smac, 6);
	__builtin_memcpy(e->dmac, pkt->dmac, 6);

	__u64 pending = bpf_ringbuf_query(&fibril_events, BPF_RB_AVAIL_DATA);
	bpf_ringbuf_submit(e, pending >= events_wakeup_bytes ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP);
}

#endif
