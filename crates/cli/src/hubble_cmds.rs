//! `fibril status`'s Hubble part and `fibril list nodes|namespaces`: the
//! hubble CLI's `status` and `list` against any Hubble-compatible server.

use anyhow::Context;
use proto::observer::observer_client::ObserverClient;
use proto::observer::{GetNamespacesRequest, GetNodesRequest, ServerStatusRequest};

use crate::observe::{connect, Server};

/// `1234567` -> `1,234,567`.
pub fn grouped(n: u64) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Go's duration text, rounded to seconds (`3h0m0s`).
pub fn go_duration(ns: u64) -> String {
    let s = ns / 1_000_000_000;
    match (s / 3600, (s / 60) % 60, s % 60) {
        (0, 0, sec) => format!("{sec}s"),
        (0, m, sec) => format!("{m}m{sec}s"),
        (h, m, sec) => format!("{h}h{m}m{sec}s"),
    }
}

fn block<T>(f: impl std::future::Future<Output = anyhow::Result<T>>) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

/// A unary call bounded by `--request-timeout`.
async fn unary<T>(
    server: &Server,
    call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> anyhow::Result<T> {
    match tokio::time::timeout(server.request_timeout, call).await {
        Ok(r) => Ok(r
            .map_err(|e| anyhow::anyhow!("{}", e.message()))?
            .into_inner()),
        Err(_) => anyhow::bail!(
            "no answer within the request timeout ({:?}, --request-timeout)",
            server.request_timeout
        ),
    }
}

/// The lines `hubble status` prints (compact).
pub fn status_lines(address: &str, server: &Server) -> anyhow::Result<Vec<String>> {
    block(async {
        let channel = connect(address, server).await?;
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
        let check = health.check(tonic_health::pb::HealthCheckRequest {
            service: "hubble.server.Observer".into(),
        });
        let ok = unary(server, check).await.is_ok_and(|r| {
            r.status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        });
        let mut client = ObserverClient::new(channel);
        let s = unary(server, client.server_status(ServerStatusRequest {})).await?;
        let mut out = vec![format!(
            "Healthcheck (via {address}): {}",
            if ok { "Ok" } else { "Unavailable" }
        )];
        let pct = if s.max_flows > 0 {
            format!(" ({:.2}%)", s.num_flows as f64 * 100.0 / s.max_flows as f64)
        } else {
            String::new()
        };
        out.push(format!(
            "Current/Max Flows: {}/{}{pct}",
            grouped(s.num_flows),
            grouped(s.max_flows)
        ));
        let rate = if s.flows_rate > 0.0 {
            format!("{:.2}", s.flows_rate)
        } else if s.uptime_ns > 0 {
            format!("{:.2}", s.seen_flows as f64 / (s.uptime_ns as f64 / 1e9))
        } else {
            "N/A".into()
        };
        out.push(format!("Flows/s: {rate}"));
        Ok(out)
    })
}

pub fn list_nodes(address: &str, server: &Server, json: bool) -> anyhow::Result<()> {
    let mut nodes = block(async {
        let mut client = ObserverClient::new(connect(address, server).await?);
        Ok(unary(server, client.get_nodes(GetNodesRequest {}))
            .await?
            .nodes)
    })?;
    nodes.sort_by(|a, b| a.name.cmp(&b.name));
    if json {
        for n in &nodes {
            let state = proto::relay::NodeState::try_from(n.state)
                .map(|s| s.as_str_name())
                .unwrap_or("UNKNOWN_NODE_STATE");
            println!(
                "{}",
                serde_json::json!({"name": n.name, "version": n.version, "address": n.address, "state": state,
                    "uptime_ns": n.uptime_ns.to_string(), "num_flows": n.num_flows.to_string(),
                    "max_flows": n.max_flows.to_string(), "seen_flows": n.seen_flows.to_string()})
            );
        }
        return Ok(());
    }
    println!(
        "{:<20} {:<13} {:<8} {:<9} CURRENT/MAX-FLOWS",
        "NAME", "STATUS", "AGE", "FLOWS/S"
    );
    for n in nodes {
        let status = match proto::relay::NodeState::try_from(n.state) {
            Ok(proto::relay::NodeState::NodeConnected) => "Connected",
            Ok(proto::relay::NodeState::NodeUnavailable) => "Unavailable",
            Ok(proto::relay::NodeState::NodeGone) => "Gone",
            Ok(proto::relay::NodeState::NodeError) => "Error",
            _ => "Unknown",
        };
        let (age, rate) = if n.uptime_ns > 0 {
            (
                go_duration(n.uptime_ns),
                format!("{:.2}", n.seen_flows as f64 / (n.uptime_ns as f64 / 1e9)),
            )
        } else {
            ("N/A".into(), "N/A".into())
        };
        let flows = if n.max_flows > 0 {
            format!(
                "{}/{} ({:>6.2}%)",
                n.num_flows,
                n.max_flows,
                n.num_flows as f64 * 100.0 / n.max_flows as f64
            )
        } else {
            "N/A".into()
        };
        println!(
            "{:<20} {:<13} {:<8} {:<9} {flows}",
            n.name, status, age, rate
        );
    }
    Ok(())
}

pub fn list_namespaces(address: &str, server: &Server, json: bool) -> anyhow::Result<()> {
    let namespaces = block(async {
        let mut client = ObserverClient::new(connect(address, server).await?);
        let call = client.get_namespaces(GetNamespacesRequest {});
        Ok(unary(server, call)
            .await
            .context("GetNamespaces")?
            .namespaces)
    })?;
    if json {
        for n in namespaces {
            println!(
                "{}",
                serde_json::json!({"cluster": n.cluster, "namespace": n.namespace})
            );
        }
    } else {
        println!("NAMESPACE");
        for n in namespaces {
            println!("{}", n.namespace);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_and_durations_print_as_the_hubble_cli() {
        assert_eq!(grouped(4095), "4,095");
        assert_eq!(grouped(123456), "123,456");
        assert_eq!(grouped(12), "12");
        assert_eq!(go_duration(10_800_000_000_000), "3h0m0s");
        assert_eq!(go_duration(65_000_000_000), "1m5s");
    }
}
