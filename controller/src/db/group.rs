//! Group commit's queue. On SQLite every write transaction pays a `BEGIN`,
//! a synced `COMMIT` and a hand-over of the one writer's turn; a fleet's
//! steady traffic (heartbeats, metric batches) pays them once per group
//! instead. Callers put an item in a [`GroupQueue`]; one task, started on
//! first use, takes the items that queued while the previous group was
//! being written, up to the queue's group size, and hands them to the
//! queue's `apply` as one group. Each item carries the answer its caller
//! waits for, and when it asked: a group queues for the writer's turn by
//! its oldest item ([`super::Db::begin_write_asked_at`]), so that grouping
//! never makes a caller wait longer than asking alone would have.
//!
//! Each group runs on a task of its own, so a panic in `apply` fails that
//! group's callers (their answers are dropped), not the queue.

use std::future::Future;
use std::sync::OnceLock;
use std::time::Instant;
use tokio::sync::mpsc;

/// Items waiting at most (beyond them callers wait to enqueue).
const QUEUE: usize = 4096;

/// An item of a group: when its caller asked.
pub trait Queued: Send + 'static {
    fn asked(&self) -> Instant;
}

/// When the oldest item of `group` was asked (now for an empty group).
pub fn oldest<T: Queued>(group: &[T]) -> Instant {
    group
        .iter()
        .map(Queued::asked)
        .min()
        .unwrap_or_else(Instant::now)
}

/// A queue whose task applies its items in groups of at most `group`.
pub struct GroupQueue<T> {
    group: usize,
    queue: OnceLock<mpsc::Sender<T>>,
}

/// The queue's task has stopped (the runtime is shutting down).
#[derive(Debug)]
pub struct Stopped;

impl<T: Queued> GroupQueue<T> {
    pub const fn new(group: usize) -> Self {
        Self {
            group,
            queue: OnceLock::new(),
        }
    }

    /// Queues `item`; on first use starts the task with the `apply` that
    /// `start` makes (later calls' `start` is not called). `apply` answers
    /// each item's caller through the item itself.
    pub async fn push<A, F>(&self, item: T, start: impl FnOnce() -> A) -> Result<(), Stopped>
    where
        A: FnMut(Vec<T>) -> F + Send + 'static,
        F: Future<Output = ()> + Send + 'static,
    {
        let group = self.group.max(1);
        let queue = self.queue.get_or_init(|| {
            let (tx, rx) = mpsc::channel(QUEUE);
            tokio::spawn(run(rx, group, start()));
            tx
        });
        queue.send(item).await.map_err(|_| Stopped)
    }
}

async fn run<T, A, F>(mut rx: mpsc::Receiver<T>, size: usize, mut apply: A)
where
    T: Queued,
    A: FnMut(Vec<T>) -> F,
    F: Future<Output = ()> + Send + 'static,
{
    while let Some(first) = rx.recv().await {
        let mut group = vec![first];
        while group.len() < size {
            match rx.try_recv() {
                Ok(item) => group.push(item),
                Err(_) => break,
            }
        }
        let _ = tokio::spawn(apply(group)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::sync::oneshot;

    struct Item {
        n: u32,
        asked: Instant,
        done: oneshot::Sender<usize>,
    }

    impl Queued for Item {
        fn asked(&self) -> Instant {
            self.asked
        }
    }

    /// Items that queue while a group is applied form the next group, at
    /// most `group` of them, in order; a panicking group fails only its
    /// own callers.
    #[tokio::test]
    async fn items_queued_meanwhile_form_bounded_groups_in_order() {
        let q = Arc::new(GroupQueue::<Item>::new(3));
        let seen = Arc::new(Mutex::new(Vec::<Vec<u32>>::new()));
        let start = |seen: Arc<Mutex<Vec<Vec<u32>>>>| {
            move || {
                move |group: Vec<Item>| {
                    let seen = seen.clone();
                    async move {
                        seen.lock()
                            .unwrap()
                            .push(group.iter().map(|i| i.n).collect());
                        assert!(group.iter().all(|i| i.n != 99), "a bad item");
                        let len = group.len();
                        for i in group {
                            let _ = i.done.send(len);
                        }
                    }
                }
            }
        };
        let mut answers = Vec::new();
        for n in [1, 2, 3, 4, 5, 99, 6] {
            let (done, answer) = oneshot::channel();
            let item = Item {
                n,
                asked: Instant::now(),
                done,
            };
            q.push(item, start(seen.clone())).await.expect("queued");
            answers.push(answer);
        }
        // On this one-threaded runtime the task first runs when the answers
        // are awaited: every item has queued by then.
        let mut got = Vec::new();
        for a in answers {
            got.push(a.await.ok());
        }
        assert_eq!(
            *seen.lock().unwrap(),
            vec![vec![1, 2, 3], vec![4, 5, 99], vec![6]]
        );
        assert_eq!(
            got,
            vec![Some(3), Some(3), Some(3), None, None, None, Some(1)]
        );
        // The queue still works after a group panicked.
        let (done, answer) = oneshot::channel();
        let item = Item {
            n: 7,
            asked: Instant::now(),
            done,
        };
        q.push(item, || -> fn(Vec<Item>) -> std::future::Ready<()> {
            unreachable!("started once")
        })
        .await
        .expect("queued");
        assert_eq!(answer.await.ok(), Some(1));
    }

    #[test]
    fn a_group_is_as_old_as_its_oldest_item() {
        let t0 = Instant::now();
        let item = |secs| {
            let (done, _) = oneshot::channel();
            Item {
                n: 0,
                asked: t0 + std::time::Duration::from_secs(secs),
                done,
            }
        };
        assert_eq!(
            oldest(&[item(3), item(1), item(2)]),
            t0 + std::time::Duration::from_secs(1)
        );
    }
}
