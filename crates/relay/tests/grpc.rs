//! The relay end to end over gRPC, against in-process `observer.Observer`
//! servers that stream flows with given times (the real agents and the
//! real hubble CLI are in `crates/cli/tests/relay_e2e.rs`): one node late
//! on purpose and nothing out of order, nodes that answer and nodes that
//! do not, windows across the cluster, a node joining a followed stream,
//! TLS and mTLS to the nodes.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use proto::observer::get_flows_response::ResponseTypes;
use proto::observer::observer_client::ObserverClient;
use proto::observer::observer_server::{Observer, ObserverServer};
use proto::observer::*;
use tokio_stream::wrappers::{ReceiverStream, TcpListenerStream};
use tonic::{Request, Response, Status};

type BoxStream<T> = Pin<Box<dyn tokio_stream::Stream<Item = Result<T, Status>> + Send>>;

/// A node that streams flows at `times` (ms after `base`), each after
/// `delay` and then `gap` between flows; `follow` keeps the stream open.
struct FakeNode {
    /// Its flows' times are `times` ms after this (ns since the epoch).
    base: u64,
    name: String,
    times: Vec<u64>,
    delay: Duration,
    gap: Duration,
}

/// Now, ns since the epoch: the nodes' flows are times in ms after a
/// test's start, live as the relay (which compares them with its clock)
/// expects.
fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

#[tonic::async_trait]
impl Observer for FakeNode {
    type GetFlowsStream = BoxStream<GetFlowsResponse>;
    type GetAgentEventsStream = BoxStream<GetAgentEventsResponse>;
    type GetDebugEventsStream = BoxStream<GetDebugEventsResponse>;

    async fn get_flows(
        &self,
        request: Request<GetFlowsRequest>,
    ) -> Result<Response<Self::GetFlowsStream>, Status> {
        let follow = request.into_inner().follow;
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let (name, times, delay, gap, base) = (
            self.name.clone(),
            self.times.clone(),
            self.delay,
            self.gap,
            self.base,
        );
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            for t in times {
                let ns = base + t * 1_000_000;
                let time = Some(prost_types::Timestamp {
                    seconds: (ns / 1_000_000_000) as i64,
                    nanos: (ns % 1_000_000_000) as i32,
                });
                let flow = proto::flow::Flow {
                    time,
                    node_name: name.clone(),
                    ..Default::default()
                };
                let r = GetFlowsResponse {
                    node_name: name.clone(),
                    time,
                    response_types: Some(ResponseTypes::Flow(flow)),
                };
                if tx.send(Ok(r)).await.is_err() {
                    return;
                }
                tokio::time::sleep(gap).await;
            }
            if follow {
                tx.closed().await;
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_agent_events(
        &self,
        _: Request<GetAgentEventsRequest>,
    ) -> Result<Response<Self::GetAgentEventsStream>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn get_debug_events(
        &self,
        _: Request<GetDebugEventsRequest>,
    ) -> Result<Response<Self::GetDebugEventsStream>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn get_nodes(
        &self,
        _: Request<GetNodesRequest>,
    ) -> Result<Response<GetNodesResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn get_namespaces(
        &self,
        _: Request<GetNamespacesRequest>,
    ) -> Result<Response<GetNamespacesResponse>, Status> {
        Err(Status::unimplemented("not in this test"))
    }

    async fn server_status(
        &self,
        _: Request<ServerStatusRequest>,
    ) -> Result<Response<ServerStatusResponse>, Status> {
        Ok(Response::new(ServerStatusResponse {
            num_flows: 1,
            max_flows: 10,
            seen_flows: 1,
            ..Default::default()
        }))
    }
}

/// Serves `service` on a loopback port of its own (over TLS when given);
/// its address.
async fn serve<S>(service: S, tls: Option<tonic::transport::ServerTlsConfig>) -> String
where
    S: tonic::codegen::Service<
            tonic::codegen::http::Request<tonic::body::Body>,
            Response = tonic::codegen::http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + tonic::server::NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        builder = builder.tls_config(tls).unwrap();
    }
    tokio::spawn(
        builder
            .add_service(service)
            .serve_with_incoming(TcpListenerStream::new(listener)),
    );
    address
}

type Client = ObserverClient<tonic::transport::Channel>;

/// The relay over `nodes` (and one node that does not exist); a client of
/// it, and its peers.
async fn relay_over(
    nodes: Vec<FakeNode>,
    drain: Duration,
) -> (Client, Arc<fibril_relay::peers::Peers>) {
    let peers = fibril_relay::peers::Peers::new(Duration::from_millis(500));
    for n in nodes {
        let name = n.name.clone();
        let address = serve(ObserverServer::new(n), None).await;
        peers.upsert(&name, &address).unwrap();
    }
    // Nothing listens there: a node that is down.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = closed.local_addr().unwrap().to_string();
    drop(closed);
    peers.upsert("gone", &dead).unwrap();
    let relay = fibril_relay::service::Relay::new(
        peers.clone(),
        fibril_relay::service::Timeouts {
            drain,
            request: Duration::from_secs(2),
        },
    );
    let address = serve(hubble::server::ObserverRoutes::new(Arc::new(relay)), None).await;
    let client = ObserverClient::connect(format!("http://{address}"))
        .await
        .unwrap();
    (client, peers)
}

/// Reads the stream until `flows` flows came: their times (ms after the
/// base) and the node status events.
async fn read(
    client: &mut ObserverClient<tonic::transport::Channel>,
    req: GetFlowsRequest,
    flows: usize,
    base: u64,
) -> (Vec<u64>, Vec<proto::relay::NodeStatusEvent>) {
    let mut stream = client.get_flows(req).await.unwrap().into_inner();
    let (mut times, mut status) = (Vec::new(), Vec::new());
    while times.len() < flows {
        let r = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("the relay kept the flows back")
            .unwrap()
            .expect("the stream ended early");
        match r.response_types {
            Some(ResponseTypes::Flow(f)) => {
                let t = f.time.unwrap();
                let ns = t.seconds as u64 * 1_000_000_000 + t.nanos as u64;
                times.push((ns - base) / 1_000_000);
            }
            Some(ResponseTypes::NodeStatus(s)) => status.push(s),
            _ => {}
        }
    }
    (times, status)
}

fn nodes(late: Duration, base: u64) -> Vec<FakeNode> {
    // Interleaved times; node c's stream starts late (its flows are as old
    // as the others', they only arrive after them).
    vec![
        FakeNode {
            base,
            name: "a".into(),
            times: (0..50).map(|i| i * 3).collect(),
            delay: Duration::ZERO,
            gap: Duration::from_millis(2),
        },
        FakeNode {
            base,
            name: "b".into(),
            times: (0..50).map(|i| i * 3 + 1).collect(),
            delay: Duration::ZERO,
            gap: Duration::from_millis(2),
        },
        FakeNode {
            base,
            name: "c".into(),
            times: (0..50).map(|i| i * 3 + 2).collect(),
            delay: late,
            gap: Duration::from_millis(2),
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_node_does_not_put_flows_out_of_order() {
    let base = now_ns();
    let (mut client, _) = relay_over(
        nodes(Duration::from_millis(300), base),
        Duration::from_secs(2),
    )
    .await;
    let (times, status) = read(&mut client, GetFlowsRequest::default(), 150, base).await;
    assert_eq!(
        times,
        (0..150).collect::<Vec<u64>>(),
        "every flow, in time order"
    );
    let connected = status
        .iter()
        .find(|s| s.state_change == proto::relay::NodeState::NodeConnected as i32)
        .expect("a CONNECTED status");
    assert_eq!(connected.node_names, ["a", "b", "c"]);
    let unavailable = status
        .iter()
        .find(|s| s.state_change == proto::relay::NodeState::NodeUnavailable as i32)
        .expect("an UNAVAILABLE status");
    assert_eq!(unavailable.node_names, ["gone"]);

    // Following: the same, live.
    let req = GetFlowsRequest {
        follow: true,
        ..Default::default()
    };
    let (times, _) = read(&mut client, req, 150, base).await;
    assert_eq!(
        times,
        (0..150).collect::<Vec<u64>>(),
        "following, in time order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn number_and_first_count_across_the_cluster() {
    let base = now_ns();
    let (mut client, _) = relay_over(nodes(Duration::ZERO, base), Duration::from_secs(2)).await;
    let last = GetFlowsRequest {
        number: 10,
        ..Default::default()
    };
    let (times, _) = read(&mut client, last, 10, base).await;
    assert_eq!(
        times,
        (140..150).collect::<Vec<u64>>(),
        "the cluster's last ten"
    );
    let first = GetFlowsRequest {
        number: 10,
        first: true,
        ..Default::default()
    };
    let (times, _) = read(&mut client, first, 10, base).await;
    assert_eq!(
        times,
        (0..10).collect::<Vec<u64>>(),
        "the cluster's first ten"
    );
    let both = GetFlowsRequest {
        first: true,
        follow: true,
        ..Default::default()
    };
    let err = client.get_flows(both).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_counts_the_nodes_that_answer() {
    let base = now_ns();
    let (mut client, _) = relay_over(nodes(Duration::ZERO, base), Duration::from_secs(2)).await;
    let s = client
        .server_status(ServerStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.num_connected_nodes, Some(3));
    assert_eq!(s.num_unavailable_nodes, Some(1));
    assert_eq!(s.unavailable_nodes, ["gone"]);
    assert_eq!((s.num_flows, s.max_flows), (3, 30));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_comes_later_joins_a_followed_stream() {
    let base = now_ns();
    let (mut client, peers) =
        relay_over(nodes(Duration::ZERO, base), Duration::from_millis(300)).await;
    let req = GetFlowsRequest {
        follow: true,
        ..Default::default()
    };
    let mut stream = client.get_flows(req).await.unwrap().into_inner();
    let late = FakeNode {
        base,
        name: "late".into(),
        times: (1000..1010).collect(),
        delay: Duration::ZERO,
        gap: Duration::from_millis(2),
    };
    peers
        .upsert("late", &serve(ObserverServer::new(late), None).await)
        .unwrap();
    let (mut times, mut joined) = (Vec::new(), false);
    while times.len() < 160 {
        let r = tokio::time::timeout(Duration::from_secs(10), stream.message())
            .await
            .expect("the late node's flows never came")
            .unwrap()
            .unwrap();
        match r.response_types {
            Some(ResponseTypes::Flow(f)) => {
                let t = f.time.unwrap();
                times.push((t.seconds as u64 * 1_000_000_000 + t.nanos as u64 - base) / 1_000_000);
            }
            Some(ResponseTypes::NodeStatus(s)) => {
                joined |= s.state_change == proto::relay::NodeState::NodeConnected as i32
                    && s.node_names == ["late"];
            }
            _ => {}
        }
    }
    assert!(joined, "a CONNECTED status for the node that joined");
    let expected: Vec<u64> = (0..150).chain(1000..1010).collect();
    assert_eq!(times, expected);
}

/// A CA of the test's own, issuing (certificate, key) PEMs for a name.
struct TestCa(rcgen::CertifiedIssuer<'static, rcgen::KeyPair>);

impl TestCa {
    fn new() -> TestCa {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        TestCa(CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap())
    }

    fn pem(&self) -> String {
        self.0.pem()
    }

    fn issue(&self, name: &str) -> (Vec<u8>, Vec<u8>) {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec![name.to_string()])
            .unwrap()
            .signed_by(&key, &self.0)
            .unwrap();
        (cert.pem().into_bytes(), key.serialize_pem().into_bytes())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nodes_over_tls_and_mutual_tls() {
    let ca = TestCa::new();
    let issue = |name: &str| ca.issue(name);
    // The node's certificate carries Hubble's name for node `a` of cluster
    // `prod`; it asks clients for a certificate of the same CA.
    let (cert, key) = issue("a.prod.hubble-grpc.cilium.io");
    let node_tls = tonic::transport::ServerTlsConfig::new()
        .identity(tonic::transport::Identity::from_pem(cert, key))
        .client_ca_root(tonic::transport::Certificate::from_pem(ca.pem()));
    let node = FakeNode {
        base: now_ns(),
        name: "a".into(),
        times: (0..5).collect(),
        delay: Duration::ZERO,
        gap: Duration::ZERO,
    };
    let address = serve(ObserverServer::new(node), Some(node_tls)).await;
    let relay_client = issue("relay.hubble-relay.cilium.io");
    let ask = |peer: &'static str, identity: Option<(Vec<u8>, Vec<u8>)>| {
        let (address, ca_pem) = (address.clone(), ca.pem().into_bytes());
        async move {
            let peers = fibril_relay::peers::Peers::with_tls(
                Duration::from_secs(2),
                Some(fibril_relay::peers::ClientTls { ca_pem, identity }),
            );
            peers.upsert(peer, &address).unwrap();
            let relay = fibril_relay::service::Relay::new(
                peers,
                fibril_relay::service::Timeouts {
                    drain: Duration::from_millis(200),
                    request: Duration::from_secs(3),
                },
            );
            let relay_address =
                serve(hubble::server::ObserverRoutes::new(Arc::new(relay)), None).await;
            let mut client = ObserverClient::connect(format!("http://{relay_address}"))
                .await
                .unwrap();
            let status = client
                .server_status(ServerStatusRequest {})
                .await
                .unwrap()
                .into_inner();
            let nodes = client
                .get_nodes(GetNodesRequest {})
                .await
                .unwrap()
                .into_inner()
                .nodes;
            (status, nodes)
        }
    };
    let (s, nodes) = ask("prod/a", Some(relay_client.clone())).await;
    assert_eq!((s.num_connected_nodes, s.num_flows), (Some(1), 1), "mTLS");
    let tls = nodes[0].tls.clone().unwrap();
    assert!(tls.enabled);
    assert_eq!(tls.server_name, "a.prod.hubble-grpc.cilium.io");
    // Without the relay's certificate the node refuses it.
    let (s, _) = ask("prod/a", None).await;
    assert_eq!(s.unavailable_nodes, ["prod/a"], "no client certificate");
    // A node whose certificate does not carry its name is refused.
    let (s, _) = ask("prod/b", Some(relay_client)).await;
    assert_eq!(
        s.unavailable_nodes,
        ["prod/b"],
        "another node's certificate"
    );
}

/// The peer service over mutual TLS, as Cilium's (agents' certificates
/// `*.<cluster>.hubble-grpc.cilium.io`, as its Helm chart makes them): the
/// relay finds the node through its `Notify` and reads it over TLS; the
/// same service refuses a relay without a certificate, and one that
/// expects another cluster is refused by the certificate's name.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn peers_found_through_the_peer_service_over_mutual_tls() {
    let ca = TestCa::new();
    let issue = |name: &str| ca.issue(name);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap().to_string();
    let mut node = hubble::server::RingBackend::new("prod/a", 63).unwrap();
    node.address = address.clone();
    for i in 0..3u64 {
        let f: flow::Flow = serde_json::from_value(serde_json::json!({
            "time": flow::record::rfc3339(now_ns() + i), "uuid": format!("u{i}"),
            "verdict": "FORWARDED", "Type": "L3_L4", "node_name": "a",
            "event_type": {"type": 4}, "Summary": "",
        }))
        .unwrap();
        node.flows.push(Arc::new(hubble::entry::FlowEntry::new(f)));
    }
    let (cert, key) = issue("*.prod.hubble-grpc.cilium.io");
    let router = hubble::server::router_with_tls(
        Arc::new(node),
        Some(&hubble::server::Tls {
            cert_pem: cert,
            key_pem: key,
            client_ca_pem: Some(ca.pem().into_bytes()),
        }),
    )
    .await
    .unwrap();
    tokio::spawn(router.serve_with_incoming(TcpListenerStream::new(listener)));
    let relay_cert = issue("relay.hubble-relay.cilium.io");
    let found = |identity: Option<(Vec<u8>, Vec<u8>)>, cluster: &'static str| {
        let (address, ca_pem) = (address.clone(), ca.pem().into_bytes());
        async move {
            let peers = fibril_relay::peers::Peers::with_tls(
                Duration::from_secs(2),
                Some(fibril_relay::peers::ClientTls { ca_pem, identity }),
            );
            let follow = tokio::spawn(fibril_relay::peers::follow(
                peers.clone(),
                vec![address],
                cluster.to_string(),
            ));
            let start = std::time::Instant::now();
            while peers.snapshot().is_empty() && start.elapsed() < Duration::from_secs(3) {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            follow.abort();
            peers
        }
    };
    let peers = found(Some(relay_cert.clone()), "prod").await;
    let names: Vec<String> = peers.snapshot().iter().map(|n| n.name.clone()).collect();
    assert_eq!(names, ["prod/a"], "announced over mTLS");
    let relay = fibril_relay::service::Relay::new(
        peers,
        fibril_relay::service::Timeouts {
            drain: Duration::from_millis(200),
            request: Duration::from_secs(3),
        },
    );
    let relay_address = serve(hubble::server::ObserverRoutes::new(Arc::new(relay)), None).await;
    let mut client = ObserverClient::connect(format!("http://{relay_address}"))
        .await
        .unwrap();
    let status = client
        .server_status(ServerStatusRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!((status.num_connected_nodes, status.num_flows), (Some(1), 3));
    assert!(
        found(None, "prod").await.snapshot().is_empty(),
        "no client certificate: the peer service refuses the relay"
    );
    assert!(
        found(Some(relay_cert), "staging")
            .await
            .snapshot()
            .is_empty(),
        "another cluster's name: the relay refuses the certificate"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ready_while_a_node_answers_alive_always() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    let peers = fibril_relay::peers::Peers::new(Duration::from_millis(300));
    let relay = Arc::new(fibril_relay::service::Relay::new(
        peers.clone(),
        fibril_relay::service::Timeouts {
            drain: Duration::from_millis(200),
            request: Duration::from_secs(1),
        },
    ));
    let address = serve(fibril_relay::service::health(relay).await, None).await;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let client = HealthClient::new(channel);
    let check = |service: &'static str| {
        let mut client = client.clone();
        async move {
            client
                .check(HealthCheckRequest {
                    service: service.into(),
                })
                .await
                .map(|r| r.into_inner().status)
        }
    };
    let wait_for = |service: &'static str, want: ServingStatus| async move {
        for _ in 0..50 {
            if check(service).await.ok() == Some(want as i32) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{service} never {want:?}");
    };
    // No node: alive, not ready.
    assert_eq!(check("").await.unwrap(), ServingStatus::Serving as i32);
    wait_for("hubble.server.Observer", ServingStatus::NotServing).await;
    // A node answers: ready.
    let node = FakeNode {
        base: now_ns(),
        name: "a".into(),
        times: vec![],
        delay: Duration::ZERO,
        gap: Duration::ZERO,
    };
    peers
        .upsert("a", &serve(ObserverServer::new(node), None).await)
        .unwrap();
    wait_for("hubble.server.Observer", ServingStatus::Serving).await;
    drop(client);
}
