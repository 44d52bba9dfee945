//! Policy model -> per-endpoint policy map entries (semantics §3.10).
//!
//! An endpoint is default-allow in a direction until a rule selects it with
//! a section for that direction (and `enableDefaultDeny` is not false); then
//! it is default-deny plus the union of the allows. Deny entries win over
//! allows: an allow that a deny of the same or the wildcard identity covers
//! is not emitted at all (the datapath returns only the longest match per
//! lookup, so a shadowed allow could otherwise hide the deny).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::labels::{LabelSet, CLUSTER_LABEL};
use crate::model::{Entity, NamedPort, Peer, PeerRule, Policy, Port, Protocol, L7};
use crate::selector::Selector;

/// Traffic direction, relative to the endpoint the policy applies to: the
/// kernel ABI's (one type from the model to the map keys).
pub use abi::Direction;

/// A per-direction array's index: ingress 0, egress 1.
fn side(d: Direction) -> usize {
    match d {
        Direction::Ingress => 0,
        Direction::Egress => 1,
    }
}

/// Where an entry came from: the policy and the index of its rule.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Origin {
    /// Shared by every entry of the rule (a clone is a reference count).
    pub kind: std::sync::Arc<str>,
    /// `namespace/name` or `name`.
    pub policy: std::sync::Arc<str>,
    /// Index of the rule in `spec`/`specs`.
    pub rule: usize,
    pub direction: Direction,
    /// Index of the ingress/egress entry within the rule (allows first,
    /// then denies, in document order).
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

    fn port_mask(&self) -> u16 {
        if self.port_bits == 0 {
            0
        } else {
            u16::MAX << (16 - self.port_bits)
        }
    }

    /// Whether this entry's proto/port part covers `protocol`/`port`.
    pub fn matches(&self, protocol: u8, port: u16) -> bool {
        self.protocol == 0
            || (self.protocol == protocol
                && port & self.port_mask() == self.port & self.port_mask())
    }

    pub(crate) fn covers(&self, other: &EntryKey) -> bool {
        self.direction == other.direction
            && (self.protocol == 0
                || (self.protocol == other.protocol
                    && self.port_bits <= other.port_bits
                    && other.port & self.port_mask() == self.port & self.port_mask()))
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryValue {
    pub deny: bool,
    pub origin: Origin,
    /// L7 rules on this entry (http, dns, kafka, l7proto): redirect to the
    /// proxy, which enforces them. Rules of several policies on the same
    /// key are a union.
    pub l7: Option<L7>,
    /// From a policy in audit mode.
    pub audit: bool,
}

/// The computed policy of one endpoint.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointPolicy {
    pub ingress_enforced: bool,
    pub egress_enforced: bool,
    /// Enforced only by policies in audit mode: drops become AUDIT.
    pub ingress_audit: bool,
    pub egress_audit: bool,
    /// As a list of pairs when serialized (JSON keys must be strings).
    #[serde(with = "entries_as_pairs")]
    pub entries: BTreeMap<EntryKey, EntryValue>,
    /// Policies (`namespace/name`) that select the endpoint, per direction.
    pub ingress_selected_by: Vec<String>,
    pub egress_selected_by: Vec<String>,
}

impl EndpointPolicy {
    /// The policy's flags and selecting policies, without its entries
    /// (cheap: what a difference carries besides the entries).
    pub fn clone_without_entries(&self) -> Self {
        EndpointPolicy {
            ingress_enforced: self.ingress_enforced,
            egress_enforced: self.egress_enforced,
            ingress_audit: self.ingress_audit,
            egress_audit: self.egress_audit,
            entries: Default::default(),
            ingress_selected_by: self.ingress_selected_by.clone(),
            egress_selected_by: self.egress_selected_by.clone(),
        }
    }
}

mod entries_as_pairs {
    use super::{EntryKey, EntryValue};
    use serde::{Deserialize, Deserializer, Serializer};
    use std::collections::BTreeMap;

    pub fn serialize<S: Serializer>(
        m: &BTreeMap<EntryKey, EntryValue>,
        s: S,
    ) -> Result<S::Ok, S::Error> {
        s.collect_seq(m.iter())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<EntryKey, EntryValue>, D::Error> {
        let pairs: Vec<(EntryKey, EntryValue)> = Deserialize::deserialize(d)?;
        Ok(pairs.into_iter().collect())
    }
}

/// What the policy map says about one packet opening a connection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Decision {
    /// No policy selects the endpoint in this direction.
    NotEnforced,
    Allowed {
        by: Origin,
        /// L7 rules the proxy applies to the connection.
        l7: Option<L7>,
    },
    Denied {
        by: Origin,
    },
    /// Selected, and no rule allows it.
    DefaultDeny {
        selected_by: Vec<String>,
    },
    /// Would be denied, but only by policies in audit mode: forwarded and
    /// reported with verdict AUDIT.
    Audited {
        would_be: Box<Decision>,
    },
}

impl EndpointPolicy {
    /// The datapath's algorithm: the longest proto/port match for the peer
    /// identity and for "any identity"; a deny from either wins; otherwise
    /// the longer prefix, and the identity-specific entry on a tie.
    pub fn lookup(
        &self,
        identity: u32,
        direction: Direction,
        protocol: u8,
        port: u16,
    ) -> Option<(&EntryKey, &EntryValue)> {
        let longest = |id: u32| {
            self.entries
                .iter()
                .filter(|(k, _)| {
                    k.identity == id && k.direction == direction && k.matches(protocol, port)
                })
                .max_by_key(|(k, _)| k.proto_port_prefix())
        };
        let l3 = longest(identity);
        let l4 = if identity == 0 { None } else { longest(0) };
        for hit in [l3, l4].into_iter().flatten() {
            if hit.1.deny {
                return Some(hit);
            }
        }
        match (l3, l4) {
            (Some(a), Some(b)) => Some(if a.0.proto_port_prefix() >= b.0.proto_port_prefix() {
                a
            } else {
                b
            }),
            (a, b) => a.or(b),
        }
    }

    /// The decision for a connection from/to a peer identity.
    pub fn decide(&self, identity: u32, direction: Direction, protocol: u8, port: u16) -> Decision {
        let (enforced, audit, selected_by) = match direction {
            Direction::Ingress => (
                self.ingress_enforced,
                self.ingress_audit,
                &self.ingress_selected_by,
            ),
            Direction::Egress => (
                self.egress_enforced,
                self.egress_audit,
                &self.egress_selected_by,
            ),
        };
        if !enforced {
            return Decision::NotEnforced;
        }
        let audited = |d: Decision| Decision::Audited {
            would_be: Box::new(d),
        };
        match self.lookup(identity, direction, protocol, port) {
            Some((_, v)) if v.deny && v.audit => audited(Decision::Denied {
                by: v.origin.clone(),
            }),
            Some((_, v)) if v.deny => Decision::Denied {
                by: v.origin.clone(),
            },
            Some((_, v)) => Decision::Allowed {
                by: v.origin.clone(),
                l7: v.l7.clone(),
            },
            None if audit => audited(Decision::DefaultDeny {
                selected_by: selected_by.clone(),
            }),
            None => Decision::DefaultDeny {
                selected_by: selected_by.clone(),
            },
        }
    }
}

/// Everything outside the endpoint that its policy depends on.
pub struct Context<'a> {
    /// Every identity with its labels (reserved, pods, CIDRs).
    pub identities: &'a [(u32, LabelSet)],
    /// Declared container ports per identity, for named ports.
    pub named_ports: &'a BTreeMap<u32, Vec<NamedPort>>,
    /// This cluster's name (the `cluster` entity).
    pub cluster: &'a str,
    /// Namespaces in audit mode.
    pub audit_namespaces: &'a std::collections::BTreeSet<String>,
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

fn is_world(labels: &LabelSet) -> bool {
    labels.iter().any(|l| {
        l.source == "reserved"
            && (l.key == "world" || l.key == "world-ipv4" || l.key == "world-ipv6")
    })
}

fn has_cidr_label(labels: &LabelSet, prefix: &ipnet::IpNet) -> bool {
    let want = prefix.to_string();
    labels.iter().any(|l| l.source == "cidr" && l.key == want)
}

fn cidr_family(labels: &LabelSet) -> Option<bool> {
    labels
        .iter()
        .find(|l| l.source == "cidr")
        .map(|l| l.key.contains(':'))
}

fn entity_matches(e: Entity, id: u32, labels: &LabelSet, cluster: &str) -> bool {
    use abi::identity as r;
    match e {
        Entity::All => true,
        Entity::None => false,
        Entity::World => is_world(labels),
        Entity::WorldIpv4 => {
            id == r::WORLD
                || id == r::WORLD_IPV4
                || (id > r::WORLD_IPV6 && is_world(labels) && cidr_family(labels) == Some(false))
        }
        Entity::WorldIpv6 => {
            id == r::WORLD
                || id == r::WORLD_IPV6
                || (id > r::WORLD_IPV6 && is_world(labels) && cidr_family(labels) == Some(true))
        }
        Entity::Host => id == r::HOST,
        Entity::RemoteNode => id == r::REMOTE_NODE || id == r::KUBE_APISERVER,
        Entity::KubeApiserver => id == r::KUBE_APISERVER,
        Entity::Ingress => id == r::INGRESS,
        Entity::Init => id == r::INIT,
        Entity::Health => id == r::HEALTH,
        Entity::Unmanaged => id == r::UNMANAGED,
        Entity::Cluster => {
            matches!(
                id,
                r::HOST
                    | r::UNMANAGED
                    | r::HEALTH
                    | r::INIT
                    | r::REMOTE_NODE
                    | r::KUBE_APISERVER
                    | r::INGRESS
            ) || labels.values("k8s", CLUSTER_LABEL).any(|v| v == cluster)
        }
    }
}

/// The identities a peer selects; 0 stands for "any identity".
fn peer_identities(peer: &Peer, ctx: &Context<'_>) -> Vec<u32> {
    if let Peer::Entity(Entity::All) = peer {
        return vec![0];
    }
    ctx.identities
        .iter()
        .filter(|(id, l)| peer_matches(peer, *id, l, ctx.cluster))
        .map(|(id, _)| *id)
        .collect()
}

/// Whether one peer selects one (non-wildcard) identity.
fn peer_matches(peer: &Peer, id: u32, l: &LabelSet, cluster: &str) -> bool {
    match peer {
        Peer::Entity(e) => entity_matches(*e, id, l, cluster),
        Peer::Endpoints(s) => s.matches(l),
        Peer::Cidr { prefix, except } => {
            let inside = if prefix.prefix_len() == 0 {
                is_world(l)
                    && cidr_family(l).is_none_or(|v6| v6 == matches!(prefix, ipnet::IpNet::V6(_)))
            } else {
                has_cidr_label(l, prefix)
            };
            inside && !except.iter().any(|e| has_cidr_label(l, e))
        }
        // IPs learned by the DNS proxy carry the labels of the selectors
        // whose names resolved to them.
        Peer::Fqdn(sel) => {
            let key = sel.label_key();
            l.iter().any(|x| x.source == "fqdn" && x.key == key)
        }
        Peer::Unresolved(_) => false,
    }
}

/// Whether a peer rule's L3 part selects this identity (for incremental
/// updates of cached peer sets; rules without L3 peers select "any").
pub fn peer_selects(pr: &PeerRule, id: u32, labels: &LabelSet, ctx: &Context<'_>) -> bool {
    match &pr.peers {
        None => false,
        Some(peers) => peers
            .iter()
            .any(|p| peer_matches(p, id, labels, ctx.cluster)),
    }
}

/// (protocol number, port, port bits) triples a peer rule allows, for a
/// peer whose named ports are `named`.
fn port_keys<'a>(
    pr: &'a PeerRule,
    named: &dyn Fn(&str) -> Vec<(u8, u16)>,
) -> Vec<(u8, u16, u8, Option<&'a L7>)> {
    if pr.all_ports() {
        return vec![(0, 0, 0, None)];
    }
    let mut out = Vec::new();
    for t in &pr.to_ports {
        let l7 = t.l7.as_ref();
        if t.ports.is_empty() {
            out.push((0, 0, 0, l7));
        }
        for p in &t.ports {
            match &p.port {
                Port::Any if p.protocol == Protocol::Any => out.push((0, 0, 0, l7)),
                Port::Any => out.extend(p.protocol.numbers().iter().map(|&n| (n, 0, 0, l7))),
                Port::Range(a, b) => {
                    for &n in p.protocol.numbers() {
                        out.extend(
                            port_blocks(*a, *b)
                                .into_iter()
                                .map(|(port, bits)| (n, port, bits, l7)),
                        );
                    }
                }
                Port::Named(name) => {
                    for (n, port) in named(name) {
                        if p.protocol.numbers().contains(&n) {
                            out.push((n, port, 16, l7));
                        }
                    }
                }
            }
        }
    }
    for i in &pr.icmps {
        out.push((if i.ipv6 { 58 } else { 1 }, i.icmp_type as u16, 16, None));
    }
    out
}

fn resolve_named(ports: Option<&Vec<NamedPort>>, name: &str) -> Vec<(u8, u16)> {
    ports
        .into_iter()
        .flatten()
        .filter(|p| p.name == name)
        .flat_map(|p| p.protocol.numbers().iter().map(move |&n| (n, p.port)))
        .collect()
}

/// Computes one endpoint's policy. `identity` and `labels` are the
/// endpoint's own.
/// Audit mode for a whole namespace: every drop the policy would make in
/// either direction is forwarded and reported with verdict AUDIT.
pub fn audit_everything(p: &mut EndpointPolicy) {
    p.ingress_audit = p.ingress_enforced;
    p.egress_audit = p.egress_enforced;
    for v in p.entries.values_mut() {
        if v.deny {
            v.audit = true;
        }
    }
}

/// The namespace an identity's labels place it in.
pub fn namespace_of(labels: &LabelSet) -> Option<&str> {
    labels.values("k8s", crate::labels::NAMESPACE_LABEL).next()
}

pub fn endpoint_policy(
    identity: u32,
    labels: &LabelSet,
    policies: &[Policy],
    ctx: &Context<'_>,
) -> EndpointPolicy {
    let selecting: Vec<Selected<'_>> = policies
        .iter()
        .flat_map(|p| p.rules.iter().enumerate().map(move |(i, r)| (p, i, r)))
        .filter(|(_, _, r)| r.selects(labels))
        .collect();
    let mut out = compute_selected(identity, &selecting, ctx, &|_, _, _, _, pr| {
        resolve_peers(pr, ctx)
    });
    if namespace_of(labels).is_some_and(|ns| ctx.audit_namespaces.contains(ns)) {
        audit_everything(&mut out);
    }
    out
}

/// A rule selecting an endpoint: the policy, the rule's index, the rule.
pub type Selected<'a> = (&'a Policy, usize, &'a crate::model::Rule);

/// Resolves a peer rule to its peer identities: (policy, rule index,
/// direction, entry index, peer rule) -> sorted identities (0 = any).
pub type Resolve<'a> = dyn Fn(&Policy, usize, Direction, usize, &PeerRule) -> Vec<u32> + 'a;

/// The identities a peer rule's L3 part selects (sorted; 0 = any peer,
/// none for the empty rule `{}`).
pub fn resolve_peers(pr: &PeerRule, ctx: &Context<'_>) -> Vec<u32> {
    let mut ids: Vec<u32> = match &pr.peers {
        None if pr.all_ports() => vec![],
        None => vec![0],
        Some(peers) => peers.iter().flat_map(|p| peer_identities(p, ctx)).collect(),
    };
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// An endpoint's policy from the rules that select it, with peers resolved
/// by `resolve` (a scan, or the engine's cache).
pub fn compute_selected(
    identity: u32,
    selecting: &[Selected<'_>],
    ctx: &Context<'_>,
    resolve: &Resolve<'_>,
) -> EndpointPolicy {
    let mut out = EndpointPolicy::default();
    let mut allows: BTreeMap<EntryKey, EntryValue> = BTreeMap::new();
    let mut denies: BTreeMap<EntryKey, EntryValue> = BTreeMap::new();
    let mut enforced_for_real = [false, false];
    let requires = |dir: Direction| -> Vec<&Selector> {
        selecting
            .iter()
            .flat_map(|(_, _, r)| match dir {
                Direction::Ingress => r.ingress.iter().flatten(),
                Direction::Egress => r.egress.iter().flatten(),
            })
            .flat_map(|pr| pr.requires.iter())
            .collect()
    };
    let requires = [requires(Direction::Ingress), requires(Direction::Egress)];
    let all_named: Vec<NamedPort> = ctx
        .named_ports
        .values()
        .flatten()
        .cloned()
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();

    for (policy, rule_index, rule) in selecting {
        // Made once per rule: every entry's origin shares them. The origin
        // names the policy as people do (its kind beside its name).
        let (kind, key): (std::sync::Arc<str>, std::sync::Arc<str>) =
            (policy.kind.name().into(), policy.name_key().into());
        for (direction, section, default_deny) in [
            (Direction::Ingress, &rule.ingress, rule.ingress_default_deny),
            (Direction::Egress, &rule.egress, rule.egress_default_deny),
        ] {
            let Some(peer_rules) = section else { continue };
            let d = side(direction);
            if default_deny {
                let (enforced, selected_by) = match direction {
                    Direction::Ingress => (&mut out.ingress_enforced, &mut out.ingress_selected_by),
                    Direction::Egress => (&mut out.egress_enforced, &mut out.egress_selected_by),
                };
                *enforced = true;
                if !policy.audit {
                    enforced_for_real[d] = true;
                }
                if !selected_by.iter().any(|p| **p == *key) {
                    selected_by.push(key.to_string());
                }
            }
            for (entry, pr) in peer_rules.iter().enumerate() {
                if pr.auth_required && !pr.deny {
                    continue;
                }
                let origin = Origin {
                    kind: kind.clone(),
                    policy: key.clone(),
                    rule: *rule_index,
                    direction,
                    entry,
                };
                let mut ids = resolve(policy, *rule_index, direction, entry, pr);
                if !requires[d].is_empty() {
                    let meets = |l: &LabelSet| requires[d].iter().all(|s| s.matches(l));
                    let expanded: Vec<u32> = if ids.contains(&0) {
                        ctx.identities
                            .iter()
                            .filter(|(_, l)| meets(l))
                            .map(|(id, _)| *id)
                            .collect()
                    } else {
                        ctx.identities
                            .iter()
                            .filter(|(id, l)| ids.binary_search(id).is_ok() && meets(l))
                            .map(|(id, _)| *id)
                            .collect()
                    };
                    ids = expanded;
                }
                ids.sort_unstable();
                ids.dedup();
                let target = if pr.deny { &mut denies } else { &mut allows };
                for id in ids {
                    // Named ports: the endpoint's own for ingress, the
                    // peer's for egress (every endpoint's for "any peer").
                    let peer_ports = match (direction, id) {
                        (Direction::Ingress, _) => ctx.named_ports.get(&identity),
                        (Direction::Egress, 0) => Some(&all_named),
                        (Direction::Egress, id) => ctx.named_ports.get(&id),
                    };
                    let named = |name: &str| resolve_named(peer_ports, name);
                    for (protocol, port, port_bits, l7) in port_keys(pr, &named) {
                        let key = EntryKey {
                            identity: id,
                            direction,
                            protocol,
                            port,
                            port_bits,
                        };
                        match target.entry(key) {
                            std::collections::btree_map::Entry::Vacant(v) => {
                                v.insert(EntryValue {
                                    deny: pr.deny,
                                    origin: origin.clone(),
                                    l7: l7.cloned(),
                                    audit: policy.audit,
                                });
                            }
                            std::collections::btree_map::Entry::Occupied(mut o) => {
                                if !pr.deny {
                                    merge_l7(&mut o.get_mut().l7, l7);
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    out.ingress_audit = out.ingress_enforced && !enforced_for_real[side(Direction::Ingress)];
    out.egress_audit = out.egress_enforced && !enforced_for_real[side(Direction::Egress)];
    allows.retain(|k, _| {
        !denies
            .keys()
            .any(|d| (d.identity == k.identity || d.identity == 0) && d.covers(k))
    });
    out.entries = allows;
    out.entries.extend(denies);
    out
}

/// Two allows on the same key: a plain allow subsumes L7 rules (§3.8: the L7
/// restriction has no effect for those peers); rules of one kind are a union,
/// where an empty list already allows every request. Different kinds on one
/// port keep the first (Cilium refuses such policies).
fn merge_l7(existing: &mut Option<L7>, new: Option<&L7>) {
    let Some(current) = existing.as_mut() else {
        return;
    };
    let Some(new) = new else {
        *existing = None;
        return;
    };
    fn union<T: Clone + PartialEq>(a: &mut Vec<T>, b: &[T]) {
        if a.is_empty() || b.is_empty() {
            a.clear();
        } else {
            for r in b {
                if !a.contains(r) {
                    a.push(r.clone());
                }
            }
        }
    }
    match (current, new) {
        (L7::Http(a), L7::Http(b)) => union(a, b),
        (L7::Dns(a), L7::Dns(b)) => union(a, b),
        (L7::Kafka(a), L7::Kafka(b)) => union(a, b),
        _ => {}
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
                EntryKey { identity: 0, direction: Direction::Ingress, protocol: 6, port: *bp, port_bits: *bits }.matches(6, p)
            });
            for p in [lo, hi, lo.saturating_sub(1).max(1), hi.saturating_add(1), lo / 2 + hi / 2] {
                proptest::prop_assert_eq!(covered(p), p >= lo && p <= hi, "port {}", p);
            }
        }
    }
}
