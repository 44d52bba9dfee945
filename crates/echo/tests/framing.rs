//! `fibril-echo http-server` frames requests as RFC 9112 says, over a real
//! socket: pipelined requests are each served once, a request inside a
//! chunked body stays body, heads framed two ways are refused, and a
//! WebSocket upgrade echoes.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::Server;

fn exchange(port: u16, bytes: &[u8]) -> String {
    let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    c.write_all(bytes).unwrap();
    c.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    out
}

fn requests(server: &Server) -> Vec<String> {
    server
        .log(Duration::from_millis(200))
        .into_iter()
        .filter(|l| l.starts_with("request ") || l.starts_with("refused "))
        .collect()
}

#[test]
fn requests_are_framed_by_length_and_chunks_and_nothing_is_smuggled() {
    let server = Server::start("http-server", &[]);
    // Pipelined: a chunked body holding a request, then a real one.
    let out = exchange(
        server.port,
        b"POST /upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
          17\r\nGET /admin HTTP/1.1\r\n\r\n\r\n0\r\n\r\n\
          GET /next HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\n\r\nok",
    );
    assert_eq!(out.matches("HTTP/1.1 200 OK").count(), 2, "{out}");
    assert!(out.contains("POST /upload HTTP/1.1 body 23 fnv"), "{out}");
    assert!(out.contains("GET /next HTTP/1.1 body 2 fnv"), "{out}");
    assert_eq!(
        requests(&server),
        [
            "request POST /upload HTTP/1.1",
            "request GET /next HTTP/1.1"
        ]
    );
    // Framed two ways, or by a coding it does not know: refused, closed,
    // nothing after it served.
    for (raw, status) in [
        (
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin HTTP/1.1\r\n\r\n",
            "400",
        ),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip\r\n\r\nGET /admin HTTP/1.1\r\n\r\n",
            "501",
        ),
        (
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nGET /admin HTTP/1.1\r\n\r\n",
            "400",
        ),
    ] {
        let out = exchange(server.port, raw.as_bytes());
        assert!(out.starts_with(&format!("HTTP/1.1 {status} ")), "{out}");
        assert_eq!(out.matches("HTTP/1.1").count(), 1, "{out}");
        let served = requests(&server);
        assert!(served.iter().all(|l| !l.contains("/admin")), "{served:?}");
    }
}

#[test]
fn a_websocket_upgrade_echoes_what_follows() {
    let server = Server::start("http-server", &[]);
    let out = exchange(
        server.port,
        b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\nhello",
    );
    assert!(out.starts_with("HTTP/1.1 101 "), "{out}");
    assert!(out.ends_with("\r\n\r\nhello"), "{out}");
}
