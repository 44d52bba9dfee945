//! Policy computation benchmark (issue 3's figures): 5,000 endpoints with
//! 2,000 identities and 1,000 rules.
//!
//! - full computation (pure engine) time and memory;
//! - full sync into real kernel maps (a private bpffs directory);
//! - one incremental change each: a new pod, a label change, one policy
//!   added, timed until the kernel maps hold the result.
//!
//! Run: `cargo run --release -p fibril-agent --example policy_bench` (root).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::time::Instant;

use fibril_agent::policy_sync::PolicySync;
use fibril_agent::state::{Endpoint, State};
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

fn main() -> anyhow::Result<()> {
    let mut state = State::default();
    for k in 0..RULES {
        let p = policy::parse("bench", &policy_yaml(k), "default")
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .policies
            .remove(0);
        state.policies.insert(p.key(), p);
    }
    for e in 0..ENDPOINTS {
        let (ns, app) = ((e % (NAMESPACES * APPS)) / APPS, e % APPS);
        let l = labels(ns, app);
        let identity = state
            .identities
            .acquire(&l)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        state
            .endpoints
            .insert(e as u32 + 1, endpoint(e as u32 + 1, ns, app, identity));
    }
    let identities = state.all_identities();
    println!(
        "workload: {} endpoints, {} identities, {} rules",
        state.endpoints.len(),
        state.identities.all().len() - 10,
        state
            .policies
            .values()
            .map(|p| p.rules.len())
            .sum::<usize>()
    );

    // 1. Pure computation, every endpoint's policy from scratch.
    let named = state.named_ports();
    let local: BTreeMap<u32, &policy::LabelSet> = state
        .endpoints
        .values()
        .map(|e| (e.identity, &e.labels))
        .collect();
    let id_refs: Vec<(u32, &policy::LabelSet)> = identities.iter().map(|(i, l)| (*i, l)).collect();
    let rss0 = rss_kib();
    let t = Instant::now();
    let mut engine = policy::Engine::new("default");
    let touched = engine.update(&policy::engine::Inputs {
        policies: &state.policies,
        policy_generation: 0,
        identities: &id_refs,
        named_ports: &named,
        local: &local,
        audit_namespaces: &Default::default(),
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

    // 2. The same through the agent's sync into real kernel maps.
    let pin = std::path::PathBuf::from(format!(
        "/sys/fs/bpf/fibril-policy-bench-{}",
        std::process::id()
    ));
    struct Unpin(std::path::PathBuf);
    impl Drop for Unpin {
        fn drop(&mut self) {
            datapath::Datapath::unpin_all(&self.0);
        }
    }
    let _unpin = Unpin(pin.clone());
    let dp = datapath::Datapath::open(datapath::Config::new(&pin))?;
    let mut sync = PolicySync::default();
    let t = Instant::now();
    let n = sync.apply(&state, &dp, "default")?;
    println!(
        "full sync to kernel maps: {:.1} ms ({n} endpoints written)",
        t.elapsed().as_secs_f64() * 1e3
    );

    let mut timed =
        |what: &str, state: &mut State, change: &mut dyn FnMut(&mut State)| -> anyhow::Result<()> {
            let t = Instant::now();
            change(state);
            let n = sync.apply(state, &dp, "default")?;
            println!(
                "incremental, {what}: {:.2} ms ({n} endpoints rewritten)",
                t.elapsed().as_secs_f64() * 1e3
            );
            Ok(())
        };
    // 3a. A new pod with a new identity that other rules' selectors match.
    timed("new pod (new identity)", &mut state, &mut |s| {
        let l = labels(3, 7);
        let mut l2 = l.0.clone();
        l2.push(policy::Label::new("k8s", "version", "canary"));
        let l2 = policy::LabelSet::new(l2);
        let identity = s.identities.acquire(&l2).expect("identity");
        let mut ep = endpoint(9001, 3, 7, identity);
        ep.labels = l2;
        s.endpoints.insert(9001, ep);
    })?;
    // 3b. A label change: the pod moves to another identity.
    timed("label change", &mut state, &mut |s| {
        let new = labels(4, 12);
        let identity = s.identities.acquire(&new).expect("identity");
        let ep = s.endpoints.get_mut(&9001).expect("endpoint");
        s.identities.release(&ep.labels.clone());
        ep.labels = new;
        ep.identity = identity;
    })?;
    // 3c. One policy added.
    timed("one policy added", &mut state, &mut |s| {
        let p = policy::parse("bench", &policy_yaml(RULES + 17), "default")
            .expect("policy")
            .policies
            .remove(0);
        let mut p = p;
        p.name = "extra".into();
        s.policies.insert(p.key(), p);
        s.policy_generation += 1;
    })?;
    Ok(())
}
