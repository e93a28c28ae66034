//! Local stand-ins for the AWS endpoints the SDK's default credentials chain
//! talks to, speaking the real wire formats over plain HTTP/1.1 on
//! 127.0.0.1:
//!
//! * [`ContainerCredentialsServer`]: the ECS task / EKS Pod Identity agent
//!   endpoint (`AWS_CONTAINER_CREDENTIALS_FULL_URI`), JSON credentials,
//!   optional `Authorization` check.
//! * [`StsServer`]: STS `AssumeRoleWithWebIdentity` (EKS IRSA,
//!   `AWS_ENDPOINT_URL_STS`): form-encoded POST in, XML out, or STS's XML
//!   error document.
//! * [`ImdsServer`]: EC2 instance metadata, IMDSv2 only (session token from
//!   `PUT /latest/api/token`, required on every GET).
//!
//! Each server runs on its own thread with its own single-threaded tokio
//! runtime, so it keeps answering while a test blocks a runtime worker (the
//! stack's startup does), and records every request it got. Responses carry
//! `Connection: close`; the SDK's HTTP client then opens a new connection
//! per request, which keeps the parser here small.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use crate::dsql_stack::isolated_aws_env;

/// How long a connection may take to deliver a whole request.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// Requests larger than this are refused (the SDK's are a few hundred bytes).
const MAX_REQUEST: usize = 1 << 20;

/// One HTTP request as the server received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    /// The request target as sent: path and query.
    pub target: String,
    /// Header names lower-cased, in the order received.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl RecordedRequest {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The target without its query string.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or_default()
    }

    /// The body decoded as `application/x-www-form-urlencoded`.
    pub fn form(&self) -> Vec<(String, String)> {
        parse_form(&self.body)
    }

    /// The first value of form field `key`.
    pub fn form_value(&self, key: &str) -> Option<String> {
        self.form()
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }
}

/// What a handler answers.
#[derive(Clone, Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    pub fn new(status: u16, content_type: &str, body: impl Into<String>) -> Self {
        Self {
            status,
            headers: vec![("Content-Type".into(), content_type.into())],
            body: body.into(),
        }
    }
    pub fn text(status: u16, body: impl Into<String>) -> Self {
        Self::new(status, "text/plain", body)
    }
    pub fn json(status: u16, body: impl Into<String>) -> Self {
        Self::new(status, "application/json", body)
    }
    pub fn xml(status: u16, body: impl Into<String>) -> Self {
        Self::new(status, "text/xml", body)
    }
    pub fn with_header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }
}

type Handler = Arc<dyn Fn(&RecordedRequest) -> HttpResponse + Send + Sync>;

/// A minimal HTTP/1.1 server on 127.0.0.1 that hands each request to a
/// handler and records it. Stopped (and its thread joined) on drop.
pub struct HttpServer {
    name: &'static str,
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<RecordedRequest>>>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl HttpServer {
    /// Binds 127.0.0.1 on a free port and serves `handler` until dropped.
    pub fn start(
        name: &'static str,
        handler: impl Fn(&RecordedRequest) -> HttpResponse + Send + Sync + 'static,
    ) -> HttpServer {
        let std_listener = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .unwrap_or_else(|e| panic!("{name}: bind 127.0.0.1:0: {e}"));
        std_listener
            .set_nonblocking(true)
            .expect("set listener non-blocking");
        let addr = std_listener.local_addr().expect("listener address");
        let requests = Arc::new(Mutex::new(Vec::new()));
        let (shutdown, mut stop) = oneshot::channel::<()>();
        let handler: Handler = Arc::new(handler);
        let recorded = Arc::clone(&requests);
        let thread = std::thread::Builder::new()
            .name(format!("{name}-server"))
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
                                let handler = Arc::clone(&handler);
                                let recorded = Arc::clone(&recorded);
                                tokio::spawn(async move {
                                    if let Err(e) = serve(stream, &handler, &recorded).await {
                                        eprintln!("{name}: connection error: {e}");
                                    }
                                });
                            }
                        }
                    }
                });
            })
            .unwrap_or_else(|e| panic!("spawn {name} server thread: {e}"));
        HttpServer {
            name,
            addr,
            requests,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT` (no trailing slash).
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request received so far, in arrival order.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub fn request_count(&self) -> usize {
        self.requests
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// The recorded requests, one line each, for assertion messages.
    pub fn describe_requests(&self) -> String {
        let mut s = format!("--- {} requests ---\n", self.name);
        for r in self.requests() {
            let _ = writeln!(
                s,
                "{} {} headers={:?} body={:?}",
                r.method, r.target, r.headers, r.body
            );
        }
        s
    }
}

impl Drop for HttpServer {
    fn drop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl std::fmt::Debug for HttpServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpServer")
            .field("name", &self.name)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

/// Reads one request, answers it, closes.
async fn serve(
    mut stream: TcpStream,
    handler: &Handler,
    recorded: &Mutex<Vec<RecordedRequest>>,
) -> std::io::Result<()> {
    let request = match tokio::time::timeout(READ_TIMEOUT, read_request(&mut stream)).await {
        Ok(Ok(Some(r))) => r,
        // The client connected and left (or was a port probe).
        Ok(Ok(None)) => return Ok(()),
        Ok(Err(e)) => {
            let _ = write_response(
                &mut stream,
                &HttpResponse::text(400, format!("bad request: {e}")),
            )
            .await;
            return Err(e);
        }
        Err(_) => return Err(std::io::Error::other("request not complete in time")),
    };
    let response = handler(&request);
    recorded
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .push(request);
    write_response(&mut stream, &response).await
}

fn invalid(msg: impl Into<String>) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, msg.into())
}

pub(crate) async fn read_request(
    stream: &mut TcpStream,
) -> std::io::Result<Option<RecordedRequest>> {
    let mut buf = Vec::with_capacity(1024);
    let head_end = loop {
        if let Some(i) = find(&buf, b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_REQUEST {
            return Err(invalid("request head too large"));
        }
        let mut chunk = [0u8; 4096];
        let n = stream.read(&mut chunk).await?;
        if n == 0 {
            if buf.is_empty() {
                return Ok(None);
            }
            return Err(invalid("connection closed inside the request head"));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = std::str::from_utf8(&buf[..head_end]).map_err(|_| invalid("non-UTF-8 head"))?;
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default();
    let mut parts = request_line.split(' ');
    let (method, target, version) = match (parts.next(), parts.next(), parts.next()) {
        (Some(m), Some(t), Some(v)) if !m.is_empty() => (m.to_owned(), t.to_owned(), v),
        _ => return Err(invalid(format!("bad request line {request_line:?}"))),
    };
    if !version.starts_with("HTTP/1.") {
        return Err(invalid(format!("unsupported version {version:?}")));
    }
    let mut headers = Vec::new();
    for line in lines {
        let (k, v) = line
            .split_once(':')
            .ok_or_else(|| invalid(format!("bad header line {line:?}")))?;
        headers.push((k.trim().to_ascii_lowercase(), v.trim().to_owned()));
    }
    let get = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.clone())
    };
    let mut rest = buf[head_end + 4..].to_vec();
    let body = if get("transfer-encoding").is_some_and(|te| te.eq_ignore_ascii_case("chunked")) {
        read_chunked(stream, rest).await?
    } else {
        let len: usize = match get("content-length") {
            Some(v) => v
                .parse()
                .map_err(|_| invalid(format!("bad content-length {v:?}")))?,
            None => 0,
        };
        if len > MAX_REQUEST {
            return Err(invalid("body too large"));
        }
        while rest.len() < len {
            let mut chunk = [0u8; 4096];
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Err(invalid("connection closed inside the body"));
            }
            rest.extend_from_slice(&chunk[..n]);
        }
        rest.truncate(len);
        rest
    };
    Ok(Some(RecordedRequest {
        method,
        target,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }))
}

async fn read_chunked(stream: &mut TcpStream, mut buf: Vec<u8>) -> std::io::Result<Vec<u8>> {
    let mut body = Vec::new();
    let mut pos = 0;
    loop {
        // Need a size line.
        let line_end = loop {
            if let Some(i) = find(&buf[pos..], b"\r\n") {
                break pos + i;
            }
            fill(stream, &mut buf).await?;
        };
        let size_text = std::str::from_utf8(&buf[pos..line_end])
            .map_err(|_| invalid("bad chunk size"))?
            .split(';')
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned();
        let size = usize::from_str_radix(&size_text, 16)
            .map_err(|_| invalid(format!("bad chunk size {size_text:?}")))?;
        pos = line_end + 2;
        if size == 0 {
            // Trailers (if any) end with an empty line.
            while find(&buf[pos..], b"\r\n").is_none() {
                fill(stream, &mut buf).await?;
            }
            return Ok(body);
        }
        while buf.len() < pos + size + 2 {
            fill(stream, &mut buf).await?;
        }
        body.extend_from_slice(&buf[pos..pos + size]);
        pos += size + 2;
        if body.len() > MAX_REQUEST {
            return Err(invalid("body too large"));
        }
    }
}

async fn fill(stream: &mut TcpStream, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let mut chunk = [0u8; 4096];
    let n = stream.read(&mut chunk).await?;
    if n == 0 {
        return Err(invalid("connection closed inside a chunked body"));
    }
    buf.extend_from_slice(&chunk[..n]);
    Ok(())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        500 => "Internal Server Error",
        _ => "Status",
    }
}

pub(crate) async fn write_response(
    stream: &mut TcpStream,
    response: &HttpResponse,
) -> std::io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 {} {}\r\n",
        response.status,
        reason(response.status)
    );
    for (k, v) in &response.headers {
        let _ = write!(out, "{k}: {v}\r\n");
    }
    let _ = write!(
        out,
        "Content-Length: {}\r\nConnection: close\r\n\r\n",
        response.body.len()
    );
    out.push_str(&response.body);
    stream.write_all(out.as_bytes()).await?;
    stream.flush().await?;
    stream.shutdown().await
}

/// Decodes `application/x-www-form-urlencoded`.
pub fn parse_form(body: &str) -> Vec<(String, String)> {
    body.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

/// Percent-decoding with `+` as space (form encoding).
pub fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len()
                && bytes[i + 1].is_ascii_hexdigit()
                && bytes[i + 2].is_ascii_hexdigit() =>
            {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("00");
                out.push(u8::from_str_radix(hex, 16).unwrap_or(0));
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Percent-encodes everything but RFC 3986 unreserved characters (as SigV4
/// query strings do).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// `2024-01-02T03:04:05Z`: the timestamp format of STS, ECS and IMDS
/// (`Expiration`). Times before the epoch are clamped to it.
pub fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0) as i64;
    let days = secs.div_euclid(86_400);
    let tod = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        tod / 3600,
        tod % 3600 / 60,
        tod % 60
    )
}

/// Days since 1970-01-01 to (year, month, day), proleptic Gregorian
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// A set of temporary credentials as the endpoints hand them out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TempCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    pub expiration: SystemTime,
}

impl TempCredentials {
    /// Fresh, distinct credentials valid for `valid_for`, tagged with
    /// `label` (upper-case ASCII letters and digits) so a test can tell sets
    /// apart in logs. The session token contains `+`, `/` and `=` like real
    /// ones, so URL-encoding mistakes show up as signature failures.
    pub fn generate(label: &str, valid_for: Duration) -> Self {
        Self::generate_expiring(label, SystemTime::now() + valid_for)
    }

    /// Like [`Self::generate`] with an absolute expiration (may be in the past).
    pub fn generate_expiring(label: &str, expiration: SystemTime) -> Self {
        static SEQ: AtomicU64 = AtomicU64::new(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let nonce = format!(
            "{:X}{:04X}{n:04X}",
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or_default(),
            std::process::id() & 0xffff
        );
        let label: String = label
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .map(|c| c.to_ascii_uppercase())
            .collect();
        Self {
            access_key_id: format!("ASIA{label}{nonce}"),
            secret_access_key: format!("sEcReT/{label}+{nonce}/wJalrXUtnFEMIK7MDENGbPxRfiCY"),
            session_token: format!(
                "IQoJb3JpZ2luX2VjE{label}Session+Token/{nonce}//////////wEaCXVzLWVhc3QtMSJH=="
            ),
            expiration,
        }
    }

    /// `(access key id, secret)` for `EmulatorOptions::credentials`.
    pub fn key_pair(&self) -> (String, String) {
        (self.access_key_id.clone(), self.secret_access_key.clone())
    }

    /// The session token as it appears inside a presigned URL.
    pub fn session_token_encoded(&self) -> String {
        percent_encode(&self.session_token)
    }
}

// ---------------------------------------------------------------------------
// ECS / EKS Pod Identity container credentials

/// The container credentials endpoint: `GET <path>` answers the ECS/EKS
/// JSON document. The n-th request gets `credentials[min(n, len - 1)]`, so
/// a test can rotate keys between calls. When `authorization` is set, a
/// request without exactly that `Authorization` header gets a 401.
pub struct ContainerCredentialsServer {
    pub http: HttpServer,
    path: String,
    credentials: Arc<Mutex<Vec<TempCredentials>>>,
}

impl ContainerCredentialsServer {
    pub fn start(
        path: &str,
        authorization: Option<&str>,
        credentials: Vec<TempCredentials>,
    ) -> Self {
        assert!(!credentials.is_empty(), "give the server some credentials");
        let credentials = Arc::new(Mutex::new(credentials));
        let served = Arc::new(AtomicU64::new(0));
        let expected_path = path.to_owned();
        let expected_auth = authorization.map(str::to_owned);
        let creds = Arc::clone(&credentials);
        let http = HttpServer::start("container-credentials", move |req| {
            if req.method != "GET" {
                return HttpResponse::text(405, "method not allowed");
            }
            if req.path() != expected_path {
                return HttpResponse::text(404, "not found");
            }
            if let Some(want) = &expected_auth {
                if req.header("authorization") != Some(want.as_str()) {
                    return HttpResponse::json(
                        401,
                        r#"{"code":"AccessDeniedException","message":"Authorization header is missing or invalid"}"#,
                    );
                }
            }
            let n = served.fetch_add(1, Ordering::SeqCst) as usize;
            let all = creds.lock().unwrap_or_else(PoisonError::into_inner);
            let c = &all[n.min(all.len() - 1)];
            HttpResponse::json(
                200,
                format!(
                    "{{\"RoleArn\":\"arn:aws:iam::123456789012:role/test\",\
                     \"AccessKeyId\":\"{}\",\"SecretAccessKey\":\"{}\",\"Token\":\"{}\",\
                     \"AccountId\":\"123456789012\",\"Expiration\":\"{}\"}}",
                    c.access_key_id,
                    c.secret_access_key,
                    c.session_token,
                    rfc3339(c.expiration)
                ),
            )
        });
        Self {
            http,
            path: path.to_owned(),
            credentials,
        }
    }

    /// The value for `AWS_CONTAINER_CREDENTIALS_FULL_URI`.
    pub fn full_uri(&self) -> String {
        format!("{}{}", self.http.base_url(), self.path)
    }

    /// Replaces the credentials (the request counter keeps counting).
    pub fn set_credentials(&self, credentials: Vec<TempCredentials>) {
        assert!(!credentials.is_empty());
        *self
            .credentials
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = credentials;
    }

    /// Isolated AWS environment pointing the chain at this server, with
    /// `AWS_CONTAINER_AUTHORIZATION_TOKEN` when `token` is set.
    pub fn env(&self, token: Option<&str>) -> Vec<(String, String)> {
        let mut env = isolated_aws_env();
        env.push(("AWS_CONTAINER_CREDENTIALS_FULL_URI".into(), self.full_uri()));
        if let Some(t) = token {
            env.push(("AWS_CONTAINER_AUTHORIZATION_TOKEN".into(), t.into()));
        }
        env
    }

    /// Like [`Self::env`] with `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`
    /// (EKS Pod Identity) instead.
    pub fn env_with_token_file(&self, token_file: &Path) -> Vec<(String, String)> {
        let mut env = self.env(None);
        env.push((
            "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE".into(),
            token_file.display().to_string(),
        ));
        env
    }
}

// ---------------------------------------------------------------------------
// STS AssumeRoleWithWebIdentity

/// How [`StsServer`] answers.
#[derive(Clone, Debug)]
pub enum StsMode {
    /// `AssumeRoleWithWebIdentityResponse` with these credentials.
    Success(TempCredentials),
    /// HTTP 400 with STS's XML error, `Sender` / `AccessDenied`.
    AccessDenied,
}

pub const STS_ACCESS_DENIED_MESSAGE: &str =
    "Not authorized to perform sts:AssumeRoleWithWebIdentity";

/// STS's query protocol: `POST /` with a form body; answers
/// `AssumeRoleWithWebIdentity` per [`StsMode`] and refuses other actions
/// like STS does.
pub struct StsServer {
    pub http: HttpServer,
    mode: Arc<Mutex<StsMode>>,
}

impl StsServer {
    pub fn start(mode: StsMode) -> Self {
        let mode = Arc::new(Mutex::new(mode));
        let current = Arc::clone(&mode);
        let seq = AtomicU64::new(0);
        let http = HttpServer::start("sts", move |req| {
            let request_id = format!(
                "c6104cbe-af31-11e0-8154-{:012x}",
                seq.fetch_add(1, Ordering::Relaxed)
            );
            if req.method != "POST" {
                return sts_error(
                    405,
                    "Sender",
                    "InvalidAction",
                    "STS accepts POST only",
                    &request_id,
                );
            }
            let action = req.form_value("Action").unwrap_or_default();
            if action != "AssumeRoleWithWebIdentity" {
                return sts_error(
                    400,
                    "Sender",
                    "InvalidAction",
                    &format!("Could not find operation {action} for version NO_VERSION_SPECIFIED"),
                    &request_id,
                );
            }
            let mode = current
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            match mode {
                StsMode::AccessDenied => sts_error(
                    400,
                    "Sender",
                    "AccessDenied",
                    STS_ACCESS_DENIED_MESSAGE,
                    &request_id,
                ),
                StsMode::Success(c) => {
                    let role_arn = req.form_value("RoleArn").unwrap_or_default();
                    let session = req.form_value("RoleSessionName").unwrap_or_default();
                    let role = role_arn.rsplit('/').next().unwrap_or_default().to_owned();
                    HttpResponse::xml(
                        200,
                        format!(
                            "<AssumeRoleWithWebIdentityResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\n\
                             \x20 <AssumeRoleWithWebIdentityResult>\n\
                             \x20   <SubjectFromWebIdentityToken>system:serviceaccount:default:app</SubjectFromWebIdentityToken>\n\
                             \x20   <Audience>sts.amazonaws.com</Audience>\n\
                             \x20   <AssumedRoleUser>\n\
                             \x20     <Arn>arn:aws:sts::123456789012:assumed-role/{role}/{session}</Arn>\n\
                             \x20     <AssumedRoleId>AROACLKWSDQRAOEXAMPLE:{session}</AssumedRoleId>\n\
                             \x20   </AssumedRoleUser>\n\
                             \x20   <Credentials>\n\
                             \x20     <SessionToken>{token}</SessionToken>\n\
                             \x20     <SecretAccessKey>{secret}</SecretAccessKey>\n\
                             \x20     <Expiration>{exp}</Expiration>\n\
                             \x20     <AccessKeyId>{key}</AccessKeyId>\n\
                             \x20   </Credentials>\n\
                             \x20   <Provider>arn:aws:iam::123456789012:oidc-provider/oidc.eks.us-east-1.amazonaws.com/id/EXAMPLE</Provider>\n\
                             \x20 </AssumeRoleWithWebIdentityResult>\n\
                             \x20 <ResponseMetadata>\n\
                             \x20   <RequestId>{request_id}</RequestId>\n\
                             \x20 </ResponseMetadata>\n\
                             </AssumeRoleWithWebIdentityResponse>\n",
                            token = xml_escape(&c.session_token),
                            secret = xml_escape(&c.secret_access_key),
                            exp = rfc3339(c.expiration),
                            key = xml_escape(&c.access_key_id),
                        ),
                    )
                    .with_header("x-amzn-RequestId", &request_id)
                }
            }
        });
        Self { http, mode }
    }

    pub fn set_mode(&self, mode: StsMode) {
        *self.mode.lock().unwrap_or_else(PoisonError::into_inner) = mode;
    }

    /// The value for `AWS_ENDPOINT_URL_STS`.
    pub fn endpoint_url(&self) -> String {
        self.http.base_url()
    }

    /// Isolated AWS environment for IRSA: token file, role, session name and
    /// this server as the STS endpoint.
    pub fn env(&self, token_file: &Path, role_arn: &str, session: &str) -> Vec<(String, String)> {
        let mut env = isolated_aws_env();
        env.extend([
            (
                "AWS_WEB_IDENTITY_TOKEN_FILE".to_owned(),
                token_file.display().to_string(),
            ),
            ("AWS_ROLE_ARN".to_owned(), role_arn.to_owned()),
            ("AWS_ROLE_SESSION_NAME".to_owned(), session.to_owned()),
            ("AWS_ENDPOINT_URL_STS".to_owned(), self.endpoint_url()),
        ]);
        env
    }
}

/// STS's XML error document (query protocol).
fn sts_error(status: u16, kind: &str, code: &str, message: &str, request_id: &str) -> HttpResponse {
    HttpResponse::xml(
        status,
        format!(
            "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\">\n\
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
    .with_header("x-amzn-RequestId", request_id)
}

pub fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// A JWT-looking web identity token (header.payload.signature, base64url).
pub const WEB_IDENTITY_TOKEN: &str = "eyJhbGciOiJSUzI1NiIsImtpZCI6IjEyMzQ1NiJ9.\
eyJhdWQiOlsic3RzLmFtYXpvbmF3cy5jb20iXSwiZXhwIjo0MTAyNDQ0ODAwLCJpc3MiOiJodHRwczovL29pZGMuZWtzLnVzLWVhc3QtMS5hbWF6b25hd3MuY29tL2lkL0VYQU1QTEUiLCJzdWIiOiJzeXN0ZW06c2VydmljZWFjY291bnQ6ZGVmYXVsdDphcHAifQ.\
c2lnbmF0dXJlLW5vdC1jaGVja2VkLWJ5LXRoZS1mYWtlLXN0cw";

// ---------------------------------------------------------------------------
// IMDSv2

pub const IMDS_TOKEN_PATH: &str = "/latest/api/token";
pub const IMDS_CREDENTIALS_PATH: &str = "/latest/meta-data/iam/security-credentials/";
pub const IMDS_TTL_HEADER: &str = "x-aws-ec2-metadata-token-ttl-seconds";
pub const IMDS_TOKEN_HEADER: &str = "x-aws-ec2-metadata-token";

/// EC2 instance metadata, IMDSv2 only: `PUT /latest/api/token` with a TTL
/// header (1..=21600) issues a session token; GETs without it get a 401.
/// Serves the instance profile's role name and its credentials.
pub struct ImdsServer {
    pub http: HttpServer,
    /// The session token this server issues.
    pub token: String,
    pub role: String,
}

impl ImdsServer {
    pub fn start(role: &str, credentials: TempCredentials) -> Self {
        let token = format!(
            "AQAEAImdsV2SessionToken{}==",
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or_default()
        );
        let issued = token.clone();
        let role_name = role.to_owned();
        let http = HttpServer::start("imds", move |req| {
            if req.path() == IMDS_TOKEN_PATH {
                if req.method != "PUT" {
                    return HttpResponse::text(405, "");
                }
                let ttl = req
                    .header(IMDS_TTL_HEADER)
                    .and_then(|v| v.parse::<u32>().ok());
                return match ttl {
                    Some(ttl @ 1..=21_600) => HttpResponse::text(200, issued.clone())
                        .with_header(IMDS_TTL_HEADER, &ttl.to_string()),
                    _ => HttpResponse::text(400, ""),
                };
            }
            if req.method != "GET" {
                return HttpResponse::text(405, "");
            }
            if req.header(IMDS_TOKEN_HEADER) != Some(issued.as_str()) {
                return HttpResponse::text(401, "");
            }
            let Some(rest) = req.path().strip_prefix(IMDS_CREDENTIALS_PATH) else {
                return HttpResponse::text(404, "");
            };
            if rest.is_empty() {
                return HttpResponse::text(200, role_name.clone());
            }
            if rest != role_name {
                return HttpResponse::text(404, "");
            }
            HttpResponse::text(
                200,
                format!(
                    "{{\n  \"Code\" : \"Success\",\n  \"LastUpdated\" : \"{}\",\n  \"Type\" : \"AWS-HMAC\",\n  \
                     \"AccessKeyId\" : \"{}\",\n  \"SecretAccessKey\" : \"{}\",\n  \"Token\" : \"{}\",\n  \
                     \"Expiration\" : \"{}\"\n}}",
                    rfc3339(SystemTime::now()),
                    credentials.access_key_id,
                    credentials.secret_access_key,
                    credentials.session_token,
                    rfc3339(credentials.expiration)
                ),
            )
        });
        Self {
            http,
            token,
            role: role.to_owned(),
        }
    }

    /// Isolated AWS environment with instance metadata enabled and pointed
    /// at this server.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = isolated_aws_env()
            .into_iter()
            .filter(|(k, _)| k != "AWS_EC2_METADATA_DISABLED")
            .collect();
        env.push(("AWS_EC2_METADATA_DISABLED".into(), "false".into()));
        env.push((
            "AWS_EC2_METADATA_SERVICE_ENDPOINT".into(),
            self.http.base_url(),
        ));
        env
    }
}

// ---------------------------------------------------------------------------
// Shared config files

/// `AWS_CONFIG_FILE` and `AWS_SHARED_CREDENTIALS_FILE` in a tempdir.
pub struct ProfileFiles {
    dir: tempfile::TempDir,
}

impl ProfileFiles {
    pub fn new(config: &str, credentials: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("aws-profile-")
            .tempdir()
            .expect("create profile tempdir");
        let files = Self { dir };
        files.write_config(config);
        files.write_credentials(credentials);
        files
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("config")
    }

    pub fn credentials_path(&self) -> PathBuf {
        self.dir.path().join("credentials")
    }

    /// Replaces the config file atomically (write, then rename).
    pub fn write_config(&self, text: &str) {
        replace_file(&self.config_path(), text);
    }

    /// Replaces the credentials file atomically (write, then rename).
    pub fn write_credentials(&self, text: &str) {
        replace_file(&self.credentials_path(), text);
    }

    /// The isolated AWS environment with these files instead of the
    /// nonexistent ones.
    pub fn env(&self) -> Vec<(String, String)> {
        let mut env: Vec<(String, String)> = isolated_aws_env()
            .into_iter()
            .filter(|(k, _)| k != "AWS_CONFIG_FILE" && k != "AWS_SHARED_CREDENTIALS_FILE")
            .collect();
        env.push((
            "AWS_CONFIG_FILE".into(),
            self.config_path().display().to_string(),
        ));
        env.push((
            "AWS_SHARED_CREDENTIALS_FILE".into(),
            self.credentials_path().display().to_string(),
        ));
        env
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// Writes `path` via a temporary file and a rename, so a reader never sees
/// a half-written file.
pub fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap_or_else(|e| panic!("write {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path)
        .unwrap_or_else(|e| panic!("rename {} into place: {e}", path.display()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_631_935_916)),
            "2021-09-18T03:31:56Z"
        );
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "2000-02-29T00:00:00Z"
        );
    }

    #[test]
    fn form_round_trip() {
        let form = parse_form(
            "Action=AssumeRoleWithWebIdentity&RoleArn=arn%3Aaws%3Aiam%3A%3A1%3Arole%2Ft&X=a+b&E=",
        );
        assert_eq!(
            form[0],
            ("Action".into(), "AssumeRoleWithWebIdentity".into())
        );
        assert_eq!(form[1].1, "arn:aws:iam::1:role/t");
        assert_eq!(form[2].1, "a b");
        assert_eq!(form[3].1, "");
        assert_eq!(percent_decode(&percent_encode("a+b/c= d")), "a+b/c= d");
        assert_eq!(percent_decode("100%"), "100%");
    }
}
