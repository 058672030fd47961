//! Durations as people write them in config files and on the command line:
//! `250ms`, `30s`, `5m`, `1h` or `7d`; and the serde helpers that read them
//! into the library's own `Duration` fields.

use std::time::Duration;

use ::serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Parse `250ms`, `30s`, `5m`, `1h` or `7d` (fractions allowed: `1.5s`).
pub fn parse(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .ok_or_else(|| format!("{s:?} has no unit (use ms, s, m, h or d, e.g. 30s)"))?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} does not start with a number"))?;
    let scale = match unit.trim() {
        "ms" => 0.001,
        "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        "d" => 86400.0,
        other => {
            return Err(format!(
                "{s:?} has unknown unit {other:?} (use ms, s, m, h or d)"
            ));
        }
    };
    let secs = n * scale;
    if !secs.is_finite() || secs > 1e10 {
        return Err(format!("{s:?} is too large"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `#[serde(with = "crate::duration::text")]` for a `Duration` field.
pub mod text {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        super::parse(&s).map_err(::serde::de::Error::custom)
    }

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        format!("{}ms", d.as_millis()).serialize(s)
    }
}

/// `#[serde(with = "crate::duration::opt_text")]` for an `Option<Duration>`
/// field (`null` for none).
pub mod opt_text {
    use super::*;

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        match Option::<String>::deserialize(d)? {
            Some(s) => super::parse(&s)
                .map(Some)
                .map_err(::serde::de::Error::custom),
            None => Ok(None),
        }
    }

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        d.map(|d| format!("{}ms", d.as_millis())).serialize(s)
    }
}
