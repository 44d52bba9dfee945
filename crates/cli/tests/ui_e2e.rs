//! Tier 5, the web UI: the seed's lab on two nodes (`labs/two-nodes.yaml`)
//! starts `fibril-ui` over its relay; headless Chromium (Debian's, driven
//! by playwright-core from the UI's own npm lockfile) checks the map's
//! verdicts and policies, namespaces, a filter, the live table, pause and
//! the export (`crates/ui/web/e2e/ui.mjs`), and the real
//! hubble-audit2policy (PyPI) reads the export. Screenshots stay in
//! `target/ui-e2e/`. Needs root.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::{bin, wait_until, Lab};

#[test]
fn the_ui_shows_the_seed_lab_in_chromium_and_exports_for_audit2policy() {
    let lab = Lab::seed_lab("two-nodes.yaml", "10.202.0.0/16");
    let out = lab.fibril(&["lab", "ui"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The address with the lab's token: the page takes it, sets a cookie
    // and leads on without it.
    let url = String::from_utf8_lossy(&out.stdout).trim().to_string();
    assert!(url.contains("/?token="), "{url}");
    // Two nodes: the /24 halves; backend is node-2's first pod.
    let backend = format!("{}:8080", lab.ip(130));
    let get = |pod: &str| lab.http_get(pod, &format!("http://{backend}/"), "1");
    wait_until("frontend to reach backend", || {
        get("microservices/frontend")
    });
    assert!(
        !get("microservices/other-client"),
        "other-client must be dropped"
    );

    let web = Path::new(env!("CARGO_MANIFEST_DIR")).join("../ui/web");
    let artifacts = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/ui-e2e")
        .join(&lab.name);
    std::fs::create_dir_all(&artifacts).unwrap();
    let out = Command::new("node")
        .arg("e2e/ui.mjs")
        .current_dir(&web)
        .env("UI_URL", &url)
        .env("ARTIFACTS", &artifacts)
        .env("FIBRIL", bin("fibril"))
        .env("LAB", &lab.name)
        .env("BACKEND", &backend)
        .output()
        .expect("node runs the browser test");
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}");
    assert!(
        out.status.success(),
        "the browser test failed (screenshots in {}):\n{}",
        artifacts.display(),
        String::from_utf8_lossy(&out.stderr)
    );

    // The export is hubble observe -o jsonpb: each line a flow; and the
    // real hubble-audit2policy makes a policy for backend from it.
    let export = artifacts.join("flows.json");
    let text = std::fs::read_to_string(&export).unwrap();
    let lines: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert!(!lines.is_empty());
    assert!(lines
        .iter()
        .all(|l| l["flow"]["uuid"].is_string() && l["node_name"].is_string()));
    let audit2policy = audit2policy();
    let out = Command::new("python3")
        .arg(audit2policy.join("bin/hubble-audit2policy"))
        .arg(&export)
        .arg("--dry-run")
        .env("PYTHONPATH", &audit2policy)
        .output()
        .unwrap();
    let policies = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "hubble-audit2policy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{policies}");
    assert!(policies.contains("kind: CiliumNetworkPolicy"), "{policies}");
    assert!(policies.contains("app: backend"), "{policies}");
    assert!(policies.contains("app: frontend"), "{policies}");
    // From requests only: backend is let in on 8080, and frontend is not
    // let in from backend on ephemeral ports.
    let ports: Vec<u32> = policies
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- port: "))
        .filter_map(|p| p.trim_matches('\'').parse().ok())
        .collect();
    assert!(ports.contains(&8080), "{policies}");
    assert!(
        ports.iter().all(|&p| p < 32768),
        "a reply's ephemeral port became a rule: {ports:?}"
    );
}

/// hubble-audit2policy as `cargo xtask deps` installs it (from PyPI).
fn audit2policy() -> PathBuf {
    let dir = test_support::audit2policy_dir();
    assert!(
        dir.join("bin/hubble-audit2policy").exists(),
        "hubble-audit2policy is not installed: run `cargo xtask deps` (it installs {})",
        dir.display()
    );
    dir
}
