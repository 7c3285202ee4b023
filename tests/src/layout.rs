//! Writes a registry in distribution's layout (`docker/registry/v2/…`) directly, without
//! pushes: blobs and the links that make repositories, manifests and tags. So a test or
//! `regbench --scale` fills thousands of repositories in seconds, and storage-backend and
//! distribution serve the very same directory.

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

impl Layout {
    /// Starts a layout under `root` with one small image's blobs.
    pub fn new(root: &Path) -> anyhow::Result<Layout> {
        let v2 = root.join("docker/registry/v2");
        let config =
            br#"{"architecture":"amd64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
        let layer = b"layer of the scale layout";
        let config_digest = crate::client::sha256(config);
        let layer_digest = crate::client::sha256(layer);
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": crate::client::OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": config_digest.to_string(), "size": config.len()},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar",
                        "digest": layer_digest.to_string(), "size": layer.len()}],
        })
        .to_string();
        let manifest_digest = crate::client::sha256(manifest.as_bytes());
        let l = Layout {
            v2,
            manifest: manifest_digest,
            config: config_digest,
            layer: layer_digest,
        };
        l.blob(&l.config, config)?;
        l.blob(&l.layer, layer)?;
        l.blob(&l.manifest, manifest.as_bytes())?;
        Ok(l)
    }

    /// The digest of the manifest every image of this layout has.
    pub fn manifest(&self) -> &Digest {
        &self.manifest
    }

    fn blob(&self, d: &Digest, data: &[u8]) -> std::io::Result<()> {
        let h = hex(d);
        write(
            &self.v2.join(format!("blobs/sha256/{}/{h}/data", &h[..2])),
            data,
        )
    }

    fn repo(&self, name: &str) -> PathBuf {
        self.v2.join("repositories").join(name)
    }

    fn link(&self, path: PathBuf, d: &Digest) -> std::io::Result<()> {
        write(&path, d.to_string().as_bytes())
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
        let m = &self.manifest;
        let dir = self.repo(name).join("_manifests/tags").join(tag);
        self.link(dir.join("current/link"), m)?;
        self.link(dir.join(format!("index/sha256/{}/link", hex(m))), m)
    }

    /// Removes a repository and everything under it (nested repositories too).
    pub fn remove(&self, name: &str) -> std::io::Result<()> {
        std::fs::remove_dir_all(self.repo(name))
    }
}
