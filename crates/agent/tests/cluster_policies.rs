//! Kvstore mode: two agents on one real etcd share their policies. An
//! import on one is enforced by the other; a delete goes everywhere; a
//! value that does not decode changes nothing; with etcd gone an import is
//! refused and the last policies stay; with it back, both converge.

use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use kvstore::server::{Etcd, ETCD};

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
    fn start(node: &str, cidr: &str, etcd: &str) -> Self {
        let id = test_support::unique_name("k");
        let dir = std::env::temp_dir().join(format!("fibril-cluster-{id}"));
        let bpf = PathBuf::from("/sys/fs/bpf").join(format!("fibril-cluster-{id}"));
        std::fs::create_dir_all(&dir).unwrap();
        let bin = Path::new(env!("CARGO_BIN_EXE_fibril-agent"));
        let child = test_support::agent_command(bin, &dir, &bpf, node, cidr)
            .args(["--cluster-name", "lab", "--kvstore", etcd])
            .args(["--kvstore-lease-ttl", "5"])
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("agent.log")).unwrap())
            .spawn()
            .unwrap();
        let agent = Agent { child, dir, bpf };
        let up = eventually(Duration::from_secs(10), || {
            api::call(&agent.socket(), &api::Request::Status).is_ok()
        });
        assert!(up, "agent did not start: {}", agent.log());
        agent
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("agent.sock")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    fn call(&self, r: api::Request) -> Result<api::Response, api::ClientError> {
        api::call(&self.socket(), &r)
    }

    fn import(&self, yaml: &str) -> Result<api::Response, api::ClientError> {
        self.call(api::Request::PolicyImport {
            file: "test.yaml".into(),
            yaml: yaml.into(),
            namespace: None,
        })
    }

    /// What `fibril status` shows of the cluster.
    fn cluster(&self) -> api::ClusterInfo {
        match self.call(api::Request::Status) {
            Ok(api::Response::Status(s)) => s.cluster.expect("kvstore mode"),
            other => panic!("status: {other:?}"),
        }
    }

    fn policies(&self) -> Vec<String> {
        match self.call(api::Request::PolicyGet) {
            Ok(api::Response::Policies { policies }) => {
                let mut keys: Vec<String> = policies.iter().map(|p| p.key()).collect();
                keys.sort();
                keys
            }
            other => panic!("policy get: {other:?}"),
        }
    }
}

/// A directory for a test's etcd, removed when the guard drops.
struct Dir(PathBuf);

impl Drop for Dir {
    fn drop(&mut self) {
        std::fs::remove_dir_all(&self.0).ok();
    }
}

fn etcd_dir() -> (Dir, PathBuf) {
    let dir = std::env::temp_dir().join(test_support::unique_name("fibril-cluster-etcd-"));
    std::fs::create_dir_all(&dir).unwrap();
    (Dir(dir.clone()), dir)
}

/// Polls `check` until it holds, for at most `within` (a bound: the test
/// fails only if it never holds).
fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < within {
        if check() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

fn policy(name: &str, app: &str) -> String {
    format!(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {{name: {name}, namespace: shop}}\nspec:\n  endpointSelector: {{matchLabels: {{app: {app}}}}}\n  ingress:\n  - fromEndpoints: [{{matchLabels: {{app: web}}}}]\n"
    )
}

#[test]
fn agents_share_their_policies_through_etcd() {
    let (_dir, dir) = etcd_dir();
    let etcd = Etcd::single(&dir).unwrap();
    let endpoint = etcd.endpoint();
    let a = Agent::start("a", "10.249.90.0/24", &endpoint);
    let b = Agent::start("b", "10.249.91.0/24", &endpoint);

    // An import on a: b enforces it too.
    let both = format!("{}---\n{}", policy("db", "db"), policy("cache", "cache"));
    a.import(&both)
        .unwrap_or_else(|e| panic!("{e}: {}", a.log()));
    let want = vec!["shop/cache".to_string(), "shop/db".to_string()];
    assert_eq!(a.policies(), want);
    assert!(
        eventually(Duration::from_secs(10), || b.policies() == want),
        "b has {:?}: {}",
        b.policies(),
        b.log()
    );

    // A delete on b goes to a.
    b.call(api::Request::PolicyDelete {
        key: "shop/cache".into(),
    })
    .unwrap();
    assert!(eventually(Duration::from_secs(10), || a.policies() == ["shop/db"]));

    // Garbage under the prefix changes nothing anywhere.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let kv = kvstore::Kvstore::connect(
            std::slice::from_ref(&endpoint),
            "lab",
            "test",
            Duration::from_secs(30),
        )
        .await
        .unwrap();
        kv.put(&kvstore::keys::policy("shop/junk"), "{not a policy")
            .await
            .unwrap();
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(a.policies(), ["shop/db"]);
    assert_eq!(b.policies(), ["shop/db"]);

    let status = a.cluster();
    assert_eq!(status.etcd_version.as_deref(), Some("3.4.23"));
    assert_eq!(status.kvstore, vec![endpoint.clone()]);

    // etcd goes away: an import is refused, saying why; the last policies
    // stay in force, and status says etcd is unreachable.
    let member = etcd.member().clone();
    etcd.stop();
    assert_eq!(a.cluster().etcd_version, None);
    let refused = a.import(&policy("late", "late")).unwrap_err().to_string();
    assert!(
        refused.contains("kvstore (etcd) is not reachable"),
        "{refused}"
    );
    assert_eq!(a.policies(), ["shop/db"]);
    assert_eq!(b.policies(), ["shop/db"]);

    // etcd comes back (same member, same data): imports work again and
    // reach the other node.
    let mut command = std::process::Command::new(ETCD);
    command.args(member.args(std::slice::from_ref(&member), "fibril-test"));
    let _etcd = Etcd::spawn(command, member, &dir.join("etcd2.log")).unwrap();
    assert!(
        eventually(Duration::from_secs(15), || a
            .import(&policy("late", "late"))
            .is_ok()),
        "{}",
        a.log()
    );
    let want = vec!["shop/db".to_string(), "shop/late".to_string()];
    assert!(
        eventually(Duration::from_secs(10), || b.policies() == want),
        "b has {:?}: {}",
        b.policies(),
        b.log()
    );
}

/// A network namespace of the test's own, removed when dropped.
struct Netns(String);

impl Netns {
    fn new() -> Self {
        let name = test_support::unique_name("fkv");
        let ok = std::process::Command::new("ip")
            .args(["netns", "add", &name])
            .status()
            .unwrap()
            .success();
        assert!(ok, "ip netns add {name}");
        Netns(name)
    }

    fn path(&self) -> String {
        format!("/run/netns/{}", self.0)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.0])
            .status();
    }
}

impl Agent {
    /// A pod `namespace/name` labelled `app` with one endpoint in `ns`.
    fn pod(&self, name: &str, app: &str, ns: &Netns) {
        let pod = api::Pod {
            namespace: "shop".into(),
            name: name.into(),
            labels: [("app".to_string(), app.to_string())].into(),
            namespace_labels: Default::default(),
            service_account: None,
            ports: vec![],
            workloads: vec![],
        };
        self.call(api::Request::PodUpsert(pod)).unwrap();
        self.call(api::Request::EndpointAdd(api::Attachment {
            container_id: format!("c-{name}"),
            ifname: "eth0".into(),
            netns: ns.path(),
            namespace: "shop".into(),
            pod: name.into(),
        }))
        .unwrap_or_else(|e| panic!("{e}: {}", self.log()));
    }

    /// The address of pod `shop/<name>`'s endpoint.
    fn ip_of(&self, name: &str) -> String {
        let Ok(api::Response::Endpoints { endpoints }) = self.call(api::Request::EndpointList)
        else {
            panic!("endpoint list")
        };
        endpoints
            .into_iter()
            .find(|e| e.pod_name == name)
            .map(|e| e.ipv4.split('/').next().unwrap().to_string())
            .unwrap()
    }

    /// (identity of `to`, allowed) as `policy trace` answers for TCP `port`.
    fn trace(&self, from: &str, to: &str, port: u16) -> (u32, bool) {
        match self.call(api::Request::PolicyTrace(api::TraceRequest {
            from: from.into(),
            to: to.into(),
            protocol: 6,
            port,
        })) {
            Ok(api::Response::Trace {
                to_identity,
                allowed,
                ..
            }) => (to_identity, allowed),
            other => panic!("trace: {other:?}"),
        }
    }

    /// The identity listed with `k8s:app=<app>`.
    fn identity_of(&self, app: &str) -> Option<u32> {
        let Ok(api::Response::Identities { identities }) = self.call(api::Request::IdentityList)
        else {
            panic!("identity list")
        };
        let label = format!("k8s:app={app}");
        identities
            .iter()
            .find(|i| i.labels.contains(&label))
            .map(|i| i.id)
    }
}

#[test]
fn endpoints_on_two_nodes_get_the_clusters_identities() {
    let (_dir, dir) = etcd_dir();
    let etcd = Etcd::single(&dir).unwrap();
    let endpoint = etcd.endpoint();
    let a = Agent::start("a", "10.249.92.0/24", &endpoint);
    let b = Agent::start("b", "10.249.93.0/24", &endpoint);
    let (n1, n2, n3) = (Netns::new(), Netns::new(), Netns::new());
    a.pod("web-1", "web", &n1);
    b.pod("db-1", "db", &n2);
    b.pod("web-2", "web", &n3);

    // One number per label set, cluster-wide, and each node knows the
    // other's pods' identities with their labels.
    let web = a.identity_of("web").expect("a's web");
    let db = b.identity_of("db").expect("b's db");
    assert_ne!(web, db);
    assert_eq!(
        b.identity_of("web"),
        Some(web),
        "the same labels, the same number"
    );
    assert!(
        eventually(Duration::from_secs(10), || a.identity_of("db") == Some(db)),
        "a learns b's identity: {}",
        a.log()
    );

    // Which nodes reference an identity (etcd's `value/` keys).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let refs = |app: &str| -> Vec<String> {
        rt.block_on(async {
            let kv = kvstore::Kvstore::connect(
                std::slice::from_ref(&endpoint),
                "lab",
                "test",
                Duration::from_secs(30),
            )
            .await
            .unwrap();
            let mut nodes: Vec<String> = kv
                .list(kvstore::keys::IDENTITY_VALUES)
                .await
                .unwrap()
                .entries
                .into_iter()
                .filter(|(k, _)| k.contains(&format!("k8s:app={app};")))
                .filter_map(|(k, _)| Some(kvstore::keys::value_parts(&k)?.1.to_string()))
                .collect();
            nodes.sort();
            nodes
        })
    };
    // a's ipcache names b's pods by their identity, and a's policy (the
    // cluster's) decides by it.
    let db_ip = b.ip_of("db-1");
    assert!(
        eventually(Duration::from_secs(10), || a
            .trace("shop/web-1", &db_ip, 5432)
            .0
            == db),
        "a does not know {db_ip} ({:?}, db {db}, {:?}): {}\nb: {}",
        a.trace("shop/web-1", &db_ip, 5432),
        a.call(api::Request::IdentityList),
        a.log(),
        b.log()
    );
    a.import(
        "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: web-to-db, namespace: shop}\nspec:\n  endpointSelector: {matchLabels: {app: web}}\n  egress:\n  - toEndpoints: [{matchLabels: {app: db}}]\n    toPorts: [{ports: [{port: \"5432\", protocol: TCP}]}]\n",
    )
    .unwrap();
    assert_eq!(a.trace("shop/web-1", &db_ip, 5432), (db, true));
    assert_eq!(a.trace("shop/web-1", &db_ip, 80), (db, false));

    // A live label change on b (web-2 becomes a db) re-enforced on a: a's
    // ipcache gives its address the db identity, and a's policy decides
    // by it. Bad label changes are refused and change nothing.
    let web2_ip = b.ip_of("web-2");
    assert_eq!(a.trace("shop/web-1", &web2_ip, 5432), (web, false));
    let label = |set: &[(&str, &str)], remove: &[&str]| {
        b.call(api::Request::PodLabel {
            namespace: "shop".into(),
            name: "web-2".into(),
            set: set
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            remove: remove.iter().map(|k| k.to_string()).collect(),
        })
    };
    assert!(label(&[("app", "bad value!")], &[]).is_err());
    assert!(label(&[], &["nope"]).is_err());
    label(&[("app", "db")], &[]).unwrap();
    assert!(
        eventually(Duration::from_secs(10), || a.trace(
            "shop/web-1",
            &web2_ip,
            5432
        ) == (db, true)),
        "{:?}: {}",
        a.trace("shop/web-1", &web2_ip, 5432),
        a.log()
    );

    // b's only web pod is a db now: its reference on web went with it,
    // a's stays while a's pod lives; the number stays the cluster's until
    // collected.
    assert_eq!(refs("web"), ["a"]);
    assert_eq!(refs("db"), ["b"]);
    a.call(api::Request::EndpointDel {
        container_id: "c-web-1".into(),
        ifname: "eth0".into(),
    })
    .unwrap();
    assert!(refs("web").is_empty());
    assert_eq!(b.identity_of("web"), Some(web));

    // b's pod goes: a forgets its address (the world's again).
    b.call(api::Request::EndpointDel {
        container_id: "c-db-1".into(),
        ifname: "eth0".into(),
    })
    .unwrap();
    let world = 2;
    a.pod("web-3", "web", &n1);
    assert!(
        eventually(Duration::from_secs(10), || a
            .trace("shop/web-3", &db_ip, 5432)
            .0
            == world),
        "{}",
        a.log()
    );

    // b dies: its lease (5 s) expires, its keys go, and a drops b's pods
    // from its ipcache.
    assert_eq!(a.trace("shop/web-3", &web2_ip, 5432), (db, true));
    drop(b);
    assert!(
        eventually(Duration::from_secs(20), || a
            .trace("shop/web-3", &web2_ip, 5432)
            .0
            == world),
        "{}",
        a.log()
    );
}

/// `peer.Peer/Notify` on each node lists every node of the cluster with
/// its Hubble address (what a relay connects to), and a node whose lease
/// expires is announced gone.
#[test]
fn every_node_announces_the_clusters_peers() {
    let (_dir, dir) = etcd_dir();
    let etcd = Etcd::single(&dir).unwrap();
    let a = Agent::start("a", "10.249.94.0/24", &etcd.endpoint());
    let b = Agent::start("b", "10.249.95.0/24", &etcd.endpoint());
    let hubble = |agent: &Agent| {
        std::fs::read_to_string(agent.dir.join("state/hubble.addr"))
            .unwrap()
            .trim()
            .to_string()
    };
    let (a_addr, b_addr) = (hubble(&a), hubble(&b));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        use proto::peer::peer_client::PeerClient;
        use proto::peer::{ChangeNotificationType as T, NotifyRequest};
        let mut client = PeerClient::connect(format!("http://{a_addr}"))
            .await
            .unwrap();
        let mut stream = client
            .notify(NotifyRequest::default())
            .await
            .unwrap()
            .into_inner();
        let mut peers = std::collections::BTreeMap::new();
        let next = async |stream: &mut tonic::Streaming<proto::peer::ChangeNotification>| {
            tokio::time::timeout(Duration::from_secs(15), stream.message())
                .await
                .expect("a change within the bound")
                .unwrap()
                .unwrap()
        };
        while peers.len() < 2 {
            let n = next(&mut stream).await;
            assert_ne!(n.r#type, T::PeerDeleted as i32, "{n:?}");
            peers.insert(n.name, n.address);
        }
        assert_eq!(
            peers,
            [
                ("lab/a".to_string(), a_addr.clone()),
                ("lab/b".to_string(), b_addr.clone())
            ]
            .into()
        );
        assert!(
            eventually(Duration::from_secs(10), || b.cluster().nodes
                == ["lab/a", "lab/b"]),
            "{:?}",
            b.cluster()
        );
        // b dies; its lease (5 s) expires and it is announced gone.
        drop(b);
        loop {
            let n = next(&mut stream).await;
            if n.r#type == T::PeerDeleted as i32 {
                assert_eq!(
                    (n.name.as_str(), n.address.as_str()),
                    ("lab/b", b_addr.as_str())
                );
                break;
            }
        }
    });
    drop(a);
}
