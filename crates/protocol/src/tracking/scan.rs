//! The streaming keyword scan of SQL text (simple Query and Parse).
//!
//! It looks at identifier tokens only (ASCII letters, digits, `_`, `$` and
//! any byte >= 0x80), case-insensitively, and does not know about string
//! literals or comments: a keyword inside a literal counts too. That is on
//! purpose: a false positive costs one snapshot, a false negative could lose
//! session state. It finds
//! - functions that change session state without a telling command tag:
//!   `set_config`, `pg_advisory*`, `pg_try_advisory*`;
//! - temporary tables made by statements whose tag is `SELECT n`:
//!   `INTO TEMP|TEMPORARY`, `CREATE [GLOBAL|LOCAL] TEMP|TEMPORARY ... AS`,
//!   and anything naming the `pg_temp` schema;
//! - names of custom (placeholder) settings, which PostgreSQL 15 hides from
//!   `pg_settings`: a dotted name after `SET [SESSION|LOCAL]` or `RESET`, or
//!   as the literal first argument of `set_config`. A `set_config` whose
//!   first argument is not a literal makes the setting names unknowable.

/// Longest token kept; longer ones are no keyword and no setting name.
const TOKEN_MAX: usize = 64;
/// Longest custom setting name captured (longer ones count as unknown).
pub const SETTING_NAME_MAX: usize = 63;

const OTHER: u8 = 0;
const IDENT: u8 = 1;
const SPACE: u8 = 2;

const fn byte_classes() -> [u8; 256] {
    let mut table = [OTHER; 256];
    let mut b = 0usize;
    while b < 256 {
        let c = b as u8;
        table[b] = if c.is_ascii_alphanumeric() || c == b'_' || c == b'$' || c >= 0x80 {
            IDENT
        } else if c == b' ' || c == b'\t' || c == b'\n' || c == b'\r' || c == 0x0c {
            SPACE
        } else {
            OTHER
        };
        b += 1;
    }
    table
}

static CLASS: [u8; 256] = byte_classes();

/// First bytes (lower-cased) of the tokens the scanner acts on: `set`,
/// `session`, `set_config`, `reset`, `local`, `into`, `create`, `global`,
/// `temp`, `temporary`, `e`, `pg_temp`, `pg_advisory*`, `pg_try_advisory*`.
const fn may_matter() -> [bool; 256] {
    let mut table = [false; 256];
    let firsts = b"srlicgtep";
    let mut i = 0;
    while i < firsts.len() {
        table[firsts[i] as usize] = true;
        i += 1;
    }
    table
}

static MAY_MATTER: [bool; 256] = may_matter();

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Word {
    Set,
    Session,
    Local,
    SetConfig,
    Into,
    Create,
    Global,
    Temp,
    E,
    Other,
}

fn classify(token: &[u8]) -> Word {
    match token {
        b"set" | b"reset" => Word::Set,
        b"session" => Word::Session,
        b"local" => Word::Local,
        b"set_config" => Word::SetConfig,
        b"into" => Word::Into,
        b"create" => Word::Create,
        b"global" => Word::Global,
        b"temp" | b"temporary" => Word::Temp,
        b"e" => Word::E,
        _ => Word::Other,
    }
}

/// Tokens that always mean "state may have changed".
fn always_state_changing(token: &[u8]) -> bool {
    token == b"set_config"
        || token == b"pg_temp"
        || token.starts_with(b"pg_advisory")
        || token.starts_with(b"pg_try_advisory")
}

/// Where the setting-name recogniser stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Nothing,
    /// After `SET`/`RESET` (and `SESSION`/`LOCAL`): a name comes.
    AfterSet,
    /// After `set_config`: `(` comes.
    AfterSetConfig,
    /// After `set_config(`: a literal comes (`'` or `E'`).
    SetConfigArg,
    /// After `set_config(E`: `'` comes.
    SetConfigQuote,
    /// Inside the literal, before the name.
    LiteralName,
    /// A name part was read; `.` or the end of the name comes.
    NameDot {
        literal: bool,
    },
    /// After a `.`: the next name part comes.
    NamePart {
        literal: bool,
    },
    /// A dotted name literal closed: `,` must follow for the name to be
    /// the whole first argument.
    LiteralEnd,
}

/// Streaming scanner over one message's SQL text. Reset it per message.
#[derive(Debug, Clone)]
pub(crate) struct KeywordScanner {
    token: [u8; TOKEN_MAX],
    token_len: usize,
    prev: Word,
    expect: Expect,
    name: [u8; SETTING_NAME_MAX],
    name_len: usize,
    name_parts: u8,
    name_too_long: bool,
    /// A state-changing keyword appeared in this text.
    pub(crate) hit: bool,
    /// A `set_config` whose setting name cannot be read from the text.
    pub(crate) unknown_setting: bool,
    /// Custom setting names found, each followed by a NUL.
    pub(crate) settings: Vec<u8>,
}

impl Default for KeywordScanner {
    fn default() -> Self {
        Self {
            token: [0; TOKEN_MAX],
            token_len: 0,
            prev: Word::Other,
            expect: Expect::Nothing,
            name: [0; SETTING_NAME_MAX],
            name_len: 0,
            name_parts: 0,
            name_too_long: false,
            hit: false,
            unknown_setting: false,
            settings: Vec::new(),
        }
    }
}

impl KeywordScanner {
    /// Starts a new text (keeps the capacity of the name buffer).
    pub(crate) fn reset(&mut self) {
        self.token_len = 0;
        self.prev = Word::Other;
        self.expect = Expect::Nothing;
        self.name_len = 0;
        self.name_parts = 0;
        self.name_too_long = false;
        self.hit = false;
        self.unknown_setting = false;
        self.settings.clear();
    }

    /// Scans the next piece of text.
    #[inline]
    pub(crate) fn feed(&mut self, text: &[u8]) {
        let mut i = 0;
        while i < text.len() {
            let b = text[i];
            match CLASS[usize::from(b)] {
                IDENT => {
                    let start = i;
                    i += 1;
                    while i < text.len() && CLASS[usize::from(text[i])] == IDENT {
                        i += 1;
                    }
                    self.token_piece(&text[start..i]);
                }
                class => {
                    if self.token_len > 0 {
                        self.end_token();
                    }
                    // Outside a pattern punctuation changes nothing.
                    if class == OTHER && self.expect != Expect::Nothing {
                        self.punct(b);
                    }
                    i += 1;
                }
            }
        }
    }

    /// Part of an identifier token (a token may span pieces).
    fn token_piece(&mut self, piece: &[u8]) {
        let at = self.token_len.min(TOKEN_MAX);
        let n = piece.len().min(TOKEN_MAX - at);
        for (dst, src) in self.token[at..at + n].iter_mut().zip(piece) {
            *dst = src.to_ascii_lowercase();
        }
        self.token_len += piece.len();
    }

    /// The text ended.
    pub(crate) fn finish(&mut self) {
        if self.token_len > 0 {
            self.end_token();
        }
        self.punct(0);
    }

    fn end_token(&mut self) {
        let len = self.token_len;
        self.token_len = 0;
        if self.expect == Expect::Nothing && !MAY_MATTER[usize::from(self.token[0])] {
            // Most tokens: no keyword starts with this letter.
            self.prev = Word::Other;
            return;
        }
        let too_long = len > TOKEN_MAX;
        let token = &self.token[..len.min(TOKEN_MAX)];
        let word = if too_long {
            Word::Other
        } else {
            classify(token)
        };
        if always_state_changing(token)
            || (word == Word::Temp
                && matches!(
                    self.prev,
                    Word::Into | Word::Create | Word::Global | Word::Local
                ))
        {
            self.hit = true;
        }
        self.ident(word, len);
        self.prev = word;
    }

    /// The token just ended (of `len` bytes, in `self.token`) as the
    /// setting-name recogniser sees it.
    fn ident(&mut self, word: Word, len: usize) {
        match self.expect {
            Expect::Nothing => self.start(word),
            Expect::AfterSet => {
                if !matches!(word, Word::Session | Word::Local) {
                    self.begin_name(len, false);
                }
            }
            Expect::SetConfigArg if word == Word::E => self.expect = Expect::SetConfigQuote,
            Expect::SetConfigArg | Expect::SetConfigQuote => {
                self.unknown_setting = true;
                self.start(word);
            }
            Expect::AfterSetConfig => self.start(word),
            Expect::LiteralName => self.begin_name(len, true),
            Expect::NameDot { literal: false } => {
                self.push_name();
                self.start(word);
            }
            Expect::NameDot { literal: true } | Expect::LiteralEnd => {
                self.unknown_setting = true;
                self.start(word);
            }
            Expect::NamePart { literal } => {
                self.append_name_part(len);
                self.expect = Expect::NameDot { literal };
            }
        }
    }

    fn start(&mut self, word: Word) {
        self.expect = match word {
            Word::Set => Expect::AfterSet,
            Word::SetConfig => Expect::AfterSetConfig,
            _ => Expect::Nothing,
        };
    }

    fn punct(&mut self, b: u8) {
        if b == b'"' {
            // Quoted identifiers: the quotes do not matter for a GUC name.
            return;
        }
        self.expect = match self.expect {
            Expect::AfterSetConfig if b == b'(' => Expect::SetConfigArg,
            Expect::SetConfigArg | Expect::SetConfigQuote if b == b'\'' => Expect::LiteralName,
            Expect::SetConfigArg | Expect::SetConfigQuote | Expect::LiteralName => {
                self.unknown_setting = true;
                Expect::Nothing
            }
            Expect::NameDot { literal } if b == b'.' => Expect::NamePart { literal },
            Expect::NameDot { literal: true } if b == b'\'' => {
                if self.name_parts >= 2 {
                    Expect::LiteralEnd
                } else {
                    // A built-in setting: pg_settings has it.
                    Expect::Nothing
                }
            }
            Expect::LiteralEnd if b == b',' => {
                self.push_name();
                Expect::Nothing
            }
            Expect::NameDot { literal: true }
            | Expect::NamePart { literal: true }
            | Expect::LiteralEnd => {
                self.unknown_setting = true;
                Expect::Nothing
            }
            Expect::NameDot { literal: false } => {
                self.push_name();
                Expect::Nothing
            }
            _ => Expect::Nothing,
        };
    }

    fn begin_name(&mut self, len: usize, literal: bool) {
        self.name_len = 0;
        self.name_parts = 0;
        self.name_too_long = false;
        self.append_name_part(len);
        self.expect = Expect::NameDot { literal };
    }

    /// Appends the token just ended (`len` bytes) as the next name part.
    fn append_name_part(&mut self, len: usize) {
        let dot = usize::from(self.name_parts > 0);
        if len > TOKEN_MAX || self.name_len + dot + len > SETTING_NAME_MAX {
            self.name_too_long = true;
        } else {
            if dot == 1 {
                self.name[self.name_len] = b'.';
            }
            let at = self.name_len + dot;
            self.name[at..at + len].copy_from_slice(&self.token[..len]);
            self.name_len = at + len;
        }
        self.name_parts = self.name_parts.saturating_add(1);
    }

    /// A dotted name outside a literal ended, or a literal one was the
    /// whole argument: keep it (once).
    fn push_name(&mut self) {
        if self.name_parts < 2 {
            // Not a custom setting: built-in ones are in pg_settings.
            return;
        }
        if self.name_too_long {
            self.unknown_setting = true;
            return;
        }
        let name = &self.name[..self.name_len];
        let known = self
            .settings
            .split(|b| *b == 0)
            .any(|existing| existing == name);
        if !known {
            self.settings.extend_from_slice(name);
            self.settings.push(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(text: &str) -> KeywordScanner {
        let mut s = KeywordScanner::default();
        s.feed(text.as_bytes());
        s.finish();
        s
    }

    fn settings(s: &KeywordScanner) -> Vec<String> {
        s.settings
            .split(|b| *b == 0)
            .filter(|n| !n.is_empty())
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .collect()
    }

    #[test]
    fn plain_dml_is_not_state_changing() {
        for q in [
            "SELECT abalance FROM pgbench_accounts WHERE aid = $1",
            "UPDATE pgbench_accounts SET abalance = abalance + $1 WHERE aid = $2;",
            "INSERT INTO t (temp) VALUES (1)",
            "SELECT temp, local FROM readings",
            "SELECT * INTO archive FROM t",
            "SET work_mem = '4MB'",
            "select set_configuration from t",
        ] {
            let s = scan(q);
            assert!(!s.hit, "{q}");
            assert!(!s.unknown_setting, "{q}");
            assert!(settings(&s).is_empty(), "{q}");
        }
    }

    #[test]
    fn finds_state_changing_keywords_anywhere() {
        for q in [
            "SELECT pg_catalog.set_config('search_path', 'a', false)",
            "SELECT SET_CONFIG('x', 'y', true)",
            "select pg_advisory_lock(1)",
            "SELECT pg_try_advisory_xact_lock(1)",
            "SELECT 1 INTO TEMP t",
            "select 1 into temporary table t",
            "CREATE TEMP TABLE t AS SELECT 1",
            "create global temporary table t as select 1",
            "CREATE LOCAL TEMP TABLE t AS SELECT 1",
            "CREATE TABLE pg_temp.t AS SELECT 1",
            "SELECT 'pg_advisory_unlock_all is mentioned in a literal'",
        ] {
            assert!(scan(q).hit, "{q}");
        }
    }

    #[test]
    fn collects_custom_setting_names() {
        let s = scan("SET app.tenant = 't1'; SET SESSION My.Var TO 2; reset \"other\".\"X\"");
        assert_eq!(settings(&s), ["app.tenant", "my.var", "other.x"]);
        assert!(!s.unknown_setting);
        let s =
            scan("SELECT set_config('app.user_id', $1, false), set_config(E'a.b.c', 'v', false)");
        assert_eq!(settings(&s), ["app.user_id", "a.b.c"]);
        assert!(!s.unknown_setting);
        let s = scan(
            "SET LOCAL app.x = 1; SET search_path = a; SELECT set_config('work_mem', '1MB', false)",
        );
        assert_eq!(settings(&s), ["app.x"]);
        let s = scan("SET app.x = 1; SET app.x = 2");
        assert_eq!(settings(&s), ["app.x"]);
    }

    #[test]
    fn unreadable_set_config_names_are_unknown() {
        for q in [
            "SELECT set_config($1, $2, false)",
            "SELECT set_config(name, value, false) FROM settings",
            "SELECT set_config('app.' || $1, 'x', false)",
            "SELECT set_config(E$$app.x$$, 'x', false)",
            "SELECT set_config('app.x' || $1, 'x', false)",
        ] {
            assert!(scan(q).unknown_setting, "{q}");
        }
        let long = format!("SET app.{} = 1", "x".repeat(70));
        assert!(scan(&long).unknown_setting);
        // Without a call there is nothing to read.
        assert!(!scan("SELECT 'set_config is a function'").unknown_setting);
    }

    #[test]
    fn any_split_gives_the_same_result() {
        let q = "SELECT set_config('app.user_id', '1', false); CREATE TEMP TABLE t AS SELECT 1; SET a.b = 1";
        let whole = scan(q);
        for split in 0..q.len() {
            let mut s = KeywordScanner::default();
            s.feed(&q.as_bytes()[..split]);
            s.feed(&q.as_bytes()[split..]);
            s.finish();
            assert_eq!(s.hit, whole.hit);
            assert_eq!(s.settings, whole.settings, "split {split}");
        }
    }
}
