//! SCRAM-SHA-256 (RFC 5802/7677) as PostgreSQL uses it, both sides: the
//! client half answers a backend's challenge, the server half checks local
//! clients when `client_auth = "scram-sha-256"`. Channel binding is not used:
//! the proxy never offers SCRAM-SHA-256-PLUS and always sends gs2 header `n`.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::ProtocolError;

pub const MECHANISM: &str = "SCRAM-SHA-256";
/// PostgreSQL's default `scram_iterations`.
pub const DEFAULT_ITERATIONS: u32 = 4096;
/// A server asking for more PBKDF2 rounds than this is refused: it would let
/// a hostile endpoint burn the proxy's CPU.
pub const MAX_ITERATIONS: u32 = 10_000_000;
const GS2_HEADER: &str = "n,,";
const GS2_HEADER_B64: &str = "biws";

type HmacSha256 = Hmac<Sha256>;

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC accepts keys of any length, so construction cannot fail.
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => unreachable!("HMAC takes keys of any length"),
    };
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

fn sha256(data: &[u8]) -> [u8; 32] {
    Sha256::digest(data).into()
}

/// SASLprep the password as libpq and the server do, falling back to the raw
/// bytes when it is not valid for SASLprep.
fn prepare_password(password: &str) -> std::borrow::Cow<'_, str> {
    stringprep::saslprep(password).unwrap_or(std::borrow::Cow::Borrowed(password))
}

/// PBKDF2-HMAC-SHA256 of the prepared password: the expensive step.
pub fn salted_password(password: &str, salt: &[u8], iterations: u32) -> [u8; 32] {
    let mut out = [0u8; 32];
    pbkdf2::pbkdf2_hmac::<Sha256>(
        prepare_password(password).as_bytes(),
        salt,
        iterations,
        &mut out,
    );
    out
}

fn nonce() -> String {
    let mut raw = [0u8; 18];
    rand::thread_rng().fill_bytes(&mut raw);
    B64.encode(raw)
}

fn attr(part: Option<&str>, name: char) -> Result<&str, ProtocolError> {
    part.and_then(|p| p.strip_prefix(name))
        .and_then(|p| p.strip_prefix('='))
        .ok_or(ProtocolError::Scram("unexpected SCRAM message format"))
}

fn utf8(data: &[u8]) -> Result<&str, ProtocolError> {
    std::str::from_utf8(data).map_err(|_| ProtocolError::Scram("SCRAM message is not UTF-8"))
}

/// Client half, driving one exchange with a backend.
pub struct ScramClient {
    password: String,
    client_nonce: String,
    client_first_bare: String,
    auth_message: String,
    server_key: [u8; 32],
}

/// What the client must do next.
pub struct ServerFirst {
    pub salt: Vec<u8>,
    pub iterations: u32,
}

impl ScramClient {
    /// Starts an exchange; returns the client and its client-first message.
    pub fn start(password: &str) -> (Self, Vec<u8>) {
        let client_nonce = nonce();
        // PostgreSQL takes the user from the startup packet; libpq sends "n=".
        let client_first_bare = format!("n=,r={client_nonce}");
        let first = format!("{GS2_HEADER}{client_first_bare}").into_bytes();
        (
            Self {
                password: password.to_owned(),
                client_nonce,
                client_first_bare,
                auth_message: String::new(),
                server_key: [0; 32],
            },
            first,
        )
    }

    /// Parses server-first. The caller computes the salted password (maybe on
    /// a blocking thread) and then calls [`Self::client_final`].
    pub fn parse_server_first(&self, data: &[u8]) -> Result<(ServerFirst, String), ProtocolError> {
        let msg = utf8(data)?;
        let mut parts = msg.split(',');
        let nonce = attr(parts.next(), 'r')?;
        let salt = attr(parts.next(), 's')?;
        let iterations = attr(parts.next(), 'i')?;
        if !nonce.starts_with(&self.client_nonce) || nonce.len() == self.client_nonce.len() {
            return Err(ProtocolError::Scram("server nonce does not extend ours"));
        }
        let salt = B64
            .decode(salt)
            .map_err(|_| ProtocolError::Scram("salt is not base64"))?;
        let iterations: u32 = iterations
            .parse()
            .map_err(|_| ProtocolError::Scram("bad iteration count"))?;
        if iterations == 0 || iterations > MAX_ITERATIONS {
            return Err(ProtocolError::Scram("iteration count out of range"));
        }
        Ok((ServerFirst { salt, iterations }, msg.to_owned()))
    }

    pub fn password(&self) -> &str {
        &self.password
    }

    /// Builds client-final from server-first and the salted password.
    pub fn client_final(&mut self, server_first: &str, salted: &[u8; 32]) -> Vec<u8> {
        let nonce = server_first
            .split(',')
            .next()
            .and_then(|r| r.strip_prefix("r="))
            .unwrap_or_default();
        let without_proof = format!("c={GS2_HEADER_B64},r={nonce}");
        self.auth_message = format!("{},{server_first},{without_proof}", self.client_first_bare);
        let client_key = hmac(salted, &[b"Client Key"]);
        let stored_key = sha256(&client_key);
        let signature = hmac(&stored_key, &[self.auth_message.as_bytes()]);
        let proof: Vec<u8> = client_key
            .iter()
            .zip(signature.iter())
            .map(|(k, s)| k ^ s)
            .collect();
        self.server_key = hmac(salted, &[b"Server Key"]);
        format!("{without_proof},p={}", B64.encode(proof)).into_bytes()
    }

    /// Checks the server's signature: proves the server knew the password.
    pub fn verify_server_final(&self, data: &[u8]) -> Result<(), ProtocolError> {
        let msg = utf8(data)?;
        if msg.starts_with("e=") {
            return Err(ProtocolError::Scram("server reported an error"));
        }
        let sig = attr(msg.split(',').next(), 'v')?;
        let sig = B64
            .decode(sig)
            .map_err(|_| ProtocolError::Scram("server signature is not base64"))?;
        let expected = hmac(&self.server_key, &[self.auth_message.as_bytes()]);
        if bool::from(expected[..].ct_eq(&sig)) {
            Ok(())
        } else {
            Err(ProtocolError::Scram("server signature does not match"))
        }
    }
}

/// The stored form of a local password, as in `pg_authid.rolpassword`.
#[derive(Clone)]
pub struct ScramVerifier {
    salt: Vec<u8>,
    iterations: u32,
    stored_key: [u8; 32],
    server_key: [u8; 32],
}

impl std::fmt::Debug for ScramVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ScramVerifier(<redacted>)")
    }
}

impl ScramVerifier {
    /// Derives a verifier from a plaintext password with a fresh salt.
    pub fn from_password(password: &str, iterations: u32) -> Self {
        let mut salt = vec![0u8; 16];
        rand::thread_rng().fill_bytes(&mut salt);
        let salted = salted_password(password, &salt, iterations);
        Self {
            stored_key: sha256(&hmac(&salted, &[b"Client Key"])),
            server_key: hmac(&salted, &[b"Server Key"]),
            salt,
            iterations,
        }
    }

    /// Parses `SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>`.
    pub fn parse(stored: &str) -> Result<Self, ProtocolError> {
        let bad = ProtocolError::Scram("not a SCRAM-SHA-256 verifier");
        let rest = stored.strip_prefix("SCRAM-SHA-256$").ok_or(bad.clone())?;
        let (params, keys) = rest.split_once('$').ok_or(bad.clone())?;
        let (iter, salt) = params.split_once(':').ok_or(bad.clone())?;
        let (stored_key, server_key) = keys.split_once(':').ok_or(bad.clone())?;
        let key = |s: &str| -> Result<[u8; 32], ProtocolError> {
            B64.decode(s)
                .ok()
                .and_then(|v| <[u8; 32]>::try_from(v).ok())
                .ok_or(bad.clone())
        };
        Ok(Self {
            iterations: iter.parse().map_err(|_| bad.clone())?,
            salt: B64.decode(salt).map_err(|_| bad.clone())?,
            stored_key: key(stored_key)?,
            server_key: key(server_key)?,
        })
    }
}

/// Server half for one client exchange.
pub struct ScramServer<'a> {
    verifier: &'a ScramVerifier,
    client_first_bare: String,
    server_first: String,
    nonce: String,
}

impl<'a> ScramServer<'a> {
    /// Takes client-first, returns server-first.
    pub fn start(
        verifier: &'a ScramVerifier,
        client_first: &[u8],
    ) -> Result<(Self, Vec<u8>), ProtocolError> {
        let msg = utf8(client_first)?;
        let bare = match msg.split_once(",,") {
            // "y" means the client could bind but thinks we cannot: fine,
            // since we really do not offer -PLUS.
            Some(("n" | "y", bare)) => bare,
            Some(_) => {
                return Err(ProtocolError::Scram(
                    "channel binding is not supported by this proxy",
                ))
            }
            None => return Err(ProtocolError::Scram("malformed gs2 header")),
        };
        let mut parts = bare.split(',');
        let first = parts.next();
        let (user_part, nonce_part) = if first.is_some_and(|p| p.starts_with("m=")) {
            return Err(ProtocolError::Scram("SCRAM extensions are not supported"));
        } else {
            (first, parts.next())
        };
        attr(user_part, 'n')?;
        let client_nonce = attr(nonce_part, 'r')?;
        if client_nonce.is_empty() || client_nonce.contains(|c: char| !c.is_ascii_graphic()) {
            return Err(ProtocolError::Scram("invalid client nonce"));
        }
        let nonce = format!("{client_nonce}{}", self::nonce());
        let server_first = format!(
            "r={nonce},s={},i={}",
            B64.encode(&verifier.salt),
            verifier.iterations
        );
        let server = Self {
            verifier,
            client_first_bare: bare.to_owned(),
            nonce,
            server_first: server_first.clone(),
        };
        Ok((server, server_first.into_bytes()))
    }

    /// Takes client-final; returns server-final when the proof is right.
    pub fn finish(&self, client_final: &[u8]) -> Result<Vec<u8>, ProtocolError> {
        let msg = utf8(client_final)?;
        let (without_proof, proof) = msg
            .rsplit_once(",p=")
            .ok_or(ProtocolError::Scram("client-final has no proof"))?;
        let mut parts = without_proof.split(',');
        let binding = attr(parts.next(), 'c')?;
        let nonce = attr(parts.next(), 'r')?;
        // Only "n,," and "y,," are accepted in start(): both base64 to these.
        if binding != GS2_HEADER_B64 && binding != "eSws" {
            return Err(ProtocolError::Scram("channel binding data mismatch"));
        }
        if nonce != self.nonce {
            return Err(ProtocolError::Scram("nonce mismatch"));
        }
        let proof = B64
            .decode(proof)
            .map_err(|_| ProtocolError::Scram("proof is not base64"))?;
        if proof.len() != 32 {
            return Err(ProtocolError::Scram("proof has the wrong length"));
        }
        let auth_message = format!(
            "{},{},{without_proof}",
            self.client_first_bare, self.server_first
        );
        let signature = hmac(&self.verifier.stored_key, &[auth_message.as_bytes()]);
        let client_key: Vec<u8> = proof
            .iter()
            .zip(signature.iter())
            .map(|(p, s)| p ^ s)
            .collect();
        if !bool::from(sha256(&client_key)[..].ct_eq(&self.verifier.stored_key)) {
            return Err(ProtocolError::Scram("password authentication failed"));
        }
        let server_signature = hmac(&self.verifier.server_key, &[auth_message.as_bytes()]);
        Ok(format!("v={}", B64.encode(server_signature)).into_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exchange(client_pw: &str, server_pw: &str) -> Result<(), ProtocolError> {
        let verifier = ScramVerifier::from_password(server_pw, 64);
        let (mut client, first) = ScramClient::start(client_pw);
        let (server, server_first) = ScramServer::start(&verifier, &first)?;
        let (params, server_first) = client.parse_server_first(&server_first)?;
        let salted = salted_password(client.password(), &params.salt, params.iterations);
        let fin = client.client_final(&server_first, &salted);
        let server_final = server.finish(&fin)?;
        client.verify_server_final(&server_final)
    }

    #[test]
    fn client_and_server_agree() {
        exchange("secret", "secret").unwrap();
        assert!(exchange("wrong", "secret").is_err());
    }

    #[test]
    fn parses_postgres_verifier() {
        // From PostgreSQL's regression tests (password "foo"? any valid one).
        let v = ScramVerifier::parse(
            "SCRAM-SHA-256$4096:c2FsdHNhbHRzYWx0c2FsdA==$bGdTmjNjiFW6hXOQn+rGjVjS+bTW3h0LhN02m8GhQXc=:nmlP7cdU05QUShv4IFbyyB9Ob2AcW2eY+PeiL85vPGY=",
        );
        assert!(v.is_ok());
        assert!(ScramVerifier::parse("md5abc").is_err());
    }

    #[test]
    fn rejects_hostile_server_first() {
        let (client, _) = ScramClient::start("pw");
        assert!(client.parse_server_first(b"r=other,s=AAAA,i=4096").is_err());
        let nonce = format!("r={}x,s=AAAA,i=999999999", client.client_nonce);
        assert!(client.parse_server_first(nonce.as_bytes()).is_err());
        assert!(client.parse_server_first(b"\xff").is_err());
    }

    #[test]
    fn rejects_channel_binding_and_garbage() {
        let verifier = ScramVerifier::from_password("pw", 64);
        assert!(ScramServer::start(&verifier, b"p=tls-server-end-point,,n=,r=abc").is_err());
        assert!(ScramServer::start(&verifier, b"garbage").is_err());
        let (server, _) = ScramServer::start(&verifier, b"n,,n=,r=abc").unwrap();
        assert!(server.finish(b"c=biws,r=abc,p=AAAA").is_err());
        assert!(server.finish(b"nonsense").is_err());
    }
}
