//! The CNI plugin's logic: spec versions, configuration, environment,
//! results and errors (`spec/cni.md`). The binary only does I/O.
#![forbid(unsafe_code)]

pub mod install;

use std::collections::BTreeMap;

use api::{AddResult, Attachment, AttachmentId, Request, Response};
use serde_json::{json, Value};

pub const SUPPORTED_VERSIONS: [&str; 2] = ["1.0.0", "1.1.0"];

/// A CNI error: code, short message, details.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{msg}: {details}")]
pub struct CniError {
    pub code: u32,
    pub msg: String,
    pub details: String,
}

fn err(code: u32, msg: &str, details: impl Into<String>) -> CniError {
    CniError {
        code,
        msg: msg.into(),
        details: details.into(),
    }
}

impl CniError {
    pub fn to_json(&self, version: &str) -> Value {
        json!({"cniVersion": version, "code": self.code, "msg": self.msg, "details": self.details})
    }
}

/// The plugin configuration from stdin.
#[derive(Debug, Clone)]
pub struct NetConf {
    pub cni_version: String,
    pub name: String,
    /// The agent socket (`agentSocket`, default /run/fibril/agent.sock).
    pub agent_socket: String,
    /// How long one call to the agent may take (`agentTimeoutSeconds`,
    /// default `DEFAULT_AGENT_TIMEOUT`): a wedged agent gets the runtime
    /// "try again later" (code 11), never a hang.
    pub agent_timeout: std::time::Duration,
    pub prev_result: Option<Value>,
    pub valid_attachments: Vec<AttachmentId>,
}

/// Parses and checks the configuration; `command` decides what is needed.
pub fn parse_conf(stdin: &[u8]) -> Result<NetConf, CniError> {
    let v: Value = serde_json::from_slice(stdin)
        .map_err(|e| err(6, "failed to decode network configuration", e.to_string()))?;
    let obj = v.as_object().ok_or_else(|| {
        err(
            6,
            "failed to decode network configuration",
            "expected a JSON object",
        )
    })?;
    let version = obj
        .get("cniVersion")
        .and_then(Value::as_str)
        .ok_or_else(|| {
            err(
                7,
                "invalid network config",
                "cniVersion is missing or not a string",
            )
        })?;
    if !SUPPORTED_VERSIONS.contains(&version) {
        return Err(err(
            1,
            "incompatible CNI versions",
            format!("config is {version:?}, plugin supports {SUPPORTED_VERSIONS:?}"),
        ));
    }
    let name = obj
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or_else(|| {
            err(
                7,
                "missing network name",
                "the network configuration needs a name",
            )
        })?;
    let name_ok = name
        .chars()
        .next()
        .is_some_and(|c| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if !name_ok {
        return Err(err(
            7,
            "invalid network config",
            format!("network name {name:?} has characters outside [A-Za-z0-9_.-]"),
        ));
    }
    let agent_socket = match obj.get("agentSocket") {
        None => api::DEFAULT_SOCKET.to_string(),
        Some(Value::String(s)) if s.starts_with('/') => s.clone(),
        Some(other) => {
            return Err(err(
                2,
                "unsupported field in network configuration",
                format!("agentSocket={other}: expected an absolute path"),
            ))
        }
    };
    let agent_timeout = match obj.get("agentTimeoutSeconds") {
        None => DEFAULT_AGENT_TIMEOUT,
        Some(v) => v
            .as_f64()
            .filter(|s| *s > 0.0 && *s <= 600.0)
            .map(std::time::Duration::from_secs_f64)
            .ok_or_else(|| {
                err(
                    2,
                    "unsupported field in network configuration",
                    format!(
                        "agentTimeoutSeconds={v}: expected seconds, more than 0 and at most 600"
                    ),
                )
            })?,
    };
    let valid_attachments = match obj.get("cni.dev/valid-attachments") {
        None => vec![],
        Some(v) => serde_json::from_value::<Vec<BTreeMap<String, String>>>(v.clone())
            .map_err(|e| {
                err(
                    6,
                    "failed to decode cni.dev/valid-attachments",
                    e.to_string(),
                )
            })?
            .into_iter()
            .map(|m| AttachmentId {
                container_id: m.get("containerID").cloned().unwrap_or_default(),
                ifname: m.get("ifname").cloned().unwrap_or_default(),
            })
            .collect(),
    };
    Ok(NetConf {
        cni_version: version.into(),
        name: name.into(),
        agent_socket,
        agent_timeout,
        prev_result: obj.get("prevResult").cloned(),
        valid_attachments,
    })
}

/// The CNI_* environment.
#[derive(Debug, Clone, Default)]
pub struct Env {
    pub command: String,
    pub container_id: Option<String>,
    pub netns: Option<String>,
    pub ifname: Option<String>,
    pub args: Option<String>,
}

impl Env {
    pub fn from_fn(get: impl Fn(&str) -> Option<String>) -> Self {
        Self {
            command: get("CNI_COMMAND").unwrap_or_default(),
            container_id: get("CNI_CONTAINERID").filter(|s| !s.is_empty()),
            netns: get("CNI_NETNS").filter(|s| !s.is_empty()),
            ifname: get("CNI_IFNAME").filter(|s| !s.is_empty()),
            args: get("CNI_ARGS"),
        }
    }

    fn require(&self, names: &[&str]) -> Result<(), CniError> {
        let missing: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| match *n {
                "CNI_CONTAINERID" => self.container_id.is_none(),
                "CNI_NETNS" => self.netns.is_none(),
                "CNI_IFNAME" => self.ifname.is_none(),
                _ => false,
            })
            .collect();
        if missing.is_empty() {
            Ok(())
        } else {
            Err(err(
                4,
                &format!("required env variables [{}] missing", missing.join(",")),
                "see the CNI spec, section 'Parameters'",
            ))
        }
    }

    /// `K8S_POD_NAMESPACE` and `K8S_POD_NAME` from CNI_ARGS.
    pub fn pod(&self) -> Result<(String, String), CniError> {
        let mut ns = None;
        let mut pod = None;
        for kv in self
            .args
            .as_deref()
            .unwrap_or("")
            .split(';')
            .filter(|s| !s.is_empty())
        {
            let (k, v) = kv
                .split_once('=')
                .ok_or_else(|| err(4, "invalid CNI_ARGS", format!("{kv:?} is not KEY=VALUE")))?;
            match k {
                "K8S_POD_NAMESPACE" => ns = Some(v.to_string()),
                "K8S_POD_NAME" => pod = Some(v.to_string()),
                _ => {}
            }
        }
        let cid = self.container_id.clone().unwrap_or_default();
        Ok((ns.unwrap_or_else(|| "default".into()), pod.unwrap_or(cid)))
    }
}

/// The CNI error for an agent's refusal: the spec's well-known codes where
/// one fits, Fibril's own (100 and up) for the rest, so a runtime can tell
/// a retry from a mistake.
pub fn agent_error(cause: api::ErrorKind, details: String) -> CniError {
    use api::ErrorKind::*;
    let (code, msg) = match cause {
        // The pod's names and namespace path come from CNI_ARGS/CNI_NETNS.
        Invalid => (4, "invalid environment variables"),
        NotFound => (3, "container unknown or does not exist"),
        Conflict => (100, "the container is already attached"),
        Exhausted => (101, "the node's address or endpoint pool is exhausted"),
        Network => (102, "setting up the pod's network failed"),
        Datapath => (103, "loading the datapath failed"),
        Internal => (999, "the agent failed"),
    };
    err(code, msg, details)
}

/// Something that answers agent requests (the socket, or a test double).
pub trait AgentCall {
    fn call(&mut self, req: &Request) -> Result<Response, CniError>;
}

/// Opens a connection to the agent at a socket path.
pub type Connect<'a> =
    dyn FnMut(&str, std::time::Duration) -> Result<Box<dyn AgentCall>, CniError> + 'a;

/// The agent call's bound when the configuration names none.
pub const DEFAULT_AGENT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Runs one CNI command. Returns what goes to stdout on success (nothing
/// for DEL, CHECK, GC and STATUS).
pub fn run(env: &Env, stdin: &[u8], agent: &mut Connect<'_>) -> Result<Option<Value>, CniError> {
    if env.command == "VERSION" {
        let requested = serde_json::from_slice::<Value>(stdin)
            .ok()
            .and_then(|v| {
                v.get("cniVersion")
                    .and_then(Value::as_str)
                    .map(String::from)
            })
            .unwrap_or_else(|| "1.1.0".into());
        return Ok(Some(
            json!({"cniVersion": requested, "supportedVersions": SUPPORTED_VERSIONS}),
        ));
    }
    let conf = parse_conf(stdin)?;
    match env.command.as_str() {
        "ADD" => {
            env.require(&["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"])?;
            let (namespace, pod) = env.pod()?;
            let attachment = Attachment {
                container_id: env.container_id.clone().unwrap_or_default(),
                ifname: env.ifname.clone().unwrap_or_default(),
                netns: env.netns.clone().unwrap_or_default(),
                namespace,
                pod,
            };
            let resp = agent(&conf.agent_socket, conf.agent_timeout)?
                .call(&Request::EndpointAdd(attachment.clone()))?;
            match resp {
                Response::Added(r) => Ok(Some(add_result(&conf, &attachment, &r))),
                other => Err(err(999, "unexpected agent response", format!("{other:?}"))),
            }
        }
        "DEL" => {
            env.require(&["CNI_CONTAINERID", "CNI_IFNAME"])?;
            agent(&conf.agent_socket, conf.agent_timeout)?.call(&Request::EndpointDel {
                container_id: env.container_id.clone().unwrap_or_default(),
                ifname: env.ifname.clone().unwrap_or_default(),
            })?;
            Ok(None)
        }
        "CHECK" => {
            env.require(&["CNI_CONTAINERID", "CNI_NETNS", "CNI_IFNAME"])?;
            if conf.prev_result.is_none() {
                return Err(err(
                    7,
                    "invalid network config",
                    "CHECK needs prevResult (the result of ADD)",
                ));
            }
            let (namespace, pod) = env.pod()?;
            agent(&conf.agent_socket, conf.agent_timeout)?.call(&Request::EndpointCheck(
                Attachment {
                    container_id: env.container_id.clone().unwrap_or_default(),
                    ifname: env.ifname.clone().unwrap_or_default(),
                    netns: env.netns.clone().unwrap_or_default(),
                    namespace,
                    pod,
                },
            ))?;
            Ok(None)
        }
        "STATUS" => {
            let mut a = agent(&conf.agent_socket, conf.agent_timeout)
                .map_err(|e| err(50, "plugin not available", e.details))?;
            a.call(&Request::Status)
                .map_err(|e| err(50, "plugin not available", e.details))?;
            Ok(None)
        }
        "GC" => {
            agent(&conf.agent_socket, conf.agent_timeout)?.call(&Request::EndpointGc {
                valid: conf.valid_attachments.clone(),
            })?;
            Ok(None)
        }
        "" => Err(err(
            4,
            "required env variables [CNI_COMMAND] missing",
            "set CNI_COMMAND to ADD, DEL, CHECK, STATUS, GC or VERSION",
        )),
        other => Err(err(
            4,
            &format!("unknown CNI_COMMAND: {other}"),
            "expected ADD, DEL, CHECK, STATUS, GC or VERSION",
        )),
    }
}

/// The ADD result; a previous plugin's result is kept and extended.
fn add_result(conf: &NetConf, a: &Attachment, r: &AddResult) -> Value {
    let mut interfaces: Vec<Value> = Vec::new();
    let mut ips: Vec<Value> = Vec::new();
    let mut routes: Vec<Value> = Vec::new();
    let mut dns = json!({});
    if let Some(prev) = &conf.prev_result {
        interfaces = prev
            .get("interfaces")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        ips = prev
            .get("ips")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        routes = prev
            .get("routes")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        dns = prev.get("dns").cloned().unwrap_or(json!({}));
    }
    interfaces.push(json!({"name": r.host_ifname, "mac": r.host_mac}));
    interfaces.push(json!({"name": a.ifname, "mac": r.pod_mac, "sandbox": a.netns}));
    ips.push(json!({"address": r.ipv4, "gateway": r.gateway, "interface": interfaces.len() - 1}));
    routes.push(json!({"dst": "0.0.0.0/0", "gw": r.gateway}));
    json!({"cniVersion": conf.cni_version, "interfaces": interfaces, "ips": ips, "routes": routes, "dns": dns})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_err(conf: &str, code: u32, needle: &str) {
        let e = parse_conf(conf.as_bytes()).unwrap_err();
        assert_eq!(e.code, code, "{conf}: {e:?}");
        assert!(e.to_string().contains(needle), "{e}");
    }

    #[test]
    fn bad_configs_get_the_spec_error_codes() {
        check_err("{not json", 6, "failed to decode");
        check_err("[]", 6, "JSON object");
        check_err(r#"{"name":"n","type":"fibril-cni"}"#, 7, "cniVersion");
        check_err(r#"{"cniVersion":"0.4.0","name":"n"}"#, 1, "incompatible");
        check_err(
            r#"{"cniVersion":"1.0.0","type":"fibril-cni"}"#,
            7,
            "missing network name",
        );
        check_err(r#"{"cniVersion":"1.0.0","name":"bad name"}"#, 7, "bad name");
        check_err(
            r#"{"cniVersion":"1.0.0","name":"n","agentSocket":3}"#,
            2,
            "agentSocket=3",
        );
    }

    #[test]
    fn missing_environment_is_named() {
        let env = Env {
            command: "ADD".into(),
            ifname: Some("eth0".into()),
            ..Default::default()
        };
        let e = run(
            &env,
            br#"{"cniVersion":"1.0.0","name":"n"}"#,
            &mut |_, _| unreachable!(),
        )
        .unwrap_err();
        assert_eq!(e.code, 4);
        assert!(e.msg.contains("CNI_CONTAINERID,CNI_NETNS"), "{}", e.msg);
    }

    #[test]
    fn cni_args_give_the_pod() {
        let env = Env {
            args: Some("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-1".into()),
            ..Default::default()
        };
        assert_eq!(env.pod().unwrap(), ("shop".into(), "web-1".into()));
        let bad = Env {
            args: Some("junk".into()),
            ..Default::default()
        };
        assert_eq!(bad.pod().unwrap_err().code, 4);
    }

    #[test]
    fn version_reports_supported_versions() {
        let env = Env {
            command: "VERSION".into(),
            ..Default::default()
        };
        let out = run(
            &env,
            br#"{"cniVersion":"1.1.0"}"#,
            &mut |_, _| unreachable!(),
        )
        .unwrap()
        .unwrap();
        assert_eq!(out["supportedVersions"], json!(["1.0.0", "1.1.0"]));
        assert_eq!(out["cniVersion"], "1.1.0");
    }
}
