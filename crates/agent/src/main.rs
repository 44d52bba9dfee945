//! fibril-agent: wires the subsystems together and runs them.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::Context;
use clap::Parser;
use fibril_agent::{drain::Drain, server, state::Cidr, Agent, Config};

// Flows are many small allocations made on one thread and freed on another
// (the ring evicts them); mimalloc handles that pattern far better than
// glibc's malloc (the L7 proxy spent ~15% of its time in malloc/free).
// Built without transparent huge pages (`no_thp`): mimalloc would madvise
// its arena MADV_HUGEPAGE, and with THP defrag on madvise a fault may stall
// in compaction (a cold ring's first GetFlows: up to 1 s instead of 0.2 s).
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Debug, Parser)]
#[command(
    name = "fibril-agent",
    about = "Fibril per-node agent",
    // A flag given twice takes the last: --config-dir's come first, the
    // command line's after them win.
    args_override_self = true
)]
struct Args {
    /// A directory of flags, one file each, named as the flag and holding
    /// its value (a mounted ConfigMap, as cilium-agent's --config-dir);
    /// the command line's flags win over it.
    #[arg(long)]
    config_dir: Option<PathBuf>,
    /// This node's name (in a DaemonSet: the downward API's spec.nodeName).
    #[arg(long, env = "K8S_NODE_NAME", default_value = "fibril-node")]
    node_name: String,
    #[arg(long, default_value = "default")]
    cluster_name: String,
    /// This node's pod CIDR. Unset in Kubernetes mode: its Node's
    /// spec.podCIDRs (ipam.mode=kubernetes); else 10.200.0.0/24.
    #[arg(long)]
    pod_cidr: Option<String>,
    #[arg(long, default_value = "/var/lib/fibril")]
    state_dir: PathBuf,
    /// bpffs directory for pinned maps and links.
    #[arg(long, default_value = "/sys/fs/bpf/fibril")]
    bpf_dir: PathBuf,
    #[arg(long, default_value = api::DEFAULT_SOCKET)]
    socket: PathBuf,
    /// Flow ring capacity, 2^n-1 (Hubble's hubble-event-buffer-capacity).
    #[arg(long, default_value_t = 4095)]
    flow_capacity: usize,
    /// The Hubble observer API on a Unix socket (the hubble CLI:
    /// `--server unix://PATH`).
    #[arg(long, default_value = "/run/fibril/hubble.sock")]
    hubble_socket: PathBuf,
    /// The Hubble observer API on TCP as well (port 0: any free port; the
    /// bound address is written to STATE_DIR/hubble.addr). Off by default:
    /// anyone who can connect reads every flow, so give it with TLS and a
    /// client CA (mTLS, as Cilium's 4244) wherever others can reach it.
    /// Without it STATE_DIR/hubble.addr says `unix://SOCKET`.
    /// `ip:port`, or `:port` for every address (as Cilium writes it).
    #[arg(long, value_parser = hubble::parse_listen_address)]
    hubble_listen_address: Option<std::net::SocketAddr>,
    /// TLS for the Hubble API's TCP listener: certificate (PEM).
    #[arg(long, requires = "hubble_tls_key_file")]
    hubble_tls_cert_file: Option<PathBuf>,
    /// TLS private key (PEM).
    #[arg(long, requires = "hubble_tls_cert_file")]
    hubble_tls_key_file: Option<PathBuf>,
    /// CA certificates (PEM) client certificates must chain to: mutual TLS.
    #[arg(long, requires = "hubble_tls_cert_file")]
    hubble_tls_client_ca_files: Option<PathBuf>,
    /// Serve Prometheus metrics on this address (port 0: any free port;
    /// the bound address is written to STATE_DIR/metrics.addr).
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Serve Hubble's flow metrics (`hubble_*`) on this address (port 0:
    /// any free port, written to STATE_DIR/hubble-metrics.addr).
    #[arg(long, default_value = "127.0.0.1:9965")]
    hubble_metrics_addr: std::net::SocketAddr,
    /// A cgroup v2 directory (Cilium's --cgroup-root): proxied connections
    /// of the processes under it (pods and this agent) move their payload
    /// socket to socket, past the TCP/IP stack. None: no shortcut.
    #[arg(long)]
    cgroup_root: Option<std::path::PathBuf>,
    /// Socket load balancing (Cilium's --bpf-lb-sock): the processes
    /// under --cgroup-root connect to a service's backend directly, no
    /// per-packet translation. Needs --cgroup-root.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    bpf_lb_sock: bool,
    /// With --bpf-lb-sock: only this agent's network namespace
    /// (`socketLB.hostNamespaceOnly`); pods keep the per-packet
    /// translation at their veth.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    bpf_lb_sock_hostns_only: bool,
    /// The XDP prefilter (Cilium's flag): the device whose packets from
    /// listed source prefixes (`fibril prefilter update`) are dropped
    /// before the stack. Unset: no prefilter.
    #[arg(long)]
    prefilter_device: Option<String>,
    /// Where the prefilter runs: `native` (in the driver) or `generic`
    /// (the stack's XDP hook, for devices without native support).
    #[arg(long, default_value = "native", value_parser = ["native", "generic"])]
    prefilter_mode: String,
    /// The host firewall (Cilium's `hostFirewall.enabled`): host policies
    /// (nodeSelector) enforced on the node's own traffic on --devices,
    /// from its pods and to its pods.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    enable_host_firewall: bool,
    /// The host firewall in audit mode: what host policies would drop is
    /// forwarded and reported with verdict AUDIT.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    host_firewall_audit: bool,
    /// Kube-proxy replacement (Cilium's `kube-proxy-replacement`): node
    /// ports and external addresses served on --devices by the datapath
    /// (Maglev for traffic from outside), so kube-proxy is not needed.
    #[arg(long, default_value_t = false, action = clap::ArgAction::Set)]
    kube_proxy_replacement: bool,
    /// Maglev's table size (Cilium's flag): slots per external frontend,
    /// one of 251, 509, 1021, 2039, 4093, 8191, 16381, 32749.
    #[arg(long, default_value_t = abi::MAGLEV_DEFAULT_TABLE_SIZE)]
    bpf_lb_maglev_table_size: u32,
    /// The node's devices (Cilium's `devices`), comma-separated: where
    /// the host firewall watches the node's traffic and node ports are
    /// served.
    #[arg(long, value_delimiter = ',')]
    devices: Vec<String>,
    /// This node's labels, `key=value` comma-separated (host policies'
    /// nodeSelectors match them). In Kubernetes mode its Node's labels.
    #[arg(long, value_delimiter = ',', value_parser = parse_node_label)]
    node_labels: Vec<(String, String)>,
    /// The L7 proxy's port on 127.0.0.1 (0: the previous run's if free,
    /// else any free port).
    #[arg(long, default_value_t = 0)]
    proxy_port: u16,
    /// Seconds a request the L7 proxy forwarded may wait for its response
    /// head; then the client gets 504 (Cilium's http-request-timeout). 0:
    /// no limit. At most a year.
    #[arg(long, default_value_t = 3600, value_parser = clap::value_parser!(u64).range(0..=365 * 86_400))]
    http_request_timeout: u64,
    /// What the L7 proxy does with an encoded slash or backslash (`%2F`,
    /// `%5C`) in a request's path, which servers read differently: reject
    /// (400, Envoy's default REJECT_REQUEST) or unescape (decoded to `/`,
    /// resolved, and sent so to the server).
    #[arg(long, default_value = "reject")]
    http_escaped_slashes: proxy::rules::EscapedSlashes,
    /// The DNS proxy's port (UDP and TCP) on 127.0.0.1 (0: any free port).
    #[arg(long, default_value_t = 0)]
    dns_proxy_port: u16,
    /// toFQDNs: a DNS answer is kept at least this many seconds.
    #[arg(long, default_value_t = 3600)]
    tofqdns_min_ttl: u64,
    /// toFQDNs: seconds an expired address stays once its connections
    /// are idle.
    #[arg(long, default_value_t = 60)]
    tofqdns_idle_connection_grace_period: u64,
    /// toFQDNs: learned addresses per endpoint (beyond: not learned,
    /// counted in fibril_fqdn_ips_refused_total).
    #[arg(long, default_value_t = 1000)]
    tofqdns_max_ips_per_endpoint: usize,
    /// Conntrack entries one endpoint's traffic may hold in the shared
    /// table (262,144 entries); past it the endpoint's new connections are
    /// refused (CT_MAP_INSERTION_FAILED, counted), so that one pod opening
    /// flows as fast as it can never evicts other pods' connections. 0: no
    /// budget.
    #[arg(long, default_value_t = datapath::DEFAULT_CT_ENDPOINT_BUDGET)]
    ct_endpoint_budget: u32,
    /// Kvstore mode (Cilium's `--kvstore etcd`): the cluster's etcd
    /// members, `http://ip:port`, comma-separated. Policies are then the
    /// cluster's, kept there. None: this node alone.
    #[arg(long, value_delimiter = ',')]
    kvstore: Vec<String>,
    /// Seconds this node's keys in the kvstore outlive it (its lease;
    /// Cilium's kvstore-lease-ttl, 15 min).
    #[arg(long, default_value_t = 900, value_parser = clap::value_parser!(u64).range(2..=86_400))]
    kvstore_lease_ttl: u64,
    /// Kubernetes mode (Cilium's flag): the kubeconfig of the API server
    /// whose CiliumNetworkPolicies, CiliumClusterwideNetworkPolicies and
    /// NetworkPolicies are this node's policies (the agent installs the
    /// CRDs and reports each policy's status).
    #[arg(long)]
    k8s_kubeconfig_path: Option<PathBuf>,
    /// Kvstore mode: this node's address on the network between nodes
    /// (where other nodes reach it; its InternalIP).
    #[arg(long, env = "FIBRIL_NODE_ADDRESS", default_value = "0.0.0.0")]
    node_address: std::net::Ipv4Addr,
    /// The overlay between nodes (Cilium's --tunnel-protocol): `vxlan`
    /// tunnels traffic to other nodes' pods through a VXLAN device with the
    /// sender's identity in the VNI (needs --kvstore and --node-address);
    /// `disabled`: no overlay.
    #[arg(long, default_value = "disabled", value_parser = ["vxlan", "disabled"])]
    tunnel_protocol: String,
    /// The VXLAN device's UDP port (Cilium's --tunnel-port).
    #[arg(long, default_value_t = 8472, value_parser = clap::value_parser!(u16).range(1..))]
    tunnel_port: u16,
    /// Pods' MTU; 0: the default (behind a tunnel, the underlay's less 50).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u32).range(0..=65_535))]
    mtu: u32,
}

/// The HTTP proxy process's port a restarted agent asks for when it has
/// to start the proxy again: its previous one, if it had one.
fn previous_proxy_port(args: &Args) -> u16 {
    if args.proxy_port != 0 {
        return args.proxy_port;
    }
    let record = args.state_dir.join(netns::PROXY_ROUTING_FILE);
    netns::read_proxy_routing(&record).map_or(0, |(_, table)| (table & 0xffff) as u16)
}

/// Runs the DNS proxy on tokio runtimes of its own (HTTP is the
/// `fibril-l7proxy` process's). Returns its counters and its drain (the
/// agent's drain runs it first).
fn start_dns_proxy(
    agent: Arc<Agent>,
    dns: (std::net::UdpSocket, std::net::TcpListener),
    from_mark: u32,
) -> anyhow::Result<(Arc<proxy::Stats>, Arc<proxy::dns::Drain>)> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .thread_name("proxy")
        .enable_all()
        .build()?;
    let stats = Arc::new(proxy::Stats::default());
    let policy = Arc::new(fibril_agent::l7::ProxyPolicy::new(agent));
    let (dns_udp, dns_tcp) = dns;
    let drain = Arc::new(proxy::dns::Drain::default());
    {
        // UDP DNS: a thread and event loop of its own, reading and
        // answering (apart from the HTTP threads, which are pinned).
        let (policy, stats) = (policy.clone(), stats.clone());
        let policy: Arc<dyn proxy::Policy> = policy;
        let drain = drain.clone();
        let dns_rt = tokio::runtime::Builder::new_current_thread()
            .thread_name("dns-proxy")
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("dns-proxy".into())
            .spawn(move || {
                let serve = proxy::dns::serve_udp(dns_udp, policy, from_mark, stats, drain);
                if let Err(e) = dns_rt.block_on(serve) {
                    tracing::error!(error = %e, "DNS proxy (UDP) stopped");
                }
            })?;
    }
    {
        let (policy, stats) = (policy.clone(), stats.clone());
        rt.spawn(async move {
            if let Err(e) = proxy::dns::serve_tcp(dns_tcp, policy, from_mark, stats).await {
                tracing::error!(error = %e, "DNS proxy (TCP) stopped");
            }
        });
    }
    std::thread::Builder::new()
        .name("proxy".into())
        .spawn(move || rt.block_on(std::future::pending::<()>()))?;
    Ok((stats, drain))
}

/// Serves the Hubble API (gRPC) on a Unix socket and on TCP, on a tokio
/// runtime of its own (the rest of the agent runs on plain threads).
/// How long Hubble clients' streams (`observe --follow`) may stay open
/// once the drain starts.
const HUBBLE_GRACE: std::time::Duration = std::time::Duration::from_secs(1);

/// Serves the Hubble API on a runtime of its own until the drain: then it
/// stops accepting, lets calls in flight finish within `HUBBLE_GRACE`, and
/// its thread ends.
fn start_hubble(
    agent: Arc<Agent>,
    socket: &std::path::Path,
    tcp: Option<std::net::SocketAddr>,
    tls: Option<hubble::server::Tls>,
    state_dir: &std::path::Path,
    drain: Drain,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    use std::os::unix::fs::PermissionsExt;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("hubble")
        .enable_all()
        .build()?;
    let tcp_listener = match tcp {
        Some(tcp) => Some(
            rt.block_on(tokio::net::TcpListener::bind(tcp))
                .with_context(|| format!("binding the Hubble API on {tcp}"))?,
        ),
        None => None,
    };
    let address = match &tcp_listener {
        Some(l) => {
            let bound = l.local_addr()?;
            if tls.as_ref().is_none_or(|t| t.client_ca_pem.is_none()) {
                tracing::warn!(tcp = %bound, "the Hubble API on TCP without mutual TLS: whoever can connect reads every flow");
            }
            bound.to_string()
        }
        None => format!("unix://{}", socket.display()),
    };
    std::fs::write(state_dir.join("hubble.addr"), &address)?;
    if let Some(dir) = socket.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::remove_file(socket).ok();
    let unix_listener = {
        let _guard = rt.enter();
        tokio::net::UnixListener::bind(socket)
            .with_context(|| format!("binding {}", socket.display()))?
    };
    std::fs::set_permissions(socket, std::fs::Permissions::from_mode(0o600))?;
    // Other nodes and the relay reach this node's Hubble API at its TCP
    // address (a Unix socket is no peer's).
    if let (Some(cluster), false) = (agent.cluster(), address.starts_with("unix://")) {
        // Bound to every address (`:4244`): peers reach it at the node's.
        let node = agent.config().node_address;
        let reachable = match address.parse::<std::net::SocketAddr>() {
            Ok(a) if a.ip().is_unspecified() && !node.is_unspecified() => {
                std::net::SocketAddr::from((node, a.port())).to_string()
            }
            _ => address.clone(),
        };
        cluster.set_hubble_address(&reachable);
    }
    let backend = Arc::new(fibril_agent::hubble_backend::HubbleBackend {
        agent,
        address: address.clone(),
    });
    tracing::info!(%address, socket = %socket.display(), "Hubble API ready");
    let limits = hubble::limits::Limits::default();
    let thread = std::thread::Builder::new()
        .name("hubble".into())
        .spawn(move || {
            rt.block_on(async move {
                let stop = drain.signaled();
                let tcp = async {
                    let Some(listener) = tcp_listener else {
                        return Ok(());
                    };
                    let router =
                        match hubble::server::router_with(backend.clone(), tls.as_ref(), limits)
                            .await
                        {
                            Ok(r) => r,
                            Err(e) => {
                                tracing::error!(error = %e, "Hubble API TLS configuration");
                                return Ok(());
                            }
                        };
                    let incoming =
                        hubble::limits::incoming(hubble::limits::tcp_nodelay(listener), limits);
                    router
                        .serve_with_incoming_shutdown(incoming, drain.signaled())
                        .await
                };
                let unix = async {
                    let router = hubble::server::router_plain(backend.clone(), limits).await;
                    // Clients here may name the socket's path as the
                    // authority: `UnixAuthority` makes that acceptable.
                    let accepted = tokio_stream::StreamExt::map(
                        tokio_stream::wrappers::UnixListenerStream::new(unix_listener),
                        |conn| conn.map(hubble::unix_authority::UnixAuthority::new),
                    );
                    let incoming = hubble::limits::incoming(accepted, limits);
                    router
                        .serve_with_incoming_shutdown(incoming, drain.signaled())
                        .await
                };
                let deadline = async {
                    stop.await;
                    tokio::time::sleep(HUBBLE_GRACE).await;
                };
                tokio::select! {
                    served = async { tokio::try_join!(tcp, unix) } => {
                        if let Err(e) = served {
                            tracing::error!(error = %e, "Hubble API stopped");
                        }
                    }
                    _ = deadline => tracing::info!("Hubble API: streams still open are cut"),
                }
            })
        })?;
    Ok(thread)
}

/// Reads the Hubble API's TLS files, if configured.
fn hubble_tls(args: &Args) -> anyhow::Result<Option<hubble::server::Tls>> {
    let read = |p: &PathBuf| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
    let (Some(cert), Some(key)) = (&args.hubble_tls_cert_file, &args.hubble_tls_key_file) else {
        return Ok(None);
    };
    Ok(Some(hubble::server::Tls {
        cert_pem: read(cert)?,
        key_pem: read(key)?,
        client_ca_pem: args
            .hubble_tls_client_ca_files
            .as_ref()
            .map(read)
            .transpose()?,
    }))
}

/// Kubernetes mode: a kubeconfig given, or running in a pod
/// (`KUBERNETES_SERVICE_HOST` set, as Cilium detects it).
fn kubernetes_config(args: &Args) -> Option<fibril_agent::kubernetes::KubernetesConfig> {
    let in_cluster = std::env::var_os("KUBERNETES_SERVICE_HOST").is_some();
    (args.k8s_kubeconfig_path.is_some() || in_cluster).then(|| {
        fibril_agent::kubernetes::KubernetesConfig {
            kubeconfig: args.k8s_kubeconfig_path.clone(),
        }
    })
}

/// The command line with `--config-dir`'s flags put first: each file a
/// flag (`true`/`false` for switches), unknown names refused.
fn argv_with_config_dir(argv: Vec<std::ffi::OsString>) -> anyhow::Result<Vec<std::ffi::OsString>> {
    use clap::CommandFactory;
    let text: Vec<String> = argv
        .iter()
        .map(|a| a.to_string_lossy().into_owned())
        .collect();
    let dir = text.iter().enumerate().find_map(|(i, a)| {
        a.strip_prefix("--config-dir=")
            .map(str::to_string)
            .or_else(|| {
                (a == "--config-dir")
                    .then(|| text.get(i + 1).cloned())
                    .flatten()
            })
    });
    let Some(dir) = dir else { return Ok(argv) };
    let command = Args::command();
    let mut from_dir = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .with_context(|| format!("--config-dir {dir}"))?
        .collect::<Result<_, _>>()?;
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        // A mounted ConfigMap's own `..data` links and hidden files.
        if name.starts_with('.') || !entry.path().is_file() {
            continue;
        }
        let value = std::fs::read_to_string(entry.path())
            .with_context(|| format!("--config-dir {dir}: {name}"))?;
        let value = value.trim();
        let arg = command
            .get_arguments()
            .find(|a| a.get_long() == Some(name.as_str()) && name != "config-dir")
            .with_context(|| format!("--config-dir {dir}: {name:?} is no flag of fibril-agent"))?;
        if arg.get_action().takes_values() {
            from_dir.push(format!("--{name}={value}").into());
        } else {
            match value {
                "true" => from_dir.push(format!("--{name}").into()),
                "false" => {}
                other => {
                    anyhow::bail!("--config-dir {dir}: {name}: {other:?} is not true or false")
                }
            }
        }
    }
    let mut out = vec![argv[0].clone()];
    out.extend(from_dir);
    out.extend(argv.into_iter().skip(1));
    Ok(out)
}

/// A `--node-labels` entry: `key=value`, both as Kubernetes allows.
fn parse_node_label(s: &str) -> Result<(String, String), String> {
    let (k, v) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected key=value"))?;
    policy::labels::validate_label_key(k).map_err(|e| format!("{k:?}: {e}"))?;
    policy::labels::validate_label_value(v).map_err(|e| format!("{v:?}: {e}"))?;
    Ok((k.to_string(), v.to_string()))
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse_from(argv_with_config_dir(std::env::args_os().collect())?);
    let tls = hubble_tls(&args)?;
    let kubernetes = kubernetes_config(&args);
    let kubernetes_mode = kubernetes.is_some();
    let pod_cidr = match (&args.pod_cidr, &kubernetes) {
        (Some(c), _) => c.clone(),
        (None, Some(k)) => fibril_agent::kubernetes::node_pod_cidr(k, &args.node_name)
            .context("ipam.mode=kubernetes: this node's pod CIDR from its Node object")?,
        (None, None) => "10.200.0.0/24".to_string(),
    };
    let pod_cidr: Cidr = pod_cidr
        .parse()
        .map_err(|e| anyhow::anyhow!("--pod-cidr: {e}"))?;
    std::fs::create_dir_all(&args.state_dir)
        .with_context(|| format!("creating {}", args.state_dir.display()))?;
    // The HTTP proxy runs as a process of its own that outlives the agent:
    // a restarted agent finds it (and its port) on its socket.
    let l7_link = fibril_agent::l7proxy::Link::connect(fibril_agent::l7proxy::SpawnConfig {
        program: std::env::current_exe()?.with_file_name("fibril-l7proxy"),
        state_dir: args.state_dir.clone(),
        port: previous_proxy_port(&args),
        request_timeout_s: args.http_request_timeout,
        escaped_slashes: args.http_escaped_slashes.to_string(),
    })
    .context("starting the L7 proxy")?;
    let (dns_udp, dns_tcp) = proxy::dns::listen(args.dns_proxy_port)
        .with_context(|| format!("binding the DNS proxy on 127.0.0.1:{}", args.dns_proxy_port))?;
    let host_firewall = if args.enable_host_firewall {
        let node_labels = match &kubernetes {
            Some(k) => fibril_agent::kubernetes::node_labels(k, &args.node_name)
                .context("the host firewall: this node's labels from its Node object")?,
            None => args.node_labels.iter().cloned().collect(),
        };
        Some(fibril_agent::HostFirewall {
            devices: args.devices.clone(),
            audit: args.host_firewall_audit,
            node_labels,
        })
    } else {
        None
    };
    let config = Config {
        host_firewall,
        kube_proxy_replacement: args.kube_proxy_replacement.then(|| {
            fibril_agent::KubeProxyReplacement {
                devices: args.devices.clone(),
                maglev_table_size: args.bpf_lb_maglev_table_size,
            }
        }),
        node_name: args.node_name,
        cluster_name: args.cluster_name,
        pod_cidr,
        state_dir: args.state_dir,
        bpf_dir: args.bpf_dir,
        socket: args.socket,
        flow_capacity: args.flow_capacity,
        proxy: None,
        ct_endpoint_budget: args.ct_endpoint_budget,
        kvstore: (!args.kvstore.is_empty()).then(|| fibril_agent::cluster::KvstoreConfig {
            endpoints: args.kvstore.clone(),
            lease_ttl: std::time::Duration::from_secs(args.kvstore_lease_ttl),
            node_address: args.node_address,
            pod_cidr: pod_cidr.to_string(),
            policies: !kubernetes_mode,
        }),
        kubernetes,
        node_address: args.node_address,
        tunnel_port: (args.tunnel_protocol == "vxlan").then_some(args.tunnel_port),
        mtu: (args.mtu != 0).then_some(args.mtu),
        prefilter: args.prefilter_device.clone().map(|d| {
            let mode = if args.prefilter_mode == "generic" {
                datapath::PrefilterMode::Generic
            } else {
                datapath::PrefilterMode::Native
            };
            (d, mode)
        }),
        fqdn: fibril_agent::fqdn::FqdnConfig {
            min_ttl_s: args.tofqdns_min_ttl,
            idle_grace_s: args.tofqdns_idle_connection_grace_period,
            max_ips_per_endpoint: args.tofqdns_max_ips_per_endpoint,
        },
    };
    let redirect = datapath::ProxyRedirect {
        dns_port: dns_tcp.local_addr()?.port(),
        ..datapath::ProxyRedirect::for_port(l7_link.port)
    };
    let config = Config {
        proxy: Some(redirect),
        ..config
    };
    let agent = Agent::new(config.clone()).context("starting the agent")?;
    let reader = agent
        .datapath()
        .take_event_reader()
        .context("the events ring buffer is already taken")?;
    let stop = Arc::new(AtomicBool::new(false));
    let events = {
        let (observer, sources, stop) =
            (agent.observer.clone(), agent.flow_sources(), stop.clone());
        std::thread::Builder::new()
            .name("events".into())
            .spawn(move || observer.run_reader(reader, sources, stop))?
    };
    let metrics = args.metrics_addr.map(|a| {
        (
            a,
            "metrics.addr",
            fibril_agent::metrics::render as fn(&Agent) -> String,
        )
    });
    let hubble_metrics = Some((
        args.hubble_metrics_addr,
        "hubble-metrics.addr",
        fibril_agent::metrics::render_hubble as fn(&Agent) -> String,
    ));
    for (addr, file, render) in metrics.into_iter().chain(hubble_metrics) {
        let l = std::net::TcpListener::bind(addr)
            .with_context(|| format!("binding metrics on {addr}"))?;
        std::fs::write(config.state_dir.join(file), l.local_addr()?.to_string())?;
        let agent = agent.clone();
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || fibril_agent::metrics::serve(agent, l, render))?;
    }
    let (proxy_stats, dns_drain) =
        start_dns_proxy(agent.clone(), (dns_udp, dns_tcp), redirect.mark_from)?;
    l7_link.start_reading(agent.clone())?;
    agent.attach_l7_proxy(l7_link);
    agent.set_proxy_stats(proxy_stats);
    if let Some(cgroup) = &args.cgroup_root {
        match agent.datapath().attach_proxy_shortcut(cgroup) {
            Ok(()) => {
                tracing::info!(cgroup = %cgroup.display(), "L7 proxy socket shortcut attached")
            }
            // Everything works without it, through the stack.
            Err(e) => tracing::warn!(error = %e, "L7 proxy socket shortcut unavailable"),
        }
    }
    match (&args.cgroup_root, args.bpf_lb_sock) {
        (Some(cgroup), true) => agent
            .datapath()
            .attach_socket_lb(cgroup, args.bpf_lb_sock_hostns_only)
            .with_context(|| format!("socket load balancing on {}", cgroup.display()))?,
        (None, true) => anyhow::bail!("--bpf-lb-sock needs --cgroup-root"),
        // Off now: an earlier run's pinned programs go.
        (_, false) => agent.datapath().detach_socket_lb(),
    }
    if args.bpf_lb_sock {
        tracing::info!(
            host_namespace_only = args.bpf_lb_sock_hostns_only,
            "socket load balancing attached"
        );
    }
    {
        // The conntrack census (status's entry count), then toFQDNs:
        // expired names go (their addresses once idle).
        let agent = agent.clone();
        std::thread::Builder::new()
            .name("ct-census".into())
            .spawn(move || loop {
                std::thread::sleep(std::time::Duration::from_secs(5));
                let live = agent.ct_census();
                if let Err(e) = agent.fqdn.gc(&live) {
                    tracing::warn!(error = %e, "toFQDNs garbage collection");
                }
            })?;
    }
    tracing::info!(port = redirect.port, "L7 proxy ready");
    let drain = Drain::new();
    let hubble = start_hubble(
        agent.clone(),
        &args.hubble_socket,
        args.hubble_listen_address,
        tls,
        &config.state_dir,
        drain.clone(),
    )?;
    let listener = server::bind(&config.socket)
        .with_context(|| format!("binding {}", config.socket.display()))?;
    {
        // The drain shuts the local API's listener: its accept returns.
        let listener = listener.try_clone()?;
        drain.on_signals(move || {
            use std::os::fd::AsRawFd;
            nix::sys::socket::shutdown(listener.as_raw_fd(), nix::sys::socket::Shutdown::Both).ok();
        })?;
    }
    agent
        .observer
        .agent_event(flow::agent_event::Kind::AgentStarted);
    tracing::info!(socket = %config.socket.display(), node = %config.node_name, "agent ready");
    server::serve(agent.clone(), listener, drain);
    shut_down(&agent, &dns_drain, hubble, events, &stop)
}

/// The drain's end, in order: the local API is closed (`serve` returned);
/// the DNS proxy stops taking queries (the datapath's direct path takes
/// DNS over) and answers those in flight (their learned addresses are
/// committed: the state lock is not taken yet); Hubble's calls end (within
/// `HUBBLE_GRACE`); the events reader stops; then, with the state lock
/// held so that no change is half-made or starts, the state is written
/// whole, and the process exits. The datapath keeps enforcing with what
/// is pinned; the HTTP proxy process keeps running.
fn shut_down(
    agent: &Agent,
    dns: &proxy::dns::Drain,
    hubble: std::thread::JoinHandle<()>,
    events: std::thread::JoinHandle<()>,
    stop: &AtomicBool,
) -> ! {
    let started = std::time::Instant::now();
    dns.run(std::time::Duration::from_secs(2));
    hubble.join().ok();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    events.join().ok();
    let state = agent.control().lock();
    let saved = agent.control().checkpoint(&state);
    match &saved {
        Ok(()) => tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "agent drained: state written, the datapath goes on enforcing"
        ),
        Err(e) => {
            tracing::error!(error = %e, "agent drained, but writing the state failed (the log has every change)")
        }
    }
    // Exits with the lock held: nothing changes the state after the write.
    std::process::exit(if saved.is_ok() { 0 } else { 1 })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(files: &[(&str, &str)]) -> PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let d = std::env::temp_dir().join(format!("fibril-config-dir-{}-{n}", std::process::id()));
        std::fs::remove_dir_all(&d).ok();
        std::fs::create_dir_all(d.join("..data")).unwrap();
        for (k, v) in files {
            std::fs::write(d.join(k), v).unwrap();
        }
        d
    }

    fn parse(d: &std::path::Path, extra: &[&str]) -> anyhow::Result<Args> {
        let mut argv: Vec<std::ffi::OsString> = vec![
            "fibril-agent".into(),
            format!("--config-dir={}", d.display()).into(),
        ];
        argv.extend(extra.iter().map(Into::into));
        Ok(Args::try_parse_from(argv_with_config_dir(argv)?)?)
    }

    #[test]
    fn config_dir_flags_apply_and_the_command_line_wins() {
        let d = dir(&[
            ("cluster-name", "prod\n"),
            ("tunnel-port", "8473"),
            ("hubble-listen-address", ":4244"),
        ]);
        let a = parse(&d, &[]).unwrap();
        assert_eq!((a.cluster_name.as_str(), a.tunnel_port), ("prod", 8473));
        let a = parse(&d, &["--cluster-name", "other"]).unwrap();
        assert_eq!(a.cluster_name, "other");
        std::fs::remove_dir_all(d).ok();
    }

    #[test]
    fn config_dir_refuses_unknown_and_ill_typed_keys() {
        let d = dir(&[("no-such-flag", "1")]);
        let e = parse(&d, &[]).unwrap_err().to_string();
        assert!(e.contains("no-such-flag") && e.contains("no flag"), "{e}");
        let d2 = dir(&[("tunnel-port", "seventy")]);
        assert!(parse(&d2, &[]).is_err());
        std::fs::remove_dir_all(d).ok();
        std::fs::remove_dir_all(d2).ok();
    }
}
