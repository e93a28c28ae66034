//! Real backend process ids: a client's BackendKeyData carries the pid of
//! its backend (with a secret the proxy issued), so `pg_backend_pid()`,
//! the pid in a NotificationResponse and `pg_terminate_backend(<pid>)`
//! agree with what the client was told, and cancels still work. Driven
//! with raw wire messages, since drivers keep the key to themselves.

use std::time::Duration;

use dsql_proxy_tests::wire::{self, BackendMessage, PROTOCOL_3_0, PROTOCOL_3_2};
use dsql_proxy_tests::{Stack, APP_DB, APP_USER};
use tokio::net::TcpStream;

/// Generous bound for any single exchange with the proxy.
const T: Duration = Duration::from_secs(15);

/// A session through the proxy: the stream and the BackendKeyData.
struct Raw {
    stream: TcpStream,
    pid: i32,
    secret: Vec<u8>,
}

async fn raw_session(stack: &Stack, version: u32) -> Raw {
    let mut stream = TcpStream::connect(stack.listen).await.unwrap();
    let packet = wire::startup_message(version, &[("user", APP_USER), ("database", APP_DB)]);
    let resp = wire::startup(&mut stream, &packet, T)
        .await
        .unwrap_or_else(|e| panic!("startup: {e}\n{}", stack.proxy.logs()));
    let (pid, secret) = resp.backend_key().expect("a BackendKeyData");
    Raw {
        stream,
        pid,
        secret,
    }
}

impl Raw {
    /// The first column of the only row of `sql`.
    async fn one(&mut self, sql: &str) -> String {
        let msgs = wire::simple_query(&mut self.stream, sql, T).await.unwrap();
        assert_eq!(wire::first_error(&msgs), None, "{sql}: {msgs:?}");
        wire::rows(&msgs)[0][0].clone().expect("a value")
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_key_data_carries_the_real_pid_and_cancels_still_work() {
    let stack = Stack::start();
    for (version, secret_len) in [(PROTOCOL_3_0, 4), (PROTOCOL_3_2, 32)] {
        let mut s = raw_session(&stack, version).await;
        assert_eq!(s.secret.len(), secret_len, "proxy-issued secret");
        let pid: i32 = s.one("select pg_backend_pid()").await.parse().unwrap();
        assert_eq!(s.pid, pid, "BackendKeyData pid = pg_backend_pid()");
        assert!(
            stack.pg.backend_pids().contains(&(pid as u32)),
            "a process of the server"
        );

        // A CancelRequest with that key reaches the query.
        wire::send(&mut s.stream, &wire::query("select pg_sleep(60)"))
            .await
            .unwrap();
        // Wait until the server runs it: a cancel for an idle backend is
        // a no-op.
        let running =
            format!("select count(*) from pg_stat_activity where pid = {pid} and state = 'active'");
        let mut watcher = raw_session(&stack, PROTOCOL_3_0).await;
        while watcher.one(&running).await != "1" {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut cancel = TcpStream::connect(stack.listen).await.unwrap();
        wire::send(&mut cancel, &wire::cancel_request(s.pid, &s.secret))
            .await
            .unwrap();
        let msgs = wire::read_until(&mut s.stream, b'Z', T).await.unwrap();
        let error = wire::first_error(&msgs).expect("the query was cancelled");
        assert_eq!(error.code(), Some("57014"), "{msgs:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_names_the_notifiers_client_visible_pid() {
    let stack = Stack::start();
    let mut listener = raw_session(&stack, PROTOCOL_3_0).await;
    let msgs = wire::simple_query(&mut listener.stream, "listen pids", T)
        .await
        .unwrap();
    assert_eq!(wire::first_error(&msgs), None, "{msgs:?}");
    let mut notifier = raw_session(&stack, PROTOCOL_3_0).await;
    assert_ne!(notifier.pid, listener.pid);
    let msgs = wire::simple_query(&mut notifier.stream, "notify pids, 'hello'", T)
        .await
        .unwrap();
    assert_eq!(wire::first_error(&msgs), None, "{msgs:?}");

    // PostgreSQL tells an idle listener at once.
    let msgs = wire::read_until(&mut listener.stream, b'A', T)
        .await
        .unwrap();
    let notification: &BackendMessage = msgs.last().unwrap();
    let pid = i32::from_be_bytes(notification.body[..4].try_into().unwrap());
    assert_eq!(pid, notifier.pid, "NotificationResponse: {notification:?}");
    assert!(notification.body[4..].starts_with(b"pids\0hello\0"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pg_terminate_backend_with_the_clients_pid_ends_that_session() {
    let stack = Stack::start();
    let mut victim = raw_session(&stack, PROTOCOL_3_0).await;
    let mut admin = raw_session(&stack, PROTOCOL_3_0).await;
    let terminated = admin
        .one(&format!("select pg_terminate_backend({})", victim.pid))
        .await;
    assert_eq!(terminated, "t");
    // The victim hears the server's FATAL and its connection closes.
    let (msgs, _) = wire::read_to_close(&mut victim.stream, T).await;
    let error = wire::first_error(&msgs).expect("a FATAL before the close");
    assert_eq!(error.code(), Some("57P01"), "{msgs:?}");
    // The other session carries on.
    assert_eq!(admin.one("select 1").await, "1");
    // A kill meant for one session is neither moved past nor taken for a
    // failing endpoint.
    let logs = stack.proxy.logs();
    assert!(!logs.contains("session moved"), "{logs}");
    assert!(!logs.contains("demoted"), "{logs}");
}
