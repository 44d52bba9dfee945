//! A lab file's `services:`, written as a Kubernetes Service is (name,
//! namespace, clusterIP, selector, ports with targetPort, sessionAffinity,
//! externalIPs). Without Kubernetes the lab is the control plane: each
//! service's backends are the lab's pods its selector picks, sent to every
//! agent (`api::Service`); in a Kubernetes lab the services are applied to
//! the API server as Service objects and the agents follow them there.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use anyhow::bail;
use serde::Deserialize;

use crate::lab::PodSpec;

/// Where the lab's services get addresses when the file gives none:
/// Kubernetes' service range of the lab's API server.
pub const SERVICE_CIDR: &str = crate::k8s::SERVICE_CIDR;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    pub name: String,
    #[serde(default = "default_ns")]
    pub namespace: String,
    /// In the lab's service range (`10.96.0.0/16`); default: the range's
    /// `.10` onwards, one per service, in file order.
    #[serde(rename = "clusterIP", default)]
    pub cluster_ip: Option<Ipv4Addr>,
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    pub ports: Vec<PortSpec>,
    /// `ClientIP` or `None` (default).
    #[serde(rename = "sessionAffinity", default)]
    pub session_affinity: Option<String>,
    /// sessionAffinityConfig.clientIP.timeoutSeconds (default 10800).
    #[serde(rename = "sessionAffinityTimeoutSeconds", default)]
    pub session_affinity_timeout: Option<u32>,
    #[serde(rename = "externalIPs", default)]
    pub external_ips: Vec<Ipv4Addr>,
    /// `Cluster` (default) or `Local`: each node balances over its own
    /// backends only.
    #[serde(rename = "internalTrafficPolicy", default)]
    pub internal_traffic_policy: Option<String>,
    /// `ClusterIP` (the default) or `NodePort`: each port then answers on
    /// every node's address at its `nodePort` too (served by kube-proxy,
    /// or by Fibril with `kubeProxyReplacement: true`).
    #[serde(rename = "type", default)]
    pub type_: Option<String>,
    #[serde(rename = "externalTrafficPolicy", default)]
    pub external_traffic_policy: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSpec {
    #[serde(default)]
    pub name: String,
    pub port: u16,
    /// A number, or the name of a pod's declared port; default: `port`.
    #[serde(rename = "targetPort", default)]
    pub target_port: Option<TargetPort>,
    #[serde(default = "default_protocol")]
    pub protocol: String,
    /// NodePort services: the port on every node (Kubernetes' range).
    #[serde(rename = "nodePort", default)]
    pub node_port: Option<u16>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum TargetPort {
    Number(u16),
    Name(String),
}

fn default_ns() -> String {
    "default".into()
}

fn default_protocol() -> String {
    "TCP".into()
}

/// Kubernetes' default sessionAffinity timeout (3 hours).
const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;

fn service_range() -> ipnet::Ipv4Net {
    SERVICE_CIDR.parse().expect("a CIDR")
}

/// Checks the services of lab file `name`; the error names the field.
pub fn validate(name: &str, services: &[ServiceSpec]) -> anyhow::Result<()> {
    let range = service_range();
    let mut seen = std::collections::BTreeSet::new();
    for (i, s) in services.iter().enumerate() {
        let at = format!("{name}: services[{i}]");
        policy::labels::validate_namespace(&s.namespace)
            .map_err(|e| anyhow::anyhow!("{at}.namespace: {e}"))?;
        policy::labels::validate_object_name("service", &s.name)
            .map_err(|e| anyhow::anyhow!("{at}.name: {e}"))?;
        if !seen.insert((s.namespace.clone(), s.name.clone())) {
            bail!("{at}: service {}/{} appears twice", s.namespace, s.name);
        }
        if let Some(ip) = s.cluster_ip {
            if !range.contains(&ip) || ip == range.network() || ip == range.broadcast() {
                bail!("{at}.clusterIP: {ip} is not an address of the lab's service range {range}");
            }
        }
        if s.ports.is_empty() {
            bail!("{at}.ports: a service needs at least one port");
        }
        for (j, p) in s.ports.iter().enumerate() {
            if api::service::Protocol::parse(&p.protocol).is_none() {
                bail!(
                    "{at}.ports[{j}].protocol: expected TCP or UDP, found {:?}",
                    p.protocol
                );
            }
            if p.port == 0 {
                bail!("{at}.ports[{j}].port: 0 is not a port");
            }
            if let Some(TargetPort::Number(0)) = p.target_port {
                bail!("{at}.ports[{j}].targetPort: 0 is not a port");
            }
        }
        match s.session_affinity.as_deref() {
            None | Some("None") | Some("ClientIP") => {}
            Some(other) => {
                bail!("{at}.sessionAffinity: expected ClientIP or None, found {other:?}")
            }
        }
        if s.session_affinity_timeout == Some(0) {
            bail!("{at}.sessionAffinityTimeoutSeconds: must be at least 1");
        }
        let node_port_type = match s.type_.as_deref() {
            None | Some("ClusterIP") => false,
            Some("NodePort") => true,
            Some(other) => bail!("{at}.type: expected ClusterIP or NodePort, found {other:?}"),
        };
        for (j, p) in s.ports.iter().enumerate() {
            match p.node_port {
                Some(_) if !node_port_type => {
                    bail!("{at}.ports[{j}].nodePort: only with type: NodePort")
                }
                Some(n) if !(30000..=32767).contains(&n) => bail!(
                    "{at}.ports[{j}].nodePort: {n} is outside Kubernetes' NodePort range 30000-32767"
                ),
                None if node_port_type => {
                    bail!("{at}.ports[{j}].nodePort: a NodePort service's ports need one (30000-32767)")
                }
                _ => {}
            }
        }
        match s.external_traffic_policy.as_deref() {
            None | Some("Cluster") => {}
            Some("Local") if node_port_type || !s.external_ips.is_empty() => {}
            Some("Local") => bail!(
                "{at}.externalTrafficPolicy: Local needs type: NodePort or externalIPs (traffic from outside)"
            ),
            Some(other) => {
                bail!("{at}.externalTrafficPolicy: expected Cluster or Local, found {other:?}")
            }
        }
        match s.internal_traffic_policy.as_deref() {
            None | Some("Cluster") | Some("Local") => {}
            Some(other) => {
                bail!("{at}.internalTrafficPolicy: expected Cluster or Local, found {other:?}")
            }
        }
        let model = to_api(s, Ipv4Addr::UNSPECIFIED, &[])?;
        model.validate().map_err(|e| anyhow::anyhow!("{at}: {e}"))?;
    }
    let mut ips = std::collections::BTreeSet::new();
    for (i, ip) in cluster_ips(services).iter().enumerate() {
        if !ips.insert(*ip) {
            bail!("{name}: services[{i}].clusterIP: {ip} is another service's too");
        }
    }
    Ok(())
}

/// Each service's cluster IP: its own, else the next free one from `.10`.
pub fn cluster_ips(services: &[ServiceSpec]) -> Vec<Ipv4Addr> {
    let taken: std::collections::BTreeSet<Ipv4Addr> =
        services.iter().filter_map(|s| s.cluster_ip).collect();
    let mut next = u32::from(service_range().network()) + 10;
    services
        .iter()
        .map(|s| {
            s.cluster_ip.unwrap_or_else(|| {
                while taken.contains(&Ipv4Addr::from(next)) {
                    next += 1;
                }
                next += 1;
                Ipv4Addr::from(next - 1)
            })
        })
        .collect()
}

/// A lab service with the pods its selector picks (those that have an
/// address) as backends, as the agent takes it.
pub fn to_api(
    s: &ServiceSpec,
    cluster_ip: Ipv4Addr,
    pods: &[(&PodSpec, Ipv4Addr)],
) -> anyhow::Result<api::Service> {
    let ports: Vec<api::service::ServicePort> = s
        .ports
        .iter()
        .map(|p| api::service::ServicePort {
            name: p.name.clone(),
            port: p.port,
            protocol: api::service::Protocol::parse(&p.protocol).unwrap_or_default(),
            node_port: p.node_port,
        })
        .collect();
    let selected = pods.iter().filter(|(p, _)| {
        !s.selector.is_empty()
            && p.namespace == s.namespace
            && s.selector.iter().all(|(k, v)| p.labels.get(k) == Some(v))
    });
    let mut backends = Vec::new();
    for (pod, ip) in selected {
        let mut bports = Vec::new();
        for (sp, p) in s.ports.iter().zip(&ports) {
            let target = match &sp.target_port {
                None => Some(sp.port),
                Some(TargetPort::Number(n)) => Some(*n),
                // A named target: the pod's declared port of that name
                // (a pod without one is no backend of this port).
                Some(TargetPort::Name(n)) => pod
                    .ports
                    .iter()
                    .find(|c| &c.name == n && c.protocol == sp.protocol)
                    .map(|c| c.container_port),
            };
            if let Some(port) = target {
                bports.push(api::service::ServicePort { port, ..p.clone() });
            }
        }
        backends.push(api::service::Backend {
            address: *ip,
            ports: bports,
            terminating: false,
            node: pod.node.clone(),
        });
    }
    let affinity = (s.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        s.session_affinity_timeout
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_S)
    });
    let mut addresses = vec![cluster_ip];
    addresses.extend(&s.external_ips);
    Ok(api::Service {
        namespace: s.namespace.clone(),
        name: s.name.clone(),
        addresses,
        ports,
        backends,
        affinity_timeout_s: affinity,
        internal_traffic_local: s.internal_traffic_policy.as_deref() == Some("Local"),
        external_addresses: s.external_ips.clone(),
        external_traffic_local: s.external_traffic_policy.as_deref() == Some("Local"),
    })
}

/// The service as a Kubernetes Service object (a Kubernetes lab applies
/// it with kubectl; the API server's endpoint controller finds its pods).
pub fn to_manifest(s: &ServiceSpec, cluster_ip: Ipv4Addr) -> serde_json::Value {
    let ports: Vec<serde_json::Value> = s
        .ports
        .iter()
        .map(|p| {
            let mut v = serde_json::json!({
                "port": p.port,
                "protocol": p.protocol,
            });
            if !p.name.is_empty() {
                v["name"] = p.name.clone().into();
            }
            if let Some(n) = p.node_port {
                v["nodePort"] = n.into();
            }
            match &p.target_port {
                Some(TargetPort::Number(n)) => v["targetPort"] = (*n).into(),
                Some(TargetPort::Name(n)) => v["targetPort"] = n.clone().into(),
                None => {}
            }
            v
        })
        .collect();
    let mut spec = serde_json::json!({
        "clusterIP": cluster_ip.to_string(),
        "selector": s.selector,
        "ports": ports,
    });
    if let Some(p) = &s.internal_traffic_policy {
        spec["internalTrafficPolicy"] = p.clone().into();
    }
    if let Some(t) = &s.type_ {
        spec["type"] = t.clone().into();
    }
    if let Some(p) = &s.external_traffic_policy {
        spec["externalTrafficPolicy"] = p.clone().into();
    }
    if !s.external_ips.is_empty() {
        spec["externalIPs"] = s.external_ips.iter().map(|i| i.to_string()).collect();
    }
    if s.session_affinity.as_deref() == Some("ClientIP") {
        spec["sessionAffinity"] = "ClientIP".into();
        spec["sessionAffinityConfig"] = serde_json::json!({"clientIP": {
            "timeoutSeconds": s.session_affinity_timeout.unwrap_or(DEFAULT_AFFINITY_TIMEOUT_S)
        }});
    }
    serde_json::json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": s.name, "namespace": s.namespace},
        "spec": spec,
    })
}
