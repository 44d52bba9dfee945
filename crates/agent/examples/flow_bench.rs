//! Flow pipeline benchmark (issue 4's figures): datapath events from the
//! kernel ring buffer through decode, enrichment and the flow ring, with and
//! without a follow subscriber applying a filter; lost events counted; and
//! GetFlows throughput to one gRPC client.
//!
//! Events are real: BPF_PROG_TEST_RUN runs the datapath program on a packet
//! that policy drops, so every run emits two events into the ring buffer
//! (the policy verdict and the drop). Run: `cargo run --release -p fibril-agent --example flow_bench` (root).

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use abi::{EndpointInfo, EP_F_INGRESS_ENFORCED};
use datapath::{Config, Datapath, Hook};
use fibril_agent::observer::{Observer, Sources};
use hubble::server::Backend;
use test_support::{ipv4_packet, L4, TCP_SYN};

// The agent's allocator, so that the figures are the agent's.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 10);
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 20);

struct Pipeline {
    dp: Arc<Datapath>,
    observer: Arc<Observer>,
    stop: Arc<AtomicBool>,
    reader: Option<std::thread::JoinHandle<()>>,
}

impl Pipeline {
    fn new(dp: Arc<Datapath>) -> Self {
        let observer = Arc::new(Observer::new(65535, "bench-node".into()));
        let stop = Arc::new(AtomicBool::new(false));
        let reader = dp.take_event_reader().expect("event reader");
        let sources = Sources {
            index: Default::default(),
            policy_refs: Default::default(),
            cluster: "default".into(),
            bare: Default::default(),
        };
        let (o, s) = (observer.clone(), stop.clone());
        // Named as the agent names it, so its CPU time can be read apart.
        let handle = std::thread::Builder::new()
            .name("events".into())
            .spawn(move || o.run_reader(reader, sources, s))
            .expect("events thread");
        Self {
            dp,
            observer,
            stop,
            reader: Some(handle),
        }
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.reader.take() {
            let _ = h.join();
        }
        let _ = &self.dp;
    }
}

/// A follow subscriber: reads every new flow, converts it to `flow.Flow`
/// and applies a filter, as GetFlows does; counts matches and losses.
fn follower(
    observer: Arc<Observer>,
    stop: Arc<AtomicBool>,
    matched: Arc<AtomicU64>,
    lost: Arc<AtomicU64>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let filter = proto::flow::FlowFilter {
            verdict: vec![proto::flow::Verdict::Dropped as i32],
            destination_port: vec!["9999".into()],
            ..Default::default()
        };
        let filters = hubble::filter::Filters::new(&[filter], &[]).expect("filter");
        let mut seq = observer.flows().next_seq();
        while !stop.load(Ordering::Relaxed) {
            let (l, flows, next) = observer.read(seq, Duration::from_millis(50));
            seq = next;
            lost.fetch_add(l, Ordering::Relaxed);
            for f in flows {
                if filters.matches(&hubble::convert::flow(&f)) {
                    matched.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    })
}

/// Events one run of the dropped packet emits: its policy verdict and its
/// drop.
const EVENTS_PER_RUN: u64 = 2;

/// Emits `total` events at `rate` per second (0 = as fast as the kernel
/// goes) and waits until the pipeline has seen or lost them all.
/// Returns (elapsed, delivered, lost in the kernel).
fn run(
    p: &Pipeline,
    progs: &mut datapath::EndpointPrograms,
    packet: &[u8],
    total: u64,
    rate: u64,
) -> (Duration, u64, u64) {
    let (_, seen0) = p.observer.counts();
    let lost0 = p.dp.events_lost();
    let chunk: u64 = if rate == 0 {
        50_000
    } else {
        (rate / 100).max(1)
    };
    let start = Instant::now();
    let mut sent = 0;
    while sent < total {
        let n = chunk.min(total - sent);
        progs
            .test_run_repeat(Hook::ToContainer, packet, (n / EVENTS_PER_RUN) as u32)
            .expect("test run");
        sent += n;
        if rate > 0 {
            let due = Duration::from_secs_f64(sent as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let delivered = p.observer.counts().1 - seen0;
        let lost = p.dp.events_lost() - lost0;
        if delivered + lost >= total || Instant::now() > deadline {
            return (start.elapsed(), delivered, lost);
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Process CPU time (user + system) so far, from /proc/self/stat.
fn cpu_time() -> Duration {
    stat_cpu_time("/proc/self/stat")
}

/// The events thread's CPU time so far: what decoding, enriching and
/// storing the flows cost, without the test runs that emit them.
fn events_cpu_time() -> Duration {
    let tasks = std::fs::read_dir("/proc/self/task").into_iter().flatten();
    for task in tasks.flatten() {
        let comm = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if comm.trim_end() == "events" {
            return stat_cpu_time(task.path().join("stat"));
        }
    }
    Duration::ZERO
}

/// User + system time of a `stat` file of /proc.
fn stat_cpu_time(path: impl AsRef<std::path::Path>) -> Duration {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    // Fields after the command's closing parenthesis; utime and stime are
    // the 12th and 13th of them, in clock ticks (100 per second here).
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<u64> = rest
        .split_whitespace()
        .skip(11)
        .take(2)
        .filter_map(|v| v.parse().ok())
        .collect();
    Duration::from_millis(f.iter().sum::<u64>() * 10)
}

/// What the HTTP proxy reports per request and per response: `pairs`
/// of each, queued as the proxy does, in chunks the queue holds. Returns
/// (elapsed, flows delivered, process CPU time).
fn run_l7(p: &Pipeline, pairs: u64) -> (Duration, u64, Duration) {
    let by: Arc<[(bool, flow::record::SharedPolicyRef)]> = Arc::new([(
        true,
        Arc::new(fibril_agent::observer::policy_ref(&policy::Origin {
            policy: "bench/allow-get".into(),
            kind: "CiliumNetworkPolicy".into(),
            rule: 0,
            direction: policy::compute::Direction::Ingress,
            entry: 0,
        })),
    )]);
    let record = |i: u64, is_reply: bool| flow::record::L7Record {
        unix_ns: 1_768_471_200_000_000_000 + i * 1000,
        client: std::net::SocketAddrV4::new(CLIENT, 40000 + (i % 20000) as u16),
        server: std::net::SocketAddrV4::new(SERVER, 8080),
        client_identity: 300,
        server_identity: 301,
        is_reply,
        verdict: flow::enums::Verdict::FORWARDED,
        ingress: true,
        l7: flow::record::Layer7 {
            r#type: if is_reply {
                flow::enums::L7FlowType::RESPONSE
            } else {
                flow::enums::L7FlowType::REQUEST
            },
            latency_ns: if is_reply { 150_000 } else { 0 },
            dns: None,
            http: Some(flow::record::Http {
                code: if is_reply { 200 } else { 0 },
                method: "GET".into(),
                url: "http://10.88.0.20:8080/api/items".into(),
                protocol: "HTTP/1.1".into(),
                headers: if is_reply {
                    vec![]
                } else {
                    vec![flow::record::HttpHeader {
                        key: "User-Agent".into(),
                        value: "bench".into(),
                    }]
                },
            }),
            kafka: None,
        },
        protocol: 6,
        decided_by: by.clone(),
    };
    let (_, seen0) = p.observer.counts();
    let (start, cpu0) = (Instant::now(), cpu_time());
    // Pairs per chunk: one thread's queue holds 32,768 reports.
    let chunk = 10_000;
    let mut queued = 0;
    while queued < pairs {
        let n = chunk.min(pairs - queued);
        for i in queued..queued + n {
            p.observer.queue_l7(record(i, false));
            p.observer.queue_l7(record(i, true));
        }
        queued += n;
        // Stay under the queue's bound: wait for the events thread.
        let deadline = Instant::now() + Duration::from_secs(10);
        while p.observer.counts().1 - seen0 < 2 * queued && Instant::now() < deadline {
            std::thread::sleep(Duration::from_micros(200));
        }
    }
    (
        start.elapsed(),
        p.observer.counts().1 - seen0,
        cpu_time() - cpu0,
    )
}

struct ObserverBackend(Arc<Observer>);

impl Backend for ObserverBackend {
    fn oldest_seq(&self) -> u64 {
        self.0.flows().oldest_seq()
    }
    fn next_seq(&self) -> u64 {
        self.0.flows().next_seq()
    }
    fn read(&self, seq: u64, wait: Duration) -> (u64, Vec<Arc<hubble::entry::FlowEntry>>, u64) {
        self.0.read(seq, wait)
    }
    fn agent_events(&self) -> &flow::ring::Shared<Arc<flow::agent_event::AgentEvent>> {
        self.0.agent_events()
    }
    fn counters(&self) -> (u64, u64, u64, u64) {
        let (n, cap, seen) = self.0.flows().counts();
        (n as u64, cap as u64, seen, 1)
    }
    fn node_name(&self) -> String {
        "bench-node".into()
    }
    fn address(&self) -> String {
        String::new()
    }
}

fn main() -> anyhow::Result<()> {
    let pin = std::path::PathBuf::from(format!(
        "/sys/fs/bpf/fibril-flow-bench-{}",
        std::process::id()
    ));
    struct Unpin(std::path::PathBuf);
    impl Drop for Unpin {
        fn drop(&mut self) {
            Datapath::unpin_all(&self.0);
        }
    }
    let _unpin = Unpin(pin.clone());
    let dp = Arc::new(Datapath::open(Config::new(&pin))?);
    for (ip, ep, identity, flags) in [(CLIENT, 1, 300, 0), (SERVER, 2, 301, EP_F_INGRESS_ENFORCED)]
    {
        dp.upsert_endpoint(
            ip,
            EndpointInfo {
                ep_id: ep,
                identity,
                host_ifindex: 0,
                flags,
                pod_mac: [2, 0, 0, 0, 1, ep as u8],
                host_mac: [2, 0, 0, 0, 2, ep as u8],
                pad: 0,
            },
        )?;
    }
    let mut progs = dp.load_endpoint_programs(2, SERVER)?;
    let packet = ipv4_packet(
        CLIENT,
        SERVER,
        L4::Tcp {
            sport: 40000,
            dport: 9999,
            flags: TCP_SYN,
        },
    );
    let p = Pipeline::new(dp.clone());

    println!("flow pipeline: kernel ring buffer -> decode -> enrich -> flow ring (65,535)");
    println!(
        "{:<44} {:>10} {:>10} {:>8} {:>12}",
        "run", "events", "delivered", "lost", "flows/s"
    );
    let report = |name: &str, total: u64, (t, delivered, lost): (Duration, u64, u64)| {
        println!(
            "{name:<44} {total:>10} {delivered:>10} {lost:>8} {:>12.0}",
            delivered as f64 / t.as_secs_f64()
        );
    };
    let cpu0 = events_cpu_time();
    let paced = run(&p, &mut progs, &packet, 1_000_000, 200_000);
    let per_flow = (events_cpu_time() - cpu0).as_secs_f64() * 1e6 / paced.1.max(1) as f64;
    report("paced 200k/s, 5 s, no subscriber", 1_000_000, paced);
    println!("  events thread: {per_flow:.2} us CPU per flow (decode, enrich, metrics, ring)");
    report(
        "unpaced (kernel's full rate), no subscriber",
        2_000_000,
        run(&p, &mut progs, &packet, 2_000_000, 0),
    );

    let (t, delivered, cpu) = run_l7(&p, 500_000);
    println!(
        "{:<44} {:>10} {delivered:>10} {:>8} {:>12.0}   ({:.2} us CPU per flow)",
        "L7 proxy records (HTTP request + response)",
        1_000_000,
        1_000_000 - delivered,
        delivered as f64 / t.as_secs_f64(),
        cpu.as_secs_f64() * 1e6 / delivered.max(1) as f64
    );

    let stop = Arc::new(AtomicBool::new(false));
    let (matched, flost) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let f = follower(
        p.observer.clone(),
        stop.clone(),
        matched.clone(),
        flost.clone(),
    );
    std::thread::sleep(Duration::from_millis(100));
    report(
        "paced 200k/s, 5 s, follower with a filter",
        1_000_000,
        run(&p, &mut progs, &packet, 1_000_000, 200_000),
    );
    std::thread::sleep(Duration::from_millis(300));
    stop.store(true, Ordering::Relaxed);
    let _ = f.join();
    println!(
        "  follower: {} matched, {} lost to ring overwrites (every flow accounted for: {})",
        matched.load(Ordering::Relaxed),
        flost.load(Ordering::Relaxed),
        matched.load(Ordering::Relaxed) + flost.load(Ordering::Relaxed) == 1_000_000
    );

    // GetFlows throughput: one client draining the full ring over gRPC.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;
    let backend = Arc::new(ObserverBackend(p.observer.clone()));
    rt.spawn(async move {
        let _ = hubble::server::router(backend)
            .await
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await;
    });
    // The server's own rate: a client that takes each response as bytes
    // (its fields skipped, the flow not decoded), as a relay forwarding
    // them would. The first pass over the ring is cold (each flow is
    // converted and encoded once, on first read), the next ones warm.
    let mask = |paths: &[&str]| {
        Some(prost_types::FieldMask {
            paths: paths.iter().map(|p| p.to_string()).collect(),
        })
    };
    let drops = vec![proto::flow::FlowFilter {
        event_type: vec![proto::flow::EventTypeFilter {
            r#type: 1,
            ..Default::default()
        }],
        ..Default::default()
    }];
    // What `hubble observe` asks by default, `--last 20`, of a full ring
    // no one has read yet: only the 20 flows sent are converted.
    let (n, t) = rt.block_on(async move {
        let mut client = observer_client(addr).await?;
        let start = Instant::now();
        let request = proto::observer::GetFlowsRequest {
            number: 20,
            ..Default::default()
        };
        let total = count_flows(&mut client, request).await?;
        Ok::<_, anyhow::Error>((total, start.elapsed()))
    })?;
    println!(
        "GetFlows --last 20 (hubble observe's default) of a cold full ring: {n} flows in {:.1} ms",
        t.as_secs_f64() * 1e3
    );
    let runs = [
        ("whole flows, cold ring (first read)", 1, vec![], None),
        ("whole flows, warm ring", 4, vec![], None),
        ("filter event type drop (half the ring)", 4, drops, None),
        (
            "field mask time,verdict,source.pod_name,destination.pod_name,l4",
            4,
            vec![],
            mask(&[
                "time",
                "verdict",
                "source.pod_name",
                "destination.pod_name",
                "l4",
            ]),
        ),
    ];
    for (what, passes, whitelist, field_mask) in runs {
        let (n, t) = rt.block_on(async move {
            let channel = channel(addr).await?;
            let mut grpc = tonic::client::Grpc::new(channel);
            let start = Instant::now();
            let mut total = 0u64;
            for _ in 0..passes {
                grpc.ready().await?;
                let codec = tonic_prost::ProstCodec::<
                    proto::observer::GetFlowsRequest,
                    hubble::entry::Encoded,
                >::default();
                let path = tonic::codegen::http::uri::PathAndQuery::from_static(
                    "/observer.Observer/GetFlows",
                );
                let request = tonic::Request::new(proto::observer::GetFlowsRequest {
                    number: u64::MAX,
                    whitelist: whitelist.clone(),
                    field_mask: field_mask.clone(),
                    ..Default::default()
                });
                let mut s = grpc
                    .server_streaming(request, path, codec)
                    .await?
                    .into_inner();
                while s.message().await?.is_some() {
                    total += 1;
                }
            }
            Ok::<_, anyhow::Error>((total, start.elapsed()))
        })?;
        println!(
            "GetFlows to one client (responses not decoded), {what}: {n} flows in {:.2} s = {:.0} flows/s",
            t.as_secs_f64(),
            n as f64 / t.as_secs_f64()
        );
    }
    // Clients that decode every flow (as the CLI does): whole flows, then
    // with the CLI's usual kind of field mask.
    for (what, paths) in [
        ("whole flows", vec![]),
        (
            "field mask time,verdict,source.pod_name,destination.pod_name,l4",
            [
                "time",
                "verdict",
                "source.pod_name",
                "destination.pod_name",
                "l4",
            ]
            .map(String::from)
            .to_vec(),
        ),
    ] {
        let (n, t) = rt.block_on(async move {
            let mut client = observer_client(addr).await?;
            let start = Instant::now();
            let mut total = 0u64;
            for _ in 0..4 {
                let request = proto::observer::GetFlowsRequest {
                    number: u64::MAX,
                    field_mask: (!paths.is_empty()).then(|| prost_types::FieldMask {
                        paths: paths.clone(),
                    }),
                    ..Default::default()
                };
                total += count_flows(&mut client, request).await?;
            }
            Ok::<_, anyhow::Error>((total, start.elapsed()))
        })?;
        println!(
            "GetFlows to one client, {what}: {n} flows in {:.2} s = {:.0} flows/s",
            t.as_secs_f64(),
            n as f64 / t.as_secs_f64()
        );
    }
    Ok(())
}

/// A decoding Observer client (as the CLI is) of the server at `addr`.
async fn observer_client(
    addr: std::net::SocketAddr,
) -> anyhow::Result<proto::observer::observer_client::ObserverClient<tonic::transport::Channel>> {
    Ok(proto::observer::observer_client::ObserverClient::new(
        channel(addr).await?,
    ))
}

/// A connection to the server at `addr`.
async fn channel(addr: std::net::SocketAddr) -> anyhow::Result<tonic::transport::Channel> {
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?;
    Ok(endpoint.connect().await?)
}

/// The flows one GetFlows call answers with.
async fn count_flows(
    client: &mut proto::observer::observer_client::ObserverClient<tonic::transport::Channel>,
    request: proto::observer::GetFlowsRequest,
) -> anyhow::Result<u64> {
    let mut s = client.get_flows(request).await?.into_inner();
    let mut total = 0;
    while s.message().await?.is_some() {
        total += 1;
    }
    Ok(total)
}
