//! Kubernetes label selectors over identity labels.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::labels::{split_source, LabelSet};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub values: Vec<String>,
}

/// matchLabels AND matchExpressions; the empty selector matches everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Selector {
    #[serde(
        default,
        rename = "matchLabels",
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub match_labels: BTreeMap<String, String>,
    #[serde(
        default,
        rename = "matchExpressions",
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub match_expressions: Vec<Requirement>,
}

/// `matchLabels:` with nothing after it is YAML null: the empty map, as the
/// Kubernetes API reads it.
fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

impl Selector {
    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }

    /// Whether the selector names `key` (with any source prefix).
    pub fn mentions_key(&self, key: &str) -> bool {
        self.match_labels.keys().any(|k| split_source(k).1 == key)
            || self
                .match_expressions
                .iter()
                .any(|r| split_source(&r.key).1 == key)
    }

    /// Whether the selector names any key starting with `prefix`.
    pub fn mentions_key_prefix(&self, prefix: &str) -> bool {
        self.match_labels
            .keys()
            .any(|k| split_source(k).1.starts_with(prefix))
            || self
                .match_expressions
                .iter()
                .any(|r| split_source(&r.key).1.starts_with(prefix))
    }

    pub fn matches(&self, labels: &LabelSet) -> bool {
        self.match_labels.iter().all(|(k, v)| {
            let (src, key) = split_source(k);
            labels.values(src, key).any(|lv| lv == v)
        }) && self.match_expressions.iter().all(|r| {
            let (src, key) = split_source(&r.key);
            let mut values = labels.values(src, key).peekable();
            match r.operator {
                Operator::Exists => values.peek().is_some(),
                Operator::DoesNotExist => values.peek().is_none(),
                Operator::In => values.any(|v| r.values.iter().any(|x| x == v)),
                Operator::NotIn => values.all(|v| !r.values.iter().any(|x| x == v)),
            }
        })
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts: Vec<String> = self
            .match_labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        for r in &self.match_expressions {
            parts.push(match r.operator {
                Operator::Exists => r.key.clone(),
                Operator::DoesNotExist => format!("!{}", r.key),
                Operator::In => format!("{} in ({})", r.key, r.values.join(",")),
                Operator::NotIn => format!("{} notin ({})", r.key, r.values.join(",")),
            });
        }
        if parts.is_empty() {
            write!(f, "{{}}")
        } else {
            write!(f, "{}", parts.join(","))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::Label;

    fn set(labels: &[(&str, &str, &str)]) -> LabelSet {
        LabelSet::new(labels.iter().map(|(s, k, v)| Label::new(s, k, v)).collect())
    }

    fn sel(yaml: &str) -> Selector {
        serde_saphyr::from_str(yaml).unwrap()
    }

    fn check(selector: &str, labels: &LabelSet, expected: bool) {
        assert_eq!(
            sel(selector).matches(labels),
            expected,
            "{selector} vs {labels:?}"
        );
    }

    #[test]
    fn selectors_follow_kubernetes_semantics() {
        let web = set(&[("k8s", "app", "web"), ("k8s", "tier", "front")]);
        check("{}", &web, true);
        check("matchLabels: {app: web}", &web, true);
        check("matchLabels: {k8s:app: web}", &web, true);
        check("matchLabels: {container:app: web}", &web, false);
        check("matchLabels: {app: db}", &web, false);
        check("matchLabels: {app: web, tier: back}", &web, false);
        check(
            "matchExpressions: [{key: app, operator: In, values: [db, web]}]",
            &web,
            true,
        );
        check(
            "matchExpressions: [{key: app, operator: NotIn, values: [web]}]",
            &web,
            false,
        );
        check(
            "matchExpressions: [{key: missing, operator: NotIn, values: [web]}]",
            &web,
            true,
        );
        check(
            "matchExpressions: [{key: tier, operator: Exists}]",
            &web,
            true,
        );
        check(
            "matchExpressions: [{key: tier, operator: DoesNotExist}]",
            &web,
            false,
        );
        check(
            "matchExpressions: [{key: other, operator: DoesNotExist}]",
            &web,
            true,
        );
    }
}
