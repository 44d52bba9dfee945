//! The L7 proxy's socket shortcut (`bpf/sockops.bpf.c`): on this node, the
//! payload of a proxied connection goes from a socket's send call straight
//! into the receive queue of the other end (client <-> proxy, proxy <->
//! server) instead of crossing the TCP/IP stack and the veth. Handshakes and
//! policy stay on the packet path.

use std::path::Path;

use abi::SockKey;
use aya::maps::{MapData, PerCpuArray, SockHash};
use aya::programs::{CgroupAttachMode, SkMsg, SockOps};
use aya::Ebpf;

use crate::{map_err, pinned_loader, prog_err, program, Config, Error};

/// The compiled `bpf/sockops.bpf.c`, embedded at build time.
static SOCKOPS_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sockops.bpf.o"));

const PROG_SOCKOPS: &str = "fibril_sockops";
const MAP_STATS: &str = "fibril_sockmap_stats";
/// (sk_msg program, the socket map it serves).
const MSG_PROGRAMS: [(&str, &str); 2] = [
    ("fibril_pod_msg", "fibril_pod_socks"),
    ("fibril_proxy_msg", "fibril_proxy_socks"),
];

/// Counters of the shortcut since the maps were created.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShortcutStats {
    /// Connection ends (sockets) added to the socket maps.
    pub sockets: u64,
    /// Sends moved straight to the other end.
    pub redirected: u64,
    /// Sends that took the stack (the other end was not known).
    pub plain: u64,
}

/// The attached programs; dropping it detaches them.
pub struct ProxyShortcut {
    stats: PerCpuArray<MapData, u64>,
    _socket_maps: Vec<SockHash<MapData, SockKey>>,
    _bpf: Ebpf,
}

impl ProxyShortcut {
    /// Loads the programs, attaches the sk_msg programs to the (pinned)
    /// socket maps and the sock_ops program to `cgroup`: connections of the
    /// processes under it (pods and the agent itself) are accelerated.
    pub fn attach(config: &Config, cgroup: &Path) -> Result<Self, Error> {
        let mut bpf = pinned_loader(config).load(SOCKOPS_OBJECT)?;
        let mut socket_maps = Vec::new();
        for (prog, map) in MSG_PROGRAMS {
            let sockets: SockHash<MapData, SockKey> =
                SockHash::try_from(bpf.take_map(map).ok_or(Error::MissingMap(map))?)
                    .map_err(map_err(map))?;
            let p: &mut SkMsg = program(&mut bpf, prog)?;
            p.load().map_err(prog_err(prog))?;
            p.attach(sockets.fd()).map_err(prog_err(prog))?;
            socket_maps.push(sockets);
        }
        let cgroup_dir = std::fs::File::open(cgroup).map_err(|source| Error::Cgroup {
            path: cgroup.into(),
            source,
        })?;
        let p: &mut SockOps = program(&mut bpf, PROG_SOCKOPS)?;
        p.load().map_err(prog_err(PROG_SOCKOPS))?;
        // A link (the kernel has them since 5.7): cgroup links always allow
        // several programs side by side (a restarting agent's successor,
        // other agents on a shared root); "Single" only leaves the flags 0.
        p.attach(cgroup_dir, CgroupAttachMode::Single)
            .map_err(prog_err(PROG_SOCKOPS))?;
        let stats = PerCpuArray::try_from(
            bpf.take_map(MAP_STATS)
                .ok_or(Error::MissingMap(MAP_STATS))?,
        )
        .map_err(map_err(MAP_STATS))?;
        Ok(Self {
            stats,
            _socket_maps: socket_maps,
            _bpf: bpf,
        })
    }

    pub fn stats(&self) -> ShortcutStats {
        let at = |i: u32| -> u64 { self.stats.get(&i, 0).map(|v| v.iter().sum()).unwrap_or(0) };
        ShortcutStats {
            sockets: at(abi::SOCKMAP_STAT_SOCKETS),
            redirected: at(abi::SOCKMAP_STAT_REDIRECTED),
            plain: at(abi::SOCKMAP_STAT_PLAIN),
        }
    }
}
