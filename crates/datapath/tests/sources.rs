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

/// Every `const volatile` setting in `bpf/` is in `knobs` (set by the
/// loader, with the C type's size) or listed as kept at its C default; and
/// every knob the loader sets exists in C.
#[test]
fn every_load_time_setting_is_declared_once_in_knobs() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../bpf");
    let mut files = Vec::new();
    sources(&root, &mut files);
    let mut in_c = std::collections::BTreeMap::new();
    for f in files {
        for line in std::fs::read_to_string(&f).unwrap().lines() {
            let Some(rest) = line.trim().strip_prefix("const volatile ") else {
                continue;
            };
            let mut words = rest.split_whitespace();
            let (ty, name) = (words.next().unwrap(), words.next().unwrap());
            let bits: usize = ty.trim_start_matches("__u").parse().unwrap();
            in_c.insert(name.trim_end_matches(';').to_string(), bits / 8);
        }
    }
    use fibril_datapath::knobs::{C_DEFAULTS, SET};
    for (name, size) in SET {
        assert_eq!(
            in_c.get(name),
            Some(&size),
            "knob {name}: C says {:?}",
            in_c.get(name)
        );
    }
    for name in in_c.keys() {
        assert!(
            SET.iter().any(|(n, _)| n == name) || C_DEFAULTS.contains(&name.as_str()),
            "{name} is declared in bpf/ but neither set by the loader nor listed as a C default"
        );
    }
    assert!(C_DEFAULTS.iter().all(|n| in_c.contains_key(*n)));
}
