//! One open page: its query, the relay stream that answers it, and the
//! events pushed to the page over one server-sent-events channel: the
//! map and breakdown every second, a sample of the flows four times a
//! second (never every flow), the relay's node news as it comes.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proto::observer::get_flows_response::ResponseTypes;
use proto::observer::observer_client::ObserverClient;
use proto::observer::{GetFlowsRequest, GetFlowsResponse};
use tokio::sync::mpsc;
use tonic::transport::Channel;

use crate::aggregate::Aggregate;
use crate::filter::{self, Entry};
use crate::selection::Selections;

/// The longest time window a page may ask for.
pub const MAX_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// Flows sampled for the table per push (four pushes a second).
pub const SAMPLE: usize = 40;
const SAMPLE_EVERY: Duration = Duration::from_millis(250);
const MAP_EVERY: Duration = Duration::from_secs(1);

/// What a page asks for: its namespace (or all), the namespaces it leaves
/// out, its filters, its time window.
#[derive(Clone, Debug, PartialEq)]
pub struct Query {
    pub namespace: Option<String>,
    pub exclude: Vec<String>,
    pub filters: Vec<Entry>,
    pub window: Duration,
}

impl Query {
    /// From the page's URL query: `ns` ("" or `*`: all), `exclude` and
    /// `filter` (repeatable), `window` (seconds).
    pub fn from_params(params: &[(String, String)]) -> Result<Query, String> {
        let mut q = Query {
            namespace: None,
            exclude: Vec::new(),
            filters: Vec::new(),
            window: Duration::from_secs(300),
        };
        for (k, v) in params {
            match k.as_str() {
                "ns" => {
                    q.namespace = Some(v.trim().to_string()).filter(|n| !n.is_empty() && n != "*")
                }
                "exclude" => q.exclude.extend(
                    v.split(',')
                        .map(str::trim)
                        .filter(|n| !n.is_empty())
                        .map(String::from),
                ),
                "filter" if v.trim().is_empty() => {}
                "filter" => q.filters.push(Entry::parse(v)?),
                "window" => {
                    let s: u64 = v
                        .parse()
                        .map_err(|_| format!("window {v:?}: give seconds"))?;
                    if s == 0 || s > MAX_WINDOW.as_secs() {
                        return Err(format!(
                            "window {s}: between 1 and {} seconds",
                            MAX_WINDOW.as_secs()
                        ));
                    }
                    q.window = Duration::from_secs(s);
                }
                other => return Err(format!("unknown parameter {other:?}")),
            }
        }
        q.lists()?;
        Ok(q)
    }

    fn entries(&self) -> Vec<Entry> {
        let ns = |negated, n: &str| Entry {
            negated,
            side: filter::Side::Either,
            kind: filter::Kind::Namespace,
            value: format!("{}/", n.trim_end_matches('/')),
        };
        let mut all: Vec<Entry> = self.namespace.iter().map(|n| ns(false, n)).collect();
        all.extend(self.exclude.iter().map(|n| ns(true, n)));
        all.extend(self.filters.iter().cloned());
        all
    }

    pub fn lists(&self) -> Result<filter::Lists, String> {
        filter::lists(&self.entries())
    }

    /// The relay request: the window's flows (then the live ones if
    /// `follow`), starting no earlier than `since_ns`.
    pub fn request(&self, follow: bool, since_ns: Option<u64>) -> GetFlowsRequest {
        let lists = self.lists().unwrap_or_default();
        let start = now_ns().saturating_sub(self.window.as_nanos() as u64);
        GetFlowsRequest {
            follow,
            since: Some(hubble::convert::timestamp(
                since_ns.map_or(start, |s| s.max(start)),
            )),
            whitelist: lists.allow,
            blacklist: lists.deny,
            ..Default::default()
        }
    }
}

pub fn now_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// An event for the page: its SSE name and JSON data.
pub type Push = (&'static str, String);

/// A flow as the page gets it: `hubble observe -o json`'s line.
pub fn flow_json(r: &GetFlowsResponse) -> Option<String> {
    let Some(ResponseTypes::Flow(f)) = &r.response_types else {
        return None;
    };
    let f = hubble::convert::from_pb(f);
    serde_json::to_string(&flow::format::JsonLine {
        flow: &f,
        node_name: &r.node_name,
        time: &f.time,
    })
    .ok()
}

/// Keeps `SAMPLE` flows of those offered, each equally likely (reservoir).
struct Sampler {
    kept: Vec<GetFlowsResponse>,
    offered: u64,
    rng: u64,
}

impl Sampler {
    fn new() -> Sampler {
        Sampler {
            kept: Vec::with_capacity(SAMPLE),
            offered: 0,
            rng: now_ns() | 1,
        }
    }

    fn offer(&mut self, r: GetFlowsResponse) {
        self.offered += 1;
        if self.kept.len() < SAMPLE {
            self.kept.push(r);
            return;
        }
        // xorshift64: cheap, and the sample need not be cryptographic.
        self.rng ^= self.rng << 13;
        self.rng ^= self.rng >> 7;
        self.rng ^= self.rng << 17;
        let j = (self.rng % self.offered) as usize;
        if j < SAMPLE {
            self.kept[j] = r;
        }
    }

    /// The sample in time order, and how many flows it stands for.
    fn take(&mut self) -> (Vec<GetFlowsResponse>, u64) {
        let mut kept = std::mem::take(&mut self.kept);
        kept.sort_by_key(|r| {
            match &r.response_types {
                Some(ResponseTypes::Flow(f)) => f.time.as_ref().map(hubble::convert::unix_ns),
                _ => None,
            }
            .unwrap_or(0)
        });
        (kept, std::mem::take(&mut self.offered))
    }
}

/// Runs a page's session until the page goes away.
pub async fn run(
    relay: ObserverClient<Channel>,
    selections: Selections,
    query: Query,
    tx: mpsc::Sender<Push>,
) {
    let mut agg = Aggregate::new(query.window);
    let mut sampler = Sampler::new();
    let mut last_flow_ns: Option<u64> = None;
    let mut samples = tokio::time::interval(SAMPLE_EVERY);
    let mut maps = tokio::time::interval(MAP_EVERY);
    let mut backoff = Duration::from_millis(200);
    'connect: loop {
        let since = last_flow_ns.map(|t| t + 1);
        let mut stream = match relay.clone().get_flows(query.request(true, since)).await {
            Ok(s) => {
                backoff = Duration::from_millis(200);
                let _ = tx.try_send(("relay", r#"{"connected":true}"#.to_string()));
                s.into_inner()
            }
            Err(e) => {
                let msg = serde_json::json!({"connected": false, "error": e.message()});
                if tx.send(("relay", msg.to_string())).await.is_err() {
                    return;
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
                continue 'connect;
            }
        };
        loop {
            tokio::select! {
                msg = stream.message() => match msg {
                    Ok(Some(r)) => match &r.response_types {
                        Some(ResponseTypes::Flow(f)) => {
                            agg.add(f);
                            last_flow_ns = f.time.as_ref().map(hubble::convert::unix_ns).or(last_flow_ns);
                            sampler.offer(r);
                        }
                        Some(ResponseTypes::NodeStatus(n)) => {
                            let state = proto::relay::NodeState::try_from(n.state_change)
                                .map(|s| s.as_str_name())
                                .unwrap_or("UNKNOWN_NODE_STATE");
                            let msg = serde_json::json!({
                                "state": state, "nodes": n.node_names, "message": n.message,
                            });
                            let _ = tx.try_send(("node", msg.to_string()));
                        }
                        _ => {}
                    },
                    Ok(None) | Err(_) => {
                        let msg = serde_json::json!({"connected": false, "error": "the relay's stream ended"});
                        if tx.send(("relay", msg.to_string())).await.is_err() {
                            return;
                        }
                        tokio::time::sleep(backoff).await;
                        continue 'connect;
                    }
                },
                _ = samples.tick() => {
                    let (kept, offered) = sampler.take();
                    if offered == 0 {
                        if tx.is_closed() { return; }
                        continue;
                    }
                    let flows: Vec<String> = kept.iter().filter_map(flow_json).collect();
                    let data = format!(r#"{{"offered":{offered},"flows":[{}]}}"#, flows.join(","));
                    // A page that cannot keep up misses samples, never
                    // holds the stream back.
                    if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(("flows", data)) {
                        return;
                    }
                }
                _ = maps.tick() => {
                    let snap = agg.snapshot(now_ns(), &selections.get());
                    let data = serde_json::to_string(&snap).unwrap_or_default();
                    if let Err(mpsc::error::TrySendError::Closed(_)) = tx.try_send(("map", data)) {
                        return;
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_query_is_a_namespace_exclusions_filters_and_a_window() {
        let q = Query::from_params(&params(&[
            ("ns", "shop"),
            ("exclude", "kube-system, monitoring"),
            ("filter", "verdict=DROPPED"),
            ("window", "60"),
        ]))
        .unwrap();
        assert_eq!(q.window, Duration::from_secs(60));
        let r = q.request(true, None);
        assert!(r.follow);
        assert_eq!(r.whitelist.len(), 2, "shop/ at either end");
        assert_eq!(r.whitelist[0].source_pod, ["shop/"]);
        assert_eq!(r.blacklist.len(), 4, "two namespaces, either end");
        let since = hubble::convert::unix_ns(r.since.as_ref().unwrap());
        assert!(now_ns() - since >= 59_000_000_000);
        // All namespaces: no allow list at all.
        let q = Query::from_params(&params(&[("ns", "*")])).unwrap();
        assert!(q.request(false, None).whitelist.is_empty());
    }

    #[test]
    fn bad_queries_say_what_is_wrong() {
        for (p, want) in [
            (("window", "0"), "between"),
            (("window", "soon"), "seconds"),
            (("filter", "colour=red"), "unknown kind"),
            (("sort", "asc"), "unknown parameter"),
        ] {
            let e = Query::from_params(&params(&[p])).unwrap_err();
            assert!(e.contains(want), "{p:?}: {e}");
        }
    }

    #[test]
    fn the_sampler_keeps_at_most_its_size_in_time_order() {
        let mut s = Sampler::new();
        for i in 0..1000u64 {
            s.offer(GetFlowsResponse {
                response_types: Some(ResponseTypes::Flow(proto::flow::Flow {
                    time: Some(hubble::convert::timestamp(i)),
                    ..Default::default()
                })),
                ..Default::default()
            });
        }
        let (kept, offered) = s.take();
        assert_eq!((kept.len(), offered), (SAMPLE, 1000));
        let times: Vec<u64> = kept
            .iter()
            .map(|r| match &r.response_types {
                Some(ResponseTypes::Flow(f)) => hubble::convert::unix_ns(f.time.as_ref().unwrap()),
                _ => 0,
            })
            .collect();
        assert!(times.windows(2).all(|w| w[0] <= w[1]));
        assert!(
            times.iter().any(|&t| t >= SAMPLE as u64),
            "not only the first ones"
        );
        assert_eq!(s.take().1, 0);
    }
}
