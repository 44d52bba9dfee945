//! Policy model -> per-endpoint policy map entries (semantics §3.10).
//!
//! An endpoint is default-allow in a direction until a rule selects it with
//! a section for that direction; then it is default-deny plus the union of
//! the allows. Deny entries win over allows: an allow that a deny of the
//! same or the wildcard identity covers is not emitted at all (the datapath
//! returns only the longest match per lookup, so a shadowed allow could
//! otherwise hide the deny).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::labels::LabelSet;
use crate::model::{PeerRule, Policy, PortRange};

/// Traffic direction, relative to the endpoint the policy applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Direction {
    Ingress,
    Egress,
}

/// Where an entry came from: the policy and the index of its rule.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Origin {
    pub kind: String,
    /// `namespace/name` or `name`.
    pub policy: String,
    /// Index of the rule in `spec`/`specs`.
    pub rule: usize,
    pub direction: Direction,
    /// Index of the ingress/egress entry within the rule.
    pub entry: usize,
}

/// A policy map key, independent of the endpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct EntryKey {
    /// Peer identity; 0 = any.
    pub identity: u32,
    pub direction: Direction,
    /// IP protocol; 0 = any (then the port is any too).
    pub protocol: u8,
    pub port: u16,
    /// How many leading bits of the port are matched (0 = any port, 16 = exact).
    pub port_bits: u8,
}

impl EntryKey {
    /// Length of the proto/port part of the LPM prefix (0, 8, 8+port_bits).
    pub fn proto_port_prefix(&self) -> u8 {
        if self.protocol == 0 {
            0
        } else {
            8 + self.port_bits
        }
    }

    fn covers(&self, other: &EntryKey) -> bool {
        if self.direction != other.direction {
            return false;
        }
        if self.protocol == 0 {
            return true;
        }
        if self.protocol != other.protocol || self.port_bits > other.port_bits {
            return false;
        }
        let mask = if self.port_bits == 0 {
            0
        } else {
            u16::MAX << (16 - self.port_bits)
        };
        self.port & mask == other.port & mask
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryValue {
    pub deny: bool,
    pub origin: Origin,
}

/// The computed policy of one endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointPolicy {
    pub ingress_enforced: bool,
    pub egress_enforced: bool,
    pub entries: BTreeMap<EntryKey, EntryValue>,
    /// Policies (`namespace/name`) that select the endpoint, per direction.
    pub ingress_selected_by: Vec<String>,
    pub egress_selected_by: Vec<String>,
}

/// Splits a port range into maximal aligned power-of-two blocks:
/// (port, prefix bits).
pub fn port_blocks(start: u16, end: u16) -> Vec<(u16, u8)> {
    if start == 0 {
        return vec![(0, 0)];
    }
    let (mut lo, hi) = (start as u32, end as u32);
    let mut out = Vec::new();
    while lo <= hi {
        let mut size = 1u32;
        while lo % (size * 2) == 0 && lo + size * 2 - 1 <= hi && size * 2 <= 65536 {
            size *= 2;
        }
        out.push((lo as u16, 16 - size.trailing_zeros() as u8));
        lo += size;
    }
    out
}

fn port_keys(identity: u32, direction: Direction, ports: &[PortRange]) -> Vec<EntryKey> {
    if ports.is_empty() {
        return vec![EntryKey {
            identity,
            direction,
            protocol: 0,
            port: 0,
            port_bits: 0,
        }];
    }
    let mut out = Vec::new();
    for p in ports {
        if p.start == 0 && p.protocol == crate::model::Protocol::Any {
            out.push(EntryKey {
                identity,
                direction,
                protocol: 0,
                port: 0,
                port_bits: 0,
            });
            continue;
        }
        for &proto in p.protocol.numbers() {
            for (port, port_bits) in port_blocks(p.start, p.end) {
                out.push(EntryKey {
                    identity,
                    direction,
                    protocol: proto,
                    port,
                    port_bits,
                });
            }
        }
    }
    out
}

/// Computes one endpoint's policy from every policy and every identity
/// known (identity -> labels).
pub fn endpoint_policy(
    labels: &LabelSet,
    policies: &[Policy],
    identities: &[(u32, LabelSet)],
) -> EndpointPolicy {
    let mut out = EndpointPolicy::default();
    let mut allows: BTreeMap<EntryKey, EntryValue> = BTreeMap::new();
    let mut denies: BTreeMap<EntryKey, EntryValue> = BTreeMap::new();
    for policy in policies {
        for (rule_index, rule) in policy.rules.iter().enumerate() {
            if !rule.selector.matches(labels) {
                continue;
            }
            for (direction, section) in [
                (Direction::Ingress, &rule.ingress),
                (Direction::Egress, &rule.egress),
            ] {
                let Some(peer_rules) = section else { continue };
                let (enforced, selected_by) = match direction {
                    Direction::Ingress => (&mut out.ingress_enforced, &mut out.ingress_selected_by),
                    Direction::Egress => (&mut out.egress_enforced, &mut out.egress_selected_by),
                };
                *enforced = true;
                if !selected_by.contains(&policy.key()) {
                    selected_by.push(policy.key());
                }
                for (entry, pr) in peer_rules.iter().enumerate() {
                    let origin = Origin {
                        kind: policy.kind.name().to_string(),
                        policy: policy.key(),
                        rule: rule_index,
                        direction,
                        entry,
                    };
                    let target = if pr.deny { &mut denies } else { &mut allows };
                    for id in peer_identities(pr, identities) {
                        for key in port_keys(id, direction, &pr.ports) {
                            target.entry(key).or_insert_with(|| EntryValue {
                                deny: pr.deny,
                                origin: origin.clone(),
                            });
                        }
                    }
                }
            }
        }
    }
    allows.retain(|k, _| {
        !denies
            .keys()
            .any(|d| (d.identity == k.identity || d.identity == 0) && d.covers(k))
    });
    out.entries = allows;
    out.entries.extend(denies);
    out
}

/// The identities a peer rule applies to: 0 (any) when it has no L3
/// selector but names ports; nothing for the empty rule `{}`.
fn peer_identities(pr: &PeerRule, identities: &[(u32, LabelSet)]) -> Vec<u32> {
    match &pr.peers {
        None if pr.ports.is_empty() => vec![],
        None => vec![0],
        Some(selectors) => identities
            .iter()
            .filter(|(_, l)| selectors.iter().any(|s| s.matches(l)))
            .map(|(id, _)| *id)
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_ranges_split_into_aligned_blocks() {
        assert_eq!(port_blocks(0, 0), vec![(0, 0)]);
        assert_eq!(port_blocks(80, 80), vec![(80, 16)]);
        assert_eq!(port_blocks(8080, 8083), vec![(8080, 14)]);
        assert_eq!(port_blocks(1, 3), vec![(1, 16), (2, 15)]);
        assert_eq!(port_blocks(65535, 65535), vec![(65535, 16)]);
    }

    proptest::proptest! {
        #[test]
        fn port_blocks_cover_exactly_the_range(a in 1u16.., b in 1u16..) {
            let (lo, hi) = (a.min(b), a.max(b));
            let blocks = port_blocks(lo, hi);
            let covered = |p: u16| blocks.iter().any(|(bp, bits)| {
                let mask = if *bits == 0 { 0 } else { u16::MAX << (16 - bits) };
                p & mask == *bp & mask
            });
            for p in [lo, hi, lo.saturating_sub(1).max(1), hi.saturating_add(1), lo / 2 + hi / 2] {
                proptest::prop_assert_eq!(covered(p), p >= lo && p <= hi, "port {}", p);
            }
        }
    }
}
