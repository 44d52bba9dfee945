//! `fibril lab`: a one-host lab, set up exactly as a container runtime
//! would: a network namespace per pod, attached through the real CNI
//! binary, then the pod's program started inside it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use netns as net;
use serde::{Deserialize, Serialize};

pub const DEFAULT_LAB: &str = include_str!("../../../labs/default.yaml");
const DEFAULT_POLICY: &str = include_str!("../../../labs/policies/allow-frontend-to-backend.yaml");

/// A lab file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabFile {
    #[serde(rename = "podCIDR", default = "default_cidr")]
    pub pod_cidr: String,
    #[serde(default)]
    pub namespaces: Vec<Namespace>,
    /// The lab's own pods (a Kubernetes lab may have none: its pods come
    /// through the API).
    #[serde(default)]
    pub pods: Vec<PodSpec>,
    #[serde(default)]
    pub policies: Vec<PolicyRef>,
    /// Services (Kubernetes' Service fields): their addresses are
    /// load-balanced to the pods their selector picks
    /// (`crate::lab_services`).
    #[serde(default)]
    pub services: Vec<crate::lab_services::ServiceSpec>,
    /// Hosts outside the cluster (the `world` for policies): namespaces
    /// attached straight to the host, with no Fibril endpoint.
    #[serde(default)]
    pub externals: Vec<External>,
    /// The agent's DNS proxy knobs (Cilium's Helm `dnsProxy.*` names).
    #[serde(rename = "dnsProxy", default)]
    pub dns_proxy: DnsProxy,
    /// Kvstore mode: the lab runs a real etcd of its own (on loopback,
    /// its data in the lab's directory) and the agent keeps the cluster's
    /// state there, as Cilium's `--kvstore etcd`. Multi-node labs always
    /// do, except with `kubernetes: true`, where the agents keep it in the
    /// API's CRDs (CRD mode) unless this is also set.
    #[serde(default)]
    pub kvstore: bool,
    /// Several nodes (names): each a network namespace of its own with its
    /// own agent, pod CIDR (a /24 of `podCIDR`, or smaller when `podCIDR`
    /// holds fewer), joined by a VXLAN overlay over the lab's underlay, the
    /// cluster's state in the lab's etcd. None: one node, its agent in this
    /// host's namespace.
    #[serde(default)]
    pub nodes: Vec<String>,
    /// The network between nodes (multi-node labs): the lab's router and
    /// etcd at .1, node i at .(11+i).
    #[serde(rename = "underlayCIDR", default = "default_underlay")]
    pub underlay_cidr: String,
    /// Seconds a node's keys outlive it in the kvstore (its lease; the
    /// agent's default, 15 min, when absent): how long the other nodes keep
    /// a dead node's pods.
    #[serde(rename = "kvstoreLeaseTTL", default)]
    pub kvstore_lease_ttl: Option<u64>,
    /// A real Kubernetes control plane in the lab (multi-node labs): the
    /// apiserver, controller-manager and scheduler on the lab's etcd
    /// (`crate::k8s`); `fibril lab kubectl` talks to it.
    #[serde(default)]
    pub kubernetes: bool,
    /// Who runs the nodes' agents: `lab` (the lab itself, with its relay
    /// and UI) or `helm` (none until a Helm install's DaemonSet does, run
    /// by the lab's kubelets; `kubernetes: true` only).
    #[serde(default = "default_agents")]
    pub agents: String,
    /// Socket load balancing (Cilium's Helm `socketLB.*`): on, for the
    /// nodes' own namespaces only (the seed's `hostNamespaceOnly=true`),
    /// unless the file says otherwise. Needs the lab's cgroup.
    #[serde(rename = "socketLB", default)]
    pub socket_lb: SocketLb,
    /// The real kube-proxy on every node beside Fibril (the seed's
    /// `kubeProxyReplacement=false`): `iptables` or `nftables` mode;
    /// `kubernetes: true` only.
    #[serde(rename = "kubeProxy", default)]
    pub kube_proxy: Option<String>,
    /// The XDP prefilter on every node's underlay device (multi-node labs;
    /// Cilium's prefilter): these source prefixes are dropped there
    /// before the node's stack; `fibril prefilter update` changes them.
    #[serde(default)]
    pub prefilter: Option<Vec<String>>,
    /// Conntrack entries one pod's traffic may hold (the agents'
    /// `--ct-endpoint-budget`; 0: no budget). Default: the agent's.
    #[serde(rename = "ctEndpointBudget", default)]
    pub ct_endpoint_budget: Option<u32>,
    /// The host firewall on every node (Cilium's Helm `hostFirewall.*`):
    /// host policies (nodeSelector) enforced on the node's underlay device
    /// and between the node and its pods. The lab keeps its way in: it
    /// enters nodes through their namespaces (`lab exec node/NAME`), never
    /// the network, and agents are asked on their Unix sockets.
    #[serde(rename = "hostFirewall", default)]
    pub host_firewall: HostFirewall,
    /// Each node's labels (what host policies' nodeSelectors match), by
    /// node name (the agents' `--node-labels`).
    #[serde(rename = "nodeLabels", default)]
    pub node_labels: BTreeMap<String, BTreeMap<String, String>>,
    /// Kube-proxy replacement (Cilium's `kubeProxyReplacement=true`): the
    /// agents serve node ports and external addresses on each node's
    /// underlay device, Maglev choosing backends for traffic from
    /// outside; no kube-proxy (multi-node labs, agents: lab).
    #[serde(rename = "kubeProxyReplacement", default)]
    pub kube_proxy_replacement: bool,
    /// Maglev's table size (the agents' `--bpf-lb-maglev-table-size`).
    #[serde(rename = "maglevTableSize", default)]
    pub maglev_table_size: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostFirewall {
    #[serde(default)]
    pub enabled: bool,
    /// Audit mode: what host policies would drop is forwarded and reported
    /// as AUDIT (how to try a host policy without locking a node out).
    #[serde(default)]
    pub audit: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SocketLb {
    #[serde(default = "yes")]
    pub enabled: bool,
    #[serde(rename = "hostNamespaceOnly", default = "yes")]
    pub host_namespace_only: bool,
}

impl Default for SocketLb {
    fn default() -> Self {
        SocketLb {
            enabled: true,
            host_namespace_only: true,
        }
    }
}

impl SocketLb {
    /// The agent's flags for it.
    fn agent_args(&self) -> Vec<String> {
        vec![
            "--bpf-lb-sock".into(),
            self.enabled.to_string(),
            "--bpf-lb-sock-hostns-only".into(),
            self.host_namespace_only.to_string(),
        ]
    }
}

fn yes() -> bool {
    true
}

fn default_agents() -> String {
    "lab".into()
}

fn default_underlay() -> String {
    "10.201.0.0/24".into()
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsProxy {
    /// Seconds an answer is kept at least (`--tofqdns-min-ttl`).
    #[serde(rename = "minTtl")]
    pub min_ttl: Option<u64>,
    /// Seconds an expired address with idle connections stays.
    #[serde(rename = "idleConnectionGracePeriod")]
    pub idle_connection_grace_period: Option<u64>,
    /// Learned addresses per endpoint.
    #[serde(rename = "maxIpsPerEndpoint")]
    pub max_ips_per_endpoint: Option<usize>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct External {
    pub name: String,
    /// An IPv4 address outside the pod CIDR.
    pub address: std::net::Ipv4Addr,
    #[serde(default)]
    pub command: Vec<String>,
}

/// The gateway externals route through (link-local, resolved statically).
const EXTERNAL_GATEWAY: std::net::Ipv4Addr = std::net::Ipv4Addr::new(169, 254, 1, 1);

fn default_cidr() -> String {
    "10.200.0.0/24".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Namespace {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Audit mode for the namespace's policies.
    #[serde(rename = "auditMode", default)]
    pub audit_mode: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PodSpec {
    pub name: String,
    #[serde(default = "default_ns")]
    pub namespace: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub command: Vec<String>,
    /// Declared container ports, as a pod spec's `ports` (named ports).
    #[serde(default)]
    pub ports: Vec<ContainerPort>,
    /// The pod's owner, as Kubernetes' ownerReferences resolve it
    /// (`{kind: Deployment, name: frontend}`); flows show it as a workload.
    #[serde(default)]
    pub workload: Option<WorkloadRef>,
    /// The node the pod runs on (multi-node labs); default: spread, pod i
    /// on node i mod N.
    #[serde(default)]
    pub node: Option<String>,
    /// Runs in its node's own network namespace, as a Kubernetes pod with
    /// `hostNetwork: true`: no endpoint, no CNI; to policy it is the node
    /// (`host` on its own node, `remote-node` on the others). Multi-node
    /// labs only (in a one-node lab the node is this machine).
    #[serde(rename = "hostNetwork", default)]
    pub host_network: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadRef {
    pub kind: String,
    pub name: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerPort {
    pub name: String,
    #[serde(rename = "containerPort")]
    pub container_port: u16,
    #[serde(default = "default_protocol")]
    pub protocol: String,
}

fn default_protocol() -> String {
    "TCP".into()
}

fn default_ns() -> String {
    "default".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyRef {
    pub file: Option<String>,
    pub inline: Option<String>,
}

/// What `lab up` created, so that `lab down` removes exactly that.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct LabState {
    pub name: String,
    pub pod_cidr: String,
    pub agent_pid: Option<u32>,
    pub agent_args: Vec<String>,
    pub pods: Vec<PodState>,
    #[serde(default)]
    pub externals: Vec<ExternalState>,
    /// Kvstore mode: the lab's etcd process.
    #[serde(default)]
    pub etcd_pid: Option<u32>,
    /// Kvstore mode: where etcd serves clients and peers (a restart uses
    /// them again, with the same data).
    #[serde(default)]
    pub etcd_addresses: Option<(std::net::SocketAddr, std::net::SocketAddr)>,
    /// Multi-node labs: the nodes (the lab's agent fields above unused).
    #[serde(default)]
    pub nodes: Vec<NodeState>,
    /// Multi-node labs: the namespace of the underlay (its bridge, the
    /// lab's router, etcd).
    #[serde(default)]
    pub underlay_netns: Option<String>,
    /// Multi-node labs: the underlay's network (router at its first
    /// address).
    #[serde(default)]
    pub underlay_cidr: Option<ipnet::Ipv4Net>,
    /// Multi-node labs: the lab's Hubble Relay (`fibril-relay` on the
    /// router's address, port 4245, and on `relay.sock`).
    #[serde(default)]
    pub relay_pid: Option<u32>,
    /// The lab's web UI (`fibril-ui` in this host's namespace, over the
    /// relay, or the agent's Hubble API in a one-node lab) and where it
    /// serves.
    #[serde(default)]
    pub ui_pid: Option<u32>,
    /// `kubernetes: true`: the control plane's processes (apiserver,
    /// controller-manager, scheduler).
    #[serde(default)]
    pub kubernetes_pids: Vec<u32>,
    #[serde(default)]
    pub ui_address: Option<String>,
}

/// A node's device on the lab's underlay (inside the node's namespace).
pub const NODE_UNDERLAY_IFNAME: &str = "ul0";

/// One node of a multi-node lab.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeState {
    pub name: String,
    pub netns: String,
    /// Its address on the underlay (InternalIP, tunnel endpoint).
    pub address: std::net::Ipv4Addr,
    pub pod_cidr: String,
    pub agent_pid: Option<u32>,
    pub agent_args: Vec<String>,
    /// Stopped by `lab stop-node` (agent killed, underlay link down).
    #[serde(default)]
    pub stopped: bool,
    /// The lab's kubelet on this node (`kubernetes: true`).
    #[serde(default)]
    pub kubelet_pid: Option<u32>,
    /// The real kube-proxy on this node (`kubeProxy:`).
    #[serde(default)]
    pub kube_proxy_pid: Option<u32>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct ExternalState {
    pub name: String,
    pub netns: String,
    pub host_ifname: String,
    pub pid: Option<u32>,
    /// Where `host_ifname` lives (multi-node labs: the underlay's
    /// namespace; None: this host's).
    #[serde(default)]
    pub host_netns: Option<String>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct PodState {
    pub namespace: String,
    pub name: String,
    pub netns: String,
    pub container_id: String,
    pub cni_result: Option<serde_json::Value>,
    pub pid: Option<u32>,
    /// A kubelet's pod: its other containers' processes (`pid` is the
    /// first's).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub other_pids: Vec<u32>,
    /// Multi-node labs: the pod's node.
    #[serde(default)]
    pub node: Option<String>,
    /// A `hostNetwork` pod: `netns` is its node's.
    #[serde(default)]
    pub host_network: bool,
}

pub fn lab_dir(lab: &str) -> PathBuf {
    PathBuf::from("/run/fibril/labs").join(lab)
}

/// The default agent's socket: a one-node lab's, or the first node's.
pub fn socket(lab: &str) -> PathBuf {
    agent_dir(lab, None).join("agent.sock")
}

/// Where an agent of the lab keeps its socket, state and log: node
/// `node`'s (multi-node labs), else the lab's own (one node), or the first
/// node's when the lab has nodes.
pub fn agent_dir(lab: &str, node: Option<&str>) -> PathBuf {
    match node {
        Some(n) => node_dir(lab, n),
        None => match load_state(lab)
            .ok()
            .and_then(|st| st.nodes.first().cloned())
        {
            Some(n) => node_dir(lab, &n.name),
            None => lab_dir(lab),
        },
    }
}

pub fn node_dir(lab: &str, node: &str) -> PathBuf {
    lab_dir(lab).join("nodes").join(node)
}

pub fn bpf_dir(lab: &str) -> PathBuf {
    PathBuf::from("/sys/fs/bpf").join(format!("fibril-{lab}"))
}

/// A node's pinned maps and links.
pub(crate) fn node_bpf_dir(lab: &str, node: &str) -> PathBuf {
    PathBuf::from(netns::bpffs::ROOT).join(format!("fibril-{lab}-{node}"))
}

/// The lab's cgroup (v2): the agent, the pods and `lab exec` commands run
/// in it, and the agent's L7 proxy shortcut covers it (`--cgroup-root`).
/// None without a cgroup v2 hierarchy.
pub fn cgroup_dir(lab: &str) -> Option<PathBuf> {
    Some(netns::cgroup::cgroup2_mount()?.join(format!("fibril-{lab}")))
}

/// A node's cgroup inside the lab's (multi-node labs): its agent's L7
/// shortcut covers its own pods only.
fn node_cgroup_dir(lab: &str, node: &str) -> Option<PathBuf> {
    Some(cgroup_dir(lab)?.join(node))
}

/// Makes `cmd` start inside the lab's cgroup (node `node`'s in a
/// multi-node lab; when it has one), before it can open a socket.
pub(crate) fn in_cgroup(cmd: &mut std::process::Command, lab: &str, node: Option<&str>) {
    let dir = match node {
        Some(n) => node_cgroup_dir(lab, n),
        None => cgroup_dir(lab),
    };
    if let Some(dir) = dir.filter(|d| d.exists()) {
        netns::cgroup::start_in_cgroup(cmd, &dir);
    }
}

/// Removes the lab's cgroup (its nodes' first) once the processes in it
/// are gone.
fn remove_cgroup(lab: &str, nodes: &[NodeState]) {
    let Some(lab_cg) = cgroup_dir(lab) else {
        return;
    };
    let dirs = nodes
        .iter()
        .filter_map(|n| node_cgroup_dir(lab, &n.name))
        .chain([lab_cg]);
    for dir in dirs {
        let end = Instant::now() + Duration::from_secs(5);
        while dir.exists() && std::fs::remove_dir(&dir).is_err() && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(20));
        }
        if dir.exists() {
            eprintln!(
                "warning: could not remove cgroup {} (processes left in it)",
                dir.display()
            );
        }
    }
}

/// A new file (truncated if it exists) only root can read or write: the
/// lab's state, logs and pod output are nobody else's business.
/// A file only root reads (0600), created or emptied.
pub(crate) fn private_file(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
}

fn state_path(lab: &str) -> PathBuf {
    lab_dir(lab).join("lab.json")
}

/// Writes the lab's state atomically (a temporary file renamed over it):
/// `lab exec` and the like read it while `lab restart-agent` writes it.
fn save(st: &LabState) -> anyhow::Result<()> {
    let path = state_path(&st.name);
    let tmp = path.with_extension(format!("json.{}", std::process::id()));
    std::io::Write::write_all(&mut private_file(&tmp)?, &serde_json::to_vec_pretty(st)?)?;
    std::fs::rename(&tmp, &path)?;
    Ok(())
}

pub fn load_state(lab: &str) -> anyhow::Result<LabState> {
    let p = state_path(lab);
    let bytes = std::fs::read(&p)
        .with_context(|| format!("lab {lab:?} is not up ({} missing)", p.display()))?;
    Ok(serde_json::from_slice(&bytes)?)
}

/// Where our binaries live: next to the running `fibril`.
pub fn bin_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."))
}

/// `fibril-echo` and friends resolve to our own build; other names to PATH.
pub(crate) fn resolve(cmd: &str) -> String {
    let ours = bin_dir().join(cmd);
    if cmd.starts_with("fibril") && ours.exists() {
        ours.display().to_string()
    } else {
        cmd.to_string()
    }
}

fn valid_name(what: &str, s: &str) -> anyhow::Result<()> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !ok {
        bail!("{what} {s:?} must be a DNS label: lowercase letters, digits and '-', at most 63 characters");
    }
    Ok(())
}

/// A parsed, fully validated lab: nothing is created before this passes.
pub struct Lab {
    pub file: LabFile,
    /// (file name, YAML) of each policy.
    pub policies: Vec<(String, String)>,
}

pub fn parse(path: Option<&Path>) -> anyhow::Result<Lab> {
    let (name, text, base) = match path {
        Some(p) => (
            p.display().to_string(),
            std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?,
            p.parent().map(Path::to_path_buf).unwrap_or_default(),
        ),
        None => (
            "default lab".to_string(),
            DEFAULT_LAB.to_string(),
            PathBuf::new(),
        ),
    };
    let value: serde_json::Value = serde_saphyr::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{name}: not valid YAML: {e}"))?;
    let file: LabFile = serde_path_to_error::deserialize(value)
        .map_err(|e| anyhow::anyhow!("{name}: {}: {}", e.path(), e.inner()))?;
    if !file.pod_cidr.contains('/') {
        bail!(
            "{name}: podCIDR: {:?} is not a CIDR (a.b.c.d/n)",
            file.pod_cidr
        );
    }
    for (i, ns) in file.namespaces.iter().enumerate() {
        valid_name(&format!("{name}: namespaces[{i}].name"), &ns.name)?;
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, p) in file.pods.iter().enumerate() {
        valid_name(&format!("{name}: pods[{i}].name"), &p.name)?;
        valid_name(&format!("{name}: pods[{i}].namespace"), &p.namespace)?;
        for (k, v) in &p.labels {
            policy::labels::validate_label_key(k)
                .map_err(|e| anyhow::anyhow!("{name}: pods[{i}].labels: {e}"))?;
            policy::labels::validate_label_value(v)
                .map_err(|e| anyhow::anyhow!("{name}: pods[{i}].labels: {e}"))?;
        }
        for (j, c) in p.ports.iter().enumerate() {
            if !["TCP", "UDP", "SCTP"].contains(&c.protocol.as_str()) {
                bail!(
                    "{name}: pods[{i}].ports[{j}].protocol: expected TCP, UDP or SCTP, found {:?}",
                    c.protocol
                );
            }
            if c.container_port == 0 {
                bail!("{name}: pods[{i}].ports[{j}].containerPort: 0 is not a port");
            }
        }
        if let Some(w) = &p.workload {
            flow::Workload {
                kind: w.kind.clone(),
                name: w.name.clone(),
            }
            .validate()
            .map_err(|e| anyhow::anyhow!("{name}: pods[{i}].workload: {e}"))?;
        }
        if !seen.insert((p.namespace.clone(), p.name.clone())) {
            bail!(
                "{name}: pods[{i}]: pod {}/{} appears twice",
                p.namespace,
                p.name
            );
        }
    }
    for (i, x) in file.externals.iter().enumerate() {
        valid_name(&format!("{name}: externals[{i}].name"), &x.name)?;
        if let Ok(cidr) = file.pod_cidr.parse::<ipnet::Ipv4Net>() {
            if cidr.contains(&x.address) {
                bail!(
                    "{name}: externals[{i}].address: {} is inside the pod CIDR {cidr}",
                    x.address
                );
            }
        }
        if x.address.is_loopback()
            || x.address.is_unspecified()
            || x.address.is_multicast()
            || x.address.is_broadcast()
        {
            bail!(
                "{name}: externals[{i}].address: {} is not a host address",
                x.address
            );
        }
        // Never shadow a network this host is really on: the external's /32
        // route would take traffic meant for a real neighbour.
        for (addr, len) in net::host_ipv4_networks()? {
            let host_net = ipnet::Ipv4Net::new(addr, len).map(|n| n.trunc());
            if host_net.is_ok_and(|n| n.contains(&x.address)) {
                bail!(
                    "{name}: externals[{i}].address: {} is on a network this host is attached to ({addr}/{len}); pick an address outside it (e.g. 203.0.113.0/24)",
                    x.address
                );
            }
        }
    }
    match file.pod_cidr.parse::<ipnet::Ipv4Net>() {
        Err(e) => bail!(
            "{name}: podCIDR: {:?} is not a CIDR (a.b.c.d/n): {e}",
            file.pod_cidr
        ),
        // The agent's own rules, checked before anything is created.
        Ok(c) if !(8..=30).contains(&c.prefix_len()) => bail!(
            "{name}: podCIDR: {c}: the prefix length must be 8-30 (a /31 or /32 has no pod addresses)"
        ),
        Ok(c) if c != c.trunc() => bail!(
            "{name}: podCIDR: {c} has host bits set (did you mean {}?)",
            c.trunc()
        ),
        Ok(_) => {}
    }
    if let Ok(cidr) = file.pod_cidr.parse::<ipnet::Ipv4Net>() {
        for (addr, len) in net::host_ipv4_networks()? {
            if let Ok(host_net) = ipnet::Ipv4Net::new(addr, len).map(|n| n.trunc()) {
                if host_net.contains(&cidr.network()) || cidr.contains(&host_net.network()) {
                    bail!("{name}: podCIDR: {cidr} overlaps {host_net}, a network this host is attached to");
                }
            }
        }
    }
    validate_nodes(&name, &file)?;
    crate::lab_services::validate(&name, &file.services)?;
    let mut policies = Vec::new();
    for (i, r) in file.policies.iter().enumerate() {
        let (pname, yaml) = match (&r.file, &r.inline) {
            (Some(f), None) if path.is_none() && f == "policies/allow-frontend-to-backend.yaml" => {
                (f.clone(), DEFAULT_POLICY.to_string())
            }
            (Some(f), None) => {
                let p = base.join(f);
                (
                    p.display().to_string(),
                    std::fs::read_to_string(&p).with_context(|| {
                        format!("{name}: policies[{i}].file: reading {}", p.display())
                    })?,
                )
            }
            (None, Some(y)) => (format!("{name}: policies[{i}].inline"), y.clone()),
            _ => bail!("{name}: policies[{i}]: give exactly one of file or inline"),
        };
        // Validate now, so that a bad policy stops the lab before it starts.
        policy::parse(&pname, &yaml, "default").map_err(|e| anyhow::anyhow!("{e}"))?;
        policies.push((pname, yaml));
    }
    Ok(Lab { file, policies })
}

/// The nodes of a lab file: unique DNS-label names, each pod's node one of
/// them, an underlay with room for them outside the pod CIDR and the
/// externals, a pod CIDR that splits into one block per node.
fn validate_nodes(name: &str, file: &LabFile) -> anyhow::Result<()> {
    if !["lab", "helm"].contains(&file.agents.as_str()) {
        bail!(
            "{name}: agents: {:?}: lab (the lab runs them) or helm (a Helm install does)",
            file.agents
        );
    }
    if let Some(cidrs) = &file.prefilter {
        if file.agents == "helm" {
            bail!("{name}: prefilter: the lab's own agents carry it (agents: lab)");
        }
        if file.nodes.is_empty() {
            bail!("{name}: prefilter: only in a lab with `nodes:` (it sits on each node's underlay device)");
        }
        for (i, c) in cidrs.iter().enumerate() {
            let net: ipnet::Ipv4Net = c.parse().map_err(|_| {
                anyhow::anyhow!("{name}: prefilter[{i}]: {c:?} is not an IPv4 prefix A.B.C.D/N")
            })?;
            if net != net.trunc() {
                bail!(
                    "{name}: prefilter[{i}]: {c} is not a network address (did you mean {}?)",
                    net.trunc()
                );
            }
        }
    }
    if file.host_firewall.enabled || file.host_firewall.audit {
        if file.agents == "helm" {
            bail!("{name}: hostFirewall: the lab's own agents carry it (agents: lab)");
        }
        if file.nodes.is_empty() {
            bail!("{name}: hostFirewall: only in a lab with `nodes:` (it sits on each node's underlay device)");
        }
        if !file.host_firewall.enabled {
            bail!("{name}: hostFirewall.audit needs hostFirewall.enabled: true");
        }
    }
    if file.kube_proxy_replacement {
        if file.agents == "helm" {
            bail!("{name}: kubeProxyReplacement: the lab's own agents carry it (agents: lab; a Helm install takes the chart's kubeProxyReplacement)");
        }
        if file.nodes.is_empty() {
            bail!("{name}: kubeProxyReplacement: only in a lab with `nodes:` (node ports are served on each node's underlay device)");
        }
        if file.kube_proxy.is_some() {
            bail!("{name}: kubeProxyReplacement: true replaces kube-proxy; drop kubeProxy");
        }
    }
    if file
        .services
        .iter()
        .any(|s| s.type_.as_deref() == Some("NodePort"))
        && !file.kube_proxy_replacement
        && file.kube_proxy.is_none()
    {
        bail!("{name}: services of type NodePort need kubeProxyReplacement: true (Fibril serves node ports) or kubeProxy (kubernetes: true): nothing else answers on them");
    }
    if let Some(m) = file.maglev_table_size {
        if !file.kube_proxy_replacement {
            bail!("{name}: maglevTableSize needs kubeProxyReplacement: true (Maglev balances traffic from outside)");
        }
        if !abi::MAGLEV_TABLE_SIZES.contains(&m) {
            bail!(
                "{name}: maglevTableSize: {m}: one of {:?} (primes)",
                abi::MAGLEV_TABLE_SIZES
            );
        }
    }
    for (node, labels) in &file.node_labels {
        if !file.nodes.contains(node) {
            bail!(
                "{name}: nodeLabels.{node}: no such node (nodes: {:?})",
                file.nodes
            );
        }
        if file.kubernetes {
            bail!("{name}: nodeLabels: with kubernetes: true a node's labels are its Node object's (kubectl label node)");
        }
        for (k, v) in labels {
            policy::labels::validate_label_key(k)
                .map_err(|e| anyhow::anyhow!("{name}: nodeLabels.{node}.{k}: {e}"))?;
            policy::labels::validate_label_value(v)
                .map_err(|e| anyhow::anyhow!("{name}: nodeLabels.{node}.{k}: {e}"))?;
        }
    }
    if let Some(mode) = &file.kube_proxy {
        if !["iptables", "nftables"].contains(&mode.as_str()) {
            bail!("{name}: kubeProxy: expected iptables or nftables, found {mode:?}");
        }
        if !file.kubernetes {
            bail!("{name}: kubeProxy needs kubernetes: true (it follows the API's Services)");
        }
    }
    if file.agents == "helm" && !file.kubernetes {
        bail!("{name}: agents: helm needs kubernetes: true (the chart's DaemonSet runs them)");
    }
    if file.agents == "helm" && !file.pods.is_empty() {
        bail!("{name}: agents: helm: the lab's own pods need the lab's agents; run workloads through the API");
    }
    if file.kubernetes && file.nodes.is_empty() {
        bail!("{name}: kubernetes: only in a lab with `nodes:` (the control plane runs in the lab's underlay, beside its etcd)");
    }
    let mut seen = std::collections::BTreeSet::new();
    for (i, n) in file.nodes.iter().enumerate() {
        valid_name(&format!("{name}: nodes[{i}]"), n)?;
        if n.len() > 20 {
            bail!("{name}: nodes[{i}]: {n:?} is longer than 20 characters");
        }
        if !seen.insert(n.as_str()) {
            bail!("{name}: nodes[{i}]: node {n:?} appears twice");
        }
    }
    for (i, p) in file.pods.iter().enumerate() {
        if p.host_network && file.nodes.is_empty() {
            bail!("{name}: pods[{i}].hostNetwork: only in a lab with `nodes:` (a one-node lab's node is this machine)");
        }
        match &p.node {
            Some(n) if file.nodes.is_empty() => bail!(
                "{name}: pods[{i}].node: {n:?}, but the lab declares no nodes (add `nodes: [{n}, ...]`)"
            ),
            Some(n) if !seen.contains(n.as_str()) => bail!(
                "{name}: pods[{i}].node: no node {n:?} (nodes: {})",
                file.nodes.join(", ")
            ),
            _ => {}
        }
    }
    if file.nodes.is_empty() {
        return Ok(());
    }
    if file.nodes.len() > MAX_NODES {
        bail!("{name}: nodes: at most {MAX_NODES} nodes in a lab");
    }
    let underlay: ipnet::Ipv4Net = file.underlay_cidr.parse().map_err(|e| {
        anyhow::anyhow!(
            "{name}: underlayCIDR: {:?} is not a CIDR (a.b.c.d/n): {e}",
            file.underlay_cidr
        )
    })?;
    if underlay != underlay.trunc() || !(8..=26).contains(&underlay.prefix_len()) {
        bail!(
            "{name}: underlayCIDR: {underlay}: give a network address with a prefix length of 8-26"
        );
    }
    if let Ok(pods) = file.pod_cidr.parse::<ipnet::Ipv4Net>() {
        if pods.contains(&underlay.network()) || underlay.contains(&pods.network()) {
            bail!("{name}: underlayCIDR: {underlay} overlaps podCIDR {pods}");
        }
        node_cidrs(&pods, file.nodes.len()).map_err(|e| anyhow::anyhow!("{name}: podCIDR: {e}"))?;
    }
    for (i, x) in file.externals.iter().enumerate() {
        if underlay.contains(&x.address) {
            bail!(
                "{name}: externals[{i}].address: {} is inside the underlay {underlay}",
                x.address
            );
        }
    }
    Ok(())
}

/// Nodes a lab may have.
const MAX_NODES: usize = 16;

/// One pod CIDR per node out of the cluster's: a /24 each, or smaller
/// blocks when the cluster's CIDR holds fewer than one /24 per node.
fn node_cidrs(cluster: &ipnet::Ipv4Net, nodes: usize) -> anyhow::Result<Vec<ipnet::Ipv4Net>> {
    let bits = usize::BITS - nodes.saturating_sub(1).leading_zeros();
    let prefix = (cluster.prefix_len() as u32 + bits).max(24);
    if prefix > 28 {
        bail!("{cluster} is too small for {nodes} nodes (each needs at least a /28)");
    }
    Ok(cluster
        .subnets(prefix as u8)
        .map_err(|e| anyhow::anyhow!("{cluster}: {e}"))?
        .take(nodes)
        .collect())
}

/// Waits until the agent answers; fails at once when it exits first.
fn wait_for_agent(sock: &Path, pid: u32, timeout: Duration) -> anyhow::Result<()> {
    let end = Instant::now() + timeout;
    loop {
        match api::call(sock, &api::Request::Status) {
            Ok(_) => return Ok(()),
            Err(_) if !alive(pid) => bail!("the agent exited while starting"),
            Err(e) if Instant::now() > end => bail!("the agent did not come up: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

/// Keeps the log of an agent that failed to start where `lab down` (which
/// cleans up after the failure) does not remove it, and quotes its end.
fn failed_start(lab: &str, log: &Path) -> String {
    let kept = std::env::temp_dir().join(format!("fibril-lab-{lab}-agent.log"));
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let saved =
        private_file(&kept).and_then(|mut f| std::io::Write::write_all(&mut f, text.as_bytes()));
    let tail: Vec<&str> = text.lines().rev().take(10).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    let where_ = match saved {
        Ok(()) => format!("the agent's log is kept in {}", kept.display()),
        Err(e) => format!("the agent's log could not be kept: {e}"),
    };
    format!("{where_}; it ends:\n{}", tail.join("\n"))
}

/// Starts the lab's agent (a one-node lab's) in the background and waits
/// until it answers.
pub fn start_agent(st: &mut LabState) -> anyhow::Result<()> {
    let dir = lab_dir(&st.name);
    let pid = spawn_agent(&st.name, &dir, &st.agent_args, None, None)?;
    st.agent_pid = Some(pid);
    save(st)?;
    wait_for_agent(&dir.join("agent.sock"), pid, Duration::from_secs(15))
        .with_context(|| failed_start(&st.name, &dir.join("agent.log")))?;
    keep_bound_ports(&mut st.agent_args, &dir.join("state"));
    save(st)
}

/// Starts node `i`'s agent inside the node's namespace and waits until it
/// answers.
fn start_node_agent(st: &mut LabState, i: usize) -> anyhow::Result<()> {
    let node = st.nodes[i].clone();
    let dir = node_dir(&st.name, &node.name);
    let pid = spawn_agent(
        &st.name,
        &dir,
        &node.agent_args,
        Some(&node.netns),
        Some(&node.name),
    )?;
    st.nodes[i].agent_pid = Some(pid);
    save(st)?;
    wait_for_agent(&dir.join("agent.sock"), pid, Duration::from_secs(15))
        .with_context(|| failed_start(&st.name, &dir.join("agent.log")))?;
    keep_bound_ports(&mut st.nodes[i].agent_args, &dir.join("state"));
    save(st)
}

/// Starts `fibril-agent` with `args`, its log in `dir`, inside the network
/// namespace `netns` when given (entered alone: the agent shares this
/// host's bpffs and paths), in the lab's (or the node's) cgroup.
fn spawn_agent(
    lab: &str,
    dir: &Path,
    args: &[String],
    netns: Option<&str>,
    node: Option<&str>,
) -> anyhow::Result<u32> {
    std::fs::create_dir_all(dir)?;
    let log = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(dir.join("agent.log"))?
    };
    let mut cmd = Command::new("setsid");
    in_cgroup(&mut cmd, lab, node);
    if let Some(ns) = netns {
        cmd.arg("nsenter").arg(format!("--net=/run/netns/{ns}"));
    }
    let child = cmd
        .arg(bin_dir().join("fibril-agent"))
        .args(args)
        // Kubernetes mode only when the lab says so (a lab run inside a
        // pod must not make its agents in-cluster ones).
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting fibril-agent")?;
    Ok(child.id())
}

/// Addresses given with port 0 become the ports the agent bound, so a
/// restarted agent listens where the first one did (a user's saved
/// scrape target or `hubble config` keeps working for the lab's life).
fn keep_bound_ports(args: &mut [String], state_dir: &Path) {
    for (flag, file) in [
        ("--metrics-addr", "metrics.addr"),
        ("--hubble-metrics-addr", "hubble-metrics.addr"),
        ("--hubble-listen-address", "hubble.addr"),
    ] {
        let Some(i) = args.iter().position(|a| a == flag) else {
            continue;
        };
        let Some(value) = args.get(i + 1) else {
            continue;
        };
        if !value.ends_with(":0") {
            continue;
        }
        let bound = std::fs::read_to_string(state_dir.join(file)).unwrap_or_default();
        if let Ok(addr) = bound.trim().parse::<std::net::SocketAddr>() {
            args[i + 1] = addr.to_string();
        }
    }
}

pub(crate) fn kill(pid: u32) {
    let _ = Command::new("kill")
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}

pub(crate) fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
}

fn wait_gone(pid: u32) {
    let end = Instant::now() + Duration::from_secs(5);
    while alive(pid) && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn stop_agent(st: &LabState) {
    if let Some(pid) = st.agent_pid {
        kill(pid);
        wait_gone(pid);
    }
}

/// Stops an agent's HTTP proxy process (its pid file in `state_dir`),
/// which outlives agent restarts.
fn stop_l7_proxy(state_dir: &Path) {
    let pid_file = state_dir.join(api::L7_PROXY_PID_FILE);
    if let Some(pid) = std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|p| p.trim().parse().ok())
    {
        kill(pid);
        wait_gone(pid);
    }
}

/// The node of pod `pod` and that node's index (multi-node labs).
pub(crate) fn node_of<'a>(st: &'a LabState, pod: &PodState) -> Option<(usize, &'a NodeState)> {
    let name = pod.node.as_deref()?;
    st.nodes.iter().enumerate().find(|(_, n)| n.name == name)
}

/// The socket of the agent that owns `pod`.
pub(crate) fn agent_socket_of(st: &LabState, pod: &PodState) -> PathBuf {
    match node_of(st, pod) {
        Some((_, n)) => node_dir(&st.name, &n.name).join("agent.sock"),
        None => lab_dir(&st.name).join("agent.sock"),
    }
}

/// The socket of the agent that owns pod `ns/name` in lab `lab` (the
/// lab's default agent when the pod is unknown).
pub fn pod_socket(lab: &str, ns: &str, name: &str) -> PathBuf {
    load_state(lab)
        .ok()
        .and_then(|st| {
            let pod = st
                .pods
                .iter()
                .find(|p| p.namespace == ns && p.name == name)?;
            Some(agent_socket_of(&st, pod))
        })
        .unwrap_or_else(|| socket(lab))
}

/// The node's filesystem as the kubelet's pods see it (its hostPaths).
pub(crate) fn node_fs(lab: &str, node: &str) -> crate::kubelet_pod::NodeFs {
    crate::kubelet_pod::NodeFs {
        root: node_dir(lab, node).join("host"),
        bpf: node_bpf_dir(lab, node),
        cgroup: node_cgroup_dir(lab, node),
    }
}

/// The lab file's services: to the API server as Service objects in a
/// Kubernetes lab, else to every agent with the lab's pods as backends.
fn publish_services(st: &LabState, file: &LabFile, sockets: &[PathBuf]) -> anyhow::Result<()> {
    let ips = crate::lab_services::cluster_ips(&file.services);
    if let (true, Some(ul)) = (file.kubernetes, &st.underlay_netns) {
        for (s, ip) in file.services.iter().zip(&ips) {
            let manifest = crate::lab_services::to_manifest(s, *ip);
            crate::k8s::apply_yaml(
                &lab_dir(&st.name),
                ul,
                &format!("service {}/{}", s.namespace, s.name),
                &manifest.to_string(),
            )?;
        }
        return Ok(());
    }
    let pods: Vec<(&PodSpec, std::net::Ipv4Addr)> = file
        .pods
        .iter()
        .filter_map(|spec| {
            let state = st
                .pods
                .iter()
                .find(|p| p.namespace == spec.namespace && p.name == spec.name)?;
            Some((spec, pod_address(state)?))
        })
        .collect();
    for (s, ip) in file.services.iter().zip(&ips) {
        let svc = crate::lab_services::to_api(s, *ip, &pods)?;
        for sock in sockets {
            api::call(sock, &api::Request::ServiceUpsert(svc.clone()))
                .with_context(|| format!("service {}", svc.key()))?;
        }
    }
    Ok(())
}

/// A pod's address, from its CNI result.
pub(crate) fn pod_address(pod: &PodState) -> Option<std::net::Ipv4Addr> {
    pod.cni_result.as_ref().and_then(|res| {
        res["ips"][0]["address"]
            .as_str()
            .and_then(|a| a.split('/').next())
            .and_then(|a| a.parse().ok())
    })
}

/// The arguments every agent of a lab gets, with its directory
/// `dir` (state, sockets), its pod CIDR and bpffs directory.
fn agent_args(
    node_name: &str,
    pod_cidr: &str,
    dir: &Path,
    bpf: &Path,
    d: &DnsProxy,
) -> Vec<String> {
    let mut args = vec![
        "--node-name".into(),
        node_name.to_string(),
        "--pod-cidr".into(),
        pod_cidr.to_string(),
        "--state-dir".into(),
        dir.join("state").display().to_string(),
        "--bpf-dir".into(),
        bpf.display().to_string(),
        "--socket".into(),
        dir.join("agent.sock").display().to_string(),
        // Metrics on loopback, any free port (state/metrics.addr says which).
        "--metrics-addr".into(),
        "127.0.0.1:0".into(),
        // The Hubble API on the lab's own root-only socket
        // (state/hubble.addr says `unix://...` when there is no TCP).
        "--hubble-socket".into(),
        dir.join("hubble.sock").display().to_string(),
        "--hubble-metrics-addr".into(),
        "127.0.0.1:0".into(),
    ];
    for (flag, value) in [
        ("--tofqdns-min-ttl", d.min_ttl.map(|v| v.to_string())),
        (
            "--tofqdns-idle-connection-grace-period",
            d.idle_connection_grace_period.map(|v| v.to_string()),
        ),
        (
            "--tofqdns-max-ips-per-endpoint",
            d.max_ips_per_endpoint.map(|v| v.to_string()),
        ),
    ] {
        if let Some(v) = value {
            args.extend([flag.to_string(), v]);
        }
    }
    args
}

/// Creates `dir` as a cgroup (one a crashed lab left is reused); whether
/// it is there.
fn make_cgroup(dir: &Path) -> bool {
    match std::fs::create_dir(dir).or_else(|e| match e.kind() {
        std::io::ErrorKind::AlreadyExists => Ok(()),
        _ => Err(e),
    }) {
        Ok(()) => true,
        Err(e) => {
            eprintln!(
                "warning: lab cgroup {}: {e} (no L7 proxy shortcut)",
                dir.display()
            );
            false
        }
    }
}

pub fn up(lab: &str, lab_file: Option<&Path>) -> anyhow::Result<()> {
    valid_name("lab name", lab)?;
    let parsed = parse(lab_file)?;
    if state_path(lab).exists() {
        bail!("lab {lab:?} is already up; `fibril lab down --lab {lab}` first");
    }
    let dir = lab_dir(lab);
    std::fs::create_dir_all(dir.join("pods"))?;
    // State, logs and sockets: root's alone (the lab dir is the gate).
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700))?;
    }
    let mut st = LabState {
        name: lab.to_string(),
        pod_cidr: parsed.file.pod_cidr.clone(),
        ..Default::default()
    };
    let lab_cgroup = cgroup_dir(lab).filter(|cg| make_cgroup(cg));
    if parsed.file.nodes.is_empty() {
        st.agent_args = agent_args(
            &format!("{lab}-node"),
            &parsed.file.pod_cidr,
            &dir,
            &bpf_dir(lab),
            &parsed.file.dns_proxy,
        );
        if let Some(cg) = &lab_cgroup {
            st.agent_args
                .extend(["--cgroup-root".to_string(), cg.display().to_string()]);
            st.agent_args.extend(parsed.file.socket_lb.agent_args());
        }
        if let Some(budget) = parsed.file.ct_endpoint_budget {
            st.agent_args
                .extend(["--ct-endpoint-budget".to_string(), budget.to_string()]);
        }
    }
    save(&st)?;
    let result = (|| -> anyhow::Result<()> {
        if !parsed.file.nodes.is_empty() {
            build_underlay(&mut st, &parsed.file)?;
            let etcd = start_underlay_etcd(&mut st)?;
            // The API server first: the agents follow it from their start.
            if parsed.file.kubernetes {
                start_kubernetes(&mut st, &etcd, &parsed.file.namespaces)?;
            }
            let lab_agents = parsed.file.agents == "lab";
            // Each node's cgroup, whoever runs its agent: a Helm-installed
            // agent's `cgroup.hostRoot` (its pods' `/sys/fs/cgroup`) is it.
            if lab_cgroup.is_some() {
                for n in &st.nodes {
                    if let Some(cg) = node_cgroup_dir(lab, &n.name) {
                        make_cgroup(&cg);
                    }
                }
            }
            // And its bpffs directory (its pods' `/sys/fs/bpf`): the
            // kubelet hands it to a Helm-installed agent as a hostPath, on
            // a host that may have no bpffs mounted yet.
            for n in &st.nodes {
                let dir = node_bpf_dir(lab, &n.name);
                netns::bpffs::ensure_dir(&dir).with_context(|| {
                    format!("node {}'s bpffs directory {}", n.name, dir.display())
                })?;
            }
            for i in (0..st.nodes.len()).filter(|_| lab_agents) {
                let n = st.nodes[i].clone();
                let ndir = node_dir(lab, &n.name);
                let mut args = agent_args(
                    &n.name,
                    &n.pod_cidr,
                    &ndir,
                    &node_bpf_dir(lab, &n.name),
                    &parsed.file.dns_proxy,
                );
                args.extend([
                    "--hubble-listen-address".to_string(),
                    format!("{}:{HUBBLE_PORT}", n.address),
                    "--node-address".to_string(),
                    n.address.to_string(),
                    "--tunnel-protocol".to_string(),
                    "vxlan".to_string(),
                ]);
                // The cluster's state: in a Kubernetes lab the API's CRDs
                // (Cilium's default) unless `kvstore: true` asks for etcd.
                if !parsed.file.kubernetes || parsed.file.kvstore {
                    args.extend(["--kvstore".to_string(), etcd.clone()]);
                }
                if let Some(ttl) = parsed.file.kvstore_lease_ttl {
                    args.extend(["--kvstore-lease-ttl".to_string(), ttl.to_string()]);
                }
                if parsed.file.kubernetes {
                    args.extend([
                        "--k8s-kubeconfig-path".to_string(),
                        crate::k8s::agent_kubeconfig(&lab_dir(lab))
                            .display()
                            .to_string(),
                    ]);
                }
                if let Some(budget) = parsed.file.ct_endpoint_budget {
                    args.extend(["--ct-endpoint-budget".to_string(), budget.to_string()]);
                }
                if parsed.file.prefilter.is_some() {
                    args.extend([
                        "--prefilter-device".to_string(),
                        NODE_UNDERLAY_IFNAME.to_string(),
                    ]);
                }
                if let Some(labels) = parsed.file.node_labels.get(&n.name) {
                    let list: Vec<String> =
                        labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    args.extend(["--node-labels".to_string(), list.join(",")]);
                }
                if parsed.file.host_firewall.enabled {
                    args.extend([
                        "--enable-host-firewall".to_string(),
                        "true".to_string(),
                        "--host-firewall-audit".to_string(),
                        parsed.file.host_firewall.audit.to_string(),
                    ]);
                }
                if parsed.file.kube_proxy_replacement {
                    args.extend(["--kube-proxy-replacement".to_string(), "true".to_string()]);
                    if let Some(m) = parsed.file.maglev_table_size {
                        args.extend(["--bpf-lb-maglev-table-size".to_string(), m.to_string()]);
                    }
                }
                if parsed.file.host_firewall.enabled || parsed.file.kube_proxy_replacement {
                    args.extend(["--devices".to_string(), NODE_UNDERLAY_IFNAME.to_string()]);
                }
                if let Some(cg) = node_cgroup_dir(lab, &n.name)
                    .filter(|cg| lab_cgroup.is_some() && make_cgroup(cg))
                {
                    args.extend(["--cgroup-root".to_string(), cg.display().to_string()]);
                    args.extend(parsed.file.socket_lb.agent_args());
                }
                st.nodes[i].agent_args = args;
                save(&st)?;
                start_node_agent(&mut st, i)?;
            }
            if lab_agents {
                start_relay(&mut st)?;
            }
            if parsed.file.kubernetes {
                for i in 0..st.nodes.len() {
                    if lab_agents {
                        wait_for_kubernetes(&st, i)?;
                    }
                    start_kubelet(&mut st, i)?;
                    if let Some(mode) = &parsed.file.kube_proxy {
                        start_kube_proxy(&mut st, i, mode)?;
                    }
                }
            }
        } else {
            if parsed.file.kvstore {
                let endpoint = start_etcd(&mut st)?;
                st.agent_args.extend([
                    "--kvstore".to_string(),
                    endpoint,
                    "--node-address".to_string(),
                    "127.0.0.1".to_string(),
                ]);
                if let Some(ttl) = parsed.file.kvstore_lease_ttl {
                    st.agent_args
                        .extend(["--kvstore-lease-ttl".to_string(), ttl.to_string()]);
                }
                save(&st)?;
            }
            start_agent(&mut st)?;
        }
        let sockets: Vec<PathBuf> = if st.nodes.is_empty() {
            vec![lab_dir(lab).join("agent.sock")]
        } else {
            st.nodes
                .iter()
                .map(|n| node_dir(lab, &n.name).join("agent.sock"))
                .collect()
        };
        if parsed.file.agents == "lab" {
            start_ui(&mut st, &sockets)?;
        }
        let ns_labels: BTreeMap<&str, &BTreeMap<String, String>> = parsed
            .file
            .namespaces
            .iter()
            .map(|n| (n.name.as_str(), &n.labels))
            .collect();
        let empty = BTreeMap::new();
        for n in parsed.file.namespaces.iter().filter(|n| n.audit_mode) {
            for sock in &sockets {
                api::call(
                    sock,
                    &api::Request::NamespaceAudit {
                        namespace: n.name.clone(),
                        audit: true,
                    },
                )?;
            }
        }
        for (i, p) in parsed.file.pods.iter().enumerate() {
            let netns = format!("fibril-{lab}-{}-{}", p.namespace, p.name);
            let node = (!parsed.file.nodes.is_empty()).then(|| {
                p.node
                    .clone()
                    .unwrap_or_else(|| parsed.file.nodes[i % parsed.file.nodes.len()].clone())
            });
            let mut pod = PodState {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                netns: netns.clone(),
                container_id: format!("{lab}-{}-{}", p.namespace, p.name),
                cni_result: None,
                pid: None,
                node,
                host_network: p.host_network,
                ..Default::default()
            };
            if p.host_network {
                pod.netns = node_of(&st, &pod)
                    .context("host-network pod with no node")?
                    .1
                    .netns
                    .clone();
                st.pods.push(pod);
                save(&st)?;
                continue;
            }
            let sock = agent_socket_of(&st, &pod);
            api::call(
                &sock,
                &api::Request::PodUpsert(api::Pod {
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                    labels: p.labels.clone(),
                    namespace_labels: {
                        let mut l =
                            (*ns_labels.get(p.namespace.as_str()).unwrap_or(&&empty)).clone();
                        // What the API server gives every namespace, as the
                        // agent sees it for the kubelet's pods.
                        if parsed.file.kubernetes {
                            l.insert("kubernetes.io/metadata.name".into(), p.namespace.clone());
                        }
                        l
                    },
                    service_account: None,
                    workloads: p
                        .workload
                        .iter()
                        .map(|w| flow::Workload {
                            kind: w.kind.clone(),
                            name: w.name.clone(),
                        })
                        .collect(),
                    ports: p
                        .ports
                        .iter()
                        .map(|c| policy::NamedPort {
                            name: c.name.clone(),
                            port: c.container_port,
                            // Checked by `parse`: TCP, UDP or SCTP.
                            protocol: policy::Protocol::from_k8s_name(&c.protocol)
                                .unwrap_or(policy::Protocol::Tcp),
                        })
                        .collect(),
                }),
            )?;
            net::create_netns(&netns)?;
            st.pods.push(pod);
            save(&st)?;
            let idx = st.pods.len() - 1;
            st.pods[idx].cni_result = crate::cni_chain::add_to_lab_agent(&st, &st.pods[idx])?;
            save(&st)?;
        }
        publish_services(&st, &parsed.file, &sockets)?;
        if let Some(cidrs) = parsed.file.prefilter.as_ref().filter(|c| !c.is_empty()) {
            for sock in &sockets {
                api::call(
                    sock,
                    &api::Request::PrefilterUpdate {
                        add: cidrs.clone(),
                        remove: Vec::new(),
                    },
                )
                .context("the lab's prefilter")?;
            }
        }
        for (name, yaml) in &parsed.policies {
            // In a Kubernetes lab policies are the API server's objects.
            if let (true, Some(ul)) = (parsed.file.kubernetes, &st.underlay_netns) {
                crate::k8s::apply_yaml(&lab_dir(lab), ul, name, yaml)?;
                continue;
            }
            api::call(
                &sockets[0],
                &api::Request::PolicyImport {
                    file: name.clone(),
                    yaml: yaml.clone(),
                    namespace: None,
                },
            )?;
        }
        for x in &parsed.file.externals {
            let netns = format!("fibril-{lab}-ext-{}", x.name);
            net::create_netns(&netns)?;
            let host_ifname = api::host_ifname(&format!("{lab}-external-{}", x.name), "eth0");
            st.externals.push(ExternalState {
                name: x.name.clone(),
                netns: netns.clone(),
                host_ifname: host_ifname.clone(),
                pid: None,
                host_netns: st.underlay_netns.clone(),
            });
            save(&st)?;
            // Attached like a pod, but with no endpoint: to the pods it is
            // the world. In a multi-node lab it hangs off the lab's
            // router, outside every node.
            let attach = || {
                net::setup_pod_veth(
                    &host_ifname,
                    Path::new(&format!("/run/netns/{netns}")),
                    "eth0",
                    x.address,
                    EXTERNAL_GATEWAY,
                    None,
                )
            };
            match &st.underlay_netns {
                Some(ul) => net::in_netns(ul, attach)??,
                None => attach()?,
            };
        }
        for (i, p) in parsed.file.pods.iter().enumerate() {
            if !p.command.is_empty() {
                let log = dir
                    .join("pods")
                    .join(format!("{}_{}.log", p.namespace, p.name));
                let node = st.pods[i].node.clone();
                st.pods[i].pid = Some(spawn_in(
                    lab,
                    node.as_deref(),
                    &st.pods[i].netns,
                    &p.command,
                    &log,
                )?);
            }
        }
        for (i, x) in parsed.file.externals.iter().enumerate() {
            if !x.command.is_empty() {
                let log = dir.join("pods").join(format!("external_{}.log", x.name));
                st.externals[i].pid = Some(spawn_in(
                    lab,
                    None,
                    &st.externals[i].netns,
                    &x.command,
                    &log,
                )?);
            }
        }
        save(&st)?;
        Ok(())
    })();
    if let Err(e) = result {
        down(lab).ok();
        return Err(e);
    }
    Ok(())
}

/// Where each node's Hubble API listens on the underlay (Hubble's port):
/// peers and the relay reach it there.
pub const HUBBLE_PORT: u16 = 4244;
/// The lab's etcd on the underlay's router address.
const ETCD_CLIENT_PORT: u16 = 2379;
const ETCD_PEER_PORT: u16 = 2380;

/// The underlay's router (and etcd) address: its network's first host.
fn underlay_router(underlay: &ipnet::Ipv4Net) -> std::net::Ipv4Addr {
    std::net::Ipv4Addr::from(u32::from(underlay.network()) + 1)
}

/// The underlay of a multi-node lab: a namespace with a bridge (the lab's
/// router, at the network's first address), and per node a namespace
/// joined to the bridge by a veth (`ul0` inside the node), its address,
/// forwarding on, and its routes (`node_routes`).
fn build_underlay(st: &mut LabState, file: &LabFile) -> anyhow::Result<()> {
    let lab = st.name.clone();
    let underlay: ipnet::Ipv4Net = file.underlay_cidr.parse()?;
    let cluster: ipnet::Ipv4Net = file.pod_cidr.parse()?;
    let cidrs = node_cidrs(&cluster, file.nodes.len())?;
    let ul = format!("fibril-{lab}-ul");
    net::create_netns(&ul)?;
    st.underlay_netns = Some(ul.clone());
    st.underlay_cidr = Some(underlay);
    save(st)?;
    let router = format!("{}/{}", underlay_router(&underlay), underlay.prefix_len());
    for args in [
        &["link", "set", "lo", "up"][..],
        &["link", "add", "br0", "type", "bridge"],
        &["link", "set", "br0", "up"],
        &["addr", "add", &router, "dev", "br0"],
    ] {
        net::ip_netns(&ul, args)?;
    }
    forwarding_on(&ul)?;
    for (i, name) in file.nodes.iter().enumerate() {
        let netns = format!("fibril-{lab}-node-{name}");
        net::create_netns(&netns)?;
        let address = std::net::Ipv4Addr::from(u32::from(underlay.network()) + 11 + i as u32);
        st.nodes.push(NodeState {
            name: name.clone(),
            netns: netns.clone(),
            address,
            pod_cidr: cidrs[i].to_string(),
            agent_pid: None,
            agent_args: Vec::new(),
            stopped: false,
            kubelet_pid: None,
            kube_proxy_pid: None,
        });
        save(st)?;
        let port = format!("n{i}");
        net::ip_netns(
            &ul,
            &[
                "link",
                "add",
                &port,
                "type",
                "veth",
                "peer",
                "name",
                NODE_UNDERLAY_IFNAME,
                "netns",
                &netns,
            ],
        )?;
        net::ip_netns(&ul, &["link", "set", &port, "master", "br0", "up"])?;
        let cidr = format!("{address}/{}", underlay.prefix_len());
        for args in [
            &["link", "set", "lo", "up"][..],
            &["addr", "add", &cidr, "dev", NODE_UNDERLAY_IFNAME],
            &["link", "set", NODE_UNDERLAY_IFNAME, "up"],
        ] {
            net::ip_netns(&netns, args)?;
        }
        forwarding_on(&netns)?;
    }
    for i in 0..st.nodes.len() {
        node_routes(st, i, &underlay)?;
        // The router reaches each node's pods through the node (replies
        // from the externals).
        let n = &st.nodes[i];
        net::ip_netns(
            &ul,
            &[
                "route",
                "replace",
                &n.pod_cidr,
                "via",
                &n.address.to_string(),
            ],
        )?;
    }
    Ok(())
}

/// IPv4 forwarding in namespace `netns` (the lab's own).
fn forwarding_on(netns: &str) -> anyhow::Result<()> {
    net::run(
        "ip",
        &[
            "netns",
            "exec",
            netns,
            "sysctl",
            "-qw",
            "net.ipv4.ip_forward=1",
        ],
    )?;
    Ok(())
}

/// Node `i`'s routes: default through the lab's router (externals), and
/// every other node's pod CIDR through that node (traffic of the node's
/// host stack to other nodes' pods is routed, not tunnelled: it arrives
/// as `remote-node`).
fn node_routes(st: &LabState, i: usize, underlay: &ipnet::Ipv4Net) -> anyhow::Result<()> {
    let n = &st.nodes[i];
    let router = underlay_router(underlay).to_string();
    net::ip_netns(&n.netns, &["route", "replace", "default", "via", &router])?;
    for (j, other) in st.nodes.iter().enumerate() {
        if j != i {
            net::ip_netns(
                &n.netns,
                &[
                    "route",
                    "replace",
                    &other.pod_cidr,
                    "via",
                    &other.address.to_string(),
                ],
            )?;
        }
    }
    Ok(())
}

/// Hubble Relay's port.
pub const RELAY_PORT: u16 = 4245;

/// The lab's Hubble Relay socket (`hubble --server unix://...`).
pub fn relay_socket(lab: &str) -> PathBuf {
    lab_dir(lab).join("relay.sock")
}

/// Starts the lab's Hubble Relay in the underlay's namespace: on the
/// router's address (port 4245, as the seed's) and on `relay.sock` for this
/// host; it finds the nodes through their agents' `peer.Peer/Notify`.
fn start_relay(st: &mut LabState) -> anyhow::Result<()> {
    let ul = st.underlay_netns.clone().context("no underlay")?;
    let router = underlay_router(&st.underlay_cidr.context("no underlay")?);
    let mut command = vec![
        "fibril-relay".to_string(),
        "--listen-address".to_string(),
        format!("{router}:{RELAY_PORT}"),
        "--unix-socket".to_string(),
        relay_socket(&st.name).display().to_string(),
    ];
    for n in &st.nodes {
        command.extend([
            "--peer-service".to_string(),
            format!("{}:{HUBBLE_PORT}", n.address),
        ]);
    }
    let log = lab_dir(&st.name).join("relay.log");
    let pid = spawn_in(&st.name, None, &ul, &command, &log)?;
    st.relay_pid = Some(pid);
    save(st)?;
    let start = std::time::Instant::now();
    while !relay_socket(&st.name).exists() {
        if !alive(pid) || start.elapsed() > Duration::from_secs(10) {
            bail!("the relay did not start; its log: {}", log.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Starts the lab's web UI in this host's namespace, on
/// `127.0.0.1:31235` (a free port instead when another lab holds it),
/// over the lab's relay (a one-node lab: its agent's Hubble API); it asks
/// the `agents` which policies select each endpoint. It serves only
/// whoever holds the lab's token (`ui.token`, root's alone, as the flows
/// are): `ui_url` is its address with the token.
fn start_ui(st: &mut LabState, agents: &[PathBuf]) -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let dir = lab_dir(&st.name);
    let hubble = if st.nodes.is_empty() {
        dir.join("hubble.sock")
    } else {
        relay_socket(&st.name)
    };
    let mut random = [0u8; 24];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut random)?;
    const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789";
    let token: String = random
        .iter()
        .map(|b| ALPHABET[*b as usize % ALPHABET.len()] as char)
        .collect();
    let token_file = dir.join("ui.token");
    private_file(&token_file)?.write_all(token.as_bytes())?;
    let address_file = dir.join("ui.address");
    let log = dir.join("ui.log");
    // The seed's port unless another lab (or anything) holds it; two labs
    // coming up at once may both see it free, so the loser tries again.
    for listen in ["127.0.0.1:31235", "127.0.0.1:0"] {
        std::fs::remove_file(&address_file).ok();
        let out = private_file(&log)?;
        let mut cmd = Command::new("setsid");
        cmd.arg(resolve("fibril-ui"))
            .args(["--listen-address", listen])
            .arg("--relay")
            .arg(format!("unix://{}", hubble.display()))
            .arg("--token-file")
            .arg(&token_file)
            .arg("--address-file")
            .arg(&address_file);
        for a in agents {
            cmd.arg("--agent-socket").arg(a);
        }
        let pid = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("starting fibril-ui")?
            .id();
        st.ui_pid = Some(pid);
        save(st)?;
        let start = std::time::Instant::now();
        loop {
            if let Ok(a) = std::fs::read_to_string(&address_file) {
                st.ui_address = Some(a.trim().to_string());
                return save(st);
            }
            if !alive(pid) {
                break;
            }
            if start.elapsed() > Duration::from_secs(10) {
                bail!("the UI did not start; its log: {}", log.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    bail!("the UI did not start; its log: {}", log.display())
}

/// Starts the lab's Kubernetes control plane in the underlay namespace on
/// the router's address, over the lab's etcd (`etcd`), and waits until the
/// apiserver is ready.
fn start_kubernetes(st: &mut LabState, etcd: &str, namespaces: &[Namespace]) -> anyhow::Result<()> {
    let ul = st.underlay_netns.clone().context("no underlay")?;
    let router = underlay_router(&st.underlay_cidr.context("no underlay")?);
    let dir = lab_dir(&st.name);
    let nodes: Vec<(String, std::net::Ipv4Addr)> = st
        .nodes
        .iter()
        .map(|n| (n.name.clone(), n.address))
        .collect();
    crate::k8s::make_pki(&dir, router, &nodes)?;
    let commands = crate::k8s::commands(&dir, router, etcd)?;
    let names = [
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
    ];
    for (i, (command, name)) in commands.iter().zip(names).enumerate() {
        let log = dir.join(format!("{name}.log"));
        let pid = spawn_in(&st.name, None, &ul, command, &log)?;
        st.kubernetes_pids.push(pid);
        save(st)?;
        if i == 0 {
            crate::k8s::wait_ready(&dir, &ul, pid, &log)?;
        }
    }
    crate::k8s::apply_agent_rbac(&dir, &ul)?;
    // The lab's namespaces, with their labels (policies select by them).
    for ns in namespaces {
        crate::k8s::create_namespace(&dir, &ul, &ns.name, &ns.labels)?;
    }
    // The lab's nodes as Node objects, each with its pod CIDR
    // (`ipam.mode=kubernetes` reads it there) and its underlay address.
    for n in &st.nodes {
        crate::k8s::register_node(&dir, &ul, &n.name, &n.pod_cidr, n.address)?;
    }
    Ok(())
}

/// kubectl against the lab's apiserver (`kubernetes: true`), as its admin.
pub fn kubectl(lab: &str) -> anyhow::Result<Command> {
    let st = load_state(lab)?;
    let ul = st
        .underlay_netns
        .filter(|_| !st.kubernetes_pids.is_empty())
        .with_context(|| format!("lab {lab:?} runs no Kubernetes (kubernetes: true)"))?;
    crate::k8s::kubectl(&lab_dir(lab), &ul)
}

/// The lab's UI address with its token (what to open in a browser).
pub fn ui_url(lab: &str) -> Option<String> {
    let st = load_state(lab).ok()?;
    let token = std::fs::read_to_string(lab_dir(lab).join("ui.token")).ok()?;
    Some(format!("http://{}/?token={}", st.ui_address?, token.trim()))
}

/// The lab's etcd in the underlay's namespace, on the router's address
/// (reachable from every node, from nothing outside the lab); waits until
/// it serves and returns its client URL.
fn start_underlay_etcd(st: &mut LabState) -> anyhow::Result<String> {
    let ul = st.underlay_netns.clone().context("no underlay")?;
    let underlay = st.underlay_cidr.context("no underlay")?;
    let router = underlay_router(&underlay);
    let member = kvstore::server::Member {
        name: format!("{}-etcd", st.name),
        client: (router, ETCD_CLIENT_PORT).into(),
        peer: (router, ETCD_PEER_PORT).into(),
        data_dir: lab_dir(&st.name).join("etcd"),
    };
    let pid = spawn_etcd(st, &member, Some(&ul))?;
    wait_for_etcd(st, &member, pid, Some(&ul))?;
    Ok(member.client_url())
}

/// The lab's etcd member as `up` started it: its addresses and data.
fn etcd_member(st: &LabState) -> anyhow::Result<kvstore::server::Member> {
    let (client, peer) = st
        .etcd_addresses
        .with_context(|| format!("lab {:?} runs no etcd", st.name))?;
    Ok(kvstore::server::Member {
        name: format!("{}-etcd", st.name),
        client,
        peer,
        data_dir: lab_dir(&st.name).join("etcd"),
    })
}

/// Stops the lab's etcd (tests and demos of the kvstore's loss): the
/// agents keep enforcing what they have and reconnect when it is back.
pub fn stop_etcd(lab: &str) -> anyhow::Result<()> {
    let mut st = load_state(lab)?;
    etcd_member(&st)?;
    if let Some(pid) = st.etcd_pid.take() {
        kill(pid);
        wait_gone(pid);
    }
    save(&st)
}

/// Starts the lab's etcd again, where it was, with its data.
pub fn start_etcd_again(lab: &str) -> anyhow::Result<()> {
    let mut st = load_state(lab)?;
    let member = etcd_member(&st)?;
    if st.etcd_pid.is_some_and(alive) {
        bail!("the lab's etcd is running");
    }
    let netns = st.underlay_netns.clone();
    let pid = spawn_etcd(&mut st, &member, netns.as_deref())?;
    wait_for_etcd(&st, &member, pid, netns.as_deref())
}

/// Waits until node `i`'s agent follows the API server (its CRDs
/// installed), so the lab is ready for `kubectl apply` when `up` returns.
fn wait_for_kubernetes(st: &LabState, i: usize) -> anyhow::Result<()> {
    let sock = node_dir(&st.name, &st.nodes[i].name).join("agent.sock");
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(api::Response::Status(s)) = api::call(&sock, &api::Request::Status) {
            if s.kubernetes.is_some_and(|k| k.connected) {
                return Ok(());
            }
        }
        if Instant::now() > end {
            bail!(
                "node {}'s agent did not reach the lab's API server within 60 s; {}",
                st.nodes[i].name,
                failed_start(
                    &st.name,
                    &node_dir(&st.name, &st.nodes[i].name).join("agent.log")
                )
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts node `i`'s kubelet inside the node's namespace.
fn start_kubelet(st: &mut LabState, i: usize) -> anyhow::Result<()> {
    let node = st.nodes[i].clone();
    let command = [
        "fibril".to_string(),
        "--lab".into(),
        st.name.clone(),
        "lab".into(),
        "kubelet".into(),
        "--node".into(),
        node.name.clone(),
    ];
    let dir = node_dir(&st.name, &node.name);
    std::fs::create_dir_all(&dir)?;
    let log = private_file(&dir.join("kubelet.log"))?;
    // `nsenter --net` alone, as for the agent: `ip netns exec` would give it
    // a mount namespace of its own, where the pods' namespace files it
    // makes would be bind mounts no one else sees.
    let mut cmd = Command::new("setsid");
    in_cgroup(&mut cmd, &st.name, Some(&node.name));
    let child = cmd
        .arg("nsenter")
        .arg(format!("--net=/run/netns/{}", node.netns))
        .arg(bin_dir().join("fibril"))
        .args(&command[1..])
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting the lab's kubelet")?;
    st.nodes[i].kubelet_pid = Some(child.id());
    save(st)
}

/// Starts the real kube-proxy on node `i`, in the node's namespace (its
/// rules are the node's) and cgroup.
fn start_kube_proxy(st: &mut LabState, i: usize, mode: &str) -> anyhow::Result<()> {
    let node = st.nodes[i].clone();
    let command = crate::k8s::kube_proxy_command(
        &lab_dir(&st.name),
        &node.name,
        node.address,
        &st.pod_cidr,
        mode,
    )?;
    let dir = node_dir(&st.name, &node.name);
    let log = private_file(&dir.join("kube-proxy.log"))?;
    let mut cmd = Command::new("setsid");
    in_cgroup(&mut cmd, &st.name, Some(&node.name));
    let child = cmd
        .arg("nsenter")
        .arg(format!("--net=/run/netns/{}", node.netns))
        .args(&command)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting kube-proxy")?;
    st.nodes[i].kube_proxy_pid = Some(child.id());
    save(st)
}

/// Stops the lab's kube-apiserver (tests of the agents' watches).
pub fn stop_apiserver(lab: &str) -> anyhow::Result<()> {
    let st = load_state(lab)?;
    let pid = *st
        .kubernetes_pids
        .first()
        .with_context(|| format!("lab {lab:?} runs no Kubernetes (kubernetes: true)"))?;
    stop_or_kill(pid);
    Ok(())
}

/// SIGTERM, and SIGKILL if that has not ended it within `wait_gone`'s
/// time (an apiserver draining its watches).
fn stop_or_kill(pid: u32) {
    kill(pid);
    wait_gone(pid);
    if alive(pid) {
        let _ = Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
        wait_gone(pid);
    }
}

/// Starts the lab's kube-apiserver again, as `up` did, and waits until it
/// is ready.
pub fn start_apiserver_again(lab: &str) -> anyhow::Result<()> {
    let mut st = load_state(lab)?;
    let pid = *st
        .kubernetes_pids
        .first()
        .with_context(|| format!("lab {lab:?} runs no Kubernetes (kubernetes: true)"))?;
    if alive(pid) {
        bail!("the lab's kube-apiserver is running");
    }
    let ul = st.underlay_netns.clone().context("no underlay")?;
    let router = underlay_router(&st.underlay_cidr.context("no underlay")?);
    let member = etcd_member(&st)?;
    let dir = lab_dir(lab);
    let commands = crate::k8s::commands(&dir, router, &member.client_url())?;
    let log = dir.join("kube-apiserver.log");
    let pid = spawn_in(lab, None, &ul, &commands[0], &log)?;
    st.kubernetes_pids[0] = pid;
    save(&st)?;
    crate::k8s::wait_ready(&dir, &ul, pid, &log)
}

/// Starts `command` in the background inside `netns` (in the cgroup of
/// node `node` when given), output to `log`.
fn spawn_in(
    lab: &str,
    node: Option<&str>,
    netns: &str,
    command: &[String],
    log: &Path,
) -> anyhow::Result<u32> {
    let out = private_file(log)?;
    let mut cmd = Command::new("setsid");
    in_cgroup(&mut cmd, lab, node);
    let child = cmd
        .args(["ip", "netns", "exec", netns])
        .arg(resolve(&command[0]))
        .args(&command[1..])
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .with_context(|| format!("starting {command:?} in {netns}"))?;
    Ok(child.id())
}

/// Removes everything `up` created, and nothing else. Safe to run on a
/// half-created lab.
pub fn down(lab: &str) -> anyhow::Result<()> {
    let mut st = load_state(lab)?;
    // The kubelets first (they would start pods again), then their pods
    // are the lab's to remove.
    for pid in st
        .nodes
        .iter()
        .flat_map(|n| [n.kubelet_pid, n.kube_proxy_pid])
        .flatten()
    {
        kill(pid);
        wait_gone(pid);
    }
    let kubelet_pods = crate::kubelet::pods(lab, &st.nodes);
    st.pods.extend(kubelet_pods);
    for pid in st
        .pods
        .iter()
        .flat_map(|p| p.pid.iter().chain(&p.other_pids).copied())
        .chain(st.externals.iter().filter_map(|x| x.pid))
    {
        kill(pid);
    }
    for x in &st.externals {
        if x.host_netns.is_none() {
            net::delete_link(&x.host_ifname);
        }
        net::delete_netns(&x.netns);
    }
    // CNI DEL in reverse order, as a runtime does (a stopped node's agent
    // is not there to answer: its namespace goes below).
    for p in st.pods.iter().rev().filter(|p| !p.host_network) {
        if node_of(&st, p).is_some_and(|(_, n)| n.stopped) {
            continue;
        }
        if let Err(e) = crate::cni_chain::del(&st, p) {
            eprintln!("warning: {e:#}");
        }
    }
    stop_agent(&st);
    for n in &st.nodes {
        if let Some(pid) = n.agent_pid {
            kill(pid);
            wait_gone(pid);
        }
    }
    // The control plane before the etcd under it, the scheduler and
    // controller-manager before the apiserver they watch; the apiserver
    // drains its watches on SIGTERM, and is killed if that takes long.
    for pid in st.kubernetes_pids.iter().rev().copied() {
        stop_or_kill(pid);
    }
    for pid in [st.ui_pid, st.relay_pid].into_iter().flatten() {
        kill(pid);
        wait_gone(pid);
    }
    if let Some(pid) = st.etcd_pid {
        kill(pid);
        wait_gone(pid);
    }
    stop_l7_proxy(&lab_dir(lab).join("state"));
    net::proxy_routing_forget(&lab_dir(lab).join("state").join(net::PROXY_ROUTING_FILE));
    for n in &st.nodes {
        // Its proxy routing goes with its namespace. A Helm-installed
        // agent's state is in the node's filesystem.
        stop_l7_proxy(&node_dir(lab, &n.name).join("state"));
        stop_l7_proxy(&node_dir(lab, &n.name).join("host/var/run/fibril/state"));
    }
    for p in st.pods.iter().filter(|p| !p.host_network) {
        net::delete_netns(&p.netns);
        if p.node.is_none() {
            // If the agent was gone, the host side of the veth may remain.
            net::delete_link(&api::host_ifname(&p.container_id, "eth0"));
        }
    }
    // Pods a kubelet was starting when it stopped are nowhere written.
    let named: Vec<String> = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .collect();
    for name in &named {
        if st
            .nodes
            .iter()
            .any(|n| crate::kubelet::is_pod_netns(lab, &n.name, name))
        {
            net::delete_netns(name);
        }
    }
    // The nodes' namespaces take their veths, VXLAN devices and routes.
    for n in &st.nodes {
        net::delete_netns(&n.netns);
        std::fs::remove_dir_all(node_bpf_dir(lab, &n.name)).ok();
    }
    if let Some(ul) = &st.underlay_netns {
        net::delete_netns(ul);
    }
    // The agent's pinned maps and links: the lab's own bpffs directory.
    std::fs::remove_dir_all(bpf_dir(lab)).ok();
    remove_cgroup(lab, &st.nodes);
    std::fs::remove_dir_all(lab_dir(lab)).ok();
    Ok(())
}

/// Starts the lab's etcd (one member on loopback, free ports, data under
/// the lab's directory) and waits until it serves; returns its client URL.
fn start_etcd(st: &mut LabState) -> anyhow::Result<String> {
    let member = kvstore::server::Member {
        name: format!("{}-etcd", st.name),
        client: kvstore::server::free_port().map_err(|e| anyhow::anyhow!("{e}"))?,
        peer: kvstore::server::free_port().map_err(|e| anyhow::anyhow!("{e}"))?,
        data_dir: lab_dir(&st.name).join("etcd"),
    };
    let pid = spawn_etcd(st, &member, None)?;
    wait_for_etcd(st, &member, pid, None)?;
    Ok(member.client_url())
}

/// Starts etcd as `member` (inside `netns` when given), its log in the
/// lab's directory.
fn spawn_etcd(
    st: &mut LabState,
    member: &kvstore::server::Member,
    netns: Option<&str>,
) -> anyhow::Result<u32> {
    let log = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(lab_dir(&st.name).join("etcd.log"))?
    };
    let mut cmd = Command::new("setsid");
    if let Some(ns) = netns {
        cmd.args(["ip", "netns", "exec", ns]);
    }
    let child = cmd
        .arg(kvstore::server::ETCD)
        .args(member.args(std::slice::from_ref(member), &st.name))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .with_context(|| {
            format!(
                "starting {} (run `cargo xtask deps`)",
                kvstore::server::ETCD
            )
        })?;
    st.etcd_pid = Some(child.id());
    st.etcd_addresses = Some((member.client, member.peer));
    save(st)?;
    Ok(child.id())
}

/// Waits until etcd accepts connections on its client address (from
/// inside `netns` when given).
fn wait_for_etcd(
    st: &LabState,
    member: &kvstore::server::Member,
    pid: u32,
    netns: Option<&str>,
) -> anyhow::Result<()> {
    let start = std::time::Instant::now();
    let serving =
        || std::net::TcpStream::connect_timeout(&member.client, Duration::from_millis(200)).is_ok();
    loop {
        let up = match netns {
            Some(ns) => net::in_netns(ns, serving)?,
            None => serving(),
        };
        if up {
            return Ok(());
        }
        if !alive(pid) || start.elapsed() > Duration::from_secs(20) {
            bail!(
                "etcd did not start; its log: {}",
                lab_dir(&st.name).join("etcd.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The index of node `node` in `st`, or an error naming the lab's nodes.
fn node_index(st: &LabState, node: &str) -> anyhow::Result<usize> {
    st.nodes
        .iter()
        .position(|n| n.name == node)
        .with_context(|| {
            if st.nodes.is_empty() {
                format!("lab {:?} has no nodes (one node: omit --node)", st.name)
            } else {
                format!(
                    "no node {node:?} in lab {:?} (nodes: {})",
                    st.name,
                    st.nodes
                        .iter()
                        .map(|n| n.name.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        })
}

/// Stops and starts the lab's agent, or node `node`'s (pods, maps and
/// programs stay).
pub fn restart_agent(lab: &str, node: Option<&str>) -> anyhow::Result<()> {
    let mut st = load_state(lab)?;
    match node {
        None if st.nodes.is_empty() => {
            stop_agent(&st);
            start_agent(&mut st)
        }
        None => bail!("lab {lab:?} has several nodes: give --node NAME"),
        Some(n) => {
            let i = node_index(&st, n)?;
            if let Some(pid) = st.nodes[i].agent_pid {
                kill(pid);
                wait_gone(pid);
            }
            start_node_agent(&mut st, i)
        }
    }
}

/// Kills node `node`'s agent and cuts its underlay link: to the others
/// the node is gone (its lease runs out, its keys expire).
pub fn stop_node(lab: &str, node: &str) -> anyhow::Result<()> {
    let mut st = load_state(lab)?;
    let i = node_index(&st, node)?;
    if let Some(pid) = st.nodes[i].agent_pid.take() {
        kill(pid);
        wait_gone(pid);
    }
    net::ip_netns(
        &st.nodes[i].netns,
        &["link", "set", NODE_UNDERLAY_IFNAME, "down"],
    )?;
    st.nodes[i].stopped = true;
    save(&st)
}

/// Brings a stopped node back: its link up, its routes, its agent.
pub fn start_node(lab: &str, node: &str) -> anyhow::Result<()> {
    let mut st = load_state(lab)?;
    let i = node_index(&st, node)?;
    let underlay = st.underlay_cidr.context("no underlay")?;
    net::ip_netns(
        &st.nodes[i].netns,
        &["link", "set", NODE_UNDERLAY_IFNAME, "up"],
    )?;
    node_routes(&st, i, &underlay)?;
    if st.nodes[i].agent_pid.is_some_and(alive) {
        bail!("node {node:?} is running");
    }
    st.nodes[i].stopped = false;
    start_node_agent(&mut st, i)
}

/// Runs a command inside a pod, like `kubectl exec`; `external/NAME` in an
/// external, `node/NAME` in a node's own namespace (a host-network pod).
/// Pod `ns/name` of the lab: a lab file's or a kubelet's.
pub(crate) fn find_pod(st: &LabState, ns: &str, name: &str) -> anyhow::Result<PodState> {
    let kubelet_pods = crate::kubelet::pods(&st.name, &st.nodes);
    st.pods
        .iter()
        .chain(&kubelet_pods)
        .find(|p| p.namespace == ns && p.name == name)
        .cloned()
        .with_context(|| format!("no pod {ns}/{name} in lab {:?}", st.name))
}

pub fn exec(lab: &str, target: &str, cmd: &[String]) -> anyhow::Result<i32> {
    let st = load_state(lab)?;
    let (ns, name) = target.split_once('/').unwrap_or(("default", target));
    let (netns, node) = match ns {
        "external" => {
            let x = st
                .externals
                .iter()
                .find(|x| x.name == name)
                .with_context(|| format!("no external {name} in lab {lab:?}"))?;
            (x.netns.clone(), None)
        }
        "node" if !st.nodes.is_empty() => {
            let n = &st.nodes[node_index(&st, name)?];
            (n.netns.clone(), Some(n.name.clone()))
        }
        _ => {
            let pod = find_pod(&st, ns, name)?;
            (pod.netns, pod.node)
        }
    };
    let first = cmd.first().context("no command given")?;
    let mut ip = Command::new("ip");
    in_cgroup(&mut ip, lab, node.as_deref());
    let status = ip
        .args(["netns", "exec", &netns])
        .arg(resolve(first))
        .args(&cmd[1..])
        .status()?;
    Ok(status.code().unwrap_or(1))
}
