//! Convergence in kvstore mode (issue 15's figure): three agents (the
//! release `fibril-agent`, private state and bpffs each) on one real etcd;
//! a policy imported on one node, timed until every other node has it in
//! force (its commit done: `policy get` answers from the committed state),
//! p50/p99 of `ROUNDS`; then a new pod on one node until another node's
//! ipcache has it. Then scale: `SCALE_PODS` pods per node (real
//! endpoints: a network namespace and veth each), with each agent's RSS and
//! its traffic to etcd (counted by a TCP proxy the bench puts between each
//! agent and etcd) while the pods come and in a quiet minute after. Nodes
//! are agents on this host side by side (the lab's nodes add only the
//! underlay hop to etcd).
//!
//! Run: `cargo run --release -p fibril-agent --example cluster_bench`
//! (root; `cargo build --release --bins` first; xtask does).

use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

const NODES: usize = 3;
const ROUNDS: usize = 200;

struct Node {
    child: Child,
    dir: PathBuf,
    bpf: PathBuf,
    /// The agent's traffic to and from etcd.
    etcd: CountingProxy,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        netns::proxy_routing_forget(&self.dir.join("state").join(netns::PROXY_ROUTING_FILE));
        datapath::Datapath::unpin_all(&self.bpf);
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

impl Node {
    fn socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }

    fn has(&self, key: &str) -> bool {
        matches!(
            api::call(&self.socket(), &api::Request::PolicyGet),
            Ok(api::Response::Policies { policies }) if policies.iter().any(|p| p.key() == key)
        )
    }
}

fn summary(samples: &mut [f64]) -> String {
    samples.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    format!(
        "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} imports)",
        at(0.5),
        at(0.99),
        at(1.0),
        samples.len()
    )
}

fn main() -> anyhow::Result<()> {
    let agent = std::env::current_exe()?
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("fibril-agent"))
        .filter(|p| p.exists())
        .ok_or_else(|| {
            anyhow::anyhow!("build fibril-agent first (cargo build --release --bins)")
        })?;
    let dir = std::env::temp_dir().join(format!("fibril-cluster-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    struct Dir(PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            std::fs::remove_dir_all(&self.0).ok();
        }
    }
    let _dir = Dir(dir.clone());
    let etcd = kvstore::server::Etcd::single(&dir).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut nodes = Vec::new();
    for i in 0..NODES {
        let name = format!("bench{}-{i}", std::process::id());
        let ndir = dir.join(format!("n{i}"));
        let bpf = PathBuf::from("/sys/fs/bpf").join(&name);
        std::fs::create_dir_all(&ndir)?;
        let proxy = CountingProxy::start(etcd.endpoint().trim_start_matches("http://"))?;
        // Room for the scale part's pods and the convergence part's.
        let child = test_support::agent_command(
            &agent,
            &ndir,
            &bpf,
            &format!("n{i}"),
            &format!("10.248.{}.0/21", i * 8),
        )
        .args(["--cluster-name", "bench", "--kvstore", &proxy.endpoint()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(ndir.join("agent.log"))?)
        .spawn()?;
        nodes.push(Node {
            child,
            dir: ndir,
            bpf,
            etcd: proxy,
        });
    }
    for n in &nodes {
        let start = Instant::now();
        while api::call(&n.socket(), &api::Request::Status).is_err() {
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(20),
                "an agent did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // Every node connected to etcd (an import on an unconnected node waits).
    std::thread::sleep(Duration::from_millis(500));
    let mut samples = Vec::with_capacity(ROUNDS);
    for round in 0..ROUNDS {
        let key = format!("bench/p{round}");
        let yaml = format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p{round}, namespace: bench}}\nspec:\n  endpointSelector: {{matchLabels: {{app: a{round}}}}}\n  ingress:\n  - fromEndpoints: [{{matchLabels: {{app: web}}}}]\n"
        );
        let from = &nodes[round % NODES];
        let t = Instant::now();
        api::call(
            &from.socket(),
            &api::Request::PolicyImport {
                file: "bench.yaml".into(),
                yaml,
                namespace: None,
            },
        )?;
        let mut waiting: Vec<&Node> = nodes.iter().filter(|n| !std::ptr::eq(*n, from)).collect();
        while !waiting.is_empty() {
            waiting.retain(|n| !n.has(&key));
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(10),
                "{key} never reached every node"
            );
        }
        samples.push(t.elapsed().as_secs_f64() * 1e3);
    }
    println!(
        "policy import on one node until in force on the other {} (kvstore mode, one etcd): {}",
        NODES - 1,
        summary(&mut samples)
    );

    // A new pod on node 0 (a real endpoint: netns, veth, programs) until
    // node 1's ipcache gives its address the pod's identity (`policy
    // trace` from it to a pod of node 1's own).
    let netns: Vec<Netns> = (0..PODS + 1)
        .map(Netns::new)
        .collect::<anyhow::Result<_>>()?;
    pod(&nodes[1], "local", "server", &netns[PODS])?;
    let mut samples = Vec::with_capacity(PODS);
    let mut after_add = Vec::with_capacity(PODS);
    for (i, ns) in netns.iter().take(PODS).enumerate() {
        let t = Instant::now();
        let ip = pod(&nodes[0], &format!("p{i}"), &format!("a{i}"), ns)?;
        let added = Instant::now();
        loop {
            let traced = api::call(
                &nodes[1].socket(),
                &api::Request::PolicyTrace(api::TraceRequest {
                    from: ip.clone(),
                    to: "bench/local".into(),
                    protocol: 6,
                    port: 80,
                }),
            )?;
            if matches!(traced, api::Response::Trace { from_identity, .. } if from_identity != abi::identity::WORLD)
            {
                break;
            }
            anyhow::ensure!(
                t.elapsed() < Duration::from_secs(10),
                "{ip} never reached node 1"
            );
        }
        samples.push(t.elapsed().as_secs_f64() * 1e3);
        after_add.push(added.elapsed().as_secs_f64() * 1e3);
    }
    println!(
        "new pod on one node (CNI ADD included) until another node's ipcache has its identity: {}",
        summary(&mut samples).replace("imports", "pods")
    );
    println!(
        "  of which after the ADD returned: {}",
        summary(&mut after_add).replace("imports", "pods")
    );
    drop(netns);
    scale(&nodes)
}

/// Pods per node in the scale part (`FIBRIL_BENCH_SCALE_PODS` overrides:
/// the figure is at 1,000).
fn scale_pods() -> usize {
    std::env::var("FIBRIL_BENCH_SCALE_PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

/// Distinct workloads (label sets) the scale part's pods belong to; each
/// has replicas on every node, as a Deployment spread by the scheduler.
const SCALE_APPS: usize = 300;

/// `SCALE_PODS` pods on each node, added round-robin across the nodes;
/// each agent's RSS and etcd traffic.
fn scale(nodes: &[Node]) -> anyhow::Result<()> {
    let per_node = scale_pods();
    let rss_before: Vec<u64> = nodes.iter().map(|n| rss_kib(n.child.id())).collect();
    let traffic_before: Vec<(u64, u64)> = nodes.iter().map(|n| n.etcd.bytes()).collect();
    let netns: Vec<Netns> = (0..per_node * nodes.len())
        .map(|i| Netns::new(10_000 + i))
        .collect::<anyhow::Result<_>>()?;
    let t = Instant::now();
    for (i, ns) in netns.iter().enumerate() {
        let node = &nodes[i % nodes.len()];
        pod(node, &format!("s{i}"), &format!("s{}", i % SCALE_APPS), ns)?;
    }
    let added = t.elapsed();
    // Every node has every other node's pods in its ipcache.
    let total = netns.len();
    let start = Instant::now();
    for n in nodes {
        loop {
            let Ok(api::Response::Status(st)) = api::call(&n.socket(), &api::Request::Status)
            else {
                anyhow::bail!("status");
            };
            let known = st.cluster.as_ref().map_or(0, |c| c.remote_endpoints) + st.endpoints;
            if known >= total {
                break;
            }
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(120),
                "a node knows {known} of {total} pods"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    let settled = t.elapsed();
    let traffic_up: Vec<(u64, u64)> = nodes.iter().map(|n| n.etcd.bytes()).collect();
    println!(
        "\n{} nodes x {per_node} pods ({SCALE_APPS} workloads across the nodes; real endpoints, \
         netns + veth each): added in {:.1} s, every node had every pod after {:.1} s",
        nodes.len(),
        added.as_secs_f64(),
        settled.as_secs_f64()
    );
    let quiet = Duration::from_secs(
        std::env::var("FIBRIL_BENCH_QUIET_SECONDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(60),
    );
    std::thread::sleep(quiet);
    for (i, n) in nodes.iter().enumerate() {
        let (sent0, recv0) = traffic_before[i];
        let (sent1, recv1) = traffic_up[i];
        let (sent2, recv2) = n.etcd.bytes();
        println!(
            "  node n{i}: agent RSS {} -> {} MiB; etcd traffic while the pods came: sent {:.0} KiB, \
             received {:.0} KiB ({:.2} / {:.2} KiB per cluster pod); then idle: sent {:.0} B/s, received {:.0} B/s",
            rss_before[i] / 1024,
            rss_kib(n.child.id()) / 1024,
            (sent1 - sent0) as f64 / 1024.0,
            (recv1 - recv0) as f64 / 1024.0,
            (sent1 - sent0) as f64 / 1024.0 / total as f64,
            (recv1 - recv0) as f64 / 1024.0 / total as f64,
            (sent2 - sent1) as f64 / quiet.as_secs_f64(),
            (recv2 - recv1) as f64 / quiet.as_secs_f64(),
        );
    }
    Ok(())
}

/// Resident set size of process `pid`, KiB (0 when unknown).
fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// A TCP proxy on loopback in front of etcd that counts the bytes each
/// way: one agent's traffic to the kvstore, whatever it speaks.
struct CountingProxy {
    addr: std::net::SocketAddr,
    /// (to etcd, from etcd)
    counts: std::sync::Arc<[std::sync::atomic::AtomicU64; 2]>,
}

impl CountingProxy {
    fn start(etcd: &str) -> anyhow::Result<CountingProxy> {
        use std::sync::atomic::{AtomicU64, Ordering};
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let counts = std::sync::Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
        let (c, etcd) = (counts.clone(), etcd.to_string());
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(server) = std::net::TcpStream::connect(&etcd) else {
                    continue;
                };
                // As the agent's own connection: no Nagle delay added.
                let _ = client.set_nodelay(true);
                let _ = server.set_nodelay(true);
                for (mut from, mut to, i) in [
                    (client.try_clone(), server.try_clone(), 0),
                    (server.try_clone(), client.try_clone(), 1),
                ]
                .into_iter()
                .filter_map(|(a, b, i)| Some((a.ok()?, b.ok()?, i)))
                {
                    let c = c.clone();
                    std::thread::spawn(move || {
                        use std::io::{Read, Write};
                        let mut buf = [0u8; 16384];
                        while let Ok(n) = from.read(&mut buf) {
                            if n == 0 || to.write_all(&buf[..n]).is_err() {
                                break;
                            }
                            c[i].fetch_add(n as u64, Ordering::Relaxed);
                        }
                        let _ = to.shutdown(std::net::Shutdown::Write);
                    });
                }
            }
        });
        Ok(CountingProxy { addr, counts })
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Bytes (sent to etcd, received from it) so far.
    fn bytes(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering;
        (
            self.counts[0].load(Ordering::Relaxed),
            self.counts[1].load(Ordering::Relaxed),
        )
    }
}

const PODS: usize = 50;

/// A network namespace of the bench's own, removed when dropped.
struct Netns(String);

impl Netns {
    fn new(i: usize) -> anyhow::Result<Self> {
        let name = format!("fcb{}-{i}", std::process::id());
        let ok = std::process::Command::new("ip")
            .args(["netns", "add", &name])
            .status()?
            .success();
        anyhow::ensure!(ok, "ip netns add {name}");
        Ok(Netns(name))
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

/// Pod `bench/<name>` labelled `app` with an endpoint in `ns` on `node`;
/// its address.
fn pod(node: &Node, name: &str, app: &str, ns: &Netns) -> anyhow::Result<String> {
    api::call(
        &node.socket(),
        &api::Request::PodUpsert(api::Pod {
            namespace: "bench".into(),
            name: name.into(),
            labels: [("app".to_string(), app.to_string())].into(),
            namespace_labels: Default::default(),
            service_account: None,
            ports: vec![],
            workloads: vec![],
        }),
    )?;
    let api::Response::Added(added) = api::call(
        &node.socket(),
        &api::Request::EndpointAdd(api::Attachment {
            container_id: format!("c-{name}"),
            ifname: "eth0".into(),
            netns: format!("/run/netns/{}", ns.0),
            namespace: "bench".into(),
            pod: name.into(),
        }),
    )?
    else {
        anyhow::bail!("unexpected answer to EndpointAdd");
    };
    Ok(added.ipv4.split('/').next().unwrap_or_default().to_string())
}
