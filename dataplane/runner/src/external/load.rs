//! The upstream's load from its Prometheus `/metrics`, mapped onto the runner's Health signal:
//! pure parsing and mapping, no I/O.
//!
//! | Health field           | vLLM                                   | SGLang                  | llama.cpp server                |
//! |------------------------|----------------------------------------|-------------------------|---------------------------------|
//! | queue depth            | `vllm:num_requests_waiting`            | `sglang:num_queue_reqs` | `llamacpp:requests_deferred`    |
//! | running sequences      | `vllm:num_requests_running`            | `sglang:num_running_reqs` | `llamacpp:requests_processing` (or busy `/slots`) |
//! | KV-cache utilisation   | `vllm:kv_cache_usage_perc` (v1), `vllm:gpu_cache_usage_perc` (v0) | `sglang:token_usage` | `llamacpp:kv_cache_usage_ratio` (older servers) |
//! | tokens per second      | growth of `vllm:generation_tokens_total` | `sglang:gen_throughput` | growth of `llamacpp:tokens_predicted_total` |
//!
//! Series of one name with different labels (vLLM's data-parallel `engine`s, several models) add
//! up, except utilisations, of which the fullest counts.

use super::Flavor;

/// What one scrape says about the upstream's load.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Load {
    pub waiting: u32,
    pub running: u32,
    /// 0..1, when the upstream reports it.
    pub kv_utilization: Option<f32>,
    /// Tokens generated since the server started (a counter), when it reports one.
    pub generated_total: Option<f64>,
    /// Tokens per second as the upstream measures it (SGLang).
    pub throughput: Option<f32>,
}

/// Series names per server: (waiting, running, kv utilisation, generated counter, throughput).
struct Names {
    flavor: Flavor,
    waiting: &'static str,
    running: &'static str,
    kv: &'static [&'static str],
    generated: &'static str,
    throughput: &'static str,
}

const SERVERS: [Names; 3] = [
    Names {
        flavor: Flavor::Vllm,
        waiting: "vllm:num_requests_waiting",
        running: "vllm:num_requests_running",
        kv: &["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"],
        generated: "vllm:generation_tokens_total",
        throughput: "",
    },
    Names {
        flavor: Flavor::Sglang,
        waiting: "sglang:num_queue_reqs",
        running: "sglang:num_running_reqs",
        kv: &["sglang:token_usage"],
        generated: "sglang:generation_tokens_total",
        throughput: "sglang:gen_throughput",
    },
    Names {
        flavor: Flavor::LlamaCpp,
        waiting: "llamacpp:requests_deferred",
        running: "llamacpp:requests_processing",
        kv: &["llamacpp:kv_cache_usage_ratio"],
        generated: "llamacpp:tokens_predicted_total",
        throughput: "",
    },
];

/// One sample line: the series name and its value (`name{labels} value [timestamp]`).
fn sample(line: &str) -> Option<(&str, f64)> {
    let line = line.trim();
    if line.is_empty() || line.starts_with('#') {
        return None;
    }
    let name_end = line.find(|c: char| c == '{' || c.is_whitespace())?;
    let name = &line[..name_end];
    let rest = &line[name_end..];
    // Skip the labels; a label value may hold `}` only escaped inside quotes.
    let rest = if rest.starts_with('{') {
        let mut in_quotes = false;
        let mut escaped = false;
        let mut end = None;
        for (i, c) in rest.char_indices() {
            match c {
                _ if escaped => escaped = false,
                '\\' if in_quotes => escaped = true,
                '"' => in_quotes = !in_quotes,
                '}' if !in_quotes => {
                    end = Some(i);
                    break;
                }
                _ => {}
            }
        }
        &rest[end? + 1..]
    } else {
        rest
    };
    let value = rest.split_whitespace().next()?;
    let value: f64 = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    value.is_finite().then_some((name, value))
}

/// Which server wrote `text`, and the load it reports; `None` when no series of a known server
/// is there (a generic OpenAI server, or no metrics at all).
pub fn parse_metrics(text: &str) -> Option<(Flavor, Load)> {
    let samples: Vec<(&str, f64)> = text.lines().filter_map(sample).collect();
    let server = SERVERS.iter().find(|s| {
        let prefix = s.running.split(':').next().unwrap_or_default();
        samples.iter().any(|(n, _)| n.split(':').next() == Some(prefix))
    })?;
    let sum = |name: &str| {
        let mut values = samples.iter().filter(|(n, _)| *n == name).map(|(_, v)| *v).peekable();
        values.peek().is_some().then(|| values.sum::<f64>())
    };
    let max = |name: &str| samples.iter().filter(|(n, _)| *n == name).map(|(_, v)| *v).reduce(f64::max);
    let count = |name: &str| sum(name).unwrap_or(0.0).clamp(0.0, u32::MAX as f64) as u32;
    let load = Load {
        waiting: count(server.waiting),
        running: count(server.running),
        kv_utilization: server.kv.iter().find_map(|n| max(n)).map(|v| v.clamp(0.0, 1.0) as f32),
        generated_total: sum(server.generated),
        throughput: (!server.throughput.is_empty()).then(|| sum(server.throughput)).flatten().map(|v| v as f32),
    };
    Some((server.flavor, load))
}

/// llama.cpp's `/slots`: (slots busy, slots in all); `None` when the body is not a slot list.
pub fn parse_slots(body: &serde_json::Value) -> Option<(u32, u32)> {
    let slots = body.as_array()?;
    let busy =
        slots.iter().filter(|s| s.get("is_processing").and_then(serde_json::Value::as_bool).unwrap_or(false)).count();
    Some((busy as u32, slots.len() as u32))
}

#[cfg(test)]
mod tests {
    use super::*;

    const VLLM: &str = include_str!("testdata/vllm.metrics");
    const VLLM_V0: &str = include_str!("testdata/vllm-v0.metrics");
    const SGLANG: &str = include_str!("testdata/sglang.metrics");
    const LLAMACPP: &str = include_str!("testdata/llamacpp.metrics");

    #[test]
    fn vllm_v1_and_v0_metrics_map_to_queue_running_and_kv_usage() {
        let (flavor, load) = parse_metrics(VLLM).unwrap();
        assert_eq!(flavor, Flavor::Vllm);
        assert_eq!((load.waiting, load.running), (3, 14));
        assert!((load.kv_utilization.unwrap() - 0.7412).abs() < 1e-6);
        assert_eq!(load.generated_total, Some(401234.0));
        assert_eq!(load.throughput, None);

        let (flavor, load) = parse_metrics(VLLM_V0).unwrap();
        assert_eq!(flavor, Flavor::Vllm);
        assert_eq!((load.waiting, load.running), (0, 2));
        assert!((load.kv_utilization.unwrap() - 0.05).abs() < 1e-6, "v0's gpu_cache_usage_perc");
        assert_eq!(load.generated_total, Some(1500.0));
    }

    #[test]
    fn sglang_metrics_map_to_queue_running_token_usage_and_throughput() {
        let (flavor, load) = parse_metrics(SGLANG).unwrap();
        assert_eq!(flavor, Flavor::Sglang);
        assert_eq!((load.waiting, load.running), (2826, 162));
        assert!((load.kv_utilization.unwrap() - 0.28).abs() < 1e-6);
        assert!((load.throughput.unwrap() - 86.508).abs() < 1e-3);
        assert_eq!(load.generated_total, Some(7.557572e6));
    }

    #[test]
    fn llama_cpp_metrics_map_to_deferred_and_processing_requests() {
        let (flavor, load) = parse_metrics(LLAMACPP).unwrap();
        assert_eq!(flavor, Flavor::LlamaCpp);
        assert_eq!((load.waiting, load.running), (2, 4));
        assert_eq!(load.kv_utilization, None, "newer servers report no KV usage");
        assert_eq!(load.generated_total, Some(3310.0));
    }

    #[test]
    fn series_of_several_engines_add_up_and_the_fullest_cache_counts() {
        let text = "vllm:num_requests_waiting{engine=\"0\"} 2\nvllm:num_requests_waiting{engine=\"1\"} 5\n\
                    vllm:kv_cache_usage_perc{engine=\"0\"} 0.2\nvllm:kv_cache_usage_perc{engine=\"1\"} 0.9\n\
                    vllm:num_requests_running{engine=\"0\",x=\"a}b\\\"c\"} 1 1700000000000\n";
        let (_, load) = parse_metrics(text).unwrap();
        assert_eq!((load.waiting, load.running), (7, 1));
        assert!((load.kv_utilization.unwrap() - 0.9).abs() < 1e-6);
    }

    #[test]
    fn unknown_or_malformed_metrics_are_no_load() {
        assert_eq!(parse_metrics(""), None);
        assert_eq!(parse_metrics("# HELP x\nprocess_cpu_seconds_total 3\n"), None);
        // Garbage lines are skipped, not fatal; absurd values are clamped.
        let text = "vllm:num_requests_waiting{broken 3\nvllm:num_requests_running NaN\n\
                    vllm:num_requests_running -4\nvllm:kv_cache_usage_perc 7\n{}\n \u{0}";
        let (flavor, load) = parse_metrics(text).unwrap();
        assert_eq!(flavor, Flavor::Vllm);
        assert_eq!((load.waiting, load.running), (0, 0));
        assert_eq!(load.kv_utilization, Some(1.0));
    }

    #[test]
    fn slots_count_the_busy_ones() {
        let body = serde_json::json!([{"id": 0, "is_processing": true}, {"id": 1, "is_processing": false}, {"id": 2}]);
        assert_eq!(parse_slots(&body), Some((1, 3)));
        assert_eq!(parse_slots(&serde_json::json!({"error": "slots disabled"})), None);
    }
}
