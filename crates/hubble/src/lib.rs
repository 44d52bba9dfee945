//! The Hubble-compatible observer API: Fibril flows as `flow.Flow`
//! messages, Hubble's `FlowFilter` semantics, and (in `server`) the gRPC
//! services the `hubble` CLI and Hubble Relay talk to.
#![forbid(unsafe_code)]

pub mod convert;
pub mod entry;
pub mod field_mask;
pub mod filter;
pub mod json;
pub mod limits;
pub mod server;
pub mod unix_authority;

/// Clients' side: a Hubble server on a Unix socket.
pub mod client {
    use std::path::PathBuf;

    /// The connector for `tonic`'s `Endpoint::connect_with_connector(_lazy)`
    /// that dials the Unix socket at `path` (`unix:///...` servers: the
    /// agent's and the relay's own sockets); the endpoint's URI is ignored.
    pub fn unix_connector(
        path: PathBuf,
    ) -> impl tower::Service<
        tonic::transport::Uri,
        Response = hyper_util::rt::TokioIo<tokio::net::UnixStream>,
        Error = std::io::Error,
        Future: Send,
    > + Clone
           + Send
           + 'static {
        tower::service_fn(move |_: tonic::transport::Uri| {
            let path = path.clone();
            async move {
                Ok::<_, std::io::Error>(hyper_util::rt::TokioIo::new(
                    tokio::net::UnixStream::connect(path).await?,
                ))
            }
        })
    }
}

/// A listen address as Hubble's flags take it: `ip:port`, or Go's `:port`
/// for every IPv4 address (`--hubble-listen-address=:4244`, the relay's
/// `--listen-address=:4245`).
pub fn parse_listen_address(s: &str) -> Result<std::net::SocketAddr, String> {
    let full = match s.strip_prefix(':') {
        Some(port) => format!("0.0.0.0:{port}"),
        None => s.to_string(),
    };
    full.parse()
        .map_err(|e| format!("{s:?}: {e} (give ip:port or :port)"))
}

#[cfg(test)]
mod listen_address_tests {
    #[test]
    fn go_style_addresses_are_every_address() {
        assert_eq!(
            super::parse_listen_address(":4244").unwrap().to_string(),
            "0.0.0.0:4244"
        );
        assert_eq!(
            super::parse_listen_address("10.0.0.1:80")
                .unwrap()
                .to_string(),
            "10.0.0.1:80"
        );
        assert!(super::parse_listen_address(":x").is_err());
        assert!(super::parse_listen_address("4244").is_err());
    }
}
