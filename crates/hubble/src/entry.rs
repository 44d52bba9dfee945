//! A flow as the ring holds it for the Hubble API: the record, and (made
//! on first read, once, whoever reads first) its `flow.Flow` for filters
//! and the whole GetFlowsResponse already encoded, which every stream that
//! sends the flow unmasked copies as it is. So a flow costs one conversion
//! and one encoding however many clients read it.

use std::sync::OnceLock;

use bytes::Bytes;
use prost::Message;
use proto::flow as pb;
use proto::observer::GetFlowsResponse;

use crate::convert;

pub struct FlowEntry {
    flow: flow::Flow,
    /// Boxed: most flows are never read, and the ring holds them all.
    wire: OnceLock<Box<Wire>>,
}

/// The wire forms of a flow.
pub struct Wire {
    pub flow: pb::Flow,
    /// Its time, in ns since the epoch (0 when it has none).
    pub ns: u64,
    /// `GetFlowsResponse { flow, node_name, time }`, encoded: the flow
    /// (field 1) first, then the rest (`rest`).
    pub response: Bytes,
    /// The encoded `flow.Flow` within `response`.
    pub flow_bytes: Bytes,
    /// The response after the flow: its node name and time.
    pub rest: Bytes,
}

impl FlowEntry {
    pub fn new(flow: flow::Flow) -> Self {
        FlowEntry {
            flow,
            wire: OnceLock::new(),
        }
    }

    pub fn wire(&self) -> &Wire {
        self.wire.get_or_init(|| {
            Box::new({
                let flow = convert::flow(&self.flow);
                let ns = self.flow.time.unix_ns();
                let envelope = GetFlowsResponse {
                    node_name: flow.node_name.clone(),
                    time: flow.time,
                    response_types: None,
                };
                // The flow encoded straight into the response (no copy).
                let flow_len = flow.encoded_len();
                let mut buf = Vec::with_capacity(flow_len + envelope.encoded_len() + 16);
                prost::encoding::encode_key(
                    1,
                    prost::encoding::WireType::LengthDelimited,
                    &mut buf,
                );
                prost::encoding::encode_varint(flow_len as u64, &mut buf);
                let start = buf.len();
                flow.encode_raw(&mut buf);
                let end = buf.len();
                envelope.encode_raw(&mut buf);
                let response = Bytes::from(buf);
                Wire {
                    flow,
                    ns,
                    flow_bytes: response.slice(start..end),
                    rest: response.slice(end..),
                    response,
                }
            })
        })
    }
}

impl Wire {
    /// The response with only what `mask` keeps of the flow; its node and
    /// time as they are.
    pub fn masked(&self, mask: &crate::field_mask::FieldMask) -> Bytes {
        let kept = mask.apply_encoded(&self.flow_bytes);
        let mut buf = Vec::with_capacity(kept.len() + self.rest.len() + 8);
        with_flow(&mut buf, &kept);
        buf.extend_from_slice(&self.rest);
        buf.into()
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
        let wire = entry.wire();
        assert_eq!(wire.ns, 1_768_471_200_500_000_000);
        let decoded = GetFlowsResponse::decode(wire.response.clone()).unwrap();
        let flow = convert::flow(&f);
        let expected = GetFlowsResponse {
            node_name: flow.node_name.clone(),
            time: flow.time,
            response_types: Some(ResponseTypes::Flow(flow)),
        };
        assert_eq!(decoded, expected);
        assert_eq!(decoded.node_name, "n1");
        // Encoded carries it byte for byte.
        let e = Encoded(wire.response.clone());
        assert_eq!(e.encode_to_vec(), wire.response.to_vec());
        assert!(std::ptr::eq(entry.wire(), wire), "made once");
        assert_eq!(
            pb::Flow::decode(wire.flow_bytes.clone()).unwrap(),
            convert::flow(&f)
        );
        // Masked: only the named fields of the flow, node and time kept.
        let mask = crate::field_mask::FieldMask::new(&["verdict".into(), "IP.source".into()])
            .unwrap()
            .unwrap();
        let masked = GetFlowsResponse::decode(wire.masked(&mask)).unwrap();
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
