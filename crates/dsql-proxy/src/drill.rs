//! `dsql-proxy drill`: a failover drill against a running proxy. It takes
//! the endpoint new sessions use out of rotation (admin API drain), checks
//! that new sessions move to another endpoint and how long that takes,
//! puts it back (undrain) and checks that new sessions return, printing a
//! timeline. The endpoint is always restored, whatever fails after the
//! drain (Ctrl-C included).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use dsql_proxy_config::DurationStr;
use serde_json::Value;

use crate::admin_client;

/// Admin requests are local and quick; a slow one is a failure.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(5);
/// Pause between polling attempts.
const POLL_EVERY: Duration = Duration::from_millis(100);

#[derive(clap::Args, Debug)]
pub struct DrillArgs {
    /// Connection string for test sessions through the proxy (libpq
    /// key=value form; the proxy authenticates to the database).
    #[arg(
        long,
        default_value = "host=127.0.0.1 port=5432 user=admin dbname=postgres"
    )]
    connect: String,
    /// How to take the endpoint out. Only `admin` (POST
    /// /endpoints/<name>/drain) is implemented.
    #[arg(long, value_enum, default_value = "admin")]
    method: Method,
    /// How long each waiting step may take, e.g. 30s.
    #[arg(long, default_value = "30s")]
    timeout: DurationStr,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Method {
    Admin,
}

/// A failed step, named for the report.
struct StepFailure {
    step: &'static str,
    error: anyhow::Error,
}

fn at(step: &'static str) -> impl FnOnce(anyhow::Error) -> StepFailure {
    move |error| StepFailure { step, error }
}

/// Prints each step as it completes, with its offset from the start.
struct Timeline {
    start: Instant,
}

impl Timeline {
    fn note(&self, text: &str) {
        println!("{:>8} ms  {text}", self.start.elapsed().as_millis());
    }
}

pub fn run(admin: SocketAddr, args: &DrillArgs) -> ExitCode {
    let Method::Admin = args.method;
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("dsql-proxy drill: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Ctrl-C must not leave the endpoint drained: it ends the waiting and
    // the restore still runs.
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let interrupted = Arc::clone(&interrupted);
        runtime.spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                interrupted.store(true, Ordering::SeqCst);
            }
        });
    }
    let drill = Drill {
        admin,
        connect: args.connect.clone(),
        timeout: args.timeout.get(),
        runtime: &runtime,
        interrupted: &interrupted,
        timeline: Timeline {
            start: Instant::now(),
        },
    };
    println!(
        "failover drill: proxy admin {admin}, sessions \"{}\"",
        args.connect
    );
    drill.timeline.note("start");
    let mut drained = None;
    let result = drill.steps(&mut drained);
    // Step 4 may not have been reached: restore whatever is still drained.
    let restore_failed = drained
        .as_deref()
        .and_then(|name| match drill.undrain(name) {
            Ok(()) => {
                drill
                    .timeline
                    .note(&format!("restored {name} (undrain after the failure)"));
                None
            }
            Err(e) => Some(e),
        });
    match (result, restore_failed) {
        (Ok(()), _) => {
            println!("drill passed");
            ExitCode::SUCCESS
        }
        (Err(failure), restore) => {
            eprintln!("drill FAILED at step {}: {:#}", failure.step, failure.error);
            if let (Some(e), Some(name)) = (restore, drained) {
                eprintln!(
                    "could not restore {name}: {e:#}; run: curl -X POST http://{admin}/endpoints/{name}/undrain"
                );
            }
            ExitCode::FAILURE
        }
    }
}

struct Drill<'a> {
    admin: SocketAddr,
    connect: String,
    timeout: Duration,
    runtime: &'a tokio::runtime::Runtime,
    interrupted: &'a AtomicBool,
    timeline: Timeline,
}

impl Drill<'_> {
    /// Steps 1-5; `drained` names the endpoint while it is out, so the
    /// caller can restore it.
    fn steps(&self, drained: &mut Option<String>) -> Result<(), StepFailure> {
        const BASELINE: &str = "1 (baseline session)";
        const DRAIN: &str = "2 (drain)";
        const FAILOVER: &str = "3 (failover)";
        const UNDRAIN: &str = "4 (undrain)";
        const FAILBACK: &str = "5 (failback)";

        self.session().map_err(at(BASELINE))?;
        let original = self
            .selected()
            .map_err(at(BASELINE))?
            .ok_or_else(|| anyhow!("the proxy has no selected endpoint"))
            .map_err(at(BASELINE))?;
        self.timeline.note(&format!(
            "step 1: session OK (SELECT 1); new sessions use {original}"
        ));

        self.post(&format!("/endpoints/{original}/drain"))
            .map_err(at(DRAIN))?;
        *drained = Some(original.clone());
        let drained_at = Instant::now();
        self.timeline
            .note(&format!("step 2: drained {original} through the admin API"));

        let moved_to = self
            .wait_for("new sessions to move to another endpoint", |selected| {
                selected.filter(|s| *s != original)
            })
            .map_err(at(FAILOVER))?;
        self.timeline.note(&format!(
            "step 3: new sessions work and use {moved_to}: failover took {} ms",
            drained_at.elapsed().as_millis()
        ));

        self.undrain(&original).map_err(at(UNDRAIN))?;
        *drained = None;
        let undrained_at = Instant::now();
        self.timeline
            .note(&format!("step 4: restored {original} (undrain)"));

        self.wait_for(
            &format!("new sessions to return to {original}"),
            |selected| selected.filter(|s| *s == original),
        )
        .map_err(at(FAILBACK))?;
        self.timeline.note(&format!(
            "step 5: new sessions work and use {original} again: failback took {} ms",
            undrained_at.elapsed().as_millis()
        ));
        Ok(())
    }

    /// Polls until a new session works and `/status`'s selection passes
    /// `accept`; returns what it accepted.
    fn wait_for(
        &self,
        what: &str,
        accept: impl Fn(Option<String>) -> Option<String>,
    ) -> Result<String> {
        let deadline = Instant::now() + self.timeout;
        loop {
            if self.interrupted.load(Ordering::SeqCst) {
                bail!("interrupted while waiting for {what}");
            }
            let last_problem = match self.session().and_then(|()| self.selected()) {
                Ok(selected) => match accept(selected.clone()) {
                    Some(found) => return Ok(found),
                    None => format!(
                        "selected endpoint is {}",
                        selected.as_deref().unwrap_or("none")
                    ),
                },
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!("no {what} within {:?} (last: {last_problem})", self.timeout);
            }
            std::thread::sleep(POLL_EVERY);
        }
    }

    /// Opens a new session through the proxy and runs `SELECT 1`.
    fn session(&self) -> Result<()> {
        let mut config = tokio_postgres::Config::from_str(&self.connect)
            .with_context(|| format!("bad --connect {:?}", self.connect))?;
        config
            .connect_timeout(self.timeout.min(Duration::from_secs(10)))
            .application_name("dsql-proxy-drill");
        self.runtime.block_on(async {
            let (client, connection) = config
                .connect(tokio_postgres::NoTls)
                .await
                .context("cannot open a session through the proxy")?;
            let connection = tokio::spawn(connection);
            let row = client
                .query_one("SELECT 1", &[])
                .await
                .context("SELECT 1 failed")?;
            let one: i32 = row.try_get(0).context("SELECT 1 answered oddly")?;
            drop(client);
            let _ = connection.await;
            if one != 1 {
                bail!("SELECT 1 answered {one}");
            }
            Ok(())
        })
    }

    /// `/status`'s selected endpoint.
    fn selected(&self) -> Result<Option<String>> {
        let reply = admin_client::get(self.admin, "/status", ADMIN_TIMEOUT)?;
        if reply.status != 200 {
            bail!(
                "/status answered HTTP {}: {}",
                reply.status,
                reply.body.trim()
            );
        }
        let status: Value =
            serde_json::from_str(&reply.body).context("/status did not answer JSON")?;
        Ok(status["selected"].as_str().map(str::to_owned))
    }

    fn undrain(&self, name: &str) -> Result<()> {
        self.post(&format!("/endpoints/{name}/undrain"))
    }

    fn post(&self, path: &str) -> Result<()> {
        let reply = admin_client::post(self.admin, path, ADMIN_TIMEOUT)?;
        if reply.status != 200 {
            bail!(
                "POST {path} answered HTTP {}: {}",
                reply.status,
                reply.body.trim()
            );
        }
        Ok(())
    }
}
