//! The per-model admission queue: one plain [`State`] that decides which request runs next on a
//! model's slots. No I/O and no hidden clock — every method that depends on time takes `now` —
//! so it is tested directly; [`crate::ModelQueue`] is the async handle the router uses.
//!
//! # Algorithm
//!
//! **Lanes.** A request is classified by size ([`crate::classify`]) into the small, medium or
//! large lane. Each lane owns its share of the slots ([`crate::lane_slots`]) and its own queue,
//! so a 100K-token prompt never waits in front of a chat turn.
//!
//! **Score.** `score = level × 1000 − wait_ms × aging + deadline_bonus`, lower first (see
//! [`priority_score`]). Aging lowers every waiting request's score at the same rate, so the order
//! of two queued requests never changes while they wait: the queue stores the time-invariant key
//! `score + aging × enqueued_ms` and compares keys. The deadline bonus is therefore fixed at
//! enqueue, from how close the deadline was then; a request that can no longer make its deadline
//! is refused at the door or expired ([`State::expire`]) rather than promoted.
//!
//! **Classes, then tenants.** A lane's requests are grouped into classes by priority level. When a
//! slot frees, the class holding the best-scored request wins (so CRITICAL goes before LOW across
//! tenants, and a LOW request that has waited 30 s longer than the oldest CRITICAL one gets a
//! turn). Within that class, weighted fair queuing over tokens picks the tenant
//! (deficit round robin in its virtual-time form, with bounded idle credit; see `fair.rs`), and
//! that tenant's best-scored request goes. Aging thus arbitrates between priority levels and
//! fairness arbitrates between tenants of a level: a heavy tenant's aged backlog cannot push a
//! light tenant's fresh requests aside, because the two are compared by share, not by age.
//!
//! **Overflow.** When a lane has a free slot, the candidates are its own classes plus the classes
//! of smaller lanes whose slots are all taken (and all lanes in between too), penalised by one
//! priority level (1,000 points) per lane climbed. Native requests win ties.
//!
//! **Admission** happens at enqueue and never after a timeout: no ready runner → `Unavailable`,
//! unless the model scales from zero ([`State::set_cold_hold`]): then the request is held for up
//! to the hold while a runner starts (its wait is what the autoscaler sees), and refused as
//! `NotReady` if none comes up in time;
//! the lane's queue over `max_queued_requests_per_slot` or `max_queued_tokens_per_slot` (per slot
//! of the lane) → `Throttled`, unless the tenant itself holds less than those limits and less than
//! its weighted share of twice them (a heavy tenant's backlog must not lock a light one out);
//! twice the limits shed everyone. A deadline that the estimated wait already overshoots →
//! `DeadlineUnmeetable`. Retry hints are the lane's estimated drain time, clamped to
//! `[1 s, max_retry_after]`.
//!
//! **Overload control** ([`OverloadControl`], CoDel's idea applied to slots). A queue that
//! absorbs a burst and drains is good; one that stands is only delay. A lane counts as
//! overloaded once every request it dispatched during a whole interval (at least twice the
//! lane's mean service time) waited longer than `target` (at least a tenth of that service time);
//! while overloaded, a request whose estimated wait exceeds `wait_fraction` of its own expected
//! service time is refused at once as `Throttled`, so the accepted requests keep their latency at
//! any offered load. The lane leaves that state
//! after an interval in which the queue was not standing and nothing had to be refused. At
//! normal load bursts still queue as before (a fixed wait budget would refuse them).
//!
//! **Estimates.** Each lane keeps an EWMA of per-slot throughput (tokens a second) fed by
//! [`State::complete`]. The wait of a new request is when a slot frees up for it once what is
//! ahead of it — better classes in full, its own class as fair queuing would interleave it — has
//! taken the slots that free before, each running request being expected to finish its cost at
//! that throughput from when it started (see `State::wait_behind`); zero when nothing is ahead
//! and a slot it can reach is free.

use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap, HashMap};
use std::time::{Duration, Instant};

use crate::Rejected;
use crate::fair::{Entry, FairQueue, UNIT_WEIGHT};
use crate::lanes::{Lane, classify, lane_slots};
use crate::priority::Priority;

/// Score points per priority level; overflowing one lane up costs the same.
pub const POINTS_PER_LEVEL: f64 = 1_000.0;
/// The shortest retry hint: `Retry-After` is whole seconds.
pub const MIN_RETRY_AFTER: Duration = Duration::from_secs(1);
/// Keys are scores in thousandths of a point.
const KEY_SCALE: f64 = 1_000.0;
const KEY_PER_LEVEL: i64 = (POINTS_PER_LEVEL * KEY_SCALE) as i64;
/// Ceiling on wait estimates, so that `now + estimate` stays representable.
const MAX_ESTIMATE: Duration = Duration::from_secs(365 * 24 * 3600);
/// The slowest per-slot throughput an estimate assumes, tokens a second.
const MIN_SLOT_RATE: f64 = 1.0;

/// Every tunable of the queue.
#[derive(Debug, Clone, PartialEq)]
pub struct QueueConfig {
    /// Share of `max_output_tokens` a request is expected to generate, used for its lane and its
    /// token cost. Clients set `max_tokens` as a ceiling and generations usually stop well short
    /// of it. Default 0.25.
    pub expected_output_fraction: f64,
    /// Score points a request gains per millisecond waited. Default 0.1: one priority level per
    /// 10 s, so a LOW request overtakes fresh CRITICAL ones after waiting 30 s.
    pub aging_points_per_ms: f64,
    /// Deadlines nearer than this at enqueue earn a bonus. Default 10 s.
    pub deadline_horizon: Duration,
    /// Bonus points per millisecond that the deadline lies inside the horizon. Default 0.1: a
    /// request due immediately gains one priority level (10,000 ms × 0.1).
    pub deadline_points_per_ms: f64,
    /// Unused fair share an idle tenant keeps, in tokens at weight 1 (scaled by its weight): how
    /// much of a burst it may run ahead of backlogged tenants. Default 32,000 (about 25 small
    /// requests). Zero is plain deficit round robin, under which a light tenant's bursts drain at
    /// half speed beside a heavy one (its p99 wait 3–4× what it is alone, in the tests' simulation).
    pub fair_credit_tokens: u64,
    /// Queued requests per slot of a lane beyond which the lane sheds (at least one request may
    /// always queue). Default 4.
    pub max_queued_requests_per_slot: usize,
    /// Queued tokens per slot of a lane beyond which the lane sheds; a single request larger than
    /// the limit is still admitted into an empty queue. Default 100,000.
    pub max_queued_tokens_per_slot: u64,
    /// Per-slot throughput assumed until completions have been measured, in tokens (input +
    /// output) a second. Default 250: a 1,000-token prompt and 200 generated tokens in ~5 s.
    pub default_slot_tokens_per_second: f64,
    /// Weight of the newest completion in the throughput EWMA, in (0, 1]. Default 0.2.
    pub throughput_smoothing: f64,
    /// The longest retry hint the queue gives. Default 60 s.
    pub max_retry_after: Duration,
    /// The retry hint when the model has no ready runner. Default 5 s.
    pub unavailable_retry_after: Duration,
    /// The longest a request may be expected to wait: one whose estimated wait is longer is
    /// refused as `Throttled` at once, so under overload the requests that are accepted keep
    /// their latency. `None` (the default) bounds the queue by the count limits only.
    pub max_queue_wait: Option<Duration>,
    /// Keep the last free slot of a lane for a tenant that sent a request to it within this
    /// window and has nothing running there, instead of giving it to a tenant that already has
    /// requests running. A light tenant beside a heavy one then rarely waits for a slot to free
    /// up, at the cost of at most one idle slot per lane while it is active. `None` (the default)
    /// is work-conserving.
    pub reserve_window: Option<Duration>,
    /// Refuse requests that would only wait while a lane's queue is standing (see the module
    /// documentation). `None` (the default) leaves overload to the count limits and
    /// `max_queue_wait`.
    pub overload: Option<OverloadControl>,
}

/// The tunables of overload control (see the module documentation).
#[derive(Debug, Clone, PartialEq)]
pub struct OverloadControl {
    /// A lane is overloaded when every request it dispatched for a whole interval waited longer
    /// than this, or than a tenth of the lane's mean service time where that is longer.
    /// Default 5 ms.
    pub target: Duration,
    /// The shortest interval over which a standing queue is judged; twice the lane's mean
    /// service time where that is longer (at 80% load a queue may stand through one service
    /// time and still drain). Default 500 ms.
    pub interval: Duration,
    /// While overloaded, the longest estimated wait admitted, as a share of the request's own
    /// expected service time (never less than `target`). Default 0.25: an accepted request takes
    /// about 1.25× its service time at most, and a slot that frees finds the next request queued.
    pub wait_fraction: f64,
}

impl Default for OverloadControl {
    fn default() -> Self {
        OverloadControl { target: Duration::from_millis(5), interval: Duration::from_millis(500), wait_fraction: 0.25 }
    }
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            expected_output_fraction: 0.25,
            aging_points_per_ms: 0.1,
            deadline_horizon: Duration::from_secs(10),
            deadline_points_per_ms: 0.1,
            fair_credit_tokens: 32_000,
            max_queued_requests_per_slot: 4,
            max_queued_tokens_per_slot: 100_000,
            default_slot_tokens_per_second: 250.0,
            throughput_smoothing: 0.2,
            max_retry_after: Duration::from_secs(60),
            unavailable_retry_after: Duration::from_secs(5),
            max_queue_wait: None,
            reserve_window: None,
            overload: None,
        }
    }
}

impl QueueConfig {
    /// The output a request is expected to generate: `max_output_tokens × expected_output_fraction`,
    /// rounded up (a fraction outside `[0, 1]` counts as 1).
    pub fn expected_output_tokens(&self, max_output_tokens: u64) -> u64 {
        let fraction = self.expected_output_fraction;
        let fraction = if (0.0..=1.0).contains(&fraction) { fraction } else { 1.0 };
        ((max_output_tokens as f64 * fraction).ceil() as u64).min(max_output_tokens)
    }

    /// Tokens a request is charged for fair queuing and queue limits: input + expected output.
    /// The router may charge the same amount to the tenant's rate limit.
    pub fn cost(&self, input_tokens: u64, max_output_tokens: u64) -> u64 {
        input_tokens.saturating_add(self.expected_output_tokens(max_output_tokens))
    }

    /// The lane a request is queued in.
    pub fn lane(&self, input_tokens: u64, max_output_tokens: u64) -> Lane {
        classify(input_tokens, self.expected_output_tokens(max_output_tokens))
    }
}

/// The design's priority score: `level × 1000 − waited_ms × aging + deadline_bonus`. Lower is
/// served first.
pub fn priority_score(
    priority: Priority,
    waited: Duration,
    time_to_deadline: Option<Duration>,
    config: &QueueConfig,
) -> f64 {
    f64::from(priority.level()) * POINTS_PER_LEVEL - millis(waited) * config.aging_points_per_ms
        + deadline_bonus(time_to_deadline, config)
}

/// Zero without a deadline or with one beyond the horizon; otherwise negative (better), down to
/// `−horizon_ms × deadline_points_per_ms` for a request due now.
pub fn deadline_bonus(time_to_deadline: Option<Duration>, config: &QueueConfig) -> f64 {
    let Some(left) = time_to_deadline else { return 0.0 };
    let inside = (millis(config.deadline_horizon) - millis(left)).max(0.0);
    -(inside * config.deadline_points_per_ms)
}

/// One request asking for a slot.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    /// Unique among the requests queued or running on this queue.
    pub id: u64,
    pub tenant: String,
    pub priority: Priority,
    /// Estimated prompt tokens.
    pub input_tokens: u64,
    /// The client's ceiling on generated tokens.
    pub max_output_tokens: u64,
    /// When the client stops caring.
    pub deadline: Option<Instant>,
    /// Fair-queuing weight: provisioned model units, 1.0 on demand.
    pub weight: f64,
}

/// A request accepted into the queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Admitted {
    pub lane: Lane,
    /// The estimated wait before it starts.
    pub estimated_wait: Duration,
}

/// A request taken off the queue onto a slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dispatch {
    pub id: u64,
    /// The lane whose slot it occupies (larger than its own when it overflowed).
    pub lane: Lane,
    pub tenant: String,
    /// How long it was queued.
    pub waited: Duration,
    /// Whether it runs in a larger lane than its own.
    pub overflow: bool,
}

/// The queue at a glance, for metrics and the capacity header.
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// Slots on ready runners.
    pub capacity: usize,
    pub in_flight: usize,
    pub queued: usize,
    pub lanes: [LaneSnapshot; 3],
}

/// One lane at a glance.
#[derive(Debug, Clone, PartialEq)]
pub struct LaneSnapshot {
    pub lane: Lane,
    pub slots: usize,
    /// Requests running on this lane's slots, overflow included.
    pub in_flight: usize,
    pub queued: usize,
    pub queued_tokens: u64,
    /// Estimated time to drain the lane's queue.
    pub estimated_wait: Duration,
    /// Measured throughput of the lane's slots together, tokens a second.
    pub tokens_per_second: f64,
    /// Whether overload control is refusing requests that would wait (see [`OverloadControl`]).
    pub overloaded: bool,
}

#[derive(Debug)]
struct Queued {
    tenant: String,
    lane: Lane,
    priority: Priority,
    entry: Entry,
    enqueued: Instant,
    deadline: Option<Instant>,
    /// When a request held for a runner to start is refused if none has (see `held`).
    hold_until: Option<Instant>,
}

#[derive(Debug)]
struct Running {
    /// The lane whose slot it holds.
    lane: Lane,
    cost: u64,
    tenant: String,
    started: Instant,
}

/// What one tenant has queued in a lane, for shedding.
#[derive(Debug, Default)]
struct Usage {
    requests: u64,
    tokens: u64,
    weight: u64,
}

#[derive(Debug)]
struct LaneState {
    slots: usize,
    running: usize,
    running_tokens: u64,
    /// One fair queue per priority level.
    classes: [FairQueue; 4],
    usage: HashMap<String, Usage>,
    /// EWMA of per-slot throughput, tokens a second.
    slot_rate: f64,
    /// Requests running per tenant.
    running_by_tenant: HashMap<String, usize>,
    /// When each tenant last sent a request to this lane (kept only with `reserve_window`).
    seen: HashMap<String, Instant>,
    /// EWMA of a request's time on a slot, seconds (zero until one completes).
    service_seconds: f64,
    /// Overload control's current interval.
    window: Window,
}

/// One interval of overload control on a lane.
#[derive(Debug, Default)]
struct Window {
    start: Option<Instant>,
    /// The shortest wait of a request dispatched from the lane in this interval.
    min_wait: Option<Duration>,
    /// Whether a request was refused for its wait in this interval.
    refused: bool,
    /// Whether the lane is overloaded.
    overloaded: bool,
}

impl LaneState {
    fn new(slots: usize, slot_rate: f64) -> Self {
        LaneState {
            slots,
            running: 0,
            running_tokens: 0,
            classes: Default::default(),
            usage: HashMap::new(),
            slot_rate,
            running_by_tenant: HashMap::new(),
            seen: HashMap::new(),
            service_seconds: 0.0,
            window: Window::default(),
        }
    }

    /// Closes overload control's interval if it is over: the lane becomes overloaded when the
    /// queue stood through it, and stays so while requests had to be refused.
    fn roll_window(&mut self, control: &OverloadControl, now: Instant) {
        let queued = self.queued();
        let service = Duration::try_from_secs_f64(self.service_seconds).unwrap_or_default();
        let interval = control.interval.max(service.saturating_mul(2));
        let window = &mut self.window;
        let Some(start) = window.start else {
            window.start = Some(now);
            return;
        };
        if now.saturating_duration_since(start) < interval {
            return;
        }
        let target = control.target.max(service / 10);
        // With no dispatch in the whole interval, the queue stood if anyone is in it.
        let standing = window.min_wait.map_or(queued > 0, |wait| wait > target);
        window.overloaded = standing || (window.overloaded && window.refused);
        window.start = Some(now);
        window.min_wait = None;
        window.refused = false;
    }

    /// The time a request of `cost` tokens is expected to hold a slot.
    fn service_time(&self, cost: u64) -> Duration {
        let seconds = cost as f64 / self.slot_rate;
        Duration::try_from_secs_f64(seconds.clamp(0.0, MAX_ESTIMATE.as_secs_f64())).unwrap_or(MAX_ESTIMATE)
    }

    fn has_free_slot(&self) -> bool {
        self.running < self.slots
    }

    fn queued(&self) -> usize {
        self.classes.iter().map(FairQueue::len).sum()
    }

    fn queued_tokens(&self) -> u64 {
        self.classes.iter().map(FairQueue::tokens).fold(0, u64::saturating_add)
    }

    fn throughput(&self) -> f64 {
        self.slot_rate * self.slots.max(1) as f64
    }

    /// How long the lane takes to work through `tokens`.
    fn time_for(&self, tokens: u64) -> Duration {
        let seconds = tokens as f64 / self.throughput();
        Duration::try_from_secs_f64(seconds.clamp(0.0, MAX_ESTIMATE.as_secs_f64())).unwrap_or(MAX_ESTIMATE)
    }

    /// The queue plus the unfinished half of the running work.
    fn drain_time(&self) -> Duration {
        self.time_for(self.queued_tokens().saturating_add(self.running_tokens / 2))
    }

    fn add_usage(&mut self, tenant: &str, weight: u64, cost: u64) {
        let usage = match self.usage.get_mut(tenant) {
            Some(usage) => usage,
            None => self.usage.entry(tenant.to_owned()).or_default(),
        };
        usage.requests += 1;
        usage.tokens = usage.tokens.saturating_add(cost);
        usage.weight = weight;
    }

    fn remove_usage(&mut self, tenant: &str, cost: u64) {
        if let Some(usage) = self.usage.get_mut(tenant) {
            usage.requests = usage.requests.saturating_sub(1);
            usage.tokens = usage.tokens.saturating_sub(cost);
            if usage.requests == 0 {
                self.usage.remove(tenant);
            }
        }
    }
}

/// The head of one class, competing for a free slot.
struct Candidate {
    /// Score key (with the overflow penalty), then native before overflow, then arrival.
    rank: (i64, usize, u64),
    /// The lane whose slot it would take.
    serve: Lane,
    /// The lane it is queued in.
    source: Lane,
    /// Its priority level.
    level: usize,
}

/// The scheduler of one model. See the module documentation for the algorithm.
#[derive(Debug)]
pub struct State {
    config: QueueConfig,
    /// Keys count milliseconds from here.
    epoch: Instant,
    capacity: usize,
    lanes: [LaneState; 3],
    queued: HashMap<u64, Queued>,
    running: HashMap<u64, Running>,
    /// Queued requests with a deadline, soonest first: (deadline, seq, id).
    deadlines: BTreeSet<(Instant, u64, u64)>,
    /// How long a request may wait for a first runner to start; `None` refuses at once.
    cold_hold: Option<Duration>,
    /// Requests waiting for a first runner, by when they give up: (hold end, seq, id).
    held: BTreeSet<(Instant, u64, u64)>,
    next_seq: u64,
}

impl State {
    /// An empty queue with no capacity; call [`State::set_capacity`] once runners are ready.
    pub fn new(config: QueueConfig, now: Instant) -> Self {
        let rate = config.default_slot_tokens_per_second;
        let rate = if rate.is_finite() && rate > 0.0 { rate.max(MIN_SLOT_RATE) } else { 250.0 };
        State {
            config,
            epoch: now,
            capacity: 0,
            lanes: [LaneState::new(0, rate), LaneState::new(0, rate), LaneState::new(0, rate)],
            queued: HashMap::new(),
            running: HashMap::new(),
            deadlines: BTreeSet::new(),
            cold_hold: None,
            held: BTreeSet::new(),
            next_seq: 0,
        }
    }

    /// Whether, and how long, requests wait for a runner to start while the model has none ready
    /// (a model that scales from zero): they queue instead of being refused as `Unavailable`, and
    /// are refused as `NotReady` when the hold runs out first.
    pub fn set_cold_hold(&mut self, hold: Option<Duration>) {
        self.cold_hold = hold;
    }

    pub fn config(&self) -> &QueueConfig {
        &self.config
    }

    /// Admits a request into its lane's queue, or refuses it at once. A request whose id is
    /// already queued or running is refused as `Throttled` (retry once the first has left).
    pub fn enqueue(&mut self, request: Request, now: Instant) -> Result<Admitted, Rejected> {
        if self.queued.contains_key(&request.id) || self.running.contains_key(&request.id) {
            return Err(Rejected::Throttled { retry_after: MIN_RETRY_AFTER });
        }
        // With no runner ready, a model that scales from zero holds the request for one to start.
        let hold = match (self.capacity, self.cold_hold) {
            (0, None) => {
                return Err(Rejected::Unavailable {
                    retry_after: self.config.unavailable_retry_after.max(MIN_RETRY_AFTER),
                });
            }
            (0, Some(hold)) => Some(hold),
            _ => None,
        };
        let expected_output = self.config.expected_output_tokens(request.max_output_tokens);
        let lane = classify(request.input_tokens, expected_output);
        let cost = request.input_tokens.saturating_add(expected_output);
        let weight = weight_thousandths(request.weight);
        if self.sheds(lane, &request.tenant, weight, cost) {
            return Err(Rejected::Throttled { retry_after: self.retry_after(lane) });
        }
        if let Some(hold) = hold {
            // Nothing to estimate a wait from until a runner is up: the deadline decides.
            let hold_until = now.checked_add(hold).unwrap_or(now);
            self.insert(request, lane, cost, weight, now, Some(hold_until));
            return Ok(Admitted { lane, estimated_wait: hold });
        }
        let estimated_wait = self.estimate_wait(lane, request.priority, &request.tenant, weight, now);
        if self.config.max_queue_wait.is_some_and(|max| estimated_wait > max) {
            return Err(Rejected::Throttled { retry_after: self.retry_after(lane) });
        }
        if let Some(control) = &self.config.overload {
            let state = &mut self.lanes[lane.index()];
            state.roll_window(control, now);
            let fraction = match control.wait_fraction {
                f if f.is_finite() => f.clamp(0.0, 1e6),
                _ => OverloadControl::default().wait_fraction,
            };
            let budget = control.target.max(state.service_time(cost).mul_f64(fraction));
            if state.window.overloaded && estimated_wait > budget {
                state.window.refused = true;
                return Err(Rejected::Throttled { retry_after: self.retry_after(lane) });
            }
        }
        if let Some(deadline) = request.deadline
            && now.checked_add(estimated_wait).is_none_or(|start| start > deadline)
        {
            return Err(Rejected::DeadlineUnmeetable { estimated_wait });
        }

        self.insert(request, lane, cost, weight, now, None);
        Ok(Admitted { lane, estimated_wait })
    }

    /// Queues an admitted request.
    fn insert(
        &mut self,
        request: Request,
        lane: Lane,
        cost: u64,
        weight: u64,
        now: Instant,
        hold_until: Option<Instant>,
    ) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let time_to_deadline = request.deadline.map(|d| d.saturating_duration_since(now));
        let score = priority_score(request.priority, Duration::ZERO, time_to_deadline, &self.config)
            + millis(now.saturating_duration_since(self.epoch)) * self.config.aging_points_per_ms;
        let entry = Entry { key: (score * KEY_SCALE) as i64, seq, id: request.id, cost };
        let state = &mut self.lanes[lane.index()];
        if self.config.reserve_window.is_some() {
            state.seen.insert(request.tenant.clone(), now);
        }
        state.classes[usize::from(request.priority.level())].push(&request.tenant, weight, entry);
        state.add_usage(&request.tenant, weight, cost);
        if let Some(deadline) = request.deadline {
            self.deadlines.insert((deadline, seq, request.id));
        }
        if let Some(until) = hold_until {
            self.held.insert((until, seq, request.id));
        }
        let queued = Queued {
            tenant: request.tenant,
            lane,
            priority: request.priority,
            entry,
            enqueued: now,
            deadline: request.deadline,
            hold_until,
        };
        self.queued.insert(request.id, queued);
    }

    /// Takes the next request onto a free slot, if any request can run now.
    pub fn next(&mut self, now: Instant) -> Option<Dispatch> {
        let Candidate { serve, source, level, .. } = self.choose(now)?;
        let held = self.held_back(serve, now);
        let entry = self.lanes[source.index()].classes[level].pop_except(self.config.fair_credit_tokens, &held)?;
        let queued = self.queued.remove(&entry.id)?;
        self.forget(&queued);
        let waited = now.saturating_duration_since(queued.enqueued);
        if let Some(control) = &self.config.overload {
            let state = &mut self.lanes[source.index()];
            state.roll_window(control, now);
            state.window.min_wait = Some(state.window.min_wait.map_or(waited, |min| min.min(waited)));
        }
        let lane = &mut self.lanes[serve.index()];
        lane.running += 1;
        lane.running_tokens = lane.running_tokens.saturating_add(entry.cost);
        *lane.running_by_tenant.entry(queued.tenant.clone()).or_default() += 1;
        self.running
            .insert(entry.id, Running { lane: serve, cost: entry.cost, tenant: queued.tenant.clone(), started: now });
        Some(Dispatch { id: entry.id, lane: serve, tenant: queued.tenant, waited, overflow: serve != source })
    }

    /// Frees the slot of a running request. False if it is not running.
    pub fn release(&mut self, id: u64) -> bool {
        let Some(run) = self.running.remove(&id) else { return false };
        let lane = &mut self.lanes[run.lane.index()];
        lane.running = lane.running.saturating_sub(1);
        lane.running_tokens = lane.running_tokens.saturating_sub(run.cost);
        if let Some(n) = lane.running_by_tenant.get_mut(&run.tenant) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                lane.running_by_tenant.remove(&run.tenant);
            }
        }
        true
    }

    /// Removes a queued request (its client went away). False if it is not queued.
    pub fn cancel(&mut self, id: u64) -> bool {
        self.remove_queued(id).is_some()
    }

    /// Records that a running request processed `tokens` (input + generated) in `duration`,
    /// feeding its lane's throughput estimate. False if it is not running.
    pub fn complete(&mut self, id: u64, tokens: u64, duration: Duration) -> bool {
        let Some(run) = self.running.get(&id) else { return false };
        let seconds = duration.as_secs_f64();
        if tokens > 0 && seconds > 0.0 {
            let smoothing = self.config.throughput_smoothing;
            let smoothing = if smoothing > 0.0 && smoothing <= 1.0 { smoothing } else { 0.2 };
            let lane = &mut self.lanes[run.lane.index()];
            let updated = lane.slot_rate + smoothing * (tokens as f64 / seconds - lane.slot_rate);
            if updated.is_finite() {
                lane.slot_rate = updated.max(MIN_SLOT_RATE);
            }
            let seconds = seconds.min(MAX_ESTIMATE.as_secs_f64());
            lane.service_seconds = if lane.service_seconds == 0.0 {
                seconds
            } else {
                lane.service_seconds + smoothing * (seconds - lane.service_seconds)
            };
        }
        true
    }

    /// Removes the queued requests whose deadline has passed, soonest first. Also forgets idle
    /// tenants' fair-queuing state once it no longer matters; call it every few seconds at least.
    pub fn expire(&mut self, now: Instant) -> Vec<(u64, Rejected)> {
        let mut expired = Vec::new();
        while let Some(&(deadline, _, id)) = self.deadlines.first() {
            if deadline > now {
                break;
            }
            self.deadlines.pop_first();
            if self.remove_queued(id).is_some() {
                expired.push((id, Rejected::DeadlineExpired));
            }
        }
        while let Some(&(until, _, id)) = self.held.first() {
            if until > now {
                break;
            }
            self.held.pop_first();
            if self.remove_queued(id).is_some() {
                expired.push((
                    id,
                    Rejected::NotReady { retry_after: self.config.unavailable_retry_after.max(MIN_RETRY_AFTER) },
                ));
            }
        }
        let window = self.config.reserve_window;
        for lane in &mut self.lanes {
            for class in &mut lane.classes {
                class.prune(self.config.fair_credit_tokens);
            }
            if let Some(window) = window {
                lane.seen.retain(|_, at| now.saturating_duration_since(*at) <= window);
            }
        }
        expired
    }

    /// Sets the slots on ready runners. Running requests keep their slots even if that leaves a
    /// lane over its new share; it just dispatches nothing until they finish. With no capacity
    /// left, every queued request is refused as `Unavailable` (returned) so clients fail fast —
    /// or, with a cold hold, held for a runner to start, from `now`.
    pub fn set_capacity(&mut self, slots: usize, now: Instant) -> Vec<(u64, Rejected)> {
        self.capacity = slots;
        for (lane, share) in self.lanes.iter_mut().zip(lane_slots(slots)) {
            lane.slots = share;
        }
        if slots > 0 {
            // Runners are up: held requests wait like any other now.
            for (_, _, id) in std::mem::take(&mut self.held) {
                if let Some(q) = self.queued.get_mut(&id) {
                    q.hold_until = None;
                }
            }
            return Vec::new();
        }
        if let Some(hold) = self.cold_hold {
            let until = now.checked_add(hold).unwrap_or(now);
            for q in self.queued.values_mut().filter(|q| q.hold_until.is_none()) {
                q.hold_until = Some(until);
                self.held.insert((until, q.entry.seq, q.entry.id));
            }
            return Vec::new();
        }
        let retry_after = self.config.unavailable_retry_after.max(MIN_RETRY_AFTER);
        let mut ids: Vec<(u64, u64)> = self.queued.iter().map(|(&id, q)| (q.entry.seq, id)).collect();
        ids.sort_unstable();
        ids.into_iter()
            .filter(|&(_, id)| self.remove_queued(id).is_some())
            .map(|(_, id)| (id, Rejected::Unavailable { retry_after }))
            .collect()
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            capacity: self.capacity,
            in_flight: self.running.len(),
            queued: self.queued.len(),
            lanes: Lane::ALL.map(|lane| {
                let state = &self.lanes[lane.index()];
                LaneSnapshot {
                    lane,
                    slots: state.slots,
                    in_flight: state.running,
                    queued: state.queued(),
                    queued_tokens: state.queued_tokens(),
                    estimated_wait: state.drain_time(),
                    tokens_per_second: state.throughput(),
                    overloaded: state.window.overloaded,
                }
            }),
        }
    }

    /// Whether `id` is waiting in the queue.
    pub fn is_queued(&self, id: u64) -> bool {
        self.queued.contains_key(&id)
    }

    /// Whether `id` holds a slot.
    pub fn is_running(&self, id: u64) -> bool {
        self.running.contains_key(&id)
    }

    /// The best-scored candidate among every lane with a free slot: its own classes, and those of
    /// the full smaller lanes below it.
    /// The tenants kept from the last free slot of `lane`: those with requests running there,
    /// while another tenant that sent a request to the lane within
    /// [`QueueConfig::reserve_window`] has nothing running (empty when nothing is held back).
    fn held_back(&self, lane: Lane, now: Instant) -> Vec<String> {
        let Some(window) = self.config.reserve_window else { return Vec::new() };
        let state = &self.lanes[lane.index()];
        if state.slots < 2 || state.running + 1 != state.slots {
            return Vec::new();
        }
        let waiting_for = state.seen.iter().any(|(tenant, at)| {
            now.saturating_duration_since(*at) <= window && !state.running_by_tenant.contains_key(tenant)
        });
        if waiting_for { state.running_by_tenant.keys().cloned().collect() } else { Vec::new() }
    }

    fn choose(&self, now: Instant) -> Option<Candidate> {
        let mut best: Option<Candidate> = None;
        for serve in Lane::ALL {
            if !self.lanes[serve.index()].has_free_slot() {
                continue;
            }
            let held = self.held_back(serve, now);
            for source in Lane::ALL[..=serve.index()].iter().rev().copied() {
                if source != serve && self.lanes[source.index()].has_free_slot() {
                    break;
                }
                let steps = serve.index() - source.index();
                let penalty = KEY_PER_LEVEL.saturating_mul(steps as i64);
                for (level, class) in self.lanes[source.index()].classes.iter().enumerate() {
                    let Some(head) = class.best_except(&held) else { continue };
                    let rank = (head.key.saturating_add(penalty), steps, head.seq);
                    if best.as_ref().is_none_or(|b| rank < b.rank) {
                        best = Some(Candidate { rank, serve, source, level });
                    }
                }
            }
        }
        best
    }

    /// Would admitting this request overfill the lane? Under the lane's limits everyone gets in.
    /// Past them, a tenant may still fill the limits by itself, or its weighted share of twice
    /// the limits where that is less, so one tenant's backlog never takes another's room; past
    /// twice the limits everyone is refused.
    fn sheds(&self, lane: Lane, tenant: &str, weight: u64, cost: u64) -> bool {
        let state = &self.lanes[lane.index()];
        let slots = state.slots.max(1) as u64;
        let max_requests = (self.config.max_queued_requests_per_slot as u64).saturating_mul(slots).max(1);
        let max_tokens = self.config.max_queued_tokens_per_slot.saturating_mul(slots);
        let over = |requests: u64, tokens: u64, max_requests: u64, max_tokens: u64| {
            requests >= max_requests || (tokens > 0 && tokens.saturating_add(cost) > max_tokens)
        };
        let (requests, tokens) = (state.queued() as u64, state.queued_tokens());
        if !over(requests, tokens, max_requests, max_tokens) {
            return false;
        }
        let (ceiling_requests, ceiling_tokens) = (max_requests.saturating_mul(2), max_tokens.saturating_mul(2));
        if over(requests, tokens, ceiling_requests, ceiling_tokens) {
            return true;
        }
        let others = state.usage.iter().filter(|(name, _)| name.as_str() != tenant);
        let share = weight as f64 / others.fold(weight, |sum, (_, usage)| sum.saturating_add(usage.weight)) as f64;
        let own_max_requests = max_requests.min((ceiling_requests as f64 * share).ceil() as u64);
        let own_max_tokens = max_tokens.min((ceiling_tokens as f64 * share) as u64);
        let (own_requests, own_tokens) = state.usage.get(tenant).map_or((0, 0), |u| (u.requests, u.tokens));
        over(own_requests, own_tokens, own_max_requests, own_max_tokens)
    }

    fn retry_after(&self, lane: Lane) -> Duration {
        self.lanes[lane.index()].drain_time().min(self.config.max_retry_after).max(MIN_RETRY_AFTER)
    }

    fn estimate_wait(&self, lane: Lane, priority: Priority, tenant: &str, weight: u64, now: Instant) -> Duration {
        let state = &self.lanes[lane.index()];
        let level = usize::from(priority.level());
        let own_class = state.classes[level].tokens_ahead(tenant, weight);
        let ahead = state.classes[..level].iter().fold(own_class, |sum, class| sum.saturating_add(class.tokens()));
        // Nothing ahead and a slot it can reach (its own lane's, or by overflow a larger one's).
        if ahead == 0 && self.lanes[lane.index()..].iter().any(LaneState::has_free_slot) {
            return Duration::ZERO;
        }
        self.wait_behind(lane, ahead, now)
    }

    /// When a slot of `lane` frees up for a request with `ahead` tokens queued before it. Each
    /// running request is expected to hold its slot for its cost at the lane's per-slot
    /// throughput, counted from when it started (one that ran over frees its slot any moment);
    /// the requests ahead, of the running requests' mean size, take the slots as they free. With
    /// nothing running, the time the lane takes to work through `ahead`.
    fn wait_behind(&self, lane: Lane, ahead: u64, now: Instant) -> Duration {
        let state = &self.lanes[lane.index()];
        if state.running == 0 {
            return state.time_for(ahead);
        }
        let rate = state.slot_rate;
        let mut free_at: BinaryHeap<Reverse<u64>> = self
            .running
            .values()
            .filter(|run| run.lane == lane)
            .map(|run| {
                let remaining = run.cost as f64 / rate - now.saturating_duration_since(run.started).as_secs_f64();
                Reverse(nanos(remaining))
            })
            .collect();
        free_at.extend((state.running..state.slots).map(|_| Reverse(0)));
        let mean_cost = (state.running_tokens as f64 / state.running as f64).max(1.0);
        let service = nanos(mean_cost / rate);
        // The requests ahead take the earliest free slots; beyond a few rounds of every slot the
        // lane just works through the rest at its throughput.
        let requests_ahead = (ahead as f64 / mean_cost).floor() as u64;
        let simulated = requests_ahead.min(4 * free_at.len() as u64);
        for _ in 0..simulated {
            if let Some(Reverse(at)) = free_at.pop() {
                free_at.push(Reverse(at.saturating_add(service)));
            }
        }
        let first = free_at.peek().map_or(0, |Reverse(at)| *at);
        let rest = state.time_for(((requests_ahead - simulated) as f64 * mean_cost) as u64);
        Duration::from_nanos(first).saturating_add(rest).min(MAX_ESTIMATE)
    }

    fn remove_queued(&mut self, id: u64) -> Option<Queued> {
        let queued = self.queued.remove(&id)?;
        self.lanes[queued.lane.index()].classes[usize::from(queued.priority.level())]
            .remove(&queued.tenant, &queued.entry);
        self.forget(&queued);
        Some(queued)
    }

    /// Drops a request that has left its class from the other indexes.
    fn forget(&mut self, queued: &Queued) {
        self.lanes[queued.lane.index()].remove_usage(&queued.tenant, queued.entry.cost);
        if let Some(deadline) = queued.deadline {
            self.deadlines.remove(&(deadline, queued.entry.seq, queued.entry.id));
        }
        if let Some(until) = queued.hold_until {
            self.held.remove(&(until, queued.entry.seq, queued.entry.id));
        }
    }

    /// Asserts that every index agrees with the others.
    #[cfg(test)]
    pub(crate) fn check_invariants(&self) {
        for lane in Lane::ALL {
            let state = &self.lanes[lane.index()];
            let running: Vec<&Running> = self.running.values().filter(|r| r.lane == lane).collect();
            assert_eq!(state.running, running.len(), "{lane} running");
            assert_eq!(state.running_tokens, running.iter().map(|r| r.cost).fold(0, u64::saturating_add));
            assert_eq!(state.running_by_tenant.values().sum::<usize>(), running.len(), "{lane} running by tenant");
            for class in &state.classes {
                class.check();
            }
            let queued: Vec<&Queued> = self.queued.values().filter(|q| q.lane == lane).collect();
            assert_eq!(state.queued(), queued.len(), "{lane} queued");
            assert_eq!(state.usage.values().map(|u| u.requests).sum::<u64>(), queued.len() as u64);
            assert!(state.usage.values().all(|u| u.requests > 0));
        }
        assert!(self.queued.keys().all(|id| !self.running.contains_key(id)));
        let with_deadline = self.queued.values().filter(|q| q.deadline.is_some()).count();
        assert_eq!(self.deadlines.len(), with_deadline);
        let held: Vec<(Instant, u64, u64)> =
            self.queued.values().filter_map(|q| q.hold_until.map(|u| (u, q.entry.seq, q.entry.id))).collect();
        assert_eq!(self.held.len(), held.len(), "held requests");
        assert!(held.iter().all(|h| self.held.contains(h)));
        assert!(self.held.is_empty() || self.capacity == 0, "holds end when runners are up");
    }
}

/// Seconds as whole nanoseconds, clamped to `[0, MAX_ESTIMATE]`.
fn nanos(seconds: f64) -> u64 {
    (seconds.clamp(0.0, MAX_ESTIMATE.as_secs_f64()) * 1e9) as u64
}

fn millis(duration: Duration) -> f64 {
    duration.as_secs_f64() * 1_000.0
}

/// A weight in thousandths, 0.001 to 1,000,000; anything unusable counts as 1.
fn weight_thousandths(weight: f64) -> u64 {
    if weight.is_finite() && weight > 0.0 {
        ((weight * UNIT_WEIGHT as f64).round() as u64).clamp(1, 1_000_000_000)
    } else {
        UNIT_WEIGHT
    }
}

#[cfg(test)]
mod tests;
