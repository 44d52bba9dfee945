//! Table-driven tests of policy meaning: documents in, per-endpoint map
//! entries out (semantics §3.1-3.4, §3.10).

use std::collections::BTreeMap;

use fibril_policy::identity::Allocator;
use fibril_policy::{
    endpoint_policy, parse, pod_identity_labels, Context, Direction, EndpointPolicy, EntryKey,
    LabelSet, PodMeta, Policy,
};

fn labels(ns: &str, pairs: &[(&str, &str)]) -> LabelSet {
    let l: BTreeMap<String, String> = pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    pod_identity_labels(&PodMeta {
        namespace: ns,
        labels: &l,
        namespace_labels: &BTreeMap::new(),
        service_account: "default",
        cluster: "default",
    })
}

/// A small cluster: identities for a few pods in two namespaces.
struct World {
    ids: Vec<(u32, LabelSet)>,
}

impl World {
    fn new() -> Self {
        let mut a = Allocator::default();
        for (ns, app) in [
            ("shop", "frontend"),
            ("shop", "backend"),
            ("shop", "other"),
            ("ops", "frontend"),
        ] {
            a.acquire(&labels(ns, &[("app", app)])).unwrap();
        }
        Self { ids: a.all() }
    }

    fn compute(&self, labels: &LabelSet, policies: &[Policy]) -> EndpointPolicy {
        let identity = self
            .ids
            .iter()
            .find(|(_, l)| l == labels)
            .map_or(0, |(id, _)| *id);
        let named = BTreeMap::new();
        let audit = Default::default();
        let ctx = Context {
            identities: &self.ids,
            named_ports: &named,
            cluster: "default",
            audit_namespaces: &audit,
        };
        endpoint_policy(identity, labels, policies, &ctx)
    }

    fn id(&self, ns: &str, app: &str) -> u32 {
        let l = labels(ns, &[("app", app)]);
        self.ids.iter().find(|(_, x)| *x == l).unwrap().0
    }
}

fn policies(yaml: &str) -> Vec<Policy> {
    parse("test.yaml", yaml, "shop").unwrap().policies
}

fn key(identity: u32, direction: Direction, protocol: u8, port: u16) -> EntryKey {
    EntryKey {
        identity,
        direction,
        protocol,
        port,
        port_bits: if protocol == 0 || port == 0 { 0 } else { 16 },
    }
}

const SEED: &str = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: allow-frontend-to-backend, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: backend}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: frontend}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"#;

#[test]
fn selected_direction_becomes_default_deny_plus_allows() {
    let w = World::new();
    let p = policies(SEED);
    let backend = w.compute(&labels("shop", &[("app", "backend")]), &p);
    assert!(backend.ingress_enforced && !backend.egress_enforced);
    let keys: Vec<EntryKey> = backend.entries.keys().copied().collect();
    // Namespace injection: only shop/frontend, not ops/frontend.
    assert_eq!(
        keys,
        vec![key(w.id("shop", "frontend"), Direction::Ingress, 6, 8080)]
    );
    let origin = &backend.entries[&keys[0]].origin;
    assert_eq!(
        (&*origin.policy, origin.rule),
        ("shop/allow-frontend-to-backend", 0)
    );

    let frontend = w.compute(&labels("shop", &[("app", "frontend")]), &p);
    assert!(!frontend.ingress_enforced && !frontend.egress_enforced && frontend.entries.is_empty());
}

#[test]
fn rule_shapes_map_to_the_right_entries() {
    let w = World::new();
    let backend = labels("shop", &[("app", "backend")]);
    let fe = w.id("shop", "frontend");
    for (rules, expected) in [
        // `ingress: [{}]`: enforced, allows nothing.
        ("ingress: [{}]", vec![]),
        // L4 only: any identity on the port, every protocol for ANY.
        (
            "ingress: [{toPorts: [{ports: [{port: \"53\"}]}]}]",
            vec![key(0, Direction::Ingress, 6, 53), key(0, Direction::Ingress, 17, 53), key(0, Direction::Ingress, 132, 53)],
        ),
        // L3 only.
        ("ingress: [{fromEndpoints: [{matchLabels: {app: frontend}}]}]", vec![key(fe, Direction::Ingress, 0, 0)]),
        // matchExpressions, In.
        (
            "ingress: [{fromEndpoints: [{matchExpressions: [{key: app, operator: In, values: [frontend, other]}]}], toPorts: [{ports: [{port: \"80\", protocol: UDP}]}]}]",
            vec![key(fe, Direction::Ingress, 17, 80), key(w.id("shop", "other"), Direction::Ingress, 17, 80)],
        ),
        // An explicit namespace reaches another namespace.
        (
            "ingress: [{fromEndpoints: [{matchLabels: {app: frontend, k8s:io.kubernetes.pod.namespace: ops}}]}]",
            vec![key(w.id("ops", "frontend"), Direction::Ingress, 0, 0)],
        ),
        // Port 0 with TCP: every TCP port.
        ("ingress: [{toPorts: [{ports: [{port: \"0\", protocol: TCP}]}]}]", vec![key(0, Direction::Ingress, 6, 0)]),
    ] {
        let yaml = format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p}}\nspec:\n  endpointSelector: {{matchLabels: {{app: backend}}}}\n  {rules}\n"
        );
        let pol = w.compute(&backend, &policies(&yaml));
        assert!(pol.ingress_enforced, "{rules}");
        let mut got: Vec<EntryKey> = pol.entries.keys().copied().collect();
        let mut want = expected.clone();
        got.sort();
        want.sort();
        assert_eq!(got, want, "{rules}");
    }
}

#[test]
fn port_ranges_become_prefix_entries() {
    let w = World::new();
    let yaml = "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {}\n  egress:\n  - toPorts: [{ports: [{port: \"8080\", endPort: 8083, protocol: TCP}]}]\n";
    let pol = w.compute(&labels("shop", &[("app", "frontend")]), &policies(yaml));
    assert!(pol.egress_enforced && !pol.ingress_enforced);
    let keys: Vec<EntryKey> = pol.entries.keys().copied().collect();
    assert_eq!(
        keys,
        vec![EntryKey {
            identity: 0,
            direction: Direction::Egress,
            protocol: 6,
            port: 8080,
            port_bits: 14
        }]
    );
}

#[test]
fn deny_suppresses_the_allows_it_covers() {
    let w = World::new();
    let yaml = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: p}
spec:
  endpointSelector: {matchLabels: {app: backend}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: frontend}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}, {port: "9090", protocol: TCP}]}]
  - toPorts: [{ports: [{port: "7070", protocol: TCP}]}]
  ingressDeny:
  - fromEndpoints: [{matchLabels: {app: frontend}}]
    toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
"#;
    let pol = w.compute(&labels("shop", &[("app", "backend")]), &policies(yaml));
    let fe = w.id("shop", "frontend");
    let deny = &pol.entries[&key(fe, Direction::Ingress, 6, 8080)];
    assert!(deny.deny);
    assert!(!pol.entries[&key(fe, Direction::Ingress, 6, 9090)].deny);
    assert!(!pol.entries[&key(0, Direction::Ingress, 6, 7070)].deny);
    assert_eq!(pol.entries.len(), 3);
}

#[test]
fn cluster_wide_policies_select_across_namespaces() {
    let w = World::new();
    let yaml = "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: fe}\nspec:\n  endpointSelector: {matchLabels: {app: backend}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: frontend}}]\n";
    let pol = w.compute(&labels("shop", &[("app", "backend")]), &policies(yaml));
    let ids: Vec<u32> = pol.entries.keys().map(|k| k.identity).collect();
    assert_eq!(ids.len(), 2, "frontend in shop and in ops");
    assert!(ids.contains(&w.id("ops", "frontend")));
    // Reserved identities (world) have no namespace: not selected by `{}`.
    let all = "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: all}\nspec:\n  endpointSelector: {}\n  ingress:\n  - fromEndpoints: [{}]\n";
    let pol = w.compute(&labels("shop", &[("app", "backend")]), &policies(all));
    assert!(pol.entries.keys().all(|k| k.identity >= 256));
}

#[test]
fn bad_documents_are_refused_with_file_document_and_field() {
    for (yaml, path, needle) in [
        ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {}\n  ingress:\n  - toPorts: [{ports: [{port: \"70000\"}]}]\n", "spec.ingress[0].toPorts[0].ports[0].port", "out of range"),
        ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {}\n  ingress:\n  - toPorts: [{ports: [{port: \"80\", protocol: ICMP}]}]\n", "spec.ingress[0].toPorts[0].ports[0].protocol", "TCP, UDP, SCTP, VRRP, IGMP, ANY"),
        ("apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: p}\nspec:\n  nodeSelector: {}\n  egress:\n  - toPorts: [{ports: [{port: \"1\", protocol: VRRP}]}]\n", "spec.egress[0].toPorts[0].ports[0].port", "VRRP has no ports"),
        ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  nodeSelector: {}\n", "spec.nodeSelector", "must be CiliumClusterwideNetworkPolicy"),
        ("apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: p}\nspec:\n  nodeSelector: {}\n  endpointSelector: {}\n", "spec.nodeSelector", "not both"),
        ("apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: p}\nspec:\n  nodeSelector: {}\n  ingress:\n  - toPorts: [{ports: [{port: \"80\"}], rules: {http: [{}]}}]\n", "spec.ingress[0].toPorts[0].rules", "no L7 rules"),
        ("apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: p}\nspec:\n  nodeSelector: {}\n  egress:\n  - toFQDNs: [{matchName: a.example}]\n", "spec.egress[0].toFQDNs", "no toFQDNs"),
        ("apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: p}\nspec:\n  ingress: [{}]\n", "spec.endpointSelector", "or a nodeSelector"),
        ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {}\n  ingres: []\n", "spec.ingres", "unknown field `ingres`"),
        ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {}\n  egress:\n  - fromEndpoints: [{}]\n", "spec.egress[0].fromEndpoints", "use the to* spelling"),
        ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector:\n    matchExpressions: [{key: app, operator: In}]\n", "spec.endpointSelector.matchExpressions[0].values", "at least one value"),
        ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {}\n  ingress:\n  - toPorts: [{ports: [{port: \"8080\", endPort: 80}]}]\n", "spec.ingress[0].toPorts[0].ports[0].endPort", "endPort 80"),
        ("apiVersion: cilium.io/v1\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec: {endpointSelector: {}}\n", "apiVersion", "cilium.io/v2"),
        ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {}\nspec: {endpointSelector: {}}\n", "metadata.name", "needs a name"),
        ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec: {endpointSelector: {}}\nspecs: [{endpointSelector: {}}]\n", "spec", "not both"),
        ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {}\n  ingress:\n  - toPorts: [{ports: [{port: \"9092\", protocol: TCP}], rules: {kafka: [{apiKey: producer}]}}]\n", "spec.ingress[0].toPorts[0].rules.kafka[0].apiKey", "not a Kafka API key"),
        ("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {}\n  ingress:\n  - toPorts: [{ports: [{port: \"9092\", protocol: TCP}], rules: {kafka: [{apiVersion: \"-1\"}]}}]\n", "spec.ingress[0].toPorts[0].rules.kafka[0].apiVersion", "not a Kafka API version"),
    ] {
        let e = parse("bad.yaml", &format!("---\napiVersion: v1\nkind: ConfigMap\nmetadata: {{name: c}}\n---\n{yaml}"), "default").unwrap_err();
        assert_eq!(e.file, "bad.yaml");
        assert_eq!(e.document, 2, "{yaml}");
        assert_eq!(e.path, path, "{yaml}: {e}");
        assert!(e.message.contains(needle), "{yaml}: {e}");
    }
    let e = parse("x.yaml", "a: [unclosed", "default").unwrap_err();
    assert!(e.message.contains("not valid YAML"), "{e}");
    // Past the parser's node budget: the limit and the way round it, not
    // "not valid YAML".
    let rules: String = (0..25_000)
        .map(|i| format!("  - fromEndpoints: [{{matchLabels: {{app: a{i}}}}}]\n    toPorts: [{{ports: [{{port: \"80\"}}]}}]\n"))
        .collect();
    let big = format!("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: big}}\nspec:\n  endpointSelector: {{}}\n  ingress:\n{rules}");
    let Err(e) = parse("big.yaml", &big, "default") else {
        panic!("a file past the parser's node budget was accepted");
    };
    assert!(
        e.message.contains("too large: more than 250000 YAML nodes")
            && e.message.contains("split the policies"),
        "{e}"
    );
}

#[test]
fn other_kinds_are_skipped_with_a_notice() {
    let yaml = format!("apiVersion: v1\nkind: Service\nmetadata: {{name: s}}\n---\n{SEED}");
    let parsed = parse("mixed.yaml", &yaml, "default").unwrap();
    assert_eq!(parsed.policies.len(), 1);
    assert_eq!(parsed.skipped, vec![(1, "Service".to_string())]);
}

fn cnp(rules: &str) -> String {
    format!("apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: p}}\nspec:\n  endpointSelector: {{matchLabels: {{app: backend}}}}\n{rules}")
}

#[test]
fn enable_default_deny_false_keeps_the_direction_open() {
    let w = World::new();
    let backend = labels("shop", &[("app", "backend")]);
    let pol = w.compute(
        &backend,
        &policies(&cnp("  enableDefaultDeny: {ingress: false}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: frontend}}]\n")),
    );
    assert!(!pol.ingress_enforced, "not default-deny");
    assert_eq!(pol.entries.len(), 1, "its allows still exist");
    assert!(
        pol.decide(w.id("shop", "other"), Direction::Ingress, 6, 80)
            == fibril_policy::Decision::NotEnforced
    );
}

#[test]
fn requires_narrow_every_peer_of_the_direction() {
    let w = World::new();
    let backend = labels("shop", &[("app", "backend")]);
    // frontend exists in shop and ops; the requirement keeps only ops'.
    let yaml = "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: r}\nspec:\n  endpointSelector: {matchLabels: {app: backend}}\n  ingress:\n  - fromEndpoints: [{matchLabels: {app: frontend}}]\n  - fromRequires: [{matchLabels: {k8s:io.kubernetes.pod.namespace: ops}}]\n";
    let pol = w.compute(&backend, &policies(yaml));
    let ids: Vec<u32> = pol.entries.keys().map(|k| k.identity).collect();
    assert_eq!(ids, vec![w.id("ops", "frontend")]);
}

#[test]
fn icmp_types_and_entities_become_entries() {
    let w = World::new();
    let backend = labels("shop", &[("app", "backend")]);
    let pol = w.compute(
        &backend,
        &policies(&cnp("  ingress:\n  - fromEntities: [world, host]\n    icmps: [{fields: [{type: 8}, {type: EchoReply, family: IPv4}, {type: EchoRequest, family: IPv6}]}]\n")),
    );
    let mut got: Vec<(u32, u8, u16)> = pol
        .entries
        .keys()
        .map(|k| (k.identity, k.protocol, k.port))
        .collect();
    got.sort();
    let mut want = vec![];
    for id in [1, 2, 9, 10] {
        want.extend([(id, 1, 0), (id, 1, 8), (id, 58, 128)]);
    }
    want.sort();
    assert_eq!(got, want);
    // `cluster` selects the reserved in-cluster identities and every pod of this cluster.
    let pol = w.compute(
        &backend,
        &policies(&cnp("  ingress:\n  - fromEntities: [cluster]\n")),
    );
    let ids: Vec<u32> = pol.entries.keys().map(|k| k.identity).collect();
    assert!(ids.contains(&1) && ids.contains(&6) && ids.contains(&w.id("ops", "frontend")));
    assert!(!ids.contains(&2), "world is not the cluster");
    // `all` is the wildcard identity.
    let pol = w.compute(
        &backend,
        &policies(&cnp("  ingress:\n  - fromEntities: [all]\n")),
    );
    assert_eq!(
        pol.entries.keys().map(|k| k.identity).collect::<Vec<_>>(),
        vec![0]
    );
    for bad in ["  ingress:\n  - fromEntities: [everything]\n", "  ingress:\n  - fromEntities: [world]\n    icmps: [{fields: [{type: 300}]}]\n", "  ingress:\n  - icmps: [{fields: [{type: 8}]}]\n    toPorts: [{ports: [{port: \"80\"}]}]\n"] {
        assert!(parse("x.yaml", &cnp(bad), "shop").is_err(), "{bad}");
    }
}

fn knp(spec: &str) -> Vec<Policy> {
    policies(&format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: np}}\nspec:\n{spec}"))
}

#[test]
fn kubernetes_network_policy_translation() {
    let w = World::new();
    let backend = labels("shop", &[("app", "backend")]);
    // No policyTypes and no egress: ingress only; `ingress: []` denies all ingress.
    let pol = w.compute(
        &backend,
        &knp("  podSelector: {matchLabels: {app: backend}}\n"),
    );
    assert!(pol.ingress_enforced && !pol.egress_enforced && pol.entries.is_empty());
    // policyTypes [Egress] only: ingress stays open.
    let pol = w.compute(
        &backend,
        &knp("  podSelector: {}\n  policyTypes: [Egress]\n"),
    );
    assert!(!pol.ingress_enforced && pol.egress_enforced);
    // An empty `from` is everything, including the world; ports default to TCP.
    let pol = w.compute(
        &backend,
        &knp("  podSelector: {}\n  ingress:\n  - ports: [{port: 80}, {protocol: UDP}]\n"),
    );
    let keys: Vec<EntryKey> = pol.entries.keys().copied().collect();
    assert_eq!(
        keys,
        vec![
            key(0, Direction::Ingress, 6, 80),
            key(0, Direction::Ingress, 17, 0)
        ]
    );
    // namespaceSelector: {} is every pod of every namespace, not the world.
    let pol = w.compute(
        &backend,
        &knp("  podSelector: {}\n  ingress:\n  - from: [{namespaceSelector: {}}]\n"),
    );
    assert!(pol.entries.keys().all(|k| k.identity >= 256));
    assert_eq!(pol.entries.len(), 4);
    // podSelector alone: the policy's namespace only; with a namespaceSelector: AND.
    let pol = w.compute(&backend, &knp("  podSelector: {}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: frontend}}}]\n"));
    assert_eq!(
        pol.entries.keys().map(|k| k.identity).collect::<Vec<_>>(),
        vec![w.id("shop", "frontend")]
    );
    // ipBlock with except becomes a CIDR peer; except must be inside.
    let p = knp("  podSelector: {}\n  egress:\n  - to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}]\n");
    assert!(
        matches!(&p[0].rules[0].egress.as_ref().unwrap()[0].peers.as_ref().unwrap()[0], fibril_policy::Peer::Cidr { except, .. } if except.len() == 1)
    );
    for bad in [
        "  podSelector: {}\n  egress:\n  - to: [{ipBlock: {cidr: 10.0.0.0/8, except: [11.0.0.0/16]}}]\n",
        "  podSelector: {}\n  policyTypes: [Sideways]\n",
        "  podSelector: {}\n  ingress:\n  - ports: [{port: 0}]\n",
        "  podSelector: {}\n  ingress:\n  - ports: [{port: 80, protocol: ICMP}]\n",
        "  ingress: []\n",
    ] {
        let r = parse("np.yaml", &format!("apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: np}}\nspec:\n{bad}"), "shop");
        assert!(r.is_err(), "{bad}");
    }
}

/// Each toPorts entry's L7 rules apply on its own ports only (a port of
/// another entry, with other rules or none, is not restricted by them):
/// `GET /api/.*` on 8080 must not let a request without the token through
/// on 8082, whose entry requires it.
#[test]
fn each_to_ports_entry_keeps_its_own_l7_rules() {
    use fibril_policy::{Decision, HttpRule, L7};
    let w = World::new();
    let doc = r#"
apiVersion: cilium.io/v2
kind: CiliumNetworkPolicy
metadata: {name: web, namespace: shop}
spec:
  endpointSelector: {matchLabels: {app: backend}}
  ingress:
  - fromEndpoints: [{matchLabels: {app: frontend}}]
    toPorts:
    - ports: [{port: "8080", protocol: TCP}, {port: "8081", protocol: TCP}]
      rules:
        http: [{method: GET, path: "/api/.*"}]
    - ports: [{port: "8082", protocol: TCP}]
      rules:
        http: [{method: GET, path: "/api/.*", headers: ["X-Token: abc"]}]
    - ports: [{port: "9090", protocol: TCP}]
    - ports: [{port: "8081", protocol: TCP}]
      rules:
        http: [{method: POST}]
"#;
    let policies = parse("t.yaml", doc, "shop").unwrap().policies;
    let p = w.compute(&labels("shop", &[("app", "backend")]), &policies);
    let frontend = labels("shop", &[("app", "frontend")]);
    let fe = w.ids.iter().find(|(_, l)| *l == frontend).unwrap().0;
    let l7 = |port| match p.decide(fe, Direction::Ingress, 6, port) {
        Decision::Allowed { l7, .. } => l7,
        other => panic!("{port}: {other:?}"),
    };
    let api = HttpRule {
        method: Some("GET".into()),
        path: Some("/api/.*".into()),
        ..Default::default()
    };
    let token = HttpRule {
        headers: vec!["X-Token: abc".into()],
        ..api.clone()
    };
    let post = HttpRule {
        method: Some("POST".into()),
        ..Default::default()
    };
    assert_eq!(l7(8080), Some(L7::Http(vec![api.clone()])));
    assert_eq!(l7(8082), Some(L7::Http(vec![token])));
    assert_eq!(l7(9090), None);
    // One port in two entries: either entry's rules (a union, §3.8).
    assert_eq!(l7(8081), Some(L7::Http(vec![api, post])));
}

/// A state file written before `to_ports` (one `ports` list and one `l7`
/// for the whole rule) still loads, as the rule those agents enforced.
#[test]
fn peer_rules_stored_by_older_agents_still_load() {
    let old = r#"{"peers":null,"requires":[],"ports":[{"protocol":"Tcp","port":{"Range":[80,80]}}],
        "icmps":[],"deny":false,"l7":{"Http":[{"method":"GET","path":null,"host":null,"headers":[],"header_matches":[]}]},
        "auth_required":false}"#;
    let pr: fibril_policy::model::PeerRule = serde_json::from_str(old).unwrap();
    assert_eq!(pr.to_ports.len(), 1);
    assert_eq!(pr.to_ports[0].ports.len(), 1);
    assert!(pr.to_ports[0].l7.is_some());
    // And the new shape round-trips.
    let again: fibril_policy::model::PeerRule =
        serde_json::from_str(&serde_json::to_string(&pr).unwrap()).unwrap();
    assert_eq!(again, pr);
}

/// Host policies (`nodeSelector`): they select the host endpoint by the
/// node's labels and no pod; pods' rules never select the host.
#[test]
fn host_policies_select_the_node_and_only_the_node() {
    let w = World::new();
    let node = |pairs: &[(&str, &str)]| {
        LabelSet::host_endpoint(
            &pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    };
    let ssh_node = node(&[("node-access", "ssh"), ("kubernetes.io/os", "linux")]);
    let other_node = node(&[("kubernetes.io/os", "linux")]);
    // The corpus's demo host policy: the cluster, SSH from anywhere, ping.
    let demo = policies(
        r#"
apiVersion: cilium.io/v2
kind: CiliumClusterwideNetworkPolicy
metadata: {name: demo-host-policy}
spec:
  nodeSelector: {matchLabels: {node-access: ssh}}
  ingress:
  - fromEntities: [cluster]
  - toPorts: [{ports: [{port: "22", protocol: TCP}]}]
  - icmps: [{fields: [{type: 8, family: IPv4}]}]
"#,
    );
    let host = w.compute(&ssh_node, &demo);
    assert!(host.ingress_enforced && !host.egress_enforced);
    assert!(host
        .entries
        .contains_key(&key(0, Direction::Ingress, 6, 22)));
    assert!(host
        .entries
        .contains_key(&key(w.id("shop", "backend"), Direction::Ingress, 0, 0)));
    // A node without the label, and every pod: untouched.
    let unselected = w.compute(&other_node, &demo);
    assert!(!unselected.ingress_enforced && unselected.entries.is_empty());
    let pod = w.compute(&labels("shop", &[("app", "backend")]), &demo);
    assert!(!pod.ingress_enforced && pod.entries.is_empty());
    // A cluster-wide pod policy selecting everything leaves the host alone.
    let all_pods = policies(
        "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: all}\nspec:\n  endpointSelector: {}\n  ingress: [{}]\n  egress: [{}]\n",
    );
    let host = w.compute(&ssh_node, &all_pods);
    assert!(!host.ingress_enforced && !host.egress_enforced);
    // `nodeSelector: {}` selects every node; extended protocols are
    // entries of their own protocol number with every port.
    let every_node = policies(
        "apiVersion: cilium.io/v2\nkind: CiliumClusterwideNetworkPolicy\nmetadata: {name: vrrp}\nspec:\n  nodeSelector: {}\n  egress:\n  - toPorts: [{ports: [{protocol: VRRP}, {port: \"6443\", protocol: TCP}]}]\n",
    );
    let host = w.compute(&other_node, &every_node);
    assert!(host.egress_enforced && !host.ingress_enforced);
    let mut got: Vec<EntryKey> = host.entries.keys().copied().collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            key(0, Direction::Egress, 6, 6443),
            key(0, Direction::Egress, 112, 0)
        ]
    );
}
