//! The storage layout: one closed set of keys, one mapping to paths.
//!
//! It is distribution's (registry:2) filesystem layout, so an existing registry:2 root can be
//! served as it is and the reverse:
//!
//! ```text
//! <root>/docker/registry/v2/
//! ├── blobs/<alg>/<hex[0..2]>/<hex>/data                 blob and manifest content, once
//! └── repositories/<name>/
//!     ├── _layers/<alg>/<hex>/link                        "<alg>:<hex>": blob is in the repo
//!     ├── _manifests/revisions/<alg>/<hex>/link           manifest is in the repo
//!     ├── _manifests/tags/<tag>/current/link              what the tag points to
//!     ├── _manifests/tags/<tag>/index/<alg>/<hex>/link    every digest the tag pointed to
//!     ├── _uploads/<id>/data                              upload session content so far
//!     ├── _uploads/<id>/startedat                         RFC 3339 start time
//!     ├── _referrers/<alg>/<subject-hex>/<alg>/<hex>/link our addition: manifests whose
//!     │                                                   `subject` is <subject>
//!     ├── _manifests/_pulled/<alg>/<hex>                  our addition: unix seconds of the
//!     │                                                   manifest's last pull told
//!     ├── _manifests/_tagged/<alg>/<hex>/<tag>            our addition: the tag pointed to
//!     │                                                   <hex> at some time (empty)
//!     └── _manifests/_parents/<alg>/<hex>/<alg>-<hex>     our addition: an index that
//!                                                         lists <hex> (empty)
//! ```
//!
//! The first pull a gateway tells of adds `<root>/docker/registry/v2/_pulls/since`
//! (`registry::pulls`). Garbage collection adds `<root>/docker/registry/v2/_gc/lease` (one run
//! at a time) and,
//! while it sweeps, a marker `gc` next to the `data` or `link` of what it condemned
//! (`registry::gc`); distribution ignores both.
//!
//! Directories starting with `_` are never repository name components (the name grammar
//! forbids a leading `_`), which is what lets names contain slashes.

use oci::{Algorithm, Digest, RepositoryName, Tag};

/// Every object the registry stores.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key<'a> {
    /// All blob content (a prefix: `<alg>/<hex[0..2]>/<hex>/data` under it).
    Blobs,
    /// Content of a blob or manifest.
    Blob(&'a Digest),
    /// All repositories (a prefix).
    Repositories,
    /// One repository (a prefix).
    Repository(&'a RepositoryName),
    LayerLink(&'a RepositoryName, &'a Digest),
    RevisionLink(&'a RepositoryName, &'a Digest),
    /// A repository's tags (a prefix whose children are tag names).
    Tags(&'a RepositoryName),
    /// One tag (a prefix).
    Tag(&'a RepositoryName, &'a Tag),
    TagCurrentLink(&'a RepositoryName, &'a Tag),
    TagIndexLink(&'a RepositoryName, &'a Tag, &'a Digest),
    /// All upload sessions of a repository (a prefix).
    Uploads(&'a RepositoryName),
    /// One upload session (a prefix).
    Upload(&'a RepositoryName, &'a str),
    UploadData(&'a RepositoryName, &'a str),
    UploadStartedAt(&'a RepositoryName, &'a str),
    /// Manifests referring to a subject (a prefix).
    Referrers(&'a RepositoryName, &'a Digest),
    ReferrerLink(&'a RepositoryName, &'a Digest, &'a Digest),
    /// A repository's manifest revisions of one algorithm (a prefix whose children are hex
    /// digests).
    Revisions(&'a RepositoryName, Algorithm),
    /// Markers of the tags that pointed to a manifest (a prefix whose children are tag
    /// names): `registry::reverse`.
    Tagged(&'a RepositoryName, &'a Digest),
    TaggedMarker(&'a RepositoryName, &'a Digest, &'a Tag),
    /// Markers of the indexes that list a manifest (a prefix whose children are
    /// `<alg>-<hex>`): `registry::reverse`.
    Parents(&'a RepositoryName, &'a Digest),
    /// The marker of `.2`, an index listing `.1`.
    ParentMarker(&'a RepositoryName, &'a Digest, &'a Digest),
    /// When a manifest was last pulled, as gateways tell it (`registry::pulls`).
    PulledAt(&'a RepositoryName, &'a Digest),
    /// When the store was first told of a pull (`registry::pulls`).
    PullsSince,
    /// The garbage collector's lease: one run at a time across the nodes on a store.
    GcLease,
}

/// The garbage collector's marker of an object (`…/data` or `…/link`): `…/gc`, next to it,
/// deleted with it.
pub fn gc_marker(object: &str) -> String {
    match object.rsplit_once('/') {
        Some((dir, _)) => format!("{dir}/gc"),
        None => "gc".into(),
    }
}

const V2: &str = "docker/registry/v2";

impl Key<'_> {
    /// The key's path relative to the storage root, always with `/` separators.
    pub fn path(&self) -> String {
        fn repo(n: &RepositoryName) -> String {
            format!("{V2}/repositories/{n}")
        }
        fn ah(d: &Digest) -> String {
            format!("{}/{}", d.algorithm(), d.hex())
        }
        match self {
            Key::Blob(d) => format!(
                "{V2}/blobs/{}/{}/{}/data",
                d.algorithm(),
                &d.hex()[..2],
                d.hex()
            ),
            Key::Blobs => format!("{V2}/blobs"),
            Key::Repositories => format!("{V2}/repositories"),
            Key::Repository(n) => repo(n),
            Key::LayerLink(n, d) => format!("{}/_layers/{}/link", repo(n), ah(d)),
            Key::RevisionLink(n, d) => format!("{}/_manifests/revisions/{}/link", repo(n), ah(d)),
            Key::Tags(n) => format!("{}/_manifests/tags", repo(n)),
            Key::Tag(n, t) => format!("{}/_manifests/tags/{t}", repo(n)),
            Key::TagCurrentLink(n, t) => format!("{}/_manifests/tags/{t}/current/link", repo(n)),
            Key::TagIndexLink(n, t, d) => {
                format!("{}/_manifests/tags/{t}/index/{}/link", repo(n), ah(d))
            }
            Key::Uploads(n) => format!("{}/_uploads", repo(n)),
            Key::Upload(n, id) => format!("{}/_uploads/{id}", repo(n)),
            Key::UploadData(n, id) => format!("{}/_uploads/{id}/data", repo(n)),
            Key::UploadStartedAt(n, id) => format!("{}/_uploads/{id}/startedat", repo(n)),
            Key::Referrers(n, s) => format!("{}/_referrers/{}", repo(n), ah(s)),
            Key::ReferrerLink(n, s, r) => {
                format!("{}/_referrers/{}/{}/link", repo(n), ah(s), ah(r))
            }
            Key::Tagged(n, d) => format!("{}/_manifests/_tagged/{}", repo(n), ah(d)),
            Key::TaggedMarker(n, d, t) => {
                format!("{}/_manifests/_tagged/{}/{t}", repo(n), ah(d))
            }
            Key::Revisions(n, alg) => format!("{}/_manifests/revisions/{alg}", repo(n)),
            Key::Parents(n, d) => format!("{}/_manifests/_parents/{}", repo(n), ah(d)),
            Key::ParentMarker(n, d, p) => format!(
                "{}/_manifests/_parents/{}/{}-{}",
                repo(n),
                ah(d),
                p.algorithm(),
                p.hex()
            ),
            Key::PulledAt(n, d) => format!("{}/_manifests/_pulled/{}", repo(n), ah(d)),
            Key::GcLease => format!("{V2}/_gc/lease"),
            Key::PullsSince => format!("{V2}/_pulls/since"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn golden_paths() {
        let n = RepositoryName::parse("team/app").unwrap();
        let t = Tag::parse("v1").unwrap();
        let d = Digest::parse(
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
        )
        .unwrap();
        let s = Digest::parse(&format!("sha512:{}", "ab".repeat(64))).unwrap();
        let h = d.hex();
        let sh = s.hex();
        let r = "docker/registry/v2/repositories/team/app";
        let cases: Vec<(Key<'_>, String)> = vec![
            (
                Key::Blob(&d),
                format!("docker/registry/v2/blobs/sha256/e3/{h}/data"),
            ),
            (
                Key::Blob(&s),
                format!("docker/registry/v2/blobs/sha512/ab/{sh}/data"),
            ),
            (Key::Blobs, "docker/registry/v2/blobs".into()),
            (Key::Repositories, "docker/registry/v2/repositories".into()),
            (Key::Repository(&n), r.into()),
            (
                Key::LayerLink(&n, &d),
                format!("{r}/_layers/sha256/{h}/link"),
            ),
            (
                Key::RevisionLink(&n, &d),
                format!("{r}/_manifests/revisions/sha256/{h}/link"),
            ),
            (Key::Tags(&n), format!("{r}/_manifests/tags")),
            (Key::Tag(&n, &t), format!("{r}/_manifests/tags/v1")),
            (
                Key::TagCurrentLink(&n, &t),
                format!("{r}/_manifests/tags/v1/current/link"),
            ),
            (
                Key::TagIndexLink(&n, &t, &d),
                format!("{r}/_manifests/tags/v1/index/sha256/{h}/link"),
            ),
            (Key::Uploads(&n), format!("{r}/_uploads")),
            (Key::Upload(&n, "u1"), format!("{r}/_uploads/u1")),
            (Key::UploadData(&n, "u1"), format!("{r}/_uploads/u1/data")),
            (
                Key::UploadStartedAt(&n, "u1"),
                format!("{r}/_uploads/u1/startedat"),
            ),
            (
                Key::Referrers(&n, &s),
                format!("{r}/_referrers/sha512/{sh}"),
            ),
            (
                Key::ReferrerLink(&n, &s, &d),
                format!("{r}/_referrers/sha512/{sh}/sha256/{h}/link"),
            ),
            (
                Key::Tagged(&n, &d),
                format!("{r}/_manifests/_tagged/sha256/{h}"),
            ),
            (
                Key::TaggedMarker(&n, &d, &t),
                format!("{r}/_manifests/_tagged/sha256/{h}/v1"),
            ),
            (
                Key::Revisions(&n, oci::Algorithm::Sha512),
                format!("{r}/_manifests/revisions/sha512"),
            ),
            (
                Key::Parents(&n, &s),
                format!("{r}/_manifests/_parents/sha512/{sh}"),
            ),
            (
                Key::ParentMarker(&n, &s, &d),
                format!("{r}/_manifests/_parents/sha512/{sh}/sha256-{h}"),
            ),
            (
                Key::PulledAt(&n, &d),
                format!("{r}/_manifests/_pulled/sha256/{h}"),
            ),
            (Key::PullsSince, "docker/registry/v2/_pulls/since".into()),
        ];
        for (key, want) in cases {
            assert_eq!(key.path(), want, "{key:?}");
        }
    }
}
