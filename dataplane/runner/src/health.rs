//! The load signal a runner pushes to the router, judged with the design's thresholds:
//! queue < 50 and memory < 70% is HEALTHY; queue 50–100 or memory 70–85% DEGRADED; queue > 100
//! or memory > 85% THROTTLE; memory > 95% CRITICAL. Memory is the larger of KV-cache and device
//! memory use.

use mantle_proto::{HealthSignal, LoadState};

use crate::engine_loop::LoopStats;

const QUEUE_DEGRADED: usize = 50;
const QUEUE_THROTTLE: usize = 100;
const MEMORY_DEGRADED: f32 = 0.70;
const MEMORY_THROTTLE: f32 = 0.85;
const MEMORY_CRITICAL: f32 = 0.95;

/// The state for a queue depth and memory utilisation (0..1), and why.
pub fn load_state(queue_depth: usize, memory_utilization: f32) -> (LoadState, String) {
    let memory = format!("memory {:.0}%", memory_utilization * 100.0);
    if memory_utilization > MEMORY_CRITICAL {
        (LoadState::Critical, format!("{memory} > {:.0}%", MEMORY_CRITICAL * 100.0))
    } else if queue_depth > QUEUE_THROTTLE {
        (LoadState::Throttle, format!("queue depth {queue_depth} > {QUEUE_THROTTLE}"))
    } else if memory_utilization > MEMORY_THROTTLE {
        (LoadState::Throttle, format!("{memory} > {:.0}%", MEMORY_THROTTLE * 100.0))
    } else if queue_depth >= QUEUE_DEGRADED {
        (LoadState::Degraded, format!("queue depth {queue_depth} >= {QUEUE_DEGRADED}"))
    } else if memory_utilization >= MEMORY_DEGRADED {
        (LoadState::Degraded, format!("{memory} >= {:.0}%", MEMORY_DEGRADED * 100.0))
    } else {
        (LoadState::Healthy, format!("queue depth {queue_depth}, {memory}"))
    }
}

/// The health message for the current engine statistics.
pub fn signal(stats: &LoopStats) -> HealthSignal {
    let s = &stats.scheduler;
    let used = s.total_blocks.saturating_sub(s.free_blocks);
    let kv_utilization = if s.total_blocks == 0 { 0.0 } else { used as f32 / s.total_blocks as f32 };
    let memory_utilization = kv_utilization;
    let (state, reason) = load_state(s.waiting, memory_utilization);
    HealthSignal {
        state: state as i32,
        queue_depth: s.waiting as u32,
        running_sequences: s.running as u32,
        free_kv_blocks: s.free_blocks as u32,
        total_kv_blocks: s.total_blocks as u32,
        kv_cache_utilization: kv_utilization,
        memory_utilization,
        tokens_per_second: stats.tokens_per_second,
        gpu: None,
        reason,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_follow_the_design() {
        let state = |q, m| load_state(q, m).0;
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
        assert!(load_state(120, 0.2).1.contains("queue depth 120 > 100"));
    }
}
