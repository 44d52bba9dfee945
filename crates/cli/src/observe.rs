//! `fibril observe`: `hubble observe` against any Hubble-compatible server
//! (the lab's agent by default), with Hubble's flags and output formats.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use flow::format::TimeFormat;
use proto::flow as pb;
use proto::observer::{
    get_flows_response::ResponseTypes, observer_client::ObserverClient, GetFlowsRequest,
};

/// Output formats of `hubble observe`.
#[derive(Clone, Copy, clap::ValueEnum, PartialEq, Eq)]
pub enum Format {
    Compact,
    Dict,
    Table,
    Json,
    Jsonpb,
}

#[derive(clap::Args)]
pub struct Args {
    #[command(flatten)]
    pub server: Server,
    /// Negate the next filter flag: `--not --namespace kube-system`.
    #[arg(long = "not")]
    pub not: bool,
    /// The filter flags that followed `--not` (see `split_not`).
    #[arg(skip)]
    pub negated: Vec<String>,
    /// flows (default), agent-events or debug-events.
    #[command(subcommand)]
    pub what: Option<What>,
    /// Keep printing new events.
    #[arg(short, long, global = true)]
    pub follow: bool,
    /// The last N events.
    #[arg(long, global = true)]
    pub last: Option<u64>,
    /// The first N events in the buffer.
    #[arg(long, global = true)]
    pub first: Option<u64>,
    /// Every event in the buffer.
    #[arg(long, global = true)]
    pub all: bool,
    /// Events since this time (`30s`, `5m`, `1h30m` ago, or RFC 3339).
    #[arg(long, global = true)]
    pub since: Option<String>,
    /// Events until this time (same forms as --since).
    #[arg(long, global = true)]
    pub until: Option<String>,
    /// Flows from or to pods of this namespace.
    #[arg(short = 'n', long)]
    pub namespace: Vec<String>,
    /// Flows from pods of this namespace.
    #[arg(long)]
    pub from_namespace: Vec<String>,
    /// Flows to pods of this namespace.
    #[arg(long)]
    pub to_namespace: Vec<String>,
    /// Flows from or to this pod (`[namespace/]name`, a prefix).
    #[arg(long)]
    pub pod: Vec<String>,
    /// Flows from this pod (`[namespace/]name`, a prefix).
    #[arg(long)]
    pub from_pod: Vec<String>,
    /// Flows to this pod (`[namespace/]name`, a prefix).
    #[arg(long)]
    pub to_pod: Vec<String>,
    /// Flows from or to this address or CIDR.
    #[arg(long)]
    pub ip: Vec<String>,
    /// Flows from this address or CIDR.
    #[arg(long)]
    pub from_ip: Vec<String>,
    /// Flows to this address or CIDR.
    #[arg(long)]
    pub to_ip: Vec<String>,
    /// Flows from or to endpoints with these labels (`app=web,tier`).
    #[arg(short = 'l', long)]
    pub label: Vec<String>,
    /// Flows from endpoints with these labels.
    #[arg(long)]
    pub from_label: Vec<String>,
    /// Flows to endpoints with these labels.
    #[arg(long)]
    pub to_label: Vec<String>,
    /// Flows from or to this L4 port.
    #[arg(long)]
    pub port: Vec<String>,
    /// Flows from this L4 port.
    #[arg(long)]
    pub from_port: Vec<String>,
    /// Flows to this L4 port.
    #[arg(long)]
    pub to_port: Vec<String>,
    /// Flows from or to this security identity.
    #[arg(long)]
    pub identity: Vec<String>,
    /// Flows from this security identity.
    #[arg(long)]
    pub from_identity: Vec<String>,
    /// Flows to this security identity.
    #[arg(long)]
    pub to_identity: Vec<String>,
    /// Flows from or to this DNS name (`*` wildcards).
    #[arg(long)]
    pub fqdn: Vec<String>,
    /// Flows from this DNS name.
    #[arg(long)]
    pub from_fqdn: Vec<String>,
    /// Flows to this DNS name.
    #[arg(long)]
    pub to_fqdn: Vec<String>,
    /// Flows of this protocol: tcp, udp, icmp, http, dns ...
    #[arg(long)]
    pub protocol: Vec<String>,
    /// FORWARDED, DROPPED, AUDIT, REDIRECTED, ERROR, TRACED, TRANSLATED.
    #[arg(long)]
    pub verdict: Vec<String>,
    /// Drops of this reason (`POLICY_DENIED`, ...).
    #[arg(long)]
    pub drop_reason_desc: Vec<String>,
    /// Event type: drop, trace, policy-verdict, l7 ... or a number, with an
    /// optional `:subtype`.
    #[arg(short = 't', long = "type")]
    pub event_type: Vec<String>,
    /// TCP flags a flow must all carry (`syn,ack`); repeat for either.
    #[arg(long)]
    pub tcp_flags: Vec<String>,
    /// ingress or egress.
    #[arg(long)]
    pub traffic_direction: Vec<String>,
    /// Flows seen on this node (`cluster/node`, `*` wildcards).
    #[arg(long)]
    pub node_name: Vec<String>,
    /// The flow with this UUID.
    #[arg(long)]
    pub uuid: Vec<String>,
    /// HTTP responses with this status (`404`, `5+`).
    #[arg(long)]
    pub http_status: Vec<String>,
    /// HTTP requests with this method.
    #[arg(long)]
    pub http_method: Vec<String>,
    /// HTTP requests whose path matches this regex.
    #[arg(long)]
    pub http_path: Vec<String>,
    /// HTTP requests whose URL matches this regex.
    #[arg(long)]
    pub http_url: Vec<String>,
    /// `key:value`.
    #[arg(long)]
    pub http_header: Vec<String>,
    /// Flows from or to this service (`[namespace/]name`).
    #[arg(long)]
    pub service: Vec<String>,
    /// Flows from this service.
    #[arg(long)]
    pub from_service: Vec<String>,
    /// Flows to this service.
    #[arg(long)]
    pub to_service: Vec<String>,
    /// `name`, `Kind/name` or `Kind/`.
    #[arg(long)]
    pub workload: Vec<String>,
    /// Flows from this workload.
    #[arg(long)]
    pub from_workload: Vec<String>,
    /// Flows to this workload.
    #[arg(long)]
    pub to_workload: Vec<String>,
    /// Flows from or to this cluster.
    #[arg(long)]
    pub cluster: Vec<String>,
    /// Flows from this cluster.
    #[arg(long)]
    pub from_cluster: Vec<String>,
    /// Flows to this cluster.
    #[arg(long)]
    pub to_cluster: Vec<String>,
    /// Flows of every namespace.
    #[arg(short = 'A', long)]
    pub all_namespaces: bool,
    /// Flows from pods of any namespace.
    #[arg(long)]
    pub from_all_namespaces: bool,
    /// Flows to pods of any namespace.
    #[arg(long)]
    pub to_all_namespaces: bool,
    /// Flows matching this CEL expression (sent as hubble does; Fibril's
    /// server refuses CEL with a clear error).
    #[arg(long)]
    pub cel_expression: Vec<String>,
    /// Filters to send as they are: JSON FlowFilters (repeatable).
    #[arg(long)]
    pub allowlist: Vec<String>,
    /// Flows to leave out: JSON FlowFilters (repeatable).
    #[arg(long)]
    pub denylist: Vec<String>,
    /// Print the allowlist and denylist as YAML and exit without a request.
    #[arg(long)]
    pub print_raw_filters: bool,
    /// Read flows from this file (`hubble observe -o jsonpb` lines; `-` for
    /// standard input) instead of a server, filtering them here.
    #[arg(long)]
    pub input_file: Option<std::path::PathBuf>,
    /// IPv4 flows only.
    #[arg(short = '4', long)]
    pub ipv4: bool,
    /// IPv6 flows only.
    #[arg(short = '6', long)]
    pub ipv6: bool,
    /// v4, v6 or none.
    #[arg(long)]
    pub ip_version: Vec<String>,
    /// Flows whose source was translated to this address.
    #[arg(long)]
    pub snat_ip: Vec<String>,
    /// Flows seen on nodes with these labels.
    #[arg(long)]
    pub node_label: Vec<String>,
    /// Flows of this trace ID.
    #[arg(long)]
    pub trace_id: Vec<String>,
    /// Flows with this IP option trace ID.
    #[arg(long)]
    pub ip_trace_id: Vec<u64>,
    /// Flows through this network interface.
    #[arg(long)]
    pub interface: Vec<String>,
    /// Encrypted flows only.
    #[arg(long, conflicts_with = "unencrypted")]
    pub encrypted: bool,
    /// Unencrypted flows only.
    #[arg(long)]
    pub unencrypted: bool,
    /// Output format.
    #[arg(
        short = 'o',
        long,
        value_enum,
        default_value = "compact",
        global = true
    )]
    pub output: Format,
    /// Only these fields of each flow (`time,verdict,source.pod_name`);
    /// needs `-o json` or `-o jsonpb`.
    #[arg(long, value_delimiter = ',')]
    pub field_mask: Vec<String>,
    /// Print the node name with each flow.
    #[arg(long, global = true)]
    pub print_node_name: bool,
    /// Print the names of the policies that allowed or denied each flow.
    #[arg(long, global = true)]
    pub print_policy_names: bool,
    /// Print addresses, never pod or DNS names (as --ip-translation=false).
    #[arg(long, global = true)]
    pub numeric: bool,
    /// Show pods and learned DNS names instead of addresses
    /// (`--ip-translation=false` to turn off).
    #[arg(long, global = true, default_value_t = true, action = clap::ArgAction::Set,
          num_args = 0..=1, default_missing_value = "true", require_equals = true)]
    pub ip_translation: bool,
    /// Print no errors or warnings of the stream (nodes unavailable).
    #[arg(short = 's', long, global = true)]
    pub silent_errors: bool,
    /// StampMilli, YearMonthDay, YearMonthDayHour, YearMonthDayHourMinute, RFC3339,
    /// RFC3339Milli, RFC3339Micro, RFC3339Nano or RFC1123Z.
    #[arg(long, global = true, default_value = "StampMilli", value_parser = time_format)]
    pub time_format: TimeFormat,
    /// Colour the output: auto (a terminal without NO_COLOR), always, never.
    #[arg(long, global = true, value_enum, default_value = "auto")]
    pub color: Color,
}

#[derive(clap::ValueEnum, Clone, Copy, PartialEq, Eq)]
pub enum Color {
    Auto,
    Always,
    Never,
}

impl Args {
    /// How to print flows, as `--time-format` and `--color` say.
    fn style(&self) -> flow::format::Style {
        use std::io::IsTerminal;
        let color = match self.color {
            Color::Always => true,
            Color::Never => false,
            Color::Auto => {
                std::io::stdout().is_terminal()
                    && std::env::var_os("NO_COLOR").is_none()
                    && std::env::var("TERM").map_or(true, |t| t != "dumb")
            }
        };
        flow::format::Style {
            time: self.time_format,
            color,
            ip_translation: self.ip_translation && !self.numeric,
            policy_names: self.print_policy_names,
        }
    }
}

fn time_format(name: &str) -> Result<TimeFormat, String> {
    TimeFormat::by_name(name).ok_or_else(|| {
        format!(
            "not one of {}",
            TimeFormat::NAMES.map(|(n, _)| n).join(", ")
        )
    })
}

/// What `fibril observe` streams.
#[derive(clap::Subcommand, Clone, Copy, PartialEq, Eq)]
pub enum What {
    /// Flows (the default).
    Flows,
    /// What the agent did: started, endpoints, policies.
    AgentEvents,
    /// Datapath debug events (Fibril's datapath emits none).
    DebugEvents,
}

/// `AGENT_STARTED (start time: ...)`, `ENDPOINT_CREATED (id: 7, namespace:
/// shop, pod name: web)`, as `hubble observe agent-events` prints them.
fn agent_event_text(e: &pb::AgentEvent) -> String {
    use pb::agent_event::Notification;
    let kind = pb::AgentEventType::try_from(e.r#type)
        .map(|t| t.as_str_name())
        .unwrap_or("AGENT_EVENT_UNKNOWN");
    let detail = match &e.notification {
        Some(Notification::AgentStart(t)) => {
            format!(
                "start time: {}",
                flow::format::compact_time(&ts_text(t.time))
            )
        }
        Some(Notification::EndpointUpdate(u)) => {
            format!(
                "id: {}, namespace: {}, pod name: {}",
                u.id, u.namespace, u.pod_name
            )
        }
        Some(Notification::PolicyUpdate(p)) => {
            format!(
                "labels: [{}], revision: {}, count: {}",
                p.labels.join(" "),
                p.revision,
                p.rule_count
            )
        }
        Some(Notification::IpcacheUpdate(c)) => {
            let mut t = format!("cidr: {}, identity: {}", c.cidr, c.identity);
            if let Some(old) = c.old_identity {
                t.push_str(&format!(", old identity: {old}"));
            }
            if !c.namespace.is_empty() {
                t.push_str(&format!(", namespace: {}", c.namespace));
            }
            if !c.pod_name.is_empty() {
                t.push_str(&format!(", pod name: {}", c.pod_name));
            }
            t
        }
        _ => String::new(),
    };
    format!("{kind} ({detail})")
}

fn ts_text(t: Option<prost_types::Timestamp>) -> String {
    t.map(|t| flow::record::rfc3339(hubble::convert::unix_ns(&t)))
        .unwrap_or_default()
}

/// `fibril observe agent-events` / `debug-events`.
fn run_events(
    address: impl FnOnce() -> anyhow::Result<String>,
    a: &Args,
    what: What,
) -> anyhow::Result<i32> {
    use proto::observer::{GetAgentEventsRequest, GetDebugEventsRequest};
    if a.first.is_some() && a.follow {
        bail!("--first cannot be combined with --follow");
    }
    // Agent and debug events default to the last 20, with --follow too.
    let number = match (last(a), a.first, a.all) {
        (Some(n), None, false) | (None, Some(n), false) => n,
        (None, None, true) => u64::MAX,
        (None, None, false) => 20,
        _ => bail!("give one of --last, --first and --all"),
    };
    let since = a
        .since
        .as_deref()
        .map(|v| parse_time("since", v))
        .transpose()?;
    let until = if a.follow {
        None
    } else {
        a.until
            .as_deref()
            .map(|v| parse_time("until", v))
            .transpose()?
    };
    let address = address()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut client = ObserverClient::new(connect(&address, &a.server).await?);
        let err = |s: tonic::Status| anyhow::anyhow!("{}", s.message());
        if what == What::DebugEvents {
            let req = GetDebugEventsRequest { number, first: a.first.is_some(), follow: a.follow, since, until };
            let mut s = client.get_debug_events(req).await.map_err(err)?.into_inner();
            while let Some(r) = s.message().await.map_err(err)? {
                println!("{}: debug event {:?}", a.time_format.format(&ts_text(r.time)), r.debug_event);
            }
            return Ok(0);
        }
        let req = GetAgentEventsRequest { number, first: a.first.is_some(), follow: a.follow, since, until };
        let mut s = client.get_agent_events(req).await.map_err(err)?.into_inner();
        while let Some(r) = s.message().await.map_err(err)? {
            let Some(e) = &r.agent_event else { continue };
            let time = ts_text(r.time);
            match a.output {
                Format::Json | Format::Jsonpb => {
                    let kind = pb::AgentEventType::try_from(e.r#type).map(|t| t.as_str_name()).unwrap_or("AGENT_EVENT_UNKNOWN");
                    println!(
                        "{}",
                        serde_json::json!({"agent_event": {"type": kind, "text": agent_event_text(e)}, "node_name": r.node_name, "time": time})
                    );
                }
                _ if a.print_node_name => {
                    println!("{} [{}]: {}", a.time_format.format(&time), r.node_name, agent_event_text(e))
                }
                _ => println!("{}: {}", a.time_format.format(&time), agent_event_text(e)),
            }
        }
        Ok(0)
    })
}

fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64
}

/// `30s`, `5m`, `1h43m` ago, or an RFC 3339 time.
fn parse_time(flag: &str, v: &str) -> anyhow::Result<prost_types::Timestamp> {
    let ns = if let Some(t) = flow::record::parse_rfc3339(v) {
        t
    } else {
        let mut total = 0u64;
        let mut num = String::new();
        for c in v.chars() {
            if c.is_ascii_digit() {
                num.push(c);
                continue;
            }
            let n: u64 = num
                .parse()
                .with_context(|| format!("--{flag}: {v:?} is not a duration or RFC 3339 time"))?;
            num.clear();
            total += n * match c {
                's' => 1,
                'm' => 60,
                'h' => 3600,
                'd' => 86_400,
                _ => bail!("--{flag}: unknown unit {c:?} in {v:?} (s, m, h, d)"),
            };
        }
        if !num.is_empty() {
            bail!("--{flag}: {v:?} needs a unit (e.g. 5m)");
        }
        now_ns().saturating_sub(total * 1_000_000_000)
    };
    Ok(prost_types::Timestamp {
        seconds: (ns / 1_000_000_000) as i64,
        nanos: (ns % 1_000_000_000) as i32,
    })
}

fn identity_value(v: &str) -> anyhow::Result<u32> {
    if let Ok(n) = v.parse() {
        return Ok(n);
    }
    (0..=10)
        .find(|id| abi::identity::reserved_name(*id) == Some(v))
        .with_context(|| format!("identity {v:?}: a number or a reserved name (host, world, ...)"))
}

fn event_type(v: &str) -> anyhow::Result<pb::EventTypeFilter> {
    let (t, sub) = v.split_once(':').map_or((v, None), |(t, s)| (t, Some(s)));
    let r#type = match t {
        "drop" => 1,
        "debug" => 2,
        "capture" => 3,
        "trace" => 4,
        "policy-verdict" => 5,
        "trace-sock" => 7,
        "l7" => 129,
        "agent" => 130,
        n => n
            .parse()
            .with_context(|| format!("--type: unknown event type {n:?}"))?,
    };
    let trace_points = [
        "to-endpoint",
        "to-proxy",
        "to-host",
        "to-stack",
        "to-overlay",
        "from-endpoint",
        "from-proxy",
        "from-host",
        "from-stack",
        "from-overlay",
        "from-network",
        "to-network",
        "from-crypto",
        "to-crypto",
    ];
    let sub_type = match sub {
        None => None,
        Some(s) => Some(match s.parse::<i32>() {
            Ok(n) => n,
            Err(_) => trace_points
                .iter()
                .position(|p| *p == s)
                .with_context(|| format!("--type: unknown subtype {s:?}"))?
                as i32,
        }),
    };
    Ok(pb::EventTypeFilter {
        r#type,
        match_sub_type: sub_type.is_some(),
        sub_type: sub_type.unwrap_or(0),
    })
}

/// Filter flags hubble refuses together, its groups in its order: within a
/// group any two set flags conflict.
const CONFLICTS: &[&[&str]] = &[
    &[
        "from-fqdn",
        "from-ip",
        "ip",
        "fqdn",
        "from-namespace",
        "namespace",
        "from-all-namespaces",
        "all-namespaces",
    ],
    &["from-fqdn", "from-ip", "ip", "fqdn", "from-pod", "pod"],
    &[
        "to-fqdn",
        "to-ip",
        "ip",
        "fqdn",
        "to-namespace",
        "namespace",
        "to-all-namespaces",
        "all-namespaces",
    ],
    &["to-fqdn", "to-ip", "ip", "fqdn", "to-pod", "pod"],
    &["to-pod", "namespace", "all-namespaces"],
    &["from-pod", "namespace", "all-namespaces"],
    &["to-service", "namespace", "all-namespaces"],
    &["from-service", "namespace", "all-namespaces"],
    &["label", "from-label"],
    &["label", "to-label"],
    &["service", "from-service"],
    &["service", "to-service"],
    &["port", "to-port"],
    &["port", "from-port"],
    &["identity", "to-identity"],
    &["identity", "from-identity"],
    &["workload", "to-workload"],
    &["workload", "from-workload"],
    &["encrypted", "unencrypted"],
];

/// The filter flags given (by their long names).
fn flags_set(a: &Args) -> Vec<&'static str> {
    let flags: [(&str, bool); 32] = [
        ("namespace", !a.namespace.is_empty()),
        ("from-namespace", !a.from_namespace.is_empty()),
        ("to-namespace", !a.to_namespace.is_empty()),
        ("all-namespaces", a.all_namespaces),
        ("from-all-namespaces", a.from_all_namespaces),
        ("to-all-namespaces", a.to_all_namespaces),
        ("pod", !a.pod.is_empty()),
        ("from-pod", !a.from_pod.is_empty()),
        ("to-pod", !a.to_pod.is_empty()),
        ("ip", !a.ip.is_empty()),
        ("from-ip", !a.from_ip.is_empty()),
        ("to-ip", !a.to_ip.is_empty()),
        ("fqdn", !a.fqdn.is_empty()),
        ("from-fqdn", !a.from_fqdn.is_empty()),
        ("to-fqdn", !a.to_fqdn.is_empty()),
        ("label", !a.label.is_empty()),
        ("from-label", !a.from_label.is_empty()),
        ("to-label", !a.to_label.is_empty()),
        ("encrypted", a.encrypted),
        ("unencrypted", a.unencrypted),
        ("service", !a.service.is_empty()),
        ("from-service", !a.from_service.is_empty()),
        ("to-service", !a.to_service.is_empty()),
        ("port", !a.port.is_empty()),
        ("from-port", !a.from_port.is_empty()),
        ("to-port", !a.to_port.is_empty()),
        ("identity", !a.identity.is_empty()),
        ("from-identity", !a.from_identity.is_empty()),
        ("to-identity", !a.to_identity.is_empty()),
        ("workload", !a.workload.is_empty()),
        ("from-workload", !a.from_workload.is_empty()),
        ("to-workload", !a.to_workload.is_empty()),
    ];
    flags
        .into_iter()
        .filter(|(_, on)| *on)
        .map(|(n, _)| n)
        .collect()
}

/// Hubble's refusal of flags that cannot be combined (the first conflict
/// in its group order).
fn check_conflicts(set: &[&str]) -> anyhow::Result<()> {
    for group in CONFLICTS {
        for flag in group.iter().filter(|f| set.contains(f)) {
            if let Some(other) = group.iter().find(|o| *o != flag && set.contains(o)) {
                bail!("filters --{flag} and --{other} cannot be combined");
            }
        }
    }
    Ok(())
}

/// Namespaces given with `-n`/`--from-namespace`/... (`""` for "all"),
/// applied to one side's pods and services as hubble does: names with a
/// namespace of their own are kept, the others get each namespace; a side
/// with neither pods nor services gets `ns/` (every pod of it).
fn apply_namespaces(pods: &mut Vec<String>, services: &mut Vec<String>, namespaces: &[String]) {
    if namespaces.is_empty() {
        return;
    }
    if pods.is_empty() && services.is_empty() {
        pods.push(String::new());
    }
    let with_ns = |names: &mut Vec<String>| {
        if names.is_empty() {
            return;
        }
        *names = names
            .iter()
            .flat_map(|n| {
                if n.contains('/') {
                    vec![n.clone()]
                } else {
                    namespaces.iter().map(|ns| format!("{ns}/{n}")).collect()
                }
            })
            .collect();
    };
    with_ns(pods);
    with_ns(services);
}

/// `namespace conflict: "a" does not contain "b/x"`, as hubble refuses a
/// pod or service of another namespace than the one given.
fn check_namespaces(namespaces: &[String], names: &[String]) -> anyhow::Result<()> {
    for ns in namespaces {
        for name in names {
            if let Some((n, _)) = name.split_once('/') {
                if !n.is_empty() && n != ns {
                    bail!("namespace conflict: {ns:?} does not contain {name:?}");
                }
            }
        }
    }
    Ok(())
}

/// The filters `hubble observe` would send. As hubble builds them: a
/// "left" filter and a "right" one, every one-sided flag going into both,
/// an either-side flag (`--pod`, `--ip`, `-n` ...) into the left as source
/// and the right as destination; one filter when both come out equal.
pub fn filters(a: &Args) -> anyhow::Result<Vec<pb::FlowFilter>> {
    let set = flags_set(a);
    check_conflicts(&set)?;
    let mut c = pb::FlowFilter {
        source_pod: a.from_pod.clone(),
        destination_pod: a.to_pod.clone(),
        source_ip: a.from_ip.clone(),
        destination_ip: a.to_ip.clone(),
        source_label: a.from_label.clone(),
        destination_label: a.to_label.clone(),
        source_port: a.from_port.clone(),
        destination_port: a.to_port.clone(),
        source_fqdn: a.from_fqdn.clone(),
        destination_fqdn: a.to_fqdn.clone(),
        source_service: a.from_service.clone(),
        destination_service: a.to_service.clone(),
        ..Default::default()
    };
    c.source_identity = a
        .from_identity
        .iter()
        .map(|v| identity_value(v))
        .collect::<Result<_, _>>()?;
    c.destination_identity = a
        .to_identity
        .iter()
        .map(|v| identity_value(v))
        .collect::<Result<_, _>>()?;
    c.protocol = a.protocol.clone();
    for v in &a.verdict {
        let verdict = pb::Verdict::from_str_name(v)
            .filter(|_| v != "VERDICT_UNKNOWN")
            .with_context(|| format!("--verdict: {v:?} is not one of FORWARDED, DROPPED, AUDIT, REDIRECTED, ERROR, TRACED, TRANSLATED"))?;
        c.verdict.push(verdict as i32);
    }
    for v in &a.drop_reason_desc {
        c.drop_reason_desc.push(
            pb::DropReason::from_str_name(v)
                .with_context(|| format!("--drop-reason-desc: unknown drop reason {v:?}"))?
                as i32,
        );
    }
    for v in &a.traffic_direction {
        let d = match v.to_lowercase().as_str() {
            "ingress" => pb::TrafficDirection::Ingress,
            "egress" => pb::TrafficDirection::Egress,
            _ => bail!("--traffic-direction: {v:?} is not ingress or egress"),
        };
        c.traffic_direction.push(d as i32);
    }
    c.event_type = a
        .event_type
        .iter()
        .map(|v| event_type(v))
        .collect::<Result<_, _>>()?;
    // Each value is one filter that wants all its flags, as the real CLI
    // sends `--tcp-flags syn,ack` (several values: any of them).
    for v in &a.tcp_flags {
        let mut f = pb::TcpFlags::default();
        for flag in v.split(',') {
            match flag.trim().to_uppercase().as_str() {
                "SYN" => f.syn = true,
                "ACK" => f.ack = true,
                "FIN" => f.fin = true,
                "RST" => f.rst = true,
                "PSH" => f.psh = true,
                "URG" => f.urg = true,
                "ECE" => f.ece = true,
                "CWR" => f.cwr = true,
                "NS" => f.ns = true,
                other => bail!("--tcp-flags: unknown flag {other:?}"),
            }
        }
        c.tcp_flags.push(f);
    }
    c.node_name = a.node_name.clone();
    c.http_url = a.http_url.clone();
    for h in &a.http_header {
        let (k, v) = h
            .split_once(':')
            .with_context(|| format!("--http-header: {h:?} is not key:value"))?;
        c.http_header.push(pb::HttpHeader {
            key: k.to_string(),
            value: v.to_string(),
        });
    }
    let workload = |w: &String| match w.split_once('/') {
        Some((kind, name)) => pb::Workload {
            kind: kind.into(),
            name: name.into(),
        },
        None => pb::Workload {
            kind: String::new(),
            name: w.clone(),
        },
    };
    c.source_workload = a.from_workload.iter().map(workload).collect();
    c.destination_workload = a.to_workload.iter().map(workload).collect();
    c.source_cluster_name = a.from_cluster.clone();
    c.destination_cluster_name = a.to_cluster.clone();
    c.source_ip_xlated = a.snat_ip.clone();
    c.node_labels = a.node_label.clone();
    c.trace_id = a.trace_id.clone();
    if a.ip_trace_id.contains(&0) {
        bail!("invalid --ip-trace-id value; must be greater than 0");
    }
    c.ip_trace_id = a.ip_trace_id.clone();
    c.interface = a
        .interface
        .iter()
        .map(|n| pb::NetworkInterface {
            index: 0,
            name: n.clone(),
        })
        .collect();
    if a.encrypted {
        c.encrypted.push(true);
    }
    if a.unencrypted {
        c.encrypted.push(false);
    }
    let mut versions: Vec<&str> = a.ip_version.iter().map(String::as_str).collect();
    if a.ipv4 {
        versions.push("v4");
    }
    if a.ipv6 {
        versions.push("v6");
    }
    for v in versions {
        c.ip_version.push(match v.to_lowercase().as_str() {
            "4" | "v4" | "ipv4" | "ip4" => pb::IpVersion::IPv4,
            "6" | "v6" | "ipv6" | "ip6" => pb::IpVersion::IPv6,
            "none" => pb::IpVersion::IpNotUsed,
            _ => bail!("--ip-version: {v:?} is not v4, v6 or none"),
        } as i32);
    }
    c.uuid = a.uuid.clone();
    c.http_status_code = a.http_status.clone();
    c.http_method = a.http_method.clone();
    c.http_path = a.http_path.clone();
    if !a.cel_expression.is_empty() {
        c.experimental = Some(pb::flow_filter::Experimental {
            cel_expression: a.cel_expression.clone(),
        });
    }

    // Either side: the left filter takes them as source, the right as
    // destination.
    let identities: Vec<u32> = a
        .identity
        .iter()
        .map(|v| identity_value(v))
        .collect::<Result<_, _>>()?;
    let (mut left, mut right) = (c.clone(), c);
    left.source_pod.extend(a.pod.iter().cloned());
    left.source_service.extend(a.service.iter().cloned());
    left.source_workload.extend(a.workload.iter().map(workload));
    left.source_cluster_name.extend(a.cluster.iter().cloned());
    left.source_ip.extend(a.ip.iter().cloned());
    left.source_label.extend(a.label.iter().cloned());
    left.source_port.extend(a.port.iter().cloned());
    left.source_identity.extend(identities.iter().copied());
    left.source_fqdn.extend(a.fqdn.iter().cloned());
    right.destination_pod.extend(a.pod.iter().cloned());
    right.destination_service.extend(a.service.iter().cloned());
    right
        .destination_workload
        .extend(a.workload.iter().map(workload));
    right
        .destination_cluster_name
        .extend(a.cluster.iter().cloned());
    right.destination_ip.extend(a.ip.iter().cloned());
    right.destination_label.extend(a.label.iter().cloned());
    right.destination_port.extend(a.port.iter().cloned());
    right.destination_identity.extend(identities);
    right.destination_fqdn.extend(a.fqdn.iter().cloned());

    let all = |on: bool| on.then(String::new);
    let mut ns = a.namespace.clone();
    ns.extend(all(a.all_namespaces));
    let mut src_ns = a.from_namespace.clone();
    src_ns.extend(all(a.from_all_namespaces));
    let mut dst_ns = a.to_namespace.clone();
    dst_ns.extend(all(a.to_all_namespaces));
    for f in [&left, &right] {
        for names in [&f.source_pod, &f.source_service] {
            check_namespaces(&ns, names)?;
            check_namespaces(&src_ns, names)?;
        }
        for names in [&f.destination_pod, &f.destination_service] {
            check_namespaces(&ns, names)?;
            check_namespaces(&dst_ns, names)?;
        }
    }
    for f in [&mut left, &mut right] {
        apply_namespaces(&mut f.destination_pod, &mut f.destination_service, &dst_ns);
        apply_namespaces(&mut f.source_pod, &mut f.source_service, &src_ns);
    }
    apply_namespaces(&mut left.source_pod, &mut left.source_service, &ns);
    apply_namespaces(
        &mut right.destination_pod,
        &mut right.destination_service,
        &ns,
    );

    let empty = pb::FlowFilter::default();
    Ok(match (left == right, left == empty) {
        (true, true) => vec![],
        (true, false) => vec![left],
        (false, _) => vec![left, right],
    })
}

/// `hubble observe --print-raw-filters`: the request's filters as YAML,
/// each in hubble's JSON form.
pub fn raw_filters_yaml(req: &GetFlowsRequest) -> String {
    let list = |name: &str, filters: &[pb::FlowFilter]| -> String {
        if filters.is_empty() {
            return String::new();
        }
        let mut out = format!("{name}:\n");
        for f in filters {
            let json = hubble::json::filter_to_json(f);
            out.push_str(&format!("    - '{}'\n", json.replace('\'', "''")));
        }
        out
    };
    let out = list("allowlist", &req.whitelist) + &list("denylist", &req.blacklist);
    if out.is_empty() {
        "{}\n".into()
    } else {
        out
    }
}

/// Takes `hubble observe`'s `--not` out of a command line: each `--not`
/// moves the flag after it (with its value) to the returned negated list,
/// which becomes the request's blacklist. Order matters, so clap cannot do
/// this itself. Only the words after an `observe` subcommand are looked at
/// (`fibril --lab x observe ...`), never a command given to `lab exec`.
pub fn split_not(argv: Vec<String>) -> (Vec<String>, Vec<String>) {
    // The first word that is neither a global option nor its value.
    let mut i = 1;
    while argv.get(i).is_some_and(|w| w.starts_with('-')) {
        i += if argv[i].contains('=') { 1 } else { 2 };
    }
    if argv.get(i).map(String::as_str) != Some("observe") {
        return (argv, Vec::new());
    }
    let start = i;
    let cmd = <Args as clap::Args>::augment_args(clap::Command::new("observe"));
    let takes_value = |word: &str| -> bool {
        let found = if let Some(long) = word.strip_prefix("--") {
            if long.contains('=') {
                return false;
            }
            cmd.get_arguments().find(|a| a.get_long() == Some(long))
        } else {
            let short = word.strip_prefix('-').unwrap_or(word);
            if short.chars().count() != 1 {
                return false; // `-nkube-system`: the value is attached
            }
            cmd.get_arguments()
                .find(|a| a.get_short().map(String::from).as_deref() == Some(short))
        };
        found.is_some_and(|a| a.get_action().takes_values())
    };
    let (mut kept, mut negated) = (Vec::new(), Vec::new());
    let mut words = argv.into_iter().enumerate().peekable();
    while let Some((i, w)) = words.next() {
        if i <= start {
            kept.push(w);
        } else if w == "--" {
            kept.push(w);
            kept.extend(words.by_ref().map(|(_, w)| w));
        } else if w == "--not" && words.peek().is_some() {
            let (_, flag) = words.next().expect("peeked");
            let value = takes_value(&flag).then(|| words.next()).flatten();
            negated.push(flag);
            negated.extend(value.map(|(_, v)| v));
        } else {
            kept.push(w);
        }
    }
    (kept, negated)
}

/// The blacklist for the flags that followed `--not`.
fn negated_filters(a: &Args) -> anyhow::Result<Vec<pb::FlowFilter>> {
    if a.not {
        bail!("--not must be followed by a filter flag");
    }
    if a.negated.is_empty() {
        return Ok(Vec::new());
    }
    let cmd = <Args as clap::Args>::augment_args(clap::Command::new("observe"));
    let words = std::iter::once("observe".to_string()).chain(a.negated.iter().cloned());
    let matches = cmd
        .try_get_matches_from(words)
        .map_err(|e| anyhow::anyhow!("--not {}: {}", a.negated.join(" "), e.kind()))?;
    let negated = <Args as clap::FromArgMatches>::from_arg_matches(&matches)?;
    let filters = filters(&negated)?;
    if filters.is_empty() || filters.iter().any(|f| *f == pb::FlowFilter::default()) {
        bail!(
            "--not must be followed by a filter flag, not {}",
            a.negated.join(" ")
        );
    }
    Ok(filters)
}

/// The parts of a flow's JSON that field-mask paths name (`source.pod_name`
/// keeps `{"source": {"pod_name": ..}}`); the JSON keys are the proto's
/// field names.
fn project(value: serde_json::Value, paths: &[String]) -> serde_json::Value {
    use serde_json::Value;
    let serde_json::Value::Object(map) = value else {
        return value;
    };
    let mut out = serde_json::Map::new();
    for (key, v) in map {
        let deeper: Vec<String> = paths
            .iter()
            .filter_map(|p| match p.split_once('.') {
                Some((head, rest)) if head == key => Some(rest.to_string()),
                _ => None,
            })
            .collect();
        if paths.contains(&key) {
            out.insert(key, v);
        } else if !deeper.is_empty() {
            let kept = match v {
                Value::Array(items) => {
                    Value::Array(items.into_iter().map(|i| project(i, &deeper)).collect())
                }
                other => project(other, &deeper),
            };
            out.insert(key, kept);
        }
    }
    Value::Object(out)
}

/// `--last`, where `--last 0` means no `--last` (the default count), as the
/// real CLI reads it.
fn last(a: &Args) -> Option<u64> {
    a.last.filter(|n| *n > 0)
}

/// `filters` followed by those given as JSON (`--allowlist`/`--denylist`).
fn with_raw(
    mut filters: Vec<pb::FlowFilter>,
    raw: &[String],
    flag: &str,
) -> anyhow::Result<Vec<pb::FlowFilter>> {
    for text in raw {
        let parsed = hubble::json::filters_from_json(text).map_err(|e| {
            anyhow::anyhow!("invalid --{flag} flag: failed to decode {text:?}: {e}")
        })?;
        filters.extend(parsed);
    }
    Ok(filters)
}

/// The request `hubble observe` would send for these flags.
pub fn request(a: &Args) -> anyhow::Result<GetFlowsRequest> {
    if a.first.is_some() && a.follow {
        bail!("--first cannot be combined with --follow");
    }
    if !a.field_mask.is_empty() && !matches!(a.output, Format::Json | Format::Jsonpb) {
        bail!("--field-mask needs the json or jsonpb output (-o json)");
    }
    if a.output == Format::Table && a.follow {
        bail!("the table output is printed at the end: it cannot be used with --follow");
    }
    let number = match (last(a), a.first.filter(|n| *n > 0), a.all) {
        (Some(n), None, false) => n,
        (None, Some(n), false) => n,
        (None, None, true) => u64::MAX,
        (None, None, false)
            if a.follow || a.since.is_some() || a.until.is_some() || a.input_file.is_some() =>
        {
            0
        }
        (None, None, false) => 20,
        _ => bail!("give one of --last, --first and --all"),
    };
    Ok(GetFlowsRequest {
        number,
        field_mask: (!a.field_mask.is_empty()).then(|| prost_types::FieldMask {
            paths: a.field_mask.clone(),
        }),
        first: a.first.is_some_and(|n| n > 0),
        follow: a.follow,
        whitelist: with_raw(filters(a)?, &a.allowlist, "allowlist")?,
        blacklist: with_raw(negated_filters(a)?, &a.denylist, "denylist")?,
        since: a
            .since
            .as_deref()
            .map(|v| parse_time("since", v))
            .transpose()?,
        until: if a.follow {
            None
        } else {
            a.until
                .as_deref()
                .map(|v| parse_time("until", v))
                .transpose()?
        },
        ..Default::default()
    })
}

/// How to reach a Hubble-compatible server: the hubble CLI's server flags.
#[derive(clap::Args, Clone)]
pub struct Server {
    /// `host:port`, `unix:///path/to/hubble.sock` or `tls://host:port`;
    /// default: the lab agent's.
    #[arg(long, env = "HUBBLE_SERVER", global = true)]
    pub server: Option<String>,
    /// Use TLS.
    #[arg(long, global = true)]
    pub tls: bool,
    /// CA certificate (PEM) to verify the server with.
    #[arg(long, global = true)]
    pub tls_ca_cert_files: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(long, global = true, requires = "tls_client_key_file")]
    pub tls_client_cert_file: Option<std::path::PathBuf>,
    /// Client key (PEM) for mutual TLS.
    #[arg(long, global = true, requires = "tls_client_cert_file")]
    pub tls_client_key_file: Option<std::path::PathBuf>,
    /// Server name to verify (default: the host of --server).
    #[arg(long, global = true)]
    pub tls_server_name: Option<String>,
    /// How long to wait for the connection to the server (`5s`, `1m`).
    #[arg(long, global = true, default_value = "5s", value_parser = duration)]
    pub timeout: Duration,
    /// How long a unary request (status, list) may take (`12s`).
    #[arg(long, global = true, default_value = "12s", value_parser = duration)]
    pub request_timeout: Duration,
}

impl Default for Server {
    fn default() -> Self {
        Server {
            server: None,
            tls: false,
            tls_ca_cert_files: None,
            tls_client_cert_file: None,
            tls_client_key_file: None,
            tls_server_name: None,
            timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(12),
        }
    }
}

/// `300ms`, `5s`, `2m`, `1h30m` (Go's duration form, without fractions).
pub fn duration(v: &str) -> Result<Duration, String> {
    let mut total = Duration::ZERO;
    let mut rest = v;
    if rest.is_empty() {
        return Err("a duration such as 5s".into());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("{v:?} is not a duration such as 5s"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = match &rest[..unit_len] {
            "ms" => Duration::from_millis(1),
            "s" => Duration::from_secs(1),
            "m" => Duration::from_secs(60),
            "h" => Duration::from_secs(3600),
            u => return Err(format!("{v:?}: unknown unit {u:?} (ms, s, m, h)")),
        };
        total += unit * u32::try_from(n).map_err(|_| format!("{v:?} is too long"))?;
        rest = &rest[unit_len..];
    }
    Ok(total)
}

/// A gRPC channel to a Hubble-compatible server.
pub async fn connect(address: &str, s: &Server) -> anyhow::Result<tonic::transport::Channel> {
    let fail = || format!("cannot reach the Hubble API at {address}");
    if let Some(path) = address
        .strip_prefix("unix://")
        .or_else(|| address.strip_prefix("unix:"))
    {
        let connector = hubble::client::unix_connector(path.into());
        return tonic::transport::Endpoint::from_static("http://localhost")
            .connect_timeout(s.timeout)
            .connect_with_connector(connector)
            .await
            .with_context(fail);
    }
    let (tls, host_port) = match address.strip_prefix("tls://") {
        Some(rest) => (true, rest),
        None => (s.tls, address.strip_prefix("http://").unwrap_or(address)),
    };
    let scheme = if tls { "https" } else { "http" };
    let mut endpoint = tonic::transport::Endpoint::from_shared(format!("{scheme}://{host_port}"))
        .with_context(|| format!("--server {address:?} is not an address"))?
        .connect_timeout(s.timeout);
    if tls {
        let read = |p: &std::path::PathBuf| {
            std::fs::read(p).with_context(|| format!("reading {}", p.display()))
        };
        let host = host_port.rsplit_once(':').map_or(host_port, |(h, _)| h);
        let mut cfg = tonic::transport::ClientTlsConfig::new().domain_name(
            s.tls_server_name
                .clone()
                .unwrap_or_else(|| host.to_string()),
        );
        if let Some(ca) = &s.tls_ca_cert_files {
            cfg = cfg.ca_certificate(tonic::transport::Certificate::from_pem(read(ca)?));
        }
        if let (Some(c), Some(k)) = (&s.tls_client_cert_file, &s.tls_client_key_file) {
            cfg = cfg.identity(tonic::transport::Identity::from_pem(read(c)?, read(k)?));
        }
        endpoint = endpoint.tls_config(cfg)?;
    } else if s.tls_ca_cert_files.is_some() || s.tls_client_cert_file.is_some() {
        bail!("transport layer security required: the TLS flags need --tls or a tls:// server");
    }
    endpoint.connect().await.with_context(fail)
}

/// Prints GetFlows responses in the chosen output, from a server or a file.
struct Printer<'a> {
    a: &'a Args,
    style: flow::format::Style,
    table: Vec<flow::Flow>,
    first_dict: bool,
}

impl<'a> Printer<'a> {
    fn new(a: &'a Args) -> Self {
        Printer {
            a,
            style: a.style(),
            table: Vec::new(),
            first_dict: true,
        }
    }

    fn print(&mut self, r: proto::observer::GetFlowsResponse) -> anyhow::Result<()> {
        let a = self.a;
        let style = self.style;
        match r.response_types {
            Some(ResponseTypes::Flow(p)) => {
                let f = hubble::convert::from_pb(&p);
                match a.output {
                    Format::Compact if a.print_node_name => {
                        println!("{}", flow::format::compact_with_node(&f, style))
                    }
                    Format::Compact => println!("{}", flow::format::compact(&f, style)),
                    Format::Dict => {
                        if !self.first_dict {
                            println!("------------");
                        }
                        self.first_dict = false;
                        println!("{}", flow::format::dict(&f, a.print_node_name, style));
                    }
                    Format::Table => self.table.push(f),
                    // Only the masked fields (the server sent no others;
                    // the JSON form would show their empty values).
                    Format::Json | Format::Jsonpb if !a.field_mask.is_empty() => {
                        let flow = project(serde_json::to_value(&f)?, &a.field_mask);
                        println!(
                            "{}",
                            serde_json::json!({"flow": flow, "node_name": r.node_name, "time": ts_text(r.time)})
                        );
                    }
                    Format::Json | Format::Jsonpb => println!(
                        "{}",
                        serde_json::to_string(&flow::format::JsonLine {
                            flow: &f,
                            node_name: &r.node_name,
                            time: &f.time
                        })?
                    ),
                }
            }
            Some(ResponseTypes::LostEvents(l)) => {
                let source = pb::LostEventSource::try_from(l.source)
                    .map(|s| s.as_str_name())
                    .unwrap_or("UNKNOWN_LOST_EVENT_SOURCE");
                let time = ts_text(r.time);
                match a.output {
                    Format::Json | Format::Jsonpb => println!(
                        "{}",
                        serde_json::json!({"lost_events": {"source": source, "num_events_lost": l.num_events_lost.to_string(), "cpu": l.cpu.unwrap_or(0)}, "node_name": r.node_name, "time": time})
                    ),
                    _ => println!(
                        "{} EVENTS LOST: {source} CPU({}) {}",
                        a.time_format.format(&time),
                        l.cpu.unwrap_or(0),
                        l.num_events_lost
                    ),
                }
            }
            // Trouble with nodes goes to stderr, as hubble prints it, unless
            // --silent-errors; news of nodes connecting is not trouble.
            Some(ResponseTypes::NodeStatus(n)) if !a.silent_errors => {
                use proto::relay::NodeState;
                let names = n.node_names.join(", ");
                let count = n.node_names.len();
                let prefix = format!(
                    "{} [{}]",
                    a.time_format.format(&ts_text(r.time)),
                    r.node_name
                );
                match NodeState::try_from(n.state_change) {
                    Ok(NodeState::NodeUnavailable) => {
                        eprintln!("{prefix}: {count} nodes are unavailable: {names}")
                    }
                    Ok(NodeState::NodeError) => {
                        eprintln!("{prefix}: Error {:?} on {count} nodes: {names}", n.message)
                    }
                    _ => {}
                }
            }
            _ => {}
        }
        Ok(())
    }

    fn finish(self) {
        if self.a.output == Format::Table {
            println!(
                "{}",
                flow::format::table(&self.table, self.a.print_node_name, self.style)
            );
        }
    }
}

/// `--input-file`: hubble's jsonpb lines read back and answered as a server
/// would, filters, time range, `--first`/`--last` applied here. Lines that
/// do not decode are reported (unless --silent-errors) and skipped.
fn run_input_file(a: &Args, path: &std::path::Path, req: &GetFlowsRequest) -> anyhow::Result<i32> {
    use std::io::BufRead;
    let filters = hubble::filter::Filters::new(&req.whitelist, &req.blacklist)
        .map_err(|e| anyhow::anyhow!("{e}"))?;
    let reader: Box<dyn BufRead> = if path.as_os_str() == "-" {
        Box::new(std::io::stdin().lock())
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(path)
                .with_context(|| format!("--input-file {}", path.display()))?,
        ))
    };
    let ns = hubble::convert::unix_ns;
    let (since, until) = (req.since.as_ref().map(ns), req.until.as_ref().map(ns));
    let limit = if req.number == 0 || req.number == u64::MAX {
        None
    } else {
        Some(req.number)
    };
    let mut last = std::collections::VecDeque::new();
    let mut printer = Printer::new(a);
    let mut printed = 0u64;
    for (i, line) in reader.lines().enumerate() {
        let line = line.with_context(|| format!("reading {}", path.display()))?;
        if line.trim().is_empty() {
            continue;
        }
        let r = match hubble::json::response_from_json(&line) {
            Ok(r) => r,
            Err(e) => {
                if !a.silent_errors {
                    eprintln!("line {}: not a GetFlowsResponse: {e}", i + 1);
                }
                continue;
            }
        };
        let t = r.time.as_ref().map(ns).unwrap_or(0);
        if since.is_some_and(|s| t < s) || until.is_some_and(|u| t > u) {
            continue;
        }
        let wanted = match &r.response_types {
            Some(ResponseTypes::Flow(f)) => filters.matches(f),
            _ => req.whitelist.is_empty(),
        };
        if !wanted {
            continue;
        }
        match limit {
            Some(n) if !req.first => {
                last.push_back(r);
                if last.len() as u64 > n {
                    last.pop_front();
                }
            }
            Some(n) => {
                printer.print(r)?;
                printed += 1;
                if printed == n {
                    break;
                }
            }
            None => printer.print(r)?,
        }
    }
    for r in last {
        printer.print(r)?;
    }
    printer.finish();
    Ok(0)
}

/// Runs `fibril observe`. The flags are checked before `address` is
/// resolved, so bad input is reported as such even when no agent is up.
pub fn run(a: &Args, address: impl FnOnce() -> anyhow::Result<String>) -> anyhow::Result<i32> {
    if let Some(what @ (What::AgentEvents | What::DebugEvents)) = a.what {
        return run_events(address, a, what);
    }
    let req = request(a)?;
    if a.print_raw_filters {
        print!("{}", raw_filters_yaml(&req));
        return Ok(0);
    }
    if let Some(path) = &a.input_file {
        return run_input_file(a, path, &req);
    }
    let address = address()?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut client = ObserverClient::new(connect(&address, &a.server).await?);
        let mut stream = client
            .get_flows(req)
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?
            .into_inner();
        let mut printer = Printer::new(a);
        while let Some(r) = stream
            .message()
            .await
            .map_err(|s| anyhow::anyhow!("{}", s.message()))?
        {
            printer.print(r)?;
        }
        printer.finish();
        Ok(0)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn req(argv: &[&str]) -> anyhow::Result<GetFlowsRequest> {
        let cli = Cli::try_parse_from(std::iter::once("observe").chain(argv.iter().copied()))?;
        request(&cli.args)
    }

    #[test]
    fn flags_map_to_the_request_as_hubble_does() {
        assert_eq!(req(&[]).unwrap().number, 20);
        // `syn,ack`: one filter with both flags; two values: either.
        let r = req(&["--tcp-flags", "syn,ack", "--tcp-flags", "fin"]).unwrap();
        let flags = &r.whitelist[0].tcp_flags;
        assert_eq!(flags.len(), 2);
        assert!(flags[0].syn && flags[0].ack && !flags[0].fin);
        assert!(flags[1].fin && !flags[1].syn);
        assert_eq!(req(&["-f"]).unwrap().number, 0);
        assert_eq!(req(&["--all"]).unwrap().number, u64::MAX);
        assert_eq!(req(&["--last", "0"]).unwrap().number, 20);
        assert_eq!(req(&["--last", "0", "-f"]).unwrap().number, 0);
        let r = req(&["-o", "json", "--field-mask", "time,source.pod_name"]).unwrap();
        assert_eq!(r.field_mask.unwrap().paths, ["time", "source.pod_name"]);
        assert!(req(&["--field-mask", "time"]).is_err(), "compact output");
        let r = req(&["--first", "3"]).unwrap();
        assert!(r.first && r.number == 3);
        assert!(req(&["--first", "3", "-f"]).is_err());
        assert_eq!(req(&["--since", "5m"]).unwrap().number, 0);
        assert!(req(&["--since", "5 minutes"]).is_err());
        // Either-side flags: a source filter and a destination filter.
        let r = req(&["-n", "shop", "--pod", "web"]).unwrap();
        assert_eq!(r.whitelist.len(), 2);
        assert_eq!(r.whitelist[0].source_pod, vec!["shop/web"]);
        assert_eq!(r.whitelist[1].destination_pod, vec!["shop/web"]);
        // One-sided flags: one filter.
        let r = req(&[
            "--from-pod",
            "shop/web",
            "--verdict",
            "DROPPED",
            "--to-port",
            "80",
            "-t",
            "trace:to-endpoint",
        ])
        .unwrap();
        assert_eq!(r.whitelist.len(), 1);
        let f = &r.whitelist[0];
        assert_eq!(f.verdict, vec![pb::Verdict::Dropped as i32]);
        assert_eq!(f.destination_port, vec!["80"]);
        assert_eq!(
            f.event_type[0],
            pb::EventTypeFilter {
                r#type: 4,
                match_sub_type: true,
                sub_type: 0
            }
        );
        assert!(
            req(&["--verdict", "dropped"]).is_err(),
            "exact enum names, as the CLI"
        );
        assert_eq!(
            req(&["--identity", "world"]).unwrap().whitelist[0].source_identity,
            vec![2]
        );
        assert!(req(&["-o", "table", "-f"]).is_err());
        let parsed = |argv: &[&str]| {
            let words = std::iter::once("observe").chain(argv.iter().copied());
            Cli::try_parse_from(words).map(|c| c.args.time_format)
        };
        assert_eq!(parsed(&[]).unwrap(), TimeFormat::StampMilli);
        assert_eq!(
            parsed(&["--time-format", "RFC3339Nano"]).unwrap(),
            TimeFormat::Rfc3339Nano
        );
        assert!(parsed(&["--time-format", "iso"]).is_err());
        let style = |argv: &[&str]| {
            let words = std::iter::once("observe").chain(argv.iter().copied());
            Cli::try_parse_from(words).map(|c| c.args.style().color)
        };
        assert!(style(&["--color", "always"]).unwrap());
        assert!(!style(&["--color", "never"]).unwrap());
        assert!(style(&["--color", "sometimes"]).is_err());
        // `--not` negates the next filter flag only: it goes to the blacklist.
        let neg = |argv: &[&str]| {
            let words = ["fibril", "--lab", "x", "observe"].iter().chain(argv);
            let (kept, negated) = split_not(words.map(|w| w.to_string()).collect());
            let cli = Cli::try_parse_from(kept.into_iter().skip(3))?;
            let mut args = cli.args;
            args.negated = negated;
            request(&args)
        };
        let r = neg(&[
            "--not",
            "--namespace",
            "kube-system",
            "--verdict",
            "DROPPED",
        ])
        .unwrap();
        assert_eq!(r.whitelist.len(), 1);
        assert_eq!(r.whitelist[0].verdict, vec![pb::Verdict::Dropped as i32]);
        assert_eq!(r.blacklist.len(), 2);
        assert_eq!(r.blacklist[0].source_pod, vec!["kube-system/"]);
        assert_eq!(r.blacklist[1].destination_pod, vec!["kube-system/"]);
        let r = neg(&["-f", "--not", "--unencrypted", "--to-port=80"]).unwrap();
        assert!(r.follow);
        assert_eq!(r.blacklist[0].encrypted, vec![false]);
        assert_eq!(r.whitelist[0].destination_port, vec!["80"]);
        assert_eq!(neg(&["--not", "-t", "drop"]).unwrap().blacklist.len(), 1);
        assert!(neg(&["--not", "-f"]).is_err(), "not a filter flag");
        assert!(
            neg(&["--pod", "web", "--not"]).is_err(),
            "nothing to negate"
        );
        assert!(neg(&["--not", "--bogus"]).is_err());
        let words = |w: &[&str]| w.iter().map(|w| w.to_string()).collect::<Vec<_>>();
        let exec = words(&["fibril", "lab", "exec", "p", "--", "observe", "--not", "-f"]);
        assert_eq!(split_not(exec.clone()), (exec, vec![]));
        let (kept, negated) = split_not(words(&["fibril", "--lab=x", "observe", "--not", "-4"]));
        assert_eq!((kept.len(), negated), (3, words(&["-4"])));
        // Newer one-sided and either-side flags.
        let r = req(&["-4", "--http-url", "/api", "--unencrypted"]).unwrap();
        assert_eq!(r.whitelist.len(), 1);
        assert_eq!(r.whitelist[0].ip_version, vec![pb::IpVersion::IPv4 as i32]);
        assert_eq!(r.whitelist[0].http_url, vec!["/api"]);
        assert_eq!(r.whitelist[0].encrypted, vec![false]);
        assert!(req(&["--ip-version", "v5"]).is_err());
        let r = req(&["-A"]).unwrap();
        assert_eq!(r.whitelist.len(), 2);
        assert_eq!(r.whitelist[0].source_pod, vec!["/"]);
        let r = req(&["--workload", "Deployment/web", "-n", "shop"]).unwrap();
        assert_eq!(r.whitelist[1].destination_workload[0].kind, "Deployment");
        assert_eq!(r.whitelist[1].destination_workload[0].name, "web");
    }
}
