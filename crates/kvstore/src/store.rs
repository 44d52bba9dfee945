//! The connection: one etcd client, one lease for everything this agent
//! owns (kept alive in the background), listing and watching prefixes.

use std::time::Duration;

use etcd_client::{
    Client, ConnectOptions, DeleteOptions, EventType, GetOptions, PutOptions, WatchOptions,
};
use tokio::sync::{mpsc, watch};

use crate::{keys, Error, IpIdentity, Node};

/// A connection to the cluster's etcd as one node's agent.
#[derive(Clone)]
pub struct Kvstore {
    pub(crate) client: Client,
    pub(crate) cluster: String,
    pub(crate) node: String,
    pub(crate) lease: i64,
    /// False once the lease could not be renewed (its keys are then gone
    /// or about to be).
    alive: watch::Receiver<bool>,
}

/// What a prefix holds at one revision.
#[derive(Debug, Default)]
pub struct Listing {
    pub revision: i64,
    pub entries: Vec<(String, Vec<u8>)>,
}

/// A change under a watched prefix.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Put(String, Vec<u8>),
    Delete(String),
}

impl Kvstore {
    /// Connects to the first of `endpoints` (`http://ip:port`) that answers
    /// and takes a lease of
    /// `lease_ttl` that every owned key is tied to, renewed every third
    /// of it until the store is dropped or `close`d.
    pub async fn connect(
        endpoints: &[String],
        cluster: &str,
        node: &str,
        lease_ttl: Duration,
    ) -> Result<Self, Error> {
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(2))
            .with_timeout(Duration::from_secs(5))
            .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5));
        // One member at a time, the first that answers: a member that is
        // down would otherwise take its share of requests and fail them.
        // A client whose member goes connects again (to another).
        let mut client = None;
        let mut last = None;
        for e in endpoints {
            let tried = async {
                let mut c = Client::connect([e], Some(options.clone())).await?;
                c.status().await?;
                Ok::<_, etcd_client::Error>(c)
            }
            .await;
            match tried {
                Ok(c) => {
                    client = Some(c);
                    break;
                }
                Err(err) => last = Some(err),
            }
        }
        let mut client = match (client, last) {
            (Some(c), _) => c,
            (None, Some(err)) => return Err(err.into()),
            (None, None) => {
                return Err(Error::Start("no etcd endpoint given".into()));
            }
        };
        let ttl = lease_ttl.as_secs().max(2) as i64;
        let lease = client.lease_grant(ttl, None).await?.id();
        let (tx, alive) = watch::channel(true);
        tokio::spawn(keep_alive(client.clone(), lease, ttl, tx));
        Ok(Kvstore {
            client,
            cluster: cluster.to_string(),
            node: node.to_string(),
            lease,
            alive,
        })
    }

    pub fn cluster(&self) -> &str {
        &self.cluster
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    /// The lease every owned key is tied to.
    pub fn lease(&self) -> i64 {
        self.lease
    }

    /// Whether the lease is still being renewed.
    pub fn is_alive(&self) -> bool {
        *self.alive.borrow()
    }

    /// Revokes the lease: every key this agent owns goes at once (a clean
    /// shutdown; a crash leaves them to expire).
    pub async fn close(mut self) -> Result<(), Error> {
        self.client.lease_revoke(self.lease).await?;
        Ok(())
    }

    /// Puts a key tied to the lease.
    pub async fn put_owned(&self, key: &str, value: impl Into<Vec<u8>>) -> Result<(), Error> {
        self.client
            .clone()
            .put(key, value, Some(PutOptions::new().with_lease(self.lease)))
            .await?;
        Ok(())
    }

    /// Puts a key that outlives the agent.
    pub async fn put(&self, key: &str, value: impl Into<Vec<u8>>) -> Result<(), Error> {
        self.client.clone().put(key, value, None).await?;
        Ok(())
    }

    /// Puts every (key, value) at once, or none (one transaction), not
    /// tied to the lease.
    pub async fn put_all(&self, items: Vec<(String, Vec<u8>)>) -> Result<(), Error> {
        let ops: Vec<etcd_client::TxnOp> = items
            .into_iter()
            .map(|(k, v)| etcd_client::TxnOp::put(k, v, None))
            .collect();
        self.client
            .clone()
            .txn(etcd_client::Txn::new().and_then(ops))
            .await?;
        Ok(())
    }

    /// Deletes `key`; whether it was there.
    pub async fn delete_existing(&self, key: &str) -> Result<bool, Error> {
        Ok(self.client.clone().delete(key, None).await?.deleted() > 0)
    }

    pub async fn delete(&self, key: &str) -> Result<(), Error> {
        self.client.clone().delete(key, None).await?;
        Ok(())
    }

    pub async fn delete_prefix(&self, prefix: &str) -> Result<(), Error> {
        self.client
            .clone()
            .delete(prefix, Some(DeleteOptions::new().with_prefix()))
            .await?;
        Ok(())
    }

    /// Everything under `prefix`, and the revision it was read at.
    pub async fn list(&self, prefix: &str) -> Result<Listing, Error> {
        let r = self
            .client
            .clone()
            .get(prefix, Some(GetOptions::new().with_prefix()))
            .await?;
        let mut entries = Vec::with_capacity(r.kvs().len());
        for kv in r.kvs() {
            entries.push((text(kv.key())?, kv.value().to_vec()));
        }
        Ok(Listing {
            revision: r.header().map_or(0, |h| h.revision()),
            entries,
        })
    }

    /// The changes under `prefix` after `revision` (a listing's), in order,
    /// until the receiver is dropped. The channel closes when the watch
    /// breaks (etcd gone, revision compacted): list and watch again.
    pub async fn watch(&self, prefix: &str, revision: i64) -> Result<mpsc::Receiver<Event>, Error> {
        let mut stream = self
            .client
            .clone()
            .watch(
                prefix,
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision + 1),
                ),
            )
            .await?;
        let (tx, rx) = mpsc::channel(1024);
        tokio::spawn(async move {
            while let Ok(Some(r)) = stream.message().await {
                if r.canceled() {
                    break;
                }
                for e in r.events() {
                    let Some(kv) = e.kv() else { continue };
                    let Ok(key) = text(kv.key()) else { continue };
                    let event = match e.event_type() {
                        EventType::Put => Event::Put(key, kv.value().to_vec()),
                        EventType::Delete => Event::Delete(key),
                    };
                    if tx.send(event).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }

    /// Registers this node (tied to the lease).
    pub async fn register_node(&self, node: &Node) -> Result<(), Error> {
        let value = serde_json::to_vec(node).expect("a node serializes");
        self.put_owned(&keys::node(&self.cluster, &node.name), value)
            .await
    }

    /// Publishes a local endpoint's address (tied to the lease).
    pub async fn put_ip(&self, ip: &IpIdentity) -> Result<(), Error> {
        let value = serde_json::to_vec(ip).expect("an address serializes");
        self.put_owned(&keys::ip(&self.cluster, ip.ip), value).await
    }

    pub async fn delete_ip(&self, ip: std::net::Ipv4Addr) -> Result<(), Error> {
        self.delete(&keys::ip(&self.cluster, ip)).await
    }

    /// The cluster's nodes.
    pub async fn nodes(&self) -> Result<Vec<Node>, Error> {
        let listing = self.list(&keys::nodes_of(&self.cluster)).await?;
        listing
            .entries
            .iter()
            .map(|(k, v)| crate::types::decode(k, v))
            .collect()
    }

    /// etcd's health as this client sees it: the member's version.
    pub async fn status(&self) -> Result<String, Error> {
        Ok(self.client.clone().status().await?.version().to_string())
    }
}

fn text(key: &[u8]) -> Result<String, Error> {
    String::from_utf8(key.to_vec()).map_err(|_| Error::BadValue {
        key: String::from_utf8_lossy(key).into_owned(),
        why: "key is not UTF-8".into(),
    })
}

/// Renews `lease` every third of its TTL; says so on `alive` when it
/// cannot (etcd unreachable past the TTL, or the lease gone).
async fn keep_alive(mut client: Client, lease: i64, ttl: i64, alive: watch::Sender<bool>) {
    let every = Duration::from_millis((ttl as u64 * 1000) / 3);
    let mut last_ok = tokio::time::Instant::now();
    loop {
        if alive.is_closed() {
            return;
        }
        let renewed = async {
            let (mut keeper, mut stream) = client.lease_keep_alive(lease).await?;
            keeper.keep_alive().await?;
            Ok::<_, etcd_client::Error>(stream.message().await?.map(|r| r.ttl()))
        }
        .await;
        match renewed {
            Ok(Some(t)) if t > 0 => last_ok = tokio::time::Instant::now(),
            Ok(_) => {
                // The lease expired: its keys are gone.
                tracing::warn!(lease, "kvstore lease expired");
                alive.send_replace(false);
                return;
            }
            Err(e) => {
                tracing::warn!(lease, error = %e, "kvstore lease renewal failed");
                if last_ok.elapsed() > Duration::from_secs(ttl as u64) {
                    alive.send_replace(false);
                }
            }
        }
        tokio::time::sleep(every).await;
    }
}
