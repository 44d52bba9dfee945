//! A service as the agent load-balances it: a Kubernetes Service with its
//! EndpointSlices (or a lab file's service, its backends the pods its
//! selector picks), reduced to what the datapath needs: the addresses and
//! ports it answers on and, per port, the backends that serve it.

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddrV4};

use serde::{Deserialize, Serialize};

/// The most backends one service may have (its slots in the datapath).
pub const MAX_BACKENDS: usize = 4096;

#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub enum Protocol {
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    #[serde(rename = "UDP")]
    Udp,
}

impl Protocol {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => 6,
            Protocol::Udp => 17,
        }
    }

    /// Kubernetes' spelling (`TCP`, `UDP`); `None` for what Fibril does not
    /// balance (SCTP: the kernel here has none).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "TCP" => Some(Protocol::Tcp),
            "UDP" => Some(Protocol::Udp),
            _ => None,
        }
    }
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
        })
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Service {
    pub namespace: String,
    pub name: String,
    /// Every address its ports answer on: cluster IPs, external IPs, load
    /// balancer ingress IPs.
    #[serde(default)]
    pub addresses: Vec<Ipv4Addr>,
    pub ports: Vec<ServicePort>,
    #[serde(default)]
    pub backends: Vec<Backend>,
    /// sessionAffinity ClientIP: how long a client stays with its backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity_timeout_s: Option<u32>,
    /// `internalTrafficPolicy: Local`: a node balances only over the
    /// backends on itself (none there: the service drops, as kube-proxy's).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub internal_traffic_local: bool,
    /// Which of `addresses` are reached from outside the cluster (external
    /// IPs, load balancer IPs): `external_traffic_local` applies to them
    /// and to node ports, `internal_traffic_local` to the rest.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub external_addresses: Vec<Ipv4Addr>,
    /// `externalTrafficPolicy: Local`: traffic from outside (node ports,
    /// external and load balancer IPs) goes only to the receiving node's
    /// own backends, keeping the client's address.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub external_traffic_local: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServicePort {
    /// Matches the backends' port of the same name (EndpointSlices name
    /// their ports as the service does).
    #[serde(default)]
    pub name: String,
    pub port: u16,
    #[serde(default)]
    pub protocol: Protocol,
    /// The port this service port has on every node's addresses
    /// (NodePort and LoadBalancer services), served by Fibril when it
    /// replaces kube-proxy.
    #[serde(default, skip_serializing_if = "Option::is_none", rename = "nodePort")]
    pub node_port: Option<u16>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Backend {
    pub address: Ipv4Addr,
    pub ports: Vec<ServicePort>,
    /// Going away (EndpointSlice `terminating`, or not ready): no new
    /// connection goes to it; those it has keep it.
    #[serde(default)]
    pub terminating: bool,
    /// The node it runs on, when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

/// A frontend's address, port and protocol: one service answers on it.
pub type FrontendKey = (Ipv4Addr, u16, Protocol);

/// One address and port of a service, with the backends of that port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frontend {
    pub address: Ipv4Addr,
    pub port: u16,
    pub protocol: Protocol,
    /// Backends taking new connections, in a stable order.
    pub active: Vec<SocketAddrV4>,
    /// Backends going away (connections they have stay).
    pub terminating: Vec<SocketAddrV4>,
    /// Reached from outside the cluster (a node port, an external or
    /// load balancer IP): balanced by Maglev where it arrives.
    pub external: bool,
}

impl Service {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Checks what the datapath relies on; the error names the field.
    pub fn validate(&self) -> Result<(), String> {
        policy::labels::validate_namespace(&self.namespace)?;
        policy::labels::validate_object_name("service", &self.name)?;
        let mut seen = BTreeSet::new();
        for p in &self.ports {
            if p.port == 0 {
                return Err(format!("service {}: port 0", self.key()));
            }
            if !seen.insert((p.port, p.protocol)) {
                return Err(format!(
                    "service {}: port {}/{} given twice",
                    self.key(),
                    p.port,
                    p.protocol
                ));
            }
        }
        let names: BTreeSet<&str> = self.ports.iter().map(|p| p.name.as_str()).collect();
        if names.len() != self.ports.len() {
            return Err(format!(
                "service {}: ports need distinct names when there are several",
                self.key()
            ));
        }
        if self.backends.len() > MAX_BACKENDS {
            return Err(format!(
                "service {}: {} backends (at most {MAX_BACKENDS})",
                self.key(),
                self.backends.len()
            ));
        }
        for b in &self.backends {
            if b.ports.iter().any(|p| p.port == 0) {
                return Err(format!(
                    "service {}: backend {} has port 0",
                    self.key(),
                    b.address
                ));
            }
        }
        if self.affinity_timeout_s == Some(0) {
            return Err(format!("service {}: sessionAffinity timeout 0", self.key()));
        }
        Ok(())
    }

    /// Every address, port and protocol the service answers on (its
    /// `frontends`, without their backends: cheap, for conflict checks).
    pub fn frontend_keys(&self) -> Vec<FrontendKey> {
        self.ports
            .iter()
            .flat_map(|p| self.addresses.iter().map(|a| (*a, p.port, p.protocol)))
            .collect()
    }

    /// Every address and port the service answers on, each with the
    /// backends of its port (a backend port of the same name and protocol).
    pub fn frontends(&self) -> Vec<Frontend> {
        self.frontends_on(None)
    }

    /// The frontends as node `node` balances them: with
    /// `internal_traffic_local`, the cluster IPs over its own backends
    /// only, with `external_traffic_local` the external ones likewise (a
    /// backend whose node is unknown counts as everyone's, as a one-node
    /// lab's); node ports on `node_addresses` (none: kube-proxy serves
    /// them).
    pub fn frontends_on(&self, node: Option<&str>) -> Vec<Frontend> {
        self.frontends_with_node_ports(node, &[])
    }

    /// `frontends_on`, with each node port on each of `node_addresses`.
    pub fn frontends_with_node_ports(
        &self,
        node: Option<&str>,
        node_addresses: &[Ipv4Addr],
    ) -> Vec<Frontend> {
        let local = |b: &Backend, only_local: bool| match (node, &b.node) {
            (Some(here), Some(there)) if only_local => here == there,
            _ => true,
        };
        let mut out = Vec::new();
        for port in &self.ports {
            for external in [false, true] {
                let only_local = if external {
                    self.external_traffic_local
                } else {
                    self.internal_traffic_local
                };
                let mut active = BTreeSet::new();
                let mut terminating = BTreeSet::new();
                for b in self.backends.iter().filter(|b| local(b, only_local)) {
                    let Some(bp) = b
                        .ports
                        .iter()
                        .find(|bp| bp.name == port.name && bp.protocol == port.protocol)
                    else {
                        continue;
                    };
                    let at = SocketAddrV4::new(b.address, bp.port);
                    if b.terminating {
                        terminating.insert(at);
                    } else {
                        active.insert(at);
                    }
                }
                // A backend both serving and going away (two slices) serves.
                let terminating: Vec<SocketAddrV4> =
                    terminating.difference(&active).copied().collect();
                let frontend = |address: Ipv4Addr, port_number: u16| Frontend {
                    address,
                    port: port_number,
                    protocol: port.protocol,
                    active: active.iter().copied().collect(),
                    terminating: terminating.clone(),
                    external,
                };
                for address in &self.addresses {
                    if self.external_addresses.contains(address) == external {
                        out.push(frontend(*address, port.port));
                    }
                }
                if let (true, Some(np)) = (external, port.node_port) {
                    out.extend(node_addresses.iter().map(|a| frontend(*a, np)));
                }
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(name: &str, port: u16) -> ServicePort {
        ServicePort {
            name: name.into(),
            port,
            protocol: Protocol::Tcp,
            node_port: None,
        }
    }

    #[test]
    fn each_port_gets_the_backends_of_its_name() {
        let s = Service {
            namespace: "default".into(),
            name: "web".into(),
            addresses: vec![Ipv4Addr::new(10, 96, 0, 10)],
            ports: vec![port("http", 80), port("metrics", 9090)],
            backends: vec![
                Backend {
                    address: Ipv4Addr::new(10, 0, 0, 2),
                    ports: vec![port("http", 8080), port("metrics", 9100)],
                    terminating: false,
                    node: None,
                },
                Backend {
                    address: Ipv4Addr::new(10, 0, 0, 3),
                    ports: vec![port("http", 8080)],
                    terminating: true,
                    node: None,
                },
            ],
            affinity_timeout_s: None,
            internal_traffic_local: false,
            external_addresses: vec![],
            external_traffic_local: false,
        };
        s.validate().unwrap();
        let f = s.frontends();
        assert_eq!(f.len(), 2);
        assert_eq!(f[0].port, 80);
        assert_eq!(f[0].active, vec!["10.0.0.2:8080".parse().unwrap()]);
        assert_eq!(f[0].terminating, vec!["10.0.0.3:8080".parse().unwrap()]);
        assert_eq!(f[1].active, vec!["10.0.0.2:9100".parse().unwrap()]);
        assert!(f[1].terminating.is_empty());
    }

    #[test]
    fn node_ports_and_external_addresses_follow_the_external_policy() {
        let backend = |last: u8, node: &str| Backend {
            address: Ipv4Addr::new(10, 0, 0, last),
            ports: vec![port("", 8080)],
            terminating: false,
            node: Some(node.into()),
        };
        let s = Service {
            namespace: "default".into(),
            name: "web".into(),
            addresses: vec![Ipv4Addr::new(10, 96, 0, 10), Ipv4Addr::new(192, 0, 2, 7)],
            external_addresses: vec![Ipv4Addr::new(192, 0, 2, 7)],
            ports: vec![ServicePort {
                node_port: Some(30080),
                ..port("", 80)
            }],
            backends: vec![backend(2, "a"), backend(3, "b")],
            external_traffic_local: true,
            ..Default::default()
        };
        let node = Ipv4Addr::new(10, 201, 0, 11);
        let f = s.frontends_with_node_ports(Some("a"), &[node]);
        let at = |addr: Ipv4Addr, port: u16| {
            f.iter()
                .find(|f| f.address == addr && f.port == port)
                .unwrap_or_else(|| panic!("no frontend {addr}:{port}: {f:?}"))
        };
        // The cluster IP: every backend, internal.
        let cluster = at(Ipv4Addr::new(10, 96, 0, 10), 80);
        assert!(!cluster.external && cluster.active.len() == 2);
        // The external IP and the node port: this node's backend only.
        for f in [at(Ipv4Addr::new(192, 0, 2, 7), 80), at(node, 30080)] {
            assert!(f.external);
            assert_eq!(f.active, vec!["10.0.0.2:8080".parse().unwrap()]);
        }
        assert_eq!(f.len(), 3);
        // Without node addresses (kube-proxy serves node ports): none.
        assert_eq!(s.frontends_on(Some("a")).len(), 2);
        // The conflict check's keys are the frontends' (node ports aside).
        let mut keys: Vec<FrontendKey> = s
            .frontends()
            .iter()
            .map(|f| (f.address, f.port, f.protocol))
            .collect();
        keys.sort();
        let mut cheap = s.frontend_keys();
        cheap.sort();
        assert_eq!(cheap, keys);
    }

    #[test]
    fn internal_traffic_local_balances_over_the_nodes_own_backends() {
        let backend = |last: u8, node: Option<&str>| Backend {
            address: Ipv4Addr::new(10, 0, 0, last),
            ports: vec![port("", 8080)],
            terminating: false,
            node: node.map(String::from),
        };
        let mut s = Service {
            namespace: "default".into(),
            name: "web".into(),
            addresses: vec![Ipv4Addr::new(10, 96, 0, 10)],
            ports: vec![port("", 80)],
            backends: vec![
                backend(2, Some("a")),
                backend(3, Some("b")),
                backend(4, None),
            ],
            ..Default::default()
        };
        let active = |s: &Service, node| s.frontends_on(node)[0].active.len();
        assert_eq!(active(&s, Some("a")), 3, "Cluster: every backend");
        s.internal_traffic_local = true;
        assert_eq!(
            s.frontends_on(Some("a"))[0].active,
            vec![
                "10.0.0.2:8080".parse().unwrap(),
                "10.0.0.4:8080".parse().unwrap()
            ]
        );
        assert_eq!(active(&s, Some("c")), 1, "only the one of no known node");
        assert_eq!(active(&s, None), 3);
    }

    #[test]
    fn bad_services_are_refused_with_the_field() {
        let mut s = Service {
            namespace: "default".into(),
            name: "web".into(),
            ports: vec![port("a", 80), port("b", 80)],
            ..Default::default()
        };
        assert!(s.validate().unwrap_err().contains("80/TCP given twice"));
        s.ports = vec![port("", 80), port("", 81)];
        assert!(s.validate().unwrap_err().contains("distinct names"));
        s.ports = vec![port("", 0)];
        assert!(s.validate().unwrap_err().contains("port 0"));
        s.ports = vec![port("", 80)];
        s.name = "Web_1".into();
        assert!(s.validate().unwrap_err().contains("service name"));
    }
}
