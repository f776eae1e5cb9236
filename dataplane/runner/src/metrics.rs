//! The runner's Prometheus metrics, registered once: `mantle_runner_*`.

use prometheus::{Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry};

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    /// Generate requests by outcome: end_turn, max_tokens, stop_sequence, cancelled,
    /// deadline_exceeded, rejected, failed.
    pub requests: IntCounterVec,
    pub prompt_tokens: IntCounter,
    pub generated_tokens: IntCounter,
    pub time_to_first_token: Histogram,
    pub queue_depth: IntGauge,
    pub running_sequences: IntGauge,
    pub kv_blocks_free: IntGauge,
    pub kv_blocks_total: IntGauge,
    pub preemptions: IntCounter,
    pub interrupted_steps: IntCounter,
    pub prefix_hit_tokens: IntCounter,
    pub kv_corruptions: IntCounter,
    pub kv_cached_blocks: IntGauge,
    pub swaps_out: IntCounter,
    pub swap_bytes: IntGauge,
    /// Seconds the last weight load took per tier.
    pub weight_load_seconds: prometheus::GaugeVec,
    /// External engine: 1 while the upstream answers its health check.
    pub upstream_up: IntGauge,
}

impl Metrics {
    /// Creates and registers every metric (an error here is a bug in a metric definition).
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new("mantle_runner_requests_total", "Generate requests by outcome"),
            &["outcome"],
        )?;
        let prompt_tokens = IntCounter::new("mantle_runner_prompt_tokens_total", "Prompt tokens accepted")?;
        let generated_tokens = IntCounter::new("mantle_runner_generated_tokens_total", "Tokens generated")?;
        let time_to_first_token = Histogram::with_opts(
            HistogramOpts::new(
                "mantle_runner_time_to_first_token_seconds",
                "From accepting a request to its first token",
            )
            .buckets(vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
        )?;
        let queue_depth = IntGauge::new("mantle_runner_queue_depth", "Requests waiting to start")?;
        let running_sequences = IntGauge::new("mantle_runner_running_sequences", "Sequences in the running batch")?;
        let kv_blocks_free = IntGauge::new("mantle_runner_kv_blocks_free", "Free KV-cache blocks")?;
        let kv_blocks_total = IntGauge::new("mantle_runner_kv_blocks_total", "KV-cache blocks")?;
        let preemptions =
            IntCounter::new("mantle_runner_preemptions_total", "Sequences preempted for lack of KV blocks")?;
        let interrupted_steps = IntCounter::new(
            "mantle_runner_interrupted_steps_total",
            "Steps of batch (lowest-priority) sequences given up half way for a real-time arrival",
        )?;
        let prefix_hit_tokens = IntCounter::new(
            "mantle_runner_prefix_cache_hit_tokens_total",
            "Prompt tokens served from the prefix cache",
        )?;
        let kv_corruptions = IntCounter::new(
            "mantle_runner_kv_corruptions_total",
            "Cached KV blocks that failed their checksum and were recomputed",
        )?;
        let kv_cached_blocks = IntGauge::new("mantle_runner_kv_cached_blocks", "KV blocks in the prefix cache")?;
        let swaps_out =
            IntCounter::new("mantle_runner_kv_swaps_out_total", "Preemptions that saved KV blocks to host memory")?;
        let swap_bytes =
            IntGauge::new("mantle_runner_kv_swap_bytes", "Host memory held by preempted sequences' KV blocks")?;
        let weight_load_seconds = prometheus::GaugeVec::new(
            Opts::new("mantle_runner_weight_load_seconds", "Time the last weight load took, by cache tier"),
            &["tier"],
        )?;
        let upstream_up =
            IntGauge::new("mantle_runner_upstream_up", "1 while the external engine answers its health check")?;
        for c in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(prompt_tokens.clone()),
            Box::new(generated_tokens.clone()),
            Box::new(time_to_first_token.clone()),
            Box::new(queue_depth.clone()),
            Box::new(running_sequences.clone()),
            Box::new(kv_blocks_free.clone()),
            Box::new(kv_blocks_total.clone()),
            Box::new(preemptions.clone()),
            Box::new(interrupted_steps.clone()),
            Box::new(prefix_hit_tokens.clone()),
            Box::new(kv_corruptions.clone()),
            Box::new(kv_cached_blocks.clone()),
            Box::new(swaps_out.clone()),
            Box::new(swap_bytes.clone()),
            Box::new(weight_load_seconds.clone()),
            Box::new(upstream_up.clone()),
        ] {
            registry.register(c)?;
        }
        Ok(Self {
            registry,
            requests,
            prompt_tokens,
            generated_tokens,
            time_to_first_token,
            queue_depth,
            running_sequences,
            kv_blocks_free,
            kv_blocks_total,
            preemptions,
            interrupted_steps,
            prefix_hit_tokens,
            kv_corruptions,
            kv_cached_blocks,
            swaps_out,
            swap_bytes,
            weight_load_seconds,
            upstream_up,
        })
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        prometheus::TextEncoder::new().encode_to_string(&self.registry.gather()).unwrap_or_default()
    }
}
