//! Bounds on what clients of the Hubble API may hold: connections, streams,
//! idle time. Every listener's connections come through `incoming`, which
//!
//! - accepts at most `max_connections` at once, `max_per_client` of one
//!   client: one more is accepted and closed at once (the client sees a
//!   reset, not a hang in the backlog);
//! - backs off after an accept error (out of file descriptors) instead of
//!   spinning on it, and never ends the server over one;
//! - closes a connection that has had no stream open and sent nothing for
//!   `idle_timeout` (a `hubble observe -f` that waits for matching flows
//!   has its stream open, so it is never idle).
//!
//! Streams (GetFlows, GetAgentEvents: one thread each) are counted in total
//! by `Streams`; past `max_streams` a request gets RESOURCE_EXHAUSTED.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_stream::{Stream, StreamExt};
use tonic::transport::server::Connected;

/// The bounds; `Default` is what the agent serves with.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Connections held at once, per listener.
    pub max_connections: usize,
    /// Connections held at once by one client (a TCP peer's address, a
    /// Unix socket peer's process), so that one flooding client leaves
    /// room for the rest.
    pub max_per_client: usize,
    /// Flow and event streams open at once, over every connection.
    pub max_streams: usize,
    /// A connection with no stream open and no bytes from the client for
    /// this long is closed.
    pub idle_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_connections: 256,
            max_per_client: 32,
            max_streams: 64,
            idle_timeout: Duration::from_secs(300),
        }
    }
}

/// How long accept waits after an error.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

/// What a connection shares with the requests it carries: how many of its
/// streams are open (an open stream keeps it from being idle).
#[derive(Debug, Default)]
pub struct ConnState {
    open_streams: AtomicUsize,
}

/// The connection info tonic puts in each request's extensions.
#[derive(Clone, Debug)]
pub struct ConnInfo<I> {
    pub inner: I,
    pub state: Arc<ConnState>,
}

/// Who is at the other end of a connection, for `max_per_client`.
pub trait Client {
    /// The client's key: a TCP peer's address, a Unix peer's pid; `None`
    /// when it cannot be told (then only the total counts).
    fn client(&self) -> Option<String>;
}

impl Client for tokio::net::TcpStream {
    fn client(&self) -> Option<String> {
        self.peer_addr().ok().map(|a| a.ip().to_string())
    }
}

impl Client for tokio::net::UnixStream {
    fn client(&self) -> Option<String> {
        self.peer_cred()
            .ok()
            .and_then(|c| c.pid())
            .map(|p| format!("pid {p}"))
    }
}

/// Open connections of one listener, in total and per client.
#[derive(Debug, Default)]
struct Open {
    total: usize,
    by_client: HashMap<String, usize>,
}

/// A connection's place in `Open`, given back when it closes.
struct Slot {
    open: Arc<Mutex<Open>>,
    client: Option<String>,
}

impl Slot {
    fn take(open: &Arc<Mutex<Open>>, client: Option<String>, limits: &Limits) -> Option<Slot> {
        let mut o = open.lock().unwrap_or_else(|e| e.into_inner());
        if o.total >= limits.max_connections {
            return None;
        }
        if let Some(c) = &client {
            let n = o.by_client.entry(c.clone()).or_default();
            if *n >= limits.max_per_client {
                return None;
            }
            *n += 1;
        }
        o.total += 1;
        Some(Slot {
            open: open.clone(),
            client,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut o = self.open.lock().unwrap_or_else(|e| e.into_inner());
        o.total -= 1;
        if let Some(c) = &self.client {
            if let Some(n) = o.by_client.get_mut(c) {
                *n -= 1;
                if *n == 0 {
                    o.by_client.remove(c);
                }
            }
        }
    }
}

/// A connection under the limits: holds its slot until dropped, and ends
/// (reads EOF) once idle.
pub struct Limited<T> {
    io: T,
    state: Arc<ConnState>,
    idle_timeout: Duration,
    idle: Pin<Box<tokio::time::Sleep>>,
    _slot: Slot,
}

impl<T> Limited<T> {
    fn touch(&mut self) {
        let deadline = tokio::time::Instant::now() + self.idle_timeout;
        self.idle.as_mut().reset(deadline);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Limited<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.io).poll_read(cx, buf) {
            Poll::Ready(r) => {
                if buf.filled().len() > before {
                    self.touch();
                }
                Poll::Ready(r)
            }
            Poll::Pending => {
                while self.idle.as_mut().poll(cx).is_ready() {
                    if self.state.open_streams.load(Ordering::Relaxed) == 0 {
                        // EOF: hyper closes the connection.
                        return Poll::Ready(Ok(()));
                    }
                    self.touch();
                }
                Poll::Pending
            }
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Limited<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<T: Connected> Connected for Limited<T> {
    type ConnectInfo = ConnInfo<T::ConnectInfo>;

    fn connect_info(&self) -> Self::ConnectInfo {
        ConnInfo {
            inner: self.io.connect_info(),
            state: self.state.clone(),
        }
    }
}

/// A TCP listener's connections with Nagle's algorithm off: a stream of
/// flows is many small writes, and Nagle with the peer's delayed ACKs held
/// some back up to 40 ms (seen as the relay's follow latency).
pub fn tcp_nodelay(
    listener: tokio::net::TcpListener,
) -> impl Stream<Item = Result<tokio::net::TcpStream, io::Error>> + Send {
    tokio_stream::StreamExt::map(
        tokio_stream::wrappers::TcpListenerStream::new(listener),
        |conn| {
            conn.inspect(|c| {
                if let Err(e) = c.set_nodelay(true) {
                    tracing::debug!(error = %e, "TCP_NODELAY");
                }
            })
        },
    )
}

/// A listener's connections under `limits` (see the module comment).
/// `incoming` is e.g. a `TcpListenerStream` or a `UnixListenerStream`.
pub fn incoming<S, T>(
    incoming: S,
    limits: Limits,
) -> impl Stream<Item = Result<Limited<T>, io::Error>> + Send
where
    S: Stream<Item = Result<T, io::Error>> + Send + 'static,
    T: Client + Send + 'static,
{
    let open = Arc::new(Mutex::new(Open::default()));
    accept_loop(incoming, move |conn: T| {
        let slot = Slot::take(&open, conn.client(), &limits)?;
        let deadline = tokio::time::Instant::now() + limits.idle_timeout;
        Some(Limited {
            io: conn,
            state: Arc::new(ConnState::default()),
            idle_timeout: limits.idle_timeout,
            idle: Box::pin(tokio::time::sleep_until(deadline)),
            _slot: slot,
        })
    })
}

/// Accepts from `incoming`, backing off after errors, and yields what
/// `admit` makes of each connection (`None`: closed at once).
fn accept_loop<S, T, U>(
    incoming: S,
    admit: impl FnMut(T) -> Option<U> + Send + 'static,
) -> impl Stream<Item = Result<U, io::Error>> + Send
where
    S: Stream<Item = Result<T, io::Error>> + Send + 'static,
    T: Send + 'static,
    U: Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        let mut admit = admit;
        let mut incoming = std::pin::pin!(incoming);
        while let Some(conn) = incoming.next().await {
            match conn {
                Ok(conn) => {
                    if let Some(c) = admit(conn) {
                        if tx.send(Ok(c)).await.is_err() {
                            return;
                        }
                    } else {
                        tracing::warn!("Hubble API: connection limit reached, one refused");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "Hubble API accept");
                    tokio::time::sleep(ACCEPT_BACKOFF).await;
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Open streams over every connection, bounded.
#[derive(Debug)]
pub struct Streams {
    open: Arc<AtomicUsize>,
    max: usize,
}

/// One open stream: counted until dropped (with the stream's thread).
#[derive(Debug)]
pub struct StreamSlot {
    open: Arc<AtomicUsize>,
    conn: Option<Arc<ConnState>>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.open.fetch_sub(1, Ordering::Relaxed);
        if let Some(c) = &self.conn {
            c.open_streams.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Streams {
    pub fn new(max: usize) -> Self {
        Self {
            open: Arc::new(AtomicUsize::new(0)),
            max,
        }
    }

    /// A slot for one more stream on the connection `conn` (its state from
    /// the request's extensions, when it came through `incoming`), or
    /// `None` when `max` are open.
    pub fn open(&self, conn: Option<Arc<ConnState>>) -> Option<StreamSlot> {
        if self.open.fetch_add(1, Ordering::Relaxed) >= self.max {
            self.open.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        if let Some(c) = &conn {
            c.open_streams.fetch_add(1, Ordering::Relaxed);
        }
        Some(StreamSlot {
            open: self.open.clone(),
            conn,
        })
    }

    pub fn max(&self) -> usize {
        self.max
    }
}

/// The connection state of a request that came through `incoming` (any
/// listener, with or without TLS).
pub fn conn_state<T>(req: &tonic::Request<T>) -> Option<Arc<ConnState>> {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo, UdsConnectInfo};
    let ext = req.extensions();
    ext.get::<ConnInfo<TcpConnectInfo>>()
        .map(|c| c.state.clone())
        .or_else(|| {
            ext.get::<ConnInfo<UdsConnectInfo>>()
                .map(|c| c.state.clone())
        })
        .or_else(|| {
            ext.get::<TlsConnectInfo<ConnInfo<TcpConnectInfo>>>()
                .map(|c| c.get_ref().state.clone())
        })
}
