//! What the gateway answers itself (everything but a forwarded `/v2/` request): [`Reply`].

use serde_json::json;

/// An HTTP answer of the gateway's own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    pub status: u16,
    pub body: String,
    pub www_authenticate: Option<String>,
    /// Seconds for `Retry-After` (429 answers).
    pub retry_after: Option<u64>,
}

impl Reply {
    pub fn json(status: u16, v: serde_json::Value) -> Self {
        Reply {
            status,
            body: v.to_string(),
            www_authenticate: None,
            retry_after: None,
        }
    }

    /// 429 with `Retry-After`, in the registry's error format (Docker clients show it).
    pub fn too_many(retry_after: u64, message: &str) -> Self {
        Reply {
            status: 429,
            body: json!({"errors": [{"code": "TOOMANYREQUESTS", "message": message}]}).to_string(),
            www_authenticate: None,
            retry_after: Some(retry_after.max(1)),
        }
    }

    /// An OAuth 2 error (RFC 6749 §5.2).
    pub fn oauth_error(status: u16, error: &str, description: &str) -> Self {
        Reply::json(
            status,
            json!({"error": error, "error_description": description}),
        )
    }
}
