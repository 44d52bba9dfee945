//! Tier 5, Hubble Relay: a three-node lab starts `fibril-relay`; the real
//! `hubble` CLI (v1.19.4, built from its Go module) reads the whole
//! cluster through it: status, nodes, flows of every node in time order,
//! a filter, and a node that goes away and comes back. Needs root.

mod common;

use std::process::Command;

use common::{custom_lab, wait_until};
use serde_json::Value;

const LAB: &str = r#"
podCIDR: POD_CIDR_HERE
nodes: [n1, n2, n3]
pods:
- {name: client, labels: {app: client}, node: n1}
- {name: web2, labels: {app: web}, node: n2, command: [fibril-echo, http-server, --port, "8080"]}
- {name: web3, labels: {app: web}, node: n3, command: [fibril-echo, http-server, --port, "8080"]}
"#;

/// (success, stdout, stderr) of the real hubble CLI against `server`.
fn hubble(server: &str, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(test_support::hubble_cli())
        .args(args)
        .args(["--server", server])
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// An RFC 3339 time as (seconds part, nanoseconds): Hubble trims the
/// fraction's trailing zeros, so the text does not sort.
fn time_of(v: &Value) -> (String, u32) {
    let t = v["time"].as_str().unwrap_or_default().trim_end_matches('Z');
    let (secs, frac) = t.split_once('.').unwrap_or((t, "0"));
    let nanos = format!("{frac:0<9}")[..9].parse().unwrap_or(0);
    (secs.to_string(), nanos)
}

#[test]
fn the_real_hubble_cli_sees_every_node_through_the_relay() {
    let lab = custom_lab(LAB);
    let server = format!("unix:///run/fibril/labs/{}/relay.sock", lab.name);
    wait_until("the relay to see three nodes", || {
        hubble(&server, &["status"])
            .1
            .contains("Connected Nodes: 3/3")
    });
    let (ok, nodes, err) = hubble(&server, &["list", "nodes"]);
    assert!(ok, "{err}");
    for n in ["default/n1", "default/n2", "default/n3"] {
        assert!(
            nodes
                .lines()
                .any(|l| l.starts_with(n) && l.contains("Connected")),
            "{nodes}"
        );
    }

    // The /24 splits into a /26 per node: each node's first pod is .2 of
    // its block.
    let (web2, web3) = (lab.ip(66), lab.ip(130));
    wait_until("both servers to answer", || {
        lab.http_get("default/client", &format!("http://{web2}:8080/"), "1")
            && lab.http_get("default/client", &format!("http://{web3}:8080/"), "1")
    });
    for _ in 0..3 {
        for ip in [&web2, &web3] {
            assert!(lab.http_get("default/client", &format!("http://{ip}:8080/"), "2"));
        }
    }
    let observe = |extra: &[&str]| -> Vec<Value> {
        let (ok, out, err) = hubble(&server, &[&["observe", "-o", "json"], extra].concat());
        assert!(ok, "{err}");
        out.lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter_map(|v| v.get("flow").cloned())
            .collect()
    };
    let flows = observe(&["--last", "1000"]);
    // Each end's node reports its side: the client's egress on n1, the
    // servers' ingress on n2 and n3, one stream, in time order.
    let names: std::collections::BTreeSet<&str> = flows
        .iter()
        .filter_map(|f| f["node_name"].as_str())
        .collect();
    assert_eq!(names, ["n1", "n2", "n3"].into(), "flows by node");
    let times: Vec<(String, u32)> = flows.iter().map(time_of).collect();
    assert!(
        times.windows(2).all(|w| w[0] <= w[1]),
        "flows out of order: {times:?}"
    );
    // `--last N` is the cluster's last N, not N per node.
    assert_eq!(observe(&["--last", "5"]).len(), 5);
    let last5: Vec<(String, u32)> = observe(&["--last", "5"]).iter().map(time_of).collect();
    assert_eq!(
        last5,
        times[times.len() - 5..],
        "the last five across nodes"
    );
    // A filter means what it means on one node.
    let to_web3 = observe(&["--last", "1000", "--to-pod", "default/web3"]);
    assert!(!to_web3.is_empty());
    assert!(
        to_web3
            .iter()
            .all(|f| f["destination"]["pod_name"] == "web3"),
        "a flow not to web3 among {}",
        to_web3.len()
    );

    // Following while one node's stream lags: n3's agent is stopped for
    // 200 ms (less than the relay's 500 ms drain timeout) in the middle of
    // steady traffic to both servers; its flows reach the relay late, and
    // the merged stream must still be in time order, with n3's flows in.
    // Into a file: a pipe read only at the end would fill and stall it.
    let follow_out = std::env::temp_dir().join(format!("fibril-relay-follow-{}.json", lab.name));
    let mut follow = Command::new(test_support::hubble_cli())
        .args(["observe", "-f", "-o", "json", "--server", &server])
        .stdout(std::fs::File::create(&follow_out).unwrap())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    let loop_script = format!(
        "for i in $(seq 60); do curl -s -m 1 -o /dev/null http://{web2}:8080/; curl -s -m 1 -o /dev/null http://{web3}:8080/; done"
    );
    let traffic = Command::new(common::bin("fibril"))
        .args(["--lab", &lab.name, "lab", "exec", "default/client", "--"])
        .args(["sh", "-c", &loop_script])
        .spawn()
        .unwrap();
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("/run/fibril/labs/{}/lab.json", lab.name)).unwrap(),
    )
    .unwrap();
    let n3_agent = state["nodes"][2]["agent_pid"].as_u64().unwrap().to_string();
    std::thread::sleep(std::time::Duration::from_millis(700));
    let signal = |sig: &str| {
        assert!(Command::new("kill")
            .args([sig, &n3_agent])
            .status()
            .unwrap()
            .success());
    };
    signal("-STOP");
    std::thread::sleep(std::time::Duration::from_millis(200));
    signal("-CONT");
    let mut traffic = traffic;
    assert!(traffic.wait().unwrap().success());
    std::thread::sleep(std::time::Duration::from_millis(1500));
    follow.kill().unwrap();
    follow.wait().unwrap();
    let text = std::fs::read_to_string(&follow_out).unwrap();
    std::fs::remove_file(&follow_out).ok();
    let followed: Vec<Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v.get("flow").cloned())
        .collect();
    let count = |n: &str| followed.iter().filter(|f| f["node_name"] == n).count();
    let from_n3 = count("n3");
    assert!(
        from_n3 >= 60,
        "{from_n3} flows from n3 while following (n1 {}, n2 {})",
        count("n1"),
        count("n2"),
    );
    let times: Vec<(String, u32)> = followed.iter().map(time_of).collect();
    let out_of_order: Vec<String> = followed
        .windows(2)
        .filter(|w| time_of(&w[0]) > time_of(&w[1]))
        .map(|w| {
            format!(
                "{} {} then {} {}",
                w[0]["node_name"], w[0]["time"], w[1]["node_name"], w[1]["time"]
            )
        })
        .collect();
    let own_disorder = |n: &str| {
        let t: Vec<(String, u32)> = followed
            .iter()
            .filter(|f| f["node_name"] == n)
            .map(time_of)
            .collect();
        t.windows(2).filter(|w| w[0] > w[1]).count()
    };
    assert!(
        out_of_order.is_empty(),
        "of {} followed flows: {out_of_order:?}; each node's own stream out of order: n1 {} n2 {} n3 {}",
        times.len(),
        own_disorder("n1"),
        own_disorder("n2"),
        own_disorder("n3")
    );

    // A node goes away: the relay keeps serving the others and says so.
    let stop = lab.fibril(&["lab", "stop-node", "n3"]);
    assert!(
        stop.status.success(),
        "{}",
        String::from_utf8_lossy(&stop.stderr)
    );
    let (ok, status, err) = hubble(&server, &["status"]);
    assert!(ok, "{err}");
    assert!(
        status.contains("Connected Nodes: 2/3") && status.contains("default/n3"),
        "{status}"
    );
    let (ok, out, err) = hubble(&server, &["observe", "--last", "5"]);
    assert!(ok, "{err}");
    assert!(
        err.contains("unavailable") && err.contains("default/n3"),
        "the CLI reports the unavailable node: {err}"
    );
    assert_eq!(out.lines().count(), 5, "{out}");
    let start = lab.fibril(&["lab", "start-node", "n3"]);
    assert!(
        start.status.success(),
        "{}",
        String::from_utf8_lossy(&start.stderr)
    );
    wait_until("n3 back in the relay", || {
        hubble(&server, &["status"])
            .1
            .contains("Connected Nodes: 3/3")
    });

    let socket = format!("/run/fibril/labs/{}/relay.sock", lab.name);
    drop(lab);
    assert!(!std::path::Path::new(&socket).exists());
}
