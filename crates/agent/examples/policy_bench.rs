//! Policy computation benchmark (issue 3's figures): 5,000 endpoints with
//! 2,000 identities and 1,000 rules.
//!
//! - full computation (pure engine) time and memory;
//! - the agent's start: a full sync into real kernel maps (a private bpffs
//!   directory) and the state snapshot;
//! - one change of each kind through the agent's commit (`Control`): a new
//!   pod, a label change, a policy added, a learned DNS answer; timed until
//!   the kernel maps, the views and the state log hold it (p50/p99 of
//!   `ROUNDS`), with the HTTP proxy process attached (each commit sends it
//!   what changed), and the process's RSS.
//!
//! Run: `cargo run --release -p fibril-agent --example policy_bench` (root).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Instant;

use fibril_agent::control::Control;
use fibril_agent::policy_sync::PolicySync;
use fibril_agent::state::{Endpoint, State, Store};
use policy::labels::{pod_identity_labels, PodMeta};

const NAMESPACES: usize = 20;
const APPS: usize = 100;
const ENDPOINTS: usize = 5000;
const RULES: usize = 1000;

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn labels(ns: usize, app: usize) -> policy::LabelSet {
    let l: BTreeMap<String, String> = [("app".to_string(), format!("a{app}"))].into();
    pod_identity_labels(&PodMeta {
        namespace: &format!("ns{ns}"),
        labels: &l,
        namespace_labels: &BTreeMap::new(),
        service_account: "default",
        cluster: "default",
    })
}

fn endpoint(id: u32, ns: usize, app: usize, identity: u32) -> Endpoint {
    Endpoint {
        id,
        container_id: format!("c{id}"),
        ifname: "eth0".into(),
        netns: String::new(),
        namespace: format!("ns{ns}"),
        pod: format!("a{app}-{id}"),
        ipv4: Ipv4Addr::from(0x0a40_0000 + id),
        host_ifname: String::new(),
        // No veth: the endpoint map entry is written, no program runs.
        host_ifindex: 0,
        host_mac: [0; 6],
        pod_mac: [0; 6],
        labels: labels(ns, app),
        identity,
    }
}

fn policy_yaml(k: usize) -> String {
    let ns = k % NAMESPACES;
    let app = k / NAMESPACES;
    if k % 50 == 49 {
        // Namespace-wide: every pod of the namespace on 9090.
        return format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p{k}, namespace: ns{ns}}}\nspec:\n  endpointSelector: {{matchLabels: {{app: a{app}}}}}\n  ingress:\n  - fromEndpoints: [{{}}]\n    toPorts: [{{ports: [{{port: \"9090\", protocol: TCP}}]}}]\n"
        );
    }
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p{k}, namespace: ns{ns}}}\nspec:\n  endpointSelector: {{matchLabels: {{app: a{app}}}}}\n  ingress:\n  - fromEndpoints:\n    - matchLabels: {{app: a{}}}\n    - matchExpressions: [{{key: app, operator: In, values: [a{}, a{}]}}]\n    toPorts: [{{ports: [{{port: \"8080\", protocol: TCP}}]}}]\n  egress:\n  - toEndpoints: [{{matchLabels: {{app: a{}}}}}]\n    toPorts: [{{ports: [{{port: \"5432\", protocol: TCP}}]}}]\n",
        (app + 1) % APPS,
        (app + 2) % APPS,
        (app + 3) % APPS,
        (app + 5) % APPS
    )
}

/// A toFQDNs policy: the first app of each namespace may reach names
/// under example.com, so learned answers become identities it selects.
fn fqdn_policy_yaml(ns: usize) -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: fqdn{ns}, namespace: ns{ns}}}\nspec:\n  endpointSelector: {{matchLabels: {{app: a0}}}}\n  egress:\n  - toFQDNs: [{{matchPattern: \"*.example.com\"}}]\n    toPorts: [{{ports: [{{port: \"443\", protocol: TCP}}]}}]\n"
    )
}

fn parse_one(yaml: &str) -> anyhow::Result<policy::Policy> {
    Ok(policy::parse("bench", yaml, "default")
        .map_err(|e| anyhow::anyhow!("{e}"))?
        .policies
        .remove(0))
}

/// p50 / p99 / max of `samples` (ms).
fn summary(samples: &mut [f64]) -> String {
    samples.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize];
    format!(
        "p50 {:.3} ms, p99 {:.3} ms, max {:.3} ms ({} changes)",
        at(0.5),
        at(0.99),
        at(1.0),
        samples.len()
    )
}

/// Changes of each kind timed through the agent's commit.
const ROUNDS: usize = 200;

fn main() -> anyhow::Result<()> {
    let mut state = State::default();
    for k in 0..RULES {
        state.insert_policy(parse_one(&policy_yaml(k))?);
    }
    for ns in 0..NAMESPACES {
        state.insert_policy(parse_one(&fqdn_policy_yaml(ns))?);
    }
    for e in 0..ENDPOINTS {
        let (ns, app) = ((e % (NAMESPACES * APPS)) / APPS, e % APPS);
        state
            .add_endpoint(endpoint(e as u32 + 1, ns, app, 0))
            .map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    let identities = state.all_identities();
    println!(
        "workload: {} endpoints, {} identities, {} rules",
        state.endpoints().len(),
        state.identities().all().len() - 10,
        state
            .policies()
            .values()
            .map(|p| p.rules.len())
            .sum::<usize>()
    );

    // 1. Pure computation, every endpoint's policy from scratch.
    let named = state.named_ports();
    let local = state.local_identities();
    let id_refs: Vec<(u32, &policy::LabelSet)> = identities.iter().map(|(i, l)| (*i, l)).collect();
    let rss0 = rss_kib();
    let t = Instant::now();
    let mut engine = policy::Engine::new("default");
    let touched = engine.update(&policy::engine::Inputs {
        policies: state.policies(),
        policy_generation: 0,
        identities: &id_refs,
        named_ports: &named,
        local,
        audit_namespaces: &Default::default(),
        hint: None,
    });
    let full = t.elapsed();
    let entries: usize = touched
        .iter()
        .filter_map(|id| engine.policy(*id))
        .map(|p| p.entries.len())
        .sum();
    let rss1 = rss_kib();
    println!(
        "full computation: {:.1} ms for {} identities ({} entries), memory +{} KiB",
        full.as_secs_f64() * 1e3,
        touched.len(),
        entries,
        rss1.saturating_sub(rss0)
    );
    drop(engine);

    // 2. The agent's commit path on real kernel maps (a private bpffs
    // directory) and a state directory of its own.
    let name = format!("fibril-policy-bench-{}", std::process::id());
    let pin = std::path::PathBuf::from("/sys/fs/bpf").join(&name);
    let dir = std::env::temp_dir().join(&name);
    struct Cleanup(std::path::PathBuf, std::path::PathBuf);
    impl Drop for Cleanup {
        fn drop(&mut self) {
            datapath::Datapath::unpin_all(&self.0);
            std::fs::remove_dir_all(&self.1).ok();
        }
    }
    let _cleanup = Cleanup(pin.clone(), dir.clone());
    let dp = std::sync::Arc::new(datapath::Datapath::open(datapath::Config::new(&pin))?);
    let store = Store::new(&dir)?;
    let t = Instant::now();
    let control = Control::open(
        "default",
        "bench",
        dp,
        store,
        state,
        PolicySync::default(),
        None,
    )?;
    println!(
        "full sync to kernel maps (agent start): {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    // The HTTP proxy process, as the agent runs it: every commit sends it
    // what changed (`cargo build --release --bins` first; xtask does).
    let proxy = std::env::current_exe()?
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join("fibril-l7proxy"))
        .filter(|p| p.exists())
        .ok_or_else(|| {
            anyhow::anyhow!("build fibril-l7proxy first (cargo build --release --bins)")
        })?;
    let t = Instant::now();
    let link = fibril_agent::l7proxy::Link::connect(fibril_agent::l7proxy::SpawnConfig {
        program: proxy,
        state_dir: dir.clone(),
        port: 0,
        request_timeout_s: 10,
        escaped_slashes: "reject".into(),
    })?;
    control.attach_l7_proxy(link);
    println!(
        "L7 proxy started and given the whole snapshot: {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );

    let timed = |what: &str, change: &mut dyn FnMut(&mut State, usize)| -> anyhow::Result<()> {
        let mut samples = Vec::with_capacity(ROUNDS);
        for round in 0..ROUNDS {
            let mut s = control.lock();
            let t = Instant::now();
            change(&mut s, round);
            control.commit(&mut s)?;
            samples.push(t.elapsed().as_secs_f64() * 1e3);
        }
        println!("one change, {what}: {}", summary(&mut samples));
        Ok(())
    };
    // 3a. A new pod with a new identity that other rules' selectors match
    // (added, then deleted the next round).
    let canary = {
        let mut l = labels(3, 7).0;
        l.push(policy::Label::new("k8s", "version", "canary"));
        policy::LabelSet::new(l)
    };
    timed("new pod (new identity) / its deletion", &mut |s, round| {
        if round % 2 == 0 {
            let mut ep = endpoint(9001, 3, 7, 0);
            ep.labels = canary.clone();
            s.add_endpoint(ep).expect("identity");
        } else {
            s.remove_endpoint(9001);
        }
    })?;
    // 3b. A label change: a pod moves to another identity and back.
    timed("label change", &mut |s, round| {
        let to = if round % 2 == 0 {
            labels(4, 12)
        } else {
            labels(0, 1)
        };
        s.relabel_endpoint(1, to, None).expect("relabel");
    })?;
    // 3c. One policy added, then deleted the next round.
    let extra = {
        let mut p = parse_one(&policy_yaml(RULES + 17))?;
        p.name = "extra".into();
        p
    };
    timed("policy added / deleted", &mut |s, round| {
        if round % 2 == 0 {
            s.insert_policy(extra.clone());
        } else {
            s.remove_policy(&extra.key());
        }
    })?;
    // 3d. A learned DNS answer: a new address for a name the toFQDNs
    // policies select (a CIDR identity, its ipcache entry and the policy
    // entries of the endpoints those policies select).
    timed("learned DNS answer (new address)", &mut |s, round| {
        let entry = s.fqdn_entry(&format!("api{}.example.com.", round % 7));
        entry.endpoints.insert(1);
        entry
            .ips
            .insert(Ipv4Addr::from(0xc633_6400 + round as u32), u64::MAX / 2);
    })?;
    println!("agent RSS at {ENDPOINTS} endpoints: {} KiB", rss_kib());
    // Every policy added and deleted above left its rules' cookies behind
    // before cookies were released; now the table holds the rules in force
    // (and the released ones waiting out the reuse delay).
    println!(
        "rule cookie table: {} entries",
        control.policy().policy_refs().read().map_or(0, |t| t.len())
    );
    Ok(())
}
