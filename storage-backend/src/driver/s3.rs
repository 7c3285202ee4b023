//! The object-store driver: S3 and S3-compatible stores (Ceph RGW, MinIO) through the
//! `object_store` crate, with distribution's key layout under an optional prefix, so a
//! bucket written by distribution's S3 driver is readable.
//!
//! Objects map one to one onto keys, except upload data, which S3 cannot append to. An
//! upload object is a small **part list** (JSON) at its key; each appended chunk is its own
//! object next to it (`<key>.parts/<offset>-<uuid>`), written in one put (or a multipart
//! upload for chunks over [`PART_SIZE`], so a chunk of any size streams through bounded
//! memory). A chunk is added to the list with a conditional put on the list's ETag, so of two
//! nodes appending at the same offset exactly one wins and the other's chunk is deleted; any
//! storage node can continue a session because all of it is in the bucket. [`Driver::promote`]
//! (called only after the registry verified the digest) copies the parts, in order, into the
//! blob's key with one multipart upload, which becomes visible only when it completes — an
//! unverified or half-copied blob is never visible — then deletes the session's objects.

use super::{AppendError, AppendOptions, Appended, ByteStream, Driver, ObjectMeta as Meta};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::{StreamExt, TryStreamExt};
use object_store::path::Path;
use object_store::{
    ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion, WriteMultipart,
};
use std::io;
use std::sync::Arc;

/// Chunks up to this size are one put; larger ones (and promoted blobs) a multipart upload
/// with parts of this size (S3's minimum part is 5 MiB).
pub const PART_SIZE: usize = 8 << 20;
/// Parts of one multipart upload in flight at once.
const CONCURRENCY: usize = 2;

/// `[storage] type = "s3"`.
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct S3Config {
    pub bucket: String,
    /// Keys are `<prefix>/docker/registry/v2/…` (distribution's `rootdirectory`).
    #[serde(default)]
    pub prefix: String,
    /// An S3-compatible endpoint (`http://127.0.0.1:9000`); unset: AWS.
    #[serde(default)]
    pub endpoint: Option<String>,
    #[serde(default = "default_region")]
    pub region: String,
    /// Path-style requests (`<endpoint>/<bucket>/<key>`), as most S3-compatible stores want.
    #[serde(default = "default_true")]
    pub path_style: bool,
    /// Plain-HTTP endpoints (a store on the same host or network only).
    #[serde(default)]
    pub allow_http: bool,
    /// A PEM file of CA certificates to trust for the endpoint (a private CA), besides the
    /// system's.
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
    /// Retries of a request that failed transiently (throttling such as `503 SlowDown`,
    /// `5xx`, connection errors), with jittered exponential back-off from 100 ms to 2 s.
    #[serde(default = "default_retries")]
    pub max_retries: usize,
    /// How long one request may keep being retried.
    #[serde(default = "default_retry_timeout")]
    pub retry_timeout_seconds: u64,
}

fn default_retries() -> usize {
    4
}

fn default_retry_timeout() -> u64 {
    15
}

fn default_region() -> String {
    "us-east-1".into()
}

fn default_true() -> bool {
    true
}

/// The part list of an upload object.
#[derive(Debug, Default, serde::Serialize, serde::Deserialize)]
struct Parts {
    /// (key of the part, its length), in order.
    parts: Vec<(String, u64)>,
}

impl Parts {
    fn size(&self) -> u64 {
        self.parts.iter().map(|p| p.1).sum()
    }
}

pub struct S3Driver {
    store: Arc<dyn ObjectStore>,
    prefix: String,
}

fn io_err(e: object_store::Error) -> io::Error {
    match e {
        object_store::Error::NotFound { .. } => io::Error::new(io::ErrorKind::NotFound, e),
        other => {
            // A store that cannot be reached keeps the kind of the socket error under the
            // retries (the service answers 503 for those, not 500).
            let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(&other);
            let mut kind = io::ErrorKind::Other;
            while let Some(c) = cause {
                if let Some(ioe) = c.downcast_ref::<io::Error>() {
                    kind = ioe.kind();
                    break;
                }
                cause = c.source();
            }
            io::Error::new(kind, other)
        }
    }
}

fn not_found_as_none<T>(r: object_store::Result<T>) -> io::Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(io_err(e)),
    }
}

impl S3Driver {
    /// Credentials come from the environment as the AWS tools read them
    /// (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, web identity,
    /// instance metadata).
    pub fn new(cfg: &S3Config) -> anyhow::Result<Self> {
        use std::time::Duration;
        let mut client = object_store::ClientOptions::new()
            .with_allow_http(cfg.allow_http)
            .with_connect_timeout(Duration::from_secs(5))
            // Blob bodies stream for as long as the client reads: no total time limit.
            .with_timeout_disabled();
        if let Some(f) = &cfg.ca_file {
            let pem = std::fs::read(f)
                .map_err(|e| anyhow::anyhow!("storage s3: reading {}: {e}", f.display()))?;
            for c in object_store::Certificate::from_pem_bundle(&pem)
                .map_err(|e| anyhow::anyhow!("storage s3: {}: {e}", f.display()))?
            {
                client = client.with_root_certificate(c);
            }
        }
        let retry = object_store::RetryConfig {
            backoff: object_store::BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(2),
                base: 2.0,
            },
            max_retries: cfg.max_retries,
            retry_timeout: Duration::from_secs(cfg.retry_timeout_seconds),
        };
        let mut b = object_store::aws::AmazonS3Builder::from_env()
            .with_bucket_name(&cfg.bucket)
            .with_region(&cfg.region)
            .with_virtual_hosted_style_request(!cfg.path_style)
            .with_client_options(client)
            .with_retry(retry);
        if let Some(e) = &cfg.endpoint {
            b = b.with_endpoint(e);
        }
        let store = b.build().map_err(|e| anyhow::anyhow!("storage s3: {e}"))?;
        Ok(Self::with_store(Arc::new(store), &cfg.prefix))
    }

    /// Over any object store (tests use the in-memory one too).
    pub fn with_store(store: Arc<dyn ObjectStore>, prefix: &str) -> Self {
        S3Driver {
            store,
            prefix: prefix.trim_matches('/').to_string(),
        }
    }

    fn key(&self, path: &str) -> io::Result<Path> {
        let full = if self.prefix.is_empty() {
            path.trim_matches('/').to_string()
        } else {
            format!("{}/{}", self.prefix, path.trim_matches('/'))
        };
        Path::parse(&full).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
    }

    fn parts_prefix(&self, path: &str) -> io::Result<Path> {
        self.key(&format!("{}.parts", path.trim_matches('/')))
    }

    /// The part list at `path` and its version; `None` if there is no such object.
    async fn part_list(&self, path: &str) -> io::Result<Option<(Parts, UpdateVersion)>> {
        let Some(got) = not_found_as_none(self.store.get(&self.key(path)?).await)? else {
            return Ok(None);
        };
        let version = UpdateVersion {
            e_tag: got.meta.e_tag.clone(),
            version: got.meta.version.clone(),
        };
        let raw = got.bytes().await.map_err(io_err)?;
        // An upload object just made by `put` is empty: no parts yet.
        let parts = if raw.is_empty() {
            Parts::default()
        } else {
            serde_json::from_slice(&raw)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?
        };
        Ok(Some((parts, version)))
    }

    /// Streams `body` into a new object at `key`: one put when it fits in [`PART_SIZE`],
    /// a multipart upload otherwise. Nothing is left at `key` when it fails.
    async fn write_stream(
        &self,
        key: &Path,
        mut body: ByteStream,
        opts: &mut AppendOptions,
    ) -> Result<u64, AppendError> {
        let mut first = Vec::new();
        let mut written = 0u64;
        let mut upload: Option<WriteMultipart> = None;
        let limit = opts.expected_len;
        let result: Result<(), AppendError> = async {
            while let Some(chunk) = body.next().await {
                let chunk = chunk.map_err(AppendError::Body)?;
                written += chunk.len() as u64;
                if let Some(l) = limit
                    && written > l
                {
                    return Err(AppendError::Length {
                        expected: l,
                        received: written,
                    });
                }
                if let Some(h) = opts.hasher.as_mut() {
                    h.update(&chunk);
                }
                match upload.as_mut() {
                    Some(w) => {
                        w.wait_for_capacity(CONCURRENCY).await.map_err(io_err)?;
                        w.put(chunk);
                    }
                    None => {
                        first.extend_from_slice(&chunk);
                        if first.len() > PART_SIZE {
                            let up = self.store.put_multipart(key).await.map_err(io_err)?;
                            let mut w = WriteMultipart::new_with_chunk_size(up, PART_SIZE);
                            w.put(Bytes::from(std::mem::take(&mut first)));
                            upload = Some(w);
                        }
                    }
                }
            }
            if let Some(l) = limit
                && written != l
            {
                return Err(AppendError::Length {
                    expected: l,
                    received: written,
                });
            }
            Ok(())
        }
        .await;
        match (result, upload) {
            (Ok(()), Some(w)) => {
                w.finish().await.map_err(io_err)?;
            }
            (Ok(()), None) => {
                self.store
                    .put(key, PutPayload::from(Bytes::from(first)))
                    .await
                    .map_err(io_err)?;
            }
            (Err(e), Some(w)) => {
                let _ = w.abort().await;
                return Err(e);
            }
            (Err(e), None) => return Err(e),
        }
        Ok(written)
    }

    /// Deletes every object whose key starts with `prefix/`; how many there were.
    async fn delete_under(&self, prefix: &Path) -> io::Result<usize> {
        let keys: Vec<Path> = self
            .store
            .list(Some(prefix))
            .map_ok(|m| m.location)
            .try_collect()
            .await
            .map_err(io_err)?;
        let n = keys.len();
        let stream = futures_util::stream::iter(keys.into_iter().map(Ok)).boxed();
        self.store
            .delete_stream(stream)
            .try_collect::<Vec<_>>()
            .await
            .map_err(io_err)?;
        Ok(n)
    }

    /// The bytes `[start, start + len)` of the concatenation of `parts`.
    fn parts_reader(&self, parts: Parts, start: u64, len: u64) -> ByteStream {
        let store = self.store.clone();
        let mut pieces = Vec::new();
        let (mut at, end) = (0u64, start + len);
        for (key, size) in parts.parts {
            let (from, to) = (start.max(at), end.min(at + size));
            if from < to {
                pieces.push((key, from - at, to - at));
            }
            at += size;
        }
        futures_util::stream::iter(pieces)
            .then(move |(key, from, to)| {
                let store = store.clone();
                async move {
                    let key = Path::parse(&key)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    let got = store
                        .get_opts(
                            &key,
                            object_store::GetOptions {
                                range: Some((from..to).into()),
                                ..Default::default()
                            },
                        )
                        .await
                        .map_err(io_err)?;
                    Ok::<_, io::Error>(got.into_stream().map_err(io_err))
                }
            })
            .try_flatten()
            .boxed()
    }
}

impl Driver for S3Driver {
    fn get<'a>(&'a self, path: &'a str) -> BoxFuture<'a, io::Result<Option<Bytes>>> {
        Box::pin(async move {
            match not_found_as_none(self.store.get(&self.key(path)?).await)? {
                Some(got) => Ok(Some(got.bytes().await.map_err(io_err)?)),
                None => Ok(None),
            }
        })
    }

    fn stat<'a>(&'a self, path: &'a str) -> BoxFuture<'a, io::Result<Option<Meta>>> {
        Box::pin(async move {
            Ok(
                not_found_as_none(self.store.head(&self.key(path)?).await)?.map(|m| Meta {
                    size: m.size,
                    modified: m.last_modified.into(),
                }),
            )
        })
    }

    fn reader<'a>(
        &'a self,
        path: &'a str,
        start: u64,
        len: u64,
    ) -> BoxFuture<'a, io::Result<Option<ByteStream>>> {
        Box::pin(async move {
            if len == 0 {
                let exists = self.stat(path).await?.is_some();
                return Ok(exists.then(|| futures_util::stream::empty().boxed()));
            }
            let got = self
                .store
                .get_opts(
                    &self.key(path)?,
                    object_store::GetOptions {
                        range: Some((start..start + len).into()),
                        ..Default::default()
                    },
                )
                .await;
            Ok(not_found_as_none(got)?.map(|g| g.into_stream().map_err(io_err).boxed()))
        })
    }

    fn put<'a>(&'a self, path: &'a str, data: Bytes) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            self.store
                .put(&self.key(path)?, PutPayload::from(data))
                .await
                .map_err(io_err)?;
            Ok(())
        })
    }

    fn put_if_absent<'a>(&'a self, path: &'a str, data: Bytes) -> BoxFuture<'a, io::Result<bool>> {
        Box::pin(async move {
            let opts = PutOptions {
                mode: PutMode::Create,
                ..Default::default()
            };
            match self
                .store
                .put_opts(&self.key(path)?, PutPayload::from(data), opts)
                .await
            {
                Ok(_) => Ok(true),
                Err(object_store::Error::AlreadyExists { .. }) => Ok(false),
                Err(e) => Err(io_err(e)),
            }
        })
    }

    fn upload_size<'a>(&'a self, path: &'a str) -> BoxFuture<'a, io::Result<Option<u64>>> {
        Box::pin(async move { Ok(self.part_list(path).await?.map(|(p, _)| p.size())) })
    }

    fn upload_reader<'a>(
        &'a self,
        path: &'a str,
        start: u64,
        len: u64,
    ) -> BoxFuture<'a, io::Result<Option<ByteStream>>> {
        Box::pin(async move {
            Ok(self
                .part_list(path)
                .await?
                .map(|(parts, _)| self.parts_reader(parts, start, len)))
        })
    }

    fn append<'a>(
        &'a self,
        path: &'a str,
        body: ByteStream,
        mut opts: AppendOptions,
    ) -> BoxFuture<'a, Result<Appended, AppendError>> {
        Box::pin(async move {
            let Some((mut parts, version)) = self.part_list(path).await? else {
                return Err(AppendError::NotFound);
            };
            let current = parts.size();
            if current != opts.offset {
                return Err(AppendError::Offset {
                    current,
                    expected: opts.offset,
                });
            }
            let part = self.parts_prefix(path)?.join(format!(
                "{:020}-{}",
                opts.offset,
                uuid::Uuid::new_v4().simple()
            ));
            let written = self.write_stream(&part, body, &mut opts).await?;
            if written == 0 {
                let _ = self.store.delete(&part).await;
                return Ok(Appended {
                    written,
                    hasher: opts.hasher,
                });
            }
            parts.parts.push((part.to_string(), written));
            let list = serde_json::to_vec(&parts).map_err(io::Error::other)?;
            let put = self
                .store
                .put_opts(
                    &self.key(path)?,
                    PutPayload::from(list),
                    PutOptions {
                        mode: PutMode::Update(version),
                        ..Default::default()
                    },
                )
                .await;
            match put {
                Ok(_) => Ok(Appended {
                    written,
                    hasher: opts.hasher,
                }),
                Err(e) => {
                    let _ = self.store.delete(&part).await;
                    match e {
                        // Another node appended (or the session ended) meanwhile.
                        object_store::Error::Precondition { .. }
                        | object_store::Error::NotFound { .. } => {
                            match self.part_list(path).await? {
                                Some((now, _)) => Err(AppendError::Offset {
                                    current: now.size(),
                                    expected: opts.offset,
                                }),
                                None => Err(AppendError::NotFound),
                            }
                        }
                        other => Err(io_err(other).into()),
                    }
                }
            }
        })
    }

    fn promote<'a>(&'a self, from: &'a str, to: &'a str) -> BoxFuture<'a, io::Result<()>> {
        Box::pin(async move {
            let Some((parts, _)) = self.part_list(from).await? else {
                return Err(io::Error::new(io::ErrorKind::NotFound, "no such upload"));
            };
            let size = parts.size();
            // The same streaming write as a chunk's: one put or a multipart upload, visible
            // only once complete, nothing left at `to` if it fails.
            let mut opts = AppendOptions {
                offset: 0,
                expected_len: Some(size),
                hasher: None,
            };
            let body = self.parts_reader(parts, 0, size);
            match self.write_stream(&self.key(to)?, body, &mut opts).await {
                Ok(_) => {}
                Err(AppendError::Io(e) | AppendError::Body(e)) => return Err(e),
                Err(e) => return Err(io::Error::other(e)),
            }
            self.delete_under(&self.parts_prefix(from)?).await?;
            let _ = self.store.delete(&self.key(from)?).await;
            Ok(())
        })
    }

    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, io::Result<Vec<String>>> {
        Box::pin(async move {
            let key = self.key(prefix)?;
            let listed = self
                .store
                .list_with_delimiter(Some(&key))
                .await
                .map_err(io_err)?;
            let name = |p: &Path| p.filename().map(str::to_owned);
            Ok(listed
                .common_prefixes
                .iter()
                .filter_map(name)
                .chain(listed.objects.iter().filter_map(|m| name(&m.location)))
                .collect())
        })
    }

    fn delete<'a>(&'a self, path: &'a str) -> BoxFuture<'a, io::Result<bool>> {
        Box::pin(async move {
            let key = self.key(path)?;
            let object = not_found_as_none(self.store.head(&key).await)?.is_some();
            if object {
                self.store.delete(&key).await.map_err(io_err)?;
                // An upload object's parts go with it.
                self.delete_under(&self.parts_prefix(path)?).await?;
            }
            let under = self.delete_under(&key).await?;
            Ok(object || under > 0)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::fs::collect;

    fn driver() -> S3Driver {
        S3Driver::with_store(Arc::new(object_store::memory::InMemory::new()), "root")
    }

    fn body(chunks: Vec<io::Result<&'static [u8]>>) -> ByteStream {
        futures_util::stream::iter(chunks.into_iter().map(|c| c.map(Bytes::from_static))).boxed()
    }

    fn opts(offset: u64, expected_len: Option<u64>) -> AppendOptions {
        AppendOptions {
            offset,
            expected_len,
            hasher: None,
        }
    }

    #[tokio::test]
    async fn objects_and_listing() {
        let d = driver();
        assert!(d.get("a/b").await.unwrap().is_none());
        d.put("a/b", Bytes::from_static(b"one")).await.unwrap();
        d.put("a/c/d", Bytes::from_static(b"two")).await.unwrap();
        assert_eq!(d.get("a/b").await.unwrap().unwrap(), "one");
        assert_eq!(d.stat("a/b").await.unwrap().unwrap().size, 3);
        let mut names = d.list("a").await.unwrap();
        names.sort();
        assert_eq!(names, ["b", "c"]);
        assert!(
            !d.put_if_absent("a/b", Bytes::from_static(b"x"))
                .await
                .unwrap()
        );
        assert!(
            d.put_if_absent("a/e", Bytes::from_static(b"x"))
                .await
                .unwrap()
        );
        let r = d.reader("a/c/d", 1, 2).await.unwrap().unwrap();
        assert_eq!(collect(r).await.unwrap(), b"wo");
        assert!(d.delete("a/c").await.unwrap(), "a prefix");
        assert!(d.get("a/c/d").await.unwrap().is_none());
        assert!(d.delete("a/b").await.unwrap());
        assert!(!d.delete("a/b").await.unwrap());
    }

    #[tokio::test]
    async fn appends_check_offsets_and_lengths_and_one_racer_wins() {
        let d = driver();
        let u = "up/data";
        assert!(matches!(
            d.append(u, body(vec![Ok(b"x")]), opts(0, None)).await,
            Err(AppendError::NotFound)
        ));
        d.put(u, Bytes::new()).await.unwrap();
        assert_eq!(d.upload_size(u).await.unwrap(), Some(0));
        d.append(u, body(vec![Ok(b"hel"), Ok(b"lo")]), opts(0, Some(5)))
            .await
            .unwrap();
        assert!(matches!(
            d.append(u, body(vec![Ok(b"!")]), opts(4, None)).await,
            Err(AppendError::Offset {
                current: 5,
                expected: 4
            })
        ));
        assert!(matches!(
            d.append(u, body(vec![Ok(b"abc")]), opts(5, Some(2))).await,
            Err(AppendError::Length { .. })
        ));
        assert!(matches!(
            d.append(
                u,
                body(vec![Ok(b"a"), Err(io::Error::other("gone"))]),
                opts(5, None)
            )
            .await,
            Err(AppendError::Body(_))
        ));
        assert_eq!(
            d.upload_size(u).await.unwrap(),
            Some(5),
            "failed chunks kept nothing"
        );
        // Two appends at one offset: exactly one is kept.
        let (a, b) = tokio::join!(
            d.append(u, body(vec![Ok(b" world")]), opts(5, None)),
            d.append(u, body(vec![Ok(b" there")]), opts(5, None)),
        );
        assert_eq!(a.is_ok() as u8 + b.is_ok() as u8, 1);
        let size = d.upload_size(u).await.unwrap().unwrap();
        assert_eq!(size, 11);
        let all = collect(d.upload_reader(u, 0, size).await.unwrap().unwrap())
            .await
            .unwrap();
        assert!(all == b"hello world" || all == b"hello there", "{all:?}");
        let mid = collect(d.upload_reader(u, 3, 4).await.unwrap().unwrap())
            .await
            .unwrap();
        assert_eq!(&mid, &all[3..7]);
        // Promoted: one object with the content; the session's objects are gone.
        d.promote(u, "blob/data").await.unwrap();
        assert_eq!(d.get("blob/data").await.unwrap().unwrap(), all);
        assert!(d.upload_size(u).await.unwrap().is_none());
        assert!(d.list("up").await.unwrap().is_empty());
    }
}
