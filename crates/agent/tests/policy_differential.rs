//! "`fibril policy trace` says what the kernel does", proven rather than
//! asserted: random endpoint policies (allows and denies for single
//! identities and for any identity, any protocol, one protocol, port
//! prefixes of every length, audit mode) go through the agent's own
//! conversion to map entries (`policy_sync::map_entries`) into the real
//! BPF programs, and random new connections through BPF_PROG_TEST_RUN
//! must meet exactly the decision `EndpointPolicy::decide` gives: the
//! action, and the drop reason or audit verdict the event reports.
//! Needs root (BPF); the seed of a failing run is printed.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;

use abi::{EndpointInfo, EventType, FlowEvent, PolicyKeyData, PolicyValue};
use datapath::{Config, Datapath, EndpointPrograms, Hook, PolicyEntry};
use fibril_agent::policy_sync::map_entries;
use policy::{Decision, Direction, EndpointPolicy, EntryKey, EntryValue, Origin};
use test_support::{ipv4_packet, unique_name, Rng, L4, TCP_SYN};

const TC_ACT_OK: u32 = 0;
const TC_ACT_SHOT: u32 = 2;

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 10);
const SERVER: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 20);
const CLIENT_EP: u32 = 1;
const SERVER_EP: u32 = 2;

/// Remote peers: an address each, and the identity the ipcache gives it
/// (the last one falls to `0.0.0.0/0`, world).
const PEERS: [(Ipv4Addr, u32); 4] = [
    (Ipv4Addr::new(10, 99, 0, 1), 1000),
    (Ipv4Addr::new(10, 99, 0, 2), 1001),
    (Ipv4Addr::new(192, 0, 2, 7), (1 << 24) + 5),
    (Ipv4Addr::new(198, 51, 100, 9), abi::identity::WORLD),
];
/// Ports near the edges of the prefixes the random entries cover.
const PORTS: [u16; 10] = [53, 80, 81, 443, 1023, 1024, 8080, 8081, 32768, 65535];

/// A policy of 1 to 10 random entries in `direction`, enforced or not,
/// audited or not.
fn random_policy(rng: &mut Rng, direction: Direction) -> EndpointPolicy {
    let mut p = EndpointPolicy::default();
    let enforced = rng.below(8) != 0;
    let audit = enforced && rng.below(5) == 0;
    match direction {
        Direction::Ingress => (p.ingress_enforced, p.ingress_audit) = (enforced, audit),
        Direction::Egress => (p.egress_enforced, p.egress_audit) = (enforced, audit),
    }
    for i in 0..1 + rng.below(10) {
        let identity = if rng.below(3) == 0 {
            0
        } else {
            rng.pick(&PEERS).1
        };
        let protocol = rng.pick(&[0u8, 6, 6, 17]);
        let (port, port_bits) = if protocol == 0 {
            (0, 0)
        } else {
            let bits = rng.pick(&[0u8, 4, 8, 12, 15, 16, 16, 16]);
            let mask = if bits == 0 {
                0
            } else {
                u16::MAX << (16 - bits)
            };
            (rng.pick(&PORTS) & mask, bits)
        };
        let key = EntryKey {
            identity,
            direction,
            protocol,
            port,
            port_bits,
        };
        let deny = rng.below(4) == 0;
        let value = EntryValue {
            deny,
            origin: Origin {
                kind: "CiliumNetworkPolicy".into(),
                policy: "default/random".into(),
                rule: 0,
                direction,
                entry: i as usize,
            },
            l7: None,
            audit,
        };
        p.entries.insert(key, value);
    }
    p
}

/// What the kernel reported for one connection: its action, and the
/// drop reason or AUDIT it gave in its event (0 for none).
#[derive(Debug, PartialEq, Eq)]
struct Outcome {
    action: u32,
    drop_reason: u8,
    audited: bool,
}

/// The outcome `decide` predicts.
fn expected(d: &Decision) -> Outcome {
    let allowed = Outcome {
        action: TC_ACT_OK,
        drop_reason: 0,
        audited: false,
    };
    match d {
        Decision::NotEnforced | Decision::Allowed { .. } => allowed,
        Decision::Denied { .. } => Outcome {
            action: TC_ACT_SHOT,
            drop_reason: abi::DropReason::PolicyDeny as u8,
            audited: false,
        },
        Decision::DefaultDeny { .. } => Outcome {
            action: TC_ACT_SHOT,
            drop_reason: abi::DropReason::PolicyDenied as u8,
            audited: false,
        },
        Decision::Audited { .. } => Outcome {
            audited: true,
            ..allowed
        },
    }
}

struct Lab {
    dp: Datapath,
    pin_dir: std::path::PathBuf,
}

impl Drop for Lab {
    fn drop(&mut self) {
        Datapath::unpin_all(&self.pin_dir);
    }
}

fn endpoint(ep: u32) -> EndpointInfo {
    EndpointInfo {
        ep_id: ep,
        identity: 300 + ep,
        host_ifindex: 1000 + ep,
        flags: 0,
        pod_mac: [0x02, 0, 0, 0, 1, ep as u8],
        host_mac: [0x02, 0, 0, 0, 2, ep as u8],
        pad: 0,
    }
}

/// Replaces endpoint `ep`'s policy-map entries and flags with `policy`'s.
fn install(
    dp: &Datapath,
    ep: u32,
    ip: Ipv4Addr,
    policy: &EndpointPolicy,
    installed: &mut BTreeMap<u32, Vec<(u32, PolicyKeyData)>>,
) {
    for (prefix_len, key) in installed.remove(&ep).unwrap_or_default() {
        dp.remove_policy(prefix_len, key).unwrap();
    }
    let (entries, flags) = map_entries(ep, policy, |_| 1);
    for ((prefix_len, key), value) in &entries {
        let value: PolicyValue = *value;
        dp.upsert_policy(&PolicyEntry {
            prefix_len: *prefix_len,
            key: *key,
            value,
        })
        .unwrap();
    }
    installed.insert(ep, entries.keys().copied().collect());
    dp.upsert_endpoint(
        ip,
        EndpointInfo {
            flags,
            ..endpoint(ep)
        },
    )
    .unwrap();
}

fn run(
    progs: &mut EndpointPrograms,
    hook: Hook,
    packet: &[u8],
    reader: &mut datapath::EventReader,
) -> Outcome {
    let action = progs.test_run(hook, packet).unwrap().action;
    let mut events: Vec<FlowEvent> = Vec::new();
    reader.poll(std::time::Duration::from_millis(0), |e| events.push(e));
    let drop_reason = events
        .iter()
        .find(|e| e.r#type == EventType::Drop as u8)
        .map_or(0, |e| e.subtype);
    let audited = events.iter().any(|e| e.verdict == abi::verdict::AUDIT);
    Outcome {
        action,
        drop_reason,
        audited,
    }
}

#[test]
fn the_kernel_decides_every_new_connection_as_decide_says() {
    let mut rng = Rng::from_env("FIBRIL_DIFF_SEED");
    let seed = rng.0;

    let pin_dir = std::path::PathBuf::from("/sys/fs/bpf").join(unique_name("fibril-diff-"));
    let dp = Datapath::open(Config::new(&pin_dir)).expect("open datapath (needs root and BPF)");
    let lab = Lab { dp, pin_dir };
    let dp = &lab.dp;
    dp.upsert_ipcache(Ipv4Addr::UNSPECIFIED, 0, abi::identity::WORLD, None)
        .unwrap();
    for (ip, identity) in &PEERS[..3] {
        dp.upsert_ipcache(*ip, 32, *identity, None).unwrap();
    }
    dp.upsert_endpoint(CLIENT, endpoint(CLIENT_EP)).unwrap();
    dp.upsert_endpoint(SERVER, endpoint(SERVER_EP)).unwrap();
    let mut client = dp.load_endpoint_programs(CLIENT_EP, CLIENT).unwrap();
    let mut server = dp.load_endpoint_programs(SERVER_EP, SERVER).unwrap();
    let mut reader = dp.take_event_reader().unwrap();
    let mut installed = BTreeMap::new();

    let (mut checked, mut kinds) = (0, BTreeMap::<&str, usize>::new());
    let mut sport = 10_000u16;
    for round in 0..200 {
        let ingress = random_policy(&mut rng, Direction::Ingress);
        let egress = random_policy(&mut rng, Direction::Egress);
        install(dp, SERVER_EP, SERVER, &ingress, &mut installed);
        install(dp, CLIENT_EP, CLIENT, &egress, &mut installed);
        for _ in 0..25 {
            let (peer, identity) = rng.pick(&PEERS);
            let protocol = rng.pick(&[6u8, 17]);
            let port = rng.pick(&PORTS);
            // A source port never used before: every packet opens a
            // connection (conntrack would carry a second one).
            sport = sport.wrapping_add(1).max(10_000);
            let l4 = if protocol == 6 {
                L4::Tcp {
                    sport,
                    dport: port,
                    flags: TCP_SYN,
                }
            } else {
                L4::Udp { sport, dport: port }
            };
            let (direction, policy, got) = if rng.below(2) == 0 {
                let packet = ipv4_packet(peer, SERVER, l4);
                let got = run(&mut server, Hook::ToContainer, &packet, &mut reader);
                (Direction::Ingress, &ingress, got)
            } else {
                let packet = ipv4_packet(CLIENT, peer, l4);
                let got = run(&mut client, Hook::FromContainer, &packet, &mut reader);
                (Direction::Egress, &egress, got)
            };
            let decision = policy.decide(identity, direction, protocol, port);
            let kind = match &decision {
                Decision::NotEnforced => "not enforced",
                Decision::Allowed { .. } => "allowed",
                Decision::Denied { .. } => "denied",
                Decision::DefaultDeny { .. } => "default deny",
                Decision::Audited { .. } => "audited",
            };
            *kinds.entry(kind).or_default() += 1;
            assert_eq!(
                got,
                expected(&decision),
                "seed {seed}, round {round}: {direction:?} {protocol}/{port} with identity {identity} ({peer}); decide says {decision:?}; the policy: {policy:#?}"
            );
            checked += 1;
        }
    }
    println!("{checked} connections agreed: {kinds:?}");
    // Every kind of decision met the kernel.
    assert_eq!(kinds.len(), 5, "{kinds:?}");
}
