//! One client session from accept to close: handshake, route, backend
//! startup, relay, and the close log line.

use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use dsql_proxy_credentials::{CredentialError, CredentialRequest};
use dsql_proxy_protocol::startup::StartupParam;
use dsql_proxy_protocol::{messages, sqlstate, PgError, StartupMessage};
use tokio::io::AsyncWriteExt;
use tracing::{debug, info, warn};

use crate::backend::{self, BackendSession};
use crate::cancel::CancelTarget;
use crate::frontend::{self, ClientHello, Opening, Peer};
use crate::io::{send, Deadline};
use crate::relay::Relay;
use crate::stream::Transport;
use crate::{ProxyContext, SessionError};

/// Runs one accepted connection to the end. Never panics on peer input and
/// always logs one line when a session (not a cancel) ends.
pub async fn run(ctx: Arc<ProxyContext>, transport: Transport, peer: Peer) {
    let started = Instant::now();
    let deadline = Deadline::after(ctx.startup_timeout);
    let hello = match frontend::open(transport, &peer, &ctx.frontend, deadline).await {
        Ok(Opening::Session(hello)) => hello,
        Ok(Opening::Cancel(key)) => return cancel_request(&ctx, key).await,
        Err(failure) => {
            let err = frontend::reject(failure).await;
            match err {
                // A client that connects and leaves (health checks, port
                // scanners) is not worth more than a debug line.
                SessionError::ClientIo(_) => {
                    debug!(client = %peer, error = %err, "client left during startup")
                }
                _ => {
                    info!(client = %peer, reason = %err.reason(), error = %err, "client rejected during startup")
                }
            }
            return;
        }
    };
    let ClientHello {
        mut stream,
        startup,
        version,
        password,
    } = *hello;
    let user = startup.param("user").unwrap_or_default().into_owned();
    let database = startup
        .param("database")
        .map(|d| d.into_owned())
        .unwrap_or_else(|| user.clone());

    let endpoint = match ctx.router.route() {
        Ok(e) => e,
        Err(e) => {
            let err = SessionError::Rejected(PgError::fatal(
                sqlstate::CANNOT_CONNECT_NOW,
                format!("dsql-proxy has no endpoint to route to: {e}"),
            ));
            let _ = frontend::reject(frontend::Failure {
                stream: Some(stream),
                error: err,
            })
            .await;
            warn!(client = %peer, %user, %database, error = %e, "no route for session");
            return;
        }
    };

    let established = async {
        let request = CredentialRequest {
            endpoint_host: &endpoint.host,
            endpoint_port: endpoint.port,
            region: endpoint.region.as_deref(),
            user: &user,
            client_password: password.as_ref(),
        };
        // Credential providers (STS, metadata) may be slow or down: the
        // client hears about it within connect_timeout either way.
        let secret = match tokio::time::timeout(
            ctx.backend.connect_timeout,
            ctx.credentials.password(request),
        )
        .await
        {
            Ok(Ok(s)) => Some(s),
            Ok(Err(e)) => return Err(credential_error(e)),
            Err(_) => {
                return Err(credential_error(CredentialError::AwsProvider(format!(
                    "no credentials within connect_timeout ({:?})",
                    ctx.backend.connect_timeout
                ))))
            }
        };
        let params = backend_parameters(&startup, &ctx);
        backend::connect(&endpoint, &ctx.backend, &params, &user, secret.as_ref()).await
    };
    let backend: BackendSession = match established.await {
        Ok(b) => b,
        Err(err) => {
            if let SessionError::BackendRefused { fields, .. } = &err {
                // An invalid-authorization answer means the secret itself
                // was refused: never hand it out again.
                if fields.code().starts_with("28") {
                    ctx.credentials.rejected(CredentialRequest {
                        endpoint_host: &endpoint.host,
                        endpoint_port: endpoint.port,
                        region: endpoint.region.as_deref(),
                        user: &user,
                        client_password: password.as_ref(),
                    });
                }
            }
            let err = explain_limits(err);
            warn!(
                client = %peer, %user, %database, endpoint = %endpoint.name,
                reason = %err.reason(), error = %err, "backend connection failed"
            );
            let _ = frontend::reject(frontend::Failure {
                stream: Some(stream),
                error: err,
            })
            .await;
            return;
        }
    };
    let BackendSession {
        stream: mut backend_stream,
        parameters,
        notices,
        key,
        ready_status,
    } = backend;

    // The client sees the backend's startup results with the proxy's own
    // cancel key, all in one write.
    let (client_key, _registration) = match key {
        Some(backend_key) => {
            let target = CancelTarget {
                backend_key,
                endpoint: Arc::clone(&endpoint),
            };
            let (k, r) = ctx.cancels.register(version.cancel_secret_len(), target);
            (Some(k), Some(r))
        }
        None => (None, None),
    };
    let mut buf = BytesMut::with_capacity(512);
    messages::auth_ok(&mut buf);
    for (name, value) in &parameters {
        messages::parameter_status(&mut buf, name, value);
    }
    for notice in &notices {
        messages::notice(&mut buf, &notice.fields);
    }
    if let Some(k) = &client_key {
        messages::backend_key_data(&mut buf, &k.0);
    }
    messages::ready_for_query(&mut buf, ready_status);
    if let Err(e) = send(&mut stream, &buf).await {
        debug!(client = %peer, error = %e, "client left before the session started");
        let mut terminate = BytesMut::new();
        messages::terminate(&mut terminate);
        let _ = send(&mut backend_stream, &terminate).await;
        return;
    }
    drop(buf);

    let mut relay = Relay::new(&mut stream, &mut backend_stream);
    let end = (&mut relay).await;
    let stats = relay.stats();
    let _ = stream.shutdown().await;
    info!(
        client = %peer,
        %user,
        %database,
        endpoint = %endpoint.name,
        duration_ms = started.elapsed().as_millis() as u64,
        bytes_from_client = stats.client_to_backend,
        bytes_to_client = stats.backend_to_client,
        reason = %end.reason(),
        "session closed"
    );
}

fn credential_error(e: CredentialError) -> SessionError {
    let code = match e {
        CredentialError::MissingClientPassword => sqlstate::INVALID_PASSWORD,
        CredentialError::Unavailable(_)
        | CredentialError::NoAwsCredentials(_)
        | CredentialError::Signing(_) => sqlstate::INVALID_AUTHORIZATION,
        // A provider outage (STS, metadata service) is a connection
        // problem, not a wrong identity.
        CredentialError::AwsProvider(_) => sqlstate::UNABLE_TO_CONNECT,
    };
    SessionError::Rejected(PgError::fatal(code, format!("dsql-proxy: {e}")))
}

/// Aurora DSQL answers 53300/53400 when a cluster's connection limits are
/// hit; say so, since the bare server message does not tell an application
/// developer what to change.
fn explain_limits(err: SessionError) -> SessionError {
    match err {
        SessionError::BackendRefused {
            endpoint,
            mut fields,
        } if matches!(
            fields.code(),
            sqlstate::TOO_MANY_CONNECTIONS | sqlstate::CONFIGURATION_LIMIT_EXCEEDED
        ) =>
        {
            if fields.get(b'H').is_none() {
                fields.fields.push((
                    b'H',
                    format!(
                        "endpoint {endpoint} is over its connection limits (Aurora DSQL allows 100 new \
                         connections per second per cluster, burst 1,000, and a maximum number of \
                         connections); retry with backoff or use fewer connections"
                    ),
                ));
            }
            SessionError::BackendRefused { endpoint, fields }
        }
        other => other,
    }
}

/// The startup parameters forwarded to the backend: the client's, minus the
/// drop list, plus a default application_name.
fn backend_parameters(startup: &StartupMessage, ctx: &ProxyContext) -> Vec<StartupParam> {
    let mut params: Vec<StartupParam> = startup
        .params
        .iter()
        .filter(|p| {
            !ctx.drop_parameters
                .iter()
                .any(|d| d.eq_ignore_ascii_case(&p.name))
        })
        .cloned()
        .collect();
    let has_app_name = params
        .iter()
        .any(|p| p.name == "application_name" && !p.value.is_empty());
    if !has_app_name && !ctx.default_application_name.is_empty() {
        params.retain(|p| p.name != "application_name");
        params.push(StartupParam::new(
            "application_name",
            ctx.default_application_name.as_bytes(),
        ));
    }
    params
}

pub(crate) async fn cancel_request(ctx: &ProxyContext, key: dsql_proxy_protocol::CancelKey) {
    // Unknown keys are dropped without an answer, as PostgreSQL does, so a
    // scanner learns nothing.
    let Some(target) = ctx.cancels.lookup(&key) else {
        debug!(pid = key.pid, "cancel request with unknown key ignored");
        return;
    };
    match backend::forward_cancel(&target, &ctx.backend).await {
        Ok(()) => debug!(endpoint = %target.endpoint.name, "cancel request forwarded"),
        Err(e) => {
            warn!(endpoint = %target.endpoint.name, error = %e, "cancel request could not be forwarded")
        }
    }
}
