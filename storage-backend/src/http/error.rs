//! The one place where errors become responses.

use crate::registry::Error;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use oci::{ErrorCode, OciError};

/// An error on its way to the client.
pub struct ApiError(pub Error);

impl<E: Into<Error>> From<E> for ApiError {
    fn from(e: E) -> Self {
        ApiError(e.into())
    }
}

impl From<oci::route::RouteError> for Error {
    fn from(e: oci::route::RouteError) -> Self {
        Error::Protocol(e.into())
    }
}

impl From<oci::request::RequestError> for Error {
    fn from(e: oci::request::RequestError) -> Self {
        Error::Protocol(e.into())
    }
}

/// Whether the store could not be reached at all (an object store down, a timeout): the
/// request may succeed later.
fn unreachable(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused
            | ConnectionReset
            | ConnectionAborted
            | NotConnected
            | TimedOut
            | BrokenPipe
            | HostUnreachable
            | NetworkUnreachable
            // Contention that did not settle (a tag pushed by very many at once).
            | ResourceBusy
    )
}

/// The OCI error body with its status.
pub(super) fn oci_response(e: &OciError) -> Response {
    let status = StatusCode::from_u16(e.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut resp = (status, e.body()).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    resp
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self.0 {
            Error::Protocol(e) => oci_response(&e),
            Error::UploadOffset { current, expected } => oci_response(&OciError::new(
                ErrorCode::RangeInvalid,
                format!(
                    "chunk starts at {expected} but the upload is at {current}; nothing was stored"
                ),
            )),
            Error::Storage(e) if unreachable(&e) => {
                tracing::error!(error = %e, "the store is unreachable");
                oci_response(
                    &OciError::new(ErrorCode::Unknown, "storage is unavailable, try again")
                        .with_status(503),
                )
            }
            Error::Storage(e) => {
                tracing::error!(error = %e, "storage failure");
                oci_response(&OciError::new(ErrorCode::Unknown, "internal storage error"))
            }
        }
    }
}
