//! Policy objects in the API: the kinds an agent follows
//! (CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy, NetworkPolicy),
//! an object as the API serves it -> `policy::Policy` (the same validation
//! as `fibril policy import`), and the status an agent writes back on
//! Cilium's kinds: its node's entry under `status.nodes` (what `kubectl
//! describe cnp` shows per node) and the `Valid` condition.

use k8s_openapi::api::networking::v1::NetworkPolicy;
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams};
use kube::Client;
use serde_json::{json, Value};

use crate::crd::{GROUP, VERSION};
use crate::Error;

/// A kind of policy object.
#[derive(Clone, Debug)]
pub struct Kind {
    pub kind: policy::PolicyKind,
    pub resource: ApiResource,
}

impl Kind {
    /// Whether agents report on it in its status (Cilium's own kinds; a
    /// NetworkPolicy's status is not Cilium's to write).
    pub fn has_status(&self) -> bool {
        self.kind != policy::PolicyKind::Knp
    }

    pub fn namespaced(&self) -> bool {
        self.kind != policy::PolicyKind::Ccnp
    }

    /// Every object of the kind, in every namespace.
    pub fn api(&self, client: &Client) -> Api<DynamicObject> {
        Api::all_with(client.clone(), &self.resource)
    }

    /// The API of one object's namespace (or the cluster's).
    fn api_of(&self, client: &Client, namespace: Option<&str>) -> Api<DynamicObject> {
        match namespace {
            Some(ns) if self.namespaced() => {
                Api::namespaced_with(client.clone(), ns, &self.resource)
            }
            _ => Api::all_with(client.clone(), &self.resource),
        }
    }
}

fn cilium(kind: &str, plural: &str) -> ApiResource {
    ApiResource {
        group: GROUP.into(),
        version: VERSION.into(),
        api_version: format!("{GROUP}/{VERSION}"),
        kind: kind.into(),
        plural: plural.into(),
    }
}

/// The kinds an agent follows.
pub fn kinds() -> Vec<Kind> {
    vec![
        Kind {
            kind: policy::PolicyKind::Cnp,
            resource: cilium("CiliumNetworkPolicy", "ciliumnetworkpolicies"),
        },
        Kind {
            kind: policy::PolicyKind::Ccnp,
            resource: cilium(
                "CiliumClusterwideNetworkPolicy",
                "ciliumclusterwidenetworkpolicies",
            ),
        },
        Kind {
            kind: policy::PolicyKind::Knp,
            resource: ApiResource::erase::<NetworkPolicy>(&()),
        },
    ]
}

/// How an object is named in logs, errors and the state: `Kind ns/name`.
pub fn describe(kind: &Kind, obj: &DynamicObject) -> String {
    match &obj.metadata.namespace {
        Some(ns) => format!("{} {ns}/{}", kind.resource.kind, name(obj)),
        None => format!("{} {}", kind.resource.kind, name(obj)),
    }
}

fn name(obj: &DynamicObject) -> &str {
    obj.metadata.name.as_deref().unwrap_or_default()
}

/// The object's spec generation (status writes do not change it).
pub fn generation(obj: &DynamicObject) -> i64 {
    obj.metadata.generation.unwrap_or_default()
}

/// Reads an object as `fibril policy import` reads a document. Objects in
/// a list carry no `apiVersion`/`kind`; they are the kind's.
pub fn parse(
    kind: &Kind,
    obj: &DynamicObject,
) -> Result<(policy::Policy, Vec<policy::Warning>), policy::Error> {
    let mut value = serde_json::to_value(obj).unwrap_or(Value::Null);
    if let Some(o) = value.as_object_mut() {
        o.insert("apiVersion".into(), json!(kind.resource.api_version));
        o.insert("kind".into(), json!(kind.resource.kind));
        // The server's bookkeeping is no part of the policy.
        if let Some(meta) = o.get_mut("metadata").and_then(Value::as_object_mut) {
            meta.remove("managedFields");
        }
    }
    policy::parse_object(&describe(kind, obj), value)
}

/// What this node made of an object.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// In force here, at this policy revision.
    Enforcing {
        revision: u64,
        warnings: Vec<String>,
    },
    /// Refused by validation (the field and why).
    Invalid(String),
    /// Valid, but this node could not put it in force.
    Failed(String),
}

/// The merge patch of `status` for `node`'s outcome.
pub fn status_patch(node: &str, outcome: &Outcome) -> Value {
    let now = k8s_openapi::jiff::Timestamp::now().to_string();
    let (ok, enforcing, error, revision) = match outcome {
        Outcome::Enforcing { revision, .. } => (true, true, None, Some(*revision)),
        Outcome::Invalid(e) => (false, false, Some(e.clone()), None),
        Outcome::Failed(e) => (true, false, Some(e.clone()), None),
    };
    let mut entry = json!({"ok": ok, "enforcing": enforcing, "lastUpdated": now});
    // A merge patch removes a field by null: an error that is fixed goes.
    entry["error"] = error.map_or(Value::Null, Value::String);
    if let Some(r) = revision {
        entry["localPolicyRevision"] = json!(r);
    }
    let (valid, reason, message) = match outcome {
        Outcome::Invalid(e) => ("False", "ValidationError", e.clone()),
        Outcome::Enforcing { warnings, .. } if !warnings.is_empty() => {
            ("True", "ValidWithWarnings", warnings.join("; "))
        }
        _ => ("True", "Valid", "Policy validation succeeded".to_string()),
    };
    json!({
        "status": {
            "nodes": {node: entry},
            "conditions": [{
                "type": "Valid",
                "status": valid,
                "lastTransitionTime": now,
                "reason": reason,
                "message": message,
            }],
        }
    })
}

/// Whether `obj`'s status already says `outcome` for `node` (so that a
/// status write, which the watch sees again, is not repeated forever).
pub fn status_says(obj: &DynamicObject, node: &str, outcome: &Outcome) -> bool {
    let entry = &obj.data["status"]["nodes"][node];
    let error = entry["error"].as_str();
    match outcome {
        // The revision it was put in force at is not compared: a relist
        // after a restart does not rewrite every object.
        Outcome::Enforcing { .. } => entry["enforcing"] == json!(true) && error.is_none(),
        Outcome::Invalid(e) => entry["ok"] == json!(false) && error == Some(e.as_str()),
        Outcome::Failed(e) => entry["enforcing"] == json!(false) && error == Some(e.as_str()),
    }
}

/// Writes `node`'s outcome into the object's status.
pub async fn write_status(
    client: &Client,
    kind: &Kind,
    obj: &DynamicObject,
    node: &str,
    outcome: &Outcome,
) -> Result<(), Error> {
    let api = kind.api_of(client, obj.metadata.namespace.as_deref());
    api.patch_status(
        name(obj),
        &PatchParams::default(),
        &Patch::Merge(status_patch(node, outcome)),
    )
    .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(data: Value) -> DynamicObject {
        serde_json::from_value(data).unwrap()
    }

    #[test]
    fn a_listed_object_parses_as_its_kind() {
        let cnp = &kinds()[0];
        // As a list returns it: no apiVersion or kind, server metadata.
        let obj = object(json!({
            "metadata": {"name": "allow", "namespace": "web", "uid": "u", "generation": 3,
                          "resourceVersion": "12", "managedFields": [{"manager": "kubectl"}]},
            "spec": {"endpointSelector": {"matchLabels": {"app": "server"}},
                     "ingress": [{"toPorts": [{"ports": [{"port": "80", "protocol": "TCP"}]}]}]},
            "status": {"nodes": {"n1": {"ok": true}}},
        }));
        let (p, _) = parse(cnp, &obj).unwrap();
        assert_eq!(p.key(), "web/allow");
        assert_eq!(p.kind, policy::PolicyKind::Cnp);
        assert_eq!(generation(&obj), 3);
    }

    #[test]
    fn errors_name_the_object_and_field() {
        let cnp = &kinds()[0];
        let obj = object(json!({
            "metadata": {"name": "bad", "namespace": "web"},
            "spec": {"endpointSelector": {}, "egress": [{"toFQDNs": [{"matchName": "a.com"}],
                      "toEndpoints": [{}]}]},
        }));
        let e = parse(cnp, &obj).unwrap_err().to_string();
        assert!(e.starts_with("CiliumNetworkPolicy web/bad:"), "{e}");
        assert!(e.contains("spec.egress[0]"), "{e}");
    }

    #[test]
    fn status_is_written_once_per_outcome() {
        let outcome = Outcome::Enforcing {
            revision: 4,
            warnings: vec![],
        };
        let patch = status_patch("n1", &outcome);
        let mut obj = object(json!({"metadata": {"name": "p"}}));
        assert!(!status_says(&obj, "n1", &outcome));
        obj.data["status"] = patch["status"].clone();
        assert!(status_says(&obj, "n1", &outcome));
        assert!(!status_says(&obj, "n2", &outcome));
        assert!(!status_says(
            &obj,
            "n1",
            &Outcome::Failed("no map space".into())
        ));
        let bad = Outcome::Invalid("spec: x".into());
        let patch = status_patch("n1", &bad);
        assert_eq!(patch["status"]["conditions"][0]["status"], "False");
        obj.data["status"] = patch["status"].clone();
        assert!(status_says(&obj, "n1", &bad));
    }
}
