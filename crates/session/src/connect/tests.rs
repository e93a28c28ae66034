use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

use dsql_proxy_config::Config;
use dsql_proxy_connector::BackendStream;
use dsql_proxy_credentials::{CredentialFuture, CredentialSource};
use dsql_proxy_metrics::Metrics;
use dsql_proxy_protocol::backend::ErrorFields;
use dsql_proxy_routing::writer::NoWriter;
use dsql_proxy_routing::{EndpointId, Roles, RoutingTable, TableRouter};

use super::*;

const CAP: Duration = Duration::from_secs(2);

#[test]
fn attempt_limit_scales_with_the_probed_connect_time_within_floor_and_cap() {
    let ms = Duration::from_millis;
    // Unmeasured: the configured cap.
    assert_eq!(attempt_limit(CAP, None), CAP);
    // A fast local endpoint: the floor, not 4 x 3 ms.
    assert_eq!(attempt_limit(CAP, Some(ms(3))), ATTEMPT_LIMIT_FLOOR);
    // A distant one: four times its usual connect.
    assert_eq!(attempt_limit(CAP, Some(ms(300))), ms(1200));
    // A slow one never gets more than the cap.
    assert_eq!(attempt_limit(CAP, Some(ms(900))), CAP);
    // A cap below the floor wins: the operator asked for it.
    assert_eq!(attempt_limit(ms(200), Some(ms(3))), ms(200));
}

fn busy_refusal() -> SessionError {
    SessionError::Backend(ConnectError::Refused {
        endpoint: "a (a.example:5432)".into(),
        fields: ErrorFields {
            fields: vec![
                (b'S', "FATAL".into()),
                (b'C', "53300".into()),
                (b'M', "sorry, too many clients already".into()),
            ],
        },
        round_trip: Duration::from_millis(1),
    })
}

fn hint(err: &SessionError) -> Option<String> {
    match err {
        SessionError::Backend(ConnectError::Refused { fields, .. }) => {
            fields.get(b'H').map(str::to_owned)
        }
        _ => None,
    }
}

#[test]
fn only_dsql_refusals_get_the_dsql_connection_limits_hint() {
    let dsql = explain_limits(BackendKind::Dsql, busy_refusal());
    let text = hint(&dsql).expect("a hint for kind = dsql");
    assert!(
        text.contains("Aurora DSQL allows 100 new connections"),
        "{text}"
    );
    for other in [BackendKind::Postgres, BackendKind::AuroraGlobal] {
        let err = explain_limits(other, busy_refusal());
        assert_eq!(hint(&err), None, "{other:?}: the server's words, unchanged");
    }
}

fn config(toml: &str) -> Config {
    Config::parse(toml).unwrap()
}

/// Counts what the loop asks of it and never gives a secret.
#[derive(Default)]
struct CountingCredentials {
    asked: AtomicUsize,
}

impl CredentialSource for CountingCredentials {
    fn password<'a>(&'a self, _request: CredentialRequest<'a>) -> CredentialFuture<'a> {
        self.asked.fetch_add(1, Ordering::SeqCst);
        Box::pin(std::future::ready(Err(CredentialError::Unavailable(
            "test: no secret".into(),
        ))))
    }
    fn kind(&self) -> &'static str {
        "test"
    }
}

/// A pool holding one connection.
struct OneIdle(Mutex<Option<BackendConnection>>);

impl IdleConnections for OneIdle {
    fn take(&self, endpoint: &Endpoint, login: &Login) -> Option<Pooled> {
        assert_eq!((endpoint.name.as_str(), login.user.as_str()), ("a", "app"));
        let backend = self.0.lock().ok()?.take()?;
        // Long enough ago that the checkout asks the server.
        Some(Pooled {
            backend,
            quiet_for: Duration::from_secs(1),
        })
    }
}

fn context(toml: &str, table: RoutingTable) -> (ProxyContext, Arc<CountingCredentials>) {
    let config = config(toml);
    let router = Arc::new(TableRouter::new(table));
    let credentials = Arc::new(CountingCredentials::default());
    let metrics = Arc::new(Metrics::new("test").unwrap());
    let ctx = ProxyContext::from_config(
        &config,
        router,
        Arc::clone(&credentials) as Arc<dyn CredentialSource>,
        metrics,
    )
    .unwrap();
    (ctx, credentials)
}

const POSTGRES: &str = r#"
[backend]
kind = "postgres"
auth = "password"
password = "unused"
tls = "disable"
connect_rate = 1
connect_burst = 1
[routing]
probe_user = "app"
[[endpoints]]
name = "a"
host = "127.0.0.1"
port = 9
"#;

fn login() -> Login {
    Login {
        user: "app".into(),
        database: "db".into(),
        params: vec![
            StartupParam::new("user", "app"),
            StartupParam::new("database", "db"),
        ],
        client_password: None,
    }
}

#[tokio::test]
async fn an_idle_connection_is_taken_before_any_credential_token_or_dial() {
    let (mut ctx, credentials) = context(
        POSTGRES,
        RoutingTable::from_configs(&config(POSTGRES).endpoints),
    );
    // A connected socket pair stands in for a pooled backend connection;
    // the endpoint's own address (port 9) would refuse a dial.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let stream = tokio::net::TcpStream::connect(listener.local_addr().unwrap())
        .await
        .unwrap();
    // The "server" answers the checkout's empty query.
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (mut server, _) = listener.accept().await.unwrap();
        let mut query = [0u8; 6];
        server.read_exact(&mut query).await.unwrap();
        assert_eq!(&query, b"Q\0\0\0\x05\0");
        server.write_all(b"I\0\0\0\x04Z\0\0\0\x05I").await.unwrap();
        // Held open while the test runs.
        let mut rest = Vec::new();
        let _ = server.read_to_end(&mut rest).await;
    });
    let mut parameters = dsql_proxy_protocol::tracking::ParameterValues::new();
    parameters.set(b"server_version", b"pooled");
    let pooled = BackendConnection {
        stream: BackendStream::Plain(stream),
        parameters,
        notices: Vec::new(),
        key: None,
        ready_status: b'I',
        connected_at: std::time::Instant::now(),
    };
    ctx.idle_connections = Some(Arc::new(OneIdle(Mutex::new(Some(pooled)))));

    let connected = connect(&ctx, &login(), Intent::ReadWrite).await.unwrap();
    assert_eq!(connected.endpoint.name, "a");
    assert_eq!(
        connected.backend.parameters.get(b"server_version"),
        Some(&b"pooled"[..])
    );
    assert_eq!(credentials.asked.load(Ordering::SeqCst), 0);
    let limiter = ctx.connect_limiter.as_ref().unwrap();
    assert!(
        limiter.admit(Duration::ZERO).is_ok(),
        "the connect-rate token (burst 1) was not spent"
    );

    // The pool is empty now: the loop asks for a credential (refused here,
    // so it never dials).
    let err = connect(&ctx, &login(), Intent::ReadWrite)
        .await
        .err()
        .unwrap();
    assert_eq!(credentials.asked.load(Ordering::SeqCst), 1);
    assert!(err.to_string().contains("test: no secret"), "{err}");
}

const GLOBAL: &str = r#"
[backend]
kind = "aurora-global"
auth = "password"
password = "unused"
tls = "disable"
connect_timeout = "200ms"
[routing]
probe_user = "app"
writer_wait = "400ms"
[[endpoints]]
name = "east"
host = "east.example"
[[endpoints]]
name = "west"
host = "west.example"
[[endpoints]]
name = "south"
host = "south.example"
"#;

fn global_table(writer: Result<EndpointId, NoWriter>) -> RoutingTable {
    let mut t = RoutingTable::from_configs(&config(GLOBAL).endpoints);
    let read_order = vec![EndpointId(2), EndpointId(1), EndpointId(0)];
    t.roles = Some(Arc::new(Roles {
        writer,
        fenced: Vec::new(),
        read_order,
        observed: Vec::new(),
        writer_changes_total: 0,
        control_plane: None,
    }));
    t
}

fn names(endpoints: &[Arc<Endpoint>]) -> Vec<&str> {
    endpoints.iter().map(|e| e.name.as_str()).collect()
}

#[tokio::test]
async fn aurora_global_candidates_follow_the_role_with_busy_endpoints_last() {
    let (ctx, _) = context(GLOBAL, global_table(Ok(EndpointId(0))));
    assert_eq!(
        budget(&ctx),
        Duration::from_millis(400),
        "writer_wait is longer"
    );
    let table = ctx.router.route().unwrap();
    assert_eq!(
        names(&candidates(&ctx, &table, Intent::ReadWrite)),
        ["east"]
    );
    assert_eq!(
        names(&candidates(&ctx, &table, Intent::ReadOnly)),
        ["south", "west", "east"]
    );
    ctx.router.report_busy(EndpointId(1));
    assert_eq!(
        names(&candidates(&ctx, &table, Intent::ReadOnly)),
        ["south", "east", "west"]
    );
}

#[tokio::test]
async fn aurora_global_without_a_writer_waits_out_the_budget_then_says_why() {
    let (ctx, credentials) = context(GLOBAL, global_table(Err(NoWriter::NoneWritable)));
    let err = connect(&ctx, &login(), Intent::ReadWrite)
        .await
        .err()
        .unwrap();
    let SessionError::Rejected(pg) = &err else {
        panic!("{err:?}")
    };
    assert_eq!(pg.code, sqlstate::CANNOT_CONNECT_NOW);
    assert!(pg.message.contains("no writer within writer_wait"), "{pg}");
    assert_eq!(
        credentials.asked.load(Ordering::SeqCst),
        0,
        "nothing to try"
    );
}

#[test]
fn connect_failure_reasons_are_the_series_created_at_startup() {
    let reasons: Vec<&str> = dsql_proxy_metrics::connect_failure_reasons().collect();
    let credentials =
        credential_error(dsql_proxy_credentials::CredentialError::MissingClientPassword);
    let refused = SessionError::Backend(ConnectError::Refused {
        endpoint: "a (a.example:5432)".into(),
        fields: ErrorFields::default(),
        round_trip: Duration::ZERO,
    });
    let declined = SessionError::Backend(ConnectError::Declined {
        endpoint: "a (a.example:5432)".into(),
        reason: "cleartext password".into(),
    });
    let setup = SessionError::Backend(ConnectError::Setup("no roots".into()));
    for err in [busy_refusal(), refused, declined, setup, credentials] {
        let reason = err
            .failover_kind()
            .map_or(err.reason(), dsql_proxy_routing::FailureKind::as_str);
        assert!(reasons.contains(&reason), "{reason}");
    }
}
