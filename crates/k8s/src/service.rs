//! A Service and its EndpointSlices -> `api::Service`, as Cilium's agent
//! reads them: the cluster IPs, external IPs and load balancer ingress
//! addresses are the frontends; a ready endpoint is a backend taking new
//! connections, a terminating one that still serves keeps the connections
//! it has (Cilium's graceful termination); the rest are no backends.
//! ExternalName and headless services have nothing to balance.

use std::net::Ipv4Addr;

use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

/// The label an EndpointSlice names its service with.
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

/// Kubernetes' default sessionAffinity timeout (3 hours).
const DEFAULT_AFFINITY_TIMEOUT_S: u32 = 10_800;

/// `namespace/name` of a Service.
pub fn key(svc: &Service) -> String {
    format!(
        "{}/{}",
        svc.metadata.namespace.as_deref().unwrap_or("default"),
        svc.metadata.name.as_deref().unwrap_or_default()
    )
}

/// `namespace/name` of the service an EndpointSlice belongs to.
pub fn slice_service_key(slice: &EndpointSlice) -> Option<String> {
    let svc = slice.metadata.labels.as_ref()?.get(SERVICE_NAME_LABEL)?;
    Some(format!(
        "{}/{svc}",
        slice.metadata.namespace.as_deref().unwrap_or("default")
    ))
}

fn ipv4s<'a, I>(v: I) -> impl Iterator<Item = Ipv4Addr> + 'a
where
    I: IntoIterator<Item = &'a String>,
    I::IntoIter: 'a,
{
    v.into_iter().filter_map(|s| s.parse().ok())
}

/// A Service's or an EndpointSlice's port, when it is a port of TCP or
/// UDP (the protocol defaults to TCP, as the API's).
fn service_port(
    name: Option<&String>,
    port: Option<i32>,
    protocol: Option<&str>,
) -> Option<api::service::ServicePort> {
    Some(api::service::ServicePort {
        name: name.cloned().unwrap_or_default(),
        port: u16::try_from(port?).ok().filter(|p| *p != 0)?,
        protocol: api::service::Protocol::parse(protocol.unwrap_or("TCP"))?,
        node_port: None,
    })
}

/// What the agent balances for `svc` with its `slices`; `None` when there
/// is nothing to balance (ExternalName, headless, no IPv4 address or no
/// TCP/UDP port).
pub fn to_api<'a>(
    svc: &Service,
    slices: impl IntoIterator<Item = &'a EndpointSlice>,
) -> Option<api::Service> {
    let spec = svc.spec.as_ref()?;
    if spec.type_.as_deref() == Some("ExternalName") {
        return None;
    }
    let mut addresses: Vec<Ipv4Addr> = Vec::new();
    match &spec.cluster_ips {
        Some(ips) => addresses.extend(ipv4s(ips)),
        None => addresses.extend(ipv4s(spec.cluster_ip.iter())),
    }
    let mut external: Vec<Ipv4Addr> = ipv4s(spec.external_ips.iter().flatten()).collect();
    if let Some(ingress) = svc
        .status
        .as_ref()
        .and_then(|s| s.load_balancer.as_ref())
        .and_then(|lb| lb.ingress.as_ref())
    {
        external.extend(ipv4s(ingress.iter().filter_map(|i| i.ip.as_ref())));
    }
    addresses.extend(&external);
    addresses.dedup();
    let ports: Vec<api::service::ServicePort> = spec
        .ports
        .iter()
        .flatten()
        .filter_map(|p| {
            let mut sp = service_port(p.name.as_ref(), Some(p.port), p.protocol.as_deref())?;
            sp.node_port = p
                .node_port
                .and_then(|n| u16::try_from(n).ok())
                .filter(|n| *n != 0);
            Some(sp)
        })
        .collect();
    if addresses.is_empty() || ports.is_empty() {
        return None;
    }
    let mut backends = Vec::new();
    for slice in slices {
        if slice.address_type != "IPv4" {
            continue;
        }
        let slice_ports: Vec<api::service::ServicePort> = slice
            .ports
            .iter()
            .flatten()
            .filter_map(|p| service_port(p.name.as_ref(), p.port, p.protocol.as_deref()))
            .collect();
        for ep in slice.endpoints.iter().flatten() {
            let c = ep.conditions.as_ref();
            // Absent conditions mean ready (the API's own reading).
            let ready = c.and_then(|c| c.ready).unwrap_or(true);
            let serving = c.and_then(|c| c.serving).unwrap_or(ready);
            let terminating = c.and_then(|c| c.terminating).unwrap_or(false);
            let state = if ready && !terminating {
                false
            } else if terminating && serving {
                true
            } else {
                continue;
            };
            for address in ipv4s(&ep.addresses) {
                backends.push(api::service::Backend {
                    address,
                    ports: slice_ports.clone(),
                    terminating: state,
                    node: ep.node_name.clone(),
                });
            }
        }
    }
    backends.truncate(api::service::MAX_BACKENDS);
    let affinity = (spec.session_affinity.as_deref() == Some("ClientIP")).then(|| {
        spec.session_affinity_config
            .as_ref()
            .and_then(|c| c.client_ip.as_ref())
            .and_then(|c| c.timeout_seconds)
            .and_then(|t| u32::try_from(t).ok())
            .filter(|t| *t > 0)
            .unwrap_or(DEFAULT_AFFINITY_TIMEOUT_S)
    });
    Some(api::Service {
        namespace: svc
            .metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        name: svc.metadata.name.clone().unwrap_or_default(),
        addresses,
        ports,
        backends,
        affinity_timeout_s: affinity,
        internal_traffic_local: spec.internal_traffic_policy.as_deref() == Some("Local"),
        external_addresses: external,
        external_traffic_local: spec.external_traffic_policy.as_deref() == Some("Local"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> T {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn a_service_and_its_slices_become_frontends_and_backends() {
        let svc: Service = parse(serde_json::json!({
            "metadata": {"name": "web", "namespace": "shop"},
            "spec": {
                "clusterIP": "10.96.0.20", "clusterIPs": ["10.96.0.20"],
                "externalIPs": ["192.0.2.7"],
                "type": "LoadBalancer", "externalTrafficPolicy": "Local",
                "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP", "nodePort": 30080},
                          {"name": "sctp", "port": 90, "protocol": "SCTP"}],
                "sessionAffinity": "ClientIP",
                "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 60}}
            },
            "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.9"}]}}
        }));
        let slice: EndpointSlice = parse(serde_json::json!({
            "metadata": {"name": "web-x", "namespace": "shop",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [
                {"addresses": ["10.0.1.2"], "conditions": {"ready": true}, "nodeName": "a"},
                {"addresses": ["10.0.1.3"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["10.0.1.4"], "conditions": {"ready": false, "serving": false, "terminating": true}},
                {"addresses": ["10.0.1.5"], "conditions": {"ready": false}},
                {"addresses": ["10.0.1.6"]}
            ]
        }));
        assert_eq!(slice_service_key(&slice).as_deref(), Some("shop/web"));
        let s = to_api(&svc, [&slice]).unwrap();
        s.validate().unwrap();
        assert_eq!(s.key(), "shop/web");
        assert_eq!(
            s.addresses,
            ["10.96.0.20", "192.0.2.7", "198.51.100.9"].map(|a| a.parse::<Ipv4Addr>().unwrap())
        );
        assert_eq!(s.ports.len(), 1, "SCTP is not balanced");
        assert_eq!(s.ports[0].node_port, Some(30080));
        assert!(s.external_traffic_local);
        assert_eq!(
            s.external_addresses,
            ["192.0.2.7", "198.51.100.9"].map(|a| a.parse::<Ipv4Addr>().unwrap())
        );
        assert_eq!(s.affinity_timeout_s, Some(60));
        let f = &s.frontends()[0];
        assert_eq!(
            f.active,
            vec![
                "10.0.1.2:8080".parse().unwrap(),
                "10.0.1.6:8080".parse().unwrap()
            ]
        );
        assert_eq!(f.terminating, vec!["10.0.1.3:8080".parse().unwrap()]);
    }

    #[test]
    fn external_name_and_headless_services_balance_nothing() {
        let ext: Service = parse(serde_json::json!({
            "metadata": {"name": "x", "namespace": "d"},
            "spec": {"type": "ExternalName", "externalName": "example.com"}
        }));
        assert!(to_api(&ext, []).is_none());
        let headless: Service = parse(serde_json::json!({
            "metadata": {"name": "x", "namespace": "d"},
            "spec": {"clusterIP": "None", "ports": [{"port": 80}]}
        }));
        assert!(to_api(&headless, []).is_none());
    }
}
