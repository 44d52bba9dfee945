//! Hubble's flow metrics (`hubble_*`, semantics §4.8), counted as flows are
//! processed and rendered in the Prometheus text format.

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::enums::{L7FlowType, TraceObservationPoint, TrafficDirection, Verdict};
use crate::Flow;

/// A series: metric name and label pairs (in label order).
type Key = (&'static str, Vec<(&'static str, String)>);

/// Series in name and label order -> count.
type Sorted = BTreeMap<Key, u64>;

/// Series by the hash of their key -> counts. Keys are hashed with
/// foldhash (seeded per process): std's SipHash was a tenth of the cost of
/// a flow, hashing label strings a few bytes at a time.
#[derive(Default)]
struct Series(
    std::collections::HashMap<u64, Vec<(Key, u64)>>,
    foldhash::fast::RandomState,
);

/// A series of the L3/L4 handlers by the flow's numbers: these count
/// every datapath flow, so they are found without hashing or comparing
/// label text, and named only when rendered.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
enum Coded {
    /// `hubble_flows_processed_total`: the event type, the trace point
    /// (unset unless a trace), the verdict.
    Processed(i32, TraceObservationPoint, Verdict),
    /// `hubble_drop_total`: the protocol's name, the drop reason.
    Drop(&'static str, crate::enums::DropReason),
    /// `hubble_policy_verdicts_total`: the action, direction and match.
    PolicyVerdict(&'static str, TrafficDirection, u32),
    /// `hubble_tcp_flags_total`: the IP family, the flag.
    TcpFlag(&'static str, &'static str),
}

impl Coded {
    /// The series' name and labels, in label order.
    fn key(self) -> Key {
        let labels =
            |l: &[(&'static str, &str)]| l.iter().map(|(k, v)| (*k, v.to_string())).collect();
        match self {
            Coded::Processed(ty, point, verdict) => (
                "hubble_flows_processed_total",
                labels(&[
                    ("subtype", &subtype(point)),
                    ("type", event_kind(ty)),
                    ("verdict", verdict.as_str()),
                ]),
            ),
            Coded::Drop(protocol, reason) => (
                "hubble_drop_total",
                labels(&[("protocol", protocol), ("reason", reason.as_str())]),
            ),
            Coded::PolicyVerdict(action, direction, m) => (
                "hubble_policy_verdicts_total",
                labels(&[
                    ("action", action),
                    ("direction", &direction.as_str().to_lowercase()),
                    ("match", match_name(m)),
                ]),
            ),
            Coded::TcpFlag(family, flag) => (
                "hubble_tcp_flags_total",
                labels(&[("family", family), ("flag", flag)]),
            ),
        }
    }
}

#[derive(Default)]
struct AllSeries {
    series: Series,
    coded: std::collections::HashMap<Coded, u64, foldhash::fast::RandomState>,
}

#[derive(Default)]
pub struct Counters {
    all: Mutex<AllSeries>,
}

const HELP: [(&str, &str); 12] = [
    (
        "hubble_flows_processed_total",
        "Total number of flows processed",
    ),
    ("hubble_drop_total", "Number of drops"),
    ("hubble_policy_verdicts_total", "Number of policy verdicts"),
    ("hubble_tcp_flags_total", "TCP flag occurrences"),
    ("hubble_lost_events_total", "Number of lost events"),
    (
        "hubble_http_requests_total",
        "Count of HTTP requests (refused ones counted with the 403 the client got)",
    ),
    (
        "hubble_http_request_duration_seconds_bucket",
        "Quantiles of HTTP request duration in seconds (histogram buckets)",
    ),
    ("hubble_dns_queries_total", "Number of DNS queries observed"),
    (
        "hubble_dns_responses_total",
        "Number of DNS responses observed (refused queries included)",
    ),
    (
        "hubble_dns_response_types_total",
        "Number of DNS response types",
    ),
    (
        "hubble_kafka_requests_total",
        "Count of Kafka requests by topic (refused ones counted with the error code the client got)",
    ),
    (
        "hubble_kafka_request_duration_seconds_bucket",
        "Quantiles of Kafka request duration in seconds (histogram buckets)",
    ),
];

/// Upper bounds (seconds) of the HTTP duration histogram.
const DURATION_BUCKETS: [(&str, u64); 12] = [
    ("0.005", 5_000_000),
    ("0.01", 10_000_000),
    ("0.025", 25_000_000),
    ("0.05", 50_000_000),
    ("0.1", 100_000_000),
    ("0.25", 250_000_000),
    ("0.5", 500_000_000),
    ("1", 1_000_000_000),
    ("2.5", 2_500_000_000),
    ("5", 5_000_000_000),
    ("10", 10_000_000_000),
    ("+Inf", u64::MAX),
];

/// The `subtype` label: a trace's observation point, as Hubble writes it
/// ("" for other events: their point is left unset).
fn subtype(point: TraceObservationPoint) -> String {
    if point.is_unset() {
        return String::new();
    }
    point.as_str().to_lowercase().replace('_', "-")
}

/// The `type` label of an event type.
fn event_kind(event_type: i32) -> &'static str {
    match event_type {
        1 => "Drop",
        4 => "Trace",
        5 => "PolicyVerdict",
        129 => "L7",
        _ => "Unknown",
    }
}

fn protocol(f: &Flow) -> &'static str {
    match &f.l4 {
        Some(l4) if l4.tcp.is_some() => "TCP",
        Some(l4) if l4.udp.is_some() => "UDP",
        Some(l4) if l4.sctp.is_some() => "SCTP",
        Some(l4) if l4.icmpv4.is_some() => "ICMPv4",
        _ => "",
    }
}

fn match_name(m: u32) -> &'static str {
    match m {
        1 => "l3-only",
        2 => "l3-l4",
        3 => "l4-only",
        4 => "all",
        5 => "l3-proto",
        6 => "proto-only",
        _ => "none",
    }
}

/// A histogram's buckets as Prometheus wants them (each counts the
/// observations up to its bound) from per-bucket counts, in bound order.
fn cumulative_buckets(s: &Sorted, name: &str) -> Vec<(Vec<(&'static str, String)>, u64)> {
    let mut per_labels: BTreeMap<Vec<(&'static str, String)>, [u64; DURATION_BUCKETS.len()]> =
        BTreeMap::new();
    for ((n, labels), v) in s {
        if *n != name {
            continue;
        }
        let le = labels
            .iter()
            .find(|(k, _)| *k == "le")
            .map(|(_, v)| v.as_str());
        let Some(i) = DURATION_BUCKETS.iter().position(|(b, _)| Some(*b) == le) else {
            continue;
        };
        let rest: Vec<_> = labels.iter().filter(|(k, _)| *k != "le").cloned().collect();
        per_labels.entry(rest).or_default()[i] += v;
    }
    let mut out = Vec::new();
    for (rest, counts) in per_labels {
        let mut total = 0;
        for ((le, _), n) in DURATION_BUCKETS.iter().zip(counts) {
            total += n;
            let mut labels = vec![("le", le.to_string())];
            labels.extend(rest.iter().cloned());
            out.push((labels, total));
        }
    }
    out
}

/// Hubble's `httpV2` and `dns` handlers, from L7 flows.
fn observe_l7(s: &mut Series, f: &Flow) {
    let Some(l7) = &f.l7 else { return };
    // The proxy reports as the server for ingress rules, else the client.
    let reporter = if f.traffic_direction == TrafficDirection::INGRESS {
        "server"
    } else {
        "client"
    };
    if let Some(h) = &l7.http {
        // Formatted on the stack: this runs for every response.
        let mut digits = [0; 20];
        let status = match (l7.r#type, f.verdict) {
            (L7FlowType::RESPONSE, _) => crate::text::dec(&mut digits, h.code.into(), 1),
            (L7FlowType::REQUEST, Verdict::DROPPED) => "403",
            _ => return,
        };
        s.add(
            "hubble_http_requests_total",
            &[
                ("method", &h.method),
                ("protocol", &h.protocol),
                ("reporter", reporter),
                ("status", status),
            ],
            1,
        );
        if l7.r#type == L7FlowType::RESPONSE {
            // One count in the request's own bucket; render() makes the
            // buckets cumulative.
            let (le, _) = DURATION_BUCKETS
                .iter()
                .find(|(_, bound)| l7.latency_ns <= *bound)
                .unwrap_or(&DURATION_BUCKETS[DURATION_BUCKETS.len() - 1]);
            s.add(
                "hubble_http_request_duration_seconds_bucket",
                &[("le", le), ("method", &h.method), ("reporter", reporter)],
                1,
            );
            let l = [("method", &*h.method), ("reporter", reporter)];
            // The sum is kept in microseconds and rendered in seconds.
            s.add(
                "hubble_http_request_duration_seconds_sum",
                &l,
                l7.latency_ns / 1000,
            );
            s.add("hubble_http_request_duration_seconds_count", &l, 1);
        }
    }
    if let Some(k) = &l7.kafka {
        observe_kafka(s, l7, k, f.verdict, reporter);
    }
    if let Some(d) = &l7.dns {
        let qtypes = d.qtypes.join(",");
        let refused = l7.r#type == L7FlowType::REQUEST && f.verdict == Verdict::DROPPED;
        if l7.r#type == L7FlowType::REQUEST {
            s.add(
                "hubble_dns_queries_total",
                &[("ips_returned", "0"), ("qtypes", &qtypes), ("rcode", "")],
                1,
            );
        }
        if l7.r#type == L7FlowType::RESPONSE || refused {
            let rcode = if refused {
                "Refused"
            } else {
                crate::record::rcode_name(d.rcode)
            };
            s.add(
                "hubble_dns_responses_total",
                &[
                    ("ips_returned", &d.ips.len().to_string()),
                    ("qtypes", &qtypes),
                    ("rcode", rcode),
                ],
                1,
            );
            for t in &d.rrtypes {
                s.add(
                    "hubble_dns_response_types_total",
                    &[("qtypes", &qtypes), ("type", t)],
                    1,
                );
            }
        }
    }
}

/// Hubble's `kafka` handler: a request counted once it is answered (by
/// the broker, or refused by the proxy), labelled with the answer's error
/// code; the broker's answers also time the request.
fn observe_kafka(
    s: &mut Series,
    l7: &crate::record::Layer7,
    k: &crate::record::Kafka,
    verdict: Verdict,
    reporter: &str,
) {
    let answered = match (l7.r#type, verdict) {
        (L7FlowType::RESPONSE, _) => true,
        (L7FlowType::REQUEST, Verdict::DROPPED) => false,
        _ => return,
    };
    let error_code = k.error_code.to_string();
    s.add(
        "hubble_kafka_requests_total",
        &[
            ("api_key", &k.api_key),
            ("error_code", &error_code),
            ("reporter", reporter),
            ("topic", &k.topic),
        ],
        1,
    );
    if answered {
        let (le, _) = DURATION_BUCKETS
            .iter()
            .find(|(_, bound)| l7.latency_ns <= *bound)
            .unwrap_or(&DURATION_BUCKETS[DURATION_BUCKETS.len() - 1]);
        s.add(
            "hubble_kafka_request_duration_seconds_bucket",
            &[
                ("api_key", &k.api_key),
                ("le", le),
                ("reporter", reporter),
                ("topic", &k.topic),
            ],
            1,
        );
        let l = [
            ("api_key", &*k.api_key),
            ("reporter", reporter),
            ("topic", &*k.topic),
        ];
        s.add(
            "hubble_kafka_request_duration_seconds_sum",
            &l,
            l7.latency_ns / 1000,
        );
        s.add("hubble_kafka_request_duration_seconds_count", &l, 1);
    }
}

impl Series {
    /// Adds `n` to a series. Labels are borrowed: an existing series is
    /// found without allocating (this runs for every flow).
    fn add(&mut self, name: &'static str, labels: &[(&'static str, &str)], n: u64) {
        use std::hash::{BuildHasher, Hash, Hasher};
        let mut h = self.1.build_hasher();
        name.hash(&mut h);
        labels.hash(&mut h);
        let same = |(kn, kl): &Key| {
            *kn == name
                && kl.len() == labels.len()
                && kl
                    .iter()
                    .zip(labels)
                    .all(|((a, b), (c, d))| a == c && b == d)
        };
        let bucket = self.0.entry(h.finish()).or_default();
        match bucket.iter_mut().find(|(k, _)| same(k)) {
            Some((_, v)) => *v += n,
            None => bucket.push((
                (
                    name,
                    labels.iter().map(|(k, v)| (*k, v.to_string())).collect(),
                ),
                n,
            )),
        }
    }

    /// Every series, in name and label order (for rendering).
    fn sorted(&self) -> Sorted {
        self.0.values().flatten().cloned().collect()
    }
}

impl Counters {
    /// Counts one processed flow.
    pub fn observe(&self, f: &Flow) {
        let mut all = self.all.lock().unwrap_or_else(|e| e.into_inner());
        let all = &mut *all;
        let mut count = |c: Coded| *all.coded.entry(c).or_default() += 1;
        let ty = f.event_type.r#type;
        let point = if ty == 4 {
            f.trace_observation_point
        } else {
            TraceObservationPoint::default()
        };
        count(Coded::Processed(ty, point, f.verdict));
        if f.verdict == Verdict::DROPPED && f.l7.is_none() {
            count(Coded::Drop(protocol(f), f.drop_reason_desc));
        }
        // Policy decisions: the datapath's policy-verdict events (the first
        // packet of each connection an enforcing policy decided), as
        // Cilium's policy handler counts them.
        let decided = match f.verdict {
            _ if ty != 5 => None,
            Verdict::DROPPED => Some("dropped"),
            Verdict::AUDIT => Some("audit"),
            Verdict::FORWARDED => Some("forwarded"),
            _ => None,
        };
        if let Some(action) = decided {
            count(Coded::PolicyVerdict(
                action,
                f.traffic_direction,
                f.policy_match_type,
            ));
        }
        if let Some(flags) =
            f.l4.as_ref()
                .and_then(|l| l.tcp.as_ref())
                .and_then(|t| t.flags.as_ref())
        {
            let family = f.ip.as_ref().map_or("", |i| i.ip_version.as_str());
            for (set, flag) in [
                (flags.syn, "SYN"),
                (flags.ack, "ACK"),
                (flags.fin, "FIN"),
                (flags.rst, "RST"),
                (flags.psh, "PSH"),
                (flags.urg, "URG"),
            ] {
                // Hubble counts SYN-ACK as its own flag value.
                let name = if flag == "SYN" && flags.ack {
                    "SYN-ACK"
                } else {
                    flag
                };
                if set && !(flag == "ACK" && flags.syn) {
                    count(Coded::TcpFlag(family, name));
                }
            }
        }
        observe_l7(&mut all.series, f);
    }

    /// Counts events lost at `source` (a `flow.LostEventSource` name).
    pub fn lost(&self, source: &str, n: u64) {
        let mut all = self.all.lock().unwrap_or_else(|e| e.into_inner());
        all.series
            .add("hubble_lost_events_total", &[("source", source)], n);
    }

    /// Prometheus text exposition; `extra` lost counts (e.g. the kernel's,
    /// read at render time) are added to the lost-events series.
    pub fn render(&self, extra_lost: &[(&str, u64)]) -> String {
        let mut s = {
            let all = self.all.lock().unwrap_or_else(|e| e.into_inner());
            let mut s = all.series.sorted();
            for (c, n) in &all.coded {
                *s.entry(c.key()).or_default() += n;
            }
            s
        };
        for (source, n) in extra_lost {
            *s.entry((
                "hubble_lost_events_total",
                vec![("source", source.to_string())],
            ))
            .or_default() += n;
        }
        let mut out = String::new();
        for (name, help) in HELP {
            let (family, kind) = match name.strip_suffix("_bucket") {
                Some(base) => (base, "histogram"),
                None => (name, "counter"),
            };
            out.push_str(&format!("# HELP {family} {help}\n# TYPE {family} {kind}\n"));
            let rows: Vec<(Vec<(&str, String)>, u64)> = if kind == "histogram" {
                cumulative_buckets(&s, name)
            } else {
                s.iter()
                    .filter(|((n, _), _)| *n == name)
                    .map(|((_, l), v)| (l.clone(), *v))
                    .collect()
            };
            for (labels, v) in &rows {
                let l: Vec<String> = labels
                    .iter()
                    .map(|(k, v)| {
                        format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))
                    })
                    .collect();
                out.push_str(&format!("{name}{{{}}} {v}\n", l.join(",")));
            }
            if kind == "histogram" {
                for suffix in ["_sum", "_count"] {
                    let series = format!("{family}{suffix}");
                    for ((n, labels), v) in &s {
                        if *n != series {
                            continue;
                        }
                        let l: Vec<String> =
                            labels.iter().map(|(k, v)| format!("{k}=\"{v}\"")).collect();
                        let value = if suffix == "_sum" {
                            format!("{}", *v as f64 / 1e6)
                        } else {
                            v.to_string()
                        };
                        out.push_str(&format!("{series}{{{}}} {value}\n", l.join(",")));
                    }
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(json: &str) -> Flow {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn counts_flows_drops_verdicts_and_flags() {
        let c = Counters::default();
        c.observe(&flow(r#"{"time":"","uuid":"","verdict":"FORWARDED","IP":{"source":"a","destination":"b","ipVersion":"IPv4"},"l4":{"TCP":{"source_port":1,"destination_port":80,"flags":{"SYN":true}}},"Type":"L3_L4","event_type":{"type":4},"trace_observation_point":"TO_ENDPOINT","trace_reason":"NEW","traffic_direction":"INGRESS","policy_match_type":2,"Summary":""}"#));
        c.observe(&flow(r#"{"time":"","uuid":"","verdict":"DROPPED","IP":{"source":"a","destination":"b","ipVersion":"IPv4"},"l4":{"TCP":{"source_port":1,"destination_port":80,"flags":{"SYN":true,"ACK":true}}},"Type":"L3_L4","event_type":{"type":1,"sub_type":133},"drop_reason_desc":"POLICY_DENIED","traffic_direction":"INGRESS","Summary":""}"#));
        // The policy-verdict events of those two connections.
        c.observe(&flow(r#"{"time":"","uuid":"","verdict":"FORWARDED","Type":"L3_L4","event_type":{"type":5},"traffic_direction":"INGRESS","policy_match_type":2,"Summary":""}"#));
        c.observe(&flow(r#"{"time":"","uuid":"","verdict":"DROPPED","Type":"L3_L4","event_type":{"type":5},"drop_reason_desc":"POLICY_DENIED","traffic_direction":"INGRESS","Summary":""}"#));
        c.lost("HUBBLE_RING_BUFFER", 3);
        let text = c.render(&[("PERF_EVENT_RING_BUFFER", 2)]);
        for line in [
            r#"hubble_flows_processed_total{subtype="to-endpoint",type="Trace",verdict="FORWARDED"} 1"#,
            r#"hubble_flows_processed_total{subtype="",type="Drop",verdict="DROPPED"} 1"#,
            r#"hubble_drop_total{protocol="TCP",reason="POLICY_DENIED"} 1"#,
            r#"hubble_policy_verdicts_total{action="forwarded",direction="ingress",match="l3-l4"} 1"#,
            r#"hubble_policy_verdicts_total{action="dropped",direction="ingress",match="none"} 1"#,
            r#"hubble_tcp_flags_total{family="IPv4",flag="SYN"} 1"#,
            r#"hubble_tcp_flags_total{family="IPv4",flag="SYN-ACK"} 1"#,
            r#"hubble_lost_events_total{source="HUBBLE_RING_BUFFER"} 3"#,
            r#"hubble_lost_events_total{source="PERF_EVENT_RING_BUFFER"} 2"#,
            "# TYPE hubble_drop_total counter",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
    }

    #[test]
    fn http_duration_buckets_are_cumulative() {
        let c = Counters::default();
        for latency_ns in [1_000_000u64, 7_000_000, 3_000_000_000] {
            c.observe(&flow(&format!(
                r#"{{"time":"","uuid":"","verdict":"FORWARDED","Type":"L7","event_type":{{"type":129}},"traffic_direction":"INGRESS","l7":{{"type":"RESPONSE","latency_ns":{latency_ns},"http":{{"code":200,"method":"GET","url":"/","protocol":"HTTP/1.1"}}}},"Summary":""}}"#
            )));
        }
        let text = c.render(&[]);
        let bucket = |le: &str| {
            format!(
                r#"hubble_http_request_duration_seconds_bucket{{le="{le}",method="GET",reporter="server"}}"#
            )
        };
        for (le, n) in [("0.005", 1), ("0.01", 2), ("2.5", 2), ("5", 3), ("+Inf", 3)] {
            let line = format!("{} {n}", bucket(le));
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
        assert_eq!(
            text.lines()
                .filter(|l| l.starts_with("hubble_http_request_duration_seconds_bucket"))
                .count(),
            12
        );
        assert!(text.lines().any(|l| l
            == r#"hubble_http_request_duration_seconds_count{method="GET",reporter="server"} 3"#));
    }

    #[test]
    fn kafka_requests_are_counted_when_answered_or_refused() {
        let c = Counters::default();
        let kafka = |verdict: &str, ty: &str, error_code: i32| {
            flow(&format!(
                r#"{{"time":"","uuid":"","verdict":"{verdict}","Type":"L7","event_type":{{"type":129}},"traffic_direction":"INGRESS","l7":{{"type":"{ty}","latency_ns":2000000,"kafka":{{"error_code":{error_code},"api_version":9,"api_key":"produce","correlation_id":3,"topic":"empire-announce"}}}},"Summary":""}}"#
            ))
        };
        // A forwarded request counts when its answer comes; a refused one
        // at once, with the code the client got.
        c.observe(&kafka("FORWARDED", "REQUEST", 0));
        c.observe(&kafka("FORWARDED", "RESPONSE", 0));
        c.observe(&kafka("DROPPED", "REQUEST", 29));
        let text = c.render(&[]);
        for line in [
            r#"hubble_kafka_requests_total{api_key="produce",error_code="0",reporter="server",topic="empire-announce"} 1"#,
            r#"hubble_kafka_requests_total{api_key="produce",error_code="29",reporter="server",topic="empire-announce"} 1"#,
            r#"hubble_kafka_request_duration_seconds_bucket{le="0.005",api_key="produce",reporter="server",topic="empire-announce"} 1"#,
            r#"hubble_kafka_request_duration_seconds_count{api_key="produce",reporter="server",topic="empire-announce"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line}\n{text}");
        }
        assert!(text.contains("# TYPE hubble_kafka_request_duration_seconds histogram"));
    }
}
