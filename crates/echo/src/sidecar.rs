//! `fibril-echo sidecar-proxy`: what a pod's `istio-proxy` container does
//! with the connections Istio's redirection hands it, reduced to Envoy's
//! passthrough: each connection redirected to the outbound port (15001) or
//! the inbound port (15006) is forwarded, byte for byte, to the address it
//! was for (`SO_ORIGINAL_DST`); inbound ones from 127.0.0.6, as Envoy's
//! inbound passthrough binds, which Istio's rules let through to the
//! application. Run as Istio's proxy user (1337) it is not redirected
//! again. Each connection is printed as `outbound|inbound PEER -> ORIGINAL`
//! (the test reads which address the application asked for). No Envoy, no
//! mTLS, no routing: Istio's control plane and proxies are not available
//! here.

use std::io::Write;
use std::net::{Ipv4Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use anyhow::Context;

/// Envoy's inbound passthrough source (Istio's rules let it through).
const INBOUND_SOURCE: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);

pub fn serve(outbound_port: u16, inbound_port: u16) -> anyhow::Result<()> {
    let outbound = TcpListener::bind((Ipv4Addr::UNSPECIFIED, outbound_port))
        .with_context(|| format!("listening on {outbound_port}"))?;
    let inbound = TcpListener::bind((Ipv4Addr::UNSPECIFIED, inbound_port))
        .with_context(|| format!("listening on {inbound_port}"))?;
    println!("sidecar-proxy: outbound on {outbound_port}, inbound on {inbound_port}");
    std::io::stdout().flush().ok();
    let inbound = std::thread::spawn(move || accept(inbound, "inbound"));
    accept(outbound, "outbound");
    inbound.join().ok();
    Ok(())
}

fn accept(listener: TcpListener, way: &'static str) {
    for conn in listener.incoming() {
        let Ok(conn) = conn else { continue };
        std::thread::spawn(move || {
            if let Err(e) = forward(conn, way) {
                eprintln!("{way}: {e:#}");
            }
        });
    }
}

fn forward(client: TcpStream, way: &str) -> anyhow::Result<()> {
    let peer = client.peer_addr()?;
    let original = socket2::SockRef::from(&client)
        .original_dst_v4()
        .context("SO_ORIGINAL_DST: not a redirected connection")?
        .as_socket()
        .context("the original destination is not an IP address")?;
    // Printed before connecting: what the application asked for, whether
    // or not it is reachable.
    println!("{way} {peer} -> {original}");
    std::io::stdout().flush().ok();
    let upstream = if way == "inbound" {
        let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        s.bind(&SocketAddr::from((INBOUND_SOURCE, 0)).into())?;
        s.connect_timeout(&original.into(), Duration::from_secs(5))
            .with_context(|| format!("connecting to {original}"))?;
        TcpStream::from(s)
    } else {
        TcpStream::connect_timeout(&original, Duration::from_secs(5))
            .with_context(|| format!("connecting to {original}"))?
    };
    let (mut c_read, mut u_write) = (client.try_clone()?, upstream.try_clone()?);
    let up = std::thread::spawn(move || {
        std::io::copy(&mut c_read, &mut u_write).ok();
        u_write.shutdown(Shutdown::Write).ok();
    });
    let (mut u_read, mut c_write) = (upstream, client);
    std::io::copy(&mut u_read, &mut c_write).ok();
    c_write.shutdown(Shutdown::Write).ok();
    up.join().ok();
    Ok(())
}
