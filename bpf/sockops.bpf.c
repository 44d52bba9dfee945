// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Socket-level shortcut for connections through the L7 proxy.
 *
 * A proxied request crosses two TCP connections on this node (pod -> proxy,
 * proxy -> pod), so it pays the whole TCP/IP stack four times. Once both ends
 * of one of those connections are known sockets, their payload can go from
 * one socket's send call straight into the other's receive queue:
 *
 *   fibril_sockops (cgroup sock_ops): when a TCP connection is established,
 *     conntrack tells whether it is a leg of a proxied connection and which
 *     end this socket is. Pod-side ends (the client, the server) go into
 *     fibril_pod_socks, proxy-side ends (accepted, upstream) into
 *     fibril_proxy_socks.
 *   fibril_pod_msg / fibril_proxy_msg (sk_msg on those maps): a send looks
 *     up the other end (the reversed 4-tuple, in the other map) and moves
 *     the bytes into its receive queue (bpf_msg_redirect_hash, ingress).
 *
 * The handshake, FIN and RST still cross the stack and the datapath's
 * programs (policy was decided on the SYN), and a send whose other end is
 * not (yet) in a map takes the stack as before. A socket that sent anything
 * through the stack keeps doing so (fibril_sock_plain): its peer's receive
 * queue is read before the redirected bytes, and mixing both paths would
 * reorder the stream.
 */
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "fibril_abi.h"
#include "lib/maps.h"

#define AF_INET 2
#define IPPROTO_TCP 6

/* One end of a connection, seen from its socket. Ports in host order. */

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__type(key, struct sock_key);
	__type(value, __u32);
	__uint(max_entries, 65536);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fibril_pod_socks SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_SOCKHASH);
	__type(key, struct sock_key);
	__type(value, __u32);
	__uint(max_entries, 65536);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fibril_proxy_socks SEC(".maps");

/* Ends that sent through the stack: `plain_key` (fibril_abi.h) -> 1. */

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct plain_key);
	__type(value, __u8);
	__uint(max_entries, 65536);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fibril_sock_plain SEC(".maps");

/* Counters (per CPU): SOCKMAP_STAT_*. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, SOCKMAP_STAT_MAX);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fibril_sockmap_stats SEC(".maps");

static __always_inline void count(__u32 stat)
{
	__u64 *v = bpf_map_lookup_elem(&fibril_sockmap_stats, &stat);
	if (v)
		*v += 1;
}

/* Conntrack flags of the connection opened from saddr:sport to daddr:dport
 * (ports in host order, as conntrack keeps them), as the datapath tracked it
 * in `dir`; 0 when untracked. */
static __always_inline __u8 ct_flags(__u32 saddr, __u32 daddr, __u16 sport, __u16 dport, __u8 dir)
{
	struct ct_key key = {
		.saddr = saddr,
		.daddr = daddr,
		.sport = sport,
		.dport = dport,
		.protocol = IPPROTO_TCP,
		.direction = dir,
	};
	struct ct_value *v = bpf_map_lookup_elem(&fibril_ct, &key);
	return v ? v->flags : 0;
}

SEC("sockops")
int fibril_sockops(struct bpf_sock_ops *ops)
{
	int active = ops->op == BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB;

	if (!active && ops->op != BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB)
		return 1;
	if (ops->family != AF_INET)
		return 1;
	struct sock_key key = {
		.local_ip = ops->local_ip4,
		.remote_ip = ops->remote_ip4,
		.local_port = ops->local_port,
		.remote_port = bpf_ntohl(ops->remote_port),
	};
	/* The opener's view of the connection. */
	__u32 saddr = active ? key.local_ip : key.remote_ip;
	__u32 daddr = active ? key.remote_ip : key.local_ip;
	__u16 sport = active ? key.local_port : key.remote_port;
	__u16 dport = active ? key.remote_port : key.local_port;
	int proxy_side;

	/* pod -> proxy: the client (opener) is a pod, the accepting end the proxy. */
	__u8 redirected = ct_flags(saddr, daddr, sport, dport, DIR_EGRESS);
	if ((redirected & CT_F_PROXY_REDIRECT) && !(redirected & CT_F_DNS))
		proxy_side = !active;
	/* proxy -> pod: the upstream (opener) is the proxy, the accepting end the server. */
	else if (ct_flags(saddr, daddr, sport, dport, DIR_INGRESS) & CT_F_FROM_PROXY)
		proxy_side = active;
	else
		return 1;
	void *map = proxy_side ? (void *)&fibril_proxy_socks : (void *)&fibril_pod_socks;

	/* A new connection with a recycled 4-tuple starts accelerated. */
	struct plain_key plain = { .sock = key, .side = proxy_side };
	bpf_map_delete_elem(&fibril_sock_plain, &plain);
	if (bpf_sock_hash_update(ops, map, &key, BPF_ANY) == 0)
		count(SOCKMAP_STAT_SOCKETS);
	return 1;
}

static __always_inline int shortcut(struct sk_msg_md *msg, void *peers, __u32 side)
{
	struct plain_key plain = {
		.sock = {
			.local_ip = msg->local_ip4,
			.remote_ip = msg->remote_ip4,
			.local_port = msg->local_port,
			.remote_port = bpf_ntohl(msg->remote_port),
		},
		.side = side,
	};
	if (bpf_map_lookup_elem(&fibril_sock_plain, &plain))
		return SK_PASS;
	struct sock_key peer = {
		.local_ip = plain.sock.remote_ip,
		.remote_ip = plain.sock.local_ip,
		.local_port = plain.sock.remote_port,
		.remote_port = plain.sock.local_port,
	};
	if (bpf_msg_redirect_hash(msg, peers, &peer, BPF_F_INGRESS) == SK_PASS) {
		count(SOCKMAP_STAT_REDIRECTED);
		return SK_PASS;
	}
	/* The other end is not known (yet): the stack, from now on. */
	__u8 one = 1;
	bpf_map_update_elem(&fibril_sock_plain, &plain, &one, BPF_ANY);
	count(SOCKMAP_STAT_PLAIN);
	return SK_PASS;
}

SEC("sk_msg")
int fibril_pod_msg(struct sk_msg_md *msg)
{
	return shortcut(msg, &fibril_proxy_socks, 0);
}

SEC("sk_msg")
int fibril_proxy_msg(struct sk_msg_md *msg)
{
	return shortcut(msg, &fibril_pod_socks, 1);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
