use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncReadExt;

use dsql_proxy_routing::FailureKind;

use super::{dial, BackendSettings};
use crate::cancel::CancelTarget;
use crate::io::send;
use crate::SessionError;

/// Sends a CancelRequest for the target's backend key over a new connection
/// with the session's TLS mode, then waits for the server to close it.
pub async fn forward_cancel(
    target: &CancelTarget,
    settings: &BackendSettings,
) -> Result<(), SessionError> {
    let attempt = async {
        let mut stream = dial(&target.endpoint, settings).await?;
        let mut buf = BytesMut::with_capacity(16 + target.backend_key.0.secret.len());
        target.backend_key.0.encode_cancel_request(&mut buf);
        send(&mut stream, &buf)
            .await
            .map_err(|e| SessionError::BackendUnreachable {
                endpoint: target.endpoint.describe(),
                kind: FailureKind::Connection,
                cause: e.to_string(),
            })?;
        // The server answers nothing and closes; waiting for that makes sure
        // the request was read before we drop the connection.
        let mut sink = [0u8; 64];
        let _ = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut sink)).await;
        Ok(())
    };
    tokio::time::timeout(settings.connect_timeout + Duration::from_secs(5), attempt)
        .await
        .unwrap_or_else(|_| {
            Err(SessionError::BackendUnreachable {
                endpoint: target.endpoint.describe(),
                kind: FailureKind::Timeout,
                cause: "cancel request timed out".into(),
            })
        })
}
