//! Every configuration key from the environment, as container platforms expect:
//! `PORTCULLIS_<TABLE>_<KEY>` sets `<key>` of the table `[<table>]`
//! (`PORTCULLIS_TOKEN_EXPIRES_IN_SECONDS=300`), `PORTCULLIS_<KEY>` a top-level key
//! (`PORTCULLIS_LISTEN=0.0.0.0:8443`), over what the config file (if any) says.
//!
//! Names are resolved against each service's [`Schema`] (its top-level keys and tables): the
//! longest table whose name (dots as `_`) starts the variable's name wins, so
//! `PORTCULLIS_AUTH_LDAP_URLS` is `[auth.ldap] urls` and `PORTCULLIS_AUTH_HTPASSWD_FILE` is
//! `[auth] htpasswd_file`. A value is read as a TOML value when it is one — numbers, booleans,
//! arrays (`["a", "b"]`), inline tables (`{ team-a = ["bob"] }`), quoted strings — and as a
//! plain string otherwise, so `PORTCULLIS_LISTEN=0.0.0.0:8443` needs no quotes; quote a string
//! that would read as something else (`PORTCULLIS_TOKEN_SERVICE='"2024"'`). A whole table or
//! array of tables is one variable: `PORTCULLIS_WEBHOOKS='[{ name = "a", url = "…" }]'`.
//! The process's environment does not change while it runs: a variable wins over the file at
//! every (re)load.
//!
//! Not keys, and left alone: the variables the services read themselves ([`NOT_KEYS`]: secrets,
//! the config file's path, the client tools' settings) and the service links Kubernetes adds to
//! every pod (`PORTCULLIS_SERVICE_HOST`, `PORTCULLIS_PORT_443_TCP`, … for a Service named
//! `portcullis`). Any other variable with the prefix that names no table or key is refused, as
//! an unknown key in the file is.

use anyhow::{Context, bail};
use serde::de::DeserializeOwned;
use std::path::Path;

/// What every variable of this module starts with.
pub const PREFIX: &str = "PORTCULLIS_";

/// Variables with the prefix that are not configuration keys (after the prefix).
pub const NOT_KEYS: &[&str] = &[
    // Secrets, read where they are used.
    "INTERNAL_SECRET",
    "PEPPER",
    "ADMIN_PASSWORD",
    "ADMIN_TOKEN",
    "OIDC_CLIENT_SECRET",
    "LDAP_BIND_PASSWORD",
    "REDIS_PASSWORD",
    // The config files' paths.
    "GATEWAY_CONFIG",
    "STORAGE_CONFIG",
    // The client tools' settings (credential helper, `gateway robot`).
    "CREDENTIALS",
    "REGISTRIES",
    "CA_FILE",
    "NO_DEVICE_FLOW",
    "PASSWORD",
    "URL",
    // docker-compose.yml's own (images and published ports), exported in the shell that
    // runs it.
    "BASE_IMAGE",
    "NODE_IMAGE",
    "PORT",
    "IDP_PORT",
    "PROMETHEUS_PORT",
];

/// The shape of one service's configuration, enough to place a variable.
pub struct Schema {
    /// Top-level keys; each takes the whole value (scalars, and arrays of tables such as
    /// `proxy_cache`).
    pub keys: &'static [&'static str],
    /// Tables whose keys can be set one by one (dotted for nested tables: `auth.ldap`).
    pub tables: &'static [&'static str],
}

/// A configuration read from its file and the environment.
pub struct Loaded<T> {
    pub config: T,
    /// The file's table with the environment's keys applied (what `check-config` prints).
    pub merged: toml::Table,
    /// The variables that set a key, sorted.
    pub from_env: Vec<String>,
}

impl<T> Loaded<T> {
    /// The merged configuration as TOML, secrets masked ([`masked`]): what `check-config`
    /// prints.
    pub fn describe(&self) -> anyhow::Result<String> {
        Ok(toml::to_string(&masked(&self.merged))?)
    }

    /// Logs which variables set keys (their names, never their values).
    pub fn log_sources(&self) {
        if !self.from_env.is_empty() {
            tracing::info!(variables = ?self.from_env, "configuration keys from the environment");
        }
    }
}

/// Reads `file` (none: an empty one), applies the process's environment over it and
/// deserializes the result.
pub fn load<T: DeserializeOwned>(
    file: Option<&Path>,
    schema: &Schema,
) -> anyhow::Result<Loaded<T>> {
    let mut vars = Vec::new();
    for (k, v) in std::env::vars_os() {
        let Some(k) = k.to_str().filter(|k| k.starts_with(PREFIX)) else {
            continue;
        };
        let v = v
            .into_string()
            .map_err(|_| anyhow::anyhow!("{k} is not valid UTF-8"))?;
        vars.push((k.to_string(), v));
    }
    load_from(file, schema, vars)
}

/// [`load`] with the variables given.
pub fn load_from<T: DeserializeOwned>(
    file: Option<&Path>,
    schema: &Schema,
    vars: impl IntoIterator<Item = (String, String)>,
) -> anyhow::Result<Loaded<T>> {
    let text = match file {
        Some(f) => {
            std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?
        }
        None => String::new(),
    };
    let from = || match file {
        Some(f) => f.display().to_string(),
        None => "the configuration".to_string(),
    };
    let mut merged: toml::Table =
        toml::from_str(&text).with_context(|| format!("parsing {}", from()))?;
    let from_env = overlay(&mut merged, schema, vars)?;
    let config = if from_env.is_empty() {
        // From the text, so that errors name the line.
        toml::from_str(&text).with_context(|| format!("parsing {}", from()))?
    } else {
        toml::Value::Table(merged.clone())
            .try_into()
            // Names and types, not values: a secret put in the wrong variable stays out of
            // logs and audit events.
            .map_err(|e: toml::de::Error| anyhow::anyhow!("{}", without_values(&e.to_string())))
            .with_context(|| {
                format!(
                    "parsing {} with {} from the environment",
                    from(),
                    from_env.join(", ")
                )
            })?
    };
    Ok(Loaded {
        config,
        merged,
        from_env,
    })
}

/// Every key of `table` as the variable that sets it (`PORTCULLIS_TOKEN_ISSUER=…`; one
/// variable for what is not a table of `schema`), values as TOML: a config file turned into an
/// environment.
pub fn as_variables(schema: &Schema, table: &toml::Table) -> Vec<(String, String)> {
    fn walk(schema: &Schema, prefix: &str, t: &toml::Table, out: &mut Vec<(String, String)>) {
        for (k, v) in t {
            let dotted = if prefix.is_empty() {
                k.clone()
            } else {
                format!("{prefix}.{k}")
            };
            match v {
                toml::Value::Table(inner) if schema.tables.contains(&dotted.as_str()) => {
                    walk(schema, &dotted, inner, out)
                }
                v => out.push((
                    format!("{PREFIX}{}", dotted.replace('.', "_").to_uppercase()),
                    v.to_string(),
                )),
            }
        }
    }
    let mut out = Vec::new();
    walk(schema, "", table, &mut out);
    out
}

/// `message` with each double-quoted value replaced by `"…"` (serde quotes values that way;
/// field names come in backticks and stay).
fn without_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut quoted = false;
    for c in message.chars() {
        match (c, quoted) {
            ('"', false) => {
                quoted = true;
                out.push_str("\"…");
            }
            ('"', true) => {
                quoted = false;
                out.push('"');
            }
            (_, true) => {}
            (c, false) => out.push(c),
        }
    }
    out
}

/// Applies the variables that are configuration keys to `table`; returns their names, sorted.
pub fn overlay(
    table: &mut toml::Table,
    schema: &Schema,
    vars: impl IntoIterator<Item = (String, String)>,
) -> anyhow::Result<Vec<String>> {
    let mut vars: Vec<(String, String)> = vars
        .into_iter()
        .filter(|(k, v)| is_key_candidate(k, v))
        .collect();
    vars.sort();
    let mut applied = Vec::new();
    for (name, value) in vars {
        let path = place(&name, schema)?;
        let (last, parents) = path.split_last().context("an empty key")?;
        let mut at = &mut *table;
        for p in parents {
            let next = at
                .entry(p.clone())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            at = match next {
                toml::Value::Table(t) => t,
                _ => bail!("{name}: `{p}` is not a table in the configuration file"),
            };
        }
        at.insert(last.clone(), value_of(&value));
        applied.push(name);
    }
    Ok(applied)
}

/// Whether a variable may be a configuration key: it has the prefix, is not one the services
/// read themselves and is not a Kubernetes service link.
fn is_key_candidate(name: &str, value: &str) -> bool {
    let Some(rest) = name.strip_prefix(PREFIX) else {
        return false;
    };
    !(NOT_KEYS.contains(&rest) || is_service_link(rest, value))
}

/// Kubernetes' variables for a Service (`<NAME>_SERVICE_HOST`, `<NAME>_SERVICE_PORT[_<port>]`,
/// `<NAME>_PORT=tcp://…`, `<NAME>_PORT_<n>_<PROTO>[_PROTO|_PORT|_ADDR]`).
fn is_service_link(rest: &str, value: &str) -> bool {
    if rest.contains("SERVICE_HOST") || rest.contains("SERVICE_PORT") {
        return true;
    }
    if rest.ends_with("PORT")
        && ["tcp://", "udp://", "sctp://"]
            .iter()
            .any(|s| value.starts_with(s))
    {
        return true;
    }
    let parts: Vec<&str> = rest.split('_').collect();
    parts.windows(3).any(|w| {
        w[0] == "PORT"
            && !w[1].is_empty()
            && w[1].bytes().all(|b| b.is_ascii_digit())
            && matches!(w[2], "TCP" | "UDP" | "SCTP")
    })
}

/// Where a variable goes: a top-level key, or a key of the longest matching table.
fn place(name: &str, schema: &Schema) -> anyhow::Result<Vec<String>> {
    let lower = name[PREFIX.len()..].to_ascii_lowercase();
    if schema.keys.contains(&lower.as_str()) {
        return Ok(vec![lower]);
    }
    let best = schema
        .tables
        .iter()
        .filter_map(|t| {
            let key = lower.strip_prefix(&format!("{}_", t.replace('.', "_")))?;
            (!key.is_empty()).then_some((t, key))
        })
        .max_by_key(|(t, _)| t.len());
    match best {
        Some((t, key)) => Ok(t
            .split('.')
            .map(str::to_string)
            .chain([key.to_string()])
            .collect()),
        None => bail!(
            "{name} names no configuration key: {PREFIX}<KEY> for one of {} or \
             {PREFIX}<TABLE>_<KEY> for one of the tables {}",
            schema.keys.join(", "),
            schema.tables.join(", ")
        ),
    }
}

/// The value a variable's text stands for: a TOML value when it is exactly one (not a date),
/// else the text as a string.
pub fn value_of(text: &str) -> toml::Value {
    match toml::from_str::<toml::Table>(&format!("v = {text}")) {
        Ok(mut t) if t.len() == 1 => match t.remove("v") {
            Some(toml::Value::Datetime(_)) | None => toml::Value::String(text.to_string()),
            Some(v) => v,
        },
        _ => toml::Value::String(text.to_string()),
    }
}

/// `table` with what could be secret hidden: string values of keys that name a password,
/// secret, token or pepper (not a `…_file`), the password of a URL's user information, and the
/// path and query of webhook URLs (which often carry a token: Slack's, Teams').
pub fn masked(table: &toml::Table) -> toml::Table {
    table
        .iter()
        .map(|(k, v)| {
            let v = mask_value(k, v);
            if k != "webhooks" {
                return (k.clone(), v);
            }
            let hooks = match v {
                toml::Value::Array(a) => a
                    .into_iter()
                    .map(|h| match h {
                        toml::Value::Table(mut t) => {
                            if let Some(toml::Value::String(u)) = t.get("url") {
                                let shown = mask_url_path(u);
                                t.insert("url".into(), toml::Value::String(shown));
                            }
                            toml::Value::Table(t)
                        }
                        other => other,
                    })
                    .collect(),
                other => return (k.clone(), other),
            };
            (k.clone(), toml::Value::Array(hooks))
        })
        .collect()
}

/// `scheme://host/***` for a URL with a path or query (user information masked too).
fn mask_url_path(s: &str) -> String {
    let s = mask_url_password(s);
    let Some((scheme, rest)) = s.split_once("://") else {
        return "***".into();
    };
    match rest.find(['/', '?', '#']) {
        Some(i) => format!("{scheme}://{}/***", &rest[..i]),
        None => s.clone(),
    }
}

fn mask_value(key: &str, v: &toml::Value) -> toml::Value {
    let secret_name = ["password", "secret", "token", "pepper"]
        .iter()
        .any(|w| key.contains(w))
        && !key.ends_with("_file")
        && !key.ends_with("_files");
    match v {
        toml::Value::String(_) if secret_name => toml::Value::String("***".into()),
        toml::Value::String(s) => toml::Value::String(mask_url_password(s)),
        toml::Value::Table(t) => toml::Value::Table(masked(t)),
        toml::Value::Array(a) => toml::Value::Array(a.iter().map(|x| mask_value(key, x)).collect()),
        other => other.clone(),
    }
}

/// `scheme://user:***@host…` for `scheme://user:password@host…`.
fn mask_url_password(s: &str) -> String {
    let Some((scheme, rest)) = s.split_once("://") else {
        return s.to_string();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return s.to_string();
    };
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}{tail}"),
        None => s.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SCHEMA: Schema = Schema {
        keys: &["listen", "drain_seconds", "webhooks"],
        tables: &["auth", "auth.ldap", "token", "proxy_protocol"],
    };

    fn vars(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn names_go_to_the_longest_table_and_values_keep_their_types() {
        let mut t: toml::Table = toml::from_str("[auth]\nhtpasswd_file = \"/old\"\n").unwrap();
        let applied = overlay(
            &mut t,
            &SCHEMA,
            vars(&[
                ("PORTCULLIS_LISTEN", "0.0.0.0:8443"),
                ("PORTCULLIS_DRAIN_SECONDS", "30"),
                ("PORTCULLIS_AUTH_HTPASSWD_FILE", "/etc/htpasswd"),
                (
                    "PORTCULLIS_AUTH_LDAP_URLS",
                    "[\"ldaps://a\", \"ldaps://b\"]",
                ),
                ("PORTCULLIS_AUTH_GROUPS", "{ team-a = [\"bob\"] }"),
                ("PORTCULLIS_TOKEN_SERVICE", "\"2024\""),
                (
                    "PORTCULLIS_PROXY_PROTOCOL_TRUSTED_PROXIES",
                    "[\"10.0.0.5\"]",
                ),
                (
                    "PORTCULLIS_WEBHOOKS",
                    "[{ name = \"a\", url = \"https://h/\" }]",
                ),
                ("PORTCULLIS_INTERNAL_SECRET", "not a key"),
                ("PORTCULLIS_SERVICE_HOST", "10.0.0.1"),
                ("PORTCULLIS_PORT", "tcp://10.0.0.1:443"),
                ("PORTCULLIS_PORT_443_TCP_ADDR", "10.0.0.1"),
                ("HOME", "/root"),
            ]),
        )
        .unwrap();
        assert_eq!(applied.len(), 8, "{applied:?}");
        let expected: toml::Table = toml::from_str(
            r#"listen = "0.0.0.0:8443"
drain_seconds = 30
webhooks = [{ name = "a", url = "https://h/" }]
[auth]
htpasswd_file = "/etc/htpasswd"
groups = { team-a = ["bob"] }
[auth.ldap]
urls = ["ldaps://a", "ldaps://b"]
[token]
service = "2024"
[proxy_protocol]
trusted_proxies = ["10.0.0.5"]
"#,
        )
        .unwrap();
        assert_eq!(t, expected);
    }

    #[test]
    fn a_name_of_no_table_is_refused_by_name() {
        let mut t = toml::Table::new();
        let e = overlay(&mut t, &SCHEMA, vars(&[("PORTCULLIS_TOKN_ISSUER", "x")])).unwrap_err();
        assert!(e.to_string().contains("PORTCULLIS_TOKN_ISSUER"), "{e}");
        // A key the file has as a value cannot become a table.
        let mut t: toml::Table = toml::from_str("auth = 1").unwrap();
        assert!(overlay(&mut t, &SCHEMA, vars(&[("PORTCULLIS_AUTH_X", "1")])).is_err());
    }

    #[test]
    fn values_that_are_not_toml_are_strings() {
        assert_eq!(value_of("/etc/x"), toml::Value::String("/etc/x".into()));
        assert_eq!(value_of(""), toml::Value::String(String::new()));
        assert_eq!(
            value_of("2026-01-01"),
            toml::Value::String("2026-01-01".into())
        );
        assert_eq!(
            value_of("1\nlisten = 2"),
            toml::Value::String("1\nlisten = 2".into())
        );
        assert_eq!(value_of("true"), toml::Value::Boolean(true));
        assert_eq!(value_of("1.5"), toml::Value::Float(1.5));
    }

    #[test]
    fn secrets_are_masked() {
        let t: toml::Table = toml::from_str(
            r#"password = "p"
password_file = "/f"
[x]
url = "redis://u:pw@h:6379/0"
plain = "https://h/a@b"
tokens = ["t1"]
"#,
        )
        .unwrap();
        let m = toml::to_string(&masked(&t)).unwrap();
        assert!(
            !m.contains("\"p\"") && !m.contains("pw") && !m.contains("t1"),
            "{m}"
        );
        assert!(
            m.contains("/f") && m.contains("redis://u:***@h:6379/0"),
            "{m}"
        );
        assert!(m.contains("https://h/a@b"), "{m}");
        let hooks: toml::Table = toml::from_str(
            "webhooks = [{ name = \"s\", url = \"https://hooks.example/T0/B0/XyZ?k=1\" }]",
        )
        .unwrap();
        let m = toml::to_string(&masked(&hooks)).unwrap();
        assert!(
            m.contains("https://hooks.example/***") && !m.contains("XyZ"),
            "{m}"
        );
    }

    #[test]
    fn errors_name_keys_not_values() {
        let e = load_from::<Small>(
            None,
            &SCHEMA,
            vars(&[
                ("PORTCULLIS_LISTEN", "127.0.0.1:1"),
                ("PORTCULLIS_DRAIN_SECONDS", "hunter2-secret"),
            ]),
        )
        .err()
        .unwrap();
        let text = format!("{e:#}");
        assert!(
            !text.contains("hunter2") && text.contains("drain_seconds"),
            "{text}"
        );
    }

    #[derive(serde::Deserialize, Debug)]
    #[serde(deny_unknown_fields)]
    struct Small {
        listen: String,
        #[serde(default)]
        drain_seconds: u64,
    }

    #[test]
    fn load_reports_the_variables_when_the_result_does_not_parse() {
        let s: Loaded<Small> = load_from(
            None,
            &SCHEMA,
            vars(&[
                ("PORTCULLIS_LISTEN", "127.0.0.1:1"),
                ("PORTCULLIS_DRAIN_SECONDS", "7"),
            ]),
        )
        .unwrap();
        assert_eq!(
            (s.config.listen.as_str(), s.config.drain_seconds),
            ("127.0.0.1:1", 7)
        );
        let e = load_from::<Small>(
            None,
            &SCHEMA,
            vars(&[
                ("PORTCULLIS_LISTEN", "x"),
                ("PORTCULLIS_DRAIN_SECONDS", "soon"),
            ]),
        )
        .err()
        .unwrap();
        assert!(
            format!("{e:#}").contains("PORTCULLIS_DRAIN_SECONDS"),
            "{e:#}"
        );
    }
}
