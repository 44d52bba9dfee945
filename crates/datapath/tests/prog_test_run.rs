//! Tier 3: the real BPF object, loaded into the kernel, with crafted packets
//! run through BPF_PROG_TEST_RUN. Each test uses its own pinned maps under a
//! unique bpffs directory, removed at the end (even on failure).
//! Needs root; without it every test here fails loudly.

use std::net::Ipv4Addr;

use abi::{
    DropReason, EventType, FlowEvent, PolicyKeyData, CT_F_DNS, CT_F_PROXY_REDIRECT,
    EP_F_EGRESS_ENFORCED, EP_F_INGRESS_ENFORCED, POLICY_FULL_PREFIX_BITS, POLICY_F_REDIRECT,
    POLICY_F_REDIRECT_DNS,
};
use fibril_datapath::{EndpointPrograms, Hook};
use test_support::{ipv4_packet, ipv6_udp_packet, L4, TCP_ACK, TCP_FIN, TCP_RST, TCP_SYN};

mod common;
use common::*;

#[test]
fn unenforced_endpoint_forwards_and_tracks_the_connection() {
    let lab = lab();
    let mut client = progs(&lab, 1, CLIENT);
    let out = client
        .test_run(
            Hook::FromContainer,
            &ipv4_packet(CLIENT, Ipv4Addr::new(192, 0, 2, 1), syn(40000, 80)),
        )
        .unwrap();
    assert_eq!(out.action, TC_ACT_OK);
    assert_eq!(lab.dp.ct_entries(), 1);
    let ev = events(&lab);
    assert_eq!(ev.len(), 1, "one trace event for the new connection");
    assert_eq!(ev[0].r#type, EventType::Trace as u8);
    assert_eq!(ev[0].src_identity, CLIENT_ID);
    assert_eq!(ev[0].dst_identity, abi::identity::WORLD);
    assert_eq!(ev[0].dport, 80);
}

#[test]
fn same_node_delivery_redirects_with_the_peer_macs() {
    let lab = lab();
    let mut client = progs(&lab, 1, CLIENT);
    let out = client
        .test_run(
            Hook::FromContainer,
            &ipv4_packet(CLIENT, SERVER, syn(40000, 8080)),
        )
        .unwrap();
    assert_eq!(out.action, TC_ACT_REDIRECT);
    assert_eq!(
        &out.packet[0..6],
        &[0x02, 0, 0, 0, 1, 2],
        "dst mac = server pod"
    );
    assert_eq!(
        &out.packet[6..12],
        &[0x02, 0, 0, 0, 2, 2],
        "src mac = server host veth"
    );
}

/// Cilium's policy-verdict events: one for the first packet of each
/// connection an enforcing policy decides (allowed: FORWARDED; denied:
/// DROPPED, before the drop event), with the match type; none for the
/// packets that follow or for endpoints without enforcement.
#[test]
fn policy_verdicts_report_each_decided_connection_once() {
    let lab = lab();
    enforce(&lab, SERVER, EP_F_INGRESS_ENFORCED);
    allow(
        &lab,
        2,
        CLIENT_ID,
        abi::Direction::Ingress as u8,
        6,
        8080,
        false,
    );
    let mut server = progs(&lab, 2, SERVER);
    let mut run = |packet: &[u8]| server.test_run(Hook::ToContainer, packet).unwrap().action;
    assert_eq!(
        run(&ipv4_packet(CLIENT, SERVER, syn(40000, 8080))),
        TC_ACT_OK
    );
    assert_eq!(
        run(&ipv4_packet(CLIENT, SERVER, tcp(40000, 8080, TCP_ACK))),
        TC_ACT_OK
    );
    assert_eq!(
        run(&ipv4_packet(CLIENT, SERVER, syn(40001, 8081))),
        TC_ACT_SHOT
    );
    let verdicts: Vec<(u8, u8)> = all_events(&lab)
        .iter()
        .map(|e| (e.r#type, e.verdict))
        .filter(|(t, _)| *t != EventType::Trace as u8)
        .collect();
    let pv = EventType::PolicyVerdict as u8;
    assert_eq!(
        verdicts,
        vec![
            (pv, abi::verdict::FORWARDED),
            (pv, abi::verdict::DROPPED),
            (EventType::Drop as u8, abi::verdict::DROPPED),
        ]
    );
    let ev = all_events(&lab);
    assert!(ev.is_empty(), "{} more", ev.len());

    // The client side enforces nothing: no verdict for its egress.
    let mut client = progs(&lab, 1, CLIENT);
    client
        .test_run(
            Hook::FromContainer,
            &ipv4_packet(CLIENT, Ipv4Addr::new(198, 51, 100, 7), syn(40002, 443)),
        )
        .unwrap();
    assert!(all_events(&lab)
        .iter()
        .all(|e| e.r#type != EventType::PolicyVerdict as u8));
}

#[test]
fn ingress_policy_allows_the_selected_identity_and_port_only() {
    let lab = lab();
    enforce(&lab, SERVER, EP_F_INGRESS_ENFORCED);
    allow(
        &lab,
        2,
        CLIENT_ID,
        abi::Direction::Ingress as u8,
        6,
        8080,
        false,
    );
    let mut server = progs(&lab, 2, SERVER);

    let ok = server
        .test_run(
            Hook::ToContainer,
            &ipv4_packet(CLIENT, SERVER, syn(40000, 8080)),
        )
        .unwrap();
    assert_eq!(ok.action, TC_ACT_OK);
    let wrong_port = server
        .test_run(
            Hook::ToContainer,
            &ipv4_packet(CLIENT, SERVER, syn(40001, 8081)),
        )
        .unwrap();
    assert_eq!(wrong_port.action, TC_ACT_SHOT);
    let stranger = Ipv4Addr::new(10, 77, 0, 99);
    let wrong_peer = server
        .test_run(
            Hook::ToContainer,
            &ipv4_packet(stranger, SERVER, syn(40002, 8080)),
        )
        .unwrap();
    assert_eq!(wrong_peer.action, TC_ACT_SHOT);

    let ev = events(&lab);
    let drops: Vec<_> = ev
        .iter()
        .filter(|e| e.r#type == EventType::Drop as u8)
        .collect();
    assert_eq!(drops.len(), 2);
    assert!(drops
        .iter()
        .all(|d| d.subtype == DropReason::PolicyDenied as u8));
    assert_eq!(drops[1].src_identity, abi::identity::WORLD);
}

#[test]
fn replies_of_allowed_connections_pass_without_policy() {
    let lab = lab();
    enforce(&lab, CLIENT, EP_F_INGRESS_ENFORCED | EP_F_EGRESS_ENFORCED);
    allow(
        &lab,
        1,
        SERVER_ID,
        abi::Direction::Egress as u8,
        6,
        8080,
        false,
    );
    let mut client = progs(&lab, 1, CLIENT);
    let out = client
        .test_run(
            Hook::FromContainer,
            &ipv4_packet(CLIENT, SERVER, syn(40000, 8080)),
        )
        .unwrap();
    assert_eq!(out.action, TC_ACT_REDIRECT);
    // The SYN-ACK comes back into the client: ingress is enforced with no
    // allow at all, but it is the reply of a tracked connection.
    let reply = L4::Tcp {
        sport: 8080,
        dport: 40000,
        flags: TCP_SYN | TCP_ACK,
    };
    let back = client
        .test_run(Hook::ToContainer, &ipv4_packet(SERVER, CLIENT, reply))
        .unwrap();
    assert_eq!(back.action, TC_ACT_OK);
    // A new connection from the server to the client is not a reply.
    let new = client
        .test_run(
            Hook::ToContainer,
            &ipv4_packet(SERVER, CLIENT, syn(8080, 40001)),
        )
        .unwrap();
    assert_eq!(new.action, TC_ACT_SHOT);
    let ev = events(&lab);
    let reply_ev = ev
        .iter()
        .find(|e| e.ct_state == abi::ct_state::REPLY)
        .expect("reply traced");
    assert_eq!(reply_ev.tcp_flags, TCP_SYN | TCP_ACK);
}

#[test]
fn deny_beats_a_more_specific_allow_and_wildcards_match() {
    let lab = lab();
    enforce(&lab, SERVER, EP_F_INGRESS_ENFORCED);
    // Any identity on 8080/TCP is allowed; the client identity is denied.
    allow(&lab, 2, 0, abi::Direction::Ingress as u8, 6, 8080, false);
    allow(
        &lab,
        2,
        CLIENT_ID,
        abi::Direction::Ingress as u8,
        0,
        0,
        true,
    );
    let mut server = progs(&lab, 2, SERVER);
    let denied = server
        .test_run(
            Hook::ToContainer,
            &ipv4_packet(CLIENT, SERVER, syn(40000, 8080)),
        )
        .unwrap();
    assert_eq!(denied.action, TC_ACT_SHOT);
    let other = server
        .test_run(
            Hook::ToContainer,
            &ipv4_packet(Ipv4Addr::new(10, 77, 0, 5), SERVER, syn(40000, 8080)),
        )
        .unwrap();
    assert_eq!(other.action, TC_ACT_OK);
    let ev = events(&lab);
    assert_eq!(ev[0].subtype, DropReason::PolicyDeny as u8);
}

#[test]
fn spoofed_source_and_ipv6_under_policy_are_dropped_with_reasons() {
    let lab = lab();
    let mut client = progs(&lab, 1, CLIENT);
    let spoofed = client
        .test_run(Hook::FromContainer, &ipv4_packet(SERVER, CLIENT, syn(1, 2)))
        .unwrap();
    assert_eq!(spoofed.action, TC_ACT_SHOT);
    // IPv6 passes while no policy applies, and is dropped once one does.
    assert_eq!(
        client
            .test_run(Hook::FromContainer, &ipv6_udp_packet())
            .unwrap()
            .action,
        TC_ACT_OK
    );
    enforce(&lab, CLIENT, EP_F_EGRESS_ENFORCED);
    assert_eq!(
        client
            .test_run(Hook::FromContainer, &ipv6_udp_packet())
            .unwrap()
            .action,
        TC_ACT_SHOT
    );
    // A truncated TCP header is an invalid packet.
    let short = &ipv4_packet(CLIENT, SERVER, syn(1, 2))[..14 + 20 + 4];
    assert_eq!(
        client.test_run(Hook::FromContainer, short).unwrap().action,
        TC_ACT_SHOT
    );
    let reasons: Vec<u8> = events(&lab).iter().map(|e| e.subtype).collect();
    assert_eq!(
        reasons,
        vec![
            DropReason::InvalidSourceIp as u8,
            DropReason::UnsupportedL3 as u8,
            DropReason::InvalidPacket as u8
        ]
    );
}

#[test]
fn udp_and_icmp_follow_policy_and_conntrack() {
    let lab = lab();
    enforce(&lab, SERVER, EP_F_INGRESS_ENFORCED);
    allow(
        &lab,
        2,
        CLIENT_ID,
        abi::Direction::Ingress as u8,
        17,
        5353,
        false,
    );
    let mut server = progs(&lab, 2, SERVER);
    let udp = L4::Udp {
        sport: 5000,
        dport: 5353,
    };
    assert_eq!(
        server
            .test_run(Hook::ToContainer, &ipv4_packet(CLIENT, SERVER, udp))
            .unwrap()
            .action,
        TC_ACT_OK
    );
    let tcp_same_port = syn(5000, 5353);
    assert_eq!(
        server
            .test_run(
                Hook::ToContainer,
                &ipv4_packet(CLIENT, SERVER, tcp_same_port)
            )
            .unwrap()
            .action,
        TC_ACT_SHOT
    );
    let ping = L4::IcmpEcho {
        request: true,
        id: 7,
    };
    assert_eq!(
        server
            .test_run(Hook::ToContainer, &ipv4_packet(CLIENT, SERVER, ping))
            .unwrap()
            .action,
        TC_ACT_SHOT
    );
    // Outbound ping from the server is tracked; its echo reply comes back in.
    let mut server_out = progs(&lab, 2, SERVER);
    let out_ping = L4::IcmpEcho {
        request: true,
        id: 9,
    };
    assert_eq!(
        server_out
            .test_run(Hook::FromContainer, &ipv4_packet(SERVER, CLIENT, out_ping))
            .unwrap()
            .action,
        TC_ACT_REDIRECT
    );
    let pong = L4::IcmpEcho {
        request: false,
        id: 9,
    };
    assert_eq!(
        server
            .test_run(Hook::ToContainer, &ipv4_packet(CLIENT, SERVER, pong))
            .unwrap()
            .action,
        TC_ACT_OK
    );
}

#[test]
fn ipcache_longest_prefix_gives_the_peer_identity() {
    let lab = lab();
    let cidr_identity = (1 << 24) + 1;
    lab.dp
        .upsert_ipcache(Ipv4Addr::new(0, 0, 0, 0), 0, abi::identity::WORLD, None)
        .unwrap();
    lab.dp
        .upsert_ipcache(Ipv4Addr::new(192, 0, 2, 0), 24, cidr_identity, None)
        .unwrap();
    enforce(&lab, CLIENT, EP_F_EGRESS_ENFORCED);
    allow(
        &lab,
        1,
        cidr_identity,
        abi::Direction::Egress as u8,
        6,
        443,
        false,
    );
    let mut client = progs(&lab, 1, CLIENT);
    let inside = client
        .test_run(
            Hook::FromContainer,
            &ipv4_packet(CLIENT, Ipv4Addr::new(192, 0, 2, 7), syn(40000, 443)),
        )
        .unwrap();
    assert_eq!(inside.action, TC_ACT_OK);
    let outside = client
        .test_run(
            Hook::FromContainer,
            &ipv4_packet(CLIENT, Ipv4Addr::new(198, 51, 100, 7), syn(40000, 443)),
        )
        .unwrap();
    assert_eq!(outside.action, TC_ACT_SHOT);
    let ev = events(&lab);
    assert_eq!(ev[0].dst_identity, cidr_identity);
    assert_eq!(ev[1].dst_identity, abi::identity::WORLD);
    assert_eq!(lab.dp.ipcache_entries().unwrap().len(), 2);
}

#[test]
fn same_node_traffic_meets_the_peers_ingress_policy_at_the_sender() {
    let lab = lab();
    enforce(&lab, SERVER, EP_F_INGRESS_ENFORCED);
    let mut client = progs(&lab, 1, CLIENT);
    let out = client
        .test_run(
            Hook::FromContainer,
            &ipv4_packet(CLIENT, SERVER, syn(40000, 8080)),
        )
        .unwrap();
    assert_eq!(
        out.action, TC_ACT_SHOT,
        "dropped before it ever reaches the server's veth"
    );
    let ev = events(&lab);
    let drop = ev
        .iter()
        .find(|e| e.r#type == EventType::Drop as u8)
        .expect("a drop event");
    assert_eq!(drop.ep_id, 2, "attributed to the server endpoint");
    assert_eq!(drop.direction, abi::Direction::Ingress as u8);
    assert_eq!(drop.subtype, DropReason::PolicyDenied as u8);
    assert_eq!(
        (drop.src_identity, drop.dst_identity),
        (CLIENT_ID, SERVER_ID)
    );
    // With an allow, the same packet goes through, traced on both sides.
    allow(
        &lab,
        2,
        CLIENT_ID,
        abi::Direction::Ingress as u8,
        6,
        8080,
        false,
    );
    let out = client
        .test_run(
            Hook::FromContainer,
            &ipv4_packet(CLIENT, SERVER, syn(40001, 8080)),
        )
        .unwrap();
    assert_eq!(out.action, TC_ACT_REDIRECT);
    let points: Vec<u8> = events(&lab).iter().map(|e| e.subtype).collect();
    assert_eq!(
        points,
        vec![abi::TracePoint::FromLxc as u8, abi::TracePoint::ToLxc as u8]
    );
}

#[test]
fn an_overloaded_ring_buffer_counts_every_lost_event_exactly() {
    // Every packet is a policy drop, so every run emits one event. Nobody
    // reads while 300,000 are emitted into a ring that holds far fewer.
    let lab = lab();
    enforce(&lab, SERVER, EP_F_INGRESS_ENFORCED);
    let mut server = progs(&lab, 2, SERVER);
    let packet = ipv4_packet(CLIENT, SERVER, syn(40000, 9999));
    let runs: u64 = 300_000;
    let out = server
        .test_run_repeat(Hook::ToContainer, &packet, runs as u32)
        .unwrap();
    assert_eq!(out.action, TC_ACT_SHOT);
    let delivered = all_events(&lab).len() as u64;
    let lost = lab.dp.events_lost();
    assert!(lost > 0, "the ring must have overflowed");
    // Two events a run: the policy verdict, then the drop.
    assert_eq!(
        delivered + lost,
        2 * runs,
        "{delivered} delivered + {lost} lost"
    );
}

/// A free port number on 127.0.0.1 (nothing listens on it afterwards).
fn unused_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn l7_redirects_fail_closed_for_http_and_fall_back_for_dns() {
    let (http_port, dns_port) = (unused_port(), unused_port());
    let lab = lab_with(|c| {
        c.proxy = Some(fibril_datapath::ProxyRedirect {
            dns_port,
            ..fibril_datapath::ProxyRedirect::for_port(http_port)
        })
    });
    let mut client = progs(&lab, 1, CLIENT);

    // The server's ingress has http rules on 8080: the connection belongs
    // to the proxy; with no proxy listening it is dropped, never delivered.
    enforce(&lab, SERVER, EP_F_INGRESS_ENFORCED);
    policy_entry(
        &lab,
        2,
        CLIENT_ID,
        abi::Direction::Ingress as u8,
        6,
        8080,
        POLICY_F_REDIRECT,
    );
    let out = client
        .test_run(
            Hook::FromContainer,
            &ipv4_packet(CLIENT, SERVER, syn(41000, 8080)),
        )
        .unwrap();
    assert_eq!(out.action, TC_ACT_SHOT);
    let drop = events(&lab)
        .into_iter()
        .find(|e| e.r#type == EventType::Drop as u8)
        .expect("a drop event");
    assert_eq!(drop.subtype, DropReason::SocketLookupFailed as u8);

    // HTTP rules cannot apply to UDP: refused with its own reason.
    policy_entry(
        &lab,
        2,
        CLIENT_ID,
        abi::Direction::Ingress as u8,
        17,
        8080,
        POLICY_F_REDIRECT,
    );
    let udp = L4::Udp {
        sport: 41001,
        dport: 8080,
    };
    let out = client
        .test_run(Hook::FromContainer, &ipv4_packet(CLIENT, SERVER, udp))
        .unwrap();
    assert_eq!(out.action, TC_ACT_SHOT);
    assert!(events(&lab)
        .iter()
        .any(|e| e.subtype == DropReason::ProxyUnsupported as u8));

    // The client's egress has dns rules: with no DNS proxy socket (the agent
    // restarting) the query goes to the resolver directly, still marked for
    // the proxy in conntrack so the next datagram tries it again.
    let resolver = Ipv4Addr::new(192, 0, 2, 53);
    enforce(&lab, CLIENT, EP_F_EGRESS_ENFORCED);
    policy_entry(
        &lab,
        1,
        abi::identity::WORLD,
        abi::Direction::Egress as u8,
        17,
        53,
        POLICY_F_REDIRECT_DNS,
    );
    let query = L4::Udp {
        sport: 41002,
        dport: 53,
    };
    let out = client
        .test_run(Hook::FromContainer, &ipv4_packet(CLIENT, resolver, query))
        .unwrap();
    assert_eq!(out.action, TC_ACT_OK, "DNS keeps working without the proxy");
    assert!(events(&lab)
        .iter()
        .all(|e| e.r#type != EventType::Drop as u8));
    let flags: Vec<u8> = lab
        .dp
        .ct_list()
        .into_iter()
        .filter(|(k, _)| k.daddr == u32::from(resolver).to_be())
        .map(|(_, v)| v.flags)
        .collect();
    assert_eq!(flags, vec![CT_F_PROXY_REDIRECT | CT_F_DNS]);
}

/// Removes the policy entry `allow`/`policy_entry` wrote for one port.
fn remove_entry(lab: &Lab, ep: u32, identity: u32, dir: u8, proto: u8, port: u16) {
    lab.dp
        .remove_policy(
            POLICY_FULL_PREFIX_BITS,
            PolicyKeyData {
                ep_id: ep.to_be(),
                identity: identity.to_be(),
                direction: dir,
                protocol: proto,
                dport: port.to_be(),
            },
        )
        .unwrap();
}

/// A SYN reusing the tuple of a connection that closed (or that completed
/// its handshake) is a new connection: policy is evaluated again, so a
/// client cannot keep a revoked allow alive by reconnecting from the same
/// port (Cilium's CT_REOPENED). Checked from the host stack (to_container)
/// and pod to pod (the sender's from_container runs both sides' policy).
#[test]
fn a_syn_reusing_a_closed_tuple_meets_policy_again() {
    for (closing_flags, what) in [
        (TCP_FIN | TCP_ACK, "after a FIN"),
        (TCP_RST, "after a RST"),
        (TCP_ACK, "after the handshake, with no close seen"),
    ] {
        for hook in [Hook::ToContainer, Hook::FromContainer] {
            let lab = lab();
            let ingress = abi::Direction::Ingress as u8;
            enforce(&lab, SERVER, EP_F_INGRESS_ENFORCED);
            allow(&lab, 2, CLIENT_ID, ingress, 6, 8080, false);
            let mut p = match hook {
                Hook::ToContainer => progs(&lab, 2, SERVER),
                Hook::FromContainer => progs(&lab, 1, CLIENT),
            };
            let pass = match hook {
                Hook::ToContainer => TC_ACT_OK,
                Hook::FromContainer => TC_ACT_REDIRECT,
            };
            let mut send = |flags: u8| {
                p.test_run(hook, &ipv4_packet(CLIENT, SERVER, tcp(40000, 8080, flags)))
                    .unwrap()
                    .action
            };
            assert_eq!(send(TCP_SYN), pass, "{what} {hook:?}: allowed SYN");
            assert_eq!(send(TCP_ACK), pass);
            assert_eq!(send(closing_flags), pass);
            // The allow is revoked; the same source port opens again.
            remove_entry(&lab, 2, CLIENT_ID, ingress, 6, 8080);
            assert_eq!(
                send(TCP_SYN),
                TC_ACT_SHOT,
                "{what} {hook:?}: a reused tuple must meet the new policy"
            );
            // Nothing of the old connection is left to carry the rest.
            assert_eq!(send(TCP_ACK), TC_ACT_SHOT, "{what} {hook:?}: stale ACK");
            assert!(
                events(&lab)
                    .iter()
                    .any(|e| e.r#type == EventType::Drop as u8
                        && e.subtype == DropReason::PolicyDenied as u8
                        && e.tcp_flags == TCP_SYN),
                "{what} {hook:?}: the reopening SYN is reported as a policy drop"
            );
        }
    }
}

/// A retransmitted SYN (the opener has not sent an ACK yet) still belongs to
/// its connection; it is not a reopen, and neither is a SYN on a live tuple
/// of another direction's entry.
#[test]
fn a_retransmitted_syn_is_the_same_connection() {
    let lab = lab();
    let ingress = abi::Direction::Ingress as u8;
    enforce(&lab, SERVER, EP_F_INGRESS_ENFORCED);
    allow(&lab, 2, CLIENT_ID, ingress, 6, 8080, false);
    let mut server = progs(&lab, 2, SERVER);
    let syn = ipv4_packet(CLIENT, SERVER, tcp(40000, 8080, TCP_SYN));
    assert_eq!(
        server.test_run(Hook::ToContainer, &syn).unwrap().action,
        TC_ACT_OK
    );
    remove_entry(&lab, 2, CLIENT_ID, ingress, 6, 8080);
    // The connection was allowed when it opened: its retransmission passes.
    assert_eq!(
        server.test_run(Hook::ToContainer, &syn).unwrap().action,
        TC_ACT_OK
    );
    let states: Vec<u8> = events(&lab).iter().map(|e| e.ct_state).collect();
    assert_eq!(
        states,
        vec![abi::ct_state::NEW],
        "one new connection, one event"
    );
}

/// A connection the L7 proxy carried leaves entries flagged for the proxy;
/// a new connection on the same tuple once the L7 rule is gone goes straight
/// to the server, and its replies are not sent up to the proxy. The other
/// way round, a tuple reused after an L7 rule arrives goes to the proxy.
#[test]
fn a_reopened_tuple_gets_the_redirect_of_the_new_policy() {
    let (http_port, dns_port) = (unused_port(), unused_port());
    let lab = lab_with(|c| {
        c.proxy = Some(fibril_datapath::ProxyRedirect {
            dns_port,
            ..fibril_datapath::ProxyRedirect::for_port(http_port)
        })
    });
    let ingress = abi::Direction::Ingress as u8;
    enforce(&lab, SERVER, EP_F_INGRESS_ENFORCED);
    allow(&lab, 2, CLIENT_ID, ingress, 6, 8080, false);
    let mut client = progs(&lab, 1, CLIENT);
    let mut send = |flags: u8| {
        client
            .test_run(
                Hook::FromContainer,
                &ipv4_packet(CLIENT, SERVER, tcp(40000, 8080, flags)),
            )
            .unwrap()
            .action
    };
    assert_eq!(send(TCP_SYN), TC_ACT_REDIRECT);
    assert_eq!(send(TCP_ACK), TC_ACT_REDIRECT);
    assert_eq!(send(TCP_FIN | TCP_ACK), TC_ACT_REDIRECT);
    // An http rule now covers the port: the reused tuple belongs to the
    // proxy (which is not listening here, so it fails closed).
    policy_entry(&lab, 2, CLIENT_ID, ingress, 6, 8080, POLICY_F_REDIRECT);
    assert_eq!(send(TCP_SYN), TC_ACT_SHOT);
    let drop = events(&lab)
        .into_iter()
        .find(|e| e.r#type == EventType::Drop as u8)
        .expect("a drop event");
    assert_eq!(drop.subtype, DropReason::SocketLookupFailed as u8);
    assert!(lab
        .dp
        .ct_list()
        .iter()
        .any(|(k, v)| k.sport == 40000 && v.flags & CT_F_PROXY_REDIRECT != 0));

    // The rule goes again: the tuple flagged for the proxy is reused after
    // a RST and is delivered straight to the server once more.
    assert_eq!(
        send(TCP_RST),
        TC_ACT_OK,
        "to the host stack, marked for the proxy"
    );
    allow(&lab, 2, CLIENT_ID, ingress, 6, 8080, false);
    assert_eq!(send(TCP_SYN), TC_ACT_REDIRECT);
    assert!(lab
        .dp
        .ct_list()
        .iter()
        .filter(|(k, _)| k.sport == 40000)
        .all(|(_, v)| v.flags & (CT_F_PROXY_REDIRECT | abi::CT_F_FROM_PROXY) == 0));
}

/// Sets the IPv4 total length of a frame built by `ipv4_packet` (the IP
/// header checksum is not checked by the programs).
fn with_tot_len(mut frame: Vec<u8>, tot_len: u16) -> Vec<u8> {
    frame[16..18].copy_from_slice(&tot_len.to_be_bytes());
    frame
}

/// L4 fields come from inside the IP packet's total length, never from the
/// frame's padding; a total length the frame cannot hold is malformed.
#[test]
fn headers_are_read_within_the_ip_total_length_only() {
    let lab = lab();
    let mut server = progs(&lab, 2, SERVER);
    // A SYN followed by 20 bytes of padding that look like a TCP ACK.
    let mut padded = ipv4_packet(CLIENT, SERVER, tcp(40100, 8080, TCP_SYN));
    let fake = ipv4_packet(CLIENT, SERVER, tcp(1, 2, TCP_ACK));
    padded.extend_from_slice(&fake[34..54]);
    let out = server.test_run(Hook::ToContainer, &padded).unwrap();
    assert_eq!(out.action, TC_ACT_OK, "padding is allowed");
    let ev = events(&lab);
    assert_eq!(ev.len(), 1);
    assert_eq!(
        ev[0].tcp_flags, TCP_SYN,
        "flags from the header, not the padding"
    );
    assert_eq!(ev[0].sport, 40100);

    // An IP packet of 20 bytes (no TCP header) with a TCP header in the
    // padding: malformed, dropped; so is one claiming more than the frame.
    let headerless = with_tot_len(ipv4_packet(CLIENT, SERVER, tcp(40101, 8080, TCP_SYN)), 20);
    let truncated = with_tot_len(ipv4_packet(CLIENT, SERVER, tcp(40102, 8080, TCP_SYN)), 60);
    let short = with_tot_len(ipv4_packet(CLIENT, SERVER, tcp(40103, 8080, TCP_SYN)), 12);
    for (frame, what) in [
        (headerless, "no TCP header inside the total length"),
        (truncated, "a total length past the frame"),
        (short, "a total length shorter than the IP header"),
    ] {
        let out = server.test_run(Hook::ToContainer, &frame).unwrap();
        assert_eq!(out.action, TC_ACT_SHOT, "{what}");
        let ev = events(&lab);
        assert_eq!(ev.len(), 1, "{what}");
        assert_eq!(ev[0].subtype, DropReason::InvalidPacket as u8, "{what}");
    }
    assert!(
        lab.dp.ct_list().iter().all(|(k, _)| k.sport == 40100),
        "nothing malformed is tracked"
    );
}

/// A pod-to-pod connection the peer's ingress refuses leaves no conntrack
/// entry at the sender (it is tracked only once both sides allowed it).
#[test]
fn a_connection_the_peer_refuses_leaves_no_entry() {
    let lab = lab();
    enforce(&lab, SERVER, EP_F_INGRESS_ENFORCED);
    let mut client = progs(&lab, 1, CLIENT);
    let out = client
        .test_run(
            Hook::FromContainer,
            &ipv4_packet(CLIENT, SERVER, tcp(40200, 8080, TCP_SYN)),
        )
        .unwrap();
    assert_eq!(out.action, TC_ACT_SHOT);
    assert_eq!(lab.dp.ct_entries(), 0, "{:?}", lab.dp.ct_list());
}

/// ICMP errors about a tracked connection (fragmentation needed, port
/// unreachable, time exceeded) pass where policy is enforced, both ways,
/// without a policy lookup; one about nothing tracked meets the policy
/// (and is dropped where nothing allows ICMP).
#[test]
fn icmp_errors_about_tracked_connections_are_related() {
    use test_support::icmp_error_packet;
    let lab = lab();
    let (ingress, egress) = (abi::Direction::Ingress as u8, abi::Direction::Egress as u8);
    // The server accepts the client on 8080 and may send nothing itself;
    // the client may reach the world on 443 and accepts nothing.
    enforce(&lab, SERVER, EP_F_INGRESS_ENFORCED | EP_F_EGRESS_ENFORCED);
    enforce(&lab, CLIENT, EP_F_INGRESS_ENFORCED | EP_F_EGRESS_ENFORCED);
    allow(&lab, 2, CLIENT_ID, ingress, 6, 8080, false);
    allow(&lab, 1, SERVER_ID, egress, 6, 8080, false);
    allow(&lab, 1, abi::identity::WORLD, egress, 17, 443, false);
    let mut client = progs(&lab, 1, CLIENT);
    let mut server = progs(&lab, 2, SERVER);
    let to_server = ipv4_packet(CLIENT, SERVER, tcp(40300, 8080, TCP_SYN));
    assert_eq!(
        client
            .test_run(Hook::FromContainer, &to_server)
            .unwrap()
            .action,
        TC_ACT_REDIRECT
    );
    let far = Ipv4Addr::new(203, 0, 113, 5);
    let to_world = ipv4_packet(
        CLIENT,
        far,
        L4::Udp {
            sport: 40301,
            dport: 443,
        },
    );
    assert_eq!(
        client
            .test_run(Hook::FromContainer, &to_world)
            .unwrap()
            .action,
        TC_ACT_OK
    );
    events(&lab);

    // The server's "fragmentation needed" about the client's packet: to the
    // client's pod directly, though the server's egress allows nothing.
    let frag_needed = icmp_error_packet(SERVER, CLIENT, 3, 4, &to_server);
    let out = server.test_run(Hook::FromContainer, &frag_needed).unwrap();
    assert_eq!(out.action, TC_ACT_REDIRECT);
    // A router's "time exceeded" about the client's datagram to the world:
    // into the client, though its ingress allows nothing.
    let router = Ipv4Addr::new(192, 0, 2, 254);
    let exceeded = icmp_error_packet(router, CLIENT, 11, 0, &to_world);
    assert_eq!(
        client
            .test_run(Hook::ToContainer, &exceeded)
            .unwrap()
            .action,
        TC_ACT_OK
    );
    let ev = events(&lab);
    assert_eq!(ev.len(), 2);
    assert!(ev
        .iter()
        .all(|e| e.ct_state == abi::ct_state::RELATED && e.verdict == abi::verdict::FORWARDED));

    // About nothing tracked: another port, another datagram, or addressed
    // to someone other than the quoted sender.
    let untracked = ipv4_packet(
        CLIENT,
        far,
        L4::Udp {
            sport: 40302,
            dport: 443,
        },
    );
    let stray = icmp_error_packet(router, CLIENT, 3, 3, &untracked);
    assert_eq!(
        client.test_run(Hook::ToContainer, &stray).unwrap().action,
        TC_ACT_SHOT
    );
    let misdirected = icmp_error_packet(router, SERVER, 3, 3, &to_world);
    assert_eq!(
        server
            .test_run(Hook::ToContainer, &misdirected)
            .unwrap()
            .action,
        TC_ACT_SHOT
    );
    assert!(events(&lab)
        .iter()
        .all(|e| e.r#type == EventType::Drop as u8));
}

/// A UDP header (ports, a length for `data_len` bytes) and `data_len`
/// bytes: the first fragment's payload.
fn udp_head(sport: u16, dport: u16, data_len: usize) -> Vec<u8> {
    let mut u = Vec::new();
    u.extend_from_slice(&sport.to_be_bytes());
    u.extend_from_slice(&dport.to_be_bytes());
    u.extend_from_slice(&((8 + data_len) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend(std::iter::repeat_n(0x5a, data_len));
    u
}

/// Fragmented datagrams are judged as a whole: the fragments after the
/// first take its ports (so an allowed datagram arrives whole and a refused
/// one is refused whole); a later fragment whose first was not seen, a
/// second first fragment changing the ports, a first fragment too small for
/// the L4 header, and a TCP fragment at offset 8 are dropped.
#[test]
fn fragments_follow_their_first_fragment() {
    use test_support::ipv4_fragment;
    let lab = lab();
    let ingress = abi::Direction::Ingress as u8;
    enforce(&lab, SERVER, EP_F_INGRESS_ENFORCED);
    allow(&lab, 2, CLIENT_ID, ingress, 17, 53, false);
    let mut server = progs(&lab, 2, SERVER);
    let run = |p: &mut EndpointPrograms, frame: &[u8]| {
        p.test_run(Hook::ToContainer, frame).unwrap().action
    };
    let frag = |id, offset, more, payload: &[u8]| {
        ipv4_fragment(CLIENT, SERVER, 17, id, offset, more, payload)
    };

    // In order: the first (ports inside), a middle and the last.
    assert_eq!(
        run(&mut server, &frag(1, 0, true, &udp_head(40500, 53, 1472))),
        TC_ACT_OK
    );
    assert_eq!(
        run(&mut server, &frag(1, 185, true, &[0u8; 1480])),
        TC_ACT_OK
    );
    assert_eq!(
        run(&mut server, &frag(1, 370, false, &[0u8; 1000])),
        TC_ACT_OK
    );
    let ev = events(&lab);
    assert!(ev.iter().all(|e| e.dport == 53), "{ev:?}");
    // A refused port: every fragment refused.
    assert_eq!(
        run(&mut server, &frag(2, 0, true, &udp_head(40501, 5353, 1472))),
        TC_ACT_SHOT
    );
    assert_eq!(
        run(&mut server, &frag(2, 185, false, &[0u8; 100])),
        TC_ACT_SHOT
    );
    let ev = events(&lab);
    assert!(ev
        .iter()
        .all(|e| e.subtype == DropReason::PolicyDenied as u8 && e.dport == 5353));
    assert_eq!(
        ev.len(),
        2,
        "both fragments reported with the datagram's ports"
    );

    // Out of order: a later fragment before its first is dropped.
    assert_eq!(
        run(&mut server, &frag(3, 185, false, &[0u8; 100])),
        TC_ACT_SHOT
    );
    let ev = events(&lab);
    assert_eq!(ev[0].subtype, DropReason::FragNotFound as u8);
    // Overlap: a second first fragment with other ports is malformed.
    assert_eq!(
        run(&mut server, &frag(4, 0, true, &udp_head(40504, 53, 64))),
        TC_ACT_OK
    );
    assert_eq!(
        run(&mut server, &frag(4, 0, true, &udp_head(40504, 5353, 64))),
        TC_ACT_SHOT
    );
    // A first fragment too small for the UDP ports.
    assert_eq!(
        run(&mut server, &frag(5, 0, true, &[0x9c, 0x40])),
        TC_ACT_SHOT
    );
    // TCP at offset 8 (RFC 1858: would rewrite the first's flags).
    let tcp_overlap = ipv4_fragment(CLIENT, SERVER, 6, 6, 1, false, &[0u8; 16]);
    assert_eq!(run(&mut server, &tcp_overlap), TC_ACT_SHOT);
    let drops: Vec<FlowEvent> = events(&lab)
        .into_iter()
        .filter(|e| e.r#type == EventType::Drop as u8)
        .collect();
    assert_eq!(drops.len(), 3, "{drops:?}");
    assert!(drops
        .iter()
        .all(|e| e.subtype == DropReason::InvalidPacket as u8));
}

/// Each endpoint's traffic holds at most its budget of conntrack entries:
/// past it, its new connections are refused (and counted) while other
/// endpoints' go on; the census recounts what is really held, so entries
/// that went give their room back.
#[test]
fn a_pod_past_its_conntrack_budget_cannot_crowd_out_the_others() {
    let lab = lab_with(|c| c.ct_endpoint_budget = 3);
    let mut client = progs(&lab, 1, CLIENT);
    let mut server = progs(&lab, 2, SERVER);
    let world = Ipv4Addr::new(192, 0, 2, 9);
    let send = |p: &mut EndpointPrograms, from, port: u16| {
        p.test_run(
            Hook::FromContainer,
            &ipv4_packet(
                from,
                world,
                L4::Udp {
                    sport: 40600,
                    dport: port,
                },
            ),
        )
        .unwrap()
        .action
    };
    for port in 1..=3 {
        assert_eq!(send(&mut client, CLIENT, port), TC_ACT_OK);
    }
    assert_eq!(send(&mut client, CLIENT, 4), TC_ACT_SHOT, "past the budget");
    assert_eq!(
        send(&mut client, CLIENT, 1),
        TC_ACT_OK,
        "a tracked flow goes on"
    );
    assert_eq!(
        send(&mut server, SERVER, 4),
        TC_ACT_OK,
        "another endpoint is not charged"
    );
    let drops: Vec<FlowEvent> = events(&lab)
        .into_iter()
        .filter(|e| e.r#type == EventType::Drop as u8)
        .collect();
    assert_eq!(drops.len(), 1);
    assert_eq!(drops[0].subtype, DropReason::CtMapInsertFailed as u8);
    let census = lab.dp.ct_census();
    assert_eq!((census.busiest, census.overflows), (3, 1));

    // The client's entries go (its connections ended): the census gives
    // the room back.
    lab.dp.ct_flush_address(CLIENT);
    lab.dp.ct_census();
    assert_eq!(send(&mut client, CLIENT, 4), TC_ACT_OK);
}

/// A connection over a tuple whose entry is still there (a busy client
/// reuses its ports within the close timeout) replaces that entry: the
/// budget, which counts it already, is not charged again, so a client
/// opening connections fast is not refused long before it holds its
/// budget of entries.
#[test]
fn a_reused_tuple_takes_its_old_entrys_place_in_the_budget() {
    let lab = lab_with(|c| c.ct_endpoint_budget = 1);
    let mut client = progs(&lab, 1, CLIENT);
    let world = Ipv4Addr::new(192, 0, 2, 9);
    let mut send = |sport: u16, flags: u8| {
        client
            .test_run(
                Hook::FromContainer,
                &ipv4_packet(
                    CLIENT,
                    world,
                    L4::Tcp {
                        sport,
                        dport: 80,
                        flags,
                    },
                ),
            )
            .unwrap()
            .action
    };
    assert_eq!(send(40700, TCP_SYN), TC_ACT_OK);
    assert_eq!(send(40700, TCP_ACK), TC_ACT_OK);
    // Closed by a reset, then the port opens the next connection.
    assert_eq!(send(40700, TCP_RST | TCP_ACK), TC_ACT_OK);
    assert_eq!(send(40700, TCP_SYN), TC_ACT_OK, "the reopened tuple");
    assert_eq!(
        send(40701, TCP_SYN),
        TC_ACT_SHOT,
        "a second tuple: past the budget"
    );
    let census = lab.dp.ct_census();
    assert_eq!((census.busiest, census.overflows), (1, 1));
}

/// The conntrack table is read in batches (a few thousand entries a
/// system call): every entry once, past the first batch's end too.
#[test]
fn the_conntrack_table_is_read_whole_in_batches() {
    let lab = lab();
    let mut client = progs(&lab, 1, CLIENT);
    const CONNECTIONS: u16 = 10_000;
    let world = Ipv4Addr::new(192, 0, 2, 1);
    for port in 1..=CONNECTIONS {
        let out = client
            .test_run(
                Hook::FromContainer,
                &ipv4_packet(CLIENT, world, syn(port, 80)),
            )
            .unwrap();
        assert_eq!(out.action, TC_ACT_OK);
    }
    let list = lab.dp.ct_list();
    let mut ports: Vec<u16> = list.iter().map(|(k, _)| k.sport).collect();
    ports.sort_unstable();
    ports.dedup();
    assert_eq!(list.len(), CONNECTIONS as usize, "each entry once");
    assert_eq!(ports, (1..=CONNECTIONS).collect::<Vec<_>>());
    assert_eq!(lab.dp.ct_entries(), CONNECTIONS as usize);
    assert_eq!(lab.dp.ct_census().entries, CONNECTIONS as usize);
    let odd = lab.dp.ct_flush(|k, _| k.sport % 2 == 1);
    assert_eq!(odd, CONNECTIONS as usize / 2);
    assert!(lab.dp.ct_list().iter().all(|(k, _)| k.sport % 2 == 0));
}
