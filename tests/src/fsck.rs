//! Offline consistency check of a storage root in distribution's layout: every blob's
//! content matches the digest it is stored under, every link names a digest whose content
//! exists, every tag points to a manifest revision of its repository.

use oci::{Digest, Verifier};
use std::fs;
use std::io::Read;
use std::path::Path;

/// What the check found.
#[derive(Debug, Default)]
pub struct Report {
    pub blobs: usize,
    pub links: usize,
    pub tags: usize,
    pub errors: Vec<String>,
}

fn hash_file(path: &Path, alg: oci::Algorithm) -> std::io::Result<Digest> {
    let mut f = fs::File::open(path)?;
    let mut v = Verifier::new(alg);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            return Ok(v.finish());
        }
        v.update(&buf[..n]);
    }
}

/// Every file under `dir` (its path), however deep.
pub fn files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    walk(dir, &mut out);
    out
}

fn walk(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            walk(&p, out);
        } else {
            out.push(p);
        }
    }
}

/// Checks the store under `root`.
pub fn check(root: &Path) -> Report {
    let v2 = root.join("docker/registry/v2");
    let mut r = Report::default();
    let mut files = Vec::new();
    walk(&v2.join("blobs"), &mut files);
    for f in &files {
        if f.file_name().and_then(|n| n.to_str()) != Some("data") {
            continue; // temp files of interrupted writes are not under a digest
        }
        let hex = f
            .parent()
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str())
            .unwrap_or("");
        let alg = f
            .parent()
            .and_then(|p| p.parent())
            .and_then(|p| p.parent())
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str())
            .unwrap_or("");
        let Ok(d) = Digest::parse(&format!("{alg}:{hex}")) else {
            r.errors
                .push(format!("blob at unexpected path {}", f.display()));
            continue;
        };
        match hash_file(f, d.algorithm()) {
            Ok(actual) if actual == d => r.blobs += 1,
            Ok(actual) => r.errors.push(format!("blob {d} has content {actual}")),
            Err(e) => r.errors.push(format!("blob {d}: {e}")),
        }
    }
    let mut files = Vec::new();
    walk(&v2.join("repositories"), &mut files);
    for f in &files {
        let path = f.display().to_string();
        if f.file_name().and_then(|n| n.to_str()) != Some("link") {
            continue;
        }
        let Ok(text) = fs::read_to_string(f) else {
            r.errors.push(format!("unreadable link {path}"));
            continue;
        };
        // A tag deleted by retention: its link holds a tombstone, not a digest.
        if path.ends_with("/current/link") && text.starts_with("deleted ") {
            continue;
        }
        let Ok(d) = Digest::parse(text.trim()) else {
            r.errors.push(format!("corrupt link {path}: {text:?}"));
            continue;
        };
        r.links += 1;
        let blob = v2.join(format!(
            "blobs/{}/{}/{}/data",
            d.algorithm(),
            &d.hex()[..2],
            d.hex()
        ));
        if (path.contains("/_layers/")
            || path.contains("/_manifests/revisions/")
            || path.ends_with("/current/link"))
            && !blob.exists()
        {
            r.errors
                .push(format!("link {path} names {d}, whose content is missing"));
        }
        if path.ends_with("/current/link") {
            r.tags += 1;
            let repo = path.split("/_manifests/tags/").next().unwrap_or("");
            let rev = format!(
                "{repo}/_manifests/revisions/{}/{}/link",
                d.algorithm(),
                d.hex()
            );
            if !Path::new(&rev).exists() {
                r.errors
                    .push(format!("tag {path} points to {d}, which is not a revision"));
            }
        }
    }
    r
}
