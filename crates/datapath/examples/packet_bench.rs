//! `cargo xtask bench --only packet`: what the datapath's programs cost per
//! packet, measured by the kernel under BPF_PROG_TEST_RUN (the same packet
//! run `REPEAT` times in one syscall; the kernel reports the mean). The
//! connection-tracking paths every packet takes: an established packet
//! pod to pod (the sender's program delivers into the peer) and from the
//! host stack, a retransmitted SYN, a SYN reopening a closed tuple, a later
//! fragment (ports from its first), an ICMP error about a tracked
//! connection, and a new connection refused by policy (lookup and drop
//! event). Needs root.
//! Pinned maps live in a directory of their own, removed at the end.

use std::net::Ipv4Addr;

use abi::{EndpointInfo, PolicyKeyData, PolicyValue, EP_F_INGRESS_ENFORCED};
use abi::{POLICY_FULL_PREFIX_BITS, POLICY_STATIC_PREFIX_BITS};
use fibril_datapath::{Config, Datapath, EndpointPrograms, Hook, PolicyEntry};
use test_support::{ipv4_packet, unique_name, L4, TCP_ACK, TCP_FIN, TCP_SYN};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 10);
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 20);
const REPEAT: u32 = 1_000_000;
const ROUNDS: usize = 5;

fn tcp(sport: u16, flags: u8) -> L4 {
    L4::Tcp {
        sport,
        dport: 8080,
        flags,
    }
}

struct Pins(std::path::PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        Datapath::unpin_all(&self.0);
    }
}

/// The median of `ROUNDS` runs of `REPEAT` packets, in ns per packet, after
/// `prepare` (run once per round: it sets the connection up).
fn measure(
    p: &mut EndpointPrograms,
    hook: Hook,
    packet: &[u8],
    mut prepare: impl FnMut(&mut EndpointPrograms),
    repeat: u32,
) -> anyhow::Result<(u64, u32)> {
    let mut ns = Vec::new();
    let mut action = 0;
    for _ in 0..ROUNDS {
        prepare(p);
        let out = p.test_run_repeat(hook, packet, repeat)?;
        action = out.action;
        ns.push(out.ns_per_run);
    }
    ns.sort_unstable();
    Ok((ns[ns.len() / 2], action))
}

fn main() -> anyhow::Result<()> {
    let pins = Pins(std::path::PathBuf::from("/sys/fs/bpf").join(unique_name("fibril-pktbench-")));
    let dp = Datapath::open(Config::new(&pins.0))?;
    // The reader drains the ring buffer so that drop events find room.
    let mut reader = dp.take_event_reader();
    for (ip, ep, id, ifindex) in [(CLIENT, 1, 300, 1000), (SERVER, 2, 301, 1001)] {
        dp.upsert_endpoint(
            ip,
            EndpointInfo {
                ep_id: ep,
                identity: id,
                host_ifindex: ifindex,
                flags: if ep == 2 { EP_F_INGRESS_ENFORCED } else { 0 },
                pod_mac: [2, 0, 0, 0, 1, ep as u8],
                host_mac: [2, 0, 0, 0, 2, ep as u8],
                pad: 0,
            },
        )?;
    }
    // The server accepts the client on 8080 only.
    dp.upsert_policy(&PolicyEntry {
        prefix_len: POLICY_FULL_PREFIX_BITS,
        key: PolicyKeyData {
            ep_id: 2u32.to_be(),
            identity: 300u32.to_be(),
            direction: abi::Direction::Ingress as u8,
            protocol: 6,
            dport: 8080u16.to_be(),
        },
        value: PolicyValue {
            cookie: 1,
            flags: 0,
            prefix: (POLICY_FULL_PREFIX_BITS - POLICY_STATIC_PREFIX_BITS) as u8,
            pad: 0,
        },
    })?;
    let mut client = dp.load_endpoint_programs(1, CLIENT)?;
    let mut server = dp.load_endpoint_programs(2, SERVER)?;
    let pkt = |sport, flags| ipv4_packet(CLIENT, SERVER, tcp(sport, flags));
    let open = |p: &mut EndpointPrograms, hook, sport| {
        for flags in [TCP_SYN, TCP_ACK] {
            let _ = p.test_run(hook, &pkt(sport, flags));
        }
    };

    println!("{:<56} {:>10} {:>8}", "path", "ns/packet", "action");
    let mut show = |name: &str, (ns, action): (u64, u32)| {
        println!("{name:<56} {ns:>10} {action:>8}");
        if let Some(r) = reader.as_mut() {
            r.poll(std::time::Duration::ZERO, |_| {});
        }
    };
    show(
        "established ACK, pod to pod (from_container)",
        measure(
            &mut client,
            Hook::FromContainer,
            &pkt(40000, TCP_ACK),
            |p| open(p, Hook::FromContainer, 40000),
            REPEAT,
        )?,
    );
    show(
        "established ACK, host stack to pod (to_container)",
        measure(
            &mut server,
            Hook::ToContainer,
            &pkt(40001, TCP_ACK),
            |p| open(p, Hook::ToContainer, 40001),
            REPEAT,
        )?,
    );
    show(
        "retransmitted SYN (to_container)",
        measure(
            &mut server,
            Hook::ToContainer,
            &pkt(40002, TCP_SYN),
            |p| {
                let _ = p.test_run(Hook::ToContainer, &pkt(40002, TCP_SYN));
            },
            REPEAT,
        )?,
    );
    // Each run reopens: the entry is closing (FIN seen), the SYN deletes
    // it and policy runs again; the next run finds the new entry, so one
    // packet per round is a reopen: measured with repeat 1.
    show(
        "SYN reopening a closed tuple (to_container, 1 run)",
        measure(
            &mut server,
            Hook::ToContainer,
            &pkt(40003, TCP_SYN),
            |p| {
                open(p, Hook::ToContainer, 40003);
                let _ = p.test_run(Hook::ToContainer, &pkt(40003, TCP_FIN | TCP_ACK));
            },
            1,
        )?,
    );
    // A datagram's later fragment: its ports from the first (frag map),
    // then the established path.
    let first = test_support::ipv4_fragment(CLIENT, SERVER, 6, 7, 0, true, &{
        let mut t = vec![0u8; 20];
        t[0..2].copy_from_slice(&40005u16.to_be_bytes());
        t[2..4].copy_from_slice(&8080u16.to_be_bytes());
        t[12] = 5 << 4;
        t[13] = TCP_ACK;
        t
    });
    show(
        "later fragment of a tracked connection (to_container)",
        measure(
            &mut server,
            Hook::ToContainer,
            &test_support::ipv4_fragment(CLIENT, SERVER, 6, 7, 3, false, &[0u8; 64]),
            |p| {
                open(p, Hook::ToContainer, 40005);
                let _ = p.test_run(Hook::ToContainer, &first);
            },
            REPEAT,
        )?,
    );
    // An ICMP error about a tracked connection (related, no policy).
    show(
        "ICMP error about a tracked connection (to_container)",
        measure(
            &mut server,
            Hook::ToContainer,
            &test_support::icmp_error_packet(CLIENT, SERVER, 3, 4, &{
                // The quoted packet went from the server to the client.
                ipv4_packet(
                    SERVER,
                    CLIENT,
                    L4::Tcp {
                        sport: 8080,
                        dport: 40006,
                        flags: TCP_ACK,
                    },
                )
            }),
            |p| open(p, Hook::ToContainer, 40006),
            REPEAT,
        )?,
    );
    show(
        "new connection refused by policy (to_container)",
        measure(
            &mut server,
            Hook::ToContainer,
            &ipv4_packet(Ipv4Addr::new(10, 78, 0, 99), SERVER, tcp(40004, TCP_SYN)),
            |_| {},
            REPEAT,
        )?,
    );
    // What a new endpoint waits for: loading (and the kernel verifying)
    // its two programs.
    let mut loads: Vec<f64> = (0..20u32)
        .map(|i| {
            let start = std::time::Instant::now();
            dp.load_endpoint_programs(100 + i, Ipv4Addr::new(10, 78, 1, i as u8 + 1))
                .map(|_| start.elapsed().as_secs_f64() * 1e3)
        })
        .collect::<Result<_, _>>()?;
    loads.sort_by(|a, b| a.total_cmp(b));
    println!(
        "loading one endpoint's programs (verification included), 20 loads: p50 {:.1} ms, max {:.1} ms",
        loads[10], loads[19]
    );
    Ok(())
}
