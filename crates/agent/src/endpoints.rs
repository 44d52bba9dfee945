//! Endpoints: a pod's attachment from CNI ADD to DEL (IPAM with address
//! quarantine, the veth, the identity, the programs), the pods' metadata
//! its identity comes from, and the checks CNI CHECK and GC ask for. Its
//! handles: the datapath (programs, conntrack), the control path (state
//! and commit) and the observer (agent events), nothing else.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use api::{AddResult, Attachment, AttachmentId, EndpointInfo};
use datapath::{Datapath, EndpointPrograms};
use netns as net;
use policy::labels::{pod_identity_labels, PodMeta};

use crate::cluster::ClusterState;
use crate::control::Control;
use crate::observer::Observer;
use crate::state::{Cidr, Endpoint, State};
use crate::{fqdn, host_ifname, invalid, Error};

pub struct Endpoints {
    pod_cidr: Cidr,
    /// Pods' MTU (None: the system's default).
    mtu: Option<u32>,
    cluster: String,
    datapath: Arc<Datapath>,
    control: Arc<Control>,
    observer: Arc<Observer>,
    /// New connections refused at a budget: those of endpoints deleted
    /// since the start (the census counts the others).
    pub overflows_retired: AtomicU64,
    /// Programs loaded ahead for the (id, address) the next ADD will most
    /// likely get (`State::next_endpoint_id`, `State::next_ip`): loading
    /// and verifying them (~30 ms) is then off the ADD's path.
    preloaded: Arc<Mutex<Option<EndpointPrograms>>>,
    /// To the preloading thread: the (id, address) to load for.
    preload: Mutex<std::sync::mpsc::Sender<(u32, Ipv4Addr)>>,
    /// Kvstore mode: identities are the cluster's. Asked with no lock on
    /// the state held (its watch applies changes under that lock).
    kvstore: Option<Arc<dyn ClusterState>>,
}

impl Endpoints {
    pub fn new(
        pod_cidr: Cidr,
        mtu: Option<u32>,
        cluster: &str,
        datapath: Arc<Datapath>,
        control: Arc<Control>,
        observer: Arc<Observer>,
        kvstore: Option<Arc<dyn ClusterState>>,
    ) -> Self {
        let preloaded: Arc<Mutex<Option<EndpointPrograms>>> = Arc::default();
        let (preload, wanted) = std::sync::mpsc::channel::<(u32, Ipv4Addr)>();
        {
            let (datapath, slot) = (datapath.clone(), preloaded.clone());
            // Ends with the endpoints (their sender).
            std::thread::Builder::new()
                .name("preload".into())
                .spawn(move || {
                    while let Ok(mut next) = wanted.recv() {
                        // Only the latest prediction matters.
                        while let Ok(later) = wanted.try_recv() {
                            next = later;
                        }
                        let held = slot
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .as_ref()
                            .map(|p| p.endpoint());
                        if held == Some(next) {
                            continue;
                        }
                        match datapath.load_endpoint_programs(next.0, next.1) {
                            Ok(p) => *slot.lock().unwrap_or_else(|e| e.into_inner()) = Some(p),
                            Err(e) => tracing::warn!(error = %e, "loading programs ahead"),
                        }
                    }
                })
                .ok();
        }
        Endpoints {
            kvstore,
            pod_cidr,
            mtu,
            cluster: cluster.to_string(),
            datapath,
            control,
            observer,
            overflows_retired: AtomicU64::new(0),
            preloaded,
            preload: Mutex::new(preload),
        }
    }

    /// Has the programs of the (id, address) the next ADD would get loaded
    /// ahead (in the background).
    pub fn preload_next(&self, s: &State) {
        if let (Some(id), Some(ip)) = (
            s.next_endpoint_id(),
            s.next_ip(&self.pod_cidr, fqdn::now_s()),
        ) {
            self.preload
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .send((id, ip))
                .ok();
        }
    }

    /// The programs for endpoint `id` at `ipv4`: those loaded ahead if they
    /// are for it, else loaded now (on a thread of their own, while the
    /// caller sets up the veth: `Loading::get` waits).
    fn programs<'s>(
        &'s self,
        scope: &'s std::thread::Scope<'s, '_>,
        id: u32,
        ipv4: Ipv4Addr,
    ) -> Loading<'s> {
        let ahead = self
            .preloaded
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take_if(|p| p.endpoint() == (id, ipv4));
        match ahead {
            Some(p) => Loading::Ready(p),
            None => {
                let datapath = &self.datapath;
                Loading::Now(scope.spawn(move || datapath.load_endpoint_programs(id, ipv4)))
            }
        }
    }

    /// Forgets a pod's metadata (its endpoints keep their identity).
    pub fn pod_delete(&self, namespace: &str, name: &str) -> Result<(), Error> {
        validate_pod_names(namespace, name)?;
        let mut s = self.control.lock();
        s.remove_pod(&format!("{namespace}/{name}"));
        self.control.commit(&mut s)
    }

    /// Changes a known pod's labels: `set` put, `remove` taken away (all
    /// checked before anything changes); its endpoints follow.
    pub fn pod_label(
        &self,
        namespace: &str,
        name: &str,
        set: BTreeMap<String, String>,
        remove: &[String],
    ) -> Result<(), Error> {
        validate_pod_names(namespace, name)?;
        let mut pod = self
            .control
            .lock()
            .pods()
            .get(&format!("{namespace}/{name}"))
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("no pod {namespace}/{name}")))?;
        for k in remove {
            if pod.labels.remove(k).is_none() {
                return Err(invalid(format!(
                    "pod {namespace}/{name} has no label {k:?}"
                )));
            }
        }
        pod.labels.extend(set);
        self.pod_upsert(pod)
    }

    pub fn pod_upsert(&self, pod: api::Pod) -> Result<(), Error> {
        validate_pod_names(&pod.namespace, &pod.name)?;
        if let Some(sa) = &pod.service_account {
            policy::labels::validate_object_name("service account", sa).map_err(invalid)?;
        }
        for (k, v) in pod.labels.iter().chain(pod.namespace_labels.iter()) {
            policy::labels::validate_label_key(k)
                .map_err(|e| invalid(format!("pod {}/{}: {e}", pod.namespace, pod.name)))?;
            policy::labels::validate_label_value(v)
                .map_err(|e| invalid(format!("pod {}/{}: {e}", pod.namespace, pod.name)))?;
        }
        if pod.namespace.is_empty() || pod.name.is_empty() {
            return Err(invalid("a pod needs a namespace and a name"));
        }
        for w in &pod.workloads {
            w.validate()
                .map_err(|e| invalid(format!("pod {}/{}: {e}", pod.namespace, pod.name)))?;
        }
        // The cluster's number for the new labels, asked before the state
        // is locked, and only for a pod with endpoints here.
        let has_endpoints = self
            .control
            .lock()
            .endpoints()
            .values()
            .any(|e| e.namespace == pod.namespace && e.pod == pod.name);
        let cluster_identity = match &self.kvstore {
            Some(k) if has_endpoints => Some(k.acquire_identity(&self.labels_of(&pod))?),
            _ => None,
        };
        let mut s = self.control.lock();
        s.upsert_pod(pod.clone());
        // A label change moves the pod's endpoints to their new identity.
        let ids: Vec<u32> = s
            .endpoints()
            .values()
            .filter(|e| e.namespace == pod.namespace && e.pod == pod.name)
            .map(|e| e.id)
            .collect();
        let labels = self.identity_labels(&s, &pod.namespace, &pod.name);
        let mut moved = Vec::new();
        let mut released = Vec::new();
        for id in ids {
            let before = s.endpoints()[&id].labels.clone();
            if let Some((old, identity)) = s
                .relabel_endpoint(id, labels.clone(), cluster_identity)
                .map_err(invalid)?
            {
                moved.push((s.endpoints()[&id].ipv4, identity, old));
                if !s.local_identities().contains_key(&old) {
                    released.push(before);
                }
            }
        }
        self.control.commit(&mut s)?;
        let unused = cluster_identity.is_some_and(|id| !s.local_identities().contains_key(&id));
        let republish: Vec<(Endpoint, _)> = moved
            .iter()
            .filter_map(|(ip, ..)| s.endpoints().values().find(|e| e.ipv4 == *ip))
            .map(|e| (e.clone(), s.kv_named_ports(e)))
            .collect();
        drop(s);
        if let Some(k) = &self.kvstore {
            for (ep, ports) in republish {
                k.publish_endpoint(&ep, ports);
            }
            // Labels no endpoint here holds any more: this node's
            // references go (a pod with no endpoint here never held one).
            if unused {
                released.push(labels.clone());
            }
            for l in released {
                k.release_identity(&l);
            }
        }
        for (ipv4, identity, old) in moved {
            self.observer
                .agent_event(flow::agent_event::Kind::IpcacheUpserted {
                    cidr: format!("{ipv4}/32"),
                    identity,
                    old_identity: Some(old),
                    namespace: pod.namespace.clone(),
                    pod: pod.name.clone(),
                });
        }
        Ok(())
    }

    /// The identity labels `pod` gives its endpoints.
    fn labels_of(&self, pod: &api::Pod) -> policy::LabelSet {
        pod_identity_labels(&PodMeta {
            namespace: &pod.namespace,
            labels: &pod.labels,
            namespace_labels: &pod.namespace_labels,
            service_account: pod.service_account.as_deref().unwrap_or("default"),
            cluster: &self.cluster,
        })
    }

    fn identity_labels(&self, s: &State, namespace: &str, pod: &str) -> policy::LabelSet {
        let empty = BTreeMap::new();
        let meta = s.pods().get(&format!("{namespace}/{pod}"));
        pod_identity_labels(&PodMeta {
            namespace,
            labels: meta.map(|p| &p.labels).unwrap_or(&empty),
            namespace_labels: meta.map(|p| &p.namespace_labels).unwrap_or(&empty),
            service_account: meta
                .and_then(|p| p.service_account.as_deref())
                .unwrap_or("default"),
            cluster: &self.cluster,
        })
    }

    pub fn add(&self, a: Attachment) -> Result<AddResult, Error> {
        validate_attachment(&a)?;
        // The cluster's number for the pod's labels, asked before the
        // state is locked.
        let cluster_identity = match &self.kvstore {
            Some(k) => {
                let labels = self.identity_labels(&self.control.lock(), &a.namespace, &a.pod);
                Some((k.acquire_identity(&labels)?, labels))
            }
            None => None,
        };
        let added = self.add_locked(&a, cluster_identity.clone());
        if added.is_err() {
            if let (Some(k), Some((id, labels))) = (&self.kvstore, cluster_identity) {
                if !self.control.lock().local_identities().contains_key(&id) {
                    k.release_identity(&labels);
                }
            }
        }
        added
    }

    fn add_locked(
        &self,
        a: &Attachment,
        cluster_identity: Option<(u32, policy::LabelSet)>,
    ) -> Result<AddResult, Error> {
        let mut s = self.control.lock();
        if s.find_endpoint(&a.container_id, &a.ifname).is_some() {
            return Err(Error::Conflict(format!(
                "container {} already has an interface {} on this network",
                a.container_id, a.ifname
            )));
        }
        // One interface per pod on this network: the pod's default route
        // and its identity belong to one address. (Interfaces on other
        // networks, from other plugins, are not ours to count.)
        if let Some(other) = s.endpoints().values().find(|e| e.netns == a.netns) {
            return Err(Error::Conflict(format!(
                "network namespace {} already has interface {} on this network (container {}); Fibril gives a pod one interface, add {} on another network",
                a.netns, other.ifname, other.container_id, a.ifname
            )));
        }
        let ipv4 = s
            .allocate_ip(&self.pod_cidr, fqdn::now_s())
            .ok_or_else(|| Error::Exhausted(format!("pod CIDR {} is exhausted", self.pod_cidr)))?;
        // Flushed when its endpoint went; again in case a peer's stray
        // packet opened an entry since (a quarantined address reused early).
        self.datapath.ct_flush_address(ipv4);
        let id = s
            .allocate_endpoint_id()
            .ok_or_else(|| Error::Exhausted("no endpoint id left".into()))?;
        let labels = match &cluster_identity {
            Some((_, labels)) => labels.clone(),
            None => self.identity_labels(&s, &a.namespace, &a.pod),
        };
        let host = host_ifname(&a.container_id, &a.ifname);
        let added = std::thread::scope(|scope| -> Result<_, Error> {
            let programs = self.programs(scope, id, ipv4);
            let veth = net::setup_pod_veth(
                &host,
                Path::new(&a.netns),
                &a.ifname,
                ipv4,
                self.pod_cidr.gateway(),
                self.mtu,
            )?;
            let ep = Endpoint {
                id,
                container_id: a.container_id.clone(),
                ifname: a.ifname.clone(),
                netns: a.netns.clone(),
                namespace: a.namespace.clone(),
                pod: a.pod.clone(),
                ipv4,
                host_ifname: host.clone(),
                host_ifindex: veth.host_ifindex,
                host_mac: veth.host_mac,
                pod_mac: veth.pod_mac,
                labels: labels.clone(),
                identity: 0,
            };
            let added = match &cluster_identity {
                Some((id, _)) => s.add_endpoint_as(ep, *id),
                None => s.add_endpoint(ep),
            };
            let identity = match added {
                Ok(identity) => identity,
                Err(e) => {
                    net::delete_link(&host);
                    return Err(invalid(e));
                }
            };
            // Policy and the endpoint map first, programs last: the first
            // packet already meets the right policy.
            let attached = self.control.commit(&mut s).and_then(|_| {
                let programs = programs.get()?;
                self.datapath
                    .attach_programs(programs, &host)
                    .map_err(Error::from)
            });
            Ok((veth, identity, attached))
        });
        let (veth, identity, attached) = match added {
            Ok(added) => added,
            Err(e) => {
                self.preload_next(&s);
                return Err(e);
            }
        };
        if let Err(e) = attached {
            s.remove_endpoint(id);
            self.datapath.detach_endpoint(&host);
            net::delete_link(&host);
            self.control.commit(&mut s).ok();
            self.preload_next(&s);
            return Err(e);
        }
        self.preload_next(&s);
        let created = s
            .endpoints()
            .get(&id)
            .map(|e| (e.clone(), s.kv_named_ports(e)));
        drop(s);
        if let (Some(k), Some((ep, ports))) = (&self.kvstore, created) {
            k.publish_endpoint(&ep, ports);
        }
        self.observer
            .agent_event(flow::agent_event::Kind::EndpointCreated {
                id: id as u64,
                namespace: a.namespace.clone(),
                pod: a.pod.clone(),
                labels: labels.to_strings(),
            });
        self.observer
            .agent_event(flow::agent_event::Kind::IpcacheUpserted {
                cidr: format!("{ipv4}/32"),
                identity,
                old_identity: None,
                namespace: a.namespace.clone(),
                pod: a.pod.clone(),
            });
        tracing::info!(endpoint_id = id, namespace = %a.namespace, pod = %a.pod, %ipv4, identity, "endpoint created");
        Ok(AddResult {
            ipv4: format!("{ipv4}/32"),
            gateway: self.pod_cidr.gateway().to_string(),
            pod_mac: net::mac_string(&veth.pod_mac),
            host_ifname: host,
            host_mac: net::mac_string(&veth.host_mac),
        })
    }

    pub fn del(&self, container_id: &str, ifname: &str) -> Result<(), Error> {
        let mut s = self.control.lock();
        let Some(ep) = s.find_endpoint(container_id, ifname).cloned() else {
            // DEL is idempotent: an unknown attachment is already gone.
            return Ok(());
        };
        s.remove_endpoint(ep.id);
        self.datapath.detach_endpoint(&ep.host_ifname);
        self.datapath.remove_endpoint(ep.ipv4)?;
        net::delete_link(&ep.host_ifname);
        // Its connections go with it (both directions, every program's
        // view, proxy flags), before its address can be handed out: a pod
        // given the address later must not ride on them.
        let flushed = self.datapath.ct_flush_address(ep.ipv4);
        self.overflows_retired.fetch_add(
            self.datapath.ct_budget_forget(ep.id),
            std::sync::atomic::Ordering::Relaxed,
        );
        s.quarantine_ip(ep.ipv4, fqdn::now_s());
        self.control.commit(&mut s)?;
        self.preload_next(&s);
        let unused = !s.local_identities().contains_key(&ep.identity);
        drop(s);
        if let Some(k) = &self.kvstore {
            k.withdraw_endpoint(&ep);
            if unused {
                k.release_identity(&ep.labels);
            }
        }
        tracing::info!(endpoint_id = ep.id, pod = %ep.pod, ct_flushed = flushed, "endpoint deleted");
        self.observer
            .agent_event(flow::agent_event::Kind::EndpointDeleted {
                id: ep.id as u64,
                namespace: ep.namespace.clone(),
                pod: ep.pod.clone(),
                labels: ep.labels.to_strings(),
            });
        self.observer
            .agent_event(flow::agent_event::Kind::IpcacheDeleted {
                cidr: format!("{}/32", ep.ipv4),
                identity: ep.identity,
                namespace: ep.namespace.clone(),
                pod: ep.pod.clone(),
            });
        Ok(())
    }

    pub fn check(&self, a: &Attachment) -> Result<(), Error> {
        let ep = self
            .control
            .lock()
            .find_endpoint(&a.container_id, &a.ifname)
            .cloned()
            .ok_or_else(|| {
                Error::NotFound(format!(
                    "no endpoint for container {} interface {}",
                    a.container_id, a.ifname
                ))
            })?;
        if !net::link_exists(&ep.host_ifname) {
            return Err(invalid(format!(
                "host interface {} is missing",
                ep.host_ifname
            )));
        }
        let (mac, ips) = net::pod_interface(Path::new(&a.netns), &a.ifname)?;
        if mac != ep.pod_mac || !ips.contains(&ep.ipv4) {
            return Err(invalid(format!(
                "interface {} in {} no longer has {} / {}",
                a.ifname,
                a.netns,
                ep.ipv4,
                net::mac_string(&ep.pod_mac)
            )));
        }
        if self.datapath.endpoint(ep.ipv4).is_none() {
            return Err(invalid(format!(
                "endpoint {} is missing from the datapath",
                ep.id
            )));
        }
        Ok(())
    }

    pub fn gc(&self, valid: &[AttachmentId]) -> Result<(), Error> {
        let stale: Vec<(String, String)> = self
            .control
            .lock()
            .endpoints()
            .values()
            .filter(|e| {
                !valid
                    .iter()
                    .any(|v| v.container_id == e.container_id && v.ifname == e.ifname)
            })
            .map(|e| (e.container_id.clone(), e.ifname.clone()))
            .collect();
        for (c, i) in stale {
            self.del(&c, &i)?;
        }
        Ok(())
    }

    pub fn list(&self) -> Vec<EndpointInfo> {
        let s = self.control.lock();
        let policy = self.control.policy();
        s.endpoints()
            .values()
            .map(|e| {
                let computed = policy.computed(e.identity);
                EndpointInfo {
                    id: e.id,
                    namespace: e.namespace.clone(),
                    pod_name: e.pod.clone(),
                    container_id: e.container_id.clone(),
                    ifname: e.ifname.clone(),
                    host_ifname: e.host_ifname.clone(),
                    ipv4: e.ipv4.to_string(),
                    identity: e.identity,
                    labels: e.labels.to_strings(),
                    enforcement: enforcement(computed),
                    policy_entries: computed.map_or(0, |c| c.entries.len()),
                    policy_overflow: policy.overflowed.contains(&e.id),
                }
            })
            .collect()
    }
}

/// What an endpoint's computed policy (none: no policy) enforces, as the
/// API reports it for pods and the host endpoint.
pub(crate) fn enforcement(computed: Option<&policy::EndpointPolicy>) -> api::Enforcement {
    api::Enforcement {
        ingress_enforced: computed.is_some_and(|c| c.ingress_enforced),
        egress_enforced: computed.is_some_and(|c| c.egress_enforced),
        ingress_selected_by: computed
            .map(|c| c.ingress_selected_by.clone())
            .unwrap_or_default(),
        egress_selected_by: computed
            .map(|c| c.egress_selected_by.clone())
            .unwrap_or_default(),
    }
}

/// An endpoint's programs: loaded ahead, or being loaded.
enum Loading<'s> {
    Ready(EndpointPrograms),
    Now(std::thread::ScopedJoinHandle<'s, Result<EndpointPrograms, datapath::Error>>),
}

impl Loading<'_> {
    fn get(self) -> Result<EndpointPrograms, Error> {
        match self {
            Loading::Ready(p) => Ok(p),
            Loading::Now(h) => h
                .join()
                .map_err(|_| invalid("loading the endpoint's programs panicked"))?
                .map_err(Error::from),
        }
    }
}

/// A pod's namespace and name, as Kubernetes admits them: nothing else
/// reaches identities, flows or the CLI's tables.
fn validate_pod_names(namespace: &str, pod: &str) -> Result<(), Error> {
    policy::labels::validate_namespace(namespace).map_err(invalid)?;
    policy::labels::validate_object_name("pod", pod).map_err(invalid)
}

fn validate_attachment(a: &Attachment) -> Result<(), Error> {
    let ok_id = |s: &str| {
        s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
    };
    if !ok_id(&a.container_id) {
        return Err(invalid(format!(
            "container id {:?} is not valid",
            a.container_id
        )));
    }
    if a.ifname.is_empty()
        || a.ifname.len() > 15
        || a.ifname.contains('/')
        || a.ifname.contains(char::is_whitespace)
    {
        return Err(invalid(format!(
            "interface name {:?} is not valid",
            a.ifname
        )));
    }
    if !Path::new(&a.netns).exists() {
        return Err(invalid(format!(
            "network namespace {} does not exist",
            a.netns
        )));
    }
    // A path that exists is not yet a namespace (`/`, `/etc/passwd`): only a
    // namespace file (nsfs: /run/netns/NAME, /proc/PID/ns/net) is one.
    const NSFS_MAGIC: i64 = 0x6e73_6673;
    let is_netns = nix::sys::statfs::statfs(Path::new(&a.netns))
        .is_ok_and(|s| s.filesystem_type().0 == NSFS_MAGIC);
    if !is_netns {
        return Err(invalid(format!(
            "{} is not a network namespace (expected a namespace file such as /run/netns/NAME or /proc/PID/ns/net)",
            a.netns
        )));
    }
    if a.namespace.is_empty() || a.pod.is_empty() {
        return Err(invalid(
            "the pod's namespace and name are needed (K8S_POD_NAMESPACE, K8S_POD_NAME)",
        ));
    }
    validate_pod_names(&a.namespace, &a.pod)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pod_names_are_checked_as_kubernetes_does() {
        for (ns, pod, ok) in [
            ("shop", "web-0", true),
            ("shop", "web.v2.example", true),
            ("kube-system", "a", true),
            ("Shop", "web", false),
            ("../../etc/passwd", "web", false),
            ("shop", "web\nlabel", false),
            ("shop", "\u{1b}[31mred", false),
            ("shop", "-web", false),
            ("shop", "web.", false),
            ("", "web", false),
            (&"a".repeat(64), "web", false),
            ("shop", &"a".repeat(254), false),
        ] {
            assert_eq!(validate_pod_names(ns, pod).is_ok(), ok, "{ns:?} {pod:?}");
        }
    }
}
