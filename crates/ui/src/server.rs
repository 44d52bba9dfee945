//! The UI's HTTP side: the page (built by `build.rs` and embedded here, so
//! the running UI needs no Node.js), one push channel per open page
//! (server-sent events), the export, and small lookups.

use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Query as UrlQuery, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use proto::observer::observer_client::ObserverClient;
use tokio_stream::wrappers::ReceiverStream;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

use crate::selection::Selections;
use crate::session::{self, Query};

const INDEX: &str = include_str!(concat!(env!("OUT_DIR"), "/web/index.html"));
const APP_JS: &str = include_str!(concat!(env!("OUT_DIR"), "/web/app.js"));
const APP_CSS: &str = include_str!(concat!(env!("OUT_DIR"), "/web/app.css"));

/// Pushes a page may fall behind by before it misses some.
const PUSH_BACKLOG: usize = 16;

#[derive(Clone)]
pub struct App {
    pub relay: ObserverClient<Channel>,
    pub selections: Selections,
    /// Pages open now (the policy lookups run only while one is).
    pub open: Arc<AtomicUsize>,
    pub access: crate::access::Access,
}

impl App {
    pub fn new(relay: Channel, selections: Selections) -> App {
        App {
            relay: ObserverClient::new(relay).max_decoding_message_size(64 << 20),
            selections,
            open: Arc::default(),
            access: Default::default(),
        }
    }
}

pub fn router(app: App) -> Router {
    Router::new()
        .route(
            "/",
            get(|| async { asset("text/html; charset=utf-8", INDEX) }),
        )
        .route(
            "/app.js",
            get(|| async { asset("text/javascript", APP_JS) }),
        )
        .route("/app.css", get(|| async { asset("text/css", APP_CSS) }))
        .route("/healthz", get(|| async { "ok" }))
        .route("/api/events", get(events))
        .route("/api/export", get(export))
        .route("/api/filters", get(filters))
        .route("/api/namespaces", get(namespaces))
        .route("/api/status", get(status))
        .layer(axum::middleware::from_fn_with_state(
            app.access.clone(),
            crate::access::guard,
        ))
        .with_state(app)
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    ([(header::CONTENT_TYPE, content_type)], body).into_response()
}

fn bad_request(msg: String) -> Response {
    (StatusCode::BAD_REQUEST, msg).into_response()
}

fn unavailable(e: tonic::Status) -> Response {
    (
        StatusCode::BAD_GATEWAY,
        format!("the relay did not answer: {}", e.message()),
    )
        .into_response()
}

/// Decrements the open-page count when the page's stream goes.
struct Open(Arc<AtomicUsize>);

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

async fn events(
    State(app): State<App>,
    UrlQuery(params): UrlQuery<Vec<(String, String)>>,
) -> Response {
    let query = match Query::from_params(&params) {
        Ok(q) => q,
        Err(e) => return bad_request(e),
    };
    let (tx, rx) = tokio::sync::mpsc::channel(PUSH_BACKLOG);
    if app.open.fetch_add(1, Ordering::Relaxed) == 0 {
        // The first page: the lookups were idle; do not wait for the next.
        let selections = app.selections.clone();
        tokio::task::spawn_blocking(move || selections.refresh());
    }
    let open = Open(app.open.clone());
    tokio::spawn(session::run(
        app.relay.clone(),
        app.selections.clone(),
        query,
        tx,
    ));
    let stream = ReceiverStream::new(rx).map(move |(name, data)| {
        let _alive = &open;
        Ok::<_, Infallible>(Event::default().event(name).data(data))
    });
    Sse::new(stream)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(10)))
        .into_response()
}

/// The flows in view (the page's query and window) as `hubble observe -o
/// jsonpb` lines, which hubble-audit2policy and `--input-file` read.
async fn export(
    State(app): State<App>,
    UrlQuery(params): UrlQuery<Vec<(String, String)>>,
) -> Response {
    let query = match Query::from_params(&params) {
        Ok(q) => q,
        Err(e) => return bad_request(e),
    };
    let stream = match app
        .relay
        .clone()
        .get_flows(query.request(false, None))
        .await
    {
        Ok(s) => s.into_inner(),
        Err(e) => return unavailable(e),
    };
    let lines = stream.filter_map(|r| match r {
        Ok(r) => session::flow_json(&r).map(|mut line| {
            line.push('\n');
            Ok::<_, std::io::Error>(line)
        }),
        Err(e) => Some(Err(std::io::Error::other(e.message().to_string()))),
    });
    (
        [
            (header::CONTENT_TYPE, "application/x-ndjson"),
            (
                header::CONTENT_DISPOSITION,
                "attachment; filename=\"flows.json\"",
            ),
        ],
        Body::from_stream(lines),
    )
        .into_response()
}

/// The query's allow and deny lists in Hubble's JSON (what `hubble observe
/// --print-raw-filters` shows), or what is wrong with it: the page checks
/// a query here before it opens the push channel.
async fn filters(UrlQuery(params): UrlQuery<Vec<(String, String)>>) -> Response {
    let lists = match Query::from_params(&params).and_then(|q| q.lists()) {
        Ok(l) => l,
        Err(e) => return bad_request(e),
    };
    let json = |fs: &[proto::flow::FlowFilter]| -> Vec<serde_json::Value> {
        fs.iter()
            .filter_map(|f| serde_json::from_str(&hubble::json::filter_to_json(f)).ok())
            .collect()
    };
    axum::Json(serde_json::json!({"allowlist": json(&lists.allow), "denylist": json(&lists.deny)}))
        .into_response()
}

async fn namespaces(State(app): State<App>) -> Response {
    match app
        .relay
        .clone()
        .get_namespaces(proto::observer::GetNamespacesRequest {})
        .await
    {
        Ok(r) => {
            let mut names: Vec<String> = r
                .into_inner()
                .namespaces
                .into_iter()
                .map(|n| n.namespace)
                .collect();
            names.sort();
            names.dedup();
            axum::Json(names).into_response()
        }
        Err(e) => unavailable(e),
    }
}

async fn status(State(app): State<App>) -> Response {
    match app
        .relay
        .clone()
        .server_status(proto::observer::ServerStatusRequest {})
        .await
    {
        Ok(r) => {
            let s = r.into_inner();
            axum::Json(serde_json::json!({
                "num_flows": s.num_flows,
                "max_flows": s.max_flows,
                "seen_flows": s.seen_flows,
                "flows_rate": s.flows_rate,
                "version": s.version,
                "num_connected_nodes": s.num_connected_nodes,
                "num_unavailable_nodes": s.num_unavailable_nodes,
                "unavailable_nodes": s.unavailable_nodes,
            }))
            .into_response()
        }
        Err(e) => unavailable(e),
    }
}

/// A channel to the relay (or one agent's Hubble server): `unix:///path`
/// or `host:port`; it connects on first use and again after failures.
pub fn relay_channel(address: &str) -> anyhow::Result<Channel> {
    if let Some(path) = address
        .strip_prefix("unix://")
        .or_else(|| address.strip_prefix("unix:"))
    {
        let connector = hubble::client::unix_connector(path.into());
        return Ok(tonic::transport::Endpoint::from_static("http://localhost")
            .connect_timeout(Duration::from_secs(2))
            .connect_with_connector_lazy(connector));
    }
    let host_port = address.strip_prefix("http://").unwrap_or(address);
    Ok(
        tonic::transport::Endpoint::from_shared(format!("http://{host_port}"))
            .map_err(|e| anyhow::anyhow!("--relay {address:?} is not an address: {e}"))?
            .connect_timeout(Duration::from_secs(2))
            .connect_lazy(),
    )
}
