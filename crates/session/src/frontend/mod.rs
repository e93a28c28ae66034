//! The client side of a session up to the point where the backend takes
//! over: TLS negotiation, the startup packet and local authentication.

mod auth;

use bytes::BytesMut;
use dsql_proxy_config::ClientAuthMethod;
use dsql_proxy_config::Secret;
use dsql_proxy_protocol::scram::ScramVerifier;
use dsql_proxy_protocol::startup::TLS_HANDSHAKE_RECORD;
use dsql_proxy_protocol::{
    messages, sqlstate, CancelKey, InitialPacket, PgError, ProtocolVersion, StartupMessage,
};
use std::net::SocketAddr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsAcceptor;

use crate::io::{read_initial, send, Deadline};
use crate::stream::{ClientStream, Rewind, Transport};
use crate::SessionError;

/// Where a client connected from.
#[derive(Debug, Clone)]
pub enum Peer {
    Tcp(SocketAddr),
    Unix,
}

impl Peer {
    pub fn is_local(&self) -> bool {
        match self {
            Peer::Tcp(a) => a.ip().is_loopback(),
            Peer::Unix => true,
        }
    }
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Peer::Tcp(a) => write!(f, "{a}"),
            Peer::Unix => f.write_str("unix"),
        }
    }
}

/// What the client side needs from configuration.
pub struct FrontendSettings {
    pub tls: Option<TlsAcceptor>,
    pub auth: ClientAuthMethod,
    pub verifier: Option<ScramVerifier>,
    /// Ask for a cleartext password to pass through to the backend.
    pub ask_password: bool,
    /// Accept `trust` clients from non-loopback addresses.
    pub trust_remote: bool,
}

/// A client that finished startup and local authentication.
pub struct ClientHello {
    pub stream: ClientStream,
    pub startup: StartupMessage,
    pub version: ProtocolVersion,
    pub password: Option<Secret>,
}

pub enum Opening {
    Session(Box<ClientHello>),
    Cancel(CancelKey),
}

/// A handshake that failed, with the stream when the client can still be
/// sent an ErrorResponse.
pub struct Failure {
    pub stream: Option<ClientStream>,
    pub error: SessionError,
}

fn fail(stream: Option<ClientStream>, error: SessionError) -> Failure {
    Failure { stream, error }
}

/// Reads packets until a StartupMessage or CancelRequest arrives, handling
/// SSLRequest/GSSENCRequest and direct TLS on the way, then authenticates
/// the client locally.
pub async fn open(
    mut transport: Transport,
    peer: &Peer,
    settings: &FrontendSettings,
    deadline: &Deadline,
) -> Result<Opening, Failure> {
    let mut first = [0u8; 1];
    if let Err(e) = deadline.run(transport.read_exact(&mut first)).await {
        return Err(fail(Some(ClientStream::Plain(transport)), e));
    }
    let (mut stream, mut pending_first) = if first[0] == TLS_HANDSHAKE_RECORD {
        // PostgreSQL 17 direct TLS: a ClientHello instead of SSLRequest.
        let Some(acceptor) = &settings.tls else {
            let err = PgError::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                "direct TLS connection requested but TLS is not enabled on dsql-proxy",
            );
            return Err(fail(
                Some(ClientStream::Plain(transport)),
                SessionError::Rejected(err),
            ));
        };
        let tls = accept_tls(acceptor, Rewind::new(first.to_vec(), transport), deadline).await?;
        // PostgreSQL requires ALPN for direct TLS so that a TLS connection
        // meant for another protocol cannot be replayed into a session.
        let alpn_ok = tls.get_ref().1.alpn_protocol() == Some(crate::tls::POSTGRES_ALPN);
        let stream = ClientStream::Tls(Box::new(tls));
        if !alpn_ok {
            let err = PgError::fatal(
                sqlstate::PROTOCOL_VIOLATION,
                "direct TLS connection requires ALPN protocol \"postgresql\"",
            );
            return Err(fail(Some(stream), SessionError::Rejected(err)));
        }
        (stream, None)
    } else {
        (ClientStream::Plain(transport), Some(first[0]))
    };
    // PostgreSQL answers each encryption request once; a repeat is no
    // longer a negotiation but a bogus protocol version.
    let mut ssl_answered = false;
    let mut gss_answered = false;
    loop {
        let packet = match deadline
            .run(read_initial(&mut stream, pending_first.take()))
            .await
        {
            Ok(Ok(p)) => p,
            Ok(Err(e)) => return Err(fail(Some(stream), SessionError::ClientProtocol(e))),
            Err(e) => return Err(fail(Some(stream), e)),
        };
        match packet {
            InitialPacket::SslRequest if !stream.is_tls() && !ssl_answered => {
                ssl_answered = true;
                let Some(acceptor) = &settings.tls else {
                    // No local TLS: the client may continue in plaintext.
                    if let Err(e) = deadline.run(send(&mut stream, b"N")).await {
                        return Err(fail(Some(stream), e));
                    }
                    continue;
                };
                stream = match stream {
                    ClientStream::Plain(mut transport) => {
                        if let Err(e) = deadline.run(send(&mut transport, b"S")).await {
                            return Err(fail(None, e));
                        }
                        let tls =
                            accept_tls(acceptor, Rewind::new(Vec::new(), transport), deadline)
                                .await?;
                        ClientStream::Tls(Box::new(tls))
                    }
                    tls @ ClientStream::Tls(_) => tls,
                };
            }
            InitialPacket::GssEncRequest if !stream.is_tls() && !gss_answered => {
                gss_answered = true;
                if let Err(e) = deadline.run(send(&mut stream, b"N")).await {
                    return Err(fail(Some(stream), e));
                }
            }
            InitialPacket::SslRequest | InitialPacket::GssEncRequest => {
                let err = PgError::fatal(
                    sqlstate::PROTOCOL_VIOLATION,
                    "unexpected encryption request: encryption was already negotiated or refused",
                );
                return Err(fail(Some(stream), SessionError::Rejected(err)));
            }
            InitialPacket::Cancel(key) => return Ok(Opening::Cancel(key)),
            InitialPacket::Startup(startup) => {
                return finish_startup(stream, startup, peer, settings, deadline).await
            }
        }
    }
}

async fn accept_tls(
    acceptor: &TlsAcceptor,
    transport: Rewind<Transport>,
    deadline: &Deadline,
) -> Result<tokio_rustls::server::TlsStream<Rewind<Transport>>, Failure> {
    deadline
        .run(acceptor.accept(transport))
        .await
        .map_err(|e| fail(None, e))
}

async fn finish_startup(
    mut stream: ClientStream,
    startup: StartupMessage,
    peer: &Peer,
    settings: &FrontendSettings,
    deadline: &Deadline,
) -> Result<Opening, Failure> {
    let Some(user) = startup.param("user").filter(|u| !u.is_empty()) else {
        let err = PgError::fatal(
            sqlstate::INVALID_AUTHORIZATION,
            "no PostgreSQL user name specified in startup packet",
        );
        return Err(fail(Some(stream), SessionError::Rejected(err)));
    };
    let user = user.into_owned();
    let version = startup.requested.negotiated();
    if startup.needs_negotiation() {
        let mut buf = BytesMut::new();
        messages::negotiate_protocol_version(&mut buf, version, &startup.protocol_options);
        if let Err(e) = deadline.run(send(&mut stream, &buf)).await {
            return Err(fail(Some(stream), e));
        }
    }
    let password = match auth::authenticate(&mut stream, &user, peer, settings, deadline).await {
        Ok(p) => p,
        Err(e) => return Err(fail(Some(stream), e)),
    };
    Ok(Opening::Session(Box::new(ClientHello {
        stream,
        startup,
        version,
        password,
    })))
}

/// Sends the error to the client if it can still be told, then closes.
pub async fn reject(failure: Failure) -> SessionError {
    let Some(mut stream) = failure.stream else {
        return failure.error;
    };
    let err = failure.error;
    let mut buf = BytesMut::new();
    if err.encode_for_client(&mut buf) {
        // Bounded: a client that does not read must not hold the task.
        let quick = Deadline::after(std::time::Duration::from_secs(1));
        let _ = quick.run(send(&mut stream, &buf)).await;
        let _ = quick.run(stream.shutdown()).await;
        return err;
    }
    err
}
