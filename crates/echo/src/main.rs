//! fibril-echo: the programs lab pods run. Servers log every accepted
//! connection (so tests can tell whether a connection ever reached the
//! socket); clients exit non-zero when they fail.
#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Parser, Subcommand};
// Threads placed as the L7 proxy places its own (bench `--spread`,
// `--cpu-affine`).
use proxy::workers;

mod dns;
mod http;
mod kafka;
mod sidecar;

#[derive(Parser)]
#[command(name = "fibril-echo")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// HTTP/1.1 server answering every request with 200 and a short body
    /// (framing as RFC 9112 says; see `http.rs`).
    HttpServer {
        #[arg(long)]
        port: u16,
        /// Run each connection's thread on the CPU its handshake arrived on
        /// (the client's), as a server tuned with per-CPU workers and
        /// SO_INCOMING_CPU steering does.
        #[arg(long)]
        cpu_affine: bool,
    },
    /// HTTP/2 server (cleartext, prior knowledge: what gRPC speaks)
    /// answering every request with 200 and a short body.
    H2Server {
        #[arg(long)]
        port: u16,
    },
    /// GET a URL (http://host:port/path); prints the status line.
    HttpGet {
        url: String,
        #[arg(long, default_value_t = 3.0)]
        timeout: f64,
        /// Connect from this source port, and close with a RST so that no
        /// TIME_WAIT holds it: the next run can reuse the same tuple (how
        /// tests check that a reused tuple meets policy again).
        #[arg(long)]
        local_port: Option<u16>,
    },
    /// HTTP/1.1 load: `connections` keep-alive connections sending GETs
    /// back to back for `seconds`; prints the request rate and the p50/p99
    /// latency.
    HttpLoad {
        url: String,
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        #[arg(long, default_value_t = 4)]
        connections: usize,
        /// Run connection i's thread on the i-th CPU this process may use
        /// (round-robin), instead of wherever the scheduler starts it.
        #[arg(long)]
        spread: bool,
        /// Each request on a connection of its own, closed with a RST once
        /// answered (no TIME_WAIT): the rate is then new connections a
        /// second (netperf's TCP_CRR), what a service's first-packet path
        /// costs. `connections` is then the number of clients.
        #[arg(long)]
        new_connections: bool,
    },
    /// A small authoritative DNS server (UDP and TCP): A records given as
    /// `--record name=address`; other names get NXDOMAIN. Logs each query.
    DnsServer {
        #[arg(long, default_value_t = 53)]
        port: u16,
        #[arg(long = "record")]
        records: Vec<String>,
        /// `alias=target`: a query for alias gets a CNAME to target and
        /// target's A records.
        #[arg(long = "cname")]
        cnames: Vec<String>,
        /// `owner=address`: an A record for owner added to every answer
        /// (as a hostile or broken resolver sends records nobody asked for).
        #[arg(long = "extra")]
        extras: Vec<String>,
        #[arg(long, default_value_t = 300)]
        ttl: u32,
    },
    /// One DNS query (type A); prints `rcode NAME` and `address A.B.C.D`
    /// lines; exits non-zero when no answer arrives.
    DnsQuery {
        server: String,
        name: String,
        /// More questions in the same message (resolvers refuse that).
        #[arg(long = "also")]
        also: Vec<String>,
        #[arg(long)]
        tcp: bool,
        /// Seconds per attempt.
        #[arg(long, default_value_t = 3.0)]
        timeout: f64,
        /// UDP attempts, as a stub resolver makes (resolv.conf `attempts`,
        /// 2 by default).
        #[arg(long, default_value_t = 2)]
        attempts: u32,
    },
    /// DNS load over UDP: `concurrency` clients querying back to back for
    /// `seconds`; prints the query rate and the p50/p99 latency.
    DnsLoad {
        server: String,
        name: String,
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
    },
    /// UDP echo server.
    UdpServer {
        #[arg(long)]
        port: u16,
    },
    /// Sends one datagram and waits for the echo.
    UdpSend {
        addr: String,
        #[arg(long, default_value = "ping")]
        message: String,
        /// Send this many bytes (a pattern) instead of the message, and
        /// check that the echo is the same: large datagrams go fragmented.
        #[arg(long)]
        size: Option<usize>,
        #[arg(long, default_value_t = 3.0)]
        timeout: f64,
    },
    /// UDP datagrams to `addr`'s host on every port in turn from
    /// `sockets` sockets, as fast as it can for `seconds` (two datagrams per
    /// flow); prints `sent N`. For conntrack flood tests.
    UdpFlood {
        addr: String,
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        #[arg(long, default_value_t = 8)]
        sockets: usize,
    },
    /// The real Apache Kafka broker (one KRaft node) from the jars in
    /// `lib` (`cargo xtask deps` fetches them), advertising this
    /// namespace's address; its data in `data`. Becomes the broker's JVM.
    KafkaBroker {
        #[arg(long)]
        lib: std::path::PathBuf,
        #[arg(long)]
        data: std::path::PathBuf,
        #[arg(long, default_value_t = 9092)]
        port: u16,
        /// The JVM's heap, in MiB.
        #[arg(long, default_value_t = 512)]
        heap_mb: u32,
    },
    /// One record to each topic in turn on one connection (ApiVersions,
    /// then a Produce per topic); prints `produce TOPIC error_code N` per
    /// answer.
    KafkaProduce {
        addr: String,
        #[arg(long = "topic", required = true)]
        topics: Vec<String>,
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
    },
    /// A stand-in for Istio's sidecar (`istio-proxy`) reduced to Envoy's
    /// passthrough: connections Istio's CNI redirection sends to the
    /// outbound and inbound ports are forwarded to their original
    /// destination; each printed as `outbound|inbound PEER -> ORIGINAL`.
    /// Run it as Istio's proxy user (1337).
    SidecarProxy {
        #[arg(long, default_value_t = 15001)]
        outbound_port: u16,
        #[arg(long, default_value_t = 15006)]
        inbound_port: u16,
    },
    /// Accepts TCP connections and, `after` seconds of silence on each,
    /// writes `pushed` (a server that speaks first on an idle connection).
    PushServer {
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = 5.0)]
        after: f64,
    },
    /// Connects and waits for one line from the server; prints it, fails
    /// when none comes within `timeout`.
    TcpWait {
        addr: String,
        #[arg(long, default_value_t = 10.0)]
        timeout: f64,
    },
    /// Request/response and stream server for benchmarks.
    BenchServer {
        #[arg(long)]
        port: u16,
    },
    /// netperf's TCP_CRR server: each connection gets its 1-byte request
    /// answered and is closed, served by a few acceptor threads (no thread
    /// per connection, so the connection path dominates).
    CrrServer {
        #[arg(long)]
        port: u16,
        #[arg(long, default_value_t = 2)]
        threads: usize,
    },
    /// netperf's TCP_CRR: on each of `connections` threads, connect, send
    /// one byte, read the answer, close (RST, no TIME_WAIT), again for
    /// `seconds`; prints `connections_per_sec`.
    BenchCrr {
        addr: String,
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
        #[arg(long, default_value_t = 2)]
        connections: usize,
    },
    /// TCP request/response rate (1-byte ping-pong) for `seconds`.
    BenchRr {
        addr: String,
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
    },
    /// TCP throughput (bulk send) for `seconds`, in bytes/s.
    BenchStream {
        addr: String,
        #[arg(long, default_value_t = 3.0)]
        seconds: f64,
    },
    /// Holds a TCP connection open and sends one request per `interval`
    /// until `seconds` pass; fails as soon as one request fails.
    /// A steady load that counts its failures instead of stopping at the
    /// first: `connections` keep-alive connections sending a GET every
    /// `interval` seconds (a failed one reconnects), and every `interval`
    /// one more request on a new connection. Prints `held_requests`,
    /// `held_failed`, `new_requests`, `new_failed` and `slowest_new_ms`.
    HttpSteady {
        url: String,
        #[arg(long, default_value_t = 5.0)]
        seconds: f64,
        #[arg(long, default_value_t = 2)]
        connections: usize,
        #[arg(long, default_value_t = 0.02)]
        interval: f64,
    },
    HttpHold {
        addr: String,
        #[arg(long, default_value_t = 10.0)]
        seconds: f64,
        #[arg(long, default_value_t = 0.2)]
        interval: f64,
        #[arg(long, default_value = "/hold")]
        path: String,
    },
}

fn say(line: String) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

fn parse_url(url: &str) -> anyhow::Result<(String, String)> {
    let rest = url.strip_prefix("http://").context("only http:// URLs")?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let hostport = if hostport.contains(':') {
        hostport.to_string()
    } else {
        format!("{hostport}:80")
    };
    Ok((hostport, path.to_string()))
}

fn connect(addr: &str, timeout: Duration) -> anyhow::Result<TcpStream> {
    let sa = addr.to_socket_addrs()?.next().context("no address")?;
    let s = TcpStream::connect_timeout(&sa, timeout).with_context(|| format!("connect {addr}"))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// `connect` whose stream closes with a RST (no TIME_WAIT left behind).
fn connect_rst(addr: &str, timeout: Duration) -> anyhow::Result<TcpStream> {
    let s = connect(addr, timeout)?;
    socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO))?;
    Ok(s)
}

/// `connect` from a fixed source port; the stream closes with a RST.
fn connect_from(addr: &str, port: u16, timeout: Duration) -> anyhow::Result<TcpStream> {
    use socket2::{Domain, Socket, Type};
    let sa = addr.to_socket_addrs()?.next().context("no address")?;
    let s = Socket::new(Domain::for_address(sa), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.set_linger(Some(Duration::ZERO))?;
    s.bind(&std::net::SocketAddr::new([0, 0, 0, 0].into(), port).into())
        .with_context(|| format!("bind source port {port}"))?;
    s.connect_timeout(&sa.into(), timeout)
        .with_context(|| format!("connect {addr} from port {port}"))?;
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(timeout))?;
    s.set_nodelay(true)?;
    Ok(s)
}

fn http_request(
    s: &mut TcpStream,
    r: &mut BufReader<TcpStream>,
    host: &str,
    path: &str,
) -> anyhow::Result<String> {
    // One write per request (write! on a socket would send each piece).
    let request = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: fibril-echo\r\n\r\n");
    s.write_all(request.as_bytes())?;
    let mut status = String::new();
    r.read_line(&mut status)?;
    let mut len = 0usize;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 {
            bail!("connection closed in headers");
        }
        if h == "\r\n" {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0u8; len];
    r.read_exact(&mut body)?;
    Ok(status.trim().to_string())
}

fn http_get(url: &str, timeout: f64, local_port: Option<u16>) -> anyhow::Result<()> {
    let (hostport, path) = parse_url(url)?;
    let timeout = Duration::from_secs_f64(timeout);
    let mut s = match local_port {
        Some(port) => connect_from(&hostport, port, timeout)?,
        None => connect(&hostport, timeout)?,
    };
    let mut r = BufReader::new(s.try_clone()?);
    let status = http_request(&mut s, &mut r, &hostport, &path)?;
    say(status.clone());
    if !status.contains(" 2") {
        bail!("HTTP status {status}");
    }
    Ok(())
}

fn http_hold(addr: &str, seconds: f64, interval: f64, path: &str) -> anyhow::Result<()> {
    let mut s = connect(addr, Duration::from_secs(3))?;
    let mut r = BufReader::new(s.try_clone()?);
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let mut n = 0;
    while Instant::now() < end {
        let status = http_request(&mut s, &mut r, addr, path)
            .with_context(|| format!("request {n} on the held connection"))?;
        if !status.contains(" 2") {
            bail!("HTTP status {status}");
        }
        n += 1;
        std::thread::sleep(Duration::from_secs_f64(interval));
    }
    say(format!("held connection: {n} requests ok"));
    Ok(())
}

fn http_steady(url: &str, seconds: f64, connections: usize, interval: f64) -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
    let (hostport, path) = parse_url(url)?;
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let pause = Duration::from_secs_f64(interval);
    let counts: std::sync::Arc<[AtomicU64; 5]> = Default::default();
    let one = |s: &mut TcpStream, r: &mut BufReader<TcpStream>| -> anyhow::Result<()> {
        let status = http_request(s, r, &hostport, &path)?;
        if !status.contains(" 2") {
            bail!("HTTP status {status}");
        }
        Ok(())
    };
    let connect_one = || -> anyhow::Result<(TcpStream, BufReader<TcpStream>)> {
        let s = connect(&hostport, Duration::from_secs(3))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))?;
        let r = BufReader::new(s.try_clone()?);
        Ok((s, r))
    };
    std::thread::scope(|scope| {
        for _ in 0..connections.max(1) {
            let counts = counts.clone();
            scope.spawn(move || {
                let mut held = None;
                while Instant::now() < end {
                    let ok = match held.as_mut() {
                        Some((s, r)) => one(s, r).is_ok(),
                        None => connect_one()
                            .and_then(|(mut s, mut r)| {
                                one(&mut s, &mut r)?;
                                held = Some((s, r));
                                Ok(())
                            })
                            .is_ok(),
                    };
                    counts[0].fetch_add(1, Relaxed);
                    if !ok {
                        counts[1].fetch_add(1, Relaxed);
                        held = None;
                    }
                    std::thread::sleep(pause);
                }
            });
        }
        let counts = counts.clone();
        scope.spawn(move || {
            while Instant::now() < end {
                let started = Instant::now();
                let ok = connect_one()
                    .and_then(|(mut s, mut r)| one(&mut s, &mut r))
                    .is_ok();
                let ms = started.elapsed().as_millis() as u64;
                counts[2].fetch_add(1, Relaxed);
                counts[3].fetch_add(u64::from(!ok), Relaxed);
                counts[4].fetch_max(ms, Relaxed);
                std::thread::sleep(pause);
            }
        });
    });
    let [held, held_failed, new, new_failed, slowest] = counts.each_ref().map(|c| c.load(Relaxed));
    say(format!("held_requests {held}"));
    say(format!("held_failed {held_failed}"));
    say(format!("new_requests {new}"));
    say(format!("new_failed {new_failed}"));
    say(format!("slowest_new_ms {slowest}"));
    Ok(())
}

fn http_load(
    url: &str,
    seconds: f64,
    connections: usize,
    spread: bool,
    new_connections: bool,
) -> anyhow::Result<()> {
    let (hostport, path) = parse_url(url)?;
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let started = Instant::now();
    let cpus = if spread {
        workers::allowed_cpus()
    } else {
        Vec::new()
    };
    let workers: Vec<_> = (0..connections.max(1))
        .map(|i| {
            let (hostport, path) = (hostport.clone(), path.clone());
            let cpu = (!cpus.is_empty()).then(|| cpus[i % cpus.len()]);
            std::thread::spawn(move || -> anyhow::Result<Vec<u32>> {
                // Before connecting: the handshake is then processed on
                // this CPU, which is what servers and the proxy steer by.
                if let Some(cpu) = cpu {
                    workers::pin_current_thread(cpu)
                        .with_context(|| format!("run on CPU {cpu}"))?;
                }
                let mut lat = Vec::with_capacity(1 << 16);
                if new_connections {
                    while Instant::now() < end {
                        let t = Instant::now();
                        let mut s = connect_rst(&hostport, Duration::from_secs(3))?;
                        let mut r = BufReader::new(s.try_clone()?);
                        let status = http_request(&mut s, &mut r, &hostport, &path)?;
                        if !status.contains(" 2") {
                            bail!("HTTP status {status}");
                        }
                        lat.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                    }
                    return Ok(lat);
                }
                let mut s = connect(&hostport, Duration::from_secs(3))?;
                let mut r = BufReader::new(s.try_clone()?);
                while Instant::now() < end {
                    let t = Instant::now();
                    let status = http_request(&mut s, &mut r, &hostport, &path)?;
                    if !status.contains(" 2") {
                        bail!("HTTP status {status}");
                    }
                    lat.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32);
                }
                Ok(lat)
            })
        })
        .collect();
    let mut all = Vec::new();
    for w in workers {
        all.extend(w.join().map_err(|_| anyhow::anyhow!("worker panicked"))??);
    }
    report_latencies("requests", &mut all, started.elapsed().as_secs_f64());
    Ok(())
}

/// Prints `{what} N`, `{what}_per_sec R`, `p50_us` and `p99_us` for a
/// load run's latencies (microseconds).
pub(crate) fn report_latencies(what: &str, all: &mut [u32], elapsed_s: f64) {
    all.sort_unstable();
    let pct = |p: f64| {
        all.get(((all.len() as f64 * p) as usize).min(all.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0)
    };
    say(format!("{what} {}", all.len()));
    say(format!(
        "{what}_per_sec {:.0}",
        all.len() as f64 / elapsed_s
    ));
    say(format!("p50_us {}", pct(0.50)));
    say(format!("p99_us {}", pct(0.99)));
}

fn udp_server(port: u16) -> anyhow::Result<()> {
    let s = UdpSocket::bind(("0.0.0.0", port))?;
    say(format!("listening on udp :{port}"));
    let mut buf = vec![0u8; 65_535];
    loop {
        let (n, peer) = s.recv_from(&mut buf)?;
        say(format!("datagram of {n} bytes from {peer}"));
        s.send_to(&buf[..n], peer)?;
    }
}

fn udp_send(addr: &str, msg: &str, size: Option<usize>, timeout: f64) -> anyhow::Result<()> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.set_read_timeout(Some(Duration::from_secs_f64(timeout)))?;
    let payload: Vec<u8> = match size {
        Some(n) => (0..n).map(test_support::pattern_byte).collect(),
        None => msg.as_bytes().to_vec(),
    };
    s.send_to(&payload, addr)?;
    let mut buf = vec![0u8; 65_535];
    let (n, _) = s.recv_from(&mut buf).context("no echo")?;
    if size.is_some() {
        if buf[..n] != payload[..] {
            bail!("the echo differs: {n} bytes back of {}", payload.len());
        }
        say(format!("echo {n} bytes"));
    } else {
        say(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    Ok(())
}

fn udp_flood(addr: &str, seconds: f64, sockets: usize) -> anyhow::Result<()> {
    let host: std::net::IpAddr = addr
        .split(':')
        .next()
        .unwrap_or(addr)
        .parse()
        .with_context(|| format!("{addr}: expected an address"))?;
    let socks: Vec<UdpSocket> = (0..sockets.max(1))
        .map(|_| UdpSocket::bind("0.0.0.0:0"))
        .collect::<Result<_, _>>()?;
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let mut sent = 0u64;
    let mut port: u16 = 1;
    while Instant::now() < end {
        for _ in 0..256 {
            for s in &socks {
                // Twice per flow: its entry is then as recently used as
                // any live connection's, and competes with them for the
                // table. Errors (a full queue, an ICMP error reported
                // back) do not stop the flood.
                for _ in 0..2 {
                    if s.send_to(b"x", (host, port)).is_ok() {
                        sent += 1;
                    }
                }
            }
            port = port.checked_add(1).unwrap_or(1);
        }
    }
    say(format!("sent {sent}"));
    Ok(())
}

fn push_server(port: u16, after: f64) -> anyhow::Result<()> {
    let l = TcpListener::bind(("0.0.0.0", port)).with_context(|| format!("bind :{port}"))?;
    say(format!("listening on :{port}"));
    for conn in l.incoming() {
        let Ok(mut conn) = conn else { continue };
        say(format!(
            "accepted {}",
            conn.peer_addr().map(|a| a.to_string()).unwrap_or_default()
        ));
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_secs_f64(after));
            let pushed = conn.write_all(b"pushed\n").is_ok();
            say(format!("pushed: {pushed}"));
            // Held until the client goes.
            let _ = conn.read(&mut [0u8; 1]);
        });
    }
    Ok(())
}

fn tcp_wait(addr: &str, timeout: f64) -> anyhow::Result<()> {
    let s = connect(addr, Duration::from_secs_f64(timeout))?;
    let mut line = String::new();
    BufReader::new(s)
        .read_line(&mut line)
        .context("nothing from the server")?;
    if line.is_empty() {
        bail!("the server closed the connection");
    }
    say(line.trim().to_string());
    Ok(())
}

fn bench_server(port: u16) -> anyhow::Result<()> {
    let l = TcpListener::bind(("0.0.0.0", port))?;
    for conn in l.incoming() {
        let Ok(mut c) = conn else { continue };
        std::thread::spawn(move || {
            let _ = c.set_nodelay(true);
            let mut buf = vec![0u8; 1 << 16];
            loop {
                match c.read(&mut buf) {
                    Ok(0) | Err(_) => return,
                    // A 1-byte read is a ping: answer it; bulk data is drained.
                    Ok(1) => {
                        if c.write_all(&buf[..1]).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                }
            }
        });
    }
    Ok(())
}

fn crr_server(port: u16, threads: usize) -> anyhow::Result<()> {
    let l = TcpListener::bind(("0.0.0.0", port))?;
    let acceptors: Vec<_> = (0..threads.max(1))
        .map(|_| {
            let l = l.try_clone()?;
            Ok(std::thread::spawn(move || {
                for conn in l.incoming() {
                    let Ok(mut c) = conn else { continue };
                    let _ = c.set_nodelay(true);
                    let mut b = [0u8; 1];
                    if c.read_exact(&mut b).is_ok() {
                        let _ = c.write_all(&b);
                    }
                }
            }))
        })
        .collect::<anyhow::Result<_>>()?;
    for a in acceptors {
        a.join().ok();
    }
    Ok(())
}

fn bench_crr(addr: &str, seconds: f64, connections: usize) -> anyhow::Result<()> {
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let workers: Vec<_> = (0..connections.max(1))
        .map(|_| {
            let addr = addr.to_string();
            std::thread::spawn(move || -> anyhow::Result<u64> {
                let mut n = 0u64;
                let mut b = [0u8; 1];
                while Instant::now() < end {
                    let mut s = connect_rst(&addr, Duration::from_secs(3))?;
                    s.write_all(b"x")?;
                    s.read_exact(&mut b)?;
                    n += 1;
                }
                Ok(n)
            })
        })
        .collect();
    let mut total = 0u64;
    for w in workers {
        total += w
            .join()
            .map_err(|_| anyhow::anyhow!("a client thread panicked"))??;
    }
    say(format!(
        "connections_per_sec {:.0}",
        total as f64 / start.elapsed().as_secs_f64()
    ));
    Ok(())
}

fn bench_rr(addr: &str, seconds: f64) -> anyhow::Result<()> {
    let mut s = connect(addr, Duration::from_secs(3))?;
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let mut n = 0u64;
    let mut b = [0u8; 1];
    while Instant::now() < end {
        s.write_all(b"x")?;
        s.read_exact(&mut b)?;
        n += 1;
    }
    say(format!(
        "rr_per_sec {:.0}",
        n as f64 / start.elapsed().as_secs_f64()
    ));
    Ok(())
}

fn bench_stream(addr: &str, seconds: f64) -> anyhow::Result<()> {
    let mut s = connect(addr, Duration::from_secs(3))?;
    let buf = vec![0x5au8; 1 << 16];
    let end = Instant::now() + Duration::from_secs_f64(seconds);
    let start = Instant::now();
    let mut bytes = 0u64;
    while Instant::now() < end {
        s.write_all(&buf)?;
        bytes += buf.len() as u64;
    }
    say(format!(
        "bytes_per_sec {:.0}",
        bytes as f64 / start.elapsed().as_secs_f64()
    ));
    Ok(())
}

fn h2_server(port: u16) -> anyhow::Result<()> {
    use http_body_util::Full;
    use hyper::body::{Bytes, Incoming};
    use hyper::{Request, Response};
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let l = tokio::net::TcpListener::bind(("0.0.0.0", port))
            .await
            .with_context(|| format!("bind :{port}"))?;
        say(format!("listening on :{port}"));
        loop {
            let (conn, peer) = l.accept().await?;
            say(format!("accepted {peer}"));
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let line = format!("{} {} HTTP/2", req.method(), req.uri().path());
                    say(format!("request {line}"));
                    Ok::<_, std::convert::Infallible>(Response::new(Full::new(Bytes::from(
                        format!("fibril-echo: {line}"),
                    ))))
                });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(conn), service)
                        .await;
            });
        }
    })
}

fn main() {
    let args = Args::parse();
    let r = match args.cmd {
        Cmd::HttpServer { port, cpu_affine } => http::serve(port, cpu_affine),
        Cmd::H2Server { port } => h2_server(port),
        Cmd::DnsServer {
            port,
            records,
            cnames,
            extras,
            ttl,
        } => (|| {
            let zone = dns::Zone {
                records: dns::parse_pairs(&records)?,
                cnames: dns::parse_pairs(&cnames)?,
                extras: dns::parse_pairs(&extras)?,
            };
            dns::server(port, &zone, ttl)
        })(),
        Cmd::DnsLoad {
            server,
            name,
            seconds,
            concurrency,
        } => dns::load(&server, &name, seconds, concurrency),
        Cmd::DnsQuery {
            server,
            name,
            also,
            tcp,
            timeout,
            attempts,
        } => dns::query(&server, &name, &also, tcp, timeout, attempts),
        Cmd::HttpLoad {
            url,
            seconds,
            connections,
            spread,
            new_connections,
        } => http_load(&url, seconds, connections, spread, new_connections),
        Cmd::HttpGet {
            url,
            timeout,
            local_port,
        } => http_get(&url, timeout, local_port),
        Cmd::UdpServer { port } => udp_server(port),
        Cmd::UdpSend {
            addr,
            message,
            size,
            timeout,
        } => udp_send(&addr, &message, size, timeout),
        Cmd::UdpFlood {
            addr,
            seconds,
            sockets,
        } => udp_flood(&addr, seconds, sockets),
        Cmd::PushServer { port, after } => push_server(port, after),
        Cmd::SidecarProxy {
            outbound_port,
            inbound_port,
        } => sidecar::serve(outbound_port, inbound_port),
        Cmd::KafkaBroker {
            lib,
            data,
            port,
            heap_mb,
        } => kafka::broker(&lib, &data, port, heap_mb),
        Cmd::KafkaProduce {
            addr,
            topics,
            timeout,
        } => kafka::produce(&addr, &topics, timeout),
        Cmd::TcpWait { addr, timeout } => tcp_wait(&addr, timeout),
        Cmd::BenchServer { port } => bench_server(port),
        Cmd::CrrServer { port, threads } => crr_server(port, threads),
        Cmd::BenchCrr {
            addr,
            seconds,
            connections,
        } => bench_crr(&addr, seconds, connections),
        Cmd::BenchRr { addr, seconds } => bench_rr(&addr, seconds),
        Cmd::BenchStream { addr, seconds } => bench_stream(&addr, seconds),
        Cmd::HttpSteady {
            url,
            seconds,
            connections,
            interval,
        } => http_steady(&url, seconds, connections, interval),
        Cmd::HttpHold {
            addr,
            seconds,
            interval,
            path,
        } => http_hold(&addr, seconds, interval, &path),
    };
    if let Err(e) = r {
        eprintln!("fibril-echo: {e:#}");
        std::process::exit(1);
    }
}
