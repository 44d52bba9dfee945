//! Services into the datapath's load balancer (`bpf/lib/lb.h`). Each
//! frontend (address, port, protocol) is a master entry plus one slot per
//! backend taking new connections; backends have ids, shared between
//! frontends and kept while any frontend names them (terminating ones too,
//! so the connections they hold stay); each frontend address and port has
//! a reverse-NAT index. A commit writes only the frontends of the services
//! it touched, and only entries that differ from the kernel's, in an order
//! the datapath never trips on: backends and reverse-NAT entries first,
//! then slots, then the master entries that count them; removals the other
//! way round. Ids are taken back from the kernel at start, so connections
//! keep their backends across an agent restart.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddrV4};

use abi::{LbBackend, LbReverseNat, LbService, LbServiceKey, LB_SVC_F_AFFINITY, LB_SVC_F_EXTERNAL};
use datapath::{Datapath, LbContents, LbWrite};

use crate::state::State;
use crate::Error;

/// A backend as the datapath knows it: address and port, protocol.
type BackendAt = (SocketAddrV4, u8);

/// One frontend as written.
#[derive(Clone, Debug)]
struct Written {
    master: LbServiceKey,
    rev_nat: u16,
    /// Backend ids in slots 1..
    active: Vec<u32>,
    /// Every backend id it names (active and terminating).
    named: Vec<u32>,
    /// Balanced by a Maglev table (reached from outside, kube-proxy
    /// replacement).
    maglev: bool,
}

#[derive(Default)]
pub struct LbSync {
    /// The services' maps as the kernel holds them.
    kernel: LbContents,
    backend_ids: HashMap<BackendAt, u32>,
    /// `backend_ids` the other way (an id is taken; whose it is).
    backend_at: HashMap<u32, BackendAt>,
    backend_refs: HashMap<u32, usize>,
    rev_nat_ids: HashMap<SocketAddrV4, u16>,
    /// `rev_nat_ids` the other way.
    rev_nat_at: HashMap<u16, SocketAddrV4>,
    rev_nat_refs: HashMap<u16, usize>,
    /// Each service's frontends as written, by service key.
    written: HashMap<String, Vec<Written>>,
    /// Which service owns each frontend (a second service naming the same
    /// address and port is refused there).
    owner: HashMap<LbServiceKey, String>,
    next_backend: u32,
    next_rev_nat: u16,
    /// This node's name (`internalTrafficPolicy: Local` balances over its
    /// own backends).
    node: String,
    /// Kube-proxy replacement: node ports on these addresses, external
    /// frontends balanced by Maglev tables of this size.
    node_ports: Option<NodePorts>,
    /// Each external frontend's Maglev table as written (by reverse-NAT
    /// index).
    maglev: HashMap<u16, Vec<u32>>,
}

/// What kube-proxy replacement serves: node ports on the node's
/// addresses, and Maglev's table size for traffic from outside.
#[derive(Clone, Debug)]
pub struct NodePorts {
    pub addresses: Vec<Ipv4Addr>,
    pub maglev_table_size: u32,
}

fn master_key(address: Ipv4Addr, port: u16, protocol: u8) -> LbServiceKey {
    LbServiceKey {
        address: u32::from(address).to_be(),
        dport: port.to_be(),
        slot: 0,
        protocol,
        scope: 0,
        pad: 0,
    }
}

impl LbSync {
    /// Takes over what an earlier run left in the kernel: its backend and
    /// reverse-NAT numbers are kept for the same backends and frontends.
    pub fn open(
        datapath: &Datapath,
        node: &str,
        node_ports: Option<NodePorts>,
    ) -> Result<Self, Error> {
        let kernel = datapath.lb_contents()?;
        let mut sync = LbSync {
            next_backend: 1,
            next_rev_nat: 1,
            node: node.to_string(),
            node_ports,
            ..Default::default()
        };
        // Tables an earlier run wrote: rewritten by the first (full) apply,
        // removed there if no frontend wants them.
        for rev_nat in datapath.lb_maglev_keys() {
            sync.maglev.insert(rev_nat, Vec::new());
        }
        for (id, b) in &kernel.backends {
            let at = SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(b.address)),
                u16::from_be(b.port),
            );
            sync.backend_ids.insert((at, b.protocol), *id);
            sync.backend_at.insert(*id, (at, b.protocol));
        }
        for (id, r) in &kernel.reverse_nat {
            let at = SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(r.address)),
                u16::from_be(r.port),
            );
            sync.rev_nat_ids.insert(at, *id);
            sync.rev_nat_at.insert(*id, at);
        }
        sync.kernel = kernel;
        Ok(sync)
    }

    fn backend_id(&mut self, at: BackendAt) -> Result<u32, Error> {
        if let Some(id) = self.backend_ids.get(&at) {
            return Ok(*id);
        }
        for _ in 0..=u16::MAX as u32 + 1 {
            let id = self.next_backend;
            self.next_backend = self.next_backend.wrapping_add(1).max(1);
            if !self.backend_at.contains_key(&id) && !self.kernel.backends.contains_key(&id) {
                self.backend_ids.insert(at, id);
                self.backend_at.insert(id, at);
                return Ok(id);
            }
        }
        Err(crate::invalid("no free backend id"))
    }

    /// Backend `id` is no one's any more.
    fn forget_backend(&mut self, id: u32) {
        if let Some(at) = self.backend_at.remove(&id) {
            self.backend_ids.remove(&at);
        }
    }

    /// Reverse-NAT index `id` is no one's any more.
    fn forget_rev_nat(&mut self, id: u16) {
        if let Some(at) = self.rev_nat_at.remove(&id) {
            self.rev_nat_ids.remove(&at);
        }
    }

    fn rev_nat_id(&mut self, at: SocketAddrV4) -> Result<u16, Error> {
        if let Some(id) = self.rev_nat_ids.get(&at) {
            return Ok(*id);
        }
        for _ in 0..=u16::MAX {
            let id = self.next_rev_nat;
            self.next_rev_nat = self.next_rev_nat.wrapping_add(1).max(1);
            if !self.rev_nat_at.contains_key(&id) && !self.kernel.reverse_nat.contains_key(&id) {
                self.rev_nat_ids.insert(at, id);
                self.rev_nat_at.insert(id, at);
                return Ok(id);
            }
        }
        Err(crate::invalid("no free reverse-NAT index"))
    }

    /// Brings the kernel in line with the services `touched` (all of them
    /// when `None`, which also removes whatever else the kernel holds).
    pub fn apply(
        &mut self,
        state: &State,
        datapath: &Datapath,
        touched: Option<&BTreeSet<String>>,
    ) -> Result<(), Error> {
        let keys: BTreeSet<String> = match touched {
            Some(t) => t.clone(),
            None => state
                .services()
                .keys()
                .chain(self.written.keys())
                .cloned()
                .collect(),
        };
        let mut ups: Vec<LbWrite> = Vec::new(); // backends, reverse NAT
        let mut slots: Vec<LbWrite> = Vec::new();
        let mut masters: Vec<LbWrite> = Vec::new();
        let mut master_removals: Vec<LbWrite> = Vec::new();
        let mut slot_removals: Vec<LbWrite> = Vec::new();
        let mut left_active: HashSet<(u16, u32)> = HashSet::new();
        let mut released_backends: Vec<u32> = Vec::new();
        let mut released_rev_nats: Vec<u16> = Vec::new();
        let mut maglev_writes: Vec<(u16, Vec<u32>)> = Vec::new();
        let node_addresses = self
            .node_ports
            .as_ref()
            .map(|n| n.addresses.clone())
            .unwrap_or_default();

        for key in &keys {
            let old = self.written.remove(key).unwrap_or_default();
            for w in &old {
                self.owner.remove(&w.master);
            }
            let mut new: Vec<Written> = Vec::new();
            if let Some(svc) = state.services().get(key) {
                let affinity = svc.affinity_timeout_s;
                for f in svc.frontends_with_node_ports(Some(&self.node), &node_addresses) {
                    let proto = f.protocol.number();
                    let master = master_key(f.address, f.port, proto);
                    if let Some(other) = self.owner.get(&master) {
                        tracing::warn!(
                            service = %key,
                            other = %other,
                            frontend = %format!("{}:{}/{}", f.address, f.port, f.protocol),
                            "frontend already belongs to another service; skipped"
                        );
                        continue;
                    }
                    self.owner.insert(master, key.clone());
                    let rev_nat = self.rev_nat_id(SocketAddrV4::new(f.address, f.port))?;
                    *self.rev_nat_refs.entry(rev_nat).or_default() += 1;
                    let rn = LbReverseNat {
                        address: master.address,
                        port: master.dport,
                        pad: 0,
                    };
                    if self.kernel.reverse_nat.get(&rev_nat) != Some(&rn) {
                        ups.push(LbWrite::ReverseNat(rev_nat, Some(rn)));
                    }
                    let mut active = Vec::new();
                    let mut named = Vec::new();
                    for (at, is_active) in f
                        .active
                        .iter()
                        .map(|a| (a, true))
                        .chain(f.terminating.iter().map(|a| (a, false)))
                    {
                        let id = self.backend_id((*at, proto))?;
                        *self.backend_refs.entry(id).or_default() += 1;
                        let be = LbBackend {
                            address: u32::from(*at.ip()).to_be(),
                            port: at.port().to_be(),
                            protocol: proto,
                            flags: 0,
                        };
                        if self.kernel.backends.get(&id) != Some(&be) {
                            ups.push(LbWrite::Backend(id, Some(be)));
                        }
                        named.push(id);
                        if is_active {
                            active.push(id);
                        }
                    }
                    for (i, id) in active.iter().enumerate() {
                        let k = LbServiceKey {
                            slot: i as u16 + 1,
                            ..master
                        };
                        let v = LbService {
                            backend_id: *id,
                            ..Default::default()
                        };
                        if self.kernel.services.get(&k) != Some(&v) {
                            slots.push(LbWrite::Service(k, Some(v)));
                        }
                    }
                    // From outside (with kube-proxy replacement): Maglev.
                    let maglev = self
                        .node_ports
                        .as_ref()
                        .filter(|_| f.external)
                        .map(|n| n.maglev_table_size);
                    if let Some(m) = maglev {
                        let names: Vec<String> = f.active.iter().map(|a| a.to_string()).collect();
                        let table: Vec<u32> = crate::maglev::table(&names, m)
                            .into_iter()
                            .map(|i| active[i as usize])
                            .collect();
                        maglev_writes.push((rev_nat, table));
                    }
                    let mut flags = if affinity.is_some() {
                        LB_SVC_F_AFFINITY
                    } else {
                        0
                    };
                    if maglev.is_some() {
                        flags |= LB_SVC_F_EXTERNAL;
                    }
                    let m = LbService {
                        backend_id: 0,
                        count: active.len() as u16,
                        rev_nat,
                        affinity_timeout_s: affinity.unwrap_or(0),
                        flags,
                    };
                    if self.kernel.services.get(&master) != Some(&m) {
                        masters.push(LbWrite::Service(master, Some(m)));
                    }
                    new.push(Written {
                        master,
                        rev_nat,
                        active,
                        named,
                        maglev: maglev.is_some(),
                    });
                }
            }
            // What the old frontends had and the new ones do not.
            for w in &old {
                let now = new.iter().find(|n| n.master == w.master);
                let kept_slots = now.map_or(0, |n| n.active.len());
                if now.is_none() {
                    master_removals.push(LbWrite::Service(w.master, None));
                }
                for slot in kept_slots + 1..=w.active.len() {
                    slot_removals.push(LbWrite::Service(
                        LbServiceKey {
                            slot: slot as u16,
                            ..w.master
                        },
                        None,
                    ));
                }
                let still: HashSet<u32> = now
                    .map(|n| n.active.iter().copied().collect())
                    .unwrap_or_default();
                for id in &w.active {
                    if !still.contains(id) {
                        left_active.insert((w.rev_nat, *id));
                    }
                }
                for id in &w.named {
                    released_backends.push(*id);
                }
                released_rev_nats.push(w.rev_nat);
            }
            if !new.is_empty() {
                self.written.insert(key.clone(), new);
            }
        }
        // References the old frontends held go only now, so an id both
        // released and taken again in this commit is never freed.
        let mut gone_backends = Vec::new();
        for id in released_backends {
            let refs = self.backend_refs.entry(id).or_default();
            *refs = refs.saturating_sub(1);
            if *refs == 0 {
                self.backend_refs.remove(&id);
                gone_backends.push(id);
            }
        }
        let mut gone_rev_nats = Vec::new();
        for id in released_rev_nats {
            let refs = self.rev_nat_refs.entry(id).or_default();
            *refs = refs.saturating_sub(1);
            if *refs == 0 {
                self.rev_nat_refs.remove(&id);
                gone_rev_nats.push(id);
            }
        }
        let mut removals: Vec<LbWrite> = Vec::new();
        for id in gone_backends {
            self.forget_backend(id);
            removals.push(LbWrite::Backend(id, None));
        }
        for id in gone_rev_nats {
            self.forget_rev_nat(id);
            removals.push(LbWrite::ReverseNat(id, None));
        }
        // A full sync also clears what no service names (an earlier run's).
        if touched.is_none() {
            // Each written frontend's slots.
            let wanted_masters: HashMap<LbServiceKey, usize> = self
                .written
                .values()
                .flatten()
                .map(|w| (w.master, w.active.len()))
                .collect();
            let (mut forgotten_backends, mut forgotten_rev_nats) = (Vec::new(), Vec::new());
            for k in self.kernel.services.keys() {
                let master = LbServiceKey { slot: 0, ..*k };
                let keep = wanted_masters
                    .get(&master)
                    .is_some_and(|slots| k.slot == 0 || (k.slot as usize) <= *slots);
                if !keep {
                    let w = LbWrite::Service(*k, None);
                    if k.slot == 0 {
                        master_removals.push(w);
                    } else {
                        slot_removals.push(w);
                    }
                }
            }
            for id in self.kernel.backends.keys() {
                if !self.backend_refs.contains_key(id) {
                    forgotten_backends.push(*id);
                    removals.push(LbWrite::Backend(*id, None));
                }
            }
            for id in self.kernel.reverse_nat.keys() {
                if !self.rev_nat_refs.contains_key(id) {
                    forgotten_rev_nats.push(*id);
                    removals.push(LbWrite::ReverseNat(*id, None));
                }
            }
            for id in forgotten_backends {
                self.forget_backend(id);
            }
            for id in forgotten_rev_nats {
                self.forget_rev_nat(id);
            }
        }
        let writes: Vec<LbWrite> = ups
            .into_iter()
            .chain(slots)
            .chain(masters)
            .chain(master_removals)
            .chain(slot_removals)
            .chain(removals)
            .collect();
        if !writes.is_empty() {
            datapath.lb_apply(&writes)?;
            for w in &writes {
                match *w {
                    LbWrite::Service(k, v) => put(&mut self.kernel.services, k, v),
                    LbWrite::Backend(k, v) => put(&mut self.kernel.backends, k, v),
                    LbWrite::ReverseNat(k, v) => put(&mut self.kernel.reverse_nat, k, v),
                }
            }
        }
        // Maglev tables: the new and changed ones (their backends and
        // masters are in place), then those no written frontend has.
        for (rev_nat, table) in maglev_writes {
            if self.maglev.get(&rev_nat) != Some(&table) {
                datapath.lb_maglev_set(rev_nat, &table)?;
                self.maglev.insert(rev_nat, table);
            }
        }
        let wanted: HashSet<u16> = self
            .written
            .values()
            .flatten()
            .filter(|w| w.maglev)
            .map(|w| w.rev_nat)
            .collect();
        let stale: Vec<u16> = self
            .maglev
            .keys()
            .filter(|r| !wanted.contains(r))
            .copied()
            .collect();
        for rev_nat in stale {
            datapath.lb_maglev_set(rev_nat, &[])?;
            self.maglev.remove(&rev_nat);
        }
        if !left_active.is_empty() {
            datapath.lb_affinity_flush(|k, v| left_active.contains(&(k.rev_nat, v.backend_id)));
        }
        Ok(())
    }

    /// Each frontend (address, port) and the service it belongs to, for
    /// the flows' service names.
    pub fn frontend_owners(&self) -> Vec<((Ipv4Addr, u16), String)> {
        self.owner
            .iter()
            .map(|(k, svc)| {
                (
                    (
                        Ipv4Addr::from(u32::from_be(k.address)),
                        u16::from_be(k.dport),
                    ),
                    svc.clone(),
                )
            })
            .collect()
    }

    /// Entries the kernel holds (tests, `status`).
    pub fn kernel(&self) -> &LbContents {
        &self.kernel
    }
}

fn put<K: Ord, V>(m: &mut BTreeMap<K, V>, k: K, v: Option<V>) {
    match v {
        Some(v) => m.insert(k, v),
        None => m.remove(&k),
    };
}
