//! Tier 5, several nodes: a lab of three nodes (each a network namespace
//! with its own agent), joined by the VXLAN overlay over the lab's
//! underlay, the cluster's state in the lab's etcd. Real pods, real
//! packets, a real capture of the underlay. Needs root.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{custom_lab, eventually, Lab};
use serde_json::Value;

const LAB: &str = r#"
podCIDR: POD_CIDR_HERE
nodes: [n1, n2, n3]
kvstoreLeaseTTL: 3
namespaces:
- name: shop
pods:
- {name: client, namespace: shop, labels: {app: client}, node: n1}
- {name: web, namespace: shop, labels: {app: web}, node: n2, command: [fibril-echo, http-server, --port, "8080"]}
- {name: other, namespace: shop, labels: {app: other}, node: n3}
policies:
- inline: |
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: web-from-client, namespace: shop}
    spec:
      endpointSelector: {matchLabels: {app: web}}
      ingress:
      - fromEndpoints: [{matchLabels: {app: client}}]
        toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"#;

struct Cluster {
    lab: Lab,
}

impl Cluster {
    /// The /24 splits into one /26 per node: each node's first pod is its
    /// block's .2.
    fn ip(&self, pod: &str) -> String {
        let host = match pod {
            "client" => 2,
            "web" => 66,
            "other" => 130,
            _ => unreachable!(),
        };
        self.lab.ip(host)
    }

    fn get_web(&self, from: &str, timeout: &str) -> bool {
        let url = format!("http://{}:8080/", self.ip("web"));
        self.lab.http_get(&format!("shop/{from}"), &url, timeout)
    }

    fn on(&self, node: &str, args: &[&str]) -> std::process::Output {
        self.lab.fibril(&[&["--node", node], args].concat())
    }

    fn flows(&self, node: &str) -> Vec<Value> {
        self.lab.observe_json(&["--node", node, "--all"])
    }

    fn status(&self, node: &str) -> String {
        String::from_utf8_lossy(&self.on(node, &["status"]).stdout).into_owned()
    }

    fn identity(&self, node: &str, pod: &str) -> u64 {
        let out = self.on(node, &["endpoint", "list", "-o", "json"]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap();
        v.as_array()
            .unwrap()
            .iter()
            .find(|e| e["pod_name"] == pod)
            .and_then(|e| e["identity"].as_u64())
            .unwrap_or_else(|| panic!("{pod} on {node}"))
    }

    fn state(&self) -> Value {
        serde_json::from_str(
            &std::fs::read_to_string(format!("/run/fibril/labs/{}/lab.json", self.lab.name))
                .unwrap(),
        )
        .unwrap()
    }

    fn underlay_netns(&self) -> String {
        self.state()["underlay_netns"].as_str().unwrap().to_string()
    }

    /// Runs `cmd` inside the underlay's namespace.
    fn in_underlay(&self, cmd: &[&str]) -> std::process::Output {
        Command::new("ip")
            .args(["netns", "exec", &self.underlay_netns()])
            .args(cmd)
            .output()
            .unwrap()
    }
}

/// The VNIs of the VXLAN packets in tcpdump's `-x` output (outer IPv4
/// header of 20 bytes, UDP 8, then the VXLAN header: the VNI is its bytes
/// 4-6).
fn vnis(capture: &str) -> Vec<u32> {
    let mut packets: Vec<Vec<u8>> = Vec::new();
    for line in capture.lines() {
        let line = line.trim_start();
        if let Some(hex) = line.strip_prefix("0x") {
            let Some((offset, words)) = hex.split_once(':') else {
                continue;
            };
            if offset == "0000" {
                packets.push(Vec::new());
            }
            let bytes = words
                .split_whitespace()
                .flat_map(|w| (0..w.len()).step_by(2).map(move |i| &w[i..i + 2]))
                .filter_map(|b| u8::from_str_radix(b, 16).ok());
            if let Some(p) = packets.last_mut() {
                p.extend(bytes);
            }
        }
    }
    packets
        .iter()
        .filter(|p| p.len() >= 35)
        .map(|p| u32::from_be_bytes([0, p[32], p[33], p[34]]))
        .collect()
}

#[test]
fn three_nodes_enforce_policy_across_the_overlay() {
    let c = Cluster {
        lab: custom_lab(LAB),
    };
    common::wait_until("web to listen", || {
        c.lab.log("shop/web").contains("listening")
    });
    // Each node knows the others' pods once it has watched them.
    for node in ["n1", "n2", "n3"] {
        eventually(
            "every node to know the other nodes' pods",
            Duration::from_secs(10),
            || c.status(node).contains("2 endpoints on other nodes"),
        );
        assert!(
            c.status(node)
                .contains("3 node(s): default/n1, default/n2, default/n3"),
            "{}",
            c.status(node)
        );
    }

    // Allowed across nodes; denied in the kernel at the destination (the
    // server never sees the connection).
    assert!(
        c.get_web("client", "3"),
        "client (n1) -> web (n2) is allowed"
    );
    assert!(!c.get_web("other", "1"), "other (n3) -> web (n2) is denied");
    let log = c.lab.log("shop/web");
    assert!(
        log.contains(&format!("accepted {}:", c.ip("client"))),
        "{log}"
    );
    assert!(
        !log.contains(&format!("accepted {}:", c.ip("other"))),
        "{log}"
    );

    // The flows on both ends, both pods named (the remote one from the
    // kvstore), on the node that saw them.
    common::wait_until("the drop on n2", || {
        c.flows("n2").iter().any(|f| f["verdict"] == "DROPPED")
    });
    let n2 = c.flows("n2");
    let drop = n2
        .iter()
        .find(|f| f["verdict"] == "DROPPED")
        .expect("a drop on n2");
    assert_eq!(drop["drop_reason_desc"], "POLICY_DENIED", "{drop}");
    assert_eq!(drop["source"]["pod_name"], "other", "{drop}");
    assert_eq!(drop["source"]["namespace"], "shop", "{drop}");
    assert_eq!(
        drop["source"]["identity"],
        c.identity("n3", "other"),
        "{drop}"
    );
    assert_eq!(drop["destination"]["pod_name"], "web", "{drop}");
    assert_eq!(drop["traffic_direction"], "INGRESS", "{drop}");
    assert_eq!(drop["node_name"], "n2", "{drop}");
    assert!(
        n2.iter().any(|f| f["verdict"] == "FORWARDED"
            && f["source"]["pod_name"] == "client"
            && f["destination"]["pod_name"] == "web"
            && f["trace_observation_point"] == "TO_ENDPOINT"),
        "n2 saw client's connection arrive"
    );
    let n1 = c.flows("n1");
    assert!(
        n1.iter().any(|f| f["verdict"] == "FORWARDED"
            && f["source"]["pod_name"] == "client"
            && f["destination"]["pod_name"] == "web"
            && f["destination"]["labels"]
                .as_array()
                .is_some_and(|l| l.iter().any(|l| l == "k8s:app=web"))
            && f["traffic_direction"] == "EGRESS"
            && f["node_name"] == "n1"),
        "n1 saw client's connection leave, the remote end named: {n1:?}"
    );

    // A connection across nodes survives both ends' agents restarting
    // (one request every 100 ms on one connection meanwhile; the flow
    // rings start empty after it).
    let hold = c
        .lab
        .hold("shop/client", &format!("{}:8080", c.ip("web")), "6");
    std::thread::sleep(Duration::from_millis(500));
    for node in ["n2", "n1"] {
        let restart = c.on(node, &["lab", "restart-agent"]);
        assert!(
            restart.status.success(),
            "{}",
            String::from_utf8_lossy(&restart.stderr)
        );
    }
    let held = hold.wait_with_output().unwrap();
    assert!(
        held.status.success(),
        "the held connection broke: {} {}",
        String::from_utf8_lossy(&held.stdout),
        String::from_utf8_lossy(&held.stderr)
    );

    // The VNI carries the source's identity, on the wire between nodes.
    let ul = c.underlay_netns();
    let capture = Command::new("ip")
        .args(["netns", "exec", &ul, "timeout", "10", "tcpdump"])
        .args(["-i", "br0", "-nn", "-c", "2", "-x", "udp", "port", "8472"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    assert!(c.get_web("client", "3"));
    let out = capture.wait_with_output().unwrap();
    let seen = vnis(&String::from_utf8_lossy(&out.stdout));
    let (client_id, web_id) = (c.identity("n1", "client"), c.identity("n2", "web"));
    assert_eq!(seen.len(), 2, "{}", String::from_utf8_lossy(&out.stdout));
    assert_eq!(
        seen[0] as u64, client_id,
        "the SYN's VNI is client's identity"
    );
    assert_eq!(
        seen[1] as u64, web_id,
        "the SYN-ACK's VNI is web's identity"
    );

    // A tunnel packet that claims to come from a node's host is refused
    // (INVALID_IDENTITY): VNI 1 from a VXLAN device of the test's own.
    let n2_address = c.state()["nodes"][1]["address"]
        .as_str()
        .unwrap()
        .to_string();
    for cmd in [
        vec![
            "ip",
            "link",
            "add",
            "forge",
            "type",
            "vxlan",
            "id",
            "1",
            "remote",
            &n2_address,
            "dstport",
            "8472",
        ],
        vec!["ip", "link", "set", "forge", "up"],
        vec!["ip", "addr", "add", "192.0.2.1/32", "dev", "forge"],
        vec!["ip", "route", "add", &c.ip("web"), "dev", "forge"],
        vec![
            "ip",
            "neigh",
            "add",
            &c.ip("web"),
            "lladdr",
            "02:00:00:00:00:01",
            "dev",
            "forge",
            "nud",
            "permanent",
        ],
    ] {
        let out = c.in_underlay(&cmd);
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let forged = c.in_underlay(&[
        "curl",
        "-s",
        "-m",
        "1",
        &format!("http://{}:8080/", c.ip("web")),
    ]);
    assert!(!forged.status.success());
    common::wait_until("the forged packet's drop", || {
        c.flows("n2")
            .iter()
            .any(|f| f["drop_reason_desc"] == "INVALID_IDENTITY")
    });
    assert!(!c.lab.log("shop/web").contains("accepted 192.0.2.1"));

    // A label change on n3 is enforced on n2.
    let relabel = c.lab.fibril(&["lab", "label", "shop/other", "app=client"]);
    assert!(
        relabel.status.success(),
        "{}",
        String::from_utf8_lossy(&relabel.stderr)
    );
    eventually(
        "other, now app=client, to reach web",
        Duration::from_secs(10),
        || c.get_web("other", "1"),
    );
    let relabel = c.lab.fibril(&["lab", "label", "shop/other", "app=other"]);
    assert!(relabel.status.success());
    eventually(
        "other, app=other again, to be refused",
        Duration::from_secs(10),
        || !c.get_web("other", "1"),
    );

    // etcd lost: every node keeps enforcing what it has; what needs the
    // cluster is refused with a precise error; once etcd is back the
    // agents reconnect, and no identity is lost or doubled.
    let cluster_line = |node: &str| {
        c.status(node)
            .lines()
            .find(|l| l.contains("cluster identities"))
            .map(|l| l.trim().to_string())
            .unwrap_or_default()
    };
    let before: Vec<String> = ["n1", "n2", "n3"].iter().map(|n| cluster_line(n)).collect();
    let stop = c.lab.fibril(&["lab", "stop-etcd"]);
    assert!(
        stop.status.success(),
        "{}",
        String::from_utf8_lossy(&stop.stderr)
    );
    assert!(c.get_web("client", "3"), "allowed while etcd is away");
    assert!(!c.get_web("other", "1"), "denied while etcd is away");
    let policy = c.lab.dir.join("again.yaml");
    std::fs::write(
        &policy,
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: web-from-client, namespace: shop}\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: client}}]\n    toPorts: [{ports: [{port: \"8080\", protocol: TCP}]}]\n",
    )
    .unwrap();
    let refused = c.on("n1", &["policy", "import", policy.to_str().unwrap()]);
    assert!(!refused.status.success());
    let why = String::from_utf8_lossy(&refused.stderr);
    assert!(why.contains("kvstore (etcd) is not reachable"), "{why}");
    let start = c.lab.fibril(&["lab", "start-etcd"]);
    assert!(
        start.status.success(),
        "{}",
        String::from_utf8_lossy(&start.stderr)
    );
    eventually(
        "an import once etcd is back",
        Duration::from_secs(15),
        || {
            c.on("n1", &["policy", "import", policy.to_str().unwrap()])
                .status
                .success()
        },
    );
    for (i, node) in ["n1", "n2", "n3"].iter().enumerate() {
        eventually(
            "each node to resynchronise",
            Duration::from_secs(10),
            || cluster_line(node) == before[i],
        );
    }
    assert_eq!(c.identity("n1", "client"), client_id);
    assert!(c.get_web("client", "3"));
    assert!(!c.get_web("other", "1"));

    // A node that dies: its lease runs out, the others drop its pods; it
    // comes back with them.
    let stop = c.lab.fibril(&["lab", "stop-node", "n3"]);
    assert!(
        stop.status.success(),
        "{}",
        String::from_utf8_lossy(&stop.stderr)
    );
    eventually("n2 to forget n3's pods", Duration::from_secs(15), || {
        c.status("n2").contains("1 endpoints on other nodes")
    });
    assert!(
        c.get_web("client", "3"),
        "the rest of the cluster keeps working"
    );
    let start = c.lab.fibril(&["lab", "start-node", "n3"]);
    assert!(
        start.status.success(),
        "{}",
        String::from_utf8_lossy(&start.stderr)
    );
    eventually(
        "n2 to know n3's pods again",
        Duration::from_secs(15),
        || c.status("n2").contains("2 endpoints on other nodes"),
    );
    assert!(
        !c.get_web("other", "1"),
        "still denied after the node's return"
    );

    // `lab down` removes every node, the underlay and the nodes' pins.
    let name = c.lab.name.clone();
    let down = c.lab.fibril(&["lab", "down"]);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    let netns = common::netns_list();
    assert!(!netns.contains(&format!("fibril-{name}-")), "{netns}");
    for node in ["n1", "n2", "n3"] {
        assert!(!std::path::Path::new(&format!("/sys/fs/bpf/fibril-{name}-{node}")).exists());
    }
}

/// L7 rules across nodes: the server's ingress HTTP rules on its own node's
/// proxy (the connection arrives through the overlay), the client's egress
/// HTTP rules on the client's node's proxy (whose upstream connection's
/// replies come back through the overlay).
#[test]
fn http_rules_hold_across_nodes_both_ways() {
    let lab = custom_lab(
        r#"
podCIDR: POD_CIDR_HERE
nodes: [a, b]
namespaces:
- name: shop
pods:
- {name: client, namespace: shop, labels: {app: client}, node: a}
- {name: web, namespace: shop, labels: {app: web}, node: b, command: [fibril-echo, http-server, --port, "8080"]}
- {name: api, namespace: shop, labels: {app: api}, node: b, command: [fibril-echo, http-server, --port, "8080"]}
policies:
- inline: |
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: web-l7, namespace: shop}
    spec:
      endpointSelector: {matchLabels: {app: web}}
      ingress:
      - fromEndpoints: [{matchLabels: {app: client}}]
        toPorts: [{ports: [{port: "8080", protocol: TCP}], rules: {http: [{method: GET, path: "/public"}]}}]
- inline: |
    apiVersion: cilium.io/v2
    kind: CiliumNetworkPolicy
    metadata: {name: client-l7, namespace: shop}
    spec:
      endpointSelector: {matchLabels: {app: client}}
      egress:
      - toEndpoints: [{matchLabels: {app: api}}]
        toPorts: [{ports: [{port: "8080", protocol: TCP}], rules: {http: [{method: GET, path: "/public"}]}}]
      - toEndpoints: [{matchLabels: {app: web}}]
        toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"#,
    );
    // /25 blocks: a's first pod .2, b's .130 and .131.
    let code = |host: u8, path: &str| -> String {
        let url = format!("http://{}:8080{path}", lab.ip(host));
        let (_, out) = lab.exec(
            "shop/client",
            &[
                "curl",
                "-s",
                "-m",
                "3",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &url,
            ],
        );
        out
    };
    common::wait_until("the servers to listen", || {
        lab.log("shop/web").contains("listening") && lab.log("shop/api").contains("listening")
    });
    eventually("a to know b's pods", Duration::from_secs(10), || {
        code(130, "/public") == "200"
    });
    assert_eq!(code(130, "/private"), "403", "web's ingress rule, on b");
    assert_eq!(code(131, "/public"), "200", "client's egress rule, on a");
    assert_eq!(code(131, "/private"), "403", "client's egress rule, on a");
    // The servers saw the allowed requests only.
    for server in ["shop/web", "shop/api"] {
        let log = lab.log(server);
        assert!(log.contains("request GET /public"), "{log}");
        assert!(!log.contains("request GET /private"), "{log}");
    }
    let flows = String::from_utf8_lossy(
        &lab.fibril(&[
            "--node",
            "b",
            "observe",
            "--protocol",
            "http",
            "-o",
            "json",
            "--all",
        ])
        .stdout,
    )
    .into_owned();
    assert!(
        flows.contains("\"DROPPED\"") && flows.contains("/private"),
        "{flows}"
    );
}
