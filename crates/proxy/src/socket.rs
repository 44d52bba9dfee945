//! The proxy's sockets: a listener the datapath assigns connections to, and
//! upstream connections from the client's own address.

use std::io;
use std::net::{Ipv4Addr, SocketAddrV4};

use socket2::{Domain, Protocol, Socket, Type};

/// Listens on 127.0.0.1:`port` (0: any free port). IP_TRANSPARENT lets it
/// accept connections addressed to other hosts (the pods' servers).
pub fn listen(port: u16) -> io::Result<std::net::TcpListener> {
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    s.set_reuse_address(true)?;
    s.set_ip_transparent_v4(true)?;
    s.bind(&SocketAddrV4::new(Ipv4Addr::LOCALHOST, port).into())?;
    s.listen(1024)?;
    s.set_nonblocking(true)?;
    Ok(s.into())
}

/// A non-blocking socket towards a server. Transparent: bound to `client`'s
/// address (an ephemeral port) and marked with `mark`.
pub fn upstream(ty: Type, client: Ipv4Addr, transparent: bool, mark: u32) -> io::Result<Socket> {
    let protocol = if ty == Type::DGRAM {
        Protocol::UDP
    } else {
        Protocol::TCP
    };
    // Non-blocking from the start (SOCK_NONBLOCK): the DNS proxy opens one
    // per query, and setting it afterwards costs two fcntl calls.
    let s = Socket::new(Domain::IPV4, ty.nonblocking(), Some(protocol))?;
    if transparent {
        s.set_ip_transparent_v4(true)?;
        s.set_mark(mark)?;
        s.bind(&SocketAddrV4::new(client, 0).into())?;
    }
    Ok(s)
}

/// Connects to `dst`. Transparent: from `client`'s address (an ephemeral
/// port), with `mark` so that the datapath knows the proxy already applied
/// the policy.
pub async fn connect(
    client: Ipv4Addr,
    dst: SocketAddrV4,
    transparent: bool,
    mark: u32,
) -> io::Result<tokio::net::TcpStream> {
    let s = upstream(Type::STREAM, client, transparent, mark)?;
    s.set_tcp_nodelay(true)?;
    let socket = tokio::net::TcpSocket::from_std_stream(s.into());
    socket.connect(dst.into()).await
}

/// `connect` within `timeout`, its failure said as text (the L7 proxies'
/// upstream connections).
pub async fn dial(
    client: Ipv4Addr,
    dst: SocketAddrV4,
    transparent: bool,
    mark: u32,
    timeout: std::time::Duration,
) -> Result<tokio::net::TcpStream, String> {
    tokio::time::timeout(timeout, connect(client, dst, transparent, mark))
        .await
        .map_err(|_| format!("connecting to {dst} timed out"))?
        .map_err(|e| format!("connecting to {dst}: {e}"))
}

/// Accepts the next connection the datapath assigned to `listener`: the
/// stream, its client and its original destination (the proxy's local
/// address). Accept errors (out of file descriptors and the like) back off
/// and go on; non-IPv4 connections are skipped.
pub async fn accept(
    listener: &tokio::net::TcpListener,
) -> (tokio::net::TcpStream, SocketAddrV4, SocketAddrV4) {
    use std::net::SocketAddr;
    loop {
        match listener.accept().await {
            Ok((stream, SocketAddr::V4(client))) => {
                if let Ok(SocketAddr::V4(dst)) = stream.local_addr() {
                    return (stream, client, dst);
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "proxy accept");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    }
}
