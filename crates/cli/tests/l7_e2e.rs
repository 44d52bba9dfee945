//! Tier 5: L7 policy end to end. Real HTTP/1.1 and HTTP/2 servers in lab
//! pods, curl (and raw bytes) from other pods, the datapath redirecting to
//! the agent's proxy. Needs root and curl.

mod common;

use common::{wait_until, Lab};
use serde_json::Value;

const L7_LAB: &str = r#"
podCIDR: POD_CIDR_HERE
namespaces:
  - name: shop
pods:
  - {name: frontend, namespace: shop, labels: {app: frontend}}
  - name: api
    namespace: shop
    labels: {app: api-server}
    command: [fibril-echo, http-server, --port, "8080"]
  - name: grpc
    namespace: shop
    labels: {app: grpc}
    command: [fibril-echo, h2-server, --port, "9090"]
  - {name: other, namespace: shop, labels: {app: other}}
  - name: plain
    namespace: shop
    labels: {app: plain}
    command: [fibril-echo, http-server, --port, "8080"]
policies:
  - inline: |
      # The seed's policy: only GET on /api/... from the frontend.
      apiVersion: cilium.io/v2
      kind: CiliumNetworkPolicy
      metadata: {name: allow-only-get-requests, namespace: shop}
      spec:
        endpointSelector: {matchLabels: {app: api-server}}
        ingress:
        - fromEndpoints: [{matchLabels: {app: frontend}}]
          toPorts:
          - ports: [{port: "8080", protocol: TCP}]
            rules:
              http:
              - method: "GET"
                path: "/api/.*"
        - fromEndpoints: [{matchLabels: {app: other}}]
          toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
  - inline: |
      # gRPC methods are HTTP/2 paths.
      apiVersion: cilium.io/v2
      kind: CiliumNetworkPolicy
      metadata: {name: grpc-say-only, namespace: shop}
      spec:
        endpointSelector: {matchLabels: {app: grpc}}
        ingress:
        - fromEndpoints: [{matchLabels: {app: frontend}}]
          toPorts:
          - ports: [{port: "9090", protocol: TCP}]
            rules:
              http:
              - method: POST
                path: "/fibril[.]Echo/Say"
  - inline: |
      # An egress L7 rule: other may GET /public/... with its team header.
      apiVersion: cilium.io/v2
      kind: CiliumNetworkPolicy
      metadata: {name: other-egress, namespace: shop}
      spec:
        endpointSelector: {matchLabels: {app: other}}
        egress:
        - toEndpoints: [{matchLabels: {app: api-server}}]
          toPorts:
          - ports: [{port: "8080", protocol: TCP}]
            rules:
              http:
              - method: GET
                path: "/public/.*"
                headers: ["X-Team: blue"]
"#;

/// frontend .2, api .3, grpc .4, other .5, plain .6 (creation order).
struct L7Lab {
    lab: Lab,
}

impl L7Lab {
    fn start() -> Self {
        let lab = Lab::start(L7_LAB, &[]);
        let l = Self { lab };
        wait_until("the servers listen", || {
            ["api", "grpc", "plain"]
                .iter()
                .all(|p| l.pod_log(p).contains("listening"))
        });
        l
    }

    fn pod_log(&self, pod: &str) -> String {
        std::fs::read_to_string(format!(
            "/run/fibril/labs/{}/pods/shop_{pod}.log",
            self.lab.name
        ))
        .unwrap_or_default()
    }

    /// Runs a command in a pod; its stdout.
    fn exec(&self, pod: &str, cmd: &[&str]) -> String {
        self.lab.exec(&format!("shop/{pod}"), cmd).1
    }

    /// curl from a pod: `%{http_code}` of each transfer, one per line.
    fn curl(&self, pod: &str, args: &[&str]) -> Vec<String> {
        let out = self.exec(
            pod,
            &[
                &[
                    "curl",
                    "-s",
                    "-m",
                    "5",
                    "-o",
                    "/dev/null",
                    "-w",
                    "%{http_code}\\n",
                ],
                args,
            ]
            .concat(),
        );
        out.lines().map(String::from).collect()
    }

    fn url(&self, host: u8, port: u16, path: &str) -> String {
        format!("http://{}:{port}{path}", self.lab.ip(host))
    }

    fn l7_flows(&self, filters: &[&str]) -> Vec<Value> {
        self.lab
            .observe_json(&[&["--all", "--protocol", "http"], filters].concat())
    }

    fn metric(&self, name: &str) -> u64 {
        self.lab.metric(name)
    }
}

#[test]
fn http_rules_are_enforced_by_the_proxy_for_ingress_and_egress() {
    let l = L7Lab::start();
    let api = |path: &str| l.url(3, 8080, path);

    // Ingress rules: GET /api/... passes, anything else gets 403 from the
    // proxy and never reaches the server.
    assert_eq!(l.curl("frontend", &[&api("/api/items")]), ["200"]);
    assert_eq!(
        l.curl("frontend", &["-X", "POST", &api("/api/items")]),
        ["403"]
    );
    assert_eq!(l.curl("frontend", &[&api("/admin")]), ["403"]);
    let body = l.exec(
        "frontend",
        &["curl", "-s", "-m", "5", "-X", "DELETE", &api("/api/items")],
    );
    assert_eq!(body, "Access denied\r\n");
    let log = l.pod_log("api");
    assert!(log.contains("request GET /api/items HTTP/1.1"), "{log}");
    assert!(
        !log.contains("POST") && !log.contains("/admin") && !log.contains("DELETE"),
        "{log}"
    );
    // Transparent: the server sees the client's own address.
    assert!(log.contains(&format!("accepted {}:", l.lab.ip(2))), "{log}");

    // Keep-alive: a refused request leaves the connection usable.
    let codes = l.curl(
        "frontend",
        &[
            &api("/api/1"),
            "--next",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{num_connects}\\n",
            "-X",
            "POST",
            &api("/api/2"),
            "--next",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code} %{num_connects}\\n",
            &api("/api/3"),
        ],
    );
    assert_eq!(codes, ["200", "403 0", "200 0"], "one connection, reused");

    // Pipelining: three requests in one write, answered in order.
    let raw = format!(
        "exec 3<>/dev/tcp/{}/8080; printf 'GET /api/p1 HTTP/1.1\\r\\nHost: a\\r\\n\\r\\nPOST /api/p2 HTTP/1.1\\r\\nHost: a\\r\\nContent-Length: 2\\r\\n\\r\\nhiGET /api/p3 HTTP/1.1\\r\\nHost: a\\r\\nConnection: close\\r\\n\\r\\n' >&3; timeout 5 cat <&3",
        l.lab.ip(3)
    );
    let out = l.exec("frontend", &["bash", "-c", &raw]);
    // (The echo server's bodies end without a newline.)
    let statuses: Vec<&str> = out
        .match_indices("HTTP/1.1 ")
        .filter_map(|(i, _)| out.get(i + 9..i + 12))
        .collect();
    assert_eq!(statuses, ["200", "403", "200"], "{out}");

    // The direct HTTP/1.1 path: a chunked response (its chunks and trailer
    // forwarded as they came), then a request it leaves to the general
    // path (HTTP/1.0) on the same connection.
    let raw = format!(
        "exec 3<>/dev/tcp/{}/8080; printf 'GET /api/chunked/3 HTTP/1.1\\r\\nHost: a\\r\\n\\r\\nGET /api/p4 HTTP/1.1\\r\\nHost: a\\r\\n\\r\\nGET /api/p5 HTTP/1.0\\r\\nHost: a\\r\\n\\r\\n' >&3; timeout 5 cat <&3",
        l.lab.ip(3)
    );
    let out = l.exec("frontend", &["bash", "-c", &raw]);
    // (Status lines only: the echo bodies quote request lines.)
    let statuses: Vec<&str> = out
        .match_indices("HTTP/1.")
        .filter_map(|(i, _)| out.get(i..i + 12))
        .filter(|s| s.as_bytes()[8] == b' ')
        .collect();
    assert_eq!(
        statuses,
        ["HTTP/1.1 200", "HTTP/1.1 200", "HTTP/1.0 200"],
        "{out}"
    );
    assert!(
        out.contains("8\r\nchunk 0\n\r\n8\r\nchunk 1\n\r\n8\r\nchunk 2\n\r\n0\r\nX-Chunks: 3\r\n\r\nHTTP/1.1 200"),
        "{out:?}"
    );
    assert!(
        out.contains("fibril-echo: GET /api/p4") && out.contains("fibril-echo: GET /api/p5"),
        "{out:?}"
    );

    // HTTP/2 (prior knowledge, as gRPC): methods are paths.
    let grpc = |path: &str| l.url(4, 9090, path);
    let h2 = ["--http2-prior-knowledge", "-X", "POST"];
    assert_eq!(
        l.curl(
            "frontend",
            &[&h2[..], &[&grpc("/fibril.Echo/Say")]].concat()
        ),
        ["200"]
    );
    assert_eq!(
        l.curl(
            "frontend",
            &[&h2[..], &[&grpc("/fibril.Echo/Drop")]].concat()
        ),
        ["403"]
    );
    assert!(l
        .pod_log("grpc")
        .contains("request POST /fibril.Echo/Say HTTP/2"));
    assert!(!l.pod_log("grpc").contains("Drop"));

    // Egress rules (the client's policy): method, path and a header value.
    let team = ["-H", "X-Team: blue"];
    assert_eq!(
        l.curl("other", &[&team[..], &[&api("/public/x")]].concat()),
        ["200"]
    );
    assert_eq!(l.curl("other", &[&api("/public/x")]), ["403"]);
    assert_eq!(
        l.curl(
            "other",
            &[&["-H", "X-Team: red"][..], &[&api("/public/x")]].concat()
        ),
        ["403"]
    );
    assert_eq!(
        l.curl("other", &[&team[..], &[&api("/api/items")]].concat()),
        ["403"]
    );

    // Every request and response is an L7 flow, with the rule's policy.
    // Flows arrive in order within the observer's round (~20 ms): once the
    // last request's is there, all are.
    wait_until("the last request's flow", || {
        l.l7_flows(&["--verdict", "DROPPED", "--from-pod", "shop/other"])
            .len()
            == 3
    });
    let dropped = l.l7_flows(&[
        "--verdict",
        "DROPPED",
        "--http-method",
        "POST",
        "--to-pod",
        "shop/api",
    ]);
    assert!(!dropped.is_empty());
    let d = &dropped[0];
    assert_eq!(d["Type"], "L7");
    assert_eq!(d["l7"]["type"], "REQUEST");
    assert_eq!(d["l7"]["http"]["method"], "POST");
    assert_eq!(d["traffic_direction"], "INGRESS");
    assert_eq!(d["ingress_denied_by"][0]["name"], "allow-only-get-requests");
    assert_eq!(d["source"]["pod_name"], "frontend");
    assert_eq!(d["destination"]["pod_name"], "api");
    let ok = l.l7_flows(&["--http-status", "200", "--http-path", "/api/items"]);
    assert!(
        ok.iter().any(|f| {
            f["l7"]["type"] == "RESPONSE"
                && f["l7"]["http"]["code"] == 200
                && f["is_reply"] == true
                && f["l7"]["latency_ns"]
                    .as_str()
                    .is_some_and(|n| n.parse::<u64>().unwrap() > 0)
                && f["Summary"].as_str().unwrap().starts_with("HTTP/1.1 200 ")
        }),
        "{ok:?}"
    );
    let egress = l.l7_flows(&["--verdict", "DROPPED", "--from-pod", "shop/other"]);
    assert!(
        egress.iter().all(|f| f["traffic_direction"] == "EGRESS"
            && f["egress_denied_by"][0]["name"] == "other-egress"),
        "{egress:?}"
    );
    assert_eq!(egress.len(), 3);
    let grpc_flows = l.l7_flows(&["--http-path", "/fibril.Echo/.*", "--verdict", "DROPPED"]);
    assert_eq!(grpc_flows.len(), 1);
    assert_eq!(grpc_flows[0]["l7"]["http"]["protocol"], "HTTP/2");
    // The compact line, as the hubble CLI prints L7 flows.
    let out = l.lab.fibril(&[
        "observe",
        "--all",
        "--protocol",
        "http",
        "--verdict",
        "DROPPED",
        "--http-method",
        "DELETE",
    ]);
    let line = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        line.contains("shop/frontend:")
            && line.contains("-> shop/api:8080 (ID:")
            && line.contains(&format!(
                "http-request DROPPED (HTTP/1.1 DELETE http://{}:8080/api/items)",
                l.lab.ip(3)
            )),
        "{line}"
    );

    // Hubble's httpV2 metrics, refusals included (Cilium counts only
    // responses, so its refusals are invisible there).
    let hm = l.lab.http_get_metrics("hubble-metrics.addr");
    assert!(
        hm.contains(r#"hubble_http_requests_total{method="POST",protocol="HTTP/1.1",reporter="server",status="403"}"#)
            && hm.contains(r#"hubble_http_requests_total{method="GET",protocol="HTTP/1.1",reporter="server",status="200"}"#)
            && hm.contains(r#"hubble_http_requests_total{method="GET",protocol="HTTP/1.1",reporter="client",status="403"}"#)
            && hm.contains("# TYPE hubble_http_request_duration_seconds histogram")
            && hm.contains(r#"hubble_http_request_duration_seconds_bucket{le="+Inf",method="GET",reporter="server"}"#)
            && hm.contains(r#"hubble_http_request_duration_seconds_count{method="GET",reporter="server"}"#),
        "{hm}"
    );

    // Traffic no L7 rule covers never goes through the proxy: after a
    // plain connection and a covered one, the proxy (whose counters reach
    // the agent's metrics a moment later) counted only the covered one.
    let before = l.metric("fibril_proxy_connections_total");
    assert_eq!(l.curl("frontend", &[&l.url(6, 8080, "/anything")]), ["200"]);
    assert_eq!(l.curl("frontend", &[&api("/api/counted")]), ["200"]);
    wait_until("the proxy's counters", || {
        l.metric("fibril_proxy_connections_total") > before
    });
    assert_eq!(l.metric("fibril_proxy_connections_total"), before + 1);
    let to_plain = || {
        let out = l
            .lab
            .fibril(&["observe", "--all", "-o", "json", "--to-pod", "shop/plain"]);
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    wait_until("flows to plain", || to_plain().contains("TO_ENDPOINT"));
    let to_plain = to_plain();
    assert!(
        to_plain.contains("TO_ENDPOINT") && !to_plain.contains("TO_PROXY"),
        "{to_plain}"
    );

    // An L7 rule added later applies from the next connection on.
    let policy = l.lab.dir.join("plain-l7.yaml");
    std::fs::write(
        &policy,
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: plain-l7, namespace: shop}\nspec:\n  endpointSelector: {matchLabels: {app: plain}}\n  ingress:\n  - toPorts:\n    - ports: [{port: \"8080\", protocol: TCP}]\n      rules: {http: [{path: /ok}]}\n",
    )
    .unwrap();
    let out = l
        .lab
        .fibril(&["policy", "import", policy.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(l.curl("frontend", &[&l.url(6, 8080, "/anything")]), ["403"]);
    assert_eq!(l.curl("frontend", &[&l.url(6, 8080, "/ok")]), ["200"]);
}

#[test]
fn malformed_http_is_rejected_counted_and_harms_no_other_connection() {
    let l = L7Lab::start();
    let api = |path: &str| l.url(3, 8080, path);
    // A connection held open across the bad ones.
    let addr = format!("{}:8080", l.lab.ip(3));
    let held = std::process::Command::new(common::bin("fibril"))
        .args(["--lab", &l.lab.name, "lab", "exec", "shop/frontend", "--"])
        .args([
            "fibril-echo",
            "http-hold",
            &addr,
            "--seconds",
            "4",
            "--interval",
            "0.1",
        ])
        .args(["--path", "/api/held"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let before = l.metric("fibril_proxy_http_malformed_total");

    // Oversized headers: 431, as hyper answers them.
    let big = format!("X-Big: {}", "a".repeat(80 * 1024));
    // (curl may see the reset of the close before it reads the answer.)
    let code = l.curl("frontend", &["-H", &big, &api("/api/x")]);
    assert!(code == ["431"] || code == ["000"], "{code:?}");
    // Bad framing: a Content-Length that is not a number.
    let raw = format!(
        "exec 3<>/dev/tcp/{}/8080; printf 'GET /api/x HTTP/1.1\\r\\nHost: a\\r\\nContent-Length: zz\\r\\n\\r\\n' >&3; timeout 5 cat <&3",
        l.lab.ip(3)
    );
    let out = l.exec("frontend", &["bash", "-c", &raw]);
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    // Not HTTP at all.
    let raw = format!(
        "exec 3<>/dev/tcp/{}/8080; printf '\\x16\\x03\\x01garbage\\r\\n\\r\\n' >&3; timeout 5 cat <&3",
        l.lab.ip(3)
    );
    l.exec("frontend", &["bash", "-c", &raw]);
    wait_until("the proxy's counters", || {
        l.metric("fibril_proxy_http_malformed_total") >= before + 3
    });
    assert!(!l.pod_log("api").contains("X-Big"));

    // Everything else kept working.
    assert_eq!(l.curl("frontend", &[&api("/api/after")]), ["200"]);
    let held = held.wait_with_output().unwrap();
    assert!(
        held.status.success(),
        "{}{}",
        String::from_utf8_lossy(&held.stdout),
        String::from_utf8_lossy(&held.stderr)
    );
}

const DNS_LAB: &str = r#"
podCIDR: POD_CIDR_HERE
namespaces:
  - name: shop
pods:
  - {name: client, namespace: shop, labels: {app: client}}
externals:
  - {name: dns, address: 198.51.100.53, command: [fibril-echo, dns-server, --port, "53", --record, "allowed.example=198.51.100.10", --record, "sub.wild.example=198.51.100.11", --record, "a.b.wild.example=198.51.100.11", --record, "other.example=198.51.100.12", --record, "denied.example=198.51.100.10"]}
  - {name: allowed, address: 198.51.100.10, command: [fibril-echo, http-server, --port, "8080"]}
  - {name: wild, address: 198.51.100.11, command: [fibril-echo, http-server, --port, "8080"]}
  - {name: other, address: 198.51.100.12, command: [fibril-echo, http-server, --port, "8080"]}
policies:
  - inline: |
      apiVersion: cilium.io/v2
      kind: CiliumNetworkPolicy
      metadata: {name: fqdn, namespace: shop}
      spec:
        endpointSelector: {matchLabels: {app: client}}
        egress:
        - toCIDR: [198.51.100.53/32]
          toPorts:
          - ports: [{port: "53", protocol: UDP}, {port: "53", protocol: TCP}]
            rules:
              dns: [{matchName: allowed.example}, {matchPattern: "*.wild.example"}, {matchName: other.example}]
        - toFQDNs: [{matchName: allowed.example}, {matchPattern: "*.wild.example"}]
          toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"#;

#[test]
fn dns_rules_and_to_fqdns_allow_exactly_the_resolved_names() {
    let d = DnsLab::start(DNS_LAB.to_string());
    let (lab, dns_log) = (&d.lab, || d.dns_log());
    let query = |name: &str, tcp: bool| d.query(name, tcp);
    let get = |ip: &str| d.get(ip);

    // Nothing resolved yet: the addresses are just the world.
    assert!(!get("198.51.100.10"));
    // Resolving through the DNS proxy allows the name's address at once.
    let a = query("allowed.example", false);
    assert!(
        a.contains("rcode NoError") && a.contains("address 198.51.100.10"),
        "{a}"
    );
    assert!(get("198.51.100.10"), "the first connection after resolving");
    // matchPattern: one label deep only.
    assert!(query("sub.wild.example", false).contains("address 198.51.100.11"));
    assert!(get("198.51.100.11"));
    assert!(query("a.b.wild.example", false).contains("rcode Refused"));
    // Allowed by the DNS rules, but no toFQDNs selector names it.
    assert!(query("other.example", false).contains("address 198.51.100.12"));
    assert!(!get("198.51.100.12"));
    // Not in the DNS rules: REFUSED by the proxy, never seen by the server.
    assert!(query("denied.example", false).contains("rcode Refused"));
    assert!(!dns_log().contains("denied.example") && !dns_log().contains("a.b.wild"));
    // DNS over TCP goes through the proxy too.
    assert!(query("allowed.example", true).contains("address 198.51.100.10"));
    assert!(query("denied.example", true).contains("rcode Refused"));

    // `fibril fqdn list` shows what was learned; names the DNS rules allow
    // but no toFQDNs selector names are learned too (Cilium's cache is
    // node-wide), the refused ones are not.
    let out = lab.fibril(&["fqdn", "list"]);
    let list = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        list.contains("allowed.example.")
            && list.contains("198.51.100.10")
            && list.contains("sub.wild.example.")
            && !list.contains("denied.example"),
        "{list}"
    );

    // DNS flows: query, answer addresses, TTL, rcode, qtypes, source.
    let flows = |args: &[&str]| lab.observe_json(&[&["--all"], args].concat());
    wait_until("the last query's flow", || {
        flows(&["--protocol", "dns", "--verdict", "DROPPED"]).len() == 3
    });
    let dns = flows(&["--protocol", "dns"]);
    let answer = dns
        .iter()
        .find(|f| f["l7"]["type"] == "RESPONSE" && f["l7"]["dns"]["query"] == "allowed.example.")
        .expect("a DNS answer flow");
    assert_eq!(
        answer["l7"]["dns"]["ips"],
        serde_json::json!(["198.51.100.10"])
    );
    assert_eq!(answer["l7"]["dns"]["ttl"], 300);
    assert_eq!(answer["l7"]["dns"]["qtypes"], serde_json::json!(["A"]));
    assert_eq!(answer["l7"]["dns"]["observation_source"], "proxy");
    assert_eq!(
        answer["Summary"],
        "DNS Answer \"198.51.100.10\" TTL: 300 (Proxy allowed.example. A)"
    );
    let refused: Vec<&Value> = dns.iter().filter(|f| f["verdict"] == "DROPPED").collect();
    assert_eq!(refused.len(), 3, "{refused:?}");
    assert!(refused
        .iter()
        .all(|f| f["egress_denied_by"][0]["name"] == "fqdn"
            && (f["l4"]["UDP"].is_object() || f["l4"]["TCP"].is_object())));
    let hm = lab.http_get_metrics("hubble-metrics.addr");
    assert!(
        hm.contains(r#"hubble_dns_responses_total{ips_returned="0",qtypes="A",rcode="Refused"}"#)
            && hm.contains(
                r#"hubble_dns_responses_total{ips_returned="1",qtypes="A",rcode="NoError"}"#
            )
            && hm.contains(r#"hubble_dns_response_types_total{qtypes="A",type="A"}"#)
            && hm.contains(r#"hubble_dns_queries_total{ips_returned="0",qtypes="A",rcode=""}"#),
        "{hm}"
    );
    // `--fqdn` finds the connections to the learned address by name.
    wait_until("flows to allowed.example", || {
        flows(&["--fqdn", "allowed.example", "--protocol", "tcp"])
            .iter()
            .any(|f| f["IP"]["destination"] == "198.51.100.10")
    });
    let out = lab.fibril(&[
        "observe",
        "--all",
        "--protocol",
        "dns",
        "--verdict",
        "DROPPED",
    ]);
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        text.contains("dns-request proxy DROPPED (DNS Query denied.example. A)"),
        "{text}"
    );

    // The agent restarts: pods keep resolving throughout (the datapath
    // sends DNS straight to the resolver while the proxy is away), and the
    // learned names are still allowed afterwards without a new lookup.
    let name = lab.name.clone();
    let during = std::thread::spawn(move || {
        let mut failed = 0;
        for _ in 0..30 {
            let out = std::process::Command::new(common::bin("fibril"))
                .args(["--lab", &name, "lab", "exec", "shop/client", "--"])
                .args([
                    "fibril-echo",
                    "dns-query",
                    "--timeout",
                    "1",
                    "198.51.100.53",
                    "allowed.example",
                ])
                .output()
                .unwrap();
            if !out.status.success() {
                failed += 1;
                eprintln!(
                    "query during the restart failed: {}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(30));
        }
        failed
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    let out = lab.fibril(&["lab", "restart-agent"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        during.join().unwrap(),
        0,
        "DNS failed while the agent restarted"
    );
    assert!(get("198.51.100.11"), "learned before the restart");
    assert!(!get("198.51.100.12"));
}

#[test]
fn learned_names_expire_are_bounded_and_bad_dns_is_counted() {
    let lab_yaml = DNS_LAB
        .replace(
            "--record, \"denied.example=198.51.100.10\"",
            "--record, \"denied.example=198.18.7.10\", --record, \"x.wild.example=198.18.7.14\", --ttl, \"1\"",
        )
        .replace(
            "policies:",
            "dnsProxy: {minTtl: 0, idleConnectionGracePeriod: 0, maxIpsPerEndpoint: 2}\npolicies:",
        )
        // Its own external addresses: tests run side by side on one host.
        .replace("198.51.100.", "198.18.7.");
    let d = DnsLab::start(lab_yaml);
    let (lab, exec) = (&d.lab, |cmd: &[&str]| d.lab.exec("shop/client", cmd));
    let query = |name: &str| d.query(name, false);
    let get = |ip: &str| d.get(ip);
    let metric = |name: &str| lab.metric(name);

    // Bad DNS: garbage to the resolver's port is dropped and counted, and
    // the proxy goes on answering.
    exec(&[
        "fibril-echo",
        "udp-send",
        "198.18.7.53:53",
        "--message",
        "not a dns message",
        "--timeout",
        "0.3",
    ]);
    assert!(metric("fibril_proxy_dns_malformed_total") >= 1);

    // The bound: two learned addresses per endpoint; the third is answered
    // but not learned (so not allowed), and that is counted.
    assert!(query("allowed.example").contains("address 198.18.7.10"));
    assert!(query("sub.wild.example").contains("address 198.18.7.11"));
    assert!(query("x.wild.example").contains("address 198.18.7.14"));
    assert_eq!(metric("fibril_fqdn_ips_refused_total"), 1);
    assert!(get("198.18.7.10"));
    assert!(!get("198.18.7.14"));

    // TTL 1 s, no minimum, no grace: sub.wild.example's address goes at the
    // next collection; allowed.example's stays while its connection is
    // tracked (Cilium's "zombie").
    let end = std::time::Instant::now() + std::time::Duration::from_secs(15);
    while metric("fibril_fqdn_names") > 1 && std::time::Instant::now() < end {
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    assert_eq!(metric("fibril_fqdn_names"), 1);
    assert!(!get("198.18.7.11"), "expired: no longer allowed");
    assert!(get("198.18.7.10"), "kept while its connections live");
}

/// A resolver that answers several questions in one message, adds a record
/// nobody asked for to every answer, and follows a CNAME; the client's DNS
/// rules allow any name under `example`, its toFQDNs only `allowed.example`
/// and `alias.example`. Its externals' addresses are its own (labs side by
/// side need distinct ones).
const HOSTILE_DNS_LAB: &str = r#"
podCIDR: POD_CIDR_HERE
namespaces:
  - name: shop
pods:
  - {name: client, namespace: shop, labels: {app: client}}
externals:
  - {name: dns, address: 198.18.9.53, command: [fibril-echo, dns-server, --port, "53", --record, "allowed.example=198.18.9.10", --record, "other.example=198.18.9.12", --cname, "alias.example=target.example", --record, "target.example=198.18.9.11", --extra, "evil.test=198.18.9.13"]}
  - {name: allowed, address: 198.18.9.10, command: [fibril-echo, http-server, --port, "8080"]}
  - {name: target, address: 198.18.9.11, command: [fibril-echo, http-server, --port, "8080"]}
  - {name: other, address: 198.18.9.12, command: [fibril-echo, http-server, --port, "8080"]}
  - {name: evil, address: 198.18.9.13, command: [fibril-echo, http-server, --port, "8080"]}
policies:
  - inline: |
      apiVersion: cilium.io/v2
      kind: CiliumNetworkPolicy
      metadata: {name: fqdn, namespace: shop}
      spec:
        endpointSelector: {matchLabels: {app: client}}
        egress:
        - toCIDR: [198.18.9.53/32]
          toPorts:
          - ports: [{port: "53", protocol: UDP}, {port: "53", protocol: TCP}]
            rules:
              dns: [{matchPattern: "*.example"}]
        - toFQDNs: [{matchName: allowed.example}, {matchName: alias.example}]
          toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"#;

/// The toFQDNs bypasses an attacker in a pod found: a second question
/// learning one name's addresses for another, records outside the CNAME
/// chain learned for the queried name, and a label holding a dot read as
/// two labels by a pattern. Each is refused or ignored; what the chain
/// really resolves to is learned as before.
#[test]
fn dns_answers_teach_only_what_the_queried_name_resolves_to() {
    let d = DnsLab::start(HOSTILE_DNS_LAB.to_string());
    let lab = &d.lab;
    let learned = || String::from_utf8_lossy(&lab.fibril(&["fqdn", "list"]).stdout).to_string();

    // Two questions in one query: FORMERR from the proxy, nothing learned.
    let two = lab
        .exec(
            "shop/client",
            &[
                "fibril-echo",
                "dns-query",
                &d.resolver,
                "allowed.example",
                "--also",
                "other.example",
            ],
        )
        .1;
    assert!(two.contains("rcode FormErr"), "{two}");
    assert!(
        !d.dns_log().contains("other.example"),
        "the resolver never saw it"
    );
    assert!(
        !d.get("198.18.9.12"),
        "other.example's address stays closed"
    );

    // The answer carries evil.test's record too: forwarded, not learned.
    let a = d.query("allowed.example", false);
    assert!(a.contains("address 198.18.9.10"), "{a}");
    assert!(d.get("198.18.9.10"));
    assert!(!d.get("198.18.9.13"), "an out-of-chain record was learned");
    let list = learned();
    assert!(
        list.contains("198.18.9.10") && !list.contains("198.18.9.13"),
        "{list}"
    );

    // A CNAME chain: the target's address is learned for the alias.
    let alias = d.query("alias.example", true);
    assert!(alias.contains("address 198.18.9.11"), "{alias}");
    assert!(d.get("198.18.9.11"));

    // One label holding a dot: refused, never forwarded.
    let dotted = d.query("allowed\\.example", false);
    assert!(dotted.contains("rcode Refused"), "{dotted}");
    assert!(
        !d.dns_log().contains("allowed\\.example"),
        "{}",
        d.dns_log()
    );
    assert!(!learned().contains("198.18.9.12") && !learned().contains("198.18.9.13"));
}

/// A lab with a DNS server and HTTP servers as externals, one client pod.
struct DnsLab {
    lab: Lab,
    resolver: String,
}

impl DnsLab {
    fn start(yaml: String) -> Self {
        let resolver = yaml
            .split("name: dns, address: ")
            .nth(1)
            .and_then(|r| r.split(',').next())
            .expect("a dns external")
            .to_string();
        let d = Self {
            lab: Lab::start(&yaml, &[]),
            resolver,
        };
        wait_until("the DNS server listens", || {
            d.dns_log().contains("listening")
        });
        d
    }

    fn dns_log(&self) -> String {
        std::fs::read_to_string(format!(
            "/run/fibril/labs/{}/pods/external_dns.log",
            self.lab.name
        ))
        .unwrap_or_default()
    }

    fn query(&self, name: &str, tcp: bool) -> String {
        let mut cmd = vec!["fibril-echo", "dns-query", &self.resolver, name];
        if tcp {
            cmd.push("--tcp");
        }
        self.lab.exec("shop/client", &cmd).1
    }

    fn get(&self, ip: &str) -> bool {
        let url = format!("http://{ip}:8080/");
        self.lab
            .exec(
                "shop/client",
                &["fibril-echo", "http-get", "--timeout", "1", &url],
            )
            .0
    }
}

/// The socket shortcut (proxied payload moved socket to socket): several
/// MiB each way arrive intact and in order, the proxy still applies its
/// rules and reports flows, and connections without L7 rules never take
/// the shortcut.
#[test]
fn proxied_bytes_take_the_socket_shortcut_intact_both_ways() {
    const LAB: &str = r#"
podCIDR: POD_CIDR_HERE
pods:
  - {name: client, namespace: bulk, labels: {app: client}}
  - {name: store, namespace: bulk, labels: {app: store}, command: [fibril-echo, http-server, --port, "8080"]}
  - {name: plain, namespace: bulk, labels: {app: plain}, command: [fibril-echo, http-server, --port, "8080"]}
policies:
  - inline: |
      apiVersion: cilium.io/v2
      kind: CiliumNetworkPolicy
      metadata: {name: bulk-l7, namespace: bulk}
      spec:
        endpointSelector: {matchLabels: {app: store}}
        ingress:
        - fromEndpoints: [{matchLabels: {app: client}}]
          toPorts:
          - ports: [{port: "8080", protocol: TCP}]
            rules:
              http:
              - {method: PUT, path: "/upload"}
              - {method: GET, path: "/bytes/[0-9]+"}
"#;
    // client .2, store .3, plain .4
    let lab = Lab::start(LAB, &[]);
    wait_until("the servers listen", || {
        ["store", "plain"].iter().all(|p| {
            std::fs::read_to_string(format!("/run/fibril/labs/{}/pods/bulk_{p}.log", lab.name))
                .unwrap_or_default()
                .contains("listening")
        })
    });
    let size = 6 * 1024 * 1024 + 12_345;
    let upload: Vec<u8> = (0..size).map(|i| (i * 13 % 256) as u8).collect();
    let upload_file = lab.dir.join("upload.bin");
    let download_file = lab.dir.join("download.bin");
    std::fs::write(&upload_file, &upload).unwrap();
    let store = |path: &str| format!("http://{}:8080{path}", lab.ip(3));

    // Up: the server reports the length and hash of what it read.
    let (ok, out) = lab.exec(
        "bulk/client",
        &[
            "curl",
            "-s",
            "-m",
            "20",
            "-X",
            "PUT",
            "--data-binary",
            &format!("@{}", upload_file.display()),
            &store("/upload"),
        ],
    );
    let want = format!(
        "body {size} fnv {:016x}",
        test_support::fnv1a(test_support::FNV_OFFSET, &upload)
    );
    assert!(
        ok && out.contains(&want),
        "upload through the proxy: {out:?}, want {want:?}"
    );

    // Down, on one keep-alive connection: a big answer, then a refused
    // request (403 from the proxy), then another big answer.
    let (ok, out) = lab.exec(
        "bulk/client",
        &[
            "curl",
            "-s",
            "-m",
            "20",
            "-w",
            "%{http_code}\\n",
            "-o",
            download_file.to_str().unwrap(),
            &store(&format!("/bytes/{size}")),
            "-o",
            "/dev/null",
            &store("/upload"),
            "-o",
            "/dev/null",
            &store("/bytes/70000"),
        ],
    );
    assert!(ok, "download: {out}");
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        ["200", "403", "200"],
        "{out}"
    );
    let got = std::fs::read(&download_file).unwrap();
    assert_eq!(got.len(), size);
    if let Some(i) = (0..size).find(|&i| got[i] != test_support::pattern_byte(i)) {
        panic!("the download differs from byte {i} on");
    }

    // Those bytes took the shortcut; the L7 flows are there as ever.
    let sockets = lab.metric("fibril_proxy_shortcut_sockets_total");
    assert!(sockets >= 4, "client, proxy (2) and server ends: {sockets}");
    assert!(lab.metric("fibril_proxy_shortcut_redirected_total") > 0);
    let status = String::from_utf8_lossy(&lab.fibril(&["status"]).stdout).into_owned();
    assert!(status.contains("L7 shortcut:   on ("), "{status}");
    wait_until("the refused request's L7 flow", || {
        !lab.observe_json(&["--all", "--protocol", "http", "--verdict", "DROPPED"])
            .is_empty()
    });

    // A connection without L7 rules is no business of the shortcut.
    assert!(lab.http_get("bulk/client", &format!("http://{}:8080/x", lab.ip(4)), "5"));
    assert_eq!(lab.metric("fibril_proxy_shortcut_sockets_total"), sockets);
}

/// What the proxy checks is what the server serves (issue 20's first
/// vectors, on both proxy paths): encoded dot segments are resolved before
/// the rule sees the path and the resolved path is what the server gets;
/// encoded slashes and backslashes, fragments and bad encodings are
/// refused with 400. The server never logs a request for /admin.
#[test]
fn encoded_paths_cannot_reach_what_the_rule_refuses() {
    let l = L7Lab::start();
    let raw = |target: &str, extra: &str| {
        // printf's own escapes: a literal % is %%.
        let target = target.replace('%', "%%");
        // A Host of the caller's, or the usual one.
        let host = if extra.starts_with("Host:") {
            ""
        } else {
            "Host: api\\r\\n"
        };
        let script = format!(
            "exec 3<>/dev/tcp/{}/8080; printf 'GET {target} HTTP/1.1\\r\\n{host}{extra}Connection: close\\r\\n\\r\\n' >&3; timeout 5 cat <&3",
            l.lab.ip(3)
        );
        let out = l.exec("frontend", &["bash", "-c", &script]);
        out.lines().next().unwrap_or_default().to_string()
    };
    // Resolved to /admin: refused by the rule (GET /api/.* only).
    for target in [
        "/api/%2e%2e/admin",
        "/api/%2E%2E/admin",
        "/api/.%2e/admin",
        "/api/%2e./admin",
        "/api/x/%2e%2e/%2e%2e/admin",
    ] {
        // Plain requests and ones the general path takes (Expect).
        for extra in ["", "Expect: 100-continue\\r\\nContent-Length: 0\\r\\n"] {
            let status = raw(target, extra);
            assert!(
                status.starts_with("HTTP/1.1 403"),
                "{target} {extra}: {status} {}",
                l.pod_log("api")
            );
        }
    }
    // Ambiguous: refused before any rule.
    for target in [
        "/api/..%2fadmin",
        "/api/..%2Fadmin",
        "/api/%2e%2e%2fadmin",
        "/api/..%5cadmin",
        "/admin#/../api/x",
        "/api/%zz",
    ] {
        let status = raw(target, "");
        assert!(status.starts_with("HTTP/1.1 400"), "{target}: {status}");
    }
    // Absolute-form: the URI's host is the one checked and sent, whatever
    // Host said; two Host fields are refused.
    let abs = raw("http://api.example/api/abs", "Host: evil\\r\\n");
    assert!(abs.starts_with("HTTP/1.1 200"), "{abs}");
    assert!(raw("/api/x", "X: y\\r\\nHost: other\\r\\n").starts_with("HTTP/1.1 400"));
    let log = l.pod_log("api");
    assert!(
        log.contains("host api.example\nrequest GET /api/abs HTTP/1.1"),
        "{log}"
    );
    assert!(!log.contains("host evil"), "{log}");
    // Encoded unreserved characters reach the server decoded: the path the
    // rule allowed.
    assert!(raw("/api/%78y", "").starts_with("HTTP/1.1 200"));
    let log = l.pod_log("api");
    assert!(log.contains("GET /api/xy "), "{log}");
    assert!(!log.contains("/admin") && !log.contains("%2"), "{log}");
}

/// A WebSocket upgrade the rules allow continues as a tunnel after the
/// server's 101 (bytes both ways); one they refuse gets 403; an h2c
/// upgrade is taken out of the request, so the server answers in HTTP/1.1
/// and the connection stays one the proxy reads.
#[test]
fn websocket_upgrades_the_rules_allow_become_tunnels() {
    let l = L7Lab::start();
    let upgrade = |path: &str, protocol: &str, then: &str| {
        let script = format!(
            "exec 3<>/dev/tcp/{}/8080; printf 'GET {path} HTTP/1.1\\r\\nHost: api\\r\\nConnection: Upgrade\\r\\nUpgrade: {protocol}\\r\\n\\r\\n' >&3; sleep 0.5; printf '{then}' >&3; timeout 2 cat <&3",
            l.lab.ip(3)
        );
        l.exec("frontend", &["bash", "-c", &script])
    };
    let tunnel = upgrade("/api/ws", "websocket", "ping-through-tunnel");
    assert!(tunnel.starts_with("HTTP/1.1 101 "), "{tunnel}");
    assert!(tunnel.ends_with("\r\n\r\nping-through-tunnel"), "{tunnel}");
    let refused = upgrade("/admin", "websocket", "");
    assert!(refused.starts_with("HTTP/1.1 403 "), "{refused}");
    let h2c = upgrade("/api/h2c", "h2c", "");
    assert!(h2c.starts_with("HTTP/1.1 200 "), "{h2c}");
    let log = l.pod_log("api");
    assert_eq!(log.matches("upgraded").count(), 1, "{log}");
    assert!(!log.contains("/admin"), "{log}");
    wait_until("the proxy's counters", || {
        l.metric("fibril_proxy_http_upgrades_total") == 1
    });
}

/// The HTTP proxy is a process of its own (`fibril-l7proxy`): killing the
/// agent with SIGKILL and starting it again two seconds later fails none of
/// a steady load's requests, neither on held keep-alive connections nor on
/// connections opened during the outage (checked with the last policy the
/// proxy had: /admin is still refused then); flows made while the agent
/// was away reach the new one.
#[test]
fn proxied_connections_survive_an_agent_crash() {
    let l = L7Lab::start();
    let proxy_pid = || {
        std::fs::read_to_string(format!("/run/fibril/labs/{}/state/l7proxy.pid", l.lab.name))
            .unwrap()
    };
    let before = proxy_pid();
    let url = l.url(3, 8080, "/api/steady");
    let load = {
        let (lab, url) = (l.lab.name.clone(), url.clone());
        std::thread::spawn(move || {
            let out = std::process::Command::new(common::bin("fibril"))
                .args(["--lab", &lab, "lab", "exec", "shop/frontend", "--"])
                .args(["fibril-echo", "http-steady", &url, "--seconds", "7"])
                .output()
                .unwrap();
            String::from_utf8_lossy(&out.stdout).into_owned()
        })
    };
    std::thread::sleep(std::time::Duration::from_secs(2));
    let lab_json: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("/run/fibril/labs/{}/lab.json", l.lab.name)).unwrap(),
    )
    .unwrap();
    let agent = lab_json["agent_pid"].as_u64().unwrap().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-9", &agent])
        .status()
        .unwrap()
        .success());
    std::thread::sleep(std::time::Duration::from_millis(500));
    // The outage: the last policy still holds for new connections.
    assert_eq!(l.curl("frontend", &[&l.url(3, 8080, "/admin")]), ["403"]);
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let restarted = l.lab.fibril(&["lab", "restart-agent"]);
    assert!(restarted.status.success(), "{restarted:?}");
    let out = load.join().unwrap();
    let count = |key: &str| -> u64 {
        out.lines()
            .find_map(|line| line.strip_prefix(key)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key} in {out}"))
    };
    assert!(count("held_requests") > 100, "{out}");
    assert!(count("new_requests") > 50, "{out}");
    assert_eq!(count("held_failed"), 0, "{out}");
    assert_eq!(count("new_failed"), 0, "{out}");
    // The same proxy throughout; the refusal made during the outage was
    // reported to the new agent.
    assert_eq!(proxy_pid(), before);
    wait_until("the outage's flows reach the new agent", || {
        !l.l7_flows(&["--http-path", "/admin", "--verdict", "DROPPED"])
            .is_empty()
    });
    assert_eq!(l.curl("frontend", &[&l.url(3, 8080, "/admin")]), ["403"]);
}
