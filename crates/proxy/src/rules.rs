//! A policy's `http` rules, compiled for matching requests (semantics §3.8):
//! `method`, `path` and `host` are full-string regular expressions (RE2
//! semantics, as Envoy's `safe_regex`), `headers` require presence (and a
//! value), `headerMatches` compare exact values or apply their `mismatch`
//! action. A request is allowed when any rule matches; no rules allow all.

use hyper::http::{HeaderMap, HeaderName, HeaderValue};
use regex::Regex;

/// What a rule looks at in a request.
pub struct RequestView<'a> {
    pub method: &'a str,
    /// `:path`: path and query, as Envoy matches it (after normalisation).
    pub path: &'a str,
    /// `:authority` (the Host header for HTTP/1.1).
    pub host: &'a str,
    pub headers: &'a HeaderMap,
}

/// A header change a matching rule's `headerMatches` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HeaderEdit {
    /// ADD: append the value.
    Add(HeaderName, HeaderValue),
    /// REPLACE: set the value.
    Set(HeaderName, HeaderValue),
    /// DELETE.
    Remove(HeaderName),
    /// LOG: the mismatch is only reported.
    Log(HeaderName),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mismatch {
    Deny,
    Log,
    Add,
    Delete,
    Replace,
}

#[derive(Debug)]
struct HeaderMatch {
    name: HeaderName,
    /// `None`: the value lives in a Kubernetes secret this node cannot read,
    /// so it never matches.
    value: Option<HeaderValue>,
    mismatch: Mismatch,
}

#[derive(Debug)]
struct Rule {
    method: Option<Regex>,
    path: Option<Regex>,
    host: Option<Regex>,
    headers: Vec<(HeaderName, Option<String>)>,
    header_matches: Vec<HeaderMatch>,
}

/// The `http` rules of one policy entry, compiled.
#[derive(Debug, Default)]
pub struct HttpRules {
    rules: Vec<Rule>,
}

fn full_match(field: &str, re: &Option<String>) -> Result<Option<Regex>, String> {
    re.as_ref()
        .map(|r| {
            Regex::new(&format!("^(?:{r})$"))
                .map_err(|e| format!("{field}: {r:?} is not a valid regular expression: {e}"))
        })
        .transpose()
}

fn header_name(n: &str) -> Result<HeaderName, String> {
    HeaderName::from_bytes(n.trim().as_bytes()).map_err(|_| format!("{n:?} is not a header name"))
}

impl HttpRules {
    pub fn compile(rules: &[policy::HttpRule]) -> Result<Self, String> {
        let mut out = Vec::with_capacity(rules.len());
        for r in rules {
            let mut headers = Vec::new();
            for h in &r.headers {
                headers.push(match h.split_once(':') {
                    Some((n, v)) => (header_name(n)?, Some(v.trim().to_string())),
                    None => (header_name(h)?, None),
                });
            }
            let mut header_matches = Vec::new();
            for m in &r.header_matches {
                let mismatch = match m.mismatch.as_deref() {
                    None | Some("") => Mismatch::Deny,
                    Some("LOG") => Mismatch::Log,
                    Some("ADD") => Mismatch::Add,
                    Some("DELETE") => Mismatch::Delete,
                    Some("REPLACE") => Mismatch::Replace,
                    Some(other) => return Err(format!("unknown mismatch action {other:?}")),
                };
                header_matches.push(HeaderMatch {
                    name: header_name(&m.name)?,
                    value: m
                        .value
                        .as_deref()
                        .map(|v| {
                            HeaderValue::from_str(v)
                                .map_err(|_| format!("{v:?} is not a header value"))
                        })
                        .transpose()?,
                    mismatch,
                });
            }
            out.push(Rule {
                method: full_match("method", &r.method)?,
                path: full_match("path", &r.path)?,
                host: full_match("host", &r.host)?,
                headers,
                header_matches,
            });
        }
        Ok(Self { rules: out })
    }

    /// `Some(edits)` when the request is allowed, with the header changes
    /// of the first rule that allows it; `None` when no rule does.
    pub fn check(&self, req: &RequestView<'_>) -> Option<Vec<HeaderEdit>> {
        if self.rules.is_empty() {
            return Some(Vec::new());
        }
        let path = normalize_path(req.path);
        self.rules.iter().find_map(|r| r.check(req, &path))
    }
}

impl Rule {
    fn check(&self, req: &RequestView<'_>, path: &str) -> Option<Vec<HeaderEdit>> {
        let re = |re: &Option<Regex>, s: &str| re.as_ref().is_none_or(|re| re.is_match(s));
        if !re(&self.method, req.method) || !re(&self.path, path) || !re(&self.host, req.host) {
            return None;
        }
        for (name, value) in &self.headers {
            let ok = match value {
                None => req.headers.contains_key(name),
                Some(v) => joined_value_is(req.headers, name, v.as_bytes()),
            };
            if !ok {
                return None;
            }
        }
        let mut edits = Vec::new();
        for m in &self.header_matches {
            let matched = m
                .value
                .as_ref()
                .is_some_and(|v| joined_value_is(req.headers, &m.name, v.as_bytes()));
            if matched {
                continue;
            }
            match (m.mismatch, &m.value) {
                (Mismatch::Deny, _) => return None,
                (Mismatch::Log, _) => edits.push(HeaderEdit::Log(m.name.clone())),
                (Mismatch::Delete, _) => edits.push(HeaderEdit::Remove(m.name.clone())),
                (Mismatch::Add, Some(v)) => edits.push(HeaderEdit::Add(m.name.clone(), v.clone())),
                (Mismatch::Replace, Some(v)) => {
                    edits.push(HeaderEdit::Set(m.name.clone(), v.clone()))
                }
                // ADD/REPLACE with a secret's value this node cannot read.
                (Mismatch::Add | Mismatch::Replace, None) => return None,
            }
        }
        Some(edits)
    }
}

/// Whether the value of every field `name` of `headers`, joined with `,`
/// as one header (RFC 9110 §5.3), is `want`: a request carrying `X-Token:
/// wrong` and `X-Token: abc` does not match `X-Token: abc` (the server may
/// act on either; Envoy's fix for CVE-2020-25017). No allocation for the
/// usual single field.
fn joined_value_is(headers: &HeaderMap, name: &HeaderName, want: &[u8]) -> bool {
    let mut fields = headers.get_all(name).iter();
    let Some(first) = fields.next() else {
        return false;
    };
    let mut rest = fields.peekable();
    if rest.peek().is_none() {
        return first.as_bytes() == want;
    }
    let mut joined = first.as_bytes().to_vec();
    for f in rest {
        joined.push(b',');
        joined.extend_from_slice(f.as_bytes());
    }
    joined == want
}

/// What a request target's encoded slashes and backslashes (`%2F`, `%5C`)
/// get: servers disagree on whether they separate segments.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum EscapedSlashes {
    /// 400 (Envoy's `REJECT_REQUEST`).
    #[default]
    Reject,
    /// Decoded to `/`, then resolved like any other slash; the server gets
    /// the result (Envoy's `UNESCAPE_AND_FORWARD`).
    Unescape,
}

impl std::fmt::Display for EscapedSlashes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::Reject => "reject",
            Self::Unescape => "unescape",
        })
    }
}

impl std::str::FromStr for EscapedSlashes {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "reject" => Ok(Self::Reject),
            "unescape" => Ok(Self::Unescape),
            other => Err(format!("expected reject or unescape, found {other:?}")),
        }
    }
}

/// Why a request target is refused (answered 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetError {
    /// Not origin-form (`/path?query`).
    NotOriginForm,
    /// `%2F` or `%5C`: servers disagree on whether it separates segments.
    EscapedSlash,
    /// A `#fragment`: clients never send one; servers cut there.
    Fragment,
    /// A `%` not followed by two hex digits.
    BadPercent,
    /// A control character, a space, a backslash or a non-ASCII byte.
    BadCharacter,
}

impl std::fmt::Display for TargetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::NotOriginForm => "the request target is not a path",
            Self::EscapedSlash => "an encoded slash or backslash (%2F, %5C) in the path",
            Self::Fragment => "a fragment (#) in the request target",
            Self::BadPercent => "a malformed percent-encoding in the path",
            Self::BadCharacter => "a character the request target may not hold",
        })
    }
}

/// The one request target the rules check and the server is sent (so that
/// the server cannot see a path other than the one checked): percent-encoded
/// unreserved characters decoded (RFC 3986 §6.2.2.2) and the other
/// encodings' hex upper-cased (§6.2.2.1), dot segments resolved and
/// repeated slashes merged (Envoy's `normalize_path` and `merge_slashes`);
/// the query is kept. Encoded slashes and backslashes are refused, as
/// Envoy's `path_with_escaped_slashes_action: REJECT_REQUEST` does, and so
/// are fragments, bad encodings and characters a target may not hold.
/// Borrowed when the target is canonical already (nearly always).
/// `EscapedSlashes::Unescape` decodes them to `/` instead (Envoy's
/// `UNESCAPE_AND_FORWARD`, backslashes made slashes as its normaliser does).
pub fn canonical_target(
    target: &str,
    escaped_slashes: EscapedSlashes,
) -> Result<std::borrow::Cow<'_, str>, TargetError> {
    let bytes = target.as_bytes();
    if bytes.first() != Some(&b'/') {
        return Err(TargetError::NotOriginForm);
    }
    let path_end = target.find('?').unwrap_or(target.len());
    let mut needs_decoding = false;
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'#' => return Err(TargetError::Fragment),
            b'\\' | 0..=0x20 | 0x7f.. => return Err(TargetError::BadCharacter),
            // The path's encodings are decoded; the query is the server's.
            b'%' if i < path_end => {
                let hex = |j: usize| bytes.get(j).is_some_and(u8::is_ascii_hexdigit);
                if !hex(i + 1) || !hex(i + 2) {
                    return Err(TargetError::BadPercent);
                }
                needs_decoding = true;
            }
            _ => {}
        }
    }
    if !needs_decoding {
        return Ok(normalize_path(target));
    }
    let (path, query) = target.split_at(path_end);
    let mut decoded = String::with_capacity(target.len());
    let mut rest = path;
    while let Some(at) = rest.find('%') {
        decoded.push_str(&rest[..at]);
        let code =
            u8::from_str_radix(&rest[at + 1..at + 3], 16).map_err(|_| TargetError::BadPercent)?;
        match code {
            b'/' | b'\\' if escaped_slashes == EscapedSlashes::Unescape => decoded.push('/'),
            b'/' | b'\\' => return Err(TargetError::EscapedSlash),
            c if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') => {
                decoded.push(c as char)
            }
            c => {
                decoded.push('%');
                decoded.push_str(&format!("{c:02X}"));
            }
        }
        rest = &rest[at + 3..];
    }
    decoded.push_str(rest);
    decoded.push_str(query);
    Ok(normalize_path(&decoded).into_owned().into())
}

/// Envoy's path normalisation before matching (RFC 3986 dot segments
/// removed, repeated slashes merged); the query is kept as it is. A path
/// that is already normal (most are) is returned as it is, unallocated.
pub fn normalize_path(path_and_query: &str) -> std::borrow::Cow<'_, str> {
    let (path, query) = match path_and_query.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (path_and_query, None),
    };
    let mut segments = path.strip_prefix('/').map(|p| p.split('/').peekable());
    let normal = segments.as_mut().is_some_and(|segments| {
        // Only the last segment may be empty (a trailing slash).
        while let Some(seg) = segments.next() {
            if seg == "." || seg == ".." || seg.is_empty() && segments.peek().is_some() {
                return false;
            }
        }
        true
    });
    if normal {
        return path_and_query.into();
    }
    let mut segments: Vec<&str> = Vec::new();
    let trailing = path.ends_with('/') || path.ends_with("/.") || path.ends_with("/..");
    for seg in path.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(path.len() + 1);
    out.push('/');
    out.push_str(&segments.join("/"));
    if trailing && !segments.is_empty() {
        out.push('/');
    }
    if let Some(q) = query {
        out.push('?');
        out.push_str(q);
    }
    out.into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_canonical_target_is_checked_and_sent() {
        let ok = |raw: &str, want: &str| {
            assert_eq!(
                canonical_target(raw, EscapedSlashes::Reject).as_deref(),
                Ok(want),
                "{raw}"
            );
        };
        // RFC 3986 §5.4 (dot segments) and §6.2.2 (case, unreserved).
        ok("/a/b/c/./../../g", "/a/g");
        ok("/mid/content=5/../6", "/mid/6");
        ok("/%7Euser/%41%42c", "/~user/ABc");
        ok("/a%2db", "/a-b");
        ok("/x%3ay", "/x%3Ay");
        ok("/api/x?q=%2e%2e/../y", "/api/x?q=%2e%2e/../y");
        // Bypasses: encoded dots are dots, so they are resolved.
        for raw in [
            "/api/%2e%2e/admin",
            "/api/%2E%2E/admin",
            "/api/.%2e/admin",
            "/api/%2e./admin",
            "/api/x/%2e%2e/%2e%2e/admin",
        ] {
            ok(raw, "/admin");
        }
        ok("/api//x", "/api/x");
        // What servers read differently is refused.
        let bad = |raw: &str, why: TargetError| {
            assert_eq!(
                canonical_target(raw, EscapedSlashes::Reject),
                Err(why),
                "{raw}"
            )
        };
        for raw in [
            "/api/..%2fadmin",
            "/api/..%2Fadmin",
            "/api/%2e%2e%2fadmin",
            "/api/..%5cadmin",
        ] {
            bad(raw, TargetError::EscapedSlash);
        }
        bad("/admin#/../api/x", TargetError::Fragment);
        bad("/api/..\\admin", TargetError::BadCharacter);
        bad("/api/\u{7f}", TargetError::BadCharacter);
        bad("/api/%zz", TargetError::BadPercent);
        bad("/api/%2", TargetError::BadPercent);
        bad("http://api.example/api/x", TargetError::NotOriginForm);
        bad("*", TargetError::NotOriginForm);
        // Double encoding stays encoded once (the server decodes it once).
        ok("/api/%252e%252e/admin", "/api/%252e%252e/admin");
        ok("/api/x?q=100%", "/api/x?q=100%");
        // Already canonical: not copied.
        assert!(matches!(
            canonical_target("/api/x?y=1", EscapedSlashes::Reject),
            Ok(std::borrow::Cow::Borrowed(_))
        ));
    }

    #[test]
    fn escaped_slashes_can_be_decoded_and_resolved_instead() {
        fn unescaped(raw: &str) -> Result<std::borrow::Cow<'_, str>, TargetError> {
            canonical_target(raw, EscapedSlashes::Unescape)
        }
        assert_eq!(unescaped("/api/..%2fadmin").as_deref(), Ok("/admin"));
        assert_eq!(unescaped("/api/%2e%2e%2Fadmin").as_deref(), Ok("/admin"));
        assert_eq!(unescaped("/api/..%5cadmin").as_deref(), Ok("/admin"));
        assert_eq!(unescaped("/api/a%2Fb").as_deref(), Ok("/api/a/b"));
        // The query is the server's, and the rest is refused as before.
        assert_eq!(unescaped("/a?x=%2F").as_deref(), Ok("/a?x=%2F"));
        assert_eq!(unescaped("/a#x"), Err(TargetError::Fragment));
        assert_eq!("unescape".parse(), Ok(EscapedSlashes::Unescape));
        assert!("keep".parse::<EscapedSlashes>().is_err());
    }

    fn rule(method: Option<&str>, path: Option<&str>) -> policy::HttpRule {
        policy::HttpRule {
            method: method.map(String::from),
            path: path.map(String::from),
            ..Default::default()
        }
    }

    fn check(rules: &HttpRules, method: &str, path: &str, headers: &[(&str, &str)]) -> bool {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        rules
            .check(&RequestView {
                method,
                path,
                host: "backend:8080",
                headers: &map,
            })
            .is_some()
    }

    #[test]
    fn method_and_path_are_full_string_regexes() {
        let r = HttpRules::compile(&[rule(Some("GET"), Some("/api/.*"))]).unwrap();
        assert!(check(&r, "GET", "/api/v1", &[]));
        assert!(check(&r, "GET", "/api/", &[]));
        assert!(check(&r, "GET", "/api/x?y=1", &[]));
        assert!(!check(&r, "POST", "/api/v1", &[]));
        assert!(
            !check(&r, "GETX", "/api/v1", &[]),
            "no implicit prefix match"
        );
        assert!(!check(&r, "GET", "/x/api/v1", &[]), "anchored at the start");
        assert!(!check(&r, "GET", "/api", &[]));
        // Normalised before matching, as Envoy does.
        assert!(check(&r, "GET", "//api//v1", &[]));
        assert!(!check(&r, "GET", "/api/../admin", &[]));
        let public = HttpRules::compile(&[rule(None, Some("/public"))]).unwrap();
        assert!(!check(&public, "GET", "/public/x", &[]));
    }

    #[test]
    fn rules_are_a_union_and_no_rules_allow_everything() {
        let r =
            HttpRules::compile(&[rule(Some("GET"), None), rule(Some("PUT"), Some("/a"))]).unwrap();
        assert!(check(&r, "GET", "/anything", &[]));
        assert!(check(&r, "PUT", "/a", &[]));
        assert!(!check(&r, "PUT", "/b", &[]));
        assert!(check(&HttpRules::compile(&[]).unwrap(), "DELETE", "/", &[]));
        // A rule with no fields matches every request.
        assert!(check(
            &HttpRules::compile(&[rule(None, None)]).unwrap(),
            "DELETE",
            "/",
            &[]
        ));
    }

    #[test]
    fn headers_and_header_matches() {
        let r = HttpRules::compile(&[policy::HttpRule {
            headers: vec!["X-Team".into(), "X-Env: prod".into()],
            ..Default::default()
        }])
        .unwrap();
        assert!(check(&r, "GET", "/", &[("x-team", "a"), ("x-env", "prod")]));
        assert!(!check(&r, "GET", "/", &[("x-env", "prod")]));
        assert!(!check(&r, "GET", "/", &[("x-team", "a"), ("x-env", "dev")]));
        // Duplicates: the joined value must match, not any one of them.
        assert!(!check(
            &r,
            "GET",
            "/",
            &[("x-team", "a"), ("x-env", "dev"), ("x-env", "prod")]
        ));
        assert!(!check(
            &r,
            "GET",
            "/",
            &[("x-team", "a"), ("x-env", "prod"), ("x-env", "dev")]
        ));

        let hm = |mismatch: Option<&str>| {
            HttpRules::compile(&[policy::HttpRule {
                header_matches: vec![policy::HeaderMatch {
                    name: "X-Token".into(),
                    value: Some("s3cret".into()),
                    secret: None,
                    mismatch: mismatch.map(String::from),
                }],
                ..Default::default()
            }])
            .unwrap()
        };
        assert!(check(&hm(None), "GET", "/", &[("x-token", "s3cret")]));
        assert!(!check(&hm(None), "GET", "/", &[("x-token", "other")]));
        assert!(!check(
            &hm(None),
            "GET",
            "/",
            &[("x-token", "wrong"), ("x-token", "s3cret")]
        ));
        let mut map = HeaderMap::new();
        map.insert("x-token", HeaderValue::from_static("other"));
        let view = RequestView {
            method: "GET",
            path: "/",
            host: "h",
            headers: &map,
        };
        assert_eq!(
            hm(Some("REPLACE")).check(&view),
            Some(vec![HeaderEdit::Set(
                HeaderName::from_static("x-token"),
                HeaderValue::from_static("s3cret")
            )])
        );
        assert_eq!(
            hm(Some("DELETE")).check(&view),
            Some(vec![HeaderEdit::Remove(HeaderName::from_static("x-token"))])
        );
    }

    #[test]
    fn bad_regexes_are_refused_at_compile_time() {
        let e = HttpRules::compile(&[rule(Some("GET("), None)]).unwrap_err();
        assert!(e.contains("method") && e.contains("GET("), "{e}");
    }

    #[test]
    fn paths_normalise_like_envoy() {
        assert_eq!(normalize_path("/a/./b/../c"), "/a/c");
        assert_eq!(normalize_path("//a///b/"), "/a/b/");
        assert_eq!(normalize_path("/../../x"), "/x");
        assert_eq!(normalize_path("/a/b?x=/../y"), "/a/b?x=/../y");
        assert_eq!(normalize_path("/"), "/");
        // Already normal: the same string, borrowed.
        for p in ["/", "/a", "/a/b/", "/api/v1?x=/../y", "/a.b/..c/.d"] {
            assert!(
                matches!(normalize_path(p), std::borrow::Cow::Borrowed(s) if s == p),
                "{p}"
            );
        }
        // Not normal: rewritten (the fast path must not take these).
        for (p, want) in [
            ("/a//b", "/a/b"),
            ("/a/.", "/a/"),
            ("/a/..", "/"),
            ("/./a", "/a"),
            ("//", "/"),
            ("", "/"),
            ("*", "/*"),
            ("a/b", "/a/b"),
        ] {
            assert_eq!(normalize_path(p), want, "{p}");
        }
    }
}
