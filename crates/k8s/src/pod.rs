//! Pods as the agent needs them: a Pod object (and its namespace's labels)
//! -> `api::Pod`, the metadata that decides an endpoint's identity (labels,
//! namespace labels, service account), its named ports and its workload.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;

/// The workload a pod belongs to, as Cilium and Hubble name it: a
/// ReplicaSet owned by a Deployment is the Deployment (its name less the
/// pod template hash), any other controller owner is itself.
pub fn workloads(pod: &Pod) -> Vec<flow::Workload> {
    let hash = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get("pod-template-hash"));
    pod.metadata
        .owner_references
        .iter()
        .flatten()
        .filter(|o| o.controller == Some(true))
        .map(|o| match (o.kind.as_str(), hash) {
            ("ReplicaSet", Some(h)) if o.name.ends_with(&format!("-{h}")) => flow::Workload {
                kind: "Deployment".into(),
                name: o.name[..o.name.len() - h.len() - 1].to_string(),
            },
            _ => flow::Workload {
                kind: o.kind.clone(),
                name: o.name.clone(),
            },
        })
        .collect()
}

/// The pod's declared container ports (named ports in policies).
fn ports(pod: &Pod) -> Vec<policy::NamedPort> {
    pod.spec
        .iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .filter_map(|p| {
            let name = p.name.clone()?;
            let port = u16::try_from(p.container_port).ok()?;
            let protocol = policy::Protocol::from_k8s_name(p.protocol.as_deref().unwrap_or("TCP"))?;
            Some(policy::NamedPort {
                name,
                port,
                protocol,
            })
        })
        .collect()
}

/// The agent's view of `pod` in a namespace labelled `namespace_labels`.
pub fn to_api(pod: &Pod, namespace_labels: &BTreeMap<String, String>) -> api::Pod {
    api::Pod {
        namespace: pod
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        name: pod.metadata.name.clone().unwrap_or_default(),
        labels: pod.metadata.labels.clone().unwrap_or_default(),
        namespace_labels: namespace_labels.clone(),
        service_account: pod
            .spec
            .as_ref()
            .and_then(|s| s.service_account_name.clone())
            .filter(|s| !s.is_empty()),
        ports: ports(pod),
        workloads: workloads(pod),
    }
}

/// Whether the pod shares its node's network (no endpoint of its own).
pub fn host_network(pod: &Pod) -> bool {
    pod.spec.as_ref().and_then(|s| s.host_network) == Some(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_deployments_pod_is_the_deployment() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {
                "name": "web-6f9b7c5d8-abcde", "namespace": "shop",
                "labels": {"app": "web", "pod-template-hash": "6f9b7c5d8"},
                "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet",
                    "name": "web-6f9b7c5d8", "uid": "u", "controller": true}],
            },
            "spec": {"serviceAccountName": "web", "containers": [{"name": "c", "image": "fibril/echo",
                "ports": [{"name": "http", "containerPort": 8080}, {"containerPort": 9}]}]},
        }))
        .unwrap();
        let ns = BTreeMap::from([("team".to_string(), "a".to_string())]);
        let p = to_api(&pod, &ns);
        assert_eq!(
            p.workloads,
            vec![flow::Workload {
                kind: "Deployment".into(),
                name: "web".into()
            }]
        );
        assert_eq!(p.service_account.as_deref(), Some("web"));
        assert_eq!(p.ports.len(), 1);
        assert_eq!(p.ports[0].port, 8080);
        assert_eq!(p.namespace_labels, ns);
    }
}
