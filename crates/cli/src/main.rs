//! fibril: the command line (`cilium`/`hubble` roles for one node).
#![forbid(unsafe_code)]

mod cni_chain;
mod connectivity;
mod hubble_cmds;
mod istio_cni;
mod k8s;
mod kubelet;
mod kubelet_pod;
mod kubelet_server;
mod lab;
mod lab_services;
mod observe;

use std::path::PathBuf;

use anyhow::{bail, Context};
use api::{Request, Response};
use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "fibril",
    about = "Fibril: eBPF networking, identity-based policy and flow observability"
)]
struct Cli {
    /// The lab whose agent to talk to (env FIBRIL_LAB).
    #[arg(long, global = true, env = "FIBRIL_LAB", default_value = "default")]
    lab: String,
    /// Agent socket; defaults to the lab's (its first node's, or `--node`'s).
    #[arg(long, global = true, env = "FIBRIL_SOCKET")]
    socket: Option<PathBuf>,
    /// In a multi-node lab, the node whose agent to talk to (default: the
    /// first).
    #[arg(long, global = true, env = "FIBRIL_NODE")]
    node: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum ConnectivityCmd {
    /// Run the scenarios: real requests from pods, checked by their result
    /// and by the flows they produced.
    Test {
        /// Only the tests whose name matches this regular expression.
        #[arg(long)]
        test: Option<String>,
        /// Also write the results as JUnit XML here.
        #[arg(long)]
        junit_file: Option<PathBuf>,
        /// How flows are checked: strict (a missing flow fails the
        /// action), warning, disabled.
        #[arg(long, value_enum, default_value = "strict")]
        flow_validation: connectivity::FlowValidation,
        /// Invert this test's expectations on purpose (to see a failure
        /// reported).
        #[arg(long)]
        break_test: Option<String>,
    },
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    Compact,
    Json,
    Table,
}

#[derive(Subcommand)]
enum Cmd {
    /// One-host labs.
    Lab {
        #[command(subcommand)]
        cmd: LabCmd,
    },
    /// Agent status.
    Status {
        /// Output format.
        #[arg(short, long, value_enum, default_value = "compact")]
        output: Output,
    },
    /// Local endpoints: pods, their addresses and identities (`endpoint list`).
    Endpoint {
        #[command(subcommand)]
        cmd: ListCmd,
    },
    /// Security identities and their labels (`identity list`).
    Identity {
        #[command(subcommand)]
        cmd: ListCmd,
    },
    /// DNS names the DNS proxy learned for toFQDNs (`fqdn list`).
    Fqdn {
        #[command(subcommand)]
        cmd: ListCmd,
    },
    /// Network policies: import, validate, get, delete, audit, trace.
    Policy {
        #[command(subcommand)]
        cmd: PolicyCmd,
    },
    /// Connection tracking (`ct list [--address IP]`, as `cilium bpf ct
    /// list global`).
    Ct {
        #[command(subcommand)]
        cmd: CtCmd,
    },
    /// Services the agent load-balances (`service list`, as `cilium
    /// service list`).
    Service {
        #[command(subcommand)]
        cmd: ServiceCmd,
    },
    /// The XDP prefilter's source prefixes, dropped on the node's device
    /// before the stack (as `cilium prefilter list|update|delete`).
    Prefilter {
        #[command(subcommand)]
        cmd: PrefilterCmd,
    },
    /// Hubble's list commands: `list nodes`, `list namespaces`.
    List {
        #[command(subcommand)]
        what: ListWhat,
        #[command(flatten)]
        server: observe::Server,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table", global = true)]
        output: Output,
    },
    /// Observe flows (hubble observe's flags).
    Observe(Box<observe::Args>),
    /// Cilium's connectivity scenarios on a two-node lab of the test's own
    /// (`connectivity test`; the lab is removed at the end).
    Connectivity {
        #[command(subcommand)]
        cmd: ConnectivityCmd,
    },
}

#[derive(Subcommand)]
enum ListWhat {
    /// The nodes the server knows, their state and flow counts.
    Nodes,
    /// The namespaces seen in flows.
    Namespaces,
}

#[derive(Subcommand)]
enum LabCmd {
    /// Create the lab (default: the seed's microservices example).
    Up {
        /// The lab file (YAML: pods, namespaces, policies).
        #[arg(short = 'f', long)]
        file: Option<PathBuf>,
    },
    /// Remove everything the lab created.
    Down,
    /// Run kubectl against the lab's Kubernetes apiserver (`kubernetes:
    /// true`), as its admin: `fibril lab kubectl -- get pods -A`.
    Kubectl {
        /// kubectl's arguments, after `--`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Print the address of the lab's web UI, with its token (the UI
    /// serves only whoever holds it: the lab's flows are root's).
    Ui,
    /// Run a command in a pod: `fibril lab exec NS/POD -- CMD...`.
    Exec {
        /// `namespace/pod`.
        pod: String,
        /// The command and its arguments.
        #[arg(last = true, required = true)]
        cmd: Vec<String>,
    },
    /// Install Istio's CNI plugin on every node of a Kubernetes lab, as
    /// Istio's istio-cni DaemonSet does: chained after the node's primary
    /// plugin (Fibril's) in its configuration list. New pods then go
    /// through both; pods with Istio's sidecar (an `istio-proxy` container
    /// and the `sidecar.istio.io/status` annotation) get Istio's traffic
    /// redirection in their namespace.
    IstioCni {
        /// The plugin's ambient mode (pods and namespaces labelled
        /// `istio.io/dataplane-mode=ambient` are handed to Istio's node
        /// agent, which the lab does not have: their ADD fails).
        #[arg(long)]
        ambient: bool,
        /// Namespaces the plugin leaves alone.
        #[arg(long = "exclude-namespace", default_value = "kube-system")]
        exclude_namespaces: Vec<String>,
        /// Seconds to wait for each node's primary configuration list.
        #[arg(long, default_value_t = 60)]
        wait: u64,
    },
    /// Run the CNI CHECK of a pod's network as a runtime does (each
    /// plugin of its node's configuration list, in order, with the pod's
    /// result): `fibril lab cni-check NS/POD`.
    CniCheck {
        /// `namespace/pod`.
        pod: String,
    },
    /// Restart the lab's agent, or `--node`'s (pods, programs and maps
    /// stay).
    RestartAgent,
    /// Kill a node's agent and cut its underlay link (multi-node labs): to
    /// the others it is gone once its lease runs out.
    StopNode {
        /// The node's name, as the lab file gives it.
        name: String,
    },
    /// Bring a stopped node back: its link, routes and agent.
    StartNode {
        /// The node's name, as the lab file gives it.
        name: String,
    },
    /// Stop the lab's etcd (kvstore labs): the datapath keeps enforcing.
    StopEtcd,
    /// Start the lab's etcd again with its data; the agents reconnect.
    StartEtcd,
    /// The lab's kubelet of one node (`lab up` runs it in the node's
    /// namespace): runs the pods the scheduler binds to the node.
    #[command(hide = true)]
    Kubelet {
        /// The node (as the lab file names it) whose pods it runs.
        #[arg(long)]
        node: String,
    },
    /// Stop the lab's kube-apiserver (`kubernetes: true`): the agents keep
    /// enforcing the policies they have, their watches retry.
    StopApiserver,
    /// Start the lab's kube-apiserver again; the agents' watches list
    /// again and catch up.
    StartApiserver,
    /// Change a pod's labels live, as `kubectl label`: `key=value` sets,
    /// `key-` removes; its identity follows on every node.
    Label {
        /// `namespace/pod`.
        pod: String,
        /// `key=value` or `key-`, one or more.
        #[arg(required = true)]
        labels: Vec<String>,
    },
    /// Print the default lab file.
    Default,
}

#[derive(Subcommand)]
enum ListCmd {
    /// List them.
    List {
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
}

#[derive(Subcommand)]
enum ServiceCmd {
    /// List each service's frontends and their backends.
    List {
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
}

#[derive(Subcommand)]
enum PrefilterCmd {
    /// The device, the prefixes and what was dropped.
    List {
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
    /// Drop packets from these source prefixes.
    Update {
        /// A.B.C.D/N (repeatable).
        #[arg(long = "cidr", required = true)]
        cidrs: Vec<String>,
    },
    /// Stop dropping these source prefixes.
    Delete {
        /// A.B.C.D/N (repeatable).
        #[arg(long = "cidr", required = true)]
        cidrs: Vec<String>,
    },
}

#[derive(Subcommand)]
enum CtCmd {
    /// List the tracked connections.
    List {
        /// Only entries to or from this address.
        #[arg(long)]
        address: Option<std::net::Ipv4Addr>,
        /// Output format.
        #[arg(short, long, value_enum, default_value = "table")]
        output: Output,
    },
}

#[derive(Subcommand)]
enum PolicyCmd {
    /// Import every policy of the files (all or nothing).
    Import {
        /// YAML or JSON files, each with one or more policies.
        files: Vec<PathBuf>,
        /// The namespace of policies that name none (default: `default`).
        #[arg(short, long)]
        namespace: Option<String>,
        /// Then check established connections against the new policy and
        /// cut those it no longer allows (by default they go on until they
        /// close, as in Cilium).
        #[arg(long)]
        enforce_established: bool,
    },
    /// Check files without importing anything.
    Validate {
        /// YAML or JSON files, each with one or more policies.
        files: Vec<PathBuf>,
    },
    /// Print the imported policies and their revision.
    Get,
    /// Delete `namespace/name` (or a cluster-wide policy's name).
    Delete {
        /// `namespace/name`, or `name` for a cluster-wide policy.
        key: String,
        /// Then cut established connections the remaining policy does not
        /// allow.
        #[arg(long)]
        enforce_established: bool,
    },
    /// Put a namespace in audit mode: what policy would drop there is
    /// forwarded and reported with verdict AUDIT (`--off` ends it).
    Audit {
        /// The namespace.
        namespace: String,
        /// End audit mode: enforce again.
        #[arg(long)]
        off: bool,
    },
    /// Explain the verdict for a connection and the rule that decides it.
    Trace {
        /// `namespace/pod` or an IPv4 address.
        #[arg(long)]
        from: String,
        /// `namespace/pod` or an IPv4 address.
        #[arg(long)]
        to: String,
        /// `8080/TCP`, `53/UDP`, `8/ICMP` (ICMP: the type); protocol defaults to TCP.
        #[arg(long)]
        port: String,
    },
}

/// `fibril status | head -1`: once the reader is gone, printing fails with
/// EPIPE, and Rust's print macros panic on it. Exit as other Unix tools do
/// when SIGPIPE kills them (status 141), without a panic message.
fn quiet_on_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let payload = info.payload();
        let msg = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or_default();
        if msg.starts_with("failed printing to std") && msg.contains("Broken pipe") {
            std::process::exit(141);
        }
        default(info)
    }));
}

fn main() {
    quiet_on_broken_pipe();
    // `--not` is order-dependent, so it is taken out before clap parses.
    let (argv, negated) = observe::split_not(std::env::args().collect());
    let mut cli = Cli::parse_from(argv);
    if let Cmd::Observe(o) = &mut cli.cmd {
        o.negated = negated;
    }
    match run(cli) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("fibril: {e:#}");
            std::process::exit(1);
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    let socket = cli
        .socket
        .clone()
        .unwrap_or_else(|| lab::agent_dir(&cli.lab, cli.node.as_deref()).join("agent.sock"));
    let call = |req: Request| -> anyhow::Result<Response> { Ok(api::call(&socket, &req)?) };
    match cli.cmd {
        Cmd::Lab { cmd } => match cmd {
            LabCmd::Up { file } => {
                lab::up(&cli.lab, file.as_deref())?;
                println!("lab {:?} is up:", cli.lab);
                let st = lab::load_state(&cli.lab)?;
                let nodes: Vec<Option<&str>> = if st.nodes.is_empty() {
                    vec![None]
                } else {
                    st.nodes.iter().map(|n| Some(n.name.as_str())).collect()
                };
                for node in nodes {
                    let sock = lab::agent_dir(&cli.lab, node).join("agent.sock");
                    if let Some(n) = node {
                        println!("  node {n}:");
                    }
                    let lab_agent =
                        st.agent_pid.is_some() || st.nodes.iter().any(|n| n.agent_pid.is_some());
                    if !lab_agent {
                        println!("    no agent yet: `agents: helm` (a Helm install's DaemonSet runs them)");
                        continue;
                    }
                    if let Response::Endpoints { endpoints } =
                        api::call(&sock, &Request::EndpointList)?
                    {
                        for e in endpoints {
                            println!(
                                "  {}/{}  {}  identity {}",
                                e.namespace, e.pod_name, e.ipv4, e.identity
                            );
                        }
                    }
                }
                if !st.kubernetes_pids.is_empty() {
                    println!(
                        "  Kubernetes: kubeconfig {} (the apiserver listens inside the lab: `fibril --lab {} lab kubectl -- get nodes`)",
                        k8s::admin_kubeconfig(&lab::lab_dir(&cli.lab)).display(),
                        cli.lab
                    );
                }
                if let Some(ui) = lab::ui_url(&cli.lab) {
                    println!("  UI (service map, flows, policy verdicts): {ui}");
                }
                Ok(0)
            }
            LabCmd::Kubectl { args } => {
                let status = lab::kubectl(&cli.lab)?.args(&args).status()?;
                Ok(status.code().unwrap_or(1))
            }
            LabCmd::Ui => {
                let url = lab::ui_url(&cli.lab)
                    .with_context(|| format!("lab {:?} has no UI running", cli.lab))?;
                println!("{url}");
                Ok(0)
            }
            LabCmd::Down => {
                lab::down(&cli.lab)?;
                println!("lab {:?} removed", cli.lab);
                Ok(0)
            }
            LabCmd::Exec { pod, cmd } => lab::exec(&cli.lab, &pod, &cmd),
            LabCmd::IstioCni {
                ambient,
                exclude_namespaces,
                wait,
            } => {
                let options = istio_cni::Options {
                    ambient,
                    exclude_namespaces,
                    wait: std::time::Duration::from_secs(wait),
                };
                for line in istio_cni::install(&cli.lab, &options)? {
                    println!("{line}");
                }
                Ok(0)
            }
            LabCmd::CniCheck { pod } => {
                let plugins = cni_chain::check_pod(&cli.lab, &pod)?;
                println!("CNI CHECK of {pod} passed: {}", plugins.join(", "));
                Ok(0)
            }
            LabCmd::Label { pod, labels } => {
                let (namespace, name) = pod
                    .split_once('/')
                    .ok_or_else(|| anyhow::anyhow!("{pod:?}: give namespace/pod"))?;
                let mut set = std::collections::BTreeMap::new();
                let mut remove = Vec::new();
                for l in &labels {
                    match (l.split_once('='), l.strip_suffix('-')) {
                        (Some((k, v)), _) => {
                            set.insert(k.to_string(), v.to_string());
                        }
                        (None, Some(k)) => remove.push(k.to_string()),
                        (None, None) => {
                            bail!("{l:?}: give key=value to set a label, key- to remove it")
                        }
                    }
                }
                // The pod's own node's agent (the others follow its
                // identity through the kvstore).
                let socket = match (&cli.socket, &cli.node) {
                    (None, None) => lab::pod_socket(&cli.lab, namespace, name),
                    _ => socket.clone(),
                };
                api::call(
                    &socket,
                    &Request::PodLabel {
                        namespace: namespace.to_string(),
                        name: name.to_string(),
                        set,
                        remove,
                    },
                )?;
                Ok(0)
            }
            LabCmd::RestartAgent => {
                lab::restart_agent(&cli.lab, cli.node.as_deref())?;
                Ok(0)
            }
            LabCmd::StopNode { name } => {
                lab::stop_node(&cli.lab, &name)?;
                Ok(0)
            }
            LabCmd::StartNode { name } => {
                lab::start_node(&cli.lab, &name)?;
                Ok(0)
            }
            LabCmd::StopEtcd => {
                lab::stop_etcd(&cli.lab)?;
                Ok(0)
            }
            LabCmd::StartEtcd => {
                lab::start_etcd_again(&cli.lab)?;
                Ok(0)
            }
            LabCmd::Kubelet { node } => {
                kubelet::run(&cli.lab, &node)?;
                Ok(0)
            }
            LabCmd::StopApiserver => {
                lab::stop_apiserver(&cli.lab)?;
                Ok(0)
            }
            LabCmd::StartApiserver => {
                lab::start_apiserver_again(&cli.lab)?;
                Ok(0)
            }
            LabCmd::Default => {
                print!("{}", lab::DEFAULT_LAB);
                Ok(0)
            }
        },
        Cmd::Status { output } => {
            let Response::Status(s) = call(Request::Status)? else {
                bail!("unexpected response")
            };
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!("Node:          {}", s.node_name);
                println!("Pod CIDR:      {}", s.pod_cidr);
                println!("Endpoints:     {}", s.endpoints);
                println!("Identities:    {}", s.identities);
                println!("Policies:      {}", s.policies);
                println!(
                    "Conntrack:     {} entries (busiest endpoint {} of its budget {}; {} new connections refused at a budget)",
                    s.ct_entries, s.ct_busiest_endpoint, s.ct_endpoint_budget, s.ct_budget_overflows
                );
                if s.policy_overflows > 0 {
                    println!(
                        "Policy:        {} endpoint(s) FAIL CLOSED: their policy does not fit the policy map (see `fibril endpoint list`)",
                        s.policy_overflows
                    );
                }
                println!(
                    "Flows:         {}/{} (Seen {}, kernel events lost {})",
                    s.flows_buffered, s.flow_capacity, s.flows_seen, s.events_lost_kernel
                );
                match &s.proxy_shortcut {
                    Some(p) => println!(
                        "L7 shortcut:   on ({} proxied connection ends; {} sends socket to socket, {} through the stack)",
                        p.sockets, p.redirected, p.plain
                    ),
                    None => println!("L7 shortcut:   off (proxied payload crosses the TCP/IP stack)"),
                }
                if let Some(c) = &s.cluster {
                    match &c.etcd_version {
                        Some(v) => println!("Kvstore:       etcd {v} at {}", c.kvstore.join(",")),
                        None => println!(
                            "Kvstore:       UNREACHABLE at {} (the last policies and identities stay in force)",
                            c.kvstore.join(",")
                        ),
                    }
                    println!(
                        "Cluster:       {} node(s): {}",
                        c.nodes.len(),
                        c.nodes.join(", ")
                    );
                    println!(
                        "               {} cluster identities, {} endpoints on other nodes",
                        c.identities, c.remote_endpoints
                    );
                }
                if let Some(k) = &s.kubernetes {
                    println!(
                        "Kubernetes:    {} ({}; policies are its CiliumNetworkPolicy, CiliumClusterwideNetworkPolicy and NetworkPolicy objects)",
                        if k.connected { "connected" } else { "UNREACHABLE" },
                        k.kubeconfig
                    );
                }
                if let Some(h) = &s.host_firewall {
                    let side = |on: bool, by: &[String]| match (on, by.is_empty()) {
                        (false, _) => "off (no host policy)".to_string(),
                        (true, true) => "enforced".to_string(),
                        (true, false) => format!("enforced by {}", by.join(", ")),
                    };
                    println!(
                        "Host firewall: on {}{}; ingress {}; egress {}",
                        h.devices.join(","),
                        if h.audit { " (AUDIT mode)" } else { "" },
                        side(
                            h.enforcement.ingress_enforced,
                            &h.enforcement.ingress_selected_by
                        ),
                        side(
                            h.enforcement.egress_enforced,
                            &h.enforcement.egress_selected_by
                        )
                    );
                }
                if let Some(k) = &s.kube_proxy_replacement {
                    println!(
                        "KubeProxyReplacement: on {} (node ports, external IPs; Maglev table {})",
                        k.devices.join(","),
                        k.maglev_table_size
                    );
                }
                println!("Uptime:        {}s", s.uptime_seconds);
                match hubble_address(&cli.lab, cli.node.as_deref(), None)
                    .and_then(|a| hubble_cmds::status_lines(&a, &observe::Server::default()))
                {
                    Ok(lines) => {
                        for l in lines {
                            println!("{l}");
                        }
                    }
                    Err(e) => println!("Hubble:        unreachable: {e:#}"),
                }
            }
            Ok(0)
        }
        Cmd::Endpoint {
            cmd: ListCmd::List { output },
        } => {
            let Response::Endpoints { endpoints } = call(Request::EndpointList)? else {
                bail!("unexpected response")
            };
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&endpoints)?);
            } else {
                println!(
                    "{:<6} {:<30} {:<16} {:<9} {:<8} {:<8} LABELS",
                    "ID", "POD", "IPV4", "IDENTITY", "INGRESS", "EGRESS"
                );
                for e in endpoints {
                    let enforced = |b: bool| if b { "Enabled" } else { "Disabled" };
                    println!(
                        "{:<6} {:<30} {:<16} {:<9} {:<8} {:<8} {}",
                        e.id,
                        shown(&format!("{}/{}", e.namespace, e.pod_name)),
                        e.ipv4,
                        e.identity,
                        enforced(e.enforcement.ingress_enforced),
                        enforced(e.enforcement.egress_enforced),
                        shown(&e.labels.join(","))
                    );
                }
            }
            Ok(0)
        }
        Cmd::Identity {
            cmd: ListCmd::List { output },
        } => {
            let Response::Identities { identities } = call(Request::IdentityList)? else {
                bail!("unexpected response")
            };
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&identities)?);
            } else {
                println!("{:<8} LABELS", "ID");
                for i in identities {
                    let labels: Vec<String> = i.labels.iter().map(|l| shown(l)).collect();
                    println!("{:<8} {}", i.id, labels.join("\n         "));
                }
            }
            Ok(0)
        }
        Cmd::Fqdn {
            cmd: ListCmd::List { output },
        } => {
            let Response::Fqdn { names } = call(Request::FqdnList)? else {
                bail!("unexpected response")
            };
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&names)?);
            } else {
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0);
                println!("{:<40} {:<16} EXPIRES IN", "NAME", "ADDRESS");
                for n in names {
                    for (ip, expires) in n.ips {
                        let left = match expires.checked_sub(now) {
                            Some(s) => format!("{s}s"),
                            None => "expired (connections open)".into(),
                        };
                        println!("{:<40} {:<16} {left}", n.name, ip.to_string());
                    }
                }
            }
            Ok(0)
        }
        Cmd::Prefilter { cmd } => {
            let request = match cmd {
                PrefilterCmd::List { output } => {
                    let Response::Prefilter(p) = call(Request::PrefilterList)? else {
                        bail!("unexpected response")
                    };
                    if output == Output::Json {
                        println!("{}", serde_json::to_string_pretty(&p)?);
                        return Ok(0);
                    }
                    match &p.device {
                        Some(d) => println!(
                            "Device: {d} ({}), {} prefixes; dropped {} packets ({} bytes), passed {}",
                            p.mode,
                            p.cidrs.len(),
                            p.dropped_packets,
                            p.dropped_bytes,
                            p.passed_packets
                        ),
                        None => println!("Device: none (fibril-agent --prefilter-device IFNAME)"),
                    }
                    for c in &p.cidrs {
                        println!("{c}");
                    }
                    return Ok(0);
                }
                PrefilterCmd::Update { cidrs } => Request::PrefilterUpdate {
                    add: cidrs,
                    remove: Vec::new(),
                },
                PrefilterCmd::Delete { cidrs } => Request::PrefilterUpdate {
                    add: Vec::new(),
                    remove: cidrs,
                },
            };
            call(request)?;
            Ok(0)
        }
        Cmd::Service {
            cmd: ServiceCmd::List { output },
        } => {
            let Response::Services { services } = call(Request::ServiceList)? else {
                bail!("unexpected response")
            };
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&services)?);
                return Ok(0);
            }
            println!("{:<32} {:<24} BACKENDS", "SERVICE", "FRONTEND");
            for svc in &services {
                for f in svc.frontends() {
                    let backends: Vec<String> = f
                        .active
                        .iter()
                        .map(|b| format!("{b} (active)"))
                        .chain(f.terminating.iter().map(|b| format!("{b} (terminating)")))
                        .collect();
                    println!(
                        "{:<32} {:<24} {}",
                        svc.key(),
                        format!("{}:{}/{}", f.address, f.port, f.protocol),
                        if backends.is_empty() {
                            "(none)".to_string()
                        } else {
                            backends.join(", ")
                        }
                    );
                }
            }
            Ok(0)
        }
        Cmd::Ct {
            cmd: CtCmd::List { address, output },
        } => {
            let Response::Conntrack { entries, truncated } =
                call(Request::ConntrackList { address })?
            else {
                bail!("unexpected response")
            };
            if output == Output::Json {
                println!("{}", serde_json::to_string_pretty(&entries)?);
            } else {
                println!(
                    "{:<6} {:<22} {:<22} {:<8} {:>8} FLAGS",
                    "PROTO", "SOURCE", "DESTINATION", "DIR", "EXPIRES"
                );
                for e in &entries {
                    println!(
                        "{:<6} {:<22} {:<22} {:<8} {:>7}s {}",
                        e.protocol,
                        e.source,
                        e.destination,
                        e.direction,
                        e.expires_in_s,
                        e.flags.join(",")
                    );
                }
            }
            if truncated {
                eprintln!(
                    "(only the first {} entries; narrow with --address)",
                    api::CONNTRACK_LIST_MAX
                );
            }
            Ok(0)
        }
        Cmd::Policy { cmd } => policy_cmd(cmd, &call),
        Cmd::Observe(o) => observe(&cli.lab, cli.node.as_deref(), *o),
        Cmd::Connectivity {
            cmd:
                ConnectivityCmd::Test {
                    test,
                    junit_file,
                    flow_validation,
                    break_test,
                },
        } => connectivity::run(&connectivity::Options {
            test: test
                .map(|t| regex::Regex::new(&t))
                .transpose()
                .context("--test")?,
            junit_file,
            flow_validation,
            break_test,
        }),
        Cmd::List {
            what,
            server,
            output,
        } => {
            let address = hubble_address(&cli.lab, cli.node.as_deref(), server.server.clone())?;
            let json = output == Output::Json;
            match what {
                ListWhat::Nodes => hubble_cmds::list_nodes(&address, &server, json)?,
                ListWhat::Namespaces => hubble_cmds::list_namespaces(&address, &server, json)?,
            }
            Ok(0)
        }
    }
}

fn policy_cmd(
    cmd: PolicyCmd,
    call: &dyn Fn(Request) -> anyhow::Result<Response>,
) -> anyhow::Result<i32> {
    match cmd {
        PolicyCmd::Validate { files } => {
            if files.is_empty() {
                bail!("name at least one file");
            }
            let mut bad = 0;
            for f in files {
                let text = std::fs::read_to_string(&f)
                    .with_context(|| format!("reading {}", f.display()))?;
                match policy::parse(&f.display().to_string(), &text, "default") {
                    Ok(p) => {
                        for pol in &p.policies {
                            println!(
                                "{}: {} {} is valid",
                                f.display(),
                                pol.kind.name(),
                                pol.name_key()
                            );
                        }
                        for (doc, kind) in &p.skipped {
                            println!(
                                "{}: document {doc}: skipped {kind} (not a policy)",
                                f.display()
                            );
                        }
                        for w in &p.warnings {
                            eprintln!("warning: {w}");
                        }
                    }
                    Err(e) => {
                        eprintln!("{e}");
                        bad += 1;
                    }
                }
            }
            Ok(if bad > 0 { 1 } else { 0 })
        }
        PolicyCmd::Import {
            files,
            namespace,
            enforce_established,
        } => {
            if files.is_empty() {
                bail!("name at least one file");
            }
            // Read and validate every file before importing any.
            let mut docs = Vec::new();
            for f in &files {
                let text = std::fs::read_to_string(f)
                    .with_context(|| format!("reading {}", f.display()))?;
                policy::parse(
                    &f.display().to_string(),
                    &text,
                    namespace.as_deref().unwrap_or("default"),
                )
                .map_err(|e| anyhow::anyhow!("{e}"))?;
                docs.push((f.display().to_string(), text));
            }
            for (file, yaml) in docs {
                if let Response::Imported {
                    policies,
                    skipped,
                    warnings,
                } = call(Request::PolicyImport {
                    file: file.clone(),
                    yaml,
                    namespace: namespace.clone(),
                })? {
                    for p in policies {
                        println!("imported {p}");
                    }
                    for s in skipped {
                        println!("{file}: {s}, skipped");
                    }
                    for w in warnings {
                        eprintln!("warning: {w}");
                    }
                }
            }
            if enforce_established {
                enforce(call)?;
            }
            Ok(0)
        }
        PolicyCmd::Audit { namespace, off } => {
            call(Request::NamespaceAudit {
                namespace: namespace.clone(),
                audit: !off,
            })?;
            println!(
                "namespace {namespace}: audit mode {}",
                if off { "off" } else { "on" }
            );
            Ok(0)
        }
        PolicyCmd::Trace { from, to, port } => {
            let (protocol, port) = parse_port(&port)?;
            let Response::Trace {
                from,
                to,
                from_identity,
                to_identity,
                egress,
                ingress,
                allowed,
            } = call(Request::PolicyTrace(api::TraceRequest {
                from,
                to,
                protocol,
                port,
            }))?
            else {
                bail!("unexpected response")
            };
            println!(
                "{from} (identity {from_identity}) -> {to} (identity {to_identity}), {}",
                port_text(protocol, port)
            );
            for (what, d) in [
                ("egress of the source", egress),
                ("ingress of the destination", ingress),
            ] {
                println!("  {what}: {}", decision_text(d.as_ref()));
            }
            println!("verdict: {}", if allowed { "ALLOWED" } else { "DENIED" });
            Ok(if allowed { 0 } else { 2 })
        }
        PolicyCmd::Get => {
            let Response::Policies { policies } = call(Request::PolicyGet)? else {
                bail!("unexpected response")
            };
            println!("{}", serde_json::to_string_pretty(&policies)?);
            Ok(0)
        }
        PolicyCmd::Delete {
            key,
            enforce_established,
        } => {
            call(Request::PolicyDelete { key: key.clone() })?;
            println!("deleted {key}");
            if enforce_established {
                enforce(call)?;
            }
            Ok(0)
        }
    }
}

/// `--enforce-established`: established connections meet the policy now.
fn enforce(call: &dyn Fn(Request) -> anyhow::Result<Response>) -> anyhow::Result<()> {
    let Response::Enforced { checked, cut } = call(Request::EnforceEstablished)? else {
        bail!("unexpected response")
    };
    println!("established connections: {checked} checked, {cut} cut");
    Ok(())
}

/// The Hubble API to talk to: `--server`, else the lab agent's.
fn hubble_address(
    lab_name: &str,
    node: Option<&str>,
    server: Option<String>,
) -> anyhow::Result<String> {
    if let Some(s) = server {
        return Ok(s);
    }
    // The lab agent's own socket (a multi-node lab's nodes listen on TCP
    // on the underlay, which this host cannot reach).
    let dir = lab::agent_dir(lab_name, node);
    if dir.join("hubble.sock").exists() {
        return Ok(format!("unix://{}", dir.join("hubble.sock").display()));
    }
    let file = dir.join("state/hubble.addr");
    Ok(std::fs::read_to_string(&file)
        .with_context(|| {
            format!(
                "no Hubble API address in {} (is lab {lab_name:?} up? or give --server)",
                file.display()
            )
        })?
        .trim()
        .to_string())
}

fn observe(lab_name: &str, node: Option<&str>, o: observe::Args) -> anyhow::Result<i32> {
    observe::run(&o, || {
        hubble_address(lab_name, node, o.server.server.clone())
    })
}

/// `8080/TCP` -> (6, 8080).
fn parse_port(s: &str) -> anyhow::Result<(u8, u16)> {
    let (port, proto) = s.split_once('/').unwrap_or((s, "TCP"));
    let protocol = match proto.to_ascii_uppercase().as_str() {
        "TCP" => 6,
        "UDP" => 17,
        "SCTP" => 132,
        "ICMP" => 1,
        other => bail!("--port: unknown protocol {other:?}: expected TCP, UDP, SCTP or ICMP"),
    };
    let port: u16 = port
        .parse()
        .with_context(|| format!("--port: {port:?} is not a port number"))?;
    if protocol == 1 && port > 255 {
        bail!("--port: ICMP type {port} is out of range 0-255");
    }
    Ok((protocol, port))
}

fn port_text(protocol: u8, port: u16) -> String {
    match protocol {
        6 => format!("{port}/TCP"),
        17 => format!("{port}/UDP"),
        132 => format!("{port}/SCTP"),
        1 => format!("ICMP type {port}"),
        p => format!("{port}/proto {p}"),
    }
}

fn decision_text(d: Option<&api::Decision>) -> String {
    let rule = |o: &api::RuleRef| {
        format!(
            "{} {} rule {} ({}[{}])",
            o.kind, o.policy, o.rule, o.direction, o.entry
        )
    };
    match d {
        None => "not a local endpoint: no policy applies here".into(),
        Some(api::Decision::NotEnforced) => {
            "allowed: no policy selects it in this direction".into()
        }
        Some(api::Decision::Allowed { by, l7: None }) => format!("allowed by {}", rule(by)),
        Some(api::Decision::Allowed { by, l7: Some(kind) }) => format!(
            "allowed by {} (its {kind} rules apply in the proxy)",
            rule(by)
        ),
        Some(api::Decision::Denied { by }) => format!("denied by {}", rule(by)),
        Some(api::Decision::DefaultDeny { selected_by }) => {
            format!("default deny: selected by {}", selected_by.join(", "))
        }
        Some(api::Decision::Audited { would_be }) => format!(
            "audit mode: forwarded and reported, would be {}",
            decision_text(Some(would_be))
        ),
    }
}

/// Text from the agent as a terminal should show it: control characters
/// (newlines, escape sequences) escaped, so that no name can forge a table
/// row or drive the terminal. The agent refuses such names; state written
/// by an older agent may still hold them.
fn shown(s: &str) -> String {
    if s.chars().any(char::is_control) {
        s.chars().flat_map(char::escape_default).collect()
    } else {
        s.to_string()
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every command, subcommand and flag says in a line what it is
    /// (`fibril --help` listed some with nothing beside them).
    #[test]
    fn every_command_and_flag_has_a_line_of_help() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments() {
                let builtin = ["help", "version"].contains(&arg.get_id().as_str());
                if !builtin && arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} --{}", arg.get_id()));
                }
            }
            for sub in cmd.get_subcommands() {
                let name = format!("{path} {}", sub.get_name());
                if sub.get_name() != "help" && sub.get_about().is_none() {
                    missing.push(name.clone());
                }
                walk(sub, &name, missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "fibril", &mut missing);
        assert!(missing.is_empty(), "no help for: {missing:#?}");
    }
}
