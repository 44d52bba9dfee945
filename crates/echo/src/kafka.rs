//! `fibril-echo kafka-broker`: the real Apache Kafka broker (one node in
//! KRaft mode, broker and controller in one process) from the jars
//! `cargo xtask deps` fetched, advertising this network namespace's own
//! address, so that a lab pod is a broker clients elsewhere in the lab
//! reach. The process becomes the broker's JVM (exec), so stopping the pod
//! stops the broker.

use std::net::{Ipv4Addr, UdpSocket};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context};

/// This namespace's address towards the rest of the lab: the source the
/// kernel picks for a route out (a UDP "connect" sends nothing).
fn own_address() -> anyhow::Result<Ipv4Addr> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    // TEST-NET-1: never reached, only routed.
    s.connect("192.0.2.1:9")
        .context("no route out of this namespace to advertise an address on")?;
    match s.local_addr()?.ip() {
        std::net::IpAddr::V4(a) if !a.is_loopback() => Ok(a),
        other => bail!("this namespace's address is {other}, not one clients can reach"),
    }
}

/// A KRaft cluster ID: 16 random bytes in URL-safe base64 without padding
/// (what `kafka-storage random-uuid` prints).
fn cluster_id() -> anyhow::Result<String> {
    let mut bytes = [0u8; 16];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut bytes)?;
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for b in bytes {
        acc = (acc << 8) | u32::from(b);
        bits += 8;
        while bits >= 6 {
            bits -= 6;
            out.push(ALPHABET[((acc >> bits) & 63) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((acc << (6 - bits)) & 63) as usize] as char);
    }
    Ok(out)
}

pub fn broker(lib: &Path, data: &Path, port: u16, heap_mb: u32) -> anyhow::Result<()> {
    if !lib.is_dir() {
        bail!(
            "{}: no Kafka jars there (cargo xtask deps fetches them)",
            lib.display()
        );
    }
    let address = own_address()?;
    std::fs::create_dir_all(data).with_context(|| format!("creating {}", data.display()))?;
    let log_dirs = data.join("log");
    let config = data.join("server.properties");
    let controller = port.checked_add(1).context("a port below 65535")?;
    std::fs::write(
        &config,
        format!(
            "process.roles=broker,controller\n\
             node.id=1\n\
             controller.quorum.voters=1@127.0.0.1:{controller}\n\
             listeners=PLAINTEXT://0.0.0.0:{port},CONTROLLER://127.0.0.1:{controller}\n\
             advertised.listeners=PLAINTEXT://{address}:{port}\n\
             controller.listener.names=CONTROLLER\n\
             listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT\n\
             inter.broker.listener.name=PLAINTEXT\n\
             log.dirs={}\n\
             num.partitions=1\n\
             offsets.topic.replication.factor=1\n\
             offsets.topic.num.partitions=1\n\
             transaction.state.log.replication.factor=1\n\
             transaction.state.log.min.isr=1\n\
             share.coordinator.state.topic.replication.factor=1\n\
             share.coordinator.state.topic.min.isr=1\n\
             group.initial.rebalance.delay.ms=0\n\
             auto.create.topics.enable=true\n",
            log_dirs.display()
        ),
    )?;
    let classpath = format!("{}/*", lib.display());
    if !log_dirs.join("meta.properties").exists() {
        let id = cluster_id()?;
        let out = Command::new("java")
            .args([
                "-cp",
                &classpath,
                "kafka.tools.StorageTool",
                "format",
                "-t",
                &id,
                "-c",
            ])
            .arg(&config)
            .output()
            .context("running java (Kafka needs Java 17 or later)")?;
        if !out.status.success() {
            bail!(
                "formatting the broker's storage: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    println!("kafka broker starting, advertised as {address}:{port}");
    let err = Command::new("java")
        .arg(format!("-Xmx{heap_mb}m"))
        .arg(format!("-Xms{}m", heap_mb.min(256)))
        .args([
            "-XX:+UseSerialGC",
            "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn",
            "-cp",
            &classpath,
            "kafka.Kafka",
        ])
        .arg(&config)
        .exec();
    Err(err).context("starting java")
}

/// `fibril-echo kafka-produce`: one record to each topic in turn, every
/// request on the same connection (ApiVersions first, then a Produce v9 per
/// topic, acks=1); prints `produce TOPIC error_code N` for each answer, so
/// a test sees a refused request and the next one's answer on the same
/// connection. Fails when the connection breaks.
pub fn produce(addr: &str, topics: &[String], timeout: f64) -> anyhow::Result<()> {
    use std::io::{Read, Write};

    use kafka_protocol::messages::{
        produce_request, ApiKey, ApiVersionsRequest, ProduceRequest, ProduceResponse,
        RequestHeader, ResponseHeader, TopicName,
    };
    use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};
    use kafka_protocol::records::{
        Compression, Record, RecordBatchEncoder, RecordEncodeOptions, TimestampType,
    };

    let mut s =
        std::net::TcpStream::connect(addr).with_context(|| format!("connecting to {addr}"))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs_f64(timeout)))?;
    s.set_nodelay(true)?;
    let mut correlation = 0;
    let mut call = |s: &mut std::net::TcpStream,
                    key: ApiKey,
                    version: i16,
                    body: &dyn Fn(&mut bytes::BytesMut) -> anyhow::Result<()>|
     -> anyhow::Result<bytes::Bytes> {
        correlation += 1;
        let mut frame = bytes::BytesMut::new();
        RequestHeader::default()
            .with_request_api_key(key as i16)
            .with_request_api_version(version)
            .with_correlation_id(correlation)
            .with_client_id(Some(StrBytes::from_static_str("fibril-echo")))
            .encode(&mut frame, key.request_header_version(version))?;
        body(&mut frame)?;
        let mut out = (frame.len() as u32).to_be_bytes().to_vec();
        out.extend_from_slice(&frame);
        s.write_all(&out)?;
        let mut len = [0u8; 4];
        s.read_exact(&mut len)
            .context("the connection closed before an answer")?;
        let mut answer = vec![0u8; u32::from_be_bytes(len) as usize];
        s.read_exact(&mut answer)?;
        let mut answer = bytes::Bytes::from(answer);
        let header = ResponseHeader::decode(&mut answer, key.response_header_version(version))?;
        if header.correlation_id != correlation {
            bail!(
                "an answer out of turn: {} for {correlation}",
                header.correlation_id
            );
        }
        Ok(answer)
    };
    call(&mut s, ApiKey::ApiVersions, 3, &|b| {
        ApiVersionsRequest::default()
            .with_client_software_name(StrBytes::from_static_str("fibril-echo"))
            .with_client_software_version(StrBytes::from_static_str("1"))
            .encode(b, 3)
    })?;
    for topic in topics {
        let record = Record {
            transactional: false,
            control: false,
            partition_leader_epoch: 0,
            producer_id: -1,
            producer_epoch: -1,
            timestamp_type: TimestampType::Creation,
            offset: 0,
            sequence: -1,
            timestamp: 0,
            key: None,
            value: Some(bytes::Bytes::from(format!("a record for {topic}"))),
            headers: Default::default(),
            delete_horizon: false,
        };
        let mut records = bytes::BytesMut::new();
        RecordBatchEncoder::encode(
            &mut records,
            [&record],
            &RecordEncodeOptions {
                version: 2,
                compression: Compression::None,
            },
        )?;
        let records = records.freeze();
        let request = ProduceRequest::default()
            .with_acks(1)
            .with_timeout_ms(5000)
            .with_topic_data(vec![produce_request::TopicProduceData::default()
                .with_name(TopicName(StrBytes::from_string(topic.clone())))
                .with_partition_data(vec![
                    produce_request::PartitionProduceData::default()
                        .with_index(0)
                        .with_records(Some(records.clone())),
                ])]);
        let mut answer = call(&mut s, ApiKey::Produce, 9, &|b| request.encode(b, 9))?;
        let r = ProduceResponse::decode(&mut answer, 9)?;
        let code = r
            .responses
            .first()
            .and_then(|t| t.partition_responses.first())
            .map_or(-1, |p| p.error_code);
        println!("produce {topic} error_code {code}");
    }
    Ok(())
}
