//! `fibril lab istio-cni`: Istio's CNI plugin (the real one, built by
//! `cargo xtask deps` from `tools/istio-cni`) installed on every node of a
//! Kubernetes lab the way Istio's `istio-cni` DaemonSet installs it in its
//! default, chained, configuration: the plugin's binary beside the node's
//! other CNI binaries, a kubeconfig for it in its run directory
//! (`/var/run/istio-cni/istio-cni-kubeconfig`, a token of the `istio-cni`
//! service account, whose ClusterRole reads pods and namespaces), and its
//! entry appended to the node's primary configuration list (any previous
//! `istio-cni` entry replaced), after Fibril's plugin: the order the seed
//! gives. From then on the lab's kubelets run the whole list for each new
//! pod (`cni_chain`).
//!
//! The lab does the installer's part because Istio's own installer reads
//! fixed container paths (its service account, `/host/opt/cni/bin`) that
//! the lab's pods, sharing this machine's filesystem, do not have; there is
//! no node agent either, so ambient pods (the plugin's `ambient_enabled`
//! with Istio's enablement selectors) cannot be started: the plugin refuses
//! their ADD, as it does on a node whose agent is down.

use std::path::PathBuf;

use anyhow::{bail, Context};
use serde_json::{json, Value};

use crate::lab;

/// The `istio.io/istio` version `tools/istio-cni` builds (checked against
/// its go.mod by a test).
pub const VERSION: &str = "v0.0.0-20260827124520-eed52ebb66ad";
/// The namespace of Istio's components (the plugin's `pod_namespace`).
const ISTIO_NAMESPACE: &str = "istio-system";
/// The plugin's run directory on a node (Istio's default).
const RUN_DIR: &str = "/var/run/istio-cni";

/// What to install.
pub struct Options {
    /// The plugin's `ambient_enabled`.
    pub ambient: bool,
    /// Namespaces the plugin leaves alone (Istio's default: kube-system).
    pub exclude_namespaces: Vec<String>,
    /// How long to wait for a node's primary configuration (Istio's
    /// installer waits for the primary CNI's before chaining into it).
    pub wait: std::time::Duration,
}

/// The plugin's binary: `FIBRIL_ISTIO_CNI`, else the cache.
pub fn plugin_binary() -> anyhow::Result<PathBuf> {
    let p = std::env::var_os("FIBRIL_ISTIO_CNI").map_or_else(
        || {
            crate::k8s::tools_cache()
                .join(format!("istio-cni-{VERSION}"))
                .join("istio-cni")
        },
        PathBuf::from,
    );
    if !p.exists() {
        bail!(
            "{} is missing: `cargo xtask deps` builds Istio's CNI plugin from the Go module proxy",
            p.display()
        );
    }
    Ok(p)
}

/// The plugin's entry in a configuration list, as Istio's installer
/// writes it (its `plugin.Config`; the list gives `cniVersion`).
pub fn plugin_entry(o: &Options) -> Value {
    json!({
        "name": "istio-cni",
        "type": "istio-cni",
        "plugin_log_level": "info",
        "cni_agent_run_dir": RUN_DIR,
        "ambient_enabled": o.ambient,
        // Istio's chart's default selectors: pods labelled
        // istio.io/dataplane-mode=ambient, or in a namespace so labelled
        // and not opted out with `none`.
        "enablement_selectors": [
            {"podSelector": {"matchLabels": {"istio.io/dataplane-mode": "ambient"}}},
            {"podSelector": {"matchExpressions": [
                {"key": "istio.io/dataplane-mode", "operator": "NotIn", "values": ["none"]}]},
             "namespaceSelector": {"matchLabels": {"istio.io/dataplane-mode": "ambient"}}},
        ],
        "exclude_namespaces": o.exclude_namespaces,
        "pod_namespace": ISTIO_NAMESPACE,
        "native_nftables": false,
        "enable_ambient_detection_retry": false,
    })
}

/// `list` with `entry` appended, a previous entry of the same type
/// removed (what Istio's installer does to the primary list).
pub fn chain_into(list: &Value, entry: &Value) -> anyhow::Result<Value> {
    let mut list = list.clone();
    let plugins = list["plugins"]
        .as_array_mut()
        .context("the primary configuration is not a list of plugins")?;
    plugins.retain(|p| p["type"] != entry["type"]);
    plugins.push(entry.clone());
    Ok(list)
}

/// The service account, its ClusterRole (the pods and namespaces the
/// plugin reads) and their binding, as Istio's chart makes them.
fn rbac() -> Value {
    json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ISTIO_NAMESPACE}},
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": "istio-cni", "namespace": ISTIO_NAMESPACE}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": "istio-cni"},
         "rules": [{"apiGroups": [""], "resources": ["pods", "nodes", "namespaces"],
                    "verbs": ["get", "list", "watch"]}]},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
         "metadata": {"name": "istio-cni"},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "istio-cni"},
         "subjects": [{"kind": "ServiceAccount", "name": "istio-cni", "namespace": ISTIO_NAMESPACE}]},
    ]})
}

/// Installs the plugin on every node of lab `lab`; a line per node.
pub fn install(lab_name: &str, o: &Options) -> anyhow::Result<Vec<String>> {
    let st = lab::load_state(lab_name)?;
    let (Some(underlay), false) = (&st.underlay_netns, st.nodes.is_empty()) else {
        bail!("lab {lab_name:?} has no Kubernetes (`kubernetes: true`): Istio's CNI plugin reads pods from the API");
    };
    let lab_dir = lab::lab_dir(lab_name);
    let k8s_dir = crate::k8s::dir(&lab_dir);
    if !k8s_dir.join("ca.crt").exists() {
        bail!("lab {lab_name:?} has no Kubernetes (`kubernetes: true`): Istio's CNI plugin reads pods from the API");
    }
    let plugin = plugin_binary()?;
    crate::k8s::apply(&lab_dir, underlay, "istio-cni-rbac", &rbac())?;
    let out = crate::k8s::kubectl(&lab_dir, underlay)?
        .args([
            "create",
            "token",
            "istio-cni",
            "-n",
            ISTIO_NAMESPACE,
            "--duration=24h",
        ])
        .output()?;
    if !out.status.success() {
        bail!(
            "a token for istio-cni: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let token = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let admin = k8s::kube::config::Kubeconfig::read_from(crate::k8s::admin_kubeconfig(&lab_dir))?;
    let server = admin
        .clusters
        .first()
        .and_then(|c| c.cluster.as_ref())
        .and_then(|c| c.server.clone())
        .context("no server in the lab's admin kubeconfig")?;
    let kubeconfig = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: local\n  cluster:\n    server: {server}\n    certificate-authority: {}\nusers:\n- name: istio-cni\n  user:\n    token: {token}\ncontexts:\n- name: istio-cni-context\n  context: {{cluster: local, user: istio-cni}}\ncurrent-context: istio-cni-context\n",
        k8s_dir.join("ca.crt").display()
    );
    let entry = plugin_entry(o);
    let mut lines = Vec::new();
    for node in &st.nodes {
        let fs = lab::node_fs(lab_name, &node.name);
        let deadline = std::time::Instant::now() + o.wait;
        let list_path = loop {
            if let Some(p) = fs.cni_conflist() {
                break p;
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "node {}: no CNI configuration list in its /etc/cni/net.d after {:?} (Istio chains after the primary plugin: install Fibril first)",
                    node.name,
                    o.wait
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(250));
        };
        // The binary, copied beside and renamed: a runtime never runs half
        // of one.
        let bin = fs.host_path("/opt/cni/bin");
        std::fs::create_dir_all(&bin)?;
        std::fs::copy(&plugin, bin.join(".istio-cni.tmp"))?;
        std::fs::rename(bin.join(".istio-cni.tmp"), bin.join("istio-cni"))?;
        let run_dir = fs.host_path(RUN_DIR);
        std::fs::create_dir_all(&run_dir)?;
        {
            use std::io::Write;
            lab::private_file(&run_dir.join("istio-cni-kubeconfig"))?
                .write_all(kubeconfig.as_bytes())?;
        }
        let text = std::fs::read_to_string(&list_path)?;
        let list: Value = serde_json::from_str(&text)
            .with_context(|| format!("{} is not JSON", list_path.display()))?;
        let chained = chain_into(&list, &entry)
            .with_context(|| format!("node {}: {}", node.name, list_path.display()))?;
        let tmp = list_path.with_file_name(".istio-cni-conflist.tmp");
        std::fs::write(&tmp, serde_json::to_string_pretty(&chained)?)?;
        std::fs::rename(&tmp, &list_path)?;
        let types: Vec<&str> = chained["plugins"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| p["type"].as_str())
            .collect();
        lines.push(format!(
            "node {}: {} now chains {}",
            node.name,
            list_path.file_name().unwrap_or_default().to_string_lossy(),
            types.join(" -> ")
        ));
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_version_is_the_one_tools_istio_cni_builds() {
        let go_mod = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools/istio-cni/go.mod"),
        )
        .unwrap();
        assert!(
            go_mod.contains(&format!("istio.io/istio {VERSION}")),
            "tools/istio-cni/go.mod requires another istio.io/istio than {VERSION}"
        );
    }

    #[test]
    fn chaining_appends_after_the_primary_and_replaces_an_old_entry() {
        let o = Options {
            ambient: false,
            exclude_namespaces: vec!["kube-system".into()],
            wait: std::time::Duration::ZERO,
        };
        let list = json!({"cniVersion": "1.1.0", "name": "fibril", "plugins": [
            {"type": "fibril-cni", "agentSocket": "/var/run/fibril/fibril.sock"},
            {"type": "istio-cni", "ambient_enabled": true}]});
        let chained = chain_into(&list, &plugin_entry(&o)).unwrap();
        let plugins = chained["plugins"].as_array().unwrap();
        assert_eq!(plugins.len(), 2);
        assert_eq!(plugins[0], list["plugins"][0], "Fibril's entry untouched");
        assert_eq!(plugins[1]["type"], "istio-cni");
        assert_eq!(
            plugins[1]["ambient_enabled"], false,
            "the old entry replaced"
        );
        assert_eq!(chained["cniVersion"], "1.1.0");
        assert!(chain_into(&json!({"type": "fibril-cni"}), &plugin_entry(&o)).is_err());
    }
}
