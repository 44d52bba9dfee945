//! The API client (from a kubeconfig file, as Cilium's
//! `--k8s-kubeconfig-path`) and the installation of Fibril's CRDs, which
//! the agent does at start as Cilium's agent does (the Helm chart also
//! carries them).

use std::path::Path;
use std::time::Duration;

use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use crate::Error;

/// The field manager Fibril's writes are recorded under.
pub const FIELD_MANAGER: &str = "fibril";

/// A client for the API server a kubeconfig file names (its current
/// context), or, with none, the pod's (`KUBECONFIG`, else its mounted
/// service account).
pub async fn connect(kubeconfig: Option<&Path>) -> Result<Client, Error> {
    let Some(kubeconfig) = kubeconfig else {
        // As clients do in a pod: `KUBECONFIG` if set, else the mounted
        // service account.
        let config = Config::infer().await.map_err(|e| Error::Kubeconfig {
            path: "(in-cluster)".into(),
            message: e.to_string(),
        })?;
        return Ok(Client::try_from(config)?);
    };
    let bad = |message: String| Error::Kubeconfig {
        path: kubeconfig.display().to_string(),
        message,
    };
    let file = Kubeconfig::read_from(kubeconfig).map_err(|e| bad(e.to_string()))?;
    let config = Config::from_custom_kubeconfig(file, &KubeConfigOptions::default())
        .await
        .map_err(|e| bad(e.to_string()))?;
    Ok(Client::try_from(config)?)
}

/// Creates or updates every CRD (server-side apply) and waits until the
/// API server serves them.
pub async fn install_crds(client: &Client) -> Result<(), Error> {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let params = PatchParams::apply(FIELD_MANAGER).force();
    let mut names = Vec::new();
    for crd in crate::crd::definitions() {
        let name = crd["metadata"]["name"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        api.patch(&name, &params, &Patch::Apply(&crd)).await?;
        names.push(name);
    }
    for name in names {
        for _ in 0..100 {
            let crd = api.get(&name).await?;
            let established = crd
                .status
                .and_then(|s| s.conditions)
                .unwrap_or_default()
                .iter()
                .any(|c| c.type_ == "Established" && c.status == "True");
            if established {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// Node `node`'s pod CIDR (`spec.podCIDRs[0]`, else `spec.podCIDR`),
/// waiting up to `wait` for it to be allocated.
/// A Node's labels (empty when it has none).
pub async fn node_labels(
    client: &Client,
    node: &str,
) -> Result<std::collections::BTreeMap<String, String>, Error> {
    use k8s_openapi::api::core::v1::Node;
    let api: Api<Node> = Api::all(client.clone());
    Ok(api.get(node).await?.metadata.labels.unwrap_or_default())
}

pub async fn node_pod_cidr(client: &Client, node: &str, wait: Duration) -> Result<String, Error> {
    use k8s_openapi::api::core::v1::Node;
    let api: Api<Node> = Api::all(client.clone());
    let end = tokio::time::Instant::now() + wait;
    loop {
        let n = api.get_opt(node).await?;
        let cidr = n.as_ref().and_then(|n| n.spec.as_ref()).and_then(|s| {
            s.pod_cidrs
                .as_ref()
                .and_then(|c| c.first().cloned())
                .or_else(|| s.pod_cidr.clone())
        });
        if let Some(c) = cidr {
            return Ok(c);
        }
        if tokio::time::Instant::now() >= end {
            return Err(Error::NoPodCidr {
                node: node.to_string(),
                exists: n.is_some(),
            });
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
