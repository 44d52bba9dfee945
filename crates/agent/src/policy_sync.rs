//! Computed policy -> kernel policy map, by difference: only entries that
//! changed are written or removed, so an unrelated change touches nothing.

use std::collections::{BTreeMap, HashMap};

use abi::{
    PolicyKeyData, PolicyValue, EP_F_EGRESS_ENFORCED, EP_F_INGRESS_ENFORCED, POLICY_F_DENY,
    POLICY_STATIC_PREFIX_BITS,
};
use datapath::{Datapath, PolicyEntry};
use policy::{Direction, EndpointPolicy, Origin};

use crate::state::State;
use crate::Error;

type MapKey = (u32, PolicyKeyData);

#[derive(Default)]
pub struct PolicySync {
    /// What the kernel map holds, per endpoint id.
    realized: HashMap<u32, BTreeMap<MapKey, PolicyValue>>,
    computed: HashMap<u32, EndpointPolicy>,
    /// Cookie -> rule attribution; cookie 0 means "no rule".
    origins: Vec<Origin>,
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

    /// The rule a datapath cookie stands for.
    pub fn origin(&self, cookie: u32) -> Option<&Origin> {
        cookie
            .checked_sub(1)
            .and_then(|i| self.origins.get(i as usize))
    }

    fn cookie(&mut self, o: &Origin) -> u32 {
        if let Some(c) = self.cookies.get(o) {
            return *c;
        }
        self.origins.push(o.clone());
        let c = self.origins.len() as u32;
        self.cookies.insert(o.clone(), c);
        c
    }

    /// Recomputes every endpoint's policy and writes the differences.
    pub fn apply(&mut self, state: &State, dp: &Datapath) -> Result<(), Error> {
        let policies: Vec<policy::Policy> = state.policies.values().cloned().collect();
        let identities = state.identities.all();
        let mut wanted_all: HashMap<u32, BTreeMap<MapKey, PolicyValue>> = HashMap::new();
        for ep in state.endpoints.values() {
            let computed = policy::endpoint_policy(&ep.labels, &policies, &identities);
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
                let value = PolicyValue {
                    cookie: self.cookie(&v.origin),
                    flags: if v.deny { POLICY_F_DENY } else { 0 },
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
