//! What the gateway answers itself — everything but a `/v2/` request forwarded to storage.
//!
//! - [`Reply`]: one answer (status, content type, body, extra headers). The features build
//!   theirs in their own protocol with its constructors: the token service and the account
//!   APIs OAuth 2 errors naming the grant's problem (and the registry-format 401 and 429 that
//!   Docker clients show), the robots API JSON, the sign-in flows HTML pages.
//! - [`Failure`]: a refusal or failure the gateway decides before or instead of a feature (no
//!   such endpoint, a body too large, a rate limit, the bearer check, storage unavailable).
//!   [`Failure::reply`] is the one place that writes it in the protocol of the path it was
//!   asked on ([`Protocol`]): an OCI error on `/v2/`, an OAuth 2 error on the token and
//!   account APIs, plain text on the browser's sign-in pages.
//!
//! `proxy::send` writes any `Reply` to the client, in one function.

use oci::{ErrorCode, OciError};
use serde_json::json;

/// An HTTP answer of the gateway's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub content_type: &'static str,
    pub body: String,
    /// Headers beyond the ones every answer gets (`WWW-Authenticate`, `Retry-After`,
    /// `Location`, `Set-Cookie`, `Cache-Control`…).
    pub headers: Vec<(&'static str, String)>,
}

pub const JSON: &str = "application/json";
pub const HTML: &str = "text/html; charset=utf-8";
pub const TEXT: &str = "text/plain; charset=utf-8";

impl Reply {
    pub fn json(status: u16, v: serde_json::Value) -> Self {
        Reply {
            status,
            content_type: JSON,
            body: v.to_string(),
            headers: Vec::new(),
        }
    }

    /// An HTML page (the sign-in flows).
    pub fn html(status: u16, body: String) -> Self {
        Reply {
            status,
            content_type: HTML,
            body,
            headers: Vec::new(),
        }
    }

    /// 429 with `Retry-After`, in the registry's error format (Docker clients show it).
    pub fn too_many(retry_after: u64, message: &str) -> Self {
        Failure::new(429, Kind::TooMany, message)
            .with_header("retry-after", retry_after.max(1).to_string())
            .reply(Protocol::Registry)
    }

    /// An OAuth 2 error (RFC 6749 §5.2).
    pub fn oauth_error(status: u16, error: &str, description: &str) -> Self {
        Reply::json(
            status,
            json!({"error": error, "error_description": description}),
        )
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// The value of an extra header, if the reply has it.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// The protocol a path speaks, which decides how a [`Failure`] is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// `/v2/` and paths that are no endpoint: OCI distribution errors.
    Registry,
    /// The token endpoint and the account APIs: OAuth 2 errors (RFC 6749 §5.2).
    OAuth,
    /// The browser's sign-in pages: plain text a person reads.
    Page,
}

/// What kind of refusal or failure, whatever the protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Credentials are missing or wrong (401).
    Unauthorized,
    /// Credentials are fine, the request is not allowed (403).
    Denied,
    /// No such endpoint, a method it does not take, a request too large to read (404, 405,
    /// 413, 414).
    Unsupported,
    /// A feature this registry is not configured for (single sign-on).
    NotConfigured,
    /// A malformed request; on `/v2/` with the OCI code the parse gave (400).
    Invalid(ErrorCode),
    /// Too many requests (429, with `Retry-After`).
    TooMany,
    /// Something the gateway depends on cannot answer now (502, 503).
    Unavailable,
    /// A fault of the gateway's (500).
    Internal,
}

/// A refusal or failure decided by the gateway itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    pub status: u16,
    pub kind: Kind,
    pub message: String,
    pub headers: Vec<(&'static str, String)>,
}

impl Failure {
    pub fn new(status: u16, kind: Kind, message: impl Into<String>) -> Self {
        Failure {
            status,
            kind,
            message: message.into(),
            headers: Vec::new(),
        }
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Self {
        self.headers.push((name, value.into()));
        self
    }

    /// A request storage would refuse too, found by the gateway's parse (`oci::request`).
    pub fn invalid(e: OciError) -> Self {
        Failure::new(e.status, Kind::Invalid(e.code), e.message)
    }

    /// A request body over the gateway's limit for the endpoint.
    pub fn body_too_large() -> Self {
        Failure::new(413, Kind::Unsupported, "request body too large")
    }

    /// The failure written in `protocol`: the one mapping of every gateway error to its
    /// response.
    pub fn reply(self, protocol: Protocol) -> Reply {
        let Failure {
            status,
            kind,
            message,
            headers,
        } = self;
        let mut reply = match protocol {
            Protocol::Registry => {
                let code = match kind {
                    Kind::Unauthorized => ErrorCode::Unauthorized,
                    Kind::Denied => ErrorCode::Denied,
                    Kind::Unsupported | Kind::NotConfigured => ErrorCode::Unsupported,
                    Kind::Invalid(code) => code,
                    Kind::TooMany => ErrorCode::TooManyRequests,
                    Kind::Unavailable | Kind::Internal => ErrorCode::Unknown,
                };
                Reply {
                    status,
                    content_type: JSON,
                    body: OciError::new(code, message).with_status(status).body(),
                    headers: Vec::new(),
                }
            }
            Protocol::OAuth => {
                let error = match kind {
                    Kind::Unauthorized => "invalid_client",
                    Kind::Denied => "access_denied",
                    Kind::Unsupported | Kind::Invalid(_) => "invalid_request",
                    Kind::NotConfigured => "unsupported_grant_type",
                    Kind::TooMany | Kind::Unavailable => "temporarily_unavailable",
                    Kind::Internal => "server_error",
                };
                Reply::oauth_error(status, error, &message)
            }
            Protocol::Page => Reply {
                status,
                content_type: TEXT,
                body: message,
                headers: Vec::new(),
            },
        };
        reply.headers = headers;
        reply
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_speaks_the_protocol_of_its_path() {
        let f = || Failure::new(429, Kind::TooMany, "slow down").with_header("retry-after", "7");
        let oci = f().reply(Protocol::Registry);
        assert_eq!(oci.status, 429);
        assert_eq!(oci.content_type, JSON);
        let v: serde_json::Value = serde_json::from_str(&oci.body).unwrap();
        assert_eq!(v["errors"][0]["code"], "TOOMANYREQUESTS");
        assert_eq!(v["errors"][0]["message"], "slow down");
        assert_eq!(oci.header("Retry-After"), Some("7"));

        let oauth = f().reply(Protocol::OAuth);
        let v: serde_json::Value = serde_json::from_str(&oauth.body).unwrap();
        assert_eq!(v["error"], "temporarily_unavailable");
        assert_eq!(v["error_description"], "slow down");
        assert_eq!(oauth.header("retry-after"), Some("7"));

        let page = f().reply(Protocol::Page);
        assert_eq!((page.content_type, page.body.as_str()), (TEXT, "slow down"));

        let parse = Failure::new(400, Kind::Invalid(ErrorCode::NameInvalid), "bad name")
            .reply(Protocol::Registry);
        assert!(parse.body.contains("NAME_INVALID"), "{}", parse.body);
    }
}
