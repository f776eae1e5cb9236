use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};

use super::*;

/// A small request: 500 prompt tokens and 100 expected output tokens (cost 600).
const SMALL: u64 = 500;
/// A medium request's prompt.
const MEDIUM: u64 = 10_000;

fn request(id: u64, tenant: &str, priority: Priority, input_tokens: u64) -> Request {
    Request { id, tenant: tenant.into(), priority, input_tokens, max_output_tokens: 400, deadline: None, weight: 1.0 }
}

/// A queue with three slots, one per lane.
fn state(now: Instant) -> State {
    let mut state = State::new(QueueConfig::default(), now);
    state.set_capacity(3, now);
    state
}

/// A queue with three slots, one per lane, the medium and large ones taken (ids 900 and 901) so
/// that small requests cannot overflow.
fn small_lane_only(now: Instant) -> State {
    let mut state = state(now);
    for (id, input) in [(900, MEDIUM), (901, 40_000)] {
        state.enqueue(request(id, "other", Priority::Normal, input), now).unwrap();
        state.next(now).unwrap();
    }
    state
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s)
}

/// xorshift64*: deterministic, good enough for simulations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// Uniform in (0, 1].
    fn unit(&mut self) -> f64 {
        ((self.next() >> 11) + 1) as f64 / (1u64 << 53) as f64
    }

    /// An exponential gap with the given mean: Poisson arrivals.
    fn exponential(&mut self, mean: Duration) -> Duration {
        mean.mul_f64(-self.unit().ln())
    }
}

fn p99(waits: &mut [Duration]) -> Duration {
    waits.sort_unstable();
    waits.get((waits.len() * 99).div_ceil(100).saturating_sub(1)).copied().unwrap_or_default()
}

#[test]
fn critical_goes_before_low_across_tenants() {
    let t0 = Instant::now();
    let mut q = small_lane_only(t0);
    q.enqueue(request(0, "x", Priority::Normal, SMALL), t0).unwrap();
    assert_eq!(q.next(t0).map(|d| d.id), Some(0));
    q.enqueue(request(1, "batch", Priority::Low, SMALL), t0).unwrap();
    q.enqueue(request(2, "etl", Priority::Normal, SMALL), t0 + secs(0.1)).unwrap();
    q.enqueue(request(3, "app", Priority::High, SMALL), t0 + secs(0.2)).unwrap();
    q.enqueue(request(4, "chat", Priority::Critical, SMALL), t0 + secs(0.3)).unwrap();
    let mut order = Vec::new();
    let mut running = 0;
    for step in 1..=4 {
        q.release(running);
        let next = q.next(t0 + secs(step as f64)).unwrap();
        order.push(next.id);
        running = next.id;
    }
    assert_eq!(order, [4, 3, 2, 1]);
    q.check_invariants();
}

#[test]
fn aging_serves_low_after_thirty_seconds_of_sustained_critical() {
    let t0 = Instant::now();
    let mut q = small_lane_only(t0);
    q.enqueue(request(0, "chat", Priority::Critical, SMALL), t0).unwrap();
    q.next(t0).unwrap();
    q.enqueue(request(1, "batch", Priority::Low, SMALL), t0).unwrap();
    let mut running = 0;
    let mut low_waited = None;
    // A fresh CRITICAL request arrives every 100 ms and the slot turns over just as often.
    for step in 1..=400u64 {
        let now = t0 + Duration::from_millis(100 * step);
        q.enqueue(request(step + 1, "chat", Priority::Critical, SMALL), now).unwrap();
        q.release(running);
        let next = q.next(now).unwrap();
        running = next.id;
        if next.id == 1 {
            low_waited = Some(next.waited);
            break;
        }
    }
    let waited = low_waited.expect("LOW was starved");
    assert!(waited >= secs(29.9) && waited <= secs(30.1), "{waited:?}");
    q.check_invariants();
}

#[test]
fn score_follows_the_design_formula() {
    let config = QueueConfig::default();
    assert_eq!(priority_score(Priority::Low, Duration::ZERO, None, &config), 3_000.0);
    assert_eq!(priority_score(Priority::Low, secs(10.0), None, &config), 2_000.0);
    assert_eq!(priority_score(Priority::Normal, Duration::ZERO, Some(secs(2.0)), &config), 1_200.0);
    assert_eq!(priority_score(Priority::Normal, Duration::ZERO, Some(Duration::ZERO), &config), 1_000.0);
    assert_eq!(deadline_bonus(Some(secs(60.0)), &config), 0.0);
    assert_eq!(deadline_bonus(None, &config), 0.0);
}

#[test]
fn a_near_deadline_goes_first_within_a_tenant() {
    let t0 = Instant::now();
    let mut q = small_lane_only(t0);
    q.enqueue(request(0, "a", Priority::Normal, SMALL), t0).unwrap();
    q.next(t0).unwrap();
    q.enqueue(request(1, "a", Priority::Normal, SMALL), t0).unwrap();
    let urgent = Request { deadline: Some(t0 + secs(8.0)), ..request(2, "a", Priority::Normal, SMALL) };
    q.enqueue(urgent, t0 + secs(1.0)).unwrap();
    q.release(0);
    assert_eq!(q.next(t0 + secs(1.5)).map(|d| d.id), Some(2));
}

/// A light tenant, and optionally a heavy one sending `heavy_factor` times as many requests, send
/// small NORMAL requests with Poisson arrivals to a small lane of one slot that serves 1,300
/// tokens a second (costs 400–2,200, a mean service time of 1 s); the medium and large slots are
/// taken, so nothing overflows and the service rate is fixed. Returns the light tenant's queue
/// waits after a minute of warm-up, and how many of its requests were refused.
fn simulate(light_per_second: f64, heavy_factor: f64, light_requests: usize, seed: u64) -> (Vec<Duration>, usize) {
    const SLOT_RATE: f64 = 1_300.0;
    const WARM_UP: Duration = Duration::from_secs(60);
    let t0 = Instant::now();
    let mut q = State::new(QueueConfig { default_slot_tokens_per_second: SLOT_RATE, ..QueueConfig::default() }, t0);
    q.set_capacity(3, t0);
    for (id, input) in [(u64::MAX, MEDIUM), (u64::MAX - 1, 40_000)] {
        q.enqueue(request(id, "filler", Priority::Normal, input), t0).unwrap();
        q.next(t0).unwrap();
    }
    let mut rng = Rng(seed);
    let light_gap = secs(1.0 / light_per_second);
    let mut tenants = vec![("light", light_gap, t0 + rng.exponential(light_gap))];
    if heavy_factor > 0.0 {
        let gap = light_gap.div_f64(heavy_factor);
        tenants.push(("heavy", gap, t0 + rng.exponential(gap)));
    }
    let mut completions: BinaryHeap<Reverse<(Instant, u64)>> = BinaryHeap::new();
    let mut costs = HashMap::new();
    let (mut waits, mut light_refused, mut light_sent, mut id) = (Vec::new(), 0, 0, 0u64);
    while light_sent < light_requests {
        let (who, &(tenant, gap, arrival)) =
            tenants.iter().enumerate().min_by_key(|(_, (_, _, at))| *at).expect("at least one tenant");
        let now = match completions.peek() {
            Some(Reverse((done, _))) if *done <= arrival => *done,
            _ => arrival,
        };
        if now == arrival {
            id += 1;
            // 200 to 2,000 prompt tokens and 200 expected output tokens.
            let input = 200 + rng.below(1_801);
            let sent = Request { max_output_tokens: 800, ..request(id, tenant, Priority::Normal, input) };
            let admitted = q.enqueue(sent, now);
            costs.insert(id, input + 200);
            if tenant == "light" {
                light_sent += 1;
                light_refused += usize::from(admitted.is_err());
            }
            tenants[who].2 = arrival + rng.exponential(gap);
        } else if let Some(Reverse((_, done))) = completions.pop() {
            assert!(q.release(done));
        }
        while let Some(dispatch) = q.next(now) {
            assert_eq!(dispatch.lane, Lane::Small);
            if dispatch.tenant == "light" && now.saturating_duration_since(t0) >= WARM_UP + dispatch.waited {
                waits.push(dispatch.waited);
            }
            let service = secs(costs[&dispatch.id] as f64 / SLOT_RATE);
            completions.push(Reverse((now + service, dispatch.id)));
        }
    }
    q.check_invariants();
    (waits, light_refused)
}

/// The light tenant uses 30% of the slot; the heavy one asks for 300%, ten times the light rate,
/// over about 11,000 requests. Fair queuing holds the light tenant's p99 queue wait within twice
/// what it is alone (the measured ratios are 1.15, 1.54 and 0.90; plain DRR without idle credit
/// gives 2.9–4.1) and none of its requests is refused.
#[test]
fn a_tenant_sending_ten_times_the_traffic_barely_moves_a_light_tenants_p99() {
    for seed in [0x9E37_79B9_7F4A_7C15, 7, 12_345] {
        let (mut alone, refused_alone) = simulate(0.3, 0.0, 1_000, seed);
        let (mut shared, refused_shared) = simulate(0.3, 10.0, 1_000, seed);
        let (alone, shared) = (p99(&mut alone), p99(&mut shared));
        eprintln!("seed {seed}: light p99 alone {alone:?}, beside a 10x tenant {shared:?}");
        assert_eq!((refused_alone, refused_shared), (0, 0));
        assert!(alone > Duration::ZERO);
        assert!(shared <= alone * 2, "alone {alone:?}, shared {shared:?}");
    }
}

#[test]
fn backlogged_tenants_are_served_in_proportion_to_weight() {
    let t0 = Instant::now();
    let config = QueueConfig {
        max_queued_requests_per_slot: 10_000,
        max_queued_tokens_per_slot: u64::MAX,
        ..QueueConfig::default()
    };
    let mut q = State::new(config, t0);
    q.set_capacity(3, t0);
    for i in 0..400 {
        q.enqueue(Request { weight: 1.0, ..request(2 * i, "one", Priority::Normal, SMALL) }, t0).unwrap();
        q.enqueue(Request { weight: 3.0, ..request(2 * i + 1, "three", Priority::Normal, SMALL) }, t0).unwrap();
    }
    let mut served = HashMap::<String, u32>::new();
    for _ in 0..200 {
        let next = q.next(t0).unwrap();
        q.release(next.id);
        *served.entry(next.tenant).or_default() += 1;
    }
    assert_eq!((served["one"], served["three"]), (50, 150));
    q.check_invariants();
}

#[test]
fn a_queue_wait_budget_sheds_what_would_wait_longer() {
    let t0 = Instant::now();
    let mut q = small_lane_only(t0);
    for id in 0..4 {
        q.enqueue(request(id, "a", Priority::Normal, SMALL), t0).unwrap();
    }
    q.next(t0).unwrap();
    q.config.max_queue_wait = Some(secs(5.0));
    // As below: 1.2 s later a's next request would wait 8.4 s, another tenant's 1.2 s.
    let t1 = t0 + secs(1.2);
    assert!(matches!(q.enqueue(request(10, "a", Priority::Normal, SMALL), t1), Err(Rejected::Throttled { .. })));
    assert_eq!(q.enqueue(request(12, "b", Priority::Normal, SMALL), t1).map(|a| a.estimated_wait), Ok(secs(1.2)));
    q.check_invariants();
}

#[test]
fn an_unmeetable_deadline_is_refused_at_enqueue() {
    let t0 = Instant::now();
    let mut q = small_lane_only(t0);
    for id in 0..4 {
        q.enqueue(request(id, "a", Priority::Normal, SMALL), t0).unwrap();
    }
    q.next(t0).unwrap();
    // 1.2 s in, the running request (600 tokens at 250 a second: 2.4 s) has 1.2 s left; ahead of
    // a's next request are its own 3 queued requests of 2.4 s each: 8.4 s.
    let t1 = t0 + secs(1.2);
    let tight = Request { deadline: Some(t0 + secs(5.0)), ..request(10, "a", Priority::Normal, SMALL) };
    assert_eq!(q.enqueue(tight, t1), Err(Rejected::DeadlineUnmeetable { estimated_wait: secs(8.4) }));
    let loose = Request { deadline: Some(t0 + secs(10.0)), ..request(11, "a", Priority::Normal, SMALL) };
    assert_eq!(q.enqueue(loose, t1).map(|a| a.estimated_wait), Ok(secs(8.4)));
    // Another tenant is not behind a's backlog under fair queuing: only the running work.
    let other = Request { deadline: Some(t0 + secs(5.0)), ..request(12, "b", Priority::Normal, SMALL) };
    assert_eq!(q.enqueue(other, t1).map(|a| a.estimated_wait), Ok(secs(1.2)));
    let past = Request { deadline: Some(t0), ..request(13, "c", Priority::Normal, SMALL) };
    assert!(matches!(q.enqueue(past, t0 + secs(1.0)), Err(Rejected::DeadlineUnmeetable { .. })));
    // With the medium slot free, a new tenant's small request would overflow there at once.
    assert!(q.release(900));
    let overflow = Request { deadline: Some(t0 + secs(1.0)), ..request(14, "d", Priority::Normal, SMALL) };
    assert_eq!(q.enqueue(overflow, t0).map(|a| a.estimated_wait), Ok(Duration::ZERO));
    q.check_invariants();
}

#[test]
fn a_deadline_passing_in_the_queue_expires_the_request() {
    let t0 = Instant::now();
    let mut q = small_lane_only(t0);
    q.enqueue(request(0, "a", Priority::Normal, SMALL), t0).unwrap();
    q.next(t0).unwrap();
    q.enqueue(Request { deadline: Some(t0 + secs(5.0)), ..request(1, "a", Priority::Normal, SMALL) }, t0).unwrap();
    q.enqueue(request(2, "a", Priority::Normal, SMALL), t0).unwrap();
    assert_eq!(q.expire(t0 + secs(4.9)), []);
    assert_eq!(q.expire(t0 + secs(5.0)), [(1, Rejected::DeadlineExpired)]);
    assert!(!q.is_queued(1));
    q.release(0);
    assert_eq!(q.next(t0 + secs(6.0)).map(|d| d.id), Some(2));
    assert_eq!(q.expire(t0 + secs(60.0)), []);
    q.check_invariants();
}

#[test]
fn a_full_lane_sheds_at_once_with_a_retry_hint_of_at_least_a_second() {
    let t0 = Instant::now();
    let mut q = state(t0);
    q.enqueue(request(0, "heavy", Priority::Normal, SMALL), t0).unwrap();
    q.next(t0).unwrap();
    for id in 1..5 {
        q.enqueue(request(id, "heavy", Priority::Normal, SMALL), t0).unwrap();
    }
    // One small slot: four queued requests is the limit. Drain: (4 × 600 + 600 / 2) / 250 = 10.8 s.
    assert_eq!(
        q.enqueue(request(5, "heavy", Priority::Normal, SMALL), t0),
        Err(Rejected::Throttled { retry_after: secs(10.8) })
    );
    // Heavy's backlog does not take a light tenant's room: it may queue four of its own too.
    for id in 6..10 {
        q.enqueue(request(id, "light", Priority::Normal, SMALL), t0).unwrap();
    }
    assert!(matches!(q.enqueue(request(10, "light", Priority::Normal, SMALL), t0), Err(Rejected::Throttled { .. })));
    // Twice the limit queued: everyone is refused now.
    assert!(matches!(q.enqueue(request(11, "third", Priority::Normal, SMALL), t0), Err(Rejected::Throttled { .. })));
    // The other lanes are not affected.
    q.enqueue(request(12, "heavy", Priority::Normal, MEDIUM), t0).unwrap();
    q.check_invariants();

    // The retry hint never goes below a second, even for a nearly empty lane.
    let config = QueueConfig { max_queued_requests_per_slot: 1, ..QueueConfig::default() };
    let mut q = State::new(config, t0);
    q.set_capacity(3, t0);
    q.enqueue(request(0, "a", Priority::Normal, 10), t0).unwrap();
    q.next(t0).unwrap();
    q.enqueue(request(1, "a", Priority::Normal, 10), t0).unwrap();
    assert_eq!(
        q.enqueue(request(2, "a", Priority::Normal, 10), t0),
        Err(Rejected::Throttled { retry_after: MIN_RETRY_AFTER })
    );
}

#[test]
fn queued_tokens_are_limited_too_but_one_large_request_always_fits() {
    let t0 = Instant::now();
    let config = QueueConfig { max_queued_tokens_per_slot: 1_000, ..QueueConfig::default() };
    let mut q = State::new(config, t0);
    q.set_capacity(3, t0);
    q.enqueue(request(0, "a", Priority::Normal, SMALL), t0).unwrap();
    q.next(t0).unwrap();
    q.enqueue(request(1, "a", Priority::Normal, 5_000), t0).unwrap();
    assert!(matches!(q.enqueue(request(2, "a", Priority::Normal, SMALL), t0), Err(Rejected::Throttled { .. })));
}

#[test]
fn no_capacity_means_unavailable_and_losing_it_refuses_the_queue() {
    let t0 = Instant::now();
    let mut q = State::new(QueueConfig::default(), t0);
    assert_eq!(
        q.enqueue(request(0, "a", Priority::Normal, SMALL), t0),
        Err(Rejected::Unavailable { retry_after: secs(5.0) })
    );
    q.set_capacity(3, t0);
    q.enqueue(request(1, "a", Priority::Normal, SMALL), t0).unwrap();
    q.next(t0).unwrap();
    q.enqueue(request(2, "a", Priority::Normal, SMALL), t0).unwrap();
    q.enqueue(request(3, "b", Priority::Normal, MEDIUM), t0).unwrap();
    let refused = q.set_capacity(0, t0);
    let unavailable = Rejected::Unavailable { retry_after: secs(5.0) };
    assert_eq!(refused, [(2, unavailable), (3, unavailable)]);
    assert_eq!(q.snapshot().queued, 0);
    assert_eq!(q.snapshot().in_flight, 1);
    assert!(q.release(1));
    assert_eq!(q.next(t0), None);
    q.check_invariants();
}

#[test]
fn a_model_scaling_from_zero_holds_requests_until_a_runner_is_ready() {
    let t0 = Instant::now();
    let mut q = State::new(QueueConfig::default(), t0);
    q.set_cold_hold(Some(secs(60.0)));
    let admitted = q.enqueue(request(0, "a", Priority::Normal, SMALL), t0).unwrap();
    assert_eq!(admitted.estimated_wait, secs(60.0), "the hold is the wait to expect");
    q.enqueue(request(1, "b", Priority::High, MEDIUM), t0).unwrap();
    assert_eq!(q.snapshot().queued, 2, "what the autoscaler sees");
    assert_eq!(q.next(t0), None, "nothing runs without a runner");
    assert!(q.expire(t0 + secs(59.0)).is_empty());
    q.check_invariants();
    // A runner is up within the hold: both run, and no hold is left to expire.
    assert!(q.set_capacity(3, t0 + secs(30.0)).is_empty());
    let mut ran: Vec<u64> = std::iter::from_fn(|| q.next(t0 + secs(30.0)).map(|d| d.id)).collect();
    ran.sort_unstable();
    assert_eq!(ran, [0, 1]);
    assert!(q.expire(t0 + secs(120.0)).is_empty());
    q.check_invariants();
}

#[test]
fn a_held_request_is_refused_as_not_ready_when_no_runner_starts_in_time() {
    let t0 = Instant::now();
    let mut q = State::new(QueueConfig::default(), t0);
    q.set_cold_hold(Some(secs(10.0)));
    q.enqueue(request(0, "a", Priority::Normal, SMALL), t0).unwrap();
    q.enqueue(request(1, "a", Priority::Normal, SMALL), t0 + secs(5.0)).unwrap();
    assert!(q.cancel(1), "a client that goes away leaves no hold behind");
    q.check_invariants();
    assert!(q.expire(t0 + secs(9.9)).is_empty());
    assert_eq!(q.expire(t0 + secs(10.0)), [(0, Rejected::NotReady { retry_after: secs(5.0) })]);
    assert_eq!(q.snapshot().queued, 0);
    q.check_invariants();
}

#[test]
fn losing_the_last_runner_of_a_model_scaling_from_zero_holds_its_queue() {
    let t0 = Instant::now();
    let mut q = State::new(QueueConfig::default(), t0);
    q.set_cold_hold(Some(secs(10.0)));
    q.set_capacity(3, t0);
    q.enqueue(request(1, "a", Priority::Normal, SMALL), t0).unwrap();
    q.next(t0).unwrap();
    q.enqueue(request(2, "a", Priority::Normal, SMALL), t0).unwrap();
    assert!(q.set_capacity(0, t0 + secs(1.0)).is_empty(), "held, not refused");
    q.check_invariants();
    assert_eq!(q.expire(t0 + secs(11.0)), [(2, Rejected::NotReady { retry_after: secs(5.0) })]);
    q.check_invariants();
}

#[test]
fn held_requests_are_bounded_like_a_one_slot_queue() {
    let t0 = Instant::now();
    let config = QueueConfig { max_queued_requests_per_slot: 2, ..QueueConfig::default() };
    let mut q = State::new(config, t0);
    q.set_cold_hold(Some(secs(60.0)));
    let outcomes: Vec<bool> =
        (0..10).map(|id| q.enqueue(request(id, "a", Priority::Normal, SMALL), t0).is_ok()).collect();
    assert_eq!(outcomes.iter().filter(|ok| **ok).count(), 2, "{outcomes:?}");
    q.check_invariants();
}

#[test]
fn a_full_lane_overflows_into_the_next_free_larger_lane() {
    let t0 = Instant::now();
    let mut q = state(t0);
    q.enqueue(request(0, "a", Priority::Normal, SMALL), t0).unwrap();
    q.enqueue(request(1, "a", Priority::Normal, SMALL), t0).unwrap();
    q.enqueue(request(2, "a", Priority::Normal, SMALL), t0).unwrap();
    let lanes: Vec<(Lane, bool)> = (0..3).filter_map(|_| q.next(t0)).map(|d| (d.lane, d.overflow)).collect();
    assert_eq!(lanes, [(Lane::Small, false), (Lane::Medium, true), (Lane::Large, true)]);
    // Every slot is taken now.
    q.enqueue(request(3, "a", Priority::Normal, SMALL), t0).unwrap();
    assert_eq!(q.next(t0), None);
    // A large request never goes down a lane.
    q.release(0);
    q.enqueue(request(4, "a", Priority::Normal, 40_000), t0).unwrap();
    assert_eq!(q.next(t0).map(|d| d.id), Some(3));
    assert_eq!(q.next(t0), None);
    q.check_invariants();
}

#[test]
fn overflowing_costs_one_priority_level() {
    let t0 = Instant::now();
    let mut q = state(t0);
    for (id, input) in [(0, SMALL), (1, MEDIUM)] {
        q.enqueue(request(id, "fill", Priority::Normal, input), t0).unwrap();
        q.next(t0).unwrap();
    }
    // Both small and medium are full. When medium frees up, a NORMAL medium request beats a
    // NORMAL small one (which would run one level lower there)...
    q.enqueue(request(2, "a", Priority::Normal, SMALL), t0 + secs(1.0)).unwrap();
    q.enqueue(request(3, "b", Priority::Normal, MEDIUM), t0 + secs(1.0)).unwrap();
    q.release(1);
    assert_eq!(q.next(t0 + secs(1.0)).map(|d| (d.id, d.lane)), Some((3, Lane::Medium)));
    // ...and the tie between a LOW medium request and a NORMAL small one goes to the native one.
    q.enqueue(request(4, "b", Priority::Low, MEDIUM), t0 + secs(1.0)).unwrap();
    q.release(3);
    assert_eq!(q.next(t0 + secs(1.0)).map(|d| d.id), Some(4));
    // A CRITICAL small request overflowing still beats a NORMAL medium one.
    q.enqueue(request(5, "b", Priority::Normal, MEDIUM), t0 + secs(1.0)).unwrap();
    q.enqueue(request(6, "c", Priority::Critical, SMALL), t0 + secs(1.0)).unwrap();
    q.release(4);
    let next = q.next(t0 + secs(1.0)).unwrap();
    assert_eq!((next.id, next.lane, next.overflow), (6, Lane::Medium, true));
    q.check_invariants();
}

#[test]
fn completions_update_the_lane_throughput() {
    let t0 = Instant::now();
    let mut q = state(t0);
    q.enqueue(request(0, "a", Priority::Normal, SMALL), t0).unwrap();
    q.next(t0).unwrap();
    assert!(q.complete(0, 1_000, secs(1.0)));
    assert_eq!(q.snapshot().lanes[0].tokens_per_second, 0.8 * 250.0 + 0.2 * 1_000.0);
    assert!(!q.complete(99, 1_000, secs(1.0)));
    // Degenerate samples are ignored.
    assert!(q.complete(0, 0, secs(1.0)));
    assert!(q.complete(0, 1_000, Duration::ZERO));
    assert_eq!(q.snapshot().lanes[0].tokens_per_second, 400.0);
}

#[test]
fn a_duplicate_id_is_refused() {
    let t0 = Instant::now();
    let mut q = state(t0);
    q.enqueue(request(0, "a", Priority::Normal, SMALL), t0).unwrap();
    assert_eq!(
        q.enqueue(request(0, "b", Priority::Normal, SMALL), t0),
        Err(Rejected::Throttled { retry_after: MIN_RETRY_AFTER })
    );
    q.next(t0).unwrap();
    assert!(q.enqueue(request(0, "b", Priority::Normal, SMALL), t0).is_err());
    q.check_invariants();
}

#[test]
fn extreme_inputs_do_not_panic() {
    let t0 = Instant::now();
    let nonsense = QueueConfig {
        expected_output_fraction: f64::NAN,
        aging_points_per_ms: f64::INFINITY,
        deadline_horizon: Duration::MAX,
        deadline_points_per_ms: f64::NAN,
        fair_credit_tokens: u64::MAX,
        max_queued_requests_per_slot: 0,
        max_queued_tokens_per_slot: 0,
        default_slot_tokens_per_second: -1.0,
        throughput_smoothing: f64::NAN,
        max_retry_after: Duration::ZERO,
        unavailable_retry_after: Duration::ZERO,
        max_queue_wait: Some(Duration::ZERO),
        reserve_window: Some(Duration::MAX),
        overload: Some(OverloadControl { target: Duration::MAX, interval: Duration::ZERO, wait_fraction: f64::NAN }),
    };
    for config in [QueueConfig::default(), nonsense] {
        let mut q = State::new(config, t0);
        let far = t0.checked_add(Duration::from_secs(100 * 365 * 24 * 3600));
        let mut id = 0;
        for capacity in [0, 1, 2, usize::MAX] {
            q.set_capacity(capacity, t0);
            for tokens in [0, 1, u64::MAX] {
                for weight in [0.0, -1.0, f64::NAN, f64::INFINITY, 1e300, 1.0] {
                    for deadline in [None, Some(t0), far] {
                        id += 1;
                        let r = Request {
                            max_output_tokens: tokens,
                            weight,
                            deadline,
                            ..request(id, "t", Priority::from_level(id as u8 % 4), tokens)
                        };
                        let _ = q.enqueue(r, t0);
                    }
                }
            }
            while let Some(d) = q.next(t0) {
                q.complete(d.id, u64::MAX, Duration::MAX);
                q.complete(d.id, u64::MAX, Duration::from_nanos(1));
                q.release(d.id);
            }
            q.expire(t0 + secs(1.0));
            let _ = q.snapshot();
            q.check_invariants();
        }
    }
}

/// Random enqueue / next / release / cancel / expire / capacity changes, checked against a model
/// of which ids are queued and which hold a slot in which lane.
#[test]
fn random_operations_never_lose_or_double_count_a_slot() {
    for seed in 1..=20u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        let t0 = Instant::now();
        let mut now = t0;
        let overload = (seed % 2 == 0).then(OverloadControl::default);
        let mut q = State::new(QueueConfig { overload, ..QueueConfig::default() }, t0);
        q.set_capacity(6, t0);
        let mut queued: HashMap<u64, Lane> = HashMap::new();
        let mut running: HashMap<u64, Lane> = HashMap::new();
        for id in 0..3_000u64 {
            now += Duration::from_millis(rng.below(200));
            match rng.below(10) {
                0..=3 => {
                    let input = [0, 300, 5_000, 20_000, 60_000][rng.below(5) as usize];
                    let deadline = (rng.below(3) == 0).then(|| now + Duration::from_millis(rng.below(20_000)));
                    let r = Request {
                        max_output_tokens: rng.below(4_000),
                        deadline,
                        weight: [0.5, 1.0, 4.0][rng.below(3) as usize],
                        ..request(
                            id,
                            ["a", "b", "c", "d"][rng.below(4) as usize],
                            Priority::from_level(rng.below(4) as u8),
                            input,
                        )
                    };
                    if let Ok(admitted) = q.enqueue(r, now) {
                        queued.insert(id, admitted.lane);
                    }
                }
                4..=5 => {
                    let before = q.snapshot();
                    if let Some(d) = q.next(now) {
                        let own = queued.remove(&d.id).expect("dispatched a request that was not queued");
                        let lane = &before.lanes[d.lane.index()];
                        assert!(lane.in_flight < lane.slots, "dispatched into a full lane");
                        assert!(d.lane >= own);
                        assert_eq!(d.overflow, d.lane != own);
                        running.insert(d.id, d.lane);
                    }
                }
                6..=7 => {
                    let victim = running.keys().copied().nth(rng.below(running.len() as u64 + 1) as usize);
                    let victim = victim.unwrap_or(rng.below(id + 1));
                    assert_eq!(q.release(victim), running.remove(&victim).is_some());
                    assert!(!q.release(victim), "released twice");
                }
                8 => {
                    let victim = rng.below(id + 1);
                    assert_eq!(q.cancel(victim), queued.remove(&victim).is_some());
                }
                _ => match rng.below(4) {
                    0 => {
                        let slots = [0, 1, 2, 3, 6, 12][rng.below(6) as usize];
                        for (id, rejected) in q.set_capacity(slots, now) {
                            assert!(queued.remove(&id).is_some());
                            assert!(matches!(rejected, Rejected::Unavailable { .. }));
                        }
                        if slots == 0 {
                            assert!(queued.is_empty());
                        }
                    }
                    _ => {
                        for (id, rejected) in q.expire(now) {
                            assert!(queued.remove(&id).is_some());
                            assert_eq!(rejected, Rejected::DeadlineExpired);
                        }
                    }
                },
            }
            q.check_invariants();
            let snapshot = q.snapshot();
            assert_eq!(snapshot.queued, queued.len());
            assert_eq!(snapshot.in_flight, running.len());
            for lane in &snapshot.lanes {
                assert_eq!(lane.in_flight, running.values().filter(|&&l| l == lane.lane).count());
            }
            assert_eq!(snapshot.lanes.iter().map(|l| l.in_flight).sum::<usize>(), running.len());
        }
        // Work conservation: once next() says no, no lane has both a free slot and a queue.
        while let Some(d) = q.next(now) {
            running.insert(d.id, d.lane);
        }
        for lane in q.snapshot().lanes {
            assert!(lane.in_flight >= lane.slots || lane.queued == 0, "{lane:?}");
        }
    }
}

#[test]
fn the_last_free_slot_waits_for_a_recently_active_tenant_with_nothing_running() {
    let t0 = Instant::now();
    let config = QueueConfig { reserve_window: Some(secs(10.0)), ..QueueConfig::default() };
    let mut q = State::new(config, t0);
    q.set_capacity(4, t0); // small 2, medium 1, large 1
    for (id, input) in [(900, MEDIUM), (901, 40_000)] {
        q.enqueue(request(id, "other", Priority::Normal, input), t0).unwrap();
        q.next(t0).unwrap();
    }
    // The light tenant was here a moment ago.
    q.enqueue(request(1, "light", Priority::Normal, SMALL), t0).unwrap();
    assert_eq!(q.next(t0).map(|d| d.id), Some(1));
    assert!(q.release(1));
    for id in 10..13 {
        q.enqueue(request(id, "heavy", Priority::Normal, SMALL), t0).unwrap();
    }
    // Heavy takes one small slot; the last one is kept for the light tenant.
    assert_eq!(q.next(t0).map(|d| d.tenant), Some("heavy".to_string()));
    assert_eq!(q.next(t0), None);
    q.check_invariants();
    q.enqueue(request(2, "light", Priority::Normal, SMALL), t0 + secs(1.0)).unwrap();
    let light = q.next(t0 + secs(1.0)).unwrap();
    assert_eq!((light.id, light.waited), (2, Duration::ZERO));
    assert!(q.release(2));
    // Once the light tenant has been quiet for the window, heavy may use every slot.
    assert_eq!(q.next(t0 + secs(5.0)), None);
    q.expire(t0 + secs(12.0));
    assert_eq!(q.next(t0 + secs(12.0)).map(|d| d.tenant), Some("heavy".to_string()));
    q.check_invariants();
}

/// What one phase of [`overload_sim`] saw.
#[derive(Debug, Default)]
struct Phase {
    /// Queue waits of the accepted requests.
    waits: Vec<Duration>,
    sent: usize,
    refused: usize,
}

/// Poisson arrivals of small requests (cost 600 tokens, one second on a slot) to a small lane of
/// 8 slots, in phases of `(load, seconds)` where load 1.0 is the lane's capacity (8 requests a
/// second). Completions feed the queue's estimates as the router's would.
fn overload_sim(overload: Option<OverloadControl>, phases: &[(f64, f64)], seed: u64) -> Vec<Phase> {
    const SLOT_RATE: f64 = 600.0;
    let t0 = Instant::now();
    let config = QueueConfig { default_slot_tokens_per_second: SLOT_RATE, overload, ..QueueConfig::default() };
    let mut q = State::new(config, t0);
    q.set_capacity(16, t0);
    let lanes = q.snapshot().lanes;
    assert_eq!(lanes[0].slots, 8);
    // Fill the medium and large slots for good, so nothing overflows.
    let mut filler = u64::MAX;
    for (lane, input) in [(1, MEDIUM), (2, 40_000)] {
        for _ in 0..lanes[lane].slots {
            q.enqueue(request(filler, "filler", Priority::Normal, input), t0).unwrap();
            q.next(t0).unwrap();
            filler -= 1;
        }
    }
    let mut rng = Rng(seed);
    let mut completions: BinaryHeap<Reverse<(Instant, u64)>> = BinaryHeap::new();
    let mut dispatched_at = HashMap::new();
    let mut results: Vec<Phase> = phases.iter().map(|_| Phase::default()).collect();
    let mut phase_of = HashMap::new();
    let (mut start, mut id) = (t0, 0u64);
    for (index, &(load, seconds)) in phases.iter().enumerate() {
        let gap = secs(1.0 / (8.0 * load));
        let end = start + secs(seconds);
        let mut arrival = start + rng.exponential(gap);
        while arrival < end {
            let now = match completions.peek() {
                Some(Reverse((done, _))) if *done <= arrival => *done,
                _ => arrival,
            };
            if now == arrival {
                id += 1;
                let sent = Request { max_output_tokens: 400, ..request(id, "t", Priority::Normal, SMALL) };
                results[index].sent += 1;
                match q.enqueue(sent, now) {
                    Ok(_) => {
                        phase_of.insert(id, index);
                    }
                    Err(_) => results[index].refused += 1,
                }
                arrival = now + rng.exponential(gap);
            } else if let Some(Reverse((_, done))) = completions.pop() {
                let took = now.saturating_duration_since(dispatched_at.remove(&done).expect("dispatched"));
                assert!(q.complete(done, 600, took));
                assert!(q.release(done));
            }
            while let Some(dispatch) = q.next(now) {
                results[phase_of[&dispatch.id]].waits.push(dispatch.waited);
                dispatched_at.insert(dispatch.id, now);
                completions.push(Reverse((now + secs(1.0), dispatch.id)));
            }
        }
        start = end;
    }
    q.check_invariants();
    results
}

/// The overload bar in simulation: at 3× capacity the accepted requests keep the p99
/// wait they see at 0.8× (the default queue lets them wait out 4 requests per slot), the slots
/// stay busy, and at 0.8× at most 2.5% is refused (0.6–1.9% in these runs: bursts that would
/// have waited longest). Each run starts with 30 s of warm-up.
#[test]
fn overload_control_keeps_accepted_waits_short_at_three_times_capacity() {
    let run = |control: Option<OverloadControl>, load: f64, seed: u64| {
        let mut phases = overload_sim(control, &[(load, 30.0), (load, 300.0)], seed);
        phases.pop().expect("two phases")
    };
    for seed in [1, 2, 3] {
        let control = Some(OverloadControl::default());
        let (plain_normal, plain_over) = (run(None, 0.8, seed), run(None, 3.0, seed));
        let (normal, over) = (run(control.clone(), 0.8, seed), run(control, 3.0, seed));
        let p99 = |phase: &Phase| p99(&mut phase.waits.clone());
        eprintln!(
            "seed {seed}: p99 wait 0.8x {:?} / {:?}, 3x {:?} / {:?} (plain / controlled); \
             3x served {} of {}; 0.8x refused {} of {}",
            p99(&plain_normal),
            p99(&normal),
            p99(&plain_over),
            p99(&over),
            over.waits.len(),
            over.sent,
            normal.refused,
            normal.sent
        );
        assert_eq!(plain_normal.refused, 0);
        assert!(p99(&plain_over) > p99(&plain_normal) * 3, "without overload control the queue stands");
        assert!(p99(&over) <= p99(&plain_normal).mul_f64(1.1), "accepted requests waited {:?}", p99(&over));
        // Close to the 8 requests a second the slots can serve.
        assert!(over.waits.len() as f64 >= 0.95 * 8.0 * 300.0, "served {}", over.waits.len());
        assert!(normal.refused * 40 <= normal.sent, "refused {} of {} at 0.8x", normal.refused, normal.sent);
    }
}

#[test]
fn overload_control_lets_go_once_the_load_falls() {
    let phases = overload_sim(Some(OverloadControl::default()), &[(3.0, 60.0), (0.5, 10.0), (0.5, 60.0)], 9);
    assert!(phases[0].refused > phases[0].sent / 2, "{:?}", phases[0].refused);
    // Within a few intervals after the load falls, nothing is refused.
    assert_eq!(phases[2].refused, 0);
    assert!(phases[2].sent > 200);
}
