//! ParameterStatus values, kept compactly: one buffer of `name\0value\0`
//! pairs (names and values never contain NUL), so a session's dozen-odd
//! reported parameters cost one allocation, and an update allocates only
//! when a value grows past the buffer's capacity.

use bytes::{BufMut, BytesMut};

/// A set of reported parameters (name -> value), in first-seen order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParameterValues {
    pairs: Vec<u8>,
}

impl ParameterValues {
    pub fn new() -> Self {
        Self::default()
    }

    /// The value of `name`, if it was reported. Names compare exactly, as
    /// the server reports them.
    pub fn get(&self, name: &[u8]) -> Option<&[u8]> {
        self.iter().find(|(n, _)| *n == name).map(|(_, v)| v)
    }

    /// Sets `name` to `value`; returns true when that changed anything.
    /// Names or values containing NUL cannot come from a well-formed
    /// message and are refused (false).
    pub fn set(&mut self, name: &[u8], value: &[u8]) -> bool {
        if name.contains(&0) || value.contains(&0) {
            return false;
        }
        match self.locate(name) {
            Some((value_start, value_end)) => {
                if &self.pairs[value_start..value_end] == value {
                    return false;
                }
                self.pairs
                    .splice(value_start..value_end, value.iter().copied());
                true
            }
            None => {
                self.pairs.extend_from_slice(name);
                self.pairs.push(0);
                self.pairs.extend_from_slice(value);
                self.pairs.push(0);
                true
            }
        }
    }

    /// Where the value of `name` sits in the buffer.
    fn locate(&self, name: &[u8]) -> Option<(usize, usize)> {
        let mut at = 0;
        while at < self.pairs.len() {
            let name_end = at + self.pairs[at..].iter().position(|b| *b == 0)?;
            let value_start = name_end + 1;
            let value_end = value_start + self.pairs[value_start..].iter().position(|b| *b == 0)?;
            if &self.pairs[at..name_end] == name {
                return Some((value_start, value_end));
            }
            at = value_end + 1;
        }
        None
    }

    /// Every (name, value), in first-seen order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        let mut parts = self.pairs.split(|b| *b == 0);
        std::iter::from_fn(move || {
            let name = parts.next()?;
            let value = parts.next()?;
            Some((name, value))
        })
    }

    pub fn len(&self) -> usize {
        self.iter().count()
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    /// Bytes held (names, values and their terminators).
    pub fn byte_len(&self) -> usize {
        self.pairs.len()
    }

    /// Applies the body of a ParameterStatus message (`name\0value\0`);
    /// returns true when it changed a value. A malformed body changes
    /// nothing.
    pub fn apply_message_body(&mut self, body: &[u8]) -> bool {
        let mut parts = body.splitn(3, |b| *b == 0);
        match (parts.next(), parts.next(), parts.next()) {
            (Some(name), Some(value), Some(rest)) if rest.is_empty() && !name.is_empty() => {
                self.set(name, value)
            }
            _ => false,
        }
    }

    /// Appends a ParameterStatus message to `out` for every parameter of
    /// `self` whose value differs from `seen` (or that `seen` lacks), and
    /// returns how many. This is what a client must be told when its
    /// session moves to a backend that reports `self`.
    pub fn encode_differences(&self, seen: &ParameterValues, out: &mut BytesMut) -> usize {
        let mut count = 0;
        for (name, value) in self.iter() {
            if seen.get(name) != Some(value) {
                encode_parameter_status(out, name, value);
                count += 1;
            }
        }
        count
    }
}

/// Appends one ParameterStatus ('S') message.
pub fn encode_parameter_status(out: &mut BytesMut, name: &[u8], value: &[u8]) {
    out.put_u8(b'S');
    // Names and values are bounded by the messages they came from.
    out.put_i32((4 + name.len() + 1 + value.len() + 1) as i32);
    out.put_slice(name);
    out.put_u8(0);
    out.put_slice(value);
    out.put_u8(0);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{decode, BackendMessage};
    use crate::frame::split_message;

    #[test]
    fn set_get_and_update_in_place() {
        let mut p = ParameterValues::new();
        assert!(p.set(b"TimeZone", b"UTC"));
        assert!(p.set(b"client_encoding", b"UTF8"));
        assert!(!p.set(b"TimeZone", b"UTC"));
        assert!(p.set(b"TimeZone", b"Europe/Amsterdam"));
        assert!(p.set(b"TimeZone", b""));
        assert_eq!(p.get(b"TimeZone"), Some(&b""[..]));
        assert_eq!(p.get(b"client_encoding"), Some(&b"UTF8"[..]));
        assert_eq!(p.get(b"timezone"), None);
        assert_eq!(p.len(), 2);
        assert!(!p.set(b"bad\0name", b"x"));
        assert!(p.apply_message_body(b"DateStyle\0ISO, MDY\0"));
        assert!(!p.apply_message_body(b"DateStyle\0ISO, MDY"));
        assert!(!p.apply_message_body(b"\0x\0"));
        assert_eq!(
            p.iter().map(|(n, _)| n.to_vec()).collect::<Vec<_>>(),
            vec![
                b"TimeZone".to_vec(),
                b"client_encoding".to_vec(),
                b"DateStyle".to_vec()
            ]
        );
    }

    #[test]
    fn differences_become_parameter_status_messages() {
        let mut seen = ParameterValues::new();
        seen.set(b"TimeZone", b"UTC");
        seen.set(b"server_version", b"15.4");
        let mut now = ParameterValues::new();
        now.set(b"TimeZone", b"UTC");
        now.set(b"server_version", b"15.8");
        now.set(b"in_hot_standby", b"off");
        let mut out = BytesMut::new();
        assert_eq!(now.encode_differences(&seen, &mut out), 2);
        let mut got = Vec::new();
        while let Some(raw) = split_message(&mut out, 1024).unwrap() {
            match decode(&raw).unwrap() {
                BackendMessage::ParameterStatus { name, value } => got.push((name, value)),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            got,
            vec![
                ("server_version".to_owned(), "15.8".to_owned()),
                ("in_hot_standby".to_owned(), "off".to_owned())
            ]
        );
    }
}
