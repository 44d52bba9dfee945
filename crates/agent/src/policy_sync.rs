//! Computed policy -> kernel policy map, by difference: only entries that
//! changed are written or removed, so an unrelated change touches nothing.

use std::collections::{BTreeMap, HashMap};

use abi::{
    PolicyKeyData, PolicyValue, EP_F_EGRESS_AUDIT, EP_F_EGRESS_ENFORCED, EP_F_INGRESS_AUDIT,
    EP_F_INGRESS_ENFORCED, POLICY_F_AUDIT, POLICY_F_DENY, POLICY_F_REDIRECT,
    POLICY_STATIC_PREFIX_BITS,
};
use datapath::{Datapath, PolicyEntry};
use policy::{Direction, EndpointPolicy, Origin};

use crate::state::State;
use crate::Error;

type MapKey = (u32, PolicyKeyData);

/// Entries one endpoint may hold (Cilium's `bpf-policy-map-max`).
pub const MAX_ENTRIES_PER_ENDPOINT: usize = 16384;

#[derive(Default)]
pub struct PolicySync {
    /// Endpoints whose policy did not fit: they fail closed.
    pub overflowed: std::collections::BTreeSet<u32>,
    /// What the kernel map holds, per endpoint id.
    realized: HashMap<u32, BTreeMap<MapKey, PolicyValue>>,
    computed: HashMap<u32, EndpointPolicy>,
    /// Cookie -> rule attribution; cookie 0 means "no rule". Shared with
    /// the observer, which attributes flows with it.
    origins: std::sync::Arc<std::sync::RwLock<Vec<Origin>>>,
    cookies: HashMap<Origin, u32>,
}

impl PolicySync {
    /// Reads what an earlier run left in the kernel map.
    pub fn load_realized(&mut self, dp: &Datapath) -> Result<(), Error> {
        for e in dp.policy_entries()? {
            let ep = u32::from_be(e.key.ep_id);
            self.realized
                .entry(ep)
                .or_default()
                .insert((e.prefix_len, e.key), e.value);
        }
        Ok(())
    }

    pub fn computed(&self, ep: u32) -> Option<&EndpointPolicy> {
        self.computed.get(&ep)
    }

    /// The cookie -> rule table, for flow attribution.
    pub fn origins(&self) -> std::sync::Arc<std::sync::RwLock<Vec<Origin>>> {
        self.origins.clone()
    }

    fn cookie(&mut self, o: &Origin) -> u32 {
        if let Some(c) = self.cookies.get(o) {
            return *c;
        }
        let mut origins = self.origins.write().unwrap_or_else(|e| e.into_inner());
        origins.push(o.clone());
        let c = origins.len() as u32;
        self.cookies.insert(o.clone(), c);
        c
    }

    /// Recomputes every endpoint's policy and writes the differences.
    pub fn apply(&mut self, state: &State, dp: &Datapath, cluster: &str) -> Result<(), Error> {
        let policies: Vec<policy::Policy> = state.policies.values().cloned().collect();
        let identities = state.all_identities();
        let named_ports = state.named_ports();
        let ctx = policy::Context {
            identities: &identities,
            named_ports: &named_ports,
            cluster,
        };
        let mut wanted_all: HashMap<u32, BTreeMap<MapKey, PolicyValue>> = HashMap::new();
        for ep in state.endpoints.values() {
            let computed = policy::endpoint_policy(ep.identity, &ep.labels, &policies, &ctx);
            let mut wanted = BTreeMap::new();
            for (k, v) in &computed.entries {
                let prefix = k.proto_port_prefix();
                let key = PolicyKeyData {
                    ep_id: ep.id.to_be(),
                    identity: k.identity.to_be(),
                    direction: match k.direction {
                        Direction::Ingress => abi::Direction::Ingress as u8,
                        Direction::Egress => abi::Direction::Egress as u8,
                    },
                    protocol: k.protocol,
                    dport: k.port.to_be(),
                };
                let mut flags = 0;
                if v.deny {
                    flags |= POLICY_F_DENY;
                }
                if v.audit {
                    flags |= POLICY_F_AUDIT;
                }
                if v.l7.is_some() {
                    flags |= POLICY_F_REDIRECT;
                }
                let value = PolicyValue {
                    cookie: self.cookie(&v.origin),
                    flags,
                    prefix,
                    pad: 0,
                };
                wanted.insert((POLICY_STATIC_PREFIX_BITS + prefix as u32, key), value);
            }
            let mut flags = 0;
            if computed.ingress_enforced {
                flags |= EP_F_INGRESS_ENFORCED;
            }
            if computed.egress_enforced {
                flags |= EP_F_EGRESS_ENFORCED;
            }
            if computed.ingress_audit {
                flags |= EP_F_INGRESS_AUDIT;
            }
            if computed.egress_audit {
                flags |= EP_F_EGRESS_AUDIT;
            }
            if wanted.len() > MAX_ENTRIES_PER_ENDPOINT {
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
            let empty = BTreeMap::new();
            let have = self.realized.get(&ep.id).unwrap_or(&empty);
            for (k, v) in &wanted {
                if have.get(k) != Some(v) {
                    dp.upsert_policy(&PolicyEntry {
                        prefix_len: k.0,
                        key: k.1,
                        value: *v,
                    })?;
                }
            }
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
            for k in have.keys() {
                if !wanted.contains_key(k) {
                    dp.remove_policy(k.0, k.1)?;
                }
            }
            self.computed.insert(ep.id, computed);
            wanted_all.insert(ep.id, wanted);
        }
        // Endpoints that are gone: remove everything they had.
        for (ep, have) in &self.realized {
            if !wanted_all.contains_key(ep) {
                for k in have.keys() {
                    dp.remove_policy(k.0, k.1)?;
                }
                self.computed.remove(ep);
            }
        }
        self.realized = wanted_all;
        Ok(())
    }
}
