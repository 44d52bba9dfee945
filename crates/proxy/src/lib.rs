//! Fibril's L7 proxy. The datapath hands it connections that a policy's
//! `http` or `kafka` rules cover (transparently: it accepts them with the
//! original destination as its local address); it checks every request
//! against the rules of each side that redirected the connection (the
//! client's egress, the server's ingress), answers refused ones itself (HTTP
//! `403 Access denied`, Kafka's authorization error codes) on a connection
//! that stays usable, forwards the rest from the client's own address, and
//! reports each request and response as an L7 flow.
#![forbid(unsafe_code)]

pub mod dns;
pub mod http;
pub mod kafka;
pub mod rules;
pub mod socket;
pub mod workers;

use std::net::SocketAddrV4;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub use kafka::rules::KafkaRules;
pub use rules::HttpRules;

/// One side's L7 rules for a connection (`http` rules unless said).
#[derive(Debug)]
pub struct Side<R = HttpRules> {
    /// The server's ingress policy (else the client's egress policy).
    pub ingress: bool,
    pub rules: Arc<R>,
    /// The policy the rules come from (flow attribution).
    pub policy: flow::record::SharedPolicyRef,
}

// By hand: the rules are shared, not cloned (a derive would ask R: Clone).
impl<R> Clone for Side<R> {
    fn clone(&self) -> Self {
        Self {
            ingress: self.ingress,
            rules: self.rules.clone(),
            policy: self.policy.clone(),
        }
    }
}

/// What policy says about one redirected connection.
#[derive(Clone, Debug)]
pub struct Connection {
    pub client_identity: u32,
    pub server_identity: u32,
    /// Every side's rules must allow a request. Empty: the policy no longer
    /// restricts L7 here; requests are forwarded (and still reported).
    pub sides: Vec<Side>,
    /// A Kafka connection (`kafka` rules redirected it): its sides' rules,
    /// all of which must allow a request; `sides` is then empty.
    pub kafka: Option<Vec<Side<KafkaRules>>>,
    /// The server is a pod on this node: connect from the client's address
    /// so that it sees the real client.
    pub transparent: bool,
}

impl Connection {
    /// The flows' direction: INGRESS when the server's policy redirected
    /// the connection (or none restricts it any more), else EGRESS.
    pub fn ingress(&self) -> bool {
        let mut sides = self.side_policies().peekable();
        sides.peek().is_none() || sides.any(|(ingress, _)| ingress)
    }

    /// Attribution of forwarded requests: every side's policy (each side
    /// allowed them).
    pub fn allowed_by(&self) -> Arc<[(bool, flow::record::SharedPolicyRef)]> {
        self.side_policies().collect()
    }

    fn side_policies(&self) -> impl Iterator<Item = (bool, flow::record::SharedPolicyRef)> + '_ {
        let http = self.sides.iter().map(|s| (s.ingress, s.policy.clone()));
        let kafka = self
            .kafka
            .iter()
            .flatten()
            .map(|s| (s.ingress, s.policy.clone()));
        http.chain(kafka)
    }
}

/// The proxy's view of the agent.
pub trait Policy: Send + Sync + 'static {
    /// The rules for a connection from `client` to `original_dst`; `None`
    /// when policy does not allow the connection at all (it is closed).
    fn connection(&self, client: SocketAddrV4, original_dst: SocketAddrV4) -> Option<Connection>;
    /// The DNS rules for a pod's queries to `resolver` (over TCP or UDP);
    /// `None` when policy does not allow them at all (dropped).
    fn dns(
        &self,
        client: SocketAddrV4,
        resolver: SocketAddrV4,
        tcp: bool,
    ) -> Option<dns::DnsConnection>;
    /// An allowed query's answer: `name` resolved to these addresses (with
    /// TTLs) for `client`. Returns once policy can use them.
    fn learned(
        &self,
        client: std::net::Ipv4Addr,
        name: &str,
        answers: &[(std::net::Ipv4Addr, u32)],
    );
    /// The common case of `learned`, on the proxy's thread: true when every
    /// address was already learned for `name` by `client` (only their
    /// expiry moves); false, having changed nothing, when `learned` must
    /// run.
    fn refresh_learned(
        &self,
        client: std::net::Ipv4Addr,
        name: &str,
        answers: &[(std::net::Ipv4Addr, u32)],
    ) -> bool;
    /// Reports one request or response.
    fn record(&self, record: flow::record::L7Record);
}

/// Counters, for the agent's metrics (`fibril_proxy_*`).
#[derive(Debug, Default)]
pub struct Stats {
    pub connections: Counter,
    /// Connections policy no longer allows (closed at once).
    pub connections_refused: Counter,
    pub requests_forwarded: Counter,
    pub requests_denied: Counter,
    /// Requests hyper could not parse (bad framing, oversized headers):
    /// answered with 400/431 by the HTTP layer, the connection closed.
    pub malformed: Counter,
    /// The server could not be reached or reset the connection (503), or
    /// a resolver did not answer.
    pub upstream_errors: Counter,
    /// Forwarded requests whose response head did not come within the
    /// request timeout (answered with 504).
    pub request_timeouts: Counter,
    /// Upstream connections closed because the server sent more than the
    /// response to a request (never delivered to the client).
    pub unsolicited: Counter,
    /// WebSocket upgrades the rules allowed and the server accepted (101):
    /// the connection went on as a tunnel.
    pub upgrades: Counter,
    pub dns_forwarded: Counter,
    /// Queries answered REFUSED by the DNS rules.
    pub dns_refused: Counter,
    /// Datagrams or messages that are not DNS queries (dropped).
    pub dns_malformed: Counter,
    pub kafka_forwarded: Counter,
    /// Kafka requests answered with an authorization error by the rules.
    pub kafka_denied: Counter,
}

/// A counter that threads on different CPUs add to without sharing a
/// cache line: a slot per thread (`workers::thread_slot`), read as their
/// sum. One shared atomic, incremented by the proxy thread of each CPU for
/// every request, cost a cache-line transfer per request.
#[derive(Debug, Default)]
pub struct Counter([CounterSlot; workers::THREAD_SLOTS]);

#[derive(Debug, Default)]
#[repr(align(128))]
struct CounterSlot(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.0[workers::thread_slot()]
            .0
            .fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.iter().map(|s| s.0.load(Ordering::Relaxed)).sum()
    }
}

impl Stats {
    /// `(name, help, value)` for each counter.
    pub fn snapshot(&self) -> [(&'static str, &'static str, u64); 14] {
        let v = Counter::get;
        [
            (
                "fibril_proxy_connections_total",
                "Connections the datapath redirected to the L7 proxy",
                v(&self.connections),
            ),
            (
                "fibril_proxy_connections_refused_total",
                "Redirected connections policy no longer allows",
                v(&self.connections_refused),
            ),
            (
                "fibril_proxy_http_requests_forwarded_total",
                "HTTP requests the L7 rules allowed",
                v(&self.requests_forwarded),
            ),
            (
                "fibril_proxy_http_requests_denied_total",
                "HTTP requests refused with 403 by the L7 rules",
                v(&self.requests_denied),
            ),
            (
                "fibril_proxy_http_malformed_total",
                "Malformed HTTP (bad framing, oversized headers) rejected",
                v(&self.malformed),
            ),
            (
                "fibril_proxy_upstream_errors_total",
                "HTTP requests answered with 503 (server unreachable or reset) and DNS queries the resolver did not answer",
                v(&self.upstream_errors),
            ),
            (
                "fibril_proxy_http_request_timeouts_total",
                "HTTP requests answered with 504: no response head within the request timeout",
                v(&self.request_timeouts),
            ),
            (
                "fibril_proxy_http_unsolicited_responses_total",
                "Upstream connections closed because the server sent more than the response to a request (never delivered)",
                v(&self.unsolicited),
            ),
            (
                "fibril_proxy_http_upgrades_total",
                "WebSocket upgrades allowed and accepted by the server (the connection continues as a tunnel)",
                v(&self.upgrades),
            ),
            (
                "fibril_proxy_dns_queries_forwarded_total",
                "DNS queries the DNS rules allowed",
                v(&self.dns_forwarded),
            ),
            (
                "fibril_proxy_dns_queries_refused_total",
                "DNS queries answered REFUSED by the DNS rules",
                v(&self.dns_refused),
            ),
            (
                "fibril_proxy_dns_malformed_total",
                "Datagrams or messages to the DNS proxy that are not DNS queries",
                v(&self.dns_malformed),
            ),
            (
                "fibril_proxy_kafka_requests_forwarded_total",
                "Kafka requests the kafka rules allowed",
                v(&self.kafka_forwarded),
            ),
            (
                "fibril_proxy_kafka_requests_denied_total",
                "Kafka requests answered with an authorization error by the kafka rules",
                v(&self.kafka_denied),
            ),
        ]
    }
}
