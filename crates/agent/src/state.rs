//! The agent's persisted state: endpoints (and so IPAM), pods, policies and
//! identities. Written atomically after every change, so a restart hands
//! every endpoint back its address and identity and never reuses an address.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use policy::identity::Allocator;
use policy::{LabelSet, NamedPort, Policy};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Endpoint {
    pub id: u32,
    pub container_id: String,
    pub ifname: String,
    pub netns: String,
    pub namespace: String,
    pub pod: String,
    pub ipv4: Ipv4Addr,
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub host_mac: [u8; 6],
    pub pod_mac: [u8; 6],
    pub labels: LabelSet,
    pub identity: u32,
}

/// The node's state. Every change goes through a method that records what
/// it touched (`Changes`): the commit (`control`) brings exactly that into
/// the kernel, the views and the state log, and nothing else.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct State {
    next_endpoint_id: u32,
    endpoints: BTreeMap<u32, Endpoint>,
    pods: BTreeMap<String, api::Pod>,
    policies: BTreeMap<String, Policy>,
    /// A function of the endpoints (each holds a reference on its labels'
    /// identity): rebuilt from them on load, never stored.
    #[serde(skip)]
    identities: Allocator,
    /// Node-local CIDR identities, one per prefix the policies name.
    #[serde(default)]
    cidr_identities: BTreeMap<IpNet, u32>,
    /// Kvstore mode: the cluster's identities (other nodes' pods' too), as
    /// last seen in etcd. Persisted: with etcd away after a restart, policy
    /// still knows the peers it selected.
    #[serde(default)]
    cluster_identities: BTreeMap<u32, LabelSet>,
    /// Kvstore mode: other nodes' endpoints (address, identity, node), as
    /// last seen in etcd; their /32s go into the ipcache.
    #[serde(default)]
    remote_endpoints: BTreeMap<Ipv4Addr, kvstore::IpIdentity>,
    /// Kvstore mode: the other nodes' addresses by name, as last seen in
    /// etcd (`remote-node` in the ipcache).
    #[serde(default)]
    remote_nodes: BTreeMap<String, Ipv4Addr>,
    /// Bumped whenever `policies` changes (lets the policy engine skip
    /// comparing every policy on unrelated changes).
    #[serde(skip)]
    policy_generation: u64,
    /// The prefixes and toFQDNs selectors the policies name, found once
    /// per policy change (not per learned DNS answer); emptied with every
    /// change of `policies`.
    #[serde(skip)]
    policy_peers: std::sync::OnceLock<std::sync::Arc<PolicyPeers>>,
    /// Namespaces in audit mode: policy drops there are forwarded and
    /// reported with verdict AUDIT.
    #[serde(default)]
    audit_namespaces: std::collections::BTreeSet<String>,
    /// Names the DNS proxy saw resolved, node-wide (as Cilium's cache):
    /// what toFQDNs selects. Persisted: learned names survive a restart.
    #[serde(default)]
    fqdn: BTreeMap<String, FqdnName>,
    /// Addresses of deleted endpoints -> when (Unix seconds) they leave
    /// quarantine: a peer's connections to the old pod must not reach a new
    /// one, so a freed address is handed out again only when no other is
    /// free (and its conntrack is flushed once more then).
    #[serde(default)]
    quarantined: BTreeMap<Ipv4Addr, u64>,
    /// Services by `namespace/name`, with their backends (`lb_sync`
    /// writes them into the datapath's load balancer).
    #[serde(default)]
    services: BTreeMap<String, api::Service>,
    /// Which service answers on each frontend: the conflict check's index
    /// (a check against every service is quadratic over 10,000 of them).
    /// A function of `services`: built on first need, never stored.
    #[serde(skip)]
    frontend_owners: Option<HashMap<api::service::FrontendKey, String>>,
    #[serde(skip)]
    changes: Changes,
}

/// What the CIDR identities take from the policies.
#[derive(Debug)]
struct PolicyPeers {
    prefixes: BTreeSet<IpNet>,
    fqdn_selectors: BTreeSet<policy::model::FqdnSelector>,
}

/// What changed since the last commit, by key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub endpoints: BTreeSet<u32>,
    pub pods: BTreeSet<String>,
    pub policies: BTreeSet<String>,
    pub fqdn: BTreeSet<String>,
    /// The addresses changed names had before the change (their labels
    /// may change with it).
    pub fqdn_ips: BTreeSet<Ipv4Addr>,
    pub cidr_identities: BTreeSet<IpNet>,
    pub cluster_identities: BTreeSet<u32>,
    pub remote_endpoints: BTreeSet<Ipv4Addr>,
    pub remote_nodes: BTreeSet<String>,
    pub quarantined: BTreeSet<Ipv4Addr>,
    pub audit_namespaces: BTreeSet<String>,
    pub services: BTreeSet<String>,
    pub next_endpoint_id: bool,
}

impl Changes {
    pub fn is_empty(&self) -> bool {
        *self == Changes::default()
    }

    /// Adds `other`'s keys (a failed commit's changes, to be retried).
    pub fn merge(&mut self, other: Changes) {
        self.endpoints.extend(other.endpoints);
        self.pods.extend(other.pods);
        self.policies.extend(other.policies);
        self.fqdn.extend(other.fqdn);
        self.fqdn_ips.extend(other.fqdn_ips);
        self.cidr_identities.extend(other.cidr_identities);
        self.cluster_identities.extend(other.cluster_identities);
        self.remote_endpoints.extend(other.remote_endpoints);
        self.remote_nodes.extend(other.remote_nodes);
        self.quarantined.extend(other.quarantined);
        self.audit_namespaces.extend(other.audit_namespaces);
        self.services.extend(other.services);
        self.next_endpoint_id |= other.next_endpoint_id;
    }
}

/// How long a deleted endpoint's address waits before it is reused: longer
/// than conntrack keeps an entry that a stray packet opened (60 s).
pub const ADDRESS_QUARANTINE_S: u64 = 90;

/// One learned DNS name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FqdnName {
    /// Address -> expiry (Unix seconds): the answer's TTL, at least the
    /// minimum TTL.
    pub ips: BTreeMap<Ipv4Addr, u64>,
    /// Endpoints whose lookups returned it.
    pub endpoints: std::collections::BTreeSet<u32>,
}

/// An IPv4 pod CIDR, e.g. 10.200.0.0/24.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cidr {
    pub network: Ipv4Addr,
    pub prefix: u8,
}

impl std::str::FromStr for Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} is not a CIDR (a.b.c.d/n)"))?;
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| format!("{a:?} is not an IPv4 address"))?;
        let prefix: u8 = p
            .parse()
            .ok()
            .filter(|p| (8..=30).contains(p))
            .ok_or_else(|| format!("prefix length {p:?} must be 8-30"))?;
        let mask = u32::MAX << (32 - prefix);
        if u32::from(addr) & !mask != 0 {
            return Err(format!("{s} has host bits set"));
        }
        Ok(Self {
            network: addr,
            prefix,
        })
    }
}

impl std::fmt::Display for Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.network, self.prefix)
    }
}

impl Cidr {
    /// The gateway pods route through: the first address.
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network) + 1)
    }

    /// Addresses handed to pods: all but network, gateway and broadcast.
    pub fn pod_addresses(&self) -> impl Iterator<Item = Ipv4Addr> {
        let base = u32::from(self.network);
        let size = 1u32 << (32 - self.prefix);
        (2..size - 1).map(move |i| Ipv4Addr::from(base + i))
    }
}

impl State {
    /// A free pod address at `now` (Unix seconds): the first that is not in
    /// quarantine, else the one leaving quarantine first (the caller
    /// flushes its conntrack again); `None` when every address is in use.
    pub fn allocate_ip(&mut self, cidr: &Cidr, now: u64) -> Option<Ipv4Addr> {
        let expired: Vec<Ipv4Addr> = self
            .quarantined
            .iter()
            .filter(|(_, until)| **until <= now)
            .map(|(ip, _)| *ip)
            .collect();
        for ip in expired {
            self.quarantined.remove(&ip);
            self.changes.quarantined.insert(ip);
        }
        let ip = self.next_ip(cidr, now)?;
        if self.quarantined.remove(&ip).is_some() {
            self.changes.quarantined.insert(ip);
        }
        Some(ip)
    }

    /// The address `allocate_ip` would hand out at `now`, changing nothing.
    pub fn next_ip(&self, cidr: &Cidr, now: u64) -> Option<Ipv4Addr> {
        let used: BTreeSet<Ipv4Addr> = self.endpoints.values().map(|e| e.ipv4).collect();
        let free = cidr.pod_addresses().filter(|a| !used.contains(a));
        let (mut fresh, mut oldest) = (None, None::<(u64, Ipv4Addr)>);
        for a in free {
            match self.quarantined.get(&a).filter(|until| **until > now) {
                None => {
                    fresh = Some(a);
                    break;
                }
                Some(&until) if oldest.is_none_or(|(u, _)| until < u) => oldest = Some((until, a)),
                Some(_) => {}
            }
        }
        fresh.or(oldest.map(|(_, a)| a))
    }

    /// Puts a deleted endpoint's address in quarantine from `now`.
    pub fn quarantine_ip(&mut self, ip: Ipv4Addr, now: u64) {
        self.quarantined.insert(ip, now + ADDRESS_QUARANTINE_S);
        self.changes.quarantined.insert(ip);
    }

    /// The next free endpoint id (1-65535).
    pub fn allocate_endpoint_id(&mut self) -> Option<u32> {
        let id = self.next_endpoint_id()?;
        self.next_endpoint_id = id;
        self.changes.next_endpoint_id = true;
        Some(id)
    }

    /// The id `allocate_endpoint_id` would hand out, changing nothing.
    pub fn next_endpoint_id(&self) -> Option<u32> {
        let mut id = self.next_endpoint_id;
        for _ in 0..65535 {
            id = id % 65535 + 1;
            if !self.endpoints.contains_key(&id) {
                return Some(id);
            }
        }
        None
    }

    /// Gives every prefix the policies name a CIDR identity (keeping the
    /// numbers of prefixes that stay) and drops the ones no longer named.
    pub fn refresh_cidr_identities(&mut self) -> Result<(), String> {
        let mut wanted = self.policy_peers().prefixes.clone();
        // Learned addresses of names a toFQDNs selector matches: /32s.
        wanted.extend(
            self.fqdn_labels(None)
                .into_keys()
                .map(|ip| IpNet::V4(ipnet::Ipv4Net::from(ip))),
        );
        let gone: Vec<IpNet> = self
            .cidr_identities
            .keys()
            .filter(|p| !wanted.contains(p))
            .copied()
            .collect();
        for p in gone {
            self.cidr_identities.remove(&p);
            self.changes.cidr_identities.insert(p);
        }
        let mut used: BTreeSet<u32> = self.cidr_identities.values().copied().collect();
        // Numbers are handed out lowest free first; `next` only moves up.
        let mut next = policy::cidr::FIRST_LOCAL;
        for p in wanted {
            if self.cidr_identities.contains_key(&p) {
                continue;
            }
            let id = (next..=policy::cidr::LAST_LOCAL)
                .find(|id| !used.contains(id))
                .ok_or("no CIDR identity left")?;
            used.insert(id);
            next = id + 1;
            self.cidr_identities.insert(p, id);
            self.changes.cidr_identities.insert(p);
        }
        Ok(())
    }

    /// Every identity with its labels: reserved, pods (this node's and,
    /// in kvstore mode, the cluster's), CIDRs; by number.
    pub fn all_identities(&self) -> Vec<(u32, LabelSet)> {
        let mut out: Vec<(u32, LabelSet)> = self
            .pod_identities()
            .map(|(id, l)| (id, l.clone()))
            .collect();
        out.extend(self.cidr_identity_labels());
        out
    }

    /// Reserved identities, then pods' by number: this node's allocations
    /// and the cluster's (one list; this node's labels where both have a
    /// number, which in kvstore mode are the cluster's anyway).
    pub fn pod_identities(&self) -> impl Iterator<Item = (u32, &LabelSet)> {
        let mut local = self.identities.iter().peekable();
        let mut cluster = self.cluster_identities.iter().peekable();
        std::iter::from_fn(move || match (local.peek(), cluster.peek()) {
            (Some((l, _)), Some((c, _))) if **c < *l => cluster.next().map(|(i, l)| (*i, l)),
            (Some((l, _)), Some((c, _))) if **c == *l => {
                cluster.next();
                local.next()
            }
            (Some(_), _) => local.next(),
            (None, _) => cluster.next().map(|(i, l)| (*i, l)),
        })
    }

    /// Sets (or, `None`, removes) a cluster identity.
    pub fn set_cluster_identity(&mut self, id: u32, labels: Option<LabelSet>) {
        if self.cluster_identities.get(&id) == labels.as_ref() {
            return;
        }
        self.changes.cluster_identities.insert(id);
        match labels {
            Some(l) => self.cluster_identities.insert(id, l),
            None => self.cluster_identities.remove(&id),
        };
    }

    pub fn cluster_identities(&self) -> &BTreeMap<u32, LabelSet> {
        &self.cluster_identities
    }

    /// Makes the cluster identities `listed` (a follower's full list):
    /// those gone removed, the rest set.
    pub fn replace_cluster_identities(&mut self, listed: BTreeMap<u32, LabelSet>) {
        let gone: Vec<u32> = self
            .cluster_identities
            .keys()
            .filter(|id| !listed.contains_key(id))
            .copied()
            .collect();
        for id in gone {
            self.set_cluster_identity(id, None);
        }
        for (id, labels) in listed {
            self.set_cluster_identity(id, Some(labels));
        }
    }

    /// Makes the other nodes' endpoints `listed` (a follower's full list).
    pub fn replace_remote_endpoints(&mut self, listed: BTreeMap<Ipv4Addr, kvstore::IpIdentity>) {
        let gone: Vec<Ipv4Addr> = self
            .remote_endpoints
            .keys()
            .filter(|ip| !listed.contains_key(ip))
            .copied()
            .collect();
        for ip in gone {
            self.set_remote_endpoint(ip, None);
        }
        for (ip, r) in listed {
            self.set_remote_endpoint(ip, Some(r));
        }
    }

    /// Sets (or, `None`, removes) another node's endpoint.
    pub fn set_remote_endpoint(&mut self, ip: Ipv4Addr, value: Option<kvstore::IpIdentity>) {
        if self.remote_endpoints.get(&ip) == value.as_ref() {
            return;
        }
        self.changes.remote_endpoints.insert(ip);
        match value {
            Some(v) => self.remote_endpoints.insert(ip, v),
            None => self.remote_endpoints.remove(&ip),
        };
    }

    pub fn remote_endpoints(&self) -> &BTreeMap<Ipv4Addr, kvstore::IpIdentity> {
        &self.remote_endpoints
    }

    /// Sets (or with `None` removes) another node's address.
    pub fn set_remote_node(&mut self, name: &str, address: Option<Ipv4Addr>) {
        if self.remote_nodes.get(name) == address.as_ref() {
            return;
        }
        self.changes.remote_nodes.insert(name.to_string());
        match address {
            Some(a) => self.remote_nodes.insert(name.to_string(), a),
            None => self.remote_nodes.remove(name),
        };
    }

    pub fn remote_nodes(&self) -> &BTreeMap<String, Ipv4Addr> {
        &self.remote_nodes
    }

    /// The labels of identity `id` (this node's, the cluster's or a
    /// reserved one).
    pub fn labels_of_identity(&self, id: u32) -> Option<&LabelSet> {
        self.identities
            .allocated()
            .get(&id)
            .or_else(|| self.cluster_identities.get(&id))
    }

    /// The CIDR identities with their labels; a learned address also
    /// carries `fqdn:<selector>` for each toFQDNs selector whose names
    /// resolved to it.
    pub fn cidr_identity_labels(&self) -> Vec<(u32, LabelSet)> {
        self.cidr_labels_of(self.cidr_identities.keys())
            .into_iter()
            .map(|(_, id, l)| (id, l))
            .collect()
    }

    /// The same for `prefixes` only (those that have an identity).
    pub fn cidr_labels_of<'a>(
        &self,
        prefixes: impl IntoIterator<Item = &'a IpNet>,
    ) -> Vec<(IpNet, u32, LabelSet)> {
        let prefixes: Vec<&IpNet> = prefixes.into_iter().collect();
        let hosts: BTreeSet<Ipv4Addr> = prefixes
            .iter()
            .filter_map(|p| match p {
                IpNet::V4(p) if p.prefix_len() == 32 => Some(p.addr()),
                _ => None,
            })
            .collect();
        let fqdn = self.fqdn_labels(Some(&hosts));
        prefixes
            .into_iter()
            .filter_map(|prefix| {
                let id = *self.cidr_identities.get(prefix)?;
                let labels =
                    policy::cidr::prefix_labels(prefix, |q| self.cidr_identities.contains_key(q));
                let extra = match prefix {
                    IpNet::V4(p) if p.prefix_len() == 32 => fqdn.get(&p.addr()),
                    _ => None,
                };
                let labels = match extra {
                    Some(keys) => LabelSet::new(
                        labels
                            .0
                            .into_iter()
                            .chain(keys.iter().map(|k| policy::Label::new("fqdn", k, "")))
                            .collect(),
                    ),
                    None => labels,
                };
                Some((*prefix, id, labels))
            })
            .collect()
    }

    /// Learned addresses that a toFQDNs selector selects, with the
    /// selectors' label keys; only those in `of` when given.
    fn fqdn_labels(&self, of: Option<&BTreeSet<Ipv4Addr>>) -> BTreeMap<Ipv4Addr, BTreeSet<String>> {
        let mut out: BTreeMap<Ipv4Addr, BTreeSet<String>> = BTreeMap::new();
        let wanted = |ip: &Ipv4Addr| of.is_none_or(|of| of.contains(ip));
        if self.fqdn.is_empty() || of.is_some_and(|of| of.is_empty()) {
            return out;
        }
        let selectors = &self.policy_peers().fqdn_selectors;
        for (name, entry) in &self.fqdn {
            if !entry.ips.keys().any(wanted) {
                continue;
            }
            for sel in selectors.iter().filter(|s| s.matches(name)) {
                for ip in entry.ips.keys().filter(|ip| wanted(ip)) {
                    out.entry(*ip).or_default().insert(sel.label_key());
                }
            }
        }
        out
    }

    /// Endpoint `ep`'s pod's declared ports, as the kvstore lists them.
    pub fn kv_named_ports(&self, ep: &Endpoint) -> Vec<kvstore::NamedPort> {
        self.pods
            .get(&format!("{}/{}", ep.namespace, ep.pod))
            .map(|p| {
                p.ports
                    .iter()
                    .map(|n| kvstore::NamedPort {
                        name: n.name.clone(),
                        port: n.port,
                        protocol: n.protocol.k8s_name().to_string(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Declared container ports per identity (union over its endpoints,
    /// this node's and, through the kvstore, the other nodes').
    pub fn named_ports(&self) -> BTreeMap<u32, Vec<NamedPort>> {
        let mut out: BTreeMap<u32, Vec<NamedPort>> = BTreeMap::new();
        for r in self.remote_endpoints.values() {
            for n in &r.named_ports {
                let Some(protocol) = policy::Protocol::from_k8s_name(&n.protocol) else {
                    continue;
                };
                let p = NamedPort {
                    name: n.name.clone(),
                    port: n.port,
                    protocol,
                };
                let ports = out.entry(r.identity).or_default();
                if !ports.contains(&p) {
                    ports.push(p);
                }
            }
        }
        let with_ports: std::collections::HashMap<(&str, &str), &api::Pod> = self
            .pods
            .values()
            .filter(|p| !p.ports.is_empty())
            .map(|p| ((p.namespace.as_str(), p.name.as_str()), p))
            .collect();
        for e in self.endpoints.values() {
            let Some(pod) = with_ports.get(&(e.namespace.as_str(), e.pod.as_str())) else {
                continue;
            };
            let ports = out.entry(e.identity).or_default();
            for p in &pod.ports {
                if !ports.contains(p) {
                    ports.push(p.clone());
                }
            }
        }
        out
    }

    pub fn endpoints(&self) -> &BTreeMap<u32, Endpoint> {
        &self.endpoints
    }

    pub fn pods(&self) -> &BTreeMap<String, api::Pod> {
        &self.pods
    }

    pub fn policies(&self) -> &BTreeMap<String, Policy> {
        &self.policies
    }

    pub fn policy_generation(&self) -> u64 {
        self.policy_generation
    }

    pub fn identities(&self) -> &Allocator {
        &self.identities
    }

    pub fn cidr_identities(&self) -> &BTreeMap<IpNet, u32> {
        &self.cidr_identities
    }

    pub fn audit_namespaces(&self) -> &BTreeSet<String> {
        &self.audit_namespaces
    }

    /// The identities local endpoints hold, with their labels (the
    /// allocator's: it numbers exactly those).
    pub fn local_identities(&self) -> &BTreeMap<u32, LabelSet> {
        self.identities.allocated()
    }

    pub fn fqdn(&self) -> &BTreeMap<String, FqdnName> {
        &self.fqdn
    }

    /// Adds an endpoint with the identity of its labels (a reference taken
    /// on it); returns that identity.
    pub fn add_endpoint(&mut self, mut ep: Endpoint) -> Result<u32, String> {
        let identity = self
            .identities
            .acquire(&ep.labels)
            .map_err(|e| e.to_string())?;
        ep.identity = identity;
        self.changes.endpoints.insert(ep.id);
        self.endpoints.insert(ep.id, ep);
        Ok(identity)
    }

    /// Adds an endpoint with the identity the cluster gave its labels
    /// (kvstore mode): this node's allocator takes the same number.
    pub fn add_endpoint_as(&mut self, mut ep: Endpoint, identity: u32) -> Result<u32, String> {
        self.identities.adopt(&ep.labels, identity)?;
        ep.identity = identity;
        self.changes.endpoints.insert(ep.id);
        self.endpoints.insert(ep.id, ep);
        Ok(identity)
    }

    /// Removes an endpoint, dropping its reference on its identity.
    pub fn remove_endpoint(&mut self, id: u32) -> Option<Endpoint> {
        let ep = self.endpoints.remove(&id)?;
        self.identities.release(&ep.labels);
        self.changes.endpoints.insert(id);
        Some(ep)
    }

    /// Moves an endpoint to the identity of `labels` (the cluster's number
    /// for them in kvstore mode, `cluster_identity`); returns (old, new)
    /// identity, or `None` when its labels are those already.
    pub fn relabel_endpoint(
        &mut self,
        id: u32,
        labels: LabelSet,
        cluster_identity: Option<u32>,
    ) -> Result<Option<(u32, u32)>, String> {
        let Some(ep) = self.endpoints.get(&id) else {
            return Err(format!("no endpoint {id}"));
        };
        if ep.labels == labels {
            return Ok(None);
        }
        let identity = match cluster_identity {
            Some(id) => self.identities.adopt(&labels, id)?,
            None => self
                .identities
                .acquire(&labels)
                .map_err(|e| e.to_string())?,
        };
        let ep = self.endpoints.get_mut(&id).expect("checked above");
        let old_labels = std::mem::replace(&mut ep.labels, labels);
        let old = std::mem::replace(&mut ep.identity, identity);
        self.identities.release(&old_labels);
        self.changes.endpoints.insert(id);
        Ok(Some((old, identity)))
    }

    pub fn upsert_pod(&mut self, pod: api::Pod) {
        let key = format!("{}/{}", pod.namespace, pod.name);
        self.changes.pods.insert(key.clone());
        self.pods.insert(key, pod);
    }

    pub fn remove_pod(&mut self, key: &str) -> Option<api::Pod> {
        let pod = self.pods.remove(key)?;
        self.changes.pods.insert(key.to_string());
        Some(pod)
    }

    pub fn insert_policy(&mut self, p: Policy) {
        let key = p.key();
        self.changes.policies.insert(key.clone());
        self.policies.insert(key, p);
        self.policies_changed();
    }

    /// Every change of `policies` calls this.
    fn policies_changed(&mut self) {
        self.policy_generation += 1;
        self.policy_peers = Default::default();
    }

    fn policy_peers(&self) -> &PolicyPeers {
        self.policy_peers.get_or_init(|| {
            std::sync::Arc::new(PolicyPeers {
                prefixes: policy::cidr::prefixes(self.policies.values()),
                fqdn_selectors: policy::cidr::fqdn_selectors(self.policies.values()),
            })
        })
    }

    pub fn remove_policy(&mut self, key: &str) -> Option<Policy> {
        let p = self.policies.remove(key)?;
        self.changes.policies.insert(key.to_string());
        self.policies_changed();
        Some(p)
    }

    /// Adds or replaces a service; false when it was already so. Its
    /// frontends are its own from now on (the callers check first that no
    /// other service has them: `frontend_taken`).
    pub fn upsert_service(&mut self, svc: api::Service) -> bool {
        let key = svc.key();
        if self.services.get(&key) == Some(&svc) {
            return false;
        }
        self.changes.services.insert(key.clone());
        let old = self.services.insert(key.clone(), svc);
        if let Some(owners) = &mut self.frontend_owners {
            disown(owners, old.as_ref(), &key);
            for f in self.services[&key].frontend_keys() {
                owners.insert(f, key.clone());
            }
        }
        true
    }

    pub fn remove_service(&mut self, key: &str) -> Option<api::Service> {
        let svc = self.services.remove(key)?;
        self.changes.services.insert(key.to_string());
        if let Some(owners) = &mut self.frontend_owners {
            disown(owners, Some(&svc), key);
        }
        Some(svc)
    }

    /// A frontend of `svc` that another service answers on, with that
    /// service's key: a frontend belongs to one service only.
    pub fn frontend_taken(
        &mut self,
        svc: &api::Service,
    ) -> Option<(api::service::FrontendKey, String)> {
        let services = &self.services;
        let owners = self.frontend_owners.get_or_insert_with(|| {
            let mut owners = HashMap::new();
            for (key, s) in services {
                for f in s.frontend_keys() {
                    owners.entry(f).or_insert_with(|| key.clone());
                }
            }
            owners
        });
        let key = svc.key();
        svc.frontend_keys().into_iter().find_map(|f| {
            owners
                .get(&f)
                .filter(|o| **o != key)
                .map(|o| (f, o.clone()))
        })
    }

    /// Makes the services `listed` (a full list from the API).
    pub fn replace_services(&mut self, listed: BTreeMap<String, api::Service>) {
        let gone: Vec<String> = self
            .services
            .keys()
            .filter(|k| !listed.contains_key(*k))
            .cloned()
            .collect();
        for k in gone {
            self.remove_service(&k);
        }
        for svc in listed.into_values() {
            self.upsert_service(svc);
        }
    }

    pub fn services(&self) -> &BTreeMap<String, api::Service> {
        &self.services
    }

    /// Puts a namespace in or out of audit mode; false when it already was.
    pub fn set_audit(&mut self, namespace: &str, audit: bool) -> bool {
        let changed = if audit {
            self.audit_namespaces.insert(namespace.to_string())
        } else {
            self.audit_namespaces.remove(namespace)
        };
        if changed {
            self.changes.audit_namespaces.insert(namespace.to_string());
        }
        changed
    }

    /// A learned name, created empty if new, to change.
    pub fn fqdn_entry(&mut self, name: &str) -> &mut FqdnName {
        self.changes.fqdn.insert(name.to_string());
        let entry = self.fqdn.entry(name.to_string()).or_default();
        self.changes.fqdn_ips.extend(entry.ips.keys());
        entry
    }

    /// A learned name, if known, to change.
    pub fn fqdn_get_mut(&mut self, name: &str) -> Option<&mut FqdnName> {
        let entry = self.fqdn.get_mut(name)?;
        self.changes.fqdn.insert(name.to_string());
        self.changes.fqdn_ips.extend(entry.ips.keys());
        Some(entry)
    }

    /// Drops the learned addresses `keep` refuses (address, expiry), and
    /// names left without any; returns how many addresses went.
    pub fn fqdn_retain_ips(&mut self, mut keep: impl FnMut(&Ipv4Addr, u64) -> bool) -> usize {
        let mut removed = 0;
        let changes = &mut self.changes;
        self.fqdn.retain(|name, entry| {
            let before = entry.ips.len();
            entry.ips.retain(|ip, expires| {
                let kept = keep(ip, *expires);
                if !kept {
                    changes.fqdn_ips.insert(*ip);
                }
                kept
            });
            if entry.ips.len() != before {
                removed += before - entry.ips.len();
                changes.fqdn.insert(name.clone());
                changes.fqdn_ips.extend(entry.ips.keys());
            }
            !entry.ips.is_empty()
        });
        removed
    }

    #[cfg(test)]
    pub(crate) fn set_cidr_identity(&mut self, prefix: IpNet, id: u32) {
        self.cidr_identities.insert(prefix, id);
        self.changes.cidr_identities.insert(prefix);
    }

    /// What changed since the last call.
    pub fn take_changes(&mut self) -> Changes {
        std::mem::take(&mut self.changes)
    }

    /// Hands back changes a failed commit did not bring everywhere.
    pub fn restore_changes(&mut self, changes: Changes) {
        self.changes.merge(changes);
    }

    /// Rebuilds what is derived, not stored: identities from the endpoints.
    fn rebuild(&mut self) -> Result<(), String> {
        self.identities =
            Allocator::restore(self.endpoints.values().map(|e| (&e.labels, e.identity)))?;
        Ok(())
    }

    pub fn find_endpoint(&self, container_id: &str, ifname: &str) -> Option<&Endpoint> {
        self.endpoints
            .values()
            .find(|e| e.container_id == container_id && e.ifname == ifname)
    }
}

/// One change to one object, as the state log holds it: the object's
/// whole new value, or `None` when it is gone. Replaying a record twice
/// leaves what replaying it once does.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Record {
    Endpoint {
        id: u32,
        value: Option<Endpoint>,
    },
    Pod {
        key: String,
        value: Option<api::Pod>,
    },
    Policy {
        key: String,
        value: Option<Policy>,
    },
    Fqdn {
        name: String,
        value: Option<FqdnName>,
    },
    CidrIdentity {
        prefix: IpNet,
        value: Option<u32>,
    },
    ClusterIdentity {
        id: u32,
        value: Option<LabelSet>,
    },
    RemoteEndpoint {
        ip: Ipv4Addr,
        value: Option<kvstore::IpIdentity>,
    },
    RemoteNode {
        name: String,
        value: Option<Ipv4Addr>,
    },
    Quarantined {
        ip: Ipv4Addr,
        value: Option<u64>,
    },
    AuditNamespace {
        namespace: String,
        value: bool,
    },
    NextEndpointId {
        value: u32,
    },
    Service {
        key: String,
        value: Option<api::Service>,
    },
}

impl State {
    /// The records that bring a copy of the state before `changes` to now.
    fn records(&self, c: &Changes) -> Vec<Record> {
        let mut out = Vec::new();
        for id in &c.endpoints {
            out.push(Record::Endpoint {
                id: *id,
                value: self.endpoints.get(id).cloned(),
            });
        }
        for key in &c.pods {
            out.push(Record::Pod {
                key: key.clone(),
                value: self.pods.get(key).cloned(),
            });
        }
        for key in &c.policies {
            out.push(Record::Policy {
                key: key.clone(),
                value: self.policies.get(key).cloned(),
            });
        }
        for name in &c.fqdn {
            out.push(Record::Fqdn {
                name: name.clone(),
                value: self.fqdn.get(name).cloned(),
            });
        }
        for prefix in &c.cidr_identities {
            out.push(Record::CidrIdentity {
                prefix: *prefix,
                value: self.cidr_identities.get(prefix).copied(),
            });
        }
        for id in &c.cluster_identities {
            out.push(Record::ClusterIdentity {
                id: *id,
                value: self.cluster_identities.get(id).cloned(),
            });
        }
        for ip in &c.remote_endpoints {
            out.push(Record::RemoteEndpoint {
                ip: *ip,
                value: self.remote_endpoints.get(ip).cloned(),
            });
        }
        for name in &c.remote_nodes {
            out.push(Record::RemoteNode {
                name: name.clone(),
                value: self.remote_nodes.get(name).copied(),
            });
        }
        for ip in &c.quarantined {
            out.push(Record::Quarantined {
                ip: *ip,
                value: self.quarantined.get(ip).copied(),
            });
        }
        for ns in &c.audit_namespaces {
            out.push(Record::AuditNamespace {
                namespace: ns.clone(),
                value: self.audit_namespaces.contains(ns),
            });
        }
        for key in &c.services {
            out.push(Record::Service {
                key: key.clone(),
                value: self.services.get(key).cloned(),
            });
        }
        if c.next_endpoint_id {
            out.push(Record::NextEndpointId {
                value: self.next_endpoint_id,
            });
        }
        out
    }

    fn replay(&mut self, r: Record) {
        fn put<K: Ord, V>(m: &mut BTreeMap<K, V>, k: K, v: Option<V>) {
            match v {
                Some(v) => m.insert(k, v),
                None => m.remove(&k),
            };
        }
        match r {
            Record::Endpoint { id, value } => put(&mut self.endpoints, id, value),
            Record::Pod { key, value } => put(&mut self.pods, key, value),
            Record::Policy { key, value } => {
                put(&mut self.policies, key, value);
                self.policies_changed();
            }
            Record::Fqdn { name, value } => put(&mut self.fqdn, name, value),
            Record::CidrIdentity { prefix, value } => put(&mut self.cidr_identities, prefix, value),
            Record::ClusterIdentity { id, value } => put(&mut self.cluster_identities, id, value),
            Record::RemoteEndpoint { ip, value } => put(&mut self.remote_endpoints, ip, value),
            Record::RemoteNode { name, value } => put(&mut self.remote_nodes, name, value),
            Record::Quarantined { ip, value } => put(&mut self.quarantined, ip, value),
            Record::AuditNamespace { namespace, value } => {
                if value {
                    self.audit_namespaces.insert(namespace);
                } else {
                    self.audit_namespaces.remove(&namespace);
                }
            }
            Record::NextEndpointId { value } => self.next_endpoint_id = value,
            Record::Service { key, value } => {
                put(&mut self.services, key, value);
                self.frontend_owners = None;
            }
        }
    }
}

/// Frees the frontends `svc` (service `key`, as it was) owned.
fn disown(
    owners: &mut HashMap<api::service::FrontendKey, String>,
    svc: Option<&api::Service>,
    key: &str,
) {
    for f in svc.map(api::Service::frontend_keys).unwrap_or_default() {
        if owners.get(&f).is_some_and(|o| o == key) {
            owners.remove(&f);
        }
    }
}

/// The state on disk: a snapshot (`state.json`, written atomically: temp
/// file + rename) and a log (`state.log`) of what changed since, one line
/// per commit (a JSON array of `Record`s) appended in one write. A change
/// costs a line the size of what it touched; the snapshot is rewritten,
/// and the log emptied, every `COMPACT_AFTER` commits and at start-up.
/// A last line cut short (the agent died writing it) is a commit that did
/// not happen; any other bad line is corruption and refuses the load.
pub struct Store {
    snapshot: PathBuf,
    log: PathBuf,
    /// The log, open for appending, and the commits it holds.
    appender: Option<(std::fs::File, usize)>,
}

/// Commits the log takes before the snapshot is rewritten.
pub const COMPACT_AFTER: usize = 4096;

impl Store {
    pub fn new(dir: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir)?;
        // Endpoints, pods and policies are root's alone.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        Ok(Self {
            snapshot: dir.join("state.json"),
            log: dir.join("state.log"),
            appender: None,
        })
    }

    /// The snapshot with the log replayed on it; identities rebuilt from
    /// the endpoints.
    pub fn load(&self) -> Result<State, String> {
        let mut state = match std::fs::read(&self.snapshot) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| format!("state file {} is corrupt: {e}", self.snapshot.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => State::default(),
            Err(e) => return Err(format!("cannot read {}: {e}", self.snapshot.display())),
        };
        let log = match std::fs::read(&self.log) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(format!("cannot read {}: {e}", self.log.display())),
        };
        let complete = log.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
        if complete < log.len() {
            tracing::warn!(
                log = %self.log.display(),
                bytes = log.len() - complete,
                "state log ends in a commit cut short; it did not happen"
            );
        }
        for (n, line) in log[..complete].split(|b| *b == b'\n').enumerate() {
            if line.is_empty() {
                continue;
            }
            let records: Vec<Record> = serde_json::from_slice(line).map_err(|e| {
                format!(
                    "state log {} is corrupt at line {}: {e}",
                    self.log.display(),
                    n + 1
                )
            })?;
            for r in records {
                state.replay(r);
            }
        }
        // Keys as this version makes them (a NetworkPolicy's once shared
        // the spelling of a CiliumNetworkPolicy's).
        state.policies = std::mem::take(&mut state.policies)
            .into_values()
            .map(|p| (p.key(), p))
            .collect();
        state
            .rebuild()
            .map_err(|e| format!("state in {} is inconsistent: {e}", self.snapshot.display()))?;
        Ok(state)
    }

    /// Appends the records of `changes` (already applied to `state`) as
    /// one line; rewrites the snapshot when the log is long enough.
    pub fn append(&mut self, state: &State, changes: &Changes) -> std::io::Result<()> {
        let records = state.records(changes);
        if records.is_empty() {
            return Ok(());
        }
        if self
            .appender
            .as_ref()
            .is_some_and(|(_, n)| *n >= COMPACT_AFTER)
        {
            return self.save(state);
        }
        let mut line = serde_json::to_vec(&records).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let (file, n) = match &mut self.appender {
            Some(a) => a,
            None => {
                use std::os::unix::fs::OpenOptionsExt;
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o600)
                    .open(&self.log)?;
                self.appender.insert((f, 0))
            }
        };
        use std::io::Write;
        file.write_all(&line)?;
        *n += 1;
        Ok(())
    }

    /// Writes the whole state as the snapshot, then empties the log (a
    /// crash in between replays the log on the new snapshot: the same
    /// state).
    pub fn save(&mut self, state: &State) -> std::io::Result<()> {
        let tmp = self.snapshot.with_extension("json.tmp");
        let bytes = serde_json::to_vec(state).map_err(std::io::Error::other)?;
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .mode(0o600)
                .open(&tmp)?
                .write_all(&bytes)?;
        }
        std::fs::rename(&tmp, &self.snapshot)?;
        use std::os::unix::fs::OpenOptionsExt;
        let f = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&self.log)?;
        drop(f);
        self.appender = None;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_parsing_and_pod_addresses() {
        let c: Cidr = "10.200.0.0/29".parse().unwrap();
        assert_eq!(c.gateway(), Ipv4Addr::new(10, 200, 0, 1));
        let addrs: Vec<_> = c.pod_addresses().collect();
        assert_eq!(addrs.first(), Some(&Ipv4Addr::new(10, 200, 0, 2)));
        assert_eq!(addrs.last(), Some(&Ipv4Addr::new(10, 200, 0, 6)));
        for bad in [
            "10.200.0.1/24",
            "10.200.0.0",
            "10.200.0.0/31",
            "x/24",
            "10.0.0.0/abc",
        ] {
            assert!(bad.parse::<Cidr>().is_err(), "{bad}");
        }
    }

    #[test]
    fn other_nodes_endpoints_lend_their_named_ports_to_their_identity() {
        let mut s = State::default();
        let remote = |ip: [u8; 4], id: u32, ports: &[(&str, u16, &str)]| kvstore::IpIdentity {
            ip: ip.into(),
            host_ip: Ipv4Addr::new(192, 168, 0, 2),
            identity: id,
            key: 0,
            namespace: "default".into(),
            pod: format!("pod-{}", ip[3]),
            node: "n2".into(),
            named_ports: ports
                .iter()
                .map(|(n, p, proto)| kvstore::NamedPort {
                    name: n.to_string(),
                    port: *p,
                    protocol: proto.to_string(),
                })
                .collect(),
        };
        s.set_remote_endpoint(
            Ipv4Addr::new(10, 0, 1, 5),
            Some(remote([10, 0, 1, 5], 300, &[("http", 8080, "TCP")])),
        );
        // A second pod of the same identity: the union, once each; an
        // unknown protocol is skipped, not guessed.
        s.set_remote_endpoint(
            Ipv4Addr::new(10, 0, 1, 6),
            Some(remote(
                [10, 0, 1, 6],
                300,
                &[
                    ("http", 8080, "TCP"),
                    ("dns", 53, "UDP"),
                    ("odd", 9, "QUIC"),
                ],
            )),
        );
        let named = s.named_ports();
        let names: Vec<(&str, u16, policy::Protocol)> = named[&300]
            .iter()
            .map(|p| (p.name.as_str(), p.port, p.protocol))
            .collect();
        assert_eq!(
            names,
            [
                ("http", 8080, policy::Protocol::Tcp),
                ("dns", 53, policy::Protocol::Udp)
            ]
        );
        s.set_remote_endpoint(Ipv4Addr::new(10, 0, 1, 5), None);
        s.set_remote_endpoint(Ipv4Addr::new(10, 0, 1, 6), None);
        assert!(s.named_ports().is_empty());
    }

    #[test]
    fn a_frontend_belongs_to_one_service_across_changes_and_loads() {
        let svc = |name: &str, vip: [u8; 4]| api::Service {
            namespace: "default".into(),
            name: name.into(),
            addresses: vec![vip.into()],
            ports: vec![api::service::ServicePort {
                name: "http".into(),
                port: 80,
                protocol: api::service::Protocol::Tcp,
                node_port: None,
            }],
            ..Default::default()
        };
        let mut s = State::default();
        assert_eq!(s.frontend_taken(&svc("a", [10, 96, 0, 1])), None);
        s.upsert_service(svc("a", [10, 96, 0, 1]));
        // Itself: no conflict; another service on its address: one.
        assert_eq!(s.frontend_taken(&svc("a", [10, 96, 0, 1])), None);
        let taken = s.frontend_taken(&svc("b", [10, 96, 0, 1]));
        assert_eq!(taken.map(|(_, o)| o), Some("default/a".to_string()));
        // a moves away; its old address is free, its new one is a's.
        s.upsert_service(svc("a", [10, 96, 0, 2]));
        assert_eq!(s.frontend_taken(&svc("b", [10, 96, 0, 1])), None);
        assert!(s.frontend_taken(&svc("b", [10, 96, 0, 2])).is_some());
        // b takes 10.96.0.1; a goes: b keeps it, 10.96.0.2 is free.
        s.upsert_service(svc("b", [10, 96, 0, 1]));
        s.remove_service("default/a");
        assert!(s.frontend_taken(&svc("c", [10, 96, 0, 1])).is_some());
        assert_eq!(s.frontend_taken(&svc("c", [10, 96, 0, 2])), None);
        // A list replaces everything: b moves to a's old address while a
        // comes back on b's, in one go (b is replaced after a).
        let mut listed = BTreeMap::new();
        listed.insert("default/a".to_string(), svc("a", [10, 96, 0, 1]));
        listed.insert("default/b".to_string(), svc("b", [10, 96, 0, 2]));
        s.replace_services(listed);
        let owner = |s: &mut State, vip: [u8; 4]| s.frontend_taken(&svc("z", vip)).map(|(_, o)| o);
        assert_eq!(owner(&mut s, [10, 96, 0, 1]).as_deref(), Some("default/a"));
        assert_eq!(owner(&mut s, [10, 96, 0, 2]).as_deref(), Some("default/b"));
        // Loaded from its JSON (the index is not stored): rebuilt.
        let mut back: State = serde_json::from_slice(&serde_json::to_vec(&s).unwrap()).unwrap();
        assert_eq!(
            owner(&mut back, [10, 96, 0, 1]).as_deref(),
            Some("default/a")
        );
        assert_eq!(owner(&mut back, [10, 96, 0, 3]), None);
    }

    #[test]
    fn ids_and_addresses_are_never_handed_out_twice() {
        let c: Cidr = "10.200.0.0/30".parse().unwrap();
        let mut s = State::default();
        let ip = s.allocate_ip(&c, 0).unwrap();
        let id = s.allocate_endpoint_id().unwrap();
        s.add_endpoint(Endpoint {
            id,
            container_id: "c".into(),
            ifname: "eth0".into(),
            netns: String::new(),
            namespace: "default".into(),
            pod: "p".into(),
            ipv4: ip,
            host_ifname: String::new(),
            host_ifindex: 0,
            host_mac: [0; 6],
            pod_mac: [0; 6],
            labels: LabelSet::default(),
            identity: 256,
        })
        .unwrap();
        assert_eq!(s.allocate_ip(&c, 0), None, "a /30 has one pod address");
        assert_ne!(s.allocate_endpoint_id(), Some(id));
    }

    #[test]
    fn a_freed_address_waits_in_quarantine_unless_no_other_is_free() {
        let c: Cidr = "10.200.0.0/29".parse().unwrap(); // .2 - .6
        let mut s = State::default();
        let first = Ipv4Addr::new(10, 200, 0, 2);
        s.quarantine_ip(first, 100);
        s.quarantine_ip(Ipv4Addr::new(10, 200, 0, 3), 50);
        assert_eq!(s.allocate_ip(&c, 100), Some(Ipv4Addr::new(10, 200, 0, 4)));
        // Past its quarantine, the first address is the first free again.
        assert_eq!(s.allocate_ip(&c, 100 + ADDRESS_QUARANTINE_S), Some(first));
        assert!(s.quarantined.is_empty(), "expired and handed-out ones go");
        // Nothing else free: the one leaving quarantine first is reused.
        let mut s = State::default();
        for (i, a) in c.pod_addresses().enumerate() {
            s.quarantine_ip(a, 10 - i as u64);
        }
        assert_eq!(s.allocate_ip(&c, 1), Some(Ipv4Addr::new(10, 200, 0, 6)));
    }

    fn endpoint(id: u32, app: &str) -> Endpoint {
        Endpoint {
            id,
            container_id: format!("c{id}"),
            ifname: "eth0".into(),
            netns: String::new(),
            namespace: "default".into(),
            pod: format!("p{id}"),
            ipv4: Ipv4Addr::new(10, 200, 0, id as u8),
            host_ifname: String::new(),
            host_ifindex: 0,
            host_mac: [0; 6],
            pod_mac: [0; 6],
            labels: LabelSet::new(vec![policy::Label::new("k8s", "app", app)]),
            identity: 0,
        }
    }

    /// Loaded state as the tests compare it: what is stored and what is
    /// rebuilt (identities), not the change record.
    fn image(s: &State) -> String {
        format!(
            "{:?} {:?}",
            serde_json::to_string(s).unwrap(),
            s.identities.all()
        )
    }

    /// Every kind of change survives a restart through the log alone, a
    /// compaction, and a log replayed over the snapshot that already holds
    /// it (a crash between the two).
    #[test]
    fn the_log_replays_every_change_and_compaction_keeps_it() {
        let dir = std::env::temp_dir().join(format!("fibril-state-log-{}", std::process::id()));
        std::fs::remove_dir_all(&dir).ok();
        let mut store = Store::new(&dir).unwrap();
        let mut s = State::default();
        let commit = |s: &mut State, store: &mut Store| {
            let c = s.take_changes();
            store.append(s, &c).unwrap();
        };
        for (id, app) in [(1, "a"), (2, "a"), (3, "b")] {
            s.allocate_endpoint_id();
            s.add_endpoint(endpoint(id, app)).unwrap();
            commit(&mut s, &mut store);
        }
        s.relabel_endpoint(3, endpoint(0, "a").labels, None)
            .unwrap();
        s.remove_endpoint(2);
        s.quarantine_ip(Ipv4Addr::new(10, 200, 0, 2), 100);
        s.set_audit("shop", true);
        s.fqdn_entry("api.example.")
            .ips
            .insert(Ipv4Addr::new(192, 0, 2, 1), 500);
        let p = policy::parse(
            "t",
            "apiVersion: cilium.io/v2\nkind: CiliumNetworkPolicy\nmetadata: {name: p}\nspec:\n  endpointSelector: {}\n  egress:\n  - toCIDR: [192.0.2.0/24]\n",
            "default",
        )
        .unwrap()
        .policies
        .remove(0);
        s.insert_policy(p);
        s.refresh_cidr_identities().unwrap();
        commit(&mut s, &mut store);
        assert!(!s.cidr_identities().is_empty());
        assert_eq!(image(&store.load().unwrap()), image(&s));

        // A snapshot, then a log replayed over it: the same state.
        let log = std::fs::read(dir.join("state.log")).unwrap();
        store.save(&s).unwrap();
        assert_eq!(std::fs::read(dir.join("state.log")).unwrap(), b"");
        std::fs::write(dir.join("state.log"), &log).unwrap();
        assert_eq!(image(&store.load().unwrap()), image(&s));
        std::fs::remove_dir_all(&dir).ok();
    }

    /// A last line cut short is a commit that did not happen; a bad line
    /// before it is corruption, and the load says where.
    #[test]
    fn a_torn_last_commit_is_dropped_and_corruption_refused() {
        let dir = std::env::temp_dir().join(format!("fibril-state-torn-{}", std::process::id()));
        std::fs::remove_dir_all(&dir).ok();
        let mut store = Store::new(&dir).unwrap();
        let mut s = State::default();
        s.add_endpoint(endpoint(1, "a")).unwrap();
        let c = s.take_changes();
        store.append(&s, &c).unwrap();
        let before = image(&s);
        s.add_endpoint(endpoint(2, "a")).unwrap();
        let c = s.take_changes();
        store.append(&s, &c).unwrap();
        let log = std::fs::read(dir.join("state.log")).unwrap();
        std::fs::write(dir.join("state.log"), &log[..log.len() - 5]).unwrap();
        assert_eq!(image(&store.load().unwrap()), before);

        let mut bad = b"[{\"nonsense\":1}]\n".to_vec();
        bad.extend_from_slice(&log);
        std::fs::write(dir.join("state.log"), &bad).unwrap();
        let err = store.load().unwrap_err();
        assert!(err.contains("corrupt at line 1"), "{err}");
        std::fs::remove_dir_all(&dir).ok();
    }

    /// Identities are the endpoints' own: rebuilt on load with their
    /// numbers and reference counts, so a release frees exactly as before.
    #[test]
    fn identities_are_rebuilt_from_the_endpoints() {
        let mut s = State::default();
        let a = s.add_endpoint(endpoint(1, "a")).unwrap();
        assert_eq!(s.add_endpoint(endpoint(2, "a")).unwrap(), a);
        let b = s.add_endpoint(endpoint(3, "b")).unwrap();
        let json = serde_json::to_vec(&s).unwrap();
        let mut back: State = serde_json::from_slice(&json).unwrap();
        back.rebuild().unwrap();
        assert_eq!(back.identities.all(), s.identities.all());
        back.remove_endpoint(1);
        assert!(back.identities.all().iter().any(|(id, _)| *id == a));
        back.remove_endpoint(2);
        assert!(!back.identities.all().iter().any(|(id, _)| *id == a));
        assert!(back.identities.all().iter().any(|(id, _)| *id == b));
    }
}
