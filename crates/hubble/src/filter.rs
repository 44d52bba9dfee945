//! Hubble's `FlowFilter` semantics (spec/hubble-api.md §3.6): within one
//! filter every set field must match (AND), the values of one field are
//! alternatives (OR); a flow passes when some allowlist filter matches (or
//! the allowlist is empty) and no denylist filter does. Filters are checked
//! when the request arrives: a bad value is an error, never "no match".

use std::net::IpAddr;

use ipnet::IpNet;
use proto::flow as pb;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FilterError {
    #[error("invalid {field} {value:?}: {why}")]
    Invalid {
        field: &'static str,
        value: String,
        why: String,
    },
    #[error("filter field {0} is not supported yet")]
    Unsupported(&'static str),
    /// Past one of the bounds below: the client asked for more than one
    /// request may cost (gRPC RESOURCE_EXHAUSTED).
    #[error("{0}")]
    TooLarge(String),
}

/// Filters in one request (allowlist and denylist together).
pub const MAX_FILTERS: usize = 64;
/// Values of one field of one filter.
pub const MAX_VALUES: usize = 256;
/// Bytes of one value (a regex, a glob, a name).
pub const MAX_VALUE_LEN: usize = 1024;
/// Regular expressions in one request, over every filter.
pub const MAX_REGEXES: usize = 64;
/// The most memory one compiled regex may take (the regex crate's
/// `size_limit` and `dfa_size_limit`).
pub const REGEX_SIZE_LIMIT: usize = 1 << 20;

fn too_large(what: String) -> FilterError {
    FilterError::TooLarge(what)
}

/// Checks the count and size of a filter's string values before anything
/// is compiled or matched against them.
fn check_sizes(f: &pb::FlowFilter) -> Result<(), FilterError> {
    for (field, list) in [
        ("uuid", &f.uuid),
        ("source_ip", &f.source_ip),
        ("source_ip_xlated", &f.source_ip_xlated),
        ("source_pod", &f.source_pod),
        ("source_fqdn", &f.source_fqdn),
        ("source_label", &f.source_label),
        ("source_service", &f.source_service),
        ("source_cluster_name", &f.source_cluster_name),
        ("destination_ip", &f.destination_ip),
        ("destination_pod", &f.destination_pod),
        ("destination_fqdn", &f.destination_fqdn),
        ("destination_label", &f.destination_label),
        ("destination_service", &f.destination_service),
        ("destination_cluster_name", &f.destination_cluster_name),
        ("http_status_code", &f.http_status_code),
        ("protocol", &f.protocol),
        ("source_port", &f.source_port),
        ("destination_port", &f.destination_port),
        ("dns_query", &f.dns_query),
        ("http_method", &f.http_method),
        ("http_path", &f.http_path),
        ("http_url", &f.http_url),
        ("node_name", &f.node_name),
        ("node_labels", &f.node_labels),
        ("trace_id", &f.trace_id),
    ] {
        if list.len() > MAX_VALUES {
            return Err(too_large(format!(
                "{field} has {} values; at most {MAX_VALUES} per filter",
                list.len()
            )));
        }
        if let Some(v) = list.iter().find(|v| v.len() > MAX_VALUE_LEN) {
            return Err(too_large(format!(
                "a {field} value is {} bytes; at most {MAX_VALUE_LEN}",
                v.len()
            )));
        }
    }
    let others = [
        ("source_workload", f.source_workload.len()),
        ("destination_workload", f.destination_workload.len()),
        ("http_header", f.http_header.len()),
        ("interface", f.interface.len()),
        ("event_type", f.event_type.len()),
        ("tcp_flags", f.tcp_flags.len()),
    ];
    if let Some((field, n)) = others.iter().find(|(_, n)| *n > MAX_VALUES) {
        return Err(too_large(format!(
            "{field} has {n} values; at most {MAX_VALUES} per filter"
        )));
    }
    Ok(())
}

/// Compiled regexes by pattern, shared by every request: a client that
/// repeats its filters (every `hubble observe` of a dashboard) compiles
/// them once. Cleared when full.
static REGEX_CACHE: std::sync::LazyLock<
    std::sync::Mutex<std::collections::HashMap<String, regex::Regex>>,
> = std::sync::LazyLock::new(Default::default);
const REGEX_CACHE_MAX: usize = 1024;

fn regex(field: &'static str, pattern: &str) -> Result<regex::Regex, FilterError> {
    let cached = REGEX_CACHE
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(pattern)
        .cloned();
    if let Some(r) = cached {
        return Ok(r);
    }
    let r = regex::RegexBuilder::new(pattern)
        .size_limit(REGEX_SIZE_LIMIT)
        .dfa_size_limit(REGEX_SIZE_LIMIT)
        .build()
        .map_err(|e| match e {
            regex::Error::CompiledTooBig(limit) => too_large(format!(
                "{field} {pattern:?} compiles to more than {limit} bytes"
            )),
            e => invalid(field, pattern, &e.to_string()),
        })?;
    let mut cache = REGEX_CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if cache.len() >= REGEX_CACHE_MAX {
        cache.clear();
    }
    cache.insert(pattern.to_string(), r.clone());
    Ok(r)
}

fn invalid(field: &'static str, value: &str, why: &str) -> FilterError {
    FilterError::Invalid {
        field,
        value: value.to_string(),
        why: why.to_string(),
    }
}

enum IpMatch {
    Exact(String),
    Cidr(IpNet),
}

/// `ns/prefix`, `ns/`, `/prefix`, `prefix` (namespace `default`), `/`.
struct PodMatch {
    namespace: Option<String>,
    prefix: String,
}

impl PodMatch {
    fn matches_service(&self, s: Option<&pb::Service>) -> bool {
        let Some(s) = s else { return false };
        if s.namespace.is_empty() && s.name.is_empty() {
            return false;
        }
        self.namespace.as_deref().is_none_or(|ns| ns == s.namespace)
            && s.name.starts_with(&self.prefix)
    }

    fn parse(field: &'static str, v: &str) -> Result<Self, FilterError> {
        if v.is_empty() {
            return Err(invalid(field, v, "empty pod name"));
        }
        if v.matches('/').count() > 1 {
            return Err(invalid(field, v, "more than one '/' (`namespace/name`)"));
        }
        Ok(match v.split_once('/') {
            Some((ns, pod)) => PodMatch {
                namespace: (!ns.is_empty()).then(|| ns.to_string()),
                prefix: pod.to_string(),
            },
            None => PodMatch {
                namespace: Some("default".into()),
                prefix: v.to_string(),
            },
        })
    }

    fn matches(&self, e: Option<&pb::Endpoint>) -> bool {
        let Some(e) = e else { return false };
        if e.namespace.is_empty() && e.pod_name.is_empty() {
            return false;
        }
        self.namespace.as_deref().is_none_or(|ns| ns == e.namespace)
            && e.pod_name.starts_with(&self.prefix)
    }
}

/// A label selector term, as Kubernetes label selectors write them: `key`,
/// `!key`, `key=value`, `key!=value`, `key in (a,b)`, `key notin (a,b)`.
/// Keys without a source prefix match any source (`any:`).
enum LabelMatch {
    Exists(String),
    Absent(String),
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
}

fn split_label(l: &str) -> (&str, &str) {
    let (key, value) = l.split_once('=').unwrap_or((l, ""));
    let key = match key.split_once(':') {
        Some((_, k)) => k,
        None => key,
    };
    (key, value)
}

fn key_matches(want: &str, have: &str) -> bool {
    match want.split_once(':') {
        Some(("any", k)) => k == split_label(have).0,
        Some(_) => want == have.split_once('=').map_or(have, |(k, _)| k),
        None => want == split_label(have).0,
    }
}

impl LabelMatch {
    fn parse(field: &'static str, term: &str) -> Result<Self, FilterError> {
        let t = term.trim();
        let bad = |why: &str| Err(invalid(field, term, why));
        if t.is_empty() {
            return bad("an empty selector term");
        }
        if t.contains('(') || t.contains(')') {
            // `key in (a,b)` / `key notin (a,b)`.
            let Some((head, set)) = t.split_once('(') else {
                return bad("a ')' without '('");
            };
            let Some(set) = set.trim_end().strip_suffix(')') else {
                return bad("a set must end with ')'");
            };
            let values: Vec<String> = set.split(',').map(|v| v.trim().to_string()).collect();
            if values
                .iter()
                .any(|v| v.is_empty() || v.contains(['(', ')']))
            {
                return bad("a set holds non-empty values: `key in (a,b)`");
            }
            let mut words = head.split_whitespace();
            return match (words.next(), words.next(), words.next()) {
                (Some(k), Some("in"), None) => Ok(LabelMatch::In(k.to_string(), values)),
                (Some(k), Some("notin"), None) => Ok(LabelMatch::NotIn(k.to_string(), values)),
                _ => bad("a set is written `key in (a,b)` or `key notin (a,b)`"),
            };
        }
        // Keys and values hold no spaces: `app = web` is `app=web`.
        let t: String = t.split_whitespace().collect();
        let t = t.as_str();
        Ok(if let Some(k) = t.strip_prefix('!') {
            LabelMatch::Absent(k.to_string())
        } else if let Some((k, v)) = t.split_once("!=") {
            LabelMatch::NotEquals(k.to_string(), v.to_string())
        } else if let Some((k, v)) = t.split_once("==").or_else(|| t.split_once('=')) {
            LabelMatch::Equals(k.to_string(), v.to_string())
        } else {
            LabelMatch::Exists(t.to_string())
        })
    }

    fn matches(&self, labels: &[String]) -> bool {
        let value_of = |k: &str| {
            labels
                .iter()
                .find(|l| key_matches(k, l))
                .map(|l| split_label(l).1)
        };
        match self {
            LabelMatch::Exists(k) => value_of(k).is_some(),
            LabelMatch::Absent(k) => value_of(k).is_none(),
            LabelMatch::Equals(k, v) => labels
                .iter()
                .any(|l| key_matches(k, l) && split_label(l).1 == v),
            LabelMatch::NotEquals(k, v) => !labels
                .iter()
                .any(|l| key_matches(k, l) && split_label(l).1 == v),
            LabelMatch::In(k, set) => labels
                .iter()
                .any(|l| key_matches(k, l) && set.iter().any(|v| v == split_label(l).1)),
            LabelMatch::NotIn(k, set) => !labels
                .iter()
                .any(|l| key_matches(k, l) && set.iter().any(|v| v == split_label(l).1)),
        }
    }
}

/// One compiled `FlowFilter`.
pub struct Compiled {
    uuid: Vec<String>,
    source_ip: Vec<IpMatch>,
    destination_ip: Vec<IpMatch>,
    source_pod: Vec<PodMatch>,
    destination_pod: Vec<PodMatch>,
    /// Comma-separated selectors: every term must match; any selector may.
    source_label: Vec<Vec<LabelMatch>>,
    destination_label: Vec<Vec<LabelMatch>>,
    traffic_direction: Vec<i32>,
    verdict: Vec<i32>,
    drop_reason_desc: Vec<i32>,
    event_type: Vec<pb::EventTypeFilter>,
    protocol: Vec<String>,
    source_port: Vec<u32>,
    destination_port: Vec<u32>,
    reply: Vec<bool>,
    source_identity: Vec<u32>,
    destination_identity: Vec<u32>,
    tcp_flags: Vec<pb::TcpFlags>,
    node_name: Vec<String>,
    ip_version: Vec<i32>,
    source_ip_xlated: Vec<IpMatch>,
    source_fqdn: Vec<String>,
    destination_fqdn: Vec<String>,
    source_service: Vec<PodMatch>,
    destination_service: Vec<PodMatch>,
    source_workload: Vec<pb::Workload>,
    destination_workload: Vec<pb::Workload>,
    source_cluster_name: Vec<String>,
    destination_cluster_name: Vec<String>,
    interface: Vec<pb::NetworkInterface>,
    http_status_code: Vec<(u32, u32)>,
    http_method: Vec<String>,
    http_path: Vec<regex::Regex>,
    http_url: Vec<regex::Regex>,
    http_header: Vec<pb::HttpHeader>,
    dns_query: Vec<regex::Regex>,
    node_labels: Vec<Vec<LabelMatch>>,
    trace_id: Vec<String>,
    ip_trace_id: Vec<u64>,
    encrypted: Vec<bool>,
    /// Only fields `rules_out` reads are set: the record alone decides.
    record_decides: bool,
}

fn regexes(field: &'static str, list: &[String]) -> Result<Vec<regex::Regex>, FilterError> {
    list.iter().map(|r| regex(field, r)).collect()
}

/// `404` exact, `4+` or `40+` a prefix of the three-digit code: (low, high).
fn status_codes(list: &[String]) -> Result<Vec<(u32, u32)>, FilterError> {
    list.iter()
        .map(|v| {
            let bad = || invalid("http_status_code", v, "expected NNN, N+ or NN+");
            match v.strip_suffix('+') {
                Some(p) if (1..=2).contains(&p.len()) && p.chars().all(|c| c.is_ascii_digit()) => {
                    let n: u32 = p.parse().map_err(|_| bad())?;
                    let scale = 10u32.pow(3 - p.len() as u32);
                    Ok((n * scale, n * scale + scale - 1))
                }
                None if v.len() == 3 && v.chars().all(|c| c.is_ascii_digit()) => {
                    let n: u32 = v.parse().map_err(|_| bad())?;
                    Ok((n, n))
                }
                _ => Err(bad()),
            }
        })
        .collect()
}

/// FQDN patterns: `*` is any run of DNS characters, case-insensitive, one
/// trailing dot ignored.
fn fqdn_matches(pattern: &str, name: &str) -> bool {
    let norm = |s: &str| s.trim_end_matches('.').to_lowercase();
    glob(&norm(pattern), &norm(name))
}

/// FQDN patterns as Hubble takes them: DNS characters and `*` only (a
/// regex or a typo matches nothing and should say so).
fn fqdns(field: &'static str, list: &[String]) -> Result<Vec<String>, FilterError> {
    list.iter()
        .map(|v| {
            let p = v.trim().trim_end_matches('.');
            let ok = !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | '*'));
            if ok {
                Ok(v.clone())
            } else {
                Err(invalid(
                    field,
                    v,
                    "only letters, digits, '-', '_', '.' and the wildcard '*' are allowed",
                ))
            }
        })
        .collect()
}

const PROTOCOLS: [&str; 11] = [
    "icmp", "icmpv4", "icmpv6", "tcp", "udp", "sctp", "vrrp", "igmp", "dns", "http", "kafka",
];

fn ips(field: &'static str, list: &[String]) -> Result<Vec<IpMatch>, FilterError> {
    list.iter()
        .map(|v| {
            if v.contains('/') {
                v.parse::<IpNet>()
                    .map(IpMatch::Cidr)
                    .map_err(|_| invalid(field, v, "not an IP address or CIDR"))
            } else {
                v.parse::<IpAddr>()
                    .map(|_| IpMatch::Exact(v.clone()))
                    .map_err(|_| invalid(field, v, "not an IP address or CIDR"))
            }
        })
        .collect()
}

fn ports(field: &'static str, list: &[String]) -> Result<Vec<u32>, FilterError> {
    list.iter()
        .map(|v| {
            v.parse::<u16>()
                .map(u32::from)
                .map_err(|_| invalid(field, v, "not a port number 0-65535"))
        })
        .collect()
}

fn labels(field: &'static str, list: &[String]) -> Result<Vec<Vec<LabelMatch>>, FilterError> {
    list.iter()
        .map(|sel| {
            selector_terms(sel)
                .into_iter()
                .map(|t| LabelMatch::parse(field, t))
                .collect()
        })
        .collect()
}

/// A selector's terms: split at the commas outside `( )`.
fn selector_terms(sel: &str) -> Vec<&str> {
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0i32, 0);
    for (i, c) in sel.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                terms.push(&sel[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&sel[start..]);
    terms
}

/// Checks and compiles one filter.
pub fn compile(f: &pb::FlowFilter) -> Result<Compiled, FilterError> {
    check_sizes(f)?;
    if f.experimental
        .as_ref()
        .is_some_and(|e| !e.cel_expression.is_empty())
    {
        return Err(FilterError::Unsupported("experimental.cel_expression"));
    }
    let http = !f.http_status_code.is_empty()
        || !f.http_method.is_empty()
        || !f.http_path.is_empty()
        || !f.http_url.is_empty()
        || !f.http_header.is_empty();
    if http && !f.event_type.is_empty() && !f.event_type.iter().any(|e| e.r#type == 129) {
        return Err(invalid(
            "event_type",
            &format!(
                "{:?}",
                f.event_type.iter().map(|e| e.r#type).collect::<Vec<_>>()
            ),
            "HTTP filters need the l7 event type (129) when event types are given",
        ));
    }
    for (field, list) in [
        ("source_cluster_name", &f.source_cluster_name),
        ("destination_cluster_name", &f.destination_cluster_name),
    ] {
        if list.iter().any(|c| c.is_empty()) {
            return Err(invalid(field, "", "empty cluster name"));
        }
    }
    for p in &f.protocol {
        if !PROTOCOLS.contains(&p.to_lowercase().as_str()) {
            return Err(invalid("protocol", p, "expected one of icmp, icmpv4, icmpv6, tcp, udp, sctp, vrrp, igmp, dns, http, kafka"));
        }
    }
    // Every field but those the record answers cleared: nothing left means
    // the record decides (a field added to the proto later does not).
    let record_decides = pb::FlowFilter {
        traffic_direction: vec![],
        verdict: vec![],
        drop_reason_desc: vec![],
        event_type: vec![],
        source_identity: vec![],
        destination_identity: vec![],
        node_name: vec![],
        ip_version: vec![],
        ..f.clone()
    } == pb::FlowFilter::default();
    Ok(Compiled {
        record_decides,
        uuid: f.uuid.clone(),
        source_ip: ips("source_ip", &f.source_ip)?,
        destination_ip: ips("destination_ip", &f.destination_ip)?,
        source_pod: f
            .source_pod
            .iter()
            .map(|v| PodMatch::parse("source_pod", v))
            .collect::<Result<_, _>>()?,
        destination_pod: f
            .destination_pod
            .iter()
            .map(|v| PodMatch::parse("destination_pod", v))
            .collect::<Result<_, _>>()?,
        source_label: labels("source_label", &f.source_label)?,
        destination_label: labels("destination_label", &f.destination_label)?,
        traffic_direction: f.traffic_direction.clone(),
        verdict: f.verdict.clone(),
        drop_reason_desc: f.drop_reason_desc.clone(),
        event_type: f.event_type.clone(),
        protocol: f.protocol.iter().map(|p| p.to_lowercase()).collect(),
        source_port: ports("source_port", &f.source_port)?,
        destination_port: ports("destination_port", &f.destination_port)?,
        reply: f.reply.clone(),
        source_identity: f.source_identity.clone(),
        destination_identity: f.destination_identity.clone(),
        tcp_flags: f.tcp_flags.clone(),
        node_name: f.node_name.clone(),
        ip_version: f.ip_version.clone(),
        source_ip_xlated: ips("source_ip_xlated", &f.source_ip_xlated)?,
        source_fqdn: fqdns("source_fqdn", &f.source_fqdn)?,
        destination_fqdn: fqdns("destination_fqdn", &f.destination_fqdn)?,
        source_service: f
            .source_service
            .iter()
            .map(|v| PodMatch::parse("source_service", v))
            .collect::<Result<_, _>>()?,
        destination_service: f
            .destination_service
            .iter()
            .map(|v| PodMatch::parse("destination_service", v))
            .collect::<Result<_, _>>()?,
        source_workload: f.source_workload.clone(),
        destination_workload: f.destination_workload.clone(),
        source_cluster_name: f.source_cluster_name.clone(),
        destination_cluster_name: f.destination_cluster_name.clone(),
        interface: f.interface.clone(),
        http_status_code: status_codes(&f.http_status_code)?,
        http_method: f.http_method.iter().map(|m| m.to_uppercase()).collect(),
        http_path: regexes("http_path", &f.http_path)?,
        http_url: regexes("http_url", &f.http_url)?,
        http_header: f.http_header.clone(),
        dns_query: regexes("dns_query", &f.dns_query)?,
        node_labels: labels("node_labels", &f.node_labels)?,
        trace_id: f.trace_id.clone(),
        ip_trace_id: f.ip_trace_id.clone(),
        encrypted: f.encrypted.clone(),
    })
}

fn ip_matches(list: &[IpMatch], addr: Option<&str>) -> bool {
    let Some(addr) = addr.filter(|a| !a.is_empty()) else {
        return false;
    };
    list.iter().any(|m| match m {
        IpMatch::Exact(s) => s == addr,
        IpMatch::Cidr(net) => addr.parse::<IpAddr>().is_ok_and(|a| net.contains(&a)),
    })
}

fn l4_ports(f: &pb::Flow) -> Option<(u32, u32)> {
    use pb::layer4::Protocol;
    match f.l4.as_ref()?.protocol.as_ref()? {
        Protocol::Tcp(t) => Some((t.source_port, t.destination_port)),
        Protocol::Udp(u) => Some((u.source_port, u.destination_port)),
        Protocol::Sctp(s) => Some((s.source_port, s.destination_port)),
        _ => None,
    }
}

fn protocol_of(f: &pb::Flow, want: &str) -> bool {
    use pb::layer4::Protocol;
    let l4 = f.l4.as_ref().and_then(|l| l.protocol.as_ref());
    match want {
        "tcp" => matches!(l4, Some(Protocol::Tcp(_))),
        "udp" => matches!(l4, Some(Protocol::Udp(_))),
        "sctp" => matches!(l4, Some(Protocol::Sctp(_))),
        "icmpv4" => matches!(l4, Some(Protocol::IcmPv4(_))),
        "icmpv6" => matches!(l4, Some(Protocol::IcmPv6(_))),
        "icmp" => matches!(l4, Some(Protocol::IcmPv4(_) | Protocol::IcmPv6(_))),
        "vrrp" => matches!(l4, Some(Protocol::Vrrp(_))),
        "igmp" => matches!(l4, Some(Protocol::Igmp(_))),
        // L7 records, by the kind the proxy saw.
        _ => {
            use pb::layer7::Record;
            let record = f.l7.as_ref().and_then(|l| l.record.as_ref());
            match want {
                "http" => matches!(record, Some(Record::Http(_))),
                "dns" => matches!(record, Some(Record::Dns(_))),
                #[allow(deprecated)] // Kafka is deprecated in flow.proto, still a valid filter
                "kafka" => matches!(record, Some(Record::Kafka(_))),
                _ => false,
            }
        }
    }
}

/// `cluster/node`, `node`, `cluster/`; `*` globs within a name.
fn node_matches(pattern: &str, node: &str) -> bool {
    let node = if node.contains('/') {
        node.to_string()
    } else {
        format!("default/{node}")
    };
    let pattern = if pattern.contains('/') {
        pattern.to_string()
    } else {
        format!("*/{pattern}")
    };
    let (pc, pn) = pattern.split_once('/').unwrap_or(("*", &pattern));
    let (nc, nn) = node.split_once('/').unwrap_or(("default", &node));
    glob(pc, nc) && (pn.is_empty() || glob(pn, nn))
}

/// `*` matches any run of characters. Linear in the name: the pieces
/// between stars are found left to right, each at its first place (for a
/// star-only glob the leftmost match of each piece is never wrong), so no
/// pattern can make it backtrack.
fn glob(p: &str, s: &str) -> bool {
    let mut pieces = p.split('*');
    let first = pieces.next().unwrap_or("");
    let Some(mut rest) = s.strip_prefix(first) else {
        return false;
    };
    let Some(last) = pieces.next_back() else {
        return rest.is_empty(); // no star: the whole name
    };
    for piece in pieces {
        match rest.find(piece) {
            Some(i) => rest = &rest[i + piece.len()..],
            None => return false,
        }
    }
    rest.ends_with(last)
}

impl Compiled {
    /// Whether the record's own numbers (verdict, direction, drop reason,
    /// event type, identities, IP version, node) already rule the flow out:
    /// then it need not become a `flow.Flow` to be refused. Never true of a
    /// flow `matches` would take (the conversion copies these fields).
    pub fn rules_out(&self, f: &flow::Flow) -> bool {
        let fails = |empty: bool, hit: bool| !empty && !hit;
        let dropped = f.verdict == flow::enums::Verdict::DROPPED;
        let et = &f.event_type;
        fails(
            self.traffic_direction.is_empty(),
            self.traffic_direction.contains(&f.traffic_direction.0),
        ) || fails(self.verdict.is_empty(), self.verdict.contains(&f.verdict.0))
            || fails(
                self.drop_reason_desc.is_empty(),
                dropped && self.drop_reason_desc.contains(&f.drop_reason_desc.0),
            )
            || fails(
                self.event_type.is_empty(),
                self.event_type.iter().any(|e| {
                    e.r#type == 0
                        || (e.r#type == et.r#type
                            && (!e.match_sub_type || e.sub_type == et.sub_type))
                }),
            )
            || fails(
                self.source_identity.is_empty(),
                self.source_identity.contains(&f.source.identity),
            )
            || fails(
                self.destination_identity.is_empty(),
                self.destination_identity.contains(&f.destination.identity),
            )
            || fails(
                self.node_name.is_empty(),
                self.node_name.iter().any(|p| node_matches(p, &f.node_name)),
            )
            || fails(
                self.ip_version.is_empty(),
                self.ip_version
                    .contains(&f.ip.as_ref().map_or(0, |i| i.ip_version.0)),
            )
    }

    pub fn matches(&self, f: &pb::Flow) -> bool {
        let any = |empty: bool, hit: &dyn Fn() -> bool| empty || hit();
        let ip = f.ip.as_ref();
        let ports = l4_ports(f);
        let flags = match f.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
            Some(pb::layer4::Protocol::Tcp(t)) => t.flags,
            _ => None,
        };
        let dropped = f.verdict == pb::Verdict::Dropped as i32;
        any(self.uuid.is_empty(), &|| self.uuid.contains(&f.uuid))
            && any(self.source_ip.is_empty(), &|| {
                ip_matches(&self.source_ip, ip.map(|i| i.source.as_str()))
            })
            && any(self.destination_ip.is_empty(), &|| {
                ip_matches(&self.destination_ip, ip.map(|i| i.destination.as_str()))
            })
            && any(self.source_pod.is_empty(), &|| {
                self.source_pod.iter().any(|p| p.matches(f.source.as_ref()))
            })
            && any(self.destination_pod.is_empty(), &|| {
                self.destination_pod
                    .iter()
                    .any(|p| p.matches(f.destination.as_ref()))
            })
            && any(self.source_label.is_empty(), &|| {
                let l = f.source.as_ref().map_or(&[][..], |e| &e.labels[..]);
                self.source_label
                    .iter()
                    .any(|sel| sel.iter().all(|t| t.matches(l)))
            })
            && any(self.destination_label.is_empty(), &|| {
                let l = f.destination.as_ref().map_or(&[][..], |e| &e.labels[..]);
                self.destination_label
                    .iter()
                    .any(|sel| sel.iter().all(|t| t.matches(l)))
            })
            && any(self.traffic_direction.is_empty(), &|| {
                self.traffic_direction.contains(&f.traffic_direction)
            })
            && any(self.verdict.is_empty(), &|| {
                self.verdict.contains(&f.verdict)
            })
            && any(self.drop_reason_desc.is_empty(), &|| {
                dropped && self.drop_reason_desc.contains(&f.drop_reason_desc)
            })
            && any(self.event_type.is_empty(), &|| {
                let et = f.event_type.unwrap_or_default();
                self.event_type.iter().any(|e| {
                    e.r#type == 0
                        || (e.r#type == et.r#type
                            && (!e.match_sub_type || e.sub_type == et.sub_type))
                })
            })
            && any(self.protocol.is_empty(), &|| {
                self.protocol.iter().any(|p| protocol_of(f, p))
            })
            && any(self.source_port.is_empty(), &|| {
                ports.is_some_and(|(s, _)| self.source_port.contains(&s))
            })
            && any(self.destination_port.is_empty(), &|| {
                ports.is_some_and(|(_, d)| self.destination_port.contains(&d))
            })
            && any(self.reply.is_empty(), &|| {
                let r = f.is_reply.or(dropped.then_some(false));
                r.is_some_and(|r| self.reply.contains(&r))
            })
            && any(self.source_identity.is_empty(), &|| {
                f.source
                    .as_ref()
                    .is_some_and(|e| self.source_identity.contains(&e.identity))
            })
            && any(self.destination_identity.is_empty(), &|| {
                f.destination
                    .as_ref()
                    .is_some_and(|e| self.destination_identity.contains(&e.identity))
            })
            && any(self.tcp_flags.is_empty(), &|| {
                flags.is_some_and(|have| {
                    self.tcp_flags.iter().any(|want| {
                        (!want.syn || have.syn)
                            && (!want.ack || have.ack)
                            && (!want.fin || have.fin)
                            && (!want.rst || have.rst)
                            && (!want.psh || have.psh)
                            && (!want.urg || have.urg)
                            && (!want.ece || have.ece)
                            && (!want.cwr || have.cwr)
                            && (!want.ns || have.ns)
                    })
                })
            })
            && any(self.node_name.is_empty(), &|| {
                self.node_name.iter().any(|p| node_matches(p, &f.node_name))
            })
            && any(self.ip_version.is_empty(), &|| {
                self.ip_version
                    .contains(&ip.map_or(pb::IpVersion::IpNotUsed as i32, |i| i.ip_version))
            })
            && self.matches_more(f)
    }

    /// The fields whose data comes from enrichment and the L7 proxies.
    fn matches_more(&self, f: &pb::Flow) -> bool {
        use pb::layer7::Record;
        let any = |empty: bool, hit: &dyn Fn() -> bool| empty || hit();
        let http = match f.l7.as_ref().and_then(|l| l.record.as_ref()) {
            Some(Record::Http(h)) => Some(h),
            _ => None,
        };
        let dns = match f.l7.as_ref().and_then(|l| l.record.as_ref()) {
            Some(Record::Dns(d)) => Some(d),
            _ => None,
        };
        let workload = |want: &[pb::Workload], e: Option<&pb::Endpoint>| {
            e.is_some_and(|e| {
                e.workloads.iter().any(|w| {
                    want.iter().any(|x| {
                        (x.name.is_empty() || x.name == w.name)
                            && (x.kind.is_empty() || x.kind == w.kind)
                    })
                })
            })
        };
        let path_of = |url: &str| -> Option<String> {
            let rest = url
                .split_once("://")
                .map_or(url, |(_, r)| r.find('/').map_or("/", |i| &r[i..]));
            Some(rest.split(['?', '#']).next()?.to_string())
        };
        any(self.source_ip_xlated.is_empty(), &|| {
            ip_matches(
                &self.source_ip_xlated,
                f.ip.as_ref().map(|i| i.source_xlated.as_str()),
            )
        }) && any(self.source_fqdn.is_empty(), &|| {
            self.source_fqdn
                .iter()
                .any(|p| f.source_names.iter().any(|n| fqdn_matches(p, n)))
        }) && any(self.destination_fqdn.is_empty(), &|| {
            self.destination_fqdn
                .iter()
                .any(|p| f.destination_names.iter().any(|n| fqdn_matches(p, n)))
        }) && any(self.source_service.is_empty(), &|| {
            self.source_service
                .iter()
                .any(|m| m.matches_service(f.source_service.as_ref()))
        }) && any(self.destination_service.is_empty(), &|| {
            self.destination_service
                .iter()
                .any(|m| m.matches_service(f.destination_service.as_ref()))
        }) && any(self.source_workload.is_empty(), &|| {
            workload(&self.source_workload, f.source.as_ref())
        }) && any(self.destination_workload.is_empty(), &|| {
            workload(&self.destination_workload, f.destination.as_ref())
        }) && any(self.source_cluster_name.is_empty(), &|| {
            f.source
                .as_ref()
                .is_some_and(|e| self.source_cluster_name.contains(&e.cluster_name))
        }) && any(self.destination_cluster_name.is_empty(), &|| {
            f.destination
                .as_ref()
                .is_some_and(|e| self.destination_cluster_name.contains(&e.cluster_name))
        }) && any(self.interface.is_empty(), &|| {
            f.interface.as_ref().is_some_and(|i| {
                self.interface.iter().any(|w| {
                    (w.index == 0 || w.index == i.index) && (w.name.is_empty() || w.name == i.name)
                })
            })
        }) && any(self.http_status_code.is_empty(), &|| {
            http.is_some_and(|h| {
                h.code != 0
                    && self
                        .http_status_code
                        .iter()
                        .any(|(lo, hi)| (*lo..=*hi).contains(&h.code))
            })
        }) && any(self.http_method.is_empty(), &|| {
            http.is_some_and(|h| self.http_method.contains(&h.method.to_uppercase()))
        }) && any(self.http_path.is_empty(), &|| {
            http.and_then(|h| path_of(&h.url))
                .is_some_and(|p| self.http_path.iter().any(|r| r.is_match(&p)))
        }) && any(self.http_url.is_empty(), &|| {
            http.is_some_and(|h| self.http_url.iter().any(|r| r.is_match(&h.url)))
        }) && any(self.http_header.is_empty(), &|| {
            http.is_some_and(|h| {
                h.headers.iter().any(|x| {
                    self.http_header
                        .iter()
                        .any(|w| w.key == x.key && w.value == x.value)
                })
            })
        }) && any(self.dns_query.is_empty(), &|| {
            dns.is_some_and(|d| self.dns_query.iter().any(|r| r.is_match(&d.query)))
        }) && any(self.node_labels.is_empty(), &|| {
            self.node_labels
                .iter()
                .any(|sel| sel.iter().all(|t| t.matches(&f.node_labels)))
        }) && any(self.trace_id.is_empty(), &|| {
            f.trace_context
                .as_ref()
                .and_then(|t| t.parent.as_ref())
                .is_some_and(|p| self.trace_id.contains(&p.trace_id))
        }) && any(self.ip_trace_id.is_empty(), &|| {
            f.ip_trace_id
                .is_some_and(|t| self.ip_trace_id.contains(&t.trace_id))
        }) && any(self.encrypted.is_empty(), &|| {
            self.encrypted
                .contains(&f.ip.as_ref().is_some_and(|i| i.encrypted))
        })
    }
}

/// An allowlist and a denylist.
pub struct Filters {
    allow: Vec<Compiled>,
    deny: Vec<Compiled>,
}

impl Filters {
    /// No filter at all: every flow matches.
    pub fn is_empty(&self) -> bool {
        self.allow.is_empty() && self.deny.is_empty()
    }

    /// Checks and compiles a request's filters, within the bounds above.
    /// Compiling regexes costs CPU: call it off an async runtime.
    pub fn new(
        whitelist: &[pb::FlowFilter],
        blacklist: &[pb::FlowFilter],
    ) -> Result<Self, FilterError> {
        let filters = whitelist.len() + blacklist.len();
        if filters > MAX_FILTERS {
            return Err(too_large(format!(
                "{filters} filters; at most {MAX_FILTERS} per request"
            )));
        }
        let regexes: usize = whitelist
            .iter()
            .chain(blacklist)
            .map(|f| f.http_path.len() + f.http_url.len() + f.dns_query.len())
            .sum();
        if regexes > MAX_REGEXES {
            return Err(too_large(format!(
                "{regexes} regular expressions (http_path, http_url, dns_query); at most {MAX_REGEXES} per request"
            )));
        }
        Ok(Self {
            allow: whitelist.iter().map(compile).collect::<Result<_, _>>()?,
            deny: blacklist.iter().map(compile).collect::<Result<_, _>>()?,
        })
    }

    pub fn matches(&self, f: &pb::Flow) -> bool {
        (self.allow.is_empty() || self.allow.iter().any(|c| c.matches(f)))
            && !self.deny.iter().any(|c| c.matches(f))
    }

    /// `matches` for a ring's flow, made a `flow.Flow` (`pb`) only when its
    /// record does not decide: it is ruled out of every allow filter, or
    /// an allow filter on record fields alone takes it (and none denies).
    pub fn matches_record<'a>(
        &self,
        record: &flow::Flow,
        pb: impl FnOnce() -> &'a pb::Flow,
    ) -> bool {
        if !self.allow.is_empty() && self.allow.iter().all(|c| c.rules_out(record)) {
            return false;
        }
        if self.deny.is_empty()
            && self
                .allow
                .iter()
                .any(|c| c.record_decides && !c.rules_out(record))
        {
            return true;
        }
        self.matches(pb())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow() -> pb::Flow {
        pb::Flow {
            uuid: "u1".into(),
            verdict: pb::Verdict::Dropped as i32,
            drop_reason_desc: pb::DropReason::PolicyDenied as i32,
            ip: Some(pb::Ip {
                source: "10.0.0.5".into(),
                destination: "10.0.1.7".into(),
                ip_version: pb::IpVersion::IPv4 as i32,
                ..Default::default()
            }),
            l4: Some(pb::Layer4 {
                protocol: Some(pb::layer4::Protocol::Tcp(pb::Tcp {
                    source_port: 40000,
                    destination_port: 8080,
                    flags: Some(pb::TcpFlags {
                        syn: true,
                        ..Default::default()
                    }),
                })),
            }),
            source: Some(pb::Endpoint {
                identity: 300,
                namespace: "shop".into(),
                pod_name: "web-1".into(),
                labels: vec![
                    "k8s:app=web".into(),
                    "k8s:io.kubernetes.pod.namespace=shop".into(),
                ],
                ..Default::default()
            }),
            destination: Some(pb::Endpoint {
                identity: 2,
                labels: vec!["reserved:world".into()],
                ..Default::default()
            }),
            traffic_direction: pb::TrafficDirection::Egress as i32,
            event_type: Some(pb::CiliumEventType {
                r#type: 1,
                sub_type: 133,
            }),
            node_name: "lab-node".into(),
            ..Default::default()
        }
    }

    fn check(filter: pb::FlowFilter, expected: bool) {
        let c = compile(&filter).unwrap_or_else(|e| panic!("{e}: {filter:?}"));
        assert_eq!(c.matches(&flow()), expected, "{filter:?}");
    }

    /// What the record rules out, the message never matches; and the
    /// shortcut does rule flows out.
    #[test]
    fn a_record_rules_out_only_what_would_not_match() {
        let mut flows = vec![flow()];
        let mut forwarded = flow();
        forwarded.verdict = pb::Verdict::Forwarded as i32;
        forwarded.traffic_direction = pb::TrafficDirection::Ingress as i32;
        forwarded.event_type = Some(pb::CiliumEventType {
            r#type: 4,
            sub_type: 0,
        });
        forwarded.ip = None;
        flows.push(forwarded);
        let filters = [
            pb::FlowFilter {
                verdict: vec![pb::Verdict::Dropped as i32],
                ..Default::default()
            },
            pb::FlowFilter {
                verdict: vec![pb::Verdict::Forwarded as i32, pb::Verdict::Audit as i32],
                traffic_direction: vec![pb::TrafficDirection::Ingress as i32],
                ..Default::default()
            },
            pb::FlowFilter {
                drop_reason_desc: vec![pb::DropReason::PolicyDenied as i32],
                ..Default::default()
            },
            pb::FlowFilter {
                event_type: vec![pb::EventTypeFilter {
                    r#type: 1,
                    match_sub_type: true,
                    sub_type: 133,
                }],
                ..Default::default()
            },
            pb::FlowFilter {
                source_identity: vec![300],
                destination_identity: vec![2, 3],
                ..Default::default()
            },
            pb::FlowFilter {
                node_name: vec!["lab-*".into()],
                ip_version: vec![pb::IpVersion::IpNotUsed as i32],
                ..Default::default()
            },
            pb::FlowFilter {
                source_pod: vec!["shop/web".into()],
                ..Default::default()
            },
        ];
        let mut ruled_out = 0;
        for f in &flows {
            let record = crate::convert::from_pb(f);
            assert_eq!(&crate::convert::flow(&record).verdict, &f.verdict);
            for filter in &filters {
                let c = compile(filter).unwrap();
                if c.rules_out(&record) {
                    ruled_out += 1;
                    assert!(!c.matches(f), "{filter:?} ruled out {f:?}");
                }
                let set = Filters {
                    allow: vec![compile(filter).unwrap()],
                    deny: vec![],
                };
                assert_eq!(set.matches_record(&record, || f), c.matches(f));
            }
        }
        assert!(ruled_out >= 5, "{ruled_out}");
    }

    #[test]
    fn each_filter_family_matches_as_hubble_does() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        check(pb::FlowFilter::default(), true);
        check(
            pb::FlowFilter {
                uuid: s(&["u1"]),
                ..Default::default()
            },
            true,
        );
        check(
            pb::FlowFilter {
                source_ip: s(&["10.0.0.0/24"]),
                ..Default::default()
            },
            true,
        );
        check(
            pb::FlowFilter {
                source_ip: s(&["10.0.0.6"]),
                ..Default::default()
            },
            false,
        );
        check(
            pb::FlowFilter {
                destination_ip: s(&["10.0.1.7"]),
                ..Default::default()
            },
            true,
        );
        check(
            pb::FlowFilter {
                source_pod: s(&["shop/web"]),
                ..Default::default()
            },
            true,
        );
        check(
            pb::FlowFilter {
                source_pod: s(&["web"]),
                ..Default::default()
            },
            false,
        );
        check(
            pb::FlowFilter {
                source_pod: s(&["shop/"]),
                ..Default::default()
            },
            true,
        );
        check(
            pb::FlowFilter {
                source_pod: s(&["/web-1"]),
                ..Default::default()
            },
            true,
        );
        check(
            pb::FlowFilter {
                destination_pod: s(&["/"]),
                ..Default::default()
            },
            false,
        );
        check(
            pb::FlowFilter {
                source_label: s(&["app=web"]),
                ..Default::default()
            },
            true,
        );
        check(
            pb::FlowFilter {
                source_label: s(&["k8s:app=web,!tier"]),
                ..Default::default()
            },
            true,
        );
        // Set-based terms; the source endpoint is app=web without tier.
        for (selector, want) in [
            ("app in (api, web)", true),
            ("app in (api),!tier", false),
            ("k8s:app notin (api,db)", true),
            ("app notin (web)", false),
            ("tier notin (x)", true),
            ("app in (web),tier in (x)", false),
            ("app = web, ! tier", true),
        ] {
            check(
                pb::FlowFilter {
                    source_label: s(&[selector]),
                    ..Default::default()
                },
                want,
            );
        }
        check(
            pb::FlowFilter {
                destination_label: s(&["reserved:world"]),
                ..Default::default()
            },
            true,
        );
        check(
            pb::FlowFilter {
                destination_label: s(&["app=web"]),
                ..Default::default()
            },
            false,
        );
        check(
            pb::FlowFilter {
                verdict: vec![pb::Verdict::Forwarded as i32],
                ..Default::default()
            },
            false,
        );
        check(
            pb::FlowFilter {
                verdict: vec![pb::Verdict::Forwarded as i32, pb::Verdict::Dropped as i32],
                ..Default::default()
            },
            true,
        );
        check(
            pb::FlowFilter {
                drop_reason_desc: vec![pb::DropReason::PolicyDenied as i32],
                ..Default::default()
            },
            true,
        );
        check(
            pb::FlowFilter {
                traffic_direction: vec![pb::TrafficDirection::Ingress as i32],
                ..Default::default()
            },
            false,
        );
        check(
            pb::FlowFilter {
                event_type: vec![pb::EventTypeFilter {
                    r#type: 1,
                    match_sub_type: true,
                    sub_type: 133,
                }],
                ..Default::default()
            },
            true,
        );
        check(
            pb::FlowFilter {
                event_type: vec![pb::EventTypeFilter {
                    r#type: 4,
                    ..Default::default()
                }],
                ..Default::default()
            },
            false,
        );
        check(
            pb::FlowFilter {
                protocol: s(&["TCP"]),
                ..Default::default()
            },
            true,
        );
        check(
            pb::FlowFilter {
                protocol: s(&["udp", "icmp"]),
                ..Default::default()
            },
            false,
        );
        check(
            pb::FlowFilter {
                destination_port: s(&["8080"]),
                ..Default::default()
            },
            true,
        );
        check(
            pb::FlowFilter {
                source_port: s(&["8080"]),
                ..Default::default()
            },
            false,
        );
        check(
            pb::FlowFilter {
                reply: vec![false],
                ..Default::default()
            },
            true,
        );
        check(
            pb::FlowFilter {
                source_identity: vec![300],
                destination_identity: vec![2],
                ..Default::default()
            },
            true,
        );
        check(
            pb::FlowFilter {
                tcp_flags: vec![pb::TcpFlags {
                    syn: true,
                    ..Default::default()
                }],
                ..Default::default()
            },
            true,
        );
        check(
            pb::FlowFilter {
                tcp_flags: vec![pb::TcpFlags {
                    syn: true,
                    ack: true,
                    ..Default::default()
                }],
                ..Default::default()
            },
            false,
        );
        check(
            pb::FlowFilter {
                node_name: s(&["lab-*"]),
                ..Default::default()
            },
            true,
        );
        check(
            pb::FlowFilter {
                node_name: s(&["default/"]),
                ..Default::default()
            },
            true,
        );
        check(
            pb::FlowFilter {
                node_name: s(&["other/lab-node"]),
                ..Default::default()
            },
            false,
        );
        check(
            pb::FlowFilter {
                ip_version: vec![pb::IpVersion::IPv6 as i32],
                ..Default::default()
            },
            false,
        );
        // Enrichment and L7 fields: an L3/L4 flow without them never matches.
        check(
            pb::FlowFilter {
                destination_fqdn: s(&["*.example.com"]),
                ..Default::default()
            },
            false,
        );
        check(
            pb::FlowFilter {
                http_method: s(&["GET"]),
                ..Default::default()
            },
            false,
        );
        check(
            pb::FlowFilter {
                source_cluster_name: s(&["default"]),
                ..Default::default()
            },
            false,
        );
    }

    #[test]
    fn l7_and_enrichment_fields_match_when_present() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let mut f = flow();
        f.destination_names = s(&["api.Example.com."]);
        f.event_type = Some(pb::CiliumEventType {
            r#type: 129,
            sub_type: 0,
        });
        f.l7 = Some(pb::Layer7 {
            r#type: pb::L7FlowType::Response as i32,
            latency_ns: 0,
            record: Some(pb::layer7::Record::Http(pb::Http {
                code: 404,
                method: "get".into(),
                url: "http://shop/api/items?id=3".into(),
                protocol: "HTTP/1.1".into(),
                headers: vec![pb::HttpHeader {
                    key: "x-user".into(),
                    value: "a".into(),
                }],
            })),
        });
        let m = |flt: pb::FlowFilter| compile(&flt).unwrap().matches(&f);
        assert!(m(pb::FlowFilter {
            destination_fqdn: s(&["*.example.com"]),
            ..Default::default()
        }));
        assert!(m(pb::FlowFilter {
            http_status_code: s(&["4+"]),
            ..Default::default()
        }));
        assert!(m(pb::FlowFilter {
            http_status_code: s(&["404"]),
            ..Default::default()
        }));
        assert!(!m(pb::FlowFilter {
            http_status_code: s(&["5+"]),
            ..Default::default()
        }));
        assert!(m(pb::FlowFilter {
            http_method: s(&["GET"]),
            ..Default::default()
        }));
        assert!(m(pb::FlowFilter {
            http_path: s(&["^/api/.*$"]),
            ..Default::default()
        }));
        assert!(!m(pb::FlowFilter {
            http_path: s(&["^/admin"]),
            ..Default::default()
        }));
        assert!(m(pb::FlowFilter {
            http_url: s(&["id=3"]),
            ..Default::default()
        }));
        assert!(m(pb::FlowFilter {
            http_header: vec![pb::HttpHeader {
                key: "x-user".into(),
                value: "a".into()
            }],
            event_type: vec![pb::EventTypeFilter {
                r#type: 129,
                ..Default::default()
            }],
            ..Default::default()
        }));
    }

    #[test]
    fn allow_and_deny_lists_combine() {
        let by_ns = |ns: &str| pb::FlowFilter {
            source_pod: vec![format!("{ns}/")],
            ..Default::default()
        };
        let f = flow();
        assert!(Filters::new(&[], &[]).unwrap().matches(&f));
        assert!(Filters::new(&[by_ns("other"), by_ns("shop")], &[])
            .unwrap()
            .matches(&f));
        assert!(!Filters::new(&[by_ns("shop")], &[by_ns("shop")])
            .unwrap()
            .matches(&f));
    }

    #[test]
    fn bad_values_are_errors() {
        let s = |v: &str| vec![v.to_string()];
        for f in [
            pb::FlowFilter {
                source_ip: s("10.0.0.0/99"),
                ..Default::default()
            },
            pb::FlowFilter {
                source_pod: s(""),
                ..Default::default()
            },
            pb::FlowFilter {
                destination_port: s("http"),
                ..Default::default()
            },
            pb::FlowFilter {
                protocol: s("quic"),
                ..Default::default()
            },
            pb::FlowFilter {
                source_label: s("app in (a,"),
                ..Default::default()
            },
            pb::FlowFilter {
                source_label: s("app within (a)"),
                ..Default::default()
            },
            pb::FlowFilter {
                source_label: s("app in ()"),
                ..Default::default()
            },
        ] {
            assert!(
                matches!(compile(&f), Err(FilterError::Invalid { .. })),
                "{f:?}"
            );
        }
        for f in [
            pb::FlowFilter {
                http_status_code: s("4xx"),
                ..Default::default()
            },
            pb::FlowFilter {
                http_path: s("(unclosed"),
                ..Default::default()
            },
            pb::FlowFilter {
                http_method: s("GET"),
                event_type: vec![pb::EventTypeFilter {
                    r#type: 4,
                    ..Default::default()
                }],
                ..Default::default()
            },
        ] {
            assert!(
                matches!(compile(&f), Err(FilterError::Invalid { .. })),
                "{f:?}"
            );
        }
        let cel = pb::FlowFilter {
            experimental: Some(pb::flow_filter::Experimental {
                cel_expression: s("true"),
            }),
            ..Default::default()
        };
        assert_eq!(
            compile(&cel).err(),
            Some(FilterError::Unsupported("experimental.cel_expression"))
        );
    }

    #[test]
    fn bad_fqdn_and_pod_values_are_refused() {
        let bad = [
            pb::FlowFilter {
                destination_fqdn: vec!["[bad".into()],
                ..Default::default()
            },
            pb::FlowFilter {
                source_fqdn: vec![" ".into()],
                ..Default::default()
            },
            pb::FlowFilter {
                source_pod: vec!["x/y/z".into()],
                ..Default::default()
            },
            pb::FlowFilter {
                destination_service: vec!["a/b/c".into()],
                ..Default::default()
            },
        ];
        for f in bad {
            assert!(
                matches!(
                    Filters::new(std::slice::from_ref(&f), &[]),
                    Err(FilterError::Invalid { .. })
                ),
                "{f:?}"
            );
        }
        let good = pb::FlowFilter {
            destination_fqdn: vec!["*.Example.com.".into(), "api-1_x.example".into()],
            source_pod: vec!["shop/".into(), "/web".into(), "web".into()],
            ..Default::default()
        };
        assert!(Filters::new(&[good], &[]).is_ok());
    }

    #[test]
    fn globs_match_in_linear_time() {
        for (p, name, want) in [
            ("node-*", "node-1", true),
            ("*", "", true),
            ("a*a", "a", false),
            ("*a*a", "aa", true),
            ("*ab*b", "abb", true),
            ("x*y*z", "xyyz", true),
            ("x*y*z", "xzy", false),
            ("exact", "exact", true),
            ("exact", "exactly", false),
        ] {
            assert_eq!(glob(p, name), want, "{p} {name}");
        }
        // The backtracking matcher took seconds (14 stars, minutes more);
        // this one scans the name once per piece.
        let stars = "*a".repeat(500) + "b";
        let name = "a".repeat(1000);
        assert!(!glob(&stars, &name));
    }

    #[test]
    fn requests_past_the_bounds_are_refused_before_compiling() {
        let many = |n: usize| vec!["/x".to_string(); n];
        let filter = |paths: Vec<String>| pb::FlowFilter {
            http_path: paths,
            ..Default::default()
        };
        assert!(matches!(
            Filters::new(&[filter(many(MAX_REGEXES + 1))], &[]),
            Err(FilterError::TooLarge(m)) if m.contains("regular expressions")
        ));
        assert!(Filters::new(&[filter(many(MAX_REGEXES))], &[]).is_ok());
        let filters = vec![pb::FlowFilter::default(); MAX_FILTERS + 1];
        assert!(matches!(
            Filters::new(&filters, &[]),
            Err(FilterError::TooLarge(_))
        ));
        let long = pb::FlowFilter {
            node_name: vec!["*".repeat(MAX_VALUE_LEN + 1)],
            ..Default::default()
        };
        assert!(matches!(compile(&long), Err(FilterError::TooLarge(m)) if m.contains("node_name")));
        // Small text, huge program: refused by the compiled-size limit.
        let huge = filter(vec!["\\w{1000}\\w{1000}\\w{1000}".into()]);
        assert!(
            matches!(compile(&huge), Err(FilterError::TooLarge(m)) if m.contains("compiles to more"))
        );
        let bad = filter(vec!["(".into()]);
        assert!(matches!(compile(&bad), Err(FilterError::Invalid { .. })));
    }
}
