//! Shared by the tracker tests: message builders, scenarios, and a
//! snapshot of every observable.
#![allow(dead_code)]

pub mod scenarios;
pub mod wire;

use dsql_proxy_protocol::tracking::{
    CommandClass, CopyState, DesyncCause, DirtyReasons, ParameterValues, SessionTracker,
    TrackerLimits,
};

/// One step of a session: bytes the client sent, or the backend.
#[derive(Debug, Clone)]
pub struct Step {
    pub client: bool,
    pub bytes: Vec<u8>,
}

pub fn c(parts: &[Vec<u8>]) -> Step {
    Step {
        client: true,
        bytes: parts.concat(),
    }
}

pub fn s(parts: &[Vec<u8>]) -> Step {
    Step {
        client: false,
        bytes: parts.concat(),
    }
}

pub fn startup_parameters() -> ParameterValues {
    let mut p = ParameterValues::new();
    for (name, value) in [
        ("application_name", "test"),
        ("client_encoding", "UTF8"),
        ("DateStyle", "ISO, MDY"),
        ("server_version", "15.18"),
        ("TimeZone", "UTC"),
    ] {
        p.set(name.as_bytes(), value.as_bytes());
    }
    p
}

pub fn tracker() -> SessionTracker {
    SessionTracker::new(TrackerLimits::default(), startup_parameters())
}

/// Feeds every step whole.
pub fn run(steps: &[Step]) -> SessionTracker {
    let mut t = tracker();
    feed(&mut t, steps);
    t
}

pub fn feed(t: &mut SessionTracker, steps: &[Step]) {
    for step in steps {
        if step.client {
            t.observe_client(&step.bytes);
        } else {
            t.observe_server(&step.bytes);
        }
    }
}

/// A statement as observed: its Parse bytes (if kept), size, flag.
pub type ObservedStatement = (Option<Vec<u8>>, usize, bool);

/// Every observable of a tracker, comparable.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub client_at_boundary: bool,
    pub server_at_boundary: bool,
    pub client_bytes_to_boundary: usize,
    pub server_bytes_to_boundary: usize,
    pub client_messages: u64,
    pub server_messages: u64,
    pub last_client_tag: u8,
    pub last_server_tag: u8,
    pub broken: bool,
    pub requests_pending: u64,
    pub batch_open: bool,
    pub copy_state: CopyState,
    pub transaction_status: u8,
    pub terminate_seen: bool,
    pub desync: Option<DesyncCause>,
    pub at_idle_point: bool,
    pub unnamed: Option<ObservedStatement>,
    pub named: Vec<(Vec<u8>, ObservedStatement)>,
    pub parameters: Vec<(Vec<u8>, Vec<u8>)>,
    pub dirty: DirtyReasons,
    pub custom_settings: Vec<Vec<u8>>,
    pub custom_settings_unknown: bool,
    pub last_error: Option<(String, String)>,
    pub errors_seen: u64,
    pub last_command: CommandClass,
    pub commands_completed: u64,
    pub transaction_control_commands: u64,
    pub state_bytes: usize,
}

pub fn observe(t: &SessionTracker) -> Observed {
    let mut named: Vec<_> = t
        .named_statements()
        .map(|(name, s)| {
            (
                name.to_vec(),
                (
                    s.parse_message.map(<[u8]>::to_vec),
                    s.size,
                    s.state_changing,
                ),
            )
        })
        .collect();
    named.sort();
    Observed {
        client_at_boundary: t.client_at_boundary(),
        server_at_boundary: t.server_at_boundary(),
        client_bytes_to_boundary: t.client_bytes_to_boundary(),
        server_bytes_to_boundary: t.server_bytes_to_boundary(),
        client_messages: t.client_messages(),
        server_messages: t.server_messages(),
        last_client_tag: t.last_client_tag(),
        last_server_tag: t.last_server_tag(),
        broken: t.is_broken(),
        requests_pending: t.requests_pending(),
        batch_open: t.batch_open(),
        copy_state: t.copy_state(),
        transaction_status: t.transaction_status(),
        terminate_seen: t.terminate_seen(),
        desync: t.desync(),
        at_idle_point: t.at_idle_point(),
        unnamed: t.unnamed_statement().map(|s| {
            (
                s.parse_message.map(<[u8]>::to_vec),
                s.size,
                s.state_changing,
            )
        }),
        named,
        parameters: t
            .parameters()
            .iter()
            .map(|(n, v)| (n.to_vec(), v.to_vec()))
            .collect(),
        dirty: t.dirty_reasons(),
        custom_settings: t.custom_settings().map(<[u8]>::to_vec).collect(),
        custom_settings_unknown: t.custom_settings_unknown(),
        last_error: t
            .last_error()
            .map(|e| (format!("{:?}", e.severity), e.sqlstate().to_owned())),
        errors_seen: t.errors_seen(),
        last_command: t.last_command(),
        commands_completed: t.commands_completed(),
        transaction_control_commands: t.transaction_control_commands(),
        state_bytes: t.state_bytes(),
    }
}

/// A recorded session (relay phase only) from `tests/fixtures`: records of
/// `[direction: u8 (0 client, 1 server)][length: u32 BE][bytes]`, each one
/// read() as the recorder saw it.
pub fn recording(name: &str) -> Vec<Step> {
    let path = format!("{}/tests/fixtures/{name}.bin", env!("CARGO_MANIFEST_DIR"));
    let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let mut steps = Vec::new();
    let mut at = 0;
    while at < data.len() {
        let len =
            u32::from_be_bytes([data[at + 1], data[at + 2], data[at + 3], data[at + 4]]) as usize;
        steps.push(Step {
            client: data[at] == 0,
            bytes: data[at + 5..at + 5 + len].to_vec(),
        });
        at += 5 + len;
    }
    steps
}
