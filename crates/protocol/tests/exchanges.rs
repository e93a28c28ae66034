//! The snapshot and restore exchanges: what they send, and how they read
//! real-shaped answers in any split, with bounds.

mod common;

use bytes::BytesMut;
use common::wire::*;
use common::{c, feed, s, tracker};
use dsql_proxy_protocol::frame::split_message;
use dsql_proxy_protocol::tracking::restore::{encode_restore, RestoreDecoder, RestoreOutcome};
use dsql_proxy_protocol::tracking::snapshot::{
    encode_snapshot, session_pins, Pins, SessionSnapshot, Setting, SnapshotDecoder, SnapshotLimits,
    SnapshotOutcome, SqlPrepared, UnnamedReparse,
};
use dsql_proxy_protocol::tracking::{ParameterValues, SessionTracker, TrackerLimits};
use dsql_proxy_protocol::ProtocolError;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Frontend messages in `bytes`: (tag, body).
fn messages(bytes: &[u8]) -> Vec<(u8, Vec<u8>)> {
    let mut buf = BytesMut::from(bytes);
    let mut out = Vec::new();
    while let Some(m) = split_message(&mut buf, 1 << 20).unwrap() {
        out.push((m.tag, m.body.to_vec()));
    }
    assert!(buf.is_empty());
    out
}

fn text(body: &[u8]) -> String {
    String::from_utf8(body[..body.len() - 1].to_vec()).unwrap()
}

/// A tracker that saw: SET app.tenant, a named and an unnamed Parse.
fn busy_tracker() -> SessionTracker {
    let mut t = tracker();
    feed(
        &mut t,
        &[
            c(&[query("SET app.tenant = 't1'")]),
            s(&[command_complete("SET"), ready(b'I')]),
            c(&[
                parse("_pg3_0", "SELECT $1::int", &[21]),
                parse("", "SELECT now()", &[]),
                sync(),
            ]),
            s(&[parse_complete(), parse_complete(), ready(b'I')]),
        ],
    );
    assert!(t.at_idle_point());
    t
}

#[test]
fn the_snapshot_pipelines_its_queries_and_reparses_the_unnamed_statement() {
    let t = busy_tracker();
    let mut out = BytesMut::new();
    encode_snapshot(&mut out, &t).unwrap();
    let sent = messages(&out);
    let tags: Vec<u8> = sent.iter().map(|(tag, _)| *tag).collect();
    assert_eq!(tags, b"QQQQQQPS");
    let settings = text(&sent[0].1);
    assert!(settings.starts_with("SELECT name, setting FROM pg_catalog.pg_settings"));
    assert!(
        settings.contains("unnest(ARRAY[E'app.tenant']"),
        "{settings}"
    );
    assert!(text(&sent[1].1).contains("pg_prepared_statements"));
    assert!(text(&sent[2].1).contains("pg_listening_channels"));
    assert!(text(&sent[3].1).contains("is_holdable"));
    assert!(text(&sent[4].1).contains("pg_my_temp_schema"));
    assert!(text(&sent[5].1).contains("advisory"));
    let mut parse_message = vec![b'P'];
    parse_message.extend_from_slice(&((sent[6].1.len() + 4) as i32).to_be_bytes());
    parse_message.extend_from_slice(&sent[6].1);
    assert_eq!(parse_message, parse("", "SELECT now()", &[]));

    // Without custom settings or an unnamed statement: plain queries only.
    let mut out = BytesMut::new();
    encode_snapshot(&mut out, &tracker()).unwrap();
    let sent = messages(&out);
    assert_eq!(sent.len(), 6);
    assert!(!text(&sent[0].1).contains("unnest"));
}

/// The answer PostgreSQL 15 gives for a session with settings, SQL and
/// protocol statements, a temp table, and no cursors support pretended.
fn snapshot_answer() -> Vec<u8> {
    concat(&[
        row_description(&["name", "setting"]),
        data_row(&[
            Some("search_path"),
            Some("\"My Schema\", \"$user\", public"),
        ]),
        notice("a notice in between"),
        data_row(&[Some("statement_timeout"), Some("5000")]),
        data_row(&[Some("session_authorization"), Some("alice")]),
        data_row(&[Some("role"), Some("bob")]),
        data_row(&[Some("app.tenant"), Some("t1")]),
        command_complete("SELECT 5"),
        ready(b'I'),
        notification(77, "ch", "payload"),
        row_description(&["name", "from_sql", "statement"]),
        data_row(&[
            Some("sq2"),
            Some("t"),
            Some("PREPARE sq2 AS SELECT 2; PREPARE sq3 AS SELECT 3"),
        ]),
        data_row(&[Some("_pg3_0"), Some("f"), Some("SELECT $1::int")]),
        command_complete("SELECT 2"),
        ready(b'I'),
        row_description(&["count"]),
        data_row(&[Some("0")]),
        command_complete("SELECT 1"),
        ready(b'I'),
        error("ERROR", "0A000", "WITH HOLD cursors are not supported"),
        ready(b'I'),
        row_description(&["count"]),
        data_row(&[Some("2")]),
        command_complete("SELECT 1"),
        ready(b'I'),
        parameter_status("in_hot_standby", "off"),
        row_description(&["count"]),
        data_row(&[Some("0")]),
        command_complete("SELECT 1"),
        ready(b'I'),
        parse_complete(),
        ready(b'I'),
    ])
}

fn limits() -> SnapshotLimits {
    SnapshotLimits {
        max_message: 64 * 1024,
        max_state: 256 * 1024,
    }
}

/// Feeds `answer` then `after` in random pieces; returns the outcome, the
/// forwarded bytes and the bytes not consumed.
fn decode_snapshot(
    rng: &mut StdRng,
    plan_tracker: &SessionTracker,
    limits: SnapshotLimits,
    answer: &[u8],
) -> (SnapshotOutcome, Vec<u8>, Vec<u8>) {
    let mut out = BytesMut::new();
    let plan = encode_snapshot(&mut out, plan_tracker).unwrap();
    let mut decoder = SnapshotDecoder::new(plan, limits);
    let mut stream = answer.to_vec();
    stream.extend_from_slice(&notification(77, "ch", "after"));
    let mut forward = Vec::new();
    let mut left = Vec::new();
    let mut at = 0;
    while at < stream.len() {
        let n = rng.gen_range(1..=17.min(stream.len() - at));
        let piece = &stream[at..at + n];
        at += n;
        if decoder.is_done() {
            left.extend_from_slice(piece);
            continue;
        }
        let used = decoder.feed(piece).unwrap();
        forward.extend(decoder.take_forward());
        left.extend_from_slice(&piece[used..]);
    }
    assert!(decoder.is_done());
    (decoder.finish().unwrap(), forward, left)
}

#[test]
fn the_snapshot_answer_decodes_in_any_split_and_stops_at_its_end() {
    let mut rng = StdRng::seed_from_u64(3);
    let t = busy_tracker();
    for _ in 0..200 {
        let (outcome, forward, left) = decode_snapshot(&mut rng, &t, limits(), &snapshot_answer());
        let SnapshotOutcome::Taken(snapshot) = outcome else {
            panic!("{outcome:?}")
        };
        assert_eq!(
            snapshot.settings,
            vec![
                Setting {
                    name: b"search_path".to_vec(),
                    value: b"\"My Schema\", \"$user\", public".to_vec()
                },
                Setting {
                    name: b"statement_timeout".to_vec(),
                    value: b"5000".to_vec()
                },
                Setting {
                    name: b"app.tenant".to_vec(),
                    value: b"t1".to_vec()
                },
            ]
        );
        assert_eq!(snapshot.session_user.as_deref(), Some(&b"alice"[..]));
        assert_eq!(snapshot.role.as_deref(), Some(&b"bob"[..]));
        assert_eq!(
            snapshot.sql_prepared,
            vec![SqlPrepared {
                name: b"sq2".to_vec(),
                statement: b"PREPARE sq2 AS SELECT 2".to_vec()
            }]
        );
        assert_eq!(snapshot.protocol_statements, vec![b"_pg3_0".to_vec()]);
        assert_eq!(snapshot.pins, Pins::TEMP_TABLE);
        assert_eq!(snapshot.unnamed, UnnamedReparse::Done);
        assert_eq!(
            forward,
            concat(&[
                notice("a notice in between"),
                notification(77, "ch", "payload"),
                parameter_status("in_hot_standby", "off"),
            ])
        );
        assert_eq!(left, notification(77, "ch", "after"));
    }
}

#[test]
fn snapshot_failures_are_classified() {
    let mut rng = StdRng::seed_from_u64(4);
    let t = busy_tracker();
    // Rows past the state limit: read to the end, kept nothing.
    let small = SnapshotLimits {
        max_message: 64 * 1024,
        max_state: 40,
    };
    let (outcome, _, left) = decode_snapshot(&mut rng, &t, small, &snapshot_answer());
    assert_eq!(outcome, SnapshotOutcome::TooLarge);
    assert_eq!(left, notification(77, "ch", "after"));
    // A row over the message limit: the same.
    let tiny = SnapshotLimits {
        max_message: 8,
        max_state: 1 << 20,
    };
    let answer = concat(&[
        data_row(&[Some("search_path"), Some("a, b, c, d, e, f, g")]),
        ready(b'I'),
    ]);
    let mut out = BytesMut::new();
    let plan = encode_snapshot(&mut out, &tracker()).unwrap();
    let mut decoder = SnapshotDecoder::new(plan, tiny);
    decoder.feed(&answer).unwrap();
    assert!(!decoder.is_done());
    // A FATAL ends it at once.
    let answer = concat(&[
        row_description(&["name", "setting"]),
        error(
            "FATAL",
            "57P01",
            "terminating connection due to administrator command",
        ),
    ]);
    let mut decoder = SnapshotDecoder::new(plan, limits());
    assert_eq!(decoder.feed(&answer).unwrap(), answer.len());
    let Some(SnapshotOutcome::Fatal(fields)) = decoder.finish() else {
        panic!()
    };
    assert_eq!(fields.code(), "57P01");
    // Bytes no server sends.
    let mut decoder = SnapshotDecoder::new(plan, limits());
    assert!(decoder.feed(&[b'D', 0, 0, 0, 2]).is_err());
    let mut decoder = SnapshotDecoder::new(plan, tiny);
    assert!(matches!(
        decoder.feed(&notice("a notice longer than eight bytes")),
        Err(ProtocolError::MessageTooLarge { tag: b'N', .. })
    ));
}

fn answer_all(queries: usize, pin_errors: &[(&str, &str)]) -> Vec<u8> {
    let mut parts = Vec::new();
    for i in 0..queries {
        match pin_errors.get(i) {
            Some((severity, code)) if !code.is_empty() => {
                parts.push(error(severity, code, "no"));
            }
            _ => {
                parts.push(row_description(&["x"]));
                parts.push(command_complete("SELECT 0"));
            }
        }
        parts.push(ready(b'I'));
    }
    concat(&parts)
}

#[test]
fn missing_features_mean_no_pin_and_other_errors_pin() {
    let mut out = BytesMut::new();
    let plan = encode_snapshot(&mut out, &tracker()).unwrap();
    for (errors, pins) in [
        (
            vec![
                ("", ""),
                ("", ""),
                ("ERROR", "42883"),
                ("ERROR", "42P01"),
                ("ERROR", "42704"),
                ("ERROR", "0A000"),
            ],
            Pins::default(),
        ),
        (
            vec![("", ""), ("", ""), ("ERROR", "XX000")],
            Pins::UNCLASSIFIABLE,
        ),
        (vec![("ERROR", "42501")], Pins::UNCLASSIFIABLE),
        (vec![("", ""), ("ERROR", "0A000")], Pins::UNCLASSIFIABLE),
    ] {
        let mut decoder = SnapshotDecoder::new(plan, limits());
        decoder.feed(&answer_all(6, &errors)).unwrap();
        let Some(SnapshotOutcome::Taken(snapshot)) = decoder.finish() else {
            panic!()
        };
        assert_eq!(snapshot.pins, pins, "{errors:?}");
    }
    // A SQL PREPARE whose text cannot be isolated pins.
    let mut decoder = SnapshotDecoder::new(plan, limits());
    decoder
        .feed(&concat(&[
            ready(b'I'),
            data_row(&[
                Some("p"),
                Some("t"),
                Some("PREPARE p AS SELECT 'a\\'; PREPARE q AS SELECT 1"),
            ]),
            ready(b'I'),
            answer_all(4, &[]),
        ]))
        .unwrap();
    let Some(SnapshotOutcome::Taken(snapshot)) = decoder.finish() else {
        panic!()
    };
    assert_eq!(snapshot.pins, Pins::UNCLASSIFIABLE);
}

#[test]
fn applying_a_snapshot_reconciles_and_cleans() {
    let mut t = busy_tracker();
    assert!(t.is_dirty());
    let mut out = BytesMut::new();
    let plan = encode_snapshot(&mut out, &t).unwrap();
    let mut decoder = SnapshotDecoder::new(plan, limits());
    decoder
        .feed(&concat(&[
            answer_all(6, &[]),
            error("ERROR", "42P01", "relation \"gone\" does not exist"),
            ready(b'I'),
        ]))
        .unwrap();
    let Some(SnapshotOutcome::Taken(snapshot)) = decoder.finish() else {
        panic!()
    };
    assert!(matches!(snapshot.unnamed, UnnamedReparse::Failed(_)));
    // The server has no protocol statements: DEALLOCATE ALL ran.
    let reconciled = t.apply_snapshot(&snapshot);
    assert_eq!(reconciled.removed, 1);
    assert!(!t.is_dirty());
    assert!(t.unnamed_statement().is_none());
    assert_eq!(t.named_statement_count(), 0);
    assert_eq!(
        session_pins(&snapshot, &t, reconciled.unknown, 256 * 1024),
        Pins::default()
    );
    assert_eq!(
        session_pins(&snapshot, &t, 1, 256 * 1024),
        Pins::UNCLASSIFIABLE
    );
    assert_eq!(session_pins(&snapshot, &t, 0, 10), Pins::STATE_TOO_LARGE);
    assert_eq!(
        Pins::ALL.iter().map(|(_, l)| *l).collect::<Vec<_>>(),
        [
            "listen",
            "hold_cursor",
            "temp_table",
            "advisory_lock",
            "state_too_large",
            "unclassifiable"
        ]
    );
    assert_eq!(
        (Pins::LISTEN | Pins::TEMP_TABLE)
            .labels()
            .collect::<Vec<_>>(),
        ["listen", "temp_table"]
    );
}

fn snapshot_of(settings: &[(&str, &str)], user: &str, role: &str) -> SessionSnapshot {
    SessionSnapshot {
        settings: settings
            .iter()
            .map(|(n, v)| Setting {
                name: n.as_bytes().to_vec(),
                value: v.as_bytes().to_vec(),
            })
            .collect(),
        session_user: Some(user.as_bytes().to_vec()),
        role: Some(role.as_bytes().to_vec()),
        sql_prepared: vec![SqlPrepared {
            name: b"sq1".to_vec(),
            statement: b"PREPARE sq1(int) AS SELECT $1 + 1".to_vec(),
        }],
        protocol_statements: vec![b"_pg3_0".to_vec()],
        pins: Pins::default(),
        unnamed: UnnamedReparse::Done,
    }
}

#[test]
fn the_restore_sets_authorization_first_role_last_and_replays_parses_exactly() {
    let t = busy_tracker();
    let snapshot = snapshot_of(
        &[
            ("search_path", "\"My Schema\", \"$user\", public"),
            ("client_encoding", "LATIN1"),
            ("app.tenant", "O'Brien \\ x"),
        ],
        "alice",
        "bob",
    );
    let mut out = BytesMut::new();
    let plan = encode_restore(&mut out, &snapshot, &t, b"postgres").unwrap();
    assert_eq!(plan.settings, 5);
    assert_eq!(plan.statements, 3);
    let sent = messages(&out);
    let tags: Vec<u8> = sent.iter().map(|(tag, _)| *tag).collect();
    assert_eq!(tags, b"QQQPPS");
    assert_eq!(
        text(&sent[0].1),
        "SELECT pg_catalog.set_config(E'client_encoding', E'LATIN1', false)"
    );
    assert_eq!(
        text(&sent[1].1),
        "SELECT pg_catalog.set_config(E'session_authorization', E'alice', false);\
         SELECT pg_catalog.set_config(E'search_path', E'\"My Schema\", \"$user\", public', false);\
         SELECT pg_catalog.set_config(E'app.tenant', E'O''Brien \\\\ x', false);\
         SELECT pg_catalog.set_config(E'role', E'bob', false)"
    );
    assert_eq!(text(&sent[2].1), "PREPARE sq1(int) AS SELECT $1 + 1");
    let replayed: Vec<Vec<u8>> = sent[3..5]
        .iter()
        .map(|(tag, body)| {
            let mut m = vec![*tag];
            m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
            m.extend_from_slice(body);
            m
        })
        .collect();
    assert_eq!(
        replayed,
        vec![
            parse("_pg3_0", "SELECT $1::int", &[21]),
            parse("", "SELECT now()", &[])
        ]
    );

    // Logged in as the session user, no role: only the settings.
    let snapshot = snapshot_of(&[("work_mem", "8192")], "postgres", "none");
    let mut out = BytesMut::new();
    let plan = encode_restore(&mut out, &snapshot, &tracker(), b"postgres").unwrap();
    assert_eq!(plan.settings, 1);
    assert_eq!(messages(&out).len(), 2);
}

#[test]
fn a_statement_too_large_to_keep_cannot_be_restored() {
    let limits = TrackerLimits {
        max_capture: 16,
        ..TrackerLimits::default()
    };
    let mut t = SessionTracker::new(limits, ParameterValues::new());
    t.observe_client(&concat(&[
        parse("big", "SELECT 'a long statement'", &[]),
        sync(),
    ]));
    t.observe_server(&concat(&[parse_complete(), ready(b'I')]));
    let mut out = BytesMut::new();
    assert_eq!(
        encode_restore(&mut out, &snapshot_of(&[], "u", "none"), &t, b"u"),
        None
    );
    assert!(out.is_empty());
    // An unnamed statement too large to keep: no snapshot either, as its
    // Queries would drop the statement from the live backend.
    t.observe_client(&concat(&[
        parse("", "SELECT 'another long statement'", &[]),
        sync(),
    ]));
    t.observe_server(&concat(&[parse_complete(), ready(b'I')]));
    assert!(t.unnamed_statement().is_some());
    assert_eq!(encode_snapshot(&mut out, &t), None);
    assert!(out.is_empty());
}

#[test]
fn the_restore_answer_gives_parameters_or_the_first_error() {
    let t = busy_tracker();
    let snapshot = snapshot_of(&[("TimeZone", "Europe/Paris")], "alice", "none");
    let mut out = BytesMut::new();
    let plan = encode_restore(&mut out, &snapshot, &t, b"postgres").unwrap();
    let mut startup = ParameterValues::new();
    startup.set(b"TimeZone", b"UTC");
    startup.set(b"is_superuser", b"on");
    let success = concat(&[
        row_description(&["set_config"]),
        data_row(&[Some("alice")]),
        command_complete("SELECT 1"),
        parameter_status("is_superuser", "off"),
        parameter_status("session_authorization", "alice"),
        row_description(&["set_config"]),
        data_row(&[Some("Europe/Paris")]),
        command_complete("SELECT 1"),
        parameter_status("TimeZone", "Europe/Paris"),
        ready(b'I'),
        command_complete("PREPARE"),
        ready(b'I'),
        parse_complete(),
        parse_complete(),
        ready(b'I'),
    ]);
    let mut rng = StdRng::seed_from_u64(5);
    for _ in 0..100 {
        let mut decoder = RestoreDecoder::new(plan, startup.clone(), 4096);
        let mut stream = success.clone();
        stream.extend_from_slice(b"after");
        let mut at = 0;
        while !decoder.is_done() {
            let n = rng.gen_range(1..=11.min(stream.len() - at));
            at += decoder.feed(&stream[at..at + n]).unwrap();
        }
        assert_eq!(&stream[at..], b"after");
        let Some(RestoreOutcome::Restored { parameters }) = decoder.finish() else {
            panic!()
        };
        assert_eq!(parameters.get(b"TimeZone"), Some(&b"Europe/Paris"[..]));
        assert_eq!(parameters.get(b"is_superuser"), Some(&b"off"[..]));
        // What the client must be told: what differs from what it saw.
        let mut client = tracker();
        let mut tell = BytesMut::new();
        assert_eq!(client.sync_parameters(&parameters, &mut tell), 3);
    }
    // The first error ends the restore at once.
    let failure = concat(&[
        row_description(&["set_config"]),
        data_row(&[Some("alice")]),
        command_complete("SELECT 1"),
        error(
            "ERROR",
            "42501",
            "permission denied to set session authorization",
        ),
        ready(b'I'),
    ]);
    let mut decoder = RestoreDecoder::new(plan, startup.clone(), 4096);
    let used = decoder.feed(&failure).unwrap();
    assert_eq!(used, failure.len() - ready(b'I').len());
    let Some(RestoreOutcome::Failed(fields)) = decoder.finish() else {
        panic!()
    };
    assert_eq!(fields.code(), "42501");
    // Nothing to restore (a session that was never dirty): done before
    // anything is read.
    let mut out = BytesMut::new();
    let plan = encode_restore(&mut out, &SessionSnapshot::default(), &tracker(), b"u").unwrap();
    assert!(out.is_empty());
    let decoder = RestoreDecoder::new(plan, startup, 4096);
    assert!(decoder.is_done());
}
