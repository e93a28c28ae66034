//! The session tracker on the sessions real servers and drivers produce.

mod common;

use common::scenarios::*;
use common::wire::*;
use common::{c, feed, observe, recording, run, s, tracker};
use dsql_proxy_protocol::tracking::{
    CommandClass, CopyState, DesyncCause, DirtyReasons, ErrorSeverity, ParameterValues,
    SessionTracker, TrackerLimits,
};

fn assert_idle(t: &SessionTracker) {
    assert!(t.at_idle_point(), "not idle: {:#?}", observe(t));
}

#[test]
fn pgbench_sessions_stay_clean_and_idle() {
    let t = run(&pgbench_simple(5));
    assert_idle(&t);
    assert!(!t.is_dirty());
    assert_eq!(t.commands_completed(), 5);
    assert_eq!(t.last_command(), CommandClass::Other);
    assert!(t.unnamed_statement().is_none());

    let steps = pgbench_prepared(5);
    let t = run(&steps);
    assert_idle(&t);
    assert!(!t.is_dirty());
    let named: Vec<_> = t.named_statements().collect();
    assert_eq!(named.len(), 1);
    assert_eq!(named[0].0, b"P_1");
    let expected = parse(
        "P_1",
        "SELECT abalance FROM pgbench_accounts WHERE aid = $1;",
        &[],
    );
    assert_eq!(named[0].1.parse_message, Some(&expected[..]));
    assert!(!named[0].1.state_changing);
    assert!(t.has_named_statement(b"P_1"));
}

#[test]
fn recorded_pgbench_sessions_are_idle_after_every_transaction() {
    for (name, statements) in [("pgbench_select_simple", 0), ("pgbench_select_prepared", 1)] {
        let steps = recording(name);
        let mut t = tracker();
        for step in &steps {
            feed(&mut t, std::slice::from_ref(step));
            assert_eq!(t.at_idle_point(), !step.client, "{name}");
        }
        assert_eq!(t.desync(), None);
        assert!(!t.is_dirty(), "{name}: {:?}", t.dirty_reasons());
        assert_eq!(t.commands_completed(), 64);
        assert_eq!(t.named_statement_count(), statements);
        if statements == 1 {
            assert!(t.has_named_statement(b"P_0"));
        }
    }
}

#[test]
fn requests_are_counted_until_ready_for_query() {
    let mut t = tracker();
    t.observe_client(&concat(&[query("SELECT 1"), query("SELECT 2")]));
    assert_eq!(t.requests_pending(), 2);
    assert!(!t.at_idle_point());
    t.observe_server(&concat(&[command_complete("SELECT 1"), ready(b'I')]));
    assert_eq!(t.requests_pending(), 1);
    assert!(!t.at_idle_point());
    t.observe_server(&concat(&[command_complete("SELECT 1"), ready(b'I')]));
    assert_idle(&t);
}

#[test]
fn half_messages_are_never_an_idle_point() {
    let mut t = tracker();
    let q = query("SELECT 1");
    t.observe_client(&q[..3]);
    assert!(!t.client_at_boundary());
    assert_eq!(t.client_bytes_to_boundary(), 2);
    assert!(!t.at_idle_point());
    t.observe_client(&q[3..]);
    let answer = concat(&[command_complete("SELECT 1"), ready(b'I')]);
    t.observe_server(&answer[..answer.len() - 1]);
    assert!(!t.server_at_boundary());
    assert_eq!(t.server_bytes_to_boundary(), 1);
    assert!(!t.at_idle_point());
    t.observe_server(&answer[answer.len() - 1..]);
    assert_idle(&t);
}

#[test]
fn the_unnamed_statement_is_tracked_and_reused_in_one_buffer() {
    let t = run(&extended_unnamed());
    assert_idle(&t);
    let unnamed = t.unnamed_statement().expect("unnamed statement");
    assert_eq!(
        unnamed.parse_message,
        Some(&parse("", "SELECT $1::int", &[23])[..])
    );
    assert_eq!(t.named_statement_count(), 0);

    let lifecycle = unnamed_lifecycle();
    // A simple Query drops it.
    let t = run(&lifecycle[0]);
    assert_idle(&t);
    assert!(t.unnamed_statement().is_none());
    // A failed unnamed Parse leaves none.
    let t = run(&lifecycle[1]);
    assert_idle(&t);
    assert!(t.unnamed_statement().is_none());
    // A Bind failing before a later unnamed Parse: the Parse was skipped,
    // the old unnamed statement is still there.
    let t = run(&lifecycle[2]);
    assert_idle(&t);
    assert_eq!(
        t.unnamed_statement().and_then(|s| s.parse_message),
        Some(&parse("", "SELECT 1", &[])[..])
    );
}

#[test]
fn pipelined_groups_confirm_in_order_and_errors_drop_their_group() {
    let t = run(&pipeline_with_error());
    assert_idle(&t);
    let mut names: Vec<_> = t.named_statements().map(|(n, _)| n.to_vec()).collect();
    names.sort();
    assert_eq!(names, vec![b"a".to_vec(), b"c".to_vec()]);
    assert_eq!(t.errors_seen(), 1);
    let e = t.last_error().unwrap();
    assert_eq!(e.severity, ErrorSeverity::Error);
    assert_eq!(e.sqlstate(), "42P01");
}

#[test]
fn a_duplicate_parse_keeps_the_old_statement() {
    let t = run(&duplicate_name());
    assert_idle(&t);
    let (_, s1) = t.named_statements().next().unwrap();
    assert_eq!(s1.parse_message, Some(&parse("s1", "SELECT 1", &[])[..]));
    assert_eq!(t.last_error().unwrap().sqlstate(), "42P05");
}

#[test]
fn closes_line_up_with_close_complete() {
    let t = run(&close_statement_and_portal());
    assert_idle(&t);
    let names: Vec<_> = t.named_statements().map(|(n, _)| n.to_vec()).collect();
    assert_eq!(names, vec![b"s2".to_vec()]);
    // Closing the unnamed statement works too.
    let mut steps = extended_unnamed();
    steps.push(c(&[close(b'S', ""), sync()]));
    steps.push(s(&[close_complete(), ready(b'I')]));
    let t = run(&steps);
    assert!(t.unnamed_statement().is_none());
}

#[test]
fn flush_keeps_the_batch_open_until_sync() {
    let steps = flush_then_sync();
    let mut t = tracker();
    feed(&mut t, &steps[..2]);
    assert!(t.batch_open());
    assert_eq!(t.requests_pending(), 0);
    assert!(!t.at_idle_point());
    assert!(t.has_named_statement(b"q"));
    feed(&mut t, &steps[2..]);
    assert!(!t.batch_open());
    assert_idle(&t);
}

#[test]
fn copy_in_both_ways_and_copy_out() {
    for (name, steps) in [
        ("simple", copy_in_simple()),
        ("extended", copy_in_extended()),
        ("out", copy_out()),
        ("both", copy_both()),
        ("twice", copy_in_twice()),
    ] {
        let mut t = tracker();
        for (i, step) in steps.iter().enumerate() {
            feed(&mut t, std::slice::from_ref(step));
            if i + 1 < steps.len() {
                assert!(!t.at_idle_point(), "{name}: idle after step {i}");
            }
        }
        assert_idle(&t);
        assert_eq!(t.desync(), None, "{name}");
    }
    // During the COPY the state shows it.
    let steps = copy_in_extended();
    let mut t = tracker();
    feed(&mut t, &steps[..2]);
    assert_eq!(t.copy_state(), CopyState::In);
    assert_eq!(
        t.requests_pending(),
        0,
        "the Sync before the data is swallowed"
    );
    assert!(t.batch_open());
    feed(&mut t, &steps[2..3]);
    assert_eq!(t.requests_pending(), 1);
    let steps = copy_out();
    let mut t = tracker();
    t.observe_client(&steps[0].bytes);
    t.observe_server(&copy_out_response(1));
    assert_eq!(t.copy_state(), CopyState::Out);
}

#[test]
fn errors_in_the_middle_of_copy() {
    let steps = copy_in_error_simple();
    let mut t = tracker();
    feed(&mut t, &steps[..4]);
    // The server is done; the client is still sending data.
    assert_eq!(t.requests_pending(), 0);
    assert_eq!(t.copy_state(), CopyState::In);
    assert!(!t.at_idle_point());
    feed(&mut t, &steps[4..]);
    assert_idle(&t);

    let t = run(&copy_in_error_extended());
    assert_idle(&t);
    assert_eq!(t.last_error().unwrap().sqlstate(), "22P02");
}

#[test]
fn function_calls_dirty_and_empty_queries_complete() {
    let t = run(&function_call_and_empty_query());
    assert_idle(&t);
    assert!(t.dirty_reasons().contains(DirtyReasons::FUNCTION_CALL));
    assert_eq!(t.commands_completed(), 0);
}

#[test]
fn asynchronous_messages_do_not_disturb_requests() {
    let t = run(&asynchronous_messages());
    assert_idle(&t);
    assert!(t.dirty_reasons().contains(DirtyReasons::PARAMETER_STATUS));
    assert_eq!(t.parameters().get(b"TimeZone"), Some(&b"Europe/Paris"[..]));
    assert_eq!(t.parameters().get(b"in_hot_standby"), Some(&b"off"[..]));
    assert_eq!(t.parameters().get(b"application_name"), Some(&b"test"[..]));
}

#[test]
fn fatal_at_idle_is_recorded_without_touching_requests() {
    let t = run(&fatal_at_idle());
    assert_eq!(t.desync(), None);
    assert_eq!(t.requests_pending(), 0);
    let e = t.last_error().unwrap();
    assert!(e.ends_session());
    assert_eq!(e.sqlstate(), "57P01");
}

#[test]
fn transaction_status_follows_ready_for_query() {
    let steps = failed_transaction();
    let mut t = tracker();
    feed(&mut t, &steps[..2]);
    assert_eq!(t.transaction_status(), b'E');
    assert!(!t.at_idle_point());
    assert_eq!(t.transaction_control_commands(), 1);
    feed(&mut t, &steps[2..]);
    assert_eq!(t.transaction_status(), b'I');
    assert_eq!(t.transaction_control_commands(), 2);
    assert_eq!(t.last_command(), CommandClass::TransactionControl);
    assert_idle(&t);

    let t = run(&failed_implicit_transaction());
    assert_idle(&t);
    assert!(
        t.unnamed_statement().is_some(),
        "the second Parse succeeded"
    );
}

#[test]
fn sql_deallocate_makes_the_session_dirty_and_a_snapshot_reconciles() {
    let mut t = run(&deallocate_through_sql());
    assert_idle(&t);
    assert!(t.dirty_reasons().contains(DirtyReasons::COMMAND_TAG));
    assert_eq!(t.named_statement_count(), 2);
    let reconciled = t.reconcile_statements([&b"s2"[..]]);
    assert_eq!(reconciled.removed, 1);
    assert_eq!(reconciled.unknown, 0);
    assert!(!t.has_named_statement(b"s1"));
    let reconciled = t.reconcile_statements([&b"s2"[..], &b"other"[..]]);
    assert_eq!(reconciled.unknown, 1);
}

#[test]
fn state_change_signals_and_mark_clean() {
    let mut t = run(&state_changes());
    assert_idle(&t);
    let reasons = t.dirty_reasons();
    assert!(reasons.contains(DirtyReasons::COMMAND_TAG));
    assert!(reasons.contains(DirtyReasons::KEYWORD));
    assert_eq!(
        t.custom_settings().collect::<Vec<_>>(),
        vec![&b"app.tenant"[..], &b"app.user_id"[..]]
    );
    assert!(!t.custom_settings_unknown());
    let (_, setter) = t.named_statements().next().unwrap();
    assert!(setter.state_changing);
    t.mark_clean();
    assert!(!t.is_dirty());
    // Running the flagged statement again makes it dirty again.
    feed(&mut t, &bind_flagged_statement());
    assert_eq!(t.dirty_reasons(), DirtyReasons::STATEMENT_BOUND);
    assert_eq!(
        t.dirty_reasons().labels().collect::<Vec<_>>(),
        ["statement_bound"]
    );
    // An ordinary statement does not.
    t.mark_clean();
    feed(&mut t, &pgbench_prepared(2));
    assert!(!t.is_dirty());
}

#[test]
fn terminate_is_seen_and_ends_idleness() {
    let t = run(&terminate_session());
    assert!(t.terminate_seen());
    assert!(!t.at_idle_point());
    assert_eq!(t.last_client_tag(), b'X');
}

#[test]
fn unknowable_patterns_desynchronize_instead_of_guessing() {
    let t = run(&mixed_group());
    assert_eq!(t.desync(), None);
    assert_idle(&t);
    assert!(t.has_named_statement(b"m"));
    for (steps, cause) in [
        (mixed_group_with_error(), DesyncCause::ErrorInMixedGroup),
        (pipelined_into_copy(), DesyncCause::PipelinedIntoCopy),
        (unexpected_ready(), DesyncCause::UnexpectedReadyForQuery),
        (broken_client_frame(), DesyncCause::ClientFraming),
        (broken_server_frame(), DesyncCause::ServerFraming),
    ] {
        let t = run(&steps);
        assert_eq!(t.desync(), Some(cause));
        assert!(!t.at_idle_point());
    }
    let t = run(&broken_client_frame());
    assert!(t.is_broken());
    assert_eq!(t.client_bytes_to_boundary(), 0);
    // The backend's framing still works, and its status is still followed.
    assert!(t.server_at_boundary());
    // A completion without its Parse.
    let mut t = tracker();
    t.observe_client(&sync());
    t.observe_server(&parse_complete());
    assert_eq!(t.desync(), Some(DesyncCause::UnexpectedCompletion));
    // A client message COPY IN does not accept.
    let mut t = tracker();
    feed(&mut t, &copy_in_simple()[..2]);
    t.observe_client(&query("SELECT 1"));
    assert_eq!(t.desync(), Some(DesyncCause::UnexpectedDuringCopy));
}

#[test]
fn oversized_statements_and_state_size() {
    let limits = TrackerLimits {
        max_capture: 64,
        ..TrackerLimits::default()
    };
    let mut t = SessionTracker::new(limits, ParameterValues::new());
    let big = format!("SELECT '{}'", "x".repeat(100));
    let big_parse = parse("big", &big, &[]);
    let small_parse = parse("s", "SELECT 1", &[]);
    t.observe_client(&concat(&[big_parse.clone(), small_parse.clone(), sync()]));
    t.observe_server(&concat(&[parse_complete(), parse_complete(), ready(b'I')]));
    assert_idle(&t);
    let mut named: Vec<_> = t.named_statements().map(|(n, s)| (n.to_vec(), s)).collect();
    named.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(named[0].1.parse_message, None);
    assert_eq!(named[0].1.size, big_parse.len());
    assert_eq!(named[1].1.parse_message, Some(&small_parse[..]));
    assert_eq!(t.state_bytes(), 3 + big_parse.len() + 1 + small_parse.len());
    // Closing the big one gives its bytes back.
    t.observe_client(&concat(&[close(b'S', "big"), sync()]));
    t.observe_server(&concat(&[close_complete(), ready(b'I')]));
    assert_eq!(t.state_bytes(), 1 + small_parse.len());
}

#[test]
fn statement_names_compare_as_the_server_truncates_them() {
    let long = "n".repeat(70);
    let mut t = tracker();
    t.observe_client(&concat(&[parse(&long, "SELECT 1", &[]), sync()]));
    t.observe_server(&concat(&[parse_complete(), ready(b'I')]));
    assert!(t.has_named_statement(&long.as_bytes()[..63]));
    assert!(t.has_named_statement(format!("{}zzz", &long[..63]).as_bytes()));
}

#[test]
fn sync_parameters_tells_the_client_only_differences() {
    let mut t = tracker();
    let mut backend = common::startup_parameters();
    backend.set(b"server_version", b"15.19");
    backend.set(b"is_superuser", b"off");
    let mut out = bytes::BytesMut::new();
    assert_eq!(t.sync_parameters(&backend, &mut out), 2);
    assert_eq!(t.parameters().get(b"server_version"), Some(&b"15.19"[..]));
    assert!(!t.is_dirty());
    let mut out = bytes::BytesMut::new();
    assert_eq!(t.sync_parameters(&backend, &mut out), 0);
    assert!(out.is_empty());
}

#[test]
fn protocol_3_2_sessions_relay_the_same_messages() {
    // Protocol 3.2 changes only the startup (longer cancel keys); a stray
    // BackendKeyData of 3.2's size in the relay phase is skipped like any
    // message the tracker does not know.
    let mut key = vec![b'K'];
    key.extend_from_slice(&(4 + 4 + 32i32).to_be_bytes());
    key.extend_from_slice(&[0u8; 36]);
    let mut t = tracker();
    t.observe_client(&query("SELECT 1"));
    t.observe_server(&concat(&[key, command_complete("SELECT 1"), ready(b'I')]));
    assert_idle(&t);
}
