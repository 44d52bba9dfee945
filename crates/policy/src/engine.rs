//! Incremental policy computation (Cilium's selector cache idea).
//!
//! The engine keeps, for every peer rule, the identities it selects, and for
//! every local identity, the rules that select it. An update (policies,
//! identities, named ports, local endpoints) is diffed against what the
//! engine holds; only the peer sets and the local identities it touches are
//! recomputed, and the caller learns exactly which identities' policy
//! changed, so that only their endpoints' map entries are rewritten.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::compute::{
    audit_everything, compute_selected, namespace_of, peer_selects, resolve_peers, Context,
    Direction, EndpointPolicy, EntryKey, EntryValue, Selected,
};
use crate::labels::LabelSet;
use crate::model::{NamedPort, PeerRule, Policy, Port};

/// (policy key, rule index)
type RuleRef = (String, usize);
/// A peer rule within its policy: (rule index, direction, entry index).
type PeerAt = (usize, Direction, usize);

/// What the engine computes from; everything borrowed from the caller.
#[derive(Clone, Copy)]
pub struct Inputs<'a> {
    pub policies: &'a BTreeMap<String, Policy>,
    /// Changes whenever `policies` changes (equal: the policy diff is skipped).
    pub policy_generation: u64,
    pub identities: &'a [(u32, &'a LabelSet)],
    pub named_ports: &'a BTreeMap<u32, Vec<NamedPort>>,
    /// The identities of local endpoints (whose policy is wanted): the
    /// agent's identity allocator holds exactly these.
    pub local: &'a BTreeMap<u32, LabelSet>,
    /// Namespaces in audit mode.
    pub audit_namespaces: &'a BTreeSet<String>,
    /// What may differ from the last update, when the caller knows;
    /// `None`: compare everything.
    pub hint: Option<&'a Hint>,
}

/// The identities an update may have changed: only these are compared
/// with what the engine holds (a caller that tracks its changes saves the
/// comparison of every identity's labels on every update).
#[derive(Clone, Debug, Default)]
pub struct Hint {
    /// Identities that may have been added, removed or relabelled
    /// (`Inputs::identities` must then be sorted by number).
    pub identities: BTreeSet<u32>,
    /// Local identities that may have come or gone.
    pub local: BTreeSet<u32>,
    /// Policies (by key) that may have been added, changed or removed.
    pub policies: BTreeSet<String>,
}

#[derive(Default)]
pub struct Engine {
    policy_generation: Option<u64>,
    audit_namespaces: BTreeSet<String>,
    cluster: String,
    policies: BTreeMap<String, Policy>,
    /// Every identity, sorted by number (the `Context` slice).
    identities: Vec<(u32, LabelSet)>,
    named_ports: BTreeMap<u32, Vec<NamedPort>>,
    /// Identities of local endpoints: the ones whose policy is computed.
    local: BTreeMap<u32, LabelSet>,
    /// Per policy key: each peer rule's selected identities (sorted).
    peers: HashMap<String, HashMap<PeerAt, Vec<u32>>>,
    selecting: HashMap<u32, BTreeSet<RuleRef>>,
    computed: HashMap<u32, EndpointPolicy>,
    /// What the last update replaced: the changed identities' policies
    /// before it (for callers that send differences) ...
    replaced: HashMap<u32, EndpointPolicy>,
    /// ... or, for those whose policy changed only in the entries of
    /// peers that moved in or out of rules' peer sets, those entries
    /// (`None`: removed); the rest of their policy stands.
    patched: HashMap<u32, EntryPatch>,
}

/// Entries set (`Some`) and removed (`None`) in one policy.
pub type EntryPatch = BTreeMap<EntryKey, Option<EntryValue>>;

fn peer_rules(p: &Policy) -> impl Iterator<Item = (usize, Direction, usize, &PeerRule)> {
    p.rules.iter().enumerate().flat_map(|(ri, r)| {
        let ing = r
            .ingress
            .iter()
            .flatten()
            .enumerate()
            .map(move |(e, pr)| (ri, Direction::Ingress, e, pr));
        let eg = r
            .egress
            .iter()
            .flatten()
            .enumerate()
            .map(move |(e, pr)| (ri, Direction::Egress, e, pr));
        ing.chain(eg)
    })
}

fn uses_named_ports(p: &Policy, rule: usize) -> bool {
    peer_rules(p)
        .filter(|(ri, ..)| *ri == rule)
        .any(|(.., pr)| pr.ports().any(|port| matches!(port.port, Port::Named(_))))
}

fn uses_requires(p: &Policy, rule: usize) -> bool {
    peer_rules(p)
        .filter(|(ri, ..)| *ri == rule)
        .any(|(.., pr)| !pr.requires.is_empty())
}

impl Engine {
    pub fn new(cluster: &str) -> Self {
        Self {
            cluster: cluster.to_string(),
            ..Default::default()
        }
    }

    /// The policy a local identity had before the last update changed it.
    pub fn replaced(&self, identity: u32) -> Option<&EndpointPolicy> {
        self.replaced.get(&identity)
    }

    /// The entries the last update changed in a local identity's policy,
    /// when it changed nothing else (see `replaced` otherwise).
    pub fn patched(&self, identity: u32) -> Option<&EntryPatch> {
        self.patched.get(&identity)
    }

    /// The computed policy of a local identity.
    pub fn policy(&self, identity: u32) -> Option<&EndpointPolicy> {
        self.computed.get(&identity)
    }

    fn ctx(&self) -> Context<'_> {
        Context {
            identities: &self.identities,
            named_ports: &self.named_ports,
            cluster: &self.cluster,
            audit_namespaces: &self.audit_namespaces,
        }
    }

    /// Brings the engine in line with the given state; returns the local
    /// identities whose computed policy changed. Cheap when little changed:
    /// nothing is cloned but what is new.
    pub fn update(&mut self, input: &Inputs<'_>) -> BTreeSet<u32> {
        let Inputs {
            policies,
            policy_generation,
            identities,
            named_ports,
            local,
            audit_namespaces,
            hint,
        } = *input;
        self.replaced.clear();
        self.patched.clear();
        let mut dirty: BTreeSet<u32> = BTreeSet::new();
        if &self.audit_namespaces != audit_namespaces {
            let flipped: BTreeSet<&String> = self
                .audit_namespaces
                .symmetric_difference(audit_namespaces)
                .collect();
            for (id, labels) in &self.local {
                if namespace_of(labels).is_some_and(|ns| flipped.iter().any(|f| f.as_str() == ns)) {
                    dirty.insert(*id);
                }
            }
            self.audit_namespaces = audit_namespaces.clone();
        }

        // Which identities changed (added, removed, relabelled): patched in
        // place in the sorted list.
        let mut changed_ids: BTreeSet<u32> = BTreeSet::new();
        match hint {
            Some(h) => {
                debug_assert!(identities.windows(2).all(|w| w[0].0 < w[1].0));
                for id in &h.identities {
                    let new = identities
                        .binary_search_by_key(id, |(i, _)| *i)
                        .ok()
                        .map(|at| identities[at].1);
                    let old = self.identities.binary_search_by_key(id, |(i, _)| *i);
                    match (old, new) {
                        (Ok(at), Some(l)) if &self.identities[at].1 == l => continue,
                        (Ok(at), Some(l)) => self.identities[at].1 = l.clone(),
                        (Err(at), Some(l)) => self.identities.insert(at, (*id, l.clone())),
                        (Ok(at), None) => {
                            self.identities.remove(at);
                        }
                        (Err(_), None) => continue,
                    }
                    changed_ids.insert(*id);
                }
            }
            None => {
                let new_ids: HashMap<u32, &LabelSet> =
                    identities.iter().map(|(i, l)| (*i, *l)).collect();
                for (id, l) in identities {
                    match self.identities.binary_search_by_key(id, |(i, _)| *i) {
                        Ok(at) if &self.identities[at].1 == *l => {}
                        Ok(at) => {
                            self.identities[at].1 = (*l).clone();
                            changed_ids.insert(*id);
                        }
                        Err(at) => {
                            self.identities.insert(at, (*id, (*l).clone()));
                            changed_ids.insert(*id);
                        }
                    }
                }
                self.identities.retain(|(id, _)| {
                    let keep = new_ids.contains_key(id);
                    if !keep {
                        changed_ids.insert(*id);
                    }
                    keep
                });
            }
        }

        // Which policies changed (skipped when the generation says none).
        let unchanged = self.policy_generation == Some(policy_generation);
        self.policy_generation = Some(policy_generation);
        let mut changed_policies: Vec<String> = Vec::new();
        match hint {
            // Only the policies the caller says it touched are compared.
            Some(h) if !unchanged => changed_policies.extend(
                h.policies
                    .iter()
                    .filter(|k| self.policies.get(*k) != policies.get(*k))
                    .cloned(),
            ),
            Some(_) => {}
            None => {
                changed_policies.extend(
                    policies
                        .iter()
                        .filter(|(k, p)| !unchanged && self.policies.get(*k) != Some(*p))
                        .map(|(k, _)| k.clone()),
                );
                changed_policies.extend(
                    self.policies
                        .keys()
                        .filter(|k| !unchanged && !policies.contains_key(*k))
                        .cloned(),
                );
            }
        }

        // Rules whose selector may have changed (their policy did): matched
        // again against every local identity.
        let mut changed_rules: BTreeSet<RuleRef> = BTreeSet::new();
        // Rules whose peers moved: recomputed for the identities they select.
        let mut moved_rules: BTreeSet<RuleRef> = BTreeSet::new();
        // Changed policies: drop their old peer sets and selections, build new ones.
        for key in &changed_policies {
            if let Some(old) = self.policies.remove(key) {
                for ri in 0..old.rules.len() {
                    changed_rules.insert((key.clone(), ri));
                }
                self.peers.remove(key);
                for (id, rules) in self.selecting.iter_mut() {
                    let before = rules.len();
                    rules.retain(|r| &r.0 != key);
                    if rules.len() != before {
                        dirty.insert(*id);
                    }
                }
            }
            if let Some(new) = policies.get(key) {
                for ri in 0..new.rules.len() {
                    changed_rules.insert((key.clone(), ri));
                }
                self.policies.insert(key.clone(), new.clone());
            }
        }
        let ctx_ids = std::mem::take(&mut self.identities);
        {
            let ctx = Context {
                identities: &ctx_ids,
                named_ports,
                cluster: &self.cluster,
                audit_namespaces,
            };
            for key in &changed_policies {
                if let Some(p) = self.policies.get(key) {
                    let sets = peer_rules(p)
                        .map(|(ri, dir, e, pr)| ((ri, dir, e), resolve_peers(pr, &ctx)))
                        .collect();
                    self.peers.insert(key.clone(), sets);
                }
            }
            // Unchanged policies: move only the changed identities in or out
            // of their peer sets.
            if !changed_ids.is_empty() {
                // Looked up once, not per rule (`ctx_ids` is sorted).
                let changed_labels: Vec<(u32, Option<&LabelSet>)> = changed_ids
                    .iter()
                    .map(|id| {
                        let at = ctx_ids.binary_search_by_key(id, |(i, _)| *i);
                        (*id, at.ok().map(|at| &ctx_ids[at].1))
                    })
                    .collect();
                for (key, p) in &self.policies {
                    if changed_policies.contains(key) {
                        continue;
                    }
                    let Some(sets) = self.peers.get_mut(key) else {
                        continue;
                    };
                    for (ri, dir, e, pr) in peer_rules(p) {
                        let Some(set) = sets.get_mut(&(ri, dir, e)) else {
                            continue;
                        };
                        if set.first() == Some(&0) || pr.peers.is_none() {
                            continue;
                        }
                        let mut moved = false;
                        for (id, labels) in &changed_labels {
                            let now = labels.is_some_and(|l| peer_selects(pr, *id, l, &ctx));
                            let pos = set.binary_search(id);
                            match (now, pos) {
                                (true, Err(at)) => {
                                    set.insert(at, *id);
                                    moved = true;
                                }
                                (false, Ok(at)) => {
                                    set.remove(at);
                                    moved = true;
                                }
                                _ => {}
                            }
                        }
                        if moved {
                            moved_rules.insert((key.clone(), ri));
                        }
                    }
                }
            }
        }
        self.identities = ctx_ids;

        // Local identities: new ones get their selecting rules; changed
        // rules are re-matched against every local identity.
        let gone: Vec<u32> = match hint {
            Some(h) => h
                .local
                .iter()
                .filter(|id| !local.contains_key(id))
                .copied()
                .collect(),
            None => self
                .local
                .keys()
                .filter(|id| !local.contains_key(id))
                .copied()
                .collect(),
        };
        for id in gone {
            self.local.remove(&id);
            self.selecting.remove(&id);
            self.computed.remove(&id);
        }
        let mut fresh = |id: &u32, labels: &LabelSet, this: &mut Self| {
            if this.local.get(id) != Some(labels) {
                let rules: BTreeSet<RuleRef> = this
                    .policies
                    .iter()
                    .flat_map(|(k, p)| p.rules.iter().enumerate().map(move |(ri, r)| (k, ri, r)))
                    .filter(|(_, _, r)| r.selects(labels))
                    .map(|(k, ri, _)| (k.clone(), ri))
                    .collect();
                this.selecting.insert(*id, rules);
                this.local.insert(*id, labels.clone());
                dirty.insert(*id);
            }
        };
        match hint {
            Some(h) => {
                for id in &h.local {
                    if let Some(labels) = local.get(id) {
                        fresh(id, labels, self);
                    }
                }
            }
            None => {
                for (id, labels) in local {
                    fresh(id, labels, self);
                }
            }
        }
        // Identities whose rules only gained or lost peers: recomputed for
        // the changed peers alone (unless dirty for another reason).
        let mut peers_moved: BTreeSet<u32> = BTreeSet::new();
        if !moved_rules.is_empty() {
            for (id, rules) in &self.selecting {
                if rules.iter().any(|r| moved_rules.contains(r)) {
                    peers_moved.insert(*id);
                }
            }
        }
        for (key, ri) in &changed_rules {
            let rule = self.policies.get(key).and_then(|p| p.rules.get(*ri));
            for (id, labels) in &self.local {
                let rules = self.selecting.entry(*id).or_default();
                let selects = rule.is_some_and(|r| r.selects(labels));
                let had = rules.contains(&(key.clone(), *ri));
                if selects {
                    rules.insert((key.clone(), *ri));
                }
                if selects || had {
                    dirty.insert(*id);
                }
            }
        }
        // Named ports and requires depend on more than the peer sets.
        let named_changed = &self.named_ports != named_ports;
        if named_changed {
            self.named_ports = named_ports.clone();
        }
        if named_changed || !changed_ids.is_empty() {
            // The rules that depend on more, found once per update.
            let depending: BTreeSet<(&str, usize)> = self
                .policies
                .iter()
                .flat_map(|(k, p)| (0..p.rules.len()).map(move |ri| (k, p, ri)))
                .filter(|(_, p, ri)| {
                    (named_changed && uses_named_ports(p, *ri))
                        || (!changed_ids.is_empty() && uses_requires(p, *ri))
                })
                .map(|(k, _, ri)| (k.as_str(), ri))
                .collect();
            if !depending.is_empty() {
                for (id, rules) in &self.selecting {
                    if rules
                        .iter()
                        .any(|(k, ri)| depending.contains(&(k.as_str(), *ri)))
                    {
                        dirty.insert(*id);
                    }
                }
            }
        }

        // Recompute the dirty identities from the caches.
        let mut changed = BTreeSet::new();
        for id in peers_moved.difference(&dirty) {
            if self.patch_peers(*id, &changed_ids) {
                changed.insert(*id);
            }
        }
        for id in dirty {
            let Some(selected) = self.selected(id) else {
                continue;
            };
            let peers = &self.peers;
            let resolve = |p: &Policy, ri: usize, dir: Direction, e: usize, _: &PeerRule| {
                peers
                    .get(&p.key())
                    .and_then(|sets| sets.get(&(ri, dir, e)))
                    .cloned()
                    .unwrap_or_default()
            };
            let mut computed = compute_selected(id, &selected, &self.ctx(), &resolve);
            let ns = self.local.get(&id).and_then(|l| namespace_of(l));
            if ns.is_some_and(|ns| self.audit_namespaces.contains(ns)) {
                audit_everything(&mut computed);
            }
            if self.computed.get(&id) != Some(&computed) {
                if let Some(old) = self.computed.insert(id, computed) {
                    self.replaced.insert(id, old);
                }
                changed.insert(id);
            }
        }
        changed
    }

    /// The rules that select a local identity, with their policies.
    fn selected(&self, id: u32) -> Option<Vec<Selected<'_>>> {
        let rules = self.selecting.get(&id)?;
        Some(
            rules
                .iter()
                .filter_map(|(k, ri)| {
                    let p = self.policies.get(k)?;
                    Some((p, *ri, p.rules.get(*ri)?))
                })
                .collect(),
        )
    }

    /// Recomputes a local identity's entries for the `peers` that moved in
    /// or out of its rules' peer sets, the rest of its policy standing
    /// (those entries depend only on the peer: its own rules' verdicts,
    /// its named ports, and the deny-any entries, which do not change
    /// here; callers dirty identities with `requires` or named-port rules
    /// the long way). Returns whether anything changed.
    fn patch_peers(&mut self, id: u32, peers: &BTreeSet<u32>) -> bool {
        let (Some(selected), Some(current)) = (self.selected(id), self.computed.get(&id)) else {
            return false;
        };
        let sets = &self.peers;
        let only_moved = |p: &Policy, ri: usize, dir: Direction, e: usize, _: &PeerRule| {
            sets.get(&p.key())
                .and_then(|s| s.get(&(ri, dir, e)))
                .map(|set| set.iter().filter(|i| peers.contains(i)).copied().collect())
                .unwrap_or_default()
        };
        let mut fresh = compute_selected(id, &selected, &self.ctx(), &only_moved).entries;
        // Deny-any entries (not recomputed: no peer of theirs moved) still
        // shadow the new allows.
        let deny_any: Vec<&EntryKey> = current
            .entries
            .iter()
            .filter(|(k, v)| k.identity == 0 && v.deny)
            .map(|(k, _)| k)
            .collect();
        fresh.retain(|k, v| v.deny || !deny_any.iter().any(|d| d.covers(k)));
        let mut patch = EntryPatch::new();
        for (k, _) in current.entries.iter() {
            if peers.contains(&k.identity) && !fresh.contains_key(k) {
                patch.insert(*k, None);
            }
        }
        for (k, v) in fresh {
            if current.entries.get(&k) != Some(&v) {
                patch.insert(k, Some(v));
            }
        }
        if patch.is_empty() {
            return false;
        }
        let Some(policy) = self.computed.get_mut(&id) else {
            return false;
        };
        for (k, v) in &patch {
            match v {
                Some(v) => policy.entries.insert(*k, v.clone()),
                None => policy.entries.remove(k),
            };
        }
        self.patched.insert(id, patch);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compute::endpoint_policy;
    use crate::labels::Label;

    fn set(ns: &str, app: &str) -> LabelSet {
        LabelSet::new(vec![
            Label::new("k8s", "app", app),
            Label::new("k8s", crate::labels::NAMESPACE_LABEL, ns),
        ])
    }

    /// Runs updates as a caller would: with no hint, or (`hinted`) with
    /// the hint a caller that tracks its changes gives (exactly the
    /// identities that differ from the previous update's inputs).
    #[derive(Default)]
    struct Runner {
        hinted: bool,
        prev_ids: Vec<(u32, LabelSet)>,
        prev_local: BTreeMap<u32, LabelSet>,
        prev_policies: BTreeMap<String, Policy>,
    }

    fn differing(a: &BTreeMap<u32, LabelSet>, b: &BTreeMap<u32, LabelSet>) -> BTreeSet<u32> {
        a.keys()
            .chain(b.keys())
            .filter(|id| a.get(id) != b.get(id))
            .copied()
            .collect()
    }

    impl Runner {
        /// One update; the policy generation is the policies' own content, so
        /// that the test never lies about whether they changed.
        fn run(
            &mut self,
            e: &mut Engine,
            pols: &BTreeMap<String, Policy>,
            ids: &[(u32, LabelSet)],
            local: &BTreeMap<u32, LabelSet>,
        ) -> BTreeSet<u32> {
            let named = BTreeMap::new();
            let mut id_refs: Vec<(u32, &LabelSet)> = ids.iter().map(|(i, l)| (*i, l)).collect();
            id_refs.sort_by_key(|(i, _)| *i);
            let generation = {
                use std::hash::{Hash, Hasher};
                let mut h = std::collections::hash_map::DefaultHasher::new();
                format!("{pols:?}").hash(&mut h);
                h.finish()
            };
            let hint = Hint {
                identities: differing(
                    &self.prev_ids.iter().cloned().collect(),
                    &ids.iter().cloned().collect(),
                ),
                local: differing(&self.prev_local, local),
                policies: self
                    .prev_policies
                    .keys()
                    .chain(pols.keys())
                    .filter(|k| self.prev_policies.get(*k) != pols.get(*k))
                    .cloned()
                    .collect(),
            };
            self.prev_policies = pols.clone();
            self.prev_ids = ids.to_vec();
            self.prev_local = local.clone();
            e.update(&Inputs {
                policies: pols,
                policy_generation: generation,
                identities: &id_refs,
                named_ports: &named,
                local,
                audit_namespaces: &Default::default(),
                hint: self.hinted.then_some(&hint),
            })
        }
    }

    fn policies(yaml: &str) -> BTreeMap<String, Policy> {
        crate::parse("t.yaml", yaml, "shop")
            .unwrap()
            .policies
            .into_iter()
            .map(|p| (p.key(), p))
            .collect()
    }

    /// The engine's incremental answer equals a full computation.
    fn check_against_full(
        e: &Engine,
        pols: &BTreeMap<String, Policy>,
        ids: &[(u32, LabelSet)],
        local: &BTreeMap<u32, LabelSet>,
    ) {
        let list: Vec<Policy> = pols.values().cloned().collect();
        let named = BTreeMap::new();
        let audit = Default::default();
        let ctx = Context {
            identities: ids,
            named_ports: &named,
            cluster: "default",
            audit_namespaces: &audit,
        };
        for (id, labels) in local {
            assert_eq!(
                e.policy(*id),
                Some(&endpoint_policy(*id, labels, &list, &ctx)),
                "identity {id}"
            );
        }
    }

    #[test]
    fn incremental_updates_equal_full_computation_and_touch_only_what_changed() {
        scenario(false);
    }

    /// The same with the caller's hints: only the hinted identities are
    /// compared, and the answers are the same.
    #[test]
    fn hinted_updates_equal_full_computation() {
        scenario(true);
    }

    fn scenario(hinted: bool) {
        let mut runner = Runner {
            hinted,
            ..Default::default()
        };
        let mut run =
            |e: &mut Engine,
             pols: &BTreeMap<String, Policy>,
             ids: &[(u32, LabelSet)],
             local: &BTreeMap<u32, LabelSet>| runner.run(e, pols, ids, local);
        let mut ids = vec![
            (256, set("shop", "web")),
            (257, set("shop", "db")),
            (258, set("shop", "cache")),
        ];
        let mut local: BTreeMap<u32, LabelSet> = ids.iter().cloned().collect();
        let mut pols = policies(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: db}\nspec:\n  endpointSelector: {matchLabels: {app: db}}\n  ingress:\n  - fromEndpoints: [{matchExpressions: [{key: app, operator: In, values: [web, api]}]}]\n",
        );
        let mut e = Engine::new("default");
        let changed = run(&mut e, &pols, &ids, &local);
        assert_eq!(changed, BTreeSet::from([256, 257, 258]));
        check_against_full(&e, &pols, &ids, &local);

        // A new identity a peer selector matches: only db's policy changes.
        ids.push((259, set("shop", "api")));
        local.insert(259, set("shop", "api"));
        let changed = run(&mut e, &pols, &ids, &local);
        assert_eq!(
            changed,
            BTreeSet::from([257, 259]),
            "db gains api; api itself is new"
        );
        check_against_full(&e, &pols, &ids, &local);

        // An unrelated identity: nothing changes but the new endpoint.
        ids.push((260, set("shop", "batch")));
        local.insert(260, set("shop", "batch"));
        assert_eq!(run(&mut e, &pols, &ids, &local), BTreeSet::from([260]));

        // A policy selecting cache: only cache changes.
        pols.extend(policies(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: cache}\nspec:\n  endpointSelector: {matchLabels: {app: cache}}\n  ingress: [{}]\n",
        ));
        assert_eq!(run(&mut e, &pols, &ids, &local), BTreeSet::from([258]));
        check_against_full(&e, &pols, &ids, &local);

        // Deleting a policy releases what it selected.
        pols.remove("shop/cache");
        assert_eq!(run(&mut e, &pols, &ids, &local), BTreeSet::from([258]));
        check_against_full(&e, &pols, &ids, &local);
        assert!(!e.policy(258).unwrap().ingress_enforced);

        // Removing web's identity takes it out of db's peers.
        ids.retain(|(id, _)| *id != 256);
        local.remove(&256);
        assert_eq!(run(&mut e, &pols, &ids, &local), BTreeSet::from([257]));
        check_against_full(&e, &pols, &ids, &local);
        assert!(
            run(&mut e, &pols, &ids, &local).is_empty(),
            "no change, no work"
        );
    }

    /// Peers coming and going (CIDR identities, as learned addresses do)
    /// patch only their own entries, under deny-any entries, denies of
    /// their own and an L7 rule a plain allow subsumes; the result is the
    /// full computation's.
    #[test]
    fn moved_peers_patch_their_entries_only() {
        for hinted in [false, true] {
            let mut runner = Runner {
                hinted,
                ..Default::default()
            };
            let cidr = |p: &str| {
                let p: ipnet::IpNet = p.parse().unwrap();
                crate::cidr::prefix_labels(&p, |q| {
                    ["10.0.0.0/8", "10.1.0.0/16"]
                        .iter()
                        .any(|x| x.parse::<ipnet::IpNet>().unwrap() == *q)
                        || q == &p
                })
            };
            let mut ids = vec![(256, set("shop", "web"))];
            let local: BTreeMap<u32, LabelSet> = ids.iter().cloned().collect();
            let pols = policies(
                "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: web}\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  ingress:\n  - fromCIDR: [10.0.0.0/8]\n    toPorts: [{ports: [{port: \"80\", protocol: TCP}], rules: {http: [{method: GET}]}}]\n  - fromCIDR: [10.2.0.0/16]\n    toPorts: [{ports: [{port: \"80\", protocol: TCP}]}]\n  - fromCIDR: [10.0.0.0/8]\n    toPorts: [{ports: [{port: \"22\", protocol: TCP}]}]\n  ingressDeny:\n  - toPorts: [{ports: [{port: \"22\", protocol: TCP}]}]\n  - fromCIDR: [10.1.0.0/16]\n",
            );
            let mut e = Engine::new("default");
            runner.run(&mut e, &pols, &ids, &local);
            check_against_full(&e, &pols, &ids, &local);
            for (id, prefix) in [
                (16777217, "10.0.0.0/8"),
                (16777218, "10.1.0.0/16"),
                (16777219, "10.1.2.3/32"),
                (16777220, "10.2.0.9/32"),
            ] {
                ids.push((id, cidr(prefix)));
                assert_eq!(
                    runner.run(&mut e, &pols, &ids, &local),
                    BTreeSet::from([256]),
                    "{prefix} (hinted: {hinted})"
                );
                let patch = e.patched(256).expect("patched, not recomputed");
                assert!(patch.keys().all(|k| k.identity == id), "{patch:?}");
                check_against_full(&e, &pols, &ids, &local);
            }
            // A peer going: its entries go.
            ids.retain(|(id, _)| *id != 16777220);
            assert_eq!(
                runner.run(&mut e, &pols, &ids, &local),
                BTreeSet::from([256])
            );
            assert!(e.patched(256).unwrap().values().all(Option::is_none));
            check_against_full(&e, &pols, &ids, &local);
        }
    }
}
