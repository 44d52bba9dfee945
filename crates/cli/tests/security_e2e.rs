//! Tier 5: what an attacker inside a pod or a local user tries, against a
//! real lab (agent, CNI, pods, real packets). Needs root.

mod common;

use common::{custom_lab, wait_until, Lab};

/// server .2 (HTTP on 8080), client .3, keeper .4; the keeper's allow keeps
/// the server's ingress enforced whatever happens to the client's.
const REUSE_LAB: &str = r#"
podCIDR: POD_CIDR_HERE
namespaces:
  - name: sec
pods:
  - name: server
    namespace: sec
    labels: {app: server}
    command: [fibril-echo, http-server, --port, "8080"]
  - {name: client, namespace: sec, labels: {app: client}}
  - {name: keeper, namespace: sec, labels: {app: keeper}}
policies:
  - inline: |
      apiVersion: cilium.io/v2
      kind: CiliumNetworkPolicy
      metadata: {name: allow-client, namespace: sec}
      spec:
        endpointSelector: {matchLabels: {app: server}}
        ingress:
        - fromEndpoints: [{matchLabels: {app: client}}]
          toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
  - inline: |
      apiVersion: cilium.io/v2
      kind: CiliumNetworkPolicy
      metadata: {name: allow-keeper, namespace: sec}
      spec:
        endpointSelector: {matchLabels: {app: server}}
        ingress:
        - fromEndpoints: [{matchLabels: {app: keeper}}]
          toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"#;

/// `allow-client` again, with `rules` under its port (empty: L4 only).
fn allow_client(rules: &str) -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: allow-client, namespace: sec}}\nspec:\n  endpointSelector: {{matchLabels: {{app: server}}}}\n  ingress:\n  - fromEndpoints: [{{matchLabels: {{app: client}}}}]\n    toPorts:\n    - ports: [{{port: \"8080\", protocol: TCP}}]\n{rules}"
    )
}

fn import(lab: &Lab, name: &str, text: &str) {
    let path = lab.dir.join(name);
    std::fs::write(&path, text).unwrap();
    let out = lab.fibril(&["policy", "import", path.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// GET `path` on the server from the client, from source port `port`
/// (closed with a RST, so the next call can reuse the tuple at once).
fn get_from_port(lab: &Lab, port: u16, path: &str, timeout: &str) -> bool {
    let url = format!("http://{}:8080{path}", lab.ip(2));
    let port = port.to_string();
    lab.exec(
        "sec/client",
        &[
            "fibril-echo",
            "http-get",
            "--timeout",
            timeout,
            "--local-port",
            &port,
            &url,
        ],
    )
    .0
}

fn server_log(lab: &Lab) -> String {
    lab.log("sec/server")
}

/// A revoked allow stays revoked for a client that reconnects from the
/// same source port while the old connection's conntrack entry is still in
/// its closing window; an L7 rule added later applies to the reused tuple,
/// and one removed later no longer sends it to the proxy.
#[test]
fn a_reused_source_port_meets_the_current_policy() {
    let lab = custom_lab(REUSE_LAB);
    wait_until("server to listen", || {
        server_log(&lab).contains("listening")
    });
    let client = lab.ip(3);

    assert!(get_from_port(&lab, 41000, "/", "3"), "allowed at first");
    let del = lab.fibril(&["policy", "delete", "sec/allow-client"]);
    assert!(del.status.success());
    for attempt in 0..3 {
        assert!(
            !get_from_port(&lab, 41000, "/", "1"),
            "attempt {attempt}: the reused tuple got through a revoked allow"
        );
    }
    assert!(!lab.http_get("sec/client", &format!("http://{}:8080/", lab.ip(2)), "1"));
    let accepted = format!("accepted {client}:41000");
    assert_eq!(
        server_log(&lab).matches(&accepted).count(),
        1,
        "the server socket saw the reused tuple again:\n{}",
        server_log(&lab)
    );

    // L4 allow again, then an L7 rule on the same policy: the tuple that
    // got /admin through at L4 gets the proxy's 403 once the rule exists.
    import(&lab, "l4.yaml", &allow_client(""));
    assert!(
        get_from_port(&lab, 41001, "/admin", "3"),
        "L4 allows /admin"
    );
    import(
        &lab,
        "l7.yaml",
        &allow_client("      rules: {http: [{method: GET, path: \"/api/.*\"}]}\n"),
    );
    for attempt in 0..2 {
        assert!(
            !get_from_port(&lab, 41001, "/admin", "3"),
            "attempt {attempt}: /admin from the reused tuple skipped the L7 rule"
        );
        assert!(get_from_port(&lab, 41001, "/api/x", "3"));
    }
    // The L7 rule goes: the proxied tuple is reused straight to the server
    // (its replies are not sent up to the proxy any more).
    import(&lab, "l4-again.yaml", &allow_client(""));
    assert!(
        get_from_port(&lab, 41001, "/admin", "3"),
        "a tuple the proxy carried before works without it"
    );
}

/// What a local user who is not root can reach of a lab: nothing of its
/// state, logs or flows. The lab directory is root's alone, its files too,
/// and the Hubble API is served on the lab's root-only socket, not on TCP.
#[test]
fn a_labs_state_logs_and_flows_are_roots_alone() {
    use std::os::unix::fs::PermissionsExt;
    let lab = custom_lab(REUSE_LAB);
    let dir = std::path::PathBuf::from(format!("/run/fibril/labs/{}", lab.name));
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&dir), 0o700, "the lab directory");
    for file in [
        "lab.json",
        "agent.log",
        "state/state.json",
        "pods/sec_server.log",
        "hubble.sock",
        "agent.sock",
    ] {
        let m = mode(&dir.join(file));
        assert_eq!(m & 0o077, 0, "{file} is open to others: {m:o}");
    }
    let hubble = std::fs::read_to_string(dir.join("state/hubble.addr")).unwrap();
    assert!(
        hubble.starts_with("unix://"),
        "the lab's Hubble API listens on {hubble}"
    );
    // The UI listens on loopback TCP, where any local user can connect:
    // it serves only whoever holds the lab's token (root's alone).
    for file in ["ui.token", "ui.address", "ui.log"] {
        let m = mode(&dir.join(file));
        assert_eq!(m & 0o077, 0, "{file} is open to others: {m:o}");
    }
    let address = std::fs::read_to_string(dir.join("ui.address")).unwrap();
    let token = std::fs::read_to_string(dir.join("ui.token")).unwrap();
    let ask = |path: &str, header: &str| -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(address.trim()).unwrap();
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: x\r\n{header}Connection: close\r\n\r\n"
        )
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out.lines().next().unwrap_or_default().to_string()
    };
    for path in [
        "/",
        "/api/events?ns=*",
        "/api/export?ns=*",
        "/api/namespaces",
    ] {
        assert!(ask(path, "").contains("401"), "{path} without the token");
        assert!(
            ask(path, "Cookie: fibril_ui_token=wrongwrongwrongwrong\r\n").contains("401"),
            "{path} with a wrong token"
        );
    }
    assert!(ask(&format!("/?token={}", token.trim()), "").contains("303"));
    assert!(ask(
        "/api/namespaces",
        &format!("Cookie: fibril_ui_token={}\r\n", token.trim())
    )
    .contains("200"));
}

/// `fibril ... | head -1`: a reader that went away ends the command
/// quietly (as SIGPIPE ends other tools), without a panic.
#[test]
fn printing_into_a_closed_pipe_exits_quietly() {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let out = std::process::Command::new(common::bin("fibril"))
        .args(["lab", "default"])
        .stdout(writer)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert!(err.is_empty(), "{err}");
    assert_eq!(out.status.code(), Some(141));
}

/// Holds a connection from the client to the server, one request per
/// 100 ms for `seconds`: the child exits non-zero once a request fails.
fn hold(lab: &Lab, seconds: &str) -> std::process::Child {
    std::process::Command::new(common::bin("fibril"))
        .args(["--lab", &lab.name, "lab", "exec", "sec/client", "--"])
        .args(["fibril-echo", "http-hold", &format!("{}:8080", lab.ip(2))])
        .args(["--seconds", seconds, "--interval", "0.1"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// By default an established connection outlives the policy that allowed
/// it (as in Cilium); `--enforce-established` cuts it at once.
#[test]
fn enforce_established_cuts_what_the_policy_no_longer_allows() {
    let lab = custom_lab(REUSE_LAB);
    wait_until("server to listen", || {
        server_log(&lab).contains("listening")
    });

    let held = hold(&lab, "2");
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(lab
        .fibril(&["policy", "delete", "sec/allow-client"])
        .status
        .success());
    let out = held.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the default: an established connection goes on: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    import(&lab, "again.yaml", &allow_client(""));
    let held = hold(&lab, "4");
    std::thread::sleep(std::time::Duration::from_millis(500));
    let del = lab.fibril(&[
        "policy",
        "delete",
        "sec/allow-client",
        "--enforce-established",
    ]);
    let said = String::from_utf8_lossy(&del.stdout).to_string();
    assert!(del.status.success() && said.contains(" cut"), "{said}");
    assert!(!said.contains(" 0 cut"), "{said}");
    let out = held.wait_with_output().unwrap();
    assert!(
        !out.status.success(),
        "the held connection survived --enforce-established: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    // The keeper's connections were checked too, and not cut.
    let url = format!("http://{}:8080/", lab.ip(2));
    assert!(lab.http_get("sec/keeper", &url, "3"));
}

/// One pod opening flows as fast as it can (UDP to every port of an
/// external, from eight sockets) for 10 s: another pod's idle established
/// connection survives it. The server speaks first after the flood, and its
/// egress allows no new connection, so the push gets through only on the
/// connection's own conntrack entries. The flooding pod hits its budget
/// (counted); the table never fills, so nothing of the others is evicted.
#[test]
fn a_pod_flooding_new_flows_cannot_evict_another_pods_connection() {
    const LAB: &str = r#"
podCIDR: POD_CIDR_HERE
namespaces:
  - name: flood
pods:
  - name: server
    namespace: flood
    labels: {app: server}
    command: [fibril-echo, push-server, --port, "7000", --after, "13"]
  - {name: client, namespace: flood, labels: {app: client}}
  - {name: flooder, namespace: flood, labels: {app: flooder}}
externals:
  - {name: sink, address: 198.18.11.10, command: [sleep, infinity]}
policies:
  - inline: |
      apiVersion: cilium.io/v2
      kind: CiliumNetworkPolicy
      metadata: {name: server, namespace: flood}
      spec:
        endpointSelector: {matchLabels: {app: server}}
        ingress:
        - fromEndpoints: [{matchLabels: {app: client}}]
          toPorts: [{ports: [{port: "7000", protocol: TCP}]}]
        egress:
        - toEndpoints: [{matchLabels: {app: nobody}}]
"#;
    let lab = custom_lab(LAB);
    let server_log = || lab.log("flood/server");
    wait_until("the server listens", || server_log().contains("listening"));
    let waiting = std::process::Command::new(common::bin("fibril"))
        .args(["--lab", &lab.name, "lab", "exec", "flood/client", "--"])
        .args(["fibril-echo", "tcp-wait", &format!("{}:7000", lab.ip(2))])
        .args(["--timeout", "25"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the connection", || server_log().contains("accepted"));
    let (ok, flood) = lab.exec(
        "flood/flooder",
        &[
            "fibril-echo",
            "udp-flood",
            "198.18.11.10:1",
            "--seconds",
            "10",
        ],
    );
    assert!(ok, "{flood}");
    let out = waiting.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    let status = String::from_utf8_lossy(&lab.fibril(&["status"]).stdout).to_string();
    eprintln!("flood: {flood}; {status}");
    assert!(
        out.status.success() && said.contains("pushed"),
        "the idle connection broke under the flood ({flood}): {said} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        status.contains("new connections refused at a budget")
            && !status.contains(" 0 new connections refused"),
        "{status}"
    );
}
