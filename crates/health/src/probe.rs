//! Probes: one PostgreSQL-level check of one endpoint.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use dsql_proxy_connector::io::{read_message, send};
use dsql_proxy_connector::{BackendStream, ConnectError, Connector, StartupLogin};
use dsql_proxy_credentials::{CredentialRequest, CredentialSource};
use dsql_proxy_protocol::query::{decode_query_message, encode_query, QueryMessage};
use dsql_proxy_protocol::startup::StartupParam;
use dsql_proxy_routing::writer::{AuroraStatus, RoleObservation};
use dsql_proxy_routing::{Endpoint, FailureKind, ProbeOutcome};

/// The largest message a probe accepts from a server.
const MAX_PROBE_MESSAGE: usize = 64 * 1024;

pub type CheckFuture =
    Pin<Box<dyn Future<Output = (ProbeOutcome, Option<ProbeConnection>)> + Send>>;

/// A persistent connection a probe reuses between rounds.
pub struct ProbeConnection {
    stream: BackendStream,
    /// Whether the first round trip after login was made (see
    /// [`PgProbe`]: it is no latency sample).
    warm: bool,
    /// Whether the server has Aurora's global database functions; learned
    /// by a role-probing check's first round trip.
    aurora: Option<bool>,
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
    /// The server asked for a password the probe does not have; the round
    /// trip from the startup packet to that request.
    HandshakeOnly {
        rtt: Duration,
    },
}

/// Checks an endpoint the way a session uses it: TCP, TLS with SNI,
/// authentication with the backend's credential source, then `SELECT 1`.
///
/// The latency sample is the round trip of that query on the established
/// connection; opening one is timed separately (`connect_time`). On a new
/// connection the first round trip after login is made untimed: it is slow
/// for reasons that are not the network (a new server backend's first
/// statement pays one-time costs, its caches are cold; at startup it
/// overlaps the other probes' connects), and the first sample decides the
/// initial selection.
pub struct PgProbe {
    endpoint: Arc<Endpoint>,
    connector: Arc<Connector>,
    credentials: Arc<dyn CredentialSource>,
    user: String,
    params: Vec<StartupParam>,
    /// Ask for the endpoint's role instead of `SELECT 1`.
    roles: bool,
}

/// One round trip that tells an endpoint's role on any PostgreSQL:
/// in recovery or not; the timeline (the WAL insert timeline on a writer,
/// which moves the moment a standby is promoted, and the last checkpoint's,
/// which may trail it); and a replica's lag: how old the last replayed
/// transaction is while replay is behind what was received, else 0 (a
/// caught-up replica of an idle primary is not behind, however old its
/// last transaction). Paused replay (`pg_wal_replay_pause()`) makes the lag
/// grow as soon as the primary writes.
pub const ROLE_QUERY: &str = "SELECT pg_is_in_recovery(), \
     CASE WHEN pg_is_in_recovery() THEN NULL \
          ELSE ('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int END, \
     (SELECT timeline_id FROM pg_control_checkpoint()), \
     CASE WHEN NOT pg_is_in_recovery() THEN 0 \
          WHEN pg_last_wal_receive_lsn() IS NOT DISTINCT FROM pg_last_wal_replay_lsn() THEN 0 \
          ELSE (extract(epoch FROM now() - pg_last_xact_replay_timestamp()) * 1000)::bigint END";

/// Whether the server is Aurora PostgreSQL with the global database
/// functions the Aurora role query uses (plain PostgreSQL has none of them).
pub const AURORA_DETECT_QUERY: &str = "SELECT \
     to_regprocedure('aurora_global_db_instance_status()') IS NOT NULL \
     AND to_regprocedure('aurora_global_db_status()') IS NOT NULL \
     AND to_regprocedure('aurora_db_instance_identifier()') IS NOT NULL";

/// The role query on Aurora: in recovery or not (an Aurora secondary
/// Region's cluster, or a reader instance, is); this instance's Region and
/// visibility lag from `aurora_global_db_instance_status()`; the Region of
/// the instance holding `MASTER_SESSION_ID` (the writer) as this endpoint
/// sees it; and this Region's `rpo_lag_in_msec` from
/// `aurora_global_db_status()` (-1 on the primary Region). Aurora has no
/// timeline a probe could compare across Regions: with two writable
/// endpoints only the control plane (`global_cluster_id`) proves which is
/// newer.
pub const AURORA_ROLE_QUERY: &str = "SELECT pg_is_in_recovery(), \
     me.aws_region, \
     (SELECT w.aws_region FROM aurora_global_db_instance_status() w \
       WHERE w.session_id = 'MASTER_SESSION_ID' LIMIT 1), \
     me.visibility_lag_in_msec, \
     (SELECT g.rpo_lag_in_msec FROM aurora_global_db_status() g \
       WHERE g.aws_region = me.aws_region LIMIT 1) \
     FROM (SELECT 1) AS one \
     LEFT JOIN (SELECT * FROM aurora_global_db_instance_status() \
       WHERE server_id = aurora_db_instance_identifier() LIMIT 1) AS me ON true";

impl PgProbe {
    pub fn new(
        endpoint: Arc<Endpoint>,
        connector: Arc<Connector>,
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
            connector,
            credentials,
            user: user.to_owned(),
            params,
            roles: false,
        }
    }

    /// Makes every check learn the endpoint's role ([`ROLE_QUERY`]).
    pub fn with_roles(mut self) -> Self {
        self.roles = true;
        self
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
            return self
                .handshake_only()
                .await
                .map(|rtt| Opened::HandshakeOnly { rtt });
        }
        let secret =
            self.credentials
                .password(request)
                .await
                .map_err(|e| ProbeOutcome::AuthFailure {
                    detail: format!("no credentials for the probe: {e}"),
                    rtt: None,
                })?;
        let login = StartupLogin {
            user: &self.user,
            params: &self.params,
            password: Some(&secret),
        };
        // The probe task bounds the whole check.
        let session = self
            .connector
            .connect(&self.endpoint, &login, Duration::from_secs(3600))
            .await
            .map_err(|e| classify(&e))?;
        Ok(Opened::Connection(ProbeConnection {
            stream: session.stream,
            warm: false,
            aurora: None,
        }))
    }

    /// Dials and sends the startup packet; returns the round trip to the
    /// server's answer, the one round trip made on the established (TLS)
    /// connection.
    async fn handshake_only(&self) -> Result<Duration, ProbeOutcome> {
        let mut stream = self
            .connector
            .dial(&self.endpoint)
            .await
            .map_err(|e| classify(&e))?;
        let mut buf = BytesMut::new();
        dsql_proxy_protocol::startup::encode_startup(&mut buf, &self.params);
        let sent = Instant::now();
        send(&mut stream, &buf).await.map_err(io_failure)?;
        match read_message(&mut stream, MAX_PROBE_MESSAGE).await {
            Ok(Ok(m)) if m.tag == b'R' || m.tag == b'E' => Ok(sent.elapsed()),
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
                        Ok(Opened::HandshakeOnly { rtt }) => {
                            return (
                                ProbeOutcome::Success {
                                    rtt,
                                    connect_time: Some(started.elapsed()),
                                    role: None,
                                },
                                None,
                            );
                        }
                        Err(outcome) => return (outcome, None),
                    }
                }
            };
            if !conn.warm {
                // The untimed first round trip; a role probe learns
                // whether the server is Aurora with it.
                let sql = if self.roles {
                    AURORA_DETECT_QUERY
                } else {
                    "SELECT 1"
                };
                match run_query(&mut conn.stream, sql).await {
                    Ok(rows) if self.roles => match parse_detect(&rows) {
                        Ok(aurora) => conn.aurora = Some(aurora),
                        Err(detail) => {
                            let kind = FailureKind::Query;
                            return (ProbeOutcome::Failure { kind, detail }, Some(conn));
                        }
                    },
                    Ok(_) => {}
                    Err(outcome) => return (outcome, None),
                }
                conn.warm = true;
            }
            let aurora = conn.aurora == Some(true);
            let started = Instant::now();
            let sql = match (self.roles, aurora) {
                (false, _) => "SELECT 1",
                (true, false) => ROLE_QUERY,
                (true, true) => AURORA_ROLE_QUERY,
            };
            let role = match run_query(&mut conn.stream, sql).await {
                Ok(rows) if self.roles => {
                    let parsed = if aurora {
                        parse_aurora_role(&rows)
                    } else {
                        parse_role(&rows)
                    };
                    match parsed {
                        Ok(role) => Some(role),
                        Err(detail) => {
                            let kind = FailureKind::Query;
                            return (ProbeOutcome::Failure { kind, detail }, Some(conn));
                        }
                    }
                }
                Ok(_) => None,
                Err(outcome) => return (outcome, None),
            };
            (
                ProbeOutcome::Success {
                    rtt: started.elapsed(),
                    connect_time,
                    role,
                },
                Some(conn),
            )
        })
    }
}

type Rows = Vec<Vec<Option<String>>>;

/// One simple query on an open connection, to ReadyForQuery.
async fn run_query(stream: &mut BackendStream, sql: &str) -> Result<Rows, ProbeOutcome> {
    let mut buf = BytesMut::with_capacity(16 + sql.len());
    encode_query(&mut buf, sql);
    send(stream, &buf).await.map_err(io_failure)?;
    let mut failed = None;
    let mut rows = Vec::new();
    loop {
        let msg = match read_message(stream, MAX_PROBE_MESSAGE).await {
            Ok(Ok(m)) => m,
            Ok(Err(e)) => return Err(protocol_failure(e.to_string())),
            Err(e) => return Err(io_failure(e)),
        };
        match decode_query_message(&msg) {
            Ok(QueryMessage::Ready(_)) => break,
            Ok(QueryMessage::Error(fields)) => failed = Some(fields),
            Ok(QueryMessage::Row(row)) => rows.push(row),
            Ok(_) => {}
            Err(e) => return Err(protocol_failure(e.to_string())),
        }
    }
    match failed {
        None => Ok(rows),
        Some(fields) => Err(ProbeOutcome::Failure {
            kind: FailureKind::Query,
            detail: format!("probe query failed: {fields}"),
        }),
    }
}

/// [`ROLE_QUERY`]'s row as a role.
pub fn parse_role(rows: &[Vec<Option<String>>]) -> Result<RoleObservation, String> {
    let bad = || format!("unexpected answer to the role query: {rows:?}");
    let [row] = rows else { return Err(bad()) };
    let [in_recovery, wal_timeline, checkpoint_timeline, lag_ms] = row.as_slice() else {
        return Err(bad());
    };
    let read_only = pg_bool(in_recovery).ok_or_else(bad)?;
    let number = |v: &Option<String>| -> Result<Option<i64>, String> {
        v.as_deref()
            .map(|t| t.parse::<i64>().map_err(|_| bad()))
            .transpose()
    };
    let timeline = [number(wal_timeline)?, number(checkpoint_timeline)?]
        .into_iter()
        .flatten()
        .filter_map(|t| u32::try_from(t).ok())
        .max();
    let lag = number(lag_ms)?.map(|ms| Duration::from_millis(ms.max(0) as u64));
    Ok(RoleObservation {
        read_only,
        timeline,
        lag,
        aurora: None,
    })
}

/// [`AURORA_DETECT_QUERY`]'s answer.
pub fn parse_detect(rows: &[Vec<Option<String>>]) -> Result<bool, String> {
    let value = match rows {
        [row] => match row.as_slice() {
            [v] => pg_bool(v),
            _ => None,
        },
        _ => None,
    };
    value.ok_or_else(|| format!("unexpected answer to the Aurora check: {rows:?}"))
}

/// A `boolean` column in PostgreSQL's text form.
fn pg_bool(value: &Option<String>) -> Option<bool> {
    match value.as_deref() {
        Some("t") => Some(true),
        Some("f") => Some(false),
        _ => None,
    }
}

/// [`AURORA_ROLE_QUERY`]'s row as a role. A replica's lag is its visibility
/// lag, else its Region's RPO lag; a writer's is zero.
pub fn parse_aurora_role(rows: &[Vec<Option<String>>]) -> Result<RoleObservation, String> {
    let bad = || format!("unexpected answer to the Aurora role query: {rows:?}");
    let [row] = rows else { return Err(bad()) };
    let [in_recovery, region, writer_region, visibility_ms, rpo_ms] = row.as_slice() else {
        return Err(bad());
    };
    let read_only = pg_bool(in_recovery).ok_or_else(bad)?;
    // Aurora's lag columns are numeric or bigint; -1 means "not a lag".
    let millis = |v: &Option<String>| -> Result<Option<Duration>, String> {
        let Some(text) = v.as_deref() else {
            return Ok(None);
        };
        let ms: f64 = text.trim().parse().map_err(|_| bad())?;
        // A lag too large for a Duration (1e300) is saturated, not a panic.
        Ok((ms.is_finite() && ms >= 0.0)
            .then(|| Duration::try_from_secs_f64(ms / 1000.0).unwrap_or(Duration::MAX)))
    };
    let visibility = millis(visibility_ms)?;
    let rpo_lag = millis(rpo_ms)?;
    let lag = if read_only {
        visibility.or(rpo_lag)
    } else {
        Some(Duration::ZERO)
    };
    Ok(RoleObservation {
        read_only,
        timeline: None,
        lag,
        aurora: Some(AuroraStatus {
            region: region.clone(),
            writer_region: writer_region.clone(),
            rpo_lag,
        }),
    })
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

/// A connect error as a probe outcome: transport problems are failures; a
/// refusal of the probe's login, or for load (53300/53400, as the connect
/// path treats it), is reported but is no outage, and its round trip is a
/// latency sample.
fn classify(err: &ConnectError) -> ProbeOutcome {
    let detail = err.to_string();
    match (err.failover_kind(), err.round_trip()) {
        (Some(FailureKind::Busy), Some(rtt)) => ProbeOutcome::Busy { detail, rtt },
        (Some(kind), _) => ProbeOutcome::Failure { kind, detail },
        // A TLS setting that cannot be used reaches no server at all.
        (None, _) if matches!(err, ConnectError::Setup(_)) => ProbeOutcome::Failure {
            kind: FailureKind::Tls,
            detail,
        },
        (None, rtt) => ProbeOutcome::AuthFailure { detail, rtt },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dsql_proxy_protocol::backend::ErrorFields;

    fn refused(code: &str) -> ConnectError {
        ConnectError::Refused {
            endpoint: "a (a.example:5432)".into(),
            fields: ErrorFields {
                fields: vec![(b'S', "FATAL".into()), (b'C', code.into())],
            },
            round_trip: Duration::from_millis(7),
        }
    }

    #[test]
    fn refused_probe_logins_are_no_outage_and_still_a_latency_sample() {
        let rtt = Duration::from_millis(7);
        // Busy at login: not a failure towards down_after.
        for busy in ["53300", "53400"] {
            assert!(
                matches!(classify(&refused(busy)), ProbeOutcome::Busy { rtt: r, .. } if r == rtt),
                "{busy}"
            );
        }
        // A refused login (a wrong probe_user): reported, timed.
        assert!(matches!(
            classify(&refused("28P01")),
            ProbeOutcome::AuthFailure { rtt: Some(r), .. } if r == rtt
        ));
        // The server shutting down is a failure, as are transport errors.
        assert!(matches!(
            classify(&refused("57P03")),
            ProbeOutcome::Failure {
                kind: FailureKind::Unavailable,
                ..
            }
        ));
        let reset = ConnectError::Transport {
            endpoint: "a".into(),
            cause: "reset".into(),
        };
        assert!(matches!(
            classify(&reset),
            ProbeOutcome::Failure {
                kind: FailureKind::Connection,
                ..
            }
        ));
        // The proxy declined to send a secret: nothing was timed.
        let declined = ConnectError::Declined {
            endpoint: "a".into(),
            reason: "cleartext".into(),
        };
        assert!(matches!(
            classify(&declined),
            ProbeOutcome::AuthFailure { rtt: None, .. }
        ));
    }

    fn row(values: [Option<&str>; 4]) -> Vec<Vec<Option<String>>> {
        vec![values.iter().map(|v| v.map(str::to_owned)).collect()]
    }

    #[test]
    fn role_rows_parse() {
        let primary = parse_role(&row([Some("f"), Some("2"), Some("1"), Some("0")])).unwrap();
        assert_eq!(
            primary,
            RoleObservation {
                read_only: false,
                timeline: Some(2),
                lag: Some(Duration::ZERO),
                aurora: None,
            }
        );
        let standby = parse_role(&row([Some("t"), None, Some("1"), Some("1500")])).unwrap();
        assert!(standby.read_only);
        assert_eq!(standby.timeline, Some(1));
        assert_eq!(standby.lag, Some(Duration::from_millis(1500)));
        let unknown = parse_role(&row([Some("t"), None, None, None])).unwrap();
        assert_eq!((unknown.timeline, unknown.lag), (None, None));
        assert!(parse_role(&row([Some("x"), None, None, None])).is_err());
        assert!(parse_role(&row([Some("t"), Some("a"), None, None])).is_err());
        assert!(parse_role(&[]).is_err());
    }

    fn aurora_row(values: [Option<&str>; 5]) -> Vec<Vec<Option<String>>> {
        vec![values.iter().map(|v| v.map(str::to_owned)).collect()]
    }

    #[test]
    fn aurora_role_rows_parse() {
        let writer = parse_aurora_role(&aurora_row([
            Some("f"),
            Some("us-east-1"),
            Some("us-east-1"),
            Some("0"),
            Some("-1"),
        ]))
        .unwrap();
        assert!(!writer.read_only);
        assert_eq!(writer.lag, Some(Duration::ZERO));
        assert_eq!(writer.timeline, None);
        let aurora = writer.aurora.unwrap();
        assert_eq!(aurora.region.as_deref(), Some("us-east-1"));
        assert_eq!(aurora.rpo_lag, None, "-1 marks the primary Region");

        let replica = parse_aurora_role(&aurora_row([
            Some("t"),
            Some("us-west-2"),
            Some("us-east-1"),
            Some("1250"),
            Some("800.5"),
        ]))
        .unwrap();
        assert!(replica.read_only);
        assert_eq!(replica.lag, Some(Duration::from_millis(1250)));
        let aurora = replica.aurora.unwrap();
        assert_eq!(aurora.writer_region.as_deref(), Some("us-east-1"));
        assert_eq!(aurora.rpo_lag, Some(Duration::from_micros(800_500)));

        // No row for this instance: the RPO lag stands in.
        let rpo_only =
            parse_aurora_role(&aurora_row([Some("t"), None, None, None, Some("40")])).unwrap();
        assert_eq!(rpo_only.lag, Some(Duration::from_millis(40)));
        let unknown = parse_aurora_role(&aurora_row([Some("t"), None, None, None, None])).unwrap();
        assert_eq!(unknown.lag, None);

        assert!(parse_aurora_role(&aurora_row([Some("t"), None, None, Some("x"), None])).is_err());
        assert!(parse_aurora_role(&[]).is_err());
        assert!(parse_detect(&[vec![Some("t".into())]]).unwrap());
        assert!(!parse_detect(&[vec![Some("f".into())]]).unwrap());
        assert!(parse_detect(&[vec![None]]).is_err());
    }

    #[test]
    fn absurd_lags_from_a_server_saturate_instead_of_panicking() {
        let replica = parse_aurora_role(&aurora_row([
            Some("t"),
            Some("us-west-2"),
            Some("us-east-1"),
            Some("1e300"),
            Some("1.7976931348623157e308"),
        ]))
        .unwrap();
        assert_eq!(replica.lag, Some(Duration::MAX));
        assert_eq!(replica.aurora.unwrap().rpo_lag, Some(Duration::MAX));
        let nan = parse_aurora_role(&aurora_row([
            Some("t"),
            None,
            None,
            Some("NaN"),
            Some("inf"),
        ]));
        assert_eq!(nan.unwrap().lag, None);
        let standby = parse_role(&row([
            Some("t"),
            None,
            Some("1"),
            Some("-9223372036854775808"),
        ]));
        assert_eq!(standby.unwrap().lag, Some(Duration::ZERO));
    }
}
