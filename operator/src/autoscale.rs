//! The autoscaler, pure and shared by both executors: a pool's replicas from the requests waiting
//! for it, between `replicas.min` and `replicas.max`.
//!
//! - **Up within one interval:** when more than `targetQueueDepth` requests wait per replica, the
//!   pool goes at once to enough replicas for the queue (at least one more).
//! - **Down only after a stabilisation window:** the pool runs the largest recommendation of the
//!   window (as Kubernetes' HorizontalPodAutoscaler does), so a queue that comes and goes does not
//!   make replicas come and go.
//! - **From zero:** a pool at zero replicas with requests waiting gets one replica.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

/// How the autoscaler behaves.
#[derive(Clone, Debug, PartialEq)]
pub struct AutoscalerConfig {
    /// How long a lower recommendation must hold before the pool scales down.
    pub stabilization: Duration,
}

impl Default for AutoscalerConfig {
    fn default() -> Self {
        AutoscalerConfig { stabilization: Duration::from_secs(300) }
    }
}

/// What the autoscaler sees of one pool.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Signal {
    /// Requests waiting for the pool (in the router's queue and the runners').
    pub queued: f64,
    /// Replicas the pool runs now.
    pub replicas: i32,
    pub min: i32,
    pub max: i32,
    /// Waiting requests per replica above which another replica is added.
    pub target_queue_depth: i32,
}

/// Replicas for the queue alone: enough that no replica has more than the target waiting.
fn for_queue(s: &Signal) -> i32 {
    let target = s.target_queue_depth.max(1) as f64;
    let needed = (s.queued / target).ceil() as i32;
    if s.queued > 0.0 && s.replicas == 0 {
        return needed.max(1);
    }
    if s.replicas > 0 && s.queued / s.replicas as f64 > target {
        return needed.max(s.replicas + 1);
    }
    needed
}

/// The recommendations of each pool over the stabilisation window.
#[derive(Debug, Default)]
pub struct Autoscaler {
    config: AutoscalerConfig,
    history: BTreeMap<String, VecDeque<(Instant, i32)>>,
}

impl Autoscaler {
    pub fn new(config: AutoscalerConfig) -> Self {
        Autoscaler { config, history: BTreeMap::new() }
    }

    /// The replicas `pool` should run at `now`.
    pub fn decide(&mut self, pool: &str, signal: &Signal, now: Instant) -> i32 {
        let (min, max) = (signal.min.max(0), signal.max.max(signal.min).max(1));
        let recommendation = for_queue(signal).clamp(min, max);
        let history = self.history.entry(pool.to_string()).or_default();
        history.push_back((now, recommendation));
        while history.front().is_some_and(|(at, _)| now.duration_since(*at) > self.config.stabilization) {
            history.pop_front();
        }
        let stable = history.iter().map(|(_, r)| *r).max().unwrap_or(recommendation);
        // Up at once; down to the window's largest recommendation.
        recommendation.max(stable.min(signal.replicas.max(recommendation)))
    }

    /// Forgets pools that no longer exist.
    pub fn retain(&mut self, pools: &[&str]) {
        self.history.retain(|p, _| pools.contains(&p.as_str()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signal(queued: f64, replicas: i32) -> Signal {
        Signal { queued, replicas, min: 1, max: 6, target_queue_depth: 16 }
    }

    /// Runs `queue(t)` every 15 s for `steps` steps, the replicas following each decision.
    fn run(queue: impl Fn(usize) -> f64, steps: usize, start: i32) -> Vec<i32> {
        let mut a = Autoscaler::new(AutoscalerConfig::default());
        let t0 = Instant::now();
        let mut replicas = start;
        (0..steps)
            .map(|i| {
                replicas = a.decide("p", &signal(queue(i), replicas), t0 + Duration::from_secs(15 * i as u64));
                replicas
            })
            .collect()
    }

    #[test]
    fn a_load_step_up_scales_up_within_one_interval() {
        // 80 waiting on 1 replica (target 16): five replicas at once, not one at a time.
        let replicas = run(|i| if i >= 2 { 80.0 } else { 0.0 }, 4, 1);
        assert_eq!(replicas, [1, 1, 5, 5]);
        // More than max waiting: max.
        assert_eq!(run(|_| 1000.0, 1, 1), [6]);
    }

    #[test]
    fn a_load_step_down_scales_down_only_after_the_window_and_never_below_min() {
        // 5 replicas busy for a minute, then idle: they stay for the 5-minute window, then go to min.
        let replicas = run(|i| if i < 4 { 80.0 } else { 0.0 }, 30, 5);
        let first_down = replicas.iter().position(|&r| r < 5).unwrap();
        assert!((23..=25).contains(&first_down), "scaled down at step {first_down}: {replicas:?}");
        assert_eq!(*replicas.last().unwrap(), 1);
        assert!(replicas.iter().all(|&r| r >= 1));
    }

    #[test]
    fn a_flapping_queue_does_not_flap_the_replicas() {
        // The queue alternates between busy and idle every interval.
        let replicas = run(|i| if i % 2 == 0 { 48.0 } else { 0.0 }, 20, 1);
        let changes = [1].iter().chain(&replicas).collect::<Vec<_>>().windows(2).filter(|w| w[0] != w[1]).count();
        assert_eq!(changes, 1, "one step up, then steady: {replicas:?}");
        assert_eq!(*replicas.last().unwrap(), 3);
    }

    #[test]
    fn a_pool_at_zero_gets_a_replica_for_its_first_request() {
        let mut a = Autoscaler::new(AutoscalerConfig::default());
        let zero = Signal { queued: 0.0, replicas: 0, min: 0, max: 2, target_queue_depth: 16 };
        let now = Instant::now();
        assert_eq!(a.decide("p", &zero, now), 0);
        assert_eq!(a.decide("p", &Signal { queued: 1.0, ..zero }, now + Duration::from_secs(15)), 1);
    }
}
