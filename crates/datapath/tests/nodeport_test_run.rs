//! Tier 3: kube-proxy replacement on the node's device (`bpf/host.bpf.c`
//! with `lib/lb.h`) through BPF_PROG_TEST_RUN: a packet from outside to a
//! node port gets the backend its Maglev table gives its connection's
//! hash (the same tuple, the same backend, on any node), the backend's
//! reply leaves from the node port again, a connection to another node's
//! backend leaves from the node's address (source NAT) and its reply finds
//! its client, and internal frontends (cluster IPs) are not served from
//! outside. Needs root.

mod common;

use std::net::Ipv4Addr;

use abi::{LbBackend, LbReverseNat, LbService, LbServiceKey, LB_SVC_F_EXTERNAL};
use common::{dst_of, lab, lab_with, src_of, Lab, SERVER, TC_ACT_OK};
use fibril_datapath::{LbWrite, NetdevHook};
use test_support::{checksums_valid, ipv4_packet, L4, TCP_ACK, TCP_SYN};

const NODE: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const OUTSIDER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const REMOTE: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 30);
const CLUSTER_IP: Ipv4Addr = Ipv4Addr::new(10, 96, 0, 10);
const NODE_PORT: u16 = 30080;

fn key(addr: Ipv4Addr, port: u16, slot: u16) -> LbServiceKey {
    LbServiceKey {
        address: u32::from(addr).to_be(),
        dport: port.to_be(),
        slot,
        protocol: 6,
        ..Default::default()
    }
}

/// A frontend with backends SERVER (id 1) and REMOTE (id 2).
fn frontend(lab: &Lab, addr: Ipv4Addr, port: u16, rev_nat: u16, flags: u32) {
    let mut w = vec![LbWrite::ReverseNat(
        rev_nat,
        Some(LbReverseNat {
            address: u32::from(addr).to_be(),
            port: port.to_be(),
            pad: 0,
        }),
    )];
    for (slot, (id, be)) in [(1u32, SERVER), (2, REMOTE)].into_iter().enumerate() {
        w.push(LbWrite::Backend(
            id,
            Some(LbBackend {
                address: u32::from(be).to_be(),
                port: 8080u16.to_be(),
                protocol: 6,
                flags: 0,
            }),
        ));
        w.push(LbWrite::Service(
            key(addr, port, slot as u16 + 1),
            Some(LbService {
                backend_id: id,
                ..Default::default()
            }),
        ));
    }
    w.push(LbWrite::Service(
        key(addr, port, 0),
        Some(LbService {
            count: 2,
            rev_nat,
            flags,
            ..Default::default()
        }),
    ));
    lab.dp.lb_apply(&w).unwrap();
}

fn tcp(sport: u16, dport: u16, flags: u8) -> L4 {
    L4::Tcp {
        sport,
        dport,
        flags,
    }
}

fn kpr_lab() -> Lab {
    let lab = lab_with(|c| {
        c.kube_proxy_replacement = true;
        c.nodeport_snat_address = NODE;
        c.maglev_table_size = 251;
    });
    lab.dp
        .upsert_ipcache(NODE, 32, abi::identity::HOST, None)
        .unwrap();
    lab
}

#[test]
fn a_node_port_goes_where_its_maglev_table_says_and_answers_from_itself() {
    let lab = kpr_lab();
    frontend(&lab, NODE, NODE_PORT, 7, LB_SVC_F_EXTERNAL);
    let mut host = lab.dp.load_host_programs().unwrap();
    let syn = |sport: u16| ipv4_packet(OUTSIDER, NODE, tcp(sport, NODE_PORT, TCP_SYN));

    // Every slot names the remote backend: every connection goes there.
    lab.dp.lb_maglev_set(7, &[2; 251]).unwrap();
    assert_eq!(lab.dp.lb_maglev_keys(), vec![7]);
    for sport in 40000..40010 {
        let out = host.test_run(NetdevHook::FromNetdev, &syn(sport)).unwrap();
        assert_eq!(out.action, TC_ACT_OK);
        assert_eq!(dst_of(&out.packet), (REMOTE, 8080));
        assert!(checksums_valid(&out.packet));
    }
    // A connection keeps its backend when the table changes; new ones
    // follow the new table.
    lab.dp.lb_maglev_set(7, &[1; 251]).unwrap();
    let ack = ipv4_packet(OUTSIDER, NODE, tcp(40000, NODE_PORT, TCP_ACK));
    let out = host.test_run(NetdevHook::FromNetdev, &ack).unwrap();
    assert_eq!(dst_of(&out.packet), (REMOTE, 8080));
    let out = host.test_run(NetdevHook::FromNetdev, &syn(41000)).unwrap();
    assert_eq!(dst_of(&out.packet), (SERVER, 8080));

    // The backend's reply leaves from the node port.
    let reply = ipv4_packet(SERVER, OUTSIDER, tcp(8080, 41000, TCP_SYN | TCP_ACK));
    let out = host.test_run(NetdevHook::ToNetdev, &reply).unwrap();
    assert_eq!(out.action, TC_ACT_OK);
    assert_eq!(src_of(&out.packet), (NODE, NODE_PORT));
    assert!(checksums_valid(&out.packet));
    // Another packet of no node port's connection leaves as it is.
    let other = ipv4_packet(SERVER, OUTSIDER, tcp(8080, 42000, TCP_ACK));
    let out = host.test_run(NetdevHook::ToNetdev, &other).unwrap();
    assert_eq!(out.packet, other);

    // Half the slots each: a connection's backend is its hash's, the same
    // every time it is chosen afresh (as on any other node).
    let half: Vec<u32> = (0..251).map(|i| 1 + (i % 2)).collect();
    lab.dp.lb_maglev_set(7, &half).unwrap();
    let mut first = Vec::new();
    for sport in 43000..43040 {
        first.push(
            dst_of(
                &host
                    .test_run(NetdevHook::FromNetdev, &syn(sport))
                    .unwrap()
                    .packet,
            )
            .0,
        );
    }
    assert!(
        first.contains(&SERVER) && first.contains(&REMOTE),
        "{first:?}"
    );
    lab.dp.ct_flush(|_, _| true);
    for (i, sport) in (43000..43040).enumerate() {
        let again = dst_of(
            &host
                .test_run(NetdevHook::FromNetdev, &syn(sport))
                .unwrap()
                .packet,
        )
        .0;
        assert_eq!(again, first[i], "port {sport}");
    }
}

#[test]
fn a_remote_backends_connection_leaves_from_the_node_and_its_reply_finds_the_client() {
    let lab = kpr_lab();
    frontend(&lab, NODE, NODE_PORT, 7, LB_SVC_F_EXTERNAL);
    // Every slot names the backend on the other node.
    lab.dp.lb_maglev_set(7, &[2; 251]).unwrap();
    let mut host = lab.dp.load_host_programs().unwrap();
    // In, then (the stack routed it to the other node) out: translated,
    // marked on the way in, from the node's address on the way out.
    let through = |host: &mut fibril_datapath::HostPrograms, client: Ipv4Addr, sport: u16| {
        let syn = ipv4_packet(client, NODE, tcp(sport, NODE_PORT, TCP_SYN));
        let inbound = host
            .test_run_marked(NetdevHook::FromNetdev, &syn, Some(0))
            .unwrap();
        assert_eq!(inbound.mark, abi::NODEPORT_MASQ_MARK);
        assert_eq!(dst_of(&inbound.packet), (REMOTE, 8080));
        let out = host
            .test_run_marked(NetdevHook::ToNetdev, &inbound.packet, Some(inbound.mark))
            .unwrap();
        assert_eq!(out.action, TC_ACT_OK);
        assert_eq!(dst_of(&out.packet), (REMOTE, 8080));
        assert!(checksums_valid(&out.packet));
        let (addr, port) = src_of(&out.packet);
        assert_eq!(addr, NODE);
        port
    };
    // The client's port where it is free (as MASQUERADE keeps it), the
    // same for the connection's later packets.
    assert_eq!(through(&mut host, OUTSIDER, 40000), 40000);
    assert_eq!(through(&mut host, OUTSIDER, 40000), 40000);
    // Another client on the same port gets another port of the range;
    // a port under the range is never kept (node ports live there).
    let other = Ipv4Addr::new(198, 51, 100, 8);
    let second = through(&mut host, other, 40000);
    assert!(
        second != 40000 && (32768..=60999).contains(&second),
        "{second}"
    );
    let low = through(&mut host, other, 1234);
    assert!((32768..=60999).contains(&low), "{low}");

    // The backend's replies: to their clients again, then (routed back
    // out) from the node port.
    for (client, port, sport) in [(OUTSIDER, 40000, 40000), (other, second, 40000)] {
        let reply = ipv4_packet(REMOTE, NODE, tcp(8080, port, TCP_SYN | TCP_ACK));
        let back = host.test_run(NetdevHook::FromNetdev, &reply).unwrap();
        assert_eq!(back.action, TC_ACT_OK);
        assert_eq!(dst_of(&back.packet), (client, sport));
        assert!(checksums_valid(&back.packet));
        let leaving = host.test_run(NetdevHook::ToNetdev, &back.packet).unwrap();
        assert_eq!(src_of(&leaving.packet), (NODE, NODE_PORT));
        assert_eq!(dst_of(&leaving.packet), (client, sport));
        assert!(checksums_valid(&leaving.packet));
    }
    // A packet to a port of the node no connection was given is the
    // node's own: left as it is; an unmarked packet leaves as it is.
    for (hook, untouched) in [
        (
            NetdevHook::FromNetdev,
            ipv4_packet(REMOTE, NODE, tcp(8080, 50001, TCP_ACK)),
        ),
        (
            NetdevHook::ToNetdev,
            ipv4_packet(OUTSIDER, REMOTE, tcp(40001, 8080, TCP_SYN)),
        ),
    ] {
        let out = host.test_run(hook, &untouched).unwrap();
        assert_eq!(out.packet, untouched);
    }
}

#[test]
fn only_external_frontends_are_served_from_outside() {
    let kpr = kpr_lab();
    frontend(&kpr, CLUSTER_IP, 80, 8, 0);
    let mut host = kpr.dp.load_host_programs().unwrap();
    let to_cluster_ip = ipv4_packet(OUTSIDER, CLUSTER_IP, tcp(40000, 80, TCP_SYN));
    let out = host
        .test_run(NetdevHook::FromNetdev, &to_cluster_ip)
        .unwrap();
    assert_eq!(
        out.packet, to_cluster_ip,
        "a cluster IP is not served from outside"
    );

    // Without kube-proxy replacement node ports are kube-proxy's.
    let plain = lab();
    frontend(&plain, NODE, NODE_PORT, 7, LB_SVC_F_EXTERNAL);
    let mut host = plain.dp.load_host_programs().unwrap();
    let syn = ipv4_packet(OUTSIDER, NODE, tcp(40000, NODE_PORT, TCP_SYN));
    assert_eq!(
        host.test_run(NetdevHook::FromNetdev, &syn).unwrap().packet,
        syn
    );
}
