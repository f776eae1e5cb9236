//! The external-engine sidecar's cost: the same greedy chat requests straight to llama.cpp's
//! `llama-server` (streamed `/v1/chat/completions`) and through `mantle-runner --engine external`
//! in front of it (streamed gRPC Generate), interleaved run by run, at 1 and 16 concurrent
//! streams. Reports time to first token (p50/p99 over every request of a mode) and generated
//! tokens per second per run (median and range), each as sidecar vs direct.
//!
//! `cargo bench -p mantle-runner --bench external` (builds llama-server on first use).

use std::time::{Duration, Instant};

use mantle_engine::test_support::smollm2_path;
use mantle_proto::runner_client::RunnerClient;
use mantle_proto::{ChatMessage, GenerateRequest, generate_response};
use mantle_runner::external::sse::Decoder;
use mantle_runner::test_support::LlamaServer;
use serde_json::json;
use tokio_stream::StreamExt;
use tonic::transport::Channel;

const MAX_TOKENS: u32 = 64;
const ROUNDS: usize = 10;

/// A question no earlier request asked, so every request computes its whole prompt (llama-server
/// would serve a repeated one from its prompt cache, favouring whichever mode came second).
fn question() -> String {
    static ASKED: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = ASKED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("Question {n}: write a few sentences about the sea.")
}

/// One request's time to first token and tokens generated.
struct Sample {
    ttft: Duration,
    tokens: u32,
}

async fn direct(http: &reqwest::Client, url: &str, q: String) -> Sample {
    let body = json!({"messages": [{"role": "user", "content": q}], "max_tokens": MAX_TOKENS, "temperature": 0,
                      "stream": true, "stream_options": {"include_usage": true}});
    let started = Instant::now();
    let mut response = http
        .post(format!("{url}/v1/chat/completions"))
        .header("content-type", "application/json")
        .body(body.to_string())
        .send()
        .await
        .expect("llama-server answers");
    let (mut decoder, mut ttft, mut tokens) = (Decoder::default(), None, 0);
    while let Some(bytes) = response.chunk().await.expect("stream") {
        for event in decoder.feed(&bytes).expect("events") {
            if event == "[DONE]" {
                continue;
            }
            let chunk = mantle_runner::external::openai::parse_chunk(&event).expect("chunk");
            if !chunk.text.is_empty() && ttft.is_none() {
                ttft = Some(started.elapsed());
            }
            if let Some(u) = chunk.usage {
                tokens = u.output_tokens;
            }
        }
    }
    Sample { ttft: ttft.unwrap_or_else(|| started.elapsed()), tokens }
}

async fn sidecar(mut client: RunnerClient<Channel>, q: String) -> Sample {
    let request = GenerateRequest {
        messages: vec![ChatMessage { role: "user".into(), content: q }],
        max_tokens: MAX_TOKENS,
        ..Default::default()
    };
    let started = Instant::now();
    let mut stream = client.generate(request).await.expect("generate").into_inner();
    let (mut ttft, mut tokens) = (None, 0);
    while let Some(message) = stream.next().await {
        match message.expect("stream").event {
            Some(generate_response::Event::Token(t)) if !t.text.is_empty() && ttft.is_none() => {
                ttft = Some(started.elapsed())
            }
            Some(generate_response::Event::Finished(f)) => tokens = f.usage.unwrap_or_default().output_tokens,
            _ => {}
        }
    }
    Sample { ttft: ttft.unwrap_or_else(|| started.elapsed()), tokens }
}

/// `streams` concurrent streams of `per_stream` requests each; the samples and tokens per second.
async fn run(
    through_sidecar: bool,
    streams: usize,
    per_stream: usize,
    http: &reqwest::Client,
    url: &str,
    client: &RunnerClient<Channel>,
) -> (Vec<Sample>, f64) {
    let started = Instant::now();
    let tasks: Vec<_> = (0..streams)
        .map(|_| {
            let (http, url, client) = (http.clone(), url.to_string(), client.clone());
            tokio::spawn(async move {
                let mut samples = Vec::new();
                for _ in 0..per_stream {
                    samples.push(if through_sidecar {
                        sidecar(client.clone(), question()).await
                    } else {
                        direct(&http, &url, question()).await
                    });
                }
                samples
            })
        })
        .collect();
    let mut samples = Vec::new();
    for t in tasks {
        samples.extend(t.await.expect("stream task"));
    }
    let tokens: u32 = samples.iter().map(|s| s.tokens).sum();
    (samples, tokens as f64 / started.elapsed().as_secs_f64())
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[tokio::main]
async fn main() {
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get());
    let server = LlamaServer::start(&smollm2_path(), 16, threads).await;
    let config = mantle_runner::RunnerConfig::external(server.url(), "huggingfacetb.smollm2-135m-instruct-v1:0");
    let runner = mantle_runner::start(config).await.expect("runner starts");
    let client = RunnerClient::connect(format!("http://{}", runner.grpc_addr)).await.expect("client connects");
    // A new connection per request: llama-server closes one after each streamed answer anyway.
    let http = reqwest::Client::builder().tcp_nodelay(true).pool_max_idle_per_host(0).build().expect("client");
    println!("llama-server: SmolLM2-135M-Instruct Q4_1, 16 slots, {threads} threads; {MAX_TOKENS} tokens a request");
    for (streams, per_stream) in [(1usize, 10usize), (16, 2)] {
        // Warm both paths (connections, the server's prompt cache).
        run(false, streams, 1, &http, &server.url(), &client).await;
        run(true, streams, 1, &http, &server.url(), &client).await;
        let (mut ttft, mut rate) = ([Vec::new(), Vec::new()], [Vec::new(), Vec::new()]);
        for round in 0..ROUNDS {
            // Alternate which goes first.
            for k in [round % 2, 1 - round % 2] {
                let (samples, tps) = run(k == 1, streams, per_stream, &http, &server.url(), &client).await;
                ttft[k].extend(samples.iter().map(|s| ms(s.ttft)));
                rate[k].push(tps);
            }
        }
        for v in ttft.iter_mut().chain(rate.iter_mut()) {
            v.sort_by(f64::total_cmp);
        }
        let (d50, d99) = (percentile(&ttft[0], 0.5), percentile(&ttft[0], 0.99));
        let (s50, s99) = (percentile(&ttft[1], 0.5), percentile(&ttft[1], 0.99));
        let (dr, sr) = (percentile(&rate[0], 0.5), percentile(&rate[1], 0.5));
        println!(
            "{streams:>2} streams: TTFT p50 direct {d50:.2} ms, sidecar {s50:.2} ms (+{:.2} ms); p99 direct {d99:.2} ms, sidecar {s99:.2} ms (+{:.2} ms)",
            s50 - d50,
            s99 - d99
        );
        println!(
            "{streams:>2} streams: tokens/s direct {dr:.1} [{:.1}..{:.1}], sidecar {sr:.1} [{:.1}..{:.1}]: {:.3}x",
            rate[0][0],
            rate[0][ROUNDS - 1],
            rate[1][0],
            rate[1][ROUNDS - 1],
            sr / dr
        );
    }
    runner.shutdown().await.expect("runner stops");
}
