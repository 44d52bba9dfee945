//! The Kafka proxy: a connection that `kafka` rules cover is read request
//! by request (Kafka's frames: a length, then the request); each is checked
//! against every side's rules, forwarded to the broker as it came or
//! answered by the proxy with Kafka's authorization error (Cilium's
//! TOPIC_AUTHORIZATION_FAILED for topic requests) on a connection that
//! stays usable. Kafka answers in request order on a connection, so the
//! proxy's own answers wait their turn behind forwarded requests in one
//! queue. Every request and every answer is an L7 flow (`l7.kafka`), one
//! per topic the request names.
//!
//! A refused Metadata request is the one exception to answering locally:
//! the broker is asked the same about no topics, and its answer (brokers,
//! cluster) comes back with the refused topics marked, as Kafka's own
//! authorizer answers; a client ignores metadata without brokers.
//!
//! The broker's ApiVersions answer is capped where later versions name
//! topics by ID only (Fetch and Produce above 12, ...), so the rules see
//! topic names; a request naming an ID anyway is read with the IDs the
//! broker's metadata answers named, and one the proxy cannot read passes
//! only rules without a topic.

pub mod rules;
pub mod wire;

use std::net::SocketAddrV4;
use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use flow::enums::{L7FlowType, Verdict};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::{Connection, Policy, Stats};

/// Requests forwarded or refused whose answers have not gone back yet;
/// beyond, the proxy stops reading the client (Kafka clients keep five in
/// flight by default).
const IN_FLIGHT: usize = 1024;

/// Frames up to this size go out in one write with their length.
const COALESCE: usize = 64 * 1024;

/// One Kafka client connection and what decides it.
pub(crate) struct KafkaConn {
    client: SocketAddrV4,
    dst: SocketAddrV4,
    conn: Connection,
    /// The flows' direction (`Connection::ingress`).
    ingress: bool,
    /// Attribution of forwarded requests (`Connection::allowed_by`).
    allowed_by: Arc<[(bool, flow::record::SharedPolicyRef)]>,
    policy: Arc<dyn Policy>,
    config: Arc<crate::http::Config>,
    stats: Arc<Stats>,
    topic_ids: Arc<wire::TopicIds>,
}

/// What the client gets next, in request order.
enum Turn {
    /// A forwarded request: the broker's answer comes next on the upstream
    /// connection.
    Broker {
        api_key: i16,
        api_version: i16,
        correlation_id: i32,
        topics: Vec<String>,
        started: Instant,
        /// A refused Metadata request asked without its topics: the
        /// answer gets them back, refused with this code.
        refused: Option<i16>,
    },
    /// A refused request's answer, made by the proxy.
    Refusal(Bytes),
}

/// Reads one frame: `None` at a clean end of stream.
async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Option<Bytes>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let n = usize::try_from(i32::from_be_bytes(len))
        .ok()
        .filter(|n| *n <= wire::MAX_FRAME)
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("a Kafka frame of {} bytes", i32::from_be_bytes(len)),
            )
        })?;
    let mut buf = BytesMut::zeroed(n);
    r.read_exact(&mut buf).await?;
    Ok(Some(buf.freeze()))
}

/// Writes a frame with its length.
async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, frame: &[u8]) -> std::io::Result<()> {
    let len = u32::try_from(frame.len())
        .map_err(std::io::Error::other)?
        .to_be_bytes();
    if frame.len() <= COALESCE {
        let mut b = Vec::with_capacity(4 + frame.len());
        b.extend_from_slice(&len);
        b.extend_from_slice(frame);
        w.write_all(&b).await
    } else {
        w.write_all(&len).await?;
        w.write_all(frame).await
    }
}

impl KafkaConn {
    pub(crate) fn new(
        client: SocketAddrV4,
        dst: SocketAddrV4,
        conn: Connection,
        policy: Arc<dyn Policy>,
        config: Arc<crate::http::Config>,
        stats: Arc<Stats>,
        topic_ids: Arc<wire::TopicIds>,
    ) -> Self {
        Self {
            client,
            dst,
            ingress: conn.ingress(),
            allowed_by: conn.allowed_by(),
            conn,
            policy,
            config,
            stats,
            topic_ids,
        }
    }

    /// Serves the connection until either end closes it.
    pub(crate) async fn serve(self: Arc<Self>, client: TcpStream) {
        let upstream = match crate::socket::dial(
            *self.client.ip(),
            self.dst,
            self.conn.transparent,
            self.config.from_mark,
            self.config.connect_timeout,
        )
        .await
        {
            Ok(s) => s,
            Err(e) => {
                tracing::debug!(error = %e, "kafka: connecting to the broker");
                self.stats.upstream_errors.inc();
                return;
            }
        };
        let _ = client.set_nodelay(true);
        let (client_read, client_write) = client.into_split();
        let (broker_read, broker_write) = upstream.into_split();
        let (turns, queue) = mpsc::channel(IN_FLIGHT);
        let requests = self.clone().requests(client_read, broker_write, turns);
        let answers = self.answers(broker_read, client_write, queue);
        tokio::pin!(requests, answers);
        tokio::select! {
            // The broker went away (or broke the protocol): the client's
            // side closes too, whatever it was sending.
            _ = &mut answers => {}
            // The client is done sending: what it is owed still goes back.
            _ = &mut requests => answers.await,
        }
    }

    async fn requests(
        self: Arc<Self>,
        client: tokio::net::tcp::OwnedReadHalf,
        mut broker: tokio::net::tcp::OwnedWriteHalf,
        turns: mpsc::Sender<Turn>,
    ) {
        let mut client = BufReader::with_capacity(64 * 1024, client);
        let sides = self.conn.kafka.as_deref().unwrap_or_default();
        loop {
            let frame = match read_frame(&mut client).await {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    tracing::debug!(client = %self.client, error = %e, "kafka: reading a request");
                    self.stats.malformed.inc();
                    break;
                }
            };
            let req = match wire::parse_request(frame.clone(), &self.topic_ids) {
                Ok(r) => r,
                Err(e) => {
                    tracing::debug!(client = %self.client, error = %e, "kafka: not a Kafka request");
                    self.stats.malformed.inc();
                    break;
                }
            };
            let view = req.view();
            let denied_by = sides.iter().find(|s| !s.rules.allows(&view));
            let topics = req.topics.clone().unwrap_or_default();
            match denied_by {
                None => {
                    self.stats.kafka_forwarded.inc();
                    self.report(
                        &req,
                        &topics,
                        Verdict::FORWARDED,
                        0,
                        self.allowed_by.clone(),
                    );
                    if req.expects_response {
                        let turn = Turn::Broker {
                            api_key: req.api_key,
                            api_version: req.api_version,
                            correlation_id: req.correlation_id,
                            topics,
                            started: Instant::now(),
                            refused: None,
                        };
                        if turns.send(turn).await.is_err() {
                            break;
                        }
                    }
                    if let Err(e) = write_frame(&mut broker, &frame).await {
                        tracing::debug!(dst = %self.dst, error = %e, "kafka: writing to the broker");
                        break;
                    }
                }
                Some(side) => {
                    self.stats.kafka_denied.inc();
                    let by: Arc<[_]> = Arc::new([(side.ingress, side.policy.clone())]);
                    let code = wire::refusal_code(&req);
                    self.report(&req, &topics, Verdict::DROPPED, code, by);
                    if !req.expects_response {
                        // acks=0: the client waits for nothing.
                        continue;
                    }
                    if let Some(asked) = wire::metadata_without_topics(&req) {
                        let turn = Turn::Broker {
                            api_key: req.api_key,
                            api_version: req.api_version,
                            correlation_id: req.correlation_id,
                            topics,
                            started: Instant::now(),
                            refused: Some(code),
                        };
                        if turns.send(turn).await.is_err()
                            || write_frame(&mut broker, &asked).await.is_err()
                        {
                            break;
                        }
                        continue;
                    }
                    // A request the proxy cannot answer closes the
                    // connection, as Cilium's proxy does.
                    let Some(answer) = wire::refusal(&req) else {
                        tracing::debug!(
                            client = %self.client,
                            api_key = req.api_key,
                            "kafka: a refused request the proxy has no answer for; closing"
                        );
                        break;
                    };
                    if turns.send(Turn::Refusal(answer)).await.is_err() {
                        break;
                    }
                }
            }
        }
        let _ = broker.shutdown().await;
    }

    async fn answers(
        &self,
        broker: tokio::net::tcp::OwnedReadHalf,
        mut client: tokio::net::tcp::OwnedWriteHalf,
        mut queue: mpsc::Receiver<Turn>,
    ) {
        let mut broker = BufReader::with_capacity(64 * 1024, broker);
        while let Some(turn) = queue.recv().await {
            let written = match turn {
                Turn::Refusal(answer) => client.write_all(&answer).await,
                Turn::Broker {
                    api_key,
                    api_version,
                    correlation_id,
                    topics,
                    started,
                    refused,
                } => {
                    let frame = match read_frame(&mut broker).await {
                        Ok(Some(f)) => f,
                        Ok(None) => break,
                        Err(e) => {
                            tracing::debug!(dst = %self.dst, error = %e, "kafka: reading an answer");
                            self.stats.upstream_errors.inc();
                            break;
                        }
                    };
                    if wire::response_correlation_id(&frame) != Some(correlation_id) {
                        tracing::debug!(dst = %self.dst, "kafka: an answer out of turn; closing");
                        self.stats.unsolicited.inc();
                        break;
                    }
                    if let Some(code) = refused {
                        // The refusal's flow went out with the request.
                        let Some(frame) =
                            wire::mark_refused_topics(api_version, &frame, &topics, code)
                        else {
                            break;
                        };
                        if let Err(e) = write_frame(&mut client, &frame).await {
                            tracing::debug!(client = %self.client, error = %e, "kafka: writing to the client");
                            break;
                        }
                        continue;
                    }
                    let frame = if api_key == rules::API_VERSIONS {
                        wire::cap_api_versions(api_version, &frame).unwrap_or(frame)
                    } else {
                        frame
                    };
                    let answer = wire::read_answer(api_key, api_version, &frame, &self.topic_ids);
                    let latency = started.elapsed().as_nanos() as u64;
                    for topic in one_or_each(&topics) {
                        self.record(
                            true,
                            Verdict::FORWARDED,
                            latency,
                            flow::record::Kafka {
                                error_code: answer.error_for(topic).into(),
                                api_version: api_version.into(),
                                api_key: rules::api_key_name(api_key),
                                correlation_id,
                                topic: topic.to_string(),
                            },
                            self.allowed_by.clone(),
                        );
                    }
                    write_frame(&mut client, &frame).await
                }
            };
            if let Err(e) = written {
                tracing::debug!(client = %self.client, error = %e, "kafka: writing to the client");
                break;
            }
        }
        let _ = client.shutdown().await;
    }

    /// A request's flows (one per topic).
    fn report(
        &self,
        req: &wire::Request,
        topics: &[String],
        verdict: Verdict,
        error_code: i16,
        by: Arc<[(bool, flow::record::SharedPolicyRef)]>,
    ) {
        for topic in one_or_each(topics) {
            self.record(
                false,
                verdict,
                0,
                flow::record::Kafka {
                    error_code: error_code.into(),
                    api_version: req.api_version.into(),
                    api_key: rules::api_key_name(req.api_key),
                    correlation_id: req.correlation_id,
                    topic: topic.to_string(),
                },
                by.clone(),
            );
        }
    }

    fn record(
        &self,
        is_reply: bool,
        verdict: Verdict,
        latency_ns: u64,
        kafka: flow::record::Kafka,
        by: Arc<[(bool, flow::record::SharedPolicyRef)]>,
    ) {
        self.policy.record(flow::record::L7Record {
            unix_ns: crate::http::now_ns(),
            client: self.client,
            server: self.dst,
            client_identity: self.conn.client_identity,
            server_identity: self.conn.server_identity,
            is_reply,
            verdict,
            ingress: self.ingress,
            l7: flow::record::Layer7 {
                r#type: if is_reply {
                    L7FlowType::RESPONSE
                } else {
                    L7FlowType::REQUEST
                },
                latency_ns,
                dns: None,
                http: None,
                kafka: Some(kafka),
            },
            decided_by: by,
            protocol: 6,
        });
    }
}

/// Each topic, or one empty name for a request without topics.
fn one_or_each(topics: &[String]) -> impl Iterator<Item = &str> {
    let none = topics.is_empty().then_some("");
    topics.iter().map(String::as_str).chain(none)
}
