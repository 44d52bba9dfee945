//! Hostile clients against a real agent (its own state, bpffs directory,
//! sockets and ports; removed at the end): floods of connections and
//! streams, garbage and oversized requests, abusive Hubble filters, slow
//! metrics clients. Throughout, a status call from another client must be
//! answered, and the agent's file descriptors, threads and memory stay
//! bounded. Bounded in count and time; needs root (the agent loads BPF).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use proto::observer::observer_client::ObserverClient;
use proto::observer::GetFlowsRequest;

/// The status bound every flood is measured against: a status call from a
/// client that is not flooding must be answered within it.
const STATUS_BOUND: Duration = Duration::from_secs(2);

struct Agent {
    child: Child,
    dir: PathBuf,
    bpf: PathBuf,
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        netns::proxy_routing_forget(&self.dir.join("state").join(netns::PROXY_ROUTING_FILE));
        datapath::Datapath::unpin_all(&self.bpf);
        std::fs::remove_dir_all(&self.dir).ok();
    }
}

impl Agent {
    fn start() -> Self {
        let id = test_support::unique_name("h");
        let dir = std::env::temp_dir().join(format!("fibril-hostile-{id}"));
        let bpf = PathBuf::from("/sys/fs/bpf").join(format!("fibril-hostile-{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        // A pod CIDR of its own per agent of this process.
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let cidr = format!("10.249.{}.0/24", 70 + n);
        let bin = std::path::Path::new(env!("CARGO_BIN_EXE_fibril-agent"));
        let child = test_support::agent_command(bin, &dir, &bpf, "hostile", &cidr)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("agent.log")).unwrap())
            .spawn()
            .unwrap();
        let agent = Agent { child, dir, bpf };
        for _ in 0..200 {
            if api::call(&agent.socket(), &api::Request::Status).is_ok()
                && agent.dir.join("state/hubble.addr").exists()
            {
                return agent;
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        panic!(
            "agent did not start: {}",
            std::fs::read_to_string(agent.dir.join("agent.log")).unwrap_or_default()
        );
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }

    fn addr(&self, file: &str) -> String {
        std::fs::read_to_string(self.dir.join("state").join(file))
            .unwrap()
            .trim()
            .to_string()
    }

    /// A status call with `STATUS_BOUND` as its timeout: panics if the
    /// agent does not answer within it.
    fn status_answers(&self, during: &str) {
        let mut c = api::Client::connect_timeout(&self.socket(), STATUS_BOUND)
            .unwrap_or_else(|e| panic!("{during}: cannot connect: {e}"));
        match c.call(&api::Request::Status) {
            Ok(api::Response::Status(_)) => {}
            other => panic!("{during}: status did not answer: {other:?}"),
        }
    }

    fn proc_status(&self, field: &str) -> u64 {
        let text = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        text.lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no {field} in /proc status"))
    }

    /// (open file descriptors, threads, RSS in MiB).
    fn usage(&self) -> (usize, u64, u64) {
        let fds = std::fs::read_dir(format!("/proc/{}/fd", self.child.id()))
            .unwrap()
            .count();
        (
            fds,
            self.proc_status("Threads:"),
            self.proc_status("VmRSS:") / 1024,
        )
    }

    fn assert_bounded(&self, during: &str) {
        let (fds, threads, rss) = self.usage();
        eprintln!("{during}: agent fds {fds}, threads {threads}, RSS {rss} MiB");
        assert!(fds < 600, "{during}: {fds} file descriptors");
        assert!(threads < 200, "{during}: {threads} threads");
        assert!(rss < 512, "{during}: RSS {rss} MiB");
    }
}

/// Not a test of its own: the flooding process the agent-socket test
/// starts (`FIBRIL_FLOOD_SOCKET` set), so that the flood comes from other
/// processes than the status calls. Holds its connections until stdin
/// closes.
#[test]
fn flood_helper() {
    let Ok(path) = std::env::var("FIBRIL_FLOOD_SOCKET") else {
        return;
    };
    let n: usize = std::env::var("FIBRIL_FLOOD_COUNT")
        .unwrap()
        .parse()
        .unwrap();
    let mut held = Vec::new();
    let mut refused = 0;
    for _ in 0..n {
        let Ok(mut s) = UnixStream::connect(&path) else {
            refused += 1;
            continue;
        };
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut b = [0u8; 256];
        match s.read(&mut b) {
            Ok(n) if n > 0 && String::from_utf8_lossy(&b[..n]).contains("too many connections") => {
                refused += 1
            }
            _ => held.push(s),
        }
    }
    println!("held {} refused {refused}", held.len());
    let _ = std::io::stdin().read(&mut [0u8; 1]);
}

#[test]
fn the_agent_socket_survives_floods_garbage_and_huge_requests() {
    let agent = Agent::start();
    let sock = agent.socket();

    // Four processes open 100 idle connections each.
    let floods: Vec<Child> = (0..4)
        .map(|_| {
            Command::new(std::env::current_exe().unwrap())
                .args([
                    "--exact",
                    "flood_helper",
                    "--nocapture",
                    "--test-threads",
                    "1",
                ])
                .env("FIBRIL_FLOOD_SOCKET", &sock)
                .env("FIBRIL_FLOOD_COUNT", "100")
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut floods: Vec<(Child, BufReader<std::process::ChildStdout>)> = floods
        .into_iter()
        .map(|mut c| {
            let out = BufReader::new(c.stdout.take().unwrap());
            (c, out)
        })
        .collect();
    for (_, out) in &mut floods {
        let mut line = String::new();
        // libtest writes "test flood_helper ... " before the helper's line.
        let report = loop {
            line.clear();
            assert!(out.read_line(&mut line).unwrap() > 0, "flood helper ended");
            if let Some(i) = line.find("held ") {
                break line[i..].to_string();
            }
        };
        let held: usize = report.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(held <= 8, "one process holds at most 8 connections: {line}");
    }
    agent.status_answers("400 idle connections from 4 processes");
    agent.assert_bounded("agent socket flood");
    for (mut c, _) in floods {
        drop(c.stdin.take());
        let _ = c.wait();
    }

    // Garbage: invalid UTF-8 and broken JSON get precise errors and the
    // connection stays usable.
    let mut c = UnixStream::connect(&sock).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut r = BufReader::new(c.try_clone().unwrap());
    let mut answer = |c: &mut UnixStream, bytes: &[u8]| {
        c.write_all(bytes).unwrap();
        let mut line = String::new();
        r.read_line(&mut line).unwrap();
        line
    };
    let a = answer(&mut c, b"{\"op\": \"status\xff\xfe\"}\n");
    assert!(a.contains("not UTF-8 (invalid byte at offset 14)"), "{a}");
    let a = answer(&mut c, b"{\"op\": \"nonsense\"}\n");
    assert!(a.contains("bad request: unknown variant `nonsense`"), "{a}");
    let a = answer(&mut c, b"{\"op\": \"status\"}\n");
    assert!(a.contains("\"kind\":\"status\""), "{a}");

    // A request past 16 MiB is refused with the limit, not a broken pipe.
    let mut big = UnixStream::connect(&sock).unwrap();
    big.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reader = big.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let chunk = vec![b'x'; 1 << 20];
        for _ in 0..20 {
            if big.write_all(&chunk).is_err() {
                break; // closed by the agent after its answer
            }
        }
    });
    let mut text = String::new();
    let _ = reader.read_to_string(&mut text);
    writer.join().unwrap();
    assert!(
        text.contains("request too large") && text.contains("the limit is 16777216 bytes"),
        "{text}"
    );
    agent.status_answers("after the garbage");
    agent.assert_bounded("after the garbage");
}

fn hubble_channel(rt: &tokio::runtime::Runtime, addr: &str) -> tonic::transport::Channel {
    rt.block_on(
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect(),
    )
    .unwrap()
}

#[test]
fn hubble_floods_and_abusive_filters_leave_the_agent_responsive() {
    let agent = Agent::start();
    let tcp = agent.addr("hubble.addr");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();

    // 1,200 connections (the count that exhausted the agent's descriptors
    // before): all but the per-client bound are closed at once.
    let mut held = Vec::new();
    let mut closed = 0;
    for _ in 0..1200 {
        match std::net::TcpStream::connect(&tcp) {
            Ok(s) => held.push(s),
            Err(_) => closed += 1,
        }
    }
    std::thread::sleep(Duration::from_millis(300));
    for s in &mut held {
        s.set_nonblocking(true).unwrap();
    }
    let open = held
        .iter_mut()
        .filter(|s| {
            let mut b = [0u8; 256];
            loop {
                match (&**s).read(&mut b) {
                    Ok(0) => return false,
                    Ok(_) => continue, // the server's preface
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
                    Err(_) => return false,
                }
            }
        })
        .count();
    eprintln!("hubble TCP flood: {open} held, {closed} refused at connect");
    assert!(open <= 32, "{open} connections held by one client");
    agent.status_answers("1,200 Hubble connections");
    agent.assert_bounded("Hubble connection flood");
    drop(held);

    // 300 streams: at most 64 at once, the rest RESOURCE_EXHAUSTED; one
    // thread each for those that are open, no more.
    let channel = hubble_channel(&rt, &tcp);
    let (streams, exhausted) = rt.block_on(async {
        let mut streams = Vec::new();
        let mut exhausted = 0;
        for _ in 0..300 {
            let mut c = ObserverClient::new(channel.clone());
            match c
                .get_flows(GetFlowsRequest {
                    follow: true,
                    ..Default::default()
                })
                .await
            {
                Ok(s) => streams.push(s.into_inner()),
                Err(e) => {
                    assert_eq!(e.code(), tonic::Code::ResourceExhausted, "{e}");
                    exhausted += 1;
                }
            }
        }
        (streams, exhausted)
    });
    assert_eq!(streams.len(), 64);
    assert_eq!(exhausted, 236);
    agent.status_answers("300 GetFlows streams");
    agent.assert_bounded("GetFlows stream flood");
    drop(streams);
    // Their threads notice the closed streams and give the slots back.
    let mut c = ObserverClient::new(channel.clone());
    let mut freed = false;
    for _ in 0..100 {
        let one = GetFlowsRequest {
            number: 1,
            ..Default::default()
        };
        if rt.block_on(c.get_flows(one)).is_ok() {
            freed = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(freed, "closed streams kept their slots");

    // 20,000 http_path regexes (589 KB): refused before compiling.
    let err = rt
        .block_on(c.get_flows(GetFlowsRequest {
            number: 1,
            whitelist: vec![proto::flow::FlowFilter {
                http_path: (0..20_000).map(|i| format!("/api/{i}/.*x{{1,9}}")).collect(),
                ..Default::default()
            }],
            ..Default::default()
        }))
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::ResourceExhausted, "{err}");
    // A glob with 14 stars is answered (it kept a CPU busy for 29 s).
    let stars = rt.block_on(c.get_flows(GetFlowsRequest {
        number: 10,
        whitelist: vec![proto::flow::FlowFilter {
            node_name: vec![format!("{}x", "*a".repeat(14))],
            ..Default::default()
        }],
        ..Default::default()
    }));
    assert!(stars.is_ok(), "{:?}", stars.err());
    agent.status_answers("abusive filters");
    agent.assert_bounded("abusive filters");
}

/// A metrics client that connects and sends nothing delays no other scrape.
#[test]
fn a_slow_metrics_client_blocks_no_scrape() {
    let agent = Agent::start();
    for file in ["metrics.addr", "hubble-metrics.addr"] {
        let addr = agent.addr(file);
        let slow: Vec<_> = (0..4)
            .map(|_| std::net::TcpStream::connect(&addr).unwrap())
            .collect();
        let mut c = std::net::TcpStream::connect(&addr).unwrap();
        c.set_read_timeout(Some(STATUS_BOUND)).unwrap();
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out)
            .unwrap_or_else(|e| panic!("{file}: scrape blocked by slow clients: {e}"));
        assert!(out.starts_with("HTTP/1.1 200 OK"), "{file}: {out}");
        drop(slow);
    }
    agent.assert_bounded("slow metrics clients");
}

/// Names enter only as Kubernetes admits them (DNS-1123 labels and
/// subdomains): a newline, an escape sequence or a path is refused with the
/// rule it breaks, and nothing is stored.
#[test]
fn names_enter_only_as_kubernetes_admits_them() {
    let agent = Agent::start();
    let call = |req: api::Request| api::call(&agent.socket(), &req);
    let refused = |req: api::Request, needle: &str| match call(req) {
        Err(api::ClientError::Agent { message: m, .. }) => assert!(m.contains(needle), "{m}"),
        other => panic!("accepted: {other:?}"),
    };
    let pod = |namespace: &str, name: &str| {
        api::Request::PodUpsert(api::Pod {
            namespace: namespace.into(),
            name: name.into(),
            ..Default::default()
        })
    };
    refused(
        pod("shop", "web\nk8s:app=admin"),
        "not a DNS-1123 subdomain",
    );
    refused(pod("shop", "\u{1b}[2Jweb"), "not a DNS-1123 subdomain");
    refused(pod("../../etc/passwd", "web"), "not a DNS-1123 label");
    refused(
        api::Request::NamespaceAudit {
            namespace: "../../etc/passwd".into(),
            audit: true,
        },
        "not a DNS-1123 label",
    );
    let netns = test_support::unique_name("fibril-names-");
    netns::create_netns(&netns).unwrap();
    let add = call(api::Request::EndpointAdd(api::Attachment {
        container_id: "c1".into(),
        ifname: "eth0".into(),
        netns: format!("/run/netns/{netns}"),
        namespace: "Shop".into(),
        pod: "web".into(),
    }));
    netns::delete_netns(&netns);
    assert!(
        matches!(&add, Err(api::ClientError::Agent { message: m, cause: api::ErrorKind::Invalid }) if m.contains("namespace \"Shop\"")),
        "{add:?}"
    );
    match call(api::Request::Status).unwrap() {
        api::Response::Status(s) => assert_eq!(s.endpoints, 0),
        other => panic!("{other:?}"),
    }
    let state = std::fs::read_to_string(agent.dir.join("state/state.json")).unwrap_or_default();
    assert!(
        !state.contains("passwd") && !state.contains("admin"),
        "{state}"
    );
    assert!(call(pod("shop", "web-0.v2")).is_ok());
}

/// One generated request line: garbage, a random JSON value, or a real
/// operation with hostile field values.
fn request_line() -> impl proptest::strategy::Strategy<Value = Vec<u8>> {
    use proptest::prelude::*;
    use serde_json::{json, Value};
    let text = || {
        prop_oneof![
            "[a-z0-9./-]{0,24}",
            "\\PC{0,32}",
            Just("../../etc/passwd".to_string()),
            Just("/".to_string()),
            Just("/proc/self/ns/net".to_string()),
        ]
    };
    let op = prop_oneof![
        Just(json!({"op": "status"})),
        (text(), text()).prop_map(|(n, p)| json!({"op": "pod_upsert", "namespace": n, "name": p, "labels": {p.clone(): n}})),
        (text(), text()).prop_map(|(n, p)| json!({"op": "pod_delete", "namespace": n, "name": p})),
        (text(), text(), text(), text()).prop_map(|(c, i, ns, p)| json!({"op": "endpoint_add", "container_id": c, "ifname": i, "netns": ns, "namespace": p, "pod": p})),
        (text(), text()).prop_map(|(c, i)| json!({"op": "endpoint_del", "container_id": c, "ifname": i})),
        (text(), text(), text()).prop_map(|(c, i, ns)| json!({"op": "endpoint_check", "container_id": c, "ifname": i, "netns": ns, "namespace": "a", "pod": "b"})),
        Just(json!({"op": "endpoint_list"})),
        Just(json!({"op": "identity_list"})),
        (text(), text()).prop_map(|(f, y)| json!({"op": "policy_import", "file": f, "yaml": y, "namespace": null})),
        text().prop_map(|k| json!({"op": "policy_delete", "key": k})),
        (text(), text(), any::<u8>(), any::<u16>()).prop_map(|(f, t, p, port)| json!({"op": "policy_trace", "from": f, "to": t, "protocol": p, "port": port})),
        (text(), any::<bool>()).prop_map(|(n, a)| json!({"op": "namespace_audit", "namespace": n, "audit": a})),
        Just(json!({"op": "fqdn_list"})),
        Just(json!({"op": "conntrack_list", "address": "10.249.77.2"})),
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<i64>().prop_map(Value::from),
        text().prop_map(Value::from),
    ];
    let value = leaf.prop_recursive(3, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map("[a-z_]{1,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    });
    prop_oneof![
        4 => op.prop_map(|v| serde_json::to_vec(&v).unwrap()),
        1 => value.prop_map(|v| serde_json::to_vec(&v).unwrap()),
        1 => prop::collection::vec(any::<u8>(), 0..200),
    ]
    .prop_map(|mut line| {
        line.retain(|&b| b != b'\n');
        line.push(b'\n');
        line
    })
}

/// Generated requests against a real agent: every line gets exactly one
/// answer, and afterwards the agent answers status, holds no endpoint
/// (nothing generated is a real pod) and stays within its bounds.
#[test]
fn generated_requests_each_get_one_answer() {
    use proptest::test_runner::{Config, TestRunner};
    let agent = Agent::start();
    let conn = std::cell::RefCell::new(None::<(UnixStream, BufReader<UnixStream>)>);
    let mut runner = TestRunner::new(Config {
        cases: 400,
        failure_persistence: None,
        ..Config::default()
    });
    runner
        .run(&request_line(), |line| {
            let mut slot = conn.borrow_mut();
            let (w, r) = slot.get_or_insert_with(|| {
                let s = UnixStream::connect(agent.socket()).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                (s.try_clone().unwrap(), BufReader::new(s))
            });
            w.write_all(&line).unwrap();
            let mut answer = String::new();
            r.read_line(&mut answer).unwrap();
            let parsed: Result<api::Response, _> = serde_json::from_str(&answer);
            proptest::prop_assert!(
                parsed.is_ok(),
                "{:?} -> {answer:?}",
                String::from_utf8_lossy(&line)
            );
            Ok(())
        })
        .unwrap();
    agent.status_answers("generated requests");
    match api::call(&agent.socket(), &api::Request::Status).unwrap() {
        api::Response::Status(s) => assert_eq!(s.endpoints, 0),
        other => panic!("{other:?}"),
    }
    agent.assert_bounded("generated requests");
}
