//! Manifests and indexes pushed by clients (JSON, with or without a Content-Type): never a
//! panic; an accepted manifest's blob references are valid digests.
#![no_main]

use libfuzzer_sys::fuzz_target;

const TYPES: [Option<&str>; 6] = [
    None,
    Some("application/vnd.oci.image.manifest.v1+json"),
    Some("application/vnd.oci.image.index.v1+json"),
    Some("application/vnd.docker.distribution.manifest.v2+json"),
    Some("application/vnd.docker.distribution.manifest.list.v2+json"),
    Some("application/json; charset=utf-8"),
];

fuzz_target!(|data: &[u8]| {
    let Some((&t, body)) = data.split_first() else {
        return;
    };
    let content_type = TYPES[t as usize % TYPES.len()];
    if let Ok(m) = oci::media_type::parse_manifest(content_type, body) {
        for d in m.blob_references() {
            assert!(oci::Digest::parse(&d.digest.to_string()).is_ok());
        }
        let _ = m.effective_artifact_type();
    }
    let _ = oci::media_type::detect_media_type(body);
});
