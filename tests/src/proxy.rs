//! The real `dsql-proxy` binary as a child process.

use std::fs::{self, File};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::process::{self, Watchdog};

/// How long [`ProxyProcess::start_with`] waits for the listener.
pub const START_TIMEOUT: Duration = Duration::from_secs(20);

/// The proxy binary, built if needed (see [`crate::build`]).
///
/// `DSQL_PROXY_BIN` names a prebuilt binary instead (the benchmarks run the
/// release build that way); nothing is built then.
pub fn proxy_binary() -> &'static Path {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(bin) = std::env::var_os("DSQL_PROXY_BIN") {
            let bin = PathBuf::from(bin);
            assert!(
                bin.is_file(),
                "DSQL_PROXY_BIN={} is not a file",
                bin.display()
            );
            return bin;
        }
        crate::build::workspace_binary("dsql-proxy")
    })
}

/// Runs the proxy binary once to completion (e.g. `["check", "--config", f]`).
pub fn run_proxy_cmd(args: &[&str]) -> Output {
    Command::new(proxy_binary())
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run dsql-proxy {args:?}: {e}"))
}

/// Like [`run_proxy_cmd`] with an AWS environment of its own: every
/// inherited `AWS_*` variable is removed, then `env` is applied.
pub fn run_proxy_cmd_with_env(args: &[&str], env: &[(String, String)]) -> Output {
    let mut command = Command::new(proxy_binary());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("AWS_") {
            command.env_remove(&key);
        }
    }
    command
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run dsql-proxy {args:?}: {e}"))
}

/// A running `dsql-proxy --config <file>` with stdout+stderr captured to a
/// log file. Dropping it SIGKILLs the process; a watchdog does the same if
/// the test process dies without unwinding.
pub struct ProxyProcess {
    child: Child,
    config_path: PathBuf,
    log_path: PathBuf,
    _watchdog: Watchdog,
    dir: TempDir,
}

impl ProxyProcess {
    /// Starts the proxy and waits until `listen_addr` (which the caller put
    /// in `config_toml`) accepts TCP connections. Panics with the proxy log if
    /// the process exits first or [`START_TIMEOUT`] passes.
    pub fn start_with(config_toml: &str, listen_addr: SocketAddr) -> ProxyProcess {
        let mut proxy = Self::spawn(config_toml);
        proxy.wait_ready(listen_addr, START_TIMEOUT);
        proxy
    }

    /// Starts the proxy without waiting for anything; for tests that expect
    /// startup to fail, or that wait on something other than a port.
    pub fn spawn(config_toml: &str) -> ProxyProcess {
        Self::spawn_with_args(config_toml, &[])
    }

    /// Like [`Self::spawn`] with extra arguments after `--config <file>`.
    pub fn spawn_with_args(config_toml: &str, extra_args: &[&str]) -> ProxyProcess {
        Self::spawn_with_env(config_toml, extra_args, &[])
    }

    /// Like [`Self::spawn_with_args`] with an AWS environment of its own:
    /// every inherited `AWS_*` variable is removed, then `env` is applied, so
    /// a test controls exactly which credentials the SDK's chain can find.
    pub fn spawn_with_env(
        config_toml: &str,
        extra_args: &[&str],
        env: &[(String, String)],
    ) -> ProxyProcess {
        let bin = proxy_binary();
        let dir = tempfile::Builder::new()
            .prefix("dsql-proxy-")
            .tempdir()
            .expect("create proxy tempdir");
        let config_path = dir.path().join("dsql-proxy.toml");
        let log_path = dir.path().join("dsql-proxy.log");
        fs::write(&config_path, config_toml)
            .unwrap_or_else(|e| panic!("write {}: {e}", config_path.display()));
        let log = File::create(&log_path)
            .unwrap_or_else(|e| panic!("create {}: {e}", log_path.display()));
        let log_err = log.try_clone().expect("clone proxy log handle");

        let mut command = Command::new(bin);
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("AWS_") {
                command.env_remove(&key);
            }
        }
        command.envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let mut child = command
            .arg("--config")
            .arg(&config_path)
            .args(extra_args)
            .current_dir(dir.path())
            .env("RUST_BACKTRACE", "1")
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
                panic!("spawn watchdog for dsql-proxy: {e}");
            }
        };

        ProxyProcess {
            child,
            config_path,
            log_path,
            _watchdog: watchdog,
            dir,
        }
    }

    /// Waits until `addr` accepts TCP; panics with the log if the proxy
    /// exits or `timeout` passes.
    pub fn wait_ready(&mut self, addr: SocketAddr, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_status() {
                panic!(
                    "dsql-proxy exited ({status}) before listening on {addr}\n--- proxy log ---\n{}",
                    self.logs()
                );
            }
            if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "dsql-proxy did not listen on {addr} within {timeout:?}\n--- proxy log ---\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
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

    /// Everything the proxy wrote to stdout and stderr so far.
    pub fn logs(&self) -> String {
        fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_else(|e| format!("<cannot read {}: {e}>", self.log_path.display()))
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The `[admin] address` of the config the proxy was started with.
    pub fn admin_addr(&self) -> SocketAddr {
        let toml = fs::read_to_string(&self.config_path).expect("read proxy config");
        toml.split("[admin]")
            .nth(1)
            .and_then(|section| {
                section
                    .lines()
                    .find_map(|l| l.trim().strip_prefix("address = "))
            })
            .and_then(|v| v.trim_matches('"').parse().ok())
            .expect("[admin] address")
    }

    /// Replaces the config file (e.g. before `send_signal(SIGHUP)`).
    pub fn write_config(&self, config_toml: &str) {
        // Write-then-rename so the proxy never reads a half-written file.
        let tmp = self.dir.path().join("dsql-proxy.toml.tmp");
        fs::write(&tmp, config_toml).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
        fs::rename(&tmp, &self.config_path)
            .unwrap_or_else(|e| panic!("rename config into place: {e}"));
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (see the constants in [`crate::process`]). Panics if
    /// `kill` fails, e.g. because the proxy has already exited and been reaped.
    pub fn send_signal(&self, sig: i32) {
        assert!(
            process::send_signal(self.pid(), sig),
            "kill -{sig} {} failed\n--- proxy log ---\n{}",
            self.pid(),
            self.logs()
        );
    }

    /// Waits up to `timeout` for the proxy to exit.
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
        self.child.try_wait().expect("poll dsql-proxy child")
    }
}

impl Drop for ProxyProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl std::fmt::Debug for ProxyProcess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyProcess")
            .field("pid", &self.child.id())
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}
