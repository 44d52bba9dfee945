//! Fibril's side of the Kubernetes API: Cilium's CRDs with their schemas
//! (`crd`), the client from a kubeconfig and the CRDs' installation
//! (`client`), and policy objects as the agent reads and reports them
//! (`policy`: which kinds, object -> `policy::Policy`, the status each
//! node writes back).
#![forbid(unsafe_code)]

pub mod client;
pub mod crd;
pub mod pod;
pub mod policy;
pub mod rbac;
pub mod service;

pub use kube;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubeconfig {path}: {message}")]
    Kubeconfig { path: String, message: String },
    #[error("Kubernetes API: {0}")]
    Api(#[from] kube::Error),
    #[error("node {node}: {}", if *exists { "its Node has no spec.podCIDRs (is the controller-manager run with --allocate-node-cidrs?)" } else { "no Node object of that name" })]
    NoPodCidr { node: String, exists: bool },
}
