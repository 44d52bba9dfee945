/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
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

/* A record in the ring for an event, or NULL (then counted as lost). */
static __always_inline struct flow_event *event_reserve(void)
{
	struct flow_event *e = bpf_ringbuf_reserve(&fibril_events, sizeof(*e), 0);
	if (!e)
		count_lost_event();
	return e;
}

/* A record's room in the ring: its header and the event, 8-aligned. */
#define EVENT_RECORD_BYTES ((BPF_RINGBUF_HDR_SZ + sizeof(struct flow_event) + 7) & ~7)

/* Hands a filled record to the agent, waking it when the waiting data
 * reaches the threshold with this record. Not again while it stays above:
 * a wake-up is an interrupt on the agent's CPU, and under load one per
 * event (until the agent has drained the ring) cost more than the event
 * itself. A crossing missed by racing CPUs waits for the agent's timer. */
static __always_inline void event_submit(struct flow_event *e)
{
	__u64 pending = bpf_ringbuf_query(&fibril_events, BPF_RB_AVAIL_DATA);
	int crossed = pending >= events_wakeup_bytes &&
		      pending < events_wakeup_bytes + EVENT_RECORD_BYTES;
	bpf_ringbuf_submit(e, crossed ? BPF_RB_FORCE_WAKEUP : BPF_RB_NO_WAKEUP);
}

/* What an event says beyond the packet itself. */
struct event_meta {
	__u32 ep_id;
	__u32 src_id;
	__u32 dst_id;
	__u32 cookie;
	__u8 type;
	__u8 subtype;
	__u8 dir;
	__u8 verdict;
	__u8 ct_state;
	__u8 match;
	__u8 pad[2];
};

FIBRIL_GLOBAL int emit_event_meta(struct __sk_buff *skb, const struct packet *pkt,
				  const struct event_meta *m)
{
	if (!skb || !pkt || !m)
		return 0;
	struct flow_event *e = event_reserve();
	if (!e)
		return 0;
	e->ts_ns = bpf_ktime_get_ns();
	e->type = m->type;
	e->subtype = m->subtype;
	e->direction = m->dir;
	e->verdict = m->verdict;
	e->ct_state = m->ct_state;
	e->protocol = pkt->protocol;
	e->tcp_flags = pkt->tcp_flags;
	e->ip_version = pkt->saddr || pkt->daddr ? 4 : 0;
	e->ep_id = m->ep_id;
	e->src_identity = m->src_id;
	e->dst_identity = m->dst_id;
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
	e->policy_match = m->match;
	e->pad0 = 0;
	e->policy_cookie = m->cookie;
	__builtin_memcpy(e->smac, pkt->smac, 6);
	__builtin_memcpy(e->dmac, pkt->dmac, 6);
	e->svc_addr = pkt->svc_addr;
	e->svc_port = pkt->svc_port;
	e->svc_side = pkt->svc_side;
	e->pad1 = 0;
	e->sock_cookie = 0;
	e->cgroup_id = 0;
	event_submit(e);
	return 0;
}

static __always_inline void emit_event(struct __sk_buff *skb, const struct packet *pkt, __u32 ep_id,
				       __u8 type, __u8 subtype, __u8 dir, __u8 verdict, __u8 ct_state,
				       __u32 src_id, __u32 dst_id, __u8 match, __u32 cookie)
{
	struct event_meta m = {
		.ep_id = ep_id,
		.src_id = src_id,
		.dst_id = dst_id,
		.cookie = cookie,
		.type = type,
		.subtype = subtype,
		.dir = dir,
		.verdict = verdict,
		.ct_state = ct_state,
		.match = match,
	};
	emit_event_meta(skb, pkt, &m);
}

#endif
