//! The datapath: loads the BPF programs of `bpf/`, owns every map, attaches
//! programs to pod veths, and sets up veth pairs and namespaces.
//!
//! Architecture invariant: this is the only crate that knows map and program
//! names, makes BPF syscalls or changes links and namespaces.

mod batch;
pub mod events;
pub mod host_firewall;
pub mod knobs;
pub mod prefilter;
pub mod shortcut;
pub mod socket_lb;

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use abi::{
    CtKey, CtValue, EndpointInfo, EndpointKey, IpcacheValue, LbAffinity, LbAffinityKey, LbBackend,
    LbReverseNat, LbService, LbServiceKey, PolicyKeyData, PolicyValue,
};
use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{HashMap as BpfHashMap, IterableMap, MapData, PerCpuArray, RingBuf};
use aya::programs::links::{FdLink, PinnedLink};
use aya::programs::tc::TcAttachOptions;
use aya::programs::{LinkOrder, SchedClassifier, TcAttachType, TestRun, TestRunOptions};
use aya::{Ebpf, EbpfLoader};

pub use events::EventReader;
pub use host_firewall::{HostPrograms, NetdevHook};
pub use prefilter::{PrefilterCounters, PrefilterMode, PrefilterProgram};

/// The compiled `bpf/lxc.bpf.c`, embedded at build time.
static LXC_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lxc.bpf.o"));
/// The compiled `bpf/overlay.bpf.c`.
static OVERLAY_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/overlay.bpf.o"));

const MAP_IPCACHE: &str = "fibril_ipcache";
const MAP_ENDPOINTS: &str = "fibril_endpoints";
const MAP_POLICY: &str = "fibril_policy";
const MAP_CT: &str = "fibril_ct";
const MAP_CT_BUDGET: &str = "fibril_ct_budget";
const MAP_EVENTS: &str = "fibril_events";
const MAP_LB_SERVICES: &str = "fibril_lb_services";
const MAP_LB_BACKENDS: &str = "fibril_lb_backends";
const MAP_LB_REVERSE_NAT: &str = "fibril_lb_reverse_nat";
const MAP_LB_AFFINITY: &str = "fibril_lb_affinity";
const MAP_LB_MAGLEV: &str = "fibril_lb_maglev";
const MAP_EVENTS_LOST: &str = "fibril_events_lost";
const PROG_FROM_CONTAINER: &str = "from_container";
const PROG_TO_CONTAINER: &str = "to_container";
const PROG_FROM_OVERLAY: &str = "from_overlay";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("loading the BPF object failed: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("BPF program {program}: {source}")]
    Program {
        program: &'static str,
        source: aya::programs::ProgramError,
    },
    #[error("BPF map {map}: {source}")]
    Map {
        map: &'static str,
        source: aya::maps::MapError,
    },
    #[error("BPF map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("link pin {path}: {message}")]
    Link { path: PathBuf, message: String },
    #[error("cgroup {path}: {source}")]
    Cgroup {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("bpffs at {path}: {source}")]
    PinDir {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Load-time settings of the datapath.
#[derive(Clone, Debug)]
pub struct Config {
    /// bpffs directory that holds this datapath's pinned maps and links.
    pub pin_dir: PathBuf,
    /// Pending event bytes that wake the agent's reader (batched wake-ups).
    pub events_wakeup_bytes: u64,
    /// Where L7 redirects go; `None`: L7 rules are not redirected.
    pub proxy: Option<ProxyRedirect>,
    /// Conntrack entries one endpoint's traffic may hold (0: no budget).
    pub ct_endpoint_budget: u32,
    /// The node's VXLAN device (external mode): traffic to endpoints on
    /// other nodes is tunnelled through it. 0: one node, no overlay.
    pub tunnel_ifindex: u32,
    /// Slots of each external frontend's Maglev table (a prime).
    pub maglev_table_size: u32,
    /// Kube-proxy replacement: the host programs serve node ports.
    pub kube_proxy_replacement: bool,
    /// Kube-proxy replacement: the address node ports' connections to
    /// other nodes' backends leave from (the node's; unspecified: none).
    pub nodeport_snat_address: Ipv4Addr,
}

/// The default per-endpoint conntrack budget: a quarter of the table
/// (262,144 entries), so that it takes four flooding pods, not one, to
/// fill it.
pub const DEFAULT_CT_ENDPOINT_BUDGET: u32 = 65_536;

/// The kernel's flag for an inner map whose size may differ from the
/// outer map's template (`BPF_F_INNER_MAP`).
const BPF_F_INNER_MAP: u32 = 1 << 12;

/// How packets reach the L7 proxy: its listener's port on 127.0.0.1, the
/// mark (and policy-routing table) that delivers a packet to the local
/// stack, and the mark of the proxy's upstream sockets. All derive from the
/// port, so agents side by side on one host (labs) never share them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ProxyRedirect {
    pub port: u16,
    /// The DNS proxy's port (UDP and TCP) on 127.0.0.1; 0: none.
    pub dns_port: u16,
    pub mark_to: u32,
    pub mark_from: u32,
    pub table: u32,
}

impl ProxyRedirect {
    pub fn for_port(port: u16) -> Self {
        let p = (port as u32) << 16;
        Self {
            port,
            dns_port: 0,
            mark_to: p | 0x0F1B,
            mark_from: p | 0x0F1C,
            table: 0x0F1B_0000 | port as u32,
        }
    }
}

impl Config {
    pub fn new(pin_dir: impl Into<PathBuf>) -> Self {
        Self {
            pin_dir: pin_dir.into(),
            events_wakeup_bytes: 64 * abi::FlowEvent::SIZE as u64,
            proxy: None,
            ct_endpoint_budget: DEFAULT_CT_ENDPOINT_BUDGET,
            tunnel_ifindex: 0,
            maglev_table_size: abi::MAGLEV_DEFAULT_TABLE_SIZE,
            kube_proxy_replacement: false,
            nodeport_snat_address: Ipv4Addr::UNSPECIFIED,
        }
    }
}

struct Maps {
    ipcache: LpmTrie<MapData, u32, IpcacheValue>,
    endpoints: BpfHashMap<MapData, EndpointKey, EndpointInfo>,
    policy: LpmTrie<MapData, PolicyKeyData, PolicyValue>,
    ct: BpfHashMap<MapData, CtKey, CtValue>,
    ct_budget: BpfHashMap<MapData, u32, abi::CtBudget>,
    events_lost: PerCpuArray<MapData, u64>,
    lb_services: BpfHashMap<MapData, LbServiceKey, LbService>,
    lb_backends: BpfHashMap<MapData, u32, LbBackend>,
    lb_reverse_nat: BpfHashMap<MapData, u16, LbReverseNat>,
    lb_affinity: BpfHashMap<MapData, LbAffinityKey, LbAffinity>,
    prefilter: LpmTrie<MapData, u32, abi::PrefilterValue>,
    prefilter_stats: PerCpuArray<MapData, abi::PrefilterStats>,
    host: aya::maps::Array<MapData, abi::HostEndpoint>,
    lb_maglev: aya::maps::HashOfMaps<MapData, u32, aya::maps::Array<MapData, u32>>,
}

/// One write to the services' maps (`Datapath::lb_apply`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LbWrite {
    Service(LbServiceKey, Option<LbService>),
    Backend(u32, Option<LbBackend>),
    ReverseNat(u16, Option<LbReverseNat>),
}

/// What the services' maps hold (`Datapath::lb_contents`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LbContents {
    pub services: std::collections::BTreeMap<LbServiceKey, LbService>,
    pub backends: std::collections::BTreeMap<u32, LbBackend>,
    pub reverse_nat: std::collections::BTreeMap<u16, LbReverseNat>,
}

/// One policy map entry: key data with its LPM prefix length, and value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PolicyEntry {
    pub prefix_len: u32,
    pub key: PolicyKeyData,
    pub value: PolicyValue,
}

/// The loaded datapath: pinned maps (created on first use, reused after).
pub struct Datapath {
    config: Config,
    maps: Mutex<Maps>,
    events: Mutex<Option<RingBuf<MapData>>>,
    shortcut: Mutex<Option<shortcut::ProxyShortcut>>,
    socket_lb: Mutex<Option<socket_lb::SocketLb>>,
}

fn map_err(map: &'static str) -> impl FnOnce(aya::maps::MapError) -> Error {
    move |source| Error::Map { map, source }
}

/// Every conntrack entry, to `each`: read in batches, key by key on a
/// kernel without batch reads. A read that fails part way stops there,
/// with a warning (it has no cause but a kernel fault).
fn ct_each(ct: &BpfHashMap<MapData, CtKey, CtValue>, mut each: impl FnMut(CtKey, CtValue)) {
    match batch::for_each(ct.map(), &mut each) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
            for (k, v) in ct.iter().filter_map(|e| e.ok()) {
                each(k, v)
            }
        }
        Err(e) => tracing::warn!(error = %e, map = MAP_CT, "reading the conntrack table"),
    }
}

fn prog_err(program: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> Error {
    move |source| Error::Program { program, source }
}

impl Datapath {
    /// Opens the datapath: mounts bpffs if needed, creates or reuses the
    /// pinned maps under `config.pin_dir`.
    pub fn open(config: Config) -> Result<Self, Error> {
        ensure_bpffs(&config.pin_dir)?;
        let mut bpf = loader(&config).load(LXC_OBJECT)?;
        let mut take = |name: &'static str| bpf.take_map(name).ok_or(Error::MissingMap(name));
        let maps = Maps {
            ipcache: LpmTrie::try_from(take(MAP_IPCACHE)?).map_err(map_err(MAP_IPCACHE))?,
            endpoints: BpfHashMap::try_from(take(MAP_ENDPOINTS)?)
                .map_err(map_err(MAP_ENDPOINTS))?,
            policy: LpmTrie::try_from(take(MAP_POLICY)?).map_err(map_err(MAP_POLICY))?,
            ct: BpfHashMap::try_from(take(MAP_CT)?).map_err(map_err(MAP_CT))?,
            ct_budget: BpfHashMap::try_from(take(MAP_CT_BUDGET)?)
                .map_err(map_err(MAP_CT_BUDGET))?,
            events_lost: PerCpuArray::try_from(take(MAP_EVENTS_LOST)?)
                .map_err(map_err(MAP_EVENTS_LOST))?,
            lb_services: BpfHashMap::try_from(take(MAP_LB_SERVICES)?)
                .map_err(map_err(MAP_LB_SERVICES))?,
            lb_backends: BpfHashMap::try_from(take(MAP_LB_BACKENDS)?)
                .map_err(map_err(MAP_LB_BACKENDS))?,
            lb_reverse_nat: BpfHashMap::try_from(take(MAP_LB_REVERSE_NAT)?)
                .map_err(map_err(MAP_LB_REVERSE_NAT))?,
            lb_affinity: BpfHashMap::try_from(take(MAP_LB_AFFINITY)?)
                .map_err(map_err(MAP_LB_AFFINITY))?,
            prefilter: LpmTrie::try_from(take(prefilter::MAP_PREFILTER)?)
                .map_err(map_err(prefilter::MAP_PREFILTER))?,
            prefilter_stats: PerCpuArray::try_from(take(prefilter::MAP_PREFILTER_STATS)?)
                .map_err(map_err(prefilter::MAP_PREFILTER_STATS))?,
            host: aya::maps::Array::try_from(take(host_firewall::MAP_HOST)?)
                .map_err(map_err(host_firewall::MAP_HOST))?,
            lb_maglev: aya::maps::HashOfMaps::try_from(take(MAP_LB_MAGLEV)?)
                .map_err(map_err(MAP_LB_MAGLEV))?,
        };
        let events = RingBuf::try_from(take(MAP_EVENTS)?).map_err(map_err(MAP_EVENTS))?;
        Ok(Self {
            config,
            maps: Mutex::new(maps),
            events: Mutex::new(Some(events)),
            shortcut: Mutex::new(None),
            socket_lb: Mutex::new(None),
        })
    }

    pub fn pin_dir(&self) -> &Path {
        &self.config.pin_dir
    }

    /// Hands out the events ring buffer reader (once).
    pub fn take_event_reader(&self) -> Option<EventReader> {
        self.events
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
            .map(EventReader::new)
    }

    fn maps(&self) -> std::sync::MutexGuard<'_, Maps> {
        self.maps.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Loads one endpoint's programs (its id and address are load-time
    /// constants), without attaching them.
    pub fn load_endpoint_programs(
        &self,
        ep_id: u32,
        ipv4: Ipv4Addr,
    ) -> Result<EndpointPrograms, Error> {
        let addr_be = u32::from(ipv4).to_be();
        let mut l = loader(&self.config);
        knobs::set(&mut l, knobs::ENDPOINT_ID, &ep_id);
        knobs::set(&mut l, knobs::ENDPOINT_IPV4, &addr_be);
        let mut bpf = l.load(LXC_OBJECT)?;
        for name in [PROG_FROM_CONTAINER, PROG_TO_CONTAINER] {
            classifier(&mut bpf, name)?.load().map_err(prog_err(name))?;
        }
        Ok(EndpointPrograms { bpf, ep_id, ipv4 })
    }

    /// Attaches an endpoint's programs to the host side of its veth, or
    /// atomically replaces the programs of links pinned by an earlier run.
    /// Links are pinned, so they stay attached while the agent restarts.
    pub fn attach_endpoint(
        &self,
        ep_id: u32,
        ipv4: Ipv4Addr,
        host_ifname: &str,
    ) -> Result<(), Error> {
        let progs = self.load_endpoint_programs(ep_id, ipv4)?;
        self.attach_programs(progs, host_ifname)
    }

    /// `attach_endpoint` with programs loaded earlier (for the endpoint
    /// they were loaded for: `EndpointPrograms::endpoint`).
    pub fn attach_programs(
        &self,
        mut progs: EndpointPrograms,
        host_ifname: &str,
    ) -> Result<(), Error> {
        let links = self.config.pin_dir.join("links");
        std::fs::create_dir_all(&links).map_err(|source| Error::PinDir {
            path: links.clone(),
            source,
        })?;
        for (name, attach) in [
            (PROG_FROM_CONTAINER, TcAttachType::Ingress),
            (PROG_TO_CONTAINER, TcAttachType::Egress),
        ] {
            attach_pinned(
                &mut progs.bpf,
                name,
                host_ifname,
                attach,
                &links.join(format!("{host_ifname}_{name}")),
            )?;
        }
        Ok(())
    }

    /// Loads the overlay program and attaches it to the node's VXLAN
    /// device (tc ingress), replacing the one a previous run pinned: the
    /// device keeps enforcing while the agent restarts.
    pub fn attach_overlay(&self, ifname: &str) -> Result<(), Error> {
        let links = self.config.pin_dir.join("links");
        std::fs::create_dir_all(&links).map_err(|source| Error::PinDir {
            path: links.clone(),
            source,
        })?;
        let mut bpf = loader(&self.config).load(OVERLAY_OBJECT)?;
        classifier(&mut bpf, PROG_FROM_OVERLAY)?
            .load()
            .map_err(prog_err(PROG_FROM_OVERLAY))?;
        attach_pinned(
            &mut bpf,
            PROG_FROM_OVERLAY,
            ifname,
            TcAttachType::Ingress,
            &links.join(format!("{ifname}_{PROG_FROM_OVERLAY}")),
        )
    }

    /// Detaches an endpoint's programs (removing the pins drops the links).
    pub fn detach_endpoint(&self, host_ifname: &str) {
        for name in [PROG_FROM_CONTAINER, PROG_TO_CONTAINER] {
            let pin = self
                .config
                .pin_dir
                .join("links")
                .join(format!("{host_ifname}_{name}"));
            std::fs::remove_file(pin).ok();
        }
    }

    pub fn upsert_endpoint(&self, ipv4: Ipv4Addr, info: EndpointInfo) -> Result<(), Error> {
        let key = EndpointKey {
            addr: u32::from(ipv4).to_be(),
        };
        self.maps()
            .endpoints
            .insert(key, info, 0)
            .map_err(map_err(MAP_ENDPOINTS))
    }

    pub fn remove_endpoint(&self, ipv4: Ipv4Addr) -> Result<(), Error> {
        let key = EndpointKey {
            addr: u32::from(ipv4).to_be(),
        };
        match self.maps().endpoints.remove(&key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(MAP_ENDPOINTS)(e)),
        }
    }

    pub fn endpoint(&self, ipv4: Ipv4Addr) -> Option<EndpointInfo> {
        let key = EndpointKey {
            addr: u32::from(ipv4).to_be(),
        };
        self.maps().endpoints.get(&key, 0).ok()
    }

    /// Sets an ipcache entry: `identity`, and for an endpoint on another
    /// node the node's address its traffic is tunnelled to.
    pub fn upsert_ipcache(
        &self,
        addr: Ipv4Addr,
        prefix_len: u32,
        identity: u32,
        tunnel_endpoint: Option<Ipv4Addr>,
    ) -> Result<(), Error> {
        let key = Key::new(prefix_len, u32::from(addr).to_be());
        let value = IpcacheValue {
            identity,
            tunnel_endpoint: tunnel_endpoint.map_or(0, |a| u32::from(a).to_be()),
        };
        self.maps()
            .ipcache
            .insert(&key, value, 0)
            .map_err(map_err(MAP_IPCACHE))
    }

    pub fn remove_ipcache(&self, addr: Ipv4Addr, prefix_len: u32) -> Result<(), Error> {
        let key = Key::new(prefix_len, u32::from(addr).to_be());
        match self.maps().ipcache.remove(&key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(MAP_IPCACHE)(e)),
        }
    }

    /// Every ipcache entry: (address, prefix length, identity, tunnel
    /// endpoint).
    #[allow(clippy::type_complexity)]
    pub fn ipcache_entries(&self) -> Result<Vec<(Ipv4Addr, u32, u32, Option<Ipv4Addr>)>, Error> {
        let maps = self.maps();
        let mut out = Vec::new();
        for item in maps.ipcache.iter() {
            let (k, v) = item.map_err(map_err(MAP_IPCACHE))?;
            out.push((
                Ipv4Addr::from(u32::from_be(k.data())),
                k.prefix_len(),
                v.identity,
                (v.tunnel_endpoint != 0).then(|| Ipv4Addr::from(u32::from_be(v.tunnel_endpoint))),
            ));
        }
        Ok(out)
    }

    pub fn upsert_policy(&self, entry: &PolicyEntry) -> Result<(), Error> {
        let key = Key::new(entry.prefix_len, entry.key);
        self.maps()
            .policy
            .insert(&key, entry.value, 0)
            .map_err(map_err(MAP_POLICY))
    }

    pub fn remove_policy(&self, prefix_len: u32, key: PolicyKeyData) -> Result<(), Error> {
        let key = Key::new(prefix_len, key);
        match self.maps().policy.remove(&key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(map_err(MAP_POLICY)(e)),
        }
    }

    /// Every policy entry in the kernel map (used to resync after a restart).
    pub fn policy_entries(&self) -> Result<Vec<PolicyEntry>, Error> {
        let maps = self.maps();
        let mut out = Vec::new();
        for item in maps.policy.iter() {
            let (k, value) = item.map_err(map_err(MAP_POLICY))?;
            out.push(PolicyEntry {
                prefix_len: k.prefix_len(),
                key: k.data(),
                value,
            });
        }
        Ok(out)
    }

    /// Applies writes to the services' maps in order (the caller orders
    /// them so that the datapath never meets a slot naming a backend that
    /// is not there yet, nor a master entry counting slots that are not).
    pub fn lb_apply(&self, writes: &[LbWrite]) -> Result<(), Error> {
        let mut maps = self.maps();
        fn removed(r: Result<(), aya::maps::MapError>, map: &'static str) -> Result<(), Error> {
            match r {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
                Err(e) => Err(map_err(map)(e)),
            }
        }
        for w in writes {
            match *w {
                LbWrite::Service(k, Some(v)) => maps
                    .lb_services
                    .insert(k, v, 0)
                    .map_err(map_err(MAP_LB_SERVICES))?,
                LbWrite::Service(k, None) => removed(maps.lb_services.remove(&k), MAP_LB_SERVICES)?,
                LbWrite::Backend(id, Some(v)) => maps
                    .lb_backends
                    .insert(id, v, 0)
                    .map_err(map_err(MAP_LB_BACKENDS))?,
                LbWrite::Backend(id, None) => {
                    removed(maps.lb_backends.remove(&id), MAP_LB_BACKENDS)?
                }
                LbWrite::ReverseNat(i, Some(v)) => maps
                    .lb_reverse_nat
                    .insert(i, v, 0)
                    .map_err(map_err(MAP_LB_REVERSE_NAT))?,
                LbWrite::ReverseNat(i, None) => {
                    removed(maps.lb_reverse_nat.remove(&i), MAP_LB_REVERSE_NAT)?
                }
            }
        }
        Ok(())
    }

    /// Everything the services' maps hold (an earlier run's entries, at
    /// start: backend and reverse-NAT numbers are kept from them).
    pub fn lb_contents(&self) -> Result<LbContents, Error> {
        let maps = self.maps();
        let mut out = LbContents::default();
        for item in maps.lb_services.iter() {
            let (k, v) = item.map_err(map_err(MAP_LB_SERVICES))?;
            out.services.insert(k, v);
        }
        for item in maps.lb_backends.iter() {
            let (k, v) = item.map_err(map_err(MAP_LB_BACKENDS))?;
            out.backends.insert(k, v);
        }
        for item in maps.lb_reverse_nat.iter() {
            let (k, v) = item.map_err(map_err(MAP_LB_REVERSE_NAT))?;
            out.reverse_nat.insert(k, v);
        }
        Ok(out)
    }

    /// Forgets the ClientIP affinities `doomed` picks (those to backends a
    /// service no longer has). Returns how many.
    pub fn lb_affinity_flush(&self, doomed: impl Fn(&LbAffinityKey, &LbAffinity) -> bool) -> usize {
        let mut maps = self.maps();
        let keys: Vec<LbAffinityKey> = maps
            .lb_affinity
            .iter()
            .filter_map(|e| e.ok())
            .filter(|(k, v)| doomed(k, v))
            .map(|(k, _)| k)
            .collect();
        keys.iter()
            .filter(|k| maps.lb_affinity.remove(k).is_ok())
            .count()
    }

    /// Number of live connection-tracking entries.
    /// Sets an external frontend's Maglev table (by its reverse-NAT
    /// index): `table` backend ids, `maglev_table_size` of them; empty
    /// removes it. A new table replaces the old at once (the outer map
    /// entry is swapped), so no lookup sees half of one.
    pub fn lb_maglev_set(&self, rev_nat: u16, table: &[u32]) -> Result<(), Error> {
        let mut maps = self.maps();
        let key = u32::from(rev_nat);
        if table.is_empty() {
            return match maps.lb_maglev.remove(&key) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
                Err(e) => Err(map_err(MAP_LB_MAGLEV)(e)),
            };
        }
        let mut inner: aya::maps::Array<MapData, u32> =
            aya::maps::Array::create(table.len() as u32, BPF_F_INNER_MAP)
                .map_err(map_err(MAP_LB_MAGLEV))?;
        for (slot, id) in table.iter().enumerate() {
            inner
                .set(slot as u32, id, 0)
                .map_err(map_err(MAP_LB_MAGLEV))?;
        }
        maps.lb_maglev
            .insert(key, &inner, 0)
            .map_err(map_err(MAP_LB_MAGLEV))
    }

    /// The reverse-NAT indexes that have a Maglev table.
    pub fn lb_maglev_keys(&self) -> Vec<u16> {
        self.maps()
            .lb_maglev
            .keys()
            .filter_map(|k| k.ok())
            .filter_map(|k| u16::try_from(k).ok())
            .collect()
    }

    pub fn ct_entries(&self) -> usize {
        let mut n = 0;
        ct_each(&self.maps().ct, |_, _| n += 1);
        n
    }

    /// Every connection-tracking entry (tests and diagnostics).
    pub fn ct_list(&self) -> Vec<(CtKey, CtValue)> {
        let mut out = Vec::new();
        ct_each(&self.maps().ct, |k, v| out.push((k, v)));
        out
    }

    /// Deletes the conntrack entries `doomed` picks (both directions and
    /// every program's view are separate entries; their proxy flags go
    /// with them). Returns how many were deleted.
    pub fn ct_flush(&self, doomed: impl Fn(&CtKey, &CtValue) -> bool) -> usize {
        let mut maps = self.maps();
        let mut keys: Vec<CtKey> = Vec::new();
        ct_each(&maps.ct, |k, v| {
            if doomed(&k, &v) {
                keys.push(k)
            }
        });
        keys.iter().filter(|k| maps.ct.remove(k).is_ok()).count()
    }

    /// Deletes every conntrack entry to or from `addr`.
    pub fn ct_flush_address(&self, addr: Ipv4Addr) -> usize {
        let be = u32::from(addr).to_be();
        self.ct_flush(|k, _| k.saddr == be || k.daddr == be)
    }

    /// One pass over the conntrack table: how many entries it holds, which
    /// addresses live (unexpired) connections lead to or come from, and how
    /// many live entries each endpoint's traffic holds, which is written
    /// back as the endpoints' budget counts (the datapath only counts up;
    /// expired and evicted entries leave the counts here). Costs time in
    /// proportion to the table: run it in the background.
    pub fn ct_census(&self) -> CtCensus {
        let now = monotonic_ns();
        let mut maps = self.maps();
        let ep_of: std::collections::HashMap<u32, u32> = maps
            .endpoints
            .iter()
            .filter_map(|e| e.ok())
            .map(|(k, v)| (k.addr, v.ep_id))
            .collect();
        let mut out = CtCensus::default();
        let mut held: std::collections::HashMap<u32, u32> = Default::default();
        ct_each(&maps.ct, |k, v| {
            out.entries += 1;
            if v.expires_ns > now {
                out.live_addresses
                    .insert(Ipv4Addr::from(u32::from_be(k.saddr)));
                out.live_addresses
                    .insert(Ipv4Addr::from(u32::from_be(k.daddr)));
                // The owner, as the datapath charges it: the sender when
                // it is a local endpoint, else the receiver; with neither,
                // the node itself (the host firewall's connections).
                let owner = ep_of
                    .get(&k.saddr)
                    .or_else(|| ep_of.get(&k.daddr))
                    .copied()
                    .unwrap_or(abi::HOST_ENDPOINT_ID);
                *held.entry(owner).or_default() += 1;
            }
        });
        let budgets: Vec<(u32, abi::CtBudget)> =
            maps.ct_budget.iter().filter_map(|e| e.ok()).collect();
        for (ep, mut b) in budgets {
            out.overflows += b.overflows;
            b.entries = held.get(&ep).copied().unwrap_or(0);
            out.busiest = out.busiest.max(b.entries);
            let _ = maps.ct_budget.insert(ep, b, 0);
        }
        out
    }

    /// Forgets an endpoint's budget (it is gone); returns the new
    /// connections it had refused.
    pub fn ct_budget_forget(&self, ep_id: u32) -> u64 {
        let mut maps = self.maps();
        let overflows = maps.ct_budget.get(&ep_id, 0).map_or(0, |b| b.overflows);
        let _ = maps.ct_budget.remove(&ep_id);
        overflows
    }

    /// Events the kernel could not write because the ring buffer was full.
    pub fn events_lost(&self) -> u64 {
        self.maps()
            .events_lost
            .get(&0, 0)
            .map(|v| v.iter().sum())
            .unwrap_or(0)
    }

    /// Accelerates proxied connections of the processes under `cgroup`
    /// (see `shortcut`); replaces an earlier attachment.
    pub fn attach_proxy_shortcut(&self, cgroup: &Path) -> Result<(), Error> {
        let s = shortcut::ProxyShortcut::attach(&self.config, cgroup)?;
        *self.shortcut.lock().unwrap_or_else(|e| e.into_inner()) = Some(s);
        Ok(())
    }

    /// Load-balances services at the socket calls of the processes under
    /// `cgroup` (only this namespace's with `host_only`); replaces an
    /// earlier attachment.
    pub fn attach_socket_lb(&self, cgroup: &Path, host_only: bool) -> Result<(), Error> {
        let s = socket_lb::SocketLb::attach(&self.config, cgroup, host_only)?;
        *self.socket_lb.lock().unwrap_or_else(|e| e.into_inner()) = Some(s);
        Ok(())
    }

    /// Stops socket load balancing an earlier run left attached.
    pub fn detach_socket_lb(&self) {
        socket_lb::detach(&self.config);
    }

    /// The shortcut's counters, when it is attached.
    pub fn proxy_shortcut_stats(&self) -> Option<shortcut::ShortcutStats> {
        self.shortcut
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            .map(|s| s.stats())
    }

    /// Removes every pinned map and link of this datapath.
    pub fn unpin_all(pin_dir: &Path) {
        std::fs::remove_dir_all(pin_dir).ok();
    }
}

/// What `Datapath::ct_census` found.
#[derive(Debug, Default)]
pub struct CtCensus {
    pub entries: usize,
    pub live_addresses: std::collections::HashSet<Ipv4Addr>,
    /// The most live entries one endpoint's traffic holds.
    pub busiest: u32,
    /// New connections refused at an endpoint's budget, so far (of the
    /// endpoints that are still there).
    pub overflows: u64,
}

/// CLOCK_MONOTONIC in nanoseconds: the clock of `bpf_ktime_get_ns()`, so
/// that event times can be moved onto the wall clock.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid, writable timespec; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// One endpoint's loaded (not necessarily attached) programs; used by the
/// agent to attach and by tests to run packets through BPF_PROG_TEST_RUN.
pub struct EndpointPrograms {
    bpf: Ebpf,
    ep_id: u32,
    ipv4: Ipv4Addr,
}

impl EndpointPrograms {
    /// The endpoint (id, address) the programs were loaded for: constants
    /// in them.
    pub fn endpoint(&self) -> (u32, Ipv4Addr) {
        (self.ep_id, self.ipv4)
    }
}

/// Which program of an endpoint.
#[derive(Clone, Copy, Debug)]
pub enum Hook {
    /// Packets leaving the pod (egress policy).
    FromContainer,
    /// Packets entering the pod (ingress policy).
    ToContainer,
}

/// The outcome of one BPF_PROG_TEST_RUN.
#[derive(Debug)]
pub struct TestRunOutcome {
    /// The tc action code (0 = TC_ACT_OK, 2 = TC_ACT_SHOT, 7 = TC_ACT_REDIRECT).
    pub action: u32,
    pub packet: Vec<u8>,
    /// The kernel's mean time per run, in nanoseconds (`repeat` runs).
    pub ns_per_run: u64,
    /// The packet's mark after the run (runs given a mark only; else 0).
    pub mark: u32,
}

impl EndpointPrograms {
    /// Runs one packet through a program with BPF_PROG_TEST_RUN.
    pub fn test_run(&mut self, hook: Hook, packet: &[u8]) -> Result<TestRunOutcome, Error> {
        self.test_run_repeat(hook, packet, 1)
    }

    /// Runs the same packet `repeat` times in the kernel (one syscall): a
    /// way to make the datapath emit events at its full rate.
    pub fn test_run_repeat(
        &mut self,
        hook: Hook,
        packet: &[u8],
        repeat: u32,
    ) -> Result<TestRunOutcome, Error> {
        let name = match hook {
            Hook::FromContainer => PROG_FROM_CONTAINER,
            Hook::ToContainer => PROG_TO_CONTAINER,
        };
        let prog = classifier(&mut self.bpf, name)?;
        test_run_with(name, packet, repeat, |opts| prog.test_run(opts))
    }
}

/// One BPF_PROG_TEST_RUN of `packet`, `repeat` times, through `run` (the
/// program's own `test_run`), with room for the program to grow it.
pub(crate) fn test_run_with(
    name: &'static str,
    packet: &[u8],
    repeat: u32,
    run: impl FnOnce(
        TestRunOptions<'_>,
    ) -> Result<aya::programs::TestRunResult, aya::programs::ProgramError>,
) -> Result<TestRunOutcome, Error> {
    test_run_marked(name, packet, repeat, None, run)
}

/// `struct __sk_buff`'s size and its `mark`'s offset: a tc program's
/// test run takes the packet's mark (and a few other fields) from it.
const SK_BUFF_SIZE: usize = 192;
const SK_BUFF_MARK: usize = 8;

/// `test_run_with`, the packet carrying `mark` when one is given (the
/// outcome then has the mark the program left).
pub(crate) fn test_run_marked(
    name: &'static str,
    packet: &[u8],
    repeat: u32,
    mark: Option<u32>,
    run: impl FnOnce(
        TestRunOptions<'_>,
    ) -> Result<aya::programs::TestRunResult, aya::programs::ProgramError>,
) -> Result<TestRunOutcome, Error> {
    let mut out = vec![0u8; packet.len() + 256];
    let mut ctx_in = [0u8; SK_BUFF_SIZE];
    let mut ctx_out = [0u8; SK_BUFF_SIZE];
    if let Some(m) = mark {
        ctx_in[SK_BUFF_MARK..SK_BUFF_MARK + 4].copy_from_slice(&m.to_ne_bytes());
    }
    let res = run(TestRunOptions {
        data_in: Some(packet),
        data_out: Some(&mut out),
        ctx_in: mark.is_some().then_some(&ctx_in[..]),
        ctx_out: mark.is_some().then_some(&mut ctx_out[..]),
        repeat: repeat.max(1),
        ..Default::default()
    })
    .map_err(prog_err(name))?;
    out.truncate(res.data_size_out as usize);
    let mut mark_out = [0u8; 4];
    mark_out.copy_from_slice(&ctx_out[SK_BUFF_MARK..SK_BUFF_MARK + 4]);
    Ok(TestRunOutcome {
        action: res.return_value,
        packet: out,
        ns_per_run: res.duration.as_nanos() as u64,
        mark: u32::from_ne_bytes(mark_out),
    })
}

/// A loader that shares the pinned maps of `config.pin_dir`.
fn pinned_loader(config: &Config) -> EbpfLoader<'_> {
    let mut l = EbpfLoader::new();
    l.default_map_pin_directory(&config.pin_dir);
    l
}

/// The endpoint programs' loader: pinned maps and load-time settings.
fn loader(config: &Config) -> EbpfLoader<'_> {
    let mut l = pinned_loader(config);
    knobs::set(
        &mut l,
        knobs::EVENTS_WAKEUP_BYTES,
        &config.events_wakeup_bytes,
    );
    knobs::set(
        &mut l,
        knobs::CT_ENDPOINT_BUDGET,
        &config.ct_endpoint_budget,
    );
    knobs::set(&mut l, knobs::TUNNEL_IFINDEX, &config.tunnel_ifindex);
    knobs::set(
        &mut l,
        knobs::LB_MAGLEV_TABLE_SIZE,
        &config.maglev_table_size,
    );
    if let Some(p) = &config.proxy {
        knobs::set(&mut l, knobs::PROXY_PORT, &p.port);
        knobs::set(&mut l, knobs::DNS_PROXY_PORT, &p.dns_port);
        knobs::set(&mut l, knobs::PROXY_MARK_TO, &p.mark_to);
        knobs::set(&mut l, knobs::PROXY_MARK_FROM, &p.mark_from);
    }
    l
}

/// Attaches program `name` of `bpf` to `ifname` (TCX, `attach` side), or
/// atomically replaces the program of the link a previous run pinned at
/// `pin`; the link is pinned there, so it outlives this process.
fn attach_pinned(
    bpf: &mut Ebpf,
    name: &'static str,
    ifname: &str,
    attach: TcAttachType,
    pin: &Path,
) -> Result<(), Error> {
    let prog = classifier(bpf, name)?;
    let link_id = match PinnedLink::from_pin(pin) {
        Ok(old) => {
            let link = FdLink::from(old).try_into().map_err(|e| Error::Link {
                path: pin.into(),
                message: format!("{e}"),
            })?;
            // The old pin is replaced below by the same link.
            std::fs::remove_file(pin).ok();
            prog.attach_to_link(link).map_err(prog_err(name))?
        }
        Err(_) => prog
            .attach_with_options(
                ifname,
                attach,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
            .map_err(prog_err(name))?,
    };
    let link = prog.take_link(link_id).map_err(prog_err(name))?;
    let fd_link: FdLink = link.try_into().map_err(|e| Error::Link {
        path: pin.into(),
        message: format!("{e}"),
    })?;
    fd_link.pin(pin).map_err(|e| Error::Link {
        path: pin.into(),
        message: format!("{e}"),
    })?;
    Ok(())
}

fn classifier<'a>(bpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut SchedClassifier, Error> {
    program(bpf, name)
}

/// A program of `bpf` by name, as its type (`SchedClassifier`, `SockOps`...).
fn program<'a, P>(bpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, Error>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = aya::programs::ProgramError>,
{
    let prog = bpf.program_mut(name).ok_or(Error::Program {
        program: name,
        source: aya::programs::ProgramError::NotLoaded,
    })?;
    prog.try_into().map_err(prog_err(name))
}

/// Makes sure bpffs is mounted at /sys/fs/bpf and `dir` exists on it.
fn ensure_bpffs(dir: &Path) -> Result<(), Error> {
    netns::bpffs::ensure_dir(dir).map_err(|source| Error::PinDir {
        path: dir.into(),
        source,
    })
}
