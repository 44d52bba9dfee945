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

    pub fn push(&mut self, v: T) {
        if self.entries.len() == self.capacity {
            self.entries.pop_front();
            self.first_seq += 1;
        }
        self.entries.push_back(v);
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
