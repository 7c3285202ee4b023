//! Reads of a hot key that share the store's round trips without reading the past.
//!
//! A read is answered only by a `GET` sent after it arrived — never by one already on its
//! way, which the store may have answered before a write the caller must see (a tag moved
//! through another gateway just before this request came). While one `GET` of a key is on its
//! way, the reads of that key that arrive meanwhile wait for it to come back and then share
//! the next one. So a key asked for by many requests at once costs the store one round trip
//! at a time, however many ask; a read that finds no `GET` of its key on the way sends its own
//! at once and waits for nothing but its answer.
//!
//! A `GET` runs on a task of its own: a request given up (its client gone) does not take the
//! others' `GET` with it. A slot stays while a `GET` of its key is on the way, so a `GET`
//! sent before a slot was made never answers that slot's reads.

use super::{StateError, StateStore};
use crate::in_force::lock;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use tokio::sync::Notify;

/// A `GET`'s answer as every reader sharing it gets it (the store's error as its text).
type Answer = Result<Option<Vec<u8>>, String>;

type Slots = Arc<Mutex<HashMap<String, Slot>>>;

/// The reads of every key in progress.
#[derive(Default)]
pub struct SharedReads {
    slots: Slots,
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
    /// Reads of the key not yet answered.
    readers: usize,
    /// Wakes the waiting reads when a `GET` comes back.
    wake: Arc<Notify>,
}

impl Slot {
    /// Nothing waits on it and nothing will land in it.
    fn idle(&self) -> bool {
        self.readers == 0 && !self.flying
    }
}

/// What a read does next.
enum Next {
    /// A `GET` sent after it arrived came back with this.
    Answered(Answer),
    /// None is on its way: it sends `GET` number `n`.
    Send(u64),
    /// One is on its way: it waits for that to come back (made while the slot was locked, so
    /// a landing after that wakes it).
    Wait(tokio::sync::futures::OwnedNotified),
}

/// One read, counted in its slot until it ends (answered or given up).
struct Reader<'a> {
    slots: &'a Slots,
    key: &'a str,
    /// The number of the first `GET` sent after this read arrived: what may answer it.
    needs: u64,
}

/// A `GET` on its way; if its task ends without an answer (a panic), the slot is freed for
/// another.
struct Flight {
    slots: Slots,
    key: String,
    n: u64,
    landed: bool,
}

impl SharedReads {
    /// The value under `key` in `store`, as a `GET` sent after this call began reads it.
    pub async fn get(
        &self,
        store: &Arc<dyn StateStore>,
        key: &str,
    ) -> Result<Option<Vec<u8>>, StateError> {
        let reader = Reader::arrive(&self.slots, key);
        loop {
            match reader.next() {
                Next::Answered(answer) => return answer.map_err(StateError),
                Next::Send(n) => {
                    let mut flight = Flight {
                        slots: self.slots.clone(),
                        key: key.to_owned(),
                        n,
                        landed: false,
                    };
                    let store = store.clone();
                    tokio::spawn(async move {
                        let answer = store.get(&flight.key).await;
                        flight.land(answer.map_err(|e| e.0));
                    });
                    // Then it waits for its answer as the others do (the next turn).
                }
                Next::Wait(woken) => woken.await,
            }
        }
    }

    /// Keys with reads in progress (for tests: none is left behind).
    #[cfg(test)]
    fn in_progress(&self) -> usize {
        lock(&self.slots).len()
    }
}

impl<'a> Reader<'a> {
    fn arrive(slots: &'a Slots, key: &'a str) -> Self {
        let mut map = lock(slots);
        let slot = map.entry(key.to_owned()).or_default();
        slot.readers += 1;
        Reader {
            slots,
            key,
            needs: slot.sent + 1,
        }
    }

    fn next(&self) -> Next {
        let mut slots = lock(self.slots);
        // A slot with readers is never removed; if it were, fail closed.
        let Some(slot) = slots.get_mut(self.key) else {
            return Next::Answered(Err("the read's slot is gone".into()));
        };
        match &slot.last {
            Some((n, answer)) if *n >= self.needs => Next::Answered(answer.clone()),
            _ if slot.flying => Next::Wait(slot.wake.clone().notified_owned()),
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
        let mut slots = lock(self.slots);
        if let Some(slot) = slots.get_mut(self.key) {
            slot.readers = slot.readers.saturating_sub(1);
            if slot.idle() {
                slots.remove(self.key);
            }
        }
    }
}

impl Flight {
    fn land(&mut self, answer: Answer) {
        self.landed = true;
        self.end(Some(answer));
    }

    fn end(&self, answer: Option<Answer>) {
        let mut slots = lock(&self.slots);
        if let Some(slot) = slots.get_mut(&self.key) {
            slot.flying = false;
            if let Some(answer) = answer {
                slot.last = Some((self.n, answer));
            }
            slot.wake.notify_waiters();
            if slot.idle() {
                slots.remove(&self.key);
            }
        }
    }
}

impl Drop for Flight {
    fn drop(&mut self) {
        if !self.landed {
            self.end(None);
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
                Ok(pass) => {
                    // One permit lets one answer through.
                    pass.forget();
                    answer
                }
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

    /// Lets the spawned reads and `GET`s run until each waits (the test runtime has one
    /// thread; each step of theirs takes a turn or two).
    async fn settle() {
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
    }

    /// A read of `k` on a task of its own.
    fn read(
        store: &Arc<Gated>,
        reads: &Arc<SharedReads>,
    ) -> tokio::task::JoinHandle<Result<Option<Vec<u8>>, String>> {
        let store: Arc<dyn StateStore> = store.clone();
        let reads = reads.clone();
        tokio::spawn(async move { reads.get(&store, "k").await.map_err(|e| e.0) })
    }

    fn gets(store: &Gated) -> usize {
        store.gets.load(Ordering::SeqCst)
    }

    async fn put(store: &Gated, value: &str) {
        let ttl = Duration::from_secs(60);
        store.set("k", value.into(), ttl).await.unwrap();
    }

    #[tokio::test]
    async fn reads_arriving_while_a_get_flies_share_the_next_one_which_sees_a_write_made_meanwhile()
    {
        let (store, reads) = (gated(), Arc::new(SharedReads::default()));
        put(&store, "old").await;
        let first = read(&store, &reads);
        settle().await;
        assert_eq!(gets(&store), 1);
        // A write lands while the first GET's answer is on its way; reads after it see it.
        put(&store, "new").await;
        let later: Vec<_> = (0..16).map(|_| read(&store, &reads)).collect();
        settle().await;
        assert_eq!(gets(&store), 1, "they wait for the GET on its way");
        store.gate.add_permits(1);
        assert_eq!(first.await.unwrap(), Ok(Some(b"old".to_vec())));
        settle().await;
        assert_eq!(gets(&store), 2, "one GET for all sixteen");
        assert!(
            later.iter().all(|r| !r.is_finished()),
            "they wait for its answer"
        );
        store.gate.add_permits(1);
        for r in later {
            assert_eq!(r.await.unwrap(), Ok(Some(b"new".to_vec())));
        }
        assert_eq!(gets(&store), 2);
        assert_eq!(reads.in_progress(), 0);
    }

    #[tokio::test]
    async fn a_get_outlives_the_request_that_sent_it_and_a_failed_get_fails_all_who_share_it() {
        let (store, reads) = (gated(), Arc::new(SharedReads::default()));
        let first = read(&store, &reads);
        settle().await;
        let second = read(&store, &reads);
        settle().await;
        first.abort();
        settle().await;
        assert_eq!(gets(&store), 1, "the GET goes on without its request");
        store.gate.add_permits(1);
        settle().await;
        assert_eq!(gets(&store), 2, "the waiting read sent the next");
        let (a, b) = (read(&store, &reads), read(&store, &reads));
        settle().await;
        assert_eq!(gets(&store), 2);
        // The store goes down: the GET on its way fails, and the one a and b share too.
        store.gate.close();
        for r in [second, a, b] {
            assert_eq!(r.await.unwrap(), Err("the store is down".to_string()));
        }
        assert_eq!(gets(&store), 3);
        assert_eq!(reads.in_progress(), 0);
    }

    #[tokio::test]
    async fn a_get_whose_readers_all_left_never_answers_a_read_that_came_after_it() {
        let (store, reads) = (gated(), Arc::new(SharedReads::default()));
        put(&store, "old").await;
        let first = read(&store, &reads);
        settle().await;
        first.abort();
        settle().await;
        assert_eq!(reads.in_progress(), 1, "the slot stays while its GET flies");
        put(&store, "new").await;
        let late = read(&store, &reads);
        store.gate.add_permits(2);
        assert_eq!(late.await.unwrap(), Ok(Some(b"new".to_vec())));
        assert_eq!(gets(&store), 2);
        assert_eq!(reads.in_progress(), 0);
    }
}
