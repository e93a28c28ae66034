//! Cancel keys. The client gets the real process id of its first backend
//! (so `pg_backend_pid()`, NotificationResponse and
//! `pg_terminate_backend()` agree with what it was told) and a secret the
//! proxy issues; the registry maps that key to the backend's own key and
//! endpoint, so a CancelRequest reaches the right server.
//!
//! Process ids are not unique here: two endpoints (or one endpoint before
//! and after a session moved) can hand out the same pid. Entries are
//! therefore kept per pid, each with its own secret, and a cancel must
//! match both; the secret comparison is constant-time.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use dsql_proxy_connector::BackendKey;
use dsql_proxy_protocol::CancelKey;
use dsql_proxy_routing::Endpoint;
use rand::RngCore;

/// The key the proxy gave a client. Never sent to a backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientKey(pub CancelKey);

/// Where a cancel for one session goes.
#[derive(Debug, Clone)]
pub struct CancelTarget {
    pub backend_key: BackendKey,
    pub endpoint: Arc<Endpoint>,
}

/// Identifies one registration among those sharing a pid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct EntryId(u64);

struct Entry {
    id: EntryId,
    client_secret: Bytes,
    target: CancelTarget,
    cancels: Arc<CancelSignal>,
}

/// Cancels that matched one session's key, and who to wake for them: a
/// retry waiting to send a request again stops (a cancelled request is not
/// sent again).
#[derive(Default)]
pub struct CancelSignal {
    count: AtomicU64,
    waker: atomic_waker::AtomicWaker,
}

impl CancelSignal {
    /// CancelRequests so far.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Acquire)
    }

    /// Wakes `waker` at the next cancel (the last one registered wins).
    pub fn register(&self, waker: &std::task::Waker) {
        self.waker.register(waker);
    }

    fn cancelled(&self) {
        self.count.fetch_add(1, Ordering::AcqRel);
        self.waker.wake();
    }
}

/// Live sessions by client-visible process id. Touched at session start
/// and end, when a session moves, and per cancel, never per message, so a
/// mutex is fine here.
#[derive(Default)]
pub struct CancelRegistry {
    sessions: Mutex<HashMap<i32, Vec<Entry>>>,
    next_id: AtomicU64,
}

/// A session's entry; removed when this is dropped.
pub struct Registration {
    registry: Arc<CancelRegistry>,
    pid: i32,
    id: EntryId,
    cancels: Arc<CancelSignal>,
}

impl Registration {
    /// The CancelRequests that match this session's key.
    pub fn cancel_signal(&self) -> Arc<CancelSignal> {
        Arc::clone(&self.cancels)
    }

    /// Points the session's cancels at a new backend (after the session
    /// moved): the client keeps its key, cancels reach the current backend.
    pub fn retarget(&self, target: CancelTarget) {
        let mut map = self.registry.lock();
        if let Some(entry) = map
            .get_mut(&self.pid)
            .and_then(|entries| entries.iter_mut().find(|e| e.id == self.id))
        {
            entry.target = target;
        }
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut map = self.registry.lock();
        if let Some(entries) = map.get_mut(&self.pid) {
            entries.retain(|e| e.id != self.id);
            if entries.is_empty() {
                map.remove(&self.pid);
            }
        }
    }
}

impl CancelRegistry {
    /// A poisoned lock only means another thread panicked mid-update; the
    /// map itself is still consistent, so keep going.
    fn lock(&self) -> MutexGuard<'_, HashMap<i32, Vec<Entry>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Issues a client key for a session whose first backend is `target`:
    /// the backend's real process id and `secret_len` random bytes (4 on
    /// protocol 3.0, 32 on 3.2), distinct from every other secret issued
    /// for the same pid.
    pub fn register(
        self: &Arc<Self>,
        secret_len: usize,
        target: CancelTarget,
    ) -> (ClientKey, Registration) {
        let pid = target.backend_key.pid();
        let id = EntryId(self.next_id.fetch_add(1, Ordering::Relaxed));
        let mut rng = rand::thread_rng();
        let mut map = self.lock();
        let entries = map.entry(pid).or_default();
        let secret = loop {
            let mut secret = vec![0u8; secret_len];
            rng.fill_bytes(&mut secret);
            if !entries.iter().any(|e| e.client_secret[..] == secret[..]) {
                break Bytes::from(secret);
            }
        };
        let cancels = Arc::new(CancelSignal::default());
        entries.push(Entry {
            id,
            client_secret: secret.clone(),
            target,
            cancels: Arc::clone(&cancels),
        });
        drop(map);
        (
            ClientKey(CancelKey { pid, secret }),
            Registration {
                registry: Arc::clone(self),
                pid,
                id,
                cancels,
            },
        )
    }

    /// Finds the target for a client's CancelRequest: the entry with this
    /// pid whose secret matches, compared in constant time, and signals
    /// that session. Unknown or wrong keys give `None`.
    pub fn lookup(&self, key: &CancelKey) -> Option<CancelTarget> {
        let map = self.lock();
        let mut found = None;
        // Every entry of the pid is compared, so the time taken does not
        // tell which one matched.
        for entry in map.get(&key.pid)? {
            let issued = CancelKey {
                pid: key.pid,
                secret: entry.client_secret.clone(),
            };
            if issued.secret_matches(&key.secret) {
                entry.cancels.cancelled();
                found = Some(entry.target.clone());
            }
        }
        found
    }

    /// Registered sessions.
    pub fn len(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dsql_proxy_routing::EndpointId;

    fn endpoint(id: u32, name: &str) -> Arc<Endpoint> {
        Arc::new(Endpoint {
            id: EndpointId(id),
            name: name.into(),
            region: None,
            host: format!("{name}.example"),
            port: 5432,
            connect_address: None,
            priority: 1,
            route53_health_check_id: None,
        })
    }

    fn target(pid: i32, secret: u8, endpoint: &Arc<Endpoint>) -> CancelTarget {
        CancelTarget {
            backend_key: BackendKey(CancelKey {
                pid,
                secret: Bytes::from(vec![secret; 4]),
            }),
            endpoint: Arc::clone(endpoint),
        }
    }

    #[test]
    fn the_client_key_carries_the_backend_pid_and_a_fresh_secret() {
        let registry = Arc::new(CancelRegistry::default());
        let a = endpoint(0, "a");
        let (key, registration) = registry.register(32, target(4242, 7, &a));
        assert_eq!(key.0.pid, 4242, "the real backend pid");
        assert_eq!(key.0.secret.len(), 32);
        assert_ne!(key.0.secret[..4], [7u8; 4], "not the backend's secret");
        let found = registry.lookup(&key.0).expect("registered");
        assert_eq!(found.endpoint.name, "a");
        assert_eq!(found.backend_key.0.secret[..], [7u8; 4]);

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

    #[test]
    fn equal_pids_on_two_endpoints_cancel_independently() {
        let registry = Arc::new(CancelRegistry::default());
        let (a, b) = (endpoint(0, "a"), endpoint(1, "b"));
        let (key_a, reg_a) = registry.register(4, target(100, 1, &a));
        let (key_b, reg_b) = registry.register(4, target(100, 2, &b));
        assert_eq!((key_a.0.pid, key_b.0.pid), (100, 100));
        assert_ne!(key_a.0.secret, key_b.0.secret);
        assert_eq!(registry.len(), 2);
        let to_a = registry.lookup(&key_a.0).unwrap();
        let to_b = registry.lookup(&key_b.0).unwrap();
        assert_eq!(
            (to_a.endpoint.name.as_str(), to_a.backend_key.0.secret[0]),
            ("a", 1)
        );
        assert_eq!(
            (to_b.endpoint.name.as_str(), to_b.backend_key.0.secret[0]),
            ("b", 2)
        );
        // One session ending leaves the other's key working.
        drop(reg_a);
        assert!(registry.lookup(&key_a.0).is_none());
        assert_eq!(registry.lookup(&key_b.0).unwrap().endpoint.name, "b");
        drop(reg_b);
        assert!(registry.is_empty());
    }

    #[test]
    fn a_retargeted_registration_sends_cancels_to_the_new_backend() {
        let registry = Arc::new(CancelRegistry::default());
        let (a, b) = (endpoint(0, "a"), endpoint(1, "b"));
        let (key, registration) = registry.register(4, target(100, 1, &a));
        let (other, _other_registration) = registry.register(4, target(100, 3, &a));
        registration.retarget(target(200, 2, &b));
        let moved = registry.lookup(&key.0).expect("same client key");
        assert_eq!(moved.endpoint.name, "b");
        assert_eq!(moved.backend_key.pid(), 200);
        assert_eq!(moved.backend_key.0.secret[0], 2);
        // The client-visible pid stays; another session on it is untouched.
        assert_eq!(key.0.pid, 100);
        assert_eq!(registry.lookup(&other.0).unwrap().endpoint.name, "a");
        drop(registration);
        assert!(registry.lookup(&key.0).is_none());
        assert_eq!(registry.len(), 1);
    }
}
