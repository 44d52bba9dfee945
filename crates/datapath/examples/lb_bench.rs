//! `cargo xtask bench --only lb`: what the per-packet load balancer
//! (`bpf/lib/lb.h`) costs a pod's packet, measured by the kernel under
//! BPF_PROG_TEST_RUN (median of 5,000 single runs): an established packet to a
//! service's cluster IP (service lookup, the connection's backend, DNAT,
//! then the usual conntrack and same-node delivery) against the same packet
//! sent to the backend pod directly, with 10, 1,000 and 10,000 services in
//! the maps (hash lookups: the cost must not grow with them, where
//! kube-proxy's iptables walks a chain per service), and a new connection
//! (backend choice). Needs root. Pinned maps live in a directory of their
//! own, removed at the end.

use std::net::Ipv4Addr;

use abi::{EndpointInfo, LbBackend, LbReverseNat, LbService, LbServiceKey};
use fibril_datapath::{Config, Datapath, EndpointPrograms, Hook, LbWrite};
use test_support::{ipv4_packet, unique_name, L4, TCP_ACK, TCP_SYN};

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 10);
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 20);
const SINGLE_RUNS: usize = 5_000;

struct Pins(std::path::PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        Datapath::unpin_all(&self.0);
    }
}

fn vip(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i)
}

/// Services 1..=n, each VIP:80 -> one backend (the server pod's 8080).
fn services(dp: &Datapath, from: u32, to: u32) -> anyhow::Result<()> {
    let mut w = vec![LbWrite::Backend(
        1,
        Some(LbBackend {
            address: u32::from(SERVER).to_be(),
            port: 8080u16.to_be(),
            protocol: 6,
            flags: 0,
        }),
    )];
    for i in from..=to {
        let key = |slot| LbServiceKey {
            address: u32::from(vip(i)).to_be(),
            dport: 80u16.to_be(),
            slot,
            protocol: 6,
            ..Default::default()
        };
        w.push(LbWrite::ReverseNat(
            i as u16,
            Some(LbReverseNat {
                address: u32::from(vip(i)).to_be(),
                port: 80u16.to_be(),
                pad: 0,
            }),
        ));
        w.push(LbWrite::Service(
            key(1),
            Some(LbService {
                backend_id: 1,
                ..Default::default()
            }),
        ));
        w.push(LbWrite::Service(
            key(0),
            Some(LbService {
                count: 1,
                rev_nat: i as u16,
                ..Default::default()
            }),
        ));
    }
    dp.lb_apply(&w)?;
    Ok(())
}

/// The median of `SINGLE_RUNS` runs of one packet each. Not `repeat`: the
/// kernel runs a repeat on the same buffer, so from the second run on the
/// packet would already carry the backend's address and skip the
/// translation being measured. A single run's time carries the test run's
/// own overhead: compare rows, not absolute values.
fn median(p: &mut EndpointPrograms, packet: &[u8]) -> anyhow::Result<u64> {
    let mut ns = Vec::new();
    for _ in 0..SINGLE_RUNS {
        ns.push(p.test_run(Hook::FromContainer, packet)?.ns_per_run);
    }
    ns.sort_unstable();
    Ok(ns[ns.len() / 2])
}

fn main() -> anyhow::Result<()> {
    let pins = Pins(std::path::PathBuf::from("/sys/fs/bpf").join(unique_name("fibril-lbbench-")));
    let dp = Datapath::open(Config::new(&pins.0))?;
    for (ip, ep, id, ifindex) in [(CLIENT, 1, 300, 1000), (SERVER, 2, 301, 1001)] {
        dp.upsert_endpoint(
            ip,
            EndpointInfo {
                ep_id: ep,
                identity: id,
                host_ifindex: ifindex,
                flags: 0,
                pod_mac: [2, 0, 0, 0, 1, ep as u8],
                host_mac: [2, 0, 0, 0, 2, ep as u8],
                pad: 0,
            },
        )?;
    }
    let mut client = dp.load_endpoint_programs(1, CLIENT)?;
    let ack = |dst, sport, dport| {
        ipv4_packet(
            CLIENT,
            dst,
            L4::Tcp {
                sport,
                dport,
                flags: TCP_ACK,
            },
        )
    };
    let open = |p: &mut EndpointPrograms, dst, sport, dport| {
        let syn = ipv4_packet(
            CLIENT,
            dst,
            L4::Tcp {
                sport,
                dport,
                flags: TCP_SYN,
            },
        );
        let _ = p.test_run(Hook::FromContainer, &syn);
        let _ = p.test_run(Hook::FromContainer, &ack(dst, sport, dport));
    };
    open(&mut client, SERVER, 40000, 8080);
    let direct = median(&mut client, &ack(SERVER, 40000, 8080))?;
    println!(
        "{:<58} {:>10} {:>8}",
        "path (from_container, same-node backend)", "ns/packet", "vs direct"
    );
    println!(
        "{:<58} {direct:>10} {:>8}",
        "established ACK to the pod's address", "1.00"
    );
    let mut loaded = 0;
    for n in [10u32, 1_000, 10_000] {
        services(&dp, loaded + 1, n)?;
        loaded = n;
        // The last service written: no luckier than any other.
        let sport = 41000 + (n % 1000) as u16;
        open(&mut client, vip(n), sport, 80);
        let ns = median(&mut client, &ack(vip(n), sport, 80))?;
        println!(
            "{:<58} {ns:>10} {:>8.2}",
            format!("established ACK to a cluster IP, {n} services"),
            ns as f64 / direct as f64
        );
    }
    // A new connection each run (one run at a time: only a connection's
    // first packet is new): to the pod, and to a cluster IP (the backend
    // chosen, the service entry made too).
    let mut new_conn = |dst: Ipv4Addr, dport: u16, base: u16| -> anyhow::Result<u64> {
        let mut ns = Vec::new();
        for i in 0..200u16 {
            let syn = ipv4_packet(
                CLIENT,
                dst,
                L4::Tcp {
                    sport: base + i,
                    dport,
                    flags: TCP_SYN,
                },
            );
            let out = client.test_run(Hook::FromContainer, &syn)?;
            // Translated: the packet leaves for the backend.
            anyhow::ensure!(out.packet[30..34] == SERVER.octets(), "not translated");
            ns.push(out.ns_per_run);
        }
        ns.sort_unstable();
        Ok(ns[100])
    };
    let direct_new = new_conn(SERVER, 8080, 20000)?;
    let lb_new = new_conn(vip(loaded), 80, 30000)?;
    println!(
        "{:<58} {direct_new:>10} {:>8}",
        "new connection to the pod's address (p50 of 200)", "1.00"
    );
    println!(
        "{:<58} {lb_new:>10} {:>8.2}",
        "new connection to a cluster IP, 10000 services (p50 of 200)",
        lb_new as f64 / direct_new as f64
    );
    Ok(())
}
