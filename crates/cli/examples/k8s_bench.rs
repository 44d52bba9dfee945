//! Kubernetes mode's figures (issue 17) on a lab of three nodes with the
//! real control plane (`kubernetes: true`, release binaries):
//! - policy: a CiliumNetworkPolicy created through the API, until every
//!   node has it in force (its commit done: maps written), read from the
//!   `lastUpdated` each agent writes in the object's status right after
//!   its commit; p50/p99 of `ROUNDS` creations;
//! - pods: a pod created through the API until its Ready condition is
//!   read back (polled every 10 ms: scheduler, kubelet, CNI ADD, endpoint,
//!   status);
//! - agent RSS at half and all of `SCALE_PODS` pods on one node
//!   (lightweight `sleep` containers): the slope, as MiB per 1,000 pods.
//!
//! Run: `cargo run --release -p fibril-cli --example k8s_bench` (root;
//! `cargo build --release --bins` and `cargo xtask deps` first; xtask
//! does). The lab is removed at the end, also on failure.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use k8s::kube::api::{Api, DynamicObject, PostParams};
use k8s_openapi::api::core::v1::Pod;
use serde_json::json;

#[path = "common/bench_lab.rs"]
mod bench_lab;
use bench_lab::BenchLab;

const ROUNDS: usize = 100;
const POD_ROUNDS: usize = 20;
const SCALE_PODS: usize = 200;

fn summary(samples: &mut [f64], what: &str) -> String {
    samples.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    format!(
        "p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} {what})",
        at(0.5),
        at(0.99),
        at(1.0),
        samples.len()
    )
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn main() -> anyhow::Result<()> {
    let bin = BenchLab::release_bin()?;
    let lab = BenchLab::up(
        &bin,
        format!("k8sb{}", std::process::id() % 100_000),
        "podCIDR: 10.231.0.0/22\nnodes: [n1, n2, n3]\nkubernetes: true\n",
    )?;
    let state = lab.state()?;
    let underlay = state["underlay_netns"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let agent_pid = state["nodes"][0]["agent_pid"].as_u64().unwrap_or(0) as u32;
    let kubeconfig = PathBuf::from(format!(
        "/run/fibril/labs/{}/kubernetes/admin.kubeconfig",
        lab.name
    ));
    // The client's sockets are made in the lab's underlay, where the
    // apiserver listens: the runtime lives on a thread inside it.
    netns::in_netns(&underlay, || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
            .block_on(run(&kubeconfig, agent_pid))
    })??;
    Ok(())
}

async fn run(kubeconfig: &std::path::Path, agent_pid: u32) -> anyhow::Result<()> {
    let client = k8s::client::connect(Some(kubeconfig)).await?;
    // The agents install the CRDs; wait until they are served.
    k8s::client::install_crds(&client).await?;

    println!("policy: kubectl-apply equivalent (API create) -> in force on all 3 nodes");
    let cnp = &k8s::policy::kinds()[0];
    let api: Api<DynamicObject> = Api::namespaced_with(client.clone(), "default", &cnp.resource);
    let mut samples = Vec::new();
    for i in 0..ROUNDS {
        let name = format!("bench-{i}");
        let obj: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "cilium.io/v2", "kind": "CiliumNetworkPolicy",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"endpointSelector": {"matchLabels": {"app": format!("bench-{i}")}},
                     "ingress": [{"fromEndpoints": [{"matchLabels": {"app": "client"}}],
                                  "toPorts": [{"ports": [{"port": "8080", "protocol": "TCP"}]}]}]},
        }))?;
        let t0 = k8s_openapi::jiff::Timestamp::now();
        api.create(&PostParams::default(), &obj).await?;
        let end = Instant::now() + Duration::from_secs(30);
        let done = loop {
            let o = api.get(&name).await?;
            let nodes = o.data["status"]["nodes"]
                .as_object()
                .cloned()
                .unwrap_or_default();
            let times: Vec<k8s_openapi::jiff::Timestamp> = nodes
                .values()
                .filter(|n| n["enforcing"] == true)
                .filter_map(|n| n["lastUpdated"].as_str()?.parse().ok())
                .collect();
            if times.len() == 3 {
                break times.into_iter().max();
            }
            anyhow::ensure!(
                Instant::now() < end,
                "{name}: not in force on 3 nodes within 30 s"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        if let Some(t) = done {
            samples.push(t.duration_since(t0).as_secs_f64() * 1000.0);
        }
    }
    println!("  {}", summary(&mut samples, "policies"));

    println!("pods: created -> Ready (scheduled, run by the node's kubelet, CNI ADD, status)");
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let mut samples = Vec::new();
    for i in 0..POD_ROUNDS {
        let name = format!("ready-{i}");
        let pod: Pod = serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"app": "bench"}},
            "spec": {"containers": [{"name": "c", "image": "busybox", "command": ["sleep", "3600"]}]},
        }))?;
        let t0 = Instant::now();
        pods.create(&PostParams::default(), &pod).await?;
        let end = Instant::now() + Duration::from_secs(60);
        // Polled every 10 ms (a watch's first event can lag its list).
        loop {
            let ready = pods
                .get_opt(&name)
                .await?
                .and_then(|p| p.status)
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True");
            if ready {
                break;
            }
            anyhow::ensure!(Instant::now() < end, "{name}: not Ready within 60 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        samples.push(t0.elapsed().as_secs_f64() * 1000.0);
    }
    println!("  {}", summary(&mut samples, "pods"));
    pods.delete_collection(&Default::default(), &Default::default())
        .await?;

    println!("agent RSS: {SCALE_PODS} pods on node n1, measured at half and all of them");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let empty = rss_kib(agent_pid);
    let started = Instant::now();
    let mut samples = Vec::new();
    for (from, to) in [(0, SCALE_PODS / 2), (SCALE_PODS / 2, SCALE_PODS)] {
        for i in from..to {
            let pod: Pod = serde_json::from_value(json!({
                "metadata": {"name": format!("scale-{i}"), "labels": {"app": "scale", "n": i.to_string()}},
                "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "busybox", "command": ["sleep", "3600"]}]},
            }))?;
            pods.create(&PostParams::default(), &pod).await?;
        }
        let end = Instant::now() + Duration::from_secs(600);
        loop {
            let list = pods.list(&Default::default()).await?;
            let running = list
                .items
                .iter()
                .filter(|p| p.status.as_ref().and_then(|s| s.pod_ip.as_ref()).is_some())
                .count();
            if running >= to {
                break;
            }
            anyhow::ensure!(
                Instant::now() < end,
                "{running}/{to} pods running after 600 s"
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        tokio::time::sleep(Duration::from_secs(5)).await;
        samples.push(rss_kib(agent_pid));
    }
    let took = started.elapsed();
    // The slope between the two measurements: what a pod adds, whatever
    // the earlier phases left in the allocator.
    let per_pod = samples[1].saturating_sub(samples[0]) as f64 / (SCALE_PODS / 2) as f64;
    println!(
        "  {SCALE_PODS} pods running in {:.1} s ({:.1} pods/s); agent RSS {} -> {} -> {} KiB (0, {}, {} pods): {:.1} MiB per 1,000 pods (each a distinct identity)",
        took.as_secs_f64(),
        SCALE_PODS as f64 / took.as_secs_f64(),
        empty,
        samples[0],
        samples[1],
        SCALE_PODS / 2,
        SCALE_PODS,
        per_pod * 1000.0 / 1024.0
    );
    pods.delete_collection(&Default::default(), &Default::default())
        .await?;
    Ok(())
}
