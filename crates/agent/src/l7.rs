//! The agent's side of the L7 proxy: what policy says about a redirected
//! connection (each side's `http` rules, compiled once per distinct rule
//! list), and where the proxy's flows go.

use std::net::SocketAddrV4;
use std::sync::{Arc, Mutex};

use policy::{Decision, Direction, HttpRule, L7};

use crate::policy_sync::PolicySync;
use crate::Agent;

/// Distinct rule lists kept compiled; beyond this the cache starts over.
const COMPILED_CACHE_LIMIT: usize = 1024;

pub struct ProxyPolicy {
    agent: Arc<Agent>,
    compiled: Mutex<Vec<(Vec<HttpRule>, Arc<proxy::HttpRules>)>>,
}

impl ProxyPolicy {
    pub fn new(agent: Arc<Agent>) -> Self {
        Self {
            agent,
            compiled: Mutex::new(Vec::new()),
        }
    }

    fn compile(&self, rules: &[HttpRule]) -> Option<Arc<proxy::HttpRules>> {
        let mut cache = self.compiled.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, c)) = cache.iter().find(|(r, _)| r.as_slice() == rules) {
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
        cache.push((rules.to_vec(), compiled.clone()));
        Some(compiled)
    }
}

impl proxy::Policy for ProxyPolicy {
    fn connection(&self, client: SocketAddrV4, dst: SocketAddrV4) -> Option<proxy::Connection> {
        let (client_identity, server_identity, server_local) =
            self.agent.l7_peers(*client.ip(), *dst.ip())?;
        let sync = self.agent.policy.lock().unwrap_or_else(|e| e.into_inner());
        let mut sides = Vec::new();
        let ends = [
            (Some(client_identity), server_identity, Direction::Egress),
            (
                server_local.then_some(server_identity),
                client_identity,
                Direction::Ingress,
            ),
        ];
        for (endpoint, peer, direction) in ends {
            let Some(endpoint) = endpoint else { continue };
            if let Some((L7::Http(rules), by)) =
                l7_rules(&sync, endpoint, peer, direction, 6, dst.port())?
            {
                sides.push(proxy::Side {
                    ingress: direction == Direction::Ingress,
                    rules: self.compile(&rules)?,
                    policy: sync.attribution(&by),
                });
            }
        }
        Some(proxy::Connection {
            client_identity,
            server_identity,
            sides,
            transparent: server_local,
        })
    }

    fn dns(
        &self,
        client: SocketAddrV4,
        resolver: SocketAddrV4,
        tcp: bool,
    ) -> Option<proxy::dns::DnsConnection> {
        let (client_identity, server_identity, server_local) =
            self.agent.l7_peers(*client.ip(), *resolver.ip())?;
        let sync = self.agent.policy.lock().unwrap_or_else(|e| e.into_inner());
        let protocol = if tcp { 6 } else { 17 };
        let rules = l7_rules(
            &sync,
            client_identity,
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
        if let Err(e) = self.agent.fqdn_learned(client, name, answers) {
            tracing::warn!(error = %e, name, "learning a DNS answer");
        }
    }

    fn refresh_learned(
        &self,
        client: std::net::Ipv4Addr,
        name: &str,
        answers: &[(std::net::Ipv4Addr, u32)],
    ) -> bool {
        self.agent.fqdn_refresh(client, name, answers)
    }

    fn record(&self, record: flow::record::L7Record) {
        self.agent.observer.queue_l7(record);
    }
}

/// What `endpoint`'s policy says about a connection with `peer`: `None` when
/// it does not allow it; otherwise the L7 rules of the allowing entry, if any.
fn l7_rules(
    sync: &PolicySync,
    endpoint: u32,
    peer: u32,
    direction: Direction,
    protocol: u8,
    port: u16,
) -> Option<Option<(L7, policy::Origin)>> {
    let Some(p) = sync.computed(endpoint) else {
        return Some(None);
    };
    match p.decide(peer, direction, protocol, port) {
        Decision::Allowed { by, l7 } => Some(l7.map(|l| (l, by))),
        Decision::NotEnforced | Decision::Audited { .. } => Some(None),
        Decision::Denied { .. } | Decision::DefaultDeny { .. } => None,
    }
}
