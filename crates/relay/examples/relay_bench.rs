//! Relay throughput and follow latency (issue 16's figures): three nodes
//! (the real Hubble server of `fibril-hubble`, each a ring of flows, in this
//! process) behind the release `fibril-relay` (its own process), one
//! client here.
//!
//! - throughput: GetFlows `first` over the three full rings (3 x 131,071
//!   flows, interleaved in time), flows/s at the client; every flow
//!   counted and checked in time order; the relay's peak RSS.
//! - follow latency: each node appends flows stamped with the time they
//!   are added; the client follows through the relay and directly from
//!   one node; p50/p99 of arrival minus stamp, both ways.
//!
//! Run: `cargo run --release -p fibril-relay --example relay_bench`
//! (`cargo build --release --bins` first; xtask does).

use std::sync::Arc;
use std::time::{Duration, Instant};

use hubble::entry::FlowEntry;
use hubble::server::{self, RingBackend};
use proto::observer::get_flows_response::ResponseTypes;
use proto::observer::observer_client::ObserverClient;
use proto::observer::{GetFlowsRequest, GetFlowsResponse};
use test_support::{cpu_seconds, status_kib};

const NODES: u64 = 3;
/// Each node's ring (2^17 - 1).
const RING: usize = 131_071;

/// A flow as an agent records one (a pod-to-pod TCP flow with both ends'
/// labels), at `time_ns`.
fn flow(node: &str, i: u64, time_ns: u64) -> flow::Flow {
    let json = format!(
        r#"{{"time":"{}","uuid":"{node}-{i}","verdict":"FORWARDED","IP":{{"source":"10.0.{}.{}","destination":"10.0.9.1","ipVersion":"IPv4"}},"l4":{{"TCP":{{"source_port":{},"destination_port":8080,"flags":{{"ACK":true}}}}}},"source":{{"identity":300,"namespace":"shop","pod_name":"client-{}","labels":["k8s:app=client","k8s:io.kubernetes.pod.namespace=shop"]}},"destination":{{"identity":301,"namespace":"shop","pod_name":"server","labels":["k8s:app=server","k8s:io.kubernetes.pod.namespace=shop"]}},"Type":"L3_L4","node_name":"{node}","event_type":{{"type":4}},"is_reply":false,"traffic_direction":"INGRESS","Summary":"TCP Flags: ACK"}}"#,
        flow::record::rfc3339(time_ns),
        i % 200,
        i % 250,
        30000 + i % 30000,
        i % 97
    );
    serde_json::from_str(&json).expect("a valid flow")
}

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64
}

fn ns_of(t: &Option<prost_types::Timestamp>) -> u64 {
    t.as_ref()
        .map(|t| t.seconds as u64 * 1_000_000_000 + t.nanos as u64)
        .unwrap_or(0)
}

fn percentile(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// The follow latencies (ms) of `want` flows read from `s`.
async fn latencies(mut s: tonic::Streaming<GetFlowsResponse>, want: usize) -> Vec<f64> {
    let mut lat = Vec::with_capacity(want);
    while lat.len() < want {
        match tokio::time::timeout(Duration::from_secs(20), s.message()).await {
            Ok(Ok(Some(r))) => {
                if let Some(ResponseTypes::Flow(f)) = r.response_types {
                    lat.push(now_ns().saturating_sub(ns_of(&f.time)) as f64 / 1e6);
                }
            }
            _ => break,
        }
    }
    lat
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let relay_bin = std::env::current_exe()?
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("fibril-relay"))
        .filter(|p| p.exists())
        .ok_or_else(|| {
            anyhow::anyhow!("build fibril-relay first (cargo build --release --bins)")
        })?;
    // Three nodes, their rings full, times interleaved across them.
    let base = now_ns() - 3_600_000_000_000;
    let mut nodes = Vec::new();
    let mut addresses = Vec::new();
    for n in 0..NODES {
        let name = format!("bench/n{n}");
        let node = Arc::new(RingBackend::new(&name, RING).map_err(anyhow::Error::msg)?);
        for i in 0..RING as u64 {
            let t = base + (i * NODES + n) * 1_000;
            node.flows.push(Arc::new(FlowEntry::new(flow(&name, i, t))));
        }
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        addresses.push((name, listener.local_addr()?.to_string()));
        let b = node.clone();
        tokio::spawn(async move {
            server::router(b)
                .await
                .serve_with_incoming(hubble::limits::tcp_nodelay(listener))
                .await
        });
        nodes.push(node);
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut relay = std::process::Command::new(&relay_bin);
    relay.args(["--listen-address", &format!("127.0.0.1:{port}")]);
    for (name, address) in &addresses {
        relay.args(["--static-peer", &format!("{name}={address}")]);
    }
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let relay = Kill(
        relay
            .env("RUST_LOG", "warn")
            .stderr(std::process::Stdio::null())
            .spawn()?,
    );
    let pid = relay.0.id();
    let connect = |address: String| async move {
        for _ in 0..100 {
            if let Ok(c) = ObserverClient::connect(format!("http://{address}")).await {
                return Ok(c.max_decoding_message_size(16 << 20));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("{address} never answered")
    };
    let mut client = connect(format!("127.0.0.1:{port}")).await?;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let rss_idle = status_kib(pid, "VmRSS:");

    let total = RING as u64 * NODES;
    let mut rates = Vec::new();
    let mut relay_cpu = Vec::new();
    for round in 0..4 {
        let req = GetFlowsRequest {
            number: total,
            first: true,
            ..Default::default()
        };
        let t = Instant::now();
        let cpu0 = cpu_seconds(pid);
        // Read as the relay sends them, each flow's time read from its
        // bytes: the client here shares the two CPUs with the nodes and the
        // relay, and decoding every flow would measure the client.
        let mut stream = fibril_relay::raw::get_flows(channel.clone(), req, 16 << 20).await?;
        let (mut got, mut last, mut out_of_order) = (0u64, 0u64, 0u64);
        while let Some(r) = stream.message().await? {
            // Field 1 (a flow) comes first in its encoding; 2 is a node
            // status.
            if r.bytes.first() == Some(&0x0a) {
                out_of_order += u64::from(r.time_ns < last);
                last = r.time_ns;
                got += 1;
            }
        }
        let secs = t.elapsed().as_secs_f64();
        let cpu = cpu_seconds(pid) - cpu0;
        anyhow::ensure!(got == total, "round {round}: {got} of {total} flows");
        anyhow::ensure!(out_of_order == 0, "{out_of_order} flows out of order");
        // The first round also makes each node encode its ring once.
        if round > 0 {
            rates.push(got as f64 / secs);
            relay_cpu.push(got as f64 / cpu);
        }
    }
    let median = percentile(&mut rates, 0.5);
    println!(
        "relay throughput, 3 nodes -> 1 client (3 x {RING} flows, 0 lost, 0 out of order): \
         {median:.0} flows/s (median of {} runs of {:.2} s)",
        rates.len(),
        total as f64 / median
    );
    println!(
        "  the relay's own CPU: {:.0} flows per CPU-second (the nodes and this client share the \
         machine's cores with it)",
        percentile(&mut relay_cpu, 0.5)
    );
    println!(
        "relay RSS: {} MiB idle, {} MiB peak",
        rss_idle / 1024,
        status_kib(pid, "VmHWM:") / 1024
    );

    // Follow latency: each node appends a flow every 2 ms, stamped now.
    let follow = GetFlowsRequest {
        follow: true,
        ..Default::default()
    };
    let via_relay = client.get_flows(follow.clone()).await?.into_inner();
    let direct = connect(addresses[0].1.clone())
        .await?
        .get_flows(follow)
        .await?
        .into_inner();
    const PER_NODE: u64 = 2_000;
    let relay_lat = tokio::spawn(latencies(via_relay, (PER_NODE * NODES) as usize - 100));
    let direct_lat = tokio::spawn(latencies(direct, PER_NODE as usize - 100));
    let writers: Vec<_> = nodes
        .iter()
        .map(|node| {
            let node = node.clone();
            tokio::spawn(async move {
                for i in 0..PER_NODE {
                    let f = flow(&node.name, RING as u64 + i, now_ns());
                    node.flows.push(Arc::new(FlowEntry::new(f)));
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            })
        })
        .collect();
    for w in writers {
        w.await?;
    }
    for (name, h) in [
        ("through the relay (3 nodes)", relay_lat),
        ("directly from one node", direct_lat),
    ] {
        let mut lat = h.await?;
        anyhow::ensure!(!lat.is_empty(), "{name}: no flow");
        let n = lat.len();
        println!(
            "follow latency {name}: p50 {:.2} ms, p99 {:.2} ms ({n} flows)",
            percentile(&mut lat, 0.5),
            percentile(&mut lat, 0.99)
        );
    }
    drop(relay);
    Ok(())
}
