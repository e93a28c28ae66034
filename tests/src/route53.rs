//! A local stand-in for the Route 53 API's health-check reads, speaking the
//! real REST-XML wire format over plain HTTP/1.1 on 127.0.0.1:
//!
//! * `GET /2013-04-01/healthcheck/{Id}`: `GetHealthCheckResponse`.
//! * `GET /2013-04-01/healthcheck/{Id}/status`:
//!   `GetHealthCheckStatusResponse`, one observation per checker; a
//!   disabled check gets the real service's `InvalidInput` instead.
//! * Errors as Route 53's `ErrorResponse` document (`NoSuchHealthCheck`
//!   404, `Throttling` 400, `InternalFailure` 500), or no answer at all.
//!
//! Like the servers in [`crate::aws_endpoints`] it runs on its own thread
//! with its own single-threaded tokio runtime, answers with
//! `Connection: close` and records every request. It has its own accept
//! loop because a hanging answer must not block the runtime (the shared
//! `HttpServer` calls a synchronous handler). Signatures are not verified,
//! but an unsigned request is refused as the real service would.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime};

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

pub use crate::aws_endpoints::RecordedRequest;
use crate::aws_endpoints::{
    percent_decode, read_request, rfc3339, write_response, xml_escape, HttpResponse,
};

/// The XML namespace of every Route 53 API document.
pub const ROUTE53_XMLNS: &str = "https://route53.amazonaws.com/doc/2013-04-01/";
/// The API version prefix of every Route 53 request path.
pub const API_PREFIX: &str = "/2013-04-01";

/// A checker's report for a healthy HTTPS endpoint.
pub const SUCCESS_STATUS: &str = "Success: HTTP Status Code 200, OK";
/// A checker's report when the endpoint does not accept connections.
pub const FAILURE_STATUS: &str = "Failure: Connection timed out. The endpoint or the internet \
connection is down, or requests are being blocked by your firewall.";

/// Route 53's checker regions, in the order the fake assigns observations
/// to them, each with the base of a /26 that (from memory, unverified here)
/// is in its `ROUTE53_HEALTHCHECKS` range in ip-ranges.json. Nothing
/// depends on the addresses beyond their looking like checkers'.
pub const CHECKER_REGIONS: &[(&str, [u8; 3], u8)] = &[
    ("us-east-1", [54, 243, 31], 192),
    ("us-west-1", [54, 183, 255], 128),
    ("us-west-2", [54, 244, 52], 192),
    ("eu-west-1", [54, 228, 16], 0),
    ("ap-southeast-1", [54, 255, 254], 192),
    ("ap-southeast-2", [54, 252, 254], 192),
    ("ap-northeast-1", [54, 250, 253], 192),
    ("sa-east-1", [177, 71, 207], 128),
];

/// The message of the `InvalidInput` error Route 53 answers to
/// `GetHealthCheckStatus` on a disabled health check.
///
/// A close paraphrase, not the service's verbatim text (which could not be
/// found in any reference available here): what is known is the error code
/// and that the message names the special status "always healthy", which
/// is what clients (the proxy included) match on.
pub fn disabled_status_message(id: &str) -> String {
    format!(
        "Health check {id} is disabled. Status information is not available for a disabled \
         health check: it has the special status of always healthy."
    )
}

/// What the fake knows about one health check.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FakeHealthCheck {
    pub disabled: bool,
    pub inverted: bool,
    /// One entry per checker: its region and whether it saw success.
    pub observations: Vec<(String, bool)>,
    /// `GetHealthCheck` says enabled but `GetHealthCheckStatus` answers as
    /// for a disabled check: the check was disabled between the two calls.
    pub disabled_after_get: bool,
}

impl FakeHealthCheck {
    /// `total` observations spread over [`CHECKER_REGIONS`], the first
    /// `successes` of them successful.
    pub fn with_successes(successes: usize, total: usize) -> Self {
        Self {
            observations: (0..total)
                .map(|i| {
                    let region = CHECKER_REGIONS[i % CHECKER_REGIONS.len()].0;
                    (region.to_owned(), i < successes)
                })
                .collect(),
            ..Self::default()
        }
    }

    /// Every checker (two per region, 16 in all) reports success.
    pub fn healthy() -> Self {
        Self::with_successes(16, 16)
    }

    /// Every checker (16) reports failure.
    pub fn failing() -> Self {
        Self::with_successes(0, 16)
    }

    pub fn inverted(mut self) -> Self {
        self.inverted = true;
        self
    }

    pub fn disabled(mut self) -> Self {
        self.disabled = true;
        self
    }

    pub fn disabled_after_get(mut self) -> Self {
        self.disabled_after_get = true;
        self
    }
}

/// Makes every request fail.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FakeFailure {
    /// HTTP 400, code `Throttling`, "Rate exceeded" (Route 53's answer past
    /// its per-account request rate).
    Throttling,
    /// HTTP 500, code `InternalFailure`.
    Internal,
    /// Reads the request, never answers, holds the connection open.
    Hang,
}

#[derive(Default)]
struct State {
    checks: HashMap<String, FakeHealthCheck>,
    failure: Option<FakeFailure>,
    requests: Vec<RecordedRequest>,
    next_request_id: u64,
}

type Shared = Arc<Mutex<State>>;

fn lock(state: &Shared) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The fake Route 53 API. Stopped (and its thread joined) on drop; hanging
/// connections are dropped with it.
pub struct FakeRoute53 {
    addr: SocketAddr,
    state: Shared,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl FakeRoute53 {
    /// Binds 127.0.0.1 on a free port and serves until dropped.
    pub fn start() -> FakeRoute53 {
        let std_listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap_or_else(|e| panic!("route53: bind 127.0.0.1:0: {e}"));
        std_listener
            .set_nonblocking(true)
            .expect("set listener non-blocking");
        let addr = std_listener.local_addr().expect("listener address");
        let state: Shared = Arc::default();
        let (shutdown, mut stop) = oneshot::channel::<()>();
        let served = Arc::clone(&state);
        let thread = std::thread::Builder::new()
            .name("route53-server".into())
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("build server runtime");
                rt.block_on(async move {
                    let listener =
                        TcpListener::from_std(std_listener).expect("register listener with tokio");
                    loop {
                        tokio::select! {
                            _ = &mut stop => break,
                            accepted = listener.accept() => {
                                let Ok((stream, _)) = accepted else { continue };
                                let state = Arc::clone(&served);
                                tokio::spawn(async move {
                                    if let Err(e) = serve(stream, &state).await {
                                        eprintln!("route53: connection error: {e}");
                                    }
                                });
                            }
                        }
                    }
                });
                // Dropping the runtime here cancels connections that are
                // still hanging.
            })
            .expect("spawn route53 server thread");
        FakeRoute53 {
            addr,
            state,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` (no trailing slash): the endpoint URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Adds or replaces a health check; takes effect for the next request.
    pub fn set_check(&self, id: &str, check: FakeHealthCheck) {
        lock(&self.state).checks.insert(id.to_owned(), check);
    }

    /// Forgets a health check: its reads then get `NoSuchHealthCheck`.
    pub fn remove_check(&self, id: &str) {
        lock(&self.state).checks.remove(id);
    }

    /// Makes every request fail (`Some`) or be served normally (`None`).
    pub fn set_failure(&self, failure: Option<FakeFailure>) {
        lock(&self.state).failure = failure;
    }

    /// Every request received so far, in arrival order (recorded before it
    /// is answered, so hanging requests are included).
    pub fn requests(&self) -> Vec<RecordedRequest> {
        lock(&self.state).requests.clone()
    }

    /// How many `GetHealthCheckStatus` requests named `id`.
    pub fn status_requests(&self, id: &str) -> usize {
        let path = status_path(id);
        lock(&self.state)
            .requests
            .iter()
            .filter(|r| r.method == "GET" && r.path() == path)
            .count()
    }

    /// How many `GetHealthCheck` requests named `id`.
    pub fn get_requests(&self, id: &str) -> usize {
        let path = check_path(id);
        lock(&self.state)
            .requests
            .iter()
            .filter(|r| r.method == "GET" && r.path() == path)
            .count()
    }

    /// The recorded requests, one line each, for assertion messages.
    pub fn describe_requests(&self) -> String {
        let mut s = String::from("--- route53 requests ---\n");
        for r in self.requests() {
            let _ = writeln!(s, "{} {} headers={:?}", r.method, r.target, r.headers);
        }
        s
    }
}

impl Drop for FakeRoute53 {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl std::fmt::Debug for FakeRoute53 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FakeRoute53")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// `/2013-04-01/healthcheck/{id}`
pub fn check_path(id: &str) -> String {
    format!("{API_PREFIX}/healthcheck/{id}")
}

/// `/2013-04-01/healthcheck/{id}/status`
pub fn status_path(id: &str) -> String {
    format!("{API_PREFIX}/healthcheck/{id}/status")
}

/// How long a connection may take to deliver its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
enum Answer {
    Respond(HttpResponse),
    Hang,
}

async fn serve(mut stream: TcpStream, state: &Shared) -> std::io::Result<()> {
    let request = match tokio::time::timeout(READ_TIMEOUT, read_request(&mut stream)).await {
        Ok(Ok(Some(r))) => r,
        // Connected and left (a port probe, or a client that gave up).
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(e)) => {
            let response = HttpResponse::text(400, "");
            let _ = write_response(&mut stream, &response).await;
            return Err(e);
        }
        Err(_) => return Err(std::io::Error::other("request not complete in time")),
    };
    let answer = {
        let mut st = lock(state);
        st.requests.push(request.clone());
        st.next_request_id += 1;
        let request_id = request_id(st.next_request_id);
        answer(&st, &request, request_id)
    };
    match answer {
        Answer::Respond(response) => write_response(&mut stream, &response).await,
        Answer::Hang => {
            // Until the client gives up (read returns 0 or fails) or the
            // server stops (the runtime drops this task).
            let mut sink = [0u8; 1024];
            while matches!(stream.read(&mut sink).await, Ok(n) if n > 0) {}
            Ok(())
        }
    }
}

/// A UUID-shaped request id, as in `x-amzn-RequestId`.
fn request_id(n: u64) -> String {
    format!("5f1c0a7e-53d0-4b8e-9c1a-{n:012x}")
}

fn answer(state: &State, req: &RecordedRequest, request_id: String) -> Answer {
    let error = |status: u16, kind: &str, code: &str, message: &str| {
        Answer::Respond(error_response(
            status,
            kind,
            code,
            message,
            request_id.clone(),
        ))
    };
    match state.failure {
        Some(FakeFailure::Hang) => return Answer::Hang,
        Some(FakeFailure::Throttling) => {
            return error(400, "Sender", "Throttling", "Rate exceeded");
        }
        Some(FakeFailure::Internal) => {
            return error(
                500,
                "Receiver",
                "InternalFailure",
                "The request processing has failed because of an unknown error, exception or \
                 failure.",
            );
        }
        None => {}
    }
    let unknown = || error(404, "Sender", "UnknownOperation", "Unknown operation");
    let signed = req
        .header("authorization")
        .is_some_and(|a| a.starts_with("AWS4-HMAC-SHA256 "));
    if !signed {
        return error(
            403,
            "Sender",
            "MissingAuthenticationToken",
            "Missing Authentication Token",
        );
    }

    let Some(rest) = req.path().strip_prefix(API_PREFIX) else {
        return unknown();
    };
    let Some(rest) = rest.strip_prefix("/healthcheck/") else {
        return unknown();
    };
    let (id, want_status) = match rest.strip_suffix("/status") {
        Some(id) => (id, true),
        None => (rest, false),
    };
    let id = percent_decode(id);
    if id.is_empty() || id.contains('/') {
        return unknown();
    }
    if req.method != "GET" {
        // Only the reads are modelled.
        return error(
            405,
            "Sender",
            "UnsupportedOperation",
            "The fake Route 53 answers GET only",
        );
    }
    let Some(check) = state.checks.get(&id) else {
        return error(
            404,
            "Sender",
            "NoSuchHealthCheck",
            &format!("No health check exists with the specified ID {id}"),
        );
    };
    if !want_status {
        return Answer::Respond(
            HttpResponse::xml(200, get_health_check_xml(&id, check))
                .with_header("x-amzn-RequestId", &request_id),
        );
    }
    if check.disabled || check.disabled_after_get {
        return error(400, "Sender", "InvalidInput", &disabled_status_message(&id));
    }
    Answer::Respond(
        HttpResponse::xml(200, get_health_check_status_xml(check))
            .with_header("x-amzn-RequestId", &request_id),
    )
}

/// `GetHealthCheckResponse` for an HTTPS check of a DSQL-looking endpoint,
/// with the elements the SDK requires (Id, CallerReference,
/// HealthCheckConfig with Type, HealthCheckVersion) in the model's order.
pub fn get_health_check_xml(id: &str, check: &FakeHealthCheck) -> String {
    let id = xml_escape(id);
    format!(
        "<?xml version=\"1.0\"?>\n\
         <GetHealthCheckResponse xmlns=\"{ROUTE53_XMLNS}\">\n\
         \x20 <HealthCheck>\n\
         \x20   <Id>{id}</Id>\n\
         \x20   <CallerReference>dsql-proxy-test-{id}</CallerReference>\n\
         \x20   <HealthCheckConfig>\n\
         \x20     <Port>443</Port>\n\
         \x20     <Type>HTTPS</Type>\n\
         \x20     <ResourcePath>/health</ResourcePath>\n\
         \x20     <FullyQualifiedDomainName>health.example.com</FullyQualifiedDomainName>\n\
         \x20     <RequestInterval>30</RequestInterval>\n\
         \x20     <FailureThreshold>3</FailureThreshold>\n\
         \x20     <MeasureLatency>false</MeasureLatency>\n\
         \x20     <Inverted>{inverted}</Inverted>\n\
         \x20     <Disabled>{disabled}</Disabled>\n\
         \x20     <EnableSNI>true</EnableSNI>\n\
         \x20   </HealthCheckConfig>\n\
         \x20   <HealthCheckVersion>1</HealthCheckVersion>\n\
         \x20 </HealthCheck>\n\
         </GetHealthCheckResponse>\n",
        inverted = check.inverted,
        disabled = check.disabled,
    )
}

/// `GetHealthCheckStatusResponse`: one `HealthCheckObservation` per entry,
/// each checker with its own address and a recent `CheckedTime`.
pub fn get_health_check_status_xml(check: &FakeHealthCheck) -> String {
    let now = SystemTime::now();
    let mut per_region: HashMap<&str, u8> = HashMap::new();
    let mut out = format!(
        "<?xml version=\"1.0\"?>\n\
         <GetHealthCheckStatusResponse xmlns=\"{ROUTE53_XMLNS}\">\n\
         \x20 <HealthCheckObservations>\n"
    );
    for (i, (region, success)) in check.observations.iter().enumerate() {
        let nth = per_region.entry(region.as_str()).or_insert(0);
        let ip = checker_ip(region, *nth);
        *nth = nth.wrapping_add(1);
        let status = if *success {
            SUCCESS_STATUS
        } else {
            FAILURE_STATUS
        };
        // Checkers report at different moments within the interval.
        let checked = now - Duration::from_millis(1_000 + 1_733 * i as u64 % 29_000);
        let _ = write!(
            out,
            "    <HealthCheckObservation>\n\
             \x20     <Region>{region}</Region>\n\
             \x20     <IPAddress>{ip}</IPAddress>\n\
             \x20     <StatusReport>\n\
             \x20       <Status>{status}</Status>\n\
             \x20       <CheckedTime>{time}</CheckedTime>\n\
             \x20     </StatusReport>\n\
             \x20   </HealthCheckObservation>\n",
            region = xml_escape(region),
            status = xml_escape(status),
            time = iso8601_millis(checked),
        );
    }
    out.push_str(
        "  </HealthCheckObservations>\n\
         </GetHealthCheckStatusResponse>\n",
    );
    out
}

/// The `nth` checker address of `region` (regions not in
/// [`CHECKER_REGIONS`] get TEST-NET-3 addresses).
fn checker_ip(region: &str, nth: u8) -> String {
    match CHECKER_REGIONS.iter().find(|(r, _, _)| *r == region) {
        Some((_, [a, b, c], base)) => format!("{a}.{b}.{c}.{}", base.saturating_add(4 + nth % 60)),
        None => format!("203.0.113.{}", 10 + nth % 200),
    }
}

/// `2024-01-02T03:04:05.678Z`, Route 53's timestamp format.
fn iso8601_millis(t: SystemTime) -> String {
    let secs = rfc3339(t);
    let millis = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.subsec_millis())
        .unwrap_or(0);
    format!("{}.{millis:03}Z", secs.trim_end_matches('Z'))
}

/// Route 53's error document.
fn error_response(
    status: u16,
    kind: &str,
    code: &str,
    message: &str,
    request_id: String,
) -> HttpResponse {
    HttpResponse::xml(
        status,
        format!(
            "<?xml version=\"1.0\"?>\n\
             <ErrorResponse xmlns=\"{ROUTE53_XMLNS}\">\n\
             \x20 <Error>\n\
             \x20   <Type>{kind}</Type>\n\
             \x20   <Code>{code}</Code>\n\
             \x20   <Message>{}</Message>\n\
             \x20 </Error>\n\
             \x20 <RequestId>{request_id}</RequestId>\n\
             </ErrorResponse>\n",
            xml_escape(message)
        ),
    )
    .with_header("x-amzn-RequestId", &request_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_spread_over_regions() {
        let check = FakeHealthCheck::with_successes(3, 16);
        assert_eq!(check.observations.len(), 16);
        assert_eq!(check.observations.iter().filter(|(_, ok)| *ok).count(), 3);
        assert_eq!(check.observations[0].0, "us-east-1");
        assert_eq!(check.observations[8].0, "us-east-1");
        let xml = get_health_check_status_xml(&check);
        assert_eq!(xml.matches("<HealthCheckObservation>").count(), 16);
        assert_eq!(xml.matches("<Status>Success: ").count(), 3);
        assert!(xml.contains("<IPAddress>54.243.31.196</IPAddress>"));
        assert!(xml.contains("<IPAddress>54.243.31.197</IPAddress>"));
    }

    #[test]
    fn checked_time_is_iso8601_with_millis() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1_631_935_916_042);
        assert_eq!(iso8601_millis(t), "2021-09-18T03:31:56.042Z");
    }

    #[test]
    fn disabled_message_names_the_special_status() {
        assert!(disabled_status_message("abc").contains("special status of always healthy"));
    }
}
