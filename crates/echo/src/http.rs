//! `fibril-echo http-server`: keep-alive HTTP/1.1 with the framing RFC 9112
//! gives it (Content-Length, chunked bodies with trailers, pipelining), so
//! that what it logs as requests is what a real server would have served:
//! a request smuggled inside a body stays body. Heads it cannot read one
//! way only get 400 (501 for a transfer coding it does not know) and the
//! connection closes. `Upgrade: websocket` gets a 101 and an echo of every
//! byte after it (the proxy's tunnel tests).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};

use anyhow::Context;

use crate::{say, workers};

/// Largest request head read (bigger: 431).
const MAX_HEAD: usize = 64 * 1024;

pub fn serve(port: u16, cpu_affine: bool) -> anyhow::Result<()> {
    let l = TcpListener::bind(("0.0.0.0", port)).with_context(|| format!("bind :{port}"))?;
    say(format!("listening on :{port}"));
    for conn in l.incoming() {
        let Ok(conn) = conn else { continue };
        let peer = conn.peer_addr().map(|a| a.to_string()).unwrap_or_default();
        say(format!("accepted {peer}"));
        std::thread::spawn(move || {
            if cpu_affine {
                if let Some(cpu) = workers::incoming_cpu(&conn) {
                    match workers::pin_current_thread(cpu) {
                        Ok(()) => say(format!("connection from {peer} runs on CPU {cpu}")),
                        Err(e) => say(format!("cannot run on CPU {cpu}: {e}")),
                    }
                }
            }
            let _ = serve_connection(conn);
        });
    }
    Ok(())
}

/// How a request's body is framed.
#[derive(Debug, PartialEq)]
enum Body {
    Length(u64),
    Chunked,
}

/// A request head as far as the server acts on it.
#[derive(Debug, PartialEq)]
struct Head {
    /// `METHOD target HTTP/1.1`.
    line: String,
    host: Option<String>,
    body: Body,
    close: bool,
    websocket: bool,
}

/// Why a head is refused: the status line's code and reason.
#[derive(Debug, PartialEq)]
struct Refusal(&'static str);

const BAD_REQUEST: Refusal = Refusal("400 Bad Request");

/// Reads a head from `r`: `Ok(None)` when the client closed between
/// requests.
fn read_head(r: &mut impl BufRead) -> io::Result<Result<Option<Head>, Refusal>> {
    let mut lines = Vec::new();
    let mut size = 0;
    loop {
        let mut line = Vec::new();
        let n = r
            .by_ref()
            .take(MAX_HEAD as u64)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(if lines.is_empty() && size == 0 {
                Ok(None)
            } else {
                Err(BAD_REQUEST)
            });
        }
        size += n;
        if size > MAX_HEAD {
            return Ok(Err(Refusal("431 Request Header Fields Too Large")));
        }
        let Some(line) = line.strip_suffix(b"\r\n") else {
            return Ok(Err(BAD_REQUEST));
        };
        if line.is_empty() {
            break;
        }
        lines.push(line.to_vec());
    }
    Ok(parse_head(&lines).map(Some))
}

fn token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

fn parse_head(lines: &[Vec<u8>]) -> Result<Head, Refusal> {
    let (first, fields) = lines.split_first().ok_or(BAD_REQUEST)?;
    let line = std::str::from_utf8(first).map_err(|_| BAD_REQUEST)?;
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(BAD_REQUEST);
    };
    if !token(method) || target.is_empty() || target.bytes().any(|b| b <= b' ' || b == 0x7f) {
        return Err(BAD_REQUEST);
    }
    // HTTP/1.0 closes after its answer unless it asks to keep alive.
    let mut keep_alive = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => return Err(Refusal("505 HTTP Version Not Supported")),
    };
    let (mut host, mut length, mut codings) = (None, None::<u64>, None::<String>);
    let (mut close, mut upgrade, mut websocket) = (false, false, false);
    for field in fields {
        let field = std::str::from_utf8(field).map_err(|_| BAD_REQUEST)?;
        // No space before the colon, no obsolete line folding.
        let (name, value) = field.split_once(':').ok_or(BAD_REQUEST)?;
        if !token(name) || value.bytes().any(|b| b < b' ' && b != b'\t' || b == 0x7f) {
            return Err(BAD_REQUEST);
        }
        let value = value.trim_matches([' ', '\t']);
        match name.to_ascii_lowercase().as_str() {
            "host" if host.is_none() => host = Some(value.to_string()),
            "host" => return Err(BAD_REQUEST),
            "content-length" => {
                // Several (or a list) only when all the same.
                for v in value.split(',').map(str::trim) {
                    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                        return Err(BAD_REQUEST);
                    }
                    let n = v.parse().map_err(|_| BAD_REQUEST)?;
                    if length.is_some_and(|l| l != n) {
                        return Err(BAD_REQUEST);
                    }
                    length = Some(n);
                }
            }
            "transfer-encoding" => {
                let all = codings.get_or_insert_with(String::new);
                if !all.is_empty() {
                    all.push(',');
                }
                all.push_str(value);
            }
            "connection" => {
                for t in value.split(',').map(str::trim) {
                    close |= t.eq_ignore_ascii_case("close");
                    keep_alive |= t.eq_ignore_ascii_case("keep-alive");
                    upgrade |= t.eq_ignore_ascii_case("upgrade");
                }
            }
            "upgrade" => websocket = value.eq_ignore_ascii_case("websocket"),
            _ => {}
        }
    }
    let body = match codings {
        // Framed two ways: RFC 9112 §6.3 lets a server refuse it.
        Some(_) if length.is_some() => return Err(BAD_REQUEST),
        // Only chunked alone: other codings (gzip, chunked twice) leave
        // the body's end to what this server does not decode.
        Some(codings) if codings.trim().eq_ignore_ascii_case("chunked") => Body::Chunked,
        Some(_) => return Err(Refusal("501 Not Implemented")),
        None => Body::Length(length.unwrap_or(0)),
    };
    Ok(Head {
        line: line.to_string(),
        host,
        body,
        close: close || !keep_alive,
        websocket: upgrade && websocket && method == "GET",
    })
}

/// Reads a chunked body to its end (trailers included) into `sink`;
/// `Ok(false)` when it is malformed.
fn read_chunked(r: &mut impl BufRead, sink: &mut impl FnMut(&[u8])) -> io::Result<bool> {
    let mut line = Vec::new();
    loop {
        line.clear();
        r.by_ref().take(4096).read_until(b'\n', &mut line)?;
        let Some(size_line) = line.strip_suffix(b"\r\n") else {
            return Ok(false);
        };
        let size = match size_line.split(|b| *b == b';').next() {
            Some(hex)
                if !hex.is_empty() && hex.len() <= 15 && hex.iter().all(u8::is_ascii_hexdigit) =>
            {
                // Cannot fail: hex digits only, at most 15 of them.
                u64::from_str_radix(std::str::from_utf8(hex).expect("ascii"), 16).expect("fits")
            }
            _ => return Ok(false),
        };
        if size == 0 {
            break;
        }
        let mut left = size;
        let mut chunk = [0u8; 16 * 1024];
        while left > 0 {
            let n = r.read(&mut chunk[..left.min(16 * 1024) as usize])?;
            if n == 0 {
                return Ok(false);
            }
            sink(&chunk[..n]);
            left -= n as u64;
        }
        let mut crlf = [0u8; 2];
        r.read_exact(&mut crlf)?;
        if &crlf != b"\r\n" {
            return Ok(false);
        }
    }
    // Trailer fields, up to the empty line.
    loop {
        line.clear();
        r.by_ref().take(4096).read_until(b'\n', &mut line)?;
        match line.strip_suffix(b"\r\n") {
            Some([]) => return Ok(true),
            Some(field) if field.contains(&b':') => {}
            _ => return Ok(false),
        }
    }
}

fn refuse(w: &mut TcpStream, status: &str) -> io::Result<()> {
    let body = format!("fibril-echo: {status}\n");
    let resp = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    say(format!("refused {status}"));
    w.write_all(resp.as_bytes())
}

/// Answers requests until the client closes, logging each host and
/// request line (tests check what reached the server).
fn serve_connection(conn: TcpStream) -> io::Result<()> {
    let mut w = conn.try_clone()?;
    let mut r = BufReader::new(conn);
    loop {
        let head = match read_head(&mut r)? {
            Ok(Some(head)) => head,
            Ok(None) => return Ok(()),
            Err(Refusal(status)) => return refuse(&mut w, status),
        };
        if let Some(host) = &head.host {
            say(format!("host {host}"));
        }
        // The body: its length and FNV-1a hash go into the log and the
        // answer (tests check that bytes crossed the proxy intact).
        let (mut len, mut hash) = (0u64, test_support::FNV_OFFSET);
        let mut sink = |b: &[u8]| {
            len += b.len() as u64;
            hash = test_support::fnv1a(hash, b);
        };
        match head.body {
            Body::Length(n) => {
                let mut chunk = [0u8; 64 * 1024];
                let mut left = n;
                while left > 0 {
                    let got = r.read(&mut chunk[..left.min(64 * 1024) as usize])?;
                    if got == 0 {
                        return Ok(());
                    }
                    sink(&chunk[..got]);
                    left -= got as u64;
                }
            }
            Body::Chunked => {
                if !read_chunked(&mut r, &mut sink)? {
                    return refuse(&mut w, BAD_REQUEST.0);
                }
            }
        }
        say(format!("request {}", head.line));
        if head.websocket {
            w.write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")?;
            say("upgraded".into());
            // Whatever came after the head is the tunnel's already.
            let pending = r.buffer().to_vec();
            w.write_all(&pending)?;
            let mut conn = r.into_inner();
            io::copy(&mut conn, &mut w)?;
            return Ok(());
        }
        answer(&mut w, &head.line, len, hash)?;
        if head.close {
            return Ok(());
        }
    }
}

/// The response to a request: `GET /bytes/N` gets N bytes of
/// `test_support::pattern_byte`, `GET .../chunked/N` N chunks (separate
/// writes) and a trailer, anything else a line naming the request (and its
/// body's length and hash).
fn answer(w: &mut TcpStream, line: &str, len: u64, hash: u64) -> io::Result<()> {
    let target = line.split(' ').nth(1).unwrap_or_default();
    if let Some(n) = target
        .rsplit_once("/chunked/")
        .and_then(|(_, n)| n.parse::<usize>().ok())
    {
        w.write_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n",
        )?;
        for i in 0..n {
            let data = format!("chunk {i}\n");
            w.write_all(format!("{:x}\r\n{data}\r\n", data.len()).as_bytes())?;
        }
        return w.write_all(format!("0\r\nX-Chunks: {n}\r\n\r\n").as_bytes());
    }
    if let Some(n) = target
        .strip_prefix("/bytes/")
        .and_then(|n| n.parse::<usize>().ok())
    {
        w.write_all(
            format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {n}\r\n\r\n"
            )
            .as_bytes(),
        )?;
        let mut chunk = vec![0u8; 64 * 1024];
        let mut sent = 0;
        while sent < n {
            let part = (n - sent).min(chunk.len());
            for (i, b) in chunk[..part].iter_mut().enumerate() {
                *b = test_support::pattern_byte(sent + i);
            }
            w.write_all(&chunk[..part])?;
            sent += part;
        }
        return Ok(());
    }
    let body = if len > 0 {
        format!("fibril-echo: {line} body {len} fnv {hash:016x}")
    } else {
        format!("fibril-echo: {line}")
    };
    w.write_all(
        format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(raw: &str) -> Result<Option<Head>, Refusal> {
        read_head(&mut raw.as_bytes()).unwrap()
    }

    #[test]
    fn heads_are_framed_one_way_or_refused() {
        let h = head("POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive, close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            (h.body, h.close, h.host.as_deref()),
            (Body::Chunked, true, Some("x"))
        );
        let h = head("GET / HTTP/1.1\r\nContent-Length: 5\r\ncontent-length: 5\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(h.body, Body::Length(5));
        assert!(head("").unwrap().is_none());
        let h = head("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(h.close);
        let h = head("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.close);
        for (raw, status) in [
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
                "400",
            ),
            (
                "POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
                "400",
            ),
            ("POST / HTTP/1.1\r\nContent-Length: +3\r\n\r\n", "400"),
            ("POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", "501"),
            (
                "POST / HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
                "501",
            ),
            ("GET / HTTP/1.1\r\nHost : x\r\n\r\n", "400"),
            ("GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n", "400"),
            ("GET / HTTP/1.1\nHost: x\r\n\r\n", "400"),
            ("GET / HTTP/1.1\r\n folded\r\n\r\n", "400"),
            ("GET / HTTP/2.0\r\n\r\n", "505"),
            ("GET /a b HTTP/1.1\r\n\r\n", "400"),
            ("GET / HTTP/1.1\r\nHost: x\r\n", "400"),
        ] {
            let Err(Refusal(got)) = head(raw) else {
                panic!("{raw:?} accepted")
            };
            assert!(got.starts_with(status), "{raw:?}: {got}");
        }
    }

    #[test]
    fn chunked_bodies_keep_a_smuggled_request_as_body() {
        let raw = "5;ext\r\nGET /\r\n12\r\nadmin HTTP/1.1\r\n\r\n\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        let mut r = raw.as_bytes();
        let mut body = Vec::new();
        assert!(read_chunked(&mut r, &mut |b| body.extend_from_slice(b)).unwrap());
        assert_eq!(body, b"GET /admin HTTP/1.1\r\n\r\n");
        assert_eq!(r, b"NEXT");
        for bad in [
            "zz\r\n",
            "5\r\nabcdeXY",
            "3\r\nabc\r\n0\r\nbad\r\n\r\n",
            "fffffffffffffffff\r\n",
        ] {
            assert!(
                !read_chunked(&mut bad.as_bytes(), &mut |_| {}).unwrap_or(false),
                "{bad:?}"
            );
        }
    }
}
