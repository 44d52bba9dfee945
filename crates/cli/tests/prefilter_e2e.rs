//! Tier 5, the XDP prefilter on a lab's nodes (`prefilter:`, Cilium's
//! prefilter): a listed source prefix is dropped on the node's underlay
//! device before its stack (host-network and pod servers both out of
//! reach, the other node untouched), counted and reported as a flow; it
//! holds across an agent restart; prefixes that would cut the cluster
//! apart or are no network address are refused. Needs root.

mod common;

use common::{custom_lab, eventually, Lab};
use std::time::Duration;

const LAB: &str = r#"
podCIDR: POD_CIDR_HERE
nodes: [a, b]
prefilter: []
pods:
  - name: web
    labels: {app: web}
    command: [fibril-echo, http-server, --port, "8080"]
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

/// `fibril --node a prefilter VERB --cidr CIDR`, which must succeed.
fn change(lab: &Lab, verb: &str, cidr: &str) {
    let out = lab.fibril(&["--node", "a", "prefilter", verb, "--cidr", cidr]);
    assert!(
        out.status.success(),
        "{verb} {cidr}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn prefilter(lab: &Lab, node: &str) -> serde_json::Value {
    let out = lab.fibril(&["--node", node, "prefilter", "list", "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_listed_source_is_dropped_before_the_nodes_stack() {
    let lab = custom_lab(LAB);
    let (a, b) = (lab.node_address(0), lab.node_address(1));
    // The pod's address, from node a's endpoints.
    let eps = lab.endpoints();
    let web_ip = eps
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["pod_name"] == "web")
        .and_then(|e| e["ipv4"].as_str())
        .unwrap()
        .to_string();
    let web = format!("http://{web_ip}:8080/");
    let host_web = format!("http://{a}:8081/");
    let host_web_b = format!("http://{b}:8081/");
    let from_outside = |url: &str| lab.http_get("external/outside", url, "2");
    eventually("the servers up", Duration::from_secs(20), || {
        from_outside(&host_web) && from_outside(&web) && from_outside(&host_web_b)
    });
    let p = prefilter(&lab, "a");
    assert_eq!(p["device"], "ul0", "{p}");
    assert_eq!(p["mode"], "native");

    // Listed on node a: nothing from the outside host reaches it, its
    // pods included; node b still serves.
    change(&lab, "update", "198.18.20.0/24");
    assert!(
        !from_outside(&host_web),
        "host-network server behind the prefilter"
    );
    assert!(!from_outside(&web), "pod behind the prefilter");
    assert!(from_outside(&host_web_b), "node b has no such prefix");
    let p = prefilter(&lab, "a");
    assert_eq!(p["cidrs"], serde_json::json!(["198.18.20.0/24"]));
    let dropped = p["dropped_packets"].as_u64().unwrap();
    assert!(dropped >= 2, "{p}");
    assert_eq!(prefilter(&lab, "b")["dropped_packets"], 0);
    // Reported as flows: dropped, from the outside host to the node.
    let flows = lab.fibril(&[
        "--node",
        "a",
        "observe",
        "--last",
        "200",
        "--verdict",
        "DROPPED",
        "-o",
        "json",
    ]);
    let flows = String::from_utf8_lossy(&flows.stdout);
    assert!(
        flows
            .lines()
            .any(|l| l.contains("\"198.18.20.10\"") && l.contains("POLICY_DENIED")),
        "{flows}"
    );

    // What would cut the cluster apart, or is no network address: refused.
    for (cidr, says) in [
        ("10.0.0.0/8", "would cut that node off"),
        ("198.18.21.7/24", "did you mean 198.18.21.0/24"),
        ("nonsense", "expected an IPv4 prefix"),
    ] {
        let out = lab.fibril(&["--node", "a", "prefilter", "update", "--cidr", cidr]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{cidr}: {err}");
    }
    assert_eq!(prefilter(&lab, "a")["cidrs"].as_array().unwrap().len(), 1);

    // The agent restarts: the device never goes unfiltered (the pinned
    // link and prefixes outlive it).
    let out = lab.fibril(&["--node", "a", "lab", "restart-agent"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!from_outside(&host_web));
    assert_eq!(
        prefilter(&lab, "a")["cidrs"],
        serde_json::json!(["198.18.20.0/24"])
    );

    // Deleted: served again.
    change(&lab, "delete", "198.18.20.0/24");
    assert!(from_outside(&host_web));
    assert!(from_outside(&web));
}
