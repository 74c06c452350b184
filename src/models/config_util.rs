//! Helpers for reading diffusers config.json files: numbers-or-lists and keys that must keep their default.

use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};

/// A config value given either once for all blocks or per block.
#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub(crate) enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T: Clone> OneOrMany<T> {
    /// Expand to `n` values; a list must have exactly `n` entries.
    pub fn expand(&self, key: &str, n: usize) -> Result<Vec<T>> {
        match self {
            OneOrMany::One(v) => Ok(vec![v.clone(); n]),
            OneOrMany::Many(v) if v.len() == n => Ok(v.clone()),
            OneOrMany::Many(v) => Err(Error::format(format!("config key {key} has {} entries, expected {n}", v.len()))),
        }
    }
}

/// Fail with `Error::Unsupported` naming `key` and its value unless the value is absent, null or accepted by `ok`.
pub(crate) fn require(cfg: &serde_json::Map<String, Value>, key: &str, ok: impl Fn(&Value) -> bool) -> Result<()> {
    match cfg.get(key) {
        None | Some(Value::Null) => Ok(()),
        Some(v) if ok(v) => Ok(()),
        Some(v) => Err(Error::unsupported(format!("config key {key} = {v}"))),
    }
}

/// Fail unless the key is absent or null.
pub(crate) fn require_null(cfg: &serde_json::Map<String, Value>, key: &str) -> Result<()> {
    require(cfg, key, |_| false)
}

pub(crate) fn is_str(v: &Value, s: &str) -> bool {
    v.as_str() == Some(s)
}

pub(crate) fn is_num(v: &Value, x: f64) -> bool {
    v.as_f64() == Some(x)
}

/// True for `b`, or a list of only `b`.
pub(crate) fn is_bool_all(v: &Value, b: bool) -> bool {
    match v {
        Value::Bool(x) => *x == b,
        Value::Array(a) => a.iter().all(|x| x.as_bool() == Some(b)),
        _ => false,
    }
}

/// Parse a JSON object.
pub(crate) fn parse_object(text: &str, what: &str) -> Result<serde_json::Map<String, Value>> {
    match serde_json::from_str::<Value>(text) {
        Ok(Value::Object(m)) => Ok(m),
        Ok(_) => Err(Error::format(format!("{what}: config is not a JSON object"))),
        Err(e) => Err(Error::format(format!("{what}: {e}"))),
    }
}

/// Deserialize the supported keys of an already checked object.
pub(crate) fn typed<T: for<'de> Deserialize<'de>>(m: &serde_json::Map<String, Value>, what: &str) -> Result<T> {
    serde_json::from_value(Value::Object(m.clone())).map_err(|e| Error::format(format!("{what}: {e}")))
}

/// Fail with `Error::Format` naming `key` unless its value (a number, or a list of numbers) lies in `min..=max`.
/// Absent and null pass (the default applies). Checked on the raw JSON before deserialising, so a hostile file
/// (`4294967296`, `1e300`, values ≥ 2^63) is refused by name instead of sizing an allocation or a loop.
pub(crate) fn bounded(cfg: &serde_json::Map<String, Value>, key: &str, min: u64, max: u64) -> Result<()> {
    let check = |v: &Value| -> Result<()> {
        let ok = match v {
            Value::Number(n) => match (n.as_u64(), n.as_f64()) {
                (Some(u), _) => (min..=max).contains(&u),
                (None, Some(f)) => f.fract() == 0.0 && f >= min as f64 && f <= max as f64,
                _ => false,
            },
            _ => true, // a wrong type is reported by the typed read, with serde's message
        };
        if ok {
            Ok(())
        } else {
            Err(Error::format(format!("config key {key} = {v} is out of range (accepted: {min}..={max})")))
        }
    };
    match cfg.get(key) {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Array(a)) => {
            if a.len() as u64 > MAX_BLOCKS {
                return Err(Error::format(format!("config key {key} has {} entries (at most {MAX_BLOCKS})", a.len())));
            }
            a.iter().try_for_each(check)
        }
        Some(v) => check(v),
    }
}

/// Most entries of a per-block list (down/up blocks of a UNet or VAE): real models have 3–4.
pub(crate) const MAX_BLOCKS: u64 = 16;
/// Largest channel count accepted from a config (SD's widest layer is 1280; 16× headroom).
pub(crate) const MAX_CHANNELS: u64 = 1 << 16;
/// Most resnets per block accepted from a config (real models have 1–3).
pub(crate) const MAX_LAYERS_PER_BLOCK: u64 = 64;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_names_the_key_and_accepts_lists() {
        let m = parse_object(
            r#"{"a": 4294967295, "b": [1, 2, 70000], "c": 18446744073709551615, "d": 1e300, "e": [3, 4]}"#,
            "t",
        )
        .unwrap();
        for key in ["a", "b", "c", "d"] {
            let e = bounded(&m, key, 1, 65536).unwrap_err().to_string();
            assert!(e.starts_with("format error: config key ") && e.contains(key), "{e}");
        }
        bounded(&m, "e", 1, 4).unwrap();
        bounded(&m, "missing", 1, 4).unwrap();
    }
}
