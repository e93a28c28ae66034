use bytes::{Bytes, BytesMut};
use dsql_proxy_config::Secret;
use dsql_proxy_protocol::backend::{self, AuthRequest, BackendMessage, MAX_STARTUP_PHASE_BODY};
use dsql_proxy_protocol::scram::{self, ScramClient};
use dsql_proxy_protocol::startup::StartupParam;
use dsql_proxy_protocol::{md5, messages, startup, ProtocolError};
use dsql_proxy_routing::{Endpoint, FailureKind};

use super::BackendSession;
use crate::cancel::BackendKey;
use crate::io::{read_message, send};
use crate::stream::BackendStream;
use crate::SessionError;

fn protocol(endpoint: &Endpoint, cause: impl std::fmt::Display) -> SessionError {
    SessionError::BackendProtocol {
        endpoint: endpoint.describe(),
        cause: cause.to_string(),
    }
}

fn refused_by_proxy(endpoint: &Endpoint, message: String) -> SessionError {
    use dsql_proxy_protocol::backend::ErrorFields;
    SessionError::BackendRefused {
        endpoint: endpoint.describe(),
        fields: ErrorFields {
            fields: vec![
                (b'S', "FATAL".into()),
                (b'V', "FATAL".into()),
                (
                    b'C',
                    dsql_proxy_protocol::sqlstate::INVALID_AUTHORIZATION.into(),
                ),
                (b'M', message),
            ],
        },
    }
}

async fn next(
    endpoint: &Endpoint,
    stream: &mut BackendStream,
) -> Result<BackendMessage, SessionError> {
    let raw = match read_message(stream, MAX_STARTUP_PHASE_BODY).await {
        Ok(Ok(raw)) => raw,
        Ok(Err(e)) => return Err(protocol(endpoint, e)),
        Err(e) => {
            return Err(SessionError::BackendUnreachable {
                endpoint: endpoint.describe(),
                kind: FailureKind::Connection,
                cause: format!("connection lost during startup: {e}"),
            })
        }
    };
    backend::decode(&raw).map_err(|e: ProtocolError| protocol(endpoint, e))
}

async fn write(
    endpoint: &Endpoint,
    stream: &mut BackendStream,
    buf: &[u8],
) -> Result<(), SessionError> {
    send(stream, buf)
        .await
        .map_err(|e| SessionError::BackendUnreachable {
            endpoint: endpoint.describe(),
            kind: FailureKind::Connection,
            cause: format!("connection lost during startup: {e}"),
        })
}

/// Startup packet, authentication, then everything up to ReadyForQuery.
pub(super) async fn start_session(
    endpoint: &Endpoint,
    mut stream: BackendStream,
    params: &[StartupParam],
    user: &str,
    password: Option<&Secret>,
) -> Result<BackendSession, SessionError> {
    let mut buf = BytesMut::with_capacity(256);
    startup::encode_startup(&mut buf, params);
    write(endpoint, &mut stream, &buf).await?;

    authenticate(endpoint, &mut stream, user, password).await?;

    let mut parameters = Vec::new();
    let mut notices = Vec::new();
    let mut key = None;
    loop {
        match next(endpoint, &mut stream).await? {
            BackendMessage::ParameterStatus { name, value } => parameters.push((name, value)),
            BackendMessage::BackendKeyData(k) => key = Some(BackendKey(k)),
            BackendMessage::Notice(n) => notices.push(n),
            BackendMessage::ReadyForQuery { status } => {
                return Ok(BackendSession {
                    stream,
                    parameters,
                    notices,
                    key,
                    ready_status: status,
                })
            }
            BackendMessage::Error(fields) => {
                return Err(SessionError::BackendRefused {
                    endpoint: endpoint.describe(),
                    fields,
                })
            }
            // We never ask for a newer version or _pq_ options, so a server
            // that sends this is confused; it is harmless, though.
            BackendMessage::NegotiateProtocolVersion { .. } => {}
            other => {
                return Err(protocol(
                    endpoint,
                    format!("unexpected message during startup: {other:?}"),
                ))
            }
        }
    }
}

async fn authenticate(
    endpoint: &Endpoint,
    stream: &mut BackendStream,
    user: &str,
    password: Option<&Secret>,
) -> Result<(), SessionError> {
    let mut buf = BytesMut::with_capacity(256);
    loop {
        let request = match next(endpoint, stream).await? {
            BackendMessage::Auth(request) => request,
            BackendMessage::Error(fields) => {
                return Err(SessionError::BackendRefused {
                    endpoint: endpoint.describe(),
                    fields,
                })
            }
            BackendMessage::Notice(_) | BackendMessage::NegotiateProtocolVersion { .. } => continue,
            other => {
                return Err(protocol(
                    endpoint,
                    format!("expected an authentication request, got {other:?}"),
                ))
            }
        };
        let need_password = || {
            password.ok_or_else(|| {
                refused_by_proxy(
                    endpoint,
                    format!(
                        "endpoint {} asks for a password but dsql-proxy has no credentials for user \"{user}\"",
                        endpoint.name
                    ),
                )
            })
        };
        buf.clear();
        match request {
            AuthRequest::Ok => return Ok(()),
            AuthRequest::Cleartext => {
                let pw = need_password()?;
                if !messages::password_fits(pw.expose()) {
                    return Err(refused_by_proxy(endpoint, "the backend password is too long".into()));
                }
                messages::password(&mut buf, pw.expose());
                write(endpoint, stream, &buf).await?;
            }
            AuthRequest::Md5 { salt } => {
                let pw = need_password()?;
                messages::password(&mut buf, &md5::md5_response(user, pw.expose(), salt));
                write(endpoint, stream, &buf).await?;
            }
            AuthRequest::Sasl { mechanisms } => {
                if !mechanisms.iter().any(|m| m == scram::MECHANISM) {
                    return Err(refused_by_proxy(
                        endpoint,
                        format!("the backend offers SASL mechanisms {mechanisms:?}; dsql-proxy supports SCRAM-SHA-256"),
                    ));
                }
                let pw = need_password()?;
                scram_exchange(endpoint, stream, pw).await?;
            }
            AuthRequest::SaslContinue(_) | AuthRequest::SaslFinal(_) => {
                return Err(protocol(endpoint, "SASL message outside a SASL exchange"))
            }
            AuthRequest::Unsupported(code) => {
                return Err(refused_by_proxy(
                    endpoint,
                    format!("the backend asks for authentication method {code} (Kerberos/GSSAPI/SSPI), which dsql-proxy cannot answer"),
                ))
            }
        }
    }
}

async fn scram_exchange(
    endpoint: &Endpoint,
    stream: &mut BackendStream,
    password: &Secret,
) -> Result<(), SessionError> {
    let (mut client, first) = ScramClient::start(password.expose());
    let mut buf = BytesMut::with_capacity(256);
    messages::sasl_initial_response(&mut buf, scram::MECHANISM, Bytes::from(first));
    write(endpoint, stream, &buf).await?;

    let server_first = match next(endpoint, stream).await? {
        BackendMessage::Auth(AuthRequest::SaslContinue(data)) => data,
        BackendMessage::Error(fields) => {
            return Err(SessionError::BackendRefused {
                endpoint: endpoint.describe(),
                fields,
            })
        }
        other => {
            return Err(protocol(
                endpoint,
                format!("expected SASL continue, got {other:?}"),
            ))
        }
    };
    let (params, server_first) = client
        .parse_server_first(&server_first)
        .map_err(|e| protocol(endpoint, e))?;
    // PBKDF2 is deliberately slow; keep it off the I/O threads.
    let pw = password.clone();
    let salted = tokio::task::spawn_blocking(move || {
        scram::salted_password(pw.expose(), &params.salt, params.iterations)
    })
    .await
    .map_err(|e| protocol(endpoint, format!("SCRAM key derivation failed: {e}")))?;
    let client_final = client.client_final(&server_first, &salted);
    buf.clear();
    messages::sasl_response(&mut buf, Bytes::from(client_final));
    write(endpoint, stream, &buf).await?;

    match next(endpoint, stream).await? {
        BackendMessage::Auth(AuthRequest::SaslFinal(data)) => {
            client.verify_server_final(&data).map_err(|e| {
                protocol(
                    endpoint,
                    format!("{e}: the server could not prove it knows the password"),
                )
            })
        }
        BackendMessage::Error(fields) => Err(SessionError::BackendRefused {
            endpoint: endpoint.describe(),
            fields,
        }),
        other => Err(protocol(
            endpoint,
            format!("expected SASL final, got {other:?}"),
        )),
    }
}
