//! Values, as JSON with Cilium's field names (`node.Node`,
//! `identity.IPIdentityPair`), Fibril's additions after them.

use std::net::Ipv4Addr;

use serde::{Deserialize, Serialize};

/// A node of the cluster (`cilium/state/nodes/v1/<cluster>/<node>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Node {
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "Cluster")]
    pub cluster: String,
    #[serde(rename = "IPAddresses")]
    pub addresses: Vec<NodeAddress>,
    /// The node's pod CIDR (`10.0.1.0/24`).
    #[serde(rename = "IPv4AllocCIDR")]
    pub pod_cidr: String,
    /// Where the node's Hubble API listens (`ip:port`), for peers and the
    /// relay.
    #[serde(rename = "HubbleAddress", default)]
    pub hubble_address: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeAddress {
    /// `InternalIP` for the underlay address tunnels go to.
    #[serde(rename = "Type")]
    pub kind: String,
    #[serde(rename = "IP")]
    pub ip: Ipv4Addr,
}

impl Node {
    /// The address tunnels to this node go to.
    pub fn tunnel_endpoint(&self) -> Option<Ipv4Addr> {
        self.addresses
            .iter()
            .find(|a| a.kind == "InternalIP")
            .map(|a| a.ip)
    }
}

/// An endpoint's address, its identity and the node it lives on
/// (`cilium/state/ip/v1/<cluster>/<ip>`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpIdentity {
    #[serde(rename = "IP")]
    pub ip: Ipv4Addr,
    /// The node's underlay address: the tunnel endpoint.
    #[serde(rename = "HostIP")]
    pub host_ip: Ipv4Addr,
    #[serde(rename = "ID")]
    pub identity: u32,
    /// IPsec key index (unused: 0).
    #[serde(rename = "Key", default)]
    pub key: u8,
    #[serde(rename = "K8sNamespace", default)]
    pub namespace: String,
    #[serde(rename = "K8sPodName", default)]
    pub pod: String,
    /// The node's name (Fibril's: flows name the node of each end).
    #[serde(rename = "NodeName", default)]
    pub node: String,
    /// The pod's declared container ports: other nodes resolve named
    /// ports in their egress rules with them.
    #[serde(rename = "NamedPorts", default, skip_serializing_if = "Vec::is_empty")]
    pub named_ports: Vec<NamedPort>,
}

/// A declared container port (`NamedPorts` of an endpoint's address).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NamedPort {
    #[serde(rename = "Name")]
    pub name: String,
    #[serde(rename = "Port")]
    pub port: u16,
    /// `TCP`, `UDP` or `SCTP`.
    #[serde(rename = "Protocol")]
    pub protocol: String,
}

/// `value` of `key` as JSON of `T`.
pub(crate) fn decode<T: for<'de> Deserialize<'de>>(
    key: &str,
    value: &[u8],
) -> Result<T, crate::Error> {
    serde_json::from_slice(value).map_err(|e| crate::Error::BadValue {
        key: key.to_string(),
        why: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_identity_has_ciliums_field_names() {
        let v = IpIdentity {
            ip: Ipv4Addr::new(10, 0, 1, 5),
            host_ip: Ipv4Addr::new(192, 168, 77, 2),
            identity: 300,
            key: 0,
            namespace: "default".into(),
            pod: "web-1".into(),
            node: "n2".into(),
            named_ports: vec![NamedPort {
                name: "http".into(),
                port: 8080,
                protocol: "TCP".into(),
            }],
        };
        let json = serde_json::to_value(&v).unwrap();
        assert_eq!(json["NamedPorts"][0]["Name"], "http");
        assert_eq!(json["NamedPorts"][0]["Port"], 8080);
        assert_eq!(json["IP"], "10.0.1.5");
        assert_eq!(json["HostIP"], "192.168.77.2");
        assert_eq!(json["ID"], 300);
        assert_eq!(json["K8sPodName"], "web-1");
        let back: IpIdentity = decode("k", json.to_string().as_bytes()).unwrap();
        assert_eq!(back, v);
        assert!(decode::<IpIdentity>("k", b"{").is_err());
    }
}
