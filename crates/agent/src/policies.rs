//! Policies: import (validated before anything changes), delete, the
//! namespaces in audit mode, and `policy trace` (the kernel's own lookup,
//! `EndpointPolicy::decide`, on the computed policy). Handles: the control
//! path and the observer (policy agent events).

use std::net::Ipv4Addr;
use std::sync::Arc;

use api::Response;

use crate::control::Control;
use crate::observer::Observer;
use crate::state::State;
use crate::{invalid, Error};

pub struct Policies {
    control: Arc<Control>,
    observer: Arc<Observer>,
}

impl Policies {
    pub fn new(control: Arc<Control>, observer: Arc<Observer>) -> Self {
        Policies { control, observer }
    }

    /// Every policy in force.
    pub fn get(&self) -> Vec<policy::Policy> {
        self.control.lock().policies().values().cloned().collect()
    }

    /// Puts a namespace in or out of audit mode.
    pub fn audit(&self, namespace: &str, audit: bool) -> Result<(), Error> {
        policy::labels::validate_namespace(namespace).map_err(invalid)?;
        let mut s = self.control.lock();
        if s.set_audit(namespace, audit) {
            self.control.commit(&mut s)?;
        }
        Ok(())
    }

    pub fn import(
        &self,
        file: &str,
        yaml: &str,
        namespace: Option<&str>,
    ) -> Result<Response, Error> {
        let parsed = policy::parse(file, yaml, namespace.unwrap_or("default"))
            .map_err(|e| invalid(e.to_string()))?;
        if parsed.policies.is_empty() {
            return Err(invalid(format!("{file}: no policy found")));
        }
        let mut s = self.control.lock();
        let mut names = Vec::new();
        for p in parsed.policies {
            names.push(p.key());
            s.insert_policy(p);
        }
        self.control.commit(&mut s)?;
        for n in &names {
            let rules = s.policies().get(n).map_or(0, |p| p.rules.len() as i64);
            self.observer
                .agent_event(flow::agent_event::Kind::PolicyUpdated {
                    labels: policy_labels(s.policies().get(n)),
                    revision: s.policy_generation(),
                    rules,
                });
        }
        Ok(Response::Imported {
            warnings: parsed.warnings.iter().map(|w| w.to_string()).collect(),
            policies: names,
            skipped: parsed
                .skipped
                .into_iter()
                .map(|(doc, kind)| format!("document {doc}: {kind} is not a policy"))
                .collect(),
        })
    }

    /// The identity of a trace end, and again if it is a local endpoint (whose
    /// policy applies):
    /// `namespace/pod`, `pod` (namespace default) or an IPv4 address.
    fn trace_end(&self, s: &State, end: &str) -> Result<(u32, Option<u32>), Error> {
        if let Ok(addr) = end.parse::<Ipv4Addr>() {
            if let Some(e) = s.endpoints().values().find(|e| e.ipv4 == addr) {
                return Ok((e.identity, Some(e.identity)));
            }
            // The ipcache's answer: the host, else the longest CIDR
            // identity prefix, else the world.
            return Ok((self.control.ipcache().identity_of(addr), None));
        }
        let (ns, pod) = end.split_once('/').unwrap_or(("default", end));
        let e = s
            .endpoints()
            .values()
            .find(|e| e.namespace == ns && e.pod == pod)
            .ok_or_else(|| {
                invalid(format!(
                    "no endpoint for pod {ns}/{pod} (give namespace/pod or an IPv4 address)"
                ))
            })?;
        Ok((e.identity, Some(e.identity)))
    }

    pub fn trace(&self, t: &api::TraceRequest) -> Result<Response, Error> {
        let s = self.control.lock();
        let (from_identity, from_ep) = self.trace_end(&s, &t.from)?;
        let (to_identity, to_ep) = self.trace_end(&s, &t.to)?;
        let sync = self.control.policy();
        let decide = |ep: Option<u32>, peer: u32, dir: policy::Direction| {
            ep.map(|id| {
                api::Decision::from(
                    &sync
                        .computed(id)
                        .map(|c| c.decide(peer, dir, t.protocol, t.port))
                        .unwrap_or(policy::Decision::NotEnforced),
                )
            })
        };
        let egress = decide(from_ep, to_identity, policy::Direction::Egress);
        let ingress = decide(to_ep, from_identity, policy::Direction::Ingress);
        let passes = |d: &Option<api::Decision>| d.as_ref().is_none_or(api::Decision::passes);
        Ok(Response::Trace {
            from: t.from.clone(),
            to: t.to.clone(),
            from_identity,
            to_identity,
            allowed: passes(&egress) && passes(&ingress),
            egress,
            ingress,
        })
    }

    pub fn delete(&self, key: &str) -> Result<(), Error> {
        let mut s = self.control.lock();
        let removed = s.remove_policy(key);
        if removed.is_none() {
            return Err(invalid(format!("no policy {key:?}")));
        }
        self.control.commit(&mut s)?;
        self.observer
            .agent_event(flow::agent_event::Kind::PolicyDeleted {
                labels: policy_labels(removed.as_ref()),
                revision: s.policy_generation(),
                rules: removed.as_ref().map_or(0, |p| p.rules.len() as i64),
            });
        Ok(())
    }
}

/// A policy's labels as Cilium derives them (name, namespace, kind).
fn policy_labels(p: Option<&policy::Policy>) -> Vec<String> {
    let Some(p) = p else { return vec![] };
    let mut out = vec![
        format!("k8s:io.cilium.k8s.policy.derived-from={}", p.kind.name()),
        format!("k8s:io.cilium.k8s.policy.name={}", p.name),
    ];
    if let Some(ns) = &p.namespace {
        out.push(format!("k8s:io.cilium.k8s.policy.namespace={ns}"));
    }
    out
}
