//! The agent's side of the L7 proxy: what policy says about a redirected
//! connection (each side's `http` rules, compiled once per distinct rule
//! list), and where the proxy's flows go.

use std::net::SocketAddrV4;
use std::sync::{Arc, Mutex};

use policy::{Decision, Direction, HttpRule, L7};

use crate::Agent;

/// Distinct rule lists kept compiled; beyond this the cache starts over.
const COMPILED_CACHE_LIMIT: usize = 1024;

pub struct ProxyPolicy {
    agent: Arc<Agent>,
}

impl ProxyPolicy {
    pub fn new(agent: Arc<Agent>) -> Self {
        Self { agent }
    }
}

/// Rule lists compiled once each (every connection a rule list covers asks
/// for it), found by hash.
#[derive(Default)]
pub struct CompiledRules(
    Mutex<std::collections::HashMap<Vec<HttpRule>, Arc<proxy::HttpRules>>>,
    Mutex<Vec<(Vec<policy::model::KafkaRule>, Arc<proxy::KafkaRules>)>>,
);

impl CompiledRules {
    pub fn get(&self, rules: &[HttpRule]) -> Option<Arc<proxy::HttpRules>> {
        let mut cache = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = cache.get(rules) {
            return Some(c.clone());
        }
        // Import validated the expressions; a failure here refuses the
        // connection rather than letting requests through unchecked.
        let compiled = match proxy::HttpRules::compile(rules) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                tracing::error!(error = %e, "http rules do not compile");
                return None;
            }
        };
        if cache.len() >= COMPILED_CACHE_LIMIT {
            cache.clear();
        }
        cache.insert(rules.to_vec(), compiled.clone());
        Some(compiled)
    }

    /// The same for `kafka` rule lists (few, and cheap to compare).
    pub fn kafka(&self, rules: &[policy::model::KafkaRule]) -> Option<Arc<proxy::KafkaRules>> {
        let mut cache = self.1.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, c)) = cache.iter().find(|(r, _)| r.as_slice() == rules) {
            return Some(c.clone());
        }
        let compiled = match proxy::KafkaRules::compile(rules) {
            Ok(c) => Arc::new(c),
            Err(e) => {
                tracing::error!(error = %e, "kafka rules do not compile");
                return None;
            }
        };
        if cache.len() >= COMPILED_CACHE_LIMIT {
            cache.clear();
        }
        cache.push((rules.to_vec(), compiled.clone()));
        Some(compiled)
    }
}

impl proxy::Policy for ProxyPolicy {
    /// HTTP is served by `fibril-l7proxy` (see `l7proxy.rs`), which decides
    /// with the agent's snapshots; the agent's own proxy is DNS only.
    fn connection(&self, _: SocketAddrV4, _: SocketAddrV4) -> Option<proxy::Connection> {
        None
    }

    fn dns(
        &self,
        client: SocketAddrV4,
        resolver: SocketAddrV4,
        tcp: bool,
    ) -> Option<proxy::dns::DnsConnection> {
        let (client_identity, server_identity, server_local) =
            self.agent.l7_peers(*client.ip(), *resolver.ip())?;
        let sync = self.agent.control.policy();
        let protocol = if tcp { 6 } else { 17 };
        let rules = l7_rules(
            sync.computed(client_identity),
            server_identity,
            Direction::Egress,
            protocol,
            resolver.port(),
        )?;
        let (selectors, policy) = match rules {
            Some((L7::Dns(selectors), by)) => (selectors, Some(sync.attribution(&by))),
            _ => (Vec::new(), None),
        };
        Some(proxy::dns::DnsConnection {
            client_identity,
            server_identity,
            selectors,
            policy,
            transparent: server_local,
        })
    }

    fn learned(
        &self,
        client: std::net::Ipv4Addr,
        name: &str,
        answers: &[(std::net::Ipv4Addr, u32)],
    ) {
        if let Err(e) = self.agent.fqdn.learned(client, name, answers) {
            tracing::warn!(error = %e, name, "learning a DNS answer");
        }
    }

    fn refresh_learned(
        &self,
        client: std::net::Ipv4Addr,
        name: &str,
        answers: &[(std::net::Ipv4Addr, u32)],
    ) -> bool {
        self.agent.fqdn.refresh(client, name, answers)
    }

    fn record(&self, record: flow::record::L7Record) {
        self.agent.observer.queue_l7(record);
    }
}

/// What an endpoint's policy (`computed`, none: no policy) says about a
/// connection with `peer`: `None` when it does not allow it; otherwise the
/// L7 rules of the allowing entry, if any.
pub(crate) fn l7_rules(
    computed: Option<&policy::EndpointPolicy>,
    peer: u32,
    direction: Direction,
    protocol: u8,
    port: u16,
) -> Option<Option<(L7, policy::Origin)>> {
    let Some(p) = computed else {
        return Some(None);
    };
    match p.decide(peer, direction, protocol, port) {
        Decision::Allowed { by, l7 } => Some(l7.map(|l| (l, by))),
        Decision::NotEnforced | Decision::Audited { .. } => Some(None),
        Decision::Denied { .. } | Decision::DefaultDeny { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_rule_list_is_compiled_once_and_bad_ones_refused() {
        let cache = CompiledRules::default();
        let get = HttpRule {
            method: Some("GET".into()),
            ..Default::default()
        };
        let post = HttpRule {
            method: Some("POST".into()),
            ..Default::default()
        };
        let a = cache.get(std::slice::from_ref(&get)).unwrap();
        assert!(Arc::ptr_eq(
            &a,
            &cache.get(std::slice::from_ref(&get)).unwrap()
        ));
        let b = cache.get(&[get.clone(), post.clone()]).unwrap();
        assert!(!Arc::ptr_eq(&a, &b));
        assert!(Arc::ptr_eq(&b, &cache.get(&[get, post]).unwrap()));
        let bad = HttpRule {
            path: Some("(".into()),
            ..Default::default()
        };
        assert!(cache.get(&[bad]).is_none());
    }
}
