//! `dsql-proxy demo`: three simulated Regions on this machine and the real
//! proxy in front of them, with the whole IAM path running.
//!
//! Per Region: a local PostgreSQL server ([`postgres`]), the token-checking
//! DSQL endpoint emulator in front of it (the `dsql-emulator` crate,
//! in-process: TLS with SNI, SigV4 token check with the demo credentials)
//! and a latency relay in front of that (`dsql-proxy-netsim`), which `fail`, `hang`,
//! `heal` and `slow` act on. The proxy runs in-process through the same
//! `serve` as `dsql-proxy run`, from a generated config (`kind = "dsql"`,
//! `auth = "dsql-iam"`, `verify-full` against the demo CA), so reloads,
//! `/status`, `dsql-proxy status` and the drill work against it as usual.
//!
//! Everything lives in one temporary directory, removed on exit; a
//! watchdog process stops the servers and removes it should the demo be
//! killed outright.

mod control;
mod pki;
mod postgres;
mod view;

use std::io::{BufRead, IsTerminal, Write};
use std::net::SocketAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dsql_emulator::{Emulator, EmulatorConfig, UpstreamTls};
use dsql_proxy_admin::AdminState;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot, watch};

use self::control::{DemoRegions, RegionNet};
use self::postgres::{LocalServer, DEMO_USER};
use crate::reload::ConfigSource;
use crate::ServeHooks;
use dsql_proxy_netsim::Relay;

/// The demo's fixed credentials: AWS's documented example key pair, never
/// a real one. The proxy signs with them, the emulators check them.
const DEMO_ACCESS_KEY_ID: &str = "AKIDEXAMPLE";
const DEMO_SECRET_ACCESS_KEY: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
/// A DSQL-shaped cluster id (26 lowercase letters) for the host names.
const DEMO_CLUSTER_ID: &str = "dsqlproxydemoclusterabcdef";
/// The simulated Regions and their added round-trip latency.
const REGIONS: [(&str, u64); 3] = [("us-east-1", 5), ("us-east-2", 40), ("us-west-2", 80)];
/// How often changes are looked for.
const REFRESH: Duration = Duration::from_millis(500);
/// Latencies alone redraw the terminal at most this often: a redraw wipes
/// the command being typed from the screen (not from the input).
const LATENCY_REDRAW: Duration = Duration::from_secs(3);

pub struct DemoOptions {
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub worker_threads: Option<usize>,
}

pub fn run(options: DemoOptions) -> Result<()> {
    // Before anything starts: say exactly what is missing.
    let bin_dir = postgres::find_server_binaries()?;
    let server_user = postgres::server_user()?;
    for (address, flag) in [(options.listen, "--listen"), (options.admin, "--admin")] {
        // Found out now rather than after three servers were set up.
        std::net::TcpListener::bind(address).with_context(|| {
            format!("cannot listen on {address}; choose another address with {flag}")
        })?;
    }
    let dir = tempfile::Builder::new()
        .prefix("dsql-proxy-demo-")
        .tempdir()
        .context("cannot create the demo's temporary directory")?;
    use_demo_credentials(dir.path())?;
    // The servers run as `postgres` when we are root: they must reach
    // their directories inside it.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
        .context("cannot chmod the demo's temporary directory")?;
    let _watchdog = Watchdog::spawn(dir.path());
    let runtime = match options.worker_threads {
        Some(0) => anyhow::bail!("--worker-threads must be at least 1"),
        None | Some(1) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build(),
        Some(n) => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(n)
            .enable_all()
            .build(),
    }
    .context("cannot start the async runtime")?;
    let result = runtime.block_on(demo(&options, &bin_dir, server_user, dir.path()));
    runtime.shutdown_timeout(Duration::from_secs(1));
    // `result` holds the servers: dropping it stops them, then the
    // directory goes.
    let outcome = result.map(drop);
    let path = dir.path().display().to_string();
    match dir.close() {
        Ok(()) => println!("demo stopped; removed {path}"),
        Err(e) => eprintln!("dsql-proxy demo: cannot remove {path}: {e}"),
    }
    outcome
}

/// The proxy's AWS SDK chain must find the demo credentials and nothing
/// else (no profile, no instance metadata wait): empty config files in
/// `dir`. Called before any thread or runtime exists.
fn use_demo_credentials(dir: &Path) -> Result<()> {
    let (config, credentials) = (dir.join("aws-config"), dir.join("aws-credentials"));
    for file in [&config, &credentials] {
        std::fs::write(file, "").with_context(|| format!("cannot write {}", file.display()))?;
    }
    for name in [
        "AWS_SESSION_TOKEN",
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_ROLE_ARN",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    ] {
        std::env::remove_var(name);
    }
    for (name, value) in [
        ("AWS_ACCESS_KEY_ID", DEMO_ACCESS_KEY_ID),
        ("AWS_SECRET_ACCESS_KEY", DEMO_SECRET_ACCESS_KEY),
        ("AWS_REGION", REGIONS[0].0),
        ("AWS_EC2_METADATA_DISABLED", "true"),
    ] {
        std::env::set_var(name, value);
    }
    std::env::set_var("AWS_CONFIG_FILE", config);
    std::env::set_var("AWS_SHARED_CREDENTIALS_FILE", credentials);
    Ok(())
}

fn cluster_host(region: &str) -> String {
    format!("{DEMO_CLUSTER_ID}.dsql.{region}.on.aws")
}

/// Starts everything, runs until `quit`, SIGINT/SIGTERM or the proxy
/// stops. Returns the servers, so the caller stops them after the runtime.
async fn demo(
    options: &DemoOptions,
    bin_dir: &Path,
    server_user: Option<(u32, u32)>,
    dir: &Path,
) -> Result<Vec<LocalServer>> {
    // Installed first, so a Ctrl-C while the servers start is not lost
    // (and does not kill the process with the servers running).
    let mut interrupts = signal(SignalKind::interrupt()).context("cannot handle SIGINT")?;
    let mut terminates = signal(SignalKind::terminate()).context("cannot handle SIGTERM")?;
    println!(
        "dsql-proxy demo: starting 3 simulated Regions (PostgreSQL from {}) in {}",
        bin_dir.display(),
        dir.display()
    );
    let starts: Vec<_> = REGIONS
        .iter()
        .map(|(name, _)| {
            let (bin_dir, region_dir) = (bin_dir.to_path_buf(), dir.join(name));
            tokio::task::spawn_blocking(move || {
                LocalServer::start(&bin_dir, &region_dir, server_user)
            })
        })
        .collect();
    let mut servers = Vec::new();
    let mut failure = None;
    for start in starts {
        match start.await.context("a server start panicked") {
            Ok(Ok(server)) => servers.push(server),
            Ok(Err(e)) | Err(e) => failure = failure.or(Some(e)),
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    if signal_pending(&mut interrupts).await || signal_pending(&mut terminates).await {
        println!("stopped while starting");
        return Ok(servers);
    }

    let hosts: Vec<String> = REGIONS.iter().map(|(r, _)| cluster_host(r)).collect();
    let pki = pki::DemoPki::create(dir, &hosts)?;
    let (stop_emulators, emulators_stopped) = watch::channel(false);
    let mut nets = Vec::new();
    let mut endpoints = String::new();
    for ((name, rtt), server) in REGIONS.iter().zip(&servers) {
        let mut config = EmulatorConfig::new(
            SocketAddr::from(([127, 0, 0, 1], 0)),
            &pki.server_cert,
            &pki.server_key,
            cluster_host(name),
            *name,
            server.addr().to_string(),
        )
        .with_credential(DEMO_ACCESS_KEY_ID, DEMO_SECRET_ACCESS_KEY);
        config.upstream.tls = UpstreamTls::Disable;
        let emulator = Emulator::bind(config)
            .await
            .with_context(|| format!("cannot start the DSQL emulator for {name}"))?;
        let emulator_addr = emulator.local_addr();
        let mut stopped = emulators_stopped.clone();
        tokio::spawn(emulator.serve(async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        }));
        let relay = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .and_then(|listener| {
                Relay::spawn(listener, emulator_addr, Duration::from_millis(*rtt) / 2)
            })
            .with_context(|| format!("cannot start the network relay for {name}"))?;
        endpoints.push_str(&format!(
            "\n[[endpoints]]\nname = \"{name}\"\nregion = \"{name}\"\nhost = \"{host}\"\nport = 5432\n\
             connect_address = \"{relay}\"\n",
            host = cluster_host(name),
            relay = relay.addr(),
        ));
        nets.push(RegionNet {
            name: (*name).to_owned(),
            relay,
        });
    }
    let regions = Arc::new(DemoRegions {
        regions: nets,
        quit: tokio::sync::Notify::new(),
    });

    let config_path = dir.join("proxy.toml");
    std::fs::write(&config_path, proxy_toml(options, &pki.ca_cert, &endpoints))
        .context("cannot write the demo's proxy.toml")?;
    let source = ConfigSource {
        path: config_path,
        listen: Some(options.listen),
        admin: Some(options.admin),
        unix_socket_dir: None,
    };
    let config = source.load().context("the demo's generated config")?;
    let (admin_tx, admin_rx) = oneshot::channel();
    let hooks = ServeHooks {
        demo_control: Some(control::as_control(&regions)),
        admin_ready: Some(admin_tx),
        busy_poll: None,
    };
    let proxy = crate::serve(config, source, hooks);
    let outcome = drive(proxy, admin_rx, &regions, options).await;
    let _ = stop_emulators.send(true);
    outcome.map(|()| servers)
}

/// True when the signal already arrived (polled once, never waits).
async fn signal_pending(signal: &mut tokio::signal::unix::Signal) -> bool {
    tokio::time::timeout(Duration::ZERO, signal.recv())
        .await
        .is_ok()
}

fn proxy_toml(options: &DemoOptions, ca: &Path, endpoints: &str) -> String {
    format!(
        "# Generated by `dsql-proxy demo`.\n\
         [listen]\naddress = \"{listen}\"\n\
         [admin]\naddress = \"{admin}\"\nquitquitquit = true\n\
         [backend]\nkind = \"dsql\"\nauth = \"dsql-iam\"\ntls = \"verify-full\"\nca_file = \"{ca}\"\n\
         connect_timeout = \"5s\"\n\
         [routing]\nprobe_user = \"{DEMO_USER}\"\nprobe_database = \"postgres\"\n\
         probe_interval = \"500ms\"\nprobe_timeout = \"1s\"\ndown_after = 2\nup_after = 2\n\
         switch_after = 3\n\
         [shutdown]\nmax_drain = \"2s\"\nrequest_grace = \"1s\"\n{endpoints}",
        listen = options.listen,
        admin = options.admin,
        ca = ca.display(),
    )
}

/// Runs the proxy and the demo's console side by side until the proxy
/// stops (after `quit`, SIGINT/SIGTERM or `/quitquitquit`).
async fn drive(
    proxy: impl std::future::Future<Output = Result<()>>,
    admin_rx: oneshot::Receiver<Arc<AdminState>>,
    regions: &Arc<DemoRegions>,
    options: &DemoOptions,
) -> Result<()> {
    tokio::pin!(proxy);
    let mut admin_rx = Some(admin_rx);
    let mut admin: Option<Arc<AdminState>> = None;
    let mut lines = stdin_lines();
    let mut stdin_open = true;
    let mut tick = tokio::time::interval(REFRESH);
    let terminal = std::io::stdout().is_terminal();
    let mut screen = Screen::new(terminal, options);
    loop {
        tokio::select! {
            result = &mut proxy => return result,
            state = async {
                match admin_rx.as_mut() {
                    Some(rx) => rx.await.ok(),
                    None => std::future::pending().await,
                }
            }, if admin_rx.is_some() => {
                admin_rx = None;
                if let Some(state) = state {
                    screen.started();
                    admin = Some(state);
                }
            }
            line = lines.recv(), if stdin_open => match line {
                Some(line) => {
                    let answer = match control::parse(&line) {
                        Ok(None) => continue,
                        Ok(Some(command)) => regions.apply(&command).map_err(|e| e.to_string()),
                        Err(e) => Err(e),
                    };
                    screen.message(match answer {
                        Ok(text) => text,
                        Err(e) => format!("error: {e}"),
                    });
                }
                None => {
                    stdin_open = false;
                    screen.message("stdin closed: commands now come only through the admin API (POST /demo/<command>/...)".into());
                }
            },
            _ = regions.quit.notified() => {
                if let Some(state) = &admin {
                    state.quit.notify_one();
                }
            }
            _ = tick.tick() => {}
        }
        if let Some(state) = &admin {
            screen.draw(&view::rows(state, regions));
        }
    }
}

/// Lines from stdin, read on a plain thread (a blocking read cannot be
/// cancelled, and must not hold up the runtime's shutdown). The channel
/// closes at EOF.
fn stdin_lines() -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel(16);
    let spawned = std::thread::Builder::new()
        .name("demo-stdin".into())
        .spawn(move || {
            for line in std::io::stdin().lock().lines() {
                let Ok(line) = line else { return };
                if tx.blocking_send(line).is_err() {
                    return;
                }
            }
        });
    if spawned.is_err() {
        // No thread, no stdin: the admin API still takes commands.
        eprintln!("dsql-proxy demo: cannot read stdin; use the admin API's /demo/ routes");
    }
    rx
}

/// The console: a redrawn screen on a terminal, otherwise one line per
/// change.
struct Screen {
    terminal: bool,
    intro: String,
    started_at: Instant,
    messages: Vec<String>,
    last_key: String,
    last_drawn: String,
    last_drawn_at: Instant,
}

impl Screen {
    fn new(terminal: bool, options: &DemoOptions) -> Screen {
        let intro = format!(
            "dsql-proxy demo: 3 simulated Regions (PostgreSQL behind the DSQL endpoint emulator, IAM tokens checked)\n\
             connect: psql \"host={} port={} user={DEMO_USER} dbname=postgres\"\n\
             status:  dsql-proxy status --admin {admin}   (http://{admin}/status)\n\
             commands: fail|hang|heal <region>, slow <region> <ms>, help, quit  (or POST http://{admin}/demo/<command>/<region>[/<ms>])",
            options.listen.ip(),
            options.listen.port(),
            admin = options.admin,
        );
        Screen {
            terminal,
            intro,
            started_at: Instant::now(),
            messages: Vec::new(),
            last_key: String::new(),
            last_drawn: String::new(),
            last_drawn_at: Instant::now(),
        }
    }

    fn started(&mut self) {
        if !self.terminal {
            println!("{}", self.intro);
            flush();
        }
    }

    fn message(&mut self, text: String) {
        if self.terminal {
            self.messages.push(text);
            let excess = self.messages.len().saturating_sub(6);
            self.messages.drain(..excess);
            // Force a redraw with the message.
            self.last_drawn.clear();
        } else {
            println!("[{:>7.1}s] {text}", self.started_at.elapsed().as_secs_f64());
            flush();
        }
    }

    fn draw(&mut self, rows: &[view::RegionRow]) {
        if self.terminal {
            let mut screen = format!("{}\n\n{}\n", self.intro, view::render_table(rows));
            for m in &self.messages {
                screen.push_str(m);
                screen.push('\n');
            }
            screen.push_str("> ");
            let key = view::change_key(rows);
            let due = key != self.last_key
                || self.last_drawn.is_empty()
                || self.last_drawn_at.elapsed() >= LATENCY_REDRAW;
            if due && screen != self.last_drawn {
                // Home, clear to the end, draw: no scrolling history.
                print!("\x1b[H\x1b[J{screen}");
                flush();
                self.last_drawn = screen;
                self.last_drawn_at = Instant::now();
                self.last_key = key;
            }
        } else {
            let key = view::change_key(rows);
            if key != self.last_key {
                println!(
                    "[{:>7.1}s] {}",
                    self.started_at.elapsed().as_secs_f64(),
                    view::summary_line(rows)
                );
                flush();
                self.last_key = key;
            }
        }
    }
}

fn flush() {
    let _ = std::io::stdout().flush();
}

/// A background `sh` that waits for this process to disappear and then
/// stops the demo's servers and removes its directory: destructors cover
/// errors, Ctrl-C and `quit`; this covers SIGKILL. `/proc/PID/exe` is
/// unreadable once the process is gone or a zombie (`kill -0` would still
/// succeed on a zombie whose parent does not reap it). Killed when dropped.
struct Watchdog(Option<Child>);

impl Watchdog {
    fn spawn(dir: &Path) -> Watchdog {
        let script = "trap '' HUP INT TERM\n\
             while readlink \"/proc/$0/exe\" >/dev/null 2>&1; do sleep 1; done\n\
             for pidfile in \"$1\"/*/data/postmaster.pid; do\n\
               [ -f \"$pidfile\" ] && kill -QUIT \"$(head -n 1 \"$pidfile\")\" 2>/dev/null\n\
             done\n\
             sleep 2\n\
             rm -rf \"$1\"\n";
        let child = std::process::Command::new("sh")
            .arg("-c")
            .arg(script)
            .arg(std::process::id().to_string())
            .arg(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok();
        Watchdog(child)
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
