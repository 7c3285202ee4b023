//! Reads of a hot key that share the store's round trips without reading the past.
//!
//! A read is answered only by a `GET` sent after it arrived — never by one already on its
//! way, which the store may have answered before a write the caller must see (a tag moved
//! through another gateway just before this request came). While one `GET` of a key is on its
//! way, the reads of that key that arrive meanwhile wait for it to come back and then share
//! the next one. So a key asked for by many requests at once costs the store one round trip
//! at a time, however many ask; a read that finds no `GET` of its key on the way sends its own
//! at once and waits for nothing.
//!
//! The reader whose `GET` is on its way may be given up (its request cancelled): the others
//! are woken and one of them sends the next.

use super::{StateError, StateStore};
use crate::in_force::lock;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// A `GET`'s answer as every reader sharing it gets it (the store's error as its text).
type Answer = Result<Option<Vec<u8>>, String>;

/// The reads of every key in progress.
#[derive(Default)]
pub struct SharedReads {
    keys: Mutex<HashMap<String, Slot>>,
}

/// One key's reads in progress.
#[derive(Default)]
struct Slot {
    /// How many `GET`s of the key were sent (the number of the last one).
    sent: u64,
    /// Whether one is on its way.
    flying: bool,
    /// The last answer, with the number of its `GET`.
    last: Option<(u64, Answer)>,
    /// Reads of the key not yet answered (the slot goes when none is left).
    readers: usize,
    /// Woken when a `GET` comes back or is given up.
    landed: Arc<Notify>,
}

/// What a read does next.
enum Next {
    /// A `GET` sent after it arrived came back with this.
    Answered(Answer),
    /// None is on its way: it sends `GET` number `n`.
    Send(u64),
    /// One sent before it arrived is on its way: it waits for that to land (made while the
    /// slot was locked, so a landing after that wakes it).
    Wait(tokio::sync::futures::OwnedNotified),
}

/// One read, counted in its slot until it ends (answered or given up).
struct Reader<'a> {
    reads: &'a SharedReads,
    key: &'a str,
    /// The number of the first `GET` sent after this read arrived: what may answer it.
    needs: u64,
}

/// A `GET` on its way; given up (dropped before it landed), it lets another reader send one.
struct Flight<'a> {
    reads: &'a SharedReads,
    key: &'a str,
    landed: bool,
}

impl SharedReads {
    /// The value under `key` in `store`, as a `GET` sent after this call began reads it.
    pub async fn get(
        &self,
        store: &dyn StateStore,
        key: &str,
    ) -> Result<Option<Vec<u8>>, StateError> {
        let reader = Reader::arrive(self, key);
        loop {
            match reader.next() {
                Next::Answered(answer) => return answer.map_err(StateError),
                Next::Send(n) => {
                    let mut flight = Flight {
                        reads: self,
                        key,
                        landed: false,
                    };
                    let answer = store.get(key).await;
                    flight.land(n, &answer);
                    return answer;
                }
                Next::Wait(landed) => landed.await,
            }
        }
    }

    /// Keys with reads in progress (for tests: none is left behind).
    #[cfg(test)]
    fn in_progress(&self) -> usize {
        lock(&self.keys).len()
    }
}

impl<'a> Reader<'a> {
    fn arrive(reads: &'a SharedReads, key: &'a str) -> Self {
        let mut keys = lock(&reads.keys);
        let slot = keys.entry(key.to_owned()).or_default();
        slot.readers += 1;
        Reader {
            reads,
            key,
            needs: slot.sent + 1,
        }
    }
}

impl Reader<'_> {
    fn next(&self) -> Next {
        let mut keys = lock(&self.reads.keys);
        let slot = keys.entry(self.key.to_owned()).or_default();
        match &slot.last {
            Some((n, answer)) if *n >= self.needs => Next::Answered(answer.clone()),
            _ if slot.flying => Next::Wait(slot.landed.clone().notified_owned()),
            _ => {
                slot.flying = true;
                slot.sent += 1;
                Next::Send(slot.sent)
            }
        }
    }
}

impl Drop for Reader<'_> {
    fn drop(&mut self) {
        let mut keys = lock(&self.reads.keys);
        if let Some(slot) = keys.get_mut(self.key) {
            slot.readers -= 1;
            if slot.readers == 0 {
                keys.remove(self.key);
            }
        }
    }
}

impl Flight<'_> {
    fn land(&mut self, n: u64, answer: &Result<Option<Vec<u8>>, StateError>) {
        self.landed = true;
        let mut keys = lock(&self.reads.keys);
        if let Some(slot) = keys.get_mut(self.key) {
            slot.flying = false;
            slot.last = Some((n, answer.as_ref().map_err(|e| e.0.clone()).cloned()));
            slot.landed.notify_waiters();
        }
    }
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        if self.landed {
            return;
        }
        let mut keys = lock(&self.reads.keys);
        if let Some(slot) = keys.get_mut(self.key) {
            slot.flying = false;
            slot.landed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::MemoryStore;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    /// A store whose `GET`s are answered at once and whose answers wait for the test to let
    /// them through (an answer on its way back), counting them.
    struct Gated {
        inner: MemoryStore,
        gets: AtomicUsize,
        gate: tokio::sync::Semaphore,
    }

    #[async_trait::async_trait]
    impl StateStore for Gated {
        async fn get(&self, key: &str) -> Result<Option<Vec<u8>>, StateError> {
            self.gets.fetch_add(1, Ordering::SeqCst);
            let answer = self.inner.get(key).await;
            match self.gate.acquire().await {
                Ok(_pass) => answer,
                Err(_) => Err(StateError("the store is down".into())),
            }
        }
        async fn set(&self, k: &str, v: Vec<u8>, ttl: Duration) -> Result<(), StateError> {
            self.inner.set(k, v, ttl).await
        }
        async fn put(&self, k: &str, v: Vec<u8>) -> Result<(), StateError> {
            self.inner.put(k, v).await
        }
        async fn delete(&self, k: &str) -> Result<(), StateError> {
            self.inner.delete(k).await
        }
        async fn scan(&self, p: &str) -> Result<Vec<(String, Vec<u8>)>, StateError> {
            self.inner.scan(p).await
        }
        async fn take(&self, k: &str) -> Result<Option<Vec<u8>>, StateError> {
            self.inner.take(k).await
        }
        async fn replace(&self, k: &str, v: Vec<u8>, ttl: Duration) -> Result<bool, StateError> {
            self.inner.replace(k, v, ttl).await
        }
        async fn incr(&self, k: &str, ttl: Duration) -> Result<u64, StateError> {
            self.inner.incr(k, ttl).await
        }
        async fn ping(&self) -> Result<(), StateError> {
            Ok(())
        }
        async fn append(&self, p: &str, v: Vec<u8>) -> Result<u64, StateError> {
            self.inner.append(p, v).await
        }
    }

    fn gated() -> Arc<Gated> {
        Arc::new(Gated {
            inner: MemoryStore::default(),
            gets: AtomicUsize::new(0),
            gate: tokio::sync::Semaphore::new(0),
        })
    }

    /// Lets the task run until it waits (the test runtime has one thread).
    async fn settle() {
        for _ in 0..10 {
            tokio::task::yield_now().await;
        }
    }

    #[tokio::test]
    async fn reads_arriving_while_a_get_flies_share_the_next_one_which_sees_a_write_made_meanwhile()
    {
        let store = gated();
        let reads = Arc::new(SharedReads::default());
        store
            .set("k", b"old".to_vec(), Duration::from_secs(60))
            .await
            .unwrap();
        let read = |s: &Arc<Gated>, r: &Arc<SharedReads>| {
            let (s, r) = (s.clone(), r.clone());
            tokio::spawn(async move { r.get(s.as_ref(), "k").await.unwrap() })
        };
        let first = read(&store, &reads);
        settle().await;
        assert_eq!(store.gets.load(Ordering::SeqCst), 1);
        // A write lands while the first GET is on its way; reads after it must see it.
        store
            .set("k", b"new".to_vec(), Duration::from_secs(60))
            .await
            .unwrap();
        let later: Vec<_> = (0..16).map(|_| read(&store, &reads)).collect();
        settle().await;
        assert_eq!(
            store.gets.load(Ordering::SeqCst),
            1,
            "they wait for the GET on its way"
        );
        store.gate.add_permits(1);
        assert_eq!(first.await.unwrap(), Some(b"old".to_vec()));
        settle().await;
        assert_eq!(
            store.gets.load(Ordering::SeqCst),
            2,
            "one GET for all sixteen"
        );
        store.gate.add_permits(1);
        for r in later {
            assert_eq!(r.await.unwrap(), Some(b"new".to_vec()));
        }
        assert_eq!(reads.in_progress(), 0);
    }

    #[tokio::test]
    async fn a_given_up_get_lets_a_waiting_reader_send_its_own_and_a_failed_one_fails_its_sharers()
    {
        let store = gated();
        let reads = Arc::new(SharedReads::default());
        let read = || {
            let (s, r) = (store.clone(), reads.clone());
            tokio::spawn(async move { r.get(s.as_ref(), "k").await.map_err(|e| e.0) })
        };
        let first = read();
        settle().await;
        let second = read();
        settle().await;
        assert_eq!(store.gets.load(Ordering::SeqCst), 1);
        first.abort();
        settle().await;
        assert_eq!(
            store.gets.load(Ordering::SeqCst),
            2,
            "the waiting reader sent its own"
        );
        let (a, b) = (read(), read());
        settle().await;
        assert_eq!(store.gets.load(Ordering::SeqCst), 2);
        // The store goes down: the GET on its way fails, and the one a and b share too.
        store.gate.close();
        for r in [second, a, b] {
            assert_eq!(r.await.unwrap(), Err("the store is down".to_string()));
        }
        assert_eq!(store.gets.load(Ordering::SeqCst), 3);
        assert_eq!(reads.in_progress(), 0);
    }
}
