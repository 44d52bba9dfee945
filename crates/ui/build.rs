//! Builds the page (crates/ui/web) with the project's own npm lockfile:
//! `npm ci` when the installed packages are missing or older than the
//! lockfile, a type check, then esbuild into OUT_DIR/web, which
//! `server.rs` embeds: the built binary needs no Node.js.

use std::path::{Path, PathBuf};
use std::process::Command;

fn run(cmd: &mut Command, what: &str) {
    let status = cmd.status().unwrap_or_else(|e| {
        panic!(
            "{what}: cannot run {:?} ({e}); the UI's build needs Node.js 20 and npm",
            cmd.get_program()
        )
    });
    if !status.success() {
        panic!("{what} failed ({status})");
    }
}

fn modified(p: &Path) -> Option<std::time::SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

fn main() {
    let web = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").unwrap()).join("web");
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap()).join("web");
    for p in [
        "src",
        "index.html",
        "build.mjs",
        "package.json",
        "package-lock.json",
        "tsconfig.json",
    ] {
        println!("cargo:rerun-if-changed={}", web.join(p).display());
    }
    let lock = web.join("package-lock.json");
    let installed = web.join("node_modules/.package-lock.json");
    if modified(&installed).is_none() || modified(&installed) < modified(&lock) {
        run(
            Command::new("npm")
                .args(["ci", "--no-audit", "--no-fund", "--loglevel=error"])
                .current_dir(&web),
            "npm ci (crates/ui/web)",
        );
    }
    run(
        Command::new("node")
            .args(["node_modules/typescript/bin/tsc", "--noEmit", "-p", "."])
            .current_dir(&web),
        "type check of crates/ui/web (tsc)",
    );
    run(
        Command::new("node")
            .arg("build.mjs")
            .arg(&out)
            .current_dir(&web),
        "esbuild of crates/ui/web",
    );
}
