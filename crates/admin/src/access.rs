//! Who may use the admin server's mutating routes.
//!
//! * Read-only routes (`/metrics`, `/healthz`, `/readyz`, `/startup`,
//!   `/status`) answer anyone who can reach `[admin] address`: probes and
//!   Prometheus must reach them.
//! * Mutating routes (`POST /quitquitquit`, `/endpoints/<name>/drain|undrain`,
//!   `/demo/...`) answer a loopback peer (the pod or host itself) or a
//!   request with `Authorization: Bearer <token>` matching `[admin]
//!   token_file` (re-read on each such request; compared in constant time;
//!   never logged).
//! * No web page can use either: a request whose `Origin` is not the
//!   server itself, or whose `Sec-Fetch-Site` says it came from another
//!   site, is refused on every route; and a loopback peer must name the
//!   server by address or `localhost` in `Host`, which a page that
//!   rebinds its own DNS name to 127.0.0.1 cannot.

use std::net::{IpAddr, SocketAddr};
use std::path::Path;

use hyper::header::{HeaderMap, AUTHORIZATION, HOST, ORIGIN};
use hyper::{Method, StatusCode};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// Why a mutating request was refused. The text never holds a token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "forbidden: this route needs a loopback client or `Authorization: Bearer <token>` \
         ([admin] token_file)"
    )]
    NotAuthorized,
    #[error("forbidden: the bearer token does not match [admin] token_file")]
    WrongToken,
    #[error("forbidden: a bearer token was sent but no [admin] token_file is configured")]
    NoTokenConfigured,
    #[error("forbidden: the Authorization header is not `Bearer <token>`")]
    MalformedAuthorization,
    #[error(
        "forbidden: a loopback client must name the server by address or localhost in Host \
         (got a DNS name)"
    )]
    ForeignHost,
    /// The token file could not be read (or is empty): nobody is let in
    /// with a token until it is fixed.
    #[error("the admin token cannot be checked: {0}")]
    TokenUnavailable(String),
}

impl Refusal {
    pub fn status(&self) -> StatusCode {
        match self {
            Self::TokenUnavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::FORBIDDEN,
        }
    }
}

/// The routes that change something: every method but GET and HEAD on
/// `/quitquitquit`, `/endpoints/...` and `/demo/...`.
pub fn is_mutating(method: &Method, path: &str) -> bool {
    !matches!(*method, Method::GET | Method::HEAD)
        && (path == "/quitquitquit"
            || path.starts_with("/endpoints/")
            || path.starts_with("/demo/"))
}

/// Reads a token file: the first line, surrounding whitespace removed (a
/// Kubernetes Secret or `echo` leaves a newline).
pub fn read_token(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read [admin] token_file {}: {e}", path.display()))?;
    let token = text.lines().next().unwrap_or_default().trim();
    if token.is_empty() {
        return Err(format!("[admin] token_file {} is empty", path.display()));
    }
    Ok(token.to_owned())
}

/// Decides whether a mutating request may go ahead.
pub fn authorize(
    token_file: Option<&Path>,
    peer: SocketAddr,
    headers: &HeaderMap,
) -> Result<(), Refusal> {
    if let Some(value) = headers.get(AUTHORIZATION) {
        let presented = value
            .to_str()
            .ok()
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .filter(|t| !t.is_empty())
            .ok_or(Refusal::MalformedAuthorization)?;
        let file = token_file.ok_or(Refusal::NoTokenConfigured)?;
        let expected = read_token(file).map_err(Refusal::TokenUnavailable)?;
        return if same_secret(presented.as_bytes(), expected.as_bytes()) {
            Ok(())
        } else {
            Err(Refusal::WrongToken)
        };
    }
    if !is_loopback(peer.ip()) {
        return Err(Refusal::NotAuthorized);
    }
    match headers.get(HOST).map(|h| h.to_str()) {
        None => Ok(()),
        Some(Ok(host)) if names_this_host(host) => Ok(()),
        Some(_) => Err(Refusal::ForeignHost),
    }
}

/// Constant-time in the secrets' contents and lengths: both are hashed to
/// 32 bytes first.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    bool::from(Sha256::digest(a).ct_eq(&Sha256::digest(b)))
}

fn is_loopback(ip: IpAddr) -> bool {
    // `::ffff:127.0.0.1` is how a dual-stack listener sees an IPv4 peer.
    ip.to_canonical().is_loopback()
}

/// An IP address (with or without a port) or `localhost`.
fn names_this_host(host: &str) -> bool {
    let host = host.trim();
    let name = if let Some(rest) = host.strip_prefix('[') {
        // [v6]:port
        return rest
            .split_once(']')
            .is_some_and(|(ip, _)| ip.parse::<std::net::Ipv6Addr>().is_ok());
    } else {
        host.rsplit_once(':').map_or(host, |(name, _)| name)
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<IpAddr>().is_ok()
}

/// Why a request looks like it came from a web page on another site, if it
/// does: browsers send `Origin` on every POST and `Sec-Fetch-Site` on
/// every request; curl, Prometheus, the kubelet and the proxy's own
/// commands send neither.
pub fn cross_site(headers: &HeaderMap) -> Option<&'static str> {
    if let Some(site) = headers.get("sec-fetch-site") {
        let same = site
            .to_str()
            .is_ok_and(|s| s.eq_ignore_ascii_case("same-origin") || s.eq_ignore_ascii_case("none"));
        if !same {
            return Some("Sec-Fetch-Site says the request comes from another site");
        }
    }
    let origin = headers.get(ORIGIN)?;
    let host = headers.get(HOST).and_then(|h| h.to_str().ok());
    let same = match (origin.to_str(), host) {
        (Ok(origin), Some(host)) => ["http://", "https://"].iter().any(|scheme| {
            origin
                .strip_prefix(scheme)
                .is_some_and(|o| o.trim_end_matches('/').eq_ignore_ascii_case(host))
        }),
        _ => false,
    };
    (!same).then_some("the Origin header names another site")
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn peer(ip: &str) -> SocketAddr {
        SocketAddr::new(ip.parse().unwrap(), 50_000)
    }

    #[test]
    fn mutating_routes_are_the_posts() {
        assert!(is_mutating(&Method::POST, "/quitquitquit"));
        assert!(is_mutating(&Method::POST, "/endpoints/a/drain"));
        assert!(is_mutating(&Method::PUT, "/demo/fail/x"));
        assert!(!is_mutating(&Method::GET, "/endpoints/a/drain"));
        assert!(!is_mutating(&Method::POST, "/metrics"));
        assert!(!is_mutating(&Method::HEAD, "/quitquitquit"));
    }

    #[test]
    fn loopback_peers_need_no_token_others_do() {
        let none = HeaderMap::new();
        assert_eq!(authorize(None, peer("127.0.0.1"), &none), Ok(()));
        assert_eq!(authorize(None, peer("::1"), &none), Ok(()));
        assert_eq!(authorize(None, peer("::ffff:127.0.0.1"), &none), Ok(()));
        assert_eq!(
            authorize(None, peer("10.1.2.3"), &none),
            Err(Refusal::NotAuthorized)
        );
        assert_eq!(
            authorize(None, peer("::ffff:10.1.2.3"), &none),
            Err(Refusal::NotAuthorized)
        );
    }

    #[test]
    fn the_bearer_token_comes_from_the_file_each_time() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "s3cret-token\n").unwrap();
        let remote = peer("10.1.2.3");
        let with = |v: &str| headers(&[("authorization", v)]);
        assert_eq!(
            authorize(Some(&file), remote, &with("Bearer s3cret-token")),
            Ok(())
        );
        assert_eq!(
            authorize(Some(&file), remote, &with("bearer   s3cret-token ")),
            Ok(())
        );
        assert_eq!(
            authorize(Some(&file), remote, &with("Bearer s3cret-tokem")),
            Err(Refusal::WrongToken)
        );
        assert_eq!(
            authorize(Some(&file), remote, &with("Bearer s3cret")),
            Err(Refusal::WrongToken)
        );
        assert_eq!(
            authorize(Some(&file), remote, &with("Basic czNjcmV0")),
            Err(Refusal::MalformedAuthorization)
        );
        assert_eq!(
            authorize(None, remote, &with("Bearer s3cret-token")),
            Err(Refusal::NoTokenConfigured)
        );
        // A wrong token is refused even from loopback.
        assert_eq!(
            authorize(Some(&file), peer("127.0.0.1"), &with("Bearer nope")),
            Err(Refusal::WrongToken)
        );
        // Rotation: the file is read again.
        std::fs::write(&file, "rotated").unwrap();
        assert_eq!(
            authorize(Some(&file), remote, &with("Bearer s3cret-token")),
            Err(Refusal::WrongToken)
        );
        assert_eq!(
            authorize(Some(&file), remote, &with("Bearer rotated")),
            Ok(())
        );
        // An empty or missing file lets nobody in with a token.
        std::fs::write(&file, "\n").unwrap();
        let refused = authorize(Some(&file), remote, &with("Bearer x")).unwrap_err();
        assert_eq!(refused.status(), StatusCode::SERVICE_UNAVAILABLE);
        for r in [Refusal::WrongToken, refused] {
            assert!(!r.to_string().contains("s3cret"), "{r}");
        }
    }

    #[test]
    fn a_rebound_dns_name_on_loopback_is_refused() {
        let local = peer("127.0.0.1");
        for host in [
            "127.0.0.1:9090",
            "localhost:9090",
            "LOCALHOST",
            "[::1]:9090",
            "10.0.0.5",
        ] {
            assert_eq!(
                authorize(None, local, &headers(&[("host", host)])),
                Ok(()),
                "{host}"
            );
        }
        assert_eq!(
            authorize(None, local, &headers(&[("host", "evil.example:9090")])),
            Err(Refusal::ForeignHost)
        );
    }

    #[test]
    fn cross_site_requests_are_recognised() {
        assert_eq!(cross_site(&HeaderMap::new()), None);
        let same = headers(&[
            ("host", "127.0.0.1:9090"),
            ("origin", "http://127.0.0.1:9090"),
        ]);
        assert_eq!(cross_site(&same), None);
        for h in [
            headers(&[
                ("host", "127.0.0.1:9090"),
                ("origin", "https://evil.example"),
            ]),
            headers(&[("host", "127.0.0.1:9090"), ("origin", "null")]),
            headers(&[("origin", "http://127.0.0.1:9090")]),
            headers(&[("sec-fetch-site", "cross-site")]),
            headers(&[("sec-fetch-site", "same-site")]),
        ] {
            assert!(cross_site(&h).is_some(), "{h:?}");
        }
        assert_eq!(cross_site(&headers(&[("sec-fetch-site", "none")])), None);
    }
}
