// SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)
/*
 * Socket load balancing: programs on the agent's cgroup (Cilium's socket
 * LB, `bpf-lb-sock`), run by the kernel at the socket calls of the
 * processes under it:
 *   sock4_connect:     cgroup/connect4: a connect to a service address and
 *                      port connects to a backend instead: no per-packet
 *                      translation for the connection's life
 *   sock4_sendmsg:     cgroup/sendmsg4: the same for an unconnected UDP
 *                      datagram
 *   sock4_recvmsg:     cgroup/recvmsg4: a reply's source shown as the
 *                      service address again
 *   sock4_getpeername: cgroup/getpeername4: the peer shown as the service
 * Each translation is reported as Hubble's trace-sock events, the address
 * before and after (pre/post, forward at connect and sendmsg, reverse at
 * recvmsg and getpeername), with the socket's cookie and cgroup.
 * With `host_only` (socketLB.hostNamespaceOnly) sockets of other network
 * namespaces (pods) are left alone: their packets meet the per-packet
 * translation at their veth (lib/lb.h), which is what keeps a chained
 * plugin's redirection inside the pod (Istio) working.
 */
#include <linux/bpf.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

#include "fibril_abi.h"
#include "lib/maps.h"
#include "lib/events.h"
#include "lib/identity.h"

/* The agent's network namespace (its cookie), and whether only its
 * sockets are translated. Set at load time. */
const volatile __u64 host_netns_cookie = 0;
const volatile __u32 socket_lb_host_only = 0;

#define SYS_PROCEED 1
#define SYS_REJECT 0 /* the call fails with EPERM */

static __always_inline int skipped(struct bpf_sock_addr *ctx)
{
	return socket_lb_host_only && bpf_get_netns_cookie(ctx) != host_netns_cookie;
}

/* One trace-sock event: the socket call's peer `addr`:`port_be` at
 * `point`; `svc` when that address is the service's (the forward call
 * before, the reverse one after translating). The socket's own address is
 * not known yet; the agent's namespace is the host. */
static __always_inline void sock_event(struct bpf_sock_addr *ctx, __u8 point, __u32 addr,
				       __u16 port_be, int svc, __u8 proto)
{
	struct flow_event *e = event_reserve();
	if (!e)
		return;
	__builtin_memset(e, 0, sizeof(*e));
	e->ts_ns = bpf_ktime_get_ns();
	e->type = EVENT_TRACE_SOCK;
	e->subtype = point;
	e->verdict = (point == SOCK_XLATE_PRE_FWD || point == SOCK_XLATE_PRE_REV)
		? VERDICT_TRACED : VERDICT_TRANSLATED;
	e->protocol = proto;
	e->ip_version = 4;
	e->src_identity = bpf_get_netns_cookie(ctx) == host_netns_cookie ? ID_HOST : 0;
	e->dst_identity = identity_of(addr);
	e->daddr = addr;
	e->dport = bpf_ntohs(port_be);
	if (svc) {
		e->svc_addr = addr;
		e->svc_port = bpf_ntohs(port_be);
		e->svc_side = (point == SOCK_XLATE_PRE_FWD) ? SVC_SIDE_DESTINATION : SVC_SIDE_SOURCE;
	}
	e->sock_cookie = bpf_get_socket_cookie(ctx);
	e->cgroup_id = bpf_get_current_cgroup_id();
	event_submit(e);
}

/* The backend for a socket's connect or datagram to `ctx`'s address, or
 * NULL when it is no service's; `*refused` when it is a service without
 * backends (the call fails at once, as Cilium's does). */
static __always_inline struct lb_backend *sock4_backend(struct bpf_sock_addr *ctx, __u8 proto,
							 int *refused)
{
	struct lb_service_key key = {
		.address = ctx->user_ip4,
		.dport = (__u16)ctx->user_port,
		.protocol = proto,
	};
	struct lb_service *svc = bpf_map_lookup_elem(&fibril_lb_services, &key);
	if (!svc)
		return NULL;
	if (!svc->count) {
		*refused = 1;
		return NULL;
	}
	key.slot = (bpf_get_prandom_u32() % svc->count) + 1;
	struct lb_service *slot = bpf_map_lookup_elem(&fibril_lb_services, &key);
	if (!slot)
		return NULL;
	__u32 id = slot->backend_id;
	return bpf_map_lookup_elem(&fibril_lb_backends, &id);
}

static __always_inline int sock4_translate(struct bpf_sock_addr *ctx, __u8 proto)
{
	if (skipped(ctx))
		return SYS_PROCEED;
	int refused = 0;
	struct lb_backend *be = sock4_backend(ctx, proto, &refused);
	if (!be)
		return refused ? SYS_REJECT : SYS_PROCEED;
	struct lb_sock_key key = {
		.cookie = bpf_get_socket_cookie(ctx),
		.address = be->address,
		.port = be->port,
	};
	struct lb_reverse_nat rn = {
		.address = ctx->user_ip4,
		.port = (__u16)ctx->user_port,
	};
	bpf_map_update_elem(&fibril_lb_sock_revnat, &key, &rn, BPF_ANY);
	sock_event(ctx, SOCK_XLATE_PRE_FWD, rn.address, rn.port, 1, proto);
	ctx->user_ip4 = be->address;
	ctx->user_port = be->port;
	sock_event(ctx, SOCK_XLATE_POST_FWD, be->address, be->port, 0, proto);
	return SYS_PROCEED;
}

/* The service address a translated socket's peer is shown as. */
static __always_inline int sock4_reverse(struct bpf_sock_addr *ctx)
{
	if (skipped(ctx))
		return SYS_PROCEED;
	struct lb_sock_key key = {
		.cookie = bpf_get_socket_cookie(ctx),
		.address = ctx->user_ip4,
		.port = (__u16)ctx->user_port,
	};
	struct lb_reverse_nat *rn = bpf_map_lookup_elem(&fibril_lb_sock_revnat, &key);
	if (rn) {
		__u8 proto = ctx->protocol == IPPROTO_TCP ? IPPROTO_TCP : IPPROTO_UDP;
		sock_event(ctx, SOCK_XLATE_PRE_REV, key.address, key.port, 0, proto);
		ctx->user_ip4 = rn->address;
		ctx->user_port = rn->port;
		sock_event(ctx, SOCK_XLATE_POST_REV, rn->address, rn->port, 1, proto);
	}
	return SYS_PROCEED;
}

SEC("cgroup/connect4")
int sock4_connect(struct bpf_sock_addr *ctx)
{
	if (ctx->protocol != IPPROTO_TCP && ctx->protocol != IPPROTO_UDP)
		return SYS_PROCEED;
	return sock4_translate(ctx, ctx->protocol);
}

SEC("cgroup/sendmsg4")
int sock4_sendmsg(struct bpf_sock_addr *ctx)
{
	return sock4_translate(ctx, IPPROTO_UDP);
}

SEC("cgroup/recvmsg4")
int sock4_recvmsg(struct bpf_sock_addr *ctx)
{
	return sock4_reverse(ctx);
}

SEC("cgroup/getpeername4")
int sock4_getpeername(struct bpf_sock_addr *ctx)
{
	return sock4_reverse(ctx);
}

char LICENSE[] SEC("license") = "Dual BSD/GPL";
