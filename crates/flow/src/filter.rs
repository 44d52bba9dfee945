//! Flow filters with `hubble observe`'s meanings: each set field must match
//! (AND); the values of one field are alternatives (OR).

use serde::{Deserialize, Serialize};

use crate::record::{Endpoint, Flow};

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    /// Flows from or to pods of these namespaces.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub namespace: Vec<String>,
    /// Flows from or to these pods: `ns/name-prefix` (or `name-prefix` in
    /// `default`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pod: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub from_pod: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub to_pod: Vec<String>,
    /// FORWARDED, DROPPED, AUDIT, ...
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub verdict: Vec<String>,
    /// tcp, udp, icmp, sctp (case-insensitive).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub protocol: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FilterError {
    #[error("unknown verdict {0:?}: expected one of FORWARDED, DROPPED, ERROR, AUDIT, REDIRECTED, TRACED, TRANSLATED")]
    Verdict(String),
    #[error("unknown protocol {0:?}: expected one of tcp, udp, sctp, icmp, icmpv4")]
    Protocol(String),
}

const VERDICTS: [&str; 7] = [
    "FORWARDED",
    "DROPPED",
    "ERROR",
    "AUDIT",
    "REDIRECTED",
    "TRACED",
    "TRANSLATED",
];
const PROTOCOLS: [&str; 5] = ["tcp", "udp", "sctp", "icmp", "icmpv4"];

fn pod_matches(pattern: &str, ep: &Endpoint) -> bool {
    let (ns, prefix) = pattern.split_once('/').unwrap_or(("default", pattern));
    !ep.pod_name.is_empty() && ep.namespace == ns && ep.pod_name.starts_with(prefix)
}

impl Filter {
    /// Checks the filter's values; a bad one is an error, never "no match".
    pub fn validate(&self) -> Result<(), FilterError> {
        if let Some(v) = self
            .verdict
            .iter()
            .find(|v| !VERDICTS.contains(&v.to_uppercase().as_str()))
        {
            return Err(FilterError::Verdict(v.clone()));
        }
        if let Some(p) = self
            .protocol
            .iter()
            .find(|p| !PROTOCOLS.contains(&p.to_lowercase().as_str()))
        {
            return Err(FilterError::Protocol(p.clone()));
        }
        Ok(())
    }

    pub fn matches(&self, f: &Flow) -> bool {
        let any = |list: &[String], pred: &dyn Fn(&str) -> bool| {
            list.is_empty() || list.iter().any(|v| pred(v))
        };
        any(&self.namespace, &|ns| {
            f.source.namespace == ns || f.destination.namespace == ns
        }) && any(&self.pod, &|p| {
            pod_matches(p, &f.source) || pod_matches(p, &f.destination)
        }) && any(&self.from_pod, &|p| pod_matches(p, &f.source))
            && any(&self.to_pod, &|p| pod_matches(p, &f.destination))
            && any(&self.verdict, &|v| f.verdict.eq_ignore_ascii_case(v))
            && any(&self.protocol, &|p| {
                let l4 = match &f.l4 {
                    Some(l4) => l4,
                    None => return false,
                };
                match p.to_lowercase().as_str() {
                    "tcp" => l4.tcp.is_some(),
                    "udp" => l4.udp.is_some(),
                    "sctp" => l4.sctp.is_some(),
                    "icmp" | "icmpv4" => l4.icmpv4.is_some(),
                    _ => false,
                }
            })
    }
}
