//! The service map and the protocol breakdown of one browser session,
//! aggregated here from every flow so the browser gets links, not flows.
//!
//! Counts live in time buckets (a sixtieth of the window each), so what
//! the page shows is the last window's traffic, sliding.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::Duration;

use proto::flow::{self as pb, layer4, layer7};
use serde::Serialize;

use crate::selection::Selection;

/// Identities Cilium reserves (`cilium-semantics.md`).
const HOST: u32 = 1;
const WORLD: u32 = 2;
const REMOTE_NODE: u32 = 6;
const KUBE_APISERVER: u32 = 7;
/// Cilium's identities of CIDRs and learned names start here (local scope).
const LOCAL_SCOPE: u32 = 1 << 24;
/// `POLICY_DENIED`: dropped because no rule allowed it.
const POLICY_DENIED: i32 = 133;
/// The most distinct HTTP paths, DNS names, ... an edge remembers.
const DETAIL_MAX: usize = 16;

/// Counts per verdict: forwarded, dropped, audit, error.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Verdicts {
    pub forwarded: u64,
    pub dropped: u64,
    pub audit: u64,
    pub error: u64,
}

impl Verdicts {
    fn add(&mut self, verdict: i32) {
        match pb::Verdict::try_from(verdict) {
            Ok(pb::Verdict::Dropped) => self.dropped += 1,
            Ok(pb::Verdict::Audit) => self.audit += 1,
            Ok(pb::Verdict::Error) => self.error += 1,
            _ => self.forwarded += 1,
        }
    }

    fn plus(&mut self, o: &Verdicts) {
        self.forwarded += o.forwarded;
        self.dropped += o.dropped;
        self.audit += o.audit;
        self.error += o.error;
    }

    pub fn total(&self) -> u64 {
        self.forwarded + self.dropped + self.audit + self.error
    }

    /// The edge's colour: one verdict, or `mixed`.
    pub fn colour(&self) -> &'static str {
        let kinds = [
            (self.forwarded, "forwarded"),
            (self.dropped, "dropped"),
            (self.audit, "audit"),
            (self.error, "error"),
        ];
        let mut present = kinds.iter().filter(|(n, _)| *n > 0);
        match (present.next(), present.next()) {
            (Some((_, one)), None) => one,
            (None, _) => "forwarded",
            _ => "mixed",
        }
    }
}

/// Verdict counts in time buckets of `width` seconds.
#[derive(Debug, Default)]
struct Buckets {
    ring: VecDeque<(u64, Verdicts)>,
}

impl Buckets {
    fn add(&mut self, bucket: u64, verdict: i32) {
        match self.ring.back_mut() {
            Some((b, v)) if *b == bucket => v.add(verdict),
            // A late flow (another node's, or history) counts in the last.
            Some((b, v)) if *b > bucket => v.add(verdict),
            _ => {
                let mut v = Verdicts::default();
                v.add(verdict);
                self.ring.push_back((bucket, v));
            }
        }
    }

    fn prune(&mut self, oldest: u64) {
        while self.ring.front().is_some_and(|(b, _)| *b < oldest) {
            self.ring.pop_front();
        }
    }

    fn sum_since(&self, from: u64) -> Verdicts {
        let mut out = Verdicts::default();
        for (_, v) in self.ring.iter().rev().take_while(|(b, _)| *b >= from) {
            out.plus(v);
        }
        out
    }
}

/// A box on the map.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Node {
    pub id: String,
    pub label: String,
    /// `workload`, `identity`, `world`, `dns`, `host`, `remote-node`,
    /// `kube-apiserver`, `cidr`, `unknown`.
    pub kind: &'static str,
    pub namespace: String,
    pub identity: u32,
    pub labels: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct EdgeKey {
    source: String,
    destination: String,
    port: u16,
    protocol: &'static str,
}

#[derive(Debug, Default)]
struct Edge {
    counts: Buckets,
    /// The flows that decide (drops, policy verdicts, L7 records), which
    /// colour the edge: a cross-node connection's source node forwards
    /// what the destination's policy then drops, and the edge is the
    /// drop's colour, not "mixed".
    decisions: Buckets,
    last_bucket: u64,
    http_methods: BTreeMap<String, u64>,
    http_status: BTreeMap<u32, u64>,
    http_paths: BTreeSet<String>,
    dns_names: BTreeSet<String>,
    latency_sum_ns: u64,
    latency_count: u64,
    latency_max_ns: u64,
    allowed_by: BTreeSet<String>,
    denied_by: BTreeSet<String>,
    /// Dropped with no rule allowing them: the dropping ends (identity,
    /// ingress?), whose selecting policies the snapshot names (with what
    /// the agents said last, not what they said when the flow came).
    default_deny_at: BTreeSet<(u32, bool)>,
}

/// An edge as the page draws it.
#[derive(Clone, Debug, Serialize)]
pub struct EdgeView {
    pub id: String,
    pub source: String,
    pub target: String,
    pub port: u16,
    pub protocol: &'static str,
    pub counts: Verdicts,
    pub verdict: &'static str,
    pub http_methods: BTreeMap<String, u64>,
    pub http_status: BTreeMap<u32, u64>,
    pub http_paths: Vec<String>,
    pub dns_names: Vec<String>,
    /// Mean and worst L7 latency (responses), in milliseconds.
    pub latency_ms: Option<(f64, f64)>,
    pub allowed_by: Vec<String>,
    pub denied_by: Vec<String>,
    /// `Some` when some flows were dropped by default deny: the policies
    /// selecting the endpoint (empty if not known).
    pub default_deny_by: Option<Vec<String>>,
}

/// One row of the protocol breakdown.
#[derive(Clone, Debug, Serialize)]
pub struct ProtocolView {
    pub l4: &'static str,
    /// `http`, `dns`, `kafka` or "".
    pub l7: &'static str,
    pub counts: Verdicts,
    /// Flows per second over the last ten seconds.
    pub rate: f64,
}

/// What the page gets every second.
#[derive(Clone, Debug, Serialize)]
pub struct Snapshot {
    pub window_s: u64,
    /// Flows aggregated since the session began, and their rate now.
    pub seen: u64,
    pub rate: f64,
    pub nodes: Vec<Node>,
    pub edges: Vec<EdgeView>,
    pub protocols: Vec<ProtocolView>,
}

pub struct Aggregate {
    width_s: u64,
    buckets: u64,
    nodes: HashMap<String, (Node, u64)>,
    edges: HashMap<EdgeKey, Edge>,
    protocols: HashMap<(&'static str, &'static str), Buckets>,
    seen: u64,
}

/// Flows of a connection's replies count on its request's edge, not a
/// reverse one; L3/L4 replies add nothing new to the map.
fn is_reply(f: &pb::Flow) -> bool {
    f.is_reply.unwrap_or(false)
}

/// Cilium's event types that decide: a drop, a policy verdict; and L7
/// records (the proxy's verdict). Trace events only report a packet passing.
fn decides(f: &pb::Flow) -> bool {
    const DROP: i32 = 1;
    const POLICY_VERDICT: i32 = 5;
    f.l7.is_some()
        || f.event_type
            .as_ref()
            .is_some_and(|e| e.r#type == DROP || e.r#type == POLICY_VERDICT)
}

fn l4_name(f: &pb::Flow) -> (&'static str, u16, u16) {
    match f.l4.as_ref().and_then(|l| l.protocol.as_ref()) {
        Some(layer4::Protocol::Tcp(t)) => ("TCP", t.source_port as u16, t.destination_port as u16),
        Some(layer4::Protocol::Udp(u)) => ("UDP", u.source_port as u16, u.destination_port as u16),
        Some(layer4::Protocol::Sctp(s)) => {
            ("SCTP", s.source_port as u16, s.destination_port as u16)
        }
        Some(layer4::Protocol::IcmPv4(_)) => ("ICMPv4", 0, 0),
        Some(layer4::Protocol::IcmPv6(_)) => ("ICMPv6", 0, 0),
        _ => ("", 0, 0),
    }
}

fn l7_name(f: &pb::Flow) -> &'static str {
    match f.l7.as_ref().and_then(|l| l.record.as_ref()) {
        Some(layer7::Record::Http(_)) => "http",
        Some(layer7::Record::Dns(_)) => "dns",
        #[allow(deprecated)]
        Some(layer7::Record::Kafka(_)) => "kafka",
        None => "",
    }
}

fn label_value<'a>(labels: &'a [String], keys: &[&str]) -> Option<&'a str> {
    keys.iter().find_map(|k| {
        labels.iter().find_map(|l| {
            let l = l.split_once(':').map_or(l.as_str(), |(_, rest)| rest);
            l.strip_prefix(k)?.strip_prefix('=')
        })
    })
}

/// The map node an end of a flow belongs to: its pod's workload, else its
/// identity; reserved identities and learned names are nodes of their own.
fn node_of(ep: Option<&pb::Endpoint>, names: &[String], ip: &str) -> Node {
    let empty = pb::Endpoint::default();
    let ep = ep.unwrap_or(&empty);
    let reserved = |id: &str, label: &str, kind| Node {
        id: id.to_string(),
        label: label.to_string(),
        kind,
        namespace: String::new(),
        identity: ep.identity,
        labels: Vec::new(),
    };
    if !ep.namespace.is_empty() && !ep.pod_name.is_empty() {
        let (name, kind) = if let Some(w) = ep.workloads.first() {
            (w.name.clone(), "workload")
        } else if let Some(app) = label_value(
            &ep.labels,
            &["app.kubernetes.io/name", "k8s-app", "app", "name"],
        ) {
            (app.to_string(), "workload")
        } else {
            (format!("identity {}", ep.identity), "identity")
        };
        return Node {
            id: format!("{}/{name}", ep.namespace),
            label: name,
            kind,
            namespace: ep.namespace.clone(),
            identity: ep.identity,
            labels: ep.labels.clone(),
        };
    }
    match ep.identity {
        HOST => reserved("reserved:host", "host", "host"),
        REMOTE_NODE => reserved("reserved:remote-node", "remote-node", "remote-node"),
        KUBE_APISERVER => reserved(
            "reserved:kube-apiserver",
            "kube-apiserver",
            "kube-apiserver",
        ),
        id if id == WORLD || id >= LOCAL_SCOPE => match names.first() {
            Some(name) => reserved(&format!("dns:{name}"), name, "dns"),
            None if id >= LOCAL_SCOPE => {
                let cidr = ep
                    .labels
                    .iter()
                    .find_map(|l| l.strip_prefix("cidr:"))
                    .unwrap_or(ip);
                reserved(&format!("cidr:{cidr}"), cidr, "cidr")
            }
            None => reserved("reserved:world", "world", "world"),
        },
        0 => reserved(&format!("ip:{ip}"), ip, "unknown"),
        id => Node {
            id: format!("identity:{id}"),
            label: ep
                .labels
                .first()
                .cloned()
                .unwrap_or_else(|| format!("identity {id}")),
            kind: "identity",
            namespace: ep.namespace.clone(),
            identity: id,
            labels: ep.labels.clone(),
        },
    }
}

fn policy_name(p: &pb::Policy) -> String {
    let name = if p.namespace.is_empty() {
        p.name.clone()
    } else {
        format!("{}/{}", p.namespace, p.name)
    };
    let mut text = if p.kind.is_empty() {
        name
    } else {
        format!("{name} ({})", p.kind)
    };
    // The rule, where the agent says which (its policy labels).
    let label = |key: &str| {
        p.labels
            .iter()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
    };
    if let (Some(rule), Some(entry)) = (
        label("fibril:io.fibril.policy.rule"),
        label("fibril:io.fibril.policy.entry"),
    ) {
        text.push_str(&format!(" rule {rule} {entry}"));
    }
    text
}

fn bounded_insert(set: &mut BTreeSet<String>, value: &str) {
    if set.len() < DETAIL_MAX && !value.is_empty() {
        set.insert(value.to_string());
    }
}

impl Aggregate {
    pub fn new(window: Duration) -> Aggregate {
        let window_s = window.as_secs().max(1);
        let buckets = 60.min(window_s);
        Aggregate {
            width_s: window_s.div_ceil(buckets),
            buckets,
            nodes: HashMap::new(),
            edges: HashMap::new(),
            protocols: HashMap::new(),
            seen: 0,
        }
    }

    fn bucket(&self, unix_ns: u64) -> u64 {
        unix_ns / 1_000_000_000 / self.width_s
    }

    pub fn add(&mut self, f: &pb::Flow) {
        self.seen += 1;
        let unix_ns = f.time.as_ref().map_or(0, hubble::convert::unix_ns);
        let bucket = self.bucket(unix_ns);
        let (l4, sport, dport) = l4_name(f);
        let l7 = l7_name(f);
        self.protocols
            .entry((l4, l7))
            .or_default()
            .add(bucket, f.verdict);
        let l7_record = f.l7.as_ref();
        let response = l7_record.is_some_and(|l| l.r#type == pb::L7FlowType::Response as i32);
        if is_reply(f) && l7_record.is_none() {
            return;
        }
        let ip = f.ip.as_ref();
        let mut src = node_of(
            f.source.as_ref(),
            &f.source_names,
            ip.map_or("", |i| &i.source),
        );
        let mut dst = node_of(
            f.destination.as_ref(),
            &f.destination_names,
            ip.map_or("", |i| &i.destination),
        );
        let mut port = dport;
        // An L7 response goes server -> client: its edge is the request's.
        if response {
            std::mem::swap(&mut src, &mut dst);
            port = sport;
        }
        let key = EdgeKey {
            source: src.id.clone(),
            destination: dst.id.clone(),
            port,
            protocol: l4,
        };
        for n in [src, dst] {
            match self.nodes.get_mut(&n.id) {
                Some((_, last)) => *last = bucket.max(*last),
                None => {
                    self.nodes.insert(n.id.clone(), (n, bucket));
                }
            }
        }
        let edge = self.edges.entry(key).or_default();
        edge.last_bucket = edge.last_bucket.max(bucket);
        // The connection's packets count; its L7 records add detail only.
        if l7_record.is_none() || !response {
            edge.counts.add(bucket, f.verdict);
            if decides(f) {
                edge.decisions.add(bucket, f.verdict);
            }
        }
        if let Some(l) = l7_record {
            match &l.record {
                Some(layer7::Record::Http(h)) => {
                    if !response {
                        if edge.http_methods.len() < DETAIL_MAX
                            || edge.http_methods.contains_key(&h.method)
                        {
                            *edge.http_methods.entry(h.method.clone()).or_default() += 1;
                        }
                        let path = h.url.split_once("://").map_or(h.url.as_str(), |(_, rest)| {
                            rest.find('/').map_or("/", |i| &rest[i..])
                        });
                        bounded_insert(&mut edge.http_paths, path);
                    } else if h.code != 0
                        && (edge.http_status.len() < DETAIL_MAX
                            || edge.http_status.contains_key(&h.code))
                    {
                        *edge.http_status.entry(h.code).or_default() += 1;
                    }
                }
                Some(layer7::Record::Dns(d)) => bounded_insert(&mut edge.dns_names, &d.query),
                _ => {}
            }
            if response && l.latency_ns > 0 {
                edge.latency_sum_ns += l.latency_ns;
                edge.latency_count += 1;
                edge.latency_max_ns = edge.latency_max_ns.max(l.latency_ns);
            }
        }
        for p in f.egress_allowed_by.iter().chain(&f.ingress_allowed_by) {
            bounded_insert(&mut edge.allowed_by, &policy_name(p));
        }
        for p in f.egress_denied_by.iter().chain(&f.ingress_denied_by) {
            bounded_insert(&mut edge.denied_by, &policy_name(p));
        }
        let dropped = f.verdict == pb::Verdict::Dropped as i32;
        let denied_by_none = f.egress_denied_by.is_empty() && f.ingress_denied_by.is_empty();
        if dropped
            && f.drop_reason_desc == POLICY_DENIED
            && denied_by_none
            && edge.default_deny_at.len() < DETAIL_MAX
        {
            let ingress = f.traffic_direction == pb::TrafficDirection::Ingress as i32;
            let end = if ingress { &f.destination } else { &f.source };
            edge.default_deny_at
                .insert((end.as_ref().map_or(0, |e| e.identity), ingress));
        }
    }

    /// The map and breakdown of the last window at `now_ns`; forgets what
    /// fell out of it.
    pub fn snapshot(&mut self, now_ns: u64, selection: &Selection) -> Snapshot {
        let now = self.bucket(now_ns);
        let oldest = now.saturating_sub(self.buckets - 1);
        self.edges.retain(|_, e| {
            e.counts.prune(oldest);
            e.decisions.prune(oldest);
            e.last_bucket >= oldest
        });
        self.nodes.retain(|_, (_, last)| *last >= oldest);
        for b in self.protocols.values_mut() {
            b.prune(oldest);
        }
        self.protocols.retain(|_, b| !b.ring.is_empty());
        let recent_s = 10u64.max(self.width_s);
        let recent = now.saturating_sub(recent_s / self.width_s - 1);
        let mut rate = 0.0;
        let mut protocols: Vec<ProtocolView> = self
            .protocols
            .iter()
            .map(|(&(l4, l7), b)| {
                let r = b.sum_since(recent).total() as f64 / recent_s as f64;
                rate += r;
                ProtocolView {
                    l4,
                    l7,
                    counts: b.sum_since(oldest),
                    rate: r,
                }
            })
            .collect();
        protocols.sort_by_key(|p| std::cmp::Reverse(p.counts.total()));
        let mut edges: Vec<EdgeView> = self
            .edges
            .iter()
            .map(|(k, e)| {
                let counts = e.counts.sum_since(oldest);
                let decisions = e.decisions.sum_since(oldest);
                let colour = if decisions.total() > 0 {
                    decisions.colour()
                } else {
                    counts.colour()
                };
                EdgeView {
                    id: format!("{}>{}:{}/{}", k.source, k.destination, k.port, k.protocol),
                    source: k.source.clone(),
                    target: k.destination.clone(),
                    port: k.port,
                    protocol: k.protocol,
                    verdict: colour,
                    counts,
                    http_methods: e.http_methods.clone(),
                    http_status: e.http_status.clone(),
                    http_paths: e.http_paths.iter().cloned().collect(),
                    dns_names: e.dns_names.iter().cloned().collect(),
                    latency_ms: (e.latency_count > 0).then(|| {
                        (
                            e.latency_sum_ns as f64 / e.latency_count as f64 / 1e6,
                            e.latency_max_ns as f64 / 1e6,
                        )
                    }),
                    allowed_by: e.allowed_by.iter().cloned().collect(),
                    denied_by: e.denied_by.iter().cloned().collect(),
                    default_deny_by: (!e.default_deny_at.is_empty()).then(|| {
                        let names: BTreeSet<String> = e
                            .default_deny_at
                            .iter()
                            .flat_map(|&(id, ingress)| {
                                if ingress {
                                    selection.ingress(id)
                                } else {
                                    selection.egress(id)
                                }
                            })
                            .collect();
                        names.into_iter().collect()
                    }),
                }
            })
            .collect();
        edges.sort_by(|a, b| a.id.cmp(&b.id));
        let mut nodes: Vec<Node> = self.nodes.values().map(|(n, _)| n.clone()).collect();
        nodes.sort_by(|a, b| a.id.cmp(&b.id));
        Snapshot {
            window_s: self.width_s * self.buckets,
            seen: self.seen,
            rate,
            nodes,
            edges,
            protocols,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1_000_000_000;

    fn pod(ns: &str, name: &str, app: &str, identity: u32) -> pb::Endpoint {
        pb::Endpoint {
            identity,
            namespace: ns.into(),
            pod_name: name.into(),
            labels: vec![format!("k8s:app={app}")],
            ..Default::default()
        }
    }

    fn tcp(
        src: pb::Endpoint,
        dst: pb::Endpoint,
        port: u32,
        verdict: pb::Verdict,
        t: u64,
    ) -> pb::Flow {
        pb::Flow {
            time: Some(hubble::convert::timestamp(t)),
            verdict: verdict as i32,
            source: Some(src),
            destination: Some(dst),
            l4: Some(pb::Layer4 {
                protocol: Some(layer4::Protocol::Tcp(pb::Tcp {
                    source_port: 40000,
                    destination_port: port,
                    ..Default::default()
                })),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn edges_per_workload_port_and_protocol_with_verdict_colours() {
        let mut a = Aggregate::new(Duration::from_secs(60));
        let sel = Selection::default();
        let fe = pod("shop", "frontend-1", "frontend", 100);
        let fe2 = pod("shop", "frontend-2", "frontend", 100);
        let be = pod("shop", "backend-1", "backend", 200);
        let other = pod("shop", "other", "other", 300);
        a.add(&tcp(
            fe.clone(),
            be.clone(),
            8080,
            pb::Verdict::Forwarded,
            10 * SEC,
        ));
        a.add(&tcp(
            fe2,
            be.clone(),
            8080,
            pb::Verdict::Forwarded,
            10 * SEC,
        ));
        let mut drop = tcp(
            other.clone(),
            be.clone(),
            8080,
            pb::Verdict::Dropped,
            11 * SEC,
        );
        drop.drop_reason_desc = POLICY_DENIED;
        drop.traffic_direction = pb::TrafficDirection::Ingress as i32;
        a.add(&drop);
        let mut fwd = tcp(other, be, 8080, pb::Verdict::Forwarded, 12 * SEC);
        fwd.ingress_allowed_by = vec![pb::Policy {
            name: "allow".into(),
            namespace: "shop".into(),
            kind: "CiliumNetworkPolicy".into(),
            labels: vec![
                "fibril:io.fibril.policy.rule=0".into(),
                "fibril:io.fibril.policy.entry=ingress[1]".into(),
            ],
            ..Default::default()
        }];
        a.add(&fwd);
        let s = a.snapshot(12 * SEC, &sel);
        // The agents answer later: the same drops are then explained.
        let told = Selection::from(std::collections::HashMap::from([(
            200,
            (vec!["shop/backend-policy".to_string()], vec![]),
        )]));
        let later = a.snapshot(12 * SEC, &told);
        assert_eq!(
            later.edges[1].default_deny_by.as_deref(),
            Some(&["shop/backend-policy".to_string()][..])
        );
        assert_eq!(
            s.nodes.len(),
            3,
            "two frontend pods are one workload: {:?}",
            s.nodes
        );
        assert_eq!(s.edges.len(), 2);
        let green = &s.edges[0];
        assert_eq!(
            (green.source.as_str(), green.target.as_str()),
            ("shop/frontend", "shop/backend")
        );
        assert_eq!((green.counts.forwarded, green.verdict), (2, "forwarded"));
        let mixed = &s.edges[1];
        assert_eq!(mixed.verdict, "mixed");
        assert_eq!(
            mixed.allowed_by,
            ["shop/allow (CiliumNetworkPolicy) rule 0 ingress[1]"]
        );
        assert_eq!(mixed.default_deny_by.as_deref(), Some(&[][..]));
        assert_eq!(s.seen, 4);
    }

    #[test]
    fn a_drop_after_the_source_node_forwarded_is_red_not_mixed() {
        let mut a = Aggregate::new(Duration::from_secs(60));
        let sel = Selection::default();
        let (x, y) = (pod("a", "x", "x", 10), pod("a", "y", "y", 11));
        let event = |t| {
            Some(pb::CiliumEventType {
                r#type: t,
                sub_type: 0,
            })
        };
        // The source node's trace: forwarded into the overlay.
        let mut trace = tcp(x.clone(), y.clone(), 80, pb::Verdict::Forwarded, SEC);
        trace.event_type = event(4);
        a.add(&trace);
        let mut drop = tcp(x, y, 80, pb::Verdict::Dropped, SEC);
        drop.event_type = event(1);
        a.add(&drop);
        let s = a.snapshot(SEC, &sel);
        assert_eq!(s.edges[0].verdict, "dropped");
        assert_eq!(s.edges[0].counts.total(), 2, "both still count");
    }

    #[test]
    fn the_window_slides() {
        let mut a = Aggregate::new(Duration::from_secs(60));
        let sel = Selection::default();
        let (x, y) = (pod("a", "x", "x", 10), pod("a", "y", "y", 11));
        a.add(&tcp(
            x.clone(),
            y.clone(),
            80,
            pb::Verdict::Forwarded,
            100 * SEC,
        ));
        a.add(&tcp(x, y, 80, pb::Verdict::Dropped, 150 * SEC));
        let s = a.snapshot(155 * SEC, &sel);
        assert_eq!(s.edges[0].counts.total(), 2);
        assert_eq!(s.edges[0].verdict, "mixed");
        let s = a.snapshot(200 * SEC, &sel);
        assert_eq!(s.edges[0].counts.dropped, 1);
        assert_eq!(s.edges[0].counts.forwarded, 0, "the first flow fell out");
        assert_eq!(s.edges[0].verdict, "dropped");
        let s = a.snapshot(300 * SEC, &sel);
        assert!(s.edges.is_empty() && s.nodes.is_empty());
    }

    #[test]
    fn l7_responses_count_on_the_request_edge_with_status_and_latency() {
        let mut a = Aggregate::new(Duration::from_secs(60));
        let sel = Selection::default();
        let (c, s) = (pod("a", "c", "client", 10), pod("a", "s", "server", 11));
        let http = |src: &pb::Endpoint, dst: &pb::Endpoint, t, code, latency_ns| {
            let mut f = tcp(src.clone(), dst.clone(), 8080, pb::Verdict::Forwarded, t);
            if code != 0 {
                f.l4 = Some(pb::Layer4 {
                    protocol: Some(layer4::Protocol::Tcp(pb::Tcp {
                        source_port: 8080,
                        destination_port: 40000,
                        ..Default::default()
                    })),
                });
            }
            f.l7 = Some(pb::Layer7 {
                r#type: if code == 0 {
                    pb::L7FlowType::Request
                } else {
                    pb::L7FlowType::Response
                } as i32,
                latency_ns,
                record: Some(layer7::Record::Http(pb::Http {
                    code,
                    method: "GET".into(),
                    url: "http://s:8080/api/items?x=1".into(),
                    ..Default::default()
                })),
            });
            f
        };
        a.add(&http(&c, &s, SEC, 0, 0));
        a.add(&http(&s, &c, SEC, 200, 3_000_000));
        a.add(&http(&s, &c, SEC, 404, 1_000_000));
        let snap = a.snapshot(SEC, &sel);
        assert_eq!(snap.edges.len(), 1, "{:?}", snap.edges);
        let e = &snap.edges[0];
        assert_eq!((e.source.as_str(), e.port), ("a/client", 8080));
        assert_eq!(e.http_methods.get("GET"), Some(&1));
        assert_eq!(e.http_status.len(), 2);
        assert_eq!(e.http_paths, ["/api/items?x=1"]);
        assert_eq!(e.latency_ms, Some((2.0, 3.0)));
        assert_eq!(snap.protocols[0].l7, "http");
        assert_eq!(snap.protocols[0].counts.forwarded, 3);
    }

    #[test]
    fn reserved_identities_and_learned_names_are_their_own_nodes() {
        let world = pb::Endpoint {
            identity: WORLD,
            labels: vec!["reserved:world".into()],
            ..Default::default()
        };
        let n = node_of(Some(&world), &["api.example.com".into()], "203.0.113.9");
        assert_eq!((n.id.as_str(), n.kind), ("dns:api.example.com", "dns"));
        assert_eq!(
            node_of(Some(&world), &[], "203.0.113.9").id,
            "reserved:world"
        );
        let host = pb::Endpoint {
            identity: HOST,
            ..Default::default()
        };
        assert_eq!(node_of(Some(&host), &[], "").kind, "host");
        let bare = pod("a", "lonely", "", 77);
        let bare = pb::Endpoint {
            labels: vec!["k8s:io.kubernetes.pod.namespace=a".into()],
            ..bare
        };
        assert_eq!(node_of(Some(&bare), &[], "").id, "a/identity 77");
    }
}
