//! Tier 5: the L7 bypass corpus against a real server. nginx (Debian's
//! nginx-light) runs in a lab pod behind the proxy with a rule allowing only
//! `GET /api/.*`; a pod sends every known way of reaching `/admin` past such
//! a rule (encoded dot segments and slashes, fragments, double encoding,
//! overlong UTF-8, `..;/`, backslashes, absolute-form, duplicate headers,
//! smuggled bodies) over HTTP/1.1 on both proxy paths and over HTTP/2. The
//! client gets what the policy implies, and nginx never serves `/admin`:
//! its access log holds the path it served (`$uri`, decoded and
//! normalised by nginx itself). Needs root, curl and nginx.

mod common;

use common::{wait_until, Lab};

const NGINX: &str = "/usr/sbin/nginx";

/// nginx: HTTP/1.1 on 8080 and 8082, HTTP/2 (prior knowledge) on 8081;
/// every answer names the path nginx served, `/admin` says ADMIN, and
/// `X-Token: wrong` (the first of several, as nginx reads them) says so.
const NGINX_CONF: &str = r#"
daemon off;
master_process off;
worker_processes 1;
pid DIR/nginx.pid;
error_log stderr notice;
events { worker_connections 64; }
http {
    log_format served 'served uri=$uri request="$request" token=$http_x_token';
    access_log /dev/stdout served;
    client_body_temp_path DIR/body;
    proxy_temp_path DIR/proxy;
    fastcgi_temp_path DIR/fastcgi;
    uwsgi_temp_path DIR/uwsgi;
    scgi_temp_path DIR/scgi;
    server {
        listen 8080;
        listen 8082;
        listen 8081 http2;
        location / {
            if ($http_x_token = "wrong") { return 200 "WRONG TOKEN\n"; }
            return 200 "nginx served $uri\n";
        }
        location /admin { return 200 "ADMIN\n"; }
    }
}
"#;

const LAB: &str = r#"
podCIDR: POD_CIDR_HERE
namespaces:
  - name: shop
pods:
  - {name: frontend, namespace: shop, labels: {app: frontend}}
  - name: web
    namespace: shop
    labels: {app: web}
    command: [NGINX_HERE, -p, DIR_HERE, -c, DIR_HERE/nginx.conf]
policies:
  - inline: |
      apiVersion: cilium.io/v2
      kind: CiliumNetworkPolicy
      metadata: {name: web-api-only, namespace: shop}
      spec:
        endpointSelector: {matchLabels: {app: web}}
        ingress:
        - fromEndpoints: [{matchLabels: {app: frontend}}]
          toPorts:
          - ports: [{port: "8080", protocol: TCP}, {port: "8081", protocol: TCP}]
            rules:
              http:
              - method: GET
                path: "/api/.*"
          - ports: [{port: "8082", protocol: TCP}]
            rules:
              http:
              - method: GET
                path: "/api/.*"
                headers: ["X-Token: abc"]
"#;

/// nginx's prefix directory (config, pid, temp files), removed at the end.
struct NginxDir(std::path::PathBuf);

impl Drop for NginxDir {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

struct BypassLab {
    lab: Lab,
    _dir: NginxDir,
}

impl BypassLab {
    fn start() -> Self {
        assert!(
            std::path::Path::new(NGINX).exists(),
            "nginx is missing: `cargo xtask test` installs nginx-light"
        );
        let dir = std::env::temp_dir().join(format!("fibril-e2e-nginx-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let dir = NginxDir(dir);
        let path = dir.0.to_str().unwrap();
        std::fs::write(dir.0.join("nginx.conf"), NGINX_CONF.replace("DIR", path)).unwrap();
        let lab = Lab::start(
            &LAB.replace("NGINX_HERE", NGINX).replace("DIR_HERE", path),
            &[],
        );
        let l = BypassLab { lab, _dir: dir };
        // From inside its own pod: a connection from the frontend would be
        // accepted by the proxy whether nginx listens yet or not.
        for port in [8080, 8081, 8082] {
            wait_until("nginx listens", || {
                let probe = format!("exec 3<>/dev/tcp/127.0.0.1/{port}");
                l.lab.exec("shop/web", &["bash", "-c", &probe]).0
            });
        }
        l
    }

    fn web(&self) -> String {
        self.lab.ip(3)
    }

    fn exec(&self, cmd: &[&str]) -> (bool, String) {
        self.lab.exec("shop/frontend", cmd)
    }

    /// Sends `GET target`, `headers` (without their CRLFs; `Connection:
    /// close` added) and `body` to `port` from the frontend: the whole
    /// answer.
    fn raw(&self, port: u16, target: &str, headers: &[&str], body: &str) -> String {
        let mut bytes = format!("GET {target} HTTP/1.1\r\n");
        for h in headers {
            bytes += &format!("{h}\r\n");
        }
        bytes += "Connection: close\r\n\r\n";
        bytes += body;
        // printf's own escapes: a literal % is %%, a backslash \\.
        let printf = bytes
            .replace('\\', "\\\\")
            .replace('%', "%%")
            .replace('\r', "\\r")
            .replace('\n', "\\n")
            .replace('\'', "\\047");
        let script = format!(
            "exec 3<>/dev/tcp/{}/{port}; printf '{printf}' >&3; timeout 5 cat <&3",
            self.web()
        );
        self.exec(&["bash", "-c", &script]).1
    }

    /// What nginx served so far (its access log lines).
    fn served(&self) -> Vec<String> {
        self.lab
            .log("shop/web")
            .lines()
            .filter(|l| l.starts_with("served "))
            .map(String::from)
            .collect()
    }
}

/// The status code of an HTTP/1.1 answer ("" when none came).
fn status(answer: &str) -> &str {
    answer
        .strip_prefix("HTTP/1.1 ")
        .and_then(|r| r.get(..3))
        .unwrap_or("")
}

#[test]
fn nginx_never_serves_what_the_rule_refuses() {
    let l = BypassLab::start();
    // (target, status): 403 where the canonical path is outside the rule,
    // 400 where servers could read the target two ways, 200 where nginx
    // serves some other path than /admin.
    let vectors = [
        ("/api/items", "200"),
        ("/api/../admin", "403"),
        ("/api/%2e%2e/admin", "403"),
        ("/api/%2E%2E/admin", "403"),
        ("/api/.%2e/admin", "403"),
        ("/api/%2e./admin", "403"),
        ("/api/x/%2e%2e/%2e%2e/admin", "403"),
        ("/api/%2e%2e//admin", "403"),
        ("//admin", "403"),
        ("/api/..%2fadmin", "400"),
        ("/api/..%2Fadmin", "400"),
        ("/api/%2e%2e%2fadmin", "400"),
        ("/api/%2e%2e%2Fadmin", "400"),
        ("/api/..%5cadmin", "400"),
        ("/api/..%5Cadmin", "400"),
        ("/api/..\\admin", "400"),
        ("/admin#/../api/x", "400"),
        ("/api/x#/../../admin", "400"),
        ("/api/%zz", "400"),
        ("/api/%252e%252e/admin", "200"),
        ("/api/%252e%252e%252fadmin", "200"),
        ("/api/%c0%ae%c0%ae/admin", "200"),
        ("/api/%C0%AE%C0%AE/admin", "200"),
        ("/api/..;/admin", "200"),
        ("/api/%2e%2e;/admin", "200"),
        ("/api/%61dmin/../../admin", "403"),
    ];
    for (target, want) in vectors {
        // The direct path, and the general one (Expect sends the request
        // there).
        for extra in [&[][..], &["Expect: 100-continue", "Content-Length: 0"][..]] {
            let answer = l.raw(8080, target, &[&["Host: web"][..], extra].concat(), "");
            assert_eq!(status(&answer), want, "{target} {extra:?}: {answer}");
            assert!(!answer.contains("ADMIN"), "{target}: {answer}");
        }
        // HTTP/2: `:path` as given (curl would resolve dot segments and
        // cut the fragment without --path-as-is).
        if !target.contains('#') && !target.contains('\\') {
            let url = format!("http://{}:8081{target}", l.web());
            let (_, out) = l.exec(&[
                "curl",
                "-s",
                "-m",
                "5",
                "--http2-prior-knowledge",
                "--path-as-is",
                "-w",
                "\n%{http_code}",
                &url,
            ]);
            let code = out.lines().last().unwrap_or_default();
            assert_eq!(code, want, "HTTP/2 {target}: {out}");
            assert!(!out.contains("ADMIN"), "HTTP/2 {target}: {out}");
        }
    }

    // Absolute-form: the URI's authority is the host, whatever Host says;
    // its path is checked like any other.
    for (target, want) in [
        ("http://web/admin", "403"),
        ("http://web/api/%2e%2e/admin", "403"),
        ("http://web/api/ok", "200"),
    ] {
        let answer = l.raw(8080, target, &["Host: evil"], "");
        assert_eq!(status(&answer), want, "{target}: {answer}");
    }
    // Two Host fields.
    let answer = l.raw(8080, "/api/x", &["Host: web", "Host: other"], "");
    assert_eq!(status(&answer), "400", "{answer}");

    // A request smuggled in a chunked body, alone and with a
    // Content-Length beside it (a server framing by length would read the
    // chunk's data as the next request): body to nginx, never a request.
    // (Nothing follows the body: bytes the proxy never reads before it
    // closes would reset the connection and lose the answer.)
    let smuggled = "GET /admin HTTP/1.1\r\nHost: web\r\n\r\n";
    let chunked = format!("{:x}\r\n{smuggled}\r\n0\r\n\r\n", smuggled.len());
    for extra in [&[][..], &["Content-Length: 4"][..]] {
        let head = [&["Host: web", "Transfer-Encoding: chunked"][..], extra].concat();
        let answer = l.raw(8080, "/api/upload", &head, &chunked);
        assert_eq!(status(&answer), "200", "{extra:?}: {answer}");
        assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer}");
        assert!(!answer.contains("ADMIN"), "{answer}");
    }

    // Duplicate headers: the rule sees their joined value, as nginx sees
    // the first one.
    for (tokens, want) in [
        (&["X-Token: abc"][..], "200"),
        (&["X-Token: wrong"][..], "403"),
        (&[][..], "403"),
        (&["X-Token: wrong", "X-Token: abc"][..], "403"),
        (&["X-Token: abc", "X-Token: abc"][..], "403"),
        (&["X-Token: abc, wrong"][..], "403"),
    ] {
        let answer = l.raw(8082, "/api/t", &[&["Host: web"][..], tokens].concat(), "");
        assert_eq!(status(&answer), want, "{tokens:?}: {answer}");
        assert!(!answer.contains("WRONG"), "{tokens:?}: {answer}");
    }

    // nginx served requests (the corpus reached it) and never /admin.
    let served = l.served();
    assert!(
        served.iter().any(|s| s.contains("uri=/api/items")),
        "{served:?}"
    );
    assert!(
        served
            .iter()
            .all(|s| !s.contains("uri=/admin") && !s.contains("token=wrong")),
        "{served:?}"
    );
    // Each refused target was reported (the operator sees the attempt),
    // with the target as it came.
    let flows = l
        .lab
        .observe_json(&["--all", "--protocol", "http", "--verdict", "DROPPED"]);
    let urls: Vec<&str> = flows
        .iter()
        .filter_map(|f| f["l7"]["http"]["url"].as_str())
        .collect();
    assert!(
        urls.iter().any(|u| u.ends_with("/api/..%2fadmin")),
        "{urls:?}"
    );
    // A rewritten target: the canonical path checked, and the target as
    // it came in a header of the proxy's.
    let original = flows.iter().any(|f| {
        let http = &f["l7"]["http"];
        http["url"].as_str().is_some_and(|u| u.ends_with("/admin"))
            && http["headers"].as_array().is_some_and(|h| {
                h.iter().any(|h| {
                    h["key"] == "x-fibril-original-path" && h["value"] == "/api/%2e%2e/admin"
                })
            })
    });
    assert!(original, "{flows:?}");
    // And Hubble's header filter finds it.
    let found = l.lab.observe_json(&[
        "--all",
        "--http-header",
        "x-fibril-original-path:/api/%2e%2e/admin",
    ]);
    // Sent four times: both HTTP/1.1 paths, HTTP/2, and absolute-form.
    assert_eq!(found.len(), 4, "{found:?}");
    assert!(found.iter().all(|f| f["verdict"] == "DROPPED"), "{found:?}");
}
