//! The gRPC services: `observer.Observer`, `peer.Peer` and
//! `grpc.health.v1.Health` (SERVING for `hubble.server.Observer`), on a
//! Unix socket and on TCP, plaintext h2c as the hubble CLI speaks it.

use std::collections::{BTreeMap, BTreeSet};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use proto::flow as pb;
use proto::observer::observer_server::{Observer, ObserverServer};
use proto::observer::{
    GetAgentEventsRequest, GetAgentEventsResponse, GetDebugEventsRequest, GetDebugEventsResponse,
    GetFlowsRequest, GetFlowsResponse, GetNamespacesRequest, GetNamespacesResponse,
    GetNodesRequest, GetNodesResponse, Namespace, Node, ServerStatusRequest, ServerStatusResponse,
};
use proto::peer::peer_server::{Peer, PeerServer};
use proto::peer::{ChangeNotification, ChangeNotificationType, NotifyRequest};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use crate::convert;
use crate::entry::{Encoded, FlowEntry};
use crate::field_mask::FieldMask;
use crate::filter::{FilterError, Filters};
use crate::limits::{self, Limits, StreamSlot, Streams};

/// The Hubble API version Fibril speaks (the CLI warns when a server's minor
/// version is newer than its own).
pub const API_VERSION: &str = "1.19.0";

/// What the server reads flows and status from (the agent's observer).
pub trait Backend: Send + Sync + 'static {
    /// Sequence number of the oldest flow still in the ring.
    fn oldest_seq(&self) -> u64;
    /// Sequence number the next flow will get.
    fn next_seq(&self) -> u64;
    /// Flows from `seq` on (waiting up to `wait` when there are none), the
    /// number lost to overwrites before them, and the next sequence number.
    fn read(&self, seq: u64, wait: Duration) -> (u64, Vec<Arc<FlowEntry>>, u64);
    /// The agent events.
    fn agent_events(&self) -> &flow::ring::Shared<Arc<flow::agent_event::AgentEvent>>;
    /// (flows buffered, ring capacity, flows seen, uptime in ns).
    fn counters(&self) -> (u64, u64, u64, u64);
    fn node_name(&self) -> String;
    /// Told when a reader lost `n` flows to ring overwrites (for metrics).
    fn count_lost(&self, _n: u64) {}
    /// Events the kernel could not hand over (ring buffer full), so far.
    fn kernel_lost(&self) -> u64 {
        0
    }
    /// The address peers reach this node's observer at.
    fn address(&self) -> String;
    /// In a cluster: every node's Hubble address by peer name
    /// (`cluster/node`), this node's included, as it changes. `None`: this
    /// node alone.
    fn cluster_peers(&self) -> Option<tokio::sync::watch::Receiver<BTreeMap<String, String>>> {
        None
    }
}

pub struct Service<B: Backend> {
    backend: Arc<B>,
    streams: Arc<Streams>,
}

impl<B: Backend> Service<B> {
    /// A slot for one more stream of `req`'s connection, or
    /// RESOURCE_EXHAUSTED.
    fn stream_slot<T>(&self, req: &Request<T>) -> Result<StreamSlot, Status> {
        self.streams.open(limits::conn_state(req)).ok_or_else(|| {
            Status::resource_exhausted(format!(
                "too many streams open on this Hubble server (at most {}); try again later",
                self.streams.max()
            ))
        })
    }
}

fn filter_status(e: FilterError) -> Status {
    match e {
        FilterError::TooLarge(_) => Status::resource_exhausted(e.to_string()),
        _ => Status::invalid_argument(e.to_string()),
    }
}

pub type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// `first` reads from the oldest end of the buffer, `follow` waits at the
/// newest: Hubble refuses the two together.
pub fn check_window(first: bool, follow: bool) -> Result<(), Status> {
    if first && follow {
        return Err(Status::invalid_argument(
            "first cannot be specified with follow",
        ));
    }
    Ok(())
}

fn with_version<T>(mut r: Response<T>) -> Response<T> {
    if let Ok(v) = API_VERSION.parse() {
        r.metadata_mut().insert("hubble-server-version", v);
    }
    r
}

fn to_ns(t: &Option<prost_types::Timestamp>) -> Option<u64> {
    t.as_ref().map(convert::unix_ns)
}

fn lost(node: &str, n: u64) -> GetFlowsResponse {
    lost_from(node, pb::LostEventSource::HubbleRingBuffer, n)
}

fn lost_from(node: &str, source: pb::LostEventSource, n: u64) -> GetFlowsResponse {
    use proto::observer::get_flows_response::ResponseTypes;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    GetFlowsResponse {
        response_types: Some(ResponseTypes::LostEvents(pb::LostEvent {
            source: source as i32,
            num_events_lost: n,
            cpu: None,
            first: None,
            last: None,
        })),
        node_name: node.to_string(),
        time: Some(prost_types::Timestamp {
            seconds: now.as_secs() as i64,
            nanos: now.subsec_nanos() as i32,
        }),
    }
}

/// The number/first/follow/since/until window of a streaming request.
struct Window {
    number: usize,
    first: bool,
    follow: bool,
    since: Option<u64>,
    until: Option<u64>,
}

/// Streams a ring's entries through a window (on a blocking thread: the
/// ring is read with blocking waits); ends when done or when the client
/// goes away. `accept` turns an entry into (time, what to send) or rejects
/// it (filters); `finish` makes what is sent into the response (so that
/// work can wait until an entry is known to go out: `--last 20` of a full
/// ring); `lost` turns a count of overwritten entries into a response.
#[allow(clippy::too_many_arguments)]
fn run_window<T, P, R>(
    w: &Window,
    (oldest, next): (u64, u64),
    read: impl Fn(u64, Duration) -> (u64, Vec<T>, u64),
    accept: impl Fn(&T) -> Option<(u64, P)>,
    finish: impl Fn(P) -> R,
    lost: impl Fn(u64) -> Option<R>,
    elsewhere: impl Fn() -> Option<R>,
    tx: &mpsc::Sender<Vec<R>>,
) {
    // Responses go to the connection in batches (one channel hand-over per
    // `BATCH`, not per flow): flushed when full, when the history is out
    // and after each wait for live flows.
    let pending = std::cell::RefCell::new(Vec::with_capacity(BATCH));
    let flush = || {
        let batch = std::mem::replace(&mut *pending.borrow_mut(), Vec::with_capacity(BATCH));
        batch.is_empty() || tx.blocking_send(batch).is_ok()
    };
    let send = |r: R| {
        pending.borrow_mut().push(r);
        pending.borrow().len() < BATCH || flush()
    };
    let report = |n: u64| n == 0 || lost(n).is_none_or(&send);
    // History: the buffered entries, oldest first.
    let start = if w.follow && w.number == 0 && w.since.is_none() {
        next
    } else {
        oldest
    };
    let (lost_before, history, mut seq) = read(start, Duration::ZERO);
    if !report(lost_before) {
        return;
    }
    // In event-time order: the ring holds flows as they were made, and the
    // proxy's L7 flows arrive a round after the datapath's of the same
    // moment. Nearly sorted already, so the stable sort costs little.
    let mut window: Vec<(u64, P)> = history
        .iter()
        .filter_map(&accept)
        .filter(|(t, _)| w.since.is_none_or(|s| *t >= s) && w.until.is_none_or(|u| *t <= u))
        .collect();
    window.sort_by_key(|(t, _)| *t);
    // `number` 0: all of it; else the first or the last `number`.
    let (skip, take) = match (w.first, w.number) {
        (_, 0) => (0, usize::MAX),
        (true, n) => (0, n),
        (false, n) => (window.len().saturating_sub(n), n),
    };
    for (_, r) in window.into_iter().skip(skip).take(take) {
        if !send(finish(r)) {
            return;
        }
    }
    if !flush() || !w.follow {
        return;
    }
    // Live: everything new that is accepted, until the client cancels.
    loop {
        if tx.is_closed() {
            return;
        }
        let (lost_now, items, n) = read(seq, Duration::from_millis(250));
        seq = n;
        if !report(lost_now) {
            return;
        }
        // Losses upstream of the ring (the kernel's ring buffer).
        if let Some(r) = elsewhere() {
            if !send(r) {
                return;
            }
        }
        for item in items {
            if let Some((_, r)) = accept(&item).map(|(t, p)| (t, finish(p))) {
                if !send(r) {
                    return;
                }
            }
        }
        if !flush() {
            return;
        }
    }
}

/// Responses handed to the connection at once (see `run_window`).
const BATCH: usize = 128;

/// The responses of a stream's batches, one by one.
fn unbatch<R: Send + Unpin + 'static>(rx: mpsc::Receiver<Vec<R>>) -> BoxStream<R> {
    Box::pin(Unbatch {
        rx,
        current: Vec::new().into_iter(),
    })
}

struct Unbatch<R> {
    rx: mpsc::Receiver<Vec<R>>,
    current: std::vec::IntoIter<R>,
}

impl<R: Unpin> Stream for Unbatch<R> {
    type Item = Result<R, Status>;

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        use std::task::Poll;
        let this = self.get_mut();
        loop {
            if let Some(r) = this.current.next() {
                return Poll::Ready(Some(Ok(r)));
            }
            match this.rx.poll_recv(cx) {
                Poll::Ready(Some(batch)) => this.current = batch.into_iter(),
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// A flow on its way out: its response, or the entry whose response is
/// made when it is sent.
enum Pending {
    Entry(Arc<FlowEntry>),
    Ready(Encoded),
}

fn stream_flows<B: Backend>(
    backend: Arc<B>,
    req: GetFlowsRequest,
    filters: Filters,
    mask: Option<FieldMask>,
    tx: mpsc::Sender<Vec<Encoded>>,
) {
    let node = backend.node_name();
    let kernel_seen = std::sync::atomic::AtomicU64::new(backend.kernel_lost());
    let window = Window {
        number: req.number as usize,
        first: req.first,
        follow: req.follow,
        since: to_ns(&req.since),
        until: if req.follow { None } else { to_ns(&req.until) },
    };
    run_window(
        &window,
        (backend.oldest_seq(), backend.next_seq()),
        |seq, wait| backend.read(seq, wait),
        |f: &Arc<FlowEntry>| {
            // Nothing to decide on: the flow's wire form waits until it is
            // known to be sent (a cold ring's `--last 20` converts 20).
            if filters.is_empty() && mask.is_none() {
                return Some((f.time.unix_ns(), Pending::Entry(f.clone())));
            }
            if !filters.is_empty() && !filters.matches_record(f, || f.pb()) {
                return None;
            }
            // The response's time and node (and the stream's order) are the
            // flow's, whatever the mask keeps of it; unmasked, the response
            // every stream shares goes out as it was encoded.
            let response = match &mask {
                Some(m) => Encoded(f.masked(m)),
                None => Encoded(f.response()),
            };
            Some((f.ns(), Pending::Ready(response)))
        },
        |p| match p {
            Pending::Entry(f) => Encoded(f.response()),
            Pending::Ready(r) => r,
        },
        |n| {
            backend.count_lost(n);
            Some(Encoded::of(&lost(&node, n)))
        },
        || {
            // Kernel losses since the stream started, reported as they grow.
            let now = backend.kernel_lost();
            let before = kernel_seen.swap(now, std::sync::atomic::Ordering::Relaxed);
            (now > before).then(|| {
                Encoded::of(&lost_from(
                    &node,
                    pb::LostEventSource::PerfEventRingBuffer,
                    now - before,
                ))
            })
        },
        &tx,
    );
}

/// An Observer whose GetFlows responses are sent as bytes already encoded
/// (`Encoded`): the agent's ring encodes each flow once, the relay passes
/// on what the nodes sent. `ObserverRoutes` serves it.
#[tonic::async_trait]
pub trait EncodedFlows: Observer {
    async fn get_flows_encoded(
        &self,
        request: Request<GetFlowsRequest>,
    ) -> Result<Response<BoxStream<Encoded>>, Status>;
}

/// An encoded GetFlows stream decoded back into messages (the generated
/// route's GetFlows, which `ObserverRoutes` does not use).
pub fn decoded(encoded: Response<BoxStream<Encoded>>) -> Response<BoxStream<GetFlowsResponse>> {
    use prost::Message;
    let (meta, stream, ext) = encoded.into_parts();
    let decoded = tokio_stream::StreamExt::map(stream, |r| {
        r.and_then(|e| GetFlowsResponse::decode(e.0).map_err(|e| Status::internal(e.to_string())))
    });
    Response::from_parts(meta, Box::pin(decoded), ext)
}

#[tonic::async_trait]
impl<B: Backend> EncodedFlows for Service<B> {
    /// GetFlows with each response already encoded.
    async fn get_flows_encoded(
        &self,
        request: Request<GetFlowsRequest>,
    ) -> Result<Response<BoxStream<Encoded>>, Status> {
        let slot = self.stream_slot(&request)?;
        let req = request.into_inner();
        check_window(req.first, req.follow)?;
        // Regexes cost CPU to compile: off the runtime's threads.
        let (req, filters) = tokio::task::spawn_blocking(move || {
            let filters = Filters::new(&req.whitelist, &req.blacklist);
            (req, filters)
        })
        .await
        .map_err(|e| Status::internal(format!("compiling the filters: {e}")))?;
        let filters = filters.map_err(filter_status)?;
        let paths = req.field_mask.as_ref().map(|m| m.paths.as_slice());
        let mask = FieldMask::new(paths.unwrap_or_default()).map_err(filter_status)?;
        let (tx, rx) = mpsc::channel(8);
        let backend = self.backend.clone();
        std::thread::Builder::new()
            .name("hubble-getflows".into())
            .spawn(move || {
                let _slot = slot;
                stream_flows(backend, req, filters, mask, tx)
            })
            .map_err(|e| Status::internal(format!("cannot start the flow stream: {e}")))?;
        Ok(with_version(Response::new(unbatch(rx))))
    }
}

/// The Observer service as served: GetFlows sends the responses as they
/// were encoded (`EncodedFlows`), every other method is the generated
/// server's. Byte for byte what the generated GetFlows would send.
pub struct ObserverRoutes<S: EncodedFlows> {
    service: Arc<S>,
    generated: ObserverServer<S>,
}

impl<S: EncodedFlows> ObserverRoutes<S> {
    pub fn new(service: Arc<S>) -> Self {
        ObserverRoutes {
            generated: ObserverServer::from_arc(service.clone()),
            service,
        }
    }
}

impl<S: EncodedFlows> Clone for ObserverRoutes<S> {
    fn clone(&self) -> Self {
        ObserverRoutes {
            service: self.service.clone(),
            generated: self.generated.clone(),
        }
    }
}

impl<S: EncodedFlows> tonic::server::NamedService for ObserverRoutes<S> {
    const NAME: &'static str = "observer.Observer";
}

struct GetFlowsRoute<S>(Arc<S>);

impl<S: EncodedFlows> tonic::server::ServerStreamingService<GetFlowsRequest> for GetFlowsRoute<S> {
    type Response = Encoded;
    type ResponseStream = BoxStream<Encoded>;
    type Future = tonic::codegen::BoxFuture<Response<Self::ResponseStream>, Status>;

    fn call(&mut self, request: Request<GetFlowsRequest>) -> Self::Future {
        let service = self.0.clone();
        Box::pin(async move { service.get_flows_encoded(request).await })
    }
}

impl<S, Body> tonic::codegen::Service<tonic::codegen::http::Request<Body>> for ObserverRoutes<S>
where
    S: EncodedFlows,
    Body: tonic::codegen::Body + Send + 'static,
    Body::Error: Into<tonic::codegen::StdError> + Send + 'static,
{
    type Response = tonic::codegen::http::Response<tonic::body::Body>;
    type Error = std::convert::Infallible;
    type Future = tonic::codegen::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        tonic::codegen::Service::<tonic::codegen::http::Request<Body>>::poll_ready(
            &mut self.generated,
            cx,
        )
    }

    fn call(&mut self, req: tonic::codegen::http::Request<Body>) -> Self::Future {
        if req.uri().path() != "/observer.Observer/GetFlows" {
            return self.generated.call(req);
        }
        let method = GetFlowsRoute(self.service.clone());
        Box::pin(async move {
            let codec = tonic_prost::ProstCodec::<Encoded, GetFlowsRequest>::default();
            Ok(tonic::server::Grpc::new(codec)
                .server_streaming(method, req)
                .await)
        })
    }
}

#[tonic::async_trait]
impl<B: Backend> Observer for Service<B> {
    type GetFlowsStream = BoxStream<GetFlowsResponse>;
    type GetAgentEventsStream = BoxStream<GetAgentEventsResponse>;
    type GetDebugEventsStream = BoxStream<GetDebugEventsResponse>;

    /// The generated route's GetFlows (`ObserverRoutes` serves GetFlows
    /// itself): the same stream, decoded back into messages.
    async fn get_flows(
        &self,
        request: Request<GetFlowsRequest>,
    ) -> Result<Response<Self::GetFlowsStream>, Status> {
        Ok(decoded(self.get_flows_encoded(request).await?))
    }

    /// The same number/first/follow/since/until semantics as GetFlows,
    /// without filters.
    async fn get_agent_events(
        &self,
        request: Request<GetAgentEventsRequest>,
    ) -> Result<Response<Self::GetAgentEventsStream>, Status> {
        let slot = self.stream_slot(&request)?;
        let req = request.into_inner();
        check_window(req.first, req.follow)?;
        let (tx, rx) = mpsc::channel(4);
        let backend = self.backend.clone();
        std::thread::Builder::new()
            .name("hubble-agentevents".into())
            .spawn(move || {
                let _slot = slot;
                let node = backend.node_name();
                let events = backend.agent_events();
                let window = Window {
                    number: req.number as usize,
                    first: req.first,
                    follow: req.follow,
                    since: to_ns(&req.since),
                    until: if req.follow { None } else { to_ns(&req.until) },
                };
                run_window(
                    &window,
                    (events.oldest_seq(), events.next_seq()),
                    |seq, wait| events.read(seq, wait),
                    |e: &Arc<flow::agent_event::AgentEvent>| {
                        let time = Some(convert::timestamp(e.time_ns));
                        Some((
                            e.time_ns,
                            GetAgentEventsResponse {
                                agent_event: Some(convert::agent_event(e)),
                                node_name: node.clone(),
                                time,
                            },
                        ))
                    },
                    |r| r,
                    |_| None,
                    || None,
                    &tx,
                )
            })
            .map_err(|e| Status::internal(format!("cannot start the event stream: {e}")))?;
        Ok(with_version(Response::new(unbatch(rx))))
    }

    /// Fibril's datapath emits no debug events: the stream has nothing to
    /// send; with `follow` it stays open until the client leaves.
    async fn get_debug_events(
        &self,
        request: Request<GetDebugEventsRequest>,
    ) -> Result<Response<Self::GetDebugEventsStream>, Status> {
        let slot = self.stream_slot(&request)?;
        let req = request.into_inner();
        check_window(req.first, req.follow)?;
        let (tx, rx) = mpsc::channel::<Result<GetDebugEventsResponse, Status>>(1);
        if req.follow {
            tokio::spawn(async move {
                let _slot = slot;
                tx.closed().await
            });
        }
        Ok(with_version(Response::new(Box::pin(ReceiverStream::new(
            rx,
        )))))
    }

    async fn get_nodes(
        &self,
        _: Request<GetNodesRequest>,
    ) -> Result<Response<GetNodesResponse>, Status> {
        let (num, max, seen, uptime) = self.backend.counters();
        let node = Node {
            name: self.backend.node_name(),
            version: API_VERSION.into(),
            address: self.backend.address(),
            state: proto::relay::NodeState::NodeConnected as i32,
            tls: None,
            uptime_ns: uptime,
            num_flows: num,
            max_flows: max,
            seen_flows: seen,
        };
        Ok(with_version(Response::new(GetNodesResponse {
            nodes: vec![node],
        })))
    }

    async fn get_namespaces(
        &self,
        _: Request<GetNamespacesRequest>,
    ) -> Result<Response<GetNamespacesResponse>, Status> {
        // Namespaces seen in buffered flows during the last hour.
        let (_, flows, _) = self.backend.read(self.backend.oldest_seq(), Duration::ZERO);
        let hour_ago = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64
            - 3_600_000_000_000;
        let mut seen: BTreeSet<(String, String)> = BTreeSet::new();
        for f in flows {
            if f.time.0 != 0 && f.time.0 < hour_ago {
                continue;
            }
            for e in [&f.source, &f.destination] {
                if !e.namespace.is_empty() {
                    seen.insert((e.cluster_name.clone(), e.namespace.clone()));
                }
            }
        }
        let namespaces = seen
            .into_iter()
            .map(|(cluster, namespace)| Namespace { cluster, namespace })
            .collect();
        Ok(with_version(Response::new(GetNamespacesResponse {
            namespaces,
        })))
    }

    async fn server_status(
        &self,
        _: Request<ServerStatusRequest>,
    ) -> Result<Response<ServerStatusResponse>, Status> {
        let (num, max, seen, uptime) = self.backend.counters();
        let minutes = (uptime / 60_000_000_000).max(1) as f64;
        Ok(with_version(Response::new(ServerStatusResponse {
            num_flows: num,
            max_flows: max,
            seen_flows: seen,
            uptime_ns: uptime,
            version: format!("{API_VERSION}+fibril-{}", env!("CARGO_PKG_VERSION")),
            flows_rate: seen as f64 / (minutes * 60.0),
            ..Default::default()
        })))
    }
}

#[tonic::async_trait]
impl<B: Backend> Peer for Service<B> {
    type NotifyStream = BoxStream<ChangeNotification>;

    /// Every node of the cluster, then each change (a node added, gone, or
    /// at a new address); alone, this node is the only peer, announced
    /// once, and the stream stays open.
    async fn notify(
        &self,
        request: Request<NotifyRequest>,
    ) -> Result<Response<Self::NotifyStream>, Status> {
        let slot = self.stream_slot(&request)?;
        let (tx, rx) = mpsc::channel(16);
        let me = (self.backend.node_name(), self.backend.address());
        let peers = self.backend.cluster_peers();
        tokio::spawn(async move {
            let _slot = slot;
            let note = |name: &str, address: &str, t: ChangeNotificationType| {
                Ok(ChangeNotification {
                    name: name.to_string(),
                    address: address.to_string(),
                    r#type: t as i32,
                    tls: None,
                })
            };
            let Some(mut peers) = peers else {
                if tx
                    .send(note(&me.0, &me.1, ChangeNotificationType::PeerAdded))
                    .await
                    .is_ok()
                {
                    tx.closed().await;
                }
                return;
            };
            let mut known: BTreeMap<String, String> = BTreeMap::new();
            loop {
                let now = peers.borrow_and_update().clone();
                for (name, address) in &now {
                    let t = match known.get(name) {
                        None => ChangeNotificationType::PeerAdded,
                        Some(a) if a != address => ChangeNotificationType::PeerUpdated,
                        Some(_) => continue,
                    };
                    if tx.send(note(name, address, t)).await.is_err() {
                        return;
                    }
                }
                for (name, address) in &known {
                    if !now.contains_key(name)
                        && tx
                            .send(note(name, address, ChangeNotificationType::PeerDeleted))
                            .await
                            .is_err()
                    {
                        return;
                    }
                }
                known = now;
                tokio::select! {
                    changed = peers.changed() => if changed.is_err() {
                        tx.closed().await;
                        return;
                    },
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

/// TLS for the TCP listener: the server's certificate and key (PEM), and
/// with `client_ca` the CAs client certificates must chain to (mTLS).
#[derive(Clone, Debug)]
pub struct Tls {
    pub cert_pem: Vec<u8>,
    pub key_pem: Vec<u8>,
    pub client_ca_pem: Option<Vec<u8>>,
}

/// The three services, ready to be served (plaintext), with the default
/// limits; serve them on `limits::incoming(listener, Limits::default())`.
pub async fn router<B: Backend>(backend: Arc<B>) -> tonic::transport::server::Router {
    router_plain(backend, Limits::default()).await
}

/// The three services (plaintext) with `limits` on their streams (the
/// connection limits are `limits::incoming`'s).
pub async fn router_plain<B: Backend>(
    backend: Arc<B>,
    limits: Limits,
) -> tonic::transport::server::Router {
    services(backend, limits, tonic::transport::Server::builder()).await
}

/// The three services, ready to be served, over TLS (mTLS with a client
/// CA) when `tls` is given, with the default limits.
pub async fn router_with_tls<B: Backend>(
    backend: Arc<B>,
    tls: Option<&Tls>,
) -> Result<tonic::transport::server::Router, tonic::transport::Error> {
    router_with(backend, tls, Limits::default()).await
}

/// `router_with_tls` with `limits`.
pub async fn router_with<B: Backend>(
    backend: Arc<B>,
    tls: Option<&Tls>,
    limits: Limits,
) -> Result<tonic::transport::server::Router, tonic::transport::Error> {
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = tls {
        let mut config = tonic::transport::ServerTlsConfig::new().identity(
            tonic::transport::Identity::from_pem(&tls.cert_pem, &tls.key_pem),
        );
        if let Some(ca) = &tls.client_ca_pem {
            config = config.client_ca_root(tonic::transport::Certificate::from_pem(ca));
        }
        builder = builder.tls_config(config)?;
    }
    Ok(services(backend, limits, builder).await)
}

/// Health, Observer and Peer on `builder`. HTTP/2 allows a few more
/// concurrent streams per connection than `limits.max_streams` (unary calls
/// beside the streams): past that a client's request would wait for a slot
/// instead of being told RESOURCE_EXHAUSTED.
async fn services<B: Backend>(
    backend: Arc<B>,
    limits: Limits,
    builder: tonic::transport::Server,
) -> tonic::transport::server::Router {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status(
            "hubble.server.Observer",
            tonic_health::ServingStatus::Serving,
        )
        .await;
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    let streams = Arc::new(Streams::new(limits.max_streams));
    builder
        .max_concurrent_streams(u32::try_from(limits.max_streams + 32).unwrap_or(u32::MAX))
        .add_service(health)
        .add_service(ObserverRoutes::new(Arc::new(Service {
            backend: backend.clone(),
            streams: streams.clone(),
        })))
        .add_service(PeerServer::new(Service { backend, streams }))
}

/// A node's observer that is only a ring of flows filled by hand: the
/// Hubble server of synthetic nodes in benchmarks (the relay's, the UI's).
pub struct RingBackend {
    pub name: String,
    /// Where it says it serves (its own `peer.Peer/Notify` entry).
    pub address: String,
    pub flows: flow::ring::Shared<Arc<FlowEntry>>,
    pub events: flow::ring::Shared<Arc<flow::agent_event::AgentEvent>>,
}

impl RingBackend {
    /// A node named `name` keeping the last `capacity` flows (2^n - 1).
    pub fn new(name: &str, capacity: usize) -> Result<RingBackend, String> {
        Ok(RingBackend {
            name: name.to_string(),
            address: String::new(),
            flows: flow::ring::Shared::new(capacity)?,
            events: flow::ring::Shared::new(15)?,
        })
    }
}

impl Backend for RingBackend {
    fn oldest_seq(&self) -> u64 {
        self.flows.oldest_seq()
    }
    fn next_seq(&self) -> u64 {
        self.flows.next_seq()
    }
    fn read(&self, seq: u64, wait: Duration) -> (u64, Vec<Arc<FlowEntry>>, u64) {
        self.flows.read(seq, wait)
    }
    fn agent_events(&self) -> &flow::ring::Shared<Arc<flow::agent_event::AgentEvent>> {
        &self.events
    }
    fn counters(&self) -> (u64, u64, u64, u64) {
        let (n, cap, seen) = self.flows.counts();
        (n as u64, cap as u64, seen, 1)
    }
    fn node_name(&self) -> String {
        self.name.clone()
    }
    fn address(&self) -> String {
        self.address.clone()
    }
}
