//! Services side by side with the real kube-proxy (issue 18): a lab of two
//! nodes with the real control plane per way of serving services, all up
//! at once, at 10, 1,000 and 10,000 services (four HTTP services of a web pod on
//! node n1, the rest selector-less services with an EndpointSlice each
//! naming the same pod's TCP_CRR port, as many rules as real ones):
//! - `iptables`, `nftables`: the real kube-proxy in that mode (`kubeProxy:`,
//!   the seed's `kubeProxyReplacement=false`). A host-network client on n1
//!   outside the lab's cgroup (Fibril's socket LB does not see it) reaches
//!   the cluster IPs through kube-proxy's rules, and the web pod's own
//!   address (no load balancing: what every new connection of a node pays
//!   for kube-proxy's rules it does not match); a pod client goes through
//!   Fibril's per-packet LB, which the seed runs beside kube-proxy.
//! - `replacement`: no kube-proxy (`kubeProxyReplacement: true`), what a
//!   user who replaces kube-proxy by Fibril gets: the node's client (in the
//!   node's cgroup) through Fibril's socket LB and a pod client through the
//!   per-packet LB, each against the web pod's own address.
//!
//! kube-proxy's iptables mode walks its KUBE-SERVICES chain on a
//! connection's first packet and its order changes with every full sync
//! (a Go map's), so the cluster-IP rows average four services: HTTP's
//! the four web services, wherever they are; TCP_CRR's the services at
//! an eighth, three eighths, five eighths and seven eighths of the chain
//! (a typical service, not a lucky or unlucky one). Their places in the
//! chain are printed.
//!
//! Each count is measured in every lab in turn, so the ratios compare
//! rates taken minutes apart: measured a lab after the other (20 minutes
//! apart), this two-core VM's speed moved by a fifth between them.
//!
//! Each count's rows start once the CPUs are idle (under 15% busy for
//! 3 s): kube-proxy rewrites its rules for a minute or more after it has
//! them all, and its syncs would be measured as its datapath.
//!
//! The pods' conntrack budget is off (`ctEndpointBudget: 0`): a client
//! opening ~5,000 connections a second holds three entries each (its
//! connection, the server's, the service's) for the 10 s after close, more
//! than the default budget's 65,536, which is what this bench is not about.
//!
//! Each: new connections a second, two ways: HTTP (`http-load
//! --new-connections`: connect, one request, close) and netperf's TCP_CRR
//! (`bench-crr`, 8 clients, against the web pod's `crr-server` on port
//! 9000: connect, a 1-byte request and answer, close; what Cilium's own
//! performance guide measures connection rates with, and where the
//! first-packet path, on which a rule list is walked, weighs most), and
//! requests a second on kept-alive connections. Run: `cargo run
//! --release -p fibril-cli --example service_bench` (root; `cargo build
//! --release --bins` and `cargo xtask deps` first; xtask does).
//! `SERVICE_BENCH_SECONDS` (default 5) per measurement;
//! `SERVICE_BENCH_MODES` (default `iptables,nftables,replacement`);
//! `SERVICE_BENCH_COUNTS` (default `10,1000,10000`). The
//! labs are removed at the end, also on failure. The summary compares
//! the rates at 10,000 services.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s::kube::api::{Api, PostParams};
use k8s_openapi::api::core::v1::{Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use serde_json::json;

#[path = "common/bench_lab.rs"]
mod bench_lab;
use bench_lab::BenchLab;

/// Service counts measured (`SERVICE_BENCH_COUNTS` may pick some).
const COUNTS: [usize; 3] = [10, 1_000, 10_000];
/// The served services' cluster IPs (web-0 .. web-3).
const VIPS: [&str; 4] = ["10.96.0.90", "10.96.0.91", "10.96.0.92", "10.96.0.93"];
/// HTTP load clients (each a connection at a time).
const CLIENTS: &str = "2";
/// TCP_CRR clients: enough to keep both CPUs busy (2 leave them idle a
/// tenth of the time, waiting on each other), so the rate measures the
/// work a connection costs rather than its round trips.
const CRR_CLIENTS: &str = "8";

/// The web pod's TCP_CRR port (its `crr-server` container), behind port
/// 9000 of each decoy service.
const CRR_PORT: u16 = 9000;

/// `fibril-echo` load output's `key value` lines.
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

/// What a load run measures.
#[derive(Clone, Copy)]
enum Load {
    /// HTTP, a new connection per request.
    HttpConnections,
    /// netperf's TCP_CRR.
    Crr,
    /// HTTP requests on kept-alive connections.
    Requests,
}

/// One load run from `client` to `host` (an address; the web port or the
/// service's): its rate.
fn load(lab: &BenchLab, client: &Client, host: &str, how: Load, secs: &str) -> anyhow::Result<f64> {
    let echo = lab.bin.join("fibril-echo").display().to_string();
    let mut args: Vec<String> = vec![echo];
    match how {
        Load::Crr => args.extend(["bench-crr".into(), format!("{host}:{CRR_PORT}")]),
        Load::HttpConnections | Load::Requests => {
            args.extend(["http-load".into(), format!("http://{host}/")])
        }
    }
    let clients = match how {
        Load::Crr => CRR_CLIENTS,
        Load::HttpConnections | Load::Requests => CLIENTS,
    };
    args.extend([
        "--seconds".into(),
        secs.into(),
        "--connections".into(),
        clients.into(),
    ]);
    if matches!(how, Load::HttpConnections) {
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
    match how {
        Load::Crr => rate(&out, "connections_per_sec"),
        // One request a connection with --new-connections: requests are
        // connections.
        Load::HttpConnections | Load::Requests => rate(&out, "requests_per_sec"),
    }
}

/// `iptables-save -t nat` (iptables mode) or kube-proxy's service map
/// (nftables mode) on node `netns`.
fn kube_proxy_rules(netns: &str, mode: &str) -> String {
    let args: &[&str] = if mode == "iptables" {
        &["iptables-save", "-t", "nat"]
    } else {
        &["nft", "list", "map", "ip", "kube-proxy", "service-ips"]
    };
    Command::new("ip")
        .args(["netns", "exec", netns])
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// The services kube-proxy has rules for on node `netns`.
fn kube_proxy_services(netns: &str, mode: &str) -> usize {
    if mode == "iptables" {
        chain_order(netns).len()
    } else {
        kube_proxy_rules(netns, mode)
            .matches(": goto service-")
            .count()
    }
}

/// The cluster IPs of KUBE-SERVICES' rules on node `netns`, in the order
/// the chain walks them (iptables mode).
fn chain_order(netns: &str) -> Vec<String> {
    kube_proxy_rules(netns, "iptables")
        .lines()
        .filter(|l| l.contains("-j KUBE-SVC-"))
        .filter_map(|l| {
            let rest = l.strip_prefix("-A KUBE-SERVICES -d ")?;
            Some(rest.split('/').next()?.to_string())
        })
        .collect()
}

/// Where each of `vips` sits in KUBE-SERVICES (1-based), as
/// `place, ... of rules`; iptables mode only.
fn chain_places(netns: &str, vips: &[String]) -> String {
    let order = chain_order(netns);
    vips.iter()
        .map(|vip| {
            order
                .iter()
                .position(|v| v == vip)
                .map_or_else(|| "-".to_string(), |i| (i + 1).to_string())
        })
        .collect::<Vec<_>>()
        .join(", ")
        + &format!(" of {}", order.len())
}

/// The places, as shares of a list, that the TCP_CRR rows measure: a
/// typical service of the list on average (the middle), and its spread.
const CRR_QUANTILES: [f64; 4] = [0.125, 0.375, 0.625, 0.875];

/// The decoys (their port 9000 leads to the web pod's crr-server) the
/// TCP_CRR rows connect to: in iptables mode those whose rules sit nearest
/// `CRR_QUANTILES` of KUBE-SERVICES now, so the rate is a typical
/// service's by construction (kube-proxy orders the chain anew with every
/// sync: four services that happen to be served are early or late by
/// luck, which moved this ratio by a third between runs); otherwise the
/// decoys at those shares of their list (Fibril's lookup and nftables'
/// map do not depend on the place).
fn crr_targets(mode: Mode, node_netns: &str, decoys: &[String]) -> Vec<String> {
    let at_quantiles = |list: &[String]| -> Vec<String> {
        CRR_QUANTILES
            .iter()
            .map(|q| list[((list.len() as f64 * q) as usize).min(list.len() - 1)].clone())
            .collect()
    };
    if mode == Mode::KubeProxy("iptables") {
        // The chain's decoys in its order: the quantiles of that list are
        // the quantiles of the chain, give or take the four web services.
        let decoys: std::collections::HashSet<&String> = decoys.iter().collect();
        let in_chain: Vec<String> = chain_order(node_netns)
            .into_iter()
            .filter(|v| decoys.contains(v))
            .collect();
        if in_chain.len() == decoys.len() {
            return at_quantiles(&in_chain);
        }
    }
    at_quantiles(decoys)
}

/// The frontends Fibril's agent on node n1 balances.
fn fibril_services(lab: &BenchLab) -> usize {
    let out = lab.fibril(&["--node", "n1", "service", "list", "-o", "json"]);
    serde_json::from_slice::<serde_json::Value>(&out.stdout)
        .ok()
        .and_then(|v| v.as_array().map(Vec::len))
        .unwrap_or(0)
}

/// How a lab serves services: the real kube-proxy in a mode, or Fibril
/// alone.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    KubeProxy(&'static str),
    Replacement,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::KubeProxy(m) => m,
            Mode::Replacement => "replacement",
        }
    }
}

/// What a row connects to.
enum Target {
    /// The web pod's own address (no load balancing).
    Pod,
    /// The four served cluster IPs, one after the other; the connection
    /// rate is their mean.
    ClusterIps,
}

/// One measured row.
struct Row {
    mode: &'static str,
    services: usize,
    what: &'static str,
    /// HTTP connections a second.
    http_conns: f64,
    /// TCP_CRR connections a second.
    crr: f64,
}
type Results = Vec<Row>;

fn main() -> anyhow::Result<()> {
    let bin = BenchLab::release_bin()?;
    let secs = std::env::var("SERVICE_BENCH_SECONDS").unwrap_or_else(|_| "5".into());
    let modes = std::env::var("SERVICE_BENCH_MODES")
        .unwrap_or_else(|_| "iptables,nftables,replacement".into());
    let counts: Vec<usize> = match std::env::var("SERVICE_BENCH_COUNTS") {
        Err(_) => COUNTS.to_vec(),
        Ok(v) => v
            .split(',')
            .map(|c| c.trim().parse::<usize>())
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("SERVICE_BENCH_COUNTS: {v:?}: {e}"))?,
    };
    anyhow::ensure!(
        !counts.is_empty()
            && counts[0] >= VIPS.len() + CRR_QUANTILES.len()
            && counts.windows(2).all(|w| w[0] < w[1]),
        "SERVICE_BENCH_COUNTS: ascending counts of at least {} services",
        VIPS.len() + CRR_QUANTILES.len()
    );
    let mut labs = Vec::new();
    for (index, mode) in modes.split(',').enumerate() {
        let mode = match mode {
            "iptables" => Mode::KubeProxy("iptables"),
            "nftables" => Mode::KubeProxy("nftables"),
            "replacement" => Mode::Replacement,
            other => {
                anyhow::bail!("SERVICE_BENCH_MODES: {other:?}: iptables, nftables or replacement")
            }
        };
        match mode {
            Mode::KubeProxy(m) => println!("{m}: the real kube-proxy in {m} mode (Fibril's socket LB out of its way, per-packet LB for pods)"),
            Mode::Replacement => println!("replacement: no kube-proxy, Fibril's kube-proxy replacement"),
        }
        labs.push(ModeLab::start(&bin, mode, index)?);
    }
    let mut results = Results::new();
    println!(
        "  {:>6} services | {:>11} | {:>36} | {:>12} | {:>14} | {:>12}",
        "", "lab", "path", "HTTP conn/s", "TCP_CRR conn/s", "requests/s"
    );
    for &count in &counts {
        for lab in &mut labs {
            lab.grow_to(count)?;
        }
        // The control planes settle: kube-proxy goes on rewriting its
        // rules for a minute or more after it has them all (each
        // iptables-restore of 10,000 services is seconds of CPU), and a
        // measure taken meanwhile is kube-proxy's sync, not its datapath.
        wait_quiet();
        for lab in &labs {
            lab.measure(&secs, &mut results)?;
        }
    }
    summary(&results, &counts);
    Ok(())
}

/// The ratios the issue asks for, at the most services measured (10,000),
/// from what ran.
fn summary(results: &Results, counts: &[usize]) {
    let (first, top) = (counts[0], counts[counts.len() - 1]);
    for (measure, rate) in [
        (
            "HTTP connections/s",
            (|r: &Row| r.http_conns) as fn(&Row) -> f64,
        ),
        ("TCP_CRR connections/s", |r: &Row| r.crr),
    ] {
        let find = |mode: &str, count: usize, what: &str| {
            results
                .iter()
                .find(|r| r.mode == mode && r.services == count && r.what == what)
                .map(rate)
        };
        println!("\nsummary ({measure}):");
        for kp in ["iptables", "nftables"] {
            let Some(base) = find(kp, top, ROW_HOST_KUBE_PROXY) else {
                continue;
            };
            for (mode, what) in [
                ("replacement", ROW_HOST_SOCKET_LB),
                ("replacement", ROW_POD_PER_PACKET),
                (kp, ROW_POD_PER_PACKET),
            ] {
                if let Some(c) = find(mode, top, what) {
                    println!(
                        "  {top} services: {what} ({mode}) {c:.0} / kube-proxy {kp} {base:.0} = {:.2}x",
                        c / base
                    );
                }
            }
        }
        for what in [ROW_HOST_SOCKET_LB, ROW_POD_PER_PACKET] {
            if let (Some(low), Some(high)) = (
                find("replacement", first, what),
                find("replacement", top, what),
            ) {
                println!(
                    "  {what} (replacement): {top} services / {first} services = {:.2}",
                    high / low
                );
            }
        }
    }
}

const ROW_HOST_POD: &str = "host -> pod address (no LB)";
const ROW_HOST_KUBE_PROXY: &str = "host -> cluster IP, kube-proxy";
const ROW_HOST_SOCKET_LB: &str = "host -> cluster IP, Fibril socket LB";
const ROW_POD_POD: &str = "pod -> pod address (no LB)";
const ROW_POD_PER_PACKET: &str = "pod -> cluster IP, Fibril per packet";

/// One lab serving services in one mode, kept up for the whole run.
struct ModeLab {
    mode: Mode,
    lab: BenchLab,
    underlay: String,
    node_netns: String,
    kubeconfig: PathBuf,
    web_ip: String,
    /// Services made so far.
    made: usize,
}

/// A new-thread-free runtime for one API call in the lab's underlay.
fn rt() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
}

impl ModeLab {
    /// Brings up the mode's lab (`index` tells its name from the others')
    /// with the web pod and its four services.
    fn start(bin: &Path, mode: Mode, index: usize) -> anyhow::Result<Self> {
        let serving = match mode {
            Mode::KubeProxy(m) => format!("kubeProxy: {m}"),
            Mode::Replacement => "kubeProxyReplacement: true".to_string(),
        };
        let lab = BenchLab::up(
            bin,
            format!("svc{index}{}", std::process::id() % 100_000),
            &format!(
                "podCIDR: 10.232.0.0/22\nnodes: [n1, n2]\nkubernetes: true\n{serving}\nctEndpointBudget: 0\n\
                 pods:\n- {{name: client, labels: {{app: client}}, node: n1}}\n\
                 - {{name: host-client, hostNetwork: true, node: n1}}\n"
            ),
        )?;
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
        // The API client's sockets are made in the lab's underlay, where
        // the apiserver listens.
        let web_ip = netns::in_netns(&underlay, || rt()?.block_on(start_web(&kubeconfig)))??;
        Ok(ModeLab {
            mode,
            lab,
            underlay,
            node_netns,
            kubeconfig,
            web_ip,
            made: VIPS.len(),
        })
    }

    /// Makes services up to `count` and waits until the lab serves them
    /// all (Fibril, and kube-proxy where it runs).
    fn grow_to(&mut self, count: usize) -> anyhow::Result<()> {
        let (kubeconfig, web_ip) = (&self.kubeconfig, &self.web_ip);
        let made = self.made;
        netns::in_netns(&self.underlay, || {
            rt()?.block_on(add_decoys(kubeconfig, made, count, web_ip))
        })??;
        self.made = count;
        let end = Instant::now() + Duration::from_secs(600);
        let followed = || {
            fibril_services(&self.lab) >= count
                && match self.mode {
                    Mode::KubeProxy(m) => kube_proxy_services(&self.node_netns, m) >= count,
                    Mode::Replacement => true,
                }
        };
        while !followed() {
            anyhow::ensure!(
                Instant::now() < end,
                "{count} services not followed within 10 min (Fibril {})",
                fibril_services(&self.lab),
            );
            // Not more often: an iptables-save of 10,000 services is
            // half a second of CPU, taken from the control planes.
            std::thread::sleep(Duration::from_secs(2));
        }
        Ok(())
    }

    /// The mode's rows at the services it has now, printed and added to
    /// `results`.
    fn measure(&self, secs: &str, results: &mut Results) -> anyhow::Result<()> {
        let (mode, lab, count) = (self.mode, &self.lab, self.made);
        let host = Client::HostOutsideCgroup(&self.node_netns);
        let node = Client::LabExec("node/n1");
        let pod = Client::LabExec("default/client");
        let rows: Vec<(&'static str, &Client, Target)> = match mode {
            Mode::KubeProxy(_) => vec![
                (ROW_HOST_POD, &host, Target::Pod),
                (ROW_HOST_KUBE_PROXY, &host, Target::ClusterIps),
                (ROW_POD_PER_PACKET, &pod, Target::ClusterIps),
            ],
            Mode::Replacement => vec![
                (ROW_HOST_POD, &node, Target::Pod),
                (ROW_HOST_SOCKET_LB, &node, Target::ClusterIps),
                (ROW_POD_POD, &pod, Target::Pod),
                (ROW_POD_PER_PACKET, &pod, Target::ClusterIps),
            ],
        };
        let decoys = netns::in_netns(&self.underlay, || {
            rt()?.block_on(decoy_ips(&self.kubeconfig))
        })??;
        let direct = format!("{}:8080", self.web_ip);
        for (what, client, target) in &rows {
            // (the HTTP address, the TCP_CRR address's host)
            let hosts: Vec<(String, String)> = match target {
                Target::Pod => vec![(direct.clone(), self.web_ip.clone())],
                Target::ClusterIps => VIPS
                    .iter()
                    .map(|v| v.to_string())
                    .zip(crr_targets(mode, &self.node_netns, &decoys))
                    .collect(),
            };
            let (mut conns, mut crr) = (Vec::new(), Vec::new());
            for (http, crr_host) in &hosts {
                // The last run's closing connections leave the conntrack
                // tables first (10 s; the agent's census then gives the
                // web pod's budget back within 5 s), so no run pays for
                // another's.
                std::thread::sleep(Duration::from_secs(16));
                conns.push(load(lab, client, http, Load::HttpConnections, secs)?);
                std::thread::sleep(Duration::from_secs(16));
                crr.push(load(lab, client, crr_host, Load::Crr, secs)?);
            }
            let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
            let (conns, crr) = (mean(&conns), mean(&crr));
            // Kept-alive requests walk no rule list: one service is enough.
            let reqs = load(lab, client, &hosts[0].0, Load::Requests, secs)?;
            println!(
                "  {count:>6} services | {:>11} | {what:>36} | {conns:>12.0} | {crr:>14.0} | {reqs:>12.0}",
                mode.name()
            );
            results.push(Row {
                mode: mode.name(),
                services: count,
                what,
                http_conns: conns,
                crr,
            });
        }
        if mode == Mode::KubeProxy("iptables") {
            let served: Vec<String> = VIPS.iter().map(|v| v.to_string()).collect();
            println!(
                "         places in KUBE-SERVICES now: HTTP's services {}; TCP_CRR's {}",
                chain_places(&self.node_netns, &served),
                chain_places(
                    &self.node_netns,
                    &crr_targets(mode, &self.node_netns, &decoys)
                )
            );
        }
        Ok(())
    }
}

/// The machine's busy share of its CPUs over `window` (`/proc/stat`).
fn busy_share(window: Duration) -> f64 {
    fn sample() -> (u64, u64) {
        let text = std::fs::read_to_string("/proc/stat").unwrap_or_default();
        let fields: Vec<u64> = text
            .lines()
            .next()
            .unwrap_or_default()
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        // idle and iowait are the 4th and 5th.
        let idle = fields.iter().skip(3).take(2).sum();
        (fields.iter().sum(), idle)
    }
    let (total0, idle0) = sample();
    std::thread::sleep(window);
    let (total1, idle1) = sample();
    let total = total1.saturating_sub(total0).max(1);
    1.0 - idle1.saturating_sub(idle0) as f64 / total as f64
}

/// Waits (up to 5 minutes) until the CPUs are mostly idle for 3 s, so no
/// control plane's catching up is measured.
fn wait_quiet() {
    let end = Instant::now() + Duration::from_secs(300);
    loop {
        let busy = busy_share(Duration::from_secs(3));
        if busy < 0.15 {
            return;
        }
        if Instant::now() >= end {
            println!(
                "         (the machine stayed {:.0}% busy: measuring anyway)",
                busy * 100.0
            );
            return;
        }
    }
}

/// The web pod on n1 and its services web-0 .. web-3 at `VIPS`; its
/// address once it runs.
async fn start_web(kubeconfig: &Path) -> anyhow::Result<String> {
    let client = k8s::client::connect(Some(kubeconfig)).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "web", "labels": {"app": "web"}},
        "spec": {"nodeName": "n1", "containers": [
            {"name": "web", "image": "fibril/echo", "ports": [{"containerPort": 8080}]},
            {"name": "crr", "image": "fibril/echo", "args": ["crr-server", "--port", CRR_PORT.to_string()],
             "ports": [{"containerPort": CRR_PORT}]}]},
    }))?;
    // The namespace's default service account comes from the
    // controller-manager a moment after the lab is up.
    let end = Instant::now() + Duration::from_secs(60);
    while let Err(e) = pods.create(&PostParams::default(), &pod).await {
        anyhow::ensure!(Instant::now() < end, "creating the web pod: {e}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let services: Api<Service> = Api::namespaced(client.clone(), "default");
    for (i, vip) in VIPS.iter().enumerate() {
        let svc: Service = serde_json::from_value(json!({
            "metadata": {"name": format!("web-{i}")},
            "spec": {"clusterIP": vip, "selector": {"app": "web"},
                     "ports": [{"name": "http", "port": 80, "targetPort": 8080}]},
        }))?;
        services.create(&PostParams::default(), &svc).await?;
    }
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

/// Services `from..to` (numbered after the web ones): selector-less, each
/// with an EndpointSlice naming the web pod's TCP_CRR port, so kube-proxy
/// writes the same rules as for a served service. Made 32 at a time.
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
                    "spec": {"ports": [{"name": "crr", "port": CRR_PORT, "protocol": "TCP"}]},
                }))?;
                services.create(&PostParams::default(), &svc).await?;
                let slice: EndpointSlice = serde_json::from_value(json!({
                    "metadata": {"name": format!("{name}-1"),
                                 "labels": {"kubernetes.io/service-name": name,
                                            "endpointslice.kubernetes.io/managed-by": "fibril-bench"}},
                    "addressType": "IPv4",
                    "ports": [{"name": "crr", "port": CRR_PORT, "protocol": "TCP"}],
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

/// The decoys' cluster IPs, by name.
async fn decoy_ips(kubeconfig: &Path) -> anyhow::Result<Vec<String>> {
    let client = k8s::client::connect(Some(kubeconfig)).await?;
    let services: Api<Service> = Api::namespaced(client, "default");
    let mut decoys: Vec<(String, String)> = services
        .list(&Default::default())
        .await?
        .items
        .into_iter()
        .filter_map(|s| {
            let name = s.metadata.name?;
            name.starts_with("decoy-")
                .then_some((name, s.spec?.cluster_ip?))
        })
        .collect();
    decoys.sort();
    Ok(decoys.into_iter().map(|(_, ip)| ip).collect())
}
