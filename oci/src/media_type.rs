//! Manifest media types and manifest validation.
//!
//! [`parse_manifest`] checks what a registry must check before storing a manifest: well-formed
//! JSON of a supported schema, a `mediaType` consistent with the request's `Content-Type`, and
//! well-formed descriptors. Whether the referenced blobs exist is the storage's business; this
//! module lists them ([`ParsedManifest::blob_references`], [`ParsedManifest::manifests`]).

use crate::digest::Digest;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const OCI_ARTIFACT_MANIFEST: &str = "application/vnd.oci.artifact.manifest.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const OCI_EMPTY: &str = "application/vnd.oci.empty.v1+json";
/// An `Accept` header for every manifest type a registry may hold.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.oci.artifact.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// The manifest schemas the registry stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ManifestKind {
    OciManifest,
    OciIndex,
    OciArtifact,
    DockerManifest,
    DockerManifestList,
}

impl ManifestKind {
    pub const ALL: [ManifestKind; 5] = [
        ManifestKind::OciManifest,
        ManifestKind::OciIndex,
        ManifestKind::OciArtifact,
        ManifestKind::DockerManifest,
        ManifestKind::DockerManifestList,
    ];

    pub fn media_type(self) -> &'static str {
        match self {
            ManifestKind::OciManifest => OCI_MANIFEST,
            ManifestKind::OciIndex => OCI_INDEX,
            ManifestKind::OciArtifact => OCI_ARTIFACT_MANIFEST,
            ManifestKind::DockerManifest => DOCKER_MANIFEST,
            ManifestKind::DockerManifestList => DOCKER_MANIFEST_LIST,
        }
    }

    pub fn from_media_type(mt: &str) -> Option<Self> {
        let mt = essence(mt);
        ManifestKind::ALL.into_iter().find(|k| k.media_type() == mt)
    }

    /// Whether this kind lists other manifests (an index / manifest list).
    pub fn is_index(self) -> bool {
        matches!(
            self,
            ManifestKind::OciIndex | ManifestKind::DockerManifestList
        )
    }
}

/// The media type without parameters (`; charset=…`), trimmed, lowercase.
pub fn essence(mt: &str) -> String {
    mt.split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase()
}

/// A content descriptor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Value>,
}

/// Why a manifest is refused (all answered as `MANIFEST_INVALID`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is not valid JSON: {0}")]
    Json(String),
    #[error("manifest schemaVersion must be 2 (schema 1 is not supported)")]
    SchemaVersion,
    #[error("unsupported manifest media type {0:?}")]
    UnsupportedMediaType(String),
    #[error("manifest mediaType {field:?} does not match Content-Type {header:?}")]
    MediaTypeMismatch { field: String, header: String },
    #[error("cannot tell the manifest's media type: send Content-Type or a mediaType field")]
    UnknownKind,
    #[error("manifest field {field}: {reason}")]
    Field { field: String, reason: String },
}

/// What the registry needs to know of a validated manifest.
#[derive(Debug, Clone, PartialEq)]
pub struct ParsedManifest {
    pub kind: ManifestKind,
    pub config: Option<Descriptor>,
    /// `layers` of an image manifest, `blobs` of an artifact manifest.
    pub layers: Vec<Descriptor>,
    /// Children of an index / manifest list.
    pub manifests: Vec<Descriptor>,
    pub subject: Option<Descriptor>,
    pub artifact_type: Option<String>,
    pub annotations: Option<Map<String, Value>>,
}

impl ParsedManifest {
    /// The digests of the manifests an index lists (none for an image manifest).
    pub fn children(&self) -> Vec<Digest> {
        self.manifests.iter().map(|m| m.digest.clone()).collect()
    }

    /// Blobs the manifest references (config and layers), which must exist in the repository.
    pub fn blob_references(&self) -> impl Iterator<Item = &Descriptor> {
        self.config.iter().chain(self.layers.iter())
    }

    /// The artifact type reported for this manifest as a referrer: `artifactType`, else the
    /// config's media type (distribution-spec "Listing Referrers").
    pub fn effective_artifact_type(&self) -> Option<String> {
        self.artifact_type
            .clone()
            .or_else(|| self.config.as_ref().map(|c| c.media_type.clone()))
    }
}

/// Validates a manifest pushed with `content_type` (the request header, if any).
pub fn parse_manifest(
    content_type: Option<&str>,
    body: &[u8],
) -> Result<ParsedManifest, ManifestError> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| ManifestError::Json(e.to_string()))?;
    let Value::Object(obj) = value else {
        return Err(ManifestError::Json("top level is not an object".into()));
    };
    if obj.get("schemaVersion").and_then(Value::as_u64) != Some(2) {
        return Err(ManifestError::SchemaVersion);
    }
    let field_mt = match obj.get("mediaType") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(_) => {
            return Err(field_err("mediaType", "must be a string"));
        }
    };
    let header_kind = match content_type.map(essence).filter(|h| !h.is_empty()) {
        None => None,
        Some(h) => Some(
            ManifestKind::from_media_type(&h)
                .ok_or(ManifestError::UnsupportedMediaType(h.clone()))?,
        ),
    };
    let field_kind = match &field_mt {
        None => None,
        Some(f) => Some(
            ManifestKind::from_media_type(f)
                .ok_or_else(|| ManifestError::UnsupportedMediaType(f.clone()))?,
        ),
    };
    let kind = match (header_kind, field_kind) {
        (Some(h), Some(f)) if h != f => {
            return Err(ManifestError::MediaTypeMismatch {
                field: f.media_type().into(),
                header: h.media_type().into(),
            });
        }
        (Some(k), _) | (None, Some(k)) => k,
        (None, None) => infer_kind(&obj).ok_or(ManifestError::UnknownKind)?,
    };

    let mut parsed = ParsedManifest {
        kind,
        config: None,
        layers: Vec::new(),
        manifests: Vec::new(),
        subject: optional_descriptor(&obj, "subject")?,
        artifact_type: optional_string(&obj, "artifactType")?,
        annotations: match obj.get("annotations") {
            None | Some(Value::Null) => None,
            Some(Value::Object(m)) => Some(m.clone()),
            Some(_) => return Err(field_err("annotations", "must be an object")),
        },
    };
    match kind {
        ManifestKind::OciManifest | ManifestKind::DockerManifest => {
            parsed.config = Some(
                optional_descriptor(&obj, "config")?
                    .ok_or_else(|| field_err("config", "is required"))?,
            );
            parsed.layers = descriptor_list(&obj, "layers", kind == ManifestKind::DockerManifest)?;
        }
        ManifestKind::OciArtifact => {
            parsed.layers = descriptor_list(&obj, "blobs", false)?;
        }
        ManifestKind::OciIndex | ManifestKind::DockerManifestList => {
            parsed.manifests = descriptor_list(&obj, "manifests", true)?;
        }
    }
    Ok(parsed)
}

/// Whether the `Accept` header values `accept` admit `media_type` (a tag's manifest is
/// answered only then): no `Accept`, `*/*` and `application/*` admit all.
pub fn accepts<'a>(accept: impl IntoIterator<Item = &'a str>, media_type: &str) -> bool {
    let mut any = false;
    for v in accept {
        for item in v.split(',') {
            let essence = essence(item);
            if essence.is_empty() {
                continue;
            }
            any = true;
            if essence == "*/*" || essence == "application/*" || essence == media_type {
                return true;
            }
        }
    }
    !any
}

/// The media type to answer a stored manifest with: its `mediaType` field, else inferred from
/// its shape (OCI manifests may omit the field).
pub fn detect_media_type(body: &[u8]) -> String {
    let Ok(Value::Object(obj)) = serde_json::from_slice::<Value>(body) else {
        return OCI_MANIFEST.into();
    };
    if let Some(Value::String(mt)) = obj.get("mediaType") {
        return mt.clone();
    }
    infer_kind(&obj)
        .unwrap_or(ManifestKind::OciManifest)
        .media_type()
        .into()
}

fn infer_kind(obj: &Map<String, Value>) -> Option<ManifestKind> {
    if obj.contains_key("manifests") {
        Some(ManifestKind::OciIndex)
    } else if obj.contains_key("config") {
        Some(ManifestKind::OciManifest)
    } else {
        None
    }
}

fn field_err(field: &str, reason: &str) -> ManifestError {
    ManifestError::Field {
        field: field.into(),
        reason: reason.into(),
    }
}

fn optional_string(obj: &Map<String, Value>, key: &str) -> Result<Option<String>, ManifestError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(field_err(key, "must be a string")),
    }
}

fn optional_descriptor(
    obj: &Map<String, Value>,
    key: &str,
) -> Result<Option<Descriptor>, ManifestError> {
    match obj.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => descriptor(v, key).map(Some),
    }
}

fn descriptor(v: &Value, field: &str) -> Result<Descriptor, ManifestError> {
    serde_json::from_value(v.clone())
        .map_err(|e| field_err(field, &format!("invalid descriptor: {e}")))
}

fn descriptor_list(
    obj: &Map<String, Value>,
    key: &str,
    required: bool,
) -> Result<Vec<Descriptor>, ManifestError> {
    match obj.get(key) {
        None | Some(Value::Null) if !required => Ok(Vec::new()),
        None | Some(Value::Null) => Err(field_err(key, "is required")),
        Some(Value::Array(items)) => items
            .iter()
            .enumerate()
            .map(|(i, v)| descriptor(v, &format!("{key}[{i}]")))
            .collect(),
        Some(_) => Err(field_err(key, "must be an array")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn d(seed: &str) -> Value {
        let dg = Digest::of(crate::Algorithm::Sha256, seed.as_bytes());
        json!({"mediaType": "application/octet-stream", "digest": dg.to_string(), "size": seed.len()})
    }

    fn image(mt: Option<&str>) -> Vec<u8> {
        let mut v = json!({"schemaVersion": 2, "config": d("c"), "layers": [d("l1"), d("l2")]});
        if let Some(mt) = mt {
            v["mediaType"] = json!(mt);
        }
        serde_json::to_vec(&v).unwrap()
    }

    #[test]
    fn accepted_manifests() {
        let index = serde_json::to_vec(
            &json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [d("m")]}),
        )
        .unwrap();
        let list = serde_json::to_vec(
            &json!({"schemaVersion": 2, "mediaType": DOCKER_MANIFEST_LIST, "manifests": []}),
        )
        .unwrap();
        let artifact = serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_ARTIFACT_MANIFEST, "artifactType": "x/y", "blobs": [d("b")], "subject": d("s")})).unwrap();
        let cases: Vec<(Option<&str>, Vec<u8>, ManifestKind)> = vec![
            (
                Some(OCI_MANIFEST),
                image(Some(OCI_MANIFEST)),
                ManifestKind::OciManifest,
            ),
            (Some(OCI_MANIFEST), image(None), ManifestKind::OciManifest),
            (None, image(None), ManifestKind::OciManifest),
            (
                Some(DOCKER_MANIFEST),
                image(Some(DOCKER_MANIFEST)),
                ManifestKind::DockerManifest,
            ),
            (
                Some("application/vnd.docker.distribution.manifest.v2+json; charset=utf-8"),
                image(Some(DOCKER_MANIFEST)),
                ManifestKind::DockerManifest,
            ),
            (Some(OCI_INDEX), index.clone(), ManifestKind::OciIndex),
            (None, index, ManifestKind::OciIndex),
            (
                Some(DOCKER_MANIFEST_LIST),
                list,
                ManifestKind::DockerManifestList,
            ),
            (
                Some(OCI_ARTIFACT_MANIFEST),
                artifact,
                ManifestKind::OciArtifact,
            ),
        ];
        for (ct, body, kind) in cases {
            let p = parse_manifest(ct, &body).unwrap_or_else(|e| panic!("{ct:?}: {e}"));
            assert_eq!(p.kind, kind);
        }
        let p = parse_manifest(None, &image(None)).unwrap();
        assert_eq!(p.blob_references().count(), 3);
    }

    #[test]
    fn rejected_manifests() {
        let bad_digest = serde_json::to_vec(&json!({"schemaVersion": 2, "config": {"mediaType": "a", "digest": "sha256:zz", "size": 1}, "layers": []})).unwrap();
        let neg_size = serde_json::to_vec(&json!({"schemaVersion": 2, "config": {"mediaType": "a", "digest": Digest::of(crate::Algorithm::Sha256, b"").to_string(), "size": -1}, "layers": []})).unwrap();
        let no_config = serde_json::to_vec(
            &json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "layers": []}),
        )
        .unwrap();
        let layers_obj =
            serde_json::to_vec(&json!({"schemaVersion": 2, "config": d("c"), "layers": {}}))
                .unwrap();
        let index_no_list =
            serde_json::to_vec(&json!({"schemaVersion": 2, "mediaType": OCI_INDEX})).unwrap();
        let cases: Vec<(&str, Option<&str>, Vec<u8>)> = vec![
            ("not json", Some(OCI_MANIFEST), b"{not json".to_vec()),
            ("array", Some(OCI_MANIFEST), b"[]".to_vec()),
            (
                "schema 1",
                Some(OCI_MANIFEST),
                br#"{"schemaVersion":1}"#.to_vec(),
            ),
            (
                "no schema",
                Some(OCI_MANIFEST),
                br#"{"config":{}}"#.to_vec(),
            ),
            (
                "header vs field",
                Some(DOCKER_MANIFEST),
                image(Some(OCI_MANIFEST)),
            ),
            ("unknown content type", Some("text/plain"), image(None)),
            ("unknown field type", None, image(Some("application/x-foo"))),
            ("no kind", None, br#"{"schemaVersion":2}"#.to_vec()),
            ("bad digest", None, bad_digest),
            ("negative size", None, neg_size),
            ("no config", Some(OCI_MANIFEST), no_config),
            ("layers not array", None, layers_obj),
            ("index without manifests", None, index_no_list),
        ];
        for (name, ct, body) in cases {
            assert!(parse_manifest(ct, &body).is_err(), "{name}");
        }
    }

    #[test]
    fn detected_media_type_falls_back_to_shape() {
        assert_eq!(
            detect_media_type(&image(Some(DOCKER_MANIFEST))),
            DOCKER_MANIFEST
        );
        assert_eq!(detect_media_type(&image(None)), OCI_MANIFEST);
        assert_eq!(
            detect_media_type(br#"{"schemaVersion":2,"manifests":[]}"#),
            OCI_INDEX
        );
    }
}
