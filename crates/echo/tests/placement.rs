//! The benchmark's thread placement, over loopback: `http-load --spread`
//! runs connection i on CPU i mod n, and `http-server --cpu-affine` runs
//! each connection's thread on the CPU its client ran on.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{Server, ECHO};

#[test]
fn spread_clients_and_cpu_affine_server_threads_share_cpus() {
    let server = Server::start("http-server", &["--cpu-affine"]);
    let (port, rx) = (server.port, &server.lines);
    let cpus = proxy::workers::allowed_cpus();
    let connections = 2 * cpus.len();
    let load = Command::new(ECHO)
        .args([
            "http-load",
            &format!("http://127.0.0.1:{port}/"),
            "--seconds",
            "0.3",
            "--connections",
            &connections.to_string(),
            "--spread",
        ])
        .output()
        .unwrap();
    assert!(
        load.status.success(),
        "{}",
        String::from_utf8_lossy(&load.stderr)
    );

    // Each connection's server thread says where it runs: every CPU twice,
    // as the client spread its connections.
    let mut placed = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while placed.len() < connections && Instant::now() < deadline {
        let Ok(line) = rx.recv_timeout(Duration::from_millis(200)) else {
            continue;
        };
        assert!(!line.starts_with("cannot run"), "{line}");
        if let Some(cpu) = line.split(" runs on CPU ").nth(1) {
            placed.push(cpu.parse::<usize>().unwrap());
        }
    }
    placed.sort();
    let mut expected: Vec<usize> = cpus.iter().flat_map(|&c| [c, c]).collect();
    expected.sort();
    assert_eq!(placed, expected);
}
