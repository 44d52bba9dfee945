//! Fibril beside the real kube-proxy (built from `tools/kubernetes`), the
//! seed's `kubeProxyReplacement=false`: a pod's connection to a cluster IP
//! is translated once, by Fibril at the pod's veth, and never reaches
//! kube-proxy's rules (no double NAT; policy sees the client and backend
//! pods as themselves), while a host-network client without socket LB is
//! served by kube-proxy's rules. In iptables and nftables mode. Needs root.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{custom_lab, eventually, Lab};
use serde_json::Value;

const LAB: &str = r#"
podCIDR: POD_CIDR_HERE
nodes: [n1, n2]
kubernetes: true
kubeProxy: MODE_HERE
socketLB: {enabled: false}
pods:
- {name: client, labels: {app: client}, node: n1}
- {name: other, labels: {app: other}, node: n1}
- {name: host-client, hostNetwork: true, node: n1}
"#;

const SERVICE: &str = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: default}\nspec:\n  clusterIP: 10.96.0.90\n  selector: {app: web}\n  ports: [{name: http, port: 80, targetPort: 8080}]\n";

const WEB_FROM_CLIENT: &str = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: web-from-client, namespace: default}\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: client}}]\n";

fn apply(lab: &Lab, yaml: &str, name: &str) {
    let (ok, _, err) = lab.apply(name, yaml);
    assert!(ok, "{err}");
}

/// Node `n`'s network namespace.
fn node_netns(lab: &Lab, n: usize) -> String {
    let st: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("/run/fibril/labs/{}/lab.json", lab.name)).unwrap(),
    )
    .unwrap();
    st["nodes"][n]["netns"].as_str().unwrap().to_string()
}

/// How many packets kube-proxy's rules for 10.96.0.90 have translated on
/// node `n` (iptables: the counters of its service chain's jump; nftables,
/// which keeps no counters: 0), or None while it has no rule for it.
fn kube_proxy_hits(lab: &Lab, n: usize, mode: &str) -> Option<u64> {
    let netns = node_netns(lab, n);
    let out = if mode == "iptables" {
        Command::new("ip")
            .args(["netns", "exec", &netns, "iptables-save", "-c", "-t", "nat"])
            .output()
            .unwrap()
    } else {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                &netns,
                "nft",
                "list",
                "table",
                "ip",
                "kube-proxy",
            ])
            .output()
            .unwrap()
    };
    let text = String::from_utf8_lossy(&out.stdout);
    if mode == "iptables" {
        // `[packets:bytes] -A KUBE-SERVICES -d 10.96.0.90/32 ... -j KUBE-SVC-...`
        text.lines()
            .find(|l| l.contains("-A KUBE-SERVICES -d 10.96.0.90/32") && l.contains("KUBE-SVC-"))
            .and_then(|l| l.strip_prefix('['))
            .and_then(|l| l.split(':').next())
            .and_then(|p| p.parse().ok())
    } else {
        // kube-proxy's nftables mode counts nothing per service: its
        // service-ips entry (there once the service has endpoints) says it
        // is served; conntrack tells whether a connection was translated
        // (below).
        text.contains("10.96.0.90 . tcp . 80 : goto service-")
            .then_some(0)
    }
}

/// Connections in node `n`'s netfilter conntrack whose original
/// destination is the cluster IP (what kube-proxy's DNAT leaves).
fn netfilter_translations(lab: &Lab, n: usize) -> usize {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            &node_netns(lab, n),
            "conntrack",
            "-L",
            "-d",
            "10.96.0.90",
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains("dst=10.96.0.90"))
        .count()
}

fn beside_kube_proxy(mode: &str) {
    let lab = custom_lab(&LAB.replace("MODE_HERE", mode));
    let (ok, _, err) = lab.kubectl(&[
        "create",
        "deployment",
        "web",
        "--image=fibril/echo",
        "--port=8080",
    ]);
    assert!(ok, "{err}");
    apply(&lab, SERVICE, "svc");
    let service_list = |node: &str| {
        let out = lab.fibril(&["--node", node, "service", "list"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    eventually(
        "Fibril and kube-proxy both following web",
        Duration::from_secs(60),
        || {
            ["n1", "n2"].iter().all(|n| {
                service_list(n)
                    .lines()
                    .any(|l| l.contains("10.96.0.90:80/TCP") && l.contains("(active)"))
            }) && kube_proxy_hits(&lab, 0, mode).is_some()
        },
    );
    let url = "http://10.96.0.90/";
    // A pod: Fibril translates at its veth, so the packet that reaches the
    // node already goes to the backend: kube-proxy's rule never matches.
    for _ in 0..3 {
        assert!(lab.http_get("default/client", url, "5"), "pod -> {url}");
    }
    if mode == "iptables" {
        // nftables mode counts nothing per service: conntrack below says.
        assert_eq!(kube_proxy_hits(&lab, 0, mode), Some(0), "no double NAT");
    }
    assert_eq!(netfilter_translations(&lab, 0), 0, "{mode}: no double NAT");
    // The node itself (no socket LB here): kube-proxy's rules serve it.
    assert!(
        lab.http_get("default/host-client", url, "5"),
        "host -> {url}"
    );
    let host_entries = netfilter_translations(&lab, 0);
    assert!(host_entries > 0, "{mode}: kube-proxy served the host");
    if mode == "iptables" {
        assert!(kube_proxy_hits(&lab, 0, mode).unwrap() > 0);
    }
    // Policy on the backend sees the client pod itself (no masquerade in
    // between): app=client is let in through the cluster IP, app=other is
    // not.
    apply(&lab, WEB_FROM_CLIENT, "cnp");
    eventually("the policy in force", Duration::from_secs(30), || {
        !lab.http_get("default/other", url, "2")
    });
    assert!(lab.http_get("default/client", url, "5"));
    assert!(
        netfilter_translations(&lab, 0) <= host_entries,
        "{mode}: still only the host's connection translated by kube-proxy"
    );
}

#[test]
fn pods_are_translated_once_beside_kube_proxy_in_iptables_mode() {
    beside_kube_proxy("iptables");
}

#[test]
fn pods_are_translated_once_beside_kube_proxy_in_nftables_mode() {
    beside_kube_proxy("nftables");
}
