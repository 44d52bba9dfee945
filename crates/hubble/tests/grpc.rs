//! The observer API served for real and called with a real gRPC client
//! (tonic, the project's own protos) over TCP loopback (and, for the authority rewrite, raw HTTP/2 over a Unix socket).

use std::sync::Arc;
use std::time::Duration;

use fibril_hubble::entry::FlowEntry;
use fibril_hubble::limits::Limits;
use fibril_hubble::server::{self, Backend};
use flow::ring::Shared;
use proto::flow as pb;
use proto::observer::observer_client::ObserverClient;
use proto::observer::{
    get_flows_response::ResponseTypes, GetFlowsRequest, GetFlowsResponse, GetNodesRequest,
    ServerStatusRequest,
};

struct TestBackend {
    flows: Shared<Arc<FlowEntry>>,
    events: Shared<Arc<flow::agent_event::AgentEvent>>,
    /// While set, readers park before touching the ring: a slow reader.
    paused: std::sync::atomic::AtomicBool,
    kernel_lost: std::sync::atomic::AtomicU64,
}

impl Backend for TestBackend {
    fn oldest_seq(&self) -> u64 {
        self.flows.oldest_seq()
    }
    fn next_seq(&self) -> u64 {
        self.flows.next_seq()
    }
    fn read(&self, seq: u64, wait: Duration) -> (u64, Vec<Arc<FlowEntry>>, u64) {
        while self.paused.load(std::sync::atomic::Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(1));
        }
        self.flows.read(seq, wait)
    }
    fn agent_events(&self) -> &Shared<Arc<flow::agent_event::AgentEvent>> {
        &self.events
    }
    fn kernel_lost(&self) -> u64 {
        self.kernel_lost.load(std::sync::atomic::Ordering::SeqCst)
    }
    fn counters(&self) -> (u64, u64, u64, u64) {
        let (n, cap, seen) = self.flows.counts();
        (n as u64, cap as u64, seen, 42)
    }
    fn node_name(&self) -> String {
        "test-node".into()
    }
    fn address(&self) -> String {
        "127.0.0.1:4244".into()
    }
}

/// Flow number `i`: from pod client-i to server, DROPPED when i is odd.
fn flow(i: u64) -> flow::Flow {
    let json = format!(
        r#"{{"time":"{}","uuid":"u{i}","verdict":"{}","IP":{{"source":"10.0.0.{}","destination":"10.0.1.1","ipVersion":"IPv4"}},"l4":{{"TCP":{{"source_port":{},"destination_port":8080,"flags":{{"SYN":true}}}}}},"source":{{"identity":300,"namespace":"shop","pod_name":"client-{i}"}},"destination":{{"identity":301,"namespace":"shop","pod_name":"server"}},"Type":"L3_L4","node_name":"test-node","event_type":{{"type":4}},"is_reply":false,"Summary":"TCP Flags: SYN"}}"#,
        flow::record::rfc3339(1_768_471_200_000_000_000 + i * 1_000_000_000),
        if i % 2 == 1 { "DROPPED" } else { "FORWARDED" },
        i % 250,
        40000 + i
    );
    serde_json::from_str(&json).unwrap()
}

struct Fixture {
    backend: Arc<TestBackend>,
    client: ObserverClient<tonic::transport::Channel>,
    channel: tonic::transport::Channel,
    addr: std::net::SocketAddr,
    _rt: tokio::runtime::Runtime,
    rt: tokio::runtime::Handle,
}

fn fixture(capacity: usize, flows: u64) -> Fixture {
    fixture_with(capacity, flows, None)
}

/// A fixture whose server runs under `limits` (its connections through
/// `limits::incoming`), or as `router` serves when `None`.
fn fixture_with(capacity: usize, flows: u64, limits: Option<Limits>) -> Fixture {
    let backend = Arc::new(TestBackend {
        flows: Shared::new(capacity).unwrap(),
        events: Shared::new(15).unwrap(),
        paused: false.into(),
        kernel_lost: 0.into(),
    });
    for i in 0..flows {
        backend.flows.push(Arc::new(FlowEntry::new(flow(i))));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    let b = backend.clone();
    rt.spawn(async move {
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
        match limits {
            Some(limits) => server::router_plain(b, limits)
                .await
                .serve_with_incoming(fibril_hubble::limits::incoming(incoming, limits))
                .await
                .unwrap(),
            None => server::router(b)
                .await
                .serve_with_incoming(incoming)
                .await
                .unwrap(),
        }
    });
    let channel = rt
        .block_on(
            tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect(),
        )
        .unwrap();
    let handle = rt.handle().clone();
    Fixture {
        backend,
        client: ObserverClient::new(channel.clone()),
        channel,
        addr,
        _rt: rt,
        rt: handle,
    }
}

impl Fixture {
    fn get(&mut self, req: GetFlowsRequest) -> Result<Vec<GetFlowsResponse>, tonic::Status> {
        let mut client = self.client.clone();
        self.rt.block_on(async move {
            let mut stream = client.get_flows(req).await?.into_inner();
            let mut out = Vec::new();
            while let Some(r) = stream.message().await? {
                out.push(r);
            }
            Ok(out)
        })
    }
}

fn uuids(rs: &[GetFlowsResponse]) -> Vec<String> {
    rs.iter()
        .filter_map(|r| match &r.response_types {
            Some(ResponseTypes::Flow(f)) => Some(f.uuid.clone()),
            _ => None,
        })
        .collect()
}

#[test]
fn health_status_nodes_and_the_version_header() {
    let mut fx = fixture(15, 5);
    let mut health = tonic_health::pb::health_client::HealthClient::new(fx.channel.clone());
    let status = fx
        .rt
        .block_on(health.check(tonic_health::pb::HealthCheckRequest {
            service: "hubble.server.Observer".into(),
        }))
        .unwrap();
    assert_eq!(
        status.into_inner().status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
    let resp = fx
        .rt
        .block_on(fx.client.server_status(ServerStatusRequest {}))
        .unwrap();
    assert_eq!(
        resp.metadata().get("hubble-server-version").unwrap(),
        server::API_VERSION
    );
    let s = resp.into_inner();
    assert_eq!(
        (s.num_flows, s.max_flows, s.seen_flows, s.uptime_ns),
        (5, 15, 5, 42)
    );
    let nodes = fx
        .rt
        .block_on(fx.client.get_nodes(GetNodesRequest {}))
        .unwrap()
        .into_inner()
        .nodes;
    assert_eq!(nodes[0].name, "test-node");
    assert_eq!(nodes[0].num_flows, 5);
}

#[test]
fn get_flows_number_first_since_until_and_filters() {
    let mut fx = fixture(31, 10);
    let all = |n: u64| GetFlowsRequest {
        number: n,
        ..Default::default()
    };
    assert_eq!(
        uuids(&fx.get(all(3)).unwrap()),
        ["u7", "u8", "u9"],
        "the last N, oldest first"
    );
    assert_eq!(
        uuids(&fx.get(all(0)).unwrap()).len(),
        10,
        "0 = everything buffered"
    );
    let first = GetFlowsRequest {
        number: 2,
        first: true,
        ..Default::default()
    };
    assert_eq!(uuids(&fx.get(first).unwrap()), ["u0", "u1"]);
    let dropped = pb::FlowFilter {
        verdict: vec![pb::Verdict::Dropped as i32],
        ..Default::default()
    };
    let req = GetFlowsRequest {
        number: 2,
        whitelist: vec![dropped.clone()],
        ..Default::default()
    };
    assert_eq!(
        uuids(&fx.get(req).unwrap()),
        ["u7", "u9"],
        "the last N matching"
    );
    let req = GetFlowsRequest {
        blacklist: vec![dropped],
        ..Default::default()
    };
    assert_eq!(uuids(&fx.get(req).unwrap()), ["u0", "u2", "u4", "u6", "u8"]);
    let ts = |i: i64| prost_types::Timestamp {
        seconds: 1_768_471_200 + i,
        nanos: 0,
    };
    let req = GetFlowsRequest {
        since: Some(ts(3)),
        until: Some(ts(5)),
        ..Default::default()
    };
    assert_eq!(uuids(&fx.get(req).unwrap()), ["u3", "u4", "u5"]);
    let pod = pb::FlowFilter {
        source_pod: vec!["shop/client-4".into()],
        ..Default::default()
    };
    let req = GetFlowsRequest {
        whitelist: vec![pod],
        ..Default::default()
    };
    let got = fx.get(req).unwrap();
    assert_eq!(uuids(&got), ["u4"]);
    assert_eq!(got[0].node_name, "test-node");
    assert!(got[0].time.is_some());

    let err = fx
        .get(GetFlowsRequest {
            first: true,
            follow: true,
            ..Default::default()
        })
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert_eq!(err.message(), "first cannot be specified with follow");
    let bad = pb::FlowFilter {
        source_ip: vec!["10.0.0.0/99".into()],
        ..Default::default()
    };
    let err = fx
        .get(GetFlowsRequest {
            whitelist: vec![bad],
            ..Default::default()
        })
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("source_ip"), "{}", err.message());
}

/// `field_mask` (the CLI's `--field-mask`): flows carry only the named
/// fields, filters still see whole flows, and an unknown path is refused.
#[test]
fn field_masks_keep_only_the_named_fields() {
    let mut fx = fixture(31, 10);
    let mask = |paths: &[&str]| {
        Some(prost_types::FieldMask {
            paths: paths.iter().map(|p| p.to_string()).collect(),
        })
    };
    let req = GetFlowsRequest {
        number: 3,
        whitelist: vec![pb::FlowFilter {
            source_pod: vec!["shop/client-4".into()],
            ..Default::default()
        }],
        field_mask: mask(&["verdict", "source.pod_name"]),
        ..Default::default()
    };
    let got = fx.get(req).unwrap();
    let flows: Vec<&pb::Flow> = got
        .iter()
        .filter_map(|r| match &r.response_types {
            Some(ResponseTypes::Flow(f)) => Some(f),
            _ => None,
        })
        .collect();
    assert_eq!(flows.len(), 1);
    let want = pb::Flow {
        verdict: flows[0].verdict,
        source: Some(pb::Endpoint {
            pod_name: "client-4".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    assert_eq!(*flows[0], want);
    assert_ne!(want.verdict, 0);
    // The response keeps the flow's time and node.
    assert_eq!(got[0].node_name, "test-node");
    assert!(got[0].time.is_some());
    let err = fx
        .get(GetFlowsRequest {
            field_mask: mask(&["source.nope"]),
            ..Default::default()
        })
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("nope"), "{}", err.message());
}

#[test]
fn follow_streams_new_flows_and_readers_learn_what_they_lost() {
    let fx = fixture(7, 3);
    let mut client = fx.client.clone();
    let backend = fx.backend.clone();
    let got: Vec<GetFlowsResponse> = fx.rt.block_on(async move {
        let req = GetFlowsRequest {
            follow: true,
            ..Default::default()
        };
        let mut stream = client.get_flows(req).await.unwrap().into_inner();
        // Only flows arriving after the call.
        tokio::time::sleep(Duration::from_millis(100)).await;
        backend.flows.push(Arc::new(FlowEntry::new(flow(100))));
        let first = stream.message().await.unwrap().unwrap();
        let mut out = vec![first];
        // Overrun the 7-entry ring while the reader is parked (its current
        // wait times out first): 20 flows, of which 13 are overwritten.
        backend
            .paused
            .store(true, std::sync::atomic::Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(400)).await;
        for i in 200..220 {
            backend.flows.push(Arc::new(FlowEntry::new(flow(i))));
        }
        backend
            .paused
            .store(false, std::sync::atomic::Ordering::SeqCst);
        while out.len() < 9 {
            match tokio::time::timeout(Duration::from_secs(5), stream.message()).await {
                Ok(Ok(Some(r))) => out.push(r),
                other => panic!("stream ended early: {other:?}"),
            }
        }
        out
    });
    assert_eq!(uuids(&got[..1]), ["u100"]);
    let lost: u64 = got
        .iter()
        .filter_map(|r| match &r.response_types {
            Some(ResponseTypes::LostEvents(l)) => {
                assert_eq!(l.source, pb::LostEventSource::HubbleRingBuffer as i32);
                Some(l.num_events_lost)
            }
            _ => None,
        })
        .sum();
    let delivered = uuids(&got[1..]).len() as u64;
    assert_eq!(
        (lost, delivered),
        (13, 7),
        "every flow is delivered or counted as lost"
    );
    assert_eq!(
        uuids(&got[2..]),
        (213..220).map(|i| format!("u{i}")).collect::<Vec<_>>()
    );
}

#[test]
fn agent_events_stream_with_their_notifications() {
    use flow::agent_event::{AgentEvent, Kind};
    use proto::observer::GetAgentEventsRequest;
    let fx = fixture(7, 0);
    fx.backend.events.push(Arc::new(AgentEvent {
        time_ns: 1_000_000_000,
        kind: Kind::AgentStarted,
    }));
    fx.backend.events.push(Arc::new(AgentEvent {
        time_ns: 2_000_000_000,
        kind: Kind::EndpointCreated {
            id: 7,
            namespace: "shop".into(),
            pod: "web".into(),
            labels: vec!["k8s:app=web".into()],
        },
    }));
    fx.backend.events.push(Arc::new(AgentEvent {
        time_ns: 3_000_000_000,
        kind: Kind::IpcacheUpserted {
            cidr: "10.9.0.7/32".into(),
            identity: 1234,
            old_identity: Some(1200),
            namespace: "shop".into(),
            pod: "web".into(),
        },
    }));
    let mut client = fx.client.clone();
    let got = fx.rt.block_on(async move {
        let mut s = client
            .get_agent_events(GetAgentEventsRequest {
                number: 10,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let mut out = Vec::new();
        while let Some(r) = s.message().await.unwrap() {
            out.push(r);
        }
        out
    });
    assert_eq!(got.len(), 3);
    let types: Vec<i32> = got
        .iter()
        .map(|r| r.agent_event.as_ref().unwrap().r#type)
        .collect();
    assert_eq!(
        types,
        vec![
            pb::AgentEventType::AgentStarted as i32,
            pb::AgentEventType::EndpointCreated as i32,
            pb::AgentEventType::IpcacheUpserted as i32
        ]
    );
    let Some(pb::agent_event::Notification::IpcacheUpdate(c)) =
        &got[2].agent_event.as_ref().unwrap().notification
    else {
        panic!("an ipcache notification")
    };
    assert_eq!(
        (
            c.cidr.as_str(),
            c.identity,
            c.old_identity,
            c.pod_name.as_str()
        ),
        ("10.9.0.7/32", 1234, Some(1200), "web")
    );
    let Some(pb::agent_event::Notification::EndpointUpdate(n)) =
        &got[1].agent_event.as_ref().unwrap().notification
    else {
        panic!("an endpoint notification")
    };
    assert_eq!(
        (n.id, n.pod_name.as_str(), n.namespace.as_str()),
        (7, "web", "shop")
    );
    assert_eq!(got[1].node_name, "test-node");
    assert_eq!(got[1].time.unwrap().seconds, 2);
}

/// The request bytes the real hubble CLI sends (spec §4), decoded with
/// Fibril's protos and served: field numbers, packing and defaults agree.
#[test]
fn the_real_clis_request_bytes_decode_and_are_served() {
    use prost::Message;
    // The default field mask the CLI sends with compact output (field 10).
    let paths = [
        "time",
        "verdict",
        "ethernet",
        "IP",
        "l4",
        "source.identity",
        "source.namespace",
        "source.pod_name",
        "destination.identity",
        "destination.namespace",
        "destination.pod_name",
        "Type",
        "node_name",
        "l7",
        "event_type",
        "source_service",
        "destination_service",
        "is_reply",
        "Summary",
        "ip_trace_id",
    ];
    let mut mask = Vec::new();
    for p in paths {
        mask.push(0x0a);
        mask.push(p.len() as u8);
        mask.extend_from_slice(p.as_bytes());
    }
    let with_mask = |head: &[u8]| {
        let mut b = head.to_vec();
        b.push(0x52);
        // varint length (fits two bytes here)
        let n = mask.len();
        b.extend_from_slice(&[(n as u8 & 0x7f) | 0x80, (n >> 7) as u8]);
        b.extend_from_slice(&mask);
        b
    };
    assert_eq!(mask.len(), 0xfe, "the spec's capture says 52 fe01");
    let observe = with_mask(&[0x08, 0x14]);
    let first2 = with_mask(&[0x08, 0x02, 0x48, 0x01]);
    let follow_dropped = with_mask(&[0x18, 0x01, 0x32, 0x03, 0x2a, 0x01, 0x02]);
    let last3: Vec<u8> = vec![0x08, 0x03];
    let mut all = vec![
        0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01, 0x52, 0x0f, 0x0a, 0x04,
    ];
    all.extend_from_slice(b"time");
    all.extend_from_slice(&[0x0a, 0x07]);
    all.extend_from_slice(b"verdict");

    let decode = |b: &[u8]| GetFlowsRequest::decode(b).expect("decodes");
    let r = decode(&observe);
    assert_eq!(r.number, 20);
    assert_eq!(r.field_mask.as_ref().unwrap().paths.len(), 20);
    let r = decode(&first2);
    assert!(r.first && r.number == 2);
    let r = decode(&follow_dropped);
    assert!(r.follow && r.number == 0);
    assert_eq!(
        r.whitelist[0].verdict,
        vec![pb::Verdict::Dropped as i32],
        "packed repeated enum"
    );
    assert_eq!(decode(&last3).number, 3);
    let r = decode(&all);
    assert_eq!(r.number, u64::MAX);
    assert_eq!(r.field_mask.unwrap().paths, vec!["time", "verdict"]);

    // Served as the CLI expects, its field mask applied as Hubble does: the
    // fields it prints come back, others (the UUID) do not.
    let mut fx = fixture(31, 25);
    let pods = |rs: &[GetFlowsResponse]| -> Vec<String> {
        rs.iter()
            .filter_map(|r| match &r.response_types {
                Some(ResponseTypes::Flow(f)) => {
                    assert!(f.uuid.is_empty() && f.time.is_some(), "{f:?}");
                    f.source.as_ref().map(|s| s.pod_name.clone())
                }
                _ => None,
            })
            .collect()
    };
    assert_eq!(pods(&fx.get(decode(&observe)).unwrap()).len(), 20);
    assert_eq!(
        pods(&fx.get(decode(&first2)).unwrap()),
        ["client-0", "client-1"]
    );
    // No mask: whole flows.
    assert_eq!(
        uuids(&fx.get(decode(&last3)).unwrap()),
        ["u22", "u23", "u24"]
    );
    let all = fx.get(decode(&all)).unwrap();
    assert_eq!(all.len(), 25);
    assert!(all.iter().all(|r| match &r.response_types {
        Some(ResponseTypes::Flow(f)) => f.source.is_none() && f.verdict != 0,
        _ => false,
    }));
}

#[test]
fn tls_and_mutual_tls() {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let issue = |names: Vec<String>| {
        let key = KeyPair::generate().unwrap();
        let cert = CertificateParams::new(names)
            .unwrap()
            .signed_by(&key, &ca)
            .unwrap();
        (cert.pem(), key.serialize_pem())
    };
    let (server_cert, server_key) = issue(vec!["localhost".into()]);
    let (client_cert, client_key) = issue(vec!["client".into()]);
    let tls = server::Tls {
        cert_pem: server_cert.into_bytes(),
        key_pem: server_key.into_bytes(),
        client_ca_pem: Some(ca.pem().into_bytes()),
    };

    let backend = Arc::new(TestBackend {
        flows: Shared::new(7).unwrap(),
        events: Shared::new(7).unwrap(),
        paused: false.into(),
        kernel_lost: 0.into(),
    });
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt
        .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
        .unwrap();
    let addr = listener.local_addr().unwrap();
    rt.spawn(async move {
        server::router_with_tls(backend, Some(&tls))
            .await
            .unwrap()
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .unwrap();
    });
    let ca_pem = ca.pem();
    let status = |client_identity: Option<(String, String)>, tls: bool| {
        let ca_pem = ca_pem.clone();
        rt.block_on(async move {
            let scheme = if tls { "https" } else { "http" };
            // The address, not `localhost`: no name lookup on a blocking
            // thread (the certificate's name is given to TLS below).
            let mut ep = tonic::transport::Endpoint::from_shared(format!(
                "{scheme}://127.0.0.1:{}",
                addr.port()
            ))
            .unwrap()
            .connect_timeout(std::time::Duration::from_secs(10))
            .timeout(std::time::Duration::from_secs(10));
            if tls {
                let mut cfg = tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(ca_pem))
                    .domain_name("localhost");
                if let Some((c, k)) = client_identity {
                    cfg = cfg.identity(tonic::transport::Identity::from_pem(c, k));
                }
                ep = ep.tls_config(cfg).unwrap();
            }
            // Bounded: a refusal must come as an error, never as a hang.
            tokio::time::timeout(std::time::Duration::from_secs(30), async {
                let channel = ep.connect().await.map_err(|e| e.to_string())?;
                ObserverClient::new(channel)
                    .server_status(ServerStatusRequest {})
                    .await
                    .map(|r| r.into_inner().max_flows)
                    .map_err(|e| e.to_string())
            })
            .await
            .expect("the call neither succeeded nor failed within 30 s")
        })
    };
    assert_eq!(
        status(Some((client_cert.clone(), client_key.clone())), true),
        Ok(7),
        "mTLS with a client certificate"
    );
    assert!(
        status(None, true).is_err(),
        "no client certificate: refused"
    );
    assert!(status(None, false).is_err(), "plaintext: refused");
}

#[test]
fn kernel_losses_reach_followers_as_lost_events() {
    let fx = fixture(7, 0);
    fx.backend
        .kernel_lost
        .store(5, std::sync::atomic::Ordering::SeqCst);
    let mut client = fx.client.clone();
    let backend = fx.backend.clone();
    let lost = fx.rt.block_on(async move {
        let mut s = client
            .get_flows(GetFlowsRequest {
                follow: true,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        tokio::time::sleep(Duration::from_millis(100)).await;
        // Losses from before the stream started are not this stream's.
        backend
            .kernel_lost
            .fetch_add(42, std::sync::atomic::Ordering::SeqCst);
        let r = tokio::time::timeout(Duration::from_secs(5), s.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        match r.response_types {
            Some(ResponseTypes::LostEvents(l)) => (l.source, l.num_events_lost),
            other => panic!("{other:?}"),
        }
    });
    assert_eq!(lost, (pb::LostEventSource::PerfEventRingBuffer as i32, 42));
}

/// Connections past the limit are refused at once, idle ones are closed
/// (which frees their slots), and a connection whose stream waits for flows
/// is never idle; streams past the limit get RESOURCE_EXHAUSTED.
#[test]
fn connections_and_streams_are_bounded_and_idle_connections_closed() {
    use std::io::Read;
    let limits = Limits {
        max_connections: 3,
        max_per_client: 3,
        max_streams: 2,
        idle_timeout: Duration::from_millis(300),
    };
    let fx = fixture_with(15, 3, Some(limits));
    let addr = fx.addr;
    // The fixture's channel holds one slot: these two take the others.
    let raw: Vec<std::net::TcpStream> = (0..2)
        .map(|_| std::net::TcpStream::connect(addr).unwrap())
        .collect();
    let mut refused = std::net::TcpStream::connect(addr).unwrap();
    refused
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let n = refused.read(&mut [0u8; 64]).unwrap_or(0);
    assert_eq!(n, 0, "a connection past the limit is closed at once");
    // Silent connections are closed after the idle timeout.
    for mut c in raw {
        c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut buf = [0u8; 256];
        let mut total = 0;
        loop {
            match c.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => total += n, // the server's HTTP/2 preface
                Err(e) => panic!("an idle connection stayed open: {e} after {total} bytes"),
            }
        }
    }

    // Slots are free again (the fixture's idle connection went too: a new
    // channel): two follow streams, then a third is refused.
    let channel = fx
        .rt
        .block_on(
            tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
                .unwrap()
                .connect(),
        )
        .unwrap();
    let mut client = ObserverClient::new(channel);
    let follow = || GetFlowsRequest {
        follow: true,
        ..Default::default()
    };
    let (mut a, mut b) = fx.rt.block_on(async {
        let a = client.get_flows(follow()).await.unwrap().into_inner();
        let b = client.get_flows(follow()).await.unwrap().into_inner();
        (a, b)
    });
    let third = fx.rt.block_on(client.get_flows(follow()));
    assert_eq!(
        third.err().map(|e| e.code()),
        Some(tonic::Code::ResourceExhausted)
    );
    // Waiting for flows for three idle timeouts: the connection stays.
    fx.rt.block_on(async {
        for s in [&mut a, &mut b] {
            for _ in 0..3 {
                // The three flows in the ring come first.
                let _ = tokio::time::timeout(Duration::from_millis(50), s.message()).await;
            }
        }
        let waited = tokio::time::timeout(Duration::from_millis(900), a.message()).await;
        assert!(waited.is_err(), "the follow stream ended: {waited:?}");
    });
    drop((a, b));
    // Their slots come back once the streams' threads notice.
    let mut ok = false;
    for _ in 0..100 {
        if fx.rt.block_on(client.get_flows(follow())).is_ok() {
            ok = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(ok, "closed streams gave their slots back");
}

/// Filters past the bounds get RESOURCE_EXHAUSTED, bad ones
/// INVALID_ARGUMENT, and a glob made to backtrack is answered.
#[test]
fn abusive_filters_are_refused_or_cheap() {
    let mut fx = fixture(15, 5);
    let filter = |f: pb::FlowFilter| GetFlowsRequest {
        number: 5,
        whitelist: vec![f],
        ..Default::default()
    };
    let many = pb::FlowFilter {
        http_path: vec!["/api/.*".to_string(); fibril_hubble::filter::MAX_REGEXES + 1],
        ..Default::default()
    };
    assert_eq!(
        fx.get(filter(many)).unwrap_err().code(),
        tonic::Code::ResourceExhausted
    );
    let bad = pb::FlowFilter {
        http_path: vec!["(".into()],
        ..Default::default()
    };
    assert_eq!(
        fx.get(filter(bad)).unwrap_err().code(),
        tonic::Code::InvalidArgument
    );
    // 14 stars took the backtracking matcher 29 s of CPU per flow.
    let stars = pb::FlowFilter {
        node_name: vec![format!("{}x", "*a".repeat(14))],
        ..Default::default()
    };
    assert!(uuids(&fx.get(filter(stars)).unwrap()).is_empty());
}

/// A ServerStatus call in raw HTTP/2 over `path`, with `authority` as its
/// `:authority`: the call's grpc-status, or the code of the stream's reset.
fn raw_server_status(path: &std::path::Path, authority: &[u8]) -> Result<String, u32> {
    use std::io::{Read, Write};
    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut f = (payload.len() as u32).to_be_bytes()[1..].to_vec();
        f.extend_from_slice(&[kind, flags]);
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    }
    let mut conn = std::os::unix::net::UnixStream::connect(path).unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let headers: [(&[u8], &[u8]); 6] = [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", b"/observer.Observer/ServerStatus"),
        (b":authority", authority),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
    ];
    let block = loona_hpack::Encoder::new().encode(headers);
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(0x4, 0, 0, &[]));
    out.extend(frame(0x1, 0x4, 1, &block));
    out.extend(frame(0x0, 0x1, 1, &[0, 0, 0, 0, 0]));
    conn.write_all(&out).unwrap();
    let mut decoder = loona_hpack::Decoder::new();
    let mut fields = Vec::new();
    loop {
        let mut head = [0u8; 9];
        conn.read_exact(&mut head).unwrap();
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let mut payload = vec![0u8; len];
        conn.read_exact(&mut payload).unwrap();
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        match (head[3], stream) {
            (0x3, 1) => return Err(u32::from_be_bytes(payload[..4].try_into().unwrap())),
            (0x1, 1) => {
                fields.extend(decoder.decode(&payload).unwrap());
                if head[4] & 0x1 != 0 {
                    let status = fields.iter().find(|(n, _)| n == b"grpc-status");
                    return Ok(String::from_utf8_lossy(&status.unwrap().1).into_owned());
                }
            }
            _ => {}
        }
    }
}

/// grpc-java sends the socket's path as the authority, grpcio (since 1.57)
/// the path percent-encoded: on the Unix socket, behind `UnixAuthority`,
/// both are served, where the HTTP/2 server alone resets the stream.
#[test]
fn a_socket_path_as_authority_is_served_on_the_unix_socket() {
    use fibril_hubble::unix_authority::UnixAuthority;
    let fx = fixture(15, 3);
    let dir = std::env::temp_dir().join(test_support::unique_name("fibril-uds"));
    std::fs::create_dir_all(&dir).unwrap();
    struct Cleanup(std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            std::fs::remove_dir_all(&self.0).ok();
        }
    }
    let _cleanup = Cleanup(dir.clone());
    let serve = |name: &str, wrap: bool| {
        let path = dir.join(name);
        let _guard = fx.rt.enter();
        let listener = tokio::net::UnixListener::bind(&path).unwrap();
        let b = fx.backend.clone();
        fx.rt.spawn(async move {
            let accepted = tokio_stream::wrappers::UnixListenerStream::new(listener);
            let router = server::router_plain(b, Limits::default()).await;
            if wrap {
                let wrapped = tokio_stream::StreamExt::map(accepted, |c| c.map(UnixAuthority::new));
                router
                    .serve_with_incoming(fibril_hubble::limits::incoming(
                        wrapped,
                        Limits::default(),
                    ))
                    .await
            } else {
                router
                    .serve_with_incoming(fibril_hubble::limits::incoming(
                        accepted,
                        Limits::default(),
                    ))
                    .await
            }
        });
        path
    };
    let bare = serve("bare.sock", false);
    let fixed = serve("fixed.sock", true);
    let path = fixed.to_str().unwrap().as_bytes().to_vec();
    let encoded = fixed.to_str().unwrap().replace('/', "%2F").into_bytes();
    for authority in [&path[..], &encoded[..], b"localhost", b"127.0.0.1:4245"] {
        let shown = String::from_utf8_lossy(authority);
        assert_eq!(
            raw_server_status(&fixed, authority),
            Ok("0".into()),
            "{shown}"
        );
    }
    // The same requests without it: h2 resets them (PROTOCOL_ERROR).
    assert_eq!(raw_server_status(&bare, &path), Err(1));
    assert_eq!(raw_server_status(&bare, &encoded), Err(1));
    assert_eq!(raw_server_status(&bare, b"localhost"), Ok("0".into()));
}

/// Flows come out in event-time order, whatever order the ring got them
/// in (the proxy's L7 flows land a round after the datapath's of the same
/// moment): `--last N` is the N latest, `--first N` the N earliest.
#[test]
fn replies_are_in_event_time_order() {
    let mut fx = fixture(15, 0);
    for i in [0, 1, 3, 4, 2] {
        fx.backend.flows.push(Arc::new(FlowEntry::new(flow(i))));
    }
    let all = fx.get(GetFlowsRequest::default()).unwrap();
    assert_eq!(uuids(&all), ["u0", "u1", "u2", "u3", "u4"]);
    let last = fx
        .get(GetFlowsRequest {
            number: 3,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(uuids(&last), ["u2", "u3", "u4"]);
    let first = fx
        .get(GetFlowsRequest {
            number: 3,
            first: true,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(uuids(&first), ["u0", "u1", "u2"]);
}
