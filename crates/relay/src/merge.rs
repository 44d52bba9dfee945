//! Merging the nodes' streams in time order. Each node's stream is in
//! time order, so a node with flows queued holds nothing back. A node
//! with none queued holds back a flow of time `t` until it sends something
//! at or after `t`, or until it has been silent for the drain timeout and
//! `t` is older than the drain timeout: a node that stalls cannot hold the
//! others forever, and a quiet node that wakes up (its flows reach the
//! relay within the drain timeout) still comes in order. Hubble Relay
//! instead sorts inside a fixed window (100 flows or 1 s), so a lagging
//! node's flows come out of order. Times are ns since the epoch: the
//! flows' own, compared with the relay's clock (nodes' clocks are assumed
//! in step, as NTP keeps them).

use std::collections::VecDeque;

/// The per-node queues of one merged stream.
pub struct Merge<T> {
    nodes: Vec<NodeQueue<T>>,
    drain_ns: u64,
}

struct NodeQueue<T> {
    queue: VecDeque<(u64, T)>,
    /// Still streaming (not ended, not failed).
    open: bool,
    /// The latest time this node sent.
    last_time: u64,
    /// When (relay clock) it last sent something, or joined.
    last_heard: u64,
}

impl<T> Merge<T> {
    /// `nodes` streams, opened at `now_ns`.
    pub fn new(nodes: usize, drain: std::time::Duration, now_ns: u64) -> Self {
        let mut m = Merge {
            nodes: Vec::new(),
            drain_ns: drain.as_nanos() as u64,
        };
        (0..nodes).for_each(|_| {
            m.add_node(now_ns);
        });
        m
    }

    /// A node that joins the merge at `now_ns` (following: a node that came
    /// or came back); its index.
    pub fn add_node(&mut self, now_ns: u64) -> usize {
        self.nodes.push(NodeQueue {
            queue: VecDeque::new(),
            open: true,
            last_time: 0,
            last_heard: now_ns,
        });
        self.nodes.len() - 1
    }

    /// Node `node` sent `item`, of time `time`, at `now_ns`.
    pub fn push(&mut self, node: usize, time: u64, item: T, now_ns: u64) {
        let n = &mut self.nodes[node];
        n.queue.push_back((time, item));
        n.last_time = n.last_time.max(time);
        n.last_heard = now_ns;
    }

    /// Node `node`'s stream ended (or failed): it holds nothing back.
    pub fn end(&mut self, node: usize) {
        self.nodes[node].open = false;
    }

    /// The earliest queued flow: (node, time).
    fn head(&self) -> Option<(usize, u64)> {
        let mut best: Option<(usize, u64)> = None;
        for (i, n) in self.nodes.iter().enumerate() {
            if let Some((t, _)) = n.queue.front() {
                if best.is_none_or(|(_, bt)| *t < bt) {
                    best = Some((i, *t));
                }
            }
        }
        best
    }

    /// The nodes that may still send something earlier than `t`.
    fn holding(&self, t: u64) -> impl Iterator<Item = &NodeQueue<T>> {
        self.nodes
            .iter()
            .filter(move |n| n.open && n.queue.is_empty() && n.last_time < t)
    }

    /// The next item in time order, when it can be released at `now_ns`
    /// (the relay's clock).
    pub fn pop(&mut self, now_ns: u64) -> Option<T> {
        let (i, t) = self.head()?;
        let drain = self.drain_ns;
        let waited_out = |n: &NodeQueue<T>| {
            now_ns.saturating_sub(n.last_heard) >= drain && now_ns.saturating_sub(t) >= drain
        };
        if !self.holding(t).all(waited_out) {
            return None;
        }
        self.nodes[i].queue.pop_front().map(|(_, item)| item)
    }

    /// When (relay clock) the earliest queued item goes at the latest if
    /// the nodes holding it back stay silent; None when nothing is queued.
    pub fn next_release(&self) -> Option<u64> {
        let (_, t) = self.head()?;
        let heard = self.holding(t).map(|n| n.last_heard).max().unwrap_or(0);
        Some(t.max(heard).saturating_add(self.drain_ns))
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
    use std::time::Duration;

    const MS: u64 = 1_000_000;

    fn drain_all(m: &mut Merge<u64>, now: u64) -> Vec<u64> {
        std::iter::from_fn(|| m.pop(now)).collect()
    }

    #[test]
    fn a_lagging_node_holds_the_merge_until_it_catches_up() {
        let mut m = Merge::new(2, Duration::from_millis(500), 1_000 * MS);
        // Node 0 is ahead; node 1 has sent nothing yet.
        for t in [1_000, 1_010, 1_020] {
            m.push(0, t * MS, t, 1_030 * MS);
        }
        assert_eq!(drain_all(&mut m, 1_030 * MS), Vec::<u64>::new());
        // Node 1 catches up with 1005 and 1025: all but 1025 go; 1025 waits
        // for node 0 (it may still send something before it).
        m.push(1, 1_005 * MS, 1_005, 1_040 * MS);
        m.push(1, 1_025 * MS, 1_025, 1_040 * MS);
        assert_eq!(
            drain_all(&mut m, 1_040 * MS),
            vec![1_000, 1_005, 1_010, 1_020]
        );
        assert_eq!(m.queued(), 1);
        // Node 0 goes silent: 1025 goes once node 0 has been silent for the
        // drain timeout (heard last at 1030).
        assert_eq!(m.next_release(), Some(1_530 * MS));
        assert_eq!(drain_all(&mut m, 1_529 * MS), Vec::<u64>::new());
        assert_eq!(drain_all(&mut m, 1_530 * MS), vec![1_025]);
    }

    #[test]
    fn a_quiet_node_that_wakes_up_still_comes_in_order() {
        // Node 1 has said nothing for long; node 0's live flow waits for it
        // up to the drain timeout, and node 1's earlier flow, arriving a few
        // ms later, goes first.
        let mut m = Merge::new(2, Duration::from_millis(500), 0);
        m.push(0, 10_000 * MS, 2, 10_001 * MS);
        assert_eq!(drain_all(&mut m, 10_001 * MS), Vec::<u64>::new());
        m.push(1, 9_999 * MS, 1, 10_003 * MS);
        assert_eq!(drain_all(&mut m, 10_003 * MS), vec![1]);
        // Node 1 empty again, but it heard just now: 2 waits...
        assert_eq!(drain_all(&mut m, 10_004 * MS), Vec::<u64>::new());
        // ...until node 1 has been silent and 2 is older than the drain.
        assert_eq!(drain_all(&mut m, 10_503 * MS), vec![2]);
    }

    #[test]
    fn history_is_merged_without_waiting_on_the_clock() {
        // Flows an hour old (a non-following read): nodes that keep
        // sending are waited for, whatever the clock says.
        let now = 3_600_000 * MS;
        let mut m = Merge::new(2, Duration::from_millis(500), now);
        m.push(0, 10 * MS, 10, now);
        m.push(0, 30 * MS, 30, now);
        assert_eq!(drain_all(&mut m, now + MS), Vec::<u64>::new());
        m.push(1, 20 * MS, 20, now + MS);
        assert_eq!(drain_all(&mut m, now + MS), vec![10, 20]);
        m.end(1);
        assert_eq!(drain_all(&mut m, now + MS), vec![30]);
    }

    #[test]
    fn ended_nodes_hold_nothing_back_and_the_merge_finishes() {
        let mut m = Merge::new(3, Duration::from_secs(60), 0);
        m.push(0, 5, 5, 0);
        m.push(2, 1, 1, 0);
        m.end(1);
        // Both open nodes have a head: the earliest goes; then node 2 (open,
        // empty) may still send something before 5.
        assert_eq!(drain_all(&mut m, 10), vec![1]);
        m.end(0);
        m.end(2);
        assert_eq!(drain_all(&mut m, 10), vec![5]);
        assert!(m.done());
    }

    #[test]
    fn interleaved_streams_come_out_sorted() {
        let mut m = Merge::new(3, Duration::from_secs(60), 0);
        let mut out = Vec::new();
        for round in 0..100u64 {
            for node in 0..3 {
                let t = round * 10 + (node as u64 * 7) % 10;
                m.push(node, t, t, 0);
            }
            out.extend(std::iter::from_fn(|| m.pop(0)));
        }
        (0..3).for_each(|n| m.end(n));
        out.extend(std::iter::from_fn(|| m.pop(0)));
        assert_eq!(out.len(), 300);
        assert!(out.windows(2).all(|w| w[0] <= w[1]));
    }
}
