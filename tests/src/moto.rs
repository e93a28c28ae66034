//! moto's server (`python3 -m moto.server`, from `pip install
//! 'moto[server]'`) as a local Route 53: a real HTTP endpoint speaking the
//! Route 53 REST/XML API, for the `route53` commands.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempDir;

use crate::net::free_port;
use crate::process::Watchdog;

/// Fixed fake credentials moto accepts. The secret is distinctive so tests
/// can check it is never printed.
pub const ACCESS_KEY_ID: &str = "testing";
pub const SECRET_ACCESS_KEY: &str = "moto-test-secret-never-printed";

/// How long moto may take to listen (its first import is slow).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The Python interpreter: `DSQL_PROXY_TEST_PYTHON` or `python3`.
fn python() -> String {
    std::env::var("DSQL_PROXY_TEST_PYTHON").unwrap_or_else(|_| "python3".into())
}

/// A running moto server on 127.0.0.1; killed (and its log removed) when
/// dropped, or by a watchdog if the test process dies.
pub struct MotoServer {
    child: Child,
    addr: SocketAddr,
    log_path: PathBuf,
    _watchdog: Watchdog,
    _dir: TempDir,
}

impl MotoServer {
    /// Starts moto on a free port and waits until it answers. Panics with a
    /// clear message (how to install it, its log) when it cannot start:
    /// these tests never skip.
    pub fn start() -> MotoServer {
        let python = python();
        let probe = Command::new(&python)
            .args(["-c", "import moto.server"])
            .stdin(Stdio::null())
            .output();
        match probe {
            Ok(out) if out.status.success() => {}
            Ok(out) => panic!(
                "moto's server is not installed for {python}: `{python} -m pip install \
                 'moto[server]'` (scripts/test.sh does this):\n{}",
                String::from_utf8_lossy(&out.stderr)
            ),
            Err(e) => panic!(
                "cannot run {python} ({e}): Python 3 with `pip install 'moto[server]'` is needed \
                 for the route53 tests (scripts/test.sh installs moto)"
            ),
        }
        let dir = tempfile::Builder::new()
            .prefix("moto-")
            .tempdir()
            .expect("create moto tempdir");
        let log_path = dir.path().join("moto.log");
        let log = File::create(&log_path).expect("create moto log");
        let log_err = log.try_clone().expect("clone moto log handle");
        let port = free_port();
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut child = Command::new(&python)
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p"])
            .arg(port.to_string())
            .current_dir(dir.path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {python} -m moto.server: {e}"));
        let pid = child.id().to_string();
        let watchdog = match Watchdog::try_spawn(r#"kill -KILL "$1" 2>/dev/null"#, &[pid.as_ref()])
        {
            Ok(w) => w,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("spawn watchdog for moto: {e}");
            }
        };
        let mut server = MotoServer {
            child,
            addr,
            log_path,
            _watchdog: watchdog,
            _dir: dir,
        };
        server.wait_ready();
        server
    }

    /// Polls moto's own API until it answers HTTP.
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "moto's server exited ({status}) before listening on {}:\n{}",
                    self.addr,
                    self.log()
                );
            }
            if http_answers(self.addr) {
                return;
            }
            if Instant::now() >= deadline {
                panic!(
                    "moto's server did not answer on {} within {START_TIMEOUT:?}:\n{}",
                    self.addr,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The environment for a client of this server: the fixed fake
    /// credentials, `AWS_ENDPOINT_URL_ROUTE_53`, and nothing from the host
    /// (no profiles, no IMDS).
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env = isolated_aws_env();
        env.extend([
            ("AWS_ACCESS_KEY_ID".into(), ACCESS_KEY_ID.into()),
            ("AWS_SECRET_ACCESS_KEY".into(), SECRET_ACCESS_KEY.into()),
            ("AWS_ENDPOINT_URL_ROUTE_53".into(), self.url()),
        ]);
        env
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An AWS environment with no credentials and nothing read from the host:
/// shared files pointed at `/dev/null`, IMDS off.
pub fn isolated_aws_env() -> Vec<(String, String)> {
    vec![
        ("AWS_CONFIG_FILE".into(), "/dev/null".into()),
        ("AWS_SHARED_CREDENTIALS_FILE".into(), "/dev/null".into()),
        ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
    ]
}

/// One `GET /moto-api/` that gets any HTTP answer.
fn http_answers(addr: SocketAddr) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(250)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let request = format!("GET /moto-api/ HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if s.write_all(request.as_bytes()).is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.")
}
