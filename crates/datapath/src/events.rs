//! Reading flow events from the kernel ring buffer.
//!
//! The programs only wake the reader once a batch is pending, so the reader
//! also polls on a short timer to pick up the tail of quiet periods.

use std::os::fd::AsRawFd;
use std::time::Duration;

use abi::FlowEvent;
use aya::maps::{MapData, RingBuf};

pub struct EventReader {
    ring: RingBuf<MapData>,
}

impl EventReader {
    pub(crate) fn new(ring: RingBuf<MapData>) -> Self {
        Self { ring }
    }

    /// Waits up to `timeout` for a wake-up, then hands every pending event to
    /// `sink`. Returns the number of events read and the number of records
    /// that were too short to decode.
    pub fn poll(&mut self, timeout: Duration, mut sink: impl FnMut(FlowEvent)) -> (usize, usize) {
        let mut pfd = libc::pollfd {
            fd: self.ring.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: pfd is a valid pollfd for the duration of the call and the
        // count (1) matches; the fd belongs to self.ring and stays open.
        unsafe { libc::poll(&mut pfd, 1, ms) };
        let (mut read, mut malformed) = (0, 0);
        while let Some(item) = self.ring.next() {
            match FlowEvent::from_bytes(&item) {
                Some(e) => {
                    read += 1;
                    sink(e);
                }
                None => malformed += 1,
            }
        }
        (read, malformed)
    }
}
