//! The weight cache against a real S3-compatible server (moto, started here on loopback):
//! L4 → L3 fills verified by SHA-256, L3 hits, a mismatching download refused while the good
//! copy stays, directory sources, LRU eviction within the budget, and a runner serving from s3://.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use mantle_engine::test_support;
use mantle_runner::weights::{NodeCache, Tier, WeightError};
use object_store::aws::AmazonS3Builder;
use object_store::{ObjectStoreExt, PutPayload};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// moto's S3 server on a free loopback port, stopped on drop.
struct Moto {
    child: Child,
    endpoint: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn moto() -> Moto {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new("bash").arg(root.join("scripts/python-env.sh")).output().expect("bash runs python-env.sh");
    assert!(out.status.success(), "python-env.sh failed: {}", String::from_utf8_lossy(&out.stderr));
    let venv = PathBuf::from(String::from_utf8_lossy(&out.stdout).lines().last().expect("venv path").trim());
    let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let child = Command::new(venv.join("bin/moto_server"))
        .args(["-H", "127.0.0.1", "-p", &port.to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("moto_server starts");
    // Owned by the guard from here on, so a failed start still stops the process.
    let moto = Moto { child, endpoint: format!("http://127.0.0.1:{port}") };
    for _ in 0..100 {
        if tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok() {
            return moto;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("moto_server did not start on port {port}");
}

fn options(moto: &Moto) -> Vec<(String, String)> {
    [
        ("aws_endpoint", moto.endpoint.as_str()),
        ("aws_allow_http", "true"),
        ("aws_access_key_id", "test"),
        ("aws_secret_access_key", "test"),
        ("aws_region", "us-east-1"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// Creates a bucket with a plain S3 CreateBucket request (moto does not check signatures).
async fn create_bucket(moto: &Moto, bucket: &str) {
    let host = moto.endpoint.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(host).await.unwrap();
    s.write_all(
        format!("PUT /{bucket} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).await.unwrap();
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
}

async fn upload(moto: &Moto, bucket: &str, key: &str, data: Vec<u8>) {
    let store = AmazonS3Builder::new()
        .with_bucket_name(bucket)
        .with_endpoint(&moto.endpoint)
        .with_allow_http(true)
        .with_access_key_id("test")
        .with_secret_access_key("test")
        .with_region("us-east-1")
        .build()
        .unwrap();
    store.put(&key.into(), PutPayload::from(data)).await.unwrap();
}

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
        model: "s3://models/smollm2/model.gguf".into(),
        sha256: Some(sha),
        cache_dir,
        cache_budget_bytes: 1 << 30,
        model_id: "huggingfacetb.smollm2-135m-instruct-v1:0".into(),
        grpc_listen: "127.0.0.1:0".parse().unwrap(),
        http_listen: "127.0.0.1:0".parse().unwrap(),
        threads: 0,
        kv_cache_bytes: 16 << 20,
        max_batch_tokens: 256,
        max_running: 4,
        swap_bytes: 0,
        chat_template: None,
        gpu_index: 0,
    };
    let runner = mantle_runner::start(config).await.unwrap();
    let mut client =
        mantle_proto::runner_client::RunnerClient::connect(format!("http://{}", runner.grpc_addr)).await.unwrap();
    let info = client.info(mantle_proto::InfoRequest {}).await.unwrap().into_inner();
    let tiers: Vec<&str> = info.weight_load.iter().map(|t| t.tier.as_str()).collect();
    assert_eq!(tiers, ["node_disk", "host_memory"], "served from the node cache, then mapped");
}
