//! Key names (one place: every other module builds keys here).

use std::net::Ipv4Addr;

use policy::LabelSet;

pub const NODES: &str = "cilium/state/nodes/v1/";
pub const IDENTITY_IDS: &str = "cilium/state/identities/v1/id/";
pub const IDENTITY_VALUES: &str = "cilium/state/identities/v1/value/";
/// Per-label-set allocation locks (held under the allocating agent's lease).
pub const IDENTITY_LOCKS: &str = "cilium/state/identities/v1/locks/";
pub const IPS: &str = "cilium/state/ip/v1/";
pub const POLICIES: &str = "fibril/state/policies/v1/";

pub fn nodes_of(cluster: &str) -> String {
    format!("{NODES}{cluster}/")
}

pub fn node(cluster: &str, node: &str) -> String {
    format!("{NODES}{cluster}/{node}")
}

/// An identity's labels as Cilium writes them in its keys: each
/// `source:key=value` followed by `;`, sorted.
pub fn labels(l: &LabelSet) -> String {
    let mut out = String::new();
    for s in l.to_strings() {
        out.push_str(&s);
        out.push(';');
    }
    out
}

/// The labels of `labels`-formatted text (`k8s:app=web;reserved:world;`);
/// `None` if a label is not `source:key[=value]`.
pub fn parse_labels(text: &str) -> Option<LabelSet> {
    let mut out = Vec::new();
    for l in text.split(';').filter(|l| !l.is_empty()) {
        let (source, rest) = l.split_once(':')?;
        let (key, value) = rest.split_once('=').unwrap_or((rest, ""));
        if source.is_empty() || key.is_empty() {
            return None;
        }
        out.push(policy::Label::new(source, key, value));
    }
    (!out.is_empty()).then(|| LabelSet::new(out))
}

pub fn identity_id(id: u32) -> String {
    format!("{IDENTITY_IDS}{id}")
}

/// Every node's reference to the identity of `labels` (`labels` as
/// `keys::labels` writes it).
pub fn identity_values(labels: &str) -> String {
    format!("{IDENTITY_VALUES}{labels}/")
}

pub fn identity_value(labels: &str, node: &str) -> String {
    format!("{IDENTITY_VALUES}{labels}/{node}")
}

pub fn identity_lock(labels: &str) -> String {
    format!("{IDENTITY_LOCKS}{labels}")
}

pub fn ips_of(cluster: &str) -> String {
    format!("{IPS}{cluster}/")
}

pub fn ip(cluster: &str, ip: Ipv4Addr) -> String {
    format!("{IPS}{cluster}/{ip}")
}

pub fn policy(key: &str) -> String {
    format!("{POLICIES}{key}")
}

/// The id of an `id/<id>` key.
pub fn id_of(key: &str) -> Option<u32> {
    key.strip_prefix(IDENTITY_IDS)?.parse().ok()
}

/// (labels, node) of a `value/<labels>/<node>` key. Labels may hold `/`
/// (`cidr:10.0.0.0/8`); node names may not.
pub fn value_parts(key: &str) -> Option<(&str, &str)> {
    key.strip_prefix(IDENTITY_VALUES)?.rsplit_once('/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_ciliums() {
        let l = LabelSet::new(vec![
            policy::Label::new("k8s", "io.kubernetes.pod.namespace", "default"),
            policy::Label::new("k8s", "app", "web"),
        ]);
        let text = labels(&l);
        assert_eq!(text, "k8s:app=web;k8s:io.kubernetes.pod.namespace=default;");
        assert_eq!(parse_labels(&text), Some(l));
        let world = LabelSet::new(vec![
            policy::Label::new("reserved", "world", ""),
            policy::Label::new("cidr", "10.0.0.0/8", ""),
        ]);
        assert_eq!(parse_labels(&labels(&world)), Some(world));
        for bad in ["", ";", "app=web;", ":x;", "k8s:;"] {
            assert_eq!(parse_labels(bad), None, "{bad:?}");
        }
        assert_eq!(
            identity_value(&text, "node-1"),
            "cilium/state/identities/v1/value/k8s:app=web;k8s:io.kubernetes.pod.namespace=default;/node-1"
        );
        assert_eq!(
            value_parts(&identity_value("cidr:10.0.0.0/8;", "n")),
            Some(("cidr:10.0.0.0/8;", "n"))
        );
        assert_eq!(identity_id(256), "cilium/state/identities/v1/id/256");
        assert_eq!(id_of("cilium/state/identities/v1/id/256"), Some(256));
        assert_eq!(node("c1", "n1"), "cilium/state/nodes/v1/c1/n1");
        assert_eq!(
            ip("c1", Ipv4Addr::new(10, 0, 1, 5)),
            "cilium/state/ip/v1/c1/10.0.1.5"
        );
    }
}
