//! Tier 5, a lab's Kubernetes control plane (`kubernetes: true`): the real
//! kube-apiserver, kube-controller-manager and kube-scheduler (built from
//! `tools/kubernetes` by `cargo xtask deps`) on the lab's etcd, reached
//! through `fibril lab kubectl`. The first slice of the Kubernetes mode: the
//! API serves, objects are kept, and the controllers act on them (a
//! Deployment gets its ReplicaSet and pods). Needs root.

mod common;

use std::time::Duration;

use common::{custom_lab, eventually, wait_until};

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
    let kubectl = |args: &[&str]| lab.kubectl(args);
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
    let (ok, applied, err) = lab.apply(
        "web",
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: web, namespace: default}\nspec:\n  replicas: 2\n  selector: {matchLabels: {app: web}}\n  template:\n    metadata: {labels: {app: web}}\n    spec:\n      containers: [{name: web, image: fibril/echo}]\n",
    );
    assert!(ok, "{err}");
    assert!(applied.contains("deployment.apps/web created"), "{applied}");
    // The controller-manager acts on it (a ReplicaSet, its two pods), the
    // scheduler binds them to the lab's nodes, and each node's kubelet runs
    // them with Fibril's networking: Running, Ready, with an address from
    // their node's pod CIDR.
    eventually(
        "the deployment's two pods running",
        Duration::from_secs(60),
        || {
            let (ok, pods, _) = kubectl(&["get", "pods", "-l", "app=web", "-o", "json"]);
            let v: serde_json::Value = serde_json::from_str(&pods).unwrap_or_default();
            let items = v["items"].as_array().cloned().unwrap_or_default();
            ok && items.len() == 2
                && items
                    .iter()
                    .all(|p| p["status"]["phase"] == "Running" && p["status"]["podIP"].is_string())
        },
    );
    let (_, pods, _) = kubectl(&["get", "pods", "-l", "app=web", "-o", "json"]);
    let v: serde_json::Value = serde_json::from_str(&pods).unwrap();
    for p in v["items"].as_array().unwrap() {
        let node = p["spec"]["nodeName"].as_str().unwrap();
        let ip: std::net::Ipv4Addr = p["status"]["podIP"].as_str().unwrap().parse().unwrap();
        let cidr: ipnet::Ipv4Net = match node {
            "n1" => cidr(0),
            _ => cidr(128),
        }
        .parse()
        .unwrap();
        assert!(cidr.contains(&ip), "{ip} outside {node}'s {cidr}");
        let ready = p["status"]["conditions"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True");
        assert!(ready, "{p}");
        // And it serves: the lab's client reaches it over Fibril's datapath.
        let url = format!("http://{ip}:8080/");
        assert!(lab.http_get("default/client", &url, "3"), "client -> {url}");
    }
    // A Service over the deployment: each node's agent follows it and its
    // EndpointSlice (the controller-manager's) into its load balancer; the
    // client reaches both pods through the cluster IP, one of them on the
    // other node (the overlay).
    let (ok, _, err) = lab.apply(
        "web-svc",
        "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec:\n  clusterIP: 10.96.0.80\n  selector: {app: web}\n  ports: [{name: http, port: 80, targetPort: 8080}]\n",
    );
    assert!(ok, "{err}");
    let service_list = |node: &str| {
        let out = lab.fibril(&["--node", node, "service", "list"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    eventually("both nodes balancing web", Duration::from_secs(30), || {
        ["n1", "n2"].iter().all(|n| {
            service_list(n)
                .lines()
                .any(|l| l.contains("10.96.0.80:80/TCP") && l.matches("(active)").count() == 2)
        })
    });
    // The API server's own service, from its EndpointSlice.
    assert!(service_list("n1").contains("default/kubernetes"));
    for _ in 0..6 {
        assert!(lab.http_get("default/client", "http://10.96.0.80/", "3"));
    }
    // `kubectl label` moves a pod to the identity of its new labels on
    // every node: its own (the endpoint) and the other (the ipcache).
    let first = &v["items"][0];
    let (pod, ip) = (
        first["metadata"]["name"].as_str().unwrap().to_string(),
        first["status"]["podIP"].as_str().unwrap().to_string(),
    );
    let identity_on = |node: &str| {
        // From the pod's address to itself: each node's own view of it.
        let out = lab.fibril(&[
            "--node", node, "policy", "trace", "--from", &ip, "--to", &ip, "--port", "80",
        ]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.split("(identity ")
            .nth(1)
            .and_then(|r| r.split(')').next())
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or_else(|| panic!("no identity in {text}"))
    };
    let before = (identity_on("n1"), identity_on("n2"));
    assert_eq!(before.0, before.1, "both nodes agree on {pod}'s identity");
    let (ok, _, err) = kubectl(&["label", "pod", &pod, "tier=front"]);
    assert!(ok, "{err}");
    eventually(
        "the new identity on both nodes",
        Duration::from_secs(10),
        || {
            let now = (identity_on("n1"), identity_on("n2"));
            now.0 == now.1 && now.0 != before.0
        },
    );
    let identities = lab.fibril(&["--node", "n2", "identity", "list"]);
    let identities = String::from_utf8_lossy(&identities.stdout);
    assert!(identities.contains("k8s:tier=front"), "{identities}");
    // Scaled to zero: the pods go, and with them their namespaces.
    let (ok, _, err) = kubectl(&["scale", "deployment", "web", "--replicas=0"]);
    assert!(ok, "{err}");
    eventually("the pods removed", Duration::from_secs(30), || {
        let (ok, pods, _) = kubectl(&["get", "pods", "-l", "app=web", "-o", "name"]);
        ok && pods.trim().is_empty()
    });
    let eps = lab.fibril(&["--node", "n1", "endpoint", "list"]);
    assert!(
        !String::from_utf8_lossy(&eps.stdout).contains("web-"),
        "endpoints outlived their pods"
    );
    // The service lost its backends with them: refused in the kernel.
    eventually("web without backends", Duration::from_secs(30), || {
        service_list("n1")
            .lines()
            .any(|l| l.contains("10.96.0.80:80/TCP") && l.contains("(none)"))
    });
    assert!(!lab.http_get("default/client", "http://10.96.0.80/", "1"));
    let (ok, rs, err) = kubectl(&["get", "replicasets", "-l", "app=web", "-o", "name"]);
    assert!(ok && rs.lines().count() == 1, "{rs} {err}");
    // A bad object is refused with the field named, and nothing is made.
    let (ok, _, err) = kubectl(&["create", "deployment", "Bad_Name", "--image=x"]);
    assert!(!ok && err.contains("Bad_Name"), "{err}");
    // A pod whose init container fails is reported and tried again; every
    // try undoes its network (a leaked endpoint per try before).
    let (ok, _, err) = lab.apply(
        "initfail",
        "apiVersion: v1\nkind: Pod\nmetadata: {name: initfail, namespace: default}\nspec:\n  nodeName: n1\n  initContainers: [{name: setup, image: busybox, command: [\"false\"]}]\n  containers: [{name: web, image: fibril/echo}]\n",
    );
    assert!(ok, "{err}");
    eventually(
        "the init container's failure reported",
        Duration::from_secs(20),
        || {
            let (_, pod, _) = kubectl(&["get", "pod", "initfail", "-o", "json"]);
            pod.contains("init container setup exited")
        },
    );
    // Between tries it has no endpoint (one stayed behind before): seen
    // in none of three looks, as a try's own endpoint lives milliseconds.
    std::thread::sleep(Duration::from_secs(3));
    let mut seen = Vec::new();
    for _ in 0..3 {
        let eps = lab.fibril(&["--node", "n1", "endpoint", "list"]);
        let eps = String::from_utf8_lossy(&eps.stdout).to_string();
        if eps.contains("default/initfail") {
            seen.push(eps);
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    assert!(
        seen.len() < 3,
        "a failed try's endpoint stayed:\n{}",
        seen[0]
    );
    let (ok, _, err) = kubectl(&["delete", "pod", "initfail", "--wait=false"]);
    assert!(ok, "{err}");

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

const POLICY_LAB: &str = r#"
podCIDR: POD_CIDR_HERE
nodes: [n1, n2]
kubernetes: true
namespaces:
- name: shop
pods:
- {name: client, namespace: shop, labels: {app: client}, node: n1}
- {name: other, namespace: shop, labels: {app: other}, node: n1}
- {name: web, namespace: shop, labels: {app: web}, node: n2, command: [fibril-echo, http-server, --port, "8080"]}
"#;

const WEB_FROM_CLIENT: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web-from-client, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: web}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: client}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"#;

/// Policies are the API server's objects: applied with kubectl, enforced
/// in every node's kernel, reported in their status, refused at apply by
/// the CRD's schema, and followed across an apiserver restart.
#[test]
fn policies_applied_with_kubectl_are_enforced_in_the_kernel() {
    let lab = custom_lab(POLICY_LAB);
    let dir = std::env::temp_dir().join(format!("fibril-k8s-{}", lab.name));
    std::fs::create_dir_all(&dir).unwrap();
    let kubectl_in = |args: &[&str], stdin: Option<&str>| {
        let file = stdin.map(|text| {
            let f = dir.join(format!("m{}.yaml", rand_suffix()));
            std::fs::write(&f, text).unwrap();
            f
        });
        let mut all: Vec<&str> = vec!["lab", "kubectl", "--"];
        all.extend(args);
        if let Some(f) = &file {
            all.extend(["-f", f.to_str().unwrap()]);
        }
        let out = lab.fibril(&all);
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let kubectl = |args: &[&str]| kubectl_in(args, None);
    let apply = |yaml: &str| kubectl_in(&["apply"], Some(yaml));
    let web = format!("http://{}:8080/", lab.ip(130));
    let reaches = |from: &str| lab.http_get(&format!("shop/{from}"), &web, "2");

    // Each node's agent follows the API server.
    for node in ["n1", "n2"] {
        // `lab up` returned once both agents followed the API server.
        let out = lab.fibril(&["--node", node, "status"]);
        let status = String::from_utf8_lossy(&out.stdout);
        assert!(
            status.contains("Kubernetes:    connected"),
            "{node}: {status}"
        );
    }
    // Its CRDs are installed, with short names.
    let (ok, crds, err) = kubectl(&["get", "crd", "-o", "name"]);
    assert!(
        ok && crds.contains("ciliumnetworkpolicies.cilium.io"),
        "{crds} {err}"
    );
    assert!(reaches("client") && reaches("other"), "no policy: open");
    // A local import is refused: the API server is the source.
    let file = dir.join("local.yaml");
    std::fs::write(&file, WEB_FROM_CLIENT).unwrap();
    let local = lab.fibril(&["--node", "n1", "policy", "import", file.to_str().unwrap()]);
    assert!(!local.status.success());
    assert!(String::from_utf8_lossy(&local.stderr).contains("kubectl apply"));

    let (ok, out, err) = apply(WEB_FROM_CLIENT);
    assert!(ok, "{out} {err}");
    wait_until("the policy to drop other -> web", || !reaches("other"));
    assert!(reaches("client"), "the allowed peer still reaches web");
    // The drop is the kernel's, on web's node, attributed to the policy.
    let drops = lab.observe_json(&[
        "--node",
        "n2",
        "--verdict",
        "DROPPED",
        "--from-pod",
        "shop/other",
    ]);
    assert!(!drops.is_empty(), "no drop flow on n2");

    // The troubleshooting commands: listed, and each node's view in the
    // status (`kubectl describe` shows it).
    // CRD mode (the lab sets no kvstore): the cross-node decision above
    // came from the API's objects. Identities by number with their labels,
    // an endpoint per pod with its identity and node, a node per node.
    let (ok, ids, err) = kubectl(&["get", "ciliumidentities", "-o", "json"]);
    assert!(ok, "{err}");
    let ids: serde_json::Value = serde_json::from_str(&ids).unwrap();
    let web_id = ids["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["security-labels"]["k8s:app"] == "web")
        .and_then(|i| i["metadata"]["name"].as_str())
        .expect("web's CiliumIdentity")
        .to_string();
    let (ok, cep, err) = kubectl(&["get", "ciliumendpoint", "-n", "shop", "web", "-o", "json"]);
    assert!(ok, "{err}");
    let cep: serde_json::Value = serde_json::from_str(&cep).unwrap();
    assert_eq!(cep["status"]["identity"]["id"].to_string(), web_id);
    assert_eq!(
        cep["status"]["networking"]["addressing"][0]["ipv4"],
        lab.ip(130)
    );
    let (ok, nodes, err) = kubectl(&["get", "ciliumnodes", "-o", "name"]);
    assert!(ok && nodes.lines().count() == 2, "{nodes}{err}");
    let (ok, list, err) = kubectl(&["get", "ciliumnetworkpolicies", "-A"]);
    assert!(
        ok && list.contains("web-from-client") && list.contains("shop"),
        "{list} {err}"
    );
    wait_until("both nodes' status", || {
        let (_, json, _) = kubectl(&["get", "cnp", "-n", "shop", "web-from-client", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap_or_default();
        ["n1", "n2"]
            .iter()
            .all(|n| v["status"]["nodes"][n]["enforcing"] == true)
            && v["status"]["conditions"][0]["status"] == "True"
    });
    let (ok, described, err) = kubectl(&[
        "describe",
        "ciliumnetworkpolicy",
        "web-from-client",
        "-n",
        "shop",
    ]);
    let enforcing = described
        .lines()
        .filter(|l| l.trim_start().starts_with("Enforcing:") && l.trim_end().ends_with("true"))
        .count();
    assert!(
        ok && enforcing == 2 && described.contains("n2:"),
        "{described} {err}"
    );

    // A NetworkPolicy of the same namespace and name is another policy:
    // its deletion leaves the CiliumNetworkPolicy in force.
    let knp = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web-from-client, namespace: shop}\nspec:\n  podSelector: {matchLabels: {app: web}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: client}}}]\n";
    let (ok, _, err) = apply(knp);
    assert!(ok, "{err}");
    eventually(
        "both policies on web's node",
        Duration::from_secs(10),
        || {
            let out = lab.fibril(&["--node", "n2", "policy", "get"]);
            String::from_utf8_lossy(&out.stdout)
                .matches("web-from-client")
                .count()
                >= 2
        },
    );
    let (ok, _, err) = kubectl(&["delete", "networkpolicy", "-n", "shop", "web-from-client"]);
    assert!(ok, "{err}");
    eventually("the NetworkPolicy gone", Duration::from_secs(10), || {
        let out = lab.fibril(&["--node", "n2", "policy", "get"]);
        String::from_utf8_lossy(&out.stdout)
            .matches("web-from-client")
            .count()
            == 1
    });
    assert!(
        !reaches("other") && reaches("client"),
        "the CiliumNetworkPolicy stays in force"
    );

    // The CRD's schema refuses at apply what Cilium's refuses, naming the
    // field; nothing is created.
    let (ok, _, err) = apply(
        &WEB_FROM_CLIENT
            .replace("web-from-client", "bad-port")
            .replace("\"8080\"", "\"70000\""),
    );
    assert!(
        !ok && err.contains("spec.ingress[0].toPorts[0].ports[0].port"),
        "{err}"
    );
    let (ok, _, err) = apply(
        &WEB_FROM_CLIENT
            .replace("web-from-client", "bad-proto")
            .replace("TCP", "TPC"),
    );
    assert!(
        !ok && err.contains("protocol") && err.contains("TPC"),
        "{err}"
    );
    let (ok, _, err) = apply(
        &WEB_FROM_CLIENT
            .replace("web-from-client", "bad-field")
            .replace("fromEndpoints", "fromEndpoint"),
    );
    assert!(!ok && err.contains("fromEndpoint"), "{err}");
    let (_, names, _) = kubectl(&["get", "cnp", "-n", "shop", "-o", "name"]);
    assert_eq!(
        names.trim(),
        "ciliumnetworkpolicy.cilium.io/web-from-client"
    );

    // What only the agents validate passes the schema and is reported in
    // the status by every node: not valid, with the field and why.
    let fqdn_and_endpoints = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: mixed-peers, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: client}}
  egress:
  - toFQDNs: [{matchName: example.com}]
    toEndpoints: [{matchLabels: {app: web}}]
"#;
    let (ok, _, err) = apply(fqdn_and_endpoints);
    assert!(ok, "{err}");
    wait_until("the agents' validation in the status", || {
        let (_, json, _) = kubectl(&["get", "cnp", "-n", "shop", "mixed-peers", "-o", "json"]);
        let v: serde_json::Value = serde_json::from_str(&json).unwrap_or_default();
        ["n1", "n2"].iter().all(|n| {
            v["status"]["nodes"][n]["ok"] == false
                && v["status"]["nodes"][n]["error"]
                    .as_str()
                    .is_some_and(|e| e.contains("spec.egress[0]"))
        }) && v["status"]["conditions"][0]["status"] == "False"
    });
    // and not in force: client still reaches web.
    assert!(reaches("client"));
    let (ok, _, _) = kubectl(&["delete", "cnp", "-n", "shop", "mixed-peers"]);
    assert!(ok);

    // The API server goes away and comes back: the datapath kept
    // enforcing, and an update made right after it is back (while the
    // watches are still in their backoff) is not lost.
    let out = lab.fibril(&["lab", "stop-apiserver"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !reaches("other") && reaches("client"),
        "enforced while the API server is away"
    );
    let out = lab.fibril(&["lab", "start-apiserver"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let widened = WEB_FROM_CLIENT.replace(
        "matchLabels: {app: client}",
        "matchExpressions: [{key: app, operator: In, values: [client, other]}]",
    );
    let (ok, _, err) = apply(&widened);
    assert!(ok, "{err}");
    wait_until("the update after the restart", || reaches("other"));

    // Deleted with kubectl: gone from every node.
    let (ok, _, err) = apply(WEB_FROM_CLIENT);
    assert!(ok, "{err}");
    wait_until("the narrowed policy again", || !reaches("other"));
    let (ok, _, err) = kubectl(&["delete", "cnp", "-n", "shop", "web-from-client"]);
    assert!(ok, "{err}");
    wait_until("the policy's removal", || reaches("other"));
    // Every node follows, the one without web too (its watch came back
    // after the restart as well).
    for node in ["n1", "n2"] {
        eventually(
            &format!("{node} without the policy"),
            Duration::from_secs(10),
            || {
                let out = lab.fibril(&["--node", node, "policy", "get"]);
                !String::from_utf8_lossy(&out.stdout).contains("web-from-client")
            },
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

/// The CRD's schema refuses nothing Fibril accepts: every policy of the
/// shared corpus that `fibril policy validate` loads is accepted by the
/// real API server (a server-side dry run against the installed CRDs),
/// apart from documents the API server refuses for Cilium too (a
/// top-level `description`, which is no field of the CRD).
#[test]
fn the_crd_schema_accepts_every_valid_corpus_policy() {
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../../shared/corpus/cilium-policies");
    let lab = custom_lab("podCIDR: POD_CIDR_HERE\nnodes: [n1]\nkubernetes: true\npods: []\n");
    // The agent installs the CRDs.
    eventually("the CRDs", Duration::from_secs(30), || {
        let out = lab.fibril(&[
            "lab",
            "kubectl",
            "--",
            "get",
            "crd",
            "ciliumnetworkpolicies.cilium.io",
        ]);
        out.status.success()
    });
    let mut items = Vec::new();
    let mut files: Vec<_> = std::fs::read_dir(&corpus)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    files.sort();
    for path in files
        .iter()
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
    {
        let text = std::fs::read_to_string(path).unwrap();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let Ok(parsed) = policy::parse(&name, &text, "default") else {
            continue;
        };
        if parsed.policies.is_empty() {
            continue;
        }
        let Ok(docs) = serde_saphyr::from_multiple::<serde_json::Value>(&text) else {
            continue;
        };
        for (i, mut doc) in docs.into_iter().enumerate() {
            let cilium = doc["apiVersion"] == "cilium.io/v2"
                && (doc["kind"] == "CiliumNetworkPolicy"
                    || doc["kind"] == "CiliumClusterwideNetworkPolicy");
            // What the API server refuses for Cilium too: a top-level
            // `description` or an unknown metadata field (no field of the
            // CRD or of ObjectMeta), and Cilium 1.13's `auth` (the current
            // CRD has `authentication`; a file import reads it, warning).
            let known_meta = ["name", "namespace", "labels", "annotations"];
            let odd_meta = doc["metadata"]
                .as_object()
                .is_some_and(|m| m.keys().any(|k| !known_meta.contains(&k.as_str())));
            let legacy_auth = doc.to_string().contains("\"auth\":");
            if !cilium || doc.get("description").is_some() || odd_meta || legacy_auth {
                continue;
            }
            // Unique names, one namespace that exists.
            doc["metadata"]["name"] = format!("c{}-{i}", items.len()).into();
            if doc["kind"] == "CiliumNetworkPolicy" {
                doc["metadata"]["namespace"] = "default".into();
            }
            items.push((format!("{name} document {}", i + 1), doc));
        }
    }
    assert!(
        items.len() > 100,
        "only {} corpus policies found",
        items.len()
    );
    let dir = std::env::temp_dir().join(format!("fibril-k8s-corpus-{}", lab.name));
    std::fs::create_dir_all(&dir).unwrap();
    let mut refused = Vec::new();
    for (what, doc) in &items {
        let f = dir.join("doc.json");
        std::fs::write(&f, doc.to_string()).unwrap();
        let out = lab.fibril(&[
            "lab",
            "kubectl",
            "--",
            "apply",
            "--dry-run=server",
            "-f",
            f.to_str().unwrap(),
        ]);
        if !out.status.success() {
            refused.push(format!(
                "{what}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
    }
    std::fs::remove_dir_all(&dir).ok();
    assert!(
        refused.is_empty(),
        "the CRD refuses valid policies:\n{}",
        refused.join("\n")
    );
}
