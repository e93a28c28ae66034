use super::*;

fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(body);
    out
}

fn query(text: &str) -> Vec<u8> {
    let mut body = text.as_bytes().to_vec();
    body.push(0);
    msg(b'Q', &body)
}

fn parse(name: &str, text: &str) -> Vec<u8> {
    let mut body = name.as_bytes().to_vec();
    body.push(0);
    body.extend_from_slice(text.as_bytes());
    body.extend_from_slice(&[0, 0, 0]);
    msg(b'P', &body)
}

fn bind_execute_sync(statement: &str) -> Vec<u8> {
    let mut bind = vec![0];
    bind.extend_from_slice(statement.as_bytes());
    bind.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0]);
    let mut out = msg(b'B', &bind);
    out.extend(msg(b'E', &[0, 0, 0, 0, 0]));
    out.extend(msg(b'S', &[]));
    out
}

fn error(severity: &str, code: &str) -> Vec<u8> {
    let body = format!("S{severity}\0V{severity}\0C{code}\0Mcould not serialize access\0\0");
    msg(b'E', body.as_bytes())
}

fn complete(tag: &str) -> Vec<u8> {
    let mut body = tag.as_bytes().to_vec();
    body.push(0);
    msg(b'C', &body)
}

fn ready(status: u8) -> Vec<u8> {
    msg(b'Z', &[status])
}

const LISTED: [SqlState; 2] = [SqlState(*b"40001"), SqlState(*b"40P01")];

fn candidate(request: &[u8]) -> RetryCandidate {
    let mut c = RetryCandidate::new(1024);
    c.begin();
    assert_eq!(c.push_request(request), RequestProgress::Complete);
    c
}

fn respond(c: &mut RetryCandidate, parts: &[Vec<u8>]) -> ResponseProgress {
    let bytes: Vec<u8> = parts.concat();
    c.push_response(&bytes)
}

#[test]
fn a_query_is_complete_at_its_end_in_any_split() {
    let q = query("UPDATE t SET n = n + 1");
    let mut c = RetryCandidate::new(1024);
    c.begin();
    for byte in &q[..q.len() - 1] {
        assert_eq!(
            c.push_request(std::slice::from_ref(byte)),
            RequestProgress::Incomplete
        );
    }
    assert_eq!(c.push_request(&q[q.len() - 1..]), RequestProgress::Complete);
    assert_eq!(c.request(), &q[..]);
}

#[test]
fn anything_after_the_request_is_pipelining() {
    let mut c = RetryCandidate::new(1024);
    c.begin();
    let two = [query("SELECT 1"), query("SELECT 2")].concat();
    assert_eq!(
        c.push_request(&two),
        RequestProgress::NotEligible(NotEligible::Pipelined)
    );
    let mut c = candidate(&query("SELECT 1"));
    assert_eq!(
        c.push_request(&query("SELECT 2")),
        RequestProgress::NotEligible(NotEligible::Pipelined)
    );
}

#[test]
fn a_batch_is_complete_at_its_sync_and_a_flush_may_make_the_client_wait() {
    let mut c = RetryCandidate::new(1024);
    c.begin();
    assert_eq!(
        c.push_request(&parse("s1", "UPDATE t SET n = n + 1")),
        RequestProgress::Incomplete
    );
    assert!(!c.client_may_wait());
    assert_eq!(c.push_request(&msg(b'H', &[])), RequestProgress::Incomplete);
    assert!(c.client_may_wait());
    assert_eq!(
        c.push_request(&bind_execute_sync("s1")),
        RequestProgress::Complete
    );
    assert!(!c.client_may_wait());
}

#[test]
fn other_requests_are_not_candidates() {
    for request in [
        msg(b'F', &[0, 0, 0, 1, 0, 0, 0, 0, 0, 0]),
        msg(b'd', b"data"),
        msg(b'X', &[]),
        [parse("", "SELECT 1"), query("SELECT 2")].concat(),
        vec![b'Q', 0, 0, 0, 2],
    ] {
        let mut c = RetryCandidate::new(1024);
        c.begin();
        assert_eq!(
            c.push_request(&request),
            RequestProgress::NotEligible(NotEligible::Protocol)
        );
    }
    let mut c = RetryCandidate::new(16);
    c.begin();
    assert_eq!(
        c.push_request(&query("SELECT 'a long query text'")),
        RequestProgress::NotEligible(NotEligible::TooLarge)
    );
}

#[test]
fn a_listed_error_at_idle_is_retried() {
    let mut c = candidate(&query("UPDATE t SET n = n + 1"));
    assert_eq!(
        c.push_response(&error("ERROR", "40001")[..3]),
        ResponseProgress::Pending
    );
    let rest = [error("ERROR", "40001")[3..].to_vec(), ready(b'I')].concat();
    assert_eq!(c.push_response(&rest), ResponseProgress::Ready);
    assert_eq!(c.judge(&LISTED), Verdict::Retry(SqlState(*b"40001")));
    let mut resend = Vec::new();
    c.prepare_resend(&mut resend);
    assert_eq!(resend, query("UPDATE t SET n = n + 1"));
    // The next try's answer is judged afresh.
    assert_eq!(
        respond(&mut c, &[complete("UPDATE 1"), ready(b'I')]),
        ResponseProgress::Ready
    );
    assert_eq!(c.judge(&LISTED), Verdict::Forward(None));
    assert_eq!(
        c.response_for_client(),
        [complete("UPDATE 1"), ready(b'I')].concat()
    );
}

#[test]
fn other_errors_and_fatal_ones_are_forwarded() {
    let mut c = candidate(&query("SELECT 1/0"));
    respond(&mut c, &[error("ERROR", "22012"), ready(b'I')]);
    assert_eq!(c.judge(&LISTED), Verdict::Forward(None));
    let mut c = candidate(&query("SELECT 1"));
    respond(&mut c, &[error("FATAL", "40001"), ready(b'I')]);
    assert_eq!(c.judge(&LISTED), Verdict::Forward(None));
    let mut c = candidate(&query("SELECT 1"));
    respond(
        &mut c,
        &[error("ERROR", "40001"), msg(b'N', b"\0"), ready(b'I')],
    );
    assert_eq!(c.judge(&LISTED), Verdict::Forward(None), "error not last");
}

#[test]
fn transaction_control_and_commands_a_rollback_keeps_forbid_a_retry() {
    let conflict = SqlState(*b"40001");
    let mut c = candidate(&query("UPDATE a; COMMIT; UPDATE b"));
    respond(
        &mut c,
        &[
            complete("UPDATE 1"),
            complete("COMMIT"),
            error("ERROR", "40001"),
            ready(b'I'),
        ],
    );
    assert_eq!(
        c.judge(&LISTED),
        Verdict::Forward(Some((conflict, NotEligible::TransactionControl)))
    );
    let mut c = candidate(&query("BEGIN; UPDATE a"));
    respond(
        &mut c,
        &[complete("BEGIN"), error("ERROR", "40001"), ready(b'E')],
    );
    assert_eq!(
        c.judge(&LISTED),
        Verdict::Forward(Some((conflict, NotEligible::TransactionControl)))
    );
    let mut c = candidate(&query("PREPARE p AS SELECT 1; UPDATE a"));
    respond(
        &mut c,
        &[complete("PREPARE"), error("ERROR", "40001"), ready(b'I')],
    );
    assert_eq!(
        c.judge(&LISTED),
        Verdict::Forward(Some((conflict, NotEligible::NotTransactional)))
    );
    // SET is undone by the rollback: still retried.
    let mut c = candidate(&query("SET x.y = 1; UPDATE a"));
    respond(
        &mut c,
        &[complete("SET"), error("ERROR", "40001"), ready(b'I')],
    );
    assert_eq!(c.judge(&LISTED), Verdict::Retry(conflict));
    for text in [
        "CALL p()",
        "select 1; /* c */ DO $$ begin end $$",
        "-- x\n call p()",
    ] {
        let mut c = candidate(&query(text));
        respond(&mut c, &[error("ERROR", "40001"), ready(b'I')]);
        assert_eq!(
            c.judge(&LISTED),
            Verdict::Forward(Some((conflict, NotEligible::TransactionControl))),
            "{text}"
        );
    }
}

#[test]
fn a_notification_after_ready_stops_the_retry() {
    let mut c = candidate(&query("UPDATE a"));
    assert_eq!(
        respond(
            &mut c,
            &[
                error("ERROR", "40001"),
                ready(b'I'),
                msg(b'A', b"\0\0\0\x01c\0\0")
            ]
        ),
        ResponseProgress::Ready
    );
    assert_eq!(
        c.judge(&LISTED),
        Verdict::Forward(Some((SqlState(*b"40001"), NotEligible::Pipelined)))
    );
}

#[test]
fn copy_and_large_responses_stop_holding() {
    let mut c = candidate(&query("COPY t FROM STDIN"));
    assert_eq!(
        c.push_response(&msg(b'G', &[0, 0, 0])),
        ResponseProgress::NotEligible(NotEligible::Protocol)
    );
    let mut c = RetryCandidate::new(64);
    c.begin();
    c.push_request(&query("SELECT"));
    assert_eq!(
        c.push_response(&msg(b'D', &[7; 100])),
        ResponseProgress::NotEligible(NotEligible::TooLarge)
    );
    assert_eq!(c.response_for_client().len(), 105, "kept to be forwarded");
}

#[test]
fn a_resend_closes_the_named_statements_the_failed_try_created() {
    let request = [
        parse("S_1", "UPDATE a SET n = n + 1"),
        bind_execute_sync("S_1")[..0].to_vec(),
        parse("", "SELECT 1"),
        parse("S_2", "SELECT 2"),
        bind_execute_sync("S_1"),
    ]
    .concat();
    let mut c = candidate(&request);
    // S_1 and the unnamed one parsed; the error came before S_2.
    respond(
        &mut c,
        &[
            msg(b'1', &[]),
            msg(b'1', &[]),
            error("ERROR", "40001"),
            ready(b'I'),
        ],
    );
    assert_eq!(c.judge(&LISTED), Verdict::Retry(SqlState(*b"40001")));
    let mut resend = Vec::new();
    c.prepare_resend(&mut resend);
    let close = msg(b'C', b"SS_1\0");
    assert_eq!(resend, [close, request.clone()].concat());
    // The backend answers the Close first; the client never sees it.
    let answer = [
        msg(b'1', &[]),
        msg(b'1', &[]),
        msg(b'1', &[]),
        msg(b'2', &[]),
        complete("UPDATE 1"),
        ready(b'I'),
    ]
    .concat();
    respond(&mut c, &[CLOSE_COMPLETE.to_vec(), answer.clone()]);
    assert_eq!(c.judge(&LISTED), Verdict::Forward(None));
    assert_eq!(c.response_for_client(), &answer[..]);
}

#[test]
fn sqlstates_parse_strictly() {
    assert_eq!(SqlState::parse("40P01"), Some(SqlState(*b"40P01")));
    assert_eq!(SqlState::parse("40p01"), None);
    assert_eq!(SqlState::parse("4000"), None);
    assert_eq!(SqlState::parse("400011"), None);
    assert_eq!(SqlState(*b"40001").as_str(), "40001");
}

#[test]
fn labels_are_distinct() {
    let labels: std::collections::HashSet<_> = NotEligible::ALL.iter().map(|c| c.label()).collect();
    assert_eq!(labels.len(), NotEligible::ALL.len());
}
