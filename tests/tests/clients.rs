//! Stock command-line clients through the proxy: psql (simple protocol,
//! \copy, Unix socket) and pgbench in every query mode.

use std::process::Output;

use dsql_proxy_tests::{AuthMethod, PgOptions, ProxyOptions, Stack, APP_DB, APP_USER};

fn ok(out: &Output, what: &str, stack: &Stack) -> String {
    assert!(
        out.status.success(),
        "{what} failed: {}\n{}\n--- proxy log ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        stack.proxy.logs()
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn psql_simple_queries_and_copy() {
    let stack = Stack::start();
    let out = stack
        .psql(APP_USER, APP_DB)
        .args(["-qAt", "-c", "create table t (id int, name text)"])
        .output()
        .unwrap();
    ok(&out, "create table", &stack);

    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.csv");
    let rows: String = (0..5000).map(|i| format!("{i},name {i}\n")).collect();
    std::fs::write(&input, &rows).unwrap();
    let output = dir.path().join("out.csv");
    let script = format!(
        "\\copy t from '{}' with (format csv)\n\\copy (select * from t order by id) to '{}' with (format csv)\nselect count(*), sum(id) from t;\n",
        input.display(),
        output.display()
    );
    let script_path = dir.path().join("copy.sql");
    std::fs::write(&script_path, script).unwrap();
    let out = stack
        .psql(APP_USER, APP_DB)
        .args(["-qAt", "-f"])
        .arg(&script_path)
        .output()
        .unwrap();
    let text = ok(&out, "\\copy", &stack);
    assert!(text.contains("5000|12497500"), "{text}");
    assert_eq!(std::fs::read_to_string(&output).unwrap(), rows);

    // Several statements in one simple Query, and an error in the middle.
    let out = stack
        .psql(APP_USER, APP_DB)
        .args(["-qAt", "-c", "select 1; select 1/0; select 3"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("division by zero"));
}

#[test]
fn psql_over_the_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let stack = Stack::start_with(
        PgOptions {
            tls: true,
            auth: AuthMethod::ScramSha256,
            ..PgOptions::default()
        },
        ProxyOptions {
            listen_extra: vec![format!("unix_socket_dir = \"{}\"", dir.path().display())],
            ..ProxyOptions::default()
        },
    );
    let socket = dir.path().join(format!(".s.PGSQL.{}", stack.listen.port()));
    assert!(socket.exists(), "{} missing", socket.display());
    let out = stack
        .psql(APP_USER, APP_DB)
        .env("PGHOST", dir.path())
        .args(["-qAt", "-c", "select 'over-unix'"])
        .output()
        .unwrap();
    assert_eq!(ok(&out, "psql -h DIR", &stack).trim(), "over-unix");
}

#[test]
fn pgbench_in_every_query_mode() {
    let stack = Stack::start();
    let pgbench = stack.pg.pgbench_path();
    let env = |cmd: &mut std::process::Command| {
        cmd.env("PGHOST", "127.0.0.1")
            .env("PGPORT", stack.listen.port().to_string())
            .env("PGUSER", APP_USER)
            .env("PGDATABASE", APP_DB)
            .env("PGSSLMODE", "disable");
    };
    let mut init = std::process::Command::new(&pgbench);
    env(&mut init);
    let out = init.args(["-i", "-s", "1", "-q"]).output().unwrap();
    ok(&out, "pgbench -i", &stack);
    for mode in ["simple", "extended", "prepared"] {
        let mut run = std::process::Command::new(&pgbench);
        env(&mut run);
        let out = run
            .args(["-M", mode, "-c", "4", "-j", "2", "-t", "200", "-n"])
            .output()
            .unwrap();
        let text = ok(&out, &format!("pgbench -M {mode}"), &stack);
        assert!(
            text.contains("number of transactions actually processed: 800/800"),
            "{mode}: {text}"
        );
        assert!(
            text.contains("number of failed transactions: 0"),
            "{mode}: {text}"
        );
    }
    // Reconnect per transaction: exercises the startup path under load.
    let mut run = std::process::Command::new(&pgbench);
    env(&mut run);
    let out = run
        .args(["-C", "-S", "-c", "4", "-j", "2", "-t", "50", "-n"])
        .output()
        .unwrap();
    let text = ok(&out, "pgbench -C", &stack);
    assert!(text.contains("200/200"), "{text}");
}
