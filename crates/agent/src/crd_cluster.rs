//! CRD mode (`--identity-allocation-mode crd`, Cilium's default): the
//! cluster's shared state in the Kubernetes API instead of etcd.
//! - Identities are `CiliumIdentity` objects named by their number, with
//!   the labels in `security-labels`. A number is claimed by creating the
//!   object (the API server refuses a second create of a name): the first
//!   candidate is derived from the labels, so two nodes asking for the same
//!   labels at once ask for the same number and one of them finds the
//!   other's; a number held by other labels moves to the next.
//! - Each local endpoint is a `CiliumEndpoint` named as its pod (identity,
//!   address, node address, named ports), owned by the Pod so that it goes
//!   with it; other nodes' endpoints are followed into the ipcache.
//! - Each node is a `CiliumNode` (InternalIP, pod CIDR, its Hubble address
//!   in an annotation): peers for Hubble and `remote-node` addresses.
//!
//! Every follower lists, then watches (kube-rs watchers: a broken watch or
//! 410 Gone lists again), and makes the state the list at each list.
//! Unlike kvstore mode nothing expires with a lease: a node that is gone
//! keeps its objects until they are deleted (Cilium's operator collects
//! them; Fibril has no operator yet).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::TryStreamExt;
use k8s::kube::api::{
    Api, ApiResource, DeleteParams, DynamicObject, Patch, PatchParams, PostParams,
};
use k8s::kube::runtime::watcher::{self, Event};
use k8s::kube::runtime::WatchStreamExt;
use k8s::kube::Client;
use serde_json::json;
use tokio::sync::watch;

use crate::cluster::ClusterState;
use crate::control::Control;
use crate::{invalid, Error};

const HUBBLE_ANNOTATION: &str = "fibril.io/hubble-address";
const NODE_LABEL: &str = "fibril.io/node";
/// The cluster-local identity numbers (Cilium's, below the cluster id bits).
const FIRST_ID: u32 = 256;
const LAST_ID: u32 = 65_535;
/// How long an allocation waits for the API server.
const WAIT: Duration = Duration::from_secs(5);

fn resource(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: "cilium.io".into(),
        version: "v2".into(),
        api_version: "cilium.io/v2".into(),
        kind: kind.into(),
        plural: plural.into(),
    }
}

/// What this node says about itself.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub cluster: String,
    pub node: String,
    pub address: Ipv4Addr,
    pub pod_cidr: String,
}

pub struct CrdCluster {
    rt: tokio::runtime::Runtime,
    client: watch::Receiver<Option<Client>>,
    config: NodeConfig,
    /// Labels (as strings) -> number, as the identity watch last listed.
    by_labels: Arc<Mutex<BTreeMap<Vec<String>, u32>>>,
    /// Whether the identities were listed once (allocation waits for it).
    synced: watch::Receiver<bool>,
    hubble_address: watch::Sender<String>,
    peers: Arc<watch::Sender<BTreeMap<String, String>>>,
}

impl CrdCluster {
    /// Connects (and keeps trying) in the background; follows identities,
    /// other nodes' endpoints and the nodes.
    pub fn start(
        kubeconfig: Option<std::path::PathBuf>,
        config: NodeConfig,
        control: Arc<Control>,
    ) -> Result<Arc<Self>, Error> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fibril-crd")
            .enable_all()
            .build()
            .map_err(|e| invalid(format!("CRD mode runtime: {e}")))?;
        let (client_tx, client) = watch::channel(None);
        let (synced_tx, synced) = watch::channel(false);
        let by_labels = Arc::new(Mutex::new(BTreeMap::new()));
        let (hubble_address, mut hubble) = watch::channel(String::new());
        let peers = Arc::new(watch::channel(BTreeMap::new()).0);
        let me = Arc::new(CrdCluster {
            rt,
            client,
            config: config.clone(),
            by_labels: by_labels.clone(),
            synced,
            hubble_address,
            peers: peers.clone(),
        });
        let republish = Arc::downgrade(&me);
        me.rt.spawn(async move {
            let client = loop {
                match k8s::client::connect(kubeconfig.as_deref()).await {
                    Ok(c) => match k8s::client::install_crds(&c).await {
                        Ok(()) => break c,
                        Err(e) => tracing::warn!(error = %e, "CRD mode: installing the CRDs"),
                    },
                    Err(e) => tracing::warn!(error = %e, "CRD mode: Kubernetes API unreachable"),
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            };
            client_tx.send_replace(Some(client.clone()));
            tokio::spawn(follow_identities(
                client.clone(),
                control.clone(),
                by_labels,
                synced_tx,
            ));
            tokio::spawn(follow_endpoints(
                client.clone(),
                config.node.clone(),
                control.clone(),
            ));
            tokio::spawn(follow_nodes(
                client.clone(),
                config.clone(),
                control.clone(),
                peers,
                hubble.clone(),
            ));
            // This node's endpoints, published again (a restart, endpoints
            // made before the API answered).
            if let Some(me) = republish.upgrade() {
                let endpoints: Vec<_> = control.lock().endpoints().values().cloned().collect();
                for ep in endpoints {
                    let ports = control.lock().kv_named_ports(&ep);
                    me.put_endpoint(&client, &ep, ports).await;
                }
            }
            // The node's entry: now, and again when the Hubble address comes.
            hubble.mark_changed();
            while hubble.changed().await.is_ok() {
                let address = hubble.borrow_and_update().clone();
                if let Err(e) = register(&client, &config, &address).await {
                    tracing::warn!(error = %e, "CRD mode: registering this node");
                }
            }
        });
        Ok(me)
    }

    fn client(&self) -> Result<Client, Error> {
        let mut c = self.client.clone();
        self.rt
            .block_on(async {
                tokio::time::timeout(WAIT, c.wait_for(Option::is_some))
                    .await
                    .ok()?
                    .ok()
                    .and_then(|c| c.clone())
            })
            .ok_or_else(|| Error::Unavailable("the Kubernetes API is not reachable".into()))
    }

    async fn allocate(&self, client: &Client, labels: &policy::LabelSet) -> Result<u32, Error> {
        let key = labels.to_strings();
        let mut synced = self.synced.clone();
        let _ = tokio::time::timeout(WAIT, synced.wait_for(|s| *s)).await;
        if let Some(id) = self
            .by_labels
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
        {
            return Ok(*id);
        }
        let api: Api<DynamicObject> = Api::all_with(
            client.clone(),
            &resource("CiliumIdentity", "ciliumidentities"),
        );
        let span = LAST_ID - FIRST_ID + 1;
        let start = fnv(&key.join(";")) % span;
        for step in 0..span {
            let id = FIRST_ID + (start + step) % span;
            let obj = identity_object(id, labels);
            match api.create(&PostParams::default(), &obj).await {
                Ok(_) => {
                    self.by_labels
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(key, id);
                    return Ok(id);
                }
                Err(k8s::kube::Error::Api(s)) if s.code == 409 => {
                    // Taken: ours if it holds the same labels.
                    let held = api.get_opt(&id.to_string()).await.map_err(unavailable)?;
                    if held
                        .and_then(|o| parse_identity(&o))
                        .is_some_and(|(_, l)| l.to_strings() == key)
                    {
                        self.by_labels
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .insert(key, id);
                        return Ok(id);
                    }
                }
                Err(e) => return Err(unavailable(e)),
            }
        }
        Err(Error::Exhausted(
            "no cluster-local identity left (256-65535 are all in use)".into(),
        ))
    }

    async fn put_endpoint(
        &self,
        client: &Client,
        ep: &crate::state::Endpoint,
        ports: Vec<kvstore::NamedPort>,
    ) {
        let api: Api<DynamicObject> = Api::namespaced_with(
            client.clone(),
            &ep.namespace,
            &resource("CiliumEndpoint", "ciliumendpoints"),
        );
        let owner = k8s::kube::Api::<k8s_openapi::api::core::v1::Pod>::namespaced(
            client.clone(),
            &ep.namespace,
        )
        .get_opt(&ep.pod)
        .await
        .ok()
        .flatten()
        .and_then(|p| p.metadata.uid);
        let mut obj = json!({
            "apiVersion": "cilium.io/v2",
            "kind": "CiliumEndpoint",
            "metadata": {"name": ep.pod, "namespace": ep.namespace, "labels": {NODE_LABEL: self.config.node}},
            "status": {
                "id": ep.id,
                "state": "ready",
                "identity": {"id": ep.identity},
                "networking": {"addressing": [{"ipv4": ep.ipv4.to_string()}], "node": self.config.address.to_string()},
                "named-ports": ports.iter().map(|p| json!({"name": p.name, "port": p.port, "protocol": p.protocol})).collect::<Vec<_>>(),
            },
        });
        if let Some(uid) = owner {
            obj["metadata"]["ownerReferences"] =
                json!([{"apiVersion": "v1", "kind": "Pod", "name": ep.pod, "uid": uid}]);
        }
        let done = api
            .patch(
                &ep.pod,
                &PatchParams::apply(k8s::client::FIELD_MANAGER).force(),
                &Patch::Apply(&obj),
            )
            .await;
        if let Err(e) = done {
            tracing::warn!(ip = %ep.ipv4, error = %e, "CRD mode: CiliumEndpoint not written");
        }
    }
}

impl ClusterState for CrdCluster {
    fn acquire_identity(&self, labels: &policy::LabelSet) -> Result<u32, Error> {
        let client = self.client()?;
        self.rt.block_on(self.allocate(&client, labels))
    }

    /// Identities stay until collected (no operator yet; see the module).
    fn release_identity(&self, _labels: &policy::LabelSet) {}

    fn publish_endpoint(&self, ep: &crate::state::Endpoint, named_ports: Vec<kvstore::NamedPort>) {
        match self.client() {
            Ok(client) => self
                .rt
                .block_on(self.put_endpoint(&client, ep, named_ports)),
            Err(e) => {
                tracing::warn!(ip = %ep.ipv4, error = %e, "CRD mode: endpoint not published (it is when the API answers)")
            }
        }
    }

    fn withdraw_endpoint(&self, ep: &crate::state::Endpoint) {
        let Ok(client) = self.client() else { return };
        let api: Api<DynamicObject> = Api::namespaced_with(
            client,
            &ep.namespace,
            &resource("CiliumEndpoint", "ciliumendpoints"),
        );
        match self
            .rt
            .block_on(api.delete(&ep.pod, &DeleteParams::default()))
        {
            Ok(_) => {}
            // Gone with its Pod already (its owner).
            Err(k8s::kube::Error::Api(s)) if s.code == 404 => {}
            Err(e) => {
                tracing::warn!(ip = %ep.ipv4, error = %e, "CRD mode: CiliumEndpoint not deleted")
            }
        }
    }

    fn set_hubble_address(&self, address: &str) {
        let me = format!("{}/{}", self.config.cluster, self.config.node);
        self.peers.send_modify(|m| {
            m.insert(me, address.to_string());
        });
        self.hubble_address.send_replace(address.to_string());
    }

    fn peers(&self) -> watch::Receiver<BTreeMap<String, String>> {
        self.peers.subscribe()
    }

    fn info(&self, control: &Control) -> api::ClusterInfo {
        let s = control.lock();
        api::ClusterInfo {
            kvstore: vec!["crd".into()],
            etcd_version: self
                .client
                .borrow()
                .is_some()
                .then(|| "Kubernetes API (CRD mode)".into()),
            nodes: self.peers.borrow().keys().cloned().collect(),
            identities: s.cluster_identities().len(),
            remote_endpoints: s.remote_endpoints().len(),
        }
    }
}

fn unavailable(e: k8s::kube::Error) -> Error {
    Error::Unavailable(format!("Kubernetes API: {e}"))
}

/// FNV-1a: a stable first candidate for a label set.
fn fnv(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5u32, |h, b| {
        (h ^ b as u32).wrapping_mul(0x0100_0193)
    })
}

fn identity_object(id: u32, labels: &policy::LabelSet) -> DynamicObject {
    let security: BTreeMap<String, String> = labels
        .to_strings()
        .iter()
        .map(|l| match l.split_once('=') {
            Some((k, v)) => (k.to_string(), v.to_string()),
            None => (l.clone(), String::new()),
        })
        .collect();
    let ns = security.get("k8s:io.kubernetes.pod.namespace").cloned();
    serde_json::from_value(json!({
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumIdentity",
        "metadata": {"name": id.to_string(), "labels": ns.map(|n| json!({"io.kubernetes.pod.namespace": n})).unwrap_or(json!({}))},
        "security-labels": security,
    }))
    .expect("an identity object")
}

/// (number, labels) of a CiliumIdentity; one that does not parse is none.
fn parse_identity(o: &DynamicObject) -> Option<(u32, policy::LabelSet)> {
    let id = o.metadata.name.as_deref()?.parse().ok()?;
    let text: String = o.data["security-labels"]
        .as_object()?
        .iter()
        .map(|(k, v)| format!("{k}={};", v.as_str().unwrap_or_default()))
        .collect();
    Some((id, kvstore::keys::parse_labels(&text)?))
}

/// Runs a watcher of `resource`, handing the whole list at each (re)list
/// to `listed` and each later change to `changed`.
async fn follow(
    api: Api<DynamicObject>,
    what: &str,
    mut listed: impl FnMut(Vec<DynamicObject>),
    mut changed: impl FnMut(DynamicObject, bool),
) {
    let stream = watcher::watcher(api, watcher::Config::default()).default_backoff();
    futures::pin_mut!(stream);
    let mut buffer = Vec::new();
    loop {
        match stream.try_next().await {
            Ok(Some(Event::Init)) => buffer.clear(),
            Ok(Some(Event::InitApply(o))) => buffer.push(o),
            Ok(Some(Event::InitDone)) => listed(std::mem::take(&mut buffer)),
            Ok(Some(Event::Apply(o))) => changed(o, true),
            Ok(Some(Event::Delete(o))) => changed(o, false),
            Ok(None) => return,
            Err(e) => tracing::warn!(error = %e, "CRD mode: watching {what}"),
        }
    }
}

async fn follow_identities(
    client: Client,
    control: Arc<Control>,
    by_labels: Arc<Mutex<BTreeMap<Vec<String>, u32>>>,
    synced: watch::Sender<bool>,
) {
    let api = Api::all_with(client, &resource("CiliumIdentity", "ciliumidentities"));
    let commit = |s: &mut crate::state::State| {
        if let Err(e) = control.commit(s) {
            tracing::warn!(error = %e, "CRD mode: identities not applied");
        }
    };
    follow(
        api,
        "CiliumIdentities",
        |objects| {
            let listed: BTreeMap<u32, policy::LabelSet> =
                objects.iter().filter_map(parse_identity).collect();
            {
                let mut b = by_labels.lock().unwrap_or_else(|e| e.into_inner());
                b.clear();
                // The lowest number of a label set wins where two exist.
                for (id, l) in listed.iter().rev() {
                    b.insert(l.to_strings(), *id);
                }
            }
            let mut s = control.lock();
            s.replace_cluster_identities(listed);
            commit(&mut s);
            synced.send_replace(true);
        },
        |o, present| {
            let Some((id, labels)) = parse_identity(&o) else {
                return;
            };
            let mut s = control.lock();
            if present {
                by_labels
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(labels.to_strings())
                    .or_insert(id);
                s.set_cluster_identity(id, Some(labels));
            } else {
                s.set_cluster_identity(id, None);
            }
            commit(&mut s);
        },
    )
    .await;
}

/// Another node's endpoint from its CiliumEndpoint.
fn remote_endpoint(o: &DynamicObject, me: &str) -> Option<kvstore::IpIdentity> {
    let node = o.metadata.labels.as_ref()?.get(NODE_LABEL)?.clone();
    if node == me {
        return None;
    }
    let st = &o.data["status"];
    let ports = st["named-ports"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|p| {
                    Some(kvstore::NamedPort {
                        name: p["name"].as_str()?.to_string(),
                        port: u16::try_from(p["port"].as_u64()?).ok()?,
                        protocol: p["protocol"].as_str().unwrap_or("TCP").to_string(),
                    })
                })
                .collect()
        })
        .unwrap_or_default();
    Some(kvstore::IpIdentity {
        ip: st["networking"]["addressing"][0]["ipv4"]
            .as_str()?
            .parse()
            .ok()?,
        host_ip: st["networking"]["node"].as_str()?.parse().ok()?,
        identity: u32::try_from(st["identity"]["id"].as_u64()?).ok()?,
        key: 0,
        namespace: o.metadata.namespace.clone().unwrap_or_default(),
        pod: o.metadata.name.clone().unwrap_or_default(),
        node,
        named_ports: ports,
    })
}

async fn follow_endpoints(client: Client, me: String, control: Arc<Control>) {
    let api = Api::all_with(client, &resource("CiliumEndpoint", "ciliumendpoints"));
    // Which address each object had, for its deletion.
    let addresses: Mutex<BTreeMap<(String, String), Ipv4Addr>> = Mutex::new(BTreeMap::new());
    let key = |o: &DynamicObject| {
        (
            o.metadata.namespace.clone().unwrap_or_default(),
            o.metadata.name.clone().unwrap_or_default(),
        )
    };
    follow(
        api,
        "CiliumEndpoints",
        |objects| {
            let listed: Vec<(_, kvstore::IpIdentity)> = objects
                .iter()
                .filter_map(|o| Some((key(o), remote_endpoint(o, &me)?)))
                .collect();
            let mut a = addresses.lock().unwrap_or_else(|e| e.into_inner());
            *a = listed.iter().map(|(k, r)| (k.clone(), r.ip)).collect();
            let mut s = control.lock();
            s.replace_remote_endpoints(listed.into_iter().map(|(_, r)| (r.ip, r)).collect());
            if let Err(e) = control.commit(&mut s) {
                tracing::warn!(error = %e, "CRD mode: endpoints not applied");
            }
        },
        |o, present| {
            let mut a = addresses.lock().unwrap_or_else(|e| e.into_inner());
            let mut s = control.lock();
            let old = a.remove(&key(&o));
            if let Some(ip) = old {
                s.set_remote_endpoint(ip, None);
            }
            if present {
                if let Some(r) = remote_endpoint(&o, &me) {
                    a.insert(key(&o), r.ip);
                    s.set_remote_endpoint(r.ip, Some(r));
                }
            }
            if let Err(e) = control.commit(&mut s) {
                tracing::warn!(error = %e, "CRD mode: endpoint not applied");
            }
        },
    )
    .await;
}

fn node_of(o: &DynamicObject) -> Option<(String, Option<Ipv4Addr>, String)> {
    let name = o.metadata.name.clone()?;
    let ip = o.data["spec"]["addresses"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["type"] == "InternalIP"))
        .and_then(|x| x["ip"].as_str()?.parse().ok());
    let hubble = o
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(HUBBLE_ANNOTATION).cloned())
        .unwrap_or_default();
    Some((name, ip, hubble))
}

async fn follow_nodes(
    client: Client,
    config: NodeConfig,
    control: Arc<Control>,
    peers: Arc<watch::Sender<BTreeMap<String, String>>>,
    own_hubble: watch::Receiver<String>,
) {
    let api = Api::all_with(client, &resource("CiliumNode", "ciliumnodes"));
    let nodes: Mutex<BTreeMap<String, (Option<Ipv4Addr>, String)>> = Mutex::new(BTreeMap::new());
    let publish = |n: &BTreeMap<String, (Option<Ipv4Addr>, String)>| {
        let mut all: BTreeMap<String, String> = n
            .iter()
            .filter(|(_, (_, h))| !h.is_empty())
            .map(|(name, (_, h))| (format!("{}/{name}", config.cluster), h.clone()))
            .collect();
        let own = own_hubble.borrow().clone();
        if !own.is_empty() {
            all.insert(format!("{}/{}", config.cluster, config.node), own);
        }
        peers.send_replace(all);
    };
    let apply = |n: &BTreeMap<String, (Option<Ipv4Addr>, String)>| {
        let mut s = control.lock();
        let gone: Vec<String> = s
            .remote_nodes()
            .keys()
            .filter(|k| !n.contains_key(*k))
            .cloned()
            .collect();
        for node in gone {
            s.set_remote_node(&node, None);
        }
        for (name, (ip, _)) in n {
            if *name != config.node {
                s.set_remote_node(name, *ip);
            }
        }
        if let Err(e) = control.commit(&mut s) {
            tracing::warn!(error = %e, "CRD mode: nodes not applied");
        }
    };
    follow(
        api,
        "CiliumNodes",
        |objects| {
            let mut n = nodes.lock().unwrap_or_else(|e| e.into_inner());
            *n = objects
                .iter()
                .filter_map(node_of)
                .map(|(k, ip, h)| (k, (ip, h)))
                .collect();
            publish(&n);
            apply(&n);
        },
        |o, present| {
            let Some((name, ip, h)) = node_of(&o) else {
                return;
            };
            let mut n = nodes.lock().unwrap_or_else(|e| e.into_inner());
            if present {
                n.insert(name, (ip, h));
            } else {
                n.remove(&name);
            }
            publish(&n);
            apply(&n);
        },
    )
    .await;
}

/// This node's CiliumNode.
async fn register(
    client: &Client,
    config: &NodeConfig,
    hubble: &str,
) -> Result<(), k8s::kube::Error> {
    let api: Api<DynamicObject> =
        Api::all_with(client.clone(), &resource("CiliumNode", "ciliumnodes"));
    let obj = json!({
        "apiVersion": "cilium.io/v2",
        "kind": "CiliumNode",
        "metadata": {"name": config.node, "annotations": {HUBBLE_ANNOTATION: hubble}},
        "spec": {
            "addresses": [{"type": "InternalIP", "ip": config.address.to_string()}],
            "ipam": {"podCIDRs": [config.pod_cidr]},
        },
    });
    api.patch(
        &config.node,
        &PatchParams::apply(k8s::client::FIELD_MANAGER).force(),
        &Patch::Apply(&obj),
    )
    .await?;
    Ok(())
}
