//! What every end-to-end test needs: the built binaries and a lab of its
//! own (unique name and pod CIDR) that is removed even when the test fails.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde_json::Value;

pub fn bin(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_BIN_EXE_fibril")).with_file_name(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace first (cargo build)",
        p.display()
    );
    p
}

pub struct Lab {
    pub name: String,
    pub cidr_prefix: String,
    pub dir: PathBuf,
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = self.fibril(&["lab", "down"]);
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

impl Lab {
    /// The default lab (the seed's example) under a unique name and CIDR.
    pub fn default_lab() -> Self {
        Self::seed_lab("default.yaml", "10.200.0.0/24")
    }

    /// A lab file of `labs/` (the seed's example, whose policy it names)
    /// with its pod CIDR `cidr` replaced by this test's own.
    pub fn seed_lab(file: &str, cidr: &str) -> Self {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../labs");
        let lab = std::fs::read_to_string(root.join(file))
            .unwrap()
            .replace(cidr, "POD_CIDR_HERE");
        let policy = "policies/allow-frontend-to-backend.yaml";
        let text = std::fs::read_to_string(root.join(policy)).unwrap();
        Self::start(&lab, &[(policy, &text)])
    }

    /// Writes `lab_yaml` (its `POD_CIDR_HERE` replaced by a /24 of this
    /// test's own) and `files` beside it, then brings the lab up under a
    /// unique name.
    pub fn start(lab_yaml: &str, files: &[(&str, &str)]) -> Self {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let name = format!("t{}x{n}", std::process::id() % 100_000);
        // 10.201-10.240: one /24 per test of this process.
        let cidr_prefix = format!("10.{}.{}", 201 + (std::process::id() % 40), 10 + n);
        let dir = std::env::temp_dir().join(format!("fibril-e2e-{name}"));
        for (path, text) in files {
            let p = dir.join(path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("lab.yaml"),
            lab_yaml.replace("POD_CIDR_HERE", &format!("{cidr_prefix}.0/24")),
        )
        .unwrap();
        let lab = Lab {
            name,
            cidr_prefix,
            dir,
        };
        let up = lab.fibril(&[
            "lab",
            "up",
            "-f",
            lab.dir.join("lab.yaml").to_str().unwrap(),
        ]);
        assert!(
            up.status.success(),
            "lab up failed: {}",
            String::from_utf8_lossy(&up.stderr)
        );
        lab
    }

    /// `fibril lab kubectl -- args`: (success, stdout, stderr).
    pub fn kubectl(&self, args: &[&str]) -> (bool, String, String) {
        let out = self.fibril(&[&["lab", "kubectl", "--"], args].concat());
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// `kubectl apply` of `yaml` (through a file named after `name`):
    /// (success, stdout, stderr).
    pub fn apply(&self, name: &str, yaml: &str) -> (bool, String, String) {
        let file = std::env::temp_dir().join(format!("{}-{name}.yaml", self.name));
        std::fs::write(&file, yaml).unwrap();
        let out = self.kubectl(&["apply", "-f", file.to_str().unwrap()]);
        std::fs::remove_file(&file).ok();
        out
    }

    /// The real helm CLI (`cargo xtask deps` builds it) in the lab's
    /// underlay, where its apiserver listens, as the lab's admin, with no
    /// user's settings: (success, stdout, stderr).
    pub fn helm(&self, args: &[String]) -> (bool, String, String) {
        let st: Value = serde_json::from_str(
            &std::fs::read_to_string(format!("/run/fibril/labs/{}/lab.json", self.name)).unwrap(),
        )
        .unwrap();
        let underlay = st["underlay_netns"].as_str().unwrap().to_string();
        let home = std::env::temp_dir().join(format!("fibril-helm-home-{}", self.name));
        let out = Command::new("ip")
            .args(["netns", "exec", &underlay])
            .arg(test_support::helm_build_path())
            .env("HELM_CONFIG_HOME", home.join("config"))
            .env("HELM_CACHE_HOME", home.join("cache"))
            .env("HELM_DATA_HOME", home.join("data"))
            .env(
                "KUBECONFIG",
                format!("/run/fibril/labs/{}/kubernetes/admin.kubeconfig", self.name),
            )
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    pub fn fibril(&self, args: &[&str]) -> Output {
        Command::new(bin("fibril"))
            .arg("--lab")
            .arg(&self.name)
            .args(args)
            .output()
            .unwrap()
    }

    /// One connection from `pod` (`ns/name`) to `addr` (`ip:port`) kept
    /// open for `seconds`, a request every 100 ms (`fibril-echo
    /// http-hold`): it fails if the connection breaks.
    pub fn hold(&self, pod: &str, addr: &str, seconds: &str) -> std::process::Child {
        Command::new(bin("fibril"))
            .args(["--lab", &self.name, "lab", "exec", pod, "--"])
            .args(["fibril-echo", "http-hold", addr, "--seconds", seconds])
            .args(["--interval", "0.1"])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    }

    pub fn ip(&self, host: u8) -> String {
        format!("{}.{host}", self.cidr_prefix)
    }

    /// Whether an HTTP GET of `url` from the pod `from` (`ns/name`)
    /// succeeds within `timeout` seconds.
    pub fn http_get(&self, from: &str, url: &str, timeout: &str) -> bool {
        self.fibril(&[
            "lab",
            "exec",
            from,
            "--",
            "fibril-echo",
            "http-get",
            "--timeout",
            timeout,
            url,
        ])
        .status
        .success()
    }

    /// frontend = .2, backend = .3, other-client = .4 (created in that order).
    pub fn get(&self, from: &str, timeout: &str) -> bool {
        let url = format!("http://{}:8080/", self.ip(3));
        self.http_get(&format!("microservices/{from}"), &url, timeout)
    }

    /// What a pod (`ns/name`) or an external (`external/name`) printed so
    /// far (empty before it started).
    pub fn log(&self, who: &str) -> String {
        std::fs::read_to_string(format!(
            "/run/fibril/labs/{}/pods/{}.log",
            self.name,
            who.replace('/', "_")
        ))
        .unwrap_or_default()
    }

    pub fn backend_log(&self) -> String {
        std::fs::read_to_string(format!(
            "/run/fibril/labs/{}/pods/microservices_backend.log",
            self.name
        ))
        .unwrap_or_default()
    }

    /// The seed's traffic: frontend reaches the backend, other-client is
    /// refused in the kernel; returns once the drop's flow is in the ring.
    pub fn seed_traffic(&self) {
        wait_until("backend to listen", || {
            self.backend_log().contains("listening")
        });
        assert!(self.get("frontend", "3"));
        assert!(!self.get("other-client", "1"));
        wait_until("the drop flow", || {
            self.flows().iter().any(|f| f["verdict"] == "DROPPED")
        });
    }

    /// Where the agent serves the Hubble API (`unix:///...`).
    pub fn hubble_address(&self) -> String {
        let path = format!("/run/fibril/labs/{}/state/hubble.addr", self.name);
        std::fs::read_to_string(path).unwrap().trim().to_string()
    }

    pub fn flows(&self) -> Vec<Value> {
        self.observe_json(&["--all"])
    }

    /// `fibril observe -o json ARGS`: the flows.
    pub fn observe_json(&self, args: &[&str]) -> Vec<Value> {
        let out = self.fibril(&[&["observe", "-o", "json"], args].concat());
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter_map(|v| v.get("flow").cloned())
            .collect()
    }

    /// One value from the agent's metrics (`fibril_*`).
    pub fn metric(&self, name: &str) -> u64 {
        self.metrics()
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no metric {name}"))
    }

    /// Runs a command in `pod` (`ns/name`): (success, stdout).
    pub fn exec(&self, pod: &str, cmd: &[&str]) -> (bool, String) {
        let out = self.fibril(&[&["lab", "exec", pod, "--"], cmd].concat());
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    /// GET /metrics from the lab agent's metrics endpoint (loopback).
    pub fn metrics(&self) -> String {
        self.http_get_metrics("metrics.addr")
    }

    /// GET /metrics from the agent endpoint whose address is in `file`.
    pub fn http_get_metrics(&self, file: &str) -> String {
        use std::io::{Read, Write};
        let addr = std::fs::read_to_string(format!("/run/fibril/labs/{}/state/{file}", self.name))
            .unwrap();
        let mut c = std::net::TcpStream::connect(addr.trim()).unwrap();
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK"), "{out}");
        out
    }

    pub fn endpoints(&self) -> Value {
        let out = self.fibril(&["endpoint", "list", "-o", "json"]);
        assert!(out.status.success());
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// Node `node`'s address (multi-node labs), from the lab's state.
    pub fn node_address(&self, node: usize) -> String {
        let st: Value = serde_json::from_str(
            &std::fs::read_to_string(format!("/run/fibril/labs/{}/lab.json", self.name)).unwrap(),
        )
        .unwrap();
        st["nodes"][node]["address"].as_str().unwrap().to_string()
    }
}

/// `ip netns list`: the host's named network namespaces.
pub fn netns_list() -> String {
    String::from_utf8_lossy(
        &Command::new("ip")
            .args(["netns", "list"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned()
}

/// Polls `f` every 100 ms until it holds or `timeout` passes (what waits on
/// controllers, schedulers and leases).
pub fn eventually(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let end = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < end {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!("timed out waiting for {what}");
}

pub fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    for _ in 0..100 {
        if f() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("timed out waiting for {what}");
}

/// A lab with its own YAML (policies inline), unique name and CIDR.
pub fn custom_lab(lab_yaml: &str) -> Lab {
    Lab::start(lab_yaml, &[])
}
