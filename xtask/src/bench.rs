//! `cargo xtask bench`: TCP request/response rate and throughput between two
//! lab pods (programs and a policy attached), as a ratio to two namespaces on
//! a bare veth pair measured in the same run; then again with 10,000
//! unrelated policy entries on the server endpoint.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::run;

struct Cleanup(Vec<Box<dyn FnMut()>>);

impl Cleanup {
    /// Creates network namespace `name`, removed with the others.
    fn netns(&mut self, name: &str) -> anyhow::Result<()> {
        ip(&["netns", "add", name])?;
        let n = name.to_string();
        self.0.push(Box::new(move || {
            let _ = Command::new("ip").args(["netns", "del", &n]).status();
        }));
        Ok(())
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for f in self.0.iter_mut().rev() {
            f();
        }
    }
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    run(Command::new("ip").args(args).stdout(Stdio::null()))
}

fn measure(cmd: &mut Command, key: &str) -> anyhow::Result<f64> {
    Ok(measure_keys(cmd, &[key])?[0])
}

/// Runs a bench client and reads the `key value` lines it prints.
fn measure_keys(cmd: &mut Command, keys: &[&str]) -> anyhow::Result<Vec<f64>> {
    let out = cmd.output().context("running the bench client")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "bench client failed: {} {}",
            text,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    keys.iter()
        .map(|key| {
            text.lines()
                .find_map(|l| l.strip_prefix(key).and_then(|v| v.trim().parse().ok()))
                .with_context(|| format!("no {key} in {text:?}"))
        })
        .collect()
}

/// `--seconds N` (default 3).
/// The value after `--{name}` in `args`, if given and valid.
pub fn flag<T: std::str::FromStr>(args: &[String], name: &str) -> Option<T> {
    args.windows(2)
        .find(|w| w[0].strip_prefix("--") == Some(name))
        .and_then(|w| w[1].parse().ok())
}

fn seconds_arg(args: &[String]) -> f64 {
    flag(args, "seconds").unwrap_or(3.0)
}

/// `--rounds N` (at least 1), else `default`.
fn rounds_arg(args: &[String], default: usize) -> usize {
    flag(args, "rounds").map_or(default, |n: usize| n.max(1))
}

/// Writes `yaml` to `dir/lab.yaml` and brings the lab up; the returned
/// closure takes it down and removes `dir`.
fn lab_up(bin: &Path, lab: &str, dir: &Path, yaml: &str) -> anyhow::Result<Box<dyn FnMut()>> {
    std::fs::create_dir_all(dir)?;
    let lab_file = dir.join("lab.yaml");
    std::fs::write(&lab_file, yaml)?;
    let (bin, lab, dir) = (bin.to_path_buf(), lab.to_string(), dir.to_path_buf());
    let down = {
        let (bin, lab, dir) = (bin.clone(), lab.clone(), dir.clone());
        move || {
            let _ = Command::new(bin.join("fibril"))
                .args(["--lab", &lab, "lab", "down"])
                .status();
            std::fs::remove_dir_all(&dir).ok();
        }
    };
    let mut up = Command::new(bin.join("fibril"));
    up.args(["--lab", &lab, "lab", "up", "-f"])
        .arg(&lab_file)
        .stdout(Stdio::null());
    if let Err(e) = run(&mut up) {
        down();
        return Err(e);
    }
    Ok(Box::new(down))
}

/// `ip ARGS` without echoing the command (loops run it hundreds of times).
fn quiet_ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    if !out.status.success() {
        bail!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Starts `fibril-echo bench-server` on port 9000 inside `netns` (on CPU
/// `cpu` alone when given); the returned closure stops it.
fn bench_server(netns: &str, echo: &str, cpu: Option<usize>) -> anyhow::Result<Box<dyn FnMut()>> {
    let server: Child = Command::new("ip")
        .args(["netns", "exec", netns])
        .args(pinned(cpu))
        .args([echo, "bench-server", "--port", "9000"])
        .spawn()?;
    let mut server = Some(server);
    Ok(Box::new(move || {
        if let Some(mut s) = server.take() {
            let _ = s.kill();
            let _ = s.wait();
        }
    }))
}

/// `taskset -c N` before a command when `cpu` is given.
fn pinned(cpu: Option<usize>) -> Vec<String> {
    cpu.map(|c| vec!["taskset".to_string(), "-c".to_string(), c.to_string()])
        .unwrap_or_default()
}

/// Where a stream benchmark's client and server run: each on a CPU of
/// its own (the first two this process may use), the same in every
/// configuration. Left to the scheduler, they sometimes share one and the
/// figure jumps by a third from run to run on a two-core machine.
struct BenchCpus {
    client: Option<usize>,
    server: Option<usize>,
}

fn bench_cpus() -> BenchCpus {
    match allowed_cpus().unwrap_or_default()[..] {
        [c, s, ..] => BenchCpus {
            client: Some(c),
            server: Some(s),
        },
        _ => BenchCpus {
            client: None,
            server: None,
        },
    }
}

/// The CPUs this process may run on (`Cpus_allowed_list: 0,2-3`).
fn allowed_cpus() -> anyhow::Result<Vec<usize>> {
    let status = std::fs::read_to_string("/proc/self/status")?;
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .ok_or_else(|| anyhow::anyhow!("no Cpus_allowed_list in /proc/self/status"))?;
    let mut cpus = Vec::new();
    for range in list.trim().split(',') {
        let (a, b) = range.split_once('-').unwrap_or((range, range));
        cpus.extend(a.parse::<usize>()?..=b.parse::<usize>()?);
    }
    Ok(cpus)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub fn run_bench(bin: &Path, args: &[String]) -> anyhow::Result<()> {
    let seconds = seconds_arg(args);
    let rounds = rounds_arg(args, 3);
    let echo = bin.join("fibril-echo");
    let echo = echo.to_str().context("path")?;
    let id = std::process::id() % 10_000;
    let (ns_a, ns_b) = (format!("fbench-a{id}"), format!("fbench-b{id}"));
    let (va, vb) = (format!("fbva{id}"), format!("fbvb{id}"));
    let lab = format!("bench{id}");
    let fibril = |args: &[&str]| {
        let mut c = Command::new(bin.join("fibril"));
        c.arg("--lab").arg(&lab).args(args);
        c
    };

    let mut cleanup = Cleanup(vec![]);
    // Baseline: two namespaces on one bare veth pair.
    cleanup.netns(&ns_a)?;
    cleanup.netns(&ns_b)?;
    ip(&[
        "link", "add", &va, "netns", &ns_a, "type", "veth", "peer", "name", &vb, "netns", &ns_b,
    ])?;
    ip(&["-n", &ns_a, "addr", "add", "10.196.0.1/24", "dev", &va])?;
    ip(&["-n", &ns_b, "addr", "add", "10.196.0.2/24", "dev", &vb])?;
    for (ns, dev) in [(&ns_a, &va), (&ns_b, &vb)] {
        ip(&["-n", ns, "link", "set", dev, "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
    }
    cleanup.0.push(bench_server(&ns_b, echo, None)?);

    // The lab: two pods through the CNI, programs attached, a policy.
    let dir = std::env::temp_dir().join(format!("fibril-bench-{id}"));
    cleanup.0.push(lab_up(
        bin,
        &lab,
        &dir,
        r#"podCIDR: 10.197.0.0/24
pods:
  - {name: client, namespace: bench, labels: {app: client}}
  - {name: server, namespace: bench, labels: {app: server}, command: [fibril-echo, bench-server, --port, "9000"]}
policies:
  - inline: |
      apiVersion: cilium.io/v2
      kind: CiliumNetworkPolicy
      metadata: {name: allow-client, namespace: bench}
      spec:
        endpointSelector: {matchLabels: {app: server}}
        ingress:
        - fromEndpoints: [{matchLabels: {app: client}}]
          toPorts: [{ports: [{port: "9000", protocol: TCP}]}]
"#,
    )?);
    std::thread::sleep(Duration::from_millis(500));
    let secs = seconds.to_string();
    let bare = |what: &str, key: &str| -> anyhow::Result<f64> {
        measure(
            Command::new("ip").args([
                "netns",
                "exec",
                &ns_a,
                echo,
                what,
                "10.196.0.2:9000",
                "--seconds",
                &secs,
            ]),
            key,
        )
    };
    let pods = |what: &str, key: &str| -> anyhow::Result<f64> {
        measure(
            &mut fibril(&[
                "lab",
                "exec",
                "bench/client",
                "--",
                "fibril-echo",
                what,
                "10.197.0.3:9000",
                "--seconds",
                &secs,
            ]),
            key,
        )
    };
    let mut rows = Vec::new();
    let mut measure_all = |label: &str| -> anyhow::Result<(f64, f64, f64, f64)> {
        let (mut b_rr, mut p_rr, mut b_st, mut p_st) = (vec![], vec![], vec![], vec![]);
        for _ in 0..rounds {
            b_rr.push(bare("bench-rr", "rr_per_sec")?);
            p_rr.push(pods("bench-rr", "rr_per_sec")?);
            b_st.push(bare("bench-stream", "bytes_per_sec")?);
            p_st.push(pods("bench-stream", "bytes_per_sec")?);
        }
        let r = (median(b_rr), median(p_rr), median(b_st), median(p_st));
        rows.push((label.to_string(), r));
        Ok(r)
    };
    measure_all("policy (1 rule)")?;

    let entries = add_ten_thousand_entries(&dir, &fibril, None)?;
    measure_all(&format!("policy ({entries} entries)"))?;

    print_rows(
        &format!("fibril datapath benchmark ({rounds} rounds x {seconds}s, medians; baseline = bare veth pair, same run)"),
        &rows,
    );
    Ok(())
}

/// Imports, through `fibril` (with `node` when given), 10,000 entries on
/// the server endpoint that the benchmark traffic never uses: L4 allows on
/// ports 20000-29999 (Cilium admits at most 40 ports per toPorts entry:
/// 250 entries of 40). Returns the server's policy entries.
fn add_ten_thousand_entries(
    dir: &Path,
    fibril: &dyn Fn(&[&str]) -> Command,
    node: Option<&str>,
) -> anyhow::Result<u64> {
    let to_ports: Vec<String> = (0..250)
        .map(|chunk| {
            let ports: Vec<String> = (0..40)
                .map(|i| format!("{{port: \"{}\", protocol: TCP}}", 20000 + chunk * 40 + i))
                .collect();
            format!("{{ports: [{}]}}", ports.join(", "))
        })
        .collect();
    let big = dir.join("10k.yaml");
    std::fs::write(
        &big,
        format!(
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: ten-thousand, namespace: bench}}\nspec:\n  endpointSelector: {{matchLabels: {{app: server}}}}\n  ingress:\n  - toPorts: [{}]\n",
            to_ports.join(", ")
        ),
    )?;
    run(fibril(&["policy", "import", big.to_str().context("path")?]).stdout(Stdio::null()))?;
    let node_args: Vec<&str> = node.map(|n| vec!["--node", n]).unwrap_or_default();
    // The server's node applies it once it has watched it (kvstore mode).
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let list =
            fibril(&[&node_args[..], &["endpoint", "list", "-o", "json"]].concat()).output()?;
        let text = String::from_utf8_lossy(&list.stdout);
        let entries: u64 = text
            .split("\"policy_entries\":")
            .skip(1)
            .filter_map(|s| {
                s.trim_start()
                    .split(|c: char| !c.is_ascii_digit())
                    .next()?
                    .parse()
                    .ok()
            })
            .max()
            .unwrap_or(0);
        if entries >= 10_000 {
            return Ok(entries);
        }
        if Instant::now() > end {
            bail!("expected at least 10,000 policy entries on the server, found {entries}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// (configuration, (bare rr/s, lab rr/s, bare B/s, lab B/s)).
type Row = (String, (f64, f64, f64, f64));

fn print_rows(title: &str, rows: &[Row]) {
    println!("\n{title}");
    println!(
        "{:<26} {:>14} {:>14} {:>7} {:>14} {:>14} {:>7}",
        "configuration", "bare rr/s", "lab rr/s", "ratio", "bare MB/s", "lab MB/s", "ratio"
    );
    for (label, (b_rr, p_rr, b_st, p_st)) in rows {
        println!(
            "{label:<26} {b_rr:>14.0} {p_rr:>14.0} {:>7.3} {:>14.1} {:>14.1} {:>7.3}",
            p_rr / b_rr,
            b_st / 1e6,
            p_st / 1e6,
            p_st / b_st
        );
    }
}

/// `cargo xtask bench --only overlay`: TCP request/response rate and
/// throughput between pods on two nodes of a lab (the VXLAN overlay, the
/// identity in the VNI, a policy at the destination), as a ratio to two
/// namespaces joined by a bare VXLAN tunnel (no BPF) over the same underlay
/// as the lab's (veths into a bridge), measured in the same run; then again with 10,000 unrelated policy
/// entries on the server.
pub fn run_overlay_bench(bin: &Path, args: &[String]) -> anyhow::Result<()> {
    let seconds = seconds_arg(args);
    let rounds = rounds_arg(args, 3);
    let echo = bin.join("fibril-echo");
    let echo = echo.to_str().context("path")?;
    let id = std::process::id() % 10_000;
    let cpus = bench_cpus();
    let (ns_a, ns_b) = (format!("fbvx-a{id}"), format!("fbvx-b{id}"));
    let lab = format!("vxbench{id}");
    let fibril = |args: &[&str]| {
        let mut c = Command::new(bin.join("fibril"));
        c.arg("--lab").arg(&lab).args(args);
        c
    };

    let mut cleanup = Cleanup(vec![]);
    // Baseline: two namespaces, each with a VXLAN device, over the same
    // underlay as the lab's nodes (a veth from each into a bridge in a
    // namespace of its own): the traffic between their VXLAN addresses.
    let ns_u = format!("fbvx-u{id}");
    for ns in [&ns_a, &ns_b, &ns_u] {
        cleanup.netns(ns)?;
    }
    ip(&["-n", &ns_u, "link", "add", "br0", "type", "bridge"])?;
    ip(&["-n", &ns_u, "link", "set", "br0", "up"])?;
    for (ns, port, under, over, remote) in [
        (
            &ns_a,
            "pa",
            "10.195.255.1/24",
            "10.195.254.1/24",
            "10.195.255.2",
        ),
        (
            &ns_b,
            "pb",
            "10.195.255.2/24",
            "10.195.254.2/24",
            "10.195.255.1",
        ),
    ] {
        ip(&[
            "-n", &ns_u, "link", "add", port, "type", "veth", "peer", "name", "ul", "netns", ns,
        ])?;
        ip(&["-n", &ns_u, "link", "set", port, "master", "br0", "up"])?;
        ip(&["-n", ns, "addr", "add", under, "dev", "ul"])?;
        ip(&["-n", ns, "link", "set", "ul", "up"])?;
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n", ns, "link", "add", "vx", "type", "vxlan", "id", "42", "remote", remote,
            "dstport", "8472", "dev", "ul",
        ])?;
        ip(&["-n", ns, "addr", "add", over, "dev", "vx"])?;
        ip(&["-n", ns, "link", "set", "vx", "up"])?;
    }
    cleanup.0.push(bench_server(&ns_b, echo, cpus.server)?);
    // A second baseline: a pod namespace behind each of them on a veth,
    // routed over the same bare VXLAN (no BPF), as a plain routed overlay
    // would: what the pods' own veth hop costs.
    let (pod_a, pod_b) = (format!("fbvx-pa{id}"), format!("fbvx-pb{id}"));
    for (i, (node, pod)) in [(&ns_a, &pod_a), (&ns_b, &pod_b)].into_iter().enumerate() {
        cleanup.netns(pod)?;
        let (own, other) = (i + 1, 2 - i);
        let gateway = format!("10.195.{own}.1");
        run(Command::new("ip")
            .args([
                "netns",
                "exec",
                node,
                "sysctl",
                "-qw",
                "net.ipv4.ip_forward=1",
            ])
            .stdout(Stdio::null()))?;
        ip(&[
            "-n", node, "link", "add", "name", "pv", "mtu", "1450", "type", "veth", "peer", "name",
            "eth0", "mtu", "1450", "netns", pod,
        ])?;
        ip(&[
            "-n",
            node,
            "addr",
            "add",
            &format!("{gateway}/24"),
            "dev",
            "pv",
        ])?;
        ip(&["-n", node, "link", "set", "pv", "up"])?;
        ip(&[
            "-n",
            node,
            "route",
            "add",
            &format!("10.195.{other}.0/24"),
            "via",
            &format!("10.195.254.{other}"),
            "dev",
            "vx",
        ])?;
        ip(&[
            "-n",
            pod,
            "addr",
            "add",
            &format!("10.195.{own}.2/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", pod, "link", "set", "eth0", "up"])?;
        ip(&["-n", pod, "link", "set", "lo", "up"])?;
        ip(&["-n", pod, "route", "add", "default", "via", &gateway])?;
    }
    cleanup.0.push(bench_server(&pod_b, echo, cpus.server)?);

    // The lab: two nodes, a pod on each, a policy at the server.
    let dir = std::env::temp_dir().join(format!("fibril-vxbench-{id}"));
    let server_command: Vec<String> = pinned(cpus.server)
        .into_iter()
        .chain([
            echo.to_string(),
            "bench-server".into(),
            "--port".into(),
            "9000".into(),
        ])
        .collect();
    cleanup.0.push(lab_up(
        bin,
        &lab,
        &dir,
        &format!(
            r#"podCIDR: 10.194.0.0/16
underlayCIDR: 10.193.0.0/24
nodes: [a, b]
pods:
  - {{name: client, namespace: bench, labels: {{app: client}}, node: a}}
  - {{name: server, namespace: bench, labels: {{app: server}}, node: b, command: {server_command:?}}}
policies:
  - inline: |
      apiVersion: cilium.io/v2
      kind: CiliumNetworkPolicy
      metadata: {{name: allow-client, namespace: bench}}
      spec:
        endpointSelector: {{matchLabels: {{app: server}}}}
        ingress:
        - fromEndpoints: [{{matchLabels: {{app: client}}}}]
          toPorts: [{{ports: [{{port: "9000", protocol: TCP}}]}}]
"#
        ),
    )?);
    let secs = seconds.to_string();
    // The client's node learns the server from etcd.
    let end = Instant::now() + Duration::from_secs(10);
    while !fibril(&[
        "lab",
        "exec",
        "bench/client",
        "--",
        "fibril-echo",
        "bench-rr",
        "10.194.1.2:9000",
        "--seconds",
        "0.2",
    ])
    .output()?
    .status
    .success()
    {
        if Instant::now() > end {
            bail!("the client never reached the server across the overlay");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let client = pinned(cpus.client);
    let bare = |what: &str, key: &str| -> anyhow::Result<f64> {
        measure(
            Command::new("ip")
                .args(["netns", "exec", &ns_a])
                .args(&client)
                .args([echo, what, "10.195.254.2:9000", "--seconds", &secs]),
            key,
        )
    };
    let routed = |what: &str, key: &str| -> anyhow::Result<f64> {
        measure(
            Command::new("ip")
                .args(["netns", "exec", &pod_a])
                .args(&client)
                .args([echo, what, "10.195.2.2:9000", "--seconds", &secs]),
            key,
        )
    };
    let pods = |what: &str, key: &str| -> anyhow::Result<f64> {
        measure(
            fibril(&["lab", "exec", "bench/client", "--"])
                .args(if client.is_empty() {
                    vec![]
                } else {
                    client.clone()
                })
                .args([echo, what, "10.194.1.2:9000", "--seconds", &secs]),
            key,
        )
    };
    let mut rows: Vec<Row> = Vec::new();
    let mut routed_rows: Vec<Row> = Vec::new();
    let mut measure_all = |label: &str| -> anyhow::Result<()> {
        let mut m: [Vec<f64>; 6] = Default::default();
        for _ in 0..rounds {
            m[0].push(bare("bench-rr", "rr_per_sec")?);
            m[1].push(routed("bench-rr", "rr_per_sec")?);
            m[2].push(pods("bench-rr", "rr_per_sec")?);
            m[3].push(bare("bench-stream", "bytes_per_sec")?);
            m[4].push(routed("bench-stream", "bytes_per_sec")?);
            m[5].push(pods("bench-stream", "bytes_per_sec")?);
        }
        let [b_rr, r_rr, p_rr, b_st, r_st, p_st] = m.map(median);
        rows.push((label.to_string(), (b_rr, p_rr, b_st, p_st)));
        routed_rows.push((label.to_string(), (r_rr, p_rr, r_st, p_st)));
        Ok(())
    };
    measure_all("policy (1 rule)")?;
    let entries = add_ten_thousand_entries(&dir, &fibril, Some("b"))?;
    measure_all(&format!("policy ({entries} entries)"))?;
    print_rows(
        &format!("fibril overlay benchmark: pods on two nodes ({rounds} rounds x {seconds}s, medians; baseline = bare VXLAN between two namespaces, same run)"),
        &rows,
    );
    print_rows(
        "the same lab runs against pods on veths routed over that bare VXLAN (no BPF)",
        &routed_rows,
    );
    Ok(())
}

/// `cargo xtask bench`, L7 part: HTTP/1.1 keep-alive GETs from one lab pod
/// to two identical servers, one allowed at L4 (direct) and one behind an
/// `http` rule (through the proxy), alternating in the same run.
pub fn run_l7_bench(bin: &Path, args: &[String]) -> anyhow::Result<()> {
    let seconds = seconds_arg(args);
    // The direct figure moves a lot from run to run here (which vCPU each
    // thread lands on): five rounds by default, medians.
    let rounds = rounds_arg(args, 5);
    let id = std::process::id() % 10_000;
    let lab = format!("l7bench{id}");
    let fibril = |args: &[&str]| {
        let mut c = Command::new(bin.join("fibril"));
        c.arg("--lab").arg(&lab).args(args);
        c
    };
    let dir = std::env::temp_dir().join(format!("fibril-l7bench-{id}"));
    let _cleanup = Cleanup(vec![lab_up(
        bin,
        &lab,
        &dir,
        r#"podCIDR: 10.198.0.0/24
pods:
  - {name: client, namespace: bench, labels: {app: client}}
  - {name: direct, namespace: bench, labels: {app: direct}, command: [fibril-echo, http-server, --port, "8080"]}
  - {name: proxied, namespace: bench, labels: {app: proxied}, command: [fibril-echo, http-server, --port, "8080"]}
  - {name: dns-direct, namespace: bench, labels: {app: dns-direct}}
  - {name: dns-proxied, namespace: bench, labels: {app: dns-proxied}}
  - {name: direct-affine, namespace: bench, labels: {app: direct}, command: [fibril-echo, http-server, --port, "8080", --cpu-affine]}
  - {name: proxied-affine, namespace: bench, labels: {app: proxied}, command: [fibril-echo, http-server, --port, "8080", --cpu-affine]}
externals:
  - {name: resolver, address: 198.19.0.53, command: [fibril-echo, dns-server, --record, "bench.example=198.19.0.10"]}
policies:
  - inline: |
      apiVersion: cilium.io/v2
      kind: CiliumNetworkPolicy
      metadata: {name: dns-rules, namespace: bench}
      spec:
        endpointSelector: {matchLabels: {app: dns-proxied}}
        egress:
        - toCIDR: [198.19.0.53/32]
          toPorts:
          - ports: [{port: "53", protocol: UDP}]
            rules: {dns: [{matchPattern: "*.example"}]}
  - inline: |
      apiVersion: cilium.io/v2
      kind: CiliumNetworkPolicy
      metadata: {name: direct-l4, namespace: bench}
      spec:
        endpointSelector: {matchLabels: {app: direct}}
        ingress:
        - fromEndpoints: [{matchLabels: {app: client}}]
          toPorts: [{ports: [{port: "8080", protocol: TCP}]}]
  - inline: |
      apiVersion: cilium.io/v2
      kind: CiliumNetworkPolicy
      metadata: {name: proxied-l7, namespace: bench}
      spec:
        endpointSelector: {matchLabels: {app: proxied}}
        ingress:
        - fromEndpoints: [{matchLabels: {app: client}}]
          toPorts:
          - ports: [{port: "8080", protocol: TCP}]
            rules: {http: [{method: GET, path: "/api/.*"}]}
"#,
    )?]);
    std::thread::sleep(Duration::from_millis(500));
    let secs = seconds.to_string();
    // HTTP load from the client pod, its threads placed by `placement`:
    // requests/s, p50 and p99 in µs.
    // By its path: `lab exec` looks up only the command's first word
    // (taskset, when pinned) next to `fibril`.
    let echo = bin.join("fibril-echo");
    let echo = echo.to_str().context("path")?;
    let http_load = |host: &str, connections: &str, placement: Placement| {
        let url = format!("http://{host}:8080/api/bench");
        let mut args = vec!["lab", "exec", "bench/client", "--"];
        if let Placement::OneCpu(cpu) = placement {
            args.extend(["taskset", "-c", cpu]);
        }
        args.extend([
            echo,
            "http-load",
            &url,
            "--seconds",
            &secs,
            "--connections",
            connections,
        ]);
        if let Placement::Pairs = placement {
            args.push("--spread");
        }
        let v = measure_keys(
            &mut fibril(&args),
            &["requests_per_sec", "p50_us", "p99_us"],
        )?;
        anyhow::Ok((v[0], v[1], v[2]))
    };
    // Direct and proxied, alternating, at 4 and 16 connections.
    let table = |title: &str, direct: &str, proxied: &str, placement: Placement| {
        println!("\n{title}");
        println!(
            "{:<6} {:>12} {:>12} {:>7} {:>12} {:>10} {:>10} {:>10} {:>10}",
            "conns",
            "direct rq/s",
            "proxied rq/s",
            "ratio",
            "round ratios",
            "p50 direct",
            "p50 proxy",
            "p99 direct",
            "p99 proxy"
        );
        for connections in ["4", "16"] {
            let (mut d, mut p) = (vec![], vec![]);
            for _ in 0..rounds {
                d.push(http_load(direct, connections, placement)?);
                p.push(http_load(proxied, connections, placement)?);
            }
            let med = |v: &[(f64, f64, f64)], f: fn(&(f64, f64, f64)) -> f64| {
                median(v.iter().map(f).collect())
            };
            let (d_rps, d50, d99) = (med(&d, |x| x.0), med(&d, |x| x.1), med(&d, |x| x.2));
            let (p_rps, p50, p99) = (med(&p, |x| x.0), med(&p, |x| x.1), med(&p, |x| x.2));
            // Each round's own ratio: unplaced, the direct figure moves
            // between two modes (whether client and server threads share
            // a CPU).
            let ratios: Vec<f64> = d.iter().zip(&p).map(|(d, p)| p.0 / d.0).collect();
            let (lo, hi) = ratios
                .iter()
                .fold((f64::MAX, 0f64), |(lo, hi), r| (lo.min(*r), hi.max(*r)));
            println!(
                "{connections:<6} {d_rps:>12.0} {p_rps:>12.0} {:>7.3} {:>12} {d50:>8.0}us {p50:>8.0}us {d99:>8.0}us {p99:>8.0}us",
                p_rps / d_rps,
                format!("{lo:.2}-{hi:.2}")
            );
        }
        anyhow::Ok(())
    };
    table(
        &format!("fibril L7 proxy benchmark (HTTP/1.1 keep-alive GET, {rounds} rounds x {seconds}s, medians; direct = the same server allowed at L4, same run)"),
        "10.198.0.3",
        "10.198.0.4",
        Placement::Scheduler,
    )?;
    // The same with every thread placed: client connection i on CPU i mod
    // n, and its server thread (and proxy thread, which follows the
    // client) on the same CPU. Unplaced, where the scheduler starts each
    // thread decides most of the two-CPU figures above.
    table(
        "Each client/server pair on one CPU (client threads spread over the CPUs, servers run each connection on its client's CPU)",
        "10.198.0.7",
        "10.198.0.8",
        Placement::Pairs,
    )?;

    // Proof that proxied payload took the socket shortcut (and how much
    // of it did not).
    let status = fibril(&["status", "-o", "json"]).output()?;
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap_or_default();
    match status.get("proxy_shortcut").filter(|v| !v.is_null()) {
        Some(s) => println!(
            "socket shortcut: {} connection ends, {} sends socket to socket, {} through the stack",
            s["sockets"], s["redirected"], s["plain"]
        ),
        None => println!("socket shortcut: off (no cgroup v2): proxied payload crossed the stack"),
    }

    // DNS: the same resolver queried from a pod without DNS rules (direct)
    // and from one whose rules send its DNS through the proxy.
    let dns = |pod: &str| -> anyhow::Result<(f64, f64, f64, f64)> {
        let v = measure_keys(
            &mut fibril(&[
                "lab",
                "exec",
                pod,
                "--",
                "fibril-echo",
                "dns-load",
                "198.19.0.53",
                "bench.example",
                "--seconds",
                &secs,
                "--concurrency",
                "4",
            ]),
            &["queries_per_sec", "p50_us", "p99_us", "unanswered"],
        )?;
        Ok((v[0], v[1], v[2], v[3]))
    };
    let (mut d, mut p) = (vec![], vec![]);
    for _ in 0..rounds {
        d.push(dns("bench/dns-direct")?);
        p.push(dns("bench/dns-proxied")?);
    }
    let med = |v: &[(f64, f64, f64, f64)], f: fn(&(f64, f64, f64, f64)) -> f64| {
        median(v.iter().map(f).collect())
    };
    println!(
        "\nDNS over UDP, 4 concurrent clients ({rounds} rounds x {seconds}s, medians; direct = a pod without DNS rules, same resolver)"
    );
    println!(
        "{:<8} {:>10} {:>8} {:>8} {:>11}",
        "path", "queries/s", "p50 us", "p99 us", "unanswered"
    );
    for (label, v) in [("direct", &d), ("proxied", &p)] {
        println!(
            "{label:<8} {:>10.0} {:>8.0} {:>8.0} {:>11.0}",
            med(v, |x| x.0),
            med(v, |x| x.1),
            med(v, |x| x.2),
            med(v, |x| x.3)
        );
    }

    // An agent crash under a steady proxied load (two held keep-alive
    // connections and a new connection every 20 ms): SIGKILL after 2 s, a
    // restart 2 s later. The HTTP proxy, a process of its own, carries on.
    let steady = {
        let mut cmd = fibril(&["lab", "exec", "bench/client", "--", echo, "http-steady"]);
        cmd.args(["http://10.198.0.4:8080/api/steady", "--seconds", "7"]);
        std::thread::spawn(move || {
            measure_keys(
                &mut cmd,
                &[
                    "held_requests",
                    "held_failed",
                    "new_requests",
                    "new_failed",
                    "slowest_new_ms",
                ],
            )
        })
    };
    std::thread::sleep(Duration::from_secs(2));
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(format!("/run/fibril/labs/{lab}/lab.json"))?)?;
    let agent = state["agent_pid"].as_u64().context("no agent pid")?;
    run(Command::new("kill").args(["-9", &agent.to_string()]))?;
    std::thread::sleep(Duration::from_secs(2));
    run(fibril(&["lab", "restart-agent"]).stdout(Stdio::null()))?;
    let v = steady
        .join()
        .map_err(|_| anyhow::anyhow!("steady load panicked"))??;
    println!("\nAgent killed (SIGKILL) and restarted 2 s later under a steady proxied load (7 s)");
    println!(
        "held connections: {:.0} requests, {:.0} failed; new connections: {:.0}, {:.0} failed, slowest {:.0} ms",
        v[0], v[1], v[2], v[3], v[4]
    );

    // The same HTTP load with the agent, both servers and the client on one
    // CPU: no thread waits for another vCPU, so the rates are the CPU each
    // request costs (steady from run to run, unlike the two-CPU figures,
    // which move with where the scheduler puts each thread). Last: it
    // pins the lab's processes.
    let cpu = one_cpu_lab(&lab)?.to_string();
    let (mut d, mut p) = (vec![], vec![]);
    for _ in 0..3 {
        d.push(http_load("10.198.0.3", "4", Placement::OneCpu(&cpu))?.0);
        p.push(http_load("10.198.0.4", "4", Placement::OneCpu(&cpu))?.0);
    }
    let (d, p) = (median(d), median(p));
    println!(
        "\nHTTP on one CPU (agent, servers and client on CPU {cpu}; 4 connections, 3 rounds, medians)"
    );
    println!(
        "direct {d:.0} rq/s ({:.1} us of CPU each), proxied {p:.0} rq/s ({:.1} us), ratio {:.3}",
        1e6 / d,
        1e6 / p,
        p / d
    );
    Ok(())
}

/// Where the L7 bench's client and server threads run.
#[derive(Clone, Copy)]
enum Placement<'a> {
    /// Wherever the scheduler puts them.
    Scheduler,
    /// Client connection i's thread on CPU i mod n, its server's thread on
    /// the same CPU (the servers started with `--cpu-affine`).
    Pairs,
    /// The client on this CPU (the lab pinned to it by `one_cpu_lab`).
    OneCpu(&'a str),
}

/// Pins the agent, the HTTP proxy process and every pod's process of `lab`
/// (all their threads) to the first CPU this process may use, and returns
/// it.
fn one_cpu_lab(lab: &str) -> anyhow::Result<usize> {
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(format!("/run/fibril/labs/{lab}/lab.json"))?)?;
    let cpu = *allowed_cpus()?
        .first()
        .ok_or_else(|| anyhow::anyhow!("no CPU allowed"))?;
    // `api::L7_PROXY_PID_FILE` (xtask builds without the workspace).
    let proxy: Option<serde_json::Value> =
        std::fs::read_to_string(format!("/run/fibril/labs/{lab}/state/l7proxy.pid"))
            .ok()
            .and_then(|p| p.trim().parse::<u64>().ok())
            .map(Into::into);
    let pids = std::iter::once(&state["agent_pid"])
        .chain(proxy.as_ref())
        .chain(
            state["pods"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| &p["pid"]),
        )
        .filter_map(|p| p.as_u64());
    for pid in pids {
        let ok = Command::new("taskset")
            .args(["-a", "-p", "-c", &cpu.to_string(), &pid.to_string()])
            .stdout(std::process::Stdio::null())
            .status()?
            .success();
        anyhow::ensure!(ok, "taskset of {pid} failed");
    }
    Ok(cpu)
}

/// Pod creation as a runtime does it: `fibril-cni ADD` (the binary, CNI_*
/// in its environment, the configuration on stdin) into a fresh network
/// namespace, against a lab's agent, until the result: the endpoint is
/// then working (veth, address, policy, programs attached). `--rounds N`
/// ADD/DEL cycles (default 100); p50 and p99 of ADD and of DEL, beside the
/// baseline of creating the same namespace and veth pair with `ip` alone.
pub fn run_cni_bench(bin: &Path, args: &[String]) -> anyhow::Result<()> {
    let rounds = rounds_arg(args, 100);
    let id = std::process::id() % 10_000;
    let lab = format!("cnib{id}");
    let mut cleanup = Cleanup(vec![]);
    let dir = std::env::temp_dir().join(format!("fibril-cni-bench-{id}"));
    // One pod and a policy selecting pods, so ADD computes and writes policy.
    cleanup.0.push(lab_up(
        bin,
        &lab,
        &dir,
        r#"podCIDR: 10.196.0.0/22
pods:
  - {name: server, namespace: bench, labels: {app: server}}
policies:
  - inline: |
      apiVersion: cilium.io/v2
      kind: CiliumNetworkPolicy
      metadata: {name: allow-bench, namespace: bench}
      spec:
        endpointSelector: {matchLabels: {app: server}}
        ingress:
        - fromEndpoints: [{matchLabels: {app: client}}]
          toPorts: [{ports: [{port: "9000", protocol: TCP}]}]
"#,
    )?);
    let socket = PathBuf::from("/run/fibril/labs")
        .join(&lab)
        .join("agent.sock");
    let conf = serde_json::json!({
        "cniVersion": "1.1.0", "name": "fibril-bench", "type": "fibril-cni",
        "agentSocket": socket,
    })
    .to_string();
    let cni = |command: &str, container: &str, netns: &str| -> anyhow::Result<Duration> {
        use std::io::Write;
        let start = Instant::now();
        let mut child = Command::new(bin.join("fibril-cni"))
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", container)
            .env("CNI_NETNS", format!("/run/netns/{netns}"))
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", bin)
            .env(
                "CNI_ARGS",
                format!("K8S_POD_NAMESPACE=bench;K8S_POD_NAME={container}"),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(conf.as_bytes())?;
        let out = child.wait_with_output()?;
        let took = start.elapsed();
        if !out.status.success() {
            bail!(
                "fibril-cni {command}: {}",
                String::from_utf8_lossy(&out.stdout)
            );
        }
        Ok(took)
    };
    let (mut adds, mut dels, mut bare) = (vec![], vec![], vec![]);
    for i in 0..rounds {
        let netns = format!("fcnib{id}-{i}");
        quiet_ip(&["netns", "add", &netns])?;
        let n = netns.clone();
        let _gone = Cleanup(vec![Box::new(move || {
            let _ = Command::new("ip").args(["netns", "del", &n]).status();
        })]);
        let container = format!("client-{i}");
        adds.push(cni("ADD", &container, &netns)?.as_secs_f64() * 1e3);
        dels.push(cni("DEL", &container, &netns)?.as_secs_f64() * 1e3);
        // Baseline: the same namespace plumbing with `ip` alone.
        let (host, peer) = (format!("fcb{id}h"), format!("fcb{id}p"));
        let start = Instant::now();
        quiet_ip(&["link", "add", &host, "type", "veth", "peer", "name", &peer])?;
        quiet_ip(&["link", "set", &peer, "netns", &netns])?;
        quiet_ip(&["-n", &netns, "addr", "add", "10.195.0.2/32", "dev", &peer])?;
        quiet_ip(&["-n", &netns, "link", "set", &peer, "up"])?;
        quiet_ip(&["link", "set", &host, "up"])?;
        bare.push(start.elapsed().as_secs_f64() * 1e3);
        quiet_ip(&["link", "del", &host])?;
    }
    let pct = |mut v: Vec<f64>, p: f64| {
        v.sort_by(|a, b| a.total_cmp(b));
        v[((v.len() - 1) as f64 * p).round() as usize]
    };
    println!("{rounds} cycles, ms            p50      p99");
    for (what, v) in [
        ("CNI ADD (working endpoint)", adds),
        ("CNI DEL", dels),
        ("baseline: ip netns/veth/addr", bare),
    ] {
        println!(
            "{what:<28} {:>7.1}  {:>7.1}",
            pct(v.clone(), 0.5),
            pct(v, 0.99)
        );
    }
    Ok(())
}

/// The Kafka proxy against direct (issue 19): the real broker twice in one
/// lab, one allowed at L4 only, one behind `kafka` rules (produce and
/// consume of the bench topic, so every request is parsed and checked),
/// and Kafka's own ProducerPerformance and ConsumerPerformance in a client
/// pod against each, alternating, medians of the rounds.
pub fn run_kafka_bench(bin: &Path, args: &[String]) -> anyhow::Result<()> {
    let rounds = rounds_arg(args, 3);
    let records: u32 = flag(args, "--records").unwrap_or(200_000);
    let lib = test_support::kafka_lib().display().to_string();
    let id = std::process::id() % 10_000;
    let lab = format!("kbench{id}");
    let dir = std::env::temp_dir().join(format!("fibril-kbench-{id}"));
    let data = |n: &str| dir.join(n).display().to_string();
    let broker = |name: &str, app: &str| {
        format!(
            "  - {{name: {name}, labels: {{app: {app}}}, command: [fibril-echo, kafka-broker, --lib, \"{lib}\", --data, \"{}\", --heap-mb, \"512\"]}}\n",
            data(name)
        )
    };
    let yaml = format!(
        "podCIDR: 10.197.0.0/24\npods:\n{}{}  - {{name: client, labels: {{app: client}}}}\npolicies:\n{}",
        broker("direct", "kafka-direct"),
        broker("proxied", "kafka-proxied"),
        r#"  - inline: |
      apiVersion: cilium.io/v2
      kind: CiliumNetworkPolicy
      metadata: {name: kafka-direct-l4}
      spec:
        endpointSelector: {matchLabels: {app: kafka-direct}}
        ingress:
        - fromEndpoints: [{matchLabels: {app: client}}]
          toPorts: [{ports: [{port: "9092", protocol: TCP}]}]
  - inline: |
      apiVersion: cilium.io/v2
      kind: CiliumNetworkPolicy
      metadata: {name: kafka-proxied-l7}
      spec:
        endpointSelector: {matchLabels: {app: kafka-proxied}}
        ingress:
        - fromEndpoints: [{matchLabels: {app: client}}]
          toPorts:
          - ports: [{port: "9092", protocol: TCP}]
            rules:
              kafka:
              - {role: produce, topic: bench}
              - {role: consume, topic: bench}
"#
    );
    let _cleanup = Cleanup(vec![lab_up(bin, &lab, &dir, &yaml)?]);
    let fibril = |args: &[&str]| {
        let mut c = Command::new(bin.join("fibril"));
        c.arg("--lab").arg(&lab).args(args);
        c
    };
    // direct .2, proxied .3, client .4.
    let (direct, proxied) = ("10.197.0.2:9092", "10.197.0.3:9092");
    for addr in [direct, proxied] {
        let connect = format!("exec 3<>/dev/tcp/{}", addr.replace(':', "/"));
        let end = std::time::Instant::now() + Duration::from_secs(120);
        while !fibril(&["lab", "exec", "client", "--", "bash", "-c", &connect])
            .output()?
            .status
            .success()
        {
            anyhow::ensure!(
                std::time::Instant::now() < end,
                "{addr}: no broker within 2 min"
            );
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    let cp = format!("{lib}/*");
    let java = |class: &str, args: &[&str]| -> anyhow::Result<String> {
        let mut a = vec![
            "lab",
            "exec",
            "client",
            "--",
            "java",
            "-Xmx512m",
            "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn",
            "-cp",
            &cp,
            class,
        ];
        a.extend(args);
        let out = fibril(&a).output()?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        anyhow::ensure!(
            out.status.success(),
            "{class}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(text)
    };
    let n = records.to_string();
    // Records/s and MB/s of one producer run: "N records sent, R
    // records/sec (M MB/sec), ...".
    let produce = |addr: &str, topic: &str| -> anyhow::Result<(f64, f64)> {
        let servers = format!("bootstrap.servers={addr}");
        let out = java(
            "org.apache.kafka.tools.ProducerPerformance",
            &[
                "--topic",
                topic,
                "--num-records",
                &n,
                "--record-size",
                "512",
                "--throughput",
                "-1",
                "--producer-props",
                &servers,
                "acks=1",
                "linger.ms=5",
                "batch.size=65536",
            ],
        )?;
        let line = out
            .lines()
            .rfind(|l| l.contains("records sent"))
            .with_context(|| format!("no summary in {out}"))?;
        let num = |after: &str| -> Option<f64> {
            line.split(after)
                .next()?
                .rsplit([' ', '('])
                .next()?
                .parse()
                .ok()
        };
        Ok((
            num(" records/sec").context("records/sec")?,
            num(" MB/sec").context("MB/sec")?,
        ))
    };
    // Fetch rate of one consumer run (ConsumerPerformance's fetch.nMsg.sec
    // and fetch.MB.sec: the fetching, without the group's join).
    let consume = |addr: &str, topic: &str| -> anyhow::Result<(f64, f64)> {
        let out = java(
            "org.apache.kafka.tools.ConsumerPerformance",
            &[
                "--bootstrap-server",
                addr,
                "--topic",
                topic,
                "--messages",
                &n,
                "--timeout",
                "60000",
            ],
        )?;
        let row: Vec<f64> = out
            .lines()
            .last()
            .context("no output")?
            .split(", ")
            .filter_map(|v| v.trim().parse().ok())
            .collect();
        // start and end times do not parse: MB, MB/s, n, n/s, rebalance
        // ms, fetch ms, fetch MB/s, fetch n/s.
        anyhow::ensure!(row.len() >= 8, "unexpected consumer output: {out}");
        Ok((row[7], row[6]))
    };
    println!(
        "Kafka {} through the L7 proxy against direct ({records} records of 512 bytes, {rounds} rounds, medians; one client, brokers in lab pods, same run)",
        test_support::kafka_version()
    );
    let (mut pd, mut pp, mut fd, mut fp) = (vec![], vec![], vec![], vec![]);
    for round in 0..rounds {
        // Each round appends to `bench` on both brokers (the policy names
        // that topic) and reads the first `records` of it back; which
        // goes first alternates.
        if round % 2 == 0 {
            pd.push(produce(direct, "bench")?);
            pp.push(produce(proxied, "bench")?);
            fd.push(consume(direct, "bench")?);
            fp.push(consume(proxied, "bench")?);
        } else {
            pp.push(produce(proxied, "bench")?);
            pd.push(produce(direct, "bench")?);
            fp.push(consume(proxied, "bench")?);
            fd.push(consume(direct, "bench")?);
        }
    }
    let med = |v: &[(f64, f64)], i: usize| {
        median(v.iter().map(|x| if i == 0 { x.0 } else { x.1 }).collect())
    };
    println!(
        "{:<8} {:>14} {:>14} {:>7} {:>10} {:>10}",
        "", "direct rec/s", "proxied rec/s", "ratio", "direct MB/s", "proxy MB/s"
    );
    for (what, d, p) in [("produce", &pd, &pp), ("fetch", &fd, &fp)] {
        println!(
            "{what:<8} {:>14.0} {:>14.0} {:>7.3} {:>10.1} {:>10.1}",
            med(d, 0),
            med(p, 0),
            med(p, 0) / med(d, 0),
            med(d, 1),
            med(p, 1)
        );
    }
    // Proof the proxied runs were proxied (every request checked), and
    // how their bytes crossed: the socket shortcut joins client, proxy
    // and broker sockets on the node, which direct TCP over the pods'
    // veths does not have.
    let addr = std::fs::read_to_string(format!("/run/fibril/labs/{lab}/state/metrics.addr"))?;
    let mut c = std::net::TcpStream::connect(addr.trim())?;
    std::io::Write::write_all(&mut c, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")?;
    let mut metrics = String::new();
    std::io::Read::read_to_string(&mut c, &mut metrics)?;
    for name in [
        "fibril_proxy_kafka_requests_forwarded_total",
        "fibril_proxy_kafka_requests_denied_total",
    ] {
        let v = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .unwrap_or("?");
        println!("{name} {v}");
    }
    let status = fibril(&["status", "-o", "json"]).output()?;
    let status: serde_json::Value = serde_json::from_slice(&status.stdout).unwrap_or_default();
    if let Some(s) = status.get("proxy_shortcut").filter(|v| !v.is_null()) {
        println!(
            "socket shortcut: {} connection ends, {} sends socket to socket, {} through the stack",
            s["sockets"], s["redirected"], s["plain"]
        );
    }
    Ok(())
}
