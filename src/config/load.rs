//! Reading a config file: YAML or JSON into [`Config`], with errors that
//! name the file, the line and the field.

use std::path::Path;

use super::{Config, ConfigError, apply_env, validate};

/// Field paths from serde_path_to_error, with `?` segments (unknown
/// positions) and the root `.` left out.
fn field_path(p: &serde_path_to_error::Path) -> Option<String> {
    let s = p.to_string();
    (s != "." && !s.is_empty()).then_some(s)
}

/// Read a config file (YAML or JSON by extension), apply env overrides and validate.
pub fn config_load(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        line: None,
        column: None,
        field: None,
        message: format!("cannot read: {e}"),
    })?;
    let json = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    let mut cfg = if json {
        parse_json(path, &text)?
    } else {
        parse_yaml(path, &text)?
    };
    apply_env(&mut cfg);
    validate(&cfg).map_err(|(field, message)| ConfigError {
        file: path.to_path_buf(),
        line: find_line(&text, &field),
        column: None,
        field: Some(field),
        message,
    })?;
    Ok(cfg)
}

fn parse_json(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let de = &mut serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = field_path(e.path());
        let inner = e.into_inner();
        ConfigError {
            file: path.to_path_buf(),
            line: Some(inner.line() as u64),
            column: Some(inner.column() as u64),
            field,
            message: strip_location(&inner.to_string()),
        }
    })
}

fn parse_yaml(path: &Path, text: &str) -> Result<Config, ConfigError> {
    if text.trim().is_empty() {
        return Ok(Config::default());
    }
    let mut field = None;
    serde_saphyr::with_deserializer_from_str(text, |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            field = field_path(e.path());
            e.into_inner()
        })
    })
    .map_err(|e| {
        let loc = e.location();
        let line = loc.map(|l| l.line());
        let column = loc.map(|l| l.column());
        let mut message = yaml_message(&e.to_string());
        if message.starts_with("invalid u") || message.starts_with("invalid i") {
            message = format!("expected a whole number in range ({message})");
        }
        if let (Some(l), Some(c)) = (line, column)
            && let Some(found) = token_at(text, l, c)
            && !message.contains(&found)
        {
            message = format!("{message} (found {found})");
        }
        ConfigError {
            file: path.to_path_buf(),
            line,
            column,
            field,
            message,
        }
    })
}

/// The scalar that starts at 1-based `line`:`column`, if any.
fn token_at(text: &str, line: u64, column: u64) -> Option<String> {
    let l = text.lines().nth(line.checked_sub(1)? as usize)?;
    let rest: String = l.chars().skip(column.checked_sub(1)? as usize).collect();
    let tok = rest
        .split(|c: char| c.is_whitespace() || c == ',' || c == '}' || c == ']' || c == '#')
        .next()?
        .trim();
    (!tok.is_empty() && !tok.ends_with(':')).then(|| tok.to_string())
}

/// serde_json appends " at line L column C"; we print the location up front.
fn strip_location(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

/// serde-saphyr renders "error: line L column C: message" and then a
/// snippet; keep the message alone (the location is printed up front).
fn yaml_message(msg: &str) -> String {
    let mut line = msg.lines().next().unwrap_or(msg).trim();
    line = line.strip_prefix("error:").unwrap_or(line).trim_start();
    if let Some(rest) = line.strip_prefix("line ")
        && let Some(i) = rest.find(": ")
    {
        line = &rest[i + 2..];
    }
    match line.find(" at line ") {
        Some(i) => line[..i].to_string(),
        None => line.to_string(),
    }
}

/// The line of a dotted field path (best effort): each segment is looked
/// for as a key after the previous one, so `queues.default.workers` finds
/// the `workers:` under `default:`, in YAML and JSON alike.
fn find_line(text: &str, field: &str) -> Option<u64> {
    let mut pos = 0;
    // `schedules[2]`: find `schedules`, then the next key's third occurrence.
    let mut repeat = 0;
    for seg in field.split('.') {
        let (key, index) = match seg.split_once('[') {
            Some((k, rest)) => (k, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (seg, None),
        };
        for _ in 0..=repeat {
            pos = find_key(text, key, pos)? + key.len();
        }
        pos -= key.len();
        repeat = index.unwrap_or(0);
    }
    let line = text[..pos].matches('\n').count() as u64 + 1;
    // A list of plain values written as `- item` lines: the item's own line.
    let last_index = field
        .rsplit('.')
        .next()
        .and_then(|seg| seg.split_once('['))
        .and_then(|(_, rest)| rest.trim_end_matches(']').parse::<usize>().ok());
    if let Some(i) = last_index {
        let items = text[pos..]
            .lines()
            .skip(1)
            .enumerate()
            .filter(|(_, l)| l.trim_start().starts_with("- "))
            .nth(i);
        if let Some((n, _)) = items {
            return Some(line + n as u64 + 1);
        }
    }
    Some(line)
}

fn find_key(text: &str, key: &str, from: usize) -> Option<usize> {
    let mut at = from;
    while let Some(i) = text.get(at..)?.find(key) {
        let start = at + i;
        let end = start + key.len();
        let before_ok = text[..start]
            .chars()
            .next_back()
            .is_none_or(|c| !(c.is_alphanumeric() || c == '_'));
        let after = text[end..].trim_start_matches('"').trim_start();
        if before_ok && after.starts_with(':') {
            return Some(start);
        }
        at = end;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::store::Synchronous;
    use std::time::Duration;

    fn load(name: &str, text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        config_load(&p)
    }

    #[test]
    fn durations_parse() {
        use crate::duration::parse;
        assert_eq!(parse("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse("7d").unwrap(), Duration::from_secs(7 * 86400));
        assert!(parse("30").unwrap_err().contains("no unit"));
        assert!(parse("3x").unwrap_err().contains("unknown unit"));
    }

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(load("c.yaml", "").unwrap(), Config::default());
        assert_eq!(load("c.json", "{}").unwrap(), Config::default());
    }

    #[test]
    fn full_yaml_loads() {
        let c = load(
            "c.yaml",
            "node:\n  name: n1\nstore:\n  path: /tmp/x.db\n  synchronous: normal\nqueues:\n  default:\n    workers: 4\n  emails:\n    workers: 2\npool:\n  shutdown_timeout: 5s\nsentinel:\n  heartbeat_interval: 1s\n  node_timeout: 5s\nretention:\n  completed: 1d\n  failed: null\n",
        )
        .unwrap();
        assert_eq!(c.node.name.as_deref(), Some("n1"));
        assert_eq!(c.queues.len(), 2);
        assert_eq!(c.queues["emails"].workers, 2);
        assert_eq!(c.pool.shutdown_timeout, Duration::from_secs(5));
        assert_eq!(c.retention.failed, None);
        assert_eq!(c.store.synchronous, Synchronous::Normal);
    }

    #[test]
    fn wrong_type_names_file_line_and_field() {
        let e = load("bad.yaml", "pool:\n  claim_max: lots\n").unwrap_err();
        let s = e.to_string();
        assert!(s.starts_with(&format!("{}:2", e.file.display())), "{s}");
        assert_eq!(e.field.as_deref(), Some("pool.claim_max"), "{s}");
    }

    #[test]
    fn unknown_field_is_an_error() {
        let e = load(
            "bad.yaml",
            "queues:\n  default:\n    workers: 2\n    wrokers: 3\n",
        )
        .unwrap_err();
        let s = e.to_string();
        assert!(s.contains("wrokers"), "{s}");
        assert_eq!(e.line, Some(4), "{s}");
        let e = load("bad.json", "{\n  \"pool\": {\"nope\": 1}\n}").unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
        assert_eq!(e.line, Some(2));
    }

    #[test]
    fn negative_workers_is_an_error() {
        let e = load("bad.yaml", "queues:\n  default:\n    workers: -2\n").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("queues.default.workers"), "{e}");
        assert_eq!(e.line, Some(3), "{e}");
        let e = load("bad.yaml", "queues:\n  default:\n    workers: 0\n").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("queues.default.workers"), "{e}");
        assert_eq!(e.line, Some(3), "{e}");
    }

    #[test]
    fn bad_duration_names_field() {
        let e = load("bad.yaml", "sentinel:\n  node_timeout: soon\n").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("sentinel.node_timeout"), "{e}");
        assert!(e.message.contains("soon"), "{e}");
    }

    #[test]
    fn bad_schedules_name_the_item_and_line() {
        let yaml = "schedules:\n  - name: a\n    cron: \"* * * * *\"\n    kind: noop\n  - name: b\n    cron: \"0 99 * * *\"\n    kind: noop\n";
        let e = load("s.yaml", yaml).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("schedules[1].cron"), "{e}");
        assert_eq!(e.line, Some(6), "{e}");
        assert!(e.message.contains("field 2 (hour)"), "{e}");
        let yaml = "schedules:\n  - name: a\n    cron: \"* * * * *\"\n    kind: noop\n    timezone: Nowhere/Special\n";
        let e = load("s.yaml", yaml).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("schedules[0].timezone"), "{e}");
        assert_eq!(e.line, Some(5), "{e}");
    }

    #[test]
    fn limits_of_zero_fail_the_check_with_file_and_line() {
        // Once checked only by the Builder at start, without a line.
        let e = load(
            "l.yaml",
            "queues:\n  default:\n    workers: 2\n    global_concurrency: 0\n",
        )
        .unwrap_err();
        assert_eq!(
            e.field.as_deref(),
            Some("queues.default.global_concurrency"),
            "{e}"
        );
        assert_eq!(e.line, Some(4), "{e}");
        let e = load(
            "l.yaml",
            "queues:\n  q:\n    workers: 1\n    rate_limit:\n      max: 5\n      per: 0s\n",
        )
        .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("queues.q.rate_limit.per"), "{e}");
        assert_eq!(e.line, Some(6), "{e}");
        // The Builder refuses the same with the same field name.
        let e = load("p.yaml", "pool:\n  cron_interval: 0s\n").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("pool.cron_interval"), "{e}");
    }

    #[test]
    fn shell_entries_and_pool_sizes_are_checked_with_file_and_line() {
        let e = load(
            "s.yaml",
            "executors:\n  shell:\n    allow:\n      - sh\n      - no-such-program-here\n",
        )
        .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("executors.shell.allow[1]"), "{e}");
        assert_eq!(e.line, Some(5), "{e}");
        let e = load(
            "s.yaml",
            "executors:\n  shell:\n    allow: [sh]\n    cwd_allow: [/no/such/dir]\n",
        )
        .unwrap_err();
        assert_eq!(
            e.field.as_deref(),
            Some("executors.shell.cwd_allow[0]"),
            "{e}"
        );
        let e = load(
            "p.yaml",
            "store:\n  kind: postgres\n  url: postgres://x@127.0.0.1/db\n  pool_size: 1000000\n",
        )
        .unwrap_err();
        assert_eq!(e.field.as_deref(), Some("store.pool_size"), "{e}");
        assert_eq!(e.line, Some(4), "{e}");
        let e = load("o.yaml", "server:\n  cors_origins: [evil]\n").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("server.cors_origins[0]"), "{e}");
    }

    #[test]
    fn missing_file_names_it() {
        let e = config_load("/nonexistent/proto.yaml").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("/nonexistent/proto.yaml: cannot read"),
            "{e}"
        );
    }
}
