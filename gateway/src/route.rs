//! Every path of the gateway's TLS listener, parsed once into a [`Route`] (as `oci::route`
//! parses `/v2/` for storage): the registry API, the token service and its account APIs,
//! the single sign-on flows, and the robots' admin API. The admin listener (`/metrics`,
//! `/healthz`, `/readyz`) is a separate socket (`admin.rs`).

use crate::reply::Protocol;

/// The Docker token endpoint (`GET`, `POST`).
pub const TOKEN_PATH: &str = "/token";
/// The token service's public keys.
pub const JWKS_PATH: &str = "/auth/jwks.json";
/// RFC 7009 revocation of a refresh or access token by whoever holds it (`POST`, form
/// `token=`).
pub const REVOKE_PATH: &str = "/auth/revoke";
/// Administrators revoke access tokens: one (`DELETE /auth/tokens/<jti>`, the `token.jti` of
/// its audit event) or all of a subject's (`DELETE /auth/tokens?user=<name>[&kind=robot|ci]`).
pub const TOKENS_PATH: &str = "/auth/tokens";
/// A user's sessions (`GET`), one revoked (`DELETE /auth/sessions/<id>`); admins see and
/// revoke everyone's (`?user=<name>` or `?user=*`).
pub const SESSIONS_PATH: &str = "/auth/sessions";
/// The robot accounts' admin API.
pub const ROBOTS_PATH: &str = "/admin/robots";
/// The browser sign-in (single sign-on): starts at the IdP.
pub const LOGIN_PATH: &str = "/auth/oidc/login";
/// Where the IdP sends the browser back.
pub const CALLBACK_PATH: &str = "/auth/oidc/callback";
/// RFC 8628 device authorization endpoint (`POST`, form `client_id`, optional `device`).
pub const DEVICE_PATH: &str = "/auth/oidc/device";
/// Where the user enters a device's code when the IdP has no device flow of its own.
pub const VERIFY_PATH: &str = "/auth/oidc/device/verify";
/// The web console and everything under it.
pub const CONSOLE_PATH: &str = "/ui";

/// What a request on the TLS listener is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    /// `/v2/…`: the bearer check, then storage.
    Registry,
    /// [`TOKEN_PATH`].
    Token,
    /// [`JWKS_PATH`].
    Jwks,
    /// `POST` [`REVOKE_PATH`].
    Revoke,
    /// [`SESSIONS_PATH`] and below.
    Sessions,
    /// [`TOKENS_PATH`] and below.
    Tokens,
    /// [`ROBOTS_PATH`] and below.
    Robots,
    /// [`DEVICE_PATH`].
    Device,
    /// [`LOGIN_PATH`].
    Login,
    /// [`CALLBACK_PATH`].
    Callback,
    /// [`VERIFY_PATH`].
    Verify,
    /// [`CONSOLE_PATH`] and below.
    Console,
    /// Anything else: 404.
    Unknown,
}

/// `path` is `base` or below it (`base/…`).
fn at_or_under(path: &str, base: &str) -> bool {
    path.strip_prefix(base)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

impl Route {
    pub fn parse(method: &str, path: &str) -> Route {
        match path {
            TOKEN_PATH => Route::Token,
            JWKS_PATH => Route::Jwks,
            REVOKE_PATH if method == "POST" => Route::Revoke,
            DEVICE_PATH => Route::Device,
            LOGIN_PATH => Route::Login,
            CALLBACK_PATH => Route::Callback,
            VERIFY_PATH => Route::Verify,
            "/v2" => Route::Registry,
            p if p.starts_with("/v2/") => Route::Registry,
            p if at_or_under(p, SESSIONS_PATH) => Route::Sessions,
            p if at_or_under(p, TOKENS_PATH) => Route::Tokens,
            p if at_or_under(p, ROBOTS_PATH) => Route::Robots,
            p if at_or_under(p, CONSOLE_PATH) => Route::Console,
            _ => Route::Unknown,
        }
    }

    /// The `route` label of the gateway's metrics (a `/v2/` request's is its endpoint's).
    pub fn label(self) -> &'static str {
        match self {
            Route::Registry => "other",
            Route::Token => "token",
            Route::Jwks => "jwks",
            Route::Revoke => "revoke",
            Route::Sessions => "sessions",
            Route::Tokens => "tokens",
            Route::Robots => "robots",
            Route::Device | Route::Login | Route::Callback | Route::Verify => "oidc",
            Route::Console => "console",
            Route::Unknown => "unknown",
        }
    }

    /// How the path writes its errors.
    pub fn protocol(self) -> Protocol {
        match self {
            Route::Registry | Route::Unknown => Protocol::Registry,
            Route::Token
            | Route::Jwks
            | Route::Revoke
            | Route::Sessions
            | Route::Tokens
            | Route::Robots
            | Route::Device => Protocol::OAuth,
            Route::Login | Route::Callback | Route::Verify | Route::Console => Protocol::Page,
        }
    }

    /// Whether the gateway reads the request's body for the endpoint (bounded by
    /// `proxy::MAX_BODY`): the form posts of the token service and sign-in, the robots API's
    /// JSON.
    pub fn reads_body(self, method: &str) -> bool {
        match self {
            Route::Token | Route::Verify => method == "POST",
            Route::Revoke | Route::Device => true,
            Route::Robots => matches!(method, "POST" | "PATCH"),
            Route::Console => method == "POST",
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_path_has_one_route() {
        let cases = [
            ("GET", "/v2/", Route::Registry),
            ("GET", "/v2", Route::Registry),
            ("GET", "/v2/a/b/manifests/1", Route::Registry),
            ("GET", "/v2x", Route::Unknown),
            ("GET", "/token", Route::Token),
            ("POST", "/token", Route::Token),
            ("GET", "/token/", Route::Unknown),
            ("GET", "/auth/jwks.json", Route::Jwks),
            ("POST", "/auth/revoke", Route::Revoke),
            ("GET", "/auth/revoke", Route::Unknown),
            ("GET", "/auth/sessions", Route::Sessions),
            ("DELETE", "/auth/sessions/abc", Route::Sessions),
            ("GET", "/auth/sessionsx", Route::Unknown),
            ("DELETE", "/auth/tokens/j1", Route::Tokens),
            ("PATCH", "/admin/robots/robot$a+b", Route::Robots),
            ("GET", "/admin/robotsx", Route::Unknown),
            ("POST", "/auth/oidc/device", Route::Device),
            ("GET", "/auth/oidc/device/verify", Route::Verify),
            ("GET", "/auth/oidc/login", Route::Login),
            ("GET", "/auth/oidc/callback", Route::Callback),
            ("GET", "/", Route::Unknown),
            ("GET", "/ui", Route::Console),
            ("POST", "/ui/login", Route::Console),
            ("GET", "/uix", Route::Unknown),
        ];
        for (method, path, want) in cases {
            assert_eq!(Route::parse(method, path), want, "{method} {path}");
        }
    }
}
