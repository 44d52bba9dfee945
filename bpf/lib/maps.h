/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Every map of the datapath. All are pinned by name so that they outlive an
 * agent restart: established connections, policy and identities stay in the
 * kernel while the agent is away. */
#ifndef FIBRIL_MAPS_H
#define FIBRIL_MAPS_H

#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include "fibril_abi.h"

/* A function the verifier checks once, on its own, rather than at every
 * call site of every program (BPF's global functions): what keeps loading
 * an endpoint's programs fast. At most five arguments, a scalar result;
 * pointer arguments may be NULL as far as the verifier knows. */
#define FIBRIL_GLOBAL __attribute__((noinline))

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct ipcache_key);
	__type(value, struct ipcache_value);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fibril_ipcache SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct endpoint_key);
	__type(value, struct endpoint_info);
	__uint(max_entries, 65535);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fibril_endpoints SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct policy_key);
	__type(value, struct policy_value);
	__uint(max_entries, 262144);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fibril_policy SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct ct_key);
	__type(value, struct ct_value);
	__uint(max_entries, 262144);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fibril_ct SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32); /* endpoint id */
	__type(value, struct ct_budget);
	__uint(max_entries, 65536);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fibril_ct_budget SEC(".maps");

/* Services (lib/lb.h): frontends and their backend slots, backends by
 * id, reverse-NAT entries for replies, ClientIP affinity. */
struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, struct lb_service_key);
	__type(value, struct lb_service);
	__uint(max_entries, 131072);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fibril_lb_services SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u32); /* backend id */
	__type(value, struct lb_backend);
	__uint(max_entries, 65536);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fibril_lb_backends SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__type(key, __u16); /* reverse-NAT index */
	__type(value, struct lb_reverse_nat);
	__uint(max_entries, 65535);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fibril_lb_reverse_nat SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct lb_affinity_key);
	__type(value, struct lb_affinity);
	__uint(max_entries, 65536);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fibril_lb_affinity SEC(".maps");

/* Maglev (lib/lb.h): each external frontend's lookup table by its
 * reverse-NAT index: an array of `lb_maglev_table_size` backend ids
 * (BPF_F_INNER_MAP: the size is the agent's setting, not this one). */
struct lb_maglev_inner {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, __u32);
	__uint(max_entries, LB_MAGLEV_DEFAULT_SIZE);
	__uint(map_flags, BPF_F_INNER_MAP);
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH_OF_MAPS);
	__type(key, __u32); /* reverse-NAT index */
	__uint(max_entries, 4096);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
	__array(values, struct lb_maglev_inner);
} fibril_lb_maglev SEC(".maps");

/* Socket load balancing (sock.bpf.c): what a translated socket's peer is
 * shown as. */
struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct lb_sock_key);
	__type(value, struct lb_reverse_nat);
	__uint(max_entries, 65536);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fibril_lb_sock_revnat SEC(".maps");

/* XDP prefilter (xdp.bpf.c): source prefixes dropped before the stack,
 * and its per-CPU counters. */
struct {
	__uint(type, BPF_MAP_TYPE_LPM_TRIE);
	__type(key, struct prefilter_key);
	__type(value, struct prefilter_value);
	__uint(max_entries, 65536);
	__uint(map_flags, BPF_F_NO_PREALLOC);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fibril_prefilter SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, struct prefilter_stats);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fibril_prefilter_stats SEC(".maps");

/* The host endpoint (lib/host.h): its flags, written by the agent. */
struct {
	__uint(type, BPF_MAP_TYPE_ARRAY);
	__type(key, __u32);
	__type(value, struct host_endpoint);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fibril_host SEC(".maps");

/* IPv4 fragments: the datagram's ports, from its first fragment, for the
 * fragments after it (they carry no L4 header). Kernel-only (the agent
 * never reads it), so its structs live in lib/frag.h. */
struct frag_key {
	__u32 saddr;
	__u32 daddr;
	__u16 id; /* network byte order */
	__u8 protocol;
	__u8 pad;
};

struct frag_ports {
	__u16 sport;          /* host byte order */
	__u16 dport;
	__u16 policy_port_be; /* what policy is keyed on */
	__u16 pad;
	__u64 expires_ns;     /* as IP reassembly gives up (30 s) */
};

struct {
	__uint(type, BPF_MAP_TYPE_LRU_HASH);
	__type(key, struct frag_key);
	__type(value, struct frag_ports);
	__uint(max_entries, 8192);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fibril_frags SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_RINGBUF);
	__uint(max_entries, 8 << 20);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fibril_events SEC(".maps");

/* Events that could not be written because the ring buffer was full. */
struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__type(key, __u32);
	__type(value, __u64);
	__uint(max_entries, 1);
	__uint(pinning, LIBBPF_PIN_BY_NAME);
} fibril_events_lost SEC(".maps");

#endif
