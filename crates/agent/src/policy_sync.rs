//! Policy -> kernel policy map, incrementally: the policy engine recomputes
//! only the identities a change touches, and only the entries that differ
//! from what the kernel holds are written or removed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use abi::{
    PolicyKeyData, PolicyValue, EP_F_AUDIT_ALL, EP_F_EGRESS_AUDIT, EP_F_EGRESS_ENFORCED,
    EP_F_HOST_FIREWALL, EP_F_INGRESS_AUDIT, EP_F_INGRESS_ENFORCED, HOST_ENDPOINT_ID,
    POLICY_F_AUDIT, POLICY_F_DENY, POLICY_F_REDIRECT, POLICY_STATIC_PREFIX_BITS,
};
use datapath::{Datapath, PolicyEntry};
use policy::{EndpointPolicy, Engine, LabelSet, Origin};

use crate::state::{Changes, State};
use crate::Error;

/// A policy-map key with its LPM prefix length.
pub type MapKey = (u32, PolicyKeyData);

/// Entries one endpoint may hold (Cilium's `bpf-policy-map-max`).
pub const MAX_ENTRIES_PER_ENDPOINT: usize = 16384;

#[derive(Default)]
pub struct PolicySync {
    /// Endpoints whose policy did not fit: they fail closed.
    pub overflowed: std::collections::BTreeSet<u32>,
    engine: Option<Engine>,
    /// What the kernel map holds, per endpoint id.
    realized: HashMap<u32, BTreeMap<MapKey, PolicyValue>>,
    /// The identity each endpoint's realized entries were computed for.
    realized_identity: HashMap<u32, u32>,
    /// Endpoints whose realized entries came from the kernel at start
    /// (an earlier run's cookies: not counted in `cookies`).
    uncounted: std::collections::HashSet<u32>,
    cookies: Cookies,
    /// The CIDR identities with their labels, sorted by number, as of the
    /// last apply (recomputed when prefixes, names or policies change).
    cidr_labels: BTreeMap<u32, (ipnet::IpNet, LabelSet)>,
    /// Prefix -> its number in `cidr_labels`.
    cidr_ids: HashMap<ipnet::IpNet, u32>,
    /// Declared container ports per identity, as of the last apply.
    named_ports: BTreeMap<u32, Vec<policy::NamedPort>>,
    /// The last apply failed part way: the next compares everything.
    needs_full: bool,
    /// Each local identity's entries as last written to its endpoints.
    templates: HashMap<u32, Arc<Template>>,
    /// Endpoints realizing each identity (`realized_identity` inverted):
    /// a changed identity's endpoints without a walk over all of them.
    identity_users: HashMap<u32, BTreeSet<u32>>,
    /// The identities whose computed policy the last apply changed
    /// (what the L7 proxy is sent again) ...
    last_changed: BTreeSet<u32>,
    /// ... and those that stopped being local (dropped there).
    last_gone: BTreeSet<u32>,
    /// The local identities as of the last apply.
    last_local: BTreeSet<u32>,
    /// The last apply compared everything (the proxy is sent everything).
    last_full: bool,
    /// The host firewall's endpoint (the node itself), when it is on.
    host: Option<HostEndpoint>,
    /// With the host endpoint: the local identities and the host's
    /// (identity host), kept in step with the state's by the changed
    /// identities (the engine's `local`).
    local_with_host: BTreeMap<u32, LabelSet>,
}

/// The node as an endpoint of the host firewall: identity host, labelled
/// `reserved:host` and with the node's labels (what host policies'
/// nodeSelectors match).
#[derive(Clone, Debug)]
pub struct HostEndpoint {
    pub labels: LabelSet,
    /// Audit mode: whatever the host's policy would drop is forwarded and
    /// reported with verdict AUDIT (how to try host policies safely).
    pub audit: bool,
}

/// One identity's policy in the kernel's form, for any of its endpoints.
struct Template {
    /// Keys with endpoint 0 (`for_endpoint` sets it).
    entries: BTreeMap<MapKey, PolicyValue>,
    flags: u32,
}

impl Template {
    fn for_endpoint(&self, ep_id: u32) -> BTreeMap<MapKey, PolicyValue> {
        self.entries
            .iter()
            .map(|(k, v)| {
                let mut k = *k;
                k.1.ep_id = ep_id.to_be();
                (k, *v)
            })
            .collect()
    }
}

/// What changes between two templates of one identity: keys to write
/// (`None`: remove) and new flags if they differ.
struct Delta {
    entries: Vec<(MapKey, Option<PolicyValue>)>,
    flags: Option<u32>,
}

impl Delta {
    fn between(old: &Template, new: &Template) -> Arc<Self> {
        let mut entries: Vec<(MapKey, Option<PolicyValue>)> = new
            .entries
            .iter()
            .filter(|(k, v)| old.entries.get(k) != Some(v))
            .map(|(k, v)| (*k, Some(*v)))
            .collect();
        // Writes before removals: an entry replaced by a wider one never
        // leaves a gap.
        entries.extend(
            old.entries
                .keys()
                .filter(|k| !new.entries.contains_key(k))
                .map(|k| (*k, None)),
        );
        Arc::new(Delta {
            entries,
            flags: (old.flags != new.flags).then_some(new.flags),
        })
    }
}

fn upsert_endpoint(dp: &Datapath, ep: &crate::state::Endpoint, flags: u32) -> Result<(), Error> {
    dp.upsert_endpoint(
        ep.ipv4,
        abi::EndpointInfo {
            ep_id: ep.id,
            identity: ep.identity,
            host_ifindex: ep.host_ifindex,
            flags,
            pod_mac: ep.pod_mac,
            host_mac: ep.host_mac,
            pad: 0,
        },
    )?;
    Ok(())
}

impl PolicySync {
    /// A policy sync whose released rule cookies are handed out again
    /// after `delay` (tests: reuse at once, the hardest case for the
    /// accounting of which cookies are in the maps).
    pub fn with_cookie_reuse_after(delay: std::time::Duration) -> Self {
        let mut sync = Self::default();
        sync.cookies.reuse_after = delay;
        sync
    }

    /// Turns the host firewall on (`Some`) or off before the first apply:
    /// the node's own traffic then meets the host policies selecting it.
    pub fn set_host_endpoint(&mut self, host: Option<HostEndpoint>) {
        self.host = host;
        self.needs_full = true;
    }

    /// Reads what an earlier run left in the kernel map.
    pub fn load_realized(&mut self, dp: &Datapath) -> Result<(), Error> {
        for e in dp.policy_entries()? {
            let ep = u32::from_be(e.key.ep_id);
            self.uncounted.insert(ep);
            self.realized
                .entry(ep)
                .or_default()
                .insert((e.prefix_len, e.key), e.value);
        }
        Ok(())
    }

    /// The computed policy of an endpoint (by its identity).
    pub fn computed(&self, identity: u32) -> Option<&EndpointPolicy> {
        self.engine.as_ref()?.policy(identity)
    }

    /// What the last apply changed in the computed policies, as the L7
    /// proxy takes it: a difference from what it was sent before, a whole
    /// policy for a new local identity, `Gone` for one no longer local.
    pub fn proxy_changes(&self) -> Vec<(u32, crate::l7proxy::PolicyChange)> {
        use crate::l7proxy::PolicyChange;
        let Some(engine) = self.engine.as_ref() else {
            return Vec::new();
        };
        if self.last_full {
            // After a failure the proxy may have missed a change: whole
            // policies, not differences.
            let mut out: Vec<(u32, PolicyChange)> = self
                .last_local
                .iter()
                .filter_map(|id| Some((*id, PolicyChange::Set(engine.policy(*id)?.clone()))))
                .collect();
            out.extend(self.last_gone.iter().map(|id| (*id, PolicyChange::Gone)));
            return out;
        }
        let mut out: Vec<(u32, PolicyChange)> = self
            .last_changed
            .iter()
            .map(|id| {
                let change = match (
                    engine.patched(*id),
                    engine.replaced(*id),
                    engine.policy(*id),
                ) {
                    (Some(patch), _, Some(new)) => PolicyChange::Patch {
                        rest: new.clone_without_entries(),
                        set: patch
                            .iter()
                            .filter_map(|(k, v)| Some((*k, v.clone()?)))
                            .collect(),
                        removed: patch
                            .iter()
                            .filter(|(_, v)| v.is_none())
                            .map(|(k, _)| *k)
                            .collect(),
                    },
                    (None, Some(old), Some(new)) => PolicyChange::between(old, new),
                    (None, None, Some(new)) => PolicyChange::Set(new.clone()),
                    (_, _, None) => PolicyChange::Gone,
                };
                (*id, change)
            })
            .collect();
        out.extend(self.last_gone.iter().map(|id| (*id, PolicyChange::Gone)));
        out
    }

    /// The cookie -> rule table, for flow attribution.
    pub fn policy_refs(
        &self,
    ) -> std::sync::Arc<std::sync::RwLock<Vec<flow::record::SharedPolicyRef>>> {
        self.cookies.refs.clone()
    }

    /// The shared attribution of a rule: the one its cookie stands for
    /// (every rule in the maps has one), else built afresh.
    pub fn attribution(&self, o: &Origin) -> flow::record::SharedPolicyRef {
        let refs = self.cookies.refs.read().unwrap_or_else(|e| e.into_inner());
        self.cookies
            .by_origin
            .get(o)
            .and_then(|c| refs.get(c.checked_sub(1)? as usize))
            .cloned()
            .unwrap_or_else(|| std::sync::Arc::new(crate::observer::policy_ref(o)))
    }

    fn cookie(&mut self, o: &Origin) -> u32 {
        self.cookies.get(o, std::time::Instant::now())
    }

    /// Moves cookie holds from an endpoint's old entries to its new ones
    /// (new ones first: a rule that stays keeps its cookie); `counted`:
    /// the old ones were counted (not an earlier run's).
    fn move_holds(
        &mut self,
        old: &BTreeMap<MapKey, PolicyValue>,
        counted: bool,
        new: &BTreeMap<MapKey, PolicyValue>,
    ) {
        let now = std::time::Instant::now();
        for v in new.values() {
            self.cookies.hold(v.cookie);
        }
        if counted {
            for v in old.values() {
                self.cookies.release(v.cookie, now);
            }
        }
    }

    /// Records the identity an endpoint's realized entries are for (an
    /// identity's template lives while an endpoint realizes it: its
    /// cookies are held only through those endpoints' entries; `write`
    /// drops the others when it is done).
    fn set_realized_identity(&mut self, ep: u32, identity: Option<u32>) {
        let old = match identity {
            Some(id) => self.realized_identity.insert(ep, id),
            None => self.realized_identity.remove(&ep),
        };
        if let Some(old) = old {
            if let Some(users) = self.identity_users.get_mut(&old) {
                users.remove(&ep);
                if users.is_empty() {
                    self.identity_users.remove(&old);
                }
            }
        }
        if let Some(id) = identity {
            self.identity_users.entry(id).or_default().insert(ep);
        }
    }

    /// An identity's entries (keys with endpoint 0) and endpoint flags,
    /// made once per identity and change: its endpoints share them.
    fn template(&mut self, engine: &Engine, identity: u32) -> Arc<Template> {
        if let Some(t) = self.templates.get(&identity) {
            return t.clone();
        }
        let empty = EndpointPolicy::default();
        let computed = engine.policy(identity).unwrap_or(&empty);
        let (entries, flags) = map_entries(0, computed, |o| self.cookie(o));
        let t = Arc::new(Template { entries, flags });
        self.templates.insert(identity, t.clone());
        t
    }

    /// Brings an endpoint whose realized entries are its identity's old
    /// template to the new one: only `delta`'s keys are written.
    fn write_delta(
        &mut self,
        dp: &Datapath,
        ep: &crate::state::Endpoint,
        delta: &Delta,
    ) -> Result<(), Error> {
        let now = std::time::Instant::now();
        // Forgotten until written, as a whole write.
        let mut have = self.realized.remove(&ep.id).unwrap_or_default();
        self.set_realized_identity(ep.id, None);
        for (k, v) in &delta.entries {
            let mut k = *k;
            k.1.ep_id = ep.id.to_be();
            let was = match v {
                Some(v) => {
                    dp.upsert_policy(&PolicyEntry {
                        prefix_len: k.0,
                        key: k.1,
                        value: *v,
                    })?;
                    self.cookies.hold(v.cookie);
                    have.insert(k, *v)
                }
                None => {
                    dp.remove_policy(k.0, k.1)?;
                    have.remove(&k)
                }
            };
            if let Some(was) = was {
                self.cookies.release(was.cookie, now);
            }
        }
        if let Some(flags) = delta.flags {
            upsert_endpoint(dp, ep, flags)?;
        }
        self.realized.insert(ep.id, have);
        self.set_realized_identity(ep.id, Some(ep.identity));
        Ok(())
    }

    /// Brings the kernel in line with `state`, touching only endpoints whose
    /// policy changed. `changes`: what changed since the last apply (from
    /// the state's record), so that only that is compared; `None` compares
    /// everything. Returns how many endpoints were rewritten.
    pub fn apply(
        &mut self,
        state: &State,
        dp: &Datapath,
        cluster: &str,
        changes: Option<&Changes>,
    ) -> Result<usize, Error> {
        // After a failed apply, what the kernel holds is not known by key.
        let full = changes.is_none() || std::mem::take(&mut self.needs_full);
        let c = changes.cloned().unwrap_or_default();
        // CIDR identities' labels depend on the prefixes, the learned names
        // and the policies' toFQDNs selectors. Patched for the /32s that
        // changed (a learned address) when that is all; else made anew.
        let cidr_touched = self.refresh_cidr_labels(state, &c, full);
        if full || !c.pods.is_empty() || !c.endpoints.is_empty() || !c.remote_endpoints.is_empty() {
            self.named_ports = state.named_ports();
        }
        // Borrow everything: cloning 5,000 label sets per change would cost
        // more than the change itself. Sorted by number: reserved, pods'
        // (this node's and the cluster's), CIDRs'.
        let identities: Vec<(u32, &LabelSet)> = state
            .pod_identities()
            .chain(self.cidr_labels.iter().map(|(id, (_, l))| (*id, l)))
            .collect();
        // The identities the changed endpoints had and have now.
        let mut hint = policy::engine::Hint::default();
        for id in &c.endpoints {
            hint.local.extend(self.realized_identity.get(id));
            hint.local
                .extend(state.endpoints().get(id).map(|e| e.identity));
        }
        // With the host firewall the host is one more local identity: the
        // local identities are mirrored, patched by the same hint.
        let mut local_with_host = std::mem::take(&mut self.local_with_host);
        let local = match &self.host {
            None => state.local_identities(),
            Some(h) => {
                let theirs = state.local_identities();
                if full {
                    local_with_host = theirs.clone();
                } else {
                    for id in &hint.local {
                        match theirs.get(id) {
                            Some(l) => local_with_host.insert(*id, l.clone()),
                            None => local_with_host.remove(id),
                        };
                    }
                }
                local_with_host.insert(abi::identity::HOST, h.labels.clone());
                &local_with_host
            }
        };
        hint.identities = hint.local.clone();
        hint.policies = c.policies.clone();
        hint.identities.extend(cidr_touched);
        hint.identities.extend(&c.cluster_identities);
        let mut engine = self.engine.take().unwrap_or_else(|| Engine::new(cluster));
        let changed = engine.update(&policy::engine::Inputs {
            policies: state.policies(),
            policy_generation: state.policy_generation(),
            identities: &identities,
            named_ports: &self.named_ports,
            local,
            audit_namespaces: state.audit_namespaces(),
            hint: (!full).then_some(&hint),
        });
        // For the L7 proxy: the identities whose policy changed, and the
        // ones that stopped being local (after a full apply: any).
        self.last_changed = changed.clone();
        self.last_full = full;
        self.last_gone = if full {
            self.last_local
                .iter()
                .filter(|id| !local.contains_key(id))
                .copied()
                .collect()
        } else {
            hint.local
                .iter()
                .filter(|id| !local.contains_key(id))
                .copied()
                .collect()
        };
        if full {
            self.last_local = local.keys().copied().collect();
        } else {
            for id in &hint.local {
                if local.contains_key(id) {
                    self.last_local.insert(*id);
                } else {
                    self.last_local.remove(id);
                }
            }
        }
        self.local_with_host = local_with_host;
        let result = self
            .write(state, dp, &engine, &changed, (!full).then_some(&c))
            .and_then(|n| {
                let host = full || changed.contains(&abi::identity::HOST);
                Ok(n + usize::from(host && self.write_host(dp, &engine)?))
            });
        self.engine = Some(engine);
        self.needs_full = result.is_err();
        result
    }

    /// Brings `cidr_labels` in line with `state`; returns the identities
    /// whose labels may have changed (added, removed, relabelled).
    fn refresh_cidr_labels(&mut self, state: &State, c: &Changes, full: bool) -> BTreeSet<u32> {
        let mut touched: BTreeSet<u32> = BTreeSet::new();
        if !full && c.cidr_identities.is_empty() && c.fqdn.is_empty() && c.policies.is_empty() {
            return touched;
        }
        // A wider prefix changes the labels of those it holds, a policy
        // the toFQDNs selectors: everything again.
        let only_hosts = !full
            && c.policies.is_empty()
            && c.cidr_identities
                .iter()
                .all(|p| p.prefix_len() == p.max_prefix_len());
        let prefixes: BTreeSet<ipnet::IpNet> = if only_hosts {
            // The changed names' addresses, before and after.
            let mut set = c.cidr_identities.clone();
            let host = |ip: &std::net::Ipv4Addr| ipnet::IpNet::V4((*ip).into());
            set.extend(c.fqdn_ips.iter().map(host));
            for name in &c.fqdn {
                set.extend(
                    state
                        .fqdn()
                        .get(name)
                        .into_iter()
                        .flat_map(|e| e.ips.keys())
                        .map(host),
                );
            }
            set
        } else {
            touched.extend(self.cidr_labels.keys());
            self.cidr_labels.clear();
            self.cidr_ids.clear();
            state.cidr_identities().keys().copied().collect()
        };
        for p in &prefixes {
            if let Some(id) = self.cidr_ids.remove(p) {
                self.cidr_labels.remove(&id);
                touched.insert(id);
            }
        }
        for (p, id, labels) in state.cidr_labels_of(&prefixes) {
            touched.insert(id);
            self.cidr_ids.insert(p, id);
            self.cidr_labels.insert(id, (p, labels));
        }
        touched
    }

    /// Writes the entries of endpoints whose policy changed (`changed`
    /// identities) or that are new or moved (`changes`; `None`: every
    /// endpoint is compared with what the kernel holds). An endpoint that
    /// kept its identity gets only the difference between its identity's
    /// old and new entries (a learned address: one entry, not a rebuild).
    fn write(
        &mut self,
        state: &State,
        dp: &Datapath,
        engine: &Engine,
        changed: &BTreeSet<u32>,
        changes: Option<&Changes>,
    ) -> Result<usize, Error> {
        let all = changes.is_none();
        if all {
            self.templates.clear();
        }
        // Incremental: the changed endpoints and those realizing a changed
        // identity (an endpoint that moved to one is a changed endpoint).
        let candidates: Vec<&crate::state::Endpoint> = match changes {
            Some(c) => {
                let mut ids: BTreeSet<u32> = c.endpoints.clone();
                for id in changed {
                    ids.extend(self.identity_users.get(id).into_iter().flatten());
                }
                ids.iter()
                    .filter_map(|id| state.endpoints().get(id))
                    .collect()
            }
            None => state.endpoints().values().collect(),
        };
        // The changed identities' entries as last written, for the deltas.
        let mut old: HashMap<u32, Arc<Template>> = changed
            .iter()
            .filter_map(|id| Some((*id, self.templates.remove(id)?)))
            .collect();
        let mut deltas: HashMap<u32, Arc<Delta>> = HashMap::new();
        // Identities whose policy changed in a few entries only (a learned
        // address): the template is patched and the delta is the patch,
        // no walk over the whole policy.
        for id in changed {
            let (Some(patch), false) = (engine.patched(*id), all) else {
                continue;
            };
            let Some(previous) = old.remove(id) else {
                continue;
            };
            let mut template = Arc::try_unwrap(previous).unwrap_or_else(|shared| Template {
                entries: shared.entries.clone(),
                flags: shared.flags,
            });
            // Writes before removals, as `Delta::between`.
            let mut writes = Vec::new();
            let mut removals = Vec::new();
            for (k, v) in patch {
                let key = map_key(0, k);
                match v {
                    Some(v) => {
                        let value = map_value(k, v, &mut |o| {
                            self.cookies.get(o, std::time::Instant::now())
                        });
                        template.entries.insert(key, value);
                        writes.push((key, Some(value)));
                    }
                    None => {
                        template.entries.remove(&key);
                        removals.push((key, None));
                    }
                }
            }
            writes.extend(removals);
            deltas.insert(
                *id,
                Arc::new(Delta {
                    entries: writes,
                    flags: None,
                }),
            );
            self.templates.insert(*id, Arc::new(template));
        }
        let mut rewritten = 0;
        for ep in candidates {
            let fresh = self.realized_identity.get(&ep.id) != Some(&ep.identity);
            if !all && !fresh && !changed.contains(&ep.identity) {
                continue;
            }
            let template = self.template(engine, ep.identity);
            let overflows = template.entries.len() > MAX_ENTRIES_PER_ENDPOINT;
            let delta = match (deltas.get(&ep.identity), old.get(&ep.identity)) {
                (Some(delta), _) => Some(delta.clone()),
                (None, Some(previous)) => Some(
                    deltas
                        .entry(ep.identity)
                        .or_insert_with(|| Delta::between(previous, &template))
                        .clone(),
                ),
                (None, None) => None,
            };
            if let Some(delta) = delta.filter(|_| {
                !all && !fresh
                    && !overflows
                    && !self.overflowed.contains(&ep.id)
                    && !self.uncounted.contains(&ep.id)
                    && self.realized.contains_key(&ep.id)
            }) {
                rewritten += 1;
                self.write_delta(dp, ep, &delta)?;
                continue;
            }
            if !all && !fresh && !changed.contains(&ep.identity) {
                continue;
            }
            let mut wanted = template.for_endpoint(ep.id);
            let mut flags = template.flags;
            if overflows {
                // Never truncate silently: fail closed, say so loudly.
                tracing::error!(
                    endpoint_id = ep.id,
                    pod = %ep.pod,
                    namespace = %ep.namespace,
                    entries = wanted.len(),
                    max = MAX_ENTRIES_PER_ENDPOINT,
                    "policy map would overflow: endpoint fails closed (all traffic denied)"
                );
                self.overflowed.insert(ep.id);
                wanted.clear();
                flags = EP_F_INGRESS_ENFORCED | EP_F_EGRESS_ENFORCED;
            } else {
                self.overflowed.remove(&ep.id);
            }
            // Entries before flags: an endpoint that becomes enforced
            // already finds its allows.
            // Forgotten until written: a write that fails leaves the
            // endpoint to be rewritten whole.
            // (A failed write leaves the old entries' cookies held: a
            // cookie kept too long, never one reused while in the maps.)
            let have = self.realized.remove(&ep.id).unwrap_or_default();
            let counted = !self.uncounted.remove(&ep.id);
            self.set_realized_identity(ep.id, None);
            let mut wrote = write_new_entries(dp, &have, &wanted)?;
            upsert_endpoint(dp, ep, flags)?;
            wrote |= remove_old_entries(dp, &have, &wanted)?;
            if wrote || fresh {
                rewritten += 1;
            }
            self.move_holds(&have, counted, &wanted);
            self.realized.insert(ep.id, wanted);
            self.set_realized_identity(ep.id, Some(ep.identity));
        }
        // Endpoints that are gone: remove everything they had.
        let gone: Vec<u32> = match changes {
            Some(c) => c
                .endpoints
                .iter()
                .filter(|id| !state.endpoints().contains_key(id) && self.realized.contains_key(id))
                .copied()
                .collect(),
            None => self
                .realized
                .keys()
                .filter(|id| **id != HOST_ENDPOINT_ID && !state.endpoints().contains_key(id))
                .copied()
                .collect(),
        };
        for id in gone {
            if let Some(have) = self.realized.remove(&id) {
                let counted = !self.uncounted.remove(&id);
                for k in have.keys() {
                    dp.remove_policy(k.0, k.1)?;
                }
                self.move_holds(&have, counted, &BTreeMap::new());
            }
            self.set_realized_identity(id, None);
            self.overflowed.remove(&id);
        }
        let users = &self.identity_users;
        self.templates.retain(|id, _| users.contains_key(id));
        Ok(rewritten)
    }
}

impl PolicySync {
    /// Brings the host endpoint's entries and flags in line with its
    /// computed policy (none, and flags 0, without the host firewall);
    /// returns whether anything was written. Entries before flags, as
    /// for pods.
    fn write_host(&mut self, dp: &Datapath, engine: &Engine) -> Result<bool, Error> {
        let (wanted, flags) = match &self.host {
            Some(h) => {
                let empty = EndpointPolicy::default();
                let computed = engine.policy(abi::identity::HOST).unwrap_or(&empty);
                let (entries, mut flags) = map_entries(HOST_ENDPOINT_ID, computed, |o| {
                    self.cookies.get(o, std::time::Instant::now())
                });
                flags |= EP_F_HOST_FIREWALL;
                if h.audit {
                    flags |= EP_F_AUDIT_ALL;
                }
                (entries, flags)
            }
            None => (BTreeMap::new(), 0),
        };
        let have = self.realized.remove(&HOST_ENDPOINT_ID).unwrap_or_default();
        let counted = !self.uncounted.remove(&HOST_ENDPOINT_ID);
        let mut wrote = write_new_entries(dp, &have, &wanted)?;
        if dp.host_endpoint()? != flags {
            wrote = true;
            dp.set_host_endpoint(flags)?;
        }
        wrote |= remove_old_entries(dp, &have, &wanted)?;
        self.move_holds(&have, counted, &wanted);
        if !wanted.is_empty() {
            self.realized.insert(HOST_ENDPOINT_ID, wanted);
        }
        Ok(wrote)
    }
}

/// Writes the entries of `wanted` that `have` lacks or holds otherwise;
/// whether it wrote any.
fn write_new_entries(
    dp: &Datapath,
    have: &BTreeMap<MapKey, PolicyValue>,
    wanted: &BTreeMap<MapKey, PolicyValue>,
) -> Result<bool, Error> {
    let mut wrote = false;
    for (k, v) in wanted {
        if have.get(k) != Some(v) {
            wrote = true;
            dp.upsert_policy(&PolicyEntry {
                prefix_len: k.0,
                key: k.1,
                value: *v,
            })?;
        }
    }
    Ok(wrote)
}

/// Removes the entries of `have` that `wanted` lacks; whether it removed
/// any.
fn remove_old_entries(
    dp: &Datapath,
    have: &BTreeMap<MapKey, PolicyValue>,
    wanted: &BTreeMap<MapKey, PolicyValue>,
) -> Result<bool, Error> {
    let mut removed = false;
    for k in have.keys() {
        if !wanted.contains_key(k) {
            removed = true;
            dp.remove_policy(k.0, k.1)?;
        }
    }
    Ok(removed)
}

/// How long a released cookie waits before it names another rule: events
/// already in the ring buffer or the proxy's queue still carry it.
const COOKIE_REUSE_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

/// Rule cookies: the number a policy-map entry carries so that a flow can
/// name the rule that decided it (cookie - 1 indexes `refs`; 0 is "no
/// rule"). A cookie is held while realized entries carry it; released, it
/// is handed to another rule after `COOKIE_REUSE_AFTER`, so the table is
/// as large as the rules in force, not every rule ever seen.
struct Cookies {
    /// `COOKIE_REUSE_AFTER`, but for tests.
    reuse_after: std::time::Duration,
    /// Shared with the observer, which attributes flows with it: built
    /// once per rule, so a flow's attribution is a reference count.
    refs: std::sync::Arc<std::sync::RwLock<Vec<flow::record::SharedPolicyRef>>>,
    by_origin: HashMap<Origin, u32>,
    /// Cookie - 1 -> its rule (`None`: released).
    origins: Vec<Option<Origin>>,
    /// Cookie - 1 -> realized entries carrying it.
    held: Vec<u32>,
    /// Released cookies, oldest first, with when.
    released: std::collections::VecDeque<(std::time::Instant, u32)>,
}

impl Default for Cookies {
    fn default() -> Self {
        Self {
            reuse_after: COOKIE_REUSE_AFTER,
            refs: Default::default(),
            by_origin: Default::default(),
            origins: Default::default(),
            held: Default::default(),
            released: Default::default(),
        }
    }
}

impl Cookies {
    fn get(&mut self, o: &Origin, now: std::time::Instant) -> u32 {
        if let Some(c) = self.by_origin.get(o) {
            return *c;
        }
        let attribution = std::sync::Arc::new(crate::observer::policy_ref(o));
        let mut refs = self.refs.write().unwrap_or_else(|e| e.into_inner());
        let reusable = self
            .released
            .front()
            .is_some_and(|(at, _)| now.duration_since(*at) >= self.reuse_after);
        let reused = if reusable {
            self.released.pop_front()
        } else {
            None
        };
        let c = match reused {
            Some((_, c)) => {
                refs[c as usize - 1] = attribution;
                self.origins[c as usize - 1] = Some(o.clone());
                c
            }
            None => {
                refs.push(attribution);
                self.origins.push(Some(o.clone()));
                self.held.push(0);
                refs.len() as u32
            }
        };
        self.by_origin.insert(o.clone(), c);
        c
    }

    fn hold(&mut self, c: u32) {
        if let Some(n) = c.checked_sub(1).and_then(|i| self.held.get_mut(i as usize)) {
            *n += 1;
        }
    }

    fn release(&mut self, c: u32, now: std::time::Instant) {
        let Some(i) = c.checked_sub(1).map(|i| i as usize) else {
            return;
        };
        let Some(n) = self.held.get_mut(i) else {
            return;
        };
        *n = n.saturating_sub(1);
        if *n == 0 {
            if let Some(o) = self.origins[i].take() {
                self.by_origin.remove(&o);
                self.released.push_back((now, c));
            }
        }
    }
}

/// The kernel's form of one endpoint's computed policy: its policy-map
/// entries (keyed by LPM prefix length and key) and its endpoint flags
/// (`EP_F_*`); `cookie` names each rule for flow attribution.
pub fn map_entries(
    ep_id: u32,
    computed: &EndpointPolicy,
    mut cookie: impl FnMut(&Origin) -> u32,
) -> (BTreeMap<MapKey, PolicyValue>, u32) {
    let wanted = computed
        .entries
        .iter()
        .map(|(k, v)| (map_key(ep_id, k), map_value(k, v, &mut cookie)))
        .collect();
    let mut flags = 0;
    for (on, flag) in [
        (computed.ingress_enforced, EP_F_INGRESS_ENFORCED),
        (computed.egress_enforced, EP_F_EGRESS_ENFORCED),
        (computed.ingress_audit, EP_F_INGRESS_AUDIT),
        (computed.egress_audit, EP_F_EGRESS_AUDIT),
    ] {
        if on {
            flags |= flag;
        }
    }
    (wanted, flags)
}

/// The policy-map key of one entry (LPM prefix length, key).
fn map_key(ep_id: u32, k: &policy::EntryKey) -> MapKey {
    let prefix = k.proto_port_prefix();
    let key = PolicyKeyData {
        ep_id: ep_id.to_be(),
        identity: k.identity.to_be(),
        direction: k.direction as u8,
        protocol: k.protocol,
        dport: k.port.to_be(),
    };
    (POLICY_STATIC_PREFIX_BITS + prefix as u32, key)
}

/// The policy-map value of one entry.
fn map_value(
    k: &policy::EntryKey,
    v: &policy::EntryValue,
    cookie: &mut impl FnMut(&Origin) -> u32,
) -> PolicyValue {
    let mut flags = 0;
    if v.deny {
        flags |= POLICY_F_DENY;
    }
    if v.audit {
        flags |= POLICY_F_AUDIT;
    }
    // HTTP and Kafka rules send the connection to the L7 proxy, DNS rules
    // to the DNS proxy; l7proto rules are not enforced (no parser) and
    // allow at L4.
    match v.l7 {
        Some(policy::L7::Http(_) | policy::L7::Kafka(_)) => flags |= POLICY_F_REDIRECT,
        Some(policy::L7::Dns(_)) => flags |= abi::POLICY_F_REDIRECT_DNS,
        _ => {}
    }
    PolicyValue {
        cookie: cookie(&v.origin),
        flags,
        prefix: k.proto_port_prefix(),
        pad: 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Rule 0's first ingress entry of `policy`.
    fn rule(policy: &str) -> Origin {
        Origin {
            kind: "CiliumNetworkPolicy".into(),
            policy: policy.into(),
            rule: 0,
            direction: policy::compute::Direction::Ingress,
            entry: 0,
        }
    }

    /// A cookie lives while entries carry it; released, it names another
    /// rule only after the reuse delay, and the table stays the size of
    /// the rules in force.
    #[test]
    fn released_cookies_are_reused_after_the_delay() {
        let t0 = std::time::Instant::now();
        let mut c = Cookies::default();
        let a = c.get(&rule("shop/a"), t0);
        c.hold(a);
        c.hold(a);
        c.release(a, t0);
        assert_eq!(c.get(&rule("shop/a"), t0), a, "still held once");
        c.release(a, t0);
        // Released: a new rule soon after gets a new number ...
        let b = c.get(&rule("shop/b"), t0 + std::time::Duration::from_secs(1));
        assert_ne!(b, a);
        assert_eq!(
            c.refs.read().unwrap()[a as usize - 1].name,
            "a",
            "in-flight events still read a"
        );
        // ... and one after the delay takes a's.
        let later = t0 + COOKIE_REUSE_AFTER;
        let d = c.get(&rule("shop/d"), later);
        assert_eq!(d, a);
        assert_eq!(c.refs.read().unwrap()[a as usize - 1].name, "d");
        assert_eq!(c.refs.read().unwrap().len(), 2);
        // The released rule asks again: a fresh cookie, not its old one.
        assert_ne!(c.get(&rule("shop/a"), later), a);
    }

    #[test]
    fn attributions_are_the_cookie_tables_own() {
        let mut sync = PolicySync::default();
        let cookie = sync.cookie(&rule("shop/a"));
        let shared = sync.attribution(&rule("shop/a"));
        let table = sync.policy_refs();
        assert!(std::sync::Arc::ptr_eq(
            &shared,
            &table.read().unwrap()[cookie as usize - 1]
        ));
        // A rule without a cookie yet: built, not taken from another rule.
        assert_eq!(sync.attribution(&rule("shop/b")).name, "b");
        assert_eq!(shared.name, "a");
    }
}
