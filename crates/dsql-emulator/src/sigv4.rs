//! Aurora DSQL IAM auth tokens: an independent SigV4 verifier and signer.
//!
//! A token is a SigV4 query-string presigned `GET https://HOST/?Action=...`
//! with the `https://` removed:
//!
//! ```text
//! HOST/?Action=DbConnect&X-Amz-Algorithm=AWS4-HMAC-SHA256
//!      &X-Amz-Credential=AKID%2F20240827%2Fus-east-1%2Fdsql%2Faws4_request
//!      &X-Amz-Date=20240827T000000Z&X-Amz-Expires=450
//!      &X-Amz-SignedHeaders=host&X-Amz-Signature=<64 hex>
//! ```
//!
//! Everything here is written from the SigV4 specification with `hmac` and
//! `sha2` only; it deliberately shares no code with `aws-sigv4` or the AWS
//! SDKs, so it can catch mistakes in how a client builds tokens. It is
//! checked against signatures produced by aws-sdk-dsql and botocore (see the
//! tests).
//!
//! The canonical request the SDKs sign for these tokens is
//!
//! ```text
//! GET
//! /
//! <every query parameter except X-Amz-Signature, URI-encoded, sorted>
//! host:<HOST>
//!
//! host
//! e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855
//! ```
//!
//! The payload hash is the SHA-256 of the empty body, not `UNSIGNED-PAYLOAD`
//! (which only S3 presigning uses); see [`PAYLOAD_HASH`].

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use dsql_proxy_config::Secret;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::error::TokenRejection;

/// The only signing algorithm SigV4 presigned URLs use here.
pub const ALGORITHM: &str = "AWS4-HMAC-SHA256";
/// Signing name of Aurora DSQL.
pub const SERVICE: &str = "dsql";
/// Action of a token for any role but `admin`.
pub const ACTION_CONNECT: &str = "DbConnect";
/// Action of a token for the `admin` role.
pub const ACTION_CONNECT_ADMIN: &str = "DbConnectAdmin";
/// The role that needs `DbConnectAdmin`.
pub const ADMIN_ROLE: &str = "admin";
/// Longest `X-Amz-Expires` SigV4 allows (one week).
pub const MAX_EXPIRES: u64 = 604_800;
/// Hash of the (empty) payload in the canonical request: SHA-256 of the
/// empty string. aws-sdk-dsql signs `SignableBody::Bytes(&[])` and botocore
/// an empty body; both hash it, and only this value reproduces their
/// published signatures.
pub const PAYLOAD_HASH: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

const P_ACTION: &str = "Action";
const P_ALGORITHM: &str = "X-Amz-Algorithm";
const P_CREDENTIAL: &str = "X-Amz-Credential";
const P_DATE: &str = "X-Amz-Date";
const P_EXPIRES: &str = "X-Amz-Expires";
const P_SIGNED_HEADERS: &str = "X-Amz-SignedHeaders";
const P_SECURITY_TOKEN: &str = "X-Amz-Security-Token";
const P_SIGNATURE: &str = "X-Amz-Signature";

type HmacSha256 = Hmac<Sha256>;

/// The action a role's token must carry.
pub fn action_for_role(role: &str) -> &'static str {
    if role == ADMIN_ROLE {
        ACTION_CONNECT_ADMIN
    } else {
        ACTION_CONNECT
    }
}

/// What a verified token said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedToken {
    pub host: String,
    pub access_key_id: String,
    pub action: String,
    pub signed_at: SystemTime,
    pub expires_at: SystemTime,
    /// Whether the token carried `X-Amz-Security-Token` (temporary
    /// credentials). The session token itself is signed but not checked.
    pub has_session_token: bool,
}

/// Checks tokens for one cluster. Pure: the current time is a parameter.
#[derive(Clone)]
pub struct TokenVerifier {
    pub cluster_host: String,
    pub region: String,
    /// Secret access keys by access key id.
    pub keys: HashMap<String, Secret>,
    /// How far in the future `X-Amz-Date` may be.
    pub max_clock_skew: Duration,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut ids: Vec<&String> = self.keys.keys().collect();
        ids.sort();
        f.debug_struct("TokenVerifier")
            .field("cluster_host", &self.cluster_host)
            .field("region", &self.region)
            .field("access_key_ids", &ids)
            .field("max_clock_skew", &self.max_clock_skew)
            .finish()
    }
}

impl TokenVerifier {
    /// Verifies `token` for a session as `role`, at time `now`.
    ///
    /// `sni` is the TLS server name the client sent; when given it must be
    /// the token's host. (The emulator always passes it: handshakes without
    /// SNI are refused before a token is ever read.)
    ///
    /// Checks, in order: shape, algorithm, signed headers, access key,
    /// credential scope, host, SNI, action, expiry range, validity window,
    /// and finally the signature itself (compared in constant time).
    pub fn verify(
        &self,
        token: &str,
        role: &str,
        sni: Option<&str>,
        now: SystemTime,
    ) -> Result<VerifiedToken, TokenRejection> {
        let parsed = ParsedToken::parse(token)?;

        let algorithm = parsed.required(P_ALGORITHM)?;
        if algorithm != ALGORITHM {
            return Err(TokenRejection::UnsupportedAlgorithm(algorithm.to_owned()));
        }
        let signed_headers = parsed.required(P_SIGNED_HEADERS)?;
        if signed_headers != "host" {
            return Err(TokenRejection::SignedHeaders(signed_headers.to_owned()));
        }
        let amz_date = parsed.required(P_DATE)?;
        let signed_at = parse_amz_date(amz_date).ok_or_else(|| {
            TokenRejection::Malformed(format!(
                "X-Amz-Date {amz_date:?} is not of the form YYYYMMDDTHHMMSSZ"
            ))
        })?;

        let credential = parsed.required(P_CREDENTIAL)?;
        let scope: Vec<&str> = credential.split('/').collect();
        let [access_key_id, date, region, service, terminator] = scope[..] else {
            return Err(TokenRejection::Malformed(
                "X-Amz-Credential is not ACCESS_KEY_ID/DATE/REGION/SERVICE/aws4_request".into(),
            ));
        };
        let Some(secret) = self.keys.get(access_key_id) else {
            return Err(TokenRejection::UnknownAccessKey(access_key_id.to_owned()));
        };
        if date != &amz_date[..8] {
            return Err(TokenRejection::CredentialScope(format!(
                "scope date {date:?} is not the date of X-Amz-Date {amz_date:?}"
            )));
        }
        if region != self.region {
            return Err(TokenRejection::WrongRegion {
                expected: self.region.clone(),
                got: region.to_owned(),
            });
        }
        if service != SERVICE {
            return Err(TokenRejection::CredentialScope(format!(
                "service is {service:?}, expected {SERVICE:?}"
            )));
        }
        if terminator != "aws4_request" {
            return Err(TokenRejection::CredentialScope(format!(
                "scope ends in {terminator:?}, expected \"aws4_request\""
            )));
        }

        if !parsed.host.eq_ignore_ascii_case(&self.cluster_host) {
            return Err(TokenRejection::WrongHost {
                expected: self.cluster_host.clone(),
                got: parsed.host.clone(),
            });
        }
        if let Some(sni) = sni {
            if !sni.eq_ignore_ascii_case(&parsed.host) {
                return Err(TokenRejection::SniMismatch {
                    sni: sni.to_owned(),
                    host: parsed.host.clone(),
                });
            }
        }

        let action = parsed.required(P_ACTION)?;
        let expected = action_for_role(role);
        if action != expected {
            return Err(TokenRejection::WrongAction {
                role: role.to_owned(),
                expected,
                got: action.to_owned(),
            });
        }

        let expires = parsed.required(P_EXPIRES)?;
        let number = if expires.bytes().all(|b| b.is_ascii_digit()) {
            expires.parse::<u64>().ok()
        } else {
            None
        };
        let expires_in: u64 = match number {
            Some(n) if (1..=MAX_EXPIRES).contains(&n) => n,
            Some(n) => {
                return Err(TokenRejection::InvalidExpires(format!(
                    "is {n}, must be between 1 and {MAX_EXPIRES}"
                )))
            }
            None => {
                return Err(TokenRejection::InvalidExpires(format!(
                    "{expires:?} is not a number of seconds"
                )))
            }
        };

        let now_s = unix_seconds(now);
        let skew = i64::try_from(self.max_clock_skew.as_secs()).unwrap_or(i64::MAX);
        if now_s < signed_at.saturating_sub(skew) {
            return Err(TokenRejection::ClockSkew {
                signed_at: amz_date.to_owned(),
                max_skew: self.max_clock_skew,
            });
        }
        // expires_in <= MAX_EXPIRES, so the sum cannot overflow for any
        // date parse_amz_date accepts.
        let expires_at = signed_at + expires_in as i64;
        if now_s > expires_at {
            return Err(TokenRejection::Expired {
                signed_at: amz_date.to_owned(),
                expires_in,
            });
        }

        let presented = parsed.required(P_SIGNATURE)?;
        let canonical_query = parsed.canonical_query();
        let expected_sig = signature(
            &parsed.host,
            &canonical_query,
            amz_date,
            region,
            secret.expose(),
        );
        if !bool::from(expected_sig.as_bytes().ct_eq(presented.as_bytes())) {
            return Err(TokenRejection::SignatureMismatch);
        }

        Ok(VerifiedToken {
            host: parsed.host.clone(),
            access_key_id: access_key_id.to_owned(),
            action: action.to_owned(),
            signed_at: system_time(signed_at),
            expires_at: system_time(expires_at),
            has_session_token: parsed.get(P_SECURITY_TOKEN).is_some(),
        })
    }
}

/// **Test helper: the emulator's own, independent SigV4 signer.** Builds an
/// auth token the way aws-sdk-dsql does (same parameters, same canonical
/// request) without using any AWS code, so tests can make valid tokens and
/// forge expired, future-dated, wrong-host or wrong-action ones.
///
/// `action` is normally [`ACTION_CONNECT`] or [`ACTION_CONNECT_ADMIN`];
/// anything is accepted so tests can forge bad ones. `date` is the signing
/// time (`X-Amz-Date`, truncated to the second) and `expires` the
/// `X-Amz-Expires` value in seconds. With `session_token`, the token carries
/// `X-Amz-Security-Token` (signed, as the SDKs do for temporary
/// credentials). Parameters come out in canonical (sorted) order with
/// `X-Amz-Signature` last.
#[allow(clippy::too_many_arguments)]
pub fn sign_token(
    host: &str,
    region: &str,
    action: &str,
    access_key: &str,
    secret: &str,
    session_token: Option<&str>,
    date: SystemTime,
    expires: u64,
) -> String {
    let amz_date = format_amz_date(unix_seconds(date));
    let credential = format!(
        "{access_key}/{}/{region}/{SERVICE}/aws4_request",
        &amz_date[..8]
    );
    let expires = expires.to_string();
    let mut params: Vec<(&str, &str)> = vec![
        (P_ACTION, action),
        (P_ALGORITHM, ALGORITHM),
        (P_CREDENTIAL, &credential),
        (P_DATE, &amz_date),
        (P_EXPIRES, &expires),
        (P_SIGNED_HEADERS, "host"),
    ];
    if let Some(t) = session_token {
        params.push((P_SECURITY_TOKEN, t));
    }
    let query = canonical_query_string(params.iter().copied());
    let sig = signature(host, &query, &amz_date, region, secret);
    format!("{host}/?{query}&{P_SIGNATURE}={sig}")
}

/// The lowercase hex SigV4 signature of a DSQL token.
fn signature(
    host: &str,
    canonical_query: &str,
    amz_date: &str,
    region: &str,
    secret: &str,
) -> String {
    signature_with_payload_hash(
        host,
        canonical_query,
        amz_date,
        region,
        secret,
        PAYLOAD_HASH,
    )
}

fn signature_with_payload_hash(
    host: &str,
    canonical_query: &str,
    amz_date: &str,
    region: &str,
    secret: &str,
    payload_hash: &str,
) -> String {
    let canonical_request =
        format!("GET\n/\n{canonical_query}\nhost:{host}\n\nhost\n{payload_hash}");
    let date = amz_date.get(..8).unwrap_or(amz_date);
    let scope = format!("{date}/{region}/{SERVICE}/aws4_request");
    let string_to_sign = format!(
        "{ALGORITHM}\n{amz_date}\n{scope}\n{}",
        hex(&Sha256::digest(canonical_request.as_bytes()))
    );
    let k_date = hmac(format!("AWS4{secret}").as_bytes(), date.as_bytes());
    let k_region = hmac(&k_date, region.as_bytes());
    let k_service = hmac(&k_region, SERVICE.as_bytes());
    let k_signing = hmac(&k_service, b"aws4_request");
    hex(&hmac(&k_signing, string_to_sign.as_bytes()))
}

fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    // HMAC accepts keys of any length; new_from_slice cannot fail for it.
    let mut mac = match HmacSha256::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => return Vec::new(),
    };
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(char::from(DIGITS[usize::from(b >> 4)]));
        s.push(char::from(DIGITS[usize::from(b & 0xf)]));
    }
    s
}

/// SigV4 URI encoding: everything but `A-Z a-z 0-9 - _ . ~` as `%XX`
/// (uppercase hex), including `/`, `=`, `+` and space.
pub fn uri_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for &b in s.as_bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Sorted `k=v` pairs, both URI-encoded, joined with `&`.
fn canonical_query_string<'a>(params: impl Iterator<Item = (&'a str, &'a str)>) -> String {
    let mut encoded: Vec<(String, String)> = params
        .map(|(k, v)| (uri_encode(k), uri_encode(v)))
        .collect();
    encoded.sort();
    encoded
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

fn percent_decode(s: &str, what: &str) -> Result<String, TokenRejection> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hi = bytes.get(i + 1).and_then(|c| char::from(*c).to_digit(16));
            let lo = bytes.get(i + 2).and_then(|c| char::from(*c).to_digit(16));
            match (hi, lo) {
                // Two hex digits are at most 0xff.
                (Some(h), Some(l)) => out.push((h * 16 + l) as u8),
                _ => {
                    return Err(TokenRejection::Malformed(format!(
                        "bad percent-encoding in query parameter {what}"
                    )))
                }
            }
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| {
        TokenRejection::Malformed(format!("query parameter {what} is not valid UTF-8"))
    })
}

/// A token split into host and decoded query parameters.
#[derive(Debug)]
struct ParsedToken {
    host: String,
    params: Vec<(String, String)>,
}

impl ParsedToken {
    fn parse(token: &str) -> Result<Self, TokenRejection> {
        let token = token.trim();
        if token.is_empty() {
            return Err(TokenRejection::Malformed("the password is empty".into()));
        }
        if token.contains("://") {
            return Err(TokenRejection::Malformed(
                "the token must start with the host name, without a URL scheme".into(),
            ));
        }
        let Some((host, rest)) = token.split_once('/') else {
            return Err(TokenRejection::Malformed(
                "not a presigned URL of the form HOST/?Action=...".into(),
            ));
        };
        if host.is_empty() {
            return Err(TokenRejection::Malformed("the token has no host".into()));
        }
        let Some(query) = rest.strip_prefix('?') else {
            return Err(TokenRejection::Malformed(
                "the token's path must be \"/\" followed by a query string".into(),
            ));
        };
        let mut params: Vec<(String, String)> = Vec::new();
        for pair in query.split('&') {
            let Some((k, v)) = pair.split_once('=') else {
                return Err(TokenRejection::Malformed(
                    "query string has a parameter without '='".into(),
                ));
            };
            let name = percent_decode(k, "name")?;
            let value = percent_decode(v, &name)?;
            if params.iter().any(|(n, _)| *n == name) {
                return Err(TokenRejection::Malformed(format!(
                    "query parameter {name} appears more than once"
                )));
            }
            params.push((name, value));
        }
        Ok(Self {
            host: host.to_owned(),
            params,
        })
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    fn required(&self, name: &str) -> Result<&str, TokenRejection> {
        self.get(name)
            .ok_or_else(|| TokenRejection::Malformed(format!("missing query parameter {name}")))
    }

    fn canonical_query(&self) -> String {
        canonical_query_string(
            self.params
                .iter()
                .filter(|(n, _)| n != P_SIGNATURE)
                .map(|(n, v)| (n.as_str(), v.as_str())),
        )
    }
}

// ---------------------------------------------------------------------------
// Time without a calendar crate: X-Amz-Date is always UTC.

fn unix_seconds(t: SystemTime) -> i64 {
    match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        Err(e) => {
            let before = e.duration();
            let s = i64::try_from(before.as_secs()).unwrap_or(i64::MAX);
            // -0.5 s is second -1, not 0.
            if before.subsec_nanos() > 0 {
                -s - 1
            } else {
                -s
            }
        }
    }
}

fn system_time(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs.unsigned_abs())
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// `YYYYMMDDTHHMMSSZ` for a Unix time.
pub fn format_amz_date(secs: i64) -> String {
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Unix time of a strict `YYYYMMDDTHHMMSSZ` (years 1970..=9999).
pub fn parse_amz_date(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let part = &b[r];
        if !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(part).ok()?.parse().ok()
    };
    let (y, mo, d) = (num(0..4)?, num(4..6)?, num(6..8)?);
    let (h, mi, sec) = (num(9..11)?, num(11..13)?, num(13..15)?);
    if y < 1970 || !(1..=12).contains(&mo) || h > 23 || mi > 59 || sec > 59 {
        return None;
    }
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let month_days = match mo {
        2 if leap => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    };
    if !(1..=month_days).contains(&d) {
        return None;
    }
    Some(days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + sec)
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: &str = "20240827T000000Z";

    fn t0() -> SystemTime {
        system_time(parse_amz_date(T0).unwrap())
    }

    fn sig_of(token: &str) -> &str {
        token.rsplit_once("X-Amz-Signature=").unwrap().1
    }

    fn verifier(host: &str, akid: &str, secret: &str) -> TokenVerifier {
        TokenVerifier {
            cluster_host: host.into(),
            region: "us-east-1".into(),
            keys: HashMap::from([(akid.to_owned(), Secret::new(secret))]),
            max_clock_skew: Duration::from_secs(300),
        }
    }

    const PECCY: &str = "peccy.dsql.us-east-1.on.aws";
    const BOTO_HOST: &str = "abcdefghijklmnopqrst.dsql.us-east-1.on.aws";
    const BOTO_AKID: &str = "AKIDEXAMPLE";
    const BOTO_SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";

    fn peccy(action: &str) -> String {
        sign_token(
            PECCY,
            "us-east-1",
            action,
            "akid",
            "secret",
            None,
            t0(),
            450,
        )
    }

    #[test]
    fn dates_round_trip() {
        assert_eq!(parse_amz_date("19700101T000000Z"), Some(0));
        assert_eq!(parse_amz_date(T0), Some(1_724_716_800));
        assert_eq!(format_amz_date(1_724_716_800), T0);
        assert_eq!(parse_amz_date("20240229T235959Z"), Some(1_709_251_199));
        for s in [0i64, 59, 86_399, 951_782_400, 1_709_251_199, 4_102_444_800] {
            assert_eq!(parse_amz_date(&format_amz_date(s)), Some(s), "{s}");
        }
        for bad in [
            "20230229T000000Z",
            "20241301T000000Z",
            "20240827T240000Z",
            "20240827 000000Z",
            "2024-08-27T00:00",
            "+0240827T000000Z",
            "20240827T000000",
        ] {
            assert_eq!(parse_amz_date(bad), None, "{bad}");
        }
        assert_eq!(unix_seconds(UNIX_EPOCH - Duration::from_millis(500)), -1);
    }

    #[test]
    fn uri_encoding_is_sigv4() {
        assert_eq!(uri_encode("a-Z_0.~"), "a-Z_0.~");
        assert_eq!(uri_encode("a/b c+d=e"), "a%2Fb%20c%2Bd%3De");
    }

    /// aws-sdk-dsql's own unit test (`auth_token.rs`): akid/secret,
    /// us-east-1, peccy host, 450 s, 2024-08-27T00:00:00Z.
    #[test]
    fn reproduces_aws_sdk_dsql_vectors() {
        let t = peccy(ACTION_CONNECT);
        assert_eq!(
            t,
            "peccy.dsql.us-east-1.on.aws/?Action=DbConnect&X-Amz-Algorithm=AWS4-HMAC-SHA256\
             &X-Amz-Credential=akid%2F20240827%2Fus-east-1%2Fdsql%2Faws4_request\
             &X-Amz-Date=20240827T000000Z&X-Amz-Expires=450&X-Amz-SignedHeaders=host\
             &X-Amz-Signature=f5f2ad764ca5df44045d4ab6ccecba0eef941b0007e5765885a0b6ed3702a3f8"
        );
        assert_eq!(
            sig_of(&peccy(ACTION_CONNECT_ADMIN)),
            "267cf8d04d84444f7a62d5bdb40c44bfc6cb13dd6c64fa7f772df6bbaa90fff1"
        );
    }

    /// The payload hash is what decides between the two candidates: only
    /// SHA-256("") reproduces the SDK vector; UNSIGNED-PAYLOAD does not.
    #[test]
    fn payload_hash_is_the_empty_string_sha256() {
        assert_eq!(PAYLOAD_HASH, hex(&Sha256::digest(b"")));
        let t = peccy(ACTION_CONNECT);
        let query = ParsedToken::parse(&t).unwrap().canonical_query();
        let unsigned = signature_with_payload_hash(
            PECCY,
            &query,
            T0,
            "us-east-1",
            "secret",
            "UNSIGNED-PAYLOAD",
        );
        assert_ne!(
            unsigned,
            "f5f2ad764ca5df44045d4ab6ccecba0eef941b0007e5765885a0b6ed3702a3f8"
        );
        assert_eq!(
            signature(PECCY, &query, T0, "us-east-1", "secret"),
            "f5f2ad764ca5df44045d4ab6ccecba0eef941b0007e5765885a0b6ed3702a3f8"
        );
    }

    /// botocore's `generate_db_connect_admin_auth_token` test vector.
    #[test]
    fn reproduces_botocore_vector() {
        let t = sign_token(
            BOTO_HOST,
            "us-east-1",
            ACTION_CONNECT_ADMIN,
            BOTO_AKID,
            BOTO_SECRET,
            None,
            t0(),
            900,
        );
        assert_eq!(
            sig_of(&t),
            "3f2c875dfc306cfc997a0493eb0657812b253f307c783c412492232d36459b3f"
        );
    }

    /// The SDK's own token string (parameters in the SDK's order) verifies,
    /// which checks the parser against an exact third-party string.
    #[test]
    fn verifies_the_sdk_tokens() {
        let v = verifier(PECCY, "akid", "secret");
        let sdk = "peccy.dsql.us-east-1.on.aws/?Action=DbConnect&X-Amz-Algorithm=AWS4-HMAC-SHA256\
                   &X-Amz-Credential=akid%2F20240827%2Fus-east-1%2Fdsql%2Faws4_request\
                   &X-Amz-Date=20240827T000000Z&X-Amz-Expires=450&X-Amz-SignedHeaders=host\
                   &X-Amz-Signature=f5f2ad764ca5df44045d4ab6ccecba0eef941b0007e5765885a0b6ed3702a3f8";
        let ok = v
            .verify(sdk, "app", Some(PECCY), t0() + Duration::from_secs(10))
            .unwrap();
        assert_eq!(ok.access_key_id, "akid");
        assert_eq!(ok.action, "DbConnect");
        assert_eq!(ok.signed_at, t0());
        assert_eq!(ok.expires_at, t0() + Duration::from_secs(450));
        assert!(!ok.has_session_token);
        let admin = peccy(ACTION_CONNECT_ADMIN);
        assert!(v.verify(&admin, "admin", Some(PECCY), t0()).is_ok());
        // Expiry is inclusive at the last second.
        assert!(v
            .verify(sdk, "app", None, t0() + Duration::from_secs(450))
            .is_ok());
        // Up to the skew before X-Amz-Date is fine.
        assert!(v
            .verify(sdk, "app", None, t0() - Duration::from_secs(300))
            .is_ok());
    }

    fn reject(v: &TokenVerifier, token: &str, role: &str, now: SystemTime) -> TokenRejection {
        match v.verify(token, role, Some(&v.cluster_host.clone()), now) {
            Ok(ok) => panic!("token accepted: {ok:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn rejects_expired_and_future_tokens() {
        let v = verifier(PECCY, "akid", "secret");
        let t = peccy(ACTION_CONNECT);
        let e = reject(&v, &t, "app", t0() + Duration::from_secs(451));
        assert_eq!(e.kind(), "expired");
        assert!(e.to_string().contains("expired"), "{e}");
        let e = reject(&v, &t, "app", t0() - Duration::from_secs(301));
        assert_eq!(e.kind(), "clock_skew");
        assert!(e.to_string().contains("clock skew"), "{e}");
    }

    #[test]
    fn rejects_tampering() {
        let v = verifier(PECCY, "akid", "secret");
        let t = peccy(ACTION_CONNECT);
        // Flip the last signature digit.
        let mut tampered = t.clone();
        let last = tampered.pop().unwrap();
        tampered.push(if last == '0' { '1' } else { '0' });
        let e = reject(&v, &tampered, "app", t0());
        assert_eq!(e, TokenRejection::SignatureMismatch);
        assert!(e.to_string().contains("signature mismatch"));
        // Signature of the wrong length.
        let short = &t[..t.len() - 2];
        assert_eq!(
            reject(&v, short, "app", t0()),
            TokenRejection::SignatureMismatch
        );
        // Extending the expiry breaks the signature.
        let longer = t.replace("X-Amz-Expires=450", "X-Amz-Expires=900");
        assert_eq!(
            reject(&v, &longer, "app", t0()),
            TokenRejection::SignatureMismatch
        );
        // Wrong secret for a known key.
        let other = sign_token(
            PECCY,
            "us-east-1",
            ACTION_CONNECT,
            "akid",
            "not-the-secret",
            None,
            t0(),
            450,
        );
        assert_eq!(
            reject(&v, &other, "app", t0()),
            TokenRejection::SignatureMismatch
        );
        // Host swapped: caught as a wrong host before the signature.
        let moved = t.replace(PECCY, "other.dsql.us-east-1.on.aws");
        let e = reject(&v, &moved, "app", t0());
        assert_eq!(e.kind(), "wrong_host");
        assert!(e.to_string().contains("wrong host"), "{e}");
        // A cluster that accepts the other host still sees a bad signature.
        let v2 = verifier("other.dsql.us-east-1.on.aws", "akid", "secret");
        assert_eq!(
            reject(&v2, &moved, "app", t0()),
            TokenRejection::SignatureMismatch
        );
    }

    #[test]
    fn rejects_wrong_action_for_role() {
        let v = verifier(PECCY, "akid", "secret");
        let e = reject(&v, &peccy(ACTION_CONNECT), "admin", t0());
        assert_eq!(e.kind(), "wrong_action");
        assert!(e.to_string().contains("wrong action for role"), "{e}");
        let e = reject(&v, &peccy(ACTION_CONNECT_ADMIN), "app", t0());
        assert_eq!(e.kind(), "wrong_action");
        let e = reject(&v, &peccy("Connect"), "app", t0());
        assert_eq!(e.kind(), "wrong_action");
    }

    #[test]
    fn rejects_unknown_key_region_and_sni() {
        let v = verifier(PECCY, "akid", "secret");
        let t = sign_token(
            PECCY,
            "us-east-1",
            ACTION_CONNECT,
            "AKIDUNKNOWN",
            "secret",
            None,
            t0(),
            450,
        );
        let e = reject(&v, &t, "app", t0());
        assert_eq!(e, TokenRejection::UnknownAccessKey("AKIDUNKNOWN".into()));
        assert!(e.to_string().contains("unknown access key"));

        let t = sign_token(
            PECCY,
            "us-west-2",
            ACTION_CONNECT,
            "akid",
            "secret",
            None,
            t0(),
            450,
        );
        let e = reject(&v, &t, "app", t0());
        assert_eq!(e.kind(), "wrong_region");
        assert!(e.to_string().contains("wrong region"), "{e}");

        let t = peccy(ACTION_CONNECT);
        let e = v
            .verify(&t, "app", Some("evil.dsql.us-east-1.on.aws"), t0())
            .unwrap_err();
        assert_eq!(e.kind(), "sni_mismatch");
        // Host names compare case-insensitively, as DNS does.
        assert!(v
            .verify(&t, "app", Some("PECCY.dsql.us-east-1.on.aws"), t0())
            .is_ok());
    }

    #[test]
    fn rejects_expires_out_of_range() {
        let v = verifier(PECCY, "akid", "secret");
        for (expires, ok) in [(0u64, false), (1, true), (604_800, true), (604_801, false)] {
            let t = sign_token(
                PECCY,
                "us-east-1",
                ACTION_CONNECT,
                "akid",
                "secret",
                None,
                t0(),
                expires,
            );
            let r = v.verify(&t, "app", None, t0());
            assert_eq!(r.is_ok(), ok, "expires {expires}: {r:?}");
            if !ok {
                assert_eq!(r.unwrap_err().kind(), "invalid_expires");
            }
        }
        let t = peccy(ACTION_CONNECT).replace("X-Amz-Expires=450", "X-Amz-Expires=abc");
        assert_eq!(reject(&v, &t, "app", t0()).kind(), "invalid_expires");
    }

    #[test]
    fn rejects_malformed_tokens() {
        let v = verifier(PECCY, "akid", "secret");
        let good = peccy(ACTION_CONNECT);
        let cases: Vec<String> = vec![
            String::new(),
            "secret-password".into(),
            format!("https://{good}"),
            good.replacen("/?", "/x?", 1),
            good.replace("&X-Amz-Date=20240827T000000Z", ""),
            good.replace("&X-Amz-Signature=", "&X-Amz-Signature"),
            good.replace("%2F", "%2"),
            good.replace("%2F", "%ZZ"),
            good.replace("X-Amz-Date=20240827T000000Z", "X-Amz-Date=2024-08-27"),
            format!("{good}&Action=DbConnect"),
            good.replace("akid%2F20240827", "akid%2Fextra%2F20240827"),
            good.replace(
                "X-Amz-Algorithm=AWS4-HMAC-SHA256",
                "X-Amz-Algorithm=AWS4-HMAC-SHA1",
            ),
            good.replace(
                "X-Amz-SignedHeaders=host",
                "X-Amz-SignedHeaders=host%3Bx-amz-date",
            ),
        ];
        for bad in cases {
            let e = reject(&v, &bad, "app", t0());
            assert!(
                matches!(
                    e,
                    TokenRejection::Malformed(_)
                        | TokenRejection::UnsupportedAlgorithm(_)
                        | TokenRejection::SignedHeaders(_)
                ),
                "{bad:?}: {e:?}"
            );
            assert!(e.to_string().contains("malformed"), "{e}");
        }
        // Scope problems.
        let e = reject(
            &v,
            &good.replace("%2F20240827%2F", "%2F20240826%2F"),
            "app",
            t0(),
        );
        assert_eq!(e.kind(), "credential_scope");
        let e = reject(&v, &good.replace("%2Fdsql%2F", "%2Frds-db%2F"), "app", t0());
        assert_eq!(e.kind(), "credential_scope");
    }

    /// Temporary credentials: X-Amz-Security-Token is signed along with the
    /// rest, and parameter order in the token does not matter.
    #[test]
    fn accepts_session_tokens_in_any_order() {
        let v = verifier(BOTO_HOST, BOTO_AKID, BOTO_SECRET);
        let session = "IQoJb3JpZ2luX2VjEJr//////////wEaCXVzLWVhc3QtMSJH+session/token==";
        let t = sign_token(
            BOTO_HOST,
            "us-east-1",
            ACTION_CONNECT,
            BOTO_AKID,
            BOTO_SECRET,
            Some(session),
            t0(),
            900,
        );
        assert!(t.contains("X-Amz-Security-Token=IQoJb3JpZ2luX2VjEJr%2F%2F"));
        let (host, query) = t.split_once("/?").unwrap();
        let mut parts: Vec<&str> = query.split('&').collect();
        parts.reverse();
        let reordered = format!("{host}/?{}", parts.join("&"));
        assert_ne!(reordered, t);
        for token in [&t, &reordered] {
            let ok = v.verify(token, "app", Some(BOTO_HOST), t0()).unwrap();
            assert!(ok.has_session_token);
        }
        // The session token is covered by the signature.
        let swapped = reordered.replace("session%2Ftoken", "session%2Fother");
        assert_eq!(
            reject(&v, &swapped, "app", t0()),
            TokenRejection::SignatureMismatch
        );
        // Dropping it also breaks the signature.
        let dropped: Vec<&str> = parts
            .iter()
            .copied()
            .filter(|p| !p.starts_with("X-Amz-Security-Token="))
            .collect();
        let dropped = format!("{host}/?{}", dropped.join("&"));
        assert_eq!(
            reject(&v, &dropped, "app", t0()),
            TokenRejection::SignatureMismatch
        );
    }
}
