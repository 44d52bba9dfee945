//! Every `flow.proto` enum a flow carries (`flow::enums`) is the proto's,
//! both ways, and every value the datapath produces maps to the proto
//! value of the same meaning. With `abi/tests/layout.rs` (the Rust enums
//! against `bpf/include/fibril_abi.h`) this ties the C header, the flow
//! records and the wire together: a code added to one cannot silently turn
//! into `0` / `..._UNKNOWN` on the wire, nor a name into another number.

use abi::{ct_state, verdict, DropReason, TracePoint};
use flow::{enums, record};
use proto::flow as pb;

/// `ours` holds exactly the proto enum's values, with its names.
fn same_table<T: Copy + std::fmt::Debug>(
    ours: &[(T, &'static str)],
    number: fn(T) -> i32,
    proto_name: fn(i32) -> Option<&'static str>,
    proto_number: fn(&str) -> Option<i32>,
) {
    for (v, name) in ours {
        assert_eq!(proto_number(name), Some(number(*v)), "{name} ({v:?})");
    }
    // Proto numbers are small (TO_ENDPOINT, 101, is the largest but for
    // drop reasons, which stay under 256).
    let proto: Vec<(i32, &str)> = (0..1024)
        .filter_map(|n| Some((n, proto_name(n)?)))
        .collect();
    let mine: Vec<(i32, &str)> = {
        let mut v: Vec<(i32, &str)> = ours.iter().map(|(v, n)| (number(*v), *n)).collect();
        v.sort();
        v
    };
    assert_eq!(mine, proto);
}

macro_rules! check {
    ($ours:ty, $pb:ty) => {
        same_table(
            <$ours>::ALL,
            |v| v.0,
            |n| <$pb>::try_from(n).ok().map(|e| e.as_str_name()),
            |s| <$pb>::from_str_name(s).map(|e| e as i32),
        );
        for (v, name) in <$ours>::ALL {
            assert_eq!(v.name(), Some(*name));
            assert_eq!(<$ours>::from_name(name), Some(*v));
        }
    };
}

#[test]
fn flow_enums_are_the_protos() {
    check!(enums::Verdict, pb::Verdict);
    check!(enums::FlowType, pb::FlowType);
    check!(enums::TrafficDirection, pb::TrafficDirection);
    check!(enums::TraceObservationPoint, pb::TraceObservationPoint);
    check!(enums::TraceReason, pb::TraceReason);
    check!(enums::IpVersion, pb::IpVersion);
    check!(enums::SocketTranslationPoint, pb::SocketTranslationPoint);
    check!(enums::L7FlowType, pb::L7FlowType);
    check!(enums::DropReason, pb::DropReason);
}

#[test]
fn datapath_drop_reasons_are_the_protos() {
    for reason in DropReason::ALL {
        let code = reason as u8;
        let r = record::drop_reason(code);
        let proto = pb::DropReason::try_from(r.0)
            .unwrap_or_else(|_| panic!("{reason:?}: {r} is not a flow.DropReason"));
        assert_eq!(proto as i32, code as i32, "{reason:?}");
        assert_ne!(proto, pb::DropReason::Unknown, "{reason:?}");
        assert_ne!(
            record::drop_reason_text(r),
            "Unknown drop reason",
            "{r} has no text"
        );
    }
    assert_eq!(
        record::drop_reason(1),
        enums::DropReason::DROP_REASON_UNKNOWN
    );
}

#[test]
fn datapath_verdicts_trace_points_reasons_and_directions_are_the_protos() {
    for (v, proto) in [
        (verdict::FORWARDED, pb::Verdict::Forwarded),
        (verdict::DROPPED, pb::Verdict::Dropped),
        (verdict::AUDIT, pb::Verdict::Audit),
    ] {
        assert_eq!(record::verdict(v).0, proto as i32, "{v}");
    }
    let mut points = 0;
    for code in 0..=u8::MAX {
        let point = record::trace_point(code);
        let Some(tp) = TracePoint::from_u8(code) else {
            assert!(point.is_unset(), "{code}");
            continue;
        };
        points += 1;
        // The proto numbers some points apart from Cilium's monitor codes
        // (TO_ENDPOINT is 101, its monitor code 0): the event's sub_type
        // carries the code, the flow the proto's value.
        let proto = pb::TraceObservationPoint::try_from(point.0).unwrap();
        assert_ne!(proto, pb::TraceObservationPoint::UnknownPoint, "{tp:?}");
        assert_eq!(
            proto.as_str_name().replace('_', "").to_lowercase(),
            format!("{tp:?}").to_lowercase().replace("lxc", "endpoint"),
            "{tp:?} is {}",
            proto.as_str_name()
        );
    }
    assert!(points >= 6);
    for (state, proto) in [
        (ct_state::NEW, pb::TraceReason::New),
        (ct_state::ESTABLISHED, pb::TraceReason::Established),
        (ct_state::REPLY, pb::TraceReason::Reply),
        (ct_state::RELATED, pb::TraceReason::Related),
    ] {
        assert_eq!(record::trace_reason(state).0, proto as i32, "{state}");
    }
    for (d, proto) in [
        (abi::Direction::Ingress, pb::TrafficDirection::Ingress),
        (abi::Direction::Egress, pb::TrafficDirection::Egress),
    ] {
        assert_eq!(record::direction(d as u8).0, proto as i32, "{d:?}");
    }
}

/// JSON carries names; a name the proto lacks is refused, not read as 0.
#[test]
fn flow_json_enums_are_names_and_unknown_names_are_refused() {
    let f = flow::Flow {
        verdict: enums::Verdict::DROPPED,
        drop_reason_desc: enums::DropReason::POLICY_DENIED,
        traffic_direction: enums::TrafficDirection::INGRESS,
        ..Default::default()
    };
    let json = serde_json::to_value(&f).unwrap();
    assert_eq!(json["verdict"], "DROPPED");
    assert_eq!(json["drop_reason_desc"], "POLICY_DENIED");
    assert_eq!(json["traffic_direction"], "INGRESS");
    assert!(
        json.get("trace_observation_point").is_none(),
        "unset: omitted"
    );
    let back: flow::Flow = serde_json::from_value(json.clone()).unwrap();
    assert_eq!(back, f);
    let mut bad = json;
    bad["verdict"] = "DROPPPED".into();
    let err = serde_json::from_value::<flow::Flow>(bad).unwrap_err();
    assert!(err.to_string().contains("not a flow.Verdict name"), "{err}");
}
