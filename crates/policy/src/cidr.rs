//! CIDR identities: every prefix a policy names (including `except`
//! prefixes) gets a node-local identity labelled `reserved:world` plus
//! `cidr:<p>` for each policy prefix that contains it, so that a CIDR
//! selector matches the identities of its own and of every narrower prefix,
//! and the ipcache's longest-prefix match picks the most specific one.

use std::collections::BTreeSet;

use ipnet::IpNet;

use crate::labels::{Label, LabelSet};
use crate::model::{FqdnSelector, Peer, Policy};

/// First and last node-local CIDR identity (flag bit 24, as Cilium).
pub const FIRST_LOCAL: u32 = (1 << 24) + 1;
pub const LAST_LOCAL: u32 = (1 << 24) + 0xffff;

/// Every non-zero-length prefix the policies name.
pub fn prefixes<'a>(policies: impl IntoIterator<Item = &'a Policy>) -> BTreeSet<IpNet> {
    let mut out = BTreeSet::new();
    for p in policies {
        for r in &p.rules {
            for pr in r.ingress.iter().chain(r.egress.iter()).flatten() {
                for peer in pr.peers.iter().flatten() {
                    if let Peer::Cidr { prefix, except } = peer {
                        out.insert(*prefix);
                        out.extend(except.iter().copied());
                    }
                }
            }
        }
    }
    out.retain(|p| p.prefix_len() > 0);
    out
}

/// Every toFQDNs selector the policies name.
pub fn fqdn_selectors<'a>(
    policies: impl IntoIterator<Item = &'a Policy>,
) -> BTreeSet<FqdnSelector> {
    let mut out = BTreeSet::new();
    for p in policies {
        for r in &p.rules {
            for pr in r.ingress.iter().chain(r.egress.iter()).flatten() {
                for peer in pr.peers.iter().flatten() {
                    if let Peer::Fqdn(s) = peer {
                        out.insert(s.clone());
                    }
                }
            }
        }
    }
    out
}

/// The labels of one prefix's identity among the prefixes `present` says
/// exist: `reserved:world` and `cidr:<q>` for every present q holding it.
pub fn prefix_labels(p: &IpNet, present: impl Fn(&IpNet) -> bool) -> LabelSet {
    let mut labels = vec![Label::new("reserved", "world", "")];
    // The prefixes holding p are p cut to each shorter length: a lookup
    // per length, not a scan of every prefix per prefix.
    labels.extend(
        (0..=p.prefix_len())
            .filter_map(|len| IpNet::new(p.addr(), len).ok().map(|q| q.trunc()))
            .filter(|q| present(q))
            .map(|q| Label::new("cidr", &q.to_string(), "")),
    );
    LabelSet::new(labels)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn narrower_prefixes_carry_the_wider_labels() {
        let set: BTreeSet<IpNet> = ["10.0.0.0/8", "10.96.0.0/12", "192.0.2.0/24"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let of = |p: &str| prefix_labels(&p.parse().unwrap(), |q| set.contains(q)).to_strings();
        assert_eq!(
            of("10.96.0.0/12"),
            vec!["cidr:10.0.0.0/8", "cidr:10.96.0.0/12", "reserved:world"]
        );
        assert_eq!(of("10.0.0.0/8"), vec!["cidr:10.0.0.0/8", "reserved:world"]);
        assert_eq!(
            of("192.0.2.0/24"),
            vec!["cidr:192.0.2.0/24", "reserved:world"]
        );
    }
}
