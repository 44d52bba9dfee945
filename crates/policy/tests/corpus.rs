//! The shared corpus of real-world policies (`../shared/corpus`): every
//! valid policy loads; every invalid one is refused with an error that names
//! the file, the document and the field. Templates with Go-template
//! placeholders are not YAML until rendered and must be refused as such.

use std::path::{Path, PathBuf};

/// Files upstream ships broken or obsolete on purpose (corpus README).
const INVALID: &[(&str, &str)] = &[
    ("examples__minikube__malformed_policy.yaml", "spec."),
    ("examples__policies__cidr.yaml", "combining"),
    (
        "examples__policies__multi_rule.yaml",
        "unknown field `role`",
    ),
    (
        "examples__policies__host__lock-down-ingress.yaml",
        "REMOVE_ME_AFTER_DOUBLE_CHECKING_PORTS",
    ),
    (
        "examples__policies__l3__entities__from_nodes.yaml",
        "apiVersion",
    ),
    // Lower-case `in`: the CRD schema only admits In, NotIn, Exists and
    // DoesNotExist (Cilium's agent would log and match everything).
    (
        "examples__policies__l3__match-expressions__and-statement.yaml",
        "unknown variant `in`",
    ),
    (
        "examples__policies__l3__match-expressions__or-statement.yaml",
        "unknown variant `in`",
    ),
];

fn corpus() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/corpus");
    p.exists().then_some(p)
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    v.sort();
    v
}

#[test]
fn every_valid_policy_loads_and_every_invalid_one_is_refused_precisely() {
    let Some(root) = corpus() else {
        panic!("../shared/corpus is absent: the corpus test cannot run (clone the project next to shared/)");
    };
    let mut loaded = 0;
    let mut host_policies = 0;
    let mut problems = Vec::new();
    for dir in ["cilium-policies", "k8s-networkpolicies"] {
        for f in files(&root.join(dir)) {
            let name = f.file_name().unwrap().to_string_lossy().into_owned();
            let text = std::fs::read_to_string(&f).unwrap();
            let templated = text.contains("{{");
            let obsolete = name.starts_with("examples__minikube__l3_l4_l7_policy")
                || name.starts_with("examples__minikube__l3_l4_policy");
            let expected_invalid = INVALID
                .iter()
                .find(|(n, _)| *n == name)
                .map(|(_, needle)| *needle);
            let result = std::panic::catch_unwind(|| fibril_policy::parse(&name, &text, "default"));
            let Ok(result) = result else {
                problems.push(format!("{name}: PANIC"));
                continue;
            };
            match (result, expected_invalid, templated || obsolete) {
                (Ok(p), None, false) => {
                    loaded += p.policies.len();
                    host_policies += p
                        .policies
                        .iter()
                        .filter(|p| p.rules.iter().any(|r| r.host))
                        .count();
                }
                // A template may hold only other kinds (skipped with a notice).
                (Ok(p), None, true) if templated && p.policies.is_empty() => {}
                (Ok(_), None, true) if templated => {
                    problems.push(format!("{name}: a template with placeholders loaded"))
                }
                (Ok(_), _, _) => problems.push(format!("{name}: invalid upstream, but it loaded")),
                (Err(e), Some(needle), _) => {
                    let msg = e.to_string();
                    if !needle.split('|').any(|n| msg.contains(n))
                        || e.file != name
                        || e.document == 0 && !msg.contains("YAML")
                    {
                        problems.push(format!("{name}: refused, but not precisely: {msg}"));
                    }
                }
                (Err(e), None, true) => {
                    assert_eq!(e.file, name);
                }
                (Err(e), None, false) => {
                    problems.push(format!("{name}: valid upstream, refused: {e}"))
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{} problems:\n{}",
        problems.len(),
        problems.join("\n")
    );
    assert!(loaded > 100, "only {loaded} policies loaded");
    eprintln!("corpus: {loaded} policies loaded, {host_policies} of them host policies");
    // Every host policy of the corpus loads (the templated connectivity
    // ones render first; lock-down-ingress is invalid on purpose).
    assert!(
        host_policies >= 7,
        "only {host_policies} host policies loaded"
    );
}
