//! A `/v2/` request on its way to storage and its answer on the way back, as the bearer
//! check decided ([`Forward`]): the internal secret and the protection rules set (a client's
//! copies dropped), the authorized URI instead of the client's, the answer's hop headers
//! read into the audit event, and an immutable tag's 412 turned into the 403 clients show.

use crate::audit::request::Operation;
use crate::registry::authz::Forward;
use bytes::Bytes;
use pingora::http::{RequestHeader, ResponseHeader};
use pingora::{Error, ErrorType, Result};
use service::hop::{
    CACHED_COPY_HEADER, INTERNAL_SECRET_HEADER, OVERRIDDEN_HEADER, PREVIOUS_DIGEST_HEADER,
    PROTECTION_HEADER,
};

/// Rewrites the request storage gets. Reads `forward` without taking from it: Pingora runs
/// this again when it retries the request on another connection.
pub fn request(
    forward: &Forward,
    upstream: &mut RequestHeader,
    secret: &str,
    client: Option<String>,
) -> Result<()> {
    upstream.remove_header(INTERNAL_SECRET_HEADER);
    upstream.insert_header(INTERNAL_SECRET_HEADER, secret)?;
    // Only the gateway speaks for policy: a client's copy never reaches storage. Nor does
    // the client's token: storage has no use for it.
    upstream.remove_header(PROTECTION_HEADER);
    upstream.remove_header(CACHED_COPY_HEADER);
    upstream.remove_header("authorization");
    if let Some(p) = &forward.protection {
        upstream.insert_header(PROTECTION_HEADER, p.as_str())?;
    }
    // A client's own `If-None-Match: *` passes through (it only restricts).
    if forward.create_tag_only {
        upstream.insert_header("if-none-match", "*")?;
    }
    // Storage gets the request as it was authorized, never the client's URI; a request
    // that reached here without one was not authorized (fail closed).
    let Some(uri) = forward.uri.clone() else {
        return Err(Error::explain(
            ErrorType::InternalError,
            "request forwarded without an authorized URI",
        ));
    };
    upstream.set_uri(uri);
    if let Some(ip) = client {
        let xff = match upstream
            .headers
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
        {
            Some(prev) => format!("{prev}, {ip}"),
            None => ip,
        };
        upstream.insert_header("x-forwarded-for", xff)?;
    }
    Ok(())
}

/// Reads storage's answer into `op` and rewrites it for the client; a replacement body
/// when the answer's own must not reach the client.
pub fn response(
    forward: &Forward,
    resp: &mut ResponseHeader,
    op: &mut Operation,
) -> Result<Option<Bytes>> {
    op.previous_digest = resp
        .headers
        .get(PREVIOUS_DIGEST_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    resp.remove_header(PREVIOUS_DIGEST_HEADER);
    if let Some(tag) = resp.remove_header(OVERRIDDEN_HEADER) {
        let tag = tag.to_str().unwrap_or("?").to_owned();
        tracing::warn!(subject = %forward.subject, tag = %tag, "override-immutable used to delete");
        op.break_glass = true;
        op.reason = Some(format!("override of the immutable tag {tag}"));
    }
    if forward.protection.is_some() && resp.status.as_u16() == 403 {
        op.immutable_denied = true;
        op.reason = Some("refused by tag immutability".into());
    }
    op.digest = resp
        .headers
        .get("docker-content-digest")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    if forward.create_tag_only && resp.status.as_u16() == 412 {
        let tag = forward.tag.clone().unwrap_or_default();
        op.immutable_denied = true;
        op.reason = Some(format!("tag {tag} is immutable and already exists"));
        let body = oci::OciError::new(
            oci::ErrorCode::Denied,
            format!("tag {tag} is immutable and already exists; push a new tag instead"),
        )
        .body();
        resp.set_status(403)?;
        resp.insert_header("content-length", body.len().to_string())?;
        resp.insert_header("content-type", "application/json")?;
        return Ok(Some(Bytes::from(body)));
    }
    Ok(None)
}
