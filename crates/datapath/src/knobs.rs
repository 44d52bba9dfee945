//! The programs' load-time settings (`const volatile` globals in `bpf/`),
//! each declared once here with its type: the loader sets them through
//! `set`, which only takes a value of the declared type, and
//! `tests/sources.rs` checks this table against the C declarations (every
//! setting the C code has is here, each with the C type's size).

use std::marker::PhantomData;

use aya::EbpfLoader;

/// A `const volatile` global of the programs, of Rust type `T`.
pub struct Knob<T> {
    pub name: &'static str,
    _type: PhantomData<T>,
}

impl<T> Knob<T> {
    const fn new(name: &'static str) -> Self {
        Knob {
            name,
            _type: PhantomData,
        }
    }
}

/// The endpoint's id (one program instance per endpoint).
pub const ENDPOINT_ID: Knob<u32> = Knob::new("endpoint_id");
/// The endpoint's address, network byte order.
pub const ENDPOINT_IPV4: Knob<u32> = Knob::new("endpoint_ipv4");
/// Ring-buffer bytes pending before userspace is woken.
pub const EVENTS_WAKEUP_BYTES: Knob<u64> = Knob::new("events_wakeup_bytes");
/// Conntrack entries one endpoint may own (0: unbounded).
pub const CT_ENDPOINT_BUDGET: Knob<u32> = Knob::new("ct_endpoint_budget");
/// The HTTP proxy's port on 127.0.0.1 (0: no proxy).
pub const PROXY_PORT: Knob<u16> = Knob::new("proxy_port");
/// The DNS proxy's port on 127.0.0.1 (0: none).
pub const DNS_PROXY_PORT: Knob<u16> = Knob::new("dns_proxy_port");
/// The mark that routes a packet to the local stack (the proxy).
pub const PROXY_MARK_TO: Knob<u32> = Knob::new("proxy_mark_to");
/// The mark on the proxy's own upstream sockets.
pub const PROXY_MARK_FROM: Knob<u32> = Knob::new("proxy_mark_from");

/// The node's VXLAN device (0: no overlay).
pub const TUNNEL_IFINDEX: Knob<u32> = Knob::new("tunnel_ifindex");

/// Socket load balancing: the agent's network namespace (its cookie).
pub const HOST_NETNS_COOKIE: Knob<u64> = Knob::new("host_netns_cookie");
/// Socket load balancing for the agent's namespace only (1) or every one.
pub const SOCKET_LB_HOST_ONLY: Knob<u32> = Knob::new("socket_lb_host_only");

/// Maglev table size (a prime): slots of each external frontend's table.
pub const LB_MAGLEV_TABLE_SIZE: Knob<u32> = Knob::new("lb_maglev_table_size");
/// Kube-proxy replacement: node ports served on the node's devices (1).
pub const KUBE_PROXY_REPLACEMENT: Knob<u32> = Knob::new("kube_proxy_replacement");
/// Kube-proxy replacement: the address node ports' connections to other
/// nodes' backends leave from, network byte order (0: none).
pub const NODEPORT_SNAT_ADDR: Knob<u32> = Knob::new("nodeport_snat_addr");

/// Every setting the loader sets: (name, size in bytes).
pub const SET: [(&str, usize); 14] = [
    (ENDPOINT_ID.name, 4),
    (ENDPOINT_IPV4.name, 4),
    (EVENTS_WAKEUP_BYTES.name, 8),
    (CT_ENDPOINT_BUDGET.name, 4),
    (PROXY_PORT.name, 2),
    (DNS_PROXY_PORT.name, 2),
    (PROXY_MARK_TO.name, 4),
    (PROXY_MARK_FROM.name, 4),
    (TUNNEL_IFINDEX.name, 4),
    (HOST_NETNS_COOKIE.name, 8),
    (SOCKET_LB_HOST_ONLY.name, 4),
    (LB_MAGLEV_TABLE_SIZE.name, 4),
    (KUBE_PROXY_REPLACEMENT.name, 4),
    (NODEPORT_SNAT_ADDR.name, 4),
];

/// Settings the programs keep at their C default (conntrack timeouts, as
/// Cilium's defaults): nothing sets them today.
pub const C_DEFAULTS: [&str; 4] = [
    "ct_timeout_tcp_syn_s",
    "ct_timeout_tcp_established_s",
    "ct_timeout_tcp_close_s",
    "ct_timeout_any_s",
];

/// Sets `knob` to `value` for the programs `loader` loads.
pub fn set<'a, T: aya::Pod>(loader: &mut EbpfLoader<'a>, knob: Knob<T>, value: &'a T) {
    loader.override_global(knob.name, value, true);
}
