//! Probes: one PostgreSQL-level check of one endpoint.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use dsql_proxy_credentials::{CredentialRequest, CredentialSource};
use dsql_proxy_protocol::query::{decode_query_message, encode_query, QueryMessage};
use dsql_proxy_protocol::startup::StartupParam;
use dsql_proxy_routing::{Endpoint, FailureKind, ProbeOutcome};
use dsql_proxy_session::backend::{self, BackendSettings};
use dsql_proxy_session::io::{read_message, send};
use dsql_proxy_session::stream::BackendStream;
use dsql_proxy_session::SessionError;

/// The largest message a probe accepts from a server.
const MAX_PROBE_MESSAGE: usize = 64 * 1024;

pub type CheckFuture =
    Pin<Box<dyn Future<Output = (ProbeOutcome, Option<ProbeConnection>)> + Send>>;

/// A persistent connection a probe reuses between rounds.
pub struct ProbeConnection {
    stream: BackendStream,
}

/// One check of one endpoint. The future owns everything it uses, so the
/// probe task can abandon it (dropping the connection) at a timeout.
pub trait Probe: Send + Sync + 'static {
    /// Runs the check on `conn`, or on a new connection when `conn` is
    /// `None`; gives the connection back when it is still usable.
    fn check(self: Arc<Self>, conn: Option<ProbeConnection>) -> CheckFuture;
}

enum Opened {
    Connection(ProbeConnection),
    /// The server asked for a password the probe does not have.
    HandshakeOnly,
}

/// Checks an endpoint the way a session uses it: TCP, TLS with SNI,
/// authentication with the backend's credential source, then `SELECT 1`.
pub struct PgProbe {
    endpoint: Arc<Endpoint>,
    settings: BackendSettings,
    credentials: Arc<dyn CredentialSource>,
    user: String,
    params: Vec<StartupParam>,
}

impl PgProbe {
    pub fn new(
        endpoint: Arc<Endpoint>,
        settings: BackendSettings,
        credentials: Arc<dyn CredentialSource>,
        user: &str,
        database: &str,
    ) -> Self {
        let params = vec![
            StartupParam::new("user", user.as_bytes()),
            StartupParam::new("database", database.as_bytes()),
            StartupParam::new("application_name", b"dsql-proxy-probe"),
        ];
        Self {
            endpoint,
            settings,
            credentials,
            user: user.to_owned(),
            params,
        }
    }

    async fn open(&self) -> Result<Opened, ProbeOutcome> {
        let request = CredentialRequest {
            endpoint_host: &self.endpoint.host,
            endpoint_port: self.endpoint.port,
            region: self.endpoint.region.as_deref(),
            user: &self.user,
            client_password: None,
        };
        if self.credentials.needs_client_password() {
            // Passthrough: there is no password to log in with, so the probe
            // stops at the server's authentication request, which still
            // proves TCP, TLS and a live postmaster.
            return self.handshake_only().await.map(|()| Opened::HandshakeOnly);
        }
        let secret =
            self.credentials
                .password(request)
                .await
                .map_err(|e| ProbeOutcome::AuthFailure {
                    detail: format!("no credentials for the probe: {e}"),
                })?;
        let session = backend::connect(
            &self.endpoint,
            &self.settings,
            &self.params,
            &self.user,
            Some(&secret),
            // The probe task bounds the whole check.
            Duration::from_secs(3600),
        )
        .await
        .map_err(|e| classify(&e))?;
        Ok(Opened::Connection(ProbeConnection {
            stream: session.stream,
        }))
    }

    async fn handshake_only(&self) -> Result<(), ProbeOutcome> {
        let mut stream = backend::dial(&self.endpoint, &self.settings)
            .await
            .map_err(|e| classify(&e))?;
        let mut buf = BytesMut::new();
        dsql_proxy_protocol::startup::encode_startup(&mut buf, &self.params);
        send(&mut stream, &buf).await.map_err(io_failure)?;
        match read_message(&mut stream, MAX_PROBE_MESSAGE).await {
            Ok(Ok(m)) if m.tag == b'R' || m.tag == b'E' => Ok(()),
            Ok(Ok(m)) => Err(protocol_failure(format!(
                "unexpected message {:?} after startup",
                char::from(m.tag)
            ))),
            Ok(Err(e)) => Err(protocol_failure(e.to_string())),
            Err(e) => Err(io_failure(e)),
        }
    }
}

impl Probe for PgProbe {
    fn check(self: Arc<Self>, conn: Option<ProbeConnection>) -> CheckFuture {
        Box::pin(async move {
            let (mut conn, connect_time) = match conn {
                Some(c) => (c, None),
                None => {
                    let started = Instant::now();
                    match self.open().await {
                        Ok(Opened::Connection(c)) => (c, Some(started.elapsed())),
                        Ok(Opened::HandshakeOnly) => {
                            // Its round trip is the whole handshake.
                            let rtt = started.elapsed();
                            return (
                                ProbeOutcome::Success {
                                    rtt,
                                    connect_time: Some(rtt),
                                },
                                None,
                            );
                        }
                        Err(outcome) => return (outcome, None),
                    }
                }
            };
            let started = Instant::now();
            match select_one(&mut conn.stream).await {
                Ok(()) => (
                    ProbeOutcome::Success {
                        rtt: started.elapsed(),
                        connect_time,
                    },
                    Some(conn),
                ),
                Err(outcome) => (outcome, None),
            }
        })
    }
}

/// `SELECT 1` on an open connection, to ReadyForQuery.
async fn select_one(stream: &mut BackendStream) -> Result<(), ProbeOutcome> {
    let mut buf = BytesMut::with_capacity(16);
    encode_query(&mut buf, "SELECT 1");
    send(stream, &buf).await.map_err(io_failure)?;
    let mut failed = None;
    loop {
        let msg = match read_message(stream, MAX_PROBE_MESSAGE).await {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => return Err(protocol_failure(e.to_string())),
            Err(e) => return Err(io_failure(e)),
        };
        match decode_query_message(&msg) {
            Ok(QueryMessage::Ready(_)) => break,
            Ok(QueryMessage::Error(fields)) => failed = Some(fields),
            Ok(_) => {}
            Err(e) => return Err(protocol_failure(e.to_string())),
        }
    }
    match failed {
        None => Ok(()),
        Some(fields) => Err(ProbeOutcome::Failure {
            kind: FailureKind::Query,
            detail: format!("probe query failed: {fields}"),
        }),
    }
}

fn io_failure(e: std::io::Error) -> ProbeOutcome {
    ProbeOutcome::Failure {
        kind: FailureKind::Connection,
        detail: format!("probe connection lost: {e}"),
    }
}

fn protocol_failure(detail: String) -> ProbeOutcome {
    ProbeOutcome::Failure {
        kind: FailureKind::Protocol,
        detail,
    }
}

/// A connect error as a probe outcome: transport problems are failures;
/// a refusal of the probe's login is reported, but is no outage.
fn classify(err: &SessionError) -> ProbeOutcome {
    match err.failover_kind() {
        Some(kind) => ProbeOutcome::Failure {
            kind,
            detail: err.to_string(),
        },
        None => ProbeOutcome::AuthFailure {
            detail: err.to_string(),
        },
    }
}
