//! The `dsql-iam` credential path end to end, through the AWS SDK's default
//! credentials chain: every provider the chain tries (shared profile files,
//! EKS IRSA web identity via STS, ECS / EKS Pod Identity container
//! credentials, EC2 IMDSv2) is served by a local stand-in speaking the real
//! wire format (`dsql_proxy_tests::aws_endpoints`); the DSQL emulator checks
//! each token's SigV4 signature, session token included, with the keys the
//! stand-ins hand out.
//!
//! Also: rotation without a restart, provider failures (STS AccessDenied,
//! expired credentials, no credentials at all) reaching the client as a
//! FATAL that names the cause within seconds, and no token, signature or
//! session token in the proxy's log.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use dsql_proxy_tests::aws_endpoints::{
    ContainerCredentialsServer, HttpServer, ImdsServer, ProfileFiles, StsMode, StsServer,
    TempCredentials, IMDS_CREDENTIALS_PATH, IMDS_TOKEN_HEADER, IMDS_TOKEN_PATH, IMDS_TTL_HEADER,
    STS_ACCESS_DENIED_MESSAGE, WEB_IDENTITY_TOKEN,
};
use dsql_proxy_tests::dsql_stack::{isolated_aws_env, DsqlProxyOptions, DsqlStack};
use dsql_proxy_tests::{ADMIN_USER, APP_DB, APP_USER};
use tokio_postgres::error::DbError;

/// Any connect, failed or not, must be answered within this.
const ANSWER_WITHIN: Duration = Duration::from_secs(10);
const ROLE_ARN: &str = "arn:aws:iam::123456789012:role/test";
const HOUR: Duration = Duration::from_secs(3600);

/// The stack with `env` for the proxy and the emulator accepting exactly
/// `keys`.
fn stack(env: Vec<(String, String)>, keys: &[&TempCredentials]) -> DsqlStack {
    stack_with(
        DsqlProxyOptions {
            env,
            ..DsqlProxyOptions::default()
        },
        keys,
    )
}

fn stack_with(opts: DsqlProxyOptions, keys: &[&TempCredentials]) -> DsqlStack {
    let pairs: Vec<(String, String)> = keys.iter().map(|c| c.key_pair()).collect();
    DsqlStack::start_with(opts, |emu| {
        if !pairs.is_empty() {
            emu.credentials = pairs;
        }
    })
}

/// Proxy and emulator logs plus what the stand-in servers received.
fn logs(stack: &DsqlStack, servers: &[&HttpServer]) -> String {
    let mut s = format!(
        "--- proxy ---\n{}\n--- emulator ---\n{}\n",
        stack.proxy.logs(),
        stack.emulator.logs()
    );
    for server in servers {
        s.push_str(&server.describe_requests());
    }
    s
}

/// Connects as `user` (bounded by [`ANSWER_WITHIN`]) and checks
/// `current_user`.
async fn assert_current_user(stack: &DsqlStack, user: &str, db: &str, servers: &[&HttpServer]) {
    let client = match tokio::time::timeout(ANSWER_WITHIN, stack.try_connect(user, db)).await {
        Ok(Ok(c)) => c,
        Ok(Err(e)) => panic!(
            "connect as {user} to {db} through the proxy failed: {e:?}\n{}",
            logs(stack, servers)
        ),
        Err(_) => panic!(
            "connect as {user} to {db} hung for {ANSWER_WITHIN:?}\n{}",
            logs(stack, servers)
        ),
    };
    let row = tokio::time::timeout(
        ANSWER_WITHIN,
        client.query_one("select current_user::text", &[]),
    )
    .await
    .unwrap_or_else(|_| panic!("select current_user hung\n{}", logs(stack, servers)))
    .unwrap_or_else(|e| panic!("select current_user: {e:?}\n{}", logs(stack, servers)));
    let current: String = row.get(0);
    assert_eq!(current, user, "{}", logs(stack, servers));
}

/// Both roles, each with its own token action (DbConnectAdmin / DbConnect).
async fn assert_both_roles_connect(stack: &DsqlStack, servers: &[&HttpServer]) {
    assert_current_user(stack, ADMIN_USER, "postgres", servers).await;
    assert_current_user(stack, APP_USER, APP_DB, servers).await;
}

/// Connects as admin expecting a refusal; returns the FATAL, which must come
/// within [`ANSWER_WITHIN`].
async fn expect_fatal(stack: &DsqlStack, servers: &[&HttpServer]) -> DbError {
    let started = Instant::now();
    let result = tokio::time::timeout(ANSWER_WITHIN, stack.try_connect(ADMIN_USER, "postgres"))
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the proxy neither accepted nor refused the connect within {ANSWER_WITHIN:?}\n{}",
                logs(stack, servers)
            )
        });
    let err = match result {
        Ok(_) => panic!("connect unexpectedly succeeded\n{}", logs(stack, servers)),
        Err(e) => e,
    };
    let db = err.as_db_error().cloned().unwrap_or_else(|| {
        panic!(
            "expected an ErrorResponse, got {err:?} after {:?}\n{}",
            started.elapsed(),
            logs(stack, servers)
        )
    });
    eprintln!("refused after {:?}: {db:?}", started.elapsed());
    assert_eq!(db.severity(), "FATAL", "{db:?}\n{}", logs(stack, servers));
    db
}

/// Connects as admin every 500 ms until one succeeds or `within` passes;
/// the errors of the failed attempts otherwise.
async fn connect_eventually(stack: &DsqlStack, within: Duration) -> Result<(), Vec<String>> {
    let deadline = Instant::now() + within;
    let mut failures = Vec::new();
    loop {
        match tokio::time::timeout(ANSWER_WITHIN, stack.try_connect(ADMIN_USER, "postgres")).await {
            Ok(Ok(_client)) => return Ok(()),
            Ok(Err(e)) => failures.push(match e.as_db_error() {
                Some(db) => format!("{} {}", db.code().code(), db.message()),
                None => e.to_string(),
            }),
            Err(_) => failures.push("hung".to_owned()),
        }
        if Instant::now() >= deadline {
            return Err(failures);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Sessions the emulator started with tokens signed by `key` and carrying
/// an `X-Amz-Security-Token` (which it verified as part of the signature).
fn sessions_signed_by(stack: &DsqlStack, key: &str, with_session_token: bool) -> usize {
    let key = format!("access_key_id={key} ");
    let token = format!("session_token={with_session_token}");
    stack
        .emulator
        .logs()
        .lines()
        .filter(|l| l.contains("session started") && l.contains(&key) && l.contains(&token))
        .count()
}

/// Neither tokens (presigned URLs) nor the credentials that signed them may
/// appear in the proxy's log.
fn assert_no_secrets_logged(
    stack: &DsqlStack,
    creds: &[&TempCredentials],
    servers: &[&HttpServer],
) {
    let log = stack.proxy.logs();
    let mut needles: Vec<(String, &str)> = vec![
        ("X-Amz-Signature".into(), "a token's signature"),
        ("X-Amz-Security-Token".into(), "a token's session token"),
        ("X-Amz-Credential".into(), "a token's credential scope"),
        ("Action=DbConnect".into(), "a token"),
    ];
    for c in creds {
        needles.push((c.session_token.clone(), "a session token"));
        needles.push((c.session_token_encoded(), "a URL-encoded session token"));
        needles.push((c.secret_access_key.clone(), "a secret access key"));
    }
    for (needle, what) in &needles {
        assert!(
            !log.contains(needle.as_str()),
            "{what} ({needle:?}) leaked into the proxy log\n{}",
            logs(stack, servers)
        );
    }
}

fn temp_file(dir: &tempfile::TempDir, name: &str, contents: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
    path
}

fn with_env(mut env: Vec<(String, String)>, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    for (k, v) in extra {
        env.retain(|(key, _)| key != k);
        env.push(((*k).to_owned(), (*v).to_owned()));
    }
    env
}

// ---------------------------------------------------------------------------
// Each provider of the chain

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ecs_container_credentials_with_authorization_token() {
    let creds = TempCredentials::generate("ECS", HOUR);
    let auth = "Basic ZWNzLWFnZW50OnRhc2stc2VjcmV0";
    let server = ContainerCredentialsServer::start("/creds", Some(auth), vec![creds.clone()]);
    let stack = stack(server.env(Some(auth)), &[&creds]);
    let servers = [&server.http];

    assert_both_roles_connect(&stack, &servers).await;

    let requests = server.http.requests();
    assert!(!requests.is_empty(), "{}", logs(&stack, &servers));
    for r in &requests {
        assert_eq!(r.method, "GET", "{}", logs(&stack, &servers));
        assert_eq!(r.target, "/creds", "{}", logs(&stack, &servers));
        assert_eq!(
            r.header("authorization"),
            Some(auth),
            "AWS_CONTAINER_AUTHORIZATION_TOKEN must arrive as the Authorization header\n{}",
            logs(&stack, &servers)
        );
    }
    assert!(
        sessions_signed_by(&stack, &creds.access_key_id, true) >= 2,
        "both sessions must be signed with the container credentials, session token included\n{}",
        logs(&stack, &servers)
    );
    assert_no_secrets_logged(&stack, &[&creds], &servers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eks_pod_identity_token_file() {
    let dir = tempfile::tempdir().unwrap();
    // The agent's token is a JWT; the SDK sends the file's bytes as the
    // Authorization header, so no trailing newline.
    let pod_token = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6ZGVmYXVsdDphcHAifQ.cG9kLWlkZW50aXR5";
    let token_file = temp_file(&dir, "eks-pod-identity-token", pod_token);
    let creds = TempCredentials::generate("PODID", HOUR);
    let server =
        ContainerCredentialsServer::start("/v1/credentials", Some(pod_token), vec![creds.clone()]);
    let stack = stack(server.env_with_token_file(&token_file), &[&creds]);
    let servers = [&server.http];

    assert_both_roles_connect(&stack, &servers).await;

    let requests = server.http.requests();
    assert!(!requests.is_empty(), "{}", logs(&stack, &servers));
    for r in &requests {
        assert_eq!(
            (r.method.as_str(), r.target.as_str()),
            ("GET", "/v1/credentials")
        );
        assert_eq!(
            r.header("authorization"),
            Some(pod_token),
            "the token file's contents must arrive as the Authorization header\n{}",
            logs(&stack, &servers)
        );
    }
    assert!(
        sessions_signed_by(&stack, &creds.access_key_id, true) >= 2,
        "{}",
        logs(&stack, &servers)
    );
    assert_no_secrets_logged(&stack, &[&creds], &servers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eks_irsa_web_identity_through_sts() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = temp_file(&dir, "web-identity-token", WEB_IDENTITY_TOKEN);
    let creds = TempCredentials::generate("IRSA", HOUR);
    let sts = StsServer::start(StsMode::Success(creds.clone()));
    let stack = stack(sts.env(&token_file, ROLE_ARN, "dsql-proxy-irsa"), &[&creds]);
    let servers = [&sts.http];

    assert_both_roles_connect(&stack, &servers).await;

    let requests = sts.http.requests();
    assert!(!requests.is_empty(), "{}", logs(&stack, &servers));
    for r in &requests {
        let ctx = logs(&stack, &servers);
        assert_eq!((r.method.as_str(), r.path()), ("POST", "/"), "{ctx}");
        assert!(
            r.header("content-type")
                .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded")),
            "{ctx}"
        );
        assert_eq!(
            r.form_value("Action").as_deref(),
            Some("AssumeRoleWithWebIdentity"),
            "{ctx}"
        );
        assert_eq!(
            r.form_value("Version").as_deref(),
            Some("2011-06-15"),
            "{ctx}"
        );
        assert_eq!(r.form_value("RoleArn").as_deref(), Some(ROLE_ARN), "{ctx}");
        assert_eq!(
            r.form_value("RoleSessionName").as_deref(),
            Some("dsql-proxy-irsa"),
            "{ctx}"
        );
        assert_eq!(
            r.form_value("WebIdentityToken").as_deref(),
            Some(WEB_IDENTITY_TOKEN),
            "{ctx}"
        );
        // AssumeRoleWithWebIdentity is an unsigned call.
        assert_eq!(r.header("authorization"), None, "{ctx}");
    }
    assert!(
        sessions_signed_by(&stack, &creds.access_key_id, true) >= 2,
        "{}",
        logs(&stack, &servers)
    );
    assert_no_secrets_logged(&stack, &[&creds], &servers);
    let log = stack.proxy.logs();
    assert!(
        !log.contains(WEB_IDENTITY_TOKEN),
        "the web identity token leaked into the proxy log\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ec2_instance_metadata_v2() {
    let creds = TempCredentials::generate("IMDS", HOUR);
    let imds = ImdsServer::start("dsql-proxy-instance-role", creds.clone());
    let stack = stack(imds.env(), &[&creds]);
    let servers = [&imds.http];

    assert_both_roles_connect(&stack, &servers).await;

    let requests = imds.http.requests();
    let ctx = logs(&stack, &servers);
    let puts: Vec<_> = requests.iter().filter(|r| r.method == "PUT").collect();
    assert!(!puts.is_empty(), "no IMDSv2 session token request\n{ctx}");
    for r in &puts {
        assert_eq!(r.path(), IMDS_TOKEN_PATH, "{ctx}");
        let ttl: u32 = r
            .header(IMDS_TTL_HEADER)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("PUT without a numeric {IMDS_TTL_HEADER}\n{ctx}"));
        assert!((1..=21_600).contains(&ttl), "{ctx}");
    }
    let gets: Vec<_> = requests.iter().filter(|r| r.method == "GET").collect();
    assert!(
        gets.iter().any(|r| r.path() == IMDS_CREDENTIALS_PATH),
        "the role name was never asked for\n{ctx}"
    );
    let role_path = format!("{IMDS_CREDENTIALS_PATH}{}", imds.role);
    assert!(
        gets.iter().any(|r| r.path() == role_path),
        "the role's credentials were never asked for\n{ctx}"
    );
    for r in &gets {
        assert_eq!(
            r.header(IMDS_TOKEN_HEADER),
            Some(imds.token.as_str()),
            "every IMDSv2 GET must carry the session token\n{ctx}"
        );
    }
    assert!(
        sessions_signed_by(&stack, &creds.access_key_id, true) >= 2,
        "{ctx}"
    );
    assert_no_secrets_logged(&stack, &[&creds], &servers);
    assert!(
        !stack.proxy.logs().contains(&imds.token),
        "the IMDSv2 session token leaked into the proxy log\n{ctx}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_profile_files_default_profile() {
    let creds = TempCredentials::generate("PROFILE", HOUR);
    let files = ProfileFiles::new(
        "[default]\nregion = us-east-1\n",
        &format!(
            "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\naws_session_token = {}\n",
            creds.access_key_id, creds.secret_access_key, creds.session_token
        ),
    );
    let stack = stack(files.env(), &[&creds]);

    assert_both_roles_connect(&stack, &[]).await;
    assert!(
        sessions_signed_by(&stack, &creds.access_key_id, true) >= 2,
        "{}",
        logs(&stack, &[])
    );
    assert_no_secrets_logged(&stack, &[&creds], &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_profile_files_named_profile() {
    let decoy = TempCredentials::generate("DECOY", HOUR);
    let creds = TempCredentials::generate("NAMED", HOUR);
    let files = ProfileFiles::new(
        "[default]\nregion = eu-west-1\n\n[profile dsql-proxy]\nregion = us-east-1\n",
        &format!(
            "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n\n\
             [dsql-proxy]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            decoy.access_key_id,
            decoy.secret_access_key,
            creds.access_key_id,
            creds.secret_access_key
        ),
    );
    let env = with_env(files.env(), &[("AWS_PROFILE", "dsql-proxy")]);
    let stack = stack(env, &[&creds]);

    assert_both_roles_connect(&stack, &[]).await;
    assert!(
        sessions_signed_by(&stack, &creds.access_key_id, false) >= 2,
        "the named profile's static keys (no session token) must sign\n{}",
        logs(&stack, &[])
    );
    assert_no_secrets_logged(&stack, &[&creds, &decoy], &[]);
}

// ---------------------------------------------------------------------------
// Rotation without a restart

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_shared_credentials_file_is_used_without_restart() {
    let old = TempCredentials::generate("OLDKEY", HOUR);
    let new = TempCredentials::generate("NEWKEY", HOUR);
    let credentials_file = |c: &TempCredentials| {
        format!(
            "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\n",
            c.access_key_id, c.secret_access_key
        )
    };
    let files = ProfileFiles::new("[default]\n", &credentials_file(&old));
    // The emulator only knows the new key: the old one has been revoked.
    let stack = stack(files.env(), &[&new]);

    let db = expect_fatal(&stack, &[]).await;
    assert_eq!(
        db.code().code(),
        "28P01",
        "the emulator's refusal must reach the client as is: {db:?}\n{}",
        logs(&stack, &[])
    );
    assert!(
        db.message().contains("password authentication failed"),
        "{db:?}"
    );

    files.write_credentials(&credentials_file(&new));
    if let Err(failures) = connect_eventually(&stack, Duration::from_secs(8)).await {
        panic!(
            "after the shared credentials file was rewritten with the new key, {} connects over \
             8 s still failed (last: {:?}): the proxy keeps signing with the old key\n{}",
            failures.len(),
            failures.last(),
            logs(&stack, &[])
        );
    }
    // The emulator logs "session started" as it relays the login, which can
    // reach the client first: give its log a moment to catch up.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while sessions_signed_by(&stack, &new.access_key_id, false) == 0
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        sessions_signed_by(&stack, &new.access_key_id, false) >= 1,
        "{}",
        logs(&stack, &[])
    );
    assert_current_user(&stack, APP_USER, APP_DB, &[]).await;
    assert_no_secrets_logged(&stack, &[&old, &new], &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_container_credentials_are_used_after_the_token_expires() {
    let placeholder = TempCredentials::generate("UNUSED", HOUR);
    let server = ContainerCredentialsServer::start("/creds", None, vec![placeholder]);
    let first = TempCredentials::generate("FIRST", HOUR);
    let second = TempCredentials::generate("SECOND", HOUR);
    // Both keys are valid at the emulator; the point is which one signs.
    let stack = stack_with(
        DsqlProxyOptions {
            env: server.env(None),
            token_expires_in: "3s".into(),
            // Every connect must reach the endpoint with a token: no reuse.
            pool: vec!["enabled = false".into()],
            ..DsqlProxyOptions::default()
        },
        &[&first, &second],
    );
    let servers = [&server.http];
    // Short-lived first credentials (relative to now, the stack is up): the
    // agent hands out the second set from its second answer on.
    let first = TempCredentials {
        expiration: SystemTime::now() + Duration::from_secs(12),
        ..first
    };
    server.set_credentials(vec![first.clone(), second.clone()]);

    assert_current_user(&stack, ADMIN_USER, "postgres", &servers).await;
    assert_eq!(
        sessions_signed_by(&stack, &first.access_key_id, true),
        1,
        "{}",
        logs(&stack, &servers)
    );

    // Keep connecting past the first token's 3 s lifetime; every connect
    // must work, and the later ones must be signed with the second key.
    let until = Instant::now() + Duration::from_secs(8);
    let mut n = 0;
    while Instant::now() < until {
        assert_current_user(&stack, ADMIN_USER, "postgres", &servers).await;
        assert_current_user(&stack, APP_USER, APP_DB, &servers).await;
        n += 2;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let with_second = sessions_signed_by(&stack, &second.access_key_id, true);
    eprintln!(
        "{n} connects, {} signings, {} credentials requests, {with_second} sessions with the rotated key",
        stack.signings(),
        server.http.request_count()
    );
    assert!(
        with_second >= 2,
        "{n} connects over 8 s, but only {with_second} signed with the rotated key\n{}",
        logs(&stack, &servers)
    );
    assert!(
        server.http.request_count() >= 2,
        "{}",
        logs(&stack, &servers)
    );
    assert_no_secrets_logged(&stack, &[&first, &second], &servers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_credentials_file_written_after_startup_is_found() {
    let creds = TempCredentials::generate("LATE", HOUR);
    // The files exist but hold no credentials yet (say, a sidecar has not
    // delivered them).
    let files = ProfileFiles::new("[default]\nregion = us-east-1\n", "");
    let stack = stack(files.env(), &[&creds]);

    let db = expect_fatal(&stack, &[]).await;
    assert_eq!(db.code().code(), "28000", "{db:?}\n{}", logs(&stack, &[]));

    files.write_credentials(&format!(
        "[default]\naws_access_key_id = {}\naws_secret_access_key = {}\naws_session_token = {}\n",
        creds.access_key_id, creds.secret_access_key, creds.session_token
    ));
    if let Err(failures) = connect_eventually(&stack, Duration::from_secs(8)).await {
        panic!(
            "credentials written to the shared credentials file after startup are never found: \
             {} connects over 8 s failed (last: {:?})\n{}",
            failures.len(),
            failures.last(),
            logs(&stack, &[])
        );
    }
    assert_no_secrets_logged(&stack, &[&creds], &[]);
}

// ---------------------------------------------------------------------------
// Failures reach the client, quickly, with the cause

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sts_access_denied_is_a_fatal_naming_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = temp_file(&dir, "web-identity-token", WEB_IDENTITY_TOKEN);
    let creds = TempCredentials::generate("LATER", HOUR);
    let sts = StsServer::start(StsMode::AccessDenied);
    let mut stack = stack(
        sts.env(&token_file, ROLE_ARN, "dsql-proxy-denied"),
        &[&creds],
    );
    let servers = [&sts.http];

    for attempt in 0..2 {
        let started = Instant::now();
        let db = expect_fatal(&stack, &servers).await;
        let ctx = logs(&stack, &servers);
        assert!(
            matches!(db.code().code(), "08001" | "28000"),
            "attempt {attempt}: {db:?}\n{ctx}"
        );
        let m = db.message();
        assert!(
            m.contains("AccessDenied")
                || m.contains(STS_ACCESS_DENIED_MESSAGE)
                || m.contains("STS"),
            "attempt {attempt}: the FATAL must name the cause, got {m:?}\n{ctx}"
        );
        assert!(started.elapsed() < ANSWER_WITHIN, "{ctx}");
    }
    assert!(
        stack.proxy.wait_exit(Duration::ZERO).is_none(),
        "the proxy exited\n{}",
        logs(&stack, &servers)
    );
    let requests = sts.http.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.form_value("Action").as_deref() == Some("AssumeRoleWithWebIdentity")),
        "{}",
        logs(&stack, &servers)
    );

    // Once STS relents, the same proxy works.
    sts.set_mode(StsMode::Success(creds.clone()));
    assert_both_roles_connect(&stack, &servers).await;
    assert_no_secrets_logged(&stack, &[&creds], &servers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expired_credentials_are_a_fatal_saying_so() {
    let creds = TempCredentials::generate_expiring("STALE", SystemTime::now() - HOUR);
    let server = ContainerCredentialsServer::start("/creds", None, vec![creds.clone()]);
    let mut stack = stack(server.env(None), &[&creds]);
    let servers = [&server.http];

    let db = expect_fatal(&stack, &servers).await;
    let ctx = logs(&stack, &servers);
    assert_eq!(db.code().code(), "28000", "{db:?}\n{ctx}");
    assert!(
        db.message().contains("expired"),
        "the FATAL must say the credentials expired: {db:?}\n{ctx}"
    );
    assert!(server.http.request_count() >= 1, "{ctx}");
    assert_eq!(
        sessions_signed_by(&stack, &creds.access_key_id, true),
        0,
        "no token may be signed with expired credentials\n{ctx}"
    );
    assert!(stack.proxy.wait_exit(Duration::ZERO).is_none(), "{ctx}");
    assert_no_secrets_logged(&stack, &[&creds], &servers);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_credentials_anywhere_is_a_fatal_saying_so() {
    let mut stack = stack(isolated_aws_env(), &[]);
    let db = expect_fatal(&stack, &[]).await;
    let ctx = logs(&stack, &[]);
    assert_eq!(db.code().code(), "28000", "{db:?}\n{ctx}");
    assert!(
        db.message().contains("no AWS credentials found"),
        "{db:?}\n{ctx}"
    );
    assert!(stack.proxy.wait_exit(Duration::ZERO).is_none(), "{ctx}");
}

// ---------------------------------------------------------------------------
// Logs

/// With the SDK's own debug logging on (STS request and response bodies
/// carry the web identity token and the credentials), nothing secret
/// reaches the log either.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_stay_out_of_a_debug_log() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = temp_file(&dir, "web-identity-token", WEB_IDENTITY_TOKEN);
    let creds = TempCredentials::generate("DEBUGLOG", HOUR);
    let sts = StsServer::start(StsMode::Success(creds.clone()));
    let env = with_env(
        sts.env(&token_file, ROLE_ARN, "dsql-proxy-debug"),
        &[("DSQL_PROXY_LOG", "debug")],
    );
    let stack = stack(env, &[&creds]);
    let servers = [&sts.http];

    assert_both_roles_connect(&stack, &servers).await;
    let log = stack.proxy.logs();
    assert!(
        log.contains(" DEBUG "),
        "the proxy did not log at debug level\n{log}"
    );
    assert_no_secrets_logged(&stack, &[&creds], &servers);
    assert!(
        !log.contains(WEB_IDENTITY_TOKEN),
        "the web identity token leaked into the proxy log\n{log}"
    );
}
