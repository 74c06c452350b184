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
