//! Who may see the flows: with a token (`--token-file`), only a browser
//! that came through the address with `?token=` (which sets a cookie and
//! leads on to the page without it), or a client sending `Authorization:
//! Bearer`. A lab starts its UI so: the flows are root's alone (the agent's
//! sockets are), and a page on loopback TCP would open them to every local
//! user. Without a token the UI is open, as Hubble UI is, for installs that
//! put it behind their own access control.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

const COOKIE: &str = "fibril_ui_token";

/// The token, if the UI has one.
#[derive(Clone, Default)]
pub struct Access(pub Option<Arc<str>>);

/// Equal without a timing that says how much of it was right.
fn same(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

fn query_token(query: &str) -> Option<&str> {
    query.split('&').find_map(|kv| kv.strip_prefix("token="))
}

fn cookie_token(req: &Request) -> Option<&str> {
    req.headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(COOKIE)?.strip_prefix('='))
}

fn bearer_token(req: &Request) -> Option<&str> {
    req.headers()
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

pub async fn guard(State(access): State<Access>, req: Request, next: Next) -> Response {
    let Some(token) = access.0.as_deref() else {
        return next.run(req).await;
    };
    if req.uri().path() == "/healthz" {
        return next.run(req).await;
    }
    if let Some(given) = req.uri().query().and_then(query_token) {
        if same(given, token) {
            // The cookie, then the same page without the token in its
            // address (nor in the browser's history).
            return (
                StatusCode::SEE_OTHER,
                [
                    (header::LOCATION, req.uri().path().to_string()),
                    (
                        header::SET_COOKIE,
                        format!("{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict"),
                    ),
                ],
            )
                .into_response();
        }
    }
    let held = cookie_token(&req).or_else(|| bearer_token(&req));
    if held.is_some_and(|t| same(t, token)) {
        return next.run(req).await;
    }
    (
        StatusCode::UNAUTHORIZED,
        "this UI shows a lab's flows to whoever holds its token: open the address `fibril lab up` \
         printed (it ends in ?token=...)\n",
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    #[test]
    fn tokens_compare_whole_and_come_from_the_query() {
        assert!(super::same("abc", "abc"));
        assert!(!super::same("abc", "abd"));
        assert!(!super::same("abc", "abcd"));
        assert_eq!(super::query_token("ns=x&token=t1"), Some("t1"));
        assert_eq!(super::query_token("ns=x"), None);
    }
}
