//! The UI under 100,000 flows/s into the cluster (issue 16's figure):
//! three synthetic nodes (Hubble servers over rings this process fills at
//! the rate, flows of 30 workloads in 3 namespaces, some dropped, some
//! HTTP and DNS) behind the release `fibril-relay`, the release
//! `fibril-ui` over it, and the page open in headless Chromium
//! (`crates/ui/web/e2e/bench.mjs`) for `UI_BENCH_SECONDS` (600).
//!
//! Prints the rate reached, the flows the UI aggregated of those sent
//! (it keeps up, or says how far behind it fell), the UI's and the
//! relay's CPU and memory, and the browser's main-thread busy share, JS
//! heap and DOM size at the end, from Chromium's performance metrics.
//!
//! Run: `cargo run --release -p fibril-ui --example ui_bench`
//! (`cargo build --release --bins` first; xtask does).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hubble::entry::FlowEntry;
use hubble::server::{self, RingBackend};
use test_support::{cpu_seconds, status_kib};

const NODES: usize = 3;
/// Each node's ring (2^16 - 1).
const RING: usize = 65_535;
const NAMESPACES: [&str; 3] = ["shop", "payments", "kube-system"];
const APPS_PER_NAMESPACE: u64 = 10;

fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// The flow templates: pairs of workloads, one in twelve dropped by
/// default deny, one in ten an HTTP request and its response, one in
/// twenty a DNS query.
fn templates(node: &str) -> Vec<flow::Flow> {
    let mut out = Vec::new();
    let endpoint = |i: u64| {
        let ns = NAMESPACES[(i / APPS_PER_NAMESPACE) as usize % NAMESPACES.len()];
        let app = format!("app-{}", i % APPS_PER_NAMESPACE);
        format!(
            r#"{{"identity":{},"namespace":"{ns}","pod_name":"{app}-{}","labels":["k8s:app={app}","k8s:io.kubernetes.pod.namespace={ns}"],"workloads":[{{"name":"{app}","kind":"Deployment"}}]}}"#,
            1000 + i,
            i % 7
        )
    };
    for i in 0..600u64 {
        let src = i * 7 % 30;
        let dst = (src + 1 + i % 4) % 30;
        let port = [8080, 443, 5432, 9090][(i % 4) as usize];
        let dropped = i % 12 == 0;
        let (verdict, extra) = if dropped {
            (
                "DROPPED",
                r#","drop_reason":133,"drop_reason_desc":"POLICY_DENIED","event_type":{"type":1,"sub_type":133},"traffic_direction":"INGRESS""#,
            )
        } else {
            (
                "FORWARDED",
                r#","event_type":{"type":4},"traffic_direction":"EGRESS""#,
            )
        };
        let l7 = match i % 20 {
            1 | 11 => r#","Type":"L7","l7":{"type":"REQUEST","http":{"method":"GET","url":"http://svc/api/items","protocol":"HTTP/1.1"}}"#.to_string(),
            2 | 12 => r#","Type":"L7","l7":{"type":"RESPONSE","latency_ns":"2500000","http":{"code":200,"method":"GET","url":"http://svc/api/items","protocol":"HTTP/1.1"}}"#.to_string(),
            3 => r#","Type":"L7","l7":{"type":"REQUEST","dns":{"query":"api.example.com.","qtypes":["A"]}}"#.to_string(),
            _ => r#","Type":"L3_L4""#.to_string(),
        };
        let json = format!(
            r#"{{"time":"{}","uuid":"u","verdict":"{verdict}","IP":{{"source":"10.1.0.{src}","destination":"10.1.0.{dst}","ipVersion":"IPv4"}},"l4":{{"TCP":{{"source_port":{},"destination_port":{port},"flags":{{"ACK":true}}}}}},"source":{},"destination":{},"node_name":"{node}","is_reply":false,"Summary":"TCP Flags: ACK"{extra}{l7}}}"#,
            flow::record::rfc3339(now_ns()),
            40000 + i,
            endpoint(src),
            endpoint(dst),
        );
        out.push(serde_json::from_str(&json).expect("a valid flow"));
    }
    out
}

struct Kill(std::process::Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let rate: u64 = std::env::var("UI_BENCH_RATE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let seconds: u64 = std::env::var("UI_BENCH_SECONDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(600);
    let bin_dir = std::env::current_exe()?
        .parent()
        .and_then(|d| d.parent())
        .map(std::path::Path::to_path_buf)
        .ok_or_else(|| anyhow::anyhow!("no binary directory"))?;
    for b in ["fibril-relay", "fibril-ui"] {
        anyhow::ensure!(
            bin_dir.join(b).exists(),
            "build {b} first (cargo build --release --bins)"
        );
    }
    anyhow::ensure!(
        std::path::Path::new("/usr/bin/chromium").exists(),
        "the browser is missing: cargo xtask deps installs Debian's chromium"
    );

    let mut nodes = Vec::new();
    let mut peers = Vec::new();
    for n in 0..NODES {
        let name = format!("bench/n{n}");
        let node = Arc::new(RingBackend::new(&name, RING).map_err(anyhow::Error::msg)?);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        peers.push(format!("{name}={}", listener.local_addr()?));
        let b = node.clone();
        tokio::spawn(async move {
            server::router(b)
                .await
                .serve_with_incoming(hubble::limits::tcp_nodelay(listener))
                .await
        });
        nodes.push(node);
    }
    let relay_port = free_port()?;
    let mut relay = std::process::Command::new(bin_dir.join("fibril-relay"));
    relay.args(["--listen-address", &format!("127.0.0.1:{relay_port}")]);
    for p in &peers {
        relay.args(["--static-peer", p]);
    }
    let relay = Kill(
        relay
            .env("RUST_LOG", "warn")
            .stderr(std::process::Stdio::null())
            .spawn()?,
    );
    let address_file = std::env::temp_dir().join(format!("fibril-ui-bench-{}", std::process::id()));
    let ui = Kill(
        std::process::Command::new(bin_dir.join("fibril-ui"))
            .args(["--listen-address", "127.0.0.1:0"])
            .args(["--relay", &format!("127.0.0.1:{relay_port}")])
            .arg("--address-file")
            .arg(&address_file)
            .env("RUST_LOG", "warn")
            .spawn()?,
    );
    let ui_address = {
        let start = Instant::now();
        loop {
            if let Ok(a) = std::fs::read_to_string(&address_file) {
                break a.trim().to_string();
            }
            anyhow::ensure!(
                start.elapsed() < Duration::from_secs(10),
                "the UI did not start"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    std::fs::remove_file(&address_file).ok();

    // The load: each node appends its share every 10 ms, stamped now.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let per_tick = (rate / NODES as u64 / 100).max(1);
    let writers: Vec<_> = nodes
        .iter()
        .map(|node| {
            let (node, stop, sent) = (node.clone(), stop.clone(), sent.clone());
            std::thread::spawn(move || {
                let templates = templates(&node.name);
                let start = Instant::now();
                let mut i = 0u64;
                let mut tick = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let now = now_ns();
                    for _ in 0..per_tick {
                        let mut f = templates[(i % templates.len() as u64) as usize].clone();
                        f.time = flow::record::Time(now);
                        f.uuid = format!("{}-{i}", node.name);
                        node.flows.push(Arc::new(FlowEntry::new(f)));
                        i += 1;
                    }
                    sent.fetch_add(per_tick, Ordering::Relaxed);
                    tick += 1;
                    let due = start + Duration::from_millis(10 * tick);
                    if let Some(wait) = due.checked_duration_since(Instant::now()) {
                        std::thread::sleep(wait);
                    }
                }
            })
        })
        .collect();

    let web = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("web");
    let (ui_pid, relay_pid) = (ui.0.id(), relay.0.id());
    let (ui_cpu0, relay_cpu0, sent0, t0) = (
        cpu_seconds(ui_pid),
        cpu_seconds(relay_pid),
        sent.load(Ordering::Relaxed),
        Instant::now(),
    );
    println!(
        "UI under {rate} flows/s from {NODES} nodes through the relay, page open {seconds} s \
         in headless Chromium ..."
    );
    let browser = tokio::process::Command::new("node")
        .arg("e2e/bench.mjs")
        .current_dir(&web)
        .env("UI_URL", format!("http://{ui_address}/"))
        .env("SECONDS", seconds.to_string())
        .output()
        .await?;
    let wall = t0.elapsed().as_secs_f64();
    let sent_n = sent.load(Ordering::Relaxed) - sent0;
    let (ui_cpu, relay_cpu) = (
        cpu_seconds(ui_pid) - ui_cpu0,
        cpu_seconds(relay_pid) - relay_cpu0,
    );
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        let _ = w.join();
    }
    anyhow::ensure!(
        browser.status.success(),
        "the browser half failed: {}",
        String::from_utf8_lossy(&browser.stderr)
    );
    let out: serde_json::Value = serde_json::from_slice(
        String::from_utf8_lossy(&browser.stdout)
            .lines()
            .last()
            .unwrap_or_default()
            .as_bytes(),
    )?;
    let f = |k: &str| out[k].as_f64().unwrap_or(f64::NAN);
    println!(
        "  input: {:.0} flows/s sent for {wall:.0} s; the page's session aggregated {} flows \
         ({:.1}% of those sent while it was open)",
        sent_n as f64 / wall,
        out["seen"],
        100.0 * f("seen") / sent_n as f64
    );
    println!(
        "  fibril-ui: {:.2} CPU ({:.0} flows per CPU-second), RSS {} MiB (peak {} MiB); \
         fibril-relay: {:.2} CPU, RSS {} MiB",
        ui_cpu / wall,
        f("seen") / ui_cpu,
        status_kib(ui_pid, "VmRSS:") / 1024,
        status_kib(ui_pid, "VmHWM:") / 1024,
        relay_cpu / wall,
        status_kib(relay_pid, "VmRSS:") / 1024
    );
    println!(
        "  browser after {:.0} s: main thread busy {:.1}% (script {:.1}%, layout {:.1}%), \
         JS heap {:.1} MiB (was {:.1}), {} DOM nodes, {} edges drawn; a click shows in {:.0} ms \
         (median; worst {:.0} ms)",
        f("seconds"),
        100.0 * f("busy"),
        100.0 * f("script"),
        100.0 * f("layout"),
        f("heap_mb_end"),
        f("heap_mb_start"),
        out["dom_nodes"],
        out["edges"],
        f("click_ms_median"),
        f("click_ms_max"),
    );
    if let Some(minutes) = out["minutes"].as_array() {
        let series: Vec<String> = minutes
            .iter()
            .map(|m| {
                format!(
                    "{:.0}%/{:.0}MiB",
                    100.0 * m["busy"].as_f64().unwrap_or(0.0),
                    m["heap_mb"].as_f64().unwrap_or(0.0)
                )
            })
            .collect();
        println!("  per minute (busy/heap): {}", series.join(" "));
    }
    Ok(())
}
