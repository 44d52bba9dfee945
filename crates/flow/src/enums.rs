//! The enums of Hubble's `flow.proto` a flow carries, by number as on
//! the wire: a flow goes from the ring buffer to protobuf without a name
//! looked up, and a name only where text is wanted (JSON, the CLI). Each
//! table is the proto's, every entry (`hubble/tests/enum_tables.rs`
//! checks them both ways against the generated proto types).

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A `flow.proto` enum: a number, printed by its name (a number the table
/// does not know prints as the number, as protobuf JSON does).
macro_rules! proto_enum {
    ($(#[$doc:meta])* $ty:ident, $proto:literal, [$(($num:literal, $konst:ident, $text:literal)),* $(,)?]) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $ty(pub i32);

        #[allow(non_upper_case_globals)]
        impl $ty {
            $(pub const $konst: $ty = $ty($num);)*
            /// Every value with its name, as the proto declares them.
            pub const ALL: &'static [($ty, &'static str)] = &[$(($ty($num), $text)),*];
            /// The proto's name for this enum type.
            pub const PROTO: &'static str = $proto;

            /// The value's name; `None` for a number the proto lacks.
            pub fn name(self) -> Option<&'static str> {
                match self.0 {
                    $($num => Some($text),)*
                    _ => None,
                }
            }

            pub fn from_name(name: &str) -> Option<Self> {
                match name {
                    $($text => Some($ty($num)),)*
                    _ => None,
                }
            }

            /// The name, or "" for a number the proto lacks (text only).
            pub fn as_str(self) -> &'static str {
                self.name().unwrap_or("")
            }

            /// Zero: the proto's "unknown" (omitted from JSON where optional).
            pub fn is_unset(&self) -> bool {
                self.0 == 0
            }
        }

        impl std::fmt::Display for $ty {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                match self.name() {
                    Some(n) => f.write_str(n),
                    None => write!(f, "{}", self.0),
                }
            }
        }

        impl PartialEq<str> for $ty {
            fn eq(&self, other: &str) -> bool {
                self.name() == Some(other)
            }
        }

        impl PartialEq<&str> for $ty {
            fn eq(&self, other: &&str) -> bool {
                self.name() == Some(*other)
            }
        }

        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                match self.name() {
                    Some(n) => s.serialize_str(n),
                    None => s.serialize_i32(self.0),
                }
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                from_name_or_number(d, $ty::from_name, $ty, $proto)
            }
        }
    };
}

/// A name (refused when the proto has none such: it would otherwise turn
/// into 0 silently) or a number.
fn from_name_or_number<'de, D: Deserializer<'de>, T>(
    d: D,
    by_name: fn(&str) -> Option<T>,
    by_number: fn(i32) -> T,
    proto: &'static str,
) -> Result<T, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum NameOrNumber<'a> {
        Name(std::borrow::Cow<'a, str>),
        Number(i32),
    }
    match NameOrNumber::deserialize(d)? {
        NameOrNumber::Number(n) => Ok(by_number(n)),
        NameOrNumber::Name(n) if n.is_empty() => Ok(by_number(0)),
        NameOrNumber::Name(n) => by_name(&n)
            .ok_or_else(|| serde::de::Error::custom(format!("{n:?} is not a {proto} name"))),
    }
}

proto_enum!(
    /// A flow's verdict.
    Verdict,
    "flow.Verdict",
    [
        (0, VERDICT_UNKNOWN, "VERDICT_UNKNOWN"),
        (1, FORWARDED, "FORWARDED"),
        (2, DROPPED, "DROPPED"),
        (3, ERROR, "ERROR"),
        (4, AUDIT, "AUDIT"),
        (5, REDIRECTED, "REDIRECTED"),
        (6, TRACED, "TRACED"),
        (7, TRANSLATED, "TRANSLATED"),
    ]
);

proto_enum!(
    /// Which layer saw the flow (`Type` in JSON).
    FlowType,
    "flow.FlowType",
    [
        (0, UNKNOWN_TYPE, "UNKNOWN_TYPE"),
        (1, L3_L4, "L3_L4"),
        (2, L7, "L7"),
        (3, SOCK, "SOCK"),
    ]
);

proto_enum!(
    /// The direction relative to the endpoint the flow is about.
    TrafficDirection,
    "flow.TrafficDirection",
    [
        (0, TRAFFIC_DIRECTION_UNKNOWN, "TRAFFIC_DIRECTION_UNKNOWN"),
        (1, INGRESS, "INGRESS"),
        (2, EGRESS, "EGRESS"),
    ]
);

proto_enum!(
    /// Where a trace event was observed.
    TraceObservationPoint,
    "flow.TraceObservationPoint",
    [
        (0, UNKNOWN_POINT, "UNKNOWN_POINT"),
        (1, TO_PROXY, "TO_PROXY"),
        (2, TO_HOST, "TO_HOST"),
        (3, TO_STACK, "TO_STACK"),
        (4, TO_OVERLAY, "TO_OVERLAY"),
        (101, TO_ENDPOINT, "TO_ENDPOINT"),
        (5, FROM_ENDPOINT, "FROM_ENDPOINT"),
        (6, FROM_PROXY, "FROM_PROXY"),
        (7, FROM_HOST, "FROM_HOST"),
        (8, FROM_STACK, "FROM_STACK"),
        (9, FROM_OVERLAY, "FROM_OVERLAY"),
        (10, FROM_NETWORK, "FROM_NETWORK"),
        (11, TO_NETWORK, "TO_NETWORK"),
        (12, FROM_CRYPTO, "FROM_CRYPTO"),
        (13, TO_CRYPTO, "TO_CRYPTO"),
    ]
);

proto_enum!(
    /// Why a trace event was emitted (the connection's conntrack state).
    TraceReason,
    "flow.TraceReason",
    [
        (0, TRACE_REASON_UNKNOWN, "TRACE_REASON_UNKNOWN"),
        (1, NEW, "NEW"),
        (2, ESTABLISHED, "ESTABLISHED"),
        (3, REPLY, "REPLY"),
        (4, RELATED, "RELATED"),
        (5, REOPENED, "REOPENED"),
        (6, SRV6_ENCAP, "SRV6_ENCAP"),
        (7, SRV6_DECAP, "SRV6_DECAP"),
        (8, ENCRYPT_OVERLAY, "ENCRYPT_OVERLAY"),
    ]
);

proto_enum!(
    /// Where socket LB saw a socket call (trace-sock flows).
    SocketTranslationPoint,
    "flow.SocketTranslationPoint",
    [
        (0, SOCK_XLATE_POINT_UNKNOWN, "SOCK_XLATE_POINT_UNKNOWN"),
        (1, SOCK_XLATE_POINT_PRE_DIRECTION_FWD, "SOCK_XLATE_POINT_PRE_DIRECTION_FWD"),
        (2, SOCK_XLATE_POINT_POST_DIRECTION_FWD, "SOCK_XLATE_POINT_POST_DIRECTION_FWD"),
        (3, SOCK_XLATE_POINT_PRE_DIRECTION_REV, "SOCK_XLATE_POINT_PRE_DIRECTION_REV"),
        (4, SOCK_XLATE_POINT_POST_DIRECTION_REV, "SOCK_XLATE_POINT_POST_DIRECTION_REV"),
    ]
);

proto_enum!(
    /// The IP version of a flow.
    IpVersion,
    "flow.IPVersion",
    [
        (0, IP_NOT_USED, "IP_NOT_USED"),
        (1, IPv4, "IPv4"),
        (2, IPv6, "IPv6"),
    ]
);

proto_enum!(
    /// An L7 record's kind.
    L7FlowType,
    "flow.L7FlowType",
    [
        (0, UNKNOWN_L7_TYPE, "UNKNOWN_L7_TYPE"),
        (1, REQUEST, "REQUEST"),
        (2, RESPONSE, "RESPONSE"),
        (3, SAMPLE, "SAMPLE"),
    ]
);

proto_enum!(
    /// Why a packet was dropped (numbers as the datapath's drop codes).
    DropReason,
    "flow.DropReason",
    [
        (0, DROP_REASON_UNKNOWN, "DROP_REASON_UNKNOWN"),
        (130, INVALID_SOURCE_MAC, "INVALID_SOURCE_MAC"),
        (131, INVALID_DESTINATION_MAC, "INVALID_DESTINATION_MAC"),
        (132, INVALID_SOURCE_IP, "INVALID_SOURCE_IP"),
        (133, POLICY_DENIED, "POLICY_DENIED"),
        (134, INVALID_PACKET_DROPPED, "INVALID_PACKET_DROPPED"),
        (135, CT_TRUNCATED_OR_INVALID_HEADER, "CT_TRUNCATED_OR_INVALID_HEADER"),
        (136, CT_MISSING_TCP_ACK_FLAG, "CT_MISSING_TCP_ACK_FLAG"),
        (137, CT_UNKNOWN_L4_PROTOCOL, "CT_UNKNOWN_L4_PROTOCOL"),
        (138, CT_CANNOT_CREATE_ENTRY_FROM_PACKET, "CT_CANNOT_CREATE_ENTRY_FROM_PACKET"),
        (139, UNSUPPORTED_L3_PROTOCOL, "UNSUPPORTED_L3_PROTOCOL"),
        (140, MISSED_TAIL_CALL, "MISSED_TAIL_CALL"),
        (141, ERROR_WRITING_TO_PACKET, "ERROR_WRITING_TO_PACKET"),
        (142, UNKNOWN_L4_PROTOCOL, "UNKNOWN_L4_PROTOCOL"),
        (143, UNKNOWN_ICMPV4_CODE, "UNKNOWN_ICMPV4_CODE"),
        (144, UNKNOWN_ICMPV4_TYPE, "UNKNOWN_ICMPV4_TYPE"),
        (145, UNKNOWN_ICMPV6_CODE, "UNKNOWN_ICMPV6_CODE"),
        (146, UNKNOWN_ICMPV6_TYPE, "UNKNOWN_ICMPV6_TYPE"),
        (147, ERROR_RETRIEVING_TUNNEL_KEY, "ERROR_RETRIEVING_TUNNEL_KEY"),
        (148, ERROR_RETRIEVING_TUNNEL_OPTIONS, "ERROR_RETRIEVING_TUNNEL_OPTIONS"),
        (149, INVALID_GENEVE_OPTION, "INVALID_GENEVE_OPTION"),
        (150, UNKNOWN_L3_TARGET_ADDRESS, "UNKNOWN_L3_TARGET_ADDRESS"),
        (151, STALE_OR_UNROUTABLE_IP, "STALE_OR_UNROUTABLE_IP"),
        (152, NO_MATCHING_LOCAL_CONTAINER_FOUND, "NO_MATCHING_LOCAL_CONTAINER_FOUND"),
        (153, ERROR_WHILE_CORRECTING_L3_CHECKSUM, "ERROR_WHILE_CORRECTING_L3_CHECKSUM"),
        (154, ERROR_WHILE_CORRECTING_L4_CHECKSUM, "ERROR_WHILE_CORRECTING_L4_CHECKSUM"),
        (155, CT_MAP_INSERTION_FAILED, "CT_MAP_INSERTION_FAILED"),
        (156, INVALID_IPV6_EXTENSION_HEADER, "INVALID_IPV6_EXTENSION_HEADER"),
        (157, IP_FRAGMENTATION_NOT_SUPPORTED, "IP_FRAGMENTATION_NOT_SUPPORTED"),
        (158, SERVICE_BACKEND_NOT_FOUND, "SERVICE_BACKEND_NOT_FOUND"),
        (160, NO_TUNNEL_OR_ENCAPSULATION_ENDPOINT, "NO_TUNNEL_OR_ENCAPSULATION_ENDPOINT"),
        (161, FAILED_TO_INSERT_INTO_PROXYMAP, "FAILED_TO_INSERT_INTO_PROXYMAP"),
        (162, REACHED_EDT_RATE_LIMITING_DROP_HORIZON, "REACHED_EDT_RATE_LIMITING_DROP_HORIZON"),
        (163, UNKNOWN_CONNECTION_TRACKING_STATE, "UNKNOWN_CONNECTION_TRACKING_STATE"),
        (164, LOCAL_HOST_IS_UNREACHABLE, "LOCAL_HOST_IS_UNREACHABLE"),
        (165, NO_CONFIGURATION_AVAILABLE_TO_PERFORM_POLICY_DECISION, "NO_CONFIGURATION_AVAILABLE_TO_PERFORM_POLICY_DECISION"),
        (166, UNSUPPORTED_L2_PROTOCOL, "UNSUPPORTED_L2_PROTOCOL"),
        (167, NO_MAPPING_FOR_NAT_MASQUERADE, "NO_MAPPING_FOR_NAT_MASQUERADE"),
        (168, UNSUPPORTED_PROTOCOL_FOR_NAT_MASQUERADE, "UNSUPPORTED_PROTOCOL_FOR_NAT_MASQUERADE"),
        (169, FIB_LOOKUP_FAILED, "FIB_LOOKUP_FAILED"),
        (170, ENCAPSULATION_TRAFFIC_IS_PROHIBITED, "ENCAPSULATION_TRAFFIC_IS_PROHIBITED"),
        (171, INVALID_IDENTITY, "INVALID_IDENTITY"),
        (172, UNKNOWN_SENDER, "UNKNOWN_SENDER"),
        (173, NAT_NOT_NEEDED, "NAT_NOT_NEEDED"),
        (174, IS_A_CLUSTERIP, "IS_A_CLUSTERIP"),
        (175, FIRST_LOGICAL_DATAGRAM_FRAGMENT_NOT_FOUND, "FIRST_LOGICAL_DATAGRAM_FRAGMENT_NOT_FOUND"),
        (176, FORBIDDEN_ICMPV6_MESSAGE, "FORBIDDEN_ICMPV6_MESSAGE"),
        (177, DENIED_BY_LB_SRC_RANGE_CHECK, "DENIED_BY_LB_SRC_RANGE_CHECK"),
        (178, SOCKET_LOOKUP_FAILED, "SOCKET_LOOKUP_FAILED"),
        (179, SOCKET_ASSIGN_FAILED, "SOCKET_ASSIGN_FAILED"),
        (180, PROXY_REDIRECTION_NOT_SUPPORTED_FOR_PROTOCOL, "PROXY_REDIRECTION_NOT_SUPPORTED_FOR_PROTOCOL"),
        (181, POLICY_DENY, "POLICY_DENY"),
        (182, VLAN_FILTERED, "VLAN_FILTERED"),
        (183, INVALID_VNI, "INVALID_VNI"),
        (184, INVALID_TC_BUFFER, "INVALID_TC_BUFFER"),
        (185, NO_SID, "NO_SID"),
        (186, MISSING_SRV6_STATE, "MISSING_SRV6_STATE"),
        (187, NAT46, "NAT46"),
        (188, NAT64, "NAT64"),
        (189, AUTH_REQUIRED, "AUTH_REQUIRED"),
        (190, CT_NO_MAP_FOUND, "CT_NO_MAP_FOUND"),
        (191, SNAT_NO_MAP_FOUND, "SNAT_NO_MAP_FOUND"),
        (192, INVALID_CLUSTER_ID, "INVALID_CLUSTER_ID"),
        (193, UNSUPPORTED_PROTOCOL_FOR_DSR_ENCAP, "UNSUPPORTED_PROTOCOL_FOR_DSR_ENCAP"),
        (194, NO_EGRESS_GATEWAY, "NO_EGRESS_GATEWAY"),
        (195, UNENCRYPTED_TRAFFIC, "UNENCRYPTED_TRAFFIC"),
        (196, TTL_EXCEEDED, "TTL_EXCEEDED"),
        (197, NO_NODE_ID, "NO_NODE_ID"),
        (198, DROP_RATE_LIMITED, "DROP_RATE_LIMITED"),
        (199, IGMP_HANDLED, "IGMP_HANDLED"),
        (200, IGMP_SUBSCRIBED, "IGMP_SUBSCRIBED"),
        (201, MULTICAST_HANDLED, "MULTICAST_HANDLED"),
        (202, DROP_HOST_NOT_READY, "DROP_HOST_NOT_READY"),
        (203, DROP_EP_NOT_READY, "DROP_EP_NOT_READY"),
        (204, DROP_NO_EGRESS_IP, "DROP_NO_EGRESS_IP"),
        (205, DROP_PUNT_PROXY, "DROP_PUNT_PROXY"),
    ]
);
