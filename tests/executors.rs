//! The built-in `shell` and `http` executors, run through a real pool.

mod fixtures;

use std::sync::Arc;
use std::time::Duration;

use proto_tasker::executors::http::HttpExecutor;
use proto_tasker::executors::shell::{ShellExecutor, ShellPolicy};
use proto_tasker::{Builder, NewTask, TaskOptions, TaskRegistry, TaskState, WorkerPool};
use serde_json::json;

async fn pool(registry: TaskRegistry) -> (WorkerPool, tempfile::TempDir) {
    let (store, dir) = fixtures::sqlite_store().await;
    let p = Builder::new(store, registry)
        .poll_interval(Duration::from_millis(50))
        .build()
        .unwrap();
    p.start().await.unwrap();
    (p, dir)
}

fn shell(allow: &[&str], max_output: usize) -> TaskRegistry {
    let mut r = TaskRegistry::new();
    r.register(
        "shell",
        Arc::new(
            ShellExecutor::from_policy(ShellPolicy {
                allow: allow.iter().map(|s| s.to_string()).collect(),
                env_allow: vec!["GREETING".into()],
                cwd_allow: vec![std::env::temp_dir()],
                max_output,
            })
            .unwrap(),
        ),
    );
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_runs_with_env_cwd_and_stdin_without_a_shell() {
    let (p, dir) = pool(shell(&["sh", "cat", "echo"], 1024)).await;
    let c = p.client();
    let cwd = dir.path().to_string_lossy().to_string();
    let t = c
        .enqueue("shell", json!({"cmd": ["sh", "-c", "echo \"$GREETING from $(pwd)\"; echo oops >&2"], "env": {"GREETING": "hi"}, "cwd": cwd}))
        .await
        .unwrap();
    let t = c.wait(t.id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(t.state, TaskState::Completed, "{:?}", t.errors);
    let r = t.result.unwrap();
    assert_eq!(r["stdout"], format!("hi from {cwd}\n"));
    assert_eq!(r["stderr"], "oops\n");
    assert_eq!(r["exit_code"], 0);
    let t = c
        .enqueue("shell", json!({"cmd": ["cat"], "stdin": "piped in"}))
        .await
        .unwrap();
    let t = c.wait(t.id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(t.result.unwrap()["stdout"], "piped in");
    // No shell interpolation: the argument arrives as written.
    let t = c
        .enqueue("shell", json!({"cmd": ["echo", "$HOME; rm -rf /"]}))
        .await
        .unwrap();
    let t = c.wait(t.id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(t.result.unwrap()["stdout"], "$HOME; rm -rf /\n");
    p.shutdown().await;
}

/// A task's trace context reaches the program it runs (the OpenTelemetry
/// environment carrier).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_programs_get_the_tasks_trace_context() {
    let (p, _dir) = pool(shell(&["sh"], 1024)).await;
    let c = p.client();
    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let run = |env: serde_json::Value, traceparent: Option<&str>| {
        let c = c.clone();
        let mut o = TaskOptions::default();
        if let Some(tp) = traceparent {
            o = o.traceparent(tp);
        }
        async move {
            let t = c
                .insert(
                    NewTask::new(
                        "shell",
                        json!({"cmd": ["sh", "-c", "printf %s \"$TRACEPARENT\""], "env": env}),
                    )
                    .with(o),
                )
                .await
                .unwrap()
                .task;
            let t = c.wait(t.id, Duration::from_secs(10)).await.unwrap();
            t.result.unwrap()["stdout"].as_str().unwrap().to_string()
        }
    };
    assert_eq!(run(json!({}), Some(tp)).await, tp);
    assert_eq!(run(json!({}), None).await, "", "no context, no variable");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_failure_keeps_the_stderr_tail_and_output_is_capped() {
    let (p, _dir) = pool(shell(&["sh"], 100)).await;
    let c = p.client();
    let opts = TaskOptions::default().max_attempts(1);
    let t = c
        .insert(
            NewTask::new(
                "shell",
                json!({"cmd": ["sh", "-c", "echo bad thing >&2; exit 3"]}),
            )
            .with(opts),
        )
        .await
        .unwrap()
        .task;
    let t = c.wait(t.id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(t.state, TaskState::Failed);
    assert!(
        t.errors[0].message.contains("exited with code 3"),
        "{:?}",
        t.errors
    );
    assert!(t.errors[0].message.contains("bad thing"), "{:?}", t.errors);
    let t = c.enqueue("shell", json!({"cmd": ["sh", "-c", "i=0; while [ $i -lt 500 ]; do echo line$i; i=$((i+1)); done"]})).await.unwrap();
    let t = c.wait(t.id, Duration::from_secs(10)).await.unwrap();
    let out = t.result.unwrap()["stdout"].as_str().unwrap().to_string();
    assert_eq!(out.len(), 100, "tail capped at max_output");
    assert!(out.ends_with("line499\n"), "the tail is kept: {out}");
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_timeout_kills_the_whole_process_group() {
    let (p, dir) = pool(shell(&["sh"], 1024)).await;
    let c = p.client();
    let pidfile = dir.path().join("grandchild.pid");
    let script = format!("sleep 30 & echo $! > {}; wait", pidfile.display());
    let opts = TaskOptions::default()
        .max_attempts(1)
        .timeout(Duration::from_millis(300));
    let t = c
        .insert(NewTask::new("shell", json!({"cmd": ["sh", "-c", script]})).with(opts))
        .await
        .unwrap()
        .task;
    let t = c.wait(t.id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(t.state, TaskState::Failed);
    assert!(t.errors[0].message.contains("timed out"), "{:?}", t.errors);
    let pid: i32 = std::fs::read_to_string(&pidfile)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    // The background `sleep` was in the group: it must be gone (or a zombie being reaped).
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let gone = stat.is_empty() || stat.split_whitespace().nth(2) == Some("Z");
        if gone {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "grandchild {pid} survived the timeout: {stat}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_refuses_programs_off_the_allow_list_at_enqueue() {
    let (p, _dir) = pool(shell(&[], 1024)).await;
    let err = p
        .client()
        .enqueue("shell", json!({"cmd": ["echo", "x"]}))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("executors.shell.allow"), "{err}");
    p.shutdown().await;
}

async fn http_target() -> String {
    use axum::routing::{get, post};
    let app = axum::Router::new()
        .route("/ok", get(|| async { "fine" }))
        .route("/big", get(|| async { "z".repeat(10_000) }))
        .route(
            "/boom",
            get(|| async { (axum::http::StatusCode::INTERNAL_SERVER_ERROR, "it broke") }),
        )
        .route(
            "/echo",
            post(|headers: axum::http::HeaderMap, body: String| async move {
                format!(
                    "{}|{}",
                    headers
                        .get("x-test")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or(""),
                    body
                )
            }),
        );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    format!("http://{addr}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_calls_allowed_hosts_caps_bodies_and_fails_on_non_2xx() {
    let base = http_target().await;
    let mut r = TaskRegistry::new();
    r.register(
        "http",
        Arc::new(
            HttpExecutor::new(["127.0.0.1:*".to_string()], 1000, Duration::from_secs(5)).unwrap(),
        ),
    );
    let (p, _dir) = pool(r).await;
    let c = p.client();
    let run = |args: serde_json::Value| {
        let c = c.clone();
        async move {
            let opts = TaskOptions::default().max_attempts(1);
            let t = c
                .insert(NewTask::new("http", args).with(opts))
                .await
                .unwrap()
                .task;
            c.wait(t.id, Duration::from_secs(10)).await.unwrap()
        }
    };
    let t = run(json!({"url": format!("{base}/ok")})).await;
    assert_eq!(t.state, TaskState::Completed);
    assert_eq!(t.result.as_ref().unwrap()["body"], "fine");
    assert_eq!(t.result.as_ref().unwrap()["status"], 200);
    let t = run(json!({"url": format!("{base}/echo"), "method": "post", "headers": {"x-test": "yes"}, "body": "payload"})).await;
    assert_eq!(t.result.unwrap()["body"], "yes|payload");
    let t = run(json!({"url": format!("{base}/big")})).await;
    let r = t.result.unwrap();
    assert_eq!(r["body"].as_str().unwrap().len(), 1000);
    assert_eq!(r["truncated"], true);
    let t = run(json!({"url": format!("{base}/boom")})).await;
    assert_eq!(t.state, TaskState::Failed);
    assert!(
        t.errors[0].message.contains("HTTP 500: it broke"),
        "{:?}",
        t.errors
    );
    let err = c
        .enqueue("http", json!({"url": "http://localhost.example/x"}))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("args.url"), "{err}");
    let err = c
        .enqueue(
            "http",
            json!({"url": format!("{base}/ok"), "method": "GE T"}),
        )
        .await
        .unwrap_err();
    assert!(err.to_string().contains("args.method"), "{err}");
    p.shutdown().await;
}

/// The allow-list holds: a task can neither run another file (a path of
/// its own, a `PATH` of its own), nor reach the program through its
/// environment, nor run outside the allowed directories; what the program
/// sees is a cleared environment; big input and a background child that
/// holds the output open do not hang the task.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shell_allow_list_cannot_be_walked_around() {
    let (p, dir) = pool(shell(&["printf", "sh", "cat"], 1024)).await;
    let c = p.client();
    // A look-alike program of the task's own.
    let up = dir.path().join("up");
    std::fs::create_dir_all(&up).unwrap();
    std::fs::write(up.join("printf"), "#!/bin/sh\necho pwned\n").unwrap();
    let refused = |args: serde_json::Value, field: &'static str| {
        let c = c.clone();
        async move {
            let e = c.enqueue("shell", args).await.unwrap_err();
            assert!(e.to_string().contains(field), "{field}: {e}");
        }
    };
    refused(
        json!({"cmd": [up.join("printf").display().to_string()]}),
        "args.cmd",
    )
    .await;
    refused(
        json!({"cmd": ["printf", "x"], "env": {"PATH": up.display().to_string()}}),
        "args.env.PATH",
    )
    .await;
    for name in ["LD_PRELOAD", "BASH_ENV", "NODE_OPTIONS"] {
        refused(
            json!({"cmd": ["sh", "-c", "true"], "env": {name: "/tmp/x"}}),
            "args.env",
        )
        .await;
    }
    refused(json!({"cmd": ["sh", "-c", "pwd"], "cwd": "/"}), "args.cwd").await;
    let sneaky = format!("{}/../../etc", dir.path().display());
    refused(
        json!({"cmd": ["sh", "-c", "pwd"], "cwd": sneaky}),
        "args.cwd",
    )
    .await;
    // The program's environment: a fixed PATH, the mark, allowed names only.
    let t = c
        .enqueue(
            "shell",
            json!({"cmd": ["sh", "-c", "env"], "env": {"GREETING": "hi"}}),
        )
        .await
        .unwrap();
    let t = c.wait(t.id, Duration::from_secs(10)).await.unwrap();
    let out = t.result.unwrap()["stdout"].as_str().unwrap().to_string();
    let names: Vec<&str> = out
        .lines()
        .filter_map(|l| l.split_once('=').map(|(k, _)| k))
        .collect();
    for n in &names {
        assert!(
            [
                "PATH",
                "PWD",
                "GREETING",
                "PROTO_TASKER_PROCESS",
                "SHLVL",
                "_",
                "OLDPWD"
            ]
            .contains(n),
            "{n} reached the program: {out}"
        );
    }
    assert!(out.contains("PATH=/usr/local/bin:/usr/bin:/bin"), "{out}");
    // A path to an allowed file is the same program.
    let t = c
        .enqueue("shell", json!({"cmd": ["/bin/sh", "-c", "echo via path"]}))
        .await
        .unwrap();
    let t = c.wait(t.id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(t.result.unwrap()["stdout"], "via path\n");
    // A megabyte through cat: fed while its output is read.
    let big = "x".repeat(1 << 20);
    let t = c
        .enqueue("shell", json!({"cmd": ["cat"], "stdin": big}))
        .await
        .unwrap();
    let t = c.wait(t.id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(t.state, TaskState::Completed, "{:?}", t.errors);
    // A background child holding stdout: the task ends with its program.
    let started = std::time::Instant::now();
    let t = c
        .enqueue(
            "shell",
            json!({"cmd": ["sh", "-c", "sleep 30 & echo done"]}),
        )
        .await
        .unwrap();
    let t = c.wait(t.id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(t.result.unwrap()["stdout"], "done\n");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    p.shutdown().await;
}

/// The http allow-list holds too: an entry without a port allows only the
/// scheme's default port, a task cannot pick another virtual host with
/// `Host`, and a URL's credentials never show in errors.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_http_allow_list_holds_ports_hosts_and_secrets() {
    let base = http_target().await;
    let port = base.rsplit(':').next().unwrap().to_string();
    let exec = |hosts: &[&str]| {
        HttpExecutor::new(
            hosts.iter().map(|h| h.to_string()),
            1000,
            Duration::from_secs(5),
        )
        .unwrap()
    };
    use proto_tasker::TaskExecutor;
    let plain = exec(&["127.0.0.1"]);
    let e = plain
        .check_args(&json!({"url": format!("{base}/ok")}))
        .unwrap_err();
    assert_eq!(e.field, "args.url", "{e}");
    assert!(
        plain
            .check_args(&json!({"url": "http://127.0.0.1/ok"}))
            .is_ok()
    );
    let with_port = exec(&[&format!("127.0.0.1:{port}")]);
    assert!(
        with_port
            .check_args(&json!({"url": format!("{base}/ok")}))
            .is_ok()
    );
    assert!(
        with_port
            .check_args(&json!({"url": "http://127.0.0.1:1/ok"}))
            .is_err()
    );
    let e = with_port
        .check_args(&json!({"url": format!("{base}/ok"), "headers": {"HOST": "admin.internal"}}))
        .unwrap_err();
    assert_eq!(e.field, "args.headers.HOST", "{e}");
    let mut r = TaskRegistry::new();
    r.register("http", Arc::new(with_port));
    let (p, _dir) = pool(r).await;
    let c = p.client();
    let secret_url = format!("http://user:s3cr3t@127.0.0.1:{port}/boom");
    let opts = TaskOptions::default().max_attempts(1);
    let t = c
        .insert(NewTask::new("http", json!({"url": secret_url})).with(opts))
        .await
        .unwrap()
        .task;
    let t = c.wait(t.id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(t.state, TaskState::Failed);
    let msg = &t.errors[0].message;
    assert!(msg.contains("HTTP 500") && !msg.contains("s3cr3t"), "{msg}");
    p.shutdown().await;
}

/// A shell program reports progress by printing `::progress <json>` lines:
/// the latest is the task's progress, and those lines are not in stdout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_progress_lines_become_the_tasks_progress() {
    let (p, _dir) = pool(shell(&["sh"], 1024)).await;
    let c = p.client();
    let script = "echo start; echo '::progress {\"pct\": 10}'; sleep 0.6; \
                  echo '::progress {\"pct\": 90, \"step\": \"upload\"}'; \
                  echo '::progress not json'; printf done";
    let t = c
        .enqueue("shell", json!({"cmd": ["sh", "-c", script]}))
        .await
        .unwrap();
    // While it sleeps, the first report is stored.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let now = c.get(t.id).await.unwrap().unwrap();
        if now.progress == Some(json!({"pct": 10})) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no progress seen: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t = c.wait(t.id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(t.state, TaskState::Completed, "{:?}", t.errors);
    assert_eq!(
        t.result.unwrap()["stdout"],
        "start\n::progress not json\ndone"
    );
    // The last report lands even if the outcome was written first.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let done = c.get(t.id).await.unwrap().unwrap();
        if done.progress == Some(json!({"pct": 90, "step": "upload"})) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{:?}", done.progress);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    p.shutdown().await;
}

/// A shell program keeps a long attempt alive by printing
/// `::extend <duration>` lines (as `ctx.extend`); they are not in stdout,
/// and a program that stops printing them times out as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shell_extend_lines_move_the_deadline() {
    let (p, _dir) = pool(shell(&["sh"], 1024)).await;
    let c = p.client();
    let run = |script: &'static str| {
        let c = c.clone();
        async move {
            let opts = TaskOptions::default()
                .timeout(Duration::from_millis(400))
                .max_attempts(1);
            let t = c
                .insert(NewTask::new("shell", json!({"cmd": ["sh", "-c", script]})).with(opts))
                .await
                .unwrap()
                .task;
            c.wait(t.id, Duration::from_secs(20)).await.unwrap()
        }
    };
    let t = run("i=0; while [ $i -lt 8 ]; do echo '::extend 400ms'; sleep 0.2; i=$((i+1)); done; printf done").await;
    assert_eq!(t.state, TaskState::Completed, "{:?}", t.errors);
    assert_eq!(t.result.unwrap()["stdout"], "done");
    let t = run("echo '::extend 400ms'; sleep 5; printf late").await;
    assert_eq!(t.state, TaskState::Failed);
    assert!(t.errors[0].message.contains("timed out"), "{:?}", t.errors);
    p.shutdown().await;
}
