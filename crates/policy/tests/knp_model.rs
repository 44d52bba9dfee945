//! The Kubernetes NetworkPolicy e2e model (namespaces x, y, z; pods a, b, c;
//! ports 80 and 81 on TCP, UDP and SCTP): random NetworkPolicies, and for
//! every pod pair and port, the verdict of a reference model written from
//! the Kubernetes semantics must equal the verdict of Fibril's translation
//! and policy map computation.

use std::collections::BTreeMap;

use fibril_policy::identity::Allocator;
use fibril_policy::{
    endpoint_policy, parse, pod_identity_labels, Context, Decision, Direction, LabelSet, PodMeta,
    Policy,
};
use proptest::prelude::*;

const NAMESPACES: [&str; 3] = ["x", "y", "z"];
const PODS: [&str; 3] = ["a", "b", "c"];
const PROTOCOLS: [(&str, u8); 3] = [("TCP", 6), ("UDP", 17), ("SCTP", 132)];
const PORTS: [u16; 2] = [80, 81];

#[derive(Clone, Debug)]
enum Sel {
    All,
    Is(&'static str),
    In(&'static str, &'static str),
    NotIn(&'static str),
}

impl Sel {
    fn matches(&self, v: &str) -> bool {
        match self {
            Sel::All => true,
            Sel::Is(a) => v == *a,
            Sel::In(a, b) => v == *a || v == *b,
            Sel::NotIn(a) => v != *a,
        }
    }

    fn yaml(&self, key: &str) -> String {
        match self {
            Sel::All => "{}".into(),
            // Quoted: YAML 1.1 reads a bare `y` as a boolean.
            Sel::Is(a) => format!("{{matchLabels: {{{key}: \"{a}\"}}}}"),
            Sel::In(a, b) => format!(
                "{{matchExpressions: [{{key: {key}, operator: In, values: [\"{a}\", \"{b}\"]}}]}}"
            ),
            Sel::NotIn(a) => format!(
                "{{matchExpressions: [{{key: {key}, operator: NotIn, values: [\"{a}\"]}}]}}"
            ),
        }
    }
}

#[derive(Clone, Debug)]
struct Peer {
    pods: Option<Sel>,
    namespaces: Option<Sel>,
}

#[derive(Clone, Debug)]
struct PortRule {
    protocol: Option<&'static str>,
    port: Option<u16>,
}

#[derive(Clone, Debug)]
struct NpRule {
    peers: Option<Vec<Peer>>,
    ports: Option<Vec<PortRule>>,
}

#[derive(Clone, Debug)]
struct Np {
    namespace: &'static str,
    pod_selector: Sel,
    types: Option<(bool, bool)>,
    ingress: Option<Vec<NpRule>>,
    egress: Option<Vec<NpRule>>,
}

fn sel(names: &'static [&'static str; 3]) -> impl Strategy<Value = Sel> {
    prop_oneof![
        Just(Sel::All),
        (0..3usize).prop_map(move |i| Sel::Is(names[i])),
        (0..3usize, 0..3usize).prop_map(move |(i, j)| Sel::In(names[i], names[j])),
        (0..3usize).prop_map(move |i| Sel::NotIn(names[i])),
    ]
}

fn peer() -> impl Strategy<Value = Peer> {
    (
        proptest::option::of(sel(&PODS)),
        proptest::option::of(sel(&NAMESPACES)),
    )
        .prop_filter("a peer needs a selector", |(p, n)| {
            p.is_some() || n.is_some()
        })
        .prop_map(|(pods, namespaces)| Peer { pods, namespaces })
}

fn port_rule() -> impl Strategy<Value = PortRule> {
    (
        proptest::option::of(0..3usize),
        proptest::option::of(0..2usize),
    )
        .prop_map(|(pr, po)| PortRule {
            protocol: pr.map(|i| PROTOCOLS[i].0),
            port: po.map(|i| PORTS[i]),
        })
}

fn np_rule() -> impl Strategy<Value = NpRule> {
    (
        proptest::option::of(prop::collection::vec(peer(), 0..3)),
        proptest::option::of(prop::collection::vec(port_rule(), 0..3)),
    )
        .prop_map(|(peers, ports)| NpRule { peers, ports })
}

fn np() -> impl Strategy<Value = Np> {
    (
        0..3usize,
        sel(&PODS),
        proptest::option::of(
            (any::<bool>(), any::<bool>()).prop_filter("non-empty", |(i, e)| *i || *e),
        ),
        proptest::option::of(prop::collection::vec(np_rule(), 0..3)),
        proptest::option::of(prop::collection::vec(np_rule(), 0..3)),
    )
        .prop_map(|(ns, pod_selector, types, ingress, egress)| Np {
            namespace: NAMESPACES[ns],
            pod_selector,
            types,
            ingress,
            egress,
        })
}

fn yaml(i: usize, p: &Np) -> String {
    let rules = |rules: &Vec<NpRule>, peers_key: &str| -> String {
        let mut out = String::from("[");
        for r in rules {
            out.push('{');
            if let Some(peers) = &r.peers {
                out.push_str(&format!("{peers_key}: ["));
                for pe in peers {
                    out.push('{');
                    if let Some(s) = &pe.pods {
                        out.push_str(&format!("podSelector: {}, ", s.yaml("pod")));
                    }
                    if let Some(s) = &pe.namespaces {
                        out.push_str(&format!("namespaceSelector: {}, ", s.yaml("ns")));
                    }
                    out.push_str("}, ");
                }
                out.push_str("], ");
            }
            if let Some(ports) = &r.ports {
                out.push_str("ports: [");
                for po in ports {
                    out.push('{');
                    if let Some(pr) = po.protocol {
                        out.push_str(&format!("protocol: {pr}, "));
                    }
                    if let Some(n) = po.port {
                        out.push_str(&format!("port: {n}, "));
                    }
                    out.push_str("}, ");
                }
                out.push_str("], ");
            }
            out.push_str("}, ");
        }
        out.push(']');
        out
    };
    let mut s = format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: np{i}, namespace: \"{}\"}}\nspec:\n  podSelector: {}\n",
        p.namespace,
        p.pod_selector.yaml("pod")
    );
    if let Some((ing, eg)) = p.types {
        let mut t = vec![];
        if ing {
            t.push("Ingress");
        }
        if eg {
            t.push("Egress");
        }
        s.push_str(&format!("  policyTypes: [{}]\n", t.join(", ")));
    }
    if let Some(r) = &p.ingress {
        s.push_str(&format!("  ingress: {}\n", rules(r, "from")));
    }
    if let Some(r) = &p.egress {
        s.push_str(&format!("  egress: {}\n", rules(r, "to")));
    }
    s
}

/// The reference: Kubernetes NetworkPolicy semantics, straight from the
/// API documentation, on (namespace, pod) pairs.
fn k8s_allows(
    policies: &[Np],
    src: (&str, &str),
    dst: (&str, &str),
    proto: &str,
    port: u16,
) -> bool {
    let types = |p: &Np| {
        p.types
            .unwrap_or((true, p.egress.as_ref().is_some_and(|e| !e.is_empty())))
    };
    let peer_matches = |p: &Np, pe: &Peer, other: (&str, &str)| match (&pe.pods, &pe.namespaces) {
        (Some(ps), None) => other.0 == p.namespace && ps.matches(other.1),
        (None, Some(ns)) => ns.matches(other.0),
        (Some(ps), Some(ns)) => ns.matches(other.0) && ps.matches(other.1),
        (None, None) => unreachable!(),
    };
    let rule_matches = |p: &Np, r: &NpRule, other: (&str, &str)| {
        let peers_ok = match &r.peers {
            None => true,
            Some(v) if v.is_empty() => true,
            Some(v) => v.iter().any(|pe| peer_matches(p, pe, other)),
        };
        let ports_ok = match &r.ports {
            None => true,
            Some(v) if v.is_empty() => true,
            Some(v) => v.iter().any(|po| {
                po.protocol.unwrap_or("TCP") == proto && po.port.is_none_or(|n| n == port)
            }),
        };
        peers_ok && ports_ok
    };
    let direction_allows = |ingress: bool| {
        let (me, other) = if ingress { (dst, src) } else { (src, dst) };
        let selecting: Vec<&Np> = policies
            .iter()
            .filter(|p| p.namespace == me.0 && p.pod_selector.matches(me.1))
            .filter(|p| if ingress { types(p).0 } else { types(p).1 })
            .collect();
        if selecting.is_empty() {
            return true;
        }
        selecting.iter().any(|p| {
            let rules = if ingress { &p.ingress } else { &p.egress };
            rules.iter().flatten().any(|r| rule_matches(p, r, other))
        })
    };
    direction_allows(true) && direction_allows(false)
}

fn pod_labels(ns: &str, pod: &str) -> LabelSet {
    let labels: BTreeMap<String, String> = [("pod".to_string(), pod.to_string())].into();
    let ns_labels: BTreeMap<String, String> = [("ns".to_string(), ns.to_string())].into();
    pod_identity_labels(&PodMeta {
        namespace: ns,
        labels: &labels,
        namespace_labels: &ns_labels,
        service_account: "default",
        cluster: "default",
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 96, ..ProptestConfig::default() })]

    #[test]
    fn fibril_agrees_with_the_kubernetes_model(nps in prop::collection::vec(np(), 1..4)) {
        let mut alloc = Allocator::default();
        let mut pods = Vec::new();
        for ns in NAMESPACES {
            for pod in PODS {
                let l = pod_labels(ns, pod);
                pods.push(((ns, pod), alloc.acquire(&l).unwrap(), l));
            }
        }
        let identities = alloc.all();
        let mut policies: Vec<Policy> = Vec::new();
        for (i, p) in nps.iter().enumerate() {
            let text = yaml(i, p);
            let parsed = parse("gen.yaml", &text, "default").map_err(|e| TestCaseError::fail(format!("{e}\n{text}")))?;
            policies.extend(parsed.policies);
        }
        let named = BTreeMap::new();
        let audit = Default::default();
        let ctx = Context { identities: &identities, named_ports: &named, cluster: "default", audit_namespaces: &audit };
        let computed: Vec<_> = pods.iter().map(|(_, id, l)| endpoint_policy(*id, l, &policies, &ctx)).collect();
        let passes = |d: Decision| matches!(d, Decision::NotEnforced | Decision::Allowed { .. });
        for (si, (src, src_id, _)) in pods.iter().enumerate() {
            for (di, (dst, dst_id, _)) in pods.iter().enumerate() {
                for (proto, number) in PROTOCOLS {
                    for port in PORTS {
                        let want = k8s_allows(&nps, *src, *dst, proto, port);
                        let got = passes(computed[si].decide(*dst_id, Direction::Egress, number, port))
                            && passes(computed[di].decide(*src_id, Direction::Ingress, number, port));
                        prop_assert_eq!(got, want, "{:?} -> {:?} {}/{} with {:#?}", src, dst, port, proto, nps);
                    }
                }
            }
        }
    }
}
