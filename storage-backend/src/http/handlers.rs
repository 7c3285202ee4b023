//! One function per endpoint, reached through [`dispatch`], which parses the request with
//! [`oci::request::parse`] — the same parse the gateway authorized it with.

use super::metrics::EndpointLabel;
use super::{AppState, content_length};
use crate::driver::ByteStream;
use crate::http::ApiError;
use crate::registry::{Error, ManifestPut};
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header, request::Parts};
use axum::response::{IntoResponse, Response};
use futures_util::{StreamExt, TryStreamExt};
use oci::media_type::OCI_INDEX;
use oci::range::{RangeRequest, parse_content_range, resolve_range};
use oci::request::{Mount, Params, Request};
use oci::{Digest, Endpoint, ErrorCode, OciError, Reference, RepositoryName};
use std::sync::Arc;

type Result<T = Response> = std::result::Result<T, ApiError>;

pub(super) async fn dispatch(
    State(st): State<Arc<AppState>>,
    req: axum::extract::Request,
) -> Response {
    let (parts, body) = req.into_parts();
    let request =
        match oci::request::parse(parts.method.as_str(), parts.uri.path(), parts.uri.query()) {
            Ok(r) => r,
            Err(e) => return ApiError::from(e).into_response(),
        };
    let label = request.endpoint.label();
    let mut resp = handle(&st, request, &parts, body)
        .await
        .unwrap_or_else(IntoResponse::into_response);
    resp.extensions_mut().insert(EndpointLabel(label));
    resp
}

async fn handle(st: &AppState, request: Request, parts: &Parts, body: Body) -> Result {
    let query = request.params;
    let h = &parts.headers;
    match request.endpoint {
        Endpoint::Base => Ok(json_response(
            StatusCode::OK,
            "{}".into(),
            "application/json",
        )),
        Endpoint::Catalog => catalog(st, &query).await,
        Endpoint::ListTags { name } => list_tags(st, &name, &query).await,
        Endpoint::GetManifest {
            name,
            reference,
            head,
        } => get_manifest(st, &name, &reference, h, head).await,
        Endpoint::PutManifest { name, reference } => {
            put_manifest(st, &name, &reference, h, body).await
        }
        Endpoint::DeleteManifest { name, reference } => {
            deletes_allowed(st)?;
            let protection = protection(h)?;
            let overridden = match &reference {
                Reference::Digest(d) => {
                    st.registry
                        .delete_manifest_protected(&name, d, protection.as_ref())
                        .await?
                }
                Reference::Tag(_) => {
                    st.registry.delete_manifest(&name, &reference, None).await?;
                    None
                }
            };
            Ok(deleted(overridden))
        }
        Endpoint::GetBlob { name, digest, head } => get_blob(st, &name, &digest, h, head).await,
        Endpoint::DeleteBlob { name, digest } => {
            deletes_allowed(st)?;
            let protection = protection(h)?;
            let overridden = st
                .registry
                .delete_blob_protected(&name, &digest, protection.as_ref())
                .await?;
            Ok(deleted(overridden))
        }
        Endpoint::StartUpload { name } => start_upload(st, &name, &query, h, body).await,
        Endpoint::UploadStatus { name, id } => {
            let state = st.registry.upload_state(&name, &id).await?;
            Ok(upload_response(
                StatusCode::NO_CONTENT,
                &name,
                &id,
                state.size,
            ))
        }
        Endpoint::PatchUpload { name, id } => patch_upload(st, &name, &id, h, body).await,
        Endpoint::FinishUpload { name, id } => finish_upload(st, &name, &id, &query, h, body).await,
        Endpoint::CancelUpload { name, id } => {
            st.registry.cancel_upload(&name, &id).await?;
            Ok(empty(StatusCode::NO_CONTENT))
        }
        Endpoint::Referrers { name, digest } => referrers(st, &name, &digest, &query).await,
    }
}

/// The immutability rules the gateway sent with a DELETE ([`super::PROTECTION_HEADER`]). One
/// that does not parse refuses the delete: storage never guesses there were none.
fn protection(h: &HeaderMap) -> Result<Option<policy::immutability::CompiledProtection>> {
    let Some(v) = h.get(super::PROTECTION_HEADER) else {
        return Ok(None);
    };
    let invalid = |e: String| -> ApiError {
        OciError::new(
            ErrorCode::Unsupported,
            format!("the immutability rules sent with the request are invalid: {e}"),
        )
        .with_status(400)
        .into()
    };
    let p: policy::immutability::Protection =
        serde_json::from_slice(v.as_bytes()).map_err(|e| invalid(e.to_string()))?;
    p.compile().map(Some).map_err(|e| invalid(e.to_string()))
}

/// 202 for a delete; says which immutable tag it overrode, if any (for the gateway's audit).
fn deleted(overridden: crate::registry::Overridden) -> Response {
    let mut r = empty(StatusCode::ACCEPTED);
    if let Some(o) = overridden {
        r.headers_mut().insert(
            super::OVERRIDDEN_HEADER,
            hv(&format!("{} (policy line {})", o.tag, o.by.line)),
        );
    }
    r
}

fn hv(s: &str) -> HeaderValue {
    HeaderValue::from_str(s).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

fn empty(status: StatusCode) -> Response {
    let mut r = status.into_response();
    r.headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    r
}

fn json_response(status: StatusCode, body: String, content_type: &str) -> Response {
    let mut r = (status, body).into_response();
    r.headers_mut()
        .insert(header::CONTENT_TYPE, hv(content_type));
    r
}

fn deletes_allowed(st: &AppState) -> Result<()> {
    if st.delete_enabled {
        Ok(())
    } else {
        Err(OciError::new(
            ErrorCode::Unsupported,
            "deletes are disabled on this registry",
        )
        .into())
    }
}

fn body_stream(body: Body) -> ByteStream {
    body.into_data_stream()
        .map_err(std::io::Error::other)
        .boxed()
}

/// Whether the request has a body to read (announced length > 0, or chunked).
fn has_body(h: &HeaderMap) -> bool {
    content_length(h) > 0 || h.contains_key(header::TRANSFER_ENCODING)
}

fn declared_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
}

fn upload_location(name: &RepositoryName, id: &str) -> String {
    format!("/v2/{name}/blobs/uploads/{id}")
}

/// 202/204 for a session: `Location`, `Range: 0-<last byte>`, `Docker-Upload-UUID`.
fn upload_response(status: StatusCode, name: &RepositoryName, id: &str, size: u64) -> Response {
    let mut r = empty(status);
    let h = r.headers_mut();
    h.insert(header::LOCATION, hv(&upload_location(name, id)));
    h.insert(header::RANGE, hv(&format!("0-{}", size.saturating_sub(1))));
    h.insert("docker-upload-uuid", hv(id));
    r
}

fn blob_created(name: &RepositoryName, digest: &Digest) -> Response {
    let mut r = empty(StatusCode::CREATED);
    let h = r.headers_mut();
    h.insert(header::LOCATION, hv(&format!("/v2/{name}/blobs/{digest}")));
    h.insert("docker-content-digest", hv(&digest.to_string()));
    r
}

/// A failed chunk: 416 with where the upload really is, so the client can resume.
fn offset_error(e: ApiError, name: &RepositoryName, id: &str) -> Response {
    if let Error::UploadOffset { current, .. } = e.0 {
        let mut r = e.into_response();
        let h = r.headers_mut();
        h.insert(header::LOCATION, hv(&upload_location(name, id)));
        h.insert(
            header::RANGE,
            hv(&format!("0-{}", current.saturating_sub(1))),
        );
        h.insert("docker-upload-uuid", hv(id));
        return r;
    }
    e.into_response()
}

async fn start_upload(
    st: &AppState,
    name: &RepositoryName,
    q: &Params,
    h: &HeaderMap,
    body: Body,
) -> Result {
    let reg = &st.registry;
    if let Some(Mount { digest, from }) = &q.mount {
        if let Some(from) = from
            && reg.mount_blob(name, from, digest).await?
        {
            return Ok(blob_created(name, digest));
        }
        // Not mountable: an ordinary session, as the spec asks.
        let id = reg.start_upload(name).await?;
        return Ok(upload_response(StatusCode::ACCEPTED, name, &id, 0));
    }
    if let Some(digest) = &q.digest {
        // Monolithic upload in one request.
        let id = reg.start_upload(name).await?;
        let stored = async {
            reg.append_upload(name, &id, body_stream(body), None, declared_length(h))
                .await?;
            reg.finish_upload(name, &id, digest).await
        }
        .await;
        if let Err(e) = stored {
            let _ = reg.cancel_upload(name, &id).await;
            return Err(e.into());
        }
        return Ok(blob_created(name, digest));
    }
    let id = reg.start_upload(name).await?;
    Ok(upload_response(StatusCode::ACCEPTED, name, &id, 0))
}

fn content_range(h: &HeaderMap) -> Result<Option<(u64, u64)>> {
    let Some(v) = h.get(header::CONTENT_RANGE) else {
        return Ok(None);
    };
    let parsed = v.to_str().ok().and_then(parse_content_range);
    match parsed {
        Some(r) => Ok(Some(r)),
        None => Err(OciError::new(
            ErrorCode::RangeInvalid,
            "Content-Range must be <start>-<end> with start <= end",
        )
        .into()),
    }
}

async fn patch_upload(
    st: &AppState,
    name: &RepositoryName,
    id: &str,
    h: &HeaderMap,
    body: Body,
) -> Result {
    let range = content_range(h)?;
    match st
        .registry
        .append_upload(name, id, body_stream(body), range, declared_length(h))
        .await
    {
        Ok(state) => Ok(upload_response(StatusCode::ACCEPTED, name, id, state.size)),
        Err(e) => Ok(offset_error(e.into(), name, id)),
    }
}

async fn finish_upload(
    st: &AppState,
    name: &RepositoryName,
    id: &str,
    q: &Params,
    h: &HeaderMap,
    body: Body,
) -> Result {
    let digest = q.digest.clone().ok_or_else(|| {
        OciError::new(
            ErrorCode::DigestInvalid,
            "the digest query parameter is required",
        )
    })?;
    if has_body(h) {
        let range = content_range(h)?;
        if let Err(e) = st
            .registry
            .append_upload(name, id, body_stream(body), range, declared_length(h))
            .await
        {
            return Ok(offset_error(e.into(), name, id));
        }
    }
    st.registry.finish_upload(name, id, &digest).await?;
    Ok(blob_created(name, &digest))
}

async fn get_blob(
    st: &AppState,
    name: &RepositoryName,
    digest: &Digest,
    h: &HeaderMap,
    head: bool,
) -> Result {
    let meta = st.registry.blob_meta(name, digest).await?;
    let size = meta.size;
    let range = if head {
        RangeRequest::Full
    } else {
        resolve_range(h.get(header::RANGE).and_then(|v| v.to_str().ok()), size)
    };
    let (status, start, len) = match range {
        RangeRequest::Full => (StatusCode::OK, 0, size),
        RangeRequest::Partial { start, end } => {
            (StatusCode::PARTIAL_CONTENT, start, end - start + 1)
        }
        RangeRequest::Unsatisfiable => {
            let e = OciError::new(
                ErrorCode::RangeInvalid,
                format!("range not satisfiable: the blob has {size} bytes"),
            )
            .with_status(416);
            let mut r = super::error::oci_response(&e);
            r.headers_mut()
                .insert(header::CONTENT_RANGE, hv(&format!("bytes */{size}")));
            return Ok(r);
        }
    };
    let body = if head {
        Body::empty()
    } else {
        Body::from_stream(st.registry.blob_reader(digest, start, len).await?)
    };
    let mut r = Response::new(body);
    *r.status_mut() = status;
    let hm = r.headers_mut();
    hm.insert(header::CONTENT_LENGTH, hv(&len.to_string()));
    hm.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    hm.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    hm.insert("docker-content-digest", hv(&digest.to_string()));
    hm.insert(header::ETAG, hv(&format!("\"{digest}\"")));
    hm.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("max-age=31536000"),
    );
    if status == StatusCode::PARTIAL_CONTENT {
        hm.insert(
            header::CONTENT_RANGE,
            hv(&format!("bytes {start}-{}/{size}", start + len - 1)),
        );
    }
    Ok(r)
}

/// Whether `Accept` admits `media_type` ([`oci::media_type::accepts`]).
fn accepts(h: &HeaderMap, media_type: &str) -> bool {
    let values = h.get_all(header::ACCEPT);
    oci::media_type::accepts(values.iter().filter_map(|v| v.to_str().ok()), media_type)
}

async fn get_manifest(
    st: &AppState,
    name: &RepositoryName,
    reference: &Reference,
    h: &HeaderMap,
    head: bool,
) -> Result {
    let m = st.registry.get_manifest(name, reference).await?;
    // A digest names exact bytes, so it is served whatever Accept says.
    if matches!(reference, Reference::Tag(_)) && !accepts(h, &m.media_type) {
        return Err(OciError::new(
            ErrorCode::ManifestUnknown,
            format!(
                "manifest {reference} is a {}, which the Accept header does not allow",
                m.media_type
            ),
        )
        .into());
    }
    let len = m.body.len();
    let mut r = if head {
        Response::new(Body::empty())
    } else {
        Response::new(Body::from(m.body))
    };
    let hm = r.headers_mut();
    hm.insert(header::CONTENT_TYPE, hv(&m.media_type));
    hm.insert(header::CONTENT_LENGTH, hv(&len.to_string()));
    hm.insert("docker-content-digest", hv(&m.digest.to_string()));
    hm.insert(header::ETAG, hv(&format!("\"{}\"", m.digest)));
    Ok(r)
}

async fn put_manifest(
    st: &AppState,
    name: &RepositoryName,
    reference: &Reference,
    h: &HeaderMap,
    body: Body,
) -> Result {
    let max = st.registry.options().max_manifest_bytes;
    let too_large = || -> ApiError {
        OciError::new(
            ErrorCode::ManifestInvalid,
            format!("manifest is larger than the limit of {max} bytes"),
        )
        .with_status(413)
        .into()
    };
    if declared_length(h).is_some_and(|n| n > max as u64) {
        drain(body).await;
        return Err(too_large());
    }
    let mut body = body.into_data_stream();
    let mut bytes = Vec::new();
    while let Some(chunk) = body.next().await {
        match chunk {
            Ok(c) if bytes.len() + c.len() > max => {
                drain(Body::from_stream(body)).await;
                return Err(too_large());
            }
            Ok(c) => bytes.extend_from_slice(&c),
            Err(e) => {
                return Err(OciError::new(
                    ErrorCode::ManifestInvalid,
                    format!("request body ended early: {e}"),
                )
                .into());
            }
        }
    }
    let bytes = bytes::Bytes::from(bytes);
    let create_tag_only = h
        .get(header::IF_NONE_MATCH)
        .is_some_and(|v| v.as_bytes().trim_ascii() == b"*");
    let (digest, parsed, previous) = st
        .registry
        .put_manifest(ManifestPut {
            name,
            reference,
            content_type: h.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()),
            body: bytes,
            create_tag_only,
            cached_copy: h.contains_key(super::CACHED_COPY_HEADER),
        })
        .await?;
    let mut r = empty(StatusCode::CREATED);
    let hm = r.headers_mut();
    hm.insert(
        header::LOCATION,
        hv(&format!("/v2/{name}/manifests/{digest}")),
    );
    hm.insert("docker-content-digest", hv(&digest.to_string()));
    if let Some(subject) = parsed.subject {
        hm.insert("oci-subject", hv(&subject.digest.to_string()));
    }
    if let Some(p) = previous {
        hm.insert(super::PREVIOUS_DIGEST_HEADER, hv(&p.to_string()));
    }
    Ok(r)
}

/// Reads and discards what is left of a refused body, up to a bound, so the client reads
/// our error instead of a reset connection; beyond the bound the connection is closed.
async fn drain(body: Body) {
    const DRAIN_LIMIT: usize = 16 << 20;
    let mut left = DRAIN_LIMIT;
    let mut s = body.into_data_stream();
    while let Some(Ok(c)) = s.next().await {
        if c.len() >= left {
            return;
        }
        left -= c.len();
    }
}

fn next_link(path: &str, n: Option<usize>, last: Option<&String>) -> Option<HeaderValue> {
    let (n, last) = (n?, last?);
    let last: String = form_urlencoded::byte_serialize(last.as_bytes()).collect();
    Some(hv(&format!("<{path}?n={n}&last={last}>; rel=\"next\"")))
}

async fn list_tags(st: &AppState, name: &RepositoryName, q: &Params) -> Result {
    let n = q.n;
    let page = st.registry.list_tags(name, n, q.last.as_deref()).await?;
    let body = serde_json::json!({ "name": name.as_str(), "tags": page.items }).to_string();
    let mut r = json_response(StatusCode::OK, body, "application/json");
    if page.more
        && let Some(link) = next_link(&format!("/v2/{name}/tags/list"), n, page.items.last())
    {
        r.headers_mut().insert(header::LINK, link);
    }
    Ok(r)
}

async fn catalog(st: &AppState, q: &Params) -> Result {
    let n = q.n;
    let page = st.registry.catalog(n, q.last.as_deref()).await?;
    let body = serde_json::json!({ "repositories": page.items }).to_string();
    let mut r = json_response(StatusCode::OK, body, "application/json");
    if page.more
        && let Some(link) = next_link("/v2/_catalog", n, page.items.last())
    {
        r.headers_mut().insert(header::LINK, link);
    }
    Ok(r)
}

async fn referrers(st: &AppState, name: &RepositoryName, subject: &Digest, q: &Params) -> Result {
    let filter = q.artifact_type.as_deref();
    let manifests = st.registry.referrers(name, subject, filter).await?;
    let body = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": manifests,
    })
    .to_string();
    let mut r = json_response(StatusCode::OK, body, OCI_INDEX);
    if filter.is_some() {
        r.headers_mut().insert(
            "oci-filters-applied",
            HeaderValue::from_static("artifactType"),
        );
    }
    Ok(r)
}
