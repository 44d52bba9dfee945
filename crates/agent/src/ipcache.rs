//! The ipcache as the kernel holds it, and the one Rust resolver of an
//! address's identity: what the datapath's LPM lookup answers, so that
//! `policy trace`, the proxies and `enforce-established` name a peer as the
//! kernel does (a host address is `host`, not `world`).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use crate::state::State;

/// Prefix (address, length) -> identity: every pod /32, every host
/// address /32 (`host`), every IPv4 CIDR identity, and `0.0.0.0/0` (world).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ipcache {
    entries: BTreeMap<(Ipv4Addr, u32), u32>,
}

impl Ipcache {
    /// What the kernel's ipcache must hold for `state`, with the host's
    /// own addresses `host`.
    pub fn build(state: &State, host: &[Ipv4Addr]) -> Self {
        let mut entries = BTreeMap::new();
        entries.insert((Ipv4Addr::UNSPECIFIED, 0), abi::identity::WORLD);
        // CIDR identities (IPv6 prefixes wait for the IPv6 datapath).
        for (prefix, id) in &state.cidr_identities {
            if let ipnet::IpNet::V4(p) = prefix {
                entries.insert((p.network(), p.prefix_len() as u32), *id);
            }
        }
        for addr in host {
            entries.insert((*addr, 32), abi::identity::HOST);
        }
        for e in state.endpoints.values() {
            entries.insert((e.ipv4, 32), e.identity);
        }
        Ipcache { entries }
    }

    pub fn entries(&self) -> &BTreeMap<(Ipv4Addr, u32), u32> {
        &self.entries
    }

    /// The identity of `addr`: the longest prefix holding it, as the
    /// kernel's LPM lookup (world when nothing else holds it).
    pub fn identity_of(&self, addr: Ipv4Addr) -> u32 {
        let bits = u32::from(addr);
        (0..=32u32)
            .rev()
            .find_map(|len| {
                let mask = if len == 0 { 0 } else { u32::MAX << (32 - len) };
                self.entries
                    .get(&(Ipv4Addr::from(bits & mask), len))
                    .copied()
            })
            .unwrap_or(abi::identity::WORLD)
    }

    /// Whether `addr` is one of the host's own addresses.
    pub fn is_host(&self, addr: Ipv4Addr) -> bool {
        self.entries.get(&(addr, 32)) == Some(&abi::identity::HOST)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_longest_prefix_wins_as_in_the_kernel() {
        let mut state = State::default();
        let cidr = |s: &str| s.parse::<ipnet::IpNet>().unwrap();
        state
            .cidr_identities
            .insert(cidr("192.0.2.0/24"), 16_777_217);
        state
            .cidr_identities
            .insert(cidr("192.0.2.128/25"), 16_777_218);
        state
            .cidr_identities
            .insert(cidr("2001:db8::/32"), 16_777_219);
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
