//! Throwaway PostgreSQL servers.

use std::fmt::Write as _;
use std::fs;
use std::future::Future;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::os::unix::fs::chown;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use tempfile::TempDir;
use tokio_postgres::config::SslMode;
use tokio_postgres::{Client, Config, NoTls};
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::net::free_port;
use crate::pki::{write_file, TestPki};
use crate::process::{self, as_server_user, server_user, Watchdog};

/// Bootstrap superuser created by initdb; reachable over the Unix socket only
/// (trust auth), it has no password.
pub const SUPERUSER: &str = "postgres";
/// Superuser with a SCRAM password.
pub const ADMIN_USER: &str = "admin";
pub const ADMIN_PASSWORD: &str = "admin-secret";
/// LOGIN CREATEDB user with a SCRAM password; owns [`APP_DB`].
pub const APP_USER: &str = "app";
pub const APP_PASSWORD: &str = "app-secret";
pub const APP_DB: &str = "appdb";
/// User whose password is stored as an MD5 hash.
pub const MD5_USER: &str = "md5user";
pub const MD5_PASSWORD: &str = "md5-secret";
/// Names in the server certificate of a TLS-enabled [`PgServer`].
pub const TLS_DNS_NAMES: [&str; 2] = ["localhost", "db.test.internal"];

/// pg_hba.conf method for TCP connections.
///
/// Note that PostgreSQL answers an `md5` line with SCRAM for users whose
/// password is stored as SCRAM (`admin`, `app`); only [`MD5_USER`] gets a
/// real MD5 exchange.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AuthMethod {
    Trust,
    /// Cleartext password.
    Password,
    Md5,
    #[default]
    ScramSha256,
}

impl AuthMethod {
    pub fn hba_method(self) -> &'static str {
        match self {
            AuthMethod::Trust => "trust",
            AuthMethod::Password => "password",
            AuthMethod::Md5 => "md5",
            AuthMethod::ScramSha256 => "scram-sha-256",
        }
    }
}

#[derive(Clone, Debug)]
pub struct PgOptions {
    /// `ssl = on` with a certificate for [`TLS_DNS_NAMES`].
    pub tls: bool,
    /// With `tls`, TCP clients must use TLS (`hostssl` lines) unless this is
    /// set (`host` lines, which accept both).
    pub allow_plaintext: bool,
    pub auth: AuthMethod,
    pub max_connections: u32,
    /// Lines appended to postgresql.conf after the harness's own settings
    /// (later settings win).
    pub extra_conf: Vec<String>,
    /// CA to issue the server certificate from; a fresh one if `None`.
    /// Share one between servers/proxy so a single root store trusts all.
    pub pki: Option<Arc<TestPki>>,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions {
            tls: false,
            allow_plaintext: false,
            auth: AuthMethod::default(),
            max_connections: 200,
            extra_conf: Vec::new(),
            pki: None,
        }
    }
}

/// A running PostgreSQL server in a private tempdir, listening on
/// 127.0.0.1:`port()` and on a Unix socket in `socket_dir()`.
///
/// Dropping it stops the server (`pg_ctl stop -m immediate`) and removes the
/// tempdir; a watchdog process does the same if the test process dies
/// without unwinding.
pub struct PgServer {
    bin_dir: PathBuf,
    port: u16,
    pki: Option<Arc<TestPki>>,
    data_dir: PathBuf,
    log_path: PathBuf,
    /// Set by [`Self::freeze`]; a stopped server must be resumed before it
    /// can shut down.
    frozen: AtomicBool,
    // Dropped after `Drop::drop` has stopped the server; watchdog first so
    // it cannot race the tempdir removal.
    _watchdog: Watchdog,
    dir: TempDir,
}

impl PgServer {
    /// Creates, starts and bootstraps a server. Panics with the server log
    /// on any failure; anything already started is cleaned up on unwind.
    /// A TLS + SCRAM server whose certificate `pki` issued, so one CA file
    /// covers several servers (the usual shape of a multi-Region test).
    pub fn start_tls_scram(pki: &Arc<TestPki>) -> PgServer {
        PgServer::start(PgOptions {
            tls: true,
            auth: AuthMethod::ScramSha256,
            pki: Some(Arc::clone(pki)),
            ..PgOptions::default()
        })
    }

    pub fn start(opts: PgOptions) -> PgServer {
        let mut server = Self::prepare(&opts);
        // From here on a panic drops `server`, which stops whatever started.
        server.initdb();
        server.write_config(&opts);
        server.launch_on_free_port();
        server.bootstrap_roles();
        server
    }

    /// A streaming standby of this server: `pg_basebackup -R` over the
    /// Unix socket (as the server user), then started on a free port with
    /// its own socket dir, certificate (from `opts.pki`, else a fresh CA)
    /// and the harness's settings. Roles and databases are the primary's.
    pub fn start_standby(&self, opts: PgOptions) -> PgServer {
        let mut standby = Self::prepare(&opts);
        let out = standby
            .server_cmd("pg_basebackup")
            .arg("-D")
            .arg(&standby.data_dir)
            .arg("-h")
            .arg(self.socket_dir())
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                SUPERUSER,
                "-R",
                "-X",
                "stream",
                "-c",
                "fast",
                "--no-sync",
            ])
            .output()
            .expect("run pg_basebackup");
        standby.check(&out, "pg_basebackup");
        standby.write_config(&opts);
        standby.launch_on_free_port();
        standby
    }

    /// The server's tempdir and watchdog; nothing started yet.
    fn prepare(opts: &PgOptions) -> PgServer {
        let bin_dir = server_bin_dir().to_path_buf();
        let dir = tempfile::Builder::new()
            .prefix("dsql-pg-")
            .tempdir()
            .expect("create PostgreSQL tempdir");
        // The tempdir is 0700 and owned by us; the server user must own it to
        // create the data dir, socket, lock files and log in it.
        chown_to_server_user(dir.path());
        let watchdog = Watchdog::spawn(
            // Immediate shutdown (SIGQUIT) of the postmaster, SIGKILL if it
            // lingers, then remove the tempdir.
            r#"pidfile="$1/data/postmaster.pid"
if [ -f "$pidfile" ]; then
  pm=$(head -n 1 "$pidfile")
  # A frozen (SIGSTOPped) server must run again to shut down.
  for s in /proc/[0-9]*/stat; do
    read -r p c st pp rest 2>/dev/null < "$s" || continue
    [ "$pp" = "$pm" ] && kill -CONT "$p" 2>/dev/null
  done
  kill -CONT "$pm" 2>/dev/null
  kill -QUIT "$pm" 2>/dev/null
  i=0
  while [ $i -lt 20 ] && kill -0 "$pm" 2>/dev/null; do sleep 0.5; i=$((i+1)); done
  kill -KILL "$pm" 2>/dev/null
fi
rm -rf "$1""#,
            &[dir.path().as_os_str()],
        );

        let pki = opts
            .tls
            .then(|| opts.pki.clone().unwrap_or_else(|| Arc::new(TestPki::new())));
        PgServer {
            bin_dir,
            port: 0,
            pki,
            data_dir: dir.path().join("data"),
            log_path: dir.path().join("postgres.log"),
            frozen: AtomicBool::new(false),
            _watchdog: watchdog,
            dir,
        }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn host(&self) -> &'static str {
        "127.0.0.1"
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    pub fn tls(&self) -> bool {
        self.pki.is_some()
    }

    /// The CA that signed the server certificate, if TLS is on.
    pub fn ca_file(&self) -> Option<PathBuf> {
        self.pki.as_ref().map(|p| p.ca_cert_path().to_path_buf())
    }

    pub fn pki(&self) -> Option<&Arc<TestPki>> {
        self.pki.as_ref()
    }

    pub fn bin_dir(&self) -> &Path {
        &self.bin_dir
    }

    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The server log so far (pg_ctl's `-l` file).
    pub fn log_contents(&self) -> String {
        fs::read(&self.log_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_else(|e| format!("<cannot read {}: {e}>", self.log_path.display()))
    }

    /// PID of the postmaster, from `postmaster.pid`; `None` when stopped.
    pub fn postmaster_pid(&self) -> Option<u32> {
        fs::read_to_string(self.data_dir.join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }

    /// `psql -X -w` (no psqlrc, never prompt for a password) with PGHOST,
    /// PGPORT, PGUSER and PGDATABASE defaulting to this server's Unix socket
    /// and superuser. Override with flags, e.g. `-h 127.0.0.1 -p <proxy>`.
    pub fn psql_command(&self) -> Command {
        let mut cmd = Command::new(client_bin(&self.bin_dir, "psql"));
        clear_pg_env(&mut cmd);
        cmd.args(["-X", "-w"])
            .env("PGHOST", self.socket_dir())
            .env("PGPORT", self.port.to_string())
            .env("PGUSER", SUPERUSER)
            .env("PGDATABASE", "postgres");
        cmd
    }

    /// Runs `sql` as the bootstrap superuser over the Unix socket and returns
    /// unaligned, tuples-only output. Panics (with the server log) on error.
    pub fn superuser_sql(&self, sql: &str) -> String {
        let out = self
            .psql_command()
            .args(["-v", "ON_ERROR_STOP=1", "-qAt", "-c", sql])
            .output()
            .expect("run psql");
        self.check(&out, &format!("psql -c {sql:?}"));
        String::from_utf8_lossy(&out.stdout).trim_end().to_string()
    }

    pub fn pgbench_path(&self) -> PathBuf {
        client_bin(&self.bin_dir, "pgbench")
    }

    /// TCP connection settings for this server. The host name is
    /// `localhost` (so TLS verifies against the certificate) while `hostaddr`
    /// pins 127.0.0.1, the only address the server listens on.
    pub fn direct_config(&self, user: &str, password: &str, dbname: &str) -> Config {
        self.config_via(self.addr(), user, password, dbname)
    }

    /// [`Self::direct_config`], but dialing `addr` instead, e.g. a
    /// [`crate::latency::LatencyRelay`] in front of this server. The host
    /// name stays `localhost`, so TLS still verifies.
    pub fn config_via(&self, addr: SocketAddr, user: &str, password: &str, dbname: &str) -> Config {
        let mut cfg = Config::new();
        cfg.host("localhost")
            .hostaddr(addr.ip())
            .port(addr.port())
            .user(user)
            .password(password)
            .dbname(dbname)
            .connect_timeout(Duration::from_secs(10))
            .ssl_mode(if self.tls() {
                SslMode::Require
            } else {
                SslMode::Disable
            });
        cfg
    }

    /// Connects straight to the server (TLS verified against the test CA if
    /// TLS is on). The connection task is spawned on the current runtime.
    pub async fn try_connect_direct(
        &self,
        user: &str,
        password: &str,
        dbname: &str,
    ) -> Result<Client, tokio_postgres::Error> {
        let cfg = self.direct_config(user, password, dbname);
        connect_with(&cfg, self.pki.as_deref()).await
    }

    /// [`Self::try_connect_direct`] through `addr` (see [`Self::config_via`]).
    pub async fn try_connect_via(
        &self,
        addr: SocketAddr,
        user: &str,
        password: &str,
        dbname: &str,
    ) -> Result<Client, tokio_postgres::Error> {
        let cfg = self.config_via(addr, user, password, dbname);
        connect_with(&cfg, self.pki.as_deref()).await
    }

    /// [`Self::try_connect_direct`], panicking with the server log on error.
    pub async fn connect_direct(&self, user: &str, password: &str, dbname: &str) -> Client {
        match self.try_connect_direct(user, password, dbname).await {
            Ok(client) => client,
            Err(e) => panic!(
                "direct connection to PostgreSQL on port {} as {user:?} to {dbname:?} failed: \
                 {e:?}\n--- server log ---\n{}",
                self.port,
                self.log_contents()
            ),
        }
    }

    /// Stops the server immediately (e.g. to simulate an outage). The data
    /// dir is kept; [`Self::restart`] brings it back on the same port.
    pub fn stop(&mut self) {
        self.stop_quietly();
    }

    /// Starts a stopped server again on the same port. Works after
    /// [`Self::kill9`] as well.
    pub fn restart(&mut self) {
        self.stop_quietly();
        let out = self.pg_ctl_start();
        self.check(&out, "pg_ctl start (restart)");
    }

    /// Crashes the server: SIGKILL to the postmaster, as if its host died.
    /// Open connections are not closed by the postmaster; their backends
    /// exit by themselves once they notice it is gone (they are SIGKILLed
    /// if still there after 5 s, since a restart needs them gone). Returns
    /// once the port refuses connections. `postmaster.pid` is left behind
    /// as after a real crash; [`Self::restart`] (which brings the server
    /// back on the same port), [`Self::stop`] and drop clear it.
    pub fn kill9(&mut self) {
        let Some(pm) = self
            .postmaster_pid()
            .filter(|&pid| process::process_alive(pid))
        else {
            return;
        };
        // Stopped first, so it cannot fork a child we would not know about.
        process::send_signal(pm, process::SIGSTOP);
        wait_for_state(pm, 'T', Duration::from_secs(2));
        let children = process::descendants(pm);
        process::send_signal(pm, process::SIGKILL);
        if self.frozen.swap(false, Ordering::SeqCst) {
            // Stopped children would never notice the postmaster's death.
            process::send_signal_all(&children, process::SIGCONT);
        }
        process::wait_until_dead(pm, Duration::from_secs(5));
        let deadline = Instant::now() + Duration::from_secs(5);
        for &pid in &children {
            let left = deadline.saturating_duration_since(Instant::now());
            if !process::wait_until_dead(pid, left) {
                process::send_signal(pid, process::SIGKILL);
                process::wait_until_dead(pid, Duration::from_secs(5));
            }
        }
        // The postmaster held the only listening socket (children close
        // theirs), so this should be immediate.
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::net::TcpStream::connect_timeout(&self.addr(), Duration::from_millis(100)).is_ok()
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Freezes the server, like a hung host: SIGSTOP to the postmaster and
    /// all its descendants. Existing connections get no answers and new
    /// ones stall after the TCP handshake (the kernel still completes those
    /// into the listen backlog). [`Self::thaw`] resumes it; dropping a
    /// frozen server still cleans up. Panics if the server is not running.
    pub fn freeze(&self) {
        let pm = self
            .postmaster_pid()
            .filter(|&pid| process::process_alive(pid))
            .expect("freeze: the server is not running");
        self.frozen.store(true, Ordering::SeqCst);
        // Postmaster first, so no new children appear while we look.
        process::send_signal(pm, process::SIGSTOP);
        wait_for_state(pm, 'T', Duration::from_secs(5));
        let mut stopped: Vec<u32> = Vec::new();
        // Until stable: a child may fork (e.g. an archive_command shell)
        // until it is stopped itself.
        loop {
            let new: Vec<u32> = process::descendants(pm)
                .into_iter()
                .filter(|pid| !stopped.contains(pid))
                .collect();
            if new.is_empty() {
                break;
            }
            process::send_signal_all(&new, process::SIGSTOP);
            for &pid in &new {
                wait_for_state(pid, 'T', Duration::from_secs(5));
            }
            stopped.extend(new);
        }
    }

    /// Resumes a server stopped by [`Self::freeze`]. Held connections and
    /// queued connection attempts proceed.
    pub fn thaw(&self) {
        if let Some(pm) = self.postmaster_pid() {
            process::send_signal_all(&process::descendants(pm), process::SIGCONT);
            process::send_signal(pm, process::SIGCONT);
        }
        self.frozen.store(false, Ordering::SeqCst);
    }

    /// Whether [`Self::freeze`] was called without a matching thaw.
    pub fn is_frozen(&self) -> bool {
        self.frozen.load(Ordering::SeqCst)
    }

    /// The postmaster and all its live descendants (backends, checkpointer,
    /// ...), from `/proc`; empty when stopped. Works while frozen.
    pub fn server_pids(&self) -> Vec<u32> {
        match self
            .postmaster_pid()
            .filter(|&pid| process::process_alive(pid))
        {
            Some(pm) => {
                let mut pids = vec![pm];
                pids.extend(process::descendants(pm));
                pids
            }
            None => Vec::new(),
        }
    }

    /// PIDs of the client backends (sessions), from `pg_stat_activity`,
    /// without the `psql` session that asks. Needs a running, unfrozen
    /// server.
    pub fn backend_pids(&self) -> Vec<u32> {
        self.superuser_sql(
            "select pid from pg_stat_activity \
             where backend_type = 'client backend' and pid <> pg_backend_pid() order by pid",
        )
        .lines()
        .map(|l| l.trim().parse().expect("pg_stat_activity pid is a number"))
        .collect()
    }

    fn initdb(&self) {
        let out = self
            .server_cmd("initdb")
            .arg("-D")
            .arg(&self.data_dir)
            .args([
                "-U",
                SUPERUSER,
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .output()
            .expect("run initdb");
        self.check(&out, "initdb");
    }

    fn write_config(&self, opts: &PgOptions) {
        let mut conf = String::from("\n# --- dsql-proxy-tests harness ---\n");
        let socket_dir = conf_quote(self.socket_dir());
        // NBuffers must be >= 2 * MaxBackends; keep plenty of headroom.
        let shared_buffers_kb = (16 * 1024).max(8 * 4 * (opts.max_connections as u64 + 64));
        let _ = writeln!(
            conf,
            "listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = {socket_dir}\n\
             max_connections = {max}\n\
             shared_buffers = {shared_buffers_kb}kB\n\
             fsync = off\n\
             synchronous_commit = off\n\
             full_page_writes = off\n\
             logging_collector = off\n\
             password_encryption = 'scram-sha-256'",
            max = opts.max_connections,
        );
        if self.tls() {
            // PostgreSQL insists on a key owned by the server user with mode
            // 0600, so install copies next to the data dir.
            let cert = self
                .pki
                .as_ref()
                .expect("tls implies pki")
                .issue_server(&TLS_DNS_NAMES);
            let crt = self.dir.path().join("server.crt");
            let key = self.dir.path().join("server.key");
            write_file(&crt, cert.cert_pem.as_bytes(), 0o644);
            write_file(&key, cert.key_pem.as_bytes(), 0o600);
            chown_to_server_user(&crt);
            chown_to_server_user(&key);
            let _ = writeln!(
                conf,
                "ssl = on\nssl_cert_file = {}\nssl_key_file = {}",
                conf_quote(&crt),
                conf_quote(&key)
            );
        } else {
            conf.push_str("ssl = off\n");
        }
        for line in &opts.extra_conf {
            conf.push_str(line);
            conf.push('\n');
        }
        // Appending keeps the file's owner (the server user).
        let conf_path = self.data_dir.join("postgresql.conf");
        fs::OpenOptions::new()
            .append(true)
            .open(&conf_path)
            .and_then(|mut f| f.write_all(conf.as_bytes()))
            .unwrap_or_else(|e| panic!("append to {}: {e}", conf_path.display()));

        let host_type = if self.tls() && !opts.allow_plaintext {
            "hostssl"
        } else {
            "host"
        };
        let method = opts.auth.hba_method();
        let hba = format!(
            "# TYPE DATABASE USER ADDRESS METHOD  (dsql-proxy-tests harness)\n\
             local all all trust\n\
             local replication all trust\n\
             {host_type} all all 127.0.0.1/32 {method}\n\
             {host_type} all all ::1/128 {method}\n"
        );
        let hba_path = self.data_dir.join("pg_hba.conf");
        fs::write(&hba_path, hba).unwrap_or_else(|e| panic!("write {}: {e}", hba_path.display()));
    }

    /// Starts the server, retrying on a new port if another process grabbed
    /// the one `free_port` returned in the meantime.
    fn launch_on_free_port(&mut self) {
        const ATTEMPTS: usize = 5;
        for attempt in 1..=ATTEMPTS {
            self.port = free_port();
            let out = self.pg_ctl_start();
            if out.status.success() {
                return;
            }
            if attempt < ATTEMPTS && self.log_contents().contains("Address already in use") {
                continue;
            }
            self.check(&out, "pg_ctl start");
        }
    }

    fn pg_ctl_start(&self) -> Output {
        // Port on the command line so a retry doesn't need a config rewrite.
        self.server_cmd("pg_ctl")
            .arg("-D")
            .arg(&self.data_dir)
            .arg("-l")
            .arg(&self.log_path)
            .args([
                "-o",
                &format!("-p {}", self.port),
                "-w",
                "-t",
                "60",
                "start",
            ])
            .output()
            .expect("run pg_ctl start")
    }

    fn bootstrap_roles(&self) {
        let script = format!(
            "SET password_encryption = 'scram-sha-256';\n\
             CREATE ROLE {ADMIN_USER} WITH SUPERUSER LOGIN PASSWORD '{ADMIN_PASSWORD}';\n\
             CREATE ROLE {APP_USER} WITH LOGIN CREATEDB PASSWORD '{APP_PASSWORD}';\n\
             SET password_encryption = 'md5';\n\
             CREATE ROLE {MD5_USER} WITH LOGIN PASSWORD '{MD5_PASSWORD}';\n\
             RESET password_encryption;\n\
             CREATE DATABASE {APP_DB} OWNER {APP_USER};\n"
        );
        // Fed on stdin: psql then runs each statement on its own, which
        // CREATE DATABASE needs (it cannot run inside a transaction).
        let mut child = self
            .psql_command()
            .args(["-v", "ON_ERROR_STOP=1", "-q"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn psql");
        child
            .stdin
            .take()
            .expect("psql stdin is piped")
            .write_all(script.as_bytes())
            .expect("write bootstrap SQL to psql");
        let out = child.wait_with_output().expect("wait for psql");
        self.check(&out, "psql role bootstrap");
    }

    /// A command for a server binary, run as the server user, with a clean
    /// PG* environment and English messages (the port retry greps the log).
    fn server_cmd(&self, name: &str) -> Command {
        let mut cmd = Command::new(self.bin_dir.join(name));
        clear_pg_env(&mut cmd);
        cmd.current_dir(self.dir.path())
            .env("HOME", self.dir.path())
            .env("LC_ALL", "C")
            .stdin(Stdio::null());
        as_server_user(&mut cmd);
        cmd
    }

    fn check(&self, out: &Output, what: &str) {
        if !out.status.success() {
            panic!(
                "{what} failed ({}) for PostgreSQL in {}\n--- stdout ---\n{}\n--- stderr ---\n{}\n\
                 --- server log ---\n{}",
                out.status,
                self.dir.path().display(),
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log_contents()
            );
        }
    }

    fn stop_quietly(&mut self) {
        let Some(pid) = self.postmaster_pid() else {
            return;
        };
        if !process::process_alive(pid) {
            // Left behind by a crash (kill9). pg_ctl would wait in vain for a
            // zombie postmaster to remove them (kill -0 succeeds on zombies,
            // and containers often never reap orphans), and so would the
            // next postmaster's start-up check.
            self.remove_stale_lock_files();
            return;
        }
        if self.frozen.load(Ordering::SeqCst) {
            // A stopped postmaster cannot act on pg_ctl's SIGQUIT.
            self.thaw();
        }
        let _ = self
            .server_cmd("pg_ctl")
            .arg("-D")
            .arg(&self.data_dir)
            .args(["-m", "immediate", "-w", "-t", "30", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !process::wait_until_dead(pid, Duration::from_secs(5)) {
            process::send_signal(pid, process::SIGKILL);
            process::wait_until_dead(pid, Duration::from_secs(5));
        }
    }
}

impl PgServer {
    fn remove_stale_lock_files(&self) {
        let socket_lock = self
            .socket_dir()
            .join(format!(".s.PGSQL.{}.lock", self.port));
        for path in [self.data_dir.join("postmaster.pid"), socket_lock] {
            let _ = fs::remove_file(path);
        }
    }
}

/// Polls until `pid` is in `state` (e.g. `T` after SIGSTOP, which is
/// delivered asynchronously) or dead; `false` on timeout.
fn wait_for_state(pid: u32, state: char, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        match process::process_state(pid) {
            Some(s) if s == state => return true,
            None | Some('Z') | Some('X') => return true,
            _ => {}
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        self.stop_quietly();
    }
}

impl std::fmt::Debug for PgServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgServer")
            .field("port", &self.port)
            .field("tls", &self.tls())
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

/// Connects with `config`, over TLS trusting only `pki`'s CA when given
/// (plaintext otherwise), and spawns the connection task on the current
/// tokio runtime. Works for the proxy's listener as well as for servers.
pub async fn connect_with(
    config: &Config,
    pki: Option<&TestPki>,
) -> Result<Client, tokio_postgres::Error> {
    match pki {
        Some(pki) => {
            let tls = MakeRustlsConnect::new((*pki.rustls_client_config()).clone());
            let (client, conn) = config.connect(tls).await?;
            spawn_connection(conn);
            Ok(client)
        }
        None => {
            let (client, conn) = config.connect(NoTls).await?;
            spawn_connection(conn);
            Ok(client)
        }
    }
}

fn spawn_connection<F>(conn: F)
where
    F: Future<Output = Result<(), tokio_postgres::Error>> + Send + 'static,
{
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            eprintln!("tokio-postgres connection ended with error: {e}");
        }
    });
}

/// Directory holding initdb, pg_ctl and postgres. Panics if there is none.
pub fn server_bin_dir() -> &'static Path {
    static DIR: OnceLock<Option<PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| {
        debian_bin_dir()
            .or_else(pg_config_bin_dir)
            .or_else(|| find_on_path("initdb").and_then(|p| p.parent().map(Path::to_path_buf)))
            .filter(|d| has_server_binaries(d))
    })
    .as_deref()
    .unwrap_or_else(|| {
        panic!(
            "PostgreSQL server binaries (initdb, pg_ctl, postgres) not found: install them with \
             'apt-get install -y postgresql' (Debian/Ubuntu)"
        )
    })
}

fn has_server_binaries(dir: &Path) -> bool {
    ["initdb", "pg_ctl", "postgres"]
        .iter()
        .all(|b| dir.join(b).is_file())
}

/// Highest `/usr/lib/postgresql/<version>/bin` with the server binaries.
fn debian_bin_dir() -> Option<PathBuf> {
    fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|entry| {
            // Numeric compare, so "15" beats "9.6".
            let version: Vec<u32> = entry
                .file_name()
                .to_str()?
                .split('.')
                .map(|part| part.parse().ok())
                .collect::<Option<_>>()?;
            let bin = entry.path().join("bin");
            has_server_binaries(&bin).then_some((version, bin))
        })
        .max()
        .map(|(_, bin)| bin)
}

fn pg_config_bin_dir() -> Option<PathBuf> {
    let out = Command::new("pg_config").arg("--bindir").output().ok()?;
    let dir = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    (out.status.success() && has_server_binaries(&dir)).then_some(dir)
}

fn find_on_path(name: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// A client binary (psql, pgbench) from the server's bin dir, else PATH.
fn client_bin(bin_dir: &Path, name: &str) -> PathBuf {
    let local = bin_dir.join(name);
    if local.is_file() {
        return local;
    }
    find_on_path(name).unwrap_or_else(|| {
        panic!(
            "PostgreSQL client binary {name:?} not found in {} or on PATH: install it with \
             'apt-get install -y postgresql-client' (Debian/Ubuntu)",
            bin_dir.display()
        )
    })
}

/// Keeps the caller's PG* variables from redirecting harness commands.
fn clear_pg_env(cmd: &mut Command) {
    for (key, _) in std::env::vars_os() {
        if key.to_str().is_some_and(|k| k.starts_with("PG")) {
            cmd.env_remove(key);
        }
    }
}

fn chown_to_server_user(path: &Path) {
    if let Some((uid, gid)) = server_user() {
        chown(path, Some(uid), Some(gid))
            .unwrap_or_else(|e| panic!("chown {} to postgres: {e}", path.display()));
    }
}

/// A single-quoted postgresql.conf string.
fn conf_quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', "''"))
}
