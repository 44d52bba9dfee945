//! The agent's persisted state: endpoints (and so IPAM), pods, policies and
//! identities. Written atomically after every change, so a restart hands
//! every endpoint back its address and identity and never reuses an address.

use std::collections::BTreeMap;
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

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct State {
    pub next_endpoint_id: u32,
    pub endpoints: BTreeMap<u32, Endpoint>,
    pub pods: BTreeMap<String, api::Pod>,
    pub policies: BTreeMap<String, Policy>,
    pub identities: Allocator,
    /// Node-local CIDR identities, one per prefix the policies name.
    #[serde(default)]
    pub cidr_identities: BTreeMap<IpNet, u32>,
    /// Bumped whenever `policies` changes (lets the policy engine skip
    /// comparing every policy on unrelated changes).
    #[serde(skip)]
    pub policy_generation: u64,
    /// Namespaces in audit mode: policy drops there are forwarded and
    /// reported with verdict AUDIT.
    #[serde(default)]
    pub audit_namespaces: std::collections::BTreeSet<String>,
    /// Names the DNS proxy saw resolved, node-wide (as Cilium's cache):
    /// what toFQDNs selects. Persisted: learned names survive a restart.
    #[serde(default)]
    pub fqdn: BTreeMap<String, FqdnName>,
    /// Addresses of deleted endpoints -> when (Unix seconds) they leave
    /// quarantine: a peer's connections to the old pod must not reach a new
    /// one, so a freed address is handed out again only when no other is
    /// free (and its conntrack is flushed once more then).
    #[serde(default)]
    pub quarantined: BTreeMap<Ipv4Addr, u64>,
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
        self.quarantined.retain(|_, until| *until > now);
        let used: std::collections::BTreeSet<Ipv4Addr> =
            self.endpoints.values().map(|e| e.ipv4).collect();
        let free = cidr.pod_addresses().filter(|a| !used.contains(a));
        let (mut fresh, mut oldest) = (None, None::<(u64, Ipv4Addr)>);
        for a in free {
            match self.quarantined.get(&a) {
                None => {
                    fresh = Some(a);
                    break;
                }
                Some(&until) if oldest.is_none_or(|(u, _)| until < u) => oldest = Some((until, a)),
                Some(_) => {}
            }
        }
        let ip = fresh.or(oldest.map(|(_, a)| a))?;
        self.quarantined.remove(&ip);
        Some(ip)
    }

    /// Puts a deleted endpoint's address in quarantine from `now`.
    pub fn quarantine_ip(&mut self, ip: Ipv4Addr, now: u64) {
        self.quarantined.insert(ip, now + ADDRESS_QUARANTINE_S);
    }

    /// The next free endpoint id (1-65535).
    pub fn allocate_endpoint_id(&mut self) -> Option<u32> {
        for _ in 0..65535 {
            self.next_endpoint_id = self.next_endpoint_id % 65535 + 1;
            if !self.endpoints.contains_key(&self.next_endpoint_id) {
                return Some(self.next_endpoint_id);
            }
        }
        None
    }

    /// Gives every prefix the policies name a CIDR identity (keeping the
    /// numbers of prefixes that stay) and drops the ones no longer named.
    pub fn refresh_cidr_identities(&mut self) -> Result<(), String> {
        let policies: Vec<Policy> = self.policies.values().cloned().collect();
        let mut wanted = policy::cidr::prefixes(&policies);
        // Learned addresses of names a toFQDNs selector matches: /32s.
        wanted.extend(
            self.fqdn_labels()
                .into_keys()
                .map(|ip| IpNet::V4(ipnet::Ipv4Net::from(ip))),
        );
        self.cidr_identities.retain(|p, _| wanted.contains(p));
        let mut used: std::collections::BTreeSet<u32> =
            self.cidr_identities.values().copied().collect();
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
        }
        Ok(())
    }

    /// Every identity with its labels: reserved, pods, CIDRs.
    pub fn all_identities(&self) -> Vec<(u32, LabelSet)> {
        let mut out = self.identities.all();
        out.extend(self.cidr_identity_labels());
        out
    }

    /// The CIDR identities with their labels; a learned address also
    /// carries `fqdn:<selector>` for each toFQDNs selector whose names
    /// resolved to it.
    pub fn cidr_identity_labels(&self) -> Vec<(u32, LabelSet)> {
        let prefixes = self.cidr_identities.keys().copied().collect();
        let fqdn = self.fqdn_labels();
        policy::cidr::identity_labels(&prefixes)
            .into_iter()
            .filter_map(|(prefix, labels)| {
                let id = *self.cidr_identities.get(&prefix)?;
                let extra = match prefix {
                    IpNet::V4(p) if p.prefix_len() == 32 => fqdn.get(&p.addr()),
                    _ => None,
                };
                let labels = match extra {
                    Some(keys) => LabelSet::new(
                        labels
                            .iter()
                            .cloned()
                            .chain(keys.iter().map(|k| policy::Label::new("fqdn", k, "")))
                            .collect(),
                    ),
                    None => labels,
                };
                Some((id, labels))
            })
            .collect()
    }

    /// Learned addresses that a toFQDNs selector selects, with the selectors'
    /// label keys.
    fn fqdn_labels(&self) -> BTreeMap<Ipv4Addr, std::collections::BTreeSet<String>> {
        let mut out: BTreeMap<Ipv4Addr, std::collections::BTreeSet<String>> = BTreeMap::new();
        if self.fqdn.is_empty() {
            return out;
        }
        let selectors = policy::cidr::fqdn_selectors(self.policies.values());
        for (name, entry) in &self.fqdn {
            for sel in selectors.iter().filter(|s| s.matches(name)) {
                for ip in entry.ips.keys() {
                    out.entry(*ip).or_default().insert(sel.label_key());
                }
            }
        }
        out
    }

    /// Declared container ports per identity (union over its endpoints).
    pub fn named_ports(&self) -> BTreeMap<u32, Vec<NamedPort>> {
        let mut out: BTreeMap<u32, Vec<NamedPort>> = BTreeMap::new();
        let with_ports: Vec<&api::Pod> =
            self.pods.values().filter(|p| !p.ports.is_empty()).collect();
        if with_ports.is_empty() {
            return out;
        }
        for e in self.endpoints.values() {
            let Some(pod) = with_ports
                .iter()
                .find(|p| p.namespace == e.namespace && p.name == e.pod)
            else {
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

    pub fn find_endpoint(&self, container_id: &str, ifname: &str) -> Option<&Endpoint> {
        self.endpoints
            .values()
            .find(|e| e.container_id == container_id && e.ifname == ifname)
    }
}

/// Loads and saves the state file.
pub struct Store {
    path: PathBuf,
}

impl Store {
    pub fn new(dir: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::PermissionsExt;
        std::fs::create_dir_all(dir)?;
        // Endpoints, pods and policies are root's alone.
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
        Ok(Self {
            path: dir.join("state.json"),
        })
    }

    pub fn load(&self) -> Result<State, String> {
        match std::fs::read(&self.path) {
            Ok(bytes) => serde_json::from_slice(&bytes)
                .map_err(|e| format!("state file {} is corrupt: {e}", self.path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(State::default()),
            Err(e) => Err(format!("cannot read {}: {e}", self.path.display())),
        }
    }

    /// Writes atomically (temp file + rename).
    pub fn save(&self, state: &State) -> std::io::Result<()> {
        let tmp = self.path.with_extension("json.tmp");
        let bytes = serde_json::to_vec_pretty(state).map_err(std::io::Error::other)?;
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
        std::fs::rename(&tmp, &self.path)
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
    fn ids_and_addresses_are_never_handed_out_twice() {
        let c: Cidr = "10.200.0.0/30".parse().unwrap();
        let mut s = State::default();
        let ip = s.allocate_ip(&c, 0).unwrap();
        let id = s.allocate_endpoint_id().unwrap();
        s.endpoints.insert(
            id,
            Endpoint {
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
            },
        );
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
}
