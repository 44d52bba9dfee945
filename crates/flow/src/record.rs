//! The flow record, serialised exactly as `hubble observe -o json` prints a
//! `flow.Flow` (snake_case keys, enum names, `IP`/`Type`/`Summary` spellings).

use std::net::Ipv4Addr;

use abi::{ct_state, verdict, DropReason, EventType, FlowEvent, TracePoint};
use serde::{Deserialize, Serialize};

use crate::enums::{
    self, FlowType, IpVersion, L7FlowType, TraceObservationPoint, TraceReason, TrafficDirection,
    Verdict,
};

/// A string field whose values are mostly a fixed vocabulary (verdicts,
/// types, directions, HTTP methods): the common values are borrowed, so
/// building a flow does not allocate them (and dropping one does not free
/// them).
pub type Text = std::borrow::Cow<'static, str>;

/// A short string of a flow's (addresses, MACs, the node's and interface's
/// names, the summary): up to 24 bytes are kept inside the flow, so making
/// one costs no allocation and dropping one no free; every datapath event
/// makes six of them.
pub type InlineText = compact_str::CompactString;

/// `m` as `Text`, borrowed when it is one of `known`.
fn known_text(m: &str, known: &[&'static str]) -> Text {
    match known.iter().find(|k| **k == m) {
        Some(k) => (*k).into(),
        None => m.to_string().into(),
    }
}

/// An HTTP method for a flow: the standard ones without an allocation.
pub fn http_method(m: &str) -> Text {
    known_text(
        m,
        &[
            "GET", "POST", "PUT", "DELETE", "HEAD", "OPTIONS", "PATCH", "CONNECT", "TRACE",
        ],
    )
}

/// An HTTP version for a flow (`HTTP/1.1`), borrowed for the usual ones.
pub fn http_protocol(p: &str) -> Text {
    known_text(p, &["HTTP/1.1", "HTTP/2", "HTTP/1.0"])
}

/// `flow.Service`: a Kubernetes service by name (JSON keys in the proto's
/// order).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ServiceRef {
    pub name: String,
    pub namespace: String,
}

/// A service as flows name it, shared by all of them.
pub type SharedServiceRef = std::sync::Arc<ServiceRef>;

/// A policy attribution, shared by every flow it decided.
pub type SharedPolicyRef = std::sync::Arc<PolicyRef>;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    #[serde(rename = "ID", default, skip_serializing_if = "is_zero")]
    pub id: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub identity: u32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub cluster_name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub pod_name: String,
    /// The pod's owning workloads (e.g. Deployment `frontend`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub workloads: Vec<Workload>,
}

/// A pod's owner, as `flow.Workload` (JSON keys in declaration order).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Workload {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub kind: String,
}

impl Workload {
    /// A workload is an owner object: a kind (`Deployment`) and a name that is a
    /// Kubernetes object name (lower-case DNS subdomain, at most 253 bytes).
    pub fn validate(&self) -> Result<(), String> {
        let w = self;
        let kind_ok = w
            .kind
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_uppercase())
            && w.kind.len() <= 63
            && w.kind.chars().all(|c| c.is_ascii_alphanumeric());
        if !kind_ok {
            return Err(format!(
                "workload kind {:?} is not a Kubernetes kind (e.g. Deployment)",
                w.kind
            ));
        }
        let name_ok = !w.name.is_empty()
            && w.name.len() <= 253
            && w.name
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
            && !w.name.starts_with(['-', '.'])
            && !w.name.ends_with(['-', '.']);
        if !name_ok {
            return Err(format!(
                "workload name {:?} is not a Kubernetes object name",
                w.name
            ));
        }
        Ok(())
    }
}

fn is_zero(v: &u32) -> bool {
    *v == 0
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ethernet {
    pub source: InlineText,
    pub destination: InlineText,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ip {
    pub source: InlineText,
    pub destination: InlineText,
    #[serde(rename = "ipVersion")]
    pub ip_version: IpVersion,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpFlags {
    #[serde(rename = "FIN", default, skip_serializing_if = "std::ops::Not::not")]
    pub fin: bool,
    #[serde(rename = "SYN", default, skip_serializing_if = "std::ops::Not::not")]
    pub syn: bool,
    #[serde(rename = "RST", default, skip_serializing_if = "std::ops::Not::not")]
    pub rst: bool,
    #[serde(rename = "PSH", default, skip_serializing_if = "std::ops::Not::not")]
    pub psh: bool,
    #[serde(rename = "ACK", default, skip_serializing_if = "std::ops::Not::not")]
    pub ack: bool,
    #[serde(rename = "URG", default, skip_serializing_if = "std::ops::Not::not")]
    pub urg: bool,
}

impl TcpFlags {
    pub fn from_bits(b: u8) -> Self {
        Self {
            fin: b & 0x01 != 0,
            syn: b & 0x02 != 0,
            rst: b & 0x04 != 0,
            psh: b & 0x08 != 0,
            ack: b & 0x10 != 0,
            urg: b & 0x20 != 0,
        }
    }

    /// `SYN, ACK` in Hubble's order.
    pub fn summary(&self) -> InlineText {
        let mut s = InlineText::default();
        for (set, name) in [
            (self.syn, "SYN"),
            (self.ack, "ACK"),
            (self.rst, "RST"),
            (self.fin, "FIN"),
            (self.psh, "PSH"),
            (self.urg, "URG"),
        ] {
            if set {
                if !s.is_empty() {
                    s.push_str(", ");
                }
                s.push_str(name);
            }
        }
        s
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tcp {
    pub source_port: u16,
    pub destination_port: u16,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flags: Option<TcpFlags>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Udp {
    pub source_port: u16,
    pub destination_port: u16,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Icmp {
    #[serde(rename = "type", default)]
    pub r#type: u32,
    #[serde(default)]
    pub code: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer4 {
    #[serde(rename = "TCP", default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<Tcp>,
    #[serde(rename = "UDP", default, skip_serializing_if = "Option::is_none")]
    pub udp: Option<Udp>,
    #[serde(rename = "SCTP", default, skip_serializing_if = "Option::is_none")]
    pub sctp: Option<Udp>,
    #[serde(rename = "ICMPv4", default, skip_serializing_if = "Option::is_none")]
    pub icmpv4: Option<Icmp>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventTypeField {
    #[serde(rename = "type")]
    pub r#type: i32,
    #[serde(default, skip_serializing_if = "is_zero_i32")]
    pub sub_type: i32,
}

fn is_zero_i32(v: &i32) -> bool {
    *v == 0
}

/// One flow, as Hubble's `flow.Flow` JSON.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Flow {
    /// When the event happened; RFC 3339 with nanoseconds (UTC) in JSON.
    pub time: Time,
    pub uuid: String,
    pub verdict: Verdict,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub drop_reason: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ethernet: Option<Ethernet>,
    #[serde(rename = "IP", default, skip_serializing_if = "Option::is_none")]
    pub ip: Option<Ip>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l4: Option<Layer4>,
    /// Shared: every flow of an endpoint points at one copy.
    #[serde(default)]
    pub source: std::sync::Arc<Endpoint>,
    #[serde(default)]
    pub destination: std::sync::Arc<Endpoint>,
    #[serde(rename = "Type")]
    pub r#type: FlowType,
    #[serde(default, skip_serializing_if = "InlineText::is_empty")]
    pub node_name: InlineText,
    /// DNS names the source's / destination's address was learned for.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub source_names: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub destination_names: Vec<String>,
    /// Requests and responses seen by the L7 proxy (Type L7).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub l7: Option<Layer7>,
    pub event_type: EventTypeField,
    /// The service a translated packet's source or destination was
    /// (the datapath's load balancing; the ends stay the pods).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_service: Option<SharedServiceRef>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination_service: Option<SharedServiceRef>,
    #[serde(default, skip_serializing_if = "TrafficDirection::is_unset")]
    pub traffic_direction: TrafficDirection,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub policy_match_type: u32,
    #[serde(default, skip_serializing_if = "TraceObservationPoint::is_unset")]
    pub trace_observation_point: TraceObservationPoint,
    #[serde(default, skip_serializing_if = "TraceReason::is_unset")]
    pub trace_reason: TraceReason,
    #[serde(default, skip_serializing_if = "enums::DropReason::is_unset")]
    pub drop_reason_desc: enums::DropReason,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_reply: Option<bool>,
    /// Where the datapath saw the packet (the endpoint's host-side veth).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<NetworkInterface>,
    #[serde(rename = "Summary", default)]
    pub summary: InlineText,
    /// The policies that allowed or denied the flow (Hubble's attribution).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress_allowed_by: Vec<SharedPolicyRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress_allowed_by: Vec<SharedPolicyRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub egress_denied_by: Vec<SharedPolicyRef>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ingress_denied_by: Vec<SharedPolicyRef>,
    /// Trace-sock flows (socket LB): where the call was seen, the socket
    /// and its cgroup (uint64s are strings in protobuf's JSON).
    #[serde(
        default,
        skip_serializing_if = "enums::SocketTranslationPoint::is_unset"
    )]
    pub sock_xlate_point: enums::SocketTranslationPoint,
    #[serde(default, skip_serializing_if = "is_zero_u64", with = "u64_text")]
    pub socket_cookie: u64,
    #[serde(default, skip_serializing_if = "is_zero_u64", with = "u64_text")]
    pub cgroup_id: u64,
}

/// A uint64 as protobuf's JSON writes it (a string), read from a string or
/// a number.
mod u64_text {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Text<'a> {
            Number(u64),
            String(std::borrow::Cow<'a, str>),
        }
        match Text::deserialize(d)? {
            Text::Number(n) => Ok(n),
            Text::String(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// `flow.Layer7`: what the L7 proxy saw (keys in declaration order).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layer7 {
    /// REQUEST, RESPONSE or SAMPLE.
    #[serde(rename = "type")]
    pub r#type: L7FlowType,
    /// Responses: time since the request (64-bit: a JSON string).
    #[serde(default, skip_serializing_if = "is_zero_u64", with = "u64_as_string")]
    pub latency_ns: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dns: Option<Dns>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http: Option<Http>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kafka: Option<Kafka>,
}

/// `flow.Kafka` (deprecated in Hubble's API, still filled and filtered
/// on: `--protocol kafka`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kafka {
    #[serde(default, skip_serializing_if = "is_zero_i32")]
    pub error_code: i32,
    #[serde(default, skip_serializing_if = "is_zero_i32")]
    pub api_version: i32,
    /// Cilium's name of the request's key (`produce`, `fetch`, ...; the
    /// number for keys it has no name for).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub api_key: String,
    #[serde(default, skip_serializing_if = "is_zero_i32")]
    pub correlation_id: i32,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub topic: String,
}

impl Kafka {
    /// Hubble's Summary: `Kafka request produce correlation id 7 topic
    /// 'deathstar-plans'`; a response adds `return code N`.
    pub fn summary(&self, response: bool) -> String {
        let kind = if response { "response" } else { "request" };
        let mut s = format!(
            "Kafka {kind} {} correlation id {} topic '{}'",
            self.api_key, self.correlation_id, self.topic
        );
        if response {
            s.push_str(&format!(" return code {}", self.error_code));
        }
        s
    }
}

/// `flow.DNS`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub query: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<String>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub ttl: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cnames: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub observation_source: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub rcode: u32,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub qtypes: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rrtypes: Vec<String>,
}

impl Dns {
    /// Hubble's Summary: `DNS Query cilium.io. A`, or for a response
    /// `DNS Answer "1.2.3.4" TTL: 3600 (Proxy cilium.io. A)`.
    pub fn summary(&self, response: bool) -> String {
        let qtypes = self.qtypes.join(",");
        if !response {
            return format!("DNS Query {} {qtypes}", self.query);
        }
        let answer = if self.rcode != 0 {
            format!("RCode: {}", rcode_name(self.rcode))
        } else {
            let mut a = format!("{:?} TTL: {}", self.ips.join(","), self.ttl);
            if !self.cnames.is_empty() {
                a = format!("{a} CNAMEs: {:?}", self.cnames.join(","));
            }
            a
        };
        let source = if self.observation_source == "proxy" {
            "Proxy"
        } else {
            "Query"
        };
        format!("DNS Answer {answer} ({source} {} {qtypes})", self.query)
    }
}

/// DNS response codes by the names Hubble prints.
pub fn rcode_name(rcode: u32) -> &'static str {
    match rcode {
        0 => "NoError",
        1 => "FormErr",
        2 => "ServFail",
        3 => "NXDomain",
        4 => "NotImp",
        5 => "Refused",
        _ => "Unknown",
    }
}

/// `flow.HTTP`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Http {
    #[serde(default, skip_serializing_if = "is_zero")]
    pub code: u32,
    #[serde(default, skip_serializing_if = "str::is_empty")]
    pub method: Text,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub url: String,
    #[serde(default, skip_serializing_if = "str::is_empty")]
    pub protocol: Text,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub headers: Vec<HttpHeader>,
}

/// `flow.HTTPHeader`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpHeader {
    pub key: String,
    pub value: String,
}

impl Http {
    /// The Summary Hubble prints for a request (`HTTP/1.1 GET http://...`)
    /// or, given the latency, a response (`HTTP/1.1 200 2ms (GET http://...)`).
    pub fn summary(&self, response_latency_ns: Option<u64>) -> String {
        // `format!` would cost as much as the rest of the flow.
        let mut s =
            String::with_capacity(self.protocol.len() + self.method.len() + self.url.len() + 24);
        s.push_str(&self.protocol);
        s.push(' ');
        match response_latency_ns {
            None => {
                s.push_str(&self.method);
                s.push(' ');
                s.push_str(&self.url);
            }
            Some(ns) => {
                crate::text::push_dec(&mut s, self.code.into(), 1);
                s.push(' ');
                crate::text::push_dec(&mut s, ns / 1_000_000, 1);
                s.push_str("ms (");
                s.push_str(&self.method);
                s.push(' ');
                s.push_str(&self.url);
                s.push(')');
            }
        }
        s
    }
}

/// Protobuf JSON writes 64-bit integers as strings.
mod u64_as_string {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.to_string())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum N {
            S(String),
            N(u64),
        }
        match N::deserialize(d)? {
            N::S(s) => s.parse().map_err(serde::de::Error::custom),
            N::N(n) => Ok(n),
        }
    }
}

/// `flow.NetworkInterface`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkInterface {
    #[serde(default, skip_serializing_if = "is_zero")]
    pub index: u32,
    #[serde(default, skip_serializing_if = "InlineText::is_empty")]
    pub name: InlineText,
}

/// `flow.Policy`: a policy a flow is attributed to.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PolicyRef {
    pub name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub namespace: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    #[serde(default, skip_serializing_if = "is_zero_u64")]
    pub revision: u64,
    pub kind: String,
}

fn is_zero_u64(v: &u64) -> bool {
    *v == 0
}

/// What the agent knows about the two ends of a flow.
pub trait Enricher {
    /// The endpoint owning `ip` (or a bare endpoint with the identity) and
    /// the DNS names `ip` was learned for (toFQDNs): one lookup per end of a
    /// flow, as this runs for every flow.
    fn endpoint(&self, ip: Ipv4Addr, identity: u32) -> (std::sync::Arc<Endpoint>, Vec<String>);
    /// The policy (and rule) a datapath cookie stands for.
    fn policy(&self, _cookie: u32) -> Option<SharedPolicyRef> {
        None
    }
    /// The name of the interface the datapath saw the packet on.
    fn interface_name(&self, _ifindex: u32) -> Option<InlineText> {
        None
    }
    /// The service whose frontend is `addr:port` (a translated packet's).
    fn service(&self, _addr: Ipv4Addr, _port: u16) -> Option<SharedServiceRef> {
        None
    }
}

/// The `flow.DropReason` of a datapath drop code (the datapath numbers
/// its codes as the proto does; a code it does not define: unknown).
pub fn drop_reason(code: u8) -> enums::DropReason {
    match DropReason::from_u8(code) {
        Some(r) => enums::DropReason(r as i32),
        None => enums::DropReason::DROP_REASON_UNKNOWN,
    }
}

/// The `flow.Verdict` of a datapath verdict (numbered as the proto).
pub fn verdict(v: u8) -> Verdict {
    match v {
        verdict::FORWARDED
        | verdict::DROPPED
        | verdict::AUDIT
        | verdict::TRACED
        | verdict::TRANSLATED => Verdict(v.into()),
        _ => Verdict::VERDICT_UNKNOWN,
    }
}

/// The `flow.TraceObservationPoint` of a datapath trace point (the proto
/// numbers some apart from the datapath: TO_ENDPOINT is 101).
pub fn trace_point(point: u8) -> TraceObservationPoint {
    match TracePoint::from_u8(point) {
        Some(TracePoint::ToLxc) => TraceObservationPoint::TO_ENDPOINT,
        Some(TracePoint::FromLxc) => TraceObservationPoint::FROM_ENDPOINT,
        Some(TracePoint::ToStack) => TraceObservationPoint::TO_STACK,
        Some(TracePoint::ToHost) => TraceObservationPoint::TO_HOST,
        Some(TracePoint::ToProxy) => TraceObservationPoint::TO_PROXY,
        Some(TracePoint::ToOverlay) => TraceObservationPoint::TO_OVERLAY,
        Some(TracePoint::FromOverlay) => TraceObservationPoint::FROM_OVERLAY,
        Some(TracePoint::FromNetwork) => TraceObservationPoint::FROM_NETWORK,
        Some(TracePoint::ToNetwork) => TraceObservationPoint::TO_NETWORK,
        None => TraceObservationPoint::UNKNOWN_POINT,
    }
}

/// The `flow.TraceReason` of a conntrack state (numbered as the proto).
pub fn trace_reason(state: u8) -> TraceReason {
    match state {
        ct_state::NEW | ct_state::ESTABLISHED | ct_state::REPLY | ct_state::RELATED => {
            TraceReason(state.into())
        }
        _ => TraceReason::TRACE_REASON_UNKNOWN,
    }
}

/// The `flow.TrafficDirection` of a datapath direction (numbered as the
/// proto).
pub fn direction(d: u8) -> TrafficDirection {
    match d {
        1 | 2 => TrafficDirection(d.into()),
        _ => TrafficDirection::TRAFFIC_DIRECTION_UNKNOWN,
    }
}

/// The text the CLI prints for a drop reason (Cilium's drop table).
pub fn drop_reason_text(r: enums::DropReason) -> &'static str {
    use enums::DropReason as R;
    match r {
        R::INVALID_SOURCE_IP => "Invalid source ip",
        R::POLICY_DENIED => "Policy denied",
        R::INVALID_PACKET_DROPPED => "Invalid packet",
        R::CT_TRUNCATED_OR_INVALID_HEADER => "CT: Truncated or invalid header",
        R::UNSUPPORTED_L3_PROTOCOL => "Unsupported L3 protocol",
        R::UNKNOWN_L4_PROTOCOL => "Unknown L4 protocol",
        R::STALE_OR_UNROUTABLE_IP => "Stale or unroutable IP",
        R::CT_MAP_INSERTION_FAILED => "CT: Map insertion failed",
        R::SERVICE_BACKEND_NOT_FOUND => "Service backend not found",
        R::NO_MAPPING_FOR_NAT_MASQUERADE => "No mapping for NAT masquerade",
        R::INVALID_IDENTITY => "Invalid identity",
        R::FIRST_LOGICAL_DATAGRAM_FRAGMENT_NOT_FOUND => "First logical datagram fragment not found",
        R::POLICY_DENY => "Policy denied by denylist",
        R::SOCKET_LOOKUP_FAILED => "Socket lookup failed",
        R::SOCKET_ASSIGN_FAILED => "Socket assign failed",
        R::PROXY_REDIRECTION_NOT_SUPPORTED_FOR_PROTOCOL => {
            "Proxy redirection not supported for protocol"
        }
        _ => "Unknown drop reason",
    }
}

/// Days since 1970-01-01 -> (year, month, day) (proleptic Gregorian).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// A flow's time: Unix nanoseconds, kept as a number from the ring buffer
/// to the wire (protobuf takes it as it is); text only where text is
/// wanted: JSON (RFC 3339 with nanoseconds, as protobuf JSON prints
/// Timestamps) and the CLI's formats. 0: unknown (no time on the wire, ""
/// in JSON).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Time(pub u64);

impl Time {
    pub fn unix_ns(self) -> u64 {
        self.0
    }
}

impl std::fmt::Display for Time {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0 == 0 {
            return Ok(());
        }
        f.write_str(&rfc3339(self.0))
    }
}

impl Serialize for Time {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Time {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = std::borrow::Cow::<'de, str>::deserialize(d)?;
        if text.is_empty() {
            return Ok(Time(0));
        }
        parse_rfc3339(&text).map(Time).ok_or_else(|| {
            serde::de::Error::custom(format!("{text:?} is not an RFC 3339 UTC time"))
        })
    }
}

/// RFC 3339 UTC with nanoseconds, as protobuf JSON prints Timestamps.
pub fn rfc3339(unix_ns: u64) -> String {
    let secs = (unix_ns / 1_000_000_000) as i64;
    let nanos = unix_ns % 1_000_000_000;
    let (y, mo, d) = civil_from_days(secs.div_euclid(86_400));
    let rem = secs.rem_euclid(86_400) as u64;
    let mut s = String::with_capacity(30);
    for (sep, v, width) in [
        ("", y.max(0) as u64, 4),
        ("-", mo.into(), 2),
        ("-", d.into(), 2),
        ("T", rem / 3600, 2),
        (":", (rem / 60) % 60, 2),
        (":", rem % 60, 2),
        (".", nanos, 9),
    ] {
        s.push_str(sep);
        crate::text::push_dec(&mut s, v, width);
    }
    s.push('Z');
    s
}

/// Parses the RFC 3339 UTC times this crate writes (`...T..:..:..[.n]Z`)
/// back into Unix nanoseconds.
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let (date, rest) = s.split_once('T')?;
    let mut d = date.split('-');
    let (y, m, day): (i64, i64, i64) = (
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
        d.next()?.parse().ok()?,
    );
    let rest = rest.strip_suffix('Z')?;
    let (hms, frac) = rest.split_once('.').unwrap_or((rest, ""));
    let mut t = hms.split(':');
    let (hh, mm, ss): (i64, i64, i64) = (
        t.next()?.parse().ok()?,
        t.next()?.parse().ok()?,
        t.next()?.parse().ok()?,
    );
    if !(1..=12).contains(&m)
        || !(1..=31).contains(&day)
        || hh > 23
        || mm > 59
        || ss > 60
        || frac.len() > 9
    {
        return None;
    }
    let nanos: u64 = if frac.is_empty() {
        0
    } else {
        format!("{frac:0<9}").parse().ok()?
    };
    // Days from civil (the inverse of civil_from_days).
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = days * 86_400 + hh * 3600 + mm * 60 + ss;
    u64::try_from(secs).ok().map(|s| s * 1_000_000_000 + nanos)
}

/// Turns one datapath event into a flow. `unix_ns` is the event time on the
/// wall clock; `uuid` a unique id; `node` this node's name.
pub fn from_event(
    e: &FlowEvent,
    unix_ns: u64,
    uuid: String,
    node: &str,
    enricher: &dyn Enricher,
) -> Flow {
    if e.r#type == EventType::TraceSock as u8 {
        return from_sock_event(e, unix_ns, uuid, node, enricher);
    }
    let src = Ipv4Addr::from(u32::from_be(e.saddr));
    let dst = Ipv4Addr::from(u32::from_be(e.daddr));
    let is_drop = e.r#type == EventType::Drop as u8;
    // A policy-verdict event for a denied connection (its drop follows).
    let denied_verdict =
        e.r#type == EventType::PolicyVerdict as u8 && e.verdict == verdict::DROPPED;
    let (l4, summary) = match e.protocol {
        6 => {
            let flags = TcpFlags::from_bits(e.tcp_flags);
            let mut summary = InlineText::from("TCP Flags: ");
            summary.push_str(&flags.summary());
            (
                Layer4 {
                    tcp: Some(Tcp {
                        source_port: e.sport,
                        destination_port: e.dport,
                        flags: Some(flags),
                    }),
                    ..Default::default()
                },
                summary,
            )
        }
        17 => (
            Layer4 {
                udp: Some(Udp {
                    source_port: e.sport,
                    destination_port: e.dport,
                }),
                ..Default::default()
            },
            InlineText::const_new("UDP"),
        ),
        132 => (
            Layer4 {
                sctp: Some(Udp {
                    source_port: e.sport,
                    destination_port: e.dport,
                }),
                ..Default::default()
            },
            InlineText::const_new("SCTP"),
        ),
        1 => {
            let (t, c) = ((e.dport >> 8) as u32, (e.dport & 0xff) as u32);
            let name = match t {
                0 => "EchoReply".to_string(),
                3 => "DestinationUnreachable".to_string(),
                8 => "EchoRequest".to_string(),
                11 => "TimeExceeded".to_string(),
                other => format!("{other}({c})"),
            };
            (
                Layer4 {
                    icmpv4: Some(Icmp { r#type: t, code: c }),
                    ..Default::default()
                },
                compact_str::format_compact!("ICMPv4 {name}"),
            )
        }
        _ => (Layer4::default(), InlineText::default()),
    };
    let has_ip = e.ip_version == 4;
    let ((source, source_names), (destination, destination_names)) = if has_ip {
        (
            enricher.endpoint(src, e.src_identity),
            enricher.endpoint(dst, e.dst_identity),
        )
    } else {
        Default::default()
    };
    let (flow_verdict, drop_desc) = if is_drop || denied_verdict {
        (Verdict::DROPPED, drop_reason(e.subtype))
    } else {
        (verdict(e.verdict), enums::DropReason::default())
    };
    let (point, sub_type) = if is_drop {
        (TraceObservationPoint::default(), e.subtype as i32)
    } else if e.r#type == EventType::PolicyVerdict as u8 {
        (TraceObservationPoint::default(), 0)
    } else {
        // Hubble's sub_type of a trace event is the datapath's point.
        (trace_point(e.subtype), e.subtype as i32)
    };
    // Attribution: the rule that decided a new connection or a drop.
    let mut attribution: [Vec<SharedPolicyRef>; 4] = Default::default();
    let decided = is_drop || e.ct_state == ct_state::NEW;
    if let (true, Some(p)) = (
        decided && e.policy_cookie != 0,
        enricher.policy(e.policy_cookie),
    ) {
        let denied = is_drop
            || denied_verdict
            || e.verdict == verdict::AUDIT && e.subtype == DropReason::PolicyDeny as u8;
        let slot = match (e.direction, denied) {
            (2, false) => 0,
            (1, false) => 1,
            (2, true) => 2,
            _ => 3,
        };
        attribution[slot].push(p);
    }
    let [egress_allowed_by, ingress_allowed_by, egress_denied_by, ingress_denied_by] = attribution;
    let service = || enricher.service(Ipv4Addr::from(u32::from_be(e.svc_addr)), e.svc_port);
    let (source_service, destination_service) = match e.svc_side {
        abi::SVC_SIDE_DESTINATION => (None, service()),
        abi::SVC_SIDE_SOURCE => (service(), None),
        _ => (None, None),
    };
    Flow {
        time: Time(unix_ns),
        uuid,
        verdict: flow_verdict,
        drop_reason: if is_drop || denied_verdict {
            e.subtype as u32
        } else {
            0
        },
        ethernet: Some(Ethernet {
            source: crate::text::mac(&e.smac),
            destination: crate::text::mac(&e.dmac),
        }),
        ip: has_ip.then(|| Ip {
            source: crate::text::ipv4(src),
            destination: crate::text::ipv4(dst),
            ip_version: IpVersion::IPv4,
        }),
        l4: has_ip.then_some(l4),
        source,
        destination,
        r#type: FlowType::L3_L4,
        node_name: node.into(),
        source_names,
        destination_names,
        event_type: EventTypeField {
            r#type: e.r#type as i32,
            sub_type,
        },
        source_service,
        destination_service,
        traffic_direction: direction(e.direction),
        trace_observation_point: point,
        trace_reason: if is_drop {
            TraceReason::default()
        } else {
            trace_reason(e.ct_state)
        },
        // Policy only drops packets that open connections: never replies.
        is_reply: (has_ip && e.ct_state != 0).then_some(e.ct_state == ct_state::REPLY),
        drop_reason_desc: drop_desc,
        interface: (e.ifindex != 0).then(|| NetworkInterface {
            index: e.ifindex,
            name: enricher.interface_name(e.ifindex).unwrap_or_default(),
        }),
        policy_match_type: e.policy_match as u32,
        egress_allowed_by,
        ingress_allowed_by,
        egress_denied_by,
        ingress_denied_by,
        summary,
        l7: None,
        ..Default::default()
    }
}

/// A trace-sock event (socket LB, `bpf/sock.bpf.c`) as Hubble makes it a
/// flow: Type SOCK, TRACED before and TRANSLATED after the translation,
/// the peer address the destination (the source, reversed, on the
/// receiving side), the socket's own address and port not known yet (so
/// left out), the service named where the address is one.
fn from_sock_event(
    e: &FlowEvent,
    unix_ns: u64,
    uuid: String,
    node: &str,
    enricher: &dyn Enricher,
) -> Flow {
    let peer = Ipv4Addr::from(u32::from_be(e.daddr));
    let reverse = matches!(
        e.subtype,
        abi::sock_xlate::PRE_REV | abi::sock_xlate::POST_REV
    );
    let (own, _) = enricher.endpoint(Ipv4Addr::UNSPECIFIED, e.src_identity);
    let (far, far_names) = enricher.endpoint(peer, e.dst_identity);
    let service = (e.svc_side != abi::SVC_SIDE_NONE)
        .then(|| enricher.service(Ipv4Addr::from(u32::from_be(e.svc_addr)), e.svc_port))
        .flatten();
    let (sport, dport) = if reverse { (e.dport, 0) } else { (0, e.dport) };
    let (l4, summary) = match e.protocol {
        6 => (
            Layer4 {
                tcp: Some(Tcp {
                    source_port: sport,
                    destination_port: dport,
                    flags: None,
                }),
                ..Default::default()
            },
            "TCP",
        ),
        _ => (
            Layer4 {
                udp: Some(Udp {
                    source_port: sport,
                    destination_port: dport,
                }),
                ..Default::default()
            },
            "UDP",
        ),
    };
    let peer_text = crate::text::ipv4(peer);
    let (ip, source, destination, source_names, destination_names) = if reverse {
        (
            Ip {
                source: peer_text,
                destination: InlineText::default(),
                ip_version: IpVersion::IPv4,
            },
            far,
            own,
            far_names,
            Vec::new(),
        )
    } else {
        (
            Ip {
                source: InlineText::default(),
                destination: peer_text,
                ip_version: IpVersion::IPv4,
            },
            own,
            far,
            Vec::new(),
            far_names,
        )
    };
    Flow {
        time: Time(unix_ns),
        uuid,
        verdict: verdict(e.verdict),
        ip: Some(ip),
        l4: Some(l4),
        source,
        destination,
        r#type: FlowType::SOCK,
        node_name: node.into(),
        source_names,
        destination_names,
        event_type: EventTypeField {
            r#type: e.r#type as i32,
            sub_type: e.subtype as i32,
        },
        source_service: if reverse { service.clone() } else { None },
        destination_service: if reverse { None } else { service },
        sock_xlate_point: enums::SocketTranslationPoint(e.subtype as i32),
        socket_cookie: e.sock_cookie,
        cgroup_id: e.cgroup_id,
        summary: InlineText::const_new(summary),
        ..Default::default()
    }
}

/// Monitor message type of proxy access-log records (Hubble `event_type` 129).
pub const EVENT_TYPE_ACCESS_LOG: i32 = 129;

/// What the L7 proxy reports about one request or response.
#[derive(Clone, Debug)]
pub struct L7Record {
    pub unix_ns: u64,
    /// The connection's opener and its original destination.
    pub client: std::net::SocketAddrV4,
    pub server: std::net::SocketAddrV4,
    pub client_identity: u32,
    pub server_identity: u32,
    /// A response: the flow runs server -> client.
    pub is_reply: bool,
    /// FORWARDED or DROPPED.
    pub verdict: Verdict,
    /// INGRESS when the server's policy redirected the connection, else EGRESS.
    pub ingress: bool,
    pub l7: Layer7,
    /// IP protocol of the connection (6 TCP, 17 UDP).
    pub protocol: u8,
    /// The policies whose L7 rules decided it, each with its side (true:
    /// the server's ingress policy, false: the client's egress policy).
    /// Shared: a connection's requests all carry the same attribution.
    pub decided_by: std::sync::Arc<[(bool, SharedPolicyRef)]>,
}

/// Turns an L7 proxy record into a flow (Type L7).
pub fn from_l7(r: L7Record, uuid: String, node: &str, enricher: &dyn Enricher) -> Flow {
    let (src, dst, src_id, dst_id) = if r.is_reply {
        (r.server, r.client, r.server_identity, r.client_identity)
    } else {
        (r.client, r.server, r.client_identity, r.server_identity)
    };
    let (source, source_names) = enricher.endpoint(*src.ip(), src_id);
    let (destination, destination_names) = enricher.endpoint(*dst.ip(), dst_id);
    let response = r.l7.r#type == L7FlowType::RESPONSE;
    let summary = match (&r.l7.http, &r.l7.dns, &r.l7.kafka) {
        (Some(h), _, _) => h.summary(response.then_some(r.l7.latency_ns)),
        (None, Some(d), _) => d.summary(response),
        (None, None, Some(k)) => k.summary(response),
        _ => String::new(),
    };
    let dropped = r.verdict == Verdict::DROPPED;
    let mut attribution: [Vec<SharedPolicyRef>; 4] = Default::default();
    for (ingress, p) in r.decided_by.iter() {
        attribution[match (ingress, dropped) {
            (false, false) => 0,
            (true, false) => 1,
            (false, true) => 2,
            (true, true) => 3,
        }]
        .push(p.clone());
    }
    let [egress_allowed_by, ingress_allowed_by, egress_denied_by, ingress_denied_by] = attribution;
    Flow {
        time: Time(r.unix_ns),
        uuid,
        verdict: r.verdict,
        ip: Some(Ip {
            source: crate::text::ipv4(*src.ip()),
            destination: crate::text::ipv4(*dst.ip()),
            ip_version: IpVersion::IPv4,
        }),
        l4: Some(if r.protocol == 17 {
            Layer4 {
                udp: Some(Udp {
                    source_port: src.port(),
                    destination_port: dst.port(),
                }),
                ..Default::default()
            }
        } else {
            Layer4 {
                tcp: Some(Tcp {
                    source_port: src.port(),
                    destination_port: dst.port(),
                    flags: None,
                }),
                ..Default::default()
            }
        }),
        source,
        destination,
        r#type: FlowType::L7,
        node_name: node.into(),
        source_names,
        destination_names,
        l7: Some(r.l7),
        event_type: EventTypeField {
            r#type: EVENT_TYPE_ACCESS_LOG,
            sub_type: 0,
        },
        traffic_direction: if r.ingress {
            TrafficDirection::INGRESS
        } else {
            TrafficDirection::EGRESS
        },
        is_reply: Some(r.is_reply),
        egress_allowed_by,
        ingress_allowed_by,
        egress_denied_by,
        ingress_denied_by,
        summary: summary.into(),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workloads_are_kubernetes_kinds_and_object_names() {
        let w = |kind: &str, name: &str| Workload {
            kind: kind.into(),
            name: name.into(),
        };
        assert!(w("Deployment", "frontend").validate().is_ok());
        assert!(w("StatefulSet", "db.v2-0").validate().is_ok());
        for (kind, name) in [
            ("deployment", "x"),
            ("", "x"),
            ("Deploy-ment", "x"),
            ("Deployment", ""),
            ("Deployment", "Frontend"),
            ("Deployment", "-x"),
            ("Deployment", "x_y"),
        ] {
            assert!(w(kind, name).validate().is_err(), "{kind}/{name}");
        }
        let json = serde_json::to_string(&w("Deployment", "frontend")).unwrap();
        assert_eq!(json, r#"{"name":"frontend","kind":"Deployment"}"#);
    }

    #[test]
    fn timestamps_are_rfc3339_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000000Z");
        assert_eq!(
            rfc3339(1_768_471_200_123_456_789),
            "2026-01-15T10:00:00.123456789Z"
        );
        for ns in [0, 1_768_471_200_123_456_789, 951_782_400_000_000_001] {
            assert_eq!(parse_rfc3339(&rfc3339(ns)), Some(ns));
        }
        assert_eq!(
            parse_rfc3339("2026-01-15T10:00:00Z"),
            Some(1_768_471_200_000_000_000)
        );
        assert_eq!(parse_rfc3339("garbage"), None);
        assert_eq!(parse_rfc3339("2026-13-15T10:00:00Z"), None);
    }

    #[test]
    fn tcp_flags_summarise_in_hubble_order() {
        assert_eq!(TcpFlags::from_bits(0x12).summary(), "SYN, ACK");
        assert_eq!(TcpFlags::from_bits(0x11).summary(), "ACK, FIN");
    }

    /// `hubble observe -o json` prints keys in the proto's declaration
    /// order; tools that diff or grep the output rely on it.
    #[test]
    fn json_keys_follow_the_proto_declaration_order() {
        let proto = include_str!("../../../proto/flow/flow.proto");
        let message = &proto[proto.find("message Flow {").unwrap()..];
        let message = &message[..message.find("\n}").unwrap()];
        let declared: Vec<&str> = message
            .lines()
            .skip(1)
            .filter_map(|l| l.split('=').next()?.split_whitespace().last())
            .collect();
        let ref_ = std::sync::Arc::new(PolicyRef {
            name: "p".into(),
            ..Default::default()
        });
        let f = Flow {
            time: Time(0),
            uuid: "u".into(),
            verdict: crate::enums::Verdict::DROPPED,
            drop_reason: 133,
            ethernet: Some(Default::default()),
            ip: Some(Default::default()),
            l4: Some(Default::default()),
            r#type: crate::enums::FlowType::L3_L4,
            node_name: "n".into(),
            traffic_direction: crate::enums::TrafficDirection::INGRESS,
            policy_match_type: 1,
            trace_observation_point: crate::enums::TraceObservationPoint::TO_ENDPOINT,
            trace_reason: crate::enums::TraceReason::NEW,
            drop_reason_desc: crate::enums::DropReason::POLICY_DENIED,
            is_reply: Some(false),
            interface: Some(NetworkInterface {
                index: 1,
                name: "i".into(),
            }),
            summary: "s".into(),
            egress_allowed_by: vec![ref_.clone()],
            ingress_allowed_by: vec![ref_.clone()],
            egress_denied_by: vec![ref_.clone()],
            ingress_denied_by: vec![ref_],
            ..Default::default()
        };
        let keys = top_level_keys(&serde_json::to_string(&f).unwrap());
        assert!(
            keys.iter().all(|k| declared.contains(&k.as_str())),
            "{keys:?}"
        );
        let in_proto_order: Vec<&str> = declared
            .iter()
            .copied()
            .filter(|d| keys.iter().any(|k| k == d))
            .collect();
        assert_eq!(keys, in_proto_order);
    }

    /// The keys of a JSON object in the order they are written
    /// (`serde_json::Value` would sort them).
    fn top_level_keys(json: &str) -> Vec<String> {
        struct Keys;
        impl<'de> serde::de::Visitor<'de> for Keys {
            type Value = Vec<String>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut m: A,
            ) -> Result<Self::Value, A::Error> {
                let mut keys = Vec::new();
                while let Some(k) = m.next_key::<String>()? {
                    m.next_value::<serde::de::IgnoredAny>()?;
                    keys.push(k);
                }
                Ok(keys)
            }
        }
        use serde::Deserializer;
        serde_json::Deserializer::from_str(json)
            .deserialize_map(Keys)
            .unwrap()
    }
}

#[cfg(test)]
mod sock_tests {
    use super::*;

    /// Names the service 10.96.0.10:80 and the backend pod 10.0.0.5.
    struct Names;

    impl Enricher for Names {
        fn endpoint(&self, ip: Ipv4Addr, identity: u32) -> (std::sync::Arc<Endpoint>, Vec<String>) {
            let pod_name = if ip == Ipv4Addr::new(10, 0, 0, 5) {
                "web"
            } else {
                ""
            };
            let labels = if identity == abi::identity::HOST {
                vec!["reserved:host".to_string()]
            } else {
                vec![]
            };
            (
                std::sync::Arc::new(Endpoint {
                    identity,
                    labels,
                    pod_name: pod_name.into(),
                    ..Default::default()
                }),
                vec![],
            )
        }

        fn service(&self, addr: Ipv4Addr, port: u16) -> Option<SharedServiceRef> {
            (addr == Ipv4Addr::new(10, 96, 0, 10) && port == 80).then(|| {
                std::sync::Arc::new(ServiceRef {
                    name: "web".into(),
                    namespace: "default".into(),
                })
            })
        }
    }

    fn event(point: u8, addr: [u8; 4], port: u16, svc: bool) -> FlowEvent {
        FlowEvent {
            r#type: EventType::TraceSock as u8,
            subtype: point,
            verdict: if point % 2 == 1 {
                verdict::TRACED
            } else {
                verdict::TRANSLATED
            },
            protocol: 6,
            ip_version: 4,
            src_identity: abi::identity::HOST,
            dst_identity: 300,
            daddr: u32::from(Ipv4Addr::from(addr)).to_be(),
            dport: port,
            svc_addr: if svc {
                u32::from(Ipv4Addr::from(addr)).to_be()
            } else {
                0
            },
            svc_port: if svc { port } else { 0 },
            svc_side: match (svc, point) {
                (false, _) => abi::SVC_SIDE_NONE,
                (true, abi::sock_xlate::PRE_FWD) => abi::SVC_SIDE_DESTINATION,
                _ => abi::SVC_SIDE_SOURCE,
            },
            sock_cookie: 4242,
            cgroup_id: 77,
            ..Default::default()
        }
    }

    /// Socket LB's events are Hubble's trace-sock flows: the service
    /// before, the backend after; reversed on the receiving side.
    #[test]
    fn trace_sock_events_are_sock_flows() {
        let pre = from_event(
            &event(abi::sock_xlate::PRE_FWD, [10, 96, 0, 10], 80, true),
            1,
            "u".into(),
            "n1",
            &Names,
        );
        let json = serde_json::to_value(&pre).unwrap();
        assert_eq!(json["Type"], "SOCK");
        assert_eq!(json["verdict"], "TRACED");
        assert_eq!(
            json["sock_xlate_point"],
            "SOCK_XLATE_POINT_PRE_DIRECTION_FWD"
        );
        assert_eq!(json["socket_cookie"], "4242");
        assert_eq!(json["cgroup_id"], "77");
        assert_eq!(json["IP"]["destination"], "10.96.0.10");
        assert_eq!(json["l4"]["TCP"]["destination_port"], 80);
        assert_eq!(json["destination_service"]["name"], "web");
        assert_eq!(json["event_type"]["type"], 7);
        assert_eq!(json["Summary"], "TCP");
        let line = crate::format::compact(&pre, crate::format::Style::default());
        assert!(line.contains("pre-xlate-fwd TRACED"), "{line}");
        // Read back as the API's JSON.
        let back: Flow = serde_json::from_value(json).unwrap();
        assert_eq!(back, pre);

        let post = from_event(
            &event(abi::sock_xlate::POST_FWD, [10, 0, 0, 5], 8080, false),
            2,
            "v".into(),
            "n1",
            &Names,
        );
        assert_eq!(post.verdict, Verdict::TRANSLATED);
        assert_eq!(post.destination.pod_name, "web");
        assert!(post.destination_service.is_none());

        // Receiving: the backend before, the service after, as sources.
        let rev = from_event(
            &event(abi::sock_xlate::POST_REV, [10, 96, 0, 10], 80, true),
            3,
            "w".into(),
            "n1",
            &Names,
        );
        assert_eq!(rev.ip.as_ref().unwrap().source, "10.96.0.10");
        assert_eq!(rev.source_service.as_ref().unwrap().name, "web");
        assert_eq!(rev.destination.labels, vec!["reserved:host".to_string()]);
        let l4 = rev.l4.as_ref().unwrap().tcp.as_ref().unwrap();
        assert_eq!((l4.source_port, l4.destination_port), (80, 0));
    }
}
