//! Tier 3: per-packet service load balancing (`bpf/lib/lb.h`) in the real
//! programs, through BPF_PROG_TEST_RUN: translation to a backend with
//! correct checksums, replies given the service address back, a
//! connection kept on its backend while the service's backends change,
//! ClientIP affinity, a service without backends, and policy deciding on
//! the backend, not the service.

use std::net::Ipv4Addr;

use abi::{
    DropReason, EventType, LbBackend, LbReverseNat, LbService, LbServiceKey, EP_F_EGRESS_ENFORCED,
    LB_SVC_F_AFFINITY, SVC_SIDE_DESTINATION, SVC_SIDE_SOURCE,
};
use fibril_datapath::{Hook, LbWrite};
use test_support::{checksums_valid, ipv4_packet, L4, TCP_ACK, TCP_SYN};

mod common;
use common::*;

const VIP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
/// A backend on no local endpoint (another node's pod, or a host).
const REMOTE: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 30);

fn key(slot: u16) -> LbServiceKey {
    LbServiceKey {
        address: u32::from(VIP).to_be(),
        dport: 80u16.to_be(),
        slot,
        protocol: 6,
        ..Default::default()
    }
}

fn backend(addr: Ipv4Addr) -> LbBackend {
    LbBackend {
        address: u32::from(addr).to_be(),
        port: 8080u16.to_be(),
        protocol: 6,
        flags: 0,
    }
}

/// VIP:80/TCP with `backends` (ids 1.. in slots 1..), reverse-NAT index 7.
fn service(lab: &Lab, backends: &[(u32, Ipv4Addr)], flags: u32) {
    let mut w = vec![LbWrite::ReverseNat(
        7,
        Some(LbReverseNat {
            address: u32::from(VIP).to_be(),
            port: 80u16.to_be(),
            pad: 0,
        }),
    )];
    for (i, (id, addr)) in backends.iter().enumerate() {
        w.push(LbWrite::Backend(*id, Some(backend(*addr))));
        w.push(LbWrite::Service(
            key(i as u16 + 1),
            Some(LbService {
                backend_id: *id,
                ..Default::default()
            }),
        ));
    }
    w.push(LbWrite::Service(
        key(0),
        Some(LbService {
            count: backends.len() as u16,
            rev_nat: 7,
            affinity_timeout_s: 300,
            flags,
            ..Default::default()
        }),
    ));
    lab.dp.lb_apply(&w).unwrap();
}

/// VIP:80/UDP -> REMOTE:8080 (backend id 1, reverse-NAT index 9).
fn udp_service(lab: &Lab) {
    let udp_key = |slot: u16| LbServiceKey {
        protocol: 17,
        ..key(slot)
    };
    lab.dp
        .lb_apply(&[
            LbWrite::ReverseNat(
                9,
                Some(LbReverseNat {
                    address: u32::from(VIP).to_be(),
                    port: 80u16.to_be(),
                    pad: 0,
                }),
            ),
            LbWrite::Backend(
                1,
                Some(LbBackend {
                    protocol: 17,
                    ..backend(REMOTE)
                }),
            ),
            LbWrite::Service(
                udp_key(1),
                Some(LbService {
                    backend_id: 1,
                    ..Default::default()
                }),
            ),
            LbWrite::Service(
                udp_key(0),
                Some(LbService {
                    count: 1,
                    rev_nat: 9,
                    ..Default::default()
                }),
            ),
        ])
        .unwrap();
}

fn tcp(sport: u16, dport: u16, flags: u8) -> L4 {
    L4::Tcp {
        sport,
        dport,
        flags,
    }
}

#[test]
fn a_service_address_becomes_a_backend_and_replies_come_back_from_it() {
    let lab = lab();
    service(&lab, &[(1, SERVER), (2, REMOTE)], 0);
    let mut client = progs(&lab, 1, CLIENT);
    let syn = ipv4_packet(CLIENT, VIP, tcp(40000, 80, TCP_SYN));
    let out = client.test_run(Hook::FromContainer, &syn).unwrap();
    let (backend, port) = dst_of(&out.packet);
    assert!(backend == SERVER || backend == REMOTE, "{backend}");
    assert_eq!(port, 8080);
    assert!(checksums_valid(&out.packet), "checksums after DNAT");
    // Same node: handed to the server pod; else on to the stack.
    let expected = if backend == SERVER {
        TC_ACT_REDIRECT
    } else {
        TC_ACT_OK
    };
    assert_eq!(out.action, expected);

    // The rest of the connection follows its first packet.
    for _ in 0..20 {
        let ack = ipv4_packet(CLIENT, VIP, tcp(40000, 80, TCP_ACK));
        let out = client.test_run(Hook::FromContainer, &ack).unwrap();
        assert_eq!(dst_of(&out.packet), (backend, 8080));
    }

    // The reply enters the client from the service's address.
    let reply = ipv4_packet(backend, CLIENT, tcp(8080, 40000, TCP_SYN | TCP_ACK));
    let back = client.test_run(Hook::ToContainer, &reply).unwrap();
    assert_eq!(back.action, TC_ACT_OK);
    assert_eq!(src_of(&back.packet), (VIP, 80));
    assert!(checksums_valid(&back.packet), "checksums after reverse NAT");

    // Events name the backend, with the service beside it.
    let ev = events(&lab);
    let first = ev
        .iter()
        .find(|e| e.ct_state == abi::ct_state::NEW)
        .unwrap();
    assert_eq!(first.daddr, u32::from(backend).to_be());
    assert_eq!(first.dport, 8080);
    assert_eq!(
        (first.svc_addr, first.svc_port, first.svc_side),
        (u32::from(VIP).to_be(), 80, SVC_SIDE_DESTINATION)
    );
    let replied = ev
        .iter()
        .find(|e| e.ct_state == abi::ct_state::REPLY)
        .unwrap();
    assert_eq!(replied.saddr, u32::from(backend).to_be());
    assert_eq!(
        (replied.svc_addr, replied.svc_port, replied.svc_side),
        (u32::from(VIP).to_be(), 80, SVC_SIDE_SOURCE)
    );

    // A reply of a connection that was never translated is left alone.
    let plain = ipv4_packet(CLIENT, SERVER, tcp(40001, 8080, TCP_SYN));
    client.test_run(Hook::FromContainer, &plain).unwrap();
    let reply = ipv4_packet(SERVER, CLIENT, tcp(8080, 40001, TCP_SYN | TCP_ACK));
    let back = client.test_run(Hook::ToContainer, &reply).unwrap();
    assert_eq!(src_of(&back.packet), (SERVER, 8080));
}

#[test]
fn a_connection_keeps_its_backend_while_the_backends_change() {
    let lab = lab();
    service(&lab, &[(1, SERVER)], 0);
    let mut client = progs(&lab, 1, CLIENT);
    let syn = ipv4_packet(CLIENT, VIP, tcp(40000, 80, TCP_SYN));
    let out = client.test_run(Hook::FromContainer, &syn).unwrap();
    assert_eq!(dst_of(&out.packet), (SERVER, 8080));

    // The service now has only another backend; the first one is
    // terminating (in no slot, still known by id).
    service(&lab, &[(2, REMOTE)], 0);
    let ack = ipv4_packet(CLIENT, VIP, tcp(40000, 80, TCP_ACK));
    let out = client.test_run(Hook::FromContainer, &ack).unwrap();
    assert_eq!(dst_of(&out.packet), (SERVER, 8080), "kept its backend");
    // A new connection goes to the service's backend of now.
    let syn = ipv4_packet(CLIENT, VIP, tcp(40001, 80, TCP_SYN));
    let out = client.test_run(Hook::FromContainer, &syn).unwrap();
    assert_eq!(dst_of(&out.packet), (REMOTE, 8080));

    // Once the old backend is gone altogether, its connections move.
    lab.dp.lb_apply(&[LbWrite::Backend(1, None)]).unwrap();
    let out = client.test_run(Hook::FromContainer, &ack).unwrap();
    assert_eq!(dst_of(&out.packet), (REMOTE, 8080));
}

#[test]
fn client_ip_affinity_sends_every_connection_of_a_client_to_one_backend() {
    let lab = lab();
    let backends: Vec<(u32, Ipv4Addr)> = (1..=8)
        .map(|i| (i, Ipv4Addr::new(10, 78, 0, i as u8)))
        .collect();
    service(&lab, &backends, LB_SVC_F_AFFINITY);
    let mut client = progs(&lab, 1, CLIENT);
    let chosen: std::collections::BTreeSet<Ipv4Addr> = (0..16)
        .map(|i| {
            let syn = ipv4_packet(CLIENT, VIP, tcp(41000 + i, 80, TCP_SYN));
            dst_of(&client.test_run(Hook::FromContainer, &syn).unwrap().packet).0
        })
        .collect();
    assert_eq!(chosen.len(), 1, "{chosen:?}");

    // Without affinity, 16 connections over 8 backends meet several.
    let lab = self::lab();
    service(&lab, &backends, 0);
    let mut client = progs(&lab, 1, CLIENT);
    let chosen: std::collections::BTreeSet<Ipv4Addr> = (0..16)
        .map(|i| {
            let syn = ipv4_packet(CLIENT, VIP, tcp(41000 + i, 80, TCP_SYN));
            dst_of(&client.test_run(Hook::FromContainer, &syn).unwrap().packet).0
        })
        .collect();
    assert!(chosen.len() > 1, "{chosen:?}");
}

#[test]
fn a_service_without_backends_drops_with_its_reason() {
    let lab = lab();
    service(&lab, &[], 0);
    let mut client = progs(&lab, 1, CLIENT);
    let syn = ipv4_packet(CLIENT, VIP, tcp(40000, 80, TCP_SYN));
    let out = client.test_run(Hook::FromContainer, &syn).unwrap();
    assert_eq!(out.action, TC_ACT_SHOT);
    let drops: Vec<_> = events(&lab)
        .into_iter()
        .filter(|e| e.r#type == EventType::Drop as u8)
        .collect();
    assert_eq!(drops.len(), 1);
    assert_eq!(drops[0].subtype, DropReason::NoService as u8);
    // Another port of the address is no service: untouched.
    let other = ipv4_packet(CLIENT, VIP, tcp(40000, 443, TCP_SYN));
    let out = client.test_run(Hook::FromContainer, &other).unwrap();
    assert_eq!(out.action, TC_ACT_OK);
    assert_eq!(dst_of(&out.packet), (VIP, 443));
}

#[test]
fn policy_decides_on_the_backend_not_the_service() {
    let lab = lab();
    enforce(&lab, CLIENT, EP_F_EGRESS_ENFORCED);
    // The server pod's port 8080 is allowed; the service's port 80 is not
    // mentioned anywhere.
    allow(
        &lab,
        1,
        SERVER_ID,
        abi::Direction::Egress as u8,
        6,
        8080,
        false,
    );
    service(&lab, &[(1, SERVER)], 0);
    let mut client = progs(&lab, 1, CLIENT);
    let syn = ipv4_packet(CLIENT, VIP, tcp(40000, 80, TCP_SYN));
    let out = client.test_run(Hook::FromContainer, &syn).unwrap();
    assert_eq!(out.action, TC_ACT_REDIRECT, "allowed to the backend pod");
    // A backend the policy does not allow: dropped, on the backend's terms.
    service(&lab, &[(2, REMOTE)], 0);
    let syn = ipv4_packet(CLIENT, VIP, tcp(40001, 80, TCP_SYN));
    let out = client.test_run(Hook::FromContainer, &syn).unwrap();
    assert_eq!(out.action, TC_ACT_SHOT);
    let drop = events(&lab)
        .into_iter()
        .find(|e| e.r#type == EventType::Drop as u8)
        .unwrap();
    assert_eq!(drop.daddr, u32::from(REMOTE).to_be());
    assert_eq!(drop.svc_side, SVC_SIDE_DESTINATION);
}

#[test]
fn udp_is_translated_with_its_checksum() {
    let lab = lab();
    udp_service(&lab);
    let mut client = progs(&lab, 1, CLIENT);
    let dgram = ipv4_packet(
        CLIENT,
        VIP,
        L4::Udp {
            sport: 5353,
            dport: 80,
        },
    );
    let out = client.test_run(Hook::FromContainer, &dgram).unwrap();
    assert_eq!(dst_of(&out.packet), (REMOTE, 8080));
    assert!(checksums_valid(&out.packet));
}

/// A fragmented datagram to a service goes whole to one backend: the
/// first fragment chooses it, the later ones (no L4 header; their ports
/// are the first's) get its address too; a later fragment whose first was
/// not seen goes nowhere.
#[test]
fn later_fragments_follow_their_datagrams_backend() {
    use test_support::ipv4_fragment;
    let lab = lab();
    udp_service(&lab);
    let mut client = progs(&lab, 1, CLIENT);
    let mut head = Vec::new();
    head.extend_from_slice(&40600u16.to_be_bytes());
    head.extend_from_slice(&80u16.to_be_bytes());
    head.extend_from_slice(&((8 + 1472) as u16).to_be_bytes());
    head.extend_from_slice(&[0, 0]);
    head.extend(std::iter::repeat_n(0x5a, 1472));
    let ip_sum = |header: &[u8]| -> u32 {
        let sum: u32 = header
            .chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], w[1]])))
            .sum();
        (sum & 0xffff) + (sum >> 16)
    };
    let frag = |id, offset, more, payload: &[u8]| {
        ipv4_fragment(CLIENT, VIP, 17, id, offset, more, payload)
    };
    for (offset, more, payload) in [
        (0, true, head.clone()),
        (185, true, vec![0u8; 1480]),
        (370, false, vec![0u8; 100]),
    ] {
        let out = client
            .test_run(Hook::FromContainer, &frag(7, offset, more, &payload))
            .unwrap();
        assert_eq!(out.action, TC_ACT_OK, "fragment at {offset}");
        let to = Ipv4Addr::new(
            out.packet[30],
            out.packet[31],
            out.packet[32],
            out.packet[33],
        );
        assert_eq!(to, REMOTE, "fragment at {offset}");
        // The IP header's checksum still holds (the UDP one is 0: none).
        assert_eq!(ip_sum(&out.packet[14..34]), 0xffff, "fragment at {offset}");
    }
    // A later fragment of a datagram never seen: dropped.
    let out = client
        .test_run(Hook::FromContainer, &frag(8, 185, false, &[0u8; 100]))
        .unwrap();
    assert_eq!(out.action, TC_ACT_SHOT);
}

/// Hairpin: a pod that is its service's backend reaches itself through
/// the service. It sees the connection come from the service loopback
/// address (its own would be a martian source to its stack), and its
/// answer comes back to it from the service's address.
#[test]
fn a_pod_reaches_itself_through_its_service() {
    let lab = lab();
    service(&lab, &[(1, CLIENT)], 0);
    let loopback = Ipv4Addr::new(169, 254, 42, 1);
    let mut client = progs(&lab, 1, CLIENT);
    let syn = ipv4_packet(CLIENT, VIP, tcp(40700, 80, TCP_SYN));
    let out = client.test_run(Hook::FromContainer, &syn).unwrap();
    assert_eq!(out.action, TC_ACT_REDIRECT, "back into the pod");
    assert_eq!(dst_of(&out.packet), (CLIENT, 8080));
    assert_eq!(src_of(&out.packet), (loopback, 40700));
    assert!(checksums_valid(&out.packet));

    // Its server answers the loopback address: back to its client side,
    // from the service.
    let answer = ipv4_packet(CLIENT, loopback, tcp(8080, 40700, TCP_SYN | TCP_ACK));
    let out = client.test_run(Hook::FromContainer, &answer).unwrap();
    assert_eq!(out.action, TC_ACT_REDIRECT);
    assert_eq!(src_of(&out.packet), (VIP, 80));
    assert_eq!(dst_of(&out.packet), (CLIENT, 40700));
    assert!(checksums_valid(&out.packet));

    // The rest of the connection the same way.
    let ack = ipv4_packet(CLIENT, VIP, tcp(40700, 80, TCP_ACK));
    let out = client.test_run(Hook::FromContainer, &ack).unwrap();
    assert_eq!(src_of(&out.packet), (loopback, 40700));
    // Nothing answers the loopback address for a connection never made.
    let stray = ipv4_packet(CLIENT, loopback, tcp(8080, 40999, TCP_ACK));
    assert_eq!(
        client.test_run(Hook::FromContainer, &stray).unwrap().action,
        TC_ACT_SHOT
    );
}

/// An ICMP error about a translated connection (here the remote backend's
/// port unreachable) reaches the client about the service it asked for:
/// the quoted destination and the error's source are the service's
/// again, every checksum intact, so the client's stack finds its socket.
#[test]
fn icmp_errors_about_a_translated_connection_name_the_service() {
    let lab = lab();
    udp_service(&lab);
    let mut client = progs(&lab, 1, CLIENT);
    let datagram = ipv4_packet(
        CLIENT,
        VIP,
        L4::Udp {
            sport: 40800,
            dport: 80,
        },
    );
    let out = client.test_run(Hook::FromContainer, &datagram).unwrap();
    assert_eq!(dst_of(&out.packet), (REMOTE, 8080));
    // The backend answers: port unreachable, quoting what it received.
    let error = test_support::icmp_error_packet(REMOTE, CLIENT, 3, 3, &out.packet);
    let out = client.test_run(Hook::ToContainer, &error).unwrap();
    assert_eq!(out.action, TC_ACT_OK);
    let p = &out.packet;
    assert_eq!(
        Ipv4Addr::new(p[26], p[27], p[28], p[29]),
        VIP,
        "the error's source"
    );
    // The quoted packet: from the client to the service.
    let quoted = 14 + 20 + 8;
    assert_eq!(
        Ipv4Addr::new(
            p[quoted + 16],
            p[quoted + 17],
            p[quoted + 18],
            p[quoted + 19]
        ),
        VIP
    );
    assert_eq!(u16::from_be_bytes([p[quoted + 22], p[quoted + 23]]), 80);
    let ones = |b: &[u8]| -> u32 {
        let mut sum: u32 = b
            .chunks(2)
            .map(|w| u32::from(u16::from_be_bytes([w[0], *w.get(1).unwrap_or(&0)])))
            .sum();
        while sum > 0xffff {
            sum = (sum & 0xffff) + (sum >> 16);
        }
        sum
    };
    assert_eq!(ones(&p[14..34]), 0xffff, "outer IP checksum");
    assert_eq!(ones(&p[34..]), 0xffff, "ICMP checksum");
    assert_eq!(ones(&p[quoted..quoted + 20]), 0xffff, "quoted IP checksum");
}

/// A fragmented reply from the backend enters its client from the
/// service's address, every fragment; a later one (no L4 header) only has
/// its address changed, its payload left alone.
#[test]
fn a_fragmented_reply_comes_back_from_the_service() {
    use test_support::ipv4_fragment;
    let lab = lab();
    udp_service(&lab);
    let mut client = progs(&lab, 1, CLIENT);
    let request = ipv4_packet(
        CLIENT,
        VIP,
        L4::Udp {
            sport: 40900,
            dport: 80,
        },
    );
    let out = client.test_run(Hook::FromContainer, &request).unwrap();
    assert_eq!(dst_of(&out.packet), (REMOTE, 8080));
    let mut head = Vec::new();
    head.extend_from_slice(&8080u16.to_be_bytes());
    head.extend_from_slice(&40900u16.to_be_bytes());
    head.extend_from_slice(&((8 + 1472) as u16).to_be_bytes());
    head.extend_from_slice(&[0, 0]);
    head.extend(std::iter::repeat_n(0x5a, 1472));
    let payload = vec![0xa5u8; 200];
    for (offset, more, bytes) in [(0, true, &head), (185, false, &payload)] {
        let frag = ipv4_fragment(REMOTE, CLIENT, 17, 9, offset, more, bytes);
        let out = client.test_run(Hook::ToContainer, &frag).unwrap();
        assert_eq!(out.action, TC_ACT_OK, "fragment at {offset}");
        assert_eq!(src_of(&out.packet).0, VIP, "fragment at {offset}");
        if offset == 0 {
            assert_eq!(src_of(&out.packet).1, 80);
        } else {
            assert_eq!(
                &out.packet[34..],
                &payload[..],
                "the later fragment's payload"
            );
        }
    }
}
