//! The built binary's client commands against a live node (also the binary).

mod fixtures;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_proto_tasker");

type Node = fixtures::NodeProcess;

fn start_node(dir: &Path, extra: &str) -> Node {
    fixtures::NodeProcess::start(
        dir,
        &format!(
            "store:\n  path: {}\npool:\n  poll_interval: 50ms\n{}",
            dir.join("cli.db").display(),
            if extra.contains("server:") {
                extra.to_string()
            } else {
                format!("server:\n  listen: 127.0.0.1:0\n{extra}")
            }
        ),
    )
}

fn cli(node: &Node, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(["--server", &node.url])
        .args(args)
        .env_remove("PROTO_TASKER_TOKEN")
        .output()
        .unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn submit_wait_list_cancel_against_a_live_node() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), "executors:\n  shell:\n    allow: [echo]\n");

    let ok = cli(
        &node,
        &[
            "submit",
            "shell",
            "--args",
            r#"{"cmd": ["echo", "from the cli"]}"#,
            "--wait",
        ],
    );
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(stdout(&ok).contains("from the cli"), "{}", stdout(&ok));

    let failed = cli(
        &node,
        &[
            "submit",
            "fail",
            "--args",
            r#"{"message": "nope"}"#,
            "--max-attempts",
            "1",
            "--wait",
        ],
    );
    assert_eq!(
        failed.status.code(),
        Some(1),
        "a failed task exits non-zero"
    );
    assert!(stdout(&failed).contains("nope"));

    let later = cli(&node, &["submit", "noop", "--delay", "1h", "--json"]);
    assert!(later.status.success());
    let later: Value = serde_json::from_str(&stdout(&later)).unwrap();
    assert_eq!(later["state"], "scheduled");
    let id = later["id"].to_string();

    let cancel = cli(&node, &["cancel", &id]);
    assert!(cancel.status.success());
    assert!(stdout(&cancel).contains("cancelled"), "{}", stdout(&cancel));

    let list = cli(&node, &["list", "--json"]);
    let page: Value = serde_json::from_str(&stdout(&list)).unwrap();
    assert_eq!(page["tasks"].as_array().unwrap().len(), 3);
    let table = stdout(&cli(&node, &["list", "--state", "cancelled"]));
    assert!(table.starts_with("ID"), "{table}");
    assert!(
        table.contains(&id) && table.contains("cancelled"),
        "{table}"
    );

    let status = cli(&node, &["status", &id]);
    assert!(
        stdout(&status).contains("state         cancelled"),
        "{}",
        stdout(&status)
    );
    assert!(cli(&node, &["retry", &id]).status.success());

    assert!(stdout(&cli(&node, &["queues"])).contains("default"));
    assert!(cli(&node, &["pause", "default"]).status.success());
    assert!(stdout(&cli(&node, &["queues"])).contains("paused"));
    assert!(cli(&node, &["resume", "default"]).status.success());
    assert!(stdout(&cli(&node, &["nodes"])).contains("NODE"));

    // User errors exit 1 with the server's message.
    let missing = cli(&node, &["status", "424242"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("not found"));
    let bad = cli(
        &node,
        &[
            "submit",
            "shell",
            "--args",
            r#"{"cmd": ["rm", "-rf", "/"]}"#,
        ],
    );
    assert_eq!(bad.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("args.cmd"));
}

#[test]
fn an_unreachable_server_exits_2() {
    let out = Command::new(BIN)
        .args(["--server", "http://127.0.0.1:9", "list"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot reach"));
}

#[test]
fn a_token_protected_node_needs_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(
        dir.path(),
        "server:\n  listen: 127.0.0.1:0\n  auth_token: tok-123\n",
    );
    let without = cli(&node, &["list"]);
    assert_eq!(without.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&without.stderr).contains("Bearer"));
    assert!(cli(&node, &["--token", "tok-123", "list"]).status.success());
    let via_env = Command::new(BIN)
        .args(["--server", &node.url, "list"])
        .env("PROTO_TASKER_TOKEN", "tok-123")
        .output()
        .unwrap();
    assert!(via_env.status.success());
}

#[test]
fn log_format_json_writes_one_json_object_per_line() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("node.yaml");
    std::fs::write(
        &cfg,
        format!(
            "store:\n  path: {}\nserver:\n  listen: 127.0.0.1:0\n",
            dir.path().join("j.db").display()
        ),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .args([
            &format!("--config={}", cfg.display()),
            "--log-format",
            "json",
        ])
        .env("PROTO_TASKER_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let v: Value = serde_json::from_str(&first).unwrap_or_else(|e| panic!("{e}: {first}"));
    assert_eq!(v["level"], "INFO");
    assert!(v["fields"]["message"].is_string(), "{v}");
}

#[test]
fn binding_beyond_loopback_without_a_token_warns_loudly() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("node.yaml");
    std::fs::write(
        &cfg,
        format!(
            "store:\n  path: {}\nserver:\n  listen: 0.0.0.0:0\n",
            dir.path().join("w.db").display()
        ),
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .arg(format!("--config={}", cfg.display()))
        .env("PROTO_TASKER_LOG", "warn")
        .env_remove("PROTO_TASKER_TOKEN")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let first = BufReader::new(child.stderr.take().unwrap())
        .lines()
        .next()
        .unwrap()
        .unwrap();
    let _ = child.kill();
    let _ = child.wait();
    assert!(
        first.starts_with("WARNING: the API listens on 0.0.0.0"),
        "{first}"
    );
    assert!(first.contains("no auth token"), "{first}");
}

#[test]
fn audit_lists_operator_actions() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), "");
    assert!(cli(&node, &["pause", "default"]).status.success());
    assert!(cli(&node, &["resume", "default"]).status.success());
    let out = cli(&node, &["audit"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = stdout(&out);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].contains("POST /queues/{queue}/resume")
            && lines[0].contains("/queues/default/resume"),
        "{text}"
    );
    assert!(
        lines[1].contains("anonymous") && lines[1].contains("200 ok"),
        "{text}"
    );
    let json = cli(&node, &["audit", "--json", "--limit", "1"]);
    let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(v["entries"].as_array().unwrap().len(), 1);
    assert!(v["next_cursor"].is_string());
}
