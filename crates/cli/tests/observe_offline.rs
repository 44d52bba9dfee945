//! `fibril observe` where no server is needed, checked against what the
//! real hubble CLI (v1.19.4) printed (`shared/spec/hubble-samples`):
//! `--print-raw-filters` for every recorded command line, and
//! `--input-file` reading hubble's jsonpb lines back.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn samples() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/spec");
    assert!(
        dir.is_dir(),
        "../shared/spec is absent: clone the project next to shared/"
    );
    dir
}

fn fibril(args: &[String], stdin: Option<&[u8]>) -> Output {
    use std::io::Write;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_fibril"));
    cmd.args(args)
        .env_remove("HUBBLE_SERVER")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or_default()).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

/// The recorded command's words (`--cel-expression` takes the rest of the
/// line: it was quoted).
fn words(command: &str) -> Vec<String> {
    let rest = command.strip_prefix("hubble observe").unwrap().trim();
    match rest.split_once("--cel-expression ") {
        Some((before, expr)) => {
            let mut w: Vec<String> = before.split_whitespace().map(String::from).collect();
            w.push("--cel-expression".into());
            w.push(expr.into());
            w
        }
        None => rest.split_whitespace().map(String::from).collect(),
    }
}

#[test]
fn print_raw_filters_matches_the_real_cli_for_every_recorded_command() {
    let text =
        std::fs::read_to_string(samples().join("hubble-samples/raw-filters-examples.txt")).unwrap();
    let mut checked = 0;
    for block in text.split("### ").skip(1) {
        let (command, expected) = block.split_once('\n').unwrap();
        let expected = expected.trim_end_matches('\n').to_string() + "\n";
        let mut args = vec!["observe".to_string()];
        args.extend(words(command));
        args.push("--print-raw-filters".into());
        let out = fibril(&args, None);
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        if let Some(err) = expected.strip_prefix("invalid argument ") {
            // hubble names the flag being parsed, then the reason.
            let reason = err.split_once("flag: ").unwrap().1.trim();
            assert!(!out.status.success(), "{command}: accepted");
            assert!(stderr.contains(reason), "{command}: {stderr}");
        } else {
            assert!(out.status.success(), "{command}: {stderr}");
            assert_eq!(stdout, expected, "{command}");
        }
        checked += 1;
    }
    assert!(checked >= 40, "only {checked} examples");
}

/// The block of `hubble-api.md` that shows the real CLI's compact output
/// for `flows-input.jsonl`.
fn verbatim_compact() -> Vec<String> {
    let doc = std::fs::read_to_string(samples().join("hubble-api.md")).unwrap();
    let start = doc
        .find("Verbatim output for `hubble-samples/flows-input.jsonl`:")
        .unwrap();
    let block = &doc[start..];
    let open = block.find("```\n").unwrap() + 4;
    let close = open + block[open..].find("```").unwrap();
    block[open..close].lines().map(String::from).collect()
}

#[test]
fn input_file_prints_as_the_real_cli_and_filters_here() {
    let input = samples().join("hubble-samples/flows-input.jsonl");
    let path = input.to_str().unwrap().to_string();
    let run = |extra: &[&str]| -> Vec<String> {
        let mut args = vec!["observe".to_string(), "--input-file".into(), path.clone()];
        args.extend(extra.iter().map(|s| s.to_string()));
        let out = fibril(&args, None);
        assert!(
            out.status.success(),
            "{extra:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(String::from)
            .collect()
    };
    let all = verbatim_compact();
    assert_eq!(all.len(), 9);
    assert_eq!(run(&[]), all, "every line, as the real CLI printed them");
    assert_eq!(run(&["--verdict", "DROPPED"]), vec![all[5].clone()]);
    assert_eq!(run(&["--last", "2"]), all[7..].to_vec());
    assert_eq!(run(&["--first", "1"]), all[..1].to_vec());
    let http: Vec<String> = run(&["--protocol", "http", "--not", "--http-status", "200"]);
    assert_eq!(
        http,
        vec![all[2].clone()],
        "the request; its 200 response left out"
    );
    assert_eq!(
        run(&[
            "--since",
            "2026-01-15T10:00:04Z",
            "--until",
            "2026-01-15T10:00:05Z"
        ])
        .len(),
        2
    );
    let numeric = run(&["--numeric", "--to-identity", "world"]);
    assert_eq!(numeric.len(), 1);
    assert!(
        numeric[0].contains("10.0.1.10 (ID:12345) <> 104.198.14.52 (world)"),
        "{numeric:?}"
    );

    // Standard input, and a line that is not a flow: reported, skipped.
    let mut data = std::fs::read(&input).unwrap();
    data.extend_from_slice(b"{\"flow\": 42}\n");
    let out = fibril(
        &["observe".into(), "--input-file".into(), "-".into()],
        Some(&data),
    );
    assert!(out.status.success());
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 9);
    assert!(String::from_utf8_lossy(&out.stderr).contains("line 10: not a GetFlowsResponse"));
    let out = fibril(
        &[
            "observe".into(),
            "--input-file".into(),
            "-".into(),
            "-s".into(),
        ],
        Some(&data),
    );
    assert!(out.stderr.is_empty(), "--silent-errors");

    // JSON out: the same lines hubble's jsonpb would give back.
    let json = run(&["-o", "json", "--first", "1"]);
    let again: serde_json::Value = serde_json::from_str(&json[0]).unwrap();
    assert_eq!(
        again["flow"]["uuid"],
        "11111111-1111-4111-8111-111111111111"
    );
}

#[test]
fn bad_raw_filters_and_durations_are_refused() {
    let run = |args: &[&str]| {
        fibril(
            &args.iter().map(|s| s.to_string()).collect::<Vec<_>>(),
            None,
        )
    };
    let out = run(&[
        "observe",
        "--allowlist",
        "{\"source_pod\": 3}",
        "--print-raw-filters",
    ]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid --allowlist flag"));
    let out = run(&[
        "observe",
        "--denylist",
        "{\"nope\":[]}",
        "--print-raw-filters",
    ]);
    assert!(String::from_utf8_lossy(&out.stderr).contains("nope"));
    let out = run(&["observe", "--timeout", "5 seconds", "--print-raw-filters"]);
    assert!(!out.status.success());
    let out = run(&[
        "observe",
        "--time-format",
        "Sometime",
        "--print-raw-filters",
    ]);
    assert!(!out.status.success());
    let out = run(&[
        "observe",
        "--ip-translation=false",
        "--time-format",
        "yearmonthday",
        "--print-raw-filters",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
