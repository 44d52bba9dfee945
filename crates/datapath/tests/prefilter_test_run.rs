//! Tier 3: the XDP prefilter (`bpf/xdp.bpf.c`) through BPF_PROG_TEST_RUN:
//! a listed source prefix is dropped, counted and reported (at most once a
//! millisecond per CPU), everything else passes untouched. Needs root.

mod common;

use std::net::Ipv4Addr;

use abi::{EventType, FlowEvent};
use common::{all_events, lab, syn, SERVER};
use test_support::ipv4_packet;

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

const ATTACKER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const NEIGHBOUR: Ipv4Addr = Ipv4Addr::new(198, 51, 101, 7);

fn drops(events: &[FlowEvent]) -> Vec<&FlowEvent> {
    events
        .iter()
        .filter(|e| e.r#type == EventType::Drop as u8)
        .collect()
}

#[test]
fn a_listed_source_prefix_is_dropped_counted_and_reported() {
    let lab = lab();
    let mut prog = lab.dp.load_prefilter_program().unwrap();
    let from_attacker = ipv4_packet(ATTACKER, SERVER, syn(40000, 8080));
    let from_neighbour = ipv4_packet(NEIGHBOUR, SERVER, syn(40001, 8080));

    // Nothing listed: everything passes, unchanged.
    let out = prog.test_run(&from_attacker, 1).unwrap();
    assert_eq!(out.action, XDP_PASS);
    assert_eq!(out.packet, from_attacker);

    lab.dp
        .prefilter_update(&[(Ipv4Addr::new(198, 51, 100, 0), 24)], &[])
        .unwrap();
    assert_eq!(
        lab.dp.prefilter_entries().unwrap(),
        [(Ipv4Addr::new(198, 51, 100, 0), 24)]
    );
    let before = lab.dp.prefilter_counters().unwrap();
    assert_eq!(prog.test_run(&from_attacker, 1).unwrap().action, XDP_DROP);
    assert_eq!(prog.test_run(&from_neighbour, 1).unwrap().action, XDP_PASS);
    let after = lab.dp.prefilter_counters().unwrap();
    assert_eq!(after.dropped_packets - before.dropped_packets, 1);
    assert_eq!(
        after.dropped_bytes - before.dropped_bytes,
        from_attacker.len() as u64
    );
    assert_eq!(after.passed_packets - before.passed_packets, 1);
    // The drop as a flow: from the world to the server's identity, with
    // its ports.
    let events = all_events(&lab);
    let d = drops(&events);
    assert_eq!(d.len(), 1, "{events:?}");
    let e = d[0];
    assert_eq!(e.subtype, abi::DropReason::PolicyDenied as u8);
    assert_eq!(e.verdict, abi::verdict::DROPPED);
    assert_eq!(Ipv4Addr::from(u32::from_be(e.saddr)), ATTACKER);
    assert_eq!(Ipv4Addr::from(u32::from_be(e.daddr)), SERVER);
    assert_eq!((e.sport, e.dport), (40000, 8080));
    assert_eq!(e.src_identity, abi::identity::WORLD);
    assert_eq!(e.dst_identity, common::SERVER_ID);

    // A flood: every packet counted, the ring spared (one report a
    // millisecond per CPU at most; 100,000 runs take a few).
    let before = lab.dp.prefilter_counters().unwrap();
    let out = prog.test_run(&from_attacker, 100_000).unwrap();
    assert_eq!(out.action, XDP_DROP);
    let after = lab.dp.prefilter_counters().unwrap();
    assert_eq!(after.dropped_packets - before.dropped_packets, 100_000);
    let reports = drops(&all_events(&lab)).len();
    assert!(reports < 1_000, "{reports} reports for 100,000 drops");

    // Removed: passes again.
    lab.dp
        .prefilter_update(&[], &[(Ipv4Addr::new(198, 51, 100, 0), 24)])
        .unwrap();
    assert!(lab.dp.prefilter_entries().unwrap().is_empty());
    assert_eq!(prog.test_run(&from_attacker, 1).unwrap().action, XDP_PASS);
}

#[test]
fn frames_it_cannot_read_pass() {
    let lab = lab();
    lab.dp
        .prefilter_update(&[(Ipv4Addr::new(0, 0, 0, 0), 0)], &[])
        .unwrap();
    let mut prog = lab.dp.load_prefilter_program().unwrap();
    let ip = ipv4_packet(ATTACKER, SERVER, syn(40000, 8080));
    // Everything IPv4 is listed (0.0.0.0/0): dropped.
    assert_eq!(prog.test_run(&ip, 1).unwrap().action, XDP_DROP);
    // ARP, and an IPv4 frame cut inside its header: not IPv4 the
    // prefilter can read, so not its to drop.
    let mut arp = ip.clone();
    arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
    assert_eq!(prog.test_run(&arp, 1).unwrap().action, XDP_PASS);
    assert_eq!(prog.test_run(&ip[..20], 1).unwrap().action, XDP_PASS);
}
