//! Policy documents (YAML) -> validated model. Every document of an input is
//! checked before anything is returned, so a bad input changes nothing.

use serde::Deserialize;
use serde_json::Value;

use crate::labels::{split_source, NAMESPACE_LABEL, NAMESPACE_LABELS_PREFIX};
use crate::model::{PeerRule, Policy, PolicyKind, PortRange, Protocol, Rule};
use crate::selector::{Operator, Requirement, Selector};

/// A precise complaint about one input: file, document, field path, rule.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{file}: document {document}: {path}: {message}")]
pub struct Error {
    pub file: String,
    /// 1-based index of the YAML document in the file.
    pub document: usize,
    /// Field path inside the document, e.g. `spec.ingress[0].toPorts[0].ports[0].port`.
    pub path: String,
    pub message: String,
}

/// What a file held.
#[derive(Clone, Debug, Default)]
pub struct Parsed {
    pub policies: Vec<Policy>,
    /// Documents of other kinds, skipped: (document index, kind).
    pub skipped: Vec<(usize, String)>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDoc {
    #[serde(rename = "apiVersion")]
    api_version: String,
    kind: String,
    metadata: RawMeta,
    spec: Option<RawRule>,
    specs: Option<Vec<RawRule>>,
    #[allow(dead_code)]
    status: Option<Value>,
}

#[derive(Deserialize)]
struct RawMeta {
    name: Option<String>,
    namespace: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    #[serde(rename = "endpointSelector")]
    endpoint_selector: Option<Selector>,
    #[serde(rename = "nodeSelector")]
    node_selector: Option<Value>,
    ingress: Option<Vec<RawPeerRule>>,
    #[serde(rename = "ingressDeny")]
    ingress_deny: Option<Vec<RawPeerRule>>,
    egress: Option<Vec<RawPeerRule>>,
    #[serde(rename = "egressDeny")]
    egress_deny: Option<Vec<RawPeerRule>>,
    #[allow(dead_code)]
    labels: Option<Value>,
    description: Option<String>,
    #[serde(rename = "enableDefaultDeny")]
    enable_default_deny: Option<Value>,
    log: Option<Value>,
}

/// An ingress or egress rule; `from*` and `to*` peers share one shape, the
/// direction decides which spelling is legal.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPeerRule {
    #[serde(rename = "fromEndpoints")]
    from_endpoints: Option<Vec<Selector>>,
    #[serde(rename = "toEndpoints")]
    to_endpoints: Option<Vec<Selector>>,
    #[serde(rename = "toPorts")]
    to_ports: Option<Vec<RawPortRule>>,
    #[serde(rename = "fromCIDR")]
    from_cidr: Option<Value>,
    #[serde(rename = "fromCIDRSet")]
    from_cidr_set: Option<Value>,
    #[serde(rename = "fromEntities")]
    from_entities: Option<Value>,
    #[serde(rename = "fromRequires")]
    from_requires: Option<Value>,
    #[serde(rename = "fromGroups")]
    from_groups: Option<Value>,
    #[serde(rename = "fromNodes")]
    from_nodes: Option<Value>,
    #[serde(rename = "toCIDR")]
    to_cidr: Option<Value>,
    #[serde(rename = "toCIDRSet")]
    to_cidr_set: Option<Value>,
    #[serde(rename = "toEntities")]
    to_entities: Option<Value>,
    #[serde(rename = "toRequires")]
    to_requires: Option<Value>,
    #[serde(rename = "toServices")]
    to_services: Option<Value>,
    #[serde(rename = "toFQDNs")]
    to_fqdns: Option<Value>,
    #[serde(rename = "toGroups")]
    to_groups: Option<Value>,
    #[serde(rename = "toNodes")]
    to_nodes: Option<Value>,
    icmps: Option<Value>,
    authentication: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPortRule {
    ports: Option<Vec<RawPort>>,
    rules: Option<Value>,
    #[serde(rename = "terminatingTLS")]
    terminating_tls: Option<Value>,
    #[serde(rename = "originatingTLS")]
    originating_tls: Option<Value>,
    #[serde(rename = "serverNames")]
    server_names: Option<Value>,
    listener: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPort {
    port: Option<Value>,
    #[serde(rename = "endPort")]
    end_port: Option<i64>,
    protocol: Option<String>,
}

struct Ctx<'a> {
    file: &'a str,
    document: usize,
}

impl Ctx<'_> {
    fn err(&self, path: impl Into<String>, message: impl Into<String>) -> Error {
        Error {
            file: self.file.into(),
            document: self.document,
            path: path.into(),
            message: message.into(),
        }
    }
}

const POLICY_KINDS: [&str; 3] = [
    "CiliumNetworkPolicy",
    "CiliumClusterwideNetworkPolicy",
    "NetworkPolicy",
];

/// Parses every YAML document of `text` (named `file` in errors).
/// `default_namespace` is used for namespaced policies without one.
pub fn parse(file: &str, text: &str, default_namespace: &str) -> Result<Parsed, Error> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(text).map_err(|e| Error {
        file: file.into(),
        document: 0,
        path: "(yaml)".into(),
        message: format!("not valid YAML: {e}"),
    })?;
    let mut parsed = Parsed::default();
    for (i, doc) in docs.into_iter().enumerate() {
        let ctx = Ctx {
            file,
            document: i + 1,
        };
        if doc.is_null() {
            continue;
        }
        let kind = doc
            .get("kind")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string();
        if !kind.is_empty() && !POLICY_KINDS.contains(&kind.as_str()) {
            parsed.skipped.push((i + 1, kind));
            continue;
        }
        parsed
            .policies
            .push(parse_document(&ctx, doc, default_namespace)?);
    }
    Ok(parsed)
}

fn parse_document(ctx: &Ctx<'_>, doc: Value, default_namespace: &str) -> Result<Policy, Error> {
    if !doc.is_object() {
        return Err(ctx.err(
            "(document)",
            "expected a mapping with apiVersion, kind, metadata and spec",
        ));
    }
    let raw: RawDoc = serde_path_to_error::deserialize(doc).map_err(|e| {
        let path = e.path().to_string();
        ctx.err(
            if path == "." {
                "(document)".into()
            } else {
                path
            },
            e.into_inner().to_string(),
        )
    })?;
    let kind = match raw.kind.as_str() {
        "CiliumNetworkPolicy" => PolicyKind::Cnp,
        "CiliumClusterwideNetworkPolicy" => PolicyKind::Ccnp,
        "NetworkPolicy" => {
            return Err(ctx.err("kind", "Kubernetes NetworkPolicy is not supported yet"));
        }
        other => {
            return Err(ctx.err(
                "kind",
                format!("expected one of {POLICY_KINDS:?}, found {other:?}"),
            ))
        }
    };
    if raw.api_version != "cilium.io/v2" {
        return Err(ctx.err(
            "apiVersion",
            format!("expected \"cilium.io/v2\", found {:?}", raw.api_version),
        ));
    }
    let name = raw
        .metadata
        .name
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ctx.err("metadata.name", "a policy needs a name"))?;
    validate_dns_name(&name).map_err(|m| ctx.err("metadata.name", m))?;
    let namespace = match kind {
        PolicyKind::Cnp => Some(
            raw.metadata
                .namespace
                .unwrap_or_else(|| default_namespace.to_string()),
        ),
        PolicyKind::Ccnp => {
            if raw.metadata.namespace.is_some() {
                return Err(ctx.err(
                    "metadata.namespace",
                    "a cluster-wide policy has no namespace",
                ));
            }
            None
        }
    };
    let raw_rules: Vec<(String, RawRule)> = match (raw.spec, raw.specs) {
        (Some(_), Some(_)) => return Err(ctx.err("spec", "give either spec or specs, not both")),
        (Some(r), None) => vec![("spec".into(), r)],
        (None, Some(rs)) if !rs.is_empty() => rs
            .into_iter()
            .enumerate()
            .map(|(i, r)| (format!("specs[{i}]"), r))
            .collect(),
        _ => return Err(ctx.err("spec", "a policy needs spec or specs")),
    };
    let mut rules = Vec::new();
    for (path, r) in raw_rules {
        rules.push(convert_rule(ctx, &path, r, kind, namespace.as_deref())?);
    }
    Ok(Policy {
        kind,
        name,
        namespace,
        rules,
    })
}

fn unsupported(ctx: &Ctx<'_>, path: &str, present: &[(&str, bool)]) -> Result<(), Error> {
    if let Some((field, _)) = present.iter().find(|(_, p)| *p) {
        return Err(ctx.err(
            format!("{path}.{field}"),
            format!("{field} is not supported yet"),
        ));
    }
    Ok(())
}

fn convert_rule(
    ctx: &Ctx<'_>,
    path: &str,
    r: RawRule,
    kind: PolicyKind,
    namespace: Option<&str>,
) -> Result<Rule, Error> {
    unsupported(
        ctx,
        path,
        &[
            ("nodeSelector", r.node_selector.is_some()),
            ("enableDefaultDeny", r.enable_default_deny.is_some()),
            ("log", r.log.is_some()),
        ],
    )?;
    let mut selector = r.endpoint_selector.ok_or_else(|| {
        ctx.err(
            format!("{path}.endpointSelector"),
            "a rule needs an endpointSelector",
        )
    })?;
    validate_selector(ctx, &format!("{path}.endpointSelector"), &selector)?;
    if let Some(ns) = namespace {
        // A namespaced policy only ever selects pods of its own namespace.
        selector
            .match_labels
            .retain(|k, _| split_source(k).1 != NAMESPACE_LABEL);
        selector
            .match_labels
            .insert(format!("k8s:{NAMESPACE_LABEL}"), ns.to_string());
    }
    let peer_rules = |list: Option<Vec<RawPeerRule>>, field: &str, ingress: bool, deny: bool| {
        list.map(|l| {
            l.into_iter()
                .enumerate()
                .map(|(i, p)| {
                    convert_peer_rule(
                        ctx,
                        &format!("{path}.{field}[{i}]"),
                        p,
                        ingress,
                        deny,
                        kind,
                        namespace,
                    )
                })
                .collect::<Result<Vec<_>, _>>()
        })
        .transpose()
    };
    let ingress = peer_rules(r.ingress, "ingress", true, false)?;
    let ingress_deny = peer_rules(r.ingress_deny, "ingressDeny", true, true)?;
    let egress = peer_rules(r.egress, "egress", false, false)?;
    let egress_deny = peer_rules(r.egress_deny, "egressDeny", false, true)?;
    let join = |a: Option<Vec<PeerRule>>, b: Option<Vec<PeerRule>>| match (a, b) {
        (None, None) => None,
        (a, b) => Some(a.into_iter().chain(b).flatten().collect::<Vec<_>>()),
    };
    Ok(Rule {
        selector,
        ingress: join(ingress, ingress_deny),
        egress: join(egress, egress_deny),
        description: r.description.unwrap_or_default(),
    })
}

fn convert_peer_rule(
    ctx: &Ctx<'_>,
    path: &str,
    p: RawPeerRule,
    ingress: bool,
    deny: bool,
    kind: PolicyKind,
    namespace: Option<&str>,
) -> Result<PeerRule, Error> {
    let (wrong, right) = if ingress {
        (p.to_endpoints.is_some(), "fromEndpoints")
    } else {
        (p.from_endpoints.is_some(), "toEndpoints")
    };
    if wrong {
        let field = if ingress {
            "toEndpoints"
        } else {
            "fromEndpoints"
        };
        return Err(ctx.err(
            format!("{path}.{field}"),
            format!("not allowed in this direction; use {right}"),
        ));
    }
    if ingress
        && (p.to_cidr.is_some()
            || p.to_cidr_set.is_some()
            || p.to_entities.is_some()
            || p.to_requires.is_some()
            || p.to_services.is_some()
            || p.to_fqdns.is_some()
            || p.to_groups.is_some()
            || p.to_nodes.is_some())
    {
        return Err(ctx.err(path, "to* peer fields are not allowed in an ingress rule"));
    }
    if !ingress
        && (p.from_cidr.is_some()
            || p.from_cidr_set.is_some()
            || p.from_entities.is_some()
            || p.from_requires.is_some()
            || p.from_groups.is_some()
            || p.from_nodes.is_some())
    {
        return Err(ctx.err(path, "from* peer fields are not allowed in an egress rule"));
    }
    let prefix = if ingress { "from" } else { "to" };
    unsupported(
        ctx,
        path,
        &[
            (
                &format!("{prefix}CIDR"),
                p.from_cidr.is_some() || p.to_cidr.is_some(),
            ),
            (
                &format!("{prefix}CIDRSet"),
                p.from_cidr_set.is_some() || p.to_cidr_set.is_some(),
            ),
            (
                &format!("{prefix}Entities"),
                p.from_entities.is_some() || p.to_entities.is_some(),
            ),
            (
                &format!("{prefix}Requires"),
                p.from_requires.is_some() || p.to_requires.is_some(),
            ),
            (
                &format!("{prefix}Groups"),
                p.from_groups.is_some() || p.to_groups.is_some(),
            ),
            (
                &format!("{prefix}Nodes"),
                p.from_nodes.is_some() || p.to_nodes.is_some(),
            ),
            ("toServices", p.to_services.is_some()),
            ("toFQDNs", p.to_fqdns.is_some()),
            ("icmps", p.icmps.is_some()),
            ("authentication", p.authentication.is_some()),
        ],
    )?;
    let field = format!("{prefix}Endpoints");
    let peers = match if ingress {
        p.from_endpoints
    } else {
        p.to_endpoints
    } {
        None => None,
        Some(list) => {
            let mut out = Vec::new();
            for (i, mut s) in list.into_iter().enumerate() {
                validate_selector(ctx, &format!("{path}.{field}[{i}]"), &s)?;
                inject_peer_namespace(&mut s, kind, namespace);
                out.push(s);
            }
            Some(out)
        }
    };
    let mut ports = Vec::new();
    for (i, pr) in p.to_ports.into_iter().flatten().enumerate() {
        let ppath = format!("{path}.toPorts[{i}]");
        unsupported(
            ctx,
            &ppath,
            &[
                ("rules", pr.rules.is_some()),
                ("terminatingTLS", pr.terminating_tls.is_some()),
                ("originatingTLS", pr.originating_tls.is_some()),
                ("serverNames", pr.server_names.is_some()),
                ("listener", pr.listener.is_some()),
            ],
        )?;
        for (j, port) in pr.ports.into_iter().flatten().enumerate() {
            ports.push(convert_port(ctx, &format!("{ppath}.ports[{j}]"), port)?);
        }
    }
    Ok(PeerRule { peers, ports, deny })
}

/// Cilium's namespace injection for peer selectors (semantics §3.4).
fn inject_peer_namespace(s: &mut Selector, kind: PolicyKind, namespace: Option<&str>) {
    if s.mentions_key(NAMESPACE_LABEL) || s.mentions_key_prefix(NAMESPACE_LABELS_PREFIX) {
        return;
    }
    match (kind, namespace) {
        (PolicyKind::Cnp, Some(ns)) => {
            s.match_labels
                .insert(format!("k8s:{NAMESPACE_LABEL}"), ns.to_string());
        }
        _ => {
            let selects_init = s.match_labels.keys().any(|k| k == "reserved:init");
            if !selects_init {
                s.match_expressions.push(Requirement {
                    key: format!("k8s:{NAMESPACE_LABEL}"),
                    operator: Operator::Exists,
                    values: vec![],
                });
            }
        }
    }
}

fn validate_selector(ctx: &Ctx<'_>, path: &str, s: &Selector) -> Result<(), Error> {
    for (i, r) in s.match_expressions.iter().enumerate() {
        let rpath = format!("{path}.matchExpressions[{i}]");
        match r.operator {
            Operator::In | Operator::NotIn if r.values.is_empty() => {
                return Err(ctx.err(
                    format!("{rpath}.values"),
                    format!("operator {:?} needs at least one value", r.operator),
                ));
            }
            Operator::Exists | Operator::DoesNotExist if !r.values.is_empty() => {
                return Err(ctx.err(
                    format!("{rpath}.values"),
                    format!("operator {:?} takes no values", r.operator),
                ));
            }
            _ => {}
        }
        if r.key.is_empty() {
            return Err(ctx.err(format!("{rpath}.key"), "empty key"));
        }
    }
    if let Some(k) = s.match_labels.keys().find(|k| k.is_empty()) {
        return Err(ctx.err(format!("{path}.matchLabels"), format!("empty key {k:?}")));
    }
    Ok(())
}

fn convert_port(ctx: &Ctx<'_>, path: &str, p: RawPort) -> Result<PortRange, Error> {
    let protocol = match p.protocol.as_deref() {
        None | Some("ANY") | Some("") => Protocol::Any,
        Some("TCP") => Protocol::Tcp,
        Some("UDP") => Protocol::Udp,
        Some("SCTP") => Protocol::Sctp,
        Some(other) => {
            return Err(ctx.err(
                format!("{path}.protocol"),
                format!("expected one of TCP, UDP, SCTP, ANY, found {other:?}"),
            ))
        }
    };
    let port_path = format!("{path}.port");
    let start: u16 = match &p.port {
        None => 0,
        Some(Value::Number(n)) => n
            .as_u64()
            .filter(|n| *n <= 65535)
            .ok_or_else(|| ctx.err(&port_path, format!("port {n} is out of range 0-65535")))?
            as u16,
        Some(Value::String(s)) => match s.parse::<i64>() {
            Ok(n) if (0..=65535).contains(&n) => n as u16,
            Ok(n) => return Err(ctx.err(&port_path, format!("port {n} is out of range 0-65535"))),
            Err(_) => {
                validate_port_name(s).map_err(|m| ctx.err(&port_path, m))?;
                return Err(ctx.err(&port_path, format!("named port {s:?} is not supported yet")));
            }
        },
        Some(other) => {
            return Err(ctx.err(
                &port_path,
                format!("expected a port number or name, found {other}"),
            ))
        }
    };
    let end = match p.end_port {
        None => start,
        Some(e) if (1..=65535).contains(&e) && start != 0 && e as u16 >= start => e as u16,
        Some(e) => {
            return Err(ctx.err(
                format!("{path}.endPort"),
                format!("endPort {e} must be within {start}..=65535 and needs a non-zero port"),
            ))
        }
    };
    Ok(PortRange {
        protocol,
        start,
        end,
    })
}

fn validate_port_name(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 15
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && s.chars().any(|c| c.is_ascii_lowercase());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is neither a port number (0-65535) nor a valid port name"
        ))
    }
}

fn validate_dns_name(s: &str) -> Result<(), String> {
    let ok = s.len() <= 253
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && s.chars().last().is_some_and(|c| c.is_ascii_alphanumeric());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{s:?} is not a valid name (lowercase letters, digits, '-' and '.')"
        ))
    }
}
