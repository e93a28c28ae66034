//! The parts of an ErrorResponse the session acts on: severity and
//! SQLSTATE, read as the message streams past into fixed buffers.

/// Severity of an ErrorResponse (the non-localized `V` field when the
/// server sends one, as PostgreSQL 9.6 and later do, else `S`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorSeverity {
    Error,
    Fatal,
    Panic,
    /// Missing, localized without `V`, or not one of the above.
    Other,
}

/// Severity and SQLSTATE of an ErrorResponse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServerError {
    pub severity: ErrorSeverity,
    sqlstate: [u8; 5],
}

impl ServerError {
    /// The 5-character SQLSTATE, or `""` when the message had none (or an
    /// invalid one).
    pub fn sqlstate(&self) -> &str {
        if self.sqlstate[0] == 0 {
            ""
        } else {
            // Only ASCII digits and upper-case letters are stored.
            std::str::from_utf8(&self.sqlstate).unwrap_or("")
        }
    }

    /// True when the session ends with this error (FATAL or PANIC).
    pub fn ends_session(&self) -> bool {
        matches!(self.severity, ErrorSeverity::Fatal | ErrorSeverity::Panic)
    }
}

const SHORT: usize = 8;

/// Streaming reader of ErrorResponse fields.
#[derive(Debug, Clone, Default)]
pub(crate) struct ErrorFieldsReader {
    /// Inside a field value: its code; else 0 (a field code comes next).
    field: u8,
    value: [u8; SHORT],
    value_len: usize,
    severity_v: Option<ErrorSeverity>,
    severity_s: Option<ErrorSeverity>,
    sqlstate: [u8; 5],
    done: bool,
}

fn severity(word: &[u8]) -> ErrorSeverity {
    match word {
        b"ERROR" => ErrorSeverity::Error,
        b"FATAL" => ErrorSeverity::Fatal,
        b"PANIC" => ErrorSeverity::Panic,
        _ => ErrorSeverity::Other,
    }
}

impl ErrorFieldsReader {
    pub(crate) fn reset(&mut self) {
        *self = Self::default();
    }

    pub(crate) fn feed(&mut self, mut piece: &[u8]) {
        while let Some((&b, rest)) = piece.split_first() {
            if self.done {
                return;
            }
            if self.field == 0 {
                piece = rest;
                if b == 0 {
                    self.done = true;
                } else {
                    self.field = b;
                    self.value_len = 0;
                }
                continue;
            }
            let wanted = matches!(self.field, b'S' | b'V' | b'C');
            match piece.iter().position(|c| *c == 0) {
                Some(nul) => {
                    if wanted {
                        self.keep(&piece[..nul]);
                        self.field_done();
                    }
                    self.field = 0;
                    piece = &piece[nul + 1..];
                }
                None => {
                    if wanted {
                        self.keep(piece);
                    }
                    return;
                }
            }
        }
    }

    fn keep(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.value_len < SHORT {
                self.value[self.value_len] = b;
            }
            self.value_len += 1;
        }
    }

    fn field_done(&mut self) {
        let value = &self.value[..self.value_len.min(SHORT)];
        let too_long = self.value_len > SHORT;
        match self.field {
            b'V' => {
                self.severity_v = Some(if too_long {
                    ErrorSeverity::Other
                } else {
                    severity(value)
                })
            }
            b'S' => {
                self.severity_s = Some(if too_long {
                    ErrorSeverity::Other
                } else {
                    severity(value)
                })
            }
            b'C' => {
                let valid = self.value_len == 5
                    && value
                        .iter()
                        .all(|c| c.is_ascii_digit() || c.is_ascii_uppercase());
                self.sqlstate = if valid {
                    [value[0], value[1], value[2], value[3], value[4]]
                } else {
                    [0; 5]
                };
            }
            _ => {}
        }
    }

    /// The error as read so far (a malformed message gives what it had).
    pub(crate) fn finish(&self) -> ServerError {
        ServerError {
            severity: self
                .severity_v
                .or(self.severity_s)
                .unwrap_or(ErrorSeverity::Other),
            sqlstate: self.sqlstate,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_split(body: &[u8], split: usize) -> ServerError {
        let mut r = ErrorFieldsReader::default();
        r.feed(&body[..split]);
        r.feed(&body[split..]);
        r.finish()
    }

    #[test]
    fn reads_severity_and_sqlstate_in_any_split() {
        let body = b"SFEHLER\0VFATAL\0C57P01\0Mterminating connection due to administrator command\0Fpostgres.c\0\0";
        for split in 0..=body.len() {
            let e = read_split(body, split);
            assert_eq!(e.severity, ErrorSeverity::Fatal, "split {split}");
            assert_eq!(e.sqlstate(), "57P01");
            assert!(e.ends_session());
        }
    }

    #[test]
    fn falls_back_to_s_and_tolerates_garbage() {
        let e = read_split(b"SERROR\0C40001\0\0", 3);
        assert_eq!(e.severity, ErrorSeverity::Error);
        assert_eq!(e.sqlstate(), "40001");
        assert!(!e.ends_session());
        let e = read_split(b"SOSHIBKA-LONG-WORD\0Cbad\0", 0);
        assert_eq!(e.severity, ErrorSeverity::Other);
        assert_eq!(e.sqlstate(), "");
        let e = read_split(b"C4000", 2);
        assert_eq!(e.sqlstate(), "");
        assert_eq!(read_split(b"", 0).severity, ErrorSeverity::Other);
    }
}
