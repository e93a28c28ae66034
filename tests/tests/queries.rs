//! Real clients through the proxy: tokio-postgres over the extended protocol,
//! COPY, LISTEN/NOTIFY, cancel, large rows and binary data; the same
//! traffic with `--busy-poll`.

use std::time::Duration;

use dsql_proxy_tests::{
    fixture, free_addr, proxy_toml, AuthMethod, PgOptions, PgServer, ProxyOptions, ProxyProcess,
    Stack, APP_DB, APP_USER,
};
use tokio_postgres::SimpleQueryMessage;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_and_extended_queries_and_prepared_statements() {
    let stack = Stack::start();
    let client = stack.connect(APP_USER, APP_DB).await;

    let rows = client
        .simple_query("select 1 as one; select 'two'")
        .await
        .unwrap();
    let values: Vec<String> = rows
        .iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => r.get(0).map(str::to_owned),
            _ => None,
        })
        .collect();
    assert_eq!(values, ["1", "two"]);

    let stmt = client.prepare("select $1::int4 + $2::int4").await.unwrap();
    for i in 0..50 {
        let row = client.query_one(&stmt, &[&i, &1i32]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), i + 1);
    }
    let user: String = client
        .query_one("select current_user::text", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(user, APP_USER);
    let ssl: bool = client
        .query_one(
            "select ssl from pg_stat_ssl where pid = pg_backend_pid()",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(ssl, "the backend leg must be TLS");
    let app: String = client
        .query_one("select current_setting('application_name')", &[])
        .await
        .unwrap()
        .get(0);
    // Off by default: the session shows what the client asked for (none).
    assert_eq!(app, "", "default application_name");

    // Errors inside a session are the server's, passed through untouched.
    let err = client
        .simple_query("select * from no_such_table")
        .await
        .unwrap_err();
    assert_eq!(err.code().map(|c| c.code()), Some("42P01"));
    let row = client.query_one("select 42", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 42);

    let _ = tokio::time::timeout(Duration::from_secs(5), async { drop(client) }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copy_in_and_out() {
    use bytes::Bytes;
    use futures_util::{SinkExt, StreamExt};

    let stack = Stack::start();
    let client = stack.connect(APP_USER, APP_DB).await;
    client
        .batch_execute("create table copy_t (id int, payload text)")
        .await
        .unwrap();
    let sink = client
        .copy_in("copy copy_t from stdin (format csv)")
        .await
        .unwrap();
    futures_util::pin_mut!(sink);
    for chunk in 0..20 {
        let mut data = String::new();
        for i in 0..1000 {
            data.push_str(&format!(
                "{},row-{}\n",
                chunk * 1000 + i,
                "x".repeat(i % 50)
            ));
        }
        sink.send(Bytes::from(data)).await.unwrap();
    }
    let copied = sink.finish().await.unwrap();
    assert_eq!(copied, 20_000);

    let stream = client
        .copy_out("copy (select id from copy_t order by id) to stdout")
        .await
        .unwrap();
    futures_util::pin_mut!(stream);
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.unwrap());
    }
    let text = String::from_utf8(out).unwrap();
    assert_eq!(text.lines().count(), 20_000);
    assert_eq!(text.lines().last(), Some("19999"));

    // A COPY the server rejects midway leaves the session usable.
    let sink = client
        .copy_in("copy copy_t from stdin (format csv)")
        .await
        .unwrap();
    futures_util::pin_mut!(sink);
    sink.send(Bytes::from_static(b"not-a-number,x\n"))
        .await
        .unwrap();
    assert!(sink.finish().await.is_err());
    let n: i64 = client
        .query_one("select count(*) from copy_t", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 20_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listen_notify_across_sessions() {
    use futures_util::StreamExt;
    use tokio_postgres::AsyncMessage;

    let stack = Stack::start();
    let (listener, mut connection) = stack
        .client_config(APP_USER, APP_DB)
        .connect(tokio_postgres::NoTls)
        .await
        .unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let stream = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    tokio::spawn(async move {
        futures_util::pin_mut!(stream);
        while let Some(Ok(msg)) = stream.next().await {
            if let AsyncMessage::Notification(n) = msg {
                let _ = tx.send((n.channel().to_string(), n.payload().to_string()));
            }
        }
    });
    listener.batch_execute("listen proxy_events").await.unwrap();

    let notifier = stack.connect(APP_USER, APP_DB).await;
    for i in 0..3 {
        notifier
            .execute(
                "select pg_notify('proxy_events', $1)",
                &[&format!("event-{i}")],
            )
            .await
            .unwrap();
    }
    for i in 0..3 {
        let (channel, payload) = tokio::time::timeout(Duration::from_secs(10), rx.recv())
            .await
            .expect("notification within 10s")
            .expect("listener alive");
        assert_eq!(channel, "proxy_events");
        assert_eq!(payload, format!("event-{i}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_token_cancels_a_running_query() {
    let stack = Stack::start();
    let client = stack.connect(APP_USER, APP_DB).await;
    let token = client.cancel_token();
    let started = std::time::Instant::now();
    let sleeper = tokio::spawn(async move {
        let r = client.simple_query("select pg_sleep(30)").await;
        (r.map(|_| ()), client)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    token.cancel_query(tokio_postgres::NoTls).await.unwrap();
    let (result, client) = tokio::time::timeout(Duration::from_secs(10), sleeper)
        .await
        .expect("cancel took effect")
        .unwrap();
    let err = result.expect_err("query must be cancelled");
    assert_eq!(err.code().map(|c| c.code()), Some("57014"), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
    // The session survives its cancelled query.
    let row = client.query_one("select 7", &[]).await.unwrap();
    assert_eq!(row.get::<_, i32>(0), 7);

    // A cancel key of a finished session is ignored.
    drop(client);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let _ = token.cancel_query(tokio_postgres::NoTls).await;
    let other = stack.connect(APP_USER, APP_DB).await;
    assert_eq!(
        other
            .query_one("select 1", &[])
            .await
            .unwrap()
            .get::<_, i32>(0),
        1
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_rows_and_binary_data_round_trip() {
    let stack = Stack::start();
    let client = stack.connect(APP_USER, APP_DB).await;
    client
        .batch_execute("create table blobs (id int primary key, data bytea, t text)")
        .await
        .unwrap();
    // Every byte value, several MB, in both directions.
    let blob: Vec<u8> = (0..5 * 1024 * 1024u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let text = "é€𝄞".repeat(400_000); // 3.6 MB of multi-byte UTF-8
    client
        .execute("insert into blobs values (1, $1, $2)", &[&blob, &text])
        .await
        .unwrap();
    let row = client
        .query_one("select data, t, length(data) from blobs where id = 1", &[])
        .await
        .unwrap();
    assert_eq!(row.get::<_, Vec<u8>>(0), blob);
    assert_eq!(row.get::<_, String>(1), text);
    assert_eq!(row.get::<_, i32>(2), blob.len() as i32);

    // Many rows over 1 MB each in one result.
    let rows = client
        .query(
            "select repeat(md5(g::text), 40000) from generate_series(1, 8) g",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 8);
    for r in &rows {
        assert_eq!(r.get::<_, String>(0).len(), 32 * 40_000);
    }
}

/// `--busy-poll`: the relay keeps working (prepared statements, COPY OUT,
/// many round trips), and once the traffic stops the proxy parks instead
/// of polling on: its CPU time barely moves while idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busy_poll_relays_real_traffic_and_goes_quiet_when_idle() {
    let pg = PgServer::start(PgOptions {
        tls: true,
        auth: AuthMethod::ScramSha256,
        ..PgOptions::default()
    });
    let listen = free_addr();
    let mut proxy = ProxyProcess::spawn_with_args(
        &proxy_toml(&pg, listen, &ProxyOptions::default()),
        &["--busy-poll", "200us"],
    );
    proxy.wait_ready(listen, dsql_proxy_tests::proxy::START_TIMEOUT);
    assert!(
        proxy.logs().contains("adaptive busy polling on"),
        "{}",
        proxy.logs()
    );

    let config = fixture::client_config(listen, APP_USER, APP_DB);
    let client = dsql_proxy_tests::connect_with(&config, None)
        .await
        .expect("connects through a busy-polling proxy");
    let stmt = client.prepare("select $1::int8 * 2").await.unwrap();
    for i in 0..3_000i64 {
        let row = client.query_one(&stmt, &[&i]).await.unwrap();
        assert_eq!(row.get::<_, i64>(0), i * 2);
    }
    let rows = client
        .query(
            "select g, repeat('x', 1000) from generate_series(1, 2000) g",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(rows.len(), 2_000);
    assert_eq!(rows[1_999].get::<_, i32>(0), 2_000);

    // Idle with the session still open, then with none.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let open_idle = cpu_seconds_over(proxy.pid(), Duration::from_secs(2)).await;
    drop(client);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let no_sessions = cpu_seconds_over(proxy.pid(), Duration::from_secs(2)).await;
    // A poller that never parked would burn close to 2 s of each.
    for (what, used) in [
        ("with an idle session", open_idle),
        ("with no session", no_sessions),
    ] {
        assert!(
            used < 0.2,
            "the proxy used {used:.3} s of CPU in 2 s {what}: busy polling did not stop"
        );
    }
}

/// CPU seconds (user + system) `pid` uses over `span`.
async fn cpu_seconds_over(pid: u32, span: Duration) -> f64 {
    fn ticks(pid: u32) -> u64 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("proxy stat");
        // Fields after the parenthesised command name: utime is the 12th
        // and stime the 13th of those.
        let after = &stat[stat.rfind(')').expect("stat format") + 2..];
        let fields: Vec<&str> = after.split_whitespace().collect();
        fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
    }
    let before = ticks(pid);
    tokio::time::sleep(span).await;
    // Linux reports these in USER_HZ, 100 per second on every architecture
    // it runs on.
    (ticks(pid) - before) as f64 / 100.0
}
