//! Session continuity, the session's side: the hidden exchanges that read
//! a live backend's state (snapshot) and rebuild it on a new backend
//! (restore), run at idle points on the relay's streams. The message
//! formats and their decoding are the protocol crate's
//! (`dsql_proxy_protocol::tracking`); this module only does their I/O, with
//! time limits, and keeps what the session needs to move.

use std::time::Duration;

use bytes::BytesMut;
use dsql_proxy_config::BackendKind;
use dsql_proxy_metrics::Metrics;
use dsql_proxy_protocol::backend::{decode_fields, ErrorFields};
use dsql_proxy_protocol::tracking::restore::{encode_restore, RestoreDecoder, RestoreOutcome};
use dsql_proxy_protocol::tracking::snapshot::{
    encode_snapshot, session_pins, Pins, SessionSnapshot, SnapshotDecoder, SnapshotLimits,
    SnapshotOutcome,
};
use dsql_proxy_protocol::tracking::{ParameterValues, SessionTracker, TrackerLimits};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};

use crate::io::send;
use crate::relay::Relay;

/// Session state a session may carry to a new backend (tracked statements
/// and the snapshot together); more pins it (`state_too_large`).
pub const MAX_SESSION_STATE: usize = 256 * 1024;

/// Largest single message a hidden exchange keeps (a row, an error).
const MAX_EXCHANGE_MESSAGE: usize = MAX_SESSION_STATE + 1024;

/// How long a hidden exchange may wait for each answer of the backend: it
/// holds the client's next request back meanwhile.
pub const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(10);

/// Aurora DSQL closes connections at 60 minutes: a jittered lifetime never
/// goes past this.
const DSQL_LIFETIME_CAP: Duration = Duration::from_secs(59 * 60);

pub fn tracker_limits() -> TrackerLimits {
    TrackerLimits {
        max_capture: MAX_SESSION_STATE + 1,
        ..TrackerLimits::default()
    }
}

/// `lifetime` with ±10% jitter, so a pool's connections made together do
/// not all move together; under Aurora DSQL's limit for `kind = "dsql"`.
pub fn jittered_lifetime(lifetime: Duration, kind: BackendKind) -> Duration {
    let factor = 0.9 + rand::random::<f64>() * 0.2;
    let jittered = lifetime.mul_f64(factor);
    match kind {
        BackendKind::Dsql => jittered.min(DSQL_LIFETIME_CAP),
        _ => jittered,
    }
}

/// How a failed live move is retried: soon relative to the lifetime,
/// never in a tight loop.
pub fn retry_delay(lifetime: Duration) -> Duration {
    (lifetime / 10).clamp(Duration::from_secs(1), Duration::from_secs(60))
}

/// What the session knows about its own state between idle points.
#[derive(Debug, Default)]
pub struct SessionState {
    /// The state read at the last snapshot (empty: never dirty).
    pub snapshot: SessionSnapshot,
    /// Why the session cannot move, as of the last snapshot.
    pub pins: Pins,
}

/// How a snapshot attempt ended.
pub enum SnapshotResult {
    /// Taken (or declined, which pins the session): the relay goes on.
    Done,
    /// The backend went away or broke the exchange: the session's state is
    /// unknown and its backend unusable. The FATAL, when it sent one.
    BackendLost(Option<ErrorFields>),
    /// The client went away while the proxy wrote to it.
    ClientLost,
}

/// Takes a snapshot of the session at an idle point (the relay stopped
/// with `RelayEnd::IdlePoint` and the tracker is dirty), updates `state`
/// and the tracker. Messages the backend sends meanwhile (notices,
/// notifications, ParameterStatus) reach the client in order.
pub async fn take_snapshot<C, B>(
    relay: &mut Relay<'_, C, B>,
    state: &mut SessionState,
) -> SnapshotResult
where
    C: AsyncRead + AsyncWrite + Unpin + ?Sized,
    B: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let Some(tracker) = relay.session_mut() else {
        return SnapshotResult::Done;
    };
    let mut out = BytesMut::new();
    let Some(plan) = encode_snapshot(&mut out, tracker) else {
        // An unnamed statement too large to keep: asking would drop it.
        tracker.mark_clean();
        state.pins |= Pins::STATE_TOO_LARGE;
        return SnapshotResult::Done;
    };
    let limits = SnapshotLimits {
        max_message: MAX_EXCHANGE_MESSAGE,
        max_state: MAX_SESSION_STATE,
    };
    let mut decoder = SnapshotDecoder::new(plan, limits);
    // Only the backend's side is timed: a write to the client is never cut
    // in the middle of a message.
    let exchange = async {
        tokio::time::timeout(EXCHANGE_TIMEOUT, send(relay.backend(), &out))
            .await
            .map_err(|_| ())?
            .map_err(|_| ())?;
        let mut buf = vec![0u8; crate::relay::RELAY_BUFFER];
        loop {
            let n = tokio::time::timeout(EXCHANGE_TIMEOUT, relay.backend().read(&mut buf))
                .await
                .map_err(|_| ())?
                .map_err(|_| ())?;
            if n == 0 {
                return Err(());
            }
            let used = decoder.feed(&buf[..n]).map_err(|_| ())?;
            let forward = decoder.take_forward();
            if !forward.is_empty() && relay.send_to_client(&forward).await.is_err() {
                return Ok(false);
            }
            if decoder.is_done() {
                // Whatever the backend sent after the exchange is the
                // relay's, in order.
                if used < n && relay.send_to_client(&buf[used..n]).await.is_err() {
                    return Ok(false);
                }
                return Ok(true);
            }
        }
    };
    let finished = match exchange.await {
        Ok(true) => true,
        Ok(false) => return SnapshotResult::ClientLost,
        Err(()) => false,
    };
    let outcome = if finished { decoder.finish() } else { None };
    let Some(tracker) = relay.session_mut() else {
        return SnapshotResult::Done;
    };
    match outcome {
        Some(SnapshotOutcome::Taken(snapshot)) => {
            let reconciled = tracker.apply_snapshot(&snapshot);
            state.pins = session_pins(&snapshot, tracker, reconciled.unknown, MAX_SESSION_STATE);
            state.snapshot = snapshot;
            SnapshotResult::Done
        }
        Some(SnapshotOutcome::TooLarge) => {
            tracker.mark_clean();
            state.pins |= Pins::STATE_TOO_LARGE;
            SnapshotResult::Done
        }
        Some(SnapshotOutcome::Fatal(fields)) => SnapshotResult::BackendLost(Some(fields)),
        None => SnapshotResult::BackendLost(None),
    }
}

/// Why a restore did not rebuild the session.
#[derive(Debug)]
pub enum RestoreError {
    /// The new backend refused part of the state (the first error).
    Refused(ErrorFields),
    /// It broke, closed or did not answer in time.
    Broken(String),
    /// The session holds a statement too large to replay.
    TooLarge,
}

impl std::fmt::Display for RestoreError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Refused(fields) => write!(
                f,
                "the new backend refused the session's state: {} ({})",
                fields.message(),
                fields.code()
            ),
            Self::Broken(detail) => {
                write!(f, "the new backend failed during the restore: {detail}")
            }
            Self::TooLarge => f.write_str("the session's state is too large to move"),
        }
    }
}

/// Rebuilds the session's state on `backend` (fresh from its startup,
/// logged in as `login_user`, which reported `parameters`). On success,
/// the ParameterStatus values the new backend reports now.
pub async fn restore<S>(
    backend: &mut S,
    state: &SessionState,
    tracker: &SessionTracker,
    login_user: &[u8],
    parameters: ParameterValues,
) -> Result<ParameterValues, RestoreError>
where
    S: AsyncRead + AsyncWrite + Unpin + ?Sized,
{
    let mut out = BytesMut::new();
    let plan = encode_restore(&mut out, &state.snapshot, tracker, login_user)
        .ok_or(RestoreError::TooLarge)?;
    let mut decoder = RestoreDecoder::new(plan, parameters, MAX_EXCHANGE_MESSAGE);
    if !out.is_empty() {
        let exchange = async {
            send(backend, &out).await.map_err(|e| e.to_string())?;
            let mut buf = vec![0u8; crate::relay::RELAY_BUFFER];
            while !decoder.is_done() {
                let n = backend.read(&mut buf).await.map_err(|e| e.to_string())?;
                if n == 0 {
                    return Err("it closed the connection".to_owned());
                }
                decoder.feed(&buf[..n]).map_err(|e| e.to_string())?;
            }
            Ok(())
        };
        match tokio::time::timeout(EXCHANGE_TIMEOUT, exchange).await {
            Ok(Ok(())) => {}
            Ok(Err(detail)) => return Err(RestoreError::Broken(detail)),
            Err(_) => {
                return Err(RestoreError::Broken(format!(
                    "no answer within {EXCHANGE_TIMEOUT:?}"
                )))
            }
        }
    }
    match decoder.finish() {
        Some(RestoreOutcome::Restored { parameters }) => Ok(parameters),
        Some(RestoreOutcome::Failed(fields)) => Err(RestoreError::Refused(fields)),
        None => Err(RestoreError::Broken("the exchange did not finish".into())),
    }
}

/// The fields of an ErrorResponse held back at an idle point, when the
/// held bytes hold all of it.
pub fn held_error_fields(held: &[u8]) -> Option<ErrorFields> {
    let len = u32::from_be_bytes(held.get(1..5)?.try_into().ok()?) as usize;
    let body = held.get(5..1 + len)?;
    decode_fields(body, "ErrorResponse").ok()
}

/// An error a backend sends at an idle point that means the server is
/// going away (shutdown, crash, postmaster exit): the session may move.
/// Anything else (an idle-session timeout, a targeted kill the operator
/// meant) reaches the client as it always did.
pub fn server_going_away(fields: &ErrorFields) -> bool {
    matches!(fields.code(), "57P01" | "57P02" | "57P03")
}

/// Keeps `sessions_pinned{cause}` in step with one session's pins.
pub struct PinGauge<'m> {
    metrics: &'m Metrics,
    current: Pins,
}

impl<'m> PinGauge<'m> {
    pub fn new(metrics: &'m Metrics) -> Self {
        Self {
            metrics,
            current: Pins::default(),
        }
    }

    pub fn set(&mut self, pins: Pins) {
        if pins == self.current {
            return;
        }
        for cause in self.current.labels() {
            self.metrics
                .sessions_pinned
                .with_label_values(&[cause])
                .dec();
        }
        for cause in pins.labels() {
            self.metrics
                .sessions_pinned
                .with_label_values(&[cause])
                .inc();
        }
        self.current = pins;
    }
}

impl Drop for PinGauge<'_> {
    fn drop(&mut self) {
        self.set(Pins::default());
    }
}

/// Creates every `sessions_pinned{cause}` series at 0.
pub fn register_pin_metrics(metrics: &Metrics) {
    for (_, cause) in Pins::ALL {
        metrics.sessions_pinned.with_label_values(&[cause]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_metrics_crate_names_every_pin_cause() {
        let labels: Vec<&str> = Pins::ALL.iter().map(|(_, label)| *label).collect();
        assert_eq!(labels, dsql_proxy_metrics::PIN_CAUSES);
    }

    #[test]
    fn a_jittered_lifetime_stays_within_ten_percent_and_under_dsql_s_limit() {
        let base = Duration::from_secs(100);
        for _ in 0..1000 {
            let d = jittered_lifetime(base, BackendKind::Postgres);
            assert!(
                d >= Duration::from_secs(90) && d <= Duration::from_secs(110),
                "{d:?}"
            );
        }
        let dsql = Duration::from_secs(58 * 60);
        for _ in 0..1000 {
            assert!(jittered_lifetime(dsql, BackendKind::Dsql) <= DSQL_LIFETIME_CAP);
        }
    }

    #[test]
    fn only_a_server_going_away_moves_a_session() {
        let fields = |code: &str| ErrorFields {
            fields: vec![
                (b'S', "FATAL".into()),
                (b'C', code.into()),
                (b'M', "m".into()),
            ],
        };
        for code in ["57P01", "57P02", "57P03"] {
            assert!(server_going_away(&fields(code)), "{code}");
        }
        // An idle-session timeout is the session's own setting.
        for code in ["57P05", "25P03", "08P01"] {
            assert!(!server_going_away(&fields(code)), "{code}");
        }
    }

    #[test]
    fn a_held_error_is_read_only_when_whole() {
        let mut buf = BytesMut::new();
        dsql_proxy_protocol::messages::error_response(
            &mut buf,
            &[
                (b'S', "FATAL".into()),
                (b'C', "57P01".into()),
                (b'M', "bye".into()),
            ],
        );
        let whole = held_error_fields(&buf).expect("whole");
        assert_eq!(whole.code(), "57P01");
        assert!(held_error_fields(&buf[..buf.len() - 1]).is_none());
        assert!(held_error_fields(&buf[..3]).is_none());
    }
}
