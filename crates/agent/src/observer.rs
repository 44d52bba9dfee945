//! The flow observer: reads datapath events, enriches them into flows and
//! keeps them in the flow ring for `observe` readers.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use flow::record::{from_event, Enricher};
use flow::Endpoint;
use hubble::entry::FlowEntry;

use crate::EndpointIndex;

/// L7 report queues: each thread that reports (a proxy thread per CPU, the
/// DNS proxy's) keeps to its slot's, so that proxy threads on different
/// CPUs do not take one lock and write into one vector's cache lines.
const L7_QUEUES: usize = proxy::workers::THREAD_SLOTS;
/// L7 reports one queue holds at most between two rounds of the events
/// thread (a proxy thread makes at most ~100k a second).
const L7_QUEUE_LIMIT: usize = 1 << 15;
/// Reports' capacity a queue keeps between rounds (a round at 100k
/// reports/s needs ~2,000).
const L7_KEPT_CAPACITY: usize = 4096;

/// A queue of L7 reports, alone on its cache lines.
#[derive(Default)]
#[repr(align(128))]
struct L7Queue(std::sync::Mutex<Vec<flow::record::L7Record>>);

pub struct Observer {
    flows: flow::ring::Shared<Arc<FlowEntry>>,
    /// Hubble's flow metrics, counted as flows arrive.
    pub metrics: flow::metrics::Counters,
    node: String,
    uuid_counter: AtomicU64,
    /// Agent events (endpoint created, policy updated ...).
    agent_events: flow::ring::Shared<Arc<flow::agent_event::AgentEvent>>,
    /// L7 proxy reports not yet made into flows. The proxy only queues
    /// them: enriching a flow costs as much as forwarding a request, and the
    /// events thread does it in batches, on whichever core is free.
    l7_pending: [L7Queue; L7_QUEUES],
}

/// Empties `queues` (each in time order) into `f`, merged in time order.
fn in_time_order(
    queues: &mut [Vec<flow::record::L7Record>],
    mut f: impl FnMut(flow::record::L7Record),
) {
    let mut queues: Vec<_> = queues.iter_mut().map(|q| q.drain(..).peekable()).collect();
    loop {
        let earliest = queues
            .iter_mut()
            .enumerate()
            .filter_map(|(i, q)| Some((q.peek()?.unix_ns, i)))
            .min();
        let Some(r) = earliest.and_then(|(_, i)| queues[i].next()) else {
            return;
        };
        f(r);
    }
}

/// What the observer enriches flows from: the local endpoints by address,
/// and the rule table behind the datapath's policy cookies.
pub struct Sources {
    pub index: EndpointIndex,
    /// Cookie - 1 -> the rule's attribution (see `PolicySync::policy_refs`).
    pub policy_refs: std::sync::Arc<std::sync::RwLock<Vec<flow::record::SharedPolicyRef>>>,
    pub cluster: String,
    pub bare: BareEndpoints,
}

/// The endpoints of addresses no endpoint here owns (the host, the world,
/// other nodes' pods), by identity: made once and shared by their flows,
/// not made anew for each (a host's connection is several flows).
#[derive(Default)]
pub struct BareEndpoints(std::cell::RefCell<HashMap<u32, Arc<Endpoint>>>);

impl BareEndpoints {
    /// Identities kept at most; past it the cache starts again.
    const LIMIT: usize = 4096;

    fn get(&self, identity: u32) -> Arc<Endpoint> {
        let mut cache = self.0.borrow_mut();
        if let Some(e) = cache.get(&identity) {
            return e.clone();
        }
        if cache.len() >= Self::LIMIT {
            cache.clear();
        }
        let e = Arc::new(Endpoint {
            identity,
            labels: policy::identity::reserved_name(identity)
                .map(|n| vec![format!("reserved:{n}")])
                .unwrap_or_default(),
            ..Default::default()
        });
        cache.insert(identity, e.clone());
        e
    }
}

/// A rule's policy as flows name it, with Cilium's derived-from labels.
/// A flow's policy label naming the rule (its index in `spec`/`specs`).
pub const RULE_LABEL: &str = "fibril:io.fibril.policy.rule";
/// A flow's policy label naming the rule's entry (`ingress[1]`: allows
/// first, then denies, in document order).
pub const ENTRY_LABEL: &str = "fibril:io.fibril.policy.entry";

pub fn policy_ref(o: &policy::Origin) -> flow::record::PolicyRef {
    let (namespace, name) = match o.policy.split_once('/') {
        Some((ns, n)) => (ns.to_string(), n.to_string()),
        None => (String::new(), o.policy.to_string()),
    };
    let mut labels = vec![
        format!("k8s:io.cilium.k8s.policy.derived-from={}", o.kind),
        format!("k8s:io.cilium.k8s.policy.name={name}"),
    ];
    if !namespace.is_empty() {
        labels.push(format!("k8s:io.cilium.k8s.policy.namespace={namespace}"));
    }
    // Which of its rules, as `fibril policy trace` names it: Hubble's
    // Policy has no field for it, and its labels are free-form.
    let direction = match o.direction {
        policy::Direction::Ingress => "ingress",
        policy::Direction::Egress => "egress",
    };
    labels.push(format!("{RULE_LABEL}={}", o.rule));
    labels.push(format!("{ENTRY_LABEL}={direction}[{}]", o.entry));
    flow::record::PolicyRef {
        name,
        namespace,
        labels,
        revision: 0,
        kind: o.kind.to_string(),
    }
}

impl Enricher for Sources {
    fn policy(&self, cookie: u32) -> Option<flow::record::SharedPolicyRef> {
        let refs = self.policy_refs.read().unwrap_or_else(|e| e.into_inner());
        refs.get(cookie.checked_sub(1)? as usize).cloned()
    }

    fn interface_name(&self, ifindex: u32) -> Option<flow::record::InlineText> {
        let index = self.index.load();
        index.ifname_by_index.get(&ifindex).cloned()
    }

    fn service(&self, addr: Ipv4Addr, port: u16) -> Option<flow::record::SharedServiceRef> {
        self.index.load().services.get(&(addr, port)).cloned()
    }

    fn endpoint(&self, ip: Ipv4Addr, identity: u32) -> (Arc<Endpoint>, Vec<String>) {
        let index = self.index.load();
        let names = index.names_by_ip.get(&ip).cloned().unwrap_or_default();
        let endpoint = match index.by_ip.get(&ip) {
            Some(m) if m.endpoint.identity == identity => m.endpoint.clone(),
            // An event from before the endpoint's identity changed.
            Some(m) => Arc::new(Endpoint {
                identity,
                ..(*m.endpoint).clone()
            }),
            None => self.bare.get(identity),
        };
        (endpoint, names)
    }
}

impl Observer {
    pub fn new(capacity: usize, node: String) -> Self {
        Self {
            // The capacity was validated at start-up (Agent::new).
            flows: flow::ring::Shared::new(capacity)
                .unwrap_or_else(|_| flow::ring::Shared::new(4095).expect("4095 is 2^12-1")),
            metrics: Default::default(),
            node,
            uuid_counter: AtomicU64::new(0),
            agent_events: flow::ring::Shared::new(1023).expect("1023 is 2^10-1"),
            l7_pending: Default::default(),
        }
    }

    pub fn agent_event(&self, kind: flow::agent_event::Kind) {
        self.agent_events
            .push(Arc::new(flow::agent_event::AgentEvent::now(kind)));
    }

    pub fn agent_events(&self) -> &flow::ring::Shared<Arc<flow::agent_event::AgentEvent>> {
        &self.agent_events
    }

    /// (flows buffered, flows seen since start).
    pub fn counts(&self) -> (usize, u64) {
        let (len, _, seen) = self.flows.counts();
        (len, seen)
    }

    pub fn flows(&self) -> &flow::ring::Shared<Arc<FlowEntry>> {
        &self.flows
    }

    pub fn node_name(&self) -> &str {
        &self.node
    }

    /// Counts and stores a batch (one lock and one reader wake-up).
    fn push_batch(&self, batch: &mut Vec<Arc<FlowEntry>>) {
        for f in batch.iter() {
            self.metrics.observe(f);
        }
        self.flows.push_all(batch.drain(..));
    }

    /// A request or response the L7 proxy reports; it becomes a flow on the
    /// events thread's next round (within its poll interval, 20 ms), as
    /// datapath events do.
    pub fn queue_l7(&self, r: flow::record::L7Record) {
        let queue = &self.l7_pending[proxy::workers::thread_slot()].0;
        let mut pending = queue.lock().unwrap_or_else(|e| e.into_inner());
        if pending.len() >= L7_QUEUE_LIMIT {
            // The events thread is stuck: bounded memory, loss counted.
            drop(pending);
            self.metrics.lost("OBSERVER_EVENTS_QUEUE", 1);
            return;
        }
        pending.push(r);
    }

    /// Turns the queued L7 reports into flows, in the order of their times
    /// (each queue is in order; they are merged). `spares` (empty, one per
    /// queue) become the queues: the vectors keep their capacity, so the
    /// proxy's pushes do not grow one from nothing every round.
    fn flush_l7(
        &self,
        sources: &Sources,
        spares: &mut [Vec<flow::record::L7Record>; L7_QUEUES],
        out: &mut Vec<Arc<FlowEntry>>,
    ) {
        for (queue, spare) in self.l7_pending.iter().zip(spares.iter_mut()) {
            std::mem::swap(
                &mut *queue.0.lock().unwrap_or_else(|e| e.into_inner()),
                spare,
            );
        }
        in_time_order(spares, |r| {
            let n = self.uuid_counter.fetch_add(1, Ordering::Relaxed);
            let uuid = flow::text::flow_uuid(r.unix_ns as u32, 7, n);
            out.push(Arc::new(FlowEntry::new(flow::record::from_l7(
                r, uuid, &self.node, sources,
            ))));
        });
        for spare in spares {
            // A burst's capacity is not kept.
            spare.shrink_to(L7_KEPT_CAPACITY);
        }
    }

    /// Sequence number where a reader asking for the last `n` starts.
    pub fn start_seq(&self, last: usize, follow: bool) -> u64 {
        if last > 0 {
            self.flows.seq_of_last(last)
        } else if follow {
            self.flows.next_seq()
        } else {
            self.flows.oldest_seq()
        }
    }

    /// Flows from `seq` on (waiting up to `wait` for new ones when there
    /// are none), with the count lost to overwrites.
    pub fn read(&self, seq: u64, wait: Duration) -> (u64, Vec<Arc<FlowEntry>>, u64) {
        self.flows.read(seq, wait)
    }

    /// Runs the event reader until `stop` is set: kernel ring buffer ->
    /// flows. Kernel-side losses are reported as a lost-events count.
    pub fn run_reader(
        self: &Arc<Self>,
        mut reader: datapath::EventReader,
        sources: Sources,
        stop: Arc<std::sync::atomic::AtomicBool>,
    ) {
        // bpf_ktime_get_ns() is CLOCK_MONOTONIC; move it onto the wall clock.
        let wall_now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        let offset = wall_now.saturating_sub(datapath::monotonic_ns());
        let mut batch = Vec::new();
        let mut l7_spares = Default::default();
        while !stop.load(Ordering::Relaxed) {
            reader.poll(Duration::from_millis(20), |e| {
                let n = self.uuid_counter.fetch_add(1, Ordering::Relaxed);
                let uuid = flow::text::flow_uuid(offset as u32, 0, n);
                let f = from_event(&e, e.ts_ns + offset, uuid, &self.node, &sources);
                batch.push(Arc::new(FlowEntry::new(f)));
                // Readers see flows in batches of bounded size.
                if batch.len() >= 1024 {
                    self.push_batch(&mut batch);
                }
            });
            self.flush_l7(&sources, &mut l7_spares, &mut batch);
            self.push_batch(&mut batch);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An address no endpoint owns gets its identity's endpoint, made once:
    /// the host's flows share one, labelled as Cilium labels it; the cache
    /// is bounded.
    #[test]
    fn bare_endpoints_are_shared_by_identity() {
        let sources = Sources {
            index: Default::default(),
            policy_refs: Default::default(),
            cluster: "default".into(),
            bare: Default::default(),
        };
        let host = Ipv4Addr::new(10, 0, 0, 1);
        let (a, _) = sources.endpoint(host, abi::identity::HOST);
        let (b, _) = sources.endpoint(Ipv4Addr::new(10, 0, 0, 2), abi::identity::HOST);
        assert!(Arc::ptr_eq(&a, &b));
        assert_eq!(a.identity, abi::identity::HOST);
        assert_eq!(a.labels, ["reserved:host"]);
        let (remote, _) = sources.endpoint(host, 70_000);
        assert_eq!((remote.identity, remote.labels.len()), (70_000, 0));
        for identity in 100_000..100_000 + BareEndpoints::LIMIT as u32 {
            sources.endpoint(host, identity);
        }
        assert!(sources.bare.0.borrow().len() <= BareEndpoints::LIMIT);
        let (c, _) = sources.endpoint(host, abi::identity::HOST);
        assert_eq!(c.labels, ["reserved:host"]);
    }

    /// A report at `unix_ns`, told apart by its client port `tag`.
    fn report(unix_ns: u64, tag: u16) -> flow::record::L7Record {
        flow::record::L7Record {
            unix_ns,
            client: std::net::SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), tag),
            server: std::net::SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 8080),
            client_identity: 1,
            server_identity: 2,
            is_reply: false,
            verdict: flow::enums::Verdict::FORWARDED,
            ingress: true,
            l7: Default::default(),
            protocol: 6,
            decided_by: Arc::new([]),
        }
    }

    /// The proxy threads' queues (each in its own order) become one
    /// sequence in time order; equal times keep the queues' order.
    #[test]
    fn queues_merge_in_time_order() {
        let mut queues = [
            vec![report(10, 1), report(30, 2), report(30, 3), report(70, 4)],
            vec![],
            vec![report(20, 5), report(30, 6), report(60, 7)],
            vec![report(5, 8)],
        ];
        let mut seen = Vec::new();
        in_time_order(&mut queues, |r| seen.push((r.unix_ns, r.client.port())));
        assert_eq!(
            seen,
            [
                (5, 8),
                (10, 1),
                (20, 5),
                (30, 2),
                (30, 3),
                (30, 6),
                (60, 7),
                (70, 4)
            ]
        );
        assert!(queues.iter().all(Vec::is_empty));
    }
}
