//! The XDP prefilter against iptables dropping the same source prefixes
//! (issue 18): two namespaces joined by a veth pair; a sender (a raw
//! packet socket, one thread) puts UDP frames from a listed source on one
//! end as fast as it can, and the other end drops them: in its XDP prefilter, or, with
//! the prefilter attached but empty (a veth receives XDP frames only when
//! it runs an XDP program), in iptables' `raw` PREROUTING chain, one
//! `-s PREFIX -j DROP` rule per prefix with the sender's last (the order
//! iptables walks them). With 10 and 10,000 prefixes; the figure is
//! frames the filter dropped a second, and what a frame cost end to end
//! (the veth hands a frame to its peer on the sender's CPU, so the
//! receiver's filtering is part of each send).
//!
//! Run: `cargo run --release -p fibril-datapath --example prefilter_bench`
//! (root). Namespaces and pins are removed at the end, also on failure.

use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::Instant;

use fibril_datapath::{Config, Datapath, PrefilterMode};
use std::os::fd::{AsRawFd, FromRawFd};
use test_support::{ipv4_packet, unique_name, L4};

const SECONDS: f64 = 2.0;
const ROUNDS: usize = 5;
const SENDER: Ipv4Addr = Ipv4Addr::new(198, 18, 40, 7);
const RECEIVER: Ipv4Addr = Ipv4Addr::new(10, 240, 0, 2);

/// Two namespaces and a pin directory, removed on drop.
struct Setup {
    tx_ns: String,
    rx_ns: String,
    pin_dir: std::path::PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        netns::delete_netns(&self.tx_ns);
        netns::delete_netns(&self.rx_ns);
        Datapath::unpin_all(&self.pin_dir);
    }
}

fn ip(ns: &str, args: &[&str]) -> anyhow::Result<String> {
    Ok(netns::ip_netns(ns, args)?)
}

fn iptables_restore(ns: &str, rules: &str) -> anyhow::Result<()> {
    use std::io::Write;
    let mut child = Command::new("ip")
        .args(["netns", "exec", ns, "iptables-restore"])
        .stdin(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .ok_or_else(|| anyhow::anyhow!("no stdin"))?
        .write_all(rules.as_bytes())?;
    anyhow::ensure!(child.wait()?.success(), "iptables-restore failed");
    Ok(())
}

/// `count` prefixes: /24s of 100.64.0.0/10 and, last, the sender's.
fn prefixes(count: usize) -> Vec<(Ipv4Addr, u32)> {
    let mut v: Vec<(Ipv4Addr, u32)> = (0..count - 1)
        .map(|i| {
            let n = u32::from(Ipv4Addr::new(100, 64, 0, 0)) + ((i as u32) << 8);
            (Ipv4Addr::from(n), 24)
        })
        .collect();
    v.push((Ipv4Addr::new(198, 18, 40, 0), 24));
    v
}

/// Packets the `raw` table's rule for the sender's prefix has dropped.
fn iptables_dropped(ns: &str) -> anyhow::Result<u64> {
    let out = Command::new("ip")
        .args(["netns", "exec", ns, "iptables-save", "-c", "-t", "raw"])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find(|l| l.contains("-s 198.18.40.0/24"))
        .and_then(|l| l.strip_prefix('['))
        .and_then(|l| l.split(':').next())
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no rule for the sender in {text}"))
}

/// Sends copies of `frame` out of `ifname` (in the sender's namespace)
/// through a raw packet socket for `SECONDS`, as fast as one thread can;
/// the frames sent and the seconds it took.
fn send(tx_ns: &str, ifname: &str, frame: &[u8]) -> anyhow::Result<(u64, f64)> {
    netns::in_netns(tx_ns, || -> anyhow::Result<(u64, f64)> {
        let ifindex = netns::ifindex(ifname)?;
        // SAFETY: plain socket(2); the result is checked.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW,
                i32::from((libc::ETH_P_ALL as u16).to_be()),
            )
        };
        anyhow::ensure!(
            fd >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: `fd` was just opened by this thread and is owned here.
        let sock = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
        // SAFETY: an all-zero sockaddr_ll is valid; its fields are set
        // below.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = libc::AF_PACKET as u16;
        addr.sll_ifindex = ifindex as i32;
        addr.sll_halen = 6;
        let started = Instant::now();
        let mut sent = 0u64;
        while started.elapsed().as_secs_f64() < SECONDS {
            for _ in 0..1024 {
                // SAFETY: `frame` and `addr` are valid for the call and
                // their lengths are given.
                let n = unsafe {
                    libc::sendto(
                        sock.as_raw_fd(),
                        frame.as_ptr().cast(),
                        frame.len(),
                        0,
                        (&addr as *const libc::sockaddr_ll).cast(),
                        std::mem::size_of::<libc::sockaddr_ll>() as u32,
                    )
                };
                if n > 0 {
                    sent += 1;
                }
            }
        }
        Ok((sent, started.elapsed().as_secs_f64()))
    })?
}

/// `ROUNDS` sends, each read against the filter's drop counter
/// (`dropped`): the median drops a second and nanoseconds a frame.
fn rounds(
    setup: &Setup,
    frame: &[u8],
    dropped: impl Fn() -> anyhow::Result<u64>,
) -> anyhow::Result<(f64, f64)> {
    let mut rates = Vec::new();
    let mut costs = Vec::new();
    for _ in 0..ROUNDS {
        let before = dropped()?;
        let (sent, secs) = send(&setup.tx_ns, "pfb-tx", frame)?;
        rates.push((dropped()? - before) as f64 / secs);
        costs.push(secs * 1e9 / sent.max(1) as f64);
    }
    Ok((median(rates), median(costs)))
}

fn print_row(count: usize, filter: &str, (rate, cost): (f64, f64)) {
    println!("  {count:>8} | {filter:>22} | {rate:>16.0} | {cost:>12.0}");
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() -> anyhow::Result<()> {
    let setup = Setup {
        tx_ns: unique_name("fibril-pfb-tx-"),
        rx_ns: unique_name("fibril-pfb-rx-"),
        pin_dir: std::path::PathBuf::from("/sys/fs/bpf").join(unique_name("fibril-pfb-")),
    };
    netns::create_netns(&setup.tx_ns)?;
    netns::create_netns(&setup.rx_ns)?;
    ip(
        &setup.tx_ns,
        &[
            "link",
            "add",
            "pfb-tx",
            "type",
            "veth",
            "peer",
            "name",
            "pfb-rx",
            "netns",
            &setup.rx_ns,
        ],
    )?;
    ip(&setup.tx_ns, &["link", "set", "pfb-tx", "up"])?;
    ip(
        &setup.rx_ns,
        &["link", "set", "pfb-rx", "address", "02:00:00:00:40:02"],
    )?;
    ip(
        &setup.rx_ns,
        &["addr", "add", &format!("{RECEIVER}/24"), "dev", "pfb-rx"],
    )?;
    ip(&setup.rx_ns, &["link", "set", "pfb-rx", "up"])?;
    ip(&setup.rx_ns, &["link", "set", "lo", "up"])?;
    // The frame: UDP from a listed source to the receiver, addressed to
    // its MAC (iptables sees only frames the stack accepts as its own).
    let rx_mac = [0x02, 0, 0, 0, 0x40, 0x02];
    let mut frame = ipv4_packet(
        SENDER,
        RECEIVER,
        L4::Udp {
            sport: 40000,
            dport: 9,
        },
    );
    frame[0..6].copy_from_slice(&rx_mac);

    let dp = Datapath::open(Config::new(&setup.pin_dir))?;
    netns::in_netns(&setup.rx_ns, || {
        dp.attach_prefilter("pfb-rx", PrefilterMode::Native)
    })??;
    println!(
        "  {:>8} | {:>22} | {:>16} | {:>12}",
        "prefixes", "filter", "dropped/s", "ns/frame"
    );
    for count in [10usize, 10_000] {
        let list = prefixes(count);
        // XDP prefilter.
        dp.prefilter_update(&list, &[])?;
        let row = rounds(&setup, &frame, || {
            Ok(dp.prefilter_counters()?.dropped_packets)
        })?;
        print_row(count, "XDP prefilter", row);
        dp.prefilter_update(&[], &list)?;
        // iptables: the same prefixes, the sender's last.
        let mut rules = String::from("*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
        for (a, l) in &list {
            rules.push_str(&format!("-A PREROUTING -s {a}/{l} -j DROP\n"));
        }
        rules.push_str("COMMIT\n");
        iptables_restore(&setup.rx_ns, &rules)?;
        let row = rounds(&setup, &frame, || iptables_dropped(&setup.rx_ns))?;
        print_row(count, "iptables raw, linear", row);
        iptables_restore(
            &setup.rx_ns,
            "*raw\n:PREROUTING ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n",
        )?;
    }
    Ok(())
}
