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

fn answer(query: &[u8], records: &[(String, Ipv4Addr)], ttl: u32) -> Option<Vec<u8>> {
    let q = Message::from_vec(query).ok()?;
    let mut r = Message::new();
    r.set_id(q.id())
        .set_message_type(MessageType::Response)
        .set_op_code(OpCode::Query)
        .set_authoritative(true)
        .set_recursion_desired(q.recursion_desired());
    r.add_queries(q.queries().to_vec());
    let mut found = false;
    for question in q.queries() {
        let name = question.name().to_ascii().to_ascii_lowercase();
        say(format!("query {name} {}", question.query_type()));
        for (n, ip) in records.iter().filter(|(n, _)| *n == name) {
            found = true;
            if question.query_type() == RecordType::A {
                let owner = Name::from_str(n).ok()?;
                r.add_answer(Record::from_rdata(owner, ttl, RData::A(A(*ip))));
            }
        }
    }
    if !found {
        r.set_response_code(ResponseCode::NXDomain);
    }
    r.to_bytes().ok()
}

fn parse_records(records: &[String]) -> anyhow::Result<Vec<(String, Ipv4Addr)>> {
    records
        .iter()
        .map(|r| {
            let (n, ip) = r
                .split_once('=')
                .with_context(|| format!("record {r:?}: expected name=address"))?;
            let mut n = n.to_ascii_lowercase();
            if !n.ends_with('.') {
                n.push('.');
            }
            Ok((n, ip.parse().with_context(|| format!("record {r:?}"))?))
        })
        .collect()
}

pub fn server(port: u16, records: &[String], ttl: u32) -> anyhow::Result<()> {
    let records = parse_records(records)?;
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
    m.add_query(Query::query(Name::from_str(name)?, RecordType::A));
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
