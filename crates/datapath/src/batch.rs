//! Reading a whole hash map a few thousand entries per system call
//! (`BPF_MAP_LOOKUP_BATCH`, Linux 5.6) rather than two calls per entry
//! (next key, then lookup), which is what aya's iterators do. The
//! conntrack census walks a table of up to 262,144 entries every 5 s:
//! ~250 ms of a CPU each time key by key, while the datapath is busiest.
//! A batch also reads each bucket whole under its lock, where a key-by-key
//! walk restarts from the first key when the key it stands on is deleted
//! (LRU eviction does that under load) and so may visit entries twice.

use std::os::fd::{AsFd, AsRawFd};

use aya::maps::MapData;
use aya::Pod;

/// `enum bpf_cmd`'s `BPF_MAP_LOOKUP_BATCH`.
const BPF_MAP_LOOKUP_BATCH: libc::c_long = 24;
/// Entries asked for per call, to start with (a call fails with ENOSPC
/// only when one hash bucket holds more).
const CHUNK: usize = 4096;
/// The most entries one call is asked for.
const MAX_CHUNK: usize = 1 << 20;

/// `union bpf_attr`'s part for the `BPF_MAP_*_BATCH` commands.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Calls `each` with every entry of hash map `map` (not a per-CPU one:
/// one value an entry). An `Unsupported` error, before any entry, means
/// the kernel has no batch lookup: walk the map key by key instead.
pub(crate) fn for_each<K: Pod, V: Pod>(
    map: &MapData,
    mut each: impl FnMut(K, V),
) -> std::io::Result<()> {
    let (key_size, value_size) = (size_of::<K>(), size_of::<V>());
    // The resume token: a bucket number (u32) for hash maps, a key for
    // others; room for either.
    let token_size = key_size.max(8);
    let (mut token_in, mut token_out) = (vec![0u8; token_size], vec![0u8; token_size]);
    let mut chunk = CHUNK;
    let (mut keys, mut values) = (vec![0u8; chunk * key_size], vec![0u8; chunk * value_size]);
    let fd = map.fd().as_fd().as_raw_fd();
    let mut first = true;
    loop {
        let mut attr = BatchAttr {
            in_batch: if first { 0 } else { token_in.as_ptr() as u64 },
            out_batch: token_out.as_mut_ptr() as u64,
            keys: keys.as_mut_ptr() as u64,
            values: values.as_mut_ptr() as u64,
            count: chunk as u32,
            map_fd: fd as u32,
            ..Default::default()
        };
        // SAFETY: `attr` is the batch commands' layout of `union bpf_attr`
        // and its size is passed (the kernel reads no more, and treats the
        // rest as zero); `keys` and `values` hold `count` keys and values
        // and the tokens `token_size` bytes, so the kernel writes within
        // them; all outlive the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_MAP_LOOKUP_BATCH,
                &mut attr as *mut BatchAttr,
                size_of::<BatchAttr>(),
            )
        };
        let error = (rc < 0).then(std::io::Error::last_os_error);
        let errno = error.as_ref().and_then(std::io::Error::raw_os_error);
        if errno == Some(libc::ENOSPC) && chunk < MAX_CHUNK {
            // One bucket holds more than `chunk` entries: nothing was read.
            chunk *= 4;
            keys.resize(chunk * key_size, 0);
            values.resize(chunk * value_size, 0);
            continue;
        }
        // The entries read, also when the call ends the map (ENOENT).
        let read = (attr.count as usize).min(chunk);
        for i in 0..read {
            // SAFETY: entry `i`'s key and value lie within the buffers
            // (`i < chunk`); `K` and `V` are `Pod` (any bytes are a value)
            // and the reads are unaligned ones.
            let (k, v) = unsafe {
                (
                    std::ptr::read_unaligned(keys.as_ptr().add(i * key_size).cast::<K>()),
                    std::ptr::read_unaligned(values.as_ptr().add(i * value_size).cast::<V>()),
                )
            };
            each(k, v);
        }
        match errno {
            None => {
                std::mem::swap(&mut token_in, &mut token_out);
                first = false;
            }
            Some(libc::ENOENT) => return Ok(()),
            // Before 5.6 the command is unknown (EINVAL); some map types
            // have no batch operations (ENOTSUPP, 524).
            Some(libc::EINVAL | libc::EOPNOTSUPP | 524) if first => {
                return Err(std::io::ErrorKind::Unsupported.into())
            }
            Some(_) => return Err(error.unwrap_or_else(std::io::Error::last_os_error)),
        }
    }
}
