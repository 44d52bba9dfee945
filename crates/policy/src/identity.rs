//! Security identities: numbers for label sets (Cilium's numbering:
//! reserved 1-10, cluster-local from 256).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::labels::LabelSet;

/// The reserved identities and their labels.
static RESERVED: std::sync::LazyLock<Vec<(u32, LabelSet)>> = std::sync::LazyLock::new(reserved);

pub fn reserved() -> Vec<(u32, LabelSet)> {
    (abi::identity::HOST..=abi::identity::WORLD_IPV6)
        .filter_map(|id| Some((id, LabelSet::reserved(abi::identity::reserved_name(id)?))))
        .collect()
}

pub use abi::identity::reserved_name;

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("no cluster-local identity left (256-65535 are all in use)")]
pub struct Exhausted;

/// Allocates identities for label sets; serialisable so that the agent can
/// persist it and hand out the same numbers after a restart.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(from = "Vec<Allocation>", into = "Vec<Allocation>")]
pub struct Allocator {
    by_labels: BTreeMap<LabelSet, Held>,
    /// The same allocations by number: lookups and ordered walks without
    /// a sort (every commit walks them).
    by_id: BTreeMap<u32, LabelSet>,
}

#[derive(Clone, Copy, Debug)]
struct Held {
    id: u32,
    refs: u32,
}

/// One allocation as persisted.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Allocation {
    labels: LabelSet,
    id: u32,
    refs: u32,
}

impl From<Vec<Allocation>> for Allocator {
    fn from(v: Vec<Allocation>) -> Self {
        let mut a = Allocator::default();
        for x in v {
            a.by_id.insert(x.id, x.labels.clone());
            a.by_labels.insert(
                x.labels,
                Held {
                    id: x.id,
                    refs: x.refs,
                },
            );
        }
        a
    }
}

impl From<Allocator> for Vec<Allocation> {
    fn from(a: Allocator) -> Self {
        a.by_labels
            .into_iter()
            .map(|(labels, h)| Allocation {
                labels,
                id: h.id,
                refs: h.refs,
            })
            .collect()
    }
}

const FIRST: u32 = 256;
const LAST: u32 = 65535;

impl Allocator {
    /// Returns the identity of `labels`, allocating one if needed, and takes
    /// a reference on it. A new one gets the lowest free number.
    pub fn acquire(&mut self, labels: &LabelSet) -> Result<u32, Exhausted> {
        if let Some(a) = self.by_labels.get_mut(labels) {
            a.refs += 1;
            return Ok(a.id);
        }
        // The first number not taken: where the allocated ones (sorted)
        // first leave a gap.
        let mut id = FIRST;
        for taken in self.by_id.range(FIRST..).map(|(i, _)| *i) {
            if taken != id {
                break;
            }
            id += 1;
        }
        if id > LAST {
            return Err(Exhausted);
        }
        self.by_labels.insert(labels.clone(), Held { id, refs: 1 });
        self.by_id.insert(id, labels.clone());
        Ok(id)
    }

    /// Takes a reference on `labels` with the number `id` another
    /// allocator gave it (the cluster's, in kvstore mode). Refused when the
    /// labels hold another number here, or the number other labels.
    pub fn adopt(&mut self, labels: &LabelSet, id: u32) -> Result<u32, String> {
        if let Some(h) = self.by_labels.get_mut(labels) {
            if h.id != id {
                return Err(format!(
                    "labels {:?} hold identity {} here, {id} in the cluster",
                    labels.to_strings(),
                    h.id
                ));
            }
            h.refs += 1;
            return Ok(id);
        }
        if let Some(other) = self.by_id.get(&id) {
            return Err(format!(
                "identity {id} is held here by {:?}",
                other.to_strings()
            ));
        }
        self.by_labels.insert(labels.clone(), Held { id, refs: 1 });
        self.by_id.insert(id, labels.clone());
        Ok(id)
    }

    /// The allocator that holds `held` (labels, identity), a reference per
    /// item: what a restart rebuilds from the endpoints it kept, so the
    /// numbers stay theirs. Refused when two label sets claim one number or
    /// one label set two numbers.
    pub fn restore<'a>(
        held: impl IntoIterator<Item = (&'a LabelSet, u32)>,
    ) -> Result<Self, String> {
        let mut a = Allocator::default();
        for (labels, id) in held {
            if let Some(other) = a.by_id.get(&id) {
                if other != labels {
                    return Err(format!(
                        "identity {id} is held by two label sets ({:?} and {:?})",
                        other.to_strings(),
                        labels.to_strings()
                    ));
                }
            }
            let h = a
                .by_labels
                .entry(labels.clone())
                .or_insert(Held { id, refs: 0 });
            if h.id != id {
                return Err(format!(
                    "labels {:?} hold two identities ({} and {id})",
                    labels.to_strings(),
                    h.id
                ));
            }
            h.refs += 1;
            a.by_id.insert(id, labels.clone());
        }
        Ok(a)
    }

    /// Drops a reference; the identity is freed with its last reference.
    pub fn release(&mut self, labels: &LabelSet) {
        if let Some(a) = self.by_labels.get_mut(labels) {
            a.refs = a.refs.saturating_sub(1);
            if a.refs == 0 {
                let id = a.id;
                self.by_labels.remove(labels);
                self.by_id.remove(&id);
            }
        }
    }

    /// Every identity with its labels, borrowed: reserved ones first, then
    /// the allocated ones by number.
    pub fn iter(&self) -> impl Iterator<Item = (u32, &LabelSet)> {
        RESERVED
            .iter()
            .map(|(id, l)| (*id, l))
            .chain(self.by_id.iter().map(|(id, l)| (*id, l)))
    }

    /// The allocated identities (not the reserved ones) by number.
    pub fn allocated(&self) -> &BTreeMap<u32, LabelSet> {
        &self.by_id
    }

    /// Every allocated identity with its labels, reserved ones first.
    pub fn all(&self) -> Vec<(u32, LabelSet)> {
        self.iter().map(|(id, l)| (id, l.clone())).collect()
    }

    pub fn labels_of(&self, id: u32) -> Option<LabelSet> {
        match RESERVED.iter().find(|(i, _)| *i == id) {
            Some((_, l)) => Some(l.clone()),
            None => self.by_id.get(&id).cloned(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::labels::Label;

    fn set(app: &str) -> LabelSet {
        LabelSet::new(vec![Label::new("k8s", "app", app)])
    }

    #[test]
    fn same_labels_share_an_identity_and_numbers_start_at_256() {
        let mut a = Allocator::default();
        assert_eq!(a.acquire(&set("web")).unwrap(), 256);
        assert_eq!(a.acquire(&set("db")).unwrap(), 257);
        assert_eq!(a.acquire(&set("web")).unwrap(), 256);
        a.release(&set("web"));
        assert_eq!(
            a.acquire(&set("api")).unwrap(),
            258,
            "256 still referenced once"
        );
        a.release(&set("web"));
        a.release(&set("web"));
        assert_eq!(
            a.acquire(&set("new")).unwrap(),
            256,
            "freed with its last reference"
        );
    }

    #[test]
    fn adopted_numbers_are_referenced_and_conflicts_refused() {
        let mut a = Allocator::default();
        assert_eq!(a.adopt(&set("web"), 300), Ok(300));
        assert_eq!(a.adopt(&set("web"), 300), Ok(300));
        assert!(
            a.adopt(&set("web"), 301).is_err(),
            "labels hold another number"
        );
        assert!(
            a.adopt(&set("db"), 300).is_err(),
            "number held by other labels"
        );
        assert_eq!(a.acquire(&set("db")).unwrap(), 256, "the lowest free");
        a.release(&set("web"));
        a.release(&set("web"));
        assert!(
            a.allocated().get(&300).is_none(),
            "freed with its last reference"
        );
    }

    #[test]
    fn survives_serialisation() {
        let mut a = Allocator::default();
        a.acquire(&set("web")).unwrap();
        let json = serde_json::to_string(&a).unwrap();
        let mut b: Allocator = serde_json::from_str(&json).unwrap();
        assert_eq!(b.acquire(&set("web")).unwrap(), 256);
        assert_eq!(reserved_name(2), Some("world"));
        assert_eq!(b.labels_of(2).unwrap().to_strings(), vec!["reserved:world"]);
    }
}
