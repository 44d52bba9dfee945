//! The nodes the relay serves: found through an agent's `peer.Peer/Notify`
//! (and followed as they join and leave) or given statically, each with a
//! lazily connected gRPC channel (a node that is down fails its calls; it
//! never stops the relay).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use proto::observer::observer_client::ObserverClient;
use proto::peer::peer_client::PeerClient;
use proto::peer::{ChangeNotificationType, NotifyRequest};
use tonic::transport::{Channel, Endpoint};

/// The largest message a node may send (a flow with long label lists and
/// L7 detail stays far below).
const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// One node as the relay knows it.
#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    pub address: String,
    pub client: ObserverClient<Channel>,
}

/// The relay's nodes, by name.
pub struct Peers {
    nodes: Mutex<BTreeMap<String, Node>>,
    dial_timeout: Duration,
}

impl Peers {
    pub fn new(dial_timeout: Duration) -> Arc<Self> {
        Arc::new(Peers {
            nodes: Mutex::new(BTreeMap::new()),
            dial_timeout,
        })
    }

    /// Adds node `name` at `address` (`host:port`), or moves it there.
    pub fn upsert(&self, name: &str, address: &str) -> anyhow::Result<()> {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        if nodes.get(name).is_some_and(|n| n.address == address) {
            return Ok(());
        }
        let channel = endpoint(address, self.dial_timeout)?.connect_lazy();
        tracing::info!(node = name, address, "peer added");
        nodes.insert(
            name.to_string(),
            Node {
                name: name.to_string(),
                address: address.to_string(),
                client: ObserverClient::new(channel).max_decoding_message_size(MAX_MESSAGE_BYTES),
            },
        );
        Ok(())
    }

    pub fn remove(&self, name: &str) {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        if nodes.remove(name).is_some() {
            tracing::info!(node = name, "peer removed");
        }
    }

    /// Every node, by name.
    pub fn snapshot(&self) -> Vec<Node> {
        let nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        nodes.values().cloned().collect()
    }
}

/// A plaintext HTTP/2 endpoint for `address` (`host:port`).
fn endpoint(address: &str, dial_timeout: Duration) -> anyhow::Result<Endpoint> {
    Ok(Endpoint::from_shared(format!("http://{address}"))?
        .connect_timeout(dial_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5)))
}

/// Follows the cluster's nodes through `services` (agents' Hubble
/// addresses, tried in turn): every node an agent announces is added, a
/// deleted one removed. A broken stream is opened again, with a backoff
/// from 1 s up to 30 s.
pub async fn follow(peers: Arc<Peers>, services: Vec<String>) {
    let mut backoff = Duration::from_secs(1);
    let mut next = 0;
    loop {
        let address = &services[next % services.len()];
        next += 1;
        match notify(&peers, address).await {
            Ok(()) => backoff = Duration::from_secs(1),
            Err(e) => {
                tracing::warn!(peer_service = %address, error = %e, "peer service unavailable");
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(30));
    }
}

/// One `Notify` stream from `address`, applied until it ends.
async fn notify(peers: &Peers, address: &str) -> anyhow::Result<()> {
    let channel = endpoint(address, peers.dial_timeout)?.connect().await?;
    let mut stream = PeerClient::new(channel)
        .notify(NotifyRequest {})
        .await?
        .into_inner();
    while let Some(change) = stream.message().await? {
        match ChangeNotificationType::try_from(change.r#type) {
            Ok(ChangeNotificationType::PeerAdded | ChangeNotificationType::PeerUpdated) => {
                if let Err(e) = peers.upsert(&change.name, &change.address) {
                    tracing::warn!(node = %change.name, address = %change.address, error = %e, "peer with an unusable address; skipped");
                }
            }
            Ok(ChangeNotificationType::PeerDeleted) => peers.remove(&change.name),
            _ => {}
        }
    }
    Ok(())
}
