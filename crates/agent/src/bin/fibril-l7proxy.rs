//! fibril-l7proxy: the HTTP proxy as a process of its own, started by the
//! agent and outliving it (see `fibril_agent::l7proxy`).
#![forbid(unsafe_code)]

use clap::Parser;

// As the agent's: requests allocate and free many small buffers across
// threads, which glibc's malloc handles far worse.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "fibril-l7proxy")]
struct Args {
    /// The agent's state directory (the socket, pid and log live there;
    /// the proxy exits when its socket is removed).
    #[arg(long)]
    state_dir: std::path::PathBuf,
    /// Port on 127.0.0.1 (0: any free port; a taken one: any).
    #[arg(long, default_value_t = 0)]
    port: u16,
    /// Seconds a forwarded request may wait for its response head (0: no
    /// limit).
    #[arg(long, default_value_t = 3600)]
    request_timeout: u64,
    /// reject or unescape (see fibril-agent --http-escaped-slashes).
    #[arg(long, default_value = "reject")]
    escaped_slashes: proxy::rules::EscapedSlashes,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    fibril_agent::l7proxy::run_process(fibril_agent::l7proxy::ProcessConfig {
        state_dir: args.state_dir,
        port: args.port,
        http: proxy::http::Config {
            request_timeout: std::time::Duration::from_secs(args.request_timeout),
            escaped_slashes: args.escaped_slashes,
            ..Default::default()
        },
    })
}
