//! Classification of CommandComplete tags.

/// What a completed command means for the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CommandClass {
    /// Anything else: queries, DML, most utility commands.
    #[default]
    Other,
    /// May have changed state that lives past the transaction (settings,
    /// prepared statements, cursors, listeners, temporary objects, loaded
    /// libraries): a snapshot is due.
    StateChanging,
    /// Transaction control: `BEGIN`, `START TRANSACTION`, `COMMIT`,
    /// `ROLLBACK` (also `ROLLBACK TO`), `SAVEPOINT`, `RELEASE`,
    /// `PREPARE TRANSACTION`, `COMMIT PREPARED`, `ROLLBACK PREPARED`.
    TransactionControl,
}

/// How many bytes of a tag decide its class (the longest word needed is
/// `PREPARE TRANSACTION`).
pub(crate) const TAG_PREFIX: usize = 24;

/// Classifies a CommandComplete tag (or its first 24 bytes, enough for it;
/// a NUL or the end of the slice ends it).
pub fn classify_tag(tag: &[u8]) -> CommandClass {
    // The hot path first: every query's tag.
    if tag.starts_with(b"SELECT ") {
        return CommandClass::Other;
    }
    let tag = match tag.iter().position(|b| *b == 0) {
        Some(nul) => &tag[..nul],
        None => tag,
    };
    let (first, rest) = match tag.iter().position(|b| *b == b' ') {
        Some(space) => (&tag[..space], &tag[space + 1..]),
        None => (tag, &b""[..]),
    };
    match first {
        b"SELECT" | b"INSERT" | b"UPDATE" | b"DELETE" | b"FETCH" | b"MERGE" | b"COPY" => {
            CommandClass::Other
        }
        b"BEGIN" | b"START" | b"COMMIT" | b"ROLLBACK" | b"SAVEPOINT" | b"RELEASE" => {
            CommandClass::TransactionControl
        }
        b"PREPARE" if rest.starts_with(b"TRANSACTION") => CommandClass::TransactionControl,
        b"SET" | b"RESET" | b"PREPARE" | b"DEALLOCATE" | b"DISCARD" | b"LISTEN" | b"UNLISTEN"
        | b"DECLARE" | b"CLOSE" | b"LOAD" | b"CREATE" | b"DROP" | b"ALTER" | b"DO" | b"CALL" => {
            CommandClass::StateChanging
        }
        _ => CommandClass::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classifies_real_tags() {
        // Tags as PostgreSQL 15 sends them (checked with psql).
        for (tag, class) in [
            ("SELECT 1", CommandClass::Other),
            ("INSERT 0 1", CommandClass::Other),
            ("UPDATE 3", CommandClass::Other),
            ("SHOW", CommandClass::Other),
            ("ANALYZE", CommandClass::Other),
            ("SET", CommandClass::StateChanging),
            ("SET CONSTRAINTS", CommandClass::StateChanging),
            ("RESET", CommandClass::StateChanging),
            ("PREPARE", CommandClass::StateChanging),
            ("DEALLOCATE ALL", CommandClass::StateChanging),
            ("DISCARD TEMP", CommandClass::StateChanging),
            ("DECLARE CURSOR", CommandClass::StateChanging),
            ("CLOSE CURSOR ALL", CommandClass::StateChanging),
            ("LISTEN", CommandClass::StateChanging),
            ("UNLISTEN", CommandClass::StateChanging),
            ("LOAD", CommandClass::StateChanging),
            ("CREATE TABLE", CommandClass::StateChanging),
            ("DROP FUNCTION", CommandClass::StateChanging),
            ("ALTER ROLE", CommandClass::StateChanging),
            ("DO", CommandClass::StateChanging),
            ("CALL", CommandClass::StateChanging),
            ("BEGIN", CommandClass::TransactionControl),
            ("START TRANSACTION", CommandClass::TransactionControl),
            ("COMMIT", CommandClass::TransactionControl),
            ("COMMIT PREPARED", CommandClass::TransactionControl),
            ("ROLLBACK", CommandClass::TransactionControl),
            ("SAVEPOINT", CommandClass::TransactionControl),
            ("RELEASE", CommandClass::TransactionControl),
            ("PREPARE TRANSACTION", CommandClass::TransactionControl),
            ("", CommandClass::Other),
        ] {
            assert_eq!(classify_tag(tag.as_bytes()), class, "{tag}");
            let mut with_nul = tag.as_bytes().to_vec();
            with_nul.push(0);
            assert_eq!(classify_tag(&with_nul), class, "{tag}");
        }
    }
}
