//! The latency relay (`dsql-proxy-netsim`) between the proxy and a test's
//! server: simulated Regions get distinct round-trip times, and a test can
//! partition (`Hang`) or reset (`Refuse`) a Region at will.
//!
//! The relay runs on its own thread with its own tokio runtime (like
//! [`crate::aws_endpoints`]), so it keeps working while a test blocks a
//! runtime worker. It derefs to [`Relay`] for delays, modes and counters.

use std::net::{Ipv4Addr, SocketAddr};
use std::ops::Deref;
use std::thread::JoinHandle;
use std::time::Duration;

pub use dsql_proxy_netsim::{Relay, RelayMode};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use crate::net::free_port;

/// A latency-injecting TCP relay on 127.0.0.1 in front of `target`.
/// Dropping it stops the listener and closes all its connections.
#[derive(Debug)]
pub struct LatencyRelay {
    relay: Option<Relay>,
    shutdown: Option<oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl LatencyRelay {
    /// Starts a relay to `target` that delays each direction by `delay`
    /// (so a round trip gains `2 * delay`).
    pub fn start(target: SocketAddr, delay: Duration) -> LatencyRelay {
        let std_listener = bind_free_port();
        std_listener
            .set_nonblocking(true)
            .expect("set relay listener non-blocking");
        let port = std_listener
            .local_addr()
            .expect("relay listener address")
            .port();
        let (shutdown, stop) = oneshot::channel::<()>();
        let (started_tx, started) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name(format!("latency-relay-{port}"))
            .spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("build relay runtime");
                rt.block_on(async move {
                    let listener = TcpListener::from_std(std_listener)
                        .expect("register relay listener with tokio");
                    let relay = Relay::spawn(listener, target, delay).expect("start relay");
                    let _ = started_tx.send(relay);
                    let _ = stop.await;
                });
                // Dropping the runtime drops every connection task, which
                // closes their sockets.
            })
            .expect("spawn relay thread");
        let relay = started.recv().expect("relay thread started the relay");
        LatencyRelay {
            relay: Some(relay),
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }
}

impl Deref for LatencyRelay {
    type Target = Relay;

    fn deref(&self) -> &Relay {
        // Only `Drop` takes it.
        self.relay.as_ref().expect("relay present until drop")
    }
}

impl Drop for LatencyRelay {
    fn drop(&mut self) {
        drop(self.relay.take());
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Binds a port from [`free_port`] rather than port 0, so the relay cannot
/// take a port that was handed out to a not yet started server or proxy.
fn bind_free_port() -> std::net::TcpListener {
    let mut last_err = None;
    for _ in 0..10 {
        match std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, free_port())) {
            Ok(l) => return l,
            Err(e) => last_err = Some(e),
        }
    }
    panic!("bind a relay listener on 127.0.0.1: {last_err:?}");
}
