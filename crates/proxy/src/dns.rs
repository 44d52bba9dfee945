//! The DNS proxy: pods whose egress policy has `dns` rules send their
//! queries here (the datapath assigns UDP datagrams and TCP connections to
//! port 53 to these sockets; the original destination is the pod's
//! resolver). A query whose name no rule allows is answered REFUSED; the
//! rest go to the resolver, and the answer's addresses are learned (and
//! turned into policy) before the answer is released to the pod.

use flow::enums::{L7FlowType, Verdict};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, ResponseCode};
use hickory_proto::rr::RData;
use hickory_proto::serialize::binary::BinEncodable;
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{Policy, Stats};

/// How long the resolver has to answer.
const UPSTREAM_TIMEOUT: Duration = Duration::from_secs(5);

/// What policy says about a pod's queries to one resolver.
#[derive(Clone, Debug)]
pub struct DnsConnection {
    pub client_identity: u32,
    pub server_identity: u32,
    /// `matchName`/`matchPattern` of the rule; empty: every name.
    pub selectors: Vec<policy::model::FqdnSelector>,
    pub policy: Option<flow::record::SharedPolicyRef>,
    /// The resolver is a pod on this node: query from the client's address.
    pub transparent: bool,
}

/// The DNS proxy's sockets on 127.0.0.1:`port` (0: any free port), UDP and
/// TCP on the same port number.
pub fn listen(port: u16) -> std::io::Result<(std::net::UdpSocket, std::net::TcpListener)> {
    for _ in 0..16 {
        let udp = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
        udp.set_ip_transparent_v4(true)?;
        udp.bind(&SocketAddrV4::new(Ipv4Addr::LOCALHOST, port).into())?;
        nix::sys::socket::setsockopt(&udp, nix::sys::socket::sockopt::Ipv4OrigDstAddr, &true)
            .map_err(std::io::Error::from)?;
        let bound = udp
            .local_addr()?
            .as_socket()
            .map(|a| a.port())
            .unwrap_or(port);
        match crate::socket::listen(bound) {
            Ok(tcp) => return Ok((udp.into(), tcp)),
            // Someone holds that TCP port: try another number.
            Err(_) if port == 0 => continue,
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("no port free for both UDP and TCP"))
}

/// One datagram and where the pod sent it.
fn recv_with_destination(
    sock: &impl AsRawFd,
    buf: &mut [u8],
) -> std::io::Result<(usize, SocketAddrV4, SocketAddrV4)> {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, SockaddrIn};
    let mut iov = [std::io::IoSliceMut::new(buf)];
    let mut cmsg = nix::cmsg_space!(nix::libc::sockaddr_in);
    let msg = recvmsg::<SockaddrIn>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut cmsg),
        MsgFlags::empty(),
    )
    .map_err(std::io::Error::from)?;
    let client = msg
        .address
        .map(|a| SocketAddrV4::new(a.ip(), a.port()))
        .ok_or_else(|| std::io::Error::other("datagram without a source"))?;
    let mut dst = None;
    for c in msg.cmsgs().map_err(std::io::Error::from)? {
        if let ControlMessageOwned::Ipv4OrigDstAddr(a) = c {
            dst = Some(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr)),
                u16::from_be(a.sin_port),
            ));
        }
    }
    let dst = dst.ok_or_else(|| std::io::Error::other("datagram without its destination"))?;
    Ok((msg.bytes, client, dst))
}

/// Sockets bound (transparently) to resolvers' addresses, to answer pods
/// from the address they asked; a handful per node, kept.
#[derive(Default)]
struct ReplySockets(std::sync::Mutex<std::collections::HashMap<SocketAddrV4, Arc<Socket>>>);

impl ReplySockets {
    /// Sends `payload` to `client` from `from` (the resolver's address).
    fn send(
        &self,
        from: SocketAddrV4,
        client: SocketAddrV4,
        payload: &[u8],
    ) -> std::io::Result<()> {
        let sock = {
            let mut map = self.0.lock().unwrap_or_else(|e| e.into_inner());
            if map.len() > 256 {
                map.clear();
            }
            match map.get(&from) {
                Some(s) => s.clone(),
                None => {
                    let s = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
                    s.set_ip_transparent_v4(true)?;
                    s.set_reuse_address(true)?;
                    s.bind(&from.into())?;
                    let s = Arc::new(s);
                    map.insert(from, s.clone());
                    s
                }
            }
        };
        sock.send_to(payload, &client.into())?;
        Ok(())
    }
}

/// Serves DNS over UDP on the current (current-thread) runtime: the socket
/// is read and every query answered on the same thread, so a query costs
/// no hand-off between threads.
///
/// Until `drain.stop` is set: then the socket is closed (the datapath sends
/// new queries straight to the resolvers); the function returns once the
/// queries in flight, counted in `drain.in_flight`, are answered.
pub async fn serve_udp(
    sock: std::net::UdpSocket,
    policy: Arc<dyn Policy>,
    from_mark: u32,
    stats: Arc<Stats>,
    drain: Arc<Drain>,
) -> std::io::Result<()> {
    sock.set_nonblocking(true)?;
    let sock = tokio::net::UdpSocket::from_std(sock)?;
    let mut buf = vec![0u8; 65_535];
    let replies = Arc::new(ReplySockets::default());
    while !drain.stop.load(Ordering::Relaxed) {
        // Wake up now and then to notice `stop`.
        let Ok(ready) = tokio::time::timeout(Duration::from_millis(50), sock.readable()).await
        else {
            continue;
        };
        ready?;
        let received = sock.try_io(tokio::io::Interest::READABLE, || {
            recv_with_destination(&sock, &mut buf)
        });
        let (n, client, dst) = match received {
            Ok(x) => x,
            // Read everything there was: wait for more.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                tracing::debug!(error = %e, "dns proxy recv");
                continue;
            }
        };
        let query = buf[..n].to_vec();
        let (policy, stats, drain, replies) = (
            policy.clone(),
            stats.clone(),
            drain.clone(),
            replies.clone(),
        );
        drain.in_flight.fetch_add(1, Ordering::SeqCst);
        tokio::spawn(async move {
            if let Some(answer) =
                answer(&query, client, dst, false, &policy, from_mark, &stats).await
            {
                if let Err(e) = replies.send(dst, client, &answer) {
                    tracing::debug!(error = %e, %client, "dns proxy reply");
                }
            }
            drain.in_flight.fetch_sub(1, Ordering::SeqCst);
        });
    }
    drop(sock);
    drain.closed.store(true, Ordering::SeqCst);
    // The queries in flight run on this runtime: keep it going for them.
    while drain.in_flight.load(Ordering::SeqCst) > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// A graceful stop of the UDP DNS proxy (the agent restarting): close the
/// socket, then let the queries in flight finish.
#[derive(Debug, Default)]
pub struct Drain {
    pub stop: AtomicBool,
    pub closed: AtomicBool,
    pub in_flight: AtomicUsize,
}

impl Drain {
    /// Stops taking queries and waits (up to `limit`) for those in flight.
    pub fn run(&self, limit: Duration) {
        self.stop.store(true, Ordering::SeqCst);
        let end = Instant::now() + limit;
        while Instant::now() < end
            && (!self.closed.load(Ordering::SeqCst) || self.in_flight.load(Ordering::SeqCst) > 0)
        {
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Serves DNS over TCP (length-prefixed messages, several per connection).
pub async fn serve_tcp(
    listener: std::net::TcpListener,
    policy: Arc<dyn Policy>,
    from_mark: u32,
    stats: Arc<Stats>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    loop {
        let (mut stream, client, dst) = crate::socket::accept(&listener).await;
        let (policy, stats) = (policy.clone(), stats.clone());
        tokio::spawn(async move {
            loop {
                let Ok(len) = stream.read_u16().await else {
                    return;
                };
                let mut query = vec![0u8; len as usize];
                if stream.read_exact(&mut query).await.is_err() {
                    return;
                }
                let Some(answer) =
                    answer(&query, client, dst, true, &policy, from_mark, &stats).await
                else {
                    return;
                };
                let Ok(len) = u16::try_from(answer.len()) else {
                    return;
                };
                if stream.write_u16(len).await.is_err() || stream.write_all(&answer).await.is_err()
                {
                    return;
                }
            }
        });
    }
}

/// The proxy's own answer to `query`: REFUSED (the rules say no) or
/// FORMERR (not one question).
fn refusal(query: &Message, code: ResponseCode) -> Option<Vec<u8>> {
    let mut r = Message::new();
    r.set_id(query.id())
        .set_message_type(MessageType::Response)
        .set_op_code(query.op_code())
        .set_recursion_desired(query.recursion_desired())
        .set_recursion_available(true)
        .set_response_code(code);
    r.add_queries(query.queries().to_vec());
    r.to_bytes().ok()
}

/// A query name as the rules see it (lower case, trailing dot), when every
/// label is a plain hostname label (letters, digits, '-', '_'). A label
/// holding a dot, a backslash or any other byte would make the name's text
/// say something else than its labels (`allowed\.example` is one label,
/// which a pattern must not read as two): such names are refused.
pub fn plain_name(name: &hickory_proto::rr::Name) -> Option<String> {
    let mut out = String::new();
    for label in name.iter() {
        if label.is_empty()
            || !label
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || *b == b'-' || *b == b'_')
        {
            return None;
        }
        out.push_str(std::str::from_utf8(label).ok()?);
        out.push('.');
    }
    if out.is_empty() {
        out.push('.');
    }
    Some(out.to_ascii_lowercase())
}

/// The A records of `answer` that belong to `qname`: those whose owner is
/// `qname` or a name its CNAME chain leads to (in any order, as resolvers
/// send them). Records about other names (a hostile resolver's extras) are
/// never learned for `qname`. Also returns the chain's names.
pub fn chain_addresses(qname: &str, answer: &Message) -> (Vec<(Ipv4Addr, u32)>, Vec<String>) {
    let owner = |r: &hickory_proto::rr::Record| policy::model::fqdn(&r.name().to_ascii());
    let mut chain = vec![qname.to_string()];
    // Each pass adds at least one name or stops: bounded by the answers.
    for _ in 0..answer.answers().len() {
        let before = chain.len();
        for r in answer.answers() {
            if let RData::CNAME(c) = r.data() {
                let target = policy::model::fqdn(&c.0.to_ascii());
                if chain.contains(&owner(r)) && !chain.contains(&target) {
                    chain.push(target);
                }
            }
        }
        if chain.len() == before {
            break;
        }
    }
    let addresses = answer
        .answers()
        .iter()
        .filter(|r| chain.contains(&owner(r)))
        .filter_map(|r| match r.data() {
            RData::A(a) => Some((a.0, r.ttl())),
            _ => None,
        })
        .collect();
    (addresses, chain)
}

/// The answer for one query (None: drop it).
async fn answer(
    bytes: &[u8],
    client: SocketAddrV4,
    dst: SocketAddrV4,
    tcp: bool,
    policy: &Arc<dyn Policy>,
    from_mark: u32,
    stats: &Stats,
) -> Option<Vec<u8>> {
    let started = Instant::now();
    let query = match Message::from_vec(bytes) {
        Ok(m) if m.message_type() == MessageType::Query && !m.queries().is_empty() => m,
        _ => {
            stats.dns_malformed.inc();
            return None;
        }
    };
    let Some(conn) = policy.dns(client, dst, tcp) else {
        stats.connections_refused.inc();
        return None;
    };
    // One question per query, as resolvers in practice accept: with
    // several, one name's answer could be learned for another.
    if query.queries().len() != 1 {
        stats.dns_malformed.inc();
        return refusal(&query, ResponseCode::FormErr);
    }
    let question = &query.queries()[0];
    let plain = plain_name(question.name());
    let names: Vec<String> = vec![plain
        .clone()
        .unwrap_or_else(|| policy::model::fqdn(&question.name().to_ascii()))];
    let qtypes: Vec<String> = query
        .queries()
        .iter()
        .map(|q| q.query_type().to_string())
        .collect();
    let flow = |is_reply: bool, verdict: Verdict, dns: flow::record::Dns, latency: u64| {
        flow::record::L7Record {
            unix_ns: crate::http::now_ns(),
            client,
            server: dst,
            client_identity: conn.client_identity,
            server_identity: conn.server_identity,
            is_reply,
            verdict,
            ingress: false,
            l7: flow::record::Layer7 {
                r#type: if is_reply {
                    L7FlowType::RESPONSE
                } else {
                    L7FlowType::REQUEST
                },
                latency_ns: latency,
                dns: Some(dns),
                http: None,
                kafka: None,
            },
            decided_by: conn.policy.iter().map(|p| (false, p.clone())).collect(),
            protocol: if tcp { 6 } else { 17 },
        }
    };
    let request = flow::record::Dns {
        query: names.join(","),
        observation_source: "proxy".into(),
        qtypes: qtypes.clone(),
        ..Default::default()
    };
    // Every name of the query must be allowed (search domains expand into
    // several queries, each checked on its own).
    let allowed = conn.selectors.is_empty()
        || (plain.is_some()
            && names
                .iter()
                .all(|n| conn.selectors.iter().any(|s| s.matches(n))));
    if !allowed {
        stats.dns_refused.inc();
        policy.record(flow(false, Verdict::DROPPED, request, 0));
        return refusal(&query, ResponseCode::Refused);
    }
    stats.dns_forwarded.inc();
    policy.record(flow(false, Verdict::FORWARDED, request, 0));

    let reply = match forward(bytes, client, dst, tcp, conn.transparent, from_mark).await {
        Ok(r) => r,
        Err(e) => {
            stats.upstream_errors.inc();
            tracing::debug!(error = %e, resolver = %dst, "dns upstream");
            return None;
        }
    };
    // The answer must be to the question asked (same id, name and type);
    // anything else is dropped, never learned.
    let answers_question = |msg: &Message| {
        msg.id() == query.id()
            && msg.queries().len() == 1
            && msg.queries()[0].query_type() == question.query_type()
            && policy::model::fqdn(&msg.queries()[0].name().to_ascii()) == names[0]
    };
    let msg = match Message::from_vec(&reply) {
        Ok(m) if answers_question(&m) => m,
        _ => {
            stats.upstream_errors.inc();
            return None;
        }
    };
    // Learn before releasing the answer: the pod's first connection to an
    // address it just resolved must already be allowed. Only the addresses
    // of the queried name and its CNAME chain.
    let (learned, chain) = chain_addresses(&names[0], &msg);
    let mut ips: Vec<String> = learned.iter().map(|(a, _)| a.to_string()).collect();
    let cnames: Vec<String> = chain.into_iter().skip(1).collect();
    let mut rrtypes = Vec::new();
    let mut ttl = u32::MAX;
    for r in msg.answers() {
        rrtypes.push(r.record_type().to_string());
        ttl = ttl.min(r.ttl());
        if let RData::AAAA(a) = r.data() {
            ips.push(a.0.to_string());
        }
    }
    // A name whose labels are not plain is never learned (no selector may
    // read its text as other labels).
    if plain.is_some() && !learned.is_empty() && msg.response_code() == ResponseCode::NoError {
        // Addresses learned before only move their expiry, here. New ones
        // update the maps, which may take a while: off the proxy's thread,
        // and the answer waits for it.
        let new: Vec<String> = names
            .iter()
            .filter(|n| !policy.refresh_learned(*client.ip(), n, &learned))
            .cloned()
            .collect();
        if !new.is_empty() {
            let (p, learned) = (policy.clone(), learned.clone());
            let done = tokio::task::spawn_blocking(move || {
                for name in &new {
                    p.learned(*client.ip(), name, &learned);
                }
            });
            if done.await.is_err() {
                tracing::warn!("learning a DNS answer panicked");
            }
        }
    }
    let response = flow::record::Dns {
        query: names.join(","),
        ips,
        ttl: if ttl == u32::MAX { 0 } else { ttl },
        cnames,
        observation_source: "proxy".into(),
        rcode: u16::from(msg.response_code()) as u32,
        qtypes,
        rrtypes,
    };
    policy.record(flow(
        true,
        Verdict::FORWARDED,
        response,
        started.elapsed().as_nanos().max(1) as u64,
    ));
    Some(reply)
}

/// Sends the query to the resolver and returns its answer.
async fn forward(
    query: &[u8],
    client: SocketAddrV4,
    dst: SocketAddrV4,
    tcp: bool,
    transparent: bool,
    from_mark: u32,
) -> std::io::Result<Vec<u8>> {
    if tcp {
        let mut s = tokio::time::timeout(
            UPSTREAM_TIMEOUT,
            crate::socket::connect(*client.ip(), dst, transparent, from_mark),
        )
        .await
        .map_err(|_| std::io::Error::other("resolver connect timed out"))??;
        let len = u16::try_from(query.len()).map_err(std::io::Error::other)?;
        s.write_u16(len).await?;
        s.write_all(query).await?;
        let read = async {
            let n = s.read_u16().await?;
            let mut buf = vec![0u8; n as usize];
            s.read_exact(&mut buf).await?;
            Ok::<_, std::io::Error>(buf)
        };
        return tokio::time::timeout(UPSTREAM_TIMEOUT, read)
            .await
            .map_err(|_| std::io::Error::other("resolver timed out"))?;
    }
    let s = crate::socket::upstream(Type::DGRAM, *client.ip(), transparent, from_mark)?;
    let s = tokio::net::UdpSocket::from_std(s.into())?;
    s.connect(dst).await?;
    s.send(query).await?;
    let recv = async {
        loop {
            s.readable().await?;
            // Received into the thread's buffer, then copied at its size:
            // a zeroed 64 KiB buffer per query cost more than the copy.
            let answer = RECV_BUFFER.with_borrow_mut(|buf| match s.try_recv(buf) {
                Ok(n) => Ok(Some(buf[..n].to_vec())),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(None),
                Err(e) => Err(e),
            });
            if let Some(answer) = answer? {
                return Ok(answer);
            }
        }
    };
    tokio::time::timeout(UPSTREAM_TIMEOUT, recv)
        .await
        .map_err(|_| std::io::Error::other("resolver timed out"))?
}

thread_local! {
    /// Room for the largest UDP answer.
    static RECV_BUFFER: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; 65_535]);
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::{rdata, Name, Record};
    use std::str::FromStr;

    #[test]
    fn only_plain_labels_make_a_name() {
        let name = |s: &str| plain_name(&Name::from_str(s).unwrap());
        assert_eq!(name("Allowed.Example."), Some("allowed.example.".into()));
        assert_eq!(
            name("_srv._tcp.x-1.example"),
            Some("_srv._tcp.x-1.example.".into())
        );
        assert_eq!(name("allowed\\.example."), None, "one label holding a dot");
        // Labels as the wire carries them: any bytes.
        let raw = |labels: &[&[u8]]| {
            let labels: Vec<hickory_proto::rr::domain::Label> = labels
                .iter()
                .map(|l| hickory_proto::rr::domain::Label::from_raw_bytes(l).unwrap())
                .collect();
            plain_name(&Name::from_labels(labels).unwrap())
        };
        assert_eq!(raw(&[b"a\\b", b"example"]), None, "a backslash");
        assert_eq!(raw(&[b"a\0b", b"example"]), None, "a zero byte");
        assert_eq!(raw(&[b"*", b"example"]), None, "a star");
        assert_eq!(raw(&[b"ok", b"example"]), Some("ok.example.".into()));
    }

    #[test]
    fn only_the_chain_of_the_queried_name_is_learned() {
        let a = |owner: &str, ip: [u8; 4]| {
            Record::from_rdata(
                Name::from_str(owner).unwrap(),
                60,
                RData::A(rdata::A(ip.into())),
            )
        };
        let cname = |owner: &str, target: &str| {
            Record::from_rdata(
                Name::from_str(owner).unwrap(),
                60,
                RData::CNAME(rdata::CNAME(Name::from_str(target).unwrap())),
            )
        };
        let mut m = Message::new();
        // Out of order, with records about names nobody asked for.
        m.add_answer(a("target.example.", [10, 0, 0, 2]));
        m.add_answer(a("evil.test.", [10, 0, 0, 66]));
        m.add_answer(cname("mid.example.", "target.example."));
        m.add_answer(cname("alias.example.", "mid.example."));
        m.add_answer(cname("evil.test.", "alias.example."));
        m.add_answer(a("alias.example.", [10, 0, 0, 1]));
        let (learned, chain) = chain_addresses("alias.example.", &m);
        let ips: Vec<Ipv4Addr> = learned.iter().map(|(ip, _)| *ip).collect();
        assert_eq!(
            ips,
            [Ipv4Addr::new(10, 0, 0, 2), Ipv4Addr::new(10, 0, 0, 1)]
        );
        assert_eq!(chain, ["alias.example.", "mid.example.", "target.example."]);
        let (learned, _) = chain_addresses("other.example.", &m);
        assert!(learned.is_empty());
    }
}
