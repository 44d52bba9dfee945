//! The agent: endpoints, IPAM, identities, policy and the flow observer,
//! wired to the datapath; served on a local Unix socket.
#![forbid(unsafe_code)]

pub mod cluster;
pub mod conntrack;
pub mod control;
pub mod crd_cluster;
pub mod drain;
pub mod endpoints;
pub mod fqdn;
pub mod hubble_backend;
pub mod ipcache;
pub mod kubernetes;
pub mod kubernetes_services;
pub mod l7;
pub mod l7proxy;
pub mod lb_sync;
pub mod maglev;
pub mod metrics;
pub mod observer;
pub mod policies;
pub mod policy_sync;
pub mod prefilter;
pub mod server;
pub mod services;
pub mod state;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use api::{IdentityInfo, Request, Response, StatusInfo};
use datapath::Datapath;
use netns as net;

use crate::observer::Observer;
use crate::policy_sync::PolicySync;
use crate::state::{Cidr, Store};

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
    /// Kvstore mode: the cluster's etcd (policies are the cluster's).
    pub kvstore: Option<cluster::KvstoreConfig>,
    /// This node's address between nodes (its InternalIP: where tunnels
    /// and other nodes reach it).
    pub node_address: Ipv4Addr,
    /// Kubernetes mode: the API server (policies are its objects).
    pub kubernetes: Option<kubernetes::KubernetesConfig>,
    /// The overlay to other nodes' pods (Cilium's `tunnel-protocol:
    /// vxlan`): the UDP port of the node's VXLAN device. Needs the
    /// kvstore (where tunnel endpoints come from). None: no overlay.
    pub tunnel_port: Option<u16>,
    /// Pods' MTU; None: the system's default, or behind a tunnel the
    /// underlay interface's MTU less the VXLAN overhead.
    pub mtu: Option<u32>,
    /// The XDP prefilter's device and mode (Cilium's `--prefilter-device`);
    /// None: no prefilter.
    pub prefilter: Option<(String, datapath::PrefilterMode)>,
    /// The host firewall (Cilium's `hostFirewall.enabled`); None: off.
    pub host_firewall: Option<HostFirewall>,
    /// Kube-proxy replacement (Cilium's `kubeProxyReplacement=true`):
    /// node ports and external addresses served on `devices` by the
    /// datapath, balanced by Maglev; None: kube-proxy serves them.
    pub kube_proxy_replacement: Option<KubeProxyReplacement>,
}

/// Kube-proxy replacement's settings.
#[derive(Clone, Debug)]
pub struct KubeProxyReplacement {
    /// The node's devices node ports are served on.
    pub devices: Vec<String>,
    /// Maglev's table size (a prime of `abi::MAGLEV_TABLE_SIZES`).
    pub maglev_table_size: u32,
}

/// The host firewall's settings: the node's devices its programs watch
/// (Cilium's `devices`), audit mode, and the node's labels that host
/// policies' nodeSelectors match.
#[derive(Clone, Debug, Default)]
pub struct HostFirewall {
    pub devices: Vec<String>,
    pub audit: bool,
    pub node_labels: std::collections::BTreeMap<String, String>,
}

/// The node's VXLAN device (Cilium's `cilium_vxlan`).
pub const TUNNEL_DEVICE: &str = "fibril_vxlan";
/// What VXLAN adds to a packet (outer IPv4, UDP, VXLAN, inner Ethernet).
const VXLAN_OVERHEAD: u32 = 50;

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
    /// Learned DNS names (toFQDNs).
    pub fqdn: fqdn::Fqdn,
    /// Policies in force, audit mode, trace.
    policies: policies::Policies,
    /// Services (the load balancer's input) from the API.
    services: services::Services,
    /// The XDP prefilter on the node's device.
    prefilter: prefilter::Prefilter,
    /// The census, listing, re-checking established connections.
    conntrack: conntrack::Conntrack,
    /// The cluster's shared state: etcd (kvstore mode) or the Kubernetes
    /// API (CRD mode).
    cluster: Option<Arc<dyn cluster::ClusterState>>,
    /// Kubernetes mode: the API server's watchers.
    kubernetes: Option<Arc<kubernetes::Kubernetes>>,
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
    /// A service the request needs is unreachable (the kvstore).
    #[error("{0}")]
    Unavailable(String),
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
            Error::Store(_) | Error::Unavailable(_) => api::ErrorKind::Internal,
        }
    }
}

pub use api::host_ifname;

/// The netfilter rule an agent before BPF source NAT added for node ports
/// to other nodes' backends: taken away (a NAT rule switches conntrack on
/// for every packet of the namespace). Best effort: without iptables, or
/// without the rule, there is nothing to do.
fn remove_old_masquerade_rule() {
    let mark = format!("{:#x}", abi::NODEPORT_MASQ_MARK);
    for proto in ["tcp", "udp"] {
        let rule = [
            "POSTROUTING",
            "-m",
            "mark",
            "--mark",
            &mark,
            "-p",
            proto,
            "-m",
            "comment",
            "--comment",
            "fibril: node ports to other nodes' backends",
            "-j",
            "MASQUERADE",
            "--to-ports",
            "32768-60999",
        ];
        if netns::run("iptables", &[&["-t", "nat", "-C"], &rule[..]].concat()).is_ok() {
            netns::run("iptables", &[&["-t", "nat", "-D"], &rule[..]].concat()).ok();
        }
    }
}

/// Puts the host programs on the node's devices for the host firewall
/// and kube-proxy replacement (before any policy: the first apply writes
/// the host's flags, and its connections are tracked from then on), or
/// takes away what an earlier run left; returns the host endpoint the
/// policy sync then keeps (with the host firewall).
fn node_devices(
    datapath: &Datapath,
    config: &Config,
) -> Result<Option<policy_sync::HostEndpoint>, Error> {
    let links = datapath.pin_dir().join("links");
    let earlier: Vec<String> = std::fs::read_dir(&links)
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter_map(|n| n.strip_suffix("_from_netdev").map(str::to_string))
        .collect();
    let mut devices: Vec<String> = Vec::new();
    for d in config.host_firewall.iter().flat_map(|h| &h.devices).chain(
        config
            .kube_proxy_replacement
            .iter()
            .flat_map(|k| &k.devices),
    ) {
        if !devices.contains(d) {
            devices.push(d.clone());
        }
    }
    let wanted = config.host_firewall.is_some() || config.kube_proxy_replacement.is_some();
    if wanted && devices.is_empty() {
        return Err(invalid(
            "the host firewall and kube-proxy replacement need the node's devices (--devices): the interfaces its traffic crosses",
        ));
    }
    for dev in &devices {
        if !net::link_exists(dev) {
            return Err(invalid(format!(
                "--devices: no interface {dev:?} in this network namespace"
            )));
        }
        datapath.attach_host_programs(dev)?;
    }
    for dev in earlier.iter().filter(|d| !devices.contains(d)) {
        datapath.detach_host_programs(dev);
    }
    if config.kube_proxy_replacement.is_some() {
        remove_old_masquerade_rule();
    }
    let Some(config) = config.host_firewall.as_ref() else {
        return Ok(None);
    };
    Ok(Some(policy_sync::HostEndpoint {
        labels: policy::LabelSet::host_endpoint(&config.node_labels),
        audit: config.audit,
    }))
}

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
        if let Some(k) = &config.kube_proxy_replacement {
            if !abi::MAGLEV_TABLE_SIZES.contains(&k.maglev_table_size) {
                return Err(invalid(format!(
                    "Maglev table size {}: one of {:?} (primes)",
                    k.maglev_table_size,
                    abi::MAGLEV_TABLE_SIZES
                )));
            }
            dp_config.kube_proxy_replacement = true;
            dp_config.nodeport_snat_address = config.node_address;
            dp_config.maglev_table_size = k.maglev_table_size;
        }
        let mut mtu = config.mtu;
        if let Some(port) = config.tunnel_port {
            if config.kvstore.is_none() && config.kubernetes.is_none() {
                return Err(invalid(
                    "a tunnel needs the cluster's state (--kvstore, or Kubernetes mode): tunnel endpoints come from it",
                ));
            }
            dp_config.tunnel_ifindex = net::ensure_vxlan(TUNNEL_DEVICE, port)?;
            if mtu.is_none() {
                let underlay = net::interface_with_address(config.node_address)?;
                mtu = Some(net::mtu(&underlay)?.saturating_sub(VXLAN_OVERHEAD));
            }
        }
        let datapath = Arc::new(Datapath::open(dp_config)?);
        if config.tunnel_port.is_some() {
            datapath.attach_overlay(TUNNEL_DEVICE)?;
        }
        if let Some(p) = &config.proxy {
            proxy_routing(&config.state_dir, p)?;
        }
        let observer = Arc::new(Observer::new(
            config.flow_capacity,
            config.node_name.clone(),
        ));
        let mut policy = PolicySync::default();
        policy.load_realized(&datapath)?;
        policy.set_host_endpoint(node_devices(&datapath, &config)?);

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
            &config.node_name,
            datapath.clone(),
            store,
            state,
            policy,
            config
                .kube_proxy_replacement
                .as_ref()
                .map(|k| lb_sync::NodePorts {
                    addresses: vec![config.node_address],
                    maglev_table_size: k.maglev_table_size,
                }),
        )?);
        let kv_cluster = config
            .kvstore
            .clone()
            .map(|k| {
                cluster::Cluster::start(
                    k,
                    &config.cluster_name,
                    &config.node_name,
                    control.clone(),
                    observer.clone(),
                )
            })
            .transpose()?;
        // The cluster's shared state: etcd when given (kvstore mode), else
        // in Kubernetes mode the API's CRDs (Cilium's default).
        let cluster: Option<Arc<dyn cluster::ClusterState>> =
            match (&kv_cluster, &config.kubernetes) {
                (Some(c), _) => Some(c.clone()),
                (None, Some(k)) => Some(crd_cluster::CrdCluster::start(
                    k.kubeconfig.clone(),
                    crd_cluster::NodeConfig {
                        cluster: config.cluster_name.clone(),
                        node: config.node_name.clone(),
                        address: config.node_address,
                        pod_cidr: config.pod_cidr.to_string(),
                    },
                    control.clone(),
                )?),
                (None, None) => None,
            };
        let endpoints = endpoints::Endpoints::new(
            config.pod_cidr,
            mtu,
            &config.cluster_name,
            datapath.clone(),
            control.clone(),
            observer.clone(),
            cluster.clone(),
        );
        endpoints.preload_next(&control.lock());
        let kubernetes = config
            .kubernetes
            .clone()
            .map(|k| {
                kubernetes::Kubernetes::start(
                    k,
                    &config.node_name,
                    control.clone(),
                    observer.clone(),
                )
            })
            .transpose()?;
        let policies = policies::Policies::new(
            control.clone(),
            observer.clone(),
            kv_cluster,
            kubernetes.is_some(),
            config.host_firewall.is_some(),
        );
        let services = services::Services::new(control.clone(), kubernetes.is_some());
        let prefilter = prefilter::Prefilter::start(datapath.clone(), config.prefilter.clone())?;
        let conntrack = conntrack::Conntrack::new(datapath.clone(), control.clone());
        let fqdn = fqdn::Fqdn::new(config.fqdn, control.clone());
        let agent = Arc::new(Self {
            cluster,
            kubernetes,
            fqdn,
            policies,
            services,
            prefilter,
            conntrack,
            config,
            datapath,
            control,
            endpoints,
            observer,
            started: Instant::now(),
            proxy_stats: std::sync::OnceLock::new(),
            l7_stats: Mutex::new(Vec::new()),
        });
        if let Some(k) = &agent.kubernetes {
            k.follow_pods(Arc::downgrade(&agent));
        }
        agent.conntrack.census();
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

    /// Walks the conntrack table (every few seconds): status's counts and
    /// the live addresses the toFQDNs garbage collection keeps.
    pub fn ct_census(&self) -> std::collections::HashSet<Ipv4Addr> {
        self.conntrack.census()
    }

    /// The state and what is derived from it.
    pub fn control(&self) -> &control::Control {
        &self.control
    }

    /// Kvstore mode: the cluster's etcd.
    pub fn cluster(&self) -> Option<&Arc<dyn cluster::ClusterState>> {
        self.cluster.as_ref()
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
            bare: Default::default(),
        }
    }

    /// For a connection the L7 proxy accepted: the client's identity (it
    /// is a local pod: the datapath redirects from the pods' side), the
    /// server's identity, and whether the server is a pod on this node.
    pub fn l7_peers(&self, client: Ipv4Addr, server: Ipv4Addr) -> Option<(u32, u32, bool)> {
        // The enrichment index: by address, rebuilt with the maps at sync.
        let (client, server_pod) = {
            let index = self.control.lookup();
            let identity = |ip| index.by_ip.get(&ip).map(|m| m.endpoint.identity);
            (identity(client)?, identity(server))
        };
        match server_pod {
            Some(id) => Some((client, id, true)),
            None => Some((client, self.control.ipcache().identity_of(server), false)),
        }
    }

    pub fn handle(&self, req: Request) -> Response {
        let result = match req {
            Request::Status => Ok(Response::Status(self.status())),
            Request::PodUpsert(pod) => self.endpoints.pod_upsert(pod).map(|_| Response::Ok),
            Request::PodLabel {
                namespace,
                name,
                set,
                remove,
            } => self
                .endpoints
                .pod_label(&namespace, &name, set, &remove)
                .map(|_| Response::Ok),
            Request::PodDelete { namespace, name } => self
                .endpoints
                .pod_delete(&namespace, &name)
                .map(|_| Response::Ok),
            Request::EndpointAdd(a) => {
                if let Some(k) = &self.kubernetes {
                    // The pod's labels decide its identity: wait for them
                    // (the runtime saw the pod in the API, so its watch
                    // brings it within moments), as Cilium's agent fetches
                    // the pod at CNI ADD.
                    k.wait_for_pod(&self.control, &a.namespace, &a.pod);
                }
                self.endpoints.add(a).map(Response::Added)
            }
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
                    .control
                    .lock()
                    .all_identities()
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
            } => self.policies.import(&file, &yaml, namespace.as_deref()),
            Request::PolicyGet => Ok(Response::Policies {
                policies: self.policies.get(),
            }),
            Request::PolicyDelete { key } => self.policies.delete(&key).map(|_| Response::Ok),
            Request::PolicyTrace(t) => self.policies.trace(&t),
            Request::NamespaceAudit { namespace, audit } => {
                self.policies.audit(&namespace, audit).map(|_| Response::Ok)
            }
            Request::FqdnList => Ok(Response::Fqdn {
                names: self
                    .fqdn
                    .cache()
                    .into_iter()
                    .map(|(name, ips)| api::FqdnInfo { name, ips })
                    .collect(),
            }),
            Request::ConntrackList { address } => Ok(self.conntrack.list(address)),
            Request::EnforceEstablished => self
                .conntrack
                .enforce_established()
                .map(|(checked, cut)| Response::Enforced { checked, cut }),
            Request::ServiceUpsert(svc) => self.services.upsert(svc).map(|_| Response::Ok),
            Request::ServiceDelete { namespace, name } => self
                .services
                .delete(&namespace, &name)
                .map(|_| Response::Ok),
            Request::ServiceList => Ok(Response::Services {
                services: self.services.list(),
            }),
            Request::PrefilterList => self.prefilter.list().map(Response::Prefilter),
            Request::PrefilterUpdate { add, remove } => self
                .prefilter
                .update(&add, &remove, &self.node_addresses())
                .map(|_| Response::Ok),
        };
        result.unwrap_or_else(|e| Response::Error {
            message: e.to_string(),
            cause: e.kind(),
        })
    }

    /// This node's addresses and the other nodes' (remote-node entries of
    /// the ipcache), with whose they are: what the prefilter must never
    /// drop.
    fn node_addresses(&self) -> Vec<(Ipv4Addr, String)> {
        let mut out: Vec<(Ipv4Addr, String)> = net::host_ipv4_addresses()
            .unwrap_or_default()
            .into_iter()
            .map(|a| (a, "this node".to_string()))
            .collect();
        out.push((self.config.node_address, "this node".into()));
        for (addr, len, identity, _) in self.datapath.ipcache_entries().unwrap_or_default() {
            if len == 32 && identity == abi::identity::REMOTE_NODE {
                out.push((addr, "another node".into()));
            }
        }
        out
    }

    pub fn status(&self) -> StatusInfo {
        // Before the state is locked: asking etcd waits on the runtime
        // whose watches take that lock.
        let cluster = self.cluster.as_ref().map(|c| c.info(&self.control));
        // The policy sync's lock is taken once below as well: the host's
        // policy is read first, that lock released (never held twice).
        let host_firewall = self.config.host_firewall.as_ref().map(|h| {
            let policy = self.control.policy();
            let computed = policy.computed(abi::identity::HOST);
            api::HostFirewallInfo {
                devices: h.devices.clone(),
                audit: h.audit,
                labels: policy::LabelSet::host_endpoint(&h.node_labels).to_strings(),
                enforcement: endpoints::enforcement(computed),
            }
        });
        let s = self.control.lock();
        let (buffered, seen) = self.observer.counts();
        StatusInfo {
            node_name: self.config.node_name.clone(),
            pod_cidr: self.config.pod_cidr.to_string(),
            endpoints: s.endpoints().len(),
            identities: s.pod_identities().count(),
            policies: s.policies().len(),
            flows_seen: seen,
            flows_buffered: buffered,
            flow_capacity: self.config.flow_capacity,
            events_lost_kernel: self.datapath.events_lost(),
            ct_entries: self
                .conntrack
                .entries
                .load(std::sync::atomic::Ordering::Relaxed),
            ct_endpoint_budget: self.config.ct_endpoint_budget,
            ct_busiest_endpoint: self
                .conntrack
                .busiest
                .load(std::sync::atomic::Ordering::Relaxed),
            ct_budget_overflows: self
                .conntrack
                .overflows
                .load(std::sync::atomic::Ordering::Relaxed)
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
            cluster,
            kubernetes: self.kubernetes.as_ref().map(|k| k.info()),
            host_firewall,
            kube_proxy_replacement: self.config.kube_proxy_replacement.as_ref().map(|k| {
                api::KubeProxyReplacementInfo {
                    devices: k.devices.clone(),
                    maglev_table_size: k.maglev_table_size,
                }
            }),
        }
    }
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
