//! Agent events (Hubble's `flow.AgentEvent`): what the agent did, as
//! `hubble observe agent-events` shows it.

use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    AgentStarted,
    /// A policy imported or changed: its labels, revision, rule count.
    PolicyUpdated {
        labels: Vec<String>,
        revision: u64,
        rules: i64,
    },
    PolicyDeleted {
        labels: Vec<String>,
        revision: u64,
        rules: i64,
    },
    EndpointCreated {
        id: u64,
        namespace: String,
        pod: String,
        labels: Vec<String>,
    },
    EndpointDeleted {
        id: u64,
        namespace: String,
        pod: String,
        labels: Vec<String>,
    },
    /// An address mapped to an identity: a new endpoint, or an endpoint
    /// whose labels moved it to another identity (`old_identity`).
    IpcacheUpserted {
        cidr: String,
        identity: u32,
        old_identity: Option<u32>,
        namespace: String,
        pod: String,
    },
    IpcacheDeleted {
        cidr: String,
        identity: u32,
        namespace: String,
        pod: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentEvent {
    /// Unix nanoseconds.
    pub time_ns: u64,
    pub kind: Kind,
}

impl AgentEvent {
    pub fn now(kind: Kind) -> Self {
        let time_ns = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        Self { time_ns, kind }
    }

    /// Hubble's `flow.AgentEventType` name.
    pub fn type_name(&self) -> &'static str {
        match self.kind {
            Kind::AgentStarted => "AGENT_STARTED",
            Kind::PolicyUpdated { .. } => "POLICY_UPDATED",
            Kind::PolicyDeleted { .. } => "POLICY_DELETED",
            Kind::EndpointCreated { .. } => "ENDPOINT_CREATED",
            Kind::EndpointDeleted { .. } => "ENDPOINT_DELETED",
            Kind::IpcacheUpserted { .. } => "IPCACHE_UPSERTED",
            Kind::IpcacheDeleted { .. } => "IPCACHE_DELETED",
        }
    }
}
