//! The weight cache against a real S3-compatible server (moto, started here on loopback):
//! L4 → L3 fills verified by SHA-256, L3 hits, a mismatching download refused while the good
//! copy stays, directory sources, LRU eviction within the budget, and a runner serving from s3://.

use std::path::PathBuf;
use std::time::Duration;

use mantle_engine::test_support;
use mantle_runner::test_support::{create_bucket, moto, options, upload};
use mantle_runner::weights::{NodeCache, Tier, WeightError};

fn sha256(data: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(data).iter().map(|b| format!("{b:02x}")).collect()
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("mantle-weights-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_weights_fill_the_node_cache_once_and_are_verified() {
    let moto = moto().await;
    create_bucket(&moto, "models").await;
    let good = b"pretend these are weights".repeat(1000);
    upload(&moto, "models", "tiny/model.gguf", good.clone()).await;
    let cache = NodeCache::new(scratch("fill"), 1 << 30);
    let opts = options(&moto);
    let sha = sha256(&good);

    let first = cache.fetch("s3://models/tiny/model.gguf", Some(&sha), &opts).await.unwrap();
    assert_eq!(first.tier, Tier::ObjectStore);
    assert_eq!(std::fs::read(&first.path).unwrap(), good);
    assert!(first.path.ends_with(&sha), "content-addressed: {}", first.path.display());
    let second = cache.fetch("s3://models/tiny/model.gguf", Some(&sha), &opts).await.unwrap();
    assert_eq!((second.tier, second.path.clone()), (Tier::NodeDisk, first.path.clone()));

    // The object changes upstream but the manifest still names the old digest: refused, and the
    // good copy is what a lookup still finds.
    upload(&moto, "models", "tiny/model.gguf", b"tampered".to_vec()).await;
    let other = "0".repeat(64);
    let err = cache.fetch("s3://models/tiny/model.gguf", Some(&other), &opts).await.unwrap_err();
    assert!(matches!(&err, WeightError::Sha256Mismatch { actual, .. } if *actual == sha256(b"tampered")), "{err}");
    assert_eq!(std::fs::read(cache.lookup(&sha).unwrap()).unwrap(), good);

    let missing = cache.fetch("s3://models/nope.gguf", None, &opts).await.unwrap_err();
    assert!(matches!(missing, WeightError::Store(_)), "{missing}");
    let bad = cache.fetch("ftp://models/x", None, &opts).await.unwrap_err();
    assert!(matches!(bad, WeightError::BadUri { .. }), "{bad}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn directory_sources_and_eviction_within_the_budget() {
    let moto = moto().await;
    create_bucket(&moto, "models").await;
    upload(&moto, "models", "minilm/config.json", b"{}".to_vec()).await;
    upload(&moto, "models", "minilm/tokenizer.json", b"{\"model\":1}".to_vec()).await;
    let opts = options(&moto);
    let cache = NodeCache::new(scratch("dir"), 3000);
    let dir = cache.fetch("s3://models/minilm/", None, &opts).await.unwrap();
    assert!(dir.path.is_dir());
    assert_eq!(std::fs::read(dir.path.join("tokenizer.json")).unwrap(), b"{\"model\":1}");

    // Two 2,000-byte blobs do not fit a 3,000-byte budget: the older one goes.
    for (i, key) in ["a.bin", "b.bin"].iter().enumerate() {
        upload(&moto, "models", key, vec![i as u8; 2000]).await;
    }
    let a = cache.fetch("s3://models/a.bin", None, &opts).await.unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    let b = cache.fetch("s3://models/b.bin", None, &opts).await.unwrap();
    assert!(!a.path.exists(), "the least recently used blob was evicted");
    assert!(b.path.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_runner_serves_a_model_from_s3_and_reports_each_tier() {
    let moto = moto().await;
    create_bucket(&moto, "models").await;
    let gguf = std::fs::read(test_support::smollm2_path()).unwrap();
    let sha = sha256(&gguf);
    upload(&moto, "models", "smollm2/model.gguf", gguf).await;
    let cache_dir = scratch("serve");
    // The runner takes store options from the environment; here they go through the cache API
    // first (what `mantle-runner fetch` does in the init container), then serve finds the L3 copy.
    let cached = NodeCache::new(&cache_dir, 1 << 30)
        .fetch("s3://models/smollm2/model.gguf", Some(&sha), &options(&moto))
        .await
        .unwrap();
    assert_eq!(cached.tier, Tier::ObjectStore);
    let config = mantle_runner::RunnerConfig {
        sha256: Some(sha),
        cache_dir,
        kv_cache_bytes: 16 << 20,
        ..mantle_runner::RunnerConfig::local(
            "s3://models/smollm2/model.gguf",
            "huggingfacetb.smollm2-135m-instruct-v1:0",
        )
    };
    let runner = mantle_runner::start(config).await.unwrap();
    let mut client =
        mantle_proto::runner_client::RunnerClient::connect(format!("http://{}", runner.grpc_addr)).await.unwrap();
    let info = client.info(mantle_proto::InfoRequest {}).await.unwrap().into_inner();
    let tiers: Vec<&str> = info.weight_load.iter().map(|t| t.tier.as_str()).collect();
    assert_eq!(tiers, ["node_disk", "host_memory"], "served from the node cache, then mapped");
}

/// What the prewarm DaemonSet runs: the weights stay cached, and come back when evicted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kept_weights_are_fetched_again_when_evicted() {
    let moto = moto().await;
    create_bucket(&moto, "models").await;
    let data = b"prewarmed weights".repeat(100);
    upload(&moto, "models", "kept/model.gguf", data.clone()).await;
    let dir = scratch("keep");
    let cache = NodeCache::new(dir.clone(), 1 << 30).with_priority(1);
    let ready = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (sha, opts, flag) = (sha256(&data), options(&moto), ready.clone());
    let keeper = tokio::spawn(async move {
        cache.keep("s3://models/kept/model.gguf", Some(&sha), &opts, Duration::from_millis(100), &flag).await
    });
    let blob = dir.join("blobs").join(sha256(&data));
    let wait = |what: &'static str, cond: Box<dyn Fn() -> bool + Send>| async move {
        for _ in 0..100 {
            if cond() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{what}");
    };
    let r = ready.clone();
    wait("ready once cached", Box::new(move || r.load(std::sync::atomic::Ordering::Acquire))).await;
    assert_eq!(std::fs::read(&blob).unwrap(), data);
    assert_eq!(NodeCache::new(dir.clone(), 0).priority_of(&sha256(&data)), 1);
    std::fs::remove_file(&blob).unwrap();
    let b = blob.clone();
    wait("fetched again after eviction", Box::new(move || b.exists())).await;
    keeper.abort();
    let _ = std::fs::remove_dir_all(dir);
}
