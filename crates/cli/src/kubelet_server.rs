//! The lab kubelet's API on its node's address, port 10250: what the API
//! server proxies `kubectl logs` to (`GET /containerLogs/NS/POD/CONTAINER`
//! with `follow`, `tailLines`, `limitBytes`). HTTPS with a serving
//! certificate for the node's address, and only clients whose certificate
//! the lab's CA signed (the API server's kubelet client) are served.
//! Requests are bounded in size and time; the log file is found by
//! validated names only.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The kubelet port Kubernetes uses.
pub const PORT: u16 = 10250;
/// A request head larger than this is refused.
const MAX_HEAD: usize = 8 * 1024;

pub struct Tls {
    pub cert_pem: String,
    pub key_pem: String,
    pub client_ca_pem: String,
}

fn server_config(tls: &Tls) -> anyhow::Result<rustls::ServerConfig> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(tls.client_ca_pem.as_bytes()) {
        roots.add(c.context("the client CA")?)?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .context("the client verifier")?;
    let certs = CertificateDer::pem_slice_iter(tls.cert_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .context("the serving certificate")?;
    let key = PrivateKeyDer::from_pem_slice(tls.key_pem.as_bytes()).context("the serving key")?;
    Ok(rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs, key)?)
}

/// Serves until the process ends; each connection on a task of its own.
pub async fn serve(address: SocketAddr, tls: Tls, logs: PathBuf) -> anyhow::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config(&tls)?));
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("the kubelet API on {address}"))?;
    loop {
        let (tcp, _) = listener.accept().await?;
        let acceptor = acceptor.clone();
        let logs = logs.clone();
        tokio::spawn(async move {
            let Ok(Ok(stream)) =
                tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await
            else {
                return;
            };
            if let Err(e) = handle(stream, &logs).await {
                eprintln!("kubelet API: {e:#}");
            }
        });
    }
}

/// A request's path and query, from its head.
fn request_target(head: &str) -> Option<(&str, &str)> {
    let line = head.lines().next()?;
    let mut parts = line.split(' ');
    let (method, target) = (parts.next()?, parts.next()?);
    if method != "GET" {
        return None;
    }
    Some(target.split_once('?').unwrap_or((target, "")))
}

/// `containerLogs/NS/POD/CONTAINER` -> the log file's name, the names
/// checked (DNS labels and subdomains: no path can be formed).
pub fn log_name(path: &str) -> Option<String> {
    let rest = path.strip_prefix("/containerLogs/")?;
    let parts: Vec<&str> = rest.split('/').collect();
    let [ns, pod, container] = parts[..] else {
        return None;
    };
    let ok = |s: &str| {
        !s.is_empty()
            && s.len() <= 253
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
            && !s.starts_with('.')
    };
    (ok(ns) && ok(pod) && ok(container)).then(|| format!("{ns}_{pod}_{container}.log"))
}

fn query<'a>(q: &'a str, key: &str) -> Option<&'a str> {
    q.split('&')
        .find_map(|kv| kv.strip_prefix(key)?.strip_prefix('='))
}

/// The last `n` lines of `text`.
fn tail(text: &[u8], n: usize) -> &[u8] {
    let mut seen = 0;
    for (i, b) in text.iter().enumerate().rev() {
        if *b == b'\n' && i + 1 < text.len() {
            seen += 1;
            if seen == n {
                return &text[i + 1..];
            }
        }
    }
    text
}

async fn handle<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    mut s: S,
    logs: &std::path::Path,
) -> anyhow::Result<()> {
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        anyhow::ensure!(head.len() < MAX_HEAD, "request head too large");
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut buf)).await??;
        anyhow::ensure!(n > 0, "connection closed in the request head");
        head.extend_from_slice(&buf[..n]);
    }
    let head = String::from_utf8_lossy(&head).into_owned();
    let Some((path, q)) = request_target(&head) else {
        s.write_all(
            b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
        )
        .await?;
        return Ok(());
    };
    let Some(name) = log_name(path) else {
        s.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .await?;
        return Ok(());
    };
    let file = logs.join(name);
    let Ok(mut text) = tokio::fs::read(&file).await else {
        let body = "no such container log (the lab's kubelet keeps the logs of the pods it runs)\n";
        s.write_all(format!("HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()).as_bytes()).await?;
        return Ok(());
    };
    if let Some(n) = query(q, "tailLines").and_then(|n| n.parse().ok()) {
        text = tail(&text, n).to_vec();
    }
    if let Some(n) = query(q, "limitBytes").and_then(|n| n.parse::<usize>().ok()) {
        text.truncate(n);
    }
    s.write_all(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n\r\n")
        .await?;
    s.write_all(&text).await?;
    if query(q, "follow") == Some("true") {
        // What is appended, until the client goes.
        let mut at = tokio::fs::metadata(&file)
            .await
            .map(|m| m.len())
            .unwrap_or(0);
        loop {
            tokio::time::sleep(Duration::from_millis(200)).await;
            let len = tokio::fs::metadata(&file)
                .await
                .map(|m| m.len())
                .unwrap_or(at);
            if len > at {
                let mut f = tokio::fs::File::open(&file).await?;
                tokio::io::AsyncSeekExt::seek(&mut f, std::io::SeekFrom::Start(at)).await?;
                let mut more = vec![0u8; (len - at) as usize];
                f.read_exact(&mut more).await?;
                s.write_all(&more).await?;
                s.flush().await?;
                at = len;
            }
        }
    }
    s.shutdown().await.ok();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_and_mapped() {
        assert_eq!(
            log_name("/containerLogs/kube-system/fibril-x1/fibril-agent").as_deref(),
            Some("kube-system_fibril-x1_fibril-agent.log")
        );
        for bad in [
            "/containerLogs/a/../b",
            "/containerLogs/a/b",
            "/containerLogs/a/b/c/d",
            "/containerLogs/A/b/c",
            "/pods",
            "/containerLogs/a/.x/c",
        ] {
            assert_eq!(log_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail(b"a\nb\nc\n", 2), b"b\nc\n");
        assert_eq!(tail(b"a\nb\nc\n", 5), b"a\nb\nc\n");
        assert_eq!(query("follow=true&tailLines=3", "tailLines"), Some("3"));
        assert_eq!(
            request_target("GET /containerLogs/a/b/c?follow=true HTTP/1.1\r\n"),
            Some(("/containerLogs/a/b/c", "follow=true"))
        );
        assert_eq!(request_target("POST /x HTTP/1.1\r\n"), None);
    }
}
