//! Labels with their source prefix (`k8s:app=web`), label sets, and the
//! identity-relevant label filter.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

/// The namespace label Cilium synthesises for every pod.
pub const NAMESPACE_LABEL: &str = "io.kubernetes.pod.namespace";
/// Prefix of the labels carrying the pod's namespace's own labels.
pub const NAMESPACE_LABELS_PREFIX: &str = "io.cilium.k8s.namespace.labels.";
pub const SERVICE_ACCOUNT_LABEL: &str = "io.cilium.k8s.policy.serviceaccount";
pub const CLUSTER_LABEL: &str = "io.cilium.k8s.policy.cluster";

/// Label sources a key may be prefixed with.
pub const SOURCES: [&str; 7] = [
    "k8s",
    "reserved",
    "any",
    "unspec",
    "container",
    "cidr",
    "fqdn",
];

/// Keys that are not identity-relevant by default (Cilium's exclusive
/// patterns, anchored at the start of the key).
const IRRELEVANT_KEY_PREFIXES: [&str; 14] = [
    "io.kubernetes",
    "kubernetes.io",
    "statefulset.kubernetes.io/pod-name",
    "apps.kubernetes.io/pod-index",
    "batch.kubernetes.io/job-completion-index",
    "batch.kubernetes.io/controller-uid",
    "beta.kubernetes.io",
    "k8s.io",
    "pod-template-generation",
    "pod-template-hash",
    "controller-revision-hash",
    "annotation.",
    "controller-uid",
    "etcd_node",
];

/// One label: `source:key=value`.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Label {
    pub source: String,
    pub key: String,
    pub value: String,
}

impl Label {
    pub fn new(source: &str, key: &str, value: &str) -> Self {
        Self {
            source: source.into(),
            key: key.into(),
            value: value.into(),
        }
    }
}

impl fmt::Display for Label {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.value.is_empty() {
            write!(f, "{}:{}", self.source, self.key)
        } else {
            write!(f, "{}:{}={}", self.source, self.key, self.value)
        }
    }
}

/// Splits `k8s:app` into (`k8s`, `app`); a key without a known source
/// prefix is `any`.
pub fn split_source(key: &str) -> (&str, &str) {
    if let Some((src, rest)) = key.split_once(':') {
        if SOURCES.contains(&src) {
            return (src, rest);
        }
    }
    ("any", key)
}

/// A sorted set of labels: the key an identity is allocated for.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LabelSet(pub Vec<Label>);

impl LabelSet {
    pub fn new(mut labels: Vec<Label>) -> Self {
        labels.sort();
        labels.dedup();
        Self(labels)
    }

    /// Labels carried by a reserved identity (`reserved:world`, ...).
    pub fn reserved(name: &str) -> Self {
        Self(vec![Label::new("reserved", name, "")])
    }

    pub fn iter(&self) -> impl Iterator<Item = &Label> {
        self.0.iter()
    }

    /// Whether these are the host endpoint's labels (`reserved:host`).
    pub fn is_host(&self) -> bool {
        self.0
            .iter()
            .any(|l| l.source == "reserved" && l.key == "host")
    }

    /// The host endpoint's labels: `reserved:host` and the node's own
    /// labels (source `k8s`), every one of them, so a nodeSelector on any
    /// label of the node selects it (Cilium filters some out, and a host
    /// policy on a filtered label silently selects nothing).
    pub fn host_endpoint(node_labels: &BTreeMap<String, String>) -> Self {
        let mut labels = vec![Label::new("reserved", "host", "")];
        labels.extend(node_labels.iter().map(|(k, v)| Label::new("k8s", k, v)));
        Self::new(labels)
    }

    /// Values of labels with `key` whose source matches `source` (`any`
    /// matches every source).
    pub fn values<'a>(
        &'a self,
        source: &'a str,
        key: &'a str,
    ) -> impl Iterator<Item = &'a str> + 'a {
        self.0
            .iter()
            .filter(move |l| l.key == key && (source == "any" || l.source == source))
            .map(|l| l.value.as_str())
    }

    /// `k8s:app=web` strings, as Hubble prints them.
    pub fn to_strings(&self) -> Vec<String> {
        self.0.iter().map(|l| l.to_string()).collect()
    }
}

/// Everything an endpoint's identity is derived from.
#[derive(Clone, Debug)]
pub struct PodMeta<'a> {
    pub namespace: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    pub namespace_labels: &'a BTreeMap<String, String>,
    pub service_account: &'a str,
    pub cluster: &'a str,
}

fn identity_relevant(key: &str) -> bool {
    !IRRELEVANT_KEY_PREFIXES.iter().any(|p| key.starts_with(p))
}

/// The identity-relevant labels of a pod: its own labels minus Cilium's
/// default exclusions, plus the labels Cilium synthesises (namespace,
/// namespace labels, service account, cluster), which are always kept.
pub fn pod_identity_labels(meta: &PodMeta<'_>) -> LabelSet {
    let mut out: Vec<Label> = meta
        .labels
        .iter()
        .filter(|(k, _)| identity_relevant(k))
        .map(|(k, v)| Label::new("k8s", k, v))
        .collect();
    out.push(Label::new("k8s", NAMESPACE_LABEL, meta.namespace));
    for (k, v) in meta.namespace_labels {
        out.push(Label::new(
            "k8s",
            &format!("{NAMESPACE_LABELS_PREFIX}{k}"),
            v,
        ));
    }
    out.push(Label::new(
        "k8s",
        SERVICE_ACCOUNT_LABEL,
        meta.service_account,
    ));
    out.push(Label::new("k8s", CLUSTER_LABEL, meta.cluster));
    LabelSet::new(out)
}

/// Checks a Kubernetes label key (optional DNS prefix + `/` + name).
pub fn validate_label_key(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, key),
    };
    if let Some(p) = prefix {
        if p.is_empty()
            || p.len() > 253
            || !p
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-')
        {
            return Err(format!("label key {key:?}: prefix must be a DNS subdomain"));
        }
    }
    validate_label_name(name).map_err(|e| format!("label key {key:?}: {e}"))
}

/// Checks a namespace name as Kubernetes does: a DNS-1123 label (1 to 63
/// lowercase letters, digits and '-', starting and ending with a letter or
/// digit).
pub fn validate_namespace(ns: &str) -> Result<(), String> {
    if dns1123_label(ns) {
        Ok(())
    } else {
        Err(format!(
            "namespace {ns:?} is not a DNS-1123 label (1-63 lowercase letters, digits and '-', starting and ending with a letter or digit)"
        ))
    }
}

/// Checks a pod (or service account) name as Kubernetes does: a DNS-1123
/// subdomain (at most 253 characters, dot-separated DNS-1123 labels).
pub fn validate_object_name(what: &str, name: &str) -> Result<(), String> {
    if name.len() <= 253 && name.split('.').all(dns1123_label) {
        Ok(())
    } else {
        Err(format!(
            "{what} name {name:?} is not a DNS-1123 subdomain (at most 253 lowercase letters, digits, '-' and '.', each part starting and ending with a letter or digit)"
        ))
    }
}

fn dns1123_label(s: &str) -> bool {
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && alnum(s.chars().next())
        && alnum(s.chars().last())
}

/// Checks a Kubernetes label value (may be empty).
pub fn validate_label_value(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Ok(());
    }
    validate_label_name(value).map_err(|e| format!("label value {value:?}: {e}"))
}

fn validate_label_name(s: &str) -> Result<(), String> {
    if s.is_empty() || s.len() > 63 {
        return Err("must be 1 to 63 characters".into());
    }
    let ok_char = |c: char| c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.';
    if !s.chars().all(ok_char) {
        return Err("may contain only letters, digits, '-', '_' and '.'".into());
    }
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric());
    if !alnum(s.chars().next()) || !alnum(s.chars().last()) {
        return Err("must start and end with a letter or digit".into());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_labels_filter_kubernetes_noise_and_add_synthesised_ones() {
        let labels: BTreeMap<String, String> = [
            ("app", "web"),
            ("pod-template-hash", "abc"),
            ("statefulset.kubernetes.io/pod-name", "web-0"),
        ]
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
        let ns_labels: BTreeMap<String, String> = [("team".to_string(), "a".to_string())].into();
        let set = pod_identity_labels(&PodMeta {
            namespace: "shop",
            labels: &labels,
            namespace_labels: &ns_labels,
            service_account: "default",
            cluster: "default",
        });
        assert_eq!(
            set.to_strings(),
            vec![
                "k8s:app=web",
                "k8s:io.cilium.k8s.namespace.labels.team=a",
                "k8s:io.cilium.k8s.policy.cluster=default",
                "k8s:io.cilium.k8s.policy.serviceaccount=default",
                "k8s:io.kubernetes.pod.namespace=shop",
            ]
        );
    }

    #[test]
    fn source_prefixes_split_only_known_sources() {
        for (input, expected) in [
            ("k8s:app", ("k8s", "app")),
            ("app", ("any", "app")),
            ("reserved:host", ("reserved", "host")),
            ("example.com/role", ("any", "example.com/role")),
            ("weird:key", ("any", "weird:key")),
        ] {
            assert_eq!(split_source(input), expected, "{input}");
        }
    }

    #[test]
    fn label_keys_and_values_are_validated() {
        for ok in ["app", "example.com/role", "a.b-c_d"] {
            assert!(validate_label_key(ok).is_ok(), "{ok}");
        }
        for bad in ["", "-app", "app-", "a b", "/x", &"x".repeat(64)] {
            assert!(validate_label_key(bad).is_err(), "{bad:?}");
        }
        assert!(validate_label_value("").is_ok());
        assert!(validate_label_value("has space").is_err());
    }
}
