/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Connection tracking. Policy is evaluated for NEW packets only; packets of a
 * tracked connection (either way) pass without a policy lookup. */
#ifndef FIBRIL_CT_H
#define FIBRIL_CT_H

#include "maps.h"
#include "parse.h"

#define NSEC_PER_SEC 1000000000ULL

/* Timeouts: Cilium's defaults. Load-time settings like the others
 * (datapath::knobs), though the agent keeps these defaults today. */
const volatile __u64 ct_timeout_tcp_syn_s = 60;
const volatile __u64 ct_timeout_tcp_established_s = 8000;
const volatile __u64 ct_timeout_tcp_close_s = 10;
const volatile __u64 ct_timeout_any_s = 60;
/* Entries one endpoint's traffic may hold (set by the agent at load time;
 * 0: no budget). */
const volatile __u32 ct_endpoint_budget = 65536;

/* The owner of an entry that takes the place of a live one of its tuple
 * (closed and reopened): that one is counted in its endpoint's budget, so
 * this one is not charged again. Endpoint ids start at 1. An expired entry
 * is no longer counted (the census counts live ones), so one that replaces
 * it is charged: else an endpoint could revive its expired entries past
 * its budget. */
#define CT_OWNER_REPLACED 0

struct ct_result {
	__u8 state;              /* fibril_ct_state */
	__u8 report;             /* worth a trace event (monitor aggregation) */
	__u8 flags;              /* CT_F_* of the entry */
	__u8 replaces;           /* CT_NEW: its entry replaces a live one */
	__u16 rev_nat;           /* the entry's reverse-NAT index (lib/lb.h) */
	__u32 policy_cookie;
};

static __always_inline void ct_fill_key(struct ct_key *key, const struct packet *pkt,
					__u8 direction, int reverse)
{
	if (reverse) {
		key->saddr = pkt->daddr;
		key->daddr = pkt->saddr;
		key->sport = pkt->dport;
		key->dport = pkt->sport;
	} else {
		key->saddr = pkt->saddr;
		key->daddr = pkt->daddr;
		key->sport = pkt->sport;
		key->dport = pkt->dport;
	}
	key->protocol = pkt->protocol;
	key->direction = direction;
	key->pad = 0;
}

static __always_inline __u64 ct_timeout(const struct packet *pkt, struct ct_value *v)
{
	if (pkt->protocol != IPPROTO_TCP)
		return ct_timeout_any_s * NSEC_PER_SEC;
	if (v->closing)
		return ct_timeout_tcp_close_s * NSEC_PER_SEC;
	if ((v->tx_flags_seen & TCP_ACK) && (v->rx_flags_seen & TCP_ACK))
		return ct_timeout_tcp_established_s * NSEC_PER_SEC;
	return ct_timeout_tcp_syn_s * NSEC_PER_SEC;
}

/* Updates a found entry with this packet; decides whether it is worth an
 * event: the first sighting of SYN, FIN or RST in its direction. */
static __always_inline int ct_touch(struct ct_value *v, const struct packet *pkt, int from_opener,
				    __u64 now)
{
	__u8 interesting = pkt->tcp_flags & (TCP_SYN | TCP_FIN | TCP_RST);
	__u8 *seen = from_opener ? &v->tx_flags_seen : &v->rx_flags_seen;
	int report = (interesting & ~*seen) != 0;

	if ((pkt->tcp_flags & ~*seen) != 0)
		*seen |= pkt->tcp_flags;
	if ((pkt->tcp_flags & (TCP_FIN | TCP_RST)) && !v->closing)
		v->closing = 1;

	__u64 expires = now + ct_timeout(pkt, v);
	/* Avoid writing the shared cache line on every packet. */
	if (expires > v->expires_ns + NSEC_PER_SEC || v->closing)
		v->expires_ns = expires;
	if (report)
		v->last_report_ns = now;
	return report;
}

/* A SYN without ACK opens a connection. Met on an entry that is closing, or
 * whose sender has already completed a handshake on this tuple (sent an ACK;
 * a SYN is retransmitted only before that), it cannot belong to the tracked
 * connection: the tuple is reused by a new one, which must meet policy again
 * (Cilium's CT_REOPENED). Replies of the reused tuple then follow the new
 * entry, never the stale one's verdict or proxy flags. */
static __always_inline int ct_reopens(const struct packet *pkt, const struct ct_value *v,
				      int from_opener)
{
	if (pkt->protocol != IPPROTO_TCP || (pkt->tcp_flags & (TCP_SYN | TCP_ACK)) != TCP_SYN)
		return 0;
	__u8 seen = from_opener ? v->tx_flags_seen : v->rx_flags_seen;
	return v->closing || (seen & TCP_ACK);
}

/* Looks the packet up in the direction `dir` (as seen from the endpoint whose
 * program runs). Returns CT_NEW when no live entry exists, or when the packet
 * reopens the tuple (the stale entry is then deleted, so that a connection
 * the policy now refuses leaves nothing behind). */
FIBRIL_GLOBAL int ct_lookup(const struct packet *pkt, __u8 dir, struct ct_result *res)
{
	struct ct_key key;
	struct ct_value *v;
	__u64 now = bpf_ktime_get_ns();
	__u8 opposite = dir == DIR_INGRESS ? DIR_EGRESS : DIR_INGRESS;

	if (!pkt || !res)
		return 0;

	res->report = 0;
	res->flags = 0;
	res->replaces = 0;
	res->rev_nat = 0;
	res->policy_cookie = 0;

	ct_fill_key(&key, pkt, dir, 0);
	v = bpf_map_lookup_elem(&fibril_ct, &key);
	/* A reopened tuple's entry (a client reusing its ports within the
	 * close timeout opens most of its connections over one) is replaced,
	 * not added. Charging it again filled a busy client's budget in
	 * seconds at a few thousand connections/s, holding far fewer entries,
	 * and refused its connections until the census. */
	if (v && v->expires_ns > now && ct_reopens(pkt, v, 1)) {
		bpf_map_delete_elem(&fibril_ct, &key);
		res->replaces = 1;
		goto new;
	}
	if (v && v->expires_ns > now) {
		res->state = CT_ESTABLISHED;
		res->flags = v->flags;
		res->policy_cookie = v->policy_cookie;
		res->report = ct_touch(v, pkt, 1, now);
		return 0;
	}
	ct_fill_key(&key, pkt, opposite, 1);
	v = bpf_map_lookup_elem(&fibril_ct, &key);
	if (v && v->expires_ns > now && ct_reopens(pkt, v, 0)) {
		/* The peer's entry (charged to whoever opened that way): the
		 * new one is charged as any. */
		bpf_map_delete_elem(&fibril_ct, &key);
		goto new;
	}
	if (v && v->expires_ns > now) {
		res->state = CT_REPLY;
		res->flags = v->flags;
		res->rev_nat = v->rev_nat;
		res->policy_cookie = v->policy_cookie;
		res->report = ct_touch(v, pkt, 0, now);
		return 0;
	}
new:
	res->state = CT_NEW;
	res->report = 1;
	return 0;
}

/* An ICMP error about a tracked connection is related to it (Cilium's
 * CT_RELATED): path-MTU discovery and error reports must reach the
 * endpoint, in both directions, without a policy lookup. The error goes
 * back the way the packet it quotes came: at the endpoint whose program
 * runs in `dir`, that packet travelled the other way, so its connection is
 * the quoted tuple opened in the opposite direction, or (when it was a
 * reply) the reversed tuple opened in `dir`. Entries are only read. */
static __always_inline int ct_related(const struct packet *pkt, __u8 dir)
{
	/* The error is addressed to the quoted packet's sender. Checked
	 * first: every other packet leaves here. */
	if (!pkt->icmp_error || pkt->daddr != pkt->inner_saddr)
		return 0;
	struct ct_key key = {};
	__u8 opposite = dir == DIR_INGRESS ? DIR_EGRESS : DIR_INGRESS;
	__u64 now = bpf_ktime_get_ns();
	struct ct_value *v;

	key.protocol = pkt->inner_protocol;
	key.saddr = pkt->inner_saddr;
	key.daddr = pkt->inner_daddr;
	key.sport = pkt->inner_sport;
	key.dport = pkt->inner_dport;
	key.direction = opposite;
	v = bpf_map_lookup_elem(&fibril_ct, &key);
	if (v && v->expires_ns > now)
		return 1;
	key.saddr = pkt->inner_daddr;
	key.daddr = pkt->inner_saddr;
	key.sport = pkt->inner_dport;
	key.dport = pkt->inner_sport;
	key.direction = dir;
	v = bpf_map_lookup_elem(&fibril_ct, &key);
	return v && v->expires_ns > now;
}

/* Whom a new entry is charged to: `owner`, unless it replaces a live
 * entry of its tuple. */
static __always_inline __u32 ct_charge_to(const struct ct_result *ct, __u32 owner)
{
	return ct->replaces ? CT_OWNER_REPLACED : owner;
}

/* Takes one entry of `owner`'s budget. Returns 0, or -1 when the budget is
 * spent (counted as an overflow). */
static __always_inline int ct_budget_take(__u32 owner)
{
	struct ct_budget *b;

	if (!ct_endpoint_budget || owner == CT_OWNER_REPLACED)
		return 0;
	b = bpf_map_lookup_elem(&fibril_ct_budget, &owner);
	if (!b) {
		struct ct_budget fresh = {};
		bpf_map_update_elem(&fibril_ct_budget, &owner, &fresh, BPF_NOEXIST);
		b = bpf_map_lookup_elem(&fibril_ct_budget, &owner);
		if (!b)
			return 0; /* the budget map is full: the table's LRU decides */
	}
	if (b->entries >= ct_endpoint_budget) {
		__sync_fetch_and_add(&b->overflows, 1);
		return -1;
	}
	__sync_fetch_and_add(&b->entries, 1);
	return 0;
}

/* Creates the entry of a new connection, charged to endpoint `owner` (the
 * local endpoint that sent the packet; for traffic from the host stack, the
 * receiving one). Negative when it cannot: the owner's budget is spent or
 * the map refused it. */
FIBRIL_GLOBAL int ct_create(const struct packet *pkt, __u8 dir, __u32 cookie, __u8 flags,
			    __u32 owner)
{
	struct ct_key key;
	struct ct_value v = {};
	__u64 now = bpf_ktime_get_ns();

	if (!pkt)
		return -1;
	if (ct_budget_take(owner) < 0)
		return -1;

	ct_fill_key(&key, pkt, dir, 0);
	v.policy_cookie = cookie;
	v.flags = flags;
	/* The client's own entry of a translated connection: its replies
	 * are given back the service's address (lib/lb.h). */
	if (dir == DIR_EGRESS)
		v.rev_nat = pkt->rev_nat;
	v.tx_flags_seen = pkt->tcp_flags;
	v.packets = 1;
	v.bytes = pkt->len;
	v.last_report_ns = now;
	v.expires_ns = now + ct_timeout(pkt, &v);
	return bpf_map_update_elem(&fibril_ct, &key, &v, BPF_ANY);
}

/* Sets and clears flags of an existing connection (opened in `dir` by this
 * packet's sender). */
static __always_inline void ct_update_flags(const struct packet *pkt, __u8 dir, __u8 set,
					    __u8 clear)
{
	struct ct_key key;
	struct ct_value *v;

	ct_fill_key(&key, pkt, dir, 0);
	v = bpf_map_lookup_elem(&fibril_ct, &key);
	if (v)
		v->flags = (v->flags & ~clear) | set;
}

#endif
