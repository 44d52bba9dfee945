//! fibril-cni: the CNI plugin binary. Reads the config on stdin and CNI_*
//! from the environment, asks the agent, prints the result or the error.
#![forbid(unsafe_code)]

use std::io::Read;
use std::path::Path;

use api::{Client, ClientError, Request, Response};
use fibril_cni::{run, AgentCall, CniError, Env};

struct Socket(Client);

fn from_client(e: ClientError) -> CniError {
    match e {
        ClientError::Agent { message, cause } => fibril_cni::agent_error(cause, message),
        ClientError::Connect { .. } | ClientError::Timeout { .. } => CniError {
            code: 11,
            msg: "try again later".into(),
            details: e.to_string(),
        },
        other => CniError {
            code: 5,
            msg: "I/O failure talking to the agent".into(),
            details: other.to_string(),
        },
    }
}

impl AgentCall for Socket {
    fn call(&mut self, req: &Request) -> Result<Response, CniError> {
        self.0.call(req).map_err(from_client)
    }
}

fn main() {
    // `fibril-cni install ...`: the init container's job (a runtime calls
    // the plugin with no arguments).
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("install") {
        std::process::exit(install(&args[1..]));
    }
    let env = Env::from_fn(|k| std::env::var(k).ok());
    let mut stdin = Vec::new();
    if let Err(e) = std::io::stdin().read_to_end(&mut stdin) {
        let e = CniError {
            code: 5,
            msg: "failed to read stdin".into(),
            details: e.to_string(),
        };
        println!("{}", e.to_json("1.1.0"));
        std::process::exit(1);
    }
    let version = serde_json::from_slice::<serde_json::Value>(&stdin)
        .ok()
        .and_then(|v| {
            v.get("cniVersion")
                .and_then(|s| s.as_str())
                .map(String::from)
        })
        .unwrap_or_else(|| "1.1.0".into());
    let mut connect = |path: &str, timeout| -> Result<Box<dyn AgentCall>, CniError> {
        Ok(Box::new(Socket(
            Client::connect_timeout(Path::new(path), timeout).map_err(from_client)?,
        )))
    };
    match run(&env, &stdin, &mut connect) {
        Ok(Some(out)) => println!("{out}"),
        Ok(None) => {}
        Err(e) => {
            println!("{}", e.to_json(&version));
            std::process::exit(1);
        }
    }
}

fn install(args: &[String]) -> i32 {
    let plan = match fibril_cni::install::parse_args(args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("fibril-cni install: {e}");
            return 2;
        }
    };
    let me = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("fibril-cni install: this binary's path: {e}");
            return 1;
        }
    };
    match fibril_cni::install::install(&plan, &me) {
        Ok(moved) => {
            for m in moved {
                eprintln!("moved aside (cni.exclusive): {}", m.display());
            }
            eprintln!(
                "installed {} and {}",
                plan.bin_dir.join("fibril-cni").display(),
                plan.conf_dir.join(&plan.conf_file).display()
            );
            0
        }
        Err(e) => {
            eprintln!("fibril-cni install: {e}");
            1
        }
    }
}
