//! `fibril-relay`: Hubble Relay for a Fibril cluster. Thin: flags, the
//! listeners, the services; `fibril_relay` does the work.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use fibril_relay::peers::Peers;
use fibril_relay::service::{Relay, Timeouts};

#[derive(Parser)]
#[command(
    name = "fibril-relay",
    about = "Hubble Relay: every node's flows as one stream"
)]
struct Args {
    /// Serve the relay on this TCP address (Hubble Relay's port is 4245;
    /// `:4245` is every address).
    #[arg(long, default_value = "127.0.0.1:4245", value_parser = hubble::parse_listen_address)]
    listen_address: std::net::SocketAddr,
    /// Also serve it on this Unix socket.
    #[arg(long)]
    unix_socket: Option<PathBuf>,
    /// An agent's Hubble address (`host:port`) whose `peer.Peer/Notify`
    /// lists the cluster's nodes; repeat it to have others to fall back on.
    #[arg(long = "peer-service")]
    peer_services: Vec<String>,
    /// The cluster's name: over TLS the peer service's certificate must
    /// carry `hubble-peer.<cluster>.hubble-grpc.cilium.io`, as Hubble
    /// Relay checks it.
    #[arg(long, default_value = "default")]
    cluster_name: String,
    /// A node given by hand, `NAME=HOST:PORT` (repeatable).
    #[arg(long = "static-peer")]
    static_peers: Vec<String>,
    /// How long a quiet node may hold the merged stream back, in ms.
    #[arg(long, default_value_t = 500)]
    drain_timeout_ms: u64,
    /// How long a node has to answer (unary calls, opening a stream), in ms.
    #[arg(long, default_value_t = 5000)]
    request_timeout_ms: u64,
    /// How long connecting to a node may take, in ms.
    #[arg(long, default_value_t = 2000)]
    dial_timeout_ms: u64,
    /// Reach the nodes over TLS: the CA (PEM) their Hubble servers'
    /// certificates chain to (names `<node>.<cluster>.hubble-grpc.cilium.io`).
    #[arg(long)]
    tls_hubble_server_ca_files: Option<PathBuf>,
    /// The relay's client certificate (PEM) for nodes that ask for one (mTLS).
    #[arg(long, requires_all = ["tls_client_key_file", "tls_hubble_server_ca_files"])]
    tls_client_cert_file: Option<PathBuf>,
    #[arg(long, requires = "tls_client_cert_file")]
    tls_client_key_file: Option<PathBuf>,
    /// Serve the TCP listener over TLS with this certificate (PEM).
    #[arg(long, requires = "tls_server_key_file")]
    tls_server_cert_file: Option<PathBuf>,
    #[arg(long, requires = "tls_server_cert_file")]
    tls_server_key_file: Option<PathBuf>,
    /// Ask the relay's own clients for a certificate chaining to this CA.
    #[arg(long, requires = "tls_server_cert_file")]
    tls_server_client_ca_files: Option<PathBuf>,
}

fn read(path: &Option<PathBuf>) -> anyhow::Result<Option<Vec<u8>>> {
    path.as_ref()
        .map(|p| std::fs::read(p).map_err(|e| anyhow::anyhow!("reading {}: {e}", p.display())))
        .transpose()
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if args.peer_services.is_empty() && args.static_peers.is_empty() {
        anyhow::bail!("give --peer-service HOST:PORT (an agent's Hubble address) or --static-peer NAME=HOST:PORT");
    }
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let client_tls = match read(&args.tls_hubble_server_ca_files)? {
        None => None,
        Some(ca_pem) => Some(fibril_relay::peers::ClientTls {
            ca_pem,
            identity: match (
                read(&args.tls_client_cert_file)?,
                read(&args.tls_client_key_file)?,
            ) {
                (Some(cert), Some(key)) => Some((cert, key)),
                _ => None,
            },
        }),
    };
    let server_tls = match (
        read(&args.tls_server_cert_file)?,
        read(&args.tls_server_key_file)?,
    ) {
        (Some(cert), Some(key)) => {
            let mut config = tonic::transport::ServerTlsConfig::new()
                .identity(tonic::transport::Identity::from_pem(cert, key));
            if let Some(ca) = read(&args.tls_server_client_ca_files)? {
                config = config.client_ca_root(tonic::transport::Certificate::from_pem(ca));
            }
            Some(config)
        }
        _ => None,
    };
    let peers = Peers::with_tls(Duration::from_millis(args.dial_timeout_ms), client_tls);
    for p in &args.static_peers {
        let (name, address) = p
            .split_once('=')
            .ok_or_else(|| anyhow::anyhow!("--static-peer {p:?}: give NAME=HOST:PORT"))?;
        peers.upsert(name, address)?;
    }
    if !args.peer_services.is_empty() {
        tokio::spawn(fibril_relay::peers::follow(
            peers.clone(),
            args.peer_services.clone(),
            args.cluster_name.clone(),
        ));
    }
    let relay = Arc::new(Relay::new(
        peers,
        Timeouts {
            drain: Duration::from_millis(args.drain_timeout_ms),
            request: Duration::from_millis(args.request_timeout_ms),
        },
    ));
    let health = fibril_relay::service::health(relay.clone()).await;
    let routes = |tls: Option<tonic::transport::ServerTlsConfig>| {
        let health = health.clone();
        let relay = relay.clone();
        async move {
            let mut builder = tonic::transport::Server::builder();
            if let Some(tls) = tls {
                builder = builder.tls_config(tls)?;
            }
            Ok::<_, anyhow::Error>(
                builder
                    .add_service(health)
                    .add_service(hubble::server::ObserverRoutes::new(relay)),
            )
        }
    };
    let tcp = tokio::net::TcpListener::bind(args.listen_address).await?;
    tracing::info!(address = %tcp.local_addr()?, tls = server_tls.is_some(), "relay serving");
    let tcp_routes = routes(server_tls).await?;
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(async move {
        tcp_routes
            .serve_with_incoming(hubble::limits::tcp_nodelay(tcp))
            .await
    });
    if let Some(path) = &args.unix_socket {
        let _ = std::fs::remove_file(path);
        let unix = tokio::net::UnixListener::bind(path)?;
        // Root's own socket: no TLS.
        let unix_routes = routes(None).await?;
        tasks.spawn(async move {
            unix_routes
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(unix))
                .await
        });
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        Some(done) = tasks.join_next() => done??,
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    if let Some(path) = &args.unix_socket {
        let _ = std::fs::remove_file(path);
    }
    Ok(())
}
