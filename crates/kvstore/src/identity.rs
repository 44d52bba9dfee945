//! Cluster-wide security identities, allocated as Cilium's kvstore
//! allocator does: under a per-label-set lock (held with the agent's
//! lease), an existing identity is found by its nodes' references
//! (`value/<labels>/<node>`), or else by a master key (`id/<id>`) of the
//! same labels that no node references yet; else a free number is claimed
//! by creating its master key only if it does not exist (a transaction),
//! so two nodes can never take one number, and the same labels get the
//! same number on every node.

use std::collections::{BTreeMap, BTreeSet};

use etcd_client::{Compare, CompareOp, GetOptions, LockOptions, PutOptions, Txn, TxnOp};
use policy::LabelSet;

use crate::{keys, Error, Kvstore};

/// Cluster-local identities (Cilium: 256-65535 without a cluster id).
pub const FIRST: u32 = 256;
pub const LAST: u32 = 65535;

impl Kvstore {
    /// The cluster-wide identity of `labels`, with this node's reference
    /// on it (tied to the lease: a node that goes away drops its
    /// references).
    pub async fn acquire_identity(&self, labels: &LabelSet) -> Result<u32, Error> {
        let text = keys::labels(labels);
        let mut client = self.client.clone();
        let lock = client
            .lock(
                keys::identity_lock(&text),
                Some(LockOptions::new().with_lease(self.lease)),
            )
            .await?;
        let result = self.acquire_locked(&text).await;
        // A failed unlock leaves the lock to the lease.
        if let Err(e) = client.unlock(lock.key().to_vec()).await {
            tracing::warn!(error = %e, "kvstore unlock failed");
        }
        result
    }

    async fn acquire_locked(&self, text: &str) -> Result<u32, Error> {
        let mut client = self.client.clone();
        let mine = keys::identity_value(text, &self.node);
        // Someone's reference names the identity.
        let refs = client
            .get(
                keys::identity_values(text),
                Some(GetOptions::new().with_prefix()),
            )
            .await?;
        let existing = match refs.kvs().first() {
            Some(kv) => {
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                Some(parse_id(&key, kv.value())?)
            }
            None => None,
        };
        // Referenced by a node, else a master of these labels no node
        // references (yet to be collected): that number again. Every
        // master is read only when no node references the labels.
        let masters = match existing {
            Some(_) => Vec::new(),
            None => self.list(keys::IDENTITY_IDS).await?.entries,
        };
        let reuse = existing.or_else(|| {
            masters
                .iter()
                .find(|(_, v)| v.as_slice() == text.as_bytes())
                .and_then(|(k, _)| keys::id_of(k))
        });
        if let Some(id) = reuse {
            let master = keys::identity_id(id);
            // Only while its master key stands, and touched (rewritten as
            // it is) so that a collection that saw it unreferenced fails
            // its own transaction instead of deleting it under this
            // reference.
            let r = client
                .txn(
                    Txn::new()
                        .when([Compare::value(master.clone(), CompareOp::Equal, text)])
                        .and_then([
                            TxnOp::put(master, text, None),
                            TxnOp::put(
                                mine.clone(),
                                id.to_string(),
                                Some(PutOptions::new().with_lease(self.lease)),
                            ),
                        ]),
                )
                .await?;
            if r.succeeded() {
                return Ok(id);
            }
        }
        // A new number: the lowest free ones first, each claimed only if
        // its master key does not exist.
        let masters = match masters.is_empty() {
            true => self.list(keys::IDENTITY_IDS).await?.entries,
            false => masters,
        };
        let used: BTreeSet<u32> = masters.iter().filter_map(|(k, _)| keys::id_of(k)).collect();
        let mut candidate = FIRST;
        loop {
            while used.contains(&candidate) {
                candidate += 1;
            }
            if candidate > LAST {
                return Err(Error::Exhausted);
            }
            let master = keys::identity_id(candidate);
            let r = client
                .txn(
                    Txn::new()
                        .when([Compare::create_revision(
                            master.clone(),
                            CompareOp::Equal,
                            0,
                        )])
                        .and_then([
                            TxnOp::put(master, text, None),
                            TxnOp::put(
                                mine.clone(),
                                candidate.to_string(),
                                Some(PutOptions::new().with_lease(self.lease)),
                            ),
                        ]),
                )
                .await?;
            if r.succeeded() {
                return Ok(candidate);
            }
            // Taken meanwhile by another label set: the next one.
            candidate += 1;
        }
    }

    /// Drops this node's reference on the identity of `labels`.
    pub async fn release_identity(&self, labels: &LabelSet) -> Result<(), Error> {
        self.delete(&keys::identity_value(&keys::labels(labels), &self.node))
            .await
    }

    /// Every identity's number and labels (as Cilium writes them).
    pub async fn identities(&self) -> Result<BTreeMap<u32, String>, Error> {
        Ok(self
            .list(keys::IDENTITY_IDS)
            .await?
            .entries
            .into_iter()
            .filter_map(|(k, v)| Some((keys::id_of(&k)?, String::from_utf8(v).ok()?)))
            .collect())
    }

    /// Deletes identities no node references (Cilium's operator does this):
    /// an identity is deleted when it was unreferenced at the previous run
    /// too (`marked`, carried between runs), so one just allocated is never
    /// taken. Returns the deleted numbers.
    pub async fn gc_identities(&self, marked: &mut BTreeSet<u32>) -> Result<Vec<u32>, Error> {
        let mut client = self.client.clone();
        // Keys and revisions are all it needs: not the labels again.
        let masters = client
            .get(
                keys::IDENTITY_IDS,
                Some(GetOptions::new().with_prefix().with_keys_only()),
            )
            .await?;
        let referenced: BTreeSet<u32> = self
            .list(keys::IDENTITY_VALUES)
            .await?
            .entries
            .iter()
            .filter_map(|(k, v)| parse_id(k, v).ok())
            .collect();
        let mut deleted = Vec::new();
        let mut unreferenced = BTreeSet::new();
        for kv in masters.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let Some(id) = keys::id_of(&key) else {
                continue;
            };
            if referenced.contains(&id) {
                continue;
            }
            if !marked.contains(&id) {
                unreferenced.insert(id);
                continue;
            }
            // Unchanged since it was read: no one re-created it meanwhile.
            let r = client
                .txn(
                    Txn::new()
                        .when([Compare::mod_revision(
                            key.clone(),
                            CompareOp::Equal,
                            kv.mod_revision(),
                        )])
                        .and_then([TxnOp::delete(key, None)]),
                )
                .await?;
            if r.succeeded() {
                deleted.push(id);
            }
        }
        *marked = unreferenced;
        Ok(deleted)
    }
}

fn parse_id(key: &str, value: &[u8]) -> Result<u32, Error> {
    std::str::from_utf8(value)
        .ok()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Error::BadValue {
            key: key.to_string(),
            why: "not an identity number".into(),
        })
}
