//! The emulator's configuration and the small parsers the CLI shares.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use dsql_proxy_config::Secret;

use crate::EmulatorError;

/// Default `max_session_duration`: DSQL closes connections after one hour.
pub const DEFAULT_MAX_SESSION_DURATION: Duration = Duration::from_secs(60 * 60);
/// How long a transaction running when `max_session_duration` is reached may
/// still take before the session is ended anyway: DSQL's transaction limit.
pub const TRANSACTION_GRACE: Duration = Duration::from_secs(5 * 60);
/// Default connection rate limit (new connections per second).
pub const DEFAULT_RATE_PER_SECOND: f64 = 100.0;
/// Default token-bucket size of the connection rate limit.
pub const DEFAULT_RATE_BURST: u32 = 1000;
/// Default limit on concurrent connections.
pub const DEFAULT_MAX_CONNECTIONS: usize = 10_000;
/// Default startup parameters DSQL refuses.
pub const DEFAULT_REFUSED_PARAMETERS: &[&str] = &["default_transaction_read_only"];
/// Default allowance for an `X-Amz-Date` in the future.
pub const DEFAULT_MAX_CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);
/// Default time a client has from connect to sending its password.
pub const DEFAULT_STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Default time to open and authenticate the upstream session.
pub const DEFAULT_UPSTREAM_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// TLS towards the upstream PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UpstreamTls {
    Disable,
    /// Encrypt, accept any certificate (libpq's `sslmode=require`).
    #[default]
    Require,
}

impl std::str::FromStr for UpstreamTls {
    type Err = EmulatorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "disable" => Ok(Self::Disable),
            "require" => Ok(Self::Require),
            other => Err(EmulatorError::Config(format!(
                "upstream TLS mode {other:?}: expected \"disable\" or \"require\""
            ))),
        }
    }
}

/// How a session ends at `max_session_duration`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SessionEnd {
    /// Close the connection without a message, as DSQL does.
    #[default]
    Close,
    /// Send FATAL `57P01` first, then close (what PostgreSQL does when an
    /// administrator ends a session).
    Fatal,
}

/// Which Aurora DSQL optimistic-concurrency conflict injected conflicts
/// report (both are SQLSTATE `40001`; the message carries the code).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConflictKind {
    /// `OC000`: a data conflict ("change conflicts with another
    /// transaction").
    #[default]
    Oc000,
    /// `OC001`: a catalog conflict ("schema has been updated by another
    /// transaction").
    Oc001,
}

impl ConflictKind {
    /// The ErrorResponse message Aurora DSQL sends for this conflict.
    pub fn message(self) -> &'static str {
        match self {
            Self::Oc000 => "change conflicts with another transaction, please retry: (OC000)",
            Self::Oc001 => "schema has been updated by another transaction, please retry: (OC001)",
        }
    }

    /// `OC000` or `OC001`.
    pub fn code(self) -> &'static str {
        match self {
            Self::Oc000 => "OC000",
            Self::Oc001 => "OC001",
        }
    }
}

impl std::str::FromStr for ConflictKind {
    type Err = EmulatorError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.eq_ignore_ascii_case("oc000") {
            Ok(Self::Oc000)
        } else if s.eq_ignore_ascii_case("oc001") {
            Ok(Self::Oc001)
        } else {
            Err(EmulatorError::Config(format!(
                "conflict code {s:?}: expected \"oc000\" or \"oc001\""
            )))
        }
    }
}

/// The real PostgreSQL accepted sessions are relayed to.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// `HOST:PORT` or `IP:PORT`.
    pub address: String,
    pub tls: UpstreamTls,
    /// Password per role: the emulator logs in upstream as the client's role
    /// with this password. Roles without an entry are sent without one
    /// (fine for `trust` upstreams).
    pub role_passwords: HashMap<String, Secret>,
    pub connect_timeout: Duration,
}

/// Token bucket for new connections.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateLimit {
    /// Tokens added per second; `0` disables the limit.
    pub per_second: f64,
    /// Bucket size: how many connections may arrive at once.
    pub burst: u32,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self {
            per_second: DEFAULT_RATE_PER_SECOND,
            burst: DEFAULT_RATE_BURST,
        }
    }
}

/// Everything the emulator needs. Build with [`EmulatorConfig::new`] and
/// adjust the public fields.
#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    /// Where to listen; port 0 picks a free port (see `Emulator::local_addr`).
    pub listen: SocketAddr,
    /// PEM certificate chain for the cluster host name, and its key.
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    /// The DSQL host name tokens must be signed for, e.g.
    /// `abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws`.
    pub cluster_host: String,
    /// The region tokens must be signed for.
    pub region: String,
    /// Accepted credentials: secret access key by access key id.
    pub credentials: HashMap<String, Secret>,
    pub upstream: UpstreamConfig,
    pub max_session_duration: Duration,
    pub session_end: SessionEnd,
    pub rate_limit: RateLimit,
    pub max_connections: usize,
    /// Startup parameters answered with FATAL 08P01 (case-insensitive).
    pub refused_parameters: Vec<String>,
    pub max_clock_skew: Duration,
    pub startup_timeout: Duration,
    /// Optimistic-concurrency conflict injection: per session, every Nth
    /// commit point (an autocommit simple Query, an extended-protocol batch
    /// with an Execute started while idle, or a COMMIT/END in a transaction
    /// block) fails with SQLSTATE `40001` instead of committing. `0` (the
    /// default) turns it off and leaves the relay untouched.
    pub conflict_every: u32,
    /// Which conflict the injected errors report.
    pub conflict_kind: ConflictKind,
}

impl EmulatorConfig {
    /// A configuration with every limit at its default and no credentials or
    /// role passwords yet.
    pub fn new(
        listen: SocketAddr,
        tls_cert: impl Into<PathBuf>,
        tls_key: impl Into<PathBuf>,
        cluster_host: impl Into<String>,
        region: impl Into<String>,
        upstream_address: impl Into<String>,
    ) -> Self {
        Self {
            listen,
            tls_cert: tls_cert.into(),
            tls_key: tls_key.into(),
            cluster_host: cluster_host.into(),
            region: region.into(),
            credentials: HashMap::new(),
            upstream: UpstreamConfig {
                address: upstream_address.into(),
                tls: UpstreamTls::default(),
                role_passwords: HashMap::new(),
                connect_timeout: DEFAULT_UPSTREAM_CONNECT_TIMEOUT,
            },
            max_session_duration: DEFAULT_MAX_SESSION_DURATION,
            session_end: SessionEnd::default(),
            rate_limit: RateLimit::default(),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            refused_parameters: DEFAULT_REFUSED_PARAMETERS
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
            max_clock_skew: DEFAULT_MAX_CLOCK_SKEW,
            startup_timeout: DEFAULT_STARTUP_TIMEOUT,
            conflict_every: 0,
            conflict_kind: ConflictKind::default(),
        }
    }

    /// Adds an accepted access key.
    pub fn with_credential(mut self, access_key_id: &str, secret: &str) -> Self {
        self.credentials
            .insert(access_key_id.to_owned(), Secret::new(secret));
        self
    }

    /// Adds an upstream role password.
    pub fn with_role_password(mut self, role: &str, password: &str) -> Self {
        self.upstream
            .role_passwords
            .insert(role.to_owned(), Secret::new(password));
        self
    }

    /// Checks values that cannot work.
    pub fn validate(&self) -> Result<(), EmulatorError> {
        let bad = |m: String| Err(EmulatorError::Config(m));
        if self.cluster_host.is_empty() {
            return bad("cluster_host is empty".into());
        }
        if self.region.is_empty() {
            return bad("region is empty".into());
        }
        if self.credentials.is_empty() {
            return bad("no accepted credentials: give at least one ACCESS_KEY_ID=SECRET".into());
        }
        if let Some(id) = self
            .credentials
            .keys()
            .find(|k| k.is_empty() || k.contains('/'))
        {
            return bad(format!("access key id {id:?} is empty or contains '/'"));
        }
        if self.max_session_duration.is_zero() {
            return bad("max_session_duration must be positive".into());
        }
        let r = self.rate_limit;
        if !r.per_second.is_finite() || r.per_second < 0.0 {
            return bad(format!(
                "rate limit {} per second is not a non-negative number",
                r.per_second
            ));
        }
        if r.per_second > 0.0 && r.burst == 0 {
            return bad("rate limit burst must be at least 1".into());
        }
        if self.max_connections == 0 {
            return bad("max_connections must be at least 1".into());
        }
        if self.startup_timeout.is_zero() || self.upstream.connect_timeout.is_zero() {
            return bad("timeouts must be positive".into());
        }
        Ok(())
    }
}

/// Parses `KEY=VALUE`, splitting at the first `=` (values such as passwords
/// may contain more).
pub fn parse_pair(s: &str) -> Result<(String, String), EmulatorError> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_owned(), v.to_owned())),
        _ => Err(EmulatorError::Config(
            "expected KEY=VALUE with a non-empty KEY".into(),
        )),
    }
}

/// Parses a duration: a number with an optional unit `ms`, `s`, `m`, `h`
/// (`500ms`, `2s`, `60m`, `1h`); a bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Duration, EmulatorError> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let value: f64 = num
        .parse()
        .map_err(|_| EmulatorError::Config(format!("invalid duration {s:?}")))?;
    let secs = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        other => {
            return Err(EmulatorError::Config(format!(
                "invalid duration unit {other:?} in {s:?} (use ms, s, m or h)"
            )))
        }
    };
    Duration::try_from_secs_f64(secs)
        .map_err(|_| EmulatorError::Config(format!("duration {s:?} is out of range")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_durations() {
        assert_eq!(parse_duration("2s").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("60m").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        for bad in ["", "s", "2d", "-1s", "1e999"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn parses_pairs() {
        assert_eq!(
            parse_pair("AKID=a/b+c=").unwrap(),
            ("AKID".to_owned(), "a/b+c=".to_owned())
        );
        assert!(parse_pair("=x").is_err());
        assert!(parse_pair("nokey").is_err());
    }

    #[test]
    fn parses_conflict_kinds() {
        assert_eq!(
            "oc000".parse::<ConflictKind>().unwrap(),
            ConflictKind::Oc000
        );
        assert_eq!(
            "OC001".parse::<ConflictKind>().unwrap(),
            ConflictKind::Oc001
        );
        assert!("oc002".parse::<ConflictKind>().is_err());
        assert!(ConflictKind::Oc000.message().ends_with("(OC000)"));
        assert!(ConflictKind::Oc001.message().ends_with("(OC001)"));
    }

    #[test]
    fn validates() {
        let base = EmulatorConfig::new(
            "127.0.0.1:0".parse().unwrap(),
            "c",
            "k",
            "h.dsql.us-east-1.on.aws",
            "us-east-1",
            "127.0.0.1:5432",
        );
        assert!(base.validate().is_err(), "no credentials");
        let ok = base.with_credential("AKID", "s");
        ok.validate().unwrap();
        assert_eq!(ok.refused_parameters, vec!["default_transaction_read_only"]);
        let mut bad = ok.clone();
        bad.rate_limit.burst = 0;
        assert!(bad.validate().is_err());
        let mut off = ok.clone();
        off.rate_limit = RateLimit {
            per_second: 0.0,
            burst: 0,
        };
        off.validate().unwrap();
    }
}
