//! Messages a client sends during authentication.

use bytes::Bytes;

use crate::frame::{take_cstr, take_i32, RawMessage};
use crate::ProtocolError;

/// PasswordMessage ('p') carrying a cleartext password.
pub fn decode_password(msg: &RawMessage) -> Result<String, ProtocolError> {
    expect_tag(msg, b'p', "PasswordMessage")?;
    let mut body: &[u8] = &msg.body;
    let password = take_cstr(&mut body, "PasswordMessage")?.to_owned();
    Ok(password)
}

/// SASLInitialResponse ('p'): mechanism name and the client-first message.
pub fn decode_sasl_initial(msg: &RawMessage) -> Result<(String, Bytes), ProtocolError> {
    expect_tag(msg, b'p', "SASLInitialResponse")?;
    let mut body: &[u8] = &msg.body;
    let mechanism = take_cstr(&mut body, "SASLInitialResponse")?.to_owned();
    let len = take_i32(&mut body, "SASLInitialResponse")?;
    let data = match usize::try_from(len) {
        Ok(n) if n == body.len() => Bytes::copy_from_slice(body),
        _ if len == -1 && body.is_empty() => Bytes::new(),
        _ => {
            return Err(ProtocolError::Malformed {
                what: "SASLInitialResponse",
                why: "data length does not match the message",
            })
        }
    };
    Ok((mechanism, data))
}

/// SASLResponse ('p'): the raw SASL data.
pub fn decode_sasl_response(msg: &RawMessage) -> Result<Bytes, ProtocolError> {
    expect_tag(msg, b'p', "SASLResponse")?;
    Ok(msg.body.clone())
}

fn expect_tag(msg: &RawMessage, tag: u8, what: &'static str) -> Result<(), ProtocolError> {
    if msg.tag == tag {
        Ok(())
    } else {
        Err(ProtocolError::Malformed {
            what,
            why: "unexpected message type during authentication",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_sasl_initial() {
        let msg = RawMessage {
            tag: b'p',
            body: Bytes::from_static(b"SCRAM-SHA-256\0\0\0\0\x03abc"),
        };
        let (m, d) = decode_sasl_initial(&msg).unwrap();
        assert_eq!(m, "SCRAM-SHA-256");
        assert_eq!(&d[..], b"abc");
        let bad = RawMessage {
            tag: b'p',
            body: Bytes::from_static(b"SCRAM-SHA-256\0\0\0\0\x09abc"),
        };
        assert!(decode_sasl_initial(&bad).is_err());
        let wrong = RawMessage {
            tag: b'Q',
            body: Bytes::from_static(b"x\0"),
        };
        assert!(decode_password(&wrong).is_err());
    }
}
