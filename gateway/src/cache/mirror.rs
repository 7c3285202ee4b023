//! The transparent mirror: requests that arrive on a cache's mirror listener or host name
//! name upstream repositories without the cache's prefix. The gateway puts the prefix in
//! front of every `/v2/<name>/…` path before anything reads it (`proxy.rs`); here are what
//! else must agree with that: which prefix a request gets ([`Mirrors`]), the scopes of a
//! token asked for on the mirror ([`mirror_scopes`]), and the challenge a refused request
//! gets there ([`mirror_challenge`]).

use std::collections::HashMap;

/// Mirror listeners (by local port) and host names, to the prefix of their cache.
#[derive(Default)]
pub struct Mirrors {
    by_port: HashMap<u16, String>,
    by_host: HashMap<String, String>,
}

impl Mirrors {
    pub fn add_port(&mut self, port: u16, prefix: &str) {
        self.by_port.insert(port, prefix.to_owned());
    }

    pub fn add_host(&mut self, host: &str, prefix: &str) {
        self.by_host
            .insert(host.to_ascii_lowercase(), prefix.to_owned());
    }

    /// The prefix requests arriving on local `port` or for `host` (a `Host` header) get.
    pub fn prefix(&self, port: Option<u16>, host: Option<&str>) -> Option<&str> {
        if let Some(p) = port.and_then(|p| self.by_port.get(&p)) {
            return Some(p);
        }
        let host = host?;
        // `name:port` or `[v6]:port`.
        let name = match host.rsplit_once(':') {
            Some((n, p)) if p.bytes().all(|b| b.is_ascii_digit()) && !n.ends_with(':') => n,
            _ => host,
        };
        self.by_host
            .get(&name.to_ascii_lowercase())
            .map(String::as_str)
    }
}

/// A token request's form (`GET /token?…` or a `POST` body) as it arrived on a mirror: each
/// `repository:<name>:<actions>` scope names `<prefix>/<name>`, the repository the mirror's
/// requests are rewritten to (docker asks for scopes of the names it pulls, not those of the
/// challenge). Other parameters and scopes stay as they are.
pub fn mirror_scopes(prefix: &str, form: &str) -> String {
    let mut out = form_urlencoded::Serializer::new(String::new());
    for (k, v) in form_urlencoded::parse(form.as_bytes()) {
        if k != "scope" {
            out.append_pair(&k, &v);
            continue;
        }
        let scopes: Vec<String> = v
            .split(' ')
            .map(|scope| match scope.strip_prefix("repository:") {
                Some(rest) if !rest.is_empty() => format!("repository:{prefix}/{rest}"),
                _ => scope.to_owned(),
            })
            .collect();
        out.append_pair("scope", &scopes.join(" "));
    }
    out.finish()
}

/// The `WWW-Authenticate` challenge of a request refused on a mirror: its token service is
/// the mirror's own (`https://<host>/token`, where token requests get [`mirror_scopes`] —
/// a configured `[token] realm` names the main listener, whose tokens would be for the
/// unprefixed names), and its scope names what the client asked for, without the prefix
/// (containerd asks for the challenge's scope as it is).
pub fn mirror_challenge(prefix: &str, host: &str, challenge: &str) -> String {
    let host: String = host
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "-.:[]".contains(*c))
        .collect();
    let mut out = String::new();
    for (i, part) in challenge.split(",").enumerate() {
        if i > 0 {
            out.push(',');
        }
        if part.starts_with("Bearer realm=") {
            out.push_str(&format!(
                "Bearer realm=\"https://{host}{}\"",
                crate::route::TOKEN_PATH
            ));
        } else if let Some(scope) = part.strip_prefix("scope=\"repository:") {
            let scope = scope.strip_prefix(&format!("{prefix}/")).unwrap_or(scope);
            out.push_str(&format!("scope=\"repository:{scope}"));
        } else {
            out.push_str(part);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_token_requests_ask_for_the_prefixed_repositories() {
        assert_eq!(
            mirror_scopes(
                "hub",
                "service=portcullis&scope=repository%3Alibrary%2Falpine%3Apull&scope=registry%3Acatalog%3A*"
            ),
            "service=portcullis&scope=repository%3Ahub%2Flibrary%2Falpine%3Apull&scope=registry%3Acatalog%3A*"
        );
        assert_eq!(
            mirror_scopes("hub", "scope=repository:a:pull+repository:b:pull"),
            "scope=repository%3Ahub%2Fa%3Apull+repository%3Ahub%2Fb%3Apull"
        );
        assert_eq!(
            mirror_scopes("hub", "grant_type=password"),
            "grant_type=password"
        );
    }

    #[test]
    fn a_challenge_on_a_mirror_names_its_token_service_and_the_unprefixed_scope() {
        assert_eq!(
            mirror_challenge(
                "hub",
                "mirror.corp:5001",
                "Bearer realm=\"https://registry.corp/token\",service=\"portcullis\",scope=\"repository:hub/library/alpine:pull\",error=\"insufficient_scope\""
            ),
            "Bearer realm=\"https://mirror.corp:5001/token\",service=\"portcullis\",scope=\"repository:library/alpine:pull\",error=\"insufficient_scope\""
        );
        assert_eq!(
            mirror_challenge(
                "hub",
                "m\"x",
                "Bearer realm=\"https://r/token\",service=\"s\""
            ),
            "Bearer realm=\"https://mx/token\",service=\"s\""
        );
    }

    #[test]
    fn mirrors_are_found_by_port_then_host() {
        let mut m = Mirrors::default();
        m.add_port(5001, "hub");
        m.add_host("GHCR-mirror.corp", "ghcr");
        assert_eq!(m.prefix(Some(5001), Some("ghcr-mirror.corp")), Some("hub"));
        assert_eq!(
            m.prefix(Some(443), Some("ghcr-mirror.corp:443")),
            Some("ghcr")
        );
        assert_eq!(m.prefix(Some(443), Some("registry.corp")), None);
        assert_eq!(m.prefix(None, None), None);
    }
}
