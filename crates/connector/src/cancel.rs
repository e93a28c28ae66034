//! Forwarding a CancelRequest to a backend.

use std::time::Duration;

use bytes::BytesMut;
use dsql_proxy_routing::Endpoint;
use tokio::io::AsyncReadExt;

use crate::io::send;
use crate::{BackendKey, ConnectError, Connector};

/// How long to wait for the server to close a cancel connection.
const CANCEL_CLOSE_WAIT: Duration = Duration::from_secs(5);

impl Connector {
    /// Sends a CancelRequest for `key` over a new connection to `endpoint`
    /// (with the configured TLS mode, as libpq does), then waits for the
    /// server to close it. The dial gets `timeout`.
    pub async fn cancel(
        &self,
        endpoint: &Endpoint,
        key: &BackendKey,
        timeout: Duration,
    ) -> Result<(), ConnectError> {
        let attempt = async {
            let mut stream = self.dial(endpoint).await?;
            let mut buf = BytesMut::with_capacity(16 + key.0.secret.len());
            key.0.encode_cancel_request(&mut buf);
            send(&mut stream, &buf)
                .await
                .map_err(|e| ConnectError::Transport {
                    endpoint: endpoint.describe(),
                    cause: e.to_string(),
                })?;
            // The server answers nothing and closes; waiting for that makes
            // sure the request was read before we drop the connection.
            let mut sink = [0u8; 64];
            let _ = tokio::time::timeout(CANCEL_CLOSE_WAIT, stream.read(&mut sink)).await;
            Ok(())
        };
        tokio::time::timeout(timeout + CANCEL_CLOSE_WAIT, attempt)
            .await
            .unwrap_or_else(|_| {
                Err(ConnectError::Timeout {
                    endpoint: endpoint.describe(),
                    cause: "cancel request timed out".into(),
                })
            })
    }
}
