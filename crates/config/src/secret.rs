use std::path::PathBuf;

use serde::{Deserialize, Serialize, Serializer};

/// A string that must never be printed: Debug and Serialize redact it.
#[derive(Clone, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

impl Serialize for Secret {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

/// Where a password comes from: inline, an environment variable read at
/// connect time, or a file re-read at connect time (so rotated secrets work
/// without a restart).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PasswordSource {
    Inline(Secret),
    Env(String),
    File(PathBuf),
}

impl PasswordSource {
    /// Builds the source from the three mutually exclusive keys.
    pub fn from_keys(
        section: &str,
        inline: &Option<Secret>,
        env: &Option<String>,
        file: &Option<PathBuf>,
    ) -> Result<Option<Self>, String> {
        match (inline, env, file) {
            (None, None, None) => Ok(None),
            (Some(p), None, None) => Ok(Some(Self::Inline(p.clone()))),
            (None, Some(e), None) => Ok(Some(Self::Env(e.clone()))),
            (None, None, Some(f)) => Ok(Some(Self::File(f.clone()))),
            _ => Err(format!(
                "[{section}] set only one of password, password_env and password_file"
            )),
        }
    }

    /// Reads the password now.
    pub fn read(&self) -> Result<Secret, String> {
        match self {
            Self::Inline(s) => Ok(s.clone()),
            Self::Env(var) => match std::env::var(var) {
                Ok(v) if !v.is_empty() => Ok(Secret(v)),
                Ok(_) => Err(format!("environment variable {var} is empty")),
                Err(_) => Err(format!("environment variable {var} is not set")),
            },
            Self::File(path) => match std::fs::read_to_string(path) {
                // A trailing newline is an artefact of how the file was
                // written, never part of the password.
                Ok(v) => {
                    let v = v.trim_end_matches(['\r', '\n']);
                    if v.is_empty() {
                        Err(format!("password file {} is empty", path.display()))
                    } else {
                        Ok(Secret(v.to_owned()))
                    }
                }
                Err(e) => Err(format!("cannot read password file {}: {e}", path.display())),
            },
        }
    }
}
