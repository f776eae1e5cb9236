//! Cold start from each weight-cache tier, to a runner that serves its first token:
//! - L4: the GGUF only in the object store (moto's S3 server on loopback), empty node cache;
//! - L3: the node cache holds it; the OS page cache was dropped for the file where possible;
//! - L2: the file is also in host memory (page cache) from the previous start.
//!
//! `cargo bench -p mantle-runner --bench cold_start` (fetches SmolLM2 and moto if missing).

use std::time::Instant;

use mantle_engine::test_support;
use mantle_proto::runner_client::RunnerClient;
use mantle_proto::{ChatMessage, GenerateRequest};
use mantle_runner::test_support::{create_bucket, moto, options, upload};
use mantle_runner::weights::NodeCache;
use tokio_stream::StreamExt;

#[tokio::main]
async fn main() {
    let moto = moto().await;
    create_bucket(&moto, "models").await;
    let gguf = std::fs::read(test_support::smollm2_path()).expect("model fetched");
    let size = gguf.len();
    upload(&moto, "models", "smollm2/model.gguf", gguf).await;
    let cache_dir = std::env::temp_dir().join(format!("mantle-cold-start-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache_dir);
    let uri = "s3://models/smollm2/model.gguf";
    println!("model: SmolLM2-135M-Instruct Q4_1, {:.1} MB", size as f64 / 1e6);
    // The digest a FoundationModel's source.sha256 would name, learned from the first fill.
    let mut sha256: Option<String> = None;
    for label in ["L4 object store -> ready", "L3 node disk    -> ready", "L2 host memory  -> ready"] {
        if label.starts_with("L3") {
            drop_page_cache();
        }
        let started = Instant::now();
        // The init container's step, then the runner's start.
        let cached =
            NodeCache::new(&cache_dir, 1 << 30).fetch(uri, sha256.as_deref(), &options(&moto)).await.expect("fetch");
        sha256 = Some(cached.sha256.clone());
        let fetched = started.elapsed().as_secs_f64();
        let config = mantle_runner::RunnerConfig {
            cache_dir: cache_dir.clone(),
            kv_cache_bytes: 64 << 20,
            ..mantle_runner::RunnerConfig::local(
                cached.path.to_string_lossy(),
                "huggingfacetb.smollm2-135m-instruct-v1:0",
            )
        };
        let runner = mantle_runner::start(config).await.expect("runner starts");
        let ready = started.elapsed().as_secs_f64();
        let mut client = RunnerClient::connect(format!("http://{}", runner.grpc_addr)).await.expect("connect");
        let request = GenerateRequest {
            messages: vec![ChatMessage { role: "user".into(), content: "Hi".into() }],
            max_tokens: 1,
            ..Default::default()
        };
        let mut stream = client.generate(request).await.expect("generate").into_inner();
        stream.next().await.expect("a token").expect("ok");
        let first_token = started.elapsed().as_secs_f64();
        println!(
            "{label}: fetch {:>7.1} ms ({}), ready {:>7.1} ms, first token {:>7.1} ms",
            fetched * 1e3,
            cached.tier.name(),
            ready * 1e3,
            first_token * 1e3
        );
        runner.shutdown().await.expect("shutdown");
    }
    let _ = std::fs::remove_dir_all(&cache_dir);
}

/// Asks the kernel to drop its page cache (needs root; best effort), so the L3 start reads disk.
fn drop_page_cache() {
    let _ = std::process::Command::new("sh").arg("-c").arg("sync; echo 1 > /proc/sys/vm/drop_caches").status();
}
