//! Socket load balancing (`bpf/sock.bpf.c`, Cilium's `bpf-lb-sock`): the
//! cgroup sock_addr programs that give a socket a service's backend at
//! connect (and at sendmsg for UDP), and show the service as its peer
//! (getpeername, recvmsg), for the processes under a cgroup. With
//! `host_only` (`socketLB.hostNamespaceOnly`) only sockets of the agent's
//! own network namespace are translated; pods keep the per-packet path.
//! The links are pinned (`links/socket_lb_<program>`), so translation
//! goes on while the agent is away; a successor attaches its own next to
//! them, then takes the pins (the old links go with their pins).

use std::os::fd::AsRawFd;
use std::path::Path;

use aya::programs::links::FdLink;
use aya::programs::{CgroupAttachMode, CgroupSockAddr};
use aya::Ebpf;

use crate::{knobs, pinned_loader, prog_err, program, Config, Error};

/// Where program `name`'s link is pinned.
fn pin_path(config: &Config, name: &str) -> std::path::PathBuf {
    config
        .pin_dir
        .join("links")
        .join(format!("socket_lb_{name}"))
}

/// Detaches an earlier run's socket LB (removing the pins drops the
/// links).
pub fn detach(config: &Config) {
    for name in PROGRAMS {
        std::fs::remove_file(pin_path(config, name)).ok();
    }
}

/// The compiled `bpf/sock.bpf.c`, embedded at build time.
static SOCK_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/sock.bpf.o"));

const PROGRAMS: [&str; 4] = [
    "sock4_connect",
    "sock4_sendmsg",
    "sock4_recvmsg",
    "sock4_getpeername",
];

/// The attached programs; dropping it detaches them.
pub struct SocketLb {
    _bpf: Ebpf,
}

impl SocketLb {
    /// Loads the programs (sharing the pinned services maps) and attaches
    /// them to `cgroup`.
    pub fn attach(config: &Config, cgroup: &Path, host_only: bool) -> Result<Self, Error> {
        let cookie = current_netns_cookie().map_err(|source| Error::Cgroup {
            path: cgroup.into(),
            source,
        })?;
        let host_only = u32::from(host_only);
        let mut loader = pinned_loader(config);
        knobs::set(&mut loader, knobs::HOST_NETNS_COOKIE, &cookie);
        knobs::set(&mut loader, knobs::SOCKET_LB_HOST_ONLY, &host_only);
        knobs::set(
            &mut loader,
            knobs::EVENTS_WAKEUP_BYTES,
            &config.events_wakeup_bytes,
        );
        let mut bpf = loader.load(SOCK_OBJECT)?;
        let links = config.pin_dir.join("links");
        std::fs::create_dir_all(&links).map_err(|source| Error::PinDir {
            path: links.clone(),
            source,
        })?;
        for name in PROGRAMS {
            let dir = std::fs::File::open(cgroup).map_err(|source| Error::Cgroup {
                path: cgroup.into(),
                source,
            })?;
            let p: &mut CgroupSockAddr = program(&mut bpf, name)?;
            p.load().map_err(prog_err(name))?;
            // A link: several programs side by side (an earlier run's
            // until its pin goes below; both translating is harmless, the
            // second finds a backend's address, no service's).
            let id = p
                .attach(dir, CgroupAttachMode::Single)
                .map_err(prog_err(name))?;
            let pin = pin_path(config, name);
            let link_err = |message: String| Error::Link {
                path: pin.clone(),
                message,
            };
            let link: FdLink = p
                .take_link(id)
                .map_err(prog_err(name))?
                .try_into()
                .map_err(|e| link_err(format!("{e}")))?;
            std::fs::remove_file(&pin).ok();
            link.pin(&pin).map_err(|e| link_err(format!("{e}")))?;
        }
        Ok(Self { _bpf: bpf })
    }
}

/// The cookie of this thread's network namespace (SO_NETNS_COOKIE, Linux
/// 5.14+): what `bpf_get_netns_cookie` gives the programs for a socket of
/// the same namespace.
pub fn current_netns_cookie() -> std::io::Result<u64> {
    // libc 0.2 may not name it yet: include/uapi/asm-generic/socket.h.
    const SO_NETNS_COOKIE: libc::c_int = 71;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    let mut cookie: u64 = 0;
    let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
    // SAFETY: the socket's fd is open for the call; `cookie` and `len` are
    // valid, writable and `len` says how many bytes `cookie` holds.
    let r = unsafe {
        libc::getsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            SO_NETNS_COOKIE,
            (&mut cookie as *mut u64).cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(cookie)
}
