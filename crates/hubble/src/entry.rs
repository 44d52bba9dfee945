//! A flow as the ring holds it for the Hubble API: the record, and, each
//! made on first need, once, whoever needs it first: its `flow.Flow` (for
//! filters) and its whole GetFlowsResponse encoded (which every stream that
//! sends the flow unmasked copies as it is). So a flow costs one conversion
//! and one encoding however many clients read it; a read with no filter
//! keeps only the encoding (~300 bytes, not the ~3 KB of a `flow.Flow`:
//! a cold ring's first read is bound by touching fresh memory).

use std::sync::OnceLock;

use bytes::Bytes;
use prost::Message;
use proto::flow as pb;
use proto::observer::GetFlowsResponse;

use crate::convert;

pub struct FlowEntry {
    flow: flow::Flow,
    /// Boxed: most flows are never filtered, and the ring holds them all.
    pb: OnceLock<Box<pb::Flow>>,
    response: OnceLock<Response>,
}

/// `GetFlowsResponse { flow, node_name, time }`, encoded: the flow (field
/// 1) first, then the rest.
struct Response {
    bytes: Bytes,
    /// Where the encoded `flow.Flow` lies within `bytes`.
    flow: std::ops::Range<usize>,
}

impl FlowEntry {
    pub fn new(flow: flow::Flow) -> Self {
        FlowEntry {
            flow,
            pb: OnceLock::new(),
            response: OnceLock::new(),
        }
    }

    /// The flow as `flow.Flow`.
    pub fn pb(&self) -> &pb::Flow {
        self.pb.get_or_init(|| Box::new(convert::flow(&self.flow)))
    }

    /// The flow's time in ns since the epoch (0 when it has none).
    pub fn ns(&self) -> u64 {
        self.flow.time.unix_ns()
    }

    /// The encoded response; shares its bytes.
    pub fn response(&self) -> Bytes {
        self.encoded().bytes.clone()
    }

    fn encoded(&self) -> &Response {
        self.response.get_or_init(|| match self.pb.get() {
            Some(flow) => encode(flow),
            // Converted for the encoding only, and dropped.
            None => encode(&convert::flow(&self.flow)),
        })
    }

    /// The response with only what `mask` keeps of the flow; its node and
    /// time as they are.
    pub fn masked(&self, mask: &crate::field_mask::FieldMask) -> Bytes {
        let r = self.encoded();
        let kept = mask.apply_encoded(&r.bytes.slice(r.flow.clone()));
        let rest = &r.bytes[r.flow.end..];
        let mut buf = Vec::with_capacity(kept.len() + rest.len() + 8);
        with_flow(&mut buf, &kept);
        buf.extend_from_slice(rest);
        buf.into()
    }
}

/// The response carrying `flow`, the flow encoded straight into it.
fn encode(flow: &pb::Flow) -> Response {
    let envelope = GetFlowsResponse {
        node_name: flow.node_name.clone(),
        time: flow.time,
        response_types: None,
    };
    let flow_len = flow.encoded_len();
    let mut buf = Vec::with_capacity(flow_len + envelope.encoded_len() + 16);
    prost::encoding::encode_key(1, prost::encoding::WireType::LengthDelimited, &mut buf);
    prost::encoding::encode_varint(flow_len as u64, &mut buf);
    let start = buf.len();
    flow.encode_raw(&mut buf);
    let end = buf.len();
    envelope.encode_raw(&mut buf);
    Response {
        bytes: Bytes::from(buf),
        flow: start..end,
    }
}

/// Writes field 1 of a GetFlowsResponse (the flow) holding `flow`; returns
/// where the flow's bytes start.
fn with_flow(buf: &mut Vec<u8>, flow: &[u8]) -> usize {
    prost::encoding::encode_key(1, prost::encoding::WireType::LengthDelimited, buf);
    prost::encoding::encode_varint(flow.len() as u64, buf);
    let start = buf.len();
    buf.extend_from_slice(flow);
    start
}

impl std::ops::Deref for FlowEntry {
    type Target = flow::Flow;
    fn deref(&self) -> &flow::Flow {
        &self.flow
    }
}

/// An encoded message sent as it is (the codec copies its bytes).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Encoded(pub Bytes);

impl Encoded {
    pub fn of(m: &impl Message) -> Self {
        Encoded(m.encode_to_vec().into())
    }
}

impl Message for Encoded {
    fn encode_raw(&self, buf: &mut impl bytes::BufMut) {
        buf.put_slice(&self.0);
    }

    fn merge_field(
        &mut self,
        tag: u32,
        wire_type: prost::encoding::WireType,
        buf: &mut impl bytes::Buf,
        ctx: prost::encoding::DecodeContext,
    ) -> Result<(), prost::DecodeError> {
        // Only ever sent: the server never decodes its own responses.
        prost::encoding::skip_field(wire_type, tag, buf, ctx)
    }

    fn encoded_len(&self) -> usize {
        self.0.len()
    }

    fn clear(&mut self) {
        self.0 = Bytes::new();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::observer::get_flows_response::ResponseTypes;

    #[test]
    fn the_cached_response_is_the_response_prost_would_send() {
        let f: flow::Flow = serde_json::from_str(r#"{"time":"2026-01-15T10:00:00.5Z","uuid":"u","verdict":"DROPPED","IP":{"source":"10.0.0.1","destination":"10.0.0.2","ipVersion":"IPv4"},"Type":"L3_L4","node_name":"n1","event_type":{"type":1,"sub_type":133},"drop_reason_desc":"POLICY_DENIED","Summary":"x"}"#).unwrap();
        let entry = FlowEntry::new(f.clone());
        assert_eq!(entry.ns(), 1_768_471_200_500_000_000);
        let response = entry.response();
        assert!(
            entry.pb.get().is_none(),
            "no flow.Flow kept for a plain read"
        );
        let decoded = GetFlowsResponse::decode(response.clone()).unwrap();
        let flow = convert::flow(&f);
        let expected = GetFlowsResponse {
            node_name: flow.node_name.clone(),
            time: flow.time,
            response_types: Some(ResponseTypes::Flow(flow)),
        };
        assert_eq!(decoded, expected);
        assert_eq!(decoded.node_name, "n1");
        // Encoded carries it byte for byte.
        let e = Encoded(response.clone());
        assert_eq!(e.encode_to_vec(), response.to_vec());
        assert_eq!(entry.response().as_ptr(), response.as_ptr(), "made once");
        assert_eq!(entry.pb(), &convert::flow(&f));
        // Encoded from the kept flow.Flow, the same bytes.
        let filtered_first = FlowEntry::new(f.clone());
        filtered_first.pb();
        assert_eq!(filtered_first.response(), response);
        // Masked: only the named fields of the flow, node and time kept.
        let mask = crate::field_mask::FieldMask::new(&["verdict".into(), "IP.source".into()])
            .unwrap()
            .unwrap();
        let masked = GetFlowsResponse::decode(entry.masked(&mask)).unwrap();
        assert_eq!(
            (masked.node_name.as_str(), masked.time),
            ("n1", decoded.time)
        );
        let Some(ResponseTypes::Flow(m)) = masked.response_types else {
            panic!("no flow")
        };
        assert_eq!(m.verdict, pb::Verdict::Dropped as i32);
        assert_eq!(m.ip.unwrap().source, "10.0.0.1");
        assert!(m.uuid.is_empty() && m.l4.is_none());
    }
}
