//! Prometheus metrics of the agent (`fibril_<subsystem>_<name>`), served in
//! the text exposition format on `/metrics`. A deliberately small HTTP/1.1
//! responder: one request per connection, bounded request size.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use crate::Agent;

/// Renders every metric from the agent's current status.
pub fn render(agent: &Agent) -> String {
    let s = agent.status();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, value: u64| {
        out.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        ));
    };
    metric(
        "fibril_endpoint_endpoints",
        "gauge",
        "Endpoints managed on this node.",
        s.endpoints as u64,
    );
    metric(
        "fibril_identity_identities",
        "gauge",
        "Security identities known (reserved included).",
        s.identities as u64,
    );
    metric(
        "fibril_policy_policies",
        "gauge",
        "Policies imported.",
        s.policies as u64,
    );
    metric(
        "fibril_policy_overflow_endpoints",
        "gauge",
        "Endpoints failing closed because their policy does not fit the policy map.",
        s.policy_overflows as u64,
    );
    metric(
        "fibril_datapath_conntrack_entries",
        "gauge",
        "Connection-tracking entries.",
        s.ct_entries as u64,
    );
    metric(
        "fibril_datapath_conntrack_busiest_endpoint_entries",
        "gauge",
        "Connection-tracking entries the busiest endpoint's traffic holds (of its budget).",
        s.ct_busiest_endpoint as u64,
    );
    metric(
        "fibril_datapath_conntrack_budget_overflows_total",
        "counter",
        "New connections refused because their endpoint's conntrack budget was spent.",
        s.ct_budget_overflows,
    );
    metric(
        "fibril_datapath_events_lost_total",
        "counter",
        "Datapath events lost because the ring buffer was full.",
        s.events_lost_kernel,
    );
    metric(
        "fibril_observer_flows_seen_total",
        "counter",
        "Flows the observer has seen.",
        s.flows_seen,
    );
    metric(
        "fibril_observer_flows_buffered",
        "gauge",
        "Flows in the flow ring.",
        s.flows_buffered as u64,
    );
    metric(
        "fibril_fqdn_names",
        "gauge",
        "DNS names learned for toFQDNs.",
        agent.fqdn.cache().len() as u64,
    );
    metric(
        "fibril_fqdn_ips_refused_total",
        "counter",
        "DNS answer addresses not learned because an endpoint was at --tofqdns-max-ips-per-endpoint.",
        agent.fqdn.refused.load(std::sync::atomic::Ordering::Relaxed),
    );
    if let Some(p) = agent.prefilter.list().ok().filter(|p| p.device.is_some()) {
        metric(
            "fibril_prefilter_dropped_packets_total",
            "counter",
            "Packets the XDP prefilter dropped (a listed source prefix).",
            p.dropped_packets,
        );
        metric(
            "fibril_prefilter_dropped_bytes_total",
            "counter",
            "Bytes of the packets the XDP prefilter dropped.",
            p.dropped_bytes,
        );
        metric(
            "fibril_prefilter_prefixes",
            "gauge",
            "Source prefixes the XDP prefilter drops.",
            p.cidrs.len() as u64,
        );
    }
    for (name, help, value) in agent.proxy_counters() {
        metric(name, "counter", help, value);
    }
    if let Some(s) = agent.datapath().proxy_shortcut_stats() {
        for (name, help, value) in [
            (
                "fibril_proxy_shortcut_sockets_total",
                "Proxied connection ends whose payload goes socket to socket",
                s.sockets,
            ),
            (
                "fibril_proxy_shortcut_redirected_total",
                "Sends moved straight into the other end's receive queue",
                s.redirected,
            ),
            (
                "fibril_proxy_shortcut_plain_total",
                "Sends of shortcut sockets that took the TCP/IP stack (other end not known)",
                s.plain,
            ),
        ] {
            metric(name, "counter", help, value);
        }
    }
    out
}

/// Hubble's flow metrics (`hubble_*`), with the kernel's lost events.
pub fn render_hubble(agent: &Agent) -> String {
    let kernel_lost = agent.datapath().events_lost();
    agent
        .observer
        .metrics
        .render(&[("PERF_EVENT_RING_BUFFER", kernel_lost)])
}

fn answer(
    agent: &Agent,
    render_fn: fn(&Agent) -> String,
    mut conn: TcpStream,
) -> std::io::Result<()> {
    // The whole head within the deadline, however slowly it trickles in.
    let deadline = std::time::Instant::now() + CLIENT_TIMEOUT;
    conn.set_write_timeout(Some(CLIENT_TIMEOUT))?;
    let mut buf = [0u8; 4096];
    let mut len = 0;
    // Read the request head only (no bodies on GET).
    while len < buf.len() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(std::io::ErrorKind::TimedOut.into());
        }
        conn.set_read_timeout(Some(left))?;
        let n = conn.read(&mut buf[len..])?;
        if n == 0 {
            break;
        }
        len += n;
        if buf[..len].windows(4).any(|w| w == b"\r\n\r\n") {
            break;
        }
    }
    let head = String::from_utf8_lossy(&buf[..len]);
    let line = head.lines().next().unwrap_or_default();
    let (status, body, kind) = match line.split_whitespace().collect::<Vec<_>>().as_slice() {
        ["GET", "/metrics", _] => ("200 OK", render_fn(agent), "text/plain; version=0.0.4"),
        ["GET", _, _] => (
            "404 Not Found",
            "not found; try /metrics\n".to_string(),
            "text/plain",
        ),
        _ => ("400 Bad Request", "bad request\n".to_string(), "text/plain"),
    };
    write!(
        conn,
        "HTTP/1.1 {status}\r\nContent-Type: {kind}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

/// How long a metrics client may take to send its request and to read
/// the answer.
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// Clients answered at once; more are closed at once (a scraper retries).
pub const MAX_CLIENTS: usize = 16;

/// Serves `/metrics` (rendered by `render_fn`) until the process ends:
/// each client on a thread of its own (a slow one delays nobody else), at
/// most `MAX_CLIENTS` at once, each within `CLIENT_TIMEOUT`.
pub fn serve(agent: Arc<Agent>, listener: TcpListener, render_fn: fn(&Agent) -> String) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let busy = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let conn = match conn {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "metrics accept");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if busy.fetch_add(1, Ordering::Relaxed) >= MAX_CLIENTS {
            busy.fetch_sub(1, Ordering::Relaxed);
            continue; // dropped: closed
        }
        let (agent, done) = (agent.clone(), busy.clone());
        let spawned = std::thread::Builder::new()
            .name("metrics-client".into())
            .spawn(move || {
                if let Err(e) = answer(&agent, render_fn, conn) {
                    tracing::debug!(error = %e, "metrics client");
                }
                done.fetch_sub(1, Ordering::Relaxed);
            });
        if let Err(e) = spawned {
            busy.fetch_sub(1, Ordering::Relaxed);
            tracing::warn!(error = %e, "metrics: cannot start a client thread");
        }
    }
}
