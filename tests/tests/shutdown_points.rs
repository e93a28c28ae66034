//! Shutdown at random points of a COPY FROM STDIN and of a large Bind
//! (issue 15, "drains that keep their promises"), through the real binary
//! against a real server, with `max_drain = "0s"` so every session is
//! closed the moment the SIGTERM lands:
//!
//! * the server never sees a cut message (its log has no complaint about a
//!   truncated or garbled message), and
//! * no work the server committed is reported to the client as failed:
//!   every row the client was told failed is absent, every row it was told
//!   succeeded is present.
//!
//! The server is made slow at the points that matter (a statement trigger
//! that sleeps after each COPY, a `pg_sleep` ahead of each pipelined Bind),
//! so most SIGTERMs land while a request is in flight or while the proxy
//! still holds part of a client message it could not write yet. The seed
//! is printed; `SHUTDOWN_POINTS_SEED=<n>` repeats a run.

use std::net::SocketAddr;
use std::time::Duration;

use dsql_proxy_tests::process::SIGTERM;
use dsql_proxy_tests::wire::{self, BackendMessage, XorShift};
use dsql_proxy_tests::{
    free_addr, proxy_toml, AuthMethod, PgOptions, PgServer, ProxyOptions, ProxyProcess, APP_DB,
    APP_PASSWORD, APP_USER,
};
use tokio::net::TcpStream;

const RUNS: u64 = 6;
const STEP: Duration = Duration::from_secs(20);

/// What the server logs when it received a message cut short or garbled.
const CUT_MESSAGE_COMPLAINTS: &[&str] = &[
    "incomplete message from client",
    "invalid message format",
    "invalid frontend message type",
    "insufficient data left in message",
    "invalid message length",
    "unexpected EOF within message length word",
    "invalid string in message",
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Work {
    /// `COPY ... FROM STDIN`, rows in several CopyData messages.
    Copy,
    /// `pg_sleep` then Parse/Bind (a payload of megabytes)/Execute/Sync,
    /// pipelined in one write.
    LargeBind,
}

fn seed() -> u64 {
    std::env::var("SHUTDOWN_POINTS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(1)
        })
}

fn server() -> PgServer {
    let pg = PgServer::start(PgOptions {
        tls: true,
        auth: AuthMethod::ScramSha256,
        ..PgOptions::default()
    });
    let out = pg
        .psql_command()
        .env("PGDATABASE", APP_DB)
        .args(["-v", "ON_ERROR_STOP=1", "-qAt", "-c"])
        .arg(format!(
            "create table copy_target (run int, id int);\
         create table bind_target (run int, id int, payload text);\
         grant all on copy_target, bind_target to {APP_USER};\
         create function slow_commit() returns trigger language plpgsql as \
           $$ begin perform pg_sleep(0.2); return null; end $$;\
         create trigger slow after insert on copy_target \
           for each statement execute function slow_commit();"
        ))
        .output()
        .expect("run psql");
    assert!(out.status.success(), "{out:?}");
    pg
}

fn proxy(pg: &PgServer) -> (ProxyProcess, SocketAddr) {
    let listen = free_addr();
    let mut toml = proxy_toml(pg, listen, &ProxyOptions::default());
    toml.push_str("[shutdown]\nmax_drain = \"0s\"\nrequest_grace = \"5s\"\n");
    (ProxyProcess::start_with(&toml, listen), listen)
}

/// The outcome of one unit of work as the client saw it.
#[derive(Debug)]
enum Told {
    Committed,
    Failed(String),
}

fn is_fatal(m: &BackendMessage) -> bool {
    m.tag == b'E'
        && m.error_fields()
            .and_then(|f| f.severity().map(str::to_owned))
            .is_some_and(|s| s == "FATAL")
}

/// Reads up to ReadyForQuery; `Committed` when a CommandComplete came
/// first, else why not.
async fn outcome(stream: &mut TcpStream) -> Told {
    let mut completed = false;
    loop {
        match wire::read_message(stream, STEP).await {
            Ok(m) if m.tag == b'C' => completed = true,
            Ok(m) if m.tag == b'Z' => {
                return if completed {
                    Told::Committed
                } else {
                    Told::Failed("ReadyForQuery without CommandComplete".into())
                }
            }
            Ok(m) if is_fatal(&m) => return Told::Failed(format!("{:?}", m.error_fields())),
            Ok(m) if m.tag == b'E' => return Told::Failed(format!("{:?}", m.error_fields())),
            Ok(_) => {}
            Err(e) => return Told::Failed(e.to_string()),
        }
    }
}

/// One COPY of `rows` rows tagged (run, id), in CopyData messages of
/// varying size.
async fn copy(stream: &mut TcpStream, run: u64, id: u64, rng: &mut XorShift) -> Told {
    if let Err(e) = wire::send(stream, &wire::query("COPY copy_target FROM STDIN")).await {
        return Told::Failed(e.to_string());
    }
    match wire::read_message(stream, STEP).await {
        Ok(m) if m.tag == b'G' => {}
        Ok(m) => return Told::Failed(format!("no CopyInResponse: {m:?}")),
        Err(e) => return Told::Failed(e.to_string()),
    }
    let rows = 200 + rng.below(400);
    let mut batch = Vec::new();
    for _ in 0..rows {
        batch.extend_from_slice(format!("{run}\t{id}\n").as_bytes());
        if batch.len() > 1 + rng.below(3000) {
            if let Err(e) = wire::send(stream, &wire::typed(b'd', &batch)).await {
                return Told::Failed(e.to_string());
            }
            batch.clear();
        }
    }
    if !batch.is_empty() {
        if let Err(e) = wire::send(stream, &wire::typed(b'd', &batch)).await {
            return Told::Failed(e.to_string());
        }
    }
    if let Err(e) = wire::send(stream, &wire::typed(b'c', b"")).await {
        return Told::Failed(e.to_string());
    }
    outcome(stream).await
}

/// A slow statement, then an insert whose Bind carries megabytes, all in
/// one write: the server reads the Bind only after the sleep, so the proxy
/// holds part of it when the SIGTERM lands.
async fn large_bind(stream: &mut TcpStream, run: u64, id: u64, rng: &mut XorShift) -> Told {
    let payload = "x".repeat(1_000_000 + rng.below(2_000_000));
    let (run, id) = (run.to_string(), id.to_string());
    let mut pipeline = wire::query("select pg_sleep(0.2)");
    pipeline.extend(wire::parse(
        "",
        "insert into bind_target values ($1::int, $2::int, $3)",
        &[],
    ));
    pipeline.extend(wire::bind("", "", &[Some(&run), Some(&id), Some(&payload)]));
    pipeline.extend(wire::execute("", 0));
    pipeline.extend(wire::sync());
    if let Err(e) = wire::send(stream, &pipeline).await {
        return Told::Failed(e.to_string());
    }
    // The pg_sleep's answer, then the insert's.
    match outcome(stream).await {
        Told::Committed => outcome(stream).await,
        failed => failed,
    }
}

/// Runs work until the proxy closes the session; returns what the client
/// was told for each id.
async fn client(
    listen: SocketAddr,
    work: Work,
    run: u64,
    seed: u64,
    started: tokio::sync::oneshot::Sender<()>,
) -> Vec<(u64, Told)> {
    let mut stream = TcpStream::connect(listen)
        .await
        .expect("connect to the proxy");
    let response = wire::startup(&mut stream, &wire::startup_v3(APP_USER, APP_DB), STEP)
        .await
        .expect("startup");
    assert_eq!(response.ready_status(), Some(b'I'), "{:?}", response.tags());
    let _ = started.send(());
    let mut rng = XorShift::new(seed ^ run);
    let mut told = Vec::new();
    for id in 0.. {
        let result = match work {
            Work::Copy => copy(&mut stream, run, id, &mut rng).await,
            Work::LargeBind => large_bind(&mut stream, run, id, &mut rng).await,
        };
        let done = matches!(result, Told::Failed(_));
        told.push((id, result));
        if done {
            return told;
        }
    }
    unreachable!()
}

async fn shutdown_at_random_points(work: Work) {
    let seed = seed();
    eprintln!("{work:?}: SHUTDOWN_POINTS_SEED={seed}");
    let pg = server();
    let mut rng = XorShift::new(seed);
    let table = match work {
        Work::Copy => "copy_target",
        Work::LargeBind => "bind_target",
    };
    for run in 0..RUNS {
        let (mut proxy, listen) = proxy(&pg);
        let (started_tx, started) = tokio::sync::oneshot::channel();
        let session = tokio::spawn(client(listen, work, run, seed, started_tx));
        tokio::time::timeout(STEP, started)
            .await
            .expect("the session starts")
            .expect("the client is running");
        // Somewhere in the first few units of work.
        tokio::time::sleep(Duration::from_millis(50 + rng.below(700) as u64)).await;
        proxy.send_signal(SIGTERM);
        let told = tokio::time::timeout(STEP * 2, session)
            .await
            .unwrap_or_else(|_| panic!("the client never heard the end\n{}", proxy.logs()))
            .expect("client task");
        let status = proxy.wait_exit(STEP).expect("the proxy exits");
        assert!(status.success(), "{}", proxy.logs());

        let direct = pg.connect_direct(APP_USER, APP_PASSWORD, APP_DB).await;
        for (id, result) in &told {
            let rows = direct
                .query_one(
                    &format!("select count(*) from {table} where run = $1 and id = $2"),
                    &[&(run as i32), &(*id as i32)],
                )
                .await
                .expect("count rows")
                .get::<_, i64>(0);
            match result {
                Told::Committed => {
                    assert!(rows > 0, "run {run} id {id}: reported committed, absent")
                }
                Told::Failed(why) => assert_eq!(
                    rows,
                    0,
                    "run {run} id {id}: committed but reported failed ({why})\n{}",
                    proxy.logs()
                ),
            }
        }
        let last = told
            .last()
            .map(|(_, t)| format!("{t:?}"))
            .unwrap_or_default();
        eprintln!("run {run}: {} units, the last {last}", told.len());
    }
    let log = pg.log_contents();
    for complaint in CUT_MESSAGE_COMPLAINTS {
        assert!(
            !log.contains(complaint),
            "the server saw a cut message ({complaint}):\n{log}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_during_copy_from_stdin_keeps_its_promises() {
    shutdown_at_random_points(Work::Copy).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_during_a_large_bind_keeps_its_promises() {
    shutdown_at_random_points(Work::LargeBind).await;
}
