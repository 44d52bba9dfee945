//! `fibril connectivity test`: Cilium's connectivity scenarios (as
//! `cilium connectivity test` runs them) on a two-node lab of the test's
//! own: namespace `cilium-test` with `client` and `client2` on node-1,
//! `echo-same-node` beside them and `echo-other-node` on node-2, and the
//! `world` (an external of the lab). Each scenario imports its policies,
//! runs real HTTP requests from the pods (curl), checks each by its result
//! and by the flows it produced on the node that decided it, and removes
//! its policies. The lab is removed at the end.

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

const LAB_YAML: &str = r#"
podCIDR: 10.220.0.0/16
underlayCIDR: 10.221.0.0/24
nodes: [node-1, node-2]
namespaces:
- name: cilium-test
pods:
- {name: client, namespace: cilium-test, labels: {kind: client, name: client}, node: node-1}
- {name: client2, namespace: cilium-test, labels: {kind: client, name: client2, other: client}, node: node-1}
- {name: echo-same-node, namespace: cilium-test, labels: {kind: echo, name: echo-same-node}, node: node-1, ports: [{name: http-8080, containerPort: 8080}], command: [fibril-echo, http-server, --port, "8080"]}
- {name: echo-other-node, namespace: cilium-test, labels: {kind: echo, name: echo-other-node}, node: node-2, ports: [{name: http-8080, containerPort: 8080}], command: [fibril-echo, http-server, --port, "8080"]}
externals:
- {name: world, address: 203.0.113.77, command: [fibril-echo, http-server, --port, "80"]}
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

/// One request: from a client pod to a destination, its method and path.
#[derive(Clone, Debug)]
struct Action {
    from: &'static str,
    to: &'static str,
    method: &'static str,
    path: &'static str,
    expect: Expect,
}

struct Scenario {
    name: &'static str,
    /// (name, YAML) of each policy.
    policies: Vec<(String, String)>,
    actions: Vec<Action>,
}

fn act(from: &'static str, to: &'static str, expect: Expect) -> Action {
    Action {
        from,
        to,
        method: "GET",
        path: "/",
        expect,
    }
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
        method,
        path,
        expect,
    }
}

/// A CiliumNetworkPolicy of the test namespace: (name, YAML).
fn cnp(name: &str, spec: &str) -> (String, String) {
    policy_doc("cilium.io/v2", "CiliumNetworkPolicy", name, spec)
}

/// A Kubernetes NetworkPolicy of the test namespace: (name, YAML).
fn knp(name: &str, spec: &str) -> (String, String) {
    policy_doc("networking.k8s.io/v1", "NetworkPolicy", name, spec)
}

fn policy_doc(api: &str, kind: &str, name: &str, spec: &str) -> (String, String) {
    let spec: String = spec.lines().map(|l| format!("  {l}\n")).collect();
    (
        name.to_string(),
        format!("apiVersion: {api}\nkind: {kind}\nmetadata: {{name: {name}, namespace: {NS}}}\nspec:\n{spec}"),
    )
}

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
            actions: everything(Ok, Ok),
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

fn run_scenarios(opts: &Options, dir: &std::path::Path) -> anyhow::Result<Vec<Report>> {
    let st = lab::load_state(LAB)?;
    let ip_of = |pod: &str| -> anyhow::Result<String> {
        if pod == "world" {
            return Ok(WORLD.to_string());
        }
        let p = st
            .pods
            .iter()
            .find(|p| p.name == pod)
            .with_context(|| format!("no pod {pod}"))?;
        p.cni_result
            .as_ref()
            .and_then(|r| r["ips"][0]["address"].as_str())
            .and_then(|a| a.split('/').next())
            .map(str::to_string)
            .with_context(|| format!("no address for {pod}"))
    };
    let netns: std::collections::BTreeMap<&str, &str> = st
        .pods
        .iter()
        .map(|p| (p.name.as_str(), p.netns.as_str()))
        .collect();
    let curl = |from: &str, to: &str, method: &str, path: &str| -> String {
        match (netns.get(from), ip_of(to)) {
            (Some(ns), Ok(ip)) => curl(ns, &ip, port_of(to), method, path),
            _ => "000".into(),
        }
    };
    let node_of = |pod: &str| -> Option<String> {
        st.pods
            .iter()
            .find(|p| p.name == pod)
            .and_then(|p| p.node.clone())
    };
    // Every node knows every pod, and the servers listen.
    wait(Duration::from_secs(20), || {
        ["client", "client2"].iter().all(|c| {
            ["echo-same-node", "echo-other-node", "world"]
                .iter()
                .all(|e| curl(c, e, "GET", "/") == "200")
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
        for (name, yaml) in &s.policies {
            let file = dir.join(format!("{name}.yaml"));
            std::fs::write(&file, yaml)?;
            fibril(None, &["policy", "import", file.to_str().context("path")?])?;
        }
        // Each node has them once its engine applied them (kvstore: a
        // watch away).
        let names: Vec<&str> = s.policies.iter().map(|(n, _)| n.as_str()).collect();
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
            let (src, dst) = (ip_of(a.from)?, ip_of(a.to)?);
            let since = now_rfc3339();
            let code = curl(a.from, a.to, a.method, a.path);
            let got = match code.as_str() {
                "200" => Expect::Ok,
                "403" => Expect::Refused,
                _ => Expect::Drop,
            };
            let mut passed = got == a.expect;
            let mut detail = format!("HTTP {code}");
            if passed && opts.flow_validation != FlowValidation::Disabled {
                // The drop is reported where it happened: the source's node
                // for its egress policy, else the destination's.
                let nodes: Vec<Option<String>> =
                    vec![node_of(a.from), node_of(a.to).or_else(|| node_of(a.from))];
                let verdict = match a.expect {
                    Expect::Ok => "FORWARDED",
                    Expect::Drop => "DROPPED",
                    Expect::Refused => "DROPPED",
                };
                let found = wait(Duration::from_secs(3), || {
                    nodes.iter().any(|n| {
                        has_flow(n.as_deref(), &src, &dst, verdict, &since).unwrap_or(false)
                    })
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
                "  {} {} {} {}{} -> expected {:?}, {detail}",
                if passed { "✅" } else { "❌" },
                a.from,
                a.method,
                a.to,
                a.path,
                a.expect
            );
            outcomes.push(Outcome {
                action: a,
                passed,
                detail,
            });
        }
        for n in &names {
            fibril(None, &["policy", "delete", &format!("{NS}/{n}")])?;
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

fn port_of(to: &str) -> u16 {
    if to == "world" {
        80
    } else {
        8080
    }
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

/// Whether node `node` saw a flow `src` -> `dst` with `verdict` at or after
/// `since`.
fn has_flow(
    node: Option<&str>,
    src: &str,
    dst: &str,
    verdict: &str,
    since: &str,
) -> anyhow::Result<bool> {
    let out = fibril(
        node,
        &[
            "observe",
            "-o",
            "json",
            "--last",
            "1000",
            "--verdict",
            verdict,
            "--from-ip",
            src,
            "--to-ip",
            dst,
        ],
    )?;
    Ok(out.lines().any(|l| {
        serde_json::from_str::<Value>(l)
            .ok()
            .and_then(|v| v["flow"]["time"].as_str().map(|t| t >= since))
            .unwrap_or(false)
    }))
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

/// Now as the flows' RFC 3339 time (UTC, nanoseconds), to compare as text.
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
                esc(&format!(
                    "{} {} {}{}: expected {:?}",
                    o.action.from, o.action.method, o.action.to, o.action.path, o.action.expect
                )),
                esc(&o.detail)
            ));
        }
        x.push_str("    </testcase>\n");
    }
    x.push_str("  </testsuite>\n</testsuites>\n");
    x
}
