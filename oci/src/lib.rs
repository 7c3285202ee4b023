//! The OCI distribution protocol vocabulary, parsed in exactly one place.
//!
//! This crate is pure: no I/O, no async, no clock. Both the gateway and the storage
//! service use it so that a digest, a repository name, a reference, a route or an error
//! body means the same thing on both sides of the internal hop.
//!
//! ```
//! use oci::route::{parse_route, Endpoint};
//! let ep = parse_route("GET", "/v2/team/app/manifests/v1.0").unwrap();
//! assert!(matches!(ep, Endpoint::GetManifest { .. }));
//! ```
//!
//! Modules:
//! - [`digest`]: `sha256:`/`sha512:` digests and a streaming [`digest::Verifier`].
//! - [`name`]: repository names per the distribution-spec grammar.
//! - [`reference`]: tags and tag-or-digest references.
//! - [`media_type`]: manifest media types and manifest validation.
//! - [`route`]: `method + path` → typed [`route::Endpoint`].
//! - [`request`]: `method + path + query` → the one [`request::Request`] both services act on.
//! - [`range`]: `Range` and `Content-Range` headers.
//! - [`error`]: OCI error codes, their HTTP status and the JSON error body.

pub mod digest;
pub mod error;
pub mod media_type;
pub mod name;
pub mod range;
pub mod reference;
pub mod request;
pub mod route;
pub mod scope;

pub use digest::{Algorithm, Digest, Verifier};
pub use error::{ErrorCode, OciError};
pub use name::RepositoryName;
pub use reference::{Reference, Tag};
pub use route::{Endpoint, parse_route};
