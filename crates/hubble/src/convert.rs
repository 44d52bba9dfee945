//! Fibril's flow record <-> `flow.Flow`, field for field; enums are the
//! proto's numbers on both sides (no name looked up).

use proto::flow as pb;

/// Nanoseconds since the epoch of a `Timestamp` (times before it: 0).
pub fn unix_ns(t: &prost_types::Timestamp) -> u64 {
    t.seconds.max(0) as u64 * 1_000_000_000 + t.nanos.max(0) as u64
}

pub fn timestamp(unix_ns: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (unix_ns / 1_000_000_000) as i64,
        nanos: (unix_ns % 1_000_000_000) as i32,
    }
}

fn endpoint(e: &flow::Endpoint) -> pb::Endpoint {
    pb::Endpoint {
        id: e.id,
        identity: e.identity,
        cluster_name: e.cluster_name.clone(),
        namespace: e.namespace.clone(),
        labels: e.labels.clone(),
        pod_name: e.pod_name.clone(),
        workloads: e
            .workloads
            .iter()
            .map(|w| pb::Workload {
                name: w.name.clone(),
                kind: w.kind.clone(),
            })
            .collect(),
    }
}

fn policies(list: &[flow::record::SharedPolicyRef]) -> Vec<pb::Policy> {
    list.iter()
        .map(|p| pb::Policy {
            name: p.name.clone(),
            namespace: p.namespace.clone(),
            labels: p.labels.clone(),
            revision: p.revision,
            kind: p.kind.clone(),
        })
        .collect()
}

/// An agent event as a `flow.AgentEvent` message.
pub fn agent_event(e: &flow::agent_event::AgentEvent) -> pb::AgentEvent {
    use flow::agent_event::Kind;
    use pb::agent_event::Notification;
    let r#type = pb::AgentEventType::from_str_name(e.type_name()).map_or(0, |t| t as i32);
    let notification = match &e.kind {
        Kind::AgentStarted => Notification::AgentStart(pb::TimeNotification {
            time: Some(timestamp(e.time_ns)),
        }),
        Kind::PolicyUpdated {
            labels,
            revision,
            rules,
        }
        | Kind::PolicyDeleted {
            labels,
            revision,
            rules,
        } => Notification::PolicyUpdate(pb::PolicyUpdateNotification {
            labels: labels.clone(),
            revision: *revision,
            rule_count: *rules,
        }),
        Kind::EndpointCreated {
            id,
            namespace,
            pod,
            labels,
        }
        | Kind::EndpointDeleted {
            id,
            namespace,
            pod,
            labels,
        } => Notification::EndpointUpdate(pb::EndpointUpdateNotification {
            id: *id,
            labels: labels.clone(),
            error: String::new(),
            pod_name: pod.clone(),
            namespace: namespace.clone(),
        }),
        Kind::IpcacheUpserted {
            cidr,
            identity,
            old_identity,
            namespace,
            pod,
        } => Notification::IpcacheUpdate(pb::IpCacheNotification {
            cidr: cidr.clone(),
            identity: *identity,
            old_identity: *old_identity,
            namespace: namespace.clone(),
            pod_name: pod.clone(),
            ..Default::default()
        }),
        Kind::IpcacheDeleted {
            cidr,
            identity,
            namespace,
            pod,
        } => Notification::IpcacheUpdate(pb::IpCacheNotification {
            cidr: cidr.clone(),
            identity: *identity,
            namespace: namespace.clone(),
            pod_name: pod.clone(),
            ..Default::default()
        }),
    };
    pb::AgentEvent {
        r#type,
        notification: Some(notification),
    }
}

/// One Fibril flow as a `flow.Flow` message. `drop_reason` and `Summary`
/// are deprecated in the proto, yet clients still read them (the CLI prints
/// `Summary`), so they are filled.
#[allow(deprecated)]
pub fn flow(f: &flow::Flow) -> pb::Flow {
    let l4 = f.l4.as_ref().and_then(|l4| {
        use pb::layer4::Protocol;
        let protocol = if let Some(t) = &l4.tcp {
            Protocol::Tcp(pb::Tcp {
                source_port: t.source_port as u32,
                destination_port: t.destination_port as u32,
                flags: t.flags.as_ref().map(|fl| pb::TcpFlags {
                    fin: fl.fin,
                    syn: fl.syn,
                    rst: fl.rst,
                    psh: fl.psh,
                    ack: fl.ack,
                    urg: fl.urg,
                    ..Default::default()
                }),
            })
        } else if let Some(u) = &l4.udp {
            Protocol::Udp(pb::Udp {
                source_port: u.source_port as u32,
                destination_port: u.destination_port as u32,
            })
        } else if let Some(s) = &l4.sctp {
            Protocol::Sctp(pb::Sctp {
                source_port: s.source_port as u32,
                destination_port: s.destination_port as u32,
            })
        } else if let Some(i) = &l4.icmpv4 {
            Protocol::IcmPv4(pb::IcmPv4 {
                r#type: i.r#type,
                code: i.code,
            })
        } else {
            return None;
        };
        Some(pb::Layer4 {
            protocol: Some(protocol),
        })
    });
    pb::Flow {
        time: (f.time.0 != 0).then(|| timestamp(f.time.0)),
        uuid: f.uuid.clone(),
        verdict: f.verdict.0,
        drop_reason: f.drop_reason,
        ethernet: f.ethernet.as_ref().map(|e| pb::Ethernet {
            source: e.source.to_string(),
            destination: e.destination.to_string(),
        }),
        ip: f.ip.as_ref().map(|ip| pb::Ip {
            source: ip.source.to_string(),
            destination: ip.destination.to_string(),
            ip_version: ip.ip_version.0,
            ..Default::default()
        }),
        l4,
        source: Some(endpoint(&f.source)),
        destination: Some(endpoint(&f.destination)),
        r#type: f.r#type.0,
        node_name: f.node_name.to_string(),
        source_names: f.source_names.clone(),
        destination_names: f.destination_names.clone(),
        source_service: f.source_service.as_deref().map(service),
        destination_service: f.destination_service.as_deref().map(service),
        l7: f.l7.as_ref().map(|l| pb::Layer7 {
            r#type: l.r#type.0,
            latency_ns: l.latency_ns,
            record: match (&l.http, &l.dns) {
                (None, Some(d)) => Some(pb::layer7::Record::Dns(pb::Dns {
                    query: d.query.clone(),
                    ips: d.ips.clone(),
                    ttl: d.ttl,
                    cnames: d.cnames.clone(),
                    observation_source: d.observation_source.clone(),
                    rcode: d.rcode,
                    qtypes: d.qtypes.clone(),
                    rrtypes: d.rrtypes.clone(),
                })),
                (None, None) => l.kafka.as_ref().map(|k| {
                    #[allow(deprecated)] // flow.Kafka is deprecated, still Hubble's record
                    pb::layer7::Record::Kafka(pb::Kafka {
                        error_code: k.error_code,
                        api_version: k.api_version,
                        api_key: k.api_key.clone(),
                        correlation_id: k.correlation_id,
                        topic: k.topic.clone(),
                    })
                }),
                _ => l.http.as_ref().map(|h| {
                    pb::layer7::Record::Http(pb::Http {
                        code: h.code,
                        method: h.method.to_string(),
                        url: h.url.clone(),
                        protocol: h.protocol.to_string(),
                        headers: h
                            .headers
                            .iter()
                            .map(|x| pb::HttpHeader {
                                key: x.key.clone(),
                                value: x.value.clone(),
                            })
                            .collect(),
                    })
                }),
            },
        }),
        event_type: Some(pb::CiliumEventType {
            r#type: f.event_type.r#type,
            sub_type: f.event_type.sub_type,
        }),
        traffic_direction: f.traffic_direction.0,
        trace_observation_point: f.trace_observation_point.0,
        trace_reason: f.trace_reason.0,
        is_reply: f.is_reply,
        drop_reason_desc: f.drop_reason_desc.0,
        interface: f.interface.as_ref().map(|i| pb::NetworkInterface {
            index: i.index,
            name: i.name.to_string(),
        }),
        policy_match_type: f.policy_match_type,
        egress_allowed_by: policies(&f.egress_allowed_by),
        ingress_allowed_by: policies(&f.ingress_allowed_by),
        egress_denied_by: policies(&f.egress_denied_by),
        ingress_denied_by: policies(&f.ingress_denied_by),
        summary: f.summary.to_string(),
        sock_xlate_point: f.sock_xlate_point.0,
        socket_cookie: f.socket_cookie,
        cgroup_id: f.cgroup_id,
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(deprecated)]
    fn converts_every_field_the_cli_reads() {
        let json = r#"{"time":"2026-01-15T10:00:00.123456789Z","uuid":"u1","verdict":"DROPPED","drop_reason":133,"IP":{"source":"10.0.1.10","destination":"10.0.2.20","ipVersion":"IPv4"},"l4":{"TCP":{"source_port":43210,"destination_port":80,"flags":{"SYN":true}}},"source":{"ID":1,"identity":256,"namespace":"default","labels":["k8s:app=a"],"pod_name":"a"},"destination":{"identity":257,"namespace":"default","pod_name":"b"},"Type":"L3_L4","node_name":"n1","event_type":{"type":1,"sub_type":133},"traffic_direction":"INGRESS","is_reply":false,"drop_reason_desc":"POLICY_DENIED","Summary":"TCP Flags: SYN","ingress_denied_by":[{"name":"p","namespace":"default","kind":"CiliumNetworkPolicy"}]}"#;
        let f: flow::Flow = serde_json::from_str(json).unwrap();
        let p = flow(&f);
        assert_eq!(p.time.unwrap().seconds, 1_768_471_200);
        assert_eq!(p.time.unwrap().nanos, 123_456_789);
        assert_eq!(p.verdict, pb::Verdict::Dropped as i32);
        assert_eq!(p.drop_reason_desc, pb::DropReason::PolicyDenied as i32);
        assert_eq!(p.r#type, pb::FlowType::L3L4 as i32);
        assert_eq!(p.traffic_direction, pb::TrafficDirection::Ingress as i32);
        assert_eq!(
            p.ip.as_ref().unwrap().ip_version,
            pb::IpVersion::IPv4 as i32
        );
        let Some(pb::layer4::Protocol::Tcp(t)) = p.l4.unwrap().protocol else {
            panic!("tcp")
        };
        assert_eq!(
            (t.source_port, t.destination_port, t.flags.unwrap().syn),
            (43210, 80, true)
        );
        assert_eq!(p.source.unwrap().pod_name, "a");
        assert_eq!(p.is_reply, Some(false));
        assert_eq!(p.summary, "TCP Flags: SYN");
        assert_eq!(p.ingress_denied_by[0].name, "p");
        assert_eq!(p.event_type.unwrap().sub_type, 133);
    }
}

fn endpoint_back(e: Option<&pb::Endpoint>) -> flow::Endpoint {
    e.map(|e| flow::Endpoint {
        id: e.id,
        identity: e.identity,
        cluster_name: e.cluster_name.clone(),
        namespace: e.namespace.clone(),
        labels: e.labels.clone(),
        pod_name: e.pod_name.clone(),
        workloads: e
            .workloads
            .iter()
            .map(|w| flow::Workload {
                name: w.name.clone(),
                kind: w.kind.clone(),
            })
            .collect(),
    })
    .unwrap_or_default()
}

fn policies_back(list: &[pb::Policy]) -> Vec<flow::record::SharedPolicyRef> {
    list.iter()
        .map(|p| {
            std::sync::Arc::new(flow::record::PolicyRef {
                name: p.name.clone(),
                namespace: p.namespace.clone(),
                labels: p.labels.clone(),
                revision: p.revision,
                kind: p.kind.clone(),
            })
        })
        .collect()
}

/// A `flow.Flow` from any Hubble-compatible server as Fibril's record, for
/// printing (fields Fibril does not model yet, such as L7, are left out).
#[allow(deprecated)]
pub fn from_pb(p: &pb::Flow) -> flow::Flow {
    use flow::record::{Icmp, Layer4, Tcp, TcpFlags, Udp};
    use pb::layer4::Protocol;
    let l4 =
        p.l4.as_ref()
            .and_then(|l| l.protocol.as_ref())
            .map(|proto| {
                let mut out = Layer4::default();
                match proto {
                    Protocol::Tcp(t) => {
                        out.tcp = Some(Tcp {
                            source_port: t.source_port as u16,
                            destination_port: t.destination_port as u16,
                            flags: t.flags.map(|f| TcpFlags {
                                fin: f.fin,
                                syn: f.syn,
                                rst: f.rst,
                                psh: f.psh,
                                ack: f.ack,
                                urg: f.urg,
                            }),
                        })
                    }
                    Protocol::Udp(u) => {
                        out.udp = Some(Udp {
                            source_port: u.source_port as u16,
                            destination_port: u.destination_port as u16,
                        })
                    }
                    Protocol::Sctp(u) => {
                        out.sctp = Some(Udp {
                            source_port: u.source_port as u16,
                            destination_port: u.destination_port as u16,
                        })
                    }
                    Protocol::IcmPv4(i) => {
                        out.icmpv4 = Some(Icmp {
                            r#type: i.r#type,
                            code: i.code,
                        })
                    }
                    _ => {}
                }
                out
            });
    let time = flow::record::Time(p.time.map_or(0, |t| unix_ns(&t)));
    flow::Flow {
        time,
        uuid: p.uuid.clone(),
        verdict: flow::enums::Verdict(p.verdict),
        drop_reason: p.drop_reason,
        ethernet: p.ethernet.as_ref().map(|e| flow::record::Ethernet {
            source: e.source.as_str().into(),
            destination: e.destination.as_str().into(),
        }),
        ip: p.ip.as_ref().map(|ip| flow::record::Ip {
            source: ip.source.as_str().into(),
            destination: ip.destination.as_str().into(),
            ip_version: flow::enums::IpVersion(ip.ip_version),
        }),
        l4,
        source: endpoint_back(p.source.as_ref()).into(),
        destination: endpoint_back(p.destination.as_ref()).into(),
        r#type: flow::enums::FlowType(p.r#type),
        node_name: p.node_name.as_str().into(),
        source_names: p.source_names.clone(),
        destination_names: p.destination_names.clone(),
        source_service: p.source_service.as_ref().map(service_back),
        destination_service: p.destination_service.as_ref().map(service_back),
        l7: p.l7.as_ref().map(|l| flow::record::Layer7 {
            r#type: flow::enums::L7FlowType(l.r#type),
            latency_ns: l.latency_ns,
            dns: match &l.record {
                Some(pb::layer7::Record::Dns(d)) => Some(flow::record::Dns {
                    query: d.query.clone(),
                    ips: d.ips.clone(),
                    ttl: d.ttl,
                    cnames: d.cnames.clone(),
                    observation_source: d.observation_source.clone(),
                    rcode: d.rcode,
                    qtypes: d.qtypes.clone(),
                    rrtypes: d.rrtypes.clone(),
                }),
                _ => None,
            },
            http: match &l.record {
                Some(pb::layer7::Record::Http(h)) => Some(flow::record::Http {
                    code: h.code,
                    method: h.method.clone().into(),
                    url: h.url.clone(),
                    protocol: h.protocol.clone().into(),
                    headers: h
                        .headers
                        .iter()
                        .map(|x| flow::record::HttpHeader {
                            key: x.key.clone(),
                            value: x.value.clone(),
                        })
                        .collect(),
                }),
                _ => None,
            },
            #[allow(deprecated)] // flow.Kafka is deprecated, still Hubble's record
            kafka: match &l.record {
                Some(pb::layer7::Record::Kafka(k)) => Some(flow::record::Kafka {
                    error_code: k.error_code,
                    api_version: k.api_version,
                    api_key: k.api_key.clone(),
                    correlation_id: k.correlation_id,
                    topic: k.topic.clone(),
                }),
                _ => None,
            },
        }),
        event_type: flow::record::EventTypeField {
            r#type: p.event_type.map_or(0, |e| e.r#type),
            sub_type: p.event_type.map_or(0, |e| e.sub_type),
        },
        traffic_direction: flow::enums::TrafficDirection(p.traffic_direction),
        trace_observation_point: flow::enums::TraceObservationPoint(p.trace_observation_point),
        trace_reason: flow::enums::TraceReason(p.trace_reason),
        is_reply: p.is_reply,
        drop_reason_desc: flow::enums::DropReason(p.drop_reason_desc),
        interface: p
            .interface
            .as_ref()
            .map(|i| flow::record::NetworkInterface {
                index: i.index,
                name: i.name.as_str().into(),
            }),
        policy_match_type: p.policy_match_type,
        egress_allowed_by: policies_back(&p.egress_allowed_by),
        ingress_allowed_by: policies_back(&p.ingress_allowed_by),
        egress_denied_by: policies_back(&p.egress_denied_by),
        ingress_denied_by: policies_back(&p.ingress_denied_by),
        summary: p.summary.as_str().into(),
        sock_xlate_point: flow::enums::SocketTranslationPoint(p.sock_xlate_point),
        socket_cookie: p.socket_cookie,
        cgroup_id: p.cgroup_id,
    }
}

#[cfg(test)]
mod roundtrip {
    #[test]
    fn from_pb_inverts_flow() {
        let json = r#"{"time":"2026-01-15T10:00:00.123456789Z","uuid":"u1","verdict":"DROPPED","drop_reason":133,"IP":{"source":"10.0.1.10","destination":"10.0.2.20","ipVersion":"IPv4"},"l4":{"TCP":{"source_port":43210,"destination_port":80,"flags":{"SYN":true}}},"source":{"ID":1,"identity":256,"namespace":"default","labels":["k8s:app=a"],"pod_name":"a"},"destination":{"identity":257,"namespace":"default","pod_name":"b"},"Type":"L3_L4","node_name":"n1","event_type":{"type":1,"sub_type":133},"traffic_direction":"INGRESS","is_reply":false,"drop_reason_desc":"POLICY_DENIED","Summary":"TCP Flags: SYN","ingress_denied_by":[{"name":"p","namespace":"default","kind":"CiliumNetworkPolicy"}]}"#;
        let f: flow::Flow = serde_json::from_str(json).unwrap();
        assert_eq!(super::from_pb(&super::flow(&f)), f);
    }
}

fn service(s: &flow::record::ServiceRef) -> pb::Service {
    pb::Service {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
    }
}

fn service_back(s: &pb::Service) -> flow::record::SharedServiceRef {
    std::sync::Arc::new(flow::record::ServiceRef {
        name: s.name.clone(),
        namespace: s.namespace.clone(),
    })
}
