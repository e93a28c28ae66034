//! `proxy.toml`: the typed configuration, its validation, environment
//! overrides and a redacted rendering for `dsql-proxy check`.

mod duration;
pub mod edit;
mod model;
mod secret;

pub use duration::DurationStr;
pub use model::*;
pub use secret::{PasswordSource, Secret};

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

    fn parse_with_env(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ConfigError> {
        // First pass straight from the text so errors carry line numbers.
        let parse_err = |e: toml::de::Error| ConfigError::Parse {
            origin: origin.to_owned(),
            message: e.to_string().trim_end().to_owned(),
        };
        let mut config: Config = toml::from_str(text).map_err(parse_err)?;
        let overrides: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_OVERRIDE_PREFIX))
            .collect();
        if !overrides.is_empty() {
            let mut table: toml::Table = toml::from_str(text).map_err(parse_err)?;
            for (var, value) in &overrides {
                apply_override(&mut table, var, value)?;
            }
            config = table
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    origin: format!("{origin} with environment overrides"),
                    message: e.to_string().trim_end().to_owned(),
                })?;
        }
        config.validate()?;
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
    // Numbers and booleans keep their type; everything else is a string.
    let parsed = match toml::from_str::<toml::Table>(&format!("v = {value}")) {
        Ok(mut t) => t
            .remove("v")
            .unwrap_or_else(|| toml::Value::String(value.into())),
        Err(_) => toml::Value::String(value.to_owned()),
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
