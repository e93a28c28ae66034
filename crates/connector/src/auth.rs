//! The StartupMessage, the answer to the server's authentication request,
//! and everything up to the first ReadyForQuery.

use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use dsql_proxy_config::Secret;
use dsql_proxy_protocol::backend::{self, AuthRequest, BackendMessage, MAX_STARTUP_PHASE_BODY};
use dsql_proxy_protocol::scram::{self, ScramClient};
use dsql_proxy_protocol::{md5, messages, startup};
use dsql_proxy_routing::Endpoint;

use crate::io::{read_message, send};
use crate::stream::BackendStream;
use crate::{BackendConnection, BackendKey, ConnectError, StartupLogin};
use dsql_proxy_protocol::tracking::ParameterValues;

/// One startup exchange on an open transport. Remembers when the proxy
/// last wrote, so a refusal carries its round trip.
pub(crate) struct Handshake<'a> {
    endpoint: &'a Endpoint,
    stream: BackendStream,
    /// Whether a cleartext password request may be answered.
    cleartext_allowed: bool,
    last_sent: Instant,
}

impl<'a> Handshake<'a> {
    pub(crate) fn new(
        endpoint: &'a Endpoint,
        stream: BackendStream,
        cleartext_allowed: bool,
    ) -> Self {
        Self {
            endpoint,
            stream,
            cleartext_allowed,
            last_sent: Instant::now(),
        }
    }

    /// Startup packet, authentication, then everything up to ReadyForQuery.
    pub(crate) async fn run(
        mut self,
        login: &StartupLogin<'_>,
    ) -> Result<BackendConnection, ConnectError> {
        let mut buf = BytesMut::with_capacity(256);
        startup::encode_startup(&mut buf, login.params);
        self.write(&buf).await?;

        self.authenticate(login).await?;

        let mut parameters = ParameterValues::new();
        let mut notices = Vec::new();
        let mut key = None;
        loop {
            match self.next().await? {
                BackendMessage::ParameterStatus { name, value } => {
                    parameters.set(name.as_bytes(), value.as_bytes());
                }
                BackendMessage::BackendKeyData(k) => key = Some(BackendKey(k)),
                BackendMessage::Notice(n) => notices.push(n),
                BackendMessage::ReadyForQuery { status } => {
                    return Ok(BackendConnection {
                        stream: self.stream,
                        parameters,
                        notices,
                        key,
                        ready_status: status,
                        connected_at: std::time::Instant::now(),
                    })
                }
                BackendMessage::Error(fields) => return Err(self.refused(fields)),
                // We never ask for a newer version or _pq_ options, so a
                // server that sends this is confused; it is harmless, though.
                BackendMessage::NegotiateProtocolVersion { .. } => {}
                other => {
                    return Err(
                        self.protocol(format!("unexpected message during startup: {other:?}"))
                    )
                }
            }
        }
    }

    async fn authenticate(&mut self, login: &StartupLogin<'_>) -> Result<(), ConnectError> {
        let mut buf = BytesMut::with_capacity(256);
        loop {
            let request = match self.next().await? {
                BackendMessage::Auth(request) => request,
                BackendMessage::Error(fields) => return Err(self.refused(fields)),
                BackendMessage::Notice(_) | BackendMessage::NegotiateProtocolVersion { .. } => {
                    continue
                }
                other => {
                    return Err(
                        self.protocol(format!("expected an authentication request, got {other:?}"))
                    )
                }
            };
            buf.clear();
            match request {
                AuthRequest::Ok => return Ok(()),
                AuthRequest::Cleartext => {
                    // libpq's require_auth, for a proxy: a server that asks
                    // for the secret in the clear gets it only over a
                    // channel whose certificate names it.
                    if !self.cleartext_allowed {
                        return Err(self.declined(format!(
                            "endpoint {} asks for a cleartext password; dsql-proxy sends a password or \
                             IAM token in cleartext only with [backend] tls = \"verify-full\" (or \
                             allow_cleartext_password = true)",
                            self.endpoint.name
                        )));
                    }
                    let pw = self.need_password(login)?;
                    if !messages::password_fits(pw.expose()) {
                        return Err(self.declined("the backend password is too long".into()));
                    }
                    messages::password(&mut buf, pw.expose());
                    self.write(&buf).await?;
                }
                AuthRequest::Md5 { salt } => {
                    let pw = self.need_password(login)?;
                    messages::password(&mut buf, &md5::md5_response(login.user, pw.expose(), salt));
                    self.write(&buf).await?;
                }
                AuthRequest::Sasl { mechanisms } => {
                    if !mechanisms.iter().any(|m| m == scram::MECHANISM) {
                        return Err(self.declined(format!(
                            "the backend offers SASL mechanisms {mechanisms:?}; dsql-proxy supports SCRAM-SHA-256"
                        )));
                    }
                    let pw = self.need_password(login)?;
                    self.scram_exchange(pw).await?;
                }
                AuthRequest::SaslContinue(_) | AuthRequest::SaslFinal(_) => {
                    return Err(self.protocol("SASL message outside a SASL exchange".into()))
                }
                AuthRequest::Unsupported(code) => {
                    return Err(self.declined(format!(
                        "the backend asks for authentication method {code} (Kerberos/GSSAPI/SSPI), which dsql-proxy cannot answer"
                    )))
                }
            }
        }
    }

    async fn scram_exchange(&mut self, password: &Secret) -> Result<(), ConnectError> {
        let (mut client, first) = ScramClient::start(password.expose());
        let mut buf = BytesMut::with_capacity(256);
        messages::sasl_initial_response(&mut buf, scram::MECHANISM, Bytes::from(first));
        self.write(&buf).await?;

        let server_first = match self.next().await? {
            BackendMessage::Auth(AuthRequest::SaslContinue(data)) => data,
            BackendMessage::Error(fields) => return Err(self.refused(fields)),
            other => return Err(self.protocol(format!("expected SASL continue, got {other:?}"))),
        };
        let (params, server_first) = client
            .parse_server_first(&server_first)
            .map_err(|e| self.protocol(e.to_string()))?;
        // PBKDF2 is deliberately slow; keep it off the I/O threads.
        let pw = password.clone();
        let salted = tokio::task::spawn_blocking(move || {
            scram::salted_password(pw.expose(), &params.salt, params.iterations)
        })
        .await
        .map_err(|e| self.protocol(format!("SCRAM key derivation failed: {e}")))?;
        let client_final = client.client_final(&server_first, &salted);
        buf.clear();
        messages::sasl_response(&mut buf, Bytes::from(client_final));
        self.write(&buf).await?;

        match self.next().await? {
            BackendMessage::Auth(AuthRequest::SaslFinal(data)) => {
                client.verify_server_final(&data).map_err(|e| {
                    self.protocol(format!(
                        "{e}: the server could not prove it knows the password"
                    ))
                })
            }
            BackendMessage::Error(fields) => Err(self.refused(fields)),
            other => Err(self.protocol(format!("expected SASL final, got {other:?}"))),
        }
    }

    fn need_password<'l>(&self, login: &StartupLogin<'l>) -> Result<&'l Secret, ConnectError> {
        login.password.ok_or_else(|| {
            self.declined(format!(
                "endpoint {} asks for a password but dsql-proxy has no credentials for user \"{}\"",
                self.endpoint.name, login.user
            ))
        })
    }

    async fn next(&mut self) -> Result<BackendMessage, ConnectError> {
        let raw = match read_message(&mut self.stream, MAX_STARTUP_PHASE_BODY).await {
            Ok(Ok(raw)) => raw,
            Ok(Err(e)) => return Err(self.protocol(e.to_string())),
            Err(e) => return Err(self.lost(e)),
        };
        backend::decode(&raw).map_err(|e| self.protocol(e.to_string()))
    }

    async fn write(&mut self, buf: &[u8]) -> Result<(), ConnectError> {
        send(&mut self.stream, buf)
            .await
            .map_err(|e| self.lost(e))?;
        self.last_sent = Instant::now();
        Ok(())
    }

    fn round_trip(&self) -> Duration {
        self.last_sent.elapsed()
    }

    fn refused(&self, fields: dsql_proxy_protocol::backend::ErrorFields) -> ConnectError {
        ConnectError::Refused {
            endpoint: self.endpoint.describe(),
            fields,
            round_trip: self.round_trip(),
        }
    }

    fn declined(&self, reason: String) -> ConnectError {
        ConnectError::Declined {
            endpoint: self.endpoint.describe(),
            reason,
        }
    }

    fn protocol(&self, cause: String) -> ConnectError {
        ConnectError::Protocol {
            endpoint: self.endpoint.describe(),
            cause,
        }
    }

    fn lost(&self, e: std::io::Error) -> ConnectError {
        ConnectError::Transport {
            endpoint: self.endpoint.describe(),
            cause: format!("connection lost during startup: {e}"),
        }
    }
}
