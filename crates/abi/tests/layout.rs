//! Tier 2: the Rust mirrors must agree with the C header, byte for byte.
//! Compiles a small C program against `bpf/include/fibril_abi.h` that prints
//! every size, field offset and enum value, and compares with Rust.

use std::collections::HashMap;
use std::mem::{offset_of, size_of};
use std::path::PathBuf;
use std::process::Command;

use fibril_abi::*;

const PROBE: &str = r#"
#include <stdio.h>
#include <stddef.h>
#include "fibril_abi.h"
#define S(t) printf("sizeof " #t " %zu\n", sizeof(struct t));
#define O(t, f) printf("offsetof " #t "." #f " %zu\n", offsetof(struct t, f));
#define E(n) printf("enum " #n " %d\n", (int)(n));
int main(void) {
  S(ipcache_key) S(ipcache_value) S(endpoint_key) S(endpoint_info) S(policy_key)
  S(policy_value) S(ct_key) S(ct_value) S(flow_event) S(ct_budget) S(sock_key) S(plain_key) S(host_endpoint)
  O(sock_key, local_ip) O(sock_key, remote_ip) O(sock_key, local_port) O(sock_key, remote_port)
  O(plain_key, sock) O(plain_key, side)
  O(ct_budget, entries) O(ct_budget, overflows)
  O(ipcache_value, identity) O(ipcache_value, tunnel_endpoint)
  O(endpoint_info, ep_id) O(endpoint_info, identity) O(endpoint_info, host_ifindex)
  O(endpoint_info, flags) O(endpoint_info, pod_mac) O(endpoint_info, host_mac)
  O(policy_key, ep_id) O(policy_key, identity) O(policy_key, direction)
  O(policy_key, protocol) O(policy_key, dport)
  O(policy_value, cookie) O(policy_value, flags) O(policy_value, prefix)
  O(ct_key, saddr) O(ct_key, daddr) O(ct_key, sport) O(ct_key, dport) O(ct_key, protocol)
  O(ct_key, direction)
  O(ct_value, expires_ns) O(ct_value, packets) O(ct_value, bytes) O(ct_value, last_report_ns)
  O(ct_value, policy_cookie) O(ct_value, tx_flags_seen) O(ct_value, rx_flags_seen)
  O(ct_value, closing) O(ct_value, flags) O(ct_value, backend_id) O(ct_value, rev_nat)
  S(lb_service_key) S(lb_service) S(lb_backend) S(lb_reverse_nat) S(lb_affinity_key) S(lb_affinity)
  O(lb_service_key, address) O(lb_service_key, dport) O(lb_service_key, slot)
  O(lb_service_key, protocol) O(lb_service_key, scope)
  O(lb_service, backend_id) O(lb_service, count) O(lb_service, rev_nat)
  O(lb_service, affinity_timeout_s) O(lb_service, flags)
  O(lb_backend, address) O(lb_backend, port) O(lb_backend, protocol) O(lb_backend, flags)
  O(lb_reverse_nat, address) O(lb_reverse_nat, port)
  O(lb_affinity_key, client) O(lb_affinity_key, rev_nat)
  O(lb_affinity, last_used_ns) O(lb_affinity, backend_id)
  O(flow_event, svc_addr) O(flow_event, svc_port) O(flow_event, svc_side)
  O(flow_event, sock_cookie) O(flow_event, cgroup_id) E(EVENT_TRACE_SOCK)
  E(SOCK_XLATE_PRE_FWD) E(SOCK_XLATE_POST_FWD) E(SOCK_XLATE_PRE_REV) E(SOCK_XLATE_POST_REV)
  E(VERDICT_TRACED) E(VERDICT_TRANSLATED)
  S(lb_sock_key) O(lb_sock_key, cookie) O(lb_sock_key, address) O(lb_sock_key, port)
  S(prefilter_key) S(prefilter_value) S(prefilter_stats)
  O(prefilter_stats, dropped_packets) O(prefilter_stats, dropped_bytes)
  O(prefilter_stats, passed_packets) O(prefilter_stats, last_event_ns)
  E(DROP_NO_SERVICE) E(CT_DIR_SERVICE) E(SVC_SIDE_NONE) E(SVC_SIDE_DESTINATION)
  E(SVC_SIDE_SOURCE) E(LB_SVC_F_AFFINITY) E(LB_SVC_F_EXTERNAL) E(LB_MAGLEV_DEFAULT_SIZE) E(CT_DIR_NODEPORT) E(NODEPORT_MASQ_MARK) E(NODEPORT_LOCAL_MARK) E(CT_F_NODEPORT)
  O(flow_event, ts_ns) O(flow_event, type) O(flow_event, subtype) O(flow_event, direction)
  O(flow_event, verdict) O(flow_event, ct_state) O(flow_event, protocol)
  O(flow_event, tcp_flags) O(flow_event, ip_version) O(flow_event, ep_id)
  O(flow_event, src_identity) O(flow_event, dst_identity) O(flow_event, ifindex)
  O(flow_event, saddr) O(flow_event, daddr) O(flow_event, sport) O(flow_event, dport)
  O(flow_event, pkt_len) O(flow_event, policy_match) O(flow_event, policy_cookie)
  O(flow_event, smac) O(flow_event, dmac)
  E(ID_HOST) E(ID_WORLD) E(ID_UNMANAGED) E(ID_HEALTH) E(ID_INIT) E(ID_REMOTE_NODE)
  E(ID_KUBE_APISERVER) E(ID_INGRESS) E(ID_WORLD_IPV4) E(ID_WORLD_IPV6)
  E(EVENT_DROP) E(EVENT_TRACE) E(EVENT_POLICY_VERDICT)
  E(DROP_INVALID_SOURCE_IP) E(DROP_POLICY_DENIED) E(DROP_INVALID_PACKET)
  E(DROP_CT_INVALID_HEADER) E(DROP_UNSUPPORTED_L3) E(DROP_UNKNOWN_L4)
  E(DROP_CT_MAP_INSERT_FAILED) E(DROP_NAT_NO_MAPPING) E(DROP_UNROUTABLE) E(DROP_INVALID_IDENTITY) E(DROP_FRAG_NOT_FOUND) E(DROP_POLICY_DENY) E(DROP_SOCKET_LOOKUP_FAILED)
  E(DROP_SOCKET_ASSIGN_FAILED) E(DROP_PROXY_UNSUPPORTED) E(CT_F_PROXY_REDIRECT) E(CT_F_FROM_PROXY)
  E(CT_F_DNS) E(POLICY_F_REDIRECT_DNS)
  E(TRACE_TO_LXC) E(TRACE_TO_PROXY) E(TRACE_TO_HOST) E(TRACE_TO_STACK) E(TRACE_TO_OVERLAY)
  E(TRACE_FROM_LXC) E(TRACE_FROM_OVERLAY) E(TRACE_FROM_NETWORK) E(TRACE_TO_NETWORK)
  E(EP_F_AUDIT_ALL) E(EP_F_HOST_FIREWALL) E(HOST_ENDPOINT_ID)
  E(VERDICT_FORWARDED) E(VERDICT_DROPPED) E(VERDICT_AUDIT)
  E(CT_NEW) E(CT_ESTABLISHED) E(CT_REPLY) E(CT_RELATED)
  E(DIR_INGRESS) E(DIR_EGRESS)
  E(MATCH_NONE) E(MATCH_L3_ONLY) E(MATCH_L3_L4) E(MATCH_L4_ONLY) E(MATCH_ALL)
  E(MATCH_L3_PROTO) E(MATCH_PROTO_ONLY)
  E(EP_F_INGRESS_ENFORCED) E(EP_F_EGRESS_ENFORCED) E(POLICY_F_DENY)
  E(EP_F_INGRESS_AUDIT) E(EP_F_EGRESS_AUDIT) E(POLICY_F_AUDIT) E(POLICY_F_REDIRECT)
  E(POLICY_STATIC_PREFIX_BITS) E(POLICY_FULL_PREFIX_BITS)
  return 0;
}
"#;

fn c_layout() -> HashMap<String, usize> {
    let include = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../bpf/include");
    let dir = std::env::temp_dir().join(format!("fibril-abi-probe-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let src = dir.join("probe.c");
    let bin = dir.join("probe");
    std::fs::write(&src, PROBE).unwrap();
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let out = Command::new(&cc)
        .arg("-I")
        .arg(&include)
        .arg(&src)
        .arg("-o")
        .arg(&bin)
        .output()
        .expect("a C compiler (cc) is needed for the ABI layout test");
    assert!(
        out.status.success(),
        "compiling the layout probe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let run = Command::new(&bin).output().unwrap();
    std::fs::remove_dir_all(&dir).ok();
    String::from_utf8(run.stdout)
        .unwrap()
        .lines()
        .map(|l| {
            let mut it = l.split_whitespace();
            let (_, name, val) = (it.next(), it.next().unwrap(), it.next().unwrap());
            (name.to_string(), val.parse().unwrap())
        })
        .collect()
}

#[test]
fn sizes_offsets_and_enums_match_the_c_header() {
    let c = c_layout();
    let mut rust: Vec<(&str, usize)> = vec![
        ("ipcache_key", 8),
        ("ipcache_value", size_of::<IpcacheValue>()),
        ("endpoint_key", size_of::<EndpointKey>()),
        ("endpoint_info", size_of::<EndpointInfo>()),
        ("policy_key", 4 + size_of::<PolicyKeyData>()),
        ("policy_value", size_of::<PolicyValue>()),
        ("ct_key", size_of::<CtKey>()),
        ("ct_value", size_of::<CtValue>()),
        ("ct_budget", size_of::<CtBudget>()),
        ("sock_key", size_of::<SockKey>()),
        ("plain_key", size_of::<PlainKey>()),
        ("sock_key.local_ip", offset_of!(SockKey, local_ip)),
        ("sock_key.remote_ip", offset_of!(SockKey, remote_ip)),
        ("sock_key.local_port", offset_of!(SockKey, local_port)),
        ("sock_key.remote_port", offset_of!(SockKey, remote_port)),
        ("plain_key.sock", offset_of!(PlainKey, sock)),
        ("plain_key.side", offset_of!(PlainKey, side)),
        ("ct_budget.entries", offset_of!(CtBudget, entries)),
        ("ct_budget.overflows", offset_of!(CtBudget, overflows)),
        ("flow_event", size_of::<FlowEvent>()),
        ("ipcache_value.identity", offset_of!(IpcacheValue, identity)),
        (
            "ipcache_value.tunnel_endpoint",
            offset_of!(IpcacheValue, tunnel_endpoint),
        ),
        ("endpoint_info.ep_id", offset_of!(EndpointInfo, ep_id)),
        ("endpoint_info.identity", offset_of!(EndpointInfo, identity)),
        (
            "endpoint_info.host_ifindex",
            offset_of!(EndpointInfo, host_ifindex),
        ),
        ("endpoint_info.flags", offset_of!(EndpointInfo, flags)),
        ("endpoint_info.pod_mac", offset_of!(EndpointInfo, pod_mac)),
        ("endpoint_info.host_mac", offset_of!(EndpointInfo, host_mac)),
        // The LPM key's data follows the 4-byte prefixlen.
        ("policy_key.ep_id", 4 + offset_of!(PolicyKeyData, ep_id)),
        (
            "policy_key.identity",
            4 + offset_of!(PolicyKeyData, identity),
        ),
        (
            "policy_key.direction",
            4 + offset_of!(PolicyKeyData, direction),
        ),
        (
            "policy_key.protocol",
            4 + offset_of!(PolicyKeyData, protocol),
        ),
        ("policy_key.dport", 4 + offset_of!(PolicyKeyData, dport)),
        ("policy_value.cookie", offset_of!(PolicyValue, cookie)),
        ("policy_value.flags", offset_of!(PolicyValue, flags)),
        ("policy_value.prefix", offset_of!(PolicyValue, prefix)),
        ("ct_key.saddr", offset_of!(CtKey, saddr)),
        ("ct_key.daddr", offset_of!(CtKey, daddr)),
        ("ct_key.sport", offset_of!(CtKey, sport)),
        ("ct_key.dport", offset_of!(CtKey, dport)),
        ("ct_key.protocol", offset_of!(CtKey, protocol)),
        ("ct_key.direction", offset_of!(CtKey, direction)),
        ("ct_value.expires_ns", offset_of!(CtValue, expires_ns)),
        ("ct_value.packets", offset_of!(CtValue, packets)),
        ("ct_value.bytes", offset_of!(CtValue, bytes)),
        (
            "ct_value.last_report_ns",
            offset_of!(CtValue, last_report_ns),
        ),
        ("ct_value.policy_cookie", offset_of!(CtValue, policy_cookie)),
        ("ct_value.tx_flags_seen", offset_of!(CtValue, tx_flags_seen)),
        ("ct_value.rx_flags_seen", offset_of!(CtValue, rx_flags_seen)),
        ("ct_value.closing", offset_of!(CtValue, closing)),
        ("ct_value.flags", offset_of!(CtValue, flags)),
        ("flow_event.ts_ns", offset_of!(FlowEvent, ts_ns)),
        ("flow_event.type", offset_of!(FlowEvent, r#type)),
        ("flow_event.subtype", offset_of!(FlowEvent, subtype)),
        ("flow_event.direction", offset_of!(FlowEvent, direction)),
        ("flow_event.verdict", offset_of!(FlowEvent, verdict)),
        ("flow_event.ct_state", offset_of!(FlowEvent, ct_state)),
        ("flow_event.protocol", offset_of!(FlowEvent, protocol)),
        ("flow_event.tcp_flags", offset_of!(FlowEvent, tcp_flags)),
        ("flow_event.ip_version", offset_of!(FlowEvent, ip_version)),
        ("flow_event.ep_id", offset_of!(FlowEvent, ep_id)),
        (
            "flow_event.src_identity",
            offset_of!(FlowEvent, src_identity),
        ),
        (
            "flow_event.dst_identity",
            offset_of!(FlowEvent, dst_identity),
        ),
        ("flow_event.ifindex", offset_of!(FlowEvent, ifindex)),
        ("flow_event.saddr", offset_of!(FlowEvent, saddr)),
        ("flow_event.daddr", offset_of!(FlowEvent, daddr)),
        ("flow_event.sport", offset_of!(FlowEvent, sport)),
        ("flow_event.dport", offset_of!(FlowEvent, dport)),
        ("flow_event.pkt_len", offset_of!(FlowEvent, pkt_len)),
        (
            "flow_event.policy_match",
            offset_of!(FlowEvent, policy_match),
        ),
        (
            "flow_event.policy_cookie",
            offset_of!(FlowEvent, policy_cookie),
        ),
        ("flow_event.smac", offset_of!(FlowEvent, smac)),
        ("flow_event.dmac", offset_of!(FlowEvent, dmac)),
        ("flow_event.svc_addr", offset_of!(FlowEvent, svc_addr)),
        ("flow_event.svc_port", offset_of!(FlowEvent, svc_port)),
        ("flow_event.svc_side", offset_of!(FlowEvent, svc_side)),
        ("flow_event.sock_cookie", offset_of!(FlowEvent, sock_cookie)),
        ("flow_event.cgroup_id", offset_of!(FlowEvent, cgroup_id)),
        ("EVENT_TRACE_SOCK", EventType::TraceSock as usize),
        ("SOCK_XLATE_PRE_FWD", sock_xlate::PRE_FWD as usize),
        ("SOCK_XLATE_POST_FWD", sock_xlate::POST_FWD as usize),
        ("SOCK_XLATE_PRE_REV", sock_xlate::PRE_REV as usize),
        ("SOCK_XLATE_POST_REV", sock_xlate::POST_REV as usize),
        ("VERDICT_TRACED", verdict::TRACED as usize),
        ("VERDICT_TRANSLATED", verdict::TRANSLATED as usize),
        ("ct_value.backend_id", offset_of!(CtValue, backend_id)),
        ("ct_value.rev_nat", offset_of!(CtValue, rev_nat)),
        ("lb_service_key", size_of::<LbServiceKey>()),
        ("lb_service", size_of::<LbService>()),
        ("lb_backend", size_of::<LbBackend>()),
        ("lb_reverse_nat", size_of::<LbReverseNat>()),
        ("lb_affinity_key", size_of::<LbAffinityKey>()),
        ("lb_affinity", size_of::<LbAffinity>()),
        ("lb_service_key.address", offset_of!(LbServiceKey, address)),
        ("lb_service_key.dport", offset_of!(LbServiceKey, dport)),
        ("lb_service_key.slot", offset_of!(LbServiceKey, slot)),
        (
            "lb_service_key.protocol",
            offset_of!(LbServiceKey, protocol),
        ),
        ("lb_service_key.scope", offset_of!(LbServiceKey, scope)),
        ("lb_service.backend_id", offset_of!(LbService, backend_id)),
        ("lb_service.count", offset_of!(LbService, count)),
        ("lb_service.rev_nat", offset_of!(LbService, rev_nat)),
        (
            "lb_service.affinity_timeout_s",
            offset_of!(LbService, affinity_timeout_s),
        ),
        ("lb_service.flags", offset_of!(LbService, flags)),
        ("lb_backend.address", offset_of!(LbBackend, address)),
        ("lb_backend.port", offset_of!(LbBackend, port)),
        ("lb_backend.protocol", offset_of!(LbBackend, protocol)),
        ("lb_backend.flags", offset_of!(LbBackend, flags)),
        ("lb_reverse_nat.address", offset_of!(LbReverseNat, address)),
        ("lb_reverse_nat.port", offset_of!(LbReverseNat, port)),
        ("lb_affinity_key.client", offset_of!(LbAffinityKey, client)),
        (
            "lb_affinity_key.rev_nat",
            offset_of!(LbAffinityKey, rev_nat),
        ),
        (
            "lb_affinity.last_used_ns",
            offset_of!(LbAffinity, last_used_ns),
        ),
        ("lb_affinity.backend_id", offset_of!(LbAffinity, backend_id)),
        ("DROP_NO_SERVICE", DropReason::NoService as usize),
        ("lb_sock_key", size_of::<LbSockKey>()),
        ("lb_sock_key.cookie", offset_of!(LbSockKey, cookie)),
        ("lb_sock_key.address", offset_of!(LbSockKey, address)),
        ("lb_sock_key.port", offset_of!(LbSockKey, port)),
        ("prefilter_key", 8),
        ("prefilter_value", size_of::<PrefilterValue>()),
        ("prefilter_stats", size_of::<PrefilterStats>()),
        (
            "prefilter_stats.dropped_packets",
            offset_of!(PrefilterStats, dropped_packets),
        ),
        (
            "prefilter_stats.dropped_bytes",
            offset_of!(PrefilterStats, dropped_bytes),
        ),
        (
            "prefilter_stats.passed_packets",
            offset_of!(PrefilterStats, passed_packets),
        ),
        (
            "prefilter_stats.last_event_ns",
            offset_of!(PrefilterStats, last_event_ns),
        ),
        ("CT_DIR_SERVICE", CT_DIR_SERVICE as usize),
        ("SVC_SIDE_NONE", SVC_SIDE_NONE as usize),
        ("SVC_SIDE_DESTINATION", SVC_SIDE_DESTINATION as usize),
        ("SVC_SIDE_SOURCE", SVC_SIDE_SOURCE as usize),
        ("LB_SVC_F_AFFINITY", LB_SVC_F_AFFINITY as usize),
        ("LB_SVC_F_EXTERNAL", LB_SVC_F_EXTERNAL as usize),
        ("LB_MAGLEV_DEFAULT_SIZE", MAGLEV_DEFAULT_TABLE_SIZE as usize),
        ("CT_DIR_NODEPORT", CT_DIR_NODEPORT as usize),
        ("NODEPORT_MASQ_MARK", NODEPORT_MASQ_MARK as usize),
        ("NODEPORT_LOCAL_MARK", NODEPORT_LOCAL_MARK as usize),
        ("CT_F_NODEPORT", CT_F_NODEPORT as usize),
        ("ID_HOST", identity::HOST as usize),
        ("ID_WORLD", identity::WORLD as usize),
        ("ID_UNMANAGED", identity::UNMANAGED as usize),
        ("ID_HEALTH", identity::HEALTH as usize),
        ("ID_INIT", identity::INIT as usize),
        ("ID_REMOTE_NODE", identity::REMOTE_NODE as usize),
        ("ID_KUBE_APISERVER", identity::KUBE_APISERVER as usize),
        ("ID_INGRESS", identity::INGRESS as usize),
        ("ID_WORLD_IPV4", identity::WORLD_IPV4 as usize),
        ("ID_WORLD_IPV6", identity::WORLD_IPV6 as usize),
        ("EVENT_DROP", EventType::Drop as usize),
        ("EVENT_TRACE", EventType::Trace as usize),
        ("EVENT_POLICY_VERDICT", EventType::PolicyVerdict as usize),
        (
            "DROP_INVALID_SOURCE_IP",
            DropReason::InvalidSourceIp as usize,
        ),
        ("DROP_POLICY_DENIED", DropReason::PolicyDenied as usize),
        ("DROP_INVALID_PACKET", DropReason::InvalidPacket as usize),
        (
            "DROP_CT_INVALID_HEADER",
            DropReason::CtInvalidHeader as usize,
        ),
        ("DROP_UNSUPPORTED_L3", DropReason::UnsupportedL3 as usize),
        ("DROP_UNKNOWN_L4", DropReason::UnknownL4 as usize),
        (
            "DROP_CT_MAP_INSERT_FAILED",
            DropReason::CtMapInsertFailed as usize,
        ),
        ("DROP_FRAG_NOT_FOUND", DropReason::FragNotFound as usize),
        ("DROP_NAT_NO_MAPPING", DropReason::NatNoMapping as usize),
        ("DROP_UNROUTABLE", DropReason::Unroutable as usize),
        (
            "DROP_INVALID_IDENTITY",
            DropReason::InvalidIdentity as usize,
        ),
        ("DROP_POLICY_DENY", DropReason::PolicyDeny as usize),
        (
            "DROP_SOCKET_LOOKUP_FAILED",
            DropReason::SocketLookupFailed as usize,
        ),
        (
            "DROP_SOCKET_ASSIGN_FAILED",
            DropReason::SocketAssignFailed as usize,
        ),
        (
            "DROP_PROXY_UNSUPPORTED",
            DropReason::ProxyUnsupported as usize,
        ),
        ("CT_F_PROXY_REDIRECT", CT_F_PROXY_REDIRECT as usize),
        ("CT_F_FROM_PROXY", CT_F_FROM_PROXY as usize),
        ("CT_F_DNS", CT_F_DNS as usize),
        ("POLICY_F_REDIRECT_DNS", POLICY_F_REDIRECT_DNS as usize),
        ("TRACE_TO_LXC", TracePoint::ToLxc as usize),
        ("TRACE_TO_PROXY", TracePoint::ToProxy as usize),
        ("TRACE_TO_HOST", TracePoint::ToHost as usize),
        ("TRACE_TO_STACK", TracePoint::ToStack as usize),
        ("TRACE_TO_OVERLAY", TracePoint::ToOverlay as usize),
        ("TRACE_FROM_LXC", TracePoint::FromLxc as usize),
        ("TRACE_FROM_OVERLAY", TracePoint::FromOverlay as usize),
        ("TRACE_FROM_NETWORK", TracePoint::FromNetwork as usize),
        ("TRACE_TO_NETWORK", TracePoint::ToNetwork as usize),
        ("EP_F_AUDIT_ALL", EP_F_AUDIT_ALL as usize),
        ("EP_F_HOST_FIREWALL", EP_F_HOST_FIREWALL as usize),
        ("HOST_ENDPOINT_ID", HOST_ENDPOINT_ID as usize),
        ("host_endpoint", size_of::<HostEndpoint>()),
        ("VERDICT_FORWARDED", verdict::FORWARDED as usize),
        ("VERDICT_DROPPED", verdict::DROPPED as usize),
        ("VERDICT_AUDIT", verdict::AUDIT as usize),
        ("CT_NEW", ct_state::NEW as usize),
        ("CT_ESTABLISHED", ct_state::ESTABLISHED as usize),
        ("CT_REPLY", ct_state::REPLY as usize),
        ("CT_RELATED", ct_state::RELATED as usize),
        ("DIR_INGRESS", Direction::Ingress as usize),
        ("DIR_EGRESS", Direction::Egress as usize),
        ("MATCH_NONE", policy_match::NONE as usize),
        ("MATCH_L3_ONLY", policy_match::L3_ONLY as usize),
        ("MATCH_L3_L4", policy_match::L3_L4 as usize),
        ("MATCH_L4_ONLY", policy_match::L4_ONLY as usize),
        ("MATCH_ALL", policy_match::ALL as usize),
        ("MATCH_L3_PROTO", policy_match::L3_PROTO as usize),
        ("MATCH_PROTO_ONLY", policy_match::PROTO_ONLY as usize),
        ("EP_F_INGRESS_ENFORCED", EP_F_INGRESS_ENFORCED as usize),
        ("EP_F_EGRESS_ENFORCED", EP_F_EGRESS_ENFORCED as usize),
        ("POLICY_F_DENY", POLICY_F_DENY as usize),
        ("EP_F_INGRESS_AUDIT", EP_F_INGRESS_AUDIT as usize),
        ("EP_F_EGRESS_AUDIT", EP_F_EGRESS_AUDIT as usize),
        ("POLICY_F_AUDIT", POLICY_F_AUDIT as usize),
        ("POLICY_F_REDIRECT", POLICY_F_REDIRECT as usize),
        (
            "POLICY_STATIC_PREFIX_BITS",
            POLICY_STATIC_PREFIX_BITS as usize,
        ),
        ("POLICY_FULL_PREFIX_BITS", POLICY_FULL_PREFIX_BITS as usize),
    ];
    rust.sort();
    let mut mismatches = Vec::new();
    for (name, value) in &rust {
        match c.get(*name) {
            Some(cv) if cv == value => {}
            other => mismatches.push(format!("{name}: C {other:?}, Rust {value}")),
        }
    }
    assert!(
        c.len() == rust.len(),
        "the probe printed {} items, Rust checks {}",
        c.len(),
        rust.len()
    );
    assert!(
        mismatches.is_empty(),
        "ABI drift:\n{}",
        mismatches.join("\n")
    );
}

#[test]
fn flow_event_decodes_from_bytes() {
    let mut b = [0u8; FlowEvent::SIZE];
    b[0..8].copy_from_slice(&123u64.to_ne_bytes());
    b[8] = 1;
    b[9] = 133;
    b[20..24].copy_from_slice(&256u32.to_ne_bytes());
    b[42..44].copy_from_slice(&8080u16.to_ne_bytes());
    b[58..64].copy_from_slice(&[1, 2, 3, 4, 5, 6]);
    b[64..68].copy_from_slice(&[10, 96, 0, 10]);
    b[68..70].copy_from_slice(&80u16.to_ne_bytes());
    b[70] = SVC_SIDE_DESTINATION;
    let e = FlowEvent::from_bytes(&b).unwrap();
    assert_eq!(e.ts_ns, 123);
    assert_eq!(EventType::from_u8(e.r#type), Some(EventType::Drop));
    assert_eq!(
        DropReason::from_u8(e.subtype),
        Some(DropReason::PolicyDenied)
    );
    assert_eq!(e.src_identity, 256);
    assert_eq!(e.dport, 8080);
    assert_eq!(e.dmac, [1, 2, 3, 4, 5, 6]);
    assert_eq!(e.svc_addr.to_ne_bytes(), [10, 96, 0, 10]);
    assert_eq!((e.svc_port, e.svc_side), (80, SVC_SIDE_DESTINATION));
    assert!(FlowEvent::from_bytes(&b[..71]).is_none());
}
