//! `proxy.toml`: the typed configuration, its validation, environment
//! overrides and a redacted rendering for `dsql-proxy check`.

mod duration;
pub mod edit;
mod model;
mod secret;
mod size;

pub use duration::DurationStr;
pub use model::*;
pub use secret::{PasswordSource, Secret};
pub use size::ByteSize;

use std::path::Path;

use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    /// toml's message names the line and column of the problem.
    #[error("invalid config {origin}: {message}")]
    Parse { origin: String, message: String },
    #[error("invalid config: {0}")]
    Invalid(String),
    #[error("invalid environment override {var}: {message}")]
    Env { var: String, message: String },
}

/// Prefix of environment variables that override single keys:
/// `DSQL_PROXY__BACKEND__TLS=require` sets `[backend] tls`.
pub const ENV_OVERRIDE_PREFIX: &str = "DSQL_PROXY__";

impl Config {
    /// Reads, parses and validates a file, applying `DSQL_PROXY__*` overrides
    /// from `env`.
    pub fn load(
        path: &Path,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse_with_env(&text, &path.display().to_string(), env)
    }

    /// Parses and validates TOML text without overrides.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        Self::parse_with_env(text, "text", std::iter::empty())
    }

    /// Parses and validates TOML text with `DSQL_PROXY__*` overrides from
    /// `env` (other variables are ignored). `origin` names the text in
    /// errors (a path). No error names a secret: secret keys' values are
    /// never echoed, whether they come from the text or the environment.
    pub fn parse_with_env(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        let overrides: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_OVERRIDE_PREFIX))
            .collect();
        let secrets = Secrets::of(text, &overrides);
        // First pass straight from the text so errors carry line numbers.
        let parse_err = |e: toml::de::Error| ConfigError::Parse {
            origin: origin.to_owned(),
            message: secrets.redact(&describe_toml_error(text, &e)),
        };
        let mut config: Config = toml::from_str(text).map_err(parse_err)?;
        if !overrides.is_empty() {
            let mut table: toml::Table = toml::from_str(text).map_err(parse_err)?;
            for (var, value) in &overrides {
                apply_override(&mut table, var, value)?;
            }
            config = table
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    origin: format!("{origin} with environment overrides"),
                    message: secrets.redact(e.message().trim_end()),
                })?;
        }
        config.validate().map_err(|e| match e {
            ConfigError::Invalid(m) => ConfigError::Invalid(secrets.redact(&m)),
            other => other,
        })?;
        Ok(config)
    }

    /// Renders the resolved config as TOML with secrets redacted. Keys
    /// only `kind = "aurora-global"` reads are left out for other kinds, so
    /// `check` shows what is in force.
    pub fn to_redacted_toml(&self) -> String {
        let text = match toml::to_string_pretty(self) {
            Ok(text) => text,
            Err(e) => return format!("# cannot render config: {e}\n"),
        };
        if self.backend.kind == BackendKind::AuroraGlobal {
            return text;
        }
        // toml_edit keeps the sections in the order they were written.
        let Ok(mut doc) = text.parse::<toml_edit::DocumentMut>() else {
            return text;
        };
        if let Some(routing) = doc.get_mut("routing").and_then(|r| r.as_table_mut()) {
            for key in AURORA_GLOBAL_ROUTING_KEYS {
                routing.remove(key);
            }
        }
        doc.to_string()
    }
}

/// `[routing]` keys that only `kind = "aurora-global"` uses.
const AURORA_GLOBAL_ROUTING_KEYS: [&str; 4] = [
    "writer_wait",
    "max_replica_lag",
    "global_cluster_id",
    "global_cluster_poll_interval",
];

/// Keys whose values are secrets, in any section.
const SECRET_KEYS: [&str; 1] = ["password"];

/// Shorter secret values are not searched for in messages (see
/// [`Secrets::of`]).
const MIN_REDACTED_LEN: usize = 4;

/// Secret values a config's errors must not show: the values of secret
/// keys in the text (as written, quotes or not) and in the overrides.
struct Secrets(Vec<String>);

impl Secrets {
    fn of(text: &str, overrides: &[(String, String)]) -> Self {
        let mut values = Vec::new();
        for line in text.lines() {
            if let Some((_, value)) = secret_assignment(line) {
                let value = value.trim();
                values.push(value.to_owned());
                let unquoted = value.trim_matches(|c| c == '"' || c == '\'');
                values.push(unquoted.to_owned());
            }
        }
        for (var, value) in overrides {
            let key = var
                .rsplit("__")
                .next()
                .unwrap_or_default()
                .to_ascii_lowercase();
            if SECRET_KEYS.contains(&key.as_str()) {
                values.push(value.clone());
            }
        }
        // Longest first, so a value containing another is replaced whole.
        // The rules above keep secrets out of messages; this is a second
        // line of defence, for values long enough not to garble the
        // message's own words.
        values.retain(|v| v.len() >= MIN_REDACTED_LEN);
        values.sort_by_key(|v| std::cmp::Reverse(v.len()));
        values.dedup();
        Self(values)
    }

    fn redact(&self, message: &str) -> String {
        let mut out = message.to_owned();
        for secret in &self.0 {
            out = out.replace(secret.as_str(), "<redacted>");
        }
        out
    }
}

/// `(key, raw value)` when `line` assigns a secret key (`password = ...`,
/// quoted or dotted keys included).
fn secret_assignment(line: &str) -> Option<(&str, &str)> {
    let (key, value) = line.split_once('=')?;
    let key = key.trim();
    let last = key
        .rsplit('.')
        .next()
        .unwrap_or(key)
        .trim()
        .trim_matches(|c| c == '"' || c == '\'');
    SECRET_KEYS
        .iter()
        .any(|s| last.eq_ignore_ascii_case(s))
        .then_some((key, value))
}

/// Whether a line of the file may hold a secret: it names a secret key
/// anywhere (also inside an inline table, or mangled by a typo). Such a
/// line is never shown in an error.
fn mentions_secret(line: &str) -> bool {
    let lower = line.to_ascii_lowercase();
    SECRET_KEYS.iter().any(|k| lower.contains(k))
}

/// toml's error with its line and column, and the offending line shown
/// the way toml shows it unless that line assigns a secret (then only the
/// key is named).
fn describe_toml_error(text: &str, e: &toml::de::Error) -> String {
    let message = e.message().trim_end();
    let Some(span) = e.span() else {
        return message.to_owned();
    };
    let start = span.start.min(text.len());
    let before = text.get(..start).unwrap_or_default();
    let line_no = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let line = text[line_start..].lines().next().unwrap_or_default();
    let column = text
        .get(line_start..start)
        .map_or(1, |s| s.chars().count() + 1);
    match mentions_secret(line) {
        // toml's own message may quote the value (`invalid type: integer
        // `123456``), so it is not shown either.
        true => format!(
            "TOML parse error at line {line_no}, column {column}: invalid line (not shown: it \
             may hold a secret; a password is a quoted string)"
        ),
        false => format!(
            "TOML parse error at line {line_no}, column {column}\n  |\n{line_no:>3} | {line}\n  \
             |{:>column$}\n{message}",
            "^"
        ),
    }
}

fn apply_override(table: &mut toml::Table, var: &str, value: &str) -> Result<(), ConfigError> {
    let path = &var[ENV_OVERRIDE_PREFIX.len()..];
    let (section, key) = path.split_once("__").ok_or_else(|| ConfigError::Env {
        var: var.to_owned(),
        message: "expected DSQL_PROXY__<SECTION>__<KEY>".into(),
    })?;
    let (section, key) = (section.to_ascii_lowercase(), key.to_ascii_lowercase());
    if section == "endpoints" {
        return Err(ConfigError::Env {
            var: var.to_owned(),
            message: "endpoints cannot be overridden from the environment".into(),
        });
    }
    // Secrets are strings whatever they look like (`123456` is a password,
    // not a number). Otherwise numbers and booleans keep their type and
    // everything else is a string (quote a value to force a string).
    let parsed = if SECRET_KEYS.contains(&key.as_str()) {
        toml::Value::String(value.to_owned())
    } else {
        match toml::from_str::<toml::Table>(&format!("v = {value}")) {
            Ok(mut t) => t
                .remove("v")
                .unwrap_or_else(|| toml::Value::String(value.into())),
            Err(_) => toml::Value::String(value.to_owned()),
        }
    };
    let entry = table
        .entry(section.clone())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    match entry {
        toml::Value::Table(t) => {
            t.insert(key, parsed);
            Ok(())
        }
        _ => Err(ConfigError::Env {
            var: var.to_owned(),
            message: format!("[{section}] is not a table"),
        }),
    }
}

#[cfg(test)]
mod tests;
