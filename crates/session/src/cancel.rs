//! Cancel keys. The client gets a proxy-issued key; the registry maps it to
//! the backend's key and endpoint so a CancelRequest reaches the right server.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use dsql_proxy_protocol::CancelKey;
use dsql_proxy_routing::Endpoint;
use rand::RngCore;

/// The key the proxy gave a client. Never sent to a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientKey(pub CancelKey);

/// The key a backend gave the proxy. Never shown to a client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendKey(pub CancelKey);

/// Where a cancel for one session goes.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    pub backend_key: BackendKey,
    pub endpoint: Arc<Endpoint>,
}

struct Entry {
    client_secret: Bytes,
    target: CancelTarget,
}

/// Live sessions by proxy-issued process id. Touched once per session start
/// and end and per cancel, never per message, so a mutex is fine here.
#[derive(Default)]
pub struct CancelRegistry {
    sessions: Mutex<HashMap<i32, Entry>>,
}

/// Removes the session's entry when the session ends.
pub struct Registration {
    registry: Arc<CancelRegistry>,
    pid: i32,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut map) = self.registry.sessions.lock() {
            map.remove(&self.pid);
        }
    }
}

impl CancelRegistry {
    /// Issues a fresh client key (with `secret_len` random bytes) for a
    /// session and remembers where its cancels go.
    pub fn register(
        self: &Arc<Self>,
        secret_len: usize,
        target: CancelTarget,
    ) -> (ClientKey, Registration) {
        let mut rng = rand::thread_rng();
        let mut secret = vec![0u8; secret_len];
        rng.fill_bytes(&mut secret);
        let secret = Bytes::from(secret);
        // A poisoned lock only means another thread panicked mid-insert; the
        // map itself is still consistent, so keep going.
        let mut map = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let pid = loop {
            // Positive like real PIDs; some drivers treat them as unsigned.
            let candidate = (rng.next_u32() & 0x7fff_ffff) as i32;
            if candidate != 0 && !map.contains_key(&candidate) {
                break candidate;
            }
        };
        map.insert(
            pid,
            Entry {
                client_secret: secret.clone(),
                target,
            },
        );
        drop(map);
        (
            ClientKey(CancelKey { pid, secret }),
            Registration {
                registry: Arc::clone(self),
                pid,
            },
        )
    }

    /// Finds the target for a client's CancelRequest; the secret is compared
    /// in constant time. Unknown or wrong keys give `None`.
    pub fn lookup(&self, key: &CancelKey) -> Option<CancelTarget> {
        let map = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        let entry = map.get(&key.pid)?;
        let probe = CancelKey {
            pid: key.pid,
            secret: entry.client_secret.clone(),
        };
        probe
            .secret_matches(&key.secret)
            .then(|| entry.target.clone())
    }

    pub fn len(&self) -> usize {
        self.sessions.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dsql_proxy_routing::EndpointId;

    fn target() -> CancelTarget {
        CancelTarget {
            backend_key: BackendKey(CancelKey {
                pid: 1,
                secret: Bytes::from_static(&[1, 2, 3, 4]),
            }),
            endpoint: Arc::new(Endpoint {
                id: EndpointId(0),
                name: "a".into(),
                region: None,
                host: "h".into(),
                port: 1,
                connect_address: None,
                priority: 1,
                route53_health_check_id: None,
            }),
        }
    }

    #[test]
    fn registers_looks_up_and_forgets() {
        let registry = Arc::new(CancelRegistry::default());
        let (key, registration) = registry.register(32, target());
        assert_eq!(key.0.secret.len(), 32);
        assert!(key.0.pid > 0);
        assert!(registry.lookup(&key.0).is_some());
        let mut wrong = key.0.clone();
        wrong.secret = Bytes::from(vec![0u8; 32]);
        assert!(registry.lookup(&wrong).is_none());
        let mut short = key.0.clone();
        short.secret = key.0.secret.slice(..4);
        assert!(registry.lookup(&short).is_none());
        drop(registration);
        assert!(registry.lookup(&key.0).is_none());
        assert!(registry.is_empty());
    }
}
