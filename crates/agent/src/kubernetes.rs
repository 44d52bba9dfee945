//! Kubernetes mode (`--k8s-kubeconfig-path`): policies are the API
//! server's. The agent installs Cilium's CRDs (as Cilium's agent does) and
//! follows CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy and
//! NetworkPolicy with kube-rs watchers on a runtime of its own. A watcher
//! lists, then watches from the list's resourceVersion; when the watch
//! breaks or the server says 410 Gone it lists again (with backoff), and at
//! the end of each list this node's policies of that kind are made the same
//! as the list, so nothing missed while away survives. Each object is
//! validated as `fibril policy import` validates a file; what this node
//! made of it (in force at a revision, or refused with the field and why)
//! goes into the object's status (`status.nodes.<node>` and the `Valid`
//! condition). An invalid update leaves the last valid version in force.
//! With the API server gone the node keeps and enforces the policies it
//! last had (its state log holds them). Services and EndpointSlices are
//! followed the same way (`kubernetes_services`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::Duration;

use futures::TryStreamExt;
use k8s::kube::api::DynamicObject;
use k8s::kube::runtime::watcher::{self, Event};
use k8s::kube::runtime::WatchStreamExt;
use k8s::kube::Client;
use k8s::policy::{Kind, Outcome};

use k8s_openapi::api::core::v1::{Namespace, Pod};

use crate::control::Control;
use crate::observer::Observer;
use crate::Agent;
use crate::{invalid, Error};

/// Where the API server is.
#[derive(Clone, Debug)]
pub struct KubernetesConfig {
    /// A kubeconfig file (its current context); None: in a pod, the
    /// in-cluster service account.
    pub kubeconfig: Option<PathBuf>,
}

/// This node's pod CIDR from its Node object (`ipam.mode=kubernetes`),
/// waiting for the controller-manager to allocate it (a minute at most).
pub fn node_pod_cidr(config: &KubernetesConfig, node: &str) -> Result<String, Error> {
    with_client(config, |client| async move {
        k8s::client::node_pod_cidr(&client, node, Duration::from_secs(60)).await
    })
}

/// This node's labels from its Node object (what host policies'
/// nodeSelectors match), read once at start as the pod CIDR is.
pub fn node_labels(
    config: &KubernetesConfig,
    node: &str,
) -> Result<std::collections::BTreeMap<String, String>, Error> {
    with_client(config, |client| async move {
        k8s::client::node_labels(&client, node).await
    })
}

/// Runs one request against the API server on a runtime of its own.
fn with_client<T, F>(
    config: &KubernetesConfig,
    request: impl FnOnce(Client) -> F,
) -> Result<T, Error>
where
    F: std::future::Future<Output = Result<T, k8s::Error>>,
{
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| invalid(format!("kubernetes runtime: {e}")))?;
    rt.block_on(async {
        let client = k8s::client::connect(config.kubeconfig.as_deref())
            .await
            .map_err(|e| Error::Unavailable(e.to_string()))?;
        request(client)
            .await
            .map_err(|e| Error::Unavailable(e.to_string()))
    })
}

pub struct Kubernetes {
    /// Runs the watchers; dropped with the agent.
    _rt: tokio::runtime::Runtime,
    kubeconfig: Option<PathBuf>,
    connected: tokio::sync::watch::Receiver<bool>,
    /// The client, once the API server was reached.
    client: tokio::sync::watch::Receiver<Option<Client>>,
    node: String,
}

/// How long a CNI ADD waits for its pod to come through the watch.
const POD_WAIT: Duration = Duration::from_secs(5);

/// Between attempts to reach the API server (before the watchers' own
/// backoff takes over).
const RETRY: Duration = Duration::from_secs(1);

impl Kubernetes {
    /// Starts following the API server (and keeps at it) in the background.
    pub fn start(
        config: KubernetesConfig,
        node: &str,
        control: Arc<Control>,
        observer: Arc<Observer>,
    ) -> Result<Arc<Self>, Error> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("fibril-k8s")
            .enable_all()
            .build()
            .map_err(|e| invalid(format!("kubernetes runtime: {e}")))?;
        let (tx, connected) = tokio::sync::watch::channel(false);
        let (client_tx, client_rx) = tokio::sync::watch::channel(None);
        let node = node.to_string();
        let me = node.clone();
        let kubeconfig = config.kubeconfig.clone();
        rt.spawn(async move {
            let client = loop {
                match connect(&config).await {
                    Ok(c) => break c,
                    Err(e) => tracing::warn!(error = %e, "Kubernetes API unreachable"),
                }
                tokio::time::sleep(RETRY).await;
            };
            tracing::info!(kubeconfig = ?config.kubeconfig, "Kubernetes API connected; CRDs installed");
            tx.send_replace(true);
            client_tx.send_replace(Some(client.clone()));
            let services = crate::kubernetes_services::ServiceFollower::new(control.clone());
            tokio::spawn(services.run(client.clone()));
            let followers = k8s::policy::kinds().into_iter().map(|kind| {
                let follower = PolicyFollower {
                    client: client.clone(),
                    kind,
                    node: node.clone(),
                    control: control.clone(),
                    observer: observer.clone(),
                    applied: BTreeMap::new(),
                };
                tokio::spawn(follower.run())
            });
            futures::future::join_all(followers).await;
        });
        Ok(Arc::new(Kubernetes {
            _rt: rt,
            kubeconfig,
            connected,
            client: client_rx,
            node: me,
        }))
    }

    /// Follows this node's pods (and every namespace's labels) into the
    /// agent's pod metadata, which decides endpoints' identities: a label
    /// changed with `kubectl label` moves the pod's endpoint to the
    /// identity of its new labels.
    pub fn follow_pods(&self, agent: Weak<Agent>) {
        let mut client = self.client.clone();
        let node = self.node.clone();
        self._rt.spawn(async move {
            let Ok(client) = client.wait_for(Option::is_some).await.map(|c| c.clone()) else {
                return;
            };
            let Some(client) = client else { return };
            PodFollower {
                client,
                node,
                agent,
                namespaces: BTreeMap::new(),
                pods: BTreeMap::new(),
            }
            .run()
            .await;
        });
    }

    /// Waits (a few seconds at most) until the pod's metadata has come
    /// from the API.
    pub fn wait_for_pod(&self, control: &Control, namespace: &str, pod: &str) {
        let key = format!("{namespace}/{pod}");
        let end = std::time::Instant::now() + POD_WAIT;
        while std::time::Instant::now() < end {
            if control.lock().pods().contains_key(&key) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        tracing::warn!(pod = %key, "CNI ADD of a pod the API has not shown this node; its identity has only its namespace until it does");
    }

    /// What `fibril status` shows.
    pub fn info(&self) -> api::KubernetesInfo {
        api::KubernetesInfo {
            kubeconfig: self
                .kubeconfig
                .as_ref()
                .map_or("in-cluster".into(), |p| p.display().to_string()),
            connected: *self.connected.borrow(),
        }
    }
}

async fn connect(config: &KubernetesConfig) -> Result<Client, k8s::Error> {
    let client = k8s::client::connect(config.kubeconfig.as_deref()).await?;
    k8s::client::install_crds(&client).await?;
    Ok(client)
}

/// One kind's watcher and what this node made of its objects.
struct PolicyFollower {
    client: Client,
    kind: Kind,
    node: String,
    control: Arc<Control>,
    observer: Arc<Observer>,
    /// Per policy key: the generation in force (an update whose generation
    /// is the same, a status write, changes nothing).
    applied: BTreeMap<String, i64>,
}

impl PolicyFollower {
    async fn run(mut self) {
        let stream = watcher::watcher(self.kind.api(&self.client), watcher::Config::default())
            .default_backoff();
        futures::pin_mut!(stream);
        let mut listed: Vec<DynamicObject> = Vec::new();
        loop {
            match stream.try_next().await {
                Ok(Some(event)) => match event {
                    Event::Init => listed.clear(),
                    Event::InitApply(obj) => listed.push(obj),
                    Event::InitDone => self.replace_all(std::mem::take(&mut listed)).await,
                    Event::Apply(obj) => self.put(obj).await,
                    Event::Delete(obj) => self.remove(&obj),
                },
                Ok(None) => return,
                // The watcher lists again after its backoff.
                Err(e) => {
                    tracing::warn!(kind = %self.kind.resource.kind, error = %e, "Kubernetes watch")
                }
            }
        }
    }

    /// The policy key an object has in the state.
    fn key(&self, obj: &DynamicObject) -> String {
        let name = obj.metadata.name.as_deref().unwrap_or_default();
        let ns = obj
            .metadata
            .namespace
            .as_deref()
            .filter(|_| self.kind.namespaced());
        policy::Policy::key_of(self.kind.kind, ns, name)
    }

    /// After a (re)list: the list is this node's policies of the kind.
    async fn replace_all(&mut self, objects: Vec<DynamicObject>) {
        let mut put = Vec::new();
        let mut outcomes = Vec::new();
        let mut keep = BTreeSet::new();
        for obj in objects {
            let key = self.key(&obj);
            keep.insert(key.clone());
            match k8s::policy::parse(&self.kind, &obj) {
                Ok((p, warnings)) => {
                    self.applied.insert(key, k8s::policy::generation(&obj));
                    put.push(p);
                    outcomes.push((obj, Ok(warnings)));
                }
                Err(e) => outcomes.push((obj, Err(e))),
            }
        }
        let remove: Vec<String> = {
            let s = self.control.lock();
            s.policies()
                .values()
                .filter(|p| p.kind == self.kind.kind && !keep.contains(&p.key()))
                .map(policy::Policy::key)
                .collect()
        };
        self.applied.retain(|k, _| keep.contains(k));
        let result = self.commit(put, remove);
        for (obj, parsed) in outcomes {
            let outcome = outcome(parsed, &result);
            self.report(&obj, &outcome).await;
        }
    }

    async fn put(&mut self, obj: DynamicObject) {
        let key = self.key(&obj);
        let generation = k8s::policy::generation(&obj);
        if self.applied.get(&key) == Some(&generation) {
            return;
        }
        let parsed = k8s::policy::parse(&self.kind, &obj);
        let result = match &parsed {
            Ok((p, _)) => {
                self.applied.insert(key, generation);
                self.commit(vec![p.clone()], vec![])
            }
            // The last valid version stays in force.
            Err(e) => {
                tracing::warn!(policy = %k8s::policy::describe(&self.kind, &obj), error = %e, "policy refused");
                Ok(self.control.lock().policy_generation())
            }
        };
        let outcome = outcome(parsed.map(|(_, w)| w), &result);
        self.report(&obj, &outcome).await;
    }

    fn remove(&mut self, obj: &DynamicObject) {
        let key = self.key(obj);
        self.applied.remove(&key);
        let known = self
            .control
            .lock()
            .policies()
            .get(&key)
            .is_some_and(|p| p.kind == self.kind.kind);
        if known {
            if let Err(e) = self.commit(vec![], vec![key]) {
                tracing::warn!(policy = %k8s::policy::describe(&self.kind, obj), error = %e, "policy removal");
            }
        }
    }

    /// Puts and removes in one commit; the policy revision after it. The
    /// commit takes the state lock and writes maps (milliseconds): it runs
    /// where blocking is allowed.
    fn commit(&self, put: Vec<policy::Policy>, remove: Vec<String>) -> Result<u64, Error> {
        if put.is_empty() && remove.is_empty() {
            return Ok(self.control.lock().policy_generation());
        }
        tokio::task::block_in_place(|| {
            let names = put.iter().map(policy::Policy::key).collect::<Vec<_>>();
            crate::policies::apply(&self.control, &self.observer, put, remove.clone())?;
            tracing::info!(kind = %self.kind.resource.kind, put = ?names, removed = ?remove, "policies from the Kubernetes API");
            Ok(self.control.lock().policy_generation())
        })
    }

    /// Writes this node's outcome into the object's status, unless it says
    /// so already (the write comes back through the watch).
    async fn report(&self, obj: &DynamicObject, outcome: &Outcome) {
        if !self.kind.has_status() || k8s::policy::status_says(obj, &self.node, outcome) {
            return;
        }
        if let Err(e) =
            k8s::policy::write_status(&self.client, &self.kind, obj, &self.node, outcome).await
        {
            tracing::warn!(policy = %k8s::policy::describe(&self.kind, obj), error = %e, "policy status not written");
        }
    }
}

fn outcome(
    parsed: Result<Vec<policy::Warning>, policy::Error>,
    commit: &Result<u64, Error>,
) -> Outcome {
    match (parsed, commit) {
        (Err(e), _) => Outcome::Invalid(format!("{}: {}", e.path, e.message)),
        (Ok(_), Err(e)) => Outcome::Failed(e.to_string()),
        (Ok(warnings), Ok(revision)) => Outcome::Enforcing {
            revision: *revision,
            warnings: warnings
                .iter()
                .map(|w| format!("{}: {}", w.path, w.message))
                .collect(),
        },
    }
}

/// This node's pods and every namespace's labels, as last sent to the
/// agent.
struct PodFollower {
    client: Client,
    node: String,
    agent: Weak<Agent>,
    namespaces: BTreeMap<String, BTreeMap<String, String>>,
    /// Per `namespace/name`: the pod as the agent was last told.
    pods: BTreeMap<String, Pod>,
}

impl PodFollower {
    async fn run(mut self) {
        let namespaces = watcher::watcher(
            k8s::kube::Api::<Namespace>::all(self.client.clone()),
            watcher::Config::default(),
        )
        .default_backoff();
        let pods = watcher::watcher(
            k8s::kube::Api::<Pod>::all(self.client.clone()),
            watcher::Config::default().fields(&format!("spec.nodeName={}", self.node)),
        )
        .default_backoff();
        futures::pin_mut!(namespaces, pods);
        let (mut listed_ns, mut listed_pods) = (Vec::new(), Vec::new());
        // Namespaces' labels first: a pod told with none would get an
        // identity of its namespace alone for a moment.
        let mut namespaces_known = false;
        loop {
            tokio::select! {
                ev = namespaces.try_next() => match ev {
                    Ok(Some(Event::Init)) => listed_ns.clear(),
                    Ok(Some(Event::InitApply(ns))) => listed_ns.push(ns),
                    Ok(Some(Event::InitDone)) => {
                        namespaces_known = true;
                        self.namespaces = std::mem::take(&mut listed_ns).iter().map(ns_labels).collect();
                        self.resend_all();
                    }
                    Ok(Some(Event::Apply(ns))) => {
                        let (name, labels) = ns_labels(&ns);
                        if self.namespaces.get(&name) != Some(&labels) {
                            self.namespaces.insert(name.clone(), labels);
                            self.resend(|p| p.metadata.namespace.as_deref() == Some(&name));
                        }
                    }
                    Ok(Some(Event::Delete(ns))) => { self.namespaces.remove(&ns_labels(&ns).0); }
                    Ok(None) => return,
                    Err(e) => tracing::warn!(error = %e, "Kubernetes watch of namespaces"),
                },
                ev = pods.try_next(), if namespaces_known => match ev {
                    Ok(Some(Event::Init)) => listed_pods.clear(),
                    Ok(Some(Event::InitApply(pod))) => listed_pods.push(pod),
                    Ok(Some(Event::InitDone)) => {
                        let listed = std::mem::take(&mut listed_pods);
                        let keep: BTreeSet<String> = listed.iter().map(pod_key).collect();
                        let gone: Vec<String> = self.pods.keys().filter(|k| !keep.contains(*k)).cloned().collect();
                        for key in gone {
                            self.forget(&key);
                        }
                        for pod in listed {
                            self.upsert(pod);
                        }
                    }
                    Ok(Some(Event::Apply(pod))) => self.upsert(pod),
                    Ok(Some(Event::Delete(pod))) => self.forget(&pod_key(&pod)),
                    Ok(None) => return,
                    Err(e) => tracing::warn!(error = %e, "Kubernetes watch of this node's pods"),
                },
            }
        }
    }

    fn send(&self, req: api::Request) {
        let Some(agent) = self.agent.upgrade() else {
            return;
        };
        // The agent takes the state lock and may ask the kvstore.
        let response = tokio::task::block_in_place(|| agent.handle(req));
        if let api::Response::Error { message, .. } = response {
            tracing::warn!(error = %message, "pod from the Kubernetes API refused");
        }
    }

    fn to_api(&self, pod: &Pod) -> api::Pod {
        let empty = BTreeMap::new();
        let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
        k8s::pod::to_api(pod, self.namespaces.get(ns).unwrap_or(&empty))
    }

    fn upsert(&mut self, pod: Pod) {
        if k8s::pod::host_network(&pod) {
            return;
        }
        let key = pod_key(&pod);
        let unchanged = self
            .pods
            .get(&key)
            .is_some_and(|old| self.to_api(old) == self.to_api(&pod));
        if !unchanged {
            self.send(api::Request::PodUpsert(self.to_api(&pod)));
        }
        self.pods.insert(key, pod);
    }

    /// The pods `which` selects, told again (their namespace's labels
    /// changed).
    fn resend(&self, which: impl Fn(&Pod) -> bool) {
        for pod in self.pods.values().filter(|p| which(p)) {
            self.send(api::Request::PodUpsert(self.to_api(pod)));
        }
    }

    fn resend_all(&self) {
        self.resend(|_| true);
    }

    fn forget(&mut self, key: &str) {
        if self.pods.remove(key).is_some() {
            let (namespace, name) = key.split_once('/').unwrap_or(("default", key));
            self.send(api::Request::PodDelete {
                namespace: namespace.into(),
                name: name.into(),
            });
        }
    }
}

fn pod_key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}

fn ns_labels(ns: &Namespace) -> (String, BTreeMap<String, String>) {
    (
        ns.metadata.name.clone().unwrap_or_default(),
        ns.metadata.labels.clone().unwrap_or_default(),
    )
}
