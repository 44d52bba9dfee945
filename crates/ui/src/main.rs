//! `fibril-ui`: thin; flags, the listener, and `fibril_ui::server`.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use clap::Parser;
use fibril_ui::selection::Selections;
use fibril_ui::server::{relay_channel, router, App};

#[derive(Parser)]
#[command(
    name = "fibril-ui",
    about = "Service map, flows and policy verdicts in the browser"
)]
struct Args {
    /// Serve the page here (the seed's Hubble UI NodePort is 31235).
    #[arg(long, default_value = "127.0.0.1:31235")]
    listen_address: std::net::SocketAddr,
    /// Hubble Relay (or one agent's Hubble server): `host:port` or
    /// `unix:///path`.
    #[arg(long, default_value = "127.0.0.1:4245")]
    relay: String,
    /// An agent's control socket to ask which policies select each
    /// endpoint (repeatable: one per node).
    #[arg(long = "agent-socket")]
    agent_sockets: Vec<PathBuf>,
    /// Serve only whoever holds the token in this file (the address with
    /// `?token=`, then a cookie; or `Authorization: Bearer`). Without it,
    /// anyone who reaches the address sees every flow.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Write the address the page is served on to this file once it
    /// listens (with `--listen-address ...:0`, the port chosen).
    #[arg(long)]
    address_file: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let relay = relay_channel(&args.relay)?;
    let selections = Selections::new(args.agent_sockets.clone());
    let mut app = App::new(relay, selections.clone());
    if let Some(path) = &args.token_file {
        let token = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("--token-file {}: {e}", path.display()))?;
        let token = token.trim();
        anyhow::ensure!(
            token.len() >= 16 && token.bytes().all(|b| b.is_ascii_alphanumeric()),
            "--token-file {}: give at least 16 letters and digits",
            path.display()
        );
        app.access = fibril_ui::access::Access(Some(token.into()));
    }
    let open = app.open.clone();
    tokio::spawn(selections.follow(Duration::from_secs(2), move || {
        open.load(Ordering::Relaxed) > 0
    }));
    let listener = tokio::net::TcpListener::bind(args.listen_address)
        .await
        .map_err(|e| anyhow::anyhow!("listening on {}: {e}", args.listen_address))?;
    let address = listener.local_addr()?;
    if let Some(path) = &args.address_file {
        // Written whole, then renamed: a reader never sees half of it.
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let tmp = path.with_extension("tmp");
        std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?
            .write_all(format!("{address}\n").as_bytes())?;
        std::fs::rename(&tmp, path)?;
    }
    tracing::info!(%address, relay = %args.relay, "UI serving: http://{address}/");
    axum::serve(listener, router(app))
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    Ok(())
}
