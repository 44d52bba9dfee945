//! `cargo xtask bench --only l7`, first part: what canonicalising a request
//! target costs (`rules::canonical_target`, called for every request on
//! both proxy paths), in ns per call, next to what the rule check of the
//! same request costs. A proxied request costs tens of µs of CPU (see the
//! L7 figures that follow), so the ratio of these to it is the share of the
//! direct path's rate that canonicalising can take.

use std::hint::black_box;
use std::time::Instant;

use fibril_proxy::rules::{canonical_target, EscapedSlashes, HttpRules, RequestView};

const CALLS: u32 = 2_000_000;
const ROUNDS: usize = 5;

/// Median ns per call of `f` over `ROUNDS` rounds of `CALLS` calls.
fn ns_per_call(mut f: impl FnMut()) -> f64 {
    let mut rounds: Vec<f64> = (0..ROUNDS)
        .map(|_| {
            let started = Instant::now();
            for _ in 0..CALLS {
                f();
            }
            started.elapsed().as_nanos() as f64 / CALLS as f64
        })
        .collect();
    rounds.sort_by(f64::total_cmp);
    rounds[ROUNDS / 2]
}

fn main() {
    let rules = HttpRules::compile(&[policy::HttpRule {
        method: Some("GET".into()),
        path: Some("/api/.*".into()),
        ..Default::default()
    }])
    .expect("rules compile");
    let headers = hyper::http::HeaderMap::new();
    println!(
        "{:<44} {:>14} {:>14}",
        "target", "canonical ns", "rule check ns"
    );
    for target in [
        "/",
        "/api/items",
        "/api/v1/users/12345/orders?expand=true&page=2",
        "/api/%78y/../items",
    ] {
        let canonical = ns_per_call(|| {
            let _ = black_box(canonical_target(black_box(target), EscapedSlashes::Reject));
        });
        let check = ns_per_call(|| {
            let view = RequestView {
                method: "GET",
                path: black_box(target),
                host: "api",
                headers: &headers,
            };
            black_box(rules.check(&view));
        });
        println!("{target:<44} {canonical:>14.1} {check:>14.1}");
    }
}
