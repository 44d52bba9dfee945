//! Tier 5: `fibril connectivity test` end to end: every scenario passes on
//! its two-node lab with strict flow validation, a scenario broken on
//! purpose is reported as failed (exit code, summary, JUnit), and the
//! test's lab is gone afterwards. Needs root.

mod common;

use std::process::Command;

use common::bin;

fn connectivity(args: &[&str]) -> (bool, String) {
    let out = Command::new(bin("fibril"))
        .args(["connectivity", "test"])
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[test]
fn connectivity_test_passes_and_reports_a_broken_expectation() {
    let junit = std::env::temp_dir().join(format!("fibril-junit-{}.xml", std::process::id()));
    let (ok, out) = connectivity(&["--junit-file", junit.to_str().unwrap()]);
    assert!(ok, "{out}");
    assert!(out.contains("48 tests, 48 passed, 0 failed"), "{out}");
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(
        xml.contains(
            "<testsuite name=\"connectivity test\" package=\"fibril\" tests=\"48\" failures=\"0\""
        ),
        "{xml}"
    );
    for name in [
        "echo-ingress-l7",
        "client-ingress-icmp",
        "to-fqdns",
        "host-entity-egress",
    ] {
        assert!(xml.contains(&format!("<testcase name=\"{name}\"")), "{xml}");
    }

    let (ok, out) = connectivity(&[
        "--test",
        "^(no-policies|echo-ingress)$",
        "--break-test",
        "echo-ingress",
        "--junit-file",
        junit.to_str().unwrap(),
    ]);
    assert!(!ok, "a broken expectation must fail the run: {out}");
    assert!(out.contains("2 tests, 1 passed, 1 failed"), "{out}");
    assert!(
        out.contains("echo-ingress") && out.contains("FAILED"),
        "{out}"
    );
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert!(
        xml.contains("failures=\"1\"")
            && xml.contains("<failure message=\"client GET echo-same-node/: expected Drop\""),
        "{xml}"
    );
    std::fs::remove_file(&junit).ok();

    let netns = common::netns_list();
    assert!(!netns.contains("fibril-fibril-conn-test"), "{netns}");
}
