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
    let root = Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into()))
        .join("../..");
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
