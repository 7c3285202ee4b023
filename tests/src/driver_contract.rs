//! The storage driver contract (`storage_backend::driver`), checked the same way against
//! every backend: the filesystem, the in-memory object store and a real S3 server. Each
//! check panics with the backend's name and what broke.

use bytes::Bytes;
use futures_util::{StreamExt, TryStreamExt};
use std::io;
use std::sync::Arc;
use storage_backend::driver::{AppendError, AppendOptions, ByteStream, Driver};

fn body(chunks: &[&'static [u8]]) -> ByteStream {
    let chunks: Vec<io::Result<Bytes>> = chunks.iter().map(|c| Ok(Bytes::from_static(c))).collect();
    futures_util::stream::iter(chunks).boxed()
}

/// A body that fails after `first` (the client went away).
fn broken(first: &'static [u8]) -> ByteStream {
    futures_util::stream::iter([
        Ok(Bytes::from_static(first)),
        Err(io::Error::other("client went away")),
    ])
    .boxed()
}

fn opts(offset: u64, expected_len: Option<u64>) -> AppendOptions {
    AppendOptions {
        offset,
        expected_len,
        hasher: Some(oci::Verifier::new(oci::Algorithm::Sha256)),
    }
}

async fn read(d: &dyn Driver, path: &str, start: u64, len: u64) -> Vec<u8> {
    let s = d.reader(path, start, len).await.unwrap().expect("object");
    let parts: Vec<Bytes> = s.try_collect().await.unwrap();
    parts.concat()
}

async fn read_upload(d: &dyn Driver, path: &str, start: u64, len: u64) -> Vec<u8> {
    let s = d
        .upload_reader(path, start, len)
        .await
        .unwrap()
        .expect("upload");
    let parts: Vec<Bytes> = s.try_collect().await.unwrap();
    parts.concat()
}

/// Runs every check on `d`, under keys starting with `root`.
pub async fn check(name: &str, d: Arc<dyn Driver>, root: &str) {
    objects_and_listing(name, &*d, root).await;
    create_and_swap_are_race_free(name, d.clone(), root).await;
    appends(name, d.clone(), root).await;
}

async fn objects_and_listing(name: &str, d: &dyn Driver, root: &str) {
    let k = |p: &str| format!("{root}/objects/{p}");
    assert_eq!(
        d.get(&k("a")).await.unwrap(),
        None,
        "{name}: missing object"
    );
    assert!(d.stat(&k("a")).await.unwrap().is_none(), "{name}");
    d.put(&k("a"), Bytes::from_static(b"one")).await.unwrap();
    d.put(&k("a"), Bytes::from_static(b"two")).await.unwrap();
    d.put(&k("dir/c"), Bytes::from_static(b"three"))
        .await
        .unwrap();
    assert_eq!(d.get(&k("a")).await.unwrap().unwrap(), "two", "{name}");
    assert_eq!(d.stat(&k("a")).await.unwrap().unwrap().size, 3, "{name}");
    assert_eq!(read(d, &k("dir/c"), 1, 3).await, b"hre", "{name}: range");
    let mut names = d.list(&format!("{root}/objects")).await.unwrap();
    names.sort();
    assert_eq!(names, ["a", "dir"], "{name}: listing");
    assert!(d.list(&k("none")).await.unwrap().is_empty(), "{name}");
    assert!(d.delete(&k("dir")).await.unwrap(), "{name}: delete prefix");
    assert!(d.get(&k("dir/c")).await.unwrap().is_none(), "{name}");
    assert!(d.delete(&k("a")).await.unwrap(), "{name}");
    assert!(!d.delete(&k("a")).await.unwrap(), "{name}: deleted twice");
}

async fn create_and_swap_are_race_free(name: &str, d: Arc<dyn Driver>, root: &str) {
    let key = format!("{root}/swap/link");
    let data = |i: usize| Bytes::from(format!("value-{i}"));
    // 16 racing creates: one wins, and its content is what is stored.
    let creates = (0..16).map(|i| {
        let (d, key) = (d.clone(), key.clone());
        tokio::spawn(async move { d.put_if_absent(&key, data(i)).await.unwrap() })
    });
    let won: Vec<bool> = futures_util::future::try_join_all(creates).await.unwrap();
    assert_eq!(won.iter().filter(|w| **w).count(), 1, "{name}: creates");
    let winner = won.iter().position(|w| *w).unwrap();
    assert_eq!(d.get(&key).await.unwrap().unwrap(), data(winner), "{name}");
    assert!(
        !d.put_if_current(&key, data(99), None).await.unwrap(),
        "{name}: a swap expecting no object over an existing one"
    );
    assert!(
        !d.put_if_current(&key, data(99), Some(data(98)))
            .await
            .unwrap(),
        "{name}: a swap expecting other content"
    );
    // 16 racing swaps from one value: exactly one wins.
    let swaps = (0..16).map(|i| {
        let (d, key) = (d.clone(), key.clone());
        tokio::spawn(async move {
            d.put_if_current(&key, data(100 + i), Some(data(winner)))
                .await
                .unwrap()
        })
    });
    let won: Vec<bool> = futures_util::future::try_join_all(swaps).await.unwrap();
    assert_eq!(won.iter().filter(|w| **w).count(), 1, "{name}: swaps");
    let i = won.iter().position(|w| *w).unwrap();
    assert_eq!(d.get(&key).await.unwrap().unwrap(), data(100 + i), "{name}");
    // 16 swappers each retrying until their value is in: a chain with nothing lost.
    let chain = (0..16).map(|i| {
        let (d, key) = (d.clone(), key.clone());
        tokio::spawn(async move {
            loop {
                let before = d.get(&key).await.unwrap();
                if d.put_if_current(&key, data(200 + i), before.clone())
                    .await
                    .unwrap()
                {
                    return before.unwrap();
                }
            }
        })
    });
    let replaced: Vec<Bytes> = futures_util::future::try_join_all(chain).await.unwrap();
    let last = d.get(&key).await.unwrap().unwrap();
    let mut seen: Vec<Bytes> = replaced.into_iter().chain([last]).collect();
    seen.sort();
    let mut expected: Vec<Bytes> = (0..16)
        .map(|i| data(200 + i))
        .chain([data(100 + i)])
        .collect();
    expected.sort();
    assert_eq!(
        seen, expected,
        "{name}: each swap replaced a distinct value"
    );
    assert!(
        !d.put_if_current(&format!("{root}/swap/none"), data(1), Some(data(1)))
            .await
            .unwrap(),
        "{name}: a swap of a missing object"
    );
    d.delete(&format!("{root}/swap")).await.unwrap();
}

async fn appends(name: &str, d: Arc<dyn Driver>, root: &str) {
    let u = format!("{root}/uploads/one/data");
    assert!(
        matches!(
            d.append(&u, body(&[b"x"]), opts(0, None)).await,
            Err(AppendError::NotFound)
        ),
        "{name}: append to a missing upload"
    );
    d.put(&u, Bytes::new()).await.unwrap();
    assert_eq!(d.upload_size(&u).await.unwrap(), Some(0), "{name}");
    let a = d
        .append(&u, body(&[b"hel", b"lo"]), opts(0, Some(5)))
        .await
        .unwrap();
    assert_eq!(a.written, 5, "{name}");
    let digest = a.hasher.unwrap().finish();
    assert_eq!(
        digest,
        oci::Digest::of(oci::Algorithm::Sha256, b"hello"),
        "{name}"
    );
    assert!(
        matches!(
            d.append(&u, body(&[b"!"]), opts(4, None)).await,
            Err(AppendError::Offset {
                current: 5,
                expected: 4
            })
        ),
        "{name}: wrong offset"
    );
    for (chunk, len) in [(&b"abc"[..], 2), (&b"a"[..], 2)] {
        assert!(
            matches!(
                d.append(&u, body(&[chunk]), opts(5, Some(len))).await,
                Err(AppendError::Length { .. })
            ),
            "{name}: {} bytes announced as {len}",
            chunk.len()
        );
    }
    assert!(
        matches!(
            d.append(&u, broken(b"wor"), opts(5, None)).await,
            Err(AppendError::Body(_))
        ),
        "{name}: broken body"
    );
    assert_eq!(
        d.upload_size(&u).await.unwrap(),
        Some(5),
        "{name}: failed chunks kept nothing"
    );
    // Two appends at one offset: exactly one is kept.
    let racer = |text: &'static [u8]| {
        let (d, u) = (d.clone(), u.clone());
        tokio::spawn(async move { d.append(&u, body(&[text]), opts(5, None)).await.is_ok() })
    };
    let (a, b) = (racer(b" world"), racer(b" there"));
    let (a, b) = (a.await.unwrap(), b.await.unwrap());
    assert!(a ^ b, "{name}: racing appends {a} {b}");
    assert_eq!(d.upload_size(&u).await.unwrap(), Some(11), "{name}");
    let all = read_upload(&*d, &u, 0, 11).await;
    assert!(
        all == b"hello world" || all == b"hello there",
        "{name}: {all:?}"
    );
    assert_eq!(
        read_upload(&*d, &u, 3, 4).await,
        &all[3..7],
        "{name}: range"
    );
    // Promoted: one object with the content; the session's objects are gone.
    let blob = format!("{root}/blobs/x/data");
    d.promote(&u, &blob).await.unwrap();
    assert_eq!(
        d.get(&blob).await.unwrap().unwrap(),
        all,
        "{name}: promoted"
    );
    assert!(d.upload_size(&u).await.unwrap().is_none(), "{name}");
    assert!(
        d.list(&format!("{root}/uploads/one"))
            .await
            .unwrap()
            .is_empty(),
        "{name}: the session left objects behind"
    );
    d.delete(root).await.unwrap();
    assert!(d.list(root).await.unwrap().is_empty(), "{name}: cleaned up");
}
