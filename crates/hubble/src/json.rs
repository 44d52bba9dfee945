//! Hubble's JSON forms of its messages (protojson with the proto's field
//! names, as the hubble CLI writes and reads them): `--allowlist` and
//! `--denylist` filters, `--print-raw-filters`, and `--input-file`'s
//! GetFlowsResponse lines. Done through the descriptors of proto/, so
//! every field the proto has is understood, in both the proto and the
//! lowerCamel spelling, enums by name or number, 64-bit numbers as strings
//! or numbers.

use std::sync::OnceLock;

use prost_reflect::{DescriptorPool, DynamicMessage, MessageDescriptor, SerializeOptions};
use proto::flow as pb;
use proto::observer::GetFlowsResponse;

fn pool() -> &'static DescriptorPool {
    static POOL: OnceLock<DescriptorPool> = OnceLock::new();
    POOL.get_or_init(|| {
        // proto/ is compiled at build time: its descriptors always decode.
        DescriptorPool::decode(proto::DESCRIPTORS).unwrap_or_default()
    })
}

fn descriptor(name: &str) -> Result<MessageDescriptor, String> {
    pool()
        .get_message_by_name(name)
        .ok_or_else(|| format!("{name} is not in proto/"))
}

/// Every JSON object in `text` (one or several, as Go's decoder reads a
/// flag value), each as a `T` named `name` in proto/.
fn decode_all<T: prost::Message + Default>(name: &str, text: &str) -> Result<Vec<T>, String> {
    let desc = descriptor(name)?;
    let mut out = Vec::new();
    let stream = serde_json::Deserializer::from_str(text).into_iter::<serde_json::Value>();
    for value in stream {
        let value = value.map_err(|e| e.to_string())?;
        let message =
            DynamicMessage::deserialize(desc.clone(), value).map_err(|e| e.to_string())?;
        out.push(message.transcode_to::<T>().map_err(|e| e.to_string())?);
    }
    Ok(out)
}

fn encode<T: prost::Message>(name: &str, message: &T) -> Result<String, String> {
    let mut dynamic = DynamicMessage::new(descriptor(name)?);
    dynamic.transcode_from(message).map_err(|e| e.to_string())?;
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::new(&mut out);
    let options = SerializeOptions::new().use_proto_field_name(true);
    dynamic
        .serialize_with_options(&mut ser, &options)
        .map_err(|e| e.to_string())?;
    String::from_utf8(out).map_err(|e| e.to_string())
}

/// The filters in a `--allowlist` / `--denylist` value.
pub fn filters_from_json(text: &str) -> Result<Vec<pb::FlowFilter>, String> {
    decode_all("flow.FlowFilter", text)
}

/// A filter as `hubble observe --print-raw-filters` writes it.
pub fn filter_to_json(filter: &pb::FlowFilter) -> String {
    encode("flow.FlowFilter", filter).unwrap_or_default()
}

/// One line of `hubble observe -o jsonpb`.
pub fn response_from_json(line: &str) -> Result<GetFlowsResponse, String> {
    let mut all = decode_all::<GetFlowsResponse>("observer.GetFlowsResponse", line)?;
    match all.len() {
        1 => Ok(all.remove(0)),
        n => Err(format!("{n} JSON objects on one line")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filters_round_trip_in_hubbles_spelling() {
        let text = r#"{"source_pod":["x"],"verdict":["DROPPED"],"ip_trace_id":["7"],"tcp_flags":[{"SYN":true}]}{"destinationPort":["80"],"event_type":[{"type":4,"match_sub_type":true}]}"#;
        let filters = filters_from_json(text).unwrap();
        assert_eq!(filters.len(), 2);
        assert_eq!(filters[0].verdict, vec![pb::Verdict::Dropped as i32]);
        assert_eq!(filters[0].ip_trace_id, vec![7]);
        assert_eq!(filters[1].destination_port, vec!["80"]);
        assert_eq!(
            filter_to_json(&filters[0]),
            r#"{"source_pod":["x"],"verdict":["DROPPED"],"tcp_flags":[{"SYN":true}],"ip_trace_id":["7"]}"#
        );
        assert_eq!(
            filter_to_json(&filters[1]),
            r#"{"event_type":[{"type":4,"match_sub_type":true}],"destination_port":["80"]}"#
        );
        let err = filters_from_json(r#"{"no_such_field":1}"#).unwrap_err();
        assert!(err.contains("no_such_field"), "{err}");
        assert!(filters_from_json(r#"{"verdict":["MAYBE"]}"#).is_err());
        assert!(filters_from_json("{").is_err());
    }
}
