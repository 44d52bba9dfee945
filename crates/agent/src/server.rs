//! The local API server: a Unix socket only root can open, one thread per
//! client, one JSON request per line.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;

use api::{Request, Response};

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
        write(&mut w, &agent.handle(req))?;
    }
}
