//! A policy's `kafka` rules, compiled for matching requests, with Cilium's
//! semantics (its `pkg/kafka` and `pkg/policy/api/kafka`): a rule names an
//! `apiKey` or a `role` (never both; neither: every key), optionally an
//! `apiVersion`, a `clientID` and a `topic`. A request is allowed when some
//! rule matches it; a request naming several topics needs every topic
//! allowed, by the same or different rules. A rule's topic is ignored for
//! keys whose requests carry no topic. No rules: everything is allowed.

pub const PRODUCE: i16 = 0;
pub const FETCH: i16 = 1;
pub const LIST_OFFSETS: i16 = 2;
pub const METADATA: i16 = 3;
pub const OFFSET_COMMIT: i16 = 8;
pub const OFFSET_FETCH: i16 = 9;
pub const FIND_COORDINATOR: i16 = 10;
pub const JOIN_GROUP: i16 = 11;
pub const HEARTBEAT: i16 = 12;
pub const LEAVE_GROUP: i16 = 13;
pub const SYNC_GROUP: i16 = 14;
pub const API_VERSIONS: i16 = 18;
pub const CREATE_TOPICS: i16 = 19;
pub const DELETE_TOPICS: i16 = 20;
pub const INIT_PRODUCER_ID: i16 = 22;

/// The name flows and metrics give a key: Cilium's, else the number.
pub fn api_key_name(key: i16) -> String {
    usize::try_from(key)
        .ok()
        .and_then(|k| policy::KAFKA_API_KEYS.get(k))
        .map_or_else(|| key.to_string(), |n| (*n).to_string())
}

/// Whether requests of `key` carry topics: Cilium's list (`isTopicAPIKey`)
/// and the newer requests that name topics (OffsetDelete, the share-group
/// fetch and acknowledge, DescribeTopicPartitions).
pub fn carries_topics(key: i16) -> bool {
    matches!(
        key,
        0 | 1
            | 2
            | 3
            | 4
            | 5
            | 6
            | 8
            | 9
            | 19
            | 20
            | 21
            | 23
            | 24
            | 27
            | 28
            | 34
            | 35
            | 37
            | 47
            | 75
            | 78
            | 79
    )
}

/// What the rules look at in a request.
#[derive(Clone, Debug, Default)]
pub struct RequestView<'a> {
    pub api_key: i16,
    pub api_version: i16,
    pub client_id: &'a str,
    /// The topics it names; `None` when they could not be read (a version
    /// or key the proxy cannot decode, a topic ID it has not learned): no
    /// rule with a topic then matches it.
    pub topics: Option<&'a [String]>,
    /// InitProducerId: the request names a transactional ID.
    pub transactional: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct Rule {
    /// Empty: every key.
    api_keys: Vec<i16>,
    /// `role: produce`: also a non-transactional InitProducerId.
    idempotent_producer: bool,
    api_version: Option<i16>,
    client_id: Option<String>,
    topic: Option<String>,
}

impl Rule {
    /// Everything but the topic.
    fn matches_request(&self, r: &RequestView) -> bool {
        let key_ok = self.api_keys.is_empty()
            || self.api_keys.contains(&r.api_key)
            || (self.idempotent_producer && r.api_key == INIT_PRODUCER_ID && !r.transactional);
        key_ok
            && self.api_version.is_none_or(|v| v == r.api_version)
            && self.client_id.as_deref().is_none_or(|c| c == r.client_id)
    }
}

/// The `kafka` rules of one policy entry, compiled.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KafkaRules {
    rules: Vec<Rule>,
}

impl KafkaRules {
    /// Import validated the rules; anything still wrong is refused here
    /// rather than matched loosely.
    pub fn compile(rules: &[policy::KafkaRule]) -> Result<Self, String> {
        let mut out = Vec::with_capacity(rules.len());
        for r in rules {
            let nonempty = |s: &Option<String>| s.clone().filter(|s| !s.is_empty());
            let (role, key) = (nonempty(&r.role), nonempty(&r.api_key));
            let mut idempotent_producer = false;
            let api_keys = match (role, key) {
                (Some(_), Some(_)) => return Err("role and apiKey cannot both be set".into()),
                (Some(role), None) => match role.to_ascii_lowercase().as_str() {
                    // Cilium's expansion, plus InitProducerId without a
                    // transactional ID: every Kafka client since 3.0 is
                    // idempotent by default and asks for a producer ID
                    // before producing (Kafka's own authorizer counts it
                    // as part of writing to a topic).
                    "produce" => {
                        idempotent_producer = true;
                        vec![PRODUCE, METADATA, API_VERSIONS]
                    }
                    "consume" => vec![
                        FETCH,
                        LIST_OFFSETS,
                        METADATA,
                        OFFSET_COMMIT,
                        OFFSET_FETCH,
                        FIND_COORDINATOR,
                        JOIN_GROUP,
                        HEARTBEAT,
                        LEAVE_GROUP,
                        SYNC_GROUP,
                        API_VERSIONS,
                    ],
                    other => return Err(format!("role {other:?}: produce or consume")),
                },
                (None, Some(key)) => vec![policy::kafka_api_key(&key)
                    .ok_or_else(|| format!("apiKey {key:?} is not one of Kafka's API keys"))?],
                (None, None) => Vec::new(),
            };
            let api_version = match nonempty(&r.api_version) {
                Some(v) => Some(
                    v.parse::<i16>()
                        .ok()
                        .filter(|v| *v >= 0)
                        .ok_or_else(|| format!("apiVersion {v:?} is not a version"))?,
                ),
                None => None,
            };
            out.push(Rule {
                api_keys,
                idempotent_producer,
                api_version,
                client_id: nonempty(&r.client_id),
                topic: nonempty(&r.topic),
            });
        }
        Ok(Self { rules: out })
    }

    /// Whether the rules allow a request.
    pub fn allows(&self, r: &RequestView) -> bool {
        if self.rules.is_empty() {
            return true;
        }
        let topic_request = carries_topics(r.api_key);
        // The request's topics that no rule has allowed yet.
        let mut pending: Option<Vec<&str>> = match (topic_request, r.topics) {
            (true, Some(t)) => {
                let mut t: Vec<&str> = t.iter().map(String::as_str).collect();
                t.sort_unstable();
                t.dedup();
                Some(t)
            }
            _ => None,
        };
        for rule in &self.rules {
            if !rule.matches_request(r) {
                continue;
            }
            let Some(topic) = rule.topic.as_deref().filter(|_| topic_request) else {
                // No topic constraint, or a request without topics.
                return true;
            };
            // Unknown topics: a topic rule cannot vouch for them.
            let Some(p) = pending.as_mut() else { continue };
            if let Some(i) = p.iter().position(|t| *t == topic) {
                p.remove(i);
                if p.is_empty() {
                    return true;
                }
            }
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(role: &str, key: &str, version: &str, client: &str, topic: &str) -> policy::KafkaRule {
        let s = |v: &str| (!v.is_empty()).then(|| v.to_string());
        policy::KafkaRule {
            role: s(role),
            api_key: s(key),
            api_version: s(version),
            client_id: s(client),
            topic: s(topic),
        }
    }

    fn req<'a>(key: i16, topics: &'a [String]) -> RequestView<'a> {
        RequestView {
            api_key: key,
            api_version: 9,
            client_id: "empire",
            topics: Some(topics),
            transactional: false,
        }
    }

    fn topics(t: &[&str]) -> Vec<String> {
        t.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn no_rules_allow_everything() {
        let r = KafkaRules::compile(&[]).unwrap();
        assert!(r.allows(&req(PRODUCE, &topics(&["anything"]))));
    }

    #[test]
    fn the_star_wars_produce_rules() {
        // kafka.yaml: empire-hq may produce to two topics, ask metadata
        // and API versions.
        let r = KafkaRules::compile(&[
            rule("", "apiversions", "", "", ""),
            rule("", "metadata", "", "", ""),
            rule("", "produce", "", "", "deathstar-plans"),
            rule("", "produce", "", "", "empire-announce"),
        ])
        .unwrap();
        assert!(r.allows(&req(PRODUCE, &topics(&["deathstar-plans"]))));
        assert!(r.allows(&req(
            PRODUCE,
            &topics(&["empire-announce", "deathstar-plans"])
        )));
        assert!(!r.allows(&req(PRODUCE, &topics(&["empire-announce", "rebel-plans"]))));
        assert!(!r.allows(&req(FETCH, &topics(&["deathstar-plans"]))));
        // Metadata has no topic constraint here: any topic, or all of them.
        assert!(r.allows(&req(METADATA, &topics(&["rebel-plans"]))));
        assert!(r.allows(&req(METADATA, &[])));
        assert!(r.allows(&req(API_VERSIONS, &[])));
        // The apiKey list names no InitProducerId.
        assert!(!r.allows(&req(INIT_PRODUCER_ID, &[])));
    }

    #[test]
    fn roles_expand_to_their_keys() {
        let consume =
            KafkaRules::compile(&[rule("consume", "", "", "", "empire-announce")]).unwrap();
        for key in [FETCH, LIST_OFFSETS, OFFSET_COMMIT, OFFSET_FETCH] {
            assert!(
                consume.allows(&req(key, &topics(&["empire-announce"]))),
                "{key}"
            );
            assert!(
                !consume.allows(&req(key, &topics(&["deathstar-plans"]))),
                "{key}"
            );
        }
        // Group keys carry no topic: the rule's topic does not apply.
        for key in [
            FIND_COORDINATOR,
            JOIN_GROUP,
            HEARTBEAT,
            LEAVE_GROUP,
            SYNC_GROUP,
            API_VERSIONS,
        ] {
            assert!(consume.allows(&req(key, &[])), "{key}");
        }
        assert!(!consume.allows(&req(PRODUCE, &topics(&["empire-announce"]))));
        let produce =
            KafkaRules::compile(&[rule("Produce", "", "", "", "deathstar-plans")]).unwrap();
        assert!(produce.allows(&req(PRODUCE, &topics(&["deathstar-plans"]))));
        assert!(!produce.allows(&req(FETCH, &topics(&["deathstar-plans"]))));
        assert!(!produce.allows(&req(JOIN_GROUP, &[])));
        // An idempotent producer's InitProducerId, not a transactional one.
        assert!(produce.allows(&req(INIT_PRODUCER_ID, &[])));
        let txn = RequestView {
            transactional: true,
            ..req(INIT_PRODUCER_ID, &[])
        };
        assert!(!produce.allows(&txn));
    }

    #[test]
    fn version_and_client_id_must_match() {
        let r = KafkaRules::compile(&[rule("", "produce", "9", "empire", "")]).unwrap();
        assert!(r.allows(&req(PRODUCE, &topics(&["x"]))));
        let other_version = RequestView {
            api_version: 8,
            ..req(PRODUCE, &[])
        };
        assert!(!r.allows(&other_version));
        let other_client = RequestView {
            client_id: "rebel",
            ..req(PRODUCE, &[])
        };
        assert!(!r.allows(&other_client));
    }

    #[test]
    fn unknown_topics_fail_topic_rules_only() {
        let unknown = RequestView {
            topics: None,
            ..req(FETCH, &[])
        };
        let topic_rule = KafkaRules::compile(&[rule("", "fetch", "", "", "t")]).unwrap();
        assert!(!topic_rule.allows(&unknown));
        let any_topic = KafkaRules::compile(&[rule("", "fetch", "", "", "")]).unwrap();
        assert!(any_topic.allows(&unknown));
    }

    #[test]
    fn bad_rules_are_refused() {
        assert!(KafkaRules::compile(&[rule("produce", "fetch", "", "", "")]).is_err());
        assert!(KafkaRules::compile(&[rule("admin", "", "", "", "")]).is_err());
        assert!(KafkaRules::compile(&[rule("", "nosuchkey", "", "", "")]).is_err());
        assert!(KafkaRules::compile(&[rule("", "", "-1", "", "")]).is_err());
        assert!(KafkaRules::compile(&[rule("", "", "x", "", "")]).is_err());
    }

    #[test]
    fn names_are_cilium_s() {
        assert_eq!(api_key_name(2), "offsets");
        assert_eq!(api_key_name(18), "apiversions");
        assert_eq!(api_key_name(68), "68");
        assert_eq!(policy::kafka_api_key("FindCoordinator"), Some(10));
        assert_eq!(policy::kafka_api_key("describeconfigs"), Some(32));
        assert_eq!(policy::kafka_api_key("sharefetch"), None);
    }
}
