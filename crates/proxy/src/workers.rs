//! The HTTP proxy's threads: one per CPU the agent may run on, each pinned
//! to its CPU, and each connection served by the thread of the CPU it
//! arrived on (`SO_INCOMING_CPU`: the CPU that processed its handshake,
//! the client's). Client, proxy and, by the kernel's wake-affine
//! placement, server then tend to share a CPU: every hand-off of a request
//! is a switch on that CPU instead of a wake-up on another one (an
//! inter-processor interrupt, and in a VM an exit). On the lab's 2-vCPU VM
//! (6 interleaved rounds against round-robin over unpinned threads) this
//! took proxied requests from 36k to 50k per second at 4 connections and
//! from 40k to 43k at 16.

use std::net::TcpStream;

/// A proxy thread's event loop and the CPU it is pinned to (None: not
/// pinned, e.g. pinning was refused).
#[derive(Clone, Debug)]
pub struct Worker {
    pub cpu: Option<usize>,
    pub handle: tokio::runtime::Handle,
}

/// The CPUs this process may run on (its affinity mask, which a cpuset
/// cgroup narrows), in order. Empty if the mask cannot be read.
pub fn allowed_cpus() -> Vec<usize> {
    use nix::sched::{sched_getaffinity, CpuSet};
    let Ok(set) = sched_getaffinity(nix::unistd::Pid::from_raw(0)) else {
        return Vec::new();
    };
    (0..CpuSet::count())
        .filter(|&c| set.is_set(c).unwrap_or(false))
        .collect()
}

/// Pins the calling thread to `cpu`.
pub fn pin_current_thread(cpu: usize) -> nix::Result<()> {
    let mut set = nix::sched::CpuSet::new();
    set.set(cpu)?;
    nix::sched::sched_setaffinity(nix::unistd::Pid::from_raw(0), &set)
}

/// Hands out connections: to the worker pinned to the connection's
/// incoming CPU, else round-robin.
pub struct Router {
    workers: Vec<Worker>,
    next: usize,
}

impl Router {
    /// `workers` must not be empty.
    pub fn new(workers: Vec<Worker>) -> Self {
        Self { workers, next: 0 }
    }

    /// The worker for a connection whose handshake was processed on
    /// `incoming_cpu`.
    pub fn pick(&mut self, incoming_cpu: Option<usize>) -> &Worker {
        let pinned = incoming_cpu.and_then(|c| self.workers.iter().position(|w| w.cpu == Some(c)));
        let i = pinned.unwrap_or_else(|| {
            self.next = self.next.wrapping_add(1);
            self.next % self.workers.len()
        });
        &self.workers[i]
    }
}

/// Slots of per-thread counters and queues: one for each proxy thread of a
/// 2-4 CPU node and the DNS proxy's; more threads share.
pub const THREAD_SLOTS: usize = 4;

/// The calling thread's slot (below `THREAD_SLOTS`, taken in turn in the
/// order threads first ask), so that threads on different CPUs write to
/// different cache lines of a shared counter or queue.
pub fn thread_slot() -> usize {
    thread_number() % THREAD_SLOTS
}

/// 0, 1, 2 ... in the order threads first ask.
fn thread_number() -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static NUMBER: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    NUMBER.with(|n| *n)
}

/// The CPU that processed `stream`'s last incoming packet.
pub fn incoming_cpu(stream: &TcpStream) -> Option<usize> {
    socket2::SockRef::from(stream).cpu_affinity().ok()
}

/// Serves HTTP on `listener` from one thread per allowed CPU, each pinned
/// to its CPU with an event loop of its own (a current-thread runtime: no
/// work stealing); the acceptor's thread is the first of them. Returns once
/// the threads run; they serve until the process ends.
pub fn spawn_http(
    listener: std::net::TcpListener,
    policy: std::sync::Arc<dyn crate::Policy>,
    config: crate::http::Config,
    stats: std::sync::Arc<crate::Stats>,
) -> std::io::Result<()> {
    let cpus = allowed_cpus();
    let first_cpu = cpus.first().copied();
    let acceptor = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut workers = vec![Worker {
        cpu: first_cpu,
        handle: acceptor.handle().clone(),
    }];
    for (i, &cpu) in cpus.iter().enumerate().skip(1) {
        let worker = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let cpu = Some(cpu);
        workers.push(Worker {
            cpu,
            handle: worker.handle().clone(),
        });
        std::thread::Builder::new()
            .name(format!("proxy-{i}"))
            .spawn(move || {
                pin_or_warn(cpu);
                worker.block_on(std::future::pending::<()>())
            })?;
    }
    tracing::info!(cpus = ?cpus, "HTTP proxy: one thread per CPU");
    std::thread::Builder::new()
        .name("proxy".into())
        .spawn(move || {
            let _guard = acceptor.enter();
            pin_or_warn(first_cpu);
            let serve = crate::http::serve(listener, policy, config, stats, workers);
            if let Err(e) = acceptor.block_on(serve) {
                tracing::error!(error = %e, "L7 proxy stopped");
            }
        })?;
    Ok(())
}

/// Pins a proxy thread to its CPU. If that is refused, the thread runs
/// unpinned: its connections still come to it, only less often from its
/// own CPU.
fn pin_or_warn(cpu: Option<usize>) {
    if let Some(cpu) = cpu {
        if let Err(e) = pin_current_thread(cpu) {
            tracing::warn!(cpu, error = %e, "could not pin an HTTP proxy thread");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker(cpu: Option<usize>) -> Worker {
        Worker {
            cpu,
            handle: tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap()
                .handle()
                .clone(),
        }
    }

    #[test]
    fn connections_go_to_their_cpus_worker_and_the_rest_round_robin() {
        let mut r = Router::new(vec![worker(Some(0)), worker(Some(3)), worker(None)]);
        assert_eq!(r.pick(Some(3)).cpu, Some(3));
        assert_eq!(r.pick(Some(0)).cpu, Some(0));
        // A CPU without a worker, or none known: every worker in turn.
        let spread: Vec<_> = (0..6).map(|_| r.pick(Some(7)).cpu).collect();
        for cpu in [Some(0), Some(3), None] {
            assert_eq!(spread.iter().filter(|c| **c == cpu).count(), 2);
        }
        let first = r.pick(None).cpu;
        assert_ne!(r.pick(None).cpu, first);
    }

    #[test]
    fn threads_get_numbers_of_their_own_and_counters_sum_their_slots() {
        let counter = std::sync::Arc::new(crate::Counter::default());
        let mut slots: Vec<usize> = (0..6)
            .map(|_| {
                let c = counter.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        c.inc();
                    }
                    assert!(thread_slot() < THREAD_SLOTS);
                    thread_number()
                })
            })
            .map(|t| t.join().unwrap())
            .collect();
        assert_eq!(counter.get(), 6000);
        slots.sort();
        slots.dedup();
        assert_eq!(slots.len(), 6);
        assert_eq!(thread_slot(), thread_slot());
    }

    /// The kernel reports the client's CPU for a loopback connection: a
    /// client pinned to each CPU in turn is routed to that CPU's worker.
    #[test]
    fn the_incoming_cpu_is_the_clients() {
        let cpus = allowed_cpus();
        assert!(!cpus.is_empty());
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut router = Router::new(cpus.iter().map(|&c| worker(Some(c))).collect());
        for &cpu in &cpus {
            let client = std::thread::spawn(move || {
                pin_current_thread(cpu).unwrap();
                let mut s = TcpStream::connect(addr).unwrap();
                std::io::Write::write_all(&mut s, b"x").unwrap();
                s
            });
            let (mut accepted, _) = listener.accept().unwrap();
            std::io::Read::read_exact(&mut accepted, &mut [0u8; 1]).unwrap();
            // Kept open until checked: closing it here would send a FIN
            // from this thread's CPU.
            let _client = client.join().unwrap();
            assert_eq!(incoming_cpu(&accepted), Some(cpu));
            assert_eq!(router.pick(incoming_cpu(&accepted)).cpu, Some(cpu));
        }
    }
}
