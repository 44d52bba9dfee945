//! Services side by side with the real kube-proxy (issue 18), on a lab of
//! two nodes with the real control plane and kube-proxy (`kubeProxy:`),
//! in iptables and then nftables mode, at 10, 1,000 and 10,000 services
//! (one served by a web pod on node n1, the rest selector-less services
//! with an EndpointSlice each, as many rules as real ones):
//! - a host-network client on n1 through kube-proxy's rules (a process of
//!   the node's namespace outside the lab's cgroup, so Fibril's socket LB
//!   does not see it) and through Fibril's socket LB (the same client in
//!   the node's cgroup, `lab exec node/n1`), and against the web pod's own
//!   address (no load balancing at all);
//! - a pod client on n1 through Fibril's per-packet LB, and against the
//!   web pod's own address.
//!
//! The pods' conntrack budget is off (`ctEndpointBudget: 0`): a client
//! opening ~5,000 connections a second holds three entries each (its
//! connection, the server's, the service's) for the 10 s after close, more
//! than the default budget's 65,536, which is what this bench is not about.
//!
//! Each: new connections a second (`http-load --new-connections`: connect,
//! one request, close; the first-packet path, where a rule list is walked)
//! and requests a second on kept-alive connections. Run: `cargo run
//! --release -p fibril-cli --example service_bench` (root; `cargo build
//! --release --bins` and `cargo xtask deps` first; xtask does).
//! `SERVICE_BENCH_SECONDS` (default 5) per measurement;
//! `SERVICE_BENCH_MODES` (default `iptables,nftables`). The labs are
//! removed at the end, also on failure.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s::kube::api::{Api, PostParams};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::json;

const COUNTS: [usize; 3] = [10, 1_000, 10_000];
const VIP: &str = "10.96.0.90";
const CLIENTS: &str = "2";

struct Lab {
    name: String,
    bin: PathBuf,
}

impl Lab {
    fn fibril(&self, args: &[&str]) -> std::process::Output {
        Command::new(self.bin.join("fibril"))
            .arg("--lab")
            .arg(&self.name)
            .args(args)
            .output()
            .expect("fibril runs")
    }

    fn state(&self) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_str(&std::fs::read_to_string(format!(
            "/run/fibril/labs/{}/lab.json",
            self.name
        ))?)?)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.fibril(&["lab", "down"]);
    }
}

/// `fibril-echo http-load` output's `key value` lines.
fn rate(out: &std::process::Output, key: &str) -> anyhow::Result<f64> {
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "load client failed: {text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines()
        .find_map(|l| l.strip_prefix(key).and_then(|v| v.trim().parse().ok()))
        .ok_or_else(|| anyhow::anyhow!("no {key} in {text:?}"))
}

/// Where a load client runs.
enum Client<'a> {
    /// The node's namespace, outside the lab's cgroup (kube-proxy's rules).
    HostOutsideCgroup(&'a str),
    /// `fibril lab exec WHO` (a pod, or `node/n1`: in the node's cgroup).
    LabExec(&'a str),
}

fn load(lab: &Lab, client: &Client, url: &str, new_conns: bool, secs: &str) -> anyhow::Result<f64> {
    let echo = lab.bin.join("fibril-echo").display().to_string();
    let mut args: Vec<String> = vec![
        echo,
        "http-load".into(),
        url.into(),
        "--seconds".into(),
        secs.into(),
        "--connections".into(),
        CLIENTS.into(),
    ];
    if new_conns {
        args.push("--new-connections".into());
    }
    let out = match client {
        Client::HostOutsideCgroup(netns) => Command::new("ip")
            .args(["netns", "exec", netns])
            .args(&args)
            .output()?,
        Client::LabExec(who) => {
            let mut a: Vec<&str> = vec!["lab", "exec", who, "--"];
            a.extend(args.iter().map(String::as_str));
            lab.fibril(&a)
        }
    };
    // One request a connection with --new-connections: requests are
    // connections.
    rate(&out, "requests_per_sec")
}

/// The services kube-proxy has rules for on node `netns`.
fn kube_proxy_services(netns: &str, mode: &str) -> usize {
    let out = if mode == "iptables" {
        Command::new("ip")
            .args(["netns", "exec", netns, "iptables-save", "-t", "nat"])
            .output()
    } else {
        Command::new("ip")
            .args([
                "netns",
                "exec",
                netns,
                "nft",
                "list",
                "map",
                "ip",
                "kube-proxy",
                "service-ips",
            ])
            .output()
    };
    let text = out
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    if mode == "iptables" {
        text.lines()
            .filter(|l| l.starts_with("-A KUBE-SERVICES -d ") && l.contains("-j KUBE-SVC-"))
            .count()
    } else {
        text.matches(": goto service-").count()
    }
}

/// The frontends Fibril's agent on node n1 balances.
fn fibril_services(lab: &Lab) -> usize {
    let out = lab.fibril(&["--node", "n1", "service", "list", "-o", "json"]);
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v.as_array().map(Vec::len))
        .unwrap_or(0)
}

fn main() -> anyhow::Result<()> {
    let bin = std::env::current_exe()?
        .parent()
        .and_then(|d| d.parent())
        .map(Path::to_path_buf)
        .filter(|d| d.join("fibril").exists())
        .ok_or_else(|| anyhow::anyhow!("build fibril first (cargo build --release --bins)"))?;
    let secs = std::env::var("SERVICE_BENCH_SECONDS").unwrap_or_else(|_| "5".into());
    // SERVICE_BENCH_MODES: which of kube-proxy's modes (default both).
    let modes = std::env::var("SERVICE_BENCH_MODES").unwrap_or_else(|_| "iptables,nftables".into());
    for mode in modes
        .split(',')
        .filter(|m| ["iptables", "nftables"].contains(m))
    {
        println!("kube-proxy in {mode} mode");
        bench_mode(&bin, mode, &secs)?;
    }
    Ok(())
}

fn bench_mode(bin: &Path, mode: &str, secs: &str) -> anyhow::Result<()> {
    let lab = Lab {
        name: format!("svcb{}", std::process::id() % 100_000),
        bin: bin.to_path_buf(),
    };
    let file = std::env::temp_dir().join(format!("{}.yaml", lab.name));
    std::fs::write(
        &file,
        format!(
            "podCIDR: 10.232.0.0/22\nnodes: [n1, n2]\nkubernetes: true\nkubeProxy: {mode}\nctEndpointBudget: 0\n\
             pods:\n- {{name: client, labels: {{app: client}}, node: n1}}\n\
             - {{name: host-client, hostNetwork: true, node: n1}}\n"
        ),
    )?;
    let up = lab.fibril(&["lab", "up", "-f", file.to_str().unwrap_or_default()]);
    std::fs::remove_file(&file).ok();
    anyhow::ensure!(
        up.status.success(),
        "lab up: {}",
        String::from_utf8_lossy(&up.stderr)
    );
    let state = lab.state()?;
    let underlay = state["underlay_netns"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let node_netns = state["nodes"][0]["netns"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let kubeconfig = PathBuf::from(format!(
        "/run/fibril/labs/{}/kubernetes/admin.kubeconfig",
        lab.name
    ));
    let rt = || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    };
    // The API client's sockets are made in the lab's underlay, where the
    // apiserver listens.
    let web_ip = netns::in_netns(&underlay, || rt()?.block_on(start_web(&kubeconfig)))??;
    let mut made = 1;
    println!(
        "  {:>6} services | {:>34} | {:>18} | {:>18}",
        "", "path", "connections/s", "requests/s"
    );
    for count in COUNTS {
        netns::in_netns(&underlay, || {
            rt()?.block_on(add_decoys(&kubeconfig, made, count, &web_ip))
        })??;
        made = count;
        let end = Instant::now() + Duration::from_secs(600);
        while fibril_services(&lab) < count || kube_proxy_services(&node_netns, mode) < count {
            anyhow::ensure!(
                Instant::now() < end,
                "{count} services not followed within 10 min (Fibril {}, kube-proxy {})",
                fibril_services(&lab),
                kube_proxy_services(&node_netns, mode)
            );
            std::thread::sleep(Duration::from_millis(500));
        }
        // kube-proxy's rules settle (its sync runs at most once a second).
        std::thread::sleep(Duration::from_secs(3));
        let vip = format!("http://{VIP}/");
        let direct = format!("http://{web_ip}:8080/");
        let rows: [(&str, Client, &str); 5] = [
            (
                "host -> pod address (no LB)",
                Client::HostOutsideCgroup(&node_netns),
                &direct,
            ),
            (
                "host -> cluster IP, kube-proxy",
                Client::HostOutsideCgroup(&node_netns),
                &vip,
            ),
            (
                "host -> cluster IP, Fibril socket LB",
                Client::LabExec("node/n1"),
                &vip,
            ),
            (
                "pod -> pod address (no LB)",
                Client::LabExec("default/client"),
                &direct,
            ),
            (
                "pod -> cluster IP, Fibril per packet",
                Client::LabExec("default/client"),
                &vip,
            ),
        ];
        for (what, client, url) in rows {
            // The last run's closing connections leave the conntrack
            // tables first (10 s; the agent's census then gives the web
            // pod's budget back within 5 s), so no run pays for another's.
            std::thread::sleep(Duration::from_secs(16));
            let conns = load(&lab, &client, url, true, secs)?;
            let reqs = load(&lab, &client, url, false, secs)?;
            println!("  {count:>6} services | {what:>34} | {conns:>18.0} | {reqs:>18.0}");
        }
    }
    Ok(())
}

/// The web pod on n1 and its service at `VIP`; its address once it runs.
async fn start_web(kubeconfig: &Path) -> anyhow::Result<String> {
    let client = k8s::client::connect(Some(kubeconfig)).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "web", "labels": {"app": "web"}},
        "spec": {"nodeName": "n1", "containers": [{"name": "web", "image": "fibril/echo",
                 "ports": [{"containerPort": 8080}]}]},
    }))?;
    // The namespace's default service account comes from the
    // controller-manager a moment after the lab is up.
    let end = Instant::now() + Duration::from_secs(60);
    while let Err(e) = pods.create(&PostParams::default(), &pod).await {
        anyhow::ensure!(Instant::now() < end, "creating the web pod: {e}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let svc: Service = serde_json::from_value(json!({
        "metadata": {"name": "web"},
        "spec": {"clusterIP": VIP, "selector": {"app": "web"},
                 "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
    }))?;
    services.create(&PostParams::default(), &svc).await?;
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        let p = pods.get("web").await?;
        if let Some(ip) = p.status.and_then(|s| s.pod_ip) {
            return Ok(ip);
        }
        anyhow::ensure!(Instant::now() < end, "web not running within 60 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Services `from..to` (numbered after the web one): selector-less, each
/// with an EndpointSlice naming the web pod, so kube-proxy writes the same
/// rules as for a served service. Made 32 at a time.
async fn add_decoys(kubeconfig: &Path, from: usize, to: usize, web_ip: &str) -> anyhow::Result<()> {
    let client = k8s::client::connect(Some(kubeconfig)).await?;
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    let slices: Api<EndpointSlice> = Api::namespaced(client.clone(), "default");
    let results: Vec<anyhow::Result<()>> = futures::stream::iter(from..to)
        .map(|i| {
            let (services, slices) = (services.clone(), slices.clone());
            async move {
                let name = format!("decoy-{i}");
                let svc: Service = serde_json::from_value(json!({
                    "metadata": {"name": name},
                    "spec": {"ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
                }))?;
                services.create(&PostParams::default(), &svc).await?;
                let slice: EndpointSlice = serde_json::from_value(json!({
                    "metadata": {"name": format!("{name}-1"),
                                 "labels": {"kubernetes.io/service-name": name,
                                            "endpointslice.kubernetes.io/managed-by": "fibril-bench"}},
                    "addressType": "IPv4",
                    "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
                    "endpoints": [{"addresses": [web_ip], "conditions": {"ready": true},
                                   "nodeName": "n1"}],
                }))?;
                slices.create(&PostParams::default(), &slice).await?;
                Ok(())
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    results.into_iter().collect()
}
