//! The validated policy model: what the rest of Fibril reasons about.

use serde::{Deserialize, Serialize};

use crate::selector::Selector;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum PolicyKind {
    #[serde(rename = "CiliumNetworkPolicy")]
    Cnp,
    #[serde(rename = "CiliumClusterwideNetworkPolicy")]
    Ccnp,
}

impl PolicyKind {
    pub fn name(self) -> &'static str {
        match self {
            Self::Cnp => "CiliumNetworkPolicy",
            Self::Ccnp => "CiliumClusterwideNetworkPolicy",
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
}

impl Policy {
    /// `namespace/name`, or `name` for cluster-wide policies.
    pub fn key(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{ns}/{}", self.name),
            None => self.name.clone(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rule {
    pub selector: Selector,
    /// `None`: the rule says nothing about ingress. `Some(_)`, even empty
    /// of allows: endpoints it selects are default-deny for ingress.
    pub ingress: Option<Vec<PeerRule>>,
    pub egress: Option<Vec<PeerRule>>,
    pub description: String,
}

/// One ingress or egress rule: peers AND ports.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRule {
    /// `None`: no L3 selector (any peer, when ports are given).
    pub peers: Option<Vec<Selector>>,
    /// Empty: all ports and protocols.
    pub ports: Vec<PortRange>,
    pub deny: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
    Any,
}

impl Protocol {
    /// IP protocol numbers this protocol stands for in the datapath.
    pub fn numbers(self) -> &'static [u8] {
        match self {
            Self::Tcp => &[6],
            Self::Udp => &[17],
            Self::Sctp => &[132],
            Self::Any => &[6, 17, 132],
        }
    }
}

/// `start..=end`; `start == 0` means every port.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortRange {
    pub protocol: Protocol,
    pub start: u16,
    pub end: u16,
}
