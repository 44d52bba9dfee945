//! The fixture the BPF_PROG_TEST_RUN tests share: a datapath in a pin
//! directory of its own with two local endpoints, and helpers to write
//! policy and read events.
#![allow(dead_code)]

use std::net::Ipv4Addr;

use abi::{
    EndpointInfo, EventType, FlowEvent, PolicyKeyData, PolicyValue, POLICY_FULL_PREFIX_BITS,
    POLICY_F_DENY, POLICY_STATIC_PREFIX_BITS,
};
use fibril_datapath::{Config, Datapath, EndpointPrograms, PolicyEntry};
use test_support::{unique_name, L4, TCP_SYN};

pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;
pub const TC_ACT_REDIRECT: u32 = 7;

pub const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 10);
pub const SERVER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 20);
pub const CLIENT_ID: u32 = 300;
pub const SERVER_ID: u32 = 301;

/// A datapath in its own pin directory, removed on drop.
pub struct Lab {
    pub dp: Datapath,
    pub pin_dir: std::path::PathBuf,
    pub reader: std::cell::RefCell<Option<fibril_datapath::EventReader>>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        Datapath::unpin_all(&self.pin_dir);
    }
}

pub fn lab() -> Lab {
    lab_with(|_| {})
}

/// A lab whose datapath configuration `adjust` changes first.
pub fn lab_with(adjust: impl FnOnce(&mut Config)) -> Lab {
    let pin_dir = std::path::PathBuf::from("/sys/fs/bpf").join(unique_name("fibril-test-"));
    let mut config = Config::new(&pin_dir);
    adjust(&mut config);
    let dp = Datapath::open(config).expect("open datapath (needs root and BPF)");
    for (ip, ep, id, ifindex) in [(CLIENT, 1, CLIENT_ID, 1000), (SERVER, 2, SERVER_ID, 1001)] {
        dp.upsert_endpoint(
            ip,
            EndpointInfo {
                ep_id: ep,
                identity: id,
                host_ifindex: ifindex,
                flags: 0,
                pod_mac: [0x02, 0, 0, 0, 1, ep as u8],
                host_mac: [0x02, 0, 0, 0, 2, ep as u8],
                pad: 0,
            },
        )
        .unwrap();
    }
    Lab {
        dp,
        pin_dir,
        reader: Default::default(),
    }
}

pub fn enforce(lab: &Lab, ip: Ipv4Addr, flags: u32) {
    let mut info = lab.dp.endpoint(ip).unwrap();
    info.flags = flags;
    lab.dp.upsert_endpoint(ip, info).unwrap();
}

pub fn allow(lab: &Lab, ep: u32, identity: u32, dir: u8, proto: u8, port: u16, deny: bool) {
    let flags = if deny { POLICY_F_DENY } else { 0 };
    policy_entry(lab, ep, identity, dir, proto, port, flags);
}

/// A policy map entry: any protocol (`proto` 0), any port (`port` 0) or
/// one port, with `flags` (`POLICY_F_*`).
pub fn policy_entry(lab: &Lab, ep: u32, identity: u32, dir: u8, proto: u8, port: u16, flags: u8) {
    let prefix_len = if proto == 0 {
        POLICY_STATIC_PREFIX_BITS
    } else if port == 0 {
        POLICY_STATIC_PREFIX_BITS + 8
    } else {
        POLICY_FULL_PREFIX_BITS
    };
    lab.dp
        .upsert_policy(&PolicyEntry {
            prefix_len,
            key: PolicyKeyData {
                ep_id: ep.to_be(),
                identity: identity.to_be(),
                direction: dir,
                protocol: proto,
                dport: port.to_be(),
            },
            value: PolicyValue {
                cookie: 42,
                flags,
                prefix: (prefix_len - POLICY_STATIC_PREFIX_BITS) as u8,
                pad: 0,
            },
        })
        .unwrap();
}

/// The trace, drop and audit events so far (the policy-verdict events of
/// allowed and denied connections are `all_events`' and
/// `policy_verdicts_report_each_decided_connection_once`'s concern).
pub fn events(lab: &Lab) -> Vec<FlowEvent> {
    all_events(lab)
        .into_iter()
        .filter(|e| e.r#type != EventType::PolicyVerdict as u8 || e.verdict == abi::verdict::AUDIT)
        .collect()
}

pub fn all_events(lab: &Lab) -> Vec<FlowEvent> {
    let mut slot = lab.reader.borrow_mut();
    let reader = slot.get_or_insert_with(|| lab.dp.take_event_reader().unwrap());
    let mut out = Vec::new();
    reader.poll(std::time::Duration::from_millis(0), |e| out.push(e));
    out
}

pub fn progs(lab: &Lab, ep: u32, ip: Ipv4Addr) -> EndpointPrograms {
    lab.dp.load_endpoint_programs(ep, ip).unwrap()
}

pub fn syn(sport: u16, dport: u16) -> L4 {
    L4::Tcp {
        sport,
        dport,
        flags: TCP_SYN,
    }
}

pub fn tcp(sport: u16, dport: u16, flags: u8) -> L4 {
    L4::Tcp {
        sport,
        dport,
        flags,
    }
}

/// A frame's IPv4 destination address and L4 destination port.
pub fn dst_of(frame: &[u8]) -> (Ipv4Addr, u16) {
    (
        Ipv4Addr::new(frame[30], frame[31], frame[32], frame[33]),
        u16::from_be_bytes([frame[36], frame[37]]),
    )
}

/// A frame's IPv4 source address and L4 source port.
pub fn src_of(frame: &[u8]) -> (Ipv4Addr, u16) {
    (
        Ipv4Addr::new(frame[26], frame[27], frame[28], frame[29]),
        u16::from_be_bytes([frame[34], frame[35]]),
    )
}
