//! Convergence in kvstore mode (issue 15's figure): three agents (the
//! release `fibril-agent`, private state and bpffs each) on one real etcd;
//! a policy imported on one node, timed until every other node has it in
//! force (its commit done: `policy get` answers from the committed state),
//! p50/p99 of `ROUNDS`. Nodes are agents on this host, not namespaces
//! (no packet crosses them yet).
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
        let child = test_support::agent_command(
            &agent,
            &ndir,
            &bpf,
            &format!("n{i}"),
            &format!("10.248.{i}.0/24"),
        )
        .args(["--cluster-name", "bench", "--kvstore", &etcd.endpoint()])
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(ndir.join("agent.log"))?)
        .spawn()?;
        nodes.push(Node {
            child,
            dir: ndir,
            bpf,
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
    Ok(())
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
