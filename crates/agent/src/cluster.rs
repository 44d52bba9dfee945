//! The cluster (kvstore mode, `--kvstore`): this node's connection to the
//! cluster's etcd, kept on a runtime of its own. Policies are the
//! cluster's: an import or delete is written to etcd (all of a file's
//! policies in one transaction) and every node applies what it watches
//! under `fibril/state/policies/v1/`, listing again after any break, so a
//! node that was away converges. While etcd is unreachable the node keeps
//! the policies it last had (persisted in its state) and enforces them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kvstore::{keys, Event, Kvstore};
use tokio::sync::watch;

use crate::control::Control;
use crate::observer::Observer;
use crate::{invalid, Error};

/// Where the cluster's etcd is and how long this node's keys outlive it.
#[derive(Clone, Debug)]
pub struct KvstoreConfig {
    /// `http://ip:port` of each etcd member.
    pub endpoints: Vec<String>,
    /// The lease every key this node owns is tied to (Cilium: 15 min).
    pub lease_ttl: Duration,
}

pub struct Cluster {
    rt: tokio::runtime::Runtime,
    /// The live connection, `None` while there is none.
    kv: watch::Receiver<Option<Kvstore>>,
}

/// How long a caller (an import) waits for a connection before it is told
/// the kvstore is unreachable.
const CONNECT_WAIT: Duration = Duration::from_secs(3);
/// Between attempts to (re)connect.
const RETRY: Duration = Duration::from_secs(1);

impl Cluster {
    /// Starts connecting (and keeps at it) in the background.
    pub fn start(
        config: KvstoreConfig,
        cluster: &str,
        node: &str,
        control: Arc<Control>,
        observer: Arc<Observer>,
    ) -> Result<Arc<Self>, Error> {
        if config.endpoints.is_empty() {
            return Err(invalid("--kvstore: no etcd endpoint given"));
        }
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("fibril-kvstore")
            .enable_all()
            .build()
            .map_err(|e| invalid(format!("kvstore runtime: {e}")))?;
        let (tx, kv) = watch::channel(None);
        let (cluster, node) = (cluster.to_string(), node.to_string());
        rt.spawn(async move {
            loop {
                match Kvstore::connect(&config.endpoints, &cluster, &node, config.lease_ttl).await {
                    Ok(kv) => {
                        tracing::info!(endpoints = ?config.endpoints, "kvstore connected");
                        tx.send_replace(Some(kv.clone()));
                        if let Err(e) = follow_policies(&kv, &control, &observer).await {
                            tracing::warn!(error = %e, "kvstore: watching policies");
                        }
                        tx.send_replace(None);
                    }
                    Err(e) => tracing::warn!(error = %e, "kvstore unreachable"),
                }
                tokio::time::sleep(RETRY).await;
            }
        });
        Ok(Arc::new(Cluster { rt, kv }))
    }

    /// The connection, waiting a little for one.
    fn kv(&self) -> Result<Kvstore, Error> {
        let mut kv = self.kv.clone();
        self.rt
            .block_on(async {
                tokio::time::timeout(CONNECT_WAIT, kv.wait_for(Option::is_some))
                    .await
                    .ok()
                    .and_then(|r| r.ok().and_then(|k| k.clone()))
            })
            .ok_or_else(|| Error::Unavailable("the kvstore (etcd) is not reachable".into()))
    }

    /// Writes `policies` to the cluster, all or none.
    pub fn put_policies(&self, policies: &[policy::Policy]) -> Result<(), Error> {
        let kv = self.kv()?;
        let items = policies
            .iter()
            .map(|p| {
                let value = serde_json::to_vec(p).expect("a policy serializes");
                (keys::policy(&p.key()), value)
            })
            .collect();
        self.rt
            .block_on(kv.put_all(items))
            .map_err(|e| Error::Unavailable(format!("writing to the kvstore: {e}")))
    }

    /// Deletes a policy from the cluster; whether it was there.
    pub fn delete_policy(&self, key: &str) -> Result<bool, Error> {
        let kv = self.kv()?;
        self.rt
            .block_on(kv.delete_existing(&keys::policy(key)))
            .map_err(|e| Error::Unavailable(format!("writing to the kvstore: {e}")))
    }

    /// Whether this node is connected now.
    pub fn connected(&self) -> bool {
        self.kv.borrow().is_some()
    }
}

/// Lists the cluster's policies, makes this node's the same, then applies
/// each change it watches; returns when the watch or the lease breaks.
async fn follow_policies(
    kv: &Kvstore,
    control: &Control,
    observer: &Observer,
) -> Result<(), Error> {
    let unavailable = |e: kvstore::Error| Error::Unavailable(format!("kvstore: {e}"));
    let listing = kv.list(keys::POLICIES).await.map_err(unavailable)?;
    let mut cluster: BTreeMap<String, policy::Policy> = BTreeMap::new();
    for (key, value) in &listing.entries {
        if let Some(p) = decode(key, value) {
            cluster.insert(p.key(), p);
        }
    }
    let (put, remove) = {
        let s = control.lock();
        let put: Vec<policy::Policy> = cluster
            .values()
            .filter(|p| s.policies().get(&p.key()) != Some(*p))
            .cloned()
            .collect();
        let remove: Vec<String> = s
            .policies()
            .keys()
            .filter(|k| !cluster.contains_key(*k))
            .cloned()
            .collect();
        (put, remove)
    };
    if !put.is_empty() || !remove.is_empty() {
        tracing::info!(
            put = put.len(),
            removed = remove.len(),
            "policies synchronised with the cluster"
        );
        crate::policies::apply(control, observer, put, remove)?;
    }
    let mut events = kv
        .watch(keys::POLICIES, listing.revision)
        .await
        .map_err(unavailable)?;
    let mut lease = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            event = events.recv() => {
                let Some(event) = event else { return Ok(()) };
                let (put, remove) = match event {
                    Event::Put(key, value) => match decode(&key, &value) {
                        Some(p) if control.lock().policies().get(&p.key()) != Some(&p) => (vec![p], vec![]),
                        _ => continue,
                    },
                    Event::Delete(key) => match key.strip_prefix(keys::POLICIES) {
                        Some(k) if control.lock().policies().contains_key(k) => (vec![], vec![k.to_string()]),
                        _ => continue,
                    },
                };
                crate::policies::apply(control, observer, put, remove)?;
            }
            _ = lease.tick() => {
                if !kv.is_alive() {
                    return Ok(());
                }
            }
        }
    }
}

/// A policy as another node wrote it; one that does not decode is skipped
/// and said so (it changes nothing here).
fn decode(key: &str, value: &[u8]) -> Option<policy::Policy> {
    match serde_json::from_slice::<policy::Policy>(value) {
        Ok(p) if keys::policy(&p.key()) == key => Some(p),
        Ok(p) => {
            tracing::warn!(key, policy = %p.key(), "kvstore: a policy under another policy's key; skipped");
            None
        }
        Err(e) => {
            tracing::warn!(key, error = %e, "kvstore: a policy that does not decode; skipped");
            None
        }
    }
}
