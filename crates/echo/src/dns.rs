//! A small DNS server and client for lab tests (hickory-proto for the wire
//! format).

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream, UdpSocket};
use std::str::FromStr;
use std::time::Duration;

use anyhow::{bail, Context};
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{rdata::A, Name, RData, Record, RecordType};
use hickory_proto::serialize::binary::BinEncodable;

use crate::say;

/// What the server answers: A records, CNAMEs (alias -> target) and
/// records added to every answer.
#[derive(Clone, Default)]
pub struct Zone {
    pub records: Vec<(String, String)>,
    pub cnames: Vec<(String, String)>,
    pub extras: Vec<(String, String)>,
}

fn a_record(owner: &str, ip: &str, ttl: u32) -> Option<Record> {
    let ip: Ipv4Addr = ip.parse().ok()?;
    Some(Record::from_rdata(
        Name::from_str(owner).ok()?,
        ttl,
        RData::A(A(ip)),
    ))
}

fn answer(query: &[u8], zone: &Zone, ttl: u32) -> Option<Vec<u8>> {
    let q = Message::from_vec(query).ok()?;
    let mut r = Message::new();
    r.set_id(q.id())
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .set_authoritative(true)
        .set_recursion_desired(q.recursion_desired());
    r.add_queries(q.queries().to_vec());
    let mut found = false;
    // Every question is answered (a real resolver refuses several).
    for question in q.queries() {
        let mut name = question.name().to_ascii().to_ascii_lowercase();
        say(format!("query {name} {}", question.query_type()));
        if let Some((alias, target)) = zone.cnames.iter().find(|(a, _)| *a == name) {
            let rdata = RData::CNAME(hickory_proto::rr::rdata::CNAME(
                Name::from_str(target).ok()?,
            ));
            r.add_answer(Record::from_rdata(Name::from_str(alias).ok()?, ttl, rdata));
            found = true;
            name = target.clone();
        }
        for (n, ip) in zone.records.iter().filter(|(n, _)| *n == name) {
            found = true;
            if question.query_type() == RecordType::A {
                r.add_answer(a_record(n, ip, ttl)?);
            }
        }
    }
    if found {
        for (owner, ip) in &zone.extras {
            r.add_answer(a_record(owner, ip, ttl)?);
        }
    } else {
        r.set_response_code(ResponseCode::NXDomain);
    }
    r.to_bytes().ok()
}

/// `name=value` pairs, names as fully qualified lower case.
pub fn parse_pairs(pairs: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    let fqdn = |n: &str| {
        let mut n = n.to_ascii_lowercase();
        if !n.ends_with('.') {
            n.push('.');
        }
        n
    };
    pairs
        .iter()
        .map(|r| {
            let (n, v) = r
                .split_once('=')
                .with_context(|| format!("{r:?}: expected name=value"))?;
            let v = if v.parse::<Ipv4Addr>().is_ok() {
                v.to_string()
            } else {
                fqdn(v)
            };
            Ok((fqdn(n), v))
        })
        .collect()
}

pub fn server(port: u16, zone: &Zone, ttl: u32) -> anyhow::Result<()> {
    let records = zone.clone();
    let udp = UdpSocket::bind(("0.0.0.0", port)).with_context(|| format!("bind udp :{port}"))?;
    let tcp = TcpListener::bind(("0.0.0.0", port)).with_context(|| format!("bind tcp :{port}"))?;
    say(format!("listening on dns :{port}"));
    {
        let records = records.clone();
        std::thread::spawn(move || {
            for conn in tcp.incoming() {
                let Ok(mut conn) = conn else { continue };
                let records = records.clone();
                std::thread::spawn(move || loop {
                    let mut len = [0u8; 2];
                    if conn.read_exact(&mut len).is_err() {
                        return;
                    }
                    let mut q = vec![0u8; u16::from_be_bytes(len) as usize];
                    if conn.read_exact(&mut q).is_err() {
                        return;
                    }
                    let Some(a) = answer(&q, &records, ttl) else {
                        return;
                    };
                    let mut out = (a.len() as u16).to_be_bytes().to_vec();
                    out.extend(a);
                    if conn.write_all(&out).is_err() {
                        return;
                    }
                });
            }
        });
    }
    let mut buf = [0u8; 4096];
    loop {
        let (n, peer) = udp.recv_from(&mut buf)?;
        say(format!("from {peer}"));
        if let Some(a) = answer(&buf[..n], &records, ttl) {
            udp.send_to(&a, peer)?;
        }
    }
}

pub fn query(
    server: &str,
    name: &str,
    also: &[String],
    tcp: bool,
    timeout: f64,
    attempts: u32,
) -> anyhow::Result<()> {
    let server = if server.contains(':') {
        server.to_string()
    } else {
        format!("{server}:53")
    };
    let mut m = Message::new();
    m.set_id(std::process::id() as u16)
        .set_message_type(MessageType::Query)
        .set_recursion_desired(true);
    for n in std::iter::once(name).chain(also.iter().map(String::as_str)) {
        m.add_query(Query::query(Name::from_str(n)?, RecordType::A));
    }
    let bytes = m.to_bytes()?;
    let timeout = Duration::from_secs_f64(timeout);
    let reply = if tcp {
        let mut s = TcpStream::connect_timeout(&server.parse()?, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        let mut out = (bytes.len() as u16).to_be_bytes().to_vec();
        out.extend(&bytes);
        s.write_all(&out)?;
        let mut len = [0u8; 2];
        s.read_exact(&mut len)?;
        let mut r = vec![0u8; u16::from_be_bytes(len) as usize];
        s.read_exact(&mut r)?;
        r
    } else {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        s.set_read_timeout(Some(timeout))?;
        let mut buf = [0u8; 4096];
        let mut got = None;
        for _ in 0..attempts.max(1) {
            s.send_to(&bytes, &server)?;
            if let Ok((n, _)) = s.recv_from(&mut buf) {
                got = Some(buf[..n].to_vec());
                break;
            }
        }
        got.context("no answer")?
    };
    let r = Message::from_vec(&reply)?;
    if r.id() != m.id() {
        bail!("answer for another query");
    }
    say(format!("rcode {:?}", r.response_code()));
    for a in r.answers() {
        if let RData::A(ip) = a.data() {
            say(format!("address {} ttl {}", ip.0, a.ttl()));
        }
    }
    Ok(())
}

pub fn load(server: &str, name: &str, seconds: f64, concurrency: usize) -> anyhow::Result<()> {
    let server = if server.contains(':') {
        server.to_string()
    } else {
        format!("{server}:53")
    };
    let end = std::time::Instant::now() + Duration::from_secs_f64(seconds);
    let started = std::time::Instant::now();
    let workers: Vec<_> = (0..concurrency.max(1))
        .map(|w| {
            let (server, name) = (server.clone(), name.to_string());
            std::thread::spawn(move || -> anyhow::Result<(Vec<u32>, u64)> {
                let s = UdpSocket::bind("0.0.0.0:0")?;
                s.connect(&server)?;
                s.set_read_timeout(Some(Duration::from_secs(1)))?;
                let mut lat = Vec::with_capacity(1 << 16);
                let mut lost = 0;
                let mut buf = [0u8; 4096];
                let mut id: u16 = (w as u16) << 12;
                while std::time::Instant::now() < end {
                    id = id.wrapping_add(1);
                    let mut m = Message::new();
                    m.set_id(id)
                        .set_message_type(MessageType::Query)
                        .set_recursion_desired(true);
                    m.add_query(Query::query(Name::from_str(&name)?, RecordType::A));
                    let t = std::time::Instant::now();
                    s.send(&m.to_bytes()?)?;
                    match s.recv(&mut buf) {
                        Ok(n) if Message::from_vec(&buf[..n]).is_ok_and(|r| r.id() == id) => {
                            lat.push(t.elapsed().as_micros().min(u32::MAX as u128) as u32)
                        }
                        _ => lost += 1,
                    }
                }
                Ok((lat, lost))
            })
        })
        .collect();
    let (mut all, mut lost) = (Vec::new(), 0);
    for w in workers {
        let (l, x) = w.join().map_err(|_| anyhow::anyhow!("worker panicked"))??;
        all.extend(l);
        lost += x;
    }
    say(format!("unanswered {lost}"));
    crate::report_latencies("queries", &mut all, started.elapsed().as_secs_f64());
    Ok(())
}
