//! `fibril-cni install`: what the agent DaemonSet's init container runs on
//! each node. Copies the plugin into the CNI binary directory and writes
//! Fibril's configuration list into the configuration directory (named to
//! sort first, `05-fibril.conflist`, so the runtime takes it). With
//! `--exclusive` other plugins' configurations are moved aside
//! (`<name>.fibril_bak`, as Cilium's `cni.exclusive` does); without it
//! they are never touched, and plugins another installer chained into
//! Fibril's own list (Istio's CNI appends itself to the primary
//! configuration) are kept, in their order, when the list is written again
//! (an agent restarting): Cilium rewrites its file and leaves Istio's
//! installer to notice and add itself back, with pods started in between
//! missing Istio's redirection.

use std::path::{Path, PathBuf};

/// What to install.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Install {
    pub conf_dir: PathBuf,
    pub conf_file: String,
    pub bin_dir: PathBuf,
    pub agent_socket: String,
    /// `none` or `portmap` (then the portmap plugin follows in the list).
    pub chaining_mode: String,
    pub exclusive: bool,
}

/// The arguments, `--name=value` or `--name value`; precise errors.
pub fn parse_args(args: &[String]) -> Result<Install, String> {
    let mut i = Install {
        conf_dir: "/etc/cni/net.d".into(),
        conf_file: "05-fibril.conflist".into(),
        bin_dir: "/opt/cni/bin".into(),
        agent_socket: "/var/run/fibril/fibril.sock".into(),
        chaining_mode: "none".into(),
        exclusive: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        if a == "--exclusive" {
            i.exclusive = true;
            continue;
        }
        let (name, value) = match a.split_once('=') {
            Some((n, v)) => (n.to_string(), v.to_string()),
            None => (
                a.clone(),
                it.next()
                    .ok_or_else(|| format!("{a} needs a value"))?
                    .clone(),
            ),
        };
        match name.as_str() {
            "--conf-dir" => i.conf_dir = value.into(),
            "--conf-file" => i.conf_file = value,
            "--bin-dir" => i.bin_dir = value.into(),
            "--agent-socket" => i.agent_socket = value,
            "--chaining-mode" => i.chaining_mode = value,
            other => return Err(format!("unknown argument {other:?} (fibril-cni install --conf-dir DIR --conf-file NAME --bin-dir DIR --agent-socket PATH --chaining-mode none|portmap [--exclusive])")),
        }
    }
    if !["none", "portmap"].contains(&i.chaining_mode.as_str()) {
        return Err(format!(
            "--chaining-mode {:?}: none or portmap",
            i.chaining_mode
        ));
    }
    if !i.conf_file.ends_with(".conflist") || i.conf_file.contains('/') {
        return Err(format!(
            "--conf-file {:?}: a file name ending in .conflist",
            i.conf_file
        ));
    }
    Ok(i)
}

/// The configuration list Fibril's plugin is called with.
pub fn conflist(i: &Install) -> serde_json::Value {
    let mut plugins = vec![serde_json::json!({
        "type": "fibril-cni",
        "agentSocket": i.agent_socket,
    })];
    if i.chaining_mode == "portmap" {
        plugins
            .push(serde_json::json!({"type": "portmap", "capabilities": {"portMappings": true}}));
    }
    serde_json::json!({"cniVersion": "1.1.0", "name": "fibril", "plugins": plugins})
}

/// The plugin types Fibril's list may hold (a `--chaining-mode` given
/// before and not now is gone with the new list).
const OWN_TYPES: [&str; 2] = ["fibril-cni", "portmap"];

/// Fibril's list as it is to be written over `existing` (the file there
/// now, if any): without `--exclusive`, the plugins others chained after
/// Fibril's own entries are kept after them, as they were. A file that is
/// not a list of plugins keeps nothing.
pub fn merged_conflist(i: &Install, existing: Option<&[u8]>) -> serde_json::Value {
    let mut list = conflist(i);
    if i.exclusive {
        return list;
    }
    let Some(old) = existing.and_then(|b| serde_json::from_slice::<serde_json::Value>(b).ok())
    else {
        return list;
    };
    let chained: Vec<serde_json::Value> = old["plugins"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p.is_object() && !OWN_TYPES.iter().any(|t| p["type"] == *t))
        .cloned()
        .collect();
    if let Some(plugins) = list["plugins"].as_array_mut() {
        plugins.extend(chained);
    }
    list
}

/// Installs `plugin` (this binary) and the configuration; what it moved
/// aside.
pub fn install(i: &Install, plugin: &Path) -> std::io::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(&i.bin_dir)?;
    std::fs::create_dir_all(&i.conf_dir)?;
    // Copied beside, then renamed: a runtime never runs half a binary.
    let bin = i.bin_dir.join("fibril-cni");
    let tmp = i.bin_dir.join(".fibril-cni.tmp");
    std::fs::copy(plugin, &tmp)?;
    std::fs::rename(&tmp, &bin)?;
    let conf = i.conf_dir.join(&i.conf_file);
    let tmp = i.conf_dir.join(format!(".{}.tmp", i.conf_file));
    let existing = std::fs::read(&conf).ok();
    std::fs::write(
        &tmp,
        serde_json::to_string_pretty(&merged_conflist(i, existing.as_deref())).expect("json"),
    )?;
    std::fs::rename(&tmp, &conf)?;
    let mut moved = Vec::new();
    if i.exclusive {
        for entry in std::fs::read_dir(&i.conf_dir)? {
            let path = entry?.path();
            let name = path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default();
            let is_conf = [".conf", ".conflist", ".json"]
                .iter()
                .any(|e| name.ends_with(e));
            if is_conf && path != conf && !name.starts_with('.') {
                let aside = path.with_file_name(format!("{name}.fibril_bak"));
                std::fs::rename(&path, &aside)?;
                moved.push(aside);
            }
        }
    }
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirs(name: &str) -> (PathBuf, Install) {
        let root =
            std::env::temp_dir().join(format!("fibril-cni-install-{name}-{}", std::process::id()));
        std::fs::remove_dir_all(&root).ok();
        let args: Vec<String> = vec![
            format!("--conf-dir={}", root.join("net.d").display()),
            format!("--bin-dir={}", root.join("bin").display()),
        ];
        (root, parse_args(&args).unwrap())
    }

    #[test]
    fn not_exclusive_never_touches_other_plugins() {
        let (root, i) = dirs("shared");
        std::fs::create_dir_all(&i.conf_dir).unwrap();
        std::fs::write(i.conf_dir.join("10-istio-cni.conflist"), "{}").unwrap();
        let me = std::env::current_exe().unwrap();
        assert!(install(&i, &me).unwrap().is_empty());
        assert!(i.conf_dir.join("10-istio-cni.conflist").exists());
        let written: serde_json::Value =
            serde_json::from_slice(&std::fs::read(i.conf_dir.join("05-fibril.conflist")).unwrap())
                .unwrap();
        assert_eq!(written["plugins"][0]["type"], "fibril-cni");
        assert!(i.bin_dir.join("fibril-cni").exists());
        std::fs::remove_dir_all(root).ok();
    }

    /// Istio's installer appends its entry to the primary list; an agent
    /// restarting writes the list again and keeps it (and drops nothing
    /// of its own twice).
    #[test]
    fn plugins_chained_into_our_list_are_kept_unless_exclusive() {
        let (root, mut i) = dirs("chained");
        i.chaining_mode = "portmap".into();
        let me = std::env::current_exe().unwrap();
        install(&i, &me).unwrap();
        let path = i.conf_dir.join("05-fibril.conflist");
        let mut list: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let istio = serde_json::json!({"type": "istio-cni", "cni_agent_run_dir": "/var/run/istio-cni",
            "exclude_namespaces": ["kube-system"], "plugin_log_level": "info"});
        list["plugins"].as_array_mut().unwrap().push(istio.clone());
        std::fs::write(&path, list.to_string()).unwrap();

        install(&i, &me).unwrap();
        let again: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        let types: Vec<&str> = again["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["fibril-cni", "portmap", "istio-cni"]);
        assert_eq!(
            again["plugins"][2], istio,
            "kept as the other installer wrote it"
        );

        // A chaining mode given up goes with the new list.
        i.chaining_mode = "none".into();
        let types: Vec<serde_json::Value> =
            merged_conflist(&i, Some(&std::fs::read(&path).unwrap()))["plugins"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| p["type"].clone())
                .collect();
        assert_eq!(types, ["fibril-cni", "istio-cni"]);
        // Exclusive: Fibril's list alone.
        i.chaining_mode = "portmap".into();
        i.exclusive = true;
        install(&i, &me).unwrap();
        let alone: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        assert_eq!(alone["plugins"].as_array().unwrap().len(), 2);
        // A file that is not JSON keeps nothing and is replaced.
        assert_eq!(merged_conflist(&i, Some(b"{not json")), conflist(&i));
        std::fs::remove_dir_all(root).ok();
    }

    #[test]
    fn exclusive_moves_others_aside() {
        let (root, mut i) = dirs("exclusive");
        i.exclusive = true;
        std::fs::create_dir_all(&i.conf_dir).unwrap();
        std::fs::write(i.conf_dir.join("10-flannel.conflist"), "{}").unwrap();
        let moved = install(&i, &std::env::current_exe().unwrap()).unwrap();
        assert_eq!(
            moved,
            vec![i.conf_dir.join("10-flannel.conflist.fibril_bak")]
        );
        assert!(i.conf_dir.join("05-fibril.conflist").exists());
        std::fs::remove_dir_all(root).ok();
    }

    #[test]
    fn bad_arguments_are_named() {
        let e = parse_args(&["--chaining-mode=aws-cni".into()]).unwrap_err();
        assert!(e.contains("aws-cni"), "{e}");
        let e = parse_args(&["--conf-dir".into()]).unwrap_err();
        assert!(e.contains("needs a value"), "{e}");
        let e = parse_args(&["--bogus=1".into()]).unwrap_err();
        assert!(e.contains("--bogus"), "{e}");
        let i = parse_args(&["--chaining-mode".into(), "portmap".into()]).unwrap();
        assert_eq!(conflist(&i)["plugins"][1]["type"], "portmap");
    }
}
