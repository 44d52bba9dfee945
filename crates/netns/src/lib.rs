//! Links, addresses, routes and network namespaces, through iproute2, and
//! cgroup membership: what the agent (endpoints, proxy routing) and the lab
//! runtime (pods, nodes) share. No eBPF here: only `datapath` links aya.
//!
//! Shelling out to `ip` keeps this process free of fork-in-a-threaded-process
//! hazards (a child execs at once) and of setns on shared worker threads.
//! The unsafe blocks (`cgroup::start_in_cgroup`'s pre-exec hook, and the
//! libc calls that read an interface's index, MAC and MTU in this
//! process's network namespace, which sysfs answers only for the namespace
//! it was mounted in) are why this crate denies rather than forbids unsafe
//! code.
#![deny(unsafe_code)]

use std::net::Ipv4Addr;
use std::path::Path;
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("`{command}` failed: {stderr}")]
    Command { command: String, stderr: String },
    #[error("cannot run `{command}`: {source}")]
    Spawn {
        command: String,
        source: std::io::Error,
    },
    #[error("unexpected output from `{command}`: {output}")]
    Parse { command: String, output: String },
}

/// Runs a command and returns its stdout, or an error with its stderr.
pub fn run(cmd: &str, args: &[&str]) -> Result<String, NetError> {
    let command = format!("{cmd} {}", args.join(" "));
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|source| NetError::Spawn {
            command: command.clone(),
            source,
        })?;
    if !out.status.success() {
        return Err(NetError::Command {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip(args: &[&str]) -> Result<String, NetError> {
    run("ip", args)
}

/// Runs `ip` inside the network namespace at `netns`.
fn ip_in(netns: &Path, args: &[&str]) -> Result<String, NetError> {
    let ns = format!("--net={}", netns.display());
    let mut full = vec![ns.as_str(), "ip"];
    full.extend_from_slice(args);
    run("nsenter", &full)
}

/// Creates a named network namespace (/run/netns/NAME), as a runtime would.
pub fn create_netns(name: &str) -> Result<(), NetError> {
    ip(&["netns", "add", name])?;
    // Loopback up, so that pods can talk to themselves.
    ip(&["-n", name, "link", "set", "lo", "up"]).map(|_| ())
}

/// Deletes a named network namespace; missing is fine.
pub fn delete_netns(name: &str) {
    ip(&["netns", "del", name]).ok();
}

pub fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

pub fn link_exists(ifname: &str) -> bool {
    ifindex(ifname).is_ok()
}

/// Deletes a link in the host namespace (its veth peer goes with it).
pub fn delete_link(ifname: &str) {
    if link_exists(ifname) {
        ip(&["link", "del", ifname]).ok();
    }
}

/// An interface's index in this process's network namespace.
pub fn ifindex(ifname: &str) -> Result<u32, NetError> {
    let name = c_ifname(ifname)?;
    #[allow(unsafe_code)]
    // SAFETY: `name` is a NUL-terminated string that outlives the call;
    // if_nametoindex only reads it.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(NetError::Spawn {
            command: format!("if_nametoindex({ifname})"),
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(index)
}

/// `ifname` as the kernel's interface-name field (at most 15 bytes).
fn c_ifname(ifname: &str) -> Result<std::ffi::CString, NetError> {
    std::ffi::CString::new(ifname)
        .ok()
        .filter(|_| ifname.len() < libc::IFNAMSIZ)
        .ok_or_else(|| NetError::Parse {
            command: "interface name".into(),
            output: ifname.into(),
        })
}

/// Asks the kernel about interface `ifname` with `request` (an SIOCGIF*
/// ioctl) on a datagram socket of this process's network namespace.
fn ifreq(ifname: &str, request: libc::c_ulong) -> Result<libc::ifreq, NetError> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let err = |what: &str| NetError::Spawn {
        command: format!("{what} {ifname}"),
        source: std::io::Error::last_os_error(),
    };
    let name = c_ifname(ifname)?;
    #[allow(unsafe_code)]
    // SAFETY: socket(2) takes no pointers; a non-negative result is a new
    // descriptor that only this OwnedFd owns.
    let sock = unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(err("socket for"));
        }
        OwnedFd::from_raw_fd(fd)
    };
    #[allow(unsafe_code)]
    // SAFETY: an all-zero ifreq is valid (plain C data); the name is at
    // most IFNAMSIZ-1 bytes (checked), so the copy stays inside ifr_name
    // and leaves its NUL terminator; the ioctl writes only into `req`.
    unsafe {
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(name.as_bytes()) {
            *dst = *src as libc::c_char;
        }
        if libc::ioctl(sock.as_raw_fd(), request as _, &mut req) < 0 {
            return Err(err("ioctl on"));
        }
        Ok(req)
    }
}

/// The VXLAN device of this namespace's node (Cilium's `cilium_vxlan`):
/// external (collect_md) mode on UDP `port`, the tunnel endpoint and VNI
/// set per packet by the datapath. Created when missing (an agent restart
/// finds the one it made), set up; returns its index.
pub fn ensure_vxlan(ifname: &str, port: u16) -> Result<u32, NetError> {
    if !link_exists(ifname) {
        let port = port.to_string();
        // Learning off: the datapath says where each packet goes.
        ip(&[
            "link",
            "add",
            ifname,
            "type",
            "vxlan",
            "external",
            "dstport",
            &port,
            "nolearning",
        ])?;
    }
    ip(&["link", "set", ifname, "up"])?;
    ifindex(ifname)
}

/// The interface that holds `addr` (this node's address on the network
/// between nodes).
pub fn interface_with_address(addr: Ipv4Addr) -> Result<String, NetError> {
    let cidr = format!("{addr}/32");
    let out = ip(&["-o", "-4", "addr", "show", "to", &cidr])?;
    out.split_whitespace()
        .nth(1)
        .map(|s| {
            s.trim_end_matches(':')
                .split('@')
                .next()
                .unwrap_or(s)
                .to_string()
        })
        .ok_or_else(|| NetError::Parse {
            command: format!("ip -o -4 addr show to {cidr}"),
            output: out.clone(),
        })
}

/// An interface's MTU.
pub fn mtu(ifname: &str) -> Result<u32, NetError> {
    let req = ifreq(ifname, libc::SIOCGIFMTU)?;
    #[allow(unsafe_code)]
    // SAFETY: SIOCGIFMTU fills the ifru_mtu member of the union.
    let mtu = unsafe { req.ifr_ifru.ifru_mtu };
    Ok(mtu as u32)
}

/// The MAC after `link/ether` in `ip link show`'s output.
fn parse_mac(command: &str, output: &str) -> Result<[u8; 6], NetError> {
    let word = output
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .unwrap_or("");
    mac_from_text(command, word).map_err(|_| NetError::Parse {
        command: command.into(),
        output: output.into(),
    })
}

/// `aa:bb:cc:dd:ee:ff` as bytes (`source` names where it came from).
fn mac_from_text(source: &str, text: &str) -> Result<[u8; 6], NetError> {
    let err = || NetError::Parse {
        command: source.into(),
        output: text.into(),
    };
    let parts: Vec<&str> = text.split(':').collect();
    if parts.len() != 6 {
        return Err(err());
    }
    let mut mac = [0u8; 6];
    for (m, p) in mac.iter_mut().zip(parts) {
        *m = u8::from_str_radix(p, 16).map_err(|_| err())?;
    }
    Ok(mac)
}

pub fn mac_string(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// What a pod's veth pair looks like once it is set up.
#[derive(Clone, Debug)]
pub struct VethPair {
    pub host_ifname: String,
    pub host_ifindex: u32,
    pub host_mac: [u8; 6],
    pub pod_mac: [u8; 6],
}

/// Creates the veth pair of a pod: the host side `host_ifname`, the pod
/// side moved into `netns` as `pod_ifname` with `addr`/32, a link route to
/// the gateway and a default route through it, a permanent neighbour entry
/// for the gateway (the host side's MAC), IPv6 off on both sides, and on
/// the host a route and a permanent neighbour entry for `addr`. Four
/// processes in all (two `ip -batch` on the host, one in the namespace and
/// one sysctl there): each costs milliseconds, and pod creation waits for
/// them.
/// On failure the pair is removed.
pub fn setup_pod_veth(
    host_ifname: &str,
    netns: &Path,
    pod_ifname: &str,
    addr: Ipv4Addr,
    gateway: Ipv4Addr,
    mtu: Option<u32>,
) -> Result<VethPair, NetError> {
    let ns = netns.display().to_string();
    let mtu_text = mtu.map(|m| m.to_string());
    let pod_mac = random_mac()?;
    let pod_mac_text = mac_string(&pod_mac);
    let cidr = format!("{addr}/32");
    let gw = gateway.to_string();
    let addr_text = addr.to_string();
    // The pod side is born in the pod's namespace under its final name:
    // moving an interface between namespaces waits for an RCU grace period
    // (some 25 ms), creating it there does not.
    let mut create: Vec<&str> = vec!["link", "add", host_ifname];
    // Both sides (behind a tunnel, the underlay's MTU less its overhead).
    if let Some(m) = &mtu_text {
        create.extend(["mtu", m]);
    }
    create.extend(["type", "veth", "peer", "name", pod_ifname]);
    if let Some(m) = &mtu_text {
        create.extend(["mtu", m]);
    }
    create.extend(["address", &pod_mac_text, "netns", &ns]);
    ip_batch(None, &[&create])?;
    let result = (|| {
        // The host side speaks no IPv6 to the pod (no ND/MLD noise), and
        // forwards: traffic to addresses outside the node goes through the
        // host stack (this interface only; the host's global setting and
        // every other interface stay as they are).
        write_sysctl(&format!("net/ipv6/conf/{host_ifname}/disable_ipv6"), "1")?;
        write_sysctl(&format!("net/ipv4/conf/{host_ifname}/forwarding"), "1")?;
        let host_mac = read_mac(host_ifname)?;
        let host_mac_text = mac_string(&host_mac);
        ip_batch(
            Some(netns),
            &[
                &["link", "set", "lo", "up"],
                &["link", "set", pod_ifname, "up"],
                &["addr", "add", &cidr, "dev", pod_ifname],
                &["route", "add", &gw, "dev", pod_ifname, "scope", "link"],
                &["route", "add", "default", "via", &gw, "dev", pod_ifname],
                &[
                    "neigh",
                    "replace",
                    &gw,
                    "lladdr",
                    &host_mac_text,
                    "dev",
                    pod_ifname,
                    "nud",
                    "permanent",
                ],
            ],
        )?;
        // No IPv6 on pods yet: IPAM hands out IPv4 only.
        run(
            "nsenter",
            &[
                &format!("--net={ns}"),
                "sysctl",
                "-qw",
                &format!("net.ipv6.conf.{pod_ifname}.disable_ipv6=1"),
            ],
        )?;
        ip_batch(
            None,
            &[
                &["link", "set", host_ifname, "up"],
                &["route", "replace", &cidr, "dev", host_ifname],
                &[
                    "neigh",
                    "replace",
                    &addr_text,
                    "lladdr",
                    &pod_mac_text,
                    "dev",
                    host_ifname,
                    "nud",
                    "permanent",
                ],
            ],
        )?;
        Ok(VethPair {
            host_ifname: host_ifname.to_string(),
            host_ifindex: ifindex(host_ifname)?,
            host_mac,
            pod_mac,
        })
    })();
    if result.is_err() {
        delete_link(host_ifname);
    }
    result
}

/// Runs `commands` through one `ip -batch` (inside `netns` when given),
/// which stops at the first that fails.
fn ip_batch(netns: Option<&Path>, commands: &[&[&str]]) -> Result<(), NetError> {
    use std::io::Write;
    let script: String = commands.iter().map(|c| c.join(" ") + "\n").collect();
    let ns_arg = netns.map(|n| format!("--net={}", n.display()));
    let mut cmd = match &ns_arg {
        Some(ns) => {
            let mut c = Command::new("nsenter");
            c.args([ns.as_str(), "ip", "-batch", "-"]);
            c
        }
        None => {
            let mut c = Command::new("ip");
            c.args(["-batch", "-"]);
            c
        }
    };
    let command = format!("ip -batch ({})", script.trim().replace('\n', "; "));
    let spawn_err = |source| NetError::Spawn {
        command: command.clone(),
        source,
    };
    let mut child = cmd
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(spawn_err)?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(script.as_bytes()).map_err(spawn_err)?;
    }
    let out = child.wait_with_output().map_err(spawn_err)?;
    if !out.status.success() {
        return Err(NetError::Command {
            command,
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// Writes a sysctl of this process's network namespace (`net/ipv4/...`).
fn write_sysctl(key: &str, value: &str) -> Result<(), NetError> {
    let path = format!("/proc/sys/{key}");
    std::fs::write(&path, value).map_err(|source| NetError::Spawn {
        command: format!("write {value} to {path}"),
        source,
    })
}

/// An interface's MAC address.
fn read_mac(ifname: &str) -> Result<[u8; 6], NetError> {
    let req = ifreq(ifname, libc::SIOCGIFHWADDR)?;
    #[allow(unsafe_code)]
    // SAFETY: SIOCGIFHWADDR fills the ifru_hwaddr member of the union.
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for (m, d) in mac.iter_mut().zip(data) {
        *m = d as u8;
    }
    Ok(mac)
}

/// A random locally administered unicast MAC address.
fn random_mac() -> Result<[u8; 6], NetError> {
    use std::io::Read;
    let mut mac = [0u8; 6];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut mac))
        .map_err(|source| NetError::Spawn {
            command: "read /dev/urandom".into(),
            source,
        })?;
    mac[0] = (mac[0] | 0x02) & !0x01;
    Ok(mac)
}

/// Every IPv4 address of the host's own interfaces (they are the `host`
/// identity).
///
/// Read from the kernel's FIB (`/proc/net/fib_trie`, this namespace's):
/// the addresses of `host LOCAL` /32 routes, which the kernel adds for
/// every address an interface holds. A file read of microseconds, where
/// `ip addr show` costs a process (milliseconds) on every change the agent
/// commits.
pub fn host_ipv4_addresses() -> Result<Vec<Ipv4Addr>, NetError> {
    let path = "/proc/net/fib_trie";
    let text = std::fs::read_to_string(path).map_err(|source| NetError::Spawn {
        command: format!("read {path}"),
        source,
    })?;
    Ok(local_addresses(&text))
}

/// Calls `changed` on a thread of its own after the kernel announces a
/// change to an IPv4 address of this network namespace (rtnetlink's
/// `RTMGRP_IPV4_IFADDR` group), and once at the start (an address that
/// changed before the subscription); stops when it returns false (at the
/// next event). A reader that fell behind (`ENOBUFS`) counts as a change:
/// the caller reads the addresses again either way.
pub fn watch_ipv4_addresses(
    mut changed: impl FnMut() -> bool + Send + 'static,
) -> Result<(), NetError> {
    const RTMGRP_IPV4_IFADDR: u32 = 0x10;
    let netlink = |source| NetError::Spawn {
        command: "netlink address subscription".into(),
        source,
    };
    let mut socket =
        netlink_sys::Socket::new(netlink_sys::protocols::NETLINK_ROUTE).map_err(netlink)?;
    socket
        .bind(&netlink_sys::SocketAddr::new(0, RTMGRP_IPV4_IFADDR))
        .map_err(netlink)?;
    std::thread::Builder::new()
        .name("fibril-addr-watch".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            if !changed() {
                return;
            }
            loop {
                match socket.recv(&mut &mut buf[..], 0) {
                    Ok(_) => {}
                    Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(_) => return,
                }
                if !changed() {
                    return;
                }
            }
        })
        .map_err(netlink)?;
    Ok(())
}

/// The `/32 host LOCAL` leaves of a `fib_trie` listing, sorted, once each.
fn local_addresses(fib_trie: &str) -> Vec<Ipv4Addr> {
    let mut leaf: Option<Ipv4Addr> = None;
    let mut out = std::collections::BTreeSet::new();
    for line in fib_trie.lines() {
        let line = line.trim();
        if let Some(addr) = line.strip_prefix("|-- ") {
            leaf = addr.trim().parse().ok();
        } else if line.starts_with("/32 host LOCAL") {
            out.extend(leaf);
        }
    }
    out.into_iter().collect()
}

/// The IPv4 networks directly connected to the host (address/prefix).
pub fn host_ipv4_networks() -> Result<Vec<(Ipv4Addr, u8)>, NetError> {
    let out = ip(&["-o", "-4", "addr", "show"])?;
    Ok(out
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace().skip_while(|w| *w != "inet");
            let (addr, len) = w.nth(1)?.split_once('/')?;
            Some((addr.parse().ok()?, len.parse().ok()?))
        })
        .collect())
}

/// The MAC and IPv4 addresses of `ifname` inside `netns`, if it exists.
pub fn pod_interface(netns: &Path, ifname: &str) -> Result<([u8; 6], Vec<Ipv4Addr>), NetError> {
    let out = ip_in(netns, &["-o", "link", "show", ifname])?;
    let mac = parse_mac("ip link show", &out)?;
    let addrs = ip_in(netns, &["-o", "-4", "addr", "show", "dev", ifname])?;
    let ips = addrs
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|c| c.split('/').next())
        .and_then(|a| a.parse().ok())
        .into_iter()
        .collect();
    Ok((mac, ips))
}

/// Policy routing for the L7 proxy: packets carrying `mark` are delivered to
/// the local stack (`local 0.0.0.0/0 dev lo` in `table`), whatever their
/// destination address. Idempotent, and never briefly absent when it was
/// there already (a packet assigned to a proxy socket but then forwarded
/// would be dropped).
pub fn proxy_routing_up(mark: u32, table: u32) -> Result<(), NetError> {
    let (mark, table) = (format!("{mark:#x}"), table.to_string());
    run(
        "ip",
        &[
            "-4",
            "route",
            "replace",
            "local",
            "0.0.0.0/0",
            "dev",
            "lo",
            "table",
            &table,
        ],
    )?;
    let present = run(
        "ip",
        &["-4", "rule", "list", "fwmark", &mark, "lookup", &table],
    )?;
    if present.trim().is_empty() {
        run(
            "ip",
            &[
                "-4", "rule", "add", "fwmark", &mark, "lookup", &table, "pref", "90",
            ],
        )?;
    }
    Ok(())
}

/// Removes what `proxy_routing_up` added (nothing else: the rule is matched
/// by its mark and table, the routes by their table).
pub fn proxy_routing_down(mark: u32, table: u32) {
    let (mark, table) = (format!("{mark:#x}"), table.to_string());
    while run(
        "ip",
        &["-4", "rule", "del", "fwmark", &mark, "lookup", &table],
    )
    .is_ok()
    {}
    run("ip", &["-4", "route", "flush", "table", &table]).ok();
}

/// The file (in the agent's state directory) recording the proxy's policy
/// routing, so that the next run or `lab down` removes exactly that.
pub const PROXY_ROUTING_FILE: &str = "proxy-routing";

/// `(mark, table)` from a proxy routing record.
pub fn read_proxy_routing(record: &Path) -> Option<(u32, u32)> {
    let text = std::fs::read_to_string(record).ok()?;
    let mut it = text.split_whitespace().map(|t| t.parse::<u32>().ok());
    Some((it.next()??, it.next()??))
}

/// Removes the policy routing a record names, and the record.
pub fn proxy_routing_forget(record: &Path) {
    if let Some((mark, table)) = read_proxy_routing(record) {
        proxy_routing_down(mark, table);
    }
    std::fs::remove_file(record).ok();
}

/// Runs `f` on a thread of its own inside the named network namespace
/// (`/run/netns/NAME`): its sockets, `ip` processes and sysctl writes are
/// that namespace's. The thread ends with `f`, so no thread of this
/// process is left in another namespace.
pub fn in_netns<T: Send>(name: &str, f: impl FnOnce() -> T + Send) -> Result<T, NetError> {
    use std::os::fd::AsRawFd;
    let path = format!("/run/netns/{name}");
    let file = std::fs::File::open(&path).map_err(|source| NetError::Spawn {
        command: format!("open {path}"),
        source,
    })?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                #[allow(unsafe_code)]
                // SAFETY: setns(2) with a namespace file descriptor that
                // `file` keeps open for the call; it changes only this
                // thread, which ends when `f` returns.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                if rc != 0 {
                    return Err(NetError::Spawn {
                        command: format!("setns {path}"),
                        source: std::io::Error::last_os_error(),
                    });
                }
                Ok(f())
            })
            .join()
            .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}

/// Runs `ip` with `args` inside the named network namespace.
pub fn ip_netns(name: &str, args: &[&str]) -> Result<String, NetError> {
    let mut full = vec!["-n", name];
    full.extend_from_slice(args);
    ip(&full)
}

/// The BPF filesystem, where pinned maps and links outlive their loader.
pub mod bpffs {
    use std::path::Path;

    /// Where bpffs is mounted (and mounted here when it is not).
    pub const ROOT: &str = "/sys/fs/bpf";

    /// Makes sure bpffs is mounted at [`ROOT`] (when `dir` is under it) and
    /// `dir` exists. Hosts that boot without systemd have no bpffs until
    /// someone mounts it: the agent, or a lab's node before its kubelet
    /// hands `/sys/fs/bpf` to a Helm-installed agent as a hostPath.
    pub fn ensure_dir(dir: &Path) -> std::io::Result<()> {
        if dir.starts_with(ROOT) && !mounted() {
            // One mounter at a time, across processes (agents start side
            // by side): a second `mount` would stack another bpffs over the
            // first and hide what the first one's owner pinned there. The
            // lock is on the mount point itself (the directory under it
            // until it is mounted), so nothing is left behind.
            let under = std::fs::File::open(ROOT)?;
            under.lock()?;
            if !mounted() {
                super::run("mount", &["-t", "bpf", "bpf", ROOT])
                    .map_err(|e| std::io::Error::other(format!("mounting bpffs at {ROOT}: {e}")))?;
            }
        }
        std::fs::create_dir_all(dir)
    }

    fn mounted() -> bool {
        std::fs::read_to_string("/proc/self/mounts")
            .map(|m| m.lines().any(|l| l.split_whitespace().nth(1) == Some(ROOT)))
            .unwrap_or(false)
    }
}

/// Cgroup v2 membership for processes a runtime starts.
pub mod cgroup {
    use std::path::{Path, PathBuf};

    /// The cgroup v2 hierarchy's mount point (`/sys/fs/cgroup` on unified
    /// hosts, `/sys/fs/cgroup/unified` on hybrid ones), if mounted.
    pub fn cgroup2_mount() -> Option<PathBuf> {
        let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
        mounts.lines().find_map(|l| {
            let mut f = l.split_whitespace();
            let (_, dir, fstype) = (f.next()?, f.next()?, f.next()?);
            (fstype == "cgroup2").then(|| PathBuf::from(dir))
        })
    }

    /// Makes `cmd` start as a member of the cgroup `dir` (before it runs any of
    /// its own code, so every socket it opens belongs to that cgroup).
    #[allow(unsafe_code)]
    pub fn start_in_cgroup(cmd: &mut std::process::Command, dir: &Path) {
        use std::os::unix::process::CommandExt;
        let Ok(procs) =
            std::ffi::CString::new(dir.join("cgroup.procs").as_os_str().as_encoded_bytes())
        else {
            return;
        };
        // SAFETY: between fork and exec the closure only makes raw syscalls
        // (open, write, close) on memory prepared before the fork; writing "0"
        // to cgroup.procs moves the writing process itself.
        unsafe {
            cmd.pre_exec(move || {
                let fd = libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
                if fd >= 0 {
                    libc::write(fd, b"0".as_ptr().cast(), 1);
                    libc::close(fd);
                }
                Ok(())
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_mac_from_ip_link_output() {
        let out = "7: fib1@if6: <BROADCAST> mtu 1500 qdisc noqueue\\    link/ether 0a:1b:2c:3d:4e:5f brd ff:ff:ff:ff:ff:ff";
        assert_eq!(
            parse_mac("ip", out).unwrap(),
            [0x0a, 0x1b, 0x2c, 0x3d, 0x4e, 0x5f]
        );
        assert!(parse_mac("ip", "no mac here").is_err());
        assert!(parse_mac("ip", "link/ether zz:1b").is_err());
    }

    #[test]
    fn local_addresses_come_from_the_fib() {
        let trie = "Main:\n  +-- 0.0.0.0/0 3 0 6\n     |-- 0.0.0.0\n        /0 universe UNICAST\n     |-- 192.0.2.0\n        /24 link UNICAST\nLocal:\n  +-- 0.0.0.0/0 2 0 2\n     +-- 127.0.0.0/8 2 0 2\n           |-- 127.0.0.0\n              /8 host LOCAL\n           |-- 127.0.0.1\n              /32 host LOCAL\n        |-- 127.255.255.255\n           /32 link BROADCAST\n        |-- 192.0.2.2\n           /32 host LOCAL\n        |-- 192.0.2.255\n           /32 link BROADCAST\n";
        assert_eq!(
            local_addresses(trie),
            vec![Ipv4Addr::new(127, 0, 0, 1), Ipv4Addr::new(192, 0, 2, 2)]
        );
    }

    /// The same addresses `ip -4 addr show` lists, on this machine.
    #[test]
    fn host_addresses_are_what_ip_addr_shows() {
        let out = ip(&["-o", "-4", "addr", "show"]).unwrap();
        let mut shown: Vec<Ipv4Addr> = out
            .lines()
            .filter_map(|l| {
                let mut w = l.split_whitespace().skip_while(|w| *w != "inet");
                w.nth(1)?.split('/').next()?.parse().ok()
            })
            .collect();
        shown.sort();
        shown.dedup();
        assert_eq!(host_ipv4_addresses().unwrap(), shown);
    }
}
