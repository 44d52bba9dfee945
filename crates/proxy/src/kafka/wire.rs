//! Kafka's wire protocol as the proxy needs it, on the `kafka-protocol`
//! crate's messages: a request's header and the topics it names, the
//! broker's answer's error codes, the answer the proxy gives a refused
//! request, and the API versions it lets clients use.
//!
//! Every frame is a 4-byte big-endian length and that many bytes; a
//! request starts with its key, version, correlation ID and client ID, a
//! response with the correlation ID (the header versions say whether
//! tagged fields follow).

use std::collections::HashMap;
use std::sync::RwLock;

use bytes::{BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{self as m, ApiKey, TopicName};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
use uuid::Uuid;

use super::rules::{self as k};

/// The largest frame accepted either way (the broker's default
/// `socket.request.max.bytes`, 100 MiB); a bigger length closes the
/// connection.
pub const MAX_FRAME: usize = 100 << 20;

/// Kafka's error codes the proxy answers with.
pub const TOPIC_AUTHORIZATION_FAILED: i16 = 29;
pub const GROUP_AUTHORIZATION_FAILED: i16 = 30;
pub const CLUSTER_AUTHORIZATION_FAILED: i16 = 31;
pub const TRANSACTIONAL_ID_AUTHORIZATION_FAILED: i16 = 53;

const DESCRIBE_CLUSTER: i16 = 60;
const CONSUMER_GROUP_HEARTBEAT: i16 = 68;
const GET_TELEMETRY_SUBSCRIPTIONS: i16 = 71;
const PUSH_TELEMETRY: i16 = 72;

/// The highest version of each key whose requests name their topics
/// (later ones name them by topic ID only); the proxy advertises no higher
/// ones, so the rules always see names.
fn highest_version_naming_topics(key: i16) -> Option<i16> {
    match key {
        k::PRODUCE | k::FETCH => Some(12),
        k::OFFSET_COMMIT | k::OFFSET_FETCH => Some(9),
        k::DELETE_TOPICS => Some(5),
        _ => None,
    }
}

/// Topic IDs the broker's metadata answers named, for requests that name
/// topics by ID (clients that never asked for API versions).
#[derive(Default)]
pub struct TopicIds(RwLock<HashMap<Uuid, String>>);

/// IDs kept; beyond, the map starts over (answers refill it).
const TOPIC_IDS_LIMIT: usize = 100_000;

impl TopicIds {
    fn name(&self, id: &Uuid) -> Option<String> {
        self.0
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
    }

    fn learn(&self, topics: &[m::metadata_response::MetadataResponseTopic]) {
        let new: Vec<(Uuid, String)> = topics
            .iter()
            .filter(|t| !t.topic_id.is_nil())
            .filter_map(|t| t.name.as_ref().map(|n| (t.topic_id, n.0.to_string())))
            .filter(|(id, name)| self.name(id).as_ref() != Some(name))
            .collect();
        if new.is_empty() {
            return;
        }
        let mut map = self.0.write().unwrap_or_else(|e| e.into_inner());
        if map.len() + new.len() > TOPIC_IDS_LIMIT {
            map.clear();
        }
        map.extend(new);
    }
}

/// A request the body of which the proxy understood.
#[derive(Debug)]
pub enum Body {
    Produce(m::ProduceRequest),
    Fetch(m::FetchRequest),
    ListOffsets(m::ListOffsetsRequest),
    Metadata(m::MetadataRequest),
    OffsetCommit(m::OffsetCommitRequest),
    OffsetFetch(m::OffsetFetchRequest),
    FindCoordinator(m::FindCoordinatorRequest),
    CreateTopics(m::CreateTopicsRequest),
    DeleteTopics(m::DeleteTopicsRequest),
    InitProducerId(m::InitProducerIdRequest),
    ShareFetch(m::ShareFetchRequest),
    ShareAcknowledge(m::ShareAcknowledgeRequest),
    OffsetDelete(m::OffsetDeleteRequest),
    DescribeTopicPartitions(m::DescribeTopicPartitionsRequest),
    /// A key whose refusal needs nothing of the body (group requests,
    /// ApiVersions), or one the proxy does not decode.
    Other,
    /// The body did not decode at its version.
    Unreadable,
}

/// One request as the rules and flows see it.
#[derive(Debug)]
pub struct Request {
    pub api_key: i16,
    pub api_version: i16,
    pub correlation_id: i32,
    pub client_id: String,
    /// The topics it names, in order, without repeats; `None`: not known
    /// (see `rules::RequestView::topics`).
    pub topics: Option<Vec<String>>,
    /// False for a Produce with `acks=0`: the broker sends no response.
    pub expects_response: bool,
    /// InitProducerId with a transactional ID.
    pub transactional: bool,
    pub body: Body,
}

impl Request {
    pub fn view(&self) -> k::RequestView<'_> {
        k::RequestView {
            api_key: self.api_key,
            api_version: self.api_version,
            client_id: &self.client_id,
            topics: self.topics.as_deref(),
            transactional: self.transactional,
        }
    }
}

fn i16_at(b: &[u8], at: usize) -> Option<i16> {
    Some(i16::from_be_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

fn i32_at(b: &[u8], at: usize) -> Option<i32> {
    Some(i32::from_be_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

/// The correlation ID a frame (request or response) carries.
pub fn response_correlation_id(frame: &[u8]) -> Option<i32> {
    i32_at(frame, 0)
}

fn decode<T: Decodable>(body: &mut Bytes, version: i16) -> Option<T> {
    T::decode(body, version).ok()
}

/// Collects topic names in order, once each; an ID the proxy does not
/// know makes the whole list unknown.
struct Topics<'a> {
    names: Vec<String>,
    known: bool,
    ids: &'a TopicIds,
}

impl<'a> Topics<'a> {
    fn new(ids: &'a TopicIds) -> Self {
        Self {
            names: Vec::new(),
            known: true,
            ids,
        }
    }

    fn name(&mut self, n: &str) {
        if !self.names.iter().any(|x| x == n) {
            self.names.push(n.to_string());
        }
    }

    /// A topic given by name, or (name empty) by ID.
    fn either(&mut self, name: &str, id: &Uuid) {
        if !name.is_empty() {
            self.name(name);
        } else {
            self.id(id);
        }
    }

    fn id(&mut self, id: &Uuid) {
        match self.ids.name(id) {
            Some(n) => self.name(&n),
            None => self.known = false,
        }
    }

    fn done(self) -> Option<Vec<String>> {
        self.known.then_some(self.names)
    }
}

/// Reads a request frame (without its length). `Err` when not even the
/// header reads: the connection is closed.
pub fn parse_request(frame: Bytes, ids: &TopicIds) -> Result<Request, String> {
    let (Some(api_key), Some(api_version), Some(correlation_id)) =
        (i16_at(&frame, 0), i16_at(&frame, 2), i32_at(&frame, 4))
    else {
        return Err(format!("a request of {} bytes has no header", frame.len()));
    };
    let known = ApiKey::try_from(api_key).ok().filter(|key| {
        key.valid_versions().min <= api_version && api_version <= key.valid_versions().max
    });
    let mut rest = frame.clone();
    let client_id = match known {
        Some(key) => {
            let header =
                m::RequestHeader::decode(&mut rest, key.request_header_version(api_version))
                    .map_err(|e| format!("a request header that does not decode: {e}"))?;
            header.client_id.map(|c| c.to_string()).unwrap_or_default()
        }
        None => {
            // An unknown key or version: the client ID still sits where
            // header v1 puts it.
            let len = i16_at(&frame, 8).ok_or("a request header without a client ID")?;
            let len = usize::try_from(len).unwrap_or(0);
            let id = frame
                .get(10..10 + len)
                .ok_or("a client ID longer than its request")?;
            String::from_utf8_lossy(id).into_owned()
        }
    };
    let mut topics = Topics::new(ids);
    let mut expects_response = true;
    let mut transactional = false;
    let v = api_version;
    let body = if known.is_none() {
        Body::Unreadable
    } else {
        let b = &mut rest;
        let body = match api_key {
            k::PRODUCE => decode(b, v).map(Body::Produce),
            k::FETCH => decode(b, v).map(Body::Fetch),
            k::LIST_OFFSETS => decode(b, v).map(Body::ListOffsets),
            k::METADATA => decode(b, v).map(Body::Metadata),
            k::OFFSET_COMMIT => decode(b, v).map(Body::OffsetCommit),
            k::OFFSET_FETCH => decode(b, v).map(Body::OffsetFetch),
            k::FIND_COORDINATOR => decode(b, v).map(Body::FindCoordinator),
            k::CREATE_TOPICS => decode(b, v).map(Body::CreateTopics),
            k::DELETE_TOPICS => decode(b, v).map(Body::DeleteTopics),
            k::INIT_PRODUCER_ID => decode(b, v).map(Body::InitProducerId),
            47 => decode(b, v).map(Body::OffsetDelete),
            75 => decode(b, v).map(Body::DescribeTopicPartitions),
            78 => decode(b, v).map(Body::ShareFetch),
            79 => decode(b, v).map(Body::ShareAcknowledge),
            _ => Some(Body::Other),
        };
        body.unwrap_or(Body::Unreadable)
    };
    match &body {
        Body::Produce(r) => {
            expects_response = r.acks != 0;
            for t in &r.topic_data {
                topics.either(&t.name.0, &t.topic_id);
            }
        }
        Body::Fetch(r) => r
            .topics
            .iter()
            .for_each(|t| topics.either(&t.topic.0, &t.topic_id)),
        Body::ListOffsets(r) => r.topics.iter().for_each(|t| topics.name(&t.name.0)),
        Body::Metadata(r) => {
            for t in r.topics.iter().flatten() {
                match &t.name {
                    Some(n) => topics.name(&n.0),
                    None => topics.id(&t.topic_id),
                }
            }
        }
        Body::OffsetCommit(r) => r
            .topics
            .iter()
            .for_each(|t| topics.either(&t.name.0, &t.topic_id)),
        Body::OffsetFetch(r) => {
            for t in r.topics.iter().flatten() {
                topics.name(&t.name.0);
            }
            for g in &r.groups {
                for t in g.topics.iter().flatten() {
                    topics.either(&t.name.0, &t.topic_id);
                }
            }
        }
        Body::CreateTopics(r) => r.topics.iter().for_each(|t| topics.name(&t.name.0)),
        Body::DeleteTopics(r) => {
            r.topic_names.iter().for_each(|n| topics.name(&n.0));
            for t in &r.topics {
                match &t.name {
                    Some(n) => topics.name(&n.0),
                    None => topics.id(&t.topic_id),
                }
            }
        }
        Body::InitProducerId(r) => transactional = r.transactional_id.is_some(),
        Body::FindCoordinator(_) => {}
        Body::OffsetDelete(r) => r.topics.iter().for_each(|t| topics.name(&t.name.0)),
        Body::DescribeTopicPartitions(r) => r.topics.iter().for_each(|t| topics.name(&t.name.0)),
        Body::ShareFetch(r) => r.topics.iter().for_each(|t| topics.id(&t.topic_id)),
        Body::ShareAcknowledge(r) => r.topics.iter().for_each(|t| topics.id(&t.topic_id)),
        Body::Other => {}
        Body::Unreadable => topics.known = false,
    }
    let topics = if k::carries_topics(api_key) {
        topics.done()
    } else {
        Some(Vec::new())
    };
    Ok(Request {
        api_key,
        api_version,
        correlation_id,
        client_id,
        topics,
        expects_response,
        transactional,
        body,
    })
}

/// A response frame (without its length) for `req`: the header its
/// version calls for, then the body.
fn frame<T: Encodable>(req: &Request, body: &T) -> Option<Bytes> {
    let key = ApiKey::try_from(req.api_key).ok()?;
    let mut out = BytesMut::new();
    out.put_i32(0);
    let header = m::ResponseHeader::default().with_correlation_id(req.correlation_id);
    header
        .encode(&mut out, key.response_header_version(req.api_version))
        .ok()?;
    body.encode(&mut out, req.api_version).ok()?;
    let len = i32::try_from(out.len() - 4).ok()?;
    out[..4].copy_from_slice(&len.to_be_bytes());
    Some(out.freeze())
}

/// The error code a refused request gets: Cilium's TOPIC_AUTHORIZATION_
/// FAILED for the requests its proxy answers (topic requests and
/// FindCoordinator), Kafka's own authorizer's code for the rest.
pub fn refusal_code(req: &Request) -> i16 {
    match req.api_key {
        k::JOIN_GROUP
        | k::HEARTBEAT
        | k::LEAVE_GROUP
        | k::SYNC_GROUP
        | CONSUMER_GROUP_HEARTBEAT => GROUP_AUTHORIZATION_FAILED,
        k::API_VERSIONS => CLUSTER_AUTHORIZATION_FAILED,
        k::INIT_PRODUCER_ID if req.transactional => TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
        k::INIT_PRODUCER_ID | DESCRIBE_CLUSTER | GET_TELEMETRY_SUBSCRIPTIONS | PUSH_TELEMETRY => {
            CLUSTER_AUTHORIZATION_FAILED
        }
        _ => TOPIC_AUTHORIZATION_FAILED,
    }
}

/// The answer to a refused request, whole (with its length): every topic
/// and partition it names carries `refusal_code`. Only fields every
/// version of the answer has are set beyond their defaults (the encoder
/// refuses a field its version lacks). `None` for requests the
/// proxy cannot answer (the connection is then closed, as Cilium does).
pub fn refusal(req: &Request) -> Option<Bytes> {
    use m::*;
    let code = refusal_code(req);
    let v = req.api_version;
    match &req.body {
        Body::Produce(r) => {
            let responses = r
                .topic_data
                .iter()
                .map(|t| {
                    produce_response::TopicProduceResponse::default()
                        .with_name(t.name.clone())
                        .with_topic_id(t.topic_id)
                        .with_partition_responses(
                            t.partition_data
                                .iter()
                                .map(|p| {
                                    produce_response::PartitionProduceResponse::default()
                                        .with_index(p.index)
                                        .with_error_code(code)
                                        .with_base_offset(-1)
                                })
                                .collect(),
                        )
                })
                .collect();
            frame(req, &ProduceResponse::default().with_responses(responses))
        }
        Body::Fetch(r) => {
            let responses = r
                .topics
                .iter()
                .map(|t| {
                    fetch_response::FetchableTopicResponse::default()
                        .with_topic(t.topic.clone())
                        .with_topic_id(t.topic_id)
                        .with_partitions(
                            t.partitions
                                .iter()
                                .map(|p| {
                                    fetch_response::PartitionData::default()
                                        .with_partition_index(p.partition)
                                        .with_error_code(code)
                                        .with_high_watermark(-1)
                                        .with_records(Some(Bytes::new()))
                                })
                                .collect(),
                        )
                })
                .collect();
            frame(req, &FetchResponse::default().with_responses(responses))
        }
        Body::ListOffsets(r) => {
            let topics = r
                .topics
                .iter()
                .map(|t| {
                    list_offsets_response::ListOffsetsTopicResponse::default()
                        .with_name(t.name.clone())
                        .with_partitions(
                            t.partitions
                                .iter()
                                .map(|p| {
                                    list_offsets_response::ListOffsetsPartitionResponse::default()
                                        .with_partition_index(p.partition_index)
                                        .with_error_code(code)
                                })
                                .collect(),
                        )
                })
                .collect();
            frame(req, &ListOffsetsResponse::default().with_topics(topics))
        }
        Body::Metadata(r) => {
            let topics = r
                .topics
                .iter()
                .flatten()
                .map(|t| {
                    metadata_response::MetadataResponseTopic::default()
                        .with_error_code(code)
                        .with_name(t.name.clone())
                        .with_topic_id(t.topic_id)
                })
                .collect();
            frame(req, &MetadataResponse::default().with_topics(topics))
        }
        Body::OffsetCommit(r) => {
            let topics = r
                .topics
                .iter()
                .map(|t| {
                    offset_commit_response::OffsetCommitResponseTopic::default()
                        .with_name(t.name.clone())
                        .with_topic_id(t.topic_id)
                        .with_partitions(
                            t.partitions
                                .iter()
                                .map(|p| {
                                    offset_commit_response::OffsetCommitResponsePartition::default()
                                        .with_partition_index(p.partition_index)
                                        .with_error_code(code)
                                })
                                .collect(),
                        )
                })
                .collect();
            frame(req, &OffsetCommitResponse::default().with_topics(topics))
        }
        Body::OffsetFetch(r) => {
            let partition = |i: &i32| {
                offset_fetch_response::OffsetFetchResponsePartition::default()
                    .with_partition_index(*i)
                    .with_committed_offset(-1)
                    .with_error_code(code)
            };
            let topics = r
                .topics
                .iter()
                .flatten()
                .map(|t| {
                    offset_fetch_response::OffsetFetchResponseTopic::default()
                        .with_name(t.name.clone())
                        .with_partitions(t.partition_indexes.iter().map(partition).collect())
                })
                .collect();
            let groups = r
                .groups
                .iter()
                .map(|g| {
                    let topics = g
                        .topics
                        .iter()
                        .flatten()
                        .map(|t| {
                            offset_fetch_response::OffsetFetchResponseTopics::default()
                                .with_name(t.name.clone())
                                .with_topic_id(t.topic_id)
                                .with_partitions(
                                    t.partition_indexes
                                        .iter()
                                        .map(|i| {
                                            offset_fetch_response::OffsetFetchResponsePartitions::default()
                                                .with_partition_index(*i)
                                                .with_committed_offset(-1)
                                                .with_error_code(code)
                                        })
                                        .collect(),
                                )
                        })
                        .collect();
                    offset_fetch_response::OffsetFetchResponseGroup::default()
                        .with_group_id(g.group_id.clone())
                        .with_topics(topics)
                        .with_error_code(code)
                })
                .collect();
            frame(
                req,
                &OffsetFetchResponse::default()
                    .with_topics(topics)
                    .with_groups(groups)
                    .with_error_code(if (2..8).contains(&v) { code } else { 0 }),
            )
        }
        Body::FindCoordinator(r) => {
            let coordinators = r
                .coordinator_keys
                .iter()
                .map(|key| {
                    find_coordinator_response::Coordinator::default()
                        .with_key(key.clone())
                        .with_node_id(BrokerId(-1))
                        .with_port(-1)
                        .with_error_code(code)
                })
                .collect();
            let answer = if v >= 4 {
                FindCoordinatorResponse::default().with_coordinators(coordinators)
            } else {
                FindCoordinatorResponse::default()
                    .with_error_code(code)
                    .with_node_id(BrokerId(-1))
                    .with_port(-1)
            };
            frame(req, &answer)
        }
        Body::CreateTopics(r) => {
            let topics = r
                .topics
                .iter()
                .map(|t| {
                    create_topics_response::CreatableTopicResult::default()
                        .with_name(t.name.clone())
                        .with_error_code(code)
                })
                .collect();
            frame(req, &CreateTopicsResponse::default().with_topics(topics))
        }
        Body::DeleteTopics(r) => {
            let by_name = r.topic_names.iter().map(|n| {
                delete_topics_response::DeletableTopicResult::default()
                    .with_name(Some(n.clone()))
                    .with_error_code(code)
            });
            let by_state = r.topics.iter().map(|t| {
                delete_topics_response::DeletableTopicResult::default()
                    .with_name(t.name.clone())
                    .with_topic_id(t.topic_id)
                    .with_error_code(code)
            });
            frame(
                req,
                &DeleteTopicsResponse::default().with_responses(by_name.chain(by_state).collect()),
            )
        }
        Body::InitProducerId(_) => frame(
            req,
            &InitProducerIdResponse::default()
                .with_error_code(code)
                .with_producer_id(ProducerId(-1))
                .with_producer_epoch(-1),
        ),
        Body::Other => match req.api_key {
            k::JOIN_GROUP => frame(
                req,
                &JoinGroupResponse::default()
                    .with_error_code(code)
                    .with_generation_id(-1),
            ),
            k::HEARTBEAT => frame(req, &HeartbeatResponse::default().with_error_code(code)),
            k::LEAVE_GROUP => frame(req, &LeaveGroupResponse::default().with_error_code(code)),
            k::SYNC_GROUP => frame(req, &SyncGroupResponse::default().with_error_code(code)),
            k::API_VERSIONS => frame(req, &ApiVersionsResponse::default().with_error_code(code)),
            // What a client asks on its own (KIP-714 telemetry, the
            // cluster's description): refused, it does without.
            DESCRIBE_CLUSTER => frame(
                req,
                &DescribeClusterResponse::default().with_error_code(code),
            ),
            GET_TELEMETRY_SUBSCRIPTIONS => frame(
                req,
                &GetTelemetrySubscriptionsResponse::default().with_error_code(code),
            ),
            PUSH_TELEMETRY => frame(req, &PushTelemetryResponse::default().with_error_code(code)),
            // KIP-848's consumer group protocol: outside Cilium's roles,
            // refused with the group error its authorizer gives.
            CONSUMER_GROUP_HEARTBEAT => frame(
                req,
                &ConsumerGroupHeartbeatResponse::default().with_error_code(code),
            ),
            _ => None,
        },
        _ => None,
    }
}

/// A refused Metadata request as the broker gets it instead: the same
/// request naming no topics (and creating none), so that the answer still
/// names the brokers and the cluster, which a client needs to take the
/// refusal for one (an answer without brokers is ignored and retried).
/// `None` for v0, where no topics means all of them.
pub fn metadata_without_topics(req: &Request) -> Option<Bytes> {
    let Body::Metadata(r) = &req.body else {
        return None;
    };
    if req.api_version < 1 {
        return None;
    }
    let key = ApiKey::Metadata;
    let mut out = BytesMut::new();
    m::RequestHeader::default()
        .with_request_api_key(req.api_key)
        .with_request_api_version(req.api_version)
        .with_correlation_id(req.correlation_id)
        .with_client_id(Some(StrBytes::from_string(req.client_id.clone())))
        .encode(&mut out, key.request_header_version(req.api_version))
        .ok()?;
    let mut r = r.clone();
    r.topics = Some(Vec::new());
    if req.api_version >= 4 {
        r.allow_auto_topic_creation = false;
    }
    r.encode(&mut out, req.api_version).ok()?;
    Some(out.freeze())
}

/// The broker's answer to `metadata_without_topics`, with each refused
/// topic added as Kafka's authorizer reports one: its name and the error.
pub fn mark_refused_topics(
    api_version: i16,
    frame: &Bytes,
    topics: &[String],
    code: i16,
) -> Option<Bytes> {
    let key = ApiKey::Metadata;
    let header_version = key.response_header_version(api_version);
    let mut b = frame.clone();
    let header = m::ResponseHeader::decode(&mut b, header_version).ok()?;
    let mut r = m::MetadataResponse::decode(&mut b, api_version).ok()?;
    r.topics.extend(topics.iter().map(|t| {
        m::metadata_response::MetadataResponseTopic::default()
            .with_error_code(code)
            .with_name(Some(TopicName(StrBytes::from_string(t.clone()))))
    }));
    let mut out = BytesMut::new();
    header.encode(&mut out, header_version).ok()?;
    r.encode(&mut out, api_version).ok()?;
    Some(out.freeze())
}

/// What a broker's response says: its overall error code and each
/// topic's (the first error among its partitions).
#[derive(Debug, Default)]
pub struct Answer {
    pub error_code: i16,
    pub topics: Vec<(String, i16)>,
}

impl Answer {
    /// The error code a flow about `topic` reports.
    pub fn error_for(&self, topic: &str) -> i16 {
        self.topics
            .iter()
            .find(|(t, _)| t == topic)
            .map_or(self.error_code, |(_, e)| *e)
    }
}

fn first_error(codes: impl IntoIterator<Item = i16>) -> i16 {
    codes.into_iter().find(|c| *c != 0).unwrap_or(0)
}

/// Reads a broker's response to `(api_key, api_version)` for its flows,
/// learning topic IDs from metadata. Unknown or unreadable: no error.
pub fn read_answer(api_key: i16, api_version: i16, frame: &Bytes, ids: &TopicIds) -> Answer {
    let Ok(key) = ApiKey::try_from(api_key) else {
        return Answer::default();
    };
    let mut b = frame.clone();
    if m::ResponseHeader::decode(&mut b, key.response_header_version(api_version)).is_err() {
        return Answer::default();
    }
    let v = api_version;
    let topic = |name: &TopicName, id: &Uuid, codes: Vec<i16>| {
        let name = if name.0.is_empty() {
            ids.name(id).unwrap_or_default()
        } else {
            name.0.to_string()
        };
        (name, first_error(codes))
    };
    let top = |error_code: i16| Answer {
        error_code,
        topics: Vec::new(),
    };
    match api_key {
        k::PRODUCE => decode::<m::ProduceResponse>(&mut b, v).map(|r| Answer {
            error_code: 0,
            topics: r
                .responses
                .iter()
                .map(|t| {
                    topic(
                        &t.name,
                        &t.topic_id,
                        t.partition_responses.iter().map(|p| p.error_code).collect(),
                    )
                })
                .collect(),
        }),
        k::FETCH => decode::<m::FetchResponse>(&mut b, v).map(|r| Answer {
            error_code: r.error_code,
            topics: r
                .responses
                .iter()
                .map(|t| {
                    topic(
                        &t.topic,
                        &t.topic_id,
                        t.partitions.iter().map(|p| p.error_code).collect(),
                    )
                })
                .collect(),
        }),
        k::LIST_OFFSETS => decode::<m::ListOffsetsResponse>(&mut b, v).map(|r| Answer {
            error_code: 0,
            topics: r
                .topics
                .iter()
                .map(|t| {
                    topic(
                        &t.name,
                        &Uuid::nil(),
                        t.partitions.iter().map(|p| p.error_code).collect(),
                    )
                })
                .collect(),
        }),
        k::METADATA => decode::<m::MetadataResponse>(&mut b, v).map(|r| {
            ids.learn(&r.topics);
            Answer {
                error_code: r.error_code,
                topics: r
                    .topics
                    .iter()
                    .map(|t| {
                        let name = t.name.clone().unwrap_or_default();
                        topic(&name, &t.topic_id, vec![t.error_code])
                    })
                    .collect(),
            }
        }),
        k::OFFSET_COMMIT => decode::<m::OffsetCommitResponse>(&mut b, v).map(|r| Answer {
            error_code: 0,
            topics: r
                .topics
                .iter()
                .map(|t| {
                    topic(
                        &t.name,
                        &t.topic_id,
                        t.partitions.iter().map(|p| p.error_code).collect(),
                    )
                })
                .collect(),
        }),
        k::OFFSET_FETCH => decode::<m::OffsetFetchResponse>(&mut b, v).map(|r| {
            let mut topics: Vec<(String, i16)> = r
                .topics
                .iter()
                .map(|t| {
                    topic(
                        &t.name,
                        &Uuid::nil(),
                        t.partitions.iter().map(|p| p.error_code).collect(),
                    )
                })
                .collect();
            for g in &r.groups {
                topics.extend(g.topics.iter().map(|t| {
                    topic(
                        &t.name,
                        &t.topic_id,
                        t.partitions.iter().map(|p| p.error_code).collect(),
                    )
                }));
            }
            Answer {
                error_code: first_error(
                    std::iter::once(r.error_code).chain(r.groups.iter().map(|g| g.error_code)),
                ),
                topics,
            }
        }),
        k::FIND_COORDINATOR => decode::<m::FindCoordinatorResponse>(&mut b, v).map(|r| {
            top(first_error(
                std::iter::once(r.error_code).chain(r.coordinators.iter().map(|c| c.error_code)),
            ))
        }),
        k::JOIN_GROUP => decode::<m::JoinGroupResponse>(&mut b, v).map(|r| top(r.error_code)),
        k::HEARTBEAT => decode::<m::HeartbeatResponse>(&mut b, v).map(|r| top(r.error_code)),
        k::LEAVE_GROUP => decode::<m::LeaveGroupResponse>(&mut b, v).map(|r| top(r.error_code)),
        k::SYNC_GROUP => decode::<m::SyncGroupResponse>(&mut b, v).map(|r| top(r.error_code)),
        k::API_VERSIONS => decode::<m::ApiVersionsResponse>(&mut b, v).map(|r| top(r.error_code)),
        k::INIT_PRODUCER_ID => {
            decode::<m::InitProducerIdResponse>(&mut b, v).map(|r| top(r.error_code))
        }
        DESCRIBE_CLUSTER => {
            decode::<m::DescribeClusterResponse>(&mut b, v).map(|r| top(r.error_code))
        }
        GET_TELEMETRY_SUBSCRIPTIONS => {
            decode::<m::GetTelemetrySubscriptionsResponse>(&mut b, v).map(|r| top(r.error_code))
        }
        PUSH_TELEMETRY => decode::<m::PushTelemetryResponse>(&mut b, v).map(|r| top(r.error_code)),
        CONSUMER_GROUP_HEARTBEAT => {
            decode::<m::ConsumerGroupHeartbeatResponse>(&mut b, v).map(|r| top(r.error_code))
        }
        k::CREATE_TOPICS => decode::<m::CreateTopicsResponse>(&mut b, v).map(|r| Answer {
            error_code: 0,
            topics: r
                .topics
                .iter()
                .map(|t| topic(&t.name, &t.topic_id, vec![t.error_code]))
                .collect(),
        }),
        k::DELETE_TOPICS => decode::<m::DeleteTopicsResponse>(&mut b, v).map(|r| Answer {
            error_code: 0,
            topics: r
                .responses
                .iter()
                .map(|t| {
                    topic(
                        &t.name.clone().unwrap_or_default(),
                        &t.topic_id,
                        vec![t.error_code],
                    )
                })
                .collect(),
        }),
        _ => None,
    }
    .unwrap_or_default()
}

/// The broker's ApiVersions answer as the client gets it: each key capped
/// at the highest version the proxy reads and, for keys that later name
/// topics by ID only, at the last version naming them; keys the proxy does
/// not know are left out (clients then do without them). `None`: the
/// frame is passed on as it is (an error answer, or one that does not
/// decode).
pub fn cap_api_versions(api_version: i16, frame: &Bytes) -> Option<Bytes> {
    let mut b = frame.clone();
    // ApiVersions answers always carry header v0 (KIP-511).
    let header = m::ResponseHeader::decode(&mut b, 0).ok()?;
    let mut r = m::ApiVersionsResponse::decode(&mut b, api_version).ok()?;
    if r.error_code != 0 {
        return None;
    }
    r.api_keys = r
        .api_keys
        .into_iter()
        .filter_map(|mut a| {
            let ours = ApiKey::try_from(a.api_key).ok()?.valid_versions();
            a.min_version = a.min_version.max(ours.min);
            a.max_version = a.max_version.min(ours.max);
            if let Some(cap) = highest_version_naming_topics(a.api_key) {
                a.max_version = a.max_version.min(cap);
            }
            (a.min_version <= a.max_version).then_some(a)
        })
        .collect();
    let mut out = BytesMut::new();
    header.encode(&mut out, 0).ok()?;
    r.encode(&mut out, api_version).ok()?;
    Some(out.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kafka_protocol::messages::*;

    /// A request frame as a client writes it (without the length).
    fn request<T: Encodable>(key: ApiKey, version: i16, body: &T) -> Bytes {
        let mut out = BytesMut::new();
        RequestHeader::default()
            .with_request_api_key(key as i16)
            .with_request_api_version(version)
            .with_correlation_id(42)
            .with_client_id(Some(StrBytes::from_static_str("empire-hq")))
            .encode(&mut out, key.request_header_version(version))
            .unwrap();
        body.encode(&mut out, version).unwrap();
        out.freeze()
    }

    fn topic(n: &str) -> TopicName {
        TopicName(StrBytes::from_string(n.into()))
    }

    fn produce(topics: &[&str], acks: i16) -> ProduceRequest {
        ProduceRequest::default().with_acks(acks).with_topic_data(
            topics
                .iter()
                .map(|t| {
                    produce_request::TopicProduceData::default()
                        .with_name(topic(t))
                        .with_partition_data(vec![produce_request::PartitionProduceData::default()
                            .with_index(0)
                            .with_records(Some(Bytes::from_static(b"records")))])
                })
                .collect(),
        )
    }

    #[test]
    fn a_produce_request_names_its_topics_and_acks() {
        let ids = TopicIds::default();
        for version in [3, 9, 12] {
            let frame = request(
                ApiKey::Produce,
                version,
                &produce(&["deathstar-plans", "empire-announce"], 1),
            );
            let r = parse_request(frame, &ids).unwrap();
            assert_eq!(
                (r.api_key, r.api_version, r.correlation_id),
                (0, version, 42)
            );
            assert_eq!(r.client_id, "empire-hq");
            assert_eq!(
                r.topics.as_deref(),
                Some(&["deathstar-plans".to_string(), "empire-announce".to_string()][..])
            );
            assert!(r.expects_response);
        }
        let r = parse_request(request(ApiKey::Produce, 9, &produce(&["x"], 0)), &ids).unwrap();
        assert!(!r.expects_response);
    }

    #[test]
    fn topic_ids_are_known_once_metadata_named_them() {
        let ids = TopicIds::default();
        let id = Uuid::from_u128(7);
        let fetch = FetchRequest::default().with_topics(vec![fetch_request::FetchTopic::default()
            .with_topic_id(id)
            .with_partitions(vec![fetch_request::FetchPartition::default()])]);
        let r = parse_request(request(ApiKey::Fetch, 13, &fetch), &ids).unwrap();
        assert_eq!(r.topics, None, "an unknown ID makes the topics unknown");
        ids.learn(&[metadata_response::MetadataResponseTopic::default()
            .with_name(Some(topic("empire-announce")))
            .with_topic_id(id)]);
        let r = parse_request(request(ApiKey::Fetch, 13, &fetch), &ids).unwrap();
        assert_eq!(r.topics, Some(vec!["empire-announce".to_string()]));
    }

    #[test]
    fn garbage_is_an_error_or_unreadable_never_a_panic() {
        let ids = TopicIds::default();
        assert!(parse_request(Bytes::from_static(b"\x00\x00"), &ids).is_err());
        // A produce header with a body cut short.
        let mut f = request(ApiKey::Produce, 9, &produce(&["t"], 1)).to_vec();
        f.truncate(f.len() - 5);
        let r = parse_request(Bytes::from(f), &ids).unwrap();
        assert!(matches!(r.body, Body::Unreadable));
        assert_eq!(r.topics, None);
        // An unknown key still has a header.
        let mut f = vec![0x7f, 0x00, 0, 1, 0, 0, 0, 9, 0, 2, b'i', b'd'];
        f.extend_from_slice(b"whatever");
        let r = parse_request(Bytes::from(f), &ids).unwrap();
        assert_eq!(
            (r.api_key, r.correlation_id, r.client_id.as_str()),
            (0x7f00, 9, "id")
        );
        for n in 0..64u8 {
            let junk: Vec<u8> = (0..n).map(|i| i.wrapping_mul(37).wrapping_add(n)).collect();
            let _ = parse_request(Bytes::from(junk), &ids);
        }
    }

    #[test]
    fn a_refused_produce_gets_topic_authorization_failed_per_partition() {
        let ids = TopicIds::default();
        for version in [3, 9, 12] {
            let req = parse_request(
                request(ApiKey::Produce, version, &produce(&["rebel-plans"], 1)),
                &ids,
            )
            .unwrap();
            let whole = refusal(&req).unwrap();
            let len = i32::from_be_bytes(whole[..4].try_into().unwrap()) as usize;
            assert_eq!(len, whole.len() - 4);
            let mut b = whole.slice(4..);
            let h =
                ResponseHeader::decode(&mut b, ApiKey::Produce.response_header_version(version))
                    .unwrap();
            assert_eq!(h.correlation_id, 42);
            let r = ProduceResponse::decode(&mut b, version).unwrap();
            assert_eq!(r.responses[0].name.0.as_str(), "rebel-plans");
            assert_eq!(
                r.responses[0].partition_responses[0].error_code,
                TOPIC_AUTHORIZATION_FAILED
            );
            // The flows read the same code back.
            let a = read_answer(0, version, &whole.slice(4..), &ids);
            assert_eq!(a.error_for("rebel-plans"), TOPIC_AUTHORIZATION_FAILED);
        }
    }

    #[test]
    fn refusals_decode_at_every_version_the_proxy_allows() {
        let ids = TopicIds::default();
        let check = |key: ApiKey,
                     versions: std::ops::RangeInclusive<i16>,
                     make: &dyn Fn(i16) -> Bytes| {
            for v in versions {
                let req = parse_request(make(v), &ids).unwrap();
                let whole = refusal(&req).unwrap_or_else(|| panic!("{key:?} v{v} has a refusal"));
                let a = read_answer(key as i16, v, &whole.slice(4..), &ids);
                let code = a.topics.first().map_or(a.error_code, |t| t.1);
                assert_eq!(code, refusal_code(&req), "{key:?} v{v}");
            }
        };
        let fetch = FetchRequest::default().with_topics(vec![fetch_request::FetchTopic::default()
            .with_topic(topic("t"))
            .with_partitions(vec![fetch_request::FetchPartition::default()])]);
        check(ApiKey::Fetch, 4..=12, &|v| {
            request(ApiKey::Fetch, v, &fetch)
        });
        let list = ListOffsetsRequest::default().with_topics(vec![
            list_offsets_request::ListOffsetsTopic::default()
                .with_name(topic("t"))
                .with_partitions(vec![list_offsets_request::ListOffsetsPartition::default()]),
        ]);
        check(ApiKey::ListOffsets, 1..=10, &|v| {
            request(ApiKey::ListOffsets, v, &list)
        });
        let meta = MetadataRequest::default().with_topics(Some(vec![
            metadata_request::MetadataRequestTopic::default().with_name(Some(topic("t"))),
        ]));
        check(ApiKey::Metadata, 0..=12, &|v| {
            request(ApiKey::Metadata, v, &meta)
        });
        let commit = OffsetCommitRequest::default().with_topics(vec![
            offset_commit_request::OffsetCommitRequestTopic::default()
                .with_name(topic("t"))
                .with_partitions(vec![
                    offset_commit_request::OffsetCommitRequestPartition::default(),
                ]),
        ]);
        check(ApiKey::OffsetCommit, 2..=9, &|v| {
            request(ApiKey::OffsetCommit, v, &commit)
        });
        check(ApiKey::OffsetFetch, 1..=9, &|v| {
            let r = if v < 8 {
                OffsetFetchRequest::default().with_topics(Some(vec![
                    offset_fetch_request::OffsetFetchRequestTopic::default()
                        .with_name(topic("t"))
                        .with_partition_indexes(vec![0]),
                ]))
            } else {
                OffsetFetchRequest::default().with_groups(vec![
                    offset_fetch_request::OffsetFetchRequestGroup::default().with_topics(Some(
                        vec![offset_fetch_request::OffsetFetchRequestTopics::default()
                            .with_name(topic("t"))
                            .with_partition_indexes(vec![0])],
                    )),
                ])
            };
            request(ApiKey::OffsetFetch, v, &r)
        });
        check(ApiKey::FindCoordinator, 0..=6, &|v| {
            let g = StrBytes::from_static_str("g");
            let r = if v >= 4 {
                FindCoordinatorRequest::default().with_coordinator_keys(vec![g])
            } else {
                FindCoordinatorRequest::default().with_key(g)
            };
            request(ApiKey::FindCoordinator, v, &r)
        });
        check(ApiKey::JoinGroup, 0..=9, &|v| {
            request(ApiKey::JoinGroup, v, &JoinGroupRequest::default())
        });
        check(ApiKey::Heartbeat, 0..=4, &|v| {
            request(ApiKey::Heartbeat, v, &HeartbeatRequest::default())
        });
        check(ApiKey::SyncGroup, 0..=5, &|v| {
            request(ApiKey::SyncGroup, v, &SyncGroupRequest::default())
        });
        check(ApiKey::LeaveGroup, 0..=2, &|v| {
            request(ApiKey::LeaveGroup, v, &LeaveGroupRequest::default())
        });
        check(ApiKey::InitProducerId, 0..=5, &|v| {
            request(ApiKey::InitProducerId, v, &InitProducerIdRequest::default())
        });
        check(ApiKey::ApiVersions, 0..=4, &|v| {
            request(ApiKey::ApiVersions, v, &ApiVersionsRequest::default())
        });
        check(ApiKey::GetTelemetrySubscriptions, 0..=0, &|v| {
            request(
                ApiKey::GetTelemetrySubscriptions,
                v,
                &GetTelemetrySubscriptionsRequest::default(),
            )
        });
        check(ApiKey::PushTelemetry, 0..=0, &|v| {
            request(ApiKey::PushTelemetry, v, &PushTelemetryRequest::default())
        });
        check(ApiKey::ConsumerGroupHeartbeat, 0..=1, &|v| {
            request(
                ApiKey::ConsumerGroupHeartbeat,
                v,
                &ConsumerGroupHeartbeatRequest::default(),
            )
        });
        check(ApiKey::DescribeCluster, 0..=1, &|v| {
            request(
                ApiKey::DescribeCluster,
                v,
                &DescribeClusterRequest::default(),
            )
        });
    }

    #[test]
    fn a_refused_metadata_request_asks_for_no_topics_and_marks_the_refused_ones() {
        let ids = TopicIds::default();
        let meta = MetadataRequest::default()
            .with_allow_auto_topic_creation(true)
            .with_topics(Some(vec![metadata_request::MetadataRequestTopic::default(
            )
            .with_name(Some(topic("deathstar-plans")))]));
        for v in [1, 4, 9, 12] {
            let req = parse_request(request(ApiKey::Metadata, v, &meta), &ids).unwrap();
            let sent = parse_request(metadata_without_topics(&req).unwrap(), &ids).unwrap();
            assert_eq!(
                (sent.correlation_id, sent.client_id.as_str()),
                (42, "empire-hq")
            );
            let Body::Metadata(r) = &sent.body else {
                panic!()
            };
            assert_eq!(r.topics, Some(vec![]), "v{v}");
            assert!(v < 4 || !r.allow_auto_topic_creation, "v{v}");
            // The broker's answer keeps its brokers and gains the topic.
            let mut f = BytesMut::new();
            ResponseHeader::default()
                .with_correlation_id(42)
                .encode(&mut f, ApiKey::Metadata.response_header_version(v))
                .unwrap();
            MetadataResponse::default()
                .with_brokers(vec![metadata_response::MetadataResponseBroker::default()
                    .with_node_id(BrokerId(1))
                    .with_host(StrBytes::from_static_str("10.0.0.2"))
                    .with_port(9092)])
                .encode(&mut f, v)
                .unwrap();
            let marked =
                mark_refused_topics(v, &f.freeze(), &["deathstar-plans".into()], 29).unwrap();
            let mut b = marked.clone();
            ResponseHeader::decode(&mut b, ApiKey::Metadata.response_header_version(v)).unwrap();
            let r = MetadataResponse::decode(&mut b, v).unwrap();
            assert_eq!(r.brokers.len(), 1);
            assert_eq!(r.topics[0].error_code, 29);
            let a = read_answer(3, v, &marked, &ids);
            assert_eq!(a.error_for("deathstar-plans"), 29);
        }
        let v0 = parse_request(
            request(
                ApiKey::Metadata,
                0,
                &MetadataRequest::default().with_topics(Some(vec![])),
            ),
            &ids,
        )
        .unwrap();
        assert!(
            metadata_without_topics(&v0).is_none(),
            "v0: no topics means all"
        );
    }

    #[test]
    fn api_versions_are_capped_where_topics_turn_into_ids() {
        let broker = ApiVersionsResponse::default().with_api_keys(vec![
            api_versions_response::ApiVersion::default()
                .with_api_key(0)
                .with_min_version(3)
                .with_max_version(13),
            api_versions_response::ApiVersion::default()
                .with_api_key(1)
                .with_min_version(4)
                .with_max_version(18),
            api_versions_response::ApiVersion::default()
                .with_api_key(3)
                .with_min_version(0)
                .with_max_version(13),
            api_versions_response::ApiVersion::default()
                .with_api_key(9999)
                .with_min_version(0)
                .with_max_version(1),
        ]);
        let mut f = BytesMut::new();
        ResponseHeader::default()
            .with_correlation_id(5)
            .encode(&mut f, 0)
            .unwrap();
        broker.encode(&mut f, 3).unwrap();
        let capped = cap_api_versions(3, &f.freeze()).unwrap();
        let mut b = capped.clone();
        assert_eq!(ResponseHeader::decode(&mut b, 0).unwrap().correlation_id, 5);
        let r = ApiVersionsResponse::decode(&mut b, 3).unwrap();
        let max: Vec<(i16, i16)> = r
            .api_keys
            .iter()
            .map(|a| (a.api_key, a.max_version))
            .collect();
        assert_eq!(max, vec![(0, 12), (1, 12), (3, 13)]);
    }
}
