//! The agent: endpoints, IPAM, identities, policy and the flow observer,
//! wired to the datapath; served on a local Unix socket.
#![forbid(unsafe_code)]

pub mod control;
pub mod drain;
pub mod endpoints;
pub mod fqdn;
pub mod hubble_backend;
pub mod ipcache;
pub mod l7;
pub mod l7proxy;
pub mod metrics;
pub mod observer;
pub mod policy_sync;
pub mod server;
pub mod state;

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use api::{IdentityInfo, Request, Response, StatusInfo};
use datapath::Datapath;
use netns as net;

use crate::observer::Observer;
use crate::policy_sync::PolicySync;
use crate::state::{Cidr, Endpoint, State, Store};

/// Agent settings (validated at start-up).
#[derive(Clone, Debug)]
pub struct Config {
    pub node_name: String,
    pub cluster_name: String,
    pub pod_cidr: Cidr,
    pub state_dir: PathBuf,
    pub bpf_dir: PathBuf,
    pub socket: PathBuf,
    /// Flow ring capacity (2^n-1).
    pub flow_capacity: usize,
    /// Where the datapath sends connections that L7 rules cover.
    pub proxy: Option<datapath::ProxyRedirect>,
    pub fqdn: fqdn::FqdnConfig,
    /// Conntrack entries one endpoint's traffic may hold (0: no budget).
    pub ct_endpoint_budget: u32,
}

pub use control::{EndpointIndex, EndpointLookup, EndpointMeta};

pub struct Agent {
    config: Config,
    datapath: Arc<Datapath>,
    /// The state and what is derived from it (the commit path).
    pub(crate) control: Arc<control::Control>,
    /// Pods' attachments, CNI ADD to DEL.
    endpoints: endpoints::Endpoints,
    pub observer: Arc<Observer>,
    started: Instant,
    proxy_stats: std::sync::OnceLock<Arc<proxy::Stats>>,
    /// Its counters as it last sent them (`proxy::Stats::snapshot` order).
    l7_stats: Mutex<Vec<u64>>,
    /// DNS addresses not learned because an endpoint was at its limit.
    pub fqdn_refused: std::sync::atomic::AtomicU64,
    /// Conntrack entries at the last census (`ct_census`): status reads
    /// this instead of walking the table.
    ct_entries: std::sync::atomic::AtomicUsize,
    /// The census's busiest endpoint (live entries its traffic holds).
    ct_busiest: std::sync::atomic::AtomicU32,
    /// New connections refused at an endpoint's budget: the endpoints
    /// there at the last census, plus those deleted since the start.
    ct_overflows: std::sync::atomic::AtomicU64,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Exhausted(String),
    #[error("datapath: {0}")]
    Datapath(#[from] datapath::Error),
    #[error("network setup: {0}")]
    Net(#[from] net::NetError),
    #[error("saving state: {0}")]
    Store(#[from] std::io::Error),
}

fn invalid(m: impl Into<String>) -> Error {
    Error::Invalid(m.into())
}

impl Error {
    /// The kind callers decide on (the CNI plugin's error codes).
    pub fn kind(&self) -> api::ErrorKind {
        match self {
            Error::Invalid(_) => api::ErrorKind::Invalid,
            Error::NotFound(_) => api::ErrorKind::NotFound,
            Error::Conflict(_) => api::ErrorKind::Conflict,
            Error::Exhausted(_) => api::ErrorKind::Exhausted,
            Error::Net(_) => api::ErrorKind::Network,
            Error::Datapath(_) => api::ErrorKind::Datapath,
            Error::Store(_) => api::ErrorKind::Internal,
        }
    }
}

pub use api::host_ifname;

impl Agent {
    /// Opens the datapath and restores the persisted state: endpoints whose
    /// veth still exists get their programs re-attached (atomically replacing
    /// the pinned links), so established connections keep flowing.
    pub fn new(config: Config) -> Result<Arc<Self>, Error> {
        if config.flow_capacity == 0 || !(config.flow_capacity + 1).is_power_of_two() {
            return Err(invalid(format!(
                "flow capacity must be 2^n-1, found {}",
                config.flow_capacity
            )));
        }
        let store = Store::new(&config.state_dir)?;
        let mut state = store.load().map_err(invalid)?;
        let mut dp_config = datapath::Config::new(&config.bpf_dir);
        dp_config.proxy = config.proxy;
        dp_config.ct_endpoint_budget = config.ct_endpoint_budget;
        let datapath = Arc::new(Datapath::open(dp_config)?);
        if let Some(p) = &config.proxy {
            proxy_routing(&config.state_dir, p)?;
        }
        let observer = Arc::new(Observer::new(
            config.flow_capacity,
            config.node_name.clone(),
        ));
        let mut policy = PolicySync::default();
        policy.load_realized(&datapath)?;

        let stale: Vec<u32> = state
            .endpoints()
            .values()
            .filter(|e| !net::link_exists(&e.host_ifname))
            .map(|e| e.id)
            .collect();
        for id in stale {
            if let Some(ep) = state.remove_endpoint(id) {
                tracing::warn!(endpoint_id = id, pod = %ep.pod, "veth gone while the agent was away; endpoint removed");
                datapath.remove_endpoint(ep.ipv4)?;
                datapath.ct_flush_address(ep.ipv4);
                state.quarantine_ip(ep.ipv4, fqdn::now_s());
            }
        }
        for ep in state.endpoints().values() {
            datapath.attach_endpoint(ep.id, ep.ipv4, &ep.host_ifname)?;
        }
        let control = Arc::new(control::Control::open(
            &config.cluster_name,
            datapath.clone(),
            store,
            state,
            policy,
        )?);
        let endpoints = endpoints::Endpoints::new(
            config.pod_cidr,
            &config.cluster_name,
            datapath.clone(),
            control.clone(),
            observer.clone(),
        );
        let agent = Arc::new(Self {
            config,
            datapath,
            control,
            endpoints,
            observer,
            started: Instant::now(),
            proxy_stats: std::sync::OnceLock::new(),
            l7_stats: Mutex::new(Vec::new()),
            fqdn_refused: Default::default(),
            ct_entries: Default::default(),
            ct_busiest: Default::default(),
            ct_overflows: Default::default(),
        });
        agent.ct_census();
        // The ipcache's `host` entries follow the host's addresses.
        let weak = Arc::downgrade(&agent);
        net::watch_ipv4_addresses(move || {
            let Some(agent) = weak.upgrade() else {
                return false;
            };
            if let Err(e) = agent.control.refresh_host_addresses() {
                tracing::warn!(error = %e, "reading the host's addresses");
            }
            true
        })?;
        Ok(agent)
    }

    /// Walks the conntrack table once (in the background, every few
    /// seconds): the entry count status shows, and the live addresses the
    /// toFQDNs garbage collection keeps.
    pub fn ct_census(&self) -> std::collections::HashSet<Ipv4Addr> {
        use std::sync::atomic::Ordering::Relaxed;
        let census = self.datapath.ct_census();
        self.ct_entries.store(census.entries, Relaxed);
        self.ct_busiest.store(census.busiest, Relaxed);
        self.ct_overflows.store(census.overflows, Relaxed);
        census.live_addresses
    }

    /// The state and what is derived from it.
    pub fn control(&self) -> &control::Control {
        &self.control
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn datapath(&self) -> &Arc<Datapath> {
        &self.datapath
    }

    /// The L7 proxy's counters, once it runs.
    pub fn set_proxy_stats(&self, stats: Arc<proxy::Stats>) {
        self.proxy_stats.set(stats).ok();
    }

    pub fn proxy_stats(&self) -> Option<&Arc<proxy::Stats>> {
        self.proxy_stats.get()
    }

    /// The proxies' counters: the agent's own (DNS) and the HTTP proxy
    /// process's, added up.
    pub fn proxy_counters(&self) -> Vec<(&'static str, &'static str, u64)> {
        let Some(local) = self.proxy_stats.get() else {
            return Vec::new();
        };
        let remote = self.l7_stats.lock().unwrap_or_else(|e| e.into_inner());
        local
            .snapshot()
            .iter()
            .enumerate()
            .map(|(i, (name, help, v))| (*name, *help, v + remote.get(i).copied().unwrap_or(0)))
            .collect()
    }

    /// Connects the HTTP proxy process: it gets a snapshot now and after
    /// every change.
    pub fn attach_l7_proxy(&self, link: Arc<l7proxy::Link>) {
        self.control.attach_l7_proxy(link);
    }

    pub fn uptime(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    /// What the observer enriches flows from.
    pub fn flow_sources(&self) -> observer::Sources {
        observer::Sources {
            index: self.control.index(),
            policy_refs: self.control.policy().policy_refs(),
            cluster: self.config.cluster_name.clone(),
        }
    }

    /// For a connection the L7 proxy accepted: the client's identity (it
    /// is a local pod: the datapath redirects from the pods' side), the
    /// server's identity, and whether the server is a pod on this node.
    pub fn l7_peers(&self, client: Ipv4Addr, server: Ipv4Addr) -> Option<(u32, u32, bool)> {
        // The enrichment index: by address, rebuilt with the maps at sync.
        let (client, server_pod) = {
            let index = self.control.index().load();
            let identity = |ip| index.by_ip.get(&ip).map(|m| m.endpoint.identity);
            (identity(client)?, identity(server))
        };
        match server_pod {
            Some(id) => Some((client, id, true)),
            None => Some((client, self.ipcache().identity_of(server), false)),
        }
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, State> {
        self.control.lock()
    }

    fn ipcache(&self) -> Arc<ipcache::Ipcache> {
        self.control.ipcache()
    }

    fn commit(&self, state: &mut State) -> Result<(), Error> {
        self.control.commit(state)
    }

    pub fn handle(&self, req: Request) -> Response {
        let result = match req {
            Request::Status => Ok(Response::Status(self.status())),
            Request::PodUpsert(pod) => self.endpoints.pod_upsert(pod).map(|_| Response::Ok),
            Request::PodDelete { namespace, name } => self
                .endpoints
                .pod_delete(&namespace, &name)
                .map(|_| Response::Ok),
            Request::EndpointAdd(a) => self.endpoints.add(a).map(Response::Added),
            Request::EndpointDel {
                container_id,
                ifname,
            } => self
                .endpoints
                .del(&container_id, &ifname)
                .map(|_| Response::Ok),
            Request::EndpointCheck(a) => self.endpoints.check(&a).map(|_| Response::Ok),
            Request::EndpointGc { valid } => self.endpoints.gc(&valid).map(|_| Response::Ok),
            Request::EndpointList => Ok(Response::Endpoints {
                endpoints: self.endpoints.list(),
            }),
            Request::IdentityList => Ok(Response::Identities {
                identities: self
                    .lock_state()
                    .identities()
                    .all()
                    .into_iter()
                    .map(|(id, l)| IdentityInfo {
                        id,
                        labels: l.to_strings(),
                    })
                    .collect(),
            }),
            Request::PolicyImport {
                file,
                yaml,
                namespace,
            } => self.policy_import(&file, &yaml, namespace.as_deref()),
            Request::PolicyGet => {
                let s = self.lock_state();
                Ok(Response::Policies {
                    policies: s.policies().values().cloned().collect(),
                })
            }
            Request::PolicyDelete { key } => self.policy_delete(&key).map(|_| Response::Ok),
            Request::PolicyTrace(t) => self.policy_trace(&t),
            Request::NamespaceAudit { namespace, audit } => (|| {
                policy::labels::validate_namespace(&namespace).map_err(invalid)?;
                let mut s = self.lock_state();
                let changed = s.set_audit(&namespace, audit);
                let done = if changed { self.commit(&mut s) } else { Ok(()) };
                done.map(|_| Response::Ok)
            })(),
            Request::FqdnList => Ok(Response::Fqdn {
                names: self
                    .fqdn_cache()
                    .into_iter()
                    .map(|(name, ips)| api::FqdnInfo { name, ips })
                    .collect(),
            }),
            Request::ConntrackList { address } => Ok(self.conntrack_list(address)),
            Request::EnforceEstablished => self
                .enforce_established()
                .map(|(checked, cut)| Response::Enforced { checked, cut }),
        };
        result.unwrap_or_else(|e| Response::Error {
            message: e.to_string(),
            cause: e.kind(),
        })
    }

    pub fn status(&self) -> StatusInfo {
        let s = self.lock_state();
        let (buffered, seen) = self.observer.counts();
        StatusInfo {
            node_name: self.config.node_name.clone(),
            pod_cidr: self.config.pod_cidr.to_string(),
            endpoints: s.endpoints().len(),
            identities: s.identities().all().len(),
            policies: s.policies().len(),
            flows_seen: seen,
            flows_buffered: buffered,
            flow_capacity: self.config.flow_capacity,
            events_lost_kernel: self.datapath.events_lost(),
            ct_entries: self.ct_entries.load(std::sync::atomic::Ordering::Relaxed),
            ct_endpoint_budget: self.config.ct_endpoint_budget,
            ct_busiest_endpoint: self.ct_busiest.load(std::sync::atomic::Ordering::Relaxed),
            ct_budget_overflows: self.ct_overflows.load(std::sync::atomic::Ordering::Relaxed)
                + self
                    .endpoints
                    .overflows_retired
                    .load(std::sync::atomic::Ordering::Relaxed),
            policy_overflows: self.control.policy().overflowed.len(),
            uptime_seconds: self.started.elapsed().as_secs(),
            proxy_shortcut: self
                .datapath
                .proxy_shortcut_stats()
                .map(|s| api::ProxyShortcutInfo {
                    sockets: s.sockets,
                    redirected: s.redirected,
                    plain: s.plain,
                }),
        }
    }

    /// Checks every tracked connection of a local endpoint against the
    /// policy in force, as its first packet was (same lookup as the
    /// datapath's), and deletes every entry of each one it now refuses
    /// (both directions and both orientations of the tuple): its next
    /// packet is then a new connection and meets the policy in the kernel.
    /// Connections the proxy opened are left to the proxy, which checks
    /// every request. Returns (connections checked, cut).
    fn enforce_established(&self) -> Result<(usize, usize), Error> {
        let s = self.lock_state();
        let sync = self.control.policy();
        let ipcache = self.ipcache();
        let by_addr: HashMap<Ipv4Addr, &Endpoint> =
            s.endpoints().values().map(|e| (e.ipv4, e)).collect();
        let identity = |a: Ipv4Addr| match by_addr.get(&a) {
            Some(e) => e.identity,
            None => ipcache.identity_of(a),
        };
        let ip = |a: u32| Ipv4Addr::from(u32::from_be(a));
        let mut checked = 0;
        let mut refused = std::collections::HashSet::new();
        for (k, v) in self.datapath.ct_list() {
            if v.flags & abi::CT_F_FROM_PROXY != 0 {
                continue;
            }
            let (ep, peer, dir) = if k.direction == abi::Direction::Ingress as u8 {
                (ip(k.daddr), ip(k.saddr), policy::Direction::Ingress)
            } else {
                (ip(k.saddr), ip(k.daddr), policy::Direction::Egress)
            };
            let Some(policy) = by_addr.get(&ep).and_then(|e| sync.computed(e.identity)) else {
                continue;
            };
            checked += 1;
            // ICMP: policy is keyed on the type, and only echo is tracked.
            let port = if k.protocol == 1 { 8 } else { k.dport };
            let decision = policy.decide(identity(peer), dir, k.protocol, port);
            if matches!(
                decision,
                policy::Decision::Denied { .. } | policy::Decision::DefaultDeny { .. }
            ) {
                refused.insert((k.saddr, k.daddr, k.sport, k.dport, k.protocol));
            }
        }
        drop(sync);
        drop(s);
        let cut = refused.len();
        if cut > 0 {
            self.datapath.ct_flush(|k, _| {
                refused.contains(&(k.saddr, k.daddr, k.sport, k.dport, k.protocol))
                    || refused.contains(&(k.daddr, k.saddr, k.dport, k.sport, k.protocol))
            });
        }
        tracing::info!(checked, cut, "established connections re-evaluated");
        Ok((checked, cut))
    }

    fn conntrack_list(&self, address: Option<Ipv4Addr>) -> Response {
        let now = datapath::monotonic_ns() as i64;
        let be = address.map(|a| u32::from(a).to_be());
        let mut entries = Vec::new();
        let mut truncated = false;
        for (k, v) in self.datapath.ct_list() {
            if be.is_some_and(|a| k.saddr != a && k.daddr != a) {
                continue;
            }
            if entries.len() == api::CONNTRACK_LIST_MAX {
                truncated = true;
                break;
            }
            let addr = |a: u32, port: u16| format!("{}:{port}", Ipv4Addr::from(u32::from_be(a)));
            let mut flags = Vec::new();
            for (bit, name) in [
                (abi::CT_F_PROXY_REDIRECT, "proxy-redirect"),
                (abi::CT_F_FROM_PROXY, "from-proxy"),
                (abi::CT_F_DNS, "dns"),
            ] {
                if v.flags & bit != 0 {
                    flags.push(name.to_string());
                }
            }
            if v.closing != 0 {
                flags.insert(0, "closing".into());
            }
            entries.push(api::ConntrackInfo {
                protocol: k.protocol,
                source: addr(k.saddr, k.sport),
                destination: addr(k.daddr, k.dport),
                direction: if k.direction == abi::Direction::Ingress as u8 {
                    "ingress"
                } else {
                    "egress"
                }
                .into(),
                expires_in_s: (v.expires_ns as i64 - now) / 1_000_000_000,
                flags,
                packets: v.packets,
                bytes: v.bytes,
            });
        }
        Response::Conntrack { entries, truncated }
    }

    fn policy_import(
        &self,
        file: &str,
        yaml: &str,
        namespace: Option<&str>,
    ) -> Result<Response, Error> {
        let parsed = policy::parse(file, yaml, namespace.unwrap_or("default"))
            .map_err(|e| invalid(e.to_string()))?;
        if parsed.policies.is_empty() {
            return Err(invalid(format!("{file}: no policy found")));
        }
        let mut s = self.lock_state();
        let mut names = Vec::new();
        for p in parsed.policies {
            names.push(p.key());
            s.insert_policy(p);
        }
        self.commit(&mut s)?;
        for n in &names {
            let rules = s.policies().get(n).map_or(0, |p| p.rules.len() as i64);
            self.observer
                .agent_event(flow::agent_event::Kind::PolicyUpdated {
                    labels: policy_labels(s.policies().get(n)),
                    revision: s.policy_generation(),
                    rules,
                });
        }
        Ok(Response::Imported {
            warnings: parsed.warnings.iter().map(|w| w.to_string()).collect(),
            policies: names,
            skipped: parsed
                .skipped
                .into_iter()
                .map(|(doc, kind)| format!("document {doc}: {kind} is not a policy"))
                .collect(),
        })
    }

    /// The identity of a trace end, and again if it is a local endpoint (whose
    /// policy applies):
    /// `namespace/pod`, `pod` (namespace default) or an IPv4 address.
    fn trace_end(&self, s: &State, end: &str) -> Result<(u32, Option<u32>), Error> {
        if let Ok(addr) = end.parse::<Ipv4Addr>() {
            if let Some(e) = s.endpoints().values().find(|e| e.ipv4 == addr) {
                return Ok((e.identity, Some(e.identity)));
            }
            // The ipcache's answer: the host, else the longest CIDR
            // identity prefix, else the world.
            return Ok((self.ipcache().identity_of(addr), None));
        }
        let (ns, pod) = end.split_once('/').unwrap_or(("default", end));
        let e = s
            .endpoints()
            .values()
            .find(|e| e.namespace == ns && e.pod == pod)
            .ok_or_else(|| {
                invalid(format!(
                    "no endpoint for pod {ns}/{pod} (give namespace/pod or an IPv4 address)"
                ))
            })?;
        Ok((e.identity, Some(e.identity)))
    }

    fn policy_trace(&self, t: &api::TraceRequest) -> Result<Response, Error> {
        let s = self.lock_state();
        let (from_identity, from_ep) = self.trace_end(&s, &t.from)?;
        let (to_identity, to_ep) = self.trace_end(&s, &t.to)?;
        let sync = self.control.policy();
        let decide = |ep: Option<u32>, peer: u32, dir: policy::Direction| {
            ep.map(|id| {
                api::Decision::from(
                    &sync
                        .computed(id)
                        .map(|c| c.decide(peer, dir, t.protocol, t.port))
                        .unwrap_or(policy::Decision::NotEnforced),
                )
            })
        };
        let egress = decide(from_ep, to_identity, policy::Direction::Egress);
        let ingress = decide(to_ep, from_identity, policy::Direction::Ingress);
        let passes = |d: &Option<api::Decision>| d.as_ref().is_none_or(api::Decision::passes);
        Ok(Response::Trace {
            from: t.from.clone(),
            to: t.to.clone(),
            from_identity,
            to_identity,
            allowed: passes(&egress) && passes(&ingress),
            egress,
            ingress,
        })
    }

    fn policy_delete(&self, key: &str) -> Result<(), Error> {
        let mut s = self.lock_state();
        let removed = s.remove_policy(key);
        if removed.is_none() {
            return Err(invalid(format!("no policy {key:?}")));
        }
        self.commit(&mut s)?;
        self.observer
            .agent_event(flow::agent_event::Kind::PolicyDeleted {
                labels: policy_labels(removed.as_ref()),
                revision: s.policy_generation(),
                rules: removed.as_ref().map_or(0, |p| p.rules.len() as i64),
            });
        Ok(())
    }
}

/// A policy's labels as Cilium derives them (name, namespace, kind).
fn policy_labels(p: Option<&policy::Policy>) -> Vec<String> {
    let Some(p) = p else { return vec![] };
    let mut out = vec![
        format!("k8s:io.cilium.k8s.policy.derived-from={}", p.kind.name()),
        format!("k8s:io.cilium.k8s.policy.name={}", p.name),
    ];
    if let Some(ns) = &p.namespace {
        out.push(format!("k8s:io.cilium.k8s.policy.namespace={ns}"));
    }
    out
}

/// Installs the proxy's policy routing, first removing a previous run's.
fn proxy_routing(state_dir: &std::path::Path, p: &datapath::ProxyRedirect) -> Result<(), Error> {
    let record = state_dir.join(net::PROXY_ROUTING_FILE);
    if net::read_proxy_routing(&record) != Some((p.mark_to, p.table)) {
        net::proxy_routing_forget(&record);
    }
    net::proxy_routing_up(p.mark_to, p.table)?;
    std::fs::write(&record, format!("{} {}\n", p.mark_to, p.table))?;
    Ok(())
}

/// What the HTTP proxy process sends: its flows join the agent's, its
/// counters the metrics.
impl l7proxy::Sink for Agent {
    fn record(&self, record: flow::record::L7Record) {
        self.observer.queue_l7(record);
    }

    fn stats(&self, values: Vec<u64>) {
        *self.l7_stats.lock().unwrap_or_else(|e| e.into_inner()) = values;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_ifnames_are_short_stable_and_distinct() {
        let a = host_ifname("lab1-frontend", "eth0");
        assert_eq!(a, host_ifname("lab1-frontend", "eth0"));
        assert_ne!(a, host_ifname("lab1-backend", "eth0"));
        assert_ne!(a, host_ifname("lab1-frontend", "eth1"));
        assert_eq!(a.len(), 14);
    }
}
