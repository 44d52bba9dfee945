//! Which policies select each identity, per direction: what the map says
//! of a drop no rule allowed ("default deny, selected by ..."), which
//! Hubble's flows do not carry. Asked of the agents' control sockets
//! (their endpoint lists), every few seconds while a page is open.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// The policies selecting an identity: (ingress, egress).
pub type Selecting = (Vec<String>, Vec<String>);

/// Identity -> its selecting policies.
#[derive(Clone, Debug, Default)]
pub struct Selection(Arc<HashMap<u32, Selecting>>);

impl From<HashMap<u32, Selecting>> for Selection {
    fn from(m: HashMap<u32, Selecting>) -> Selection {
        Selection(Arc::new(m))
    }
}

impl Selection {
    pub fn ingress(&self, identity: u32) -> Vec<String> {
        self.0
            .get(&identity)
            .map(|(i, _)| i.clone())
            .unwrap_or_default()
    }

    pub fn egress(&self, identity: u32) -> Vec<String> {
        self.0
            .get(&identity)
            .map(|(_, e)| e.clone())
            .unwrap_or_default()
    }
}

/// The latest selection, shared by every session.
#[derive(Clone, Default)]
pub struct Selections {
    agents: Arc<Vec<PathBuf>>,
    current: Arc<RwLock<Selection>>,
}

impl Selections {
    pub fn new(agents: Vec<PathBuf>) -> Selections {
        Selections {
            agents: Arc::new(agents),
            current: Default::default(),
        }
    }

    pub fn get(&self) -> Selection {
        self.current.read().map(|s| s.clone()).unwrap_or_default()
    }

    /// Asks every agent once. An agent that does not answer keeps what it
    /// said last (identities are the cluster's: another node may know).
    pub fn refresh(&self) {
        let mut merged: HashMap<u32, Selecting> = (*self.get().0).clone();
        for path in self.agents.iter() {
            let answer = api::Client::connect_timeout(path, Duration::from_secs(1))
                .and_then(|mut c| c.call(&api::Request::EndpointList));
            match answer {
                Ok(api::Response::Endpoints { endpoints }) => {
                    for e in endpoints {
                        merged.insert(
                            e.identity,
                            (
                                e.enforcement.ingress_selected_by,
                                e.enforcement.egress_selected_by,
                            ),
                        );
                    }
                }
                Ok(other) => tracing::debug!(agent = %path.display(), ?other, "unexpected answer"),
                Err(e) => tracing::debug!(agent = %path.display(), "no endpoint list: {e}"),
            }
        }
        if let Ok(mut cur) = self.current.write() {
            *cur = Selection(Arc::new(merged));
        }
    }

    /// Refreshes every `period` while `busy` says a page is open.
    pub async fn follow(self, period: Duration, busy: impl Fn() -> bool) {
        if self.agents.is_empty() {
            return;
        }
        loop {
            if busy() {
                let me = self.clone();
                let _ = tokio::task::spawn_blocking(move || me.refresh()).await;
            }
            tokio::time::sleep(period).await;
        }
    }
}
