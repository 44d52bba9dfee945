//! The ipcache as the kernel holds it, and the one Rust resolver of an
//! address's identity: what the datapath's LPM lookup answers, so that
//! `policy trace`, the proxies and `enforce-established` name a peer as the
//! kernel does (a host address is `host`, not `world`).

use std::collections::{BTreeMap, HashMap};
use std::net::Ipv4Addr;

use crate::state::State;

/// A kernel ipcache key: (address, prefix length).
pub type Prefix = (Ipv4Addr, u32);

/// A kernel ipcache value: the identity, and for an endpoint on another
/// node that node's address (the tunnel its traffic goes through).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub identity: u32,
    pub tunnel: Option<Ipv4Addr>,
}

impl Entry {
    /// An entry reached without a tunnel.
    pub fn local(identity: u32) -> Self {
        Entry {
            identity,
            tunnel: None,
        }
    }

    /// Another node's endpoint as the kvstore has it.
    pub fn remote(r: &kvstore::IpIdentity) -> Self {
        Entry {
            identity: r.identity,
            tunnel: Some(r.host_ip).filter(|a| !a.is_unspecified()),
        }
    }
}

/// What the kernel's ipcache holds: every endpoint's /32 (this node's and,
/// in kvstore mode, other nodes', with their node's address as the tunnel
/// endpoint; this node's win), and the rest (`prefixes`): the host's own
/// addresses /32 (`host`), the other nodes' addresses /32 (`remote-node`),
/// every IPv4 CIDR identity, and `0.0.0.0/0` (world). Kept apart because endpoints
/// change often and the rest rarely: a commit copies only the part it
/// changes (a map of plain numbers, copied as one block).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ipcache {
    endpoints: HashMap<Ipv4Addr, Entry>,
    prefixes: BTreeMap<Prefix, u32>,
}

impl Ipcache {
    /// What the kernel's ipcache must hold for `state`, with the host's
    /// own addresses `host`.
    pub fn build(state: &State, host: &[Ipv4Addr]) -> Self {
        Ipcache {
            endpoints: state
                .remote_endpoints()
                .iter()
                .map(|(ip, r)| (*ip, Entry::remote(r)))
                .chain(
                    state
                        .endpoints()
                        .values()
                        .map(|e| (e.ipv4, Entry::local(e.identity))),
                )
                .collect(),
            prefixes: Self::prefixes_of(state, host),
        }
    }

    /// Everything but the endpoints.
    pub fn prefixes_of(state: &State, host: &[Ipv4Addr]) -> BTreeMap<Prefix, u32> {
        let mut prefixes = BTreeMap::new();
        prefixes.insert((Ipv4Addr::UNSPECIFIED, 0), abi::identity::WORLD);
        // CIDR identities (IPv6 prefixes wait for the IPv6 datapath).
        for (prefix, id) in state.cidr_identities() {
            if let ipnet::IpNet::V4(p) = prefix {
                prefixes.insert((p.network(), p.prefix_len() as u32), *id);
            }
        }
        // Other nodes (their host stacks), then this one's: an address
        // both claim is this host's.
        for addr in state.remote_nodes().values() {
            prefixes.insert((*addr, 32), abi::identity::REMOTE_NODE);
        }
        for addr in host {
            prefixes.insert((*addr, 32), abi::identity::HOST);
        }
        prefixes
    }

    /// This ipcache with `endpoints` set (`Some`) or removed (`None`), and
    /// the prefixes replaced when given.
    pub fn with(
        &self,
        endpoints: &[(Ipv4Addr, Option<Entry>)],
        prefixes: Option<BTreeMap<Prefix, u32>>,
    ) -> Self {
        Ipcache {
            endpoints: if endpoints.is_empty() {
                self.endpoints.clone()
            } else {
                let mut m = self.endpoints.clone();
                for (addr, id) in endpoints {
                    match id {
                        Some(id) => m.insert(*addr, *id),
                        None => m.remove(addr),
                    };
                }
                m
            },
            prefixes: prefixes.unwrap_or_else(|| self.prefixes.clone()),
        }
    }

    /// Every kernel entry; an endpoint's /32 wins over a prefix with the
    /// same key.
    pub fn entries(&self) -> BTreeMap<Prefix, Entry> {
        let mut out: BTreeMap<Prefix, Entry> = self
            .prefixes
            .iter()
            .map(|(k, id)| (*k, Entry::local(*id)))
            .collect();
        out.extend(self.endpoints.iter().map(|(a, e)| ((*a, 32), *e)));
        out
    }

    /// The entries that are not local endpoints.
    pub fn prefixes(&self) -> &BTreeMap<Prefix, u32> {
        &self.prefixes
    }

    /// The kernel entry of `key` in this ipcache.
    pub fn get(&self, key: &Prefix) -> Option<Entry> {
        if key.1 == 32 {
            if let Some(e) = self.endpoints.get(&key.0) {
                return Some(*e);
            }
        }
        self.prefixes.get(key).map(|id| Entry::local(*id))
    }

    /// The keys whose entry differs between `self` and `next`, among the
    /// endpoints' `touched` addresses and, if they differ, the prefixes.
    pub fn changed_keys(&self, next: &Ipcache, touched: &[Ipv4Addr]) -> Vec<Prefix> {
        let mut keys: Vec<Prefix> = touched.iter().map(|a| (*a, 32)).collect();
        if self.prefixes != next.prefixes {
            keys.extend(self.prefixes.keys().chain(next.prefixes.keys()));
        }
        keys.sort();
        keys.dedup();
        keys.retain(|k| self.get(k) != next.get(k));
        keys
    }

    /// The identity of `addr`: the longest prefix holding it, as the
    /// kernel's LPM lookup (world when nothing else holds it).
    pub fn identity_of(&self, addr: Ipv4Addr) -> u32 {
        if let Some(e) = self.endpoints.get(&addr) {
            return e.identity;
        }
        let bits = u32::from(addr);
        (0..=32u32)
            .rev()
            .find_map(|len| {
                let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
                self.prefixes
                    .get(&(Ipv4Addr::from(bits & mask), len))
                    .copied()
            })
            .unwrap_or(abi::identity::WORLD)
    }

    /// Whether `addr` is one of the host's own addresses.
    pub fn is_host(&self, addr: Ipv4Addr) -> bool {
        !self.endpoints.contains_key(&addr)
            && self.prefixes.get(&(addr, 32)) == Some(&abi::identity::HOST)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_prefix_wins_as_in_the_kernel() {
        let mut state = State::default();
        let cidr = |s: &str| s.parse::<ipnet::IpNet>().unwrap();
        for (prefix, id) in [
            ("192.0.2.0/24", 16_777_217),
            ("192.0.2.128/25", 16_777_218),
            ("2001:db8::/32", 16_777_219),
        ] {
            state.set_cidr_identity(cidr(prefix), id);
        }
        let host = [Ipv4Addr::new(192, 0, 2, 130)];
        let c = Ipcache::build(&state, &host);
        assert_eq!(c.identity_of(Ipv4Addr::new(192, 0, 2, 5)), 16_777_217);
        assert_eq!(c.identity_of(Ipv4Addr::new(192, 0, 2, 200)), 16_777_218);
        // A host address inside a CIDR is the host, as the kernel says.
        assert_eq!(
            c.identity_of(Ipv4Addr::new(192, 0, 2, 130)),
            abi::identity::HOST
        );
        assert!(c.is_host(Ipv4Addr::new(192, 0, 2, 130)));
        assert_eq!(
            c.identity_of(Ipv4Addr::new(198, 51, 100, 1)),
            abi::identity::WORLD
        );
        assert_eq!(c.entries().len(), 4, "0/0, two v4 CIDRs, the host");
    }
}
