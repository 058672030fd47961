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

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env_remove("PROTO_TASKER_TOKEN")
        .env_remove("PROTO_TASKER_SERVER")
        .output()
        .unwrap()
}

/// The long options `--help` of `args` lists.
fn options_in_help(args: &[&str]) -> Vec<String> {
    let mut a = args.to_vec();
    a.push("--help");
    let out = run(&a);
    assert!(out.status.success(), "{out:?}");
    stdout(&out)
        .lines()
        .filter_map(|l| l.trim_start().strip_prefix("--"))
        .map(|l| l.split([' ', '=']).next().unwrap_or("").to_string())
        .collect()
}

#[test]
fn each_command_help_lists_only_its_own_options() {
    let bench = options_in_help(&["bench"]);
    for other in ["server", "config", "log-format"] {
        assert!(
            !bench.contains(&other.to_string()),
            "bench --help lists --{other}: {bench:?}"
        );
    }
    assert!(bench.contains(&"tasks".to_string()), "{bench:?}");
    let list = options_in_help(&["list"]);
    for own in ["server", "token", "json", "state", "cursor"] {
        assert!(list.contains(&own.to_string()), "list --help: {list:?}");
    }
    assert!(!list.contains(&"config".to_string()), "{list:?}");
    let serve = options_in_help(&["serve"]);
    assert!(serve.contains(&"config".to_string()), "{serve:?}");
    assert!(!serve.contains(&"server".to_string()), "{serve:?}");
    let top = options_in_help(&[]);
    assert!(!top.contains(&"server".to_string()), "{top:?}");
}

#[test]
fn client_options_work_after_the_command_too() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), "");
    let out = run(&["queues", "--server", &node.url, "--json"]);
    assert!(out.status.success(), "{out:?}");
    let v: Value = serde_json::from_slice(&out.stdout).expect("--json after the command");
    assert!(v["queues"].is_array(), "{v}");
}

#[test]
fn bash_completion_completes_commands_and_their_options() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("proto_tasker.bash");
    let out = run(&["completions", "bash"]);
    assert!(out.status.success(), "{out:?}");
    std::fs::write(&script, &out.stdout).unwrap();
    // Ask the completion function what bash would offer (bash calls it
    // with the command, the word being completed and the one before).
    let complete = |line: &str| -> String {
        let words: Vec<&str> = line.split(' ').collect();
        let out = Command::new("bash")
            .arg("-c")
            .arg(format!(
                "source {}; COMP_WORDS=({}); COMP_CWORD={}; COMP_LINE='{line}'; \
                 COMP_POINT=${{#COMP_LINE}}; \
                 _proto_tasker proto_tasker \"${{COMP_WORDS[COMP_CWORD]}}\" \"${{COMP_WORDS[COMP_CWORD-1]}}\"; \
                 echo \"${{COMPREPLY[@]}}\"",
                script.display(),
                words.join(" "),
                words.len() - 1
            ))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        stdout(&out)
    };
    let commands = complete("proto_tasker li");
    assert!(
        commands.split_whitespace().any(|w| w == "list"),
        "{commands}"
    );
    let options = complete("proto_tasker bench --ta");
    assert!(
        options.split_whitespace().any(|w| w == "--tasks"),
        "{options}"
    );
}

#[test]
fn completions_for_zsh_and_fish_name_the_commands() {
    for (shell, marker) in [
        ("zsh", "#compdef proto_tasker"),
        ("fish", "complete -c proto_tasker"),
    ] {
        let out = run(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {out:?}");
        let text = stdout(&out);
        assert!(text.contains(marker), "{shell}: no {marker:?}");
        assert!(text.contains("schedules"), "{shell}: commands missing");
    }
    let bad = run(&["completions", "cmd.exe"]);
    assert_eq!(bad.status.code(), Some(1), "{bad:?}");
}

#[test]
fn man_pages_render_without_warnings() {
    let out = run(&["man"]);
    assert!(out.status.success(), "{out:?}");
    let page = stdout(&out);
    assert!(
        page.starts_with(".ie") || page.contains(".TH proto_tasker 1"),
        "{page}"
    );
    let dir = tempfile::tempdir().unwrap();
    let written = run(&["man", "--out", dir.path().to_str().unwrap()]);
    assert!(written.status.success(), "{written:?}");
    for page in [
        "proto_tasker.1",
        "proto_tasker-bench.1",
        "proto_tasker-list.1",
    ] {
        assert!(dir.path().join(page).is_file(), "{page} not written");
    }
    if Command::new("groff").arg("--version").output().is_err() {
        eprintln!("SKIPPED the groff check of the man page: apt-get install groff-base");
        return;
    }
    let groff = Command::new("groff")
        .args(["-man", "-Tutf8", "-ww", "-z"])
        .arg(dir.path().join("proto_tasker-bench.1"))
        .output()
        .unwrap();
    assert!(
        groff.status.success() && groff.stderr.is_empty(),
        "groff: {}",
        String::from_utf8_lossy(&groff.stderr)
    );
}

#[test]
fn bench_shows_progress_on_a_terminal_and_nothing_when_piped() {
    let args = ["bench", "--tasks", "20000", "--rate", "0"];
    let piped = run(&args);
    assert!(piped.status.success(), "{piped:?}");
    assert!(
        piped.stderr.is_empty(),
        "piped: {}",
        String::from_utf8_lossy(&piped.stderr)
    );
    assert!(stdout(&piped).contains("drain"), "{}", stdout(&piped));
    // `script` gives the command a terminal.
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("SKIPPED the terminal half: `script` (util-linux) is missing");
        return;
    }
    let tty = Command::new("script")
        .args(["-qec", &format!("{BIN} {}", args.join(" ")), "/dev/null"])
        .output()
        .unwrap();
    assert!(tty.status.success(), "{tty:?}");
    let screen = String::from_utf8_lossy(&tty.stdout);
    assert!(
        screen.contains("\r\x1b[2Kenqueue: ") && screen.contains(" of 20000 tasks"),
        "no progress line on a terminal: {screen:?}"
    );
}

#[test]
fn schedules_are_paused_resumed_and_triggered_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(
        dir.path(),
        "schedules:\n  - {name: nightly, cron: \"0 3 * * *\", kind: noop}\n",
    );
    let paused = cli(&node, &["schedule", "pause", "nightly"]);
    assert!(paused.status.success(), "{paused:?}");
    assert_eq!(stdout(&paused).trim(), "nightly paused");
    let listed = stdout(&cli(&node, &["schedules"]));
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("nightly") && l.contains("paused")),
        "{listed}"
    );
    let triggered = cli(&node, &["schedule", "trigger", "nightly"]);
    assert!(triggered.status.success(), "{triggered:?}");
    let id = stdout(&triggered).trim().to_string();
    assert!(id.parse::<i64>().is_ok(), "{id:?}");
    let status = cli(&node, &["status", &id, "--json"]);
    let task: Value = serde_json::from_slice(&status.stdout).unwrap();
    assert_eq!(task["kind"], "noop");
    let resumed = cli(&node, &["schedule", "resume", "nightly"]);
    assert_eq!(stdout(&resumed).trim(), "nightly resumed");
    let missing = cli(&node, &["schedule", "pause", "nope"]);
    assert_eq!(missing.status.code(), Some(1), "{missing:?}");
}

#[test]
fn a_queue_cap_is_set_and_shown_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), "");
    let set = cli(
        &node,
        &["queue", "set", "default", "--max-depth", "1", "--json"],
    );
    assert!(set.status.success(), "{set:?}");
    let q: Value = serde_json::from_slice(&set.stdout).unwrap();
    assert_eq!(q["max_depth"], 1);
    let shown = stdout(&cli(&node, &["queue", "show", "default"]));
    assert!(shown.contains("MAX_DEPTH"), "{shown}");
    cli(&node, &["pause", "default"]);
    assert!(cli(&node, &["submit", "noop"]).status.success());
    let refused = cli(&node, &["submit", "noop"]);
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("full"), "{err}");
    let cleared = cli(
        &node,
        &["queue", "set", "default", "--max-depth", "none", "--json"],
    );
    let q: Value = serde_json::from_slice(&cleared.stdout).unwrap();
    assert!(q["max_depth"].is_null(), "{q}");
    let bad = cli(&node, &["queue", "set", "default", "--max-depth", "lots"]);
    assert_eq!(bad.status.code(), Some(1), "{bad:?}");
    // The limits, shared by the cluster.
    let set = cli(
        &node,
        &[
            "queue",
            "set",
            "default",
            "--global-concurrency",
            "2",
            "--per-key-concurrency",
            "1",
            "--rate-limit",
            "10/1s",
            "--fairness",
            "round_robin",
            "--workers",
            "3",
            "--json",
        ],
    );
    assert!(set.status.success(), "{set:?}");
    let q: Value = serde_json::from_slice(&set.stdout).unwrap();
    assert_eq!(q["global_concurrency"], 2, "{q}");
    assert_eq!(q["per_key_concurrency"], 1, "{q}");
    assert_eq!(
        q["rate_limit"],
        serde_json::json!({"max": 10, "per_ms": 1000}),
        "{q}"
    );
    assert_eq!(q["fairness"], "round_robin", "{q}");
    assert_eq!(q["workers"], 3, "{q}");
    let shown = stdout(&cli(&node, &["queue", "show", "default"]));
    assert!(
        shown.contains("global 2") && shown.contains("round robin"),
        "{shown}"
    );
    let cleared = cli(
        &node,
        &[
            "queue",
            "set",
            "default",
            "--global-concurrency",
            "none",
            "--rate-limit",
            "none",
            "--json",
        ],
    );
    let q: Value = serde_json::from_slice(&cleared.stdout).unwrap();
    assert!(
        q["global_concurrency"].is_null() && q["rate_limit"].is_null(),
        "{q}"
    );
    assert_eq!(q["per_key_concurrency"], 1, "the others are kept: {q}");
    for bad in [
        vec!["queue", "set", "default", "--rate-limit", "fast"],
        vec!["queue", "set", "default", "--workers", "0"],
        vec!["queue", "set", "default"],
    ] {
        let out = cli(&node, &bad);
        assert_eq!(out.status.code(), Some(1), "{bad:?}: {out:?}");
    }
}

#[test]
fn submit_wait_shows_progress_on_a_terminal() {
    if Command::new("script").arg("--version").output().is_err() {
        eprintln!("SKIPPED: `script` (util-linux) is missing");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), "executors:\n  shell:\n    allow: [sh]\n");
    let args = r#"{"cmd": ["sh", "-c", "for i in 25 50 75; do echo \"::progress {\\\"pct\\\": $i, \\\"message\\\": \\\"step $i\\\"}\"; sleep 1.2; done; echo finished"]}"#;
    let run = dir.path().join("run.sh");
    std::fs::write(
        &run,
        format!(
            "exec {BIN} submit shell --server {} --wait --args '{args}'\n",
            node.url
        ),
    )
    .unwrap();
    let out = Command::new("script")
        .args(["-qec", &format!("sh {}", run.display()), "/dev/null"])
        .env_remove("PROTO_TASKER_TOKEN")
        .output()
        .unwrap();
    let screen = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{screen}");
    assert!(
        screen.contains(": 25% step 25") || screen.contains(": 50% step 50"),
        "no progress on the terminal: {screen:?}"
    );
    assert!(screen.contains("finished"), "{screen:?}");
    // Piped, the same command prints only the result.
    let piped = Command::new("sh").arg(&run).output().unwrap();
    assert!(piped.status.success(), "{piped:?}");
    assert!(!String::from_utf8_lossy(&piped.stderr).contains("step"));
}

#[test]
fn tasks_are_tagged_and_found_by_tag_and_args_from_the_cli() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), "");
    cli(&node, &["pause", "default"]);
    let a = cli(
        &node,
        &[
            "submit",
            "noop",
            "--tag",
            "customer:42",
            "--tag",
            "vip",
            "--args",
            r#"{"order":1}"#,
        ],
    );
    assert!(a.status.success(), "{a:?}");
    let a = stdout(&a).trim().to_string();
    let b = cli(
        &node,
        &[
            "submit",
            "noop",
            "--tag",
            "customer:43",
            "--args",
            r#"{"order":2}"#,
        ],
    );
    let b = stdout(&b).trim().to_string();
    let ids = |args: &[&str]| -> Vec<String> {
        let mut all = vec!["list", "--json"];
        all.extend_from_slice(args);
        let out = cli(&node, &all);
        assert!(out.status.success(), "{out:?}");
        let page: Value = serde_json::from_slice(&out.stdout).unwrap();
        page["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| t["id"].to_string())
            .collect()
    };
    assert_eq!(ids(&["--tag", "customer:42"]), vec![a.clone()]);
    assert_eq!(ids(&["--tag", "vip"]), vec![a.clone()]);
    assert_eq!(ids(&["--args", r#"{"order":2}"#]), vec![b.clone()]);
    assert_eq!(
        ids(&["--tag", "customer:43", "--args", r#"{"order":1}"#]),
        Vec::<String>::new()
    );
    let bad = cli(&node, &["list", "--args", "[1]"]);
    assert_eq!(bad.status.code(), Some(1), "{bad:?}");
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("args"),
        "{bad:?}"
    );
}

#[test]
fn submit_takes_the_unique_rules() {
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), "");
    cli(&node, &["pause", "default"]);
    let first = cli(
        &node,
        &[
            "submit",
            "noop",
            "--unique-key",
            "k",
            "--on-conflict",
            "error",
        ],
    );
    assert!(first.status.success(), "{first:?}");
    let second = cli(
        &node,
        &[
            "submit",
            "noop",
            "--unique-key",
            "k",
            "--on-conflict",
            "error",
        ],
    );
    assert_eq!(second.status.code(), Some(1), "{second:?}");
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(err.contains("unique_key") && err.contains("held"), "{err}");
    let replaced = cli(
        &node,
        &[
            "submit",
            "noop",
            "--unique-key",
            "k",
            "--on-conflict",
            "replace",
            "--args",
            r#"{"v":2}"#,
            "--json",
        ],
    );
    let t: Value = serde_json::from_slice(&replaced.stdout).unwrap();
    assert_eq!(t["id"].to_string(), stdout(&first).trim());
    assert_eq!(t["args"], serde_json::json!({"v": 2}));
    let said = stdout(&cli(
        &node,
        &[
            "submit",
            "noop",
            "--unique-key",
            "k",
            "--on-conflict",
            "replace",
        ],
    ));
    assert!(said.contains("takes these args"), "{said}");
    let bad = cli(
        &node,
        &[
            "submit",
            "noop",
            "--unique-key",
            "z",
            "--unique-states",
            "available,completed",
        ],
    );
    assert_eq!(bad.status.code(), Some(1), "{bad:?}");
    assert!(
        String::from_utf8_lossy(&bad.stderr).contains("unique_states"),
        "{bad:?}"
    );
    let windowed = cli(
        &node,
        &[
            "submit",
            "noop",
            "--unique-key",
            "w",
            "--unique-for",
            "10m",
            "--json",
        ],
    );
    assert!(windowed.status.success(), "{windowed:?}");
}
