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
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// The largest message a node may send (a flow with long label lists and
/// L7 detail stays far below).
pub const MAX_MESSAGE_BYTES: usize = 16 << 20;

/// One node as the relay knows it.
#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    pub address: String,
    /// Its connection (lazy: made at the first call, again after a loss).
    pub channel: Channel,
}

impl Node {
    /// The generated client over the node's connection.
    pub fn client(&self) -> ObserverClient<Channel> {
        ObserverClient::new(self.channel.clone()).max_decoding_message_size(MAX_MESSAGE_BYTES)
    }
}

/// TLS to the nodes' Hubble servers: the CAs their certificates chain to,
/// and the relay's own certificate when they ask for one (mTLS).
#[derive(Clone, Debug)]
pub struct ClientTls {
    pub ca_pem: Vec<u8>,
    /// (certificate, key), PEM.
    pub identity: Option<(Vec<u8>, Vec<u8>)>,
}

impl ClientTls {
    /// Checks the server's certificate against the CAs and `server_name`;
    /// presents the relay's own when there is one.
    fn config(&self, server_name: &str) -> ClientTlsConfig {
        let mut config = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(&self.ca_pem))
            .domain_name(server_name);
        if let Some((cert, key)) = &self.identity {
            config = config.identity(Identity::from_pem(cert, key));
        }
        config
    }
}

/// The relay's nodes, by name.
pub struct Peers {
    nodes: Mutex<BTreeMap<String, Node>>,
    dial_timeout: Duration,
    tls: Option<ClientTls>,
}

impl Peers {
    pub fn new(dial_timeout: Duration) -> Arc<Self> {
        Self::with_tls(dial_timeout, None)
    }

    /// Nodes reached over TLS (`tls`), each checked against the name
    /// Hubble gives its server (`server_name`).
    pub fn with_tls(dial_timeout: Duration, tls: Option<ClientTls>) -> Arc<Self> {
        Arc::new(Peers {
            nodes: Mutex::new(BTreeMap::new()),
            dial_timeout,
            tls,
        })
    }

    /// Adds node `name` at `address` (`host:port`), or moves it there.
    pub fn upsert(&self, name: &str, address: &str) -> anyhow::Result<()> {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        if nodes.get(name).is_some_and(|n| n.address == address) {
            return Ok(());
        }
        let channel = match &self.tls {
            None => endpoint("http", address, self.dial_timeout)?,
            Some(tls) => endpoint("https", address, self.dial_timeout)?
                .tls_config(tls.config(&server_name(name)))?,
        }
        .connect_lazy();
        tracing::info!(node = name, address, "peer added");
        nodes.insert(
            name.to_string(),
            Node {
                name: name.to_string(),
                address: address.to_string(),
                channel,
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

    /// Whether the nodes are reached over TLS.
    pub fn tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Every node, by name.
    pub fn snapshot(&self) -> Vec<Node> {
        let nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        nodes.values().cloned().collect()
    }
}

/// The name a node's Hubble server certificate carries, as Hubble's:
/// `<node>.<cluster>.hubble-grpc.cilium.io`, the node's dots made dashes
/// (peer names are `cluster/node`; a bare name is of cluster `default`).
pub fn server_name(peer: &str) -> String {
    let (cluster, node) = peer.split_once('/').unwrap_or(("default", peer));
    format!("{}.{cluster}.hubble-grpc.cilium.io", node.replace('.', "-"))
}

/// An HTTP/2 endpoint for `address` (`host:port`), `scheme` `http` or
/// `https` (the caller adds the TLS settings).
fn endpoint(scheme: &str, address: &str, dial_timeout: Duration) -> anyhow::Result<Endpoint> {
    Ok(Endpoint::from_shared(format!("{scheme}://{address}"))?
        .connect_timeout(dial_timeout)
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5)))
}

/// Follows the cluster's nodes through `services` (agents' Hubble
/// addresses): every node an agent announces is added, a deleted one
/// removed. Each round tries the addresses in turn until one streams; a
/// round where none could is followed by a backoff from 1 s up to 30 s
/// (so an address that never works, a DNS name without cluster DNS, never
/// delays the one that does).
pub async fn follow(peers: Arc<Peers>, services: Vec<String>, cluster: String) {
    let mut backoff = Duration::from_secs(1);
    loop {
        let mut streamed = false;
        for address in &services {
            match notify(&peers, address, &cluster).await {
                Ok(()) => {
                    streamed = true;
                    break;
                }
                Err(e) => {
                    // The whole chain: tonic's own text is only
                    // "transport error", the cause (refused, TLS) below it.
                    tracing::warn!(peer_service = %address, error = %format_args!("{e:#}"), "peer service unavailable");
                }
            }
        }
        if streamed {
            backoff = Duration::from_secs(1);
        }
        tokio::time::sleep(backoff).await;
        if !streamed {
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }
}

/// The name the peer service's certificate is checked against, as Hubble
/// Relay's: the service `hubble-peer` of the cluster, which an agent's
/// certificate (`*.<cluster>.hubble-grpc.cilium.io`) carries.
pub fn peer_service_server_name(cluster: &str) -> String {
    server_name(&format!("{cluster}/hubble-peer"))
}

/// One `Notify` stream from `address`, applied until it ends; over TLS
/// (with the relay's certificate when it has one) when the nodes are.
async fn notify(peers: &Peers, address: &str, cluster: &str) -> anyhow::Result<()> {
    let endpoint = match &peers.tls {
        None => endpoint("http", address, peers.dial_timeout)?,
        Some(tls) => endpoint("https", address, peers.dial_timeout)?
            .tls_config(tls.config(&peer_service_server_name(cluster)))?,
    };
    let channel = endpoint.connect().await?;
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

#[cfg(test)]
mod tests {
    #[test]
    fn server_names_are_hubbles() {
        assert_eq!(
            super::server_name("prod/node-1.example"),
            "node-1-example.prod.hubble-grpc.cilium.io"
        );
        assert_eq!(
            super::server_name("kind-worker"),
            "kind-worker.default.hubble-grpc.cilium.io"
        );
        assert_eq!(
            super::peer_service_server_name("prod"),
            "hubble-peer.prod.hubble-grpc.cilium.io"
        );
    }
}
