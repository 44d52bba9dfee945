//! The local API server: a Unix socket only root can open, one thread per
//! client, one JSON request per line.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::Duration;

use api::{ObserveRequest, Request, Response};

use crate::Agent;

pub fn bind(path: &std::path::Path) -> std::io::Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::remove_file(path).ok();
    let l = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(l)
}

pub fn serve(agent: Arc<Agent>, listener: UnixListener) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        let agent = agent.clone();
        std::thread::spawn(move || {
            if let Err(e) = handle_conn(&agent, conn) {
                tracing::debug!(error = %e, "client connection ended");
            }
        });
    }
}

fn write(w: &mut UnixStream, r: &Response) -> std::io::Result<()> {
    let mut line = serde_json::to_vec(r).map_err(std::io::Error::other)?;
    line.push(b'\n');
    w.write_all(&line)
}

fn handle_conn(agent: &Agent, conn: UnixStream) -> std::io::Result<()> {
    let mut w = conn.try_clone()?;
    let mut reader = BufReader::new(conn.take(1 << 24));
    let mut line = String::new();
    loop {
        line.clear();
        if reader.read_line(&mut line)? == 0 {
            return Ok(());
        }
        let req: Request = match serde_json::from_str(&line) {
            Ok(r) => r,
            Err(e) => {
                write(
                    &mut w,
                    &Response::Error {
                        message: format!("bad request: {e}"),
                    },
                )?;
                continue;
            }
        };
        match req {
            Request::Observe(o) => return observe(agent, &mut w, o),
            other => write(&mut w, &agent.handle(other))?,
        }
    }
}

fn observe(agent: &Agent, w: &mut UnixStream, o: ObserveRequest) -> std::io::Result<()> {
    if let Err(e) = o.filter.validate() {
        return write(
            w,
            &Response::Error {
                message: e.to_string(),
            },
        );
    }
    let mut seq = agent.observer.start_seq(o.last, o.follow);
    let mut remaining = if o.last > 0 { o.last } else { usize::MAX };
    loop {
        let wait = if o.follow {
            Duration::from_millis(500)
        } else {
            Duration::ZERO
        };
        let (lost, flows, next) = agent.observer.read(seq, wait);
        if lost > 0 {
            write(
                w,
                &Response::LostEvents {
                    source: "HUBBLE_RING_BUFFER".into(),
                    num_events_lost: lost,
                },
            )?;
        }
        for f in flows {
            if !o.filter.matches(&f) {
                continue;
            }
            if !o.follow && remaining == 0 {
                break;
            }
            remaining = remaining.saturating_sub(1);
            write(
                w,
                &Response::Flow {
                    flow: Box::new((*f).clone()),
                },
            )?;
        }
        seq = next;
        if !o.follow {
            return write(w, &Response::End);
        }
        // Detect a client that went away while idle.
        w.write_all(b"")?;
    }
}
