//! Tier 4: services through the real datapath in a lab (issue 18): a
//! pod's connection to a ClusterIP is translated at its veth to a backend
//! pod, on the same node and across the overlay; policy decides on the
//! backend pod's identity; a service without backends refuses with
//! SERVICE_BACKEND_NOT_FOUND; flows name the service (`observe
//! --to-service`); ClientIP affinity; a long connection stays on its
//! backend while the service's backends change.

mod common;

use std::time::Duration;

use common::{custom_lab, eventually, wait_until, Lab};

const LAB: &str = r#"
podCIDR: POD_CIDR_HERE
pods:
  - name: client
    labels: {app: client}
  - name: other-client
    labels: {app: other-client}
  - name: web-1
    labels: {app: web}
    command: [fibril-echo, http-server, --port, "8080"]
  - name: web-2
    labels: {app: web}
    command: [fibril-echo, http-server, --port, "8080"]
services:
  - name: web
    clusterIP: 10.96.0.50
    selector: {app: web}
    ports: [{name: http, port: 80, targetPort: 8080}]
  - name: sticky
    clusterIP: 10.96.0.52
    selector: {app: web}
    sessionAffinity: ClientIP
    ports: [{port: 80, targetPort: 8080}]
  - name: empty
    clusterIP: 10.96.0.51
    selector: {app: nothing}
    ports: [{port: 80}]
policies:
  - inline: |
      apiVersion: cilium.io/v2
      kind: CiliumNetworkPolicy
      metadata: {name: web-from-client}
      spec:
        endpointSelector: {matchLabels: {app: web}}
        ingress:
          - fromEndpoints: [{matchLabels: {app: client}}]
            toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"#;

fn accepted(lab: &Lab, pod: &str) -> usize {
    lab.log(pod).matches("accepted").count()
}

fn agent_socket(lab: &Lab) -> std::path::PathBuf {
    format!("/run/fibril/labs/{}/agent.sock", lab.name).into()
}

/// The lab's `web` service with `active` and `terminating` backends (pods'
/// addresses), as Kubernetes' EndpointSlices would say it.
fn set_web_backends(lab: &Lab, active: &[&str], terminating: &[&str]) {
    let backend = |ip: &&str, terminating: bool| api::service::Backend {
        address: ip.parse().unwrap(),
        ports: vec![api::service::ServicePort {
            name: "http".into(),
            port: 8080,
            protocol: api::service::Protocol::Tcp,
            node_port: None,
        }],
        terminating,
        node: None,
    };
    let svc = api::Service {
        namespace: "default".into(),
        name: "web".into(),
        addresses: vec!["10.96.0.50".parse().unwrap()],
        ports: vec![api::service::ServicePort {
            name: "http".into(),
            port: 80,
            protocol: api::service::Protocol::Tcp,
            node_port: None,
        }],
        backends: active
            .iter()
            .map(|ip| backend(ip, false))
            .chain(terminating.iter().map(|ip| backend(ip, true)))
            .collect(),
        affinity_timeout_s: None,
        internal_traffic_local: false,
        external_addresses: vec![],
        external_traffic_local: false,
    };
    let r = api::call(&agent_socket(lab), &api::Request::ServiceUpsert(svc)).unwrap();
    assert!(matches!(r, api::Response::Ok), "{r:?}");
}

fn pod_ip(lab: &Lab, pod: &str) -> String {
    lab.endpoints()
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["pod_name"] == pod)
        .unwrap_or_else(|| panic!("no endpoint {pod}"))["ipv4"]
        .as_str()
        .unwrap()
        .to_string()
}

#[test]
fn a_cluster_ip_reaches_its_backends_under_their_policy() {
    let lab = custom_lab(LAB);
    wait_until("the web pods to listen", || {
        lab.log("default/web-1").contains("listening")
            && lab.log("default/web-2").contains("listening")
    });

    // The service list shows the frontend and both backends.
    let out = lab.fibril(&["service", "list"]);
    let list = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{list}");
    let web_line = list
        .lines()
        .find(|l| l.contains("10.96.0.50:80/TCP"))
        .unwrap_or_else(|| panic!("{list}"));
    assert!(web_line.contains("default/web"), "{web_line}");
    assert_eq!(web_line.matches(":8080 (active)").count(), 2, "{web_line}");

    // Twenty connections spread over both backends.
    for _ in 0..20 {
        assert!(lab.http_get("default/client", "http://10.96.0.50/", "3"));
    }
    let (one, two) = (
        accepted(&lab, "default/web-1"),
        accepted(&lab, "default/web-2"),
    );
    assert_eq!(one + two, 20);
    assert!(one > 0 && two > 0, "web-1 {one}, web-2 {two}");

    // Flows name the backend pod and the service beside it.
    eventually("flows to the service", Duration::from_secs(10), || {
        !lab.observe_json(&["--all", "--to-service", "default/web"])
            .is_empty()
    });
    let flows = lab.observe_json(&["--all", "--to-service", "default/web"]);
    assert!(flows
        .iter()
        .all(|f| f["destination_service"]["name"] == "web"));
    assert!(flows.iter().all(|f| {
        let pod = f["destination"]["pod_name"].as_str().unwrap_or("");
        pod == "web-1" || pod == "web-2"
    }));
    assert!(flows.iter().all(|f| f["IP"]["destination"] != "10.96.0.50"));
    // Replies come from the service, and say so.
    eventually("replies from the service", Duration::from_secs(10), || {
        lab.observe_json(&["--all", "--from-service", "default/web"])
            .iter()
            .any(|f| f["is_reply"] == true)
    });

    // Policy decides on the backend pod: other-client is refused by the
    // web pods' ingress policy, through the service too.
    assert!(!lab.http_get("default/other-client", "http://10.96.0.50/", "1"));
    eventually("the policy drop", Duration::from_secs(10), || {
        lab.observe_json(&[
            "--all",
            "--verdict",
            "DROPPED",
            "--from-pod",
            "default/other-client",
        ])
        .iter()
        .any(|f| {
            f["drop_reason_desc"] == "POLICY_DENIED" && f["destination_service"]["name"] == "web"
        })
    });

    // A service without backends refuses in the kernel, with its reason.
    assert!(!lab.http_get("default/client", "http://10.96.0.51/", "1"));
    eventually("the no-backend drop", Duration::from_secs(10), || {
        lab.observe_json(&[
            "--all",
            "--verdict",
            "DROPPED",
            "--from-pod",
            "default/client",
        ])
        .iter()
        .any(|f| f["drop_reason_desc"] == "SERVICE_BACKEND_NOT_FOUND")
    });

    // ClientIP affinity: every connection of the client to one backend.
    let before = (
        accepted(&lab, "default/web-1"),
        accepted(&lab, "default/web-2"),
    );
    for _ in 0..10 {
        assert!(lab.http_get("default/client", "http://10.96.0.52/", "3"));
    }
    let after = (
        accepted(&lab, "default/web-1"),
        accepted(&lab, "default/web-2"),
    );
    let deltas = (after.0 - before.0, after.1 - before.1);
    assert!(deltas == (10, 0) || deltas == (0, 10), "{deltas:?}");
}

#[test]
fn a_long_connection_keeps_its_backend_while_the_backends_change() {
    let lab = custom_lab(LAB);
    wait_until("the web pods to listen", || {
        lab.log("default/web-1").contains("listening")
            && lab.log("default/web-2").contains("listening")
    });
    let (web1, web2) = (pod_ip(&lab, "web-1"), pod_ip(&lab, "web-2"));
    set_web_backends(&lab, &[&web1], &[]);
    let mut hold = lab.hold("default/client", "10.96.0.50:80", "6");
    eventually("the held connection", Duration::from_secs(10), || {
        accepted(&lab, "default/web-1") == 1
    });
    // web-1 is going away, web-2 takes the new connections.
    set_web_backends(&lab, &[&web2], &[&web1]);
    for _ in 0..5 {
        assert!(lab.http_get("default/client", "http://10.96.0.50/", "3"));
    }
    assert_eq!(accepted(&lab, "default/web-2"), 5);
    // More backends come and go; the held connection stays where it was.
    set_web_backends(&lab, &[&web2, &web1], &[]);
    set_web_backends(&lab, &[&web2], &[&web1]);
    let status = hold.wait().unwrap();
    let mut err = String::new();
    use std::io::Read;
    hold.stderr.take().unwrap().read_to_string(&mut err).ok();
    assert!(status.success(), "the held connection broke: {err}");
    assert_eq!(
        accepted(&lab, "default/web-1"),
        1,
        "one connection, never moved"
    );

    // Bad input changes nothing: a second service on the same address.
    let mut dup = api::Service {
        namespace: "default".into(),
        name: "copy".into(),
        addresses: vec!["10.96.0.50".parse().unwrap()],
        ports: vec![api::service::ServicePort {
            name: "".into(),
            port: 80,
            protocol: api::service::Protocol::Tcp,
            node_port: None,
        }],
        backends: vec![],
        affinity_timeout_s: None,
        internal_traffic_local: false,
        external_addresses: vec![],
        external_traffic_local: false,
    };
    let r = api::call(
        &agent_socket(&lab),
        &api::Request::ServiceUpsert(dup.clone()),
    );
    let message = r.expect_err("a duplicate frontend was taken").to_string();
    assert!(
        message.contains("already service default/web's"),
        "{message}"
    );
    dup.name = "Not_A_Name".into();
    let r = api::call(&agent_socket(&lab), &api::Request::ServiceUpsert(dup));
    let message = r.expect_err("a bad name was taken").to_string();
    assert!(message.contains("service name"), "{message}");
    assert!(lab.http_get("default/client", "http://10.96.0.50/", "3"));

    // The agent restarts: services and the connections' backends stay.
    let mut hold = lab.hold("default/client", "10.96.0.50:80", "4");
    std::thread::sleep(Duration::from_millis(500));
    let out = lab.fibril(&["lab", "restart-agent"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(hold.wait().unwrap().success(), "held across the restart");
    let list = String::from_utf8_lossy(&lab.fibril(&["service", "list"]).stdout).into_owned();
    assert!(list.contains("10.96.0.50:80/TCP"), "{list}");
}

/// Conntrack entries of translated connections (the per-packet path's
/// service entries) on `node` (None: a one-node lab's agent).
fn service_entries(lab: &Lab, node: Option<&str>) -> usize {
    let mut args = vec![];
    if let Some(n) = node {
        args.extend(["--node", n]);
    }
    args.extend(["ct", "list", "-o", "json"]);
    let out = lab.fibril(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let entries: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    entries
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["direction"].as_str().unwrap_or("").starts_with("service"))
        .count()
}

/// Socket load balancing (the lab's default: `socketLB.hostNamespaceOnly`,
/// the seed's): a process in a node's own namespace connects to the
/// backend at connect (the host stack has no per-packet translation, so
/// only the socket path can reach the service from there); a pod's
/// connection is left to the per-packet path (its service entry).
#[test]
fn a_cluster_ip_reaches_a_backend_on_another_node() {
    let lab = custom_lab(
        r#"
podCIDR: POD_CIDR_HERE
nodes: [a, b]
pods:
  - name: client
    labels: {app: client}
    node: a
  - name: host-client
    hostNetwork: true
    node: a
  - name: web
    labels: {app: web}
    command: [fibril-echo, http-server, --port, "8080"]
    node: b
  - name: client-b
    labels: {app: client}
    node: b
services:
  - name: web
    clusterIP: 10.96.0.60
    selector: {app: web}
    ports: [{port: 80, targetPort: 8080}]
  - name: web-local
    clusterIP: 10.96.0.63
    selector: {app: web}
    ports: [{port: 80, targetPort: 8080}]
    internalTrafficPolicy: Local
"#,
    );
    wait_until("web to listen", || {
        lab.log("default/web").contains("listening")
    });
    for _ in 0..3 {
        assert!(lab.http_get("default/client", "http://10.96.0.60/", "5"));
    }
    assert_eq!(accepted(&lab, "default/web"), 3);
    assert!(service_entries(&lab, Some("a")) > 0, "pods: per packet");

    // The node's own namespace: translated at connect.
    let before = service_entries(&lab, Some("a"));
    for _ in 0..3 {
        assert!(lab.http_get("default/host-client", "http://10.96.0.60/", "5"));
    }
    assert_eq!(accepted(&lab, "default/web"), 6);
    assert_eq!(
        service_entries(&lab, Some("a")),
        before,
        "no per-packet path"
    );
    // Each translation is Hubble's trace-sock pair: the service before
    // (TRACED, destination_service named), its backend after
    // (TRANSLATED), one socket cookie.
    let socks = lab.observe_json(&["--node", "a", "--type", "trace-sock", "--last", "100"]);
    let pre = socks
        .iter()
        .find(|f| f["sock_xlate_point"] == "SOCK_XLATE_POINT_PRE_DIRECTION_FWD")
        .unwrap_or_else(|| panic!("no pre-xlate-fwd: {socks:?}"));
    assert_eq!(pre["Type"], "SOCK", "{pre}");
    assert_eq!(pre["verdict"], "TRACED", "{pre}");
    assert_eq!(pre["IP"]["destination"], "10.96.0.60", "{pre}");
    assert_eq!(pre["destination_service"]["name"], "web", "{pre}");
    assert!(
        pre["source"]["labels"]
            .as_array()
            .is_some_and(|l| l.iter().any(|x| x == "reserved:host")),
        "{pre}"
    );
    let post = socks
        .iter()
        .find(|f| {
            f["sock_xlate_point"] == "SOCK_XLATE_POINT_POST_DIRECTION_FWD"
                && f["socket_cookie"] == pre["socket_cookie"]
        })
        .unwrap_or_else(|| panic!("no post-xlate-fwd for {pre}: {socks:?}"));
    assert_eq!(post["verdict"], "TRANSLATED", "{post}");
    assert_eq!(post["l4"]["TCP"]["destination_port"], 8080, "{post}");
    assert_eq!(post["destination"]["pod_name"], "web", "{post}");

    // Node a's agent dies: its socket LB stays attached (pinned links),
    // so the node's processes still reach the service; a new agent takes
    // the links over.
    let st: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!("/run/fibril/labs/{}/lab.json", lab.name)).unwrap(),
    )
    .unwrap();
    let pid = st["nodes"][0]["agent_pid"].as_u64().unwrap();
    assert!(std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    wait_until("node a's agent gone", || {
        !std::path::Path::new(&format!("/proc/{pid}")).exists()
            || std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.contains(") Z "))
    });
    assert!(lab.http_get("default/host-client", "http://10.96.0.60/", "5"));
    let out = lab.fibril(&["--node", "a", "lab", "restart-agent"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(lab.http_get("default/host-client", "http://10.96.0.60/", "5"));
    assert_eq!(accepted(&lab, "default/web"), 8);

    // internalTrafficPolicy: Local: node b's pods reach its backend, node
    // a has none of its own, so its pods reach nothing.
    assert!(lab.http_get("default/client-b", "http://10.96.0.63/", "5"));
    assert_eq!(accepted(&lab, "default/web"), 9);
    assert!(!lab.http_get("default/client", "http://10.96.0.63/", "2"));
    assert_eq!(accepted(&lab, "default/web"), 9);
}

/// `socketLB.hostNamespaceOnly: false`: pods' sockets are translated at
/// connect too (no per-packet service entries).
#[test]
fn socket_load_balancing_in_pods_when_asked() {
    let lab = custom_lab(
        r#"
podCIDR: POD_CIDR_HERE
socketLB: {hostNamespaceOnly: false}
pods:
  - name: client
  - name: web
    labels: {app: web}
    command: [fibril-echo, http-server, --port, "8080"]
services:
  - name: web
    clusterIP: 10.96.0.61
    selector: {app: web}
    ports: [{port: 80, targetPort: 8080}]
  - name: empty
    clusterIP: 10.96.0.62
    ports: [{port: 80}]
"#,
    );
    wait_until("web to listen", || {
        lab.log("default/web").contains("listening")
    });
    for _ in 0..3 {
        assert!(lab.http_get("default/client", "http://10.96.0.61/", "5"));
    }
    assert_eq!(accepted(&lab, "default/web"), 3);
    assert_eq!(service_entries(&lab, None), 0, "translated at connect");
    // A service without backends: the connect fails at once.
    let started = std::time::Instant::now();
    assert!(!lab.http_get("default/client", "http://10.96.0.62/", "5"));
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "refused, not timed out"
    );
}

/// Hairpin: a pod that is its service's only backend reaches itself
/// through the service (Cilium's service loopback address).
#[test]
fn a_pod_reaches_itself_through_its_service() {
    let lab = custom_lab(
        r#"
podCIDR: POD_CIDR_HERE
pods:
  - name: web
    labels: {app: web}
    command: [fibril-echo, http-server, --port, "8080"]
services:
  - name: web
    clusterIP: 10.96.0.64
    selector: {app: web}
    ports: [{port: 80, targetPort: 8080}]
"#,
    );
    wait_until("web to listen", || {
        lab.log("default/web").contains("listening")
    });
    for _ in 0..3 {
        assert!(lab.http_get("default/web", "http://10.96.0.64/", "5"));
    }
    assert!(
        lab.log("default/web").contains("accepted 169.254.42.1:"),
        "{}",
        lab.log("default/web")
    );
}
