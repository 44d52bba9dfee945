//! What a pod's containers run on a lab node: the node's filesystem (its
//! `hostPath`s under the node's own directory, `/sys/fs/bpf` under the
//! node's bpffs directory, so that two nodes on one machine never share),
//! each container's mounts (a volume's directory for each `mountPath`),
//! and its process: the command mapped to the lab's programs, every
//! argument and environment value that names a path under a `mountPath`
//! rewritten to the volume's directory (the lab's pods share this
//! machine's filesystem: no mount namespace per container), and the
//! environment with the downward API's fields.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::{Container, Pod, Service};

/// A node's filesystem as its pods see their `hostPath`s.
#[derive(Clone, Debug)]
pub struct NodeFs {
    /// Where `/` of the node is (`nodes/NAME/host`).
    pub root: PathBuf,
    /// Where `/sys/fs/bpf` of the node is (a directory in the bpffs).
    pub bpf: PathBuf,
    /// Where `/sys/fs/cgroup` of the node is (the node's cgroup, which
    /// its pods run in), when this machine has cgroup v2.
    pub cgroup: Option<PathBuf>,
}

impl NodeFs {
    /// The directory or file a node path is.
    pub fn host_path(&self, path: &str) -> PathBuf {
        let under = |prefix: &str| {
            path.strip_prefix(prefix)
                .filter(|rest| rest.is_empty() || rest.starts_with('/'))
                .map(|rest| rest.trim_start_matches('/'))
        };
        if let Some(rest) = under("/sys/fs/bpf") {
            return self.bpf.join(rest);
        }
        if let (Some(rest), Some(cgroup)) = (under("/sys/fs/cgroup"), &self.cgroup) {
            return cgroup.join(rest);
        }
        self.root.join(path.trim_start_matches('/'))
    }

    /// The node's CNI configuration list, the first by name (as a runtime
    /// picks it), if one is installed.
    pub fn cni_conflist(&self) -> Option<PathBuf> {
        let dir = self.host_path("/etc/cni/net.d");
        let mut lists: Vec<PathBuf> = std::fs::read_dir(dir)
            .ok()?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "conflist"))
            .collect();
        lists.sort();
        lists.into_iter().next()
    }
}

/// A container's mounts: `mountPath` -> the directory (or file) there,
/// longest first so the deepest mount wins.
#[derive(Clone, Debug, Default)]
pub struct Mounts(Vec<(String, PathBuf)>);

impl Mounts {
    pub fn new(mut mounts: Vec<(String, PathBuf)>) -> Self {
        mounts.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        Mounts(mounts)
    }

    /// `value` with a path under a mount rewritten: a whole value
    /// (`/etc/x`) or a flag's (`--config=/etc/x`).
    pub fn map(&self, value: &str) -> String {
        let (prefix, path) = match value.split_once('=') {
            Some((flag, path)) if flag.starts_with('-') => (format!("{flag}="), path),
            _ => (String::new(), value),
        };
        for (mount, dir) in &self.0 {
            let mount = mount.trim_end_matches('/');
            if let Some(rest) = path.strip_prefix(mount) {
                if rest.is_empty() || rest.starts_with('/') {
                    let mapped = format!("{}{rest}", dir.display());
                    return format!("{prefix}{mapped}");
                }
            }
        }
        value.to_string()
    }
}

/// What the downward API's `fieldRef`s read.
#[derive(Clone, Debug)]
pub struct PodFields {
    pub node_name: String,
    pub host_ip: String,
    /// Known once the pod is attached (its own for a host-network pod).
    pub pod_ip: String,
}

/// One process to run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Process {
    pub container: String,
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// `securityContext.runAsUser` and `runAsGroup` (the container's, else
    /// the pod's; the group 0 when only the user is given, as an image
    /// without a group has it): the process's user and group.
    pub run_as: Option<(i64, i64)>,
}

/// The user and group a container runs as, from its security context or
/// else its pod's.
fn run_as(pod: &Pod, c: &Container) -> Result<Option<(i64, i64)>, String> {
    let pod_ctx = pod.spec.as_ref().and_then(|s| s.security_context.as_ref());
    let c_ctx = c.security_context.as_ref();
    let user = c_ctx
        .and_then(|x| x.run_as_user)
        .or(pod_ctx.and_then(|x| x.run_as_user));
    let group = c_ctx
        .and_then(|x| x.run_as_group)
        .or(pod_ctx.and_then(|x| x.run_as_group));
    for id in [user, group].into_iter().flatten() {
        if !(0..=i64::from(u32::MAX - 1)).contains(&id) {
            return Err(format!(
                "container {}: runAsUser/runAsGroup {id} is not a user or group id",
                c.name
            ));
        }
    }
    Ok(match (user, group) {
        (None, None) => None,
        (u, g) => Some((u.unwrap_or(0), g.unwrap_or(0))),
    })
}

/// A container's process with its mounts and fields. `service_env` (the
/// variables a kubelet gives for the namespace's services) comes first, so
/// the container's own variables override it; `$(NAME)` in a variable's
/// value, the command and its arguments is expanded as a kubelet does.
pub fn process(
    pod: &Pod,
    c: &Container,
    mounts: &Mounts,
    fields: &PodFields,
    service_env: &[(String, String)],
) -> Result<Process, String> {
    let mut env: Vec<(String, String)> = service_env.to_vec();
    for e in c.env.iter().flatten() {
        let value = match (&e.value, &e.value_from) {
            (Some(v), _) => mounts.map(&expand(v, &env)),
            (None, Some(from)) => {
                let field = from
                    .field_ref
                    .as_ref()
                    .map(|f| f.field_path.as_str())
                    .ok_or_else(|| {
                        format!(
                            "env {}: only fieldRef values are supported by the lab's kubelet",
                            e.name
                        )
                    })?;
                match field {
                    "spec.nodeName" => fields.node_name.clone(),
                    "status.hostIP" => fields.host_ip.clone(),
                    "status.podIP" => fields.pod_ip.clone(),
                    "metadata.name" => pod.metadata.name.clone().unwrap_or_default(),
                    "metadata.namespace" => pod.metadata.namespace.clone().unwrap_or_default(),
                    "spec.serviceAccountName" => pod
                        .spec
                        .as_ref()
                        .and_then(|s| s.service_account_name.clone())
                        .unwrap_or_default(),
                    other => {
                        return Err(format!("env {}: fieldRef {other} is not supported", e.name))
                    }
                }
            }
            (None, None) => String::new(),
        };
        env.retain(|(k, _)| *k != e.name);
        env.push((e.name.clone(), value));
    }
    let argv = crate::kubelet::command_of(c)?
        .iter()
        .map(|a| mounts.map(&expand(a, &env)))
        .collect();
    Ok(Process {
        container: c.name.clone(),
        argv,
        env,
        run_as: run_as(pod, c)?,
    })
}

/// Kubernetes' variable references: `$(NAME)` is `NAME`'s value when it
/// is defined (else left as written), `$$` is `$`.
pub fn expand(s: &str, env: &[(String, String)]) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some((name, tail)) = after
            .strip_prefix('(')
            .and_then(|a| a.find(')').map(|j| (&a[..j], &a[j + 1..])))
        {
            match env.iter().rev().find(|(k, _)| k == name) {
                Some((_, v)) => out.push_str(v),
                None => {
                    out.push_str("$(");
                    out.push_str(name);
                    out.push(')');
                }
            }
            rest = tail;
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// The variables a kubelet gives a pod for each service of its namespace
/// that has a cluster IP (`enableServiceLinks`): `NAME_SERVICE_HOST`,
/// `NAME_SERVICE_PORT` (the first port), `NAME_SERVICE_PORT_PORTNAME` and
/// Docker's link variables (`NAME_PORT=tcp://IP:PORT`, ...), the name
/// upper-cased with `-` as `_`. What lets a pod find a service without
/// cluster DNS.
pub fn service_env(services: &[Service]) -> Vec<(String, String)> {
    let mut env = Vec::new();
    for svc in services {
        let Some(spec) = &svc.spec else { continue };
        let Some(ip) = spec
            .cluster_ip
            .as_deref()
            .filter(|ip| !ip.is_empty() && *ip != "None")
        else {
            continue;
        };
        let name = svc
            .metadata
            .name
            .as_deref()
            .unwrap_or_default()
            .to_uppercase()
            .replace('-', "_");
        let ports = spec.ports.as_deref().unwrap_or_default();
        let Some(first) = ports.first() else { continue };
        env.push((format!("{name}_SERVICE_HOST"), ip.to_string()));
        env.push((format!("{name}_SERVICE_PORT"), first.port.to_string()));
        for p in ports {
            if let Some(pn) = p.name.as_deref().filter(|n| !n.is_empty()) {
                env.push((
                    format!(
                        "{name}_SERVICE_PORT_{}",
                        pn.to_uppercase().replace('-', "_")
                    ),
                    p.port.to_string(),
                ));
            }
        }
        let proto = |p: &k8s_openapi::api::core::v1::ServicePort| {
            p.protocol.as_deref().unwrap_or("TCP").to_string()
        };
        env.push((
            format!("{name}_PORT"),
            format!("{}://{ip}:{}", proto(first).to_lowercase(), first.port),
        ));
        for p in ports {
            let pr = proto(p);
            let prefix = format!("{name}_PORT_{}_{pr}", p.port);
            env.push((
                prefix.clone(),
                format!("{}://{ip}:{}", pr.to_lowercase(), p.port),
            ));
            env.push((format!("{prefix}_PROTO"), pr.to_lowercase()));
            env.push((format!("{prefix}_PORT"), p.port.to_string()));
            env.push((format!("{prefix}_ADDR"), ip.to_string()));
        }
    }
    env
}

/// A container's mounts over its pod's volume directories.
pub fn mounts(c: &Container, volumes: &BTreeMap<String, PathBuf>) -> Result<Mounts, String> {
    let mut out = Vec::new();
    for m in c.volume_mounts.iter().flatten() {
        let dir = volumes
            .get(&m.name)
            .ok_or_else(|| format!("volumeMount {}: no volume of that name", m.name))?;
        let dir = match m.sub_path.as_deref().filter(|s| !s.is_empty()) {
            Some(sub) => dir.join(sub),
            None => dir.clone(),
        };
        out.push((m.mount_path.clone(), dir));
    }
    Ok(Mounts::new(out))
}

/// Rewrites each file of `dir` whose whole value is a path under one of
/// `mounts` (a mounted ConfigMap's flag files).
pub fn map_file_values(dir: &Path, mounts: &Mounts) -> std::io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        let value = text.trim();
        if value.starts_with('/') {
            let mapped = mounts.map(value);
            if mapped != value {
                std::fs::write(&path, mapped)?;
            }
        }
    }
    Ok(())
}

/// Writes `files` (name -> bytes) into `dir`, each `0600`.
pub fn write_files(dir: &Path, files: &BTreeMap<String, Vec<u8>>) -> std::io::Result<()> {
    use std::io::Write;
    std::fs::create_dir_all(dir)?;
    for (name, bytes) in files {
        let path = dir.join(name);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        crate::lab::private_file(&path)?.write_all(bytes)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_under_mounts_are_the_volumes() {
        let m = Mounts::new(vec![
            (
                "/var/run/fibril".into(),
                "/lab/n1/host/var/run/fibril".into(),
            ),
            ("/tmp/fibril/config-map".into(), "/lab/pod/config".into()),
            ("/var".into(), "/lab/var".into()),
        ]);
        assert_eq!(
            m.map("--config-dir=/tmp/fibril/config-map"),
            "--config-dir=/lab/pod/config"
        );
        assert_eq!(
            m.map("--socket=/var/run/fibril/fibril.sock"),
            "--socket=/lab/n1/host/var/run/fibril/fibril.sock"
        );
        assert_eq!(m.map("/var/lib/x"), "/lab/var/lib/x");
        // Not a path under a mount: unchanged.
        assert_eq!(m.map("--socket=/var2/x"), "--socket=/var2/x");
        assert_eq!(m.map("--cluster-name=default"), "--cluster-name=default");
        assert_eq!(m.map("http://hubble-relay:80"), "http://hubble-relay:80");
    }

    #[test]
    fn the_nodes_bpffs_and_files_are_its_own() {
        let fs = NodeFs {
            root: "/lab/n1/host".into(),
            bpf: "/sys/fs/bpf/fibril-l-n1".into(),
            cgroup: Some("/sys/fs/cgroup/fibril-l/n1".into()),
        };
        assert_eq!(
            fs.host_path("/sys/fs/cgroup"),
            PathBuf::from("/sys/fs/cgroup/fibril-l/n1")
        );
        assert_eq!(
            fs.host_path("/sys/fs/bpf"),
            PathBuf::from("/sys/fs/bpf/fibril-l-n1")
        );
        assert_eq!(
            fs.host_path("/sys/fs/bpf/fibril"),
            PathBuf::from("/sys/fs/bpf/fibril-l-n1/fibril")
        );
        assert_eq!(
            fs.host_path("/etc/cni/net.d"),
            PathBuf::from("/lab/n1/host/etc/cni/net.d")
        );
        assert_eq!(
            fs.host_path("/sys/fs/bpfx"),
            PathBuf::from("/lab/n1/host/sys/fs/bpfx")
        );
    }

    /// A container's security context wins over its pod's; a user alone
    /// runs in group 0; an id no kernel has is refused.
    #[test]
    fn containers_run_as_their_security_context_says() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p", "namespace": "mesh"},
            "spec": {"securityContext": {"runAsUser": 1000, "runAsGroup": 2000},
                "containers": [
                    {"name": "app", "command": ["sleep", "1"]},
                    {"name": "istio-proxy", "command": ["sleep", "1"],
                     "securityContext": {"runAsUser": 1337, "runAsGroup": 1337}},
                    {"name": "user-only", "command": ["sleep", "1"], "securityContext": {"runAsUser": 7}},
                    {"name": "bad", "command": ["sleep", "1"], "securityContext": {"runAsUser": -1}}]},
        }))
        .unwrap();
        let containers = &pod.spec.as_ref().unwrap().containers;
        assert_eq!(run_as(&pod, &containers[0]).unwrap(), Some((1000, 2000)));
        assert_eq!(run_as(&pod, &containers[1]).unwrap(), Some((1337, 1337)));
        assert_eq!(run_as(&pod, &containers[2]).unwrap(), Some((7, 2000)));
        let e = run_as(&pod, &containers[3]).unwrap_err();
        assert!(e.contains("bad") && e.contains("-1"), "{e}");
        let mut plain = pod.clone();
        plain.spec.as_mut().unwrap().security_context = None;
        assert_eq!(run_as(&plain, &containers[0]).unwrap(), None);
        assert_eq!(run_as(&plain, &containers[2]).unwrap(), Some((7, 0)));
    }

    #[test]
    fn the_downward_api_fills_the_environment() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "fibril-x", "namespace": "kube-system"},
            "spec": {"containers": [{"name": "agent", "image": "ghcr.io/fibril/fibril", "command": ["sleep"], "args": ["1"],
                "env": [
                    {"name": "K8S_NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
                    {"name": "FIBRIL_NODE_ADDRESS", "valueFrom": {"fieldRef": {"fieldPath": "status.hostIP"}}},
                    {"name": "PLAIN", "value": "/tmp/fibril/config-map/x"},
                    {"name": "SECRET", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}]},
        }))
        .unwrap();
        let fields = PodFields {
            node_name: "n1".into(),
            host_ip: "10.0.0.11".into(),
            pod_ip: String::new(),
        };
        let m = Mounts::new(vec![("/tmp/fibril/config-map".into(), "/lab/cfg".into())]);
        let mut c = pod.spec.as_ref().unwrap().containers[0].clone();
        let e = process(&pod, &c, &m, &fields, &[]).unwrap_err();
        assert!(e.contains("SECRET"), "{e}");
        c.env.as_mut().unwrap().pop();
        let p = process(&pod, &c, &m, &fields, &[]).unwrap();
        assert_eq!(p.argv, ["sleep", "1"]);
        assert_eq!(
            p.env,
            [
                ("K8S_NODE_NAME".to_string(), "n1".to_string()),
                ("FIBRIL_NODE_ADDRESS".into(), "10.0.0.11".into()),
                ("PLAIN".into(), "/lab/cfg/x".into())
            ]
        );
    }

    #[test]
    fn variable_references_expand_as_a_kubelet_expands_them() {
        let env = vec![
            ("A".to_string(), "1".to_string()),
            ("B".to_string(), "two".to_string()),
        ];
        assert_eq!(expand("--x=$(A):$(B)", &env), "--x=1:two");
        assert_eq!(expand("$(C) $$(A) $ $", &env), "$(C) $(A) $ $");
        assert_eq!(expand("$(A", &env), "$(A");
    }

    #[test]
    fn services_give_their_variables_and_the_container_overrides_them() {
        let svc = |name: &str, ip: &str| -> Service {
            serde_json::from_value(serde_json::json!({
                "metadata": {"name": name},
                "spec": {"clusterIP": ip, "ports": [
                    {"name": "grpc", "port": 443, "targetPort": 4244},
                    {"name": "dns-udp", "port": 53, "protocol": "UDP"}]},
            }))
            .unwrap()
        };
        let env = service_env(&[svc("hubble-peer", "10.96.0.12"), svc("headless", "None")]);
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("HUBBLE_PEER_SERVICE_HOST"), Some("10.96.0.12"));
        assert_eq!(get("HUBBLE_PEER_SERVICE_PORT"), Some("443"));
        assert_eq!(get("HUBBLE_PEER_SERVICE_PORT_DNS_UDP"), Some("53"));
        assert_eq!(get("HUBBLE_PEER_PORT"), Some("tcp://10.96.0.12:443"));
        assert_eq!(get("HUBBLE_PEER_PORT_53_UDP_ADDR"), Some("10.96.0.12"));
        assert_eq!(get("HEADLESS_SERVICE_HOST"), None);

        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "relay", "namespace": "kube-system"},
            "spec": {"containers": [{"name": "relay", "image": "fibril/relay", "command": ["sleep"],
                "args": ["--peer=$(HUBBLE_PEER_SERVICE_HOST):$(HUBBLE_PEER_SERVICE_PORT)"],
                "env": [{"name": "HUBBLE_PEER_SERVICE_PORT", "value": "80"}]}]},
        }))
        .unwrap();
        let fields = PodFields {
            node_name: "n1".into(),
            host_ip: "10.0.0.11".into(),
            pod_ip: String::new(),
        };
        let c = pod.spec.as_ref().unwrap().containers[0].clone();
        let p = process(&pod, &c, &Mounts::default(), &fields, &env).unwrap();
        assert_eq!(p.argv, ["sleep", "--peer=10.96.0.12:80"]);
        assert_eq!(
            p.env
                .iter()
                .filter(|(k, _)| k == "HUBBLE_PEER_SERVICE_PORT")
                .count(),
            1
        );
    }
}
