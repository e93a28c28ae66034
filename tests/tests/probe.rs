//! The probe's latency sample, against a real PostgreSQL server: one query
//! round trip on an established connection. Opening the connection is
//! timed apart (`connect_time`), and a new connection's first round trip
//! after login is not a sample either: the first sample decides the
//! initial selection, and that round trip is slow for reasons that are not
//! the network (the server's new backend fills its caches on its first
//! statement).
//!
//! A relay between the probe and the server holds one of the server's
//! answers for [`STALL`]. A local round trip takes milliseconds, so a
//! sample that contains the held answer cannot be mistaken for one that
//! does not.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use dsql_proxy_config::TlsMode;
use dsql_proxy_config::{PasswordSource, Secret};
use dsql_proxy_connector::Connector;
use dsql_proxy_credentials::{CredentialSource, Passthrough, StaticPassword};
use dsql_proxy_health::probe::ProbeConnection;
use dsql_proxy_health::{PgProbe, Probe};
use dsql_proxy_routing::{Endpoint, EndpointId, ProbeOutcome};
use dsql_proxy_tests::{
    PgOptions, PgServer, TestPki, APP_DB, APP_PASSWORD, APP_USER, TLS_DNS_NAMES,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

const STALL: Duration = Duration::from_secs(2);

/// Which of the server's answers the relay holds, once per connection.
#[derive(Clone, Copy)]
enum Hold {
    /// The first: to the SSLRequest on a TLS connection (connection setup).
    FirstAnswer,
    /// The first after the server's first ReadyForQuery (the login's end):
    /// the answer to the connection's first query. Plain TCP only, since
    /// the relay reads the message framing.
    FirstAfterLogin,
}

/// A TCP relay in front of a server that holds one answer per connection
/// for [`STALL`] and passes everything else straight through.
struct StallRelay {
    addr: SocketAddr,
    accept: JoinHandle<()>,
}

impl StallRelay {
    async fn start(target: SocketAddr, hold: Hold) -> StallRelay {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind relay");
        let addr = listener.local_addr().expect("relay address");
        let accept = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                tokio::spawn(relay(client, target, hold));
            }
        });
        StallRelay { addr, accept }
    }
}

impl Drop for StallRelay {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

async fn relay(client: TcpStream, target: SocketAddr, hold: Hold) {
    let Ok(server) = TcpStream::connect(target).await else {
        return;
    };
    let (mut client_read, mut client_write) = client.into_split();
    let (mut server_read, mut server_write) = server.into_split();
    tokio::spawn(async move {
        let _ = tokio::io::copy(&mut client_read, &mut server_write).await;
        let _ = server_write.shutdown().await;
    });
    let mut login = LoginEnd::default();
    let mut held = false;
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match server_read.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        let due = match hold {
            Hold::FirstAnswer => true,
            Hold::FirstAfterLogin => login.seen,
        };
        if due && !held {
            held = true;
            tokio::time::sleep(STALL).await;
        }
        if matches!(hold, Hold::FirstAfterLogin) {
            login.feed(&buf[..n]);
        }
        if client_write.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Follows the server's message framing (type byte, length) until the end
/// of its first ReadyForQuery.
#[derive(Default)]
struct LoginEnd {
    header: Vec<u8>,
    tag: u8,
    body_left: usize,
    seen: bool,
}

impl LoginEnd {
    fn feed(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && !self.seen {
            if self.body_left > 0 {
                let n = self.body_left.min(bytes.len());
                self.body_left -= n;
                bytes = &bytes[n..];
            } else {
                self.header.push(bytes[0]);
                bytes = &bytes[1..];
                if self.header.len() < 5 {
                    continue;
                }
                self.tag = self.header[0];
                let len = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]);
                self.body_left = (len as usize).saturating_sub(4);
                self.header.clear();
            }
            self.seen = self.tag == b'Z' && self.body_left == 0 && self.header.is_empty();
        }
    }
}

/// A probe of the server behind `relay`, as the proxy builds it.
fn probe(
    relay: &StallRelay,
    pki: Option<&TestPki>,
    credentials: Arc<dyn CredentialSource>,
) -> Arc<PgProbe> {
    let endpoint = Endpoint {
        id: EndpointId(0),
        name: "region".into(),
        region: None,
        host: TLS_DNS_NAMES[1].into(),
        port: 5432,
        connect_address: Some(relay.addr),
        priority: 1,
        route53_health_check_id: None,
    };
    let connector = match pki {
        Some(pki) => Connector::new(TlsMode::VerifyFull, Some(pki.ca_cert_path())),
        None => Connector::new(TlsMode::Disable, None),
    }
    .expect("connector");
    Arc::new(PgProbe::new(
        Arc::new(endpoint),
        Arc::new(connector),
        credentials,
        APP_USER,
        APP_DB,
    ))
}

fn app_password() -> Arc<dyn CredentialSource> {
    Arc::new(StaticPassword::new(PasswordSource::Inline(Secret::new(
        APP_PASSWORD,
    ))))
}

/// The sample and the connect time of a successful check.
fn success(outcome: ProbeOutcome) -> (Duration, Option<Duration>) {
    match outcome {
        ProbeOutcome::Success {
            rtt, connect_time, ..
        } => (rtt, connect_time),
        other => panic!("the probe failed: {other:?}"),
    }
}

async fn check(
    probe: &Arc<PgProbe>,
    conn: Option<ProbeConnection>,
) -> (ProbeOutcome, Option<ProbeConnection>) {
    Arc::clone(probe).check(conn).await
}

#[tokio::test]
async fn a_new_connections_first_round_trip_is_no_latency_sample() {
    let pg = PgServer::start(PgOptions::default());
    let relay = StallRelay::start(pg.addr(), Hold::FirstAfterLogin).await;
    let probe = probe(&relay, None, app_password());

    let (outcome, conn) = check(&probe, None).await;
    let (rtt, connect_time) = success(outcome);
    assert!(connect_time.is_some(), "a new connection's connect time");
    assert!(
        rtt < STALL,
        "the sample {rtt:?} holds the first round trip after login (held {STALL:?})"
    );
    assert!(conn.is_some(), "the connection is kept for the next check");

    let (outcome, conn) = check(&probe, conn).await;
    let (rtt, connect_time) = success(outcome);
    assert_eq!(connect_time, None, "the kept connection was reused");
    assert!(rtt < STALL, "{rtt:?}");
    assert!(conn.is_some());
}

#[tokio::test]
async fn connection_setup_is_connect_time_not_latency() {
    let pki = Arc::new(TestPki::new());
    let pg = PgServer::start_tls_scram(&pki);
    let relay = StallRelay::start(pg.addr(), Hold::FirstAnswer).await;
    let probe = probe(&relay, Some(&*pki), app_password());

    let (outcome, _conn) = check(&probe, None).await;
    let (rtt, connect_time) = success(outcome);
    let connect_time = connect_time.expect("a new connection's connect time");
    assert!(connect_time >= STALL, "{connect_time:?}");
    assert!(rtt < STALL, "the sample {rtt:?} holds the connection setup");
}

#[tokio::test]
async fn a_passthrough_probe_times_the_startup_round_trip_not_the_handshake() {
    // Without a password the probe stops at the server's authentication
    // request: its sample is the round trip of the startup packet on the
    // established TLS connection.
    let pki = Arc::new(TestPki::new());
    let pg = PgServer::start_tls_scram(&pki);
    let relay = StallRelay::start(pg.addr(), Hold::FirstAnswer).await;
    let probe = probe(&relay, Some(&*pki), Arc::new(Passthrough));

    let (outcome, conn) = check(&probe, None).await;
    let (rtt, connect_time) = success(outcome);
    let connect_time = connect_time.expect("the handshake's time");
    assert!(connect_time >= STALL, "{connect_time:?}");
    assert!(rtt < STALL, "the sample {rtt:?} holds the TLS negotiation");
    assert!(conn.is_none(), "a passthrough probe keeps no connection");
}
