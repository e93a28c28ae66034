//! Sessions as real servers and drivers produce them, step by step.
//! Each step is what one side sent before the other answered.

use super::wire::*;
use super::{c, s, Step};

pub fn pgbench_simple(transactions: usize) -> Vec<Step> {
    let mut steps = Vec::new();
    for i in 0..transactions {
        let aid = 1 + i * 7919 % 100_000;
        steps.push(c(&[query(&format!(
            "SELECT abalance FROM pgbench_accounts WHERE aid = {aid};"
        ))]));
        steps.push(s(&[
            row_description(&["abalance"]),
            data_row(&[Some("0")]),
            command_complete("SELECT 1"),
            ready(b'I'),
        ]));
    }
    steps
}

/// libpq's PQprepare then PQexecPrepared, as `pgbench -M prepared` does.
pub fn pgbench_prepared(transactions: usize) -> Vec<Step> {
    let mut steps = vec![
        c(&[
            parse(
                "P_1",
                "SELECT abalance FROM pgbench_accounts WHERE aid = $1;",
                &[],
            ),
            sync(),
        ]),
        s(&[parse_complete(), ready(b'I')]),
    ];
    for i in 0..transactions {
        let aid = (1 + i * 7919 % 100_000).to_string();
        steps.push(c(&[
            bind("", "P_1", &[&aid]),
            describe(b'P', ""),
            execute("", 0),
            sync(),
        ]));
        steps.push(s(&[
            bind_complete(),
            row_description(&["abalance"]),
            data_row(&[Some("0")]),
            command_complete("SELECT 1"),
            ready(b'I'),
        ]));
    }
    steps
}

/// libpq's PQexecParams: the unnamed statement and portal.
pub fn extended_unnamed() -> Vec<Step> {
    vec![
        c(&[
            parse("", "SELECT $1::int", &[23]),
            bind("", "", &["7"]),
            describe(b'P', ""),
            execute("", 0),
            sync(),
        ]),
        s(&[
            parse_complete(),
            bind_complete(),
            row_description(&["int4"]),
            data_row(&[Some("7")]),
            command_complete("SELECT 1"),
            ready(b'I'),
        ]),
    ]
}

/// A pipeline of three groups; the second one's Parse fails, so the server
/// skips its Bind and Execute up to the Sync.
pub fn pipeline_with_error() -> Vec<Step> {
    vec![
        c(&[
            parse("a", "SELECT 1", &[]),
            bind("", "a", &[]),
            execute("", 0),
            sync(),
            parse("b", "SELECT * FROM missing", &[]),
            bind("", "b", &[]),
            execute("", 0),
            sync(),
            parse("c", "SELECT 3", &[]),
            bind("", "c", &[]),
            execute("", 0),
            sync(),
        ]),
        s(&[
            parse_complete(),
            bind_complete(),
            data_row(&[Some("1")]),
            command_complete("SELECT 1"),
            ready(b'I'),
        ]),
        s(&[
            error("ERROR", "42P01", "relation \"missing\" does not exist"),
            ready(b'I'),
        ]),
        s(&[
            parse_complete(),
            bind_complete(),
            data_row(&[Some("3")]),
            command_complete("SELECT 1"),
            ready(b'I'),
        ]),
    ]
}

/// Parse of a name that exists: 42P05, the old statement stays.
pub fn duplicate_name() -> Vec<Step> {
    vec![
        c(&[parse("s1", "SELECT 1", &[]), sync()]),
        s(&[parse_complete(), ready(b'I')]),
        c(&[parse("s1", "SELECT 2", &[]), sync()]),
        s(&[
            error("ERROR", "42P05", "prepared statement \"s1\" already exists"),
            ready(b'I'),
        ]),
    ]
}

/// Unnamed statements: kept, dropped by a Query, dropped by a failed
/// unnamed Parse, kept when an earlier Bind fails before a later Parse.
pub fn unnamed_lifecycle() -> Vec<Vec<Step>> {
    vec![
        vec![
            c(&[parse("", "SELECT 1", &[]), sync()]),
            s(&[parse_complete(), ready(b'I')]),
            c(&[query("SELECT 2")]),
            s(&[
                row_description(&["?column?"]),
                data_row(&[Some("2")]),
                command_complete("SELECT 1"),
                ready(b'I'),
            ]),
        ],
        vec![
            c(&[parse("", "SELECT 1", &[]), sync()]),
            s(&[parse_complete(), ready(b'I')]),
            c(&[parse("", "SELECT nope", &[]), sync()]),
            s(&[
                error("ERROR", "42703", "column \"nope\" does not exist"),
                ready(b'I'),
            ]),
        ],
        vec![
            c(&[parse("", "SELECT 1", &[]), sync()]),
            s(&[parse_complete(), ready(b'I')]),
            c(&[
                bind("", "", &["extra"]),
                execute("", 0),
                parse("", "SELECT 2", &[]),
                sync(),
            ]),
            s(&[
                error(
                    "ERROR",
                    "08P01",
                    "bind message supplies 1 parameters, but prepared statement \"\" requires 0",
                ),
                ready(b'I'),
            ]),
        ],
    ]
}

pub fn close_statement_and_portal() -> Vec<Step> {
    vec![
        c(&[
            parse("s1", "SELECT 1", &[]),
            parse("s2", "SELECT 2", &[]),
            bind("p1", "s1", &[]),
            execute("p1", 1),
            sync(),
        ]),
        s(&[
            parse_complete(),
            parse_complete(),
            bind_complete(),
            data_row(&[Some("1")]),
            portal_suspended(),
            ready(b'I'),
        ]),
        c(&[
            close(b'P', "p1"),
            close(b'S', "s1"),
            close(b'S', "never_existed"),
            describe(b'S', "s2"),
            sync(),
        ]),
        s(&[
            close_complete(),
            close_complete(),
            close_complete(),
            parameter_description(&[]),
            row_description(&["?column?"]),
            ready(b'I'),
        ]),
    ]
}

/// Parse + Flush (asyncpg's way to prepare), answered before any Sync.
pub fn flush_then_sync() -> Vec<Step> {
    vec![
        c(&[parse("q", "SELECT 1", &[]), describe(b'S', "q"), flush()]),
        s(&[
            parse_complete(),
            parameter_description(&[]),
            row_description(&["?column?"]),
        ]),
        c(&[sync()]),
        s(&[ready(b'I')]),
    ]
}

pub fn copy_in_simple() -> Vec<Step> {
    vec![
        c(&[query("COPY t FROM STDIN")]),
        s(&[copy_in_response(1)]),
        c(&[copy_data(b"1\n"), copy_data(b"2\n"), copy_done()]),
        s(&[command_complete("COPY 2"), ready(b'I')]),
    ]
}

/// COPY FROM STDIN through PQexecParams: the Sync sent with the Execute is
/// swallowed by the COPY; libpq sends another after CopyDone.
pub fn copy_in_extended() -> Vec<Step> {
    vec![
        c(&[
            parse("", "COPY t FROM STDIN", &[]),
            bind("", "", &[]),
            describe(b'P', ""),
            execute("", 0),
            sync(),
        ]),
        s(&[
            parse_complete(),
            bind_complete(),
            no_data(),
            copy_in_response(1),
        ]),
        c(&[copy_data(b"1\n"), copy_done(), sync()]),
        s(&[command_complete("COPY 1"), ready(b'I')]),
    ]
}

pub fn copy_out() -> Vec<Step> {
    vec![
        c(&[query("COPY t TO STDOUT")]),
        s(&[
            copy_out_response(1),
            copy_data(b"1\n"),
            copy_data(b"2\n"),
            copy_done(),
            command_complete("COPY 2"),
            ready(b'I'),
        ]),
    ]
}

pub fn copy_both() -> Vec<Step> {
    vec![
        c(&[query("START_REPLICATION SLOT s LOGICAL 0/0")]),
        s(&[copy_both_response(), copy_data(b"w...")]),
        c(&[copy_data(b"r..."), copy_done()]),
        s(&[copy_done(), command_complete("COPY 0"), ready(b'I')]),
    ]
}

/// A bad row: the simple-protocol server answers at once while the client
/// is still sending data, which the server then ignores.
pub fn copy_in_error_simple() -> Vec<Step> {
    vec![
        c(&[query("COPY t FROM STDIN")]),
        s(&[copy_in_response(1)]),
        c(&[copy_data(b"x\n")]),
        s(&[
            error("ERROR", "22P02", "invalid input syntax for type integer"),
            ready(b'I'),
        ]),
        c(&[copy_data(b"2\n"), copy_done()]),
    ]
}

/// The same in extended mode: after the error the server skips to Sync.
pub fn copy_in_error_extended() -> Vec<Step> {
    vec![
        c(&[
            parse("", "COPY t FROM STDIN", &[]),
            bind("", "", &[]),
            execute("", 0),
            sync(),
        ]),
        s(&[parse_complete(), bind_complete(), copy_in_response(1)]),
        c(&[copy_data(b"x\n")]),
        s(&[error(
            "ERROR",
            "22P02",
            "invalid input syntax for type integer",
        )]),
        c(&[copy_data(b"2\n"), copy_fail("client gave up"), sync()]),
        s(&[ready(b'I')]),
    ]
}

/// Two COPY FROM STDIN in one simple Query.
pub fn copy_in_twice() -> Vec<Step> {
    vec![
        c(&[query("COPY a FROM STDIN; COPY b FROM STDIN")]),
        s(&[copy_in_response(1)]),
        c(&[copy_data(b"1\n"), copy_done()]),
        s(&[command_complete("COPY 1"), copy_in_response(1)]),
        c(&[copy_data(b"2\n"), copy_done()]),
        s(&[command_complete("COPY 1"), ready(b'I')]),
    ]
}

pub fn function_call_and_empty_query() -> Vec<Step> {
    vec![
        c(&[function_call(954, "42")]),
        s(&[function_call_response(Some("ok")), ready(b'I')]),
        c(&[query("")]),
        s(&[empty_query(), ready(b'I')]),
        c(&[query(";")]),
        s(&[empty_query(), ready(b'I')]),
    ]
}

/// Notices, notifications and ParameterStatus in the middle of results and
/// at idle.
pub fn asynchronous_messages() -> Vec<Step> {
    vec![
        c(&[query("SELECT pg_notify('ch', 'x'), 1")]),
        s(&[
            row_description(&["pg_notify", "?column?"]),
            notice("something to say"),
            data_row(&[Some(""), Some("1")]),
            parameter_status("in_hot_standby", "off"),
            command_complete("SELECT 1"),
            ready(b'I'),
            notification(4242, "ch", "x"),
        ]),
        s(&[
            notice("later"),
            parameter_status("TimeZone", "Europe/Paris"),
        ]),
    ]
}

pub fn fatal_at_idle() -> Vec<Step> {
    vec![
        c(&[query("SELECT 1")]),
        s(&[
            data_row(&[Some("1")]),
            command_complete("SELECT 1"),
            ready(b'I'),
        ]),
        s(&[error(
            "FATAL",
            "57P01",
            "terminating connection due to administrator command",
        )]),
    ]
}

pub fn failed_transaction() -> Vec<Step> {
    vec![
        c(&[query("BEGIN; SELECT 1/0")]),
        s(&[
            command_complete("BEGIN"),
            row_description(&["?column?"]),
            error("ERROR", "22012", "division by zero"),
            ready(b'E'),
        ]),
        c(&[query("SELECT 1")]),
        s(&[
            error("ERROR", "25P02", "current transaction is aborted"),
            ready(b'E'),
        ]),
        c(&[query("ROLLBACK")]),
        s(&[command_complete("ROLLBACK"), ready(b'I')]),
    ]
}

/// An implicit transaction (a pipeline without Sync in between) that fails:
/// after the Sync the session is idle again.
pub fn failed_implicit_transaction() -> Vec<Step> {
    vec![
        c(&[
            parse("", "INSERT INTO t VALUES (1)", &[]),
            bind("", "", &[]),
            execute("", 0),
            parse("", "SELECT 1/0", &[]),
            bind("", "", &[]),
            execute("", 0),
            sync(),
        ]),
        s(&[
            parse_complete(),
            bind_complete(),
            command_complete("INSERT 0 1"),
            parse_complete(),
            bind_complete(),
            error("ERROR", "22012", "division by zero"),
            ready(b'I'),
        ]),
    ]
}

/// BEGIN inside a pipeline, then a failure: the implicit transaction became
/// an explicit one, so the Sync's ReadyForQuery says `E`.
pub fn failed_pipeline_with_begin() -> Vec<Step> {
    vec![
        c(&[
            parse("", "BEGIN", &[]),
            bind("", "", &[]),
            execute("", 0),
            parse("", "SELECT 1/0", &[]),
            bind("", "", &[]),
            execute("", 0),
            sync(),
        ]),
        s(&[
            parse_complete(),
            bind_complete(),
            command_complete("BEGIN"),
            parse_complete(),
            bind_complete(),
            error("ERROR", "22012", "division by zero"),
            ready(b'E'),
        ]),
        c(&[query("ROLLBACK")]),
        s(&[command_complete("ROLLBACK"), ready(b'I')]),
    ]
}

pub fn deallocate_through_sql() -> Vec<Step> {
    vec![
        c(&[
            parse("s1", "SELECT 1", &[]),
            parse("s2", "SELECT 2", &[]),
            sync(),
        ]),
        s(&[parse_complete(), parse_complete(), ready(b'I')]),
        c(&[query("DEALLOCATE s1")]),
        s(&[command_complete("DEALLOCATE"), ready(b'I')]),
    ]
}

pub fn state_changes() -> Vec<Step> {
    vec![
        c(&[query(
            "SET search_path = app, public; SET app.tenant = 't1'",
        )]),
        s(&[
            command_complete("SET"),
            command_complete("SET"),
            ready(b'I'),
        ]),
        c(&[
            parse(
                "setter",
                "SELECT pg_catalog.set_config('app.user_id', $1, false)",
                &[],
            ),
            sync(),
        ]),
        s(&[parse_complete(), ready(b'I')]),
    ]
}

pub fn bind_flagged_statement() -> Vec<Step> {
    vec![
        c(&[bind("", "setter", &["42"]), execute("", 0), sync()]),
        s(&[
            bind_complete(),
            data_row(&[Some("42")]),
            command_complete("SELECT 1"),
            ready(b'I'),
        ]),
    ]
}

pub fn terminate_session() -> Vec<Step> {
    vec![
        c(&[query("SELECT 1")]),
        s(&[
            data_row(&[Some("1")]),
            command_complete("SELECT 1"),
            ready(b'I'),
        ]),
        c(&[terminate()]),
    ]
}

/// Extended messages then a simple Query before any Sync: fine without
/// errors.
pub fn mixed_group() -> Vec<Step> {
    vec![
        c(&[parse("m", "SELECT 1", &[]), query("SELECT 2")]),
        s(&[
            parse_complete(),
            row_description(&["?column?"]),
            data_row(&[Some("2")]),
            command_complete("SELECT 1"),
            ready(b'I'),
        ]),
        c(&[sync()]),
        s(&[ready(b'I')]),
    ]
}

pub fn mixed_group_with_error() -> Vec<Step> {
    vec![
        c(&[parse("m", "SELECT nope", &[]), query("SELECT 2")]),
        s(&[error("ERROR", "42703", "column \"nope\" does not exist")]),
    ]
}

pub fn pipelined_into_copy() -> Vec<Step> {
    vec![
        c(&[query("COPY t FROM STDIN"), query("SELECT 1")]),
        s(&[copy_in_response(1)]),
    ]
}

pub fn unexpected_ready() -> Vec<Step> {
    vec![s(&[ready(b'I')])]
}

pub fn broken_client_frame() -> Vec<Step> {
    vec![
        c(&[query("SELECT 1")]),
        c(&[vec![b'Q', 0, 0, 0, 2]]),
        s(&[command_complete("SELECT 1"), ready(b'I')]),
    ]
}

pub fn broken_server_frame() -> Vec<Step> {
    vec![
        c(&[query("SELECT 1")]),
        s(&[vec![b'D', 0xff, 0xff, 0xff, 0xf0]]),
    ]
}

/// Every scenario, by name, for the split-invariance property.
pub fn all() -> Vec<(String, Vec<Step>)> {
    let mut all: Vec<(String, Vec<Step>)> = vec![
        ("pgbench_simple".into(), pgbench_simple(3)),
        ("pgbench_prepared".into(), pgbench_prepared(3)),
        ("extended_unnamed".into(), extended_unnamed()),
        ("pipeline_with_error".into(), pipeline_with_error()),
        ("duplicate_name".into(), duplicate_name()),
        (
            "close_statement_and_portal".into(),
            close_statement_and_portal(),
        ),
        ("flush_then_sync".into(), flush_then_sync()),
        ("copy_in_simple".into(), copy_in_simple()),
        ("copy_in_extended".into(), copy_in_extended()),
        ("copy_out".into(), copy_out()),
        ("copy_both".into(), copy_both()),
        ("copy_in_error_simple".into(), copy_in_error_simple()),
        ("copy_in_error_extended".into(), copy_in_error_extended()),
        ("copy_in_twice".into(), copy_in_twice()),
        (
            "function_call_and_empty_query".into(),
            function_call_and_empty_query(),
        ),
        ("asynchronous_messages".into(), asynchronous_messages()),
        ("fatal_at_idle".into(), fatal_at_idle()),
        ("failed_transaction".into(), failed_transaction()),
        (
            "failed_implicit_transaction".into(),
            failed_implicit_transaction(),
        ),
        (
            "failed_pipeline_with_begin".into(),
            failed_pipeline_with_begin(),
        ),
        ("deallocate_through_sql".into(), deallocate_through_sql()),
        (
            "state_changes_then_bind".into(),
            [state_changes(), bind_flagged_statement()].concat(),
        ),
        ("terminate_session".into(), terminate_session()),
        ("mixed_group".into(), mixed_group()),
        ("mixed_group_with_error".into(), mixed_group_with_error()),
        ("pipelined_into_copy".into(), pipelined_into_copy()),
        ("unexpected_ready".into(), unexpected_ready()),
        ("broken_client_frame".into(), broken_client_frame()),
        ("broken_server_frame".into(), broken_server_frame()),
    ];
    for (i, steps) in unnamed_lifecycle().into_iter().enumerate() {
        all.push((format!("unnamed_lifecycle_{i}"), steps));
    }
    all
}
