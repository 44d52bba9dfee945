//! Tier 5, a lab's Kubernetes control plane (`kubernetes: true`): the real
//! kube-apiserver, kube-controller-manager and kube-scheduler (built from
//! `tools/kubernetes` by `cargo xtask deps`) on the lab's etcd, reached
//! through `fibril lab kubectl`. The first slice of the Kubernetes mode: the
//! API serves, objects are kept, and the controllers act on them (a
//! Deployment gets its ReplicaSet and pods). Needs root.

mod common;

use common::{custom_lab, wait_until};

const LAB: &str = r#"
podCIDR: POD_CIDR_HERE
nodes: [n1, n2]
kubernetes: true
pods:
- {name: client, labels: {app: client}, node: n1}
"#;

#[test]
fn the_lab_runs_a_real_control_plane_that_kubectl_reaches() {
    let lab = custom_lab(LAB);
    let kubectl = |args: &[&str]| {
        let out = lab.fibril(&[&["lab", "kubectl", "--"], args].concat());
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // The admin's kubeconfig is where `lab up` prints it is.
    let kubeconfig = format!("/run/fibril/labs/{}/kubernetes/admin.kubeconfig", lab.name);
    assert!(std::path::Path::new(&kubeconfig).exists());
    let (ok, ready, err) = kubectl(&["get", "--raw", "/readyz"]);
    assert!(ok && ready.trim() == "ok", "{ready} {err}");
    let (ok, version, err) = kubectl(&["version", "-o", "json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&version).unwrap();
    assert_eq!(v["serverVersion"]["gitVersion"], "v1.37.2", "{version}");
    let (ok, namespaces, err) = kubectl(&["get", "namespaces", "-o", "name"]);
    assert!(ok, "{err}");
    for ns in ["namespace/default", "namespace/kube-system"] {
        assert!(namespaces.lines().any(|l| l == ns), "{namespaces}");
    }

    // The lab's nodes are Node objects with their pod CIDRs (the /24
    // halves) and underlay addresses.
    let (ok, nodes, err) = kubectl(&["get", "nodes", "-o", "json"]);
    assert!(ok, "{err}");
    let nodes: serde_json::Value = serde_json::from_str(&nodes).unwrap();
    let found: Vec<(String, String, String)> = nodes["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|n| {
            let ip = n["status"]["addresses"]
                .as_array()
                .and_then(|a| a.iter().find(|a| a["type"] == "InternalIP"))
                .and_then(|a| a["address"].as_str())
                .unwrap_or_default();
            (
                n["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                n["spec"]["podCIDRs"][0]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                ip.to_string(),
            )
        })
        .collect();
    let cidr = |host: u8| format!("{}/25", lab.ip(host));
    assert_eq!(found.len(), 2, "{found:?}");
    assert_eq!((found[0].0.as_str(), found[0].1.clone()), ("n1", cidr(0)));
    assert_eq!((found[1].0.as_str(), found[1].1.clone()), ("n2", cidr(128)));
    assert!(
        found.iter().all(|n| n.2.starts_with("10.201.")),
        "{found:?}"
    );

    // An object is kept (in the lab's etcd) and read back.
    let dir = std::env::temp_dir().join(format!("fibril-k8s-{}", lab.name));
    std::fs::create_dir_all(&dir).unwrap();
    let manifest = dir.join("web.yaml");
    std::fs::write(
        &manifest,
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: default}\nspec:\n  replicas: 2\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec:\n      containers: [{name: web, image: fibril/echo}]\n",
    )
    .unwrap();
    let (ok, applied, err) = kubectl(&["apply", "-f", manifest.to_str().unwrap()]);
    assert!(ok, "{err}");
    assert!(applied.contains("deployment.apps/web created"), "{applied}");
    // The controller-manager acts on it: a ReplicaSet, then its two pods
    // (Pending: no node runs a kubelet yet).
    wait_until("the deployment's two pods", || {
        let (ok, pods, _) = kubectl(&["get", "pods", "-l", "app=web", "-o", "name"]);
        ok && pods.lines().count() == 2
    });
    let (ok, rs, err) = kubectl(&["get", "replicasets", "-l", "app=web", "-o", "name"]);
    assert!(ok && rs.lines().count() == 1, "{rs} {err}");
    // A bad object is refused with the field named, and nothing is made.
    let (ok, _, err) = kubectl(&["create", "deployment", "Bad_Name", "--image=x"]);
    assert!(!ok && err.contains("Bad_Name"), "{err}");
    std::fs::remove_dir_all(&dir).ok();

    // Nothing of the control plane outlives the lab.
    let pids: Vec<u32> = {
        let st: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(format!("/run/fibril/labs/{}/lab.json", lab.name)).unwrap(),
        )
        .unwrap();
        st["kubernetes_pids"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|p| p.as_u64())
            .map(|p| p as u32)
            .collect()
    };
    assert_eq!(pids.len(), 3, "apiserver, controller-manager, scheduler");
    drop(lab);
    for pid in pids {
        // Gone, or a zombie (this machine's init may not reap).
        let running =
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| !s.contains(") Z "));
        assert!(!running, "control-plane process {pid} outlived the lab");
    }
}
