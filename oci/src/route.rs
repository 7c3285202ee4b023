//! `method + path` → typed [`Endpoint`], for every endpoint of the distribution spec.
//!
//! Repository names contain slashes, so a path is read from its end: the last segments say
//! which endpoint it is (`…/manifests/<ref>`, `…/blobs/uploads/<id>`, `…/tags/list`, …) and
//! everything before them is the name. The path must be the raw request path without its
//! query; nothing is percent-decoded, so `%2f` or `%2e%2e` can never become a separator or a
//! parent directory (they are simply invalid name characters).

use crate::digest::{Digest, DigestError};
use crate::error::{ErrorCode, OciError};
use crate::name::{NameError, RepositoryName};
use crate::reference::{Reference, ReferenceError};

/// Longest accepted upload session id.
pub const MAX_UPLOAD_ID_LEN: usize = 128;

/// One endpoint of the distribution API, with its parsed parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// `GET /v2/`
    Base,
    /// `GET /v2/_catalog`
    Catalog,
    /// `GET /v2/<name>/tags/list`
    ListTags { name: RepositoryName },
    /// `GET|HEAD /v2/<name>/manifests/<reference>`
    GetManifest {
        name: RepositoryName,
        reference: Reference,
        head: bool,
    },
    /// `PUT /v2/<name>/manifests/<reference>`
    PutManifest {
        name: RepositoryName,
        reference: Reference,
    },
    /// `DELETE /v2/<name>/manifests/<reference>`
    DeleteManifest {
        name: RepositoryName,
        reference: Reference,
    },
    /// `GET|HEAD /v2/<name>/blobs/<digest>`
    GetBlob {
        name: RepositoryName,
        digest: Digest,
        head: bool,
    },
    /// `DELETE /v2/<name>/blobs/<digest>`
    DeleteBlob {
        name: RepositoryName,
        digest: Digest,
    },
    /// `POST /v2/<name>/blobs/uploads/` (session start, monolithic `?digest=`, or `?mount=`)
    StartUpload { name: RepositoryName },
    /// `GET /v2/<name>/blobs/uploads/<id>`
    UploadStatus { name: RepositoryName, id: String },
    /// `PATCH /v2/<name>/blobs/uploads/<id>`
    PatchUpload { name: RepositoryName, id: String },
    /// `PUT /v2/<name>/blobs/uploads/<id>?digest=`
    FinishUpload { name: RepositoryName, id: String },
    /// `DELETE /v2/<name>/blobs/uploads/<id>`
    CancelUpload { name: RepositoryName, id: String },
    /// `GET /v2/<name>/referrers/<digest>`
    Referrers {
        name: RepositoryName,
        digest: Digest,
    },
}

/// The scope action an endpoint needs (Docker token spec; see DESIGN.md §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Pull,
    Push,
    Delete,
    Catalog,
}

impl Endpoint {
    /// A short, stable name of the endpoint, for metric labels and logs.
    pub fn label(&self) -> &'static str {
        match self {
            Endpoint::Base => "base",
            Endpoint::Catalog => "catalog",
            Endpoint::ListTags { .. } => "tags_list",
            Endpoint::GetManifest { .. } => "manifest_get",
            Endpoint::PutManifest { .. } => "manifest_put",
            Endpoint::DeleteManifest { .. } => "manifest_delete",
            Endpoint::GetBlob { .. } => "blob_get",
            Endpoint::DeleteBlob { .. } => "blob_delete",
            Endpoint::StartUpload { .. } => "upload_start",
            Endpoint::UploadStatus { .. } => "upload_status",
            Endpoint::PatchUpload { .. } => "upload_patch",
            Endpoint::FinishUpload { .. } => "upload_finish",
            Endpoint::CancelUpload { .. } => "upload_cancel",
            Endpoint::Referrers { .. } => "referrers",
        }
    }

    /// The repository the endpoint works on, if any.
    pub fn repository(&self) -> Option<&RepositoryName> {
        match self {
            Endpoint::Base | Endpoint::Catalog => None,
            Endpoint::ListTags { name }
            | Endpoint::GetManifest { name, .. }
            | Endpoint::PutManifest { name, .. }
            | Endpoint::DeleteManifest { name, .. }
            | Endpoint::GetBlob { name, .. }
            | Endpoint::DeleteBlob { name, .. }
            | Endpoint::StartUpload { name }
            | Endpoint::UploadStatus { name, .. }
            | Endpoint::PatchUpload { name, .. }
            | Endpoint::FinishUpload { name, .. }
            | Endpoint::CancelUpload { name, .. }
            | Endpoint::Referrers { name, .. } => Some(name),
        }
    }

    /// The action it needs: reads pull, writes push, deletes delete, `_catalog` catalog.
    /// `None` for `/v2/` (any authenticated client).
    pub fn action(&self) -> Option<Action> {
        match self {
            Endpoint::Base => None,
            Endpoint::Catalog => Some(Action::Catalog),
            Endpoint::ListTags { .. }
            | Endpoint::GetManifest { .. }
            | Endpoint::GetBlob { .. }
            | Endpoint::Referrers { .. } => Some(Action::Pull),
            Endpoint::PutManifest { .. }
            | Endpoint::StartUpload { .. }
            | Endpoint::UploadStatus { .. }
            | Endpoint::PatchUpload { .. }
            | Endpoint::FinishUpload { .. }
            | Endpoint::CancelUpload { .. } => Some(Action::Push),
            Endpoint::DeleteManifest { .. } | Endpoint::DeleteBlob { .. } => Some(Action::Delete),
        }
    }
}

impl Endpoint {
    /// The path that names this endpoint (what [`parse_route`] reads back as it).
    pub fn path(&self) -> String {
        match self {
            Endpoint::Base => "/v2/".into(),
            Endpoint::Catalog => "/v2/_catalog".into(),
            Endpoint::ListTags { name } => format!("/v2/{name}/tags/list"),
            Endpoint::GetManifest {
                name, reference, ..
            }
            | Endpoint::PutManifest { name, reference }
            | Endpoint::DeleteManifest { name, reference } => {
                format!("/v2/{name}/manifests/{reference}")
            }
            Endpoint::GetBlob { name, digest, .. } | Endpoint::DeleteBlob { name, digest } => {
                format!("/v2/{name}/blobs/{digest}")
            }
            Endpoint::StartUpload { name } => format!("/v2/{name}/blobs/uploads/"),
            Endpoint::UploadStatus { name, id }
            | Endpoint::PatchUpload { name, id }
            | Endpoint::FinishUpload { name, id }
            | Endpoint::CancelUpload { name, id } => format!("/v2/{name}/blobs/uploads/{id}"),
            Endpoint::Referrers { name, digest } => format!("/v2/{name}/referrers/{digest}"),
        }
    }
}

/// Why a request maps to no endpoint.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    #[error("no such endpoint")]
    NotFound,
    #[error("method {0} is not allowed on this endpoint")]
    MethodNotAllowed(String),
    #[error(transparent)]
    Name(#[from] NameError),
    #[error(transparent)]
    Digest(#[from] DigestError),
    #[error(transparent)]
    Reference(ReferenceError),
    /// A `GET`/`HEAD` of a manifest by a reference that cannot name one: 404 as in
    /// distribution (whose routes do not match it) and the OCI conformance suite; a `PUT`
    /// with it is [`RouteError::Reference`], 400.
    #[error("manifest unknown: {0}")]
    UnknownReference(ReferenceError),
    #[error("upload id is invalid")]
    UploadId,
}

impl From<RouteError> for OciError {
    fn from(e: RouteError) -> Self {
        let msg = e.to_string();
        match e {
            RouteError::NotFound => OciError::new(ErrorCode::Unsupported, msg).with_status(404),
            RouteError::MethodNotAllowed(_) => OciError::new(ErrorCode::Unsupported, msg),
            RouteError::Name(_) => OciError::new(ErrorCode::NameInvalid, msg),
            RouteError::Digest(_) | RouteError::Reference(ReferenceError::Digest(_)) => {
                OciError::new(ErrorCode::DigestInvalid, msg)
            }
            RouteError::Reference(ReferenceError::BadTag(_)) => {
                OciError::new(ErrorCode::TagInvalid, msg)
            }
            RouteError::UnknownReference(_) => OciError::new(ErrorCode::ManifestUnknown, msg),
            RouteError::UploadId => OciError::new(ErrorCode::BlobUploadUnknown, msg),
        }
    }
}

enum Shape<'a> {
    Base,
    Catalog,
    Tags(&'a str),
    Manifest(&'a str, &'a str),
    Blob(&'a str, &'a str),
    UploadStart(&'a str),
    Upload(&'a str, &'a str),
    Referrers(&'a str, &'a str),
}

fn shape(path: &str) -> Option<Shape<'_>> {
    let rest = path.strip_prefix("/v2")?;
    if rest.is_empty() || rest == "/" {
        return Some(Shape::Base);
    }
    let rest = rest.strip_prefix('/')?;
    if rest == "_catalog" {
        return Some(Shape::Catalog);
    }
    if let Some(name) = rest.strip_suffix("/tags/list") {
        return Some(Shape::Tags(name));
    }
    if let Some(name) = rest
        .strip_suffix("/blobs/uploads")
        .or_else(|| rest.strip_suffix("/blobs/uploads/"))
    {
        return Some(Shape::UploadStart(name));
    }
    let (head, last) = rest.rsplit_once('/')?;
    let (name, kind) = head.rsplit_once('/')?;
    match kind {
        "manifests" => Some(Shape::Manifest(name, last)),
        "blobs" => Some(Shape::Blob(name, last)),
        "referrers" => Some(Shape::Referrers(name, last)),
        "uploads" => head
            .strip_suffix("/blobs/uploads")
            .map(|name| Shape::Upload(name, last)),
        _ => None,
    }
}

fn upload_id(id: &str) -> Result<String, RouteError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_UPLOAD_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(id.to_owned())
    } else {
        Err(RouteError::UploadId)
    }
}

/// Maps a request to its endpoint. `path` is the raw path without the query string.
pub fn parse_route(method: &str, path: &str) -> Result<Endpoint, RouteError> {
    let shape = shape(path).ok_or(RouteError::NotFound)?;
    let name = |n: &str| RepositoryName::parse(n).map_err(RouteError::from);
    let bad_method = || {
        Err(RouteError::MethodNotAllowed(
            method.chars().take(16).collect(),
        ))
    };
    let head = method == "HEAD";
    Ok(match shape {
        Shape::Base => match method {
            "GET" | "HEAD" => Endpoint::Base,
            _ => return bad_method(),
        },
        Shape::Catalog => match method {
            "GET" => Endpoint::Catalog,
            _ => return bad_method(),
        },
        Shape::Tags(n) => match method {
            "GET" => Endpoint::ListTags { name: name(n)? },
            _ => return bad_method(),
        },
        Shape::Manifest(n, r) => {
            let name = name(n)?;
            let reference = Reference::parse(r).map_err(|e| match method {
                "GET" | "HEAD" => RouteError::UnknownReference(e),
                _ => RouteError::Reference(e),
            })?;
            match method {
                "GET" | "HEAD" => Endpoint::GetManifest {
                    name,
                    reference,
                    head,
                },
                "PUT" => Endpoint::PutManifest { name, reference },
                "DELETE" => Endpoint::DeleteManifest { name, reference },
                _ => return bad_method(),
            }
        }
        Shape::Blob(n, d) => {
            let name = name(n)?;
            let digest = Digest::parse(d)?;
            match method {
                "GET" | "HEAD" => Endpoint::GetBlob { name, digest, head },
                "DELETE" => Endpoint::DeleteBlob { name, digest },
                _ => return bad_method(),
            }
        }
        Shape::UploadStart(n) => match method {
            "POST" => Endpoint::StartUpload { name: name(n)? },
            _ => return bad_method(),
        },
        Shape::Upload(n, id) => {
            let name = name(n)?;
            let id = upload_id(id)?;
            match method {
                "GET" => Endpoint::UploadStatus { name, id },
                "PATCH" => Endpoint::PatchUpload { name, id },
                "PUT" => Endpoint::FinishUpload { name, id },
                "DELETE" => Endpoint::CancelUpload { name, id },
                _ => return bad_method(),
            }
        }
        Shape::Referrers(n, d) => {
            let name = name(n)?;
            let digest = Digest::parse(d)?;
            match method {
                "GET" => Endpoint::Referrers { name, digest },
                _ => return bad_method(),
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn ok(method: &str, path: &str) -> Endpoint {
        parse_route(method, path).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    }

    #[test]
    fn every_endpoint_is_recognised() {
        let cases: Vec<(&str, String, &str, Option<&str>)> = vec![
            ("GET", "/v2/".into(), "Base", None),
            ("GET", "/v2".into(), "Base", None),
            ("GET", "/v2/_catalog".into(), "Catalog", None),
            (
                "GET",
                "/v2/a/b/c/tags/list".into(),
                "ListTags",
                Some("a/b/c"),
            ),
            (
                "GET",
                "/v2/a/manifests/latest".into(),
                "GetManifest",
                Some("a"),
            ),
            (
                "HEAD",
                format!("/v2/a/b/manifests/{D}"),
                "GetManifest",
                Some("a/b"),
            ),
            ("PUT", "/v2/a/manifests/v1".into(), "PutManifest", Some("a")),
            (
                "DELETE",
                "/v2/a/manifests/v1".into(),
                "DeleteManifest",
                Some("a"),
            ),
            ("GET", format!("/v2/x/y/blobs/{D}"), "GetBlob", Some("x/y")),
            (
                "DELETE",
                format!("/v2/x/blobs/{D}"),
                "DeleteBlob",
                Some("x"),
            ),
            (
                "POST",
                "/v2/x/blobs/uploads/".into(),
                "StartUpload",
                Some("x"),
            ),
            (
                "POST",
                "/v2/x/blobs/uploads".into(),
                "StartUpload",
                Some("x"),
            ),
            (
                "GET",
                "/v2/x/blobs/uploads/abc-123".into(),
                "UploadStatus",
                Some("x"),
            ),
            (
                "PATCH",
                "/v2/x/blobs/uploads/abc".into(),
                "PatchUpload",
                Some("x"),
            ),
            (
                "PUT",
                "/v2/x/blobs/uploads/abc".into(),
                "FinishUpload",
                Some("x"),
            ),
            (
                "DELETE",
                "/v2/x/blobs/uploads/abc".into(),
                "CancelUpload",
                Some("x"),
            ),
            (
                "GET",
                format!("/v2/x/referrers/{D}"),
                "Referrers",
                Some("x"),
            ),
            // Names may themselves contain the endpoint words.
            (
                "GET",
                "/v2/blobs/manifests/manifests/tags".into(),
                "GetManifest",
                Some("blobs/manifests"),
            ),
            (
                "GET",
                "/v2/tags/list/tags/list".into(),
                "ListTags",
                Some("tags/list"),
            ),
        ];
        for (method, path, kind, name) in cases {
            let ep = ok(method, &path);
            let dbg = format!("{ep:?}");
            assert!(dbg.starts_with(kind), "{method} {path} → {dbg}");
            assert_eq!(ep.repository().map(|n| n.as_str()), name, "{path}");
        }
    }

    #[test]
    fn actions_follow_the_method() {
        assert_eq!(ok("GET", "/v2/a/manifests/t").action(), Some(Action::Pull));
        assert_eq!(
            ok("HEAD", &format!("/v2/a/blobs/{D}")).action(),
            Some(Action::Pull)
        );
        assert_eq!(
            ok("PATCH", "/v2/a/blobs/uploads/u").action(),
            Some(Action::Push)
        );
        assert_eq!(
            ok("DELETE", "/v2/a/manifests/t").action(),
            Some(Action::Delete)
        );
        assert_eq!(ok("GET", "/v2/_catalog").action(), Some(Action::Catalog));
        assert_eq!(ok("GET", "/v2/").action(), None);
    }

    #[test]
    fn rejections() {
        let long = format!("/v2/{}/manifests/latest", "a".repeat(256));
        let cases: Vec<(&str, String, ErrorCode, u16)> = vec![
            ("GET", "/v1/".into(), ErrorCode::Unsupported, 404),
            ("GET", "/v2/a".into(), ErrorCode::Unsupported, 404),
            ("GET", "/v2/a/unknown/x".into(), ErrorCode::Unsupported, 404),
            ("POST", "/v2/".into(), ErrorCode::Unsupported, 405),
            (
                "POST",
                "/v2/a/manifests/t".into(),
                ErrorCode::Unsupported,
                405,
            ),
            (
                "PUT",
                format!("/v2/a/blobs/{D}"),
                ErrorCode::Unsupported,
                405,
            ),
            (
                "DELETE",
                "/v2/a/tags/list".into(),
                ErrorCode::Unsupported,
                405,
            ),
            (
                "GET",
                "/v2/../manifests/t".into(),
                ErrorCode::NameInvalid,
                400,
            ),
            (
                "GET",
                "/v2/a/../b/manifests/t".into(),
                ErrorCode::NameInvalid,
                400,
            ),
            (
                "GET",
                "/v2/%2e%2e/manifests/t".into(),
                ErrorCode::NameInvalid,
                400,
            ),
            (
                "GET",
                "/v2/a%2fb/manifests/t".into(),
                ErrorCode::NameInvalid,
                400,
            ),
            (
                "GET",
                "/v2/Upper/manifests/t".into(),
                ErrorCode::NameInvalid,
                400,
            ),
            (
                "GET",
                "/v2//a/manifests/t".into(),
                ErrorCode::NameInvalid,
                400,
            ),
            (
                "GET",
                "/v2/a//b/manifests/t".into(),
                ErrorCode::NameInvalid,
                400,
            ),
            ("GET", long, ErrorCode::NameInvalid, 400),
            (
                "GET",
                "/v2/a/manifests/.bad".into(),
                ErrorCode::ManifestUnknown,
                404,
            ),
            (
                "HEAD",
                "/v2/a/manifests/.INVALID_MANIFEST_NAME".into(),
                ErrorCode::ManifestUnknown,
                404,
            ),
            (
                "PUT",
                "/v2/a/manifests/.bad".into(),
                ErrorCode::TagInvalid,
                400,
            ),
            (
                "GET",
                "/v2/a/manifests/sha256:123".into(),
                ErrorCode::ManifestUnknown,
                404,
            ),
            (
                "DELETE",
                "/v2/a/manifests/sha256:123".into(),
                ErrorCode::DigestInvalid,
                400,
            ),
            (
                "GET",
                "/v2/a/blobs/latest".into(),
                ErrorCode::DigestInvalid,
                400,
            ),
            (
                "GET",
                "/v2/a/blobs/md5:d41d8cd98f00b204e9800998ecf8427e".into(),
                ErrorCode::DigestInvalid,
                400,
            ),
            (
                "GET",
                "/v2/a/referrers/nope".into(),
                ErrorCode::DigestInvalid,
                400,
            ),
            (
                "PATCH",
                "/v2/a/blobs/uploads/..".into(),
                ErrorCode::BlobUploadUnknown,
                404,
            ),
            (
                "PATCH",
                "/v2/a/blobs/uploads/a%2f".into(),
                ErrorCode::BlobUploadUnknown,
                404,
            ),
        ];
        for (method, path, code, status) in cases {
            let err: OciError = parse_route(method, &path).unwrap_err().into();
            assert_eq!((err.code, err.status), (code, status), "{method} {path}");
        }
    }
}
