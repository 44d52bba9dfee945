/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Who an address is: a local endpoint (the endpoint map), else the longest
 * ipcache prefix holding it, else world. The agent's `ipcache::identity_of`
 * answers the same way for everything outside the kernel. */
#ifndef FIBRIL_IDENTITY_H
#define FIBRIL_IDENTITY_H

#include "maps.h"

static __always_inline struct endpoint_info *local_endpoint(__u32 addr)
{
	struct endpoint_key key = { .addr = addr };
	return bpf_map_lookup_elem(&fibril_endpoints, &key);
}

/* The longest ipcache prefix holding `addr`, NULL when none does. */
static __always_inline struct ipcache_value *ipcache_lookup(__u32 addr)
{
	struct ipcache_key key = { .prefixlen = 32 };
	__builtin_memcpy(key.addr, &addr, 4);
	return bpf_map_lookup_elem(&fibril_ipcache, &key);
}

/* The identity of an address that is no local endpoint. */
static __always_inline __u32 ipcache_identity(__u32 addr)
{
	struct ipcache_value *v = ipcache_lookup(addr);
	return v ? v->identity : ID_WORLD;
}

/* The identity of any address. */
static __always_inline __u32 identity_of(__u32 addr)
{
	struct endpoint_info *ep = local_endpoint(addr);
	return ep ? ep->identity : ipcache_identity(addr);
}

#endif
