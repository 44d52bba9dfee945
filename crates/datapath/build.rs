//! Compiles the C datapath in `bpf/` with clang (BTF included, warnings are
//! errors) and leaves the objects in OUT_DIR for `include_bytes!`.
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("../../bpf");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    println!("cargo:rerun-if-changed={}", root.display());
    // One object per attach point; more entries join this list.
    let entries: &[&str] = &["lxc", "overlay", "host", "sockops", "sock", "xdp"];
    for entry in entries {
        let src = root.join(format!("{entry}.bpf.c"));
        let obj = out.join(format!("{entry}.bpf.o"));
        let clang = std::env::var("BPF_CLANG").unwrap_or_else(|_| "clang".into());
        let status = Command::new(&clang)
            .args(["-O2", "-g", "-target", "bpf", "-Wall", "-Werror"])
            .arg("-I/usr/include/x86_64-linux-gnu")
            .arg("-I")
            .arg(root.join("include"))
            .arg("-I")
            .arg(&root)
            .arg("-c")
            .arg(&src)
            .arg("-o")
            .arg(&obj)
            .status()
            .unwrap_or_else(|e| {
                panic!("cannot run {clang} to build the BPF datapath ({e}); install clang and libbpf-dev (xtask deps does)")
            });
        assert!(status.success(), "clang failed on {}", src.display());
    }
}
