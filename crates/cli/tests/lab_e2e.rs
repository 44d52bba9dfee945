//! Tier 5: end to end on a real lab: agent + CNI + CLI, real pods in
//! network namespaces, real packets. Each test runs its own lab (unique
//! name, unique pod CIDR) and removes it even when it fails. Needs root.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{bin, custom_lab, wait_until, Lab};
use serde_json::Value;

#[test]
fn default_lab_enforces_the_seed_policy_in_the_kernel() {
    let lab = Lab::default_lab();
    wait_until("backend to listen", || {
        lab.backend_log().contains("listening")
    });

    assert!(
        lab.get("frontend", "3"),
        "frontend -> backend:8080 must succeed"
    );
    assert!(
        !lab.get("other-client", "1"),
        "other-client -> backend:8080 must fail"
    );

    // The kernel dropped the SYN: the server socket never saw other-client.
    let log = lab.backend_log();
    assert!(log.contains(&format!("accepted {}:", lab.ip(2))), "{log}");
    assert!(!log.contains(&format!("accepted {}:", lab.ip(4))), "{log}");

    wait_until("the drop flow", || {
        lab.flows().iter().any(|f| f["verdict"] == "DROPPED")
    });
    let flows = lab.flows();
    let drop = flows
        .iter()
        .find(|f| f["verdict"] == "DROPPED" && f["source"]["pod_name"] == "other-client")
        .expect("a DROPPED flow from other-client");
    assert_eq!(drop["drop_reason_desc"], "POLICY_DENIED");
    assert_eq!(drop["destination"]["pod_name"], "backend");
    assert_eq!(drop["destination"]["namespace"], "microservices");
    assert_eq!(drop["traffic_direction"], "INGRESS");
    assert_eq!(drop["l4"]["TCP"]["destination_port"], 8080);
    assert!(flows.iter().any(|f| f["verdict"] == "FORWARDED"
        && f["source"]["pod_name"] == "frontend"
        && f["destination"]["pod_name"] == "backend"
        && f["trace_observation_point"] == "TO_ENDPOINT"));

    let compact = String::from_utf8(
        lab.fibril(&["observe", "--verdict", "DROPPED", "--last", "5"])
            .stdout,
    )
    .unwrap();
    assert!(
        compact.contains("microservices/other-client:")
            && compact.contains("-> microservices/backend:8080")
            && compact.contains("Policy denied DROPPED"),
        "{compact}"
    );
    let filtered = String::from_utf8(
        lab.fibril(&["observe", "--from-pod", "microservices/frontend", "--all"])
            .stdout,
    )
    .unwrap();
    assert!(
        !filtered.contains("other-client") && filtered.contains("frontend"),
        "{filtered}"
    );
    // A field mask: only the named fields come back.
    let masked = String::from_utf8(
        lab.fibril(&[
            "observe",
            "-o",
            "json",
            "--field-mask",
            "verdict,source.pod_name",
            "--last",
            "3",
        ])
        .stdout,
    )
    .unwrap();
    let masked: Vec<Value> = masked
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(masked.len(), 3);
    for f in &masked {
        let keys: Vec<&String> = f["flow"].as_object().unwrap().keys().collect();
        assert_eq!(keys, ["source", "verdict"], "{f}");
        let source: Vec<&String> = f["flow"]["source"].as_object().unwrap().keys().collect();
        assert_eq!(source, ["pod_name"], "{f}");
    }
    // Policy-verdict events: the backend's policy allowed the frontend's
    // connection and denied other-client's, each with how it matched.
    let verdicts = String::from_utf8(
        lab.fibril(&["observe", "-t", "policy-verdict", "--all"])
            .stdout,
    )
    .unwrap();
    assert!(
        verdicts.contains("policy-verdict:L3-L4 INGRESS ALLOWED")
            && verdicts.contains("policy-verdict:none INGRESS DENIED"),
        "{verdicts}"
    );

    // Deleting the policy restores reachability, without restarting anything.
    let del = lab.fibril(&[
        "policy",
        "delete",
        "microservices/allow-frontend-to-backend",
    ]);
    assert!(
        del.status.success(),
        "{}",
        String::from_utf8_lossy(&del.stderr)
    );
    assert!(
        lab.get("other-client", "3"),
        "other-client reaches backend once the policy is gone"
    );
}

#[test]
fn agent_restart_keeps_connections_addresses_and_identities() {
    let lab = Lab::default_lab();
    wait_until("backend to listen", || {
        lab.backend_log().contains("listening")
    });
    let before = lab.endpoints();

    // A connection that stays open across the restart, one request per 100 ms.
    let url = format!("{}:8080", lab.ip(3));
    let hold = lab.hold("microservices/frontend", &url, "4");
    std::thread::sleep(Duration::from_millis(500));
    let bound = |file: &str| {
        std::fs::read_to_string(format!("/run/fibril/labs/{}/state/{file}", lab.name)).unwrap()
    };
    let ports_before = (bound("metrics.addr"), bound("hubble-metrics.addr"));
    let restart = lab.fibril(&["lab", "restart-agent"]);
    assert!(
        restart.status.success(),
        "{}",
        String::from_utf8_lossy(&restart.stderr)
    );
    // The first agent left through its drain (SIGTERM): the local API
    // closed, Hubble's calls ended, the state written whole, in bounded
    // time, not killed mid-change.
    let agent_log =
        std::fs::read_to_string(format!("/run/fibril/labs/{}/agent.log", lab.name)).unwrap();
    let drained = agent_log
        .lines()
        .find(|l| l.contains("agent drained"))
        .unwrap_or_else(|| panic!("no drain in the agent's log:\n{agent_log}"));
    assert!(drained.contains("state written"), "{drained}");
    assert!(
        agent_log
            .lines()
            .any(|l| l.contains("draining") && l.contains("SIGTERM")),
        "{agent_log}"
    );
    // The restarted agent listens where the first one did.
    let ports_after = (bound("metrics.addr"), bound("hubble-metrics.addr"));
    assert_eq!(ports_before, ports_after);
    let held = hold.wait_with_output().unwrap();
    assert!(
        held.status.success(),
        "the held connection broke: {} {}",
        String::from_utf8_lossy(&held.stdout),
        String::from_utf8_lossy(&held.stderr)
    );

    let after = lab.endpoints();
    let key = |v: &Value| -> Vec<(String, String, u64)> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|e| {
                (
                    e["pod_name"].as_str().unwrap().to_string(),
                    e["ipv4"].as_str().unwrap().to_string(),
                    e["identity"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    assert_eq!(key(&before), key(&after));
    // Policy is still enforced after the restart.
    assert!(!lab.get("other-client", "1"));
    assert!(lab.get("frontend", "3"));
}

#[test]
fn bad_input_gets_a_precise_error_and_changes_nothing() {
    // A malformed lab file: nothing is created.
    let dir = std::env::temp_dir().join(format!("fibril-e2e-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bad_lab = dir.join("bad.yaml");
    std::fs::write(
        &bad_lab,
        "pods:\n  - name: web\n    labels: {app: web}\n    comand: [x]\n",
    )
    .unwrap();
    let name = format!("bad{}", std::process::id() % 100_000);
    let out = Command::new(bin("fibril"))
        .args(["--lab", &name, "lab", "up", "-f", bad_lab.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(err.contains("pods[0]") && err.contains("comand"), "{err}");
    assert!(!Path::new(&format!("/run/fibril/labs/{name}")).exists());
    std::fs::write(
        &bad_lab,
        "pods:\n  - name: web\n    workload: {kind: deployment, name: web}\n",
    )
    .unwrap();
    let out = Command::new(bin("fibril"))
        .args(["--lab", &name, "lab", "up", "-f", bad_lab.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("pods[0].workload") && err.contains("\"deployment\" is not a Kubernetes kind"),
        "{err}"
    );
    assert!(!Path::new(&format!("/run/fibril/labs/{name}")).exists());
    // A host-network pod needs a node of the lab's own (in a one-node lab
    // its namespace would be this machine's).
    std::fs::write(
        &bad_lab,
        "pods:\n  - name: hn\n    hostNetwork: true\n    command: [fibril-echo, http-server, --port, \"8080\"]\n",
    )
    .unwrap();
    let out = Command::new(bin("fibril"))
        .args(["--lab", &name, "lab", "up", "-f", bad_lab.to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("pods[0].hostNetwork: only in a lab with `nodes:`"),
        "{err}"
    );
    assert!(!Path::new(&format!("/run/fibril/labs/{name}")).exists());
    // The host firewall, kube-proxy replacement and node ports: refused
    // where they cannot work, with the reason.
    for (yaml, says) in [
        ("hostFirewall: {enabled: true}\npods: []\n", "hostFirewall: only in a lab with `nodes:`"),
        ("nodes: [a, b]\nhostFirewall: {audit: true}\npods: []\n", "hostFirewall.audit needs hostFirewall.enabled"),
        ("nodes: [a, b]\nnodeLabels: {c: {x: v}}\npods: []\n", "nodeLabels.c: no such node"),
        ("nodes: [a, b]\nnodeLabels: {a: {\"bad key!\": v}}\npods: []\n", "nodeLabels.a.bad key!"),
        ("nodes: [a, b]\nkubeProxyReplacement: true\nmaglevTableSize: 1000\npods: []\n", "maglevTableSize: 1000: one of"),
        ("nodes: [a, b]\nmaglevTableSize: 1021\npods: []\n", "maglevTableSize needs kubeProxyReplacement"),
        (
            "nodes: [a, b]\npods: []\nservices:\n- {name: w, type: NodePort, ports: [{port: 80, nodePort: 30080}]}\n",
            "services of type NodePort need kubeProxyReplacement",
        ),
        (
            "nodes: [a, b]\nkubeProxyReplacement: true\npods: []\nservices:\n- {name: w, type: NodePort, ports: [{port: 80, nodePort: 80}]}\n",
            "outside Kubernetes' NodePort range",
        ),
    ] {
        std::fs::write(&bad_lab, yaml).unwrap();
        let out = Command::new(bin("fibril"))
            .args(["--lab", &name, "lab", "up", "-f", bad_lab.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(says), "{yaml}: {err}");
        assert!(!Path::new(&format!("/run/fibril/labs/{name}")).exists());
    }
    // Pod CIDRs the agent cannot use are refused up front, not after a wait.
    for (cidr, why) in [
        (
            "10.233.0.1/24",
            "has host bits set (did you mean 10.233.0.0/24?)",
        ),
        ("10.233.0.0/31", "the prefix length must be 8-30"),
        ("10.0.0.0/7", "the prefix length must be 8-30"),
    ] {
        std::fs::write(&bad_lab, format!("podCIDR: {cidr}\npods: []\n")).unwrap();
        let out = Command::new(bin("fibril"))
            .args(["--lab", &name, "lab", "up", "-f", bad_lab.to_str().unwrap()])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success());
        assert!(
            err.contains(&format!("podCIDR: {}", cidr.split('/').next().unwrap()))
                && err.contains(why),
            "{cidr}: {err}"
        );
        assert!(!Path::new(&format!("/run/fibril/labs/{name}")).exists());
    }
    std::fs::remove_dir_all(&dir).ok();

    // A bad policy on a running lab: refused, policies unchanged.
    let lab = Lab::default_lab();
    let policies_before = lab.fibril(&["policy", "get"]).stdout;
    let bad_policy = lab.dir.join("bad-policy.yaml");
    std::fs::write(
        &bad_policy,
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {}\n  ingress:\n  - toPorts:\n    - ports: [{port: \"70000\", protocol: TCP}]\n",
    )
    .unwrap();
    let out = lab.fibril(&["policy", "import", bad_policy.to_str().unwrap()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        err.contains("document 1")
            && err.contains("spec.ingress[0].toPorts[0].ports[0].port")
            && err.contains("70000"),
        "{err}"
    );
    assert_eq!(lab.fibril(&["policy", "get"]).stdout, policies_before);
    assert!(lab.get("frontend", "3"));
}

#[test]
fn observe_follow_streams_new_flows_through_filters() {
    use std::io::BufRead;
    let lab = Lab::default_lab();
    wait_until("backend to listen", || {
        lab.backend_log().contains("listening")
    });
    let mut follow = Command::new(bin("fibril"))
        .args([
            "--lab",
            &lab.name,
            "observe",
            "-f",
            "--verdict",
            "DROPPED",
            "--protocol",
            "tcp",
            "-o",
            "json",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = follow.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(lab.get("frontend", "3"));
    assert!(!lab.get("other-client", "1"));
    let line = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("a followed flow");
    let v: Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["flow"]["verdict"], "DROPPED");
    assert_eq!(v["flow"]["source"]["pod_name"], "other-client");
    // Forwarded flows of the allowed request were filtered out on the server.
    // The refused client may still retransmit its SYN, so more drops may come;
    // anything else is a filter leak.
    while let Ok(line) = rx.recv_timeout(Duration::from_millis(300)) {
        let v: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["flow"]["verdict"], "DROPPED", "{line}");
        assert_eq!(v["flow"]["source"]["pod_name"], "other-client", "{line}");
    }
    follow.kill().unwrap();
    follow.wait().unwrap();

    // `--not` negates the next filter only: no forwarded flow, but the drop.
    let out = lab.fibril(&[
        "observe",
        "--not",
        "--verdict",
        "FORWARDED",
        "--protocol",
        "tcp",
        "-o",
        "json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let verdicts: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap()["flow"]["verdict"].to_string())
        .collect();
    assert!(
        verdicts.contains(&"\"DROPPED\"".to_string()),
        "{verdicts:?}"
    );
    assert!(
        !verdicts.contains(&"\"FORWARDED\"".to_string()),
        "{verdicts:?}"
    );

    // `--time-format` reaches the printed line.
    let out = lab.fibril(&["observe", "--last", "1", "--time-format", "RFC3339Milli"]);
    let line = String::from_utf8_lossy(&out.stdout).to_string();
    let stamp = line.split(": ").next().unwrap_or("");
    // Go's `.999`: up to three fractional digits, trailing zeros dropped.
    let fraction = stamp.get(20..stamp.len().saturating_sub(1)).unwrap_or("");
    assert!(
        (20..=24).contains(&stamp.len())
            && stamp.as_bytes()[10] == b'T'
            && stamp.ends_with('Z')
            && fraction.len() <= 3
            && !fraction.ends_with('0'),
        "{line}"
    );

    // Flows name the host-side veth the datapath saw them on, and
    // `--interface` selects by it.
    let ifnames: Vec<String> = lab
        .endpoints()
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["host_ifname"].as_str().unwrap().to_string())
        .collect();
    let json_flows = |args: &[&str]| lab.observe_json(args);
    let dropped = json_flows(&["--verdict", "DROPPED", "--last", "1"]);
    let seen_on = dropped[0]["interface"]["name"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(ifnames.contains(&seen_on), "{seen_on} in {ifnames:?}");
    assert!(dropped[0]["interface"]["index"].as_u64().unwrap() > 0);
    let on_it = json_flows(&["--interface", &seen_on]);
    assert!(!on_it.is_empty());
    assert!(on_it
        .iter()
        .all(|v| v["interface"]["name"] == seen_on.as_str()));
    assert!(json_flows(&["--interface", "no-such-if0"]).is_empty());

    // Pods carry their owning workload (the lab's `workload`), and the
    // workload flags select by kind and name as Hubble's do.
    let from_other = json_flows(&["--from-workload", "Deployment/other-client"]);
    assert!(!from_other.is_empty());
    for v in &from_other {
        assert_eq!(
            v["source"]["workloads"],
            serde_json::json!([{"name": "other-client", "kind": "Deployment"}]),
            "{v}"
        );
    }
    let backend = json_flows(&["--workload", "backend"]);
    assert!(!backend.is_empty());
    assert!(
        backend
            .iter()
            .all(|v| v["source"]["pod_name"] == "backend"
                || v["destination"]["pod_name"] == "backend")
    );
    assert!(json_flows(&["--workload", "StatefulSet/"]).is_empty());

    // `--color always` paints the verdict as the CLI does; piped output is plain.
    let out = lab.fibril(&[
        "observe",
        "--verdict",
        "DROPPED",
        "--last",
        "1",
        "--color",
        "always",
    ]);
    let colored = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(colored.contains("\x1b[31mDROPPED\x1b[0m"), "{colored}");
    assert!(!line.contains('\x1b'), "auto: no colour into a pipe");

    // Bad filter values are refused, not silently matched against nothing.
    let bad = lab.fibril(&["observe", "--verdict", "MAYBE"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("is not one of FORWARDED"));
}

#[test]
fn lab_down_removes_everything_it_created_and_nothing_else() {
    // Something of ours that is not the lab's must survive `lab down`.
    let bystander = format!("fibril-bystander-{}", std::process::id() % 100_000);
    assert!(Command::new("ip")
        .args(["netns", "add", &bystander])
        .status()
        .unwrap()
        .success());
    struct Remove(String);
    impl Drop for Remove {
        fn drop(&mut self) {
            let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
        }
    }
    let _bystander = Remove(bystander.clone());

    let lab = Lab::default_lab();
    let netns_prefix = format!("fibril-{}-", lab.name);
    let host_links: Vec<String> = lab
        .endpoints()
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["host_ifname"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(host_links.len(), 3);
    let ours = |name: &str| name.starts_with(&netns_prefix);
    let netns = || -> Vec<String> {
        std::fs::read_dir("/run/netns")
            .map(|d| {
                d.filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default()
    };
    assert_eq!(netns().iter().filter(|n| ours(n)).count(), 3);
    // The L7 proxy's policy-routing rule (its mark is the agent's own).
    let record =
        std::fs::read_to_string(format!("/run/fibril/labs/{}/state/proxy-routing", lab.name))
            .unwrap();
    let mark: u32 = record.split_whitespace().next().unwrap().parse().unwrap();
    let mark = format!("fwmark {mark:#x} ");
    let rules = || {
        String::from_utf8_lossy(&Command::new("ip").args(["rule"]).output().unwrap().stdout)
            .to_string()
    };
    assert!(rules().contains(&mark), "{}", rules());

    let down = lab.fibril(&["lab", "down"]);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    assert!(netns().iter().all(|n| !ours(n)), "pod namespaces removed");
    assert!(
        netns().contains(&bystander),
        "a namespace the lab did not create is untouched"
    );
    for l in &host_links {
        assert!(!Path::new("/sys/class/net").join(l).exists(), "{l} removed");
    }
    assert!(
        !Path::new(&format!("/sys/fs/bpf/fibril-{}", lab.name)).exists(),
        "pinned maps and links removed"
    );
    assert!(
        !Path::new(&format!("/run/fibril/labs/{}", lab.name)).exists(),
        "lab state removed"
    );
    assert!(!rules().contains(&mark), "{}", rules());
    // A second `down` says the lab is not up, and changes nothing.
    let again = lab.fibril(&["lab", "down"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("is not up"));
}

const SEMANTICS_LAB: &str = r#"
podCIDR: POD_CIDR_HERE
namespaces:
  - {name: x, labels: {team: x}}
  - {name: "y", labels: {team: "y"}}
pods:
  - name: server
    namespace: x
    labels: {app: server}
    ports: [{name: web, containerPort: 8080}]
    command: [fibril-echo, http-server, --port, "8080"]
  - name: server2
    namespace: x
    labels: {app: server2}
    command: [fibril-echo, http-server, --port, "9090"]
  - {name: client-a, namespace: x, labels: {app: client, role: a}}
  - {name: client-b, namespace: "y", labels: {app: client, role: b}}
policies:
  - inline: |
      # Named port; fromEndpoints is namespace-scoped: only x/client-a.
      apiVersion: cilium.io/v2
      kind: CiliumNetworkPolicy
      metadata: {name: allow-web, namespace: x}
      spec:
        endpointSelector: {matchLabels: {app: server}}
        ingress:
        - fromEndpoints: [{matchLabels: {app: client}}]
          toPorts: [{ports: [{port: web, protocol: TCP}]}]
  - inline: |
      # A port range for every client; a deny for role b beats it.
      apiVersion: cilium.io/v2
      kind: CiliumClusterwideNetworkPolicy
      metadata: {name: server2-range}
      spec:
        endpointSelector: {matchLabels: {app: server2}}
        ingress:
        - fromEndpoints: [{matchLabels: {app: client}}]
          toPorts: [{ports: [{port: "9000", endPort: 9100, protocol: TCP}]}]
        ingressDeny:
        - fromEndpoints: [{matchLabels: {role: b}}]
  - inline: |
      # Kubernetes NetworkPolicy: y's clients may only reach namespace x on 8080 and 9090.
      apiVersion: networking.k8s.io/v1
      kind: NetworkPolicy
      metadata: {name: y-egress, namespace: "y"}
      spec:
        podSelector: {matchLabels: {app: client}}
        policyTypes: [Egress]
        egress:
        - to: [{namespaceSelector: {matchLabels: {team: x}}}]
          ports: [{port: 8080}, {port: 9090}]
  - inline: |
      # Audit mode: client-a's egress would be default-deny; it is only reported.
      apiVersion: cilium.io/v2
      kind: CiliumNetworkPolicy
      metadata:
        name: audit-client-a
        namespace: x
        annotations: {policy.fibril.io/audit-mode: "true"}
      spec:
        endpointSelector: {matchLabels: {role: a}}
        egress:
        - toEndpoints: [{matchLabels: {app: nothing-here}}]
"#;

#[test]
fn policy_language_semantics_hold_in_the_kernel() {
    let lab = custom_lab(SEMANTICS_LAB);
    wait_until("servers to listen", || {
        let log = |p: &str| {
            std::fs::read_to_string(format!("/run/fibril/labs/{}/pods/x_{p}.log", lab.name))
                .unwrap_or_default()
        };
        log("server").contains("listening") && log("server2").contains("listening")
    });
    // Pods were created in this order: server .2, server2 .3, client-a .4, client-b .5.
    let get = |from: &str, ip: u8, port: u16, timeout: &str| {
        lab.http_get(from, &format!("http://{}:{port}/", lab.ip(ip)), timeout)
    };
    assert!(
        get("x/client-a", 2, 8080, "3"),
        "named port 'web' resolves to 8080 for x/client-a"
    );
    assert!(
        !get("y/client-b", 2, 8080, "1"),
        "namespace injection: y/client-b is not selected"
    );
    assert!(
        get("x/client-a", 3, 9090, "3"),
        "9090 is inside the 9000-9100 range"
    );
    assert!(
        !get("y/client-b", 3, 9090, "1"),
        "the deny for role b wins over the range allow"
    );
    assert!(
        !get("y/client-b", 3, 7000, "1"),
        "the NetworkPolicy allows y's egress only on 8080 and 9090"
    );

    wait_until("all drop flows", || {
        lab.flows()
            .iter()
            .filter(|f| f["verdict"] == "DROPPED")
            .count()
            >= 3
    });
    let flows = lab.flows();
    let drop_to = |port: u64| {
        flows
            .iter()
            .find(|f| {
                f["verdict"] == "DROPPED"
                    && f["source"]["pod_name"] == "client-b"
                    && f["l4"]["TCP"]["destination_port"] == port
            })
            .unwrap_or_else(|| panic!("a drop to port {port}"))
    };
    let d8080 = drop_to(8080);
    assert_eq!(
        (
            d8080["drop_reason_desc"].as_str(),
            d8080["traffic_direction"].as_str()
        ),
        (Some("POLICY_DENIED"), Some("INGRESS"))
    );
    let d9090 = drop_to(9090);
    assert_eq!(d9090["drop_reason_desc"], "POLICY_DENY");
    assert_eq!(d9090["ingress_denied_by"][0]["name"], "server2-range");
    assert_eq!(
        d9090["ingress_denied_by"][0]["kind"],
        "CiliumClusterwideNetworkPolicy"
    );
    let d7000 = drop_to(7000);
    assert_eq!(
        (
            d7000["drop_reason_desc"].as_str(),
            d7000["traffic_direction"].as_str()
        ),
        (Some("POLICY_DENIED"), Some("EGRESS"))
    );
    // Attribution of allowed connections.
    assert!(flows
        .iter()
        .any(|f| f["ingress_allowed_by"][0]["name"] == "allow-web"
            && f["source"]["pod_name"] == "client-a"));
    assert!(flows
        .iter()
        .any(|f| f["egress_allowed_by"][0]["name"] == "y-egress"
            && f["egress_allowed_by"][0]["kind"] == "NetworkPolicy"));
    // Audit: client-a's egress was forwarded and reported.
    let audit = flows
        .iter()
        .find(|f| f["verdict"] == "AUDIT" && f["source"]["pod_name"] == "client-a")
        .expect("an AUDIT flow for client-a");
    assert_eq!(audit["traffic_direction"], "EGRESS");
    let compact = String::from_utf8(
        lab.fibril(&["observe", "--all", "--verdict", "AUDIT"])
            .stdout,
    )
    .unwrap();
    assert!(
        compact.contains("policy-verdict:none EGRESS AUDITED"),
        "{compact}"
    );

    // Explain.
    let trace = |from: &str, to: &str, port: &str| {
        let out = lab.fibril(&[
            "policy", "trace", "--from", from, "--to", to, "--port", port,
        ]);
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    let (code, text) = trace("x/client-a", "x/server", "8080/TCP");
    assert_eq!(code, Some(0), "{text}");
    assert!(
        text.contains("allowed by CiliumNetworkPolicy x/allow-web rule 0 (ingress[0])"),
        "{text}"
    );
    let (code, text) = trace("y/client-b", "x/server", "8080/TCP");
    assert_eq!(code, Some(2), "{text}");
    assert!(
        text.contains("allowed by NetworkPolicy y/y-egress"),
        "{text}"
    );
    assert!(
        text.contains("default deny: selected by x/allow-web"),
        "{text}"
    );
    let (code, text) = trace("y/client-b", "x/server2", "9090/TCP");
    assert_eq!(code, Some(2));
    assert!(
        text.contains("denied by CiliumClusterwideNetworkPolicy server2-range rule 0 (ingress[1])"),
        "{text}"
    );
    let bad = lab.fibril(&[
        "policy", "trace", "--from", "x/nobody", "--to", "x/server", "--port", "80",
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("no endpoint for pod x/nobody"));
}

const WORLD_LAB: &str = r#"
podCIDR: POD_CIDR_HERE
pods:
  - {name: client, namespace: w, labels: {app: client}}
  - {name: open, namespace: w, labels: {app: open}}
  - name: web
    namespace: w
    labels: {app: web}
    command: [fibril-echo, http-server, --port, "8080"]
externals:
  - {name: inside, address: 203.0.113.10, command: [fibril-echo, http-server, --port, "8080"]}
  - {name: excepted, address: 203.0.113.200, command: [fibril-echo, http-server, --port, "8080"]}
policies:
  - inline: |
      apiVersion: cilium.io/v2
      kind: CiliumNetworkPolicy
      metadata: {name: client-to-cidr, namespace: w}
      spec:
        endpointSelector: {matchLabels: {app: client}}
        egress:
        - toCIDRSet: [{cidr: 203.0.113.0/24, except: [203.0.113.128/25]}]
          toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
  - inline: |
      apiVersion: cilium.io/v2
      kind: CiliumNetworkPolicy
      metadata: {name: open-to-world, namespace: w}
      spec:
        endpointSelector: {matchLabels: {app: open}}
        egress:
        - toEntities: [world]
  - inline: |
      apiVersion: cilium.io/v2
      kind: CiliumNetworkPolicy
      metadata: {name: web-from-cidr, namespace: w}
      spec:
        endpointSelector: {matchLabels: {app: web}}
        ingress:
        - fromCIDR: [203.0.113.0/25]
"#;

#[test]
fn cidr_sets_with_except_and_the_world_entity_hold_in_the_kernel() {
    let lab = custom_lab(WORLD_LAB);
    let log = |f: &str| {
        std::fs::read_to_string(format!("/run/fibril/labs/{}/pods/{f}.log", lab.name))
            .unwrap_or_default()
    };
    wait_until("servers to listen", || {
        log("w_web").contains("listening")
            && log("external_inside").contains("listening")
            && log("external_excepted").contains("listening")
    });
    let get = |from: &str, host: &str, timeout: &str| {
        lab.http_get(from, &format!("http://{host}:8080/"), timeout)
    };
    let web = lab.ip(4);
    assert!(get("w/client", "203.0.113.10", "3"), "inside the CIDR set");
    assert!(
        !get("w/client", "203.0.113.200", "1"),
        "in the except range"
    );
    assert!(
        !get("w/client", &web, "1"),
        "a CIDR rule never selects a pod"
    );
    assert!(
        get("w/open", "203.0.113.200", "3"),
        "world includes every CIDR identity"
    );
    assert!(!get("w/open", &web, "1"), "pods are not the world");
    assert!(
        get("external/inside", &web, "3"),
        "fromCIDR 203.0.113.0/25 admits .10"
    );
    assert!(!get("external/excepted", &web, "1"), "and not .200");
    assert!(
        !log("w_web").contains("accepted 203.0.113.200"),
        "the kernel dropped it before the socket"
    );

    let flows = lab.flows();
    let drop = flows
        .iter()
        .find(|f| f["verdict"] == "DROPPED" && f["IP"]["destination"] == "203.0.113.200")
        .expect("the drop to the excepted address");
    let id = drop["destination"]["identity"].as_u64().unwrap();
    assert!(id > 1 << 24, "a node-local CIDR identity, found {id}");
    let from_world = flows
        .iter()
        .find(|f| f["verdict"] == "DROPPED" && f["IP"]["source"] == "203.0.113.200")
        .expect("the drop from the excepted address");
    assert_eq!(from_world["destination"]["pod_name"], "web");
    let out = lab.fibril(&[
        "policy",
        "trace",
        "--from",
        "w/client",
        "--to",
        "203.0.113.200",
        "--port",
        "8080/TCP",
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{text}");
    assert!(
        text.contains("default deny: selected by w/client-to-cidr"),
        "{text}"
    );
}

const AUDIT_AND_OVERFLOW_LAB: &str = r#"
podCIDR: POD_CIDR_HERE
namespaces:
  - {name: aud, auditMode: true}
pods:
  - {name: srv, namespace: aud, labels: {app: srv}, command: [fibril-echo, http-server, --port, "8080"]}
  - {name: cli, namespace: aud, labels: {app: cli}}
  - {name: bsrv, namespace: big, labels: {app: bsrv}, command: [fibril-echo, http-server, --port, "8080"]}
  - {name: bcli, namespace: big, labels: {app: bcli}}
policies:
  - inline: |
      apiVersion: cilium.io/v2
      kind: CiliumNetworkPolicy
      metadata: {name: lock-srv, namespace: aud}
      spec:
        endpointSelector: {matchLabels: {app: srv}}
        ingress: [{}]
"#;

#[test]
fn namespace_audit_mode_and_policy_map_overflow() {
    let lab = custom_lab(AUDIT_AND_OVERFLOW_LAB);
    let log = |f: &str| {
        std::fs::read_to_string(format!("/run/fibril/labs/{}/pods/{f}.log", lab.name))
            .unwrap_or_default()
    };
    wait_until("servers", || {
        log("aud_srv").contains("listening") && log("big_bsrv").contains("listening")
    });
    let get = |from: &str, ip: u8, timeout: &str| {
        lab.http_get(from, &format!("http://{}:8080/", lab.ip(ip)), timeout)
    };
    // srv .2, cli .3, bsrv .4, bcli .5
    assert!(
        get("aud/cli", 2, "3"),
        "audit mode forwards what the policy would drop"
    );
    wait_until("the AUDIT flow", || {
        lab.flows()
            .iter()
            .any(|f| f["verdict"] == "AUDIT" && f["destination"]["pod_name"] == "srv")
    });
    let off = lab.fibril(&["policy", "audit", "aud", "--off"]);
    assert!(off.status.success());
    assert!(
        !get("aud/cli", 2, "1"),
        "out of audit mode the policy drops"
    );

    // 16,400 allowed ports (8080 among them) cannot fit the 16,384 entries
    // of an endpoint's policy map: the endpoint fails closed, loudly.
    assert!(get("big/bcli", 4, "3"));
    let to_ports: Vec<String> = (0..410)
        .map(|c| {
            let ports: Vec<String> = (0..40)
                .map(|i| format!("{{port: \"{}\", protocol: TCP}}", 8080 + c * 40 + i))
                .collect();
            format!("{{ports: [{}]}}", ports.join(", "))
        })
        .collect();
    let big = lab.dir.join("big.yaml");
    std::fs::write(
        &big,
        format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: too-big, namespace: big}}\nspec:\n  endpointSelector: {{matchLabels: {{app: bsrv}}}}\n  ingress:\n  - toPorts: [{}]\n",
            to_ports.join(", ")
        ),
    )
    .unwrap();
    let out = lab.fibril(&["policy", "import", big.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !get("big/bcli", 4, "1"),
        "fails closed although 8080 is allowed"
    );
    let status = String::from_utf8(lab.fibril(&["status"]).stdout).unwrap();
    assert!(status.contains("1 endpoint(s) FAIL CLOSED"), "{status}");
    let eps = lab.endpoints();
    let bsrv = eps
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["pod_name"] == "bsrv")
        .unwrap();
    assert_eq!(bsrv["policy_overflow"], true);
    let agent_log =
        std::fs::read_to_string(format!("/run/fibril/labs/{}/agent.log", lab.name)).unwrap();
    assert!(agent_log.contains("policy map would overflow"));
    let metrics = lab.metrics();
    assert!(
        metrics.contains("\nfibril_policy_overflow_endpoints 1\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("\nfibril_endpoint_endpoints 4\n"),
        "{metrics}"
    );
    // Removing the policy heals it.
    assert!(lab
        .fibril(&["policy", "delete", "big/too-big"])
        .status
        .success());
    assert!(get("big/bcli", 4, "3"));
    let status = String::from_utf8(lab.fibril(&["status"]).stdout).unwrap();
    assert!(!status.contains("FAIL CLOSED"), "{status}");
}

#[test]
fn policy_validate_checks_files_without_an_agent() {
    let dir = std::env::temp_dir().join(format!("fibril-validate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let good = dir.join("good.yaml");
    std::fs::write(
        &good,
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: fqdn, namespace: shop}\nspec:\n  endpointSelector: {}\n  egress:\n  - toFQDNs: [{matchName: api.github.com}]\n    toPorts: [{ports: [{port: \"443\", protocol: TCP}]}]\n---\napiVersion: v1\nkind: Service\nmetadata: {name: s}\n",
    )
    .unwrap();
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {}\n  egress:\n  - toPorts: [{ports: [{port: \"80\", protocol: TCP}], rules: {http: [{method: \"GET(\"}]}}]\n").unwrap();
    let out = Command::new(bin("fibril"))
        .args(["--lab", "no-such-lab", "policy", "validate"])
        .arg(&good)
        .arg(&bad)
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(out.status.code(), Some(1), "one file is bad");
    assert!(
        stdout.contains("CiliumNetworkPolicy shop/fqdn is valid"),
        "{stdout}"
    );
    assert!(stdout.contains("document 2: skipped Service"), "{stdout}");
    assert!(
        stderr.contains("warning:") && stderr.contains("toFQDNs") && stderr.contains("DNS"),
        "{stderr}"
    );
    assert!(stderr.contains("bad.yaml: document 1: spec.egress[0].toPorts[0].rules.http[0].method: not a valid regular expression"), "{stderr}");
}

#[test]
fn hubble_api_serves_the_labs_flows_to_a_grpc_client() {
    use proto::flow as pb;
    use proto::observer::{
        get_flows_response::ResponseTypes, observer_client::ObserverClient, GetFlowsRequest,
    };
    let lab = Lab::default_lab();
    lab.seed_traffic();
    let addr = lab.hubble_address();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let (healthy, drops, status_version) = rt.block_on(async {
        // The lab serves the Hubble API on its root-only socket alone.
        let path = PathBuf::from(
            addr.trim()
                .strip_prefix("unix://")
                .expect("a unix:// address"),
        );
        let connector = hubble::client::unix_connector(path);
        let channel = tonic::transport::Endpoint::from_static("http://localhost")
            .connect_with_connector(connector)
            .await
            .unwrap();
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
        let healthy = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: "hubble.server.Observer".into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status;
        let mut client = ObserverClient::new(channel);
        let req = GetFlowsRequest {
            number: 10,
            whitelist: vec![pb::FlowFilter {
                verdict: vec![pb::Verdict::Dropped as i32],
                destination_pod: vec!["microservices/backend".into()],
                ..Default::default()
            }],
            ..Default::default()
        };
        let resp = client.get_flows(req).await.unwrap();
        let version = resp
            .metadata()
            .get("hubble-server-version")
            .map(|v| v.to_str().unwrap().to_string());
        let mut stream = resp.into_inner();
        let mut drops = Vec::new();
        while let Some(r) = stream.message().await.unwrap() {
            if let Some(ResponseTypes::Flow(f)) = r.response_types {
                drops.push(f);
            }
        }
        (healthy, drops, version)
    });
    assert_eq!(
        healthy,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    assert_eq!(status_version.as_deref(), Some("1.19.0"));
    assert!(!drops.is_empty());
    for f in &drops {
        assert_eq!(f.verdict, pb::Verdict::Dropped as i32);
        assert_eq!(f.drop_reason_desc, pb::DropReason::PolicyDenied as i32);
        assert_eq!(f.source.as_ref().unwrap().pod_name, "other-client");
        assert_eq!(f.destination.as_ref().unwrap().pod_name, "backend");
        assert_eq!(f.node_name, format!("{}-node", lab.name));
        // The drop, and (as in Cilium) the policy verdict before it.
        assert!([1, 5].contains(&f.event_type.unwrap().r#type), "{f:?}");
    }
    for kind in [1, 5] {
        assert!(
            drops.iter().any(|f| f.event_type.unwrap().r#type == kind),
            "no event of type {kind}"
        );
    }
    // The hubble CLI's other commands, through `fibril`.
    let out = |args: &[&str]| String::from_utf8(lab.fibril(args).stdout).unwrap();
    let status = out(&["status"]);
    assert!(
        status.contains("Healthcheck (via unix:///run/fibril/labs/") && status.contains("): Ok"),
        "{status}"
    );
    assert!(
        status.contains("Current/Max Flows: ") && status.contains("/4,095 ("),
        "{status}"
    );
    let nodes = out(&["list", "nodes"]);
    assert!(
        nodes.starts_with("NAME")
            && nodes.contains(&format!("{}-node", lab.name))
            && nodes.contains("Connected"),
        "{nodes}"
    );
    let namespaces = out(&["list", "namespaces"]);
    assert_eq!(
        namespaces.lines().collect::<Vec<_>>(),
        vec!["NAMESPACE", "microservices"]
    );
    let table = out(&[
        "observe",
        "-o",
        "table",
        "--verdict",
        "DROPPED",
        "--last",
        "1",
    ]);
    assert!(
        table.starts_with("TIMESTAMP") && table.contains("Policy denied"),
        "{table}"
    );
    let dict = out(&[
        "observe",
        "-o",
        "dict",
        "--verdict",
        "DROPPED",
        "--last",
        "1",
        "--print-node-name",
    ]);
    assert!(
        dict.contains("DESTINATION: microservices/backend:8080") && dict.contains("       NODE: "),
        "{dict}"
    );
    // A label change moves a pod to another identity: Cilium reports it as
    // an ipcache upsert carrying the old identity.
    let sock = PathBuf::from(format!("/run/fibril/labs/{}/agent.sock", lab.name));
    let relabel = api::Request::PodUpsert(api::Pod {
        namespace: "microservices".into(),
        name: "other-client".into(),
        labels: [("app".to_string(), "relabelled".to_string())].into(),
        ..Default::default()
    });
    assert!(matches!(api::call(&sock, &relabel), Ok(api::Response::Ok)));
    let events = out(&["observe", "agent-events", "--last", "200"]);
    let moved = events.lines().any(|l| {
        l.contains("IPCACHE_UPSERTED")
            && l.contains(", old identity: ")
            && l.ends_with("pod name: other-client)")
    });
    assert!(moved, "{events}");
    let backend_ip = format!("IPCACHE_UPSERTED (cidr: {}/32, identity: ", lab.ip(3));
    assert!(
        events.lines().any(|l| l.contains(&backend_ip)
            && l.ends_with(", namespace: microservices, pod name: backend)")),
        "{events}"
    );
    assert!(events.contains("AGENT_STARTED (start time: "), "{events}");
    assert!(
        events.contains(": ENDPOINT_CREATED (id: 2, namespace: microservices, pod name: backend)"),
        "{events}"
    );
    assert!(
        events.contains(
            "POLICY_UPDATED (labels: [k8s:io.cilium.k8s.policy.derived-from=CiliumNetworkPolicy"
        ),
        "{events}"
    );
    let debug = lab.fibril(&["observe", "debug-events"]);
    assert!(debug.status.success() && debug.stdout.is_empty());
    // The agent's Unix socket, as `hubble --server unix://...`.
    let sock = format!("unix:///run/fibril/labs/{}/hubble.sock", lab.name);
    let via_unix = out(&[
        "observe",
        "--server",
        &sock,
        "--verdict",
        "DROPPED",
        "--last",
        "1",
    ]);
    assert!(via_unix.contains("Policy denied DROPPED"), "{via_unix}");
    let needs_tls = lab.fibril(&[
        "observe",
        "--server",
        "127.0.0.1:4244",
        "--tls-ca-cert-files",
        "/nonexistent.pem",
        "--last",
        "1",
    ]);
    assert!(
        String::from_utf8_lossy(&needs_tls.stderr).contains("transport layer security required")
    );
    let hubble_metrics = lab.http_get_metrics("hubble-metrics.addr");
    assert!(
        hubble_metrics
            .lines()
            .any(|l| l.starts_with(r#"hubble_drop_total{protocol="TCP",reason="POLICY_DENIED"}"#)),
        "{hubble_metrics}"
    );
    assert!(hubble_metrics.contains(
        r#"hubble_flows_processed_total{subtype="to-endpoint",type="Trace",verdict="FORWARDED"}"#
    ));
    assert!(
        hubble_metrics.contains(
            r#"hubble_policy_verdicts_total{action="forwarded",direction="ingress",match="l3-l4"}"#
        ),
        "{hubble_metrics}"
    );
}

#[test]
fn bad_observe_flags_are_refused_before_any_agent_is_needed() {
    // No lab of this name exists: the flags must be judged on their own.
    let lab = format!("nolab{}", std::process::id() % 100_000);
    for (args, expected) in [
        (&["--verdict", "MAYBE"][..], "is not one of FORWARDED"),
        (
            &["--not", "-f"][..],
            "--not must be followed by a filter flag",
        ),
        (
            &["--pod", "web", "--not"][..],
            "--not must be followed by a filter flag",
        ),
        (&["--not", "--bogus"][..], "--not --bogus"),
        (
            &["--first", "3", "-f"][..],
            "--first cannot be combined with --follow",
        ),
    ] {
        let out = Command::new(bin("fibril"))
            .args(["--lab", &lab, "observe"])
            .args(args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(expected),
            "{args:?}: {err}"
        );
    }
}

/// Path-MTU discovery through an enforcing endpoint: the path to the
/// external is narrower (1280) than the pod's link (1500), so the host
/// answers the pod's full-size segments with "fragmentation needed". The
/// pod's ingress allows nothing, yet that ICMP error (about its own
/// connection) must reach it, or the upload stalls in a black hole.
#[test]
fn icmp_errors_about_a_pods_connections_reach_it_through_policy() {
    const LAB: &str = r#"
podCIDR: POD_CIDR_HERE
namespaces:
  - name: mtu
pods:
  - {name: client, namespace: mtu, labels: {app: client}}
externals:
  - {name: far, address: 198.18.10.10, command: [fibril-echo, http-server, --port, "8080"]}
policies:
  - inline: |
      apiVersion: cilium.io/v2
      kind: CiliumNetworkPolicy
      metadata: {name: client, namespace: mtu}
      spec:
        endpointSelector: {matchLabels: {app: client}}
        ingress:
        - fromEndpoints: [{matchLabels: {app: nobody}}]
        egress:
        - toCIDR: [198.18.10.10/32]
          toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"#;
    let lab = custom_lab(LAB);
    let far_log = || lab.log("external/far");
    wait_until("the external listens", || far_log().contains("listening"));
    let host_side = api::host_ifname(&format!("{}-external-far", lab.name), "eth0");
    let mtu = Command::new("ip")
        .args(["link", "set", "dev", &host_side, "mtu", "1280"])
        .status()
        .unwrap();
    assert!(mtu.success());
    let upload = "head -c 262144 /dev/zero | curl -s -o /dev/null -w '%{http_code}' --max-time 8 --data-binary @- http://198.18.10.10:8080/upload";
    let (ok, code) = lab.exec("mtu/client", &["bash", "-c", upload]);
    assert!(ok && code == "200", "the upload stalled: {code:?}");
    wait_until("the related flow", || {
        lab.flows()
            .iter()
            .any(|f| f["trace_reason"] == "RELATED" && f["verdict"] == "FORWARDED")
    });
}

/// A 4,000-byte UDP datagram (three fragments on a 1,500-byte link) to a
/// port the policy allows arrives whole and its echo comes back whole; the
/// same datagram to a port the policy refuses arrives in no part.
#[test]
fn fragmented_datagrams_are_judged_whole() {
    const LAB: &str = r#"
podCIDR: POD_CIDR_HERE
namespaces:
  - name: frag
pods:
  - name: server
    namespace: frag
    labels: {app: server}
    command: [fibril-echo, udp-server, --port, "9999"]
  - name: other
    namespace: frag
    labels: {app: other}
    command: [fibril-echo, udp-server, --port, "9998"]
  - {name: client, namespace: frag, labels: {app: client}}
policies:
  - inline: |
      apiVersion: cilium.io/v2
      kind: CiliumNetworkPolicy
      metadata: {name: udp, namespace: frag}
      spec:
        endpointSelector: {matchLabels: {app: server}}
        ingress:
        - fromEndpoints: [{matchLabels: {app: client}}]
          toPorts: [{ports: [{port: "9999", protocol: UDP}]}]
  - inline: |
      apiVersion: cilium.io/v2
      kind: CiliumNetworkPolicy
      metadata: {name: other, namespace: frag}
      spec:
        endpointSelector: {matchLabels: {app: other}}
        ingress:
        - fromEndpoints: [{matchLabels: {app: server}}]
"#;
    let lab = custom_lab(LAB);
    let log = |pod: &str| lab.log(&format!("frag/{pod}"));
    wait_until("the servers listen", || {
        log("server").contains("listening") && log("other").contains("listening")
    });
    let send = |ip: u8, port: u16| {
        lab.exec(
            "frag/client",
            &[
                "fibril-echo",
                "udp-send",
                &format!("{}:{port}", lab.ip(ip)),
                "--size",
                "4000",
                "--timeout",
                "2",
            ],
        )
    };
    let (ok, out) = send(2, 9999);
    assert!(ok && out.contains("echo 4000 bytes"), "{out}");
    assert!(
        log("server").contains("datagram of 4000 bytes"),
        "{}",
        log("server")
    );
    let (ok, _) = send(3, 9998);
    assert!(!ok, "a refused port got the datagram");
    assert!(!log("other").contains("datagram of"), "{}", log("other"));
}

/// The real hubble CLI (v1.19.4, built from the Go module proxy by `cargo
/// xtask deps`) against a lab's agent, unmodified: status, nodes,
/// namespaces, and `observe` printing exactly what `fibril observe` prints
/// for the same flows, with filters, policy verdicts and JSON.
#[test]
fn the_real_hubble_cli_reads_the_lab() {
    let hubble = test_support::hubble_cli();
    let lab = Lab::default_lab();
    lab.seed_traffic();
    let server = lab.hubble_address();
    let real = |args: &[&str]| -> String {
        let out = Command::new(&hubble)
            .args(args)
            .args(["--server", &server])
            .env("HOME", "/nonexistent") // no user config of the machine's
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "hubble {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };

    let status = real(&["status"]);
    assert!(
        status.contains(&format!("Healthcheck (via {server}): Ok")),
        "{status}"
    );
    assert!(status.contains("Current/Max Flows:"), "{status}");
    let nodes = real(&["list", "nodes"]);
    assert!(nodes.contains("Connected"), "{nodes}");
    let namespaces = real(&["list", "namespaces"]);
    assert!(namespaces.contains("microservices"), "{namespaces}");

    // The same flows, printed by both CLIs, line for line: `--until` pins
    // the window so flows arriving in between cannot differ. The real CLI
    // is asked for whole flows: its default field mask (compact output)
    // leaves out `traffic_direction` and `policy_match_type`, which its
    // own printer needs for policy verdicts (checked below).
    let stamp = {
        let out = lab.fibril(&["observe", "--last", "1", "-o", "json"]);
        let v: Value =
            serde_json::from_str(String::from_utf8_lossy(&out.stdout).lines().last().unwrap())
                .unwrap();
        v["time"].as_str().unwrap().to_string()
    };
    for args in [
        vec!["observe", "--all", "--until", stamp.as_str()],
        vec![
            "observe",
            "--all",
            "--until",
            stamp.as_str(),
            "--verdict",
            "DROPPED",
        ],
        vec![
            "observe",
            "--all",
            "--until",
            stamp.as_str(),
            "-t",
            "policy-verdict",
        ],
        vec![
            "observe",
            "--all",
            "--until",
            stamp.as_str(),
            "--to-pod",
            "microservices/backend",
            "-o",
            "dict",
        ],
        vec![
            "observe",
            "--all",
            "--until",
            stamp.as_str(),
            "--not",
            "--namespace",
            "microservices",
        ],
    ] {
        let theirs = real(&[&args[..], &["--use-default-field-masks=false"]].concat());
        let ours = lab.fibril(&args);
        assert!(ours.status.success(), "{args:?}");
        assert_eq!(String::from_utf8_lossy(&ours.stdout), theirs, "{args:?}");
        if !args.contains(&"--not") {
            assert!(!theirs.is_empty(), "{args:?} printed nothing");
        }
    }
    let verdicts = real(&[
        "observe",
        "--all",
        "-t",
        "policy-verdict",
        "--use-default-field-masks=false",
    ]);
    assert!(
        verdicts.contains("policy-verdict:none INGRESS DENIED"),
        "{verdicts}"
    );
    assert!(
        verdicts.contains("policy-verdict:L3-L4 INGRESS ALLOWED"),
        "{verdicts}"
    );
    // With its default mask the server sends only the 20 fields the CLI
    // names, as Hubble does: the direction is not among them.
    let masked = real(&["observe", "--all", "-t", "policy-verdict"]);
    assert!(
        masked.contains("policy-verdict:none TRAFFIC_DIRECTION_UNKNOWN DENIED"),
        "{masked}"
    );

    // JSON: each line the real CLI prints decodes, and names the lab's pods.
    let json = real(&[
        "observe",
        "--all",
        "-o",
        "jsonpb",
        "--from-pod",
        "microservices/frontend",
    ]);
    let lines: Vec<Value> = json
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(!lines.is_empty());
    assert!(
        lines
            .iter()
            .all(|v| v["flow"]["source"]["pod_name"] == "frontend"),
        "{json}"
    );
}

/// `kvstore: true`: the lab runs a real etcd of its own and the agent keeps
/// the cluster's state there (identities, endpoints, policies); a live label
/// change moves the pod to the cluster's identity of its new labels; `lab
/// down` stops etcd with the rest.
#[test]
fn a_kvstore_lab_runs_its_own_etcd() {
    let lab = custom_lab(
        "podCIDR: POD_CIDR_HERE\nkvstore: true\nnamespaces:\n- name: shop\npods:\n- {name: web, namespace: shop, labels: {app: web}, command: [fibril-echo, http-server, --port, \"8080\"]}\n- {name: client, namespace: shop, labels: {app: client}}\n",
    );
    let status = lab.fibril(&["status"]);
    let text = String::from_utf8_lossy(&status.stdout).to_string();
    assert!(
        text.contains("Kvstore:       etcd 3.4.23 at http://127.0.0.1:"),
        "{text}"
    );
    assert!(text.contains("cluster identities"), "{text}");
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("/run/fibril/labs/{}/lab.json", lab.name)).unwrap(),
    )
    .unwrap();
    let etcd_pid = state["etcd_pid"]
        .as_u64()
        .expect("etcd's pid in the lab state") as u32;
    assert!(Path::new(&format!("/proc/{etcd_pid}")).exists());

    // Identities are the cluster's: two pods, two numbers, listed by etcd
    // too (the agent follows them back into its identity list).
    let identity_of = |pod: &str| -> u64 {
        lab.endpoints()
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["pod_name"] == pod)
            .map(|e| e["identity"].as_u64().unwrap())
            .unwrap()
    };
    let (web, client) = (identity_of("web"), identity_of("client"));
    assert_ne!(web, client);
    let relabel = lab.fibril(&["lab", "label", "shop/client", "app=web"]);
    assert!(
        relabel.status.success(),
        "{}",
        String::from_utf8_lossy(&relabel.stderr)
    );
    assert_eq!(
        identity_of("client"),
        web,
        "the same labels, the cluster's number"
    );
    let refused = lab.fibril(&["lab", "label", "shop/client", "nope-"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("has no label \"nope\""));

    // An agent restart (a new lease) takes its references again and keeps
    // every number.
    let before = lab.endpoints();
    let restart = lab.fibril(&["lab", "restart-agent"]);
    assert!(
        restart.status.success(),
        "{}",
        String::from_utf8_lossy(&restart.stderr)
    );
    for pod in ["web", "client"] {
        let id = |v: &Value| {
            v.as_array()
                .unwrap()
                .iter()
                .find(|e| e["pod_name"] == pod)
                .map(|e| e["identity"].clone())
        };
        assert_eq!(id(&lab.endpoints()), id(&before), "{pod}");
    }
    wait_until("the restarted agent to reach etcd", || {
        String::from_utf8_lossy(&lab.fibril(&["status"]).stdout).contains("Kvstore:       etcd")
    });
    let log = std::fs::read_to_string(format!("/run/fibril/labs/{}/agent.log", lab.name)).unwrap();
    assert!(!log.contains("numbers these labels differently"), "{log}");

    let down = lab.fibril(&["lab", "down"]);
    assert!(
        down.status.success(),
        "{}",
        String::from_utf8_lossy(&down.stderr)
    );
    // Gone, or a zombie its new parent has yet to reap.
    let running = std::fs::read_to_string(format!("/proc/{etcd_pid}/stat"))
        .is_ok_and(|stat| !stat.contains(") Z "));
    assert!(!running, "etcd stopped with the lab");
}
