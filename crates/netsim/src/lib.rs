//! A simulated network link between a client and a server: a TCP relay
//! that adds latency and can fail (reset) or hang (blackhole) on command.
//! `dsql-proxy demo` puts one in front of each simulated Region; the tests
//! use it for distinct Region round-trip times and for outages.
//!
//! Each chunk read from one side is delivered to the other side `delay`
//! after it was read. Every direction is a FIFO of timestamped chunks, so
//! pipelined traffic is delayed, not serialized: throughput does not drop
//! with the delay. EOF and resets travel through the same FIFO, so they
//! arrive in order and late too. Bytes are opaque, so TLS passes straight
//! through.
//!
//! What is not simulated: the relay completes the client's TCP handshake
//! itself and dials the target at once, so the handshake costs no delay;
//! only payload bytes and connection ends are delayed.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use socket2::SockRef;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::Instant;
use tracing::warn;

/// Largest chunk read at once.
const CHUNK: usize = 64 * 1024;
/// Chunks queued per direction before the relay stops reading (backpressure).
/// Large enough that the delay never limits throughput in tests.
const QUEUE: usize = 1024;

/// What the relay does with traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RelayMode {
    /// Forward with the configured delays.
    Pass,
    /// Blackhole, like a network partition or a frozen Region: new TCP
    /// connections are accepted but never forwarded or answered; existing
    /// ones stop forwarding in both directions. Bytes (and EOFs) are held,
    /// not dropped, and flow again on the switch back to `Pass`.
    Hang,
    /// New connections are accepted and closed at once with a RST
    /// (`SO_LINGER` 0); existing connections are reset on both sides.
    Refuse,
}

/// How one direction (or a whole connection) ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// Orderly EOF, passed on as a FIN.
    Closed,
    /// Read/write error or `Refuse`: both sides get a RST.
    Reset,
}

/// An item in a direction's FIFO, stamped with when to deliver it.
enum Item {
    Data(Instant, Bytes),
    End(Instant, End),
}

struct Shared {
    target: SocketAddr,
    upstream_nanos: AtomicU64,
    downstream_nanos: AtomicU64,
    // A watch so that held connections wake up on mode changes.
    mode: watch::Sender<RelayMode>,
    open: AtomicUsize,
    accepted: AtomicU64,
}

/// A latency-injecting TCP relay in front of `target`, serving its listener
/// on the tokio runtime it was started on. Dropping it stops the listener;
/// open connections end with that runtime or at their next mode change.
/// Every method may be called from any thread.
pub struct Relay {
    addr: SocketAddr,
    shared: Arc<Shared>,
    _stop: oneshot::Sender<()>,
}

impl Relay {
    /// Relays connections accepted on `listener` to `target`, delaying each
    /// direction by `one_way` (so a round trip gains `2 * one_way`).
    /// Must be called within a tokio runtime.
    pub fn spawn(
        listener: TcpListener,
        target: SocketAddr,
        one_way: Duration,
    ) -> std::io::Result<Relay> {
        let addr = listener.local_addr()?;
        let (mode, _) = watch::channel(RelayMode::Pass);
        let shared = Arc::new(Shared {
            target,
            upstream_nanos: AtomicU64::new(nanos(one_way)),
            downstream_nanos: AtomicU64::new(nanos(one_way)),
            mode,
            open: AtomicUsize::new(0),
            accepted: AtomicU64::new(0),
        });
        let (stop_tx, stop) = oneshot::channel();
        tokio::spawn(accept_loop(listener, Arc::clone(&shared), stop));
        Ok(Relay {
            addr,
            shared,
            _stop: stop_tx,
        })
    }

    /// Where clients connect (the proxy's `connect_address`).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Where the relay forwards to.
    pub fn target(&self) -> SocketAddr {
        self.shared.target
    }

    /// Sets the one-way delays: `upstream` for client -> target bytes,
    /// `downstream` for target -> client bytes. Applies to bytes read after
    /// the call; chunks already queued keep their delivery time.
    pub fn set_delay(&self, upstream: Duration, downstream: Duration) {
        self.shared
            .upstream_nanos
            .store(nanos(upstream), Ordering::SeqCst);
        self.shared
            .downstream_nanos
            .store(nanos(downstream), Ordering::SeqCst);
    }

    /// `(upstream, downstream)` one-way delays.
    pub fn delay(&self) -> (Duration, Duration) {
        (
            Duration::from_nanos(self.shared.upstream_nanos.load(Ordering::SeqCst)),
            Duration::from_nanos(self.shared.downstream_nanos.load(Ordering::SeqCst)),
        )
    }

    /// Switches the mode; applies to open connections at once.
    pub fn set_mode(&self, mode: RelayMode) {
        self.shared.mode.send_replace(mode);
    }

    pub fn mode(&self) -> RelayMode {
        *self.shared.mode.borrow()
    }

    /// Client connections currently open through the relay (held ones
    /// included, refused ones not).
    pub fn connections(&self) -> usize {
        self.shared.open.load(Ordering::SeqCst)
    }

    /// Client connections accepted so far, refused ones included.
    pub fn accepted(&self) -> u64 {
        self.shared.accepted.load(Ordering::SeqCst)
    }
}

impl std::fmt::Debug for Relay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Relay")
            .field("addr", &self.addr)
            .field("target", &self.shared.target)
            .field("delay", &self.delay())
            .field("mode", &self.mode())
            .finish_non_exhaustive()
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Counts a connection as open for as long as its task lives.
struct OpenGuard(Arc<Shared>);

impl OpenGuard {
    fn new(shared: &Arc<Shared>) -> Self {
        shared.open.fetch_add(1, Ordering::SeqCst);
        OpenGuard(Arc::clone(shared))
    }
}

impl Drop for OpenGuard {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, mut stop: oneshot::Receiver<()>) {
    loop {
        let accepted = tokio::select! {
            _ = &mut stop => return,
            accepted = listener.accept() => accepted,
        };
        let stream = match accepted {
            Ok((stream, _)) => stream,
            Err(e) => {
                // E.g. EMFILE; back off instead of spinning.
                warn!(error = %e, "relay: accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        shared.accepted.fetch_add(1, Ordering::SeqCst);
        if *shared.mode.borrow() == RelayMode::Refuse {
            reset(stream);
            continue;
        }
        tokio::spawn(relay_connection(stream, Arc::clone(&shared)));
    }
}

/// Closes `stream` with a RST instead of a FIN.
fn reset(stream: TcpStream) {
    let _ = SockRef::from(&stream).set_linger(Some(Duration::ZERO));
    drop(stream);
}

async fn relay_connection(mut client: TcpStream, shared: Arc<Shared>) {
    let _open = OpenGuard::new(&shared);
    let mut mode = shared.mode.subscribe();
    // Not dialing the target while hung leaves the client's first bytes
    // unanswered in the kernel, as a partition would.
    if wait_for_pass(&mut mode).await == End::Reset {
        reset(client);
        return;
    }
    let connected = tokio::select! {
        r = TcpStream::connect(shared.target) => r,
        _ = wait_for_refuse(&mut mode) => {
            reset(client);
            return;
        }
    };
    let mut upstream = match connected {
        Ok(s) => s,
        Err(_) => {
            // Target down: the client sees its connection reset.
            reset(client);
            return;
        }
    };
    // Relayed chunks must not wait for Nagle on top of the injected delay.
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);

    let end = {
        let (client_read, client_write) = client.split();
        let (upstream_read, upstream_write) = upstream.split();
        let up = direction(
            client_read,
            upstream_write,
            &shared.upstream_nanos,
            mode.clone(),
        );
        let down = direction(
            upstream_read,
            client_write,
            &shared.downstream_nanos,
            mode.clone(),
        );
        tokio::select! {
            end = both(up, down) => end,
            _ = wait_for_refuse(&mut mode) => End::Reset,
        }
    };
    if end == End::Reset {
        reset(client);
        reset(upstream);
    }
}

/// Runs both directions; a reset on either resets the whole connection,
/// otherwise it ends once both sides have closed.
async fn both(
    up: impl std::future::Future<Output = End>,
    down: impl std::future::Future<Output = End>,
) -> End {
    tokio::pin!(up, down);
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        let end = tokio::select! {
            end = &mut up, if !up_done => {
                up_done = true;
                end
            }
            end = &mut down, if !down_done => {
                down_done = true;
                end
            }
        };
        if end == End::Reset {
            return End::Reset;
        }
    }
    End::Closed
}

/// Moves bytes from `src` to `dst` through a timestamped FIFO. Returns once
/// everything read, including the EOF or reset, has been delivered.
async fn direction(
    mut src: ReadHalf<'_>,
    mut dst: WriteHalf<'_>,
    delay_nanos: &AtomicU64,
    mut mode: watch::Receiver<RelayMode>,
) -> End {
    let (tx, mut rx) = mpsc::channel::<Item>(QUEUE);
    let deliver_at = || Instant::now() + Duration::from_nanos(delay_nanos.load(Ordering::SeqCst));

    let reader = async move {
        let mut buf = vec![0u8; CHUNK];
        loop {
            let item = match src.read(&mut buf).await {
                Ok(0) => Item::End(deliver_at(), End::Closed),
                Ok(n) => Item::Data(deliver_at(), Bytes::copy_from_slice(&buf[..n])),
                Err(_) => Item::End(deliver_at(), End::Reset),
            };
            let last = matches!(item, Item::End(..));
            if tx.send(item).await.is_err() || last {
                return;
            }
        }
    };
    let writer = async move {
        while let Some(item) = rx.recv().await {
            match item {
                Item::Data(at, chunk) => {
                    if wait_until(at, &mut mode).await == End::Reset
                        || dst.write_all(&chunk).await.is_err()
                    {
                        return End::Reset;
                    }
                }
                Item::End(at, end) => {
                    if wait_until(at, &mut mode).await == End::Reset || end == End::Reset {
                        return End::Reset;
                    }
                    // Pass the EOF on as a half-close; the other direction
                    // may still be sending.
                    return match dst.shutdown().await {
                        Ok(()) => End::Closed,
                        Err(_) => End::Reset,
                    };
                }
            }
        }
        // Unreachable in practice: the reader always sends an End last.
        End::Closed
    };
    // The reader finishes first (it sends the End); the writer decides.
    let reader = async move {
        reader.await;
        std::future::pending::<()>().await
    };
    tokio::select! {
        end = writer => end,
        // The reader never completes (it ends in `pending`).
        _ = reader => End::Reset,
    }
}

/// Waits for `Pass`; `Reset` if the mode becomes `Refuse` first.
async fn wait_for_pass(mode: &mut watch::Receiver<RelayMode>) -> End {
    loop {
        match *mode.borrow_and_update() {
            RelayMode::Pass => return End::Closed,
            RelayMode::Refuse => return End::Reset,
            RelayMode::Hang => {}
        }
        if mode.changed().await.is_err() {
            return End::Reset;
        }
    }
}

/// Waits until the mode is `Refuse`.
async fn wait_for_refuse(mode: &mut watch::Receiver<RelayMode>) {
    loop {
        if *mode.borrow_and_update() == RelayMode::Refuse {
            return;
        }
        if mode.changed().await.is_err() {
            // The relay is gone; its runtime drops this task anyway.
            std::future::pending::<()>().await;
        }
    }
}

/// Waits until `at` has passed while the mode is `Pass` (time spent hung
/// counts, so held bytes flow at once on resume). `Reset` on `Refuse`.
async fn wait_until(at: Instant, mode: &mut watch::Receiver<RelayMode>) -> End {
    loop {
        let current = *mode.borrow_and_update();
        match current {
            RelayMode::Refuse => return End::Reset,
            RelayMode::Pass if Instant::now() >= at => return End::Closed,
            _ => {}
        }
        tokio::select! {
            _ = tokio::time::sleep_until(at), if current == RelayMode::Pass => {}
            changed = mode.changed() => {
                if changed.is_err() {
                    return End::Reset;
                }
            }
        }
    }
}
