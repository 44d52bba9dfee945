//! Tier 3: the host firewall (`bpf/host.bpf.c`, `bpf/lib/host.h`) through
//! BPF_PROG_TEST_RUN: the node's own traffic on its device, from its pods
//! and to its pods meets the host endpoint's policy; replies of tracked
//! connections pass; traffic routed on to pods is not the host's; audit
//! mode forwards what it would drop. Needs root.

mod common;

use std::net::Ipv4Addr;

use abi::{
    EventType, FlowEvent, EP_F_AUDIT_ALL, EP_F_EGRESS_ENFORCED, EP_F_HOST_FIREWALL,
    EP_F_INGRESS_ENFORCED, HOST_ENDPOINT_ID,
};
use common::{
    all_events, allow, lab, progs, syn, tcp, Lab, CLIENT, CLIENT_ID, SERVER, SERVER_ID, TC_ACT_OK,
    TC_ACT_SHOT,
};
use fibril_datapath::{Hook, NetdevHook};
use test_support::{ipv4_packet, TCP_ACK, TCP_SYN};

const NODE: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const OUTSIDER: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 7);
const OTHER_NODE: Ipv4Addr = Ipv4Addr::new(192, 168, 77, 2);
const INGRESS: u8 = 1;
const EGRESS: u8 = 2;

fn host_lab() -> Lab {
    let lab = lab();
    lab.dp
        .upsert_ipcache(NODE, 32, abi::identity::HOST, None)
        .unwrap();
    lab.dp
        .upsert_ipcache(OTHER_NODE, 32, abi::identity::REMOTE_NODE, None)
        .unwrap();
    lab
}

fn host_events(lab: &Lab) -> Vec<FlowEvent> {
    all_events(lab)
        .into_iter()
        .filter(|e| e.ep_id == HOST_ENDPOINT_ID)
        .collect()
}

#[test]
fn the_node_is_an_endpoint_on_its_device() {
    let lab = host_lab();
    let mut host = lab.dp.load_host_programs().unwrap();
    let ssh = ipv4_packet(OUTSIDER, NODE, syn(40000, 22));
    let telnet = ipv4_packet(OUTSIDER, NODE, syn(40001, 23));

    // No host firewall: nothing is looked at, nothing reported.
    assert_eq!(lab.dp.host_endpoint().unwrap(), 0);
    let out = host.test_run(NetdevHook::FromNetdev, &telnet).unwrap();
    assert_eq!((out.action, &out.packet), (TC_ACT_OK, &telnet));
    assert!(host_events(&lab).is_empty());

    // On, nothing enforced yet: tracked and traced (from the network).
    lab.dp.set_host_endpoint(EP_F_HOST_FIREWALL).unwrap();
    assert_eq!(
        host.test_run(
            NetdevHook::FromNetdev,
            &ipv4_packet(OUTSIDER, NODE, syn(40002, 23))
        )
        .unwrap()
        .action,
        TC_ACT_OK
    );
    let ev = host_events(&lab);
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0].r#type, EventType::Trace as u8);
    assert_eq!(ev[0].subtype, abi::TracePoint::FromNetwork as u8);
    assert_eq!(
        (ev[0].src_identity, ev[0].dst_identity),
        (abi::identity::WORLD, abi::identity::HOST)
    );

    // Ingress enforced, SSH allowed from anywhere: 22 in, 23 dropped.
    allow(&lab, HOST_ENDPOINT_ID, 0, INGRESS, 6, 22, false);
    lab.dp
        .set_host_endpoint(EP_F_HOST_FIREWALL | EP_F_INGRESS_ENFORCED)
        .unwrap();
    assert_eq!(
        host.test_run(NetdevHook::FromNetdev, &ssh).unwrap().action,
        TC_ACT_OK
    );
    assert_eq!(
        host.test_run(NetdevHook::FromNetdev, &telnet)
            .unwrap()
            .action,
        TC_ACT_SHOT
    );
    let drops: Vec<FlowEvent> = host_events(&lab)
        .into_iter()
        .filter(|e| e.r#type == EventType::Drop as u8)
        .collect();
    assert_eq!(drops.len(), 1, "{drops:?}");
    assert_eq!(drops[0].subtype, abi::DropReason::PolicyDenied as u8);
    assert_eq!(drops[0].dport, 23);
    // A packet that opens nothing (an ACK) to a refused port: new, refused.
    assert_eq!(
        host.test_run(
            NetdevHook::FromNetdev,
            &ipv4_packet(OUTSIDER, NODE, tcp(40003, 23, TCP_ACK))
        )
        .unwrap()
        .action,
        TC_ACT_SHOT
    );

    // The allowed connection's replies leave; the node's own connection
    // out (egress not enforced) gets its replies back in, whatever port.
    assert_eq!(
        host.test_run(
            NetdevHook::ToNetdev,
            &ipv4_packet(NODE, OUTSIDER, tcp(22, 40000, TCP_SYN | TCP_ACK))
        )
        .unwrap()
        .action,
        TC_ACT_OK
    );
    assert_eq!(
        host.test_run(
            NetdevHook::ToNetdev,
            &ipv4_packet(NODE, OUTSIDER, syn(41000, 443))
        )
        .unwrap()
        .action,
        TC_ACT_OK
    );
    assert_eq!(
        host.test_run(
            NetdevHook::FromNetdev,
            &ipv4_packet(OUTSIDER, NODE, tcp(443, 41000, TCP_SYN | TCP_ACK))
        )
        .unwrap()
        .action,
        TC_ACT_OK
    );

    // Routed on to a pod: not the host's (the pod's programs enforce).
    let to_pod = ipv4_packet(OUTSIDER, SERVER, syn(40004, 8080));
    assert_eq!(
        host.test_run(NetdevHook::FromNetdev, &to_pod)
            .unwrap()
            .action,
        TC_ACT_OK
    );

    // Egress enforced: only the remote node's VXLAN port.
    allow(
        &lab,
        HOST_ENDPOINT_ID,
        abi::identity::REMOTE_NODE,
        EGRESS,
        17,
        8472,
        false,
    );
    lab.dp
        .set_host_endpoint(EP_F_HOST_FIREWALL | EP_F_INGRESS_ENFORCED | EP_F_EGRESS_ENFORCED)
        .unwrap();
    let vxlan = ipv4_packet(
        NODE,
        OTHER_NODE,
        test_support::L4::Udp {
            sport: 50000,
            dport: 8472,
        },
    );
    assert_eq!(
        host.test_run(NetdevHook::ToNetdev, &vxlan).unwrap().action,
        TC_ACT_OK
    );
    assert_eq!(
        host.test_run(
            NetdevHook::ToNetdev,
            &ipv4_packet(NODE, OUTSIDER, syn(41001, 80))
        )
        .unwrap()
        .action,
        TC_ACT_SHOT
    );

    // IPv6 is not enforced yet: dropped with a reason while enforced.
    let mut v6 = vec![0u8; 14 + 40];
    v6[12..14].copy_from_slice(&0x86ddu16.to_be_bytes());
    v6[14] = 0x60;
    assert_eq!(
        host.test_run(NetdevHook::FromNetdev, &v6).unwrap().action,
        TC_ACT_SHOT
    );

    // Audit mode: what it would drop passes, reported as AUDIT.
    all_events(&lab);
    lab.dp
        .set_host_endpoint(
            EP_F_HOST_FIREWALL | EP_F_INGRESS_ENFORCED | EP_F_EGRESS_ENFORCED | EP_F_AUDIT_ALL,
        )
        .unwrap();
    assert_eq!(
        host.test_run(
            NetdevHook::FromNetdev,
            &ipv4_packet(OUTSIDER, NODE, syn(40005, 23))
        )
        .unwrap()
        .action,
        TC_ACT_OK
    );
    let audits: Vec<FlowEvent> = host_events(&lab)
        .into_iter()
        .filter(|e| e.verdict == abi::verdict::AUDIT)
        .collect();
    assert_eq!(audits.len(), 1, "{audits:?}");
    assert_eq!(audits[0].r#type, EventType::PolicyVerdict as u8);
}

#[test]
fn pods_to_the_node_and_the_node_to_pods_meet_the_hosts_policy() {
    let lab = host_lab();
    lab.dp
        .set_host_endpoint(EP_F_HOST_FIREWALL | EP_F_INGRESS_ENFORCED | EP_F_EGRESS_ENFORCED)
        .unwrap();
    // The client pod to the node's kubelet port: the host's ingress.
    let mut client = progs(&lab, 1, CLIENT);
    let kubelet = ipv4_packet(CLIENT, NODE, syn(40000, 10250));
    assert_eq!(
        client
            .test_run(Hook::FromContainer, &kubelet)
            .unwrap()
            .action,
        TC_ACT_SHOT
    );
    let drop = host_events(&lab)
        .into_iter()
        .find(|e| e.r#type == EventType::Drop as u8)
        .expect("the drop, at the host endpoint");
    assert_eq!(
        (drop.src_identity, drop.dst_identity, drop.direction),
        (CLIENT_ID, abi::identity::HOST, INGRESS)
    );
    allow(&lab, HOST_ENDPOINT_ID, CLIENT_ID, INGRESS, 6, 10250, false);
    assert_eq!(
        client
            .test_run(Hook::FromContainer, &kubelet)
            .unwrap()
            .action,
        TC_ACT_OK
    );

    // The node to the server pod (a probe): the host's egress first.
    let mut server = progs(&lab, 2, SERVER);
    let probe = ipv4_packet(NODE, SERVER, syn(40001, 8080));
    assert_eq!(
        server.test_run(Hook::ToContainer, &probe).unwrap().action,
        TC_ACT_SHOT
    );
    allow(&lab, HOST_ENDPOINT_ID, SERVER_ID, EGRESS, 6, 8080, false);
    assert_eq!(
        server.test_run(Hook::ToContainer, &probe).unwrap().action,
        TC_ACT_OK
    );
    // Other senders to the pod are the pod's business alone.
    assert_eq!(
        server
            .test_run(
                Hook::ToContainer,
                &ipv4_packet(OUTSIDER, SERVER, syn(40002, 8080))
            )
            .unwrap()
            .action,
        TC_ACT_OK
    );
}
