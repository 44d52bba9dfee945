//! Hubble's flow metrics (`hubble_*`, semantics §4.8), counted as flows are
//! processed and rendered in the Prometheus text format.

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::Flow;

/// (metric name, sorted label pairs) -> count.
type Series = BTreeMap<(&'static str, Vec<(&'static str, String)>), u64>;

#[derive(Default)]
pub struct Counters {
    series: Mutex<Series>,
}

const HELP: [(&str, &str); 5] = [
    (
        "hubble_flows_processed_total",
        "Total number of flows processed",
    ),
    ("hubble_drop_total", "Number of drops"),
    ("hubble_policy_verdicts_total", "Number of policy verdicts"),
    ("hubble_tcp_flags_total", "TCP flag occurrences"),
    ("hubble_lost_events_total", "Number of lost events"),
];

fn subtype(f: &Flow) -> String {
    match f.event_type.r#type {
        4 => f.trace_observation_point.to_lowercase().replace('_', "-"),
        _ => String::new(),
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

impl Counters {
    fn add(&self, s: &mut Series, name: &'static str, labels: Vec<(&'static str, String)>, n: u64) {
        let _ = self;
        *s.entry((name, labels)).or_default() += n;
    }

    /// Counts one processed flow.
    pub fn observe(&self, f: &Flow) {
        let mut s = self.series.lock().unwrap_or_else(|e| e.into_inner());
        let kind = match f.event_type.r#type {
            1 => "Drop",
            4 => "Trace",
            5 => "PolicyVerdict",
            129 => "L7",
            _ => "Unknown",
        };
        self.add(
            &mut s,
            "hubble_flows_processed_total",
            vec![
                ("subtype", subtype(f)),
                ("type", kind.into()),
                ("verdict", f.verdict.clone()),
            ],
            1,
        );
        if f.verdict == "DROPPED" {
            self.add(
                &mut s,
                "hubble_drop_total",
                vec![
                    ("protocol", protocol(f).into()),
                    ("reason", f.drop_reason_desc.clone()),
                ],
                1,
            );
        }
        // A policy decision: a new connection's first trace, a policy drop,
        // or an audit.
        let decided = match f.verdict.as_str() {
            "DROPPED" => Some("dropped").filter(|_| f.drop_reason_desc.starts_with("POLICY_DEN")),
            "AUDIT" => Some("audit"),
            "FORWARDED" if f.trace_reason == "NEW" && f.policy_match_type > 0 => Some("forwarded"),
            _ => None,
        };
        if let Some(action) = decided {
            self.add(
                &mut s,
                "hubble_policy_verdicts_total",
                vec![
                    ("action", action.into()),
                    ("direction", f.traffic_direction.to_lowercase()),
                    ("match", match_name(f.policy_match_type).into()),
                ],
                1,
            );
        }
        if let Some(flags) =
            f.l4.as_ref()
                .and_then(|l| l.tcp.as_ref())
                .and_then(|t| t.flags.as_ref())
        {
            let family =
                f.ip.as_ref()
                    .map_or("", |i| i.ip_version.as_str())
                    .to_string();
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
                    self.add(
                        &mut s,
                        "hubble_tcp_flags_total",
                        vec![("family", family.clone()), ("flag", name.into())],
                        1,
                    );
                }
            }
        }
    }

    /// Counts events lost at `source` (a `flow.LostEventSource` name).
    pub fn lost(&self, source: &str, n: u64) {
        let mut s = self.series.lock().unwrap_or_else(|e| e.into_inner());
        self.add(
            &mut s,
            "hubble_lost_events_total",
            vec![("source", source.to_string())],
            n,
        );
    }

    /// Prometheus text exposition; `extra` lost counts (e.g. the kernel's,
    /// read at render time) are added to the lost-events series.
    pub fn render(&self, extra_lost: &[(&str, u64)]) -> String {
        let mut s = self
            .series
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        for (source, n) in extra_lost {
            *s.entry((
                "hubble_lost_events_total",
                vec![("source", source.to_string())],
            ))
            .or_default() += n;
        }
        let mut out = String::new();
        for (name, help) in HELP {
            out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} counter\n"));
            for ((n, labels), v) in &s {
                if *n != name {
                    continue;
                }
                let l: Vec<String> = labels
                    .iter()
                    .map(|(k, v)| {
                        format!("{k}=\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))
                    })
                    .collect();
                out.push_str(&format!("{name}{{{}}} {v}\n", l.join(",")));
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
}
