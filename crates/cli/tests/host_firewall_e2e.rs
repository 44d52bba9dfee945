//! Tier 5, the host firewall on a lab's nodes (`hostFirewall:`, Cilium's
//! host policies): the corpus's demo host policy, imported as it is,
//! selects node a by its label and nothing else: the outside host reaches
//! its SSH port and not its web port (dropped in the kernel, reported as a
//! flow to `reserved:host`), the cluster (another node, a pod on another
//! node) reaches everything, node b is untouched. A host egress policy cuts
//! the node's own new connections to the world but not to the cluster; an
//! audit-mode host policy forwards and reports. The lab keeps its way in
//! (nodes are entered through their namespaces), and enforcement holds
//! across an agent restart. Needs root.

mod common;

use common::{custom_lab, eventually, Lab};
use std::time::Duration;

const LAB: &str = r#"
podCIDR: POD_CIDR_HERE
nodes: [a, b]
hostFirewall: {enabled: true}
nodeLabels:
  a: {node-access: ssh}
pods:
  - name: local
    labels: {app: local}
    command: [fibril-echo, http-server, --port, "8080"]
    node: a
  - name: client
    labels: {app: client}
    command: [fibril-echo, http-server, --port, "8080"]
    node: b
  - name: host-ssh
    hostNetwork: true
    command: [fibril-echo, http-server, --port, "22"]
    node: a
  - name: host-web
    hostNetwork: true
    command: [fibril-echo, http-server, --port, "8081"]
    node: a
  - name: host-web-b
    hostNetwork: true
    command: [fibril-echo, http-server, --port, "8081"]
    node: b
externals:
  - {name: outside, address: 198.18.20.10, command: [fibril-echo, http-server, --port, "9000"]}
"#;

/// Node a's own egress: the cluster and the lab's underlay (its etcd),
/// nothing else.
const EGRESS: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: node-egress}
spec:
  nodeSelector: {matchLabels: {node-access: ssh}}
  egress:
  - toEntities: [cluster]
  - toCIDR: [10.0.0.0/8]
"#;

/// Every node, in audit mode: only the cluster may come in.
const AUDIT: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata:
  name: nodes-audit
  annotations: {policy.fibril.io/audit-mode: "true"}
spec:
  nodeSelector: {}
  ingress:
  - fromEntities: [cluster]
"#;

fn import(lab: &Lab, name: &str, yaml: &str) {
    let file = lab.dir.join(name);
    std::fs::write(&file, yaml).unwrap();
    import_file(lab, &file);
}

fn import_file(lab: &Lab, file: &std::path::Path) {
    let out = lab.fibril(&["--node", "a", "policy", "import", file.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn delete(lab: &Lab, name: &str) {
    let out = lab.fibril(&["--node", "a", "policy", "delete", name]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn host_policies_guard_the_selected_node_and_only_it() {
    let lab = custom_lab(LAB);
    let (a, b) = (lab.node_address(0), lab.node_address(1));
    let local_ip = lab
        .endpoints()
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["pod_name"] == "local")
        .and_then(|e| e["ipv4"].as_str())
        .unwrap()
        .to_string();
    let (ssh, web, web_b) = (
        format!("http://{a}:22/"),
        format!("http://{a}:8081/"),
        format!("http://{b}:8081/"),
    );
    let from = |who: &str, url: &str| lab.http_get(who, url, "2");
    eventually("the servers up", Duration::from_secs(20), || {
        from("external/outside", &ssh)
            && from("external/outside", &web)
            && from("external/outside", &web_b)
    });

    // The corpus's demo host policy, as it is: node-access=ssh nodes take
    // the cluster, SSH from anywhere and pings.
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join(
        "../../../shared/corpus/cilium-policies/examples__policies__host__demo-host-policy.yaml",
    );
    import_file(&lab, &corpus);
    eventually(
        "the outside host cut off node a's web port",
        Duration::from_secs(10),
        || !from("external/outside", &web),
    );
    assert!(from("external/outside", &ssh), "SSH is open to the world");
    let (pinged, _) = lab.exec("external/outside", &["ping", "-c", "1", "-W", "2", &a]);
    assert!(pinged, "echo requests are allowed");
    assert!(
        from("default/client", &web),
        "a pod of another node is the cluster"
    );
    assert!(
        from("node/b", &web),
        "another node is the cluster (remote-node)"
    );
    assert!(
        from("default/local", &web),
        "the node's own pod is the cluster"
    );
    assert!(from("external/outside", &web_b), "node b is not selected");
    // What each node enforces, as `fibril status` says it.
    let status = |node: &str| {
        String::from_utf8_lossy(&lab.fibril(&["--node", node, "status"]).stdout).into_owned()
    };
    let a_status = status("a");
    assert!(
        a_status
            .contains("Host firewall: on ul0; ingress enforced by demo-host-policy; egress off"),
        "{a_status}"
    );
    let b_status = status("b");
    assert!(
        b_status.contains("Host firewall: on ul0; ingress off (no host policy)"),
        "{b_status}"
    );
    // Dropped in the kernel: the server never saw the refused requests,
    // and the drop is a flow to the host.
    let drops = lab.observe_json(&["--node", "a", "--last", "500", "--verdict", "DROPPED"]);
    let to_host = drops
        .iter()
        .find(|f| {
            f["IP"]["source"] == "198.18.20.10"
                && f["l4"]["TCP"]["destination_port"] == 8081
                && f["destination"]["labels"]
                    .as_array()
                    .is_some_and(|l| l.iter().any(|x| x == "reserved:host"))
        })
        .unwrap_or_else(|| panic!("no drop to the host: {drops:?}"));
    assert_eq!(to_host["drop_reason_desc"], "POLICY_DENIED", "{to_host}");
    assert_eq!(to_host["traffic_direction"], "INGRESS", "{to_host}");

    // The node's own egress: the world is cut for new connections, the
    // cluster is not; the lab still gets in (through the namespace).
    import(&lab, "egress.yaml", EGRESS);
    eventually(
        "node a cut off from the world",
        Duration::from_secs(10),
        || !from("node/a", "http://198.18.20.10:9000/"),
    );
    assert!(from("node/a", &web_b), "node a still reaches node b");
    assert!(
        from("node/a", &format!("http://{local_ip}:8080/")),
        "and its pod"
    );
    let (entered, _) = lab.exec("node/a", &["true"]);
    assert!(entered, "the lab enters the node whatever its policy");

    // The agent restarts: the node stays guarded (pinned links, maps).
    let out = lab.fibril(&["--node", "a", "lab", "restart-agent"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!from("external/outside", &web));
    assert!(from("external/outside", &ssh));

    // Audit mode on every node: node b forwards what it would drop and
    // says so.
    import(&lab, "audit.yaml", AUDIT);
    eventually(
        "the audit verdict on node b",
        Duration::from_secs(10),
        || {
            from("external/outside", &web_b)
                && lab
                    .observe_json(&["--node", "b", "--last", "500", "--verdict", "AUDIT"])
                    .iter()
                    .any(|f| {
                        f["IP"]["source"] == "198.18.20.10"
                            && f["l4"]["TCP"]["destination_port"] == 8081
                    })
        },
    );

    // Policies gone: everything open again.
    for p in ["demo-host-policy", "node-egress", "nodes-audit"] {
        delete(&lab, p);
    }
    eventually("node a open again", Duration::from_secs(10), || {
        from("external/outside", &web) && from("node/a", "http://198.18.20.10:9000/")
    });
}
