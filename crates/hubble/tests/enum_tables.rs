//! Every name the flow layer gives a datapath value is a name of Hubble's
//! proto with the same number. With `abi/tests/layout.rs` (the Rust enums
//! against `bpf/include/fibril_abi.h`) this ties the C header, the flow
//! records and the wire together: a code added to one cannot silently turn
//! into `0` / `..._UNKNOWN` on the wire.

use abi::{ct_state, verdict, DropReason, TracePoint};
use flow::record;
use proto::flow as pb;

#[test]
fn drop_reasons_match_the_proto() {
    for reason in DropReason::ALL {
        let code = reason as u8;
        let name = record::drop_reason_name(code);
        let proto = pb::DropReason::from_str_name(name)
            .unwrap_or_else(|| panic!("{reason:?}: {name} is not a flow.DropReason"));
        assert_eq!(proto as i32, code as i32, "{name}");
        assert_ne!(
            record::drop_reason_text(name),
            "Unknown drop reason",
            "{name} has no text"
        );
    }
    assert_eq!(record::drop_reason_name(1), "DROP_REASON_UNKNOWN");
}

#[test]
fn verdicts_trace_points_reasons_and_directions_match_the_proto() {
    for (v, expect) in [
        (verdict::FORWARDED, 1),
        (verdict::DROPPED, 2),
        (verdict::AUDIT, 4),
    ] {
        let name = record::verdict_name(v);
        let proto = pb::Verdict::from_str_name(name).unwrap();
        assert_eq!((proto as i32, v as i32), (expect, expect), "{name}");
    }
    let mut points = 0;
    for code in 0..=u8::MAX {
        let Some(point) = TracePoint::from_u8(code) else {
            assert_eq!(record::trace_point_name(code), "");
            continue;
        };
        points += 1;
        let name = record::trace_point_name(code);
        let proto = pb::TraceObservationPoint::from_str_name(name)
            .unwrap_or_else(|| panic!("{point:?}: {name:?} is not a flow.TraceObservationPoint"));
        // The proto numbers some points apart from Cilium's monitor codes
        // (TO_ENDPOINT is 101, its monitor code 0): the event's sub_type
        // carries the code, the flow the name.
        assert_ne!(proto, pb::TraceObservationPoint::UnknownPoint, "{name}");
    }
    assert!(points >= 6);
    for state in [
        ct_state::NEW,
        ct_state::ESTABLISHED,
        ct_state::REPLY,
        ct_state::RELATED,
    ] {
        let name = record::trace_reason_name(state);
        let proto = pb::TraceReason::from_str_name(name)
            .unwrap_or_else(|| panic!("{state}: {name:?} is not a flow.TraceReason"));
        assert_eq!(proto as i32, state as i32, "{name}");
    }
    for d in [abi::Direction::Ingress, abi::Direction::Egress] {
        let name = record::direction_name(d as u8);
        let proto = pb::TrafficDirection::from_str_name(name).unwrap();
        assert_eq!(proto as i32, d as i32, "{name}");
    }
}
