//! A lab the benches bring up from a lab file of their own, run `fibril`
//! against, and take down when dropped (also when the bench fails).

use std::path::{Path, PathBuf};
use std::process::Command;

pub struct BenchLab {
    pub name: String,
    /// The release binaries' directory (`fibril`, `fibril-echo`, ...).
    pub bin: PathBuf,
}

impl BenchLab {
    /// The directory of the release binaries next to this example.
    pub fn release_bin() -> anyhow::Result<PathBuf> {
        std::env::current_exe()?
            .parent()
            .and_then(|d| d.parent())
            .map(Path::to_path_buf)
            .filter(|d| d.join("fibril").exists())
            .ok_or_else(|| anyhow::anyhow!("build fibril first (cargo build --release --bins)"))
    }

    /// Brings up lab `name` from `lab_yaml`. The lab is owned (and taken
    /// down) from the moment `lab up` runs, so a half-made one goes too.
    pub fn up(bin: &Path, name: String, lab_yaml: &str) -> anyhow::Result<Self> {
        let lab = BenchLab {
            name,
            bin: bin.to_path_buf(),
        };
        let file = std::env::temp_dir().join(format!("{}.yaml", lab.name));
        std::fs::write(&file, lab_yaml)?;
        let up = lab.fibril(&["lab", "up", "-f", file.to_str().unwrap_or_default()]);
        std::fs::remove_file(&file).ok();
        anyhow::ensure!(
            up.status.success(),
            "lab up: {}",
            String::from_utf8_lossy(&up.stderr)
        );
        Ok(lab)
    }

    pub fn fibril(&self, args: &[&str]) -> std::process::Output {
        Command::new(self.bin.join("fibril"))
            .arg("--lab")
            .arg(&self.name)
            .args(args)
            .output()
            .expect("fibril runs")
    }

    /// The lab's `lab.json`.
    pub fn state(&self) -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_str(&std::fs::read_to_string(format!(
            "/run/fibril/labs/{}/lab.json",
            self.name
        ))?)?)
    }
}

impl Drop for BenchLab {
    fn drop(&mut self) {
        self.fibril(&["lab", "down"]);
    }
}
