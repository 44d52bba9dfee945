//! Conntrack as the agent sees it: the census (counts for status, live
//! addresses for the toFQDNs GC), listing entries, and re-checking
//! established connections against the policy in force. Handles: the
//! datapath and the control path.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize};
use std::sync::Arc;

use api::Response;
use datapath::Datapath;

use crate::control::Control;
use crate::state::Endpoint;
use crate::Error;

pub struct Conntrack {
    datapath: Arc<Datapath>,
    control: Arc<Control>,
    /// Entries at the last census: status reads this instead of walking
    /// the table.
    pub entries: AtomicUsize,
    /// The census's busiest endpoint (live entries its traffic holds).
    pub busiest: AtomicU32,
    /// New connections refused at an endpoint's budget, for the endpoints
    /// there at the last census.
    pub overflows: AtomicU64,
}

impl Conntrack {
    pub fn new(datapath: Arc<Datapath>, control: Arc<Control>) -> Self {
        Conntrack {
            datapath,
            control,
            entries: Default::default(),
            busiest: Default::default(),
            overflows: Default::default(),
        }
    }

    /// Walks the conntrack table once (in the background, every few
    /// seconds): the entry count status shows, and the live addresses the
    /// toFQDNs garbage collection keeps.
    pub fn census(&self) -> std::collections::HashSet<Ipv4Addr> {
        use std::sync::atomic::Ordering::Relaxed;
        let census = self.datapath.ct_census();
        self.entries.store(census.entries, Relaxed);
        self.busiest.store(census.busiest, Relaxed);
        self.overflows.store(census.overflows, Relaxed);
        census.live_addresses
    }

    /// Checks every tracked connection of a local endpoint against the
    /// policy in force, as its first packet was (same lookup as the
    /// datapath's), and deletes every entry of each one it now refuses
    /// (both directions and both orientations of the tuple): its next
    /// packet is then a new connection and meets the policy in the kernel.
    /// Connections the proxy opened are left to the proxy, which checks
    /// every request. Returns (connections checked, cut).
    pub fn enforce_established(&self) -> Result<(usize, usize), Error> {
        let s = self.control.lock();
        let sync = self.control.policy();
        let ipcache = self.control.ipcache();
        let by_addr: HashMap<Ipv4Addr, &Endpoint> =
            s.endpoints().values().map(|e| (e.ipv4, e)).collect();
        let identity = |a: Ipv4Addr| match by_addr.get(&a) {
            Some(e) => e.identity,
            None => ipcache.identity_of(a),
        };
        let ip = |a: u32| Ipv4Addr::from(u32::from_be(a));
        let mut checked = 0;
        let mut refused = std::collections::HashSet::new();
        for (k, v) in self.datapath.ct_list() {
            // The proxy's connections are the proxy's; a service entry
            // only names the backend (its connection has its own entries).
            if v.flags & abi::CT_F_FROM_PROXY != 0 || k.direction == abi::CT_DIR_SERVICE {
                continue;
            }
            let (ep, peer, dir) = if k.direction == abi::Direction::Ingress as u8 {
                (ip(k.daddr), ip(k.saddr), policy::Direction::Ingress)
            } else {
                (ip(k.saddr), ip(k.daddr), policy::Direction::Egress)
            };
            let Some(policy) = by_addr.get(&ep).and_then(|e| sync.computed(e.identity)) else {
                continue;
            };
            checked += 1;
            // ICMP: policy is keyed on the type, and only echo is tracked.
            let port = if k.protocol == 1 { 8 } else { k.dport };
            let decision = policy.decide(identity(peer), dir, k.protocol, port);
            if matches!(
                decision,
                policy::Decision::Denied { .. } | policy::Decision::DefaultDeny { .. }
            ) {
                refused.insert((k.saddr, k.daddr, k.sport, k.dport, k.protocol));
            }
        }
        drop(sync);
        drop(s);
        let cut = refused.len();
        if cut > 0 {
            self.datapath.ct_flush(|k, _| {
                refused.contains(&(k.saddr, k.daddr, k.sport, k.dport, k.protocol))
                    || refused.contains(&(k.daddr, k.saddr, k.dport, k.sport, k.protocol))
            });
        }
        tracing::info!(checked, cut, "established connections re-evaluated");
        Ok((checked, cut))
    }

    pub fn list(&self, address: Option<Ipv4Addr>) -> Response {
        let now = datapath::monotonic_ns() as i64;
        let be = address.map(|a| u32::from(a).to_be());
        let mut entries = Vec::new();
        let mut truncated = false;
        for (k, v) in self.datapath.ct_list() {
            if be.is_some_and(|a| k.saddr != a && k.daddr != a) {
                continue;
            }
            if entries.len() == api::CONNTRACK_LIST_MAX {
                truncated = true;
                break;
            }
            let addr = |a: u32, port: u16| format!("{}:{port}", Ipv4Addr::from(u32::from_be(a)));
            let mut flags = Vec::new();
            for (bit, name) in [
                (abi::CT_F_PROXY_REDIRECT, "proxy-redirect"),
                (abi::CT_F_FROM_PROXY, "from-proxy"),
                (abi::CT_F_DNS, "dns"),
            ] {
                if v.flags & bit != 0 {
                    flags.push(name.to_string());
                }
            }
            if v.closing != 0 {
                flags.insert(0, "closing".into());
            }
            entries.push(api::ConntrackInfo {
                protocol: k.protocol,
                source: addr(k.saddr, k.sport),
                destination: addr(k.daddr, k.dport),
                direction: match k.direction {
                    abi::CT_DIR_SERVICE => format!("service (backend {})", v.backend_id),
                    d if d == abi::Direction::Ingress as u8 => "ingress".into(),
                    _ => "egress".into(),
                },
                expires_in_s: (v.expires_ns as i64 - now) / 1_000_000_000,
                flags,
                packets: v.packets,
                bytes: v.bytes,
            });
        }
        Response::Conntrack { entries, truncated }
    }
}
