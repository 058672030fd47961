//! The OpenAPI document, checked with tools nobody here wrote.
//!
//! - `docs/openapi.json` is exactly what the binary prints
//!   (`proto_tasker openapi`) and what a node serves at
//!   `/api/v1/openapi.json` (behind the token, like the rest of the API);
//! - `openapi-spec-validator` (PyPI) finds it a valid OpenAPI 3.1 document;
//! - Schemathesis (PyPI) sends its generated requests, valid and invalid, to
//!   a live node on SQLite and on PostgreSQL (the latter with a token): every
//!   answer's status, content type and body conform to the document, no
//!   answer is a 5xx, and the node logs no error and no panic.
//!
//! Both tools live in a virtual environment at `target/pyenv`, which
//! `.ci/run` makes (nothing is installed globally). Without it these tests
//! print SKIPPED, except under `CI=true`, where they fail.

mod fixtures;

use std::path::{Path, PathBuf};
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_proto_tasker");

fn docs_file() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/openapi.json")
}

/// A tool of `target/pyenv` (or `$PROTO_TASKER_PYENV`): its path, or
/// `None` after a SKIPPED line (a failure under CI).
fn pyenv_tool(test: &str, name: &str) -> Option<PathBuf> {
    let env = std::env::var_os("PROTO_TASKER_PYENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target/pyenv"));
    let tool = env.join("bin").join(name);
    if tool.is_file() {
        return Some(tool);
    }
    let how = format!(
        "{test}: {} is missing; make it with `python3 -m venv target/pyenv && \
         target/pyenv/bin/pip install schemathesis openapi-spec-validator` (.ci/run does)",
        tool.display()
    );
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "{how} (CI: this test never skips)"
    );
    eprintln!("SKIPPED {how}");
    None
}

#[test]
fn docs_openapi_json_is_what_the_binary_prints() {
    let out = Command::new(BIN)
        .arg("openapi")
        .output()
        .expect("run openapi");
    assert!(out.status.success(), "{out:?}");
    let printed = String::from_utf8(out.stdout).expect("utf-8");
    let docs = std::fs::read_to_string(docs_file()).expect("read docs/openapi.json");
    assert!(
        printed == docs,
        "docs/openapi.json is stale: run `cargo run -- openapi --out docs/openapi.json`"
    );
    let doc: serde_json::Value = serde_json::from_str(&docs).expect("json");
    assert_eq!(doc["openapi"], "3.1.0");
    // Every route the router has is in the document.
    for path in [
        "/api/v1/tasks",
        "/api/v1/tasks/batch",
        "/api/v1/tasks/retry",
        "/api/v1/tasks/{id}",
        "/api/v1/tasks/{id}/cancel",
        "/api/v1/tasks/{id}/retry",
        "/api/v1/queues",
        "/api/v1/queues/{queue}/pause",
        "/api/v1/queues/{queue}/resume",
        "/api/v1/nodes",
        "/api/v1/schedules",
        "/api/v1/schedules/{name}",
        "/api/v1/stats",
        "/api/v1/whoami",
        "/api/v1/audit",
        "/api/v1/openapi.json",
        "/healthz",
        "/readyz",
        "/metrics",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} is not documented");
    }
}

#[tokio::test]
async fn a_node_serves_the_document_behind_its_token() {
    let dir = tempfile::tempdir().unwrap();
    let node = fixtures::NodeProcess::start(
        dir.path(),
        &format!(
            "store:\n  path: {}\nserver:\n  listen: 127.0.0.1:0\n  auth_token: s3cret-token\n",
            dir.path().join("n.db").display()
        ),
    );
    let http = reqwest::Client::new();
    let url = format!("{}/api/v1/openapi.json", node.url);
    let anonymous = http.get(&url).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let served = http
        .get(&url)
        .bearer_auth("s3cret-token")
        .send()
        .await
        .unwrap();
    assert_eq!(served.status(), 200);
    let served: serde_json::Value = served.json().await.unwrap();
    let docs: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(docs_file()).unwrap()).unwrap();
    assert!(
        served == docs,
        "the node serves another document than docs/openapi.json"
    );
}

#[test]
fn the_document_is_valid_openapi() {
    let Some(validator) = pyenv_tool("the_document_is_valid_openapi", "openapi-spec-validator")
    else {
        return;
    };
    let out = Command::new(validator)
        .arg(docs_file())
        .output()
        .expect("run openapi-spec-validator");
    assert!(
        out.status.success(),
        "openapi-spec-validator: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A broken document fails the validator (the check can fail).
#[test]
fn the_validator_refuses_a_broken_document() {
    let Some(validator) = pyenv_tool(
        "the_validator_refuses_a_broken_document",
        "openapi-spec-validator",
    ) else {
        return;
    };
    let mut doc: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(docs_file()).unwrap()).unwrap();
    // A response without its required description.
    doc["paths"]["/healthz"]["get"]["responses"]["200"]
        .as_object_mut()
        .unwrap()
        .remove("description");
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.json");
    std::fs::write(&broken, doc.to_string()).unwrap();
    let out = Command::new(validator).arg(&broken).output().unwrap();
    assert!(
        !out.status.success(),
        "the validator took a broken document"
    );
}

/// Run Schemathesis against `node` (whose document it fetches), then check
/// the node's log. The nodes set `server.max_wait: 2s`: a generated
/// `?wait=` on a task that does not finish would otherwise hold a request
/// for up to 300 s (one held 30 s and timed out a CI run).
fn schemathesis(test: &str, node: &fixtures::NodeProcess, token: Option<&str>) {
    let Some(st) = pyenv_tool(test, "schemathesis") else {
        return;
    };
    let mut cmd = Command::new(st);
    cmd.arg("run")
        .arg(format!("{}/api/v1/openapi.json", node.url))
        .args(["--max-examples", "15", "--request-timeout", "30"])
        // A request valid by the document may still be refused for what
        // only the node knows: a kind it does not run, a program off the
        // shell allow-list, a cron expression that does not parse, a
        // task id that names no task. Every other check runs.
        .args(["--exclude-checks", "positive_data_acceptance"])
        .env("NO_COLOR", "1")
        .env("SCHEMATHESIS_HOOKS", "")
        .current_dir(env!("CARGO_TARGET_TMPDIR"));
    if let Some(t) = token {
        cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
    }
    let out = cmd.output().expect("run schemathesis");
    let report = String::from_utf8_lossy(&out.stdout);
    let summary: Vec<&str> = report
        .lines()
        .filter(|l| l.contains(" generated, ") || l.starts_with("Seed:"))
        .collect();
    eprintln!("{test}: schemathesis {}", summary.join("; "));
    assert!(
        out.status.success(),
        "{test}: schemathesis found failures:\n{report}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bad: Vec<String> = node
        .log()
        .into_iter()
        .filter(|l| l.contains(" ERROR ") || l.contains("panicked"))
        .collect();
    assert!(
        bad.is_empty(),
        "{test}: the node logged:\n{}",
        bad.join("\n")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_nothing_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let node = fixtures::NodeProcess::start(
        dir.path(),
        &format!(
            "store:\n  path: {}\nserver:\n  listen: 127.0.0.1:0\n  max_wait: 2s\npool:\n  poll_interval: 50ms\n",
            dir.path().join("n.db").display()
        ),
    );
    tokio::task::spawn_blocking(move || {
        schemathesis("schemathesis_finds_nothing_on_sqlite", &node, None)
    })
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_nothing_on_postgres_with_a_token() {
    let (_store, guard) = fixtures::pg_store().await;
    let dir = tempfile::tempdir().unwrap();
    let node = fixtures::NodeProcess::start(
        dir.path(),
        &format!(
            "store:\n  kind: postgres\n  url: {}\n  schema: {}\n\
             server:\n  listen: 127.0.0.1:0\n  auth_token: st-token-123\n  max_wait: 2s\n\
             pool:\n  poll_interval: 50ms\n",
            guard.url, guard.schema
        ),
    );
    tokio::task::spawn_blocking(move || {
        schemathesis(
            "schemathesis_finds_nothing_on_postgres_with_a_token",
            &node,
            Some("st-token-123"),
        )
    })
    .await
    .unwrap();
}
