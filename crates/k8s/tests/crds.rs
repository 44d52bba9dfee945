//! The Helm chart carries the same CRDs the agent installs: each file in
//! `install/kubernetes/fibril/crds/` is `fibril_k8s::crd::definitions()`
//! as YAML. `FIBRIL_WRITE_CRDS=1 cargo test -p fibril-k8s --test crds`
//! writes them after a schema change.

use std::path::PathBuf;

fn chart_crds() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../install/kubernetes/fibril/crds")
}

fn yaml(crd: &serde_json::Value) -> String {
    format!(
        "# Generated from crates/k8s/src/crd.rs (FIBRIL_WRITE_CRDS=1 cargo test -p fibril-k8s --test crds); do not edit.\n{}",
        serde_saphyr::to_string(crd).expect("a CRD serializes")
    )
}

#[test]
fn the_charts_crds_are_the_agents() {
    let dir = chart_crds();
    let write = std::env::var_os("FIBRIL_WRITE_CRDS").is_some();
    for crd in fibril_k8s::crd::definitions() {
        let path = dir.join(fibril_k8s::crd::file_name(&crd));
        let want = yaml(&crd);
        if write {
            std::fs::write(&path, &want).unwrap();
            continue;
        }
        let have = std::fs::read_to_string(&path)
            .unwrap_or_else(|e| panic!("{}: {e} (FIBRIL_WRITE_CRDS=1 writes it)", path.display()));
        // Compared as data, so the check is about content, not layout.
        let parsed: serde_json::Value = serde_saphyr::from_str(&have).unwrap();
        assert_eq!(
            parsed,
            crd,
            "{} differs from crd.rs (FIBRIL_WRITE_CRDS=1 rewrites it)",
            path.display()
        );
    }
}
