//! The agent's observer as the backend of the Hubble gRPC server.

use std::sync::Arc;
use std::time::Duration;

use crate::Agent;

pub struct HubbleBackend {
    pub agent: Arc<Agent>,
    /// The address peers reach this node's observer at.
    pub address: String,
}

impl hubble::server::Backend for HubbleBackend {
    fn oldest_seq(&self) -> u64 {
        self.agent.observer.flows().oldest_seq()
    }

    fn next_seq(&self) -> u64 {
        self.agent.observer.flows().next_seq()
    }

    fn read(&self, seq: u64, wait: Duration) -> (u64, Vec<Arc<hubble::entry::FlowEntry>>, u64) {
        self.agent.observer.read(seq, wait)
    }

    fn agent_events(&self) -> &flow::ring::Shared<Arc<flow::agent_event::AgentEvent>> {
        self.agent.observer.agent_events()
    }

    fn counters(&self) -> (u64, u64, u64, u64) {
        let (len, cap, seen) = self.agent.observer.flows().counts();
        (
            len as u64,
            cap as u64,
            seen,
            self.agent.uptime().as_nanos() as u64,
        )
    }

    fn kernel_lost(&self) -> u64 {
        self.agent.datapath().events_lost()
    }

    fn count_lost(&self, n: u64) {
        self.agent.observer.metrics.lost("HUBBLE_RING_BUFFER", n);
    }

    fn node_name(&self) -> String {
        self.agent.config().node_name.clone()
    }

    fn address(&self) -> String {
        self.address.clone()
    }

    fn cluster_peers(
        &self,
    ) -> Option<tokio::sync::watch::Receiver<std::collections::BTreeMap<String, String>>> {
        self.agent.cluster().map(|c| c.peers())
    }
}
