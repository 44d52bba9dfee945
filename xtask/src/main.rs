//! `cargo xtask <task>`: the project's own scripts.
//!
//! - `deps`:  install what a fresh machine lacks (clang, libbpf-dev, iproute2,
//!   containernetworking-plugins) through apt.
//! - `test`:  every tier: fmt, clippy, BPF build with -Werror, unit, ABI,
//!   BPF_PROG_TEST_RUN, namespace and end-to-end lab tests (needs root).
//! - `demo`:  the default lab (the seed's microservices example), traffic,
//!   flows; then the same on two nodes, ending with the address of the
//!   lab's web UI (that lab stays up for it); `--keep` leaves the one-node
//!   lab up too.
//! - `bench`: policy computation (full and incremental, into real maps);
//!   the flow pipeline (kernel ring buffer to flow ring, lost events) and
//!   GetFlows throughput;
//!   datapath request/response rate and throughput against bare veth, with
//!   and without 10,000 policy entries; the cluster, overlay, relay, web UI
//!   (`--only ui`), CNI and L7 parts (`--only NAME` runs one).
//! - `layering`: the check `test` makes that `policy`, `flow` and `abi` pull
//!   in no aya, tokio, tonic, hyper, h2 or prost.
//! - `ci`:    what `.ci/run` runs (= test).
#![forbid(unsafe_code)]

mod bench;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    eprintln!("+ {shown}");
    let status = cmd.status().with_context(|| format!("running {shown}"))?;
    if !status.success() {
        bail!("{shown} failed ({status})");
    }
    Ok(())
}

fn cargo() -> Command {
    // The rustup proxy, so that rust-toolchain.toml decides the toolchain.
    let mut c = Command::new("cargo");
    c.current_dir(root());
    c
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

/// Installs the system packages the build and the tests need, if missing.
fn deps() -> anyhow::Result<()> {
    apt_packages()?;
    hubble_cli()?;
    audit2policy()?;
    kubernetes_tools()?;
    helm_cli()?;
    kafka_jars()?;
    istio_cni()?;
    Ok(())
}

/// Istio's CNI plugin (`tools/istio-cni`), for the tests that chain it
/// after Fibril's: built once per version into the cache. About 2 minutes
/// the first time.
fn istio_cni() -> anyhow::Result<()> {
    let out = test_support::istio_cni_build_path();
    if out.exists() {
        return Ok(());
    }
    eprintln!(
        "building Istio's CNI plugin (from the Go module proxy) into {}",
        out.display()
    );
    run(Command::new("go")
        .args(["build", "-trimpath", "-o"])
        .arg(&out)
        .arg("istio.io/istio/cni/cmd/istio-cni")
        .current_dir(root().join("tools/istio-cni")))
    .context("building Istio's CNI plugin needs Go and the Go module proxy")
}

/// The real Apache Kafka (broker and tools) from Maven Central, for the
/// Kafka proxy's tests: `tools/kafka/pom.xml`'s artifacts and their
/// runtime dependencies copied once per version into the cache, run with
/// the machine's Java.
fn kafka_jars() -> anyhow::Result<()> {
    let lib = test_support::kafka_lib_dir();
    let version = test_support::kafka_version();
    if lib.join(format!("kafka_2.13-{version}.jar")).exists() {
        return Ok(());
    }
    let has = |cmd: &str| {
        Command::new(cmd)
            .arg("-version")
            .output()
            .is_ok_and(|o| o.status.success())
    };
    if !has("java") || !has("mvn") {
        install_apt(&["default-jdk-headless", "maven"])?;
    }
    eprintln!(
        "fetching Apache Kafka {version} (Maven Central) into {}",
        lib.display()
    );
    // Into a fresh directory, then renamed: a half-copied one is never
    // taken for a whole one.
    let partial = lib.with_file_name("lib.partial");
    let _ = std::fs::remove_dir_all(&partial);
    run(Command::new("mvn")
        .args([
            "-q",
            "-B",
            "dependency:copy-dependencies",
            "-DincludeScope=runtime",
        ])
        .arg(format!("-DoutputDirectory={}", partial.display()))
        .current_dir(root().join("tools/kafka")))
    .context("fetching Kafka needs Maven, Java and Maven Central")?;
    std::fs::rename(&partial, &lib)?;
    Ok(())
}

/// The real helm CLI (`tools/helm`), for the chart's tests: built once per
/// version into the cache, its version stamped as helm's own build does.
fn helm_cli() -> anyhow::Result<()> {
    let out = test_support::helm_build_path();
    if out.exists() {
        return Ok(());
    }
    let version = test_support::tool_version("helm", "helm.sh/helm/v4");
    eprintln!(
        "building the real helm {version} (from the Go module proxy) into {}",
        out.display()
    );
    let started = std::time::Instant::now();
    run(Command::new("go")
        .args(["build", "-trimpath", "-ldflags"])
        .arg(format!(
            "-X helm.sh/helm/v4/internal/version.version={version}"
        ))
        .arg("-o")
        .arg(&out)
        .arg("helm.sh/helm/v4/cmd/helm")
        .current_dir(root().join("tools/helm")))
    .context("building helm needs Go and the Go module proxy")?;
    eprintln!("helm built in {:.0?}", started.elapsed());
    Ok(())
}

/// Kubernetes' control plane, kube-proxy and kubectl (`tools/kubernetes`), built once
/// per release from the Go module proxy into the cache outside the clone,
/// where labs with `kubernetes: true` find them. About 6 minutes the first
/// time on two cores; stamped with the release's version (as Kubernetes'
/// own build does), which kubectl and helm read.
fn kubernetes_tools() -> anyhow::Result<()> {
    let tool = root().join("tools/kubernetes");
    let go_mod = std::fs::read_to_string(tool.join("go.mod"))?;
    let version = go_mod
        .lines()
        .find_map(|l| {
            // `require k8s.io/kubernetes vX`, or a line of a require block.
            let mut w = l.trim().trim_start_matches("require ").split_whitespace();
            (w.next() == Some("k8s.io/kubernetes")).then(|| w.next())?
        })
        .context("tools/kubernetes/go.mod requires no k8s.io/kubernetes")?
        .to_string();
    let out = test_support::cache_dir().join(format!("kubernetes-{version}"));
    let commands = [
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "kube-proxy",
        "kubectl",
    ];
    if commands.iter().all(|c| out.join(c).exists()) {
        return Ok(());
    }
    let mut parts = version.trim_start_matches('v').split('.');
    let (major, minor) = (
        parts.next().unwrap_or_default(),
        parts.next().unwrap_or_default(),
    );
    let ldflags: Vec<String> = [
        "k8s.io/component-base/version",
        "k8s.io/client-go/pkg/version",
    ]
    .iter()
    .flat_map(|pkg| {
        [
            format!("-X {pkg}.gitVersion={version}"),
            format!("-X {pkg}.gitMajor={major}"),
            format!("-X {pkg}.gitMinor={minor}"),
            format!("-X {pkg}.gitTreeState=clean"),
        ]
    })
    .collect();
    eprintln!(
        "building Kubernetes {version} (from the Go module proxy) into {}",
        out.display()
    );
    std::fs::create_dir_all(&out)?;
    run(Command::new("go")
        .args(["build", "-trimpath", "-ldflags", &ldflags.join(" "), "-o"])
        .arg(format!("{}/", out.display()))
        .args(
            commands
                .iter()
                .map(|c| format!("k8s.io/kubernetes/cmd/{c}")),
        )
        .current_dir(&tool))
    .context("building Kubernetes needs Go and the Go module proxy")
}

/// hubble-audit2policy from PyPI (the UI test reads the UI's export with
/// it), installed once per version into the cache outside the clone.
fn audit2policy() -> anyhow::Result<()> {
    let dir = test_support::audit2policy_dir();
    if dir.join("bin/hubble-audit2policy").exists() {
        return Ok(());
    }
    let has_pip = Command::new("python3")
        .args(["-m", "pip", "--version"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !has_pip {
        install_apt(&["python3-pip"])?;
    }
    eprintln!(
        "installing hubble-audit2policy {} (PyPI) into {}",
        test_support::AUDIT2POLICY_VERSION,
        dir.display()
    );
    run(Command::new("python3")
        .args(["-m", "pip", "install", "--quiet", "--target"])
        .arg(&dir)
        .arg(format!(
            "hubble-audit2policy=={}",
            test_support::AUDIT2POLICY_VERSION
        ))
        // Only into its own directory: Debian's "externally managed"
        // guard is about the system's packages.
        .env("PIP_BREAK_SYSTEM_PACKAGES", "1"))
    .context("installing hubble-audit2policy needs Python 3 with pip and PyPI")
}

/// The real hubble CLI, built once per version from the Go module proxy
/// through `tools/hubble-cli` (a wrapper module whose `tool` is
/// github.com/cilium/hubble, with hubble's replace lines), and cached
/// outside the clone where the tests look for it
/// (`test_support::hubble_cli`). About 3 minutes the first time.
fn hubble_cli() -> anyhow::Result<()> {
    let tool = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/hubble-cli");
    let out = test_support::hubble_cli_build_path();
    if out.exists() {
        return Ok(());
    }
    eprintln!(
        "building the real hubble CLI (from the Go module proxy) into {}",
        out.display()
    );
    run(Command::new("go")
        .args(["build", "-trimpath", "-o"])
        .arg(&out)
        .arg("github.com/cilium/hubble")
        .current_dir(&tool))
    .context("building the hubble CLI needs Go and the Go module proxy")
}

fn apt_packages() -> anyhow::Result<()> {
    let needed = [
        ("clang", "/usr/bin/clang"),
        ("libbpf-dev", "/usr/include/bpf/bpf_helpers.h"),
        ("iproute2", "/usr/sbin/ip"),
        ("util-linux", "/usr/bin/nsenter"),
        ("containernetworking-plugins", "/usr/lib/cni/portmap"),
        ("procps", "/usr/sbin/sysctl"),
        // The L7 tests' HTTP/1.1 and HTTP/2 client inside lab pods.
        ("curl", "/usr/bin/curl"),
        // The real server behind the proxy in the L7 bypass corpus.
        ("nginx-light", "/usr/sbin/nginx"),
        // The cluster's kvstore (a real etcd), and protoc with the
        // well-known types, which the etcd client's build generates its
        // gRPC code with.
        ("etcd-server", "/usr/bin/etcd"),
        ("protobuf-compiler", "/usr/bin/protoc"),
        (
            "libprotobuf-dev",
            "/usr/include/google/protobuf/descriptor.proto",
        ),
        // The cluster tests' capture of the underlay (the VNI a packet
        // carries).
        ("tcpdump", "/usr/bin/tcpdump"),
        // The connectivity test's ICMP actions (ping from a pod).
        ("iputils-ping", "/usr/bin/ping"),
        // The UI's end-to-end test runs it headless (playwright-core).
        ("chromium", "/usr/bin/chromium"),
        // The real kube-proxy beside Fibril (issue 18): its iptables and
        // nftables modes, and the conntrack tool it clears UDP entries with.
        ("iptables", "/usr/sbin/iptables-restore"),
        ("nftables", "/usr/sbin/nft"),
        ("conntrack", "/usr/sbin/conntrack"),
    ];
    let missing: Vec<&str> = needed
        .iter()
        .filter(|(_, path)| !Path::new(path).exists())
        .map(|(pkg, _)| *pkg)
        .collect();
    install_apt(&missing)
}

fn install_apt(missing: &[&str]) -> anyhow::Result<()> {
    if missing.is_empty() {
        return Ok(());
    }
    if !is_root() {
        bail!(
            "missing packages {missing:?}: run as root, or `apt-get install -y {}`",
            missing.join(" ")
        );
    }
    eprintln!("installing {missing:?}");
    run(Command::new("apt-get")
        .args(["update", "-q"])
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    // Packages install only: no service starts (nginx would take the
    // host's port 80). policy-rc.d answering 101 is Debian's way to say
    // so; one already there is left as it is.
    let policy_rc = Path::new("/usr/sbin/policy-rc.d");
    let ours = !policy_rc.exists();
    if ours {
        std::fs::write(policy_rc, "#!/bin/sh\nexit 101\n")?;
        std::fs::set_permissions(
            policy_rc,
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )?;
    }
    let installed = run(Command::new("apt-get")
        .args(["install", "-y", "-q", "--no-install-recommends"])
        .args(missing)
        .env("DEBIAN_FRONTEND", "noninteractive"));
    if ours {
        std::fs::remove_file(policy_rc).ok();
    }
    installed
}

fn test() -> anyhow::Result<()> {
    deps()?;
    if !is_root() {
        bail!("the BPF, namespace and lab tiers need root (CAP_BPF, CAP_NET_ADMIN); run as root");
    }
    run(cargo().args(["fmt", "--all", "--", "--check"]))?;
    // The BPF objects are built by crates/datapath/build.rs with -Werror.
    run(cargo().args([
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    layering()?;
    // Lab tests run the binaries next to the test executables.
    run(cargo().args(["build", "--workspace", "--bins"]))?;
    let (passed, failed) = cargo_test()?;
    // One plain closing line for the whole run (cargo's last line is only
    // its last test binary's).
    println!("\nall tiers: {passed} passed, {failed} failed");
    if failed > 0 || passed == 0 {
        bail!("{failed} tests failed, {passed} passed");
    }
    Ok(())
}

/// The pure crates stay pure: what `policy`, `flow`, `abi` (without its
/// `aya` feature) and `netns` pull in, transitively, has no eBPF loader,
/// async runtime or gRPC stack, so the kernel's and the API's concerns
/// cannot leak into the policy model or the flow type; and no crate but
/// `datapath` (and the agent through it) links aya.
fn layering() -> anyhow::Result<()> {
    const PURE: [&str; 4] = ["fibril-policy", "fibril-flow", "fibril-abi", "fibril-netns"];
    const FORBIDDEN: [&str; 6] = ["aya", "tokio", "tonic", "hyper", "h2", "prost"];
    // Only the datapath (and the agent, through it) links the eBPF loader.
    const NO_AYA: [&str; 8] = [
        "fibril-cli",
        "fibril-cni",
        "fibril-hubble",
        "fibril-api",
        "fibril-proxy",
        "fibril-echo",
        "fibril-relay",
        "fibril-ui",
    ];
    let checks = PURE
        .iter()
        .map(|k| (*k, &FORBIDDEN[..]))
        .chain(NO_AYA.iter().map(|k| (*k, &FORBIDDEN[..1])));
    for (krate, forbidden) in checks {
        let out = Command::new(env!("CARGO"))
            .args(["tree", "-p", krate, "-e", "normal", "--prefix", "none"])
            .output()?;
        if !out.status.success() {
            bail!(
                "cargo tree -p {krate}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let tree = String::from_utf8_lossy(&out.stdout);
        let pulled: std::collections::BTreeSet<&str> = tree
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter(|name| forbidden.contains(name))
            .collect();
        if !pulled.is_empty() {
            bail!("{krate} depends on {pulled:?}: see the layering rule in xtask (layering())");
        }
    }
    println!(
        "layering: {} depend on none of {}; {} not on aya",
        PURE.join(", "),
        FORBIDDEN.join(", "),
        NO_AYA.join(", ")
    );
    Ok(())
}

/// Runs the workspace tests, echoing their output, and sums every
/// `test result:` line.
fn cargo_test() -> anyhow::Result<(u64, u64)> {
    use std::io::BufRead;
    let mut child = cargo()
        .args([
            "test",
            "--workspace",
            "--no-fail-fast",
            "--",
            "--test-threads",
            "2",
        ])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("running cargo test")?;
    let (mut passed, mut failed) = (0, 0);
    let out = child.stdout.take().context("cargo test stdout")?;
    for line in std::io::BufReader::new(out).lines() {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| {
                        part.trim()
                            .trim_start_matches("ok. ")
                            .trim_start_matches("FAILED. ")
                            .strip_suffix(word)
                    })
                    .and_then(|n| n.trim().parse().ok())
                    .unwrap_or(0)
            };
            passed += count(" passed");
            failed += count(" failed");
        }
    }
    let status = child.wait()?;
    if !status.success() && failed == 0 {
        bail!("cargo test failed ({status})");
    }
    Ok((passed, failed))
}

fn fibril(release_dir: &Path) -> Command {
    let mut c = Command::new(release_dir.join("fibril"));
    c.current_dir(root());
    c
}

fn demo(keep: bool) -> anyhow::Result<()> {
    deps()?;
    run(cargo().args(["build", "--release", "--workspace", "--bins"]))?;
    let bin = root().join("target/release");
    // Start from a clean slate if an earlier demo was left up.
    let _ = fibril(&bin).args(["lab", "down"]).output();
    run(fibril(&bin).args(["lab", "up"]))?;
    let result = (|| -> anyhow::Result<()> {
        std::thread::sleep(std::time::Duration::from_millis(300));
        println!("\n== frontend -> backend:8080 (allowed by allow-frontend-to-backend)");
        run(fibril(&bin).args([
            "lab",
            "exec",
            "microservices/frontend",
            "--",
            "fibril-echo",
            "http-get",
            "http://10.200.0.3:8080/",
        ]))?;
        println!("\n== other-client -> backend:8080 (no policy allows it: dropped in the kernel)");
        let denied = fibril(&bin)
            .args([
                "lab",
                "exec",
                "microservices/other-client",
                "--",
                "fibril-echo",
                "http-get",
                "--timeout",
                "1",
                "http://10.200.0.3:8080/",
            ])
            .status()?;
        println!("(exit status {denied})");
        println!(
            "\n== L7: replace the L4 policy by the seed's allow-only-get-requests (GET /api/.* only)"
        );
        run(fibril(&bin).args([
            "policy",
            "delete",
            "microservices/allow-frontend-to-backend",
        ]))?;
        let l7 = root().join("labs/policies/allow-only-get-requests.yaml");
        run(fibril(&bin).args(["policy", "import", l7.to_str().unwrap_or_default()]))?;
        for (method, path) in [
            ("GET", "/api/items"),
            ("POST", "/api/items"),
            ("GET", "/admin"),
        ] {
            println!("-- frontend: {method} {path}");
            run(fibril(&bin).args([
                "lab",
                "exec",
                "microservices/frontend",
                "--",
                "curl",
                "-s",
                "-m",
                "3",
                "-X",
                method,
                "-w",
                " [HTTP %{http_code}]\n",
                &format!("http://10.200.0.3:8080{path}"),
            ]))?;
        }
        println!("\n== fibril observe --protocol http --last 4");
        run(fibril(&bin).args(["observe", "--protocol", "http", "--last", "4"]))?;
        println!("\n== fibril endpoint list");
        run(fibril(&bin).args(["endpoint", "list"]))?;
        println!("\n== fibril observe --last 20");
        run(fibril(&bin).args(["observe", "--last", "20"]))?;
        println!("\n== fibril observe --verdict DROPPED -o json --last 1");
        run(fibril(&bin).args([
            "observe",
            "--verdict",
            "DROPPED",
            "-o",
            "json",
            "--last",
            "1",
        ]))?;
        Ok(())
    })();
    if keep {
        println!("\nThe lab is still up: try `target/release/fibril observe -f`; `target/release/fibril lab down` removes it.");
    } else {
        run(fibril(&bin).args(["lab", "down"]))?;
    }
    result?;
    demo_two_nodes(&bin)
}

/// The seed's example across two nodes (`labs/two-nodes.yaml`): frontend
/// on node-1 reaches backend on node-2 through the overlay; other-client
/// is dropped in node-2's kernel; each node shows its side of the flows,
/// and the lab's relay shows both in one stream.
fn demo_two_nodes(bin: &Path) -> anyhow::Result<()> {
    const LAB: &str = "two-nodes";
    let lab = |args: &[&str]| {
        let mut c = fibril(bin);
        c.args(["--lab", LAB]).args(args);
        c
    };
    let _ = lab(&["lab", "down"]).output();
    let file = root().join("labs/two-nodes.yaml");
    println!("\n== two nodes: fibril --lab {LAB} lab up -f labs/two-nodes.yaml");
    run(&mut lab(&[
        "lab",
        "up",
        "-f",
        file.to_str().unwrap_or_default(),
    ]))?;
    let result = (|| -> anyhow::Result<()> {
        // Each node learns the other's pods from etcd.
        std::thread::sleep(std::time::Duration::from_millis(500));
        println!("\n== fibril --lab {LAB} status (node-1)");
        run(&mut lab(&["status"]))?;
        println!("\n== frontend (node-1) -> backend (node-2):8080, allowed");
        run(&mut lab(&[
            "lab",
            "exec",
            "microservices/frontend",
            "--",
            "fibril-echo",
            "http-get",
            "http://10.202.1.2:8080/",
        ]))?;
        println!("\n== other-client (node-1) -> backend (node-2):8080, dropped in node-2's kernel");
        let denied = lab(&[
            "lab",
            "exec",
            "microservices/other-client",
            "--",
            "fibril-echo",
            "http-get",
            "--timeout",
            "1",
            "http://10.202.1.2:8080/",
        ])
        .status()?;
        println!("(exit status {denied})");
        for node in ["node-1", "node-2"] {
            println!("\n== fibril --lab {LAB} --node {node} observe --last 8");
            run(&mut lab(&["--node", node, "observe", "--last", "8"]))?;
        }
        // Both nodes' flows as one stream, in time order: the lab's Hubble
        // Relay (the real hubble CLI works against it too).
        let relay = format!("unix:///run/fibril/labs/{LAB}/relay.sock");
        println!("\n== fibril observe --server {relay} --last 12   (Hubble Relay: every node)");
        run(&mut lab(&["observe", "--server", &relay, "--last", "12"]))?;
        Ok(())
    })();
    if let Err(e) = result {
        run(&mut lab(&["lab", "down"]))?;
        return Err(e);
    }
    // The lab stays up for its UI: the map of what just happened.
    let out = lab(&["lab", "ui"]).output()?;
    anyhow::ensure!(
        out.status.success(),
        "the lab's UI did not say where it serves"
    );
    let url = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let ui = url
        .strip_prefix("http://")
        .and_then(|rest| rest.split_once('/'))
        .map(|(address, _)| address.to_string())
        .context("the UI's address")?;
    let page = ui_page(&ui).with_context(|| format!("the UI at {ui} did not answer"))?;
    println!(
        "\nThe two-node lab stays up for its UI: `target/release/fibril --lab {LAB} --node node-2 observe -f`; \
         `target/release/fibril --lab {LAB} lab down` removes it (and the UI)."
    );
    println!(
        "\n== the UI (service map, live flows, policy verdicts; it answered {}): {url}",
        page.lines().next().unwrap_or_default()
    );
    Ok(())
}

/// The UI's health answer: the address printed is one that serves.
fn ui_page(address: &str) -> anyhow::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(address)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    write!(
        s,
        "GET /healthz HTTP/1.1\r\nHost: {address}\r\nConnection: close\r\n\r\n"
    )?;
    let mut page = String::new();
    s.read_to_string(&mut page)?;
    anyhow::ensure!(
        page.starts_with("HTTP/1.1 200"),
        "answered {:?}",
        page.lines().next()
    );
    Ok(page)
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("deps") => deps(),
        Some("test") | Some("ci") => test(),
        Some("demo") => demo(args.iter().any(|a| a == "--keep")),
        Some("bench") => {
            // `--only policy|cluster|relay|k8s|ui|flows|packet|lb|prefilter|services|datapath|overlay|cni|l7|kafka` runs one part.
            let only: Option<String> = bench::flag(&args, "only");
            let part = |name: &str| only.as_deref().is_none_or(|o| o == name);
            deps()?;
            run(cargo().args(["build", "--release", "--workspace", "--bins"]))?;
            let agent_example = |name: &str| {
                run(cargo()
                    .args(["run", "--quiet", "--release", "-p", "fibril-agent"])
                    .args(["--example", name]))
            };
            let release = root().join("target/release");
            if part("policy") {
                println!("== policy computation (5,000 endpoints, 2,000 identities, 1,000 rules)");
                agent_example("policy_bench")?;
            }
            if part("cluster") {
                println!("\n== kvstore mode: convergence across three agents on one etcd; agent RSS and etcd traffic at 3 x 1,000 pods");
                agent_example("cluster_bench")?;
            }
            if part("relay") {
                println!("\n== Hubble Relay: 3 nodes -> 1 client, flows/s, RSS, follow latency");
                run(cargo()
                    .args(["run", "--quiet", "--release", "-p", "fibril-relay"])
                    .args(["--example", "relay_bench"]))?;
            }
            if part("k8s") {
                println!("\n== Kubernetes mode: 3 nodes with the real control plane; policy apply -> in force on every node, pod -> Ready, agent RSS per 1,000 pods");
                run(cargo()
                    .args(["run", "--quiet", "--release", "-p", "fibril-cli"])
                    .args(["--example", "k8s_bench"]))?;
            }
            if part("ui") {
                println!("\n== web UI: 100,000 flows/s into 3 nodes, the page open in headless Chromium (UI_BENCH_SECONDS, default 600)");
                run(cargo()
                    .args(["run", "--quiet", "--release", "-p", "fibril-ui"])
                    .args(["--example", "ui_bench"]))?;
            }
            if part("flows") {
                println!("\n== flow pipeline and Hubble API");
                agent_example("flow_bench")?;
            }
            if part("packet") {
                println!("\n== per-packet cost of the programs (BPF_PROG_TEST_RUN, median of 5 x 1,000,000)");
                run(cargo()
                    .args(["run", "--quiet", "--release", "-p", "fibril-datapath"])
                    .args(["--example", "packet_bench"]))?;
            }
            if part("lb") {
                println!("\n== service load balancing per packet (BPF_PROG_TEST_RUN, median of 5,000 single runs)");
                run(cargo()
                    .args(["run", "--quiet", "--release", "-p", "fibril-datapath"])
                    .args(["--example", "lb_bench"]))?;
            }
            if part("prefilter") {
                println!("\n== XDP prefilter against iptables (raw PREROUTING, one rule per prefix) dropping the same 10 and 10,000 prefixes: frames dropped a second (median of 5 x 2 s)");
                run(cargo()
                    .args(["run", "--quiet", "--release", "-p", "fibril-datapath"])
                    .args(["--example", "prefilter_bench"]))?;
            }
            if part("services") {
                println!("\n== services: the real kube-proxy (iptables, nftables) against Fibril without it, at 10, 1,000 and 10,000 services: HTTP and TCP_CRR connection rates, request rates");
                run(cargo()
                    .args(["run", "--quiet", "--release", "-p", "fibril-cli"])
                    .args(["--example", "service_bench"]))?;
            }
            if part("datapath") {
                println!("\n== datapath");
                bench::run_bench(&release, &args[1..])?;
            }
            if part("overlay") {
                println!("\n== overlay: pods on two nodes through VXLAN, against bare VXLAN");
                bench::run_overlay_bench(&release, &args[1..])?;
            }
            if part("cni") {
                println!("\n== pod creation: CNI ADD/DEL through the binary, against a lab's agent");
                bench::run_cni_bench(&release, &args[1..])?;
            }
            if part("kafka") {
                println!("\n== Kafka proxy: produce and fetch through the proxy against direct");
                bench::run_kafka_bench(&release, &args[1..])?;
            }
            if part("l7") {
                println!("\n== L7 proxy: canonical request target and rule check, per call");
                run(cargo()
                    .args(["run", "--quiet", "--release", "-p", "fibril-proxy"])
                    .args(["--example", "target_bench"]))?;
                println!("\n== L7 proxy");
                bench::run_l7_bench(&release, &args[1..])?;
            }
            Ok(())
        }
        Some("layering") => layering(),
        _ => bail!("usage: cargo xtask <deps|test|layering|demo [--keep]|bench [--seconds N] [--only policy|cluster|relay|k8s|ui|flows|packet|lb|prefilter|services|datapath|overlay|cni|l7|kafka]|ci>"),
    }
}
