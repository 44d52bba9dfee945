//! Kubernetes NetworkPolicy (`networking.k8s.io/v1`) -> the policy model,
//! with Cilium's translation rules (semantics §3.11).

use serde::Deserialize;
use serde_json::Value;

use crate::document::{
    audit_mode, deserialize, inject_peer_namespace, parse_cidr, policy_name, policy_namespace,
    port_value, validate_selector, Ctx, Error, RawMeta,
};
use crate::labels::{split_source, NAMESPACE_LABEL, NAMESPACE_LABELS_PREFIX};
use crate::model::{
    Entity, Peer, PeerRule, Policy, PolicyKind, Port, PortRule, PortSpec, Protocol, Rule,
};
use crate::selector::{Operator, Requirement, Selector};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNp {
    #[serde(rename = "apiVersion")]
    api_version: String,
    #[allow(dead_code)]
    kind: String,
    metadata: RawMeta,
    spec: RawSpec,
    #[allow(dead_code)]
    status: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    #[serde(rename = "podSelector")]
    pod_selector: Option<Selector>,
    #[serde(rename = "policyTypes")]
    policy_types: Option<Vec<String>>,
    ingress: Option<Vec<RawNpRule>>,
    egress: Option<Vec<RawNpRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNpRule {
    from: Option<Vec<RawNpPeer>>,
    to: Option<Vec<RawNpPeer>>,
    ports: Option<Vec<RawNpPort>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNpPeer {
    #[serde(rename = "podSelector")]
    pod_selector: Option<Selector>,
    #[serde(rename = "namespaceSelector")]
    namespace_selector: Option<Selector>,
    #[serde(rename = "ipBlock")]
    ip_block: Option<RawIpBlock>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIpBlock {
    cidr: String,
    #[serde(default)]
    except: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNpPort {
    protocol: Option<String>,
    port: Option<Value>,
    #[serde(rename = "endPort")]
    end_port: Option<i64>,
}

pub(crate) fn parse_document(
    ctx: &Ctx<'_>,
    doc: Value,
    default_namespace: &str,
) -> Result<Policy, Error> {
    if !doc.is_object() {
        return Err(ctx.err(
            "(document)",
            "expected a mapping with apiVersion, kind, metadata and spec",
        ));
    }
    let raw: RawNp = deserialize(ctx, doc)?;
    if raw.api_version != "networking.k8s.io/v1" {
        return Err(ctx.err(
            "apiVersion",
            format!(
                "expected \"networking.k8s.io/v1\", found {:?} (obsolete API group)",
                raw.api_version
            ),
        ));
    }
    let name = policy_name(ctx, &raw.metadata)?;
    let audit = audit_mode(ctx, &raw.metadata)?;
    let ns = policy_namespace(ctx, &raw.metadata, default_namespace)?;
    let mut selector = raw.spec.pod_selector.ok_or_else(|| {
        ctx.err(
            "spec.podSelector",
            "a NetworkPolicy needs a podSelector ({} selects every pod)",
        )
    })?;
    validate_selector(ctx, "spec.podSelector", &selector)?;
    selector
        .match_labels
        .insert(format!("k8s:{NAMESPACE_LABEL}"), ns.clone());

    // Ingress is assumed unless only Egress is listed; Egress applies when
    // listed, or (without policyTypes) when egress rules exist.
    let (ingress_applies, egress_applies) = match &raw.spec.policy_types {
        Some(types) => {
            for (i, t) in types.iter().enumerate() {
                if t != "Ingress" && t != "Egress" {
                    return Err(ctx.err(
                        format!("spec.policyTypes[{i}]"),
                        format!("expected Ingress or Egress, found {t:?}"),
                    ));
                }
            }
            (
                types.iter().any(|t| t == "Ingress"),
                types.iter().any(|t| t == "Egress"),
            )
        }
        None => (
            true,
            raw.spec.egress.as_ref().is_some_and(|e| !e.is_empty()),
        ),
    };
    let convert = |rules: Option<Vec<RawNpRule>>, ingress: bool| -> Result<Vec<PeerRule>, Error> {
        let field = if ingress { "ingress" } else { "egress" };
        let mut out = Vec::new();
        for (i, r) in rules.into_iter().flatten().enumerate() {
            out.push(convert_rule(
                ctx,
                &format!("spec.{field}[{i}]"),
                r,
                ingress,
                &ns,
            )?);
        }
        Ok(out)
    };
    let ingress = convert(raw.spec.ingress, true)?;
    let egress = convert(raw.spec.egress, false)?;
    Ok(Policy {
        kind: PolicyKind::Knp,
        name,
        namespace: Some(ns),
        rules: vec![Rule {
            selector,
            host: false,
            ingress: ingress_applies.then_some(ingress),
            egress: egress_applies.then_some(egress),
            ingress_default_deny: true,
            egress_default_deny: true,
            description: String::new(),
        }],
        audit,
    })
}

fn convert_rule(
    ctx: &Ctx<'_>,
    path: &str,
    r: RawNpRule,
    ingress: bool,
    ns: &str,
) -> Result<PeerRule, Error> {
    let (peers_field, wrong_field) = if ingress {
        ("from", "to")
    } else {
        ("to", "from")
    };
    let wrong_set = if ingress {
        r.to.is_some()
    } else {
        r.from.is_some()
    };
    if wrong_set {
        return Err(ctx.err(
            format!("{path}.{wrong_field}"),
            format!("not allowed here; use {peers_field}"),
        ));
    }
    let raw_peers = if ingress { r.from } else { r.to };
    // Missing or empty from/to: every peer, including the world.
    let peers = match raw_peers {
        None => vec![Peer::Entity(Entity::All)],
        Some(list) if list.is_empty() => vec![Peer::Entity(Entity::All)],
        Some(list) => {
            let mut out = Vec::new();
            for (i, p) in list.into_iter().enumerate() {
                out.push(convert_peer(
                    ctx,
                    &format!("{path}.{peers_field}[{i}]"),
                    p,
                    ns,
                )?);
            }
            out
        }
    };
    let mut ports = Vec::new();
    for (i, p) in r.ports.into_iter().flatten().enumerate() {
        let ppath = format!("{path}.ports[{i}]");
        // Kubernetes' port protocols (Cilium's ANY is not one).
        let protocol = match p.protocol.as_deref() {
            None => Protocol::Tcp,
            Some(name) => Protocol::from_k8s_name(name)
                .filter(|p| matches!(p, Protocol::Tcp | Protocol::Udp | Protocol::Sctp))
                .ok_or_else(|| {
                    ctx.err(
                        format!("{ppath}.protocol"),
                        format!("expected TCP, UDP or SCTP, found {name:?}"),
                    )
                })?,
        };
        let port = port_value(ctx, &ppath, p.port.as_ref(), p.end_port, false)?;
        if p.end_port.is_some() && p.port.is_none() {
            return Err(ctx.err(format!("{ppath}.endPort"), "endPort needs port"));
        }
        ports.push(PortSpec {
            protocol,
            port: if p.port.is_none() { Port::Any } else { port },
        });
    }
    Ok(PeerRule {
        peers: Some(peers),
        requires: vec![],
        to_ports: if ports.is_empty() {
            vec![]
        } else {
            vec![PortRule { ports, l7: None }]
        },
        icmps: vec![],
        deny: false,
        auth_required: false,
    })
}

fn convert_peer(ctx: &Ctx<'_>, path: &str, p: RawNpPeer, ns: &str) -> Result<Peer, Error> {
    let selectors = p.pod_selector.is_some() || p.namespace_selector.is_some();
    if p.ip_block.is_some() && selectors {
        return Err(ctx.err(
            path,
            "ipBlock cannot be combined with podSelector or namespaceSelector",
        ));
    }
    if let Some(block) = p.ip_block {
        let prefix =
            parse_cidr(&block.cidr).map_err(|m| ctx.err(format!("{path}.ipBlock.cidr"), m))?;
        let mut except = Vec::new();
        for (i, e) in block.except.iter().enumerate() {
            let ex =
                parse_cidr(e).map_err(|m| ctx.err(format!("{path}.ipBlock.except[{i}]"), m))?;
            if !prefix.contains(&ex) || ex == prefix {
                return Err(ctx.err(
                    format!("{path}.ipBlock.except[{i}]"),
                    format!("{ex} must be strictly inside {prefix}"),
                ));
            }
            except.push(ex);
        }
        return Ok(Peer::Cidr { prefix, except });
    }
    if !selectors {
        return Err(ctx.err(
            path,
            "a peer needs podSelector, namespaceSelector or ipBlock",
        ));
    }
    let mut s = p.pod_selector.unwrap_or_default();
    validate_selector(ctx, &format!("{path}.podSelector"), &s)?;
    match p.namespace_selector {
        None => inject_peer_namespace(&mut s, PolicyKind::Knp, Some(ns)),
        Some(nsel) => {
            validate_selector(ctx, &format!("{path}.namespaceSelector"), &nsel)?;
            // Namespace labels are identity labels with a prefix.
            for (k, v) in nsel.match_labels {
                s.match_labels.insert(
                    format!("k8s:{NAMESPACE_LABELS_PREFIX}{}", split_source(&k).1),
                    v,
                );
            }
            for r in nsel.match_expressions {
                s.match_expressions.push(Requirement {
                    key: format!("k8s:{NAMESPACE_LABELS_PREFIX}{}", split_source(&r.key).1),
                    ..r
                });
            }
            // `namespaceSelector: {}`: pods of every namespace (not the world).
            s.match_expressions.push(Requirement {
                key: format!("k8s:{NAMESPACE_LABEL}"),
                operator: Operator::Exists,
                values: vec![],
            });
        }
    }
    Ok(Peer::Endpoints(s))
}
