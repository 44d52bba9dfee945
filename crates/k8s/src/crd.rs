//! Cilium's CustomResourceDefinitions (`cilium.io/v2`) as Fibril serves
//! them, with structural OpenAPI schemas: the API server refuses at
//! `kubectl apply` what Cilium's CRDs refuse there (unknown fields, ill-typed
//! values, out-of-range ports, unknown protocols and entities). What a
//! schema cannot say (e.g. `toFQDNs` with other L3 peers) the agents'
//! own validation reports in the object's status.
//!
//! The same definitions are committed in the Helm chart
//! (`install/kubernetes/fibril/crds/`); `tests/crds.rs` keeps them equal.

use serde_json::{json, Value};

pub const GROUP: &str = "cilium.io";
pub const VERSION: &str = "v2";

/// A port number 0-65535 or a named port (an IANA_SVC_NAME: at most 15
/// letters, digits and inner dashes, at least one letter). Cilium's pattern
/// is unanchored after its first alternative (so `70000` passes the API
/// server and fails in the agent); this one refuses it at apply.
const PORT_PATTERN: &str = r"^((6553[0-5]|655[0-2][0-9]|65[0-4][0-9]{2}|6[0-4][0-9]{3}|[1-5][0-9]{4}|[0-9]{1,4})|([a-zA-Z0-9]-?)*[a-zA-Z](-?[a-zA-Z0-9])*)$";
/// Kubernetes' label value syntax (matchLabels values).
const LABEL_VALUE_PATTERN: &str = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$";
/// DNS names and patterns in `toFQDNs` and DNS rules.
const FQDN_NAME_PATTERN: &str = r"^([-a-zA-Z0-9_]+[.]?)+$";
const FQDN_WILDCARD_PATTERN: &str = r"^([-a-zA-Z0-9_*]+[.]?)+$";
const ENTITIES: &[&str] = &[
    "all",
    "world",
    "cluster",
    "host",
    "init",
    "ingress",
    "unmanaged",
    "remote-node",
    "health",
    "none",
    "kube-apiserver",
];
const PROTOCOLS: &[&str] = &[
    "TCP", "UDP", "SCTP", "ICMP", "ICMPv6", "VRRP", "IGMP", "ANY",
];

fn string() -> Value {
    json!({"type": "string"})
}

fn strings() -> Value {
    array(string())
}

fn array(items: Value) -> Value {
    json!({"type": "array", "items": items})
}

fn object(properties: Value) -> Value {
    json!({"type": "object", "properties": properties})
}

fn boolean() -> Value {
    json!({"type": "boolean"})
}

/// A Kubernetes label selector.
fn label_selector() -> Value {
    json!({
        "type": "object",
        "properties": {
            "matchLabels": {
                "type": "object",
                "additionalProperties": {
                    "type": "string",
                    "maxLength": 63,
                    "pattern": LABEL_VALUE_PATTERN,
                },
            },
            "matchExpressions": array(json!({
                "type": "object",
                "required": ["key", "operator"],
                "properties": {
                    "key": string(),
                    "operator": {"type": "string", "enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": strings(),
                },
            })),
        },
        "x-kubernetes-map-type": "atomic",
    })
}

fn cidr_set() -> Value {
    array(object(json!({
        "cidr": {"type": "string", "format": "cidr"},
        "cidrGroupRef": {"type": "string", "maxLength": 253},
        "cidrGroupSelector": label_selector(),
        "except": array(json!({"type": "string", "format": "cidr"})),
    })))
}

fn icmps() -> Value {
    array(object(json!({
        "fields": {
            "type": "array",
            "maxItems": 40,
            "items": {
                "type": "object",
                "required": ["type"],
                "properties": {
                    "family": {"type": "string", "enum": ["IPv4", "IPv6"], "default": "IPv4"},
                    "type": {"x-kubernetes-int-or-string": true, "anyOf": [{"type": "integer"}, {"type": "string"}]},
                },
            },
        },
    })))
}

fn ports() -> Value {
    json!({
        "type": "array",
        "maxItems": 40,
        "items": {
            "type": "object",
            // No port: every port (Cilium's extended protocols, VRRP and
            // IGMP, have none).
            "properties": {
                "port": {"type": "string", "pattern": PORT_PATTERN},
                "endPort": {"type": "integer", "format": "int32", "minimum": 0, "maximum": 65535},
                "protocol": {"type": "string", "enum": PROTOCOLS},
            },
        },
    })
}

fn secret_ref() -> Value {
    json!({
        "type": "object",
        "required": ["name"],
        "properties": {"name": string(), "namespace": string()},
    })
}

fn tls_context() -> Value {
    object(json!({
        "certificate": string(),
        "privateKey": string(),
        "secret": secret_ref(),
        "trustedCA": string(),
    }))
}

fn dns_rules() -> Value {
    array(object(json!({
        "matchName": {"type": "string", "maxLength": 255, "pattern": FQDN_NAME_PATTERN},
        "matchPattern": {"type": "string", "maxLength": 255, "pattern": FQDN_WILDCARD_PATTERN},
    })))
}

fn l7_rules() -> Value {
    object(json!({
        "http": array(object(json!({
            "headerMatches": array(json!({
                "type": "object",
                "required": ["name"],
                "properties": {
                    "mismatch": {"type": "string", "enum": ["LOG", "ADD", "DELETE", "REPLACE"]},
                    "name": {"type": "string", "minLength": 1},
                    "secret": secret_ref(),
                    "value": string(),
                },
            })),
            "headers": strings(),
            "host": string(),
            "method": string(),
            "path": string(),
        }))),
        "kafka": array(object(json!({
            "apiKey": string(),
            "apiVersion": string(),
            "clientID": string(),
            "role": {"type": "string", "enum": ["produce", "consume"]},
            "topic": {"type": "string", "maxLength": 255},
        }))),
        "dns": dns_rules(),
        "l7proto": string(),
        "l7": array(json!({"type": "object", "additionalProperties": {"type": "string"}})),
    }))
}

/// A `toPorts` entry; a deny rule's carries ports only.
fn port_rule(deny: bool) -> Value {
    if deny {
        return array(object(json!({"ports": ports()})));
    }
    array(object(json!({
        "ports": ports(),
        "rules": l7_rules(),
        "listener": {
            "type": "object",
            "required": ["envoyConfig", "name"],
            "properties": {
                "envoyConfig": {
                    "type": "object",
                    "required": ["name"],
                    "properties": {
                        "kind": {"type": "string", "enum": ["CiliumEnvoyConfig", "CiliumClusterwideEnvoyConfig"]},
                        "name": {"type": "string", "minLength": 1},
                    },
                },
                "name": {"type": "string", "minLength": 1},
                "priority": {"type": "integer", "minimum": 1, "maximum": 100},
            },
        },
        "originatingTLS": tls_context(),
        "terminatingTLS": tls_context(),
        "serverNames": array(json!({"type": "string", "minLength": 1})),
    })))
}

fn entities() -> Value {
    array(json!({"type": "string", "enum": ENTITIES}))
}

/// An ingress or egress rule (`from*` or `to*` peers); deny rules take
/// neither L7 nor (egress) `toFQDNs`.
fn peer_rule(egress: bool, deny: bool) -> Value {
    let side = if egress { "to" } else { "from" };
    let mut p = serde_json::Map::new();
    p.insert(format!("{side}Endpoints"), array(label_selector()));
    p.insert(format!("{side}Requires"), array(label_selector()));
    p.insert(format!("{side}Nodes"), array(label_selector()));
    p.insert(
        format!("{side}CIDR"),
        array(json!({"type": "string", "format": "cidr"})),
    );
    p.insert(format!("{side}CIDRSet"), cidr_set());
    p.insert(format!("{side}Entities"), entities());
    p.insert(
        format!("{side}Groups"),
        array(json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true})),
    );
    p.insert("icmps".into(), icmps());
    p.insert("toPorts".into(), port_rule(deny));
    if !deny {
        p.insert(
            "authentication".into(),
            json!({
                "type": "object",
                "required": ["mode"],
                "properties": {"mode": {"type": "string", "enum": ["disabled", "required", "test-always-fail"]}},
            }),
        );
    }
    if egress {
        p.insert(
            "toServices".into(),
            array(object(json!({
                "k8sService": object(json!({"namespace": string(), "serviceName": string()})),
                "k8sServiceSelector": {
                    "type": "object",
                    "required": ["selector"],
                    "properties": {"namespace": string(), "selector": label_selector()},
                },
            }))),
        );
        if !deny {
            p.insert(
                "toFQDNs".into(),
                json!({"type": "array", "maxItems": 1000, "items": dns_rules()["items"].clone()}),
            );
        }
    }
    json!({"type": "object", "properties": p})
}

/// One rule of a policy (`spec`, or an entry of `specs`).
pub fn rule_schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "endpointSelector": label_selector(),
            "nodeSelector": label_selector(),
            "ingress": array(peer_rule(false, false)),
            "ingressDeny": array(peer_rule(false, true)),
            "egress": array(peer_rule(true, false)),
            "egressDeny": array(peer_rule(true, true)),
            "enableDefaultDeny": object(json!({"ingress": boolean(), "egress": boolean()})),
            "description": string(),
            "labels": array(json!({
                "type": "object",
                "required": ["key"],
                "properties": {"key": string(), "source": string(), "value": string()},
            })),
            "log": object(json!({"value": string()})),
        },
        // Cilium's CRD: a rule selects endpoints or nodes, not both.
        "oneOf": [{"required": ["endpointSelector"]}, {"required": ["nodeSelector"]}],
    })
}

/// What agents write back: each node's view (`status.nodes.<node>`, as
/// `kubectl describe` shows it) and whether the policy is valid
/// (`status.conditions`, type `Valid`).
fn policy_status() -> Value {
    json!({
        "type": "object",
        "properties": {
            "nodes": {
                "type": "object",
                "additionalProperties": object(json!({
                    "ok": boolean(),
                    "enforcing": boolean(),
                    "error": string(),
                    "lastUpdated": {"type": "string", "format": "date-time"},
                    "localPolicyRevision": {"type": "integer", "format": "int64"},
                    "annotations": {"type": "object", "additionalProperties": string()},
                })),
            },
            "conditions": array(json!({
                "type": "object",
                "required": ["type", "status"],
                "properties": {
                    "type": string(),
                    "status": {"type": "string", "enum": ["True", "False", "Unknown"]},
                    "lastTransitionTime": {"type": "string", "format": "date-time"},
                    "reason": string(),
                    "message": string(),
                },
            })),
            "derivativePolicies": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
        },
    })
}

struct Kind {
    kind: &'static str,
    plural: &'static str,
    singular: &'static str,
    short: &'static [&'static str],
    namespaced: bool,
}

fn definition(k: &Kind, schema: Value, columns: Value) -> Value {
    json!({
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": format!("{}.{GROUP}", k.plural),
            "labels": {"io.cilium.k8s.crd.schema.version": "1.31.0", "app.kubernetes.io/part-of": "fibril"},
        },
        "spec": {
            "group": GROUP,
            "names": {
                "kind": k.kind,
                "listKind": format!("{}List", k.kind),
                "plural": k.plural,
                "singular": k.singular,
                "shortNames": k.short,
                "categories": ["cilium", "ciliumpolicy"],
            },
            "scope": if k.namespaced { "Namespaced" } else { "Cluster" },
            "versions": [{
                "name": VERSION,
                "served": true,
                "storage": true,
                "subresources": {"status": {}},
                "additionalPrinterColumns": columns,
                "schema": {"openAPIV3Schema": schema},
            }],
        },
    })
}

fn policy_crd(k: &Kind) -> Value {
    let schema = json!({
        "type": "object",
        "required": ["metadata"],
        "properties": {
            "apiVersion": string(),
            "kind": string(),
            "metadata": {"type": "object"},
            "spec": rule_schema(),
            "specs": array(rule_schema()),
            "status": policy_status(),
        },
    });
    definition(
        k,
        schema,
        json!([
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
            {"name": "Valid", "type": "string", "jsonPath": ".status.conditions[?(@.type=='Valid')].status"},
        ]),
    )
}

/// CiliumIdentity (cluster-scoped, named by its number): the labels an
/// identity stands for, in `security-labels` (`source:key` -> value).
fn identity_crd() -> Value {
    let schema = json!({
        "type": "object",
        "required": ["metadata", "security-labels"],
        "properties": {
            "apiVersion": string(),
            "kind": string(),
            "metadata": {"type": "object"},
            "security-labels": {"type": "object", "additionalProperties": string()},
        },
    });
    let mut crd = definition(
        &Kind {
            kind: "CiliumIdentity",
            plural: "ciliumidentities",
            singular: "ciliumidentity",
            short: &["ciliumid"],
            namespaced: false,
        },
        schema,
        json!([
            {"name": "Namespace", "type": "string", "jsonPath": ".metadata.labels.io\\.kubernetes\\.pod\\.namespace"},
            {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
        ]),
    );
    // Identities have no status.
    crd["spec"]["versions"][0]
        .as_object_mut()
        .map(|v| v.remove("subresources"));
    crd["spec"]["names"]["categories"] = json!(["cilium"]);
    crd
}

/// CiliumEndpoint (one per pod, named as the pod) and CiliumNode (one
/// per node): written and read by agents, their bodies kept as written.
fn agent_state_crd(k: &Kind, body: &str, columns: Value) -> Value {
    let schema = json!({
        "type": "object",
        "required": ["metadata"],
        "properties": {
            "apiVersion": string(),
            "kind": string(),
            "metadata": {"type": "object"},
            body: {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
            "status": {"type": "object", "x-kubernetes-preserve-unknown-fields": true},
        },
    });
    let mut crd = definition(k, schema, columns);
    crd["spec"]["versions"][0]
        .as_object_mut()
        .map(|v| v.remove("subresources"));
    crd["spec"]["names"]["categories"] = json!(["cilium"]);
    crd
}

/// Every CRD Fibril installs, in the order to create them.
pub fn definitions() -> Vec<Value> {
    vec![
        identity_crd(),
        agent_state_crd(
            &Kind {
                kind: "CiliumEndpoint",
                plural: "ciliumendpoints",
                singular: "ciliumendpoint",
                short: &["cep", "ciliumep"],
                namespaced: true,
            },
            "spec",
            json!([
                {"name": "Security Identity", "type": "integer", "jsonPath": ".status.identity.id"},
                {"name": "Endpoint State", "type": "string", "jsonPath": ".status.state"},
                {"name": "IPv4", "type": "string", "jsonPath": ".status.networking.addressing[0].ipv4"},
            ]),
        ),
        agent_state_crd(
            &Kind {
                kind: "CiliumNode",
                plural: "ciliumnodes",
                singular: "ciliumnode",
                short: &["cn", "ciliumn"],
                namespaced: false,
            },
            "spec",
            json!([
                {"name": "CiliumInternalIP", "type": "string", "jsonPath": ".spec.addresses[?(@.type=='InternalIP')].ip"},
                {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
            ]),
        ),
        policy_crd(&Kind {
            kind: "CiliumNetworkPolicy",
            plural: "ciliumnetworkpolicies",
            singular: "ciliumnetworkpolicy",
            short: &["cnp", "ciliumnp"],
            namespaced: true,
        }),
        policy_crd(&Kind {
            kind: "CiliumClusterwideNetworkPolicy",
            plural: "ciliumclusterwidenetworkpolicies",
            singular: "ciliumclusterwidenetworkpolicy",
            short: &["ccnp"],
            namespaced: false,
        }),
    ]
}

/// The file name of a definition in the chart's `crds/` directory.
pub fn file_name(crd: &Value) -> String {
    format!(
        "{}.yaml",
        crd["metadata"]["name"].as_str().unwrap_or("unnamed")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_property_has_a_type() {
        // A structural schema: every node says its type (or is
        // int-or-string / preserves unknown fields), else the API server
        // refuses the CRD.
        fn check(path: &str, v: &Value) {
            let Some(o) = v.as_object() else { return };
            if let Some(props) = o.get("properties").and_then(Value::as_object) {
                for (name, p) in props {
                    let typed = p.get("type").is_some()
                        || p.get("x-kubernetes-int-or-string").is_some()
                        || p.get("x-kubernetes-preserve-unknown-fields").is_some();
                    assert!(typed, "{path}.{name} has no type");
                    check(&format!("{path}.{name}"), p);
                }
            }
            for key in ["items", "additionalProperties"] {
                if let Some(inner) = o.get(key) {
                    check(&format!("{path}[{key}]"), inner);
                }
            }
        }
        for crd in definitions() {
            let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
            check(crd["metadata"]["name"].as_str().unwrap(), schema);
        }
    }

    #[test]
    fn port_pattern_refuses_out_of_range() {
        let re = regex_lite(PORT_PATTERN);
        for ok in ["0", "80", "65535", "http", "http-8080", "dns"] {
            assert!(re(ok), "{ok} refused");
        }
        for bad in ["65536", "70000", "-1", "80a-", "", "a b"] {
            assert!(!re(bad), "{bad} accepted");
        }
    }

    /// The pattern checked the way the API server's regexp engine would
    /// (RE2; these patterns use nothing beyond what `regex` shares with it).
    fn regex_lite(p: &str) -> impl Fn(&str) -> bool {
        let re = regex::Regex::new(p).unwrap();
        move |s| re.is_match(s)
    }
}
