//! The node's state and everything derived from it, changed in one place.
//!
//! A change to `State` records the keys it touched (`state::Changes`); a
//! commit brings exactly those into line: CIDR identities (only when
//! policies or learned names changed), the endpoint index the flow enricher
//! reads, the ipcache (the kernel's LPM map and the Rust resolver, diffed
//! by key), the policy maps (`PolicySync`: only identities whose policy
//! changed), the L7 proxy's view, and one line in the state log. Readers on
//! hot paths (the enricher, the proxies) load immutable snapshots (the
//! index, the ipcache) that a commit swaps; they take no lock.
//!
//! Services (touched ones only) go into the load balancer's maps
//! (`LbSync`), their frontends into the index (flows' service names).
//!
//! Lock order: `state`, then `policy`, then `lb`, then `store`.

use std::collections::{BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use arc_swap::ArcSwap;
use datapath::Datapath;

use crate::ipcache::{Entry, Ipcache};
use crate::lb_sync::LbSync;
use crate::policy_sync::PolicySync;
use crate::state::{Changes, Endpoint, State, Store};
use crate::{invalid, l7proxy, Error};

/// What the event enricher needs to know about a local endpoint: the
/// endpoint as flows show it (with its identity), shared by all its flows.
#[derive(Clone, Debug)]
pub struct EndpointMeta {
    pub endpoint: Arc<flow::Endpoint>,
}

/// The local endpoints as the enricher looks them up: a snapshot, replaced
/// (copied and patched) by each commit that changes it. Each map is shared
/// between snapshots until a commit changes it: a learned name copies the
/// names, not the 5,000 endpoints.
#[derive(Clone, Default)]
pub struct EndpointLookup {
    pub by_ip: Arc<HashMap<Ipv4Addr, EndpointMeta>>,
    /// Host-side veth names by ifindex: a flow's `interface`.
    pub ifname_by_index: Arc<HashMap<u32, flow::record::InlineText>>,
    /// DNS names learned addresses belong to (flows' `*_names`).
    pub names_by_ip: Arc<HashMap<Ipv4Addr, Vec<String>>>,
    /// Services by frontend address and port (flows' `*_service`).
    pub services: Arc<HashMap<(Ipv4Addr, u16), flow::record::SharedServiceRef>>,
    /// Endpoint id -> (address, host ifindex) as indexed: what to remove
    /// when the endpoint changes or goes.
    keys: Arc<HashMap<u32, (Ipv4Addr, u32)>>,
}

/// The index as readers hold it.
pub type EndpointIndex = Arc<ArcSwap<EndpointLookup>>;

pub struct Control {
    cluster: String,
    datapath: Arc<Datapath>,
    state: Mutex<State>,
    policy: Mutex<PolicySync>,
    lb: Mutex<LbSync>,
    store: Mutex<Store>,
    index: EndpointIndex,
    /// What the kernel's ipcache holds, as of the last commit: the
    /// resolver of addresses to identities for everything but the datapath.
    ipcache: ArcSwap<Ipcache>,
    /// The host's own IPv4 addresses (ipcache `host`), as last read:
    /// refreshed on the kernel's address events, not per change.
    host: Mutex<Vec<Ipv4Addr>>,
    /// The HTTP proxy process, once connected (`l7proxy`).
    l7_link: OnceLock<Arc<l7proxy::Link>>,
}

impl Control {
    /// Takes over `state` (as loaded) and brings everything derived from it
    /// in line in full: the kernel ipcache is diffed against what the
    /// kernel holds (an earlier run's entries), the policy maps against
    /// `policy`'s realized entries; the snapshot is rewritten.
    pub fn open(
        cluster: &str,
        node: &str,
        datapath: Arc<Datapath>,
        mut store: Store,
        mut state: State,
        mut policy: PolicySync,
        node_ports: Option<crate::lb_sync::NodePorts>,
    ) -> Result<Self, Error> {
        let host = netns::host_ipv4_addresses()?;
        state.refresh_cidr_identities().map_err(invalid)?;
        state.take_changes();
        let ipcache = Ipcache::build(&state, &host);
        let have = datapath.ipcache_entries()?;
        let wanted = ipcache.entries();
        for (addr, len, _, _) in &have {
            if !wanted.contains_key(&(*addr, *len)) {
                datapath.remove_ipcache(*addr, *len)?;
            }
        }
        for (&(addr, len), e) in &wanted {
            if !have.contains(&(addr, len, e.identity, e.tunnel)) {
                datapath.upsert_ipcache(addr, len, e.identity, e.tunnel)?;
            }
        }
        policy.apply(&state, &datapath, cluster, None)?;
        let mut lb = LbSync::open(&datapath, node, node_ports)?;
        lb.apply(&state, &datapath, None)?;
        store.save(&state)?;
        let control = Self {
            cluster: cluster.to_string(),
            datapath,
            index: Arc::new(ArcSwap::from_pointee(EndpointLookup::default())),
            ipcache: ArcSwap::from_pointee(ipcache),
            host: Mutex::new(host),
            policy: Mutex::new(policy),
            lb: Mutex::new(lb),
            store: Mutex::new(store),
            state: Mutex::new(state),
            l7_link: OnceLock::new(),
        };
        {
            let s = control.lock();
            let all: BTreeSet<u32> = s.endpoints().keys().copied().collect();
            let remote: BTreeSet<Ipv4Addr> = s.remote_endpoints().keys().copied().collect();
            control.update_index(&s, &all, &remote, true);
            control.update_services();
        }
        Ok(control)
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The state, unless another holds it (the DNS proxy's fast path must
    /// not wait).
    pub fn try_lock(&self) -> Option<MutexGuard<'_, State>> {
        self.state.try_lock().ok()
    }

    /// The policy maps' owner (computed policies, the cookie table).
    pub fn policy(&self) -> MutexGuard<'_, PolicySync> {
        self.policy.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The index's handle, for a reader that keeps it (the enricher).
    pub fn index(&self) -> EndpointIndex {
        self.index.clone()
    }

    /// The index as of the last commit (a reader on a hot path: no lock,
    /// no reference count on the handle).
    pub fn lookup(&self) -> arc_swap::Guard<Arc<EndpointLookup>> {
        self.index.load()
    }

    /// The ipcache as of the last commit.
    pub fn ipcache(&self) -> Arc<Ipcache> {
        self.ipcache.load_full()
    }

    pub fn datapath(&self) -> &Arc<Datapath> {
        &self.datapath
    }

    /// Brings what `s` changed since the last commit into the kernel, the
    /// views and the state log. On failure the changes stay recorded, so
    /// the next commit tries them again.
    pub fn commit(&self, s: &mut State) -> Result<(), Error> {
        self.commit_with(s, false)
    }

    fn commit_with(&self, s: &mut State, host_changed: bool) -> Result<(), Error> {
        let mut changes = s.take_changes();
        if !changes.policies.is_empty() || !changes.fqdn.is_empty() {
            let refreshed = s.refresh_cidr_identities();
            changes.merge(s.take_changes());
            if let Err(e) = refreshed {
                s.restore_changes(changes);
                return Err(invalid(e));
            }
        }
        if changes.is_empty() && !host_changed {
            return Ok(());
        }
        let result = self.apply(s, &changes, host_changed);
        if result.is_err() {
            s.restore_changes(changes);
        }
        result
    }

    fn apply(&self, s: &State, c: &Changes, host_changed: bool) -> Result<(), Error> {
        // Endpoints whose index entry or ipcache entry may differ: the
        // changed ones and those of changed pods (their workloads).
        let mut touched = c.endpoints.clone();
        if !c.pods.is_empty() {
            touched.extend(
                s.endpoints()
                    .values()
                    .filter(|e| {
                        c.pods.iter().any(|k| {
                            k.split_once('/') == Some((e.namespace.as_str(), e.pod.as_str()))
                        })
                    })
                    .map(|e| e.id),
            );
        }
        // Other nodes' endpoints whose entry, or whose identity's labels,
        // changed (the enricher names them by those).
        let mut remote_touched = c.remote_endpoints.clone();
        if !c.cluster_identities.is_empty() {
            remote_touched.extend(
                s.remote_endpoints()
                    .iter()
                    .filter(|(_, r)| c.cluster_identities.contains(&r.identity))
                    .map(|(ip, _)| *ip),
            );
        }
        let old_keys = self.update_index(s, &touched, &remote_touched, !c.fqdn.is_empty());
        let prefixes_changed = self.update_ipcache(
            s,
            &old_keys,
            &c.remote_endpoints,
            host_changed || !c.cidr_identities.is_empty() || !c.remote_nodes.is_empty(),
        )?;
        if !c.services.is_empty() {
            self.lb().apply(s, &self.datapath, Some(&c.services))?;
            self.update_services();
        }
        let started = std::time::Instant::now();
        let mut policy = self.policy();
        let rewritten = policy.apply(s, &self.datapath, &self.cluster, Some(c))?;
        tracing::debug!(
            rewritten,
            elapsed_us = started.elapsed().as_micros() as u64,
            "policy synced"
        );
        if let Some(link) = self.l7_link.get() {
            let mut update = l7proxy::Update {
                cidrs: prefixes_changed.then(|| self.l7_cidrs()),
                ..Default::default()
            };
            for (id, old) in &old_keys {
                if let Some((ip, _)) = old {
                    update.pods.push((*ip, None));
                }
                if let Some(ep) = s.endpoints().get(id) {
                    update.pods.push((ep.ipv4, Some(ep.identity)));
                }
            }
            // Other nodes' pods, as the ipcache has them (the proxy names
            // peers as the kernel does).
            for ip in &c.remote_endpoints {
                if let Some(e) = self.ipcache.load().get(&(*ip, 32)) {
                    update.pods.push((*ip, Some(e.identity)));
                } else {
                    update.pods.push((*ip, None));
                }
            }
            update.policies = policy.proxy_changes();
            drop(policy);
            link.update(update);
        }
        self.store
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .append(s, c)?;
        Ok(())
    }

    /// The load balancer's owner (what the kernel's services maps hold).
    pub fn lb(&self) -> MutexGuard<'_, LbSync> {
        self.lb.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Puts the services' frontends, as written, into the index.
    fn update_services(&self) {
        let owners = self.lb().frontend_owners();
        let mut refs: HashMap<String, flow::record::SharedServiceRef> = HashMap::new();
        let mut services = HashMap::with_capacity(owners.len());
        for (frontend, key) in owners {
            let r = refs
                .entry(key.clone())
                .or_insert_with(|| {
                    let (namespace, name) = key.split_once('/').unwrap_or(("", &key));
                    Arc::new(flow::record::ServiceRef {
                        name: name.to_string(),
                        namespace: namespace.to_string(),
                    })
                })
                .clone();
            services.insert(frontend, r);
        }
        let mut next = EndpointLookup::clone(&self.index.load());
        next.services = Arc::new(services);
        self.index.store(Arc::new(next));
    }

    /// Patches the endpoint index for `touched` endpoints (and the learned
    /// names, when `names`); returns the touched endpoints' old (address,
    /// ifindex), for the ipcache.
    fn update_index(
        &self,
        s: &State,
        touched: &BTreeSet<u32>,
        remote: &BTreeSet<Ipv4Addr>,
        names: bool,
    ) -> Vec<(u32, Option<(Ipv4Addr, u32)>)> {
        let mut old_keys = Vec::new();
        if touched.is_empty() && remote.is_empty() && !names {
            return old_keys;
        }
        let mut next = EndpointLookup::clone(&self.index.load());
        if !touched.is_empty() {
            let keys = Arc::make_mut(&mut next.keys);
            let by_ip = Arc::make_mut(&mut next.by_ip);
            let ifnames = Arc::make_mut(&mut next.ifname_by_index);
            for id in touched {
                let old = keys.remove(id);
                if let Some((ip, ifindex)) = old {
                    by_ip.remove(&ip);
                    ifnames.remove(&ifindex);
                }
                old_keys.push((*id, old));
                let Some(ep) = s.endpoints().get(id) else {
                    continue;
                };
                keys.insert(ep.id, (ep.ipv4, ep.host_ifindex));
                ifnames.insert(ep.host_ifindex, ep.host_ifname.as_str().into());
                by_ip.insert(ep.ipv4, self.endpoint_meta(s, ep));
            }
        }
        if !remote.is_empty() {
            let local: std::collections::HashSet<Ipv4Addr> =
                s.endpoints().values().map(|e| e.ipv4).collect();
            let by_ip = Arc::make_mut(&mut next.by_ip);
            for ip in remote.iter().filter(|ip| !local.contains(ip)) {
                match s.remote_endpoints().get(ip) {
                    Some(r) => by_ip.insert(*ip, self.remote_meta(s, r)),
                    None => by_ip.remove(ip),
                };
            }
        }
        if names {
            let mut names_by_ip: HashMap<Ipv4Addr, Vec<String>> = HashMap::new();
            for (name, entry) in s.fqdn() {
                for ip in entry.ips.keys() {
                    names_by_ip.entry(*ip).or_default().push(name.clone());
                }
            }
            next.names_by_ip = Arc::new(names_by_ip);
        }
        self.index.store(Arc::new(next));
        old_keys
    }

    fn endpoint_meta(&self, s: &State, ep: &Endpoint) -> EndpointMeta {
        EndpointMeta {
            endpoint: Arc::new(flow::Endpoint {
                id: ep.id,
                identity: ep.identity,
                cluster_name: self.cluster.clone(),
                namespace: ep.namespace.clone(),
                labels: ep.labels.to_strings(),
                pod_name: ep.pod.clone(),
                workloads: s
                    .pods()
                    .get(&format!("{}/{}", ep.namespace, ep.pod))
                    .map(|p| p.workloads.clone())
                    .unwrap_or_default(),
            }),
        }
    }

    /// Another node's endpoint as flows name it (its labels are its
    /// identity's, as the cluster has them).
    fn remote_meta(&self, s: &State, r: &kvstore::IpIdentity) -> EndpointMeta {
        EndpointMeta {
            endpoint: Arc::new(flow::Endpoint {
                id: 0,
                identity: r.identity,
                cluster_name: self.cluster.clone(),
                namespace: r.namespace.clone(),
                labels: s
                    .labels_of_identity(r.identity)
                    .map(|l| l.to_strings())
                    .unwrap_or_default(),
                pod_name: r.pod.clone(),
                workloads: vec![],
            }),
        }
    }

    /// Writes the ipcache entries that differ: the touched endpoints' old
    /// and new addresses, and the prefixes when they may have changed.
    /// Returns whether the prefixes changed.
    fn update_ipcache(
        &self,
        s: &State,
        old_keys: &[(u32, Option<(Ipv4Addr, u32)>)],
        remote: &BTreeSet<Ipv4Addr>,
        prefixes_changed: bool,
    ) -> Result<bool, Error> {
        let mut endpoints = Vec::new();
        // Other nodes' endpoints (an address that is also this node's, a
        // stale remote entry, stays this node's); then this node's, which
        // win where both are written.
        if !remote.is_empty() {
            let local: std::collections::HashSet<Ipv4Addr> =
                s.endpoints().values().map(|e| e.ipv4).collect();
            for ip in remote.iter().filter(|ip| !local.contains(ip)) {
                endpoints.push((*ip, s.remote_endpoints().get(ip).map(Entry::remote)));
            }
        }
        for (id, old) in old_keys {
            if let Some((ip, _)) = old {
                // A local address gone falls back to a remote claim on it.
                endpoints.push((*ip, s.remote_endpoints().get(ip).map(Entry::remote)));
            }
            if let Some(ep) = s.endpoints().get(id) {
                endpoints.push((ep.ipv4, Some(Entry::local(ep.identity))));
            }
        }
        if endpoints.is_empty() && !prefixes_changed {
            return Ok(false);
        }
        let prefixes = prefixes_changed.then(|| {
            let host = self.host.lock().unwrap_or_else(|e| e.into_inner());
            Ipcache::prefixes_of(s, &host)
        });
        let old = self.ipcache.load_full();
        let next = old.with(&endpoints, prefixes);
        let touched: Vec<Ipv4Addr> = endpoints.iter().map(|(a, _)| *a).collect();
        for (addr, len) in old.changed_keys(&next, &touched) {
            match next.get(&(addr, len)) {
                Some(e) => self
                    .datapath
                    .upsert_ipcache(addr, len, e.identity, e.tunnel)?,
                None => self.datapath.remove_ipcache(addr, len)?,
            }
        }
        let changed = old.prefixes() != next.prefixes();
        self.ipcache.store(Arc::new(next));
        Ok(changed)
    }

    /// Writes the whole state as the snapshot (the log emptied): the
    /// drain's last step, with the state lock held.
    pub fn checkpoint(&self, s: &State) -> Result<(), Error> {
        self.store
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .save(s)?;
        Ok(())
    }

    /// Reads the host's addresses again (on an address event); when they
    /// changed, the ipcache's `host` entries follow. Returns whether they
    /// changed.
    pub fn refresh_host_addresses(&self) -> Result<bool, Error> {
        let mut s = self.lock();
        let now = netns::host_ipv4_addresses()?;
        {
            let mut host = self.host.lock().unwrap_or_else(|e| e.into_inner());
            if *host == now {
                return Ok(false);
            }
            tracing::info!(addresses = ?now, "host addresses changed");
            *host = now;
        }
        self.commit_with(&mut s, true)?;
        Ok(true)
    }

    /// Connects the HTTP proxy process: it gets a snapshot now and after
    /// every change.
    pub fn attach_l7_proxy(&self, link: Arc<l7proxy::Link>) {
        if self.l7_link.set(link).is_ok() {
            let state = self.lock();
            self.publish_l7(&state);
        }
    }

    /// Sends the HTTP proxy everything it decides with (at connect; each
    /// commit then sends what it changed).
    fn publish_l7(&self, state: &State) {
        if let Some(link) = self.l7_link.get() {
            link.publish(self.l7_snapshot(state));
        }
    }

    /// Everything the HTTP proxy decides with, for `state` as committed.
    pub fn l7_snapshot(&self, state: &State) -> l7proxy::Snapshot {
        let sync = self.policy();
        let mut snapshot = l7proxy::Snapshot {
            cidrs: self.l7_cidrs(),
            ..Default::default()
        };
        for (ip, r) in state.remote_endpoints() {
            snapshot.pods.insert(*ip, r.identity);
        }
        for ep in state.endpoints().values() {
            snapshot.pods.insert(ep.ipv4, ep.identity);
            if let Some(p) = sync.computed(ep.identity) {
                snapshot.policies.insert(ep.identity, p.clone());
            }
        }
        snapshot
    }

    /// The proxy resolves non-pod addresses through these: the ipcache's
    /// prefixes, the host's own addresses (`host`) included.
    fn l7_cidrs(&self) -> Vec<(ipnet::IpNet, u32)> {
        self.ipcache()
            .prefixes()
            .iter()
            .filter(|((_, len), id)| *len > 0 || **id != abi::identity::WORLD)
            .map(|(&(addr, len), &id)| {
                let net = ipnet::Ipv4Net::new(addr, len as u8).unwrap_or_default();
                (ipnet::IpNet::V4(net), id)
            })
            .collect()
    }
}
