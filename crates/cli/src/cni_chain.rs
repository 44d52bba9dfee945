//! The lab's container runtime, its CNI part: a pod's network is its
//! node's configuration list run as a runtime (libcni) runs one. ADD calls
//! each plugin in the list's order, each after the first with the result
//! so far as `prevResult`, and the pod's result is the last one; DEL calls
//! them in reverse order, CHECK in order, both with the pod's result as
//! `prevResult`. An ADD that fails part way is undone with a DEL of the
//! whole list (what containerd does when a sandbox's network fails).
//!
//! The list is the node's installed one (`/etc/cni/net.d` under the node's
//! directory: a Helm-installed agent's `05-fibril.conflist`, with what
//! other installers chained into it, Istio's CNI plugin), else the lab's
//! own agent's plugin alone.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context};
use serde_json::Value;

use crate::lab::{self, LabState, PodState};

/// Fields of known plugins that name a path of the node: the lab's pods
/// share this machine's filesystem, so they are read under the node's
/// directory (as a hostPath is).
const NODE_PATH_FIELDS: [(&str, &str); 2] = [
    ("fibril-cni", "agentSocket"),
    ("istio-cni", "cni_agent_run_dir"),
];

/// A configuration list ready to run: each plugin's configuration (with
/// the list's `cniVersion` and `name`) and the directory of the plugins'
/// binaries (`CNI_PATH`).
pub(crate) struct Chain {
    plugins: Vec<Value>,
    bin: PathBuf,
}

impl Chain {
    /// The plugins' types, in order.
    pub(crate) fn types(&self) -> Vec<String> {
        self.plugins
            .iter()
            .map(|p| p["type"].as_str().unwrap_or_default().to_string())
            .collect()
    }
}

/// The chain of the lab's own agent for `pod`: Fibril's plugin alone.
fn lab_agent(st: &LabState, pod: &PodState) -> Chain {
    Chain {
        plugins: vec![serde_json::json!({
            "cniVersion": "1.1.0",
            "name": "fibril",
            "type": "fibril-cni",
            "agentSocket": lab::agent_socket_of(st, pod).display().to_string(),
        })],
        bin: lab::bin_dir(),
    }
}

/// The node's installed configuration list (the first by name, as a
/// runtime picks it), None when the node has none.
fn installed(st: &LabState, pod: &PodState) -> anyhow::Result<Option<Chain>> {
    let Some(node) = pod.node.as_deref() else {
        return Ok(None);
    };
    let fs = lab::node_fs(&st.name, node);
    let Some(list) = fs.cni_conflist() else {
        return Ok(None);
    };
    let text =
        std::fs::read_to_string(&list).with_context(|| format!("reading {}", list.display()))?;
    let conf: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", list.display()))?;
    let plugins = conf["plugins"]
        .as_array()
        .filter(|p| !p.is_empty())
        .with_context(|| format!("{}: no plugins", list.display()))?;
    let mut out = Vec::new();
    for p in plugins {
        let mut plugin = p.clone();
        let Some(kind) = plugin["type"].as_str().map(str::to_string) else {
            bail!("{}: a plugin without a type", list.display());
        };
        if kind.is_empty() || kind.contains('/') {
            bail!(
                "{}: plugin type {kind:?} is not a file name",
                list.display()
            );
        }
        plugin["cniVersion"] = conf["cniVersion"].clone();
        plugin["name"] = conf["name"].clone();
        for (t, field) in NODE_PATH_FIELDS {
            if kind == t {
                if let Some(path) = plugin[field].as_str() {
                    plugin[field] = fs.host_path(path).display().to_string().into();
                }
            }
        }
        out.push(plugin);
    }
    Ok(Some(Chain {
        plugins: out,
        bin: fs.host_path("/opt/cni/bin"),
    }))
}

/// The chain a kubelet's pod is attached with: the node's installed list
/// when there is one, else the lab's agent.
pub(crate) fn of_kubelet_pod(st: &LabState, pod: &PodState) -> anyhow::Result<Chain> {
    match installed(st, pod)? {
        Some(chain) => Ok(chain),
        None if st.nodes.iter().any(|n| n.agent_pid.is_some()) => Ok(lab_agent(st, pod)),
        None => bail!("network not ready: no CNI configuration in the node's /etc/cni/net.d yet"),
    }
}

/// The chain a pod was attached with, to DEL or CHECK it: the node's list,
/// else the lab's agent.
fn of_pod(st: &LabState, pod: &PodState) -> anyhow::Result<Chain> {
    Ok(match installed(st, pod)? {
        Some(chain) => chain,
        None => lab_agent(st, pod),
    })
}

/// ADD of a lab file's pod to its node's agent.
pub(crate) fn add_to_lab_agent(st: &LabState, pod: &PodState) -> anyhow::Result<Option<Value>> {
    add(st, pod, &lab_agent(st, pod))
}

/// ADD through `chain`: the pod's result. A failure part way DELs the
/// whole list before it is returned.
pub(crate) fn add(st: &LabState, pod: &PodState, chain: &Chain) -> anyhow::Result<Option<Value>> {
    let mut prev: Option<Value> = None;
    for plugin in &chain.plugins {
        let mut conf = plugin.clone();
        if let Some(p) = &prev {
            conf["prevResult"] = p.clone();
        }
        match exec(st, "ADD", pod, &conf, &chain.bin) {
            // A plugin printing nothing passes nothing on (none should).
            Ok(out) => prev = out.or(prev),
            Err(e) => {
                let undo = PodState {
                    cni_result: prev.clone(),
                    ..pod.clone()
                };
                if let Err(d) = run_del(st, &undo, chain) {
                    eprintln!("warning: undoing the failed ADD: {d:#}");
                }
                return Err(e);
            }
        }
    }
    Ok(prev)
}

/// DEL of `pod`, in reverse order, each plugin with the pod's result as
/// `prevResult`. Every plugin is called (DEL is best effort); the first
/// failure is returned.
pub(crate) fn del(st: &LabState, pod: &PodState) -> anyhow::Result<()> {
    run_del(st, pod, &of_pod(st, pod)?)
}

fn run_del(st: &LabState, pod: &PodState, chain: &Chain) -> anyhow::Result<()> {
    let mut first = None;
    for plugin in chain.plugins.iter().rev() {
        let mut conf = plugin.clone();
        if let Some(r) = &pod.cni_result {
            conf["prevResult"] = r.clone();
        }
        if let Err(e) = exec(st, "DEL", pod, &conf, &chain.bin) {
            first.get_or_insert(e);
        }
    }
    first.map_or(Ok(()), Err)
}

/// CHECK of `pod`: each plugin in order with the pod's result; the
/// plugins' types when all passed.
fn check(st: &LabState, pod: &PodState) -> anyhow::Result<Vec<String>> {
    let chain = of_pod(st, pod)?;
    let result = pod
        .cni_result
        .as_ref()
        .context("the pod has no CNI result to check")?;
    for plugin in &chain.plugins {
        let mut conf = plugin.clone();
        conf["prevResult"] = result.clone();
        exec(st, "CHECK", pod, &conf, &chain.bin)?;
    }
    Ok(chain.types())
}

/// CHECK of pod `target` (`namespace/name`) of lab `lab`, a lab file's
/// pod or a kubelet's.
pub fn check_pod(lab: &str, target: &str) -> anyhow::Result<Vec<String>> {
    let st = lab::load_state(lab)?;
    let (ns, name) = target
        .split_once('/')
        .with_context(|| format!("{target:?}: give namespace/pod"))?;
    let pod = lab::find_pod(&st, ns, name)?;
    anyhow::ensure!(
        !pod.host_network,
        "{target} is a hostNetwork pod: it has no CNI attachment"
    );
    check(&st, &pod)
}

/// One plugin of the list run as a runtime runs it: its binary (`type`
/// in `bin`) with CNI_* and Kubernetes' CNI_ARGS in the environment and
/// the configuration on stdin, inside the pod's node's namespace in a
/// multi-node lab.
fn exec(
    st: &LabState,
    command: &str,
    pod: &PodState,
    conf: &Value,
    bin: &Path,
) -> anyhow::Result<Option<Value>> {
    let kind = conf["type"].as_str().unwrap_or_default();
    let plugin = bin.join(kind);
    let mut cmd = match lab::node_of(st, pod) {
        Some((_, n)) => {
            let mut c = Command::new("nsenter");
            c.arg(format!("--net=/run/netns/{}", n.netns)).arg(&plugin);
            c
        }
        None => Command::new(&plugin),
    };
    let mut child = cmd
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", &pod.container_id)
        .env("CNI_NETNS", format!("/run/netns/{}", pod.netns))
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", bin)
        .env(
            "CNI_ARGS",
            format!(
                "K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={}",
                pod.namespace, pod.name, pod.container_id
            ),
        )
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {}", plugin.display()))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(conf.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // A plugin's error is a JSON object on stdout (the spec's); its
        // log lines on stderr say more.
        let log = String::from_utf8_lossy(&out.stderr);
        let log = log.trim();
        bail!(
            "CNI {command} of {kind} for {}/{} failed: {}{}",
            pod.namespace,
            pod.name,
            text.trim(),
            if log.is_empty() {
                String::new()
            } else {
                format!(" ({})", log.lines().last().unwrap_or_default())
            }
        );
    }
    Ok(if text.trim().is_empty() {
        None
    } else {
        Some(
            serde_json::from_str(&text).with_context(|| {
                format!("CNI {command} of {kind}: the result is not JSON: {text}")
            })?,
        )
    })
}
