//! The kvstore against a real etcd (Debian's `etcd-server`, one member on
//! loopback, its data in a directory of the test's own).

use std::collections::{BTreeMap, BTreeSet};
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use fibril_kvstore::server::Etcd;
use fibril_kvstore::{keys, Event, IpIdentity, Kvstore, Node};
use policy::{Label, LabelSet};

struct Cluster {
    etcd: Etcd,
    dir: std::path::PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn etcd() -> Cluster {
    let dir = std::env::temp_dir().join(test_support::unique_name("fibril-etcd-"));
    std::fs::create_dir_all(&dir).unwrap();
    let etcd = Etcd::single(&dir).unwrap_or_else(|e| {
        let log = std::fs::read_to_string(dir.join("etcd.log")).unwrap_or_default();
        panic!("{e}\n{log}")
    });
    Cluster { etcd, dir }
}

async fn connect(c: &Cluster, node: &str, ttl: Duration) -> Kvstore {
    Kvstore::connect(&[c.etcd.endpoint()], "lab", node, ttl)
        .await
        .unwrap()
}

fn labels(app: &str) -> LabelSet {
    LabelSet::new(vec![
        Label::new("k8s", "app", app),
        Label::new("k8s", "io.kubernetes.pod.namespace", "default"),
    ])
}

/// Polls `check` until it holds, for at most `within` (a bound, not a
/// figure: the test fails only if it never holds).
async fn eventually(within: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
    let start = Instant::now();
    while start.elapsed() < within {
        if check().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    false
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_allocation_gives_one_number_per_label_set() {
    let c = etcd();
    let mut nodes: Vec<Kvstore> = Vec::new();
    for i in 0..6 {
        nodes.push(connect(&c, &format!("n{i}"), Duration::from_secs(30)).await);
    }
    // Every node allocates the shared label sets and some of its own, all
    // at once.
    let shared: Vec<LabelSet> = (0..10).map(|i| labels(&format!("shared{i}"))).collect();
    let tasks: Vec<_> = nodes
        .iter()
        .enumerate()
        .map(|(i, kv)| {
            let kv = kv.clone();
            let mut wanted = shared.clone();
            wanted.extend((0..5).map(|j| labels(&format!("own{i}-{j}"))));
            tokio::spawn(async move {
                let mut got = Vec::new();
                for l in wanted {
                    got.push((keys::labels(&l), kv.acquire_identity(&l).await.unwrap()));
                }
                got
            })
        })
        .collect();
    let mut by_labels: BTreeMap<String, BTreeSet<u32>> = BTreeMap::new();
    for t in tasks {
        for (l, id) in t.await.unwrap() {
            by_labels.entry(l).or_default().insert(id);
        }
    }
    assert_eq!(by_labels.len(), 10 + 6 * 5);
    let mut all = BTreeSet::new();
    for (l, ids) in &by_labels {
        assert_eq!(ids.len(), 1, "{l} got {ids:?}");
        let id = *ids.first().unwrap();
        assert!((256..=65535).contains(&id));
        assert!(all.insert(id), "{id} given to two label sets");
    }
    // The master keys say the same, and every node holds a reference on
    // each shared identity.
    let masters = nodes[0].identities().await.unwrap();
    for (l, ids) in &by_labels {
        assert_eq!(masters.get(ids.first().unwrap()), Some(l));
    }
    let refs = nodes[0]
        .list(&keys::identity_values(&keys::labels(&shared[3])))
        .await
        .unwrap();
    assert_eq!(refs.entries.len(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_nodes_keys_expire_and_watchers_see_them_go() {
    let c = etcd();
    let watcher = connect(&c, "n0", Duration::from_secs(30)).await;
    let prefix = keys::ips_of("lab");
    let listing = watcher.list(&prefix).await.unwrap();
    assert!(listing.entries.is_empty());
    let mut events = watcher.watch(&prefix, listing.revision).await.unwrap();

    let dying = connect(&c, "n1", Duration::from_secs(2)).await;
    dying
        .register_node(&Node {
            name: "n1".into(),
            cluster: "lab".into(),
            addresses: vec![fibril_kvstore::types::NodeAddress {
                kind: "InternalIP".into(),
                ip: Ipv4Addr::new(192, 168, 77, 2),
            }],
            pod_cidr: "10.0.1.0/24".into(),
            hubble_address: "192.168.77.2:4244".into(),
        })
        .await
        .unwrap();
    let ip = IpIdentity {
        ip: Ipv4Addr::new(10, 0, 1, 5),
        host_ip: Ipv4Addr::new(192, 168, 77, 2),
        identity: dying.acquire_identity(&labels("web")).await.unwrap(),
        key: 0,
        namespace: "default".into(),
        pod: "web-1".into(),
        node: "n1".into(),
        named_ports: vec![],
    };
    dying.put_ip(&ip).await.unwrap();
    let key = keys::ip("lab", ip.ip);
    match events.recv().await.unwrap() {
        Event::Put(k, v) => {
            assert_eq!(k, key);
            assert_eq!(serde_json::from_slice::<IpIdentity>(&v).unwrap(), ip);
        }
        e => panic!("{e:?}"),
    }
    let nodes = watcher.nodes().await.unwrap();
    assert_eq!(nodes.len(), 1);
    assert_eq!(
        nodes[0].tunnel_endpoint(),
        Some(Ipv4Addr::new(192, 168, 77, 2))
    );

    // The agent dies: its lease is no longer renewed (the client's runtime
    // tasks go with it), and its keys expire.
    drop(dying);
    let gone = tokio::time::timeout(Duration::from_secs(15), events.recv())
        .await
        .expect("the address expires with its node's lease");
    assert_eq!(gone, Some(Event::Delete(key)));
    assert!(
        eventually(Duration::from_secs(5), async || watcher
            .nodes()
            .await
            .unwrap()
            .is_empty())
        .await
    );
    let refs = watcher
        .list(&keys::identity_values(&keys::labels(&labels("web"))))
        .await
        .unwrap();
    assert!(
        refs.entries.is_empty(),
        "its identity references expire too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreferenced_identities_are_collected_on_the_second_look() {
    let c = etcd();
    let a = connect(&c, "a", Duration::from_secs(30)).await;
    let b = connect(&c, "b", Duration::from_secs(30)).await;
    let kept = a.acquire_identity(&labels("kept")).await.unwrap();
    let dropped = a.acquire_identity(&labels("dropped")).await.unwrap();
    assert_eq!(
        b.acquire_identity(&labels("dropped")).await.unwrap(),
        dropped
    );
    a.release_identity(&labels("dropped")).await.unwrap();
    let mut marked = BTreeSet::new();
    assert!(
        a.gc_identities(&mut marked).await.unwrap().is_empty(),
        "b still holds it"
    );
    b.release_identity(&labels("dropped")).await.unwrap();
    assert!(
        a.gc_identities(&mut marked).await.unwrap().is_empty(),
        "first seen unreferenced: marked only"
    );
    assert_eq!(marked, BTreeSet::from([dropped]));
    assert_eq!(a.gc_identities(&mut marked).await.unwrap(), vec![dropped]);
    let left = a.identities().await.unwrap();
    assert!(left.contains_key(&kept) && !left.contains_key(&dropped));
    // The number is free again; the kept labels keep theirs.
    assert_eq!(b.acquire_identity(&labels("kept")).await.unwrap(), kept);
    assert_eq!(b.acquire_identity(&labels("new")).await.unwrap(), dropped);
    // Released and taken again before any collection: the same number
    // (its master key is reused, not a second one made).
    b.release_identity(&labels("new")).await.unwrap();
    assert_eq!(a.acquire_identity(&labels("new")).await.unwrap(), dropped);
    assert_eq!(
        a.identities()
            .await
            .unwrap()
            .values()
            .filter(|l| l.contains("app=new;"))
            .count(),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clean_close_removes_owned_keys_at_once_and_bad_values_are_errors() {
    let c = etcd();
    let a = connect(&c, "a", Duration::from_secs(600)).await;
    let b = connect(&c, "b", Duration::from_secs(600)).await;
    a.put_owned(&keys::node("lab", "a"), "{not json")
        .await
        .unwrap();
    let err = b.nodes().await.unwrap_err().to_string();
    assert!(err.starts_with("cilium/state/nodes/v1/lab/a: "), "{err}");
    a.close().await.unwrap();
    assert!(
        b.nodes().await.unwrap().is_empty(),
        "revoked with the lease"
    );
    assert!(b.is_alive());
    assert_eq!(b.status().await.unwrap(), "3.4.23");
}

/// Three members: one lost, the cluster keeps allocating (a quorum of two)
/// and clients fail over to the members left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_member_cluster_survives_the_loss_of_one() {
    let dir = std::env::temp_dir().join(test_support::unique_name("fibril-etcd3-"));
    std::fs::create_dir_all(&dir).unwrap();
    struct Dir(std::path::PathBuf);
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _dir = Dir(dir.clone());
    let mut members = Etcd::cluster(&dir, 3).unwrap();
    let endpoints: Vec<String> = members.iter().map(|m| m.endpoint()).collect();
    let a = Kvstore::connect(&endpoints, "lab", "a", Duration::from_secs(30))
        .await
        .unwrap();
    let web = a.acquire_identity(&labels("web")).await.unwrap();
    // The first member goes (the one clients are likeliest to use).
    members.remove(0).stop();
    // Connecting (a lease needs a leader) may wait out an election, as an
    // agent's reconnect loop does.
    let mut b = None;
    let start = Instant::now();
    while b.is_none() && start.elapsed() < Duration::from_secs(20) {
        b = Kvstore::connect(&endpoints, "lab", "b", Duration::from_secs(30))
            .await
            .ok();
    }
    let b = b.expect("a member left to connect to");
    assert!(
        eventually(Duration::from_secs(15), async || b
            .acquire_identity(&labels("web"))
            .await
            .is_ok_and(|id| id == web))
        .await,
        "the same number from the members left"
    );
    let db = b.acquire_identity(&labels("db")).await.unwrap();
    assert_ne!(db, web);
    // A third node joining now sees both, with their numbers.
    let c = Kvstore::connect(&endpoints, "lab", "c", Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(c.acquire_identity(&labels("db")).await.unwrap(), db);
    assert_eq!(c.acquire_identity(&labels("web")).await.unwrap(), web);
}
