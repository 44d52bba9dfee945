//! The HTTP proxy: HTTP/1.1 (keep-alive, pipelining) and HTTP/2 (prior
//! knowledge, so gRPC methods are paths) on one listener, one upstream
//! connection per client connection, in the client's protocol.

use flow::enums::{L7FlowType, Verdict};
use std::convert::Infallible;
use std::net::SocketAddrV4;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::http::{header, HeaderMap, Request, Response, StatusCode, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;

use crate::rules::{HeaderEdit, RequestView};
use crate::{Connection, Policy, Stats};

mod h1;

type Body = BoxBody<Bytes, hyper::Error>;

/// Largest request head accepted (bigger ones get 431).
pub const MAX_HEADER_BYTES: usize = 64 * 1024;

/// How much of a refused request's body is read to keep its connection
/// usable; a bigger body closes the connection after the 403.
const DRAIN_LIMIT: usize = 1 << 20;

/// The 503's body when the server fails before a response head (Envoy's).
pub(crate) const UPSTREAM_ERROR_BODY: &str =
    "upstream connect error or disconnect/reset before headers\r\n";
/// The 504's body when a response head does not come in time (Envoy's).
pub(crate) const REQUEST_TIMEOUT_BODY: &str = "upstream request timeout\r\n";

#[derive(Clone, Debug)]
pub struct Config {
    /// SO_MARK of upstream sockets (the datapath skips the policy it
    /// already applied for the proxy's client).
    pub from_mark: u32,
    pub connect_timeout: Duration,
    /// How long a client may take to send a request head.
    pub header_timeout: Duration,
    /// How long a forwarded request may wait for its response head
    /// (Cilium's `http-request-timeout`); then the client gets 504 and the
    /// upstream connection is closed. Counted from the end of the request
    /// on the direct HTTP/1.1 path, from its start on the general one
    /// (hyper streams the body). Zero: no limit.
    pub request_timeout: Duration,
    /// What `%2F` and `%5C` in a request's path get.
    pub escaped_slashes: crate::rules::EscapedSlashes,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            from_mark: 0,
            connect_timeout: Duration::from_secs(2),
            header_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(3600),
            escaped_slashes: Default::default(),
        }
    }
}

/// Accepts redirected connections until the listener fails. Each
/// connection goes to the worker pinned to the CPU it arrived on (else
/// round-robin; no workers: this runtime) and stays there.
pub async fn serve(
    listener: std::net::TcpListener,
    policy: Arc<dyn Policy>,
    config: Config,
    stats: Arc<Stats>,
    workers: Vec<crate::workers::Worker>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::from_std(listener)?;
    let config = Arc::new(config);
    // Topic IDs the brokers' metadata named, for every Kafka connection.
    let topic_ids = Arc::new(crate::kafka::wire::TopicIds::default());
    let mut router = crate::workers::Router::new(if workers.is_empty() {
        vec![crate::workers::Worker {
            cpu: None,
            handle: tokio::runtime::Handle::current(),
        }]
    } else {
        workers
    });
    loop {
        let (stream, client, dst) = crate::socket::accept(&listener).await;
        stats.connections.inc();
        let Some(conn) = policy.connection(client, dst) else {
            stats.connections_refused.inc();
            continue;
        };
        // The socket moves to its worker's own event loop.
        let Ok(stream) = stream.into_std() else {
            continue;
        };
        let worker = router.pick(crate::workers::incoming_cpu(&stream));
        if conn.kafka.is_some() {
            let kafka = Arc::new(crate::kafka::KafkaConn::new(
                client,
                dst,
                conn,
                policy.clone(),
                config.clone(),
                stats.clone(),
                topic_ids.clone(),
            ));
            worker.handle.spawn(async move {
                if let Ok(stream) = tokio::net::TcpStream::from_std(stream) {
                    kafka.serve(stream).await;
                }
            });
            continue;
        }
        let state = Arc::new(Conn {
            client,
            dst,
            ingress: conn.ingress(),
            allowed_by: conn.allowed_by(),
            conn,
            policy: policy.clone(),
            config: config.clone(),
            stats: stats.clone(),
            upstream: tokio::sync::Mutex::new(None),
        });
        worker.handle.spawn(async move {
            if let Ok(stream) = tokio::net::TcpStream::from_std(stream) {
                state.serve(stream).await;
            }
        });
    }
}

enum Upstream {
    H1(hyper::client::conn::http1::SendRequest<Incoming>),
    H2(hyper::client::conn::http2::SendRequest<Incoming>),
}

/// One client connection and its upstream.
struct Conn {
    client: SocketAddrV4,
    dst: SocketAddrV4,
    /// The flows' direction: INGRESS when the server's policy redirected
    /// the connection (or none restricts it any more), else EGRESS.
    ingress: bool,
    /// Attribution of forwarded requests (every side allowed them).
    allowed_by: Arc<[(bool, flow::record::SharedPolicyRef)]>,
    conn: Connection,
    policy: Arc<dyn Policy>,
    config: Arc<Config>,
    stats: Arc<Stats>,
    upstream: tokio::sync::Mutex<Option<Upstream>>,
}

/// Header values that never reach flows.
const REDACTED_HEADERS: [&str; 3] = ["authorization", "proxy-authorization", "cookie"];

fn flow_headers(h: &HeaderMap) -> Vec<flow::record::HttpHeader> {
    h.iter()
        .map(|(k, v)| flow::record::HttpHeader {
            key: k.as_str().to_string(),
            value: if REDACTED_HEADERS.contains(&k.as_str()) {
                "HUBBLE_REDACTED".into()
            } else {
                String::from_utf8_lossy(v.as_bytes()).into_owned()
            },
        })
        .collect()
}

/// `http://{host}{path}`, the flows' URL, and where its host ends: the
/// rules see its host (`url[7..end]`) and path (`url[end..]`), so the three
/// take one allocation.
fn flow_url(host: &str, path: &str) -> (String, usize) {
    let mut url = String::with_capacity(7 + host.len() + path.len());
    url.push_str("http://");
    url.push_str(host);
    url.push_str(path);
    (url, 7 + host.len())
}

/// The flows of a request (with its headers as they came) and of its
/// response (the same method and URL, no headers).
fn request_flows(
    method: flow::record::Text,
    url: String,
    protocol: &'static str,
    headers: &HeaderMap,
) -> (flow::record::Http, flow::record::Http) {
    let response = flow::record::Http {
        code: 0,
        method,
        url,
        protocol: protocol.into(),
        headers: Vec::new(),
    };
    let request = flow::record::Http {
        headers: flow_headers(headers),
        ..response.clone()
    };
    (request, response)
}

/// The body of a 400 for a request target the proxy refuses.
pub(crate) const BAD_TARGET_BODY: &str =
    "Bad request: the path is ambiguous (encoded slash, fragment or bad encoding)\r\n";

/// The body of a 400 for a request with more than one Host.
const BAD_HOST_BODY: &str = "Bad request: more than one Host\r\n";

/// HTTP/1: refuses several Host fields (false), and turns an absolute-form
/// request (`GET http://api.example/x`) into origin-form with Host set to
/// the URI's authority, as RFC 9112 §3.2.2 says a server must read it: the
/// rules and the server then see the same host, whatever Host said.
fn single_host<B>(req: &mut Request<B>) -> bool {
    if req.version() == Version::HTTP_2 {
        return true;
    }
    if req.headers().get_all(header::HOST).iter().count() > 1 {
        return false;
    }
    let Some(authority) = req.uri().authority().cloned() else {
        return true;
    };
    let Ok(host) = header::HeaderValue::from_str(authority.as_str()) else {
        return false;
    };
    req.headers_mut().insert(header::HOST, host);
    let mut parts = hyper::http::uri::Parts::default();
    parts.path_and_query = req.uri().path_and_query().cloned();
    match hyper::Uri::from_parts(parts) {
        Ok(origin) => {
            *req.uri_mut() = origin;
            true
        }
        Err(_) => false,
    }
}

/// Whether an HTTP/1 request's upgrade may happen: WebSocket only, as
/// Envoy allows by default. Any other (`h2c`, say, after which the
/// connection would carry HTTP/2 requests no rule saw) is taken out of the
/// request (`Upgrade`, the `upgrade` token of `Connection`,
/// `HTTP2-Settings`), so the server answers it in HTTP/1.1 and the
/// connection stays one the proxy reads.
fn websocket_upgrade<B>(req: &mut Request<B>) -> bool {
    if req.version() == Version::HTTP_2 {
        return false;
    }
    let headers = req.headers();
    let asked = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"upgrade"));
    if !headers.contains_key(header::UPGRADE) && !asked {
        return false;
    }
    let mut protocols = headers
        .get_all(header::UPGRADE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(|t| t.trim_ascii());
    let websocket = matches!(
        (protocols.next(), protocols.next()),
        (Some(p), None) if p.eq_ignore_ascii_case(b"websocket")
    );
    if asked && websocket && req.method() == hyper::Method::GET {
        return true;
    }
    let headers = req.headers_mut();
    headers.remove(header::UPGRADE);
    headers.remove("http2-settings");
    let kept: Vec<String> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(|t| String::from_utf8_lossy(t.trim_ascii()).into_owned())
        .filter(|t| !t.is_empty() && !t.eq_ignore_ascii_case("upgrade"))
        .collect();
    headers.remove(header::CONNECTION);
    if let Ok(v) = header::HeaderValue::from_str(&kept.join(", ")) {
        if !kept.is_empty() {
            headers.insert(header::CONNECTION, v);
        }
    }
    false
}

/// Joins a client connection and its server's after both agreed to a
/// WebSocket upgrade: bytes flow both ways until either side closes.
fn tunnel(client: hyper::upgrade::OnUpgrade, server: hyper::upgrade::OnUpgrade) {
    tokio::spawn(async move {
        let (Ok(client), Ok(server)) = (client.await, server.await) else {
            return;
        };
        let (mut client, mut server) = (TokioIo::new(client), TokioIo::new(server));
        if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut server).await {
            tracing::debug!(error = %e, "upgraded connection ended");
        }
    });
}

/// The flow header that shows a request's target as the client sent it,
/// when the proxy checked and forwarded its canonical form instead (Envoy
/// keeps a rewritten path in `x-envoy-original-path` the same way): an
/// operator sees the attempt (`hubble observe --http-header
/// x-fibril-original-path:...`, or `-o json`).
pub const ORIGINAL_PATH_HEADER: &str = "x-fibril-original-path";

/// Replaces `req`'s path by its canonical form (`rules::canonical_target`)
/// and returns the one it replaced, or says why it is refused.
fn canonicalize<B>(
    req: &mut Request<B>,
    escaped_slashes: crate::rules::EscapedSlashes,
) -> Result<Option<String>, crate::rules::TargetError> {
    let target = req.uri().path_and_query().map_or("/", |p| p.as_str());
    let canonical = match crate::rules::canonical_target(target, escaped_slashes)? {
        std::borrow::Cow::Borrowed(_) => return Ok(None),
        std::borrow::Cow::Owned(c) => c,
    };
    let original = target.to_string();
    let mut parts = req.uri().clone().into_parts();
    parts.path_and_query = Some(
        canonical
            .parse()
            .map_err(|_| crate::rules::TargetError::BadCharacter)?,
    );
    *req.uri_mut() =
        hyper::Uri::from_parts(parts).map_err(|_| crate::rules::TargetError::BadCharacter)?;
    Ok(Some(original))
}

fn text(status: StatusCode, body: &'static str) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from_static(body.as_bytes()))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, "text/plain".parse().expect("static"));
    r.headers_mut().insert(
        header::CONTENT_LENGTH,
        body.len().to_string().parse().expect("digits"),
    );
    r
}

pub(crate) fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64
}

impl Conn {
    async fn serve(self: Arc<Self>, stream: tokio::net::TcpStream) {
        stream.set_nodelay(true).ok();
        match self.serve_direct(stream).await {
            h1::End::Done => {}
            h1::End::Fallback(stream, read) => self.serve_hyper(h1::Rewind { read, stream }).await,
        }
    }

    /// The general path: hyper's server, for HTTP/2 and whatever the
    /// direct path leaves to it.
    async fn serve_hyper(self: Arc<Self>, stream: h1::Rewind) {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(self.config.header_timeout)
            .max_buf_size(MAX_HEADER_BYTES)
            .keep_alive(true)
            // Not `pipeline_flush`: it drops the 400 hyper writes for a
            // head it cannot parse (the connection ends unflushed).
            .pipeline_flush(false);
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(MAX_HEADER_BYTES as u32);
        let this = self.clone();
        let service = hyper::service::service_fn(move |req| {
            let this = this.clone();
            async move { Ok::<_, Infallible>(this.request(req).await) }
        });
        if let Err(e) = builder
            .serve_connection_with_upgrades(TokioIo::new(stream), service)
            .await
        {
            let parse = e
                .downcast_ref::<hyper::Error>()
                .is_some_and(|h| h.is_parse() || h.is_parse_too_large() || h.is_parse_status());
            let h2_protocol = e.downcast_ref::<hyper::Error>().is_some_and(|h| {
                std::error::Error::source(h)
                    .and_then(|s| s.downcast_ref::<h2_error::H2Error>())
                    .is_some()
            });
            if parse || h2_protocol {
                self.stats.malformed.inc();
            }
            tracing::debug!(client = %self.client, error = %e, "proxied connection ended");
        }
    }

    /// What every side's rules say of a request: the header edits of the
    /// rules allowing it, or the side refusing it.
    fn check(&self, view: &RequestView<'_>) -> Result<Vec<HeaderEdit>, &crate::Side> {
        let mut edits = Vec::new();
        for side in &self.conn.sides {
            edits.extend(side.rules.check(view).ok_or(side)?);
        }
        Ok(edits)
    }

    /// The flows' URL of `req` and where its host ends (`flow_url`): the
    /// host from the URI, else Host, else the server's address.
    fn flow_url<B>(&self, req: &Request<B>) -> (String, usize) {
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str());
        let host = req.uri().authority().map(|a| a.as_str()).or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
        });
        match host {
            Some(host) => flow_url(host, path),
            None => flow_url(&self.dst.to_string(), path),
        }
    }

    /// Counts and reports a request refused with 400 for its target, before
    /// any rule (the URL holds the target as it came).
    fn bad_target(&self, request: flow::record::Http) {
        self.stats.malformed.inc();
        self.record(false, Verdict::DROPPED, request, 0, Arc::new([]));
    }

    /// Counts and reports a request `side` refused.
    fn refused(&self, side: &crate::Side, request: flow::record::Http) {
        self.stats.requests_denied.inc();
        self.record(
            false,
            Verdict::DROPPED,
            request,
            0,
            Arc::new([(side.ingress, side.policy.clone())]),
        );
    }

    /// Reports a request (`is_reply` false) or its response.
    fn record(
        &self,
        is_reply: bool,
        verdict: Verdict,
        http: flow::record::Http,
        latency_ns: u64,
        by: Arc<[(bool, flow::record::SharedPolicyRef)]>,
    ) {
        self.policy.record(flow::record::L7Record {
            unix_ns: now_ns(),
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
                http: Some(http),
                kafka: None,
            },
            decided_by: by,
            protocol: 6,
        });
    }

    async fn request(&self, mut req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let protocol = match req.version() {
            Version::HTTP_2 => "HTTP/2",
            Version::HTTP_10 => "HTTP/1.0",
            _ => "HTTP/1.1",
        };
        // One Host, the one the rules check and the server gets.
        if !single_host(&mut req) {
            self.stats.malformed.inc();
            return text(StatusCode::BAD_REQUEST, BAD_HOST_BODY);
        }
        // The path the rules check is the one the server gets.
        let canonical = canonicalize(&mut req, self.config.escaped_slashes);
        let (url, host_end) = self.flow_url(&req);
        let original = match canonical {
            Ok(original) => original,
            Err(e) => {
                tracing::debug!(client = %self.client, error = %e, "request target refused");
                let method = flow::record::http_method(req.method().as_str());
                self.bad_target(request_flows(method, url, protocol, req.headers()).0);
                let body = http_body_util::Limited::new(req.into_body(), DRAIN_LIMIT);
                let mut resp = text(StatusCode::BAD_REQUEST, BAD_TARGET_BODY);
                if body.collect().await.is_err() {
                    resp.headers_mut()
                        .insert(header::CONNECTION, "close".parse().expect("static"));
                }
                return resp;
            }
        };
        let view = RequestView {
            method: req.method().as_str(),
            path: &url[host_end..],
            host: &url[7..host_end],
            headers: req.headers(),
        };
        let verdict = self.check(&view);
        let (mut request, mut http) = request_flows(
            flow::record::http_method(req.method().as_str()),
            url,
            protocol,
            req.headers(),
        );
        if let Some(original) = original {
            request.headers.push(flow::record::HttpHeader {
                key: ORIGINAL_PATH_HEADER.into(),
                value: original,
            });
        }
        let edits = match verdict {
            Ok(edits) => edits,
            Err(side) => {
                self.refused(side, request);
                // Read the refused request's body (up to a limit), so
                // that the connection stays usable for the next request.
                let mut resp = text(StatusCode::FORBIDDEN, "Access denied\r\n");
                let body = http_body_util::Limited::new(req.into_body(), DRAIN_LIMIT);
                if body.collect().await.is_err() {
                    resp.headers_mut()
                        .insert(header::CONNECTION, "close".parse().expect("static"));
                }
                return resp;
            }
        };
        for e in edits {
            match e {
                HeaderEdit::Add(n, v) => {
                    req.headers_mut().append(n, v);
                }
                HeaderEdit::Set(n, v) => {
                    req.headers_mut().insert(n, v);
                }
                HeaderEdit::Remove(n) => {
                    req.headers_mut().remove(n);
                }
                HeaderEdit::Log(n) => {
                    tracing::info!(client = %self.client, header = %n, "headerMatches mismatch (LOG)")
                }
            }
        }
        self.stats.requests_forwarded.inc();
        self.record(
            false,
            Verdict::FORWARDED,
            request,
            0,
            self.allowed_by.clone(),
        );

        let h1 = req.version() != Version::HTTP_2;
        // The client's side of an allowed WebSocket upgrade, taken before
        // the request goes.
        let upgrade = websocket_upgrade(&mut req).then(|| hyper::upgrade::on(&mut req));
        let limit = self.config.request_timeout;
        let forwarded = if limit.is_zero() {
            Some(self.forward(req).await)
        } else {
            tokio::time::timeout(limit, self.forward(req)).await.ok()
        };
        let resp = match forwarded {
            Some(Ok(mut r)) if r.status() == StatusCode::SWITCHING_PROTOCOLS => {
                // The upstream connection is the tunnel's now, or (a 101
                // to a request that asked for no upgrade, or for one the
                // proxy took out) no longer HTTP: never reused.
                *self.upstream.lock().await = None;
                match upgrade {
                    Some(client) => {
                        self.stats.upgrades.inc();
                        tunnel(client, hyper::upgrade::on(&mut r));
                        r.map(|b| b.boxed())
                    }
                    None => {
                        tracing::debug!(server = %self.dst, "101 to a request that asked for no upgrade");
                        self.stats.upstream_errors.inc();
                        text(StatusCode::SERVICE_UNAVAILABLE, UPSTREAM_ERROR_BODY)
                    }
                }
            }
            Some(Ok(r)) => r.map(|b| b.boxed()),
            Some(Err(Forward::Upstream(e))) => {
                tracing::debug!(server = %self.dst, error = %e, "upstream");
                self.stats.upstream_errors.inc();
                text(StatusCode::SERVICE_UNAVAILABLE, UPSTREAM_ERROR_BODY)
            }
            Some(Err(Forward::ClientBody(e))) => {
                // The server saw a request cut short: never reused.
                tracing::debug!(client = %self.client, error = %e, "request body");
                *self.upstream.lock().await = None;
                self.stats.malformed.inc();
                let mut resp = text(StatusCode::BAD_REQUEST, BAD_BODY);
                resp.headers_mut()
                    .insert(header::CONNECTION, "close".parse().expect("static"));
                resp
            }
            None => {
                self.stats.request_timeouts.inc();
                if h1 {
                    // Its answer may still come: the connection is not
                    // reused. (An HTTP/2 stream was reset by the drop.)
                    *self.upstream.lock().await = None;
                }
                text(StatusCode::GATEWAY_TIMEOUT, REQUEST_TIMEOUT_BODY)
            }
        };
        http.code = resp.status().as_u16() as u32;
        let latency_ns = started.elapsed().as_nanos().max(1) as u64;
        self.record(
            true,
            Verdict::FORWARDED,
            http,
            latency_ns,
            self.allowed_by.clone(),
        );
        resp
    }

    /// Sends the request on this connection's upstream, (re)connecting
    /// when there is none or the server closed it.
    async fn forward(&self, req: Request<Incoming>) -> Result<Response<Incoming>, Forward> {
        let h2 = req.version() == Version::HTTP_2;
        let mut guard = self.upstream.lock().await;
        let usable = match guard.as_mut() {
            Some(Upstream::H1(s)) => !h2 && s.ready().await.is_ok(),
            Some(Upstream::H2(s)) => h2 && s.ready().await.is_ok(),
            None => false,
        };
        if !usable {
            *guard = Some(self.connect(h2).await.map_err(Forward::Upstream)?);
        }
        match guard.as_mut() {
            Some(Upstream::H1(s)) => s.send_request(req).await.map_err(Forward::from),
            Some(Upstream::H2(s)) => {
                let mut s = s.clone();
                drop(guard);
                s.send_request(req).await.map_err(Forward::from)
            }
            None => Err(Forward::Upstream("no upstream".into())),
        }
    }

    /// A connection to the server (from the client's address when
    /// transparent), within the connect timeout.
    async fn dial(&self) -> Result<tokio::net::TcpStream, String> {
        crate::socket::dial(
            *self.client.ip(),
            self.dst,
            self.conn.transparent,
            self.config.from_mark,
            self.config.connect_timeout,
        )
        .await
    }

    async fn connect(&self, h2: bool) -> Result<Upstream, String> {
        let stream = self.dial().await?;
        let io = TokioIo::new(stream);
        if h2 {
            let (send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .handshake(io)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn);
            Ok(Upstream::H2(send))
        } else {
            let (send, conn) = hyper::client::conn::http1::handshake(io)
                .await
                .map_err(|e| e.to_string())?;
            tokio::spawn(conn.with_upgrades());
            Ok(Upstream::H1(send))
        }
    }
}

/// Why a forwarded request got no response.
enum Forward {
    /// The server could not be reached, or failed.
    Upstream(String),
    /// The client's body broke off or was malformed (a bad chunk, say).
    ClientBody(hyper::Error),
}

impl From<hyper::Error> for Forward {
    fn from(e: hyper::Error) -> Self {
        if e.is_user() {
            Forward::ClientBody(e)
        } else {
            Forward::Upstream(e.to_string())
        }
    }
}

/// The body of a 400 for a request whose body is malformed.
const BAD_BODY: &str = "Bad request: malformed body\r\n";

/// HTTP/2 protocol errors, as hyper reports them (its `h2` source).
mod h2_error {
    pub type H2Error = h2::Error;
}
