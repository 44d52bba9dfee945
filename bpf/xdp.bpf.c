// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * The XDP prefilter (Cilium's prefilter, `cilium prefilter update
 * --cidr`): attached to the node's device, it drops IPv4 packets whose
 * source lies in a listed prefix before the kernel builds an skb for
 * them, which is what holds up under a flood. Every drop is counted
 * (per CPU, exact); drops are reported as flows at most once a
 * millisecond per CPU, so a flood cannot also flood the events ring.
 * Everything else passes untouched: the prefilter is no policy.
 */
#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/in.h>
#include <linux/ip.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "fibril_abi.h"
#include "lib/maps.h"
#include "lib/identity.h"

#define REPORT_INTERVAL_NS 1000000ULL

/* A dropped packet as a flow (world or its CIDR identity to whoever the
 * destination is), when this CPU has not reported one in the last
 * interval. */
static __always_inline void report_drop(struct xdp_md *ctx, struct prefilter_stats *st,
					const struct ethhdr *eth, const struct iphdr *ip,
					__u16 sport, __u16 dport, __u16 len)
{
	__u64 now = bpf_ktime_get_ns();
	if (now - st->last_event_ns < REPORT_INTERVAL_NS)
		return;
	st->last_event_ns = now;
	struct flow_event *e = bpf_ringbuf_reserve(&fibril_events, sizeof(*e), 0);
	if (!e) {
		__u32 zero = 0;
		__u64 *lost = bpf_map_lookup_elem(&fibril_events_lost, &zero);
		if (lost)
			*lost += 1;
		return;
	}
	__builtin_memset(e, 0, sizeof(*e));
	e->ts_ns = now;
	e->type = EVENT_DROP;
	e->subtype = DROP_POLICY_DENIED;
	e->direction = DIR_INGRESS;
	e->verdict = VERDICT_DROPPED;
	e->protocol = ip->protocol;
	e->ip_version = 4;
	e->src_identity = ipcache_identity(ip->saddr);
	e->dst_identity = identity_of(ip->daddr);
	e->ifindex = ctx->ingress_ifindex;
	e->saddr = ip->saddr;
	e->daddr = ip->daddr;
	e->sport = sport;
	e->dport = dport;
	e->pkt_len = len;
	__builtin_memcpy(e->smac, eth->h_source, 6);
	__builtin_memcpy(e->dmac, eth->h_dest, 6);
	bpf_ringbuf_submit(e, 0);
}

SEC("xdp")
int xdp_prefilter(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end || eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return XDP_PASS;

	__u32 zero = 0;
	struct prefilter_stats *st = bpf_map_lookup_elem(&fibril_prefilter_stats, &zero);
	if (!st)
		return XDP_PASS;
	struct prefilter_key key = { .prefixlen = 32 };
	__builtin_memcpy(key.addr, &ip->saddr, 4);
	if (!bpf_map_lookup_elem(&fibril_prefilter, &key)) {
		st->passed_packets += 1;
		return XDP_PASS;
	}
	__u16 len = (__u16)(data_end - data);
	st->dropped_packets += 1;
	st->dropped_bytes += len;

	__u16 sport = 0, dport = 0;
	/* Ports of an unfragmented (or first) TCP/UDP packet without IP
	 * options, for the report; ICMP: type << 8 | code. */
	if (ip->ihl == 5 && !(ip->frag_off & bpf_htons(0x1fff))) {
		void *l4 = (void *)(ip + 1);
		if (ip->protocol == IPPROTO_TCP || ip->protocol == IPPROTO_UDP) {
			__u16 *ports = l4;
			if ((void *)(ports + 2) <= data_end) {
				sport = bpf_ntohs(ports[0]);
				dport = bpf_ntohs(ports[1]);
			}
		} else if (ip->protocol == IPPROTO_ICMP) {
			__u8 *icmp = l4;
			if ((void *)(icmp + 2) <= data_end)
				dport = ((__u16)icmp[0] << 8) | icmp[1];
		}
	}
	report_drop(ctx, st, eth, ip, sport, dport, len);
	return XDP_DROP;
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
