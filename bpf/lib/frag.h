/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* IPv4 fragments, as Cilium tracks them: a datagram's first fragment
 * records its ports (keyed by source, destination, protocol and IP id);
 * the fragments after it, which carry no L4 header, take those ports and
 * so meet the same conntrack entry and policy as the first. A later
 * fragment whose first was not seen is dropped; a second first fragment
 * with other ports (an overlap meant to change them) is malformed. */
#ifndef FIBRIL_FRAG_H
#define FIBRIL_FRAG_H

#include "maps.h"
#include "parse.h"

/* Linux's IP reassembly timeout (net.ipv4.ipfrag_time). */
#define FRAG_TIMEOUT_NS (30ULL * 1000000000ULL)

enum frag_result {
	FRAG_OK = 0,
	FRAG_NOT_FOUND,
	FRAG_CONFLICT,
};

static __always_inline int frag_track(struct packet *pkt)
{
	struct frag_key key = {};
	struct frag_ports *seen;

	if (pkt->frag == FRAG_NONE)
		return FRAG_OK;
	key.saddr = pkt->saddr;
	key.daddr = pkt->daddr;
	key.id = pkt->ip_id;
	key.protocol = pkt->protocol;
	__u64 now = bpf_ktime_get_ns();
	/* An IP id is reused once the datagram that had it is long gone:
	 * an expired entry counts as none. */
	seen = bpf_map_lookup_elem(&fibril_frags, &key);
	if (pkt->frag == FRAG_FIRST) {
		struct frag_ports ports = {
			.sport = pkt->sport,
			.dport = pkt->dport,
			.policy_port_be = pkt->policy_port_be,
			.expires_ns = now + FRAG_TIMEOUT_NS,
		};
		if (seen && seen->expires_ns > now) {
			if (seen->sport != ports.sport || seen->dport != ports.dport)
				return FRAG_CONFLICT;
			return FRAG_OK;
		}
		bpf_map_update_elem(&fibril_frags, &key, &ports, BPF_ANY);
		return FRAG_OK;
	}
	if (!seen)
		return FRAG_NOT_FOUND;
	if (seen->expires_ns <= now)
		return FRAG_NOT_FOUND;
	pkt->sport = seen->sport;
	pkt->dport = seen->dport;
	pkt->policy_port_be = seen->policy_port_be;
	return FRAG_OK;
}

#endif
