/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* The overlay between nodes (Cilium's `tunnel-protocol: vxlan`): a packet
 * for an endpoint on another node leaves through the node's VXLAN device
 * in external (collect_md) mode, to that node's address, with the VNI set
 * to the sender's security identity; the receiving node's overlay program
 * (overlay.bpf.c) takes the identity back from it. */
#ifndef FIBRIL_TUNNEL_H
#define FIBRIL_TUNNEL_H

#include <linux/pkt_cls.h>
#include <bpf/bpf_endian.h>

#include "drop.h"

/* The node's VXLAN device, set at load time; 0 = no overlay (one node). */
const volatile __u32 tunnel_ifindex = 0;

/* The VNI is 24 bits: identities above it cannot cross a tunnel. */
#define TUNNEL_ID_MAX 0xffffff

/* Encapsulates towards `tunnel_endpoint` (network byte order) with
 * `src_id` as the VNI and hands the packet to the VXLAN device. A redirect,
 * or a drop (`DROP(...)`). */
static __always_inline int encap_and_redirect(struct __sk_buff *skb, __u32 tunnel_endpoint,
					      __u32 src_id)
{
	struct bpf_tunnel_key key = {};

	if (src_id > TUNNEL_ID_MAX)
		return DROP(DROP_INVALID_IDENTITY);
	/* The helper takes the address and id in host byte order. */
	key.remote_ipv4 = bpf_ntohl(tunnel_endpoint);
	key.tunnel_id = src_id;
	key.tunnel_ttl = 64;
	if (bpf_skb_set_tunnel_key(skb, &key, sizeof(key), BPF_F_ZERO_CSUM_TX) < 0)
		return DROP(DROP_INVALID_PACKET);
	return bpf_redirect(tunnel_ifindex, 0);
}

#endif
