//! The lab's kubelet (`kubernetes: true`): one per node, run by `lab up`
//! inside the node's namespace as `fibril lab kubelet --node NAME`. It
//! keeps the node Ready (its status and its Lease in `kube-node-lease`),
//! watches the Pods bound to it and runs each as the lab runs its own
//! pods: a network namespace, the CNI plugin called with a runtime's
//! arguments (`K8S_POD_NAMESPACE`, `K8S_POD_NAME`, `K8S_POD_INFRA_CONTAINER_ID`), the
//! first container's command mapped to the lab's programs (`images`), and
//! reports what happened in the pod's status (podIP, phase, conditions,
//! container state). A pod being deleted is stopped, CNI DEL'd and then
//! deleted for good, as a kubelet does. It authenticates as
//! `system:node:NAME` (the Node authorizer's rules).
//!
//! What it runs is written to `nodes/NAME/kubelet-pods.json`, so `lab
//! exec` finds those pods and `lab down` removes them.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use futures::TryStreamExt;
use k8s::kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams, Preconditions};
use k8s::kube::runtime::watcher::{self, Event};
use k8s::kube::runtime::WatchStreamExt;
use k8s::kube::Client;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Container, Node, Pod, Service};
use serde_json::json;

use crate::kubelet_pod::{self, NodeFs, PodFields, Process};
use crate::kubelet_server;
use crate::lab::{self, PodState};

/// How often the node's Lease is renewed (a kubelet's default: 10 s of a
/// 40 s duration).
const LEASE_RENEW: Duration = Duration::from_secs(10);
const LEASE_SECONDS: i32 = 40;
/// How often dead containers are looked for.
const PROBE: Duration = Duration::from_secs(1);

/// The file of the pods the kubelet of `node` runs.
pub fn pods_file(lab: &str, node: &str) -> PathBuf {
    lab::node_dir(lab, node).join("kubelet-pods.json")
}

/// A pod's network namespace: a short, unique name of the lab's, the
/// node's and the uid's first characters.
fn pod_netns(lab: &str, node: &str, uid: &str) -> String {
    format!("fibril-{lab}-{node}-{}", &uid[..uid.len().min(8)])
}

/// Whether `name` is a namespace the kubelet of `node` makes for its pods
/// (the lab sweeps them: a kubelet stopped while starting a pod has not
/// written it down yet).
pub fn is_pod_netns(lab: &str, node: &str, name: &str) -> bool {
    name.strip_prefix(&format!("fibril-{lab}-{node}-"))
        .is_some_and(|uid| uid.len() == 8 && uid.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// The pods every kubelet of the lab runs now.
pub fn pods(lab: &str, nodes: &[lab::NodeState]) -> Vec<PodState> {
    nodes
        .iter()
        .filter_map(|n| std::fs::read_to_string(pods_file(lab, &n.name)).ok())
        .filter_map(|text| serde_json::from_str::<Vec<PodState>>(&text).ok())
        .flatten()
        .collect()
}

/// The node's kubeconfig (`system:node:NAME`).
pub fn kubeconfig(lab: &str, node: &str) -> PathBuf {
    crate::k8s::dir(&lab::lab_dir(lab)).join(format!("kubelet-{node}.kubeconfig"))
}

/// A container's command line in the lab: the lab's programs stand in for
/// images. `fibril/echo` (or any image named `*echo*`) is `fibril-echo`
/// with the container's command and args (none: an HTTP server on its
/// first declared port, else 8080); a command that is one of Fibril's
/// programs (`fibril-agent`, `fibril-cni`, `fibril-relay`, `fibril-ui`:
/// the chart's containers) or a program of this machine (`sleep`, `sh`)
/// runs as it is.
pub fn command_of(c: &Container) -> Result<Vec<String>, String> {
    let image = c.image.clone().unwrap_or_default();
    let repo = image.split(['@', ':']).next().unwrap_or_default();
    let base = repo.rsplit('/').next().unwrap_or_default();
    let given: Vec<String> = c
        .command
        .iter()
        .flatten()
        .chain(c.args.iter().flatten())
        .cloned()
        .collect();
    if base.contains("echo") {
        let mut argv = vec!["fibril-echo".to_string()];
        // `command: [fibril-echo, ...]` names the program itself.
        let rest: Vec<String> = given
            .iter()
            .skip_while(|a| a.as_str() == "fibril-echo")
            .cloned()
            .collect();
        if rest.is_empty() {
            let port = c
                .ports
                .iter()
                .flatten()
                .next()
                .map_or(8080, |p| p.container_port);
            argv.extend(["http-server".into(), "--port".into(), port.to_string()]);
        } else {
            argv.extend(rest);
        }
        return Ok(argv);
    }
    if let Some(first) = given.first() {
        // Fibril's own programs (the chart's images run them), or a
        // program of this machine.
        let ours = first.starts_with("fibril") && crate::lab::bin_dir().join(first).exists();
        if ours || which(first) {
            return Ok(given);
        }
    }
    Err(format!(
        "image {image:?} is not one this lab runs (fibril/echo, or a command this machine has)"
    ))
}

fn which(program: &str) -> bool {
    if program.contains('/') {
        return Path::new(program).exists();
    }
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(program).exists()))
}

/// One pod the kubelet runs.
struct Running {
    state: PodState,
    uid: String,
    /// Its containers' processes, in the spec's order; empty for a pod
    /// adopted from a previous run of the kubelet.
    containers: Vec<ContainerRun>,
    /// The status last reported, so it is written once.
    reported: Option<serde_json::Value>,
}

/// One container's process (run again when it exits).
struct ContainerRun {
    process: Process,
    image: String,
    child: Child,
    restarts: i32,
}

struct Kubelet {
    lab: String,
    node: lab::NodeState,
    client: Client,
    pods: BTreeMap<String, Running>,
    /// Pods that could not start yet, with why (tried again each second).
    waiting: BTreeMap<String, (Pod, String)>,
}

/// Runs the kubelet of `node` until killed.
pub fn run(lab_name: &str, node: &str) -> anyhow::Result<()> {
    let st = lab::load_state(lab_name)?;
    let node = st
        .nodes
        .iter()
        .find(|n| n.name == node)
        .with_context(|| format!("no node {node:?} in lab {lab_name:?}"))?
        .clone();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let client = k8s::client::connect(Some(&kubeconfig(lab_name, &node.name))).await?;
        let mut kubelet = Kubelet {
            lab: lab_name.to_string(),
            node,
            client,
            pods: BTreeMap::new(),
            waiting: BTreeMap::new(),
        };
        kubelet.adopt();
        kubelet.run().await
    })
}

impl Kubelet {
    /// Pods a previous run of this kubelet left running (it restarted).
    fn adopt(&mut self) {
        let Ok(text) = std::fs::read_to_string(pods_file(&self.lab, &self.node.name)) else {
            return;
        };
        for state in serde_json::from_str::<Vec<PodState>>(&text).unwrap_or_default() {
            let uid = state.container_id.clone();
            self.pods.insert(
                format!("{}/{}", state.namespace, state.name),
                Running {
                    state,
                    uid,
                    containers: Vec::new(),
                    reported: None,
                },
            );
        }
    }

    async fn run(&mut self) -> anyhow::Result<()> {
        // The kubelet API (`kubectl logs`), on the node's address.
        let pki = crate::k8s::dir(&lab::lab_dir(&self.lab));
        let read = |f: String| std::fs::read_to_string(pki.join(&f)).with_context(|| f);
        let tls = kubelet_server::Tls {
            cert_pem: read(format!("kubelet-{}-serving.crt", self.node.name))?,
            key_pem: read(format!("kubelet-{}-serving.key", self.node.name))?,
            client_ca_pem: read("ca.crt".into())?,
        };
        let logs = lab::node_dir(&self.lab, &self.node.name).join("pods");
        let address = std::net::SocketAddr::from((self.node.address, kubelet_server::PORT));
        tokio::spawn(async move {
            if let Err(e) = kubelet_server::serve(address, tls, logs).await {
                eprintln!("kubelet API: {e:#}");
            }
        });
        self.node_ready().await?;
        let pods = watcher::watcher(
            Api::<Pod>::all(self.client.clone()),
            watcher::Config::default().fields(&format!("spec.nodeName={}", self.node.name)),
        )
        .default_backoff();
        futures::pin_mut!(pods);
        let mut lease = tokio::time::interval(LEASE_RENEW);
        let mut probe = tokio::time::interval(PROBE);
        let mut listed = Vec::new();
        loop {
            tokio::select! {
                ev = pods.try_next() => match ev {
                    Ok(Some(Event::Init)) => listed.clear(),
                    Ok(Some(Event::InitApply(p))) => listed.push(p),
                    Ok(Some(Event::InitDone)) => {
                        let listed = std::mem::take(&mut listed);
                        let keep: Vec<String> = listed.iter().map(key).collect();
                        let gone: Vec<String> = self.pods.keys().filter(|k| !keep.contains(k)).cloned().collect();
                        for k in gone {
                            self.stop(&k);
                        }
                        for p in listed {
                            self.sync(p).await;
                        }
                    }
                    Ok(Some(Event::Apply(p))) => self.sync(p).await,
                    Ok(Some(Event::Delete(p))) => {
                        self.waiting.remove(&key(&p));
                        self.stop(&key(&p));
                    }
                    Ok(None) => return Ok(()),
                    Err(e) => eprintln!("kubelet {}: watch: {e}", self.node.name),
                },
                _ = lease.tick() => if let Err(e) = self.renew_lease().await {
                    eprintln!("kubelet {}: lease: {e:#}", self.node.name);
                },
                _ = probe.tick() => {
                    self.restart_dead().await;
                    let waiting: Vec<Pod> = self.waiting.values().map(|(p, _)| p.clone()).collect();
                    for p in waiting {
                        self.sync(p).await;
                    }
                }
            }
        }
    }

    /// The node's status: Ready, with room for pods (the scheduler places
    /// none on a node without allocatable pods).
    async fn node_ready(&self) -> anyhow::Result<()> {
        let now = k8s_openapi::jiff::Timestamp::now().to_string();
        let status = json!({"status": {
            "capacity": {"cpu": "2", "memory": "8Gi", "pods": "110"},
            "allocatable": {"cpu": "2", "memory": "8Gi", "pods": "110"},
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "KubeletReady",
                "message": "the lab's kubelet is posting ready status",
                "lastHeartbeatTime": now, "lastTransitionTime": now,
            }],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": kubelet_server::PORT}},
            "nodeInfo": {
                "kubeletVersion": "v1.37.2", "kubeProxyVersion": "", "operatingSystem": "linux",
                "architecture": std::env::consts::ARCH, "containerRuntimeVersion": "fibril-lab://1",
                "kernelVersion": "", "osImage": "fibril lab", "machineID": "", "systemUUID": "", "bootID": "",
            },
        }});
        Api::<Node>::all(self.client.clone())
            .patch_status(
                &self.node.name,
                &PatchParams::default(),
                &Patch::Merge(&status),
            )
            .await?;
        self.renew_lease().await
    }

    async fn renew_lease(&self) -> anyhow::Result<()> {
        let api: Api<Lease> = Api::namespaced(self.client.clone(), "kube-node-lease");
        // A MicroTime: exactly six fractional digits.
        let now = serde_json::to_value(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
            k8s_openapi::jiff::Timestamp::now(),
        ))?;
        let spec = json!({"spec": {
            "holderIdentity": self.node.name,
            "leaseDurationSeconds": LEASE_SECONDS,
            "renewTime": now,
        }});
        if api.get_opt(&self.node.name).await?.is_some() {
            api.patch(
                &self.node.name,
                &PatchParams::default(),
                &Patch::Merge(&spec),
            )
            .await?;
        } else {
            let lease: Lease = serde_json::from_value(json!({
                "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": self.node.name, "namespace": "kube-node-lease"},
                "spec": spec["spec"],
            }))?;
            api.create(&PostParams::default(), &lease).await?;
        }
        Ok(())
    }

    /// Brings the node to what the pod object says.
    async fn sync(&mut self, pod: Pod) {
        let k = key(&pod);
        if pod.metadata.deletion_timestamp.is_some() {
            self.stop(&k);
            self.finish_deletion(&pod).await;
            return;
        }
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        if self.pods.get(&k).is_some_and(|r| r.uid != uid) {
            // The same name, a new pod: the old one goes first.
            self.stop(&k);
        }
        if !self.pods.contains_key(&k) {
            match self.start(&pod).await {
                Ok(running) => {
                    self.waiting.remove(&k);
                    self.pods.insert(k.clone(), running);
                    self.save();
                }
                Err(e) => {
                    let message = format!("{e:#}");
                    if self.waiting.get(&k).map(|(_, m)| m) != Some(&message) {
                        eprintln!("kubelet {}: pod {k}: {message}", self.node.name);
                        self.report_failure(&pod, &message).await;
                    }
                    // Tried again every second (the network may not be
                    // ready yet: no CNI configuration before the agent).
                    self.waiting.insert(k, (pod, message));
                    return;
                }
            }
        }
        self.report(&k, &pod).await;
    }

    /// The node's filesystem as its pods' hostPaths see it.
    fn node_fs(&self) -> NodeFs {
        lab::node_fs(&self.lab, &self.node.name)
    }

    /// The pod's directory (its volumes, its service-account kubeconfig).
    fn pod_dir(&self, uid: &str) -> PathBuf {
        lab::node_dir(&self.lab, &self.node.name)
            .join("pods")
            .join(uid)
    }

    /// Each of the pod's volumes as a directory (or file) of this node.
    async fn volumes(&self, pod: &Pod, dir: &Path) -> anyhow::Result<BTreeMap<String, PathBuf>> {
        use k8s_openapi::api::core::v1::{ConfigMap, Secret};
        let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
        let fs = self.node_fs();
        let config_maps: Api<ConfigMap> = Api::namespaced(self.client.clone(), ns);
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), ns);
        let mut out = BTreeMap::new();
        for v in pod.spec.iter().flat_map(|s| s.volumes.iter().flatten()) {
            let path = if let Some(h) = &v.host_path {
                let p = fs.host_path(&h.path);
                if matches!(
                    h.type_.as_deref(),
                    None | Some("") | Some("DirectoryOrCreate")
                ) {
                    std::fs::create_dir_all(&p)?;
                }
                p
            } else {
                let p = dir.join("volumes").join(&v.name);
                let mut files = BTreeMap::new();
                let add = |files: &mut BTreeMap<String, Vec<u8>>,
                           data: BTreeMap<String, Vec<u8>>,
                           items: Option<&Vec<k8s_openapi::api::core::v1::KeyToPath>>|
                 -> anyhow::Result<()> {
                    match items {
                        Some(items) => {
                            for it in items {
                                let bytes = data.get(&it.key).with_context(|| {
                                    format!("volume {}: no key {}", v.name, it.key)
                                })?;
                                files.insert(it.path.clone(), bytes.clone());
                            }
                        }
                        None => files.extend(data),
                    }
                    Ok(())
                };
                let cm_data = |cm: ConfigMap| -> BTreeMap<String, Vec<u8>> {
                    cm.data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.into_bytes()))
                        .collect()
                };
                let secret_data = |s: Secret| -> BTreeMap<String, Vec<u8>> {
                    s.data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.0))
                        .collect()
                };
                if let Some(c) = &v.config_map {
                    add(
                        &mut files,
                        cm_data(config_maps.get(&c.name).await?),
                        c.items.as_ref(),
                    )?;
                } else if let Some(sv) = &v.secret {
                    let name = sv.secret_name.clone().unwrap_or_default();
                    add(
                        &mut files,
                        secret_data(secrets.get(&name).await?),
                        sv.items.as_ref(),
                    )?;
                } else if let Some(pr) = &v.projected {
                    for src in pr.sources.iter().flatten() {
                        if let Some(sp) = &src.secret {
                            add(
                                &mut files,
                                secret_data(secrets.get(&sp.name).await?),
                                sp.items.as_ref(),
                            )?;
                        } else if let Some(cp) = &src.config_map {
                            add(
                                &mut files,
                                cm_data(config_maps.get(&cp.name).await?),
                                cp.items.as_ref(),
                            )?;
                        } else if let Some(t) = &src.service_account_token {
                            // The volume Kubernetes adds to every pod
                            // (`kube-api-access-*`): the token itself.
                            let token = self.token(pod).await?;
                            files.insert(t.path.clone(), token.into_bytes());
                        } else if let Some(d) = &src.downward_api {
                            for it in d.items.iter().flatten() {
                                let value =
                                    match it.field_ref.as_ref().map(|f| f.field_path.as_str()) {
                                        Some("metadata.namespace") => ns.to_string(),
                                        Some("metadata.name") => {
                                            pod.metadata.name.clone().unwrap_or_default()
                                        }
                                        other => anyhow::bail!(
                                            "volume {}: downwardAPI {other:?} is not supported",
                                            v.name
                                        ),
                                    };
                                files.insert(it.path.clone(), value.into_bytes());
                            }
                        }
                    }
                } else if v.empty_dir.is_none() {
                    anyhow::bail!("volume {}: only hostPath, emptyDir, configMap, secret and projected volumes are supported by the lab's kubelet", v.name);
                }
                kubelet_pod::write_files(&p, &files)?;
                p
            };
            out.insert(v.name.clone(), path);
        }
        Ok(out)
    }

    /// A kubeconfig with the pod's service-account token (asked of the API
    /// as a kubelet asks for the token it projects), handed as KUBECONFIG:
    /// the lab's pods share this machine's filesystem, so there is no
    /// fixed in-cluster path per pod.
    /// A token of the pod's service account, bound to the pod (what a
    /// kubelet asks for the token it projects).
    async fn token(&self, pod: &Pod) -> anyhow::Result<String> {
        use k8s_openapi::api::core::v1::ServiceAccount;
        let sa = pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .unwrap_or_else(|| "default".into());
        let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
        let request: k8s_openapi::api::authentication::v1::TokenRequest = serde_json::from_value(
            json!({
                "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
                "spec": {"expirationSeconds": 86400, "boundObjectRef": {"apiVersion": "v1", "kind": "Pod",
                    "name": pod.metadata.name, "uid": pod.metadata.uid}},
            }),
        )?;
        Api::<ServiceAccount>::namespaced(self.client.clone(), ns)
            .create_token_request(&sa, &PostParams::default(), &request)
            .await?
            .status
            .and_then(|s| s.token)
            .context("the TokenRequest has no token")
    }

    async fn service_account_kubeconfig(
        &self,
        pod: &Pod,
        dir: &Path,
    ) -> anyhow::Result<Option<PathBuf>> {
        let spec = pod.spec.as_ref().context("no spec")?;
        if spec.automount_service_account_token == Some(false) {
            return Ok(None);
        }
        let ns = pod.metadata.namespace.as_deref().unwrap_or("default");
        let token = self.token(pod).await?;
        let mine =
            k8s::kube::config::Kubeconfig::read_from(kubeconfig(&self.lab, &self.node.name))?;
        let cluster = mine
            .clusters
            .first()
            .and_then(|c| c.cluster.clone())
            .context("no cluster in the node's kubeconfig")?;
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: {}\n    certificate-authority: {}\nusers:\n- name: sa\n  user:\n    token: {token}\ncontexts:\n- name: lab\n  context: {{cluster: lab, user: sa, namespace: {ns}}}\ncurrent-context: lab\n",
            cluster.server.unwrap_or_default(),
            cluster.certificate_authority.unwrap_or_default(),
        );
        let path = dir.join("serviceaccount.kubeconfig");
        kubelet_pod::write_files(
            dir,
            &BTreeMap::from([("serviceaccount.kubeconfig".to_string(), text.into_bytes())]),
        )?;
        Ok(Some(path))
    }

    async fn start(&self, pod: &Pod) -> anyhow::Result<Running> {
        let namespace = pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into());
        let name = pod.metadata.name.clone().unwrap_or_default();
        let uid = pod.metadata.uid.clone().unwrap_or_default();
        let spec = pod.spec.as_ref().context("the pod has no spec")?;
        anyhow::ensure!(!spec.containers.is_empty(), "the pod has no container");
        // Refused before anything is made.
        for c in &spec.containers {
            command_of(c).map_err(|e| anyhow::anyhow!("container {}: {e}", c.name))?;
        }
        let host_network = k8s::pod::host_network(pod);
        let dir = self.pod_dir(&uid);
        std::fs::create_dir_all(&dir)?;
        let volumes = self.volumes(pod, &dir).await?;
        let kubeconfig = self.service_account_kubeconfig(pod, &dir).await?;
        let netns = if host_network {
            self.node.netns.clone()
        } else {
            pod_netns(&self.lab, &self.node.name, &uid)
        };
        // Before the pod's namespace is made: a failure leaves none.
        let service_env = if spec.enable_service_links == Some(false) {
            Vec::new()
        } else {
            let services = Api::<Service>::namespaced(self.client.clone(), &namespace)
                .list(&Default::default())
                .await
                .context("listing the namespace's services for the pod's environment")?;
            kubelet_pod::service_env(&services.items)
        };
        let mut state = PodState {
            namespace: namespace.clone(),
            name: name.clone(),
            netns: netns.clone(),
            container_id: uid.clone(),
            cni_result: None,
            pid: None,
            node: Some(self.node.name.clone()),
            host_network,
            ..Default::default()
        };
        if !host_network {
            netns::create_netns(&netns)?;
            let st = lab::load_state(&self.lab)?;
            // The node's installed CNI configuration when there is one (a
            // Helm-installed agent wrote it), else the lab's agent.
            let added = crate::cni_chain::of_kubelet_pod(&st, &state)
                .and_then(|chain| crate::cni_chain::add(&st, &state, &chain));
            match added {
                Ok(result) => state.cni_result = result,
                Err(e) => {
                    netns::delete_netns(&netns);
                    return Err(e);
                }
            }
        }
        let fields = PodFields {
            node_name: self.node.name.clone(),
            host_ip: self.node.address.to_string(),
            pod_ip: if host_network {
                self.node.address.to_string()
            } else {
                pod_ip(&state).unwrap_or_default()
            },
        };
        let process_of = |c: &Container| -> anyhow::Result<Process> {
            let mounts = kubelet_pod::mounts(c, &volumes).map_err(|e| anyhow::anyhow!(e))?;
            let mut p = kubelet_pod::process(pod, c, &mounts, &fields, &service_env)
                .map_err(|e| anyhow::anyhow!(e))?;
            if let Some(k) = &kubeconfig {
                p.env.push(("KUBECONFIG".into(), k.display().to_string()));
                // Where a kubelet says the API is (here its real address:
                // the lab has no service proxy).
                if let Some((host, port)) = api_host_port(&self.lab, &self.node.name) {
                    p.env.push(("KUBERNETES_SERVICE_HOST".into(), host));
                    p.env.push(("KUBERNETES_SERVICE_PORT".into(), port));
                }
            }
            Ok(p)
        };
        // From here on a failure undoes the pod's network: the containers
        // started, the CNI attachment (DEL through the list), the namespace.
        let mut containers: Vec<ContainerRun> = Vec::new();
        let started = (|| -> anyhow::Result<()> {
            // Init containers first, each to completion, as a kubelet runs
            // them.
            for c in spec.init_containers.iter().flatten() {
                let p = process_of(c)?;
                let status = self.spawn(&state, &p)?.wait()?;
                anyhow::ensure!(
                    status.success(),
                    "init container {} exited with {status}",
                    c.name
                );
            }
            // A ConfigMap's values that are paths in the container (a flag
            // file naming a mounted certificate) are this machine's paths
            // too (as the first container mounts them).
            let mounts = kubelet_pod::mounts(&spec.containers[0], &volumes)
                .map_err(|e| anyhow::anyhow!(e))?;
            for v in spec
                .volumes
                .iter()
                .flatten()
                .filter(|v| v.config_map.is_some())
            {
                if let Some(dir) = volumes.get(&v.name) {
                    kubelet_pod::map_file_values(dir, &mounts)?;
                }
            }
            // Every container, in the spec's order, as one pod: the same
            // network namespace (a sidecar beside its application).
            for c in &spec.containers {
                let p = process_of(c)?;
                let child = self.spawn(&state, &p)?;
                containers.push(ContainerRun {
                    process: p,
                    image: c.image.clone().unwrap_or_default(),
                    child,
                    restarts: 0,
                });
            }
            Ok(())
        })();
        if let Err(e) = started {
            self.tear_down(&state, &mut containers);
            return Err(e);
        }
        state.pid = containers.first().map(|c| c.child.id());
        state.other_pids = containers.iter().skip(1).map(|c| c.child.id()).collect();
        Ok(Running {
            state,
            uid,
            containers,
            reported: None,
        })
    }

    fn spawn(&self, state: &PodState, p: &Process) -> anyhow::Result<Child> {
        let dir = lab::node_dir(&self.lab, &self.node.name).join("pods");
        std::fs::create_dir_all(&dir)?;
        let log = lab::private_file(&dir.join(format!(
            "{}_{}_{}.log",
            state.namespace, state.name, p.container
        )))?;
        let mut cmd = Command::new("setsid");
        lab::in_cgroup(&mut cmd, &self.lab, Some(&self.node.name));
        // A host-network pod shares its node's namespace: entered alone, so
        // it shares this machine's mounts as the node's agent does.
        if state.host_network {
            cmd.arg("nsenter")
                .arg(format!("--net=/run/netns/{}", state.netns));
        } else {
            cmd.args(["ip", "netns", "exec", &state.netns]);
        }
        // A container's user and group (`securityContext.runAsUser`), taken
        // once inside the pod's namespace: Istio's redirection, for one,
        // lets its proxy's user (1337) through by that.
        if let Some((user, group)) = p.run_as {
            cmd.arg("setpriv")
                .arg(format!("--reuid={user}"))
                .arg(format!("--regid={group}"))
                .arg("--clear-groups");
        }
        cmd.arg(lab::resolve(&p.argv[0]))
            .args(&p.argv[1..])
            .env_remove("KUBERNETES_SERVICE_HOST")
            .envs(p.env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        cmd.spawn()
            .with_context(|| format!("starting {:?} in {}", p.argv, state.netns))
    }

    /// Stops a pod: its process, its attachment (CNI DEL), its namespace.
    fn stop(&mut self, k: &str) {
        let Some(mut r) = self.pods.remove(k) else {
            return;
        };
        self.tear_down(&r.state, &mut r.containers);
        self.save();
    }

    /// Ends a pod's containers and undoes its network (CNI DEL through the
    /// node's list, then its namespace): a pod stopped, or one that failed
    /// part way through starting.
    fn tear_down(&self, state: &PodState, containers: &mut [ContainerRun]) {
        // A pod adopted from a previous kubelet has its pids only.
        let pids: std::collections::BTreeSet<u32> = state
            .pid
            .iter()
            .chain(&state.other_pids)
            .copied()
            .chain(containers.iter().map(|c| c.child.id()))
            .collect();
        for pid in pids {
            lab::kill(pid);
        }
        for c in containers {
            c.child.wait().ok();
        }
        if !state.host_network {
            if let Ok(st) = lab::load_state(&self.lab) {
                if let Err(e) = crate::cni_chain::del(&st, state) {
                    eprintln!(
                        "kubelet {}: pod {}/{}: {e:#}",
                        self.node.name, state.namespace, state.name
                    );
                }
            }
            netns::delete_netns(&state.netns);
        }
    }

    /// The last step of a graceful deletion: the object goes.
    async fn finish_deletion(&self, pod: &Pod) {
        let api: Api<Pod> = Api::namespaced(
            self.client.clone(),
            pod.metadata.namespace.as_deref().unwrap_or("default"),
        );
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: pod.metadata.uid.clone(),
                resource_version: None,
            }),
            ..Default::default()
        };
        if let Err(e) = api
            .delete(pod.metadata.name.as_deref().unwrap_or_default(), &params)
            .await
        {
            eprintln!("kubelet {}: deleting pod {}: {e}", self.node.name, key(pod));
        }
    }

    /// Containers that exited are started again (restartPolicy Always, the
    /// lab's pods' only one), counted in restartCount.
    async fn restart_dead(&mut self) {
        // (pod, the indices of its dead containers; none for an adopted pod
        // whose processes are gone).
        let mut dead: Vec<(String, Vec<usize>)> = Vec::new();
        for (k, r) in &mut self.pods {
            if r.containers.is_empty() {
                let pids = r.state.pid.iter().chain(&r.state.other_pids);
                if pids.clone().next().is_some() && pids.clone().any(|p| !lab::alive(*p)) {
                    dead.push((k.clone(), Vec::new()));
                }
                continue;
            }
            let exited: Vec<usize> = r
                .containers
                .iter_mut()
                .enumerate()
                .filter_map(|(i, c)| c.child.try_wait().ok().flatten().map(|_| i))
                .collect();
            if !exited.is_empty() {
                dead.push((k.clone(), exited));
            }
        }
        for (k, exited) in dead {
            let pod = Api::<Pod>::namespaced(
                self.client.clone(),
                k.split('/').next().unwrap_or("default"),
            )
            .get_opt(k.split('/').nth(1).unwrap_or_default())
            .await;
            let Ok(Some(pod)) = pod else { continue };
            if exited.is_empty() {
                // Adopted from a previous run: started afresh.
                self.stop(&k);
                self.sync(pod).await;
                continue;
            }
            for i in exited {
                let Some(r) = self.pods.get(&k) else { break };
                match self.spawn(&r.state, &r.containers[i].process) {
                    Ok(child) => {
                        let r = self.pods.get_mut(&k).expect("present");
                        r.containers[i].child = child;
                        r.containers[i].restarts += 1;
                        r.reported = None;
                        r.state.pid = r.containers.first().map(|c| c.child.id());
                        r.state.other_pids =
                            r.containers.iter().skip(1).map(|c| c.child.id()).collect();
                    }
                    Err(e) => eprintln!("kubelet {}: restarting {k}: {e:#}", self.node.name),
                }
            }
            self.save();
            self.report(&k, &pod).await;
        }
    }

    /// Writes the pod's status: Running, its address, Ready.
    async fn report(&mut self, k: &str, pod: &Pod) {
        let Some(r) = self.pods.get(k) else { return };
        let ip = if r.state.host_network {
            Some(self.node.address.to_string())
        } else {
            pod_ip(&r.state)
        };
        let started = pod
            .status
            .as_ref()
            .and_then(|s| s.start_time.clone())
            .map(|t| t.0.to_string())
            .unwrap_or_else(|| k8s_openapi::jiff::Timestamp::now().to_string());
        let conditions: Vec<serde_json::Value> = [
            "PodReadyToStartContainers",
            "Initialized",
            "ContainersReady",
            "Ready",
        ]
        .iter()
        .map(|t| json!({"type": t, "status": "True", "lastTransitionTime": started}))
        .collect();
        let mut status = json!({
            "phase": "Running",
            "hostIP": self.node.address.to_string(),
            "hostIPs": [{"ip": self.node.address.to_string()}],
            "startTime": started,
            "conditions": conditions,
            "containerStatuses": container_statuses(pod, r, &started),
        });
        if let Some(ip) = &ip {
            status["podIP"] = json!(ip);
            status["podIPs"] = json!([{"ip": ip}]);
        }
        if r.reported.as_ref() == Some(&status) {
            return;
        }
        let api: Api<Pod> = Api::namespaced(
            self.client.clone(),
            pod.metadata.namespace.as_deref().unwrap_or("default"),
        );
        let name = pod.metadata.name.clone().unwrap_or_default();
        match api
            .patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(&json!({"status": status})),
            )
            .await
        {
            Ok(_) => {
                if let Some(r) = self.pods.get_mut(k) {
                    r.reported = Some(status);
                }
            }
            Err(e) => eprintln!("kubelet {}: status of {k}: {e}", self.node.name),
        }
    }

    /// A pod that could not start: Pending, its container waiting with
    /// the reason.
    async fn report_failure(&self, pod: &Pod, message: &str) {
        let container = pod
            .spec
            .as_ref()
            .and_then(|s| s.containers.first())
            .map(|c| c.name.clone())
            .unwrap_or_default();
        let status = json!({"status": {
            "phase": "Pending",
            "hostIP": self.node.address.to_string(),
            "containerStatuses": [{
                "name": container, "image": "", "imageID": "", "ready": false, "restartCount": 0,
                "state": {"waiting": {"reason": "CreateContainerError", "message": message}},
            }],
        }});
        let api: Api<Pod> = Api::namespaced(
            self.client.clone(),
            pod.metadata.namespace.as_deref().unwrap_or("default"),
        );
        let name = pod.metadata.name.clone().unwrap_or_default();
        if let Err(e) = api
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await
        {
            eprintln!("kubelet {}: status of {}: {e}", self.node.name, key(pod));
        }
    }

    /// Writes what it runs (atomically: `lab exec` and `lab down` read it).
    fn save(&self) {
        let states: Vec<&PodState> = self.pods.values().map(|r| &r.state).collect();
        let path = pods_file(&self.lab, &self.node.name);
        let tmp = path.with_extension("json.tmp");
        let written = serde_json::to_vec(&states)
            .map_err(anyhow::Error::from)
            .and_then(|bytes| {
                use std::io::Write;
                lab::private_file(&tmp)?.write_all(&bytes)?;
                std::fs::rename(&tmp, &path)?;
                Ok(())
            });
        if let Err(e) = written {
            eprintln!(
                "kubelet {}: writing {}: {e:#}",
                self.node.name,
                path.display()
            );
        }
    }
}

/// Each container's status, in the spec's order: running, with its
/// restarts (an adopted pod's containers as the spec names them).
fn container_statuses(pod: &Pod, r: &Running, started: &str) -> Vec<serde_json::Value> {
    let spec = pod.spec.iter().flat_map(|s| &s.containers);
    spec.enumerate()
        .map(|(i, c)| {
            let run = r.containers.get(i);
            let pid = run.map(|run| run.child.id()).or(if i == 0 {
                r.state.pid
            } else {
                r.state.other_pids.get(i - 1).copied()
            });
            json!({
                "name": c.name,
                "image": run.map_or_else(|| c.image.clone().unwrap_or_default(), |run| run.image.clone()),
                "imageID": "",
                "containerID": format!("fibril-lab://{}", pid.unwrap_or_default()),
                "ready": true,
                "started": true,
                "restartCount": run.map_or(0, |run| run.restarts),
                "state": {"running": {"startedAt": started}},
            })
        })
        .collect()
}

/// The API server's host and port, from the node's kubeconfig.
fn api_host_port(lab: &str, node: &str) -> Option<(String, String)> {
    let k = k8s::kube::config::Kubeconfig::read_from(kubeconfig(lab, node)).ok()?;
    let server = k.clusters.first()?.cluster.as_ref()?.server.clone()?;
    let hostport = server.strip_prefix("https://")?.trim_end_matches('/');
    let (h, p) = hostport.rsplit_once(':')?;
    Some((h.to_string(), p.to_string()))
}

/// The address the CNI result gave the pod.
fn pod_ip(state: &PodState) -> Option<String> {
    crate::lab::pod_address(state).map(|a| a.to_string())
}

fn key(pod: &Pod) -> String {
    format!(
        "{}/{}",
        pod.metadata.namespace.as_deref().unwrap_or("default"),
        pod.metadata.name.as_deref().unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn container(v: serde_json::Value) -> Container {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn the_lab_sweeps_only_its_nodes_pod_namespaces() {
        let ns = pod_netns("t1", "n1", "9a4e7258-0000-4000");
        assert_eq!(ns, "fibril-t1-n1-9a4e7258");
        assert!(is_pod_netns("t1", "n1", &ns));
        // Another node's, another lab's (one whose name extends this
        // one's), the node's own namespace.
        assert!(!is_pod_netns("t1", "n2", &ns));
        assert!(!is_pod_netns("t1", "n1", "fibril-t1-n1-x-9a4e7258"));
        assert!(!is_pod_netns("t1", "n1", "fibril-t1-n1-"));
        // A lab named t1-n1's underlay.
        assert!(!is_pod_netns("t1", "n1", "fibril-t1-n1-ul"));
        assert!(!is_pod_netns("t1", "n", &ns));
    }

    #[test]
    fn images_map_to_the_labs_programs() {
        let c = container(
            json!({"name": "c", "image": "fibril/echo:1", "ports": [{"containerPort": 80}]}),
        );
        assert_eq!(
            command_of(&c).unwrap(),
            ["fibril-echo", "http-server", "--port", "80"]
        );
        let c = container(
            json!({"name": "c", "image": "ghcr.io/x/echo", "args": ["dns-server", "--port", "53"]}),
        );
        assert_eq!(
            command_of(&c).unwrap(),
            ["fibril-echo", "dns-server", "--port", "53"]
        );
        let c = container(json!({"name": "c", "image": "busybox", "command": ["sleep", "3600"]}));
        assert_eq!(command_of(&c).unwrap(), ["sleep", "3600"]);
        let c = container(json!({"name": "c", "image": "nginx"}));
        assert!(command_of(&c).unwrap_err().contains("nginx"));
    }
}
