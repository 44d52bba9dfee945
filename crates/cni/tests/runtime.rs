//! The CNI plugin executed the way a container runtime executes it: a
//! binary with CNI_* in its environment and the configuration on stdin,
//! against a running agent, alone and in a chain with Debian's
//! containernetworking-plugins. Needs root.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use serde_json::{json, Value};

const DEBIAN_PLUGINS: &str = "/usr/lib/cni";

fn bin(name: &str) -> PathBuf {
    let p = PathBuf::from(env!("CARGO_BIN_EXE_fibril-cni")).with_file_name(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace first",
        p.display()
    );
    p
}

static N: AtomicU32 = AtomicU32::new(0);

/// An agent with its own state, bpffs dir, socket and pod CIDR, plus one
/// network namespace; everything removed on drop.
struct Env {
    agent: Child,
    dir: PathBuf,
    bpf: PathBuf,
    netns: String,
    cidr: String,
}

impl Env {
    fn new() -> Self {
        let n = N.fetch_add(1, Ordering::Relaxed);
        let id = format!("c{}x{n}", std::process::id() % 100_000);
        let dir = std::env::temp_dir().join(format!("fibril-cni-{id}"));
        let bpf = PathBuf::from("/sys/fs/bpf").join(format!("fibril-cni-{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        let cidr = format!("10.{}.{}.0/24", 250 + (std::process::id() % 5), 10 + n);
        let agent =
            test_support::agent_command(&bin("fibril-agent"), &dir, &bpf, "cni-test", &cidr)
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join("agent.log")).unwrap())
                .spawn()
                .unwrap();
        let netns = format!("fibril-{id}");
        let env = Env {
            agent,
            dir,
            bpf,
            netns,
            cidr,
        };
        for _ in 0..200 {
            if api::call(&env.socket(), &api::Request::Status).is_ok() {
                netns::create_netns(&env.netns).unwrap();
                return env;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!(
            "agent did not start: {}",
            std::fs::read_to_string(env.dir.join("agent.log")).unwrap_or_default()
        );
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }

    fn netns_path(&self) -> String {
        format!("/run/netns/{}", self.netns)
    }

    fn conf(&self, version: &str) -> Value {
        json!({"cniVersion": version, "name": "fibril-test", "type": "fibril-cni", "agentSocket": self.socket()})
    }

    fn endpoints(&self) -> usize {
        match api::call(&self.socket(), &api::Request::EndpointList).unwrap() {
            api::Response::Endpoints { endpoints } => endpoints.len(),
            other => panic!("{other:?}"),
        }
    }
}

impl Drop for Env {
    fn drop(&mut self) {
        // Clean what the test may have left: endpoints via GC, then the rest.
        let _ = api::call(&self.socket(), &api::Request::EndpointGc { valid: vec![] });
        let _ = self.agent.kill();
        let _ = self.agent.wait();
        netns::proxy_routing_forget(&self.dir.join("state").join(netns::PROXY_ROUTING_FILE));
        netns::delete_netns(&self.netns);
        datapath::Datapath::unpin_all(&self.bpf);
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

/// Runs a plugin binary as a runtime does; returns (exit ok, stdout JSON).
fn exec(
    plugin: &Path,
    command: &str,
    container: &str,
    netns: Option<&str>,
    conf: &Value,
) -> (bool, Value) {
    let mut cmd = Command::new(plugin);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container)
        .env("CNI_IFNAME", "eth0")
        .env(
            "CNI_PATH",
            format!("{}:{DEBIAN_PLUGINS}", plugin.parent().unwrap().display()),
        )
        .env(
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0",
        );
    if let Some(ns) = netns {
        cmd.env("CNI_NETNS", ns);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(conf.to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let v = if text.trim().is_empty() {
        Value::Null
    } else {
        serde_json::from_str(&text).unwrap_or_else(|_| panic!("not JSON: {text}"))
    };
    (out.status.success(), v)
}

fn cni(env: &Env, command: &str, container: &str, conf: &Value) -> (bool, Value) {
    let ns = env.netns_path();
    exec(&bin("fibril-cni"), command, container, Some(&ns), conf)
}

#[test]
fn add_check_del_follow_the_spec() {
    let env = Env::new();
    let (ok, result) = cni(&env, "ADD", "ctr-1", &env.conf("1.1.0"));
    assert!(ok, "{result}");
    assert_eq!(result["cniVersion"], "1.1.0");
    let ifaces = result["interfaces"].as_array().unwrap();
    assert_eq!(ifaces.len(), 2);
    assert!(
        ifaces[0].get("sandbox").is_none(),
        "host side has no sandbox"
    );
    assert_eq!(ifaces[1]["name"], "eth0");
    assert_eq!(ifaces[1]["sandbox"], env.netns_path());
    let addr = result["ips"][0]["address"].as_str().unwrap();
    assert!(
        addr.starts_with(&env.cidr[..env.cidr.len() - 4]) && addr.ends_with("/32"),
        "{addr}"
    );
    assert_eq!(result["ips"][0]["interface"], 1);
    let shown = Command::new("ip")
        .args(["-n", &env.netns, "-o", "addr", "show", "eth0"])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&shown.stdout).contains(addr));

    // A second ADD of the same attachment is an error, and changes nothing.
    let (ok, err) = cni(&env, "ADD", "ctr-1", &env.conf("1.1.0"));
    assert!(!ok);
    assert!(
        err["details"]
            .as_str()
            .unwrap()
            .contains("already has an interface eth0"),
        "{err}"
    );
    // The agent's refusal keeps its kind: a conflict, not an unknown failure.
    assert_eq!(err["code"], 100, "{err}");
    assert_eq!(env.endpoints(), 1);

    let mut check = env.conf("1.1.0");
    check["prevResult"] = result.clone();
    assert!(cni(&env, "CHECK", "ctr-1", &check).0);
    // CHECK notices what is broken.
    Command::new("ip")
        .args(["-n", &env.netns, "addr", "flush", "dev", "eth0"])
        .status()
        .unwrap();
    let (ok, err) = cni(&env, "CHECK", "ctr-1", &check);
    assert!(!ok, "{err}");

    assert!(cni(&env, "DEL", "ctr-1", &check).0);
    assert_eq!(env.endpoints(), 0);
    assert!(cni(&env, "DEL", "ctr-1", &check).0, "DEL is idempotent");
    let (ok, err) = cni(&env, "CHECK", "ctr-1", &check);
    assert!(!ok, "CHECK after DEL fails");
    assert_eq!(err["code"], 3, "container unknown: {err}");
}

#[test]
fn status_gc_version_and_broken_input() {
    let env = Env::new();
    assert!(cni(&env, "STATUS", "x", &env.conf("1.1.0")).0);
    let mut nowhere = env.conf("1.1.0");
    nowhere["agentSocket"] = json!("/nonexistent/agent.sock");
    let (ok, err) = cni(&env, "STATUS", "x", &nowhere);
    assert!(!ok);
    assert_eq!(err["code"], 50);

    let (ok, v) = cni(&env, "VERSION", "x", &json!({"cniVersion": "1.0.0"}));
    assert!(ok);
    assert_eq!(v["supportedVersions"], json!(["1.0.0", "1.1.0"]));

    // Broken configurations: precise codes, nothing created.
    for (conf, code) in [
        (
            json!({"cniVersion": "0.4.0", "name": "n", "agentSocket": env.socket()}),
            1,
        ),
        (
            json!({"cniVersion": "1.1.0", "agentSocket": env.socket()}),
            7,
        ),
        (
            json!({"cniVersion": "1.1.0", "name": "n", "agentSocket": 12}),
            2,
        ),
    ] {
        let (ok, err) = cni(&env, "ADD", "ctr-bad", &conf);
        assert!(!ok);
        assert_eq!(err["code"], code, "{conf} -> {err}");
    }
    let (ok, err) = exec(
        &bin("fibril-cni"),
        "ADD",
        "ctr-bad",
        None,
        &env.conf("1.1.0"),
    );
    assert!(!ok);
    assert_eq!(err["code"], 4);
    assert!(err["msg"].as_str().unwrap().contains("CNI_NETNS"));
    assert_eq!(env.endpoints(), 0);

    // GC removes every attachment not listed as valid.
    assert!(cni(&env, "ADD", "ctr-keep", &env.conf("1.1.0")).0);
    let mut gc = env.conf("1.1.0");
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "ctr-other", "ifname": "eth0"}]);
    assert!(cni(&env, "GC", "x", &gc).0);
    assert_eq!(env.endpoints(), 0);
}

#[test]
fn chains_with_portmap_bandwidth_and_tuning() {
    let plugins = Path::new(DEBIAN_PLUGINS);
    for p in ["portmap", "bandwidth", "tuning"] {
        assert!(
            plugins.join(p).exists(),
            "{}/{p} is missing: install containernetworking-plugins (cargo xtask deps does)",
            DEBIAN_PLUGINS
        );
    }
    let env = Env::new();
    // Debian's plugins speak spec 1.0.0 at most.
    let chain = [
        (bin("fibril-cni"), env.conf("1.0.0")),
        (
            plugins.join("portmap"),
            json!({"cniVersion": "1.0.0", "name": "fibril-test", "type": "portmap", "capabilities": {"portMappings": true}}),
        ),
        (
            plugins.join("bandwidth"),
            json!({"cniVersion": "1.0.0", "name": "fibril-test", "type": "bandwidth",
                   "ingressRate": 100000000, "ingressBurst": 1000000, "egressRate": 100000000, "egressBurst": 1000000}),
        ),
        (
            plugins.join("tuning"),
            json!({"cniVersion": "1.0.0", "name": "fibril-test", "type": "tuning", "mtu": 1400}),
        ),
    ];
    // Unique per run: bandwidth names its IFB device after the container.
    let container = format!("ctr-chain-{}", std::process::id());
    let container = container.as_str();
    // Whatever happens below, DEL the whole chain (DEL is best effort).
    struct Undo<'a>(&'a [(PathBuf, Value)], &'a str, String);
    impl Drop for Undo<'_> {
        fn drop(&mut self) {
            for (plugin, conf) in self.0.iter().rev() {
                exec(plugin, "DEL", self.1, Some(&self.2), conf);
            }
        }
    }
    let _undo = Undo(&chain, container, env.netns_path());
    let mut prev: Option<Value> = None;
    for (plugin, conf) in &chain {
        let mut conf = conf.clone();
        if let Some(p) = &prev {
            conf["prevResult"] = p.clone();
        }
        let (ok, out) = exec(plugin, "ADD", container, Some(&env.netns_path()), &conf);
        assert!(ok, "{} ADD failed: {out}", plugin.display());
        prev = Some(out);
    }
    let final_result = prev.unwrap();
    assert_eq!(
        final_result["interfaces"][1]["name"], "eth0",
        "our result survived the chain: {final_result}"
    );
    let link = Command::new("ip")
        .args(["-n", &env.netns, "-o", "link", "show", "eth0"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&link.stdout).contains("mtu 1400"),
        "tuning acted on our interface"
    );

    // DEL in reverse order, each with the final ADD result.
    for (plugin, conf) in chain.iter().rev() {
        let mut conf = conf.clone();
        conf["prevResult"] = final_result.clone();
        let (ok, out) = exec(plugin, "DEL", container, Some(&env.netns_path()), &conf);
        assert!(ok, "{} DEL failed: {out}", plugin.display());
    }
    assert_eq!(env.endpoints(), 0);
}

/// Conntrack entries to or from `addr` in the agent's datapath.
fn ct_entries(env: &Env, addr: &str) -> usize {
    let req = api::Request::ConntrackList {
        address: Some(addr.parse().unwrap()),
    };
    match api::call(&env.socket(), &req).unwrap() {
        api::Response::Conntrack { entries, .. } => entries.len(),
        other => panic!("{other:?}"),
    }
}

/// A deleted pod's connections go with it, and its address is not handed
/// to the next pod: a pod that policy denies must never inherit an allowed
/// pod's address together with its conntrack entries.
#[test]
fn del_flushes_the_pods_conntrack_and_its_address_is_not_reused_at_once() {
    let env = Env::new();
    let (ok, first) = cni(&env, "ADD", "ctr-a", &env.conf("1.1.0"));
    assert!(ok, "{first}");
    let cidr = first["ips"][0]["address"].as_str().unwrap();
    let addr = cidr.trim_end_matches("/32").to_string();
    let gateway = first["ips"][0]["gateway"].as_str().unwrap();
    // Traffic out of the pod (answered or not) opens conntrack entries.
    Command::new("ip")
        .args(["netns", "exec", &env.netns])
        .arg(bin("fibril-echo"))
        .args(["udp-send", &format!("{gateway}:9"), "--timeout", "0.2"])
        .output()
        .unwrap();
    assert!(ct_entries(&env, &addr) > 0, "the pod's datagram is tracked");

    let mut del = env.conf("1.1.0");
    del["prevResult"] = first.clone();
    assert!(cni(&env, "DEL", "ctr-a", &del).0);
    assert_eq!(
        ct_entries(&env, &addr),
        0,
        "DEL flushed the pod's conntrack"
    );

    let (ok, second) = cni(&env, "ADD", "ctr-b", &env.conf("1.1.0"));
    assert!(ok, "{second}");
    assert_ne!(
        second["ips"][0]["address"], first["ips"][0]["address"],
        "a freed address waits in quarantine while others are free"
    );
}

/// A wedged agent (here: stopped) must not hang the runtime: the call is
/// bounded by `agentTimeoutSeconds` and answered with code 11, "try again
/// later"; a bad timeout in the configuration is refused up front.
#[test]
fn a_wedged_agent_gets_try_again_later_instead_of_a_hang() {
    let env = Env::new();
    let mut bad = env.conf("1.1.0");
    bad["agentTimeoutSeconds"] = json!(-1);
    let (ok, err) = cni(&env, "ADD", "ctr-w", &bad);
    assert!(!ok);
    assert_eq!(err["code"], 2, "{err}");
    assert!(err["details"]
        .as_str()
        .unwrap()
        .contains("agentTimeoutSeconds"));

    let mut conf = env.conf("1.1.0");
    conf["agentTimeoutSeconds"] = json!(0.5);
    let pid = env.agent.id().to_string();
    let signal = |sig: &str| {
        assert!(Command::new("kill")
            .args([sig, &pid])
            .status()
            .unwrap()
            .success());
    };
    signal("-STOP");
    let (add_ok, add) = cni(&env, "ADD", "ctr-w", &conf);
    let (del_ok, del) = cni(&env, "DEL", "ctr-w", &conf);
    signal("-CONT");
    for (ok, err) in [(add_ok, add), (del_ok, del)] {
        assert!(!ok);
        assert_eq!(err["code"], 11, "{err}");
        assert!(
            err["details"]
                .as_str()
                .unwrap()
                .contains("did not answer within 0.5 s"),
            "{err}"
        );
    }
}

/// A second interface on this network in the same pod namespace is refused
/// with what to do instead, and changes nothing; the first keeps working.
#[test]
fn a_second_interface_in_one_pod_is_refused_clearly() {
    let env = Env::new();
    let (ok, first) = cni(&env, "ADD", "ctr-1", &env.conf("1.1.0"));
    assert!(ok, "{first}");
    let mut cmd = Command::new(bin("fibril-cni"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", "ctr-1")
        .env("CNI_IFNAME", "eth1")
        .env("CNI_NETNS", env.netns_path())
        .env("CNI_PATH", bin("fibril-cni").parent().unwrap())
        .env(
            "CNI_ARGS",
            "IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0",
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(env.conf("1.1.0").to_string().as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(!out.status.success());
    let err: Value = serde_json::from_slice(&out.stdout).unwrap();
    let details = err["details"].as_str().unwrap();
    assert!(
        details.contains("already has interface eth0 on this network"),
        "{err}"
    );
    assert_eq!(env.endpoints(), 1);
    let links = Command::new("ip")
        .args(["-n", &env.netns, "-o", "link"])
        .output()
        .unwrap();
    assert!(!String::from_utf8_lossy(&links.stdout).contains("eth1"));
}
