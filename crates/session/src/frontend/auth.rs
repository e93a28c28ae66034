//! Local client authentication: trust, SCRAM-SHA-256 against the proxy's own
//! password, or a cleartext password request for passthrough.

use bytes::{Bytes, BytesMut};
use dsql_proxy_config::{ClientAuthMethod, Secret};
use dsql_proxy_protocol::scram::{self, ScramServer};
use dsql_proxy_protocol::{frontend, messages, sqlstate, PgError};

use super::{FrontendSettings, Peer};
use crate::io::{read_message, send, Deadline};
use crate::stream::ClientStream;
use crate::SessionError;

/// PostgreSQL's PG_MAX_AUTH_TOKEN_LENGTH.
const MAX_AUTH_MESSAGE: usize = 65_535;

fn password_failed(user: &str) -> SessionError {
    SessionError::Rejected(PgError::fatal(
        sqlstate::INVALID_PASSWORD,
        format!("password authentication failed for user \"{user}\""),
    ))
}

async fn read_auth_message(
    stream: &mut ClientStream,
    deadline: &Deadline,
) -> Result<dsql_proxy_protocol::RawMessage, SessionError> {
    Ok(deadline
        .run(read_message(stream, MAX_AUTH_MESSAGE))
        .await??)
}

/// Authenticates the client; returns its password when one was asked for.
pub(super) async fn authenticate(
    stream: &mut ClientStream,
    user: &str,
    peer: &Peer,
    settings: &FrontendSettings,
    deadline: &Deadline,
) -> Result<Option<Secret>, SessionError> {
    if settings.ask_password {
        // The password is the client's real database password: never ask
        // for it where it would cross a network in the clear.
        if !peer.is_local() && !stream.is_tls() {
            return Err(SessionError::Rejected(
                PgError::fatal(
                    sqlstate::INVALID_AUTHORIZATION,
                    format!(
                        "dsql-proxy passes the client's password to the database (auth = \
                         \"passthrough\") and asks for it only from loopback or Unix-socket \
                         clients or over TLS; {peer} connected without TLS"
                    ),
                )
                .with_hint(
                    "connect with sslmode=require (the proxy needs [listen] tls_cert_file and \
                     tls_key_file), or from this host",
                ),
            ));
        }
        return cleartext(stream, user, deadline).await.map(Some);
    }
    match (settings.auth, &settings.verifier) {
        (ClientAuthMethod::ScramSha256, Some(verifier)) => {
            scram_exchange(stream, user, verifier, deadline).await?;
            Ok(None)
        }
        (ClientAuthMethod::ScramSha256, None) => Err(SessionError::Setup(
            "scram-sha-256 client auth without a verifier".into(),
        )),
        (ClientAuthMethod::Trust, _) => {
            if peer.is_local() || settings.trust_remote {
                Ok(None)
            } else {
                Err(SessionError::Rejected(
                    PgError::fatal(
                        sqlstate::INVALID_AUTHORIZATION,
                        format!("dsql-proxy trusts only loopback clients; {peer} is not one"),
                    )
                    .with_hint(
                        "set [listen] auth = \"scram-sha-256\" with a password, or trust_remote = true",
                    ),
                ))
            }
        }
    }
}

async fn cleartext(
    stream: &mut ClientStream,
    user: &str,
    deadline: &Deadline,
) -> Result<Secret, SessionError> {
    let mut buf = BytesMut::new();
    messages::auth_cleartext(&mut buf);
    deadline.run(send(stream, &buf)).await?;
    let msg = read_auth_message(stream, deadline).await?;
    let password = frontend::decode_password(&msg)?;
    if password.is_empty() {
        return Err(password_failed(user));
    }
    Ok(Secret::new(password))
}

async fn scram_exchange(
    stream: &mut ClientStream,
    user: &str,
    verifier: &scram::ScramVerifier,
    deadline: &Deadline,
) -> Result<(), SessionError> {
    let mut buf = BytesMut::new();
    messages::auth_sasl(&mut buf, &[scram::MECHANISM]);
    deadline.run(send(stream, &buf)).await?;

    let msg = read_auth_message(stream, deadline).await?;
    let (mechanism, client_first) = frontend::decode_sasl_initial(&msg)?;
    if mechanism != scram::MECHANISM {
        return Err(SessionError::Rejected(PgError::fatal(
            sqlstate::PROTOCOL_VIOLATION,
            format!("client selected an invalid SASL authentication mechanism {mechanism:?}"),
        )));
    }
    let (server, server_first) =
        ScramServer::start(verifier, &client_first).map_err(|_| password_failed(user))?;
    buf.clear();
    messages::auth_sasl_continue(&mut buf, Bytes::from(server_first));
    deadline.run(send(stream, &buf)).await?;

    let msg = read_auth_message(stream, deadline).await?;
    let client_final = frontend::decode_sasl_response(&msg)?;
    let server_final = server
        .finish(&client_final)
        .map_err(|_| password_failed(user))?;
    buf.clear();
    messages::auth_sasl_final(&mut buf, Bytes::from(server_final));
    deadline.run(send(stream, &buf)).await
}
