//! The async handle over one model's [`State`]: `acquire` enqueues and waits for a slot, the
//! returned [`Permit`] holds it until dropped.
//!
//! The state sits behind one `std::sync::Mutex`, held only for a few map operations and never
//! across an `.await`. Waiters are woken by a oneshot each: whoever frees a slot (a dropped
//! permit, new capacity, a new request finding a free slot) dispatches under the lock and sends
//! the grant. A waiter whose future is dropped (client disconnect) takes its entry out of the
//! queue, or gives back a slot it was granted but never received. A waiter with a deadline stops
//! waiting at the deadline with `DeadlineExpired`. The clock is tokio's, so tests run on paused
//! time.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use crate::queue::{QueueConfig, Request, Snapshot, State};
use crate::{Lane, MIN_RETRY_AFTER, Rejected};

/// A slot handed to a waiter.
#[derive(Debug, Clone, Copy)]
struct Grant {
    lane: Lane,
    overflow: bool,
    at: Instant,
}

struct Inner {
    state: State,
    waiters: HashMap<u64, oneshot::Sender<Result<Grant, Rejected>>>,
}

impl Inner {
    /// Fails expired waiters, then fills every free slot that has a request for it.
    fn dispatch(&mut self, now: Instant) {
        for (id, rejected) in self.state.expire(now) {
            self.notify(id, Err(rejected));
        }
        while let Some(next) = self.state.next(now) {
            let grant = Grant { lane: next.lane, overflow: next.overflow, at: now };
            let delivered = self.waiters.remove(&next.id).is_some_and(|tx| tx.send(Ok(grant)).is_ok());
            if !delivered {
                // The waiter is gone: the slot goes to the next request.
                self.state.release(next.id);
            }
        }
    }

    fn notify(&mut self, id: u64, outcome: Result<Grant, Rejected>) {
        if let Some(tx) = self.waiters.remove(&id) {
            let _ = tx.send(outcome);
        }
    }
}

/// One model's queue, shared by every request to it. Cheap to clone.
#[derive(Clone)]
pub struct ModelQueue {
    inner: Arc<Mutex<Inner>>,
}

impl fmt::Debug for ModelQueue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ModelQueue").finish_non_exhaustive()
    }
}

impl ModelQueue {
    /// A queue with no capacity until [`ModelQueue::set_capacity`] is called.
    pub fn new(config: QueueConfig) -> Self {
        let inner = Inner { state: State::new(config, now()), waiters: HashMap::new() };
        ModelQueue { inner: Arc::new(Mutex::new(inner)) }
    }

    /// Waits for a slot for `request`. Refusals (full queue, no runner, unmeetable deadline) come
    /// back at once; `DeadlineExpired` when the deadline passes while queued. Dropping the future
    /// withdraws the request. `request.id` must be unique among this queue's live requests.
    pub async fn acquire(&self, request: Request) -> Result<Permit, Rejected> {
        let id = request.id;
        let deadline = request.deadline;
        let mut granted = {
            let mut inner = self.lock();
            let now = now();
            inner.state.enqueue(request, now)?;
            let (tx, rx) = oneshot::channel();
            inner.waiters.insert(id, tx);
            inner.dispatch(now);
            rx
        };
        let mut waiting = Waiting { queue: self, id, armed: true };
        let outcome = match deadline {
            None => (&mut granted).await,
            Some(deadline) => match tokio::time::timeout_at(deadline.into(), &mut granted).await {
                Ok(outcome) => outcome,
                Err(_elapsed) => {
                    if self.withdraw(id) {
                        waiting.armed = false;
                        return Err(Rejected::DeadlineExpired);
                    }
                    // Granted or refused at the same moment: the answer is already in the channel.
                    (&mut granted).await
                }
            },
        };
        waiting.armed = false;
        match outcome {
            Ok(Ok(grant)) => {
                Ok(Permit { queue: self.clone(), id, lane: grant.lane, overflow: grant.overflow, dispatched: grant.at })
            }
            Ok(Err(rejected)) => Err(rejected),
            // The sender is dropped only with a refusal sent first; be safe anyway.
            Err(_closed) => Err(Rejected::Unavailable { retry_after: MIN_RETRY_AFTER }),
        }
    }

    /// Sets the slots on the model's ready runners and dispatches into any new ones. With none
    /// left, every waiter is refused as `Unavailable` (or held, with a cold hold).
    pub fn set_capacity(&self, slots: usize) {
        let mut inner = self.lock();
        let now = now();
        for (id, rejected) in inner.state.set_capacity(slots, now) {
            inner.notify(id, Err(rejected));
        }
        inner.dispatch(now);
    }

    /// See [`State::set_cold_hold`]; held requests that run out of hold are refused at the next
    /// [`set_capacity`](Self::set_capacity) or dispatch after it.
    pub fn set_cold_hold(&self, hold: Option<Duration>) {
        self.lock().state.set_cold_hold(hold);
    }

    pub fn snapshot(&self) -> Snapshot {
        self.lock().state.snapshot()
    }

    /// Takes a still-queued request out; false if it was already dispatched or refused.
    fn withdraw(&self, id: u64) -> bool {
        let mut inner = self.lock();
        inner.waiters.remove(&id);
        inner.state.cancel(id)
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The state is left consistent between method calls, so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Withdraws an abandoned `acquire`: out of the queue if still there, or the slot given back if
/// it was granted but never picked up.
struct Waiting<'a> {
    queue: &'a ModelQueue,
    id: u64,
    armed: bool,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let mut inner = self.queue.lock();
        inner.waiters.remove(&self.id);
        if !inner.state.cancel(self.id) && inner.state.release(self.id) {
            inner.dispatch(now());
        }
    }
}

/// A slot on one of the model's runners. Dropping it frees the slot for the next request.
#[derive(Debug)]
pub struct Permit {
    queue: ModelQueue,
    id: u64,
    lane: Lane,
    overflow: bool,
    dispatched: Instant,
}

impl Permit {
    pub fn id(&self) -> u64 {
        self.id
    }

    /// The lane whose slot this is.
    pub fn lane(&self) -> Lane {
        self.lane
    }

    /// Whether the request overflowed into a larger lane than its own.
    pub fn overflow(&self) -> bool {
        self.overflow
    }

    /// How long the slot has been held.
    pub fn held(&self) -> Duration {
        now().saturating_duration_since(self.dispatched)
    }

    /// Records the tokens (input + generated) processed under this permit, for the queue's
    /// throughput estimate, and frees the slot.
    pub fn complete(self, tokens: u64) {
        let held = self.held();
        self.queue.lock().state.complete(self.id, tokens, held);
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut inner = self.queue.lock();
        inner.state.release(self.id);
        inner.dispatch(now());
    }
}

fn now() -> Instant {
    tokio::time::Instant::now().into_std()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Priority;

    fn request(id: u64, deadline: Option<Instant>) -> Request {
        Request {
            id,
            tenant: "t".into(),
            priority: Priority::Normal,
            input_tokens: 500,
            max_output_tokens: 400,
            deadline,
            weight: 1.0,
        }
    }

    /// Three slots, one per lane, with the medium and large ones taken (the permits returned)
    /// so that a second small request has to wait.
    async fn queue() -> (ModelQueue, [Permit; 2]) {
        let queue = ModelQueue::new(QueueConfig::default());
        queue.set_capacity(3);
        let medium = Request { input_tokens: 10_000, ..request(900, None) };
        let large = Request { input_tokens: 40_000, ..request(901, None) };
        let taken = [queue.acquire(medium).await.unwrap(), queue.acquire(large).await.unwrap()];
        (queue, taken)
    }

    #[tokio::test(start_paused = true)]
    async fn a_free_slot_is_granted_at_once_and_freed_on_drop() {
        let (queue, _taken) = queue().await;
        let permit = queue.acquire(request(1, None)).await.unwrap();
        assert_eq!(permit.lane(), Lane::Small);
        assert!(!permit.overflow());
        assert_eq!(queue.snapshot().in_flight, 3);
        drop(permit);
        assert_eq!(queue.snapshot().in_flight, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_permit_hands_its_slot_to_the_next_waiter() {
        let (queue, _taken) = queue().await;
        let first = queue.acquire(request(1, None)).await.unwrap();
        let second = tokio::spawn({
            let queue = queue.clone();
            async move { queue.acquire(request(2, None)).await.map(|p| p.id()) }
        });
        tokio::task::yield_now().await;
        let snapshot = queue.snapshot();
        assert_eq!((snapshot.queued, snapshot.in_flight), (1, 3));
        drop(first);
        assert_eq!(second.await.unwrap(), Ok(2));
        // The second permit was dropped when its task finished.
        assert_eq!(queue.snapshot().in_flight, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn a_dropped_acquire_leaves_the_queue() {
        let (queue, _taken) = queue().await;
        let first = queue.acquire(request(1, None)).await.unwrap();
        let waiter = tokio::spawn({
            let queue = queue.clone();
            async move { queue.acquire(request(2, None)).await.map(|p| p.id()) }
        });
        tokio::task::yield_now().await;
        assert_eq!(queue.snapshot().queued, 1);
        waiter.abort();
        assert!(waiter.await.unwrap_err().is_cancelled());
        assert_eq!(queue.snapshot().queued, 0);
        drop(first);
        let snapshot = queue.snapshot();
        assert_eq!((snapshot.queued, snapshot.in_flight), (0, 2));
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiter_whose_deadline_passes_gets_deadline_expired() {
        let (queue, _taken) = queue().await;
        let _first = queue.acquire(request(1, None)).await.unwrap();
        let started = tokio::time::Instant::now();
        let deadline = started.into_std() + Duration::from_secs(3);
        assert_eq!(queue.acquire(request(2, Some(deadline))).await.unwrap_err(), Rejected::DeadlineExpired);
        assert_eq!(started.elapsed(), Duration::from_secs(3));
        assert_eq!(queue.snapshot().queued, 0);
    }

    #[tokio::test(start_paused = true)]
    async fn losing_every_runner_refuses_waiters_at_once() {
        let (queue, _taken) = queue().await;
        let first = queue.acquire(request(1, None)).await.unwrap();
        let waiter = tokio::spawn({
            let queue = queue.clone();
            async move { queue.acquire(request(2, None)).await.map(|p| p.id()) }
        });
        tokio::task::yield_now().await;
        queue.set_capacity(0);
        assert!(matches!(waiter.await.unwrap(), Err(Rejected::Unavailable { .. })));
        assert!(matches!(queue.acquire(request(3, None)).await, Err(Rejected::Unavailable { .. })));
        // The running request still finishes and gives its slot back.
        drop(first);
        assert_eq!(queue.snapshot().in_flight, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn new_capacity_dispatches_waiters() {
        let (queue, _taken) = queue().await;
        let first = queue.acquire(request(1, None)).await.unwrap();
        let waiter = tokio::spawn({
            let queue = queue.clone();
            async move { queue.acquire(request(2, None)).await.map(|p| p.id()) }
        });
        tokio::task::yield_now().await;
        queue.set_capacity(4); // two small slots
        assert_eq!(waiter.await.unwrap(), Ok(2));
        drop(first);
    }

    #[tokio::test(start_paused = true)]
    async fn completing_a_permit_feeds_the_throughput_estimate() {
        let (queue, _taken) = queue().await;
        let before = queue.snapshot().lanes[0].tokens_per_second;
        let permit = queue.acquire(request(1, None)).await.unwrap();
        tokio::time::advance(Duration::from_secs(2)).await;
        permit.complete(2_000); // 1,000 tokens a second on one slot
        let after = queue.snapshot();
        assert_eq!(after.in_flight, 2);
        assert!((after.lanes[0].tokens_per_second - (0.8 * before + 0.2 * 1_000.0)).abs() < 1e-6);
    }
}
