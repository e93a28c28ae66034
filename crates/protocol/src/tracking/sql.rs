//! The little SQL the exchanges need: escaped literals, and finding one
//! `PREPARE` statement in the query string `pg_prepared_statements` shows
//! (the whole string the client sent, which may hold several statements).

use std::ops::Range;

/// Appends `value` as an `E'...'` literal: backslashes and quotes doubled,
/// so the result means the same whatever `standard_conforming_strings`
/// says. (Client encodings whose multibyte characters can contain the
/// bytes `\` or `'`, such as SJIS and BIG5, are not supported here.)
pub fn push_literal(out: &mut Vec<u8>, value: &[u8]) {
    out.extend_from_slice(b"E'");
    for &b in value {
        if b == b'\\' || b == b'\'' {
            out.push(b);
        }
        out.push(b);
    }
    out.push(b'\'');
}

fn is_ident_start(b: u8) -> bool {
    b.is_ascii_alphabetic() || b == b'_' || b >= 0x80
}

fn is_ident_char(b: u8) -> bool {
    is_ident_start(b) || b.is_ascii_digit() || b == b'$'
}

/// Splits `text` into its top-level statements (ranges without the `;`),
/// skipping strings, quoted identifiers, dollar quotes and comments.
/// `backslash_quotes` says whether `\` escapes in ordinary `'...'`
/// strings (`standard_conforming_strings = off`). `None` when the text
/// does not lex to the end (an unterminated string or comment, unbalanced
/// parentheses) or holds a `BEGIN ATOMIC` body, whose semicolons do not
/// end statements.
fn split(text: &[u8], backslash_quotes: bool) -> Option<Vec<Range<usize>>> {
    let mut statements = Vec::new();
    let mut start = 0;
    let mut depth: usize = 0;
    let mut i = 0;
    let mut prev_word: Option<Range<usize>> = None;
    while i < text.len() {
        let b = text[i];
        let follows_ident = i > 0 && is_ident_char(text[i - 1]);
        match b {
            b'-' | b'/' => match comment_end(text, i) {
                Some(end) => i = end?,
                None => i += 1,
            },
            b'\'' => {
                let escapes = backslash_quotes
                    || (i > 0
                        && matches!(text[i - 1], b'e' | b'E')
                        && !(i > 1 && is_ident_char(text[i - 2])));
                i = skip_quoted(text, i, b'\'', escapes)?;
            }
            b'"' => i = skip_quoted(text, i, b'"', false)?,
            b'$' if !follows_ident => {
                let tag_end = text[i + 1..]
                    .iter()
                    .position(|c| !is_ident_char(*c) || *c == b'$')
                    .map_or(text.len(), |p| i + 1 + p);
                let tag_ok = text.get(tag_end) == Some(&b'$')
                    && (tag_end == i + 1 || is_ident_start(text[i + 1]));
                if tag_ok {
                    let tag = &text[i..=tag_end];
                    let body = tag_end + 1;
                    let close = text[body..].windows(tag.len()).position(|w| w == tag)?;
                    i = body + close + tag.len();
                } else {
                    i += 1;
                }
            }
            b'(' => {
                depth += 1;
                i += 1;
            }
            b')' => {
                depth = depth.checked_sub(1)?;
                i += 1;
            }
            b';' if depth == 0 => {
                statements.push(start..i);
                start = i + 1;
                prev_word = None;
                i += 1;
            }
            _ if is_ident_start(b) && !follows_ident => {
                let end = i + text[i..]
                    .iter()
                    .position(|c| !is_ident_char(*c))
                    .unwrap_or(text.len() - i);
                let word = i..end;
                if text[word.clone()].eq_ignore_ascii_case(b"atomic")
                    && prev_word
                        .as_ref()
                        .is_some_and(|p| text[p.clone()].eq_ignore_ascii_case(b"begin"))
                {
                    return None;
                }
                prev_word = Some(word);
                i = end;
            }
            _ => i += 1,
        }
    }
    if depth != 0 {
        return None;
    }
    statements.push(start..text.len());
    Some(statements)
}

/// Index just past the closing quote of the quoted run starting at `open`.
fn skip_quoted(text: &[u8], open: usize, quote: u8, backslash: bool) -> Option<usize> {
    let mut i = open + 1;
    loop {
        let b = *text.get(i)?;
        if backslash && b == b'\\' {
            i += 2;
        } else if b == quote {
            if text.get(i + 1) == Some(&quote) {
                i += 2;
            } else {
                return Some(i + 1);
            }
        } else {
            i += 1;
        }
    }
}

/// When a comment starts at `i`: `Some(Some(end))` with the index just past
/// it (a line comment runs to its newline, a block comment nests), or
/// `Some(None)` when the block comment never ends. `None`: no comment here.
fn comment_end(text: &[u8], mut i: usize) -> Option<Option<usize>> {
    match text.get(i..i + 2)? {
        b"--" => Some(Some(
            i + text[i..]
                .iter()
                .position(|c| *c == b'\n')
                .unwrap_or(text.len() - i),
        )),
        b"/*" => {
            let mut nest = 0usize;
            loop {
                match text.get(i..i + 2) {
                    Some(b"/*") => {
                        nest += 1;
                        i += 2;
                    }
                    Some(b"*/") => {
                        nest -= 1;
                        i += 2;
                        if nest == 0 {
                            return Some(Some(i));
                        }
                    }
                    _ if i >= text.len() => return Some(None),
                    _ => i += 1,
                }
            }
        }
        _ => None,
    }
}

/// Skips whitespace and comments from `i`.
fn skip_blank(text: &[u8], mut i: usize) -> usize {
    loop {
        match text.get(i) {
            Some(b) if b.is_ascii_whitespace() => i += 1,
            Some(_) => match comment_end(text, i) {
                Some(Some(end)) => i = end,
                Some(None) => return text.len(),
                None => return i,
            },
            None => return i,
        }
    }
}

/// The identifier at `i` as PostgreSQL names it (unquoted: ASCII
/// lower-cased; quoted: as written, `""` undoubled), and where it ends.
fn identifier(text: &[u8], i: usize) -> Option<(Vec<u8>, usize)> {
    match *text.get(i)? {
        b'"' => {
            let end = skip_quoted(text, i, b'"', false)?;
            let mut name = Vec::with_capacity(end - i);
            let mut j = i + 1;
            while j < end - 1 {
                name.push(text[j]);
                j += if text[j] == b'"' { 2 } else { 1 };
            }
            Some((name, end))
        }
        b if is_ident_start(b) => {
            let end = i + text[i..]
                .iter()
                .position(|c| !is_ident_char(*c))
                .unwrap_or(text.len() - i);
            Some((text[i..end].to_ascii_lowercase(), end))
        }
        _ => None,
    }
}

/// The one statement of `text` that is `PREPARE <name> ...` for `name`,
/// trimmed, without its `;`. `None` when there is no such statement, more
/// than one, or the text cannot be split the same way under both meanings
/// of backslash in strings: the session then cannot be restored.
pub fn find_prepare<'a>(text: &'a [u8], name: &[u8]) -> Option<&'a [u8]> {
    let plain = split(text, false)?;
    if split(text, true)? != plain {
        return None;
    }
    let mut found = None;
    for range in plain {
        let start = skip_blank(text, range.start);
        let statement = &text[start..range.end];
        let Some((keyword, after)) = identifier(statement, 0) else {
            continue;
        };
        if keyword != b"prepare" {
            continue;
        }
        let name_at = skip_blank(statement, after);
        let Some((prepared, _)) = identifier(statement, name_at) else {
            continue;
        };
        // The server keys statements by their first 63 bytes.
        let key = |n: &[u8]| n[..n.len().min(63)].to_vec();
        if key(&prepared) == key(name) {
            if found.is_some() {
                return None;
            }
            let mut end = statement.len();
            while end > 0 && statement[end - 1].is_ascii_whitespace() {
                end -= 1;
            }
            found = Some(&statement[..end]);
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn literal(value: &str) -> String {
        let mut out = Vec::new();
        push_literal(&mut out, value.as_bytes());
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn literals_double_backslashes_and_quotes() {
        assert_eq!(literal("plain"), "E'plain'");
        assert_eq!(literal(r"it's \ here"), r"E'it''s \\ here'");
        assert_eq!(literal(""), "E''");
        assert_eq!(literal(r#""$user", public"#), r#"E'"$user", public'"#);
    }

    fn found(text: &str, name: &str) -> Option<String> {
        find_prepare(text.as_bytes(), name.as_bytes())
            .map(|s| String::from_utf8_lossy(s).into_owned())
    }

    #[test]
    fn finds_the_prepare_among_statements() {
        // What pg_prepared_statements shows for these (PostgreSQL 15).
        assert_eq!(
            found("PREPARE sq1(int) AS SELECT $1 + 1", "sq1").as_deref(),
            Some("PREPARE sq1(int) AS SELECT $1 + 1")
        );
        let both = "PREPARE sq2 AS SELECT 2; PREPARE sq3 AS SELECT 3";
        assert_eq!(
            found(both, "sq2").as_deref(),
            Some("PREPARE sq2 AS SELECT 2")
        );
        assert_eq!(
            found(both, "sq3").as_deref(),
            Some("PREPARE sq3 AS SELECT 3")
        );
        assert_eq!(
            found("prepare \"Mixed Case\" as select 'a;b'", "Mixed Case").as_deref(),
            Some("prepare \"Mixed Case\" as select 'a;b'")
        );
        assert_eq!(
            found(
                "SET x = 1; /* c; */ -- d;\n  PREPARE p AS SELECT $$;$$, E'\\';', \"q;\" ;\n",
                "p"
            )
            .as_deref(),
            Some("PREPARE p AS SELECT $$;$$, E'\\';', \"q;\"")
        );
        assert_eq!(
            found("PREPARE Upper AS SELECT 1", "upper").as_deref(),
            Some("PREPARE Upper AS SELECT 1")
        );
        assert_eq!(
            found("PREPARE p AS SELECT $tag$ ; $tag$", "p").as_deref(),
            Some("PREPARE p AS SELECT $tag$ ; $tag$")
        );
        assert_eq!(
            found("PREPARE p(int) AS SELECT $1", "p").as_deref(),
            Some("PREPARE p(int) AS SELECT $1")
        );
    }

    #[test]
    fn refuses_what_it_cannot_split_for_sure() {
        // The same name twice, no PREPARE, another name.
        assert_eq!(
            found("PREPARE p AS SELECT 1; PREPARE p AS SELECT 2", "p"),
            None
        );
        assert_eq!(found("SELECT 1", "p"), None);
        assert_eq!(found("PREPARE q AS SELECT 1", "p"), None);
        // Unterminated constructs.
        assert_eq!(found("PREPARE p AS SELECT 'x", "p"), None);
        assert_eq!(found("PREPARE p AS SELECT 1 /* x", "p"), None);
        assert_eq!(found("PREPARE p AS SELECT $a$ x", "p"), None);
        assert_eq!(found("PREPARE p AS SELECT (1", "p"), None);
        // A backslash before a quote splits differently with
        // standard_conforming_strings off.
        assert_eq!(found("PREPARE p AS SELECT 'a\\'; SELECT 1", "p"), None);
        // BEGIN ATOMIC bodies hold semicolons that end nothing.
        assert_eq!(
            found("CREATE FUNCTION f() RETURNS int LANGUAGE sql BEGIN ATOMIC SELECT 1; END; PREPARE p AS SELECT 1", "p"),
            None
        );
    }
}
