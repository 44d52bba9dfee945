/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Packet parsing: Ethernet, IPv4 and the first bytes of TCP/UDP/ICMP. */
#ifndef FIBRIL_PARSE_H
#define FIBRIL_PARSE_H

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/in.h>
#include <bpf/bpf_endian.h>
#include <bpf/bpf_helpers.h>

#define TCP_FIN 0x01
#define TCP_SYN 0x02
#define TCP_RST 0x04
#define TCP_PSH 0x08
#define TCP_ACK 0x10
#define TCP_URG 0x20

enum frag_kind {
	FRAG_NONE = 0,
	FRAG_FIRST,  /* offset 0, more to come: carries the L4 header */
	FRAG_LATER,  /* no L4 header: ports from the first (lib/frag.h) */
};

enum parse_result {
	PARSE_IPV4 = 0,
	PARSE_ARP,
	PARSE_IPV6,
	PARSE_OTHER_L3,
	PARSE_INVALID,
};

struct packet {
	__u32 saddr;   /* network byte order */
	__u32 daddr;
	__u16 sport;   /* host byte order */
	__u16 dport;   /* host byte order */
	__u16 policy_port_be; /* the port policy is keyed on, network order */
	__u16 len;
	__u8 protocol;
	__u8 tcp_flags;
	__u8 icmp_type;
	__u8 icmp_code;
	__u8 smac[6];
	__u8 dmac[6];
	/* An ICMP error (destination unreachable, fragmentation needed, time
	 * exceeded, parameter problem): the tuple of the packet it is about,
	 * as that packet travelled (`icmp_error` set). */
	__u8 frag;       /* FRAG_NONE, FRAG_FIRST, FRAG_LATER */
	__u16 ip_id;     /* network byte order, for fragments */
	__u8 icmp_error;
	__u8 inner_protocol;
	__u16 inner_sport; /* host byte order */
	__u16 inner_dport;
	__u32 inner_saddr; /* network byte order */
	__u32 inner_daddr;
	__u16 l4_off;      /* the L4 header's offset in the frame */
	/* Service translation (lib/lb.h): the service address the packet
	 * was sent to or a reply is given back from (SVC_SIDE_*), and the
	 * reverse-NAT index the client's connection entry keeps. */
	__u8 svc_side;
	__u8 pad1;
	__u32 svc_addr;    /* network byte order */
	__u16 svc_port;    /* host byte order */
	__u16 rev_nat;
};

/* ICMP errors carry the IP header and the first 8 bytes of the packet they
 * are about. Reads the tuple of that packet (its IP header without options
 * only) when it lies inside the outer packet's total length. */
static __always_inline void parse_icmp_error(struct packet *pkt, __u8 *icmp, __u32 l4_len,
					     void *data_end)
{
	__u8 *inner = icmp + 8;
	if (l4_len < 8 + 20 + 8 || (void *)(inner + 28) > data_end)
		return;
	if (inner[0] != 0x45) /* IPv4, no options */
		return;
	__u8 *l4 = inner + 20;
	pkt->inner_protocol = inner[9];
	__builtin_memcpy(&pkt->inner_saddr, inner + 12, 4);
	__builtin_memcpy(&pkt->inner_daddr, inner + 16, 4);
	if (pkt->inner_protocol == IPPROTO_ICMP) {
		/* An error about an echo: the id is the tuple's port. */
		__u16 id = ((__u16)l4[4] << 8) | l4[5];
		pkt->inner_sport = id;
		pkt->inner_dport = id;
	} else {
		pkt->inner_sport = ((__u16)l4[0] << 8) | l4[1];
		pkt->inner_dport = ((__u16)l4[2] << 8) | l4[3];
	}
	pkt->icmp_error = 1;
}

static __always_inline int parse_packet(struct __sk_buff *skb, struct packet *pkt)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	struct ethhdr *eth = data;

	if ((void *)(eth + 1) > data_end)
		return PARSE_INVALID;
	__builtin_memcpy(pkt->smac, eth->h_source, 6);
	__builtin_memcpy(pkt->dmac, eth->h_dest, 6);
	pkt->len = skb->len > 0xffff ? 0xffff : skb->len;

	if (eth->h_proto == bpf_htons(ETH_P_ARP))
		return PARSE_ARP;
	if (eth->h_proto == bpf_htons(ETH_P_IPV6))
		return PARSE_IPV6;
	if (eth->h_proto != bpf_htons(ETH_P_IP))
		return PARSE_OTHER_L3;

	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > data_end)
		return PARSE_INVALID;
	if (ip->version != 4 || ip->ihl < 5)
		return PARSE_INVALID;
	__u32 ihl = ip->ihl * 4;
	void *l4 = (void *)ip + ihl;
	/* Every L4 read is bounded by the IP header's total length, not by
	 * the end of the frame: bytes past it are padding, never a header.
	 * A total length the frame cannot hold (or shorter than the IP
	 * header) is a malformed packet. IPv4 BIG TCP (GSO packets over 64 KiB)
	 * sets it to 0: the frame's length stands in. */
	__u32 frame_ip_len = skb->len > ETH_HLEN ? skb->len - ETH_HLEN : 0;
	__u32 tot_len = bpf_ntohs(ip->tot_len);
	if (tot_len == 0 && frame_ip_len > 0xffff)
		tot_len = frame_ip_len;
	if (tot_len < ihl || tot_len > frame_ip_len)
		return PARSE_INVALID;
	__u32 l4_len = tot_len - ihl;

	pkt->saddr = ip->saddr;
	pkt->daddr = ip->daddr;
	pkt->protocol = ip->protocol;
	pkt->sport = 0;
	pkt->dport = 0;
	pkt->policy_port_be = 0;
	pkt->tcp_flags = 0;
	pkt->icmp_type = 0;
	pkt->icmp_code = 0;
	pkt->icmp_error = 0;
	pkt->l4_off = ETH_HLEN + ihl;

	/* Fragments: the first carries the L4 header (it must hold it whole
	 * enough for the fields read below); the later ones get the ports it
	 * had (lib/frag.h). A TCP fragment at offset 8 could rewrite the
	 * flags of the first (RFC 1858): refused. */
	__u16 frag_off = bpf_ntohs(ip->frag_off);
	pkt->ip_id = ip->id;
	pkt->frag = FRAG_NONE;
	if (frag_off & 0x1fff) {
		if (ip->protocol == IPPROTO_TCP && (frag_off & 0x1fff) == 1)
			return PARSE_INVALID;
		pkt->frag = FRAG_LATER;
		return PARSE_IPV4;
	}
	if (frag_off & 0x2000) /* more fragments */
		pkt->frag = FRAG_FIRST;

	switch (ip->protocol) {
	case IPPROTO_TCP: {
		__u8 *tcp = l4;
		if (l4_len < 14 || (void *)(tcp + 14) > data_end)
			return PARSE_INVALID;
		pkt->sport = ((__u16)tcp[0] << 8) | tcp[1];
		pkt->dport = ((__u16)tcp[2] << 8) | tcp[3];
		pkt->tcp_flags = tcp[13];
		pkt->policy_port_be = bpf_htons(pkt->dport);
		break;
	}
	case IPPROTO_UDP:
	case IPPROTO_SCTP: {
		__u8 *udp = l4;
		if (l4_len < 4 || (void *)(udp + 4) > data_end)
			return PARSE_INVALID;
		pkt->sport = ((__u16)udp[0] << 8) | udp[1];
		pkt->dport = ((__u16)udp[2] << 8) | udp[3];
		pkt->policy_port_be = bpf_htons(pkt->dport);
		break;
	}
	case IPPROTO_ICMP: {
		__u8 *icmp = l4;
		if (l4_len < 8 || (void *)(icmp + 8) > data_end)
			return PARSE_INVALID;
		/* Echo id in both port slots so that request and reply share a
		 * tuple; the type and code travel in the event. */
		__u16 id = ((__u16)icmp[4] << 8) | icmp[5];
		__u8 type = icmp[0];
		if (type == 8 || type == 0) {
			pkt->sport = id;
			pkt->dport = id;
		}
		/* ICMP policy is keyed on the type in the port slot, as Cilium. */
		pkt->policy_port_be = bpf_htons((__u16)type);
		pkt->icmp_type = type;
		pkt->icmp_code = icmp[1];
		if (type == 3 || type == 11 || type == 12)
			parse_icmp_error(pkt, icmp, l4_len, data_end);
		break;
	}
	default:
		break;
	}
	return PARSE_IPV4;
}

#endif
