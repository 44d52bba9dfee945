//! Merging the nodes' streams in time order. A flow is released once every
//! node still streaming has passed its time (its queue holds something
//! later), or has been idle past the drain timeout (a quiet node must not
//! hold the others back forever). Hubble Relay instead sorts inside a
//! fixed window (100 flows or 1 s), so a lagging node's flows come out of
//! order; here a lagging node holds the merge back until it catches up or
//! falls idle.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// The per-node queues of one merged stream.
pub struct Merge<T> {
    nodes: Vec<NodeQueue<T>>,
    drain: Duration,
}

struct NodeQueue<T> {
    queue: VecDeque<(u64, T)>,
    /// Still streaming (not ended, not failed).
    open: bool,
    /// When this node last sent something.
    last_seen: Instant,
}

impl<T> Merge<T> {
    /// `nodes` streams, all just opened at `now`.
    pub fn new(nodes: usize, drain: Duration, now: Instant) -> Self {
        Merge {
            nodes: (0..nodes)
                .map(|_| NodeQueue {
                    queue: VecDeque::new(),
                    open: true,
                    last_seen: now,
                })
                .collect(),
            drain,
        }
    }

    /// A node that joins the merge at `now` (following: a node that came
    /// or came back); its index.
    pub fn add_node(&mut self, now: Instant) -> usize {
        self.nodes.push(NodeQueue {
            queue: VecDeque::new(),
            open: true,
            last_seen: now,
        });
        self.nodes.len() - 1
    }

    /// Node `node` sent `item`, of time `time` (ns since the epoch).
    pub fn push(&mut self, node: usize, time: u64, item: T, now: Instant) {
        let n = &mut self.nodes[node];
        n.queue.push_back((time, item));
        n.last_seen = now;
    }

    /// Node `node`'s stream ended (or failed): it holds nothing back.
    pub fn end(&mut self, node: usize) {
        self.nodes[node].open = false;
    }

    /// The next item in time order, when it can be released at `now`.
    pub fn pop(&mut self, now: Instant) -> Option<T> {
        let mut best: Option<(usize, u64)> = None;
        for (i, n) in self.nodes.iter().enumerate() {
            match n.queue.front() {
                Some((t, _)) if best.is_none_or(|(_, bt)| *t < bt) => best = Some((i, *t)),
                Some(_) => {}
                // A node that may still send something earlier than the
                // best head holds the merge, unless it has been quiet for
                // the drain timeout.
                None if n.open && now.duration_since(n.last_seen) < self.drain => return None,
                None => {}
            }
        }
        let (i, _) = best?;
        self.nodes[i].queue.pop_front().map(|(_, item)| item)
    }

    /// When a node waited for falls idle (the caller wakes up then).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.nodes
            .iter()
            .filter(|n| n.open && n.queue.is_empty())
            .map(|n| n.last_seen + self.drain)
            .min()
    }

    /// Every stream ended and everything was released.
    pub fn done(&self) -> bool {
        self.nodes.iter().all(|n| !n.open && n.queue.is_empty())
    }

    /// Items queued, all nodes.
    pub fn queued(&self) -> usize {
        self.nodes.iter().map(|n| n.queue.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn drain_all(m: &mut Merge<u64>, now: Instant) -> Vec<u64> {
        std::iter::from_fn(|| m.pop(now)).collect()
    }

    #[test]
    fn a_lagging_node_holds_the_merge_until_it_catches_up() {
        let t0 = Instant::now();
        let mut m = Merge::new(2, Duration::from_secs(1), t0);
        // Node 0 is ahead: 10, 20, 30; node 1 has sent nothing yet.
        for t in [10, 20, 30] {
            m.push(0, t, t, t0);
        }
        assert_eq!(drain_all(&mut m, t0), Vec::<u64>::new());
        // Node 1 catches up with 15 and 35: 10, 15, 20, 30 go; 35 waits for
        // node 0 (it may still send something before 35).
        m.push(1, 15, 15, t0);
        m.push(1, 35, 35, t0);
        assert_eq!(drain_all(&mut m, t0), vec![10, 15, 20, 30]);
        assert_eq!(m.queued(), 1);
        // Node 0 goes quiet: after the drain timeout 35 is released.
        let later = t0 + Duration::from_millis(1001);
        assert_eq!(m.next_deadline(), Some(t0 + Duration::from_secs(1)));
        assert_eq!(drain_all(&mut m, later), vec![35]);
    }

    #[test]
    fn ended_nodes_hold_nothing_back_and_the_merge_finishes() {
        let t0 = Instant::now();
        let mut m = Merge::new(3, Duration::from_secs(60), t0);
        m.push(0, 5, 5, t0);
        m.push(2, 1, 1, t0);
        m.end(1);
        // Both open nodes have a head: the earliest goes; then node 2 (open,
        // empty) may still send something before 5.
        assert_eq!(drain_all(&mut m, t0), vec![1]);
        m.end(0);
        m.end(2);
        assert_eq!(drain_all(&mut m, t0), vec![5]);
        assert!(m.done());
    }

    #[test]
    fn interleaved_streams_come_out_sorted() {
        let t0 = Instant::now();
        let mut m = Merge::new(3, Duration::from_secs(60), t0);
        let mut out = Vec::new();
        for round in 0..100u64 {
            for node in 0..3 {
                let t = round * 10 + (node as u64 * 7) % 10;
                m.push(node, t, t, t0);
            }
            out.extend(std::iter::from_fn(|| m.pop(t0)));
        }
        (0..3).for_each(|n| m.end(n));
        out.extend(std::iter::from_fn(|| m.pop(t0)));
        assert_eq!(out.len(), 300);
        assert!(out.windows(2).all(|w| w[0] <= w[1]));
    }
}
