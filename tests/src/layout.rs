//! Writes a registry in distribution's layout (`docker/registry/v2/…`) directly, without
//! pushes: blobs and the links that make repositories, manifests and tags. So a test or
//! `regbench --scale` fills thousands of repositories in seconds, and storage-backend and
//! distribution serve the very same directory.
//!
//! Every repository gets the same small image ([`Layout::image`]), or one of its own
//! ([`Layout::own_image`]: a million distinct blobs for a GC at scale). Each blob's `data`
//! holds content whose sha256 is its digest, so whatever reads it (a pull, a GC that checks
//! sizes, a manifest parsed for its references) sees a consistent store.

use oci::Digest;
use std::path::{Path, PathBuf};

/// A registry root being written.
pub struct Layout {
    v2: PathBuf,
    /// The one image every repository gets: its manifest, config and layer blobs.
    manifest: Digest,
    config: Digest,
    layer: Digest,
}

fn write(path: &Path, data: &[u8]) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    std::fs::write(path, data)
}

fn hex(d: &Digest) -> &str {
    d.hex()
}

fn write_blob(v2: &Path, d: &Digest, data: &[u8]) -> std::io::Result<()> {
    let h = hex(d);
    write(&v2.join(format!("blobs/sha256/{}/{h}/data", &h[..2])), data)
}

/// What [`write_image`] stored: the manifest's digest, and its config's and layers', in
/// order.
struct ImageBlobs {
    manifest: Digest,
    blobs: Vec<Digest>,
}

/// An image manifest of `config` and `layers` (their content), its blob and theirs.
fn write_image(v2: &Path, config: &[u8], layers: &[Vec<u8>]) -> std::io::Result<ImageBlobs> {
    let descriptor = |media_type: &str, data: &[u8]| {
        serde_json::json!({"mediaType": media_type,
                           "digest": crate::client::sha256(data).to_string(),
                           "size": data.len()})
    };
    let manifest = serde_json::json!({
        "schemaVersion": 2,
        "mediaType": crate::client::OCI_MANIFEST,
        "config": descriptor("application/vnd.oci.image.config.v1+json", config),
        "layers": layers.iter()
            .map(|l| descriptor("application/vnd.oci.image.layer.v1.tar", l))
            .collect::<Vec<_>>(),
    })
    .to_string();
    let mut blobs = Vec::with_capacity(layers.len() + 1);
    for data in std::iter::once(config).chain(layers.iter().map(Vec::as_slice)) {
        let d = crate::client::sha256(data);
        write_blob(v2, &d, data)?;
        blobs.push(d);
    }
    let manifest_digest = crate::client::sha256(manifest.as_bytes());
    write_blob(v2, &manifest_digest, manifest.as_bytes())?;
    Ok(ImageBlobs {
        manifest: manifest_digest,
        blobs,
    })
}

impl Layout {
    /// Starts a layout under `root` with one small image's blobs.
    pub fn new(root: &Path) -> anyhow::Result<Layout> {
        let v2 = root.join("docker/registry/v2");
        let config =
            br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
        let layer = b"layer of the scale layout".to_vec();
        let image = write_image(&v2, config, &[layer])?;
        Ok(Layout {
            v2,
            manifest: image.manifest,
            config: image.blobs[0].clone(),
            layer: image.blobs[1].clone(),
        })
    }

    /// The digest of the manifest every image of this layout has.
    pub fn manifest(&self) -> &Digest {
        &self.manifest
    }

    fn repo(&self, name: &str) -> PathBuf {
        self.v2.join("repositories").join(name)
    }

    fn link(&self, path: PathBuf, d: &Digest) -> std::io::Result<()> {
        write(&path, d.to_string().as_bytes())
    }

    /// A repository with an image of its own: a config and `layers` layers no other
    /// repository holds (a few bytes each, made from `name`), their layer links and the
    /// manifest, tagged `tag`. Without a tag, the repository holds the blobs and their
    /// layer links only (a push that never sent its manifest): all `layers + 2` blobs are
    /// garbage. Returns the digest of the manifest.
    pub fn own_image(
        &self,
        name: &str,
        layers: usize,
        tag: Option<&str>,
    ) -> std::io::Result<Digest> {
        let config = format!(
            r#"{{"architecture":"amd64","os":"linux","config":{{"Labels":{{"repository":"{name}"}}}},"rootfs":{{"type":"layers","diff_ids":[]}}}}"#
        );
        let layers: Vec<Vec<u8>> = (0..layers)
            .map(|i| format!("layer {i} of {name}").into_bytes())
            .collect();
        let image = write_image(&self.v2, config.as_bytes(), &layers)?;
        let repo = self.repo(name);
        for d in &image.blobs {
            self.link(repo.join(format!("_layers/sha256/{}/link", hex(d))), d)?;
        }
        if let Some(tag) = tag {
            let m = &image.manifest;
            self.link(
                repo.join(format!("_manifests/revisions/sha256/{}/link", hex(m))),
                m,
            )?;
            self.tag_to(name, tag, m)?;
        }
        Ok(image.manifest)
    }

    /// A repository that holds only the image's blobs (a layer pushed, no manifest yet).
    pub fn blobs_only(&self, name: &str) -> std::io::Result<()> {
        for d in [&self.config, &self.layer] {
            self.link(
                self.repo(name)
                    .join(format!("_layers/sha256/{}/link", hex(d))),
                d,
            )?;
        }
        Ok(())
    }

    /// A repository with the image, tagged with each of `tags`.
    pub fn image(&self, name: &str, tags: &[String]) -> std::io::Result<()> {
        self.blobs_only(name)?;
        let m = &self.manifest;
        let repo = self.repo(name);
        self.link(
            repo.join(format!("_manifests/revisions/sha256/{}/link", hex(m))),
            m,
        )?;
        for t in tags {
            self.tag(name, t)?;
        }
        Ok(())
    }

    /// Points `tag` of `name` at the image.
    pub fn tag(&self, name: &str, tag: &str) -> std::io::Result<()> {
        self.tag_to(name, tag, &self.manifest)
    }

    fn tag_to(&self, name: &str, tag: &str, m: &Digest) -> std::io::Result<()> {
        let dir = self.repo(name).join("_manifests/tags").join(tag);
        self.link(dir.join("current/link"), m)?;
        self.link(dir.join(format!("index/sha256/{}/link", hex(m))), m)
    }

    /// Removes a repository and everything under it (nested repositories too).
    pub fn remove(&self, name: &str) -> std::io::Result<()> {
        std::fs::remove_dir_all(self.repo(name))
    }
}
