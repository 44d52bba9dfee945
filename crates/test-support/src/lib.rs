//! Helpers for tests: crafted packets and unique names for test resources.
#![forbid(unsafe_code)]

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU32, Ordering};

pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_ACK: u8 = 0x10;

/// FNV-1a (64 bit) start value.
pub const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;

/// FNV-1a (64 bit), continued from `hash` over `bytes`: checks that a body
/// crossed a path intact (lab servers report it, tests compare).
pub fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for b in bytes {
        hash ^= *b as u64;
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// Byte `i` of a lab server's `/bytes/N` answer: not periodic in any power
/// of two, so a reordered, lost or repeated chunk shows.
pub fn pattern_byte(i: usize) -> u8 {
    ((i * 7 + i / 251) % 251) as u8
}

/// A unique, short name for a test resource (netns, veth, pin dir): the
/// prefix, this process id and a counter, so parallel tests never collide.
pub fn unique_name(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}x{}",
        std::process::id() % 100_000,
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// An L4 header to put in a crafted packet.
#[derive(Clone, Copy, Debug)]
pub enum L4 {
    Tcp { sport: u16, dport: u16, flags: u8 },
    Udp { sport: u16, dport: u16 },
    IcmpEcho { request: bool, id: u16 },
}

fn checksum(data: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    for chunk in data.chunks(2) {
        let word = if chunk.len() == 2 {
            u16::from_be_bytes([chunk[0], chunk[1]])
        } else {
            u16::from_be_bytes([chunk[0], 0])
        };
        sum += word as u32;
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// Builds an Ethernet + IPv4 + L4 frame with a valid IP header checksum.
pub fn ipv4_packet(src: Ipv4Addr, dst: Ipv4Addr, l4: L4) -> Vec<u8> {
    let (proto, l4_bytes) = match l4 {
        L4::Tcp {
            sport,
            dport,
            flags,
        } => {
            let mut t = vec![0u8; 20];
            t[0..2].copy_from_slice(&sport.to_be_bytes());
            t[2..4].copy_from_slice(&dport.to_be_bytes());
            t[12] = 5 << 4;
            t[13] = flags;
            t[14..16].copy_from_slice(&65535u16.to_be_bytes());
            (6u8, t)
        }
        L4::Udp { sport, dport } => {
            let mut u = vec![0u8; 8];
            u[0..2].copy_from_slice(&sport.to_be_bytes());
            u[2..4].copy_from_slice(&dport.to_be_bytes());
            u[4..6].copy_from_slice(&8u16.to_be_bytes());
            (17u8, u)
        }
        L4::IcmpEcho { request, id } => {
            let mut i = vec![0u8; 8];
            i[0] = if request { 8 } else { 0 };
            i[4..6].copy_from_slice(&id.to_be_bytes());
            (1u8, i)
        }
    };
    let mut p = Vec::with_capacity(14 + 20 + l4_bytes.len());
    p.extend_from_slice(&[0x02, 0, 0, 0, 0, 2]); // dst mac
    p.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]); // src mac
    p.extend_from_slice(&0x0800u16.to_be_bytes());
    let mut ip = vec![0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&((20 + l4_bytes.len()) as u16).to_be_bytes());
    ip[8] = 64;
    ip[9] = proto;
    ip[12..16].copy_from_slice(&src.octets());
    ip[16..20].copy_from_slice(&dst.octets());
    let c = checksum(&ip);
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    p.extend_from_slice(&ip);
    p.extend_from_slice(&l4_bytes);
    if proto == 6 || proto == 17 {
        let c = l4_checksum(&p);
        let at = 14 + 20 + if proto == 6 { 16 } else { 6 };
        p[at..at + 2].copy_from_slice(&c.to_be_bytes());
    }
    p
}

/// The TCP or UDP checksum a frame from `ipv4_packet` should carry (its
/// checksum field counted as zero).
fn l4_checksum(frame: &[u8]) -> u16 {
    let ip = &frame[14..34];
    let proto = ip[9];
    let mut l4 = frame[34..].to_vec();
    let at = if proto == 6 { 16 } else { 6 };
    l4[at..at + 2].copy_from_slice(&[0, 0]);
    let mut pseudo = Vec::with_capacity(12 + l4.len());
    pseudo.extend_from_slice(&ip[12..20]);
    pseudo.extend_from_slice(&[0, proto]);
    pseudo.extend_from_slice(&(l4.len() as u16).to_be_bytes());
    pseudo.extend_from_slice(&l4);
    let c = checksum(&pseudo);
    if proto == 17 && c == 0 {
        0xffff
    } else {
        c
    }
}

/// Whether a TCP or UDP frame (Ethernet, IPv4 without options) carries
/// correct IP and L4 checksums: what a rewrite of its addresses or ports
/// must keep.
pub fn checksums_valid(frame: &[u8]) -> bool {
    let ip_ok = checksum(&frame[14..34]) == 0;
    let proto = frame[14 + 9];
    let at = 34 + if proto == 6 { 16 } else { 6 };
    let carried = u16::from_be_bytes([frame[at], frame[at + 1]]);
    ip_ok && carried == l4_checksum(frame)
}

/// An ICMP error (`icmp_type`, `code`) from `src` to `dst` about the packet
/// of `quoted_frame` (a frame from `ipv4_packet`): it carries that packet's
/// IP header and first 8 bytes of L4, as routers and hosts send them.
pub fn icmp_error_packet(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    icmp_type: u8,
    code: u8,
    quoted_frame: &[u8],
) -> Vec<u8> {
    let quoted = &quoted_frame[14..(14 + 28).min(quoted_frame.len())];
    let mut icmp = vec![icmp_type, code, 0, 0, 0, 0, 0x05, 0xdc]; // MTU 1500
    icmp.extend_from_slice(quoted);
    let mut frame = ipv4_packet(
        src,
        dst,
        L4::IcmpEcho {
            request: true,
            id: 0,
        },
    );
    frame.truncate(34);
    frame[16..18].copy_from_slice(&((20 + icmp.len()) as u16).to_be_bytes());
    let sum = checksum(&icmp);
    icmp[2..4].copy_from_slice(&sum.to_be_bytes());
    frame.extend_from_slice(&icmp);
    fix_ip_checksum(&mut frame);
    frame
}

/// Recomputes the IPv4 header checksum of an Ethernet frame.
fn fix_ip_checksum(frame: &mut [u8]) {
    frame[24..26].copy_from_slice(&[0, 0]);
    let sum = checksum(&frame[14..34]);
    frame[24..26].copy_from_slice(&sum.to_be_bytes());
}

/// One IPv4 fragment: `payload` (for the first, the L4 header and data) at
/// `offset` (in 8-byte units) of datagram `id`, with MF set when `more`.
pub fn ipv4_fragment(
    src: Ipv4Addr,
    dst: Ipv4Addr,
    protocol: u8,
    id: u16,
    offset: u16,
    more: bool,
    payload: &[u8],
) -> Vec<u8> {
    let mut frame = ipv4_packet(src, dst, L4::Udp { sport: 0, dport: 0 });
    frame.truncate(34);
    frame[16..18].copy_from_slice(&((20 + payload.len()) as u16).to_be_bytes());
    frame[18..20].copy_from_slice(&id.to_be_bytes());
    let flags_offset = offset | if more { 0x2000 } else { 0 };
    frame[20..22].copy_from_slice(&flags_offset.to_be_bytes());
    frame[23] = protocol;
    frame.extend_from_slice(payload);
    fix_ip_checksum(&mut frame);
    frame
}

/// A minimal Ethernet + IPv6 + UDP frame (for the "IPv6 is not silently
/// allowed" checks).
pub fn ipv6_udp_packet() -> Vec<u8> {
    let mut p = Vec::new();
    p.extend_from_slice(&[0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1]);
    p.extend_from_slice(&0x86ddu16.to_be_bytes());
    let mut ip = vec![0u8; 40];
    ip[0] = 0x60;
    ip[4..6].copy_from_slice(&8u16.to_be_bytes());
    ip[6] = 17;
    ip[7] = 64;
    ip[23] = 1;
    ip[39] = 2;
    p.extend_from_slice(&ip);
    p.extend_from_slice(&[0x30, 0x39, 0x1f, 0x90, 0, 8, 0, 0]);
    p
}

/// The command that starts a `fibril-agent` (binary `bin`) of a test's own:
/// state, sockets and log under `dir`, maps under the bpffs directory
/// `bpf`, pod CIDR `cidr`, its Hubble API on the Unix socket and on
/// loopback TCP, metrics on loopback ports (any free ones; each written to
/// `dir/state/*.addr`). The caller kills it and removes both directories.
pub fn agent_command(
    bin: &std::path::Path,
    dir: &std::path::Path,
    bpf: &std::path::Path,
    node: &str,
    cidr: &str,
) -> std::process::Command {
    let mut c = std::process::Command::new(bin);
    c.args(["--node-name", node, "--pod-cidr", cidr])
        .arg("--state-dir")
        .arg(dir.join("state"))
        .arg("--bpf-dir")
        .arg(bpf)
        .arg("--socket")
        .arg(dir.join("agent.sock"))
        .arg("--hubble-socket")
        .arg(dir.join("hubble.sock"))
        .args(["--hubble-listen-address", "127.0.0.1:0"])
        .args(["--hubble-metrics-addr", "127.0.0.1:0"])
        .args(["--metrics-addr", "127.0.0.1:0"]);
    c
}

/// Where built third-party programs are cached (`$XDG_CACHE_HOME/fibril`,
/// else `~/.cache/fibril`), keyed by version; `cargo xtask deps` fills it.
pub fn cache_dir() -> std::path::PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| std::path::PathBuf::from("/var/cache"))
        .join("fibril")
}

/// The version `tools/<tool>/go.mod` requires of `module` (a `require`
/// line or a line of a require block).
pub fn tool_version(tool: &str, module: &str) -> String {
    let go_mod = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tools")
        .join(tool)
        .join("go.mod");
    let text =
        std::fs::read_to_string(&go_mod).unwrap_or_else(|e| panic!("{}: {e}", go_mod.display()));
    text.lines()
        .find_map(|l| {
            let l = l.trim().trim_start_matches("require ").trim();
            l.strip_prefix(module)?
                .strip_prefix(' ')?
                .split_whitespace()
                .next()
                .map(str::to_string)
        })
        .unwrap_or_else(|| panic!("{} names no {module} version", go_mod.display()))
}

/// Where `cargo xtask deps` builds the real hubble CLI: the cache, by the
/// version `tools/hubble-cli/go.mod` requires.
pub fn hubble_cli_build_path() -> std::path::PathBuf {
    let version = tool_version("hubble-cli", "github.com/cilium/hubble");
    cache_dir().join(format!("hubble-{version}")).join("hubble")
}

/// Where `cargo xtask deps` builds the real helm CLI (`tools/helm`).
pub fn helm_build_path() -> std::path::PathBuf {
    let version = tool_version("helm", "helm.sh/helm/v4");
    cache_dir().join(format!("helm-{version}")).join("helm")
}

/// Where `cargo xtask deps` builds Istio's CNI plugin: the cache, by the
/// `istio.io/istio` version `tools/istio-cni/go.mod` requires.
pub fn istio_cni_build_path() -> std::path::PathBuf {
    let version = tool_version("istio-cni", "istio.io/istio");
    cache_dir()
        .join(format!("istio-cni-{version}"))
        .join("istio-cni")
}

/// The Kafka version `tools/kafka/pom.xml` names (`kafka.version`).
pub fn kafka_version() -> String {
    let pom = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools/kafka/pom.xml");
    let text = std::fs::read_to_string(&pom).unwrap_or_else(|e| panic!("{}: {e}", pom.display()));
    text.split("<kafka.version>")
        .nth(1)
        .and_then(|rest| rest.split("</kafka.version>").next())
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("{} names no kafka.version", pom.display()))
}

/// Where `cargo xtask deps` puts the Kafka jars (broker, tools and their
/// dependencies): run them with `java -cp '<dir>/*'`. Keyed by the
/// version and the pom's contents, so a changed pom fetches afresh.
pub fn kafka_lib_dir() -> std::path::PathBuf {
    let pom = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../tools/kafka/pom.xml");
    let text = std::fs::read(&pom).unwrap_or_else(|e| panic!("{}: {e}", pom.display()));
    let hash = fnv1a(0xcbf2_9ce4_8422_2325, &text);
    cache_dir()
        .join(format!("kafka-{}-{:08x}", kafka_version(), hash as u32))
        .join("lib")
}

/// The Kafka jars, or a panic saying what to run when they are absent.
pub fn kafka_lib() -> std::path::PathBuf {
    let dir = kafka_lib_dir();
    assert!(
        dir.join(format!("kafka_2.13-{}.jar", kafka_version()))
            .exists(),
        "the Kafka jars are not fetched: run `cargo xtask deps` (it copies them into {})",
        dir.display()
    );
    dir
}

/// The version of hubble-audit2policy (PyPI) the UI's export is checked
/// with.
pub const AUDIT2POLICY_VERSION: &str = "0.18.5";

/// Where `cargo xtask deps` installs hubble-audit2policy (`pip install
/// --target`): run `bin/hubble-audit2policy` with this on `PYTHONPATH`.
pub fn audit2policy_dir() -> std::path::PathBuf {
    cache_dir().join(format!("hubble-audit2policy-{AUDIT2POLICY_VERSION}"))
}

/// The real hubble CLI (`HUBBLE_CLI`, else the one `cargo xtask deps`
/// built). Panics with what to run when it is absent.
pub fn hubble_cli() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("HUBBLE_CLI") {
        return p.into();
    }
    let path = hubble_cli_build_path();
    assert!(
        path.exists(),
        "the real hubble CLI is not built: run `cargo xtask deps` (it builds {})",
        path.display()
    );
    path
}

/// xorshift64*: small, seeded, reproducible randomness for the seeded
/// random tests.
pub struct Rng(pub u64);

impl Rng {
    /// Seeded from `var` when set (to repeat a failing run), else from the
    /// clock; the seed is printed, with how to repeat the run.
    pub fn from_env(var: &str) -> Self {
        let seed = std::env::var(var)
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_nanos() as u64
                    | 1
            });
        eprintln!("seed {seed} ({var}={seed} repeats this run)");
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn pick<T: Clone>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize].clone()
    }
}

/// A `/proc/PID/status` figure in KiB (`VmRSS:`, `VmHWM:`), 0 if absent:
/// the benchmarks' memory of a process of theirs.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix(field))
                .and_then(|v| v.split_whitespace().next()?.parse().ok())
        })
        .unwrap_or(0)
}

/// User + system CPU time of process `pid`, seconds.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // After the command's closing parenthesis: state is field 3, utime 14,
    // stime 15.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // USER_HZ: 100 ticks a second on Linux.
    (ticks(11) + ticks(12)) / 100.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ip_header_checksum_verifies() {
        let p = ipv4_packet(
            Ipv4Addr::new(10, 0, 0, 1),
            Ipv4Addr::new(10, 0, 0, 2),
            L4::Tcp {
                sport: 1,
                dport: 2,
                flags: TCP_SYN,
            },
        );
        assert_eq!(checksum(&p[14..34]), 0);
        assert_eq!(p.len(), 14 + 20 + 20);
    }

    #[test]
    fn unique_names_differ_and_fit_an_interface_name() {
        let a = unique_name("ft");
        let b = unique_name("ft");
        assert_ne!(a, b);
        assert!(a.len() <= 15);
    }
}
