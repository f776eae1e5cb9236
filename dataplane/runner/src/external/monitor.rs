//! Watches the upstream: its health endpoint every interval (an upstream that stops answering is
//! down, and the runner CRITICAL, from the first failed check: within two intervals), its
//! Prometheus metrics and llama.cpp's `/slots` for load. The latest view is published on a watch
//! channel; the Health stream turns it into signals.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mantle_proto::{HealthSignal, LoadState};
use tokio::sync::watch;

use super::Flavor;
use super::load::{Load, parse_metrics, parse_slots};
use super::upstream::Upstream;
use crate::gpu::GpuSample;
use crate::health::{Signals, judge};
use crate::metrics::Metrics;

/// What the runner knows of its upstream.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct UpstreamState {
    /// `None` while it answers; why not, when it does not.
    pub down: Option<String>,
    pub load: Load,
    /// Slots busy and in all (llama.cpp).
    pub slots: Option<(u32, u32)>,
    pub tokens_per_second: f32,
}

/// The Health message for the upstream's state and the latest GPU sample.
pub fn signal(state: &UpstreamState, gpu: Option<&GpuSample>) -> HealthSignal {
    let gpu_memory = gpu
        .map(|g| &g.status)
        .filter(|g| g.memory_total_bytes > 0)
        .map_or(0.0, |g| g.memory_used_bytes as f32 / g.memory_total_bytes as f32);
    let kv = state.load.kv_utilization.unwrap_or(0.0);
    let memory_utilization = kv.max(gpu_memory);
    let running = match state.slots {
        Some((busy, _)) => busy.max(state.load.running),
        None => state.load.running,
    };
    let (state_, reason) = match &state.down {
        Some(why) => (LoadState::Critical, why.clone()),
        None => judge(Signals {
            queue_depth: state.load.waiting as usize,
            memory_utilization,
            corruptions_last_hour: 0,
            uncorrected_ecc_last_hour: gpu.map_or(0, |g| g.uncorrected_ecc_last_hour),
        }),
    };
    HealthSignal {
        state: state_ as i32,
        queue_depth: state.load.waiting,
        running_sequences: running,
        free_kv_blocks: 0,
        total_kv_blocks: 0,
        kv_cache_utilization: kv,
        memory_utilization,
        tokens_per_second: state.tokens_per_second,
        gpu: gpu.map(|g| g.status),
        reason,
    }
}

/// Which endpoints the upstream turned out to have.
struct Probes {
    /// `/health` answers (else `/v1/models` tells whether the server is up: Ollama).
    health: bool,
    metrics: bool,
    slots: bool,
}

/// Polls `upstream` every `interval` until the receiver side is gone, publishing on `tx`, keeping
/// `ready` (the runner's `/readyz`) and the `upstream_up` gauge in step.
pub async fn watch_upstream(
    upstream: Upstream,
    flavor: Flavor,
    interval: Duration,
    tx: watch::Sender<UpstreamState>,
    ready: Arc<AtomicBool>,
    metrics: Metrics,
) {
    let mut probes = Probes { health: true, metrics: true, slots: flavor == Flavor::LlamaCpp };
    let mut ticks = tokio::time::interval(interval);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_generated: Option<(Instant, f64)> = None;
    loop {
        ticks.tick().await;
        if tx.is_closed() {
            return;
        }
        let down = check(&upstream, &mut probes, interval).await;
        let mut state = UpstreamState { down, ..tx.borrow().clone() };
        if state.down.is_none() {
            let (load, slots) = tokio::join!(
                scrape(&upstream, &mut probes.metrics, interval),
                scrape_slots(&upstream, &mut probes.slots, interval)
            );
            if let Some(load) = load {
                let now = Instant::now();
                if let Some(rate) = load.throughput {
                    state.tokens_per_second = rate;
                } else if let Some(total) = load.generated_total {
                    if let Some((then, before)) = last_generated {
                        let dt = now.duration_since(then).as_secs_f64();
                        if dt > 0.0 && total >= before {
                            state.tokens_per_second = ((total - before) / dt) as f32;
                        }
                    }
                    last_generated = Some((now, total));
                }
                state.load = load;
            }
            state.slots = slots.or(state.slots.filter(|_| probes.slots));
        }
        let up = state.down.is_none();
        if ready.swap(up, Ordering::AcqRel) != up {
            match &state.down {
                None => tracing::info!(upstream = upstream.base(), "the upstream answers"),
                Some(why) => tracing::warn!(upstream = upstream.base(), reason = %why, "the upstream is down"),
            }
        }
        metrics.upstream_up.set(up as i64);
        metrics.queue_depth.set(state.load.waiting.into());
        metrics.running_sequences.set(state.load.running.into());
        tx.send_replace(state);
    }
}

/// `None` when the upstream is up, else why it is not.
async fn check(upstream: &Upstream, probes: &mut Probes, timeout: Duration) -> Option<String> {
    if probes.health {
        match upstream.get_text("/health", timeout).await {
            Ok(_) => return None,
            Err(e) if e.is_not_found() => probes.health = false,
            Err(e) => return Some(e.to_string()),
        }
    }
    upstream.get_json("/v1/models", timeout).await.err().map(|e| e.to_string())
}

/// llama.cpp's busy and total slots; stops asking a server that has no `/slots`.
async fn scrape_slots(upstream: &Upstream, enabled: &mut bool, timeout: Duration) -> Option<(u32, u32)> {
    if !*enabled {
        return None;
    }
    match upstream.get_json("/slots", timeout).await {
        Ok(body) => parse_slots(&body),
        Err(e) => {
            if matches!(e, super::upstream::UpstreamError::Status { .. }) {
                *enabled = false;
            }
            None
        }
    }
}

/// The load the upstream's `/metrics` reports; stops asking one that has none.
async fn scrape(upstream: &Upstream, enabled: &mut bool, timeout: Duration) -> Option<Load> {
    if !*enabled {
        return None;
    }
    match upstream.get_text("/metrics", timeout).await {
        Ok(text) => {
            let parsed = parse_metrics(&text);
            if parsed.is_none() {
                *enabled = false;
            }
            parsed.map(|(_, load)| load)
        }
        Err(e) => {
            // llama.cpp without --metrics answers 501; a server without the page 404.
            if matches!(e, super::upstream::UpstreamError::Status { .. }) {
                *enabled = false;
            }
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_down_upstream_is_critical_with_the_reason() {
        let state = UpstreamState { down: Some("connection refused".into()), ..Default::default() };
        let s = signal(&state, None);
        assert_eq!(s.state(), LoadState::Critical);
        assert_eq!(s.reason, "connection refused");
    }

    #[test]
    fn the_upstreams_queue_and_cache_are_judged_like_the_builtin_engines() {
        let busy = |waiting, kv| UpstreamState {
            load: Load { waiting, running: 8, kv_utilization: kv, ..Default::default() },
            ..Default::default()
        };
        assert_eq!(signal(&busy(3, Some(0.2)), None).state(), LoadState::Healthy);
        assert_eq!(signal(&busy(60, Some(0.2)), None).state(), LoadState::Degraded);
        assert_eq!(signal(&busy(3, Some(0.9)), None).state(), LoadState::Throttle);
        assert_eq!(signal(&busy(3, Some(0.97)), None).state(), LoadState::Critical);
        let s = signal(&busy(120, None), None);
        assert_eq!((s.state(), s.queue_depth, s.running_sequences), (LoadState::Throttle, 120, 8));
        // llama.cpp's busy slots count as running.
        let slots = UpstreamState { slots: Some((3, 4)), ..Default::default() };
        assert_eq!(signal(&slots, None).running_sequences, 3);
    }
}
