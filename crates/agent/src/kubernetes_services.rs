//! Kubernetes mode: Services and their EndpointSlices from the API server
//! into the node's services (`k8s::service::to_api`), which `lb_sync`
//! writes into the datapath's load balancer. Two kube-rs watchers (list,
//! then watch; a broken watch or 410 Gone lists again with backoff) feed
//! one task. Nothing is replaced until both kinds have been listed once,
//! so the services the node had before (its state log) stay in force while
//! the API server is away; after every (re)list the node's services are
//! made the list's. Each event then recomputes only its service; the
//! events already waiting are taken together, one commit for them all (a
//! burst of 10,000 new services is a few commits, not 10,000).

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::Arc;

use futures::{FutureExt, TryStreamExt};
use k8s::kube::api::Api;
use k8s::kube::runtime::watcher::{self, Event};
use k8s::kube::runtime::WatchStreamExt;
use k8s::kube::Client;
use k8s_openapi::api::core::v1::Service;
use k8s_openapi::api::discovery::v1::EndpointSlice;

use crate::control::Control;

/// One watcher's event (boxed: the objects are large).
enum Change {
    Service(Box<Event<Service>>),
    Slice(Box<Event<EndpointSlice>>),
}

pub struct ServiceFollower {
    control: Arc<Control>,
    services: BTreeMap<String, Service>,
    /// By service key, then slice name.
    slices: BTreeMap<String, BTreeMap<String, EndpointSlice>>,
    listing_services: Vec<Service>,
    listing_slices: Vec<EndpointSlice>,
    services_listed: bool,
    slices_listed: bool,
    /// Taken but not committed: a (re)list, services changed since.
    relisted: bool,
    changed: BTreeSet<String>,
}

/// The most waiting events taken into one commit.
const BATCH: usize = 4096;

impl ServiceFollower {
    pub fn new(control: Arc<Control>) -> Self {
        ServiceFollower {
            control,
            services: BTreeMap::new(),
            slices: BTreeMap::new(),
            listing_services: Vec::new(),
            listing_slices: Vec::new(),
            services_listed: false,
            slices_listed: false,
            relisted: false,
            changed: BTreeSet::new(),
        }
    }

    pub async fn run(mut self, client: Client) {
        let services = watcher::watcher(Api::<Service>::all(client.clone()), Default::default())
            .default_backoff()
            .map_ok(|e| Change::Service(Box::new(e)));
        let slices = watcher::watcher(Api::<EndpointSlice>::all(client), Default::default())
            .default_backoff()
            .map_ok(|e| Change::Slice(Box::new(e)));
        let stream = futures::stream::select(services, slices);
        futures::pin_mut!(stream);
        loop {
            match stream.try_next().await {
                Ok(Some(change)) => self.take(change),
                Ok(None) => return,
                Err(e) => tracing::warn!(error = %e, "Kubernetes watch (services)"),
            }
            // What else is waiting goes into the same commit.
            for _ in 1..BATCH {
                match stream.try_next().now_or_never() {
                    Some(Ok(Some(change))) => self.take(change),
                    Some(Ok(None)) => break,
                    Some(Err(e)) => tracing::warn!(error = %e, "Kubernetes watch (services)"),
                    None => break,
                }
            }
            self.flush();
        }
    }

    fn take(&mut self, change: Change) {
        let change = match change {
            Change::Service(e) => Ok(*e),
            Change::Slice(e) => Err(*e),
        };
        match change {
            Ok(Event::Init) => self.listing_services.clear(),
            Ok(Event::InitApply(s)) => self.listing_services.push(s),
            Ok(Event::InitDone) => {
                self.services = std::mem::take(&mut self.listing_services)
                    .into_iter()
                    .map(|s| (k8s::service::key(&s), s))
                    .collect();
                self.services_listed = true;
                self.relisted = true;
            }
            Ok(Event::Apply(s)) => {
                let key = k8s::service::key(&s);
                self.services.insert(key.clone(), s);
                self.changed.insert(key);
            }
            Ok(Event::Delete(s)) => {
                let key = k8s::service::key(&s);
                self.services.remove(&key);
                self.changed.insert(key);
            }
            Err(Event::Init) => self.listing_slices.clear(),
            Err(Event::InitApply(s)) => self.listing_slices.push(s),
            Err(Event::InitDone) => {
                self.slices.clear();
                for s in std::mem::take(&mut self.listing_slices) {
                    self.put_slice(s);
                }
                self.slices_listed = true;
                self.relisted = true;
            }
            Err(Event::Apply(s)) => {
                if let Some(key) = self.put_slice(s) {
                    self.changed.insert(key);
                }
            }
            Err(Event::Delete(s)) => {
                let Some(key) = k8s::service::slice_service_key(&s) else {
                    return;
                };
                let name = s.metadata.name.clone().unwrap_or_default();
                if let Some(m) = self.slices.get_mut(&key) {
                    m.remove(&name);
                }
                self.changed.insert(key);
            }
        }
    }

    /// Files a slice under its service; the service's key.
    fn put_slice(&mut self, s: EndpointSlice) -> Option<String> {
        let key = k8s::service::slice_service_key(&s)?;
        let name = s.metadata.name.clone().unwrap_or_default();
        self.slices.entry(key.clone()).or_default().insert(name, s);
        Some(key)
    }

    fn model(&self, key: &str) -> Option<api::Service> {
        let svc = self.services.get(key)?;
        let slices = self.slices.get(key).into_iter().flat_map(|m| m.values());
        let model = k8s::service::to_api(svc, slices)?;
        match model.validate() {
            Ok(()) => Some(model),
            Err(e) => {
                tracing::warn!(service = %key, error = %e, "service not balanced");
                None
            }
        }
    }

    /// Brings what was taken into the node's services, in one commit: after
    /// a (re)list of either kind, once both were listed, the list's
    /// services; else the changed ones.
    fn flush(&mut self) {
        if !(self.services_listed && self.slices_listed) {
            return;
        }
        let changed = std::mem::take(&mut self.changed);
        if std::mem::take(&mut self.relisted) {
            self.replace_all();
            return;
        }
        if changed.is_empty() {
            return;
        }
        let models: Vec<(String, Option<api::Service>)> = changed
            .into_iter()
            .map(|key| {
                let model = self.model(&key);
                (key, model)
            })
            .collect();
        self.commit(move |s| {
            for (key, model) in models {
                match model {
                    Some(m) => {
                        if let Err(e) = crate::services::check_frontends(s, &m) {
                            tracing::warn!(service = %key, error = %e, "service skipped");
                            continue;
                        }
                        s.upsert_service(m);
                    }
                    None => {
                        s.remove_service(&key);
                    }
                }
            }
        });
    }

    /// The node's services become the list's.
    fn replace_all(&mut self) {
        let mut listed = BTreeMap::new();
        for key in self.services.keys() {
            if let Some(m) = self.model(key) {
                listed.insert(key.clone(), m);
            }
        }
        let count = listed.len();
        self.commit(|s| {
            // A frontend claimed twice (a cluster IP can belong to one
            // Service only; external IPs can collide): the first keeps it.
            let mut owned = HashSet::new();
            let mut taken = BTreeMap::new();
            for (k, m) in listed {
                let frontends = m.frontend_keys();
                if frontends.iter().any(|f| owned.contains(f)) {
                    tracing::warn!(service = %k, "service names another service's address and port; skipped");
                    continue;
                }
                owned.extend(frontends);
                taken.insert(k, m);
            }
            s.replace_services(taken)
        });
        tracing::info!(services = count, "services from the Kubernetes API");
    }

    /// Changes the state and commits, where blocking is allowed (the
    /// commit takes the state lock and writes maps).
    fn commit(&self, change: impl FnOnce(&mut crate::state::State)) {
        tokio::task::block_in_place(|| {
            let mut s = self.control.lock();
            change(&mut s);
            if let Err(e) = self.control.commit(&mut s) {
                tracing::warn!(error = %e, "services commit");
            }
        });
    }
}
