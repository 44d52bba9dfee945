//! The cluster (kvstore mode, `--kvstore`): this node's connection to the
//! cluster's etcd, kept on a runtime of its own. Policies are the
//! cluster's: an import or delete is written to etcd (all of a file's
//! policies in one transaction) and every node applies what it watches
//! under `fibril/state/policies/v1/`, listing again after any break, so a
//! node that was away converges. The cluster's identities (every node's
//! pods') are followed the same way into the state, so that policy selects
//! peers on other nodes by their labels. While etcd is unreachable the
//! node keeps the policies and identities it last had (persisted in its
//! state) and enforces them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kvstore::{keys, Event, Kvstore};
use tokio::sync::watch;

use crate::control::Control;
use crate::observer::Observer;
use crate::{invalid, Error};

/// Where the cluster's etcd is and how long this node's keys outlive it.
#[derive(Clone, Debug)]
pub struct KvstoreConfig {
    /// `http://ip:port` of each etcd member.
    pub endpoints: Vec<String>,
    /// The lease every key this node owns is tied to (Cilium: 15 min).
    pub lease_ttl: Duration,
    /// This node's address on the network between nodes (where tunnels
    /// and other nodes reach it).
    pub node_address: std::net::Ipv4Addr,
    /// This node's pod CIDR, as the node registry shows it.
    pub pod_cidr: String,
    /// Whether the cluster's policies are kept in etcd (false in
    /// Kubernetes mode, where they are the API server's objects).
    pub policies: bool,
}

/// Where the cluster's shared state lives: etcd (kvstore mode, `Cluster`)
/// or the Kubernetes API (CRD mode, `crd_cluster::CrdCluster`). Callers
/// hold no lock on the state (both apply their watches under it).
pub trait ClusterState: Send + Sync {
    /// The cluster's number for `labels` (this node's reference on it).
    fn acquire_identity(&self, labels: &policy::LabelSet) -> Result<u32, Error>;
    fn release_identity(&self, labels: &policy::LabelSet);
    /// A local endpoint, as other nodes see it (with its pod's ports).
    fn publish_endpoint(&self, ep: &crate::state::Endpoint, named_ports: Vec<kvstore::NamedPort>);
    fn withdraw_endpoint(&self, ep: &crate::state::Endpoint);
    /// Where this node's Hubble API listens (peers and the relay).
    fn set_hubble_address(&self, address: &str);
    /// Every node's Hubble address by peer name (`cluster/node`).
    fn peers(&self) -> watch::Receiver<BTreeMap<String, String>>;
    fn info(&self, control: &Control) -> api::ClusterInfo;
}

impl ClusterState for Cluster {
    fn acquire_identity(&self, labels: &policy::LabelSet) -> Result<u32, Error> {
        Cluster::acquire_identity(self, labels)
    }
    fn release_identity(&self, labels: &policy::LabelSet) {
        Cluster::release_identity(self, labels)
    }
    fn publish_endpoint(&self, ep: &crate::state::Endpoint, named_ports: Vec<kvstore::NamedPort>) {
        Cluster::publish_endpoint(self, ep, named_ports)
    }
    fn withdraw_endpoint(&self, ep: &crate::state::Endpoint) {
        Cluster::withdraw_endpoint(self, ep.ipv4)
    }
    fn set_hubble_address(&self, address: &str) {
        Cluster::set_hubble_address(self, address)
    }
    fn peers(&self) -> watch::Receiver<BTreeMap<String, String>> {
        Cluster::peers(self)
    }
    fn info(&self, control: &Control) -> api::ClusterInfo {
        Cluster::info(self, control)
    }
}

pub struct Cluster {
    rt: tokio::runtime::Runtime,
    /// The etcd members.
    endpoints: Vec<String>,
    cluster: String,
    node: String,
    /// Where this node's Hubble API listens, once it does (to the task
    /// that registers the node).
    hubble_address: watch::Sender<String>,
    /// Every node's Hubble address by peer name (`cluster/node`).
    peers: Arc<watch::Sender<BTreeMap<String, String>>>,
    node_address: std::net::Ipv4Addr,
    /// The live connection, `None` while there is none.
    kv: watch::Receiver<Option<Kvstore>>,
}

/// How long a caller (an import) waits for a connection before it is told
/// the kvstore is unreachable.
const CONNECT_WAIT: Duration = Duration::from_secs(3);
/// Between attempts to (re)connect.
const RETRY: Duration = Duration::from_secs(1);
/// Between two looks for unreferenced identities (one is collected at its
/// second look; Cilium's operator: 15 min).
const IDENTITY_GC_EVERY: Duration = Duration::from_secs(300);

impl Cluster {
    /// Starts connecting (and keeps at it) in the background.
    pub fn start(
        config: KvstoreConfig,
        cluster: &str,
        node: &str,
        control: Arc<Control>,
        observer: Arc<Observer>,
    ) -> Result<Arc<Self>, Error> {
        if config.endpoints.is_empty() {
            return Err(invalid("--kvstore: no etcd endpoint given"));
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fibril-kvstore")
            .enable_all()
            .build()
            .map_err(|e| invalid(format!("kvstore runtime: {e}")))?;
        let (tx, kv) = watch::channel(None);
        let node_address = config.node_address;
        let config_endpoints = config.endpoints.clone();
        let (hubble_address, mut hubble) = watch::channel(String::new());
        let peers = Arc::new(watch::channel(BTreeMap::new()).0);
        let peer_tx = peers.clone();
        let own_hubble = hubble_address.subscribe();
        let cluster_name = cluster.to_string();
        let (cluster, node) = (cluster.to_string(), node.to_string());
        let me = node.clone();
        rt.spawn(async move {
            loop {
                match Kvstore::connect(&config.endpoints, &cluster, &node, config.lease_ttl).await {
                    Ok(kv) => {
                        tracing::info!(endpoints = ?config.endpoints, "kvstore connected");
                        // This node's references on its endpoints' identities
                        // are tied to the lease: a new lease (a restart, a
                        // reconnect after expiry) takes them again.
                        refresh_references(&kv, &control).await;
                        tx.send_replace(Some(kv.clone()));
                        // This task alone writes the node's entry: now, and
                        // again when the Hubble address comes.
                        let followers = async {
                            tokio::select! {
                                r = follow_policies(&kv, &control, &observer), if config.policies => if let Err(e) = r {
                                    tracing::warn!(error = %e, "kvstore: following policies");
                                },
                                r = follow_identities(&kv, &control) => if let Err(e) = r {
                                    tracing::warn!(error = %e, "kvstore: following identities");
                                },
                                r = follow_endpoints(&kv, &control) => if let Err(e) = r {
                                    tracing::warn!(error = %e, "kvstore: following other nodes' endpoints");
                                },
                                r = follow_nodes(&kv, &control, &peer_tx, &own_hubble) => if let Err(e) = r {
                                    tracing::warn!(error = %e, "kvstore: following nodes");
                                },
                            }
                        };
                        tokio::pin!(followers);
                        hubble.mark_changed();
                        // Until a follower breaks; then list and watch anew.
                        loop {
                            tokio::select! {
                                _ = &mut followers => break,
                                changed = hubble.changed() => {
                                    if changed.is_err() {
                                        (&mut followers).await;
                                        break;
                                    }
                                    let address = hubble.borrow_and_update().clone();
                                    if let Err(e) = register(&kv, &config, &address, &control).await {
                                        tracing::warn!(error = %e, "kvstore: registering this node");
                                    }
                                }
                            }
                        }
                        tx.send_replace(None);
                    }
                    Err(e) => tracing::warn!(error = %e, "kvstore unreachable"),
                }
                tokio::time::sleep(RETRY).await;
            }
        });
        // Identities no node references go, as Cilium's operator collects
        // them (every node may: the collection is transactional).
        let mut slot = kv.clone();
        rt.spawn(async move {
            let mut marked = std::collections::BTreeSet::new();
            loop {
                tokio::time::sleep(IDENTITY_GC_EVERY).await;
                let Some(kv) = slot.borrow_and_update().clone() else { continue };
                match kv.gc_identities(&mut marked).await {
                    Ok(gone) if !gone.is_empty() => {
                        tracing::info!(identities = ?gone, "kvstore: unreferenced identities collected")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!(error = %e, "kvstore: identity collection"),
                }
            }
        });
        Ok(Arc::new(Cluster {
            endpoints: config_endpoints,
            rt,
            kv,
            cluster: cluster_name,
            node: me,
            node_address,
            hubble_address,
            peers,
        }))
    }

    /// The connection, waiting a little for one.
    fn kv(&self) -> Result<Kvstore, Error> {
        let mut kv = self.kv.clone();
        self.rt
            .block_on(async {
                tokio::time::timeout(CONNECT_WAIT, kv.wait_for(Option::is_some))
                    .await
                    .ok()
                    .and_then(|r| r.ok().and_then(|k| k.clone()))
            })
            .ok_or_else(|| Error::Unavailable("the kvstore (etcd) is not reachable".into()))
    }

    /// Writes `policies` to the cluster, all or none.
    pub fn put_policies(&self, policies: &[policy::Policy]) -> Result<(), Error> {
        let kv = self.kv()?;
        let items = policies
            .iter()
            .map(|p| {
                let value = serde_json::to_vec(p).expect("a policy serializes");
                (keys::policy(&p.key()), value)
            })
            .collect();
        self.rt.block_on(kv.put_all(items)).map_err(unreachable)
    }

    /// Deletes a policy from the cluster; whether it was there.
    pub fn delete_policy(&self, key: &str) -> Result<bool, Error> {
        let kv = self.kv()?;
        self.rt
            .block_on(kv.delete_existing(&keys::policy(key)))
            .map_err(unreachable)
    }

    /// The cluster's identity of `labels`, with this node's reference on
    /// it. Callers hold no lock on the state (the watches take it).
    pub fn acquire_identity(&self, labels: &policy::LabelSet) -> Result<u32, Error> {
        let kv = self.kv()?;
        self.rt
            .block_on(kv.acquire_identity(labels))
            .map_err(|e| match e {
                kvstore::Error::Exhausted => Error::Exhausted(e.to_string()),
                e => unreachable(e),
            })
    }

    /// Drops this node's reference on the identity of `labels`; one that
    /// cannot be dropped now goes with this node's lease.
    pub fn release_identity(&self, labels: &policy::LabelSet) {
        let released = self.kv().and_then(|kv| {
            self.rt
                .block_on(kv.release_identity(labels))
                .map_err(|e| Error::Unavailable(e.to_string()))
        });
        if let Err(e) = released {
            tracing::warn!(labels = ?labels.to_strings(), error = %e, "kvstore: identity reference not released");
        }
    }

    /// Registers where this node's Hubble API listens (peers and the relay
    /// find it in the node registry); until etcd has it, this node is its
    /// own only peer.
    pub fn set_hubble_address(&self, address: &str) {
        let me = format!("{}/{}", self.cluster, self.node);
        self.peers.send_modify(|m| {
            m.insert(me, address.to_string());
        });
        self.hubble_address.send_replace(address.to_string());
    }

    /// Every node's Hubble address by peer name, as it changes.
    pub fn peers(&self) -> watch::Receiver<BTreeMap<String, String>> {
        self.peers.subscribe()
    }

    /// A local endpoint as the cluster lists it.
    pub fn ip_identity(
        &self,
        ep: &crate::state::Endpoint,
        named_ports: Vec<kvstore::NamedPort>,
    ) -> kvstore::IpIdentity {
        ip_identity(ep, &self.node, self.node_address, named_ports)
    }

    /// Publishes a local endpoint's address (with its pod's declared
    /// ports); one that cannot be published now is published at the next
    /// (re)connect.
    pub fn publish_endpoint(
        &self,
        ep: &crate::state::Endpoint,
        named_ports: Vec<kvstore::NamedPort>,
    ) {
        let ip = self.ip_identity(ep, named_ports);
        let done = self.kv().and_then(|kv| {
            self.rt
                .block_on(kv.put_ip(&ip))
                .map_err(|e| Error::Unavailable(e.to_string()))
        });
        if let Err(e) = done {
            tracing::warn!(ip = %ip.ip, error = %e, "kvstore: endpoint not published");
        }
    }

    /// Withdraws a local endpoint's address; one that cannot be withdrawn
    /// now goes with this node's lease.
    pub fn withdraw_endpoint(&self, ip: std::net::Ipv4Addr) {
        let done = self.kv().and_then(|kv| {
            self.rt
                .block_on(kv.delete_ip(ip))
                .map_err(|e| Error::Unavailable(e.to_string()))
        });
        if let Err(e) = done {
            tracing::warn!(%ip, error = %e, "kvstore: endpoint not withdrawn");
        }
    }

    /// The cluster as this node sees it (no lock on the state held).
    pub fn info(&self, control: &Control) -> api::ClusterInfo {
        let version = self.kv.borrow().clone().and_then(|kv| {
            // The timer is made inside the runtime.
            self.rt
                .block_on(async { tokio::time::timeout(Duration::from_secs(1), kv.status()).await })
                .ok()?
                .ok()
        });
        let s = control.lock();
        api::ClusterInfo {
            kvstore: self.endpoints.clone(),
            etcd_version: version,
            nodes: self.peers.borrow().keys().cloned().collect(),
            identities: s.cluster_identities().len(),
            remote_endpoints: s.remote_endpoints().len(),
        }
    }

    /// Whether this node is connected now.
    pub fn connected(&self) -> bool {
        self.kv.borrow().is_some()
    }
}

/// Lists the cluster's policies, makes this node's the same, then applies
/// each change it watches.
async fn follow_policies(
    kv: &Kvstore,
    control: &Control,
    observer: &Observer,
) -> Result<(), Error> {
    follow(
        kv,
        keys::POLICIES,
        |entries| {
            let cluster: BTreeMap<String, policy::Policy> = entries
                .iter()
                .filter_map(|(k, v)| decode(k, v))
                .map(|p| (p.key(), p))
                .collect();
            let (put, remove) = {
                let s = control.lock();
                let put: Vec<policy::Policy> = cluster
                    .values()
                    .filter(|p| s.policies().get(&p.key()) != Some(*p))
                    .cloned()
                    .collect();
                let remove: Vec<String> = s
                    .policies()
                    .keys()
                    .filter(|k| !cluster.contains_key(*k))
                    .cloned()
                    .collect();
                (put, remove)
            };
            if put.is_empty() && remove.is_empty() {
                return Ok(());
            }
            tracing::info!(
                put = put.len(),
                removed = remove.len(),
                "policies synchronised with the cluster"
            );
            crate::policies::apply(control, observer, put, remove).map(|_| ())
        },
        |event| {
            let (put, remove) = match event {
                Event::Put(key, value) => match decode(&key, &value) {
                    Some(p) if control.lock().policies().get(&p.key()) != Some(&p) => {
                        (vec![p], vec![])
                    }
                    _ => return Ok(()),
                },
                Event::Delete(key) => match key.strip_prefix(keys::POLICIES) {
                    Some(k) if control.lock().policies().contains_key(k) => {
                        (vec![], vec![k.to_string()])
                    }
                    _ => return Ok(()),
                },
            };
            crate::policies::apply(control, observer, put, remove).map(|_| ())
        },
    )
    .await
}

/// A kvstore operation that failed: said as the connection's absence is.
fn unreachable(e: kvstore::Error) -> Error {
    Error::Unavailable(format!("the kvstore (etcd) is not reachable: {e}"))
}

fn ip_identity(
    ep: &crate::state::Endpoint,
    node: &str,
    address: std::net::Ipv4Addr,
    named_ports: Vec<kvstore::NamedPort>,
) -> kvstore::IpIdentity {
    kvstore::IpIdentity {
        ip: ep.ipv4,
        host_ip: address,
        identity: ep.identity,
        key: 0,
        namespace: ep.namespace.clone(),
        pod: ep.pod.clone(),
        node: node.to_string(),
        named_ports,
    }
}

/// This node's registry entry.
fn node_entry(
    kv: &Kvstore,
    address: std::net::Ipv4Addr,
    pod_cidr: &str,
    hubble_address: &str,
) -> kvstore::Node {
    kvstore::Node {
        name: kv.node().to_string(),
        cluster: kv.cluster().to_string(),
        addresses: vec![kvstore::types::NodeAddress {
            kind: "InternalIP".into(),
            ip: address,
        }],
        pod_cidr: pod_cidr.to_string(),
        hubble_address: hubble_address.to_string(),
    }
}

/// Registers this node and publishes its endpoints (under the current
/// lease).
async fn register(
    kv: &Kvstore,
    config: &KvstoreConfig,
    hubble_address: &str,
    control: &Control,
) -> Result<(), kvstore::Error> {
    kv.register_node(&node_entry(
        kv,
        config.node_address,
        &config.pod_cidr,
        hubble_address,
    ))
    .await?;
    let mine: Vec<kvstore::IpIdentity> = {
        let s = control.lock();
        s.endpoints()
            .values()
            .map(|ep| ip_identity(ep, kv.node(), config.node_address, s.kv_named_ports(ep)))
            .collect()
    };
    for ip in &mine {
        kv.put_ip(ip).await?;
    }
    Ok(())
}

/// Lists `prefix` and hands it to `listed`, then hands each change to
/// `changed`, in order; returns when the watch or the lease breaks (the
/// caller connects, lists and watches again).
async fn follow(
    kv: &Kvstore,
    prefix: &str,
    listed: impl FnOnce(Vec<(String, Vec<u8>)>) -> Result<(), Error>,
    mut changed: impl FnMut(Event) -> Result<(), Error>,
) -> Result<(), Error> {
    let unavailable = |e: kvstore::Error| Error::Unavailable(format!("kvstore: {e}"));
    let listing = kv.list(prefix).await.map_err(unavailable)?;
    let revision = listing.revision;
    listed(listing.entries)?;
    let mut events = kv.watch(prefix, revision).await.map_err(unavailable)?;
    let mut lease = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            event = events.recv() => match event {
                Some(event) => changed(event)?,
                None => return Ok(()),
            },
            _ = lease.tick() => {
                if !kv.is_alive() {
                    return Ok(());
                }
            }
        }
    }
}

/// Lists the cluster's nodes into `peers` (peer name -> Hubble address;
/// nodes not serving Hubble yet left out) and the other nodes' addresses
/// into the state (`remote-node` in the ipcache), then follows them.
async fn follow_nodes(
    kv: &Kvstore,
    control: &Control,
    peers: &watch::Sender<BTreeMap<String, String>>,
    own_hubble: &watch::Receiver<String>,
) -> Result<(), Error> {
    let prefix = keys::nodes_of(kv.cluster());
    let decode = |k: &str, v: &[u8]| match serde_json::from_slice::<kvstore::Node>(v) {
        Ok(n) => Some(n),
        Err(e) => {
            tracing::warn!(key = k, error = %e, "kvstore: a node that does not decode; skipped");
            None
        }
    };
    let node_name = |k: &str| k.strip_prefix(&prefix).unwrap_or(k).to_string();
    let name = |k: &str| format!("{}/{}", kv.cluster(), node_name(k));
    // This node as it serves now, whatever its entry says yet (it is
    // registered with its address a moment after it has one).
    let publish = |nodes: &BTreeMap<String, kvstore::Node>| {
        let mut all: BTreeMap<String, String> = nodes
            .iter()
            .filter(|(_, n)| !n.hubble_address.is_empty())
            .map(|(k, n)| (name(k), n.hubble_address.clone()))
            .collect();
        let own = own_hubble.borrow().clone();
        if !own.is_empty() {
            all.insert(format!("{}/{}", kv.cluster(), kv.node()), own);
        }
        peers.send_replace(all);
    };
    // Another node's address, into the state (this node's own is `host`).
    let set_address = |s: &mut crate::state::State, k: &str, n: Option<&kvstore::Node>| {
        let node = node_name(k);
        if node != kv.node() {
            s.set_remote_node(&node, n.and_then(kvstore::Node::tunnel_endpoint));
        }
    };
    // Both closures update it, one at a time.
    let nodes = std::sync::Mutex::new(BTreeMap::new());
    follow(
        kv,
        &prefix,
        |entries| {
            let mut n = nodes.lock().unwrap_or_else(|e| e.into_inner());
            *n = entries
                .iter()
                .filter_map(|(k, v)| Some((k.clone(), decode(k, v)?)))
                .collect();
            publish(&n);
            let mut s = control.lock();
            let gone: Vec<String> = s
                .remote_nodes()
                .keys()
                .filter(|node| !n.contains_key(&keys::node(kv.cluster(), node)))
                .cloned()
                .collect();
            for node in gone {
                s.set_remote_node(&node, None);
            }
            for (k, node) in n.iter() {
                set_address(&mut s, k, Some(node));
            }
            control.commit(&mut s)
        },
        |event| {
            let mut n = nodes.lock().unwrap_or_else(|e| e.into_inner());
            let mut s = control.lock();
            match event {
                Event::Put(k, v) => match decode(&k, &v) {
                    Some(node) => {
                        set_address(&mut s, &k, Some(&node));
                        n.insert(k, node);
                    }
                    None => {
                        set_address(&mut s, &k, None);
                        n.remove(&k);
                    }
                },
                Event::Delete(k) => {
                    set_address(&mut s, &k, None);
                    n.remove(&k);
                }
            };
            publish(&n);
            control.commit(&mut s)
        },
    )
    .await
}

/// Lists the other nodes' endpoints into the state (those gone removed),
/// then applies each watched change.
async fn follow_endpoints(kv: &Kvstore, control: &Control) -> Result<(), Error> {
    let prefix = keys::ips_of(kv.cluster());
    follow(
        kv,
        &prefix,
        |entries| {
            let listed: BTreeMap<std::net::Ipv4Addr, kvstore::IpIdentity> = entries
                .iter()
                .filter_map(|(k, v)| remote_endpoint(kv, k, v))
                .map(|r| (r.ip, r))
                .collect();
            let mut s = control.lock();
            s.replace_remote_endpoints(listed);
            control.commit(&mut s)
        },
        |event| {
            let mut s = control.lock();
            match event {
                Event::Put(k, v) => match remote_endpoint(kv, &k, &v) {
                    Some(r) => s.set_remote_endpoint(r.ip, Some(r)),
                    None => return Ok(()),
                },
                Event::Delete(k) => match k.strip_prefix(&prefix).and_then(|ip| ip.parse().ok()) {
                    Some(ip) => s.set_remote_endpoint(ip, None),
                    None => return Ok(()),
                },
            }
            control.commit(&mut s)
        },
    )
    .await
}

/// Another node's endpoint (this node's own are skipped); one that does
/// not decode, or whose key and address disagree, is skipped and said so.
fn remote_endpoint(kv: &Kvstore, key: &str, value: &[u8]) -> Option<kvstore::IpIdentity> {
    match serde_json::from_slice::<kvstore::IpIdentity>(value) {
        Ok(r) if keys::ip(kv.cluster(), r.ip) != key => {
            tracing::warn!(
                key,
                "kvstore: an endpoint under another address's key; skipped"
            );
            None
        }
        Ok(r) => (r.node != kv.node()).then_some(r),
        Err(e) => {
            tracing::warn!(key, error = %e, "kvstore: an endpoint that does not decode; skipped");
            None
        }
    }
}

/// Takes this node's reference on each identity its endpoints hold; says
/// so when the cluster gives the labels another number (the endpoints keep
/// theirs until they are re-created).
async fn refresh_references(kv: &Kvstore, control: &Control) {
    let held: Vec<(u32, policy::LabelSet)> = control
        .lock()
        .local_identities()
        .iter()
        .map(|(id, l)| (*id, l.clone()))
        .collect();
    for (id, labels) in held {
        match kv.acquire_identity(&labels).await {
            Ok(got) if got == id => {}
            Ok(got) => tracing::error!(
                labels = ?labels.to_strings(), local = id, cluster = got,
                "kvstore: the cluster numbers these labels differently"
            ),
            Err(e) => tracing::warn!(error = %e, "kvstore: identity reference not taken"),
        }
    }
}

/// Lists the cluster's identities into the state (those gone from it
/// removed), then applies each watched change.
async fn follow_identities(kv: &Kvstore, control: &Control) -> Result<(), Error> {
    follow(
        kv,
        keys::IDENTITY_IDS,
        |entries| {
            let listed: BTreeMap<u32, policy::LabelSet> =
                entries.iter().filter_map(|(k, v)| identity(k, v)).collect();
            let mut s = control.lock();
            s.replace_cluster_identities(listed);
            control.commit(&mut s)
        },
        |event| {
            let mut s = control.lock();
            match event {
                Event::Put(k, v) => match identity(&k, &v) {
                    Some((id, labels)) => s.set_cluster_identity(id, Some(labels)),
                    None => return Ok(()),
                },
                Event::Delete(k) => match keys::id_of(&k) {
                    Some(id) => s.set_cluster_identity(id, None),
                    None => return Ok(()),
                },
            }
            control.commit(&mut s)
        },
    )
    .await
}

/// (number, labels) of an identity's master key; one that does not parse
/// is skipped and said so.
fn identity(key: &str, value: &[u8]) -> Option<(u32, policy::LabelSet)> {
    let parsed = keys::id_of(key).zip(std::str::from_utf8(value).ok().and_then(keys::parse_labels));
    if parsed.is_none() {
        tracing::warn!(key, "kvstore: an identity that does not parse; skipped");
    }
    parsed
}

/// A policy as another node wrote it; one that does not decode is skipped
/// and said so (it changes nothing here).
fn decode(key: &str, value: &[u8]) -> Option<policy::Policy> {
    match serde_json::from_slice::<policy::Policy>(value) {
        Ok(p) if keys::policy(&p.key()) == key => Some(p),
        Ok(p) => {
            tracing::warn!(key, policy = %p.key(), "kvstore: a policy under another policy's key; skipped");
            None
        }
        Err(e) => {
            tracing::warn!(key, error = %e, "kvstore: a policy that does not decode; skipped");
            None
        }
    }
}
