//! A run over each driver, counting the store calls in flight: the sweep is parallel, and
//! never more than [`PARALLEL`] at once; and the store's usage it leaves behind.

use super::{GcOptions, PARALLEL};
use crate::driver::fs::FsDriver;
use crate::driver::object::ObjectDriver;
use crate::driver::{AppendError, AppendOptions, Appended, ByteStream, Driver, ObjectMeta};
use crate::layout::Key;
use crate::registry::{Registry, RegistryOptions};
use bytes::Bytes;
use futures_util::future::BoxFuture;
use oci::{Algorithm, Digest, RepositoryName};
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// A driver that passes every call on, counting how many are in flight (each held a
/// millisecond, so that calls made together overlap even on a store that answers at once).
struct Counting {
    inner: Arc<dyn Driver>,
    now: AtomicUsize,
    most: AtomicUsize,
}

impl Counting {
    fn track<'a, T: Send + 'a>(&'a self, call: BoxFuture<'a, T>) -> BoxFuture<'a, T> {
        Box::pin(async move {
            let n = self.now.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(n, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(1)).await;
            let out = call.await;
            self.now.fetch_sub(1, Ordering::SeqCst);
            out
        })
    }
}

impl Driver for Counting {
    fn get<'a>(&'a self, path: &'a str) -> BoxFuture<'a, io::Result<Option<Bytes>>> {
        self.track(self.inner.get(path))
    }
    fn stat<'a>(&'a self, path: &'a str) -> BoxFuture<'a, io::Result<Option<ObjectMeta>>> {
        self.track(self.inner.stat(path))
    }
    fn reader<'a>(
        &'a self,
        path: &'a str,
        start: u64,
        len: u64,
    ) -> BoxFuture<'a, io::Result<Option<ByteStream>>> {
        self.track(self.inner.reader(path, start, len))
    }
    fn put<'a>(&'a self, path: &'a str, data: Bytes) -> BoxFuture<'a, io::Result<()>> {
        self.track(self.inner.put(path, data))
    }
    fn put_if_absent<'a>(&'a self, path: &'a str, data: Bytes) -> BoxFuture<'a, io::Result<bool>> {
        self.track(self.inner.put_if_absent(path, data))
    }
    fn put_if_current<'a>(
        &'a self,
        path: &'a str,
        data: Bytes,
        expected: Option<Bytes>,
    ) -> BoxFuture<'a, io::Result<bool>> {
        self.track(self.inner.put_if_current(path, data, expected))
    }
    fn upload_size<'a>(&'a self, path: &'a str) -> BoxFuture<'a, io::Result<Option<u64>>> {
        self.track(self.inner.upload_size(path))
    }
    fn upload_reader<'a>(
        &'a self,
        path: &'a str,
        start: u64,
        len: u64,
    ) -> BoxFuture<'a, io::Result<Option<ByteStream>>> {
        self.track(self.inner.upload_reader(path, start, len))
    }
    fn append<'a>(
        &'a self,
        path: &'a str,
        body: ByteStream,
        opts: AppendOptions,
    ) -> BoxFuture<'a, Result<Appended, AppendError>> {
        self.track(self.inner.append(path, body, opts))
    }
    fn promote<'a>(&'a self, from: &'a str, to: &'a str) -> BoxFuture<'a, io::Result<()>> {
        self.track(self.inner.promote(from, to))
    }
    fn list<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, io::Result<Vec<String>>> {
        self.track(self.inner.list(prefix))
    }
    fn delete<'a>(&'a self, path: &'a str) -> BoxFuture<'a, io::Result<bool>> {
        self.track(self.inner.delete(path))
    }
    fn remove_if_empty<'a>(&'a self, prefix: &'a str) -> BoxFuture<'a, io::Result<()>> {
        self.track(self.inner.remove_if_empty(prefix))
    }
}

/// Garbage of every kind a sweep deletes: 64 unreferenced blobs, 32 layer links to them in
/// `team/app`, and 32 upload sessions.
async fn garbage(store: &dyn Driver) -> Vec<Digest> {
    let repo = RepositoryName::parse("team/app").unwrap();
    let mut blobs = Vec::new();
    for i in 0..64 {
        let content = format!("garbage {i}");
        let d = Digest::of(Algorithm::Sha256, content.as_bytes());
        store
            .put(&Key::Blob(&d).path(), content.into())
            .await
            .unwrap();
        if i % 2 == 0 {
            let link = Key::LayerLink(&repo, &d).path();
            store.put(&link, d.to_string().into()).await.unwrap();
        }
        blobs.push(d);
    }
    for i in 0..32 {
        let started = Key::UploadStartedAt(&repo, &format!("session-{i}")).path();
        store
            .put(&started, "2020-01-01T00:00:00Z".into())
            .await
            .unwrap();
    }
    blobs
}

async fn sweep_counting_calls(inner: Arc<dyn Driver>) {
    let blobs = garbage(&*inner).await;
    let counting = Arc::new(Counting {
        inner: inner.clone(),
        now: AtomicUsize::new(0),
        most: AtomicUsize::new(0),
    });
    let registry = Registry::new(counting.clone(), RegistryOptions::default());
    let opts = GcOptions {
        grace: Duration::ZERO,
        upload_max_age: Duration::ZERO,
        fence: Duration::from_millis(10),
        ..Default::default()
    };
    let report = registry.gc(&opts).await.unwrap();
    assert!(report.complete, "{:?}", report.errors);
    assert_eq!(report.blobs_deleted.len(), 64);
    assert_eq!(report.layer_links_deleted.len(), 32);
    assert_eq!(report.uploads_purged.len(), 32);
    for d in &blobs {
        assert!(inner.stat(&Key::Blob(d).path()).await.unwrap().is_none());
    }
    assert_eq!(counting.most.load(Ordering::SeqCst), PARALLEL);
    // The run's walk measured the store's usage; its sweep took away what it deleted.
    let usage = registry.usage().expect("measured by the run");
    assert_eq!((usage.blobs, usage.bytes), (0, 0));
}

#[tokio::test]
async fn on_the_filesystem_a_run_sweeps_in_parallel_never_more_than_parallel_calls_at_once() {
    let dir = tempfile::tempdir().unwrap();
    sweep_counting_calls(Arc::new(FsDriver::new(dir.path()))).await;
}

#[tokio::test]
async fn on_an_object_store_a_run_sweeps_in_parallel_never_more_than_parallel_calls_at_once() {
    let store = Arc::new(object_store::memory::InMemory::new());
    sweep_counting_calls(Arc::new(ObjectDriver::with_store(store, "registry"))).await;
}
