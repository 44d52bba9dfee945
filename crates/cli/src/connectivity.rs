//! `fibril connectivity test`: Cilium's connectivity scenarios (as
//! `cilium connectivity test` runs them) on a two-node lab of the test's
//! own: namespace `cilium-test` with `client` and `client2` on node-1,
//! `echo-same-node` beside them and `echo-other-node` on node-2, a
//! host-network server on each node, kube-dns, and the `world` and
//! `other-world` (externals of the lab). Each scenario imports its
//! policies, runs real requests (curl, ping, DNS queries) from the pods or
//! the world, checks each by its result and by the flows it produced (read
//! through the lab's Hubble Relay, as Cilium's test reads them), and
//! removes its policies. The lab is removed at the end.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use serde_json::Value;

use crate::lab;

/// How flows are checked (`--flow-validation`, as Cilium's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum FlowValidation {
    /// A missing flow fails the action.
    Strict,
    /// A missing flow is reported, the action passes on its result.
    Warning,
    Disabled,
}

pub struct Options {
    pub test: Option<regex::Regex>,
    pub junit_file: Option<PathBuf>,
    pub flow_validation: FlowValidation,
    /// A scenario's expectation inverted on purpose (to see a failure
    /// reported): its name.
    pub break_test: Option<String>,
}

const LAB: &str = "fibril-conn-test";
const NS: &str = "cilium-test";
const WORLD: &str = "203.0.113.77";

const OTHER_WORLD: &str = "203.0.113.78";

// Cilium's test workloads, plus its `host-netns` DaemonSet (a server in
// each node's own namespace), kube-dns (on the other node than the
// clients: their queries cross the overlay, through node-1's DNS proxy
// when a DNS rule applies) and two outside addresses: the
// `--external-target` and the `--external-other-target`.
const LAB_YAML: &str = r#"
podCIDR: 10.220.0.0/16
underlayCIDR: 10.221.0.0/24
nodes: [node-1, node-2]
namespaces:
- name: cilium-test
- name: kube-system
pods:
- {name: client, namespace: cilium-test, labels: {kind: client, name: client}, node: node-1}
- {name: client2, namespace: cilium-test, labels: {kind: client, name: client2, other: client}, node: node-1}
- {name: echo-same-node, namespace: cilium-test, labels: {kind: echo, name: echo-same-node}, node: node-1, ports: [{name: http-8080, containerPort: 8080}], command: [fibril-echo, http-server, --port, "8080"]}
- {name: echo-other-node, namespace: cilium-test, labels: {kind: echo, name: echo-other-node}, node: node-2, ports: [{name: http-8080, containerPort: 8080}], command: [fibril-echo, http-server, --port, "8080"]}
- {name: host-netns-1, namespace: cilium-test, hostNetwork: true, node: node-1, command: [fibril-echo, http-server, --port, "8080"]}
- {name: host-netns-2, namespace: cilium-test, hostNetwork: true, node: node-2, command: [fibril-echo, http-server, --port, "8080"]}
- {name: kube-dns, namespace: kube-system, labels: {k8s-app: kube-dns}, node: node-2, ports: [{name: dns, containerPort: 53, protocol: UDP}], command: [fibril-echo, dns-server, --record, world.example=203.0.113.77, --record, other-world.example=203.0.113.78]}
externals:
- {name: world, address: 203.0.113.77, command: [fibril-echo, http-server, --port, "80"]}
- {name: other-world, address: 203.0.113.78, command: [fibril-echo, http-server, --port, "80"]}
"#;

/// What an action expects.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Expect {
    /// The request is answered (HTTP 200).
    Ok,
    /// The packets are dropped by policy (no answer).
    Drop,
    /// The L7 proxy refuses the request (HTTP 403).
    Refused,
}

impl Expect {
    fn inverted(self) -> Self {
        match self {
            Expect::Ok => Expect::Drop,
            Expect::Drop | Expect::Refused => Expect::Ok,
        }
    }
}

/// What an action does from its source to its destination.
#[derive(Clone, Copy, Debug)]
enum Probe {
    /// An HTTP request (curl): method and path.
    Http(&'static str, &'static str),
    /// One ICMP echo request (ping).
    Ping,
    /// A DNS query (type A) for this name, to the destination.
    Dns(&'static str),
    /// Resolve this name through kube-dns, then GET / from the address
    /// (which must be the destination's), as `curl http://name/` does.
    HttpByName(&'static str),
}

/// One action: from a pod (or an external) to a destination.
#[derive(Clone, Debug)]
struct Action {
    from: &'static str,
    to: &'static str,
    probe: Probe,
    expect: Expect,
}

impl std::fmt::Display for Action {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.probe {
            Probe::Http(method, path) => write!(f, "{} {method} {}{path}", self.from, self.to),
            Probe::Ping => write!(f, "{} ping {}", self.from, self.to),
            Probe::Dns(name) => write!(f, "{} DNS {name} @{}", self.from, self.to),
            Probe::HttpByName(name) => write!(f, "{} GET http://{name}/ ({})", self.from, self.to),
        }
    }
}

struct Scenario {
    name: &'static str,
    /// (name, YAML) of each policy.
    policies: Vec<(String, String)>,
    actions: Vec<Action>,
}

fn act(from: &'static str, to: &'static str, expect: Expect) -> Action {
    http(from, to, "GET", "/", expect)
}

fn http(
    from: &'static str,
    to: &'static str,
    method: &'static str,
    path: &'static str,
    expect: Expect,
) -> Action {
    Action {
        from,
        to,
        probe: Probe::Http(method, path),
        expect,
    }
}

fn ping(from: &'static str, to: &'static str, expect: Expect) -> Action {
    Action {
        from,
        to,
        probe: Probe::Ping,
        expect,
    }
}

/// A query to kube-dns.
fn dns(from: &'static str, name: &'static str, expect: Expect) -> Action {
    Action {
        from,
        to: "kube-dns",
        probe: Probe::Dns(name),
        expect,
    }
}

/// `curl http://name/` from `from`; `name` resolves to `to`.
fn by_name(from: &'static str, name: &'static str, to: &'static str, expect: Expect) -> Action {
    Action {
        from,
        to,
        probe: Probe::HttpByName(name),
        expect,
    }
}

/// A CiliumNetworkPolicy of the test namespace: (key, YAML).
fn cnp(name: &str, spec: &str) -> (String, String) {
    policy_doc("cilium.io/v2", "CiliumNetworkPolicy", name, Some(NS), spec)
}

/// A CiliumClusterwideNetworkPolicy: (key, YAML).
fn ccnp(name: &str, spec: &str) -> (String, String) {
    policy_doc(
        "cilium.io/v2",
        "CiliumClusterwideNetworkPolicy",
        name,
        None,
        spec,
    )
}

/// A Kubernetes NetworkPolicy of the test namespace: (key, YAML).
fn knp(name: &str, spec: &str) -> (String, String) {
    policy_doc(
        "networking.k8s.io/v1",
        "NetworkPolicy",
        name,
        Some(NS),
        spec,
    )
}

/// A policy document and the key `fibril policy delete` takes for it
/// (`namespace/name`, or the name of a cluster-wide one).
fn policy_doc(
    api: &str,
    kind: &str,
    name: &str,
    namespace: Option<&str>,
    spec: &str,
) -> (String, String) {
    let spec: String = spec.lines().map(|l| format!("  {l}\n")).collect();
    let (key, meta) = match namespace {
        Some(ns) => (
            format!("{ns}/{name}"),
            format!("{{name: {name}, namespace: {ns}}}"),
        ),
        None => (name.to_string(), format!("{{name: {name}}}")),
    };
    (
        key,
        format!("apiVersion: {api}\nkind: {kind}\nmetadata: {meta}\nspec:\n{spec}"),
    )
}

/// Egress to kube-dns through the DNS proxy (any name), as Cilium's
/// DNS-using tests allow it.
const DNS_EGRESS: &str = "- toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns}}]\n  toPorts:\n  - ports: [{port: \"53\", protocol: UDP}]\n    rules: {dns: [{matchPattern: \"*\"}]}";

/// Cilium's connectivity scenarios (names and expectations after
/// cilium-cli's `connectivity test`).
fn scenarios() -> Vec<Scenario> {
    use Expect::*;
    let everything = |e: Expect, w: Expect| {
        vec![
            act("client", "echo-same-node", e),
            act("client", "echo-other-node", e),
            act("client2", "echo-same-node", e),
            act("client2", "echo-other-node", e),
            act("client", "world", w),
        ]
    };
    vec![
        Scenario {
            name: "no-policies",
            policies: vec![],
            actions: [
                everything(Ok, Ok),
                vec![
                    ping("client", "echo-same-node", Ok),
                    ping("client", "echo-other-node", Ok),
                    ping("client2", "client", Ok),
                    act("client", "host-netns-1", Ok),
                    act("client", "host-netns-2", Ok),
                    act("host-netns-2", "echo-same-node", Ok),
                    dns("client", "world.example", Ok),
                ],
            ]
            .concat(),
        },
        Scenario {
            name: "allow-all-except-world",
            policies: vec![cnp(
                "allow-all-except-world",
                "endpointSelector: {}\negress:\n- toEntities: [cluster]\ningress:\n- fromEntities: [cluster]",
            )],
            actions: everything(Ok, Drop),
        },
        Scenario {
            name: "all-ingress-deny",
            policies: vec![cnp("all-ingress-deny", "endpointSelector: {}\ningress:\n- {}")],
            actions: everything(Drop, Ok),
        },
        Scenario {
            name: "all-egress-deny",
            policies: vec![cnp("all-egress-deny", "endpointSelector: {}\negress:\n- {}")],
            actions: everything(Drop, Drop),
        },
        Scenario {
            name: "all-entities-deny",
            policies: vec![cnp(
                "all-entities-deny",
                "endpointSelector: {}\negressDeny:\n- toEntities: [all]",
            )],
            actions: everything(Drop, Drop),
        },
        Scenario {
            name: "cluster-entity",
            policies: vec![cnp(
                "cluster-entity",
                "endpointSelector: {matchLabels: {kind: client}}\negress:\n- toEntities: [cluster]",
            )],
            actions: everything(Ok, Drop),
        },
        Scenario {
            name: "echo-ingress",
            policies: vec![cnp(
                "echo-ingress-from-client",
                "endpointSelector: {matchLabels: {kind: echo}}\ningress:\n- fromEndpoints: [{matchLabels: {name: client}}]\n  toPorts: [{ports: [{port: \"8080\", protocol: TCP}]}]",
            )],
            actions: vec![
                act("client", "echo-same-node", Ok),
                act("client", "echo-other-node", Ok),
                act("client2", "echo-same-node", Drop),
                act("client2", "echo-other-node", Drop),
            ],
        },
        Scenario {
            name: "client-egress",
            policies: vec![cnp(
                "client-egress-to-echo",
                "endpointSelector: {matchLabels: {name: client}}\negress:\n- toEndpoints: [{matchLabels: {kind: echo}}]\n  toPorts: [{ports: [{port: \"8080\", protocol: TCP}]}]",
            )],
            actions: vec![
                act("client", "echo-same-node", Ok),
                act("client", "echo-other-node", Ok),
                act("client", "world", Drop),
                act("client2", "echo-other-node", Ok),
                act("client2", "world", Ok),
            ],
        },
        Scenario {
            name: "client-egress-expression",
            policies: vec![cnp(
                "client-egress-to-echo-expression",
                "endpointSelector: {matchLabels: {name: client}}\negress:\n- toEndpoints: [{matchExpressions: [{key: kind, operator: In, values: [echo]}]}]\n  toPorts: [{ports: [{port: \"8080\", protocol: TCP}]}]",
            )],
            actions: vec![
                act("client", "echo-same-node", Ok),
                act("client", "echo-other-node", Ok),
                act("client", "world", Drop),
            ],
        },
        Scenario {
            name: "to-entities-world",
            policies: vec![cnp(
                "client-egress-to-entities-world",
                "endpointSelector: {matchLabels: {kind: client}}\negress:\n- toEntities: [world]\n  toPorts: [{ports: [{port: \"80\", protocol: TCP}]}]",
            )],
            actions: vec![
                act("client", "world", Ok),
                act("client2", "world", Ok),
                act("client", "echo-same-node", Drop),
                act("client", "echo-other-node", Drop),
            ],
        },
        Scenario {
            name: "to-cidr-external",
            policies: vec![cnp(
                "client-egress-to-cidr",
                &format!("endpointSelector: {{matchLabels: {{kind: client}}}}\negress:\n- toCIDR: [{WORLD}/32]"),
            )],
            actions: vec![
                act("client", "world", Ok),
                act("client", "echo-other-node", Drop),
            ],
        },
        Scenario {
            name: "echo-ingress-named-port",
            policies: vec![cnp(
                "echo-ingress-from-client-named-port",
                "endpointSelector: {matchLabels: {kind: echo}}\ningress:\n- fromEndpoints: [{matchLabels: {name: client}}]\n  toPorts: [{ports: [{port: http-8080, protocol: TCP}]}]",
            )],
            actions: vec![
                act("client", "echo-same-node", Ok),
                act("client", "echo-other-node", Ok),
                act("client2", "echo-other-node", Drop),
            ],
        },
        Scenario {
            name: "echo-ingress-knp",
            policies: vec![knp(
                "echo-ingress-from-client-knp",
                "podSelector: {matchLabels: {kind: echo}}\npolicyTypes: [Ingress]\ningress:\n- from: [{podSelector: {matchLabels: {name: client}}}]\n  ports: [{port: 8080, protocol: TCP}]",
            )],
            actions: vec![
                act("client", "echo-same-node", Ok),
                act("client", "echo-other-node", Ok),
                act("client2", "echo-same-node", Drop),
                act("client2", "echo-other-node", Drop),
            ],
        },
        Scenario {
            name: "all-ingress-deny-knp",
            policies: vec![knp(
                "all-ingress-deny-knp",
                "podSelector: {}\npolicyTypes: [Ingress]",
            )],
            actions: everything(Drop, Ok),
        },
        Scenario {
            name: "client-egress-knp",
            policies: vec![knp(
                "client-egress-to-echo-knp",
                "podSelector: {matchLabels: {name: client}}\npolicyTypes: [Egress]\negress:\n- to: [{podSelector: {matchLabels: {kind: echo}}}]\n  ports: [{port: 8080, protocol: TCP}]",
            )],
            actions: vec![
                act("client", "echo-same-node", Ok),
                act("client", "echo-other-node", Ok),
                act("client", "world", Drop),
                act("client2", "world", Ok),
            ],
        },
        Scenario {
            name: "to-entities-all",
            policies: vec![cnp(
                "client-egress-to-entities-all",
                "endpointSelector: {matchLabels: {kind: client}}\negress:\n- toEntities: [all]",
            )],
            actions: everything(Ok, Ok),
        },
        Scenario {
            name: "to-cidr-external-except",
            policies: vec![cnp(
                "client-egress-to-cidr-except",
                &format!("endpointSelector: {{matchLabels: {{kind: client}}}}\negress:\n- toCIDRSet: [{{cidr: 203.0.113.0/24, except: [{WORLD}/32]}}]\n- toEntities: [cluster]"),
            )],
            actions: vec![
                act("client", "world", Drop),
                act("client", "echo-other-node", Ok),
            ],
        },
        Scenario {
            name: "echo-ingress-from-other-client-deny",
            policies: vec![cnp(
                "echo-ingress-from-other-client-deny",
                "endpointSelector: {matchLabels: {kind: echo}}\ningress:\n- fromEndpoints: [{}]\ningressDeny:\n- fromEndpoints: [{matchLabels: {other: client}}]",
            )],
            actions: vec![
                act("client", "echo-same-node", Ok),
                act("client", "echo-other-node", Ok),
                act("client2", "echo-same-node", Drop),
                act("client2", "echo-other-node", Drop),
            ],
        },
        Scenario {
            name: "client-egress-to-echo-deny",
            policies: vec![cnp(
                "client-egress-to-echo-deny",
                "endpointSelector: {matchLabels: {kind: client}}\negress:\n- toEntities: [all]\negressDeny:\n- toEndpoints: [{matchLabels: {name: echo-other-node}}]",
            )],
            actions: vec![
                act("client", "echo-same-node", Ok),
                act("client", "echo-other-node", Drop),
                act("client2", "echo-other-node", Drop),
                act("client", "world", Ok),
            ],
        },
        Scenario {
            name: "echo-ingress-l7",
            policies: vec![cnp(
                "echo-ingress-l7-http",
                "endpointSelector: {matchLabels: {kind: echo}}\ningress:\n- fromEndpoints: [{matchLabels: {kind: client}}]\n  toPorts:\n  - ports: [{port: \"8080\", protocol: TCP}]\n    rules: {http: [{method: GET, path: \"/public\"}]}",
            )],
            actions: vec![
                http("client", "echo-same-node", "GET", "/public", Ok),
                http("client", "echo-other-node", "GET", "/public", Ok),
                http("client", "echo-same-node", "GET", "/private", Refused),
                http("client2", "echo-other-node", "GET", "/private", Refused),
            ],
        },
        Scenario {
            name: "client-egress-l7",
            policies: vec![cnp(
                "client-egress-l7-http",
                "endpointSelector: {matchLabels: {kind: client}}\negress:\n- toEndpoints: [{matchLabels: {kind: echo}}]\n  toPorts:\n  - ports: [{port: \"8080\", protocol: TCP}]\n    rules: {http: [{method: GET, path: \"/\"}]}",
            )],
            actions: vec![
                http("client", "echo-same-node", "GET", "/", Ok),
                http("client", "echo-other-node", "GET", "/", Ok),
                http("client2", "echo-other-node", "GET", "/private", Refused),
                act("client", "world", Drop),
            ],
        },
        Scenario {
            name: "client-egress-l7-method",
            policies: vec![cnp(
                "client-egress-l7-http-method",
                "endpointSelector: {matchLabels: {kind: client}}\negress:\n- toEndpoints: [{matchLabels: {kind: echo}}]\n  toPorts:\n  - ports: [{port: \"8080\", protocol: TCP}]\n    rules: {http: [{method: POST, path: \"/\"}]}",
            )],
            actions: vec![
                http("client", "echo-same-node", "POST", "/", Ok),
                http("client", "echo-other-node", "POST", "/", Ok),
                http("client", "echo-other-node", "GET", "/", Refused),
            ],
        },
        Scenario {
            name: "client-ingress",
            policies: vec![cnp(
                "client-ingress-from-other-client",
                "endpointSelector: {matchLabels: {kind: client}}\ningress:\n- fromEndpoints: [{matchLabels: {other: client}}]",
            )],
            actions: vec![ping("client2", "client", Ok), ping("client", "client2", Drop)],
        },
        Scenario {
            name: "client-ingress-knp",
            policies: vec![knp(
                "client-ingress-from-other-client-knp",
                "podSelector: {matchLabels: {kind: client}}\npolicyTypes: [Ingress]\ningress:\n- from: [{podSelector: {matchLabels: {other: client}}}]",
            )],
            actions: vec![ping("client2", "client", Ok), ping("client", "client2", Drop)],
        },
        Scenario {
            name: "client-ingress-icmp",
            policies: vec![cnp(
                "client-ingress-from-other-client-icmp",
                "endpointSelector: {matchLabels: {kind: client}}\ningress:\n- fromEndpoints: [{matchLabels: {other: client}}]\n  icmps: [{fields: [{type: 8, family: IPv4}]}]",
            )],
            actions: vec![ping("client2", "client", Ok), ping("client", "client2", Drop)],
        },
        Scenario {
            name: "client-ingress-from-other-client-icmp-deny",
            policies: vec![cnp(
                "client-ingress-from-other-client-icmp-deny",
                "endpointSelector: {matchLabels: {kind: client}}\ningress:\n- fromEndpoints: [{}]\ningressDeny:\n- fromEndpoints: [{matchLabels: {other: client}}]\n  icmps: [{fields: [{type: EchoRequest, family: IPv4}]}]",
            )],
            actions: vec![ping("client2", "client", Drop), ping("client", "client2", Ok)],
        },
        Scenario {
            name: "all-egress-deny-knp",
            policies: vec![knp("all-egress-deny-knp", "podSelector: {}\npolicyTypes: [Egress]")],
            actions: everything(Drop, Drop),
        },
        Scenario {
            name: "client-egress-expression-knp",
            policies: vec![knp(
                "client-egress-to-echo-expression-knp",
                "podSelector: {matchLabels: {name: client}}\npolicyTypes: [Egress]\negress:\n- to: [{podSelector: {matchExpressions: [{key: kind, operator: In, values: [echo]}]}}]\n  ports: [{port: 8080, protocol: TCP}]",
            )],
            actions: vec![
                act("client", "echo-same-node", Ok),
                act("client", "echo-other-node", Ok),
                act("client", "world", Drop),
            ],
        },
        Scenario {
            name: "to-cidr-external-knp",
            policies: vec![knp(
                "client-egress-to-cidr-knp",
                &format!("podSelector: {{matchLabels: {{kind: client}}}}\npolicyTypes: [Egress]\negress:\n- to: [{{ipBlock: {{cidr: 203.0.113.0/24, except: [{OTHER_WORLD}/32]}}}}]"),
            )],
            actions: vec![
                act("client", "world", Ok),
                act("client", "other-world", Drop),
                act("client", "echo-other-node", Drop),
            ],
        },
        Scenario {
            name: "client-ingress-to-echo-named-port-deny",
            policies: vec![cnp(
                "client-ingress-to-echo-named-port-deny",
                "endpointSelector: {matchLabels: {kind: echo}}\ningress:\n- fromEntities: [all]\ningressDeny:\n- fromEndpoints: [{matchLabels: {kind: client}}]\n  toPorts: [{ports: [{port: http-8080, protocol: TCP}]}]",
            )],
            actions: vec![
                act("client", "echo-same-node", Drop),
                act("client2", "echo-other-node", Drop),
                act("host-netns-2", "echo-other-node", Ok),
            ],
        },
        Scenario {
            name: "client-egress-to-echo-expression-deny",
            policies: vec![cnp(
                "client-egress-to-echo-expression-deny",
                "endpointSelector: {matchLabels: {kind: client}}\negress:\n- toEntities: [all]\negressDeny:\n- toEndpoints: [{matchExpressions: [{key: kind, operator: In, values: [echo]}]}]",
            )],
            actions: vec![
                act("client", "echo-same-node", Drop),
                act("client", "echo-other-node", Drop),
                act("client", "world", Ok),
            ],
        },
        Scenario {
            name: "client-egress-to-cidr-deny",
            policies: vec![cnp(
                "client-egress-to-cidr-deny",
                &format!("endpointSelector: {{matchLabels: {{kind: client}}}}\negress:\n- toEntities: [all]\negressDeny:\n- toCIDRSet: [{{cidr: 203.0.113.0/24, except: [{WORLD}/32]}}]"),
            )],
            actions: vec![
                act("client", "other-world", Drop),
                act("client", "world", Ok),
                act("client", "echo-other-node", Ok),
            ],
        },
        Scenario {
            name: "client-egress-to-cidr-deny-default",
            policies: vec![cnp(
                "client-egress-to-cidr-deny-default",
                &format!("endpointSelector: {{matchLabels: {{kind: client}}}}\negressDeny:\n- toCIDRSet: [{{cidr: 203.0.113.0/24, except: [{WORLD}/32]}}]"),
            )],
            // A deny section alone makes egress default-deny.
            actions: vec![
                act("client", "other-world", Drop),
                act("client", "world", Drop),
                act("client", "echo-other-node", Drop),
            ],
        },
        Scenario {
            name: "echo-ingress-l7-named-port",
            policies: vec![cnp(
                "echo-ingress-l7-http-named-port",
                "endpointSelector: {matchLabels: {kind: echo}}\ningress:\n- fromEndpoints: [{matchLabels: {kind: client}}]\n  toPorts:\n  - ports: [{port: http-8080, protocol: TCP}]\n    rules: {http: [{method: GET, path: \"/public\"}]}",
            )],
            actions: vec![
                http("client", "echo-other-node", "GET", "/public", Ok),
                http("client2", "echo-same-node", "GET", "/private", Refused),
            ],
        },
        Scenario {
            name: "client-egress-l7-named-port",
            policies: vec![cnp(
                "client-egress-l7-http-named-port",
                &format!("endpointSelector: {{matchLabels: {{kind: client}}}}\negress:\n{DNS_EGRESS}\n- toEndpoints: [{{matchLabels: {{kind: echo}}}}]\n  toPorts:\n  - ports: [{{port: http-8080, protocol: TCP}}]\n    rules: {{http: [{{method: GET, path: \"/\"}}]}}"),
            )],
            actions: vec![
                http("client2", "echo-other-node", "GET", "/", Ok),
                http("client2", "echo-same-node", "GET", "/private", Refused),
                act("client", "world", Drop),
            ],
        },
        Scenario {
            name: "host-entity-egress",
            policies: vec![cnp(
                "client-egress-to-host",
                "endpointSelector: {matchLabels: {kind: client}}\negress:\n- toEntities: [host]",
            )],
            // The clients' own node is `host`; the other is `remote-node`.
            actions: vec![
                act("client", "host-netns-1", Ok),
                act("client", "host-netns-2", Drop),
                act("client", "echo-same-node", Drop),
            ],
        },
        Scenario {
            name: "remote-node-entity-egress",
            policies: vec![cnp(
                "client-egress-to-remote-node",
                "endpointSelector: {matchLabels: {kind: client}}\negress:\n- toEntities: [remote-node]",
            )],
            actions: vec![
                act("client", "host-netns-2", Ok),
                act("client", "host-netns-1", Drop),
                act("client", "world", Drop),
            ],
        },
        Scenario {
            name: "host-entity-ingress",
            policies: vec![cnp(
                "echo-ingress-from-host",
                "endpointSelector: {matchLabels: {kind: echo}}\ningress:\n- fromEntities: [host]",
            )],
            actions: vec![
                act("host-netns-1", "echo-same-node", Ok),
                act("host-netns-2", "echo-other-node", Ok),
                act("host-netns-1", "echo-other-node", Drop),
                act("client", "echo-same-node", Drop),
            ],
        },
        Scenario {
            name: "remote-node-entity-ingress",
            policies: vec![cnp(
                "echo-ingress-from-remote-node",
                "endpointSelector: {matchLabels: {kind: echo}}\ningress:\n- fromEntities: [remote-node]",
            )],
            actions: vec![
                act("host-netns-2", "echo-same-node", Ok),
                act("host-netns-1", "echo-other-node", Ok),
                act("client", "echo-other-node", Drop),
            ],
        },
        Scenario {
            name: "dns-only",
            policies: vec![cnp(
                "client-egress-only-dns",
                &format!("endpointSelector: {{matchLabels: {{kind: client}}}}\negress:\n{DNS_EGRESS}"),
            )],
            // DNS answers; nothing else leaves.
            actions: vec![
                dns("client", "world.example", Ok),
                by_name("client", "world.example", "world", Drop),
                act("client2", "echo-same-node", Drop),
            ],
        },
        Scenario {
            name: "to-fqdns",
            policies: vec![cnp(
                "client-egress-to-fqdns",
                &format!("endpointSelector: {{matchLabels: {{kind: client}}}}\negress:\n{DNS_EGRESS}\n- toFQDNs: [{{matchName: world.example}}]\n  toPorts: [{{ports: [{{port: \"80\", protocol: TCP}}]}}]"),
            )],
            actions: vec![
                by_name("client", "world.example", "world", Ok),
                by_name("client2", "world.example", "world", Ok),
                by_name("client", "other-world.example", "other-world", Drop),
            ],
        },
        Scenario {
            name: "dns-only-pattern-refused",
            policies: vec![cnp(
                "client-egress-dns-pattern",
                "endpointSelector: {matchLabels: {kind: client}}\negress:\n- toEndpoints: [{matchLabels: {k8s:io.kubernetes.pod.namespace: kube-system, k8s-app: kube-dns}}]\n  toPorts:\n  - ports: [{port: \"53\", protocol: UDP}]\n    rules: {dns: [{matchName: world.example}]}",
            )],
            // The DNS proxy answers names the rules do not allow with REFUSED.
            actions: vec![
                dns("client", "world.example", Ok),
                dns("client", "other-world.example", Refused),
            ],
        },
        Scenario {
            name: "no-policies-from-outside",
            policies: vec![],
            actions: vec![
                act("world", "echo-same-node", Ok),
                act("world", "echo-other-node", Ok),
            ],
        },
        Scenario {
            name: "all-ingress-deny-from-outside",
            policies: vec![cnp("all-ingress-deny-from-outside", "endpointSelector: {}\ningress:\n- {}")],
            actions: vec![
                act("world", "echo-same-node", Drop),
                act("world", "echo-other-node", Drop),
            ],
        },
        Scenario {
            name: "echo-ingress-from-outside",
            policies: vec![cnp(
                "echo-ingress-from-outside",
                &format!("endpointSelector: {{matchLabels: {{kind: echo}}}}\ningress:\n- fromCIDR: [{WORLD}/32]\n  toPorts: [{{ports: [{{port: \"8080\", protocol: TCP}}]}}]"),
            )],
            actions: vec![
                act("world", "echo-other-node", Ok),
                act("other-world", "echo-other-node", Drop),
                act("client", "echo-same-node", Drop),
            ],
        },
        Scenario {
            name: "all-ingress-deny-ccnp",
            policies: vec![ccnp(
                "all-ingress-deny-ccnp",
                "endpointSelector: {matchLabels: {k8s:io.kubernetes.pod.namespace: cilium-test}}\ningress:\n- {}",
            )],
            actions: everything(Drop, Ok),
        },
        Scenario {
            name: "all-egress-deny-ccnp",
            policies: vec![ccnp(
                "all-egress-deny-ccnp",
                "endpointSelector: {matchLabels: {k8s:io.kubernetes.pod.namespace: cilium-test}}\negress:\n- {}",
            )],
            actions: everything(Drop, Drop),
        },
        Scenario {
            name: "client-egress-expression-ccnp",
            policies: vec![ccnp(
                "client-egress-to-echo-expression-ccnp",
                "endpointSelector: {matchLabels: {k8s:io.kubernetes.pod.namespace: cilium-test, name: client}}\negress:\n- toEndpoints: [{matchExpressions: [{key: kind, operator: In, values: [echo]}, {key: k8s:io.kubernetes.pod.namespace, operator: In, values: [cilium-test]}]}]\n  toPorts: [{ports: [{port: \"8080\", protocol: TCP}]}]",
            )],
            actions: vec![
                act("client", "echo-same-node", Ok),
                act("client", "echo-other-node", Ok),
                act("client", "world", Drop),
                act("client2", "world", Ok),
            ],
        },
    ]
}

/// One action's outcome.
struct Outcome {
    action: Action,
    passed: bool,
    detail: String,
}

struct Report {
    name: &'static str,
    outcomes: Vec<Outcome>,
    elapsed: Duration,
}

/// Runs the scenarios; the exit code is 1 when one failed.
pub fn run(opts: &Options) -> anyhow::Result<i32> {
    let dir = std::env::temp_dir().join(format!("fibril-connectivity-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let lab_file = dir.join("lab.yaml");
    std::fs::write(&lab_file, LAB_YAML)?;
    if lab::load_state(LAB).is_ok() {
        lab::down(LAB).ok();
    }
    println!("Deploying the test lab {LAB:?}: namespace {NS} on node-1 and node-2 ...");
    lab::up(LAB, Some(&lab_file))?;
    let result = run_scenarios(opts, &dir);
    lab::down(LAB).ok();
    std::fs::remove_dir_all(&dir).ok();
    let reports = result?;
    if let Some(path) = &opts.junit_file {
        std::fs::write(path, junit(&reports))
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let failed: Vec<&Report> = reports
        .iter()
        .filter(|r| r.outcomes.iter().any(|o| !o.passed))
        .collect();
    println!("\n{:<40} {:>8} {:>8}", "test", "actions", "result");
    for r in &reports {
        let bad = r.outcomes.iter().filter(|o| !o.passed).count();
        println!(
            "{:<40} {:>8} {:>8}",
            r.name,
            r.outcomes.len(),
            if bad == 0 { "ok" } else { "FAILED" }
        );
    }
    println!(
        "\n{} tests, {} passed, {} failed",
        reports.len(),
        reports.len() - failed.len(),
        failed.len()
    );
    Ok(if failed.is_empty() { 0 } else { 1 })
}

/// Where the test's workloads are.
struct Placement {
    at: std::collections::BTreeMap<String, Workload>,
}

struct Workload {
    netns: String,
    address: String,
    /// The port its HTTP server listens on (pods and host servers 8080, the
    /// outside addresses 80).
    http_port: u16,
}

impl Placement {
    fn of(st: &lab::LabState) -> anyhow::Result<Self> {
        let mut at = std::collections::BTreeMap::new();
        for p in &st.pods {
            let addr = if p.host_network {
                let n = st
                    .nodes
                    .iter()
                    .find(|n| Some(&n.name) == p.node.as_ref())
                    .with_context(|| format!("no node for {}", p.name))?;
                n.address.to_string()
            } else {
                p.cni_result
                    .as_ref()
                    .and_then(|r| r["ips"][0]["address"].as_str())
                    .and_then(|a| a.split('/').next())
                    .map(str::to_string)
                    .with_context(|| format!("no address for {}", p.name))?
            };
            at.insert(
                p.name.clone(),
                Workload {
                    netns: p.netns.clone(),
                    address: addr,
                    http_port: 8080,
                },
            );
        }
        for (x, addr) in [("world", WORLD), ("other-world", OTHER_WORLD)] {
            let ext = st
                .externals
                .iter()
                .find(|e| e.name == x)
                .with_context(|| format!("no external {x}"))?;
            at.insert(
                x.to_string(),
                Workload {
                    netns: ext.netns.clone(),
                    address: addr.to_string(),
                    http_port: 80,
                },
            );
        }
        Ok(Placement { at })
    }

    fn get(&self, name: &str) -> anyhow::Result<&Workload> {
        self.at
            .get(name)
            .with_context(|| format!("no workload {name}"))
    }

    fn addr(&self, name: &str) -> anyhow::Result<String> {
        Ok(self.get(name)?.address.clone())
    }

    /// Runs the action's probe; what it got, and what it saw.
    fn probe(&self, a: &Action) -> anyhow::Result<(Expect, String)> {
        let netns = &self.get(a.from)?.netns;
        let to = self.get(a.to)?;
        let dst = to.address.clone();
        Ok(match a.probe {
            Probe::Http(method, path) => {
                let code = curl(netns, &dst, to.http_port, method, path);
                (http_result(&code), format!("HTTP {code}"))
            }
            Probe::Ping => {
                let ok = Command::new("ip")
                    .args(["netns", "exec", netns, "ping", "-c", "1", "-W", "1.5", &dst])
                    .output()
                    .is_ok_and(|o| o.status.success());
                if ok {
                    (Expect::Ok, "echo reply".into())
                } else {
                    (Expect::Drop, "no echo reply".into())
                }
            }
            Probe::Dns(name) => match dns_query(netns, &dst, name) {
                (Some(rcode), _) if rcode == "Refused" => (Expect::Refused, "rcode Refused".into()),
                (Some(rcode), Some(addr)) => (Expect::Ok, format!("rcode {rcode}, {addr}")),
                (Some(rcode), None) => (Expect::Drop, format!("rcode {rcode}, no address")),
                (None, _) => (Expect::Drop, "no DNS answer".into()),
            },
            Probe::HttpByName(name) => {
                let dns = self.addr("kube-dns")?;
                match dns_query(netns, &dns, name) {
                    (_, Some(addr)) if addr == dst => {
                        let code = curl(netns, &addr, to.http_port, "GET", "/");
                        (http_result(&code), format!("DNS {addr}, HTTP {code}"))
                    }
                    (_, Some(addr)) => (Expect::Drop, format!("DNS gave {addr}, not {dst}")),
                    (rcode, None) => (Expect::Drop, format!("DNS failed ({rcode:?})")),
                }
            }
        })
    }
}

fn http_result(code: &str) -> Expect {
    match code {
        "200" => Expect::Ok,
        "403" => Expect::Refused,
        _ => Expect::Drop,
    }
}

/// One DNS query from `netns`: the answer's rcode and first address.
fn dns_query(netns: &str, server: &str, name: &str) -> (Option<String>, Option<String>) {
    let Ok(out) = Command::new("ip")
        .args(["netns", "exec", netns])
        .arg(lab::bin_dir().join("fibril-echo"))
        .args([
            "dns-query",
            server,
            name,
            "--timeout",
            "1",
            "--attempts",
            "1",
        ])
        .output()
    else {
        return (None, None);
    };
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next())
            .map(str::to_string)
    };
    (field("rcode "), field("address "))
}

fn run_scenarios(opts: &Options, dir: &std::path::Path) -> anyhow::Result<Vec<Report>> {
    let st = lab::load_state(LAB)?;
    let at = Placement::of(&st)?;
    // Every node knows every pod, and the servers listen.
    wait(Duration::from_secs(20), || {
        ["client", "client2"].iter().all(|c| {
            ["echo-same-node", "echo-other-node", "world", "host-netns-2"]
                .iter()
                .all(|e| {
                    at.probe(&act(c, e, Expect::Ok))
                        .is_ok_and(|(got, _)| got == Expect::Ok)
                })
        })
    })
    .context("the test pods never reached each other with no policy")?;
    let mut reports = Vec::new();
    for s in scenarios() {
        if opts.test.as_ref().is_some_and(|re| !re.is_match(s.name)) {
            continue;
        }
        let started = Instant::now();
        println!("\n[=] Test [{}]", s.name);
        for (key, yaml) in &s.policies {
            let file = dir.join(format!("{}.yaml", key.replace('/', "_")));
            std::fs::write(&file, yaml)?;
            fibril(None, &["policy", "import", file.to_str().context("path")?])?;
        }
        // Each node has them once its engine applied them (kvstore: a
        // watch away).
        let names: Vec<&str> = s
            .policies
            .iter()
            .map(|(k, _)| k.rsplit('/').next().unwrap_or(k))
            .collect();
        for node in ["node-1", "node-2"] {
            wait(Duration::from_secs(10), || {
                let out = fibril(Some(node), &["policy", "get"]).unwrap_or_default();
                names.iter().all(|n| out.contains(n))
            })
            .with_context(|| format!("{}: {node} never had its policies", s.name))?;
        }
        std::thread::sleep(Duration::from_millis(200));
        let mut outcomes = Vec::new();
        for a in &s.actions {
            let mut a = a.clone();
            if opts.break_test.as_deref() == Some(s.name) {
                a.expect = a.expect.inverted();
            }
            let (src, dst) = (at.addr(a.from)?, at.addr(a.to)?);
            let since = now_rfc3339();
            let (got, mut detail) = at.probe(&a)?;
            let mut passed = got == a.expect;
            if passed && opts.flow_validation != FlowValidation::Disabled {
                // Through the lab's Hubble Relay, as Cilium's test reads
                // them: every node's flows, wherever the verdict was made.
                let verdict = match a.expect {
                    Expect::Ok => "FORWARDED",
                    Expect::Drop | Expect::Refused => "DROPPED",
                };
                let found = wait(Duration::from_secs(3), || {
                    has_flow(&src, &dst, verdict, &since).unwrap_or(false)
                })
                .is_ok();
                if !found {
                    detail.push_str(&format!("; no {verdict} flow {src} -> {dst}"));
                    if opts.flow_validation == FlowValidation::Strict {
                        passed = false;
                    }
                }
            }
            println!(
                "  {} {a} -> expected {:?}, {detail}",
                if passed { "✅" } else { "❌" },
                a.expect
            );
            outcomes.push(Outcome {
                action: a,
                passed,
                detail,
            });
        }
        for (key, _) in &s.policies {
            fibril(None, &["policy", "delete", key])?;
        }
        for node in ["node-1", "node-2"] {
            wait(Duration::from_secs(10), || {
                let out = fibril(Some(node), &["policy", "get"]).unwrap_or_default();
                names.iter().all(|n| !out.contains(n))
            })
            .with_context(|| format!("{}: {node} kept its policies", s.name))?;
        }
        reports.push(Report {
            name: s.name,
            outcomes,
            elapsed: started.elapsed(),
        });
    }
    Ok(reports)
}

/// curl inside network namespace `netns` (a test pod's): the HTTP code
/// ("000" when nothing answered).
fn curl(netns: &str, ip: &str, port: u16, method: &str, path: &str) -> String {
    Command::new("ip")
        .args(["netns", "exec", netns, "curl", "-s", "-m", "1.5"])
        .args(["-o", "/dev/null", "-w", "%{http_code}", "-X", method])
        .arg(format!("http://{ip}:{port}{path}"))
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|_| "000".into())
}

/// Runs this `fibril` against the test lab (node `node`'s agent when
/// given); its output.
fn fibril(node: Option<&str>, args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = Command::new(std::env::current_exe()?);
    cmd.args(["--lab", LAB]);
    if let Some(n) = node {
        cmd.args(["--node", n]);
    }
    let out = cmd.args(args).output()?;
    if !out.status.success() {
        bail!(
            "fibril {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Whether the cluster saw a flow `src` -> `dst` with `verdict` at or
/// after `since` (RFC 3339; asked of the lab's relay).
fn has_flow(src: &str, dst: &str, verdict: &str, since: &str) -> anyhow::Result<bool> {
    let relay = format!("unix://{}", lab::relay_socket(LAB).display());
    let out = fibril(
        None,
        &[
            "observe",
            "--server",
            &relay,
            "-o",
            "json",
            "--since",
            since,
            "--verdict",
            verdict,
            "--from-ip",
            src,
            "--to-ip",
            dst,
        ],
    )?;
    Ok(out
        .lines()
        .any(|l| serde_json::from_str::<Value>(l).is_ok_and(|v| v.get("flow").is_some())))
}

/// Polls `f` until it holds or `timeout` passes.
fn wait(timeout: Duration, mut f: impl FnMut() -> bool) -> anyhow::Result<()> {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if f() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("timed out")
}

/// Now, RFC 3339 (UTC, nanoseconds): a `--since`.
fn now_rfc3339() -> String {
    let d = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    flow::record::Time(d.as_nanos() as u64).to_string()
}

/// The JUnit XML of the run (one testsuite, a testcase per scenario).
fn junit(reports: &[Report]) -> String {
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
    };
    let failures = reports
        .iter()
        .filter(|r| r.outcomes.iter().any(|o| !o.passed))
        .count();
    let total: f64 = reports.iter().map(|r| r.elapsed.as_secs_f64()).sum();
    let mut x = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites tests=\"{}\" failures=\"{failures}\" time=\"{total:.3}\">\n  <testsuite name=\"connectivity test\" package=\"fibril\" tests=\"{}\" failures=\"{failures}\" time=\"{total:.3}\">\n",
        reports.len(),
        reports.len()
    );
    for r in reports {
        x.push_str(&format!(
            "    <testcase name=\"{}\" classname=\"connectivity test\" time=\"{:.3}\">\n",
            esc(r.name),
            r.elapsed.as_secs_f64()
        ));
        for o in r.outcomes.iter().filter(|o| !o.passed) {
            x.push_str(&format!(
                "      <failure message=\"{}\">{}</failure>\n",
                esc(&format!("{}: expected {:?}", o.action, o.action.expect)),
                esc(&o.detail)
            ));
        }
        x.push_str("    </testcase>\n");
    }
    x.push_str("  </testsuite>\n</testsuites>\n");
    x
}
