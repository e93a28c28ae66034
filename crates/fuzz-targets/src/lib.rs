//! Fuzz targets: one function per decoder the proxy feeds bytes it does
//! not control (a client's, a server's, an AWS API's, the config file's and
//! the environment's). Each takes arbitrary bytes and panics only when an
//! invariant breaks: a decoder panicking, a length it predicts that is not
//! the one it writes, a secret in an error message, a boundary that moves
//! with how the input is split.
//!
//! `fuzz/` (cargo-fuzz, nightly) runs them under libFuzzer;
//! `tests/properties.rs` runs the same functions over seeded random and
//! mutated inputs on stable, so CI needs no nightly toolchain.

#[cfg(feature = "status")]
mod aws;
mod seeds;

use std::sync::OnceLock;

use bytes::BytesMut;
use dsql_proxy_config::{Config, ConfigError};
#[cfg(feature = "status")]
use dsql_proxy_health::probe::{parse_aurora_role, parse_detect, parse_role};
use dsql_proxy_protocol::backend::{self, MAX_STARTUP_PHASE_BODY};
use dsql_proxy_protocol::query::{decode_query_message, QueryMessage};
use dsql_proxy_protocol::relay::{requests_in_flight, BoundaryTracker, Direction};
use dsql_proxy_protocol::scram::{ScramClient, ScramServer, ScramVerifier, MAX_ITERATIONS};
use dsql_proxy_protocol::startup::{self, InitialPacket};
use dsql_proxy_protocol::{frame, frontend, RawMessage};

pub use seeds::seeds;

/// A fuzz target: arbitrary bytes in, a panic only on a broken invariant.
pub type Target = fn(&[u8]);

/// Every target by name (the names of `fuzz/fuzz_targets/*.rs`).
pub const TARGETS: &[(&str, Target)] = &[
    ("startup_packet", startup_packet),
    ("backend_messages", backend_messages),
    ("frontend_messages", frontend_messages),
    ("scram_client", scram_client),
    ("scram_server", scram_server),
    ("query_messages", query_messages),
    #[cfg(feature = "status")]
    ("aurora_status", aurora_status),
    #[cfg(feature = "status")]
    ("aws_status", aws_status),
    ("config_env", config_env),
    ("boundary_tracker", boundary_tracker),
];

/// The first byte says where to split the rest in two.
fn split_two(data: &[u8]) -> (&[u8], &[u8]) {
    match data.split_first() {
        Some((n, rest)) => rest.split_at(usize::from(*n).min(rest.len())),
        None => (&[], &[]),
    }
}

/// The untyped first packet of a connection (SSLRequest, GSSENCRequest,
/// CancelRequest, StartupMessage), without its length word. What parses
/// as a StartupMessage re-encodes (as the proxy forwards it) to exactly
/// the length `startup_len` predicts and parses back to the same
/// parameters.
pub fn startup_packet(data: &[u8]) {
    if let Some(len) = data.first_chunk::<4>() {
        if let Ok(n) = startup::packet_body_len(*len) {
            assert!(n + 4 <= startup::MAX_STARTUP_PACKET_LEN);
        }
    }
    let Ok(InitialPacket::Startup(message)) = startup::parse_initial_packet(data) else {
        return;
    };
    let _ = message.param("user");
    let _ = message.needs_negotiation();
    let mut buf = BytesMut::new();
    startup::encode_startup(&mut buf, &message.params);
    assert_eq!(startup::startup_len(&message.params), buf.len());
    match startup::parse_initial_packet(&buf[4..]) {
        Ok(InitialPacket::Startup(again)) => assert_eq!(again.params, message.params),
        other => panic!("re-encoded startup packet does not parse back: {other:?}"),
    }
}

/// A server's byte stream during startup: framing, then each message
/// decoded as the backend connect path decodes it.
pub fn backend_messages(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    let mut consumed = 0;
    while let Ok(Some(message)) = frame::split_message(&mut buf, MAX_STARTUP_PHASE_BODY) {
        consumed += frame::HEADER_LEN + message.body.len();
        if let Ok(backend::BackendMessage::Error(fields)) = backend::decode(&message) {
            let _ = (fields.code(), fields.message(), fields.severity());
            let _ = fields.to_string();
        }
    }
    assert!(consumed <= data.len());
}

/// A client's messages during authentication: PasswordMessage,
/// SASLInitialResponse and SASLResponse, framed as the proxy reads them.
pub fn frontend_messages(data: &[u8]) {
    let mut buf = BytesMut::from(data);
    while let Ok(Some(message)) = frame::split_message(&mut buf, 65_535) {
        decode_frontend(&message);
    }
    if let Some((tag, body)) = data.split_first() {
        decode_frontend(&RawMessage {
            tag: *tag,
            body: bytes::Bytes::copy_from_slice(body),
        });
    }
}

fn decode_frontend(message: &RawMessage) {
    if let Ok(password) = frontend::decode_password(message) {
        assert!(!password.contains('\0'));
    }
    if let Ok((mechanism, data)) = frontend::decode_sasl_initial(message) {
        assert!(mechanism.len() + data.len() < message.body.len());
    }
    let _ = frontend::decode_sasl_response(message);
}

/// The client half of SCRAM against a hostile server: server-first (after
/// the client's own nonce, so the fuzzer reaches past the nonce check) and
/// server-final.
pub fn scram_client(data: &[u8]) {
    let (first, last) = split_two(data);
    let (mut client, client_first) = ScramClient::start("pencil");
    let _ = client.parse_server_first(data);
    let nonce = &client_first[b"n,,n=,r=".len()..];
    let mut server_first = b"r=".to_vec();
    server_first.extend_from_slice(nonce);
    server_first.extend_from_slice(first);
    if let Ok((server, text)) = client.parse_server_first(&server_first) {
        assert!((1..=MAX_ITERATIONS).contains(&server.iterations));
        // A stand-in for PBKDF2: what is parsed matters here, not the cost.
        let answer = client.client_final(&text, &[7; 32]);
        assert!(answer.starts_with(b"c=biws,r="));
        let _ = client.verify_server_final(last);
    }
}

/// The server half (local `scram-sha-256` clients): client-first, then
/// client-final, and stored verifiers.
pub fn scram_server(data: &[u8]) {
    static VERIFIER: OnceLock<ScramVerifier> = OnceLock::new();
    let verifier = VERIFIER.get_or_init(|| ScramVerifier::from_password("pencil", 16));
    let (first, last) = split_two(data);
    if let Ok((server, server_first)) = ScramServer::start(verifier, first) {
        assert!(server_first.starts_with(b"r="));
        let _ = server.finish(last);
    }
    let _ = ScramVerifier::parse(&String::from_utf8_lossy(data));
}

/// A server's answers to the probes' simple queries.
pub fn query_messages(data: &[u8]) {
    for message in messages(data) {
        if let Ok(QueryMessage::Row(row)) = decode_query_message(&message) {
            // Values are decoded lossily (a probe reads text it only
            // compares): an invalid byte becomes U+FFFD, 3 bytes. Nothing
            // beyond that is invented.
            let text: usize = row.iter().flatten().map(String::len).sum();
            assert!(text <= 3 * message.body.len());
        }
    }
}

fn messages(data: &[u8]) -> Vec<RawMessage> {
    let mut buf = BytesMut::from(data);
    let mut out = Vec::new();
    while let Ok(Some(message)) = frame::split_message(&mut buf, 1 << 20) {
        out.push(message);
    }
    out
}

/// The role and lag a server reports to an `aurora-global` probe
/// (PostgreSQL's and Aurora's role queries), from the DataRows on.
#[cfg(feature = "status")]
pub fn aurora_status(data: &[u8]) {
    let rows: Vec<Vec<Option<String>>> = messages(data)
        .iter()
        .filter_map(|m| match decode_query_message(m) {
            Ok(QueryMessage::Row(row)) => Some(row),
            _ => None,
        })
        .collect();
    if let Ok(role) = parse_role(&rows) {
        assert!(role.aurora.is_none());
    }
    if let Ok(role) = parse_aurora_role(&rows) {
        if !role.read_only {
            assert_eq!(role.lag, Some(std::time::Duration::ZERO));
        }
    }
    let _ = parse_detect(&rows);
}

/// Route 53's `GetHealthCheck` / `GetHealthCheckStatus` answers and RDS's
/// `DescribeGlobalClusters`, through the real AWS SDK clients and the
/// proxy's reading of them (an in-process HTTP client hands the SDK these
/// bytes as the service's answers).
#[cfg(feature = "status")]
pub fn aws_status(data: &[u8]) {
    aws::check(data);
}

/// A config file with `DSQL_PROXY__*` overrides: text, a NUL, then one
/// `SECTION__KEY=VALUE` override per line. Whatever it is, no error shows
/// a secret: not a password override's value, and not a line of the file
/// that names a password.
pub fn config_env(data: &[u8]) {
    const ENV_SECRET: &str = "Env-Secret-4711";
    const TEXT_SECRET: &str = "Text-Secret-0815";
    let (text, env) = match data.iter().position(|b| *b == 0) {
        Some(i) => (&data[..i], &data[i + 1..]),
        None => (data, &[][..]),
    };
    // `$$` in the text stands for a secret value, wherever the fuzzer put it.
    let text = String::from_utf8_lossy(text)
        .replace(ENV_SECRET, "")
        .replace(TEXT_SECRET, "")
        .replace("$$", TEXT_SECRET);
    let mut vars: Vec<(String, String)> = String::from_utf8_lossy(env)
        .lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| {
            (
                // A variable's name is no secret and may be echoed (an
                // unknown override is named): only values carry secrets.
                format!(
                    "DSQL_PROXY__{}",
                    k.replace(ENV_SECRET, "").replace(TEXT_SECRET, "")
                ),
                v.replace(ENV_SECRET, "").replace(TEXT_SECRET, ""),
            )
        })
        .collect();
    let section = if data.len() & 1 == 0 {
        "LISTEN"
    } else {
        "BACKEND"
    };
    vars.push((
        format!("DSQL_PROXY__{section}__PASSWORD"),
        ENV_SECRET.to_owned(),
    ));
    let Err(err) = Config::parse_with_env(&text, "fuzz.toml", vars) else {
        return;
    };
    let shown = err.to_string();
    assert!(!shown.contains(ENV_SECRET), "{shown}");
    if shown.contains(TEXT_SECRET) {
        // Only a line that does not mention a password may be echoed.
        let echoed_from_elsewhere = text
            .lines()
            .any(|l| l.contains(TEXT_SECRET) && !l.to_ascii_lowercase().contains("password"));
        assert!(echoed_from_elsewhere, "{shown}");
    }
    if let ConfigError::Env { var, .. } = &err {
        assert!(var.starts_with("DSQL_PROXY__"));
    }
}

/// One tracker state, everything a caller can observe.
#[derive(Debug, PartialEq, Eq)]
struct TrackerState {
    at_boundary: bool,
    bytes_to_boundary: usize,
    broken: bool,
    violation: bool,
    last_tag: u8,
    status: u8,
    marks: u64,
}

fn state(t: &BoundaryTracker) -> TrackerState {
    TrackerState {
        at_boundary: t.at_boundary(),
        bytes_to_boundary: t.bytes_to_boundary(),
        broken: t.is_broken(),
        violation: t.protocol_violation(),
        last_tag: t.last_tag(),
        status: t.transaction_status(),
        marks: t.request_marks(),
    }
}

/// Differential: the relay's `BoundaryTracker` reports the same state
/// however a stream is split into reads (first byte: how many chunk sizes
/// follow; then the sizes, used in turn; then the stream), in both
/// directions, and its boundaries are those of a plain frame walk.
pub fn boundary_tracker(data: &[u8]) {
    let (sizes, stream) = match data.split_first() {
        Some((n, rest)) => rest.split_at(usize::from(*n % 16).min(rest.len())),
        None => return,
    };
    let boundaries = frame_walk(stream);
    for direction in [Direction::Frontend, Direction::Backend] {
        // Byte by byte: the reference.
        let mut one = BoundaryTracker::new(direction);
        let mut reference = vec![state(&one)];
        for (i, b) in stream.iter().enumerate() {
            one.observe(std::slice::from_ref(b));
            let s = state(&one);
            match &boundaries {
                // Before the framing breaks, a boundary is where a frame
                // ends.
                Ok(ends) | Err(ends) if !s.broken => {
                    assert_eq!(s.at_boundary, ends.contains(&(i + 1)), "at {}", i + 1)
                }
                _ => assert!(!s.at_boundary),
            }
            reference.push(s);
        }
        // In chunks of the given sizes (0 reads nothing, like an empty
        // read), in turn.
        let mut chunked = BoundaryTracker::new(direction);
        let mut at = 0;
        let mut turn = sizes.iter().cycle();
        while at < stream.len() {
            let size = match turn.next() {
                Some(n) => usize::from(*n),
                None => stream.len(),
            };
            let end = (at + size).min(stream.len());
            chunked.observe(&stream[at..end]);
            at = end;
            assert_eq!(state(&chunked), reference[at], "after {at} bytes");
            if size == 0 && sizes.iter().all(|n| *n == 0) {
                break;
            }
        }
        // Reading at most bytes_to_boundary at a time stops exactly on the
        // next boundary, as the relay's message finishing relies on.
        let mut walker = BoundaryTracker::new(direction);
        let mut pos = 0;
        while pos < stream.len() && !walker.is_broken() {
            let step = walker.bytes_to_boundary().max(1).min(stream.len() - pos);
            walker.observe(&stream[pos..pos + step]);
            pos += step;
            assert_eq!(state(&walker), reference[pos]);
        }
    }
    let mut front = BoundaryTracker::frontend();
    let mut back = BoundaryTracker::backend();
    front.observe(stream);
    back.observe(stream);
    assert!(requests_in_flight(&front, &back) <= front.request_marks());
}

/// Where frames end (`Ok`), or where they ended before one could not be
/// framed (`Err`): a plain walk over tag and length words.
fn frame_walk(stream: &[u8]) -> Result<Vec<usize>, Vec<usize>> {
    let mut ends = Vec::new();
    let mut at = 0;
    while at + 5 <= stream.len() {
        let len = i32::from_be_bytes([
            stream[at + 1],
            stream[at + 2],
            stream[at + 3],
            stream[at + 4],
        ]);
        let Ok(len) = usize::try_from(len) else {
            return Err(ends);
        };
        if len < 4 {
            return Err(ends);
        }
        at += 1 + len;
        if at <= stream.len() {
            ends.push(at);
        }
    }
    Ok(ends)
}
