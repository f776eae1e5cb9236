//! The scheduler thread: it owns the engine's [`Scheduler`], takes requests from a channel,
//! runs batch after batch while there is work, and routes each request's events to its stream.
//!
//! Before every step it drops requests whose stream the client has closed (their KV blocks are
//! freed before the next decode step) and those past their deadline. A request's event channel
//! is unbounded, but never holds more than its `max_tokens` events (and, when it scores its
//! prompt, one more per prefill step).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::time::{Duration, Instant};

use mantle_engine::scheduler::SchedulerStats;
use mantle_engine::{EngineError, Event, FinishReason, GenerateRequest, Scheduler};
use tokio::sync::{mpsc, oneshot, watch};

use crate::health::HourlyRate;
use crate::metrics::Metrics;

/// What a request's stream receives.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    Event(Event),
    DeadlineExceeded,
}

struct Submit {
    request: GenerateRequest,
    deadline: Option<Instant>,
    events: mpsc::UnboundedSender<Output>,
    accepted: oneshot::Sender<Result<(), EngineError>>,
}

/// Engine statistics, published after every step.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct LoopStats {
    pub scheduler: SchedulerStats,
    pub tokens_per_second: f32,
    /// KV blocks that failed their checksum in the last hour.
    pub corruptions_last_hour: u64,
}

/// A handle to the scheduler thread; cheap to clone.
#[derive(Clone)]
pub struct EngineHandle {
    submit: std_mpsc::Sender<Submit>,
    stats: watch::Receiver<LoopStats>,
    /// Raised with each request above the lowest priority: a step of batch sequences then stops
    /// between two layers, so the request is taken up at once (see the scheduler).
    interrupt: Arc<AtomicBool>,
}

struct Active {
    events: mpsc::UnboundedSender<Output>,
    deadline: Option<Instant>,
    accepted_at: Instant,
    first_token: bool,
}

impl EngineHandle {
    /// Starts the scheduler thread.
    pub fn spawn(mut scheduler: Scheduler, metrics: Metrics) -> std::io::Result<Self> {
        let interrupt = Arc::new(AtomicBool::new(false));
        scheduler.set_interrupt(interrupt.clone());
        let (submit, requests) = std_mpsc::channel();
        let (stats_tx, stats) = watch::channel(LoopStats { scheduler: scheduler.stats(), ..Default::default() });
        std::thread::Builder::new()
            .name("mantle-scheduler".into())
            .spawn(move || run(scheduler, requests, stats_tx, metrics))?;
        Ok(Self { submit, stats, interrupt })
    }

    /// Queues a request; its events arrive on the returned channel. Dropping the receiver
    /// cancels the request.
    pub async fn generate(
        &self,
        request: GenerateRequest,
        deadline: Option<Instant>,
    ) -> Result<mpsc::UnboundedReceiver<Output>, EngineError> {
        let (events, receiver) = mpsc::unbounded_channel();
        let (accepted, verdict) = oneshot::channel();
        // Raised before the request can be taken: the scheduler lowers it as it adds the
        // request, so raising it after could leave it up and stop every batch step after.
        if request.priority > 0 {
            self.interrupt.store(true, Ordering::Relaxed);
        }
        self.submit
            .send(Submit { request, deadline, events, accepted })
            .map_err(|_| EngineError::Io("the scheduler thread has stopped".into()))?;
        verdict.await.map_err(|_| EngineError::Io("the scheduler thread has stopped".into()))??;
        Ok(receiver)
    }

    pub fn stats(&self) -> watch::Receiver<LoopStats> {
        self.stats.clone()
    }
}

fn run(
    mut scheduler: Scheduler,
    requests: std_mpsc::Receiver<Submit>,
    stats: watch::Sender<LoopStats>,
    metrics: Metrics,
) {
    let mut active: HashMap<u64, Active> = HashMap::new();
    let mut recent: VecDeque<(Instant, u64)> = VecDeque::new();
    let mut next_id = 0u64;
    let mut corruption_rate = HourlyRate::default();
    loop {
        // Wait while idle (checking cached KV blocks now and then); otherwise take whatever has
        // arrived and go on stepping.
        if !scheduler.has_work() {
            match requests.recv_timeout(IDLE_SWEEP_INTERVAL) {
                Ok(submit) => accept(&mut scheduler, &mut active, &mut next_id, submit, &metrics),
                Err(std_mpsc::RecvTimeoutError::Timeout) => {
                    scheduler.sweep(IDLE_SWEEP_BLOCKS);
                    publish(&scheduler, &stats, &metrics, 0.0, &mut corruption_rate);
                    continue;
                }
                Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
            }
        }
        while let Ok(submit) = requests.try_recv() {
            accept(&mut scheduler, &mut active, &mut next_id, submit, &metrics);
        }
        drop_abandoned(&mut scheduler, &mut active, &metrics);

        let events = scheduler.step();
        for event in events {
            route(event, &mut active, &metrics);
        }

        let now = Instant::now();
        recent.push_back((now, scheduler.stats().generated_tokens));
        while recent.front().is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(5)) {
            recent.pop_front();
        }
        let tokens_per_second = match (recent.front(), recent.back()) {
            (Some((t0, n0)), Some((t1, n1))) if t1 > t0 => (n1 - n0) as f32 / t1.duration_since(*t0).as_secs_f32(),
            _ => 0.0,
        };
        publish(&scheduler, &stats, &metrics, tokens_per_second, &mut corruption_rate);
    }
}

/// Cached blocks checked per second while idle (each step checks one as well).
const IDLE_SWEEP_BLOCKS: usize = 64;
const IDLE_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

fn publish(
    scheduler: &Scheduler,
    stats: &watch::Sender<LoopStats>,
    metrics: &Metrics,
    tokens_per_second: f32,
    corruption_rate: &mut HourlyRate,
) {
    let s = scheduler.stats();
    let corruptions_last_hour = corruption_rate.observe(Instant::now(), s.kv_corruptions);
    metrics.queue_depth.set(s.waiting as i64);
    metrics.running_sequences.set(s.running as i64);
    metrics.kv_blocks_free.set(s.free_blocks as i64);
    metrics.kv_blocks_total.set(s.total_blocks as i64);
    metrics.kv_cached_blocks.set(s.cached_blocks as i64);
    // The scheduler keeps running totals; the counters catch up to them.
    metrics.preemptions.inc_by(s.preemptions.saturating_sub(metrics.preemptions.get()));
    metrics.interrupted_steps.inc_by(s.interrupted_steps.saturating_sub(metrics.interrupted_steps.get()));
    metrics.prefix_hit_tokens.inc_by(s.prefix_hit_tokens.saturating_sub(metrics.prefix_hit_tokens.get()));
    metrics.kv_corruptions.inc_by(s.kv_corruptions.saturating_sub(metrics.kv_corruptions.get()));
    metrics.swaps_out.inc_by(s.swaps_out.saturating_sub(metrics.swaps_out.get()));
    metrics.swap_bytes.set(s.swap_bytes as i64);
    stats.send_replace(LoopStats { scheduler: s, tokens_per_second, corruptions_last_hour });
}

fn accept(
    scheduler: &mut Scheduler,
    active: &mut HashMap<u64, Active>,
    next_id: &mut u64,
    submit: Submit,
    metrics: &Metrics,
) {
    *next_id += 1;
    let mut request = submit.request;
    request.id = *next_id;
    let prompt_tokens = request.prompt.len() as u64;
    match scheduler.add(request) {
        Ok(()) => {
            metrics.prompt_tokens.inc_by(prompt_tokens);
            active.insert(
                *next_id,
                Active {
                    events: submit.events,
                    deadline: submit.deadline,
                    accepted_at: Instant::now(),
                    first_token: true,
                },
            );
            let _ = submit.accepted.send(Ok(()));
        }
        Err(e) => {
            metrics.requests.with_label_values(&["rejected"]).inc();
            let _ = submit.accepted.send(Err(e));
        }
    }
}

/// Cancels requests whose client went away or whose deadline passed.
fn drop_abandoned(scheduler: &mut Scheduler, active: &mut HashMap<u64, Active>, metrics: &Metrics) {
    let now = Instant::now();
    active.retain(|&id, a| {
        if a.events.is_closed() {
            scheduler.cancel(id);
            metrics.requests.with_label_values(&["cancelled"]).inc();
            tracing::debug!(sequence = id, "client went away; generation cancelled");
            return false;
        }
        if a.deadline.is_some_and(|d| now >= d) {
            scheduler.cancel(id);
            let _ = a.events.send(Output::DeadlineExceeded);
            metrics.requests.with_label_values(&["deadline_exceeded"]).inc();
            return false;
        }
        true
    });
}

fn route(event: Event, active: &mut HashMap<u64, Active>, metrics: &Metrics) {
    let id = match &event {
        Event::Token { id, .. }
        | Event::Finished { id, .. }
        | Event::PromptLogprobs { id, .. }
        | Event::Failed { id, .. } => *id,
    };
    let Some(a) = active.get_mut(&id) else { return };
    match &event {
        Event::Token { .. } => {
            metrics.generated_tokens.inc();
            if a.first_token {
                a.first_token = false;
                metrics.time_to_first_token.observe(a.accepted_at.elapsed().as_secs_f64());
            }
        }
        Event::Finished { reason, .. } => {
            let outcome = match reason {
                FinishReason::EndTurn => "end_turn",
                FinishReason::MaxTokens => "max_tokens",
                FinishReason::StopSequence => "stop_sequence",
            };
            metrics.requests.with_label_values(&[outcome]).inc();
        }
        Event::PromptLogprobs { .. } => {}
        Event::Failed { .. } => metrics.requests.with_label_values(&["failed"]).inc(),
    }
    let finished = matches!(event, Event::Finished { .. } | Event::Failed { .. });
    let _ = a.events.send(Output::Event(event));
    if finished {
        active.remove(&id);
    }
}
