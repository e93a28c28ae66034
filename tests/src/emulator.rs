//! The `dsql-emulator` binary as a child process: an Aurora DSQL-like
//! endpoint (TLS with SNI, IAM auth tokens as passwords) in front of a real
//! [`PgServer`].
//!
//! Tokens come from the emulator crate's own independent SigV4 signer
//! ([`dsql_emulator::sign_token`]), so tests can also forge expired,
//! tampered or wrong-action ones.

use std::fs::{self, File};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use rustls::pki_types::ServerName;
use rustls::ClientConfig;
use tempfile::TempDir;
use tokio::net::TcpStream;
use tokio_postgres::config::SslMode;
use tokio_postgres::Config;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::pg::{PgServer, ADMIN_PASSWORD, ADMIN_USER, APP_PASSWORD, APP_USER};
use crate::pki::{ServerCert, TestPki};
use crate::process::Watchdog;
use crate::wire;

pub use dsql_emulator::{
    sign_token, ConflictKind, SessionEnd, ACTION_CONNECT, ACTION_CONNECT_ADMIN,
};

/// A DSQL-style cluster host name for the emulator's certificate and tokens.
pub const CLUSTER_HOST: &str = "abcdefghijklmnopqrstuvwxyz.dsql.us-east-1.on.aws";
pub const CLUSTER_REGION: &str = "us-east-1";
/// The test credentials the emulator accepts by default (AWS's documented
/// example key pair, never a real one).
pub const ACCESS_KEY_ID: &str = "AKIDEXAMPLE";
pub const SECRET_ACCESS_KEY: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
/// `X-Amz-Expires` of tokens made by [`EmulatorProcess::token`].
pub const TOKEN_EXPIRES: u64 = 900;

/// How long [`EmulatorProcess::start`] waits for `listening on`.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The emulator binary, built if needed (see [`crate::build`]).
pub fn emulator_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| crate::build::workspace_binary("dsql-emulator"))
}

/// What the emulator is started with. [`EmulatorOptions::new`] fills in the
/// test cluster, the default credentials, the harness roles' passwords and
/// DSQL's default limits (`None` = the emulator's default).
#[derive(Clone, Debug)]
pub struct EmulatorOptions<'a> {
    /// The real PostgreSQL sessions are relayed to; TLS `require` towards it
    /// when it has TLS on, else `disable`.
    pub upstream: &'a PgServer,
    /// Issues the emulator's certificate for `cluster_host`.
    pub pki: &'a TestPki,
    pub cluster_host: String,
    pub region: String,
    /// `(access key id, secret)` pairs the emulator accepts.
    pub credentials: Vec<(String, String)>,
    /// `(role, upstream password)` pairs.
    pub role_passwords: Vec<(String, String)>,
    pub max_session_duration: Option<Duration>,
    /// `--session-end`: how a session ends at `max_session_duration`.
    pub session_end: Option<SessionEnd>,
    /// `(per second, burst)`.
    pub rate_limit: Option<(f64, u32)>,
    pub max_connections: Option<usize>,
    /// `Some(vec![])` refuses nothing.
    pub refused_parameters: Option<Vec<String>>,
    pub max_clock_skew: Option<Duration>,
    pub startup_timeout: Option<Duration>,
    /// `--conflict-every N`: every Nth commit point of a session fails
    /// with an injected OCC conflict (SQLSTATE 40001).
    pub conflict_every: Option<u32>,
    /// `--conflict-code`: which conflict (`OC000` or `OC001`) is reported.
    pub conflict_code: Option<ConflictKind>,
    /// Anything else for the command line.
    pub extra_args: Vec<String>,
}

impl<'a> EmulatorOptions<'a> {
    pub fn new(upstream: &'a PgServer, pki: &'a TestPki) -> Self {
        Self {
            upstream,
            pki,
            cluster_host: CLUSTER_HOST.to_owned(),
            region: CLUSTER_REGION.to_owned(),
            credentials: vec![(ACCESS_KEY_ID.to_owned(), SECRET_ACCESS_KEY.to_owned())],
            role_passwords: vec![
                (ADMIN_USER.to_owned(), ADMIN_PASSWORD.to_owned()),
                (APP_USER.to_owned(), APP_PASSWORD.to_owned()),
            ],
            max_session_duration: None,
            session_end: None,
            rate_limit: None,
            max_connections: None,
            refused_parameters: None,
            max_clock_skew: None,
            startup_timeout: None,
            conflict_every: None,
            conflict_code: None,
            extra_args: Vec::new(),
        }
    }
}

fn duration_arg(d: Duration) -> String {
    format!("{}ms", d.as_millis())
}

/// A running `dsql-emulator` with stdout+stderr captured to a log file.
/// Dropping it SIGKILLs the process; a watchdog does the same if the test
/// process dies without unwinding.
pub struct EmulatorProcess {
    child: Child,
    addr: SocketAddr,
    log_path: PathBuf,
    cert: ServerCert,
    cluster_host: String,
    region: String,
    credential: (String, String),
    _watchdog: Watchdog,
    dir: TempDir,
}

impl EmulatorProcess {
    /// Starts the emulator on a free port and waits for its
    /// `listening on ADDR` line. Panics with the log if it exits first or
    /// [`START_TIMEOUT`] passes.
    pub fn start(opts: EmulatorOptions<'_>) -> EmulatorProcess {
        let bin = emulator_binary();
        let cert = opts.pki.issue_server(&[opts.cluster_host.as_str()]);
        let dir = tempfile::Builder::new()
            .prefix("dsql-emulator-")
            .tempdir()
            .expect("create emulator tempdir");
        let log_path = dir.path().join("dsql-emulator.log");
        let log = File::create(&log_path)
            .unwrap_or_else(|e| panic!("create {}: {e}", log_path.display()));
        let log_err = log.try_clone().expect("clone emulator log handle");

        let upstream_tls = if opts.upstream.tls() {
            "require"
        } else {
            "disable"
        };
        let mut cmd = Command::new(bin);
        cmd.arg("--listen")
            .arg("127.0.0.1:0")
            .arg("--tls-cert")
            .arg(&cert.cert_path)
            .arg("--tls-key")
            .arg(&cert.key_path)
            .args(["--cluster-host", &opts.cluster_host])
            .args(["--region", &opts.region])
            .args(["--upstream", &opts.upstream.addr().to_string()])
            .args(["--upstream-tls", upstream_tls])
            .args(["--log-level", "info,dsql_emulator=debug"]);
        for (k, s) in &opts.credentials {
            cmd.arg("--credential").arg(format!("{k}={s}"));
        }
        for (role, pw) in &opts.role_passwords {
            cmd.arg("--role-password").arg(format!("{role}={pw}"));
        }
        if let Some(d) = opts.max_session_duration {
            cmd.args(["--max-session-duration", &duration_arg(d)]);
        }
        if let Some(end) = opts.session_end {
            let end = match end {
                SessionEnd::Close => "close",
                SessionEnd::Fatal => "fatal",
            };
            cmd.args(["--session-end", end]);
        }
        if let Some((rate, burst)) = opts.rate_limit {
            cmd.args(["--rate-limit", &rate.to_string()]);
            cmd.args(["--rate-burst", &burst.to_string()]);
        }
        if let Some(n) = opts.max_connections {
            cmd.args(["--max-connections", &n.to_string()]);
        }
        if let Some(p) = &opts.refused_parameters {
            cmd.arg(format!("--refused-parameters={}", p.join(",")));
        }
        if let Some(d) = opts.max_clock_skew {
            cmd.args(["--max-clock-skew", &duration_arg(d)]);
        }
        if let Some(d) = opts.startup_timeout {
            cmd.args(["--startup-timeout", &duration_arg(d)]);
        }
        if let Some(n) = opts.conflict_every {
            cmd.args(["--conflict-every", &n.to_string()]);
        }
        if let Some(kind) = opts.conflict_code {
            let code = match kind {
                ConflictKind::Oc000 => "oc000",
                ConflictKind::Oc001 => "oc001",
            };
            cmd.args(["--conflict-code", code]);
        }
        cmd.args(&opts.extra_args);

        let mut child = cmd
            .current_dir(dir.path())
            .env("RUST_BACKTRACE", "1")
            .env_remove("DSQL_EMULATOR_LOG")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", bin.display()));

        let pid = child.id().to_string();
        let watchdog = match Watchdog::try_spawn(
            r#"kill -KILL "$1" 2>/dev/null; rm -rf "$2""#,
            &[pid.as_ref(), dir.path().as_os_str()],
        ) {
            Ok(w) => w,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("spawn watchdog for dsql-emulator: {e}");
            }
        };

        let credential = opts
            .credentials
            .first()
            .cloned()
            .unwrap_or_else(|| (ACCESS_KEY_ID.to_owned(), SECRET_ACCESS_KEY.to_owned()));
        let mut emulator = EmulatorProcess {
            child,
            addr: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            log_path,
            cert,
            cluster_host: opts.cluster_host,
            region: opts.region,
            credential,
            _watchdog: watchdog,
            dir,
        };
        emulator.addr = emulator.wait_listening(START_TIMEOUT);
        emulator
    }

    fn wait_listening(&mut self, timeout: Duration) -> SocketAddr {
        let deadline = Instant::now() + timeout;
        loop {
            let logs = self.logs();
            if let Some(addr) = logs
                .lines()
                .find_map(|l| l.strip_prefix("listening on "))
                .and_then(|a| a.trim().parse().ok())
            {
                return addr;
            }
            if let Some(status) = self.try_status() {
                panic!("dsql-emulator exited ({status}) before listening\n--- emulator log ---\n{logs}");
            }
            if Instant::now() >= deadline {
                panic!("dsql-emulator did not report `listening on` within {timeout:?}\n--- emulator log ---\n{logs}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The address the emulator listens on (127.0.0.1, a free port).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn cluster_host(&self) -> &str {
        &self.cluster_host
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    /// The certificate the emulator serves (for `cluster_host`).
    pub fn cert(&self) -> &ServerCert {
        &self.cert
    }

    /// Everything the emulator wrote to stdout and stderr so far.
    pub fn logs(&self) -> String {
        fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_else(|e| format!("<cannot read {}: {e}>", self.log_path.display()))
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Polls the log until it contains `needle`; `false` on timeout.
    pub fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.logs().contains(needle) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// A valid token for `role` (the action its role needs), signed now with
    /// the first configured credential, valid for [`TOKEN_EXPIRES`] seconds.
    pub fn token(&self, role: &str) -> String {
        self.token_with(
            dsql_emulator::action_for_role(role),
            SystemTime::now(),
            TOKEN_EXPIRES,
        )
    }

    /// A token for this cluster with an explicit action, signing time and
    /// expiry (for forging expired or wrong-action tokens).
    pub fn token_with(&self, action: &str, date: SystemTime, expires: u64) -> String {
        sign_token(
            &self.cluster_host,
            &self.region,
            action,
            &self.credential.0,
            &self.credential.1,
            None,
            date,
            expires,
        )
    }

    /// tokio-postgres settings for a session through the emulator as `role`
    /// with `token` as password: host name = cluster host (SNI and
    /// certificate check), `hostaddr` pins the emulator's address, TLS
    /// required.
    pub fn client_config(&self, role: &str, token: &str, dbname: &str) -> Config {
        let mut cfg = Config::new();
        cfg.host(&self.cluster_host)
            .hostaddr(IpAddr::V4(Ipv4Addr::LOCALHOST))
            .port(self.addr.port())
            .user(role)
            .password(token)
            .dbname(dbname)
            .connect_timeout(Duration::from_secs(10))
            .ssl_mode(SslMode::Require);
        cfg
    }

    /// Opens TCP, sends SSLRequest, expects `S` and completes a TLS
    /// handshake verified against `client_config` with `sni` as the server
    /// name (pass a config with `enable_sni = false` to leave SNI out).
    pub async fn tls_connect(
        &self,
        client_config: Arc<ClientConfig>,
        sni: &str,
    ) -> std::io::Result<TlsStream<TcpStream>> {
        let mut tcp = TcpStream::connect(self.addr).await?;
        wire::send(&mut tcp, &wire::ssl_request()).await?;
        match wire::read_byte(&mut tcp, Duration::from_secs(10)).await? {
            Some(b'S') => {}
            other => {
                return Err(std::io::Error::other(format!(
                    "expected 'S' to SSLRequest, got {other:?}"
                )))
            }
        }
        let name = ServerName::try_from(sni.to_owned()).map_err(std::io::Error::other)?;
        let connect = TlsConnector::from(client_config).connect(name, tcp);
        tokio::time::timeout(Duration::from_secs(10), connect)
            .await
            .map_err(|_| std::io::Error::other("TLS handshake timed out"))?
    }

    /// Waits up to `timeout` for the emulator to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn try_status(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().expect("poll dsql-emulator child")
    }
}

impl Drop for EmulatorProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl std::fmt::Debug for EmulatorProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmulatorProcess")
            .field("pid", &self.child.id())
            .field("addr", &self.addr)
            .field("cluster_host", &self.cluster_host)
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}
