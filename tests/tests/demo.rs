//! `dsql-proxy demo` as a user runs it, without a terminal: real psql
//! through the proxy, `fail`/`heal` on stdin, `hang`/`heal` through the
//! admin API, `dsql-proxy drill` against it, stdin EOF, and `quit` /
//! SIGTERM cleaning up its servers and temporary directory.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dsql_proxy_tests::metrics::{http, status};
use dsql_proxy_tests::process::{process_alive, send_signal, SIGKILL, SIGTERM};
use dsql_proxy_tests::{free_addr, proxy_binary, run_proxy_cmd};

/// Three initdb runs and server starts on a shared 2-core machine.
const START_TIMEOUT: Duration = Duration::from_secs(90);
/// Selection changes: probes every 500 ms, down after 2, switch after 3.
const ROUTE_TIMEOUT: Duration = Duration::from_secs(20);

/// The demo as a child process with piped stdin; stdout and stderr are
/// collected by threads. Killed on drop (its watchdog then cleans up).
struct Demo {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
    listen: SocketAddr,
    admin: SocketAddr,
}

fn collect(stream: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let text = Arc::new(Mutex::new(String::new()));
    let sink = Arc::clone(&text);
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { return };
            let mut text = sink.lock().unwrap();
            text.push_str(&line);
            text.push('\n');
        }
    });
    text
}

impl Demo {
    fn start() -> Demo {
        let (listen, admin) = (free_addr(), free_addr());
        let mut child = Command::new(proxy_binary())
            .args(["demo", "--listen", &listen.to_string()])
            .args(["--admin", &admin.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn dsql-proxy demo");
        let stdout = collect(child.stdout.take().unwrap());
        let stderr = collect(child.stderr.take().unwrap());
        let demo = Demo {
            stdin: child.stdin.take(),
            child,
            stdout,
            stderr,
            listen,
            admin,
        };
        let connect = format!(
            "connect: psql \"host=127.0.0.1 port={} user=admin dbname=postgres\"",
            listen.port()
        );
        demo.wait_for_output(&connect, START_TIMEOUT);
        // Every Region reported and the fastest is selected.
        demo.wait_until("all three Regions up", START_TIMEOUT, |s| {
            s["endpoints"]
                .as_array()
                .is_some_and(|e| e.len() == 3 && e.iter().all(|e| e["state"] == "up"))
        });
        demo
    }

    fn output(&self) -> String {
        format!(
            "--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout.lock().unwrap(),
            self.stderr.lock().unwrap()
        )
    }

    fn wait_for_output(&self, needle: &str, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.stdout.lock().unwrap().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "no {needle:?} on stdout within {within:?}\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The temporary directory the demo announced.
    fn dir(&self) -> PathBuf {
        let out = self.stdout.lock().unwrap().clone();
        let line = out
            .lines()
            .find(|l| l.starts_with("dsql-proxy demo: starting"))
            .unwrap_or_else(|| panic!("no start line\n{out}"));
        PathBuf::from(line.rsplit(" in ").next().unwrap())
    }

    fn command(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin still open");
        writeln!(stdin, "{line}").expect("write a command to the demo");
        stdin.flush().unwrap();
    }

    fn status(&self) -> serde_json::Value {
        status(self.admin)
    }

    fn wait_until(
        &self,
        what: &str,
        within: Duration,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + within;
        loop {
            let s = self.status();
            if done(&s) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "not {what} within {within:?}: {s:#}\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Real psql through the proxy.
    fn psql(&self, sql: &str) -> String {
        let out = Command::new("psql")
            .arg(format!(
                "host=127.0.0.1 port={} user=admin dbname=postgres connect_timeout=10",
                self.listen.port()
            ))
            .args(["-X", "-tA", "-v", "ON_ERROR_STOP=1", "-c", sql])
            .env_remove("PGPASSWORD")
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql failed: {}\n{}",
            String::from_utf8_lossy(&out.stderr),
            self.output()
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "demo did not exit within {within:?}\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            send_signal(self.child.id(), SIGKILL);
            let _ = self.child.wait();
        }
    }
}

fn endpoint<'a>(status: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    status["endpoints"]
        .as_array()
        .and_then(|e| e.iter().find(|e| e["name"] == name))
        .unwrap_or_else(|| panic!("no endpoint {name} in {status:#}"))
}

/// No process runs from inside `dir` (a PostgreSQL server of the demo).
fn servers_in(dir: &std::path::Path) -> usize {
    let needle = dir.display().to_string();
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.parse::<u32>().is_ok())
        })
        .filter_map(|e| std::fs::read(e.path().join("cmdline")).ok())
        .filter(|cmd| String::from_utf8_lossy(cmd).contains(&needle))
        .count()
}

fn assert_cleaned_up(dir: &std::path::Path, demo: &Demo) {
    assert!(
        !dir.exists(),
        "{} still exists\n{}",
        dir.display(),
        demo.output()
    );
    assert_eq!(
        servers_in(dir),
        0,
        "servers left running\n{}",
        demo.output()
    );
}

#[test]
fn demo_serves_psql_reacts_to_commands_passes_the_drill_and_cleans_up() {
    let mut demo = Demo::start();
    let dir = demo.dir();
    assert!(dir.is_dir(), "{}", dir.display());
    assert_eq!(demo.psql("select 1"), "1");

    // The selected Region fails: the selection moves, /status calls it down.
    let original = demo.status()["selected"].as_str().unwrap().to_owned();
    demo.command(&format!("fail {original}"));
    let s = demo.wait_until("moved off the failed Region", ROUTE_TIMEOUT, |s| {
        s["selected"].as_str().is_some_and(|x| x != original)
            && endpoint(s, &original)["state"] == "down"
    });
    assert_eq!(endpoint(&s, &original)["eligible"], false);
    assert_eq!(demo.psql("select 2"), "2", "sessions go elsewhere");
    demo.wait_for_output(&format!("{original}: failed"), Duration::from_secs(5));

    demo.command(&format!("heal {original}"));
    demo.wait_until("back on the healed Region", ROUTE_TIMEOUT, |s| {
        s["selected"] == original.as_str() && endpoint(s, &original)["state"] == "up"
    });

    // The same through the admin API: hang it, then heal it.
    let (code, body) = http(demo.admin, "POST", &format!("/demo/hang/{original}"));
    assert_eq!(code, 200, "{body}");
    demo.wait_until("moved off the hung Region", ROUTE_TIMEOUT, |s| {
        s["selected"].as_str().is_some_and(|x| x != original)
            && endpoint(s, &original)["state"] == "down"
    });
    assert_eq!(http(demo.admin, "POST", "/demo/hang/mars-east-1").0, 404);
    assert_eq!(http(demo.admin, "POST", "/demo/slow/us-west-2/fast").0, 400);
    assert_eq!(
        http(demo.admin, "POST", &format!("/demo/heal/{original}")).0,
        200
    );
    demo.wait_until("back after the hang", ROUTE_TIMEOUT, |s| {
        s["selected"] == original.as_str()
    });

    // Without a terminal, changes are printed as lines (sampled every
    // 500 ms, so a state may be seen with the network already healed).
    let out = demo.stdout.lock().unwrap().clone();
    assert!(
        out.lines().any(|l| l.contains("[FAILED (resets)]")),
        "{out}"
    );
    assert!(
        out.lines().any(|l| l.contains("[HUNG (blackhole)]")),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| !l.contains(&format!("selected {original} "))
                && l.contains(&format!("{original} down"))),
        "{out}"
    );

    // The drill passes against the demo and prints its timeline.
    let drill = run_proxy_cmd(&[
        "drill",
        "--admin",
        &demo.admin.to_string(),
        "--connect",
        &format!(
            "host=127.0.0.1 port={} user=admin dbname=postgres",
            demo.listen.port()
        ),
        "--timeout",
        "20s",
    ]);
    let timeline = String::from_utf8_lossy(&drill.stdout);
    assert!(
        drill.status.success(),
        "{timeline}\n{}\n{}",
        String::from_utf8_lossy(&drill.stderr),
        demo.output()
    );
    for step in [
        format!("step 1: session OK (SELECT 1); new sessions use {original}"),
        format!("step 2: took {original} out: drained through the admin API"),
        "step 3: new sessions work and use".to_owned(),
        "failover took".to_owned(),
        format!("step 4: restored {original} (undrained)"),
        format!("step 5: new sessions work and use {original} again: failback took"),
        "drill passed".to_owned(),
    ] {
        assert!(timeline.contains(&step), "{step:?} missing:\n{timeline}");
    }
    assert_eq!(endpoint(&demo.status(), &original)["drained"], false);

    // Stdin closing does not stop the demo; the admin API still commands it.
    drop(demo.stdin.take());
    demo.wait_for_output("stdin closed", Duration::from_secs(5));
    std::thread::sleep(Duration::from_millis(500));
    assert!(process_alive(demo.child.id()), "{}", demo.output());
    assert_eq!(demo.psql("select 3"), "3");

    let (code, body) = http(demo.admin, "POST", "/demo/quit");
    assert_eq!(code, 200, "{body}");
    let exit = demo.wait_exit(Duration::from_secs(30));
    assert!(exit.success(), "{exit:?}\n{}", demo.output());
    demo.wait_for_output("demo stopped; removed", Duration::from_secs(1));
    assert_cleaned_up(&dir, &demo);
}

#[test]
fn a_failed_drill_names_its_step_and_restores_the_endpoint_then_sigterm_cleans_up() {
    let mut demo = Demo::start();
    let dir = demo.dir();
    assert_eq!(demo.psql("select 1"), "1");

    // Nowhere to fail over to: the drill must fail at step 3 and undrain.
    let original = demo.status()["selected"].as_str().unwrap().to_owned();
    let others: Vec<String> = demo.status()["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["name"].as_str())
        .filter(|n| *n != original)
        .map(str::to_owned)
        .collect();
    for other in &others {
        demo.command(&format!("fail {other}"));
    }
    demo.wait_until("the other Regions down", ROUTE_TIMEOUT, |s| {
        others.iter().all(|o| endpoint(s, o)["state"] == "down")
    });
    let drill = run_proxy_cmd(&[
        "drill",
        "--admin",
        &demo.admin.to_string(),
        "--connect",
        &format!(
            "host=127.0.0.1 port={} user=admin dbname=postgres",
            demo.listen.port()
        ),
        "--timeout",
        "2s",
    ]);
    let stderr = String::from_utf8_lossy(&drill.stderr);
    let stdout = String::from_utf8_lossy(&drill.stdout);
    assert!(!drill.status.success(), "{stdout}");
    assert!(
        stderr.contains("drill FAILED at step 3 (failover)"),
        "{stderr}
{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "restored {original} (undrained) after the failure"
        )),
        "{stdout}"
    );
    let s = demo.status();
    assert_eq!(endpoint(&s, &original)["drained"], false);
    assert_eq!(s["selected"], original.as_str());

    // A quit on stdin is also fine; SIGTERM is what a supervisor sends.
    // A quit on stdin is also fine; SIGTERM is what a supervisor sends.
    send_signal(demo.child.id(), SIGTERM);
    let exit = demo.wait_exit(Duration::from_secs(30));
    assert!(exit.success(), "{exit:?}\n{}", demo.output());
    assert_cleaned_up(&dir, &demo);
}
