//! The dashboard in a real headless Chromium (Debian's `chromium` and
//! `chromium-driver`), driven over the WebDriver protocol against a node
//! process (the built binary). Screenshots land in
//! `target/tmp/dashboard-screenshots/` as test artifacts.
//!
//! Without chromedriver the tests print SKIPPED, except under `CI=true`,
//! where `.ci/run` installs it and a missing browser is a failure.

mod fixtures;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const CHROMEDRIVER: &str = "/usr/bin/chromedriver";
const CHROMIUM: &str = "/usr/bin/chromium";
const WAIT: Duration = Duration::from_secs(15);

fn shots_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-screenshots");
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// True when the browser is here; else SKIPPED (a failure under CI).
fn browser_available() -> bool {
    let ok = Path::new(CHROMEDRIVER).exists() && Path::new(CHROMIUM).exists();
    if !ok {
        if std::env::var("CI").is_ok_and(|v| v == "true") {
            panic!(
                "{CHROMEDRIVER} or {CHROMIUM} missing: apt-get install chromium chromium-driver"
            );
        }
        eprintln!(
            "SKIPPED: install Debian's chromium and chromium-driver to run the dashboard tests"
        );
    }
    ok
}

use fixtures::GroupProcess as Proc;

/// A node process on a free port, with an API client.
struct Node {
    _proc: fixtures::NodeProcess,
    url: String,
    token: Option<String>,
    http: reqwest::Client,
}

fn start_node(dir: &Path, extra: &str, token: Option<&str>) -> Node {
    let auth = token
        .map(|t| format!("  auth_token: {t}\n"))
        .unwrap_or_default();
    let proc = fixtures::NodeProcess::start(
        dir,
        &format!(
            "store:\n  path: {}\npool:\n  poll_interval: 50ms\nserver:\n  listen: 127.0.0.1:0\n{auth}{extra}",
            dir.join("dash.db").display(),
        ),
    );
    Node {
        url: proc.url.clone(),
        _proc: proc,
        token: token.map(String::from),
        http: reqwest::Client::new(),
    }
}

impl Node {
    async fn api(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let url = format!("{}/api/v1{path}", self.url);
        let mut req = match method {
            "POST" => self.http.post(url),
            _ => self.http.get(url),
        };
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let res = req.send().await.unwrap();
        let status = res.status();
        let v: Value = res.json().await.unwrap();
        assert!(status.is_success(), "{method} {path}: {status} {v}");
        v
    }

    async fn submit(&self, body: Value) -> i64 {
        self.api("POST", "/tasks", Some(body)).await["id"]
            .as_i64()
            .unwrap()
    }

    async fn task(&self, id: i64) -> Value {
        self.api("GET", &format!("/tasks/{id}"), None).await
    }

    /// Wait until the task satisfies `f`.
    async fn wait_task(&self, id: i64, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let start = Instant::now();
        loop {
            let t = self.task(id).await;
            if f(&t) {
                return t;
            }
            assert!(start.elapsed() < WAIT, "task {id}: {what}; it is {t}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// A minimal WebDriver client: just the commands these tests use.
struct Browser {
    _driver: Proc,
    base: String,
    http: reqwest::Client,
}

const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

impl Browser {
    async fn start() -> Browser {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let driver = Proc::spawn(
            Command::new(CHROMEDRIVER)
                .arg(format!("--port={port}"))
                .stdout(Stdio::null())
                .stderr(Stdio::null()),
        );
        let http = reqwest::Client::new();
        let root = format!("http://127.0.0.1:{port}");
        let start = Instant::now();
        loop {
            if let Ok(r) = http.get(format!("{root}/status")).send().await
                && r.status().is_success()
            {
                break;
            }
            assert!(start.elapsed() < WAIT, "chromedriver did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": CHROMIUM,
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1400,1000",
                         "--disable-crash-reporter", "--disable-breakpad"]
            }
        }}});
        let r: Value = http
            .post(format!("{root}/session"))
            .json(&caps)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let id = r["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {r}"))
            .to_string();
        Browser {
            _driver: driver,
            base: format!("{root}/session/{id}"),
            http,
        }
    }

    async fn cmd(&self, method: &str, path: &str, body: Value) -> Result<Value, String> {
        let url = format!("{}{path}", self.base);
        let req = match method {
            "GET" => self.http.get(url),
            "DELETE" => self.http.delete(url),
            _ => self.http.post(url).json(&body),
        };
        let res = req.send().await.map_err(|e| e.to_string())?;
        let ok = res.status().is_success();
        let v: Value = res.json().await.map_err(|e| e.to_string())?;
        if ok {
            Ok(v["value"].clone())
        } else {
            Err(v["value"].to_string())
        }
    }

    async fn goto(&self, url: &str) {
        self.cmd("POST", "/url", json!({ "url": url }))
            .await
            .unwrap();
    }

    async fn js(&self, script: &str, args: Value) -> Value {
        self.cmd(
            "POST",
            "/execute/sync",
            json!({"script": script, "args": args}),
        )
        .await
        .unwrap()
    }

    async fn find(&self, css: &str) -> Option<String> {
        self.cmd(
            "POST",
            "/element",
            json!({"using": "css selector", "value": css}),
        )
        .await
        .ok()
        .and_then(|v| v[ELEMENT_KEY].as_str().map(String::from))
    }

    /// Wait for an element matching `css`, then return it.
    async fn wait(&self, css: &str) -> String {
        let start = Instant::now();
        loop {
            if let Some(e) = self.find(css).await {
                return e;
            }
            assert!(start.elapsed() < WAIT, "no element {css}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Wait until `css`'s text satisfies `f`; return the text.
    async fn wait_text(&self, css: &str, f: impl Fn(&str) -> bool) -> String {
        let start = Instant::now();
        loop {
            if let Some(e) = self.find(css).await
                && let Ok(t) = self
                    .cmd("GET", &format!("/element/{e}/text"), json!({}))
                    .await
                && let Some(t) = t.as_str()
                && f(t)
            {
                return t.to_string();
            }
            if start.elapsed() >= WAIT {
                let text = match self.find(css).await {
                    Some(e) => self
                        .cmd("GET", &format!("/element/{e}/text"), json!({}))
                        .await
                        .unwrap_or_default(),
                    None => Value::Null,
                };
                self.screenshot("failed-wait").await;
                panic!("{css} never had the expected text; it has {text} (see failed-wait.png)");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Click `css` once it exists. The page re-renders every 2 s, so a
    /// click that hits a replaced element is tried again.
    async fn click(&self, css: &str) {
        let start = Instant::now();
        loop {
            let e = self.wait(css).await;
            if self
                .cmd("POST", &format!("/element/{e}/click"), json!({}))
                .await
                .is_ok()
            {
                return;
            }
            assert!(start.elapsed() < WAIT, "could not click {css}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn type_into(&self, css: &str, text: &str) {
        let e = self.wait(css).await;
        self.cmd(
            "POST",
            &format!("/element/{e}/value"),
            json!({ "text": text }),
        )
        .await
        .unwrap();
    }

    async fn clear(&self, css: &str) {
        let e = self.wait(css).await;
        self.cmd("POST", &format!("/element/{e}/clear"), json!({}))
            .await
            .unwrap();
    }

    /// Wait until exactly `n` elements match `css` (the page re-renders
    /// every 2 s, so one count can land mid-render); fail naming `what`
    /// with the last count after the wait.
    async fn wait_count(&self, css: &str, n: usize, what: &str) {
        let start = Instant::now();
        loop {
            let got = self.count(css).await;
            if got == n {
                return;
            }
            assert!(
                start.elapsed() < WAIT,
                "{what}: {got} elements match {css}, expected {n}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn count(&self, css: &str) -> usize {
        self.js(
            "return document.querySelectorAll(arguments[0]).length",
            json!([css]),
        )
        .await
        .as_u64()
        .unwrap_or(0) as usize
    }

    async fn screenshot(&self, name: &str) {
        let v = self.cmd("GET", "/screenshot", json!({})).await.unwrap();
        let png = base64_decode(v.as_str().unwrap());
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        std::fs::write(shots_dir().join(format!("{name}.png")), png).unwrap();
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => (c - b'A') as u32,
            b'a'..=b'z' => (c - b'a' + 26) as u32,
            b'0'..=b'9' => (c - b'0' + 52) as u32,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        }
    };
    let bytes: Vec<u8> = s.bytes().filter(|c| !c.is_ascii_whitespace()).collect();
    let mut out = Vec::with_capacity(bytes.len() / 4 * 3);
    for chunk in bytes.chunks(4) {
        let data: Vec<u8> = chunk.iter().copied().filter(|&c| c != b'=').collect();
        let mut n = 0u32;
        for (i, &c) in data.iter().enumerate() {
            n |= val(c) << (18 - 6 * i);
        }
        for i in 0..data.len().saturating_sub(1) {
            out.push((n >> (16 - 8 * i)) as u8);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_shows_and_drives_a_live_node() {
    if !browser_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(
        dir.path(),
        "queues:\n  default:\n    workers: 4\n  held:\n    workers: 1\n\
         schedules:\n  - name: nightly-report\n    cron: \"0 3 * * *\"\n    kind: noop\n",
        None,
    );
    // Some finished work for the chart and the counts.
    for _ in 0..5 {
        node.submit(json!({"kind": "noop", "args": {}})).await;
    }
    let b = Browser::start().await;

    // Overview: cards, the chart and the queue table.
    b.goto(&node.url).await;
    b.wait("#overview-cards .card").await;
    b.wait("#throughput-chart svg").await;
    b.wait("#overview-queues table").await;
    b.wait_count("#overview-cards .card", 7, "overview cards")
        .await;
    // The sampler picks up the finished tasks within a few seconds.
    let start = Instant::now();
    loop {
        let st = node.api("GET", "/stats?minutes=5", None).await;
        let done: u64 = st["buckets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["completed"].as_u64().unwrap())
            .sum();
        if done >= 5 {
            break;
        }
        assert!(
            start.elapsed() < WAIT,
            "stats never showed 5 completions: {st}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    b.wait("#throughput-chart rect.bar-ok").await;
    b.screenshot("01-overview").await;

    // A task submitted through the API appears in the task list.
    let sleeper = node
        .submit(json!({"kind": "sleep", "args": {"ms": 60000}}))
        .await;
    b.goto(&format!("{}/#/tasks", node.url)).await;
    b.wait(&format!("#tasks-table tr[data-id='{sleeper}']"))
        .await;
    b.screenshot("02-tasks").await;

    // Cancel from the task page reaches the running task.
    node.wait_task(sleeper, "runs", |t| t["state"] == "running")
        .await;
    b.goto(&format!("{}/#/task/{sleeper}", node.url)).await;
    b.wait_text("#task-detail h2", |t| t.contains("running"))
        .await;
    b.click("#task-detail button.cancel").await;
    node.wait_task(sleeper, "is cancelled", |t| t["state"] == "cancelled")
        .await;
    b.wait_text("#task-detail h2", |t| t.contains("cancelled"))
        .await;
    b.screenshot("03-task-cancelled").await;

    // Retry from the same page puts it back to work.
    b.click("#task-detail button.retry").await;
    node.wait_task(sleeper, "is retried", |t| {
        t["state"] == "running" || t["state"] == "available"
    })
    .await;
    node.api("POST", &format!("/tasks/{sleeper}/cancel"), None)
        .await;

    // Pause and resume a queue from the queue table.
    b.goto(&format!("{}/#/queues", node.url)).await;
    b.click("#queues-table tr[data-queue='held'] button.pause")
        .await;
    b.wait("#queues-table tr[data-queue='held'] [data-paused='true']")
        .await;
    let queues = node.api("GET", "/queues", None).await;
    let held = |q: &Value| {
        q["queues"]
            .as_array()
            .unwrap()
            .iter()
            .find(|q| q["name"] == "held")
            .cloned()
            .unwrap()
    };
    assert_eq!(held(&queues)["paused"], true);
    b.screenshot("04-queues-paused").await;

    // A queue's cap, edited on the page, is what the API then answers.
    b.type_into("#queue-settings input[name='queue']", "held")
        .await;
    b.type_into("#queue-settings input[name='max_depth']", "123")
        .await;
    b.click("#queue-settings button[type='submit']").await;
    b.wait_text("#queues-table tr[data-queue='held'] td.max-depth", |t| {
        t == "123"
    })
    .await;
    let one = node.api("GET", "/queues/held", None).await;
    assert_eq!(one["max_depth"], 123, "{one}");
    b.screenshot("04b-queue-max-depth").await;

    // Limits and workers edited on the page are what the API answers, and
    // this node runs the new worker count.
    b.clear("#queue-settings input[name='global_concurrency']")
        .await;
    b.type_into("#queue-settings input[name='global_concurrency']", "3")
        .await;
    b.clear("#queue-settings input[name='workers']").await;
    b.type_into("#queue-settings input[name='workers']", "2")
        .await;
    b.js(
        "const s = document.querySelector(\"#queue-settings select[name='fairness']\"); \
         s.value = 'round_robin'; s.dispatchEvent(new Event('change'));",
        json!([]),
    )
    .await;
    b.click("#queue-settings button[type='submit']").await;
    b.wait_text("#queues-table tr[data-queue='held'] td.limits", |t| {
        t.contains("global 3") && t.contains("round robin")
    })
    .await;
    let one = node.api("GET", "/queues/held", None).await;
    assert_eq!(
        (
            &one["global_concurrency"],
            &one["fairness"],
            &one["workers"],
            &one["max_depth"]
        ),
        (&json!(3), &json!("round_robin"), &json!(2), &json!(123)),
        "{one}"
    );
    let start = Instant::now();
    while node.api("GET", "/queues/held", None).await["concurrency"] != 2 {
        assert!(
            start.elapsed() < WAIT,
            "the node never ran 2 workers for held"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    b.screenshot("04c-queue-limits").await;

    // Task data is shown as text, never run: the queue is paused, so the
    // task stays and shows in the lists too.
    let evil = "<script>window.__xss=1</script><img src=x onerror=\"window.__xss=2\">";
    let xss = node
        .submit(json!({"kind": "noop", "queue": "held", "args": {"html": evil}}))
        .await;
    b.goto(&format!("{}/#/tasks?queue=held", node.url)).await;
    b.wait(&format!("#tasks-table tr[data-id='{xss}']")).await;
    b.goto(&format!("{}/#/task/{xss}", node.url)).await;
    let shown = b.wait_text("#task-args", |t| t.contains("<script>")).await;
    let as_json = serde_json::to_string(evil).unwrap();
    assert!(shown.contains(&as_json), "args shown verbatim: {shown}");
    assert_eq!(b.count("#app script, #app img").await, 0);
    assert_eq!(
        b.js("return window.__xss === undefined", json!([])).await,
        true
    );
    b.screenshot("05-xss-as-text").await;

    // The tag filter narrows the list to the tasks with that tag, and the
    // args filter to those whose args contain the object typed.
    let tagged = node
        .submit(
            json!({"kind": "noop", "queue": "held", "tags": ["customer:7"], "args": {"user": 7}}),
        )
        .await;
    let other = node
        .submit(
            json!({"kind": "noop", "queue": "held", "tags": ["customer:8"], "args": {"user": 8}}),
        )
        .await;
    b.goto(&format!("{}/#/tasks", node.url)).await;
    b.wait(&format!("#tasks-table tr[data-id='{other}']")).await;
    b.wait(&format!("#tasks-table tr[data-id='{xss}']")).await;
    b.type_into("#task-filters input[name='tag']", "customer:7")
        .await;
    b.click("#task-filters button[type='submit']").await;
    b.wait(&format!("#tasks-table tr[data-id='{tagged}'] a.tag"))
        .await;
    b.wait_count("#tasks-table tbody tr", 1, "only the tagged task")
        .await;
    b.screenshot("05b-tag-filter").await;
    b.goto(&format!("{}/#/tasks", node.url)).await;
    b.wait(&format!("#tasks-table tr[data-id='{xss}']")).await;
    b.type_into("#task-filters input[name='args']", r#"{"user": 8}"#)
        .await;
    b.click("#task-filters button[type='submit']").await;
    b.wait(&format!("#tasks-table tr[data-id='{other}']")).await;
    b.wait_count("#tasks-table tbody tr", 1, "only args with user 8")
        .await;

    b.goto(&format!("{}/#/queues", node.url)).await;
    b.click("#queues-table tr[data-queue='held'] button.resume")
        .await;
    b.wait("#queues-table tr[data-queue='held'] [data-paused='false']")
        .await;
    assert_eq!(
        held(&node.api("GET", "/queues", None).await)["paused"],
        false
    );
    node.wait_task(xss, "runs once resumed", |t| t["state"] == "completed")
        .await;

    // Dead letters: retry one selected, then the rest of the page.
    let mut dead = Vec::new();
    for i in 0..3 {
        dead.push(
            node.submit(
                json!({"kind": "fail", "args": {"message": format!("boom {i}")},
                               "max_attempts": 1}),
            )
            .await,
        );
    }
    for &id in &dead {
        node.wait_task(id, "fails", |t| t["state"] == "failed")
            .await;
    }
    b.goto(&format!("{}/#/dead", node.url)).await;
    for &id in &dead {
        b.wait(&format!("#tasks-table tr[data-id='{id}']")).await;
    }
    b.screenshot("06-dead-letters").await;
    b.click(&format!(
        "#tasks-table tr[data-id='{}'] input.pick",
        dead[0]
    ))
    .await;
    b.click("#retry-selected").await;
    node.wait_task(dead[0], "is retried and fails again", |t| {
        t["state"] == "failed" && t["attempt"] == 2
    })
    .await;
    assert_eq!(
        node.task(dead[1]).await["attempt"],
        1,
        "only the selected one"
    );
    // Once the page shows the first one failed again, retry the whole page.
    b.wait_text(&format!("#tasks-table tr[data-id='{}']", dead[0]), |t| {
        t.contains("2/2")
    })
    .await;
    b.click("#retry-page").await;
    for (&id, attempt) in dead.iter().zip([3, 2, 2]) {
        node.wait_task(id, "is retried by the bulk retry", |t| {
            t["state"] == "failed" && t["attempt"] == attempt
        })
        .await;
    }

    // The task page lists every attempt's error and the timeline.
    b.goto(&format!("{}/#/task/{}", node.url, dead[0])).await;
    b.wait_text("#task-errors", |t| t.matches("boom 0").count() == 3)
        .await;
    b.wait_count("#task-errors tbody tr", 3, "one error row per attempt")
        .await;
    let timeline = b
        .wait_text("#task-detail .timeline", |t| t.contains("finished"))
        .await;
    assert!(
        timeline.contains("created")
            && (1..=3).all(|a| timeline.contains(&format!("attempt {a} failed")))
            && timeline.contains("started"),
        "{timeline}"
    );
    b.screenshot("07-task-errors").await;

    // The filter form narrows the list: only `fail` tasks, all of them.
    b.goto(&format!("{}/#/tasks", node.url)).await;
    b.type_into("#task-filters input[name='kind']", "fail")
        .await;
    b.click("#task-filters button").await;
    b.wait_text("#tasks-table", |t| !t.contains("noop")).await;
    for &id in &dead {
        b.wait(&format!("#tasks-table tr[data-id='{id}']")).await;
    }
    b.wait_count("#tasks-table tbody tr", 3, "the three dead tasks")
        .await;
    assert!(
        b.js("return location.hash", json!([]))
            .await
            .as_str()
            .unwrap()
            .contains("kind=fail"),
        "the filter is in the address, so it survives a reload"
    );

    // Nodes (with the leader) and schedules (with the next run).
    b.goto(&format!("{}/#/nodes", node.url)).await;
    b.wait("#nodes-table .badge.leader").await;
    b.screenshot("08-nodes").await;
    b.goto(&format!("{}/#/schedules", node.url)).await;
    b.wait_text("#schedules-table", |t| {
        t.contains("nightly-report") && t.contains("in ")
    })
    .await;
    b.screenshot("09-schedules").await;
    // Pause it, then run it now, from the page.
    let row = "#schedules-table tr[data-schedule='nightly-report']";
    b.click(&format!("{row} button.pause")).await;
    b.wait(&format!("{row} [data-paused='true']")).await;
    let listed = node.api("GET", "/schedules", None).await;
    assert_eq!(listed["schedules"][0]["paused"], true, "{listed}");
    let before = node.api("GET", "/tasks?kind=noop&limit=1000", None).await["tasks"]
        .as_array()
        .unwrap()
        .len();
    b.click(&format!("{row} button.trigger")).await;
    let start = Instant::now();
    while node.api("GET", "/tasks?kind=noop&limit=1000", None).await["tasks"]
        .as_array()
        .unwrap()
        .len()
        == before
    {
        assert!(start.elapsed() < WAIT, "Run now enqueued nothing");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    b.screenshot("09b-schedule-paused").await;
    b.click(&format!("{row} button.resume")).await;
    b.wait_text(row, |t| t.contains("in ") && !t.contains("paused"))
        .await;

    // Live: a task submitted now shows up without a reload.
    b.goto(&format!("{}/#/tasks", node.url)).await;
    b.wait("#tasks-table").await;
    b.js("window.__marker = 1", json!([])).await;
    let fresh = node.submit(json!({"kind": "noop", "args": {}})).await;
    b.wait(&format!("#tasks-table tr[data-id='{fresh}']")).await;
    assert_eq!(
        b.js("return window.__marker", json!([])).await,
        1,
        "same page, no reload"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_asks_for_the_token_and_keeps_it_in_the_session() {
    if !browser_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), "", Some("s3cret-token"));
    let b = Browser::start().await;
    b.goto(&node.url).await;
    b.wait("#login:not([hidden])").await;
    assert_eq!(b.count("#overview-cards .card").await, 0);
    b.type_into("#token", "wrong").await;
    b.click("#login-form button").await;
    b.wait_text("#login-error", |t| t.contains("refused")).await;
    b.screenshot("10-login-refused").await;
    b.type_into("#token", "s3cret-token").await;
    b.click("#login-form button").await;
    b.wait("#overview-cards .card").await;
    let stored = b
        .js(
            "return [sessionStorage.getItem('proto_tasker.token'), localStorage.length, document.cookie]",
            json!([]),
        )
        .await;
    assert_eq!(stored, json!(["s3cret-token", 0, ""]));
    b.screenshot("11-signed-in").await;
    b.click("#logout").await;
    b.wait("#login:not([hidden])").await;
    assert_eq!(
        b.js(
            "return sessionStorage.getItem('proto_tasker.token')",
            json!([])
        )
        .await,
        Value::Null
    );
}

/// A `read` token sees the dashboard but no action; an `operate` token sees
/// them and they work.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_only_what_the_token_may_do() {
    if !browser_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let tokens = "  tokens:\n    - {name: viewer, role: read, token: viewer-secret-0123456789}\n    \
                  - {name: ops, role: operate, token: ops-secret-0123456789}\n";
    let node = start_node(dir.path(), tokens, Some("admin-secret-0123456789"));
    let id = node
        .submit(json!({"kind": "sleep", "args": {"ms": 60000}}))
        .await;
    let b = Browser::start().await;
    for (secret, can_act) in [
        ("viewer-secret-0123456789", false),
        ("ops-secret-0123456789", true),
    ] {
        b.goto(&format!("{}/#/tasks", node.url)).await;
        b.wait("#login:not([hidden])").await;
        b.type_into("#token", secret).await;
        b.click("#login-form button").await;
        b.wait(&format!("#tasks-table tr[data-id='{id}']")).await;
        b.wait_text("body", |_| true).await;
        let role = b.js("return document.body.dataset.role", json!([])).await;
        let visible = b
            .js(
                "return Array.from(document.querySelectorAll('button.act')).filter(e => e.offsetParent !== null).length",
                json!([]),
            )
            .await;
        if can_act {
            assert_eq!(role, json!("operate"));
            let audit_link = b
                .js(
                    "return document.querySelector('#nav a[data-nav=audit]').offsetParent === null",
                    json!([]),
                )
                .await;
            assert_eq!(audit_link, json!(true), "the audit page is for admins");
            assert!(visible.as_u64().unwrap_or(0) > 0, "operate sees actions");
            b.screenshot("12-operate-token").await;
            b.click(&format!("#tasks-table tr[data-id='{id}'] button.cancel"))
                .await;
            node.wait_task(id, "cancelled", |t| t["state"] == "cancelled")
                .await;
        } else {
            assert_eq!(role, json!("read"));
            assert_eq!(visible, json!(0), "read sees no actions");
            b.screenshot("12-read-token").await;
        }
        b.click("#logout").await;
    }
    // The admin sees the trail on its page.
    b.goto(&format!("{}/#/audit", node.url)).await;
    b.wait("#login:not([hidden])").await;
    b.type_into("#token", "admin-secret-0123456789").await;
    b.click("#login-form button").await;
    let row = b
        .wait_text("#audit-table tbody tr", |t| t.contains("ops"))
        .await;
    assert!(row.contains("/cancel"), "{row}");
    b.screenshot("13-audit").await;
}

/// The value of the `<progress>` bar under `css`, once there is one.
async fn bar(b: &Browser, css: &str) -> Option<f64> {
    b.js(
        "const e = document.querySelector(arguments[0]); return e ? e.value : null",
        json!([css]),
    )
    .await
    .as_f64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_running_tasks_progress_bar_moves() {
    if !browser_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let node = start_node(dir.path(), "executors:\n  shell:\n    allow: [sh]\n", None);
    // A shell program reporting 4%, 8%, ... every 300 ms for about 8 s.
    let id = node
        .submit(json!({"kind": "shell", "args": {"cmd": ["sh", "-c",
            "i=0; while [ $i -lt 100 ]; do i=$((i+4)); echo \"::progress {\\\"pct\\\": $i, \\\"message\\\": \\\"step $i\\\"}\"; sleep 0.3; done"]}}))
        .await;
    node.wait_task(id, "reports progress", |t| t["progress"]["pct"].is_number())
        .await;
    let b = Browser::start().await;
    b.goto(&format!("{}/#/task/{id}", node.url)).await;
    b.wait("#task-progress progress").await;
    let first = bar(&b, "#task-progress progress").await.unwrap();
    // The page refreshes every 2 s: the bar moves while the task runs.
    let start = Instant::now();
    let later = loop {
        let v = bar(&b, "#task-progress progress").await.unwrap_or(first);
        if v > first {
            break v;
        }
        assert!(start.elapsed() < WAIT, "the bar stayed at {first}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!((0.0..=100.0).contains(&later), "{later}");
    let text = b
        .wait_text("#task-progress", |t| t.contains('%') && t.contains("step"))
        .await;
    assert!(text.contains("step"), "{text}");
    b.screenshot("10-task-progress").await;
    // The task list shows the bar too.
    b.goto(&format!("{}/#/tasks", node.url)).await;
    b.wait(&format!("#tasks-table tr[data-id='{id}'] td.prog progress"))
        .await;
    b.screenshot("11-tasks-progress").await;
    node.api("POST", &format!("/tasks/{id}/cancel"), None).await;
}
