//! The load signal a runner pushes to the router, judged with the design's thresholds:
//! - queue < 50 and memory < 70% is HEALTHY; queue 50–100 or memory 70–85% DEGRADED;
//!   queue > 100 or memory > 85% THROTTLE; memory > 95% CRITICAL. Memory is the larger of
//!   KV-cache and GPU memory use.
//! - KV-cache corruption (blocks failing their CRC): more than 3 events in the last hour is a soft
//!   alert (DEGRADED), more than 10 takes the runner out of rotation (CRITICAL).
//! - Any uncorrectable GPU ECC error in the last hour is CRITICAL.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use mantle_proto::{HealthSignal, LoadState};

use crate::engine_loop::LoopStats;

const QUEUE_DEGRADED: usize = 50;
const QUEUE_THROTTLE: usize = 100;
const MEMORY_DEGRADED: f32 = 0.70;
const MEMORY_THROTTLE: f32 = 0.85;
const MEMORY_CRITICAL: f32 = 0.95;
const CORRUPTIONS_SOFT_ALERT: u64 = 3;
const CORRUPTIONS_OUT_OF_ROTATION: u64 = 10;

/// What the state is judged on.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Signals {
    pub queue_depth: usize,
    /// 0..1
    pub memory_utilization: f32,
    pub corruptions_last_hour: u64,
    pub uncorrected_ecc_last_hour: u64,
}

/// The state for these signals, and why.
pub fn judge(s: Signals) -> (LoadState, String) {
    let memory = format!("memory {:.0}%", s.memory_utilization * 100.0);
    let pct = |v: f32| format!("{:.0}%", v * 100.0);
    if s.memory_utilization > MEMORY_CRITICAL {
        (LoadState::Critical, format!("{memory} > {}", pct(MEMORY_CRITICAL)))
    } else if s.corruptions_last_hour > CORRUPTIONS_OUT_OF_ROTATION {
        (
            LoadState::Critical,
            format!("{} KV corruptions in the last hour > {CORRUPTIONS_OUT_OF_ROTATION}", s.corruptions_last_hour),
        )
    } else if s.uncorrected_ecc_last_hour > 0 {
        (LoadState::Critical, format!("{} uncorrectable ECC errors in the last hour", s.uncorrected_ecc_last_hour))
    } else if s.queue_depth > QUEUE_THROTTLE {
        (LoadState::Throttle, format!("queue depth {} > {QUEUE_THROTTLE}", s.queue_depth))
    } else if s.memory_utilization > MEMORY_THROTTLE {
        (LoadState::Throttle, format!("{memory} > {}", pct(MEMORY_THROTTLE)))
    } else if s.corruptions_last_hour > CORRUPTIONS_SOFT_ALERT {
        (
            LoadState::Degraded,
            format!("{} KV corruptions in the last hour > {CORRUPTIONS_SOFT_ALERT}", s.corruptions_last_hour),
        )
    } else if s.queue_depth >= QUEUE_DEGRADED {
        (LoadState::Degraded, format!("queue depth {} >= {QUEUE_DEGRADED}", s.queue_depth))
    } else if s.memory_utilization >= MEMORY_DEGRADED {
        (LoadState::Degraded, format!("{memory} >= {}", pct(MEMORY_DEGRADED)))
    } else {
        (LoadState::Healthy, format!("queue depth {}, {memory}", s.queue_depth))
    }
}

/// How much a running total grew over the last hour, from samples taken now and then.
#[derive(Debug, Default)]
pub struct HourlyRate {
    samples: VecDeque<(Instant, u64)>,
}

impl HourlyRate {
    const WINDOW: Duration = Duration::from_secs(3600);

    /// Records the total at `now` and returns its growth within the window.
    pub fn observe(&mut self, now: Instant, total: u64) -> u64 {
        // Keep one sample older than the window as the baseline.
        while self.samples.len() > 1 && self.samples.get(1).is_some_and(|(t, _)| now.duration_since(*t) >= Self::WINDOW)
        {
            self.samples.pop_front();
        }
        if self.samples.back().is_none_or(|&(_, last)| last != total) || self.samples.len() < 2 {
            self.samples.push_back((now, total));
        }
        let base = self.samples.front().map_or(total, |&(_, v)| v);
        total.saturating_sub(base)
    }
}

/// The health message for the engine statistics and the latest GPU sample.
pub fn signal(stats: &LoopStats, gpu: Option<&crate::gpu::GpuSample>) -> HealthSignal {
    let s = &stats.scheduler;
    let used = s.total_blocks.saturating_sub(s.free_blocks);
    let kv_utilization = if s.total_blocks == 0 { 0.0 } else { used as f32 / s.total_blocks as f32 };
    let gpu_memory = gpu
        .map(|g| &g.status)
        .filter(|g| g.memory_total_bytes > 0)
        .map_or(0.0, |g| g.memory_used_bytes as f32 / g.memory_total_bytes as f32);
    let memory_utilization = kv_utilization.max(gpu_memory);
    let (state, reason) = judge(Signals {
        queue_depth: s.waiting,
        memory_utilization,
        corruptions_last_hour: stats.corruptions_last_hour,
        uncorrected_ecc_last_hour: gpu.map_or(0, |g| g.uncorrected_ecc_last_hour),
    });
    HealthSignal {
        state: state as i32,
        queue_depth: s.waiting as u32,
        running_sequences: s.running as u32,
        free_kv_blocks: s.free_blocks as u32,
        total_kv_blocks: s.total_blocks as u32,
        kv_cache_utilization: kv_utilization,
        memory_utilization,
        tokens_per_second: stats.tokens_per_second,
        gpu: gpu.map(|g| g.status),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use mantle_proto::GpuStatus;

    use super::*;

    fn state(queue_depth: usize, memory_utilization: f32) -> LoadState {
        judge(Signals { queue_depth, memory_utilization, ..Default::default() }).0
    }

    #[test]
    fn queue_and_memory_thresholds_follow_the_design() {
        assert_eq!(state(0, 0.0), LoadState::Healthy);
        assert_eq!(state(49, 0.69), LoadState::Healthy);
        assert_eq!(state(50, 0.1), LoadState::Degraded);
        assert_eq!(state(100, 0.1), LoadState::Degraded);
        assert_eq!(state(10, 0.70), LoadState::Degraded);
        assert_eq!(state(10, 0.85), LoadState::Degraded);
        assert_eq!(state(101, 0.1), LoadState::Throttle);
        assert_eq!(state(10, 0.86), LoadState::Throttle);
        assert_eq!(state(10, 0.951), LoadState::Critical);
        assert_eq!(state(500, 0.99), LoadState::Critical, "memory exhaustion outranks the queue");
        assert!(
            judge(Signals { queue_depth: 120, memory_utilization: 0.2, ..Default::default() })
                .1
                .contains("queue depth 120 > 100")
        );
    }

    #[test]
    fn corruption_and_ecc_rates_take_a_runner_out_of_rotation() {
        let with = |corruptions_last_hour, uncorrected_ecc_last_hour| {
            judge(Signals { corruptions_last_hour, uncorrected_ecc_last_hour, ..Default::default() }).0
        };
        assert_eq!(with(3, 0), LoadState::Healthy);
        assert_eq!(with(4, 0), LoadState::Degraded);
        assert_eq!(with(10, 0), LoadState::Degraded);
        assert_eq!(with(11, 0), LoadState::Critical);
        assert_eq!(with(0, 1), LoadState::Critical);
    }

    #[test]
    fn a_gpu_near_full_memory_is_critical() {
        let stats = LoopStats::default();
        let status = GpuStatus { memory_used_bytes: 79, memory_total_bytes: 80, ..Default::default() };
        let gpu = crate::gpu::GpuSample { status, uncorrected_ecc_last_hour: 0 };
        let s = signal(&stats, Some(&gpu));
        assert_eq!(s.state(), LoadState::Critical);
        assert!(s.memory_utilization > 0.95);
        assert_eq!(signal(&stats, None).state(), LoadState::Healthy);
    }

    #[test]
    fn hourly_rate_counts_growth_within_the_last_hour() {
        let t0 = Instant::now();
        let mut r = HourlyRate::default();
        assert_eq!(r.observe(t0, 0), 0);
        assert_eq!(r.observe(t0 + Duration::from_secs(60), 2), 2);
        assert_eq!(r.observe(t0 + Duration::from_secs(1800), 5), 5);
        // An hour after the first events, only those since t0+60s's baseline count.
        assert_eq!(r.observe(t0 + Duration::from_secs(3700), 5), 3);
        assert_eq!(r.observe(t0 + Duration::from_secs(9000), 5), 0, "nothing new in the last hour");
    }
}
