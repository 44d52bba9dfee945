//! Flows through the relay as their bytes: a node's GetFlowsResponse is
//! read only as far as its time (field 1001, a Timestamp), merged, and sent
//! on as it came. Decoding each flow and encoding it again cost the relay
//! most of its CPU.

use bytes::{Buf, Bytes};
use prost::Message;
use proto::observer::{GetFlowsRequest, GetFlowsResponse};
use tonic::codec::{Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic::Status;

/// A node's response, encoded, with its time.
#[derive(Clone, Debug)]
pub struct Raw {
    pub bytes: Bytes,
    /// ns since the epoch (0 when it has none).
    pub time_ns: u64,
}

impl Raw {
    /// A response the relay makes itself.
    pub fn of(r: &GetFlowsResponse) -> Self {
        Raw {
            bytes: r.encode_to_vec().into(),
            time_ns: r.time.as_ref().map_or(0, timestamp_ns),
        }
    }
}

/// A Timestamp as ns since the epoch (before the epoch: 0).
pub fn timestamp_ns(t: &prost_types::Timestamp) -> u64 {
    t.seconds.max(0) as u64 * 1_000_000_000 + t.nanos.max(0) as u64
}

/// The time (field 1001) of an encoded GetFlowsResponse: the top-level
/// fields are walked, the others skipped by their length. None when the
/// bytes are not a well-formed message.
pub fn time_of(mut buf: &[u8]) -> Option<u64> {
    let mut time = 0;
    while buf.has_remaining() {
        let key = prost::encoding::decode_varint(&mut buf).ok()?;
        let (field, wire) = (key >> 3, key & 7);
        match wire {
            0 => {
                prost::encoding::decode_varint(&mut buf).ok()?;
            }
            1 if buf.len() >= 8 => buf.advance(8),
            2 => {
                let len = prost::encoding::decode_varint(&mut buf).ok()? as usize;
                if len > buf.len() {
                    return None;
                }
                if field == 1001 {
                    time = timestamp_ns(&prost_types::Timestamp::decode(&buf[..len]).ok()?);
                }
                buf.advance(len);
            }
            5 if buf.len() >= 4 => buf.advance(4),
            _ => return None,
        }
    }
    Some(time)
}

/// GetFlows as a client: the request encoded as prost does, the responses
/// kept as bytes.
#[derive(Clone, Copy, Debug, Default)]
pub struct RawCodec;

impl Codec for RawCodec {
    type Encode = GetFlowsRequest;
    type Decode = Raw;
    type Encoder = RequestEncoder;
    type Decoder = RawDecoder;

    fn encoder(&mut self) -> Self::Encoder {
        RequestEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        RawDecoder
    }
}

pub struct RequestEncoder;

impl Encoder for RequestEncoder {
    type Item = GetFlowsRequest;
    type Error = Status;

    fn encode(&mut self, item: Self::Item, dst: &mut EncodeBuf<'_>) -> Result<(), Self::Error> {
        item.encode(dst)
            .map_err(|e| Status::internal(format!("encoding the request: {e}")))
    }
}

pub struct RawDecoder;

impl Decoder for RawDecoder {
    type Item = Raw;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<Self::Item>, Self::Error> {
        let bytes = src.copy_to_bytes(src.remaining());
        let time_ns = time_of(&bytes)
            .ok_or_else(|| Status::data_loss("a node sent a response that does not decode"))?;
        Ok(Some(Raw { bytes, time_ns }))
    }
}

/// Opens GetFlows on `channel`, its responses as bytes.
pub async fn get_flows(
    channel: tonic::transport::Channel,
    req: GetFlowsRequest,
    max_message: usize,
) -> Result<tonic::Streaming<Raw>, Status> {
    let mut grpc = tonic::client::Grpc::new(channel).max_decoding_message_size(max_message);
    grpc.ready()
        .await
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let path = tonic::codegen::http::uri::PathAndQuery::from_static("/observer.Observer/GetFlows");
    Ok(grpc
        .server_streaming(tonic::Request::new(req), path, RawCodec)
        .await?
        .into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::observer::get_flows_response::ResponseTypes;

    #[test]
    fn the_time_is_read_without_decoding_the_flow() {
        let time = Some(prost_types::Timestamp {
            seconds: 1_800_000_000,
            nanos: 123_456_789,
        });
        let r = GetFlowsResponse {
            node_name: "prod/n1".into(),
            time,
            response_types: Some(ResponseTypes::Flow(proto::flow::Flow {
                time,
                node_name: "n1".into(),
                source_names: vec!["a.example".into(); 50],
                ..Default::default()
            })),
        };
        let raw = Raw::of(&r);
        assert_eq!(time_of(&raw.bytes), Some(1_800_000_000_123_456_789));
        assert_eq!(raw.time_ns, 1_800_000_000_123_456_789);
        assert_eq!(GetFlowsResponse::decode(raw.bytes.clone()).unwrap(), r);
        assert_eq!(
            time_of(&GetFlowsResponse::default().encode_to_vec()),
            Some(0)
        );
        // Truncated or garbage: refused, never a panic.
        for bad in [
            &raw.bytes[..raw.bytes.len() - 3],
            &[0xff, 0xff, 0xff][..],
            &[0x0f][..],
        ] {
            assert_eq!(time_of(bad), None, "{bad:?}");
        }
    }
}
