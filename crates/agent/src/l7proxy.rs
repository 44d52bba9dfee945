//! The HTTP proxy as a process of its own (`fibril-l7proxy`), as Cilium
//! runs Envoy standalone: it outlives the agent, so proxied connections go
//! on across an agent restart or crash, and new ones keep being checked
//! against the last policy the agent gave it.
//!
//! The two talk over `<state-dir>/l7proxy.sock` in length-prefixed
//! postcard messages (JSON cost more CPU than the request a flow describes):
//! the proxy says `Hello` (its protocol version and port) when the agent
//! connects; the agent sends a `Snapshot` of what the proxy decides with
//! (local endpoints, CIDR identities, the computed policy of each local
//! endpoint) at connect and an `Update` of what each commit changed; the proxy sends its flows (`Records`, batched every
//! 20 ms) and counters (`Stats`, when they change). Flows made while no agent is connected wait in
//! a bounded queue. The proxy exits when its socket file is removed (the
//! state directory gone: `lab down`, a test's cleanup).

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anyhow::Context;
use ipnet::IpNet;
use policy::{Direction, EndpointPolicy, L7};
use serde::{Deserialize, Serialize};

use crate::l7::{l7_rules, CompiledRules};

/// The socket's file in the state directory.
pub const SOCKET_FILE: &str = "l7proxy.sock";
/// The proxy's pid, for `lab down`.
pub const PID_FILE: &str = api::L7_PROXY_PID_FILE;
/// Flows kept while no agent is connected; beyond, the oldest go.
const QUEUE_LIMIT: usize = 65_536;

/// What the proxy decides with.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Snapshot {
    /// This node's endpoints: address -> identity.
    pub pods: BTreeMap<Ipv4Addr, u32>,
    /// CIDR identities (the most specific prefix holding an address wins;
    /// none: world).
    pub cidrs: Vec<(IpNet, u32)>,
    /// The computed policy of each local endpoint's identity.
    pub policies: BTreeMap<u32, EndpointPolicy>,
}

/// What changed since the agent's last message: a commit's worth, the
/// size of what it touched (not every endpoint's policy again). Applying
/// one twice leaves what applying it once does (a reconnect may resend).
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
pub struct Update {
    /// Endpoint addresses set (`Some`) or gone (`None`).
    pub pods: Vec<(Ipv4Addr, Option<u32>)>,
    /// The whole CIDR list, when it changed.
    pub cidrs: Option<Vec<(IpNet, u32)>>,
    /// Computed policies changed, by identity.
    pub policies: Vec<(u32, PolicyChange)>,
}

/// How one identity's computed policy changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum PolicyChange {
    /// The whole policy (an identity new to the proxy).
    Set(EndpointPolicy),
    /// Entries set and removed, and the rest of the policy (its flags and
    /// selecting policies, with no entries): a learned address is one entry.
    Patch {
        rest: EndpointPolicy,
        set: Vec<(policy::EntryKey, policy::EntryValue)>,
        removed: Vec<policy::EntryKey>,
    },
    /// No longer a local identity.
    Gone,
}

impl PolicyChange {
    /// The change from `old` to `new`.
    pub fn between(old: &EndpointPolicy, new: &EndpointPolicy) -> Self {
        PolicyChange::Patch {
            rest: new.clone_without_entries(),
            set: new
                .entries
                .iter()
                .filter(|(k, v)| old.entries.get(k) != Some(v))
                .map(|(k, v)| (*k, v.clone()))
                .collect(),
            removed: old
                .entries
                .keys()
                .filter(|k| !new.entries.contains_key(k))
                .copied()
                .collect(),
        }
    }

    fn apply(&self, to: Option<&mut EndpointPolicy>) -> Option<EndpointPolicy> {
        match (self, to) {
            (PolicyChange::Set(p), _) => Some(p.clone()),
            (PolicyChange::Patch { rest, set, removed }, Some(p)) => {
                let mut entries = std::mem::take(&mut p.entries);
                for k in removed {
                    entries.remove(k);
                }
                entries.extend(set.iter().cloned());
                *p = EndpointPolicy {
                    entries,
                    ..rest.clone()
                };
                None
            }
            // A patch of a policy this side does not hold cannot happen
            // (the agent patches only what it sent); nothing to patch.
            (PolicyChange::Patch { .. }, None) | (PolicyChange::Gone, _) => None,
        }
    }
}

impl Update {
    pub fn is_empty(&self) -> bool {
        self.pods.is_empty() && self.cidrs.is_none() && self.policies.is_empty()
    }
}

impl Snapshot {
    /// `u` applied.
    pub fn apply(&mut self, u: &Update) {
        for (addr, id) in &u.pods {
            match id {
                Some(id) => self.pods.insert(*addr, *id),
                None => self.pods.remove(addr),
            };
        }
        if let Some(cidrs) = &u.cidrs {
            self.cidrs = cidrs.clone();
        }
        for (id, change) in &u.policies {
            if let PolicyChange::Gone = change {
                self.policies.remove(id);
            } else if let Some(p) = change.apply(self.policies.get_mut(id)) {
                self.policies.insert(*id, p);
            }
        }
    }

    fn cidr_identity_of(&self, addr: Ipv4Addr) -> u32 {
        self.cidrs
            .iter()
            .filter(|(p, _)| p.contains(&std::net::IpAddr::V4(addr)))
            .max_by_key(|(p, _)| p.prefix_len())
            .map_or(abi::identity::WORLD, |(_, id)| *id)
    }

    /// What policy says about a redirected connection: each side's http
    /// rules; `None` when policy no longer allows it at all.
    pub fn connection(
        &self,
        client: SocketAddrV4,
        dst: SocketAddrV4,
        compiled: &CompiledRules,
    ) -> Option<proxy::Connection> {
        let client_identity = *self.pods.get(client.ip())?;
        let (server_identity, server_local) = match self.pods.get(dst.ip()) {
            Some(id) => (*id, true),
            None => (self.cidr_identity_of(*dst.ip()), false),
        };
        let ends = [
            (Some(client_identity), server_identity, Direction::Egress),
            (
                server_local.then_some(server_identity),
                client_identity,
                Direction::Ingress,
            ),
        ];
        let mut sides = Vec::new();
        let mut kafka = Vec::new();
        for (endpoint, peer, direction) in ends {
            let Some(endpoint) = endpoint else { continue };
            let computed = self.policies.get(&endpoint);
            let ingress = direction == Direction::Ingress;
            match l7_rules(computed, peer, direction, 6, dst.port())? {
                Some((L7::Http(rules), by)) => sides.push(proxy::Side {
                    ingress,
                    rules: compiled.get(&rules)?,
                    policy: Arc::new(crate::observer::policy_ref(&by)),
                }),
                Some((L7::Kafka(rules), by)) => kafka.push(proxy::Side {
                    ingress,
                    rules: compiled.kafka(&rules)?,
                    policy: Arc::new(crate::observer::policy_ref(&by)),
                }),
                _ => {}
            }
        }
        if !sides.is_empty() && !kafka.is_empty() {
            // One side says HTTP, the other Kafka: no request can satisfy
            // both, so the connection is refused rather than half-checked.
            tracing::warn!(%client, %dst, "http rules on one side and kafka rules on the other: connection refused");
            return None;
        }
        Some(proxy::Connection {
            client_identity,
            server_identity,
            sides,
            kafka: (!kafka.is_empty()).then_some(kafka),
            transparent: server_local,
        })
    }
}

/// An HTTP flow as it crosses the socket: plain fields, no Hubble JSON
/// shape (postcard needs every field written), in a few hundred bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireRecord {
    unix_ns: u64,
    client: SocketAddrV4,
    server: SocketAddrV4,
    client_identity: u32,
    server_identity: u32,
    is_reply: bool,
    dropped: bool,
    ingress: bool,
    protocol: u8,
    response: bool,
    latency_ns: u64,
    code: u32,
    method: String,
    url: String,
    http_protocol: String,
    headers: Vec<(String, String)>,
    /// A Kafka flow's record (then the HTTP fields are empty).
    kafka: Option<WireKafka>,
    decided_by: Vec<(bool, WirePolicyRef)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct WireKafka {
    error_code: i32,
    api_version: i32,
    api_key: String,
    correlation_id: i32,
    topic: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct WirePolicyRef {
    name: String,
    namespace: String,
    labels: Vec<String>,
    revision: u64,
    kind: String,
}

impl From<&flow::record::L7Record> for WireRecord {
    fn from(r: &flow::record::L7Record) -> Self {
        let http = r.l7.http.clone().unwrap_or_default();
        WireRecord {
            unix_ns: r.unix_ns,
            client: r.client,
            server: r.server,
            client_identity: r.client_identity,
            server_identity: r.server_identity,
            is_reply: r.is_reply,
            dropped: r.verdict == flow::enums::Verdict::DROPPED,
            ingress: r.ingress,
            protocol: r.protocol,
            response: r.l7.r#type == flow::enums::L7FlowType::RESPONSE,
            latency_ns: r.l7.latency_ns,
            code: http.code,
            method: http.method.into_owned(),
            url: http.url,
            http_protocol: http.protocol.into_owned(),
            headers: http.headers.into_iter().map(|h| (h.key, h.value)).collect(),
            kafka: r.l7.kafka.as_ref().map(|k| WireKafka {
                error_code: k.error_code,
                api_version: k.api_version,
                api_key: k.api_key.clone(),
                correlation_id: k.correlation_id,
                topic: k.topic.clone(),
            }),
            decided_by: r
                .decided_by
                .iter()
                .map(|(ingress, p)| {
                    let p = &**p;
                    let wire = WirePolicyRef {
                        name: p.name.clone(),
                        namespace: p.namespace.clone(),
                        labels: p.labels.clone(),
                        revision: p.revision,
                        kind: p.kind.clone(),
                    };
                    (*ingress, wire)
                })
                .collect(),
        }
    }
}

impl From<WireRecord> for flow::record::L7Record {
    fn from(r: WireRecord) -> Self {
        let http = flow::record::Http {
            code: r.code,
            method: flow::record::http_method(&r.method),
            url: r.url,
            protocol: flow::record::http_protocol(&r.http_protocol),
            headers: r
                .headers
                .into_iter()
                .map(|(key, value)| flow::record::HttpHeader { key, value })
                .collect(),
        };
        flow::record::L7Record {
            unix_ns: r.unix_ns,
            client: r.client,
            server: r.server,
            client_identity: r.client_identity,
            server_identity: r.server_identity,
            is_reply: r.is_reply,
            verdict: if r.dropped {
                flow::enums::Verdict::DROPPED
            } else {
                flow::enums::Verdict::FORWARDED
            },
            ingress: r.ingress,
            l7: flow::record::Layer7 {
                r#type: if r.response {
                    flow::enums::L7FlowType::RESPONSE
                } else {
                    flow::enums::L7FlowType::REQUEST
                },
                latency_ns: r.latency_ns,
                dns: None,
                http: r.kafka.is_none().then_some(http),
                kafka: r.kafka.map(|k| flow::record::Kafka {
                    error_code: k.error_code,
                    api_version: k.api_version,
                    api_key: k.api_key,
                    correlation_id: k.correlation_id,
                    topic: k.topic,
                }),
            },
            protocol: r.protocol,
            decided_by: r
                .decided_by
                .into_iter()
                .map(|(i, p)| {
                    let p = flow::record::PolicyRef {
                        name: p.name,
                        namespace: p.namespace,
                        labels: p.labels,
                        revision: p.revision,
                        kind: p.kind,
                    };
                    (i, Arc::new(p))
                })
                .collect(),
        }
    }
}

/// Agent -> proxy.
#[derive(Debug, Serialize, Deserialize)]
pub enum ToProxy {
    /// Everything (at connect).
    Snapshot(Snapshot),
    /// What a commit changed.
    Update(Update),
}

/// The messages' version: the proxy says it in its hello, and an agent
/// refuses a proxy of another (a proxy left running across an upgrade:
/// `lab down` or its pid file stops it).
pub const PROTOCOL: u32 = 3;

/// Proxy -> agent.
#[derive(Debug, Serialize, Deserialize)]
pub enum FromProxy {
    Hello {
        protocol: u32,
        port: u16,
        pid: u32,
    },
    /// Flows, in the order they were made.
    Records(Vec<WireRecord>),
    /// `proxy::Stats::snapshot` values, in its order (sent when they
    /// change, with the flows).
    Stats(Vec<u64>),
}

/// Largest message read (a snapshot of a big node's policies).
const MAX_MESSAGE: usize = 256 << 20;

/// One message: its length (u32, little-endian), then postcard.
fn send<T: Serialize>(w: &mut impl Write, msg: &T) -> std::io::Result<()> {
    let body = postcard::to_stdvec(msg).map_err(std::io::Error::other)?;
    let len = u32::try_from(body.len()).map_err(std::io::Error::other)?;
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&len.to_le_bytes());
    frame.extend_from_slice(&body);
    w.write_all(&frame)
}

/// The next message; `None` at the end of the stream.
fn recv<T: serde::de::DeserializeOwned>(r: &mut impl Read) -> std::io::Result<Option<T>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_MESSAGE {
        return Err(std::io::Error::other(format!("a message of {len} bytes")));
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    postcard::from_bytes(&body)
        .map(Some)
        .map_err(std::io::Error::other)
}

/// How the agent starts a proxy when none answers on the socket.
#[derive(Debug, Clone)]
pub struct SpawnConfig {
    pub program: PathBuf,
    pub state_dir: PathBuf,
    /// 0: any free port (the datapath is told the one it got).
    pub port: u16,
    pub request_timeout_s: u64,
    pub escaped_slashes: String,
}

impl SpawnConfig {
    fn spawn(&self) -> anyhow::Result<()> {
        use std::os::unix::process::CommandExt;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.state_dir.join("l7proxy.log"))?;
        std::process::Command::new(&self.program)
            .arg("--state-dir")
            .arg(&self.state_dir)
            .args(["--port", &self.port.to_string()])
            .args(["--request-timeout", &self.request_timeout_s.to_string()])
            .args(["--escaped-slashes", &self.escaped_slashes])
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // Its own process group: a signal to the agent's group (a
            // terminal's ^C) does not reach it.
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", self.program.display()))?;
        Ok(())
    }
}

/// The agent's end: the connection to the proxy, re-made (and the proxy
/// started again, on the same port) if it goes.
///
/// Snapshots and updates reach the proxy in commit order through one
/// sender thread (a commit only queues its update: encoding and writing
/// it are off the commit's path). The writer's lock covers the kept
/// snapshot's change and the write, and a reconnect's new stream and
/// resent snapshot, so the proxy never gets an update older than its
/// snapshot.
pub struct Link {
    spawn: SpawnConfig,
    writer: Mutex<Option<UnixStream>>,
    /// The first connection's reading end, until `start_reading`.
    reader: Mutex<Option<UnixStream>>,
    last: Mutex<Option<Arc<Snapshot>>>,
    outbox: Mutex<std::sync::mpsc::Sender<Outgoing>>,
    pub port: u16,
}

enum Outgoing {
    Snapshot(Snapshot),
    Update(Update),
    /// Answered once everything queued before it is sent.
    Flush(std::sync::mpsc::SyncSender<()>),
}

/// What the agent does with what the proxy sends.
pub trait Sink: Send + Sync + 'static {
    fn record(&self, record: flow::record::L7Record);
    fn stats(&self, values: Vec<u64>);
}

impl Link {
    /// Connects to the proxy of `spawn.state_dir`, starting one if none
    /// answers (before the datapath loads: its programs carry the port).
    pub fn connect(spawn: SpawnConfig) -> anyhow::Result<Arc<Link>> {
        let (stream, port) = connect(&spawn)?;
        let (outbox, queued) = std::sync::mpsc::channel();
        let link = Arc::new(Link {
            spawn: SpawnConfig { port, ..spawn },
            writer: Mutex::new(Some(stream.try_clone()?)),
            reader: Mutex::new(Some(stream)),
            last: Mutex::new(None),
            outbox: Mutex::new(outbox),
            port,
        });
        let weak = Arc::downgrade(&link);
        std::thread::Builder::new()
            .name("l7proxy-send".into())
            .spawn(move || {
                // Ends when the link goes (its sender with it).
                for out in queued {
                    let Some(link) = weak.upgrade() else { return };
                    match out {
                        Outgoing::Snapshot(s) => link.give(s),
                        Outgoing::Update(u) => link.give_update(u),
                        Outgoing::Flush(done) => {
                            done.send(()).ok();
                        }
                    }
                }
            })?;
        Ok(link)
    }

    /// A thread hands the proxy's flows and counters to `sink`, and
    /// reconnects (restarting the proxy if need be) when the connection
    /// ends.
    pub fn start_reading(self: &Arc<Self>, sink: Arc<dyn Sink>) -> std::io::Result<()> {
        let Some(mut stream) = self.reader.lock().unwrap_or_else(|e| e.into_inner()).take() else {
            return Ok(());
        };
        let weak = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("l7proxy-link".into())
            .spawn(move || loop {
                read_from_proxy(&stream, sink.as_ref());
                let Some(link) = weak.upgrade() else { return };
                tracing::warn!("the L7 proxy connection ended: reconnecting");
                *link.writer.lock().unwrap_or_else(|e| e.into_inner()) = None;
                stream = loop {
                    match connect(&link.spawn) {
                        Ok((s, _)) => break s,
                        Err(e) => {
                            tracing::error!(error = %format!("{e:#}"), "the L7 proxy");
                            std::thread::sleep(Duration::from_secs(1));
                        }
                    }
                };
                let mut writer = link.writer.lock().unwrap_or_else(|e| e.into_inner());
                *writer = stream.try_clone().ok();
                let last = link.last.lock().unwrap_or_else(|e| e.into_inner()).clone();
                if let Some(snapshot) = last {
                    write(&mut writer, &ToProxy::Snapshot((*snapshot).clone()));
                }
            })?;
        Ok(())
    }

    /// Gives the proxy `snapshot` (kept, and sent again on reconnecting).
    pub fn publish(&self, snapshot: Snapshot) {
        self.queue(Outgoing::Snapshot(snapshot));
    }

    /// Gives the proxy what a commit changed (applied to the kept
    /// snapshot too). Before the first snapshot there is nothing to change.
    pub fn update(&self, update: Update) {
        if !update.is_empty() {
            self.queue(Outgoing::Update(update));
        }
    }

    /// Waits until everything given so far is sent.
    pub fn flush(&self) {
        let (done, wait) = std::sync::mpsc::sync_channel(1);
        self.queue(Outgoing::Flush(done));
        wait.recv().ok();
    }

    /// What the proxy was last given (kept to give it again when it
    /// reconnects).
    pub fn last_snapshot(&self) -> Option<Arc<Snapshot>> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn queue(&self, out: Outgoing) {
        // The sender thread lives as long as the link.
        self.outbox
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .send(out)
            .ok();
    }

    fn give(&self, snapshot: Snapshot) {
        let mut writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            if last.as_deref() == Some(&snapshot) {
                return;
            }
            *last = Some(Arc::new(snapshot.clone()));
        }
        write(&mut writer, &ToProxy::Snapshot(snapshot));
    }

    fn give_update(&self, update: Update) {
        let mut writer = self.writer.lock().unwrap_or_else(|e| e.into_inner());
        {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            let Some(snapshot) = last.as_mut() else {
                return;
            };
            Arc::make_mut(snapshot).apply(&update);
        }
        write(&mut writer, &ToProxy::Update(update));
    }
}

/// Writes `message` to the proxy; a failed write drops the stream (the
/// reading thread reconnects and resends the snapshot).
fn write(writer: &mut Option<UnixStream>, message: &ToProxy) {
    if let Some(w) = writer.as_mut() {
        if let Err(e) = send(w, message) {
            tracing::warn!(error = %e, "sending the L7 proxy its policy");
            *writer = None;
        }
    }
}

/// A connection to the proxy and its port, starting the proxy if none
/// answers.
fn connect(spawn: &SpawnConfig) -> anyhow::Result<(UnixStream, u16)> {
    let path = spawn.state_dir.join(SOCKET_FILE);
    let stream = match UnixStream::connect(&path) {
        Ok(s) => s,
        Err(_) => {
            spawn.spawn()?;
            let mut waited = Duration::ZERO;
            loop {
                match UnixStream::connect(&path) {
                    Ok(s) => break s,
                    Err(e) if waited >= Duration::from_secs(10) => {
                        return Err(e).with_context(|| {
                            format!(
                                "the L7 proxy did not start (see {})",
                                spawn.state_dir.join("l7proxy.log").display()
                            )
                        })
                    }
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(20));
                        waited += Duration::from_millis(20);
                    }
                }
            }
        }
    };
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let hello = recv(&mut &stream);
    stream.set_read_timeout(None)?;
    match hello {
        Ok(Some(FromProxy::Hello {
            protocol: PROTOCOL,
            port,
            pid,
        })) => {
            tracing::info!(port, pid, "connected to the L7 proxy");
            Ok((stream, port))
        }
        Ok(Some(FromProxy::Hello { protocol, pid, .. })) => anyhow::bail!(
            "the L7 proxy (pid {pid}) speaks protocol {protocol}, this agent {PROTOCOL}: stop it (it is from another build)"
        ),
        other => anyhow::bail!(
            "the L7 proxy did not say hello (a proxy from another build?): {other:?}"
        ),
    }
}

fn read_from_proxy(stream: &UnixStream, sink: &dyn Sink) {
    let mut r = BufReader::with_capacity(1 << 16, stream);
    loop {
        match recv(&mut r) {
            Ok(Some(FromProxy::Records(rs))) => rs.into_iter().for_each(|r| sink.record(r.into())),
            Ok(Some(FromProxy::Stats(v))) => sink.stats(v),
            Ok(Some(FromProxy::Hello { .. })) => {}
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(error = %e, "reading from the L7 proxy");
                return;
            }
        }
    }
}

/// The proxy's policy: the last snapshot the agent sent.
pub struct SnapshotPolicy {
    snapshot: RwLock<Arc<Snapshot>>,
    compiled: CompiledRules,
    records: RecordQueue,
}

impl proxy::Policy for SnapshotPolicy {
    fn connection(&self, client: SocketAddrV4, dst: SocketAddrV4) -> Option<proxy::Connection> {
        let snapshot = self
            .snapshot
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        snapshot.connection(client, dst, &self.compiled)
    }

    fn dns(&self, _: SocketAddrV4, _: SocketAddrV4, _: bool) -> Option<proxy::dns::DnsConnection> {
        // DNS stays with the agent (what it learns goes into its maps).
        None
    }

    fn learned(&self, _: Ipv4Addr, _: &str, _: &[(Ipv4Addr, u32)]) {}

    fn refresh_learned(&self, _: Ipv4Addr, _: &str, _: &[(Ipv4Addr, u32)]) -> bool {
        false
    }

    fn record(&self, record: flow::record::L7Record) {
        self.records.push(record);
    }
}

/// Flows on their way to the agent (kept while it is away). The sender
/// takes them in batches every `BATCH_EVERY`: a wake-up, a write and the
/// agent's read per flow cost more CPU than the request they describe.
#[derive(Default)]
struct RecordQueue {
    queue: Mutex<VecDeque<flow::record::L7Record>>,
}

/// How often flows go to the agent (their delay in the agent's API).
const BATCH_EVERY: Duration = Duration::from_millis(20);

impl RecordQueue {
    fn push(&self, r: flow::record::L7Record) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        if q.len() >= QUEUE_LIMIT {
            q.pop_front();
        }
        q.push_back(r);
    }

    /// Waits `BATCH_EVERY`; the flows there are then.
    fn take(&self) -> Vec<flow::record::L7Record> {
        std::thread::sleep(BATCH_EVERY);
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        q.drain(..).collect()
    }

    /// Puts back flows an agent did not get (at the front, in order).
    fn unsend(&self, rs: Vec<flow::record::L7Record>) {
        let mut q = self.queue.lock().unwrap_or_else(|e| e.into_inner());
        for r in rs.into_iter().rev() {
            if q.len() >= QUEUE_LIMIT {
                break;
            }
            q.push_front(r);
        }
    }
}

/// The proxy process's options (`fibril-l7proxy --help`).
#[derive(Debug, Clone)]
pub struct ProcessConfig {
    pub state_dir: PathBuf,
    pub port: u16,
    pub http: proxy::http::Config,
}

/// Runs the proxy process until its socket file is removed.
pub fn run_process(config: ProcessConfig) -> anyhow::Result<()> {
    let socket = config.state_dir.join(SOCKET_FILE);
    let listener = match proxy::socket::listen(config.port) {
        Ok(l) => l,
        // The previous port, taken by now: any (the agent gets the port
        // from the hello; an agent whose datapath has the old one says so).
        Err(e) if config.port != 0 => {
            tracing::warn!(port = config.port, error = %e, "port taken: binding any");
            proxy::socket::listen(0)?
        }
        Err(e) => return Err(e).context("binding the L7 proxy"),
    };
    let port = listener.local_addr()?.port();
    // Upstream sockets carry the mark of this port's redirect, so that the
    // datapath does not redirect them again.
    let http = proxy::http::Config {
        from_mark: datapath::ProxyRedirect::for_port(port).mark_from,
        ..config.http
    };
    std::fs::remove_file(&socket).ok();
    let control =
        UnixListener::bind(&socket).with_context(|| format!("binding {}", socket.display()))?;
    std::fs::set_permissions(&socket, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    std::fs::write(
        config.state_dir.join(PID_FILE),
        std::process::id().to_string(),
    )?;
    let policy = Arc::new(SnapshotPolicy {
        snapshot: RwLock::new(Arc::default()),
        compiled: CompiledRules::default(),
        records: RecordQueue::default(),
    });
    let stats = Arc::new(proxy::Stats::default());
    proxy::workers::spawn_http(listener, policy.clone(), http, stats.clone())?;
    tracing::info!(port, "L7 proxy ready");
    watch_socket_file(socket);
    // One agent at a time: a new connection replaces the old.
    for agent in control.incoming() {
        let Ok(agent) = agent else { continue };
        if let Err(e) = serve_agent(agent, port, &policy, &stats) {
            tracing::warn!(error = %e, "agent connection");
        }
    }
    Ok(())
}

/// Exits the process once `socket` is gone (its state directory removed).
fn watch_socket_file(socket: PathBuf) {
    std::thread::spawn(move || loop {
        std::thread::sleep(Duration::from_secs(1));
        if !Path::new(&socket).exists() {
            tracing::info!("socket removed: stopping");
            std::process::exit(0);
        }
    });
}

/// Says hello, then sends flows and counters to `agent` on a thread while
/// reading its snapshots here, until it goes.
fn serve_agent(
    agent: UnixStream,
    port: u16,
    policy: &Arc<SnapshotPolicy>,
    stats: &Arc<proxy::Stats>,
) -> std::io::Result<()> {
    let mut w = agent.try_clone()?;
    send(
        &mut w,
        &FromProxy::Hello {
            protocol: PROTOCOL,
            port,
            pid: std::process::id(),
        },
    )?;
    let gone = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (policy, stats, gone) = (policy.clone(), stats.clone(), gone.clone());
        std::thread::spawn(move || {
            let mut last_stats = Vec::new();
            while !gone.load(std::sync::atomic::Ordering::Relaxed) {
                let records = policy.records.take();
                if !records.is_empty() {
                    let batch: Vec<WireRecord> = records.iter().map(Into::into).collect();
                    if send(&mut w, &FromProxy::Records(batch)).is_err() {
                        // Kept for the next agent.
                        policy.records.unsend(records);
                        return;
                    }
                }
                // Counters when they moved (after the flows that moved
                // them), so the agent's metrics lag by one wake-up at most.
                let values: Vec<u64> = stats.snapshot().iter().map(|(_, _, v)| *v).collect();
                if values != last_stats {
                    if send(&mut w, &FromProxy::Stats(values.clone())).is_err() {
                        return;
                    }
                    last_stats = values;
                }
            }
        })
    };
    let mut r = BufReader::new(&agent);
    let read = loop {
        match recv(&mut r) {
            Ok(Some(ToProxy::Snapshot(s))) => {
                *policy.snapshot.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(s);
            }
            Ok(Some(ToProxy::Update(u))) => {
                let mut snapshot = policy.snapshot.write().unwrap_or_else(|e| e.into_inner());
                // In place unless a connection's check holds it right now.
                Arc::make_mut(&mut snapshot).apply(&u);
            }
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    gone.store(true, std::sync::atomic::Ordering::Relaxed);
    writer.join().ok();
    read
}
