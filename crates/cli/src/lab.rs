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
    pub pods: Vec<PodSpec>,
    #[serde(default)]
    pub policies: Vec<PolicyRef>,
    /// Hosts outside the cluster (the `world` for policies): namespaces
    /// attached straight to the host, with no Fibril endpoint.
    #[serde(default)]
    pub externals: Vec<External>,
    /// The agent's DNS proxy knobs (Cilium's Helm `dnsProxy.*` names).
    #[serde(rename = "dnsProxy", default)]
    pub dns_proxy: DnsProxy,
    /// Kvstore mode: the lab runs a real etcd of its own (on loopback,
    /// its data in the lab's directory) and the agent keeps the cluster's
    /// state there, as Cilium's `--kvstore etcd`.
    #[serde(default)]
    pub kvstore: bool,
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
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct ExternalState {
    pub name: String,
    pub netns: String,
    pub host_ifname: String,
    pub pid: Option<u32>,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct PodState {
    pub namespace: String,
    pub name: String,
    pub netns: String,
    pub container_id: String,
    pub cni_result: Option<serde_json::Value>,
    pub pid: Option<u32>,
}

pub fn lab_dir(lab: &str) -> PathBuf {
    PathBuf::from("/run/fibril/labs").join(lab)
}

pub fn socket(lab: &str) -> PathBuf {
    lab_dir(lab).join("agent.sock")
}

pub fn bpf_dir(lab: &str) -> PathBuf {
    PathBuf::from("/sys/fs/bpf").join(format!("fibril-{lab}"))
}

/// The lab's cgroup (v2): the agent, the pods and `lab exec` commands run
/// in it, and the agent's L7 proxy shortcut covers it (`--cgroup-root`).
/// None without a cgroup v2 hierarchy.
pub fn cgroup_dir(lab: &str) -> Option<PathBuf> {
    Some(netns::cgroup::cgroup2_mount()?.join(format!("fibril-{lab}")))
}

/// Makes `cmd` start inside the lab's cgroup (when it has one), before it
/// can open a socket.
fn in_lab_cgroup(cmd: &mut std::process::Command, lab: &str) {
    if let Some(dir) = cgroup_dir(lab).filter(|d| d.exists()) {
        netns::cgroup::start_in_cgroup(cmd, &dir);
    }
}

/// Removes the lab's cgroup once the processes in it are gone.
fn remove_cgroup(lab: &str) {
    let Some(dir) = cgroup_dir(lab) else { return };
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

/// A new file (truncated if it exists) only root can read or write: the
/// lab's state, logs and pod output are nobody else's business.
fn private_file(path: &Path) -> std::io::Result<std::fs::File> {
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
fn resolve(cmd: &str) -> String {
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

/// Starts an agent for `st` in the background and waits until it answers.
pub fn start_agent(st: &mut LabState) -> anyhow::Result<()> {
    let dir = lab_dir(&st.name);
    let log = {
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(dir.join("agent.log"))?
    };
    let mut cmd = Command::new("setsid");
    in_lab_cgroup(&mut cmd, &st.name);
    let child = cmd
        .arg(bin_dir().join("fibril-agent"))
        .args(&st.agent_args)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting fibril-agent")?;
    st.agent_pid = Some(child.id());
    save(st)?;
    wait_for_agent(&socket(&st.name), child.id(), Duration::from_secs(15))
        .with_context(|| failed_start(&st.name, &dir.join("agent.log")))?;
    keep_bound_ports(st, &dir.join("state"));
    save(st)
}

/// Addresses given with port 0 become the ports the agent bound, so a
/// restarted agent listens where the first one did (a user's saved
/// scrape target or `hubble config` keeps working for the lab's life).
fn keep_bound_ports(st: &mut LabState, state_dir: &Path) {
    for (flag, file) in [
        ("--metrics-addr", "metrics.addr"),
        ("--hubble-metrics-addr", "hubble-metrics.addr"),
        ("--hubble-listen-address", "hubble.addr"),
    ] {
        let Some(i) = st.agent_args.iter().position(|a| a == flag) else {
            continue;
        };
        let Some(value) = st.agent_args.get(i + 1) else {
            continue;
        };
        if !value.ends_with(":0") {
            continue;
        }
        let bound = std::fs::read_to_string(state_dir.join(file)).unwrap_or_default();
        if let Ok(addr) = bound.trim().parse::<std::net::SocketAddr>() {
            st.agent_args[i + 1] = addr.to_string();
        }
    }
}

fn kill(pid: u32) {
    let _ = Command::new("kill")
        .arg(pid.to_string())
        .stderr(Stdio::null())
        .status();
}

fn alive(pid: u32) -> bool {
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

/// Stops the lab's HTTP proxy process, which outlives agent restarts.
fn stop_l7_proxy(lab: &str) {
    let pid_file = lab_dir(lab).join("state").join(api::L7_PROXY_PID_FILE);
    if let Some(pid) = std::fs::read_to_string(pid_file)
        .ok()
        .and_then(|p| p.trim().parse().ok())
    {
        kill(pid);
        wait_gone(pid);
    }
}

fn cni_config(lab: &str) -> String {
    serde_json::json!({
        "cniVersion": "1.1.0",
        "name": "fibril",
        "type": "fibril-cni",
        "agentSocket": socket(lab).display().to_string(),
    })
    .to_string()
}

/// Runs the CNI plugin the way a runtime does.
fn cni(command: &str, pod: &PodState, stdin: &str) -> anyhow::Result<Option<serde_json::Value>> {
    use std::io::Write;
    let mut child = Command::new(bin_dir().join("fibril-cni"))
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &pod.container_id)
        .env("CNI_NETNS", format!("/run/netns/{}", pod.netns))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", bin_dir())
        .env(
            "CNI_ARGS",
            format!(
                "K8S_POD_NAMESPACE={};K8S_POD_NAME={}",
                pod.namespace, pod.name
            ),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("running fibril-cni")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(stdin.as_bytes())?;
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "CNI {command} for {}/{} failed: {}",
            pod.namespace,
            pod.name,
            text.trim()
        );
    }
    Ok(if text.trim().is_empty() {
        None
    } else {
        Some(serde_json::from_str(&text)?)
    })
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
        agent_args: vec![
            "--node-name".into(),
            format!("{lab}-node"),
            "--pod-cidr".into(),
            parsed.file.pod_cidr.clone(),
            "--state-dir".into(),
            dir.join("state").display().to_string(),
            "--bpf-dir".into(),
            bpf_dir(lab).display().to_string(),
            "--socket".into(),
            socket(lab).display().to_string(),
            // Metrics on loopback, any free port (state/metrics.addr says which).
            "--metrics-addr".into(),
            "127.0.0.1:0".into(),
            // The Hubble API on the lab's own root-only socket, no TCP
            // (state/hubble.addr says `unix://...`).
            "--hubble-socket".into(),
            dir.join("hubble.sock").display().to_string(),
            "--hubble-metrics-addr".into(),
            "127.0.0.1:0".into(),
        ],
        ..Default::default()
    };
    let d = &parsed.file.dns_proxy;
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
            st.agent_args.extend([flag.to_string(), v]);
        }
    }
    if let Some(cg) = cgroup_dir(lab) {
        // One left by a lab that crashed is reused.
        match std::fs::create_dir(&cg).or_else(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => Ok(()),
            _ => Err(e),
        }) {
            Ok(()) => st
                .agent_args
                .extend(["--cgroup-root".to_string(), cg.display().to_string()]),
            Err(e) => eprintln!(
                "warning: lab cgroup {}: {e} (no L7 proxy shortcut)",
                cg.display()
            ),
        }
    }
    save(&st)?;
    let result = (|| -> anyhow::Result<()> {
        if parsed.file.kvstore {
            let endpoint = start_etcd(&mut st)?;
            st.agent_args.extend([
                "--kvstore".to_string(),
                endpoint,
                "--node-address".to_string(),
                "127.0.0.1".to_string(),
            ]);
            save(&st)?;
        }
        start_agent(&mut st)?;
        let sock = socket(lab);
        let ns_labels: BTreeMap<&str, &BTreeMap<String, String>> = parsed
            .file
            .namespaces
            .iter()
            .map(|n| (n.name.as_str(), &n.labels))
            .collect();
        let empty = BTreeMap::new();
        for n in parsed.file.namespaces.iter().filter(|n| n.audit_mode) {
            api::call(
                &sock,
                &api::Request::NamespaceAudit {
                    namespace: n.name.clone(),
                    audit: true,
                },
            )?;
        }
        for p in &parsed.file.pods {
            let netns = format!("fibril-{lab}-{}-{}", p.namespace, p.name);
            let pod = PodState {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                netns: netns.clone(),
                container_id: format!("{lab}-{}-{}", p.namespace, p.name),
                cni_result: None,
                pid: None,
            };
            api::call(
                &sock,
                &api::Request::PodUpsert(api::Pod {
                    namespace: p.namespace.clone(),
                    name: p.name.clone(),
                    labels: p.labels.clone(),
                    namespace_labels: (*ns_labels.get(p.namespace.as_str()).unwrap_or(&&empty))
                        .clone(),
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
                            protocol: match c.protocol.as_str() {
                                "UDP" => policy::Protocol::Udp,
                                "SCTP" => policy::Protocol::Sctp,
                                _ => policy::Protocol::Tcp,
                            },
                        })
                        .collect(),
                }),
            )?;
            net::create_netns(&netns)?;
            st.pods.push(pod);
            save(&st)?;
            let idx = st.pods.len() - 1;
            st.pods[idx].cni_result = cni("ADD", &st.pods[idx], &cni_config(lab))?;
            save(&st)?;
        }
        for (name, yaml) in &parsed.policies {
            api::call(
                &sock,
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
            });
            save(&st)?;
            // Attached like a pod, but with no endpoint: to the pods it is
            // the world.
            net::setup_pod_veth(
                &host_ifname,
                Path::new(&format!("/run/netns/{netns}")),
                "eth0",
                x.address,
                EXTERNAL_GATEWAY,
            )?;
        }
        for (i, p) in parsed.file.pods.iter().enumerate() {
            if !p.command.is_empty() {
                let log = dir
                    .join("pods")
                    .join(format!("{}_{}.log", p.namespace, p.name));
                st.pods[i].pid = Some(spawn_in(lab, &st.pods[i].netns, &p.command, &log)?);
            }
        }
        for (i, x) in parsed.file.externals.iter().enumerate() {
            if !x.command.is_empty() {
                let log = dir.join("pods").join(format!("external_{}.log", x.name));
                st.externals[i].pid =
                    Some(spawn_in(lab, &st.externals[i].netns, &x.command, &log)?);
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

/// Starts `command` in the background inside `netns`, output to `log`.
fn spawn_in(lab: &str, netns: &str, command: &[String], log: &Path) -> anyhow::Result<u32> {
    let out = private_file(log)?;
    let mut cmd = Command::new("setsid");
    in_lab_cgroup(&mut cmd, lab);
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
    let st = load_state(lab)?;
    for pid in st
        .pods
        .iter()
        .filter_map(|p| p.pid)
        .chain(st.externals.iter().filter_map(|x| x.pid))
    {
        kill(pid);
    }
    for x in &st.externals {
        net::delete_link(&x.host_ifname);
        net::delete_netns(&x.netns);
    }
    // CNI DEL in reverse order, as a runtime does.
    for p in st.pods.iter().rev() {
        let mut conf: serde_json::Value = serde_json::from_str(&cni_config(lab))?;
        if let Some(r) = &p.cni_result {
            conf["prevResult"] = r.clone();
        }
        if let Err(e) = cni("DEL", p, &conf.to_string()) {
            eprintln!("warning: {e:#}");
        }
    }
    stop_agent(&st);
    if let Some(pid) = st.etcd_pid {
        kill(pid);
        wait_gone(pid);
    }
    stop_l7_proxy(lab);
    net::proxy_routing_forget(&lab_dir(lab).join("state").join(net::PROXY_ROUTING_FILE));
    for p in &st.pods {
        net::delete_netns(&p.netns);
        // If the agent was gone, the host side of the veth may remain.
        net::delete_link(&api::host_ifname(&p.container_id, "eth0"));
    }
    // The agent's pinned maps and links: the lab's own bpffs directory.
    std::fs::remove_dir_all(bpf_dir(lab)).ok();
    remove_cgroup(lab);
    std::fs::remove_dir_all(lab_dir(lab)).ok();
    Ok(())
}

/// Starts the lab's etcd (one member on loopback, free ports, data under
/// the lab's directory) and waits until it serves; returns its client URL.
fn start_etcd(st: &mut LabState) -> anyhow::Result<String> {
    let dir = lab_dir(&st.name);
    let member = kvstore::server::Member {
        name: format!("{}-etcd", st.name),
        client: kvstore::server::free_port().map_err(|e| anyhow::anyhow!("{e}"))?,
        peer: kvstore::server::free_port().map_err(|e| anyhow::anyhow!("{e}"))?,
        data_dir: dir.join("etcd"),
    };
    let log = private_file(&dir.join("etcd.log"))?;
    let mut cmd = Command::new("setsid");
    let child = cmd
        .arg(kvstore::server::ETCD)
        .args(member.args(std::slice::from_ref(&member), &st.name))
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
    save(st)?;
    let start = std::time::Instant::now();
    while std::net::TcpStream::connect_timeout(&member.client, Duration::from_millis(200)).is_err()
    {
        if !alive(child.id()) || start.elapsed() > Duration::from_secs(20) {
            bail!(
                "etcd did not start; its log: {}",
                dir.join("etcd.log").display()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(member.client_url())
}

/// Stops and starts the lab's agent (pods, maps and programs stay).
pub fn restart_agent(lab: &str) -> anyhow::Result<()> {
    let mut st = load_state(lab)?;
    stop_agent(&st);
    start_agent(&mut st)
}

/// Runs a command inside a pod, like `kubectl exec`.
pub fn exec(lab: &str, target: &str, cmd: &[String]) -> anyhow::Result<i32> {
    let st = load_state(lab)?;
    let (ns, name) = target.split_once('/').unwrap_or(("default", target));
    if ns == "external" {
        let x = st
            .externals
            .iter()
            .find(|x| x.name == name)
            .with_context(|| format!("no external {name} in lab {lab:?}"))?;
        let first = cmd.first().context("no command given")?;
        let mut ip = Command::new("ip");
        in_lab_cgroup(&mut ip, lab);
        let status = ip
            .args(["netns", "exec", &x.netns])
            .arg(resolve(first))
            .args(&cmd[1..])
            .status()?;
        return Ok(status.code().unwrap_or(1));
    }
    let pod = st
        .pods
        .iter()
        .find(|p| p.namespace == ns && p.name == name)
        .with_context(|| format!("no pod {ns}/{name} in lab {lab:?}"))?;
    let first = cmd.first().context("no command given")?;
    let mut ip = Command::new("ip");
    in_lab_cgroup(&mut ip, lab);
    let status = ip
        .args(["netns", "exec", &pod.netns])
        .arg(resolve(first))
        .args(&cmd[1..])
        .status()?;
    Ok(status.code().unwrap_or(1))
}
