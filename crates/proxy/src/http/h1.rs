//! The direct HTTP/1.1 path. Most proxied requests are plain HTTP/1.1: a
//! head and at most a `Content-Length` body, answered by a head and a
//! `Content-Length` or chunked body. For those the proxy forwards the bytes
//! as they came (parsed with httparse, checked against the rules, never
//! re-encoded). On the lab's VM, everything on one CPU, a proxied request
//! costs 27.7 µs of CPU this way against 31.1 through hyper's server and
//! client connections (a relay doing no HTTP work at all: 23.0; direct:
//! 20.5). Anything else (HTTP/2, `Transfer-Encoding`
//! or `Expect` on a request, upgrades, absolute-form targets, header edits
//! by `headerMatches`, heads httparse does not accept) goes to the general
//! path (`Conn::serve_hyper`) with the bytes already read, between two
//! requests, so that hyper decides about and counts malformed input.

use flow::enums::Verdict;
use std::io;
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use hyper::http::{header, HeaderMap, HeaderName, HeaderValue};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::{flow_url, request_flows, Conn, DRAIN_LIMIT, MAX_HEADER_BYTES};
use crate::rules::RequestView;

/// Headers per head the direct path parses (more: the general path).
const MAX_HEADERS: usize = 64;

/// A keep-alive connection's header timeout and its request timeout are
/// one timer each for the connection's whole life (`rearm`), moved forward
/// only when more than `1/TIMER_SLACK` of the timeout behind: a request
/// gets between 7/8 of the timeout and all of it. A timer armed per request
/// cost a timer-wheel insert and, whenever the event loop had gone to sleep
/// with no timer pending (all its connections waiting on their servers), a
/// wake-up of the loop by itself: an eventfd write and one more
/// `epoll_wait`, for half the requests of the L7 bench.
const TIMER_SLACK: u32 = 8;

/// Gives a connection's `timer` (see `TIMER_SLACK`) at least 7/8 of
/// `timeout` from now.
fn rearm(timer: std::pin::Pin<&mut tokio::time::Sleep>, timeout: std::time::Duration) {
    let due = tokio::time::Instant::now() + timeout;
    if due > timer.deadline() + timeout / TIMER_SLACK {
        timer.reset(due);
    }
}

/// Room made for each read of a body.
const BODY_READ: usize = 64 * 1024;

/// How the direct path ended.
pub(super) enum End {
    /// The connection is done (closed by either side, or failed).
    Done,
    /// The general path takes the connection over, starting with `Bytes`.
    Fallback(TcpStream, Bytes),
}

/// What a request head says, when the direct path can take the request.
#[derive(Debug)]
struct RequestHead {
    /// Bytes of the head.
    len: usize,
    /// `Content-Length` (0 without one).
    body: u64,
    /// `Connection: close`.
    close: bool,
    /// HEAD: the response has no body, whatever its head says.
    head_method: bool,
    method: flow::record::Text,
    /// `http://{host}{path}` and where the host ends in it.
    url: String,
    host_end: usize,
    headers: HeaderMap,
}

#[derive(Debug)]
enum Parsed {
    /// The head is not complete yet.
    Partial,
    Request(RequestHead),
    /// For the general path.
    General,
    /// A request target no server may read otherwise than the rules: 400
    /// (what the flow reports: the raw target in the URL).
    BadTarget {
        method: flow::record::Text,
        url: String,
        headers: HeaderMap,
    },
}

/// How a response's body ends.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Framing {
    Length(u64),
    Chunked,
    /// At the server's end of the connection.
    Close,
}

struct ResponseHead {
    len: usize,
    code: u16,
    framing: Framing,
    close: bool,
}

/// What comes after a request on the direct path.
enum Next {
    Request,
    Close,
    /// The request needs the general path (nothing of it was sent).
    General,
}

/// The upstream connection and what was read from it.
struct Upstream {
    stream: TcpStream,
    buf: BytesMut,
}

fn parse_request(buf: &[u8], escaped_slashes: crate::rules::EscapedSlashes) -> Parsed {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut slots);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEADER_BYTES => return Parsed::Partial,
        _ => return Parsed::General,
    };
    let (Some(1), Some(method), Some(path)) = (req.version, req.method, req.path) else {
        return Parsed::General;
    };
    // The bytes go upstream as they came: only heads every parser reads
    // the same way (CRLF line ends; httparse also takes a bare LF, which
    // the general path rewrites).
    let bare_lf = buf[..len]
        .iter()
        .enumerate()
        .any(|(i, b)| *b == b'\n' && (i == 0 || buf[i - 1] != b'\r'));
    if bare_lf {
        return Parsed::General;
    }
    if method == "CONNECT" || !path.starts_with('/') {
        return Parsed::General;
    }
    // Only a canonical target goes byte for byte; the general path
    // rewrites any other to its canonical form (after the head is known
    // to be complete). One servers would read otherwise (a fragment, an
    // encoded slash) is refused here, whatever the rest of the head, where
    // the raw target is still seen (hyper's parser drops fragments).
    let rewrite = match crate::rules::canonical_target(path, escaped_slashes) {
        Ok(target) => matches!(target, std::borrow::Cow::Owned(_)),
        Err(_) => return bad_target(method, path, req.headers),
    };
    let mut headers = HeaderMap::with_capacity(req.headers.len());
    let (mut body, mut close, mut host) = (None, false, None);
    for h in req.headers.iter() {
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) else {
            return Parsed::General;
        };
        match name {
            header::TRANSFER_ENCODING | header::EXPECT | header::UPGRADE | header::TE => {
                return Parsed::General
            }
            header::CONTENT_LENGTH => match (body, content_length(h.value)) {
                (None, Some(n)) => body = Some(n),
                _ => return Parsed::General,
            },
            header::CONNECTION => {
                for token in h.value.split(|b| *b == b',').map(|t| t.trim_ascii()) {
                    if token.eq_ignore_ascii_case(b"close") {
                        close = true;
                    } else if token.eq_ignore_ascii_case(b"upgrade") {
                        return Parsed::General;
                    }
                }
            }
            header::HOST => match (host, value.to_str()) {
                (None, Ok(v)) if !v.is_empty() => host = Some(v.to_string()),
                _ => return Parsed::General,
            },
            _ => {}
        }
        headers.append(name, value);
    }
    let Some(host) = host else {
        return Parsed::General;
    };
    let (url, host_end) = flow_url(&host, path);
    if rewrite {
        return Parsed::General;
    }
    Parsed::Request(RequestHead {
        len,
        body: body.unwrap_or(0),
        close,
        head_method: method == "HEAD",
        method: flow::record::http_method(method),
        url,
        host_end,
        headers,
    })
}

/// A refused target's report: its method, URL (host from the first Host)
/// and the headers that are valid.
fn bad_target(method: &str, path: &str, fields: &[httparse::Header<'_>]) -> Parsed {
    let mut headers = HeaderMap::new();
    for h in fields {
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) {
            headers.append(name, value);
        }
    }
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let (url, _) = flow_url(host, path);
    Parsed::BadTarget {
        method: flow::record::http_method(method),
        url,
        headers,
    }
}

/// A `Content-Length` value: digits only, as RFC 9112 §6.3 wants it.
fn content_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || v.len() > 18 || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// A response head; `Err` for a head the proxy cannot frame (an error of
/// the server's: 502).
fn parse_response(buf: &[u8], head_method: bool) -> Result<Option<ResponseHead>, ()> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut slots);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEADER_BYTES => return Ok(None),
        _ => return Err(()),
    };
    let code = resp.code.ok_or(())?;
    let (mut length, mut chunked, mut transfer_encoding, mut close) = (None, false, false, false);
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("content-length") {
            let n = content_length(h.value).ok_or(())?;
            if length.is_some_and(|l| l != n) {
                return Err(());
            }
            length = Some(n);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            // The last coding decides (RFC 9112 §6.3).
            transfer_encoding = true;
            chunked = h
                .value
                .split(|b| *b == b',')
                .next_back()
                .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        } else if h.name.eq_ignore_ascii_case("connection") {
            close |= h
                .value
                .split(|b| *b == b',')
                .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"close"));
        }
    }
    let framing = if head_method || code == 204 || code == 304 || (100..200).contains(&code) {
        Framing::Length(0)
    } else if transfer_encoding {
        if chunked {
            Framing::Chunked
        } else {
            Framing::Close
        }
    } else {
        length.map_or(Framing::Close, Framing::Length)
    };
    Ok(Some(ResponseHead {
        len,
        code,
        framing,
        // Both lengths reach the client as they came: the connection ends
        // with this response, whichever the client believed.
        close: close || framing == Framing::Close || transfer_encoding && length.is_some(),
    }))
}

/// Finds where a chunked body ends (RFC 9112 §7.1), fed the bytes in
/// pieces as they arrive.
#[derive(Debug, Default)]
struct ChunkedEnd {
    state: ChunkState,
    /// Data bytes left of the current chunk.
    left: u64,
}

#[derive(Debug, Default, Clone, Copy, PartialEq)]
enum ChunkState {
    /// In a chunk-size line (the hex size, then any extension, up to LF).
    #[default]
    Size,
    /// After the size's hex digits: an extension or whitespace, up to LF.
    SizeRest,
    Data,
    /// The CRLF after a chunk's data.
    DataEnd,
    /// Trailer lines after the last chunk; `true` at the start of a line.
    Trailer(bool),
}

impl ChunkedEnd {
    /// How many of `data`'s bytes finish the body (`Some`), or `None` when
    /// all of them belong to it and more are to come. `Err`: not chunked
    /// framing.
    fn scan(&mut self, data: &[u8]) -> Result<Option<usize>, ()> {
        let mut i = 0;
        while i < data.len() {
            let b = data[i];
            match self.state {
                ChunkState::Size => match (b as char).to_digit(16) {
                    Some(d) => {
                        self.left = self.left.checked_mul(16).ok_or(())? + d as u64;
                        if self.left > 1 << 48 {
                            return Err(());
                        }
                    }
                    None if b == b'\n' => self.end_size_line(),
                    None => self.state = ChunkState::SizeRest,
                },
                ChunkState::SizeRest => {
                    if b == b'\n' {
                        self.end_size_line();
                    }
                }
                ChunkState::Data => {
                    let n = (self.left.min((data.len() - i) as u64)) as usize;
                    self.left -= n as u64;
                    i += n;
                    if self.left == 0 {
                        self.state = ChunkState::DataEnd;
                    }
                    continue;
                }
                ChunkState::DataEnd => match b {
                    b'\r' => {}
                    b'\n' => self.state = ChunkState::Size,
                    _ => return Err(()),
                },
                ChunkState::Trailer(line_start) => match b {
                    b'\n' if line_start => return Ok(Some(i + 1)),
                    b'\n' => self.state = ChunkState::Trailer(true),
                    b'\r' => {}
                    _ => self.state = ChunkState::Trailer(false),
                },
            }
            i += 1;
        }
        Ok(None)
    }

    fn end_size_line(&mut self) {
        self.state = if self.left == 0 {
            ChunkState::Trailer(true)
        } else {
            ChunkState::Data
        };
    }
}

/// A head of the proxy's own (403, 502, 503) with a short text body.
fn own_response(status: &str, body: &str, close: bool) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n{}date: {}\r\n\r\n{body}",
        body.len(),
        if close { "connection: close\r\n" } else { "" },
        httpdate::fmt_http_date(std::time::SystemTime::now()),
    )
    .into_bytes()
}

impl Conn {
    /// Serves `client` on the direct path until it ends or a request needs
    /// the general path.
    pub(super) async fn serve_direct(&self, mut client: TcpStream) -> End {
        let mut buf = BytesMut::with_capacity(8 * 1024);
        let mut upstream: Option<Upstream> = None;
        let timeout = self.config.header_timeout;
        let head_timer = tokio::time::sleep(timeout);
        tokio::pin!(head_timer);
        // The same for the response heads (the request timeout).
        let response_timer = tokio::time::sleep(self.config.request_timeout);
        tokio::pin!(response_timer);
        loop {
            // A request head, within the header timeout.
            rearm(head_timer.as_mut(), timeout);
            let head = loop {
                match parse_request(&buf, self.config.escaped_slashes) {
                    Parsed::Request(head) => break head,
                    Parsed::General => return End::Fallback(client, buf.freeze()),
                    Parsed::BadTarget {
                        method,
                        url,
                        headers,
                    } => {
                        self.bad_target(request_flows(method, url, "HTTP/1.1", &headers).0);
                        // The rest of the request is not read: closed.
                        let _ = answer(
                            &mut client,
                            "400 Bad Request",
                            super::BAD_TARGET_BODY,
                            false,
                        )
                        .await;
                        linger(client);
                        return End::Done;
                    }
                    Parsed::Partial => {}
                }
                let read = tokio::select! {
                    biased;
                    read = client.read_buf(&mut buf) => read,
                    () = &mut head_timer => return End::Done,
                };
                match read {
                    Ok(n) if n > 0 => {}
                    _ => return End::Done,
                }
            };
            let started = Instant::now();
            match self
                .direct_request(
                    &mut client,
                    &mut buf,
                    &mut upstream,
                    head,
                    started,
                    response_timer.as_mut(),
                )
                .await
            {
                Ok(Next::Request) => {}
                Ok(Next::General) => return End::Fallback(client, buf.freeze()),
                Ok(Next::Close) | Err(_) => {
                    linger(client);
                    return End::Done;
                }
            }
        }
    }

    /// One request: checked, then refused or forwarded with its response.
    async fn direct_request(
        &self,
        client: &mut TcpStream,
        buf: &mut BytesMut,
        upstream: &mut Option<Upstream>,
        head: RequestHead,
        started: Instant,
        mut response_timer: std::pin::Pin<&mut tokio::time::Sleep>,
    ) -> io::Result<Next> {
        let view = RequestView {
            method: &head.method,
            path: &head.url[head.host_end..],
            host: &head.url[7..head.host_end],
            headers: &head.headers,
        };
        let verdict = match self.check(&view) {
            // Header edits are the general path's (see `Conn::request`).
            Ok(edits) if !edits.is_empty() => return Ok(Next::General),
            v => v,
        };
        // What `read_past` needs once the flows took the method and URL.
        let extent = (head.len, head.body, head.close);
        let (request, mut http) = request_flows(head.method, head.url, "HTTP/1.1", &head.headers);
        if let Err(side) = verdict {
            self.refused(side, request);
            let keep = self.read_past(client, buf, extent).await;
            return answer(client, "403 Forbidden", "Access denied\r\n", keep).await;
        }
        self.stats.requests_forwarded.inc();
        self.record(
            false,
            Verdict::FORWARDED,
            request,
            0,
            self.allowed_by.clone(),
        );

        // The server failing before a response head gets a 503, and not
        // sending one within the request timeout (counted from the end of
        // the request, as Envoy does) a 504. The connection stays usable
        // when the whole request was read: sent upstream, or (the server
        // unreachable) skipped like a refused one.
        let sent = match self.connected(upstream).await {
            Err(e) => Err((Some(e), RequestRead::HeadOnly)),
            Ok(up) => match forward_exact(buf, head.len, head.body, client, &mut up.stream).await {
                Err(e) => Err((Some(e), RequestRead::PartOfBody)),
                Ok(()) => Ok(up),
            },
        };
        let response = match sent {
            Err(failure) => Err(failure),
            Ok(up) => {
                let limit = self.config.request_timeout;
                rearm(response_timer.as_mut(), limit);
                tokio::select! {
                    biased;
                    r = final_response_head(up, client, head.head_method) => {
                        r.map_err(|e| (Some(e), RequestRead::Whole))
                    }
                    () = response_timer, if !limit.is_zero() => Err((None, RequestRead::Whole)),
                }
            }
        };
        let resp = match response {
            Ok(resp) => resp,
            Err((failure, read)) => {
                *upstream = None;
                let (code, status, body) = match failure {
                    Some(e) => {
                        tracing::debug!(server = %self.dst, error = %e, "upstream");
                        self.stats.upstream_errors.inc();
                        (503, "503 Service Unavailable", super::UPSTREAM_ERROR_BODY)
                    }
                    None => {
                        self.stats.request_timeouts.inc();
                        (504, "504 Gateway Timeout", super::REQUEST_TIMEOUT_BODY)
                    }
                };
                http.code = code;
                let latency = started.elapsed().as_nanos().max(1) as u64;
                self.record(
                    true,
                    Verdict::FORWARDED,
                    http,
                    latency,
                    self.allowed_by.clone(),
                );
                let keep = match read {
                    RequestRead::Whole => !head.close,
                    RequestRead::PartOfBody => false,
                    RequestRead::HeadOnly => self.read_past(client, buf, extent).await,
                };
                return answer(client, status, body, keep).await;
            }
        };
        http.code = resp.code as u32;
        let latency = started.elapsed().as_nanos().max(1) as u64;
        self.record(
            true,
            Verdict::FORWARDED,
            http,
            latency,
            self.allowed_by.clone(),
        );
        let up = upstream.as_mut().expect("sent on it");
        if forward_response(up, client, &resp).await.is_err() {
            *upstream = None;
            return Ok(Next::Close);
        }
        // Bytes after the response are an answer to nothing this client
        // asked (a request smuggled to the server, say): never delivered to
        // the next request; the connection goes.
        if !up.buf.is_empty() {
            self.stats.unsolicited.inc();
            *upstream = None;
        } else if resp.close {
            *upstream = None;
        }
        Ok(if head.close || resp.framing == Framing::Close {
            Next::Close
        } else {
            Next::Request
        })
    }

    /// Reads past a request the proxy answers itself (its head's length,
    /// its body's and whether it asked to close: its head is at the start of
    /// `buf`, its body up to a limit is read and dropped), so that the
    /// connection stays usable. False when it cannot: the client asked to
    /// close, or the body is too big or did not come in time.
    async fn read_past(
        &self,
        client: &mut TcpStream,
        buf: &mut BytesMut,
        (head, body, close): (usize, u64, bool),
    ) -> bool {
        buf.advance(head);
        !close
            && body <= DRAIN_LIMIT as u64
            && skip(client, buf, body, self.config.header_timeout).await
    }

    /// The upstream connection, (re)connecting when there is none or the
    /// server closed it.
    async fn connected<'u>(
        &self,
        upstream: &'u mut Option<Upstream>,
    ) -> io::Result<&'u mut Upstream> {
        if let Some(up) = upstream.as_mut() {
            // An idle keep-alive connection the server closed, or wrote to
            // out of turn (bytes already read count too), is not reused.
            let mut probe = [0u8; 1];
            match up.stream.try_read(&mut probe) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock && up.buf.is_empty() => {}
                Ok(n) if n > 0 => {
                    self.stats.unsolicited.inc();
                    *upstream = None;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.stats.unsolicited.inc();
                    *upstream = None;
                }
                _ => *upstream = None,
            }
        }
        if upstream.is_none() {
            let stream = self.dial().await.map_err(io::Error::other)?;
            *upstream = Some(Upstream {
                stream,
                buf: BytesMut::with_capacity(8 * 1024),
            });
        }
        Ok(upstream.as_mut().expect("just set"))
    }
}

/// How much of a request the proxy had read from its client when the
/// server failed.
enum RequestRead {
    /// Only the head (the server could not be reached).
    HeadOnly,
    /// Part of the body: the rest is still coming.
    PartOfBody,
    Whole,
}

/// Answers the client with a response of the proxy's own; the connection
/// goes on if `keep`.
async fn answer(client: &mut TcpStream, status: &str, body: &str, keep: bool) -> io::Result<Next> {
    client.write_all(&own_response(status, body, !keep)).await?;
    Ok(if keep { Next::Request } else { Next::Close })
}

/// Writes to `to` the `head` bytes at the start of `buf` and the `n` body
/// bytes after them, reading from `from` what `buf` lacks; bytes past the
/// body (a pipelined request, say) stay in `buf`.
async fn forward_exact(
    buf: &mut BytesMut,
    head: usize,
    n: u64,
    from: &mut TcpStream,
    to: &mut TcpStream,
) -> io::Result<()> {
    let have = (buf.len() - head).min(n as usize);
    to.write_all(&buf[..head + have]).await?;
    buf.advance(head + have);
    let mut left = n - have as u64;
    // Here `buf` is empty: all of it was body.
    while left > 0 {
        buf.reserve(BODY_READ);
        if from.read_buf(buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        let k = buf.len().min(left as usize);
        to.write_all(&buf[..k]).await?;
        buf.advance(k);
        left -= k as u64;
    }
    Ok(())
}

/// Reads up to the final response head, which stays at the start of
/// `up.buf`; interim (1xx) heads go to the client as they are.
async fn final_response_head(
    up: &mut Upstream,
    client: &mut TcpStream,
    head_method: bool,
) -> io::Result<ResponseHead> {
    loop {
        match parse_response(&up.buf, head_method) {
            Ok(Some(head)) if head.code == 101 => {
                return Err(io::Error::other("101 without an upgrade request"))
            }
            Ok(Some(head)) if (100..200).contains(&head.code) => {
                client.write_all(&up.buf[..head.len]).await?;
                up.buf.advance(head.len);
                continue;
            }
            Ok(Some(head)) => return Ok(head),
            Ok(None) => {}
            Err(()) => return Err(io::Error::other("unframable response")),
        }
        if up.stream.read_buf(&mut up.buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// Forwards the response whose head `resp` is at the start of `up.buf`,
/// then its body.
async fn forward_response(
    up: &mut Upstream,
    client: &mut TcpStream,
    resp: &ResponseHead,
) -> io::Result<()> {
    let resp_len = resp.len;
    match resp.framing {
        Framing::Length(n) => {
            forward_exact(&mut up.buf, resp_len, n, &mut up.stream, client).await?;
        }
        Framing::Chunked => {
            let mut end = ChunkedEnd::default();
            let mut from = resp_len;
            loop {
                let scanned = end
                    .scan(&up.buf[from..])
                    .map_err(|()| io::Error::other("bad chunked framing"))?;
                let k = scanned.map_or(up.buf.len(), |k| from + k);
                client.write_all(&up.buf[..k]).await?;
                up.buf.advance(k);
                if scanned.is_some() {
                    break;
                }
                from = 0;
                up.buf.reserve(BODY_READ);
                if up.stream.read_buf(&mut up.buf).await? == 0 {
                    return Err(io::ErrorKind::UnexpectedEof.into());
                }
            }
        }
        Framing::Close => {
            client.write_all(&up.buf).await?;
            up.buf.clear();
            loop {
                up.buf.reserve(BODY_READ);
                if up.stream.read_buf(&mut up.buf).await? == 0 {
                    break;
                }
                client.write_all(&up.buf).await?;
                up.buf.clear();
            }
        }
    }
    Ok(())
}

/// Reads and drops `n` body bytes (from `buf`, then `client`); false when
/// the client does not send them in time.
async fn skip(
    client: &mut TcpStream,
    buf: &mut BytesMut,
    n: u64,
    timeout: std::time::Duration,
) -> bool {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut left = n;
    loop {
        let k = buf.len().min(left as usize);
        buf.advance(k);
        left -= k as u64;
        if left == 0 {
            return true;
        }
        match tokio::time::timeout_at(deadline, client.read_buf(buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return false,
        }
    }
}

/// How long a closing client connection is read from (and what comes
/// dropped) after the proxy's last answer, at most and between two reads.
const LINGER_TOTAL: std::time::Duration = std::time::Duration::from_secs(10);
const LINGER_IDLE: std::time::Duration = std::time::Duration::from_secs(2);

/// Closes a client connection the proxy is done with: FIN after the last
/// answer, then what the client still sends (the rest of a refused upload,
/// requests pipelined after `Connection: close`) is read and dropped until
/// it closes too, or for `LINGER_TOTAL` at most. Closing a socket with
/// unread bytes sends a reset, which makes the client's kernel drop the
/// answer it has not read yet (nginx's `lingering_close` does the same).
pub(super) fn linger(mut stream: TcpStream) {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return;
    };
    runtime.spawn(async move {
        if stream.shutdown().await.is_err() {
            return;
        }
        let mut sink = vec![0u8; 16 * 1024];
        let until = tokio::time::Instant::now() + LINGER_TOTAL;
        loop {
            let deadline = until.min(tokio::time::Instant::now() + LINGER_IDLE);
            match tokio::time::timeout_at(deadline, stream.read(&mut sink)).await {
                Ok(Ok(n)) if n > 0 => {}
                _ => return,
            }
        }
    });
}

/// The connection handed to the general path: the bytes the direct path
/// already read come first. Dropped, it lingers (`linger`).
pub(super) struct Rewind {
    pub read: Bytes,
    pub stream: TcpStream,
}

impl Drop for Rewind {
    fn drop(&mut self) {
        // hyper drops the connection when it is done with it; a second
        // descriptor of the socket keeps it open for `linger`.
        use std::os::fd::AsFd;
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        let Ok(fd) = self.stream.as_fd().try_clone_to_owned() else {
            return;
        };
        if let Ok(stream) = TcpStream::from_std(std::net::TcpStream::from(fd)) {
            linger(stream);
        }
    }
}

impl tokio::io::AsyncRead for Rewind {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read[..n]);
            self.read.advance(n);
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Rewind {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write(cx, data)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.stream).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    fn request(raw: &str) -> Parsed {
        parse_request(raw.as_bytes(), Default::default())
    }

    #[test]
    fn plain_requests_take_the_direct_path_and_the_rest_the_general_one() {
        let Parsed::Request(h) = request(
            "POST /api/x?y=1 HTTP/1.1\r\nHost: svc:8080\r\nContent-Length: 5\r\nConnection: keep-alive, close\r\n\r\nhello",
        ) else {
            panic!("direct")
        };
        assert_eq!(
            (h.len, h.body, h.close, h.head_method),
            (94, 5, true, false)
        );
        assert_eq!(
            (&*h.method, h.url.as_str()),
            ("POST", "http://svc:8080/api/x?y=1")
        );
        assert_eq!(&h.url[7..h.host_end], "svc:8080");
        assert!(matches!(
            request("GET / HTTP/1.1\r\nHost: a\r\n"),
            Parsed::Partial
        ));
        for general in [
            "GET / HTTP/1.0\r\nHost: a\r\n\r\n",
            "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
            "GET http://a/ HTTP/1.1\r\nHost: a\r\n\r\n",
            "CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
            "GET / HTTP/1.1\nHost: a\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost a\r\n\r\n",
            "G\u{1}T / HTTP/1.1\r\nHost: a\r\n\r\n",
        ] {
            assert!(matches!(request(general), Parsed::General), "{general:?}");
        }
        let many = format!(
            "GET / HTTP/1.1\r\nHost: a\r\n{}\r\n",
            "X-A: 1\r\n".repeat(70)
        );
        assert!(matches!(request(&many), Parsed::General));
        let huge = format!(
            "GET / HTTP/1.1\r\nHost: a\r\nX-A: {}",
            "a".repeat(MAX_HEADER_BYTES)
        );
        assert!(matches!(request(&huge), Parsed::General));
    }

    #[test]
    fn responses_are_framed_by_length_chunks_or_close() {
        let framing = |raw: &str, head: bool| {
            parse_response(raw.as_bytes(), head).map(|r| r.map(|r| (r.code, r.framing, r.close)))
        };
        use Framing::*;
        for (raw, head, want) in [
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n",
                false,
                (200, Length(3), false),
            ),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\n",
                true,
                (200, Length(0), false),
            ),
            (
                "HTTP/1.1 204 No Content\r\n\r\n",
                false,
                (204, Length(0), false),
            ),
            (
                "HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n",
                false,
                (304, Length(0), false),
            ),
            (
                "HTTP/1.1 100 Continue\r\n\r\n",
                false,
                (100, Length(0), false),
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                false,
                (200, Chunked, false),
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
                false,
                (200, Chunked, true),
            ),
            (
                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
                false,
                (200, Close, true),
            ),
            ("HTTP/1.1 200 OK\r\n\r\n", false, (200, Close, true)),
            (
                "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: Close\r\n\r\n",
                false,
                (200, Length(3), true),
            ),
        ] {
            assert_eq!(framing(raw, head), Ok(Some(want)), "{raw:?}");
        }
        assert_eq!(
            framing("HTTP/1.1 200 OK\r\nContent-Length: 3\r\n", false),
            Ok(None)
        );
        for bad in [
            "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: -3\r\n\r\n",
            "HTTP/1.1 2000 OK\r\n\r\n",
            "junk\r\n\r\n",
        ] {
            assert_eq!(framing(bad, false), Err(()), "{bad:?}");
        }
    }

    /// Records the proxy's reports; the rest of the policy is unused here.
    #[derive(Default)]
    struct Recorder(std::sync::Mutex<Vec<flow::record::L7Record>>);

    /// What a test checks of a report: verdict, type, method, URL, code.
    type Row = (&'static str, String, String, String, u32);

    /// A report's row, its URL `http://s{path}`.
    fn row(verdict: &'static str, r#type: &str, method: &str, path: &str, code: u32) -> Row {
        let url = format!("http://s{path}");
        (verdict, r#type.into(), method.into(), url, code)
    }

    impl Recorder {
        /// The reports so far, as rows.
        fn rows(&self) -> Vec<Row> {
            let records = self.0.lock().unwrap();
            records
                .iter()
                .map(|r| {
                    let h = r.l7.http.as_ref().unwrap();
                    let (method, url) = (h.method.to_string(), h.url.clone());
                    (
                        r.verdict.as_str(),
                        r.l7.r#type.to_string(),
                        method,
                        url,
                        h.code,
                    )
                })
                .collect()
        }
    }

    impl crate::Policy for Recorder {
        fn connection(
            &self,
            _: std::net::SocketAddrV4,
            _: std::net::SocketAddrV4,
        ) -> Option<crate::Connection> {
            None
        }
        fn dns(
            &self,
            _: std::net::SocketAddrV4,
            _: std::net::SocketAddrV4,
            _: bool,
        ) -> Option<crate::dns::DnsConnection> {
            None
        }
        fn learned(&self, _: std::net::Ipv4Addr, _: &str, _: &[(std::net::Ipv4Addr, u32)]) {}
        fn refresh_learned(
            &self,
            _: std::net::Ipv4Addr,
            _: &str,
            _: &[(std::net::Ipv4Addr, u32)],
        ) -> bool {
            false
        }
        fn record(&self, record: flow::record::L7Record) {
            self.0.lock().unwrap().push(record);
        }
    }

    /// A keep-alive server on loopback: answers a path ending in /chunked
    /// with three chunks (three writes) and a trailer, does not answer
    /// /silent, and answers anything else with the request line and the
    /// body's length.
    fn server() -> std::net::SocketAddrV4 {
        use std::io::{BufRead, Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let std::net::SocketAddr::V4(addr) = l.local_addr().unwrap() else {
            unreachable!()
        };
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                std::thread::spawn(move || {
                    let mut w = s.try_clone().unwrap();
                    let mut r = std::io::BufReader::new(s);
                    loop {
                        let (mut line, mut len) = (String::new(), 0);
                        let mut upgrade = None;
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        loop {
                            let mut h = String::new();
                            r.read_line(&mut h).unwrap();
                            if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:")
                            {
                                len = v.trim().parse().unwrap();
                            }
                            if let Some(v) = h.to_ascii_lowercase().strip_prefix("upgrade:") {
                                upgrade = Some(v.trim().to_string());
                            }
                            if h == "\r\n" {
                                break;
                            }
                        }
                        r.read_exact(&mut vec![0; len]).unwrap();
                        let line = line.trim_end();
                        if line.contains("/silent ") {
                            // Never answered: the proxy's request timeout.
                            continue;
                        }
                        if line.contains("/twice ") {
                            // Two answers to one request (as a server
                            // running a request smuggled in a body would).
                            let one = "HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfirst";
                            let two = "HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\nSMUGGLED";
                            w.write_all((one.to_string() + two).as_bytes()).unwrap();
                            continue;
                        }
                        if line.contains("/ws ") && upgrade.as_deref() == Some("websocket")
                            || line.contains("/rogue101 ")
                        {
                            // Switches, then echoes what comes until the
                            // client closes.
                            w.write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n").unwrap();
                            let _ = std::io::copy(&mut r, &mut w);
                            return;
                        }
                        if line.contains("/chunked ") {
                            for part in [
                                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab",
                                "c\r\n2\r\nde\r",
                                "\n0\r\nX-T: 1\r\n\r\n",
                            ] {
                                w.write_all(part.as_bytes()).unwrap();
                                std::thread::sleep(std::time::Duration::from_millis(5));
                            }
                        } else {
                            let mut body = format!("{line} body {len}");
                            if let Some(u) = upgrade {
                                body += &format!(" upgrade {u}");
                            }
                            let head = format!(
                                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n",
                                body.len()
                            );
                            w.write_all((head + &body).as_bytes()).unwrap();
                        }
                    }
                });
            }
        });
        addr
    }

    /// A proxied connection to `dst` with `rules` (the server's ingress
    /// side): the client's end and the direct path's outcome.
    async fn proxied(
        dst: std::net::SocketAddrV4,
        rules: Vec<policy::HttpRule>,
        policy: std::sync::Arc<Recorder>,
    ) -> (TcpStream, tokio::task::JoinHandle<End>) {
        proxied_with(dst, rules, policy, Default::default()).await
    }

    async fn proxied_with(
        dst: std::net::SocketAddrV4,
        rules: Vec<policy::HttpRule>,
        policy: std::sync::Arc<Recorder>,
        config: crate::http::Config,
    ) -> (TcpStream, tokio::task::JoinHandle<End>) {
        let (client, accepted, conn) = connection(dst, rules, policy, config).await;
        (
            client,
            tokio::spawn(async move { conn.serve_direct(accepted).await }),
        )
    }

    /// A client's connection to the proxy: the client's end, the proxy's
    /// and the proxy's state for it.
    async fn connection(
        dst: std::net::SocketAddrV4,
        rules: Vec<policy::HttpRule>,
        policy: std::sync::Arc<Recorder>,
        config: crate::http::Config,
    ) -> (TcpStream, TcpStream, Conn) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(l.local_addr().unwrap()).await.unwrap();
        let (accepted, std::net::SocketAddr::V4(from)) = l.accept().await.unwrap() else {
            unreachable!()
        };
        let side = crate::Side {
            ingress: true,
            rules: std::sync::Arc::new(crate::HttpRules::compile(&rules).unwrap()),
            policy: Default::default(),
        };
        let conn = Conn {
            client: from,
            dst,
            ingress: true,
            allowed_by: std::sync::Arc::new([(true, side.policy.clone())]),
            conn: crate::Connection {
                client_identity: 1,
                server_identity: 2,
                sides: vec![side],
                kafka: None,
                transparent: false,
            },
            policy,
            config: std::sync::Arc::new(config),
            stats: Default::default(),
            upstream: tokio::sync::Mutex::new(None),
        };
        (client, accepted, conn)
    }

    /// A client's connection served by both paths (`Conn::serve`): the
    /// client's end and the proxy's state for it.
    async fn serving(
        dst: std::net::SocketAddrV4,
        rules: Vec<policy::HttpRule>,
        policy: std::sync::Arc<Recorder>,
        config: crate::http::Config,
    ) -> (TcpStream, std::sync::Arc<Conn>) {
        let (client, accepted, conn) = connection(dst, rules, policy, config).await;
        let conn = std::sync::Arc::new(conn);
        tokio::spawn(conn.clone().serve(accepted));
        (client, conn)
    }

    /// Reads until `n` bytes came (a test fails rather than hangs).
    async fn read_n(s: &mut TcpStream, n: usize) -> String {
        let mut out = vec![0; n];
        let read = tokio::time::timeout(std::time::Duration::from_secs(5), s.read_exact(&mut out));
        read.await.expect("answered in time").unwrap();
        String::from_utf8(out).unwrap()
    }

    /// Everything until the proxy closes (a test fails rather than hangs).
    async fn read_to_close(s: &mut TcpStream) -> String {
        let mut out = String::new();
        let read = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            s.read_to_string(&mut out),
        );
        read.await.expect("closed in time").unwrap();
        out
    }

    /// One response with a length (the proxy's own, or a server's): its
    /// head and its body.
    async fn own_answer(s: &mut TcpStream) -> (String, String) {
        let mut head = Vec::new();
        let read_head = async {
            while !head.ends_with(b"\r\n\r\n") {
                head.push(0);
                let last = head.len() - 1;
                s.read_exact(&mut head[last..]).await.unwrap();
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(5), read_head)
            .await
            .expect("answered in time");
        let head = String::from_utf8(head).unwrap();
        let len: usize = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(": ")?;
                name.eq_ignore_ascii_case("content-length").then_some(value)
            })
            .unwrap_or_else(|| panic!("no length: {head}"))
            .parse()
            .unwrap();
        (head, read_n(s, len).await)
    }

    /// A server that cannot be reached gets a 503 for each request, on a
    /// client connection that stays usable (a request's body is read
    /// past), and each is reported with its 503.
    #[tokio::test]
    async fn an_unreachable_server_gets_503s_on_a_connection_that_stays_usable() {
        let closed = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let std::net::SocketAddr::V4(a) = l.local_addr().unwrap() else {
                unreachable!()
            };
            a
        };
        let policy = std::sync::Arc::new(Recorder::default());
        let any = policy::HttpRule::default();
        let (mut c, end) = proxied(closed, vec![any], policy.clone()).await;
        for (request, close) in [
            (
                "POST /api/a HTTP/1.1\r\nHost: s\r\nContent-Length: 5\r\n\r\nhello",
                false,
            ),
            (
                "GET /api/b HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n",
                true,
            ),
        ] {
            c.write_all(request.as_bytes()).await.unwrap();
            let (head, body) = own_answer(&mut c).await;
            assert!(
                head.starts_with("HTTP/1.1 503 Service Unavailable\r\n"),
                "{head}"
            );
            assert_eq!(head.contains("connection: close"), close, "{head}");
            assert!(body.starts_with("upstream connect error"), "{body}");
        }
        assert_eq!(read_to_close(&mut c).await, "");
        assert!(matches!(end.await.unwrap(), End::Done));
        assert_eq!(
            policy.rows(),
            [
                row("FORWARDED", "REQUEST", "POST", "/api/a", 0),
                row("FORWARDED", "RESPONSE", "POST", "/api/a", 503),
                row("FORWARDED", "REQUEST", "GET", "/api/b", 0),
                row("FORWARDED", "RESPONSE", "GET", "/api/b", 503),
            ]
        );
    }

    /// A server that answers one request twice: the extra answer is never
    /// delivered (to the next request or anyone), the upstream connection
    /// goes, and it is counted; the next request gets its own answer.
    #[tokio::test]
    async fn an_answer_nobody_asked_for_is_never_delivered() {
        let dst = server();
        let policy = std::sync::Arc::new(Recorder::default());
        let (mut c, accepted, conn) = connection(
            dst,
            vec![policy::HttpRule::default()],
            policy.clone(),
            Default::default(),
        )
        .await;
        let conn = std::sync::Arc::new(conn);
        let serving = conn.clone();
        let end = tokio::spawn(async move { serving.serve_direct(accepted).await });
        c.write_all(b"GET /api/twice HTTP/1.1\r\nHost: s\r\n\r\n")
            .await
            .unwrap();
        let (_, first) = own_answer(&mut c).await;
        assert_eq!(first, "first");
        // Give the second answer time to arrive at the proxy.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        for _ in 0..3 {
            c.write_all(b"GET /api/next HTTP/1.1\r\nHost: s\r\n\r\n")
                .await
                .unwrap();
            let (_, body) = own_answer(&mut c).await;
            assert_eq!(body, "GET /api/next HTTP/1.1 body 0");
        }
        assert!(conn.stats.unsolicited.get() >= 1);
        drop(c);
        let _ = end.await;
    }

    /// The header timeout closes a client that stalls in a head, and moves
    /// forward with every request of one that keeps the connection busy
    /// (here for four timeouts).
    #[tokio::test]
    async fn a_stalled_head_times_out_and_a_busy_connection_does_not() {
        let timeout = std::time::Duration::from_millis(400);
        let config = crate::http::Config {
            header_timeout: timeout,
            ..Default::default()
        };
        let policy = std::sync::Arc::new(Recorder::default());
        let (mut busy, busy_end) =
            proxied_with(server(), Vec::new(), policy.clone(), config.clone()).await;
        let (mut stalled, stalled_end) =
            proxied_with(server(), Vec::new(), policy.clone(), config).await;
        stalled
            .write_all(b"GET /api/a HTTP/1.1\r\nHost: s\r\n")
            .await
            .unwrap();
        let started = std::time::Instant::now();
        for _ in 0..16 {
            busy.write_all(b"GET /api/a HTTP/1.1\r\nHost: s\r\n\r\n")
                .await
                .unwrap();
            let a = "HTTP/1.1 200 OK\r\nContent-Length: 26\r\n\r\nGET /api/a HTTP/1.1 body 0";
            assert_eq!(read_n(&mut busy, a.len()).await, a);
            tokio::time::sleep(timeout / 4).await;
        }
        assert!(started.elapsed() > timeout * 4);
        // The stalled client was closed without an answer.
        assert_eq!(read_to_close(&mut stalled).await, "");
        assert!(matches!(stalled_end.await.unwrap(), End::Done));
        assert!(!busy_end.is_finished());
    }

    #[tokio::test]
    async fn requests_are_checked_forwarded_refused_and_reported() {
        let policy = std::sync::Arc::new(Recorder::default());
        let get_api = policy::HttpRule {
            method: Some("GET".into()),
            path: Some("/api/.*".into()),
            ..Default::default()
        };
        let (mut c, end) = proxied(server(), vec![get_api], policy.clone()).await;
        // Allowed, refused (its body drained: the connection stays usable),
        // a chunked answer, then two pipelined requests in one write.
        c.write_all(b"GET /api/a HTTP/1.1\r\nHost: s\r\n\r\n")
            .await
            .unwrap();
        let a = "HTTP/1.1 200 OK\r\nContent-Length: 26\r\n\r\nGET /api/a HTTP/1.1 body 0";
        assert_eq!(read_n(&mut c, a.len()).await, a);
        c.write_all(b"POST /api/b HTTP/1.1\r\nHost: s\r\nContent-Length: 2\r\n\r\nhi")
            .await
            .unwrap();
        let (head, body) = own_answer(&mut c).await;
        assert!(head.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{head}");
        assert!(!head.contains("connection: close"), "{head}");
        assert_eq!(body, "Access denied\r\n");
        c.write_all(b"GET /api/chunked HTTP/1.1\r\nHost: s\r\n\r\n")
            .await
            .unwrap();
        let chunked = "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\nX-T: 1\r\n\r\n";
        assert_eq!(read_n(&mut c, chunked.len()).await, chunked);
        c.write_all(b"GET /api/p HTTP/1.1\r\nHost: s\r\nContent-Length: 3\r\n\r\nxyzGET /api/q HTTP/1.1\r\nHost: s\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        assert_eq!(
            read_to_close(&mut c).await,
            "HTTP/1.1 200 OK\r\nContent-Length: 26\r\n\r\nGET /api/p HTTP/1.1 body 3HTTP/1.1 200 OK\r\nContent-Length: 26\r\n\r\nGET /api/q HTTP/1.1 body 0"
        );
        assert!(matches!(end.await.unwrap(), End::Done));
        assert_eq!(
            policy.rows(),
            [
                row("FORWARDED", "REQUEST", "GET", "/api/a", 0),
                row("FORWARDED", "RESPONSE", "GET", "/api/a", 200),
                row("DROPPED", "REQUEST", "POST", "/api/b", 0),
                row("FORWARDED", "REQUEST", "GET", "/api/chunked", 0),
                row("FORWARDED", "RESPONSE", "GET", "/api/chunked", 200),
                row("FORWARDED", "REQUEST", "GET", "/api/p", 0),
                row("FORWARDED", "RESPONSE", "GET", "/api/p", 200),
                row("FORWARDED", "REQUEST", "GET", "/api/q", 0),
                row("FORWARDED", "RESPONSE", "GET", "/api/q", 200),
            ]
        );
    }

    /// A rule that adds a header to requests without it (a header edit:
    /// the general path's).
    fn add_token() -> policy::HttpRule {
        policy::HttpRule {
            header_matches: vec![policy::HeaderMatch {
                name: "X-Token".into(),
                value: Some("t".into()),
                secret: None,
                mismatch: Some("ADD".into()),
            }],
            ..Default::default()
        }
    }

    /// A server that does not answer within the request timeout: the
    /// client gets a 504, on the direct path and on the general one, its
    /// connection stays usable and the next request goes to a new upstream
    /// connection. Each 504 is reported and counted.
    #[tokio::test]
    async fn a_silent_server_gets_504s_after_the_request_timeout_on_both_paths() {
        let timeout = std::time::Duration::from_millis(300);
        let config = crate::http::Config {
            request_timeout: timeout,
            ..Default::default()
        };
        // Header edits send every request to the general path.
        for rules in [vec![policy::HttpRule::default()], vec![add_token()]] {
            let policy = std::sync::Arc::new(Recorder::default());
            let (mut c, conn) = serving(server(), rules, policy.clone(), config.clone()).await;
            for _ in 0..2 {
                let started = std::time::Instant::now();
                c.write_all(b"GET /silent HTTP/1.1\r\nHost: s\r\n\r\n")
                    .await
                    .unwrap();
                let (head, body) = own_answer(&mut c).await;
                assert!(head.starts_with("HTTP/1.1 504 "), "{head}");
                assert_eq!(body, "upstream request timeout\r\n");
                assert!(started.elapsed() >= timeout * 7 / 8);
                c.write_all(b"GET /next HTTP/1.1\r\nHost: s\r\n\r\n")
                    .await
                    .unwrap();
                let (head, body) = own_answer(&mut c).await;
                assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
                assert_eq!(body, "GET /next HTTP/1.1 body 0");
            }
            let round = [
                row("FORWARDED", "REQUEST", "GET", "/silent", 0),
                row("FORWARDED", "RESPONSE", "GET", "/silent", 504),
                row("FORWARDED", "REQUEST", "GET", "/next", 0),
                row("FORWARDED", "RESPONSE", "GET", "/next", 200),
            ];
            assert_eq!(policy.rows(), [round.clone(), round].concat());
            assert_eq!(conn.stats.request_timeouts.get(), 2);
        }
    }

    #[tokio::test]
    async fn header_edits_and_unusual_requests_go_to_the_general_path_untouched() {
        let policy = std::sync::Arc::new(Recorder::default());
        for (rules, request) in [
            (vec![add_token()], "GET /x HTTP/1.1\r\nHost: s\r\n\r\n"),
            (
                vec![],
                "POST /x HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            ),
        ] {
            let (mut c, end) = proxied(server(), rules, policy.clone()).await;
            c.write_all(request.as_bytes()).await.unwrap();
            let End::Fallback(_, read) = end.await.unwrap() else {
                panic!("direct path kept {request:?}")
            };
            assert_eq!(read, request.as_bytes());
        }
        assert!(
            policy.0.lock().unwrap().is_empty(),
            "the general path reports them"
        );
    }

    /// A WebSocket upgrade the rules allow continues as a tunnel after the
    /// server's 101; one they refuse gets 403 and the connection stays
    /// HTTP. Other upgrades (h2c: HTTP/2 no rule would see) never reach
    /// the server, which answers in HTTP/1.1; a 101 nobody asked for is
    /// never passed on.
    #[tokio::test]
    async fn websocket_upgrades_tunnel_and_other_upgrades_are_taken_out() {
        let policy = std::sync::Arc::new(Recorder::default());
        let allowed = policy::HttpRule {
            path: Some("/ws|/h2c|/rogue101".into()),
            ..Default::default()
        };
        let (mut c, conn) =
            serving(server(), vec![allowed], policy.clone(), Default::default()).await;

        // Refused: 403, then the same connection serves a plain request.
        c.write_all(
            b"GET /other HTTP/1.1\r\nHost: s\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .await
        .unwrap();
        let (head, _) = own_answer(&mut c).await;
        assert!(head.starts_with("HTTP/1.1 403 "), "{head}");
        // h2c: the server never sees the upgrade; the answer is HTTP/1.1.
        c.write_all(b"GET /h2c HTTP/1.1\r\nHost: s\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n")
            .await
            .unwrap();
        let (head, body) = own_answer(&mut c).await;
        assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
        assert_eq!(body, "GET /h2c HTTP/1.1 body 0");
        // A WebSocket upgrade the server declines: the answer, and the
        // connection stays HTTP.
        c.write_all(
            b"GET /h2c HTTP/1.1\r\nHost: s\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .await
        .unwrap();
        let (head, body) = own_answer(&mut c).await;
        assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
        assert_eq!(body, "GET /h2c HTTP/1.1 body 0 upgrade websocket");
        // A 101 to a request that asked for nothing: not passed on.
        c.write_all(b"GET /rogue101 HTTP/1.1\r\nHost: s\r\n\r\n")
            .await
            .unwrap();
        let (head, _) = own_answer(&mut c).await;
        assert!(head.starts_with("HTTP/1.1 503 "), "{head}");
        // Allowed: 101, then bytes both ways.
        c.write_all(
            b"GET /ws HTTP/1.1\r\nHost: s\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .await
        .unwrap();
        let mut head = Vec::new();
        while !head.ends_with(b"\r\n\r\n") {
            let mut b = [0u8];
            tokio::time::timeout(std::time::Duration::from_secs(5), c.read_exact(&mut b))
                .await
                .expect("101 in time")
                .unwrap();
            head.push(b[0]);
        }
        let head = String::from_utf8(head).unwrap();
        assert!(head.starts_with("HTTP/1.1 101 "), "{head}");
        for frame in ["hello", "GET /admin HTTP/1.1\r\n\r\n"] {
            c.write_all(frame.as_bytes()).await.unwrap();
            assert_eq!(read_n(&mut c, frame.len()).await, frame);
        }
        assert_eq!(conn.stats.upgrades.get(), 1);
        assert_eq!(
            policy.rows(),
            [
                row("DROPPED", "REQUEST", "GET", "/other", 0),
                row("FORWARDED", "REQUEST", "GET", "/h2c", 0),
                row("FORWARDED", "RESPONSE", "GET", "/h2c", 200),
                row("FORWARDED", "REQUEST", "GET", "/h2c", 0),
                row("FORWARDED", "RESPONSE", "GET", "/h2c", 200),
                row("FORWARDED", "REQUEST", "GET", "/rogue101", 0),
                row("FORWARDED", "RESPONSE", "GET", "/rogue101", 503),
                row("FORWARDED", "REQUEST", "GET", "/ws", 0),
                row("FORWARDED", "RESPONSE", "GET", "/ws", 101),
            ]
        );
    }

    /// Flows show the path the rules checked, and the target as it came
    /// when the proxy rewrote it; a target refused with 400 is reported
    /// as dropped, with the raw target in its URL (both paths).
    #[tokio::test]
    async fn flows_show_the_checked_path_and_the_target_as_it_came() {
        let api = || policy::HttpRule {
            path: Some("/api/.*".into()),
            ..Default::default()
        };
        let policy = std::sync::Arc::new(Recorder::default());
        let (mut c, _) = serving(server(), vec![api()], policy.clone(), Default::default()).await;
        c.write_all(b"GET /api/%78y HTTP/1.1\r\nHost: s\r\n\r\n")
            .await
            .unwrap();
        let (head, body) = own_answer(&mut c).await;
        assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
        assert_eq!(body, "GET /api/xy HTTP/1.1 body 0");
        // Refused on the general path (Expect) and on the direct one.
        for (request, raw) in [
            (
                "GET /api/..%5cadmin HTTP/1.1\r\nHost: s\r\nExpect: 100-continue\r\nContent-Length: 0\r\n\r\n",
                "/api/..%5cadmin",
            ),
            (
                "GET /api/..%2fadmin HTTP/1.1\r\nHost: s\r\n\r\n",
                "/api/..%2fadmin",
            ),
        ] {
            c.write_all(request.as_bytes()).await.unwrap();
            let (head, _) = own_answer(&mut c).await;
            assert!(head.starts_with("HTTP/1.1 400 "), "{head}");
            assert!(policy.rows().last() == Some(&row("DROPPED", "REQUEST", "GET", raw, 0)));
        }
        assert_eq!(
            policy.rows()[0],
            row("FORWARDED", "REQUEST", "GET", "/api/xy", 0)
        );
        let original: Vec<_> = policy
            .0
            .lock()
            .unwrap()
            .iter()
            .map(|r| {
                let h = r.l7.http.as_ref().unwrap();
                h.headers
                    .iter()
                    .filter(|h| h.key == crate::http::ORIGINAL_PATH_HEADER)
                    .map(|h| h.value.clone())
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(original[0], ["/api/%78y"]);
        assert!(original[1..].iter().all(|o| o.is_empty()), "{original:?}");
    }

    /// Requests no parser may read one way only get an answer of the
    /// proxy's before it closes (never a silent close), counted as
    /// malformed; nothing reaches the server.
    #[tokio::test]
    async fn malformed_requests_get_an_answer_before_the_close() {
        let big = format!(
            "GET / HTTP/1.1\r\nHost: s\r\nX: {}\r\n\r\n",
            "a".repeat(70_000)
        );
        let cases: Vec<(String, &str)> = vec![
            ("GARBAGE\r\n\r\n".into(), "400"),
            ("\x00\x01\x02 / HTTP/1.1\r\n\r\n".into(), "400"),
            ("GET / HTTP/1.1\r\nHost : s\r\n\r\n".into(), "400"),
            (
                "GET / HTTP/1.1\r\nHost: s\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"
                    .into(),
                "400",
            ),
            (
                "GET / HTTP/1.1\r\nHost: s\r\nContent-Length: -1\r\n\r\n".into(),
                "400",
            ),
            (
                "POST / HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: gzip\r\n\r\n".into(),
                "400",
            ),
            (
                "POST / HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".into(),
                "400",
            ),
            ("GET / HTTP/1.2\r\nHost: s\r\n\r\n".into(), "400"),
            ("GET / HTTP/3.0\r\nHost: s\r\n\r\n".into(), "400"),
            (big, "431"),
        ];
        for (request, status) in cases {
            let policy = std::sync::Arc::new(Recorder::default());
            let (mut c, conn) = serving(server(), vec![], policy.clone(), Default::default()).await;
            let _ = c.write_all(request.as_bytes()).await;
            let mut out = Vec::new();
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(5), c.read_to_end(&mut out))
                    .await
                    .expect("closed in time");
            let out = String::from_utf8_lossy(&out);
            let shown = &request[..request.len().min(80)];
            assert!(
                out.starts_with(&format!("HTTP/1.1 {status} ")),
                "{shown:?}: {out:?}"
            );
            assert_eq!(conn.stats.malformed.get(), 1, "{shown:?}");
            // A bad body shows after its head went (the server's
            // connection is closed then).
            let body_error = request.ends_with("zz\r\n");
            assert_eq!(
                conn.stats.requests_forwarded.get(),
                body_error as u64,
                "{shown:?}"
            );
        }
        // Framed two ways: read by Transfer-Encoding alone (the server
        // gets no Content-Length), and the connection closes after (RFC
        // 9112 §6.3).
        let (mut c, _) = serving(server(), vec![], Default::default(), Default::default()).await;
        c.write_all(b"POST / HTTP/1.1\r\nHost: s\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n")
            .await
            .unwrap();
        let out = read_to_close(&mut c).await;
        assert!(out.starts_with("HTTP/1.1 200 "), "{out}");
        assert!(out.contains("connection: close"), "{out}");
        assert!(out.ends_with("POST / HTTP/1.1 body 0"), "{out}");
    }

    /// With `EscapedSlashes::Unescape`, an encoded slash is a slash: the
    /// rule checks the resolved path and the server gets it.
    #[tokio::test]
    async fn unescaped_slashes_are_checked_and_sent_resolved() {
        let api = policy::HttpRule {
            path: Some("/api/.*".into()),
            ..Default::default()
        };
        let config = crate::http::Config {
            escaped_slashes: crate::rules::EscapedSlashes::Unescape,
            ..Default::default()
        };
        let (mut c, _) = serving(server(), vec![api], Default::default(), config).await;
        c.write_all(b"GET /api/..%2fadmin HTTP/1.1\r\nHost: s\r\n\r\n")
            .await
            .unwrap();
        let (head, _) = own_answer(&mut c).await;
        assert!(head.starts_with("HTTP/1.1 403 "), "{head}");
        c.write_all(b"GET /api/a%2Fb HTTP/1.1\r\nHost: s\r\n\r\n")
            .await
            .unwrap();
        let (head, body) = own_answer(&mut c).await;
        assert!(head.starts_with("HTTP/1.1 200 "), "{head}");
        assert_eq!(body, "GET /api/a/b HTTP/1.1 body 0");
    }

    /// A refused upload too big to drain: the client still gets its 403
    /// (the proxy reads and drops the rest after answering, rather than
    /// resetting the connection under the answer), on both paths.
    #[tokio::test]
    async fn a_refused_big_upload_still_gets_its_answer() {
        const BODY: usize = 6 << 20;
        let api = policy::HttpRule {
            path: Some("/api/.*".into()),
            ..Default::default()
        };
        for expect in ["", "Expect: 100-continue\r\n"] {
            let (c, _) = serving(
                server(),
                vec![api.clone()],
                Default::default(),
                Default::default(),
            )
            .await;
            let (mut r, mut w) = c.into_split();
            let head = format!(
                "POST /admin HTTP/1.1\r\nHost: s\r\n{expect}Content-Length: {BODY}\r\n\r\n"
            );
            let writer = tokio::spawn(async move {
                w.write_all(head.as_bytes()).await?;
                let chunk = vec![b'x'; 64 * 1024];
                for _ in 0..BODY / chunk.len() {
                    w.write_all(&chunk).await?;
                }
                std::io::Result::Ok(w)
            });
            let mut out = Vec::new();
            let read =
                tokio::time::timeout(std::time::Duration::from_secs(10), r.read_to_end(&mut out));
            read.await.expect("closed in time").expect("no reset");
            let out = String::from_utf8_lossy(&out);
            assert!(out.contains(" 403 "), "{expect:?}: {out}");
            assert!(
                writer.await.unwrap().is_ok(),
                "{expect:?}: the upload was cut off"
            );
        }
    }

    #[test]
    fn chunked_bodies_end_where_their_last_chunk_and_trailers_do() {
        let body = b"4;ext=1\r\nwiki\r\n5\r\npedia\r\nE\r\n in\r\n\r\nchunks.\r\n0\r\nX-Trailer: t\r\n\r\nGET /next";
        let end = body.len() - "GET /next".len();
        // Whole, and in every split into two pieces.
        assert_eq!(ChunkedEnd::default().scan(body), Ok(Some(end)));
        for cut in 1..end {
            let mut c = ChunkedEnd::default();
            assert_eq!(c.scan(&body[..cut]), Ok(None), "cut {cut}");
            assert_eq!(c.scan(&body[cut..]), Ok(Some(end - cut)), "cut {cut}");
        }
        assert_eq!(ChunkedEnd::default().scan(b"0\r\n\r\n"), Ok(Some(5)));
        assert_eq!(ChunkedEnd::default().scan(b"3\r\nabcX"), Err(()));
        assert_eq!(ChunkedEnd::default().scan(b"fffffffffffff\r\n"), Err(()));
    }
}
