//! OCI error codes (distribution-spec "Error Codes" plus distribution's extras), each with its
//! HTTP status, and the JSON body `{"errors":[{"code","message","detail"}]}`.
//!
//! This is the one table of codes: services build an [`OciError`] and turn it into a response
//! in exactly one place.

use serde::Serialize;

/// An error code and the HTTP status it is answered with by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    BlobUnknown,
    BlobUploadInvalid,
    BlobUploadUnknown,
    DigestInvalid,
    ManifestBlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameInvalid,
    NameUnknown,
    SizeInvalid,
    Unauthorized,
    Denied,
    Unsupported,
    TooManyRequests,
    /// Not in the spec's table, used by distribution for out-of-order chunks.
    RangeInvalid,
    /// Not in the spec's table, used by distribution for a bad `n`.
    PaginationNumberInvalid,
    /// Not in the spec's table, used by distribution for an invalid tag.
    TagInvalid,
    /// Not in the spec's table: the tag exists and the request asked to create it only if absent.
    TagExists,
    /// Not in the spec's table, used by distribution for internal failures (HTTP 500 or 503).
    Unknown,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 19] = [
        ErrorCode::BlobUnknown,
        ErrorCode::BlobUploadInvalid,
        ErrorCode::BlobUploadUnknown,
        ErrorCode::DigestInvalid,
        ErrorCode::ManifestBlobUnknown,
        ErrorCode::ManifestInvalid,
        ErrorCode::ManifestUnknown,
        ErrorCode::NameInvalid,
        ErrorCode::NameUnknown,
        ErrorCode::SizeInvalid,
        ErrorCode::Unauthorized,
        ErrorCode::Denied,
        ErrorCode::Unsupported,
        ErrorCode::TooManyRequests,
        ErrorCode::RangeInvalid,
        ErrorCode::PaginationNumberInvalid,
        ErrorCode::TagInvalid,
        ErrorCode::TagExists,
        ErrorCode::Unknown,
    ];

    /// The code as it appears in error bodies.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BlobUnknown => "BLOB_UNKNOWN",
            ErrorCode::BlobUploadInvalid => "BLOB_UPLOAD_INVALID",
            ErrorCode::BlobUploadUnknown => "BLOB_UPLOAD_UNKNOWN",
            ErrorCode::DigestInvalid => "DIGEST_INVALID",
            ErrorCode::ManifestBlobUnknown => "MANIFEST_BLOB_UNKNOWN",
            ErrorCode::ManifestInvalid => "MANIFEST_INVALID",
            ErrorCode::ManifestUnknown => "MANIFEST_UNKNOWN",
            ErrorCode::NameInvalid => "NAME_INVALID",
            ErrorCode::NameUnknown => "NAME_UNKNOWN",
            ErrorCode::SizeInvalid => "SIZE_INVALID",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::Denied => "DENIED",
            ErrorCode::Unsupported => "UNSUPPORTED",
            ErrorCode::TooManyRequests => "TOOMANYREQUESTS",
            ErrorCode::RangeInvalid => "RANGE_INVALID",
            ErrorCode::PaginationNumberInvalid => "PAGINATION_NUMBER_INVALID",
            ErrorCode::TagInvalid => "TAG_INVALID",
            ErrorCode::TagExists => "TAG_EXISTS",
            ErrorCode::Unknown => "UNKNOWN",
        }
    }

    /// The HTTP status this code is answered with unless the caller overrides it.
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::BlobUnknown
            | ErrorCode::BlobUploadUnknown
            | ErrorCode::ManifestUnknown
            | ErrorCode::NameUnknown => 404,
            ErrorCode::BlobUploadInvalid
            | ErrorCode::DigestInvalid
            | ErrorCode::ManifestBlobUnknown
            | ErrorCode::ManifestInvalid
            | ErrorCode::NameInvalid
            | ErrorCode::SizeInvalid
            | ErrorCode::PaginationNumberInvalid
            | ErrorCode::TagInvalid => 400,
            ErrorCode::Unauthorized => 401,
            ErrorCode::Denied => 403,
            ErrorCode::Unsupported => 405,
            ErrorCode::TagExists => 412,
            ErrorCode::RangeInvalid => 416,
            ErrorCode::TooManyRequests => 429,
            ErrorCode::Unknown => 500,
        }
    }

    /// A generic message for the code.
    pub fn default_message(self) -> &'static str {
        match self {
            ErrorCode::BlobUnknown => "blob unknown to registry",
            ErrorCode::BlobUploadInvalid => "blob upload invalid",
            ErrorCode::BlobUploadUnknown => "blob upload unknown to registry",
            ErrorCode::DigestInvalid => "provided digest did not match uploaded content",
            ErrorCode::ManifestBlobUnknown => "manifest references a blob unknown to the registry",
            ErrorCode::ManifestInvalid => "manifest invalid",
            ErrorCode::ManifestUnknown => "manifest unknown to registry",
            ErrorCode::NameInvalid => "invalid repository name",
            ErrorCode::NameUnknown => "repository name not known to registry",
            ErrorCode::SizeInvalid => "provided length did not match content length",
            ErrorCode::Unauthorized => "authentication required",
            ErrorCode::Denied => "requested access to the resource is denied",
            ErrorCode::Unsupported => "the operation is unsupported",
            ErrorCode::TooManyRequests => "too many requests",
            ErrorCode::RangeInvalid => "invalid content range",
            ErrorCode::PaginationNumberInvalid => "invalid number of results requested",
            ErrorCode::TagInvalid => "invalid tag",
            ErrorCode::TagExists => "tag already exists",
            ErrorCode::Unknown => "internal error",
        }
    }
}

/// One protocol error: code, message, optional detail, and the status to answer with.
#[derive(Debug, Clone, PartialEq)]
pub struct OciError {
    pub code: ErrorCode,
    pub message: String,
    pub detail: Option<serde_json::Value>,
    pub status: u16,
}

impl OciError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        OciError {
            code,
            message: message.into(),
            detail: None,
            status: code.status(),
        }
    }

    /// The code with its default message.
    pub fn code(code: ErrorCode) -> Self {
        OciError::new(code, code.default_message())
    }

    pub fn with_detail(mut self, detail: serde_json::Value) -> Self {
        self.detail = Some(detail);
        self
    }

    /// Answer with `status` instead of the code's default (e.g. 413 for an oversized manifest).
    pub fn with_status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }

    /// The JSON error body.
    pub fn body(&self) -> String {
        #[derive(Serialize)]
        struct Item<'a> {
            code: &'a str,
            message: &'a str,
            #[serde(skip_serializing_if = "Option::is_none")]
            detail: Option<&'a serde_json::Value>,
        }
        #[derive(Serialize)]
        struct Body<'a> {
            errors: [Item<'a>; 1],
        }
        serde_json::to_string(&Body {
            errors: [Item {
                code: self.code.as_str(),
                message: &self.message,
                detail: self.detail.as_ref(),
            }],
        })
        .unwrap_or_else(|_| {
            String::from(r#"{"errors":[{"code":"UNKNOWN","message":"internal error"}]}"#)
        })
    }
}

impl std::fmt::Display for OciError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ({}): {}",
            self.code.as_str(),
            self.status,
            self.message
        )
    }
}

impl std::error::Error for OciError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_codes_have_spec_statuses() {
        let table = [
            ("BLOB_UNKNOWN", 404),
            ("BLOB_UPLOAD_INVALID", 400),
            ("BLOB_UPLOAD_UNKNOWN", 404),
            ("DIGEST_INVALID", 400),
            ("MANIFEST_BLOB_UNKNOWN", 400),
            ("MANIFEST_INVALID", 400),
            ("MANIFEST_UNKNOWN", 404),
            ("NAME_INVALID", 400),
            ("NAME_UNKNOWN", 404),
            ("SIZE_INVALID", 400),
            ("UNAUTHORIZED", 401),
            ("DENIED", 403),
            ("UNSUPPORTED", 405),
            ("TOOMANYREQUESTS", 429),
        ];
        for (code, status) in table {
            let c = ErrorCode::ALL.iter().find(|c| c.as_str() == code).unwrap();
            assert_eq!(c.status(), status, "{code}");
        }
    }

    #[test]
    fn body_is_the_spec_shape() {
        let e = OciError::new(ErrorCode::DigestInvalid, "bad")
            .with_detail(serde_json::json!({"digest": "sha256:x"}));
        let v: serde_json::Value = serde_json::from_str(&e.body()).unwrap();
        assert_eq!(v["errors"][0]["code"], "DIGEST_INVALID");
        assert_eq!(v["errors"][0]["message"], "bad");
        assert_eq!(v["errors"][0]["detail"]["digest"], "sha256:x");
        let plain: serde_json::Value =
            serde_json::from_str(&OciError::code(ErrorCode::BlobUnknown).body()).unwrap();
        assert!(plain["errors"][0].get("detail").is_none());
    }
}
