//! `dsql-proxy drill`: a failover drill against a running proxy. It takes
//! the endpoint new sessions use out of rotation (admin API drain, or with
//! `--method route53` by inverting its Route 53 health check), checks that
//! new sessions move to another endpoint and how long that takes, puts it
//! back and checks that new sessions return, printing a timeline. The
//! endpoint is always restored, whatever fails after it was taken out
//! (Ctrl-C included).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use dsql_proxy_config::{Config, DurationStr};
use dsql_proxy_health::route53_admin::Route53Admin;
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
    /// How to take the endpoint out: `admin` drains it (POST
    /// /endpoints/<name>/drain); `route53` inverts its Route 53 health
    /// check (UpdateHealthCheck Inverted=true; needs [routing] route53 =
    /// "veto" and AWS credentials; the check id comes from /status or the
    /// --config file).
    #[arg(long, value_enum, default_value = "admin")]
    method: Method,
    /// How long each waiting step may take, e.g. 30s.
    #[arg(long, default_value = "30s")]
    timeout: DurationStr,
    /// A file holding the admin server's bearer token ([admin]
    /// token_file), for a proxy whose admin server is not on this host's
    /// loopback. Default: the --config file's [admin] token_file, if any.
    #[arg(long, env = "DSQL_PROXY_ADMIN_TOKEN_FILE")]
    token_file: Option<PathBuf>,
}

/// The bearer token for the admin API: `--token-file`, else the config
/// file's `[admin] token_file` when the config loads; none otherwise (a
/// loopback admin server needs none).
fn admin_token(args: &DrillArgs, config_path: &Path) -> Result<Option<(String, PathBuf)>> {
    let file = match &args.token_file {
        Some(file) => file.clone(),
        None => match Config::load(config_path, std::env::vars())
            .ok()
            .and_then(|c| c.admin.token_file)
        {
            Some(file) => file,
            None => return Ok(None),
        },
    };
    let token = dsql_proxy_admin::access::read_token(&file).map_err(|e| anyhow!(e))?;
    Ok(Some((token, file)))
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    Admin,
    Route53,
}

/// The endpoint the drill took out, and how, so it can be put back.
struct TakenOut {
    name: String,
    how: Takeout,
}

enum Takeout {
    Drained,
    Inverted {
        route53: Route53Admin,
        check_id: String,
    },
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

pub fn run(admin: SocketAddr, config_path: &Path, args: &DrillArgs) -> ExitCode {
    let token = match admin_token(args, config_path) {
        Ok(token) => token,
        Err(e) => {
            eprintln!("dsql-proxy drill: {e:#}");
            return ExitCode::FAILURE;
        }
    };
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
        method: args.method,
        config_path: config_path.to_path_buf(),
        token: token.as_ref().map(|(t, _)| t.clone()),
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
    let mut taken_out = None;
    let result = drill.steps(&mut taken_out);
    // Step 4 may not have been reached: restore whatever is still out.
    let restore_failed = taken_out.as_ref().and_then(|out| match drill.restore(out) {
        Ok(how) => {
            drill
                .timeline
                .note(&format!("restored {} ({how}) after the failure", out.name));
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
            if let (Some(e), Some(out)) = (restore, taken_out) {
                let fix = match &out.how {
                    Takeout::Drained => {
                        let auth = token
                            .as_ref()
                            .map(|(_, file)| {
                                format!(" -H \"Authorization: Bearer $(cat {})\"", file.display())
                            })
                            .unwrap_or_default();
                        format!(
                            "curl -X POST{auth} http://{admin}/endpoints/{}/undrain",
                            out.name
                        )
                    }
                    Takeout::Inverted { check_id, .. } => format!(
                        "aws route53 update-health-check --health-check-id {check_id} --no-inverted"
                    ),
                };
                eprintln!("could not restore {}: {e:#}; run: {fix}", out.name);
            }
            ExitCode::FAILURE
        }
    }
}

struct Drill<'a> {
    admin: SocketAddr,
    connect: String,
    method: Method,
    config_path: PathBuf,
    /// The admin API's bearer token, when one is needed; never printed.
    token: Option<String>,
    timeout: Duration,
    runtime: &'a tokio::runtime::Runtime,
    interrupted: &'a AtomicBool,
    timeline: Timeline,
}

impl Drill<'_> {
    /// Steps 1-5; `taken_out` holds the endpoint while it is out, so the
    /// caller can restore it.
    fn steps(&self, taken_out: &mut Option<TakenOut>) -> Result<(), StepFailure> {
        const BASELINE: &str = "1 (baseline session)";
        const TAKE_OUT: &str = "2 (take the endpoint out)";
        const FAILOVER: &str = "3 (failover)";
        const RESTORE: &str = "4 (restore)";
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

        let (out, how) = self.take_out(&original).map_err(at(TAKE_OUT))?;
        let out = taken_out.insert(out);
        let drained_at = Instant::now();
        self.timeline
            .note(&format!("step 2: took {original} out: {how}"));

        let moved_to = self
            .wait_for("new sessions to move to another endpoint", |selected| {
                selected.filter(|s| *s != original)
            })
            .map_err(at(FAILOVER))?;
        self.timeline.note(&format!(
            "step 3: new sessions work and use {moved_to}: failover took {} ms",
            drained_at.elapsed().as_millis()
        ));

        let how = self.restore(out).map_err(at(RESTORE))?;
        *taken_out = None;
        let undrained_at = Instant::now();
        self.timeline
            .note(&format!("step 4: restored {original} ({how})"));

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

    fn status(&self) -> Result<Value> {
        let reply = admin_client::get(self.admin, "/status", ADMIN_TIMEOUT)?;
        if reply.status != 200 {
            bail!(
                "/status answered HTTP {}: {}",
                reply.status,
                reply.body.trim()
            );
        }
        serde_json::from_str(&reply.body).context("/status did not answer JSON")
    }

    /// `/status`'s selected endpoint.
    fn selected(&self) -> Result<Option<String>> {
        Ok(self.status()?["selected"].as_str().map(str::to_owned))
    }

    /// Takes `name` out of rotation by the chosen method; also says how.
    fn take_out(&self, name: &str) -> Result<(TakenOut, String)> {
        match self.method {
            Method::Admin => {
                self.post(&format!("/endpoints/{name}/drain"))?;
                let out = TakenOut {
                    name: name.to_owned(),
                    how: Takeout::Drained,
                };
                Ok((out, "drained through the admin API".into()))
            }
            Method::Route53 => {
                let status = self.status()?;
                let policy = status["policy"]["route53"].as_str().unwrap_or("unknown");
                if policy != "veto" {
                    bail!(
                        "the proxy's [routing] route53 is {policy:?}: an inverted health check \
                         moves no traffic unless it is \"veto\""
                    );
                }
                let check_id = self.health_check_id(&status, name)?;
                let route53 = self
                    .runtime
                    .block_on(Route53Admin::from_env(ADMIN_TIMEOUT * 2))
                    .context("cannot set up the Route 53 client")?;
                let check = self
                    .runtime
                    .block_on(route53.get(&check_id))
                    .with_context(|| format!("cannot read health check {check_id}"))?
                    .ok_or_else(|| anyhow!("Route 53 has no health check {check_id}"))?;
                if check.inverted {
                    bail!(
                        "health check {check_id} is already inverted: something else took {name} \
                         out; the drill leaves it alone"
                    );
                }
                self.runtime
                    .block_on(route53.set_inverted(&check_id, true))
                    .with_context(|| format!("cannot invert health check {check_id}"))?;
                let how = format!(
                    "Route 53 health check {check_id} inverted (UpdateHealthCheck Inverted=true)"
                );
                let out = TakenOut {
                    name: name.to_owned(),
                    how: Takeout::Inverted { route53, check_id },
                };
                Ok((out, how))
            }
        }
    }

    /// Puts the endpoint back; says how.
    fn restore(&self, out: &TakenOut) -> Result<String> {
        match &out.how {
            Takeout::Drained => {
                self.post(&format!("/endpoints/{}/undrain", out.name))?;
                Ok("undrained".into())
            }
            Takeout::Inverted { route53, check_id } => {
                self.runtime
                    .block_on(route53.set_inverted(check_id, false))
                    .with_context(|| format!("cannot restore health check {check_id}"))?;
                Ok(format!("health check {check_id} no longer inverted"))
            }
        }
    }

    /// The endpoint's health check: from `/status`, else from the
    /// `--config` file.
    fn health_check_id(&self, status: &Value, name: &str) -> Result<String> {
        let from_status = status["endpoints"]
            .as_array()
            .and_then(|e| e.iter().find(|e| e["name"] == name))
            .and_then(|e| e["route53"]["health_check_id"].as_str())
            .filter(|id| !id.is_empty())
            .map(str::to_owned);
        if let Some(id) = from_status {
            return Ok(id);
        }
        let config = Config::load(&self.config_path, std::env::vars()).with_context(|| {
            format!(
                "{name} has no Route 53 health check in /status, and --config {} cannot be read",
                self.config_path.display()
            )
        })?;
        config
            .endpoints
            .iter()
            .find(|e| e.name == name)
            .and_then(|e| e.route53_health_check_id.clone())
            .ok_or_else(|| {
                anyhow!(
                    "{name} has no route53_health_check_id (neither in /status nor in {})",
                    self.config_path.display()
                )
            })
    }

    fn post(&self, path: &str) -> Result<()> {
        let reply = admin_client::post(self.admin, path, ADMIN_TIMEOUT, self.token.as_deref())?;
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
