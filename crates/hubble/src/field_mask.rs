//! `experimental.field_mask` of GetFlows: the client names the fields of
//! `flow.Flow` it wants (`time`, `source.pod_name`, `l4.TCP`); the server
//! sends only those, as Hubble does. The mask is applied to the encoded
//! flow: names resolve to field numbers once, through the descriptors of
//! proto/, and each flow's bytes are copied field by field.

use std::collections::BTreeMap;
use std::sync::OnceLock;

use prost::Message;
use prost_types::field_descriptor_proto::Type;
use prost_types::{DescriptorProto, FileDescriptorSet};
use proto::flow as pb;

use crate::filter::FilterError;

/// Fields kept, by number: `None` keeps the whole field, `Some` the listed
/// fields inside it (a message).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct FieldMask(BTreeMap<u32, Option<FieldMask>>);

/// Messages of proto/ by full name (`.flow.Flow`).
fn messages() -> &'static BTreeMap<String, DescriptorProto> {
    static MESSAGES: OnceLock<BTreeMap<String, DescriptorProto>> = OnceLock::new();
    MESSAGES.get_or_init(|| {
        let set = FileDescriptorSet::decode(proto::DESCRIPTORS).unwrap_or_default();
        let mut out = BTreeMap::new();
        fn add(prefix: &str, m: &DescriptorProto, out: &mut BTreeMap<String, DescriptorProto>) {
            let name = format!("{prefix}.{}", m.name());
            for nested in &m.nested_type {
                add(&name, nested, out);
            }
            out.insert(name, m.clone());
        }
        for file in &set.file {
            let prefix = if file.package().is_empty() {
                String::new()
            } else {
                format!(".{}", file.package())
            };
            for m in &file.message_type {
                add(&prefix, m, &mut out);
            }
        }
        out
    })
}

impl FieldMask {
    /// The mask of these paths over `flow.Flow`; `None` when there are none
    /// (everything is sent).
    pub fn new(paths: &[String]) -> Result<Option<Self>, FilterError> {
        if paths.is_empty() {
            return Ok(None);
        }
        let bad = |path: &str, why: String| FilterError::Invalid {
            field: "experimental.field_mask",
            value: path.to_string(),
            why,
        };
        let mut mask = FieldMask::default();
        for path in paths {
            let mut node = &mut mask;
            let mut message = ".flow.Flow".to_string();
            let names: Vec<&str> = path.split('.').collect();
            for (i, name) in names.iter().enumerate() {
                let desc = messages()
                    .get(&message)
                    .ok_or_else(|| bad(path, format!("no message {message}")))?;
                let field = desc
                    .field
                    .iter()
                    .find(|f| f.name() == *name)
                    .ok_or_else(|| bad(path, format!("{} has no field {name:?}", desc.name())))?;
                let last = i + 1 == names.len();
                if last {
                    // The whole field (wider than any narrower path given).
                    node.0.insert(field.number() as u32, None);
                    break;
                }
                if field.r#type() != Type::Message {
                    return Err(bad(path, format!("{name} is not a message")));
                }
                message = field.type_name().to_string();
                let entry = node
                    .0
                    .entry(field.number() as u32)
                    .or_insert_with(|| Some(FieldMask::default()));
                match entry {
                    Some(inner) => node = inner,
                    None => break, // already whole
                }
            }
        }
        Ok(Some(mask))
    }

    /// The flow with only the masked fields.
    pub fn apply(&self, flow: &pb::Flow) -> pb::Flow {
        let out = self.apply_encoded(&flow.encode_to_vec());
        // What is copied are whole fields of a valid encoding.
        pb::Flow::decode(out.as_slice()).unwrap_or_default()
    }

    /// The masked fields of an encoded `flow.Flow`, still encoded.
    pub fn apply_encoded(&self, flow: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(flow.len());
        self.copy(flow, &mut out);
        out
    }

    /// Copies the masked fields of one encoded message; stops at anything
    /// that is not a valid encoding (prost wrote it: it is).
    fn copy(&self, mut msg: &[u8], out: &mut Vec<u8>) {
        while !msg.is_empty() {
            let start = msg;
            let Ok(key) = prost::encoding::decode_varint(&mut msg) else {
                return;
            };
            let (number, wire) = ((key >> 3) as u32, key & 7);
            let value_start = msg;
            let payload: &[u8] = match wire {
                0 => {
                    if prost::encoding::decode_varint(&mut msg).is_err() {
                        return;
                    }
                    &[]
                }
                1 | 5 => {
                    let n = if wire == 1 { 8 } else { 4 };
                    if msg.len() < n {
                        return;
                    }
                    msg = &msg[n..];
                    &[]
                }
                2 => {
                    let Ok(len) = prost::encoding::decode_varint(&mut msg) else {
                        return;
                    };
                    let len = len as usize;
                    if msg.len() < len {
                        return;
                    }
                    let (p, rest) = msg.split_at(len);
                    msg = rest;
                    p
                }
                _ => return,
            };
            match self.0.get(&number) {
                None => {}
                Some(None) => out.extend_from_slice(&start[..start.len() - msg.len()]),
                Some(Some(inner)) if wire == 2 => {
                    let mut sub = Vec::with_capacity(payload.len());
                    inner.copy(payload, &mut sub);
                    out.extend_from_slice(&start[..start.len() - value_start.len()]);
                    prost::encoding::encode_varint(sub.len() as u64, out);
                    out.extend_from_slice(&sub);
                }
                Some(Some(_)) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow() -> pb::Flow {
        pb::Flow {
            time: Some(prost_types::Timestamp {
                seconds: 7,
                nanos: 9,
            }),
            verdict: pb::Verdict::Dropped as i32,
            node_name: "n1".into(),
            source: Some(pb::Endpoint {
                id: 3,
                identity: 256,
                namespace: "shop".into(),
                pod_name: "web".into(),
                labels: vec!["k8s:app=web".into()],
                ..Default::default()
            }),
            destination: Some(pb::Endpoint {
                pod_name: "db".into(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn mask(paths: &[&str]) -> Result<Option<FieldMask>, FilterError> {
        FieldMask::new(&paths.iter().map(|p| p.to_string()).collect::<Vec<_>>())
    }

    #[test]
    fn only_the_named_fields_are_kept() {
        let m = mask(&["time", "verdict", "source.pod_name", "source.labels"])
            .unwrap()
            .unwrap();
        let got = m.apply(&flow());
        let want = pb::Flow {
            time: flow().time,
            verdict: pb::Verdict::Dropped as i32,
            source: Some(pb::Endpoint {
                pod_name: "web".into(),
                labels: vec!["k8s:app=web".into()],
                ..Default::default()
            }),
            ..Default::default()
        };
        assert_eq!(got, want);
        // A whole message and a narrower path into it: the whole one.
        let m = mask(&["source", "source.pod_name"]).unwrap().unwrap();
        assert_eq!(m.apply(&flow()).source, flow().source);
        assert!(m.apply(&flow()).destination.is_none());
    }

    #[test]
    fn no_paths_mean_no_mask_and_unknown_paths_are_refused() {
        assert_eq!(mask(&[]).unwrap(), None);
        for bad in ["nope", "source.nope", "verdict.x", "", "source..pod_name"] {
            assert!(
                matches!(mask(&[bad]), Err(FilterError::Invalid { .. })),
                "{bad}"
            );
        }
    }
}
