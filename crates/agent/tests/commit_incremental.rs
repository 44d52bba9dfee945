//! The agent's commit path applies only what a change touched (the
//! state's change record, the engine's hints, per-identity deltas, the
//! ipcache diffed by key, rule cookies released and reused). This test
//! proves it ends where a full computation would: a seeded random run of
//! every kind of change (endpoints added, removed, relabelled; policies
//! added and deleted; DNS answers learned and expired; audit mode) through
//! `Control::commit` on real kernel maps, and after each change the maps
//! must equal what a fresh engine computes for the whole state: every
//! policy entry (with the rule its cookie names), every endpoint's flags,
//! every ipcache entry; and the snapshot the HTTP proxy (the real
//! `fibril-l7proxy`, started as the agent starts it) holds after the
//! commits' updates must be the one made from the whole state. The state
//! files must load back to the same state.
//! Rule cookies are reused at once here (the hardest case for knowing
//! which are still in the maps). Needs root (BPF); a failing run prints
//! its seed (`FIBRIL_COMMIT_SEED` repeats it).

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use datapath::{Config, Datapath};
use fibril_agent::control::Control;
use fibril_agent::ipcache::Ipcache;
use fibril_agent::l7proxy::{Link, SpawnConfig};
use fibril_agent::policy_sync::{map_entries, PolicySync};
use fibril_agent::state::{Endpoint, State, Store};
use policy::labels::{pod_identity_labels, PodMeta};
use test_support::{unique_name, Rng};

const NAMESPACES: [&str; 2] = ["shop", "ops"];
const APPS: [&str; 4] = ["web", "client", "bad", "db"];
const NAMES: [&str; 3] = ["api.example.com.", "www.example.com.", "other.test."];

/// Policies the run adds and deletes: endpoint selectors, a deny,
/// namespace-wide rules, CIDRs with an exception, entities, and toFQDNs by
/// pattern and by name (learned addresses become identities they select).
const POLICIES: [&str; 8] = [
    "metadata: {name: web, namespace: shop}\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: client}}]\n    toPorts: [{ports: [{port: \"80\", protocol: TCP}]}]\n",
    "metadata: {name: deny-bad, namespace: shop}\nspec:\n  endpointSelector: {}\n  ingressDeny:\n  - fromEndpoints: [{matchLabels: {app: bad}}]\n",
    "metadata: {name: cidr, namespace: shop}\nspec:\n  endpointSelector: {matchLabels: {app: client}}\n  egress:\n  - toCIDR: [192.0.2.0/24]\n  - toCIDRSet: [{cidr: 10.0.0.0/8, except: [10.1.0.0/16]}]\n    toPorts: [{ports: [{port: \"5432\", protocol: TCP}]}]\n",
    "metadata: {name: fqdn-pattern, namespace: shop}\nspec:\n  endpointSelector: {matchLabels: {app: client}}\n  egress:\n  - toFQDNs: [{matchPattern: \"*.example.com\"}]\n    toPorts: [{ports: [{port: \"443\", protocol: TCP}]}]\n",
    "metadata: {name: fqdn-name, namespace: ops}\nspec:\n  endpointSelector: {}\n  egress:\n  - toFQDNs: [{matchName: api.example.com}]\n",
    "metadata: {name: world, namespace: ops}\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  ingress:\n  - fromEntities: [world]\n",
    "metadata: {name: ns-wide, namespace: ops}\nspec:\n  endpointSelector: {}\n  ingress:\n  - fromEndpoints: [{}]\n    toPorts: [{ports: [{port: \"9090\", protocol: TCP}]}]\n",
    "metadata: {name: db, namespace: shop}\nspec:\n  endpointSelector: {matchLabels: {app: db}}\n  ingress:\n  - fromEndpoints: [{matchExpressions: [{key: app, operator: In, values: [web, client]}]}]\n    toPorts: [{ports: [{port: \"5432\", protocol: TCP}]}]\n",
];

fn policy(i: usize) -> policy::Policy {
    let yaml = format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\n{}",
        POLICIES[i]
    );
    policy::parse("t.yaml", &yaml, "default")
        .unwrap()
        .policies
        .remove(0)
}

fn labels(ns: &str, app: &str, canary: bool) -> policy::LabelSet {
    let mut l: BTreeMap<String, String> = [("app".to_string(), app.to_string())].into();
    if canary {
        l.insert("track".into(), "canary".into());
    }
    pod_identity_labels(&PodMeta {
        namespace: ns,
        labels: &l,
        namespace_labels: &BTreeMap::new(),
        service_account: "default",
        cluster: "default",
    })
}

fn endpoint(id: u32, ns: &str, labels: policy::LabelSet) -> Endpoint {
    Endpoint {
        id,
        container_id: format!("c{id}"),
        ifname: "eth0".into(),
        netns: String::new(),
        namespace: ns.into(),
        pod: format!("p{id}"),
        ipv4: Ipv4Addr::new(10, 77, (id >> 8) as u8, id as u8),
        host_ifname: String::new(),
        host_ifindex: 0,
        host_mac: [0; 6],
        pod_mac: [0; 6],
        labels,
        identity: 0,
    }
}

/// A policy entry as compared: LPM length, key, flags, port prefix, and
/// the (namespace, name, kind) of the rule its cookie stands for.
type Entry = (u32, [u8; 12], u8, u8, (String, String, String));

fn key_bytes(k: &abi::PolicyKeyData) -> [u8; 12] {
    let mut out = [0u8; 12];
    out[..4].copy_from_slice(&k.ep_id.to_ne_bytes());
    out[4..8].copy_from_slice(&k.identity.to_ne_bytes());
    out[8] = k.direction;
    out[9] = k.protocol;
    out[10..].copy_from_slice(&k.dport.to_ne_bytes());
    out
}

/// What the kernel must hold for `state`: a fresh engine's full answer.
fn expected(state: &State) -> (Vec<Entry>, BTreeMap<Ipv4Addr, u32>) {
    let identities = state.all_identities();
    let ids: Vec<(u32, &policy::LabelSet)> = identities.iter().map(|(i, l)| (*i, l)).collect();
    let local = state.local_identities();
    let named = state.named_ports();
    let mut engine = policy::Engine::new("default");
    engine.update(&policy::engine::Inputs {
        policies: state.policies(),
        policy_generation: 0,
        identities: &ids,
        named_ports: &named,
        local,
        audit_namespaces: state.audit_namespaces(),
        hint: None,
    });
    let empty = policy::EndpointPolicy::default();
    let mut entries = Vec::new();
    let mut flags = BTreeMap::new();
    for ep in state.endpoints().values() {
        let computed = engine.policy(ep.identity).unwrap_or(&empty);
        let mut origins = Vec::new();
        let (map, f) = map_entries(ep.id, computed, |o| {
            origins.push(o.clone());
            origins.len() as u32
        });
        for ((len, k), v) in map {
            let r = fibril_agent::observer::policy_ref(&origins[v.cookie as usize - 1]);
            entries.push((
                len,
                key_bytes(&k),
                v.flags,
                v.prefix,
                (r.namespace, r.name, r.kind),
            ));
        }
        flags.insert(ep.ipv4, f);
    }
    entries.sort();
    (entries, flags)
}

/// What the kernel holds, with each cookie read through the agent's table.
fn actual(dp: &Datapath, control: &Control) -> Vec<Entry> {
    let refs = control.policy().policy_refs();
    let refs = refs.read().unwrap();
    let mut out: Vec<Entry> = dp
        .policy_entries()
        .unwrap()
        .into_iter()
        .map(|e| {
            let r = &refs[e.value.cookie as usize - 1];
            (
                e.prefix_len,
                key_bytes(&e.key),
                e.value.flags,
                e.value.prefix,
                (r.namespace.clone(), r.name.clone(), r.kind.clone()),
            )
        })
        .collect();
    out.sort();
    out
}

fn check(step: usize, what: &str, dp: &Datapath, control: &Control, link: &Link, seed: u64) {
    link.flush();
    let state = control.lock();
    let context = format!("seed {seed}, step {step} ({what})");
    assert_eq!(
        link.last_snapshot().as_deref(),
        Some(&control.l7_snapshot(&state)),
        "the proxy's snapshot, {context}"
    );
    let (entries, flags) = expected(&state);
    assert_eq!(actual(dp, control), entries, "policy entries, {context}");
    for ep in state.endpoints().values() {
        let info = dp
            .endpoint(ep.ipv4)
            .unwrap_or_else(|| panic!("endpoint {} missing, {context}", ep.id));
        assert_eq!(
            info.identity, ep.identity,
            "identity of {}, {context}",
            ep.id
        );
        assert_eq!(info.flags, flags[&ep.ipv4], "flags of {}, {context}", ep.id);
        let index = control.lookup();
        assert_eq!(
            index.by_ip.get(&ep.ipv4).map(|m| m.endpoint.identity),
            Some(ep.identity),
            "index, {context}"
        );
    }
    let host = netns::host_ipv4_addresses().unwrap();
    let mut want: Vec<(Ipv4Addr, u32, u32, Option<Ipv4Addr>)> = Ipcache::build(&state, &host)
        .entries()
        .into_iter()
        .map(|((a, l), e)| (a, l, e.identity, e.tunnel))
        .collect();
    let mut have = dp.ipcache_entries().unwrap();
    want.sort();
    have.sort();
    assert_eq!(have, want, "ipcache, {context}");
}

struct Cleanup(std::path::PathBuf, std::path::PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        Datapath::unpin_all(&self.0);
        std::fs::remove_dir_all(&self.1).ok();
    }
}

#[test]
fn every_change_ends_where_a_full_computation_does() {
    let mut rng = Rng::from_env("FIBRIL_COMMIT_SEED");
    let seed = rng.0;
    let name = unique_name("fibril-commit-");
    let pin = std::path::PathBuf::from("/sys/fs/bpf").join(&name);
    let dir = std::env::temp_dir().join(&name);
    let _cleanup = Cleanup(pin.clone(), dir.clone());
    let dp = std::sync::Arc::new(Datapath::open(Config::new(&pin)).unwrap());

    let mut state = State::default();
    for i in [0, 3, 6] {
        state.insert_policy(policy(i));
    }
    let mut next_id = 1u32;
    for _ in 0..12 {
        let ns = rng.pick(&NAMESPACES);
        let l = labels(ns, rng.pick(&APPS), false);
        state.add_endpoint(endpoint(next_id, ns, l)).unwrap();
        next_id += 1;
    }
    let control = Control::open(
        "default",
        "test-node",
        dp.clone(),
        Store::new(&dir).unwrap(),
        state,
        PolicySync::with_cookie_reuse_after(std::time::Duration::ZERO),
        None,
    )
    .unwrap();
    std::fs::create_dir_all(&dir).unwrap();
    let link = Link::connect(SpawnConfig {
        program: env!("CARGO_BIN_EXE_fibril-l7proxy").into(),
        state_dir: dir.clone(),
        port: 0,
        request_timeout_s: 10,
        escaped_slashes: "reject".into(),
    })
    .unwrap();
    control.attach_l7_proxy(link.clone());
    check(0, "start", &dp, &control, &link, seed);

    for step in 1..=150 {
        let mut s = control.lock();
        let ids: Vec<u32> = s.endpoints().keys().copied().collect();
        let what = match rng.below(8) {
            0 => {
                let ns = rng.pick(&NAMESPACES);
                let l = labels(ns, rng.pick(&APPS), rng.below(3) == 0);
                s.add_endpoint(endpoint(next_id, ns, l)).unwrap();
                next_id += 1;
                "endpoint added"
            }
            1 if !ids.is_empty() => {
                s.remove_endpoint(rng.pick(&ids));
                "endpoint removed"
            }
            2 if !ids.is_empty() => {
                let id = rng.pick(&ids);
                let ns = s.endpoints()[&id].namespace.clone();
                let l = labels(&ns, rng.pick(&APPS), rng.below(3) == 0);
                s.relabel_endpoint(id, l, None).unwrap();
                "endpoint relabelled"
            }
            3 => {
                s.insert_policy(policy(rng.below(POLICIES.len() as u64) as usize));
                "policy added"
            }
            4 => {
                let keys: Vec<String> = s.policies().keys().cloned().collect();
                if !keys.is_empty() {
                    s.remove_policy(&rng.pick(&keys));
                }
                "policy deleted"
            }
            5 | 6 if !ids.is_empty() => {
                let ip = Ipv4Addr::new(198, 51, 100, rng.below(40) as u8);
                let ep = rng.pick(&ids);
                let entry = s.fqdn_entry(rng.pick(&NAMES));
                entry.endpoints.insert(ep);
                entry.ips.insert(ip, 1_000 + rng.below(100));
                "DNS answer learned"
            }
            7 => {
                let cut = 1_000 + rng.below(100);
                s.fqdn_retain_ips(|_, expires| expires >= cut);
                "learned addresses expired"
            }
            _ => {
                let ns = rng.pick(&NAMESPACES);
                s.set_audit(ns, rng.below(2) == 0);
                "audit mode"
            }
        };
        control
            .commit(&mut s)
            .unwrap_or_else(|e| panic!("seed {seed}, step {step} ({what}): {e}"));
        drop(s);
        check(step, what, &dp, &control, &link, seed);
    }

    // What is on disk is the state: endpoints, identities, policies,
    // learned names, CIDR identities.
    let loaded = Store::new(&dir).unwrap().load().unwrap();
    let state = control.lock();
    assert_eq!(
        serde_json::to_string(&loaded).unwrap(),
        serde_json::to_string(&*state).unwrap(),
        "seed {seed}"
    );
    assert_eq!(
        loaded.identities().all(),
        state.identities().all(),
        "seed {seed}"
    );
}
