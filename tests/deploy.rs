//! The deployment files: the Grafana dashboard queries only metrics a node
//! exports, the compose file has the promised services and files, and a real
//! Prometheus scrapes a running node and answers a query about it.

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto_tasker::store::Synchronous;
use serde_json::Value;

/// A node with metrics on 127.0.0.1:port that has run `n` noop tasks.
async fn node_with_metrics(dir: &Path, n: usize) -> (String, Arc<proto_tasker::WorkerPool>) {
    let mut cfg = proto_tasker::Config::default();
    cfg.store.path = dir.join("deploy.db");
    cfg.store.synchronous = Synchronous::Normal;
    cfg.pool.poll_interval = Duration::from_millis(50);
    cfg.server.listen = "127.0.0.1:0".into();
    let node = proto_tasker::Node::from_config(&cfg).await.unwrap();
    let base = format!("http://{}", node.local_addr().unwrap());
    let pool = node.pool().clone();
    tokio::spawn(node.run(std::future::pending()));
    let http = reqwest::Client::new();
    for _ in 0..n {
        let t: Value = http
            .post(format!("{base}/api/v1/tasks"))
            .json(&serde_json::json!({"kind": "noop"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        http.get(format!("{base}/api/v1/tasks/{}?wait=10s", t["id"]))
            .send()
            .await
            .unwrap();
    }
    (base, pool)
}

fn metric_names(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("proto_tasker_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.push(tail[..end].to_string());
        rest = &tail[end..];
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grafana_dashboard_queries_only_exported_metrics() {
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string("deploy/grafana/dashboards/proto_tasker.json").unwrap(),
    )
    .unwrap();
    let panels = dash["panels"].as_array().unwrap();
    let titles: Vec<String> = panels
        .iter()
        .map(|p| p["title"].as_str().unwrap().to_lowercase())
        .collect();
    for topic in [
        "throughput",
        "failure",
        "wait",
        "run time",
        "queue depth",
        "workers busy",
    ] {
        assert!(
            titles.iter().any(|t| t.contains(topic)),
            "no panel for {topic}: {titles:?}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let (base, pool) = node_with_metrics(dir.path(), 3).await;
    // One refused enqueue, so the refusal counter has a series (a family
    // nothing has moved is not exported at all).
    let http = reqwest::Client::new();
    http.post(format!("{base}/api/v1/queues/default/pause"))
        .send()
        .await
        .unwrap();
    http.patch(format!("{base}/api/v1/queues/default"))
        .json(&serde_json::json!({"max_depth": 1}))
        .send()
        .await
        .unwrap();
    let statuses: Vec<u16> = futures::future::join_all((0..2).map(|_| {
        http.post(format!("{base}/api/v1/tasks"))
            .json(&serde_json::json!({"kind": "noop"}))
            .send()
    }))
    .await
    .into_iter()
    .map(|r| r.unwrap().status().as_u16())
    .collect();
    assert!(statuses.contains(&429), "{statuses:?}");
    let exported = reqwest::get(format!("{base}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let exported: std::collections::HashSet<String> = metric_names(&exported).into_iter().collect();
    for p in panels {
        for t in p["targets"].as_array().unwrap() {
            let expr = t["expr"].as_str().unwrap();
            let names = metric_names(expr);
            assert!(!names.is_empty(), "{expr}");
            for name in names {
                assert!(
                    exported.contains(&name),
                    "panel {:?} queries {name}, which /metrics does not export",
                    p["title"]
                );
            }
        }
    }
    pool.shutdown().await;
}

#[test]
fn the_compose_file_has_the_promised_services_and_files() {
    let text = std::fs::read_to_string("docker-compose.yml").unwrap();
    let compose: Value = serde_saphyr::from_str(&text).unwrap();
    let services = compose["services"].as_object().unwrap();
    for s in ["proto_tasker_app", "prom", "grafana", "postgres"] {
        assert!(services.contains_key(s), "service {s} missing");
    }
    let app = &services["proto_tasker_app"];
    assert_eq!(app["deploy"]["replicas"], 2, "two replicas share the work");
    assert!(
        app["environment"]["PROTO_TASKER_STORE_URL"]
            .as_str()
            .unwrap()
            .starts_with("postgres://")
    );
    for (svc, want) in [
        ("prom", "./deploy/prometheus.yml"),
        ("grafana", "./deploy/grafana/provisioning"),
    ] {
        let vols: Vec<&str> = services[svc]["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        assert!(
            vols.iter().any(|v| v.starts_with(want)),
            "{svc} mounts {want}: {vols:?}"
        );
    }
    for f in [
        "Dockerfile",
        "deploy/config.yaml",
        "deploy/prometheus.yml",
        "deploy/grafana/provisioning/datasources/prometheus.yml",
        "deploy/grafana/provisioning/dashboards/dashboards.yml",
    ] {
        assert!(Path::new(f).exists(), "{f} is referenced but missing");
    }
    // The container's config is a valid node config.
    proto_tasker::config_load("deploy/config.yaml").unwrap();
    let docker = std::fs::read_to_string("Dockerfile").unwrap();
    assert!(
        docker.contains("USER proto_tasker"),
        "the runtime image runs as a non-root user"
    );
    assert!(docker.matches("FROM ").count() >= 2, "multi-stage build");
    // The build stage copies everything the binary compiles in: askama's
    // templates and whatever `include_str!` reads from outside src/.
    let mut needed = vec!["src".to_string(), "templates".to_string()];
    for entry in walk("src") {
        let text = std::fs::read_to_string(&entry).unwrap();
        for (i, _) in text.match_indices("include_str!(\"") {
            let rest = &text[i + "include_str!(\"".len()..];
            let path = &rest[..rest.find('"').unwrap()];
            let resolved = Path::new(&entry).parent().unwrap().join(path);
            let top = resolved
                .components()
                .filter(|c| !matches!(c, std::path::Component::CurDir))
                .fold(Vec::new(), |mut acc: Vec<String>, c| {
                    match c {
                        std::path::Component::ParentDir => {
                            acc.pop();
                        }
                        c => acc.push(c.as_os_str().to_string_lossy().into_owned()),
                    }
                    acc
                });
            needed.push(top[0].clone());
        }
    }
    for dir in needed {
        assert!(
            docker.contains(&format!("COPY {dir} ./{dir}")),
            "the Dockerfile's build stage copies {dir}/"
        );
    }
}

/// Every `.rs` file under `dir`.
fn walk(dir: &str) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![std::path::PathBuf::from(dir)];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out
}

/// Prometheus from Debian's package: on PATH, at $PROTO_TASKER_PROMETHEUS, or
/// where `.ci/run` unpacks it.
fn prometheus_binary() -> Option<std::path::PathBuf> {
    let candidates = [
        std::env::var("PROTO_TASKER_PROMETHEUS")
            .ok()
            .map(Into::into),
        Some("/opt/proto_tasker-prometheus/usr/bin/prometheus".into()),
        Some("/usr/bin/prometheus".into()),
    ];
    candidates
        .into_iter()
        .flatten()
        .find(|p: &std::path::PathBuf| p.exists())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_a_node() {
    let Some(prom) = prometheus_binary() else {
        eprintln!(
            "SKIPPED a_real_prometheus_scrapes_a_node: no prometheus binary (.ci/run unpacks Debian's package)"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (base, pool) = node_with_metrics(dir.path(), 4).await;
    let target = base.trim_start_matches("http://");
    let cfg = dir.path().join("prometheus.yml");
    std::fs::write(&cfg, format!("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: proto_tasker\n    static_configs:\n      - targets: [\"{target}\"]\n")).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(prom)
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("tsdb").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let query = format!(
        "http://127.0.0.1:{port}/api/v1/query?query=sum(proto_tasker_tasks_enqueued_total)"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let value = loop {
        if let Ok(r) = reqwest::get(&query).await
            && let Ok(v) = r.json::<Value>().await
            && let Some(x) = v["data"]["result"][0]["value"][1].as_str()
        {
            break x.parse::<f64>().unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never had the node's metrics"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        value, 4.0,
        "Prometheus sees the 4 tasks enqueued through the node"
    );
    pool.shutdown().await;
}

/// Debian's `promtool`, beside the prometheus binary.
fn promtool() -> Option<std::path::PathBuf> {
    let p = prometheus_binary()?.with_file_name("promtool");
    p.exists().then_some(p)
}

/// A tool the test needs: present, or (outside CI) a SKIPPED line.
fn required(
    tool: Option<std::path::PathBuf>,
    test: &str,
    install: &str,
) -> Option<std::path::PathBuf> {
    if tool.is_none() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{test}: {install} (CI: this test never skips)"
        );
        eprintln!("SKIPPED {test}: {install}");
    }
    tool
}

/// The alerting rules parse, and each fires on the series of
/// `deploy/alerts_test.yml` when it should and stays silent when it should not.
#[test]
fn the_alert_rules_check_and_pass_their_tests() {
    let Some(promtool) = required(
        promtool(),
        "the_alert_rules_check_and_pass_their_tests",
        "no promtool (.ci/run unpacks Debian's prometheus package)",
    ) else {
        return;
    };
    let deploy = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    for args in [
        ["check", "rules", "alerts.yml"],
        ["test", "rules", "alerts_test.yml"],
    ] {
        let out = std::process::Command::new(&promtool)
            .args(args)
            .current_dir(&deploy)
            .output()
            .expect("run promtool");
        assert!(
            out.status.success(),
            "promtool {}: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The systemd unit verifies cleanly (no unknown keys, an executable
/// ExecStart: the built binary stands in for /usr/local/bin/proto_tasker).
#[test]
fn the_service_unit_verifies() {
    let analyze = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .into_iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.exists());
    let Some(analyze) = required(
        analyze,
        "the_service_unit_verifies",
        "no systemd-analyze (apt-get install systemd)",
    ) else {
        return;
    };
    let unit = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/proto_tasker.service"),
    )
    .unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/proto_tasker --config="));
    for hardening in [
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "StateDirectory=proto_tasker",
    ] {
        assert!(unit.contains(hardening), "{hardening} missing");
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proto_tasker.service");
    std::fs::write(
        &path,
        unit.replace(
            "/usr/local/bin/proto_tasker",
            env!("CARGO_BIN_EXE_proto_tasker"),
        ),
    )
    .unwrap();
    let out = std::process::Command::new(analyze)
        .arg("verify")
        .arg(&path)
        .output()
        .expect("run systemd-analyze");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "systemd-analyze verify: {said}"
    );
}

/// The dashboard draws each alert's threshold on the panel of the same
/// series: the number after the first `>` of the alert's expression is a
/// red step of that panel's thresholds.
#[test]
fn the_grafana_thresholds_are_the_alerts() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("deploy/grafana/dashboards/proto_tasker.json")).unwrap(),
    )
    .unwrap();
    let alerts: Value =
        serde_saphyr::from_str(&std::fs::read_to_string(root.join("deploy/alerts.yml")).unwrap())
            .unwrap();
    let rules = alerts["groups"][0]["rules"].as_array().unwrap();
    for (alert, panel) in [
        ("ProtoTaskerFailureRateHigh", "Failure rate"),
        ("ProtoTaskerTasksWaiting", "Queue lag"),
        ("ProtoTaskerDeadLettersRising", "Dead letters"),
    ] {
        let expr = rules
            .iter()
            .find(|r| r["alert"] == alert)
            .and_then(|r| r["expr"].as_str())
            .unwrap_or_else(|| panic!("no alert {alert}"));
        let threshold: f64 = expr
            .split_once("> ")
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{alert}: no threshold in {expr}"));
        let p = dash["panels"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["title"].as_str().is_some_and(|t| t.starts_with(panel)))
            .unwrap_or_else(|| panic!("no panel {panel}"));
        let steps = p["fieldConfig"]["defaults"]["thresholds"]["steps"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        assert!(
            steps
                .iter()
                .any(|s| s["value"].as_f64() == Some(threshold) && s["color"] == "red"),
            "panel {panel:?} does not draw {alert}'s threshold {threshold}: {steps:?}"
        );
    }
}

/// The final stage of the Dockerfile: each instruction with its argument,
/// continuation lines joined.
fn image_instructions() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Dockerfile"))
        .expect("read Dockerfile");
    let mut joined = Vec::new();
    let mut cur = String::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        match line.strip_suffix('\\') {
            Some(head) => cur.push_str(head),
            None => {
                cur.push_str(line);
                joined.push(std::mem::take(&mut cur));
            }
        }
    }
    let last_from = joined
        .iter()
        .rposition(|l| l.starts_with("FROM "))
        .expect("a FROM");
    joined[last_from..]
        .iter()
        .map(|l| {
            let (op, arg) = l.split_once(' ').unwrap_or((l, ""));
            (op.to_string(), arg.trim().to_string())
        })
        .collect()
}

fn one(ins: &[(String, String)], op: &str) -> String {
    let found: Vec<&String> = ins
        .iter()
        .filter(|(o, _)| o == op)
        .map(|(_, a)| a)
        .collect();
    assert_eq!(found.len(), 1, "the image has {} {op}", found.len());
    found[0].clone()
}

/// Without a Docker engine the image cannot be built here; what it runs
/// can still be held to the node's defaults: the entrypoint is the binary
/// the build copies in, its config is the one the build copies and it
/// passes `config check`, the exposed port is the one that config listens
/// on (beyond loopback, as a container must), the user is not root and
/// owns the store's directory, and the health check is a command that
/// answers 0 for a ready node and not 0 for a dead one.
#[tokio::test]
async fn the_image_matches_the_node_defaults() {
    let ins = image_instructions();
    let entry: Vec<String> = serde_json::from_str(&one(&ins, "ENTRYPOINT")).expect("exec form");
    let binary = entry[0].clone();
    assert!(
        ins.iter()
            .any(|(o, a)| o == "COPY" && a.starts_with("--from=build ") && a.ends_with(&binary)),
        "ENTRYPOINT {binary} is not the binary the build copies in"
    );
    let cmd: Vec<String> = serde_json::from_str(&one(&ins, "CMD")).expect("exec form");
    let config_in_image = cmd
        .iter()
        .find_map(|a| a.strip_prefix("--config="))
        .expect("CMD names a config")
        .to_string();
    assert!(
        ins.iter()
            .any(|(o, a)| o == "COPY" && *a == format!("deploy/config.yaml {config_in_image}")),
        "CMD's config {config_in_image} is not deploy/config.yaml"
    );
    let config_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/config.yaml");
    let check = Command::new(env!("CARGO_BIN_EXE_proto_tasker"))
        .args(["config", "check"])
        .arg(&config_path)
        .output()
        .unwrap();
    assert!(check.status.success(), "{check:?}");
    let config: Value = serde_saphyr::from_str(&std::fs::read_to_string(&config_path).unwrap())
        .expect("config yaml");
    let listen: std::net::SocketAddr = config["server"]["listen"]
        .as_str()
        .expect("server.listen")
        .parse()
        .unwrap();
    assert!(
        listen.ip().is_unspecified(),
        "{listen}: unreachable from outside the container"
    );
    assert_eq!(one(&ins, "EXPOSE"), listen.port().to_string());

    let user = one(&ins, "USER");
    assert!(user != "root" && user != "0", "the image runs as {user}");
    let workdir = one(&ins, "WORKDIR");
    let store_dir = Path::new(config["store"]["path"].as_str().expect("store.path"))
        .parent()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(
        workdir, store_dir,
        "the store is not in the working directory"
    );
    assert!(
        ins.iter().any(|(o, a)| o == "RUN"
            && a.contains(&format!("--home-dir {workdir} --create-home {user}"))),
        "{user} does not own {workdir}"
    );

    // The health check: the entrypoint's `health` against the exposed port.
    let health = one(&ins, "HEALTHCHECK");
    let (_, probe) = health.split_once("CMD ").expect("HEALTHCHECK CMD");
    let probe: Vec<String> = serde_json::from_str(probe).expect("exec form");
    assert_eq!(probe[0], binary);
    assert_eq!(
        probe[1..],
        [
            "health".to_string(),
            "--server".into(),
            format!("http://127.0.0.1:{}", listen.port())
        ]
    );
    let dir = tempfile::tempdir().unwrap();
    let (url, pool) = node_with_metrics(dir.path(), 0).await;
    let run_probe = move |server: String| {
        Command::new(env!("CARGO_BIN_EXE_proto_tasker"))
            .args(&probe[1..probe.len() - 1])
            .arg(server)
            .env_remove("PROTO_TASKER_SERVER")
            .output()
            .unwrap()
    };
    let probe_again = run_probe.clone();
    let ready = tokio::task::spawn_blocking(move || run_probe(url))
        .await
        .unwrap();
    assert!(ready.status.success(), "{ready:?}");
    pool.shutdown().await;
    let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = format!("http://{}", free.local_addr().unwrap());
    drop(free);
    let down = tokio::task::spawn_blocking(move || probe_again(dead))
        .await
        .unwrap();
    assert_eq!(down.status.code(), Some(2), "{down:?}");
}
