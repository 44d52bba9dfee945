//! The validated policy model: what the rest of Fibril reasons about. Every
//! policy kind (CNP, CCNP, Kubernetes NetworkPolicy) is translated into it.

use ipnet::IpNet;
use serde::{Deserialize, Serialize};

use crate::selector::Selector;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PolicyKind {
    #[serde(rename = "CiliumNetworkPolicy")]
    Cnp,
    #[serde(rename = "CiliumClusterwideNetworkPolicy")]
    Ccnp,
    #[serde(rename = "NetworkPolicy")]
    Knp,
}

impl PolicyKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Cnp => "CiliumNetworkPolicy",
            Self::Ccnp => "CiliumClusterwideNetworkPolicy",
            Self::Knp => "NetworkPolicy",
        }
    }
}

/// A policy as imported: its selectors already carry Cilium's namespace
/// injection.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Policy {
    pub kind: PolicyKind,
    pub name: String,
    /// `None` for cluster-wide policies.
    pub namespace: Option<String>,
    pub rules: Vec<Rule>,
    /// Audit mode (annotation `policy.fibril.io/audit-mode: "true"`): what
    /// this policy would deny is forwarded and reported with verdict AUDIT.
    #[serde(default)]
    pub audit: bool,
}

impl Policy {
    /// `namespace/name` (a CiliumNetworkPolicy), `name` (cluster-wide), or
    /// `networkpolicy:namespace/name` (a Kubernetes NetworkPolicy, which
    /// may share its namespace and name with a CiliumNetworkPolicy, as in
    /// Kubernetes: both are in force).
    pub fn key(&self) -> String {
        Policy::key_of(self.kind, self.namespace.as_deref(), &self.name)
    }

    /// `namespace/name`, or `name` cluster-wide: how a policy is named
    /// to people and in flows (with its kind beside it).
    pub fn name_key(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{ns}/{}", self.name),
            None => self.name.clone(),
        }
    }

    /// The key a policy of `kind` named so has.
    pub fn key_of(kind: PolicyKind, namespace: Option<&str>, name: &str) -> String {
        match (kind, namespace) {
            (PolicyKind::Knp, Some(ns)) => format!("{KNP_KEY_PREFIX}{ns}/{name}"),
            (_, Some(ns)) => format!("{ns}/{name}"),
            (_, None) => name.to_string(),
        }
    }
}

/// What a NetworkPolicy's key starts with.
pub const KNP_KEY_PREFIX: &str = "networkpolicy:";

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub selector: Selector,
    /// A host policy's rule (`nodeSelector`): `selector` matches the host
    /// endpoint's labels (`reserved:host` and the node's labels) and no
    /// pod; an endpointSelector rule never selects the host.
    #[serde(default)]
    pub host: bool,
    /// `None`: the rule says nothing about ingress. `Some(_)`, even empty
    /// of allows: endpoints it selects are default-deny for ingress (unless
    /// `ingress_default_deny` is false).
    pub ingress: Option<Vec<PeerRule>>,
    pub egress: Option<Vec<PeerRule>>,
    /// `enableDefaultDeny.ingress` (default true).
    pub ingress_default_deny: bool,
    pub egress_default_deny: bool,
    pub description: String,
}

impl Rule {
    /// Whether this rule applies to the endpoint (pod or host) with `labels`.
    pub fn selects(&self, labels: &crate::labels::LabelSet) -> bool {
        self.host == labels.is_host() && self.selector.matches(labels)
    }
}

/// One ingress or egress rule: peers AND ports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "StoredPeerRule")]
pub struct PeerRule {
    /// `None`: no L3 selector (any peer, when ports or ICMP types are given).
    pub peers: Option<Vec<Peer>>,
    /// `fromRequires`/`toRequires`: ANDed onto every peer of every rule
    /// that selects the same endpoint in this direction.
    pub requires: Vec<Selector>,
    /// `toPorts`, each entry with its own L7 rules. Empty (and no ICMP
    /// types): all ports and protocols.
    pub to_ports: Vec<PortRule>,
    pub icmps: Vec<Icmp>,
    pub deny: bool,
    /// `authentication.mode: required`: allows nothing until mutual
    /// authentication exists.
    pub auth_required: bool,
}

/// One `toPorts` entry: its ports and the L7 rules that apply on them (and
/// on no other port of the rule).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRule {
    /// Empty: every port.
    pub ports: Vec<PortSpec>,
    /// L7 rules on these ports: traffic is redirected to a proxy.
    pub l7: Option<L7>,
}

impl PeerRule {
    /// Whether the rule names no port and no ICMP type (all traffic).
    pub fn all_ports(&self) -> bool {
        self.to_ports.is_empty() && self.icmps.is_empty()
    }

    /// Every port the rule names, of every `toPorts` entry.
    pub fn ports(&self) -> impl Iterator<Item = &PortSpec> {
        self.to_ports.iter().flat_map(|t| &t.ports)
    }

    /// Every L7 rule set of the rule.
    pub fn l7(&self) -> impl Iterator<Item = &L7> {
        self.to_ports.iter().filter_map(|t| t.l7.as_ref())
    }
}

/// A `PeerRule` as the state file holds it, also as agents wrote it before
/// `to_ports` (all ports in `ports`, one `l7` for all of them: read back as
/// one entry, which is what those agents enforced).
#[derive(Deserialize)]
struct StoredPeerRule {
    peers: Option<Vec<Peer>>,
    requires: Vec<Selector>,
    #[serde(default)]
    to_ports: Vec<PortRule>,
    #[serde(default)]
    ports: Vec<PortSpec>,
    #[serde(default)]
    l7: Option<L7>,
    icmps: Vec<Icmp>,
    deny: bool,
    auth_required: bool,
}

impl From<StoredPeerRule> for PeerRule {
    fn from(s: StoredPeerRule) -> Self {
        let mut to_ports = s.to_ports;
        if !s.ports.is_empty() || s.l7.is_some() {
            to_ports.push(PortRule {
                ports: s.ports,
                l7: s.l7,
            });
        }
        PeerRule {
            peers: s.peers,
            requires: s.requires,
            to_ports,
            icmps: s.icmps,
            deny: s.deny,
            auth_required: s.auth_required,
        }
    }
}

/// An L3 peer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Peer {
    Endpoints(Selector),
    Entity(Entity),
    Cidr {
        prefix: IpNet,
        except: Vec<IpNet>,
    },
    /// toFQDNs: IPs learned by the DNS proxy.
    Fqdn(FqdnSelector),
    /// A peer kind this node cannot resolve (services, cloud groups, node
    /// selectors): selects nothing; the reason is reported at import.
    Unresolved(String),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Entity {
    All,
    World,
    WorldIpv4,
    WorldIpv6,
    Cluster,
    Host,
    RemoteNode,
    KubeApiserver,
    Ingress,
    Init,
    Health,
    Unmanaged,
    None,
}

impl Entity {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "all" => Self::All,
            "world" => Self::World,
            "world-ipv4" => Self::WorldIpv4,
            "world-ipv6" => Self::WorldIpv6,
            "cluster" => Self::Cluster,
            "host" => Self::Host,
            "remote-node" => Self::RemoteNode,
            "kube-apiserver" => Self::KubeApiserver,
            "ingress" => Self::Ingress,
            "init" => Self::Init,
            "health" => Self::Health,
            "unmanaged" => Self::Unmanaged,
            "none" => Self::None,
            _ => return None,
        })
    }

    pub const NAMES: [&'static str; 13] = [
        "all",
        "world",
        "world-ipv4",
        "world-ipv6",
        "cluster",
        "host",
        "remote-node",
        "kube-apiserver",
        "ingress",
        "init",
        "health",
        "unmanaged",
        "none",
    ];
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum FqdnSelector {
    MatchName(String),
    MatchPattern(String),
}

/// A DNS name as matched: lower case, with the trailing dot.
pub fn fqdn(name: &str) -> String {
    let mut n = name.to_ascii_lowercase();
    if !n.ends_with('.') {
        n.push('.');
    }
    n
}

/// `*` matches any run of name characters within one label (not `.`).
fn glob(p: &[u8], s: &[u8]) -> bool {
    match p.split_first() {
        None => s.is_empty(),
        Some((b'*', rest)) => {
            let mut i = 0;
            loop {
                if glob(rest, &s[i..]) {
                    return true;
                }
                if i == s.len() || s[i] == b'.' {
                    return false;
                }
                i += 1;
            }
        }
        Some((c, rest)) => s.first() == Some(c) && glob(rest, &s[1..]),
    }
}

impl FqdnSelector {
    /// Cilium's semantics (§3.9): `matchName` is the exact name (any case,
    /// trailing dot optional); in `matchPattern`, `*` alone selects every
    /// name, `*` inside a label stands for any characters of that label, and
    /// a leading `**.` for any depth of subdomains (not the apex).
    pub fn matches(&self, name: &str) -> bool {
        let name = fqdn(name);
        match self {
            Self::MatchName(n) => fqdn(n) == name,
            Self::MatchPattern(p) if p == "*" => true,
            // An escaped byte (`allowed\.example`: one label holding a
            // dot) must not let `*` read the text as other labels.
            Self::MatchPattern(_) if name.contains('\\') => false,
            Self::MatchPattern(p) => {
                let p = fqdn(p);
                match p.strip_prefix("**.") {
                    Some(rest) => name
                        .match_indices('.')
                        .any(|(i, _)| i > 0 && glob(rest.as_bytes(), &name.as_bytes()[i + 1..])),
                    None => glob(p.as_bytes(), name.as_bytes()),
                }
            }
        }
    }

    /// The label (`fqdn:<selector>`) of identities whose addresses a name
    /// this selector matches resolved to.
    pub fn label_key(&self) -> String {
        match self {
            Self::MatchName(n) => fqdn(n),
            Self::MatchPattern(p) => format!("pattern={}", fqdn(p)),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
    Any,
    /// Cilium's extended protocols (no ports): VRRP (112), IGMP (2).
    Vrrp,
    Igmp,
}

impl Protocol {
    /// IP protocol numbers this protocol stands for in the datapath.
    pub fn numbers(self) -> &'static [u8] {
        match self {
            Self::Tcp => &[6],
            Self::Udp => &[17],
            Self::Sctp => &[132],
            Self::Any => &[6, 17, 132],
            Self::Vrrp => &[112],
            Self::Igmp => &[2],
        }
    }

    /// The name a Kubernetes port spec gives it (`TCP`, `UDP`, `SCTP`;
    /// `ANY` is Cilium's).
    pub fn k8s_name(self) -> &'static str {
        match self {
            Self::Tcp => "TCP",
            Self::Udp => "UDP",
            Self::Sctp => "SCTP",
            Self::Any => "ANY",
            Self::Vrrp => "VRRP",
            Self::Igmp => "IGMP",
        }
    }

    pub fn from_k8s_name(name: &str) -> Option<Self> {
        match name {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            "SCTP" => Some(Self::Sctp),
            "ANY" => Some(Self::Any),
            "VRRP" => Some(Self::Vrrp),
            "IGMP" => Some(Self::Igmp),
            _ => None,
        }
    }

    /// Whether the protocol has ports (VRRP and IGMP have none).
    pub fn has_ports(self) -> bool {
        !matches!(self, Self::Vrrp | Self::Igmp)
    }

    pub fn from_number(n: u8) -> Option<Self> {
        match n {
            6 => Some(Self::Tcp),
            17 => Some(Self::Udp),
            132 => Some(Self::Sctp),
            112 => Some(Self::Vrrp),
            2 => Some(Self::Igmp),
            _ => None,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Port {
    /// Every port.
    Any,
    /// `start..=end`.
    Range(u16, u16),
    /// A named container port, resolved per endpoint.
    Named(String),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortSpec {
    pub protocol: Protocol,
    pub port: Port,
}

/// An ICMP type allowed (`icmps`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Icmp {
    pub ipv6: bool,
    pub icmp_type: u8,
}

/// A declared container port, for named-port resolution.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NamedPort {
    pub name: String,
    pub port: u16,
    pub protocol: Protocol,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum L7 {
    Http(Vec<HttpRule>),
    Kafka(Vec<KafkaRule>),
    Dns(Vec<FqdnSelector>),
    Generic {
        proto: String,
        rules: Vec<std::collections::BTreeMap<String, String>>,
    },
}

impl L7 {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Http(_) => "http",
            Self::Kafka(_) => "kafka",
            Self::Dns(_) => "dns",
            Self::Generic { .. } => "l7proto",
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HttpRule {
    pub method: Option<String>,
    pub path: Option<String>,
    pub host: Option<String>,
    /// `Name` or `Name: value`.
    pub headers: Vec<String>,
    pub header_matches: Vec<HeaderMatch>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct HeaderMatch {
    pub name: String,
    pub value: Option<String>,
    /// `namespace/name` of the secret holding the value.
    pub secret: Option<String>,
    pub mismatch: Option<String>,
}

/// The API keys a Kafka rule's `apiKey` may name, by key: Cilium's names
/// (its `APIKeyMap`, keys 0 to 33), matched case-insensitively.
pub const KAFKA_API_KEYS: [&str; 34] = [
    "produce",
    "fetch",
    "offsets",
    "metadata",
    "leaderandisr",
    "stopreplica",
    "updatemetadata",
    "controlledshutdown",
    "offsetcommit",
    "offsetfetch",
    "findcoordinator",
    "joingroup",
    "heartbeat",
    "leavegroup",
    "syncgroup",
    "describegroups",
    "listgroups",
    "saslhandshake",
    "apiversions",
    "createtopics",
    "deletetopics",
    "deleterecords",
    "initproducerid",
    "offsetforleaderepoch",
    "addpartitionstotxn",
    "addoffsetstotxn",
    "endtxn",
    "writetxnmarkers",
    "txnoffsetcommit",
    "describeacls",
    "createacls",
    "deleteacls",
    "describeconfigs",
    "alterconfigs",
];

/// The key a Kafka rule's `apiKey` names (case-insensitive).
pub fn kafka_api_key(name: &str) -> Option<i16> {
    let lower = name.to_ascii_lowercase();
    KAFKA_API_KEYS
        .iter()
        .position(|n| *n == lower)
        .and_then(|k| i16::try_from(k).ok())
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KafkaRule {
    pub role: Option<String>,
    pub api_key: Option<String>,
    pub api_version: Option<String>,
    pub client_id: Option<String>,
    pub topic: Option<String>,
}

#[cfg(test)]
mod fqdn_tests {
    use super::FqdnSelector::{MatchName, MatchPattern};

    #[test]
    fn match_name_is_exact_and_case_insensitive() {
        let s = MatchName("api.github.com".into());
        assert!(s.matches("api.github.com"));
        assert!(s.matches("API.GitHub.com."));
        assert!(!s.matches("github.com"));
        assert!(!s.matches("x.api.github.com"));
    }

    #[test]
    fn match_pattern_follows_cilium() {
        let p = |x: &str| MatchPattern(x.into());
        assert!(p("*").matches("anything.example"));
        assert!(p("*.cilium.io").matches("sub.cilium.io"));
        assert!(!p("*.cilium.io").matches("cilium.io"));
        assert!(!p("*.cilium.io").matches("a.b.cilium.io"));
        assert!(p("sub*.cilium.io").matches("sub1.cilium.io"));
        assert!(p("sub*.cilium.io").matches("sub.cilium.io"));
        assert!(!p("sub*.cilium.io").matches("xsub.cilium.io"));
        assert!(p("**.cilium.io").matches("a.b.cilium.io"));
        assert!(p("**.cilium.io").matches("b.cilium.io"));
        assert!(!p("**.cilium.io").matches("cilium.io"));
        assert!(!p("**.cilium.io").matches("evilcilium.io"));
        assert!(p("api.*.svc.cluster.local").matches("api.shop.svc.cluster.local."));
        // One label holding a dot (presentation `allowed\.example.`) is
        // not two labels: neither `*` nor `**.` reads it so.
        assert!(!p("*.example").matches("allowed\\.example."));
        assert!(!p("**.example").matches("allowed\\.example."));
    }
}

#[cfg(test)]
mod key_tests {
    use super::{Policy, PolicyKind};

    #[test]
    fn a_network_policy_never_shares_a_ciliums_key() {
        let key = |kind, ns| Policy::key_of(kind, ns, "allow");
        assert_eq!(key(PolicyKind::Cnp, Some("shop")), "shop/allow");
        assert_eq!(key(PolicyKind::Ccnp, None), "allow");
        assert_eq!(
            key(PolicyKind::Knp, Some("shop")),
            "networkpolicy:shop/allow"
        );
        assert_ne!(
            key(PolicyKind::Knp, Some("shop")),
            key(PolicyKind::Cnp, Some("shop"))
        );
    }
}
