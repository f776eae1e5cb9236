//! Batch inference on the cluster path, end to end with the real binaries and the real model:
//! `mantle-router --kubernetes` and `mantle-operator` against one API server
//! (`../shared/tools/fake_apiserver.py`), a `mantle runner` behind an EndpointSlice, S3 on moto,
//! and `tests/e2e/cluster_batch.py` (boto3) as the client and as the kubelet that runs the
//! operator's worker Job as `mantle-batch` processes.
//!
//! `mantle-router`, `mantle-operator` and `mantle-batch` are other packages' binaries: the test
//! takes them from beside `mantle` (`cargo test --workspace` builds them all).

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("cli/ sits in the repository").to_path_buf()
}

fn cache() -> PathBuf {
    std::env::var_os("MANTLE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var("HOME").expect("HOME")).join(".cache/mantle"))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// A binary of the workspace, from beside `mantle`.
fn sibling(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_BIN_EXE_mantle")).with_file_name(name);
    assert!(path.exists(), "{} is missing: build the workspace (`cargo test --workspace` does)", path.display());
    path
}

/// Kills the process when the test ends, however it ends.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn(command: &mut Command, what: &str) -> Process {
    Process(command.spawn().unwrap_or_else(|e| panic!("{what} starts: {e}")))
}

fn wait_for_port(port: u16, what: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "{what} did not listen on {port}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn http_ok(port: u16, path: &str) -> bool {
    use std::io::{Read, Write};
    let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if write!(s, "GET {path} HTTP/1.0\r\n\r\n").is_err() {
        return false;
    }
    let mut head = [0u8; 12];
    s.read_exact(&mut head).is_ok() && &head[9..12] == b"200"
}

#[test]
fn boto3_batch_jobs_run_as_indexed_jobs_of_workers_through_the_operator() {
    let python = cache().join("venv/bin/python");
    assert!(python.exists(), "{} is missing: run scripts/python-env.sh (scripts/test.sh does)", python.display());
    let weights = cache().join("models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(weights.exists(), "{} is missing: run scripts/fetch-models.sh", weights.display());
    let dir = tempfile::tempdir().unwrap();
    let fake = repo_root().join("../shared/tools/fake_apiserver.py");

    // S3.
    let s3_port = free_port();
    let _moto = spawn(
        Command::new(cache().join("venv/bin/moto_server"))
            .args(["-H", "127.0.0.1", "-p", &s3_port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        "moto_server",
    );
    let s3 = format!("http://127.0.0.1:{s3_port}");

    // The API server, with the CRDs, the model (two shared replicas, no Cells) and the batch
    // credential's Secret.
    let api_port = free_port();
    let kubeconfig = dir.path().join("kubeconfig");
    let _api = spawn(
        Command::new(&python)
            .arg(&fake)
            .args(["serve", "--port", &api_port.to_string(), "--lenient-namespaces", "--kubeconfig"])
            .arg(&kubeconfig)
            .arg("--crds")
            .arg(repo_root().join("crds/manifests"))
            .stdout(Stdio::null())
            .stderr(Stdio::null()),
        "the fake API server",
    );
    wait_for_port(api_port, "the fake API server", Duration::from_secs(20));
    let api = format!("http://127.0.0.1:{api_port}");
    let helper = |args: &[&str]| {
        let out = Command::new(&python).arg(&fake).args(args).args(["--server", &api]).output().unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let model = std::fs::read_to_string(repo_root().join("examples/foundationmodel-smollm2.yaml")).unwrap();
    let model: String = model
        .lines()
        .filter(|l| !l.trim_start().starts_with("cells:"))
        .map(|l| if l.trim_start().starts_with("min: 1") { l.replace("min: 1", "min: 2") } else { l.to_string() })
        .map(|l| format!("{l}\n"))
        .collect();
    let token = "batch-token-for-the-test";
    let secret = format!(
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: mantle-batch-token\n  namespace: default\ndata:\n  token: {}\n",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, token)
    );
    std::fs::write(dir.path().join("model.yaml"), model).unwrap();
    std::fs::write(dir.path().join("secret.yaml"), secret).unwrap();
    helper(&[
        "apply",
        dir.path().join("model.yaml").to_str().unwrap(),
        dir.path().join("secret.yaml").to_str().unwrap(),
    ]);

    // One runner, found through its EndpointSlice.
    let (grpc, http) = (free_port(), free_port());
    let _runner = spawn(
        Command::new(env!("CARGO_BIN_EXE_mantle"))
            .args(["runner", "serve", "--model-id", "huggingfacetb.smollm2-135m-instruct-v1:0", "--model"])
            .arg(&weights)
            .args(["--listen", &format!("127.0.0.1:{grpc}"), "--http-listen", &format!("127.0.0.1:{http}")])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null()),
        "the runner",
    );
    let deadline = Instant::now() + Duration::from_secs(120);
    while !http_ok(http, "/readyz") {
        assert!(Instant::now() < deadline, "the runner did not become ready");
        std::thread::sleep(Duration::from_millis(200));
    }
    helper(&[
        "endpoints",
        "default",
        "smollm2-135m-instruct",
        "127.0.0.1",
        "--port",
        &grpc.to_string(),
        "--port-name",
        "grpc",
        "--label",
        "mantle.dev/foundation-model=smollm2-135m-instruct",
    ]);

    // The router and the operator, both following the API server.
    let (router_port, admin_port, operator_port) = (free_port(), free_port(), free_port());
    let token_file = dir.path().join("batch-token");
    std::fs::write(&token_file, token).unwrap();
    let _router = spawn(
        Command::new(sibling("mantle-router"))
            .args(["--kubernetes", "--no-auth", "--listen", &format!("127.0.0.1:{router_port}")])
            .args(["--admin-listen", &format!("127.0.0.1:{admin_port}"), "--batch-token-file"])
            .arg(&token_file)
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "warn"),
        "mantle-router",
    );
    let _operator = spawn(
        Command::new(sibling("mantle-operator"))
            .args(["--metrics-listen", &format!("127.0.0.1:{operator_port}")])
            .args(["--batch-router-url", &format!("http://127.0.0.1:{router_port}"), "--batch-s3-endpoint", &s3])
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null()),
        "mantle-operator",
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while !http_ok(admin_port, "/readyz") {
        assert!(Instant::now() < deadline, "the router did not become ready (it sees no runner?)");
        std::thread::sleep(Duration::from_millis(200));
    }

    let log = dir.path().join("workers.log");
    let out = Command::new(&python)
        .arg(repo_root().join("tests/e2e/cluster_batch.py"))
        .args([&format!("http://127.0.0.1:{router_port}"), &api, &s3])
        .arg(sibling("mantle-batch"))
        .arg(&kubeconfig)
        .env("MANTLE_WORKER_LOG", &log)
        .output()
        .expect("python runs");
    let report = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    println!("{report}");
    if !out.status.success() {
        let workers = std::fs::read_to_string(&log).unwrap_or_default();
        let tail: Vec<&str> = workers.lines().rev().take(40).collect();
        panic!(
            "cluster_batch.py failed:\n{report}\nthe workers' last lines:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }
}
