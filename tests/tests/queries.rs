//! Real clients through the proxy: tokio-postgres over the extended protocol,
//! COPY, LISTEN/NOTIFY, cancel, large rows and binary data.

use std::time::Duration;

use dsql_proxy_tests::{Stack, APP_DB, APP_USER};
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
    assert_eq!(app, "dsql-proxy", "default application_name");

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
