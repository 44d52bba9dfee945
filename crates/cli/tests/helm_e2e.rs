//! The Helm chart (`install/kubernetes/fibril`) with the real helm CLI
//! (`tools/helm`, built by `cargo xtask deps`): it lints, renders with the
//! seed's exact values, refuses unknown, ill-typed and unsupported values
//! with the reason, carries the agent's RBAC rules, and the seed's `helm
//! upgrade --install` (the chart's path for the OCI reference) runs against
//! a lab's real apiserver, whose kubelets run the chart's agents for real
//! (they enforce a policy), followed by the seed's troubleshooting commands
//! (`kubectl logs` of the DaemonSet included) and `helm uninstall`. Needs
//! root for the lab part.

mod common;

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use common::{custom_lab, eventually};
use serde_json::Value;

fn chart() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../install/kubernetes/fibril")
}

fn helm() -> Command {
    let bin = test_support::helm_build_path();
    assert!(
        bin.exists(),
        "{} is missing: run `cargo xtask deps`",
        bin.display()
    );
    let mut c = Command::new(bin);
    // No user's helm settings, repositories or cache.
    let home = std::env::temp_dir().join(format!("fibril-helm-home-{}", std::process::id()));
    c.env("HELM_CONFIG_HOME", home.join("config"))
        .env("HELM_CACHE_HOME", home.join("cache"))
        .env("HELM_DATA_HOME", home.join("data"));
    c
}

/// The seed's values, as its `helm upgrade --install` sets them.
const SEED_VALUES: &[&str] = &[
    "image.pullPolicy=IfNotPresent",
    "ipam.mode=kubernetes",
    "cni.exclusive=false",
    "socketLB.hostNamespaceOnly=true",
    "kubeProxyReplacement=false",
    "hubble.enabled=true",
    "hubble.relay.enabled=true",
    "hubble.ui.enabled=true",
    "hubble.ui.service.type=NodePort",
    "hubble.ui.service.nodePort=31235",
];

fn set_args(values: &[&str]) -> Vec<String> {
    values
        .iter()
        .flat_map(|v| ["--set".to_string(), v.to_string()])
        .collect()
}

fn run(mut c: Command) -> (bool, String, String) {
    let out = c.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn template(values: &[&str]) -> (bool, String, String) {
    let mut c = helm();
    c.args(["template", "fibril"])
        .arg(chart())
        .args(["--namespace", "kube-system"]);
    c.args(set_args(values));
    run(c)
}

fn documents(yaml: &str) -> Vec<Value> {
    serde_saphyr::from_multiple::<Value>(yaml)
        .unwrap()
        .into_iter()
        .filter(|d| !d.is_null())
        .collect()
}

fn find<'a>(docs: &'a [Value], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name} rendered"))
}

#[test]
fn the_chart_lints_renders_the_seed_values_and_refuses_bad_ones() {
    let mut lint = helm();
    lint.arg("lint").arg(chart()).args(set_args(SEED_VALUES));
    let (ok, out, err) = run(lint);
    assert!(ok, "{out}{err}");

    let (ok, yaml, err) = template(SEED_VALUES);
    assert!(ok, "{err}");
    let docs = documents(&yaml);
    // The agent: a host-network DaemonSet whose init container writes the
    // CNI configuration without touching other plugins' (cni.exclusive=false).
    let ds = find(&docs, "DaemonSet", "fibril");
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostNetwork"], true);
    let init: Vec<&str> = pod["initContainers"][0]["command"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(init.contains(&"--conf-file=05-fibril.conflist"), "{init:?}");
    assert!(
        !init.contains(&"--exclusive"),
        "cni.exclusive=false: {init:?}"
    );
    assert_eq!(pod["containers"][0]["securityContext"]["privileged"], true);
    // Its configuration: flags of fibril-agent.
    let cm = find(&docs, "ConfigMap", "fibril-config");
    assert_eq!(cm["data"]["hubble-listen-address"], ":4244");
    // The host's cgroup2 hierarchy, mounted where the flag says.
    assert_eq!(cm["data"]["cgroup-root"], "/sys/fs/cgroup");
    assert!(
        pod["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v["hostPath"]["path"] == "/sys/fs/cgroup"),
        "{pod}"
    );
    // The seed's socketLB.hostNamespaceOnly alone turns no socket LB on,
    // as Cilium's chart; socketLB.enabled does.
    assert!(cm["data"].get("bpf-lb-sock").is_none(), "{cm}");
    let mut values = SEED_VALUES.to_vec();
    values.push("socketLB.enabled=true");
    let (ok, yaml, err) = template(&values);
    assert!(ok, "{err}");
    let docs_lb = documents(&yaml);
    let cm_lb = find(&docs_lb, "ConfigMap", "fibril-config");
    assert_eq!(cm_lb["data"]["bpf-lb-sock"], "true");
    assert_eq!(cm_lb["data"]["bpf-lb-sock-hostns-only"], "true");
    // The host firewall on the given devices, in audit mode if asked.
    assert!(cm["data"].get("enable-host-firewall").is_none(), "{cm}");
    let mut values = SEED_VALUES.to_vec();
    values.extend([
        "hostFirewall.enabled=true",
        "hostFirewall.audit=true",
        "devices={eth0,eth1}",
    ]);
    let (ok, yaml, err) = template(&values);
    assert!(ok, "{err}");
    let docs_fw = documents(&yaml);
    let cm_fw = find(&docs_fw, "ConfigMap", "fibril-config");
    assert_eq!(cm_fw["data"]["enable-host-firewall"], "true");
    assert_eq!(cm_fw["data"]["host-firewall-audit"], "true");
    assert_eq!(cm_fw["data"]["devices"], "eth0,eth1");
    // Kube-proxy replacement on the given devices, with Maglev's size.
    let mut values = SEED_VALUES.to_vec();
    values.retain(|v| !v.starts_with("kubeProxyReplacement"));
    values.extend([
        "kubeProxyReplacement=true",
        "devices={eth0}",
        "maglev.tableSize=1021",
    ]);
    let (ok, yaml, err) = template(&values);
    assert!(ok, "{err}");
    let docs_kpr = documents(&yaml);
    let cm_kpr = find(&docs_kpr, "ConfigMap", "fibril-config");
    assert_eq!(cm_kpr["data"]["kube-proxy-replacement"], "true");
    assert_eq!(cm_kpr["data"]["bpf-lb-maglev-table-size"], "1021");
    assert_eq!(cm_kpr["data"]["devices"], "eth0");
    let (ok, _, err) = template(&["maglev.tableSize=1000"]);
    assert!(!ok && err.contains("tableSize"), "{err}");
    // The relay finds the peer service by the kubelet's service variables
    // first (no cluster DNS needed), then by name.
    let relay = find(&docs, "Deployment", "hubble-relay");
    let relay_args = relay["spec"]["template"]["spec"]["containers"][0]["args"].to_string();
    assert!(
        relay_args
            .contains("--peer-service=$(HUBBLE_PEER_SERVICE_HOST):$(HUBBLE_PEER_SERVICE_PORT)")
            && relay_args.contains("hubble-peer.kube-system.svc.cluster.local:443"),
        "{relay_args}"
    );
    // The relay, the UI on NodePort 31235, the peer service.
    find(&docs, "Deployment", "hubble-relay");
    find(&docs, "Service", "hubble-relay");
    find(&docs, "Deployment", "hubble-ui");
    let ui = find(&docs, "Service", "hubble-ui");
    assert_eq!(ui["spec"]["type"], "NodePort");
    assert_eq!(ui["spec"]["ports"][0]["nodePort"], 31235);
    let peer = find(&docs, "Service", "hubble-peer");
    assert_eq!(peer["spec"]["ports"][0]["targetPort"], 4244);
    // mTLS between relay and agents, made at install, by a CA kept in
    // its own secret (an upgrade signs with it again).
    let ca = find(&docs, "Secret", "fibril-ca");
    let server = find(&docs, "Secret", "hubble-server-certs");
    let relay_certs = find(&docs, "Secret", "hubble-relay-client-certs");
    assert!(ca["data"]["ca.key"].is_string());
    assert_eq!(server["data"]["ca.crt"], ca["data"]["ca.crt"]);
    assert_eq!(relay_certs["data"]["ca.crt"], ca["data"]["ca.crt"]);
    // The agent's rights are the ones the lab's agents run with.
    let role = find(&docs, "ClusterRole", "fibril");
    assert_eq!(role["rules"], k8s::rbac::agent_rules());
    // cni.exclusive=true moves other configurations aside.
    let (ok, yaml, err) = template(&["cni.exclusive=true"]);
    assert!(ok, "{err}");
    assert!(yaml.contains("- --exclusive"));

    // Unknown and ill-typed values: the schema, naming the value.
    let (ok, _, err) = template(&["hubble.ui.servce.type=NodePort"]);
    assert!(!ok && err.contains("servce"), "{err}");
    let (ok, _, err) = template(&["hubble.ui.service.nodePort=abc"]);
    assert!(!ok && err.contains("nodePort"), "{err}");
    let (ok, _, err) = template(&["cni.exclusive=maybe"]);
    assert!(!ok && err.contains("exclusive"), "{err}");
    // Features Fibril lacks: refused with the reason.
    for (value, says) in [
        ("kubeProxyReplacement=true", "needs devices"),
        ("ipam.mode=cluster-pool", "spec.podCIDRs"),
        ("encryption.enabled=true", "encryption"),
        ("cni.chainingMode=aws-cni", "chains only with portmap"),
        ("hubble.ui.service.nodePort=80", "30000-32767"),
        ("cgroup.autoMount.enabled=true", "mounts no cgroup2"),
        ("hostFirewall.enabled=true", "needs devices"),
    ] {
        let mut values = SEED_VALUES.to_vec();
        values.push(value);
        let (ok, _, err) = template(&values);
        assert!(!ok && err.contains(says), "{value}: {err}");
    }
    let (ok, _, err) = template(&["hubble.ui.enabled=true"]);
    assert!(
        !ok && err.contains("needs hubble.relay.enabled=true"),
        "{err}"
    );
}

/// Two nodes whose agents only the chart runs (`agents: helm`), with the
/// real kube-proxy beside them, as the seed's `kubeProxyReplacement=false`
/// has it (it serves the UI's NodePort).
const LAB: &str = r#"
podCIDR: POD_CIDR_HERE
nodes: [n1, n2]
kubernetes: true
agents: helm
kubeProxy: iptables
"#;

#[test]
fn the_seeds_helm_install_runs_against_the_labs_apiserver() {
    let lab = custom_lab(LAB);
    let st: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("/run/fibril/labs/{}/lab.json", lab.name)).unwrap(),
    )
    .unwrap();
    let helm_in_lab = |args: &[String]| lab.helm(args);
    let kubectl = |args: &[&str]| lab.kubectl(args);

    // The seed's command, the chart's path for the OCI reference.
    let mut install: Vec<String> = ["upgrade", "--install", "cilium"]
        .map(String::from)
        .to_vec();
    install.push(chart().display().to_string());
    install.extend(["--version", "0.1.0", "--namespace", "kube-system"].map(String::from));
    install.extend(set_args(SEED_VALUES));
    let (ok, out, err) = helm_in_lab(&install);
    assert!(ok, "{out}{err}");
    assert!(out.contains("STATUS: deployed"), "{out}");
    let hubble_ca = || {
        let (ok, out, err) = kubectl(&[
            "get",
            "secret",
            "-n",
            "kube-system",
            "hubble-server-certs",
            "-o",
            "jsonpath={.data.ca\\.crt}",
        ]);
        assert!(ok && !out.is_empty(), "{out}{err}");
        out
    };
    let first_ca = hubble_ca();
    // A second run upgrades in place (the seed's script is re-runnable),
    // and keeps the CA: agents started before it still trust the relay's
    // new certificate and it theirs.
    let (ok, out, err) = helm_in_lab(&install);
    assert!(ok && out.contains("REVISION: 2"), "{out}{err}");
    assert_eq!(hubble_ca(), first_ca, "the upgrade made a new Hubble CA");

    // What it made, as the seed's troubleshooting reads it.
    let (ok, crds, err) = kubectl(&["get", "crd", "-o", "name"]);
    assert!(
        ok && crds.contains("ciliumnetworkpolicies.cilium.io"),
        "{crds}{err}"
    );
    let (ok, cnps, err) = kubectl(&["get", "ciliumnetworkpolicies", "-A"]);
    assert!(ok, "{cnps}{err}");
    let (ok, ds, err) = kubectl(&["get", "ds", "-n", "kube-system", "fibril", "-o", "json"]);
    assert!(ok, "{err}");
    let ds: Value = serde_json::from_str(&ds).unwrap();
    assert_eq!(ds["spec"]["template"]["spec"]["hostNetwork"], true);
    let (ok, svc, err) = kubectl(&["get", "svc", "-n", "kube-system", "hubble-ui", "-o", "json"]);
    assert!(ok, "{err}");
    let svc: Value = serde_json::from_str(&svc).unwrap();
    assert_eq!(svc["spec"]["ports"][0]["nodePort"], 31235);
    // The lab's kubelets run the chart's pods as the real programs: an
    // agent per node (host network, configured by fibril-config through
    // --config-dir, its pod CIDR from its Node), and once their CNI
    // configuration is installed, the relay's and the UI's pods on the
    // pod network.
    let running = |selector: &str, count: usize| {
        let (ok, pods, _) = kubectl(&[
            "get",
            "pods",
            "-n",
            "kube-system",
            "-l",
            selector,
            "-o",
            "json",
        ]);
        let v: Value = serde_json::from_str(&pods).unwrap_or_default();
        let items = v["items"].as_array().cloned().unwrap_or_default();
        ok && items.len() == count
            && items
                .iter()
                .all(|p| p["status"]["phase"] == "Running" && p["status"]["podIP"].is_string())
    };
    eventually("an agent per node", Duration::from_secs(90), || {
        running("k8s-app=fibril", 2)
    });
    eventually(
        "the relay's and the UI's pods",
        Duration::from_secs(90),
        || running("k8s-app=hubble-relay", 1) && running("k8s-app=hubble-ui", 1),
    );
    for node in ["n1", "n2"] {
        let sock = format!(
            "/run/fibril/labs/{}/nodes/{node}/host/var/run/fibril/fibril.sock",
            lab.name
        );
        eventually(
            &format!("{node}'s agent following the API"),
            Duration::from_secs(30),
            || {
                let out = lab.fibril(&["--socket", &sock, "status"]);
                let status = String::from_utf8_lossy(&out.stdout).into_owned();
                status.contains("Kubernetes:    connected")
                    && status.contains(&format!("Node:          {node}"))
            },
        );
    }
    // The seed's `kubectl logs -n kube-system ds/cilium`, for Fibril's
    // DaemonSet: the API server fetches it from the node's kubelet.
    let (ok, logs, err) = kubectl(&["logs", "-n", "kube-system", "ds/fibril", "--tail=200"]);
    assert!(ok && logs.contains("agent ready"), "{logs}{err}");
    let (ok, logs, err) = kubectl(&[
        "logs",
        "-n",
        "kube-system",
        "ds/fibril",
        "-c",
        "install-cni",
    ]);
    assert!(ok && logs.contains("05-fibril.conflist"), "{logs}{err}");
    // The chart's agents enforce policy: a web server, two clients.
    for (name, args) in [
        ("web", vec!["--image=fibril/echo", "--port=8080"]),
        ("client", vec!["--image=busybox", "--", "sleep", "3600"]),
        ("other", vec!["--image=busybox", "--", "sleep", "3600"]),
    ] {
        let mut a = vec!["create", "deployment", name];
        a.extend(args);
        let (ok, _, err) = kubectl(&a);
        assert!(ok, "{err}");
    }
    let pod_of = |app: &str| {
        let (_, pods, _) = kubectl(&["get", "pods", "-l", &format!("app={app}"), "-o", "json"]);
        let v: Value = serde_json::from_str(&pods).unwrap_or_default();
        let p = &v["items"][0];
        (
            p["metadata"]["name"].as_str().map(str::to_string),
            p["status"]["podIP"].as_str().map(str::to_string),
        )
    };
    eventually("the workloads", Duration::from_secs(60), || {
        ["web", "client", "other"]
            .iter()
            .all(|a| pod_of(a).1.is_some())
    });
    let web_ip = pod_of("web").1.unwrap();
    let reaches = |app: &str| {
        let pod = format!("default/{}", pod_of(app).0.unwrap());
        let out = lab.fibril(&[
            "lab",
            "exec",
            &pod,
            "--",
            "fibril-echo",
            "http-get",
            "--timeout",
            "2",
            &format!("http://{web_ip}:8080/"),
        ]);
        out.status.success()
    };
    eventually("web reachable from both", Duration::from_secs(30), || {
        reaches("client") && reaches("other")
    });
    let file = std::env::temp_dir().join(format!("{}-cnp.yaml", lab.name));
    std::fs::write(&file, "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: web-from-client, namespace: default}\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: client}}]\n").unwrap();
    let (ok, _, err) = kubectl(&["apply", "-f", file.to_str().unwrap()]);
    std::fs::remove_file(&file).ok();
    assert!(ok, "{err}");
    eventually(
        "the chart's agents enforcing it",
        Duration::from_secs(30),
        || !reaches("other"),
    );
    assert!(reaches("client"));

    // The seed's Hubble Relay sees the whole cluster: a pod reaches it
    // through its Service (the per-packet LB), and it found the nodes
    // through hubble-peer (the address the kubelet's service variables
    // gave it; internalTrafficPolicy Local: its own node's agent), then
    // each node's Hubble over mTLS.
    let (ok, relay, err) = kubectl(&[
        "get",
        "svc",
        "-n",
        "kube-system",
        "hubble-relay",
        "-o",
        "json",
    ]);
    assert!(ok, "{err}");
    let relay: Value = serde_json::from_str(&relay).unwrap();
    let relay_ip = relay["spec"]["clusterIP"].as_str().unwrap().to_string();
    let client = format!("default/{}", pod_of("client").0.unwrap());
    let hubble = test_support::hubble_cli();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        let out = lab.fibril(&[
            "lab",
            "exec",
            &client,
            "--",
            hubble.to_str().unwrap(),
            "status",
            "--server",
            &format!("{relay_ip}:80"),
            "--timeout",
            "5s",
        ]);
        let status = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        if status.contains("Connected Nodes: 2/2") || std::time::Instant::now() > deadline {
            break status;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    if !status.contains("Connected Nodes: 2/2") {
        let (_, logs, err) = kubectl(&[
            "logs",
            "-n",
            "kube-system",
            "deploy/hubble-relay",
            "--tail=40",
        ]);
        panic!("the relay through its service: {status}\nrelay's log:\n{logs}{err}");
    }

    // The seed's Hubble UI on NodePort 31235 of every node (kube-proxy's
    // NodePort, the UI pod on the chart's pod network): from node n1 to
    // each node's port.
    for n in 0..2 {
        let address = st["nodes"][n]["address"].as_str().unwrap().to_string();
        let url = format!("http://{address}:31235/healthz");
        eventually(&format!("the UI on {url}"), Duration::from_secs(30), || {
            lab.fibril(&[
                "lab",
                "exec",
                "node/n1",
                "--",
                "fibril-echo",
                "http-get",
                "--timeout",
                "2",
                &url,
            ])
            .status
            .success()
        });
    }

    // helm uninstall removes what it installed (CRDs stay, as with any
    // chart's crds/: policies outlive a reinstall).
    let (ok, out, err) = helm_in_lab(&[
        "uninstall".into(),
        "cilium".into(),
        "--namespace".into(),
        "kube-system".into(),
        "--wait".into(),
    ]);
    assert!(ok, "{out}{err}");
    // The kubelets stop the agents whose pods went.
    eventually("the agents' pods gone", Duration::from_secs(60), || {
        let (ok, pods, _) = kubectl(&["get", "pods", "-n", "kube-system", "-o", "name"]);
        ok && pods.trim().is_empty()
    });
    for (kind, name) in [
        ("ds", "fibril"),
        ("deploy", "hubble-relay"),
        ("svc", "hubble-ui"),
        ("svc", "hubble-peer"),
        ("configmap", "fibril-config"),
        ("clusterrole", "fibril"),
    ] {
        let (ok, _, err) = kubectl(&["get", kind, "-n", "kube-system", name]);
        assert!(
            !ok && err.contains("NotFound"),
            "{kind} {name} outlived the uninstall: {err}"
        );
    }
}
