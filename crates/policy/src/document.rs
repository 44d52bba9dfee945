//! Policy documents (YAML) -> validated model. Every document of an input is
//! checked before anything is returned, so a bad input changes nothing.
//! CiliumNetworkPolicy and CiliumClusterwideNetworkPolicy are read here;
//! Kubernetes NetworkPolicy is translated in `knp.rs`.

use std::collections::BTreeMap;

use ipnet::IpNet;
use serde::Deserialize;
use serde_json::Value;

use crate::labels::{split_source, NAMESPACE_LABEL, NAMESPACE_LABELS_PREFIX};
use crate::model::{
    Entity, FqdnSelector, HeaderMatch, HttpRule, Icmp, KafkaRule, Peer, PeerRule, Policy,
    PolicyKind, Port, PortRule, PortSpec, Protocol, Rule, L7,
};
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

/// Something that loads but will not do what its author may expect.
pub type Warning = Error;

/// What a file held.
#[derive(Clone, Debug, Default)]
pub struct Parsed {
    pub policies: Vec<Policy>,
    /// Documents of other kinds, skipped: (document index, kind).
    pub skipped: Vec<(usize, String)>,
    pub warnings: Vec<Warning>,
}

/// Cilium's limit on ports in one `toPorts` entry.
const MAX_PORTS: usize = 40;
/// Annotation that puts a policy in audit mode.
pub const AUDIT_ANNOTATION: &str = "policy.fibril.io/audit-mode";

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDoc {
    #[serde(rename = "apiVersion")]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    metadata: RawMeta,
    spec: Option<RawRule>,
    specs: Option<Vec<RawRule>>,
    #[allow(dead_code)]
    status: Option<Value>,
    /// Not part of the CRD (it belongs in spec); some upstream examples
    /// carry it. Loaded with a warning, as the API server prunes it.
    description: Option<Value>,
}

#[derive(Deserialize)]
pub(crate) struct RawMeta {
    pub(crate) name: Option<String>,
    pub(crate) namespace: Option<String>,
    #[serde(default)]
    pub(crate) annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    #[serde(rename = "endpointSelector")]
    endpoint_selector: Option<Selector>,
    #[serde(rename = "nodeSelector")]
    node_selector: Option<Selector>,
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
    enable_default_deny: Option<RawDefaultDeny>,
    #[allow(dead_code)]
    log: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDefaultDeny {
    ingress: Option<bool>,
    egress: Option<bool>,
}

/// An ingress or egress rule; `from*` and `to*` peers share one shape, the
/// direction decides which spelling is legal.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawPeerRule {
    #[serde(rename = "fromEndpoints")]
    from_endpoints: Option<Vec<Selector>>,
    #[serde(rename = "toEndpoints")]
    to_endpoints: Option<Vec<Selector>>,
    #[serde(rename = "toPorts")]
    to_ports: Option<Vec<RawPortRule>>,
    #[serde(rename = "fromCIDR")]
    from_cidr: Option<Vec<String>>,
    #[serde(rename = "fromCIDRSet")]
    from_cidr_set: Option<Vec<RawCidrSet>>,
    #[serde(rename = "fromEntities")]
    from_entities: Option<Vec<String>>,
    #[serde(rename = "fromRequires")]
    from_requires: Option<Vec<Selector>>,
    #[serde(rename = "fromGroups")]
    from_groups: Option<Vec<Value>>,
    #[serde(rename = "fromNodes")]
    from_nodes: Option<Vec<Selector>>,
    #[serde(rename = "toCIDR")]
    to_cidr: Option<Vec<String>>,
    #[serde(rename = "toCIDRSet")]
    to_cidr_set: Option<Vec<RawCidrSet>>,
    #[serde(rename = "toEntities")]
    to_entities: Option<Vec<String>>,
    #[serde(rename = "toRequires")]
    to_requires: Option<Vec<Selector>>,
    #[serde(rename = "toServices")]
    to_services: Option<Vec<Value>>,
    #[serde(rename = "toFQDNs")]
    to_fqdns: Option<Vec<RawFqdn>>,
    #[serde(rename = "toGroups")]
    to_groups: Option<Vec<Value>>,
    #[serde(rename = "toNodes")]
    to_nodes: Option<Vec<Selector>>,
    icmps: Option<Vec<RawIcmpRule>>,
    authentication: Option<RawAuth>,
    /// The mutual-auth field of Cilium 1.13 (`auth: {type: spire|null}`).
    auth: Option<RawLegacyAuth>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLegacyAuth {
    #[serde(rename = "type")]
    auth_type: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCidrSet {
    cidr: Option<String>,
    #[serde(default)]
    except: Vec<String>,
    #[serde(rename = "cidrGroupRef")]
    cidr_group_ref: Option<String>,
    #[serde(rename = "cidrGroupSelector")]
    cidr_group_selector: Option<Selector>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFqdn {
    #[serde(rename = "matchName")]
    match_name: Option<String>,
    #[serde(rename = "matchPattern")]
    match_pattern: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIcmpRule {
    fields: Vec<RawIcmpField>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIcmpField {
    family: Option<String>,
    #[serde(rename = "type")]
    icmp_type: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAuth {
    mode: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPortRule {
    ports: Option<Vec<RawPort>>,
    rules: Option<RawL7>,
    #[serde(rename = "terminatingTLS")]
    terminating_tls: Option<Value>,
    #[serde(rename = "originatingTLS")]
    originating_tls: Option<Value>,
    #[serde(rename = "serverNames")]
    server_names: Option<Vec<String>>,
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawL7 {
    http: Option<Vec<RawHttp>>,
    kafka: Option<Vec<RawKafka>>,
    dns: Option<Vec<RawFqdn>>,
    l7proto: Option<String>,
    l7: Option<Vec<BTreeMap<String, String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    method: Option<String>,
    path: Option<String>,
    host: Option<String>,
    #[serde(default)]
    headers: Vec<String>,
    #[serde(rename = "headerMatches", default)]
    header_matches: Vec<RawHeaderMatch>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeaderMatch {
    name: String,
    value: Option<String>,
    secret: Option<RawSecret>,
    mismatch: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSecret {
    namespace: Option<String>,
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKafka {
    role: Option<String>,
    #[serde(rename = "apiKey")]
    api_key: Option<String>,
    #[serde(rename = "apiVersion")]
    api_version: Option<String>,
    #[serde(rename = "clientID")]
    client_id: Option<String>,
    topic: Option<String>,
}

pub(crate) struct Ctx<'a> {
    pub(crate) file: &'a str,
    pub(crate) document: usize,
    pub(crate) warnings: std::cell::RefCell<Vec<Warning>>,
}

impl Ctx<'_> {
    pub(crate) fn err(&self, path: impl Into<String>, message: impl Into<String>) -> Error {
        Error {
            file: self.file.into(),
            document: self.document,
            path: path.into(),
            message: message.into(),
        }
    }

    pub(crate) fn warn(&self, path: impl Into<String>, message: impl Into<String>) {
        let w = self.err(path, message);
        self.warnings.borrow_mut().push(w);
    }
}

const POLICY_KINDS: [&str; 3] = [
    "CiliumNetworkPolicy",
    "CiliumClusterwideNetworkPolicy",
    "NetworkPolicy",
];

/// What went wrong reading the YAML. The parser's budget (nodes, depth,
/// aliases: what keeps a hostile file from exhausting memory) is a limit,
/// not a syntax error, and says so with the way round it.
fn yaml_error(e: &serde_saphyr::Error) -> String {
    use serde_saphyr::budget::BudgetBreach;
    let mut inner = e;
    while let serde_saphyr::Error::WithSnippet { error, .. } = inner {
        inner = error;
    }
    let serde_saphyr::Error::Budget { breach, location } = inner else {
        return format!("not valid YAML: {e}");
    };
    let at = format!("line {}", location.line());
    let limit = serde_saphyr::Budget::default();
    match breach {
        BudgetBreach::Nodes { .. } => format!(
            "too large: more than {} YAML nodes (reached at {at}); split the policies into several files or imports (about 10,000 rules each)",
            limit.max_nodes
        ),
        BudgetBreach::Depth { .. } => format!(
            "nested deeper than {} levels (at {at}); no policy needs that",
            limit.max_depth
        ),
        other => format!("exceeds the YAML parser's limits ({other:?} at {at}); split the file"),
    }
}

/// Parses every YAML document of `text` (named `file` in errors).
/// `default_namespace` is used for namespaced policies without one.
pub fn parse(file: &str, text: &str, default_namespace: &str) -> Result<Parsed, Error> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(text).map_err(|e| Error {
        file: file.into(),
        document: 0,
        path: "(yaml)".into(),
        message: yaml_error(&e),
    })?;
    let mut parsed = Parsed::default();
    for (i, doc) in docs.into_iter().enumerate() {
        let ctx = Ctx {
            file,
            document: i + 1,
            warnings: Default::default(),
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
        let policy = parse_kind(&ctx, &kind, doc, default_namespace)?;
        parsed.policies.push(policy);
        parsed.warnings.extend(ctx.warnings.into_inner());
    }
    warn_fqdn_without_dns(file, &mut parsed);
    Ok(parsed)
}

fn parse_kind(
    ctx: &Ctx<'_>,
    kind: &str,
    doc: Value,
    default_namespace: &str,
) -> Result<Policy, Error> {
    if kind == "NetworkPolicy" {
        crate::knp::parse_document(ctx, doc, default_namespace)
    } else {
        parse_document(ctx, doc, default_namespace)
    }
}

/// One policy object as the Kubernetes API serves it (JSON, with the
/// server's metadata and status), named `name` in errors; its warnings.
pub fn parse_object(name: &str, object: Value) -> Result<(Policy, Vec<Warning>), Error> {
    let ctx = Ctx {
        file: name,
        document: 1,
        warnings: Default::default(),
    };
    let kind = object
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let policy = parse_kind(&ctx, &kind, object, "default")?;
    Ok((policy, ctx.warnings.into_inner()))
}

/// toFQDNs only ever matches IPs the DNS proxy saw: without an egress DNS
/// rule for the same endpoints, nothing is learned (Cilium issue #44504).
fn warn_fqdn_without_dns(file: &str, parsed: &mut Parsed) {
    let has_dns = parsed.policies.iter().flat_map(|p| &p.rules).any(|r| {
        r.egress
            .iter()
            .flatten()
            .any(|pr| pr.l7().any(|l| matches!(l, L7::Dns(_))))
    });
    if has_dns {
        return;
    }
    for (i, p) in parsed.policies.iter().enumerate() {
        let uses_fqdn = p.rules.iter().any(|r| {
            r.egress.iter().flatten().any(|pr| {
                pr.peers
                    .iter()
                    .flatten()
                    .any(|peer| matches!(peer, Peer::Fqdn(_)))
            })
        });
        if uses_fqdn {
            parsed.warnings.push(Error {
                file: file.into(),
                document: i + 1,
                path: "spec.egress".into(),
                message: format!(
                    "{} uses toFQDNs, but no egress rule in this file sends DNS (port 53) through the DNS proxy with rules.dns; unless another policy does, no name is ever learned and toFQDNs matches nothing",
                    p.key()
                ),
            });
        }
    }
}

pub(crate) fn deserialize<T: serde::de::DeserializeOwned>(
    ctx: &Ctx<'_>,
    doc: Value,
) -> Result<T, Error> {
    serde_path_to_error::deserialize(doc).map_err(|e| {
        let path = e.path().to_string();
        ctx.err(
            if path == "." {
                "(document)".into()
            } else {
                path
            },
            e.into_inner().to_string(),
        )
    })
}

pub(crate) fn policy_name(ctx: &Ctx<'_>, meta: &RawMeta) -> Result<String, Error> {
    let name = meta
        .name
        .clone()
        .filter(|n| !n.is_empty())
        .ok_or_else(|| ctx.err("metadata.name", "a policy needs a name"))?;
    validate_dns_name(&name).map_err(|m| ctx.err("metadata.name", m))?;
    Ok(name)
}

/// The policy's namespace (a DNS label), or `default_namespace`.
pub(crate) fn policy_namespace(
    ctx: &Ctx<'_>,
    meta: &RawMeta,
    default_namespace: &str,
) -> Result<String, Error> {
    let ns = meta
        .namespace
        .clone()
        .unwrap_or_else(|| default_namespace.to_string());
    let ok = !ns.is_empty()
        && ns.len() <= 63
        && ns
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && ns.starts_with(|c: char| c.is_ascii_alphanumeric())
        && ns.ends_with(|c: char| c.is_ascii_alphanumeric());
    if !ok {
        return Err(ctx.err(
            "metadata.namespace",
            format!("{ns:?} is not a valid namespace (a DNS label)"),
        ));
    }
    Ok(ns)
}

pub(crate) fn audit_mode(ctx: &Ctx<'_>, meta: &RawMeta) -> Result<bool, Error> {
    match meta.annotations.get(AUDIT_ANNOTATION).map(String::as_str) {
        None | Some("false") => Ok(false),
        Some("true") => Ok(true),
        Some(other) => Err(ctx.err(
            format!("metadata.annotations.{AUDIT_ANNOTATION}"),
            format!("expected \"true\" or \"false\", found {other:?}"),
        )),
    }
}

fn parse_document(ctx: &Ctx<'_>, doc: Value, default_namespace: &str) -> Result<Policy, Error> {
    if !doc.is_object() {
        return Err(ctx.err(
            "(document)",
            "expected a mapping with apiVersion, kind, metadata and spec",
        ));
    }
    let kind = match doc.get("kind").and_then(Value::as_str) {
        Some("CiliumClusterwideNetworkPolicy") => PolicyKind::Ccnp,
        Some("CiliumNetworkPolicy") => PolicyKind::Cnp,
        _ => return Err(ctx.err("kind", format!("expected one of {POLICY_KINDS:?}"))),
    };
    let raw: RawDoc = deserialize(ctx, doc)?;
    if raw.api_version != "cilium.io/v2" {
        return Err(ctx.err(
            "apiVersion",
            format!("expected \"cilium.io/v2\", found {:?}", raw.api_version),
        ));
    }
    if raw.description.is_some() {
        ctx.warn("description", "a top-level description is not part of the policy (it belongs in spec.description); ignored");
    }
    let name = policy_name(ctx, &raw.metadata)?;
    let audit = audit_mode(ctx, &raw.metadata)?;
    let namespace = match kind {
        PolicyKind::Ccnp => {
            if raw.metadata.namespace.is_some() {
                return Err(ctx.err(
                    "metadata.namespace",
                    "a cluster-wide policy has no namespace",
                ));
            }
            None
        }
        _ => Some(policy_namespace(ctx, &raw.metadata, default_namespace)?),
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
        audit,
    })
}

fn convert_rule(
    ctx: &Ctx<'_>,
    path: &str,
    r: RawRule,
    kind: PolicyKind,
    namespace: Option<&str>,
) -> Result<Rule, Error> {
    // A rule selects pods (endpointSelector) or nodes (nodeSelector: a
    // host policy, enforced on the nodes' own traffic), never both.
    let (mut selector, host, field) = match (r.endpoint_selector, r.node_selector) {
        (Some(_), Some(_)) => {
            return Err(ctx.err(
                format!("{path}.nodeSelector"),
                "a rule has an endpointSelector or a nodeSelector, not both",
            ))
        }
        (Some(s), None) => (s, false, "endpointSelector"),
        (None, Some(s)) => (s, true, "nodeSelector"),
        (None, None) => {
            return Err(ctx.err(
                format!("{path}.endpointSelector"),
                "a rule needs an endpointSelector (pods) or a nodeSelector (nodes)",
            ))
        }
    };
    validate_selector(ctx, &format!("{path}.{field}"), &selector)?;
    if host && namespace.is_some() {
        return Err(ctx.err(
            format!("{path}.nodeSelector"),
            "host policies (nodeSelector) must be CiliumClusterwideNetworkPolicy: nodes belong to no namespace",
        ));
    }
    if let Some(ns) = namespace {
        // A namespaced policy only ever selects pods of its own namespace.
        if selector
            .match_labels
            .iter()
            .any(|(k, v)| split_source(k).1 == NAMESPACE_LABEL && v != ns)
        {
            ctx.warn(
                format!("{path}.endpointSelector"),
                format!("a namespaced policy only selects pods of its namespace {ns:?}; the other namespace is ignored"),
            );
        }
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
    // Cilium: a rule selects an endpoint for a direction when it has a
    // non-empty section for it.
    let join = |a: Option<Vec<PeerRule>>, b: Option<Vec<PeerRule>>| {
        let all: Vec<PeerRule> = a.into_iter().chain(b).flatten().collect();
        (!all.is_empty()).then_some(all)
    };
    let dd = r.enable_default_deny.as_ref();
    if host {
        refuse_host_l7(ctx, path, [&ingress, &ingress_deny, &egress, &egress_deny])?;
    }
    Ok(Rule {
        selector,
        host,
        ingress: join(ingress, ingress_deny),
        egress: join(egress, egress_deny),
        ingress_default_deny: dd.and_then(|d| d.ingress).unwrap_or(true),
        egress_default_deny: dd.and_then(|d| d.egress).unwrap_or(true),
        description: r.description.unwrap_or_default(),
    })
}

/// Host policies take L3/L4 rules only: the node's own traffic is never
/// handed to a proxy (Cilium's host policies allow DNS rules as a beta;
/// Fibril does not proxy the host's DNS), so L7 rules and toFQDNs, which
/// learn from that proxy, would never match as written.
fn refuse_host_l7(
    ctx: &Ctx<'_>,
    path: &str,
    sections: [&Option<Vec<PeerRule>>; 4],
) -> Result<(), Error> {
    let names = ["ingress", "ingressDeny", "egress", "egressDeny"];
    for (name, list) in names.iter().zip(sections) {
        for (i, pr) in list.iter().flatten().enumerate() {
            if let Some(j) = pr.to_ports.iter().position(|p| p.l7.is_some()) {
                return Err(ctx.err(
                    format!("{path}.{name}[{i}].toPorts[{j}].rules"),
                    "host policies (nodeSelector) take no L7 rules: the node's own traffic is not proxied",
                ));
            }
            if pr
                .peers
                .iter()
                .flatten()
                .any(|p| matches!(p, Peer::Fqdn(_)))
            {
                return Err(ctx.err(
                    format!("{path}.{name}[{i}].toFQDNs"),
                    "host policies (nodeSelector) take no toFQDNs: the node's own DNS is not proxied, so no name would be learned",
                ));
            }
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn convert_peer_rule(
    ctx: &Ctx<'_>,
    path: &str,
    p: RawPeerRule,
    ingress: bool,
    deny: bool,
    kind: PolicyKind,
    namespace: Option<&str>,
) -> Result<PeerRule, Error> {
    let from_fields: [(&str, bool); 7] = [
        ("fromEndpoints", p.from_endpoints.is_some()),
        ("fromCIDR", p.from_cidr.is_some()),
        ("fromCIDRSet", p.from_cidr_set.is_some()),
        ("fromEntities", p.from_entities.is_some()),
        ("fromRequires", p.from_requires.is_some()),
        ("fromGroups", p.from_groups.is_some()),
        ("fromNodes", p.from_nodes.is_some()),
    ];
    let to_fields: [(&str, bool); 9] = [
        ("toEndpoints", p.to_endpoints.is_some()),
        ("toCIDR", p.to_cidr.is_some()),
        ("toCIDRSet", p.to_cidr_set.is_some()),
        ("toEntities", p.to_entities.is_some()),
        ("toRequires", p.to_requires.is_some()),
        ("toGroups", p.to_groups.is_some()),
        ("toNodes", p.to_nodes.is_some()),
        ("toServices", p.to_services.is_some()),
        ("toFQDNs", p.to_fqdns.is_some()),
    ];
    let (wrong, right_prefix) = if ingress {
        (&to_fields[..], "from")
    } else {
        (&from_fields[..], "to")
    };
    if let Some((field, _)) = wrong.iter().find(|(_, set)| *set) {
        let direction = if ingress { "an ingress" } else { "an egress" };
        return Err(ctx.err(
            format!("{path}.{field}"),
            format!("not allowed in {direction} rule; use the {right_prefix}* spelling"),
        ));
    }
    if deny && p.to_fqdns.is_some() {
        return Err(ctx.err(
            format!("{path}.toFQDNs"),
            "deny rules do not support toFQDNs",
        ));
    }
    // Cilium: one kind of L3 peer per rule.
    let l3: Vec<&str> = if ingress {
        &from_fields[..]
    } else {
        &to_fields[..]
    }
    .iter()
    .filter(|(name, set)| *set && !name.ends_with("Requires"))
    .map(|(name, _)| *name)
    .collect();
    if l3.len() > 1 {
        return Err(ctx.err(
            path,
            format!("combining {} and {} is not supported yet", l3[0], l3[1]),
        ));
    }

    let prefix = if ingress { "from" } else { "to" };
    let mut peers: Option<Vec<Peer>> = None;
    let mut add = |v: Vec<Peer>| peers.get_or_insert_with(Vec::new).extend(v);
    let endpoints = if ingress {
        p.from_endpoints
    } else {
        p.to_endpoints
    };
    if let Some(list) = endpoints {
        let mut out = Vec::new();
        for (i, mut s) in list.into_iter().enumerate() {
            validate_selector(ctx, &format!("{path}.{prefix}Endpoints[{i}]"), &s)?;
            inject_peer_namespace(&mut s, kind, namespace);
            out.push(Peer::Endpoints(s));
        }
        add(out);
    }
    if let Some(list) = if ingress {
        p.from_entities
    } else {
        p.to_entities
    } {
        let mut out = Vec::new();
        for (i, e) in list.iter().enumerate() {
            let entity = Entity::parse(e).ok_or_else(|| {
                ctx.err(
                    format!("{path}.{prefix}Entities[{i}]"),
                    format!("unknown entity {e:?}: expected one of {:?}", Entity::NAMES),
                )
            })?;
            out.push(Peer::Entity(entity));
        }
        add(out);
    }
    if let Some(list) = if ingress { p.from_cidr } else { p.to_cidr } {
        let mut out = Vec::new();
        for (i, c) in list.iter().enumerate() {
            out.push(Peer::Cidr {
                prefix: parse_cidr(c)
                    .map_err(|m| ctx.err(format!("{path}.{prefix}CIDR[{i}]"), m))?,
                except: vec![],
            });
        }
        add(out);
    }
    if let Some(list) = if ingress {
        p.from_cidr_set
    } else {
        p.to_cidr_set
    } {
        let mut out = Vec::new();
        for (i, set) in list.into_iter().enumerate() {
            let spath = format!("{path}.{prefix}CIDRSet[{i}]");
            out.push(convert_cidr_set(ctx, &spath, set)?);
        }
        add(out);
    }
    if let Some(list) = if ingress { p.from_groups } else { p.to_groups } {
        ctx.warn(
            format!("{path}.{prefix}Groups"),
            "cloud provider groups are not resolved on this node: the rule selects no peer",
        );
        add(list
            .iter()
            .map(|_| Peer::Unresolved("cloud provider group".into()))
            .collect());
    }
    if let Some(list) = if ingress { p.from_nodes } else { p.to_nodes } {
        for (i, s) in list.iter().enumerate() {
            validate_selector(ctx, &format!("{path}.{prefix}Nodes[{i}]"), s)?;
        }
        ctx.warn(format!("{path}.{prefix}Nodes"), "node selectors need node labels (policy-cidr-match-mode=nodes); the rule selects no peer");
        add(list
            .iter()
            .map(|_| Peer::Unresolved("node selector".into()))
            .collect());
    }
    if let Some(list) = p.to_services {
        ctx.warn(
            format!("{path}.toServices"),
            "no Kubernetes services exist on this node: the rule selects no peer",
        );
        add(list
            .iter()
            .map(|_| Peer::Unresolved("service".into()))
            .collect());
    }
    if let Some(list) = p.to_fqdns {
        let mut out = Vec::new();
        for (i, f) in list.into_iter().enumerate() {
            out.push(Peer::Fqdn(convert_fqdn(
                ctx,
                &format!("{path}.toFQDNs[{i}]"),
                f,
            )?));
        }
        add(out);
    }
    let requires = if ingress {
        p.from_requires
    } else {
        p.to_requires
    };
    let mut requires = requires.unwrap_or_default();
    for (i, s) in requires.iter_mut().enumerate() {
        validate_selector(ctx, &format!("{path}.{prefix}Requires[{i}]"), s)?;
        inject_peer_namespace(s, kind, namespace);
    }
    if !requires.is_empty() {
        ctx.warn(
            format!("{path}.{prefix}Requires"),
            format!("{prefix}Requires is deprecated (removed in Cilium 1.19); it is still enforced here"),
        );
    }

    let mut icmps = Vec::new();
    for (i, r) in p.icmps.into_iter().flatten().enumerate() {
        for (j, f) in r.fields.into_iter().enumerate() {
            icmps.push(convert_icmp(
                ctx,
                &format!("{path}.icmps[{i}].fields[{j}]"),
                f,
            )?);
        }
    }
    if !icmps.is_empty() && p.to_ports.is_some() {
        return Err(ctx.err(
            format!("{path}.icmps"),
            "icmps and toPorts cannot both be set in one rule",
        ));
    }

    let legacy = match p.auth.as_ref().map(|a| a.auth_type.as_str()) {
        None => None,
        Some("null") => Some("disabled"),
        Some("spire") => Some("required"),
        Some(other) => {
            return Err(ctx.err(
                format!("{path}.auth.type"),
                format!("expected spire or null, found {other:?}"),
            ));
        }
    };
    if legacy.is_some() {
        ctx.warn(
            format!("{path}.auth"),
            "auth is the Cilium 1.13 spelling of authentication.mode; read as such",
        );
    }
    let mode = p
        .authentication
        .as_ref()
        .map(|a| a.mode.as_str())
        .or(legacy);
    let auth_required = match mode {
        None | Some("disabled") => false,
        Some("required") | Some("test-always-fail") => {
            ctx.warn(
                format!("{path}.authentication.mode"),
                "mutual authentication is not available on this node: this rule allows nothing",
            );
            true
        }
        Some(other) => {
            return Err(ctx.err(
                format!("{path}.authentication.mode"),
                format!("expected one of disabled, required, test-always-fail, found {other:?}"),
            ))
        }
    };

    let mut to_ports: Vec<PortRule> = Vec::new();
    for (i, pr) in p.to_ports.into_iter().flatten().enumerate() {
        let ppath = format!("{path}.toPorts[{i}]");
        let these = pr.ports.unwrap_or_default();
        if these.len() > MAX_PORTS {
            return Err(ctx.err(
                format!("{ppath}.ports"),
                format!(
                    "at most {MAX_PORTS} ports per toPorts entry, found {}",
                    these.len()
                ),
            ));
        }
        let mut converted = Vec::new();
        for (j, port) in these.into_iter().enumerate() {
            converted.push(convert_port(ctx, &format!("{ppath}.ports[{j}]"), port)?);
        }
        for (field, set, what) in [
            (
                "terminatingTLS",
                pr.terminating_tls.is_some(),
                "TLS interception",
            ),
            (
                "originatingTLS",
                pr.originating_tls.is_some(),
                "TLS origination",
            ),
            ("serverNames", pr.server_names.is_some(), "TLS SNI matching"),
            ("listener", pr.listener.is_some(), "Envoy listeners"),
        ] {
            if set {
                if deny {
                    return Err(ctx.err(
                        format!("{ppath}.{field}"),
                        "deny rules support L3 and L4 only",
                    ));
                }
                ctx.warn(format!("{ppath}.{field}"), format!("{what} needs the L7 proxy, which is not available yet: only the L4 part is enforced"));
            }
        }
        let mut l7 = None;
        if let Some(rules) = pr.rules {
            if deny {
                return Err(ctx.err(
                    format!("{ppath}.rules"),
                    "deny rules support L3 and L4 only (no L7 rules)",
                ));
            }
            l7 = convert_l7(ctx, &format!("{ppath}.rules"), rules, &converted)?;
        }
        // Rules of two kinds on one port: no proxy could apply both
        // (Cilium refuses such policies too).
        if let Some(kind) = l7.as_ref().map(L7::kind) {
            let clash = to_ports.iter().find(|t| {
                t.l7.as_ref().is_some_and(|l| l.kind() != kind)
                    && (t.ports.is_empty()
                        || converted.is_empty()
                        || t.ports.iter().any(|p| converted.contains(p)))
            });
            if let Some(other) = clash.and_then(|t| t.l7.as_ref()) {
                return Err(ctx.err(
                    format!("{ppath}.rules"),
                    format!(
                        "{} and {kind} rules in one rule cannot share ports",
                        other.kind()
                    ),
                ));
            }
        }
        to_ports.push(PortRule {
            ports: converted,
            l7,
        });
    }
    let kinds: std::collections::BTreeSet<&str> = to_ports
        .iter()
        .filter_map(|t| t.l7.as_ref().map(L7::kind))
        .filter(|k| *k != "http" && *k != "dns")
        .collect();
    for kind in kinds {
        ctx.warn(
            path,
            format!("{kind} rules are parsed, but Fibril's proxy enforces only http and dns rules so far: only the L4 part is enforced"),
        );
    }
    Ok(PeerRule {
        peers,
        requires,
        to_ports,
        icmps,
        deny,
        auth_required,
    })
}

fn convert_l7(
    ctx: &Ctx<'_>,
    path: &str,
    r: RawL7,
    ports: &[PortSpec],
) -> Result<Option<L7>, Error> {
    let set: Vec<&str> = [
        ("http", r.http.is_some()),
        ("kafka", r.kafka.is_some()),
        ("dns", r.dns.is_some()),
        ("l7proto", r.l7proto.is_some()),
    ]
    .iter()
    .filter(|(_, s)| *s)
    .map(|(n, _)| *n)
    .collect();
    if set.len() > 1 {
        return Err(ctx.err(
            path,
            format!(
                "rules may hold one of http, kafka, dns or l7proto, found {}",
                set.join(" and ")
            ),
        ));
    }
    if r.l7.is_some() && r.l7proto.is_none() {
        return Err(ctx.err(format!("{path}.l7"), "l7 rules need l7proto"));
    }
    let tcp_only = |kind: &str| -> Result<(), Error> {
        for p in ports {
            match p.protocol {
                Protocol::Udp | Protocol::Sctp | Protocol::Vrrp | Protocol::Igmp => {
                    return Err(ctx.err(path, format!("{kind} rules only apply to TCP; this port is {:?}", p.protocol)))
                }
                Protocol::Any => ctx.warn(path, format!("{kind} rules only apply to TCP; UDP and SCTP on this port are allowed at L4")),
                Protocol::Tcp => {}
            }
        }
        Ok(())
    };
    if let Some(list) = r.http {
        tcp_only("HTTP")?;
        let mut out = Vec::new();
        for (i, h) in list.into_iter().enumerate() {
            let hpath = format!("{path}.http[{i}]");
            for (field, re) in [("method", &h.method), ("path", &h.path), ("host", &h.host)] {
                if let Some(re) = re {
                    regex::Regex::new(&format!("^(?:{re})$")).map_err(|e| {
                        ctx.err(
                            format!("{hpath}.{field}"),
                            format!("not a valid regular expression: {e}"),
                        )
                    })?;
                }
            }
            for (j, hdr) in h.headers.iter().enumerate() {
                if hdr.trim().is_empty() {
                    return Err(ctx.err(format!("{hpath}.headers[{j}]"), "empty header"));
                }
            }
            let mut header_matches = Vec::new();
            for (j, m) in h.header_matches.into_iter().enumerate() {
                if m.name.is_empty() {
                    return Err(ctx.err(
                        format!("{hpath}.headerMatches[{j}].name"),
                        "empty header name",
                    ));
                }
                if let Some(mm) = &m.mismatch {
                    if !["LOG", "ADD", "DELETE", "REPLACE"].contains(&mm.as_str()) {
                        return Err(ctx.err(
                            format!("{hpath}.headerMatches[{j}].mismatch"),
                            format!("expected one of LOG, ADD, DELETE, REPLACE, found {mm:?}"),
                        ));
                    }
                }
                header_matches.push(HeaderMatch {
                    name: m.name,
                    value: m.value,
                    secret: m
                        .secret
                        .map(|s| format!("{}/{}", s.namespace.unwrap_or_default(), s.name)),
                    mismatch: m.mismatch,
                });
            }
            out.push(HttpRule {
                method: h.method,
                path: h.path,
                host: h.host,
                headers: h.headers,
                header_matches,
            });
        }
        return Ok(Some(L7::Http(out)));
    }
    if let Some(list) = r.kafka {
        tcp_only("Kafka")?;
        let mut out = Vec::new();
        for (i, k) in list.into_iter().enumerate() {
            let kpath = format!("{path}.kafka[{i}]");
            if k.role.is_some() && k.api_key.is_some() {
                return Err(ctx.err(&kpath, "role and apiKey cannot both be set"));
            }
            if let Some(key) = k.api_key.as_deref().filter(|k| !k.is_empty()) {
                if crate::model::kafka_api_key(key).is_none() {
                    return Err(ctx.err(
                        format!("{kpath}.apiKey"),
                        format!(
                            "{key:?} is not a Kafka API key (one of {})",
                            crate::model::KAFKA_API_KEYS.join(", ")
                        ),
                    ));
                }
            }
            if let Some(v) = k.api_version.as_deref().filter(|v| !v.is_empty()) {
                if v.parse::<i16>().ok().filter(|v| *v >= 0).is_none() {
                    return Err(ctx.err(
                        format!("{kpath}.apiVersion"),
                        format!("{v:?} is not a Kafka API version (0 to 32767)"),
                    ));
                }
            }
            if let Some(role) = &k.role {
                if !["produce", "consume"].contains(&role.to_lowercase().as_str()) {
                    return Err(ctx.err(
                        format!("{kpath}.role"),
                        format!("expected produce or consume, found {role:?}"),
                    ));
                }
            }
            if let Some(t) = &k.topic {
                if t.len() > 249
                    || !t
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
                {
                    return Err(ctx.err(
                        format!("{kpath}.topic"),
                        format!("topic {t:?} must be at most 249 characters of [a-zA-Z0-9._-]"),
                    ));
                }
            }
            out.push(KafkaRule {
                role: k.role,
                api_key: k.api_key,
                api_version: k.api_version,
                client_id: k.client_id,
                topic: k.topic,
            });
        }
        return Ok(Some(L7::Kafka(out)));
    }
    if let Some(list) = r.dns {
        for p in ports {
            if let Port::Range(a, b) = p.port {
                if a != b {
                    return Err(ctx.err(path, "DNS rules do not support port ranges"));
                }
            }
        }
        let mut out = Vec::new();
        for (i, f) in list.into_iter().enumerate() {
            out.push(convert_fqdn(ctx, &format!("{path}.dns[{i}]"), f)?);
        }
        return Ok(Some(L7::Dns(out)));
    }
    if let Some(proto) = r.l7proto {
        return Ok(Some(L7::Generic {
            proto,
            rules: r.l7.unwrap_or_default(),
        }));
    }
    Ok(None)
}

fn convert_fqdn(ctx: &Ctx<'_>, path: &str, f: RawFqdn) -> Result<FqdnSelector, Error> {
    match (f.match_name, f.match_pattern) {
        (Some(n), None) => {
            let ok = !n.is_empty()
                && n.len() <= 255
                && n.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c));
            if !ok {
                return Err(ctx.err(
                    format!("{path}.matchName"),
                    format!("{n:?} is not a DNS name"),
                ));
            }
            Ok(FqdnSelector::MatchName(n.to_lowercase()))
        }
        (None, Some(p)) => {
            let ok = !p.is_empty()
                && p.len() <= 255
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-._*".contains(c));
            if !ok {
                return Err(ctx.err(
                    format!("{path}.matchPattern"),
                    format!("{p:?} may only hold letters, digits, '-', '.', '_' and '*'"),
                ));
            }
            Ok(FqdnSelector::MatchPattern(p.to_lowercase()))
        }
        (Some(_), Some(_)) => Err(ctx.err(path, "give matchName or matchPattern, not both")),
        (None, None) => Err(ctx.err(path, "needs matchName or matchPattern")),
    }
}

fn convert_cidr_set(ctx: &Ctx<'_>, path: &str, set: RawCidrSet) -> Result<Peer, Error> {
    let sources = [
        set.cidr.is_some(),
        set.cidr_group_ref.is_some(),
        set.cidr_group_selector.is_some(),
    ];
    if sources.iter().filter(|s| **s).count() != 1 {
        return Err(ctx.err(
            path,
            "needs exactly one of cidr, cidrGroupRef or cidrGroupSelector",
        ));
    }
    // `except` is checked whatever the base is.
    let mut except = Vec::new();
    for (i, e) in set.except.iter().enumerate() {
        except.push(parse_cidr(e).map_err(|m| ctx.err(format!("{path}.except[{i}]"), m))?);
    }
    if let Some(group) = set.cidr_group_ref {
        ctx.warn(
            format!("{path}.cidrGroupRef"),
            format!("CiliumCIDRGroup {group:?} is not supported yet: the entry selects no peer"),
        );
        return Ok(Peer::Unresolved(format!("CiliumCIDRGroup {group}")));
    }
    if set.cidr_group_selector.is_some() {
        ctx.warn(
            format!("{path}.cidrGroupSelector"),
            "CiliumCIDRGroup selection is not supported yet: the entry selects no peer",
        );
        return Ok(Peer::Unresolved("CiliumCIDRGroup selector".into()));
    }
    let cidr = set.cidr.unwrap_or_default();
    let prefix = parse_cidr(&cidr).map_err(|m| ctx.err(format!("{path}.cidr"), m))?;
    for (i, ex) in except.iter().enumerate() {
        if !prefix.contains(ex) {
            return Err(ctx.err(
                format!("{path}.except[{i}]"),
                format!("{ex} is not inside {prefix}"),
            ));
        }
    }
    Ok(Peer::Cidr { prefix, except })
}

/// `10.0.0.0/8`, `2001:db8::/32`, or a bare address (a host prefix).
pub(crate) fn parse_cidr(s: &str) -> Result<IpNet, String> {
    if let Ok(net) = s.parse::<IpNet>() {
        return Ok(net.trunc());
    }
    if let Ok(addr) = s.parse::<std::net::IpAddr>() {
        return Ok(IpNet::from(addr));
    }
    Err(format!("{s:?} is not a CIDR (a.b.c.d/n or an IPv6 prefix)"))
}

fn convert_icmp(ctx: &Ctx<'_>, path: &str, f: RawIcmpField) -> Result<Icmp, Error> {
    let ipv6 = match f.family.as_deref() {
        None | Some("IPv4") => false,
        Some("IPv6") => true,
        Some(other) => {
            return Err(ctx.err(
                format!("{path}.family"),
                format!("expected IPv4 or IPv6, found {other:?}"),
            ))
        }
    };
    let tpath = format!("{path}.type");
    let icmp_type = match &f.icmp_type {
        Value::Number(n) => n
            .as_u64()
            .filter(|n| *n <= 255)
            .ok_or_else(|| ctx.err(&tpath, format!("ICMP type {n} is out of range 0-255")))?
            as u8,
        Value::String(s) => match s.parse::<u64>() {
            Ok(n) if n <= 255 => n as u8,
            Ok(n) => return Err(ctx.err(&tpath, format!("ICMP type {n} is out of range 0-255"))),
            Err(_) => icmp_type_by_name(s, ipv6).ok_or_else(|| {
                ctx.err(
                    &tpath,
                    format!(
                        "unknown ICMP{} type name {s:?}",
                        if ipv6 { "v6" } else { "v4" }
                    ),
                )
            })?,
        },
        other => {
            return Err(ctx.err(
                &tpath,
                format!("expected a number or a type name, found {other}"),
            ))
        }
    };
    Ok(Icmp { ipv6, icmp_type })
}

/// Cilium's CamelCase ICMP type names.
fn icmp_type_by_name(name: &str, ipv6: bool) -> Option<u8> {
    let v4: &[(&str, u8)] = &[
        ("EchoReply", 0),
        ("DestinationUnreachable", 3),
        ("Redirect", 5),
        ("Echo", 8),
        ("EchoRequest", 8),
        ("RouterAdvertisement", 9),
        ("RouterSelection", 10),
        ("TimeExceeded", 11),
        ("ParameterProblem", 12),
        ("Timestamp", 13),
        ("TimestampReply", 14),
        ("Photuris", 40),
        ("ExtendedEchoRequest", 42),
        ("ExtendedEchoReply", 43),
    ];
    let v6: &[(&str, u8)] = &[
        ("DestinationUnreachable", 1),
        ("PacketTooBig", 2),
        ("TimeExceeded", 3),
        ("ParameterProblem", 4),
        ("EchoRequest", 128),
        ("EchoReply", 129),
        ("MulticastListenerQuery", 130),
        ("MulticastListenerReport", 131),
        ("MulticastListenerDone", 132),
        ("RouterSolicitation", 133),
        ("RouterAdvertisement", 134),
        ("NeighborSolicitation", 135),
        ("NeighborAdvertisement", 136),
        ("RedirectMessage", 137),
        ("RouterRenumbering", 138),
        ("ICMPNodeInformationQuery", 139),
        ("ICMPNodeInformationResponse", 140),
        ("InverseNeighborDiscoverySolicitation", 141),
        ("InverseNeighborDiscoveryAdvertisement", 142),
        ("HomeAgentAddressDiscoveryRequest", 144),
        ("HomeAgentAddressDiscoveryReply", 145),
        ("MobilePrefixSolicitation", 146),
        ("MobilePrefixAdvertisement", 147),
        ("DuplicateAddressRequestCodeSuffix", 157),
        ("DuplicateAddressConfirmationCodeSuffix", 158),
        ("ExtendedEchoRequest", 160),
        ("ExtendedEchoReply", 161),
    ];
    let table = if ipv6 { v6 } else { v4 };
    table.iter().find(|(n, _)| *n == name).map(|(_, t)| *t)
}

/// Cilium's namespace injection for peer selectors (semantics §3.4).
pub(crate) fn inject_peer_namespace(s: &mut Selector, kind: PolicyKind, namespace: Option<&str>) {
    if s.mentions_key(NAMESPACE_LABEL) || s.mentions_key_prefix(NAMESPACE_LABELS_PREFIX) {
        return;
    }
    let selects_reserved = s.match_labels.keys().any(|k| k.starts_with("reserved:"))
        || s.match_expressions
            .iter()
            .any(|r| r.key.starts_with("reserved:"));
    match (kind, namespace) {
        (PolicyKind::Cnp | PolicyKind::Knp, Some(ns)) if !selects_reserved => {
            s.match_labels
                .insert(format!("k8s:{NAMESPACE_LABEL}"), ns.to_string());
        }
        _ if selects_reserved => {}
        _ => s.match_expressions.push(Requirement {
            key: format!("k8s:{NAMESPACE_LABEL}"),
            operator: Operator::Exists,
            values: vec![],
        }),
    }
}

pub(crate) fn validate_selector(ctx: &Ctx<'_>, path: &str, s: &Selector) -> Result<(), Error> {
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
        validate_selector_key(&r.key).map_err(|m| ctx.err(format!("{rpath}.key"), m))?;
        for (j, v) in r.values.iter().enumerate() {
            crate::labels::validate_label_value(v)
                .map_err(|m| ctx.err(format!("{rpath}.values[{j}]"), m))?;
        }
    }
    for (k, v) in &s.match_labels {
        validate_selector_key(k).map_err(|m| ctx.err(format!("{path}.matchLabels"), m))?;
        crate::labels::validate_label_value(v)
            .map_err(|m| ctx.err(format!("{path}.matchLabels.{k}"), m))?;
    }
    Ok(())
}

/// A selector key: an optional source prefix (`k8s:`) and a Kubernetes
/// label key.
fn validate_selector_key(key: &str) -> Result<(), String> {
    if key.is_empty() {
        return Err("empty key".into());
    }
    crate::labels::validate_label_key(split_source(key).1)
}

/// A `ports[]` entry of a CNP (protocol defaults to ANY).
fn convert_port(ctx: &Ctx<'_>, path: &str, p: RawPort) -> Result<PortSpec, Error> {
    let protocol = match p.protocol.as_deref() {
        None | Some("") => Protocol::Any,
        Some(name) => Protocol::from_k8s_name(name).ok_or_else(|| {
            ctx.err(
                format!("{path}.protocol"),
                format!("expected one of TCP, UDP, SCTP, VRRP, IGMP, ANY, found {name:?}"),
            )
        })?,
    };
    let port = port_value(ctx, path, p.port.as_ref(), p.end_port, true)?;
    if !protocol.has_ports() && port != Port::Any {
        return Err(ctx.err(
            format!("{path}.port"),
            format!(
                "{} has no ports: leave port out (or \"0\")",
                protocol.k8s_name()
            ),
        ));
    }
    Ok(PortSpec { protocol, port })
}

/// A port number or name, with an optional `endPort`. `zero_is_any`: Cilium
/// reads port "0" as every port.
pub(crate) fn port_value(
    ctx: &Ctx<'_>,
    path: &str,
    port: Option<&Value>,
    end: Option<i64>,
    zero_is_any: bool,
) -> Result<Port, Error> {
    let port_path = format!("{path}.port");
    let start: u16 = match port {
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
                if end.is_some() {
                    ctx.warn(
                        format!("{path}.endPort"),
                        "endPort is ignored with a named port",
                    );
                }
                return Ok(Port::Named(s.clone()));
            }
        },
        Some(other) => {
            return Err(ctx.err(
                &port_path,
                format!("expected a port number or name, found {other}"),
            ))
        }
    };
    if start == 0 && !zero_is_any && port.is_some() {
        return Err(ctx.err(&port_path, "port 0 is not a valid port"));
    }
    match end {
        None if start == 0 => Ok(Port::Any),
        None => Ok(Port::Range(start, start)),
        Some(e) if (1..=65535).contains(&e) && start != 0 && e as u16 >= start => {
            Ok(Port::Range(start, e as u16))
        }
        Some(e) => Err(ctx.err(
            format!("{path}.endPort"),
            format!("endPort {e} must be within {start}..=65535 and needs a non-zero port"),
        )),
    }
}

/// IANA service names, as Kubernetes checks container port names.
fn validate_port_name(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 15
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && s.chars().any(|c| c.is_ascii_lowercase())
        && !s.starts_with('-')
        && !s.ends_with('-')
        && !s.contains("--");
    if ok {
        Ok(())
    } else {
        Err(format!("{s:?} is neither a port number (0-65535) nor a valid port name (at most 15 lowercase letters, digits and '-')"))
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
