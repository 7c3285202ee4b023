//! The internal hop between a gateway and a storage node: the headers only the two speak.
//! The gateway strips a client's copies of every one of them.

/// Request: the internal secret that authenticates the gateway to storage.
pub const INTERNAL_SECRET_HEADER: &str = "portcullis-internal-secret";
/// Response, on a manifest PUT that moved an existing tag: the digest the tag pointed to
/// before (for the gateway's audit event; the gateway strips it).
pub const PREVIOUS_DIGEST_HEADER: &str = "portcullis-previous-digest";
/// Request, on a DELETE by digest or of a blob: the repository's immutability rules as JSON
/// (`policy::immutability::Protection`), which storage enforces against its tags.
pub const PROTECTION_HEADER: &str = "portcullis-protection";
/// Response, on a delete that went ahead over an immutable tag (break-glass): which tag (for
/// the gateway's audit event; the gateway strips it).
pub const OVERRIDDEN_HEADER: &str = "portcullis-immutable-overridden";
/// Request, on a manifest PUT: the manifest is a pull-through cache's copy of an upstream's,
/// stored before the blobs and manifests it refers to (each fetched when a client asks for
/// it), so storage does not require them to be present.
pub const CACHED_COPY_HEADER: &str = "portcullis-cached-copy";
