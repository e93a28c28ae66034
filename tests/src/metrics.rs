//! Reading the proxy's admin server: a plain HTTP/1.1 GET, and a parser
//! for the Prometheus text exposition format (version 0.0.4) so tests
//! compare numbers, not substrings.
//!
//! The parser follows the format's grammar: `# HELP` / `# TYPE` comments
//! and other `#` lines are skipped; a sample is
//! `name{label="value",...} value [timestamp]`, label values escape `\\`,
//! `\"` and `\n`, and values may be `+Inf`, `-Inf` or `NaN`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// One sample line.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

/// Every sample of one scrape, and the declared families.
#[derive(Debug, Clone, Default)]
pub struct Scrape {
    pub samples: Vec<Sample>,
    /// `# TYPE` lines: family name -> type (`counter`, `histogram`, ...).
    /// A labelled family nobody incremented yet has no sample, only this.
    pub families: BTreeMap<String, String>,
}

impl Scrape {
    /// Parses a whole exposition; an unparsable line is an error naming it.
    pub fn parse(text: &str) -> Result<Scrape, String> {
        let mut samples = Vec::new();
        let mut families = BTreeMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split_whitespace();
                let (Some(name), Some(kind), None) = (parts.next(), parts.next(), parts.next())
                else {
                    return Err(format!("line {}: malformed TYPE line: {line:?}", n + 1));
                };
                families.insert(name.to_owned(), kind.to_owned());
                continue;
            }
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let sample =
                parse_sample(line).map_err(|e| format!("line {}: {e}: {line:?}", n + 1))?;
            samples.push(sample);
        }
        Ok(Scrape { samples, families })
    }

    /// The declared family a sample or PromQL series name belongs to
    /// (`x_bucket`, `x_sum` and `x_count` belong to histogram or summary `x`).
    pub fn family_of<'a>(&self, name: &'a str) -> Option<&'a str> {
        if self.families.contains_key(name) {
            return Some(name);
        }
        ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
            let base = name.strip_suffix(suffix)?;
            matches!(
                self.families.get(base).map(String::as_str),
                Some("histogram" | "summary")
            )
            .then_some(base)
        })
    }

    /// The value of the sample named `name` whose labels include every
    /// pair of `labels`, when exactly one matches.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let mut found = self.matching(name, labels);
        let first = found.next()?;
        match found.next() {
            None => Some(first.value),
            Some(_) => None,
        }
    }

    /// The sum over every sample named `name` whose labels include `labels`
    /// (0 when none does: a counter not incremented yet is absent).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    /// Whether a family has any sample (or `# TYPE` line is not needed).
    pub fn has(&self, name: &str) -> bool {
        self.samples.iter().any(|s| s.name == name)
    }

    fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&'a str, &'a str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .ok_or("no value")?;
    let name = &line[..name_end];
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
    {
        return Err(format!("bad metric name {name:?}"));
    }
    let mut rest = &line[name_end..];
    let mut labels = BTreeMap::new();
    if let Some(after) = rest.strip_prefix('{') {
        rest = parse_labels(after, &mut labels)?;
    }
    let mut fields = rest.split_whitespace();
    let value = fields.next().ok_or("no value")?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        "NaN" => f64::NAN,
        v => v.parse().map_err(|_| format!("bad value {v:?}"))?,
    };
    if let Some(ts) = fields.next() {
        ts.parse::<i64>()
            .map_err(|_| format!("bad timestamp {ts:?}"))?;
    }
    if fields.next().is_some() {
        return Err("trailing fields".into());
    }
    Ok(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// Parses `k="v",...}` and returns what follows the closing brace.
fn parse_labels<'a>(mut s: &'a str, out: &mut BTreeMap<String, String>) -> Result<&'a str, String> {
    loop {
        s = s.trim_start();
        if let Some(rest) = s.strip_prefix('}') {
            return Ok(rest);
        }
        let eq = s.find('=').ok_or("label without '='")?;
        let key = s[..eq].trim();
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("bad label name {key:?}"));
        }
        s = s[eq + 1..]
            .trim_start()
            .strip_prefix('"')
            .ok_or("label value not quoted")?;
        let mut value = String::new();
        let mut chars = s.char_indices();
        let end = loop {
            match chars.next() {
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c @ ('\\' | '"'))) => value.push(c),
                    other => return Err(format!("bad escape {other:?}")),
                },
                Some((_, c)) => value.push(c),
                None => return Err("unterminated label value".into()),
            }
        };
        out.insert(key.to_owned(), value);
        s = s[end + 1..].trim_start();
        if let Some(rest) = s.strip_prefix(',') {
            s = rest;
        } else if !s.starts_with('}') {
            return Err("expected ',' or '}' after a label".into());
        }
    }
}

/// One HTTP/1.1 request with `Connection: close`; returns status and body.
pub fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
    http_with(addr, method, path, &[])
}

/// [`http`] with extra request headers (`Host` too replaces the default).
/// A connection closed without an answer is status 0.
pub fn http_with(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect admin {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .expect("set read timeout");
    let mut head = format!("{method} {path} HTTP/1.1\r\n");
    if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
        head.push_str(&format!("Host: {addr}\r\n"));
    }
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("Content-Length: 0\r\nConnection: close\r\n\r\n");
    if s.write_all(head.as_bytes()).is_err() {
        return (0, String::new());
    }
    let mut out = String::new();
    if s.read_to_string(&mut out).is_err() {
        return (0, String::new());
    }
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// `GET /metrics` on the admin server, parsed.
pub fn scrape(admin: SocketAddr) -> Scrape {
    let (code, body) = http(admin, "GET", "/metrics");
    assert_eq!(code, 200, "GET /metrics: {body}");
    Scrape::parse(&body).unwrap_or_else(|e| panic!("/metrics is not valid text format: {e}"))
}

/// `GET /status` on the admin server, as JSON.
pub fn status(admin: SocketAddr) -> serde_json::Value {
    let (code, body) = http(admin, "GET", "/status");
    assert_eq!(code, 200, "GET /status: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("/status is not JSON ({e}): {body}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP dsql_proxy_x A counter
# TYPE dsql_proxy_x counter
dsql_proxy_x{endpoint="a",region="r-1",reason="busy"} 3
dsql_proxy_x{endpoint="b",region="r-1",reason="busy"} 4
dsql_proxy_y 1.5e3 1700000000000
dsql_proxy_h_bucket{le="+Inf"} 7
weird{v="q\"uo\\te\nnl",w="a,b}"} -Inf
nan NaN
"#;

    #[test]
    fn type_lines_declare_families_even_without_samples() {
        let text = "# HELP a_total x\n# TYPE a_total counter\n\
                    # TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_sum 0.5\nh_count 1\n";
        let s = Scrape::parse(text).unwrap();
        assert_eq!(
            s.families.get("a_total").map(String::as_str),
            Some("counter")
        );
        assert_eq!(s.family_of("a_total"), Some("a_total"));
        assert_eq!(s.family_of("h_bucket"), Some("h"));
        assert_eq!(
            s.family_of("a_total_count"),
            None,
            "counters have no _count"
        );
        assert!(Scrape::parse("# TYPE broken\n").is_err());
    }

    #[test]
    fn parses_labels_values_and_escapes() {
        let s = Scrape::parse(TEXT).unwrap();
        assert_eq!(s.samples.len(), 6);
        assert_eq!(s.value("dsql_proxy_x", &[("endpoint", "a")]), Some(3.0));
        assert_eq!(
            s.value("dsql_proxy_x", &[("reason", "busy")]),
            None,
            "two match"
        );
        assert_eq!(s.sum("dsql_proxy_x", &[("reason", "busy")]), 7.0);
        assert_eq!(s.sum("dsql_proxy_x", &[("reason", "none")]), 0.0);
        assert_eq!(s.value("dsql_proxy_y", &[]), Some(1500.0));
        assert_eq!(s.value("dsql_proxy_h_bucket", &[("le", "+Inf")]), Some(7.0));
        let weird = &s.samples[4];
        assert_eq!(weird.labels["v"], "q\"uo\\te\nnl");
        assert_eq!(weird.labels["w"], "a,b}");
        assert_eq!(weird.value, f64::NEG_INFINITY);
        assert!(s.value("nan", &[]).unwrap().is_nan());
        assert!(s.has("dsql_proxy_y") && !s.has("dsql_proxy_z"));
    }

    #[test]
    fn malformed_lines_are_errors() {
        for bad in [
            "x{a=\"1\"",
            "x{a=1} 2",
            "x 1 2 3",
            "x{a=\"1\" b=\"2\"} 1",
            "x one",
            "{a=\"1\"} 1",
            "x{a=\"\\q\"} 1",
        ] {
            assert!(Scrape::parse(bad).is_err(), "{bad:?} parsed");
        }
    }
}
