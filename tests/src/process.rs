//! Process helpers shared by the harness: signals, liveness checks, the
//! root -> `postgres` user switch and a watchdog that cleans up after the
//! test process if it dies without running destructors.
//!
//! Linux-only (uses `/proc`), and free of a libc dependency on purpose.

use std::ffi::OsStr;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

// Linux signal numbers, for `send_signal` / `ProxyProcess::send_signal`.
pub const SIGHUP: i32 = 1;
pub const SIGINT: i32 = 2;
pub const SIGQUIT: i32 = 3;
pub const SIGKILL: i32 = 9;
pub const SIGTERM: i32 = 15;
pub const SIGCONT: i32 = 18;
pub const SIGSTOP: i32 = 19;

/// Sends `sig` to `pid` with the `kill` command. Returns whether it succeeded.
pub fn send_signal(pid: u32, sig: i32) -> bool {
    Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Sends `sig` to every process in `pids` with one `kill` command. Returns
/// whether all of them got it (processes that are already gone make this
/// `false`, the others are still signalled).
pub fn send_signal_all(pids: &[u32], sig: i32) -> bool {
    if pids.is_empty() {
        return true;
    }
    Command::new("kill")
        .arg(format!("-{sig}"))
        .args(pids.iter().map(u32::to_string))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// The fields of `/proc/<pid>/stat` after `comm`, starting with the state.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Format: "pid (comm) S ppid ...", and comm may itself contain ')' or
    // spaces, so split after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// The one-letter state of `pid` (`R`, `S`, `T` for stopped, `Z`, ...).
pub fn process_state(pid: u32) -> Option<char> {
    stat_fields(pid)?.first()?.chars().next()
}

/// Parent PID of `pid`, from `/proc/<pid>/stat`.
pub fn parent_pid(pid: u32) -> Option<u32> {
    stat_fields(pid)?.get(1)?.parse().ok()
}

/// All live (non-zombie) descendants of `pid`, found by walking the parent
/// links in `/proc`. A snapshot: processes may fork or exit meanwhile.
pub fn descendants(pid: u32) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut parent_of = Vec::new();
    for entry in entries.filter_map(Result::ok) {
        let Some(child) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Some(fields) = stat_fields(child) else {
            continue;
        };
        let state = fields.first().and_then(|s| s.chars().next());
        if matches!(state, Some('Z') | Some('X')) {
            continue;
        }
        if let Some(ppid) = fields.get(1).and_then(|p| p.parse::<u32>().ok()) {
            parent_of.push((child, ppid));
        }
    }
    let mut found = Vec::new();
    let mut frontier = vec![pid];
    while let Some(parent) = frontier.pop() {
        for &(child, ppid) in &parent_of {
            if ppid == parent && !found.contains(&child) {
                found.push(child);
                frontier.push(child);
            }
        }
    }
    found.sort_unstable();
    found
}

/// Whether `pid` exists and is not a zombie. Zombies count as dead because
/// containers often run a PID 1 that never reaps orphans.
pub fn process_alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // Format: "pid (comm) S ...", and comm may itself contain ')' or spaces.
    let state = stat
        .rfind(')')
        .and_then(|i| stat[i + 1..].trim_start().chars().next());
    !matches!(state, None | Some('Z') | Some('X'))
}

/// Waits until `pid` is gone; returns `false` on timeout.
pub fn wait_until_dead(pid: u32, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while process_alive(pid) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    true
}

/// Whether this process runs with effective uid 0.
pub fn is_root() -> bool {
    static ROOT: OnceLock<bool> = OnceLock::new();
    *ROOT.get_or_init(|| id_of(&["-u"]) == 0)
}

/// `(uid, gid)` that PostgreSQL server processes must run as: the
/// `postgres` OS user when we are root (initdb/pg_ctl/postgres refuse to run
/// as root), `None` (= ourselves) otherwise.
pub fn server_user() -> Option<(u32, u32)> {
    static USER: OnceLock<Option<(u32, u32)>> = OnceLock::new();
    *USER
        .get_or_init(|| is_root().then(|| (id_of(&["-u", "postgres"]), id_of(&["-g", "postgres"]))))
}

/// Makes `cmd` run as the server user (see [`server_user`]).
pub(crate) fn as_server_user(cmd: &mut Command) -> &mut Command {
    if let Some((uid, gid)) = server_user() {
        // std drops supplementary groups too when switching away from root.
        cmd.uid(uid).gid(gid);
    }
    cmd
}

fn id_of(args: &[&str]) -> u32 {
    let out = Command::new("id")
        .args(args)
        .output()
        .expect("run the `id` command");
    if !out.status.success() {
        panic!(
            "`id {}` failed: {}\n(when running as root the harness needs a `postgres` OS user; \
             installing the postgresql package creates it, or run the tests as non-root)",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("`id` prints a numeric id")
}

/// A background `sh` that waits for the test process to disappear and then
/// runs a cleanup script. Destructors cover panics; this covers SIGKILL,
/// aborts and `std::process::exit`. Killed (not run) when dropped.
pub(crate) struct Watchdog {
    child: Child,
}

impl Watchdog {
    /// `cleanup` is a POSIX sh snippet; `args` are available as `$1`, `$2`, ...
    pub(crate) fn spawn(cleanup: &str, args: &[&OsStr]) -> Watchdog {
        Self::try_spawn(cleanup, args).expect("spawn watchdog `sh` process")
    }

    pub(crate) fn try_spawn(cleanup: &str, args: &[&OsStr]) -> std::io::Result<Watchdog> {
        // readlink of /proc/PID/exe fails once PID is gone or a zombie, but
        // still succeeds if the test binary was rebuilt (deleted) meanwhile.
        let script = format!(
            "trap '' HUP INT TERM\n\
             while readlink \"/proc/$0/exe\" >/dev/null 2>&1; do sleep 1; done\n\
             {cleanup}\n"
        );
        let child = Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg(std::process::id().to_string())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(Watchdog { child })
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
