//! Port helpers.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// Ports this process has already handed out. The kernel may return a port
/// again once its probe listener is dropped; remembering them stops two
/// tests in the same test binary from racing for one port.
fn handed_out() -> &'static Mutex<HashSet<u16>> {
    static PORTS: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    PORTS.get_or_init(|| Mutex::new(HashSet::new()))
}

/// Ports below the kernel's default ephemeral range (32768-60999). Asking the
/// kernel for port 0 hands out ephemeral ports, and any outgoing connection
/// (a test client, the proxy dialing a backend) may grab the same port before
/// the server that was promised it binds; ports outside that range are only
/// ever taken on purpose.
const PORT_RANGE_START: u16 = 12000;
const PORT_RANGE_LEN: u16 = 20000;

/// A TCP port on 127.0.0.1 that was free a moment ago, lies outside the
/// ephemeral range, and that this process has not handed out before.
pub fn free_port() -> u16 {
    // Start somewhere that depends on the process so that test binaries
    // running at the same time mostly probe different ports.
    let seed = std::process::id().wrapping_mul(7919)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
    let mut handed = handed_out().lock().unwrap_or_else(PoisonError::into_inner);
    for step in 0..u32::from(PORT_RANGE_LEN) {
        let offset = (seed.wrapping_add(step.wrapping_mul(97))) % u32::from(PORT_RANGE_LEN);
        let Ok(offset) = u16::try_from(offset) else {
            continue;
        };
        let port = PORT_RANGE_START + offset;
        if handed.contains(&port) {
            continue;
        }
        if TcpListener::bind((Ipv4Addr::LOCALHOST, port)).is_ok() {
            handed.insert(port);
            return port;
        }
    }
    panic!(
        "no free TCP port left in {PORT_RANGE_START}..{}",
        PORT_RANGE_START + PORT_RANGE_LEN
    );
}

/// `127.0.0.1:<free_port()>`.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, free_port()))
}

/// Polls until `addr` accepts a TCP connection. Returns `false` on timeout.
///
/// Blocking on purpose: it is used from sync setup code and a short block in
/// an async test is harmless.
pub fn wait_for_port(addr: SocketAddr, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(250)).is_ok() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// This host's address on the interface of its default route: a peer that
/// a server sees as non-loopback without leaving the host. Panics when the
/// host has no such interface (tests of remote-client rules need one).
pub fn non_loopback_ip() -> std::net::IpAddr {
    // Connecting a UDP socket sends nothing; it only picks the route and
    // with it the source address. TEST-NET-1 is never a real peer.
    let socket = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)).expect("bind a UDP socket");
    socket
        .connect((Ipv4Addr::new(192, 0, 2, 1), 9))
        .expect("this host has no route beyond loopback; the test needs a non-loopback interface");
    let ip = socket.local_addr().expect("UDP local address").ip();
    assert!(
        !ip.is_loopback() && !ip.is_unspecified(),
        "no non-loopback address on this host (got {ip})"
    );
    ip
}
