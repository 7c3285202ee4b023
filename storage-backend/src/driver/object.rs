//! The object-store driver: S3 and S3-compatible stores (Ceph RGW, MinIO) and Azure Blob
//! Storage through the `object_store` crate, with distribution's key layout under an
//! optional prefix, so a bucket written by distribution's S3 driver is readable. The driver
//! only needs what every such store offers (put, ranged get, list, delete, multipart upload,
//! conditional put on absence and on ETag), so it is one implementation over
//! `dyn ObjectStore`.
//!
//! Objects map one to one onto keys, except upload data, which objects cannot be appended
//! to. An
//! upload object is a small **part list** (JSON) at its key; each appended chunk is its own
//! object next to it (`<key>.parts/<offset>-<uuid>`), written in one put (or a multipart
//! upload for chunks over [`PART_SIZE`], so a chunk of any size streams through bounded
//! memory). A chunk is added to the list with a conditional put on the list's ETag, so of two
//! nodes appending at the same offset exactly one wins and the other's chunk is deleted; any
//! storage node can continue a session because all of it is in the bucket. Tag overwrites
//! ([`Driver::put_if_current`]) are conditional puts on the ETag read with the old content.
//! [`Driver::promote`]
//! (called only after the registry verified the digest) copies the parts, in order, into the
//! blob's key with one multipart upload, which becomes visible only when it completes — an
//! unverified or half-copied blob is never visible — then deletes the session's objects.

use super::{AppendError, AppendOptions, Appended, ByteStream, Driver, ObjectMeta as Meta, Run};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::{StreamExt, TryStreamExt};
use object_store::list::{PaginatedListOptions, PaginatedListStore};
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
/// The largest object S3 copies in one request (`CopyObject`); a bigger one-part session is
/// promoted by streaming.
const MAX_SERVER_COPY: u64 = 5 << 30;

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
    /// A static access key, with its secret in `secret_access_key_file`; unset: the
    /// environment and instance metadata, as the AWS tools look for them.
    #[serde(default)]
    pub access_key_id: Option<String>,
    /// File holding the secret access key (trailing newline ignored).
    #[serde(default)]
    pub secret_access_key_file: Option<std::path::PathBuf>,
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

/// `[storage] type = "azure"`: a container of an Azure Blob Storage account (or Azurite).
#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AzureConfig {
    pub account: String,
    pub container: String,
    /// Keys are `<prefix>/docker/registry/v2/…`.
    #[serde(default)]
    pub prefix: String,
    /// The blob service's URL (`http://127.0.0.1:10000/devstoreaccount1` for Azurite);
    /// unset: `https://<account>.blob.core.windows.net`.
    #[serde(default)]
    pub endpoint: Option<String>,
    /// File holding the account's access key (trailing newline ignored); unset: the
    /// environment as the Azure tools read it (`AZURE_STORAGE_ACCOUNT_KEY`, a service
    /// principal, workload or managed identity).
    #[serde(default)]
    pub access_key_file: Option<std::path::PathBuf>,
    #[serde(default)]
    pub allow_http: bool,
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
    #[serde(default = "default_retries")]
    pub max_retries: usize,
    #[serde(default = "default_retry_timeout")]
    pub retry_timeout_seconds: u64,
}

/// HTTP client options of a store: a 5 s connect timeout, no total time limit (blob bodies
/// stream for as long as the client reads), extra CA certificates from `ca_file`.
fn client_options(
    what: &str,
    allow_http: bool,
    ca_file: Option<&std::path::Path>,
) -> anyhow::Result<object_store::ClientOptions> {
    let mut client = object_store::ClientOptions::new()
        .with_allow_http(allow_http)
        .with_connect_timeout(std::time::Duration::from_secs(5))
        .with_timeout_disabled();
    if let Some(f) = ca_file {
        let pem = std::fs::read(f)
            .map_err(|e| anyhow::anyhow!("storage {what}: reading {}: {e}", f.display()))?;
        for c in object_store::Certificate::from_pem_bundle(&pem)
            .map_err(|e| anyhow::anyhow!("storage {what}: {}: {e}", f.display()))?
        {
            client = client.with_root_certificate(c);
        }
    }
    Ok(client)
}

/// Retries of transient failures with jittered exponential back-off from 100 ms to 2 s.
fn retry_config(max_retries: usize, retry_timeout_seconds: u64) -> object_store::RetryConfig {
    use std::time::Duration;
    object_store::RetryConfig {
        backoff: object_store::BackoffConfig {
            init_backoff: Duration::from_millis(100),
            max_backoff: Duration::from_secs(2),
            base: 2.0,
        },
        max_retries,
        retry_timeout: Duration::from_secs(retry_timeout_seconds),
    }
}

/// A secret read from a file, without its trailing newline.
fn secret_from(what: &str, file: &std::path::Path) -> anyhow::Result<String> {
    service::secrets::read_secret_file(file).map_err(|e| anyhow::anyhow!("storage {what}: {e:#}"))
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

pub struct ObjectDriver {
    store: Arc<dyn ObjectStore>,
    /// The same store's listing from a key on (S3's `start-after`), where it has one.
    paged: Option<Arc<dyn PaginatedListStore>>,
    prefix: String,
}

/// Keys one listing request asks for (S3's most).
const LIST_KEYS: usize = 1000;
/// One-key listings of a tag page's cut names in flight at once ([`Driver::list_after`]).
const CUTS_AT_ONCE: usize = 8;
/// The longest `start-after` sent for a client's `last`: a tag's longest name.
const START_AFTER_MAX: usize = 128;

/// What of a client's `last` goes to S3 as `start-after` (within its prefix): its leading
/// part made of name characters, at most [`START_AFTER_MAX`] bytes, so the listing starts no
/// later than a name after `last` (what it lists up to `last` is dropped). Where `last` goes
/// on with a byte above every name character (`~`, `{`, non-ASCII), no name starting with
/// that part comes after it: `~` is added, past them all.
fn start_after(last: &str) -> std::borrow::Cow<'_, str> {
    let end = last
        .bytes()
        .take(START_AFTER_MAX)
        .take_while(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
        .count();
    match last.as_bytes().get(end) {
        Some(&b) if b > b'z' => format!("{}~", &last[..end]).into(),
        _ => last[..end].into(),
    }
}

/// The name of a delimited listing's last key (in key order: a common prefix's key ends in
/// `/`).
fn last_name(listed: &object_store::ListResult) -> Option<String> {
    let prefixes = listed
        .common_prefixes
        .iter()
        .map(|p| (format!("{p}/"), p.filename()));
    let objects = listed
        .objects
        .iter()
        .map(|m| (m.location.to_string(), m.location.filename()));
    prefixes
        .chain(objects)
        .max_by(|a, b| a.0.cmp(&b.0))
        .and_then(|(_, name)| name.map(str::to_owned))
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

/// The names of a delimited listing's children: its common prefixes and objects.
fn child_names(listed: &object_store::ListResult) -> impl Iterator<Item = String> + '_ {
    let name = |p: &Path| p.filename().map(str::to_owned);
    listed
        .common_prefixes
        .iter()
        .filter_map(name)
        .chain(listed.objects.iter().filter_map(move |m| name(&m.location)))
}

fn not_found_as_none<T>(r: object_store::Result<T>) -> io::Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(object_store::Error::NotFound { .. }) => Ok(None),
        Err(e) => Err(io_err(e)),
    }
}

impl ObjectDriver {
    /// Credentials: `access_key_id` with `secret_access_key_file` if set, else the
    /// environment as the AWS tools read it (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
    /// `AWS_SESSION_TOKEN`, web identity, instance metadata).
    pub fn s3(cfg: &S3Config) -> anyhow::Result<Self> {
        let mut b = object_store::aws::AmazonS3Builder::from_env()
            .with_bucket_name(&cfg.bucket)
            .with_region(&cfg.region)
            .with_virtual_hosted_style_request(!cfg.path_style)
            .with_client_options(client_options(
                "s3",
                cfg.allow_http,
                cfg.ca_file.as_deref(),
            )?)
            .with_retry(retry_config(cfg.max_retries, cfg.retry_timeout_seconds));
        if let Some(e) = &cfg.endpoint {
            b = b.with_endpoint(e);
        }
        match (&cfg.access_key_id, &cfg.secret_access_key_file) {
            (Some(id), Some(file)) => {
                b = b
                    .with_access_key_id(id)
                    .with_secret_access_key(secret_from("s3", file)?);
            }
            (None, None) => {}
            _ => anyhow::bail!("storage s3: access_key_id and secret_access_key_file go together"),
        }
        let store = Arc::new(b.build().map_err(|e| anyhow::anyhow!("storage s3: {e}"))?);
        Ok(ObjectDriver {
            paged: Some(store.clone()),
            ..Self::with_store(store, &cfg.prefix)
        })
    }

    /// Credentials: the account key in `access_key_file` if set, else the environment as
    /// the Azure tools read it.
    pub fn azure(cfg: &AzureConfig) -> anyhow::Result<Self> {
        let mut b = object_store::azure::MicrosoftAzureBuilder::from_env()
            .with_account(&cfg.account)
            .with_container_name(&cfg.container)
            .with_client_options(client_options(
                "azure",
                cfg.allow_http,
                cfg.ca_file.as_deref(),
            )?)
            .with_retry(retry_config(cfg.max_retries, cfg.retry_timeout_seconds));
        if let Some(e) = &cfg.endpoint {
            b = b.with_endpoint(e.clone());
        }
        if let Some(file) = &cfg.access_key_file {
            b = b.with_access_key(secret_from("azure", file)?);
        }
        let store = b
            .build()
            .map_err(|e| anyhow::anyhow!("storage azure: {e}"))?;
        Ok(Self::with_store(Arc::new(store), &cfg.prefix))
    }

    /// Over any object store (tests use the in-memory one too).
    pub fn with_store(store: Arc<dyn ObjectStore>, prefix: &str) -> Self {
        ObjectDriver {
            store,
            paged: None,
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
        // Chunks before the store is asked for anything: kept as they came (no copy), sent as
        // one put if the body ends within a part, else as the multipart upload's start.
        let mut first: Vec<Bytes> = Vec::new();
        let mut first_len = 0usize;
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
                        first_len += chunk.len();
                        first.push(chunk);
                        if first_len > PART_SIZE {
                            let up = self.store.put_multipart(key).await.map_err(io_err)?;
                            let mut w = WriteMultipart::new_with_chunk_size(up, PART_SIZE);
                            for c in first.drain(..) {
                                w.put(c);
                            }
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
                    .put(key, first.into_iter().collect::<PutPayload>())
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

impl Driver for ObjectDriver {
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

    fn put_if_current<'a>(
        &'a self,
        path: &'a str,
        data: Bytes,
        expected: Option<Bytes>,
    ) -> BoxFuture<'a, io::Result<bool>> {
        let Some(expected) = expected else {
            return self.put_if_absent(path, data);
        };
        Box::pin(async move {
            let key = self.key(path)?;
            let Some(got) = not_found_as_none(self.store.get(&key).await)? else {
                return Ok(false);
            };
            let version = UpdateVersion {
                e_tag: got.meta.e_tag.clone(),
                version: got.meta.version.clone(),
            };
            if got.bytes().await.map_err(io_err)? != expected {
                return Ok(false);
            }
            // Conditional on the version read: `If-Match` on the ETag.
            let opts = PutOptions {
                mode: PutMode::Update(version),
                ..Default::default()
            };
            match self
                .store
                .put_opts(&key, PutPayload::from(data), opts)
                .await
            {
                Ok(_) => Ok(true),
                Err(
                    object_store::Error::Precondition { .. } | object_store::Error::NotFound { .. },
                ) => Ok(false),
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
            let to = self.key(to)?;
            match parts.parts.as_slice() {
                // One part (a push in one PATCH, as docker and skopeo send it): the store
                // copies it server-side, no byte passes through this process again.
                [(part, _)] if size <= MAX_SERVER_COPY => {
                    let part = Path::parse(part)
                        .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
                    self.store.copy(&part, &to).await.map_err(io_err)?;
                }
                // Several: the same streaming write as a chunk's, one put or a multipart
                // upload, visible only once complete, nothing left at `to` if it fails.
                _ => {
                    let mut opts = AppendOptions {
                        offset: 0,
                        expected_len: Some(size),
                        hasher: None,
                    };
                    let body = self.parts_reader(parts, 0, size);
                    match self.write_stream(&to, body, &mut opts).await {
                        Ok(_) => {}
                        Err(AppendError::Io(e) | AppendError::Body(e)) => return Err(e),
                        Err(e) => return Err(io::Error::other(e)),
                    }
                }
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
            Ok(child_names(&listed).collect())
        })
    }

    /// On S3, one listing request from the key of `after` on (`start-after`, up to
    /// [`LIST_KEYS`] names; more while every name it returns sorts up to `after`), not the
    /// whole prefix. S3 orders keys, in which a name's `/` sorts after `-` and `.`: `v1.2.3/`
    /// comes before `v1.2/`. So when a request stops at `v1.2.3/`, the names it has not
    /// reached but which sort before the ones it has are the cuts of that last name before
    /// such a byte (`v1`, `v1.2`): each is looked for with a one-key listing, and the run holds
    /// every name up to its last. Elsewhere (Azure) the prefix is listed whole.
    fn list_after<'a>(
        &'a self,
        prefix: &'a str,
        after: Option<&'a str>,
    ) -> BoxFuture<'a, io::Result<Run>> {
        Box::pin(async move {
            let Some(paged) = &self.paged else {
                return Ok(Run::whole(self.list_sorted(prefix).await?, None, after));
            };
            let dir = format!("{}/", self.key(prefix)?);
            let list_page =
                |start: Option<String>, token: Option<String>, under: String, keys: usize| {
                    let opts = PaginatedListOptions {
                        offset: start,
                        page_token: token,
                        delimiter: Some("/".into()),
                        max_keys: Some(keys),
                        ..Default::default()
                    };
                    async move {
                        paged
                            .list_paginated(Some(&under), opts)
                            .await
                            .map_err(io_err)
                    }
                };
            let is_after = |n: &str| after.is_none_or(|a| n > a);
            let start = after.map(|a| format!("{dir}{}", start_after(a)));
            let mut names = std::collections::BTreeSet::new();
            let mut token = None;
            let (more, last) = loop {
                let page = list_page(start.clone(), token.take(), dir.clone(), LIST_KEYS).await?;
                names.extend(child_names(&page.result).filter(|n| is_after(n)));
                match page.page_token {
                    // Only names up to `after` so far (its own cuts, or a shortened
                    // `start-after`): the next request.
                    Some(t) if names.is_empty() => token = Some(t),
                    more => break (more.is_some(), last_name(&page.result)),
                }
            };
            if more && let Some(last) = last {
                let cuts: Vec<String> = last
                    .bytes()
                    .enumerate()
                    .filter(|&(i, b)| i > 0 && b < b'/')
                    .map(|(i, _)| last[..i].to_owned())
                    .filter(|cut| is_after(cut) && !names.contains(cut))
                    .collect();
                let found: Vec<String> = futures_util::stream::iter(cuts)
                    .map(|cut: String| {
                        let one = list_page(None, None, format!("{dir}{cut}/"), 1);
                        async move {
                            let one = one.await?;
                            let there = !one.result.common_prefixes.is_empty()
                                || !one.result.objects.is_empty();
                            Ok::<_, io::Error>(there.then_some(cut))
                        }
                    })
                    .buffer_unordered(CUTS_AT_ONCE)
                    .try_filter_map(|cut| async move { Ok(cut) })
                    .try_collect()
                    .await?;
                names.extend(found);
            }
            Ok(Run {
                names: names.into_iter().collect(),
                from: 0,
                marks: None,
                more,
            })
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
