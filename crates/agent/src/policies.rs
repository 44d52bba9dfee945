//! Policies: import (validated before anything changes), delete, the
//! namespaces in audit mode, and `policy trace` (the kernel's own lookup,
//! `EndpointPolicy::decide`, on the computed policy). Handles: the control
//! path and the observer (policy agent events).

use std::net::Ipv4Addr;
use std::sync::Arc;

use api::Response;

use crate::cluster::Cluster;
use crate::control::Control;
use crate::observer::Observer;
use crate::state::State;
use crate::{invalid, Error};

pub struct Policies {
    control: Arc<Control>,
    observer: Arc<Observer>,
    /// Kvstore mode: policies are the cluster's, kept in etcd; an import
    /// or delete goes there first, and every node (this one too) applies
    /// what it watches.
    cluster: Option<Arc<Cluster>>,
    /// Kubernetes mode: policies are the API server's objects, changed
    /// with kubectl; local imports and deletes are refused.
    from_kubernetes: bool,
    /// This node enforces host policies (its host firewall is on).
    host_firewall: bool,
}

const FROM_KUBERNETES: &str = "policies come from the Kubernetes API on this node (--k8s-kubeconfig-path): change them with kubectl apply / kubectl delete";

impl Policies {
    pub fn new(
        control: Arc<Control>,
        observer: Arc<Observer>,
        cluster: Option<Arc<Cluster>>,
        from_kubernetes: bool,
        host_firewall: bool,
    ) -> Self {
        Policies {
            control,
            observer,
            cluster,
            from_kubernetes,
            host_firewall,
        }
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
        if self.from_kubernetes {
            return Err(Error::Conflict(FROM_KUBERNETES.into()));
        }
        let parsed = policy::parse(file, yaml, namespace.unwrap_or("default"))
            .map_err(|e| invalid(e.to_string()))?;
        if parsed.policies.is_empty() {
            return Err(invalid(format!("{file}: no policy found")));
        }
        if let Some(cluster) = &self.cluster {
            // All or none, in the cluster first: a node that applied a
            // policy the others never see would enforce alone.
            cluster.put_policies(&parsed.policies)?;
        }
        let mut warnings: Vec<String> = parsed.warnings.iter().map(|w| w.to_string()).collect();
        if !self.host_firewall {
            // Taken (the cluster's other nodes may enforce it), but said.
            warnings.extend(
                parsed
                    .policies
                    .iter()
                    .filter(|p| p.rules.iter().any(|r| r.host))
                    .map(|p| {
                        format!(
                            "{}: a host policy (nodeSelector), not enforced on this node: its host firewall is off (fibril-agent --enable-host-firewall)",
                            p.name_key()
                        )
                    }),
            );
        }
        let names = apply(&self.control, &self.observer, parsed.policies, vec![])?;
        Ok(Response::Imported {
            warnings,
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
        if self.from_kubernetes {
            return Err(Error::Conflict(FROM_KUBERNETES.into()));
        }
        // `namespace/name` of a NetworkPolicy names it when no
        // CiliumNetworkPolicy has that name there.
        let key = {
            let s = self.control.lock();
            let knp = format!("{}{key}", policy::model::KNP_KEY_PREFIX);
            if !s.policies().contains_key(key) && s.policies().contains_key(&knp) {
                knp
            } else {
                key.to_string()
            }
        };
        let key = key.as_str();
        let known = self.control.lock().policies().contains_key(key);
        let in_cluster = match &self.cluster {
            Some(cluster) => cluster.delete_policy(key)?,
            None => false,
        };
        if !known && !in_cluster {
            return Err(invalid(format!("no policy {key:?}")));
        }
        apply(&self.control, &self.observer, vec![], vec![key.to_string()])?;
        Ok(())
    }
}

/// Puts and removes policies in one commit, with Hubble's policy agent
/// events; returns the keys put. Imports and the cluster's watch both come
/// here.
pub(crate) fn apply(
    control: &Control,
    observer: &Observer,
    put: Vec<policy::Policy>,
    remove: Vec<String>,
) -> Result<Vec<String>, Error> {
    let mut s = control.lock();
    let mut names = Vec::new();
    for p in put {
        names.push(p.key());
        s.insert_policy(p);
    }
    let removed: Vec<policy::Policy> = remove.iter().filter_map(|k| s.remove_policy(k)).collect();
    control.commit(&mut s)?;
    for n in &names {
        let p = s.policies().get(n);
        observer.agent_event(flow::agent_event::Kind::PolicyUpdated {
            labels: policy_labels(p),
            revision: s.policy_generation(),
            rules: p.map_or(0, |p| p.rules.len() as i64),
        });
    }
    for p in &removed {
        observer.agent_event(flow::agent_event::Kind::PolicyDeleted {
            labels: policy_labels(Some(p)),
            revision: s.policy_generation(),
            rules: p.rules.len() as i64,
        });
    }
    Ok(names)
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
