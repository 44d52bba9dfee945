//! The agent's local API: one JSON request per line on a Unix socket that
//! only root can open; one JSON response per line. (Flows are served by the
//! Hubble gRPC API, not here.)
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Host-side interface name for an attachment: stable and unique per
/// (container, ifname), at most 15 characters.
pub fn host_ifname(container_id: &str, ifname: &str) -> String {
    let mut h: u64 = 0xcbf29ce484222325;
    for b in container_id.bytes().chain([0]).chain(ifname.bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    format!("fib{:011x}", h & 0xfff_ffff_ffff)
}

pub mod service;
pub use service::Service;

/// Default socket of the agent.
pub const DEFAULT_SOCKET: &str = "/run/fibril/agent.sock";

/// The HTTP proxy process's pid file in the agent's state directory (it
/// outlives the agent; whoever removes the node stops it).
pub const L7_PROXY_PID_FILE: &str = "l7proxy.pid";

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    Status,
    /// Registers a pod's metadata (what Kubernetes would tell the agent).
    PodUpsert(Pod),
    PodDelete {
        namespace: String,
        name: String,
    },
    /// Changes a known pod's labels (`kubectl label`): `set` put, `remove`
    /// taken away; its endpoints move to the identity of the result.
    PodLabel {
        namespace: String,
        name: String,
        #[serde(default)]
        set: BTreeMap<String, String>,
        #[serde(default)]
        remove: Vec<String>,
    },
    /// CNI ADD: create the endpoint of a pod in `netns`.
    EndpointAdd(Attachment),
    /// CNI DEL: idempotent.
    EndpointDel {
        container_id: String,
        ifname: String,
    },
    /// CNI CHECK.
    EndpointCheck(Attachment),
    /// CNI GC: remove every endpoint not in `valid`.
    EndpointGc {
        valid: Vec<AttachmentId>,
    },
    EndpointList,
    IdentityList,
    /// Imports every policy in `yaml` (all or nothing).
    PolicyImport {
        file: String,
        yaml: String,
        namespace: Option<String>,
    },
    PolicyGet,
    /// `namespace/name` or a cluster-wide policy's `name`.
    PolicyDelete {
        key: String,
    },
    /// Explains the verdict for a connection between two pods (or a pod
    /// and an address), with the rule that decides it.
    PolicyTrace(TraceRequest),
    /// Puts a namespace in (or out of) audit mode.
    NamespaceAudit {
        namespace: String,
        audit: bool,
    },
    /// The DNS names the DNS proxy learned (toFQDNs), with their addresses.
    FqdnList,
    /// Re-evaluates every tracked connection against the policy now in
    /// force and cuts those it no longer allows (`policy import
    /// --enforce-established`): established connections otherwise keep
    /// going until they close, as in Cilium.
    EnforceEstablished,
    /// Conntrack entries (at most `CONNTRACK_LIST_MAX`), optionally only
    /// those to or from `address`.
    ConntrackList {
        #[serde(default)]
        address: Option<std::net::Ipv4Addr>,
    },
    /// Adds or replaces a service (with its backends): what Kubernetes'
    /// Service and EndpointSlices say, here from a lab or a user.
    ServiceUpsert(Service),
    ServiceDelete {
        namespace: String,
        name: String,
    },
    /// The services and their frontends (`fibril service list`).
    ServiceList,
    /// The XDP prefilter: its device, listed prefixes and counters
    /// (`fibril prefilter list`).
    PrefilterList,
    /// Adds and removes source prefixes (`A.B.C.D/N`) of the XDP
    /// prefilter; every one is checked before anything changes.
    PrefilterUpdate {
        #[serde(default)]
        add: Vec<String>,
        #[serde(default)]
        remove: Vec<String>,
    },
}

/// The XDP prefilter as the agent runs it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrefilterInfo {
    /// The device it is attached to (None: not enabled on this node).
    pub device: Option<String>,
    /// `native` or `generic`.
    #[serde(default)]
    pub mode: String,
    /// The dropped source prefixes, `A.B.C.D/N`, in address order.
    pub cidrs: Vec<String>,
    pub dropped_packets: u64,
    pub dropped_bytes: u64,
    pub passed_packets: u64,
}

/// The most prefixes the XDP prefilter holds (its map's size).
pub const PREFILTER_MAX: usize = 65_536;

/// The most conntrack entries one `ConntrackList` answer carries.
pub const CONNTRACK_LIST_MAX: usize = 10_000;

/// One conntrack entry (`fibril ct list`), as the program of the endpoint
/// that tracks it sees it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ConntrackInfo {
    /// IP protocol number.
    pub protocol: u8,
    /// The opener, `address:port`.
    pub source: String,
    pub destination: String,
    /// `ingress` or `egress`, relative to the tracking endpoint.
    pub direction: String,
    /// Seconds until it expires (negative: expired, not yet evicted).
    pub expires_in_s: i64,
    /// `closing`, `proxy-redirect`, `from-proxy`, `dns`.
    pub flags: Vec<String>,
    pub packets: u64,
    pub bytes: u64,
}

/// One learned DNS name (`fibril fqdn list`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FqdnInfo {
    pub name: String,
    /// Address and expiry (Unix seconds).
    pub ips: Vec<(std::net::Ipv4Addr, u64)>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pod {
    pub namespace: String,
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub namespace_labels: BTreeMap<String, String>,
    #[serde(default)]
    pub service_account: Option<String>,
    /// Declared container ports (for named ports in policies).
    #[serde(default)]
    pub ports: Vec<policy::NamedPort>,
    /// The pod's owners (Deployment, StatefulSet, ...), shown in flows.
    #[serde(default)]
    pub workloads: Vec<flow::Workload>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AttachmentId {
    pub container_id: String,
    pub ifname: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Attachment {
    pub container_id: String,
    pub ifname: String,
    pub netns: String,
    pub namespace: String,
    pub pod: String,
}

/// One end of a traced connection: `namespace/pod`, or an IPv4 address.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct TraceRequest {
    pub from: String,
    pub to: String,
    /// IP protocol number (6 TCP, 17 UDP, 132 SCTP, 1 ICMP).
    pub protocol: u8,
    /// Destination port (ICMP: the type).
    pub port: u16,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct EndpointInfo {
    pub id: u32,
    pub namespace: String,
    pub pod_name: String,
    pub container_id: String,
    pub ifname: String,
    pub host_ifname: String,
    pub ipv4: String,
    pub identity: u32,
    pub labels: Vec<String>,
    #[serde(flatten)]
    pub enforcement: Enforcement,
    pub policy_entries: usize,
    /// Its policy did not fit the policy map: it fails closed.
    pub policy_overflow: bool,
}

/// What an endpoint's policy enforces, per direction (pods and the host
/// endpoint alike; flattened into their JSON).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enforcement {
    pub ingress_enforced: bool,
    pub egress_enforced: bool,
    /// The policies whose default deny selects it, per direction
    /// (`namespace/name`, or a cluster-wide policy's name): what a drop no
    /// rule allowed is "default deny, selected by".
    #[serde(default)]
    pub ingress_selected_by: Vec<String>,
    #[serde(default)]
    pub egress_selected_by: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IdentityInfo {
    pub id: u32,
    pub labels: Vec<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StatusInfo {
    pub node_name: String,
    pub pod_cidr: String,
    pub endpoints: usize,
    pub identities: usize,
    pub policies: usize,
    pub flows_seen: u64,
    pub flows_buffered: usize,
    pub flow_capacity: usize,
    pub events_lost_kernel: u64,
    pub ct_entries: usize,
    /// Conntrack entries one endpoint's traffic may hold (0: no budget).
    #[serde(default)]
    pub ct_endpoint_budget: u32,
    /// The most entries one endpoint's traffic holds (last census).
    #[serde(default)]
    pub ct_busiest_endpoint: u32,
    /// New connections refused at an endpoint's budget, since the start.
    #[serde(default)]
    pub ct_budget_overflows: u64,
    /// Endpoints failing closed because their policy did not fit.
    pub policy_overflows: usize,
    pub uptime_seconds: u64,
    /// The L7 proxy's socket shortcut; None when not attached.
    #[serde(default)]
    pub proxy_shortcut: Option<ProxyShortcutInfo>,
    /// Kvstore mode: the cluster as this node sees it; None alone.
    #[serde(default)]
    pub cluster: Option<ClusterInfo>,
    /// Kubernetes mode: the API server the policies come from.
    #[serde(default)]
    pub kubernetes: Option<KubernetesInfo>,
    /// The host firewall, when on: what the node's own policy enforces.
    #[serde(default)]
    pub host_firewall: Option<HostFirewallInfo>,
    /// Kube-proxy replacement, when on.
    #[serde(default)]
    pub kube_proxy_replacement: Option<KubeProxyReplacementInfo>,
}

/// The host endpoint as the host firewall enforces it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFirewallInfo {
    pub devices: Vec<String>,
    pub audit: bool,
    /// The node's labels (what host policies' nodeSelectors match).
    pub labels: Vec<String>,
    /// The host policies selecting this node and what they enforce.
    #[serde(flatten)]
    pub enforcement: Enforcement,
}

/// Kube-proxy replacement as the node runs it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubeProxyReplacementInfo {
    pub devices: Vec<String>,
    pub maglev_table_size: u32,
}

/// Kubernetes mode as one node sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KubernetesInfo {
    pub kubeconfig: String,
    /// Whether the API server was reached and the CRDs installed.
    pub connected: bool,
}

/// The cluster as one node sees it (kvstore mode).
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ClusterInfo {
    /// The etcd endpoints.
    pub kvstore: Vec<String>,
    /// etcd's version when this node is connected; None when it is not.
    pub etcd_version: Option<String>,
    /// Nodes serving Hubble, `cluster/node`.
    pub nodes: Vec<String>,
    /// The cluster's identities (other nodes' pods' included).
    pub identities: usize,
    /// Other nodes' endpoints this node knows.
    pub remote_endpoints: usize,
}

/// Counters of the L7 proxy's socket shortcut.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ProxyShortcutInfo {
    /// Proxied connection ends (sockets) whose payload goes socket to socket.
    pub sockets: u64,
    /// Sends moved straight into the other end's receive queue.
    pub redirected: u64,
    /// Sends that took the TCP/IP stack (the other end was not known).
    pub plain: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct AddResult {
    pub ipv4: String,
    pub gateway: String,
    pub pod_mac: String,
    pub host_ifname: String,
    pub host_mac: String,
}

/// Why the agent refused or failed a request: what a caller (the CNI
/// plugin's error codes, a runtime's retry) decides on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The request itself is wrong (names, paths, values).
    Invalid,
    /// What it names does not exist (an endpoint, a policy).
    NotFound,
    /// It conflicts with what exists (an interface already attached).
    Conflict,
    /// A pool ran out (pod addresses, endpoint ids).
    Exhausted,
    /// Setting up the pod's network failed (links, addresses, routes).
    Network,
    /// Loading or updating the datapath failed.
    Datapath,
    /// Anything else: state storage, internal failures.
    #[default]
    Internal,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Response {
    Ok,
    Error {
        message: String,
        /// What kind of failure (absent from older agents: `Internal`).
        /// Not `kind`: that names the response.
        #[serde(default)]
        cause: ErrorKind,
    },
    Status(StatusInfo),
    Added(AddResult),
    Endpoints {
        endpoints: Vec<EndpointInfo>,
    },
    Identities {
        identities: Vec<IdentityInfo>,
    },
    Imported {
        policies: Vec<String>,
        skipped: Vec<String>,
        warnings: Vec<String>,
    },
    Policies {
        policies: Vec<policy::Policy>,
    },
    Fqdn {
        names: Vec<FqdnInfo>,
    },
    /// `EnforceEstablished`: connections checked and cut.
    Enforced {
        checked: usize,
        cut: usize,
    },
    Conntrack {
        entries: Vec<ConntrackInfo>,
        /// More entries matched than one answer carries.
        truncated: bool,
    },
    Services {
        services: Vec<Service>,
    },
    Prefilter(PrefilterInfo),
    Trace {
        from: String,
        to: String,
        from_identity: u32,
        to_identity: u32,
        /// `None` when that side is not a local endpoint.
        egress: Option<Decision>,
        ingress: Option<Decision>,
        allowed: bool,
    },
}

/// What one side's policy says about a connection (`policy trace`): the
/// API's own form of the engine's decision, so that the wire does not move
/// with the engine's internals.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "decision")]
pub enum Decision {
    /// No policy selects the endpoint in this direction.
    NotEnforced,
    Allowed {
        by: RuleRef,
        /// The kind of L7 rules the proxy then applies (`http`, `dns` ...).
        l7: Option<String>,
    },
    Denied {
        by: RuleRef,
    },
    /// Selected, and no rule allows it.
    DefaultDeny {
        selected_by: Vec<String>,
    },
    /// Would be denied, but only by policies in audit mode.
    Audited {
        would_be: Box<Decision>,
    },
}

/// A rule as decisions name it: its policy, rule and entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuleRef {
    pub kind: String,
    /// `namespace/name`, or the name of a clusterwide policy.
    pub policy: String,
    pub rule: usize,
    /// `ingress` or `egress`.
    pub direction: String,
    pub entry: usize,
}

impl From<&policy::Origin> for RuleRef {
    fn from(o: &policy::Origin) -> Self {
        RuleRef {
            kind: o.kind.to_string(),
            policy: o.policy.to_string(),
            rule: o.rule,
            direction: match o.direction {
                policy::Direction::Ingress => "ingress",
                policy::Direction::Egress => "egress",
            }
            .into(),
            entry: o.entry,
        }
    }
}

impl From<&policy::Decision> for Decision {
    fn from(d: &policy::Decision) -> Self {
        match d {
            policy::Decision::NotEnforced => Decision::NotEnforced,
            policy::Decision::Allowed { by, l7 } => Decision::Allowed {
                by: by.into(),
                l7: l7.as_ref().map(|l| l.kind().to_string()),
            },
            policy::Decision::Denied { by } => Decision::Denied { by: by.into() },
            policy::Decision::DefaultDeny { selected_by } => Decision::DefaultDeny {
                selected_by: selected_by.clone(),
            },
            policy::Decision::Audited { would_be } => Decision::Audited {
                would_be: Box::new((&**would_be).into()),
            },
        }
    }
}

impl Decision {
    /// Whether the connection gets through on this side.
    pub fn passes(&self) -> bool {
        matches!(
            self,
            Decision::NotEnforced | Decision::Allowed { .. } | Decision::Audited { .. }
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "cannot reach the agent at {path}: {error} (is it running? `fibril lab up` starts one)"
    )]
    Connect {
        path: String,
        // Not `source`: the message says it, and error chains (`{:#}`)
        // would say it a second time.
        error: std::io::Error,
    },
    #[error("the agent at {path} did not answer within {seconds} s")]
    Timeout { path: String, seconds: f64 },
    #[error("talking to the agent: {0}")]
    Io(std::io::Error),
    #[error("the agent sent something that is not a response: {0}")]
    Decode(serde_json::Error),
    #[error("the agent closed the connection")]
    Closed,
    #[error("{message}")]
    Agent { message: String, cause: ErrorKind },
}

// By hand, not `#[from]`: that would make the inner error a `source` as
// well, and error chains would print it twice.
impl From<std::io::Error> for ClientError {
    fn from(e: std::io::Error) -> Self {
        ClientError::Io(e)
    }
}

impl From<serde_json::Error> for ClientError {
    fn from(e: serde_json::Error) -> Self {
        ClientError::Decode(e)
    }
}

/// A connection to the agent.
pub struct Client {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    path: String,
    timeout: Option<Duration>,
}

/// How long `Client::connect` waits for the agent, per connect and per
/// call (a policy import of many large files stays well within it).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(120);

impl Client {
    pub fn connect(path: &Path) -> Result<Self, ClientError> {
        Self::connect_timeout(path, CALL_TIMEOUT)
    }

    /// Connects within `timeout` (an agent that does not accept, its
    /// backlog full, is waited for no longer) and bounds every call by it.
    pub fn connect_timeout(path: &Path, timeout: Duration) -> Result<Self, ClientError> {
        let shown = path.display().to_string();
        let deadline = std::time::Instant::now() + timeout;
        let s = loop {
            let sock = socket2::Socket::new(socket2::Domain::UNIX, socket2::Type::STREAM, None)?;
            sock.set_nonblocking(true)?;
            let addr = socket2::SockAddr::unix(path)?;
            match sock.connect(&addr) {
                Ok(()) => break sock,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if std::time::Instant::now() >= deadline {
                        return Err(ClientError::Timeout {
                            path: shown,
                            seconds: timeout.as_secs_f64(),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(error) => return Err(ClientError::Connect { path: shown, error }),
            }
        };
        s.set_nonblocking(false)?;
        let s: UnixStream = s.into();
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        let writer = s.try_clone()?;
        Ok(Self {
            reader: BufReader::new(s),
            writer,
            path: shown,
            timeout: Some(timeout),
        })
    }

    fn timed_out(&self, e: std::io::Error) -> ClientError {
        match (e.kind(), self.timeout) {
            (std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut, Some(t)) => {
                ClientError::Timeout {
                    path: self.path.clone(),
                    seconds: t.as_secs_f64(),
                }
            }
            _ => ClientError::Io(e),
        }
    }

    pub fn set_read_timeout(&mut self, t: Option<Duration>) -> Result<(), ClientError> {
        self.writer.set_read_timeout(t)?;
        self.timeout = t;
        Ok(())
    }

    pub fn send(&mut self, req: &Request) -> Result<(), ClientError> {
        let mut line = serde_json::to_vec(req)?;
        line.push(b'\n');
        self.writer
            .write_all(&line)
            .map_err(|e| self.timed_out(e))?;
        Ok(())
    }

    /// Reads one response; agent errors come back as `ClientError::Agent`.
    pub fn recv(&mut self) -> Result<Response, ClientError> {
        let mut line = String::new();
        let read = self.reader.read_line(&mut line);
        if read.map_err(|e| self.timed_out(e))? == 0 {
            return Err(ClientError::Closed);
        }
        match serde_json::from_str(&line)? {
            Response::Error { message, cause } => Err(ClientError::Agent { message, cause }),
            r => Ok(r),
        }
    }

    /// One request, one response.
    pub fn call(&mut self, req: &Request) -> Result<Response, ClientError> {
        self.send(req)?;
        self.recv()
    }
}

/// Connects and makes one call.
pub fn call(socket: &Path, req: &Request) -> Result<Response, ClientError> {
    Client::connect(socket)?.call(req)
}

#[cfg(test)]
mod client_error_tests {
    use super::ClientError;

    /// Each error says its cause once, in `{}` and in a chain alike.
    #[test]
    fn client_errors_say_their_cause_once() {
        let cases = [
            ClientError::Connect {
                path: "/x.sock".into(),
                error: std::io::ErrorKind::NotFound.into(),
            },
            ClientError::Io(std::io::ErrorKind::BrokenPipe.into()),
        ];
        for e in cases {
            let cause = match &e {
                ClientError::Connect { error, .. } | ClientError::Io(error) => error.to_string(),
                _ => unreachable!(),
            };
            // What an error chain (anyhow's `{:#}`) prints.
            let mut chain = e.to_string();
            let mut next = std::error::Error::source(&e);
            while let Some(inner) = next {
                chain += &format!(": {inner}");
                next = inner.source();
            }
            assert_eq!(chain.matches(&cause).count(), 1, "{chain}");
        }
    }
}
