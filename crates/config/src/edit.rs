//! Edits of `proxy.toml` that keep the file as its author wrote it
//! (comments, order, formatting): only the values named change.

use toml_edit::{DocumentMut, Item, Value};

use crate::ConfigError;

/// The key `route53 setup --write` maintains in each `[[endpoints]]` entry.
pub const HEALTH_CHECK_ID_KEY: &str = "route53_health_check_id";

/// Sets (`Some`) or removes (`None`) `route53_health_check_id` in the
/// `[[endpoints]]` entries named in `ids` (by `name`) and returns the new
/// text. Everything else is left byte for byte; a replaced value keeps its
/// trailing comment. Entries not named are untouched; a name that matches no
/// entry is an error, and so is an `endpoints` that is not an array of
/// tables (then the file is not edited).
pub fn set_health_check_ids(
    text: &str,
    ids: &[(&str, Option<&str>)],
) -> Result<String, ConfigError> {
    let mut doc: DocumentMut =
        text.parse()
            .map_err(|e: toml_edit::TomlError| ConfigError::Parse {
                origin: "file to edit".into(),
                message: e.to_string().trim_end().to_owned(),
            })?;
    let endpoints = doc
        .get_mut("endpoints")
        .and_then(Item::as_array_of_tables_mut)
        .ok_or_else(|| {
            ConfigError::Invalid(
                "cannot edit the endpoints: they must be written as [[endpoints]] tables".into(),
            )
        })?;
    for (name, id) in ids {
        let table = endpoints
            .iter_mut()
            .find(|t| t.get("name").and_then(Item::as_str) == Some(*name))
            .ok_or_else(|| {
                ConfigError::Invalid(format!("no [[endpoints]] entry named {name:?}"))
            })?;
        match id {
            Some(id) => match table
                .get_mut(HEALTH_CHECK_ID_KEY)
                .and_then(Item::as_value_mut)
            {
                Some(value) => {
                    let decor = value.decor().clone();
                    *value = Value::from(*id);
                    *value.decor_mut() = decor;
                }
                None => {
                    table.insert(HEALTH_CHECK_ID_KEY, toml_edit::value(*id));
                }
            },
            None => {
                table.remove(HEALTH_CHECK_ID_KEY);
            }
        }
    }
    Ok(doc.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    const FILE: &str = r#"# top comment
[backend]
kind = "dsql" # inline

# first Region
[[endpoints]]
name = "use1"   # the primary
region = "us-east-1"
host = "abc.dsql.us-east-1.on.aws"

[[endpoints]]
name = "use2"
host = "def.dsql.us-east-2.on.aws"
route53_health_check_id = "old-id" # set by hand
priority = 2

[routing]
route53 = "veto"
"#;

    #[test]
    fn inserts_and_replaces_keeping_comments() {
        let out =
            set_health_check_ids(FILE, &[("use1", Some("id-1")), ("use2", Some("id-2"))]).unwrap();
        assert_eq!(
            out,
            FILE.replace(
                "host = \"abc.dsql.us-east-1.on.aws\"\n",
                "host = \"abc.dsql.us-east-1.on.aws\"\nroute53_health_check_id = \"id-1\"\n"
            )
            .replace("\"old-id\"", "\"id-2\"")
        );
        // Running it again changes nothing.
        let again =
            set_health_check_ids(&out, &[("use1", Some("id-1")), ("use2", Some("id-2"))]).unwrap();
        assert_eq!(again, out);
        crate::Config::parse(&out).unwrap();
    }

    #[test]
    fn removes_only_the_named_entries_key() {
        let out = set_health_check_ids(FILE, &[("use2", None), ("use1", None)]).unwrap();
        assert_eq!(
            out,
            FILE.replace("route53_health_check_id = \"old-id\" # set by hand\n", "")
        );
    }

    #[test]
    fn unknown_names_and_inline_endpoints_are_errors() {
        let err = set_health_check_ids(FILE, &[("nope", Some("x"))]).unwrap_err();
        assert!(err.to_string().contains("\"nope\""), "{err}");
        let inline = "endpoints = [{ name = \"a\", host = \"h\" }]\n";
        let err = set_health_check_ids(inline, &[("a", Some("x"))]).unwrap_err();
        assert!(err.to_string().contains("[[endpoints]]"), "{err}");
        assert!(set_health_check_ids("x = [", &[]).is_err());
    }
}

#[cfg(test)]
mod shipped {
    use super::*;

    /// The shipped example: the lines are added, nothing else changes, and
    /// the file still loads.
    #[test]
    fn the_shipped_proxy_toml_takes_the_ids() {
        let text = include_str!("../../../proxy.toml");
        let out = set_health_check_ids(
            text,
            &[("us-east-1", Some("id-1")), ("us-east-2", Some("id-2"))],
        )
        .unwrap();
        let config = crate::Config::parse(&out).unwrap();
        let ids: Vec<_> = config
            .endpoints
            .iter()
            .map(|e| e.route53_health_check_id.as_deref())
            .collect();
        assert_eq!(ids, [Some("id-1"), Some("id-2")]);
        let removed: Vec<&str> = text
            .lines()
            .filter(|l| !out.lines().any(|o| o == *l))
            .collect();
        assert!(removed.is_empty(), "{removed:?}");
        assert_eq!(out.lines().count(), text.lines().count() + 2, "{out}");
        assert!(
            out.contains("priority = 1\nroute53_health_check_id = \"id-1\"\n"),
            "{out}"
        );
    }
}
