//! A `fibril-echo` server on a free loopback port, its log lines on a
//! channel; killed when dropped.

// Each test file uses part of these.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::Duration;

pub const ECHO: &str = env!("CARGO_BIN_EXE_fibril-echo");

pub struct Server {
    child: Child,
    pub port: u16,
    pub lines: Receiver<String>,
}

impl Server {
    /// Starts `fibril-echo <command> --port P <extra...>` and waits for it
    /// to listen. The port is found free, then released for the server: if
    /// another process takes it in between (tests run side by side), the
    /// server cannot bind and is started again on another.
    pub fn start(command: &str, extra: &[&str]) -> Server {
        for _ in 0..5 {
            if let Some(server) = Self::try_start(command, extra) {
                return server;
            }
        }
        panic!("fibril-echo {command} did not start listening in 5 tries");
    }

    fn try_start(command: &str, extra: &[&str]) -> Option<Server> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = Command::new(ECHO)
            .args([command, "--port", &port.to_string()])
            .args(extra)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        // Dropped (killed) if it does not come up.
        let server = Server { child, port, lines };
        let first = server.lines.recv_timeout(Duration::from_secs(5)).ok()?;
        assert!(first.starts_with("listening"), "{first}");
        Some(server)
    }

    /// The log lines that came so far (waiting `settle` for more).
    pub fn log(&self, settle: Duration) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(line) = self.lines.recv_timeout(settle) {
            out.push(line);
        }
        out
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
