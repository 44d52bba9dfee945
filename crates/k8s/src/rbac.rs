//! What the agent may do in the API (its ClusterRole's rules): read the
//! cluster's pods, namespaces, nodes, services and policies; install
//! Cilium's CRDs; write its policies' status. The Helm chart's ClusterRole
//! carries the same rules (`tests/chart.rs` compares them).

use serde_json::{json, Value};

/// The ClusterRole's rules.
pub fn agent_rules() -> Value {
    json!([
        {
            "apiGroups": [""],
            "resources": ["pods", "namespaces", "nodes", "services", "endpoints"],
            "verbs": ["get", "list", "watch"],
        },
        {
            "apiGroups": ["discovery.k8s.io"],
            "resources": ["endpointslices"],
            "verbs": ["get", "list", "watch"],
        },
        {
            "apiGroups": ["networking.k8s.io"],
            "resources": ["networkpolicies"],
            "verbs": ["get", "list", "watch"],
        },
        {
            "apiGroups": ["apiextensions.k8s.io"],
            "resources": ["customresourcedefinitions"],
            "verbs": ["get", "list", "watch", "create", "update", "patch"],
        },
        {
            "apiGroups": ["cilium.io"],
            "resources": ["ciliumnetworkpolicies", "ciliumclusterwidenetworkpolicies"],
            "verbs": ["get", "list", "watch"],
        },
        {
            "apiGroups": ["cilium.io"],
            "resources": ["ciliumnetworkpolicies/status", "ciliumclusterwidenetworkpolicies/status"],
            "verbs": ["patch", "update"],
        },
        {
            "apiGroups": ["cilium.io"],
            "resources": ["ciliumidentities", "ciliumendpoints", "ciliumnodes"],
            "verbs": ["get", "list", "watch", "create", "update", "patch", "delete"],
        },
    ])
}

/// The ClusterRole `name` and its binding to the group `group` (a lab's
/// agents authenticate with certificates in that group).
pub fn agent_role_for_group(name: &str, group: &str) -> Vec<Value> {
    vec![
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRole",
            "metadata": {"name": name},
            "rules": agent_rules(),
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": group}],
        }),
    ]
}
