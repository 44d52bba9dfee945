//! The XDP prefilter as the agent's API changes it (`fibril prefilter`,
//! Cilium's `cilium prefilter`): source prefixes dropped on the node's
//! device before the stack (`bpf/xdp.bpf.c`). The kernel's pinned map is
//! the state: it outlives the agent, as the attachment does.

use std::net::Ipv4Addr;
use std::sync::Arc;

use datapath::{Datapath, PrefilterMode};
use ipnet::Ipv4Net;

use crate::{invalid, Error};

pub struct Prefilter {
    datapath: Arc<Datapath>,
    /// The device and mode it is attached with, when enabled.
    device: Option<(String, PrefilterMode)>,
}

fn mode_name(mode: PrefilterMode) -> &'static str {
    match mode {
        PrefilterMode::Native => "native",
        PrefilterMode::Generic => "generic",
    }
}

/// A prefix as given: a network address with its length.
fn parse_cidr(text: &str) -> Result<Ipv4Net, Error> {
    let net: Ipv4Net = text
        .trim()
        .parse()
        .map_err(|_| invalid(format!("{text:?}: expected an IPv4 prefix A.B.C.D/N")))?;
    if net != net.trunc() {
        return Err(invalid(format!(
            "{text}: not a network address (did you mean {}?)",
            net.trunc()
        )));
    }
    Ok(net)
}

impl Prefilter {
    /// Attaches the prefilter to `device` when one is given.
    pub fn start(
        datapath: Arc<Datapath>,
        device: Option<(String, PrefilterMode)>,
    ) -> Result<Self, Error> {
        if let Some((ifname, mode)) = &device {
            datapath.attach_prefilter(ifname, *mode)?;
        }
        Ok(Prefilter { datapath, device })
    }

    pub fn list(&self) -> Result<api::PrefilterInfo, Error> {
        let counters = self.datapath.prefilter_counters()?;
        Ok(api::PrefilterInfo {
            device: self.device.as_ref().map(|(d, _)| d.clone()),
            mode: self
                .device
                .as_ref()
                .map(|(_, m)| mode_name(*m).to_string())
                .unwrap_or_default(),
            cidrs: self
                .datapath
                .prefilter_entries()?
                .into_iter()
                .map(|(a, l)| format!("{a}/{l}"))
                .collect(),
            dropped_packets: counters.dropped_packets,
            dropped_bytes: counters.dropped_bytes,
            passed_packets: counters.passed_packets,
        })
    }

    /// Adds and removes prefixes: every one checked first (a prefix
    /// holding an address of this node or of another known node is
    /// refused: it would cut the cluster apart), then written.
    pub fn update(
        &self,
        add: &[String],
        remove: &[String],
        nodes: &[(Ipv4Addr, String)],
    ) -> Result<(), Error> {
        if self.device.is_none() {
            return Err(Error::Conflict(
                "the XDP prefilter is not enabled on this node: start fibril-agent with --prefilter-device IFNAME".into(),
            ));
        }
        let add: Vec<Ipv4Net> = add
            .iter()
            .map(|c| parse_cidr(c))
            .collect::<Result<_, _>>()?;
        let remove: Vec<Ipv4Net> = remove
            .iter()
            .map(|c| parse_cidr(c))
            .collect::<Result<_, _>>()?;
        for net in &add {
            if let Some((addr, who)) = nodes.iter().find(|(a, _)| net.contains(a)) {
                return Err(invalid(format!(
                    "{net} holds {addr} ({who}): the prefilter would cut that node off"
                )));
            }
        }
        let have = self.datapath.prefilter_entries()?;
        let after = have.len() + add.len();
        if after > api::PREFILTER_MAX {
            return Err(invalid(format!(
                "{after} prefixes: the prefilter holds at most {}",
                api::PREFILTER_MAX
            )));
        }
        let pairs = |v: &[Ipv4Net]| -> Vec<(Ipv4Addr, u32)> {
            v.iter()
                .map(|n| (n.network(), u32::from(n.prefix_len())))
                .collect()
        };
        self.datapath
            .prefilter_update(&pairs(&add), &pairs(&remove))?;
        tracing::info!(added = ?add, removed = ?remove, "XDP prefilter updated");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_network_addresses() {
        assert_eq!(
            parse_cidr("198.51.100.0/24").unwrap(),
            "198.51.100.0/24".parse::<Ipv4Net>().unwrap()
        );
        let e = parse_cidr("198.51.100.7/24").unwrap_err().to_string();
        assert!(e.contains("did you mean 198.51.100.0/24"), "{e}");
        let e = parse_cidr("198.51.100.0/33").unwrap_err().to_string();
        assert!(e.contains("expected an IPv4 prefix"), "{e}");
        assert!(parse_cidr("2001:db8::/32").is_err());
    }
}
