//! The C sources in `bpf/` agree on their license: every file says
//! `(GPL-2.0-only OR BSD-2-Clause)` in its SPDX line, and every program
//! object declares "Dual BSD/GPL" to the kernel (GPL-compatible, as the
//! helpers the programs call require).

use std::path::{Path, PathBuf};

fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            sources(&path, out);
        } else if path.extension().is_some_and(|e| e == "c" || e == "h") {
            out.push(path);
        }
    }
}

#[test]
fn every_bpf_source_has_one_license() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bpf");
    let mut files = Vec::new();
    sources(&root, &mut files);
    assert!(files.len() >= 8, "{files:?}");
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        let first = text.lines().next().unwrap_or("");
        assert!(
            first.contains("SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause)"),
            "{}: {first}",
            f.display()
        );
        if f.extension().is_some_and(|e| e == "c") {
            assert!(
                text.contains(r#"char LICENSE[] SEC("license") = "Dual BSD/GPL";"#),
                "{}: its license string",
                f.display()
            );
        }
    }
}
