//! `observer.Observer` over every node: streams merged in time order
//! (`merge`), node trouble reported in the stream and in the status, and
//! counters summed. A node that is down is reported, never fatal.

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use hubble::entry::Encoded;
use hubble::server::{check_window, BoxStream, EncodedFlows};
use proto::observer::get_flows_response::ResponseTypes;
use proto::observer::observer_server::Observer;
use proto::observer::{
    GetAgentEventsRequest, GetAgentEventsResponse, GetDebugEventsRequest, GetDebugEventsResponse,
    GetFlowsRequest, GetFlowsResponse, GetNamespacesRequest, GetNamespacesResponse,
    GetNodesRequest, GetNodesResponse, Namespace, Node, ServerStatusRequest, ServerStatusResponse,
};
use proto::relay::{NodeState, NodeStatusEvent};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::merge::Merge;
use crate::peers::{self, Peers};
use crate::raw::{self, Raw};

/// The relay's own name in the responses it makes (node status events).
const RELAY_NAME: &str = "hubble-relay";

#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    /// How long a quiet node may hold the merge back.
    pub drain: Duration,
    /// How long a node has to answer a unary call or open a stream.
    pub request: Duration,
}

pub struct Relay {
    peers: Arc<Peers>,
    timeouts: Timeouts,
}

impl Relay {
    pub fn new(peers: Arc<Peers>, timeouts: Timeouts) -> Self {
        Relay { peers, timeouts }
    }

    /// Every node's ServerStatus, or why it has none.
    async fn statuses(&self) -> Vec<(peers::Node, Result<ServerStatusResponse, String>)> {
        self.on_every_node(|n| async move {
            Ok(n.client()
                .server_status(ServerStatusRequest {})
                .await?
                .into_inner())
        })
        .await
    }

    /// Calls `call` on every node at once (each within the request
    /// timeout): each node's answer or its error, by node.
    async fn on_every_node<T, F, Fut>(&self, call: F) -> Vec<(peers::Node, Result<T, String>)>
    where
        T: Send + 'static,
        F: Fn(peers::Node) -> Fut,
        Fut: std::future::Future<Output = Result<T, Status>> + Send + 'static,
    {
        let mut set = tokio::task::JoinSet::new();
        let nodes = self.peers.snapshot();
        for (i, n) in nodes.iter().enumerate() {
            let fut = call(n.clone());
            let limit = self.timeouts.request;
            set.spawn(async move {
                let r = match tokio::time::timeout(limit, fut).await {
                    Ok(Ok(v)) => Ok(v),
                    Ok(Err(s)) => Err(s.message().to_string()),
                    Err(_) => Err(format!("no answer within {limit:?}")),
                };
                (i, r)
            });
        }
        let mut out: Vec<Option<Result<T, String>>> = nodes.iter().map(|_| None).collect();
        while let Some(Ok((i, r))) = set.join_next().await {
            out[i] = Some(r);
        }
        nodes
            .into_iter()
            .zip(out)
            .map(|(n, r)| (n, r.unwrap_or_else(|| Err("the call failed".into()))))
            .collect()
    }
}

/// gRPC health for the relay. Liveness (service "") is the process
/// answering: always SERVING, so a slow or dead node never gets the relay
/// restarted. Readiness (`hubble.server.Observer`, what `hubble status`
/// checks) follows whether any node answers (`readiness`, spawned here).
pub async fn health(
    relay: Arc<Relay>,
) -> tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health> {
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;
    tokio::spawn(readiness(relay, reporter));
    health
}

/// Keeps the Observer's readiness (`hubble.server.Observer` in gRPC
/// health) true while at least one node answers its status, checked every
/// 5 s (every second while not ready).
async fn readiness(relay: Arc<Relay>, reporter: tonic_health::server::HealthReporter) {
    loop {
        let answers = relay.statuses().await;
        let ready = answers.iter().any(|(_, r)| r.is_ok());
        let status = if ready {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        reporter
            .set_service_status("hubble.server.Observer", status)
            .await;
        // Not ready yet: look again soon (the nodes are being found).
        let every = if ready { 5 } else { 1 };
        tokio::time::sleep(Duration::from_secs(every)).await;
    }
}

/// The relay's clock, ns since the epoch (flows' times are compared with
/// it).
fn wall_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64
}

fn now_timestamp() -> prost_types::Timestamp {
    let ns = wall_ns();
    prost_types::Timestamp {
        seconds: (ns / 1_000_000_000) as i64,
        nanos: (ns % 1_000_000_000) as i32,
    }
}

fn node_status(state: NodeState, names: Vec<String>, message: String) -> GetFlowsResponse {
    GetFlowsResponse {
        node_name: RELAY_NAME.into(),
        time: Some(now_timestamp()),
        response_types: Some(ResponseTypes::NodeStatus(NodeStatusEvent {
            state_change: state as i32,
            node_names: names,
            message,
        })),
    }
}

/// What a merged stream releases: the window of the request (`number`,
/// `first`, `follow`) applied across the cluster.
struct Window {
    number: usize,
    first: bool,
    follow: bool,
    /// The request's time: what is older is history (the last `number`
    /// of it across the cluster, then the live stream).
    started_ns: u64,
}

/// A node's stream joining a merge already under way (following): its
/// name, its stream, and what to say of it in the merged stream.
struct Join<T> {
    name: String,
    stream: Streaming<T>,
    say: Option<T>,
}

/// The names of the nodes a merge is reading, shared with its joiner.
type ReadingSet = Arc<std::sync::Mutex<BTreeSet<String>>>;

/// Merges node streams of `T` into `tx`, applying `window`. `time` gives
/// an item's time. Following, `joins` brings streams of nodes that come
/// (or come back) later.
#[allow(clippy::too_many_arguments)]
async fn merge_into<T: Send + 'static>(
    streams: Vec<(String, Streaming<T>)>,
    time: fn(&T) -> u64,
    window: Window,
    drain: Duration,
    tx: mpsc::Sender<Result<T, Status>>,
    on_error: impl Fn(String, String) -> Option<T> + Send + 'static,
    mut joins: Option<mpsc::Receiver<Join<T>>>,
    reading: ReadingSet,
) {
    let (items, mut rx) = mpsc::channel::<(usize, Result<Option<T>, Status>)>(1024);
    let read = |i: usize, mut s: Streaming<T>| {
        let items = items.clone();
        tokio::spawn(async move {
            loop {
                let next = s.message().await;
                let end = !matches!(next, Ok(Some(_)));
                if items.send((i, next)).await.is_err() || end {
                    return;
                }
            }
        });
    };
    let mut names: Vec<String> = Vec::new();
    for (i, (name, s)) in streams.into_iter().enumerate() {
        names.push(name);
        read(i, s);
    }
    let mut merge = Merge::new(names.len(), drain, wall_ns());
    let drain_ns = drain.as_nanos() as u64;
    let stopped = |name: &str| {
        reading
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(name);
    };
    // Last-`number` history, released once the history is over.
    let mut history: Option<VecDeque<T>> = (window.number > 0 && !window.first).then(VecDeque::new);
    let mut sent = 0usize;
    loop {
        let now = wall_ns();
        while let Some(item) = merge.pop(now) {
            if let Some(h) = history.as_mut() {
                if !window.follow || time(&item) <= window.started_ns {
                    if h.len() == window.number {
                        h.pop_front();
                    }
                    h.push_back(item);
                    continue;
                }
                if !flush(&mut history, &tx).await {
                    return;
                }
            }
            if tx.send(Ok(item)).await.is_err() {
                return;
            }
            sent += 1;
            if window.first && window.number > 0 && sent >= window.number {
                return;
            }
        }
        // Following: the history is over once nothing more is queued and
        // every node has had its drain time.
        let quiet = merge.queued() == 0 && now >= window.started_ns.saturating_add(drain_ns);
        if window.follow && quiet && !flush(&mut history, &tx).await {
            return;
        }
        // A follow with nodes still to come stays open with none streaming.
        if merge.done() && joins.is_none() {
            flush(&mut history, &tx).await;
            return;
        }
        // Up when the earliest queued flow may go, or (history pending)
        // when every node has had its drain time since the request.
        let wake_ns = merge.next_release().or_else(|| {
            history
                .is_some()
                .then(|| window.started_ns.saturating_add(drain_ns))
        });
        let wake = tokio::time::Instant::now()
            + wake_ns.map_or(Duration::from_secs(3600), |t| {
                Duration::from_nanos(t.saturating_sub(wall_ns()))
            });
        let join = async {
            match joins.as_mut() {
                Some(j) => j.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            got = rx.recv() => match got {
                Some((i, Ok(Some(item)))) => merge.push(i, time(&item), item, wall_ns()),
                Some((i, Ok(None))) => {
                    merge.end(i);
                    stopped(&names[i]);
                }
                Some((i, Err(status))) => {
                    merge.end(i);
                    stopped(&names[i]);
                    tracing::warn!(node = %names[i], error = %status.message(), "node stream failed");
                    if let Some(e) = on_error(names[i].clone(), status.message().to_string()) {
                        if tx.send(Ok(e)).await.is_err() {
                            return;
                        }
                    }
                }
                None => (0..names.len()).for_each(|i| merge.end(i)),
            },
            joined = join => match joined {
                Some(j) => {
                    if let Some(say) = j.say {
                        if tx.send(Ok(say)).await.is_err() {
                            return;
                        }
                    }
                    let i = merge.add_node(wall_ns());
                    names.push(j.name);
                    read(i, j.stream);
                }
                None => joins = None,
            },
            _ = tokio::time::sleep_until(wake) => {}
            _ = tx.closed() => return,
        }
    }
}

/// Sends the history held back (if any); false when the client is gone.
async fn flush<T>(history: &mut Option<VecDeque<T>>, tx: &mpsc::Sender<Result<T, Status>>) -> bool {
    for old in history.take().into_iter().flatten() {
        if tx.send(Ok(old)).await.is_err() {
            return false;
        }
    }
    true
}

/// Following: every second, opens a live-only stream (no history: the
/// merge has moved past it) on each node that is not streaming, and hands
/// it to the merge, which says CONNECTED for it. Ends with the merge.
fn join_late_nodes(
    peers: Arc<Peers>,
    req: GetFlowsRequest,
    timeout: Duration,
    reading: ReadingSet,
) -> mpsc::Receiver<Join<Raw>> {
    let (tx, rx) = mpsc::channel(4);
    let live = GetFlowsRequest {
        number: 0,
        first: false,
        follow: true,
        since: None,
        ..req
    };
    tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = tx.closed() => return,
            }
            for n in peers.snapshot() {
                if reading
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .contains(&n.name)
                {
                    continue;
                }
                let opened = tokio::time::timeout(
                    timeout,
                    raw::get_flows(n.channel.clone(), live.clone(), peers::MAX_MESSAGE_BYTES),
                )
                .await;
                let Ok(Ok(stream)) = opened else { continue };
                reading
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(n.name.clone());
                let join = Join {
                    say: Some(Raw::of(&node_status(
                        NodeState::NodeConnected,
                        vec![n.name.clone()],
                        String::new(),
                    ))),
                    name: n.name,
                    stream,
                };
                if tx.send(join).await.is_err() {
                    return;
                }
            }
        }
    });
    rx
}

impl Relay {
    /// GetFlows across the cluster, the responses as the nodes encoded
    /// them (`raw`): who answered, who did not, then the merged stream.
    pub async fn get_flows_raw(&self, req: GetFlowsRequest) -> Result<BoxStream<Raw>, Status> {
        check_window(req.first, req.follow)?;
        let started_ns = wall_ns();
        let opened = self
            .on_every_node(|n| {
                let req = req.clone();
                async move { raw::get_flows(n.channel, req, peers::MAX_MESSAGE_BYTES).await }
            })
            .await;
        let (tx, rx) = mpsc::channel(256);
        let mut streams = Vec::new();
        let (mut up, mut down) = (Vec::new(), Vec::new());
        for (n, r) in opened {
            match r {
                Ok(s) => {
                    up.push(n.name.clone());
                    streams.push((n.name, s));
                }
                Err(e) => down.push((n.name, e)),
            }
        }
        // As Hubble Relay: who answered, then who did not.
        if !up.is_empty() {
            let _ = tx.try_send(Ok(Raw::of(&node_status(
                NodeState::NodeConnected,
                up,
                String::new(),
            ))));
        }
        if !down.is_empty() {
            let message = down
                .iter()
                .map(|(n, e)| format!("{n}: {e}"))
                .collect::<Vec<_>>()
                .join("; ");
            let names = down.into_iter().map(|(n, _)| n).collect();
            let _ = tx.try_send(Ok(Raw::of(&node_status(
                NodeState::NodeUnavailable,
                names,
                message,
            ))));
        }
        let window = Window {
            number: req.number as usize,
            first: req.first,
            follow: req.follow,
            started_ns,
        };
        let reading: ReadingSet = Arc::new(std::sync::Mutex::new(
            streams.iter().map(|(n, _)| n.clone()).collect(),
        ));
        let joins = req.follow.then(|| {
            join_late_nodes(
                self.peers.clone(),
                req.clone(),
                self.timeouts.request,
                reading.clone(),
            )
        });
        tokio::spawn(merge_into(
            streams,
            |r: &Raw| r.time_ns,
            window,
            self.timeouts.drain,
            tx,
            |node, message| {
                Some(Raw::of(&node_status(
                    NodeState::NodeError,
                    vec![node],
                    message,
                )))
            },
            joins,
            reading,
        ));
        Ok(Box::pin(ReceiverStream::new(rx)))
    }
}

/// GetFlows served as the bytes the nodes sent (`ObserverRoutes`).
#[tonic::async_trait]
impl EncodedFlows for Relay {
    async fn get_flows_encoded(
        &self,
        request: Request<GetFlowsRequest>,
    ) -> Result<Response<BoxStream<Encoded>>, Status> {
        let raw = self.get_flows_raw(request.into_inner()).await?;
        let encoded = tokio_stream::StreamExt::map(raw, |r| r.map(|r| Encoded(r.bytes)));
        Ok(Response::new(Box::pin(encoded)))
    }
}

#[tonic::async_trait]
impl Observer for Relay {
    type GetFlowsStream = BoxStream<GetFlowsResponse>;
    type GetAgentEventsStream = BoxStream<GetAgentEventsResponse>;
    type GetDebugEventsStream = BoxStream<GetDebugEventsResponse>;

    /// Decoded from the merged stream (the served route,
    /// `hubble::server::ObserverRoutes`, sends the bytes).
    async fn get_flows(
        &self,
        request: Request<GetFlowsRequest>,
    ) -> Result<Response<Self::GetFlowsStream>, Status> {
        Ok(hubble::server::decoded(
            self.get_flows_encoded(request).await?,
        ))
    }

    /// Merged across the nodes as flows are (Hubble Relay answers
    /// Unimplemented).
    async fn get_agent_events(
        &self,
        request: Request<GetAgentEventsRequest>,
    ) -> Result<Response<Self::GetAgentEventsStream>, Status> {
        let req = request.into_inner();
        check_window(req.first, req.follow)?;
        let started_ns = wall_ns();
        let opened = self
            .on_every_node(
                |n| async move { Ok(n.client().get_agent_events(req).await?.into_inner()) },
            )
            .await;
        let streams = opened
            .into_iter()
            .filter_map(|(n, r)| r.ok().map(|s| (n.name, s)))
            .collect();
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(merge_into(
            streams,
            |r: &GetAgentEventsResponse| r.time.as_ref().map_or(0, raw::timestamp_ns),
            Window {
                number: req.number as usize,
                first: req.first,
                follow: req.follow,
                started_ns,
            },
            self.timeouts.drain,
            tx,
            |_, _| None,
            None,
            Default::default(),
        ));
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn get_debug_events(
        &self,
        _: Request<GetDebugEventsRequest>,
    ) -> Result<Response<Self::GetDebugEventsStream>, Status> {
        Err(Status::unimplemented(
            "GetDebugEvents is served by each node, not by the relay",
        ))
    }

    async fn get_nodes(
        &self,
        _: Request<GetNodesRequest>,
    ) -> Result<Response<GetNodesResponse>, Status> {
        let answers = self.statuses().await;
        let nodes = answers
            .into_iter()
            .map(|(n, r)| {
                let tls = Some(proto::observer::Tls {
                    enabled: self.peers.tls(),
                    server_name: if self.peers.tls() {
                        peers::server_name(&n.name)
                    } else {
                        String::new()
                    },
                });
                match r {
                    Ok(s) => Node {
                        name: n.name,
                        version: s.version,
                        address: n.address,
                        state: NodeState::NodeConnected as i32,
                        tls,
                        uptime_ns: s.uptime_ns,
                        num_flows: s.num_flows,
                        max_flows: s.max_flows,
                        seen_flows: s.seen_flows,
                    },
                    Err(_) => Node {
                        name: n.name,
                        address: n.address,
                        state: NodeState::NodeUnavailable as i32,
                        tls,
                        ..Default::default()
                    },
                }
            })
            .collect();
        Ok(Response::new(GetNodesResponse { nodes }))
    }

    async fn get_namespaces(
        &self,
        _: Request<GetNamespacesRequest>,
    ) -> Result<Response<GetNamespacesResponse>, Status> {
        let answers = self
            .on_every_node(|n| async move {
                Ok(n.client()
                    .get_namespaces(GetNamespacesRequest {})
                    .await?
                    .into_inner())
            })
            .await;
        let all: BTreeSet<(String, String)> = answers
            .into_iter()
            .filter_map(|(_, r)| r.ok())
            .flat_map(|r| r.namespaces)
            .map(|n| (n.cluster, n.namespace))
            .collect();
        Ok(Response::new(GetNamespacesResponse {
            namespaces: all
                .into_iter()
                .map(|(cluster, namespace)| Namespace { cluster, namespace })
                .collect(),
        }))
    }

    async fn server_status(
        &self,
        _: Request<ServerStatusRequest>,
    ) -> Result<Response<ServerStatusResponse>, Status> {
        let answers = self.statuses().await;
        let mut total = ServerStatusResponse {
            version: format!("{}+fibril-relay", hubble::server::API_VERSION),
            ..Default::default()
        };
        let (mut connected, mut unavailable) = (0u32, Vec::new());
        for (n, r) in answers {
            match r {
                Ok(s) => {
                    connected += 1;
                    total.num_flows += s.num_flows;
                    total.max_flows += s.max_flows;
                    total.seen_flows += s.seen_flows;
                    total.uptime_ns = total.uptime_ns.max(s.uptime_ns);
                    total.flows_rate += s.flows_rate;
                }
                Err(_) => unavailable.push(n.name),
            }
        }
        total.num_connected_nodes = Some(connected);
        total.num_unavailable_nodes = Some(unavailable.len() as u32);
        total.unavailable_nodes = unavailable;
        Ok(Response::new(total))
    }
}
