//! Hubble CLI text formats (compact), from `spec/hubble-api.md` §8.

use crate::enums::Verdict;
use crate::record::{drop_reason_text, Endpoint, Flow};

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// The hubble CLI's `--time-format` layouts (Go's names); times are UTC.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TimeFormat {
    /// `Jan _2 15:04:05.000`
    #[default]
    StampMilli,
    /// `2006-01-02`
    YearMonthDay,
    /// `2006-01-02T15Z07:00` (UTC: `Z`)
    YearMonthDayHour,
    /// `2006-01-02T15:04Z07:00`
    YearMonthDayHourMinute,
    /// `2006-01-02T15:04:05Z`
    Rfc3339,
    /// `2006-01-02T15:04:05.000Z`
    Rfc3339Milli,
    /// `2006-01-02T15:04:05.000000Z`
    Rfc3339Micro,
    /// `2006-01-02T15:04:05.999999999Z`: trailing zeros trimmed, as Go does.
    Rfc3339Nano,
    /// `Mon, 02 Jan 2006 15:04:05 +0000`
    Rfc1123Z,
}

impl TimeFormat {
    /// The CLI's names for the layouts.
    pub const NAMES: [(&'static str, TimeFormat); 9] = [
        ("StampMilli", TimeFormat::StampMilli),
        ("YearMonthDay", TimeFormat::YearMonthDay),
        ("YearMonthDayHour", TimeFormat::YearMonthDayHour),
        ("YearMonthDayHourMinute", TimeFormat::YearMonthDayHourMinute),
        ("RFC3339", TimeFormat::Rfc3339),
        ("RFC3339Milli", TimeFormat::Rfc3339Milli),
        ("RFC3339Micro", TimeFormat::Rfc3339Micro),
        ("RFC3339Nano", TimeFormat::Rfc3339Nano),
        ("RFC1123Z", TimeFormat::Rfc1123Z),
    ];

    /// By the CLI's name (`RFC3339Milli`, in any case); `None` for anything else.
    pub fn by_name(name: &str) -> Option<Self> {
        Self::NAMES
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, f)| *f)
    }

    /// Formats an RFC 3339 UTC time; `N/A` when unparsable.
    pub fn format(self, rfc3339: &str) -> String {
        let parse = || -> Option<String> {
            let (date, rest) = rfc3339.split_once('T')?;
            let mut d = date.split('-');
            let (y, m, day) = (
                d.next()?.parse::<i64>().ok()?,
                d.next()?.parse::<usize>().ok()?,
                d.next()?.parse::<u32>().ok()?,
            );
            let month = MONTHS.get(m.checked_sub(1)?)?;
            let hms = rest.get(0..8)?;
            let frac: String = rest
                .get(9..)
                .unwrap_or("")
                .chars()
                .take_while(|c| c.is_ascii_digit())
                .collect();
            let frac = format!("{frac:0<9}");
            let date = format!("{y:04}-{m:02}-{day:02}");
            Some(match self {
                TimeFormat::StampMilli => format!("{month} {day:>2} {hms}.{}", &frac[..3]),
                TimeFormat::YearMonthDay => date,
                TimeFormat::YearMonthDayHour => format!("{date}T{}Z", &hms[..2]),
                TimeFormat::YearMonthDayHourMinute => format!("{date}T{}Z", &hms[..5]),
                TimeFormat::Rfc3339 => format!("{date}T{hms}Z"),
                // Go's `.999` layouts: trailing zeros (and a bare dot) dropped.
                TimeFormat::Rfc3339Milli | TimeFormat::Rfc3339Micro | TimeFormat::Rfc3339Nano => {
                    let digits = match self {
                        TimeFormat::Rfc3339Milli => 3,
                        TimeFormat::Rfc3339Micro => 6,
                        _ => 9,
                    };
                    match frac[..digits].trim_end_matches('0') {
                        "" => format!("{date}T{hms}Z"),
                        f => format!("{date}T{hms}.{f}Z"),
                    }
                }
                TimeFormat::Rfc1123Z => format!(
                    "{}, {day:02} {month} {y:04} {hms} +0000",
                    weekday(y, m as i64, day as i64)
                ),
            })
        };
        parse().unwrap_or_else(|| "N/A".into())
    }
}

/// A `GetFlowsResponse` as `hubble observe -o json` (and `-o jsonpb`)
/// prints it, one per line: what hubble-audit2policy and `--input-file`
/// read back.
#[derive(serde::Serialize)]
pub struct JsonLine<'a> {
    pub flow: &'a Flow,
    pub node_name: &'a str,
    pub time: &'a crate::record::Time,
}

/// How flows are printed: `--time-format`, `--color`, `--ip-translation`
/// (`--numeric`), `--print-policy-names`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Style {
    pub time: TimeFormat,
    /// ANSI colours as the hubble CLI's: hosts cyan, ports yellow,
    /// identities magenta, verdicts green (forwarded), red (dropped) or
    /// yellow (audit, traced, translated). The table is never coloured: its
    /// columns are aligned by width.
    pub color: bool,
    /// Ends named as pods (`ns/pod`) or by their DNS names
    /// (`source_names`/`destination_names`, what the DNS proxy learned)
    /// rather than by address.
    pub ip_translation: bool,
    /// The verdict followed by ` BY name (Kind), ...`: the policies that
    /// allowed or denied the flow.
    pub policy_names: bool,
}

impl Default for Style {
    fn default() -> Self {
        Style {
            time: TimeFormat::default(),
            color: false,
            ip_translation: true,
            policy_names: false,
        }
    }
}

fn paint(on: bool, code: u8, text: &str) -> String {
    if on {
        format!("\x1b[{code}m{text}\x1b[0m")
    } else {
        text.to_string()
    }
}

fn paint_verdict(on: bool, verdict: &str) -> String {
    let code = match verdict {
        "FORWARDED" | "ALLOWED" => 32,
        "DROPPED" | "DENIED" | "ERROR" => 31,
        _ => 33,
    };
    paint(on, code, verdict)
}

/// The English weekday of a Gregorian date (Sakamoto's method).
fn weekday(y: i64, m: i64, d: i64) -> &'static str {
    const OFFSET: [i64; 12] = [0, 3, 2, 5, 0, 3, 5, 1, 4, 6, 2, 4];
    const DAYS: [&str; 7] = ["Sun", "Mon", "Tue", "Wed", "Thu", "Fri", "Sat"];
    let y = if m < 3 { y - 1 } else { y };
    let i = (y + y / 4 - y / 100 + y / 400 + OFFSET[(m - 1) as usize] + d).rem_euclid(7);
    DAYS[i as usize]
}

/// `Jan _2 15:04:05.000` from an RFC 3339 time; `N/A` when unparsable.
pub fn compact_time(rfc3339: &str) -> String {
    TimeFormat::StampMilli.format(rfc3339)
}

fn identity(ep: &Endpoint, color: bool) -> String {
    let text = match abi::identity::reserved_name(ep.identity) {
        Some(n) => format!("({n})"),
        None => format!("(ID:{})", ep.identity),
    };
    paint(color, 35, &text)
}

/// One end as hubble names it: `ns/pod`, else its DNS names, else its
/// address (only the address without IP translation); `:port` when there
/// is one (an IPv6 address in brackets); MAC addresses for a flow with no
/// IP layer.
fn host(f: &Flow, source: bool, port: u16, style: Style) -> String {
    let (ep, names) = if source {
        (&f.source, &f.source_names)
    } else {
        (&f.destination, &f.destination_names)
    };
    let ip = match (&f.ip, &f.ethernet) {
        (Some(ip), _) => {
            if source {
                ip.source.as_str()
            } else {
                ip.destination.as_str()
            }
        }
        (None, Some(eth)) => {
            let mac = if source {
                &eth.source
            } else {
                &eth.destination
            };
            return paint(style.color, 36, mac);
        }
        (None, None) => "",
    };
    let h = if style.ip_translation && !ep.pod_name.is_empty() {
        format!("{}/{}", ep.namespace, ep.pod_name)
    } else if style.ip_translation && !names.is_empty() {
        names.join(",")
    } else if port != 0 && ip.contains(':') {
        format!("[{ip}]")
    } else {
        ip.to_string()
    };
    let h = paint(style.color, 36, &h);
    if port != 0 {
        format!("{h}:{}", paint(style.color, 33, &port.to_string()))
    } else {
        h
    }
}

/// ` BY name (Kind), ...` for `--print-policy-names`: the policies that
/// denied a dropped flow, else those that allowed it.
fn policy_names(f: &Flow) -> String {
    let dropped = matches!(f.verdict, Verdict::DROPPED | Verdict::ERROR);
    let refs: Vec<&crate::record::SharedPolicyRef> = if dropped {
        f.egress_denied_by
            .iter()
            .chain(&f.ingress_denied_by)
            .collect()
    } else {
        f.egress_allowed_by
            .iter()
            .chain(&f.ingress_allowed_by)
            .collect()
    };
    if refs.is_empty() {
        return String::new();
    }
    let names: Vec<String> = refs
        .iter()
        .map(|p| {
            let name = if p.namespace.is_empty() {
                p.name.clone()
            } else {
                format!("{}/{}", p.namespace, p.name)
            };
            format!("{name} ({})", p.kind)
        })
        .collect();
    format!(" BY {}", names.join(", "))
}

fn ports(f: &Flow) -> (u16, u16) {
    match &f.l4 {
        Some(l4) => {
            if let Some(t) = &l4.tcp {
                (t.source_port, t.destination_port)
            } else if let Some(u) = l4.udp.as_ref().or(l4.sctp.as_ref()) {
                (u.source_port, u.destination_port)
            } else {
                (0, 0)
            }
        }
        None => (0, 0),
    }
}

fn type_text(f: &Flow) -> String {
    match f.event_type.r#type {
        4 => match f.trace_observation_point {
            p if p.is_unset() => "UNKNOWN".into(),
            p => p.to_string().to_lowercase().replace('_', "-"),
        },
        1 => drop_reason_text(f.drop_reason_desc).into(),
        5 => {
            let m = match f.policy_match_type {
                1 => "L3-Only",
                2 => "L3-L4",
                3 => "L4-Only",
                4 => "all",
                5 => "L3-Proto",
                6 => "Proto-Only",
                _ => "none",
            };
            format!("policy-verdict:{m} {}", f.traffic_direction)
        }
        7 => match f.sock_xlate_point.0 {
            1 => "pre-xlate-fwd".into(),
            2 => "post-xlate-fwd".into(),
            3 => "pre-xlate-rev".into(),
            4 => "post-xlate-rev".into(),
            _ => f.sock_xlate_point.to_string(),
        },
        crate::record::EVENT_TYPE_ACCESS_LOG => match &f.l7 {
            Some(l7) => {
                let proto = match (&l7.http, &l7.dns, &l7.kafka) {
                    (Some(_), _, _) => "http",
                    (None, Some(_), _) => "dns",
                    (None, None, Some(_)) => "kafka",
                    _ => "l7",
                };
                let mut t = format!("{proto}-{}", l7.r#type.as_str().to_lowercase());
                if let Some(d) = l7.dns.as_ref().filter(|d| !d.observation_source.is_empty()) {
                    t = format!("{t} {}", d.observation_source);
                }
                t
            }
            None => "UNKNOWN".into(),
        },
        _ => "UNKNOWN".into(),
    }
}

/// One line per flow, as `hubble observe` prints by default.
/// `compact` with the node name after the time (`--print-node-name`).
pub fn compact_with_node(f: &Flow, style: Style) -> String {
    let line = compact(f, style);
    match line.split_once(": ") {
        Some((t, rest)) => format!("{t} [{}]: {rest}", f.node_name),
        None => line,
    }
}

/// `dict`: one block per flow; replies are not swapped and there are no
/// identities.
pub fn dict(f: &Flow, print_node: bool, style: Style) -> String {
    let (sport, dport) = ports(f);
    let mut out = format!("  TIMESTAMP: {}\n", style.time.format(&f.time.to_string()));
    if print_node {
        out.push_str(&format!("       NODE: {}\n", f.node_name));
    }
    out.push_str(&format!("     SOURCE: {}\n", host(f, true, sport, style)));
    out.push_str(&format!("DESTINATION: {}\n", host(f, false, dport, style)));
    out.push_str(&format!("       TYPE: {}\n", type_text(f)));
    out.push_str(&format!("    VERDICT: {}\n", verdict_text(f, style)));
    out.push_str(&format!("    SUMMARY: {}", f.summary));
    out
}

/// The verdict as printed: policy-verdict events speak of decisions
/// (ALLOWED, DENIED, AUDITED), with the policies' names when asked.
fn verdict_text(f: &Flow, style: Style) -> String {
    let verdict = match (f.event_type.r#type, f.verdict) {
        (5, Verdict::FORWARDED | Verdict::REDIRECTED) => "ALLOWED",
        (5, Verdict::DROPPED | Verdict::ERROR) => "DENIED",
        (5, Verdict::AUDIT) => "AUDITED",
        (_, v) => v.as_str(),
    };
    let mut text = paint_verdict(style.color, verdict);
    if style.policy_names {
        text.push_str(&policy_names(f));
    }
    text
}

/// `table`: aligned columns (tabwriter: min width 2, padding 3), printed
/// at the end.
pub fn table(flows: &[Flow], print_node: bool, style: Style) -> String {
    let style = Style {
        color: false,
        ..style
    };
    let mut rows: Vec<Vec<String>> = vec![];
    let mut header = vec!["TIMESTAMP"];
    if print_node {
        header.push("NODE");
    }
    header.extend(["SOURCE", "DESTINATION", "TYPE", "VERDICT", "SUMMARY"]);
    rows.push(header.into_iter().map(String::from).collect());
    for f in flows {
        let (sport, dport) = ports(f);
        let mut r = vec![style.time.format(&f.time.to_string())];
        if print_node {
            r.push(f.node_name.to_string());
        }
        r.extend([
            host(f, true, sport, style),
            host(f, false, dport, style),
            type_text(f),
            verdict_text(f, style),
            f.summary.to_string(),
        ]);
        rows.push(r);
    }
    let cols = rows[0].len();
    let widths: Vec<usize> = (0..cols - 1)
        .map(|c| {
            rows.iter()
                .map(|r| r[c].chars().count())
                .max()
                .unwrap_or(0)
                .max(2)
                + 3
        })
        .collect();
    rows.iter()
        .map(|r| {
            let mut line = String::new();
            for (c, cell) in r.iter().enumerate() {
                if c + 1 < cols {
                    line.push_str(&format!("{cell:<w$}", w = widths[c]));
                } else {
                    line.push_str(cell);
                }
            }
            line
        })
        .collect::<Vec<_>>()
        .join("\n")
}

pub fn compact(f: &Flow, style: Style) -> String {
    let (sport, dport) = ports(f);
    let c = style.color;
    let mut src = format!("{} {}", host(f, true, sport, style), identity(&f.source, c));
    let mut dst = format!(
        "{} {}",
        host(f, false, dport, style),
        identity(&f.destination, c)
    );
    let arrow = match f.is_reply {
        Some(true) => {
            std::mem::swap(&mut src, &mut dst);
            "<-"
        }
        Some(false) => "->",
        None => "<>",
    };
    format!(
        "{}: {src} {arrow} {dst} {} {} ({})",
        style.time.format(&f.time.to_string()),
        type_text(f),
        verdict_text(f, style),
        f.summary
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The HTTP request and response of `spec/hubble-samples/observe-o-json.jsonl`,
    /// printed as the real CLI printed them (`cli-observe-outputs.txt`).
    #[test]
    fn l7_http_flows_print_as_the_cli_does() {
        let req = r#"{"time":"2026-01-15T10:00:01Z","uuid":"a","verdict":"FORWARDED","IP":{"source":"10.0.1.10","destination":"10.0.2.20","ipVersion":"IPv4"},"l4":{"TCP":{"source_port":43210,"destination_port":80}},"source":{"identity":12345,"namespace":"default","labels":["k8s:app=xwing"],"pod_name":"xwing-7d9f8b6c5-abcde"},"destination":{"identity":23456,"namespace":"default","labels":["k8s:app=deathstar"],"pod_name":"deathstar-6c94dcc57b-xyz12"},"Type":"L7","node_name":"kind-worker","l7":{"type":"REQUEST","http":{"method":"POST","url":"http://deathstar.default.svc.cluster.local/v1/request-landing","protocol":"HTTP/1.1","headers":[{"key":"User-Agent","value":"curl/8.0"}]}},"event_type":{"type":129},"traffic_direction":"INGRESS","is_reply":false,"Summary":"HTTP/1.1 POST http://deathstar.default.svc.cluster.local/v1/request-landing"}"#;
        let resp = r#"{"time":"2026-01-15T10:00:01.002Z","uuid":"b","verdict":"FORWARDED","IP":{"source":"10.0.2.20","destination":"10.0.1.10","ipVersion":"IPv4"},"l4":{"TCP":{"source_port":80,"destination_port":43210}},"source":{"identity":23456,"namespace":"default","labels":["k8s:app=deathstar"],"pod_name":"deathstar-6c94dcc57b-xyz12"},"destination":{"identity":12345,"namespace":"default","labels":["k8s:app=xwing"],"pod_name":"xwing-7d9f8b6c5-abcde"},"Type":"L7","node_name":"kind-worker","l7":{"type":"RESPONSE","latency_ns":"2000000","http":{"code":200,"method":"POST","url":"http://deathstar.default.svc.cluster.local/v1/request-landing","protocol":"HTTP/1.1"}},"event_type":{"type":129},"traffic_direction":"INGRESS","is_reply":true,"Summary":"HTTP/1.1 200 2ms (POST http://deathstar.default.svc.cluster.local/v1/request-landing)"}"#;
        let req: Flow = serde_json::from_str(req).unwrap();
        let resp: Flow = serde_json::from_str(resp).unwrap();
        assert_eq!(
            compact(&req, Style::default()),
            "Jan 15 10:00:01.000: default/xwing-7d9f8b6c5-abcde:43210 (ID:12345) -> default/deathstar-6c94dcc57b-xyz12:80 (ID:23456) http-request FORWARDED (HTTP/1.1 POST http://deathstar.default.svc.cluster.local/v1/request-landing)"
        );
        assert_eq!(
            compact(&resp, Style::default()),
            "Jan 15 10:00:01.002: default/xwing-7d9f8b6c5-abcde:43210 (ID:12345) <- default/deathstar-6c94dcc57b-xyz12:80 (ID:23456) http-response FORWARDED (HTTP/1.1 200 2ms (POST http://deathstar.default.svc.cluster.local/v1/request-landing))"
        );
        // The summary the proxy writes is the one the CLI printed.
        let http = resp.l7.as_ref().unwrap().http.as_ref().unwrap();
        assert_eq!(http.summary(Some(2_000_000)), resp.summary);
        assert_eq!(
            req.l7
                .as_ref()
                .unwrap()
                .http
                .as_ref()
                .unwrap()
                .summary(None),
            req.summary
        );
        // And it serializes back with the same keys in the same order.
        let again = serde_json::to_string(&resp).unwrap();
        assert!(again.contains(r#""node_name":"kind-worker","l7":{"type":"RESPONSE","latency_ns":"2000000","http":{"code":200,"method":"POST""#), "{again}");
    }

    /// The first flow of `spec/hubble-samples/flows-input.jsonl`, printed as
    /// the real CLI printed it.
    #[test]
    fn compact_matches_the_real_cli() {
        let json = r#"{"time":"2026-01-15T10:00:00.123456789Z","uuid":"u","verdict":"FORWARDED","IP":{"source":"10.0.1.10","destination":"10.0.2.20","ipVersion":"IPv4"},"l4":{"TCP":{"source_port":43210,"destination_port":80,"flags":{"SYN":true}}},"source":{"ID":1001,"identity":12345,"namespace":"default","labels":["k8s:app=xwing"],"pod_name":"xwing-7d9f8b6c5-abcde"},"destination":{"ID":1002,"identity":23456,"namespace":"default","labels":["k8s:app=deathstar"],"pod_name":"deathstar-6c94dcc57b-xyz12"},"Type":"L3_L4","event_type":{"type":4},"traffic_direction":"EGRESS","trace_observation_point":"TO_ENDPOINT","is_reply":false,"Summary":"TCP Flags: SYN"}"#;
        let f: Flow = serde_json::from_str(json).unwrap();
        assert_eq!(
            compact(&f, Style::default()),
            "Jan 15 10:00:00.123: default/xwing-7d9f8b6c5-abcde:43210 (ID:12345) -> default/deathstar-6c94dcc57b-xyz12:80 (ID:23456) to-endpoint FORWARDED (TCP Flags: SYN)"
        );
        let mut reply = f.clone();
        reply.is_reply = Some(true);
        assert!(compact(&reply, Style::default()).contains("(ID:23456) <- default/xwing"));
        let mut drop = f;
        drop.event_type.r#type = 1;
        drop.verdict = crate::enums::Verdict::DROPPED;
        drop.drop_reason_desc = crate::enums::DropReason::POLICY_DENIED;
        drop.is_reply = None;
        assert!(
            compact(&drop, Style::default()).contains(" <> "),
            "is_reply unset prints <>"
        );
        assert!(
            compact(&drop, Style::default()).ends_with("Policy denied DROPPED (TCP Flags: SYN)")
        );
        assert_eq!(
            dict(&f_dict(), false, Style::default()),
            "  TIMESTAMP: Jan 15 10:00:00.123\n     SOURCE: default/xwing-7d9f8b6c5-abcde:43210\nDESTINATION: default/deathstar-6c94dcc57b-xyz12:80\n       TYPE: to-endpoint\n    VERDICT: FORWARDED\n    SUMMARY: TCP Flags: SYN"
        );
        let t = table(&[f_dict()], false, Style::default());
        let lines: Vec<&str> = t.lines().collect();
        assert!(lines[0].starts_with("TIMESTAMP             SOURCE"), "{t}");
        assert!(
            lines[1].ends_with("to-endpoint   FORWARDED   TCP Flags: SYN"),
            "{t}"
        );
    }

    fn f_dict() -> Flow {
        serde_json::from_str(r#"{"time":"2026-01-15T10:00:00.123456789Z","uuid":"u","verdict":"FORWARDED","IP":{"source":"10.0.1.10","destination":"10.0.2.20","ipVersion":"IPv4"},"l4":{"TCP":{"source_port":43210,"destination_port":80,"flags":{"SYN":true}}},"source":{"identity":12345,"namespace":"default","pod_name":"xwing-7d9f8b6c5-abcde"},"destination":{"identity":23456,"namespace":"default","pod_name":"deathstar-6c94dcc57b-xyz12"},"Type":"L3_L4","event_type":{"type":4},"trace_observation_point":"TO_ENDPOINT","is_reply":false,"Summary":"TCP Flags: SYN"}"#).unwrap()
    }

    #[test]
    fn bad_time_prints_na() {
        assert_eq!(compact_time("garbage"), "N/A");
        assert_eq!(TimeFormat::Rfc3339Nano.format("garbage"), "N/A");
        assert_eq!(compact_time("2026-03-08T02:04:05Z"), "Mar  8 02:04:05.000");
    }

    #[test]
    fn time_formats_match_go_layouts() {
        let t = "2026-01-15T10:00:00.123400000Z";
        let f = |name| TimeFormat::by_name(name).unwrap().format(t);
        assert_eq!(f("StampMilli"), "Jan 15 10:00:00.123");
        assert_eq!(f("RFC3339"), "2026-01-15T10:00:00Z");
        assert_eq!(f("RFC3339Milli"), "2026-01-15T10:00:00.123Z");
        // Go's `.999999`: trailing zeros dropped.
        assert_eq!(f("RFC3339Micro"), "2026-01-15T10:00:00.1234Z");
        assert_eq!(
            TimeFormat::Rfc3339Milli.format("2026-01-15T10:00:00Z"),
            "2026-01-15T10:00:00Z"
        );
        assert_eq!(f("RFC3339Nano"), "2026-01-15T10:00:00.1234Z");
        assert_eq!(f("RFC1123Z"), "Thu, 15 Jan 2026 10:00:00 +0000");
        assert_eq!(f("YearMonthDay"), "2026-01-15");
        assert_eq!(f("YearMonthDayHour"), "2026-01-15T10Z");
        assert_eq!(f("YearMonthDayHourMinute"), "2026-01-15T10:00Z");
        let whole = TimeFormat::Rfc3339Nano.format("2024-02-29T23:59:59Z");
        assert_eq!(whole, "2024-02-29T23:59:59Z");
        assert_eq!(
            TimeFormat::Rfc1123Z.format("2024-02-29T23:59:59Z"),
            "Thu, 29 Feb 2024 23:59:59 +0000"
        );
        // hubble lowercases the name before it looks it up.
        assert_eq!(TimeFormat::by_name("rfc3339"), Some(TimeFormat::Rfc3339));
        assert_eq!(TimeFormat::by_name("RFC3339Pico"), None);
    }

    #[test]
    fn color_as_the_cli() {
        let f = f_dict();
        let on = Style {
            color: true,
            ..Style::default()
        };
        let line = compact(&f, on);
        assert!(
            line.contains("\x1b[36mdefault/xwing-7d9f8b6c5-abcde\x1b[0m:\x1b[33m43210\x1b[0m"),
            "{line}"
        );
        assert!(line.contains("\x1b[35m(ID:12345)\x1b[0m"), "{line}");
        assert!(line.contains(" \x1b[32mFORWARDED\x1b[0m ("), "{line}");
        assert!(dict(&f, false, on).contains("VERDICT: \x1b[32mFORWARDED\x1b[0m"));
        assert!(!compact(&f, Style::default()).contains('\x1b'));
    }

    /// `--ip-translation` (the default) names ends by pod, else by the DNS
    /// names learned for them; `--numeric` prints addresses; IPv6 with a
    /// port in brackets; `--print-policy-names` appends who decided.
    #[test]
    fn translation_numeric_and_policy_names() {
        let mut f = f_dict();
        f.destination = std::sync::Arc::new(crate::record::Endpoint {
            identity: 2,
            ..Default::default()
        });
        f.destination_names = vec!["cilium.io".into(), "www.cilium.io".into()];
        let line = compact(&f, Style::default());
        assert!(
            line.contains("-> cilium.io,www.cilium.io:80 (world)"),
            "{line}"
        );
        let numeric = Style {
            ip_translation: false,
            ..Style::default()
        };
        let line = compact(&f, numeric);
        assert!(
            line.contains("10.0.1.10:43210 (ID:12345) -> 10.0.2.20:80 (world)"),
            "{line}"
        );
        let mut v6 = f.clone();
        if let Some(ip) = v6.ip.as_mut() {
            ip.destination = "fd00::1".into();
        }
        v6.destination_names.clear();
        assert!(compact(&v6, Style::default()).contains("-> [fd00::1]:80 (world)"));

        let mut verdict = f_dict();
        verdict.event_type.r#type = 5;
        verdict.ingress_allowed_by = vec![std::sync::Arc::new(crate::record::PolicyRef {
            name: "allow-web".into(),
            namespace: "default".into(),
            kind: "CiliumNetworkPolicy".into(),
            ..Default::default()
        })];
        let names = Style {
            policy_names: true,
            ..Style::default()
        };
        assert!(compact(&verdict, names)
            .contains(" ALLOWED BY default/allow-web (CiliumNetworkPolicy) ("));
        assert!(!compact(&verdict, Style::default()).contains(" BY "));
        verdict.verdict = crate::enums::Verdict::DROPPED;
        assert!(
            compact(&verdict, names).contains(" DENIED ("),
            "no denying policy named"
        );
    }
}
