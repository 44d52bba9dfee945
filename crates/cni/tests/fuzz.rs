//! Hostile input for the CNI plugin, generated (proptest): any stdin and
//! any environment either gets a result or a spec error with a code, never
//! a panic; nothing malformed reaches the agent. The plugin's logic runs
//! in process (many cases), the real binary on fewer, exactly as a runtime
//! executes it. Bounded: a fixed number of cases, no agent needed.

use std::io::Write;
use std::process::{Command, Stdio};

use api::{Request, Response};
use fibril_cni::{run, AgentCall, CniError, Env};
use proptest::prelude::*;
use serde_json::{json, Value};

/// Codes the plugin may answer with (spec/cni.md, plus 999 for the
/// agent's own refusals).
const CODES: [u32; 9] = [1, 2, 3, 4, 5, 6, 7, 11, 999];

/// An agent that answers every call and checks what reaches it.
struct Checking;

impl AgentCall for Checking {
    fn call(&mut self, req: &Request) -> Result<Response, CniError> {
        if let Request::EndpointAdd(a) = req {
            assert!(!a.container_id.is_empty() && !a.ifname.is_empty() && !a.netns.is_empty());
            return Ok(Response::Added(api::AddResult {
                ipv4: "10.0.0.2/32".into(),
                gateway: "10.0.0.1".into(),
                pod_mac: "02:00:00:00:00:01".into(),
                host_ifname: "fib0".into(),
                host_mac: "02:00:00:00:00:02".into(),
            }));
        }
        Ok(Response::Ok)
    }
}

fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9_.-]{0,20}",
        "\\PC{0,40}",
        ".{0,10}[\\n\\r\\t\\x00\\x1b].{0,10}",
        Just("../../etc/passwd".to_string()),
        Just("/run/netns/x".to_string()),
    ]
}

fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(|f| json!(f)),
        text().prop_map(Value::from),
    ];
    leaf.prop_recursive(3, 24, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
            prop::collection::btree_map(text(), inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// A network configuration: mostly well-formed, each field sometimes
/// missing, mistyped or hostile.
fn netconf() -> impl Strategy<Value = Vec<u8>> {
    let field = |good: Value| prop_oneof![3 => Just(Some(good)), 1 => Just(None), 1 => json_value().prop_map(Some)];
    let conf = (
        field(json!("1.1.0")),
        field(json!("fibril-test")),
        field(json!("/nonexistent/agent.sock")),
        field(json!(5)),
        field(json!([{"containerID": "c", "ifname": "eth0"}])),
        field(json!({"cniVersion": "1.1.0", "ips": []})),
    )
        .prop_map(|(v, name, sock, timeout, valid, prev)| {
            let mut m = serde_json::Map::new();
            for (k, f) in [
                ("cniVersion", v),
                ("name", name),
                ("agentSocket", sock),
                ("agentTimeoutSeconds", timeout),
                ("cni.dev/valid-attachments", valid),
                ("prevResult", prev),
            ] {
                if let Some(f) = f {
                    m.insert(k.into(), f);
                }
            }
            serde_json::to_vec(&Value::Object(m)).unwrap()
        });
    prop_oneof![
        4 => conf,
        1 => prop::collection::vec(any::<u8>(), 0..256),
        1 => json_value().prop_map(|v| serde_json::to_vec(&v).unwrap()),
    ]
}

fn env() -> impl Strategy<Value = Vec<(&'static str, String)>> {
    let command = prop_oneof![
        Just("ADD".to_string()),
        Just("DEL".to_string()),
        Just("CHECK".to_string()),
        Just("GC".to_string()),
        Just("STATUS".to_string()),
        Just("VERSION".to_string()),
        text(),
    ];
    let args = prop_oneof![
        Just("IgnoreUnknown=1;K8S_POD_NAMESPACE=shop;K8S_POD_NAME=web-0".to_string()),
        text(),
        "(([A-Za-z_0-9]{1,12}=[^;]{0,12});){0,4}",
    ];
    (
        command,
        prop::option::of(text()),
        prop::option::of(text()),
        prop::option::of(text()),
        prop::option::of(args),
    )
        .prop_map(|(c, id, ns, ifname, args)| {
            let mut v = vec![("CNI_COMMAND", c)];
            for (k, x) in [
                ("CNI_CONTAINERID", id),
                ("CNI_NETNS", ns),
                ("CNI_IFNAME", ifname),
                ("CNI_ARGS", args),
            ] {
                if let Some(x) = x {
                    v.push((k, x));
                }
            }
            v
        })
}

fn check_outcome(out: Result<Option<Value>, CniError>) -> Result<(), TestCaseError> {
    match out {
        Ok(None) => {}
        Ok(Some(v)) => prop_assert!(v.is_object(), "{v}"),
        Err(e) => {
            prop_assert!(CODES.contains(&e.code), "unexpected code {e:?}");
            prop_assert!(!e.msg.is_empty());
            prop_assert!(e.to_json("1.1.0")["code"].is_u64());
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn any_input_gets_a_result_or_a_spec_error(env_vars in env(), stdin in netconf()) {
        let env = Env::from_fn(|k| {
            env_vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone())
        });
        let mut connect = |_: &str, _| -> Result<Box<dyn AgentCall>, CniError> {
            Ok(Box::new(Checking))
        };
        check_outcome(run(&env, &stdin, &mut connect))?;
    }
}

proptest! {
    // The real binary: fewer cases (a process each).
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn the_binary_never_panics_and_always_answers_json(env_vars in env(), stdin in netconf()) {
        let bin = std::path::PathBuf::from(env!("CARGO_BIN_EXE_fibril-cni"));
        let mut cmd = Command::new(bin);
        cmd.env_clear().env("PATH", "/usr/bin:/bin");
        for (k, v) in &env_vars {
            if !v.contains('\0') {
                cmd.env(k, v);
            }
        }
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let _ = child.stdin.take().unwrap().write_all(&stdin);
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        prop_assert!(!stderr.contains("panicked"), "{stderr}");
        let stdout = String::from_utf8_lossy(&out.stdout);
        if out.status.success() {
            prop_assert!(stdout.trim().is_empty() || serde_json::from_str::<Value>(&stdout).is_ok(), "{stdout}");
        } else {
            let v: Value = serde_json::from_str(&stdout)
                .map_err(|e| TestCaseError::fail(format!("not JSON ({e}): {stdout}")))?;
            prop_assert!(v["code"].is_u64() && v["msg"].is_string(), "{v}");
        }
    }
}
