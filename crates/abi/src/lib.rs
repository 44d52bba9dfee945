//! Rust mirrors of `bpf/include/fibril_abi.h`, the one kernel/user ABI.
//!
//! Every struct here is `#[repr(C)]` with the same fields, widths and explicit
//! padding as its C twin. `tests/layout.rs` compiles the C header and compares
//! every size and field offset, and every enum value, with these definitions.
#![no_std]
#![deny(unsafe_code)]

/// Reserved security identities (Cilium numbering, `spec/cilium-semantics.md` §1.3).
pub mod identity {
    pub const UNKNOWN: u32 = 0;
    pub const HOST: u32 = 1;
    pub const WORLD: u32 = 2;
    pub const UNMANAGED: u32 = 3;
    pub const HEALTH: u32 = 4;
    pub const INIT: u32 = 5;
    pub const REMOTE_NODE: u32 = 6;
    pub const KUBE_APISERVER: u32 = 7;
    pub const INGRESS: u32 = 8;
    pub const WORLD_IPV4: u32 = 9;
    pub const WORLD_IPV6: u32 = 10;
    /// First identity handed out for label sets (cluster id 0).
    pub const FIRST_CLUSTER_LOCAL: u32 = 256;
    /// Last cluster-local identity (cluster id 0).
    pub const LAST_CLUSTER_LOCAL: u32 = 65535;

    /// The name of a reserved identity (`reserved:<name>`, and what Hubble
    /// prints in parentheses).
    pub fn reserved_name(id: u32) -> Option<&'static str> {
        Some(match id {
            UNKNOWN => "unknown",
            HOST => "host",
            WORLD => "world",
            UNMANAGED => "unmanaged",
            HEALTH => "health",
            INIT => "init",
            REMOTE_NODE => "remote-node",
            KUBE_APISERVER => "kube-apiserver",
            INGRESS => "ingress",
            WORLD_IPV4 => "world-ipv4",
            WORLD_IPV6 => "world-ipv6",
            _ => return None,
        })
    }
}

/// Monitor message types (Hubble `event_type.type`).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Drop = 1,
    Trace = 4,
    PolicyVerdict = 5,
    /// Socket LB's translation of a socket call (Hubble's trace-sock).
    TraceSock = 7,
}

impl EventType {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Drop),
            4 => Some(Self::Trace),
            5 => Some(Self::PolicyVerdict),
            7 => Some(Self::TraceSock),
            _ => None,
        }
    }
}

/// Drop reasons the datapath emits (values of `flow.DropReason`).
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropReason {
    InvalidSourceIp = 132,
    PolicyDenied = 133,
    InvalidPacket = 134,
    CtInvalidHeader = 135,
    UnsupportedL3 = 139,
    UnknownL4 = 142,
    /// From the overlay, for an address that is no endpoint of this node.
    Unroutable = 151,
    CtMapInsertFailed = 155,
    /// A service address with no backend (Hubble: SERVICE_BACKEND_NOT_FOUND).
    NoService = 158,
    /// No source port free for a node port's connection to another node's
    /// backend (Hubble: NO_MAPPING_FOR_NAT_MASQUERADE).
    NatNoMapping = 167,
    /// A source identity a tunnel may not carry (another node's `host`).
    InvalidIdentity = 171,
    /// A later fragment whose first fragment (with the ports) was not seen.
    FragNotFound = 175,
    SocketLookupFailed = 178,
    SocketAssignFailed = 179,
    ProxyUnsupported = 180,
    PolicyDeny = 181,
}

impl DropReason {
    pub const ALL: [DropReason; 16] = [
        Self::InvalidSourceIp,
        Self::PolicyDenied,
        Self::InvalidPacket,
        Self::CtInvalidHeader,
        Self::UnsupportedL3,
        Self::UnknownL4,
        Self::Unroutable,
        Self::CtMapInsertFailed,
        Self::NoService,
        Self::NatNoMapping,
        Self::InvalidIdentity,
        Self::FragNotFound,
        Self::SocketLookupFailed,
        Self::SocketAssignFailed,
        Self::ProxyUnsupported,
        Self::PolicyDeny,
    ];

    pub fn from_u8(v: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|r| *r as u8 == v)
    }
}

/// Trace observation points, datapath numbering.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TracePoint {
    ToLxc = 0,
    ToProxy = 1,
    ToHost = 2,
    ToStack = 3,
    ToOverlay = 4,
    FromLxc = 5,
    FromOverlay = 9,
    FromNetwork = 10,
    ToNetwork = 11,
}

impl TracePoint {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(Self::ToLxc),
            1 => Some(Self::ToProxy),
            2 => Some(Self::ToHost),
            3 => Some(Self::ToStack),
            4 => Some(Self::ToOverlay),
            5 => Some(Self::FromLxc),
            9 => Some(Self::FromOverlay),
            10 => Some(Self::FromNetwork),
            11 => Some(Self::ToNetwork),
            _ => None,
        }
    }
}

/// Verdicts (`flow.Verdict` numbering).
pub mod verdict {
    pub const FORWARDED: u8 = 1;
    pub const DROPPED: u8 = 2;
    pub const AUDIT: u8 = 4;
    pub const TRACED: u8 = 6;
    pub const TRANSLATED: u8 = 7;
}

/// Socket LB's translation points (`flow.SocketTranslationPoint`).
pub mod sock_xlate {
    pub const PRE_FWD: u8 = 1;
    pub const POST_FWD: u8 = 2;
    pub const PRE_REV: u8 = 3;
    pub const POST_REV: u8 = 4;
}

/// Connection-tracking state of a packet (`flow.TraceReason` numbering).
pub mod ct_state {
    pub const NEW: u8 = 1;
    pub const ESTABLISHED: u8 = 2;
    pub const REPLY: u8 = 3;
    pub const RELATED: u8 = 4;
}

/// Traffic direction, relative to the endpoint (`flow.TrafficDirection`
/// numbering): the one direction type, from the policy model to the map
/// keys and the events.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub enum Direction {
    Ingress = 1,
    Egress = 2,
}

impl Direction {
    pub fn from_u8(v: u8) -> Option<Self> {
        match v {
            1 => Some(Self::Ingress),
            2 => Some(Self::Egress),
            _ => None,
        }
    }
}

/// Policy match types (Hubble `policy_match_type`).
pub mod policy_match {
    pub const NONE: u8 = 0;
    pub const L3_ONLY: u8 = 1;
    pub const L3_L4: u8 = 2;
    pub const L4_ONLY: u8 = 3;
    pub const ALL: u8 = 4;
    pub const L3_PROTO: u8 = 5;
    pub const PROTO_ONLY: u8 = 6;
}

pub const EP_F_INGRESS_ENFORCED: u32 = 0x1;
pub const EP_F_EGRESS_ENFORCED: u32 = 0x2;
pub const EP_F_INGRESS_AUDIT: u32 = 0x4;
pub const EP_F_EGRESS_AUDIT: u32 = 0x8;
/// Host endpoint: every policy drop is forwarded as an audit.
pub const EP_F_AUDIT_ALL: u32 = 0x10;
/// Host endpoint: the host firewall is on (the node's connections are tracked).
pub const EP_F_HOST_FIREWALL: u32 = 0x20;
/// The host endpoint's id in the policy map, budget and events (outside
/// the pods' 1..=65535).
pub const HOST_ENDPOINT_ID: u32 = 65536;
pub const POLICY_F_DENY: u8 = 0x1;
pub const POLICY_F_AUDIT: u8 = 0x2;
pub const POLICY_F_REDIRECT: u8 = 0x4;
pub const POLICY_F_REDIRECT_DNS: u8 = 0x8;
/// Connection flags (`ct_value.flags`).
pub const CT_F_PROXY_REDIRECT: u8 = 0x1;
pub const CT_F_FROM_PROXY: u8 = 0x2;
pub const CT_F_DNS: u8 = 0x4;
/// A node port's connection to a backend here: replies leave by the stack.
pub const CT_F_NODEPORT: u8 = 0x8;
/// `CtKey::direction` of a service connection's entry (its backend).
pub const CT_DIR_SERVICE: u8 = 3;
/// `ct_key.direction` of a node port's connection to its backend.
pub const CT_DIR_NODEPORT: u8 = 4;
/// The mark of a node port's packet for another node's backend (it leaves
/// from the node's address: source NAT on the node's device).
pub const NODEPORT_MASQ_MARK: u32 = 0x00f1_d000;
/// The mark of a node port's packet for a backend on this node.
pub const NODEPORT_LOCAL_MARK: u32 = 0x00f1_e000;
/// `FlowEvent::svc_side`: which end was a service address.
pub const SVC_SIDE_NONE: u8 = 0;
pub const SVC_SIDE_DESTINATION: u8 = 1;
pub const SVC_SIDE_SOURCE: u8 = 2;
/// `LbService::flags` of a master entry: sessionAffinity ClientIP.
pub const LB_SVC_F_AFFINITY: u32 = 0x1;
/// A frontend reached from outside: balanced by its Maglev table.
pub const LB_SVC_F_EXTERNAL: u32 = 0x2;
/// Maglev's table size by default (Cilium's `--bpf-lb-maglev-table-size`).
pub const MAGLEV_DEFAULT_TABLE_SIZE: u32 = 16381;
/// The table sizes Cilium accepts: primes, so every backend's permutation
/// of the slots visits each of them.
pub const MAGLEV_TABLE_SIZES: [u32; 8] = [251, 509, 1021, 2039, 4093, 8191, 16381, 32749];
/// Counters of the L7 proxy's socket shortcut (`fibril_sockmap_stats`).
pub const SOCKMAP_STAT_SOCKETS: u32 = 0;
pub const SOCKMAP_STAT_REDIRECTED: u32 = 1;
pub const SOCKMAP_STAT_PLAIN: u32 = 2;
pub const POLICY_STATIC_PREFIX_BITS: u32 = 72;
pub const POLICY_FULL_PREFIX_BITS: u32 = 96;

/// ipcache key: IPv4 prefix (`prefixlen` counts address bits only).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpcacheValue {
    pub identity: u32,
    /// The node an endpoint on another node lives on: where its traffic
    /// is tunnelled (network byte order; 0: not behind a tunnel).
    pub tunnel_endpoint: u32,
}

/// `struct sock_key`: the proxy shortcut's socket maps' key.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SockKey {
    /// Network byte order.
    pub local_ip: u32,
    /// Network byte order.
    pub remote_ip: u32,
    pub local_port: u32,
    pub remote_port: u32,
}

/// `struct plain_key`: an end that sent through the stack (side 0 pod, 1
/// proxy).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PlainKey {
    pub sock: SockKey,
    pub side: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct EndpointKey {
    /// IPv4 address, network byte order.
    pub addr: u32,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EndpointInfo {
    pub ep_id: u32,
    pub identity: u32,
    pub host_ifindex: u32,
    pub flags: u32,
    pub pod_mac: [u8; 6],
    pub host_mac: [u8; 6],
    pub pad: u32,
}

/// The data part of a policy LPM key (after `prefixlen`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKeyData {
    /// Big endian.
    pub ep_id: u32,
    /// Big endian.
    pub identity: u32,
    pub direction: u8,
    pub protocol: u8,
    /// Network byte order.
    pub dport: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyValue {
    pub cookie: u32,
    pub flags: u8,
    pub prefix: u8,
    pub pad: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub protocol: u8,
    pub direction: u8,
    pub pad: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtValue {
    pub expires_ns: u64,
    pub packets: u64,
    pub bytes: u64,
    pub last_report_ns: u64,
    pub policy_cookie: u32,
    pub tx_flags_seen: u8,
    pub rx_flags_seen: u8,
    pub closing: u8,
    /// `CT_F_*`.
    pub flags: u8,
    /// `CT_DIR_SERVICE` entries: the backend the connection went to.
    pub backend_id: u32,
    /// The client's entry of a translated connection: its reverse-NAT index.
    pub rev_nat: u16,
    pub pad: u16,
}

/// A service frontend's slot (`fibril_lb_services`): slot 0 is the master
/// entry, 1..=count name backends.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LbServiceKey {
    /// Network byte order.
    pub address: u32,
    /// Network byte order.
    pub dport: u16,
    pub slot: u16,
    pub protocol: u8,
    pub scope: u8,
    pub pad: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LbService {
    /// Slots 1..=count: the backend's id.
    pub backend_id: u32,
    /// Master: backends in slots.
    pub count: u16,
    /// Master: the reverse-NAT index of replies.
    pub rev_nat: u16,
    pub affinity_timeout_s: u32,
    /// Master: `LB_SVC_F_*`.
    pub flags: u32,
}

/// A backend by id (`fibril_lb_backends`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LbBackend {
    /// Network byte order.
    pub address: u32,
    /// Network byte order.
    pub port: u16,
    pub protocol: u8,
    pub flags: u8,
}

/// What replies of a service's connections come from
/// (`fibril_lb_reverse_nat`, keyed by the index).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LbReverseNat {
    /// Network byte order.
    pub address: u32,
    /// Network byte order.
    pub port: u16,
    pub pad: u16,
}

/// sessionAffinity ClientIP (`fibril_lb_affinity`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LbAffinityKey {
    /// Network byte order.
    pub client: u32,
    pub rev_nat: u16,
    pub pad: u16,
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LbAffinity {
    pub last_used_ns: u64,
    pub backend_id: u32,
    pub pad: u32,
}

/// An endpoint's conntrack budget (`fibril_ct_budget`, keyed by endpoint
/// id): entries its traffic holds, and new connections refused at the budget.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CtBudget {
    pub entries: u32,
    pub pad: u32,
    pub overflows: u64,
}

/// A translated socket and its backend (`fibril_lb_sock_revnat`, socket
/// load balancing).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct LbSockKey {
    pub cookie: u64,
    /// Network byte order.
    pub address: u32,
    /// Network byte order.
    pub port: u16,
    pub pad: u16,
}

/// An XDP prefilter entry's value (`fibril_prefilter`; its key is an LPM
/// trie key over the source address, like the ipcache's).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefilterValue {
    pub flags: u32,
}

/// The XDP prefilter's counters, one per CPU (`fibril_prefilter_stats`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PrefilterStats {
    pub dropped_packets: u64,
    pub dropped_bytes: u64,
    pub passed_packets: u64,
    /// When this CPU last reported a drop as a flow.
    pub last_event_ns: u64,
}

/// The host endpoint's flags (`fibril_host`, one entry).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HostEndpoint {
    pub flags: u32,
    pub pad: u32,
}

/// One datapath notification read from the events ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowEvent {
    pub ts_ns: u64,
    pub r#type: u8,
    pub subtype: u8,
    pub direction: u8,
    pub verdict: u8,
    pub ct_state: u8,
    pub protocol: u8,
    pub tcp_flags: u8,
    pub ip_version: u8,
    pub ep_id: u32,
    pub src_identity: u32,
    pub dst_identity: u32,
    pub ifindex: u32,
    /// Network byte order.
    pub saddr: u32,
    /// Network byte order.
    pub daddr: u32,
    pub sport: u16,
    /// For ICMP: `type << 8 | code`.
    pub dport: u16,
    pub pkt_len: u16,
    pub policy_match: u8,
    pub pad0: u8,
    pub policy_cookie: u32,
    pub smac: [u8; 6],
    pub dmac: [u8; 6],
    /// A translated packet's service address (network byte order) and
    /// port, and which end it was (`SVC_SIDE_*`).
    pub svc_addr: u32,
    pub svc_port: u16,
    pub svc_side: u8,
    pub pad1: u8,
    /// Trace-sock events: the socket's cookie and cgroup id.
    pub sock_cookie: u64,
    pub cgroup_id: u64,
}

impl FlowEvent {
    pub const SIZE: usize = core::mem::size_of::<FlowEvent>();

    /// Decodes an event from ring-buffer bytes; `None` when too short.
    pub fn from_bytes(b: &[u8]) -> Option<Self> {
        if b.len() < Self::SIZE {
            return None;
        }
        let u16_at = |o: usize| u16::from_ne_bytes([b[o], b[o + 1]]);
        let u32_at = |o: usize| u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |o: usize| {
            let mut v = [0u8; 8];
            v.copy_from_slice(&b[o..o + 8]);
            u64::from_ne_bytes(v)
        };
        let mut smac = [0u8; 6];
        smac.copy_from_slice(&b[52..58]);
        let mut dmac = [0u8; 6];
        dmac.copy_from_slice(&b[58..64]);
        Some(Self {
            ts_ns: u64_at(0),
            r#type: b[8],
            subtype: b[9],
            direction: b[10],
            verdict: b[11],
            ct_state: b[12],
            protocol: b[13],
            tcp_flags: b[14],
            ip_version: b[15],
            ep_id: u32_at(16),
            src_identity: u32_at(20),
            dst_identity: u32_at(24),
            ifindex: u32_at(28),
            saddr: u32_at(32),
            daddr: u32_at(36),
            sport: u16_at(40),
            dport: u16_at(42),
            pkt_len: u16_at(44),
            policy_match: b[46],
            pad0: b[47],
            policy_cookie: u32_at(48),
            smac,
            dmac,
            svc_addr: u32_at(64),
            svc_port: u16_at(68),
            svc_side: b[70],
            pad1: b[71],
            sock_cookie: u64_at(72),
            cgroup_id: u64_at(80),
        })
    }
}

#[cfg(feature = "aya")]
mod pod {
    #![allow(unsafe_code)]
    use super::*;
    // SAFETY: each type is #[repr(C)], made only of integers and byte arrays,
    // with explicit padding fields, so every bit pattern is valid and there
    // are no implicit padding bytes (pinned by tests/layout.rs).
    unsafe impl aya::Pod for IpcacheValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for EndpointKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for EndpointInfo {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PolicyKeyData {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PolicyValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CtKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CtValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for FlowEvent {}
    // SAFETY: as above.
    unsafe impl aya::Pod for CtBudget {}
    // SAFETY: as above.
    unsafe impl aya::Pod for SockKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PlainKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for LbServiceKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for LbService {}
    // SAFETY: as above.
    unsafe impl aya::Pod for LbBackend {}
    // SAFETY: as above.
    unsafe impl aya::Pod for LbReverseNat {}
    // SAFETY: as above.
    unsafe impl aya::Pod for LbAffinityKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for LbAffinity {}
    // SAFETY: as above.
    unsafe impl aya::Pod for LbSockKey {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PrefilterValue {}
    // SAFETY: as above.
    unsafe impl aya::Pod for PrefilterStats {}
    // SAFETY: as above.
    unsafe impl aya::Pod for HostEndpoint {}
}
