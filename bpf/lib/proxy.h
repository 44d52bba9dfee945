/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Handing connections to the agent's proxies: the HTTP proxy process and
 * the DNS proxy, both listening on 127.0.0.1. */
#ifndef FIBRIL_PROXY_H
#define FIBRIL_PROXY_H

#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>

#include "drop.h"
#include "parse.h"

/* The proxies, set at load time: the HTTP listener's port, the mark that
 * routes a packet to the local stack (a policy-routing rule of the
 * agent's), and the mark on the HTTP proxy's own upstream sockets.
 * 0 = no proxy. */
const volatile __u16 proxy_port = 0;
const volatile __u16 dns_proxy_port = 0; /* UDP and TCP, on 127.0.0.1 */
const volatile __u32 proxy_mark_to = 0;
const volatile __u32 proxy_mark_from = 0;

enum redirect_kind {
	REDIRECT_NONE,
	REDIRECT_HTTP,
	REDIRECT_DNS,
};

/* Hands a packet to a proxy in the host stack: the mark routes it to the
 * local stack (whatever its destination address), and a connection's first
 * packet (every datagram, for UDP) is assigned to the proxy's socket, which
 * sees the original destination as its local address (transparent to the
 * client). Later TCP packets find the accepted socket by the usual lookup.
 * Returns TC_ACT_OK, a drop (`DROP(...)`), or NO_DNS_PROXY when the DNS
 * proxy is not there (the agent restarts): DNS then goes to the resolver
 * directly, so that pods keep resolving; the HTTP proxy missing fails
 * closed. */
static __always_inline int to_proxy(struct __sk_buff *skb, const struct packet *pkt, int kind)
{
	struct bpf_sock_tuple tuple = {};
	struct bpf_sock *sk;
	int first = pkt->protocol == IPPROTO_UDP ||
		    ((pkt->tcp_flags & TCP_SYN) && !(pkt->tcp_flags & TCP_ACK));

	if (!first) {
		skb->mark = proxy_mark_to;
		return TC_ACT_OK;
	}
	tuple.ipv4.daddr = bpf_htonl(0x7f000001);
	tuple.ipv4.dport = bpf_htons(kind == REDIRECT_DNS ? dns_proxy_port : proxy_port);
	if (pkt->protocol == IPPROTO_UDP)
		sk = bpf_sk_lookup_udp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
	else
		sk = bpf_skc_lookup_tcp(skb, &tuple, sizeof(tuple.ipv4), BPF_F_CURRENT_NETNS, 0);
	if (!sk)
		return kind == REDIRECT_DNS ? NO_DNS_PROXY : DROP(DROP_SOCKET_LOOKUP_FAILED);
	skb->mark = proxy_mark_to;
	long err = bpf_sk_assign(skb, sk, 0);
	bpf_sk_release(sk);
	return err ? DROP(DROP_SOCKET_ASSIGN_FAILED) : TC_ACT_OK;
}

#endif
