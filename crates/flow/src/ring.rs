//! The flow ring: fixed capacity, O(1) append, readers never block the
//! writer. Every entry has a sequence number; a reader that falls behind
//! the oldest entry learns exactly how many flows it lost.

use std::collections::VecDeque;

pub struct Ring<T> {
    capacity: usize,
    entries: VecDeque<T>,
    /// Sequence number of `entries[0]`.
    first_seq: u64,
}

/// What a reader gets: entries from its position on, and how many it lost.
pub struct Read<'a, T> {
    pub lost: u64,
    pub entries: Vec<&'a T>,
    pub next_seq: u64,
}

impl<T> Ring<T> {
    /// `capacity` must be 2^n-1, as Hubble's `hubble-event-buffer-capacity`.
    pub fn new(capacity: usize) -> Result<Self, String> {
        if capacity == 0 || !(capacity + 1).is_power_of_two() {
            return Err(format!(
                "ring capacity must be 2^n-1 (e.g. 4095), found {capacity}"
            ));
        }
        Ok(Self {
            capacity,
            entries: VecDeque::with_capacity(capacity),
            first_seq: 0,
        })
    }

    pub fn capacity(&self) -> usize {
        self.capacity
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Sequence number the next pushed entry gets.
    pub fn next_seq(&self) -> u64 {
        self.first_seq + self.entries.len() as u64
    }

    /// Appends `v`; returns the oldest entry when it had to make room.
    pub fn push(&mut self, v: T) -> Option<T> {
        let evicted = if self.entries.len() == self.capacity {
            self.first_seq += 1;
            self.entries.pop_front()
        } else {
            None
        };
        self.entries.push_back(v);
        evicted
    }

    /// Sequence number of the n-th newest entry (for `--last N`).
    pub fn seq_of_last(&self, n: usize) -> u64 {
        self.next_seq() - n.min(self.entries.len()) as u64
    }

    /// Entries from `seq` on.
    pub fn read_from(&self, seq: u64) -> Read<'_, T> {
        let lost = self.first_seq.saturating_sub(seq);
        let start = seq.max(self.first_seq);
        let skip = (start - self.first_seq) as usize;
        Read {
            lost,
            entries: self.entries.iter().skip(skip).collect(),
            next_seq: self.next_seq(),
        }
    }
}

/// A ring shared between one writer and many readers: readers wait for new
/// entries on a condition variable; the writer never waits for them.
pub struct Shared<T: Clone> {
    ring: std::sync::Mutex<Ring<T>>,
    changed: std::sync::Condvar,
    seen: std::sync::atomic::AtomicU64,
}

impl<T: Clone> Shared<T> {
    pub fn new(capacity: usize) -> Result<Self, String> {
        Ok(Self {
            ring: std::sync::Mutex::new(Ring::new(capacity)?),
            changed: std::sync::Condvar::new(),
            seen: std::sync::atomic::AtomicU64::new(0),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ring<T>> {
        self.ring.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn push(&self, v: T) {
        self.push_all(std::iter::once(v));
    }

    /// Appends a batch under one lock and wakes readers once. Evicted
    /// entries are dropped after the lock is released (freeing a flow is
    /// not free, and readers wait on this lock).
    pub fn push_all(&self, batch: impl IntoIterator<Item = T>) {
        let mut evicted = Vec::new();
        let mut n = 0;
        {
            let mut ring = self.lock();
            for v in batch {
                n += 1;
                evicted.extend(ring.push(v));
            }
        }
        if n > 0 {
            self.seen.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            self.changed.notify_all();
        }
        drop(evicted);
    }

    /// (entries buffered, capacity, entries ever pushed).
    pub fn counts(&self) -> (usize, usize, u64) {
        let r = self.lock();
        (
            r.len(),
            r.capacity(),
            self.seen.load(std::sync::atomic::Ordering::Relaxed),
        )
    }

    pub fn oldest_seq(&self) -> u64 {
        let r = self.lock();
        r.seq_of_last(r.capacity())
    }

    pub fn next_seq(&self) -> u64 {
        self.lock().next_seq()
    }

    /// Sequence number of the n-th newest entry.
    pub fn seq_of_last(&self, n: usize) -> u64 {
        self.lock().seq_of_last(n)
    }

    /// Entries from `seq` on (waiting up to `wait` when there are none yet),
    /// the number lost to overwrites before them, and the next position.
    pub fn read(&self, seq: u64, wait: std::time::Duration) -> (u64, Vec<T>, u64) {
        let mut ring = self.lock();
        if ring.next_seq() <= seq && !wait.is_zero() {
            ring = self
                .changed
                .wait_timeout(ring, wait)
                .map(|(g, _)| g)
                .unwrap_or_else(|e| e.into_inner().0);
        }
        let r = ring.read_from(seq);
        (r.lost, r.entries.into_iter().cloned().collect(), r.next_seq)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacity_must_be_a_power_of_two_minus_one() {
        assert!(Ring::<u32>::new(4095).is_ok());
        assert!(Ring::<u32>::new(4096).is_err());
        assert!(Ring::<u32>::new(0).is_err());
    }

    #[test]
    fn slow_readers_learn_exactly_how_much_they_lost() {
        let mut r = Ring::new(3).unwrap();
        for i in 0..3 {
            r.push(i);
        }
        let read = r.read_from(1);
        assert_eq!((read.lost, read.entries.len()), (0, 2));
        for i in 3..8 {
            r.push(i);
        }
        let read = r.read_from(1);
        assert_eq!(read.lost, 4, "entries 1..5 were overwritten");
        assert_eq!(read.entries, vec![&5, &6, &7]);
        assert_eq!(read.next_seq, 8);
        assert_eq!(r.seq_of_last(2), 6);
        assert_eq!(r.seq_of_last(100), 5);
    }
}
