//! Helpers for tests and benchmarks (feature `test-support`): moto's S3 server on loopback,
//! started from the venv `scripts/python-env.sh` prepares.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use object_store::aws::AmazonS3Builder;
use object_store::{ObjectStoreExt, PutPayload};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// moto's S3 server on a free loopback port, stopped on drop.
pub struct Moto {
    child: Child,
    pub endpoint: String,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub async fn moto() -> Moto {
    let root = repo_root();
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

pub fn options(moto: &Moto) -> Vec<(String, String)> {
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
pub async fn create_bucket(moto: &Moto, bucket: &str) {
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

pub async fn upload(moto: &Moto, bucket: &str, key: &str, data: Vec<u8>) {
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

fn repo_root() -> PathBuf {
    Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into())).join("../..")
}

/// llama.cpp's `llama-server`: `$MANTLE_LLAMA_SERVER`, else what `scripts/fetch-llama-server.sh`
/// built (it builds it on first use).
pub fn llama_server_binary() -> PathBuf {
    if let Some(bin) = std::env::var_os("MANTLE_LLAMA_SERVER") {
        return bin.into();
    }
    let out = Command::new("bash")
        .arg(repo_root().join("scripts/fetch-llama-server.sh"))
        .stderr(Stdio::inherit())
        .output()
        .expect("bash runs fetch-llama-server.sh");
    assert!(out.status.success(), "scripts/fetch-llama-server.sh failed");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).lines().last().expect("llama-server path").trim())
}

/// A `llama-server` serving `model` on a loopback port, killed on drop: the real
/// OpenAI-compatible engine the external-engine tests run against. AMX weight repacking is off
/// (it crashes on some of our VMs); metrics and `/slots` are on.
pub struct LlamaServer {
    child: Option<Child>,
    model: PathBuf,
    slots: usize,
    threads: usize,
    /// Extra arguments (`--embeddings --pooling mean` for an embedding server).
    extra: Vec<String>,
    pub port: u16,
}

impl LlamaServer {
    /// Starts one with `slots` parallel sequences of 2048 tokens each and waits until it answers.
    pub async fn start(model: &Path, slots: usize, threads: usize) -> Self {
        Self::start_with(model, slots, threads, &[]).await
    }

    /// [`start`](Self::start) with extra server arguments.
    pub async fn start_with(model: &Path, slots: usize, threads: usize, extra: &[&str]) -> Self {
        let port = TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let extra = extra.iter().map(|s| s.to_string()).collect();
        let mut server = Self { child: None, model: model.to_path_buf(), slots, threads, extra, port };
        server.restart().await;
        server
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Kills the server (as a crash would).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and waits until it answers.
    pub async fn restart(&mut self) {
        self.kill();
        let child = Command::new(llama_server_binary())
            .arg("-m")
            .arg(&self.model)
            .args(["--host", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--no-repack", "--metrics", "--slots", "--no-webui", "--no-warmup"])
            .args(["-np", &self.slots.to_string(), "-c", &(2048 * self.slots).to_string()])
            .args(["-t", &self.threads.to_string()])
            // A thread per open connection: room for the clients' pools beside the slots.
            .args(["--threads-http", &(4 * self.slots + 8).to_string()])
            .args(&self.extra)
            .stdout(Stdio::null())
            // MANTLE_LLAMA_SERVER_LOG=1 shows the server's log.
            .stderr(if std::env::var_os("MANTLE_LLAMA_SERVER_LOG").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .expect("llama-server starts");
        self.child = Some(child);
        for _ in 0..600 {
            if http_status(self.port, "/health").await == Some(200) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("llama-server did not become healthy on port {}", self.port);
    }
}

impl Drop for LlamaServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The status of a plain HTTP/1.1 GET on loopback, `None` when nothing answers.
pub async fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok()?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut head = [0u8; 12];
    s.read_exact(&mut head).await.ok()?;
    std::str::from_utf8(&head[9..12]).ok()?.parse().ok()
}
