//! A lab's Kubernetes control plane (`kubernetes: true`): the real
//! kube-apiserver, kube-controller-manager and kube-scheduler (built from
//! `tools/kubernetes` by `cargo xtask deps`), on the lab's etcd, in the
//! lab's underlay namespace on the router's address: reachable from the
//! nodes, from nothing outside the lab. The lab makes its own PKI (a CA, the
//! apiserver's serving certificate, a client certificate per component and
//! for the admin, the service-account key) and kubeconfigs, all root's
//! alone; `fibril lab kubectl` runs kubectl in the underlay with the
//! admin's.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, KeyUsagePurpose,
};

/// The Kubernetes release `tools/kubernetes` builds (checked against its
/// go.mod by a test).
pub const VERSION: &str = "v1.37.2";
/// The apiserver's port on the lab's router.
pub const APISERVER_PORT: u16 = 6443;
/// Services' virtual addresses (the apiserver's `kubernetes` service is
/// the first).
pub const SERVICE_CIDR: &str = "10.96.0.0/16";

/// The cache `cargo xtask deps` builds third-party programs into (outside
/// the clone, a directory per program and version).
pub fn tools_cache() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"))
        .join("fibril")
}

/// Where the control plane's binaries are: `FIBRIL_KUBERNETES_DIR`, else
/// the cache `cargo xtask deps` builds them into.
pub fn bin_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("FIBRIL_KUBERNETES_DIR") {
        return d.into();
    }
    tools_cache().join(format!("kubernetes-{VERSION}"))
}

pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let p = bin_dir().join(name);
    if !p.exists() {
        bail!(
            "{} is missing: `cargo xtask deps` builds Kubernetes {VERSION} from the Go module proxy into {}",
            name,
            bin_dir().display()
        );
    }
    Ok(p)
}

/// The lab's control-plane directory (certificates, keys, kubeconfigs).
pub fn dir(lab_dir: &Path) -> PathBuf {
    lab_dir.join("kubernetes")
}

/// The group the lab's agents' certificates carry.
const AGENT_GROUP: &str = "fibril:agents";

/// The agents' kubeconfig (`--k8s-kubeconfig-path`).
pub fn agent_kubeconfig(lab_dir: &Path) -> PathBuf {
    dir(lab_dir).join("fibril-agent.kubeconfig")
}

/// Gives the lab's agents their ClusterRole.
pub fn apply_agent_rbac(lab_dir: &Path, netns: &str) -> anyhow::Result<()> {
    let list = serde_json::json!({
        "apiVersion": "v1",
        "kind": "List",
        "items": k8s::rbac::agent_role_for_group("fibril-agent", AGENT_GROUP),
    });
    apply(lab_dir, netns, "agent-rbac", &list)
}

/// Creates (or updates) namespace `name` with `labels`.
pub fn create_namespace(
    lab_dir: &Path,
    netns: &str,
    name: &str,
    labels: &std::collections::BTreeMap<String, String>,
) -> anyhow::Result<()> {
    let ns = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": name, "labels": labels},
    });
    apply(lab_dir, netns, &format!("namespace-{name}"), &ns)
}

/// `kubectl apply` of one manifest (written beside the lab's PKI).
pub fn apply(
    lab_dir: &Path,
    netns: &str,
    what: &str,
    manifest: &serde_json::Value,
) -> anyhow::Result<()> {
    let path = dir(lab_dir).join(format!("{what}.json"));
    write_private(&path, &manifest.to_string())?;
    let out = kubectl(lab_dir, netns)?
        .args(["apply", "-f"])
        .arg(&path)
        .output()?;
    if !out.status.success() {
        bail!(
            "applying {what}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// `kubectl apply` of a user's YAML (`file` names it in errors).
pub fn apply_yaml(lab_dir: &Path, netns: &str, file: &str, yaml: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut child = kubectl(lab_dir, netns)?
        .args(["apply", "-f", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .context("kubectl's stdin")?
        .write_all(yaml.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "kubectl apply {file}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// The admin's kubeconfig (`system:masters`).
pub fn admin_kubeconfig(lab_dir: &Path) -> PathBuf {
    dir(lab_dir).join("admin.kubeconfig")
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    crate::lab::private_file(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .with_context(|| format!("writing {}", path.display()))
}

/// A certificate signed by `ca` for `cn` (and `org`), with `names` as its
/// subject alternative names (addresses become IP SANs).
fn issue(
    ca: &CertifiedIssuer<'_, KeyPair>,
    cn: &str,
    org: Option<&str>,
    names: &[String],
) -> anyhow::Result<(String, String)> {
    let key = KeyPair::generate()?;
    let mut params = CertificateParams::new(names.to_vec())?;
    params.distinguished_name.push(DnType::CommonName, cn);
    if let Some(o) = org {
        params.distinguished_name.push(DnType::OrganizationName, o);
    }
    let cert = params.signed_by(&key, ca)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn kubeconfig(server: &str, ca: &Path, cert: &Path, key: &Path) -> String {
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: lab\n  cluster:\n    server: {server}\n    certificate-authority: {}\nusers:\n- name: user\n  user:\n    client-certificate: {}\n    client-key: {}\ncontexts:\n- name: lab\n  context: {{cluster: lab, user: user}}\ncurrent-context: lab\n",
        ca.display(),
        cert.display(),
        key.display()
    )
}

/// The control plane's files for an apiserver on `router`.
pub fn make_pki(
    lab_dir: &Path,
    router: Ipv4Addr,
    nodes: &[(String, Ipv4Addr)],
) -> anyhow::Result<()> {
    let d = dir(lab_dir);
    std::fs::create_dir_all(&d)?;
    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "fibril-lab-ca");
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;
    write_private(&d.join("ca.crt"), &ca.pem())?;
    let server = format!("https://{router}:{APISERVER_PORT}");
    let api_names: Vec<String> = [
        router.to_string(),
        "10.96.0.1".into(),
        "kubernetes".into(),
        "kubernetes.default".into(),
        "kubernetes.default.svc".into(),
    ]
    .into();
    let (cert, key) = issue(&ca, "kube-apiserver", None, &api_names)?;
    write_private(&d.join("apiserver.crt"), &cert)?;
    write_private(&d.join("apiserver.key"), &key)?;
    for (who, cn, org) in [
        ("admin", "fibril-admin", Some("system:masters")),
        (
            "kube-controller-manager",
            "system:kube-controller-manager",
            None,
        ),
        ("kube-scheduler", "system:kube-scheduler", None),
        // kube-proxy (`kubeProxy:`), the user the bootstrap
        // system:node-proxier binding names.
        ("kube-proxy", "system:kube-proxy", None),
        // The nodes' agents: their rights are the ClusterRole bound to
        // this group (`apply_agent_rbac`), as the chart's ServiceAccount's.
        ("fibril-agent", "fibril-agent", Some(AGENT_GROUP)),
    ]
    .into_iter()
    .map(|(who, cn, org)| (who.to_string(), cn.to_string(), org))
    // The apiserver's client to the kubelets (`kubectl logs`).
    .chain([(
        "apiserver-kubelet-client".to_string(),
        "kube-apiserver-kubelet-client".to_string(),
        Some("system:masters"),
    )])
    // Each node's kubelet, as the Node authorizer knows it.
    .chain(nodes.iter().map(|(n, _)| {
        (
            format!("kubelet-{n}"),
            format!("system:node:{n}"),
            Some("system:nodes"),
        )
    })) {
        let (who, cn) = (who.as_str(), cn.as_str());
        let (cert, key) = issue(&ca, cn, org, &[])?;
        let (c, k) = (d.join(format!("{who}.crt")), d.join(format!("{who}.key")));
        write_private(&c, &cert)?;
        write_private(&k, &key)?;
        write_private(
            &d.join(format!("{who}.kubeconfig")),
            &kubeconfig(&server, &d.join("ca.crt"), &c, &k),
        )?;
    }
    // Each kubelet's serving certificate, for its node's address.
    for (n, address) in nodes {
        let (cert, key) = issue(
            &ca,
            &format!("system:node:{n}"),
            Some("system:nodes"),
            &[address.to_string(), n.clone()],
        )?;
        write_private(&d.join(format!("kubelet-{n}-serving.crt")), &cert)?;
        write_private(&d.join(format!("kubelet-{n}-serving.key")), &key)?;
    }
    let sa = KeyPair::generate()?;
    write_private(&d.join("sa.key"), &sa.serialize_pem())?;
    write_private(&d.join("sa.pub"), &sa.public_key_pem())?;
    Ok(())
}

/// The three components' command lines (apiserver first), for an
/// apiserver on `router` over `etcd`.
pub fn commands(lab_dir: &Path, router: Ipv4Addr, etcd: &str) -> anyhow::Result<Vec<Vec<String>>> {
    let d = dir(lab_dir);
    let p = |f: &str| d.join(f).display().to_string();
    let bin = |n: &str| binary(n).map(|b| b.display().to_string());
    let apiserver = vec![
        bin("kube-apiserver")?,
        format!("--etcd-servers={etcd}"),
        format!("--bind-address={router}"),
        format!("--advertise-address={router}"),
        format!("--secure-port={APISERVER_PORT}"),
        format!("--service-cluster-ip-range={SERVICE_CIDR}"),
        format!("--client-ca-file={}", p("ca.crt")),
        format!("--tls-cert-file={}", p("apiserver.crt")),
        format!("--tls-private-key-file={}", p("apiserver.key")),
        "--service-account-issuer=https://kubernetes.default.svc".into(),
        format!("--service-account-key-file={}", p("sa.pub")),
        format!("--service-account-signing-key-file={}", p("sa.key")),
        "--authorization-mode=Node,RBAC".into(),
        // `kubectl logs`: the kubelets at their InternalIP, checked against
        // the lab's CA, the apiserver presenting its kubelet client.
        "--kubelet-preferred-address-types=InternalIP".into(),
        format!(
            "--kubelet-client-certificate={}",
            p("apiserver-kubelet-client.crt")
        ),
        format!("--kubelet-client-key={}", p("apiserver-kubelet-client.key")),
        format!("--kubelet-certificate-authority={}", p("ca.crt")),
        "--allow-privileged=true".into(),
    ];
    let controller_manager = vec![
        bin("kube-controller-manager")?,
        format!("--kubeconfig={}", p("kube-controller-manager.kubeconfig")),
        // Its own HTTPS endpoint (health, metrics) is not needed here.
        "--secure-port=0".into(),
        format!("--service-account-private-key-file={}", p("sa.key")),
        format!("--root-ca-file={}", p("ca.crt")),
        "--use-service-account-credentials=true".into(),
        "--leader-elect=false".into(),
    ];
    let scheduler = vec![
        bin("kube-scheduler")?,
        format!("--kubeconfig={}", p("kube-scheduler.kubeconfig")),
        "--secure-port=0".into(),
        "--leader-elect=false".into(),
    ];
    Ok(vec![apiserver, controller_manager, scheduler])
}

/// kube-proxy's command line for node `node` (address `address`) in
/// `mode` (`iptables` or `nftables`). It runs in the node's namespace, so
/// its rules and sysctls are that namespace's; the global conntrack table
/// size is left alone (a namespace cannot set it).
pub fn kube_proxy_command(
    lab_dir: &Path,
    node: &str,
    address: Ipv4Addr,
    cluster_cidr: &str,
    mode: &str,
) -> anyhow::Result<Vec<String>> {
    let d = dir(lab_dir);
    Ok(vec![
        binary("kube-proxy")?.display().to_string(),
        format!("--kubeconfig={}", d.join("kube-proxy.kubeconfig").display()),
        format!("--hostname-override={node}"),
        format!("--proxy-mode={mode}"),
        format!("--cluster-cidr={cluster_cidr}"),
        format!("--bind-address={address}"),
        format!("--healthz-bind-address={address}:10256"),
        format!("--metrics-bind-address={address}:10249"),
        "--conntrack-max-per-core=0".into(),
        "--conntrack-min=0".into(),
    ])
}

/// Waits until the apiserver says it is ready (`/readyz`), asking with
/// kubectl inside `netns`.
pub fn wait_ready(
    lab_dir: &Path,
    netns: &str,
    apiserver_pid: u32,
    log: &Path,
) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        let out = kubectl(lab_dir, netns)?
            .args(["get", "--raw", "/readyz", "--request-timeout=2s"])
            .output()?;
        if out.status.success() {
            return Ok(());
        }
        let alive = Path::new(&format!("/proc/{apiserver_pid}")).exists();
        if !alive || start.elapsed() > Duration::from_secs(60) {
            bail!(
                "the lab's kube-apiserver did not become ready{}; its log: {}",
                if alive {
                    " within 60 s"
                } else {
                    " (it exited)"
                },
                log.display()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Creates (or updates) node `name`'s Node object: its pod CIDR in
/// `spec.podCIDR(s)`, as Kubernetes' node IPAM would set it, and its
/// address as its InternalIP.
pub fn register_node(
    lab_dir: &Path,
    netns: &str,
    name: &str,
    pod_cidr: &str,
    address: Ipv4Addr,
) -> anyhow::Result<()> {
    let node = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux"}},
        "spec": {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]},
    });
    apply(lab_dir, netns, &format!("node-{name}"), &node)?;
    // The address is status (a kubelet's to report): patched there.
    let status = serde_json::json!({"status": {"addresses": [
        {"type": "InternalIP", "address": address.to_string()},
        {"type": "Hostname", "address": name},
    ]}});
    let out = kubectl(lab_dir, netns)?
        .args([
            "patch",
            "node",
            name,
            "--subresource=status",
            "--type=merge",
            "-p",
        ])
        .arg(status.to_string())
        .output()?;
    if !out.status.success() {
        bail!(
            "node {name}'s address: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// kubectl with the admin's kubeconfig, run inside `netns` (the lab's
/// underlay, where the apiserver listens).
pub fn kubectl(lab_dir: &Path, netns: &str) -> anyhow::Result<std::process::Command> {
    let mut c = std::process::Command::new("ip");
    c.args(["netns", "exec", netns])
        .arg(binary("kubectl")?)
        .arg("--kubeconfig")
        .arg(admin_kubeconfig(lab_dir));
    Ok(c)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_version_is_the_one_tools_kubernetes_builds() {
        let go_mod = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools/kubernetes/go.mod"),
        )
        .unwrap();
        let required = go_mod.lines().find_map(|l| {
            let mut w = l.trim().trim_start_matches("require ").split_whitespace();
            (w.next() == Some("k8s.io/kubernetes")).then(|| w.next())?
        });
        assert_eq!(
            required,
            Some(super::VERSION),
            "k8s.rs VERSION and tools/kubernetes/go.mod disagree"
        );
    }

    #[test]
    fn the_pki_is_root_only_and_kubeconfigs_name_their_files() {
        use std::os::unix::fs::PermissionsExt;
        let d = std::env::temp_dir().join(format!("fibril-k8s-pki-{}", std::process::id()));
        super::make_pki(
            &d,
            "10.201.0.1".parse().unwrap(),
            &[("n1".to_string(), "10.201.0.11".parse().unwrap())],
        )
        .unwrap();
        for f in [
            "ca.crt",
            "apiserver.key",
            "admin.kubeconfig",
            "sa.key",
            "sa.pub",
        ] {
            let m = std::fs::metadata(super::dir(&d).join(f))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(m & 0o077, 0, "{f}: {m:o}");
        }
        let kc = std::fs::read_to_string(super::admin_kubeconfig(&d)).unwrap();
        assert!(kc.contains("server: https://10.201.0.1:6443"), "{kc}");
        assert!(kc.contains("admin.crt"));
        std::fs::remove_dir_all(&d).ok();
    }
}
