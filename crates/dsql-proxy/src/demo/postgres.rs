//! The demo's PostgreSQL servers, one per simulated Region, started from
//! the local PostgreSQL install (initdb, pg_ctl) with their data in the
//! demo's temporary directory. PostgreSQL refuses to run as root, so as
//! root they run as the `postgres` user, like the test harness does.

use std::fs;
use std::io::Write as _;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::os::unix::fs::chown;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use anyhow::{bail, Context, Result};

/// The bootstrap superuser initdb creates; demo sessions log in as it.
pub const DEMO_USER: &str = "admin";
/// Where Debian and Ubuntu install the server binaries.
const DEBIAN_DIR: &str = "/usr/lib/postgresql";

/// Finds initdb, pg_ctl and postgres: the newest
/// `/usr/lib/postgresql/<version>/bin`, then `pg_config --bindir`, then
/// PATH. The error says where it looked and what to install.
pub fn find_server_binaries() -> Result<PathBuf> {
    find_server_binaries_in(Path::new(DEBIAN_DIR), std::env::var_os("PATH"))
}

fn find_server_binaries_in(debian_dir: &Path, path: Option<std::ffi::OsString>) -> Result<PathBuf> {
    let on_path = |name: &str| find_on_path(path.as_deref(), name);
    let found = debian_bin_dir(debian_dir)
        .or_else(|| on_path("pg_config").and_then(|p| pg_config_bin_dir(&p)))
        .or_else(|| on_path("initdb").and_then(|p| p.parent().map(Path::to_path_buf)))
        .filter(|d| has_server_binaries(d));
    match found {
        Some(dir) => Ok(dir),
        None => bail!(
            "the demo needs the PostgreSQL server binaries (initdb, pg_ctl, postgres) and found none \
             (looked in {}/<version>/bin, `pg_config --bindir` and PATH). Install them: \
             `sudo apt-get install postgresql` (Debian/Ubuntu), `sudo dnf install postgresql-server` \
             (Fedora/RHEL) or `brew install postgresql` (macOS)",
            debian_dir.display()
        ),
    }
}

fn has_server_binaries(dir: &Path) -> bool {
    ["initdb", "pg_ctl", "postgres"]
        .iter()
        .all(|b| dir.join(b).is_file())
}

fn debian_bin_dir(debian_dir: &Path) -> Option<PathBuf> {
    fs::read_dir(debian_dir)
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

fn pg_config_bin_dir(pg_config: &Path) -> Option<PathBuf> {
    let out = Command::new(pg_config).arg("--bindir").output().ok()?;
    let dir = PathBuf::from(String::from_utf8(out.stdout).ok()?.trim());
    (out.status.success() && has_server_binaries(&dir)).then_some(dir)
}

fn find_on_path(path: Option<&std::ffi::OsStr>, name: &str) -> Option<PathBuf> {
    std::env::split_paths(path?)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// The uid and gid servers run as: the `postgres` user when we are root,
/// else ourselves (`None`).
pub fn server_user() -> Result<Option<(u32, u32)>> {
    let id = |args: &[&str]| -> Option<u32> {
        let out = Command::new("id").args(args).output().ok()?;
        if !out.status.success() {
            return None;
        }
        String::from_utf8_lossy(&out.stdout).trim().parse().ok()
    };
    if id(&["-u"]) != Some(0) {
        return Ok(None);
    }
    match (id(&["-u", "postgres"]), id(&["-g", "postgres"])) {
        (Some(uid), Some(gid)) => Ok(Some((uid, gid))),
        _ => bail!(
            "running as root: PostgreSQL refuses to run as root and there is no `postgres` user \
             to run the demo's servers as. Installing the postgresql package creates it \
             (`apt-get install postgresql`), or run the demo as a normal user"
        ),
    }
}

/// One running server; stopped (immediate shutdown) when dropped.
pub struct LocalServer {
    bin_dir: PathBuf,
    dir: PathBuf,
    user: Option<(u32, u32)>,
    port: u16,
    running: bool,
}

impl LocalServer {
    /// initdb in `dir/data` (trust for loopback: the emulator in front
    /// checks the IAM token), then start on a free port.
    pub fn start(bin_dir: &Path, dir: &Path, user: Option<(u32, u32)>) -> Result<LocalServer> {
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        if let Some((uid, gid)) = user {
            chown(dir, Some(uid), Some(gid))
                .with_context(|| format!("cannot chown {} to postgres", dir.display()))?;
        }
        let mut server = LocalServer {
            bin_dir: bin_dir.to_path_buf(),
            dir: dir.to_path_buf(),
            user,
            port: 0,
            running: false,
        };
        let data = server.data_dir();
        let out = server
            .command("initdb")
            .arg("-D")
            .arg(&data)
            .args([
                "-U",
                DEMO_USER,
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--locale=C",
                "--no-sync",
            ])
            .output()
            .context("cannot run initdb")?;
        server.check(&out, "initdb")?;
        let conf = format!(
            "\n# dsql-proxy demo\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             max_connections = 100\nfsync = off\nsynchronous_commit = off\nfull_page_writes = off\n\
             logging_collector = off\nssl = off\n",
            server.dir.display().to_string().replace('\'', "''")
        );
        fs::OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .and_then(|mut f| f.write_all(conf.as_bytes()))
            .context("cannot write postgresql.conf")?;
        // Rewriting keeps the file's owner (the server user).
        fs::write(
            data.join("pg_hba.conf"),
            "local all all trust\nhost all all 127.0.0.1/32 trust\n",
        )
        .context("cannot write pg_hba.conf")?;
        // A port another process grabs between our check and the start
        // shows in the log; try another.
        for attempt in 1..=5 {
            server.port = free_port()?;
            let out = server
                .command("pg_ctl")
                .arg("-D")
                .arg(&data)
                .arg("-l")
                .arg(server.log_path())
                .args([
                    "-o",
                    &format!("-p {}", server.port),
                    "-w",
                    "-t",
                    "60",
                    "start",
                ])
                .output()
                .context("cannot run pg_ctl start")?;
            if out.status.success() {
                server.running = true;
                return Ok(server);
            }
            let log = fs::read_to_string(server.log_path()).unwrap_or_default();
            if attempt < 5 && log.contains("Address already in use") {
                continue;
            }
            server.check(&out, "pg_ctl start")?;
        }
        bail!("PostgreSQL in {} did not start", server.dir.display())
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from((Ipv4Addr::LOCALHOST, self.port))
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("postgres.log")
    }

    /// A server binary, as the server user, with the caller's PG*
    /// variables removed so they cannot redirect it.
    fn command(&self, name: &str) -> Command {
        let mut cmd = Command::new(self.bin_dir.join(name));
        for (key, _) in std::env::vars_os() {
            if key.to_str().is_some_and(|k| k.starts_with("PG")) {
                cmd.env_remove(key);
            }
        }
        cmd.current_dir(&self.dir)
            .env("LC_ALL", "C")
            .stdin(Stdio::null());
        if let Some((uid, gid)) = self.user {
            cmd.uid(uid).gid(gid);
        }
        cmd
    }

    fn check(&self, out: &Output, what: &str) -> Result<()> {
        if out.status.success() {
            return Ok(());
        }
        bail!(
            "{what} failed ({}) for the demo's PostgreSQL in {}: {}{}\n{}",
            out.status,
            self.dir.display(),
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim(),
            fs::read_to_string(self.log_path()).unwrap_or_default()
        )
    }

    /// Immediate shutdown: the demo's data is thrown away anyway.
    pub fn stop(&mut self) {
        if !std::mem::take(&mut self.running) {
            return;
        }
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-m", "immediate", "-w", "-t", "20", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for LocalServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A port that was free a moment ago.
pub fn free_port() -> Result<u16> {
    let listener =
        TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("cannot find a free local port")?;
    Ok(listener.local_addr()?.port())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_binaries_say_where_it_looked_and_what_to_install() {
        let err = find_server_binaries_in(Path::new("/nonexistent/postgresql"), None)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("/nonexistent/postgresql/<version>/bin"),
            "{err}"
        );
        assert!(err.contains("apt-get install postgresql"), "{err}");
    }

    #[test]
    fn finds_a_directory_with_the_server_binaries_on_path() {
        let dir = tempfile::tempdir().unwrap();
        for bin in ["initdb", "pg_ctl", "postgres"] {
            fs::write(dir.path().join(bin), "").unwrap();
        }
        let found =
            find_server_binaries_in(Path::new("/nonexistent"), Some(dir.path().into())).unwrap();
        assert_eq!(found, dir.path());
    }
}
