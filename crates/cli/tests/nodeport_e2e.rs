//! Tier 5, kube-proxy replacement on a lab's nodes
//! (`kubeProxyReplacement: true`, no kube-proxy): a NodePort service
//! answers from outside the cluster on every node's address, its backends
//! on both nodes (a backend on the other node answers through the node the
//! client asked, from whose address the connection came: source NAT in
//! BPF, no netfilter rule; a local one sees the client's own address);
//! `externalTrafficPolicy: Local` keeps the client's address and this
//! node's backends only; pods and the node's own processes reach node
//! ports too; flows name the service. Needs root.

mod common;

use common::{custom_lab, eventually, Lab};
use std::time::Duration;

const LAB: &str = r#"
podCIDR: POD_CIDR_HERE
nodes: [a, b]
kubeProxyReplacement: true
maglevTableSize: 1021
pods:
  - name: web-a
    labels: {app: web}
    command: [fibril-echo, http-server, --port, "8080"]
    node: a
  - name: web-b
    labels: {app: web}
    command: [fibril-echo, http-server, --port, "8080"]
    node: b
  - name: client
    node: b
services:
  - name: web
    type: NodePort
    selector: {app: web}
    ports: [{port: 80, targetPort: 8080, nodePort: 30080}]
  - name: web-local
    type: NodePort
    externalTrafficPolicy: Local
    selector: {app: web}
    ports: [{port: 81, targetPort: 8080, nodePort: 30081}]
externals:
  - {name: outside, address: 198.18.20.10, command: [fibril-echo, http-server, --port, "9000"]}
"#;

/// The peers a pod's server accepted connections from, in order.
fn peers(lab: &Lab, pod: &str) -> Vec<String> {
    lab.log(pod)
        .lines()
        .filter_map(|l| l.split("accepted ").nth(1))
        .map(|p| p.rsplit_once(':').map_or(p, |(ip, _)| ip).to_string())
        .collect()
}

#[test]
fn node_ports_answer_from_outside_without_kube_proxy() {
    let lab = custom_lab(LAB);
    let (a, b) = (lab.node_address(0), lab.node_address(1));
    let from_outside = |url: &str| lab.http_get("external/outside", url, "3");
    eventually("node a's node port", Duration::from_secs(20), || {
        from_outside(&format!("http://{a}:30080/"))
    });

    // Externals, through node a: both backends serve; node b's sees node
    // a's address (masqueraded, so it answers through a), node a's own
    // the client's.
    let (before_a, before_b) = (
        peers(&lab, "default/web-a").len(),
        peers(&lab, "default/web-b").len(),
    );
    for _ in 0..24 {
        assert!(from_outside(&format!("http://{a}:30080/")));
    }
    let (got_a, got_b) = (
        peers(&lab, "default/web-a")[before_a..].to_vec(),
        peers(&lab, "default/web-b")[before_b..].to_vec(),
    );
    assert_eq!(got_a.len() + got_b.len(), 24, "{got_a:?} {got_b:?}");
    assert!(
        !got_a.is_empty() && !got_b.is_empty(),
        "Maglev spreads: {got_a:?} {got_b:?}"
    );
    assert!(got_a.iter().all(|p| p == "198.18.20.10"), "{got_a:?}");
    assert!(got_b.iter().all(|p| *p == a), "{got_b:?}");
    // The source NAT is the datapath's: the node has no netfilter NAT
    // (whose conntrack every packet of the node and its pods would pay).
    let (listed, rules) = lab.exec("node/a", &["nft", "list", "ruleset"]);
    assert!(listed, "nft list ruleset");
    assert!(
        !rules.contains("masquerade") && !rules.contains(" nat "),
        "{rules}"
    );
    let status =
        String::from_utf8_lossy(&lab.fibril(&["--node", "a", "status"]).stdout).into_owned();
    assert!(
        status.contains("KubeProxyReplacement: on ul0") && status.contains("Maglev table 1021"),
        "{status}"
    );
    // And through node b.
    assert!(from_outside(&format!("http://{b}:30080/")));

    // externalTrafficPolicy: Local: the receiving node's backend only,
    // with the client's address.
    for (node, pod, other) in [
        (&a, "default/web-a", "default/web-b"),
        (&b, "default/web-b", "default/web-a"),
    ] {
        let (mine, theirs) = (peers(&lab, pod).len(), peers(&lab, other).len());
        for _ in 0..6 {
            assert!(from_outside(&format!("http://{node}:30081/")));
        }
        let got = peers(&lab, pod)[mine..].to_vec();
        assert_eq!(got, vec!["198.18.20.10".to_string(); 6], "{pod}");
        assert_eq!(peers(&lab, other).len(), theirs, "{other} got none");
    }

    // A pod of another node, and node a's own processes (socket LB),
    // reach node ports too, whichever backend Maglev picks (a reply from
    // node a's own backend leaves by its device, not the tunnel, to get
    // the node port's address back).
    let (before_a, before_b) = (
        peers(&lab, "default/web-a").len(),
        peers(&lab, "default/web-b").len(),
    );
    for _ in 0..12 {
        assert!(lab.http_get("default/client", &format!("http://{a}:30080/"), "3"));
    }
    assert!(
        peers(&lab, "default/web-a").len() > before_a
            && peers(&lab, "default/web-b").len() > before_b
    );
    for _ in 0..4 {
        assert!(lab.http_get("node/a", &format!("http://{a}:30080/"), "3"));
    }

    // Flows name the service the externals asked for.
    eventually("flows to the service", Duration::from_secs(10), || {
        !lab.observe_json(&[
            "--node",
            "a",
            "--last",
            "1000",
            "--to-service",
            "default/web",
        ])
        .is_empty()
    });
}
