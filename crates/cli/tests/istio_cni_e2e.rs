//! Fibril chained with Istio's real CNI plugin (`tools/istio-cni`, built by
//! `cargo xtask deps`), in the seed's configuration: the chart installed
//! with `cni.exclusive=false` and `socketLB.hostNamespaceOnly=true`, Istio's
//! plugin appended after Fibril's in each node's configuration list
//! (`fibril lab istio-cni`), and the lab's kubelets running the whole list
//! for every pod as a runtime does (ADD in order with `prevResult`, CHECK,
//! DEL in reverse). Pods with Istio's sidecar markers get Istio's
//! redirection (its iptables rules in their namespace) and a stand-in for
//! the proxy (`fibril-echo sidecar-proxy`, Envoy's passthrough as user
//! 1337); Fibril's verdicts, identities and flows are those of the same
//! pods without it. Needs root.

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::{custom_lab, eventually, Lab};
use serde_json::Value;

const LAB: &str = r#"
podCIDR: POD_CIDR_HERE
nodes: [n1, n2]
kubernetes: true
agents: helm
"#;

/// The seed's values that matter here, the relay and UI left out.
const VALUES: &[&str] = &[
    "ipam.mode=kubernetes",
    "cni.exclusive=false",
    "socketLB.enabled=true",
    "socketLB.hostNamespaceOnly=true",
    "kubeProxyReplacement=false",
    "hubble.enabled=true",
    "hubble.relay.enabled=false",
    "hubble.ui.enabled=false",
];

/// A pod as Istio's injector leaves it: the application, then the
/// `istio-proxy` container (user 1337) and the status annotation the
/// plugin looks for. `sidecar: false`: the application alone.
fn pod(name: &str, node: &str, app: &str, server: bool, sidecar: bool) -> String {
    let app_container = if server {
        "{name: app, image: fibril/echo, ports: [{containerPort: 8080}]}".to_string()
    } else {
        "{name: app, image: busybox, command: [sleep, '3600']}".to_string()
    };
    let (annotations, proxy) = if sidecar {
        (
            r#"  annotations: {sidecar.istio.io/status: '{"containers":["istio-proxy"]}'}"#,
            "\n  - {name: istio-proxy, image: fibril/echo, args: [sidecar-proxy], securityContext: {runAsUser: 1337, runAsGroup: 1337}}",
        )
    } else {
        ("", "")
    };
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: mesh\n  labels: {{app: {app}}}\n{annotations}\nspec:\n  nodeName: {node}\n  containers:\n  - {app_container}{proxy}\n---\n"
    )
}

struct Mesh<'a> {
    lab: &'a Lab,
}

impl Mesh<'_> {
    fn kubectl_ok(&self, args: &[&str]) -> String {
        let (ok, out, err) = self.lab.kubectl(args);
        assert!(ok, "kubectl {args:?}: {out}{err}");
        out
    }

    fn apply(&self, yaml: &str) {
        let file = std::env::temp_dir().join(format!("{}-{}.yaml", self.lab.name, yaml.len()));
        std::fs::write(&file, yaml).unwrap();
        self.kubectl_ok(&["apply", "-f", file.to_str().unwrap()]);
        std::fs::remove_file(&file).ok();
    }

    fn pod(&self, ns: &str, name: &str) -> Value {
        let (_, out, _) = self
            .lab
            .kubectl(&["get", "pod", "-n", ns, name, "-o", "json"]);
        serde_json::from_str(&out).unwrap_or_default()
    }

    fn ip(&self, name: &str) -> String {
        self.pod("mesh", name)["status"]["podIP"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    fn running(&self, ns: &str, name: &str) -> bool {
        let p = self.pod(ns, name);
        p["status"]["phase"] == "Running" && p["status"]["podIP"].is_string()
    }

    /// An HTTP GET from pod `from` of `mesh`.
    fn get(&self, from: &str, url: &str) -> bool {
        let (ok, _) = self.lab.exec(
            &format!("mesh/{from}"),
            &["fibril-echo", "http-get", "--timeout", "2", url],
        );
        ok
    }

    /// What the pod's sidecar stand-in printed (`kubectl logs -c
    /// istio-proxy`, through the node's kubelet).
    fn proxy_log(&self, name: &str) -> String {
        let (_, out, err) = self
            .lab
            .kubectl(&["logs", "-n", "mesh", name, "-c", "istio-proxy"]);
        out + &err
    }

    /// How many of the chart's agent pods (`selector` narrowing them
    /// further) are Running; 0 while any is not.
    fn agents_running(&self, selector: &[&str]) -> usize {
        let args = [
            &["get", "pods", "-n", "kube-system", "-l", "k8s-app=fibril"],
            selector,
            &["-o", "json"],
        ]
        .concat();
        let (_, pods, _) = self.lab.kubectl(&args);
        let v: Value = serde_json::from_str(&pods).unwrap_or_default();
        let items = v["items"].as_array().cloned().unwrap_or_default();
        if items.iter().all(|p| p["status"]["phase"] == "Running") {
            items.len()
        } else {
            0
        }
    }

    /// The node's configuration list.
    fn conflist(&self, node: &str) -> Value {
        let path = format!(
            "/run/fibril/labs/{}/nodes/{node}/host/etc/cni/net.d/05-fibril.conflist",
            self.lab.name
        );
        serde_json::from_str(&std::fs::read_to_string(path).unwrap_or_default()).unwrap_or_default()
    }

    fn agent_socket(&self, node: &str) -> String {
        format!(
            "/run/fibril/labs/{}/nodes/{node}/host/var/run/fibril/fibril.sock",
            self.lab.name
        )
    }

    /// The node's endpoints' pod names, as its agent has them.
    fn endpoints(&self, node: &str) -> Vec<String> {
        let out = self.lab.fibril(&[
            "--socket",
            &self.agent_socket(node),
            "endpoint",
            "list",
            "-o",
            "json",
        ]);
        let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        v.as_array()
            .into_iter()
            .flatten()
            .filter_map(|e| e["pod_name"].as_str())
            .map(str::to_string)
            .collect()
    }

    /// Flows of node `node`'s Hubble server (`fibril observe -o json`).
    fn flows(&self, node: &str, args: &[&str]) -> Vec<Value> {
        let server = format!(
            "unix:///run/fibril/labs/{}/nodes/{node}/host/var/run/fibril/hubble.sock",
            self.lab.name
        );
        let out = self.lab.fibril(
            &[
                &[
                    "observe",
                    "--server",
                    server.as_str(),
                    "-o",
                    "json",
                    "--last",
                    "5000",
                ],
                args,
            ]
            .concat(),
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .map(|v| v.get("flow").cloned().unwrap_or(v))
            .collect()
    }

    /// The nat table of pod `name`'s namespace, as Istio's rules are
    /// listed (`iptables-save`, whichever backend the plugin chose).
    fn nat_rules(&self, name: &str) -> String {
        let mut all = String::new();
        for save in ["iptables-save", "iptables-legacy-save", "iptables-nft-save"] {
            let (_, out) = self.lab.exec(&format!("mesh/{name}"), &[save, "-t", "nat"]);
            all.push_str(&out);
        }
        all
    }
}

fn chart() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../install/kubernetes/fibril")
}

#[test]
fn fibril_chained_with_istios_cni_plugin() {
    let plugin = test_support::istio_cni_build_path();
    assert!(
        plugin.exists(),
        "{} is missing: run `cargo xtask deps`",
        plugin.display()
    );
    let lab = custom_lab(LAB);
    let mesh = Mesh { lab: &lab };
    let mut install: Vec<String> = ["upgrade", "--install", "cilium"]
        .map(String::from)
        .to_vec();
    install.push(chart().display().to_string());
    install.extend(["--namespace", "kube-system"].map(String::from));
    for v in VALUES {
        install.extend(["--set".to_string(), v.to_string()]);
    }
    let (ok, out, err) = lab.helm(&install);
    assert!(ok, "{out}{err}");
    eventually("an agent per node", Duration::from_secs(90), || {
        mesh.agents_running(&[]) == 2
    });
    for node in ["n1", "n2"] {
        eventually(
            &format!("{node}'s agent answering"),
            Duration::from_secs(60),
            || {
                let out = lab.fibril(&["--socket", &mesh.agent_socket(node), "status"]);
                String::from_utf8_lossy(&out.stdout).contains("Kubernetes:    connected")
            },
        );
    }

    // Istio's plugin chained after Fibril's, on each node, in the order
    // the seed gives; Fibril's entry as its installer wrote it.
    let before = mesh.conflist("n1");
    let out = lab.fibril(&["lab", "istio-cni"]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for node in ["n1", "n2"] {
        assert!(
            text.contains(&format!(
                "node {node}: 05-fibril.conflist now chains fibril-cni -> istio-cni"
            )),
            "{text}"
        );
    }
    let chained = mesh.conflist("n1");
    assert_eq!(chained["plugins"][0], before["plugins"][0]);
    assert_eq!(chained["plugins"][1]["type"], "istio-cni");

    // The workloads: a server and two clients with Istio's sidecar, and
    // the same clients' twins without it.
    mesh.kubectl_ok(&["create", "namespace", "mesh"]);
    let mut yaml = String::new();
    yaml += &pod("server", "n2", "server", true, true);
    yaml += &pod("client", "n1", "client", false, true);
    yaml += &pod("intruder", "n1", "intruder", false, true);
    yaml += &pod("client-plain", "n1", "client", false, false);
    yaml += &pod("intruder-plain", "n1", "intruder", false, false);
    yaml += "apiVersion: v1\nkind: Service\nmetadata: {name: server, namespace: mesh}\nspec:\n  selector: {app: server}\n  ports: [{port: 80, targetPort: 8080}]\n---\n";
    yaml += "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: server-from-client, namespace: mesh}\nspec:\n  endpointSelector: {matchLabels: {app: server}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: client}}]\n    toPorts: [{ports: [{port: '8080', protocol: TCP}]}]\n  - fromEntities: [host, remote-node]\n";
    mesh.apply(&yaml);
    let pods = [
        "server",
        "client",
        "intruder",
        "client-plain",
        "intruder-plain",
    ];
    let deadline = std::time::Instant::now() + Duration::from_secs(90);
    while !pods.iter().all(|p| mesh.running("mesh", p)) {
        if std::time::Instant::now() > deadline {
            let (_, out, _) = lab.kubectl(&["get", "pods", "-n", "mesh", "-o", "json"]);
            let v: Value = serde_json::from_str(&out).unwrap_or_default();
            let statuses: Vec<String> = v["items"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| format!("{}: {}", p["metadata"]["name"], p["status"]))
                .collect();
            panic!("the mesh's pods:\n{}", statuses.join("\n"));
        }
        std::thread::sleep(Duration::from_millis(500));
    }

    // Istio's redirection inside the sidecar pods, none in the others.
    for p in ["server", "client", "intruder"] {
        let rules = mesh.nat_rules(p);
        assert!(
            rules.contains("ISTIO_OUTPUT") && rules.contains("15001") && rules.contains("15006"),
            "{p}: {rules}"
        );
    }
    for p in ["client-plain", "intruder-plain"] {
        assert!(!mesh.nat_rules(p).contains("ISTIO"), "{p}");
    }
    // CHECK runs the list in order, each plugin with the pod's result.
    let out = lab.fibril(&["lab", "cni-check", "mesh/client"]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("passed: fibril-cni, istio-cni"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // The same verdicts with and without the sidecar: the client's
    // identity is let in, the intruder's dropped, whichever way its
    // packets left the pod.
    let server = mesh.ip("server");
    let url = format!("http://{server}:8080/");
    eventually("client -> server", Duration::from_secs(30), || {
        mesh.get("client", &url) && mesh.get("client-plain", &url)
    });
    assert!(
        !mesh.get("intruder", &url),
        "the intruder through its sidecar"
    );
    assert!(
        !mesh.get("intruder-plain", &url),
        "the intruder without one"
    );
    // The redirection really carried the allowed connection: out of the
    // client through its proxy, into the server through the server's.
    let client = mesh.ip("client");
    let client_log = mesh.proxy_log("client");
    assert!(
        client_log.contains(&format!("outbound {client}:"))
            && client_log.contains(&format!("-> {server}:8080")),
        "{client_log}"
    );
    let server_log = mesh.proxy_log("server");
    assert!(
        server_log.contains(&format!("inbound {client}:"))
            && server_log.contains(&format!("-> {server}:8080")),
        "{server_log}"
    );
    // The kernel dropped the intruder's packets at the server's node, and
    // the flows name both pods as Hubble does.
    let intruder = mesh.ip("intruder");
    let dropped = mesh.flows(
        "n2",
        &[
            "--verdict",
            "DROPPED",
            "--from-ip",
            &intruder,
            "--to-ip",
            &server,
        ],
    );
    assert!(
        dropped.iter().any(|f| {
            f["source"]["pod_name"] == "intruder"
                && f["source"]["namespace"] == "mesh"
                && f["destination"]["pod_name"] == "server"
                && f["drop_reason_desc"] == "POLICY_DENIED"
        }),
        "{dropped:?}"
    );
    let forwarded = mesh.flows(
        "n2",
        &[
            "--verdict",
            "FORWARDED",
            "--from-ip",
            &client,
            "--to-ip",
            &server,
        ],
    );
    assert!(
        forwarded.iter().any(
            |f| f["source"]["pod_name"] == "client" && f["destination"]["pod_name"] == "server"
        ),
        "{forwarded:?}"
    );

    // The service from a sidecar pod: with socketLB.hostNamespaceOnly the
    // application's connect keeps the service address, so Istio's proxy
    // sees the service it asked for, and the per-packet LB translates the
    // proxy's own connection. From the node itself, socket LB serves it.
    let (_, svc, _) = lab.kubectl(&["get", "svc", "-n", "mesh", "server", "-o", "json"]);
    let svc: Value = serde_json::from_str(&svc).unwrap();
    let vip = svc["spec"]["clusterIP"].as_str().unwrap().to_string();
    let vip_url = format!("http://{vip}:80/");
    eventually("client -> the service", Duration::from_secs(30), || {
        mesh.get("client", &vip_url)
    });
    assert!(
        mesh.proxy_log("client")
            .contains(&format!("outbound {client}:"))
            && mesh.proxy_log("client").contains(&format!("-> {vip}:80")),
        "the proxy saw the service's address: {}",
        mesh.proxy_log("client")
    );
    assert!(!mesh.get("intruder", &vip_url), "policy sees the backend");
    let (ok, out) = lab.exec(
        "node/n1",
        &["fibril-echo", "http-get", "--timeout", "2", &vip_url],
    );
    assert!(ok, "the node's own connect, by socket LB: {out}");
    eventually(
        "the node's socket LB translation",
        Duration::from_secs(10),
        || {
            !mesh
                .flows("n1", &["--type", "trace-sock", "--to-ip", &vip])
                .is_empty()
        },
    );

    // Ambient mode: pods of a namespace Istio's selectors match are handed
    // to Istio's node agent, which this lab does not run: the plugin
    // refuses their ADD, Fibril's part of the attempt is undone, and the
    // pod starts once the namespace leaves ambient mode.
    let out = lab.fibril(&["lab", "istio-cni", "--ambient"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(mesh.conflist("n1")["plugins"][1]["ambient_enabled"], true);
    mesh.kubectl_ok(&["create", "namespace", "ambient"]);
    mesh.kubectl_ok(&[
        "label",
        "namespace",
        "ambient",
        "istio.io/dataplane-mode=ambient",
    ]);
    mesh.apply("apiVersion: v1\nkind: Pod\nmetadata: {name: waypoint-less, namespace: ambient}\nspec:\n  nodeName: n1\n  containers: [{name: app, image: busybox, command: [sleep, '3600']}]\n");
    eventually("the ambient pod refused", Duration::from_secs(30), || {
        let p = mesh.pod("ambient", "waypoint-less");
        p["status"]["containerStatuses"][0]["state"]["waiting"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("istio-cni") && m.contains("node Istio CNI agent"))
    });
    // Fibril's part of each refused attempt is undone (the kubelet tries
    // again every second; between attempts the pod has no endpoint).
    eventually(
        "no endpoint left by a refused ADD",
        Duration::from_secs(10),
        || !mesh.endpoints("n1").contains(&"waypoint-less".to_string()),
    );
    mesh.kubectl_ok(&["label", "namespace", "ambient", "istio.io/dataplane-mode-"]);
    eventually(
        "the pod once out of ambient mode",
        Duration::from_secs(30),
        || mesh.running("ambient", "waypoint-less"),
    );

    // An agent restarting (its pod deleted, the DaemonSet's replacement's
    // init container installing again) keeps Istio's entry.
    let chained = mesh.conflist("n1");
    mesh.kubectl_ok(&[
        "delete",
        "pod",
        "-n",
        "kube-system",
        "-l",
        "k8s-app=fibril",
        "--field-selector",
        "spec.nodeName=n1",
        "--wait=true",
    ]);
    eventually("n1's agent again", Duration::from_secs(90), || {
        mesh.agents_running(&["--field-selector", "spec.nodeName=n1"]) == 1
    });
    assert_eq!(mesh.conflist("n1"), chained, "Istio's entry kept as it was");
    assert!(mesh.get("client", &url), "the chained pods still served");

    // DEL runs the list in reverse: the pod's endpoint goes.
    mesh.kubectl_ok(&["delete", "pod", "-n", "mesh", "client", "--wait=true"]);
    eventually(
        "the client's endpoint gone",
        Duration::from_secs(30),
        || !mesh.endpoints("n1").contains(&"client".to_string()),
    );
}
