//! toFQDNs: what the DNS proxy learns becomes identities in the ipcache and
//! the policy maps before the answer reaches the pod (so its first
//! connection to the address is already allowed); expired names go, unless
//! connections to their addresses are still open (Cilium's "zombies").

use std::net::Ipv4Addr;
use std::time::{SystemTime, UNIX_EPOCH};

use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use crate::control::Control;
use crate::{invalid, Error};

/// Limits and timings (Cilium's `--tofqdns-*` knobs).
#[derive(Clone, Copy, Debug)]
pub struct FqdnConfig {
    /// An answer is kept at least this long, whatever its TTL.
    pub min_ttl_s: u64,
    /// After expiry, how long an address whose connections are idle stays.
    pub idle_grace_s: u64,
    /// Learned addresses per endpoint; beyond it new ones are not learned
    /// (counted and logged, never silent).
    pub max_ips_per_endpoint: usize,
}

impl Default for FqdnConfig {
    fn default() -> Self {
        Self {
            min_ttl_s: 3600,
            idle_grace_s: 60,
            max_ips_per_endpoint: 1000,
        }
    }
}

/// What learning one answer did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Learned {
    /// New addresses (their identities and policy entries are in place).
    pub added: usize,
    /// Addresses not learned: the endpoint is at its limit.
    pub refused: usize,
}

/// When an answer with `ttl` seen at `now` expires.
fn expiry(now: u64, ttl: u32, cfg: FqdnConfig) -> u64 {
    now + (ttl as u64).max(cfg.min_ttl_s)
}

/// The id of the endpoint whose address is `ip`.
fn endpoint_of(s: &crate::state::State, ip: Ipv4Addr) -> Option<u32> {
    s.endpoints().values().find(|e| e.ipv4 == ip).map(|e| e.id)
}

/// Extends the expiry of `answers` if `client`'s endpoint holds every one
/// of them for `name` already; false (nothing changed) otherwise.
fn refresh(
    s: &mut crate::state::State,
    client: Ipv4Addr,
    name: &str,
    answers: &[(Ipv4Addr, u32)],
    now: u64,
    cfg: FqdnConfig,
) -> bool {
    let Some(endpoint) = endpoint_of(s, client) else {
        return false;
    };
    let Some(entry) = s.fqdn().get(name) else {
        return false;
    };
    if !entry.endpoints.contains(&endpoint)
        || !answers.iter().all(|(ip, _)| entry.ips.contains_key(ip))
    {
        return false;
    }
    let Some(entry) = s.fqdn_get_mut(name) else {
        return false;
    };
    for (ip, ttl) in answers {
        if let Some(e) = entry.ips.get_mut(ip) {
            *e = (*e).max(expiry(now, *ttl, cfg));
        }
    }
    true
}

pub(crate) fn now_s() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// What the DNS proxy learns, kept and expired. Handles: the control path.
pub struct Fqdn {
    config: FqdnConfig,
    control: Arc<Control>,
    /// DNS addresses not learned because an endpoint was at its limit.
    pub refused: AtomicU64,
}

impl Fqdn {
    pub fn new(config: FqdnConfig, control: Arc<Control>) -> Self {
        Fqdn {
            config,
            control,
            refused: AtomicU64::new(0),
        }
    }

    /// The DNS proxy saw `name` resolve to `answers` (address, TTL) for the
    /// pod at `client`. Returns once the ipcache and policy maps know the
    /// new addresses.
    pub fn learned(
        &self,
        client: Ipv4Addr,
        name: &str,
        answers: &[(Ipv4Addr, u32)],
    ) -> Result<Learned, Error> {
        let name = policy::model::fqdn(name);
        let cfg = self.config;
        let now = now_s();
        let mut s = self.control.lock();
        let endpoint = endpoint_of(&s, client)
            .ok_or_else(|| invalid(format!("no endpoint has address {client}")))?;
        let mut held: usize = s
            .fqdn()
            .values()
            .filter(|n| n.endpoints.contains(&endpoint))
            .map(|n| n.ips.len())
            .sum();
        let mut out = Learned::default();
        let entry = s.fqdn_entry(&name);
        entry.endpoints.insert(endpoint);
        for (ip, ttl) in answers {
            let expires = expiry(now, *ttl, cfg);
            match entry.ips.get_mut(ip) {
                Some(e) => *e = (*e).max(expires),
                None if held >= cfg.max_ips_per_endpoint => out.refused += 1,
                None => {
                    entry.ips.insert(*ip, expires);
                    held += 1;
                    out.added += 1;
                }
            }
        }
        if out.refused > 0 {
            self.refused
                .fetch_add(out.refused as u64, std::sync::atomic::Ordering::Relaxed);
            tracing::warn!(
                endpoint,
                name,
                refused = out.refused,
                limit = cfg.max_ips_per_endpoint,
                "endpoint at its limit of learned DNS addresses; new ones are not allowed"
            );
        }
        if out.added > 0 {
            self.control.commit(&mut s)?;
        }
        Ok(out)
    }

    /// The common case of `fqdn_learned`, cheap enough for the DNS proxy's
    /// own thread: every address of the answer is already learned for
    /// `name` by `client`'s endpoint, so only their expiry moves (in
    /// memory; the maps do not change). Returns false, having changed
    /// nothing, when there is more to do (or the agent's state is busy):
    /// then `fqdn_learned` must run.
    pub fn refresh(&self, client: Ipv4Addr, name: &str, answers: &[(Ipv4Addr, u32)]) -> bool {
        let Some(mut s) = self.control.try_lock() else {
            return false;
        };
        let name = policy::model::fqdn(name);
        refresh(&mut s, client, &name, answers, now_s(), self.config)
    }

    /// Drops addresses past their expiry and grace period whose connections
    /// are all gone, and names left without addresses.
    /// `live`: the addresses of live connections (`Datapath::ct_census`).
    pub fn gc(&self, live: &std::collections::HashSet<Ipv4Addr>) -> Result<usize, Error> {
        let grace = self.config.idle_grace_s;
        let now = now_s();
        let mut s = self.control.lock();
        let removed = s.fqdn_retain_ips(|ip, expires| expires + grace > now || live.contains(ip));
        if removed > 0 {
            self.control.commit(&mut s)?;
        }
        Ok(removed)
    }

    /// Learned names and their addresses, for `fibril fqdn list`.
    pub fn cache(&self) -> Vec<(String, Vec<(Ipv4Addr, u64)>)> {
        let s = self.control.lock();
        s.fqdn()
            .iter()
            .map(|(n, e)| (n.clone(), e.ips.iter().map(|(i, x)| (*i, *x)).collect()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::{Endpoint, FqdnName, State};

    fn state() -> State {
        let mut s = State::default();
        s.add_endpoint(Endpoint {
            id: 7,
            container_id: "c".into(),
            ifname: "eth0".into(),
            netns: "/run/netns/x".into(),
            namespace: "default".into(),
            pod: "client".into(),
            ipv4: Ipv4Addr::new(10, 0, 0, 7),
            host_ifname: "h".into(),
            host_ifindex: 1,
            host_mac: [0; 6],
            pod_mac: [0; 6],
            labels: Default::default(),
            identity: 0,
        })
        .unwrap();
        *s.fqdn_entry("api.example.") = FqdnName {
            ips: [(Ipv4Addr::new(192, 0, 2, 1), 1_000)].into(),
            endpoints: [7].into(),
        };
        s
    }

    /// The proxy's fast path: answers already learned only move their
    /// expiry (never back); anything else is left to `fqdn_learned`
    /// untouched.
    #[test]
    fn refresh_takes_known_answers_and_leaves_the_rest_alone() {
        let cfg = FqdnConfig {
            min_ttl_s: 10,
            ..Default::default()
        };
        let client = Ipv4Addr::new(10, 0, 0, 7);
        let known = Ipv4Addr::new(192, 0, 2, 1);
        let mut s = state();
        // The expiry moves out; a short TTL counts as the minimum, and an
        // earlier expiry never wins.
        for (ttl, expires) in [(300, 2_300), (1, 2_300)] {
            assert!(refresh(
                &mut s,
                client,
                "api.example.",
                &[(known, ttl)],
                2_000,
                cfg
            ));
            assert_eq!(s.fqdn()["api.example."].ips[&known], expires, "ttl {ttl}");
        }

        let before = s.fqdn().clone();
        let new = Ipv4Addr::new(192, 0, 2, 2);
        for (client, name, answers) in [
            (client, "api.example.", vec![(known, 60), (new, 60)]),
            (client, "other.example.", vec![(known, 60)]),
            (
                Ipv4Addr::new(10, 0, 0, 8),
                "api.example.",
                vec![(known, 60)],
            ),
        ] {
            assert!(!refresh(&mut s, client, name, &answers, 3_000, cfg));
            assert_eq!(*s.fqdn(), before, "{client} {name}");
        }
    }
}
