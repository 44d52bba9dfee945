//! The local API server: a Unix socket only root can open, one thread per
//! client, one JSON request per line.
//!
//! Every input is bounded before it costs anything: at most
//! `MAX_CONNECTIONS` clients at once and `MAX_PER_CLIENT` per process
//! (more get an error line and are closed), a request line of at most `MAX_LINE` bytes (longer ones get an
//! error and the connection is closed), a request line must arrive whole
//! within `LINE_TIMEOUT` and a connection may sit idle between requests
//! for `IDLE_TIMEOUT`. Accept errors (out of file descriptors) back off
//! instead of spinning.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api::{Request, Response};

use crate::Agent;

/// Clients served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Connections of one process (its pid, from SO_PEERCRED) at once: one
/// client flooding the socket leaves room for the others (CNI, the CLI).
pub const MAX_PER_CLIENT: usize = 8;
/// The longest request line (a policy import carries whole files).
pub const MAX_LINE: usize = 16 << 20;
/// A request line must arrive whole within this.
pub const LINE_TIMEOUT: Duration = Duration::from_secs(10);
/// A connection with no request for this long is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long accept waits after an error (EMFILE and the like).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

pub fn bind(path: &std::path::Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::remove_file(path).ok();
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

/// Open connections, in total and per client process.
#[derive(Default)]
struct Open {
    total: usize,
    by_pid: HashMap<i32, usize>,
}

/// A connection's place in `Open`, given back when its thread ends.
struct Slot {
    open: Arc<Mutex<Open>>,
    pid: i32,
}

impl Slot {
    /// A slot for a connection of `pid`, or why there is none.
    fn take(open: &Arc<Mutex<Open>>, pid: i32) -> Result<Self, String> {
        let mut o = open.lock().unwrap_or_else(|e| e.into_inner());
        if o.total >= MAX_CONNECTIONS {
            return Err(format!(
                "too many connections to the agent socket (at most {MAX_CONNECTIONS}); try again"
            ));
        }
        let mine = o.by_pid.entry(pid).or_default();
        if *mine >= MAX_PER_CLIENT {
            return Err(format!(
                "too many connections from process {pid} (at most {MAX_PER_CLIENT} per process)"
            ));
        }
        *mine += 1;
        o.total += 1;
        Ok(Slot {
            open: open.clone(),
            pid,
        })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut o = self.open.lock().unwrap_or_else(|e| e.into_inner());
        o.total -= 1;
        if let Some(n) = o.by_pid.get_mut(&self.pid) {
            *n -= 1;
            if *n == 0 {
                o.by_pid.remove(&self.pid);
            }
        }
    }
}

/// The pid of the process at the other end (0 when the kernel does not say).
fn peer_pid(conn: &UnixStream) -> i32 {
    nix::sys::socket::getsockopt(conn, nix::sys::socket::sockopt::PeerCredentials)
        .map(|c| c.pid())
        .unwrap_or(0)
}

/// Serves the local API until the drain starts (its listener shut down).
pub fn serve(agent: Arc<Agent>, listener: UnixListener, drain: crate::drain::Drain) {
    let open = Arc::new(Mutex::new(Open::default()));
    for conn in listener.incoming() {
        if drain.is_draining() {
            return;
        }
        let mut conn = match conn {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "agent socket accept");
                std::thread::sleep(ACCEPT_BACKOFF);
                continue;
            }
        };
        let slot = match Slot::take(&open, peer_pid(&conn)) {
            Ok(s) => s,
            Err(why) => {
                conn.set_write_timeout(Some(Duration::from_millis(100)))
                    .ok();
                let _ = write(&mut conn, &error(why));
                continue;
            }
        };
        let agent = agent.clone();
        let spawned = std::thread::Builder::new()
            .name("agent-api".into())
            .spawn(move || {
                let _slot = slot;
                if let Err(e) = handle_conn(&agent, conn) {
                    tracing::debug!(error = %e, "client connection ended");
                }
            });
        if let Err(e) = spawned {
            // The closure (and its slot) was dropped with the error.
            tracing::warn!(error = %e, "agent socket: cannot start a client thread");
            std::thread::sleep(ACCEPT_BACKOFF);
        }
    }
}

/// A request the socket refuses before the agent sees it (garbage, too
/// long, too slow).
fn error(message: String) -> Response {
    Response::Error {
        message,
        cause: api::ErrorKind::Invalid,
    }
}

fn write(w: &mut UnixStream, r: &Response) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(r).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line)
}

/// What reading one request line gave.
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// A whole line (without its newline) is in the buffer.
    Whole,
    /// The client closed between requests.
    Closed,
    /// Longer than `MAX_LINE`: `n` bytes read so far.
    TooLong(usize),
    /// The line did not arrive within `LINE_TIMEOUT`, or the client idled
    /// past `IDLE_TIMEOUT`.
    TimedOut { started: bool },
}

/// Reads one line into `buf`, within the bounds above. `conn` is the
/// stream under `reader` (its read timeout is moved as the deadline
/// approaches).
fn read_line(
    reader: &mut impl BufRead,
    conn: &UnixStream,
    buf: &mut Vec<u8>,
    max: usize,
) -> std::io::Result<Line> {
    buf.clear();
    let idle_until = Instant::now() + IDLE_TIMEOUT;
    let mut line_until = None;
    loop {
        let deadline = line_until.unwrap_or(idle_until);
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(Line::TimedOut {
                started: line_until.is_some(),
            });
        }
        conn.set_read_timeout(Some(left))?;
        let available = match reader.fill_buf() {
            Ok(b) => b,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if available.is_empty() {
            return Ok(if buf.is_empty() {
                Line::Closed
            } else {
                // A last line without its newline is still a request.
                Line::Whole
            });
        }
        line_until.get_or_insert_with(|| Instant::now() + LINE_TIMEOUT);
        let (take, done) = match available.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (available.len(), false),
        };
        let room = max + 1 - buf.len().min(max + 1);
        buf.extend_from_slice(&available[..take.min(room)]);
        reader.consume(take);
        if buf.len() > max {
            return Ok(Line::TooLong(buf.len()));
        }
        if done {
            buf.pop();
            return Ok(Line::Whole);
        }
    }
}

fn handle_conn(agent: &Agent, conn: UnixStream) -> std::io::Result<()> {
    let mut w = conn.try_clone()?;
    w.set_write_timeout(Some(LINE_TIMEOUT))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut line = Vec::new();
    loop {
        match read_line(&mut reader, &conn, &mut line, MAX_LINE)? {
            Line::Whole => {}
            Line::Closed => return Ok(()),
            Line::TooLong(n) => {
                return write(
                    &mut w,
                    &error(format!(
                        "request too large: more than {n} bytes, the limit is {MAX_LINE} bytes \
                         ({} MiB); split the policy files into several imports",
                        MAX_LINE >> 20
                    )),
                );
            }
            Line::TimedOut { started: true } => {
                return write(
                    &mut w,
                    &error(format!(
                        "request incomplete after {} s (a request is one line ending in a newline)",
                        LINE_TIMEOUT.as_secs()
                    )),
                );
            }
            Line::TimedOut { started: false } => return Ok(()),
        }
        let req: Request = match std::str::from_utf8(&line) {
            Err(e) => {
                write(
                    &mut w,
                    &error(format!(
                        "bad request: not UTF-8 (invalid byte at offset {})",
                        e.valid_up_to()
                    )),
                )?;
                continue;
            }
            Ok(text) => match serde_json::from_str(text) {
                Ok(r) => r,
                Err(e) => {
                    write(&mut w, &error(format!("bad request: {e}")))?;
                    continue;
                }
            },
        };
        write(&mut w, &agent.handle(req))?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(input: &[u8], max: usize) -> Vec<(Line, Vec<u8>)> {
        let (mut a, b) = UnixStream::pair().unwrap();
        a.write_all(input).unwrap();
        a.shutdown(std::net::Shutdown::Write).unwrap();
        let mut reader = BufReader::with_capacity(4, b.try_clone().unwrap());
        let mut out = Vec::new();
        let mut buf = Vec::new();
        loop {
            let l = read_line(&mut reader, &b, &mut buf, max).unwrap();
            let stop = !matches!(l, Line::Whole);
            out.push((l, buf.clone()));
            if stop {
                break;
            }
        }
        out
    }

    #[test]
    fn lines_are_bounded_and_invalid_bytes_reach_the_parser() {
        let got = lines(b"abc\n\xff\xfe\nlast", 8);
        assert_eq!(
            got,
            vec![
                (Line::Whole, b"abc".to_vec()),
                (Line::Whole, b"\xff\xfe".to_vec()),
                (Line::Whole, b"last".to_vec()),
                (Line::Closed, vec![]),
            ]
        );
        let got = lines(b"0123456789abcdef\nmore\n", 8);
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].0, Line::TooLong(9), "stops reading past the limit");
    }
}
