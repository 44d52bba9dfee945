//! The UI's filters, as Hubble UI writes them (`[from:|to:]kind=value`,
//! `!` to negate), turned into Hubble's allow and deny lists so the relay
//! and the agents filter, not the UI.
//!
//! Entries are ANDed. Hubble's `FlowFilter` ORs the values of one field and
//! ANDs its fields, and an allow list ORs its filters; so the allow list is
//! the product of every positive entry's alternatives (an entry without
//! `from:`/`to:` matches either end: two alternatives), each product one
//! filter. Negated entries go to the deny list, where matching any filter
//! excludes the flow: NOT(a OR b) for each, ANDed.

use std::collections::BTreeMap;

use proto::flow::FlowFilter;

/// The most filter entries on either end (`pod=`, `ip=`, ...): each doubles
/// the allow list.
pub const MAX_EITHER_END: usize = 8;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Either,
    From,
    To,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Label,
    Pod,
    Namespace,
    Workload,
    Ip,
    Dns,
    Identity,
    Port,
    Verdict,
    Protocol,
    HttpStatus,
    HttpMethod,
    DnsQuery,
    Reply,
}

impl Kind {
    fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "label" => Kind::Label,
            "pod" => Kind::Pod,
            "namespace" | "ns" => Kind::Namespace,
            "workload" => Kind::Workload,
            "ip" => Kind::Ip,
            "dns" | "fqdn" => Kind::Dns,
            "identity" => Kind::Identity,
            "port" => Kind::Port,
            "verdict" => Kind::Verdict,
            "protocol" => Kind::Protocol,
            "http-status" => Kind::HttpStatus,
            "http-method" => Kind::HttpMethod,
            "dns-query" => Kind::DnsQuery,
            "reply" => Kind::Reply,
            _ => return None,
        })
    }

    /// Kinds about the flow as a whole, not one of its ends.
    fn whole_flow(self) -> bool {
        matches!(
            self,
            Kind::Verdict
                | Kind::Protocol
                | Kind::HttpStatus
                | Kind::HttpMethod
                | Kind::DnsQuery
                | Kind::Reply
        )
    }
}

/// What the filters can say; `help` lists it for the page.
pub const KINDS: &str = "label, pod, namespace, workload, ip, dns, identity, port (either end; \
     from:/to: for one), verdict, protocol, http-status, http-method, dns-query, reply (true/false)";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub negated: bool,
    pub side: Side,
    pub kind: Kind,
    pub value: String,
}

impl Entry {
    /// `[!][from:|to:]kind=value`.
    pub fn parse(text: &str) -> Result<Entry, String> {
        let t = text.trim();
        let (negated, t) = match t.strip_prefix('!') {
            Some(rest) => (true, rest.trim_start()),
            None => (false, t),
        };
        let (side, t) = if let Some(rest) = t.strip_prefix("from:") {
            (Side::From, rest)
        } else if let Some(rest) = t.strip_prefix("to:") {
            (Side::To, rest)
        } else {
            (Side::Either, t)
        };
        let (kind, value) = t
            .split_once('=')
            .ok_or_else(|| format!("filter {text:?}: give kind=value (kinds: {KINDS})"))?;
        let kind = Kind::parse(kind.trim())
            .ok_or_else(|| format!("filter {text:?}: unknown kind {kind:?} (kinds: {KINDS})"))?;
        let value = value.trim().to_string();
        if value.is_empty() {
            return Err(format!("filter {text:?}: the value is empty"));
        }
        if kind.whole_flow() && side != Side::Either {
            return Err(format!(
                "filter {text:?}: {kind:?} is about the whole flow, not one end (drop from:/to:)"
            ));
        }
        let value = match kind {
            Kind::Namespace => format!("{}/", value.trim_end_matches('/')),
            Kind::Verdict => {
                let v = value.to_ascii_uppercase();
                if proto::flow::Verdict::from_str_name(&v).is_none() {
                    return Err(format!(
                        "filter {text:?}: no verdict {value:?} (FORWARDED, DROPPED, AUDIT, ERROR, ...)"
                    ));
                }
                v
            }
            Kind::Identity => {
                value
                    .parse::<u32>()
                    .map_err(|_| format!("filter {text:?}: an identity is a number"))?;
                value
            }
            Kind::Port => {
                value
                    .parse::<u16>()
                    .map_err(|_| format!("filter {text:?}: a port is 0-65535"))?;
                value
            }
            Kind::Ip => {
                if value.parse::<std::net::IpAddr>().is_err()
                    && value.parse::<ipnet::IpNet>().is_err()
                {
                    return Err(format!(
                        "filter {text:?}: {value:?} is neither an address nor a CIDR"
                    ));
                }
                value
            }
            Kind::HttpMethod => value.to_ascii_uppercase(),
            Kind::Reply => match value.to_ascii_lowercase().as_str() {
                v @ ("true" | "false") => v.to_string(),
                _ => return Err(format!("filter {text:?}: reply is true or false")),
            },
            Kind::Protocol => value.to_ascii_lowercase(),
            _ => value,
        };
        Ok(Entry {
            negated,
            side,
            kind,
            value,
        })
    }

    /// The (field, value) pairs of which the entry needs one.
    fn alternatives(&self) -> Vec<(Field, String)> {
        let sides: &[bool] = match self.side {
            Side::Either => &[true, false],
            Side::From => &[true],
            Side::To => &[false],
        };
        if self.kind.whole_flow() {
            return vec![(Field::Whole(self.kind), self.value.clone())];
        }
        sides
            .iter()
            .map(|&source| {
                // A namespace is a pod prefix to Hubble (`ns/`).
                let kind = match self.kind {
                    Kind::Namespace => Kind::Pod,
                    k => k,
                };
                (Field::End { source, kind }, self.value.clone())
            })
            .collect()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Field {
    End { source: bool, kind: Kind },
    Whole(Kind),
}

/// One conjunct: each field's single value (entries have one value each).
type Conjunct = BTreeMap<Field, String>;

/// Adds `value` to `field`, or says the two can never both hold.
fn and(c: &mut Conjunct, field: Field, value: &str) -> bool {
    let Some(old) = c.get_mut(&field) else {
        c.insert(field, value.to_string());
        return true;
    };
    if old == value {
        return true;
    }
    match field {
        // Label selectors AND with a comma.
        Field::End {
            kind: Kind::Label, ..
        } => {
            *old = format!("{old},{value}");
            true
        }
        // A namespace (`ns/`) and a pod in it: the pod.
        Field::End {
            kind: Kind::Pod, ..
        } => {
            if old.ends_with('/') && value.starts_with(old.as_str()) {
                *old = value.to_string();
                true
            } else {
                value.ends_with('/') && old.starts_with(value)
            }
        }
        _ => false,
    }
}

/// Hubble's allow and deny lists for the entries.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Lists {
    pub allow: Vec<FlowFilter>,
    pub deny: Vec<FlowFilter>,
}

pub fn lists(entries: &[Entry]) -> Result<Lists, String> {
    let either = entries
        .iter()
        .filter(|e| !e.negated && e.side == Side::Either && !e.kind.whole_flow())
        .count();
    if either > MAX_EITHER_END {
        return Err(format!(
            "at most {MAX_EITHER_END} filters without from:/to: (each doubles the query)"
        ));
    }
    let mut conjuncts: Vec<Conjunct> = vec![Conjunct::new()];
    for e in entries.iter().filter(|e| !e.negated) {
        let mut next = Vec::new();
        for c in &conjuncts {
            for (field, value) in e.alternatives() {
                let mut c = c.clone();
                if and(&mut c, field, &value) && !next.contains(&c) {
                    next.push(c);
                }
            }
        }
        if next.is_empty() {
            return Err(format!(
                "no flow can match every filter (the last that cannot hold with the others: {})",
                e.value
            ));
        }
        conjuncts = next;
    }
    let allow = if entries.iter().any(|e| !e.negated) {
        conjuncts.iter().map(to_filter).collect()
    } else {
        Vec::new()
    };
    let deny = entries
        .iter()
        .filter(|e| e.negated)
        .flat_map(|e| e.alternatives())
        .map(|(field, value)| to_filter(&Conjunct::from([(field, value)])))
        .collect();
    Ok(Lists { allow, deny })
}

fn to_filter(c: &Conjunct) -> FlowFilter {
    let mut f = FlowFilter::default();
    for (field, value) in c {
        let v = vec![value.clone()];
        match *field {
            Field::End { source, kind } => {
                let slot = match (kind, source) {
                    (Kind::Label, true) => &mut f.source_label,
                    (Kind::Label, false) => &mut f.destination_label,
                    (Kind::Pod | Kind::Namespace, true) => &mut f.source_pod,
                    (Kind::Pod | Kind::Namespace, false) => &mut f.destination_pod,
                    (Kind::Ip, true) => &mut f.source_ip,
                    (Kind::Ip, false) => &mut f.destination_ip,
                    (Kind::Dns, true) => &mut f.source_fqdn,
                    (Kind::Dns, false) => &mut f.destination_fqdn,
                    (Kind::Port, true) => &mut f.source_port,
                    (Kind::Port, false) => &mut f.destination_port,
                    (Kind::Identity, source) => {
                        let id = value.parse().unwrap_or_default();
                        if source {
                            f.source_identity.push(id);
                        } else {
                            f.destination_identity.push(id);
                        }
                        continue;
                    }
                    (Kind::Workload, source) => {
                        let (kind, name) = match value.split_once('/') {
                            Some((k, n)) => (k.to_string(), n.to_string()),
                            None => (String::new(), value.clone()),
                        };
                        let w = proto::flow::Workload { name, kind };
                        if source {
                            f.source_workload.push(w);
                        } else {
                            f.destination_workload.push(w);
                        }
                        continue;
                    }
                    _ => continue,
                };
                *slot = v;
            }
            Field::Whole(kind) => match kind {
                Kind::Verdict => {
                    f.verdict = proto::flow::Verdict::from_str_name(value)
                        .map(|v| vec![v as i32])
                        .unwrap_or_default()
                }
                Kind::Protocol => f.protocol = v,
                Kind::HttpStatus => f.http_status_code = v,
                Kind::HttpMethod => f.http_method = v,
                Kind::DnsQuery => f.dns_query = v,
                Kind::Reply => f.reply = vec![value == "true"],
                _ => {}
            },
        }
    }
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(texts: &[&str]) -> Result<Lists, String> {
        let entries: Vec<Entry> = texts
            .iter()
            .map(|t| Entry::parse(t))
            .collect::<Result<_, _>>()?;
        lists(&entries)
    }

    #[test]
    fn grammar_side_kind_value_and_negation() {
        let e = Entry::parse("!from:label=app=frontend").unwrap();
        assert_eq!(
            e,
            Entry {
                negated: true,
                side: Side::From,
                kind: Kind::Label,
                value: "app=frontend".into()
            }
        );
        assert_eq!(Entry::parse("to:namespace=shop").unwrap().value, "shop/");
        assert!(Entry::parse("pod").unwrap_err().contains("give kind=value"));
        assert!(Entry::parse("colour=red")
            .unwrap_err()
            .contains("unknown kind"));
        assert!(Entry::parse("from:verdict=DROPPED")
            .unwrap_err()
            .contains("whole flow"));
        assert!(Entry::parse("ip=10.0.0.300")
            .unwrap_err()
            .contains("neither"));
        assert!(Entry::parse("verdict=SMILED")
            .unwrap_err()
            .contains("no verdict"));
        assert!(Entry::parse("port=70000").unwrap_err().contains("0-65535"));
        assert!(Entry::parse("reply=maybe")
            .unwrap_err()
            .contains("true or false"));
        let requests = parse(&["reply=false"]).unwrap();
        assert_eq!(requests.allow[0].reply, [false]);
    }

    #[test]
    fn either_end_is_two_alternatives_and_entries_and() {
        let l = parse(&["pod=default/a", "verdict=dropped"]).unwrap();
        assert_eq!(l.allow.len(), 2);
        assert_eq!(l.allow[0].source_pod, ["default/a"]);
        assert_eq!(l.allow[1].destination_pod, ["default/a"]);
        for f in &l.allow {
            assert_eq!(f.verdict, [proto::flow::Verdict::Dropped as i32]);
        }
        // Two addresses on either end: only the pairs across ends remain.
        let l = parse(&["ip=10.0.0.1", "ip=10.0.0.2"]).unwrap();
        assert_eq!(l.allow.len(), 2);
        assert_eq!(l.allow[0].source_ip, ["10.0.0.1"]);
        assert_eq!(l.allow[0].destination_ip, ["10.0.0.2"]);
        assert_eq!(l.allow[1].source_ip, ["10.0.0.2"]);
        assert_eq!(l.allow[1].destination_ip, ["10.0.0.1"]);
    }

    #[test]
    fn labels_and_namespaces_narrow_instead_of_conflicting() {
        let l = parse(&["from:label=app=a", "from:label=tier=web"]).unwrap();
        assert_eq!(l.allow.len(), 1);
        assert_eq!(l.allow[0].source_label, ["app=a,tier=web"]);
        let l = parse(&["from:namespace=shop", "from:pod=shop/cart"]).unwrap();
        assert_eq!(l.allow.len(), 1);
        assert_eq!(l.allow[0].source_pod, ["shop/cart"]);
        assert!(parse(&["from:pod=a/x", "from:pod=a/y"])
            .unwrap_err()
            .contains("no flow can match"));
    }

    #[test]
    fn negations_deny_either_end() {
        let l = parse(&["!namespace=kube-system", "!to:dns=example.com"]).unwrap();
        assert!(l.allow.is_empty(), "nothing positive: everything allowed");
        assert_eq!(l.deny.len(), 3);
        assert_eq!(l.deny[0].source_pod, ["kube-system/"]);
        assert_eq!(l.deny[1].destination_pod, ["kube-system/"]);
        assert_eq!(l.deny[2].destination_fqdn, ["example.com"]);
    }

    #[test]
    fn the_product_is_bounded() {
        let many: Vec<String> = (0..=MAX_EITHER_END)
            .map(|i| format!("label=k{i}=v"))
            .collect();
        let texts: Vec<&str> = many.iter().map(String::as_str).collect();
        assert!(parse(&texts).unwrap_err().contains("at most"));
    }
}
